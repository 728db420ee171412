"""Step time of DP prefix tuning with and without the flattening callbacks, in one run.

    python benchmarks/step_time.py --backbone bundled-minilm --steps 20 --out benchmarks/results.json

For each configuration: median wall time of a training step (logical batch = physical batch) after
warm-up steps, and the ratio to the plain DP step. Synthetic token batches of fixed size and length.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from pflat_lightning import PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.callbacks import AdversarialWeightPerturbation, TeacherDistillation


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times, self._start = [], 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def batches(size: int, batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2000, 5000, (size, length), generator=g)
    labels = torch.randint(0, 2, (size,), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
            for i in range(size)]
    return DataLoader(data, batch_size=batch, shuffle=False)


def measure(name, args, root, private=True, callbacks=()):
    torch.manual_seed(0)
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=None, poisson_sampling=False) if private else \
        PrivacyConfig(enabled=False)
    model = PrefixTunedClassifier(args.backbone, 2, num_virtual_tokens=args.prefix, privacy=privacy,
                                  max_physical_batch_size=args.batch, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=args.warmup + args.steps, default_root_dir=root, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[*callbacks, timer])
    trainer.fit(model, train_dataloaders=batches(args.batch * (args.warmup + args.steps), args.batch, args.length))
    median = statistics.median(timer.times[args.warmup:])
    print(f"{name:40s} median step {median:.4f} s", flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="bundled-minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        teacher = PrefixTunedClassifier(args.backbone, 2, num_virtual_tokens=args.prefix)
        ckpt = Path(folder, "teacher.ckpt")
        torch.save({"state_dict": {f"model.{k}": v for k, v in teacher.model.state_dict().items()}}, ckpt)
        times = {
            "non-private step": measure("non-private step", args, folder, private=False),
            "DP step (hooks)": measure("DP step (hooks)", args, folder),
            "DP + AWP previous_private": measure(
                "DP + AWP previous_private", args, folder,
                callbacks=[AdversarialWeightPerturbation(gamma=0.01, until_fraction=1.0)]),
            "DP + distillation (weight term)": measure(
                "DP + distillation (weight term)", args, folder,
                callbacks=[TeacherDistillation("checkpoint", checkpoint_path=str(ckpt))]),
        }
    base = times["DP step (hooks)"]
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "median_step_s": times, "ratio_to_dp_step": {k: v / base for k, v in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ratio_to_dp_step"], indent=2))


if __name__ == "__main__":
    main()
