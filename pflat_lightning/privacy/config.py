"""The privacy parameters of a run, in one typed object."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "auto")
CLIPPINGS = ("flat", "group")
GROUP_BOUND_DATA = ("public", "private")


@dataclass
class PrivacyConfig:
    """What DP-SGD guarantee a run must give and how it clips.

    Args:
        enabled: train with DP-SGD; ``False`` trains the identical model without privacy (baselines,
            teachers) and the report says that no guarantee holds.
        target_epsilon: the epsilon the planned steps must end at. The noise is calibrated so that
            ``max_epochs`` (or ``max_steps``) of Poisson-sampled steps spend exactly this.
        target_delta: delta of the guarantee. ``None`` means ``N ** -1.1`` for a training set of ``N``
            examples (the Privacy-Flat paper's choice); any value must be below ``1 / N``.
        max_grad_norm: per-example clipping bound ``C`` on the L2 norm of the trainable gradient.
        clipping: ``"flat"`` clips each example's whole gradient to ``C``. ``"group"`` clips the prefix's part
            of an example's gradient to ``C_prefix`` and the rest (the head) to ``C_head``, with
            ``C_prefix**2 + C_head**2 = C**2``, and noises each group at ``noise_multiplier * sqrt(2) * C_g``:
            the release is exactly as private as flat clipping at the same noise multiplier (the accountant's
            epsilon is unchanged), but each group's noise follows its own bound. Under flat clipping a
            trainable head takes almost all of ``C`` (for the bundled MiniLM on movie_reviews the prefix carries
            0.01 % of an example's squared gradient norm) and the prefix's updates are noise. Without a head
            both are flat clipping.
        prefix_clip_share: under ``clipping="group"``, the prefix's share ``C_prefix**2 / C**2``, in (0, 1).
            ``None`` (default) sets it before training so that each group's bound sits at the median of its
            per-example gradient norms, measured on the data ``group_bound_data`` names.
        group_bound_data: where ``prefix_clip_share=None`` measures the groups' median norms. ``"public"``
            (default): up to 256 examples of the datamodule's public split, at no privacy cost. ``"private"``:
            the training set, for data without a public split, through a DP quantile estimate spent inside the
            accountant: ``group_bound_batches`` Poisson batches at the training sample rate, each released as
            a histogram of every group's per-example norms in octave bins (one count per example and group,
            so L2 sensitivity ``sqrt(K)`` for ``K`` groups) with Gaussian noise of std ``group_bound_noise`` on
            every count; each group's median is read from the summed noisy histograms (to half an octave; the
            estimate needs enough examples: with the defaults, an expected batch of 128 leaves a 5-sigma margin).
            The accountant composes these releases (noise multiplier ``group_bound_noise / sqrt(K)``) with the
            training's, and the training noise is calibrated so that all of them together end at
            ``target_epsilon``.
        group_bound_noise: std of the Gaussian noise on each histogram count of ``group_bound_data="private"``,
            in examples (> 0).
        group_bound_batches: Poisson batches of ``group_bound_data="private"`` (>= 1).
        noise_multiplier: explicit noise ``sigma`` (noise std is ``sigma * C``). With ``target_epsilon``
            also set, training stops at the last step that stays within it, and a noise that cannot
            reach the planned steps within the target is refused.
        accountant: ``"prv"`` (tight numerical composition, default) or ``"rdp"`` (Renyi DP).
        poisson_sampling: sample each logical batch by including every example independently, the
            scheme the accountants analyse. ``False`` shuffles into fixed batches, for which the
            reported epsilon is not a formal bound (recorded in the ledger).
        grad_sample_mode: how per-example gradients are clipped: ``"hooks"`` (Opacus hooks),
            ``"functorch"`` or ``"ghost"`` (ghost clipping: per-example norms without
            materialising per-example gradients, at the price of a second backward pass) or ``"auto"``
            (ghost when hooks would hold more than 256 MiB of per-example gradients per physical batch and
            at least 4x ghost's estimate, e.g. a large reparametrised prefix; hooks otherwise; the choice
            is logged and in the report).
        secure_mode: draw the noise and the Poisson batches from the operating system's CSPRNG
            (``os.urandom``, :mod:`~pflat_lightning.privacy.secure_random`; slower): no seed and no generator
            state exist, none is checkpointed, and a resumed epoch continues with fresh batches (same privacy
            spend, not bit-exact). It needs ``poisson_sampling=True`` and a secure training loader (the pflat
            datamodules follow this flag; a datamodule of your own returns ``PoissonDataLoader(..., secure=True)``),
            and runs in one process. It does not address floating-point attacks on the Gaussian beyond
            float64 sampling. Without it the noise and the batches come from seeded pseudo-random generators
            whose seeds and states are in the run's config and checkpoints: whoever has them can regenerate
            every draw, so the report says that no formal guarantee holds (for experiments, as in Opacus).
        seed: seed of the noise generator (when not in secure mode). The Poisson draws are seeded by
            the training loader (``seed`` of the pflat datamodules, which also seeds their splits).
    """

    enabled: bool = True
    target_epsilon: Optional[float] = 8.0
    target_delta: Optional[float] = None
    max_grad_norm: float = 1.0
    clipping: Literal["flat", "group"] = "flat"
    prefix_clip_share: Optional[float] = None
    group_bound_data: Literal["public", "private"] = "public"
    group_bound_noise: float = 4.0
    group_bound_batches: int = 4
    noise_multiplier: Optional[float] = None
    accountant: Literal["prv", "rdp"] = "prv"
    poisson_sampling: bool = True
    grad_sample_mode: Literal["hooks", "functorch", "ghost", "auto"] = "hooks"
    secure_mode: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0 (or None with an explicit noise_multiplier), got {self.target_epsilon}.")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1 / dataset size), got {self.target_delta}.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}.")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0 or None, got {self.noise_multiplier}.")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("Set target_epsilon or noise_multiplier (both are None): DP needs a noise level.")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}.")
        if self.clipping not in CLIPPINGS:
            replaced = " ('split' became 'group', which also noises each group at its own bound)" if self.clipping == "split" else ""
            raise ValueError(f"clipping must be one of {CLIPPINGS}, got {self.clipping!r}{replaced}.")
        if self.prefix_clip_share is not None and not 0 < self.prefix_clip_share < 1:
            raise ValueError(f"prefix_clip_share must be in (0, 1) or None (measured on public data), got "
                             f"{self.prefix_clip_share}.")
        if self.group_bound_data not in GROUP_BOUND_DATA:
            raise ValueError(f"group_bound_data must be one of {GROUP_BOUND_DATA}, got {self.group_bound_data!r}.")
        if not self.group_bound_noise > 0:
            raise ValueError(f"group_bound_noise must be > 0 (the std of each histogram count's noise), got "
                             f"{self.group_bound_noise}.")
        if not (isinstance(self.group_bound_batches, int) and self.group_bound_batches >= 1):
            raise ValueError(f"group_bound_batches must be an integer >= 1, got {self.group_bound_batches!r}.")
        if self.group_bound_data == "private" and self.prefix_clip_share is not None:
            raise ValueError(f"group_bound_data='private' estimates the group bounds, prefix_clip_share="
                             f"{self.prefix_clip_share} fixes them: set one of the two.")
        if self.secure_mode and not self.poisson_sampling:
            raise ValueError("secure_mode=True needs poisson_sampling=True: the shuffled batches of "
                             "poisson_sampling=False come from a seeded generator.")
        if self.clipping == "group" and self.grad_sample_mode == "ghost":
            raise ValueError("clipping='group' needs per-example gradients per tensor: use grad_sample_mode 'hooks', "
                             "'functorch' or 'auto', not 'ghost'.")

    def delta_for(self, dataset_size: int) -> float:
        """The delta used for ``dataset_size`` training examples; refuses ``delta >= 1 / N``."""
        if self.target_delta is None:
            return float(dataset_size) ** -1.1
        if self.target_delta >= 1.0 / dataset_size:
            raise ValueError(
                f"target_delta={self.target_delta} must be < 1/N = {1.0 / dataset_size:.3g} for N={dataset_size} "
                "training examples: a larger delta allows leaking whole examples."
            )
        return self.target_delta


# Checkpoints store the config among the hyperparameters; allow it in ``torch.load(weights_only=True)``.
torch.serialization.add_safe_globals([PrivacyConfig])
