"""`import pflat_lightning` loads what a DP fit needs; the black-box scorers, attacks and landscape on first use."""
import json
import subprocess
import sys

import pflat_lightning

LAZY = ("pflat_lightning.black_box", "pflat_lightning.attacks", "pflat_lightning.landscape")


def test_import_leaves_black_box_attacks_and_landscape_unloaded():
    # A fresh interpreter: this pytest process has imported everything already.
    code = (
        "import json, sys, pflat_lightning\n"
        f"unloaded = [m for m in {LAZY!r} if m not in sys.modules]\n"
        "from pflat_lightning import BlackBoxPromptTuner\n"
        "from pflat_lightning.callbacks import MembershipInferenceAudit\n"
        "print(json.dumps({'unloaded': unloaded, 'tuner': BlackBoxPromptTuner.__module__,\n"
        "                  'audit': MembershipInferenceAudit.__module__, 'run_audit': pflat_lightning.attacks.run_audit.__module__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"unloaded": list(LAZY), "tuner": "pflat_lightning.black_box.tuner",
                     "audit": "pflat_lightning.callbacks.membership_inference_audit",
                     "run_audit": "pflat_lightning.attacks.audit"}


def test_every_public_name_resolves():
    for package in (pflat_lightning, pflat_lightning.callbacks):
        for name in package.__all__:
            assert getattr(package, name).__name__ == name
            assert name in dir(package)
    assert pflat_lightning.landscape.paper_curve is not None and pflat_lightning.black_box.HTTPScorer is not None
    try:
        pflat_lightning.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
