"""The three flattening callbacks: privacy accounting, exact perturbation, pruning, distillation."""
import copy
import json
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from opacus.accountants import PRVAccountant, RDPAccountant

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.callbacks import AdversarialWeightPerturbation, SharpnessLayerSelection, TeacherDistillation
from pflat_lightning.checkpointing import trainable_state
from pflat_lightning.landscape.measures import gradient_direction
from pflat_lightning.protocol import layer_groups

from helpers import SEEDED_REASONS, StopAfter, TokenDataModule, assert_same_trained_weights, collate, quiet_trainer


def make(path, privacy=None, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("prefix", PrefixConfig(num_virtual_tokens=2))
    return PrefixTunedClassifier(path, 2, privacy=privacy or PrivacyConfig(target_epsilon=3.0, seed=1), **kwargs)


# ---------------------------------------------------------------- AWP
def test_previous_private_awp_costs_no_privacy(tiny_model_dir, tmp_path):
    path = tiny_model_dir("bert")
    plain, awp = make(path), make(path)
    quiet_trainer(tmp_path, max_epochs=2).fit(plain, datamodule=TokenDataModule())
    callback = AdversarialWeightPerturbation(gamma=0.05)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(awp, datamodule=TokenDataModule())
    assert callback.perturbed_steps == 7  # half of 16 steps, the first has no previous gradient yet
    assert awp.engine.history == plain.engine.history
    assert awp.engine.noise_multiplier == plain.engine.noise_multiplier
    assert awp.privacy_report()["epsilon"] == plain.privacy_report()["epsilon"]
    assert awp.privacy_report()["reasons"] == SEEDED_REASONS, "nothing but the seeded randomness voids the guarantee"
    assert awp.privacy_report()["callbacks"]["AdversarialWeightPerturbation"] == {
        "gamma": 0.05, "direction": "previous_private", "perturbed_steps": 7,
        "schedule": "first 0.5 of the planned steps"}
    assert not torch.equal(awp.prefix.layers[0].weight, plain.prefix.layers[0].weight), "AWP changed training"


@pytest.fixture
def loaders_secure(monkeypatch):
    """Whether each Poisson loader built during the test draws from the CSPRNG, in the order they are built."""
    from pflat_lightning.privacy import PoissonDataLoader

    secure = []
    build = PoissonDataLoader.__init__

    def recording(self, *args, **kwargs):
        secure.append(kwargs.get("secure"))
        build(self, *args, **kwargs)

    monkeypatch.setattr(PoissonDataLoader, "__init__", recording)
    return secure


def test_fresh_private_awp_adds_one_release_per_perturbed_step(tiny_model_dir, tmp_path, loaders_secure):
    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=3.0, secure_mode=True))
    callback = AdversarialWeightPerturbation(gamma=0.05, direction="fresh_private", until_fraction=0.5)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    assert loaders_secure == [True, True], "under secure_mode the ascent draws (second loader) come from the CSPRNG too"
    engine = module.engine
    assert engine.updates == 16 and callback.perturbed_steps == 8
    assert engine.compositions == 16 + 8
    reference = PRVAccountant()
    reference.history = [(engine.noise_multiplier, 8 / 64, 24)]
    report = module.privacy_report()
    assert report["epsilon"] == pytest.approx(reference.get_epsilon(delta=64 ** -1.1), rel=1e-9)
    assert 3.0 - 0.05 < report["epsilon"] <= 3.0, "the noise is calibrated for the extra releases"
    assert report["formal_guarantee"] is True and engine.state_dict()["generator"] is None


