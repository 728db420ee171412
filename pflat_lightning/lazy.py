"""Lazy package exports (PEP 562): a package names its public classes and subpackages without importing them first."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Collection, List, Mapping, Tuple


def lazy_exports(
    package: str, exports: Mapping[str, str], subpackages: Collection[str] = ()
) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """A ``__getattr__`` and ``__dir__`` for ``package``.

    ``exports`` maps a public name to the module that defines it; ``subpackages`` names subpackages of
    ``package``. Each is imported on first access and then kept in the package's namespace, so
    ``from package import Name`` and ``package.name`` work as with eager imports.

    Raises:
        AttributeError: (from ``__getattr__``) for a name that is neither exported nor a subpackage.

    Example::

        __getattr__, __dir__ = lazy_exports(__name__, {"Tuner": "package.tuner"}, subpackages=("attacks",))
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        if name in subpackages:
            value = importlib.import_module(f"{package}.{name}")
        elif name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports) | set(subpackages))

    return __getattr__, __dir__
