"""``PrivateTraining``: the one home of a private fit in Lightning, whatever its mechanism.

A private fit releases noisy statistics of Poisson-sampled private batches through a mechanism, a
:class:`~pflat_lightning.privacy.engine.PrivacyAccounting`: DP-SGD's clipped per-example gradients
(:class:`~pflat_lightning.privacy.engine.DPSGDEngine`, for :class:`~pflat_lightning.module.DPPrefixModule`)
or the black-box tuner's clipped zeroth-order differences
(:class:`~pflat_lightning.black_box.tuner.ZerothOrderMechanism`). Everything around the mechanism is the
same and lives here, once: the sampling the accountant assumes, the plan that calibrates the noise, the
ledger, the budget stop, epsilon in the progress bar, the replay of an interrupted Poisson epoch, the
privacy state in checkpoints (with the run id, written atomically) and the privacy report.
"""
from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

import lightning.pytorch as pl
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from pflat_lightning.checkpointing import AtomicCheckpointIO
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.engine import PrivacyAccounting
from pflat_lightning.privacy.ledger import PrivacyLedger
from pflat_lightning.privacy.report import build_report, report_folder, write_report
from pflat_lightning.privacy.sampling import PoissonDataLoader

#: Checkpoint key of the privacy state: the mechanism's accounting and the ledger.
CHECKPOINT_KEY = "pflat_privacy"
#: Checkpoint key of the run id: a resumed run is the same run and updates its own report.
RUN_ID_KEY = "pflat_run_id"
#: Metric names that a callback's ``monitor`` reads from the validation split (every pflat task logs its
#: validation metrics as ``val_<name>``: ``val_loss``, ``val_acc``, ``val_ppl``...).
VALIDATION_METRIC_PREFIXES = ("val_", "val/", "validation_", "validation/")


