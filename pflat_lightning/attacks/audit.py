"""A membership-inference audit: balanced members and non-members, every attack, metrics, ROC plot.

Members are examples the model trained on, non-members examples of the same distribution it never
saw (with a pflat datamodule: its training and test splits). The same number of each is drawn with a
seed, every requested attack scores them, and the results go to ``membership_inference.json`` and a
log-log ``roc.png``. The audit reads private training examples and its numbers are released outside
the accountant: the module's guarantee is unaffected, but the numbers are not private (ledger status
``"evaluation"``).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from pflat_lightning.attacks.lira import default_confidence, keep_matrix, lira_offline_scores, scaled_confidence, train_shadows
from pflat_lightning.attacks.metrics import THRESHOLD_NOTE, RocCurve, attack_metrics, dp_attack_bound, roc_curve
from pflat_lightning.attacks.plots import plot_roc
from pflat_lightning.attacks.scores import (
    ExampleStatistics,
    example_statistics,
    loss_scores,
    min_k_percent,
    reference_scores,
    zlib_scores,
)
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.report import guarantee_reasons
from pflat_lightning.protocol import privacy_engine, privacy_ledger, require

#: Attack names, in the order they are run and reported.
ATTACKS = ("loss", "reference", "min_k", "zlib", "lira")
#: Attacks that need per-token log-probabilities (causal LMs).
TOKEN_ATTACKS = ("min_k", "zlib")
SECTION = "MembershipInferenceAudit"
RESULTS_JSON = "membership_inference.json"
ROC_PNG = "roc.png"
PRIVACY_NOTE = (
    "ledger status 'evaluation': the audit read private training examples (and trained LiRA shadows on them) "
    "only to measure the trained model; the model's (epsilon, delta) guarantee is unaffected, but these "
    "numbers are computed from private data without noise and are not themselves private"
)
#: A reference for the ``reference`` attack: trainable-parameter values swapped into the audited module
#: (its initial state, or a checkpoint's), a checkpoint path, or a separate module scored as it is.
Reference = Union[Mapping[str, torch.Tensor], str, Path, pl.LightningModule]


def formal_guarantee(pl_module: pl.LightningModule) -> Optional[Tuple[float, float]]:
    """The module's ``(epsilon, delta)`` so far, or ``None`` when no formal guarantee holds (not private,
    no noise, or private data used outside the accountant, as the privacy report decides)."""
    engine = privacy_engine(pl_module)
    if engine is None or engine.delta is None or guarantee_reasons(engine.config, engine, privacy_ledger(pl_module)):
        return None
    return engine.epsilon(), engine.delta


def check_attacks(attacks: Sequence[str], pl_module: Optional[pl.LightningModule] = None) -> Tuple[str, ...]:
    """``attacks`` as a tuple in :data:`ATTACKS` order, validated (and checked against ``pl_module``)."""
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if not attacks or unknown:
        raise ValueError(f"attacks must be a non-empty selection of {ATTACKS}, got {list(attacks)}.")
    if pl_module is not None:
        require(pl_module, "example_losses", "MembershipInferenceAudit")
        for attack in TOKEN_ATTACKS:
            if attack in attacks and not hasattr(pl_module, "token_log_probs"):
                raise TypeError(
                    f"The {attack!r} attack scores the tokens of a causal LM: it needs `token_log_probs(batch)` and "
                    f"`tokenizer` on the module (PrefixTunedCausalLM has them); {type(pl_module).__name__} has no "
                    "token_log_probs. Use the 'loss', 'reference' or 'lira' attacks."
                )
    return tuple(a for a in ATTACKS if a in attacks)


def balanced_subsets(members: Dataset, non_members: Dataset, num_examples: Optional[int], seed: int) -> Tuple[Subset, Subset]:
    """The same number of members and non-members, ``min(len(members), len(non_members), num_examples)``,
    each a seeded random choice."""
    if num_examples is not None and num_examples < 1:
        raise ValueError(f"num_examples must be None (as many as both sets allow) or >= 1, got {num_examples}.")
    count = min(len(members), len(non_members), num_examples or len(members))
    if count < 1:
        raise ValueError(f"The audit needs members and non-members, got {len(members)} and {len(non_members)}.")
    generator = torch.Generator().manual_seed(seed)
    pick = [torch.randperm(len(data), generator=generator)[:count].tolist() for data in (members, non_members)]
    return Subset(members, pick[0]), Subset(non_members, pick[1])


def trainable_state(pl_module: pl.LightningModule) -> Dict[str, torch.Tensor]:
    """A CPU copy of the trainable parameters (``requires_grad``), by name: the ``"initial"`` reference."""
    return {name: p.detach().to("cpu", copy=True) for name, p in pl_module.named_parameters() if p.requires_grad}


@contextmanager
def swapped_parameters(pl_module: pl.LightningModule, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside, the named parameters hold ``state``'s values; on exit, exactly their previous values."""
    params = dict(pl_module.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"The reference state names parameters the module does not have: {missing[:5]}.")
    saved = {name: params[name].detach().clone() for name in state}
    try:
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def checkpoint_reference(pl_module: pl.LightningModule, path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The trainable parameters of ``pl_module`` as stored in the Lightning checkpoint at ``path``."""
    if not Path(path).is_file():
        raise ValueError(f"reference={str(path)!r} is not a checkpoint file (nor 'initial' or a module).")
    stored = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
    missing = [name for name in names if name not in stored]
    if missing:
        raise ValueError(
            f"reference checkpoint {str(path)!r} lacks the module's trainable parameters {missing[:5]}: it must be a "
            f"checkpoint of the same architecture ({type(pl_module).__name__})."
        )
    return {name: stored[name] for name in names}


def datamodule_splits(datamodule: Any) -> Tuple[Dataset, Dataset, Optional[Callable], int]:
    """Members, non-members, collate function and scoring batch size from a pflat datamodule after
    ``setup``: its training split (trained on) and its test split (never trained on)."""
    members, non_members = getattr(datamodule, "train_dataset", None), getattr(datamodule, "test_dataset", None)
    if members is None or non_members is None:
        raise ValueError(
            f"The audit reads the datamodule's train_dataset (members) and test_dataset (non-members) after setup(); "
            f"{type(datamodule).__name__} has train_dataset={type(members).__name__}, "
            f"test_dataset={type(non_members).__name__}. Pass members= and non_members= instead."
        )
    return members, non_members, getattr(datamodule, "collate_fn", None), getattr(datamodule, "eval_batch_size", 64)


class _CommonKeys(Dataset):
    """Examples of ``data`` restricted to ``keys`` (members and non-members may carry different extras,
    e.g. generation references, that one collated training batch cannot mix)."""

    def __init__(self, data: Dataset, keys: Sequence[str]) -> None:
        self.data, self.keys = data, list(keys)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        example = self.data[index]
        return {key: example[key] for key in self.keys}


def audit_pool(members: Dataset, non_members: Dataset) -> Dataset:
    """Members followed by non-members, as one dataset that one collate function can batch."""
    first = (members[0], non_members[0])
    if all(isinstance(example, dict) for example in first) and first[0].keys() != first[1].keys():
        keys = [key for key in first[0] if key in first[1]]
        members, non_members = _CommonKeys(members, keys), _CommonKeys(non_members, keys)
    return ConcatDataset([members, non_members])


@dataclass
class AuditResult:
    """What :func:`run_audit` found.

    Attributes:
        summary: JSON-ready results: per attack its metrics, the sizes, settings and costs.
        curves: attack -> ROC curve.
        scores: attack -> membership score per example (members first, then non-members).
        is_member: 1 for members, 0 for non-members, aligned with ``scores``.
    """

    summary: Dict[str, Any]
    curves: Dict[str, RocCurve]
    scores: Dict[str, torch.Tensor]
    is_member: torch.Tensor


def run_audit(
    pl_module: pl.LightningModule,
    members: Dataset,
    non_members: Dataset,
    *,
    attacks: Sequence[str] = ("loss", "reference"),
    reference: Optional[Reference] = None,
    reference_name: Optional[str] = None,
    num_examples: Optional[int] = 500,
    collate_fn: Optional[Callable] = None,
    batch_size: int = 64,
    seed: int = 0,
    min_k: float = 0.2,
    shadow_models: int = 0,
    shadow_epochs: int = 1,
    shadow_batch_size: int = 32,
    shadow_privacy: Optional[PrivacyConfig] = None,
    confidence: Optional[str] = None,
    min_out_for_variance: int = 8,
    accelerator: Any = "cpu",
    devices: Any = 1,
) -> AuditResult:
    """Score balanced members and non-members with each attack and measure how well each separates them.

    Args:
        pl_module: the trained module (``example_losses``; ``token_log_probs``/``tokenizer`` for Min-K%/zlib).
        members: examples it trained on (a map-style dataset in the module's example format).
        non_members: examples of the same distribution it never trained on.
        attacks: any of ``"loss"``, ``"reference"``, ``"min_k"``, ``"zlib"``, ``"lira"``.
        reference: for ``"reference"``: trainable-parameter values (e.g. :func:`trainable_state` before
            training), a checkpoint path of the same architecture, or another module scored as it is.
        reference_name: how the report names the reference (default: derived from ``reference``).
        num_examples: at most this many of each (``None``: as many as the smaller set has).
        collate_fn: batches examples (members, non-members and the LiRA pool).
        batch_size: scoring batch size.
        seed: seed of the selection and of the shadows.
        min_k: the Min-K% fraction (0.2 = the lowest 20 % of token log-probabilities).
        shadow_models: LiRA shadows (``"lira"`` needs >= 2).
        shadow_epochs: training epochs of each shadow.
        shadow_batch_size: (expected) batch size of shadow training.
        shadow_privacy: the shadows' privacy (``None``: the module's own).
        confidence: LiRA's scaled confidence, ``"logit"`` or ``"negative_loss"`` (``None``: by module kind).
        min_out_for_variance: OUT shadows needed to fit an example's own variance (else the fixed one).
        accelerator: accelerator of the shadows' nested trainer.
        devices: devices of the shadows' nested trainer.

    Example::

        result = run_audit(model, data.train_dataset, data.test_dataset, collate_fn=data.collate_fn,
                           attacks=("loss", "reference"), reference=initial_state, num_examples=500)
        write_audit(result, "runs/audit")
    """
    started = time.perf_counter()
    attacks = check_attacks(attacks, pl_module)
    if "reference" in attacks and reference is None:
        raise ValueError("The 'reference' attack needs reference= (initial trainable state, a checkpoint or a module).")
    if "lira" in attacks and shadow_models < 2:
        raise ValueError(f"The 'lira' attack needs shadow_models >= 2, got {shadow_models}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    chosen_members, chosen_non_members = balanced_subsets(members, non_members, num_examples, seed)
    # An own generator: a loader iterator otherwise draws its base seed from the global RNG.
    loaders = [DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(seed)) for data in (chosen_members, chosen_non_members)]
    count = len(chosen_members)
    is_member = torch.cat([torch.ones(count, dtype=torch.long), torch.zeros(count, dtype=torch.long)])

    def statistics(module: pl.LightningModule, tokens: bool = False) -> ExampleStatistics:
        parts = [example_statistics(module, loader, tokens=tokens) for loader in loaders]
        joined = ExampleStatistics(torch.cat([p.losses for p in parts]))
        if tokens:
            joined.token_log_probs = parts[0].token_log_probs + parts[1].token_log_probs
            joined.texts = parts[0].texts + parts[1].texts
        return joined

    stats = statistics(pl_module, tokens=any(a in TOKEN_ATTACKS for a in attacks))
    scores: Dict[str, torch.Tensor] = {}
    summary: Dict[str, Any] = {"num_members": count, "num_non_members": count, "seed": seed}
    if "loss" in attacks:
        scores["loss"] = loss_scores(stats)
    if "reference" in attacks:
        scores["reference"] = reference_scores(stats, _reference_statistics(pl_module, reference, statistics))
        summary["reference"] = reference_name or _describe(reference)
    if "min_k" in attacks:
        scores["min_k"] = min_k_percent(stats.token_log_probs, min_k)
        summary["min_k_fraction"] = min_k
    if "zlib" in attacks:
        scores["zlib"] = zlib_scores(stats)
    if "lira" in attacks:
        kind = confidence or default_confidence(pl_module)
        keep = keep_matrix(shadow_models, 2 * count, seed)
        shadow_confidences, seconds = train_shadows(
            pl_module, audit_pool(chosen_members, chosen_non_members), keep,
            lambda shadow: scaled_confidence(statistics(shadow).losses, kind),
            collate_fn=collate_fn, epochs=shadow_epochs, batch_size=shadow_batch_size, privacy=shadow_privacy,
            seed=seed, accelerator=accelerator, devices=devices,
        )
        scores["lira"], fixed = lira_offline_scores(scaled_confidence(stats.losses, kind), shadow_confidences, keep,
                                                    min_out_for_variance=min_out_for_variance)
        privacy = shadow_privacy if shadow_privacy is not None else getattr(pl_module, "privacy", None)
        summary["lira"] = {
            "variant": "offline (OUT shadows only), one-sided z-score",
            "shadow_models": shadow_models,
            "shadow_training_examples": (keep.sum(1)).tolist(),
            "shadow_epochs": shadow_epochs,
            "shadow_batch_size": shadow_batch_size,
            # The shadows are always seeded (see train_shadows), whatever the audited run's secure_mode.
            "shadow_privacy": None if privacy is None else dict(privacy.__dict__, secure_mode=False),
            "confidence": kind,
            "examples_with_fixed_variance": fixed,
            "wall_seconds_per_shadow": [round(s, 2) for s in seconds],
            "mean_wall_seconds_per_shadow": round(sum(seconds) / len(seconds), 2),
        }
    curves = {name: roc_curve(value, is_member) for name, value in scores.items()}
    summary["attacks"] = {name: attack_metrics(value, is_member) for name, value in scores.items()}
    summary["threshold_note"] = THRESHOLD_NOTE
    summary["fpr_note"] = (
        f"{count} non-members: the smallest non-zero FPR is 1/{count}; a TPR at an FPR below that is the TPR at FPR 0 "
        "(see tpr_at_*_resolvable)"
    )
    guarantee = formal_guarantee(pl_module)
    summary["dp_bound"] = None if guarantee is None else {
        **dp_attack_bound(*guarantee),
        "note": "the most any membership attack can reach against the model's (epsilon, delta) guarantee "
                "(each example a member with probability 1/2); the measured attacks sit below it",
    }
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    return AuditResult(summary, curves, scores, is_member)


def _reference_statistics(pl_module: pl.LightningModule, reference: Reference,
                          statistics: Callable[[pl.LightningModule], ExampleStatistics]) -> ExampleStatistics:
    if isinstance(reference, pl.LightningModule):
        require(reference, "example_losses", "The reference model")
        return statistics(reference)
    state = checkpoint_reference(pl_module, reference) if isinstance(reference, (str, Path)) else reference
    with swapped_parameters(pl_module, state):
        return statistics(pl_module)


def _describe(reference: Reference) -> str:
    if isinstance(reference, pl.LightningModule):
        return f"module {type(reference).__name__}"
    if isinstance(reference, (str, Path)):
        return f"checkpoint {reference}"
    return "given trainable state"


def write_audit(result: AuditResult, folder: Union[str, Path]) -> Dict[str, Path]:
    """Write ``membership_inference.json`` and ``roc.png`` into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    aucs = {name: metrics["auc"] for name, metrics in result.summary["attacks"].items()}
    plot = plot_roc(result.curves, folder / ROC_PNG, aucs=aucs, dp_bound=result.summary.get("dp_bound"),
                    title=f"Membership inference ({result.summary['num_members']} members / non-members)")
    path = folder / RESULTS_JSON
    path.write_text(json.dumps({**result.summary, "privacy_note": PRIVACY_NOTE}, indent=2) + "\n")
    return {"json": path, "roc": plot}


def report_section(result: AuditResult, files: Mapping[str, Path]) -> Dict[str, Any]:
    """The privacy report's ``MembershipInferenceAudit`` section: the results, the files and the note
    that the numbers are an evaluation on private data."""
    return {**result.summary, "files": {k: str(v) for k, v in files.items()}, "privacy_note": PRIVACY_NOTE}


def record_evaluation(pl_module: pl.LightningModule, attacks: Sequence[str]) -> str:
    """Record the audit's use of private data in the module's ledger (status ``"evaluation"``); return
    the entry's detail."""
    detail = (f"membership-inference audit ({', '.join(attacks)}) read private training examples"
              f"{' and trained LiRA shadow models on them' if 'lira' in attacks else ''} to measure the trained "
              "model; the guarantee is unaffected, the audit's numbers are not private")
    ledger = privacy_ledger(pl_module)
    if ledger is not None:
        ledger.record(SECTION, "evaluation", detail)
    return detail


def format_table(summary: Mapping[str, Any]) -> str:
    """A markdown table of each attack's AUC, MIA accuracy and TPR at 1 % / 0.1 % FPR."""
    lines = ["| attack | AUC | MIA accuracy | TPR@1%FPR | TPR@0.1%FPR |", "| --- | --- | --- | --- | --- |"]
    for name, m in summary["attacks"].items():
        resolvable = "" if m["tpr_at_0.1pct_fpr_resolvable"] else f" (n={m['num_non_members']}: not resolvable)"
        lines.append(f"| {name} | {m['auc']:.4f} | {m['mia_accuracy']:.4f} | {m['tpr_at_1pct_fpr']:.4f} | "
                     f"{m['tpr_at_0.1pct_fpr']:.4f}{resolvable} |")
    bound = summary.get("dp_bound")
    if bound is not None:
        lines.append(f"| any attack, bound of (epsilon={bound['epsilon']:.3g}, delta={bound['delta']:.3g}) | "
                     f"<= {bound['max_auc']:.4f} | <= {bound['max_mia_accuracy']:.4f} | "
                     f"<= {bound['max_tpr_at_1pct_fpr']:.4f} | <= {bound['max_tpr_at_0.1pct_fpr']:.4f} |")
    return "\n".join(lines)
