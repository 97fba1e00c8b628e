"""bench/learnability.py: one concept learned by train.py as a user runs it, scored, tabulated, and resumed."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def _survey(tmp_path, *extra):
    cmd = [sys.executable, "bench/learnability.py", "--jobs", "1", "--train-args=--steps 2 --batch-size 2",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "survey.json"), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_survey_scores_tabulates_and_resumes(tmp_path):
    r = _survey(tmp_path, "--concepts", "pine_tree")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "survey.json").read_text())
    assert saved["settings"]["train_args"] == "--steps 2 --batch-size 2"
    res = saved["results"]["pine_tree"]
    assert 0 <= res["accuracy"] <= 1 and res["train_seconds"] > 0
    assert (tmp_path / "work").exists() and "| pine_tree |" in (tmp_path / "survey.md").read_text()
    again = _survey(tmp_path, "--concepts", "pine_tree")
    assert again.returncode == 0 and "(1 already done)" in again.stdout
    assert json.loads((tmp_path / "survey.json").read_text()) == saved  # nothing learned twice


def test_unknown_concept_is_a_one_line_error(tmp_path):
    r = _survey(tmp_path, "--concepts", "pine_tree,unicorn")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: unknown concept(s) unicorn")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "survey.json").exists()
