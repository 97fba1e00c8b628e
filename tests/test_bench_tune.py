"""bench/tune.py: the same budget for every method, no choice from one seed, the combinations after `dsc`'s choice,
presets written only from a finished protocol, only the runs of the cell's values and today's knobs counted,
resuming from finished cells, a SIGTERM reaching the cells."""
import argparse
import os
import shutil
import signal
import sys
from dataclasses import asdict

import pytest

from conftest import ROOT, sigterm_after_children

sys.path.insert(0, os.path.join(ROOT, "bench"))
import continual  # noqa: E402
import cp  # noqa: E402
import train  # noqa: E402
import tune  # noqa: E402


def test_every_method_the_same_budget_at_most_half_a_decade_apart():
    grids = {**tune.GRID, **{m: tune.combo_grid(w) for m in tune.COMBOS for w in tune.W_H}}
    assert set(grids) == set(cp.METHODS)
    assert {m: len(g) for m, g in grids.items() if m not in ("seq", "ti")} == \
        {m: tune.COARSE for m in cp.METHODS if m not in ("seq", "ti")}
    for w in tune.W_H:  # the combinations' w_h: dsc's chosen value and the step below it
        assert {s["dsc_w_h"] for s in tune.combo_grid(w)} == {w, tune.W_H[tune.W_H.index(w) - 1]} if w != tune.W_H[0] \
            else {0.00333, 0.01}  # below the grid: its first step repeated
    assert {s["dsc_w_h"] for s in tune.combo_grid(0.00333, (0.00333,) + tune.W_H)} == {0.00111, 0.00333}
    for m, grid in grids.items():
        for setting in grid:
            cp.check_hparams(cp.Hparams(method=m, **{**tune.BASE, **setting}))
        assert len({tune.cell_name(s) for s in grid}) == len(grid)
        for knob in {k for s in grid for k in s}:
            values = sorted({s[knob] for s in grid})
            assert all(b / a <= 10 / 3 + 1e-9 for a, b in zip(values, values[1:])), (m, knob, values)
    assert not set(tune.BASE) & {k for grid in grids.values() for s in grid for k in s}  # not in any cell's name
    assert not set(continual.SPLITS["tuning"]) & set(continual.SPLITS["evaluation"])


def test_the_combinations_start_once_dsc_is_chosen_from_its_chosen_w_h(tmp_path):
    root = str(tmp_path)
    combo = lambda: [c for c in tune.plan(root, ["dsc", "dsc-ewc"])[0] if c[0] == "dsc-ewc"]
    assert combo() == []
    for w in tune.W_H:
        fake_cell(root, "dsc", {"dsc_w_h": w}, [0.9 if w == 0.3 else 0.5 if w == 1.0 else 0.1])
    fake_cell(root, "dsc", {"dsc_w_h": 0.3}, [0.9, 0.1, 0.1])  # the best coarse cell, not confirmed
    assert combo() == []  # dsc is not chosen yet
    fake_cell(root, "dsc", {"dsc_w_h": 1.0}, [0.5] * 3)
    assert tune.plan(root, ["dsc"])[1] == {"dsc": {"dsc_w_h": 1.0}}
    grid = [{"ewc_lambda": v, "dsc_w_h": w} for v in tune.COMBO_LAMBDAS for w in (0.3, 1.0)]
    assert combo() == [("dsc-ewc", s, 1) for s in grid]
    for s in grid:  # the best at w_h's upper edge and inside λ's: w_h is not extended (it is dsc's), λ need not be
        fake_cell(root, "dsc-ewc", s, [0.9 if s["dsc_w_h"] == 1.0 and s["ewc_lambda"] == 0.01 else 0.2])
    assert [c for c in combo() if c[2] == 1] == [("dsc-ewc", s, 1) for s in grid]
    with pytest.raises(SystemExit, match="add dsc"):
        tune.main(["--out", root, "--report", "--methods", "dsc-ewc"])


def fake_cell(root, method, setting, accs, orders=tune.ORDERS, recorded=None):
    """A finished cell whose seed s has A = accs[s] (F = 1 − A, P = 0.5) in each of `orders`; each run records the
    hparams the cell runs (as bench/continual.py does), with `recorded` over them."""
    for order in orders:
        out = os.path.join(tune.cell_dir(root, method, setting), order)
        os.makedirs(out, exist_ok=True)
        hp = lambda s: {**asdict(cp.Hparams(method=method, seed=s, **{**tune.BASE, **setting})), **(recorded or {})}
        runs = [{"seed": s, "hparams": hp(s), "A": a, "F": 1 - a, "P": 0.5, "tasks": [{"seconds": 60.0}],
                 "acc": [[0.5, a], [None, 0.5]]} for s, a in enumerate(accs)]
        continual.write_json(os.path.join(out, "results.json"), {"runs": {method: runs}, "seeds": len(accs)})


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(tune, "GRID", {"seq": [{}], "ewc": [{"ewc_lambda": v} for v in (1.0, 2.0, 3.0)],
                                       "dsc": [{"dsc_w_h": v} for v in (0.1, 0.2)]})
    monkeypatch.setattr(tune, "TOP", 2)
    monkeypatch.setattr(tune, "EXTEND", 0)


