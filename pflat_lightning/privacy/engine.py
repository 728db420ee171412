"""DP-SGD on a module's trainable parameters, through Opacus' per-example gradients and accountants.

The engine owns what makes one training step private: per-example gradients (Opacus hooks attached to
the module without wrapping it, so checkpoints keep their plain parameter names), clipping and noise
(an Opacus ``DPOptimizer``), virtual steps that split a logical Poisson batch into physical chunks, and,
through :class:`PrivacyAccounting` (which the black-box mechanism shares), the noise calibration for the
planned steps and the accountant's history. Under data parallelism each rank
clips its own examples, the clipped sums are all-reduced once per release and the noise is drawn once,
so every rank applies the same update and the accountant is the single-process one.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from opacus.accountants import create_accountant
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from pflat_lightning.privacy import secure_random
from pflat_lightning.privacy.clipping import GroupClipping, group_assignment, group_bounds, share_of
from pflat_lightning.privacy.config import PrivacyConfig

#: PyTorch's warning when a full backward hook fires on a module none of whose inputs requires a gradient.
FULL_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"

History = List[Tuple[float, float, int]]


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Epsilon that ``accountant`` gives for a history of ``(noise, sample_rate, steps)`` runs."""
    if not history:
        return 0.0
    if any(noise == 0 for noise, _, _ in history):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


