"""DP-SGD mathematics, each checked against an independent computation."""
import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from transformers import AutoTokenizer

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.prefix_model import PrefixModel, load_backbone
from pflat_lightning.privacy import DPSGDEngine
from pflat_lightning.protocol import physical_batches

from conftest import FAMILIES
from helpers import (StopAfter, TokenDataModule, TokenDataset, assert_same_trained_weights, clipped_mean, collate,
                     quiet_trainer)

HEADS = ["linear", "label_words"]


def tiny_prefix_model(path, head):
    backbone = load_backbone(path, head)
    tokenizer = AutoTokenizer.from_pretrained(path)
    words = tokenizer.convert_tokens_to_ids(["bad", "good"])
    return PrefixModel(backbone, 2, head=head, label_word_ids=words, mask_token_id=tokenizer.mask_token_id,
                       prefix=PrefixConfig(num_virtual_tokens=3)), tokenizer


def batch_for(tokenizer, size=6, seed=1):
    data = TokenDataset(size, length=7, seed=seed, mask_token_id=tokenizer.mask_token_id)
    return collate([data[i] for i in range(size)])


def per_example_gradients(model, batch):
    """Reference: one autograd call per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(batch["labels"].shape[0]):
        logits = model(batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1])
        loss = F.cross_entropy(logits, batch["labels"][i : i + 1])
        grads.append(torch.autograd.grad(loss, params))
    return params, grads


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_equal_per_example_autograd(family, head, mode, tiny_model_dir):
    model, tokenizer = tiny_prefix_model(tiny_model_dir(family), head)
    model.prefix.train()
    batch = batch_for(tokenizer)
    reference = copy.deepcopy(model)
    ref_params, ref_grads = per_example_gradients(reference, batch)

    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, grad_sample_mode=mode))
    engine.attach(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
                  dataset_size=100, expected_batch_size=6, planned_steps=1)
    logits = model(batch["input_ids"], batch["attention_mask"])
    engine.backward(F.cross_entropy(logits, batch["labels"], reduction="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(ref_params)
    for j, p in enumerate(params):
        expected = torch.stack([g[j] for g in ref_grads])
        torch.testing.assert_close(p.grad_sample, expected, atol=1e-6, rtol=1e-4)
    engine.detach()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_noiseless_update_is_mean_of_clipped_per_example_gradients(family, mode, tiny_model_dir, tmp_path):
    """Through the Lightning module: a logical batch of 8 in physical chunks of 3 (virtual steps)."""
    clip = 0.05
    module = PrefixTunedClassifier(
        tiny_model_dir(family), 2, prefix=PrefixConfig(num_virtual_tokens=3), max_physical_batch_size=3,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        privacy=PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip, poisson_sampling=False,
                              grad_sample_mode=mode),
    )
    data = TokenDataModule(size=64, batch_size=8, poisson=False)
    first = collate([data.dataset[i] for i in range(8)])
    reference = copy.deepcopy(module.model)
    _, grads = per_example_gradients(reference, first)
    norms = [torch.cat([g.flatten() for g in gs]).norm() for gs in grads]
    assert sum(n > clip for n in norms) >= 2, "the test must exercise clipping"
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters() if p.requires_grad])
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    after = torch.cat([p.detach().flatten() for p in module.model.parameters() if p.requires_grad])
    torch.testing.assert_close(before - after, clipped_mean(grads, clip, 8), atol=1e-6, rtol=1e-4)


def group_clipped_mean(grads, in_prefix, bounds, batch_size):
    """Reference for clipping='group': each example's prefix tensors clipped together to bounds[0], its head
    tensors together to bounds[1]."""
    total = None
    for gs in grads:
        norms = [math.sqrt(sum(float(g.pow(2).sum()) for g, flag in zip(gs, in_prefix) if flag == group))
                 for group in (True, False)]
        factors = [min(1.0, b / (n + 1e-6)) for b, n in zip(bounds, norms)]
        clipped = torch.cat([(g * factors[0 if flag else 1]).flatten() for g, flag in zip(gs, in_prefix)])
        total = clipped if total is None else total + clipped
    return total / batch_size


def group_norms_by_hand(grads, in_prefix):
    return torch.tensor([[math.sqrt(sum(float(g.pow(2).sum()) for g, flag in zip(gs, in_prefix) if flag == group))
                          for group in (True, False)] for gs in grads])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_group_clipping_clips_the_prefix_and_the_head_apart(family, tiny_model_dir, tmp_path):
    """clipping='group' without noise: the update is the mean of per-example gradients whose prefix part and
    head part were clipped separately, to C*sqrt(share) and C*sqrt(1 - share), by hand."""
    clip, share = 0.05, 0.02  # prefix bound 0.007: the tiny models' prefix norms are about 0.007-0.015
    module = PrefixTunedClassifier(
        tiny_model_dir(family), 2, prefix=PrefixConfig(num_virtual_tokens=3), max_physical_batch_size=3,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        privacy=PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip, poisson_sampling=False,
                              clipping="group", prefix_clip_share=share),
    )
    data = TokenDataModule(size=64, batch_size=8, poisson=False)
    first = collate([data.dataset[i] for i in range(8)])
    reference = copy.deepcopy(module.model)
    _, grads = per_example_gradients(reference, first)
    in_prefix = [n.startswith("prefix.") for n, p in reference.named_parameters() if p.requires_grad]
    bounds = [clip * math.sqrt(share), clip * math.sqrt(1 - share)]
    norms = group_norms_by_hand(grads, in_prefix)
    assert (norms > torch.tensor(bounds)).any(0).all(), "the test must clip both groups"

    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters() if p.requires_grad])
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    after = torch.cat([p.detach().flatten() for p in module.model.parameters() if p.requires_grad])
    torch.testing.assert_close(before - after, group_clipped_mean(grads, in_prefix, bounds, 8), atol=1e-6, rtol=1e-4)
    report = module.privacy_report()
    assert report["clipping"] == "group"
    assert report["group_clip_bounds"] == pytest.approx({"prefix": bounds[0], "head": bounds[1]})


def test_group_clipping_noises_each_group_at_its_own_bound_and_keeps_the_accountants_epsilon(tiny_model_dir):
    """The release of an empty batch is pure noise: each group's noise std is sigma * sqrt(2) * C_g (measured on
    its own coordinates), and the epsilon is Opacus' PRV accountant's for sigma itself. Dividing group g by
    sigma * sqrt(2) * C_g leaves unit noise and sensitivity sqrt(C_p**2 / (2 sigma**2 C_p**2) + C_h**2 /
    (2 sigma**2 C_h**2)) = 1 / sigma: the mechanism of noise multiplier sigma."""
    model, _ = tiny_prefix_model(tiny_model_dir("gpt2"), "linear")
    sigma, clip, share, batch = 1.3, 2.0, 0.01, 4
    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=sigma, target_epsilon=None, max_grad_norm=clip,
                                       clipping="group", prefix_clip_share=share))
    trained = [p for p in model.parameters() if p.requires_grad]
    engine.attach(model, torch.optim.SGD(trained, lr=1.0), dataset_size=1000, expected_batch_size=batch,
                  planned_steps=10, prefix_parameters=list(model.prefix.parameters()))
    prefix_ids = {id(p) for p in model.prefix.parameters()}
    draws = {True: [], False: []}
    for _ in range(10):
        engine.optimizer.pre_step()  # an empty batch: clip (nothing), noise, scale by 1 / B: the update's gradient
        for p in engine.optimizer.params:
            draws[id(p) in prefix_ids].append(p.grad.flatten().clone())
        engine.optimizer.zero_grad(set_to_none=True)
    prv = PRVAccountant()
    prv.history = [(sigma, batch / 1000, 10)]
    for group, bound in ((True, clip * math.sqrt(share)), (False, clip * math.sqrt(1 - share))):
        noise = torch.cat(draws[group])
        assert noise.numel() > 500
        expected = sigma * math.sqrt(2) * bound / batch
        assert float(noise.std()) == pytest.approx(expected, rel=0.1)
    assert engine.epsilon() == pytest.approx(prv.get_epsilon(delta=engine.delta), rel=1e-6)


def test_group_bounds_measured_on_public_data_sit_at_each_groups_median_norm(tiny_model_dir, tmp_path):
    """prefix_clip_share=None: before training, the bounds are set so that C_p / C_h is the ratio of the
    groups' median per-example gradient norms on the public split (here by per-example autograd), with
    C_p**2 + C_h**2 = C**2; the ledger records the public data use; a resumed run keeps the bounds."""
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=3),
                                   privacy=PrivacyConfig(target_epsilon=3.0, clipping="group", max_grad_norm=0.5))
    data = TokenDataModule()
    reference = copy.deepcopy(module.model)
    public = collate([data.public_dataloader().dataset[i] for i in range(32)])
    _, grads = per_example_gradients(reference, public)
    in_prefix = [n.startswith("prefix.") for n, p in reference.named_parameters() if p.requires_grad]
    medians = torch.quantile(group_norms_by_hand(grads, in_prefix).double(), 0.5, dim=0)
    expected = (0.5 * medians / medians.norm()).tolist()
    ckpt = tmp_path / "stopped.ckpt"
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[StopAfter(2, ckpt)]).fit(module, datamodule=data)
    assert module.engine.group_bounds == pytest.approx(expected, rel=1e-4)
    assert [e.status for e in module.ledger.entries if e.component == "group clipping bounds"] == ["public"]

    resumed = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=3),
                                    privacy=PrivacyConfig(target_epsilon=3.0, clipping="group", max_grad_norm=0.5))
    quiet_trainer(tmp_path / "b", max_epochs=1).fit(resumed, datamodule=data, ckpt_path=ckpt)
    assert resumed.engine.group_bounds == pytest.approx(expected, rel=1e-4), "measured once, at the run's start"


def test_private_group_bounds_follow_each_groups_median_norm_within_half_an_octave(tiny_model_dir, tmp_path):
    """group_bound_data='private' with almost no count noise and batches of the whole training set (rate 1): the
    bounds' ratio C_p / C_h is the ratio of the groups' median per-example norms (per-example autograd on the 33
    training examples) up to the histogram's octave bins: each median read to half an octave, the ratio to one.
    No public split is needed. (Negligible noise spends an enormous epsilon: accounted with RDP, which bounds it
    in closed form where PRV's discretisation would not fit in memory.)"""
    module = PrefixTunedClassifier(
        tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=3), max_physical_batch_size=8,
        privacy=PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, accountant="rdp", clipping="group",
                              max_grad_norm=0.5, group_bound_data="private", group_bound_noise=1e-3,
                              group_bound_batches=2))
    data = NoPublicSplit(size=33, batch_size=33)
    _, grads = per_example_gradients(copy.deepcopy(module.model), collate([data.dataset[i] for i in range(33)]))
    in_prefix = [n.startswith("prefix.") for n, p in module.model.named_parameters() if p.requires_grad]
    medians = torch.quantile(group_norms_by_hand(grads, in_prefix).double(), 0.5, dim=0)
    assert medians[1] / medians[0] > 8, "the test needs groups of different scales"
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    prefix_bound, head_bound = module.engine.group_bounds
    assert prefix_bound**2 + head_bound**2 == pytest.approx(0.25)
    assert abs(math.log2((prefix_bound / head_bound) / float(medians[0] / medians[1]))) <= 1.0
    [entry] = [e for e in module.ledger.entries if e.component == "group clipping bounds"]
    assert entry.status == "accounted" and "2 Poisson batches" in entry.detail


