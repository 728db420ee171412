"""DP-SGD on two processes (Gloo): noise added once, identical replicas, the single-process accountant.

Each multi-process run is its own subprocess with a timeout, in its own session so nothing outlives it.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from helpers import run_isolated

SCRIPT = Path(__file__).parent / "distributed_dp_script.py"
NOISE, CLIP = 1.3, 0.7  # as in the script


def run(*args):
    return run_isolated([sys.executable, str(SCRIPT), *map(str, args)], timeout=300)


def two_and_one_process(model, tmp_path_factory, variant):
    """A 2-process dp_ddp_spawn run and the same run on one process: each rank's saved steps and privacy state."""
    out = {}
    for name, devices, strategy in (("two", 2, "dp_ddp_spawn"), ("one", 1, "auto")):
        folder = tmp_path_factory.mktemp(name)
        result = run("train", model, folder, devices, strategy, variant)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = [torch.load(folder / f"rank{r}.pt") for r in range(devices)]
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    return two_and_one_process(tiny_model_dir("gpt2"), tmp_path_factory, "awp")


def test_replicas_are_identical_after_every_step(runs):
    rank0, rank1 = runs["two"]
    assert len(rank0["steps"]) == len(rank1["steps"]) == rank0["updates"] == 8
    for step, (a, b) in enumerate(zip(rank0["steps"], rank1["steps"])):
        assert torch.equal(a, b), f"ranks differ after step {step}"
    assert not torch.equal(rank0["steps"][0], rank0["steps"][-1]), "training moved the prefix"


def test_two_processes_equal_one_process_on_the_union_of_their_batches(runs):
    """Rank 0 draws the noise with the seeded generator and the ranks' Poisson shares partition the
    global draw, so the 2-process run is the single-process run up to floating-point summation order
    (with AWP's previous_private direction, which must therefore also agree)."""
    two, one = runs["two"][0], runs["one"][0]
    assert len(two["steps"]) == len(one["steps"])
    for step, (a, b) in enumerate(zip(two["steps"], one["steps"])):
        assert torch.allclose(a, b, atol=1e-5), f"step {step}: max diff {(a - b).abs().max()}"


def test_epsilon_equals_the_single_process_accountant(runs):
    two, one = runs["two"][0], runs["one"][0]
    assert two["sample_rate"] == one["sample_rate"] == 12 / 48
    assert two["history"] == one["history"] == [(NOISE, 12 / 48, 8)]
    # The runs use the PRV accountant: equal to a fresh Opacus PRV accountant, and within RDP's looser bound.
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = rdp.history = [(NOISE, 12 / 48, 8)]
    assert math.isclose(two["epsilon"], prv.get_epsilon(delta=1e-3), rel_tol=1e-6)
    assert two["epsilon"] <= rdp.get_epsilon(delta=1e-3)


def test_private_group_bounds_are_one_estimate_across_ranks(tiny_model_dir, tmp_path_factory):
    """Group-wise clipping with bounds estimated on the training set: each rank counts its share of the same
    Poisson draws and rank 0 alone adds the histogram noise, so both ranks get the bounds, the updates and the
    history (2 histogram releases of multiplier 1 / sqrt(2), then the 8 updates) of the single-process run."""
    runs = two_and_one_process(tiny_model_dir("gpt2"), tmp_path_factory, "private_bounds")
    (rank0, rank1), one = runs["two"], runs["one"][0]
    assert rank0["group_bounds"] == rank1["group_bounds"] == pytest.approx(one["group_bounds"], rel=1e-6)
    assert rank0["group_bounds"][0] < 0.5 * rank0["group_bounds"][1], "the estimate found the groups' scales"
    assert rank0["history"] == one["history"] == [(1 / math.sqrt(2), 12 / 48, 2), (NOISE, 12 / 48, 8)]
    for step, (a, b, c) in enumerate(zip(rank0["steps"], rank1["steps"], one["steps"])):
        assert torch.equal(a, b), f"ranks differ after step {step}"
        assert torch.allclose(a, c, atol=1e-5), f"step {step}: max diff {(a - c).abs().max()}"


def test_aggregated_noise_is_one_draw_not_one_per_rank(tmp_path):
    result = run("noise", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"noise{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["released"], ranks[1]["released"]), "every rank applies the same noised gradient"
    noise = ranks[0]["released"].flatten() * ranks[0]["expected_batch_size"]  # undo the division by the batch
    n = noise.numel()
    expected = NOISE * CLIP
    # The sample standard deviation of n Gaussian draws has a standard error of sigma / sqrt(2n).
    tolerance = 5 * expected / math.sqrt(2 * n)
    assert abs(float(noise.std()) - expected) < tolerance
    assert abs(float(noise.std()) - math.sqrt(2) * expected) > 20 * tolerance  # the one-draw-per-rank alternative is far outside
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(n)


def test_non_finite_loss_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path):
    result = run("nan", tiny_model_dir("gpt2"), tmp_path)
    assert result.returncode != 0
    # Whichever rank fails first is reported: rank 1 names the step, rank 0 says another rank was poisoned.
    assert "Non-finite training loss at step 2" in result.stderr or \
        "Non-finite training loss on another data-parallel rank" in result.stderr
    assert "poisoned update was not applied" in result.stderr
