"""Releasing a trained model (`export_release`, `load_release`, `pflat export`): the artifact holds the prefix,
the head, the config that rebuilds them onto the public backbone and the privacy report, and nothing of the
run's seeds, generator or optimizer state, data or backbone; loaded back it predicts exactly what the
checkpoint predicts."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from opacus.accountants import PRVAccountant
from safetensors import safe_open

from pflat_lightning import PrefixConfig, PrefixTunedCausalLM, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.datamodules import TextClassificationDataModule
from pflat_lightning.prefix_model import MODEL_INPUTS
from pflat_lightning import release
from pflat_lightning.release import export_checkpoint, export_release, load_release

from helpers import SEEDED_REASONS, quiet_trainer
from test_causal_lm import GenerationData

ROOT = Path(__file__).resolve().parents[1]
#: Seeds that no number of a tiny run can be by accident, so finding one in the artifact means a leak.
NOISE_SEED, DATA_SEED = 918273645, 918273646
RELEASE_FILES = {"adapter.safetensors", "release.json", "privacy_report.json", "privacy_report.md"}
#: Key fragments of the things a release must not hold: seeds, generator and optimizer/scheduler state,
#: data locations.
FORBIDDEN_KEYS = ("seed", "generator", "optimizer", "scheduler", "state", "param_groups", "exp_avg", "data_files",
                  "cache_dir", "samples")


def write_corpus(path, count=60):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("text", "label"))
        writer.writerows((f"private sentence number {i} about item {i % 7}", ("ham", "spam")[i % 2]) for i in range(count))
    return str(path)


def walk_json(value, keys, leaves):
    if isinstance(value, dict):
        for key, item in value.items():
            keys.append(str(key))
            walk_json(item, keys, leaves)
    elif isinstance(value, list):
        for item in value:
            walk_json(item, keys, leaves)
    else:
        leaves.append(value)


def assert_releases_nothing_secret(folder, secrets, checkpoint_state):
    """Every file of the release: no key naming a seed, generator, optimizer or data location; no value that
    is a seed or contains a secret string (data paths, seeds); tensors only of the prefix and the head, each
    equal to the checkpoint's (``checkpoint_state``: the checkpoint's ``state_dict``)."""
    folder = Path(folder)
    assert {p.name for p in folder.iterdir()} == RELEASE_FILES
    for name in ("release.json", "privacy_report.json"):
        keys, leaves = [], []
        walk_json(json.loads((folder / name).read_text()), keys, leaves)
        # The report names the kind of noise generator (secure or seeded pseudo-random), never its seed or state.
        assert not [k for k in keys if k != "noise_generator" and any(bad in k.lower() for bad in FORBIDDEN_KEYS)]
        assert not [v for v in leaves if isinstance(v, int) and not isinstance(v, bool) and v in (NOISE_SEED, DATA_SEED)]
        assert not [v for v in leaves if isinstance(v, str) and any(s in v for s in secrets)], name
    markdown = (folder / "privacy_report.md").read_text()
    assert not [s for s in secrets if s in markdown]
    # The trainable tensors of the checkpoint, named as in the model (prefix.*, classifier.*).
    expected = {k[len("model."):]: v for k, v in checkpoint_state.items()
                if k.startswith(("model.prefix.", "model.classifier."))}
    with safe_open(str(folder / "adapter.safetensors"), framework="pt") as adapter:
        assert set(adapter.keys()) == set(expected)
        for key in adapter.keys():
            assert torch.equal(adapter.get_tensor(key), expected[key]), key
        assert not [s for s in secrets if s in json.dumps(adapter.metadata())]
    assert "prefix.layer_mask" in expected


def module_from_checkpoint(cls, ckpt_path, **kwargs):
    """The task module of a checkpoint, rebuilt independently of the release: its init arguments, then the
    checkpoint's privacy state and weights."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module = cls(**kwargs)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), checkpoint


def fit_classifier(path, tmp_path, data):
    torch.manual_seed(0)
    module = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=3),
                                   privacy=PrivacyConfig(target_epsilon=8.0, seed=NOISE_SEED))
    module.prefix.set_layer_mask([True, False])  # a pruned layer must stay pruned in the release
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(module, datamodule=data)
    return module, tmp_path / "checkpoints" / "last.ckpt"


