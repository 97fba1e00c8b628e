"""Diagnostics of the DC-score and EWC machinery (bench/RESULTS.md, "DC terms in error units"), and the scale of a
base model's error gaps, from which to choose τ (`--dc-temp`).

The error gap (`--gap`): on each concept folder (default: the tuning concepts), the lower median over `--draws` draws
(an image of the concept, t, ε) of |e(c_n) − e(c₀)|, the gap between the mean-over-dims errors of the concept's
prompt c_n and of the pretrained prompt c₀ under the same (t, ε); measured after `--steps` steps of `seq` on the
concept alone, from the base model `--model` at its preset's run settings (presets.json). `all` pools every concept's
draws. At τ equal to the gap, the logits −e/τ of c_n and c₀ differ by about one nat on a typical draw. The τ of every
preset, 0.01, was tuned on the toy model (bench/tuning/), where it is 14× the gap (7.0e-4 at the defaults). The gaps
scale with a model's errors: another base model's gap tells the scale of τ there, and 14× it keeps the toy model's
sharpness (the last lines print the multiple of the τ in use on the model measured). The training is short because
the gap settles early: on the toy model (64 draws) it is 2.8e-3 (house) and 5.7e-3 (rainbow) before training, the new
token at its initial embedding, and within 0.4e-3–1.4e-3 from step 75 to step 600. `--steps 0` measures the base
model with the untrained token: no training, but the gap of a prompt, not of a learned concept.

On adapters trained with `seq` on two tuning concepts in turn (the second is "the task", the first "earlier"):

 (a) where each Fisher of the task puts its mass: feed-forward vs cross-attention LoRA, A vs B, the share the top
     1 % of parameters hold (beside each group's share of the parameters);
 (b) how stable each estimate is: two estimates at `--fisher-samples 16` (other draws) and one at 256, Spearman
     rank correlation and overlap of the top 1 %, and the seconds an estimate at 16 takes; the DC Fisher as
     cp.fisher_estimate takes it (twice the samples, t stratified over the schedule) and with the samples given at t
     uniform at random;
 (c) the EWC strength over tasks: the mean of F* after each task when each mean-1 F̂ is added as it is
     (F* ← γ F* + F̂) and when F* is rescaled to mean 1 after each update (cp.update_fisher);
 (d) the DC posterior p(c_n | x) over S = {c_n, c₀, c_earlier} on the task's own images, the earlier concept's and
     an unlearned concept's, at τ = the task's error gap and at fixed τ; the spread of the errors among the prompts
     and the error gap on a random-weight SD v1.5-size model (latents 4×64×64).

    python bench/diagnose.py --gap        # the toy model's error gap per tuning concept, printed: ~2 min on one thread
    python bench/diagnose.py --gap --model path/to/stable-diffusion-v1-5 --concepts photos/dog,photos/cat \\
        --class-words dog,cat --device cuda
    python bench/diagnose.py              # (a)–(d): ~17 min on one CPU thread; writes bench/diagnostics.json and .md
"""
import argparse
import dataclasses
import json
import os
import random
import sys
import textwrap
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cp  # noqa: E402
import dc_score  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
import unet  # noqa: E402
from continual import SPLITS  # noqa: E402

CONCEPTS = os.path.join(ROOT, "examples", "concepts")
# (earlier, task, unlearned) tuning concepts, and the training seed
RUNS = [(("rainbow", "house", "polka_square"), 0), (("rainbow", "house", "polka_square"), 1),
        (("striped_star", "checkered_heart", "polka_square"), 0)]
TEMPS = (0.001, 0.01, 0.1)
GAP_SEED = 7919  # the gap's draws: a stream apart from training's (seed · 1000 + task)
TOY_MULTIPLE = 14  # τ 0.01 over the toy model's gap at --gap's defaults (7.0e-4)


def seq_hparams(model_path, seed, steps=None):
    """(`seq` at the run settings of the model's preset in presets.json, `steps` if given; the τ a plain
    `train.py --model` trains this model with: the default method's preset over the model's)."""
    presets = train.load_presets()
    _, values = train.model_preset(presets, train.unet_size(model_path))
    tau = cp.Hparams(**{**values, **presets["methods"][presets["default_method"]]}).dc_temp
    hp = cp.Hparams(**{**values, "method": "seq", "seed": seed})
    return (hp if steps is None else dataclasses.replace(hp, steps=steps)), tau


