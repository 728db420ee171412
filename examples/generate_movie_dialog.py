"""DP prefix tuning of the bundled SmolLM2 to reply to movie-script lines, measured against the un-tuned model.

    python examples/generate_movie_dialog.py                                  # the DP recipe (epsilon 8)
    python examples/generate_movie_dialog.py --config examples/configs/movie_dialog_nonprivate.yaml
    python examples/generate_movie_dialog.py --model.optimizer.init_args.lr 0.003   # any `pflat fit` override

It builds the run exactly as ``pflat fit --config ...`` does, then measures, with the same code
(``trainer.validate``), the validation split before training (the initialised, un-tuned prefix), trains,
validates and tests. It also gives the plain LM's validation perplexity (no prefix at all) as a second
reference. Results: printed, and ``summary.json`` next to the privacy report. Choose hyperparameters on the
validation numbers; the test numbers are for the chosen run only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from pflat_lightning.runs import load_run

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def plain_perplexity(model, loader) -> float:
    """Validation perplexity of the backbone alone (no prefix) on the same target tokens."""
    backbone = model.model.backbone.eval()
    total, count = 0.0, 0
    for batch in loader:
        logits = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        scored = labels != -100
        total += float(F.cross_entropy(logits[scored].float(), labels[scored], reduction="sum"))
        count += int(scored.sum())
    return math.exp(total / count)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples/configs/movie_dialog_dp.yaml"))
    args, overrides = parser.parse_known_args(argv)
    start = time.time()
    model, data, trainer = load_run([args.config], None, overrides)
    untuned = trainer.validate(model, datamodule=data, verbose=False)[0]
    plain = plain_perplexity(model, data.val_dataloader())
    trainer.fit(model, datamodule=data)
    tuned = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    tested = trainer.test(model, datamodule=data, verbose=False)[0]
    report = json.loads((model.report_dir / "privacy_report.json").read_text())
    summary = {
        "command": " ".join(["python", "examples/generate_movie_dialog.py", "--config", args.config, *overrides]),
        "train_pairs": data.num_train_examples,
        "val_sources": len(data.val_dataset),
        "test_sources": len(data.test_dataset),
        "plain_lm_val_ppl": plain,
        "untuned": untuned,
        "tuned": tuned,
        "test": tested,
        "epsilon": report["epsilon"],
        "delta": report["delta"],
        "steps": report["steps"],
        "formal_guarantee": report["formal_guarantee"],
        "wall_s": time.time() - start,
        "samples": report["callbacks"].get("samples", {}),
    }
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    epsilon = "none (non-private)" if summary["epsilon"] is None else f"{summary['epsilon']:.3f}"
    print(f"\n{'':22} {'ppl':>9} {'BLEU':>7} {'ROUGE-L':>8}")
    print(f"{'plain LM (validation)':22} {plain:9.2f}")
    for name, metrics, stage in (("un-tuned (validation)", untuned, "val"), ("tuned (validation)", tuned, "val"),
                                 ("tuned (test)", tested, "test")):
        print(f"{name:22} {metrics.get(f'{stage}_ppl', math.nan):9.2f} {metrics.get(f'{stage}_bleu', math.nan):7.4f} "
              f"{metrics.get(f'{stage}_rougeL', math.nan):8.4f}")
    print(f"epsilon {epsilon} (delta {summary['delta']}), {summary['steps']} steps, {summary['train_pairs']} training "
          f"pairs, wall time {summary['wall_s']:.0f} s; {folder}/summary.json")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
