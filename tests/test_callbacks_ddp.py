"""Callbacks under a 2-process run (own subprocess, with a timeout, leaving no process behind)."""
import json
import sys
from pathlib import Path

import pytest
from helpers import run_isolated


SCRIPT = Path(__file__).parent / "ddp_selection_script.py"


def run(tmp_path, *args):
    return run_isolated([sys.executable, str(SCRIPT), str(tmp_path), *args], timeout=300)


def test_layer_selection_is_identical_on_both_ranks(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["selected"] == ranks[1]["selected"] and len(ranks[0]["selected"]) == 1
    assert ranks[0]["active"] == ranks[1]["active"] == ranks[0]["selected"]
    assert ranks[0]["prefix0"] == ranks[1]["prefix0"], "DDP keeps the replicas identical"


def test_multi_process_dp_under_plain_ddp_is_refused(tmp_path):
    result = run(tmp_path, "private")
    assert result.returncode != 0
    assert "DP training on 2 processes needs Trainer(strategy='dp_ddp')" in result.stderr
    assert "got DDPStrategy" in result.stderr


def test_callbacks_agree_on_every_rank_under_dp_ddp(tmp_path):
    """AWP (released direction), layer selection (broadcast) and a public teacher (rank 0's) under DP."""
    result = run(tmp_path, "dp_ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["selected"] == ranks[1]["selected"] and len(ranks[0]["selected"]) == 1
    assert ranks[0]["teacher"] == ranks[1]["teacher"]
    assert ranks[0]["prefix0"] == ranks[1]["prefix0"]


def test_fresh_private_awp_under_dp_ddp_is_one_more_release_per_perturbed_step(tmp_path):
    """The ascent gradient is clipped, noised and aggregated like the update's: the replicas stay identical, and
    the epsilon is that of an Opacus accountant fed by hand with one (sigma, q) release per update plus one per
    perturbed step (the first half of the updates)."""
    from opacus.accountants import PRVAccountant

    result = run(tmp_path, "dp_ddp_fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["prefix0"] == ranks[1]["prefix0"], "both ranks apply the same perturbed, noised update"
    privacy = ranks[0]["privacy"]
    assert ranks[1]["privacy"] == privacy and ranks[0]["perturbed_steps"] == ranks[1]["perturbed_steps"]
    updates, perturbed = privacy["updates"], ranks[0]["perturbed_steps"]
    assert updates == 2 * 8 and perturbed == updates // 2  # TokenDataModule: 64 examples, batch 8, 2 epochs
    assert privacy["sample_rate"] == 8 / 64
    accountant = PRVAccountant()
    accountant.history = [(privacy["noise_multiplier"], 8 / 64, updates + perturbed)]
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=64 ** -1.1), rel=1e-6)
