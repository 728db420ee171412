"""PrefixTunedClassifier behaviour: heads, non-private mode, empty batches, guards, report."""
import json
from functools import partial

import pytest
import torch

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.privacy import epsilon_of

from helpers import SEEDED_NOISE, SEEDED_REASONS, TokenDataModule, quiet_trainer


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_label_word_head_reads_the_lm_logits_of_the_label_words(family, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    path = tiny_model_dir(family)
    module = PrefixTunedClassifier(path, 2, head="label_words", label_words=["bad", "good"],
                                   prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([[101, 2000, 2001, tokenizer.mask_token_id, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = module(ids, mask)
        # Independent: the full LM's vocabulary logits at the read position, with the same prefix cache.
        lm = (AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM).from_pretrained(path).eval()
        hidden = module.model.hidden_states(ids, mask)
        head = lm.cls if family == "bert" else lm.lm_head
        position = 3 if family == "bert" else 4
        vocab = head(hidden[:, position])
    words = tokenizer.convert_tokens_to_ids(["bad", "good"])
    torch.testing.assert_close(logits, vocab[:, words])


def test_multi_token_label_word_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="label word 'unbelievably' is .* tokens"):
        PrefixTunedClassifier(tiny_model_dir("bert"), 2, head="label_words", label_words=["bad", "unbelievably"])


def test_non_private_mode_trains_the_identical_model_and_says_so(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    torch.manual_seed(0)
    private = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2))
    torch.manual_seed(0)
    public = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False),
                                   optimizer=partial(torch.optim.SGD, lr=0.5))
    assert [n for n, _ in private.named_parameters()] == [n for n, _ in public.named_parameters()]
    for a, b in zip(private.parameters(), public.parameters()):
        assert torch.equal(a, b)
    before = public.model.prefix.layers[0].weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(public, datamodule=TokenDataModule(poisson=False))
    assert not torch.equal(before, public.model.prefix.layers[0].weight)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["epsilon"] is None and report["formal_guarantee"] is False
    assert "privacy disabled" in report["reasons"][0]


def test_empty_poisson_batches_are_noise_only_steps_and_epsilon_is_in_the_progress_bar(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(target_epsilon=8.0))
    seen = []
    original = module.training_step

    def spy(batch, batch_idx):
        seen.append(batch["labels"].shape[0])
        return original(batch, batch_idx)

    module.training_step = spy
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=TokenDataModule(size=64, batch_size=1))  # q = 1/64: many empty batches
    assert 0 in seen, "the test needs an empty Poisson batch"
    assert module.engine.updates == len(seen) == 64
    # The progress bar's epsilon is the accountant's for the history up to the step it names.
    shown, at_step = trainer.progress_bar_metrics["epsilon"], int(trainer.callback_metrics["epsilon_at_step"])
    assert 0 < at_step <= 64
    assert shown == pytest.approx(epsilon_of([(module.engine.noise_multiplier, 1 / 64, at_step)], 64 ** -1.1, "prv"))


def test_report_is_written_to_the_log_dir(tiny_model_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2))
    trainer = quiet_trainer(tmp_path, max_epochs=1, logger=CSVLogger(tmp_path), limit_val_batches=1.0)
    trainer.fit(module, datamodule=TokenDataModule())
    trainer.test(module, datamodule=TokenDataModule())
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "privacy_report.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "epochs", "max_grad_norm",
                "accountant", "dataset_size", "formal_guarantee", "ledger", "metrics"):
        assert key in report
    assert report["steps"] == 8 and report["dataset_size"] == 64 and report["epochs"] == 1
    assert {"val_acc", "val_f1", "test_acc", "test_f1"} <= set(report["metrics"])
    # Independent: accuracy and macro-F1 (per-class F1 = 2 TP / (2 TP + FP + FN), averaged) from the predictions.
    data = TokenDataModule().dataset
    with torch.no_grad():
        predicted = module.eval()(data.input_ids, data.attention_mask).argmax(-1)
    f1 = [2 * ((predicted == c) & (data.labels == c)).sum() / ((predicted == c).sum() + (data.labels == c).sum())
          for c in (0, 1)]
    assert report["metrics"]["test_acc"] == pytest.approx((predicted == data.labels).float().mean().item(), abs=1e-6)
    assert report["metrics"]["test_f1"] == pytest.approx(sum(f1).item() / 2, abs=1e-6)
    markdown = (tmp_path / "lightning_logs" / "version_0" / "privacy_report.md").read_text()
    assert markdown.startswith("# Privacy report")
    # Seeded noise and batches (the default) are reproducible from the run's files: no formal guarantee, and why.
    assert report["noise_generator"] == "seeded pseudo-random (PrivacyConfig.seed)"
    assert report["formal_guarantee"] is False and report["reasons"] == SEEDED_REASONS
    assert "does NOT hold" in markdown and f"- {SEEDED_NOISE}" in markdown