def test_fresh_private_awp_until_epoch_plans_every_batch_of_those_epochs(tiny_model_dir, tmp_path):
    """max_steps=12 cuts a 3-epoch run of 8-batch epochs: epoch 0 perturbs all 8 of its steps, not
    12 // 3 = 4, and the noise must be calibrated for 12 + 8 releases."""
    module = make(tiny_model_dir("bert"))
    callback = AdversarialWeightPerturbation(gamma=0.05, direction="fresh_private", until_epoch=1)
    quiet_trainer(tmp_path, max_epochs=3, max_steps=12, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    engine = module.engine
    assert engine.updates == 12 and callback.perturbed_steps == 8 and engine.compositions == 20
    reference = PRVAccountant()
    reference.history = [(engine.noise_multiplier, 8 / 64, 20)]
    epsilon = reference.get_epsilon(delta=64 ** -1.1)
    assert module.privacy_report()["epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert 3.0 - 0.05 < epsilon <= 3.0


class UndeclaredRelease(Callback):
    """A callback that releases a private gradient without declaring it in ``engine.extra_releases``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.engine.backward(pl_module.example_losses(batch))
        pl_module.engine.release_gradient()


def test_a_release_the_noise_was_not_calibrated_for_is_refused(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"))
    with pytest.raises(RuntimeError, match="noise was calibrated for 16 releases"):
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[UndeclaredRelease()]).fit(module, datamodule=TokenDataModule())
    assert module.engine.compositions == 0, "refused before the release"


def test_raw_awp_voids_the_formal_guarantee(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"))
    quiet_trainer(tmp_path, max_steps=2, callbacks=[AdversarialWeightPerturbation(direction="raw")]).fit(
        module, datamodule=TokenDataModule())
    report = module.privacy_report()
    assert report["formal_guarantee"] is False
    assert any("raw" in reason for reason in report["reasons"])


class PerturbationSpy(Callback):
    """Placed after AWP: sees the perturbed weights at batch start, the updated ones at batch end."""

    def __init__(self):
        self.previous, self.ratios = None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.previous is not None:
            for params in layer_groups(pl_module).values():
                v = torch.sqrt(sum(((p - self.previous[p]) ** 2).sum() for p in params))
                w = torch.sqrt(sum((self.previous[p] ** 2).sum() for p in params))
                self.ratios.append(float(v / w))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.previous = {p: p.detach().clone() for ps in layer_groups(pl_module).values() for p in ps}


def test_per_layer_perturbation_norm_is_gamma_times_layer_norm(tiny_model_dir, tmp_path):
    spy = PerturbationSpy()
    module = make(tiny_model_dir("gpt2"))
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[AdversarialWeightPerturbation(gamma=0.03, until_fraction=1.0), spy]
                  ).fit(module, datamodule=TokenDataModule())
    assert len(spy.ratios) == 7 * 2  # 7 perturbed steps after the first, 2 prefix layers
    assert spy.ratios == pytest.approx([0.03] * 14, rel=1e-4)


def test_update_uses_the_gradient_at_the_perturbed_point_and_restores_exactly(tiny_model_dir, tmp_path):
    gamma = 0.2
    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(enabled=False), optimizer=partial(torch.optim.SGD, lr=1.0))
    data = TokenDataModule(poisson=False)
    batch = collate([data.dataset[i] for i in range(8)])
    reference = copy.deepcopy(module.model)
    groups = {f"prefix.layers.{i}": list(reference.prefix.layers[i].parameters()) for i in range(2)}
    params = [p for p in reference.parameters() if p.requires_grad]

    def mean_loss():
        return F.cross_entropy(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    start = [p.detach().clone() for p in params]
    direction = dict(zip(params, torch.autograd.grad(mean_loss(), params)))
    with torch.no_grad():
        for group in groups.values():
            w = torch.sqrt(sum((p ** 2).sum() for p in group))
            d = torch.sqrt(sum((direction[p] ** 2).sum() for p in group))
            for p in group:
                p.add_(gamma * w / d * direction[p])
    at_perturbed = torch.autograd.grad(mean_loss(), params)
    expected = [w - g for w, g in zip(start, at_perturbed)]

    callback = AdversarialWeightPerturbation(gamma=gamma, direction="raw", until_fraction=1.0)
    quiet_trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, datamodule=data)
    got = [p for p in module.model.parameters() if p.requires_grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


class Plain(pl.LightningModule):
    """A plain LightningModule (automatic optimization) with two layers."""

    def __init__(self, lr=0.1):
        super().__init__()
        self.encoder, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        self.lr = lr

    def example_losses(self, batch):
        return F.cross_entropy(self.head(torch.tanh(self.encoder(batch["x"]))), batch["labels"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.example_losses(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def plain_loader():
    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(32)]
    return torch.utils.data.DataLoader(data, batch_size=8)


def test_awp_on_a_plain_lightning_module(tmp_path):
    loader = plain_loader()
    spy = PerturbationSpy()
    model = Plain()
    assert set(layer_groups(model)) == {"encoder", "head"}
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[AdversarialWeightPerturbation(gamma=0.1, until_fraction=1.0), spy]
                  ).fit(model, train_dataloaders=loader)
    assert spy.ratios == pytest.approx([0.1] * 6, rel=1e-4)


@pytest.mark.parametrize("direction", ["previous_private", "fresh_private", "raw"])
def test_awp_leaves_no_perturbation_in_a_plain_modules_weights(direction, tmp_path):
    """lr=0: the update changes nothing, so every weight must end exactly where it started."""
    model = Plain(lr=0.0)
    start = [p.detach().clone() for p in model.parameters()]
    callback = AdversarialWeightPerturbation(gamma=0.1, direction=direction, until_fraction=1.0)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, train_dataloaders=plain_loader())
    assert callback.perturbed_steps == (7 if direction == "previous_private" else 8)
    assert max(float((p - w).abs().max()) for p, w in zip(model.parameters(), start)) == 0.0


@pytest.mark.parametrize("direction", ["previous_private", "fresh_private", "raw"])
def test_awp_refuses_gradient_accumulation_before_any_weight_changes(direction, tmp_path):
    model = Plain(lr=0.0)
    start = [p.detach().clone() for p in model.parameters()]
    callback = AdversarialWeightPerturbation(gamma=0.1, direction=direction, until_fraction=1.0)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2\).*Allowed: accumulate_grad_batches=1"):
        quiet_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[callback]).fit(
            model, train_dataloaders=plain_loader())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), start))


class Recording(PrefixTunedClassifier):
    """Keeps the input ids of every batch its per-example losses are computed on."""

    def example_losses(self, batch):
        self.seen.append(batch["input_ids"])
        return super().example_losses(batch)


class AscentAndUpdateExamples(Callback):
    """After AWP in the callback list: at batch start the module has computed losses only for the ascent
    pass (none for an empty draw), and the update trains on ``batch``. Records both as dataset indices."""

    def __init__(self, dataset):
        self.index = {tuple(row.tolist()): i for i, row in enumerate(dataset.input_ids)}
        self.ascent, self.update = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ascent.append([self.index[tuple(r.tolist())] for ids in pl_module.seen for r in ids])
        self.update.append([self.index[tuple(r.tolist())] for r in batch["input_ids"]])

    def on_train_batch_end(self, trainer, pl_module, *args):
        pl_module.seen = []


def test_fresh_private_ascent_is_an_independent_poisson_draw(tiny_model_dir, tmp_path):
    """Each ascent pass uses a Poisson sample of its own, not the update's batch: over 16 perturbed steps
    on N=64 at q=1/8, an independent draw has Binomial(16*64, q) examples and Binomial(16*64, q**2)
    examples shared with the update's batch (the same batch would share all of them, about 128)."""
    path = tiny_model_dir("bert")
    torch.manual_seed(0)
    module = Recording(path, 2, prefix=PrefixConfig(num_virtual_tokens=2),
                       privacy=PrivacyConfig(target_epsilon=3.0, seed=1))
    module.seen = []
    data = TokenDataModule()
    spy = AscentAndUpdateExamples(data.dataset)
    callback = AdversarialWeightPerturbation(gamma=0.05, direction="fresh_private", until_fraction=1.0)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback, spy]).fit(module, datamodule=data)
    assert callback.perturbed_steps == len(spy.ascent) == 16
    trials, q = 16 * 64, 1 / 8
    drawn = sum(len(a) for a in spy.ascent)
    shared = sum(len(set(a) & set(u)) for a, u in zip(spy.ascent, spy.update))
    assert all(len(set(a)) == len(a) for a in spy.ascent), "a Poisson sample holds each example at most once"
    assert abs(drawn - trials * q) <= 5 * math.sqrt(trials * q * (1 - q))
    assert abs(shared - trials * q**2) <= 5 * math.sqrt(trials * q**2 * (1 - q**2))
    assert sum(a == u for a, u in zip(spy.ascent, spy.update)) <= 1


