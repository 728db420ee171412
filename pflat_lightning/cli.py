"""``pflat``: the LightningCLI of pflat-lightning (``pflat fit|validate|test --config FILE``)."""
from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from pflat_lightning.classifier import PrefixTunedClassifier
from pflat_lightning.datamodules import TextClassificationDataModule


class PflatCLI(LightningCLI):
    """LightningCLI whose datamodule tokenises with the model's own tokenizer."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.backbone", "data.tokenizer")
        parser.link_arguments("model.num_labels", "data.num_labels")


def main(args=None) -> None:
    PflatCLI(
        PrefixTunedClassifier,
        TextClassificationDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
