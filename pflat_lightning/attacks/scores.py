"""Membership scores: what each attack computes per example (higher = more likely a training member).

Every score comes from the module protocol (:mod:`pflat_lightning.protocol`): ``example_losses(batch)``
for every module, and for causal LMs ``token_log_probs(batch) -> (log_probs [B, T], mask [B, T])``
(log-probability of each scored target token given its context) and ``tokenizer``. Examples are
scored in :func:`scoring_mode`: eval mode, no gradients and without the callbacks' regularisers
(``loss_terms``), so the task loss alone is measured.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from pflat_lightning.protocol import PerExampleLosses, TokenScores, check_contract, task_loss_mode


@contextmanager
def scoring_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """No gradients and :func:`~pflat_lightning.protocol.task_loss_mode` while inside: eval mode and an empty
    ``loss_terms``; every submodule's train/eval flag and the module's ``loss_terms`` (the same list object)
    are restored on exit."""
    with task_loss_mode(pl_module), torch.no_grad():
        yield


@dataclass
class ExampleStatistics:
    """What the attacks need about each example, in loader order.

    Attributes:
        losses: the task loss of each example (float64, CPU).
        token_log_probs: per example, the log-probabilities of its scored tokens (causal LMs only).
        texts: per example, the text of its scored tokens (causal LMs only).
    """

    losses: torch.Tensor
    token_log_probs: Optional[List[torch.Tensor]] = None
    texts: Optional[List[str]] = None


def example_statistics(pl_module: pl.LightningModule, loader: DataLoader, *, tokens: bool = False) -> ExampleStatistics:
    """Score every example of ``loader`` with ``pl_module`` in :func:`scoring_mode`.

    Args:
        pl_module: a module with ``example_losses`` (and, for ``tokens=True``, ``token_log_probs`` and
            ``tokenizer``).
        loader: batches in the module's own format; read in order, once.
        tokens: also collect each example's scored-token log-probabilities and text (Min-K%, zlib).

    Example::

        stats = example_statistics(model, DataLoader(members, batch_size=64, collate_fn=collate))
        scores = -stats.losses  # the loss attack
    """
    check_contract(pl_module, *((PerExampleLosses, TokenScores) if tokens else (PerExampleLosses,)),
                   who="Membership scoring" + (" of tokens (the Min-K% and zlib attacks)" if tokens else ""))
    losses: List[torch.Tensor] = []
    log_probs: List[torch.Tensor] = []
    texts: List[str] = []
    with scoring_mode(pl_module):
        for batch in loader:
            batch = move_data_to_device(batch, pl_module.device)
            losses.append(pl_module.example_losses(batch).detach().double().cpu())
            if tokens:
                rows, row_texts = _scored_tokens(pl_module, batch)
                log_probs += rows
                texts += row_texts
    return ExampleStatistics(torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64),
                             log_probs if tokens else None, texts if tokens else None)


def _scored_tokens(pl_module: pl.LightningModule, batch) -> tuple:
    """Each example's scored-token log-probabilities and the decoded text of those tokens.

    ``mask`` is aligned either with ``input_ids`` (column ``t`` scores token ``t``, Hugging Face's label
    convention) or with the shifted targets ``input_ids[:, 1:]``; its width says which.
    """
    values, mask = pl_module.token_log_probs(batch)
    ids = batch["input_ids"]
    if mask.shape[1] == ids.shape[1] - 1:
        ids = ids[:, 1:]
    elif mask.shape[1] != ids.shape[1]:
        raise ValueError(
            f"token_log_probs returned a mask of shape {tuple(mask.shape)} for input_ids of shape {tuple(ids.shape)}: "
            "it must have the width of input_ids (aligned with the tokens) or one less (the shifted targets)."
        )
    mask = mask.bool()
    rows = [values[i][mask[i]].detach().double().cpu() for i in range(mask.shape[0])]
    texts = [pl_module.tokenizer.decode(ids[i][mask[i]].tolist(), skip_special_tokens=True) for i in range(mask.shape[0])]
    return rows, texts


# ---------------------------------------------------------------------------------------------- attack scores


def loss_scores(stats: ExampleStatistics) -> torch.Tensor:
    """The loss attack (Yeom et al. 2018; the paper's metric): a low loss suggests a member."""
    return -stats.losses


def reference_scores(stats: ExampleStatistics, reference: ExampleStatistics) -> torch.Tensor:
    """Reference-model calibration (Watson et al. 2022): how much lower the loss is than under a
    reference model that never saw the private data (``reference_loss - loss``)."""
    return reference.losses - stats.losses


def min_k_percent(token_log_probs: List[torch.Tensor], k: float = 0.2) -> torch.Tensor:
    """Min-K% token probability (Shi et al. 2023): the mean of each example's lowest ``k`` fraction of
    token log-probabilities (at least one token); members have fewer very unlikely tokens.

    Args:
        token_log_probs: per example, the log-probabilities of its scored tokens.
        k: fraction of tokens averaged, in (0, 1] (the paper's 20 % is 0.2).
    """
    if not 0 < k <= 1:
        raise ValueError(f"k (the Min-K% fraction) must be in (0, 1], got {k}.")
    scores = []
    for row in token_log_probs:
        if row.numel() == 0:
            raise ValueError("An example has no scored tokens: Min-K% needs at least one target token per example.")
        count = max(1, int(k * row.numel()))
        scores.append(torch.sort(row.double()).values[:count].mean())
    return torch.stack(scores) if scores else torch.zeros(0, dtype=torch.float64)


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al. 2021's reference entropy)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_scores(stats: ExampleStatistics) -> torch.Tensor:
    """The zlib attack (Carlini et al. 2021): ``loss / zlib_entropy(text)``, negated; a loss low for
    how compressible the text is suggests a member."""
    if stats.texts is None:
        raise ValueError("The zlib attack needs the scored texts: collect them with example_statistics(tokens=True).")
    entropy = torch.tensor([zlib_entropy(text) for text in stats.texts], dtype=torch.float64)
    return -stats.losses / entropy


__all__ = [
    "ExampleStatistics",
    "example_statistics",
    "loss_scores",
    "min_k_percent",
    "reference_scores",
    "scoring_mode",
    "zlib_entropy",
    "zlib_scores",
]
