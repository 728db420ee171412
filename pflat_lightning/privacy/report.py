"""The privacy report every fit writes: what guarantee holds, from which numbers, and why (not)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from pflat_lightning.privacy.clipping import GROUPS
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.engine import PrivacyAccounting
from pflat_lightning.privacy.ledger import STATUS_MEANINGS, PrivacyLedger

REPORT_JSON = "privacy_report.json"
REPORT_MD = "privacy_report.md"
#: Why a run without ``secure_mode`` gives no formal guarantee (Opacus' convention: seeded randomness is for
#: experiments): its draws are reproducible from what the run ships.
SEEDED_NOISE = ("noise: drawn from a seeded pseudo-random generator whose seed and state are stored in the run's "
                "checkpoints/config: whoever has them can regenerate and subtract every noise draw; train with "
                "secure_mode=True for a formal guarantee")
SEEDED_SAMPLING = ("sampling: the Poisson batches are drawn from a generator seeded by the training loader's seed "
                   "(the datamodule's seed, stored in the run's config): whoever has it can tell which examples "
                   "were in each batch; train with secure_mode=True for a formal guarantee")
#: Where a run's report goes when its folder already holds another run's: ``<folder>/privacy_reports/version_N``.
REPORTS_FOLDER = "privacy_reports"
#: What every DP report says besides the accountant's numbers: data-dependent signals that no setting removes.
DP_CAVEATS = (
    "Aborting on a non-finite loss: a fit stops with FloatingPointError, before the update, when an example's "
    "loss is not finite, so whether and when a run aborts is a one-bit, data-dependent signal outside the "
    "accountant (the epsilon does not cover it).",
)


def noise_generator(config: PrivacyConfig) -> Optional[str]:
    """Where a run's noise comes from, in words, never with a seed value (``None`` without DP)."""
    if not config.enabled:
        return None
    return "os.urandom (CSPRNG)" if config.secure_mode else "seeded pseudo-random (PrivacyConfig.seed)"


def guarantee_reasons(config: PrivacyConfig, engine: Optional[PrivacyAccounting],
                      ledger: Optional[PrivacyLedger]) -> List[str]:
    """Why no formal (epsilon, delta) guarantee holds (empty when one does): the one place that decides."""
    reasons: List[str] = []
    if not config.enabled or engine is None:
        reasons.append("privacy disabled (PrivacyConfig.enabled=False): trained without DP-SGD")
    elif engine.noise_multiplier == 0:
        reasons.append("noise_multiplier=0: no noise, epsilon is infinite")
    if ledger is not None:
        reasons.extend(f"{e.component}: {e.detail}" for e in ledger.unaccounted)
    if config.enabled and engine is not None and not config.secure_mode:
        reasons.append(SEEDED_NOISE)
        if config.poisson_sampling:
            reasons.append(SEEDED_SAMPLING)
    return reasons


def seeded_only(reasons: List[str]) -> bool:
    """Whether the seeded randomness is all that voids the guarantee (``secure_mode=True`` would give one)."""
    return bool(reasons) and set(reasons) <= {SEEDED_NOISE, SEEDED_SAMPLING}


def _group_bounds(engine: Optional[PrivacyAccounting]) -> Optional[Dict[str, float]]:
    bounds = getattr(engine, "group_bounds", None)  # the black-box mechanism has no groups
    return None if bounds is None else dict(zip(GROUPS, bounds))


