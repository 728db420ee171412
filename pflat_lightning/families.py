"""Model families: what the config and the forward pass cannot tell about how an architecture takes a prefix.

The prefix reaches a model through its own key/value cache, generically: the key/value geometry comes from the
config (:func:`kv_geometry`), decoders number the real tokens after the prefix, sliding-window layers are shown
the prefix by the attention masks (see :mod:`pflat_lightning.prefix_model`), and the LM head is the model's output
embedding (soft-capped where the config says so). The registry below keeps only the rest: whether a family is an
encoder (pooling, where the mask token is read), an encoder's position ids, an encoder's masked-LM head, and the
label-word prefix space of its vocabulary. Adding a decoder whose attention reads the cache is one model type in
:data:`FAMILIES`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

#: Both spellings of the cache argument: transformers <= 5.23 uses ``past_key_values``; 5.24 renamed it
#: to ``cache``. An unknown keyword is swallowed by ``**kwargs`` and the prefix silently dropped, so
#: the name is read from the forward signature, never assumed.
CACHE_KEYWORDS = ("cache", "past_key_values")
#: The attention layer types whose masks the prefix is shown through (``config.layer_types``).
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")


def cache_keyword(forward: Callable) -> str:
    """The name under which ``forward`` accepts a key/value cache."""
    parameters = inspect.signature(forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise TypeError(
        f"{getattr(forward, '__qualname__', forward)} takes none of {CACHE_KEYWORDS}: it cannot receive a prefix."
    )


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int


def kv_geometry(config: PretrainedConfig) -> KVGeometry:
    """Layers, key/value heads (fewer than query heads under grouped- or multi-query attention) and head size.

    The configs' attribute maps give every family the same names for layers, heads and width; an explicit
    ``head_dim`` (Gemma, Qwen3) wins over ``hidden_size / heads``. Falcon names its key/value heads after its
    two layouts: ``new_decoder_architecture`` (``num_kv_heads``) or ``multi_query`` (one).
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "new_decoder_architecture", False):
        kv_heads = config.num_kv_heads
    elif getattr(config, "multi_query", False):
        kv_heads = 1
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVGeometry(config.num_hidden_layers, kv_heads, head_dim)


def sliding_layer_types(config: PretrainedConfig) -> Optional[Tuple[str, ...]]:
    """The attention type of each layer when some layer attends through a sliding window, else ``None``.

    A sliding-window mask hides every key older than the window, the prefix included once the sequence passes
    it; the prefixed model replaces these masks (see ``PrefixedBackbone``). Hybrid configs list a type per layer
    (``layer_types``: Gemma 2/3, Qwen); Mistral-style configs slide every layer when ``sliding_window`` is set.
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(types) if "sliding_attention" in types else None
    return ("sliding_attention",) * config.num_hidden_layers if window is not None else None


# Encoder position ids: the real tokens of an encoder keep the positions they were pretrained at, whatever the
# prefix's length. Each rule has its table limit: (config, prefix_length) -> (most real tokens, why).


def _positions_from_zero(attention_mask: torch.Tensor, prefix_length: int, config: PretrainedConfig) -> torch.Tensor:
    # HF would shift the positions by the cache length, moving every token off its pretrained position embedding.
    length = attention_mask.shape[1]
    return torch.arange(length, device=attention_mask.device).expand_as(attention_mask)


def _positions_after_padding_index(attention_mask: torch.Tensor, prefix_length: int,
                                   config: PretrainedConfig) -> torch.Tensor:
    # RoBERTa numbers real tokens from padding_idx + 1 and gives padding the padding index.
    mask = attention_mask.long()
    return torch.cumsum(mask, dim=1) * mask + config.pad_token_id


def _limit_from_zero(config: PretrainedConfig, prefix_length: int) -> Tuple[int, str]:
    table = config.max_position_embeddings
    return table, (f"its position table holds {table} positions (max_position_embeddings) and the real tokens start "
                   "at position 0, after the prefix as before it")


def _limit_after_padding_index(config: PretrainedConfig, prefix_length: int) -> Tuple[int, str]:
    table, first = config.max_position_embeddings, config.pad_token_id + 1
    return table - first, (f"its position table holds {table} positions (max_position_embeddings) and numbers the "
                           f"real tokens from padding_idx + 1 = {first}")


def after_prefix_positions(attention_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Decoder positions: the prefix is the first ``prefix_length`` positions of the sequence (Li & Liang) and the
    real tokens follow it in order whichever side pads, so a left-padded generation prompt sits where the same
    right-padded training row did; padding (masked out) gets the nearest real position. Rotary attention reads
    only the distance between positions, so the plain model's outputs are unchanged by the shift."""
    return prefix_length + (torch.cumsum(attention_mask.long(), dim=1) - 1).clamp(min=0)


