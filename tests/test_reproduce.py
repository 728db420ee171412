"""`pflat reproduce`: the paper's comparison, end to end on a tiny model, and its table arithmetic."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig, reproduce
from pflat_lightning.callbacks import AdversarialWeightPerturbation, SharpnessLayerSelection, TeacherDistillation
from pflat_lightning.checkpointing import trainable_state
from pflat_lightning.runs import load_run

from helpers import SEEDED_REASONS, TokenDataModule, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]


def test_quick_comparison_on_any_data_writes_table_results_and_figures(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    run_options = ["--model.backbone", tiny_model_dir("bert"), "--model.max_physical_batch_size", "128",
                   "--data.source", "sms_spam", "--data.max_length", "16", "--data.batch_size", "32",
                   "--data.max_train_examples", "96", "--data.max_eval_examples", "64", "--data.eval_batch_size", "64",
                   "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def reproduce_cli(*argv, options=run_options):
        return subprocess.run(
            [sys.executable, "-m", "pflat_lightning.cli", "reproduce", "--quick", *argv, "--out", str(out), "--", *options],
            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
        )

    done = reproduce_cli("--epsilons", "8", "--methods", "zero-shot", "non-private", "DP-SGD", "Privacy-Flat (paper)")
    assert done.returncode == 0, done.stderr[-3000:]

    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["target_epsilon"]) for r in rows] == [
        ("zero-shot", None), ("non-private", None), ("DP-SGD", 8.0), ("Privacy-Flat (paper)", 8.0)]
    by_method = {r["method"]: r for r in rows}
    for row in rows:  # each number is read back from that run's own privacy report
        report = json.loads(Path(row["report"]).with_suffix(".json").read_text())
        assert row["epsilon"] == report["epsilon"] and row["formal_guarantee"] == report["formal_guarantee"]
        assert row["test_f1"] == report["metrics"]["test_f1"] and row["val_f1"] == report["metrics"]["val_f1"]
        assert 0.0 <= row["mia_auc"] <= 1.0 and 0.5 <= row["mia_accuracy"] <= 1.0 and row["sharpness"] >= 0.0
        attacks = report["callbacks"]["MembershipInferenceAudit"]["attacks"]
        assert report["callbacks"]["MembershipInferenceAudit"]["num_members"] > 0
        assert row["attacks"]["reference"]["auc"] == attacks["reference"]["auc"]
        assert row["attacks"]["loss"]["tpr_at_0.1pct_fpr"] == attacks["loss"]["tpr_at_0.1pct_fpr"]
        # The recipe's Trainer settings apply (2 of the 3 batches per epoch), and the run's config is saved.
        trained_steps = 0 if row["method"] == "zero-shot" else 4
        assert report["steps"] == trained_steps and (Path(row["report"]).parent / "config.yaml").is_file()
    zero_shot = by_method["zero-shot"]
    assert 0.0 <= zero_shot["val_acc"] <= 1.0, "validated although never fitted"
    assert zero_shot["attacks"]["reference"]["auc"] == 0.5, "untrained, the reference attack's scores are all 0"
    assert by_method["non-private"]["epsilon"] is None and not by_method["non-private"]["formal_guarantee"]
    dp = by_method["DP-SGD"]
    assert not dp["formal_guarantee"] and 7.0 < dp["epsilon"] <= 8.0 and dp["reasons"] == SEEDED_REASONS, \
        "the comparison is seeded: only its reproducible randomness voids the guarantee"
    paper = by_method["Privacy-Flat (paper)"]
    assert not paper["formal_guarantee"], "the paper's variant uses raw private gradients and a private teacher"
    assert {r.split(":")[0] for r in paper["reasons"]} == {
        "AdversarialWeightPerturbation", "SharpnessLayerSelection", "TeacherDistillation", "noise", "sampling"}
    paper_report = json.loads(Path(paper["report"]).with_suffix(".json").read_text())
    assert paper_report["max_grad_norm"] == 0.1, "the paper's clip comes from privacy_flat_paper.yaml"

    lines = (out / "table.md").read_text().splitlines()
    assert lines[0].startswith("| method |") and len(lines) == 2 + 4 + 6
    assert lines[2].startswith("| zero-shot | none |") and lines[2].rstrip().endswith("| 1 |")
    assert lines[4].startswith("| DP-SGD | 8.0 |") and "| seeded |" in lines[4]
    assert lines[5].startswith("| Privacy-Flat (paper) | 8.0 |") and "| no |" in lines[5]
    paired = lines[-1].split(" | ")  # the paper's row against DP-SGD's, seed 0
    assert paired[:4] == ["| Privacy-Flat (paper)", "8.0", "DP-SGD", "0"]
    assert float(paired[5]) == pytest.approx(100 * (paper["test_acc"] - dp["test_acc"]), abs=0.006)
    assert float(paired[6]) == pytest.approx(100 * (paper["test_f1"] - dp["test_f1"]), abs=0.006)
    for figure in ("sharpness.png", "mia_accuracy.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"

    # Resuming the same --out: finished runs are kept and skipped, an interrupted run's leftovers are cleared.
    stale = out / "runs" / "DP-SGD-eps3.0-seed0" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("left by an interrupted run")
    done = reproduce_cli("--epsilons", "8", "3", "--methods", "DP-SGD")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DP-SGD eps=8.0 seed=0: already in" in done.stdout
    resumed = json.loads((out / "results.json").read_text())
    assert resumed[:4] == rows, "the finished rows are kept as they were"
    assert [(r["method"], r["target_epsilon"]) for r in resumed[4:]] == [("DP-SGD", 3.0)]
    assert resumed[4]["reasons"] == SEEDED_REASONS and 2.5 < resumed[4]["epsilon"] <= 3.0
    assert not stale.exists() and (stale.parent / "privacy_report.json").is_file()
    assert len((out / "table.md").read_text().splitlines()) == 2 + 5 + 6, "5 rows, then the paper's row paired"

    # A row whose method config changed since it ran (here: as recorded) is run again; the others stay.
    assert resumed[4]["method_recipe"] == {"callbacks": [], "privacy": {}}
    resumed[4]["method_recipe"] = {"callbacks": [], "privacy": {"max_grad_norm": 0.5}}
    (out / "results.json").write_text(json.dumps(resumed))
    done = reproduce_cli("--epsilons", "3", "--methods", "DP-SGD")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DP-SGD eps=3.0 seed=0: its method config has changed since it ran: moved to" in done.stdout
    rerun = json.loads((out / "results.json").read_text())
    assert rerun[:4] == rows and len(rerun) == 5 and rerun[4]["method_recipe"] == {"callbacks": [], "privacy": {}}
    assert rerun[4]["wall_s"] != resumed[4]["wall_s"]
    [old] = json.loads((out / "superseded.json").read_text())
    assert old["wall_s"] == resumed[4]["wall_s"] and Path(old["report"]).parent == out / "runs" / "superseded" / \
        Path(resumed[4]["report"]).parent.name
    assert json.loads(Path(old["report"]).with_suffix(".json").read_text())["epsilon"] == resumed[4]["epsilon"], \
        "the superseded row's own report, kept beside the new run's"
    resumed = rerun

    # Another recipe in the same folder is refused before anything runs.
    done = reproduce_cli("--epsilons", "8", options=[*run_options, "--data.max_length", "8"])
    assert done.returncode == 2 and "holds a comparison with another recipe" in done.stderr
    assert json.loads((out / "results.json").read_text()) == resumed


def _row(method, epsilon, seed, acc, guarantee=True):
    return {"method": method, "target_epsilon": epsilon, "seed": seed, "test_acc": acc, "mia_accuracy": 0.5,
            "mia_auc": 0.5, "mia_tpr_at_1pct_fpr": 0.01, "sharpness": 0.1, "epsilon": epsilon,
            "formal_guarantee": guarantee, "train_s": 10.0,
            "report": f"out/runs/{method}-eps{epsilon}-seed{seed}/privacy_report.md"}


def test_table_averages_seeds_and_a_single_failing_seed_voids_the_guarantee():
    rows = [_row("DP-SGD", 8.0, 0, 0.80), _row("DP-SGD", 8.0, 1, 0.90, guarantee=False),
            _row("non-private", None, 0, 0.95, guarantee=False), _row("DP-SGD", 3.0, 0, 0.70)]
    rows[1]["test_f1"] = 0.75  # a metric that seed 0's row predates
    lines = reproduce.table(rows).splitlines()[2:]
    # Sorted by epsilon (non-private first), then by the methods' order; sd over seeds (n - 1).
    assert [line.split(" | ")[:2] for line in lines] == [["| non-private", "none"], ["| DP-SGD", "3.0"],
                                                         ["| DP-SGD", "8.0"]]
    assert "| 85.00 ± 7.07 | 75.00 (1 of 2 seeds) |" in lines[2] and lines[2].rstrip().endswith("| no | 10 | 2 |")
    assert "| n/a | 70.00 | n/a | 50.00 | 0.500 |" in lines[1] and "| yes |" in lines[1], "one seed: no sd to show"


def test_paired_table_differences_each_seed_against_its_baseline():
    rows = [_row("DP-SGD", 8.0, 0, 0.80), _row("DP-SGD", 8.0, 1, 0.90), _row("DP + AWP", 8.0, 1, 0.90),
            _row("DP + AWP", 8.0, 0, 0.83), _row("DP + AWP", 8.0, 2, 0.99),  # seed 2: no DP-SGD row to pair
            _row("DP + distillation", 3.0, 0, 0.70),  # no DP-SGD at epsilon 3
            _row("non-private", None, 0, 0.95), _row("non-private + Privacy-Flat (paper)", None, 0, 0.94),
            _row("non-private + AWP (paper)", None, 0, 0.97), _row("public teacher only", None, 0, 0.90)]
    rows[-3]["mia_auc"] = 0.45
    lines = reproduce.paired_table(rows).splitlines()[5:]
    # differences 3 and 0 points: mean 1.5, sample sd 3 / sqrt(2); the public teacher's row has no baseline
    assert lines == ["| non-private + Privacy-Flat (paper) | none | non-private | 0 | n/a | -1.00 | n/a | -0.050 "
                     "| n/a |",
                     "| non-private + AWP (paper) | none | non-private | 0 | n/a | 2.00 | n/a | 0.000 | n/a |",
                     "| DP + AWP | 8.0 | DP-SGD | 0, 1 | n/a | 1.50 ± 2.12 | n/a | 0.000 ± 0.000 | n/a |"]
    assert reproduce.paired_table(rows[:2]) == "", "nothing to pair: no table"


def test_bar_charts_show_an_error_bar_only_where_there_are_seeds_to_spread(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.bar

    def record(ax, xs, heights, *args, yerr=None, label=None, **kwargs):
        drawn.append((label, list(yerr)))
        return original(ax, xs, heights, *args, yerr=yerr, label=label, **kwargs)

    monkeypatch.setattr(Axes, "bar", record)
    rows = [_row("DP-SGD", 8.0, 0, 0.80), _row("DP-SGD", 8.0, 1, 0.90), _row("DP-SGD", 3.0, 0, 0.70)]
    rows[1]["mia_accuracy"] = 0.6
    reproduce.write_outputs(rows, tmp_path)
    two_seeds = sorted(yerr[0] for label, yerr in drawn if label == "epsilon 8")
    one_seed = [yerr[0] for label, yerr in drawn if label == "epsilon 3"]
    # sharpness is equal over the two seeds (sd 0); MIA accuracy 0.5 and 0.6 (sample sd 0.1 / sqrt 2)
    assert two_seeds == [0.0, pytest.approx(0.1 / math.sqrt(2))]
    assert len(one_seed) == 2 and all(math.isnan(e) for e in one_seed), "one seed: no error bar, not one of size 0"


def test_side_by_side_invocations_keep_each_others_rows(tmp_path):
    """Two invocations on one --out each hold the rows they started with; the second to finish must not drop the
    first one's row, and a row whose method config changed since it ran goes."""
    (tmp_path / "comparison.json").write_text("{}")
    recipes = {m.name: reproduce.method_recipe(m) for m in reproduce.METHODS}
    kept, stale = _row("DP-SGD", 8.0, 0, 0.80), _row("DP + AWP", 8.0, 0, 0.81)
    kept["method_recipe"], stale["method_recipe"] = recipes["DP-SGD"], {"changed": True}
    reproduce.write_outputs([kept, stale], tmp_path)
    other = _row("DP-SGD", 8.0, 1, 0.85)  # finished by a process that started before `kept` was written
    other["method_recipe"] = recipes["DP-SGD"]
    assert [r["seed"] for r in reproduce.record(other, tmp_path, recipes)] == [0, 1]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in on_disk] == [("DP-SGD", 0), ("DP-SGD", 1)]
    assert json.loads((tmp_path / "superseded.json").read_text()) == [stale], "a superseded row is kept aside"
    rerun = dict(kept, test_acc=0.9)  # the same run again replaces its row
    assert [r["test_acc"] for r in reproduce.record(rerun, tmp_path, recipes)] == [0.85, 0.9]