@pytest.mark.parametrize("accountant, reference", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_fresh_private_epsilon_is_that_of_independent_releases(accountant, reference, tiny_model_dir, tmp_path):
    """With its own Poisson draw every ascent release is one more (sigma, q) subsampled Gaussian release.
    Had it reused the update's batch, the two releases of each perturbed step would be one mechanism of
    noise sigma / sqrt(2), subsampled once: far past the target."""
    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=3.0, seed=1, accountant=accountant))
    callback = AdversarialWeightPerturbation(gamma=0.05, direction="fresh_private", until_fraction=0.5)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    sigma, q, updates, perturbed = module.engine.noise_multiplier, 8 / 64, 16, 8
    assert module.engine.updates == updates and callback.perturbed_steps == perturbed
    delta = 64 ** -1.1
    independent = reference()
    independent.history = [(sigma, q, updates + perturbed)]
    report = module.privacy_report()
    assert report["epsilon"] == pytest.approx(independent.get_epsilon(delta=delta), rel=1e-9)
    assert report["epsilon"] <= 3.0 and report["reasons"] == SEEDED_REASONS, "nothing but the seeded randomness voids it"
    assert report["callbacks"]["AdversarialWeightPerturbation"]["ascent_sampling"] == "independent Poisson draw"
    same_batch = reference()
    same_batch.history = [(sigma, q, updates - perturbed), (sigma / math.sqrt(2), q, perturbed)]
    assert same_batch.get_epsilon(delta=delta) > 1.3 * report["epsilon"]


def test_fresh_private_needs_poisson_sampling(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=3.0, poisson_sampling=False))
    with pytest.raises(ValueError, match=r"direction='fresh_private'.*poisson_sampling=True\), got False"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[AdversarialWeightPerturbation(direction="fresh_private")]).fit(
            module, datamodule=TokenDataModule(poisson=False))


