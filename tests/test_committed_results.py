"""Every committed DP row's epsilon, recomputed from what its data flowed through.

A row of ``results/**/results.json`` (or ``superseded.json``) links its run's privacy report; the run folder
also keeps the ``config.yaml`` it was trained with. From the config alone: ``N`` private training examples
(``max_train_examples``), Poisson batches of expected size ``B`` (sample rate ``q = B / N``), ``ceil(N / B)``
batches per epoch for ``max_epochs`` epochs, ``delta = N ** -1.1`` unless the config sets one, and one Gaussian
release per batch (flat clipping; no DP teacher, no private clip-bound estimate, so no other release). Only
the noise multiplier is read from the report: it is what the noise was drawn with. Opacus' accountant of
the config's kind, fed that history by hand, must give the report's and the row's epsilon, at most the target.
"""
import json
import math
from pathlib import Path

import pytest
import yaml
from opacus.accountants import create_accountant

ROOT = Path(__file__).resolve().parent.parent
TABLES = sorted([*ROOT.glob("results/**/results.json"), *ROOT.glob("results/**/superseded.json")])


def _dp_rows():
    for table in TABLES:
        for row in json.loads(table.read_text()):
            if row.get("epsilon") is not None and row.get("report"):
                yield pytest.param(row, id=f"{table.parent.relative_to(ROOT)}:{Path(row['report']).parent.name}")


def test_the_committed_tables_are_found():
    assert any(table.name == "results.json" for table in TABLES) and list(_dp_rows())


@pytest.mark.parametrize("row", list(_dp_rows()))
def test_a_committed_rows_epsilon_is_what_its_sampling_and_noise_give(row):
    report_path = ROOT / Path(row["report"]).with_suffix(".json")
    assert report_path.is_file(), f"{row['report']}: the row's report is not committed"
    report = json.loads(report_path.read_text())
    config = yaml.safe_load((report_path.parent / "config.yaml").read_text())
    data, privacy = config["data"]["init_args"], config["model"]["init_args"]["privacy"]
    assert privacy["enabled"] and privacy["clipping"] == "flat" and privacy["noise_multiplier"] is None

    n, batch, epochs = data["max_train_examples"], data["batch_size"], config["trainer"]["max_epochs"]
    q, steps = batch / n, epochs * math.ceil(n / batch)
    delta = privacy["target_delta"] if privacy["target_delta"] is not None else n ** -1.1
    assert report["dataset_size"] == n and report["sample_rate"] == pytest.approx(q, rel=1e-12)
    assert report["steps"] == steps and report["delta"] == pytest.approx(delta, rel=1e-12)
    # Nothing but the training releases in the accountant: a DP teacher or a private estimate of clip bounds
    # would add entries, which this hand computation does not model.
    assert [tuple(h) for h in report["accountant_history"]] == [(report["noise_multiplier"], q, steps)]

    accountant = create_accountant(mechanism=privacy["accountant"])
    accountant.history = [(report["noise_multiplier"], q, steps)]
    epsilon = accountant.get_epsilon(delta=delta)
    assert report["epsilon"] == pytest.approx(epsilon, rel=1e-9) and row["epsilon"] == report["epsilon"]
    assert epsilon <= privacy["target_epsilon"] + 1e-9 and row["target_epsilon"] == privacy["target_epsilon"]
