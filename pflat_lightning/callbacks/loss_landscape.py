"""Measurement at the end of training: how sharp is the minimum the run found?"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from pflat_lightning.checks import check_choice, check_count
from pflat_lightning.landscape.measures import (
    DATA_SPLITS,
    DEFAULT_ALPHAS,
    PRIVATE_EVALUATION,
    SECTION,
    LandscapeSettings,
    collect_batches,
    landscape_section,
    measure_landscape,
    split_loader,
)
from pflat_lightning.landscape.plots import write_landscape
from pflat_lightning.protocol import PerExampleLosses, check_contract, privacy_engine, privacy_ledger, report_sections


class LossLandscape(Callback):
    """Measures the loss landscape around the trained weights when the fit ends, and reports it.

    On rank 0, after the last training step, it evaluates on ``num_batches`` batches of ``data``
    (see :mod:`pflat_lightning.landscape`): the paper's curve along the normalised direction and its
    sharpness ``max_alpha L(w + alpha * radius * d) - L(w)``, SAM sharpness within the relative radius
    ``sam_rho``, and 1-D / 2-D filter-normalised random slices. Only the task loss counts (teacher
    terms are left out) and the weights are restored exactly. It writes ``landscape.json`` and
    ``curve.png``, ``slice_1d.png``, ``slice_2d.png`` into ``landscape/`` of the run folder
    (``trainer.log_dir``, else ``default_root_dir``), logs ``sharpness`` and ``sam_sharpness`` to the
    loggers and puts the numbers in the privacy report (section ``LossLandscape``). Use it to compare
    how flat DP, non-private and Privacy-Flat runs end up, measured the same way.

    Reading the ``validation``, ``test`` or ``public`` split costs nothing. ``data="private"`` reads the
    private training split (in order, not Poisson-sampled) and is recorded in the ledger as
    ``"evaluation"``: the model's guarantee is unaffected, but the measured numbers are not private.

    Args:
        data: ``"validation"``, ``"test"``, ``"public"`` or ``"private"``.
        num_batches: evaluation batches (of the split's loader) every point is averaged over.
        alphas: the curve's grid, starting at 0 (default 0, 0.1, ..., 1.0).
        radius: length of the curve's step at ``alpha = 1``.
        direction: ``"gradient"`` (the normalised gradient of the evaluation loss: the same definition
            for private and non-private runs) or ``"released"`` (the last released DP gradient,
            post-processing; DP modules only).
        sam_rho: relative radius of SAM sharpness (each layer group moves by at most ``sam_rho * ||w_l||``).
        sam_steps: projected gradient-ascent steps of SAM sharpness.
        slice_1d_points: points of the 1-D random slice (0: none).
        slice_2d_points: points per axis of the 2-D random slice (0: none).
        span: the random slices reach ``+-span`` times their filter-normalised directions.
        seed: seed of the random slices' directions.

    Raises:
        ValueError: for a bad argument; at setup for ``direction="released"`` on a non-private module.

    Example::

        trainer = pl.Trainer(max_epochs=3, callbacks=[LossLandscape("validation", num_batches=4)])
        trainer.fit(model, datamodule=data)  # runs/.../landscape/landscape.json, curve.png, ...
    """

    def __init__(
        self,
        data: Literal["validation", "test", "public", "private"] = "validation",
        *,
        num_batches: int = 4,
        alphas: Optional[List[float]] = None,
        radius: float = 1.0,
        direction: Literal["gradient", "released"] = "gradient",
        sam_rho: float = 0.05,
        sam_steps: int = 5,
        slice_1d_points: int = 21,
        slice_2d_points: int = 11,
        span: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_choice("data", data, DATA_SPLITS)
        check_count("num_batches", num_batches, 1)
        self.settings = LandscapeSettings(
            alphas=DEFAULT_ALPHAS if alphas is None else alphas, radius=radius, direction=direction, sam_rho=sam_rho,
            sam_steps=sam_steps, slice_1d_points=slice_1d_points, slice_2d_points=slice_2d_points, span=span, seed=seed,
        )
        self.data = data
        self.num_batches = num_batches
        #: The last measurement (see :func:`~pflat_lightning.landscape.measure_landscape`).
        self.result: Optional[Dict[str, Any]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_contract(pl_module, PerExampleLosses, who=type(self).__name__)
        if self.settings.direction == "released":
            engine = privacy_engine(pl_module)
            if engine is None:
                raise ValueError(
                    f"LossLandscape(direction='released') needs a DP module (one with a privacy engine); "
                    f"{type(pl_module).__name__} trains without DP: use direction='gradient'."
                )
            engine.keep_released_gradient = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "landscape"  # log_dir: every rank
        if self.data == "private":
            ledger = privacy_ledger(pl_module)
            if ledger is not None:
                ledger.record(SECTION, "evaluation", PRIVATE_EVALUATION)
        if not trainer.is_global_zero:
            return
        files = self.measure(pl_module, self._loader(trainer), folder)
        report_sections(pl_module)[SECTION] = {**landscape_section(self.result), "folder": str(folder)}
        metrics = {"sharpness": self.result["sharpness"], "sam_sharpness": self.result["sam_sharpness"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        rank_zero_info(f"LossLandscape on {self.result['examples']} {self.data} examples: loss {self.result['loss']:.4g}, "
                       f"sharpness {metrics['sharpness']:.4g}, SAM sharpness {metrics['sam_sharpness']:.4g}; "
                       f"files {sorted(files.values())}")

    def measure(self, pl_module: pl.LightningModule, loader: Iterable[Any], folder: Path) -> Dict[str, str]:
        """Measure ``pl_module`` on the first ``num_batches`` batches of ``loader`` (the result in :attr:`result`)
        and write ``landscape.json`` and the plots into ``folder``; returns the files written, by name."""
        batches = collect_batches(loader, self.num_batches, pl_module.device)
        self.result = measure_landscape(pl_module, batches, self.settings, data=self.data)
        return write_landscape(self.result, folder)

    def _loader(self, trainer: pl.Trainer) -> Any:
        if trainer.datamodule is not None:
            return split_loader(trainer.datamodule, self.data)
        if self.data == "validation" and trainer.val_dataloaders is not None:
            loaders = trainer.val_dataloaders
            return loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        raise ValueError(f"LossLandscape(data={self.data!r}) needs a datamodule (trainer.fit(..., datamodule=...)); "
                         "without one only data='validation' with validation loaders given to fit works.")
