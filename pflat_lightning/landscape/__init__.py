"""Loss landscape and sharpness of a trained module: the paper's curve, SAM sharpness, random slices.

Usable in a notebook on any module that follows :mod:`pflat_lightning.protocol`, at the end of a fit
(the :class:`~pflat_lightning.callbacks.LossLandscape` callback) and on a saved run (``pflat landscape``).

Example::

    from pflat_lightning.landscape import (collect_batches, paper_curve, plot_curve, plot_slice, random_slice,
                                           sam_sharpness)

    batches = collect_batches(datamodule.val_dataloader(), num_batches=4)
    curve = paper_curve(model, batches, radius=1.0)
    plot_curve(curve, "curve.png")
    plot_slice(random_slice(model, batches, dims=2, points=11), "slice_2d.png")
    print(curve["sharpness"], sam_sharpness(model, batches, rho=0.05)["sharpness"])
"""
from pflat_lightning.landscape.measures import (
    DEFAULT_ALPHAS,
    LandscapeSettings,
    collect_batches,
    filter_normalized_direction,
    gradient_direction,
    landscape_section,
    measure_landscape,
    measuring,
    paper_curve,
    random_slice,
    released_direction,
    sam_perturbation,
    sam_sharpness,
    split_loader,
)
from pflat_lightning.landscape.plots import plot_curve, plot_slice, write_landscape

__all__ = [
    "DEFAULT_ALPHAS",
    "LandscapeSettings",
    "collect_batches",
    "filter_normalized_direction",
    "gradient_direction",
    "landscape_section",
    "measure_landscape",
    "measuring",
    "paper_curve",
    "plot_curve",
    "plot_slice",
    "random_slice",
    "released_direction",
    "sam_perturbation",
    "sam_sharpness",
    "split_loader",
    "write_landscape",
]