def test_stages_follow_each_other_and_no_choice_rests_on_one_seed(tmp_path, small_grid):
    root = str(tmp_path)
    cells, chosen = tune.plan(root, ["seq", "ewc"])
    assert cells == [("seq", {}, 3)] + [("ewc", {"ewc_lambda": v}, 1) for v in (1.0, 2.0, 3.0)] and not chosen
    for v, a in ((1.0, 0.2), (2.0, 0.6), (3.0, 0.5)):
        fake_cell(root, "ewc", {"ewc_lambda": v}, [a])
    cells, chosen = tune.plan(root, ["ewc"])
    confirm = [("ewc", {"ewc_lambda": 2.0}, 3), ("ewc", {"ewc_lambda": 3.0}, 3)]
    assert cells[3:] == confirm and not chosen
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.6, 0.1, 0.1])  # seed 0 was lucky
    fake_cell(root, "ewc", {"ewc_lambda": 3.0}, [0.5, 0.4, 0.4])
    cells, chosen = tune.plan(root, ["ewc"])
    assert chosen == {"ewc": {"ewc_lambda": 3.0}}  # the mean over three seeds decides
    assert cells[3:] == confirm  # and nothing runs after the choice


def test_ties_on_a_go_to_the_lower_f():
    runs = lambda a, f: [{"seed": 0, "A": a, "F": f, "P": 0.5, "tasks": []}]
    assert tune.best([("x", runs(0.5, 0.3)), ("y", runs(0.5, 0.1)), ("z", runs(0.4, 0.0))])[0][0] == "y"


def test_presets_written_only_when_every_stage_is_finished(tmp_path, small_grid):
    root, presets = str(tmp_path / "cells"), str(tmp_path / "presets.json")
    shutil.copy(train.PRESETS_FILE, presets)
    before = open(presets).read()
    fake_cell(root, "seq", {}, [0.3, 0.3, 0.3])
    for v in (0.1, 0.2):
        fake_cell(root, "dsc", {"dsc_w_h": v}, [0.4 + v])
    args = ["--out", root, "--report", "--methods", "seq,dsc", "--presets", presets]
    tune.main(args)
    assert open(presets).read() == before  # dsc's confirmation has not run
    readme = open(os.path.join(root, "README.md")).read()
    assert "2 cells of the stages started so far not finished yet." in readme and "not counted" not in readme
    fake_cell(root, "dsc", {"dsc_w_h": 0.1}, [0.5, 0.4, 0.4])
    tune.main(args)
    assert open(presets).read() == before  # one of the two still has not
    fake_cell(root, "dsc", {"dsc_w_h": 0.2}, [0.6, 0.4, 0.4])
    tune.main(args)
    written, shipped = train.load_presets(presets), train.load_presets()
    others = {m: v for m, v in shipped["methods"].items() if m not in ("seq", "dsc")}  # not tuned here: left alone
    assert others and written["methods"] == {**others, "seq": {}, "dsc": {"dsc_w_h": 0.2, "dsc_steps": 100}}
    assert written["default_method"] == "dsc" and written["models"] == shipped["models"]
    assert "dsc 0.467" in written["source"] and "seq 0.300" in written["source"]
    assert ", ".join(others) + ": not in --methods, as they were" in written["source"]
    tune.main(args)  # written again: the same file
    assert train.load_presets(presets) == written


def test_flags_round_trip_through_the_benchmark_parser():
    setting = {**tune.BASE, "ewc_lambda": 8.1e-05, "dsc_w_h": 0.00333, "dc_temp": 0.02, "clora_lambda": 300.0}
    args = continual.parse_args(tune.flags(setting))
    assert {k: getattr(args, k) for k in setting} == setting  # what the cell runs is what its name and ran_as say
    assert all(type(getattr(args, k)) is type(v) for k, v in setting.items())