@torch.no_grad()
def errors(model, x0, prompts, gen, chunk=16):
    """e[B, K]: the mean-over-dims errors of the latents x0 under each prompt, one (t, ε) per image drawn from gen and
    shared by the prompts (dc_score.denoising_errors), `chunk` images per UNet batch."""
    t, eps = cp.draw_noise(model, x0, gen)
    context = model.encode_text(prompts)
    return torch.cat([dc_score.denoising_errors(model.unet, x0[i:i + chunk], context, t[i:i + chunk],
                                                eps[i:i + chunk], model.alphas_cumprod)
                      for i in range(0, len(x0), chunk)]).float().cpu()


def median(v):
    """The lower median (of an even count, the lower of the two middle values), as torch.median takes it."""
    return float(v.median())


def concept_gaps(model_path, folder, hp, draws, class_word=None, device="cpu"):
    """|e(c_n) − e(c₀)| [draws] on the concept of a folder, after hp.steps steps of `seq` on it alone from the base
    model (0: the base model, the concept's token at its initial embedding)."""
    model = unet.load_model(model_path, device)
    images, name, captions = train.read_concept(folder, model.resolution)
    if hp.steps:
        cp.learn_concept(model, cp.new_state(model, hp), images, name, class_word, captions)
    else:
        unet.add_tokens(model, {f"<{name}>": None})
    gen = torch.Generator().manual_seed(GAP_SEED + hp.seed)
    x0 = cp.Batches(model, images, hp.batch_size, gen)(draws)
    e = errors(model, x0, [cp.concept_prompt(f"<{name}>", class_word), cp.base_prompt(class_word)], gen)
    return (e[:, 0] - e[:, 1]).abs()


def gap_report(model_path, folders, steps, draws, seed=0, class_words=None, device="cpu"):
    """The error gap of each concept folder and of all pooled, and the τ in use on the model."""
    hp, tau = seq_hparams(model_path, seed, steps)
    gaps = {os.path.basename(os.path.normpath(f)): concept_gaps(model_path, f, hp, draws, w, device)
            for f, w in zip(folders, class_words or [None] * len(folders))}
    return {"model": model_path, "steps": steps, "draws": draws, "seed": seed, "tau_in_use": tau,
            "concepts": {name: median(g) for name, g in gaps.items()}, "all": median(torch.cat(list(gaps.values())))}


def gap_text(r):
    trained = f"after {r['steps']} steps of seq on each concept alone" if r["steps"] else \
        "on the base model, each concept's token untrained"
    width = max(map(len, [*r["concepts"], "all"]))
    lines = [textwrap.fill(f"Error gap |e(c_n) − e(c₀)| of {r['model']}, {trained}: the lower median over "
                           f"{r['draws']} draws (an image, t, ε) of the gap between the mean-over-dims errors of the "
                           "concept's prompt and of c₀", 120), ""]
    lines += [f"{name:<{width}}  {gap:.2e}" for name, gap in r["concepts"].items()]
    gap, tau = r["all"], r["tau_in_use"]
    lines += [f"{'all':<{width}}  {gap:.2e}", "", textwrap.fill(
        f"--dc-temp {gap:.2e} puts c_n and c₀ about one nat apart on a typical draw of this model. The presets' τ, "
        f"0.01, was tuned on the toy model, where it is {TOY_MULTIPLE}× the gap: that multiple of this gap is "
        f"--dc-temp {TOY_MULTIPLE * gap:.2g}. τ in use on this model: {tau:g}, {tau / gap:.1f}× the gap.", 120)]
    return "\n".join(lines)


def trained(model_path, names, seed):
    """A model with `seq`'s adapter after learning names[0] then names[1]; the state before names[1], and its task."""
    model = unet.load_model(model_path)
    state = cp.new_state(model, seq_hparams(model_path, seed)[0])
    state = train.learn_folder(model, state, os.path.join(CONCEPTS, names[0]))
    after = train.learn_folder(model, state, os.path.join(CONCEPTS, names[1]))
    return model, state, after


def task_for(model, state, concept, folder, seed):
    gen = torch.Generator().manual_seed(seed)
    images, _ = train.load_images(folder, model.resolution)
    return cp.Task(len(state.concepts), concept["name"], concept["token"], concept["prompt"], concept["class_word"],
                   cp.base_prompt(concept["class_word"]), "current", cp.Batches(model, images, 8, gen), gen,
                   random.Random(seed), ({}, {}))


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


FISHERS = (("ewc", "denoising"), ("ewc-dc", "DC: 2n, stratified t"), ("ewc-dc-uniform", "DC: n, uniform t"))


