"""A frozen transformer with a trainable prefix, read by a classifier or by its causal LM head."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from pflat_lightning.families import (
    after_prefix_limit,
    after_prefix_positions,
    cache_keyword,
    causal_lm_family,
    family_for,
    kv_geometry,
    lm_head,
    sliding_layer_types,
)
from pflat_lightning.prefix import PrefixConfig, PrefixEncoder

HEADS = ("linear", "label_words")
#: Label of the positions a causal LM does not score (the prompt, padding), as Hugging Face losses expect.
IGNORE_INDEX = -100
#: The tokenizer outputs a tokenised batch carries into the model.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: What ``load_backbone`` reads the backbone as, for each use.
BACKBONE_USES = ("linear", "label_words", "causal_lm")
#: ``from_pretrained`` arguments that also decide which config is read (the rest only concern the weights).
CONFIG_KWARGS = ("revision", "trust_remote_code", "subfolder", "cache_dir", "local_files_only", "token")


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


class PrefixedBackbone(nn.Module):
    """A frozen Hugging Face backbone whose attention layers all read a trainable :class:`PrefixEncoder`.

    The base of :class:`PrefixModel` (classification) and :class:`PrefixCausalLM` (generation): it holds
    the prefix, feeds it to the backbone as a key/value cache (under the cache keyword of the installed
    transformers) with the positions its family gives the real tokens, and returns the last hidden states.

    Sliding-window layers (Mistral, Phi-3, the hybrid Gemma 2/3 and Qwen layouts) would hide the prefix from every
    token further than the window from the start; their masks are built here with the prefix visible to every
    token (the window still applies among the real tokens), in the forward pass and in ``generate`` alike.
    A backbone loaded in 16 bits computes in 16 bits; the prefix and its gradients stay fp32.

    Args:
        backbone: a Hugging Face model; its parameters are frozen here.
        prefix: the prefix's :class:`~pflat_lightning.prefix.PrefixConfig`, passed unchanged to
            :class:`PrefixEncoder`; ``None`` means ``PrefixConfig()``.
        tokenizer: the backbone's tokenizer, which reads ``prefix.init_text`` (needed only then).

    Raises:
        ValueError: for a ``prefix.init_text`` without a tokenizer or shorter than the prefix.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        prefix: Optional[PrefixConfig] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> None:
        super().__init__()
        self.family = family_for(backbone.config)
        self.backbone = backbone.requires_grad_(False)
        self.transformer = backbone.base_model
        self.cache_keyword = cache_keyword(self.transformer.forward)
        self.sliding_layer_types = sliding_layer_types(backbone.config)
        attention = backbone.config._attn_implementation
        if self.sliding_layer_types is not None and "flash" in str(attention):
            raise ValueError(
                f"backbone uses attn_implementation={attention!r} with sliding-window layers: flash attention applies "
                "the window itself and would drop the prefix once a sequence passes it. Load the backbone with "
                "attn_implementation='sdpa' or 'eager'."
            )
        self.prefix = PrefixEncoder(kv_geometry(backbone.config), prefix)
        #: A trainable head on the hidden states, or ``None`` (subclasses set it).
        self.classifier: Optional[nn.Module] = None
        self._init_from_text(tokenizer)

    def _init_from_text(self, tokenizer: Optional[PreTrainedTokenizerBase]) -> None:
        """Apply the text initialisation of the prefix's config, if it has one (the normal one is the
        :class:`PrefixEncoder`'s own): the prefix becomes the backbone's keys and values of the first
        ``num_virtual_tokens`` tokens of ``init_text`` (see :meth:`init_prefix_from_tokens`).

        Raises:
            ValueError: for an ``init_text`` without ``tokenizer``, or one shorter than the prefix.
        """
        text = self.prefix.config.init_text
        if text is None:
            return
        if tokenizer is None:
            raise ValueError(f"PrefixConfig(init_text={text!r}) needs the backbone's tokenizer to read the text: pass "
                             "tokenizer=.")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        length = self.prefix.num_virtual_tokens
        if len(ids) < length:
            raise ValueError(f"init_text={text!r} is {len(ids)} tokens for this tokenizer, fewer than "
                             f"num_virtual_tokens={length}; give a longer text or a shorter prefix.")
        self.init_prefix_from_tokens(ids)

    @torch.no_grad()
    def init_prefix_from_tokens(self, token_ids: Sequence[int]) -> None:
        """Set the prefix to the backbone's own keys and values of real tokens (Li & Liang's initialisation):
        the frozen backbone reads the first ``num_virtual_tokens`` of ``token_ids`` alone, at the positions its
        family gives a sequence's first tokens, and each attention layer's keys and values of them, as that
        layer stores them in the cache the prefix is later read from, become that layer's prefix.

        A causal LM with this prefix then computes exactly what the plain LM computes on the tokens followed by
        the input. An encoder computes what the plain encoder computes on the tokens followed by the input when
        the tokens do not attend to the input (their keys and values are fixed) and the input keeps its own
        positions.

        Raises:
            ValueError: for a reparametrised prefix, or fewer tokens than ``num_virtual_tokens``.
        """
        length = self.prefix.num_virtual_tokens
        if len(token_ids) < length:
            raise ValueError(f"The prefix has {length} virtual tokens but only {len(token_ids)} token ids were given; "
                             f"give at least {length}.")
        ids = torch.as_tensor(list(token_ids[:length]), device=self.backbone.device).unsqueeze(0)
        mask = torch.ones_like(ids)
        cache = DynamicCache()
        self.transformer(input_ids=ids, attention_mask=mask, use_cache=True,
                         position_ids=self.position_ids(mask, prefix_length=0),
                         **{self.cache_keyword: cache})
        self.prefix.assign([(layer.keys[0], layer.values[0]) for layer in cache.layers])

    def trainable_modules(self) -> List[nn.Module]:
        """What training updates: the prefix and the head, if any (everything else is frozen)."""
        return [m for m in (self.prefix, self.classifier) if m is not None]

    def position_ids(self, attention_mask: torch.Tensor, prefix_length: Optional[int] = None) -> torch.Tensor:
        """The position ids of the real tokens: an encoder's pretrained numbering, or after the prefix (after
        ``prefix_length`` virtual tokens; by default this prefix's)."""
        if prefix_length is None:
            prefix_length = self.prefix.num_virtual_tokens
        if self.family.encoder is not None:
            return self.family.encoder.position_ids(attention_mask, prefix_length, self.backbone.config)
        return after_prefix_positions(attention_mask, prefix_length)

    def position_limit(self) -> Optional[Tuple[int, str]]:
        """``(limit, reason)``: the most real tokens (after the prefix) whose positions the backbone's position
        table holds, or ``None`` for a backbone without one (rotary positions)."""
        config, prefix_length = self.backbone.config, self.prefix.num_virtual_tokens
        if self.family.encoder is not None:
            return self.family.encoder.position_limit(config, prefix_length)
        table = getattr(config, "max_position_embeddings", None)
        return after_prefix_limit(table, prefix_length) if self._has_position_table(table) else None

    def _has_position_table(self, table: Optional[int]) -> bool:
        # A learned absolute position table is an embedding other than the input one with a row per position
        # (OPT's has 2 extra); rotary models have none.
        words = self.transformer.get_input_embeddings()
        return table is not None and any(
            isinstance(module, nn.Embedding) and module is not words and module.num_embeddings >= table
            for module in self.transformer.modules()
        )

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

    def prefix_cache(
        self, batch_size: int, past: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    ) -> DynamicCache:
        """A fresh cache holding the prefix (``past``, or this prefix for ``batch_size`` examples), its keys and
        values in the backbone's compute dtype (autocast's, or that of its weights)."""
        # Built without the config: every layer keeps all it is given (a sliding-window layer would drop the
        # prefix once the window passes it); the masks decide what each layer reads.
        cache = DynamicCache()
        device = self.prefix.layer_mask.device
        if past is None:
            with full_precision(device):
                past = self.prefix(batch_size)
        # The backbone computes in its 16-bit autocast or weight dtype; the prefix and its gradients stay fp32.
        autocast = torch.is_autocast_enabled(device.type)
        compute = torch.get_autocast_dtype(device.type) if autocast else self.backbone.dtype
        for layer, (key, value) in enumerate(past):
            cache.update(key.to(compute), value.to(compute), layer)
        return cache

    @contextmanager
    def prefix_visible(self) -> Iterator[None]:
        """Within this context the backbone's sliding-window layers see the prefix: a forward pre-hook replaces the
        2D attention mask by the masks of the backbone's layer types, built by transformers with the prefix's
        cache positions visible to every query (padding, the prefix's own mask columns included, still hides)."""
        if self.sliding_layer_types is None:
            yield
            return
        handle = self.transformer.register_forward_pre_hook(self._show_prefix, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _show_prefix(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        tokens = kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None else kwargs["input_ids"]
        dtype = self.transformer.get_input_embeddings().weight.dtype
        # The mask builders read only the batch size, query length, dtype and device of the embeddings.
        shape = torch.empty(tokens.shape[0], tokens.shape[1], 0, dtype=dtype, device=mask.device)
        prefix_length = self.prefix.num_virtual_tokens

        def prefix_column(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx < prefix_length

        inputs = (self.backbone.config, shape, mask, kwargs.get(self.cache_keyword), kwargs.get("position_ids"))
        builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks = {kind: builders[kind](*inputs, or_mask_function=prefix_column) for kind in set(self.sliding_layer_types)}
        hybrid = getattr(self.backbone.config, "layer_types", None) is not None
        kwargs["attention_mask"] = masks if hybrid else masks["sliding_attention"]
        return args, kwargs

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        past: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        cache = self.prefix_cache(batch, past)
        prefix_mask = attention_mask.new_ones(batch, self.prefix.num_virtual_tokens)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.cat([prefix_mask, attention_mask], dim=1),
            "position_ids": self.position_ids(attention_mask),
            self.cache_keyword: cache,
        }
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        with self.prefix_visible():
            return self.transformer(**kwargs).last_hidden_state

    def vocabulary_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on ``hidden`` in the head's own dtype (16 bits for a 16-bit backbone), as fp32 logits."""
        dtype = next(self.lm_head.parameters()).dtype
        return self.lm_head(hidden.to(dtype)).float()


class PrefixModel(PrefixedBackbone):
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
        prefix, tokenizer: see :class:`PrefixedBackbone`.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        num_labels: int,
        *,
        head: Literal["linear", "label_words"] = "linear",
        label_word_ids: Optional[Sequence[int]] = None,
        mask_token_id: Optional[int] = None,
        prefix: Optional[PrefixConfig] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}.")
        super().__init__(backbone, prefix, tokenizer=tokenizer)
        self.head_kind = head
        if head == "linear":
            self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)
        else:
            if label_word_ids is None or len(label_word_ids) != num_labels:
                raise ValueError(f"head='label_words' needs one label word per class ({num_labels}), got {label_word_ids}.")
            if self.family.bidirectional and mask_token_id is None:
                raise ValueError("head='label_words' on a masked LM needs the tokenizer's mask_token_id.")
            self.lm_head = lm_head(backbone, self.family)
            self.register_buffer("label_word_ids", torch.as_tensor(list(label_word_ids), dtype=torch.long))
        self.mask_token_id = mask_token_id

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
        return self.vocabulary_logits(features)[:, self.label_word_ids]


