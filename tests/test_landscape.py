"""Loss landscape and sharpness: checked against closed forms, hand-perturbed copies and autograd."""
import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.callbacks import LossLandscape
from pflat_lightning.cli import main as pflat_main
from pflat_lightning.landscape import (
    LandscapeSettings,
    collect_batches,
    filter_normalized_direction,
    gradient_direction,
    measure_landscape,
    paper_curve,
    random_slice,
    sam_perturbation,
    sam_sharpness,
    write_landscape,
)
from pflat_lightning.landscape.cli import main as landscape_main

from helpers import SEEDED_REASONS, TokenDataModule, TokenDataset, collate, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- a quadratic toy module
class Quadratic(pl.LightningModule):
    """Two layer groups ``a`` and ``b``; example ``i`` has loss ``0.5 * sum(h * (W - C_i)^2)`` over both.

    The mean loss is ``0.5 * sum(h * (W - mean C)^2) + const``: gradient ``h * (W - mean C)``, Hessian
    ``diag(h)``, so every measure has a closed form.
    """

    def __init__(self, h_a: torch.Tensor, h_b: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.Module(), nn.Module()
        self.a.weight = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.b.weight = nn.Parameter(torch.randn(2, 5, generator=g, dtype=torch.float64))
        self.register_buffer("h_a", h_a.double())
        self.register_buffer("h_b", h_b.double())

    def example_losses(self, batch):
        a = (self.h_a * (self.a.weight - batch["target_a"]) ** 2).sum((1, 2))
        b = (self.h_b * (self.b.weight - batch["target_b"]) ** 2).sum((1, 2))
        return 0.5 * (a + b)


def quadratic_batches(size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    targets_a = torch.randn(size, 3, 4, generator=g, dtype=torch.float64)
    targets_b = torch.randn(size, 2, 5, generator=g, dtype=torch.float64)
    return [{"target_a": targets_a[i:i + 5], "target_b": targets_b[i:i + 5], "labels": torch.zeros(len(targets_a[i:i + 5]))}
            for i in range(0, size, 5)]  # batches of 5, 5, 2: the mean is over examples, not batches


def closed_form(module, batches):
    """(mean loss function of (A, B), gradient at w, Hessian diagonal) of the quadratic toy."""
    ta = torch.cat([b["target_a"] for b in batches])
    tb = torch.cat([b["target_b"] for b in batches])

    def loss(A, B):
        return float(0.5 * ((module.h_a * (A - ta) ** 2).sum((1, 2)) + (module.h_b * (B - tb) ** 2).sum((1, 2))).mean())

    A, B = module.a.weight.detach(), module.b.weight.detach()
    return loss, (module.h_a * (A - ta.mean(0)), module.h_b * (B - tb.mean(0))), (module.h_a, module.h_b)


def isotropic(kappa=2.0):
    return Quadratic(torch.full((3, 4), kappa), torch.full((2, 5), kappa))


def anisotropic():
    g = torch.Generator().manual_seed(5)
    return Quadratic(0.1 + 3 * torch.rand(3, 4, generator=g), 0.1 + 3 * torch.rand(2, 5, generator=g))


def test_paper_curve_on_a_quadratic_has_its_closed_form():
    module, batches = anisotropic(), quadratic_batches()
    _, (ga, gb), (ha, hb) = closed_form(module, batches)
    norm = math.sqrt(float((ga ** 2).sum() + (gb ** 2).sum()))
    curvature = float((ha * ga ** 2).sum() + (hb * gb ** 2).sum()) / norm ** 2  # d^T H d
    alphas, radius = [0.0, 0.25, 0.5, 1.0], 0.7
    curve = paper_curve(module, batches, alphas=alphas, radius=radius)
    loss0 = closed_form(module, batches)[0](module.a.weight.detach(), module.b.weight.detach())
    # L(w + t d) - L(w) = t ||g|| + t^2 / 2 d^T H d along d = g / ||g||
    expected = [loss0 + a * radius * norm + 0.5 * (a * radius) ** 2 * curvature for a in alphas]
    assert curve["losses"] == pytest.approx(expected, rel=1e-10)
    assert curve["sharpness"] == pytest.approx(radius * norm + 0.5 * radius ** 2 * curvature, rel=1e-10)
    assert curve["direction_norm"] == pytest.approx(norm, rel=1e-12) and curve["examples"] == 12


def test_sam_sharpness_on_an_isotropic_quadratic_is_exact():
    kappa, rho = 2.0, 0.1
    module, batches = isotropic(kappa), quadratic_batches()
    _, (ga, gb), _ = closed_form(module, batches)
    # max of g.e + kappa/2 ||e||^2 over ||e_l|| <= r_l: each group moves r_l along its own gradient.
    expected = 0.0
    for w, g in ((module.a.weight, ga), (module.b.weight, gb)):
        r = rho * float(w.detach().norm())
        expected += r * float(g.norm()) + 0.5 * kappa * r ** 2
    result = sam_sharpness(module, batches, rho=rho, steps=3)
    assert result["sharpness"] == pytest.approx(expected, rel=1e-9)
    assert result["groups"]["a"]["radius"] == pytest.approx(rho * float(module.a.weight.detach().norm()), rel=1e-12)


def test_sam_ascent_beats_the_single_step_and_stays_inside_the_radius():
    rho = 0.3
    module, batches = anisotropic(), quadratic_batches()
    loss, (ga, gb), (ha, hb) = closed_form(module, batches)
    A, B = module.a.weight.detach().clone(), module.b.weight.detach().clone()
    ra, rb = rho * float(A.norm()), rho * float(B.norm())
    single = loss(A + ra * ga / ga.norm(), B + rb * gb / gb.norm()) - loss(A, B)
    # Upper bound: ||g_l|| r_l + max(h) r_l^2 / 2 per group.
    bound = ra * float(ga.norm()) + 0.5 * float(ha.max()) * ra ** 2 + rb * float(gb.norm()) + 0.5 * float(hb.max()) * rb ** 2
    perturbation, result = sam_perturbation(module, batches, rho=rho, steps=10)
    assert single < result["sharpness"] <= bound  # the projected steps improve on the first one
    ea, eb = perturbation
    assert float(ea.norm()) <= ra * (1 + 1e-9) and float(eb.norm()) <= rb * (1 + 1e-9)
    assert result["perturbed_loss"] == pytest.approx(loss(A + ea, B + eb), rel=1e-12)
    assert torch.equal(module.a.weight, A) and torch.equal(module.b.weight, B)


def test_random_slices_on_a_quadratic_follow_the_hand_normalised_directions():
    module, batches = anisotropic(), quadratic_batches()
    loss = closed_form(module, batches)[0]
    A, B = module.a.weight.detach().clone(), module.b.weight.detach().clone()
    g = torch.Generator().manual_seed(7)
    directions = []
    for _ in range(2):
        d = []
        for w in (A, B):
            z = torch.randn(w.shape, generator=g, dtype=torch.float32).double()
            d.append(torch.stack([z[i] / z[i].norm() * w[i].norm() for i in range(w.shape[0])]))
        directions.append(d)
    (a1, b1), (a2, b2) = directions
    line = random_slice(module, batches, dims=1, points=5, span=0.5, seed=7)
    assert line["x"] == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    assert line["losses"] == pytest.approx([loss(A + x * a1, B + x * b1) for x in line["x"]], rel=1e-10)
    assert line["loss"] == pytest.approx(loss(A, B), rel=1e-12)
    plane = random_slice(module, batches, dims=2, points=3, span=1.0, seed=7)
    expected = [[loss(A + x * a1 + y * a2, B + x * b1 + y * b2) for x in plane["x"]] for y in plane["y"]]
    assert len(plane["losses"]) == 3
    for row, expected_row in zip(plane["losses"], expected):
        assert row == pytest.approx(expected_row, rel=1e-10)


def test_filter_normalisation_row_by_row():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight[2].zero_()  # a dead unit stays still
    params = [linear.weight, linear.bias]
    for one_dim in ("zero", "filter"):
        d_weight, d_bias = filter_normalized_direction(params, torch.Generator().manual_seed(3), one_dim=one_dim)
        g = torch.Generator().manual_seed(3)
        z_weight, z_bias = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
        for i in range(4):
            row = z_weight[i] / z_weight[i].norm() * linear.weight[i].detach().norm()
            assert torch.allclose(d_weight[i], row, rtol=1e-6, atol=1e-7)
            assert float(d_weight[i].norm()) == pytest.approx(float(linear.weight[i].norm()), rel=1e-5, abs=1e-7)
        assert float(d_weight[2].abs().max()) == 0.0
        if one_dim == "zero":
            assert float(d_bias.abs().max()) == 0.0
        else:
            assert torch.allclose(d_bias, z_bias / z_bias.norm() * linear.bias.detach().norm(), rtol=1e-6)


# ---------------------------------------------------------------- a tiny prefix-tuned BERT
def classifier(path, privacy=None):
    torch.manual_seed(0)
    return PrefixTunedClassifier(path, 2, privacy=privacy or PrivacyConfig(enabled=False),
                                 prefix=PrefixConfig(num_virtual_tokens=2))


def token_batches(size=20, batch_size=8):
    return list(DataLoader(TokenDataset(size, seed=3), batch_size=batch_size, collate_fn=collate))


def hand_loss(model, batches):
    """Mean cross-entropy over every example of ``batches`` (batches of unequal size)."""
    total = sum(F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"], reduction="sum") for b in batches)
    return total / sum(len(b["labels"]) for b in batches)


def prefix_params(model, module):
    return [p for i in module.prefix.active_layers for p in model.prefix.layers[i].parameters()]


def test_curve_direction_and_points_match_autograd_and_a_hand_perturbed_copy(tiny_model_dir):
    module = classifier(tiny_model_dir("bert"))
    batches = token_batches()
    model = copy.deepcopy(module.model).eval()
    params = prefix_params(model, module)
    grads = torch.autograd.grad(hand_loss(model, batches), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    expected_direction = [g / norm for g in grads]

    direction = gradient_direction(module, batches)
    assert math.sqrt(sum(float((d ** 2).sum()) for d in direction)) == pytest.approx(1.0, rel=1e-6)
    for d, e in zip(direction, expected_direction):
        assert torch.allclose(d, e, rtol=1e-4, atol=1e-6)

    alphas, radius = [0.0, 0.5, 1.0], 3.0
    curve = paper_curve(module, batches, alphas=alphas, radius=radius)
    expected = []
    with torch.no_grad():
        base = [p.clone() for p in params]
        for alpha in alphas:
            for p, w, d in zip(params, base, expected_direction):
                p.copy_(w + alpha * radius * d)
            expected.append(float(hand_loss(model, batches)))
    assert curve["losses"] == pytest.approx(expected, rel=1e-4)
    assert curve["sharpness"] == pytest.approx(max(expected) - expected[0], rel=1e-3, abs=1e-6)
    assert curve["direction_norm"] == pytest.approx(float(norm), rel=1e-4)


def test_sam_on_the_prefix_is_at_least_the_single_step_and_respects_each_layers_radius(tiny_model_dir):
    rho = 0.05
    module = classifier(tiny_model_dir("bert"))
    batches = token_batches()
    model = copy.deepcopy(module.model).eval()
    params = prefix_params(model, module)  # one parameter per prefix layer: one group each
    grads = torch.autograd.grad(hand_loss(model, batches), params)
    with torch.no_grad():
        base = [p.clone() for p in params]
        loss0 = float(hand_loss(model, batches))
        for p, w, g in zip(params, base, grads):
            p.copy_(w + rho * w.norm() * g / g.norm())
        single = float(hand_loss(model, batches)) - loss0

    perturbation, result = sam_perturbation(module, batches, rho=rho, steps=3)
    assert result["sharpness"] >= single - 1e-6 and single > 0
    with torch.no_grad():
        for p, w, e in zip(params, base, perturbation):
            assert float(e.norm()) <= rho * float(w.norm()) * (1 + 1e-5)
            p.copy_(w + e)
        assert result["perturbed_loss"] == pytest.approx(float(hand_loss(model, batches)), rel=1e-4)
    assert set(result["groups"]) == {"prefix.layers.0", "prefix.layers.1"}


def test_measure_landscape_restores_everything_and_writes_json_and_pngs(tiny_model_dir, tmp_path):
    from matplotlib.image import imread

    module = classifier(tiny_model_dir("bert"))
    batches = token_batches()  # iterating a DataLoader draws from the global generator: before the snapshot
    huge = lambda batch, logits, prefix: torch.full((len(batch["labels"]),), 1000.0)  # noqa: E731
    terms = [huge]
    module.loss_terms = terms
    module.train()
    module.model.backbone.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in module.named_modules()}
    state = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    result = measure_landscape(module, batches, LandscapeSettings(alphas=[0, 0.5, 1], sam_steps=2, radius=5.0,
                                                                  slice_1d_points=3, slice_2d_points=3))
    assert result["loss"] < 100  # the teacher-like term did not count: task loss only
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert module.loss_terms is terms and terms == [huge]
    assert torch.equal(torch.get_rng_state(), rng)

    files = write_landscape(result, tmp_path / "out")
    assert set(files) == {"json", "curve", "slice_1d", "slice_2d"}
    assert json.loads(Path(files["json"]).read_text()) == json.loads(json.dumps(result))
    for name in ("curve", "slice_1d", "slice_2d"):
        path = Path(files[name])
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = imread(path).shape
        assert height > 100 and width > 100


# ---------------------------------------------------------------- the callback
class Snapshot(Callback):
    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_callback_reports_measures_the_released_direction_and_restores_the_weights(tiny_model_dir, tmp_path):
    module = classifier(tiny_model_dir("bert"), PrivacyConfig(target_epsilon=3.0, seed=1))
    callback = LossLandscape("private", num_batches=1, alphas=[0.0, 0.5, 1.0], radius=2.0, direction="released",
                             sam_steps=1, slice_1d_points=3, slice_2d_points=3)
    snapshot = Snapshot()
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[snapshot, callback])
    trainer.fit(module, datamodule=TokenDataModule())

    folder = Path(logger.log_dir)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in snapshot.state.items())
    for name in ("landscape.json", "curve.png", "slice_1d.png", "slice_2d.png"):
        assert (folder / "landscape" / name).is_file()
    report = json.loads((folder / "privacy_report.json").read_text())
    section = report["callbacks"]["LossLandscape"]
    assert section["data"] == "private" and section["direction"] == "released"
    assert section["sharpness"] == callback.result["curve"]["sharpness"] >= 0
    assert section["sam_sharpness"] == callback.result["sam"]["sharpness"] >= 0
    assert {"component": "LossLandscape", "status": "evaluation"}.items() <= report["ledger"][-1].items()
    assert report["reasons"] == SEEDED_REASONS, "an evaluation voids nothing (the run is seeded)"
    with open(folder / "metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("sharpness")]
    assert float(logged[-1]["sharpness"]) == pytest.approx(section["sharpness"])

    # Independently: the curve along the last released gradient, on the training split read in order.
    model = copy.deepcopy(module.model).eval()
    params = prefix_params(model, module)
    released = dict(zip(module.engine.optimizer.params, module.engine.released_gradient))
    d = [released[p] for i in module.prefix.active_layers for p in module.prefix.layers[i].parameters()]
    norm = torch.sqrt(sum((x ** 2).sum() for x in d))
    batches = collect_batches(DataLoader(TokenDataModule().dataset, batch_size=64, collate_fn=collate), 1)
    expected = []
    with torch.no_grad():
        base = [p.clone() for p in params]
        for alpha in (0.0, 0.5, 1.0):
            for p, w, x in zip(params, base, d):
                p.copy_(w + alpha * 2.0 * x / norm)
            expected.append(float(hand_loss(model, batches)))
    assert callback.result["curve"]["losses"] == pytest.approx(expected, rel=1e-4)
    assert callback.result["examples"] == 64


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: LossLandscape("train"), r"data must be one of .*got 'train'"),
        (lambda: LossLandscape(num_batches=0), r"num_batches must be an integer >= 1, got 0"),
        (lambda: LossLandscape(alphas=[0.5, 1.0]), r"alphas must start at 0"),
        (lambda: LossLandscape(radius=0.0), r"radius must be a finite number > 0, got 0.0"),
        (lambda: LossLandscape(direction="up"), r"direction must be one of .*got 'up'"),
        (lambda: LossLandscape(sam_rho=-1.0), r"sam_rho must be a finite number > 0, got -1.0"),
        (lambda: LossLandscape(slice_2d_points=1), r"slice_2d_points must be 0 \(no slice\) or an integer >= 2, got 1"),
        (lambda: random_slice(isotropic(), quadratic_batches(), dims=3), r"dims must be 1 or 2, got 3"),
        (lambda: paper_curve(isotropic(), quadratic_batches(), direction=[torch.zeros(1)]), r"one tensor per measured"),
        (lambda: paper_curve(isotropic(), quadratic_batches(), direction="released"), r"direction='released' needs"),
    ],
)
def test_bad_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_released_direction_needs_a_private_module(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"direction='released'\) needs a DP module"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[LossLandscape(direction="released")]).fit(
            classifier(tiny_model_dir("bert")), datamodule=TokenDataModule())


