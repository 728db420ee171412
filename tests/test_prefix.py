"""The prefix reaches every supported family's attention, under either spelling of the cache argument."""
import inspect

import pytest
import torch
from transformers import AutoModel, BertConfig, DynamicCache, T5Config

from pflat_lightning.families import cache_keyword, family_for, kv_geometry
from pflat_lightning.prefix import PrefixEncoder
from pflat_lightning.prefix_model import PrefixModel, load_backbone

from conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_changes_output_and_zero_kv_prefix_is_masked_attention(family, tiny_model_dir):
    backbone = AutoModel.from_pretrained(tiny_model_dir(family))
    model = PrefixModel(backbone, 2).eval()
    ids = torch.randint(2000, 3000, (3, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with_prefix = model.hidden_states(ids, mask)
        model.prefix.layers[0].weight.add_(1.0)
        moved = model.hidden_states(ids, mask)
    assert not torch.allclose(with_prefix, moved, atol=1e-4), "changing the prefix must change the output"
    # Independent check of where the prefix goes: the backbone alone on the same tokens differs.
    with torch.no_grad():
        plain = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(with_prefix, plain, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_prefix_with_masked_positions_equals_plain_backbone(family, tiny_model_dir):
    """Positions handling: a prefix whose attention mask is zero leaves the backbone's output untouched."""
    backbone = AutoModel.from_pretrained(tiny_model_dir(family)).eval()
    model = PrefixModel(backbone, 2).eval()
    ids = torch.randint(2000, 3000, (2, 5))
    mask = torch.ones_like(ids)
    cache = DynamicCache()
    for layer, (k, v) in enumerate(model.prefix(2)):
        cache.update(k, v, layer)
    p = model.prefix.num_virtual_tokens
    full_mask = torch.cat([torch.zeros(2, p, dtype=torch.long), mask], dim=1)
    positions = model.position_ids(mask)
    if family == "gpt2":  # decoders see the prefix as earlier positions; compare at the same positions
        positions = positions - p
    with torch.no_grad():
        out = backbone(input_ids=ids, attention_mask=full_mask, position_ids=positions, **{model.cache_keyword: cache})
        plain = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, plain, atol=1e-5, rtol=1e-4)


def test_cache_keyword_follows_the_signature():
    def old(input_ids=None, past_key_values=None, **kwargs): ...

    def new(input_ids=None, cache=None, **kwargs): ...

    def neither(input_ids=None, **kwargs): ...

    assert cache_keyword(old) == "past_key_values"
    assert cache_keyword(new) == "cache"
    with pytest.raises(TypeError, match="cannot receive a prefix"):
        cache_keyword(neither)


def test_installed_transformers_spelling_is_the_one_used(tiny_model_dir):
    backbone = AutoModel.from_pretrained(tiny_model_dir("gpt2"))
    model = PrefixModel(backbone, 2)
    assert model.cache_keyword in inspect.signature(backbone.forward).parameters


def test_grouped_query_geometry(tiny_model_dir):
    backbone = AutoModel.from_pretrained(tiny_model_dir("llama"))
    geometry = kv_geometry(backbone.config)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (2, 2, 8)
    key, value = PrefixEncoder(geometry, num_virtual_tokens=3)(batch_size=4)[0]
    assert key.shape == value.shape == (4, 2, 3, 8)


def test_unsupported_architecture_lists_supported_families():
    with pytest.raises(ValueError, match="Supported families: bert.*roberta.*gpt2.*llama"):
        family_for(T5Config())
    assert family_for(BertConfig()).name == "bert"


def test_pruned_layer_has_zero_prefix_and_frozen_parameters(tiny_model_dir):
    backbone = AutoModel.from_pretrained(tiny_model_dir("bert"))
    prefix = PrefixModel(backbone, 2).prefix
    prefix.set_layer_mask([True, False])
    (k0, _), (k1, v1) = prefix(2)
    assert k0.abs().sum() > 0 and k1.abs().sum() == 0 and v1.abs().sum() == 0
    assert not any(p.requires_grad for p in prefix.layers[1].parameters())
    restored = PrefixModel(AutoModel.from_pretrained(tiny_model_dir("bert")), 2).prefix
    restored.load_state_dict(prefix.state_dict())
    assert restored.active_layers == [0] and not restored.layers[1].weight.requires_grad


@pytest.mark.parametrize("head", ["linear", "label_words"])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_backbone_picks_the_right_model_class(family, head, tiny_model_dir):
    model = load_backbone(tiny_model_dir(family), head)
    if head == "linear":
        assert model.base_model is model
    else:
        assert model.base_model is not model
