"""Datamodules, one file per task family."""
from pflat_lightning.datamodules.text_classification import TextClassificationDataModule
from pflat_lightning.datamodules.text_generation import TextGenerationDataModule

__all__ = ["TextClassificationDataModule", "TextGenerationDataModule"]
