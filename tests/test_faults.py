"""Runs killed at any moment: checkpoints stay loadable and a resumed DP run spends exactly as if it had
never stopped, and a stopped run never looks finished. Each run is a subprocess (``pflat fit``) killed with
SIGKILL or stopped with SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
seed_everything: 0
trainer:
  max_steps: 30
  max_epochs: 5
  num_sanity_val_steps: 0
  limit_val_batches: 2
  limit_test_batches: 2
  enable_progress_bar: false
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {root}/checkpoints
        every_n_train_steps: 1
        save_last: true
model:
  class_path: pflat_lightning.PrefixTunedClassifier
  init_args:
    backbone: {backbone}
    num_labels: 2
    prefix:
      num_virtual_tokens: 2
    max_physical_batch_size: 32
    privacy:
      target_epsilon: 3.0
data:
  class_path: pflat_lightning.datamodules.TextClassificationDataModule
  init_args:
    source: sms_spam
    max_length: 16
    batch_size: 64
"""


def pflat_command(config, *args):
    return [sys.executable, "-m", "pflat_lightning.cli", "fit", "--config", str(config), *args]


def write_config(folder: Path, backbone: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(CONFIG.format(root=folder, backbone=backbone))
    return config


def report(folder: Path) -> dict:
    return json.loads((folder / "privacy_report.json").read_text())


def test_sigkill_mid_run_then_resume_spends_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    backbone = tiny_model_dir("bert")
    whole = write_config(tmp_path / "whole", backbone)
    done = subprocess.run(pflat_command(whole), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = write_config(tmp_path / "killed", backbone)
    last = tmp_path / "killed/checkpoints/last.ckpt"
    process = subprocess.Popen(pflat_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.time() + 300
        while not last.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # somewhere in the middle of training, possibly during a save
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed/privacy_report.json").exists()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 0 < killed_at < 30

    resumed = subprocess.run(pflat_command(killed, "--ckpt_path", str(last)), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = report(tmp_path / "whole"), report(tmp_path / "killed")
    assert b["steps"] == a["steps"] == 30
    assert b["accountant_history"] == a["accountant_history"]
    assert b["epsilon"] == a["epsilon"] <= 3.0
    assert b["metrics"] == a["metrics"], "the resumed run trained exactly the same model"


def test_sigterm_stops_a_run_with_a_failing_exit_status(tiny_model_dir, tmp_path):
    """Lightning ends its loops on SIGTERM with a code-less SystemExit (status 0): a scheduler or `&&`
    would take the stopped run for a finished one."""
    config = write_config(tmp_path, tiny_model_dir("bert"))
    process = subprocess.Popen(pflat_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "checkpoints/last.ckpt").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM before the run finished" in stderr and "--ckpt_path" in stderr
    assert not (tmp_path / "privacy_report.json").exists(), "no report for a run that did not finish"
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)["global_step"] < 30


def test_a_kill_during_a_save_leaves_a_loadable_checkpoint(tmp_path):
    # Three savers at once (each killed at its own moment): one process start-up instead of three in a row.
    delays = (0.05, 0.2, 0.45)
    paths = [tmp_path / str(i) / "last.ckpt" for i in range(len(delays))]
    processes = []
    try:
        for path in paths:
            path.parent.mkdir()
            processes.append(subprocess.Popen([sys.executable, str(Path(__file__).parent / "atomic_save_script.py"),
                                               str(path)], stdout=subprocess.PIPE, text=True, start_new_session=True))
        for process, delay in zip(processes, delays):
            process.stdout.readline()  # its first checkpoint is complete
            time.sleep(delay)
            os.killpg(process.pid, signal.SIGKILL)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        assert torch.equal(checkpoint["weights"], torch.full((10_000_000,), float(checkpoint["step"])))
    folder = paths[0].parent
    leftovers = list(folder.glob(".last.ckpt.*.tmp"))
    from pflat_lightning.checkpointing import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"step": -1}, paths[0])
    assert not list(folder.glob(".last.ckpt.*.tmp")), f"stale temporary files are cleaned up: {leftovers}"
    assert torch.load(paths[0], weights_only=True) == {"step": -1}