def test_private_group_bounds_are_composed_into_the_accountant(tiny_model_dir, tmp_path):
    """What the data flows through, with 2 groups (prefix, head) and N = 64 training examples at rate q = 8 / 64:
    3 Poisson batches (drawn apart from the training's) whose histograms, one count per example and group (L2
    sensitivity sqrt(2)), get noise of std 2: a subsampled Gaussian of multiplier 2 / sqrt(2), 3 times; then 16
    updates (2 epochs of 8 batches), each one subsampled Gaussian at the calibrated sigma. Opacus' PRV accountant
    fed that history by hand gives the report's epsilon, which is the target; the run interrupted after 3
    updates and resumed spends the same (the estimate counted once) with the same bounds."""
    def make():
        torch.manual_seed(0)
        return PrefixTunedClassifier(
            tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=3),
            privacy=PrivacyConfig(target_epsilon=2.0, clipping="group", group_bound_data="private",
                                  group_bound_noise=2.0, group_bound_batches=3))

    whole = make()
    quiet_trainer(tmp_path / "whole", max_epochs=2).fit(whole, datamodule=NoPublicSplit())
    sigma, q, delta = whole.engine.noise_multiplier, 8 / 64, 64**-1.1
    prv = PRVAccountant()
    prv.history = [(2.0 / math.sqrt(2), q, 3), (sigma, q, 16)]
    report = whole.privacy_report()
    assert report["epsilon"] == pytest.approx(prv.get_epsilon(delta=delta), rel=1e-6)
    assert report["epsilon"] == pytest.approx(2.0, abs=0.01) and report["epsilon"] <= 2.0
    flat = PRVAccountant()
    flat.history = [(sigma, q, 16)]
    assert flat.get_epsilon(delta=delta) < 2.0 - 0.01, "the estimate's releases took part of the budget"

    ckpt = tmp_path / "stopped.ckpt"
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[StopAfter(3, ckpt)]).fit(make(), datamodule=NoPublicSplit())
    resumed = make()
    quiet_trainer(tmp_path / "b", max_epochs=2).fit(resumed, datamodule=NoPublicSplit(), ckpt_path=ckpt)
    assert resumed.privacy_report()["epsilon"] == pytest.approx(report["epsilon"], rel=1e-9)
    assert resumed.engine.group_bounds == pytest.approx(whole.engine.group_bounds, rel=1e-9)


