"""Interrupted DP runs resume with their privacy spend intact."""
import pytest
import torch

from pflat_lightning import PrefixTunedClassifier, PrivacyConfig

from helpers import StopAfter, TokenDataModule, quiet_trainer


def make(path):
    torch.manual_seed(0)
    return PrefixTunedClassifier(path, 2, num_virtual_tokens=2, privacy=PrivacyConfig(target_epsilon=3.0, seed=7))


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
    for a, b in zip(resumed.model.prefix.parameters(), whole.model.prefix.parameters()):
        torch.testing.assert_close(a, b)


def test_resume_without_privacy_state_is_refused(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    public = PrefixTunedClassifier(path, 2, num_virtual_tokens=2, privacy=PrivacyConfig(enabled=False))
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
