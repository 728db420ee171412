"""The contract between the flattening callbacks and a LightningModule, checked once at setup.

A module takes part by declaring the members of the capabilities a callback needs. Any
``LightningModule`` can (it need not subclass :class:`~pflat_lightning.module.DPPrefixModule`, which
declares them all); each capability is a ``typing.Protocol``, usable as a type and with ``isinstance``:

- :class:`PerExampleLosses` (every callback that evaluates the loss): ``example_losses(batch)``.
- :class:`LayerGroups` (optional): ``layer_groups()``. Without it, the trainable parameters grouped by
  the submodule that owns them.
- :class:`PrunablePrefix` (``SharpnessLayerSelection``): ``prefix_layer_mask()`` and
  ``set_prefix_layer_mask(keep)``.
- :class:`Distillable` and :class:`Cloneable` (``TeacherDistillation``): ``loss_terms``,
  ``before_optimizers``, ``prefix`` and ``clone_untrained()``; :class:`Cloneable` also makes LiRA's shadows
  (:func:`untrained_clone`).
- :class:`TokenScores` (the Min-K% and zlib membership attacks): ``token_log_probs(batch)``, ``tokenizer``.
- :class:`Private` (optional): ``engine``, ``ledger``, ``report_sections``. Without them the module is
  non-private, nothing is recorded and no report section is written.

:func:`check_contract` raises one ``TypeError`` that lists every missing member of the capabilities
asked for, each with what it must be. Optional members are read through the functions below
(:func:`layer_groups`, :func:`untrained_clone`, :func:`privacy_engine`, :func:`privacy_ledger`, :func:`report_sections`,
:func:`task_loss_mode` for ``loss_terms``), each with the fallback named in its docstring. A batch is any
collection of tensors with one row per example; :func:`num_examples` counts them and :func:`physical_batches`
cuts them into the chunks of one forward/backward pass. The README's section
"Callbacks on your own LightningModule" shows a minimal module.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Type, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from pflat_lightning.privacy.engine import DPSGDEngine
from pflat_lightning.privacy.ledger import PrivacyLedger

#: Where a user reads the contract with an example module.
README_SECTION = "README.md, section 'Callbacks on your own LightningModule'"
#: ``fn(batch, logits, prefix) -> Tensor[B]``: a per-example term added to each example's loss.
LossTerm = Callable[[Any, Tensor, List[Tuple[Tensor, Tensor]]], Tensor]


@runtime_checkable
class PerExampleLosses(Protocol):
    """The base capability: one loss per example."""

    def example_losses(self, batch: Any) -> Tensor:
        """returns a Tensor of shape [B], the loss of each of the batch's B examples (DP clips each example's
        gradient separately); plus fn(batch, logits, prefix) of each entry of loss_terms, if it has that list"""


@runtime_checkable
class LayerGroups(Protocol):
    """What AWP perturbs and the landscape measures move, one relative radius per group."""

    def layer_groups(self) -> Dict[str, List[nn.Parameter]]:
        """returns {name: [parameters]}, the parameters of each layer"""


@runtime_checkable
class PrunablePrefix(Protocol):
    """Prefix layers that layer selection can prune (a pruned layer gets no prefix and no update)."""

    def prefix_layer_mask(self) -> List[bool]:
        """returns one bool per prefix layer, True where the layer is active"""

    def set_prefix_layer_mask(self, keep: Sequence[bool]) -> None:
        """takes one bool per prefix layer and prunes the layers marked False (no prefix, no gradient)"""


@runtime_checkable
class Distillable(Protocol):
    """What a teacher needs from the student: its prefix, and hooks for per-example terms and setup work."""

    @property
    def loss_terms(self) -> List[LossTerm]:
        """a list (initially empty) of fn(batch, logits, prefix) -> Tensor[B] that example_losses adds to each
        example's loss, prefix being the per-example prefix of the forward that gave logits"""

    @property
    def before_optimizers(self) -> List[Callable[[pl.LightningModule], None]]:
        """a list (initially empty) of fn(module) that configure_optimizers runs first, then empties"""

    def prefix(self, batch_size: int) -> List[Tuple[Tensor, Tensor]]:
        """returns one (keys, values) pair per prefix layer, each with batch_size rows (e.g. a PrefixEncoder)"""


