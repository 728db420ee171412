"""The prefix reaches every supported family's attention, under either spelling of the cache argument."""
import dataclasses
import inspect

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, DynamicCache, T5Config

from pflat_lightning.families import KVGeometry, cache_keyword, family_for, kv_geometry
from pflat_lightning.prefix import PrefixConfig, PrefixEncoder
from pflat_lightning.prefix_model import HEADS, PrefixModel, load_backbone

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
    key, value = PrefixEncoder(geometry, PrefixConfig(num_virtual_tokens=3))(batch_size=4)[0]
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


# ---------------------------------------------------------------- PrefixConfig
@pytest.mark.parametrize("settings, refusal", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be an integer >= 1, got 0"),
    ({"reparam_hidden": 0}, "reparam_hidden must be an integer >= 1 or None, got 0"),
    ({"init_std": 0.0}, "init_std must be > 0, got 0.0"),
    ({"init_text": "  "}, "init_text must be a non-empty text or None, got '  '"),
    ({"init_text": "a public text", "reparam_hidden": 8},
     "init_text='a public text' cannot be combined with reparam_hidden=8: .* reparametrised prefix"),
])
def test_prefix_config_refuses_bad_settings_naming_them(settings, refusal):
    with pytest.raises(ValueError, match=refusal):
        PrefixConfig(**settings)


def test_prefix_config_documents_every_field_for_the_cli():
    import docstring_parser

    documented = {p.arg_name: p.description for p in docstring_parser.parse(PrefixConfig.__doc__).params}
    assert set(documented) == {f.name for f in dataclasses.fields(PrefixConfig)}
    assert all(documented[f.name] == f.metadata["help"] for f in dataclasses.fields(PrefixConfig))


def test_prefix_encoder_draws_from_the_configured_normal():
    geometry = KVGeometry(num_layers=3, num_kv_heads=4, head_dim=16)
    torch.manual_seed(0)
    weights = torch.cat([layer.weight.flatten() for layer in PrefixEncoder(geometry, PrefixConfig(
        num_virtual_tokens=50, init_std=2.0)).layers])
    assert weights.numel() == 3 * 50 * 2 * 4 * 16
    assert abs(weights.mean().item()) < 0.05 and weights.std().item() == pytest.approx(2.0, rel=0.03)


# ---------------------------------------------------------------- initialisation from a text
INIT_TEXT = "the film was long but the ending was worth it"


def plain_on_text_then_input(backbone, family, text_ids, ids, mask):
    """The plain backbone's last hidden states at ``ids``' positions on the sequence ``text_ids + ids``.

    A causal LM reads the concatenation as it is. In an encoder the text's tokens do not attend to ``ids``
    (a prefix is fixed, it does not read the input: a 4D additive mask says so), and ``ids`` keep the positions
    they have without a text (BERT from 0; RoBERTa from padding_idx + 1), as the text's tokens do."""
    n, (batch, m) = len(text_ids), ids.shape
    full_ids = torch.cat([torch.tensor([text_ids] * batch), ids], 1)
    full_mask = torch.cat([torch.ones(batch, n, dtype=mask.dtype), mask], 1)
    base = backbone.base_model
    with torch.no_grad():
        if family in ("gpt2", "llama"):
            return base(input_ids=full_ids, attention_mask=full_mask).last_hidden_state[:, n:]
        allowed = full_mask[:, None, None, :].expand(batch, 1, n + m, n + m).clone().bool()
        allowed[:, :, :n, n:] = False  # the text does not see the input
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        first = backbone.config.pad_token_id + 1 if family == "roberta" else 0
        positions = torch.cat([torch.arange(n), torch.arange(m)]).expand(batch, -1) + first
        return base(input_ids=full_ids, attention_mask=additive, position_ids=positions).last_hidden_state[:, n:]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_text_initialised_prefix_reads_like_the_backbone_after_the_text(family, head, tiny_model_dir):
    path = tiny_model_dir(family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = load_backbone(path, head).eval()
    model = PrefixModel(backbone, 2, head=head, label_word_ids=[2000, 2001], mask_token_id=tokenizer.mask_token_id,
                        prefix=PrefixConfig(num_virtual_tokens=4, init_text=INIT_TEXT), tokenizer=tokenizer).eval()
    text_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"][:4]
    ids = torch.randint(2000, 3000, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding
    with torch.no_grad():
        prefixed = model.hidden_states(ids, mask)
    expected = plain_on_text_then_input(backbone, family, text_ids, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(prefixed[real], expected[real], atol=1e-5, rtol=1e-4)
    # Not true of the default random prefix: the comparison can fail.
    random = PrefixModel(backbone, 2, head=head, label_word_ids=[2000, 2001], mask_token_id=tokenizer.mask_token_id,
                         prefix=PrefixConfig(num_virtual_tokens=4)).eval()
    with torch.no_grad():
        assert not torch.allclose(random.hidden_states(ids, mask)[real], expected[real], atol=1e-3)


def test_text_initialisation_refuses_what_it_cannot_do(tiny_model_dir):
    path = tiny_model_dir("bert")
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path)
    with pytest.raises(ValueError, match=r"init_text='short film' is 2 tokens for this tokenizer, fewer than "
                                         r"num_virtual_tokens=3; give a longer text or a shorter prefix"):
        PrefixModel(backbone, 2, prefix=PrefixConfig(num_virtual_tokens=3, init_text="short film"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"needs the backbone's tokenizer to read the text: pass tokenizer="):
        PrefixModel(backbone, 2, prefix=PrefixConfig(num_virtual_tokens=3, init_text=INIT_TEXT))
    reparametrised = PrefixModel(backbone, 2, prefix=PrefixConfig(num_virtual_tokens=3, reparam_hidden=8))
    with pytest.raises(ValueError, match=r"reparametrised prefix \(reparam_hidden=8\) cannot be assigned"):
        reparametrised.init_prefix_from_tokens([2000, 2001, 2002])
    with pytest.raises(ValueError, match="only 2 token ids were given; give at least 3"):
        PrefixModel(backbone, 2, prefix=PrefixConfig(num_virtual_tokens=3)).init_prefix_from_tokens([2000, 2001])
