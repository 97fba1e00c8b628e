"""bench/diagnose.py: (e), τ per task read from benchmark and tuning folders, by hand."""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import diagnose  # noqa: E402


def run(dc_temp, taus):
    return {"hparams": {"dc_temp": dc_temp}, "tasks": [{"dc_temp": t} for t in taus]}


def test_taus_are_the_median_per_task_over_the_calibrated_dsc_runs(tmp_path):
    for folder, runs in {"a": {"dsc": [run("auto", [1e-3, 2e-2]), run("auto", [3e-3, 4e-2])],
                               "dsc-ewc": [run("0.01", [0.01, 0.01])],  # τ given: not a calibration
                               "ewc-dc": [run("auto", [9.0, 9.0])]},  # not a DSC method
                         "b/cell/forward": {"dsc-ewc-dc": [run("auto", [5e-4, None, 7e-3]), run("auto", [1e-4])]}
                         }.items():
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "results.json").write_text(json.dumps({"runs": runs}))
    out = diagnose.taus([str(tmp_path / "a"), str(tmp_path / "b")])
    assert list(out.values()) == [pytest.approx([2e-3, 3e-2]), pytest.approx([3e-4, 7e-3])]