# ---------------------------------------------------------------- layer selection
def test_selection_keeps_the_layers_whose_removal_sharpens_most(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("gpt2"), privacy=PrivacyConfig(enabled=False))
    callback = SharpnessLayerSelection(keep_layers=1, at_epoch=1, data="validation", alphas=[0.0, 0.5, 1.0],
                                       radius=5.0, num_batches=1)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    snapshot = {}

    class BeforeSelection(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                snapshot["model"] = copy.deepcopy(pl_module.model)

    trainer.callbacks.insert(0, BeforeSelection())
    trainer.fit(module, datamodule=TokenDataModule(poisson=False))
    assert len(callback.selected) == 1 and module.prefix.active_layers == callback.selected

    # Independent recomputation of one layer's score from the weights at selection time.
    model = snapshot["model"].eval()
    batch = next(iter(TokenDataModule().val_dataloader()))
    params = [p for i in range(2) for p in model.prefix.layers[i].parameters()]
    loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    model.prefix.layer_mask[0] = False
    curve = []
    with torch.no_grad():
        base = [p.clone() for p in params]
        for alpha in (0.0, 0.5, 1.0):
            for p, w, g in zip(params, base, grads):
                p.copy_(w + alpha * 5.0 * g / norm)
            curve.append(float(F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])))
    assert callback.scores[0] == pytest.approx(max(curve) - curve[0], rel=1e-4, abs=1e-6)
    assert module.report_sections["SharpnessLayerSelection"]["kept_layers"] == callback.selected


def test_worst_loss_criterion_scores_a_removal_by_the_curves_highest_loss(tiny_model_dir, tmp_path):
    """criterion="worst_loss": a layer's score is max_alpha L(alpha) with it removed, recomputed here by hand at
    the selection's weights (at_epoch=0: the initial prefix); the highest-scoring layer keeps its prefix."""
    module = make(tiny_model_dir("gpt2"), privacy=PrivacyConfig(enabled=False))
    model = copy.deepcopy(module.model).eval()
    callback = SharpnessLayerSelection(keep_layers=1, at_epoch=0, data="validation", alphas=[0.0, 0.5, 1.0],
                                       radius=5.0, num_batches=1, criterion="worst_loss")
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(module, datamodule=TokenDataModule(poisson=False))
    batch = next(iter(TokenDataModule().val_dataloader()))
    params = [p for i in range(2) for p in model.prefix.layers[i].parameters()]
    loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    worst = {}
    base = [p.detach().clone() for p in params]
    for layer in (0, 1):
        model.prefix.layer_mask[:] = True
        model.prefix.layer_mask[layer] = False
        with torch.no_grad():
            curve = []
            for alpha in (0.0, 0.5, 1.0):
                for p, w, g in zip(params, base, grads):
                    p.copy_(w + alpha * 5.0 * g / norm)
                curve.append(float(F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])))
        worst[layer] = max(curve)
    assert callback.scores == {layer: pytest.approx(worst[layer], rel=1e-4) for layer in (0, 1)}
    assert callback.selected == [max(worst, key=worst.get)]
    assert module.report_sections["SharpnessLayerSelection"]["criterion"] == "worst_loss"


@pytest.mark.parametrize("direction, along", [("released", "along the last released gradient"),
                                               (None, "along their raw (unclipped, un-noised) gradient")])
def test_private_selection_records_its_data_and_direction(tiny_model_dir, tmp_path, direction, along):
    module = make(tiny_model_dir("bert"))
    callback = SharpnessLayerSelection(keep_layers=0.5, data="private", direction=direction, num_batches=1)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    assert len(callback.selected) == 1
    report = module.privacy_report()
    assert report["formal_guarantee"] is False and "private training batches" in report["reasons"][0]
    assert along in report["reasons"][0]
    assert report["callbacks"]["SharpnessLayerSelection"]["direction"] == (direction or "data")


def test_selection_warns_when_no_layer_scores_above_zero(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"))
    # Along minus the gradient the loss only falls at first: with a short radius every score is 0.
    callback = SharpnessLayerSelection(keep_layers=0.5, data="validation", num_batches=1, at_epoch=0, radius=1e-3)
    callback._unit_direction = lambda pl_module, groups, batches: [
        -d for d in gradient_direction(pl_module, batches, groups=groups)]
    with pytest.warns(UserWarning, match="every layer scores 0"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    assert all(score == 0 for score in callback.scores.values())


def test_fixed_layers_and_state_survive_resume(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"))
    ckpt = tmp_path / "sel.ckpt"
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[SharpnessLayerSelection(layers=[1]), StopAfter(10, ckpt)]).fit(
        module, datamodule=TokenDataModule())
    assert module.prefix.active_layers == [1]
    resumed = make(tiny_model_dir("bert"))
    callback = SharpnessLayerSelection(layers=[1])
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(resumed, datamodule=TokenDataModule(), ckpt_path=ckpt)
    assert callback.selected == [1] and resumed.prefix.active_layers == [1]
    assert not resumed.prefix.layers[0].weight.requires_grad
    assert resumed.engine.updates == 16


def test_validation_selection_is_held_out_and_keeps_the_guarantee(tiny_model_dir, tmp_path):
    """The default data="validation" reads private examples held out of training: a held_out entry (not
    public); the training set's (epsilon, delta) is still the accountant's for the DP-SGD steps alone."""
    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=3.0, secure_mode=True))
    callback = SharpnessLayerSelection(keep_layers=1, alphas=[0.0, 1.0], num_batches=1)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    assert callback.data == "validation" and len(callback.selected) == 1
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert [(e["component"], e["status"]) for e in report["ledger"]] == [("SharpnessLayerSelection", "held_out")]
    assert report["formal_guarantee"] is True and report["reasons"] == []
    accountant = PRVAccountant()
    accountant.history = [(report["noise_multiplier"], 8 / 64, 16)]
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(64 ** -1.1), rel=1e-6)
    assert "`held_out`: private data held out of training" in (tmp_path / "privacy_report.md").read_text()


