"""The trainable prefix: per-layer key/value vectors prepended to a frozen transformer's attention.

Every layer's prefix lives in its own ``nn.Embedding`` (one row per virtual token holding that layer's
keys and values), looked up with a contiguous batch-expanded index. Opacus computes exact per-example
gradients for embeddings in every grad-sample mode, and a separate parameter per layer lets a layer be
pruned so that it gets no gradient, no noise and no update.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from pflat_lightning.families import KVGeometry


class PrefixEncoder(nn.Module):
    """Produces ``(key, value)`` of shape ``(batch, kv_heads, num_virtual_tokens, head_dim)`` per layer.

    With ``reparam_hidden`` set, the prefix is reparametrised as in Li & Liang (2021): shared virtual
    token embeddings pass through ``Linear -> tanh`` and a per-layer output ``Linear``; otherwise each
    layer's keys and values are free parameters.

    A pruned layer (``layer_mask[l] == False``) gets all-zero keys and values (as in Privacy-Flat, the
    attention mask still covers its positions) and its parameters stop requiring gradients.

    Args:
        geometry: layers, key/value heads and head size of the backbone.
        num_virtual_tokens: prefix length.
        reparam_hidden: hidden width of the reparametrisation MLP, or ``None`` for a direct prefix.
        init_std: standard deviation of the normal initialisation of the prefix (or of its embeddings).
    """

    def __init__(
        self,
        geometry: KVGeometry,
        *,
        num_virtual_tokens: int = 10,
        reparam_hidden: Optional[int] = None,
        init_std: float = 0.5,
    ) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}.")
        if reparam_hidden is not None and reparam_hidden < 1:
            raise ValueError(f"reparam_hidden must be >= 1 or None, got {reparam_hidden}.")
        self.geometry = geometry
        self.num_virtual_tokens = num_virtual_tokens
        self.reparam_hidden = reparam_hidden
        width = 2 * geometry.num_kv_heads * geometry.head_dim
        if reparam_hidden is None:
            self.embeddings = None
            self.mlp = None
            self.layers = nn.ModuleList(nn.Embedding(num_virtual_tokens, width) for _ in range(geometry.num_layers))
            for layer in self.layers:
                nn.init.normal_(layer.weight, std=init_std)
        else:
            self.embeddings = nn.Embedding(num_virtual_tokens, reparam_hidden)
            nn.init.normal_(self.embeddings.weight, std=init_std)
            self.mlp = nn.Sequential(nn.Linear(reparam_hidden, reparam_hidden), nn.Tanh())
            self.layers = nn.ModuleList(nn.Linear(reparam_hidden, width) for _ in range(geometry.num_layers))
        self.register_buffer("layer_mask", torch.ones(geometry.num_layers, dtype=torch.bool))
        self.register_load_state_dict_post_hook(_sync_after_load)

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
