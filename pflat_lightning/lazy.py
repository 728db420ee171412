"""Lazy package exports (PEP 562): a package names its public classes without importing them first."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, List, Mapping, Tuple


def lazy_exports(package: str, exports: Mapping[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """A ``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to the module that
    defines it (or, for a subpackage, to the subpackage itself), imported on first access and then kept in
    the package's namespace, so ``from package import Name`` and ``package.Name`` work as with eager imports."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        value = module if module.__name__ == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
