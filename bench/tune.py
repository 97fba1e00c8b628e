"""Tune every method the same way, on the tuning concepts only (bench/RESULTS.md, "Protocol").

A cell is one setting run by bench/continual.py on the tuning sequence (`--split tuning`, 5 tasks) in both ORDERS
(the concepts as listed and reversed), for one or more seeds; its score is the mean over its runs. Three stages, each
started as soon as what it needs is finished:

 1. coarse: every method with a knob gets the same budget, the COARSE settings of GRID[method] (steps of 1, 3, 10:
    at most half a decade apart), seed 0. A best cell at an edge of the grid extends it: one more setting past that
    edge, the edge's step repeated (`extended`), until the best lies inside (at most EXTEND more).
    `seq` and `ti` have no knob: one cell, three seeds.
 2. confirm: each method's TOP coarse cells (by A, then the lower F) again with seeds 1 and 2; the method's choice is
    the one with the higher mean A over the three seeds. No choice rests on a single seed. A choice at an edge of
    the grid extends it as in stage 1, the new setting run at every seed, until the choice lies inside.
 3. the DSC combinations (COMBOS) go through stages 1 and 2 once `dsc` is chosen: their grid crosses COMBO_LAMBDAS
    with `dsc`'s chosen w_h and the step below it (combo_grid), and only λ is extended.

Every cell runs BASE and the setting it varies over cp.Hparams' defaults, nothing of presets.json (`--no-presets`).
A cell counts only the runs that recorded those values and the knobs cp.Hparams has now (`ran_as`): a folder made
with other knobs, by an earlier tune.py, is reported as not finished and never written into presets.json. The
evaluation concepts and their renders are never touched here.

    python bench/tune.py --jobs 2          # every cell not yet on disk (resumable: finished cells are kept)
    python bench/tune.py --report          # only rewrite the table (and presets.json once everything is finished)
    python bench/tune.py --adapter vera --methods seq,ewc,ewc-dc --out bench/tuning-vera --presets none

Writes <out>/<method>/<setting>/<order>/results.json per cell (bench/continual.py's output), <out>/README.md
(every cell, mean ± std over its runs, the choices) and, once every stage is finished, the "methods",
"default_method" (the highest mean A over three seeds among --methods: a method left out, tuned another time, is
not compared) and "source" of presets.json, which `train.py --method X` then runs; a method left out of --methods
keeps its values there.
"""
import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import fields

from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cp  # noqa: E402
import train  # noqa: E402
from continual import PALETTE  # noqa: E402

CELLS, STOPPING = set(), []  # the cells' processes running now; [signum] once a SIGTERM came (stop)
COARSE, TOP, SEEDS, EXTEND = 8, 2, 3, 6  # EXTEND: most settings added past a grid's edges
ORDERS = ("forward", "reverse")
LAMBDAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # λ on a Fisher of mean 1 (cp.fisher_diagonal)
W_H = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # w_h of τ·H: a ratio to L_denoise (cp.py's docstring)
GRID = {
    "seq": [{}],
    "ti": [{}],
    "clora": [{"clora_lambda": v} for v in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)],
    "ewc": [{"ewc_lambda": v} for v in LAMBDAS],
    "ewc-dc": [{"ewc_lambda": v} for v in LAMBDAS],
    "ewc-l2": [{"ewc_lambda": v} for v in LAMBDAS],
    "merge": [{"rank": r} for r in (2, 3, 4, 6, 8, 12, 16, 24)],  # the rank of each LoRA and of their merge
    "dsc": [{"dsc_w_h": v} for v in W_H],
}
# two knobs, the same budget: λ over the middle of LAMBDAS × w_h at `dsc`'s chosen value and the step below it
# (adding EWC costs plasticity already; this axis is not extended), so these grids start once `dsc` is chosen
COMBO_LAMBDAS = (0.003, 0.01, 0.03, 0.1)
COMBOS = ("dsc-ewc", "dsc-ewc-dc")
# run by every cell (not in its name) and written into every DSC method's preset: 100 consolidation steps, which
# beat 25 in an earlier grid
BASE = {"dsc_steps": 100}
KNOBS = {f.name for f in fields(cp.Hparams)}  # what each run records (bench/continual.py: its cp.Hparams)


