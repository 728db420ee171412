"""Releasing a trained model: a shareable artifact without the run's seeds, generator or optimizer state.

A checkpoint is for resuming: it holds the frozen backbone's weights, the optimizer, the hyperparameters
(``PrivacyConfig.seed`` among them) and the privacy state (accountant history and the noise generator's
full state), so whoever holds it can regenerate every noise draw of a seeded run. A release holds only:

- ``adapter.safetensors``: the trained modules (``model.trainable_modules()``: the prefix with its
  ``layer_mask``, and the linear head if any), nothing of the frozen backbone;
- ``release.json``: the task module's class and the arguments that rebuild its architecture onto the
  public backbone (:attr:`DPPrefixModule.RELEASE_ARGS`; the ``prefix`` as its :class:`PrefixConfig`'s fields),
  and the tokenisation settings of the run's
  datamodule that a user needs to predict the same (template, lengths, column names, and the label names
  of a datamodule already set up: the export never reads the data);
- ``privacy_report.json`` and ``.md``: the run's report reduced to an allowlist of accountant, guarantee,
  ledger and metric keys, with the noise generator named without its seed.

    pflat export --config RUN/config.yaml --ckpt_path CKPT --out DIR [-- extra pflat fit overrides]

Example::

    folder = export_release(model, "release/", datamodule=data)   # after trainer.fit(model, datamodule=data)
    model = load_release("release/")                               # eval mode, no privacy engine
    logits = model(**batch)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file, save_file

from pflat_lightning import __version__
from pflat_lightning.runs import load_run, parse_run_command, run_command_parser
from pflat_lightning.module import DPPrefixModule
from pflat_lightning.prefix import PrefixConfig
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.report import build_report, noise_generator, write_report

RELEASE_FORMAT = "pflat-release"
#: Version 2 holds the prefix's settings as one ``prefix`` (a :class:`PrefixConfig`'s fields); version 1, still
#: read, named them as the modules' own arguments ``num_virtual_tokens`` and ``prefix_hidden``.
RELEASE_VERSION = 2
READABLE_VERSIONS = (1, 2)
RELEASE_FILE = "release.json"
ADAPTER_FILE = "adapter.safetensors"
#: The report keys a release keeps: what the accountant spent, whether the guarantee holds and why, the
#: ledger and the metrics. Anything else a report may hold (callback sections with file paths or private
#: samples, seeds, keys added later) stays out until it is added here.
REPORT_KEYS = ("formal_guarantee", "reasons", "caveats", "epsilon", "delta", "target_epsilon", "noise_multiplier",
               "sample_rate", "steps", "epochs", "max_grad_norm", "clipping", "group_clip_bounds", "accountant", "poisson_sampling",
               "grad_sample_mode", "dataset_size", "accountant_history", "ledger", "metrics")
LEDGER_KEYS = ("component", "status", "detail")
#: The datamodule arguments a release keeps: how text becomes the model's input (never data files, splits
#: or seeds).
TOKENISATION_ARGS = ("tokenizer", "max_length", "template", "text_column", "text_pair_column", "label_column",
                     "separator", "max_source_length", "max_target_length", "source_column", "target_column")


def export_release(
    module: DPPrefixModule,
    folder: str | Path,
    *,
    report: Optional[Dict[str, Any]] = None,
    datamodule: Optional[pl.LightningDataModule] = None,
) -> Path:
    """Write the release of a trained ``module`` into ``folder`` (created; it must be empty) and return it.

    Args:
        module: a trained task module (:class:`PrefixTunedClassifier`, :class:`PrefixTunedCausalLM`).
        folder: where to write ``adapter.safetensors``, ``release.json`` and ``privacy_report.json``/``.md``.
        report: the run's privacy report; ``None`` means ``module.privacy_report()`` (the module must then
            be attached to the trainer that fitted it). Its accountant history must be the module's.
        datamodule: the run's datamodule, whose tokenisation settings go into ``release.json``.

    Raises:
        ValueError: for a non-empty ``folder``, a module class without ``RELEASE_ARGS``, a private module
            without privacy state (never trained, or loaded from a checkpoint without it), a module that
            is attached to no trainer when ``report`` is ``None``, or a report of another run. Nothing is
            written then.
    """
    folder = Path(folder)
    _check_empty(folder)
    cls = type(module)
    if not isinstance(module, DPPrefixModule) or not cls.RELEASE_ARGS:
        raise ValueError(f"{_class_path(cls)} cannot be released: export_release needs a "
                         "DPPrefixModule subclass that names its architecture's arguments in RELEASE_ARGS.")
    if module.is_private and module.engine.noise_multiplier is None:
        raise ValueError(
            "The module is private but holds no privacy state (accountant history): it was never trained, or was "
            "loaded from a checkpoint without its 'pflat_privacy' state. Its report would claim a spend that never "
            "happened; export a module trained here or loaded with that state."
        )
    if report is None:
        if module._trainer is None:
            raise ValueError("report=None needs the module attached to the trainer that fitted it (for its epochs "
                             "and steps); pass the run's report, or use export_checkpoint for a checkpoint.")
        report = module.privacy_report()
    history = [list(h) for h in module.engine.history] if module.is_private else []
    if [list(h) for h in report.get("accountant_history", [])] != history:
        raise ValueError(f"The report's accountant_history {report.get('accountant_history')} is not the module's "
                         f"{history}: pass the report of the run that trained this module.")
    released_report = _released_report(report, module.privacy)
    info = {
        "format": RELEASE_FORMAT,
        "format_version": RELEASE_VERSION,
        "module": _class_path(cls),
        "init_args": _init_args(module),
        "tokenisation": None if datamodule is None else _tokenisation(datamodule),
        "pflat_lightning_version": __version__,
    }
    tensors = _trainable_state(module)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    (folder / RELEASE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    write_report(released_report, folder)
    return folder


def load_release(folder: str | Path, **overrides: Any) -> DPPrefixModule:
    """The task module of a release, in eval mode with the released weights and no privacy engine
    (``PrivacyConfig(enabled=False)``: nothing trains).

    Args:
        folder: a folder written by :func:`export_release` or ``pflat export``.
        overrides: replacements of ``release.json``'s ``init_args``, e.g. ``backbone="/models/minilm"`` for
            a local copy of the public backbone.

    Raises:
        ValueError: for a folder that is not a release (or of another format version), an override that is
            not one of the release's arguments, or a backbone the adapter does not fit.
    """
    folder = Path(folder)
    path = folder / RELEASE_FILE
    if not path.is_file():
        raise ValueError(f"{folder} is not a release: it has no {RELEASE_FILE}.")
    info = json.loads(path.read_text())
    if info.get("format") != RELEASE_FORMAT or info.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} is not a {RELEASE_FORMAT} file of version {' or '.join(map(str, READABLE_VERSIONS))} "
                         f"(format {info.get('format')!r}, version {info.get('format_version')!r}).")
    # Only classes already imported are candidates: a release file never makes this process import a module.
    classes = _releasable_classes()
    cls = classes.get(info["module"])
    if cls is None:
        raise ValueError(f"{path} names module {info['module']!r}, which is not a releasable DPPrefixModule subclass "
                         f"imported in this process (known: {sorted(classes)}); import the module defining it first.")
    unknown = sorted(set(overrides) - set(cls.RELEASE_ARGS))
    if unknown:
        raise ValueError(f"load_release got {unknown}, which are not arguments of the release; allowed: "
                         f"{list(cls.RELEASE_ARGS)}.")
    args = {**_current_init_args(info["init_args"], info["format_version"]), **overrides}
    if isinstance(args.get("prefix"), dict):
        args["prefix"] = PrefixConfig(**args["prefix"])
    module = cls(**args, privacy=PrivacyConfig(enabled=False))
    adapter = folder / ADAPTER_FILE
    tensors = load_file(str(adapter))
    names = _trainable_names(module)
    for prefix, part in names.items():
        own = {key[len(prefix) + 1:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
        try:
            part.load_state_dict(own, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{adapter} does not fit the model built from {path} with "
                             f"{overrides or 'its init_args'}: {error}") from error
    stray = sorted(key for key in tensors if key.split(".")[0] not in names)
    if stray:
        raise ValueError(f"{adapter} holds tensors {stray} that no trainable module of "
                         f"{info['module']} has.")
    return module.eval()


def export_checkpoint(
    config: Sequence[str], ckpt_path: str | Path, folder: str | Path, overrides: Sequence[str] = ()
) -> Path:
    """``pflat export``: the release of a ``pflat fit`` run's checkpoint, with the report rebuilt from the
    checkpoint's accountant state and ledger (no metrics: a checkpoint holds none).

    Args:
        config: the run's YAML config files (its saved ``config.yaml``), in order.
        ckpt_path: a checkpoint written by that run.
        folder: where to write the release (created; it must be empty).
        overrides: further ``--key value`` arguments, as on the ``pflat fit`` command line.

    Raises:
        ValueError: for a missing checkpoint, a non-empty ``folder``, or a private run's checkpoint without
            privacy state; see also :func:`export_release`.
    """
    if not Path(ckpt_path).is_file():
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} is not a file.")
    _check_empty(Path(folder))
    module, datamodule, _ = load_run(config, str(ckpt_path), overrides)
    if module.is_private and not module._resumed:
        raise ValueError(
            f"ckpt_path={str(ckpt_path)!r} holds no privacy state ('pflat_privacy') but the run's config is private: "
            "its report cannot say what was spent. Export a checkpoint that the DP run itself wrote."
        )
    # Memory-mapped: only the progress counters are read (load_run already loaded the weights).
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    report = build_report(
        config=module.privacy,
        engine=module.engine,
        ledger=module.ledger,
        dataset_size=module.engine.dataset_size if module.is_private else None,
        epochs=checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"],
        steps=checkpoint["global_step"],
        metrics={},
    )
    return export_release(module, folder, report=report, datamodule=datamodule)


def _check_empty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"Refusing to export into {folder}: it is not an empty folder. Choose a new folder so that "
                         "nothing of another run (a checkpoint, its seeds) ends up next to the release.")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _releasable_classes() -> Dict[str, type]:
    """The imported :class:`DPPrefixModule` subclasses that name their ``RELEASE_ARGS``, by class path."""
    found: Dict[str, type] = {}
    pending = [DPPrefixModule]
    while pending:
        for sub in pending.pop().__subclasses__():
            pending.append(sub)
            if sub.RELEASE_ARGS:
                found[_class_path(sub)] = sub
    return found


def _init_args(module: DPPrefixModule) -> Dict[str, Any]:
    """The module's :attr:`~DPPrefixModule.RELEASE_ARGS` as JSON values; the prefix as every field of the config the
    model was built with, so that no later default changes the released architecture."""
    args = {name: module.hparams[name] for name in type(module).RELEASE_ARGS if name in module.hparams}
    if "prefix" in args:
        args["prefix"] = dataclasses.asdict(module.prefix.config)
    return args


def _current_init_args(args: Dict[str, Any], version: int) -> Dict[str, Any]:
    """A release's ``init_args`` as the current version names them."""
    if version >= 2:
        return args
    args = dict(args)
    args["prefix"] = {"num_virtual_tokens": args.pop("num_virtual_tokens"), "reparam_hidden": args.pop("prefix_hidden")}
    return args


