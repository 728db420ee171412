"""`pflat fit|test --config`: the shipped YAML configs parse and run end to end."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch

from pflat_lightning import PrefixConfig, PrefixTunedCausalLM, PrefixTunedClassifier
from pflat_lightning import cli, runs
from pflat_lightning.runs import load_run
from pflat_lightning.datamodules import TextClassificationDataModule, TextGenerationDataModule

from helpers import SEEDED_REASONS

ROOT = Path(__file__).resolve().parents[1]


def pflat(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pflat_lightning.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


SHIPPED_CONFIGS = [
    ("movie_reviews_dp.yaml", "bundled-minilm"), ("movie_reviews_nonprivate.yaml", "bundled-minilm"),
    ("privacy_flat_strict.yaml", "bundled-smollm2"), ("privacy_flat_paper.yaml", "bundled-smollm2"),
    ("movie_dialog_dp.yaml", "bundled-smollm2"), ("movie_dialog_nonprivate.yaml", "bundled-smollm2"),
    ("movie_reviews_prompt_dp.yaml", "bundled-smollm2"), ("sms_spam_prompt_dp.yaml", "bundled-smollm2"),
    ("trec_prompt_dp.yaml", "bundled-smollm2"), ("own_csv.yaml", "bundled-minilm"),
]
#: Composed with a run config, not run alone (test_dp_ddp_config_composes_with_a_run_config,
#: test_audit_protocol_composes_with_a_run_config, test_layer_selection_composes_with_a_run_config).
FRAGMENTS = {"movie_reviews_dp_ddp.yaml", "audit_protocol.yaml", "layer_selection_public.yaml"}


def test_every_shipped_config_is_tested():
    shipped = {p.name for p in (ROOT / "examples/configs").glob("*.yaml")}
    assert shipped == {config for config, _ in SHIPPED_CONFIGS} | FRAGMENTS


@pytest.mark.parametrize("config, backbone", SHIPPED_CONFIGS)
def test_shipped_configs_parse(config, backbone, tmp_path):
    result = pflat("fit", "--config", str(ROOT / "examples/configs" / config), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"backbone: {backbone}" in result.stdout


@pytest.mark.parametrize("args", [["--help"], []], ids=["--help", "no arguments"])
def test_help_lists_every_command(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pflat"])
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for subcommand in ("fit", "validate", "test", "predict"):
        assert any(line.split()[:1] == [subcommand] for line in lines), subcommand
    for name, (_, summary) in cli.COMMANDS.items():
        assert any(line.split()[:1] == [name] and line.endswith(summary) for line in lines), name


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_a_misspelt_key_is_named_first(where, tmp_path):
    config = ROOT / "examples/configs/movie_reviews_dp.yaml"
    if where == "yaml":
        text = config.read_text()
        assert "target_epsilon:" in text
        config = tmp_path / "typo.yaml"
        config.write_text(text.replace("target_epsilon:", "target_epsilom:"))
        typo = []
    else:
        typo = ["--model.init_args.privacy.init_args.target_epsilom", "3"]
    result = pflat("fit", "--config", str(config), *typo, "--trainer.max_steps", "1", cwd=tmp_path)
    assert result.returncode == 2
    first, second = result.stderr.splitlines()[:2]
    assert "unknown key 'target_epsilom'" in first and "model.init_args.privacy.init_args" in first
    assert "Did you mean 'target_epsilon'?" in second and "max_grad_norm" in second
    assert "usage:" not in result.stderr and not list(tmp_path.rglob("*.ckpt"))


def test_runs_module_rebuilds_runs_and_cli_is_only_the_command_line():
    assert not hasattr(cli, "load_run") and not hasattr(cli, "split_overrides")
    assert runs.split_overrides(["--config", "a", "--", "--trainer.max_steps", "1"]) == (
        ["--config", "a"], ["--trainer.max_steps", "1"])
    # A library call gets an exception to handle, not a SystemExit.
    with pytest.raises(argparse.ArgumentError, match="target_epsilom"):
        load_run([ROOT / "examples/configs/movie_reviews_dp.yaml"], None, ["--model.privacy.target_epsilom", "3"])


def test_load_run_rebuilds_either_task_with_the_tokenizer_linked(tiny_model_dir):
    dialog, dialog_data, _ = load_run([ROOT / "examples/configs/movie_dialog_dp.yaml"], None,
                                      ["--model.backbone", tiny_model_dir("gpt2")])
    assert isinstance(dialog, PrefixTunedCausalLM) and isinstance(dialog_data, TextGenerationDataModule)
    assert dialog_data.tokenizer_name == tiny_model_dir("gpt2")
    reviews, reviews_data, _ = load_run([ROOT / "examples/configs/movie_reviews_dp.yaml"], None,
                                        ["--model.backbone", tiny_model_dir("bert"), "--model.num_labels", "3",
                                         "--model.privacy.enabled", "false"])
    assert isinstance(reviews, PrefixTunedClassifier) and isinstance(reviews_data, TextClassificationDataModule)
    assert reviews_data.num_labels == 3 and not reviews.is_private


def test_the_prefix_config_travels_from_yaml_to_the_prefix_encoder_unchanged(tiny_model_dir, tmp_path):
    text = "the film was long but the ending was worth it"
    config = tmp_path / "prefix.yaml"
    config.write_text(f"model:\n  init_args:\n    prefix:\n      num_virtual_tokens: 4\n      init_text: {text}\n")
    model, _, _ = load_run([ROOT / "examples/configs/movie_reviews_dp.yaml", config], None,
                           ["--model.backbone", tiny_model_dir("bert"), "--model.prefix.num_virtual_tokens", "3"])
    expected = PrefixConfig(num_virtual_tokens=3, init_std=0.5, init_text=text)
    assert model.model.prefix.config == expected and model.model.prefix.layers[0].weight.shape[0] == 3
    plain = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=expected)  # the same text initialisation
    assert all(torch.equal(a, b) for a, b in zip(model.model.prefix.parameters(), plain.model.prefix.parameters()))
    assert "prefix initialisation" in {entry.component for entry in model.ledger.entries}


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
    assert "Result: test accuracy" in result.stdout and "formal guarantee yes." in result.stdout  # secure_mode: true
    printed = result.stdout.split("Privacy report: ")[1].split(" (and .json)")[0]
    assert [Path(printed).with_suffix(".json")] == list(tmp_path.rglob("privacy_report.json"))
    report = json.loads(next(tmp_path.rglob("privacy_report.json")).read_text())
    assert report["steps"] == 3 and report["formal_guarantee"] is True
    assert report["epsilon"] <= 8.0
    assert "test_acc" in report["metrics"]
    read = [e for e in report["ledger"] if e["status"] == "evaluation"]
    assert [e["component"] for e in read] == ["test"], "3 steps end no epoch: no validation, the test run recorded"
    assert "test_acc" in read[0]["detail"] and "without DP" in read[0]["detail"]
    # The saved config rebuilds the same run (it also holds the fit command's ckpt_path).
    saved = next(tmp_path.rglob("config.yaml"))
    assert "ckpt_path" in saved.read_text()
    model, data, _ = load_run([saved])
    assert model.hparams.backbone == path and data.source == "sms_spam" and data.max_length == 16


@pytest.mark.parametrize("config, guarantee", [("privacy_flat_strict.yaml", True), ("privacy_flat_paper.yaml", False)])
def test_privacy_flat_configs_run_and_report_their_guarantee(config, guarantee, tiny_model_dir, tmp_path):
    result = pflat(
        "fit", "--config", str(ROOT / "examples/configs" / config),
        "--model.backbone", tiny_model_dir("bert"), "--data.source", "sms_spam", "--data.max_length", "16",
        "--data.batch_size", "64", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--trainer.callbacks.init_args.teacher_epochs", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    student, teacher = sorted(tmp_path.rglob("privacy_report.json"), key=lambda p: "teacher" in p.parts)
    report = json.loads(student.read_text())
    assert report["formal_guarantee"] is guarantee
    components = {e["component"]: e["status"] for e in report["ledger"]}
    techniques = {"AdversarialWeightPerturbation", "TeacherDistillation"} | ({"SharpnessLayerSelection"} if not guarantee
                                                                            else set())  # tuned off in the strict one
    assert components.keys() == techniques | {"prefix initialisation", "validation", "test"}, \
        "init_text: the instruction text is recorded as public data; the held-out splits' metrics as evaluation"
    assert components["validation"] == components["test"] == "evaluation"
    if guarantee:
        [teacher] = [e for e in report["ledger"] if e["component"] == "TeacherDistillation"]
        assert teacher["status"] == "public" and "the student starts from the teacher's prefix" in teacher["detail"]
    else:
        assert len(report["callbacks"]["SharpnessLayerSelection"]["kept_layers"]) == 2  # 0.75 of 2 tiny layers


def test_dp_ddp_config_composes_with_a_run_config(tmp_path):
    result = pflat("fit", "--config", str(ROOT / "examples/configs/movie_reviews_dp.yaml"),
                   "--config", str(ROOT / "examples/configs/movie_reviews_dp_ddp.yaml"), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "strategy: dp_ddp" in result.stdout and "devices: 2" in result.stdout
    assert "secure_mode: false" in result.stdout, "secure sampling runs in one process: the DDP run is seeded"
    assert "target_epsilon: 8.0" in result.stdout


def test_audit_protocol_composes_with_a_run_config(tmp_path):
    result = pflat("fit", "--config", str(ROOT / "examples/configs/movie_reviews_prompt_dp.yaml"),
                   "--config", str(ROOT / "examples/configs/audit_protocol.yaml"), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_epochs: 12" in result.stdout and "max_train_examples: 250" in result.stdout
    assert "check_val_every_n_epoch: 12" in result.stdout and "max_eval_examples: 250" in result.stdout
    assert "batch_size: 50" in result.stdout and "head: label_words" in result.stdout, "the run config's model stays"


def test_layer_selection_composes_with_a_run_config(tmp_path):
    """The fragment adds the strict selection to a recipe; the strict config's comment adds it to the strict run."""
    result = pflat("fit", "--config", str(ROOT / "examples/configs/movie_reviews_prompt_dp.yaml"),
                   "--config", str(ROOT / "examples/configs/layer_selection_public.yaml"), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    [selection] = printed["trainer"]["callbacks"]
    assert selection["class_path"].endswith("SharpnessLayerSelection") and selection["init_args"]["data"] == "public"
    assert printed["model"]["init_args"]["head"] == "label_words", "the run config's model stays"
    result = pflat("fit", "--config", str(ROOT / "examples/configs/privacy_flat_strict.yaml"),
                   "--trainer.callbacks+=pflat_lightning.callbacks.SharpnessLayerSelection",
                   "--trainer.callbacks.data", "public", "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    callbacks = yaml.safe_load(result.stdout)["trainer"]["callbacks"]
    assert [c["class_path"].rpartition(".")[2] for c in callbacks] == [
        "AdversarialWeightPerturbation", "TeacherDistillation", "SharpnessLayerSelection"]
    assert callbacks[2]["init_args"]["data"] == "public" and callbacks[1]["init_args"]["warm_start"] is True


def test_cli_fits_the_causal_lm_on_movie_dialog(tiny_model_dir, tmp_path):
    result = pflat(
        "fit", "--config", str(ROOT / "examples/configs/movie_dialog_dp.yaml"),
        "--model.backbone", tiny_model_dir("gpt2"), "--model.generate_max_new_tokens", "4",
        "--data.max_train_examples", "64", "--data.max_eval_examples", "8", "--data.batch_size", "16",
        "--data.max_source_length", "16", "--data.max_target_length", "8",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Result: test perplexity" in result.stdout and "test BLEU" in result.stdout
    assert "formal guarantee no (seeded, reproducible noise and batches; train with secure_mode=True" in result.stdout
    report = json.loads(next(tmp_path.rglob("privacy_report.json")).read_text())
    assert report["steps"] == 2 and report["epsilon"] <= 8.0
    assert report["reasons"] == SEEDED_REASONS, "a seeded config: only its reproducible randomness voids the guarantee"
    assert {"test_ppl", "test_bleu", "test_rougeL"} <= set(report["metrics"])
    assert report["callbacks"]["samples"]["test"]
