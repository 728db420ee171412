"""Combinations that would silently break DP are refused before training, with a clear message."""
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig

from helpers import TokenDataModule, quiet_trainer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_epsilon=0.0), r"target_epsilon must be > 0.*got 0.0"),
        (dict(target_epsilon=-1.0), r"target_epsilon must be > 0.*got -1.0"),
        (dict(max_grad_norm=0.0), r"max_grad_norm must be > 0, got 0.0"),
        (dict(noise_multiplier=-0.1), r"noise_multiplier must be >= 0 or None, got -0.1"),
        (dict(target_epsilon=None), r"Set target_epsilon or noise_multiplier"),
        (dict(accountant="gdp"), r"accountant must be one of \('prv', 'rdp'\), got 'gdp'"),
        (dict(grad_sample_mode="ew"), r"grad_sample_mode must be one of .*got 'ew'"),
        (dict(target_delta=1.5), r"target_delta must be in \(0, 1 / dataset size\), got 1.5"),
    ],
)
def test_bad_privacy_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacyConfig(**kwargs)


def test_delta_must_be_below_one_over_n():
    assert PrivacyConfig().delta_for(100) == pytest.approx(100 ** -1.1)
    with pytest.raises(ValueError, match=r"target_delta=0.02 must be < 1/N = 0.01 for N=100"):
        PrivacyConfig(target_delta=0.02).delta_for(100)


@pytest.fixture
def dp_module(tiny_model_dir):
    return PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2))


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_16_bit_precision_is_refused_with_dp(dp_module, precision, tmp_path):
    # fp16 mixed precision (16-mixed, loss scaling) is refused the same way on GPUs; on CPU Lightning
    # turns it into bf16-mixed, which DP supports (the prefix, head and clipping stay fp32).
    with pytest.raises(ValueError, match=r"precision='(bf)?16-true'.*Allowed with DP: \('32-true', '64-true', 'bf16-mixed'\)"):
        quiet_trainer(tmp_path, max_steps=1, precision=precision).fit(dp_module, datamodule=TokenDataModule())


def test_gradient_accumulation_is_refused_with_dp(dp_module, tmp_path):
    with pytest.raises(Exception, match="accumulate_grad_batches"):
        quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(dp_module, datamodule=TokenDataModule())


def test_trainable_backbone_is_refused_with_dp(dp_module, tmp_path):
    dp_module.model.backbone.embeddings.word_embeddings.requires_grad_(True)
    with pytest.raises(ValueError, match=r"Trainable backbone parameters .*word_embeddings.*backbone must stay frozen"):
        quiet_trainer(tmp_path, max_steps=1).fit(dp_module, datamodule=TokenDataModule())


def test_shuffled_loader_is_refused_unless_poisson_is_switched_off(dp_module, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a Poisson training loader"):
        quiet_trainer(tmp_path, max_steps=1).fit(dp_module, datamodule=TokenDataModule(poisson=False))
    shuffled = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                     privacy=PrivacyConfig(poisson_sampling=False))
    quiet_trainer(tmp_path, max_steps=1).fit(shuffled, datamodule=TokenDataModule(poisson=False))
    report = shuffled.privacy_report()
    assert report["formal_guarantee"] is False and "Poisson" in report["reasons"][0]


def test_logical_batch_larger_than_the_dataset_is_refused(dp_module, tmp_path):
    with pytest.raises(ValueError, match=r"batch.*larger than|expected_batch_size must be in \[1, dataset size 64\]"):
        quiet_trainer(tmp_path, max_steps=1).fit(dp_module, datamodule=TokenDataModule(batch_size=100))


def test_unbounded_training_is_refused(dp_module, tmp_path):
    with pytest.raises(ValueError, match="needs a finite plan"):
        quiet_trainer(tmp_path, max_epochs=-1).fit(dp_module, datamodule=TokenDataModule())


def test_unknown_model_path_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"backbone='.*nowhere'"):
        PrefixTunedClassifier(str(tmp_path / "nowhere"), 2)


def test_unsupported_head_and_bad_sizes():
    with pytest.raises(ValueError, match="max_physical_batch_size must be >= 1, got 0"):
        PrefixTunedClassifier("bundled-minilm", 2, max_physical_batch_size=0)


@pytest.mark.parametrize("private", [True, False])
def test_non_finite_loss_stops_before_the_update(private, tiny_model_dir, tmp_path):
    privacy = PrivacyConfig() if private else PrivacyConfig(enabled=False)
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=privacy)
    snapshot = {}

    class PoisonAtStep3(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                snapshot["weights"] = [p.detach().clone() for p in pl_module.model.prefix.parameters()]
                pl_module.model.classifier.bias.data[0] = float("nan")

    with pytest.raises(FloatingPointError, match="Non-finite training loss at step 3 .*not applied"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[PoisonAtStep3()]).fit(
            module, datamodule=TokenDataModule(poisson=private))
    for before, after in zip(snapshot["weights"], module.model.prefix.parameters()):
        assert torch.equal(before, after)


class PoisonAtStep2(Callback):
    """Makes the loss non-finite at step 2: a run that fails in the middle of training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            pl_module.model.classifier.bias.data[0] = float("nan")


BAD_RUNS = {
    # name: (privacy, trainer kwargs, datamodule kwargs, expected error, message)
    "delta >= 1/N": (dict(target_delta=0.05), {}, {}, ValueError, r"target_delta=0.05 must be < 1/N"),
    "noise contradicts epsilon": (dict(noise_multiplier=0.3, target_epsilon=1.0), {}, {}, ValueError, "contradict"),
    "batch > dataset": ({}, {}, dict(batch_size=100), ValueError, r"larger than|dataset size 64"),
    "bf16-true with DP": ({}, dict(precision="bf16-true"), {}, ValueError, "cannot be used with DP"),
    "accumulation with DP": ({}, dict(accumulate_grad_batches=2), {}, Exception, "accumulate_grad_batches"),
    "shuffled loader": ({}, {}, dict(poisson=False), ValueError, "needs a Poisson training loader"),
    "non-finite loss": ({}, dict(callbacks=[PoisonAtStep2()]), {}, FloatingPointError, "Non-finite training loss at step 2"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_refused_or_failed_run_writes_nothing_over_an_earlier_run(case, tiny_model_dir, tmp_path):
    """The earlier run's checkpoints, report and logs in the same folder stay byte-identical."""

    def trainer(**kwargs):
        return pl.Trainer(default_root_dir=tmp_path, max_epochs=2, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, **kwargs)

    earlier = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2))
    trainer().fit(earlier, datamodule=TokenDataModule())
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert any(p.name == "privacy_report.json" for p in files) and any(p.suffix == ".ckpt" for p in files)

    privacy, trainer_kwargs, data_kwargs, error, message = BAD_RUNS[case]
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(**privacy))
    with pytest.raises(error, match=message):
        trainer(**trainer_kwargs).fit(module, datamodule=TokenDataModule(**data_kwargs))
    for path, content in files.items():
        assert path.read_bytes() == content, f"{path} was overwritten"
    reports = [p for p in tmp_path.rglob("privacy_report.json")]
    checkpoints = [p for p in tmp_path.rglob("*.ckpt")]
    assert reports == [p for p in files if p.name == "privacy_report.json"]
    assert checkpoints == [p for p in files if p.suffix == ".ckpt"]