class PrefixCausalLM(PrefixedBackbone):
    """Frozen causal LM + :class:`PrefixEncoder`: next-token log-probabilities with the prefix in the cache,
    and generation that continues a prompt after the same prefix.

    The prefix is the first ``num_virtual_tokens`` positions of every sequence; the real tokens follow it
    (whichever side pads), so a left-padded prompt in :meth:`generate` sees exactly what the same
    right-padded training row saw. Only positions whose ``labels`` differ from ``-100`` are scored, and the
    language-model head runs only on them.

    Args:
        backbone: a Hugging Face causal LM of a decoder family (``families.FAMILIES``); its parameters are frozen
            here.
        prefix, tokenizer: see :class:`PrefixedBackbone`.

    Raises:
        ValueError: for a bidirectional (masked) LM, which cannot generate.

    Example::

        model = PrefixCausalLM(AutoModelForCausalLM.from_pretrained("gpt2"), PrefixConfig(num_virtual_tokens=10))
        log_probs, scored = model.target_log_probs(input_ids, attention_mask, labels)
        continuation = model.generate(prompt_ids, prompt_mask, max_new_tokens=20, do_sample=False)
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        prefix: Optional[PrefixConfig] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> None:
        causal_lm_family(backbone.config, "backbone")
        super().__init__(backbone, prefix, tokenizer=tokenizer)
        self.lm_head = lm_head(backbone, self.family)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(batch, length, vocab)``: position ``t`` scores the token at ``t + 1``."""
        hidden = self.hidden_states(input_ids, attention_mask)
        with full_precision(input_ids.device):
            return self.vocabulary_logits(hidden)

    def target_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        return_logits: bool = False,
    ):
        """The log-probability of each scored token given the prefix and the tokens before it.

        Returns ``(log_probs, scored)``, both ``(batch, length)``: ``log_probs[b, t] = log p(labels[b, t] |
        prefix, input_ids[b, :t])`` where ``scored[b, t]`` (``labels[b, t] != -100``; never ``t = 0``, which
        nothing before it predicts), and 0 elsewhere. With ``return_logits`` also the vocabulary logits of the
        scored tokens ``(scored.sum(), vocab)`` (row order: ``scored.nonzero()``) and the per-example prefix
        this forward used (for per-example regularisers)."""
        with full_precision(input_ids.device):
            past = self.prefix(input_ids.shape[0])
        hidden = self.hidden_states(input_ids, attention_mask, past=past)
        scored = labels != IGNORE_INDEX
        scored[:, 0] = False
        with full_precision(input_ids.device):
            # The hidden state before each scored token predicts it; the head runs on those rows only.
            logits = self.vocabulary_logits(hidden[:, :-1][scored[:, 1:]])
            token = logits.log_softmax(-1).gather(1, labels[scored].unsqueeze(1)).squeeze(1)
            log_probs = hidden.new_zeros(scored.shape, dtype=token.dtype).masked_scatter(scored, token)
        if return_logits:
            return log_probs, scored, logits, past
        return log_probs, scored

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> torch.LongTensor:
        """Continue LEFT-padded prompts through Hugging Face ``generate`` with the prefix in the cache.

        Returns the prompts followed by the new tokens (as ``generate`` does). ``generate_kwargs`` go to
        ``generate`` (``max_new_tokens``, ``do_sample``, ``num_beams``...)."""
        batch, prefix_length = input_ids.shape[0], self.prefix.num_virtual_tokens
        with self.prefix_visible():
            return self.backbone.generate(
                input_ids=input_ids,
                # The full mask (prefix + prompt) with only the prompt as input ids: generate feeds the whole prompt
                # after the cached prefix, with the positions the forward pass gives the same tokens.
                attention_mask=torch.cat([attention_mask.new_ones(batch, prefix_length), attention_mask], dim=1),
                position_ids=self.position_ids(attention_mask),
                **{self.cache_keyword: self.prefix_cache(batch)},
                **generate_kwargs,
            )


