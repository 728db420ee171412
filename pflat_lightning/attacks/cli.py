"""``pflat audit``: a membership-inference audit of a finished ``pflat fit`` run.

    pflat audit --config RUN.yaml --ckpt_path CKPT [--attacks loss reference ...] [--num_examples N]
                [--shadow_models K] [--out DIR] [-- extra pflat fit overrides]

The run is rebuilt from its config with the checkpoint's weights and privacy state; members are the
datamodule's training split, non-members its test split. ``roc.png`` and ``membership_inference.json``
go to ``--out`` (default: the run folder holding ``checkpoints/``); a ``privacy_report.json`` there gets
the audit's section and ledger entry (json and md re-written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from pflat_lightning.attacks.audit import ATTACKS, SECTION, datamodule_splits, format_table, report_section, trainable_state
from pflat_lightning.callbacks.membership_inference_audit import MembershipInferenceAudit
from pflat_lightning.privacy.report import add_section
from pflat_lightning.runs import load_run, parse_run_command, run_command_parser, run_folder


def _parser() -> argparse.ArgumentParser:
    parser = run_command_parser(
        "pflat audit", "Membership-inference audit of a trained run (members: training split, non-members: test split)."
    )
    parser.add_argument("--attacks", nargs="+", default=["loss", "reference"], choices=ATTACKS, help="attacks to run")
    parser.add_argument("--reference", default="initial",
                        help="reference of the 'reference' attack: 'initial' (the model freshly built from the config) "
                             "or a checkpoint of the same architecture (e.g. trained on public data)")
    parser.add_argument("--num_examples", type=int, default=500, help="members (and as many non-members) at most")
    parser.add_argument("--shadow_models", type=int, default=0, help="LiRA shadow models (>= 2 with --attacks lira)")
    parser.add_argument("--shadow_epochs", type=int, default=None, help="epochs per shadow (default: the run's max_epochs)")
    parser.add_argument("--shadow_batch_size", type=int, default=None,
                        help="shadow training batch size (default: the datamodule's batch_size)")
    parser.add_argument("--min_k", type=float, default=0.2, help="Min-K%% fraction")
    parser.add_argument("--batch_size", type=int, default=None, help="scoring batch size (default: eval_batch_size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example selection and of the shadows")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's run folder)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pflat audit`` with ``argv`` (without the command name); return the exit status."""
    parser = _parser()
    args, overrides = parse_run_command(parser, sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    try:
        audit = MembershipInferenceAudit(
            args.attacks, num_examples=args.num_examples, reference=args.reference, shadow_models=args.shadow_models,
            shadow_epochs=args.shadow_epochs, shadow_batch_size=args.shadow_batch_size, min_k=args.min_k,
            batch_size=args.batch_size, seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))

    model, datamodule, trainer = load_run(args.config, args.ckpt_path, overrides)
    reference_name = f"checkpoint {args.reference}"
    if "reference" in args.attacks and args.reference == "initial":
        fresh, _, _ = load_run(args.config, None, overrides)
        audit.initial_state, reference_name = trainable_state(fresh), "initial (the model freshly built from the config)"
        del fresh
    if "lira" in args.attacks and not (args.shadow_epochs or (trainer.max_epochs or 0) > 0):
        parser.error("the run's config has no max_epochs for the LiRA shadows: pass --shadow_epochs.")
    datamodule.setup("fit")
    out = Path(args.out) if args.out is not None else run_folder(args.ckpt_path)
    try:
        result, files, detail = audit.audit(
            model.to(device), datamodule_splits(datamodule), out, max_epochs=trainer.max_epochs,
            datamodule=datamodule, reference_name=reference_name, accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
        )
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    report_path = add_section(out, SECTION, report_section(result, files), evaluation=detail,
                              run_id=getattr(model, "run_id", None))
    print(f"Membership-inference audit of {args.ckpt_path} ({result.summary['num_members']} members / non-members)\n")
    print(format_table(result.summary))
    print(f"\n{result.summary['threshold_note']}.\nResults: {files['json']}\nROC plot: {files['roc']}"
          + (f"\nPrivacy report updated: {report_path}" if report_path is not None else ""))
    return 0