def test_private_group_bounds_in_secure_mode_keep_the_formal_guarantee(tiny_model_dir, tmp_path):
    """secure_mode: the estimate's Poisson batches and its histogram noise come from the OS's CSPRNG like the
    training's, so the report's guarantee holds, with the estimate's releases first in the accountant history
    (noise 1 on each count, 2 groups: multiplier 1 / sqrt(2); the default 4 batches at q = 32 / 128). With an
    expected 128 examples, the noise on a group's whole histogram (std 1 * sqrt(4 * 34) = 11.7) is 5.5 standard
    deviations below the 64 that reading the median needs: OS draws do not make this test flaky."""
    module = PrefixTunedClassifier(
        tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=3),
        privacy=PrivacyConfig(target_epsilon=8.0, clipping="group", group_bound_data="private", group_bound_noise=1.0,
                              secure_mode=True))
    quiet_trainer(tmp_path, max_epochs=1).fit(module, datamodule=NoPublicSplit(size=128, batch_size=32))
    report = module.privacy_report()
    assert report["formal_guarantee"], report["reasons"]
    assert report["accountant_history"][0] == pytest.approx([1 / math.sqrt(2), 32 / 128, 4])
    assert report["group_clip_bounds"]["prefix"] < report["group_clip_bounds"]["head"]


