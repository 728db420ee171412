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

from conftest import FAMILIES
from helpers import SEEDED_REASONS, StopAfter, TokenDataModule, TokenDataset, assert_same_trained_weights, collate, quiet_trainer

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


def clipped_mean(grads, max_norm, batch_size):
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    clipped = [f * min(1.0, max_norm / (f.norm().item() + 1e-6)) for f in flat]
    return torch.stack(clipped).sum(0) / batch_size


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


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_split_clipping_clips_the_prefix_and_the_head_apart(family, tiny_model_dir, tmp_path):
    """clipping='split': each tensor clipped to its share of the budget, by hand; the noise keeps scale C."""
    clip, share = 0.05, 0.25
    module = PrefixTunedClassifier(
        tiny_model_dir(family), 2, prefix=PrefixConfig(num_virtual_tokens=3), max_physical_batch_size=3,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        privacy=PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip, poisson_sampling=False,
                              clipping="split", prefix_clip_share=share),
    )
    data = TokenDataModule(size=64, batch_size=8, poisson=False)
    first = collate([data.dataset[i] for i in range(8)])
    reference = copy.deepcopy(module.model)
    _, grads = per_example_gradients(reference, first)
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    in_prefix = [n.startswith("prefix.") for n in names]
    n_prefix, n_head = sum(in_prefix), len(names) - sum(in_prefix)
    assert n_prefix > 0 and n_head > 0
    bounds = [clip * math.sqrt((share / n_prefix) if flag else ((1 - share) / n_head)) for flag in in_prefix]
    clipped = [[g * min(1.0, b / (g.norm().item() + 1e-6)) for g, b in zip(gs, bounds)] for gs in grads]
    assert any(g.norm() > b for gs in grads for g, b in zip(gs, bounds)), "the test must exercise clipping"
    expected = torch.cat([sum(c[j] for c in clipped).flatten() / 8 for j in range(len(names))])

    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters() if p.requires_grad])
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    after = torch.cat([p.detach().flatten() for p in module.model.parameters() if p.requires_grad])
    torch.testing.assert_close(before - after, expected, atol=1e-6, rtol=1e-4)
    assert module.engine.optimizer.max_grad_norm == pytest.approx(clip), "noise std stays noise_multiplier * C"
    report = module.privacy_report()
    assert report["clipping"] == "split" and report["prefix_clip_share"] == share


def test_split_clipping_keeps_each_bound_with_its_tensor_after_pruning(tiny_model_dir, tmp_path):
    from pflat_lightning.callbacks import SharpnessLayerSelection

    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=3),
                                   privacy=PrivacyConfig(target_epsilon=3.0, clipping="split"))
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[SharpnessLayerSelection(layers=[0], at_epoch=1)]).fit(
        module, datamodule=TokenDataModule())
    optimizer = module.engine.optimizer
    trained = [p for p in module.model.parameters() if p.requires_grad]
    pruned = [p for p in module.prefix.layers[1].parameters()]
    assert not any(p.requires_grad for p in pruned) and len(optimizer.params) == len(trained)
    assert optimizer.max_grad_norms == [optimizer.bounds[id(p)] for p in trained]
    assert sum(b**2 for b in optimizer.bounds.values()) == pytest.approx(1.0), "all bounds together: C**2"
    assert module.privacy_report()["reasons"] == SEEDED_REASONS, "nothing but the seeded randomness voids the guarantee"


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


def test_split_clipping_resumed_after_a_pruning_clips_as_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """The pruned layer is frozen when the resumed run builds its optimizer: the bounds must still be the
    shares of all prefix tensors (C * sqrt(share / 2 layers' tensors)), not of the one layer left."""
    privacy = PrivacyConfig(target_epsilon=3.0, clipping="split", prefix_clip_share=0.5)
    whole, resumed = whole_and_resumed_after_a_pruning(tiny_model_dir("bert"), privacy, tmp_path, 3)
    prefix_tensors = len(list(resumed.prefix.parameters()))
    kept = list(resumed.prefix.layers[0].parameters())
    assert len(kept) < prefix_tensors and all(p.requires_grad for p in kept)
    for p in kept:
        assert resumed.engine.optimizer.bounds[id(p)] == pytest.approx(1.0 * math.sqrt(0.5 / prefix_tensors))
    assert_same_trained_weights(resumed, whole)


def test_split_clipping_is_refused_with_ghost_clipping_and_a_bad_share():
    with pytest.raises(ValueError, match="clipping='split' needs per-example gradients per tensor"):
        PrivacyConfig(clipping="split", grad_sample_mode="ghost")
    with pytest.raises(ValueError, match=r"prefix_clip_share must be in \(0, 1\), got 1.0"):
        PrivacyConfig(clipping="split", prefix_clip_share=1.0)
    with pytest.raises(ValueError, match="clipping must be one of"):
        PrivacyConfig(clipping="per_layer")


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
    engine.prepare_empty_step()  # an empty Poisson batch: zero signal, the step still adds noise
    optimizer.step()
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
        engine.backward_batch(batch, losses, 4)
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
