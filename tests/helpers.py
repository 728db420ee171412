"""Small synthetic data for unit tests of the training mechanics."""
from __future__ import annotations

import os
from argparse import ArgumentError
import signal
import subprocess

from typing import Dict, List, Set, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus
from jsonargparse import ArgumentParser

from pflat_lightning.privacy import PoissonDataLoader
from pflat_lightning.privacy.report import SEEDED_NOISE, SEEDED_SAMPLING

#: The reasons of a seeded DP run (no secure_mode) that nothing else voids: its draws are reproducible.
SEEDED_REASONS = [SEEDED_NOISE, SEEDED_SAMPLING]


class TokenDataset(Dataset):
    """Random token sequences (ids in the ordinary-word range of the WordPiece vocab) with labels."""

    def __init__(self, size: int = 64, length: int = 8, seed: int = 0, mask_token_id: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(2000, 3000, (size, length), generator=g)
        if mask_token_id is not None:
            self.input_ids[:, -2] = mask_token_id
        self.attention_mask = torch.ones_like(self.input_ids)
        self.attention_mask[::3, -1] = 0  # some padding
        self.labels = torch.randint(0, 2, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[i], self.attention_mask[i], self.labels[i]


def collate(items: List) -> Dict[str, torch.Tensor]:
    if not items:
        return {"input_ids": torch.zeros(0, 1, dtype=torch.long), "attention_mask": torch.zeros(0, 1, dtype=torch.long),
                "labels": torch.zeros(0, dtype=torch.long)}
    ids, mask, labels = zip(*items)
    return {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask), "labels": torch.stack(labels)}


class TokenDataModule(pl.LightningDataModule):
    secure_sampling = False  # set by the DP module from PrivacyConfig.secure_mode, like the library's datamodules

    def __init__(self, size: int = 64, batch_size: int = 8, poisson: bool = True, seed: int = 0, **kwargs) -> None:
        super().__init__()
        self.dataset = TokenDataset(size, **kwargs)
        self.batch_size, self.poisson, self.seed = batch_size, poisson, seed

    def train_dataloader(self) -> DataLoader:
        if self.poisson:
            return PoissonDataLoader(self.dataset, expected_batch_size=self.batch_size, collate_fn=collate, seed=self.seed,
                                     secure=self.secure_sampling)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=32, collate_fn=collate)

    test_dataloader = val_dataloader

    def public_dataloader(self, batch_size=None, shuffle=False) -> DataLoader:
        public = TokenDataset(32, seed=99)
        return DataLoader(public, batch_size=batch_size or 16, shuffle=shuffle, collate_fn=collate)


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class StopAfter(Callback):
    """Saves a checkpoint after ``step`` optimizer steps and stops, like a killed run's last checkpoint."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class CloseProcessGroup(Callback):
    """Closes a spawned worker's gloo process group once every rank has finished fitting (the last hook of a run).

    Lightning closes the group at exit for NCCL only; a gloo worker leaving with its group open while its peer
    is still closing connections can abort ("terminate called without an active exception", SIGABRT) after a
    run that finished, which fails the whole launch. A run that raised is left alone (its peer may never come).
    """

    def teardown(self, trainer, pl_module, stage) -> None:
        if torch.distributed.is_initialized() and trainer.state.status == TrainerStatus.RUNNING:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def assert_same_trained_weights(resumed: pl.LightningModule, whole: pl.LightningModule) -> None:
    """Every trainable parameter (prefix and head; the noise dominates the prefix's small gradients, so a
    prefix compared at the default tolerance can hide a wrong batch) is equal to float32 round-off."""
    trained = [p for m in resumed.model.trainable_modules() for p in m.parameters()]
    reference = [p for m in whole.model.trainable_modules() for p in m.parameters()]
    assert len(trained) == len(reference) > 0
    for a, b in zip(trained, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def run_isolated(command, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; on timeout kill the whole group (the spawned ranks too),
    so a hung multi-process run leaves nothing behind."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        try:  # ranks that outlived a finished launcher
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def clipped_mean(grads, max_norm: float, batch_size: int) -> torch.Tensor:
    """Reference DP-SGD update direction: each example's flat gradient clipped to ``max_norm``, summed, over the batch."""
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    clipped = [f * min(1.0, max_norm / (f.norm().item() + 1e-6)) for f in flat]
    return torch.stack(clipped).sum(0) / batch_size


def greedy_by_hand(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, eos: int, pad: int) -> torch.Tensor:
    """Reference greedy decoding: the model's full forward recomputed for every new token; after ``eos``, ``pad``."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            token = model(ids, mask)[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        done |= token == eos
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
    return ids


def check_cli_arguments(cls: type, expected: Set[str]) -> None:
    """Assert that LightningCLI's parser (jsonargparse, which follows ``**kwargs`` into a base class) knows each
    ``expected`` argument of ``cls`` and its type: an int, a float and a bool argument refuse a word."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    arguments = {action.dest.split(".", 1)[1] for action in parser._actions if action.dest.startswith("data.")}
    assert arguments >= expected, expected - arguments
    parsed = parser.parse_args(["--data.batch_size", "8", "--data.public_fraction", "0.2"])
    assert (parsed.data.batch_size, parsed.data.public_fraction) == (8, 0.2)
    for argument, value in (("batch_size", "many"), ("val_fraction", "tenth"), ("poisson_sampling", "maybe")):
        try:
            parser.parse_args([f"--data.{argument}", value])
        except ArgumentError:
            continue
        raise AssertionError(f"--data.{argument} {value} was accepted")
