"""bench/tune.py: the same budget for every method, no choice from one seed, design choices at the chosen cells,
presets written only from a finished protocol, resuming from finished cells, a SIGTERM reaching the cells."""
import os
import shutil
import signal
import sys

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
    for key, (other, compared, concerns) in tune.CHOICES.items():
        assert other != tune.BASE[key] and set(compared) <= set(concerns) <= set(cp.METHODS)
    assert not set(continual.SPLITS["tuning"]) & set(continual.SPLITS["evaluation"])


def test_the_combinations_start_from_dscs_chosen_cell_with_the_choices_decided(tmp_path):
    root = str(tmp_path)
    combo = lambda: [c for c in tune.plan(root, ["dsc", "dsc-ewc"])[0] if c[0] == "dsc-ewc"]
    assert combo() == []
    for w in tune.W_H:
        fake_cell(root, "dsc", {"dsc_w_h": w}, [0.9 if w == 0.3 else 0.5 if w == 1.0 else 0.1])
    fake_cell(root, "dsc", {"dsc_w_h": 0.3}, [0.9, 0.1, 0.1])  # the best coarse cell, not confirmed
    fake_cell(root, "dsc", {"dsc_w_h": 1.0}, [0.5] * 3)
    assert tune.plan(root, ["dsc"])[1] == {"dsc": {"dsc_w_h": 1.0}}
    assert combo() == []  # dsc's design choices are not decided yet
    fake_cell(root, "dsc", {"dsc_w_h": 1.0, "dc_temp": 0.01}, [0.1] * 3)
    fake_cell(root, "dsc", {"dsc_w_h": 1.0, "dsc_first": "base"}, [0.95] * 3)
    assert combo() == []  # dsc_targets is not decided yet
    fake_cell(root, "dsc", {"dsc_w_h": 1.0, "dsc_targets": "column"}, [0.6] * 3)
    assert tune.plan(root, ["dsc"])[2] == {"dc_temp": "auto", "dsc_first": "base", "dsc_targets": "column"}
    assert combo() == []  # both won apart: the cell with both runs first
    fake_cell(root, "dsc", {"dsc_w_h": 1.0, "dsc_first": "base", "dsc_targets": "column"}, [0.7] * 3)
    assert tune.plan(root, ["dsc", "dsc-ewc"])[2] == {"dc_temp": "auto", "dsc_first": "base", "dsc_targets": "paper"}
    grid = [{"ewc_lambda": v, "dsc_w_h": w, "dsc_first": "base"} for v in tune.COMBO_LAMBDAS for w in (0.3, 1.0)]
    assert combo() == [("dsc-ewc", s, 1) for s in grid]
    for s in grid:  # the best at w_h's upper edge and inside λ's: w_h is not extended (it is dsc's), λ need not be
        fake_cell(root, "dsc-ewc", s, [0.9 if s["dsc_w_h"] == 1.0 and s["ewc_lambda"] == 0.01 else 0.2])
    assert [c for c in combo() if c[2] == 1] == [("dsc-ewc", s, 1) for s in grid]
    with pytest.raises(SystemExit, match="add dsc"):
        tune.main(["--out", root, "--report", "--methods", "dsc-ewc"])


def fake_cell(root, method, setting, accs, orders=tune.ORDERS):
    """A finished cell whose seed s has A = accs[s] (F = 1 − A, P = 0.5) in each of `orders`."""
    for order in orders:
        out = os.path.join(tune.cell_dir(root, method, setting), order)
        os.makedirs(out, exist_ok=True)
        runs = [{"seed": s, "A": a, "F": 1 - a, "P": 0.5, "tasks": [{"seconds": 60.0}], "acc": [[0.5, a], [None, 0.5]]}
                for s, a in enumerate(accs)]
        continual.write_json(os.path.join(out, "results.json"), {"runs": {method: runs}, "seeds": len(accs)})


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(tune, "GRID", {"seq": [{}], "ewc": [{"ewc_lambda": v} for v in (1.0, 2.0, 3.0)],
                                       "dsc": [{"dsc_w_h": v} for v in (0.1, 0.2)]})
    monkeypatch.setattr(tune, "CHOICES", {"fisher_norm": ("task", ("ewc",), ("ewc",)),
                                          "dsc_first": ("base", ("dsc",), ("dsc",))})
    monkeypatch.setattr(tune, "TOP", 2)
    monkeypatch.setattr(tune, "EXTEND", 0)


