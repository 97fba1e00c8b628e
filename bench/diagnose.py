"""Diagnostics of the EWC and DC-score machinery, on the tuning concepts only (bench/RESULTS.md, "DC terms in error
units").

On adapters trained with `seq` on two tuning concepts in turn (the second is "the task", the first "earlier"):

 (a) where each Fisher of the task puts its mass: feed-forward vs cross-attention LoRA, A vs B, the share the top
     1 % of parameters hold (beside each group's share of the parameters);
 (b) how stable each estimate is: two estimates at `--fisher-samples 16` (other draws) and one at 256, Spearman
     rank correlation and overlap of the top 1 %, and the seconds an estimate at 16 takes; the DC Fisher as it is
     (twice the samples, t stratified over the schedule) and as it was (the samples given, t uniform at random);
 (c) the EWC strength over tasks: the mean of F* after each task with `--fisher-norm task` (each F̂ has mean 1:
     F* ← γ F* + F̂) and `total` (F* rescaled to mean 1);
 (d) the DC posterior p(c_n | x) over S = {c_n, c₀, c_earlier} on the task's own images, the earlier concept's and
     an unlearned concept's, at the calibrated τ and at fixed ones; the spread of the errors among the prompts on the
     toy model and on a random-weight SD v1.5-size model (latents 4×64×64);
 (e) τ per task as the runs of bench/continual.py calibrated it (`--taus FOLDER,...`: each a benchmark or tuning
     folder; the median over its DSC runs under `--dc-temp auto`), so that calibrations can be compared across
     splits and versions.

    python bench/diagnose.py              # ~13 min on one CPU thread; writes bench/diagnostics.json and .md
"""
import argparse
import glob
import json
import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cp  # noqa: E402
import train  # noqa: E402
import lora  # noqa: E402
import unet  # noqa: E402

CONCEPTS = os.path.join(ROOT, "examples", "concepts")
# (earlier, task, unlearned) tuning concepts, and the training seed
RUNS = [(("rainbow", "house", "polka_square"), 0), (("rainbow", "house", "polka_square"), 1),
        (("striped_star", "checkered_heart", "polka_square"), 0)]
TEMPS = (0.001, 0.01, 0.1)


def trained(names, seed):
    """A model with `seq`'s adapter after learning names[0] then names[1]; the state before names[1], and its task."""
    model = unet.load_model(os.path.join(ROOT, "toy", "model"))
    state = cp.new_state(model, cp.Hparams(method="seq", seed=seed))
    state = train.learn_folder(model, state, os.path.join(CONCEPTS, names[0]))
    after = train.learn_folder(model, state, os.path.join(CONCEPTS, names[1]))
    return model, state, after


def task_for(model, state, concept, folder, seed):
    gen = torch.Generator().manual_seed(seed)
    images, _ = train.load_images(folder, model.resolution)
    return cp.Task(len(state.concepts), concept["name"], concept["token"], concept["prompt"], None, cp.base_prompt(),
                   "current", cp.Batches(model, images, 8, gen), gen, random.Random(seed), ({}, {}))


def flat_values(fisher, keys):
    return torch.cat([f.flatten() for f in fisher]), [(k, f.numel()) for k, f in zip(keys, fisher)]


def top_share(v, q=0.01):
    k = max(1, int(q * v.numel()))
    return float(v.topk(k).values.sum() / v.sum())


def mass(fisher, keys):
    """Shares of the Fisher's mass (and of the parameters) by layer kind and by factor, and the top 1 %'s share."""
    v, sizes = flat_values(fisher, keys)
    total, n = float(v.sum()), v.numel()
    group = lambda pred: (sum(float(f.sum()) for f, k in zip(fisher, keys) if pred(k)) / total,
                          sum(f.numel() for f, k in zip(fisher, keys) if pred(k)) / n)
    return {"ff": group(lambda k: ".ff." in k), "attn": group(lambda k: ".attn" in k),
            "A": group(lambda k: k.endswith(".A")), "B": group(lambda k: k.endswith(".B")), "top1%": top_share(v)}


