"""The log-log ROC plot of a membership audit (Carlini et al. 2022's view: the low-FPR corner matters)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pflat_lightning.attacks.metrics import RocCurve, dp_tpr_bound


def plot_roc(curves: Mapping[str, RocCurve], path: str | Path, *, aucs: Dict[str, float] | None = None,
             title: str = "Membership inference ROC", dp_bound: Optional[Mapping[str, Any]] = None) -> Path:
    """Draw every attack's ROC on log-log axes, with the chance diagonal (and the most any attack can
    reach under the run's DP guarantee), into a PNG at ``path``.

    Rendered with the Agg canvas directly (no pyplot, no global backend change). Points with FPR or TPR
    0 cannot be shown on log axes; the axes start at half the smallest non-zero FPR.

    Args:
        curves: attack name -> its ROC curve.
        path: the PNG to write (its folder is created).
        aucs: attack name -> AUC, shown in the legend.
        title: the figure title.
        dp_bound: ``epsilon`` and ``delta`` of the run's guarantee (the audit's ``dp_bound``), drawn as the
            bound on every attack's TPR (:func:`~pflat_lightning.attacks.metrics.dp_tpr_bound`).

    Example::

        plot_roc({"loss": roc_curve(scores, is_member)}, "roc.png")
    """
    if not curves:
        raise ValueError("curves must hold at least one attack's ROC curve.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(5, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    smallest = min(float(c.fpr[c.fpr > 0].min()) for c in curves.values() if bool((c.fpr > 0).any()))
    low = min(smallest / 2, 1e-3)
    for name, curve in curves.items():
        label = name if aucs is None or name not in aucs else f"{name} (AUC {aucs[name]:.3f})"
        axes.plot(curve.fpr.numpy(), curve.tpr.numpy(), label=label, linewidth=1.5)
    axes.plot([low, 1], [low, 1], linestyle="--", color="gray", label="chance")
    if dp_bound is not None:
        fpr = torch.logspace(torch.log10(torch.tensor(low)).item(), 0, 200, dtype=torch.float64)
        axes.plot(fpr.numpy(), dp_tpr_bound(fpr, dp_bound["epsilon"], dp_bound["delta"]).numpy(), linestyle=":",
                  color="black", label=f"DP bound (epsilon {dp_bound['epsilon']:.3g})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(low, 1)
    axes.set_ylim(low, 1)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
