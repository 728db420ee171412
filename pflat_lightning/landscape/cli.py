"""``pflat landscape``: the loss landscape and sharpness of a saved run's checkpoint.

    pflat landscape --config RUN.yaml --ckpt_path CKPT [--data validation] [--out DIR] [options]
                    [-- extra pflat fit overrides]

Rebuilds the run with :func:`pflat_lightning.runs.load_run`, measures as the
:class:`~pflat_lightning.callbacks.LossLandscape` callback does, writes ``landscape.json`` and the PNGs
into ``--out`` (default: ``landscape/`` of the run folder, the folder holding ``checkpoints/``), adds
the ``LossLandscape`` section (and, for ``--data private``, an ``evaluation`` ledger entry) to the run
folder's ``privacy_report.json``/``.md`` when there is one, and prints the numbers.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pflat_lightning.callbacks.loss_landscape import LossLandscape
from pflat_lightning.landscape.measures import (
    DATA_SPLITS,
    DEFAULT_ALPHAS,
    PRIVATE_EVALUATION,
    SECTION,
    LandscapeSettings,
    landscape_section,
    split_loader,
)
from pflat_lightning.privacy.report import add_section
from pflat_lightning.runs import load_run, parse_run_command, run_command_parser, run_folder


def _parser() -> argparse.ArgumentParser:
    defaults = LandscapeSettings()
    parser = run_command_parser("pflat landscape", "Loss landscape and sharpness of a trained pflat run.")
    parser.add_argument("--data", default="validation", choices=DATA_SPLITS, help="evaluation split")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/landscape)")
    parser.add_argument("--num_batches", type=int, default=4, help="evaluation batches averaged over")
    parser.add_argument("--alphas", type=float, nargs="+", default=DEFAULT_ALPHAS, help="grid of the curve")
    parser.add_argument("--radius", type=float, default=defaults.radius, help="curve step length at alpha = 1")
    parser.add_argument("--sam_rho", type=float, default=defaults.sam_rho, help="relative radius of SAM sharpness")
    parser.add_argument("--sam_steps", type=int, default=defaults.sam_steps, help="SAM projected ascent steps")
    parser.add_argument("--slice_1d_points", type=int, default=defaults.slice_1d_points, help="0: no 1-D slice")
    parser.add_argument("--slice_2d_points", type=int, default=defaults.slice_2d_points, help="0: no 2-D slice")
    parser.add_argument("--span", type=float, default=defaults.span, help="extent of the random slices")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random slices")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``pflat landscape`` with the arguments ``argv`` (without the command name); returns the exit code."""
    parser = _parser()
    args, overrides = parse_run_command(parser, argv)
    try:
        landscape = LossLandscape(args.data, num_batches=args.num_batches, alphas=args.alphas, radius=args.radius,
                                  sam_rho=args.sam_rho, sam_steps=args.sam_steps, slice_1d_points=args.slice_1d_points,
                                  slice_2d_points=args.slice_2d_points, span=args.span, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))

    model, datamodule, trainer = load_run(args.config, args.ckpt_path, overrides)
    datamodule.setup("fit")
    model.to(trainer.strategy.root_device)
    folder = run_folder(args.ckpt_path)
    out = Path(args.out) if args.out is not None else folder / "landscape"
    files = landscape.measure(model, split_loader(datamodule, args.data), out)
    result, settings = landscape.result, landscape.settings
    section = {**landscape_section(result), "folder": str(out), "checkpoint": str(Path(args.ckpt_path).resolve())}
    report = add_section(folder, SECTION, section, evaluation=PRIVATE_EVALUATION if args.data == "private" else None,
                         run_id=getattr(model, "run_id", None))

    print(f"Loss landscape of {args.ckpt_path} on {result['examples']} {args.data} examples:")
    print(f"  loss at w                    {result['loss']:.6g}")
    print(f"  sharpness (curve, radius {settings.radius:g})  {result['sharpness']:.6g}")
    print(f"  SAM sharpness (rho {settings.sam_rho:g})      {result['sam_sharpness']:.6g}")
    for name, path in sorted(files.items()):
        print(f"  {name:<10} {path}")
    print(f"  privacy report {'updated: ' + str(report) if report is not None else 'not found in ' + str(folder)}")
    return 0
