"""``DPPrefixModule``: the DP-SGD training of a prefix-tuned frozen transformer, whatever its task.

What makes a fit private in general (the sampling, the noise plan, the budget stop, epsilon in the progress
bar, the resume of a Poisson epoch, the ledger, checkpoints and the privacy report) comes from
:class:`~pflat_lightning.privacy.training.PrivateTraining`; the mechanism is DP-SGD
(:class:`~pflat_lightning.privacy.engine.DPSGDEngine`). What is particular to prefix tuning lives here, once,
for every task module (classification, generation): the guards refused before training, the engine wired into
``configure_optimizers``, and the manual training step over a Poisson logical batch in physical chunks. A task
module builds ``self.model`` and says what one example's loss is (:meth:`DPPrefixModule.example_losses`).
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torchmetrics import Metric

from pflat_lightning.checkpointing import ARCHITECTURE_HPARAMS, check_checkpoint_matches
from pflat_lightning.prefix import PrefixEncoder
from pflat_lightning.pretrained import sharing_pretrained
from pflat_lightning.privacy.clipping import HISTOGRAM_OCTAVES, histogram_median, norm_histogram
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.engine import DPSGDEngine
from pflat_lightning.privacy.sampling import PoissonDataLoader
from pflat_lightning.privacy.training import PrivateTraining
from pflat_lightning.protocol import num_examples, physical_batches
from pflat_lightning.strategies import START_METHODS, DPDDPStrategy

#: Precisions under which per-example clipping sees true fp32/fp64 gradients. fp16 mixed precision
#: clips loss-scaled gradients, which breaks the sensitivity bound; 16-bit true precision trains the
#: prefix in 16 bits. Under bf16-mixed only the frozen backbone computes in bf16 (see PrefixModel).
DP_PRECISIONS = ("32-true", "64-true", "bf16-mixed")
#: Below this, per-example gradients (hooks) cost little next to activations: ``"auto"`` keeps hooks.
AUTO_GHOST_MIN_BYTES = 256 * 2**20
#: Public examples whose per-example gradient norms set the bounds of ``clipping="group"``.
GROUP_BOUND_EXAMPLES = 256
#: Lightning's warning at the start of the fit loop about modules in eval mode.
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class DPPrefixModule(PrivateTraining):
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
    MECHANISM = DPSGDEngine

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
        super().__init__(privacy=privacy, epsilon_every_n_steps=epsilon_every_n_steps)
        if max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}.")
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.max_physical_batch_size = max_physical_batch_size
        self.log_train_loss = log_train_loss
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
        accepted = constructor_arguments(type(self))
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
        if stage == "fit" and self.is_private:
            self._check_dp_trainer()
        super().setup(stage)

    def _check_dp_trainer(self) -> None:
        trainer = self.trainer
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
        dataset_size, expected_batch, planned = self.plan_private_fit()
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
        if self.engine.needs_group_bounds:
            self._measure_group_bounds()
        if self.log_train_loss:
            self.ledger.record("training loss logging", "unaccounted", "the training loss of private batches is logged without noise")
        self.announce_plan("DP-SGD")
        return dp_optimizer

    def _measure_group_bounds(self) -> None:
        """``clipping="group"`` without ``prefix_clip_share``: each group's bound at its median per-example gradient
        norm at the initial prefix, on the data ``PrivacyConfig.group_bound_data`` names."""
        private = self.privacy.group_bound_data == "private"
        typical, how = self._private_median_norms() if private else self._public_median_norms()
        bounds = self.engine.set_group_bounds(typical)
        self.ledger.record("group clipping bounds", "accounted" if private else "public",
                           f"{how}: bounds {[round(b, 6) for b in bounds]} (prefix, head)")

    def _public_median_norms(self) -> Tuple[torch.Tensor, str]:
        """The median per-example norm of each group on up to ``GROUP_BOUND_EXAMPLES`` public examples (no privacy
        cost), and how it was measured."""
        public = getattr(self.trainer.datamodule, "public_dataloader", None)
        if public is None or getattr(self.trainer.datamodule, "public_dataset", True) is None:
            raise ValueError(
                "PrivacyConfig(clipping='group', prefix_clip_share=None, group_bound_data='public') measures the group "
                "bounds on public data, but the datamodule has no public split: give it one (public_fraction > 0), "
                "estimate them privately on the training set (group_bound_data='private') or set prefix_clip_share."
            )
        norms, seen = [], 0
        for batch in public(batch_size=self.max_physical_batch_size):
            batch = move_data_to_device(batch, self.device)
            norms.append(self.engine.measure_group_norms(self.example_losses(batch)))
            seen += norms[-1].shape[0]
            if seen >= GROUP_BOUND_EXAMPLES:
                break
        how = f"median per-example gradient norm of each group on {min(seen, GROUP_BOUND_EXAMPLES)} public examples"
        return torch.quantile(torch.cat(norms)[:GROUP_BOUND_EXAMPLES].double(), 0.5, dim=0), how

    def _private_median_norms(self) -> Tuple[torch.Tensor, str]:
        """The median per-example norm of each group read from noisy histograms of ``group_bound_batches`` Poisson
        batches of the training set, drawn independently of the training's batches (the seeded sampler's pass
        "-1", before epoch 0, or fresh OS draws in secure mode; the accountant composes the releases), and how."""
        cfg, trainer = self.privacy, self.trainer
        loader = trainer.train_dataloader
        batches = PoissonDataLoader(
            loader.dataset, expected_batch_size=self.engine.expected_batch_size, collate_fn=loader.collate_fn,
            seed=getattr(loader.batch_sampler, "seed", cfg.seed), num_batches=cfg.group_bound_batches,
            num_replicas=trainer.world_size, rank=trainer.global_rank, secure=cfg.secure_mode,
        )
        batches.batch_sampler.set_epoch(-1)
        groups = len(self.engine.optimizer.bounds)
        total = torch.zeros((groups, HISTOGRAM_OCTAVES + 2))
        for batch in batches:
            norms = [self.engine.measure_group_norms(self.example_losses(move_data_to_device(chunk, self.device)))
                     for chunk in physical_batches(batch, self.max_physical_batch_size)]
            norms = torch.cat(norms).cpu() if norms else torch.zeros((0, groups))
            counts = norm_histogram(norms, cfg.max_grad_norm).to(self.device)
            total += self.engine.release_norm_histogram(counts).cpu()
        how = (f"median per-example gradient norm of each group estimated on the training set from noisy octave "
               f"histograms of {cfg.group_bound_batches} Poisson batches (rate {self.engine.sample_rate:.4g}, count "
               f"noise std {cfg.group_bound_noise}), in the accountant")
        return histogram_median(total, cfg.max_grad_norm, self.engine.expected_batch_size * cfg.group_bound_batches), how

    def _auto_clipping(self, physical_batch: int) -> Optional[str]:
        """What ``grad_sample_mode="auto"`` means for this model: ghost clipping when the per-example
        gradients of hooks would take more than ``AUTO_GHOST_MIN_BYTES`` and at least 4x ghost's memory
        (a reparametrised prefix); hooks otherwise, where that memory is small next to the backbone's
        activations and hooks need one backward pass instead of two."""
        if self.privacy.grad_sample_mode != "auto":
            return None
        if self.privacy.clipping == "group":
            return "hooks"  # ghost clipping has no per-group norms
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
        super().on_train_start()

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        """One logical batch: each physical chunk's per-example losses (:meth:`example_losses`), under DP handed
        to the engine, which clips each example's gradient and sums them; then one update (under DP the noise
        is added once and the accountant counts the release), the scheduler and the progress bar."""
        optimizer = self.optimizers()
        size = num_examples(batch)
        total = 0.0
        for chunk in physical_batches(batch, self.max_physical_batch_size):
            losses = self.example_losses(chunk)
            if not bool(torch.isfinite(losses.detach()).all()):
                self._refuse_update(
                    f"Non-finite training loss at step {self.global_step} (epoch {self.current_epoch}); the poisoned "
                    "update was not applied. Resume from the last checkpoint with a lower learning rate."
                )
                break
            total += float(losses.detach().sum())
            if self.is_private:
                self.engine.backward(losses)
            else:
                self.manual_backward(losses.sum() / size)
        if self.is_private or size > 0:  # an empty Poisson batch still releases noise under DP
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.is_private:
            self.log_epsilon()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if self.log_train_loss and size > 0:
            self.log("train_loss", total / size, prog_bar=True, batch_size=size)

    def _refuse_update(self, message: str) -> None:
        if not self.is_private:
            raise FloatingPointError(message)
        self.engine.abort_update(message)

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

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        check_checkpoint_matches(self, checkpoint)  # Lightning and `load_run` call this before loading the weights
        super().on_load_checkpoint(checkpoint)

    def teardown(self, stage: str) -> None:
        self._end_eval_mode_silence()  # a fit that failed before training started
        if self.is_private:
            self.engine.detach()



def constructor_arguments(cls: type) -> List[str]:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s and, through ``**kwargs``, its bases' (the task
    modules pass the training options on to :class:`DPPrefixModule`)."""
    names: List[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names
