"""The trainable prefix: its configuration and the per-layer key/value vectors it prepends to a frozen
transformer's attention.

Every layer's prefix lives in its own ``nn.Embedding`` (one row per virtual token holding that layer's
keys and values), looked up with a contiguous batch-expanded index. Opacus computes exact per-example
gradients for embeddings in every grad-sample mode, and a separate parameter per layer lets a layer be
pruned so that it gets no gradient, no noise and no update.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pflat_lightning.families import KVGeometry

if TYPE_CHECKING:  # the privacy package builds on the prefix's checkpoint layout (checkpointing imports this file)
    from pflat_lightning.privacy.ledger import PrivacyLedger


def _documented(cls: type) -> type:
    # Each field's help text is written once, in its metadata (as in PEFT's configs); the class docstring's
    # ``Args:`` section (before its ``Raises:``), which LightningCLI shows in --help, is generated from it.
    args = "".join(f"        {f.name}: {f.metadata['help']}\n" for f in fields(cls))
    cls.__doc__ = cls.__doc__.replace("\n    Raises:", f"\n    Args:\n{args}\n    Raises:", 1)
    return cls


@_documented
@dataclass(frozen=True)
class PrefixConfig:
    """The prefix of a prefix-tuned model: its length, reparametrisation and initialisation.

    One object, passed unchanged from the task module (``PrefixTunedClassifier(prefix=...)``,
    ``PrefixTunedCausalLM(prefix=...)``) through :class:`~pflat_lightning.prefix_model.PrefixModel` or
    :class:`~pflat_lightning.prefix_model.PrefixCausalLM` down to :class:`PrefixEncoder`. In a YAML config::

        prefix:
          num_virtual_tokens: 10
          init_text: "Classify the sentiment of this movie review."

    Without ``init_text`` every prefix parameter is drawn from ``N(0, init_std**2)``. With it, the frozen
    backbone reads the text's first ``num_virtual_tokens`` tokens (no prefix, no special tokens) and each
    layer's prefix becomes that layer's keys and values of those tokens, taken from the attention the
    prefix feeds (Li & Liang's initialisation from real words): the un-tuned model then reads like the
    plain one after the text, where a random prefix disturbs every layer.

    Raises:
        ValueError: for a length or width below 1, an ``init_std`` that is not positive, an empty
            ``init_text``, or ``init_text`` with ``reparam_hidden`` (the keys and values of a reparametrised
            prefix are an MLP's output, which no parameter setting makes equal to given ones); a text shorter
            than the prefix is refused when the model tokenises it.

    Example::

        PrefixTunedClassifier("bundled-minilm", 2, prefix=PrefixConfig(num_virtual_tokens=10,
                                                                        init_text="A movie review, good or bad:"))
    """

    num_virtual_tokens: int = field(default=10, metadata={"help": "the prefix length, in virtual tokens (>= 1)."})
    reparam_hidden: Optional[int] = field(default=None, metadata={
        "help": "the hidden width of Li & Liang's reparametrisation (shared virtual-token embeddings through "
                "Linear -> tanh and a per-layer output Linear), or None for free keys and values per layer."})
    init_std: float = field(default=0.5, metadata={
        "help": "the standard deviation of the normal initialisation of the prefix (of its embeddings when "
                "reparametrised); not used with init_text."})
    init_text: Optional[str] = field(default=None, metadata={
        "help": "a public text whose first num_virtual_tokens tokens initialise the prefix with the backbone's "
                "own keys and values, or None for the normal initialisation. It must be at least "
                "num_virtual_tokens tokens long; it is recorded in the ledger as public data."})

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {self.num_virtual_tokens!r}.")
        if self.reparam_hidden is not None and (not isinstance(self.reparam_hidden, int) or self.reparam_hidden < 1):
            raise ValueError(f"reparam_hidden must be an integer >= 1 or None, got {self.reparam_hidden!r}.")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}.")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError(f"init_text must be a non-empty text or None, got {self.init_text!r}.")
        if self.init_text is not None and self.reparam_hidden is not None:
            raise ValueError(
                f"init_text={self.init_text!r} cannot be combined with reparam_hidden={self.reparam_hidden}: the keys "
                "and values of a reparametrised prefix are the output of an MLP, which no parameter setting makes "
                "equal to the text's. Use reparam_hidden=None with init_text, or no init_text."
            )


def record_initialisation(ledger: PrivacyLedger, config: PrefixConfig) -> None:
    """Record in ``ledger`` the public text that initialised the prefix, if any (a normal draw reads no data)."""
    if config.init_text is not None:
        ledger.record("prefix initialisation", "public",
                      f"prefix initialised from the backbone's keys and values of the public text {config.init_text!r}")


# Checkpoints store the config among the hyperparameters; allow it in ``torch.load(weights_only=True)``.
torch.serialization.add_safe_globals([PrefixConfig])


class PrefixEncoder(nn.Module):
    """Produces ``(key, value)`` of shape ``(batch, kv_heads, num_virtual_tokens, head_dim)`` per layer.

    With ``config.reparam_hidden`` set, the prefix is reparametrised as in Li & Liang (2021): shared virtual
    token embeddings pass through ``Linear -> tanh`` and a per-layer output ``Linear``; otherwise each
    layer's keys and values are free parameters, drawn from ``N(0, config.init_std**2)`` (the text
    initialisation needs the backbone: :class:`~pflat_lightning.prefix_model.PrefixedBackbone` applies it
    through :meth:`assign`).

    A pruned layer (``layer_mask[l] == False``) gets all-zero keys and values (as in Privacy-Flat, the
    attention mask still covers its positions) and its parameters stop requiring gradients.

    Args:
        geometry: layers, key/value heads and head size of the backbone.
        config: length, reparametrisation and initialisation; ``None`` means ``PrefixConfig()``.

    Example::

        prefix = PrefixEncoder(kv_geometry(backbone.config), PrefixConfig(num_virtual_tokens=10))
        past = prefix(batch_size=8)   # one (keys, values) pair per layer
    """

    def __init__(self, geometry: KVGeometry, config: Optional[PrefixConfig] = None) -> None:
        super().__init__()
        config = config if config is not None else PrefixConfig()
        self.geometry = geometry
        self.config = config
        tokens, hidden = config.num_virtual_tokens, config.reparam_hidden
        width = 2 * geometry.num_kv_heads * geometry.head_dim
        if hidden is None:
            self.embeddings = None
            self.mlp = None
            self.layers = nn.ModuleList(nn.Embedding(tokens, width) for _ in range(geometry.num_layers))
            for layer in self.layers:
                nn.init.normal_(layer.weight, std=config.init_std)
        else:
            self.embeddings = nn.Embedding(tokens, hidden)
            nn.init.normal_(self.embeddings.weight, std=config.init_std)
            self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
            self.layers = nn.ModuleList(nn.Linear(hidden, width) for _ in range(geometry.num_layers))
        self.register_buffer("layer_mask", torch.ones(geometry.num_layers, dtype=torch.bool))
        self.register_load_state_dict_post_hook(_sync_after_load)

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @torch.no_grad()
    def assign(self, past: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set every layer's prefix to given keys and values, one ``(key, value)`` pair per layer, each
        ``(kv_heads, num_virtual_tokens, head_dim)`` (what :meth:`forward` returns for one example).

        Raises:
            ValueError: for a reparametrised prefix (its keys and values are an MLP's output), or a wrong
                number of layers or shape.
        """
        g = self.geometry
        shape = (g.num_kv_heads, self.num_virtual_tokens, g.head_dim)
        if self.mlp is not None:
            raise ValueError(f"A reparametrised prefix (reparam_hidden={self.config.reparam_hidden}) cannot be "
                             "assigned keys and values: they are the output of an MLP.")
        if len(past) != g.num_layers or any(k.shape != shape or v.shape != shape for k, v in past):
            raise ValueError(f"assign needs {g.num_layers} (key, value) pairs of shape {shape}, got "
                             f"{[(tuple(k.shape), tuple(v.shape)) for k, v in past]}.")
        for layer, (key, value) in zip(self.layers, past):
            # (kv_heads, tokens, head_dim) keys and values -> one row per token, the layout forward reads.
            layer.weight.copy_(torch.stack([key, value]).permute(2, 0, 1, 3).reshape(self.num_virtual_tokens, -1))

    @property
    def active_layers(self) -> List[int]:
        return self.layer_mask.nonzero().flatten().tolist()

    def set_layer_mask(self, keep: Sequence[bool]) -> None:
        """Keep the layers where ``keep`` is true; prune the others."""
        if len(keep) != self.geometry.num_layers:
            raise ValueError(f"keep must have one entry per layer ({self.geometry.num_layers}), got {len(keep)}.")
        self.layer_mask.copy_(torch.as_tensor(list(keep), dtype=torch.bool))
        self._sync_requires_grad()

    def _sync_requires_grad(self) -> None:
        for layer, keep in zip(self.layers, self.layer_mask.tolist()):
            layer.requires_grad_(keep)

    def forward(self, batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        g = self.geometry
        device = self.layer_mask.device
        index = torch.arange(self.num_virtual_tokens, device=device).expand(batch_size, -1).contiguous()
        hidden = self.mlp(self.embeddings(index)) if self.mlp is not None else index
        shape = (batch_size, self.num_virtual_tokens, 2, g.num_kv_heads, g.head_dim)
        past = []
        for layer, keep in zip(self.layers, self.layer_mask.tolist()):
            if keep:
                kv = layer(hidden).view(shape).permute(2, 0, 3, 1, 4)
            else:
                dtype = layer.weight.dtype
                kv = torch.zeros(shape, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
            past.append((kv[0], kv[1]))
        return past


def _sync_after_load(module: PrefixEncoder, incompatible_keys) -> None:
    # A loaded layer mask also decides which layers train (a module-level function: picklable).
    module._sync_requires_grad()
