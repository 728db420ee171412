"""Datamodules, one file per task family."""
from pflat_lightning.datamodules.text_classification import TextClassificationDataModule

__all__ = ["TextClassificationDataModule"]
