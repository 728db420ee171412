"""Every supported model family, through one shared tester over tiny random configs (a family is one line of
``TINY``), each behaviour checked against an independent computation: the model's own cache, the plain model,
Hugging Face's own LM forward and loss, per-example autograd, hand-written greedy decoding."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, DynamicCache

from pflat_lightning import PrefixConfig, PrefixTunedCausalLM, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.bundled import resolve_model
from pflat_lightning.families import FAMILIES, REFUSED, cache_keyword, family_for, kv_geometry
from pflat_lightning.prefix_model import PrefixCausalLM, PrefixModel, load_backbone
from pflat_lightning.privacy import DPSGDEngine

from conftest import BASE, TINY, tiny_config
from helpers import TokenDataModule, TokenDataset, clipped_mean, collate, greedy_by_hand, quiet_trainer

SUPPORTED = sorted(TINY)
ENCODERS = [t for t in SUPPORTED if family_for(tiny_config(t)[1]).bidirectional]
DECODERS = [t for t in SUPPORTED if t not in ENCODERS]
#: Decoders with a learned absolute position table (the rest are rotary).
ABSOLUTE_DECODERS = {"gpt2", "opt"}
WORDPIECE_ENCODERS = {"bert", "electra"}
WINDOW_TYPES = [t for t in SUPPORTED if "sliding_window" in TINY[t]]
PREFIX = 3
PREFIX_CONFIG = PrefixConfig(num_virtual_tokens=PREFIX, init_std=1.0)
LABEL_WORDS = ("bad", "good")
EOS, PAD = 102, 0


@lru_cache(maxsize=None)
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("bundled-minilm"))


def prefix_model(path: str, head: str = "linear", **kwargs) -> PrefixModel:
    torch.manual_seed(1)
    words = tokenizer().convert_tokens_to_ids(list(LABEL_WORDS))
    return PrefixModel(load_backbone(path, head, **kwargs), 2, head=head, label_word_ids=words,
                       mask_token_id=tokenizer().mask_token_id, prefix=PREFIX_CONFIG)


def token_batch(model_type: str, size: int = 4, length: int = 10, seed: int = 1):
    """Random word ids, the last token of every third row padding, a mask token for the encoders' label words."""
    mask_token = tokenizer().mask_token_id if model_type in ENCODERS else None
    data = TokenDataset(size, length=length, seed=seed, mask_token_id=mask_token)
    batch = collate([data[i] for i in range(size)])
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, PAD)
    return batch


def reference_positions(model_type: str, config, mask: torch.Tensor) -> torch.Tensor:
    """Where each family's real tokens sit, written out per family (right-padded rows)."""
    steps = torch.arange(mask.shape[1]).expand_as(mask)
    if model_type in WORDPIECE_ENCODERS:
        return steps
    if model_type in ENCODERS:  # RoBERTa: from padding_idx + 1, padding at the padding index
        return (config.pad_token_id + 1 + steps) * mask + config.pad_token_id * (1 - mask)
    return PREFIX + steps


def hf_lm_logits(model, lm, input_ids, attention_mask, model_type):
    """Hugging Face's own LM forward (its head, soft-capping included) with the prefix as its cache."""
    cache = DynamicCache()
    for layer, (key, value) in enumerate(model.prefix(input_ids.shape[0])):
        cache.update(key, value, layer)
    full_mask = torch.cat([torch.ones(input_ids.shape[0], PREFIX, dtype=torch.long), attention_mask], 1)
    positions = reference_positions(model_type, lm.config, attention_mask)
    with model.prefix_visible():
        return lm(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                  **{model.cache_keyword: cache}).logits


def hide_prefix(module, args, kwargs):
    """A forward pre-hook that masks the prefix's columns out of the 2D attention mask."""
    mask = kwargs["attention_mask"].clone()
    mask[:, :PREFIX] = 0
    kwargs["attention_mask"] = mask
    return args, kwargs


def every_registered_type():
    return sorted(t for family in FAMILIES.values() for t in family.model_types)


# ---------------------------------------------------------------- coverage of the registry
def test_every_registered_model_type_is_tested_here():
    assert SUPPORTED == every_registered_type()


