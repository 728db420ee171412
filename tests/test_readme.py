"""The README's newcomer path runs as written: each Python block marked ``<!-- runs in tests/test_readme.py -->``
is executed, in order and in one namespace (a later block may use an earlier one's names), from a folder that
holds the repository's ``examples/data``."""
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runs in tests/test_readme.py -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*```python\n(.*?)```", re.S)


def readme_blocks():
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_marks_its_newcomer_blocks():
    blocks = readme_blocks()
    assert len(blocks) == (ROOT / "README.md").read_text().count(MARK) >= 2
    assert any("examples/data/reviews.csv" in block for block in blocks)
    assert any("TeacherDistillation(" in block for block in blocks)


@pytest.mark.slow
def test_the_readme_newcomer_blocks_run(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples" / "data", tmp_path / "examples" / "data")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for block in readme_blocks():
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "['negative', 'positive']" in printed
    report = namespace["report"]
    assert report["formal_guarantee"] is True, report["reasons"]
    assert {entry["component"] for entry in report["ledger"]} >= {"SharpnessLayerSelection", "TeacherDistillation"}
    assert all(entry["status"] in ("accounted", "public", "evaluation") for entry in report["ledger"])
    assert "validation" in {entry["component"] for entry in report["ledger"] if entry["status"] == "evaluation"}