def test_stages_follow_each_other_and_no_choice_rests_on_one_seed(tmp_path, small_grid):
    root = str(tmp_path)
    cells, chosen, decided = tune.plan(root, ["seq", "ewc"])
    assert cells == [("seq", {}, 3)] + [("ewc", {"ewc_lambda": v}, 1) for v in (1.0, 2.0, 3.0)] and not chosen
    for v, a in ((1.0, 0.2), (2.0, 0.6), (3.0, 0.5)):
        fake_cell(root, "ewc", {"ewc_lambda": v}, [a])
    cells, chosen, _ = tune.plan(root, ["ewc"])
    assert cells[3:] == [("ewc", {"ewc_lambda": 2.0}, 3), ("ewc", {"ewc_lambda": 3.0}, 3)] and not chosen
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.6, 0.1, 0.1])  # seed 0 was lucky
    fake_cell(root, "ewc", {"ewc_lambda": 3.0}, [0.5, 0.4, 0.4])
    cells, chosen, decided = tune.plan(root, ["ewc"])
    assert chosen == {"ewc": {"ewc_lambda": 3.0}}  # the mean over three seeds decides
    assert cells[-1] == ("ewc", {"ewc_lambda": 3.0, "fisher_norm": "task"}, 3) and not decided
    fake_cell(root, "ewc", {"ewc_lambda": 3.0, "fisher_norm": "task"}, [0.5, 0.4, 0.3])
    assert tune.plan(root, ["ewc"])[2] == {"fisher_norm": "total"}  # lower: the grid's value stays
    fake_cell(root, "ewc", {"ewc_lambda": 3.0, "fisher_norm": "task"}, [0.5, 0.4, 0.5])
    assert tune.plan(root, ["ewc"])[2] == {"fisher_norm": "task"}


def test_ties_on_a_go_to_the_lower_f():
    runs = lambda a, f: [{"seed": 0, "A": a, "F": f, "P": 0.5, "tasks": []}]
    assert tune.best([("x", runs(0.5, 0.3)), ("y", runs(0.5, 0.1)), ("z", runs(0.4, 0.0))])[0][0] == "y"


def test_presets_written_only_when_every_stage_is_finished(tmp_path, small_grid):
    root, presets = str(tmp_path / "cells"), str(tmp_path / "presets.json")
    shutil.copy(train.PRESETS_FILE, presets)
    before = open(presets).read()
    fake_cell(root, "seq", {}, [0.3, 0.3, 0.3])
    for v in (0.1, 0.2):
        fake_cell(root, "dsc", {"dsc_w_h": v}, [0.4 + v, 0.4, 0.4])
    args = ["--out", root, "--report", "--methods", "seq,dsc", "--presets", presets]
    tune.main(args)
    assert open(presets).read() == before  # dsc_first not decided yet
    assert "1 cells of the stages started so far not finished yet" in open(os.path.join(root, "README.md")).read()
    fake_cell(root, "dsc", {"dsc_w_h": 0.2, "dsc_first": "base"}, [0.2, 0.2, 0.2])
    tune.main(args)
    written, shipped = train.load_presets(presets), train.load_presets()
    others = {m: v for m, v in shipped["methods"].items() if m not in ("seq", "dsc")}  # not tuned here: left alone
    assert others and written["methods"] == {**others, "seq": {}, "dsc": {"dsc_w_h": 0.2, "dsc_first": "none",
                                                                           "dsc_steps": 100}}
    assert written["default_method"] == "dsc" and written["models"] == shipped["models"]
    assert "dsc 0.467" in written["source"] and "seq 0.300" in written["source"]
    assert ", ".join(others) + ": not in --methods, as they were" in written["source"]
    tune.main(args)  # written again: the same file
    assert train.load_presets(presets) == written


