"""Privacy-Flat vs. the DP baseline vs. non-private training, over budgets and seeds.

    python examples/compare_privacy_flat.py --epsilons 3 8 --seeds 0 1 2 --epochs 3

Every method trains on the same private training split (the public split, 10 % of the corpus, is held
out for all of them and only used by strict Privacy-Flat's teacher and layer scores). Writes a
markdown table and the raw numbers (JSON) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from pflat_lightning import PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.callbacks import AdversarialWeightPerturbation, SharpnessLayerSelection, TeacherDistillation
from pflat_lightning.datamodules import TextClassificationDataModule
from pflat_lightning.privacy.report import seeded_only


def strict_privacy_flat(epochs: int):
    # With a single epoch the layers are chosen before training, on public data (no privacy cost).
    return [
        AdversarialWeightPerturbation(gamma=0.01, direction="previous_private", until_fraction=0.5),
        SharpnessLayerSelection(keep_layers=0.75, at_epoch=min(1, epochs - 1), data="public", direction="data"),
        TeacherDistillation("public", weight=0.01, teacher_epochs=3),
    ]


METHODS = {
    "non-private": (False, lambda epochs: []),
    "DP baseline": (True, lambda epochs: []),
    "Privacy-Flat (strict DP)": (True, strict_privacy_flat),
}


def run(method: str, epsilon: float | None, seed: int, args) -> dict:
    private, callbacks = METHODS[method]
    pl.seed_everything(seed)
    data = TextClassificationDataModule(args.source, max_length=64, batch_size=args.batch_size if private else 32,
                                        eval_batch_size=128, public_fraction=0.1, seed=42)
    privacy = PrivacyConfig(target_epsilon=epsilon, seed=seed) if private else PrivacyConfig(enabled=False)
    model = PrefixTunedClassifier(args.backbone, 2, privacy=privacy, max_physical_batch_size=64,
                                  optimizer=partial(torch.optim.AdamW, lr=args.lr if private else 3e-3, weight_decay=0.0))
    trainer = pl.Trainer(max_epochs=args.epochs, default_root_dir=args.out / "runs", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks(args.epochs))
    start = time.time()
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    report = model.privacy_report()
    return {"method": method, "target_epsilon": epsilon, "seed": seed, "test_acc": report["metrics"]["test_acc"],
            "epsilon": report["epsilon"], "formal_guarantee": report["formal_guarantee"], "reasons": report["reasons"],
            "wall_s": time.time() - start}


def table(results: list) -> str:
    rows = ["| method | target epsilon | test accuracy (mean ± sd over seeds) | seeds | epsilon spent | formal guarantee | wall s per run |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["method"], r["target_epsilon"] or 0.0) for r in results}, key=lambda k: (k[1], k[0]))
    for method, epsilon in keys:
        group = [r for r in results if r["method"] == method and (r["target_epsilon"] or 0.0) == epsilon]
        accs = [100 * r["test_acc"] for r in group]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        spent = "n/a" if group[0]["epsilon"] is None else f"{max(r['epsilon'] for r in group):.3f}"
        if group[0]["epsilon"] is None:
            guarantee = "n/a"
        else:  # "seeded": only the seeded (reproducible) randomness voids it; secure_mode=True would give one
            guarantee = "yes" if group[0]["formal_guarantee"] else ("seeded" if seeded_only(group[0]["reasons"]) else "no")
        wall = statistics.mean(r["wall_s"] for r in group)
        rows.append(f"| {method} | {epsilon or 'none'} | {statistics.mean(accs):.2f} ± {sd:.2f} | {len(group)} | {spent} | "
                    f"{guarantee} | {wall:.0f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--source", default="movie_reviews")
    parser.add_argument("--backbone", default="bundled-minilm")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("results/privacy_flat"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            for epsilon in (args.epsilons if METHODS[method][0] else [None]):
                results.append(run(method, epsilon, seed, args))
                (args.out / "results.json").write_text(json.dumps(results, indent=2))
                (args.out / "table.md").write_text(table(results))
                print(json.dumps(results[-1]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
