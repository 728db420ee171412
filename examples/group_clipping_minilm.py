"""Does a prefix learn next to a trainable head once it is clipped on its own? Flat vs group-wise clipping.

    python examples/group_clipping_minilm.py --clipping flat group group-private --seeds 0 --out results/group_clipping

The bundled MiniLM with a 10-token prefix and a linear head, DP-SGD at epsilon 8 on movie_reviews (the
recipe of ``examples/configs/movie_reviews_dp.yaml``), with 10 % of the corpus held out as a public split
for every run. ``clipping="flat"`` clips each example's whole gradient to 1.0: the head takes almost all of
it. ``clipping="group"`` clips the prefix and the head apart, at the median per-example norm of each group
measured on the public split, with the same epsilon; ``group-private`` estimates the same medians on the training
set instead (``group_bound_data="private"``, spent inside the same epsilon). Writes one JSON line per run to
``--out/runs.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.datamodules import TextClassificationDataModule


def run(clipping: str, seed: int, out: Path) -> dict:
    pl.seed_everything(seed)
    start = time.time()
    data = TextClassificationDataModule("movie_reviews", max_length=64, batch_size=256, eval_batch_size=128,
                                        public_fraction=0.1)
    model = PrefixTunedClassifier(
        "bundled-minilm", 2, prefix=PrefixConfig(num_virtual_tokens=10), max_physical_batch_size=64,
        optimizer=partial(torch.optim.AdamW, lr=0.01, weight_decay=0.0),
        privacy=PrivacyConfig(target_epsilon=8.0, max_grad_norm=1.0, clipping=clipping.split("-")[0], seed=seed,
                              group_bound_data="private" if clipping == "group-private" else "public"),
    )
    trainer = pl.Trainer(max_epochs=3, num_sanity_val_steps=0, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, default_root_dir=out / f"{clipping}-seed{seed}")
    trainer.fit(model, datamodule=data)
    val = trainer.validate(model, datamodule=data, verbose=False)[0]
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    report = model.privacy_report()
    return {"clipping": clipping, "seed": seed, "val_acc": val["val_acc"], "test_acc": test["test_acc"],
            "epsilon": report["epsilon"], "group_clip_bounds": report.get("group_clip_bounds"),
            "noise_multiplier": report.get("noise_multiplier"), "wall_s": round(time.time() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clipping", nargs="+", default=["flat", "group"], choices=["flat", "group", "group-private"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("results/group_clipping"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for clipping in args.clipping:
            row = run(clipping, seed, args.out)
            print(json.dumps(row), flush=True)
            with open(args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
