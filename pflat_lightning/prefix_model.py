"""A frozen transformer with a trainable prefix and a classifier read from its output."""
from __future__ import annotations

from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from pflat_lightning.families import cache_keyword, family_for, kv_geometry, lm_head
from pflat_lightning.prefix import PrefixEncoder

HEADS = ("linear", "label_words")
#: The tokenizer outputs a tokenised batch carries into the model.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def label_word_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str], prefix: str) -> List[int]:
    """One vocabulary id per label word; a word that is not a single token is refused."""
    ids = []
    for word in words:
        tokens = tokenizer.encode(prefix + word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(
                f"label word {word!r} is {len(tokens)} tokens {tokenizer.convert_ids_to_tokens(tokens)} for this "
                "tokenizer; label words must be single tokens."
            )
        ids.append(tokens[0])
    return ids


class PrefixModel(nn.Module):
    """Frozen backbone + :class:`PrefixEncoder` + classifier, mapping a tokenised batch to class logits.

    ``head="linear"`` pools the last hidden states (mean over real tokens for encoders, the last real
    token for decoders) into a trainable linear layer. ``head="label_words"`` reads the backbone's own
    language-model head at the ``[MASK]`` token (masked LMs) or at the last real token (causal LMs)
    and keeps the logits of one label word per class, as in LM-BFF.

    Args:
        backbone: a Hugging Face model: a base model for ``"linear"``, a masked/causal LM for
            ``"label_words"``. Its parameters are frozen here.
        num_labels: number of classes.
        head: ``"linear"`` or ``"label_words"``.
        label_word_ids: vocabulary id of each class' label word (``"label_words"`` only).
        mask_token_id: id of the mask token, read by masked LMs in ``"label_words"`` mode.
        num_virtual_tokens, reparam_hidden, prefix_init_std: see :class:`PrefixEncoder`.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        num_labels: int,
        *,
        head: Literal["linear", "label_words"] = "linear",
        label_word_ids: Optional[Sequence[int]] = None,
        mask_token_id: Optional[int] = None,
        num_virtual_tokens: int = 10,
        reparam_hidden: Optional[int] = None,
        prefix_init_std: float = 0.5,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}.")
        self.family = family_for(backbone.config)
        self.backbone = backbone.requires_grad_(False)
        self.transformer = backbone.base_model
        self.cache_keyword = cache_keyword(self.transformer.forward)
        self.prefix = PrefixEncoder(
            kv_geometry(backbone.config),
            num_virtual_tokens=num_virtual_tokens,
            reparam_hidden=reparam_hidden,
            init_std=prefix_init_std,
        )
        self.head_kind = head
        if head == "linear":
            self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)
        else:
            if label_word_ids is None or len(label_word_ids) != num_labels:
                raise ValueError(f"head='label_words' needs one label word per class ({num_labels}), got {label_word_ids}.")
            if self.family.bidirectional and mask_token_id is None:
                raise ValueError("head='label_words' on a masked LM needs the tokenizer's mask_token_id.")
            self.classifier = None
            self.lm_head = lm_head(backbone, self.family)
            self.register_buffer("label_word_ids", torch.as_tensor(list(label_word_ids), dtype=torch.long))
        self.mask_token_id = mask_token_id

    def per_example_gradient_bytes(self, batch_size: int) -> Dict[str, int]:
        """Estimated memory that clipping ``batch_size`` examples needs for their trainable gradients:
        ``hooks`` materialises one gradient per example and parameter; ``ghost`` only the (virtual-token x
        virtual-token) products from which Opacus gets each example's norm per layer (2 per linear map)."""
        prefix_tokens = self.prefix.num_virtual_tokens
        hooks = ghost = 0
        for module in self.modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            hooks += batch_size * sum(p.numel() * p.element_size() for p in params)
            tokens = 1 if module is self.classifier else prefix_tokens
            copies = 1 if isinstance(module, nn.Embedding) else 2
            ghost += copies * batch_size * tokens * tokens * params[0].element_size()
        return {"hooks": hooks, "ghost": ghost}

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        past: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        cache = DynamicCache()
        if past is None:
            with full_precision(input_ids.device):
                past = self.prefix(batch)
        device = input_ids.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        for layer, (key, value) in enumerate(past):
            if compute is not None:  # the backbone computes in 16 bits; the prefix and its gradients stay fp32
                key, value = key.to(compute), value.to(compute)
            cache.update(key, value, layer)
        prefix_length = self.prefix.num_virtual_tokens
        prefix_mask = attention_mask.new_ones(batch, prefix_length)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.cat([prefix_mask, attention_mask], dim=1),
            "position_ids": self.family.position_ids(attention_mask, prefix_length, self.backbone.config),
            self.cache_keyword: cache,
        }
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.transformer(**kwargs).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        return_prefix: bool = False,
    ):
        """Class logits; with ``return_prefix`` also the per-example prefix this forward used (for
        per-example regularisers of the prefix, whose gradients then reach each example separately)."""
        with full_precision(input_ids.device):
            past = self.prefix(input_ids.shape[0])
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, past)
        with full_precision(input_ids.device):
            logits = self._classify(hidden.float(), input_ids, attention_mask)
        return (logits, past) if return_prefix else logits

    def _classify(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.head_kind == "linear" and self.family.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        if self.family.bidirectional:
            is_mask = input_ids == self.mask_token_id
            if not bool((is_mask.sum(1) == 1).all()):
                raise ValueError("head='label_words' needs exactly one mask token per example; use a template with {mask}.")
            position = is_mask.long().argmax(1)
        else:
            # The last real token, whichever side the tokenizer pads.
            steps = torch.arange(attention_mask.shape[1], device=hidden.device)
            position = (attention_mask.long() * (steps + 1)).argmax(1)
        features = hidden[rows, position]
        if self.head_kind == "linear":
            return self.classifier(features)
        return self.lm_head(features)[:, self.label_word_ids]


def full_precision(device: torch.device):
    """Trainable modules run outside autocast: under ``bf16-mixed`` only the frozen backbone computes in
    16 bits, so the per-example gradients that DP clips (and the noise added to them) are fp32."""
    return torch.autocast(device.type, enabled=False)


def load_backbone(name_or_path: str, head: str, **kwargs) -> PreTrainedModel:
    """Load a backbone for ``head``: the base model, or the masked/causal LM for label words."""
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    family = family_for(config)
    auto = AutoModel if head == "linear" else family.lm_class
    return auto.from_pretrained(name_or_path, **kwargs)