@runtime_checkable
class Cloneable(Protocol):
    """A fresh, untrained copy of the module (the teacher it trains)."""

    def clone_untrained(self, **overrides: Any) -> pl.LightningModule:
        """returns a new module of the same architecture with freshly initialised trainable parts (the teacher),
        accepting privacy= and optimizer= overrides where it has such settings"""


@runtime_checkable
class TokenScores(Protocol):
    """What the token-level membership attacks (Min-K%, zlib) need from a causal LM."""

    def token_log_probs(self, batch: Any) -> Tuple[Tensor, Tensor]:
        """returns (log_probs [B, T], mask [B, T]): the log-probability of each scored target token and which
        tokens are scored"""

    @property
    def tokenizer(self) -> Any:
        """the tokenizer that decodes the batch's input_ids"""


@runtime_checkable
class Private(Protocol):
    """The optional privacy side (a :class:`~pflat_lightning.module.DPPrefixModule` has it)."""

    @property
    def engine(self) -> Optional[DPSGDEngine]:
        """the module's DPSGDEngine, None when it trains without DP"""

    @property
    def ledger(self) -> PrivacyLedger:
        """the PrivacyLedger where components record what data they touched"""

    @property
    def report_sections(self) -> Dict[str, Any]:
        """a dict the callbacks write their privacy-report sections into"""


def contract_members(capability: Type) -> List[Tuple[str, str]]:
    """``(name, what it must be)`` for each member of ``capability``, in declaration order: a method with its
    signature, an attribute (declared as a property) by name."""
    members = []
    for name, value in capability.__dict__.items():
        if name.startswith("_") or not isinstance(value, (property, type(contract_members))):
            continue
        if isinstance(value, property):
            members.append((name, " ".join(inspect.getdoc(value).split())))
        else:
            signature = str(inspect.signature(value)).replace("'", "").replace("(self, ", "(").replace("(self)", "()")
            members.append((f"{name}{signature}", " ".join(inspect.getdoc(value).split())))
    return members


def check_contract(pl_module: pl.LightningModule, *capabilities: Type, who: str) -> None:
    """Raise one ``TypeError`` naming every member of ``capabilities`` that ``pl_module`` lacks.

    Call it once, where ``who`` (a callback or function) starts using the module (a callback's ``setup``).
    """
    missing = [(name, what) for capability in capabilities for name, what in contract_members(capability)
               if not hasattr(pl_module, name.partition("(")[0])]
    if missing:
        listed = "\n".join(f"  - {name}: {what}" for name, what in missing)
        raise TypeError(
            f"{who} needs these members on the LightningModule, which {type(pl_module).__name__} lacks:\n{listed}\n"
            f"See {README_SECTION} (and pflat_lightning.protocol)."
        )


# ---------------------------------------------------------------------- optional members, with their fallbacks
def layer_groups(pl_module: pl.LightningModule) -> Dict[str, List[nn.Parameter]]:
    """The module's ``layer_groups()``, or its trainable parameters grouped by owning submodule."""
    if isinstance(pl_module, LayerGroups):
        return pl_module.layer_groups()
    groups: Dict[str, List[nn.Parameter]] = defaultdict(list)
    for name, param in pl_module.named_parameters():
        if param.requires_grad:
            groups[name.rpartition(".")[0]].append(param)
    return dict(groups)


def untrained_clone(pl_module: pl.LightningModule, **overrides: Any) -> pl.LightningModule:
    """The module's ``clone_untrained`` (:class:`Cloneable`), given those ``overrides`` its signature accepts (all of
    them when it takes ``**overrides``): the one way the teacher and LiRA's shadows are made."""
    accepted = inspect.signature(pl_module.clone_untrained).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return pl_module.clone_untrained(**{k: v for k, v in overrides.items() if takes_all or k in accepted})


