"""A membership-inference audit: balanced members and non-members, every attack, metrics, ROC plot.

Members are examples the model trained on, non-members examples of the same distribution it never
saw (with a pflat datamodule: its training and test splits). The same number of each is drawn with a
seed, every requested attack scores them, and the results go to ``membership_inference.json`` and a
log-log ``roc.png``. The audit reads private training examples and its numbers are released outside
the accountant: the module's guarantee is unaffected, but the numbers are not private (ledger status
``"evaluation"``).

The attacks live in a registry (:func:`register_attack`, as Opacus' accountants do): each declares what it
needs beyond the module's per-example losses and returns its scores and its entries of the summary.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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
from pflat_lightning.checkpointing import trainable_state  # noqa: F401  (the "initial" reference, kept importable here)
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.report import guarantee_reasons
from pflat_lightning.protocol import PerExampleLosses, TokenScores, check_contract, privacy_engine, privacy_ledger

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
    """``attacks`` as a tuple in registration order, validated (and checked against ``pl_module``)."""
    attacks = tuple(attacks)
    registered = tuple(ATTACK_REGISTRY)
    if not attacks or any(a not in ATTACK_REGISTRY for a in attacks):
        raise ValueError(f"attacks must be a non-empty selection of the registered attacks {registered}, got {list(attacks)}.")
    if pl_module is not None:
        token_attacks = _needing(attacks, "token_log_probs")
        others = [a for a in registered if "token_log_probs" not in ATTACK_REGISTRY[a].needs]
        check_contract(pl_module, PerExampleLosses, *([TokenScores] if token_attacks else []),
                       who=f"MembershipInferenceAudit(attacks={list(attacks)})" + (
                           f" (the {token_attacks} attacks score the tokens of a causal LM, as PrefixTunedCausalLM "
                           f"does; or use only the attacks {others})" if token_attacks else ""))
    return tuple(a for a in registered if a in attacks)


def _needing(attacks: Sequence[str], need: str) -> List[str]:
    """The attacks among ``attacks`` that need ``need``."""
    return [a for a in attacks if need in ATTACK_REGISTRY[a].needs]


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


@dataclass(frozen=True)
class Attack:
    """A membership-inference attack as :func:`run_audit` runs it (registered with :func:`register_attack`).

    Attributes:
        name: how the attack is requested and reported.
        needs: what it scores beyond the audited module's per-example losses: ``"token_log_probs"`` (per-token
            log-probabilities and texts, from a causal LM's ``token_log_probs``), ``"reference"`` (a reference
            model's losses, ``reference=``), ``"shadows"`` (LiRA shadow models trained on the pool,
            ``shadow_models >= 2``).
        score: :class:`AuditInputs` -> (a membership score per example, higher meaning member; the entries
            the attack adds to the summary).
    """

    name: str
    needs: FrozenSet[str]
    score: Callable[["AuditInputs"], Tuple[torch.Tensor, Dict[str, Any]]]


#: Attack name -> :class:`Attack`, in registration order: the order attacks are run and reported.
ATTACK_REGISTRY: Dict[str, Attack] = {}
#: What an attack may need beyond the audited module's losses (see :class:`Attack`).
NEEDS = ("token_log_probs", "reference", "shadows")


def register_attack(name: str, *, needs: Sequence[str] = ()) -> Callable:
    """Register the decorated ``score(inputs) -> (scores, summary entries)`` as the attack ``name``."""
    unknown = [need for need in needs if need not in NEEDS]
    if name in ATTACK_REGISTRY or unknown:
        raise ValueError(f"register_attack({name!r}, needs={list(needs)}): the name must be new (registered: "
                         f"{tuple(ATTACK_REGISTRY)}) and each need one of {NEEDS}.")

    def register(score: Callable[["AuditInputs"], Tuple[torch.Tensor, Dict[str, Any]]]) -> Callable:
        ATTACK_REGISTRY[name] = Attack(name, frozenset(needs), score)
        return score

    return register


@dataclass
class AuditInputs:
    """What an attack scores: the audited module and its statistics on the chosen members then non-members,
    the loaders that give another module's statistics on them, and :func:`run_audit`'s settings."""

    pl_module: pl.LightningModule
    members: Subset
    non_members: Subset
    loaders: List[DataLoader]
    stats: ExampleStatistics
    collate_fn: Optional[Callable]
    seed: int
    reference: Optional[Reference]
    reference_name: Optional[str]
    min_k: float
    shadow_models: int
    shadow_epochs: int
    shadow_batch_size: int
    shadow_privacy: Optional[PrivacyConfig]
    confidence: Optional[str]
    min_out_for_variance: int
    accelerator: Any
    devices: Any

    def statistics(self, module: pl.LightningModule) -> ExampleStatistics:
        """``module``'s per-example losses on the members then the non-members."""
        return pooled_statistics(module, self.loaders)