@pytest.mark.parametrize(
    "kwargs, trainer_kwargs, message",
    [
        (dict(layers=[5]), dict(max_epochs=2), r"layers=\[5\] names a layer the model lacks: the prefix has 2 layers, "
                                               r"indices in \[0, 2\)"),
        (dict(keep_layers=3), dict(max_epochs=2), r"keep_layers=3 is more than the model's 2 prefix layers: a count "
                                                  r"must be in \[1, 2\]"),
        (dict(at_epoch=2), dict(max_epochs=2), r"at_epoch=2 is never reached: Trainer\(max_epochs=2\) runs epochs 0..1"),
        (dict(at_epoch=3), dict(max_steps=3), r"at_epoch=3 is never reached: Trainer\(max_steps=3\) ends before epoch "
                                              r"3 starts \(at least 3 steps"),
        # 8 batches an epoch (64 examples, expected batch 8), known once the loader is built: before the first step.
        (dict(at_epoch=1), dict(max_steps=8), r"at_epoch=1 is never reached: Trainer\(max_steps=8\) ends before epoch "
                                              r"1 starts \(at least 8 steps"),
        (dict(at_epoch=2), dict(max_steps=12, limit_train_batches=6), r"Trainer\(max_steps=12\) .*at least 12 steps"),
    ],
)
def test_a_selection_that_cannot_happen_as_asked_is_refused_before_training(kwargs, trainer_kwargs, message,
                                                                             tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"))
    trainer = quiet_trainer(tmp_path, callbacks=[SharpnessLayerSelection(**kwargs)], **trainer_kwargs)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, datamodule=TokenDataModule())
    assert trainer.global_step == 0 and module.engine.updates == 0
    assert not (tmp_path / "privacy_report.json").exists()


def test_a_selection_epoch_reached_within_max_steps_runs(tiny_model_dir, tmp_path):
    """limit_train_batches=4 makes epoch 1 start after 4 steps, before max_steps=5."""
    callback = SharpnessLayerSelection(layers=[1])
    quiet_trainer(tmp_path, max_steps=5, limit_train_batches=4, callbacks=[callback]).fit(
        make(tiny_model_dir("bert")), datamodule=TokenDataModule())
    assert callback.selected == [1]


# ---------------------------------------------------------------- teacher
def test_distillation_term_gradient_matches_autograd(tiny_model_dir):
    from pflat_lightning.privacy import DPSGDEngine

    student = make(tiny_model_dir("bert"), privacy=PrivacyConfig(enabled=False))
    teacher = make(tiny_model_dir("bert"), privacy=PrivacyConfig(enabled=False))
    with torch.no_grad():
        for p in teacher.prefix.parameters():
            p.add_(0.3)
    callback = TeacherDistillation("checkpoint", checkpoint_path="unused", weight=0.5, logit_weight=0.7)
    callback.teacher_state = trainable_state(teacher)
    callback.on_train_start(None, student)
    data = TokenDataModule()
    batch = collate([data.dataset[i] for i in range(5)])

    # Reference: per-example autograd of CE + 0.5 ||P - P_t|| + 0.7 T^2 KL, written out here.
    reference = copy.deepcopy(student.model)
    params = [p for p in reference.parameters() if p.requires_grad]
    expected = []
    for i in range(5):
        ids, mask, y = batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1], batch["labels"][i : i + 1]
        logits = reference(ids, mask)
        distance = torch.sqrt(sum(((a - b) ** 2).sum() for (k, v), (tk, tv) in zip(reference.prefix(1), teacher.prefix(1))
                                  for a, b in ((k, tk.detach()), (v, tv.detach()))))
        with torch.no_grad():
            t_logits = teacher.model(ids, mask)
        kl = F.kl_div(F.log_softmax(logits / 2.0, -1), F.softmax(t_logits / 2.0, -1), reduction="sum")
        loss = F.cross_entropy(logits, y) + 0.5 * distance + 0.7 * 4.0 * kl
        expected.append(torch.autograd.grad(loss, params))

    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=0.0, target_epsilon=None))
    student.model.train()
    engine.attach(student.model, torch.optim.SGD([p for p in student.model.parameters() if p.requires_grad], lr=1.0),
                  dataset_size=100, expected_batch_size=5, planned_steps=1)
    engine.backward(student.example_losses(batch))
    for j, p in enumerate(p for p in student.model.parameters() if p.requires_grad):
        torch.testing.assert_close(p.grad_sample, torch.stack([g[j] for g in expected]), atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def dp_teacher_run(tiny_model_dir, tmp_path_factory):
    """A student with a default ``private_dp`` teacher, fitted once, with the seed of each Poisson loader of the
    run and every noise tensor its DP optimizers drew (``(generator, std, noise)``, in order)."""
    from opacus.optimizers import optimizer as opacus_optimizer
    from pflat_lightning.privacy import PoissonDataLoader

    seeds, draws = [], []
    build, generate = PoissonDataLoader.__init__, opacus_optimizer._generate_noise

    def recording_loader(self, *args, **kwargs):
        seeds.append(kwargs["seed"])
        build(self, *args, **kwargs)

    def recording_noise(std, reference, generator=None, secure_mode=False):
        noise = generate(std, reference, generator, secure_mode)
        draws.append((generator, std, noise.detach().clone()))
        return noise

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PoissonDataLoader, "__init__", recording_loader)
        patch.setattr(opacus_optimizer, "_generate_noise", recording_noise)
        module, data = make(tiny_model_dir("bert")), TokenDataModule()
        callback = TeacherDistillation("private_dp", teacher_epochs=1, teacher_batch_size=16)
        quiet_trainer(tmp_path_factory.mktemp("dp_teacher"), max_epochs=2, callbacks=[callback]).fit(module, datamodule=data)
    return module, data, seeds, draws