def test_a_superseded_row_keeps_its_run_folder_when_it_is_run_again(tmp_path):
    """Running a row again (same method, epsilon, seed: the same run folder name) after its method config changed
    must not delete what the old row measured: its folder moves to runs/superseded/ before anything runs, and the
    row in superseded.json points there. A second supersession of the same name keeps both folders."""
    (tmp_path / "comparison.json").write_text("{}")
    recipes = {m.name: reproduce.method_recipe(m) for m in reproduce.METHODS}

    def ran(acc, what):
        row = _row("DP + AWP", 8.0, 0, acc)
        row["method_recipe"] = {"changed": what}
        row["report"] = str(tmp_path / "runs" / "AWP-seed0" / "privacy_report.md")
        (tmp_path / "runs" / "AWP-seed0").mkdir(parents=True)
        Path(row["report"]).write_text(f"measured {acc}")
        return row

    first = ran(0.81, 1)
    reproduce.write_outputs([first, dict(_row("DP-SGD", 8.0, 0, 0.80), method_recipe=recipes["DP-SGD"])], tmp_path)
    kept = reproduce.set_aside(tmp_path, recipes)
    assert [r["method"] for r in kept] == ["DP-SGD"]
    assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())] == ["DP-SGD"]
    assert not (tmp_path / "runs" / "AWP-seed0").exists()
    reproduce.record(ran(0.82, 2), tmp_path, recipes)  # ran again, under a config that has changed again since:
    assert [r["method"] for r in reproduce.set_aside(tmp_path, recipes)] == ["DP-SGD"]
    superseded = json.loads((tmp_path / "superseded.json").read_text())
    assert [r["test_acc"] for r in superseded] == [0.81, 0.82]
    assert [Path(r["report"]).read_text() for r in superseded] == ["measured 0.81", "measured 0.82"]
    assert [Path(r["report"]).parent.name for r in superseded] == ["AWP-seed0", "AWP-seed0-2"]
    assert all(Path(r["report"]).parent.parent == tmp_path / "runs" / "superseded" for r in superseded)