class PrivacyAccounting:
    """The privacy spend of a run of Poisson-subsampled Gaussian releases: the one place for it.

    Calibrates the noise multiplier so that the planned releases end at ``target_epsilon``, keeps the
    accountant's history (``(noise, sample_rate, releases)`` runs) and the epsilon spent, the seeded noise
    generator (none under ``secure_mode``: the noise then comes from :mod:`~pflat_lightning.privacy.secure_random`),
    and the checkpoint state that lets a resumed run spend exactly as if it had never stopped.
    Every private mechanism of the library builds on it: :class:`DPSGDEngine` (per-example gradients
    through Opacus) and the black-box zeroth-order mechanism
    (:class:`~pflat_lightning.black_box.tuner.ZerothOrderMechanism`); a Lightning fit runs either through
    :class:`~pflat_lightning.privacy.training.PrivateTraining`.

    Args:
        config: the privacy parameters.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.noise_multiplier: Optional[float] = None
        self.sample_rate: Optional[float] = None
        self.expected_batch_size: Optional[int] = None
        self.dataset_size: Optional[int] = None
        self.delta: Optional[float] = None
        self.planned_steps: Optional[int] = None
        self.updates = 0
        self.history: History = []
        #: Releases composed before this run's updates (a DP teacher on the same data, a private estimate of the
        #: group clipping bounds), counted in every epsilon.
        self.prior_history: History = []
        #: ``planned_updates -> extra releases`` that callbacks add (e.g. a private ascent gradient).
        self.extra_releases: List[Callable[[int], int]] = []
        self._restored_compositions: Optional[int] = None  # what a checkpoint's noise was calibrated for
        self._generator: Optional[torch.Generator] = None
        self._epsilon_cache: Tuple[Optional[Tuple], float] = (None, 0.0)

    def plan(self, *, dataset_size: int, expected_batch_size: int, planned_steps: int) -> None:
        """Fix the sampling rate, delta and noise for ``planned_steps`` updates on ``dataset_size`` examples.

        After :meth:`load_state_dict` (resuming) the restored noise, history and generator are kept, and a
        changed dataset size or sampling rate is refused.
        """
        cfg = self.config
        if expected_batch_size > dataset_size:
            raise ValueError(
                f"The logical batch size {expected_batch_size} is larger than the training set ({dataset_size} examples)."
            )
        setting = {"dataset_size": dataset_size, "sample_rate": expected_batch_size / dataset_size}
        if self.noise_multiplier is not None:  # restored by load_state_dict: continue the same spend
            for key, now in setting.items():
                if not math.isclose(getattr(self, key), now):
                    raise ValueError(
                        f"Cannot resume: the checkpoint was trained with {key}={getattr(self, key)!r}, this run has "
                        f"{now!r}. Changing it mid-run would make the privacy accounting wrong."
                    )
            if self._restored_compositions is not None and self._restored_compositions != self.planned_compositions:
                raise ValueError(
                    f"Cannot resume: the checkpoint's noise was calibrated for {self._restored_compositions} Gaussian "
                    f"releases, this run plans {self.planned_compositions}: a callback that adds releases (AWP with "
                    "direction='fresh_private') was added, removed or changed. Resume with the callbacks of the "
                    "interrupted run."
                )
        else:
            self.dataset_size, self.sample_rate = dataset_size, setting["sample_rate"]
            self.delta = cfg.delta_for(dataset_size)
            self.planned_steps = planned_steps
            self.prior_history = self.prior_history + self._releases_before_training()
            self.history = list(self.prior_history)
            self.noise_multiplier = self._calibrate(planned_steps)
        self.expected_batch_size = expected_batch_size
        if self._generator is None and not cfg.secure_mode:
            self._generator = torch.Generator().manual_seed(cfg.seed)

    def _releases_before_training(self) -> History:
        """Releases this run makes on the training set before its first update, planned with it (none here)."""
        return []

    @property
    def planned_compositions(self) -> int:
        """Gaussian releases this run plans: one per update plus those the callbacks add."""
        return self.planned_steps + sum(extra(self.planned_steps) for extra in self.extra_releases)

    def _spend(self, noise: float) -> float:
        history = list(self.prior_history) + [(noise, self.sample_rate, self.planned_compositions)]
        return epsilon_of(history, self.delta, self.config.accountant)

    def _calibrate(self, steps: int) -> float:
        """The smallest noise (to 1e-3 relative) whose planned releases, after any prior ones, stay within target."""
        cfg = self.config
        if cfg.noise_multiplier is not None:
            if cfg.target_epsilon is not None and self._spend(cfg.noise_multiplier) > cfg.target_epsilon:
                raise ValueError(
                    f"noise_multiplier={cfg.noise_multiplier} and target_epsilon={cfg.target_epsilon} contradict: "
                    f"{self.planned_compositions} releases at sample rate {self.sample_rate:.4g} spend "
                    f"epsilon={self._spend(cfg.noise_multiplier):.3f}. Raise the noise, train fewer steps, or drop one of the two."
                )
            return cfg.noise_multiplier
        if self.prior_history and epsilon_of(self.prior_history, self.delta, cfg.accountant) >= cfg.target_epsilon:
            raise ValueError(
                f"Earlier releases (a DP teacher, a private group-bound estimate) already spend epsilon >= "
                f"target_epsilon={cfg.target_epsilon}: "
                "no budget is left for this run."
            )
        low, high = 0.0, 1.0
        while self._spend(high) > cfg.target_epsilon:
            low, high = high, 2 * high
            if high > 1e4:
                raise ValueError(f"target_epsilon={cfg.target_epsilon} is unreachable: the budget is too small.")
        while high - low > 1e-3 * high:
            mid = (low + high) / 2
            if self._spend(mid) > cfg.target_epsilon:
                low = mid
            else:
                high = mid
        return high

    def noise(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """Gaussian noise ``N(0, std^2)`` shaped like ``reference``: from the OS's CSPRNG under ``secure_mode``,
        from the seeded generator otherwise."""
        if self.config.secure_mode:
            return secure_random.gaussian(reference.shape, std, dtype=reference.dtype, device=reference.device)
        return _generate_noise(std, reference, self._generator)

    def _count_release(self) -> None:
        entry = (self.noise_multiplier, self.sample_rate)
        if self.history and tuple(self.history[-1][:2]) == entry:
            noise, rate, steps = self.history[-1]
            self.history[-1] = (noise, rate, steps + 1)
        else:
            self.history.append((*entry, 1))

    # ------------------------------------------------------------------ accounting
    @property
    def compositions(self) -> int:
        """Gaussian releases of this run (updates and extra releases), excluding prior ones."""
        return sum(h[2] for h in self.history) - sum(h[2] for h in self.prior_history)

    @property
    def budget_exhausted(self) -> bool:
        return self.planned_steps is not None and self.updates >= self.planned_steps

    def epsilon(self) -> float:
        """Epsilon spent so far at the run's delta (cached per history)."""
        key = tuple(tuple(h) for h in self.history)
        if self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, epsilon_of(self.history, self.delta, self.config.accountant))
        return self._epsilon_cache[1]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "prior_history": [list(h) for h in self.prior_history],
            "updates": self.updates,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "planned_compositions": self.planned_compositions,
            "delta": self.delta,
            "dataset_size": self.dataset_size,
            "accountant": self.config.accountant,
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["accountant"] != self.config.accountant:
            raise ValueError(
                f"Cannot resume: the checkpoint was accounted with accountant={state['accountant']!r}, this run uses "
                f"{self.config.accountant!r}."
            )
        self.history = [tuple(h) for h in state["history"]]
        self.prior_history = [tuple(h) for h in state["prior_history"]]
        self.updates = state["updates"]
        self.noise_multiplier = state["noise_multiplier"]
        self.sample_rate = state["sample_rate"]
        self.planned_steps = state["planned_steps"]
        self._restored_compositions = state.get("planned_compositions")  # absent from older checkpoints
        self.delta = state["delta"]
        self.dataset_size = state["dataset_size"]
        if state["generator"] is not None and not self.config.secure_mode:  # secure mode keeps no generator
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"])


