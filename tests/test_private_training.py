"""PrivateTraining, the one home of a private fit: DP-SGD (DPPrefixModule) and the zeroth-order mechanism
(BlackBoxPromptTuner) share its report, its checkpointed privacy state and its rank-zero writing."""
import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.privacy import DPSGDEngine, PoissonDataLoader, PrivateTraining

from helpers import StopAfter, TokenDataModule, quiet_trainer
from test_black_box import data_for, reviews, scorers, tuner_for  # noqa: F401  (the last two are fixtures)

PRIVACY = dict(target_epsilon=3.0, accountant="rdp")


class SecondRank(SingleDeviceStrategy):
    """One process that is rank 1 of a data-parallel run: what every rank but the first runs."""

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))
        self.global_rank = 1

    @property
    def is_global_zero(self) -> bool:
        return False


def module_run(tiny_model_dir):
    return PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2), privacy=PrivacyConfig(**PRIVACY)), \
        TokenDataModule()


def tuner_run(tiny_model_dir, scorers, reviews):
    return tuner_for(scorers("gpt2"), PrivacyConfig(**PRIVACY)), data_for(reviews, tiny_model_dir("gpt2"))


RUNS = {"DPPrefixModule": module_run, "BlackBoxPromptTuner": tuner_run}


@pytest.fixture
def make_run(tiny_model_dir, scorers, reviews):  # noqa: F811
    def make(kind):
        return module_run(tiny_model_dir) if kind == "DPPrefixModule" else tuner_run(tiny_model_dir, scorers, reviews)
    return make


def test_both_mechanisms_report_the_same_keys_and_checkpoint_the_same_privacy_state(make_run, tmp_path):
    reports, states = {}, {}
    for kind in RUNS:
        model, data = make_run(kind)
        trainer = quiet_trainer(tmp_path / kind, max_steps=2)
        trainer.fit(model, datamodule=data)
        trainer.save_checkpoint(tmp_path / kind / "run.ckpt")
        reports[kind] = json.loads((tmp_path / kind / "privacy_report.json").read_text())
        checkpoint = torch.load(tmp_path / kind / "run.ckpt", weights_only=False)
        assert checkpoint["pflat_run_id"] == model.run_id == reports[kind]["run_id"]
        state = checkpoint["pflat_privacy"]
        # The state is the run's spend: two releases at the calibrated noise, both in the report too.
        assert state["engine"]["updates"] == reports[kind]["steps"] == 2
        assert state["engine"]["history"] == reports[kind]["accountant_history"] == [
            [model.engine.noise_multiplier, model.engine.sample_rate, 2]]
        states[kind] = state
    module, tuner = (reports[kind] for kind in RUNS)
    assert set(module) == set(tuner)
    module, tuner = (states[kind] for kind in RUNS)
    assert set(module) == set(tuner) == {"engine", "ledger"}
    assert set(module["ledger"]) == set(tuner["ledger"])
    # The accounting state is one layout; DP-SGD adds its clipping's own (the bounds of clipping="group").
    assert set(module["engine"]) - set(tuner["engine"]) == {"group_bounds"} and set(tuner["engine"]) < set(module["engine"])


@pytest.mark.parametrize("kind", list(RUNS))
def test_only_global_rank_zero_writes_the_report(kind, make_run, tmp_path):
    model, data = make_run(kind)
    model.report_dir = tmp_path  # the folder rank zero chose and broadcast (report_folder, a collective call)
    quiet_trainer(tmp_path, strategy=SecondRank(), limit_test_batches=1).test(model, datamodule=data)
    assert not list(tmp_path.rglob("privacy_report.*"))
    quiet_trainer(tmp_path, limit_test_batches=1).test(model, datamodule=data)
    assert json.loads((tmp_path / "privacy_report.json").read_text())["run_id"] == model.run_id


def test_a_checkpoint_saved_before_training_keeps_the_restored_privacy_state(tiny_model_dir, tmp_path):
    """Restored for validation and saved again, a DP checkpoint keeps its spend: training resumes from it."""
    model, data = module_run(tiny_model_dir)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[StopAfter(2, tmp_path / "interrupted.ckpt")]).fit(model, datamodule=data)
    restored, _ = module_run(tiny_model_dir)
    trainer = quiet_trainer(tmp_path, limit_val_batches=1)
    trainer.validate(restored, datamodule=data, ckpt_path=tmp_path / "interrupted.ckpt")
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    before, after = (torch.load(tmp_path / name, weights_only=False)["pflat_privacy"]
                     for name in ("interrupted.ckpt", "again.ckpt"))
    assert after["engine"]["history"] == before["engine"]["history"] and after["engine"]["updates"] == 2
    resumed, _ = module_run(tiny_model_dir)
    quiet_trainer(tmp_path, max_steps=4).fit(resumed, datamodule=data, ckpt_path=tmp_path / "again.ckpt")
    assert resumed.engine.updates == 4
    assert resumed.engine.history == [(model.engine.noise_multiplier, model.engine.sample_rate, 4)]


class LinearTask(PrivateTraining):
    """PrivateTraining's docstring example: a private fit of a linear model, written from scratch."""

    MECHANISM = DPSGDEngine

    def __init__(self, privacy: PrivacyConfig) -> None:
        super().__init__(privacy=privacy)
        self.net = torch.nn.Linear(4, 2)

    def configure_optimizers(self):
        dataset_size, expected_batch, planned = self.plan_private_fit()
        return self.engine.attach(self.net, torch.optim.SGD(self.net.parameters(), lr=0.1),
                                  dataset_size=dataset_size, expected_batch_size=expected_batch, planned_steps=planned)

    def training_step(self, batch, batch_idx):
        self.engine.backward(F.cross_entropy(self.net(batch["x"]), batch["labels"], reduction="none"))
        self.optimizers().step()
        self.optimizers().zero_grad(set_to_none=True)
        self.log_epsilon()


class Points(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g))
        return PoissonDataLoader(data, expected_batch_size=4, seed=0, collate_fn=lambda items: {
            "x": torch.stack([x for x, _ in items]) if items else torch.zeros(0, 4),
            "labels": torch.stack([y for _, y in items]) if items else torch.zeros(0, dtype=torch.long)})


def test_a_new_lightning_module_gets_the_whole_private_fit_from_private_training(tmp_path):
    task = LinearTask(PrivacyConfig(target_epsilon=2.0, accountant="rdp"))
    trainer = quiet_trainer(tmp_path, max_epochs=3)
    trainer.fit(task, datamodule=Points())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    engine = task.engine
    assert engine.updates == 30 and engine.sample_rate == 4 / 40  # every planned step, empty batches included
    reference = RDPAccountant()
    reference.history = [(engine.noise_multiplier, 4 / 40, 30)]
    epsilon = reference.get_epsilon(delta=40 ** -1.1)
    assert 2.0 * 0.97 < epsilon <= 2.0
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["epsilon"] == pytest.approx(epsilon, rel=1e-9) and report["steps"] == 30
    assert float(trainer.callback_metrics["epsilon"]) == pytest.approx(epsilon, rel=1e-6)
    assert torch.load(tmp_path / "run.ckpt", weights_only=False)["pflat_privacy"]["engine"]["updates"] == 30


def test_a_subclass_must_name_its_mechanism():
    class NoMechanism(PrivateTraining):
        pass

    with pytest.raises(TypeError, match="NoMechanism must name its privacy mechanism in the class attribute MECHANISM"):
        NoMechanism()
