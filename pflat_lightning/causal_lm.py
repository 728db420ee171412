"""``PrefixTunedCausalLM``: DP prefix tuning of a frozen causal LM for conditional generation."""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.text import BLEUScore, Perplexity, ROUGEScore

from pflat_lightning.callbacks.teacher_distillation import TeacherDistillation
from pflat_lightning.module import DPPrefixModule
from pflat_lightning.prefix import PrefixConfig, record_initialisation
from pflat_lightning.prefix_model import PrefixCausalLM, load_backbone
from pflat_lightning.pretrained import load_pretrained

STAGES = ("val", "test")


class PrefixTunedCausalLM(DPPrefixModule):
    """A frozen causal LM (any decoder family: Llama, Qwen, Gemma, Mistral, Phi-3, OLMo 2, GPT-2, OPT, ...) whose
    only trainable part is a prefix, trained to continue a source text with its target (data-to-text, dialogue).

    Training scores only the target tokens (``labels != -100``) and gives DP one loss per example: the mean
    negative log-likelihood of that example's target tokens. Everything private (Poisson sampling,
    per-example clipping, calibrated noise, epsilon in the progress bar, checkpoints, the privacy report)
    comes from :class:`~pflat_lightning.module.DPPrefixModule`, as for the classifier, and so do the
    flattening callbacks (``TeacherDistillation`` with its prefix distance; its logit term is refused, see
    below).

    Validation and test log ``{stage}_loss`` (the mean per-example loss), ``{stage}_ppl`` (perplexity: the
    exponential of the mean target-token NLL, weighted by tokens across the whole split) and, on greedy
    generations of ``generate_max_new_tokens`` tokens for the first ``num_generation_batches`` batches,
    ``{stage}_bleu`` (corpus BLEU-4 against every reference) and ``{stage}_rougeL`` (ROUGE-L F-measure
    against the best reference). The first ``num_samples`` generations of each evaluation go to the log
    and to the ``samples`` section of the privacy report.

    Batches are dicts with ``input_ids``, ``attention_mask`` (right-padded source + separator + target) and
    ``labels`` (``-100`` where not scored); evaluation batches add the LEFT-padded prompt
    ``source_input_ids``/``source_attention_mask`` and ``references`` (a list of reference strings per
    example), as :class:`~pflat_lightning.datamodules.TextGenerationDataModule` gives them.

    Args:
        backbone: a Hugging Face causal LM id or folder, or a bundled name (``"bundled-smollm2"``).
        prefix: the prefix's length, reparametrisation and initialisation; with ``init_text`` (Li & Liang) the
            un-tuned model reads like the plain LM continuing that text, where a random prefix disturbs every
            layer. ``None`` means ``PrefixConfig()``.
        generate_max_new_tokens: tokens generated per example for BLEU and ROUGE-L.
        num_generation_batches: evaluation batches (from the first) whose prompts are generated from; 0
            turns BLEU, ROUGE-L and samples off (generation is the slow part of evaluation on a CPU).
        num_samples: generations shown in the log and the report per evaluation.
        backbone_kwargs: the backbone's ``from_pretrained`` keywords (:func:`~pflat_lightning.prefix_model.load_backbone`).
        kwargs: :class:`~pflat_lightning.module.DPPrefixModule`'s training options (``privacy``, ``optimizer``,
            ``lr_scheduler``, ``max_physical_batch_size``, ``log_train_loss``, ``epsilon_every_n_steps``).

    Raises:
        ValueError: for a backbone that is not a causal LM, a negative generation setting, or, at fit
            start, a ``TeacherDistillation`` with ``logit_weight > 0`` (its KL term compares class
            distributions, one per example; a causal LM has one per token).

    Example::

        model = PrefixTunedCausalLM("bundled-smollm2",
                                    prefix=PrefixConfig(init_text="A line of a film, then its reply:"),
                                    privacy=PrivacyConfig(target_epsilon=8.0))
        data = TextGenerationDataModule("movie_dialog", tokenizer="bundled-smollm2", batch_size=64)
        trainer = pl.Trainer(max_epochs=3)
        trainer.fit(model, datamodule=data)
        out = model.generate(prompt_ids, prompt_mask, max_new_tokens=20)   # prompts + continuations
    """

    RELEASE_ARGS = ("backbone", "prefix", "generate_max_new_tokens")

    def __init__(
        self,
        backbone: str = "bundled-smollm2",
        *,
        prefix: Optional[PrefixConfig] = None,
        generate_max_new_tokens: int = 20,
        num_generation_batches: int = 1,
        num_samples: int = 3,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value, least in (("generate_max_new_tokens", generate_max_new_tokens, 1),
                                   ("num_generation_batches", num_generation_batches, 0),
                                   ("num_samples", num_samples, 0)):
            if value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value}.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        load = partial(load_backbone, head="causal_lm", **(backbone_kwargs or {}))
        backbone_model, self.tokenizer = load_pretrained(backbone, load)
        self.model = PrefixCausalLM(backbone_model, prefix, tokenizer=self.tokenizer)
        record_initialisation(self.ledger, self.model.prefix.config)
        self.generate_max_new_tokens = generate_max_new_tokens
        self.num_generation_batches = num_generation_batches
        self.num_samples = num_samples
        for stage in STAGES:
            setattr(self, f"{stage}_perplexity", Perplexity())
            setattr(self, f"{stage}_bleu", BLEUScore(n_gram=4))
            # Without a stemmer ROUGE needs no nltk: lower-cased alphanumeric words split on spaces.
            setattr(self, f"{stage}_rouge", ROUGEScore(rouge_keys="rougeL", accumulate="best"))
        self._generated = {stage: 0 for stage in STAGES}

    # ------------------------------------------------------------------ model
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(batch, length, vocab)`` with the prefix in the cache."""
        return self.model(input_ids, attention_mask)

    def token_log_probs(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs, mask)``, both ``(batch, length)``: the log-probability of each target token given the
        prefix and the tokens before it, and which positions are scored target tokens (0 elsewhere)."""
        return self.model.target_log_probs(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def example_losses(self, batch: Dict[str, Any]) -> torch.Tensor:
        """One loss per example, as DP needs: the mean NLL of the example's target tokens, plus the
        per-example terms that callbacks registered in ``loss_terms`` (they receive the vocabulary logits of
        the scored tokens, one row per token, and the per-example prefix of this forward)."""
        log_probs, mask, logits, prefix = self.model.target_log_probs(
            batch["input_ids"], batch["attention_mask"], batch["labels"], return_logits=True
        )
        losses = _mean_nll(log_probs, mask)
        for term in self.loss_terms:
            losses = losses + term(batch, logits, prefix)
        return losses

    def generate(
        self, source_input_ids: torch.Tensor, source_attention_mask: torch.Tensor, **generate_kwargs: Any
    ) -> torch.LongTensor:
        """Continue LEFT-padded prompts with Hugging Face ``generate`` and the prefix in the cache; returns the
        prompts followed by the new tokens. The tokenizer's pad and end tokens are the defaults;
        ``generate_kwargs`` (``max_new_tokens``, ``do_sample``, ...) go to ``generate``."""
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        defaults = {"eos_token_id": eos, "pad_token_id": pad}
        return self.model.generate(source_input_ids, source_attention_mask, **{**defaults, **generate_kwargs})

    def generate_text(self, batch: Dict[str, Any], **generate_kwargs: Any) -> List[str]:
        """The greedy continuations (``generate_max_new_tokens`` tokens unless told otherwise) of a batch's
        prompts, as text."""
        prompts = batch["source_input_ids"]
        kwargs = {"max_new_tokens": self.generate_max_new_tokens, "do_sample": False, **generate_kwargs}
        output = self.generate(prompts, batch["source_attention_mask"], **kwargs)
        texts = self.tokenizer.batch_decode(output[:, prompts.shape[1]:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    # ------------------------------------------------------------------ setup
    def configure_callbacks(self) -> List[Callback]:
        # Checked here, before any callback's setup runs (a teacher would be trained first).
        for callback in self.trainer.callbacks:
            if isinstance(callback, TeacherDistillation) and callback.logit_weight > 0:
                raise ValueError(
                    f"TeacherDistillation(logit_weight={callback.logit_weight}) cannot be used with "
                    f"{type(self).__name__}: its KL term compares one class distribution per example, a causal LM "
                    "predicts one per token. Use logit_weight=0 (the prefix distance term works)."
                )
        return []

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Dict[str, Any], batch_idx: int, stage: str) -> None:
        size = batch["labels"].shape[0]
        log_probs, mask, logits, _ = self.model.target_log_probs(
            batch["input_ids"], batch["attention_mask"], batch["labels"], return_logits=True
        )
        self.log(f"{stage}_loss", _mean_nll(log_probs, mask).mean(), prog_bar=True, batch_size=size, sync_dist=True)
        if logits.shape[0] > 0:
            perplexity = getattr(self, f"{stage}_perplexity")
            perplexity.update(logits.unsqueeze(0), batch["labels"][mask].unsqueeze(0))
            self.log(f"{stage}_ppl", perplexity, prog_bar=True, batch_size=size)
        if batch_idx < self.num_generation_batches:
            generated = self.generate_text(batch)
            getattr(self, f"{stage}_bleu").update(generated, batch["references"])
            getattr(self, f"{stage}_rouge").update(generated, batch["references"])
            if self._generated[stage] < self.num_samples:
                self._record_samples(batch, generated, stage)
            self._generated[stage] += len(generated)

    def _record_samples(self, batch: Dict[str, Any], generated: List[str], stage: str) -> None:
        count = min(self.num_samples - self._generated[stage], len(generated))
        prompts = self.tokenizer.batch_decode(batch["source_input_ids"][:count], skip_special_tokens=True)
        samples = [{"source": prompt.strip(), "generated": text, "references": references}
                   for prompt, text, references in zip(prompts, generated, batch["references"])]
        self.report_sections.setdefault("samples", {}).setdefault(stage, []).extend(samples)
        for sample in samples:
            rank_zero_info(f"[{stage} sample] {sample['source']!r} -> {sample['generated']!r} "
                           f"(reference: {sample['references'][0]!r})")

    def _log_generation_metrics(self, stage: str) -> None:
        if self._generated[stage] == 0:
            return
        bleu, rouge = getattr(self, f"{stage}_bleu"), getattr(self, f"{stage}_rouge")
        self.log(f"{stage}_bleu", bleu.compute(), prog_bar=True)
        self.log(f"{stage}_rougeL", rouge.compute()["rougeL_fmeasure"], prog_bar=True)
        self._generated[stage] = 0

    def _start_evaluation(self, stage: str) -> None:
        self._generated[stage] = 0
        if self.num_samples > 0 and self.num_generation_batches > 0:
            self.report_sections.setdefault("samples", {})[stage] = []

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._start_evaluation("test")

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_generation_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_generation_metrics("test")


def _mean_nll(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each example's mean negative log-likelihood over its scored tokens (0 for an example without any)."""
    return -log_probs.sum(1) / mask.sum(1).clamp(min=1)
