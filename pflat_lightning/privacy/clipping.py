"""Group-wise clipping: the prefix and the head each clipped to their own bound, each noised at its own scale.

Flat clipping spends one bound ``C`` on an example's whole gradient. Next to a trainable head the prefix's
gradient is a tiny part of that norm (0.01 % of the squared norm for the bundled MiniLM), yet every
coordinate receives noise of scale ``sigma * C``: the prefix's updates are noise. Group-wise clipping clips
each group ``g`` (prefix, head) of an example's gradient to its own bound ``C_g`` and adds noise of scale
``sigma * sqrt(K) * C_g`` to that group, ``K`` groups in all.

Privacy: adding or removing one example moves group ``g``'s clipped sum by at most ``C_g``. Dividing group
``g`` by ``sigma * sqrt(K) * C_g`` turns the release into a Gaussian mechanism with unit noise and
sensitivity ``sqrt(sum_g 1 / (K * sigma**2)) = 1 / sigma``: exactly the subsampled Gaussian mechanism of
noise multiplier ``sigma`` that the accountant composes. Each group's noise is now proportional to its own
bound, so a bound near the group's typical gradient norm gives each group the same signal-to-noise ratio.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

#: The groups of group-wise clipping, in order: the prefix's tensors and every other trainable tensor.
GROUPS = ("prefix", "head")


def group_bounds(max_grad_norm: float, prefix_share: float, groups: int) -> List[float]:
    """``[C_prefix, C_head]`` with ``C_prefix**2 = share * C**2`` and ``C_head**2 = (1 - share) * C**2``; a
    single group (no head) takes all of ``C``."""
    if groups == 1:
        return [max_grad_norm]
    return [max_grad_norm * math.sqrt(prefix_share), max_grad_norm * math.sqrt(1.0 - prefix_share)]


def share_of(typical: torch.Tensor) -> float:
    """The prefix's share of ``C**2`` that puts each group's bound at the same multiple of its ``typical``
    per-example gradient norm (prefix, head): ``t_p**2 / (t_p**2 + t_h**2)``."""
    typical = torch.as_tensor(typical, dtype=torch.float64)
    if not (typical > 0).all():
        raise ValueError(f"A group's typical gradient norm is zero ({typical.tolist()}): its share cannot follow it.")
    squares = typical**2
    return float(squares[0] / squares.sum())


#: Octave bins of the private norm histogram, relative to ``C``: bin ``j`` in 1..HISTOGRAM_OCTAVES holds norms in
#: ``[C * 2**(TOP - j), C * 2**(TOP + 1 - j))``; bin 0 everything from ``C * 2**TOP`` up, the last bin everything
#: below ``C * 2**(TOP - HISTOGRAM_OCTAVES)``.
HISTOGRAM_TOP, HISTOGRAM_OCTAVES = 8, 32


def norm_histogram(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Counts of each group's per-example norms (``norms`` of shape ``(examples, K)``) in the octave bins,
    shape ``(K, HISTOGRAM_OCTAVES + 2)``. Each example adds exactly one count to each group's row: adding or
    removing an example moves the histogram by ``sqrt(K)`` in L2 norm."""
    octaves = torch.log2(max_grad_norm / norms.double().clamp(min=1e-300))
    bins = (torch.ceil(octaves) + HISTOGRAM_TOP).clamp(0, HISTOGRAM_OCTAVES + 1).long()
    counts = torch.zeros((norms.shape[1], HISTOGRAM_OCTAVES + 2), dtype=torch.float32)
    for group in range(norms.shape[1]):
        counts[group] = torch.bincount(bins[:, group], minlength=HISTOGRAM_OCTAVES + 2).float()
    return counts


def histogram_median(counts: torch.Tensor, max_grad_norm: float, examples: float) -> torch.Tensor:
    """Each group's median norm read from noisy histogram counts of :func:`norm_histogram` over an expected
    ``examples`` examples (public: the expected batch size times the batches): the geometric middle of the bin
    where the counts, summed from the largest norms down, pass ``examples / 2`` (the edge for the two open bins).
    Summing from the top crosses few empty bins (norms rarely exceed ``C`` by much), so little noise; the expected
    rather than the noisy total keeps the noise of every other bin out of the threshold. Refuses a group whose
    noisy counts never pass half: the noise has swamped its histogram."""
    from_largest = counts.cumsum(dim=1)
    passes = from_largest >= examples / 2
    if not passes.any(dim=1).all():
        raise ValueError(
            f"The private group-bound histograms never reach half of the {examples:g} examples expected (noisy totals "
            f"{from_largest[:, -1].tolist()}): the noise has swamped them. Raise PrivacyConfig.group_bound_batches or "
            "the batch size, lower group_bound_noise, or set prefix_clip_share."
        )
    bins = passes.float().argmax(dim=1).double()  # the first bin at or past half
    middle = (HISTOGRAM_TOP + 0.5 - bins).clamp(HISTOGRAM_TOP - HISTOGRAM_OCTAVES, HISTOGRAM_TOP)
    return max_grad_norm * torch.pow(2.0, middle)


class GroupClipping:
    """Mixed in before an Opacus ``DPOptimizer`` (flat clipping): clips each example's gradient group by group
    and noises each group at its own scale (see the module docstring).

    The engine sets ``group_of`` (tensor id -> group index, for every tensor of the optimizer, frozen pruned
    prefix layers too, so a resumed run keeps the same groups), ``bounds`` (``C_g`` per group) and ``draw``
    (the engine's Gaussian source: seeded generator or the OS's CSPRNG)."""

    group_of: Dict[int, int]
    bounds: List[float]
    draw: Callable[[float, torch.Tensor], torch.Tensor]

    @property
    def noise_scale(self) -> float:
        """``sqrt(K)``: the factor on each group's noise that keeps the whole release at multiplier ``sigma``."""
        return math.sqrt(len(self.bounds))

    def group_norms(self, samples: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Per-example L2 norm of each group's accumulated per-example gradients, shape ``(examples, K)``
        (``samples``: Opacus' flat per-example gradients of ``params``, when already gathered)."""
        samples = self.grad_samples if samples is None else samples
        squares = samples[0].new_zeros((len(samples[0]), len(self.bounds)))
        for p, g in zip(self.params, samples):
            squares[:, self.group_of[id(p)]] += g.reshape(len(g), -1).pow(2).sum(dim=1)
        return squares.sqrt()

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples  # gathered once: each access concatenates the accumulated chunks
        if len(samples[0]) == 0:
            factors = samples[0].new_zeros((0, len(self.bounds)))
        else:
            bounds = torch.tensor(self.bounds, dtype=samples[0].dtype, device=samples[0].device)
            factors = (bounds / (self.group_norms(samples) + 1e-6)).clamp(max=1.0)
        for p, sample in zip(self.params, samples):
            _check_processed_flag(p.grad_sample)
            grad = torch.einsum("i,i...", factors[:, self.group_of[id(p)]].to(p.dtype), sample.to(p.dtype))
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            std = self.noise_multiplier * self.noise_scale * self.bounds[self.group_of[id(p)]]
            p.grad = (p.summed_grad + self.draw(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


def group_assignment(params: Sequence[nn.Parameter], prefix: Sequence[nn.Parameter]) -> Dict[int, int]:
    """Tensor id -> group index (0 prefix, 1 head); with no head tensor every tensor is in group 0."""
    prefix_ids = {id(p) for p in prefix}
    has_head = any(id(p) not in prefix_ids for p in params)
    return {id(p): 0 if (id(p) in prefix_ids or not has_head) else 1 for p in params}


