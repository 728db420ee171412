"""Interrupted DP runs resume with their privacy spend intact, and a resume cannot hide a change of callbacks."""
import pytest
import torch

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.callbacks import AdversarialWeightPerturbation, TeacherDistillation

from helpers import StopAfter, TokenDataModule, assert_same_trained_weights, quiet_trainer


def make(path):
    torch.manual_seed(0)
    return PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                 privacy=PrivacyConfig(target_epsilon=3.0, seed=7))


@pytest.mark.parametrize("stop_at", [5, 8, 11])
def test_resume_gives_the_same_epsilon_steps_and_weights(stop_at, tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    whole = make(path)
    quiet_trainer(tmp_path / "whole", max_epochs=2).fit(whole, datamodule=TokenDataModule())

    ckpt = tmp_path / "interrupted.ckpt"
    first = make(path)
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[StopAfter(stop_at, ckpt)]).fit(first, datamodule=TokenDataModule())
    assert first.engine.updates == stop_at
    resumed = make(path)
    quiet_trainer(tmp_path / "b", max_epochs=2).fit(resumed, datamodule=TokenDataModule(), ckpt_path=ckpt)

    assert resumed.engine.updates == whole.engine.updates == 16
    assert resumed.engine.history == whole.engine.history
    assert resumed.privacy_report()["epsilon"] == pytest.approx(whole.privacy_report()["epsilon"], rel=1e-12)
    # Same Poisson draws and the same noise stream: the resumed run is the uninterrupted run.
    assert_same_trained_weights(resumed, whole)


def test_resume_without_privacy_state_is_refused(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    public = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False))
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(public, datamodule=TokenDataModule(poisson=False))
    ckpt = tmp_path / "public.ckpt"
    trainer.save_checkpoint(ckpt)
    private = make(path)
    with pytest.raises(ValueError, match="holds no privacy state"):
        quiet_trainer(tmp_path, max_epochs=2).fit(private, datamodule=TokenDataModule(), ckpt_path=ckpt)


def test_training_never_exceeds_the_planned_budget(tiny_model_dir, tmp_path):
    """Resuming with a longer schedule must not spend past the budget the noise was calibrated for."""
    path = tiny_model_dir("bert")
    ckpt = tmp_path / "c.ckpt"
    first = make(path)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[StopAfter(10, ckpt)]).fit(first, datamodule=TokenDataModule())
    longer = make(path)
    quiet_trainer(tmp_path, max_epochs=5).fit(longer, datamodule=TokenDataModule(), ckpt_path=ckpt)
    assert longer.engine.updates == 16
    assert longer.privacy_report()["epsilon"] <= 3.0


def test_a_mid_epoch_resume_under_limit_train_batches_draws_the_uninterrupted_batches(tiny_model_dir, tmp_path):
    """Epochs of 5 of the loader's 8 Poisson batches, stopped in the second epoch: the resumed run must skip
    the 2 batches that epoch already trained on, not count epochs as 8 batches long and redraw them."""
    path = tiny_model_dir("bert")
    whole = make(path)
    quiet_trainer(tmp_path / "whole", max_epochs=2, limit_train_batches=5).fit(whole, datamodule=TokenDataModule())
    ckpt = tmp_path / "interrupted.ckpt"
    quiet_trainer(tmp_path / "a", max_epochs=2, limit_train_batches=5, callbacks=[StopAfter(7, ckpt)]).fit(
        make(path), datamodule=TokenDataModule())
    resumed = make(path)
    quiet_trainer(tmp_path / "b", max_epochs=2, limit_train_batches=5).fit(resumed, datamodule=TokenDataModule(),
                                                                            ckpt_path=ckpt)
    assert resumed.engine.updates == whole.engine.updates == 10
    assert resumed.engine.history == whole.engine.history
    assert_same_trained_weights(resumed, whole)


@pytest.mark.parametrize("added, refusal", [
    (lambda: AdversarialWeightPerturbation(direction="raw"), None),
    (lambda: AdversarialWeightPerturbation(direction="fresh_private"), "calibrated for 16 Gaussian releases, this run plans 24"),
    (lambda: TeacherDistillation("private_dp", teacher_epochs=1), "when resuming a run that had none"),
    (lambda: TeacherDistillation("public", warm_start=True, teacher_epochs=1), "would overwrite the resumed weights"),
], ids=["raw AWP", "fresh_private AWP", "private_dp teacher", "warm start"])
def test_a_callback_added_on_resume_is_reported_or_refused(added, refusal, tiny_model_dir, tmp_path):
    """The checkpoint's ledger does not replace what the resumed run's callbacks record, and a callback
    whose releases the checkpoint's noise was not calibrated for is refused before any training."""
    path = tiny_model_dir("bert")
    ckpt = tmp_path / "interrupted.ckpt"
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[StopAfter(5, ckpt)]).fit(make(path), datamodule=TokenDataModule())
    resumed = make(path)
    trainer = quiet_trainer(tmp_path / "b", max_epochs=2, callbacks=[added()])
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            trainer.fit(resumed, datamodule=TokenDataModule(), ckpt_path=ckpt)
        assert resumed.engine.updates == 5, "refused before any step"
        return
    trainer.fit(resumed, datamodule=TokenDataModule(), ckpt_path=ckpt)
    report = resumed.privacy_report()
    assert not report["formal_guarantee"]
    assert [r.split(":")[0] for r in report["reasons"]] == ["AdversarialWeightPerturbation", "noise", "sampling"]
    assert [e["component"] for e in report["ledger"]] == ["AdversarialWeightPerturbation"]
