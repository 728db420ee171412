"""LiRA offline (Carlini et al. 2022): shadow prefixes trained on random halves of the audit pool.

Each shadow is an untrained clone of the audited module (its ``clone_untrained``: same class and
configuration, the frozen backbone shared, freshly initialised trainable parameters, the same
``PrivacyConfig`` unless overridden) trained by a nested
``pl.Trainer`` on a seeded half of the pool (members and non-members together). An example is then
scored against the shadows that did NOT train on it (OUT): the offline, one-sided variant of the test.
Training shadows reads private training data; the audit records that in the ledger as ``"evaluation"``.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.sampling import PoissonDataLoader
from pflat_lightning.protocol import Cloneable, TokenScores, check_contract, untrained_clone

#: The scaled confidences that LiRA fits Gaussians to: the logit of the true-class probability
#: (classifiers) or the negative loss (language models, whose loss is a mean over tokens).
CONFIDENCES = ("logit", "negative_loss")


def scaled_confidence(losses: torch.Tensor, kind: str) -> torch.Tensor:
    """LiRA's scaled confidence of each example (Carlini et al. 2022).

    Args:
        losses: per-example task losses.
        kind: ``"logit"``: the loss is the cross-entropy of the true class, ``p = exp(-loss)``, and the
            confidence is ``log(p / (1 - p))``; ``"negative_loss"``: ``-loss`` (language models).
    """
    if kind not in CONFIDENCES:
        raise ValueError(f"kind must be one of {CONFIDENCES}, got {kind!r}.")
    losses = losses.double()
    if kind == "negative_loss":
        return -losses
    # log p - log(1 - p) with p = exp(-l), stable for small and large l; l = 0 would be p = 1 exactly.
    losses = losses.clamp_min(torch.finfo(torch.float64).tiny)
    return -losses - torch.log(-torch.expm1(-losses))


def default_confidence(pl_module: pl.LightningModule) -> str:
    """``"negative_loss"`` for modules that score tokens (causal LMs), ``"logit"`` for classifiers."""
    return "negative_loss" if isinstance(pl_module, TokenScores) else "logit"


def lira_offline_scores(
    target: torch.Tensor, shadows: torch.Tensor, keep: torch.Tensor, *, min_out_for_variance: int = 8
) -> tuple:
    """Offline LiRA: each example's one-sided z-score against the shadows that did NOT train on it.

    For example ``i``, the OUT confidences ``shadows[k, i]`` (``keep[k, i]`` false) are fitted with a
    Gaussian ``N(mu_i, sigma_i^2)``; the score is ``(target[i] - mu_i) / sigma_i``, monotone in the
    one-sided likelihood ratio ``Pr[Z < target[i]]`` of the paper's offline test (a member's confidence
    is higher than the OUT models'). With fewer than ``min_out_for_variance`` OUT shadows, ``sigma_i``
    is the fixed (global) standard deviation of all OUT confidences, the paper's advice for few shadows.

    Args:
        target: the audited model's confidence per example, shape ``[P]``.
        shadows: the shadows' confidences, shape ``[K, P]``.
        keep: whether shadow ``k`` trained on example ``i``, shape ``[K, P]``.
        min_out_for_variance: OUT shadows needed to use an example's own variance.

    Returns:
        (scores ``[P]``, number of examples that used the fixed variance).
    """
    out = ~keep.bool()
    counts = out.sum(0)
    if bool((counts == 0).any()):
        raise ValueError("Every example needs at least one shadow that did not train on it (an OUT shadow).")
    shadows = shadows.double()
    mean = (shadows * out).sum(0) / counts
    fixed = shadows[out].std(unbiased=False) if out.sum() > 1 else torch.tensor(0.0, dtype=torch.float64)
    own = torch.sqrt(((shadows - mean) ** 2 * out).sum(0) / (counts - 1).clamp_min(1))
    use_fixed = counts < min_out_for_variance
    std = torch.where(use_fixed, fixed, own).clamp_min(1e-12)
    return (target.double() - mean) / std, int(use_fixed.sum())


def keep_matrix(num_shadows: int, pool_size: int, seed: int) -> torch.Tensor:
    """Which pool examples each shadow trains on, ``[num_shadows, pool_size]`` booleans.

    As in the paper's code, every example is IN for exactly ``num_shadows // 2`` shadows (a seeded
    random choice per example) and OUT for the others, so each shadow trains on about half the pool.
    """
    if num_shadows < 2:
        raise ValueError(f"LiRA needs shadow_models >= 2 (every example IN for half of them), got {num_shadows}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(num_shadows, pool_size, generator=generator).argsort(0).argsort(0)
    return order < num_shadows // 2


def train_shadows(
    pl_module: pl.LightningModule,
    pool: Dataset,
    keep: torch.Tensor,
    score: Callable[[pl.LightningModule], torch.Tensor],
    *,
    collate_fn: Optional[Callable] = None,
    epochs: int,
    batch_size: int,
    privacy: Optional[PrivacyConfig] = None,
    seed: int = 0,
    accelerator: Any = "cpu",
    devices: Any = 1,
) -> Tuple[torch.Tensor, List[float]]:
    """Train one shadow per row of ``keep`` and score the pool with each.

    Args:
        pl_module: the audited module, whose untrained clones (``clone_untrained``) the shadows are.
        pool: the audit pool (members then non-members).
        keep: ``[K, len(pool)]``, which examples shadow ``k`` trains on (see :func:`keep_matrix`).
        score: a shadow -> its scaled confidence on every pool example, in pool order.
        collate_fn: collates pool examples into a batch.
        epochs: training epochs of each shadow.
        batch_size: (expected, under Poisson sampling) batch size, capped at the shadow's training set.
        privacy: the shadows' privacy; ``None``: the audited module's own ``privacy`` (when it has one).
            Shadow ``k`` draws its noise with the config's ``seed`` plus ``seed + k``, seeded even when the config
            says ``secure_mode`` (the shadows are never released).
        seed: shadow ``k`` is initialised and sampled with ``seed + k``; the caller's RNG state is untouched.
        accelerator: the nested trainer's accelerator.
        devices: the nested trainer's devices.

    Returns:
        (confidences ``[K, len(pool)]``, wall seconds per shadow for training plus scoring).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"shadow epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    check_contract(pl_module, Cloneable, who="LiRA's train_shadows")
    base = privacy if privacy is not None else getattr(pl_module, "privacy", None)
    confidences, seconds = [], []
    for k, row in enumerate(keep):
        start = time.perf_counter()
        # The shadows are the attacker's own simulation, not released: seeded (a reproducible audit) even when
        # the audited model was trained with secure_mode.
        config = None if base is None else dataclasses.replace(base, seed=base.seed + seed + k, secure_mode=False)
        overrides: Dict[str, Any] = {} if config is None else {"privacy": config}
        with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as scratch:
            torch.manual_seed(seed + k)
            shadow = untrained_clone(pl_module, **overrides)
            subset = Subset(pool, torch.nonzero(row).flatten().tolist())
            size = min(batch_size, len(subset))
            if config is not None and config.enabled and config.poisson_sampling:
                loader = PoissonDataLoader(subset, expected_batch_size=size, collate_fn=collate_fn, seed=seed + k)
            else:
                loader = DataLoader(subset, batch_size=size, shuffle=True, collate_fn=collate_fn,
                                    generator=torch.Generator().manual_seed(seed + k))
            trainer = pl.Trainer(default_root_dir=scratch, max_epochs=epochs, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 limit_val_batches=0, accelerator=accelerator, devices=devices)
            trainer.fit(shadow, train_dataloaders=loader)
            # The trainer's teardown moved the shadow to the CPU, and with it the backbone it shares with pl_module.
            confidences.append(score(shadow.to(pl_module.device)))
        del shadow, trainer
        seconds.append(time.perf_counter() - start)
    return torch.stack(confidences), seconds