class _AcrossRanks:
    """Data parallelism for an Opacus DP optimizer (mixed in before it).

    Each rank clips its own examples; in one all-reduce of a flat buffer the ranks sum their clipped
    gradients, and rank 0 alone adds the Gaussian noise before it (so the sum carries exactly one draw of
    ``noise_multiplier * max_grad_norm``); the result is then scaled by the *global* expected batch size.
    Every rank ends with the same noised gradient, so the step hook sees the released gradient on all
    ranks. One extra element of the buffer carries "this rank's batch had a non-finite loss": then every
    rank raises instead of updating, and none is left waiting in a collective.
    """

    #: Set by the engine when this rank's batch had a non-finite loss (the message to raise).
    poisoned: Optional[str] = None

    def add_noise(self) -> None:
        if dist.get_rank() == 0:
            super().add_noise()
        else:
            for p in self.params:
                p.grad = p.summed_grad.view_as(p).clone()
        grads = [p.grad for p in self.params]
        flag = grads[0].new_tensor([0.0 if self.poisoned is None else 1.0])
        flat = torch.cat([g.reshape(-1) for g in grads] + [flag])
        dist.all_reduce(flat)
        if flat[-1] > 0:
            message, self.poisoned = self.poisoned, None
            raise FloatingPointError(
                message or "Non-finite training loss on another data-parallel rank; the poisoned update was not "
                "applied on any rank. Resume from the last checkpoint with a lower learning rate."
            )
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class _SecureNoise:
    """``secure_mode``: Opacus' ``add_noise`` (``grad = summed_grad + N(0, (noise_multiplier * C)^2)``, the
    summed gradient marked as used) with the noise from the OS's CSPRNG instead of a torch generator. Mixed
    in after :class:`_AcrossRanks`, so under data parallelism rank 0 alone draws it."""

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_random.gaussian(p.summed_grad.shape, self.noise_multiplier * self.max_grad_norm,
                                           dtype=p.summed_grad.dtype, device=p.summed_grad.device)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class _FullPrecision:
    """Clipping, noise and the update run outside autocast: under ``bf16-mixed`` the optimizer is
    stepped inside the training step's autocast context, where Opacus' clipping contractions would
    otherwise run in 16 bits."""

    def pre_step(self, closure=None):
        device = self.params[0].device.type if self.params else "cpu"
        with torch.autocast(device, enabled=False):
            return super().pre_step(closure)


