"""``pflat``: the command line of pflat-lightning.

``pflat fit|validate|test|predict --config FILE`` is a LightningCLI (:class:`~pflat_lightning.runs.RunCLI`);
the commands in :data:`COMMANDS` work on a trained run (``--config`` + ``--ckpt_path``) or serve a model,
each implemented next to what it runs. ``pflat --help`` lists both.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
import signal
import sys
from typing import List, Optional, Sequence, Tuple

from jsonargparse import ArgumentParser, DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pflat_lightning.privacy.report import seeded_only
from pflat_lightning.runs import RunCLI


class PflatCLI(RunCLI):
    """``pflat fit|validate|test|predict``: a :class:`~pflat_lightning.runs.RunCLI` that, after ``fit``,
    tests the model and says where the privacy report is."""

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
    "test_f1": "test macro-F1",
    "val_acc": "validation accuracy",
    "test_ppl": "test perplexity",
    "val_ppl": "validation perplexity",
    "test_bleu": "test BLEU",
    "test_rougeL": "test ROUGE-L",
}


#: ``pflat NAME ...`` besides LightningCLI's subcommands: NAME -> ("module:function(argv)", what it does).
COMMANDS = {
    "audit": ("pflat_lightning.attacks.cli:main", "Membership-inference audit of a trained run."),
    "export": ("pflat_lightning.release:main", "A shareable release of a trained run: prefix and head, no seeds."),
    "landscape": ("pflat_lightning.landscape.cli:main", "Loss landscape and sharpness of a trained run."),
    "reproduce": ("pflat_lightning.reproduce:main", "The paper's comparison: non-private, DP-SGD, Privacy-Flat."),
    "serve-scorer": ("pflat_lightning.black_box.server:main", "A causal LM's scores behind a JSON API (black box)."),
}


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the epilog's lines (the other commands) kept as written."""


def _other_commands() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(["other commands (`pflat NAME --help` for their options):", *lines])


def _allowed_keys(class_path: str) -> List[str]:
    """The arguments jsonargparse accepts for ``class_path`` (only its first level: ``optimizer``, not
    ``optimizer.init_args.lr``)."""
    module, _, name = class_path.rpartition(".")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(getattr(importlib.import_module(module), name))
    return list(dict.fromkeys(key.split(".")[0] for key in parser.get_defaults().keys()))


def _parse_error_summary(message: str) -> List[str]:
    """The first lines of a config error: the key at fault, where it is and, for an unknown key, the keys
    allowed there.

    jsonargparse nests the fault at the bottom of one indented block per enclosing key (``Parser key
    "model":`` ... ``Problem with given class_path 'X':`` ... ``Option 'k' is not accepted``); this follows
    that nesting to the innermost key. Empty when the message has no such nesting (it is one line then).
    """
    stack: List[Tuple[int, str, Optional[str]]] = []  # (indent, key, class_path when the key is init_args)
    deepest: List[str] = []
    for line in message.splitlines():
        text = line.lstrip(" -")
        indent = len(line) - len(text)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match := re.fullmatch(r'Parser key "(.+)":', text):
            stack.append((indent, match[1], None))
            if len(stack) > len(deepest):
                deepest = [key for _, key, _ in stack]
        elif match := re.fullmatch(r"Problem with given class_path '(.+)':", text):
            stack.append((indent, "init_args", match[1]))
        elif match := re.fullmatch(r"Option '(.+)' is not accepted", text):
            where = ".".join(key for _, key, _ in stack) or "the top level"
            class_path = next((path for _, _, path in reversed(stack) if path), None)
            summary = [f"pflat: unknown key '{match[1]}' in {where}" + (f" ({class_path})." if class_path else ".")]
            if class_path:
                try:
                    allowed = _allowed_keys(class_path)
                except Exception:  # a hint only: it must never hide the error it explains
                    return summary
                close = difflib.get_close_matches(match[1], allowed, n=1)
                summary.append(f"  {f'Did you mean {close[0]!r}? ' if close else ''}Allowed there: {', '.join(allowed)}.")
            return summary
    return [f"pflat: invalid value of {'.'.join(deepest)} (details below)."] if deepest else []


def main(args: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in COMMANDS:
            module, _, function = COMMANDS[argv[0]][0].partition(":")
            raise SystemExit(getattr(importlib.import_module(module), function)(argv[1:]))
        PflatCLI(args if argv else ["--help"], parser_kwargs={
            "prog": "pflat", "description": "Differentially private prefix tuning of frozen transformers.",
            "epilog": _other_commands(), "formatter_class": _HelpFormatter})
    except argparse.ArgumentError as error:
        # A config error (also from the run a command rebuilds): what to fix first, jsonargparse's nested
        # message after it, and no usage (50 lines of every Trainer option).
        # The commands in COMMANDS take the run's config and overrides of `pflat fit`.
        command = "fit" if argv and argv[0] in COMMANDS else next(
            (arg for arg in argv if arg in LightningCLI.subcommands()), None)
        tip = f"`pflat {command} --help` lists the options" if command else "`pflat --help` lists the commands"
        print(*_parse_error_summary(str(error)), f"error: {error}", f"tip: {tip}.", sep="\n", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning stops the loops with a SystemExit that carries no code, so a killed run would exit 0
        # and look finished to a shell, a scheduler or `&&`.
        print("pflat: stopped by SIGTERM before the run finished. Resume it from its last checkpoint with "
              "--ckpt_path (pflat reproduce: run the same command again).", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()