def uniform_timesteps(n, T, gen):
    """In place of cp.stratified_timesteps: n timesteps uniform at random."""
    return torch.randint(0, T, (n,), generator=gen)


def fishers(model, state, after, names, seed):
    """(a) and (b) for the Fishers of the task names[1]."""
    out, keys = {}, list(cp.flat(lora.get_adapter(model.unet, "current")))
    lora.set_trainable(model.unet, "current")  # a finished task leaves its adapter frozen
    concept = after.concepts[-1]
    for kind, _ in FISHERS:
        hp = dataclasses.replace(state.hparams, method=kind.removesuffix("-uniform"), seed=seed)
        st = cp.State(model=state.model, hparams=hp, concepts=state.concepts)
        est, seconds, stratified = {}, {}, cp.stratified_timesteps
        cp.stratified_timesteps = uniform_timesteps if kind.endswith("uniform") else stratified
        try:
            for label, draw_seed, n in (("16a", 100, 16), ("16b", 200, 16), ("256", 300, 256)):
                task = task_for(model, st, concept, os.path.join(CONCEPTS, names[1]), draw_seed)
                started = time.time()
                n = n // 2 if kind.endswith("uniform") else n  # n samples, not the 2n the DC Fisher takes
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


@torch.no_grad()
def posteriors(model, state, after, names, n_draws=32):
    """(d): p(c_n | x) over S = [c_n, c₀, c_earlier] on three sets of images, at the task's error gap and fixed τ."""
    concept = after.concepts[-1]
    prompts = [concept["prompt"], cp.base_prompt(concept["class_word"]), state.concepts[0]["prompt"]]
    task = task_for(model, state, concept, os.path.join(CONCEPTS, names[1]), GAP_SEED)
    e = errors(model, task.batches(n_draws), prompts[:2], task.gen)
    gap = median((e[:, 0] - e[:, 1]).abs())
    out = {"error_gap": gap, "prompts": prompts}
    for label, name in zip(("earlier", "own", "unlearned"), names):
        t = task_for(model, state, concept, os.path.join(CONCEPTS, name), 11)
        e = errors(model, t.batches(n_draws), prompts, t.gen)
        out[label] = {"error_spread_median": float(e.std(1).median()), "error_mean": float(e.mean()),
                      **{f"p_task@{k}": float(dc_score.posterior(e, v)[:, 0].mean())
                         for k, v in (("gap", gap), *((str(x), x) for x in TEMPS))}}
    return out


