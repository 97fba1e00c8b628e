"""Tune every method the same way, on the tuning concepts only (bench/RESULTS.md, "Protocol").

Every method with a knob gets the same budget: the six settings of GRID[method], each one run of
bench/continual.py on the tuning sequence (`--split tuning`, 5 tasks, 1 seed). The chosen setting has the highest
final accuracy A (ties: the lower forgetting F). `seq` and `ti` have no knob of their own (the training defaults
are shared by every method): one run each, for reference. The evaluation concepts and their renders are never
touched here.

    python bench/tune.py --jobs 2                     # every cell not yet on disk (resumable: cells are kept)
    python bench/tune.py --methods ewc,ewc-dc         # some methods
    python bench/tune.py --report                     # only rewrite the table and chosen.json from finished cells
    python bench/tune.py --adapter vera --methods seq,ewc,ewc-dc --out bench/tuning-vera   # VeRA's λ

Writes bench/tuning/<method>/<setting>/results.json per finished cell (bench/continual.py's output), then
bench/tuning/README.md (every cell, the choice marked) and bench/tuning/chosen.json, which
`bench/continual.py --tuned bench/tuning/chosen.json` reads.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMBDAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # λ on a Fisher rescaled to mean 1 (cp.fisher_diagonal)


def dsc_grid(knob, values, lower):
    """DSC: how long and how hard to consolidate (consolidation costs plasticity): steps {25, 100} × two values of
    the weight, plus, for the same budget of six, the weight's two next lower values at the longer consolidation."""
    return ([{"dsc_steps": s, knob: v} for s in (25, 100) for v in values]
            + [{"dsc_steps": 100, knob: v} for v in lower])


GRID = {
    "seq": [{}],
    "ti": [{}],
    "clora": [{"clora_lambda": v} for v in (1e-1, 1e0, 1e1, 1e2, 1e3, 1e4)],
    "ewc": [{"ewc_lambda": v} for v in LAMBDAS],
    "ewc-dc": [{"ewc_lambda": v} for v in LAMBDAS],
    "dsc": dsc_grid("dsc_w_h", (0.1, 1.0), (0.01, 0.001)),
    "dsc-ewc": dsc_grid("ewc_lambda", (1.0, 10.0), (0.1, 0.01)),
    "dsc-ewc-dc": dsc_grid("ewc_lambda", (1.0, 10.0), (0.1, 0.01)),
}


def cell_name(setting):
    return ",".join(f"{k}={v:g}" for k, v in setting.items()) or "defaults"


def flags(setting):
    return [x for k, v in setting.items() for x in (f"--{k.replace('_', '-')}", repr(v))]


def run_cell(method, setting, out, args):
    """One (method, setting): bench/continual.py in its own process, one thread; returns its results.json."""
    # run from the repository root with relative paths, so the cell's records read the same on every machine
    cmd = [sys.executable, os.path.join("bench", "continual.py"), "--split", "tuning", "--seeds", "1",
           "--methods", method, "--out", os.path.relpath(out, ROOT), "--model", os.path.relpath(args.model, ROOT),
           "--adapter", args.adapter, "--quiet", "--resume", *flags(setting)]
    with open(os.path.join(out, "log.txt"), "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{method} {cell_name(setting)} failed (exit {done.returncode}); see {out}/log.txt")
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def finished(out):
    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        if "total_seconds" in report:
            return report


def choose(cells):
    """The setting with the highest A; ties: the lower F. cells: [(setting, A, F)]."""
    return max(cells, key=lambda c: (round(c[1], 6), -round(c[2] or 0.0, 6)))[0]


def report(root, methods):
    rows = ["| method | setting | A ↑ | P ↑ | F ↓ | minutes | chosen |", "| --- | --- | --- | --- | --- | --- | --- |"]
    chosen, missing = {}, 0
    for method in methods:
        cells = []
        for setting in GRID[method]:
            r = finished(os.path.join(root, method, cell_name(setting)))
            if r is None:
                missing += 1
                continue
            s = r["summary"][method]
            cells.append((setting, s["A"][0], s["F"][0], s["P"][0], r["total_seconds"] / 60))
        if len(cells) == len(GRID[method]):
            chosen[method] = choose([c[:3] for c in cells])
        for setting, A, F, P, minutes in cells:
            mark = "**←**" if chosen.get(method) == setting and len(GRID[method]) > 1 else ""
            rows.append(f"| `{method}` | {cell_name(setting)} | {A:.3f} | {P:.3f} | "
                        f"{'n/a' if F is None else f'{F:.3f}'} | {minutes:.0f} | {mark} |")
    return "\n".join(rows), {m: v for m, v in chosen.items() if v}, missing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(GRID), help="comma-separated (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run at once, one torch thread each")
    ap.add_argument("--model", default=os.path.join(ROOT, "toy", "model"))
    ap.add_argument("--adapter", choices=["lora", "vera"], default="lora", help="the adapter every cell trains")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "tuning"))
    ap.add_argument("--report", action="store_true", help="only write the table and chosen.json")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in GRID]
    if bad:
        sys.exit(f"error: unknown method(s) {', '.join(bad)} (choose from {', '.join(GRID)})")
    todo = [(m, s) for m in methods for s in GRID[m] if not finished(os.path.join(args.out, m, cell_name(s)))]
    print(f"tuning {len(methods)} methods: {len(todo)} of {sum(len(GRID[m]) for m in methods)} cells to run",
          flush=True)
    if not args.report and todo:
        started = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:  # each cell is its own process; threads only wait on them
            futures = {}
            for m, s in todo:
                out = os.path.join(args.out, m, cell_name(s))
                os.makedirs(out, exist_ok=True)
                futures[pool.submit(run_cell, m, s, out, args)] = (m, s)
            for f in as_completed(futures):
                m, s = futures[f]
                A = f.result()["summary"][m]["A"][0]
                print(f"{m} {cell_name(s)}: A {A:.3f} ({(time.time() - started) / 60:.0f} min so far)", flush=True)
    tried = [m for m in GRID if m in methods or os.path.isdir(os.path.join(args.out, m))]  # this call's and earlier
    table, chosen, missing = report(args.out, tried)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "chosen.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(f"# Tuning on the tuning concepts ({args.adapter})\n\n`{shlex.join(['python', 'bench/tune.py'] + argv)}` "
                "(bench/RESULTS.md, \"Protocol\"): one seed per cell, A then F decide; the chosen settings are in "
                "`chosen.json`.\n\n" + table + "\n" +
                (f"\n{missing} cells not run yet.\n" if missing else ""))
    print(table)
    print(f"wrote {args.out}/README.md and chosen.json" + (f" ({missing} cells not run yet)" if missing else ""))


if __name__ == "__main__":
    main()
