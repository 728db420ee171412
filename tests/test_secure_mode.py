"""``secure_mode=True``: noise and Poisson masks from the OS's CSPRNG, never from a seed or a checkpointed state."""
import math
from functools import partial

import pytest
import torch
from opacus.accountants import PRVAccountant
from scipy import stats
from torch import nn

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.black_box.tuner import ZerothOrderMechanism
from pflat_lightning.privacy import DPSGDEngine, PoissonBatchSampler, PoissonDataLoader
from pflat_lightning.privacy.report import SEEDED_NOISE, SEEDED_SAMPLING

from helpers import StopAfter, TokenDataModule, collate, quiet_trainer

SIGMA, CLIP, BATCH = 1.3, 0.7, 4
MT_STATE_BYTES = torch.Generator().get_state().numel()  # torch's CPU Mersenne Twister state


def secure_privacy(**kwargs):
    return PrivacyConfig(**{"secure_mode": True, "seed": 0, **kwargs})


def engine_noise(mode, steps, secure=True):
    """The released (scaled) gradients of ``steps`` empty Poisson batches: pure noise ``N(0, (sigma C / B)^2)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2))
    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=SIGMA, target_epsilon=None, max_grad_norm=CLIP,
                                       grad_sample_mode=mode, secure_mode=secure))
    optimizer = engine.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), dataset_size=100,
                              expected_batch_size=BATCH, planned_steps=steps)
    engine.keep_released_gradient = True
    draws = []
    for _ in range(steps):
        optimizer.step()  # an empty Poisson batch: nothing back-propagated
        optimizer.zero_grad(set_to_none=True)
        draws.append(torch.cat([g.flatten() for g in engine.released_gradient]))
    engine.detach()
    return engine, torch.stack(draws)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_secure_noise_ignores_torch_seeds_and_has_the_gaussian_law(mode):
    engine, first = engine_noise(mode, steps=40)
    _, second = engine_noise(mode, steps=40)
    assert engine.state_dict()["generator"] is None and engine._generator is None
    assert not torch.equal(first, second), "torch.manual_seed(0) must not reproduce secure noise"
    _, seeded = engine_noise(mode, steps=2, secure=False)
    assert torch.equal(seeded, engine_noise(mode, steps=2, secure=False)[1]), "the seeded control is reproducible"

    draws = first.double().flatten()  # 40 releases x 162 coordinates, independent N(0, (sigma C / B)^2)
    std, n = SIGMA * CLIP / BATCH, draws.numel()
    assert abs(draws.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(draws.std().item() / std - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(draws.numpy() / std, "norm").pvalue > 1e-4


def test_secure_noise_of_the_black_box_mechanism():
    def release():
        torch.manual_seed(0)
        mechanism = ZerothOrderMechanism(PrivacyConfig(noise_multiplier=SIGMA, target_epsilon=None, max_grad_norm=CLIP,
                                                       secure_mode=True))
        mechanism.plan(dataset_size=100, expected_batch_size=BATCH, planned_steps=1)
        assert mechanism.state_dict()["generator"] is None
        return mechanism.release(torch.zeros(0, 2000))  # an empty batch: the release is the noise over B

    first, second = release(), release()
    assert not torch.equal(first, second)
    std = SIGMA * CLIP / BATCH
    assert abs(first.std().item() / std - 1) < 5 / math.sqrt(2 * first.numel())
    assert stats.kstest(first.double().numpy() / std, "norm").pvalue > 1e-4


def test_two_secure_fits_after_the_same_seeds_release_different_gradients(tiny_model_dir, tmp_path):
    released = []
    for run in range(2):
        torch.manual_seed(0)
        module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                       optimizer=partial(torch.optim.SGD, lr=0.0),
                                       privacy=secure_privacy(target_epsilon=3.0))
        module.engine.keep_released_gradient = True
        quiet_trainer(tmp_path / str(run), max_steps=1).fit(module, datamodule=TokenDataModule(seed=0))
        released.append(torch.cat([g.flatten() for g in module.engine.released_gradient]))
        report = module.privacy_report()
        assert report["formal_guarantee"] is True and report["reasons"] == []
        assert report["noise_generator"] == "os.urandom (CSPRNG)"
    assert not torch.equal(*released)


def test_secure_poisson_masks_ignore_the_seed_and_have_the_sampling_rate():
    size, rate, batches = 20000, 0.05, 20
    runs = [list(PoissonBatchSampler(size, rate, num_batches=batches, seed=0, secure=True)) for _ in range(2)]
    assert runs[0] != runs[1], "the same seed must not give the same secure masks"
    seeded = PoissonBatchSampler(size, rate, num_batches=batches, seed=0)
    assert list(seeded) == list(PoissonBatchSampler(size, rate, num_batches=batches, seed=0))
    for run in runs:
        included = sum(len(b) for b in run)
        trials = size * batches
        assert abs(included - trials * rate) < 5 * math.sqrt(trials * rate * (1 - rate))
        assert all(len(set(b)) == len(b) and all(0 <= i < size for i in b) for b in run)
    sampler = PoissonBatchSampler(size, rate, num_batches=batches, secure=True)
    sampler.fast_forward(7)
    assert len(sampler) == len(list(sampler)) == batches - 7, "a resumed epoch draws only the remaining batches"


def test_secure_sampling_under_data_parallelism_is_refused():
    with pytest.raises(ValueError, match="num_replicas=2: secure Poisson sampling runs in one process"):
        PoissonBatchSampler(100, 0.1, num_replicas=2, rank=0, secure=True)


def generator_states(obj, path="checkpoint"):
    """Paths of torch generators and Mersenne-Twister-sized byte tensors anywhere in ``obj``."""
    if isinstance(obj, torch.Generator):
        return [path]
    if isinstance(obj, torch.Tensor):
        return [path] if obj.dtype == torch.uint8 and obj.numel() == MT_STATE_BYTES else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in generator_states(v, f"{path}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in generator_states(v, f"{path}[{i}]")]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return generator_states(vars(obj), f"{path}.")
    return []


def test_a_secure_checkpoint_holds_no_generator_and_a_resume_keeps_the_spend(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    make = lambda: PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                         privacy=secure_privacy(target_epsilon=3.0))
    ckpt = tmp_path / "interrupted.ckpt"
    first = make()
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[StopAfter(5, ckpt)]).fit(first, datamodule=TokenDataModule())
    checkpoint = torch.load(ckpt, weights_only=False)
    assert checkpoint["pflat_privacy"]["engine"]["generator"] is None
    assert generator_states(checkpoint) == []
    seeded = PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(target_epsilon=3.0))
    quiet_trainer(tmp_path / "s", max_epochs=2, callbacks=[StopAfter(5, tmp_path / "seeded.ckpt")]).fit(
        seeded, datamodule=TokenDataModule())
    assert generator_states(torch.load(tmp_path / "seeded.ckpt", weights_only=False)), "the search finds a seeded state"

    resumed = make()
    quiet_trainer(tmp_path / "b", max_epochs=2).fit(resumed, datamodule=TokenDataModule(), ckpt_path=ckpt)
    engine = resumed.engine
    assert engine.updates == engine.planned_steps == 16 and engine._generator is None
    accountant = PRVAccountant()  # the uninterrupted plan, by hand: 16 releases at the calibrated noise
    accountant.history = [(first.engine.noise_multiplier, 8 / 64, 16)]
    expected = accountant.get_epsilon(delta=first.engine.delta)
    report = resumed.privacy_report()
    assert report["epsilon"] == pytest.approx(expected, rel=1e-6) and report["epsilon"] <= 3.0
    assert report["formal_guarantee"] is True


class SeededUserData(TokenDataModule):
    """A user's datamodule: a seeded Poisson loader that knows nothing of secure_mode."""

    def train_dataloader(self):
        return PoissonDataLoader(self.dataset, expected_batch_size=self.batch_size, collate_fn=collate, seed=self.seed)


def test_secure_mode_refuses_a_seeded_training_loader(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=secure_privacy())
    with pytest.raises(ValueError, match=r"secure_mode=True\) needs a secure Poisson training loader, got "
                                         r"PoissonDataLoader\(secure=False\)"):
        quiet_trainer(tmp_path, max_epochs=1).fit(module, datamodule=SeededUserData())
    assert module.engine.updates == 0
    with pytest.raises(ValueError, match="secure_mode=True needs poisson_sampling=True"):
        PrivacyConfig(secure_mode=True, poisson_sampling=False)


def test_a_seeded_run_reports_no_formal_guarantee(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(seed=918273))
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=TokenDataModule(seed=564738))
    report = module.privacy_report()
    assert report["formal_guarantee"] is False and report["reasons"] == [SEEDED_NOISE, SEEDED_SAMPLING]
    assert report["noise_generator"] == "seeded pseudo-random (PrivacyConfig.seed)"
    text = (tmp_path / "privacy_report.md").read_text()
    assert "does NOT hold" in text and "918273" not in text and "564738" not in text