# ---------------------------------------------------------------- pflat landscape
def test_cli_measures_a_saved_run_and_adds_to_its_report(tiny_model_dir, tmp_path, capsys):
    config = str(ROOT / "examples/configs/movie_reviews_dp.yaml")
    run_args = ["--model.backbone", tiny_model_dir("bert"), "--model.prefix.num_virtual_tokens", "2",
                "--data.source", "sms_spam", "--data.max_length", "16", "--data.batch_size", "64",
                "--data.max_train_examples", "256", "--data.max_eval_examples", "64"]
    pflat_main(["fit", "--config", config, *run_args, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false"])  # in-process: one interpreter start less
    ckpt = next(tmp_path.rglob("*.ckpt"))
    run = ckpt.parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pflat_lightning.cli", "landscape", "--config", config, "--ckpt_path", str(ckpt),
         "--data", "private", "--num_batches", "1", "--alphas", "0", "0.5", "1", "--sam_steps", "1",
         "--slice_1d_points", "3", "--slice_2d_points", "3", "--", *run_args, "--data.eval_batch_size", "16"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    landscape = json.loads((run / "landscape" / "landscape.json").read_text())
    assert landscape["examples"] == 16 and landscape["data"] == "private"  # the overrides reached the datamodule
    for name in ("curve.png", "slice_1d.png", "slice_2d.png"):
        assert (run / "landscape" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert f"{landscape['sharpness']:.6g}" in result.stdout
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["callbacks"]["LossLandscape"]["sharpness"] == landscape["sharpness"]
    assert report["ledger"][-1]["status"] == "evaluation" and report["formal_guarantee"] is True
    assert "## LossLandscape" in (run / "privacy_report.md").read_text()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        landscape_main(["--config", config, "--ckpt_path", str(ckpt), "--sam_rho", "0"])
    assert exit_info.value.code == 2
    assert "sam_rho must be a finite number > 0, got 0.0" in capsys.readouterr().err
