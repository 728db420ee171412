"""PNG plots of the landscape measures (matplotlib's Agg canvas: no display, no global pyplot state)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: File names inside a landscape folder.
LANDSCAPE_JSON = "landscape.json"
CURVE_PNG = "curve.png"
SLICE_PNGS = {1: "slice_1d.png", 2: "slice_2d.png"}


def _save(figure: Figure, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120)
    return path


def plot_curve(curve: Mapping[str, Any], path: Union[str, Path], *, title: Optional[str] = None) -> Path:
    """Line plot of :func:`~pflat_lightning.landscape.paper_curve` results: loss against the distance
    ``alpha * radius`` from ``w``.

    Args:
        curve: one result, or ``{label: result}`` to compare runs (e.g. DP and non-private) in one plot.
        path: the PNG to write.
        title: the plot's title (default: the sharpness of a single curve).

    Example::

        plot_curve({"DP": dp_curve, "non-private": curve}, "curves.png")
    """
    curves = {None: curve} if "losses" in curve else dict(curve)
    figure = Figure(figsize=(5, 3.6))
    axes = figure.add_subplot()
    for label, one in curves.items():
        distance = [alpha * one["radius"] for alpha in one["alphas"]]
        name = None if label is None else f"{label} (sharpness {one['sharpness']:.4g})"
        axes.plot(distance, one["losses"], marker="o", markersize=3, label=name)
    if None not in curves:
        axes.legend()
    if title is None and None in curves:
        title = f"Loss along the normalised {curve['direction']} direction, sharpness {curve['sharpness']:.4g}"
    axes.set_title(title or "Loss along the normalised direction", fontsize=9)
    axes.set_xlabel("distance from w (alpha * radius)")
    axes.set_ylabel("mean loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_slice(slice_: Mapping[str, Any], path: Union[str, Path], *, title: Optional[str] = None) -> Path:
    """A :func:`~pflat_lightning.landscape.random_slice` result as a line plot (1-D) or a filled contour
    plot with contour lines (2-D); ``w`` is marked at the origin.

    Example::

        plot_slice(random_slice(model, batches, dims=2), "slice_2d.png")
    """
    figure = Figure(figsize=(5, 4) if slice_["dims"] == 2 else (5, 3.6))
    axes = figure.add_subplot()
    if slice_["dims"] == 1:
        axes.plot(slice_["x"], slice_["losses"], marker="o", markersize=3)
        axes.axvline(0.0, color="grey", linewidth=0.8)
        axes.set_xlabel("coordinate along d1")
        axes.set_ylabel("mean loss")
        axes.grid(alpha=0.3)
    else:
        filled = axes.contourf(slice_["x"], slice_["y"], slice_["losses"], levels=20, cmap="viridis")
        axes.contour(slice_["x"], slice_["y"], slice_["losses"], levels=10, colors="white", linewidths=0.5)
        figure.colorbar(filled, ax=axes, label="mean loss")
        axes.plot([0.0], [0.0], marker="x", color="red")
        axes.set_xlabel("coordinate along d1")
        axes.set_ylabel("coordinate along d2")
    axes.set_title(title or f"Filter-normalised random {slice_['dims']}-D slice (seed {slice_['seed']})", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def write_landscape(result: Mapping[str, Any], folder: Union[str, Path]) -> Dict[str, str]:
    """Write a :func:`~pflat_lightning.landscape.measure_landscape` result into ``folder``:
    ``landscape.json`` (every number), ``curve.png`` and ``slice_1d.png`` / ``slice_2d.png`` for the
    slices it holds. Returns ``{name: path}`` of the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": folder / LANDSCAPE_JSON, "curve": plot_curve(result["curve"], folder / CURVE_PNG)}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    for dims, name in SLICE_PNGS.items():
        key = f"slice_{dims}d"
        if key in result:
            files[key] = plot_slice(result[key], folder / name)
    return {name: str(path) for name, path in files.items()}