def test_a_default_spelled_out_in_a_method_config_does_not_supersede_its_rows(tmp_path):
    """A row recorded without an argument that the method's config now sets to its default ran the same callbacks:
    kept. The same argument at another value supersedes it."""
    (tmp_path / "comparison.json").write_text("{}")
    distillation = next(m for m in reproduce.METHODS if m.name == "DP + distillation")
    recipe = reproduce.method_recipe(distillation)
    explicit = copy.deepcopy(recipe)
    explicit["callbacks"][0]["init_args"]["warm_start"] = False  # TeacherDistillation's default
    changed = copy.deepcopy(recipe)
    changed["callbacks"][0]["init_args"]["warm_start"] = True
    old = _row("DP + distillation", 8.0, 0, 0.8)
    old["method_recipe"] = recipe
    new = _row("DP + distillation", 8.0, 1, 0.8)
    new["method_recipe"] = explicit
    reproduce.write_outputs([old], tmp_path)
    assert [r["seed"] for r in reproduce.record(new, tmp_path, {"DP + distillation": explicit})] == [0, 1]
    changed_row = dict(new, seed=2, method_recipe=changed)
    assert [r["seed"] for r in reproduce.record(changed_row, tmp_path, {"DP + distillation": changed})] == [2]
    selection = next(m for m in reproduce.METHODS if m.name == "DP + layer selection")
    recorded = dict(reproduce.method_recipe(selection), privacy={"max_grad_norm": 1.0})  # PrivacyConfig's default
    current = {"DP + layer selection": reproduce.method_recipe(selection)}
    assert current["DP + layer selection"]["privacy"] == {}
    assert not reproduce._stale(dict(old, method="DP + layer selection", method_recipe=recorded), current)
    assert reproduce._stale(dict(old, method="DP + layer selection", method_recipe=dict(recorded, privacy={
        "max_grad_norm": 0.5})), current)