def test_share_kept_of_earlier_concepts_by_hand_and_the_tradeoff_picture(tmp_path, small_grid):
    acc = [[0.8, 0.4, 0.2], [None, 0.6, 0.3], [None, None, 0.9]]  # the last concept does not count
    assert tune.kept([{"acc": acc}]) == pytest.approx((0.2 + 0.3) / (0.8 + 0.6))
    assert tune.kept([{"acc": acc}, {"acc": [[0.0, 0.0], [None, 1.0]]}]) == pytest.approx(((0.5 / 1.4) + 0) / 2)
    fake_cell(str(tmp_path), "seq", {}, [0.3, 0.3, 0.3])
    fake_cell(str(tmp_path), "dsc", {"dsc_w_h": 0.1}, [0.5], orders=tune.ORDERS[:1])
    fake_cell(str(tmp_path), "dsc", {"dsc_w_h": 0.1}, [0.2], orders=tune.ORDERS[1:])
    fake_cell(str(tmp_path), "dsc", {"dsc_w_h": 0.2}, [0.3])
    table = tune.report(str(tmp_path), ["seq", "dsc"])[0]
    assert "| `seq` | defaults | 3 × 2 | 0.300 ± 0.000 | — | 0.500 | 0.700 | 0.60 |" in table
    assert "| `dsc` | dsc_w_h=0.1 | 1 × 2 | 0.350 ± 0.150 | +0.050 | 0.500 |" in table  # (+0.2 − 0.1) / 2
    assert (tmp_path / "tradeoff.png").exists()


def test_a_best_cell_at_an_edge_of_the_grid_extends_it_and_both_orders_count(tmp_path, small_grid, monkeypatch):
    root = str(tmp_path)
    monkeypatch.setattr(tune, "EXTEND", 2)
    for v, a in ((1.0, 0.2), (2.0, 0.4), (3.0, 0.5)):
        fake_cell(root, "ewc", {"ewc_lambda": v}, [a])
    assert tune.plan(root, ["ewc"])[0][-1] == ("ewc", {"ewc_lambda": 4.5}, 1)  # past 3, the step 3/2 repeated
    fake_cell(root, "ewc", {"ewc_lambda": 4.5}, [0.6], orders=tune.ORDERS[:1])
    assert tune.finished(root, "ewc", {"ewc_lambda": 4.5}) is None  # one order missing
    fake_cell(root, "ewc", {"ewc_lambda": 4.5}, [0.6])
    assert tune.plan(root, ["ewc"])[0][-1] == ("ewc", {"ewc_lambda": 6.75}, 1)
    fake_cell(root, "ewc", {"ewc_lambda": 6.75}, [0.7])
    cells = tune.plan(root, ["ewc"])[0]  # EXTEND reached: the two best go on to their confirmation
    assert ("ewc", {"ewc_lambda": 10.1}, 1) not in cells and cells[-2:] == [("ewc", {"ewc_lambda": 6.75}, 3),
                                                                            ("ewc", {"ewc_lambda": 4.5}, 3)]
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.4], orders=tune.ORDERS[:1])
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.8], orders=tune.ORDERS[1:])  # the other order's run counts too
    assert tune.score(tune.finished(root, "ewc", {"ewc_lambda": 2.0}))[0] == pytest.approx(0.6)
    assert tune.extended([{"w": 0.1}, {"w": 0.3}], {"w": 0.1}) == [{"w": 0.1}, {"w": 0.3}, {"w": 0.0333}]


def test_runs_of_other_knobs_or_values_are_not_counted_nor_written_into_presets(tmp_path, small_grid):
    root, presets = str(tmp_path / "cells"), str(tmp_path / "presets.json")
    shutil.copy(train.PRESETS_FILE, presets)
    before = open(presets).read()
    earlier = {"fisher_norm": "total", "dc_temp": "auto", "dsc_first": "none", "dsc_targets": "paper"}
    fake_cell(root, "seq", {}, [0.3] * 3, recorded=earlier)  # an earlier tune.py's cells, under the same names
    for v in (0.1, 0.2):
        fake_cell(root, "dsc", {"dsc_w_h": v}, [0.4 + v] * 3, recorded=earlier)
    args = ["--out", root, "--report", "--methods", "seq,dsc", "--presets", presets]
    tune.main(args)
    assert tune.finished(root, "seq", {}, 3) is None and tune.plan(root, ["seq", "dsc"])[1] == {}
    assert open(presets).read() == before
    readme = open(os.path.join(root, "README.md")).read()
    assert "3 cells of the stages started so far not finished yet; 18 runs in their folders ran other values or " \
           "knobs than these cells" in readme and "| `seq` |" not in readme
    fake_cell(root, "seq", {}, [0.3] * 3)
    fake_cell(root, "dsc", {"dsc_w_h": 0.1}, [0.5] * 3, recorded={"dsc_steps": 25})  # another BASE
    fake_cell(root, "dsc", {"dsc_w_h": 0.2}, [0.6] * 3)
    tune.main(args)
    assert open(presets).read() == before and tune.finished(root, "dsc", {"dsc_w_h": 0.1}) is None
    readme = open(os.path.join(root, "README.md")).read()
    assert "1 cells of the stages started so far not finished yet; 6 runs" in readme
    fake_cell(root, "dsc", {"dsc_w_h": 0.1}, [0.5] * 3)
    tune.main(args)
    assert train.load_presets(presets)["methods"]["dsc"] == {"dsc_w_h": 0.2, "dsc_steps": 100}
    assert not tune.ran_as({"seed": 0, "A": 0.5}, {})  # a run that recorded no hparams