def combo_grid(w_chosen, ran=W_H):
    """The combinations' grid: COMBO_LAMBDAS × (the step below w_chosen among the w_h `dsc` ran, w_chosen); below
    the lowest, the step above it repeated, as `extended` does."""
    below = [w for w in sorted(ran) if w < w_chosen]
    step = below[-1] if below else float(f"{w_chosen ** 2 / min(w for w in ran if w > w_chosen):.3g}")
    return [{"ewc_lambda": v, "dsc_w_h": w} for v in COMBO_LAMBDAS for w in (step, w_chosen)]


def cell_name(setting):
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "defaults"


def flags(setting):
    return [x for k, v in setting.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def cell_dir(root, method, setting):
    return os.path.join(root, method, cell_name(setting))


def ran_as(run, setting):
    """Whether a run recorded the cell's values (BASE and setting) among exactly the knobs cp.Hparams has now: a run
    of code with other knobs, or of another BASE, is not the cell's."""
    hp = run.get("hparams") or {}
    return set(hp) == KNOBS and all(hp[k] == v for k, v in {**BASE, **setting}.items())


def recorded(root, method, setting, order):
    """The runs of `method` in one order of a cell (bench/continual.py writes each run as it finishes), [] before
    any."""
    path = os.path.join(cell_dir(root, method, setting), order, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["runs"].get(method, [])


def order_runs(root, method, setting, order, seeds=1):
    """One order's runs of seeds 0 .. seeds−1 that ran the cell (ran_as), or None while any of them is missing."""
    runs = [r for r in recorded(root, method, setting, order) if r["seed"] < seeds and ran_as(r, setting)]
    return sorted(runs, key=lambda r: r["seed"]) if len(runs) == seeds else None


def finished(root, method, setting, seeds=1):
    """The cell's runs in every order (ORDERS) of seeds 0 .. seeds−1, or None while any of them is missing."""
    runs = [order_runs(root, method, setting, order, seeds) for order in ORDERS]
    return None if None in runs else [r for rs in runs for r in rs]


def extended(grid, top, fixed=()):
    """The grid with one more setting past each numeric knob (not in `fixed`) whose grid edge `top` (its best cell)
    lies at: the edge's step repeated, the other knobs as in `top`."""
    more = []
    for k, v in top.items():
        if k in fixed:
            continue
        values = sorted({s[k] for s in grid if isinstance(s.get(k), float)})
        if len(values) > 1 and v in (values[0], values[-1]):
            new = values[0] ** 2 / values[1] if v == values[0] else values[-1] ** 2 / values[-2]
            more.append({**top, k: float(f"{new:.3g}")})
    return grid + [s for s in more if s not in grid]


def score(runs):
    """(mean A, mean F, mean P, std A, minutes) over a cell's runs."""
    mean = lambda k: statistics.fmean(r[k] or 0.0 for r in runs)
    std = statistics.pstdev(r["A"] for r in runs)
    return mean("A"), mean("F"), mean("P"), std, sum(t["seconds"] for r in runs for t in r["tasks"]) / 60


def paired_to_seq(root, method, setting, seeds):
    """The mean over a cell's runs of its A minus `seq`'s at the same seed and order (None before `seq` has run)."""
    diffs = []
    for order in ORDERS:
        seq = order_runs(root, "seq", {}, order, SEEDS) or []
        own = order_runs(root, method, setting, order, seeds) or []
        diffs += [r["A"] - q["A"] for r in own for q in seq if q["seed"] == r["seed"]]
    return statistics.fmean(diffs) if diffs else None


def kept(runs):
    """The share of the earlier concepts that is kept: Σ_{i<N} acc_i(N) / Σ_{i<N} acc_i(i), mean over runs."""
    def one(acc):
        N = len(acc)
        learned = sum(acc[i][i] for i in range(N - 1))
        return sum(acc[i][N - 1] for i in range(N - 1)) / learned if learned else 0.0
    return statistics.fmean(one(r["acc"]) for r in runs)


def draw_tradeoff(points, path):
    """Every cell as a point: mean P (plasticity) across, the share of earlier concepts kept up; one colour a
    method. points: {method: [(P, kept), ...]}."""
    font = ImageFont.load_default()
    W, H, m = 560, 420, 44
    img = Image.new("RGB", (W + 150, H), "white")
    d = ImageDraw.Draw(img)
    px, py = lambda p: m + (W - 2 * m) * p, lambda k: H - m - (H - 2 * m) * min(k, 1.2) / 1.2
    d.rectangle([px(0), py(1.2), px(1), py(0)], outline="black")
    for v in (0, 0.25, 0.5, 0.75, 1):
        d.text((px(v) - 8, py(0) + 6), f"{v:.2f}", fill="black", font=font)
        d.text((6, py(v) - 5), f"{v:.2f}", fill="black", font=font)
    d.text((px(0.35), H - 16), "P: accuracy right after learning", fill="black", font=font)
    d.text((6, 6), "share of earlier concepts kept", fill="black", font=font)
    for c, (method, pts) in enumerate(points.items()):
        colour = PALETTE[c % len(PALETTE)]
        for p, k in pts:
            d.ellipse([px(p) - 4, py(k) - 4, px(p) + 4, py(k) + 4], fill=colour)
        d.rectangle([W + 10, 20 + 16 * c, W + 22, 30 + 16 * c], fill=colour)
        d.text((W + 28, 18 + 16 * c), method, fill="black", font=font)
    img.save(path)


def best(cells):
    """[(setting, runs)] sorted by the higher mean A, then the lower mean F."""
    return sorted(cells, key=lambda c: (-round(score(c[1])[0], 6), round(score(c[1])[1], 6)))


def plan(root, methods):
    """Every cell whose inputs are finished, as [(method, setting, seeds)], and {method: chosen setting} so far."""
    cells, chosen, ran = [], {}, {}

    def tune(m, grid, fixed=()):  # stages 1 and 2 of one method
        first, size = SEEDS if len(grid) == 1 else 1, len(grid) + EXTEND

        def past_edge(grid, runs):  # the grid extended past its best cell's edge, or None (inside, or EXTEND spent)
            wider = extended(grid, best(runs)[0][0], fixed)
            return wider if len(grid) < len(wider) <= size else None

        while True:
            cells.extend((m, s, first) for s in grid if (m, s, first) not in cells)
            ran[m] = grid
            coarse = [(s, finished(root, m, s, first)) for s in grid]
            if not all(r for _, r in coarse):
                return
            wider = past_edge(grid, coarse)
            if not wider:
                break
            grid = wider
        top = [s for s, _ in best(coarse)[:TOP]]
        while True:  # a choice at an edge of the grid looks past it too, at every seed, within the same EXTEND
            cells.extend((m, s, SEEDS) for s in top if first < SEEDS and (m, s, SEEDS) not in cells)
            confirmed = [(s, finished(root, m, s, SEEDS)) for s in top]
            if not all(r for _, r in confirmed):
                return
            wider = past_edge(grid, confirmed)
            if not wider:
                break
            top, grid = top + [s for s in wider if s not in grid], wider
            ran[m] = grid
        chosen[m] = best(confirmed)[0][0]

    for m in methods:
        if m not in COMBOS:
            tune(m, GRID[m])
    for m in methods:  # stage 3: the combinations, once dsc is chosen
        if m in COMBOS and "dsc" in chosen:
            tune(m, combo_grid(chosen["dsc"]["dsc_w_h"], [s["dsc_w_h"] for s in ran["dsc"]]), fixed=("dsc_w_h",))
    return cells, chosen


def run_cell(method, setting, seeds, order, args):
    """One order of a cell: bench/continual.py in its own process, one thread; more seeds resume the earlier ones.
    Its exit status, or 1 where it ended well and yet left runs that are not the cell's (ran_as), which would only
    be run again."""
    out = os.path.join(cell_dir(args.out, method, setting), order)
    os.makedirs(out, exist_ok=True)
    # run from the repository root with relative paths, so the cell's records read the same on every machine
    cmd = [sys.executable, os.path.join("bench", "continual.py"), "--split", "tuning", "--order", order,
           "--seeds", str(seeds),
           "--methods", method, "--out", os.path.relpath(out, ROOT), "--model", os.path.relpath(args.model, ROOT),
           "--adapter", args.adapter, "--no-presets", "--quiet", "--resume", *flags({**BASE, **setting})]
    with open(os.path.join(out, "log.txt"), "a") as log:
        cell = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        CELLS.add(cell)
        if STOPPING:  # the signal came while this cell was starting: stop's loop may have missed it
            cell.terminate()
        try:
            returncode = cell.wait()
        finally:
            CELLS.discard(cell)
        if returncode == 0 and not order_runs(args.out, method, setting, order, seeds):
            log.write(f"bench/tune.py: {out}/results.json lacks runs of seeds 0-{seeds - 1} that ran "
                      f"{cell_name({**BASE, **setting})} with the knobs cp.Hparams has now\n")
            return 1
        return returncode


def stop(signum, frame):
    """SIGTERM (kill, a job scheduler): end the running cells too, each of which ends its own workers, then exit;
    without this the threads would wait on the cells, which would run on for hours with nobody to read them."""
    STOPPING.append(signum)
    for cell in list(CELLS):
        cell.terminate()
    sys.exit(128 + signum)


def presets_of(root, methods, chosen):
    """presets.json's "methods" and "default_method": each method's chosen setting (and BASE's dsc_steps where it
    consolidates); the default is the method with the highest mean A over three seeds at its chosen cell."""
    values, final_a = {}, {}
    for m in methods:
        values[m] = dict(chosen[m])
        if cp.Hparams(method=m).uses("dsc"):
            values[m]["dsc_steps"] = BASE["dsc_steps"]
        final_a[m] = score(finished(root, m, chosen[m], SEEDS))[0]
    return values, max(final_a, key=final_a.get), final_a


def report(root, methods):
    """The table of every cell planned so far, the choices, how many cells are not finished and how many runs on
    disk in them ran something else (not ran_as: not counted)."""
    cells, chosen = plan(root, methods)
    rows = ["| method | setting | seeds × orders | A ↑ (mean ± std over runs) | A − seq (paired) ↑ | P ↑ | F ↓ "
            "| kept ↑ | first ↑ | minutes (all runs) | |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missing, other, seen, points, commits = 0, 0, {}, {}, {}
    for m, setting, seeds in cells:  # a confirmed cell appears once, with its most seeds
        seen[(m, cell_name(setting))] = (m, setting, max(seeds, seen.get((m, cell_name(setting)), (0, 0, 0))[2]))
    for m, setting, seeds in seen.values():
        other += sum(not ran_as(r, setting) for order in ORDERS for r in recorded(root, m, setting, order))
        runs = finished(root, m, setting, seeds)
        if runs is None:
            missing += 1
            runs = finished(root, m, setting, 1)  # a confirmation under way: its first seed
            if runs is None:
                continue
        A, F, P, std, minutes = score(runs)
        mark = "**chosen**" if chosen.get(m) == setting and m not in ("seq", "ti") else ""
        first = statistics.fmean(r["acc"][0][0] for r in runs)
        paired = paired_to_seq(root, m, setting, len(runs) // len(ORDERS)) if m != "seq" else None
        rows.append(f"| `{m}` | {cell_name(setting)} | {len(runs) // len(ORDERS)} × {len(ORDERS)} | {A:.3f} ± "
                    f"{std:.3f} | {'—' if paired is None else f'{paired:+.3f}'} | {P:.3f} | {F:.3f} | "
                    f"{kept(runs):.2f} | {first:.2f} | {minutes:.0f} | {mark} |")
        for r in runs:
            commits[r.get("commit") or "not recorded"] = commits.get(r.get("commit") or "not recorded", 0) + 1
        points.setdefault(m, []).append((P, kept(runs)))
    if commits:
        rows.append("\nThe runs above by the commit they ran at: "
                    + ", ".join(f"{c} ({n})" for c, n in commits.items()))
    os.makedirs(root, exist_ok=True)
    draw_tradeoff(points, os.path.join(root, "tradeoff.png"))
    return "\n".join(rows), chosen, missing, other


def write_presets(path, root, methods, chosen, command):
    values, default, final_a = presets_of(root, methods, chosen)
    with open(path) as f:
        presets = json.load(f)
    untouched = [m for m in presets["methods"] if m not in values]  # methods not in --methods keep their earlier tuning
    presets.update(default_method=default, methods={**presets["methods"], **values},
                   source=f"{command} (mean A over {SEEDS} seeds on the tuning concepts: "
                          + ", ".join(f"{m} {a:.3f}" for m, a in final_a.items()) + ")"
                          + (f"; {', '.join(untouched)}: not in --methods, as they were" if untouched else ""))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(presets, f, indent=1, ensure_ascii=False)
        f.write("\n")
    train.load_presets(tmp)  # what is written must load
    os.replace(tmp, path)
    return default


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(cp.METHODS), help="comma-separated, in the order to run them "
                    "(default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run at once, one torch thread each")
    ap.add_argument("--model", default=os.path.join(ROOT, "toy", "model"))
    ap.add_argument("--adapter", choices=["lora", "vera"], default="lora", help="the adapter every cell trains")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "tuning"))
    ap.add_argument("--presets", default=train.PRESETS_FILE, help="presets.json to write once every stage of every "
                    "method is finished ('none': never); methods not in --methods keep the values it holds")
    ap.add_argument("--report", action="store_true", help="run nothing: only write the table (and the presets)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in GRID and m not in COMBOS]
    if bad:
        sys.exit(f"error: unknown method(s) {', '.join(bad)} (choose from {', '.join(list(GRID) + list(COMBOS))})")
    if set(COMBOS) & set(methods) and "dsc" not in methods:
        sys.exit(f"error: {', '.join(COMBOS)} take their w_h from dsc's grid: add dsc to --methods")
    started, running, failed = time.time(), {}, set()
    with ThreadPoolExecutor(args.jobs) as pool:  # each cell is its own process; threads only wait on them
        while not args.report:
            todo = [(m, s, seeds, order) for m, s, seeds in plan(args.out, methods)[0] for order in ORDERS
                    if not order_runs(args.out, m, s, order, seeds)
                    and (m, cell_name(s), order) not in running.keys() | failed]
            for m, setting, seeds, order in todo[:max(0, args.jobs - len(running))]:
                running[(m, cell_name(setting), order)] = pool.submit(run_cell, m, setting, seeds, order, args)
                print(f"started {m} {cell_name(setting)} {order} ({seeds} seeds)", flush=True)
            if not running:
                break
            done, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for key in [k for k, f in running.items() if f in done]:
                if running.pop(key).result():  # a run that fails fails again (seeded): the other cells go on
                    failed.add(key)
                    print(f"FAILED {' '.join(key)}: see its log.txt; not run again until tune.py restarts", flush=True)
                else:
                    print(f"finished {' '.join(key)} ({(time.time() - started) / 60:.0f} min so far)", flush=True)
    table, chosen, missing, other = report(args.out, methods)
    command = shlex.join(["python", "bench/tune.py"] + [a for a in argv if a != "--report"])
    pending = f"{missing} cells of the stages started so far not finished yet" + (
        f"; {other} runs in their folders ran other values or knobs than these cells (as an earlier tune.py's do) "
        "and are not counted" if other else "")
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(f"# Tuning on the tuning concepts ({args.adapter})\n\n`{command}` (bench/RESULTS.md, \"Protocol\"): "
                f"{COARSE} settings per method at seed 0 (a best setting at an edge of the grid extends it), the best "
                f"{TOP} again at seeds 1 and 2, every run in both orders of the tuning concepts, chosen by mean A; "
                f"then the DSC combinations the same way, over λ × `dsc`'s chosen w_h and the step below it. Every "
                f"cell runs {cell_name(BASE)} and cp.Hparams' defaults for the knobs it does not name. A − seq: the "
                f"mean over a cell's runs of its A minus `seq`'s at the same seed and order. kept: the share of the "
                f"earlier concepts' accuracy right after learning that is still there after the last task; first: "
                f"the first concept's accuracy right after task 1; [tradeoff.png](tradeoff.png) plots it against P "
                f"for every cell.\n\n" + table + "\n" + (f"\n{pending}.\n" if missing else ""))
    print(table)
    if not missing and set(chosen) == set(methods) and args.presets != "none":
        default = write_presets(args.presets, args.out, methods, chosen, command)
        print(f"wrote {args.presets}: every method's preset; default method {default}")
    print(f"wrote {args.out}/README.md" + (f": {pending}" if missing else ""))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop)
    main()
