"""Model families: the one place that knows how each architecture takes a prefix.

A family says how to read the key/value geometry from a config (grouped-query attention included),
which position ids to give the real tokens when a prefix sits in the cache (and so how many real
tokens fit the position table), how to pool a sequence for a classification head, and where the
language-model head lives for label-word prompting.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

#: Both spellings of the cache argument: transformers <= 5.23 uses ``past_key_values``; 5.24 renamed it
#: to ``cache``. An unknown keyword is swallowed by ``**kwargs`` and the prefix silently dropped, so
#: the name is read from the forward signature, never assumed.
CACHE_KEYWORDS = ("cache", "past_key_values")


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
    """Layers, key/value heads (fewer than query heads under grouped-query attention) and head size."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVGeometry(config.num_hidden_layers, kv_heads, head_dim)


def _absolute_positions(attention_mask: torch.Tensor, prefix_length: int, config: PretrainedConfig) -> torch.Tensor:
    # Encoders were pretrained with the first real token at position 0; HF would shift them by the
    # cache length, moving every token off its pretrained position embedding.
    length = attention_mask.shape[1]
    return torch.arange(length, device=attention_mask.device).expand_as(attention_mask)


def _roberta_positions(attention_mask: torch.Tensor, prefix_length: int, config: PretrainedConfig) -> torch.Tensor:
    # RoBERTa numbers real tokens from padding_idx + 1 and gives padding the padding index.
    mask = attention_mask.long()
    return torch.cumsum(mask, dim=1) * mask + config.pad_token_id


def _after_prefix_positions(attention_mask: torch.Tensor, prefix_length: int, config: PretrainedConfig) -> torch.Tensor:
    # Decoders read the prefix as the first `prefix_length` positions of the sequence (Li & Liang). The real
    # tokens follow it in order whichever side pads, so a left-padded generation prompt sits where the same
    # right-padded training row did; padding (masked out) gets the nearest real position.
    return prefix_length + (torch.cumsum(attention_mask.long(), dim=1) - 1).clamp(min=0)


# How many real tokens fit the position table, and why: (limit, reason), or ``None`` without a table (rotary
# positions). Each matches the position-id rule above it in this file.


def _absolute_limit(config: PretrainedConfig, prefix_length: int) -> Tuple[int, str]:
    table = config.max_position_embeddings
    return table, (f"its position table holds {table} positions (max_position_embeddings) and the real tokens start "
                   "at position 0, after the prefix as before it")


def _roberta_limit(config: PretrainedConfig, prefix_length: int) -> Tuple[int, str]:
    table, first = config.max_position_embeddings, config.pad_token_id + 1
    return table - first, (f"its position table holds {table} positions (max_position_embeddings) and numbers the "
                           f"real tokens from padding_idx + 1 = {first}")


def _after_prefix_limit(config: PretrainedConfig, prefix_length: int) -> Tuple[int, str]:
    table = config.max_position_embeddings
    return table - prefix_length, (f"its position table holds {table} positions (max_position_embeddings) and the "
                                   f"prefix's {prefix_length} virtual tokens take the first {prefix_length}")


@dataclass(frozen=True)
class ModelFamily:
    """How one architecture family receives a prefix and exposes features for classification."""

    name: str
    model_types: Tuple[str, ...]
    bidirectional: bool
    position_ids: Callable[[torch.Tensor, int, PretrainedConfig], torch.Tensor]
    lm_head_attribute: str
    #: ``(config, prefix_length) -> (limit, reason)``: the most real tokens the position table takes; ``None`` for
    #: rotary positions, which have no table.
    position_limit: Optional[Callable[[PretrainedConfig, int], Tuple[int, str]]]
    #: Label words of BPE vocabularies are words that follow a space.
    label_word_prefix: str = ""

    @property
    def pooling(self) -> str:
        return "mean" if self.bidirectional else "last"

    @property
    def lm_class(self) -> type:
        return AutoModelForMaskedLM if self.bidirectional else AutoModelForCausalLM


FAMILIES: Dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily("bert", ("bert",), True, _absolute_positions, "cls", _absolute_limit),
        ModelFamily("roberta", ("roberta", "xlm-roberta"), True, _roberta_positions, "lm_head", _roberta_limit, " "),
        ModelFamily("gpt2", ("gpt2",), False, _after_prefix_positions, "lm_head", _after_prefix_limit, " "),
        ModelFamily("llama", ("llama", "mistral", "qwen2"), False, _after_prefix_positions, "lm_head", None, " "),
    )
}


def family_for(config: PretrainedConfig) -> ModelFamily:
    """The family of ``config``, or an error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise ValueError(f"Unsupported architecture model_type={model_type!r}; supported families: {supported}.")


def lm_head(model: nn.Module, family: ModelFamily) -> nn.Module:
    """The module mapping final hidden states to vocabulary logits."""
    head: Optional[nn.Module] = getattr(model, family.lm_head_attribute, None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no language-model head {family.lm_head_attribute!r}.")
    return head
