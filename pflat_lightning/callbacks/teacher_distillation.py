"""Cross-model flattening: a teacher prefix regularises the private one."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from functools import partial
from typing import Any, Dict, List, Literal, Optional, Tuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from pflat_lightning.checkpointing import check_checkpoint_matches, trainable_state
from pflat_lightning.prefix_model import MODEL_INPUTS
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.protocol import (
    Cloneable,
    Distillable,
    PrunablePrefix,
    check_contract,
    privacy_engine,
    privacy_ledger,
    report_sections,
    untrained_clone,
)

SOURCES = ("checkpoint", "public", "private_dp", "private_nonprivate")
#: torch's CPU generator (Mersenne Twister) keeps the low 32 bits of a seed: seeds equal modulo this draw the same noise.
SEED_MODULUS = 2**32


def teacher_noise_seed(student_seed: int) -> int:
    """The noise seed of the default ``private_dp`` teacher: a hash of the student's, never equal to it.

    The accountant composes the teacher's and the student's releases as independent Gaussian mechanisms.
    Outside secure mode both noises come from seeded Mersenne Twister generators (the report then claims no
    formal guarantee: the seeds are reproducible), and the accounting models each stream as true Gaussian
    draws. Two generators seeded differently (the seed hashed, so that no simple relation such as
    ``seed + 1`` links the two initial states) are independent to that same standard: no known test on
    their outputs tells them from independent draws. One seed for both makes the two noises equal, and
    ``Y_teacher / sigma_T - Y_student / sigma_S`` a noise-free function of the private data. Under
    ``secure_mode`` both streams come from the OS's CSPRNG.
    """
    own = student_seed % SEED_MODULUS
    digest = hashlib.sha256(f"pflat_lightning teacher noise {own}".encode()).digest()
    seed = int.from_bytes(digest[:4], "little")
    return seed if seed != own else seed ^ 1


class TeacherDistillation(Callback):
    """Adds ``weight * ||P - P_teacher||`` (and optionally logit distillation) to each example's loss.

    ``P`` is the student's prefix (every active layer's keys and values), ``P_teacher`` a teacher
    prefix of the same architecture; the unsquared L2 distance with ``weight = 0.01`` is the paper's
    regulariser. The term is added to each example's loss before clipping, so DP clips it with the
    rest. With ``logit_weight > 0`` the KL divergence between the teacher's and the student's class
    distributions at ``temperature`` is added too. Teacher forward passes run without gradients and
    without Opacus hooks.

    Where the teacher comes from decides the privacy claim:

    - ``"checkpoint"``: a ``PrefixTunedClassifier`` checkpoint (assumed trained on public data).
    - ``"public"`` (default): trained here, before the student, on the datamodule's public split.
    - ``"private_dp"``: trained here with DP (``teacher_privacy``) on the private training data, with
      Poisson draws of its own (the datamodule's ``seed`` + 1) and a noise stream of its own (see
      :func:`teacher_noise_seed`); its releases are composed into the student's accountant and the
      student's noise is calibrated so that the total stays within the student's ``target_epsilon``.
    - ``"private_nonprivate"`` (the paper's choice): trained without noise on the private data. The
      ledger records it and the report says no formal guarantee holds.

    With ``warm_start=True`` the student also starts from the teacher's trainable parameters (post-processing of
    the teacher: no cost beyond the teacher's own). ``warm_start=True, weight=0`` is the "public data, no
    flattening" baseline of a public teacher: DP-SGD from a publicly trained prefix.

    The module declares :class:`~pflat_lightning.protocol.Distillable` (``loss_terms``,
    ``before_optimizers``, ``prefix``) and :class:`~pflat_lightning.protocol.Cloneable`
    (``clone_untrained(**overrides)``: the untrained teacher, given ``privacy=`` and ``optimizer=`` where its
    signature accepts them; :meth:`~pflat_lightning.module.DPPrefixModule.clone_untrained` shares the
    student's frozen backbone). A checkpoint teacher is read from the checkpoint's ``state_dict``: the entries
    named like the module's trainable parameters. Logit distillation calls the teacher with the batch's model inputs
    (``input_ids``, ``attention_mask``, ``token_type_ids``).

    Args:
        teacher: where the teacher comes from (see above).
        checkpoint_path: the teacher checkpoint for ``teacher="checkpoint"``.
        weight: ``lambda`` of the prefix distance term.
        logit_weight: weight of the logit-distillation (KL) term; 0 disables it.
        temperature: softmax temperature of logit distillation.
        warm_start: start the student from the teacher's trainable parameters (a fresh fit only: a resumed one
            keeps its checkpoint's).
        teacher_epochs: epochs of teacher training.
        teacher_lr: AdamW learning rate of teacher training.
        teacher_batch_size: (logical) batch size of teacher training.
        teacher_privacy: privacy of a ``"private_dp"`` teacher; default: half the student's target
            epsilon, a noise seed derived from the student's (:func:`teacher_noise_seed`), the rest of its
            settings. It must be private, and outside secure mode its ``seed`` must differ from the
            student's (modulo ``2**32``).

    Raises:
        TypeError: at fit setup, listing every member of the contract the module lacks.
        ValueError: for a bad argument; for ``teacher="private_dp"`` with a non-private ``teacher_privacy``
            at once; at fit start, for a ``teacher_privacy`` that would draw the student's noise, or a
            ``teacher="checkpoint"`` whose checkpoint holds another model than the student.

    Example::

        trainer = pl.Trainer(callbacks=[TeacherDistillation("public", weight=0.01)])
    """

    def __init__(
        self,
        teacher: Literal["checkpoint", "public", "private_dp", "private_nonprivate"] = "public",
        *,
        checkpoint_path: Optional[str] = None,
        weight: float = 0.01,
        logit_weight: float = 0.0,
        temperature: float = 2.0,
        warm_start: bool = False,
        teacher_epochs: int = 3,
        teacher_lr: float = 1e-2,
        teacher_batch_size: int = 64,
        teacher_privacy: Optional[PrivacyConfig] = None,
    ) -> None:
        if teacher not in SOURCES:
            raise ValueError(f"teacher must be one of {SOURCES}, got {teacher!r}.")
        if teacher == "checkpoint" and not checkpoint_path:
            raise ValueError("teacher='checkpoint' needs checkpoint_path.")
        for name, value in (("weight", weight), ("logit_weight", logit_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if teacher == "private_dp" and teacher_privacy is not None and not teacher_privacy.enabled:
            raise ValueError(
                f"teacher='private_dp' trains the teacher on the private data, so teacher_privacy must be private, got "
                f"{teacher_privacy!r}. Give a private PrivacyConfig (or None: half the student's budget), or use "
                "teacher='private_nonprivate', which the report records as unaccounted (no formal guarantee)."
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if teacher_epochs < 1 or teacher_batch_size < 1 or teacher_lr <= 0:
            raise ValueError(
                f"teacher_epochs and teacher_batch_size must be >= 1 and teacher_lr > 0, got {teacher_epochs}, "
                f"{teacher_batch_size}, {teacher_lr}."
            )
        self.source = teacher
        self.checkpoint_path = checkpoint_path
        self.weight = weight
        self.logit_weight = logit_weight
        self.temperature = temperature
        self.warm_start = warm_start
        self.teacher_epochs = teacher_epochs
        self.teacher_lr = teacher_lr
        self.teacher_batch_size = teacher_batch_size
        self.teacher_privacy = teacher_privacy
        #: The teacher's prefix and classifier weights (names as in ``PrefixModel``).
        self.teacher_state: Optional[Dict[str, torch.Tensor]] = None
        self._teacher: Optional[torch.nn.Module] = None
        self._student: Optional[torch.nn.Module] = None
        self._teacher_prefix: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
        self._term = None
        self._restored = False

    # ------------------------------------------------------------------ obtaining the teacher
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_contract(pl_module, Distillable, Cloneable, who=type(self).__name__)
        if self.source == "private_dp":  # refused before anything is trained or recorded
            if privacy_engine(pl_module) is None:
                raise ValueError("teacher='private_dp' composes into the student's accountant: the student must be private.")
            self._teacher_privacy(pl_module)
        ledger = privacy_ledger(pl_module)
        name = type(self).__name__
        details = {
            "checkpoint": ("public", f"teacher loaded from {self.checkpoint_path}, assumed trained without private data"),
            "public": ("public", "teacher trained on the public split"),
            "private_dp": ("accounted", "teacher trained with DP on the private data; its releases are composed "
                                        "into this run's accountant"),
            "private_nonprivate": ("unaccounted", "teacher trained WITHOUT noise on the private training data (the "
                                                  "paper's choice): the student's regulariser leaks it"),
        }
        if ledger is not None:  # also without DP: the report says what the model was started or pulled from
            status, detail = details[self.source]
            ledger.record(name, status, detail + ("; the student starts from the teacher's prefix" if self.warm_start else ""))
        # Lightning restores a checkpoint after setup: whether this fit resumes is known only then.
        self._restored = False
        if self._obtain_teacher not in pl_module.before_optimizers:
            pl_module.before_optimizers.append(self._obtain_teacher)

    def _obtain_teacher(self, pl_module: pl.LightningModule) -> None:
        if self._restored:
            return  # resumed: the teacher came back through load_state_dict, its spend through the engine
        trainer, engine = pl_module.trainer, privacy_engine(pl_module)
        if self.source == "private_dp" and engine is not None and engine.noise_multiplier is not None:
            raise ValueError(
                "Cannot add TeacherDistillation(teacher='private_dp') when resuming a run that had none: the "
                "checkpoint's noise was calibrated without the teacher's spend. Resume with the interrupted run's "
                "callbacks, or use teacher='public'."
            )
        if self.warm_start and trainer.ckpt_path is not None:
            raise ValueError(
                f"TeacherDistillation(warm_start=True) starts a fresh fit from the teacher's prefix, but this fit resumes "
                f"from {trainer.ckpt_path}, of a run without it: the warm start would overwrite the resumed weights. Resume "
                "with the interrupted run's callbacks, or drop warm_start."
            )
        if self.source == "checkpoint":
            checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            check_checkpoint_matches(pl_module, checkpoint, f"TeacherDistillation(checkpoint_path={self.checkpoint_path!r})")
            names = {n for n, p in pl_module.named_parameters() if p.requires_grad}
            self.teacher_state = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        else:
            # Every rank trains a teacher (no rank waits idle in a collective); rank 0's is used by all.
            self.teacher_state, history = trainer.strategy.broadcast(self._train_teacher(trainer, pl_module), src=0)
            if history:
                engine.prior_history = history
        if self.warm_start:
            self._start_from_teacher(pl_module)

    def _start_from_teacher(self, pl_module: pl.LightningModule) -> None:
        trainable = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        missing = sorted(set(trainable) - set(self.teacher_state))
        if missing:
            raise ValueError(f"TeacherDistillation(warm_start=True): the teacher has no {missing} to start the student from.")
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(self.teacher_state[name].to(parameter.device, parameter.dtype))

    def _teacher_privacy(self, pl_module: pl.LightningModule) -> PrivacyConfig:
        if self.source != "private_dp":
            return PrivacyConfig(enabled=False)
        student = privacy_engine(pl_module).config
        if self.teacher_privacy is not None:
            teacher = self.teacher_privacy
            # In secure mode a stream comes from the OS's generator, independent of any seed.
            if (not teacher.secure_mode and not student.secure_mode
                    and teacher.seed % SEED_MODULUS == student.seed % SEED_MODULUS):
                raise ValueError(
                    f"teacher_privacy.seed={teacher.seed} gives the teacher the student's noise stream (the student's "
                    f"seed is {student.seed}; seeds equal modulo 2**32 draw the same noise): both would add the same "
                    "noise, which cancels in a difference of their releases, and the accountant's composition of the "
                    f"two would not hold. Give teacher_privacy a seed that differs from {student.seed} modulo 2**32 "
                    f"(e.g. {teacher_noise_seed(student.seed)}), secure_mode=True, or teacher_privacy=None."
                )
            return teacher
        if student.target_epsilon is None:
            raise ValueError("teacher='private_dp' needs teacher_privacy when the student has no target_epsilon.")
        return dataclasses.replace(student, target_epsilon=student.target_epsilon / 2,
                                   seed=teacher_noise_seed(student.seed))

    def _train_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(f"TeacherDistillation(teacher={self.source!r}) needs the trainer's datamodule.")
        overrides = {"privacy": self._teacher_privacy(pl_module),
                     "optimizer": partial(torch.optim.AdamW, lr=self.teacher_lr, weight_decay=0.0)}
        teacher = untrained_clone(pl_module, **overrides)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank
        device = trainer.strategy.root_device
        with tempfile.TemporaryDirectory() as scratch:
            # The teacher's own privacy report goes next to the student's; other ranks' copies are discarded.
            folder = os.path.join(log_dir, "teacher") if trainer.is_global_zero else scratch
            nested = pl.Trainer(default_root_dir=folder, max_epochs=self.teacher_epochs, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0, accelerator=trainer.accelerator,
                                devices=[device.index] if device.type == "cuda" else 1)
            epochs = f"{self.teacher_epochs} epoch{'s' if self.teacher_epochs != 1 else ''}"
            rank_zero_info(f"TeacherDistillation: training the {self.source} teacher for {epochs}")
            if self.source == "public":
                nested.fit(teacher, train_dataloaders=datamodule.public_dataloader(self.teacher_batch_size, shuffle=True))
            else:
                saved = (datamodule.batch_size, datamodule.trainer)
                seed = getattr(datamodule, "seed", None)
                datamodule.batch_size = self.teacher_batch_size
                if seed is not None and self.source == "private_dp":
                    # The accountant composes the teacher's and the student's releases as independent
                    # mechanisms: the same Poisson draws at a smaller rate would make each teacher batch a
                    # subset of the student's batch at that step.
                    datamodule.seed = seed + 1
                try:
                    nested.fit(teacher, datamodule=datamodule)
                finally:
                    datamodule.batch_size, datamodule.trainer = saved
                    if seed is not None:
                        datamodule.seed = seed
        # The nested trainer's teardown moved the teacher to the CPU, and with it the backbone it may share with
        # the student: both go back to the student's device.
        teacher.to(pl_module.device)
        state = trainable_state(teacher)
        engine = privacy_engine(teacher)
        return state, list(engine.history) if engine is not None else []

    # ------------------------------------------------------------------ the regulariser
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = self._cloned_teacher(pl_module)
        teacher.eval()
        self._teacher, self._student = teacher, pl_module
        with torch.no_grad():
            self._teacher_prefix = [(k[:1], v[:1]) for k, v in teacher.prefix(1)]
        if self.weight > 0 or self.logit_weight > 0:  # both 0: a warm start alone, no term to compute
            self._term = self.example_terms
            pl_module.loss_terms.append(self._term)
        report_sections(pl_module)[type(self).__name__] = {"teacher": self.source, "weight": self.weight,
                                                           "logit_weight": self.logit_weight,
                                                           "temperature": self.temperature,
                                                           "warm_start": self.warm_start}

    def _cloned_teacher(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The trained teacher: an untrained clone of the module with the teacher's trainable parameters."""
        teacher = pl_module.clone_untrained().to(pl_module.device)
        expected = {n for n, p in teacher.named_parameters() if p.requires_grad}
        names = teacher.state_dict().keys()
        # Checkpoints written before clone_untrained named a library module's teacher tensors inside its `model`.
        state = {f"model.{k}" if k not in names and f"model.{k}" in names else k: v
                 for k, v in self.teacher_state.items()}
        loaded = teacher.load_state_dict(state, strict=False)
        wrong = sorted(expected - set(state)) + loaded.unexpected_keys
        if wrong:
            raise ValueError(f"The teacher does not match the student's architecture: {wrong}")
        teacher.requires_grad_(False)
        return teacher

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._term in pl_module.loss_terms:
            pl_module.loss_terms.remove(self._term)

    def example_terms(self, batch: Dict[str, torch.Tensor], logits: torch.Tensor, prefix) -> torch.Tensor:
        """Per-example ``weight * ||P_i - P_teacher|| (+ logit_weight * T^2 * KL)``; ``prefix`` is the
        per-example prefix of the student's forward that produced ``logits``."""
        student = self._student
        active = ([i for i, keep in enumerate(student.prefix_layer_mask()) if keep]
                  if isinstance(student, PrunablePrefix) else range(len(self._teacher_prefix)))
        squared = sum(((prefix[i][0] - self._teacher_prefix[i][0]) ** 2).flatten(1).sum(1)
                      + ((prefix[i][1] - self._teacher_prefix[i][1]) ** 2).flatten(1).sum(1) for i in active)
        terms = self.weight * torch.sqrt(squared + 1e-12)
        if self.logit_weight > 0:
            with torch.no_grad():
                inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
                teacher_logits = self._teacher(**inputs)
            t = self.temperature
            kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), log_target=True,
                          reduction="none").sum(-1)
            terms = terms + self.logit_weight * t * t * kl
        return terms

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"teacher_state": self.teacher_state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.teacher_state = state_dict["teacher_state"]
        self._restored = self.teacher_state is not None
