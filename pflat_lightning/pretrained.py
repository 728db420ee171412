"""The frozen pretrained backbone and tokenizer of a task module: loaded once, shared with its clones.

A task module names its backbone by a string (a bundled name, a folder or a hub id) so that LightningCLI,
checkpoints and releases can rebuild it; :func:`load_pretrained` turns that name into the model and its
tokenizer. :meth:`~pflat_lightning.module.DPPrefixModule.clone_untrained` (the teacher of
``TeacherDistillation``, LiRA's shadows) builds a second module of the same configuration through the
same constructor; inside :func:`sharing_pretrained` the constructor receives the original's backbone and
tokenizer objects instead of reading the files again, so the clone holds no second copy of the backbone.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pflat_lightning.bundled import resolve_model


class _Shared(NamedTuple):
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


_SHARED: ContextVar[Optional[_Shared]] = ContextVar("pflat_shared_pretrained", default=None)


def load_pretrained(
    backbone: str, load: Callable[[str], PreTrainedModel]
) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer that ``backbone`` names; inside :func:`sharing_pretrained` for that name, the
    shared objects (nothing is read).

    Args:
        backbone: a bundled name (``"bundled-minilm"``), a local folder or a hub id.
        load: reads the model from the resolved folder or id (e.g. ``AutoModelForCausalLM.from_pretrained``).

    Raises:
        ValueError: when ``backbone`` is neither a bundled model, a local folder nor a reachable hub id.
    """
    shared = _SHARED.get()
    if shared is not None and shared.name == backbone:
        return shared.model, shared.tokenizer
    path = resolve_model(backbone)
    try:
        return load(path), AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise ValueError(
            f"backbone={backbone!r} is neither a bundled model, a local folder nor a reachable hub id: {error}"
        ) from error


@contextmanager
def sharing_pretrained(
    backbone: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> Iterator[None]:
    """While inside, :func:`load_pretrained` answers ``backbone`` with ``model`` and ``tokenizer`` (this thread
    or task only)."""
    token = _SHARED.set(_Shared(backbone, model, tokenizer))
    try:
        yield
    finally:
        _SHARED.reset(token)