def whole_and_resumed_after_a_pruning(path, privacy, tmp_path, num_virtual_tokens):
    """The same DP run with layer 1 pruned at epoch 1, whole and resumed from a checkpoint after the pruning."""
    from pflat_lightning.callbacks import SharpnessLayerSelection

    def make():
        torch.manual_seed(0)
        return PrefixTunedClassifier(path, 2, prefix=PrefixConfig(num_virtual_tokens=num_virtual_tokens),
                                     privacy=privacy)

    select = partial(SharpnessLayerSelection, layers=[0], at_epoch=1)
    whole = make()
    quiet_trainer(tmp_path / "whole", max_epochs=2, callbacks=[select()]).fit(whole, datamodule=TokenDataModule())
    ckpt = tmp_path / "pruned.ckpt"
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[select(), StopAfter(10, ckpt)]).fit(
        make(), datamodule=TokenDataModule())
    resumed = make()
    quiet_trainer(tmp_path / "b", max_epochs=2, callbacks=[select()]).fit(resumed, datamodule=TokenDataModule(),
                                                                          ckpt_path=ckpt)
    return whole, resumed


def test_group_clipping_resumed_after_a_pruning_trains_as_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """The pruned layer is frozen when the resumed run builds its optimizer: its groups and bounds must still be
    those of the uninterrupted run."""
    privacy = PrivacyConfig(target_epsilon=3.0, clipping="group", prefix_clip_share=0.5)
    whole, resumed = whole_and_resumed_after_a_pruning(tiny_model_dir("bert"), privacy, tmp_path, 3)
    assert resumed.engine.optimizer.bounds == pytest.approx([math.sqrt(0.5)] * 2)
    assert_same_trained_weights(resumed, whole)


