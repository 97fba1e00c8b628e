"""The continual-personalization benchmark (bench/RESULTS.md): concepts learned one after another with each
method, replay-free, through the same code path as train.py (fresh model, load_state, apply_state, learn_concept,
save_state); after every task, every concept learned so far is generated (fixed noise per concept) and scored.

With acc_i(m) the share of images generated for concept i after task m that the judge assigns to concept i
(tasks and concepts numbered 1..N, acc_i(m) defined for m >= i):

    A = mean_i acc_i(N)                                    final average accuracy
    P = mean_i acc_i(i)                                    plasticity: accuracy right after learning
    F = mean_{i<N} (max_{i<=m<N} acc_i(m) - acc_i(N))      forgetting

Also, after the last task: DC accuracy (`classify` among the learned concepts' prompts) on real images of
each concept that were never trained on; feature similarity cos(mean f(generated), mean f(real)); and
KID = unbiased MMD² (Bińkowski et al. 2018) with the polynomial kernel k(a, b) = (a·b/d + 1)³ on the same features:

    KID = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)

Per task: parameters and bytes that grow with the tasks (LoRA pool, Fisher, tokens, the state on disk), wall
time, and the LoRA norm ‖ΔW‖ (C-LoRA's self-regularization can drive it toward zero).

The judge: on the toy world, the oracle (toy/oracle.py: its concept head assigns, its penultimate layer gives the
features) with fresh renders as the real images. With --clip, a local CLIP model: an image is assigned to the
concept whose real photos have the nearest mean embedding (cosine), the features are CLIP image embeddings, and
CLIP-I (mean cosine generated vs real) and CLIP-T (mean cosine to "a photo of a {class word or name}") are added.

    python bench/continual.py --quick                     # 2 tasks, seq vs ewc-dc, 1 seed: a few minutes
    python bench/continual.py                             # 5 tasks, every method, 3 seeds
    python bench/continual.py --tasks 10 --methods seq,ewc-dc,dsc-ewc-dc
    python bench/continual.py --model sd15/ --clip clip-vit-b32/ --concepts dog/,cat/ --class-words dog,cat
"""
import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cp  # noqa: E402
import cp_state  # noqa: E402
import dc_score  # noqa: E402
import lora  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import unet  # noqa: E402

FULL = dict(tasks=5, methods=",".join(cp.METHODS), seeds=3, n_samples=16, n_real=16, sample_steps=25,
            dc_timesteps=10)
# The toy concepts, split once (random.Random(0).shuffle of the sorted names; the first runs, made before the split,
# had used pine_tree and striped_ring): methods are tuned on TUNING only (bench/tune.py) and compared on EVALUATION
# only, in these orders.
SPLITS = {"tuning": ["rainbow", "striped_star", "house", "checkered_heart", "polka_square"],
          "evaluation": ["dice", "eye", "sailboat", "striped_ring", "mushroom", "pine_tree", "flower", "bullseye",
                         "ladybug", "traffic_light", "smiley"]}