def test_methods_take_their_callbacks_and_clip_from_their_config():
    strict = {m.name: m for m in reproduce.METHODS}
    awp_only = reproduce.method_callbacks(strict["DP + AWP"])
    assert [type(c) for c in awp_only] == [AdversarialWeightPerturbation] and awp_only[0].direction == "previous_private"
    full = reproduce.method_callbacks(strict["Privacy-Flat (strict DP)"], quick=True)
    assert [type(c) for c in full] == [AdversarialWeightPerturbation, TeacherDistillation]
    assert full[1].teacher_epochs == 1 and full[1].warm_start and full[1].weight > 0, "--quick cuts costs"
    (warm,) = reproduce.method_callbacks(strict["DP + public warm start"])
    (distill,) = reproduce.method_callbacks(strict["DP + distillation"])
    assert (warm.weight, warm.warm_start, distill.warm_start) == (0.0, True, False) and distill.weight > 0
    assert (warm.source, warm.teacher_epochs) == (distill.source, distill.teacher_epochs), "the same public teacher"
    (selection,) = reproduce.method_callbacks(strict["DP + layer selection"])
    assert isinstance(selection, SharpnessLayerSelection) and selection.data == "public"
    assert selection.num_batches == 1 and selection.batch_size == 16 and len(selection.alphas) == 5
    quick_selection = reproduce.method_callbacks(strict["DP + layer selection"], quick=True)[0]
    assert quick_selection.num_batches == 1 and len(quick_selection.alphas) == 6
    with pytest.raises(ValueError, match=r"takes \['SharpnessLayerSelection'\] from .*privacy_flat_strict.yaml, which has no"):
        reproduce.method_recipe(reproduce.Method("x", config=reproduce.STRICT_CONFIG, callbacks=["SharpnessLayerSelection"]))
    paper_recipe = reproduce.method_recipe(strict["Privacy-Flat (paper)"])
    assert [c["class_path"].rpartition(".")[2] for c in paper_recipe["callbacks"]] == [
        "AdversarialWeightPerturbation", "SharpnessLayerSelection", "TeacherDistillation"]
    assert paper_recipe["callbacks"][1]["init_args"]["direction"] == "data"
    assert paper_recipe["privacy"] == {"max_grad_norm": 0.1}, "the config's epsilon 8 is not the row's: not recorded"
    paper = reproduce.method_overrides(strict["Privacy-Flat (paper)"], 3.0, 7)
    assert paper[paper.index("--model.privacy.max_grad_norm") + 1] == "0.1"
    assert paper[paper.index("--model.privacy.target_epsilon") + 1] == "3.0"
    assert reproduce.method_overrides(strict["non-private"], None, 7)[-2:] == ["--model.privacy.enabled", "false"]
    figure_4 = strict["non-private + Privacy-Flat (paper)"]  # the paper's techniques, no noise
    assert reproduce.method_overrides(figure_4, None, 7)[-2:] == ["--model.privacy.enabled", "false"]
    assert reproduce.method_recipe(figure_4)["callbacks"] == paper_recipe["callbacks"]
    for technique, callback in zip(("AWP", "layer selection", "distillation"), paper_recipe["callbacks"]):
        alone = strict[f"non-private + {technique} (paper)"]  # Figure 4, one technique at a time
        assert reproduce.method_recipe(alone)["callbacks"] == [callback]
        assert reproduce.method_overrides(alone, None, 7)[-2:] == ["--model.privacy.enabled", "false"]
        assert alone.baseline == figure_4.baseline == "non-private"


