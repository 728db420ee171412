"""Membership-inference attacks: scores, metrics, the ROC plot, LiRA shadows and the audit that runs them.

The ``MembershipInferenceAudit`` callback (``pflat_lightning.callbacks``) runs an audit at the end of fit;
``pflat audit --config RUN.yaml --ckpt_path CKPT`` audits a finished run.
"""
from pflat_lightning.attacks.audit import (
    ATTACK_REGISTRY,
    ATTACKS,
    Attack,
    AuditInputs,
    AuditResult,
    balanced_subsets,
    datamodule_splits,
    register_attack,
    run_audit,
    trainable_state,
    write_audit,
)
from pflat_lightning.attacks.lira import keep_matrix, lira_offline_scores, scaled_confidence, train_shadows
from pflat_lightning.attacks.metrics import RocCurve, attack_metrics, dp_attack_bound, dp_tpr_bound, roc_curve, tpr_at_fpr
from pflat_lightning.attacks.plots import plot_roc
from pflat_lightning.attacks.scores import (
    ExampleStatistics,
    example_statistics,
    loss_scores,
    min_k_percent,
    reference_scores,
    scoring_mode,
    zlib_entropy,
    zlib_scores,
)

__all__ = [
    "ATTACK_REGISTRY",
    "ATTACKS",
    "Attack",
    "AuditInputs",
    "AuditResult",
    "ExampleStatistics",
    "RocCurve",
    "attack_metrics",
    "balanced_subsets",
    "datamodule_splits",
    "dp_attack_bound",
    "dp_tpr_bound",
    "example_statistics",
    "keep_matrix",
    "lira_offline_scores",
    "loss_scores",
    "min_k_percent",
    "plot_roc",
    "reference_scores",
    "register_attack",
    "roc_curve",
    "run_audit",
    "scaled_confidence",
    "scoring_mode",
    "tpr_at_fpr",
    "train_shadows",
    "trainable_state",
    "write_audit",
    "zlib_entropy",
    "zlib_scores",
]
