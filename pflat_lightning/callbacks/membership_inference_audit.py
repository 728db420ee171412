"""Membership-inference audit at the end of fit: how much the trained model reveals about its training set."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from pflat_lightning.attacks.audit import (
    SECTION,
    AuditResult,
    check_attacks,
    datamodule_splits,
    format_table,
    record_evaluation,
    report_section,
    run_audit,
    trainable_state,
    write_audit,
)
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.protocol import report_sections


class MembershipInferenceAudit(Callback):
    """Attacks the trained model with membership inference and reports how well each attack does.

    At the end of fit (on rank 0) it draws the same number of members (training examples) and
    non-members (examples never trained on: by default the datamodule's training and test splits, or
    the ``members``/``non_members`` given), scores them with each attack, and writes ``roc.png`` (log-log
    ROC of every attack) and ``membership_inference.json`` into the run folder (``trainer.log_dir`` or
    ``default_root_dir``). It logs ``mia_<attack>_auc``, ``mia_<attack>_accuracy`` and
    ``mia_<attack>_tpr_at_1pct_fpr`` to the loggers and ``trainer.callback_metrics``, and adds its
    results to the privacy report (``report_sections["MembershipInferenceAudit"]``).

    Attacks: ``"loss"`` (the paper's metric: low loss = member), ``"reference"`` (loss relative to a
    reference model: ``"initial"``, the trainable parameters as they were at the start of fit, or a
    checkpoint path, or a module), ``"min_k"`` and ``"zlib"`` (causal LMs with ``token_log_probs``), and
    ``"lira"`` (offline LiRA with ``shadow_models`` shadow copies trained on random halves of the audit
    pool; its cost is reported). Metrics: ROC AUC, MIA accuracy (the best balanced accuracy, its threshold
    chosen on the audit data itself), TPR at 1 % and 0.1 % FPR.

    The audit reads private training examples and releases numbers outside the accountant: the ledger
    records it as ``"evaluation"`` (the model's guarantee is unaffected; the numbers are not private).

    Args:
        attacks: any of ``"loss"``, ``"reference"``, ``"min_k"``, ``"zlib"``, ``"lira"``.
        num_examples: members (and as many non-members) audited at most; ``None``: all the smaller set has.
        reference: the reference of the ``"reference"`` attack: ``"initial"``, a checkpoint path or a module.
        shadow_models: LiRA shadows (>= 2 with ``"lira"``); each is a full training run.
        shadow_epochs: epochs per shadow; ``None``: the trainer's ``max_epochs``.
        shadow_batch_size: (expected) batch size of shadow training; ``None``: the datamodule's ``batch_size``.
        shadow_privacy: the shadows' privacy; ``None``: the module's own ``PrivacyConfig``.
        min_k: the Min-K% fraction (0.2: the lowest 20 % of token log-probabilities).
        members: training examples to audit instead of the datamodule's (a dataset or a map-style loader).
        non_members: examples of the same distribution never trained on (with ``members``).
        collate_fn: batches ``members``/``non_members`` given as datasets (default: the datamodule's).
        batch_size: scoring batch size; ``None``: the loader's or datamodule's evaluation batch size.
        seed: seed of the example selection and of the shadows.

    Raises:
        ValueError: for a bad argument; ``TypeError`` at setup for Min-K%/zlib on a module without
            ``token_log_probs``.

    Example::

        trainer = pl.Trainer(max_epochs=3, callbacks=[MembershipInferenceAudit(("loss", "reference"),
                                                                               num_examples=500)])
        trainer.fit(model, datamodule=data)  # roc.png, membership_inference.json, report section
    """

    def __init__(
        self,
        attacks: Sequence[str] = ("loss", "reference"),
        *,
        num_examples: Optional[int] = 500,
        reference: Union[str, pl.LightningModule] = "initial",
        shadow_models: int = 0,
        shadow_epochs: Optional[int] = None,
        shadow_batch_size: Optional[int] = None,
        shadow_privacy: Optional[PrivacyConfig] = None,
        min_k: float = 0.2,
        members: Optional[Union[Dataset, DataLoader]] = None,
        non_members: Optional[Union[Dataset, DataLoader]] = None,
        collate_fn: Optional[Callable] = None,
        batch_size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        self.attacks = check_attacks(attacks)
        if num_examples is not None and num_examples < 1:
            raise ValueError(f"num_examples must be None (all) or >= 1, got {num_examples}.")
        if "lira" in self.attacks and shadow_models < 2:
            raise ValueError(f"attacks include 'lira': shadow_models must be >= 2, got {shadow_models}.")
        if shadow_models < 0:
            raise ValueError(f"shadow_models must be >= 0, got {shadow_models}.")
        if shadow_models and "lira" not in self.attacks:
            raise ValueError(f"shadow_models={shadow_models} trains shadows only for the 'lira' attack; add it to attacks.")
        for name, value in (("shadow_epochs", shadow_epochs), ("shadow_batch_size", shadow_batch_size),
                            ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}.")
        if not 0 < min_k <= 1:
            raise ValueError(f"min_k must be in (0, 1], got {min_k}.")
        if (members is None) != (non_members is None):
            raise ValueError("members and non_members must be given together (or neither: the datamodule's splits).")
        self.num_examples = num_examples
        self.reference = reference
        self.shadow_models = shadow_models
        self.shadow_epochs = shadow_epochs
        self.shadow_batch_size = shadow_batch_size
        self.shadow_privacy = shadow_privacy
        self.min_k = min_k
        self.members, self.non_members = members, non_members
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.seed = seed
        #: The trainable parameters at the start of fit: the ``"initial"`` reference (survives a resume).
        self.initial_state: Optional[Dict[str, torch.Tensor]] = None
        #: The last audit's results (what went to the JSON file).
        self.results: Optional[Dict[str, Any]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_attacks(self.attacks, pl_module)
        if self.members is None and trainer.datamodule is None:
            raise ValueError("MembershipInferenceAudit needs the trainer's datamodule or members= and non_members=.")
        if "lira" in self.attacks and self.shadow_epochs is None and not (trainer.max_epochs or 0) > 0:
            raise ValueError(
                f"The trainer has no max_epochs (max_epochs={trainer.max_epochs}) for the LiRA shadows to copy: set "
                "shadow_epochs."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed fit keeps the snapshot of the original start (restored by load_state_dict before this hook).
        if "reference" in self.attacks and self.reference == "initial" and self.initial_state is None:
            self.initial_state = trainable_state(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank
        if not trainer.is_global_zero:
            return
        device = pl_module.device
        result, files, _ = self.audit(
            pl_module, self._data(trainer), folder, max_epochs=trainer.max_epochs, datamodule=trainer.datamodule,
            reference_name="initial" if self.reference == "initial" else None, accelerator=trainer.accelerator,
            devices=[device.index] if device.type == "cuda" else 1,
        )
        report_sections(pl_module)[SECTION] = report_section(result, files)
        metrics = {}
        for name, m in result.summary["attacks"].items():
            metrics.update({f"mia_{name}_auc": m["auc"], f"mia_{name}_accuracy": m["mia_accuracy"],
                            f"mia_{name}_tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"]})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        rank_zero_info(f"Membership-inference audit ({result.summary['num_members']} members / non-members), "
                       f"{files['json']}:\n{format_table(result.summary)}")

    def audit(
        self,
        pl_module: pl.LightningModule,
        data: Tuple[Dataset, Dataset, Optional[Callable], int],
        folder: Union[str, Path],
        *,
        max_epochs: Optional[int],
        datamodule: Optional[pl.LightningDataModule],
        reference_name: Optional[str],
        accelerator: Any,
        devices: Any,
    ) -> Tuple[AuditResult, Dict[str, str], str]:
        """Attack ``pl_module`` with ``data`` (members, non-members, their ``collate_fn`` and evaluation batch size),
        write ``roc.png`` and ``membership_inference.json`` into ``folder`` and record the ledger entry.

        The shadows train for ``shadow_epochs`` (else ``max_epochs``) epochs at ``shadow_batch_size`` (else the
        ``datamodule``'s ``batch_size``); ``reference_name`` names the reference in the results. Returns the
        result (its summary also in :attr:`results`), the files written and the ledger entry's detail.
        """
        members, non_members, collate_fn, batch_size = data
        reference = self.initial_state if self.reference == "initial" else self.reference
        result = run_audit(
            pl_module, members, non_members, attacks=self.attacks, reference=reference, reference_name=reference_name,
            num_examples=self.num_examples, collate_fn=collate_fn, batch_size=self.batch_size or batch_size,
            seed=self.seed, min_k=self.min_k, shadow_models=self.shadow_models,
            shadow_epochs=self.shadow_epochs or (max_epochs if (max_epochs or 0) > 0 else 1),
            shadow_batch_size=self.shadow_batch_size or getattr(datamodule, "batch_size", None) or batch_size,
            shadow_privacy=self.shadow_privacy, accelerator=accelerator, devices=devices,
        )
        files = write_audit(result, folder)
        self.results = result.summary
        return result, files, record_evaluation(pl_module, self.attacks)

    def _data(self, trainer: pl.Trainer) -> Tuple[Dataset, Dataset, Optional[Callable], int]:
        if self.members is None:
            members, non_members, collate_fn, batch_size = datamodule_splits(trainer.datamodule)
            return members, non_members, self.collate_fn or collate_fn, batch_size
        pair = []
        for data in (self.members, self.non_members):
            if isinstance(data, DataLoader):
                pair.append((data.dataset, data.collate_fn, data.batch_size or 64))
            else:
                pair.append((data, self.collate_fn, 64))
        (members, collate_fn, batch_size), (non_members, _, _) = pair
        return members, non_members, collate_fn, batch_size

    def state_dict(self) -> Dict[str, Any]:
        return {"initial_state": self.initial_state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.initial_state = state_dict["initial_state"]