def noise_streams(module, draws):
    """Per DP optimizer (by its generator, teacher first): the noise std and the standard-normal noise of each release."""
    streams = {}
    for generator, std, noise in draws:
        streams.setdefault(id(generator), []).append((std, noise.flatten() / std))
    per_release = len([p for m in module.model.trainable_modules() for p in m.parameters()])  # one draw per tensor
    return [[(stream[i][0], torch.cat([z for _, z in stream[i : i + per_release]]))
             for i in range(0, len(stream), per_release)] for stream in streams.values()]


def test_dp_teacher_is_composed_into_the_students_accountant(dp_teacher_run):
    module, data, seeds, draws = dp_teacher_run
    assert len(set(seeds)) == 2 and data.seed == 0, "the teacher draws its own batches, independent of the student's"
    # The accountant's input, read off what the DP optimizers did: the noise std (sigma * C, C = 1) of their
    # draws and the number of releases; the sampling rates are the batch sizes over the 64 examples.
    teacher, student = noise_streams(module, draws)
    (t_noise,), (s_noise,) = {std for std, _ in teacher}, {std for std, _ in student}
    assert (len(teacher), len(student)) == (4, 16)
    reference = PRVAccountant()
    reference.history = [(t_noise, 16 / 64, len(teacher)), (s_noise, 8 / 64, len(student))]
    report = module.privacy_report()
    assert report["epsilon"] == pytest.approx(reference.get_epsilon(delta=64 ** -1.1), rel=1e-6)
    assert 3.0 - 0.05 < report["epsilon"] <= 3.0
    assert report["reasons"] == SEEDED_REASONS, "only the seeded randomness voids the guarantee"


def test_a_secure_dp_teacher_samples_and_noises_from_the_csprng(tiny_model_dir, tmp_path, loaders_secure):
    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=3.0, secure_mode=True))
    callback = TeacherDistillation("private_dp", teacher_epochs=1, teacher_batch_size=16)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    assert loaders_secure == [True, True], "the teacher's and the student's batches"
    assert len(module.engine.history) == 2 and module.privacy_report()["formal_guarantee"] is True


def test_dp_teacher_draws_noise_independent_of_the_students(dp_teacher_run):
    module, _, _, draws = dp_teacher_run
    teacher, student = noise_streams(module, draws)
    # The teacher's releases against the student's first ones: same shapes, so one seed would make them equal.
    t = torch.cat([z for _, z in teacher])
    s = torch.cat([z for _, z in student[: len(teacher)]])
    d = t.numel()
    bound = 5 / d ** 0.5  # |r| of two independent Gaussian vectors of dimension d has standard deviation ~1/sqrt(d)
    independent = torch.corrcoef(torch.stack([torch.randn(d, generator=torch.Generator().manual_seed(11)),
                                              torch.randn(d, generator=torch.Generator().manual_seed(12))]))[0, 1]
    correlation = torch.corrcoef(torch.stack([t, s]))[0, 1]
    print(f"teacher/student noise correlation {correlation:.4f} over d={d}; independent draws {independent:.4f}; "
          f"bound {bound:.4f}")
    assert abs(independent) < bound
    assert abs(correlation) < bound, f"the teacher's noise is correlated with the student's: r={correlation:.4f}"