def test_release_holds_prefix_head_and_report_and_predicts_as_the_checkpoint(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    corpus = write_corpus(tmp_path / "private_corpus.csv")
    cache = str(tmp_path / "datasets_cache")
    data = TextClassificationDataModule("csv", data_files=corpus, tokenizer=path, max_length=24, batch_size=16,
                                        template="{text} It was {mask}.", seed=DATA_SEED, cache_dir=cache)
    module, ckpt = fit_classifier(path, tmp_path / "run", data)
    folder = export_release(module, tmp_path / "release", datamodule=data)

    checkpoint_module, checkpoint = module_from_checkpoint(
        PrefixTunedClassifier, ckpt, backbone=path, num_labels=2, prefix=PrefixConfig(num_virtual_tokens=3),
        privacy=PrivacyConfig(target_epsilon=8.0, seed=NOISE_SEED))
    assert checkpoint["pflat_privacy"]["engine"]["generator"] is not None, "the checkpoint does hold the noise state"
    secrets = (corpus, cache, str(tmp_path / "run"), str(NOISE_SEED), str(DATA_SEED))
    assert_releases_nothing_secret(folder, secrets, checkpoint["state_dict"])

    info = json.loads((folder / "release.json").read_text())
    assert info["module"] == "pflat_lightning.classifier.PrefixTunedClassifier"
    assert info["format_version"] == 2
    assert info["init_args"] == {"backbone": path, "num_labels": 2, "head": "linear", "label_words": None,
                                 "prefix": {"num_virtual_tokens": 3, "reparam_hidden": None, "init_std": 0.5,
                                            "init_text": None}}
    assert info["tokenisation"] == {
        "datamodule": "pflat_lightning.datamodules.text_classification.TextClassificationDataModule",
        "tokenizer": path, "max_length": 24, "template": "{text} It was {mask}.", "text_column": "text",
        "text_pair_column": None, "label_column": "label", "label_names": ["ham", "spam"]}

    # The report's epsilon is the accountant's for the checkpoint's noise, rate and steps (Opacus, by hand).
    engine = checkpoint["pflat_privacy"]["engine"]
    accountant = PRVAccountant()
    accountant.history = [tuple(h) for h in engine["history"]]
    report = json.loads((folder / "privacy_report.json").read_text())
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta=engine["delta"]), rel=1e-9)
    assert report["steps"] == engine["updates"] and report["reasons"] == SEEDED_REASONS
    assert report["noise_generator"] == "seeded pseudo-random (PrivacyConfig.seed)" and report["callbacks"] == {}

    loaded = load_release(folder)
    assert not loaded.training and not loaded.is_private
    assert loaded.prefix.layer_mask.tolist() == [True, False] == checkpoint_module.prefix.layer_mask.tolist()
    batch = next(iter(data.test_dataloader()))
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with torch.no_grad():
        released, expected = loaded(**inputs), checkpoint_module(**inputs)
        untrained = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=3)).eval()(**inputs)
    assert torch.equal(released, expected)
    assert not torch.allclose(released, untrained), "the released weights are the trained ones"

    # A version-1 release (written before PrefixConfig: the prefix's settings as the module's own arguments) loads.
    old = tmp_path / "release_v1"
    shutil.copytree(folder, old)
    args = {k: v for k, v in info["init_args"].items() if k != "prefix"}
    (old / "release.json").write_text(json.dumps({**info, "format_version": 1, "init_args": {
        **args, "num_virtual_tokens": 3, "prefix_hidden": None}}))
    with torch.no_grad():
        assert torch.equal(load_release(old)(**inputs), expected)


def test_export_and_load_refuse_what_would_leak_or_mislead(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "last.ckpt").write_text("x")
    trained = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                    privacy=PrivacyConfig(enabled=False))
    with pytest.raises(ValueError, match=f"Refusing to export into {occupied}: it is not an empty folder"):
        export_release(trained, occupied, report={})
    private = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="private but holds no privacy state"):
        export_release(private, tmp_path / "none")
    with pytest.raises(ValueError, match="attached to the trainer that fitted it"):
        export_release(trained, tmp_path / "none")
    assert not (tmp_path / "none").exists(), "nothing is written when the export is refused"

    folder = export_release(trained, tmp_path / "release", report={"accountant_history": []})
    with pytest.raises(ValueError, match=r"load_release got \['seed'\].*allowed: \['backbone'"):
        load_release(folder, seed=1)
    with pytest.raises(ValueError, match="does not fit the model built from"):
        load_release(folder, backbone=tiny_model_dir("llama"))  # 2 key/value heads instead of 4
    info = json.loads((folder / "release.json").read_text())
    (folder / "release.json").write_text(json.dumps({**info, "module": "antigravity.Module"}))
    with pytest.raises(ValueError, match="'antigravity.Module', which is not a releasable DPPrefixModule"):
        load_release(folder)  # a release file never makes the process import a module
    assert "antigravity" not in sys.modules