def test_group_clipping_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="clipping='group' needs per-example gradients per tensor"):
        PrivacyConfig(clipping="group", grad_sample_mode="ghost")
    with pytest.raises(ValueError, match=r"prefix_clip_share must be in \(0, 1\) or None .*got 1.0"):
        PrivacyConfig(clipping="group", prefix_clip_share=1.0)
    with pytest.raises(ValueError, match=r"clipping must be one of \('flat', 'group'\), got 'split'"):
        PrivacyConfig(clipping="split")
    with pytest.raises(ValueError, match="group_bound_data must be one of \\('public', 'private'\\), got 'train'"):
        PrivacyConfig(clipping="group", group_bound_data="train")
    with pytest.raises(ValueError, match="group_bound_noise must be > 0 .*got 0"):
        PrivacyConfig(clipping="group", group_bound_data="private", group_bound_noise=0)
    with pytest.raises(ValueError, match="group_bound_batches must be an integer >= 1, got 0"):
        PrivacyConfig(clipping="group", group_bound_data="private", group_bound_batches=0)
    with pytest.raises(ValueError, match="group_bound_data='private' estimates the group bounds, prefix_clip_share=0.3"):
        PrivacyConfig(clipping="group", group_bound_data="private", prefix_clip_share=0.3)
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=3),
                                   privacy=PrivacyConfig(target_epsilon=3.0, clipping="group"))
    with pytest.raises(ValueError, match="the datamodule has no public split.*group_bound_data='private'"):
        quiet_trainer(tmp_path, max_epochs=1).fit(module, datamodule=NoPublicSplit())


class NoPublicSplit(TokenDataModule):
    public_dataloader = None


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_bf16_mixed_clips_fp32_per_example_gradients(family, tiny_model_dir, tmp_path):
    """Under bf16-mixed the backbone computes in bf16, but the per-example gradients, their clipping and
    the update are fp32: the update equals the hand-clipped mean of per-example autograd gradients taken
    under the same bf16 autocast (tolerance: bf16 batched vs. single-example arithmetic)."""
    clip = 0.05
    module = PrefixTunedClassifier(
        tiny_model_dir(family), 2, prefix=PrefixConfig(num_virtual_tokens=3), max_physical_batch_size=3,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        privacy=PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip, poisson_sampling=False),
    )
    data = TokenDataModule(size=64, batch_size=8, poisson=False)
    first = collate([data.dataset[i] for i in range(8)])
    reference = copy.deepcopy(module.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grads = per_example_gradients(reference, first)
    assert all(g.dtype == torch.float32 for gs in grads for g in gs)
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters() if p.requires_grad])
    quiet_trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(module, datamodule=data)
    assert all(p.dtype == torch.float32 for p in module.model.prefix.parameters())
    after = torch.cat([p.detach().flatten() for p in module.model.parameters() if p.requires_grad])
    expected = clipped_mean(grads, clip, 8)
    torch.testing.assert_close(before - after, expected, atol=2e-3 * float(expected.abs().max()), rtol=2e-2)