@pytest.mark.parametrize("seed", [1, 1 + 2**32])
def test_a_teacher_privacy_drawing_the_students_noise_is_refused_before_training(seed, tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"))  # noise seed 1
    callback = TeacherDistillation("private_dp", teacher_epochs=1,
                                   teacher_privacy=PrivacyConfig(target_epsilon=1.5, seed=seed))
    message = rf"teacher_privacy.seed={seed} gives the teacher the student's noise stream \(the student's seed is 1;"
    with pytest.raises(ValueError, match=message + r".*a seed that differs from 1 modulo 2\*\*32"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    assert callback.teacher_state is None and module.engine.updates == 0 and not (tmp_path / "teacher").exists()


@pytest.mark.parametrize("teacher_privacy", [PrivacyConfig(target_epsilon=1.5, seed=2),
                                             PrivacyConfig(target_epsilon=1.5, seed=1, secure_mode=True)])
def test_a_teacher_privacy_with_its_own_noise_stream_is_accepted(teacher_privacy, tiny_model_dir):
    module = make(tiny_model_dir("bert"))  # noise seed 1
    callback = TeacherDistillation("private_dp", teacher_privacy=teacher_privacy)
    callback.setup(None, module, "fit")
    assert callback._teacher_privacy(module) is teacher_privacy


@pytest.mark.parametrize("kwargs, histories", [({"teacher": "private_dp"}, 2), ({"teacher": "public", "warm_start": True}, 1)],
                         ids=["private_dp teacher", "public warm start"])
def test_a_resumed_run_keeps_its_teacher_and_spend_without_training_it_again(kwargs, histories, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    """A resumed run is the uninterrupted one: the teacher (and its spend) restored, not trained again, and a
    warm start not applied again over the resumed weights."""
    path = tiny_model_dir("bert")
    teacher = partial(TeacherDistillation, **kwargs, teacher_epochs=1, teacher_batch_size=16)
    whole = make(path)
    quiet_trainer(tmp_path / "whole", max_epochs=2, callbacks=[teacher()]).fit(whole, datamodule=TokenDataModule())
    ckpt = tmp_path / "interrupted.ckpt"
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[teacher(), StopAfter(5, ckpt)]).fit(
        make(path), datamodule=TokenDataModule())

    def train_again(*args):
        raise AssertionError("the resumed run trained its teacher again")

    monkeypatch.setattr(TeacherDistillation, "_train_teacher", train_again)
    resumed, callback = make(path), teacher()
    quiet_trainer(tmp_path / "b", max_epochs=2, callbacks=[callback]).fit(resumed, datamodule=TokenDataModule(),
                                                                           ckpt_path=ckpt)
    assert resumed.engine.history == whole.engine.history and len(whole.engine.history) == histories
    assert resumed.privacy_report()["epsilon"] == whole.privacy_report()["epsilon"]
    assert_same_trained_weights(resumed, whole)


@pytest.mark.parametrize("source, guarantee", [("public", True), ("private_nonprivate", False)])
def test_teacher_sources_and_the_ledger(source, guarantee, tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=3.0, secure_mode=True))
    callback = TeacherDistillation(source, teacher_epochs=1)
    quiet_trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    report = module.privacy_report()
    assert report["formal_guarantee"] is guarantee
    assert [e["status"] for e in report["ledger"]] == ["public" if guarantee else "unaccounted"]
    assert set(callback.teacher_state) >= {"model.prefix.layers.0.weight", "model.classifier.weight"}
    assert not module.loss_terms, "the regulariser is removed when training ends"


def test_a_warm_start_begins_dp_sgd_at_the_public_teacher_and_spends_nothing_more(tiny_model_dir, tmp_path):
    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state, self.terms = trainable_state(pl_module), list(pl_module.loss_terms)

    module = make(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=3.0, secure_mode=True))
    initial = trainable_state(module)
    callback, at_start = TeacherDistillation("public", weight=0.0, warm_start=True, teacher_epochs=1), AtStart()
    quiet_trainer(tmp_path, max_steps=3, callbacks=[callback, at_start]).fit(module, datamodule=TokenDataModule())
    assert set(at_start.state) == set(callback.teacher_state)
    for name, tensor in at_start.state.items():
        assert torch.equal(tensor, callback.teacher_state[name]), name
    assert not torch.equal(initial["model.prefix.layers.0.weight"], callback.teacher_state["model.prefix.layers.0.weight"])
    assert at_start.terms == [], "weight 0: a warm start alone adds no loss term"
    report = module.privacy_report()
    assert [(e["status"], "starts from the teacher's prefix" in e["detail"]) for e in report["ledger"]] == [("public", True)]
    assert report["formal_guarantee"] is True
    reference = PRVAccountant()  # the student's own releases only: the public teacher costs nothing
    reference.history = [(report["noise_multiplier"], 8 / 64, 3)]
    assert report["steps"] == 3 and report["sample_rate"] == 8 / 64
    assert report["epsilon"] == pytest.approx(reference.get_epsilon(delta=64 ** -1.1), rel=1e-6)