def _trainable_names(module: DPPrefixModule) -> Dict[str, torch.nn.Module]:
    """The trainable modules by their name in ``module.model`` (``prefix``, ``classifier``)."""
    names = {id(part): name for name, part in module.model.named_modules()}
    return {names[id(part)]: part for part in module.model.trainable_modules()}


def _trainable_state(module: DPPrefixModule) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers (the prefix's ``layer_mask``) of the trainable modules only."""
    return {f"{prefix}.{key}": value.detach().cpu().contiguous()
            for prefix, part in _trainable_names(module).items() for key, value in part.state_dict().items()}


def _tokenisation(datamodule: pl.LightningDataModule) -> Dict[str, Any]:
    settings: Dict[str, Any] = {"datamodule": _class_path(type(datamodule))}
    settings.update({name: datamodule.hparams[name] for name in TOKENISATION_ARGS if name in datamodule.hparams})
    label_names = getattr(datamodule, "label_names", None)
    if label_names is not None:  # known once the datamodule is set up; export never reads the data for them
        settings["label_names"] = list(label_names)
    return settings


def _released_report(report: Dict[str, Any], config: PrivacyConfig) -> Dict[str, Any]:
    """``report`` reduced to :data:`REPORT_KEYS`, ledger entries to :data:`LEDGER_KEYS`, metrics to numbers;
    the noise generator named from ``config`` without its seed."""
    released: Dict[str, Any] = {key: report.get(key) for key in REPORT_KEYS}
    released["reasons"] = [str(reason) for reason in report.get("reasons", [])]
    released["ledger"] = [{key: str(entry.get(key)) for key in LEDGER_KEYS} for entry in report.get("ledger", [])]
    released["metrics"] = {str(k): float(v) for k, v in (report.get("metrics") or {}).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    released["noise_generator"] = noise_generator(config)
    released["callbacks"] = {}
    return released


def _parser() -> argparse.ArgumentParser:
    parser = run_command_parser(
        "pflat export",
        "Write a shareable release of a trained run: prefix + head (adapter.safetensors), the config that rebuilds "
        "them onto the public backbone (release.json) and the privacy report; no seeds, no generator or optimizer "
        "state, no data.",
    )
    parser.add_argument("--out", required=True, help="the release folder (new or empty)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pflat export`` with ``argv`` (without the command name); return the exit status."""
    parser = _parser()
    args, overrides = parse_run_command(parser, sys.argv[1:] if argv is None else argv)
    try:
        folder = export_checkpoint(args.config, args.ckpt_path, args.out, overrides)
    except ValueError as error:
        parser.error(str(error))
    print(f"Release of {args.ckpt_path} written to {folder}: {ADAPTER_FILE}, {RELEASE_FILE}, privacy_report.json/.md")
    return 0
