"""What a classification task reports on its validation and test splits: the loss, the accuracy and the
macro-averaged F1 (each class's F1, averaged with equal weight), logged as ``val_loss``, ``val_acc``,
``val_f1`` and ``test_...``. Accuracy alone says little on imbalanced labels (sms_spam is 87 % ham, so
answering "ham" everywhere scores 87 %); macro-F1 of that answer is 47 %."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

#: The splits evaluated.
STAGES = ("val", "test")


def classification_metrics(num_labels: int) -> nn.ModuleDict:
    """One metric collection per stage, each logging ``<stage>_acc`` and ``<stage>_f1``."""
    return nn.ModuleDict({
        stage: MetricCollection({"acc": MulticlassAccuracy(num_labels, average="micro"),
                                 "f1": MulticlassF1Score(num_labels, average="macro")}, prefix=f"{stage}_")
        for stage in STAGES
    })


def log_classification(module: pl.LightningModule, metrics: nn.ModuleDict, stage: str, logits: torch.Tensor,
                       labels: torch.Tensor) -> None:
    """Updates ``stage``'s metrics with a batch and logs them (the epoch's values) with the batch's loss."""
    size = labels.shape[0]
    collection = metrics[stage]
    collection.update(logits, labels)
    module.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=size, sync_dist=True)
    module.log_dict(collection, prog_bar=True, batch_size=size)
