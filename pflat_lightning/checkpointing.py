"""Checkpoints that a kill at any moment cannot corrupt.

A DP checkpoint holds the privacy spend (accountant history, noise generator, sampler position): losing
it to a half-written file would force a restart that forgets what was spent. Lightning's default writer
goes through a temporary file in the system's temp folder; when that folder is on another filesystem
the final move is a copy, and a kill during the copy leaves a truncated checkpoint.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import Any, Dict, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file next to its target, syncs it to disk and renames it
    over the target: the path holds either the previous checkpoint or the new one, never a partial file.

    Local paths only (remote URLs go through Lightning's writer). ``DPDDPStrategy`` uses it by default;
    a private ``PrefixTunedClassifier`` installs it on a trainer that uses Lightning's default writer.

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
