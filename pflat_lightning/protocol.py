"""What the flattening callbacks need from a LightningModule, and defaults for plain modules.

A module takes part by offering any of these (``PrefixTunedClassifier`` offers all):

- ``layer_groups() -> Dict[str, List[nn.Parameter]]``: the parameters that form each "layer" (AWP
  perturbs each group relative to its own norm). Default: trainable parameters grouped by the
  submodule that owns them.
- ``example_losses(batch) -> Tensor``: one loss per example (sharpness measurement, ascent passes).
- ``loss_terms``: a list of ``fn(batch, logits, prefix) -> Tensor`` per-example terms added to each
  example's loss before clipping (teacher distillation); ``prefix`` is the per-example prefix of the
  forward that gave ``logits``.
- ``before_optimizers``: a list of ``fn(module)`` run when the optimizers are configured, after a resumed
  run's checkpoint is restored and before the noise is calibrated (the teacher is trained there, so
  a resume does not train it again).
- ``engine``: the :class:`~pflat_lightning.privacy.DPSGDEngine` of a private module (``None`` or absent
  for a non-private one), and ``ledger``: its :class:`~pflat_lightning.privacy.PrivacyLedger`.
- ``prefix``: the :class:`~pflat_lightning.prefix.PrefixEncoder` whose layers can be pruned.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import lightning.pytorch as pl
from torch import nn

from pflat_lightning.privacy.engine import DPSGDEngine
from pflat_lightning.privacy.ledger import PrivacyLedger


def layer_groups(pl_module: pl.LightningModule) -> Dict[str, List[nn.Parameter]]:
    """The module's own grouping, or its trainable parameters grouped by owning submodule."""
    if hasattr(pl_module, "layer_groups"):
        return pl_module.layer_groups()
    groups: Dict[str, List[nn.Parameter]] = defaultdict(list)
    for name, param in pl_module.named_parameters():
        if param.requires_grad:
            groups[name.rpartition(".")[0]].append(param)
    return dict(groups)


def privacy_engine(pl_module: pl.LightningModule) -> Optional[DPSGDEngine]:
    return getattr(pl_module, "engine", None)


def privacy_ledger(pl_module: pl.LightningModule) -> Optional[PrivacyLedger]:
    return getattr(pl_module, "ledger", None)


def require(pl_module: pl.LightningModule, attribute: str, who: str) -> None:
    if not hasattr(pl_module, attribute):
        raise TypeError(
            f"{who} needs `{attribute}` on the LightningModule (see pflat_lightning.protocol); "
            f"{type(pl_module).__name__} has none."
        )
