"""Learnability survey: can the base model learn each concept at all, before any question of forgetting?

Every concept is learned alone, from a fresh state, by `python train.py --concept examples/concepts/NAME --method seq`
with the training defaults, then judged by the oracle: the share of 32 samples of "a photo of a <NAME>" (DDIM 50,
CFG 7.5) that it assigns to NAME (`python -m toy.oracle --eval-state`). 32 samples give about ±0.08.
A concept no method can learn would only add zeros to every row of the continual benchmark.

    python bench/learnability.py                                   # every concept, the shipped model, 2 jobs
    python bench/learnability.py --model /tmp/probe/model --concepts bullseye,smiley --out /tmp/probe/learn.json
    python bench/learnability.py --train-args="--steps 800"       # other train.py flags (note the =)

Writes a markdown table (stdout and beside the JSON); finished concepts are kept in the JSON, so a rerun with the
same settings resumes.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from toy import world  # noqa: E402


def learn_and_score(name, model, work, train_args, threads):
    """One concept: train.py as a user runs it (its own process), then the oracle on 32 samples."""
    import torch
    from toy import oracle
    torch.set_num_threads(threads)
    state = os.path.join(work, name)
    concept = os.path.join(ROOT, "examples", "concepts", name)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--concept", concept, "--state", state, "--model", model,
           "--method", "seq", "--no-preview", *train_args]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.time() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{name}: train.py failed: {done.stderr.strip().splitlines()[-1:]}")
    acc, _ = oracle.eval_state(state)
    return name, {"accuracy": acc[name], "train_seconds": round(seconds, 1)}


def table(results, names):
    rows = ["| concept | accuracy | train time |", "| --- | --- | --- |"]
    rows += [f"| {n} | {results[n]['accuracy']:.3f} | {results[n]['train_seconds']:.0f} s |" for n in names
             if n in results]
    accs = [results[n]["accuracy"] for n in names if n in results]
    rows.append(f"| **mean of {len(accs)}** | **{sum(accs) / max(len(accs), 1):.3f}** | "
                f"{sum(a >= 0.75 for a in accs)} at ≥ 0.75 |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "toy", "model"))
    ap.add_argument("--concepts", default=",".join(world.CONCEPTS), help="comma-separated (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="concepts learned at once, one torch thread each")
    ap.add_argument("--train-args", default="", help="extra train.py flags, e.g. \"--steps 800\"")
    ap.add_argument("--work", default="/tmp/cp/learnability", help="where the states are written")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "learnability.json"))
    args = ap.parse_args()
    names = args.concepts.split(",")
    unknown = [n for n in names if n not in world.CONCEPTS]
    if unknown:
        sys.exit(f"error: unknown concept(s) {', '.join(unknown)}; the toy world has {', '.join(world.CONCEPTS)}")
    settings = {"model": os.path.abspath(args.model), "train_args": args.train_args}
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            results = saved["results"]
    todo = [n for n in names if n not in results]
    print(f"learnability of {len(names)} concepts ({len(names) - len(todo)} already done) with {args.model}",
          flush=True)
    threads = 1 if args.jobs > 1 else 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(learn_and_score, n, settings["model"], os.path.join(args.work, str(os.getpid())),
                               args.train_args.split(), threads) for n in todo]
        for fut in as_completed(futures):
            name, res = fut.result()
            results[name] = res
            print(f"{name}: {res['accuracy']:.3f} ({res['train_seconds']:.0f} s of training; "
                  f"{(time.time() - t0) / 60:.1f} min so far)", flush=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump({"settings": settings, "results": results}, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
    md = table(results, names)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"`python bench/learnability.py {shlex.join(sys.argv[1:])}`\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