def pflat(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pflat_lightning.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_pflat_export_writes_the_release_of_a_fit_run(tiny_model_dir, tmp_path, capsys):
    path = tiny_model_dir("bert")
    corpus = write_corpus(tmp_path / "private_corpus.csv")
    fit = pflat("fit", "--config", str(ROOT / "examples/configs/movie_reviews_dp.yaml"),
                "--model.backbone", path, "--model.privacy.seed", str(NOISE_SEED),
                "--data.source", "csv", "--data.data_files", corpus, "--data.seed", str(DATA_SEED),
                "--data.max_length", "16", "--data.batch_size", "16", "--trainer.max_steps", "3",
                "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
                cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    config = next((tmp_path / "runs").rglob("config.yaml"))
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    export = pflat("export", "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "release"),
                   cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]

    checkpoint_module, checkpoint = module_from_checkpoint(
        PrefixTunedClassifier, ckpt, backbone=path, num_labels=2,
        privacy=PrivacyConfig(target_epsilon=8.0, seed=NOISE_SEED))
    secrets = (corpus, str(tmp_path / "runs"), str(NOISE_SEED), str(DATA_SEED))
    assert_releases_nothing_secret(tmp_path / "release", secrets, checkpoint["state_dict"])
    fit_report = json.loads(next((tmp_path / "runs").rglob("privacy_report.json")).read_text())
    report = json.loads((tmp_path / "release/privacy_report.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "epochs", "accountant_history",
                "dataset_size", "formal_guarantee"):
        assert report[key] == fit_report[key], key
    info = json.loads((tmp_path / "release/release.json").read_text())
    assert info["tokenisation"]["max_length"] == 16 and info["init_args"]["prefix"]["num_virtual_tokens"] == 10

    loaded = load_release(tmp_path / "release")
    ids = torch.randint(2000, 3000, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), checkpoint_module(ids, mask))

    stripped = {k: v for k, v in checkpoint.items() if k != "pflat_privacy"}
    torch.save(stripped, tmp_path / "stripped.ckpt")
    with pytest.raises(ValueError, match="stripped.ckpt' holds no privacy state .* but the run's config is private"):
        export_checkpoint([str(config)], tmp_path / "stripped.ckpt", tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit) as again:  # in process: the refusal comes before the run is loaded
        release.main(["--config", str(config), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "release")])
    assert again.value.code == 2 and f"Refusing to export into {tmp_path / 'release'}" in capsys.readouterr().err


def test_causal_lm_release_keeps_no_generated_samples_and_predicts_as_the_checkpoint(tiny_model_dir, tmp_path):
    path = tiny_model_dir("gpt2")
    torch.manual_seed(0)
    privacy = PrivacyConfig(target_epsilon=8.0, seed=NOISE_SEED)
    module = PrefixTunedCausalLM(path, prefix=PrefixConfig(num_virtual_tokens=3),
                                 generate_max_new_tokens=2, privacy=privacy)
    data = GenerationData(size=32, batch_size=8, val=None, seed=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    assert module.report_sections["samples"]["test"], "the run's report holds generations of private test data"
    folder = export_release(module, tmp_path / "release")

    checkpoint_module, checkpoint = module_from_checkpoint(
        PrefixTunedCausalLM, tmp_path / "checkpoints/last.ckpt", backbone=path, prefix=PrefixConfig(num_virtual_tokens=3),
        privacy=privacy)
    assert_releases_nothing_secret(folder, ("a reply", str(NOISE_SEED)), checkpoint["state_dict"])
    loaded = load_release(folder)
    assert json.loads((folder / "release.json").read_text())["tokenisation"] is None
    batch = data.collate(data.val[:4])
    with torch.no_grad():
        assert torch.equal(loaded(batch["input_ids"], batch["attention_mask"]),
                           checkpoint_module(batch["input_ids"], batch["attention_mask"]))
    assert loaded.generate_max_new_tokens == 2
