"""``PrefixTunedClassifier``: DP prefix tuning of a frozen transformer for text classification."""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Literal, Optional

import torch
import torch.nn.functional as F

from pflat_lightning.families import family_for
from pflat_lightning.metrics import classification_metrics, log_classification
from pflat_lightning.module import DPPrefixModule
from pflat_lightning.prefix import PrefixConfig, record_initialisation
from pflat_lightning.prefix_model import MODEL_INPUTS, PrefixModel, label_word_ids, load_backbone
from pflat_lightning.pretrained import load_pretrained
from pflat_lightning.privacy.training import CHECKPOINT_KEY

#: ``CHECKPOINT_KEY`` is re-exported for the modules that import it from here.
__all__ = ["CHECKPOINT_KEY", "PrefixTunedClassifier"]


class PrefixTunedClassifier(DPPrefixModule):
    """A frozen transformer classifier whose only trainable parts are a prefix and a small head.

    With the default :class:`PrivacyConfig` every fit is DP-SGD through Opacus: Poisson-sampled
    logical batches (split into physical chunks of ``max_physical_batch_size``), per-example clipping,
    Gaussian noise calibrated so that the planned steps end at ``target_epsilon``, epsilon in the
    progress bar, and a privacy report (``privacy_report.json``/``.md`` in ``report_dir``); all of it
    comes from :class:`~pflat_lightning.module.DPPrefixModule`. ``PrivacyConfig(enabled=False)`` trains
    the identical model without privacy. Validation and test log the loss and the accuracy.

    Args:
        backbone: a Hugging Face model id or folder, or a bundled name (``"bundled-minilm"``).
        num_labels: number of classes.
        head: ``"linear"`` (pooled features into a trainable linear layer) or ``"label_words"``
            (LM-BFF prompting: the masked/causal LM's logits of one ``label_words`` entry per class;
            use it with a datamodule ``template`` such as ``"{text} It was {mask}."``).
        label_words: one word per class, e.g. ``["terrible", "great"]``.
        prefix: the prefix's length, reparametrisation and initialisation (from an instruction text with
            ``init_text``, for every head and family); ``None`` means ``PrefixConfig()``.
        backbone_kwargs: the backbone's ``from_pretrained`` keywords (:func:`~pflat_lightning.prefix_model.load_backbone`).
        kwargs: :class:`~pflat_lightning.module.DPPrefixModule`'s training options (``privacy``, ``optimizer``,
            ``lr_scheduler``, ``max_physical_batch_size``, ``log_train_loss``, ``epsilon_every_n_steps``).

    Example::

        model = PrefixTunedClassifier("bundled-minilm", num_labels=2,
                                      prefix=PrefixConfig(num_virtual_tokens=10),
                                      privacy=PrivacyConfig(target_epsilon=8.0))
        trainer = pl.Trainer(max_epochs=3)
        trainer.fit(model, datamodule=TextClassificationDataModule("movie_reviews"))
    """

    RELEASE_ARGS = ("backbone", "num_labels", "head", "label_words", "prefix")

    def __init__(
        self,
        backbone: str = "bundled-minilm",
        num_labels: int = 2,
        *,
        head: Literal["linear", "label_words"] = "linear",
        label_words: Optional[List[str]] = None,
        prefix: Optional[PrefixConfig] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        load = partial(load_backbone, head=head, **(backbone_kwargs or {}))
        model, self.tokenizer = load_pretrained(backbone, load)
        word_ids = None
        if head == "label_words":
            if not label_words:
                raise ValueError("head='label_words' needs label_words, one word per class.")
            word_ids = label_word_ids(self.tokenizer, label_words, family_for(model.config).label_word_prefix)
        self.model = PrefixModel(
            model,
            num_labels,
            head=head,
            label_word_ids=word_ids,
            mask_token_id=self.tokenizer.mask_token_id,
            prefix=prefix,
            tokenizer=self.tokenizer,
        )
        record_initialisation(self.ledger, self.model.prefix.config)
        self.evaluation = classification_metrics(num_labels)

    # ------------------------------------------------------------------ model
    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.model(input_ids, attention_mask, token_type_ids)

    def example_losses(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example (DP clips each example's gradient separately): cross-entropy plus the
        per-example terms that callbacks registered in ``loss_terms``."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if not self.loss_terms:
            return F.cross_entropy(self(**inputs), batch["labels"], reduction="none")
        logits, prefix = self.model(**inputs, return_prefix=True)
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        for term in self.loss_terms:
            losses = losses + term(batch, logits, prefix)
        return losses

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Dict[str, torch.Tensor], stage: str) -> None:
        logits = self(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        log_classification(self, self.evaluation, stage, logits, batch["labels"])

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")
