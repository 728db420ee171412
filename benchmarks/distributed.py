"""Data-parallel DP-SGD on this machine: communication per step and throughput, 2 processes vs. 1.

    python benchmarks/distributed.py --steps 12 --out benchmarks/distributed.json

Runs the same DP prefix-tuning job (bundled MiniLM, synthetic batches) twice: on one process with two
torch threads, and on two Gloo processes (``dp_ddp_spawn``) with one thread each. Counts the bytes every
collective moves during the training steps (the engine's all-reduce and Lightning's own), and compares
them with the size of the trainable parameters' gradient.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.privacy import PoissonDataLoader
from suite import Tokens, collate  # the same synthetic batches as the step-time suite

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")


class Measure(Callback):
    """Step times, and bytes moved by collectives inside training steps (after warm-up)."""

    def __init__(self, warmup: int, out: Path, threads: int) -> None:
        self.warmup, self.out, self.threads = warmup, out, threads
        self.times, self.bytes, self._start, self._counting = [], [], 0.0, False
        self._step_bytes = 0

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(self.threads)
        if dist.is_available() and dist.is_initialized():
            for name in COLLECTIVES:
                original = getattr(dist, name)

                def counted(tensor, *args, _original=original, **kwargs):
                    if self._counting:
                        self._step_bytes += tensor.numel() * tensor.element_size()
                    return _original(tensor, *args, **kwargs)

                setattr(dist, name, counted)

    def on_train_batch_start(self, *args):
        self._step_bytes, self._counting = 0, True
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.times.append(time.perf_counter() - self._start)
        self.bytes.append(self._step_bytes)
        self._counting = False

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            trainable = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
            self.out.write_text(json.dumps({
                "median_step_s": statistics.median(self.times[self.warmup:]),
                "bytes_per_step": self.bytes[self.warmup:], "trainable_gradient_bytes": trainable,
                "world_size": trainer.world_size}))


def run(devices: int, args, folder: Path) -> dict:
    out = folder / f"devices{devices}.json"
    privacy = PrivacyConfig(noise_multiplier=1.0, target_epsilon=None)
    model = PrefixTunedClassifier("bundled-minilm", 2, prefix=PrefixConfig(num_virtual_tokens=10), privacy=privacy,
                                  max_physical_batch_size=args.batch, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    loader = PoissonDataLoader(Tokens(args.batch * 40, args.length), expected_batch_size=args.batch, collate_fn=collate)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="dp_ddp_spawn" if devices > 1 else "auto",
                         max_steps=args.warmup + args.steps, default_root_dir=folder, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Measure(args.warmup, out, threads=2 // devices)])
    trainer.fit(model, train_dataloaders=loader)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="global expected (logical) batch")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/distributed.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        one, two = run(1, args, Path(folder)), run(2, args, Path(folder))
    result = {"command": "python benchmarks/distributed.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
              "one_process_two_threads": one, "two_processes_one_thread": two,
              "throughput_ratio_two_over_one": one["median_step_s"] / two["median_step_s"]}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    print("bytes per step (2 processes):", sorted(set(two["bytes_per_step"])), "trainable gradient bytes:",
          two["trainable_gradient_bytes"])


if __name__ == "__main__":
    main()
