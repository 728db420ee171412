#!/usr/bin/env bash
# One tuning run of the prompt recipe (movie_reviews_prompt_dp.yaml) at epsilon 8, seed 0, on the same splits as
# results/prompt/movie_reviews (public_fraction 0.1, 500 validation sentences): trained, validated, never tested.
#   bash results/prompt/tuning/tune.sh NAME [pflat fit overrides...]
# Appends {name, val_acc, val_loss, epsilon, overrides} to results/prompt/tuning/runs.jsonl.
set -euo pipefail
name=$1; shift
out=results/prompt/tuning/runs/$name
rm -rf "$out"
# The run's protocol comes after the overrides, so that a method config among them (--config ...) cannot replace
# the seed, the seeded randomness, the splits or the output folder.
.venv/bin/pflat fit --config examples/configs/movie_reviews_prompt_dp.yaml "$@" \
  --data.max_eval_examples 500 --data.public_fraction 0.1 \
  --seed_everything 0 --model.privacy.seed 0 --model.privacy.secure_mode false \
  --trainer.limit_test_batches 0 --trainer.enable_checkpointing false --trainer.enable_progress_bar false \
  --trainer.default_root_dir "$out"
.venv/bin/python - "$name" "$out" "$@" <<'PY'
import json, sys, pathlib
name, out, overrides = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
report = json.loads(next(out.rglob("privacy_report.json")).read_text())
row = {"name": name, "val_acc": report["metrics"]["val_acc"], "val_loss": report["metrics"]["val_loss"],
       "epsilon": report["epsilon"], "overrides": overrides}
print(json.dumps(row))
with open("results/prompt/tuning/runs.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
PY