class PrivateTraining(pl.LightningModule):
    """A LightningModule whose fit is private: its mechanism's accounting, the ledger, the report and checkpoints.

    Subclass it when a new way of training needs a privacy guarantee; only the mechanism differs. A subclass
    names its mechanism in :attr:`MECHANISM` (built as ``engine`` from the privacy config, ``None`` with
    ``PrivacyConfig(enabled=False)``), fixes the noise in ``configure_optimizers`` from
    :meth:`plan_private_fit`, releases one update per logical batch in ``training_step`` through ``engine`` and
    then calls :meth:`log_epsilon`. Everything else is here: at fit setup the datamodule's Poisson
    (and, under ``secure_mode``, CSPRNG) sampling and the ledger entries of callbacks that select on
    validation metrics; a stop once the planned updates are spent; the replay of an interrupted Poisson
    epoch; ``privacy_report.json``/``.md`` after fit and after test, written by global rank zero; and the
    privacy state and run id in every checkpoint, restored on resume.

    Args:
        privacy: the privacy parameters; ``None`` means ``PrivacyConfig()`` (DP at epsilon 8).
        epsilon_every_n_steps: how often the progress bar's epsilon is recomputed (also at the last step);
            ``epsilon_at_step`` says which step it is exact for. The report is always exact.

    Raises:
        ValueError: for an ``epsilon_every_n_steps`` that is not an integer >= 1; at fit start for a plan that
            breaks DP (see :meth:`plan_private_fit`).
        TypeError: for a subclass without ``MECHANISM``.

    Example::

        class MyPrivateTask(PrivateTraining):
            MECHANISM = DPSGDEngine

            def configure_optimizers(self):
                dataset_size, expected_batch, planned = self.plan_private_fit()
                return self.engine.attach(self.net, torch.optim.SGD(self.net.parameters(), lr=0.1),
                                          dataset_size=dataset_size, expected_batch_size=expected_batch,
                                          planned_steps=planned)

            def training_step(self, batch, batch_idx):
                self.engine.backward(F.cross_entropy(self.net(batch["x"]), batch["labels"], reduction="none"))
                self.optimizers().step()
                self.optimizers().zero_grad(set_to_none=True)
                self.log_epsilon()
    """

    #: The mechanism that makes a release private (a :class:`PrivacyAccounting` subclass).
    MECHANISM: ClassVar[Type[PrivacyAccounting]]

    def __init__(self, *, privacy: Optional[PrivacyConfig] = None, epsilon_every_n_steps: int = 10) -> None:
        super().__init__()
        if not isinstance(epsilon_every_n_steps, int) or epsilon_every_n_steps < 1:
            raise ValueError(f"epsilon_every_n_steps must be an integer >= 1, got {epsilon_every_n_steps!r}.")
        if not hasattr(type(self), "MECHANISM"):
            raise TypeError(f"{type(self).__name__} must name its privacy mechanism in the class attribute MECHANISM "
                            "(a PrivacyAccounting subclass, e.g. DPSGDEngine).")
        self.automatic_optimization = False
        self.privacy = privacy if privacy is not None else PrivacyConfig()
        self.epsilon_every_n_steps = epsilon_every_n_steps
        self.ledger = PrivacyLedger()
        self.engine: Optional[PrivacyAccounting] = self.MECHANISM(self.privacy) if self.privacy.enabled else None
        #: Names this run in its report (kept in checkpoints: a resumed run is the same run).
        self.run_id = uuid.uuid4().hex
        #: Where this run's report is, chosen at its first write (:func:`~pflat_lightning.privacy.report.report_folder`):
        #: ``trainer.log_dir``, or ``privacy_reports/version_N`` under it when it holds another run's report.
        self.report_dir: Optional[Path] = None
        #: What the callbacks (and the subclass) want in the privacy report: their settings and measurements.
        self.report_sections: Dict[str, Any] = {}
        self._final_metrics: Dict[str, float] = {}
        self._shown_epsilon: Optional[Tuple[int, float]] = None
        #: Whether a checkpoint's privacy state was restored (a resume keeps the spend; see plan_private_fit).
        self._resumed = False

    @property
    def is_private(self) -> bool:
        return self.engine is not None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default writer
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # a kill never truncates the spend's record
        if self.is_private:
            configure_sampling(self.trainer.datamodule, self.privacy)
            self._record_validation_monitors()

    def _record_validation_monitors(self) -> None:
        """Record in the ledger each callback of the fit that selects on a validation metric
        (``ModelCheckpoint``/``EarlyStopping`` with ``monitor="val_loss"``..., any callback whose ``monitor``
        starts with one of :data:`VALIDATION_METRIC_PREFIXES`): it chooses the released model (the checkpoint
        kept, the stopping epoch) with private data held out of training, without DP, a ``held_out`` entry. A
        monitor on ``epsilon`` or a training metric reads no held-out data. A scheduler's ``monitor`` needs no
        entry: under manual optimisation Lightning ignores it and the module steps its scheduler without a metric."""
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if isinstance(monitor, str) and monitor.startswith(VALIDATION_METRIC_PREFIXES):
                self.ledger.record(type(callback).__name__, "held_out",
                                   f"monitor={monitor!r}: selects on a metric of the validation split (private data "
                                   "held out of training) without DP")

    def plan_private_fit(self) -> Tuple[int, int, int]:
        """``(dataset_size, expected_batch_size, planned_steps)`` of the DP fit about to start, from its training
        loader and schedule: the numbers that decide the noise. Call it from ``configure_optimizers``.

        Raises:
            ValueError: for an unbounded schedule, a loader that is not a secure Poisson loader under
                ``secure_mode=True``, a non-Poisson loader under ``poisson_sampling=True`` (a shuffled loader
                otherwise is recorded as unaccounted) or a resume from a checkpoint without privacy state.
        """
        trainer = self.trainer
        trainer.fit_loop.setup_data()  # the loader (dataset size, sampling rate) decides the noise
        planned = trainer.estimated_stepping_batches
        if not math.isfinite(planned):
            raise ValueError("DP training needs a finite plan: set Trainer(max_epochs=...) or Trainer(max_steps=...).")
        loader = trainer.train_dataloader
        if self.privacy.secure_mode and not (isinstance(loader, PoissonDataLoader) and loader.secure):
            raise ValueError(
                f"PrivacyConfig(secure_mode=True) needs a secure Poisson training loader, got {type(loader).__name__}"
                f"{'(secure=False)' if isinstance(loader, PoissonDataLoader) else ''}: its batches would come from a "
                "seeded generator that anyone with the seed can replay. Use a pflat_lightning datamodule (it follows "
                "secure_mode) or return pflat_lightning.privacy.PoissonDataLoader(..., secure=True) from train_dataloader()."
            )
        if isinstance(loader, PoissonDataLoader):
            expected_batch = loader.expected_batch_size
        elif self.privacy.poisson_sampling:
            raise ValueError(
                "PrivacyConfig(poisson_sampling=True) needs a Poisson training loader: use a pflat_lightning datamodule "
                "or return pflat_lightning.privacy.PoissonDataLoader from train_dataloader()."
            )
        else:
            expected_batch = loader.batch_size
            self.ledger.record(
                "sampling", "unaccounted",
                "fixed-size shuffled batches (poisson_sampling=False): the accountant's epsilon assumes Poisson "
                "sampling and is not a formal bound for shuffling",
            )
        if trainer.ckpt_path is not None and not self._resumed:
            raise ValueError(
                f"Refusing to resume DP training from {trainer.ckpt_path}: it holds no privacy state (accountant "
                "history, noise, sampler), so the privacy already spent would be forgotten."
            )
        return len(loader.dataset), expected_batch, int(planned)

    def announce_plan(self, mechanism: str) -> None:
        """Say (rank zero) what the noise was calibrated to, once the engine is planned."""
        engine = self.engine
        rank_zero_info(
            f"{mechanism}: noise_multiplier={engine.noise_multiplier:.4f}, sample_rate={engine.sample_rate:.5f}, "
            f"{engine.planned_steps} steps, target epsilon={self.privacy.target_epsilon}, delta={engine.delta:.3g}"
        )

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        if self.is_private:
            self.resume_poisson_epoch(self.engine.updates)

    def resume_poisson_epoch(self, updates: int) -> None:
        """Resuming inside an epoch after ``updates`` logical steps (Lightning calls no on_train_epoch_start
        then): replay the epoch's Poisson draws and skip the batches already trained on, before the first
        batch is drawn (a secure loader draws the remaining batches afresh instead)."""
        loader = self.trainer.train_dataloader
        if not isinstance(loader, PoissonDataLoader):
            return
        per_epoch = self.trainer.num_training_batches  # the epoch as run: limit_train_batches applied
        done = updates - self.current_epoch * per_epoch
        if 0 < done < per_epoch:
            loader.batch_sampler.fast_forward(done)
            if loader.num_workers > 0:  # the workers already drew ahead: restart the iterator
                iter(self.trainer.fit_loop._data_fetcher)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        if self.is_private and self.engine.budget_exhausted:
            self.trainer.should_stop = True
            return -1
        return None

    def log_epsilon(self) -> None:
        """Put the epsilon spent in the progress bar (``epsilon``, exact for step ``epsilon_at_step``); call it
        after each update."""
        # The PRV accountant costs ~0.1 s a call, a large share of a small step: recompute every
        # `epsilon_every_n_steps` updates and at the last one.
        engine = self.engine
        if engine.updates % self.epsilon_every_n_steps == 0 or engine.budget_exhausted or self._shown_epsilon is None:
            self._shown_epsilon = (engine.updates, engine.epsilon())
        updates, epsilon = self._shown_epsilon
        self.log("epsilon", epsilon, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self.log("epsilon_at_step", float(updates), on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ report
    def privacy_report(self) -> Dict[str, Any]:
        """The report for the run so far (see :func:`pflat_lightning.privacy.report.build_report`)."""
        trainer = self.trainer
        self._keep_metrics()
        return build_report(
            config=self.privacy,
            engine=self.engine,
            ledger=self.ledger,
            dataset_size=self.engine.dataset_size if self.is_private else None,
            epochs=trainer.current_epoch,
            steps=trainer.global_step,
            metrics=self._final_metrics,
            sections=self.report_sections,
            run_id=self.run_id,
        )

    def _keep_metrics(self) -> None:
        # Validation metrics (of the fit or of a validate run) and test metrics of a later test run all belong
        # in the report; each run's metrics are gone from callback_metrics once the next one starts.
        self._final_metrics.update(
            {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val_", "test_"))}
        )

    def _record_evaluation(self, split: str, prefix: str) -> None:
        """A ledger entry for the metrics just measured on ``split``: read without DP (for a pflat datamodule,
        private examples held out of training), so the guarantee is unaffected but the numbers are not private."""
        names = sorted(k for k in self.trainer.callback_metrics if k.startswith(prefix))
        if names:
            self.ledger.record(split, "evaluation",
                               f"{', '.join(names)} measured on the {split} split without DP (for a pflat datamodule, "
                               "private examples held out of training): these numbers and those examples are not "
                               "protected")

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._keep_metrics()
            self._record_evaluation("validation", "val_")

    def _write_report(self) -> None:
        if self.report_dir is None:
            self.report_dir = report_folder(self.trainer, self.run_id)  # a collective call: every rank
        report = self.privacy_report()
        if self.trainer.is_global_zero:
            path = write_report(report, self.report_dir)
            rank_zero_info(f"Privacy report written to {path}")

    def on_fit_end(self) -> None:
        self._write_report()

    def on_test_end(self) -> None:
        self._record_evaluation("test", "test_")
        self._write_report()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[RUN_ID_KEY] = self.run_id
        if self.is_private and self.engine.noise_multiplier is not None:  # planned, or restored: a spend to keep
            checkpoint[CHECKPOINT_KEY] = {"engine": self.engine.state_dict(), "ledger": self.ledger.state_dict()}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.run_id = checkpoint.get(RUN_ID_KEY, self.run_id)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None and self.is_private:
            self.engine.load_state_dict(state["engine"])
            self.ledger.load_state_dict(state["ledger"])
            self._resumed = True


def configure_sampling(datamodule: Any, privacy: PrivacyConfig) -> None:
    """Make the library's datamodules sample as ``privacy`` says (Poisson batches, from the OS's CSPRNG under
    ``secure_mode``) before their training loader is built; other datamodules are checked by
    :meth:`PrivateTraining.plan_private_fit`."""
    if datamodule is None:
        return
    if hasattr(datamodule, "poisson_sampling"):
        datamodule.poisson_sampling = privacy.poisson_sampling
    if hasattr(datamodule, "secure_sampling"):
        datamodule.secure_sampling = privacy.secure_mode