def test_the_public_teacher_only_row_measures_the_teachers_prefix_without_a_private_step(tiny_model_dir, tmp_path):
    method = {m.name: m for m in reproduce.METHODS}["public teacher only"]
    overrides = reproduce.method_overrides(method, None, 7)
    assert overrides[overrides.index("--trainer.max_epochs") + 1] == "0" and overrides[-1] == "false"
    (callback,) = reproduce.method_callbacks(method, quick=True)
    assert (callback.source, callback.weight, callback.warm_start) == ("public", 0.0, True)
    torch.manual_seed(0)
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False))
    initial = trainable_state(module)
    quiet_trainer(tmp_path, max_epochs=0, callbacks=[callback]).fit(module, datamodule=TokenDataModule())
    measured = trainable_state(module)
    assert set(measured) == set(callback.teacher_state)
    for name, tensor in measured.items():
        assert torch.equal(tensor, callback.teacher_state[name]), f"{name}: not the public teacher's"
    assert not torch.equal(measured["model.prefix.layers.0.weight"], initial["model.prefix.layers.0.weight"])
    assert module.global_step == 0, "no step on the private training data"
    [entry] = [e for e in module.ledger.entries if e.component == "TeacherDistillation"]
    assert entry.status == "public" and "starts from the teacher's prefix" in entry.detail, entry