# ---------------------------------------------------------------- geometry, positions, masks
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_geometry_from_the_config_is_the_cache_the_model_writes(model_type):
    _, config = tiny_config(model_type)
    if model_type in ENCODERS:
        config.is_decoder = True  # an encoder writes a cache only as a decoder; its attention shapes are the same
    model = AutoModel.from_config(config).eval()
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(2000, 3000, (2, 5)), use_cache=True,
              **{cache_keyword(model.forward): cache})
    geometry = kv_geometry(config)
    assert len(cache.layers) == geometry.num_layers
    for layer in cache.layers:
        assert layer.keys.shape == (2, geometry.num_kv_heads, 5, geometry.head_dim)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_prefix_with_zero_attention_gives_the_plain_models_outputs(model_type, tiny_model_dir):
    """The prefix's mask columns set to 0 (a forward pre-hook on the 2D mask the module builds): every layer's
    softmax gives the prefix exactly zero weight, so the module's positions and masks alone decide the output,
    and it must equal the plain model's on the same tokens at the positions each family defines (a decoder's real
    tokens after the prefix: rotary decoders at their own default positions, shift-invariant; absolute tables at
    prefix + t). Sequences are longer than the sliding windows."""
    model = prefix_model(tiny_model_dir(model_type)).eval()
    batch = token_batch(model_type)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    handle = model.transformer.register_forward_pre_hook(hide_prefix, with_kwargs=True)
    with torch.no_grad():
        hidden = model.hidden_states(ids, mask)
        handle.remove()
        positions = {"position_ids": PREFIX + torch.arange(ids.shape[1]).expand_as(ids)} \
            if model_type in ABSOLUTE_DECODERS else {}
        plain = model.transformer(input_ids=ids, attention_mask=mask, **positions).last_hidden_state
        visible = model.hidden_states(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], plain[real], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(visible[real], plain[real], atol=1e-3), "a visible prefix must change the output"


@pytest.mark.parametrize("model_type", WINDOW_TYPES)
def test_prefix_reaches_sliding_window_layers_beyond_the_window(model_type, tiny_model_dir):
    """The last layer slides with a window of 4; the last of 10 tokens is beyond it. Changing only that layer's
    prefix changes that token's output; fed to the model as a plain 2D mask and cache (what transformers does
    by default) the change does not reach it."""
    model = prefix_model(tiny_model_dir(model_type)).eval()
    ids = torch.randint(2000, 3000, (2, 10))
    mask = torch.ones_like(ids)

    def last_token(shown: bool) -> torch.Tensor:
        cache = model.prefix_cache(2)
        inputs = dict(input_ids=ids, attention_mask=torch.cat([torch.ones(2, PREFIX, dtype=torch.long), mask], 1),
                      position_ids=model.position_ids(mask), **{model.cache_keyword: cache})
        if shown:
            with model.prefix_visible():
                return model.transformer(**inputs).last_hidden_state[:, -1]
        return model.transformer(**inputs).last_hidden_state[:, -1]

    with torch.no_grad():
        before = {shown: last_token(shown) for shown in (True, False)}
        model.prefix.layers[-1].weight.add_(1.0)
        after = {shown: last_token(shown) for shown in (True, False)}
    assert not torch.allclose(before[True], after[True], atol=1e-4)
    torch.testing.assert_close(before[False], after[False])


# ---------------------------------------------------------------- heads
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_label_word_logits_are_the_lms_own_logits_at_the_read_position(model_type, tiny_model_dir):
    path = tiny_model_dir(model_type)
    model = prefix_model(path, "label_words").eval()
    lm = model.backbone
    batch = token_batch(model_type)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(ids, mask)
        full = hf_lm_logits(model, lm, ids, mask, model_type)
    read = (ids == tokenizer().mask_token_id).long().argmax(1) if model_type in ENCODERS else mask.sum(1) - 1
    words = tokenizer().convert_tokens_to_ids(list(LABEL_WORDS))
    torch.testing.assert_close(logits, full[torch.arange(4), read][:, words], atol=1e-5, rtol=1e-4)


def assert_dp_step_is_clipped_mean_of_autograd(model, losses_of, batch, mode):
    """One noiseless DP-SGD step (clip at the median per-example norm: half clipped) moves the trainable
    parameters by the clipped mean of per-example autograd gradients."""
    size = batch["input_ids"].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    one = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)]
    grads = [torch.autograd.grad(losses_of(model, x).sum(), params) for x in one]
    clip = float(torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads]).median())
    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip,
                                       grad_sample_mode=mode))
    optimizer = engine.attach(model, torch.optim.SGD(params, lr=1.0), dataset_size=100, expected_batch_size=size,
                              planned_steps=1)
    before = torch.cat([p.detach().flatten().clone() for p in params])
    engine.backward(losses_of(model, batch))
    optimizer.step()
    engine.detach()
    after = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(before - after, clipped_mean(grads, clip, size), atol=1e-6, rtol=1e-4)