def after_prefix_limit(table: int, prefix_length: int) -> Tuple[int, str]:
    """The most real tokens a decoder's absolute position table of ``table`` rows takes after the prefix."""
    return table - prefix_length, (f"its position table holds {table} positions (max_position_embeddings) and the "
                                   f"prefix's {prefix_length} virtual tokens take the first {prefix_length}")


@dataclass(frozen=True)
class EncoderRules:
    """What an encoder (masked LM) needs beyond its cache: position ids of the real tokens, with the most real
    tokens their table takes, and the attribute path of its masked-LM head (applied in order)."""

    position_ids: Callable[[torch.Tensor, int, PretrainedConfig], torch.Tensor]
    position_limit: Callable[[PretrainedConfig, int], Tuple[int, str]]
    mlm_head: Tuple[str, ...]


FROM_ZERO = dict(position_ids=_positions_from_zero, position_limit=_limit_from_zero)
AFTER_PADDING_INDEX = dict(position_ids=_positions_after_padding_index, position_limit=_limit_after_padding_index)


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family: its model types, and for an encoder the rules its forward cannot tell.

    Args:
        name: the family's name in messages and in the README table.
        model_types: the ``config.model_type`` values it covers.
        encoder: the encoder rules, or ``None`` for a decoder (causal LM).
        label_word_prefix: what a label word follows in running text: a space for BPE and SentencePiece
            vocabularies, nothing for WordPiece.
    """

    name: str
    model_types: Tuple[str, ...]
    encoder: Optional[EncoderRules] = None
    label_word_prefix: str = " "

    @property
    def bidirectional(self) -> bool:
        return self.encoder is not None

    @property
    def pooling(self) -> str:
        return "mean" if self.bidirectional else "last"

    @property
    def lm_class(self) -> type:
        return AutoModelForMaskedLM if self.bidirectional else AutoModelForCausalLM


def _encoder(name: str, model_types: Tuple[str, ...], positions: dict, mlm_head: Tuple[str, ...],
             label_word_prefix: str) -> ModelFamily:
    return ModelFamily(name, model_types, EncoderRules(mlm_head=mlm_head, **positions), label_word_prefix)


FAMILIES: Dict[str, ModelFamily] = {
    family.name: family
    for family in (
        _encoder("bert", ("bert",), FROM_ZERO, ("cls",), ""),
        _encoder("electra", ("electra",), FROM_ZERO, ("generator_predictions", "generator_lm_head"), ""),
        _encoder("roberta", ("roberta", "xlm-roberta"), AFTER_PADDING_INDEX, ("lm_head",), " "),
        ModelFamily("gpt2", ("gpt2",)),
        ModelFamily("llama", ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmo2")),
        ModelFamily("gemma", ("gemma", "gemma2", "gemma3_text")),
        ModelFamily("phi3", ("phi3",)),
        ModelFamily("opt", ("opt",)),
        ModelFamily("gpt_neox", ("gpt_neox",)),
        ModelFamily("falcon", ("falcon",)),
    )
}

#: Model types refused with a reason (besides every type no family lists).
REFUSED: Dict[str, str] = {
    "distilbert": "DistilBertModel.forward takes no key/value cache, so a prefix has no way into its attention",
    "deberta-v2": ("DeBERTa's disentangled attention takes no key/value cache (DebertaV2Model.forward has no cache "
                   "argument) and scores keys against relative positions, which a prefix has none of"),
    "t5": ("T5 is an encoder-decoder: its encoder's self-attention reads no cache and its decoder's cache also holds "
           "the cross-attention, so a prefix of self-attention keys and values does not fit it"),
}


def _newer_falcon_cache() -> bool:
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return (major, minor) >= (5, 24)


def _config_refusal(config: PretrainedConfig) -> Optional[str]:
    """Why a supported family's config still cannot take the prefix, or ``None``."""
    types = set(getattr(config, "layer_types", None) or ())
    if types - set(MASKED_LAYER_TYPES):
        return (f"its layer_types {sorted(types)} include attention other than {MASKED_LAYER_TYPES}, whose masks "
                "the prefix is shown through")
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention=True: an embedding model, not a causal LM the decoder rules fit"
    if getattr(config, "new_decoder_architecture", False) and not _newer_falcon_cache():
        return ("new_decoder_architecture=True: transformers < 5.24 caches Falcon's grouped key/value heads once per "
                "query head; install transformers >= 5.24")
    if getattr(config, "alibi", False):
        return "alibi=True: the ALiBi Falcon layout is not among the tested ones (rotary Falcon is)"
    return None


