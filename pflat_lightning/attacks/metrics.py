"""How well a membership score separates members from non-members, through torchmetrics' binary ROC.

All metrics are computed on the audit examples themselves: the threshold behind the balanced attack
accuracy is the best one for these very examples (an optimistic attacker who knows the answer; the
paper's "MIA accuracy"), not one chosen on separate data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

#: False-positive rates at which the true-positive rate is reported (1 % and 0.1 %).
FPR_TARGETS = (0.01, 0.001)
THRESHOLD_NOTE = (
    "mia_accuracy is the best balanced accuracy (TPR + TNR) / 2 over all thresholds, the threshold chosen on "
    "these same audit examples (an optimistic attacker), as in the paper's MIA accuracy"
)


@dataclass
class RocCurve:
    """The ROC of one attack: ``fpr[j]``, ``tpr[j]`` when examples with ``score >= thresholds[j]`` are
    called members (``thresholds[0] = inf``: nobody is)."""

    fpr: torch.Tensor
    tpr: torch.Tensor
    thresholds: torch.Tensor


def _as_ranks(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores mapped onto [0, 1] by their rank among the distinct values (order and ties kept), and the
    distinct values. torchmetrics applies a sigmoid to scores outside [0, 1], which would merge large
    scores into ties in floating point."""
    distinct, inverse = torch.unique(scores, return_inverse=True)
    return inverse.double() / max(len(distinct) - 1, 1), distinct


def _check(scores: torch.Tensor, is_member: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    scores, is_member = torch.as_tensor(scores).double().flatten(), torch.as_tensor(is_member).long().flatten()
    if scores.shape != is_member.shape:
        raise ValueError(f"scores and is_member must have the same length, got {len(scores)} and {len(is_member)}.")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN: the module's loss is NaN for some examples.")
    members = int(is_member.sum())
    if members == 0 or members == len(is_member):
        raise ValueError(f"is_member must contain both members and non-members, got {members} of {len(is_member)}.")
    return scores, is_member


def roc_curve(scores: torch.Tensor, is_member: torch.Tensor) -> RocCurve:
    """The ROC curve of ``scores`` (higher = member) against ``is_member`` (1 = member)."""
    scores, is_member = _check(scores, is_member)
    ranks, distinct = _as_ranks(scores)
    fpr, tpr, rank_thresholds = binary_roc(ranks, is_member)
    index = torch.round(rank_thresholds.double() * max(len(distinct) - 1, 1)).long()
    thresholds = distinct[index.clamp(0, len(distinct) - 1)]
    thresholds[0] = float("inf")  # torchmetrics' first point is "nobody is a member"
    # torchmetrics returns float32 rates; back to exact counts, so that e.g. 11 / 1100 is not above 1 %
    positives, negatives = int(is_member.sum()), int((is_member == 0).sum())
    fpr = torch.round(fpr.double() * negatives) / negatives
    tpr = torch.round(tpr.double() * positives) / positives
    return RocCurve(fpr, tpr, thresholds)


def tpr_at_fpr(curve: RocCurve, target: float) -> float:
    """The largest TPR among the ROC points with ``FPR <= target``."""
    return float(curve.tpr[curve.fpr <= target].max())


def attack_metrics(scores: torch.Tensor, is_member: torch.Tensor) -> Dict[str, Any]:
    """ROC AUC, balanced attack accuracy with its threshold, and TPR at 1 % and 0.1 % FPR.

    ``fpr_resolution`` is ``1 / num_non_members``, the smallest non-zero FPR the data can show: with fewer
    than 1000 non-members the 0.1 % point is the TPR at FPR 0 (``tpr_at_0.1pct_fpr_resolvable`` false).

    Example::

        metrics = attack_metrics(torch.tensor([0.9, 0.2, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
        metrics["auc"]  # 1.0
    """
    scores, is_member = _check(scores, is_member)
    curve = roc_curve(scores, is_member)
    balanced = (curve.tpr + 1 - curve.fpr) / 2
    best = int(torch.argmax(balanced))
    non_members = int((is_member == 0).sum())
    metrics: Dict[str, Any] = {
        "auc": float(binary_auroc(_as_ranks(scores)[0], is_member)),
        "mia_accuracy": float(balanced[best]),
        "threshold": float(curve.thresholds[best]),
        "num_members": int(is_member.sum()),
        "num_non_members": non_members,
        "fpr_resolution": 1.0 / non_members,
    }
    for target in FPR_TARGETS:
        key = f"tpr_at_{target * 100:g}pct_fpr"
        metrics[key] = tpr_at_fpr(curve, target)
        metrics[f"{key}_resolvable"] = non_members * target >= 1
    return metrics


def dp_tpr_bound(fpr: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """The largest TPR any membership attack can reach at false-positive rate ``fpr`` against an
    (epsilon, delta)-DP training run: ``min(1, e^eps * fpr + delta, 1 - e^-eps * (1 - delta - fpr))``, the
    hypothesis-testing region of differential privacy (Kairouz, Oh and Viswanath 2015)."""
    fpr = torch.as_tensor(fpr, dtype=torch.float64)
    tpr = torch.minimum(math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr))
    return tpr.clamp(max=1.0)


def dp_attack_bound(epsilon: float, delta: float) -> Dict[str, float]:
    """What an (epsilon, delta) guarantee allows any membership attack at most, in the audit's metrics.

    The bounds hold for the membership game (each audited example is a member with probability 1/2,
    independently of the rest), which a random members / non-members split of i.i.d. data estimates. The
    balanced accuracy peaks where the two sides of :func:`dp_tpr_bound` meet, at
    ``FPR* = (1 - delta) / (1 + e^eps)``; the AUC is the area under :func:`dp_tpr_bound`.

    Example::

        dp_attack_bound(3.0, 1e-5)["max_mia_accuracy"]  # 0.9526: epsilon 3 allows a strong attacker
    """
    if not epsilon >= 0 or not 0 <= delta < 1:
        raise ValueError(f"Need epsilon >= 0 and 0 <= delta < 1, got epsilon={epsilon}, delta={delta}.")
    e = math.exp(epsilon)
    knee = (1 - delta) / (1 + e)
    advantage = (1 - delta) * (e - 1) / (e + 1) + delta  # max TPR - FPR, at the knee
    rest = 1 - delta - knee  # the second side runs from the knee to FPR = 1 - delta, where it reaches 1
    auc = e * knee**2 / 2 + delta * knee + rest - rest**2 / (2 * e) + delta
    bound = {"epsilon": epsilon, "delta": delta, "max_mia_accuracy": (1 + advantage) / 2, "max_auc": auc}
    for target in FPR_TARGETS:
        bound[f"max_tpr_at_{target * 100:g}pct_fpr"] = float(dp_tpr_bound(torch.tensor(target, dtype=torch.float64), epsilon, delta))
    return bound