def full_precision(device: torch.device):
    """Trainable modules run outside autocast: under ``bf16-mixed`` only the frozen backbone computes in
    16 bits, so the per-example gradients that DP clips (and the noise added to them) are fp32."""
    return torch.autocast(device.type, enabled=False)


def load_backbone(name_or_path: str, head: str, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load a backbone for ``head`` the way Hugging Face users load models, refusing an unsupported one from its
    config before any weights are read.

    Args:
        name_or_path: a hub id or a local folder.
        head: ``"linear"`` (the base model), ``"label_words"`` (the masked or causal LM) or ``"causal_lm"`` (a
            causal LM, for generation).
        from_pretrained_kwargs: passed to ``from_pretrained``: ``dtype`` (``"bfloat16"`` loads a frozen backbone
            in 16 bits), ``device_map`` and ``low_cpu_mem_usage`` (a large backbone placed or streamed as it
            loads), ``revision``, and ``trust_remote_code``, which stays off unless given: a folder whose config
            asks for its own code is refused by transformers without it.

    Raises:
        ValueError: for an unsupported model type or a masked LM asked for ``"causal_lm"`` (from the config alone),
            or an unknown ``head``.

    Example::

        backbone = load_backbone("Qwen/Qwen3-0.6B", "causal_lm", dtype="bfloat16", device_map="auto")
    """
    if head not in BACKBONE_USES:
        raise ValueError(f"head must be one of {BACKBONE_USES}, got {head!r}.")
    config_kwargs = {key: value for key, value in from_pretrained_kwargs.items() if key in CONFIG_KWARGS}
    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    family = causal_lm_family(config, repr(name_or_path)) if head == "causal_lm" else family_for(config)
    auto = AutoModel if head == "linear" else family.lm_class
    return auto.from_pretrained(name_or_path, config=config, **from_pretrained_kwargs)
