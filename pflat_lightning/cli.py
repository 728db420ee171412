"""``pflat``: the command line of pflat-lightning.

``pflat fit|validate|test --config FILE`` is a LightningCLI; the commands in :data:`COMMANDS` work on a
trained run (``--config`` + ``--ckpt_path``) or serve a model, each implemented next to what it runs.
"""
from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pflat_lightning.privacy.report import seeded_only


class PflatCLI(LightningCLI):
    """LightningCLI over every pflat task: the YAML (or ``--model``/``--data``) picks the module and the
    datamodule by ``class_path`` (``PrefixTunedClassifier`` + ``TextClassificationDataModule``,
    ``PrefixTunedCausalLM`` + ``TextGenerationDataModule``), and the datamodule tokenises with the model's
    own tokenizer (``model.init_args.backbone`` -> ``data.init_args.tokenizer``; the classifier's
    ``num_labels`` likewise). A link whose argument a chosen class lacks is skipped."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")
        parser.link_arguments("model.init_args.num_labels", "data.init_args.num_labels")

    def after_fit(self) -> None:
        """Evaluate on the test split and say where the privacy report is."""
        if self.trainer.interrupted or self.datamodule is None:
            return
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        report = self.model.privacy_report()
        epsilon = "none (non-private)" if report["epsilon"] is None else f"{report['epsilon']:.3f}"
        folder = self.model.report_dir
        metrics = report["metrics"]
        shown = ", ".join(f"{label} {metrics[key]:.4f}" for key, label in RESULT_METRICS.items() if key in metrics)
        if report["formal_guarantee"]:
            guarantee = "yes"
        elif seeded_only(report["reasons"]):
            guarantee = "no (seeded, reproducible noise and batches; train with secure_mode=True for one)"
        else:
            guarantee = "no (reasons in the report)"
        print(
            f"\nResult: {shown}, epsilon {epsilon}, formal guarantee {guarantee}.\n"
            f"Privacy report: {folder}/privacy_report.md (and .json)"
        )


#: What ``pflat fit`` prints after the test, when the task logs it: metric -> label.
RESULT_METRICS = {
    "test_acc": "test accuracy",
    "val_acc": "validation accuracy",
    "test_ppl": "test perplexity",
    "val_ppl": "validation perplexity",
    "test_bleu": "test BLEU",
    "test_rougeL": "test ROUGE-L",
}


#: ``pflat NAME ...`` besides LightningCLI's subcommands: NAME -> "module:function(argv)".
COMMANDS = {
    "audit": "pflat_lightning.attacks.cli:main",
    "export": "pflat_lightning.release:main",
    "landscape": "pflat_lightning.landscape.cli:main",
    "reproduce": "pflat_lightning.reproduce:main",
    "serve-scorer": "pflat_lightning.black_box.server:main",
}


def _cli(args: Optional[Sequence[str]], run: bool = True) -> PflatCLI:
    return PflatCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        run=run,
    )


#: Keys of a saved ``pflat fit`` config that belong to the fit command, not to the run's objects.
FIT_ONLY_KEYS = ("ckpt_path", "weights_only")


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """A command's own arguments and, after ``--``, the ``pflat fit`` overrides of the run it works on."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def run_folder(ckpt_path: str | Path) -> Path:
    """The run folder of a checkpoint: the folder holding ``checkpoints/``, else the checkpoint's folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def load_run(
    config: Sequence[str], ckpt_path: Optional[str] = None, overrides: Sequence[str] = ()
) -> Tuple[pl.LightningModule, pl.LightningDataModule, pl.Trainer]:
    """The model, datamodule and trainer that ``pflat fit --config ...`` built, with the weights and the
    privacy state (accountant history, ledger) of ``ckpt_path`` when given.

    Args:
        config: the run's YAML config files, in order.
        ckpt_path: a checkpoint written by that run.
        overrides: further ``--key value`` arguments, as on the ``pflat fit`` command line.

    Raises:
        ValueError: when ``ckpt_path`` holds another model than the config builds, naming what differs.
    """
    args: List[str] = []
    for path in config:
        content = yaml.safe_load(Path(path).read_text()) or {}
        # The config.yaml that `pflat fit` saves also holds the fit command's own arguments.
        fit_only = [key for key in FIT_ONLY_KEYS if key in content]
        for key in fit_only:
            del content[key]
        args += ["--config", yaml.safe_dump(content) if fit_only else str(path)]
    cli = _cli([*args, *overrides], run=False)
    model, datamodule = cli.model, cli.datamodule
    if ckpt_path is not None:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
    return model, datamodule, cli.trainer


def main(args: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in COMMANDS:
            module, _, function = COMMANDS[argv[0]].partition(":")
            raise SystemExit(getattr(importlib.import_module(module), function)(argv[1:]))
        _cli(args)
    except SIGTERMException:
        # Lightning stops the loops with a SystemExit that carries no code, so a killed run would exit 0
        # and look finished to a shell, a scheduler or `&&`.
        print("pflat: stopped by SIGTERM before the run finished. Resume it from its last checkpoint with "
              "--ckpt_path (pflat reproduce: run the same command again).", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()
