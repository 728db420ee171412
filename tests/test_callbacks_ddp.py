"""Callbacks under a 2-process run (own subprocess, with a timeout, leaving no process behind)."""
import json
import sys
from pathlib import Path

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
