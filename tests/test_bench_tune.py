"""bench/tune.py: the same budget for every method, the choice by A then F, resuming from finished cells."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import continual  # noqa: E402
import cp  # noqa: E402
import tune  # noqa: E402


def test_every_method_the_same_budget_on_real_knobs():
    assert set(tune.GRID) == set(cp.METHODS)
    budgets = {m: len(g) for m, g in tune.GRID.items() if m not in ("seq", "ti")}
    assert set(budgets.values()) == {6}, budgets
    for m, grid in tune.GRID.items():
        for setting in grid:
            cp.check_hparams(cp.Hparams(method=m, **setting))
        assert len({tune.cell_name(s) for s in grid}) == len(grid)
    assert not set(continual.SPLITS["tuning"]) & set(continual.SPLITS["evaluation"])


def fake_cell(root, method, setting, A, F, P=0.5):
    out = os.path.join(root, method, tune.cell_name(setting))
    os.makedirs(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"summary": {method: {"A": [A, 0], "F": [F, 0], "P": [P, 0]}}, "total_seconds": 60.0}, f)


def test_choice_by_a_then_lower_f_and_only_when_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "GRID", {"ewc": [{"ewc_lambda": v} for v in (1.0, 2.0, 3.0)],
                                       "clora": [{"clora_lambda": 1.0}, {"clora_lambda": 2.0}]})
    for v, A, F in ((1.0, 0.5, 0.3), (2.0, 0.6, 0.2), (3.0, 0.6, 0.1)):  # a tie on A: the lower F wins
        fake_cell(str(tmp_path), "ewc", {"ewc_lambda": v}, A, F)
    fake_cell(str(tmp_path), "clora", {"clora_lambda": 1.0}, 0.9, 0.0)  # half its grid: no choice yet
    table, chosen, missing = tune.report(str(tmp_path), ["ewc", "clora"])
    assert chosen == {"ewc": {"ewc_lambda": 3.0}} and missing == 1
    assert "| `ewc` | ewc_lambda=3 | 0.600 | 0.500 | 0.100 | 1 | **←** |" in table
    tune.main(["--out", str(tmp_path), "--report", "--methods", "ewc"])
    assert json.load(open(tmp_path / "chosen.json")) == {"ewc": {"ewc_lambda": 3.0}}
    assert "ewc_lambda=1" in (tmp_path / "README.md").read_text()


def test_flags_round_trip_through_the_benchmark_parser():
    setting = {"dsc_steps": 25, "ewc_lambda": 0.1}
    args = continual.parse_args(tune.flags(setting))
    assert (args.dsc_steps, args.ewc_lambda) == (25, 0.1)
