"""`pflat audit`: a finished `pflat fit` run audited from its saved config and checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pflat(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: spinning threads only slow a shared CPU down
    return subprocess.run([sys.executable, "-m", "pflat_lightning.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_audit_of_a_fit_run_writes_results_and_extends_its_privacy_report(tiny_model_dir, tmp_path):
    config = str(ROOT / "examples/configs/movie_reviews_dp.yaml")
    run_options = ["--model.backbone", tiny_model_dir("bert"), "--model.max_physical_batch_size", "128",
                   "--data.source", "sms_spam", "--data.max_length", "16", "--data.batch_size", "32",
                   "--data.max_train_examples", "96", "--data.max_eval_examples", "64",
                   "--trainer.default_root_dir", str(tmp_path)]
    fit = pflat("fit", "--config", config, *run_options, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = next(tmp_path.rglob("privacy_report.json")).parent
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    audit = pflat("audit", "--config", config, "--ckpt_path", str(checkpoint), "--attacks", "loss", "reference", "lira",
                  "--num_examples", "40", "--shadow_models", "2", "--shadow_epochs", "1", "--seed", "1",
                  "--", *run_options, cwd=tmp_path)
    assert audit.returncode == 0, audit.stderr[-3000:]
    assert "| loss |" in audit.stdout and "| lira |" in audit.stdout and "threshold chosen on" in audit.stdout

    results = json.loads((run / "membership_inference.json").read_text())
    assert results["num_members"] == results["num_non_members"] == 40
    assert set(results["attacks"]) == {"loss", "reference", "lira"}
    assert results["reference"].startswith("initial")
    assert results["lira"]["shadow_models"] == 2 and results["lira"]["shadow_privacy"]["target_epsilon"] == 8.0
    assert (run / "roc.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["callbacks"]["MembershipInferenceAudit"]["attacks"] == results["attacks"]
    assert report["formal_guarantee"] is True, "the audit is an evaluation: the guarantee still holds"
    assert [e["status"] for e in report["ledger"] if e["component"] == "MembershipInferenceAudit"] == ["evaluation"]
    assert "## MembershipInferenceAudit" in (run / "privacy_report.md").read_text()
