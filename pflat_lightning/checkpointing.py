"""Checkpoints that a kill at any moment cannot corrupt.

A DP checkpoint holds the privacy spend (accountant history, noise generator, sampler position): losing
it to a half-written file would force a restart that forgets what was spent. Lightning's default writer
goes through a temporary file in the system's temp folder; when that folder is on another filesystem
the final move is a copy, and a kill during the copy leaves a truncated checkpoint.

A checkpoint also carries its frozen backbone: loaded into a module built for another model, it would
silently replace that module's backbone or fail with a bare size mismatch. :func:`check_checkpoint_matches`
says in words what differs before anything is loaded.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pflat_lightning.prefix import PrefixConfig


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file next to its target, syncs it to disk and renames it
    over the target: the path holds either the previous checkpoint or the new one, never a partial file.

    Local paths only (remote URLs go through Lightning's writer). ``DPDDPStrategy`` uses it by default;
    every :class:`~pflat_lightning.privacy.training.PrivateTraining` module (DP prefix tuning, the black-box
    tuner) installs it at fit on a trainer that uses Lightning's default writer.

    Example::

        trainer = pl.Trainer(plugins=[AtomicCheckpointIO()])
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        if "://" in path:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"storage_options={storage_options!r} is not supported by {type(self).__name__}.")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        prefix = f".{os.path.basename(path)}."
        for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
            os.remove(stale)  # left by a run killed while saving
        handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)


#: The hyperparameters that decide a prefix-tuned module's architecture and frozen backbone, with the fields of its
#: ``prefix`` that do (:data:`PREFIX_ARCHITECTURE`). The others (the privacy config, the optimizer, the prefix's
#: initialisation, LightningCLI's own keys) may differ between runs of one model.
ARCHITECTURE_HPARAMS = ("backbone", "num_labels", "head", "label_words", "prefix")
PREFIX_ARCHITECTURE = ("num_virtual_tokens", "reparam_hidden")
#: The trained tensors of a prefix-tuned module; everything else under ``model.`` is the frozen backbone.
TRAINED_PREFIXES = ("model.prefix.", "model.classifier.")
_UNSET = "(not set)"


def trainable_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A CPU copy of the trainable parameters (``requires_grad``), by name: the ``"initial"`` reference of an
    audit, a teacher's weights."""
    return {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters() if p.requires_grad}


def check_checkpoint_matches(module: LightningModule, checkpoint: Dict[str, Any], name: str = "The checkpoint") -> None:
    """Refuse a checkpoint of another model before its weights are loaded into ``module``.

    Compares the checkpoint's architecture settings (:func:`architecture`, those it records) with the module's, then the
    shapes of the prefix and head tensors. A ``backbone`` named differently is accepted when the
    checkpoint's backbone tensors equal the module's (the same model in another folder).

    Args:
        module: the prefix-tuned module about to receive the weights.
        checkpoint: the loaded checkpoint (``hyper_parameters``, ``state_dict``).
        name: how the message names the checkpoint.

    Raises:
        ValueError: naming each differing setting (or tensor shape) with the checkpoint's and the module's value.
    """
    saved, own = architecture(checkpoint.get("hyper_parameters") or {}), architecture(module.hparams)
    state, mine, what = checkpoint["state_dict"], module.state_dict(), type(module).__name__
    differences: List[str] = [
        f"{key}={value!r} in the checkpoint, {own.get(key, _UNSET)!r} in this {what}"
        for key, value in saved.items()
        if value != own.get(key, _UNSET) and not (key == "backbone" and _same_backbone(mine, state))
    ]
    if not differences:  # shapes follow from the settings: compare them when the settings agree or are not recorded
        differences = [
            f"{key} has shape {tuple(tensor.shape)} in the checkpoint, {tuple(mine[key].shape)} in this {what}"
            for key, tensor in state.items()
            if key.startswith(TRAINED_PREFIXES) and key in mine and mine[key].shape != tensor.shape
        ]
    if differences:
        raise ValueError(
            f"{name} holds another model than this {what}: {'; '.join(differences)}. Load it with "
            "the settings of the run that wrote it (its config.yaml), or use a checkpoint of this model."
        )


def architecture(hparams: Mapping[str, Any]) -> Dict[str, Any]:
    """The architecture settings that ``hparams`` records, by name: the :data:`ARCHITECTURE_HPARAMS` and, for a
    ``prefix``, its :data:`PREFIX_ARCHITECTURE` fields as ``prefix.<field>``. The prefix is recorded as a
    :class:`PrefixConfig`, as the dict of its fields (LightningCLI saves the parsed config) or as ``None``
    (``PrefixConfig()``)."""
    settings = {key: hparams[key] for key in ARCHITECTURE_HPARAMS if key in hparams and key != "prefix"}
    if "prefix" in hparams:
        prefix = hparams["prefix"]
        prefix = PrefixConfig(**prefix) if isinstance(prefix, Mapping) else prefix or PrefixConfig()
        settings.update({f"prefix.{name}": getattr(prefix, name) for name in PREFIX_ARCHITECTURE})
    return settings


def _same_backbone(mine: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> bool:
    frozen = [key for key in mine if key.startswith("model.") and not key.startswith(TRAINED_PREFIXES)]
    return set(frozen) == {key for key in state if key.startswith("model.") and not key.startswith(TRAINED_PREFIXES)} \
        and all(mine[key].shape == state[key].shape and torch.equal(mine[key], state[key].to(mine[key].device))
                for key in frozen)
