"""``BlackBoxPromptTuner``: derivative-free DP prompt tuning of a model reachable only through a scorer.

The model is a black box (:class:`~pflat_lightning.black_box.scorers.PromptScorer`): continuous prompts
in, label-word logits out. As in Black-Box Tuning (Sun et al. 2022) the prompt is
``p = p0 + A z``: a low-dimensional vector ``z`` (``intrinsic_dim``, e.g. 500) mapped to the prompt
embeddings by a fixed random projection ``A`` regenerated from ``seed``. ``z`` is trained with a
differentially private zeroth-order gradient estimate (:class:`ZerothOrderMechanism`). Only the mechanism
differs from DP-SGD: the accountant, calibration, Poisson sampling, budget stop, checkpointed privacy state
and privacy report are :class:`~pflat_lightning.privacy.training.PrivateTraining`'s, as for
:class:`~pflat_lightning.module.DPPrefixModule`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from pflat_lightning.black_box.scorers import PromptScorer
from pflat_lightning.metrics import classification_metrics, log_classification
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.engine import PrivacyAccounting
from pflat_lightning.privacy.training import PrivateTraining

#: Checkpoint key of the tuner's own training state (the released estimate AWP steps along).
STATE_KEY = "pflat_black_box"


class ZerothOrderMechanism(PrivacyAccounting):
    """The Gaussian release of a batch's zeroth-order gradient estimate.

    Each example contributes a vector of ``q`` directional derivatives (two-point loss differences along
    the ``q`` directions the batch shares). Each vector is clipped to L2 norm ``max_grad_norm`` (Opacus'
    flat-clipping factor ``min(1, C / (norm + 1e-6))``), the clipped vectors are summed, Gaussian noise
    ``N(0, (noise_multiplier * C)^2 I_q)`` is added once, and the sum is divided by the expected batch
    size. Adding or removing one example moves the sum by at most ``C``: the sensitivity of DP-SGD's
    clipped sum, so the accountant, the noise calibration and the history are DP-SGD's
    (:class:`~pflat_lightning.privacy.engine.PrivacyAccounting`). Mapping the released vector back to
    prompt space through the (data-independent) directions is post-processing.

    Call :meth:`plan` once the dataset size and the planned steps are known, then :meth:`release` once
    per update (an empty Poisson batch gives a noise-only release).

    Args:
        config: the privacy parameters.

    Example::

        mechanism = ZerothOrderMechanism(PrivacyConfig(target_epsilon=8.0))
        mechanism.plan(dataset_size=8000, expected_batch_size=32, planned_steps=100)
        released = mechanism.release(differences)          # (B, q) -> (q,)
    """

    #: How per-example gradient information is obtained (the report's ``grad_sample_mode``).
    grad_sample_mode = "zeroth_order"

    def release(self, differences: torch.Tensor) -> torch.Tensor:
        """Clip each row of ``differences`` ``(B, q)``, sum, add the noise once, divide by the expected batch."""
        if differences.dim() != 2:
            raise ValueError(f"differences must have shape (batch, num_directions), got {tuple(differences.shape)}.")
        clip = self.config.max_grad_norm
        factors = (clip / (differences.norm(dim=1) + 1e-6)).clamp(max=1.0)
        total = (differences * factors[:, None]).sum(0)
        noise = self.noise(self.noise_multiplier * clip, total)
        self._count_release()
        self.updates += 1
        return (total + noise) / self.expected_batch_size


class BlackBoxPromptTuner(PrivateTraining):
    """Derivative-free (DP) prompt tuning through a forward-only scoring interface.

    The prompt ``p = p0 + A z`` (``num_prompt_tokens`` vectors of the model's embedding width) depends on
    a trainable ``z`` of ``intrinsic_dim`` entries through a fixed Gaussian projection ``A`` with entry
    std ``projection_scale * embedding_std / sqrt(intrinsic_dim)`` (BBT's scaling: ``z`` with unit-size
    entries gives prompts on the scale of the word embeddings). ``A`` is regenerated from ``seed``, never
    stored. Each training step draws ``num_directions`` (``q``) Gaussian directions ``u_k`` shared by the
    batch (from ``seed`` and the step number), asks the scorer for every example's loss at
    ``z +- smoothing * u_k``, and forms each example's vector of two-point differences
    ``(L_i(z + mu u_k) - L_i(z - mu u_k)) / (2 mu)``. Under DP these vectors are clipped, summed and
    noised once (:class:`ZerothOrderMechanism`); the released vector ``g`` becomes the estimate
    ``(1/q) sum_k g_k u_k`` in ``z``-space and the optimizer steps ``z``. ``PrivacyConfig(enabled=False)``
    is the non-private baseline: the plain mean of the unclipped vectors, no noise.

    The flattening ideas, without leaving the guarantee:

    - ``awp_gamma > 0``: adversarial weight perturbation in prompt space. The differences are taken at
      ``z + gamma * ||z|| * g_prev / ||g_prev||`` with ``g_prev`` the previous step's *released*
      estimate (post-processing, no privacy cost, DP-SAT's choice); the unperturbed ``z`` is updated.
    - ``distill_weight > 0`` with ``teacher_prompt``: the term ``lambda * ||z - z_teacher||`` towards a
      prompt tuned without privacy on public data (the same scorer, ``seed``, ``intrinsic_dim`` and
      ``num_prompt_tokens``). It does not depend on the private data, so its exact gradient is added
      after the noise, at no privacy cost; the ledger records the teacher as ``public``.

    Batches must carry the raw texts (``TextClassificationDataModule(keep_text=True)``): the scorer
    receives text. Epsilon is in the progress bar; a privacy report (``privacy_report.json``/``.md``)
    is written after fit and test; checkpoints carry the privacy state, so a resumed run keeps the spend.
    The report also says that the scorer sees the private texts in the clear: the guarantee covers what
    is released (the prompt and everything computed from it), with the scoring service trusted like
    the machine that runs DP-SGD.

    Args:
        scorer: the black box (:class:`~pflat_lightning.black_box.scorers.HuggingFaceScorer`,
            :class:`~pflat_lightning.black_box.scorers.HTTPScorer`, or any ``PromptScorer``).
        num_prompt_tokens: prompt length ``T``.
        intrinsic_dim: size of ``z``.
        projection_scale: the ``alpha`` of BBT's projection scale.
        seed: seed of the projection ``A`` and of the directions.
        num_directions: ``q``, directions per step (each costs two scorer evaluations of the batch).
        smoothing: ``mu``, the step of the two-point differences in ``z``-space.
        initial_prompt: ``p0``, shape ``(num_prompt_tokens, hidden_size)``; when ``None``, a Gaussian
            draw (from ``seed``) with entry std ``initial_prompt_scale * embedding_std``, the stand-in for
            BBT's random vocabulary embeddings, which a black-box client cannot read.
        initial_prompt_scale: see ``initial_prompt``; 0 gives a zero ``p0``. A zero prompt is a poor
            start for pre-norm models (Llama's RMSNorm): a prompt token's normalised input then depends
            only on the direction of ``A z``, so the loss is not differentiable at ``z = 0`` and two-point
            differences there compare two directions instead of measuring a slope.
        privacy: the privacy parameters; ``None`` means ``PrivacyConfig()`` (DP at epsilon 8).
            ``max_grad_norm`` clips each example's vector of ``q`` differences.
        optimizer: optimizer factory over ``[z]``.
        awp_gamma: relative size of the prompt-space perturbation (0 disables it).
        teacher_prompt: ``z_teacher``, shape ``(intrinsic_dim,)``, tuned on public data.
        distill_weight: ``lambda`` of the distillation term (needs ``teacher_prompt``).
        epsilon_every_n_steps: how often the progress bar's epsilon is recomputed.

    Raises:
        ValueError: for a bad argument (naming it, its value and what is allowed); at ``fit`` for a
            datamodule without raw texts, a non-Poisson loader under DP, an unbounded schedule, several
            processes, or resuming DP from a checkpoint without privacy state.

    Example::

        scorer = HuggingFaceScorer("bundled-smollm2", ["terrible", "great"], template="{text} It was")
        tuner = BlackBoxPromptTuner(scorer, privacy=PrivacyConfig(target_epsilon=8.0),
                                    optimizer=partial(torch.optim.SGD, lr=0.5))
        data = TextClassificationDataModule("movie_reviews", tokenizer="bundled-smollm2", keep_text=True,
                                            batch_size=32)  # the tuner has no tokenizer of its own
        pl.Trainer(max_steps=100).fit(tuner, datamodule=data)
    """

    MECHANISM = ZerothOrderMechanism

    def __init__(
        self,
        scorer: PromptScorer,
        *,
        num_prompt_tokens: int = 5,
        intrinsic_dim: int = 500,
        projection_scale: float = 1.0,
        seed: int = 0,
        num_directions: int = 4,
        smoothing: float = 0.5,
        initial_prompt: Optional[torch.Tensor] = None,
        initial_prompt_scale: float = 1.0,
        privacy: Optional[PrivacyConfig] = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        awp_gamma: float = 0.0,
        teacher_prompt: Optional[torch.Tensor] = None,
        distill_weight: float = 0.0,
        epsilon_every_n_steps: int = 10,
    ) -> None:
        super().__init__(privacy=privacy, epsilon_every_n_steps=epsilon_every_n_steps)
        if not isinstance(scorer, PromptScorer):
            raise ValueError(f"scorer must be a PromptScorer (info and label_logits), got {type(scorer).__name__}.")
        for name, value in (("num_prompt_tokens", num_prompt_tokens), ("intrinsic_dim", intrinsic_dim),
                            ("num_directions", num_directions)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        for name, value in (("projection_scale", projection_scale), ("smoothing", smoothing)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        for name, value in (("awp_gamma", awp_gamma), ("distill_weight", distill_weight),
                            ("initial_prompt_scale", initial_prompt_scale)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if (distill_weight > 0) != (teacher_prompt is not None):
            raise ValueError(
                f"distill_weight={distill_weight} and teacher_prompt={'given' if teacher_prompt is not None else None} "
                "disagree: distillation needs both a teacher_prompt and distill_weight > 0 (or neither)."
            )
        info = scorer.info
        shape = (num_prompt_tokens, info.hidden_size)
        if initial_prompt is not None and tuple(initial_prompt.shape) != shape:
            raise ValueError(f"initial_prompt must have shape (num_prompt_tokens, hidden_size) = {shape}, got "
                             f"{tuple(initial_prompt.shape)}.")
        if teacher_prompt is not None and tuple(teacher_prompt.shape) != (intrinsic_dim,):
            raise ValueError(f"teacher_prompt must have shape (intrinsic_dim,) = ({intrinsic_dim},), got "
                             f"{tuple(teacher_prompt.shape)}.")
        self.save_hyperparameters(ignore=["scorer", "optimizer", "initial_prompt", "teacher_prompt"])
        self.scorer = scorer
        self.optimizer_factory = optimizer
        self.num_directions, self.smoothing = num_directions, smoothing
        self.awp_gamma, self.distill_weight = awp_gamma, distill_weight
        self.seed = seed
        self.z = torch.nn.Parameter(torch.zeros(intrinsic_dim))
        generator = torch.Generator().manual_seed(seed)
        scale = projection_scale * info.embedding_std / math.sqrt(intrinsic_dim)
        self.register_buffer("projection", torch.randn(shape[0] * shape[1], intrinsic_dim, generator=generator) * scale,
                             persistent=False)
        if initial_prompt is None:
            initial_prompt = torch.randn(shape, generator=generator) * (initial_prompt_scale * info.embedding_std)
        self.register_buffer("initial_prompt", initial_prompt.float().clone())
        self.register_buffer("teacher_prompt", None if teacher_prompt is None else teacher_prompt.float().clone())
        #: The previous step's released estimate in ``z``-space (post-processing of the noisy release).
        self.released_estimate: Optional[torch.Tensor] = None
        #: Steps taken (updates, including noise-only ones); the directions of a step derive from it.
        self.steps_taken = 0
        self.evaluation = classification_metrics(info.num_labels)

    # ------------------------------------------------------------------ the prompt
    def prompts_of(self, points: torch.Tensor) -> torch.Tensor:
        """Prompts ``p0 + A z`` ``(n, T, H)`` of ``n`` points ``z`` ``(n, intrinsic_dim)``."""
        return self.initial_prompt + (points @ self.projection.T).view(len(points), *self.initial_prompt.shape)

    def directions_for(self, step: int) -> torch.Tensor:
        """The ``(q, intrinsic_dim)`` Gaussian directions of update ``step`` (from ``seed`` and ``step``, so
        a resumed run draws the same ones)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        return torch.randn(self.num_directions, self.z.numel(), generator=generator)

    def perturbation(self) -> torch.Tensor:
        """AWP's move of ``z``: ``gamma * ||z|| * g_prev / ||g_prev||`` along the previous released estimate
        (zero before the first release, without AWP, or when either norm is zero)."""
        z = self.z.detach()
        g = self.released_estimate
        if self.awp_gamma == 0 or g is None or float(g.norm()) == 0.0:
            return torch.zeros_like(z)
        return self.awp_gamma * z.norm() * g / g.norm()

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Label logits ``(B, num_labels)`` of ``texts`` under the current prompt."""
        return self.scorer.label_logits(self.prompts_of(self.z.detach()[None]), list(texts))[0].to(self.z.device)

    def distillation_gradient(self) -> torch.Tensor:
        """Exact gradient of ``distill_weight * ||z - z_teacher||`` (zero without a teacher or at it)."""
        if self.teacher_prompt is None:
            return torch.zeros_like(self.z)
        offset = self.z.detach() - self.teacher_prompt
        norm = offset.norm()
        return torch.zeros_like(offset) if norm == 0 else self.distill_weight * offset / norm

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        trainer = self.trainer
        if trainer.world_size > 1:
            raise ValueError(f"BlackBoxPromptTuner runs in one process; got Trainer with world_size={trainer.world_size}.")
        datamodule = trainer.datamodule
        if datamodule is not None and getattr(datamodule, "keep_text", True) is False:
            raise ValueError(
                "BlackBoxPromptTuner sends raw text to the scorer: build the datamodule with keep_text=True "
                "(TextClassificationDataModule(..., keep_text=True)), got keep_text=False."
            )
        super().setup(stage)
        self.report_sections["BlackBoxPromptTuner"] = {
            "scorer": self.scorer.info.to_json(),
            "num_prompt_tokens": self.hparams.num_prompt_tokens,
            "intrinsic_dim": self.hparams.intrinsic_dim,
            "projection_scale": self.hparams.projection_scale,
            "seed": self.seed,
            "num_directions": self.num_directions,
            "smoothing": self.smoothing,
            "awp_gamma": self.awp_gamma,
            "distill_weight": self.distill_weight,
            "trust": "the scorer receives the private texts in the clear; the guarantee covers the released prompt "
                     "and everything computed from it",
        }
        if not self.is_private:
            return
        if self.awp_gamma > 0:
            self.ledger.record("prompt-space AWP", "accounted", "perturbation along the previous step's released noisy "
                               "estimate (post-processing, no extra cost)")
        if self.teacher_prompt is not None:
            self.ledger.record("prompt distillation", "public", "teacher prompt tuned without noise on public data; the "
                               "data-independent term's exact gradient is added after the noise")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([self.z])
        if self.is_private:
            dataset_size, expected_batch, planned = self.plan_private_fit()
            self.engine.plan(dataset_size=dataset_size, expected_batch_size=expected_batch, planned_steps=planned)
            self.announce_plan("Black-box DP zeroth-order tuning")
        return optimizer

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        # Without DP too: steps_taken counts every logical step (the directions of a step derive from it).
        self.resume_poisson_epoch(self.steps_taken)

    def example_differences(self, point: torch.Tensor, directions: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        """Each example's two-point differences ``(B, q)`` at ``point`` along ``directions`` (``2q`` scorings)."""
        labels = batch["labels"]
        size, q = labels.shape[0], directions.shape[0]
        if size == 0:
            return directions.new_zeros(0, q)
        points = torch.cat([point + self.smoothing * directions, point - self.smoothing * directions])
        logits = self.scorer.label_logits(self.prompts_of(points), list(batch["text"])).to(point.device)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(2 * q), reduction="none").view(2 * q, size)
        if not bool(torch.isfinite(losses).all()):
            raise FloatingPointError(
                f"Non-finite loss from the scorer at step {self.steps_taken}; the update was not applied."
            )
        return ((losses[:q] - losses[q:]) / (2 * self.smoothing)).T

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        if "text" not in batch:
            raise ValueError(
                f"BlackBoxPromptTuner needs the raw texts in each batch (key 'text'); the batch has {sorted(batch)}. "
                "Use TextClassificationDataModule(keep_text=True)."
            )
        optimizer = self.optimizers()
        size = batch["labels"].shape[0]
        if not self.is_private and size == 0:
            return
        directions = self.directions_for(self.steps_taken).to(self.z.device)
        point = self.z.detach() + self.perturbation()
        differences = self.example_differences(point, directions, batch)
        released = self.engine.release(differences) if self.is_private else differences.mean(0)
        self.released_estimate = directions.T @ released / self.num_directions
        self.z.grad = self.released_estimate + self.distillation_gradient()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        if self.is_private:
            self.log_epsilon()

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Dict[str, Any], stage: str) -> None:
        if batch["labels"].shape[0] == 0:
            return
        log_classification(self, self.evaluation, stage, self(batch["text"]), batch["labels"])

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATE_KEY] = {"steps_taken": self.steps_taken, "released_estimate": self.released_estimate}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY)
        if state is not None:
            self.steps_taken, self.released_estimate = state["steps_taken"], state["released_estimate"]