def spearman(a, b):
    rank = lambda v: torch.empty_like(v).scatter_(0, v.argsort(), torch.arange(v.numel(), dtype=v.dtype))
    ra, rb = rank(a), rank(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def overlap(a, b, q=0.01):
    k = max(1, int(q * a.numel()))
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


FISHERS = (("ewc", "denoising"), ("ewc-dc", "DC: 2n, stratified t"),
           ("ewc-dc-uniform", "DC before: n, uniform t (τ as now)"))


def uniform_timesteps(n, T, gen):
    """The DC Fisher's timesteps as they were drawn before stratification (cp.stratified_timesteps)."""
    return torch.randint(0, T, (n,), generator=gen)


def fishers(model, state, after, names, seed):
    """(a) and (b) for the Fishers of the task names[1]."""
    out, keys = {}, list(cp.flat(lora.get_adapter(model.unet, "current")))
    lora.set_trainable(model.unet, "current")  # a finished task leaves its adapter frozen
    concept = after.concepts[-1]
    for kind, _ in FISHERS:
        method = kind.removesuffix("-uniform")
        st = cp.State(model=state.model, hparams=cp.Hparams(method=method, seed=seed), concepts=state.concepts)
        est, seconds, stratified = {}, {}, cp.stratified_timesteps
        cp.stratified_timesteps = uniform_timesteps if kind.endswith("uniform") else stratified
        try:
            for label, draw_seed, n in (("16a", 100, 16), ("16b", 200, 16), ("256", 300, 256)):
                task = task_for(model, st, concept, os.path.join(CONCEPTS, names[1]), draw_seed)
                if st.hparams.uses("dc_fisher"):
                    cp.task_temp(model, st, task)  # τ first: its calibration is not the estimate's cost
                started = time.time()
                n = n // 2 if kind.endswith("uniform") else n  # before: n samples, not 2n
                est[label] = [f.detach() for f in cp.fisher_estimate(model, st, task, n)]
                seconds[label] = time.time() - started
        finally:
            cp.stratified_timesteps = stratified
        vec = {k: flat_values(v, keys)[0] for k, v in est.items()}
        out[kind] = {"mass": mass(est["256"], keys), "seconds_16": (seconds["16a"] + seconds["16b"]) / 2,
                     "stability": {f"{a} vs {b}": {"spearman": spearman(vec[a], vec[b]), "top1%_overlap":
                                                   overlap(vec[a], vec[b])}
                                   for a, b in (("16a", "16b"), ("16a", "256"), ("16b", "256"))}}
    return out


def taus(folders):
    """(e) {folder: [median τ of task 1, task 2, ...]} over the DSC runs of every results.json under each folder
    (task i: the i-th concept learned, so a folder of both orders pools two concepts at each place)."""
    out = {}
    for folder in folders:
        per_task = {}
        for path in sorted(glob.glob(os.path.join(folder, "**", "results.json"), recursive=True)):
            with open(path) as f:
                runs = json.load(f)["runs"]
            for method, rs in runs.items():
                for r in rs if method.startswith("dsc") else []:
                    if r.get("hparams", {}).get("dc_temp", "auto") != "auto":  # a τ given, not calibrated
                        continue
                    for i, t in enumerate(r["tasks"]):
                        if t.get("dc_temp"):
                            per_task.setdefault(i, []).append(t["dc_temp"])
        out[os.path.relpath(folder, ROOT)] = [statistics.median(per_task[i]) for i in sorted(per_task)]
    return out


@torch.no_grad()
def posteriors(model, state, after, names, n_draws=32):
    """(d) on the toy model: p(c_n | x) over S = [c_n, c₀, c_earlier] on three sets of images, at several τ."""
    concept = after.concepts[-1]
    prompts = [concept["prompt"], cp.base_prompt(), state.concepts[0]["prompt"]]
    task = task_for(model, state, concept, os.path.join(CONCEPTS, names[1]), 7)
    tau = cp.calibrate_temp(model, task)
    out = {"calibrated_tau": tau, "prompts": prompts}
    for label, name in zip(("earlier", "own", "unlearned"), names):
        t = task_for(model, state, concept, os.path.join(CONCEPTS, name), 11)
        e = cp.subset_errors(model, t.batches(n_draws), prompts, t.gen)
        out[label] = {"error_spread_median": float(e.std(1).median()), "error_mean": float(e.mean()),
                      **{f"p_task@{k}": float(torch.softmax(-e / v, 1)[:, 0].mean())
                         for k, v in (("calibrated", tau), *((str(x), x) for x in TEMPS))}}
    return out


@torch.no_grad()
def sd_sized(n_draws=6, side=64):
    """(d) on a random-weight SD v1.5-size UNet and text encoder (latents 4×side×side, N(0, 1)): the spread of the
    errors among three prompts, the τ the calibration would choose (the first prompt against "a photo"), and how
    peaked τ = 0.01 is there."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    preset = unet.PRESETS["sd-v1"]
    net = unet.UNet(dict(preset["unet"])).eval()
    text = CLIPTextModel(CLIPTextConfig(**preset["text_encoder"])).eval()
    tok = unet.load_tokenizer(os.path.join(ROOT, "toy", "model", "tokenizer"))
    prompts = ["a photo of a red star", "a photo", "a photo of a blue heart"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    context = text(ids)[0]
    ac = unet.alphas_cumprod_from_config(preset["scheduler"])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n_draws, 4, side, side, generator=gen)
    t = torch.randint(0, len(ac), (n_draws,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    x_t = unet.add_noise(x0, eps, t, ac)
    e = torch.stack([((net(x_t, t, context[k:k + 1].expand(n_draws, -1, -1)) - eps) ** 2).mean((1, 2, 3))
                     for k in range(len(prompts))], 1)
    tau = float((e[:, 0] - e[:, 1]).abs().median())  # as cp.calibrate_temp: c_n against c₀ ("a photo")
    return {"unet_params": sum(p.numel() for p in net.parameters()), "latent": [4, side, side], "draws": n_draws,
            "error_mean": float(e.mean()), "error_spread_median": float(e.std(1).median()), "calibrated_tau": tau,
            "max_p@0.01": float(torch.softmax(-e / 0.01, 1).max(1).values.mean()),
            "max_p@calibrated": float(torch.softmax(-e / tau, 1).max(1).values.mean())}


def strength(gamma=0.9, tasks=5):
    """(c) the mean of F* after each task: exact, since every F̂ is rescaled to mean 1 (tests/test_cp.py)."""
    task = [sum(gamma ** i for i in range(n)) for n in range(1, tasks + 1)]
    return {"gamma": gamma, "task": task, "total": [1.0] * tasks}


def markdown(report):
    lines = [f"`{report['command']}` ({report['minutes']:.0f} min, {report['machine']})", "",
             "(a) Where the Fisher's mass lies (256 samples; in brackets: the share of the parameters)", "",
             "| concepts (earlier → task), seed | Fisher | feed-forward | cross-attention | A | B | top 1 % |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        for method, label in FISHERS:
            m = r["fishers"][method]["mass"]
            cell = lambda g: f"{m[g][0]:.2f} ({m[g][1]:.2f})"
            lines.append(f"| {r['concepts'][0]} → {r['concepts'][1]}, {r['seed']} | {label} | {cell('ff')} | "
                         f"{cell('attn')} | {cell('A')} | {cell('B')} | {m['top1%']:.2f} |")
    lines += ["", "(b) Stability: Spearman ρ / top-1 % overlap between estimates; seconds of a 16-sample estimate", "",
              "| concepts, seed | Fisher | 16 vs 16 | 16 vs 256 | 16 vs 256 | seconds (16) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        for method, label in FISHERS:
            f = r["fishers"][method]
            lines.append(f"| {r['concepts'][1]}, {r['seed']} | {label} | " + " | ".join(
                f"{v['spearman']:.2f} / {v['top1%_overlap']:.2f}" for v in f["stability"].values())
                + f" | {f['seconds_16']:.2f} |")
    c = report["strength"]
    lines += ["", f"(c) Mean of F* after tasks 1–{len(c['task'])} (γ = {c['gamma']}): `task` "
              + " → ".join(f"{v:.2f}" for v in c["task"]) + "; `total` 1 throughout.", "",
              "(d) DC posterior p(c_n | x) over S = {c_n, c₀, c_earlier}, toy model (mean over 32 draws)", "",
              "| concepts, seed | images | median spread of e | calibrated τ | p@τ_cal | p@0.001 | p@0.01 | p@0.1 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        d = r["posterior"]
        for label in ("own", "earlier", "unlearned"):
            x = d[label]
            lines.append(f"| {r['concepts'][1]}, {r['seed']} | {label} | {x['error_spread_median']:.2e} | "
                         f"{d['calibrated_tau']:.2e} | {x['p_task@calibrated']:.2f} | {x['p_task@0.001']:.2f} | "
                         f"{x['p_task@0.01']:.2f} | {x['p_task@0.1']:.2f} |")
    s = report["sd_sized"]
    lines += ["", f"Random-weight SD v1.5-size UNet ({s['unet_params'] / 1e6:.0f} M parameters, latents "
              f"{'×'.join(map(str, s['latent']))}, {s['draws']} draws, three prompts): "
              f"mean error {s['error_mean']:.3f}, "
              f"median spread among prompts {s['error_spread_median']:.2e}, calibrated τ {s['calibrated_tau']:.2e}; "
              f"mean largest "
              f"posterior at τ = 0.01: {s['max_p@0.01']:.2f}, at the calibrated τ: {s['max_p@calibrated']:.2f}.",
              "", "(e) τ per task (its place in the sequence, whichever the order): the median over the DSC "
              "runs recorded in each folder", "",
              "| folder | " + " | ".join(f"task {i + 1}" for i in range(5)) + " |", "|---" * 6 + "|"]
    lines += [f"| {folder} | " + " | ".join(f"{v:.1e}" for v in t[:5]) + " |" for folder, t in report["taus"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "diagnostics"), help="writes OUT.json and OUT.md")
    ap.add_argument("--runs", type=int, default=len(RUNS), help="how many of the adapter runs (default all)")
    ap.add_argument("--taus", default="bench/evaluation-nats,bench/tuning-nats,bench/tuning",
                    help="(e): benchmark or tuning folders whose recorded τ per task to compare")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    report = {"command": "python bench/diagnose.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
              "machine": f"{os.cpu_count()} CPUs, 1 thread, torch {torch.__version__}", "runs": []}
    for names, seed in RUNS[:args.runs]:
        model, state, after = trained(names, seed)
        report["runs"].append({"concepts": list(names), "seed": seed,
                               "fishers": fishers(model, state, after, names, seed),
                               "posterior": posteriors(model, state, after, names)})
        print(f"{names} seed {seed} done ({(time.time() - started) / 60:.1f} min)", flush=True)
    report["strength"] = strength()
    report["sd_sized"] = sd_sized()
    report["taus"] = taus([os.path.join(ROOT, f) for f in args.taus.split(",")])
    report["minutes"] = (time.time() - started) / 60
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
