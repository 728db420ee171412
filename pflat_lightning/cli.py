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


    def after_fit(self) -> None:
        """Evaluate on the test split and say where the privacy report is."""
        if self.trainer.interrupted or self.datamodule is None:
            return
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        report = self.model.privacy_report()
        epsilon = "none (non-private)" if report["epsilon"] is None else f"{report['epsilon']:.3f}"
        folder = self.trainer.log_dir or self.trainer.default_root_dir
        print(
            f"\nResult: test accuracy {report['metrics'].get('test_acc', float('nan')):.4f}, "
            f"validation accuracy {report['metrics'].get('val_acc', float('nan')):.4f}, epsilon {epsilon}, "
            f"formal guarantee {'yes' if report['formal_guarantee'] else 'no'}.\n"
            f"Privacy report: {folder}/privacy_report.md (and .json)"
        )


def main(args=None) -> None:
    PflatCLI(
        PrefixTunedClassifier,
        TextClassificationDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