def test_noise_has_the_calibrated_standard_deviation(tiny_model_dir):
    """With clipping to zero signal, an update is pure noise: std = sigma * C / expected batch."""
    model, tokenizer = tiny_prefix_model(tiny_model_dir("bert"), "linear")
    sigma, clip, expected = 1.3, 0.7, 5
    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=sigma, target_epsilon=None, max_grad_norm=clip))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = engine.attach(model, torch.optim.SGD(params, lr=1.0), dataset_size=100, expected_batch_size=expected,
                              planned_steps=1)
    before = torch.cat([p.detach().flatten().clone() for p in params])
    optimizer.step()  # an empty Poisson batch, nothing back-propagated: zero signal, the step still adds noise
    delta = before - torch.cat([p.detach().flatten() for p in params])
    n = delta.numel()
    target = sigma * clip / expected
    # The sample std of n normals is within 5 standard errors (target / sqrt(2n)) of the truth.
    assert abs(delta.std().item() - target) < 5 * target / math.sqrt(2 * n)
    assert abs(delta.mean().item()) < 5 * target / math.sqrt(n)
    assert engine.updates == 1


@pytest.mark.parametrize("accountant, reference", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_reported_epsilon_equals_a_fresh_opacus_accountant(accountant, reference, tiny_model_dir, tmp_path):
    target = 3.0
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(target_epsilon=target, accountant=accountant, secure_mode=True))
    data = TokenDataModule(size=64, batch_size=8)
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=data)
    engine = module.engine
    assert engine.updates == 2 * 8  # every planned step ran (empty Poisson batches included)
    fresh = reference()
    fresh.history = [(engine.noise_multiplier, 8 / 64, 16)]
    expected = fresh.get_epsilon(delta=64 ** -1.1)
    report = module.privacy_report()
    assert report["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert report["epsilon"] <= target
    assert report["epsilon"] > target - 0.05, "the noise is calibrated to end at the target"
    assert report["formal_guarantee"] is True and report["ledger"] == []


def test_explicit_noise_that_cannot_reach_the_plan_is_refused(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(target_epsilon=1.0, noise_multiplier=0.3))
    with pytest.raises(ValueError, match="noise_multiplier=0.3 and target_epsilon=1.0 contradict"):
        quiet_trainer(tmp_path, max_epochs=2).fit(module, datamodule=TokenDataModule())


def test_pruned_layer_gets_no_gradient_no_noise_no_update(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("gpt2"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(noise_multiplier=2.0, target_epsilon=None))
    module.model.prefix.set_layer_mask([False, True])
    pruned = module.model.prefix.layers[0].weight.detach().clone()
    kept = module.model.prefix.layers[1].weight.detach().clone()
    quiet_trainer(tmp_path, max_steps=3).fit(module, datamodule=TokenDataModule())
    assert torch.equal(module.model.prefix.layers[0].weight, pruned)
    assert module.model.prefix.layers[0].weight.grad is None
    assert not torch.equal(module.model.prefix.layers[1].weight, kept)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_clipping_after_a_pruning_covers_exactly_the_remaining_parameters(mode, tiny_model_dir):
    """A layer pruned after a step (so Opacus has seen it trained) is no part of any later clip: with noise 0
    each update is the mean of the remaining parameters' per-example gradients, each clipped to C by hand,
    over Poisson-like batches of different sizes (physical chunks of 4: virtual steps too)."""
    clip, expected_batch = 0.05, 6
    model, tokenizer = tiny_prefix_model(tiny_model_dir("bert"), "linear")
    model.prefix.train()
    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip,
                                       grad_sample_mode=mode))
    optimizer = engine.attach(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
                              dataset_size=100, expected_batch_size=expected_batch, planned_steps=4)

    def losses(batch):
        return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], reduction="none")

    pruned = list(model.prefix.layers[1].parameters())
    for step, size in enumerate([6, 6, 4, 7]):
        if step == 1:
            model.prefix.set_layer_mask([True, False])
            frozen = [p.detach().clone() for p in pruned]
        batch = batch_for(tokenizer, size=size, seed=step + 1)
        engine.hooks.disable_hooks()
        params, grads = per_example_gradients(model, batch)
        engine.hooks.enable_hooks()
        norms = [torch.cat([g.flatten() for g in gs]).norm() for gs in grads]
        assert sum(n > clip for n in norms) >= 2, "the test must exercise clipping"
        before = torch.cat([p.detach().flatten().clone() for p in params])
        for chunk in physical_batches(batch, 4):
            engine.backward(losses(chunk))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = torch.cat([p.detach().flatten() for p in params])
        torch.testing.assert_close(before - after, clipped_mean(grads, clip, expected_batch), atol=1e-6, rtol=1e-4)
    assert all(torch.equal(p, w) for p, w in zip(pruned, frozen))
    engine.detach()