def test_logging_the_training_loss_is_a_ledger_entry(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   log_train_loss=True)
    quiet_trainer(tmp_path, max_steps=2).fit(module, datamodule=TokenDataModule())
    report = module.privacy_report()
    assert report["formal_guarantee"] is False
    assert [e["status"] for e in report["ledger"]] == ["unaccounted"]


@pytest.mark.parametrize("monitor, recorded", [("val_loss", True), ("val_acc", True), (None, False), ("epsilon", False)])
def test_selecting_on_a_validation_metric_is_a_held_out_ledger_entry(monitor, recorded, tiny_model_dir, tmp_path):
    """ModelCheckpoint/EarlyStopping on a validation metric choose the released model with held-out private
    data: recorded, the training set's guarantee unaffected. No monitor, or one on epsilon, reads none."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(secure_mode=True))
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=monitor)]
    if monitor is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max" if monitor != "val_loss" else "min"))
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=1, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, datamodule=TokenDataModule())
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    held_out = sorted(e["component"] for e in report["ledger"] if e["status"] == "held_out")
    assert held_out == (["EarlyStopping", "ModelCheckpoint"] if recorded else [])
    assert report["formal_guarantee"] is True and report["reasons"] == []
    markdown = (tmp_path / "privacy_report.md").read_text()
    assert ("`held_out`: private data held out of training" in markdown) == recorded
    assert ("the held-out examples get no protection" in markdown) == recorded


def test_a_dp_report_says_that_aborting_on_a_non_finite_loss_is_outside_the_accountant(tiny_model_dir, tmp_path):
    private = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2))
    quiet_trainer(tmp_path / "dp", max_steps=1).fit(private, datamodule=TokenDataModule())
    report = json.loads((tmp_path / "dp" / "privacy_report.json").read_text())
    assert len(report["caveats"]) == 1 and "non-finite loss" in report["caveats"][0]
    assert "one-bit, data-dependent signal outside the accountant" in report["caveats"][0]
    assert "Caveats:" in (tmp_path / "dp" / "privacy_report.md").read_text()
    public = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False))
    quiet_trainer(tmp_path / "plain", max_steps=1).fit(public, datamodule=TokenDataModule())
    assert json.loads((tmp_path / "plain" / "privacy_report.json").read_text())["caveats"] == []


def test_runs_without_a_logger_never_overwrite_each_others_report(tiny_model_dir, tmp_path):
    """logger=False: the report folder is default_root_dir for both runs. The first keeps it; the second
    gets privacy_reports/version_0; fit then test of one run, and a section added later, update its own."""
    from pflat_lightning.privacy.report import add_section, write_report

    def run(**kwargs):
        module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2), **kwargs)
        trainer = quiet_trainer(tmp_path, max_steps=2)
        trainer.fit(module, datamodule=TokenDataModule())
        trainer.test(module, datamodule=TokenDataModule())
        return module

    first = run()
    assert first.report_dir == tmp_path and sorted(tmp_path.rglob("privacy_report.json")) == [tmp_path / "privacy_report.json"]
    before = (tmp_path / "privacy_report.json").read_bytes()
    second = run(privacy=PrivacyConfig(enabled=False))
    assert (tmp_path / "privacy_report.json").read_bytes() == before, "the first run's report was overwritten"
    assert second.report_dir == tmp_path / "privacy_reports" / "version_0"
    reports = {p: json.loads(p.read_text()) for p in tmp_path.rglob("privacy_report.json")}
    assert set(reports) == {tmp_path / "privacy_report.json", second.report_dir / "privacy_report.json"}
    assert reports[second.report_dir / "privacy_report.json"]["run_id"] == second.run_id != first.run_id
    assert reports[second.report_dir / "privacy_report.json"]["epsilon"] is None  # the second run's, tested too
    assert "test_acc" in reports[second.report_dir / "privacy_report.json"]["metrics"]

    assert add_section(tmp_path, "later", {"x": 1}, run_id=second.run_id) == second.report_dir / "privacy_report.json"
    assert "later" not in json.loads((tmp_path / "privacy_report.json").read_text())["callbacks"]
    assert add_section(tmp_path, "later", {"x": 1}, run_id="another run") is None
    with pytest.raises(FileExistsError, match="is the report of another run"):
        write_report({**reports[second.report_dir / "privacy_report.json"], "run_id": "another run"}, tmp_path)
    assert (tmp_path / "privacy_report.json").read_bytes() == before


# ---------------------------------------------------------------- clone_untrained
INIT_TEXT = "the film was long but the ending was worth it"


def state_copy(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("family, head", [("bert", "linear"), ("llama", "label_words")])
def test_clone_untrained_shares_the_backbone_and_starts_untrained(family, head, tiny_model_dir, tmp_path):
    path = tiny_model_dir(family)
    prefix = PrefixConfig(num_virtual_tokens=3, init_text=INIT_TEXT)
    words = {"label_words": ["bad", "good"]} if head == "label_words" else {}
    module = PrefixTunedClassifier(path, 2, head=head, **words, prefix=prefix, privacy=PrivacyConfig(enabled=False),
                                   optimizer=partial(torch.optim.SGD, lr=0.5))
    quiet_trainer(tmp_path / "original", max_epochs=1).fit(module, datamodule=TokenDataModule(poisson=False))
    trained = state_copy(module)

    clone = module.clone_untrained(privacy=PrivacyConfig(target_epsilon=3.0, seed=1))
    assert type(clone) is PrefixTunedClassifier and clone.is_private and not module.is_private
    assert clone.hparams["prefix"] == prefix and clone.hparams["head"] == head
    assert clone.optimizer_factory is module.optimizer_factory and clone.tokenizer is module.tokenizer
    own = dict(clone.model.backbone.named_parameters())
    for name, param in module.model.backbone.named_parameters():
        assert own[name].data_ptr() == param.data_ptr(), f"{name} is a second copy"
    # Untouched: the prefix the configuration gives an independently built module (its backbone read from disk).
    fresh = PrefixTunedClassifier(path, 2, head=head, **words, prefix=prefix, privacy=PrivacyConfig(enabled=False))
    for (name, mine), theirs in zip(clone.model.prefix.named_parameters(), fresh.model.prefix.parameters()):
        torch.testing.assert_close(mine, theirs, msg=name)
    assert not torch.allclose(clone.model.prefix.layers[0].weight, module.model.prefix.layers[0].weight)
    assert [e.component for e in clone.ledger.entries] == ["prefix initialisation"]

    quiet_trainer(tmp_path / "clone", max_epochs=1).fit(clone, datamodule=TokenDataModule())
    assert clone.engine.updates > 0
    assert not torch.equal(clone.model.prefix.layers[0].weight, fresh.model.prefix.layers[0].weight), "the clone trained"
    after = module.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(after[name], tensor), f"training the clone changed the original's {name}"


def test_clone_untrained_draws_a_fresh_normal_prefix_and_keeps_the_architecture(tiny_model_dir):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2))
    torch.manual_seed(3)
    first = module.clone_untrained()
    torch.manual_seed(3)
    second = module.clone_untrained()
    assert torch.equal(first.model.prefix.layers[0].weight, second.model.prefix.layers[0].weight)  # the torch seed
    assert not torch.equal(first.model.prefix.layers[0].weight, module.model.prefix.layers[0].weight)
    with pytest.raises(ValueError, match=r"clone_untrained cannot override \['seed', 'head', 'prefix'\]: it takes "
                                         r"PrefixTunedClassifier's constructor arguments except the architecture's"):
        module.clone_untrained(seed=1, head="label_words", prefix=PrefixConfig(num_virtual_tokens=3))
