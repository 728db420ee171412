"""Callbacks under a 2-process run (own subprocess, with a timeout, leaving no process behind)."""
import json
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).parent / "ddp_selection_script.py"


def run(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), *args], capture_output=True, text=True,
                          timeout=300, start_new_session=True)


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
