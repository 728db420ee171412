"""Run by test_faults.py: saves checkpoints of ~40 MB to one path in a loop until it is killed."""
import sys

import torch

from pflat_lightning.checkpointing import AtomicCheckpointIO

if __name__ == "__main__":
    path, io = sys.argv[1], AtomicCheckpointIO()
    for i in range(10_000):
        io.save_checkpoint({"step": i, "weights": torch.full((10_000_000,), float(i))}, path)
        print(i, flush=True)
