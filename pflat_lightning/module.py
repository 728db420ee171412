"""``DPPrefixModule``: the DP-SGD training of a prefix-tuned frozen transformer, whatever its task.

Everything that makes a fit private lives here, once, for every task module (classification,
generation): the guards refused before training, the Opacus engine wired into ``configure_optimizers``,
the manual training step with virtual steps over a Poisson logical batch, the budget stop, the resume
of a Poisson epoch, epsilon in the progress bar, the ledger, checkpoints and the privacy report. A task
module builds ``self.model`` and says what one example's loss is (:meth:`DPPrefixModule.example_losses`).
"""
from __future__ import annotations

import inspect
import math
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric

from pflat_lightning.checkpointing import ARCHITECTURE_HPARAMS, AtomicCheckpointIO, check_checkpoint_matches
from pflat_lightning.prefix import PrefixEncoder
from pflat_lightning.pretrained import sharing_pretrained
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.engine import DPSGDEngine
from pflat_lightning.privacy.ledger import PrivacyLedger
from pflat_lightning.privacy.report import build_report, report_folder, write_report
from pflat_lightning.privacy.sampling import PoissonDataLoader
from pflat_lightning.strategies import START_METHODS, DPDDPStrategy

#: Precisions under which per-example clipping sees true fp32/fp64 gradients. fp16 mixed precision
#: clips loss-scaled gradients, which breaks the sensitivity bound; 16-bit true precision trains the
#: prefix in 16 bits. Under bf16-mixed only the frozen backbone computes in bf16 (see PrefixModel).
DP_PRECISIONS = ("32-true", "64-true", "bf16-mixed")
#: Below this, per-example gradients (hooks) cost little next to activations: ``"auto"`` keeps hooks.
AUTO_GHOST_MIN_BYTES = 256 * 2**20
CHECKPOINT_KEY = "pflat_privacy"
#: Checkpoint key of the run id: a resumed run is the same run and updates its own report.
RUN_ID_KEY = "pflat_run_id"
#: Metric names that a callback's ``monitor`` reads from the validation split (every pflat task logs its
#: validation metrics as ``val_<name>``: ``val_loss``, ``val_acc``, ``val_ppl``...).
VALIDATION_METRIC_PREFIXES = ("val_", "val/", "validation_", "validation/")
#: Lightning's warning at the start of the fit loop about modules in eval mode.
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class DPPrefixModule(pl.LightningModule):
    """Base class of the prefix-tuned modules: DP-SGD (or plain training) of ``self.model``'s prefix.

    With the default :class:`PrivacyConfig` every fit is DP-SGD through Opacus: Poisson-sampled logical
    batches (split into physical chunks of ``max_physical_batch_size``), per-example clipping, Gaussian
    noise calibrated so that the planned steps end at ``target_epsilon``, epsilon in the progress bar, and
    a privacy report (``privacy_report.json``/``.md``, in ``report_dir``) after fit and after test.
    ``PrivacyConfig(enabled=False)`` trains the identical model without privacy.

    A subclass sets ``self.model``, a module with a ``prefix`` (:class:`PrefixEncoder`),
    ``trainable_modules()`` (the prefix and any head: everything DP trains) and
    ``per_example_gradient_bytes(batch_size)``, and implements :meth:`example_losses`. Batches are dicts
    of tensors whose ``labels`` has one row per example. It offers the callbacks' contract
    (:mod:`pflat_lightning.protocol`): ``example_losses``, ``layer_groups``, ``prefix_layer_mask``,
    ``set_prefix_layer_mask``, ``loss_terms``, ``before_optimizers``, ``prefix``, ``clone_untrained``,
    ``engine``, ``ledger`` and ``report_sections``.

    Args:
        privacy: the privacy parameters; ``None`` means ``PrivacyConfig()`` (DP at epsilon 8).
        optimizer: optimizer factory over the trainable parameters.
        lr_scheduler: optional scheduler factory, stepped once per logical batch.
        max_physical_batch_size: examples per forward/backward; a logical batch is processed in
            chunks of this size (virtual steps), so its memory never depends on the logical batch.
        log_train_loss: log the training loss. It is a statistic of private data released outside
            the accountant, so under DP it is recorded in the ledger and voids the formal guarantee.
        epsilon_every_n_steps: how often the progress bar's epsilon is recomputed (also at the last
            step); ``epsilon_at_step`` says which step it is exact for. The report is always exact.

    Raises:
        ValueError: for a ``max_physical_batch_size`` or ``epsilon_every_n_steps`` below 1; at fit start
            for a setting that breaks DP (precision, plain DDP, gradient accumulation, a trainable
            backbone, a non-Poisson loader, a seeded loader under ``secure_mode``, an unbounded schedule, a
            resume without privacy state); before loading a checkpoint of another model
            (:func:`~pflat_lightning.checkpointing.check_checkpoint_matches`).

    Example::

        class MyTask(DPPrefixModule):
            def __init__(self, backbone: str, privacy: Optional[PrivacyConfig] = None) -> None:
                super().__init__(privacy=privacy)
                self.save_hyperparameters()  # what clone_untrained (the teacher, LiRA's shadows) rebuilds from
                self.model = PrefixModel(AutoModel.from_pretrained(backbone), num_labels=2)

            def example_losses(self, batch):
                return F.cross_entropy(self.model(batch["input_ids"], batch["attention_mask"]),
                                       batch["labels"], reduction="none")
    """

    #: The ``__init__`` arguments that rebuild a trained module's architecture onto its public backbone,
    #: what a release keeps (:mod:`pflat_lightning.release`); empty: the class cannot be released.
    RELEASE_ARGS: Tuple[str, ...] = ()

    def __init__(
        self,
        *,
        privacy: Optional[PrivacyConfig] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        max_physical_batch_size: int = 32,
        log_train_loss: bool = False,
        epsilon_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}.")
        if epsilon_every_n_steps < 1:
            raise ValueError(f"epsilon_every_n_steps must be >= 1, got {epsilon_every_n_steps}.")
        self.automatic_optimization = False
        self.privacy = privacy if privacy is not None else PrivacyConfig()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.max_physical_batch_size = max_physical_batch_size
        self.log_train_loss = log_train_loss
        self.epsilon_every_n_steps = epsilon_every_n_steps
        self._shown_epsilon: Optional[tuple] = None
        self.ledger = PrivacyLedger()
        self.engine: Optional[DPSGDEngine] = DPSGDEngine(self.privacy) if self.privacy.enabled else None
        self._resumed = False
        self._final_metrics: Dict[str, float] = {}
        #: Names this run in its report (kept in checkpoints: a resumed run is the same run).
        self.run_id = uuid.uuid4().hex
        #: Where this run's report is, chosen at its first write (:func:`~pflat_lightning.privacy.report.report_folder`):
        #: ``trainer.log_dir``, or ``privacy_reports/version_N`` under it when it holds another run's report.
        self.report_dir: Optional[Path] = None
        #: What the callbacks want in the privacy report (their settings and measurements).
        self.report_sections: Dict[str, Any] = {}
        #: Per-example terms ``fn(batch, logits, prefix) -> Tensor`` added to each example's loss (callbacks).
        self.loss_terms: List[Callable[..., torch.Tensor]] = []
        #: Work ``fn(module)`` that callbacks queue in ``setup`` to run when the optimizers are configured:
        #: after a resumed run's checkpoint is restored, before the noise is calibrated (a teacher to train).
        self.before_optimizers: List[Callable[[pl.LightningModule], None]] = []

    # ------------------------------------------------------------------ the task's part
    def example_losses(self, batch: Dict[str, Any]) -> torch.Tensor:
        """One loss per example (DP clips each example's gradient separately), including the
        per-example terms that callbacks registered in ``loss_terms``."""
        raise NotImplementedError(f"{type(self).__name__} must implement example_losses(batch).")

    @property
    def prefix(self) -> PrefixEncoder:
        return self.model.prefix

    def layer_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        """Each active prefix layer's parameters (the "layers" that AWP perturbs)."""
        return {f"prefix.layers.{i}": list(self.prefix.layers[i].parameters()) for i in self.prefix.active_layers}

    def prefix_layer_mask(self) -> List[bool]:
        """One bool per prefix layer, true where the layer is active (:class:`~pflat_lightning.protocol.PrunablePrefix`)."""
        return self.prefix.layer_mask.tolist()

    def set_prefix_layer_mask(self, keep: Sequence[bool]) -> None:
        """Prune the prefix layers where ``keep`` is false (no prefix, no gradient, no update)."""
        self.prefix.set_layer_mask(keep)

    @property
    def is_private(self) -> bool:
        return self.engine is not None

    def clone_untrained(self, **overrides: Any) -> "DPPrefixModule":
        """A fresh, untrained module of this one's configuration that shares its frozen backbone: the teacher
        of ``TeacherDistillation``, LiRA's shadows.

        The clone comes from this class's constructor, given the saved hyperparameters (the constructor calls
        ``save_hyperparameters()``, as the task modules do), this module's prefix and privacy configs, its
        optimizer and scheduler factories, and ``overrides``. A backbone that the constructor loads with
        :func:`~pflat_lightning.pretrained.load_pretrained` (both task modules do) is not read again: the clone
        holds this module's backbone and tokenizer objects, so moving either module's backbone to a device moves
        both (a Trainer moves its module to the CPU when its fit ends). The prefix is initialised as its
        :class:`~pflat_lightning.prefix.PrefixConfig` says (a normal draw from the current torch seed, or
        ``init_text``), any head anew, and nothing trained, counted or recorded here is carried over. The clone
        is placed on this module's device.

        Args:
            overrides: constructor arguments to replace, e.g. ``privacy=`` and ``optimizer=``; never one of the
                architecture's (:data:`~pflat_lightning.checkpointing.ARCHITECTURE_HPARAMS`).

        Raises:
            ValueError: for an override the constructor does not take, or one of the architecture's.

        Example::

            teacher = module.clone_untrained(privacy=PrivacyConfig(enabled=False))
        """
        accepted = inspect.signature(type(self).__init__).parameters
        refused = sorted(set(overrides) - set(accepted)) + sorted(set(overrides) & set(ARCHITECTURE_HPARAMS))
        if refused:
            raise ValueError(f"clone_untrained cannot override {refused}: it takes {type(self).__name__}'s constructor "
                             f"arguments except the architecture's {list(ARCHITECTURE_HPARAMS)}.")
        kwargs = {k: v for k, v in self.hparams.items() if k in accepted}  # LightningCLI adds its own keys
        # The objects this module was built with: hparams leave the factories out, and under LightningCLI they
        # hold the configs as parsed dicts.
        built = {"prefix": self.prefix.config, "privacy": self.privacy, "optimizer": self.optimizer_factory,
                 "lr_scheduler": self.lr_scheduler_factory}
        kwargs.update({k: v for k, v in built.items() if k in accepted}, **overrides)
        backbone, tokenizer = self.hparams.get("backbone"), getattr(self, "tokenizer", None)
        shared = isinstance(backbone, str) and tokenizer is not None
        with sharing_pretrained(backbone, self.model.backbone, tokenizer) if shared else nullcontext():
            clone = type(self)(**kwargs)
        return clone.to(self.device)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        trainer = self.trainer
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default writer
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not self.is_private:
            return
        if trainer.precision not in DP_PRECISIONS:
            raise ValueError(
                f"Trainer(precision={trainer.precision!r}) cannot be used with DP: per-example clipping needs "
                "full-precision gradients (fp16 mixed precision clips loss-scaled ones, 16-bit true precision "
                f"trains the prefix in 16 bits). Allowed with DP: {DP_PRECISIONS}; under bf16-mixed the prefix and "
                "head stay fp32."
            )
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DPDDPStrategy):
            raise ValueError(
                f"DP training on {trainer.world_size} processes needs Trainer(strategy='dp_ddp') (or "
                f"{', '.join(repr(n) for n in START_METHODS if n != 'dp_ddp')}), got {type(trainer.strategy).__name__}: "
                "it would average raw gradients before clipping and every rank would add its own noise."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) cannot be used with DP: it "
                "scales per-example gradients before clipping and breaks Poisson sampling. Set the datamodule's "
                "batch_size to the logical batch; max_physical_batch_size bounds the memory."
            )
        configure_sampling(trainer.datamodule, self.privacy)
        record_validation_monitors(self)

    def configure_optimizers(self) -> Any:
        queued, self.before_optimizers[:] = list(self.before_optimizers), []
        for work in queued:
            work(self)
        self._check_trainable()
        # Pruned prefix layers stay in the optimizer (frozen, so never updated): the parameter groups
        # then match across a pruning and a resume.
        optimizer = self.optimizer_factory([p for m in self.model.trainable_modules() for p in m.parameters()])
        if self.is_private:
            optimizer = self._make_private(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    def _check_trainable(self) -> None:
        own = {id(p) for m in self.model.trainable_modules() for p in m.parameters()}
        stray = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in own]
        if stray and self.is_private:
            raise ValueError(
                f"Trainable backbone parameters {stray[:5]}{'...' if len(stray) > 5 else ''} are not part of the DP "
                "prefix: the backbone must stay frozen so the accountant covers every trained parameter."
            )

    def _make_private(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        trainer = self.trainer
        dataset_size, expected_batch, planned = plan_private_training(self)
        dp_optimizer = self.engine.attach(
            self.model,
            optimizer,
            dataset_size=dataset_size,
            expected_batch_size=expected_batch,
            planned_steps=planned,
            distributed=trainer.world_size > 1,
            grad_sample_mode=self._auto_clipping(min(expected_batch, self.max_physical_batch_size)),
            prefix_parameters=list(self.prefix.parameters()),
        )
        if self.log_train_loss:
            self.ledger.record("training loss logging", "unaccounted", "the training loss of private batches is logged without noise")
        rank_zero_info(
            f"DP-SGD: noise_multiplier={self.engine.noise_multiplier:.4f}, sample_rate={self.engine.sample_rate:.5f}, "
            f"{self.engine.planned_steps} steps, target epsilon={self.privacy.target_epsilon}, delta={self.engine.delta:.3g}"
        )
        return dp_optimizer

    def _auto_clipping(self, physical_batch: int) -> Optional[str]:
        """What ``grad_sample_mode="auto"`` means for this model: ghost clipping when the per-example
        gradients of hooks would take more than ``AUTO_GHOST_MIN_BYTES`` and at least 4x ghost's memory
        (a reparametrised prefix); hooks otherwise, where that memory is small next to the backbone's
        activations and hooks need one backward pass instead of two."""
        if self.privacy.grad_sample_mode != "auto":
            return None
        if self.privacy.clipping == "split":
            return "hooks"  # ghost clipping has no per-tensor norms
        estimate = self.model.per_example_gradient_bytes(physical_batch)
        ghost_pays = estimate["hooks"] > AUTO_GHOST_MIN_BYTES and 4 * estimate["ghost"] <= estimate["hooks"]
        mode = "ghost" if ghost_pays else "hooks"
        mib = {k: round(v / 2**20, 2) for k, v in estimate.items()}
        rank_zero_info(f"grad_sample_mode='auto' chose {mode!r}: per-example gradient memory per physical batch of "
                       f"{physical_batch}, estimated hooks {mib['hooks']} MiB, ghost {mib['ghost']} MiB")
        self.report_sections["clipping"] = {"requested": "auto", "chosen": mode, "physical_batch": physical_batch,
                                            "estimated_mib": mib}
        return mode

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        # Lightning warns at the start of the fit loop (after this hook, before on_train_start) about every
        # module in eval mode. The frozen backbone is in eval mode by design (no dropout in the activations
        # the prefix is trained on); silence exactly that warning, for that window, when the backbone is all
        # it would name.
        frozen = {id(m) for m in self.model.backbone.modules()}
        if all(id(m) in frozen for m in self.modules() if not m.training):
            self._eval_mode_silence = warnings.catch_warnings()
            self._eval_mode_silence.__enter__()
            warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning)

    def _end_eval_mode_silence(self) -> None:
        silence, self._eval_mode_silence = getattr(self, "_eval_mode_silence", None), None
        if silence is not None:
            silence.__exit__(None, None, None)

    def on_train_start(self) -> None:
        self._end_eval_mode_silence()
        if self.is_private:
            resume_poisson_epoch(self, self.engine.updates)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        if self.is_private and self.engine.budget_exhausted:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        size = batch["labels"].shape[0]
        if self.is_private:
            total = self.engine.backward_batch(batch, self._finite_losses, self.max_physical_batch_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._log_epsilon()
        else:
            total = 0.0
            for start in range(0, size, self.max_physical_batch_size):
                losses = self._finite_losses({k: v[start : start + self.max_physical_batch_size] for k, v in batch.items()})
                total += float(losses.detach().sum())
                self.manual_backward(losses.sum() / size)
            if size > 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if self.log_train_loss and size > 0:
            self.log("train_loss", total / size, prog_bar=True, batch_size=size)

    def _finite_losses(self, batch: Dict[str, Any]) -> torch.Tensor:
        losses = self.example_losses(batch)
        if not bool(torch.isfinite(losses.detach()).all()):
            raise FloatingPointError(
                f"Non-finite training loss at step {self.global_step} (epoch {self.current_epoch}); the poisoned "
                "update was not applied. Resume from the last checkpoint with a lower learning rate."
            )
        return losses

    def _log_epsilon(self) -> None:
        # The PRV accountant costs ~0.1 s a call, a large share of a small step: recompute every
        # `epsilon_every_n_steps` updates and at the last one; the value is exact for `epsilon_at_step`.
        engine = self.engine
        if engine.updates % self.epsilon_every_n_steps == 0 or engine.budget_exhausted or self._shown_epsilon is None:
            self._shown_epsilon = (engine.updates, engine.epsilon())
        updates, epsilon = self._shown_epsilon
        self.log("epsilon", epsilon, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self.log("epsilon_at_step", float(updates), on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ evaluation
    def _reset_metrics(self) -> None:
        # A metric reset inside `trainer.validate`/`test` (inference mode) holds inference tensors, which the
        # no-grad validation of a later `fit` cannot update in place: every evaluation starts from fresh states.
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    # ------------------------------------------------------------------ report and checkpoints
    def privacy_report(self) -> Dict[str, Any]:
        """The report for the run so far (see :func:`pflat_lightning.privacy.report.build_report`)."""
        trainer = self.trainer
        # Validation metrics of the fit and test metrics of a later test run both belong in the report.
        self._final_metrics.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val_", "test_"))}
        )
        size = self.engine.dataset_size if self.is_private else None
        return build_report(
            config=self.privacy,
            engine=self.engine,
            ledger=self.ledger,
            dataset_size=size,
            epochs=trainer.current_epoch,
            steps=trainer.global_step,
            metrics=self._final_metrics,
            sections=self.report_sections,
            run_id=self.run_id,
        )

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
        self._write_report()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[RUN_ID_KEY] = self.run_id
        if self.is_private and self.engine.optimizer is not None:
            checkpoint[CHECKPOINT_KEY] = {"engine": self.engine.state_dict(), "ledger": self.ledger.state_dict()}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        check_checkpoint_matches(self, checkpoint)  # Lightning and `load_run` call this before loading the weights
        self.run_id = checkpoint.get(RUN_ID_KEY, self.run_id)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None and self.is_private:
            self.engine.load_state_dict(state["engine"])
            self.ledger.load_state_dict(state["ledger"])
            self._resumed = True

    def teardown(self, stage: str) -> None:
        self._end_eval_mode_silence()  # a fit that failed before training started
        if self.is_private:
            self.engine.detach()


def plan_private_training(module: pl.LightningModule) -> Tuple[int, int, int]:
    """``(dataset_size, expected_batch_size, planned_steps)`` of a DP fit about to start, from its training
    loader and schedule (the numbers that decide the noise). Refuses an unbounded schedule, a loader that is
    not a secure Poisson loader under ``secure_mode=True``, a non-Poisson loader under ``poisson_sampling=True``
    (a shuffled loader otherwise is recorded as unaccounted) and a resume from a checkpoint that carries no
    privacy state (``module._resumed`` false)."""
    trainer = module.trainer
    trainer.fit_loop.setup_data()  # the loader (dataset size, sampling rate) decides the noise
    planned = trainer.estimated_stepping_batches
    if not math.isfinite(planned):
        raise ValueError("DP training needs a finite plan: set Trainer(max_epochs=...) or Trainer(max_steps=...).")
    loader = trainer.train_dataloader
    if module.privacy.secure_mode and not (isinstance(loader, PoissonDataLoader) and loader.secure):
        raise ValueError(
            f"PrivacyConfig(secure_mode=True) needs a secure Poisson training loader, got {type(loader).__name__}"
            f"{'(secure=False)' if isinstance(loader, PoissonDataLoader) else ''}: its batches would come from a seeded "
            "generator that anyone with the seed can replay. Use a pflat_lightning datamodule (it follows secure_mode) "
            "or return pflat_lightning.privacy.PoissonDataLoader(..., secure=True) from train_dataloader()."
        )
    if isinstance(loader, PoissonDataLoader):
        expected_batch = loader.expected_batch_size
    elif module.privacy.poisson_sampling:
        raise ValueError(
            "PrivacyConfig(poisson_sampling=True) needs a Poisson training loader: use a pflat_lightning datamodule "
            "or return pflat_lightning.privacy.PoissonDataLoader from train_dataloader()."
        )
    else:
        expected_batch = loader.batch_size
        module.ledger.record(
            "sampling", "unaccounted",
            "fixed-size shuffled batches (poisson_sampling=False): the accountant's epsilon assumes Poisson "
            "sampling and is not a formal bound for shuffling",
        )
    if trainer.ckpt_path is not None and not module._resumed:
        raise ValueError(
            f"Refusing to resume DP training from {trainer.ckpt_path}: it holds no privacy state (accountant "
            "history, noise, sampler), so the privacy already spent would be forgotten."
        )
    return len(loader.dataset), expected_batch, int(planned)


def configure_sampling(datamodule: Any, privacy: PrivacyConfig) -> None:
    """Make the library's datamodules sample as ``privacy`` says (Poisson batches, from the OS's CSPRNG under
    ``secure_mode``) before their training loader is built; other datamodules are checked by
    :func:`plan_private_training`."""
    if datamodule is None:
        return
    if hasattr(datamodule, "poisson_sampling"):
        datamodule.poisson_sampling = privacy.poisson_sampling
    if hasattr(datamodule, "secure_sampling"):
        datamodule.secure_sampling = privacy.secure_mode


def record_validation_monitors(module: pl.LightningModule) -> None:
    """Record in ``module.ledger`` each callback of the fit that selects on a validation metric
    (``ModelCheckpoint``/``EarlyStopping`` with ``monitor="val_loss"``..., any callback whose ``monitor``
    starts with one of :data:`VALIDATION_METRIC_PREFIXES`): it chooses the released model (the checkpoint
    kept, the stopping epoch) with private data held out of training, without DP, a ``held_out`` entry. A
    monitor on ``epsilon`` or a training metric reads no held-out data. A scheduler's ``monitor`` needs no
    entry: under manual optimisation Lightning ignores it and the module steps its scheduler without a metric."""
    for callback in module.trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith(VALIDATION_METRIC_PREFIXES):
            module.ledger.record(type(callback).__name__, "held_out",
                                 f"monitor={monitor!r}: selects on a metric of the validation split (private data "
                                 "held out of training) without DP")


def resume_poisson_epoch(module: pl.LightningModule, updates: int) -> None:
    """Resuming inside an epoch after ``updates`` logical steps (Lightning calls no on_train_epoch_start
    then): replay the epoch's Poisson draws and skip the batches already trained on, before the first
    batch is drawn (a secure loader draws the remaining batches afresh instead). Call it from ``on_train_start``."""
    loader = module.trainer.train_dataloader
    if not isinstance(loader, PoissonDataLoader):
        return
    per_epoch = module.trainer.num_training_batches  # the epoch as run: limit_train_batches applied
    done = updates - module.current_epoch * per_epoch
    if 0 < done < per_epoch:
        loader.batch_sampler.fast_forward(done)
        if loader.num_workers > 0:  # the workers already drew ahead: restart the iterator
            iter(module.trainer.fit_loop._data_fetcher)
