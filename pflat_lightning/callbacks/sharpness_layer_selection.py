"""Cross-layer flattening: keep the prefix layers whose removal would sharpen the loss the most."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from pflat_lightning.landscape.measures import (
    DEFAULT_ALPHAS,
    check_alphas,
    collect_batches,
    gradient_direction,
    paper_curve,
    released_direction,
    split_loader,
)
from pflat_lightning.protocol import (
    PerExampleLosses,
    PrunablePrefix,
    check_contract,
    layer_groups,
    privacy_engine,
    privacy_ledger,
    report_sections,
)

DATA_SOURCES = ("public", "validation", "private")
DIRECTIONS = ("released", "data")
CRITERIA = ("sharpness", "worst_loss")


class SharpnessLayerSelection(Callback):
    """Sparse prefix tuning: prunes the prefix layers whose removal leaves the flattest loss.

    At the start of epoch ``at_epoch`` (default 1: after one epoch of warm-up, so that a private
    direction exists) it measures, for every active prefix layer ``l``, the flatness indicator of the
    paper: with layer ``l``'s prefix removed (keys and values zeroed), the loss along the normalised
    direction ``d`` at ``w + alpha * radius * d`` for ``alpha`` in ``alphas``; the layer's score is the
    largest rise ``max_alpha L(alpha) - L(0)`` (measured by :func:`pflat_lightning.landscape.paper_curve`:
    the task loss without teacher terms, in eval mode, the weights restored exactly). Removing a layer
    with a low score flattens the loss, so the ``keep_layers`` layers with the highest scores keep their
    prefix and the rest are pruned (no gradient, no noise, no update from then on). Scores go to the
    logger and the privacy report.

    The paper's indicator ignores the curve's level: removing a layer the prefix needs raises ``L(0)`` and
    can flatten the curve, so it scores low and is pruned. Measured on the prompt-based SmolLM2 recipe, the
    eight layers it pruned (mostly early ones) raised the initial prefix's public loss from 0.27 to 0.45, eight
    others 0.31-0.32 (``examples/flatness_diagnostics.py``). ``criterion="worst_loss"`` scores a removal by the
    curve's highest loss, ``max_alpha L(alpha)`` (the loss at the worst point of the neighbourhood, as SAM's
    objective): the layers whose removal leaves a low and flat loss are pruned. On that recipe, selecting at
    epoch 1 with radius 1, the rise dominates the level and both criteria pruned the same eight layers
    (validation 81.2 %, 1.6 points under DP-SGD alone).

    Which data it reads is explicit (``data``): the ``public`` split (no privacy cost), the
    ``validation`` split (private data held out of training: a ``held_out`` ledger entry, the training
    set's guarantee holds but the validation examples get none), or the ``private`` training data (an
    ``unaccounted`` entry: the selection then depends on private data outside the accountant). The direction ``d`` is
    the gradient of the selection data itself (``"data"``, the default; on private data under DP this is
    the paper's code, a raw gradient of private batches, recorded as such) or the last released
    (noised) DP gradient (``"released"``, post-processing). Measured on the bundled MiniLM (epsilon 8,
    clip 0.1, expected batch 263, 46,080 prefix values), the released gradient restricted to the prefix
    is almost pure noise: the classifier head's gradient takes most of each example's clipping budget,
    so the loss barely moves along it and every layer scores about 0. A warning says so when all scores are 0.

    The module declares its prefix layers' mask (:class:`~pflat_lightning.protocol.PrunablePrefix`:
    ``prefix_layer_mask()``, ``set_prefix_layer_mask(keep)``) and, unless ``layers`` is given, its per-example
    losses (``example_losses(batch)``); ``layer_groups()`` is optional (see :mod:`pflat_lightning.protocol`).

    Args:
        keep_layers: how many layers keep a prefix: a count, or a fraction of the layers (the paper
            kept 9 of 12, 0.75).
        at_epoch: epoch at whose start the selection runs.
        layers: a fixed list of layers to keep instead of measuring.
        data: ``"public"``, ``"validation"`` or ``"private"``.
        direction: ``"data"`` or ``"released"`` (``None``: ``"data"``).
        alphas: steps along ``d`` (default 0, 0.1, ..., 1.0, as in the paper's curves).
        radius: length of the step at ``alpha = 1`` (``d`` has unit norm).
        num_batches: batches of the selection data evaluated per point of each curve.
        batch_size: examples per batch of the selection data (default: the datamodule's evaluation batch size).
            Each layer's curve costs ``len(alphas) * num_batches`` forward passes of this size.
        criterion: a removal's score: ``"sharpness"`` (the paper's, ``max L(alpha) - L(0)``) or
            ``"worst_loss"`` (``max L(alpha)``). The layers with the highest scores keep their prefix.

    Raises:
        TypeError: at fit setup, listing every member of the contract the module lacks.
        ValueError: for a bad argument; at fit setup for ``layers`` outside ``[0, num_layers)``, a
            ``keep_layers`` count above the prefix's layers, or an ``at_epoch`` the run cannot reach
            (``max_epochs``, or ``max_steps`` with the training batches per epoch, checked again before the
            first step once the loader's length is known).

    Example::

        trainer = pl.Trainer(callbacks=[SharpnessLayerSelection(keep_layers=0.75, data="public")])
    """

    def __init__(
        self,
        keep_layers: Union[int, float] = 0.75,
        *,
        at_epoch: int = 1,
        layers: Optional[List[int]] = None,
        data: Literal["public", "validation", "private"] = "validation",
        direction: Optional[Literal["released", "data"]] = None,
        alphas: Optional[List[float]] = None,
        radius: float = 1.0,
        num_batches: int = 4,
        batch_size: Optional[int] = None,
        criterion: Literal["sharpness", "worst_loss"] = "sharpness",
    ) -> None:
        if isinstance(keep_layers, float) and not 0 < keep_layers <= 1:
            raise ValueError(f"keep_layers as a fraction must be in (0, 1], got {keep_layers}.")
        if isinstance(keep_layers, int) and keep_layers < 1:
            raise ValueError(f"keep_layers as a count must be >= 1, got {keep_layers}.")
        if at_epoch < 0:
            raise ValueError(f"at_epoch must be >= 0, got {at_epoch}.")
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ValueError(f"layers must be a non-empty list of distinct prefix layer indices, got {layers}.")
        if data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {data!r}.")
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS} or None, got {direction!r}.")
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius}.")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
        self.keep_layers = keep_layers
        self.at_epoch = at_epoch
        self.fixed_layers = layers
        self.data = data
        self.direction = direction
        self.alphas = check_alphas(DEFAULT_ALPHAS if alphas is None else alphas)
        self.radius = radius
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.criterion = criterion
        self.selected: Optional[List[int]] = None
        self.scores: Dict[int, float] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        needs = (PrunablePrefix,) if self.fixed_layers is not None else (PrunablePrefix, PerExampleLosses)
        check_contract(pl_module, *needs, who=type(self).__name__)
        self._check_layers(len(pl_module.prefix_layer_mask()))
        # Every epoch takes at least one step: a plan of max_steps <= at_epoch ends before the selection.
        self._check_reached(trainer, steps_per_epoch=1)
        if self.fixed_layers is not None:
            return
        engine, ledger = privacy_engine(pl_module), privacy_ledger(pl_module)
        direction = self._direction_kind(pl_module)
        if engine is None:
            return
        if direction == "released":
            if self.at_epoch == 0:
                raise ValueError("direction='released' needs a released gradient: at_epoch must be >= 1.")
            engine.keep_released_gradient = True
        name = type(self).__name__
        if self.data == "private":
            along = ("along their raw (unclipped, un-noised) gradient, as in the paper's code" if direction == "data"
                     else "along the last released gradient")
            ledger.record(name, "unaccounted", f"layer scores measured on private training batches {along}: the "
                                               "selection depends on private data outside the accountant")
        elif self.data == "public":
            ledger.record(name, "public", "layer scores measured on the public split")
        else:
            ledger.record(name, "held_out", "layer scores measured on the validation split (private data held out of "
                                            "training) without DP: the layers kept depend on those examples")

    def _check_layers(self, num_layers: int) -> None:
        if self.fixed_layers is not None and not all(0 <= layer < num_layers for layer in self.fixed_layers):
            raise ValueError(f"layers={self.fixed_layers} names a layer the model lacks: the prefix has {num_layers} "
                             f"layers, indices in [0, {num_layers}).")
        if isinstance(self.keep_layers, int) and self.keep_layers > num_layers:
            raise ValueError(f"keep_layers={self.keep_layers} is more than the model's {num_layers} prefix layers: a "
                             f"count must be in [1, {num_layers}] (or a fraction in (0, 1]).")

    def _check_reached(self, trainer: pl.Trainer, steps_per_epoch: float) -> None:
        """Refuse a plan that ends before the start of epoch ``at_epoch`` (the selection would never run).
        Lightning starts epoch ``k`` only if ``k < max_epochs`` and fewer than ``max_steps`` optimizer steps
        came before it: ``k * steps_per_epoch``, counting one step per training batch (DP-SGD steps on every
        batch, an empty one too; a non-private fit skips an empty Poisson batch, so there the count is an
        upper bound; ``limit_train_batches`` applied)."""
        if self.selected is not None:
            return
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise ValueError(f"at_epoch={self.at_epoch} is never reached: Trainer(max_epochs={max_epochs}) runs "
                             f"epochs 0..{max_epochs - 1}; at_epoch must be < max_epochs.")
        if max_steps >= 0 and self.at_epoch > 0 and self.at_epoch * steps_per_epoch >= max_steps:
            raise ValueError(
                f"at_epoch={self.at_epoch} is never reached: Trainer(max_steps={max_steps}) ends before epoch "
                f"{self.at_epoch} starts (at least {self.at_epoch * steps_per_epoch:g} steps come before it); "
                "at_epoch * training batches per epoch must be < max_steps."
            )
        if trainer.current_epoch > self.at_epoch:
            raise ValueError(f"at_epoch={self.at_epoch} is never reached: this fit resumes at epoch "
                             f"{trainer.current_epoch} and no selection was made before it.")

    def _direction_kind(self, pl_module: pl.LightningModule) -> str:
        return self.direction or "data"

    # ------------------------------------------------------------------ selection
    def _keep_count(self, num_layers: int) -> int:
        if isinstance(self.keep_layers, float):
            return max(1, round(self.keep_layers * num_layers))
        return min(self.keep_layers, num_layers)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.selected is not None or trainer.current_epoch != self.at_epoch:
            return
        if self.fixed_layers is not None:
            keep = sorted(self.fixed_layers)
        else:
            keep = None
            if trainer.is_global_zero:
                self.scores = self._measure(trainer, pl_module)
                if self.criterion == "sharpness" and max(self.scores.values()) <= 0:
                    rank_zero_warn(
                        f"SharpnessLayerSelection: every layer scores 0 (the loss never rises along the "
                        f"{self._direction_kind(pl_module)!r} direction), so the layers kept are arbitrary. "
                        "direction='data' on public or validation data gives an informative direction."
                    )
                ranked = sorted(self.scores, key=lambda layer: -self.scores[layer])
                keep = sorted(ranked[: self._keep_count(len(ranked))])
            keep = trainer.strategy.broadcast(keep, src=0)
            self.scores = trainer.strategy.broadcast(self.scores, src=0)
            for layer, score in self.scores.items():
                pl_module.log(f"{self.criterion}_without_layer_{layer}", score, rank_zero_only=True)
        pl_module.set_prefix_layer_mask([layer in keep for layer in range(len(pl_module.prefix_layer_mask()))])
        self.selected = keep
        self._publish(pl_module)
        rank_zero_info(f"SharpnessLayerSelection: keeping prefix layers {keep}, scores {self.scores}")

    def _publish(self, pl_module: pl.LightningModule) -> None:
        report_sections(pl_module)[type(self).__name__] = {
            "kept_layers": self.selected, "scores": {str(k): v for k, v in self.scores.items()},
            "criterion": self.criterion if self.fixed_layers is None else None,
            "data": self.data, "direction": self._direction_kind(pl_module) if self.fixed_layers is None else None,
        }

    def _batches(self, trainer: pl.Trainer, device: torch.device) -> List[Any]:
        datamodule = trainer.datamodule
        if self.data == "private" and self.batch_size is None:
            loader = trainer.train_dataloader
        elif datamodule is not None:
            loader = split_loader(datamodule, self.data, batch_size=self.batch_size)
        elif self.data == "validation":
            loader = trainer.val_dataloaders
        else:
            raise ValueError("data='public' needs a datamodule with public_dataloader() (public_fraction > 0).")
        return collect_batches(loader, self.num_batches, device)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[int, float]:
        batches = self._batches(trainer, pl_module.device)
        groups = layer_groups(pl_module)
        direction = self._unit_direction(pl_module, groups, batches)
        original_mask = pl_module.prefix_layer_mask()
        scores: Dict[int, float] = {}
        try:
            for layer in [i for i, active in enumerate(original_mask) if active]:
                pl_module.set_prefix_layer_mask([active and i != layer for i, active in enumerate(original_mask)])
                curve = paper_curve(pl_module, batches, alphas=self.alphas, radius=self.radius,
                                    direction=direction, groups=groups)
                scores[layer] = curve["sharpness"] if self.criterion == "sharpness" else max(curve["losses"])
        finally:
            pl_module.set_prefix_layer_mask(original_mask)
        return scores

    def _unit_direction(self, pl_module: pl.LightningModule, groups: Dict[str, List[torch.nn.Parameter]],
                        batches: List[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        if self._direction_kind(pl_module) == "released":
            direction = released_direction(pl_module, groups=groups)
            if direction is None:
                raise RuntimeError("No released gradient yet: SharpnessLayerSelection needs at_epoch >= 1.")
            return direction
        return gradient_direction(pl_module, batches, groups=groups)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"selected": self.selected, "scores": self.scores}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.selected = state_dict["selected"]
        self.scores = {int(k): v for k, v in state_dict["scores"].items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.selected is not None:
            self._publish(pl_module)
        elif math.isfinite(trainer.num_training_batches):  # known now, before the first step
            self._check_reached(trainer, steps_per_epoch=trainer.num_training_batches)