class _EmptyBatches:
    """The release of an empty Poisson batch (nothing back-propagated since the last clip): Opacus' step
    clips before it adds the noise, so it gets one zero per-example gradient (a zero clipped gradient in ghost
    mode), which adds nothing to the sum; the step then adds the noise and the accountant counts it."""

    def pre_step(self, closure=None):
        if all(p.grad is None for p in self.params):
            ghost = isinstance(self, DPOptimizerFastGradientClipping)
            for p in self.params:
                if ghost:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = p.new_zeros((1, *p.shape))  # Opacus cannot reshape a 0-row tensor
        return super().pre_step(closure)


def _optimizer_class(base: type, distributed: bool, group: bool = False, secure: bool = False) -> type:
    mixins = ((_FullPrecision, _EmptyBatches) + ((_AcrossRanks,) if distributed else ())
              + ((GroupClipping,) if group else ()) + ((_SecureNoise,) if secure else ()))
    return type(("AcrossRanks" if distributed else "") + base.__name__, (*mixins, base), {})


class DPSGDEngine(PrivacyAccounting):
    """Makes a module's training private and keeps the privacy spend.

    Use :meth:`attach` once the dataset size and the planned number of steps are known. Then, for each
    logical (Poisson) batch: :meth:`backward` with the per-example losses of each physical chunk (none for an
    empty batch), each example's gradient clipped and added to the batch's sum; then the DP optimizer's
    ``step()``, which adds the noise once, updates and counts the release (or :meth:`release_gradient`, a
    release without an update). The engine never computes a loss: the module hands it the losses.

    Args:
        config: the privacy parameters.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        super().__init__(config)
        self.hooks: Any = None
        self.optimizer: Optional[DPOptimizer] = None
        #: When true, the noised gradient of each update is kept in ``released_gradient`` (post-processing).
        self.keep_released_gradient = False
        self.released_gradient: Optional[List[torch.Tensor]] = None
        self._releasing = False
        #: The grad-sample mode in use (``config.grad_sample_mode``, or what ``"auto"`` resolved to).
        self.grad_sample_mode: Optional[str] = None
        #: ``clipping="group"``: the bound of each group (prefix, head), kept in checkpoints.
        self.group_bounds: Optional[List[float]] = None
        self._groups = 0  # clipping groups of the attached optimizer

    # ------------------------------------------------------------------ setup
    def attach(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        dataset_size: int,
        expected_batch_size: int,
        planned_steps: int,
        distributed: bool = False,
        grad_sample_mode: Optional[str] = None,
        prefix_parameters: Sequence[nn.Parameter] = (),
    ) -> DPOptimizer:
        """Hook ``module`` for per-example gradients and wrap ``optimizer`` into a DP optimizer.

        After :meth:`load_state_dict` (resuming an interrupted run) the restored noise, history and noise
        generator are kept instead of calibrating anew, so a resumed run spends exactly as if it had never
        stopped. With ``distributed=True`` (an initialised process group), ``dataset_size`` and
        ``expected_batch_size`` are the global ones and every rank calls the optimizer's ``step()`` (and
        :meth:`release_gradient`) once per logical batch, whatever its share of the batch.
        ``grad_sample_mode`` is the mode to use when the config says ``"auto"`` (the module decides).
        ``prefix_parameters`` are the prefix's tensors, which ``clipping="group"`` clips apart from the rest;
        without ``prefix_clip_share`` the group bounds come from :meth:`set_group_bounds` before the first step.
        """
        cfg = self.config
        group = cfg.clipping == "group"
        # Groups cover every tensor of the optimizer, pruned (frozen) prefix layers too: a run resumed after a
        # pruning keeps the uninterrupted run's groups, bounds and noise scale.
        everything = [p for param_group in optimizer.param_groups for p in param_group["params"]]
        group_of = group_assignment(everything, prefix_parameters) if group else {}
        self._groups = len(set(group_of.values()))
        self.plan(dataset_size=dataset_size, expected_batch_size=expected_batch_size, planned_steps=planned_steps)
        self.grad_sample_mode = cfg.grad_sample_mode if cfg.grad_sample_mode != "auto" else grad_sample_mode
        if self.grad_sample_mode not in ("hooks", "functorch", "ghost"):
            raise ValueError(f"grad_sample_mode='auto' needs the mode chosen by the module, got {grad_sample_mode!r}.")

        self.hooks = prepare_module(
            module, self.grad_sample_mode, wrap_model=False, batch_first=True, loss_reduction="sum", strict=True
        )
        optimizer_class = _optimizer_class(
            get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=self.grad_sample_mode),
            distributed, group, cfg.secure_mode,
        )
        if self.grad_sample_mode == "ghost":
            self.hooks.max_grad_norm = cfg.max_grad_norm
        self.optimizer = optimizer_class(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=self._generator,
            secure_mode=cfg.secure_mode,
        )
        if group:
            self.optimizer.group_of = group_of
            self.optimizer.draw = self.noise
            if self.group_bounds is None and (cfg.prefix_clip_share is not None or self._groups == 1):
                self.group_bounds = group_bounds(cfg.max_grad_norm, cfg.prefix_clip_share, self._groups)
            self.optimizer.bounds = self.group_bounds or group_bounds(cfg.max_grad_norm, 0.5, self._groups)
        self.optimizer.attach_step_hook(self._on_step)
        return self.optimizer

    @property
    def needs_group_bounds(self) -> bool:
        """Group-wise clipping whose bounds must still be measured (:meth:`measure_group_norms`)."""
        return self.config.clipping == "group" and self.group_bounds is None

    @property
    def estimates_group_bounds_privately(self) -> bool:
        """The group bounds come from the training set through the private histogram estimate."""
        cfg = self.config
        return (cfg.clipping == "group" and cfg.prefix_clip_share is None and cfg.group_bound_data == "private"
                and self._groups > 1)

    def _releases_before_training(self) -> History:
        """The private group-bound estimate: ``group_bound_batches`` Poisson batches at the training rate, each
        a histogram with one count per example and group (L2 sensitivity ``sqrt(K)``) plus Gaussian noise of std
        ``group_bound_noise``: a subsampled Gaussian mechanism of multiplier ``group_bound_noise / sqrt(K)``."""
        if not self.estimates_group_bounds_privately:
            return []
        cfg = self.config
        return [(cfg.group_bound_noise / math.sqrt(self._groups), self.sample_rate, cfg.group_bound_batches)]

    def measure_group_norms(self, loss_per_example: torch.Tensor) -> torch.Tensor:
        """Per-example gradient norm of each group (prefix, head) for the given losses, shape ``(examples, K)``,
        without clipping, noise or update: for choosing the bounds before training."""
        self.backward(loss_per_example)
        norms = self.optimizer.group_norms()
        self.optimizer.zero_grad(set_to_none=True)
        return norms.detach()

    def release_norm_histogram(self, counts: torch.Tensor) -> torch.Tensor:
        """One release of the private group-bound estimate: a Poisson batch's histogram ``counts`` (of
        :func:`~pflat_lightning.privacy.clipping.norm_histogram`) plus Gaussian noise of std ``group_bound_noise``
        on every count. The accountant planned it (:meth:`_releases_before_training`). Under data parallelism
        each rank counts its share of the batch, rank 0 alone adds the noise and the ranks sum: one draw."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed or dist.get_rank() == 0:
            counts = counts + self.noise(self.config.group_bound_noise, counts)
        if distributed:
            dist.all_reduce(counts)
        return counts

    def set_group_bounds(self, typical: torch.Tensor) -> List[float]:
        """Put each group's bound at the same multiple of its ``typical`` per-example norm (a median, one value
        per group), the bounds' squares summing to ``max_grad_norm**2``."""
        groups = len(self.optimizer.bounds)
        share = share_of(typical) if groups > 1 else 1.0
        self.group_bounds = self.optimizer.bounds = group_bounds(self.config.max_grad_norm, share, groups)
        return self.group_bounds

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "group_bounds": self.group_bounds}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.group_bounds = state.get("group_bounds")

    def detach(self) -> None:
        """Remove the per-example gradient hooks."""
        if self.hooks is not None:
            self.hooks.remove_hooks()
            self.hooks = None

    # ------------------------------------------------------------------ per step
    def backward(self, loss_per_example: torch.Tensor) -> None:
        """Back-propagate one physical chunk's per-example losses, for per-example gradients (``grad_sample``;
        in ghost mode their clipped sum). The chunk before it in the same logical batch is first clipped and
        added to the batch's sum (Opacus' virtual step: no noise, no update), so memory never depends on the
        logical batch. The batch ends with the DP optimizer's ``step()`` or :meth:`release_gradient`, which
        clip the last chunk.

        Outside autocast: Opacus computes per-example gradients in Python hooks during backward, which a
        surrounding ``bf16-mixed`` context would otherwise run in 16 bits."""
        if any(p.grad is not None for p in self.optimizer.params):  # the previous chunk, not yet clipped
            self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(loss_per_example.device.type, enabled=False), warnings.catch_warnings():
            # Opacus' full backward hooks see no input that requires a gradient: the frozen backbone feeds the
            # trainable layers constants by design. Their gradients with respect to outputs are all it needs.
            warnings.filterwarnings("ignore", message=FULL_HOOK_WARNING, category=UserWarning)
            if self.grad_sample_mode == "ghost":
                # Opacus fixes the tensors whose per-example norms it combines when it hooks the module; a
                # prefix layer pruned since (frozen, no longer in the optimizer's params) would keep adding its
                # stale norms. Clip exactly the tensors the optimizer trains now.
                self.hooks.trainable_parameters = self.optimizer.params
                DPTensorFastGradientClipping(self.hooks, self.optimizer, loss_per_example, "sum").backward()
            else:
                loss_per_example.sum().backward()

    def abort_update(self, message: str) -> None:
        """Refuse the current logical batch's update (a non-finite loss): raise ``FloatingPointError(message)``
        now, or under data parallelism at the release, on every rank, so that none is left waiting in the
        all-reduce. The caller stops back-propagating the batch and still calls the optimizer's ``step()``."""
        if not isinstance(self.optimizer, _AcrossRanks):
            raise FloatingPointError(message)
        self.optimizer.poisoned = message

    def release_gradient(self) -> List[torch.Tensor]:
        """Clip and noise the per-example gradients back-propagated so far, without an update.

        One more Gaussian release on the current batch, which the accountant counts. Returns the noised
        mean gradient of each trainable parameter and clears the gradients.
        """
        extra_done = self.compositions - self.updates
        if extra_done >= self.planned_compositions - self.planned_steps:
            raise RuntimeError(
                f"An extra release on top of the {extra_done} planned was requested: the noise was calibrated for "
                f"{self.planned_compositions} releases ({self.planned_steps} updates), so it would spend past the "
                "target epsilon. A callback released more often than it declared in engine.extra_releases."
            )
        self._releasing = True
        try:
            self.optimizer.pre_step()
        finally:
            self._releasing = False
        gradient = [p.grad.detach().clone() for p in self.optimizer.params]
        self.optimizer.zero_grad(set_to_none=True)
        return gradient

    def _on_step(self, optimizer: DPOptimizer) -> None:
        self._count_release()
        if self._releasing:
            return
        self.updates += 1
        if self.keep_released_gradient:
            self.released_gradient = [p.grad.detach().clone() for p in optimizer.params]