def test_a_failed_cell_does_not_stop_the_others(tmp_path, small_grid, monkeypatch, capsys):
    root = str(tmp_path)

    def run_cell(method, setting, seeds, order, args):  # λ 2 fails in both orders; every other cell finishes
        if setting == {"ewc_lambda": 2.0}:
            return 1
        fake_cell(root, method, setting, [0.5] * seeds, orders=(order,))
        return 0
    monkeypatch.setattr(tune, "run_cell", run_cell)
    tune.main(["--out", root, "--methods", "seq,ewc", "--presets", "none"])
    out = capsys.readouterr().out
    assert out.count("FAILED ewc ewc_lambda=2") == 2 and "finished ewc ewc_lambda=3" in out
    assert tune.finished(root, "seq", {}, 3) and "cells of the stages" in out


def test_a_cell_that_ends_well_without_the_cells_runs_fails(tmp_path, monkeypatch):
    root, recorded = str(tmp_path), [{"fisher_norm": "total"}]

    class Cell:  # bench/continual.py that ends well, leaving runs that record `recorded`
        def __init__(self, cmd, **kw):
            fake_cell(root, "seq", {}, [0.3], orders=("forward",), recorded=recorded[0])

        def wait(self):
            return 0
    monkeypatch.setattr(tune.subprocess, "Popen", Cell)
    args = argparse.Namespace(out=root, model=os.path.join(ROOT, "toy", "model"), adapter="lora")
    assert tune.run_cell("seq", {}, 1, "forward", args) == 1  # else it would only be run again
    log = open(os.path.join(tune.cell_dir(root, "seq", {}), "forward", "log.txt")).read()
    assert "lacks runs of seeds 0-0 that ran dsc_steps=100 with the knobs cp.Hparams has now" in log
    recorded[0] = {}
    assert tune.run_cell("seq", {}, 1, "forward", args) == 0


def test_a_confirmed_choice_at_an_edge_looks_past_it_at_every_seed(tmp_path, small_grid, monkeypatch):
    root = str(tmp_path)
    monkeypatch.setattr(tune, "EXTEND", 2)
    for v, a in ((1.0, 0.2), (2.0, 0.6), (3.0, 0.5)):  # the best coarse cell lies inside the grid
        fake_cell(root, "ewc", {"ewc_lambda": v}, [a])
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.6, 0.1, 0.1])
    fake_cell(root, "ewc", {"ewc_lambda": 3.0}, [0.5, 0.4, 0.4])  # the choice lies at the edge
    cells, chosen = tune.plan(root, ["ewc"])
    assert cells[-1] == ("ewc", {"ewc_lambda": 4.5}, 3) and not chosen
    fake_cell(root, "ewc", {"ewc_lambda": 4.5}, [0.5, 0.5, 0.4])
    cells, chosen = tune.plan(root, ["ewc"])
    assert cells[-1] == ("ewc", {"ewc_lambda": 6.75}, 3) and not chosen
    fake_cell(root, "ewc", {"ewc_lambda": 6.75}, [0.3, 0.3, 0.3])
    assert tune.plan(root, ["ewc"])[1] == {"ewc": {"ewc_lambda": 4.5}}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the cell processes through /proc")
def test_sigterm_ends_the_running_cells_too(tiny_model_dir, tmp_path):
    returncode, left = sigterm_after_children([sys.executable, "bench/tune.py", "--methods", "clora", "--jobs", "2",
                                               "--model", tiny_model_dir, "--out", str(tmp_path), "--presets",
                                               "none"], b"continual.py", 2)
    assert not left  # each cell would run its whole sequence: minutes
    assert returncode == 128 + signal.SIGTERM