def classification_losses(model, batch):
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], reduction="none")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("head", ["linear", "label_words"])
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_dp_classification_step_is_clipped_per_example_autograd(model_type, head, mode, tiny_model_dir):
    model = prefix_model(tiny_model_dir(model_type), head).train()
    assert_dp_step_is_clipped_mean_of_autograd(model, classification_losses, token_batch(model_type), mode)


# ---------------------------------------------------------------- decoders: causal LM and generate
def causal_lm(path: str, **kwargs) -> PrefixCausalLM:
    torch.manual_seed(1)
    return PrefixCausalLM(load_backbone(path, "causal_lm", **kwargs), PREFIX_CONFIG)


def lm_batch(seed: int = 2):
    batch = token_batch("llama", seed=seed)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :4] = -100  # a prompt of 4 tokens, not scored
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def mean_target_nll(model, batch):
    log_probs, scored = model.target_log_probs(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return -(log_probs * scored).sum(1) / scored.sum(1)


@pytest.mark.parametrize("model_type", DECODERS)
def test_causal_lm_target_nll_is_hugging_faces_own_loss(model_type, tiny_model_dir):
    model = causal_lm(tiny_model_dir(model_type)).eval()
    batch = lm_batch()
    with torch.no_grad():
        ours = mean_target_nll(model, batch)
        logits = hf_lm_logits(model, model.backbone, batch["input_ids"], batch["attention_mask"], model_type)
    expected = torch.stack([F.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=-100)
                            for i in range(4)])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_dp_causal_lm_step_is_clipped_per_example_autograd(model_type, mode, tiny_model_dir):
    model = causal_lm(tiny_model_dir(model_type)).train()
    assert_dp_step_is_clipped_mean_of_autograd(model, mean_target_nll, lm_batch(), mode)


@pytest.mark.parametrize("model_type", DECODERS)
def test_generate_continues_after_the_prefix_as_greedy_decoding(model_type, tiny_model_dir):
    """Left-padded prompts of 6 tokens and 5 new ones: past the sliding windows, as generate feeds them."""
    model = causal_lm(tiny_model_dir(model_type)).eval()
    prompts = torch.randint(2000, 3000, (3, 6))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    prompts = prompts.masked_fill(mask == 0, PAD)
    generated = model.generate(prompts, mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(generated, greedy_by_hand(model, prompts, mask, 5, EOS, PAD))


# ---------------------------------------------------------------- 16-bit backbones
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_bf16_backbone_with_fp32_prefix_and_head(model_type, tiny_model_dir):
    path = tiny_model_dir(model_type)
    model = prefix_model(path, dtype="bfloat16").train()
    reference = prefix_model(path).train()
    assert all(p.dtype == torch.bfloat16 for p in model.backbone.parameters())
    assert all(p.dtype == torch.float32 for m in model.trainable_modules() for p in m.parameters())
    batch = token_batch(model_type)
    logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference(batch["input_ids"], batch["attention_mask"]), atol=0.1, rtol=0.1)
    F.cross_entropy(logits, batch["labels"]).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("model_type", DECODERS)
def test_bf16_causal_lm_scores_and_generates(model_type, tiny_model_dir):
    path = tiny_model_dir(model_type)
    model = causal_lm(path, dtype="bfloat16").eval()
    reference = causal_lm(path).eval()
    batch = lm_batch()
    with torch.no_grad():
        torch.testing.assert_close(mean_target_nll(model, batch), mean_target_nll(reference, batch), atol=0.1, rtol=0.05)
    out = model.generate(batch["input_ids"][:, :4], torch.ones(4, 4, dtype=torch.long), max_new_tokens=2,
                         do_sample=False, pad_token_id=PAD)
    assert out.shape == (4, 6)