# no effect on a run's results (--tuned: its values are compared instead, per method)
RUN_ONLY = ("out", "jobs", "quiet", "resume", "device", "chunk", "methods", "seeds", "tuned")
QUICK = dict(tasks=2, methods="seq,ewc-dc", seeds=1, n_real=8, dc_timesteps=5)  # training as in the full run
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def code_version():
    """The commit the code runs at, "+changes" when a .py file differs from it (None outside a git clone): every run
    records it, so that runs of different code in one results.json (--resume) can be told apart."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", "*.py") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(path, obj):
    """Written whole or not at all: bench/tune.py reads these files while runs still write them."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def in_repo(path):
    """A path inside the repository, written relative to it, so that a report reads (and resumes) the same in every
    clone; any other path as given."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else path


# ---------------------------------------------------------------------------------------------------------------
# metrics


def apf(acc):
    """A, P, F from acc [N, N] with acc[i, m] = acc_i(m) for m >= i (0-based; entries below m < i unused)."""
    acc = np.asarray(acc, dtype=np.float64)
    N = len(acc)
    A = acc[:, -1].mean()
    P = np.diag(acc).mean()
    F_ = np.mean([acc[i, i:N - 1].max() - acc[i, -1] for i in range(N - 1)]) if N > 1 else float("nan")
    return float(A), float(P), float(F_)


def a_after_each_task(acc):
    """[A after task m for each m]: the mean of acc_i(m) over the concepts i <= m learned so far (the last is A)."""
    acc = np.asarray(acc, dtype=np.float64)
    return [float(acc[:m + 1, m].mean()) for m in range(len(acc))]


def kid(x, y):
    """Unbiased MMD² between features x [m, d] and y [n, d], polynomial kernel (a·b/d + 1)³."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def nones(matrix):
    """A float matrix as nested lists for JSON, NaN (undefined entries) as None."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in np.asarray(matrix, dtype=float)]


def growth(state, folder):
    """What the state holds after a task: pool entries, parameter counts, bytes on disk."""
    numel = lambda tensors: int(sum(t.numel() for t in tensors))
    pairs = lambda ws: [t for w in ws for pair in w.values() for t in pair]
    out = {"pool": len(state.pool), "pool_params": numel(pairs(state.pool)),
           "lora_params": numel(pairs([state.lora] if state.lora else [])),
           "fisher_params": numel([*state.fisher.values(), *state.anchor.values()]),
           "token_params": numel(state.tokens.values()),
           "state_bytes": sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)}
    out["stored_params"] = out["pool_params"] + out["lora_params"] + out["fisher_params"] + out["token_params"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# concepts and judges


def in_order(folders, order):
    """The concepts in the order they are learned: as given, or reversed (`--order reverse`)."""
    return folders[::-1] if order == "reverse" else folders


def toy_concepts(args, tmp):
    """Training folders (examples/concepts/<name>, else the same images rendered into tmp) and fresh renders."""
    from toy import world
    if args.concepts:
        folders = args.concepts.split(",")[:args.tasks]
        unknown = [f for f in folders if os.path.basename(os.path.normpath(f)) not in world.CONCEPTS]
        if unknown:
            sys.exit(f"error: without --clip, concept folders must be named after toy concepts: {', '.join(unknown)}")
    else:
        order = SPLITS[args.split]
        if args.tasks > len(order):
            sys.exit(f"error: the {args.split} split has {len(order)} concepts, not {args.tasks}")
        folders = [os.path.join(ROOT, "examples", "concepts", n) for n in order[:args.tasks]]
        if not all(os.path.isdir(f) for f in folders):
            world.write_examples(os.path.join(tmp, "concepts"))
            folders = [f if os.path.isdir(f) else os.path.join(tmp, "concepts", os.path.basename(f)) for f in folders]
    folders = in_order(folders, args.order)
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    real = []
    for name in names:  # a seed stream that write_examples (seeds [0, i]) never uses: held out by construction
        rng = np.random.default_rng([7919, list(world.CONCEPTS).index(name)])
        x = np.stack([world.render_concept(name, rng) for _ in range(args.n_real)])
        real.append(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    return names, folders, real


def photo_concepts(args, tmp, resolution):
    """Folders of photos; with --holdout K the last K files of each are kept out of training for evaluation."""
    folders, names, real = [], [], []
    for folder in in_order(args.concepts.split(",")[:args.tasks], args.order):
        name = os.path.basename(os.path.normpath(folder))
        if not os.path.isdir(folder):
            sys.exit(f"error: concept folder {folder} does not exist")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(train.IMAGE_EXTENSIONS))
        if args.holdout:
            if len(files) <= args.holdout:
                sys.exit(f"error: {folder} has {len(files)} images, too few to hold out {args.holdout}")
            for sub, part in (("train", files[:-args.holdout]), ("eval", files[-args.holdout:])):
                os.makedirs(os.path.join(tmp, sub, name))
                for f in part:
                    os.symlink(os.path.abspath(os.path.join(folder, f)), os.path.join(tmp, sub, name, f))
            folder_train, folder_eval = os.path.join(tmp, "train", name), os.path.join(tmp, "eval", name)
        else:
            folder_train = folder_eval = folder
        images, _ = train.load_images(folder_eval, resolution)
        folders.append(folder_train), names.append(name), real.append((images + 1) / 2)
    return names, folders, real


def oracle_judge(names):
    """score(images [N,3,H,W] in [0,1]) -> (concept index into `names`, -1 for any other label [N]; features [N, d])."""
    from toy import oracle
    judge = oracle.load_oracle()

    def score(images):
        pred = oracle.predict(images, judge)["concept"]
        return np.array([names.index(p) if p in names else -1 for p in pred]), \
            oracle.features(images, judge).double().numpy()
    return score


def clip_judge(path, real, texts, device):
    """As oracle_judge, from a local CLIP folder; also returns the normalized text embeddings of `texts`."""
    from transformers import CLIPModel, CLIPTokenizer
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    mean, std = CLIP_MEAN, CLIP_STD
    if os.path.exists(os.path.join(path, "preprocessor_config.json")):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            cfg = json.load(f)
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    side = model.config.vision_config.image_size
    pooled = lambda out: F.normalize((out if torch.is_tensor(out) else out.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def embed(images):  # images are square already: resize, then CLIP's normalization
        x = F.interpolate(images.float(), size=side, mode="bicubic", antialias=True).clamp(0, 1)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return pooled(model.get_image_features(pixel_values=x.to(device))).cpu().double().numpy()

    with torch.no_grad():
        tok = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        text = pooled(model.get_text_features(**tok)).cpu().double().numpy()
    centroids = np.stack([embed(x).mean(0) for x in real])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

    def score(images):
        f = embed(images)
        return (f @ centroids.T).argmax(1), f
    return score, text


# ---------------------------------------------------------------------------------------------------------------
# one method, one seed


def generate(model, concept, i, seed, args):
    """args.n_samples images of a concept from noise fixed by (seed, concept index): only the model changes."""
    side, ch = model.unet.config["sample_size"], model.unet.config["in_channels"]
    latents = torch.randn(args.n_samples, ch, side, side, generator=torch.Generator().manual_seed(10_000 * seed + i))
    with torch.autocast("cuda", torch.bfloat16, enabled=model.device.type == "cuda"):
        return sample.sample(model, [concept["prompt"]] * args.n_samples, steps=args.sample_steps,
                             guidance=args.guidance, latents=latents).float()


@torch.no_grad()
def classify(unet, latents, contexts, alphas_cumprod, n_timesteps=25, seed=0, chunk=64):
    """Zero-shot classification (Li et al. 2023) of latents [B, C, h, w] among K prompt embeddings contexts [K, L, Cc]:
    the prompt with the lowest mean error over n_timesteps evenly spaced timesteps, the noise of each timestep the same
    for every prompt (dc_score.denoising_errors); at most `chunk` UNet rows per call. Returns the prompt indices [B]."""
    (B, K), T = (len(latents), len(contexts)), len(alphas_cumprod)
    grid = (torch.arange(n_timesteps) * T) // n_timesteps + T // (2 * n_timesteps)
    err, step = torch.zeros(B, K, device=latents.device), max(1, chunk // K)
    for j, t in enumerate(grid.tolist()):
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(hash((seed, j)))).to(latents)
        for s in range(0, B, step):
            err[s:s + step] += dc_score.denoising_errors(unet, latents[s:s + step], contexts, t, noise[s:s + step],
                                                         alphas_cumprod).float()
    return err.argmin(1)


@torch.no_grad()
def dc_accuracy(model, concepts, real, args, seed):
    """Per concept: share of its real images that the diffusion classifier puts on its prompt (among all learned)."""
    contexts = model.encode_text([c["prompt"] for c in concepts])
    accs = []
    for i in range(len(concepts)):
        x = real[i] if real[i].shape[-1] == model.resolution else \
            F.interpolate(real[i], size=model.resolution, mode="bilinear", antialias=True)
        latents = model.encode_images(x * 2 - 1)
        pred = classify(model.unet, latents, contexts, model.alphas_cumprod, args.dc_timesteps, seed, args.chunk)
        accs.append(float((pred.cpu() == i).float().mean()))
    return accs


def run_method(method, seed, args, hparams, names, folders, words, real, judge, real_feats, text, tmp):
    """Learn every concept in turn; after each task generate and score every concept so far."""
    N = len(folders)
    state_dir = os.path.join(tmp, f"state-{method}-{seed}")
    nan = np.full((N, N), np.nan)
    acc, sim, kids, clip_i, clip_t = nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy()
    confusion = np.zeros((N, N + 1))  # after the last task: share of concept i's images judged j (last column: other)
    tasks, samples = [], None
    state, hp = None, cp.Hparams(**{**hparams, "method": method, "seed": seed})
    for m, folder in enumerate(folders):
        started = time.time()
        model = unet.load_model(args.model, args.device)
        if state is None:
            state = cp.new_state(model, hp)
        else:
            state = cp_state.load_state(state_dir)
            cp_state.check_model(state, model)
            state.hparams = hp  # the run settings too, which a state does not store
        cp.apply_state(model, state)
        with torch.autocast("cuda", torch.bfloat16, enabled=args.device == "cuda"):
            state = train.learn_folder(model, state, folder, class_word=words[m], run=cp.Run(
                progress=None if args.quiet or args.jobs > 1 else train.Progress))
        cp_state.save_state(state, state_dir)
        lora.merge(model.unet)  # sampling and scoring only from here on: fold the LoRA(s) in
        trained = time.time()
        last = []
        for i, concept in enumerate(state.concepts):
            images = generate(model, concept, i, seed, args)
            pred, feats = judge(images)
            acc[i, m] = float(np.mean(pred == i))
            confusion[i] = np.bincount(np.where(pred < 0, N, pred), minlength=N + 1) / len(pred)
            sim[i, m] = cosine(feats.mean(0), real_feats[i].mean(0))
            kids[i, m] = kid(feats, real_feats[i])
            if text is not None:
                clip_i[i, m] = float((feats @ real_feats[i].T).mean())
                clip_t[i, m] = float((feats @ text[i]).mean())
            last.append(images[:args.grid_n])
        dc = dc_accuracy(model, state.concepts, real, args, seed) if m == N - 1 else None
        h = state.history[-1]
        tasks.append({"concept": names[m], "train_seconds": h["seconds"], "lora_norm": h["lora_norm"],
                      "eval_seconds": round(time.time() - trained, 1), "seconds": round(time.time() - started, 1),
                      "train_loss": h["train"], **growth(state, state_dir)})
        print(f"[{method} seed {seed}] task {m + 1}/{N} {names[m]}: train {h['seconds']:.0f}s, eval "
              f"{tasks[-1]['eval_seconds']:.0f}s | acc {' '.join(f'{a:.2f}' for a in acc[:m + 1, m])} | "
              f"lora norm {h['lora_norm']:.3g} | state {tasks[-1]['state_bytes'] / 1024:.0f} KB", flush=True)
        samples = last
    A, P, F_ = apf(acc)
    final = lambda a: float(np.mean(a[:, -1]))
    run = {"seed": seed, "hparams": asdict(state.hparams), "A": A, "P": P, "F": None if np.isnan(F_) else F_,
           "dc_acc": float(np.mean(dc)), "dc_acc_per_concept": dc, "feat_sim": final(sim), "kid": final(kids),
           "acc": nones(acc), "feat_sim_matrix": nones(sim), "kid_matrix": nones(kids),
           "confusion": confusion.tolist(), "tasks": tasks}
    if text is not None:
        run.update(clip_i=final(clip_i), clip_t=final(clip_t))
    shutil.rmtree(state_dir, ignore_errors=True)
    return run, samples


# ---------------------------------------------------------------------------------------------------------------
# outputs


def summarize(runs):
    """mean and std over seeds of every headline figure."""
    keys = ["A", "P", "F", "dc_acc", "feat_sim", "kid"] + [k for k in ("clip_i", "clip_t") if k in runs[0]]
    per_run = {k: [r[k] for r in runs] for k in keys}
    per_run["lora_norm"] = [r["tasks"][-1]["lora_norm"] for r in runs]
    per_run["train_s_per_task"] = [np.mean([t["train_seconds"] for t in r["tasks"]]) for r in runs]
    per_run["eval_s_per_task"] = [np.mean([t["eval_seconds"] for t in r["tasks"]]) for r in runs]
    out = {k: [float(np.mean(v)) if None not in v else None, float(np.std(v)) if None not in v else None]
           for k, v in per_run.items()}
    last, first = runs[0]["tasks"][-1], runs[0]["tasks"][0]
    out.update({k: last[k] for k in ("pool", "pool_params", "lora_params", "fisher_params", "token_params")})
    out["state_kb_first_last"] = [first["state_bytes"] / 1024, last["state_bytes"] / 1024]
    out["stored_params_first_last"] = [first["stored_params"], last["stored_params"]]
    out["lora_norm_per_task"] = np.mean([[t["lora_norm"] for t in r["tasks"]] for r in runs], 0).tolist()
    out["acc_mean"] = nones(np.mean([np.array(r["acc"], dtype=float) for r in runs], 0))
    out["A_per_task"] = [[float(np.mean(col)), float(np.std(col))] for col in zip(*(a_after_each_task(r["acc"])
                                                                                     for r in runs))]
    return out


def paired_to_seq(runs, score=lambda r: r["A"]):
    """{method: (mean, std) over seeds of score − `seq`'s score}, each seed against `seq`'s run of the same seed
    (and, a report being one order of the concepts, the same order): the seeds' shared draws cancel out. A score
    that is a list (A after each task) gives a list of (mean, std)."""
    seq = {r["seed"]: np.array(score(r)) for r in runs.get("seq", [])}
    diffs = {m: [np.array(score(r)) - seq[r["seed"]] for r in rs if r["seed"] in seq]
             for m, rs in runs.items() if m != "seq"}
    pairs = {m: (np.mean(d, 0), np.std(d, 0)) for m, d in diffs.items() if d}
    return {m: list(zip(mean.tolist(), std.tolist())) if mean.ndim else (float(mean), float(std))
            for m, (mean, std) in pairs.items()}


def seeds_ran(runs):
    """How many seeds each method ran: one number when they agree (a --resume with other --seeds can leave them
    apart)."""
    counts = {m: len(rs) for m, rs in runs.items()}
    if len(set(counts.values())) == 1:
        return str(next(iter(counts.values())))
    return ", ".join(f"`{m}` {n}" for m, n in counts.items())


def fmt(pair, digits=3):
    mean, std = pair
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report):
    s, N = report["summary"], len(report["concepts"])
    clip = "clip_i" in next(iter(s.values()))
    paired = paired_to_seq(report["runs"])
    quality = table(["method", "A ↑", "A − seq (paired) ↑", "P ↑", "F ↓", "DC acc ↑", "feat sim ↑", "KID ↓"] +
                    (["CLIP-I ↑", "CLIP-T ↑"] if clip else []),
                    [[f"`{k}`", fmt(x["A"]), fmt(paired[k]) if k in paired else "—", fmt(x["P"]), fmt(x["F"]),
                      fmt(x["dc_acc"]), fmt(x["feat_sim"]), fmt(x["kid"], 4)]
                     + ([fmt(x["clip_i"]), fmt(x["clip_t"])] if clip else []) for k, x in s.items()])
    cost = table(["method", "pool", "stored params (task 1 → N)", "state KB (task 1 → N)", "train s/task",
                  "eval s/task"],
                 [[f"`{k}`", str(x["pool"]), "{:,} → {:,}".format(*x["stored_params_first_last"]),
                   "{:.0f} → {:.0f}".format(*x["state_kb_first_last"]), fmt(x["train_s_per_task"], 1),
                   fmt(x["eval_s_per_task"], 1)] for k, x in s.items()])
    norms = table(["method"] + [f"task {m + 1}" for m in range(N)],
                  [[f"`{k}`"] + [f"{v:.3g}" for v in x["lora_norm_per_task"]] for k, x in s.items()])
    after_each = ["method"] + [f"after task {m + 1}" for m in range(N)]
    a_m = table(after_each, [[f"`{k}`"] + [fmt(v, 2) for v in x["A_per_task"]] for k, x in s.items()])
    paired_m = paired_to_seq(report["runs"], lambda r: a_after_each_task(r["acc"]))
    a_m_paired = table(after_each, [[f"`{k}`"] + [fmt(v, 2) for v in paired_m[k]] for k in s if k in paired_m])
    accs = table(["method"] + [f"{c} (final / learned)" for c in report["concepts"]],
                 [[f"`{k}`"] + [f"{x['acc_mean'][i][-1]:.2f} / {x['acc_mean'][i][i]:.2f}" for i in range(N)]
                  for k, x in s.items()])
    return "\n".join([
        f"Command: `{report['command']}`  ", f"Date: {report['date']}; machine: {report['machine']}  ",
        f"Concepts (in order): {', '.join(report['concepts'])}; seeds: {seeds_ran(report['runs'])}; "
        f"judge: {report['judge']} (accuracy on the real images {report['judge_acc_real']:.3f}); mean ± std over "
        "seeds; A − seq: each seed's A minus `seq`'s A at the same seed.", "", *quality, "",
        "A after each task (the mean of acc_i(m) over the concepts learned so far), mean ± std over seeds:", "",
        *a_m, "", *(["The same minus `seq`'s at the same seed (paired), mean ± std over seeds:", "", *a_m_paired, ""]
                    if paired_m else []),
        "What the state stores, and time:", "", *cost, "",
        "LoRA norm ‖ΔW‖ after each task (mean over seeds):", "", *norms, "",
        "acc_i(m) of each concept after the last task / right after it was learned (mean over seeds):", "", *accs,
        "", "![samples](grid.png)", "", "![accuracy over tasks](plot.png)", ""])


def to_pil(images, side):
    pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(p).resize((side, side), Image.BICUBIC) for p in pixels]


def draw_grid(samples, real, names, path, n):
    """Rows = concepts, columns = real images then each method, n images per cell, after the last task (seed 0)."""
    font = ImageFont.load_default()
    side = 64 if real[0].shape[-1] <= 64 else 128
    cols = {"real": [x[:n] for x in real], **samples}
    label_w, head_h, gap = 8 + 7 * max(len(s) for s in names), 16, 6
    cell = n * side + gap
    grid = Image.new("RGB", (label_w + cell * len(cols), head_h + side * len(names)), "white")
    d = ImageDraw.Draw(grid)
    for c, (col, per_concept) in enumerate(cols.items()):
        d.text((label_w + c * cell + 2, 2), col, fill="black", font=font)
        for r, images in enumerate(per_concept):
            for k, im in enumerate(to_pil(images, side)):
                grid.paste(im, (label_w + c * cell + k * side, head_h + r * side))
    for r, name in enumerate(names):
        d.text((4, head_h + r * side + side // 2 - 5), name, fill="black", font=font)
    grid.save(path)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (120, 120, 255)]


def draw_plot(summary, names, path):
    """One panel per method: acc_i(m) of each concept i over tasks m >= i (mean over seeds)."""
    font = ImageFont.load_default()
    W, H, ml, mt, mb, per_row = 260, 190, 34, 20, 24, 4
    N, methods = len(names), list(summary)
    rows = -(-len(methods) // per_row)
    legend_h = 16 * (-(-N // 3)) + 8
    img = Image.new("RGB", (W * min(per_row, len(methods)), H * rows + legend_h), "white")
    d = ImageDraw.Draw(img)
    for k, method in enumerate(methods):
        ox, oy = (k % per_row) * W, (k // per_row) * H
        x0, x1, y0, y1 = ox + ml, ox + W - 10, oy + H - mb, oy + mt
        px = lambda m: x0 + (x1 - x0) * (m / max(N - 1, 1))
        py = lambda a: y0 - (y0 - y1) * a
        d.text((ox + ml, oy + 4), method, fill="black", font=font)
        d.rectangle([x0, y1, x1, y0], outline="black")
        for a in (0, 0.5, 1):
            d.line([x0 - 3, py(a), x0, py(a)], fill="black")
            d.text((ox + 4, py(a) - 5), f"{a:.1f}", fill="black", font=font)
        for m in range(N):
            d.text((px(m) - 3, y0 + 4), str(m + 1), fill="black", font=font)
        acc = summary[method]["acc_mean"]
        for i in range(N):
            pts = [(px(m), py(acc[i][m])) for m in range(i, N)]
            if len(pts) > 1:
                d.line(pts, fill=PALETTE[i % len(PALETTE)], width=2)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=PALETTE[i % len(PALETTE)])
    for i, name in enumerate(names):
        x, y = 10 + (i % 3) * 200, H * rows + 4 + 16 * (i // 3)
        d.rectangle([x, y + 2, x + 12, y + 10], fill=PALETTE[i % len(PALETTE)])
        d.text((x + 18, y), f"{i + 1}: {name}", fill="black", font=font)
    img.save(path)


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description="Continual-personalization benchmark: A, P, F, DC accuracy, KID, growth.")
    p.add_argument("--out", default="runs/continual", help="folder for results.md, results.json, grid.png, plot.png")
    p.add_argument("--quick", action="store_true", help=f"small run: {QUICK} (flags given explicitly win)")
    p.add_argument("--model", default=os.path.join(ROOT, "toy", "model"), help="diffusers folder or checkpoint")
    p.add_argument("--concepts", help="comma-separated concept folders (default: the first --tasks toy concepts of "
                   "--split)")
    p.add_argument("--split", choices=list(SPLITS), default="evaluation", help="which toy concepts (default: the "
                   "evaluation sequence; tuning happens on the other one)")
    p.add_argument("--tuned", help="JSON {method: {hparam: value}} of per-method values over presets.json's; flags "
                   "given explicitly win")
    p.add_argument("--no-presets", action="store_true", help="cp.Hparams' defaults, not presets.json's model and "
                   "method presets (bench/tune.py's cells set every value they tune)")
    p.add_argument("--class-words", help="comma-separated class words, one per concept (real-model mode)")
    p.add_argument("--clip", help="local CLIP folder (transformers.CLIPModel + tokenizer), the judge in place of "
                   "the oracle")
    p.add_argument("--holdout", type=int, default=0, help="with --clip: last K photos of each folder kept out of "
                   "training and used as the real images (0: the training photos are the real images)")
    p.add_argument("--tasks", type=int, help=f"number of concepts (default {FULL['tasks']})")
    p.add_argument("--order", choices=["forward", "reverse"], default="forward", help="learn the --tasks concepts "
                   "in their order, or in reverse")
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--seeds", type=int, help=f"number of seeds (default {FULL['seeds']})")
    p.add_argument("--n-samples", type=int, help=f"images generated per concept and task (default {FULL['n_samples']})")
    p.add_argument("--n-real", type=int, help=f"real images per toy concept (default {FULL['n_real']}; "
                   f"{QUICK['n_real']} with --quick)")
    p.add_argument("--sample-steps", type=int, help=f"DDIM steps (default {FULL['sample_steps']})")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--dc-timesteps", type=int, help=f"timesteps of the DC accuracy (default {FULL['dc_timesteps']}; "
                   f"{QUICK['dc_timesteps']} with --quick)")
    p.add_argument("--chunk", type=int, default=64, help="most UNet rows per call in the DC accuracy")
    p.add_argument("--grid-n", type=int, default=3, help="samples per cell of the grid")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=1, help="(method, seed) runs in parallel processes; on a CPU with few "
                   "cores 2 jobs of 1 thread each beat 1 job of 2 threads (the tiny model is too small to scale)")
    p.add_argument("--quiet", action="store_true", help="no per-step training progress")
    p.add_argument("--resume", action="store_true", help="keep the (method, seed) runs an interrupted run with the "
                   "same settings already finished in --out, run the rest")
    train.add_hparam_flags(p, skip=("method", "seed"))  # the training flags of train.py
    args = p.parse_args(argv)
    for k, v in {**FULL, **(QUICK if args.quick else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.clip and not args.concepts:
        p.error("--clip needs --concepts (folders of photos)")
    if args.holdout == 1:
        p.error("--holdout must be 0 or at least 2 (KID needs two real images per concept)")
    if args.concepts and args.tasks > len(args.concepts.split(",")):
        args.tasks = len(args.concepts.split(","))
    return args


def setup(args, tmp, resolution):
    """The concepts (names, training folders, class words), the real images and the judge."""
    if args.clip:
        names, folders, real = photo_concepts(args, tmp, resolution)
        words = args.class_words.split(",") if args.class_words else [None] * len(names)
        texts = [f"a photo of a {w or n.replace('_', ' ')}" for w, n in zip(words, names)]
        judge, text = clip_judge(args.clip, real, texts, args.device)
        judge_name = f"CLIP {args.clip}"
    else:
        names, folders, real = toy_concepts(args, tmp)
        words, text = [None] * len(names), None
        judge, judge_name = oracle_judge(names), "toy oracle (toy/oracle.py)"
    scored = [judge(x) for x in real]
    return dict(names=names, folders=folders, words=words, real=real, judge=judge, text=text, judge_name=judge_name,
                real_pred=[p for p, _ in scored], real_feats=[f for _, f in scored])


_WORKER = {}  # what _run_job needs, per process: set by main (--jobs 1) or by a worker's first job


def _init_worker(args, hparams, tmp, resolution):
    torch.set_num_threads(max(1, torch.get_num_threads() // args.jobs))
    _WORKER.update(args=args, hparams=hparams, tmp=tempfile.mkdtemp(dir=tmp), resolution=resolution)


def _run_job(job):
    method, seed = job
    w = _WORKER
    if "ctx" not in w:  # in a job, not in the initializer: an error here reaches main instead of killing the worker
        w["ctx"] = setup(w["args"], w["tmp"], w["resolution"])
    c = w["ctx"]
    run, samples = run_method(method, seed, w["args"], w["hparams"][method], c["names"], c["folders"], c["words"],
                              c["real"], c["judge"], c["real_feats"], c["text"], w["tmp"])
    return method, run, samples


def method_hparams(args, methods, model_values=None):
    """{method: the hparams it runs with beyond cp.Hparams' defaults}, as train.py resolves them for a new state:
    the model preset (model_values), the method's preset (none with --no-presets), --tuned's values, the flags."""
    given = {f.name: getattr(args, f.name) for f in fields(cp.Hparams)
             if f.name not in ("method", "seed") and getattr(args, f.name) is not None}
    tuned = {}
    if args.tuned:
        with open(args.tuned) as f:
            tuned = json.load(f)
    presets = {} if args.no_presets else train.load_presets()["methods"]
    out = {m: {**(model_values or {}), **presets.get(m, {}), **tuned.get(m, {}), **given} for m in methods}
    for m in methods:
        try:
            cp.check_hparams(cp.Hparams(**out[m], method=m))
        except (TypeError, cp.CPError) as e:
            sys.exit(f"error: {m}: {e}")
    return out


def main(argv=None):
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in (["bench/continual.py"] + list(argv or sys.argv[1:])))
    print(command, flush=True)
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in cp.METHODS]
    if bad:
        sys.exit(f"error: unknown method(s) {', '.join(bad)} (choose from {', '.join(cp.METHODS)})")
    os.makedirs(args.out, exist_ok=True)
    tmp, pool = tempfile.mkdtemp(prefix="cp-continual-"), None
    try:
        base = unet.load_model(args.model, "cpu")  # fails early on a bad --model
        resolution = base.resolution
        hparams = method_hparams(args, methods, None if args.no_presets else
                                 train.model_preset(train.load_presets(), train.unet_size(args.model))[1])
        del base
        ctx = setup(args, tmp, resolution)
        judge_acc = float(np.mean([np.mean(pred == i) for i, pred in enumerate(ctx["real_pred"])]))
        print(f"judge: {ctx['judge_name']}; its accuracy on the real images: {judge_acc:.3f}", flush=True)
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else \
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": device_name,
                  "judge": ctx["judge_name"], "judge_acc_real": judge_acc, "concepts": ctx["names"],
                  "seeds": args.seeds, "args": {**vars(args), "model": in_repo(args.model)}, "hparams": hparams,
                  "runs": {}, "summary": {}}
        names, real = ctx["names"], ctx["real"]
        grid, earlier = {}, 0.0
        results_path, samples_dir = os.path.join(args.out, "results.json"), os.path.join(args.out, "samples")
        settings = lambda r: ({k: v for k, v in r["args"].items() if k not in RUN_ONLY}, r["concepts"])
        if args.resume and os.path.exists(results_path):
            with open(results_path) as f:
                old = json.load(f)
            if settings(old) != settings(report) or \
                    any(old["hparams"][m] != hparams[m] for m in methods if m in old["runs"]):
                sys.exit(f"error: {results_path} was made with other settings; --resume needs the same ones")
            report["runs"] = old["runs"]  # a method not in --methods this time keeps its runs too
            report["hparams"] = {**old["hparams"], **hparams}
            report["summary"] = {m: summarize(r) for m, r in report["runs"].items()}
            for m, runs in report["runs"].items():
                path = os.path.join(samples_dir, f"{m}.safetensors")  # seed 0's samples make the grid picture
                if not any(r["seed"] == 0 for r in runs):
                    continue
                if os.path.exists(path):
                    grid[m] = list(load_file(path)["samples"])
                else:
                    print(f"note: {path} is missing (samples are not kept in git): {m} has no column in "
                          "grid.png", flush=True)
            earlier = old.get("seconds_so_far", 0.0)
            print(f"resuming: {sum(map(len, report['runs'].values()))} runs kept from {results_path}", flush=True)
        os.makedirs(samples_dir, exist_ok=True)
        done = {(m, r["seed"]) for m, runs in report["runs"].items() for r in runs}
        started, version = time.time(), code_version()
        jobs = [(method, seed) for method in methods for seed in range(args.seeds) if (method, seed) not in done]
        if args.jobs > 1:  # independent (method, seed) runs in worker processes, each with its own copy of setup()
            pool = multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_init_worker,
                                                             initargs=(args, hparams, tmp, resolution))
            results = pool.imap_unordered(_run_job, jobs)
        else:
            _WORKER.update(args=args, hparams=hparams, tmp=tmp, ctx=ctx)
            results = map(_run_job, jobs)
        for method, run, samples in results:  # each finished run is on disk at once, so --resume can keep it
            report["runs"].setdefault(method, []).append({**run, "commit": version})
            report["runs"][method].sort(key=lambda r: r["seed"])
            report["summary"][method] = summarize(report["runs"][method])
            if run["seed"] == 0:
                grid[method] = samples
                save_file({"samples": torch.stack(samples)}, os.path.join(samples_dir, f"{method}.safetensors"))
            report["seconds_so_far"] = round(earlier + time.time() - started, 1)
            write_json(results_path, report)
            s = report["summary"][method]
            if len(report["runs"][method]) == args.seeds:
                print(f"== {method}: A {fmt(s['A'])}  P {fmt(s['P'])}  F {fmt(s['F'])}  DC acc {fmt(s['dc_acc'])}  "
                      f"({time.time() - started:.0f}s so far)", flush=True)
        order = methods + [m for m in report["runs"] if m not in methods]  # the table in the order of --methods
        report["runs"] = {m: report["runs"][m] for m in order}
        report["summary"] = {m: report["summary"][m] for m in order}
        report["total_seconds"] = round(earlier + time.time() - started, 1)
        write_json(results_path, report)
        table = markdown(report)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table + f"\nTotal time: {report['total_seconds']:.0f} s.\n")
        draw_grid(grid, real, names, os.path.join(args.out, "grid.png"), args.grid_n)
        draw_plot(report["summary"], names, os.path.join(args.out, "plot.png"))
        print("\n" + table)
        print(f"wrote {args.out}/results.md, results.json, grid.png, plot.png in {report['total_seconds']:.0f} s")
    except (cp.CPError, unet.LoadError) as e:
        sys.exit(f"error: {e}")
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    # a SIGTERM (kill, a job scheduler) exits through main's `finally`, which ends the worker processes too; without
    # this the parent would die alone and --jobs workers would go on training with no one to collect their runs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