def num_examples(batch: Any) -> int:
    """The examples in ``batch``: the length of its first tensor (Lightning's own rule, ``extract_batch_size``);
    every tensor of a batch has one row per example, so an empty batch counts 0."""
    return extract_batch_size(batch)


def privacy_engine(pl_module: pl.LightningModule) -> Optional[DPSGDEngine]:
    """The module's DP engine; ``None`` for a non-private module or one without ``engine``."""
    return getattr(pl_module, "engine", None)


def privacy_ledger(pl_module: pl.LightningModule) -> Optional[PrivacyLedger]:
    """The module's ledger; ``None`` for one without ``ledger`` (nothing is recorded)."""
    return getattr(pl_module, "ledger", None)


def report_sections(pl_module: pl.LightningModule) -> Dict[str, Any]:
    """The module's report sections; a throw-away dict for one without ``report_sections`` (no report)."""
    return getattr(pl_module, "report_sections", {})


def physical_batches(batch: Any, size: int) -> Iterator[Any]:
    """``batch`` in chunks of at most ``size`` examples (none for an empty batch): the forward/backward passes of
    one logical batch. Every tensor is cut alike, and in a dict batch every other entry too (raw texts).

    A dict batch with a 2-D ``attention_mask`` is cut in order of length, shortest first, and a right-padded
    chunk is trimmed to its own longest example: every per-token entry (the shape of the mask) loses the columns
    that are padding in all of its rows. The chunks hold the same examples as the batch, so a DP update (a sum
    of clipped per-example gradients) is the same; only less padding goes through the model."""
    count = num_examples(batch)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not (isinstance(mask, Tensor) and mask.dim() == 2 and count > size):
        for start in range(0, count, size):
            yield _rows(batch, slice(start, start + size))
        return
    lengths = mask.sum(dim=1)
    right_padded = bool(mask[:, 0].all())
    for rows in torch.argsort(lengths, stable=True).split(size):
        chunk = _rows(batch, rows)
        if right_padded:
            longest = int(lengths[rows].max())
            shape = chunk["attention_mask"].shape
            chunk = {key: value[:, :longest] if _per_token(value, shape) else value for key, value in chunk.items()}
        yield chunk


def _per_token(value: Any, shape: torch.Size) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 2 and value.shape[:2] == shape


def _rows(batch: Any, rows: Any) -> Any:
    """The examples ``rows`` (a slice or an index tensor) of ``batch``: of every tensor, and in a dict batch of
    every other sequence too."""
    if isinstance(batch, Mapping):
        if isinstance(rows, slice):
            return {key: value[rows] for key, value in batch.items()}
        return {key: value[rows] if isinstance(value, Tensor) else [value[i] for i in rows.tolist()]
                for key, value in batch.items()}
    return apply_to_collection(batch, Tensor, lambda tensor: tensor[rows])


def physical_batch_size(pl_module: pl.LightningModule, batch: Any) -> int:
    """Examples per forward/backward: the module's ``max_physical_batch_size``, else the whole batch."""
    return getattr(pl_module, "max_physical_batch_size", None) or max(num_examples(batch), 1)


@contextmanager
def task_loss_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode and an empty ``loss_terms`` (the callbacks' regularisers; a module without the list has none)
    while inside, so that ``example_losses`` is the task loss alone. Every submodule's train/eval flag and the
    ``loss_terms`` list (the same object, its entries) are restored on exit."""
    modes = [(module, module.training) for module in pl_module.modules()]
    terms = getattr(pl_module, "loss_terms", None)
    saved = list(terms) if terms is not None else None
    pl_module.eval()
    if terms is not None:
        terms.clear()
    try:
        yield
    finally:
        if terms is not None:
            terms[:] = saved
        for module, training in modes:
            module.training = training
