"""`pflat fit|test --config`: the shipped YAML configs parse and run end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pflat(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pflat_lightning.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("config", ["movie_reviews_dp.yaml", "movie_reviews_nonprivate.yaml"])
def test_shipped_configs_parse(config, tmp_path):
    result = pflat("fit", "--config", str(ROOT / "examples/configs" / config), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "backbone: bundled-minilm" in result.stdout


def test_cli_fit_writes_the_report_and_tests(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    result = pflat(
        "fit", "--config", str(ROOT / "examples/configs/movie_reviews_dp.yaml"),
        "--model.backbone", path, "--model.max_physical_batch_size", "128",
        "--data.source", "sms_spam", "--data.max_length", "16",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Result: test accuracy" in result.stdout
    report = json.loads(next(tmp_path.rglob("privacy_report.json")).read_text())
    assert report["steps"] == 3 and report["formal_guarantee"] is True
    assert report["epsilon"] <= 8.0
    assert "test_acc" in report["metrics"]