def build_report(
    *,
    config: PrivacyConfig,
    engine: Optional[PrivacyAccounting],
    ledger: PrivacyLedger,
    dataset_size: Optional[int],
    epochs: int,
    steps: int,
    metrics: Dict[str, float],
    sections: Optional[Dict[str, Any]] = None,
    run_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Assemble the report; every privacy number comes from ``engine``'s accountant history. ``run_id``
    names the run that writes it (a report is only ever re-written by its own run)."""
    reasons = guarantee_reasons(config, engine, ledger)
    private = config.enabled and engine is not None
    if not private:
        epsilon = delta = noise = rate = None
        history: list = []
    else:
        eps = engine.epsilon()
        epsilon = None if math.isinf(eps) else eps
        delta, noise, rate, steps = engine.delta, engine.noise_multiplier, engine.sample_rate, engine.updates
        history = [list(h) for h in engine.history]
    return {
        "run_id": run_id,
        "formal_guarantee": not reasons,
        "reasons": reasons,
        "caveats": list(DP_CAVEATS) if private else [],
        "epsilon": epsilon,
        "delta": delta,
        "target_epsilon": config.target_epsilon if config.enabled else None,
        "noise_multiplier": noise,
        "sample_rate": rate,
        "steps": steps,
        "epochs": epochs,
        "max_grad_norm": config.max_grad_norm if config.enabled else None,
        "clipping": config.clipping if config.enabled else None,
        "group_clip_bounds": _group_bounds(engine) if config.enabled and config.clipping == "group" else None,
        "accountant": config.accountant if config.enabled else None,
        "poisson_sampling": config.poisson_sampling if config.enabled else None,
        "noise_generator": noise_generator(config),
        "grad_sample_mode": (getattr(engine, "grad_sample_mode", None) or config.grad_sample_mode) if config.enabled else None,
        "dataset_size": dataset_size,
        "accountant_history": history,
        "ledger": [e.__dict__ for e in ledger.entries],
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        "callbacks": dict(sections or {}),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(report: Dict[str, Any]) -> str:
    verdict = "holds" if report["formal_guarantee"] else "does NOT hold"
    lines = [
        "# Privacy report",
        "",
        f"**Formal (epsilon, delta) guarantee: {verdict}.**",
        "",
    ]
    if report["epsilon"] is not None and report["delta"] is not None:
        lines += [f"The training set is protected at (epsilon = {report['epsilon']:.4f}, delta = {report['delta']:.3g}).", ""]
    elif report["epsilon"] is not None:  # a private module evaluated before any training: nothing released yet
        lines += ["Nothing has been trained on the private data yet (epsilon = 0).", ""]
    if report["reasons"]:
        lines += ["Why not:", ""] + [f"- {r}" for r in report["reasons"]] + [""]
    if report.get("caveats"):
        lines += ["Caveats:", ""] + [f"- {c}" for c in report["caveats"]] + [""]
    if str(report.get("noise_generator")).startswith("os.urandom"):
        lines += ["Randomness: the noise and the Poisson batches come from the operating system's CSPRNG "
                  "(`secure_mode=True`); floating-point attacks on the Gaussian sampler are not addressed beyond "
                  "float64 sampling.", ""]
    lines += ["| parameter | value |", "| --- | --- |"]
    for key in ("epsilon", "delta", "target_epsilon", "noise_multiplier", "sample_rate", "steps", "epochs",
                "max_grad_norm", "clipping", "group_clip_bounds", "accountant", "poisson_sampling", "grad_sample_mode",
                "noise_generator", "dataset_size"):
        lines.append(f"| {key} | {_fmt(report.get(key))} |")  # .get: reports written before a key existed
    lines += ["", "## Ledger: data use outside DP-SGD's accountant", ""]
    if report["ledger"]:
        lines += ["| component | status | detail |", "| --- | --- | --- |"]
        lines += [f"| {e['component']} | {e['status']} | {e['detail']} |" for e in report["ledger"]]
        statuses = dict.fromkeys(e["status"] for e in report["ledger"])
        lines += [""] + [f"- `{status}`: {STATUS_MEANINGS[status]}." for status in statuses]
    else:
        lines.append("Nothing: every use of private training data went through the accountant.")
    for name, section in report.get("callbacks", {}).items():
        lines += ["", f"## {name}", "", "```json", json.dumps(section, indent=2), "```"]
    if report["metrics"]:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in report["metrics"].items()]
    return "\n".join(lines) + "\n"


def _run_of_report(folder: Path) -> Optional[str]:
    """The run id of the report in ``folder`` (``""`` for one written without), ``None`` when there is none."""
    path = folder / REPORT_JSON
    return (json.loads(path.read_text()).get("run_id") or "") if path.is_file() else None


def find_report(folder: str | Path, run_id: str) -> Optional[Path]:
    """The folder holding run ``run_id``'s report: ``folder`` or one of its ``privacy_reports/version_N``."""
    folder = Path(folder)
    for candidate in [folder, *sorted((folder / REPORTS_FOLDER).glob("version_*"))]:
        if _run_of_report(candidate) == run_id:
            return candidate
    return None


def choose_report_folder(base: str | Path, run_id: str) -> Path:
    """Where run ``run_id`` writes its report: the folder already holding it, else ``base`` when ``base``
    holds no report, else a new ``base/privacy_reports/version_N`` (the first free ``N``, created here so
    that no other run takes it). Another run's report is never overwritten."""
    own = find_report(base, run_id)
    if own is not None:
        return own
    base = Path(base)
    if _run_of_report(base) is None:
        return base
    versions = base / REPORTS_FOLDER
    versions.mkdir(parents=True, exist_ok=True)
    number = 0
    while True:
        folder = versions / f"version_{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def report_folder(trainer: Any, run_id: str) -> Path:
    """:func:`choose_report_folder` under the trainer's ``log_dir`` (the logger's folder; without a logger,
    ``default_root_dir``), chosen on rank zero. A collective call: every rank."""
    base = trainer.log_dir or trainer.default_root_dir
    folder = str(choose_report_folder(base, run_id)) if trainer.is_global_zero else None
    return Path(trainer.strategy.broadcast(folder))


def write_report(report: Dict[str, Any], folder: str | Path) -> Path:
    """Write ``privacy_report.json`` and ``privacy_report.md`` into ``folder``; return the JSON path.

    Raises:
        FileExistsError: when ``folder`` holds the report of another run (another ``run_id``).
    """
    folder = Path(folder)
    owner = _run_of_report(folder)
    if owner is not None and owner != (report.get("run_id") or ""):
        raise FileExistsError(f"{folder / REPORT_JSON} is the report of another run (run_id {owner or 'none'}); "
                              f"run {report.get('run_id')} must not overwrite it: see choose_report_folder().")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_JSON
    path.write_text(json.dumps(report, indent=2) + "\n")
    (folder / REPORT_MD).write_text(render_markdown(report))
    return path


def add_section(folder: str | Path, name: str, section: Dict[str, Any], evaluation: Optional[str] = None,
                run_id: Optional[str] = None) -> Optional[Path]:
    """Add the section ``name`` to the report already written in ``folder`` (and, with ``evaluation``, a
    ledger entry of status ``"evaluation"`` saying what private data was read); re-write its JSON and
    markdown. With ``run_id``, the report is that run's (found by :func:`find_report`: ``folder`` or one
    of its ``privacy_reports/version_N``). Returns the JSON path, or ``None`` when there is no such report."""
    if run_id is not None:
        folder = find_report(folder, run_id)
        if folder is None:
            return None
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    report.setdefault("callbacks", {})[name] = section
    if evaluation is not None:
        entry = {"component": name, "status": "evaluation", "detail": evaluation}
        if entry not in report["ledger"]:
            report["ledger"].append(entry)
    return write_report(report, folder)