# ---------------------------------------------------------------- loading as Hugging Face users do
def test_lightning_modules_load_a_16_bit_backbone_as_from_pretrained_does(tiny_model_dir, tmp_path):
    """dtype, device_map and low_cpu_mem_usage reach from_pretrained; DP trains the fp32 prefix of a bf16 Qwen3."""
    kwargs = {"dtype": "bfloat16", "device_map": "cpu", "low_cpu_mem_usage": True}
    module = PrefixTunedClassifier(tiny_model_dir("qwen3"), 2, prefix=PREFIX_CONFIG, backbone_kwargs=kwargs,
                                   privacy=PrivacyConfig(noise_multiplier=0.5, target_epsilon=None, poisson_sampling=False))
    assert module.model.backbone.dtype == torch.bfloat16 and module.model.prefix.layers[0].weight.dtype == torch.float32
    before = module.model.prefix.layers[0].weight.detach().clone()
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=TokenDataModule(size=16, batch_size=4, poisson=False))
    assert not torch.equal(before, module.model.prefix.layers[0].weight)
    generator = PrefixTunedCausalLM(tiny_model_dir("gemma2"), prefix=PREFIX_CONFIG, backbone_kwargs={"dtype": "bfloat16"},
                                    privacy=PrivacyConfig(enabled=False))
    assert generator.model.backbone.dtype == torch.bfloat16


def test_remote_code_is_refused_unless_asked_for(tiny_model_dir, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((Path(tiny_model_dir("llama")) / "config.json").read_text())
    config["model_type"] = "custom_llama"  # a type transformers does not know: only the folder's code could load it
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        PrefixTunedClassifier(str(folder), 2)


# ---------------------------------------------------------------- refusals, from the config alone
def config_only_folder(tmp_path, config) -> str:
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    return str(folder)


REFUSED_CONFIGS = {
    **{model_type: {} for model_type in REFUSED},
    "bart": {},
    "falcon": {"alibi": True},
}


@pytest.mark.parametrize("model_type", sorted(REFUSED_CONFIGS))
def test_refused_from_the_config_before_any_weights_load(model_type, tmp_path):
    """The folder holds only config.json: loading weights (or a tokenizer) would fail with another message."""
    folder = config_only_folder(tmp_path, AutoConfig.for_model(model_type, **REFUSED_CONFIGS[model_type]))
    supported = re.escape("Supported families: bert (bert), electra (electra), roberta (roberta/xlm-roberta), gpt2")
    for build in (lambda: PrefixTunedClassifier(folder, 2), lambda: PrefixTunedCausalLM(folder)):
        with pytest.raises(ValueError, match=rf"model_type='{model_type}'.*{supported}"):
            build()


def test_a_masked_lm_is_refused_for_generation_from_its_config(tmp_path):
    folder = config_only_folder(tmp_path, tiny_config("electra")[1])
    with pytest.raises(ValueError, match=r"is a electra masked LM \(model_type='electra'\); generation needs a causal LM"):
        PrefixTunedCausalLM(folder)


# ---------------------------------------------------------------- the README's table
def support_table() -> str:
    """The README's family table, from the registry (each column is shown by the tests above for every type)."""
    rows = ["| family | model types | linear head | label words | causal LM | generate | ghost clipping | bf16 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for family in FAMILIES.values():
        decoder = "no" if family.bidirectional else "yes"
        types = ", ".join(f"`{t}`" for t in family.model_types)
        rows.append(f"| {family.name} | {types} | yes | yes | {decoder} | {decoder} | yes | yes |")
    return "\n".join(rows)


def test_readme_table_is_the_registrys():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_table() in readme, "regenerate the README's family table: print(tests.test_families.support_table())"


def test_falcon_grouped_key_values_follow_the_installed_transformers(tmp_path):
    """Falcon-40B's layout (new_decoder_architecture, 2 key/value heads for 4 query heads): transformers >= 5.24
    caches the 2 heads, which the config's geometry gives; older releases cache one per query head, refused."""
    config = AutoConfig.for_model("falcon", **BASE, new_decoder_architecture=True, num_kv_heads=2)
    if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 24):
        with pytest.raises(ValueError, match="model_type='falcon': new_decoder_architecture=True"):
            family_for(config)
        return
    model = AutoModel.from_config(config).eval()
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(2000, 3000, (2, 5)), use_cache=True, **{cache_keyword(model.forward): cache})
    assert cache.layers[0].keys.shape == (2, kv_geometry(config).num_kv_heads, 5, 8) and kv_geometry(config).num_kv_heads == 2
    prefixed = PrefixModel(model, 2, prefix=PREFIX_CONFIG)
    assert prefixed.hidden_states(torch.randint(2000, 3000, (2, 5)), torch.ones(2, 5, dtype=torch.long)).shape == (2, 5, 32)


def test_sliding_window_layers_under_flash_attention_are_refused(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir("mistral"), "linear")
    backbone.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' with sliding-window layers"):
        PrefixModel(backbone, 2)
