"""Within-layer flattening: adversarial weight perturbation (AWP) with a private direction."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from pflat_lightning.privacy.engine import DPSGDEngine
from pflat_lightning.privacy.sampling import PoissonDataLoader
from pflat_lightning.protocol import (
    PerExampleLosses,
    check_contract,
    layer_groups,
    num_examples,
    physical_batch_size,
    physical_batches,
    privacy_engine,
    privacy_ledger,
    report_sections,
)

DIRECTIONS = ("previous_private", "fresh_private", "raw")


class AdversarialWeightPerturbation(Callback):
    """Computes each step's gradient at adversarially perturbed weights, then updates the real weights.

    Before a training step every layer ``l`` is moved to ``w_l + v_l`` with
    ``v_l = gamma * ||w_l|| * d_l / ||d_l||``; the step's gradient is taken there, the weights are
    restored bit-exactly before the optimizer applies that gradient, so checkpoints never contain the
    perturbation. It runs for the first part of training (``until_epoch`` or ``until_fraction``).

    The ascent direction ``d`` decides the privacy cost:

    - ``"previous_private"`` (default, DP-SAT): the previous update's already-noised DP gradient. Pure
      post-processing: no extra privacy cost and no extra pass. The first step is not perturbed.
    - ``"fresh_private"``: a second pass, clipped and noised like an update, on a Poisson sample of its
      own: each perturbed step draws a new sample of the training set at the training loader's rate,
      independent of the update's batch (so each release is one Poisson-subsampled Gaussian release of
      rate ``q``), and an empty draw releases noise only. The accountant counts one extra ``(sigma, q)``
      release per perturbed step and the noise is calibrated for it. (The update's own batch would not
      do: two releases of one subsample are a single mechanism of noise ``sigma / sqrt(2)``, amplified
      by subsampling once.) Needs ``PrivacyConfig(poisson_sampling=True)``.
    - ``"raw"`` (the paper's code): the raw gradient of the private batch. Recorded in the ledger as
      unaccounted: the report then says no formal guarantee holds.

    On a non-private module every mode uses ordinary gradients of the current batch. Layers are the module's
    ``layer_groups()`` (each prefix layer for ``PrefixTunedClassifier``) or, for a plain
    LightningModule, its trainable parameters grouped by submodule. The ``"raw"`` and ``"fresh_private"``
    modes need ``example_losses(batch)`` (:class:`~pflat_lightning.protocol.PerExampleLosses`); batches may
    be any collection of tensors with one row per example.

    Args:
        gamma: relative perturbation size (the paper used 1e-4 with RoBERTa-base; the norm of a
            layer's perturbation is ``gamma * ||w_l||``).
        direction: ``"previous_private"``, ``"fresh_private"`` or ``"raw"``.
        until_epoch: perturb in epochs ``< until_epoch`` (the paper: 15 of 30).
        until_fraction: perturb during this fraction of the planned steps (used when
            ``until_epoch`` is ``None``; default 0.5, the paper's half).

    Raises:
        ValueError: for a bad ``gamma``, ``direction`` or schedule; at fit start for
            ``Trainer(accumulate_grad_batches > 1)`` (each micro-batch would perturb the weights again
            before the restore) and for ``"fresh_private"`` under ``PrivacyConfig(poisson_sampling=False)``.
        TypeError: at fit setup, listing every member the module lacks (``example_losses`` for
            ``"raw"``/``"fresh_private"``).

    Example::

        trainer = pl.Trainer(callbacks=[AdversarialWeightPerturbation(gamma=0.01)], max_epochs=4)
    """

    def __init__(
        self,
        gamma: float = 0.01,
        *,
        direction: Literal["previous_private", "fresh_private", "raw"] = "previous_private",
        until_epoch: Optional[int] = None,
        until_fraction: float = 0.5,
    ) -> None:
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}.")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
        if until_epoch is not None and until_epoch < 0:
            raise ValueError(f"until_epoch must be >= 0 or None, got {until_epoch}.")
        if not 0.0 <= until_fraction <= 1.0:
            raise ValueError(f"until_fraction must be in [0, 1], got {until_fraction}.")
        self.gamma = gamma
        self.direction = direction
        self.until_epoch = until_epoch
        self.until_fraction = until_fraction
        self.perturbed_steps = 0
        self._backup: Optional[Dict[torch.nn.Parameter, torch.Tensor]] = None
        self._previous: Optional[Dict[torch.nn.Parameter, torch.Tensor]] = None
        self._pending_previous: Optional[List[torch.Tensor]] = None
        self._ascent_batches: Optional[Iterator[Any]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(gamma=self.gamma, direction=self.direction)

    # ------------------------------------------------------------------ schedule
    def _active_steps(self, trainer: pl.Trainer, planned: int) -> int:
        if self.until_epoch is not None:  # every batch of the first until_epoch epochs (as run: limits applied)
            per_epoch = trainer.num_training_batches
            return planned if not math.isfinite(per_epoch) else min(planned, self.until_epoch * int(per_epoch))
        return int(self.until_fraction * planned)

    def _is_active(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if self.until_epoch is not None:
            return trainer.current_epoch < self.until_epoch
        engine = privacy_engine(pl_module)
        planned = engine.planned_steps if engine is not None else trainer.estimated_stepping_batches
        step = engine.updates if engine is not None else trainer.global_step
        return step < int(self.until_fraction * planned)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"AdversarialWeightPerturbation cannot be used with Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): every micro-batch would perturb the weights again before the "
                "restore at the optimizer step, leaving a perturbation in them. Allowed: accumulate_grad_batches=1."
            )
        engine, ledger = privacy_engine(pl_module), privacy_ledger(pl_module)
        if self.direction != "previous_private":
            check_contract(pl_module, PerExampleLosses, who=f"AdversarialWeightPerturbation(direction={self.direction!r})")
        if engine is None:
            return
        if self.direction == "previous_private":
            engine.keep_released_gradient = True
            ledger.record(type(self).__name__, "accounted",
                          "ascent direction = previous update's noised gradient (post-processing, no extra cost)")
        elif self.direction == "fresh_private":
            if not engine.config.poisson_sampling:
                raise ValueError(
                    "AdversarialWeightPerturbation(direction='fresh_private') draws its ascent batches by Poisson "
                    "sampling at the training loader's rate: it needs PrivacyConfig(poisson_sampling=True), got False."
                )
            engine.extra_releases.append(lambda planned: self._active_steps(trainer, planned))
            ledger.record(type(self).__name__, "accounted",
                          "one extra clipped and noised ascent gradient per perturbed step, on its own Poisson sample "
                          "of the training set (independent of the update's batch, same sample rate), counted by the "
                          "accountant as one more (noise_multiplier, sample_rate) release")
        else:
            ledger.record(type(self).__name__, "unaccounted",
                          "ascent direction = raw (unclipped, un-noised) gradient of private batches, as in the "
                          "paper's code: its influence on the weights is not covered by the accountant")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._is_active(trainer, pl_module):
            self._previous = None
            return
        groups = layer_groups(pl_module)
        direction = self._direction(pl_module, batch, groups)
        if direction is None:
            return
        self._backup = {}
        with torch.no_grad():
            for params in groups.values():
                d = [direction[p] for p in params if p in direction]
                if len(d) != len(params):
                    continue
                w_norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params))
                d_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in d))
                if d_norm == 0:
                    continue
                scale = self.gamma * w_norm / d_norm
                for p, g in zip(params, d):
                    self._backup[p] = p.detach().clone()
                    p.add_(g * scale)
        self.perturbed_steps += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._backup is not None:
            with torch.no_grad():
                for p, w in self._backup.items():
                    p.copy_(w)
            self._backup = None
        engine = privacy_engine(pl_module)
        if engine is None and self.direction == "previous_private":
            self._previous = {p: p.grad.detach().clone() for ps in layer_groups(pl_module).values() for p in ps
                              if p.grad is not None}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        engine = privacy_engine(pl_module)
        if engine is not None and self.direction == "previous_private" and engine.released_gradient is not None:
            self._previous = dict(zip(engine.optimizer.params, engine.released_gradient))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule = (f"epochs < {self.until_epoch}" if self.until_epoch is not None
                    else f"first {self.until_fraction:g} of the planned steps")
        section = {"gamma": self.gamma, "direction": self.direction, "perturbed_steps": self.perturbed_steps,
                   "schedule": schedule}
        if self.direction == "fresh_private" and privacy_engine(pl_module) is not None:
            section["ascent_sampling"] = "independent Poisson draw"
        report_sections(pl_module)[type(self).__name__] = section

    # ------------------------------------------------------------------ directions
    def _direction(self, pl_module: pl.LightningModule, batch: Any, groups: Dict[str, List[torch.nn.Parameter]]):
        if self.direction == "previous_private":
            return self._previous
        params = [p for ps in groups.values() for p in ps]
        engine = privacy_engine(pl_module)
        if self.direction == "fresh_private" and engine is not None:
            ascent = pl_module.trainer.strategy.batch_to_device(next(self._ascent_batches))
            for chunk in physical_batches(ascent, physical_batch_size(pl_module, ascent)):
                engine.backward(pl_module.example_losses(chunk))
            return dict(zip(engine.optimizer.params, engine.release_gradient()))
        # raw (or any mode without DP): the plain gradient of the batch, without per-example hooks.
        grads = [None] * len(params)
        if num_examples(batch) > 0:
            hooks = engine.hooks if engine is not None else None
            if hooks is not None:
                hooks.disable_hooks()
            try:
                loss = pl_module.example_losses(batch).sum()
                grads = list(torch.autograd.grad(loss, params, allow_unused=True))
            finally:
                if hooks is not None:
                    hooks.enable_hooks()
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        trainer = pl_module.trainer
        if trainer.world_size > 1:  # the gradient of the global batch, the same direction on every rank
            flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="sum")
            grads = [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]
        return {p: g for p, g in zip(params, grads) if bool(g.any())} or None

    def _ascent_loader(self, train: PoissonDataLoader, engine: DPSGDEngine) -> PoissonDataLoader:
        """The ascent passes' Poisson draws: one per perturbed step, of the training dataset at the training
        loader's expected batch size, each rank keeping its share of one global draw as the training loader
        does; a resumed run skips the draws of the ``perturbed_steps`` already done.

        Under ``secure_mode`` the draws come from the OS's CSPRNG, as the training loader's do. Otherwise from
        a seeded generator of their own. ``PoissonBatchSampler`` seeds an epoch's generator with
        ``seed * 1_000_003 + epoch``: the training loader's are ``s * 1_000_003 + e`` and the DP teacher's
        (datamodule seed ``s + 1``) larger still, for every epoch ``e >= 0``; the noise generator's is
        ``PrivacyConfig.seed``. All ascent draws are one epoch of a sampler whose generator seed is one below
        the smallest of ``s * 1_000_003`` and ``PrivacyConfig.seed``, so it equals none of them (torch maps a
        negative seed ``g`` to ``2**64 - 1 + g``, above them all).
        """
        sampler = train.batch_sampler
        seed, epoch = divmod(min(sampler.seed * 1_000_003, engine.config.seed) - 1, 1_000_003)
        loader = PoissonDataLoader(train.dataset, expected_batch_size=train.expected_batch_size,
                                   collate_fn=train.collate_fn, seed=seed, num_batches=engine.planned_steps,
                                   num_replicas=sampler.num_replicas, rank=sampler.rank, secure=sampler.secure)
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.fast_forward(self.perturbed_steps)
        return loader

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"perturbed_steps": self.perturbed_steps,
                "previous": None if self._previous is None else list(self._previous.values())}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.perturbed_steps = state_dict["perturbed_steps"]
        self._pending_previous = state_dict["previous"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = self._pending_previous
        if pending is not None:
            engine = privacy_engine(pl_module)
            params = engine.optimizer.params if engine is not None else [
                p for ps in layer_groups(pl_module).values() for p in ps]
            self._previous = dict(zip(params, pending))
            self._pending_previous = None
        engine = privacy_engine(pl_module)
        if engine is not None and self.direction == "fresh_private":
            self._ascent_batches = iter(self._ascent_loader(trainer.train_dataloader, engine))
        rank_zero_info(f"AWP: gamma={self.gamma}, direction={self.direction}")