def test_every_privacy_setting_of_a_method_config_reaches_its_rows(tmp_path):
    config = tmp_path / "method.yaml"
    config.write_text("trainer:\n  max_epochs: 1\nmodel:\n  privacy:\n    target_epsilon: 8.0\n    target_delta: 1.0e-6\n"
                      "    clipping: group\n    poisson_sampling: false\n    max_grad_norm: 0.5\n")
    method = reproduce.Method("custom", config=config)
    assert reproduce.method_recipe(method)["privacy"] == {"target_delta": 1e-6, "clipping": "group",
                                                         "poisson_sampling": False, "max_grad_norm": 0.5}
    model, _, _ = load_run([str(reproduce.DEFAULT_CONFIG)], None, reproduce.method_overrides(method, 3.0, 7))
    base = yaml.safe_load(reproduce.DEFAULT_CONFIG.read_text())["model"]["init_args"]["privacy"]
    assert model.privacy == PrivacyConfig(**{**base, "target_epsilon": 3.0, "seed": 7, "secure_mode": False, "target_delta": 1e-6,
                                             "clipping": "group", "poisson_sampling": False, "max_grad_norm": 0.5})


@pytest.mark.parametrize("argv, message", [
    (["--epsilons", "0"], "--epsilons must be positive"),
    (["--public_fraction", "1.5"], "--public_fraction must be in (0, 1)"),
    (["--config", "missing.yaml"], "--config missing.yaml is not a file"),
    (["--audit_examples", "0"], "--audit_examples must be >= 1, got 0"),
    (["--landscape_batches", "-2"], "--landscape_batches must be >= 1, got -2"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(argv)
    assert message in capsys.readouterr().err
