"""A ``pflat fit`` run, rebuilt: its model, datamodule and trainer from its config and checkpoint.

What ``pflat audit``, ``pflat landscape``, ``pflat reproduce`` and ``pflat export`` work on, and what a
script uses to pick up a finished run::

    from pflat_lightning.runs import load_run

    run = "runs/movie_reviews_dp/lightning_logs/version_0"
    model, datamodule, trainer = load_run([f"{run}/config.yaml"], f"{run}/checkpoints/epoch=2-step=99.ckpt")

:class:`RunCLI` is the one parser of a run's config (``pflat fit`` extends it with the command line).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class RunCLI(LightningCLI):
    """The LightningCLI that builds a pflat run from its config.

    The YAML (or ``--model``/``--data``) picks the module and the datamodule by ``class_path``
    (``PrefixTunedClassifier`` + ``TextClassificationDataModule``, ``PrefixTunedCausalLM`` +
    ``TextGenerationDataModule``), and the datamodule tokenises with the model's own tokenizer
    (``model.init_args.backbone`` -> ``data.init_args.tokenizer``; the classifier's ``num_labels``
    likewise). A link whose argument a chosen class lacks is skipped.

    A config that does not parse raises :class:`argparse.ArgumentError` (jsonargparse's message) instead of
    exiting, so that a caller decides how to report it.

    Args:
        args: the ``pflat fit`` command line (``None``: ``sys.argv``).
        run: whether to run the subcommand (``fit``, ``test``, ...) or only build the objects.
        **kwargs: further :class:`~lightning.pytorch.cli.LightningCLI` arguments.
    """

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None if args is None else list(args),
            run=run,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.tokenizer")
        parser.link_arguments("model.init_args.num_labels", "data.init_args.num_labels")


#: Keys of a saved ``pflat fit`` config that belong to the fit command, not to the run's objects.
FIT_ONLY_KEYS = ("ckpt_path", "weights_only")


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """A command's own arguments and, after ``--``, the ``pflat fit`` overrides of the run it works on."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def run_command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a command that works on a finished ``pflat fit`` run: its ``--config`` (repeatable) and a
    ``--ckpt_path`` it wrote; the command adds its own arguments, :func:`parse_run_command` parses."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Arguments after `--` are passed to the run's config like `pflat fit` overrides "
               "(e.g. `-- --data.eval_batch_size 32`).",
    )
    parser.add_argument("--config", action="append", required=True, help="the run's YAML config (repeatable, in order)")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by that run")
    return parser


def parse_run_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """The command's arguments in ``argv`` and, after ``--``, the run's ``pflat fit`` overrides; a
    ``--ckpt_path`` that is not a file is a usage error (``parser.error``: exit status 2)."""
    own, overrides = split_overrides(argv)
    args = parser.parse_args(own)
    if not Path(args.ckpt_path).is_file():
        parser.error(f"--ckpt_path {args.ckpt_path!r} is not a file.")
    return args, overrides


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
        argparse.ArgumentError: when the config and overrides do not parse (an unknown key, a bad value).
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
    with warnings.catch_warnings():
        # Lightning warns when `args` is given while sys.argv holds others: here they are another command's.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = RunCLI([*args, *overrides], run=False)
    model, datamodule = cli.model, cli.datamodule
    if ckpt_path is not None:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
    return model, datamodule, cli.trainer