def supported_families() -> str:
    """The supported families and their model types, as named in refusals."""
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())


def family_for(config: PretrainedConfig) -> ModelFamily:
    """The family of ``config``, from the config alone (no weights are needed to refuse a model).

    Raises:
        ValueError: for a model type no family lists, or a config a family cannot take; the message names the
            model type, why, and the supported families.
    """
    model_type = getattr(config, "model_type", None)
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    reason = REFUSED.get(model_type, "no family lists it") if family is None else _config_refusal(config)
    if reason is not None:
        raise ValueError(f"Unsupported architecture model_type={model_type!r}: {reason}. Supported families: "
                         f"{supported_families()}.")
    return family


def causal_lm_family(config: PretrainedConfig, what: str) -> ModelFamily:
    """The family of ``config`` (``what`` names it in messages), refusing a masked LM: generation needs a causal LM.

    Raises:
        ValueError: as :func:`family_for`, or for an encoder family.
    """
    family = family_for(config)
    if family.bidirectional:
        raise ValueError(
            f"{what} is a {family.name} masked LM (model_type={config.model_type!r}); generation needs a causal LM: "
            + ", ".join(f.name for f in FAMILIES.values() if not f.bidirectional) + "."
        )
    return family


class SoftCappedHead(nn.Module):
    """An LM head whose logits pass through ``cap * tanh(logits / cap)``, as Gemma 2 caps its final logits."""

    def __init__(self, head: nn.Module, cap: float) -> None:
        super().__init__()
        self.head = head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(self.head(hidden) / self.cap)


def lm_head(model: nn.Module, family: ModelFamily) -> nn.Module:
    """The module mapping final hidden states to vocabulary logits, as the model's own LM forward computes them:
    an encoder's masked-LM head (its registered attribute path), a decoder's output embedding, soft-capped where
    the config has ``final_logit_softcapping``."""
    if family.encoder is not None:
        parts = [getattr(model, name, None) for name in family.encoder.mlm_head]
        if any(part is None for part in parts):
            raise ValueError(f"{type(model).__name__} has no masked-LM head {'.'.join(family.encoder.mlm_head)!r}: "
                             "load it as a masked LM (head='label_words').")
        return parts[0] if len(parts) == 1 else nn.Sequential(*parts)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no language-model head: load it as a causal LM.")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head if cap is None else SoftCappedHead(head, cap)