def pooled_statistics(module: pl.LightningModule, loaders: Sequence[DataLoader], tokens: bool = False) -> ExampleStatistics:
    """``module``'s statistics on each loader's examples, joined in order (members first)."""
    parts = [example_statistics(module, loader, tokens=tokens) for loader in loaders]
    joined = ExampleStatistics(torch.cat([p.losses for p in parts]))
    if tokens:
        joined.token_log_probs = [lp for p in parts for lp in p.token_log_probs]
        joined.texts = [text for p in parts for text in p.texts]
    return joined


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
        attacks: names in :data:`ATTACK_REGISTRY`: ``"loss"``, ``"reference"``, ``"min_k"``, ``"zlib"``,
            ``"lira"`` and any registered with :func:`register_attack`.
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
    for attack in _needing(attacks, "reference"):
        if reference is None:
            raise ValueError(f"The {attack!r} attack needs reference= (initial trainable state, a checkpoint or a module).")
    for attack in _needing(attacks, "shadows"):
        if shadow_models < 2:
            raise ValueError(f"The {attack!r} attack needs shadow_models >= 2, got {shadow_models}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    chosen_members, chosen_non_members = balanced_subsets(members, non_members, num_examples, seed)
    # An own generator: a loader iterator otherwise draws its base seed from the global RNG.
    loaders = [DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(seed)) for data in (chosen_members, chosen_non_members)]
    count = len(chosen_members)
    is_member = torch.cat([torch.ones(count, dtype=torch.long), torch.zeros(count, dtype=torch.long)])
    inputs = AuditInputs(
        pl_module=pl_module, members=chosen_members, non_members=chosen_non_members, loaders=loaders,
        stats=pooled_statistics(pl_module, loaders, tokens=bool(_needing(attacks, "token_log_probs"))),
        collate_fn=collate_fn, seed=seed, reference=reference, reference_name=reference_name, min_k=min_k,
        shadow_models=shadow_models, shadow_epochs=shadow_epochs, shadow_batch_size=shadow_batch_size,
        shadow_privacy=shadow_privacy, confidence=confidence, min_out_for_variance=min_out_for_variance,
        accelerator=accelerator, devices=devices,
    )
    scores: Dict[str, torch.Tensor] = {}
    summary: Dict[str, Any] = {"num_members": count, "num_non_members": count, "seed": seed}
    for attack in attacks:
        scores[attack], entries = ATTACK_REGISTRY[attack].score(inputs)
        summary.update(entries)
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


@register_attack("loss")
def _loss_attack(inputs: AuditInputs) -> Tuple[torch.Tensor, Dict[str, Any]]:
    return loss_scores(inputs.stats), {}


@register_attack("reference", needs=("reference",))
def _reference_attack(inputs: AuditInputs) -> Tuple[torch.Tensor, Dict[str, Any]]:
    reference = inputs.reference
    if isinstance(reference, pl.LightningModule):
        check_contract(reference, PerExampleLosses, who="The reference model")
        reference_stats = inputs.statistics(reference)
    else:
        state = checkpoint_reference(inputs.pl_module, reference) if isinstance(reference, (str, Path)) else reference
        with swapped_parameters(inputs.pl_module, state):
            reference_stats = inputs.statistics(inputs.pl_module)
    return reference_scores(inputs.stats, reference_stats), {"reference": inputs.reference_name or _describe(reference)}


@register_attack("min_k", needs=("token_log_probs",))
def _min_k_attack(inputs: AuditInputs) -> Tuple[torch.Tensor, Dict[str, Any]]:
    return min_k_percent(inputs.stats.token_log_probs, inputs.min_k), {"min_k_fraction": inputs.min_k}


@register_attack("zlib", needs=("token_log_probs",))
def _zlib_attack(inputs: AuditInputs) -> Tuple[torch.Tensor, Dict[str, Any]]:
    return zlib_scores(inputs.stats), {}


@register_attack("lira", needs=("shadows",))
def _lira_attack(inputs: AuditInputs) -> Tuple[torch.Tensor, Dict[str, Any]]:
    kind = inputs.confidence or default_confidence(inputs.pl_module)
    keep = keep_matrix(inputs.shadow_models, len(inputs.members) + len(inputs.non_members), inputs.seed)
    shadow_confidences, seconds = train_shadows(
        inputs.pl_module, audit_pool(inputs.members, inputs.non_members), keep,
        lambda shadow: scaled_confidence(inputs.statistics(shadow).losses, kind),
        collate_fn=inputs.collate_fn, epochs=inputs.shadow_epochs, batch_size=inputs.shadow_batch_size,
        privacy=inputs.shadow_privacy, seed=inputs.seed, accelerator=inputs.accelerator, devices=inputs.devices,
    )
    scores, fixed = lira_offline_scores(scaled_confidence(inputs.stats.losses, kind), shadow_confidences, keep,
                                        min_out_for_variance=inputs.min_out_for_variance)
    privacy = inputs.shadow_privacy if inputs.shadow_privacy is not None else getattr(inputs.pl_module, "privacy", None)
    return scores, {"lira": {
        "variant": "offline (OUT shadows only), one-sided z-score",
        "shadow_models": inputs.shadow_models,
        "shadow_training_examples": (keep.sum(1)).tolist(),
        "shadow_epochs": inputs.shadow_epochs,
        "shadow_batch_size": inputs.shadow_batch_size,
        # The shadows are always seeded (see train_shadows), whatever the audited run's secure_mode.
        "shadow_privacy": None if privacy is None else dict(privacy.__dict__, secure_mode=False),
        "confidence": kind,
        "examples_with_fixed_variance": fixed,
        "wall_seconds_per_shadow": [round(s, 2) for s in seconds],
        "mean_wall_seconds_per_shadow": round(sum(seconds) / len(seconds), 2),
    }}


#: The built-in attacks' names, in the order they are run and reported.
ATTACKS = tuple(ATTACK_REGISTRY)


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