def test_teacher_checkpoint_round_trip(tiny_model_dir, tmp_path):
    teacher = make(tiny_model_dir("bert"), privacy=PrivacyConfig(enabled=False))
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(teacher, datamodule=TokenDataModule(poisson=False))
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    callback = TeacherDistillation("checkpoint", checkpoint_path=str(tmp_path / "teacher.ckpt"))
    student = make(tiny_model_dir("bert"))
    quiet_trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(student, datamodule=TokenDataModule())
    torch.testing.assert_close(callback.teacher_state["model.prefix.layers.0.weight"], teacher.prefix.layers[0].weight)
    assert callback.state_dict()["teacher_state"] is callback.teacher_state


def test_a_teacher_state_saved_before_clone_untrained_still_resumes(tiny_model_dir):
    """Checkpoints written before the teacher was a clone hold its tensors named inside the module's ``model``."""
    student = make(tiny_model_dir("bert"), privacy=PrivacyConfig(enabled=False))
    teacher = make(tiny_model_dir("bert"), privacy=PrivacyConfig(enabled=False))
    with torch.no_grad():
        for p in teacher.prefix.parameters():
            p.add_(0.3)
    teacher.prefix.set_layer_mask([True, False])
    old = {k: v for k, v in teacher.model.state_dict().items() if k.startswith(("prefix.", "classifier."))}
    callback = TeacherDistillation("public")
    callback.load_state_dict({"teacher_state": old})
    callback.on_train_start(None, student)
    resumed = callback._teacher
    assert resumed.model.backbone is student.model.backbone
    assert resumed.prefix.layer_mask.tolist() == [True, False]
    for name, tensor in teacher.model.named_parameters():
        if name.startswith(("prefix.", "classifier.")):
            assert torch.equal(dict(resumed.model.named_parameters())[name], tensor), name


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: AdversarialWeightPerturbation(gamma=0), r"gamma must be > 0, got 0"),
        (lambda: AdversarialWeightPerturbation(direction="up"), r"direction must be one of .*got 'up'"),
        (lambda: SharpnessLayerSelection(keep_layers=1.5), r"keep_layers as a fraction must be in \(0, 1\], got 1.5"),
        (lambda: SharpnessLayerSelection(data="test"), r"data must be one of .*got 'test'"),
        (lambda: SharpnessLayerSelection(criterion="flat"), r"criterion must be one of \('sharpness', 'worst_loss'\), "
                                                              r"got 'flat'"),
        (lambda: SharpnessLayerSelection(layers=[]), r"layers must be a non-empty list of distinct .*got \[\]"),
        (lambda: SharpnessLayerSelection(layers=[1, 1]), r"layers must be a non-empty list of distinct .*got \[1, 1\]"),
        (lambda: TeacherDistillation("checkpoint"), r"teacher='checkpoint' needs checkpoint_path"),
        (lambda: TeacherDistillation(weight=-1.0), r"weight must be >= 0, got -1.0"),
        (lambda: TeacherDistillation("private_dp", teacher_privacy=PrivacyConfig(enabled=False)),
         r"teacher_privacy must be private, got PrivacyConfig\(enabled=False.*teacher='private_nonprivate'"),
    ],
)
def test_bad_callback_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize("direction", ["previous_private", "fresh_private"])
def test_awp_resumes_the_same_schedule(direction, tiny_model_dir, tmp_path):
    """Interrupted at step 5 (inside the perturbed half) and resumed: the uninterrupted run's weights."""
    path = tiny_model_dir("bert")
    whole = make(path)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[AdversarialWeightPerturbation(0.05, direction=direction)]).fit(
        whole, datamodule=TokenDataModule())
    ckpt = tmp_path / "awp.ckpt"
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[AdversarialWeightPerturbation(0.05, direction=direction),
                                                     StopAfter(5, ckpt)]
                  ).fit(make(path), datamodule=TokenDataModule())
    resumed = make(path)
    callback = AdversarialWeightPerturbation(0.05, direction=direction)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(resumed, datamodule=TokenDataModule(), ckpt_path=ckpt)
    assert callback.perturbed_steps == (7 if direction == "previous_private" else 8)
    assert resumed.engine.history == whole.engine.history
    for a, b in zip(resumed.model.prefix.parameters(), whole.model.prefix.parameters()):
        torch.testing.assert_close(a, b)


def test_selection_scores_on_batches_of_its_own_size(tiny_model_dir, tmp_path):
    """batch_size rebatches the selection split in order: the curves cost len(alphas) * num_batches forward
    passes of that many examples, whatever the datamodule's evaluation batch size (32 here)."""
    callback = SharpnessLayerSelection(keep_layers=1, at_epoch=0, data="validation", alphas=[0.0, 1.0],
                                       num_batches=2, batch_size=5)
    data = TokenDataModule(poisson=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    trainer.fit(make(tiny_model_dir("bert"), privacy=PrivacyConfig(enabled=False)), datamodule=data)
    batches = callback._batches(trainer, torch.device("cpu"))
    assert [len(b["labels"]) for b in batches] == [5, 5]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), data.dataset.input_ids[:10])
    with pytest.raises(ValueError, match="batch_size must be >= 1 or None, got 0"):
        SharpnessLayerSelection(batch_size=0)