def test_ghost_clipping_trains_through_a_layer_selection(tiny_model_dir, tmp_path):
    from pflat_lightning.callbacks import SharpnessLayerSelection

    module = PrefixTunedClassifier(tiny_model_dir("gpt2"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(target_epsilon=3.0, grad_sample_mode="ghost", secure_mode=True))
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[SharpnessLayerSelection(layers=[0], at_epoch=1)]).fit(
        module, datamodule=TokenDataModule())
    assert module.engine.updates == 16 and module.prefix.active_layers == [0]
    assert module.privacy_report()["formal_guarantee"]


def test_ghost_clipping_resumed_after_a_pruning_trains_as_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """The resumed run hooks the module with the layer already pruned, the uninterrupted one before the
    pruning: both must clip the same tensors."""
    privacy = PrivacyConfig(target_epsilon=3.0, grad_sample_mode="ghost")
    whole, resumed = whole_and_resumed_after_a_pruning(tiny_model_dir("gpt2"), privacy, tmp_path, 2)
    assert resumed.prefix.active_layers == [0] and resumed.engine.history == whole.engine.history
    assert_same_trained_weights(resumed, whole)


@pytest.mark.parametrize("reparam_hidden", [None, 2048])
def test_auto_clipping_picks_ghost_only_when_per_example_gradients_are_large(reparam_hidden, tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("gpt2"), 2,
                                   prefix=PrefixConfig(num_virtual_tokens=3, reparam_hidden=reparam_hidden),
                                   max_physical_batch_size=16,
                                   privacy=PrivacyConfig(grad_sample_mode="auto", noise_multiplier=1.0, target_epsilon=None))
    # Independently: hooks hold one fp32 gradient per example and trainable parameter.
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    hooks_bytes = 16 * trainable * 4
    expected = "ghost" if hooks_bytes > 256 * 2**20 else "hooks"
    assert expected == ("hooks" if reparam_hidden is None else "ghost"), "the test covers both choices"
    quiet_trainer(tmp_path, max_steps=2).fit(module, datamodule=TokenDataModule(batch_size=16))
    assert module.engine.grad_sample_mode == expected
    report = module.privacy_report()
    assert report["grad_sample_mode"] == expected
    assert report["callbacks"]["clipping"]["estimated_mib"]["hooks"] == round(hooks_bytes / 2**20, 2)


def test_physical_chunks_go_by_length_and_drop_their_padding():
    """A right-padded logical batch is cut shortest first; each chunk keeps every one of its examples' tokens and
    no column that is padding in all its rows; every example lands in exactly one chunk, its text with it."""
    lengths = torch.tensor([7, 2, 5, 3, 7, 1, 4])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    ids = torch.arange(49).view(7, 7) * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))  # per-token, as a causal LM's
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "text": [f"t{i}" for i in range(7)]}
    chunks = list(physical_batches(batch, 3))
    assert [c["attention_mask"].sum(1).tolist() for c in chunks] == [[1, 2, 3], [4, 5, 7], [7]]
    assert [c["input_ids"].shape[1] for c in chunks] == [3, 7, 7]
    seen = []
    for chunk in chunks:
        assert chunk["labels"].shape == chunk["input_ids"].shape == chunk["attention_mask"].shape
        for row, text in zip(range(len(chunk["text"])), chunk["text"]):
            i = int(text[1:])
            seen.append(i)
            width = chunk["input_ids"].shape[1]
            assert torch.equal(chunk["input_ids"][row], ids[i, :width]) and not ids[i, width:].any()
            assert torch.equal(chunk["labels"][row], labels[i, :width])
    assert sorted(seen) == list(range(7))

    left = {"input_ids": ids.flip(1), "attention_mask": mask.flip(1)}  # left padding: nothing is cut off
    assert all(c["input_ids"].shape[1] == 7 for c in physical_batches(left, 3))
    assert sorted(sum((c["attention_mask"].sum(1).tolist() for c in physical_batches(left, 3)), [])) == sorted(
        lengths.tolist())
