"""PrefixTunedClassifier behaviour: heads, non-private mode, empty batches, guards, report."""
import json
from functools import partial

import pytest
import torch

from pflat_lightning import PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.privacy import epsilon_of

from helpers import SEEDED_NOISE, SEEDED_REASONS, TokenDataModule, quiet_trainer


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_label_word_head_reads_the_lm_logits_of_the_label_words(family, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    path = tiny_model_dir(family)
    module = PrefixTunedClassifier(path, 2, head="label_words", label_words=["bad", "good"], num_virtual_tokens=2,
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
    private = PrefixTunedClassifier(path, 2, num_virtual_tokens=2)
    torch.manual_seed(0)
    public = PrefixTunedClassifier(path, 2, num_virtual_tokens=2, privacy=PrivacyConfig(enabled=False),
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
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, num_virtual_tokens=2,
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

    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, num_virtual_tokens=2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, logger=CSVLogger(tmp_path), limit_val_batches=1.0)
    trainer.fit(module, datamodule=TokenDataModule())
    trainer.test(module, datamodule=TokenDataModule())
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "privacy_report.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "epochs", "max_grad_norm",
                "accountant", "dataset_size", "formal_guarantee", "ledger", "metrics"):
        assert key in report
    assert report["steps"] == 8 and report["dataset_size"] == 64 and report["epochs"] == 1
    assert {"val_acc", "test_acc"} <= set(report["metrics"])
    markdown = (tmp_path / "lightning_logs" / "version_0" / "privacy_report.md").read_text()
    assert markdown.startswith("# Privacy report")
    # Seeded noise and batches (the default) are reproducible from the run's files: no formal guarantee, and why.
    assert report["noise_generator"] == "seeded pseudo-random (PrivacyConfig.seed)"
    assert report["formal_guarantee"] is False and report["reasons"] == SEEDED_REASONS
    assert "does NOT hold" in markdown and f"- {SEEDED_NOISE}" in markdown


def test_logging_the_training_loss_is_a_ledger_entry(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, num_virtual_tokens=2, log_train_loss=True)
    quiet_trainer(tmp_path, max_steps=2).fit(module, datamodule=TokenDataModule())
    report = module.privacy_report()
    assert report["formal_guarantee"] is False
    assert [e["status"] for e in report["ledger"]] == ["unaccounted"]