@torch.no_grad()
def sd_sized(n_draws=6, side=64):
    """(d) on a random-weight SD v1.5-size UNet and text encoder (latents 4×side×side, N(0, 1)): the spread of the
    errors among three prompts, the error gap of the first prompt against c₀ ("a photo"), and how peaked the
    posterior is at τ = 0.01 and at the gap."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    preset = unet.PRESETS["sd-v1"]
    net = unet.UNet(dict(preset["unet"])).eval()
    text = CLIPTextModel(CLIPTextConfig(**preset["text_encoder"])).eval()
    tok = unet.load_tokenizer(os.path.join(ROOT, "toy", "model", "tokenizer"))
    prompts = ["a photo of a red star", cp.base_prompt(), "a photo of a blue heart"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    context = text(ids)[0]
    ac = unet.alphas_cumprod_from_config(preset["scheduler"])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n_draws, 4, side, side, generator=gen)
    t = torch.randint(0, len(ac), (n_draws,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    # one prompt per UNet batch (the `prompts` argument): the full-size UNet holds n_draws rows, not 3 × n_draws
    e = torch.cat([dc_score.denoising_errors(net, x0, context, t, eps, ac, torch.full((n_draws, 1), k))
                   for k in range(len(prompts))], 1)
    gap = median((e[:, 0] - e[:, 1]).abs())
    return {"unet_params": sum(p.numel() for p in net.parameters()), "latent": [4, side, side], "draws": n_draws,
            "error_mean": float(e.mean()), "error_spread_median": float(e.std(1).median()), "error_gap": gap,
            "max_p@0.01": float(dc_score.posterior(e, 0.01).max(1).values.mean()),
            "max_p@gap": float(dc_score.posterior(e, gap).max(1).values.mean())}


def strength(gamma=0.9, tasks=5):
    """(c) the mean of F* after each task: exact, since every F̂ has mean 1 (cp.mean_one)."""
    added = [sum(gamma ** i for i in range(n)) for n in range(1, tasks + 1)]
    return {"gamma": gamma, "added": added, "rescaled": [1.0] * tasks}


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
    lines += ["", f"(c) Mean of F* after tasks 1–{len(c['added'])} (γ = {c['gamma']}): each F̂ added as it is "
              + " → ".join(f"{v:.2f}" for v in c["added"]) + "; rescaled to mean 1 after each update: 1 throughout.",
              "", "(d) DC posterior p(c_n | x) over S = {c_n, c₀, c_earlier} (mean over 32 draws); τ_gap: the median "
              "|e(c_n) − e(c₀)| over 32 draws on the task's own images, as `--gap` takes it", "",
              "| concepts, seed | images | median spread of e | τ_gap | p@τ_gap | p@0.001 | p@0.01 | p@0.1 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        d = r["posterior"]
        for label in ("own", "earlier", "unlearned"):
            x = d[label]
            lines.append(f"| {r['concepts'][1]}, {r['seed']} | {label} | {x['error_spread_median']:.2e} | "
                         f"{d['error_gap']:.2e} | {x['p_task@gap']:.2f} | {x['p_task@0.001']:.2f} | "
                         f"{x['p_task@0.01']:.2f} | {x['p_task@0.1']:.2f} |")
    s = report["sd_sized"]
    lines += ["", f"Random-weight SD v1.5-size UNet ({s['unet_params'] / 1e6:.0f} M parameters, latents "
              f"{'×'.join(map(str, s['latent']))}, {s['draws']} draws, three prompts): "
              f"mean error {s['error_mean']:.3f}, median spread among prompts {s['error_spread_median']:.2e}, "
              f"error gap {s['error_gap']:.2e}; mean largest posterior at τ = 0.01: {s['max_p@0.01']:.2f}, "
              f"at τ = the gap: {s['max_p@gap']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gap", action="store_true", help="print only the error gap of --model on --concepts")
    ap.add_argument("--model", default=train.TOY_MODEL, help="base model (default: the shipped toy model)")
    ap.add_argument("--concepts", help="--gap: comma-separated concept folders (default: the tuning concepts)")
    ap.add_argument("--class-words", help="--gap: comma-separated class words, one per concept folder")
    ap.add_argument("--steps", type=int, default=100, help="--gap: steps of seq on each concept before its gap is "
                    "measured (default 100; 0: the base model, the token untrained)")
    ap.add_argument("--draws", type=int, default=64, help="--gap: draws (an image, t, ε) per concept (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="--gap: the training seed and the draws' (default 0)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="--gap: where it runs "
                    "(auto: cuda if there is one); (a)–(d) run on the CPU")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "diagnostics"), help="writes OUT.json and OUT.md")
    ap.add_argument("--runs", type=int, default=len(RUNS), help="how many of the adapter runs (default all)")
    args = ap.parse_args(argv)
    if args.gap:
        folders = args.concepts.split(",") if args.concepts else [os.path.join(CONCEPTS, n) for n in SPLITS["tuning"]]
        words = args.class_words.split(",") if args.class_words else None
        names = [os.path.basename(os.path.normpath(f)) for f in folders]
        if not all(map(os.path.isdir, folders)) or len(set(names)) < len(names):
            ap.error(f"--concepts {args.concepts}: give existing folders with distinct names")
        if words and len(words) != len(folders):
            ap.error(f"--class-words: {len(words)} words for {len(folders)} concept folders")
        if args.steps < 0 or args.draws < 1:
            ap.error("--steps must be ≥ 0 and --draws ≥ 1")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        started = time.time()
        report = gap_report(args.model, folders, args.steps, args.draws, args.seed, words, device)
        if not report["all"] > 0:
            sys.exit(f"error: the concepts' prompts and c₀ give the same errors on {args.model}: no gap to scale τ by")
        print(gap_text(report) + f"\n({(time.time() - started) / 60:.1f} min on {device})")
        return report
    torch.set_num_threads(1)
    started = time.time()
    report = {"command": "python bench/diagnose.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
              "machine": f"{os.cpu_count()} CPUs, 1 thread, torch {torch.__version__}", "runs": []}
    for names, seed in RUNS[:args.runs]:
        model, state, after = trained(args.model, names, seed)
        report["runs"].append({"concepts": list(names), "seed": seed,
                               "fishers": fishers(model, state, after, names, seed),
                               "posterior": posteriors(model, state, after, names)})
        print(f"{names} seed {seed} done ({(time.time() - started) / 60:.1f} min)", flush=True)
    report["strength"] = strength()
    report["sd_sized"] = sd_sized()
    report["minutes"] = (time.time() - started) / 60
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