def test_flags_round_trip_through_the_benchmark_parser():
    setting = {**tune.BASE, "dsc_steps": 25, "ewc_lambda": 0.1, "dc_temp": 0.01}
    args = continual.parse_args(tune.flags(setting))
    assert (args.dsc_steps, args.ewc_lambda, args.fisher_norm, args.dsc_first) == (25, 0.1, "total", "none")
    assert cp.fixed_temp(cp.Hparams(dc_temp=args.dc_temp)) == 0.01
    assert cp.fixed_temp(cp.Hparams(dc_temp=continual.parse_args(tune.flags(tune.BASE)).dc_temp)) is None


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
    assert tune.finished(tune.cell_dir(root, "ewc", {"ewc_lambda": 4.5}), "ewc") is None  # one order missing
    fake_cell(root, "ewc", {"ewc_lambda": 4.5}, [0.6])
    assert tune.plan(root, ["ewc"])[0][-1] == ("ewc", {"ewc_lambda": 6.75}, 1)
    fake_cell(root, "ewc", {"ewc_lambda": 6.75}, [0.7])
    cells = tune.plan(root, ["ewc"])[0]  # EXTEND reached: the two best go on to their confirmation
    assert ("ewc", {"ewc_lambda": 10.1}, 1) not in cells and cells[-2:] == [("ewc", {"ewc_lambda": 6.75}, 3),
                                                                            ("ewc", {"ewc_lambda": 4.5}, 3)]
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.4], orders=tune.ORDERS[:1])
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.8], orders=tune.ORDERS[1:])  # the other order's run counts too
    assert tune.score(tune.finished(tune.cell_dir(root, "ewc", {"ewc_lambda": 2.0}), "ewc"))[0] == pytest.approx(0.6)
    assert tune.extended([{"w": 0.1}, {"w": 0.3}], {"w": 0.1}) == [{"w": 0.1}, {"w": 0.3}, {"w": 0.0333}]


def test_two_choices_that_win_apart_run_together_before_the_preset(tmp_path, small_grid, monkeypatch):
    monkeypatch.setattr(tune, "CHOICES", {"dsc_first": ("base", ("dsc",), ("dsc",)),
                                          "dsc_targets": ("column", ("dsc",), ("dsc",))})
    root, presets = str(tmp_path / "cells"), str(tmp_path / "presets.json")
    shutil.copy(train.PRESETS_FILE, presets)
    before = open(presets).read()
    for v in (0.1, 0.2):
        fake_cell(root, "dsc", {"dsc_w_h": v}, [0.4 + v, 0.4, 0.4])
    fake_cell(root, "dsc", {"dsc_w_h": 0.2, "dsc_first": "base"}, [0.7] * 3)
    fake_cell(root, "dsc", {"dsc_w_h": 0.2, "dsc_targets": "column"}, [0.6] * 3)
    both = {"dsc_w_h": 0.2, "dsc_first": "base", "dsc_targets": "column"}
    cells, _, decided = tune.plan(root, ["dsc"])
    assert decided == {"dsc_first": "base", "dsc_targets": "column"} and cells[-1] == ("dsc", both, 3)
    args = ["--out", root, "--report", "--methods", "dsc", "--presets", presets]
    tune.main(args)
    assert open(presets).read() == before  # the preset's own cell has not run yet
    fake_cell(root, "dsc", both, [0.75] * 3)
    tune.main(args)
    written = train.load_presets(presets)
    assert written["methods"]["dsc"] == {**both, "dsc_steps": 100} and "dsc 0.750" in written["source"]
    fake_cell(root, "dsc", both, [0.65] * 3)  # below base alone (0.7): the two do not add up, base alone is kept
    assert tune.plan(root, ["dsc"])[2] == {"dsc_first": "base", "dsc_targets": "paper"}
    tune.main(args)
    written = train.load_presets(presets)
    assert written["methods"]["dsc"] == {"dsc_w_h": 0.2, "dsc_first": "base", "dsc_targets": "paper",
                                         "dsc_steps": 100} and "dsc 0.700" in written["source"]


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
    assert tune.finished(tune.cell_dir(root, "seq", {}), "seq", 3) and "cells of the stages" in out


def test_a_confirmed_choice_at_an_edge_looks_past_it_at_every_seed(tmp_path, small_grid, monkeypatch):
    root = str(tmp_path)
    monkeypatch.setattr(tune, "EXTEND", 2)
    for v, a in ((1.0, 0.2), (2.0, 0.6), (3.0, 0.5)):  # the best coarse cell lies inside the grid
        fake_cell(root, "ewc", {"ewc_lambda": v}, [a])
    fake_cell(root, "ewc", {"ewc_lambda": 2.0}, [0.6, 0.1, 0.1])
    fake_cell(root, "ewc", {"ewc_lambda": 3.0}, [0.5, 0.4, 0.4])  # the choice lies at the edge
    cells, chosen, _ = tune.plan(root, ["ewc"])
    assert cells[-1] == ("ewc", {"ewc_lambda": 4.5}, 3) and not chosen
    fake_cell(root, "ewc", {"ewc_lambda": 4.5}, [0.5, 0.5, 0.4])
    cells, chosen, _ = tune.plan(root, ["ewc"])
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
