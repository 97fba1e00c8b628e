"""Continual personalization: learn concepts one at a time, keep no image, forget as little as possible.

Task n brings concept c_n (a folder of images, a new token `<name>`, the prompt "a photo of a <name>"). The
pretrained concept c₀ is a prompt the base model already knows ("a photo of a {class word}"). With φ the LoRA
parameters, t ~ U{0..T−1} and ε ~ N(0, I) (DESIGN.md section 6; Jha et al., ICLR 2025):

    L_denoise = E ‖ε − ε_φ(x_t, t, c_n)‖²                      (mean over dims)
    L_DC      = E[−log p_φ(c_n | x)],  p_φ(c_i | x) = softmax_i(−e_i / τ) over a subset S ∋ c_n, c₀
    EWC       = (λ/2) Σ F*(φ − φ*)²,   F̂ = E[(∇_φ L)²] at the end of a task,  F* ← γ F* + F̂
                (L = L_denoise for `ewc`; L = L_denoise + δ L_DC for `ewc-dc`: the DC-informed Fisher)
    C-LoRA    = λ_c Σ_layers ‖(Σ_{m<n} B_m A_m) ⊙ (B_n A_n)‖²
    DSC       = w_h [H(p_T1, p_S) + H(p_T2, p_S)] + w_n [‖ε_T1(c_n) − ε_S(c_n)‖² + ‖ε_T2(c_j) − ε_S(c_j)‖²]

L_denoise and L_DC come from one UNet batch: the first `dc_batch` images under every prompt of S (the target's
column serves both terms), the other images under the target only.
The state (weights, tokens, Fisher, anchor, the LoRA pool, a JSON manifest) is saved file by file under new
names, then the manifest, which names them, replaces the old one: an interrupted save leaves the old state whole.
"""
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

import dc_score
import lora
from kernels import dc_errors
from unet import add_noise

METHODS = ("seq", "ti", "clora", "ewc", "ewc-dc", "dsc", "dsc-ewc", "dsc-ewc-dc")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST = "manifest.json"


class CPError(Exception):
    """Bad input or a failed run, reported to the user as one line."""


@dataclass
class Hparams:
    """Every knob of a task (each one a train.py flag). README "Defaults" says how each value was chosen."""
    method: str = "ewc-dc"
    steps: int = 600               # optimizer steps on the new concept
    batch_size: int = 8
    lr: float = 1e-2               # LoRA learning rate
    token_lr: float = 5e-2         # learning rate of the new token's embedding row
    rank: int = 8
    alpha: float = 8.0
    targets: str = "kv"            # LoRA placement: "kv" (attn2.to_k/to_v) or "attn" (q/k/v/out of all attention)
    ewc_lambda: float = 1e4        # λ: weight of the EWC penalty
    ewc_gamma: float = 0.9         # γ: online-EWC decay of the accumulated Fisher
    fisher_samples: int = 16       # per-sample gradients averaged into F̂
    dc_weight: float = 1e-4        # δ: weight of L_DC (ewc-dc) and of the DC term in the Fisher
    dc_temp: float = 0.01          # τ of the DC posterior over mean-over-dims errors (the paper's τ=1 on sums is 1/D)
    dc_k: int = 5                  # k: most prompts in the DC subset S
    dc_batch: int = 2              # images of each batch that L_DC scores under all of S (its cost grows with k)
    clora_lambda: float = 1e3      # λ_c: C-LoRA self-regularization
    dsc_steps: int = 100           # consolidation steps after training (dsc*)
    dsc_w_h: float = 1.0           # w_h: weight of the DC-score distillation
    dsc_w_n: float = 1.0           # w_n: weight of the noise-prediction distillation
    seed: int = 0

    def uses(self, part):
        """Which ingredients the method combines: 'lora', 'ewc', 'dc', 'dsc', 'clora'."""
        m = self.method
        return {"lora": m != "ti", "ewc": "ewc" in m, "dc": m.endswith("ewc-dc"),
                "dsc": m.startswith("dsc"), "clora": m == "clora"}[part]


@dataclass
class State:
    """Everything carried from task to task: no image, no latent, only weights and statistics."""
    model: dict                                    # {"path", "fingerprint"}
    hparams: dict
    concepts: list = field(default_factory=list)   # [{"name", "token", "prompt", "class_word", "task"}]
    history: list = field(default_factory=list)    # per-task metrics
    lora: dict = None                              # {module path: (A, B)} of the carried LoRA (not clora / ti)
    pool: list = field(default_factory=list)       # one {module path: (A, B)} per task: the LoRA after that task
    tokens: dict = field(default_factory=dict)     # token → embedding row
    fisher: dict = field(default_factory=dict)     # "path.A" / "path.B" → F*
    anchor: dict = field(default_factory=dict)     # "path.A" / "path.B" → φ*


# ---------------------------------------------------------------------------------------------------------------
# concepts and images


def concept_prompt(token, class_word=None):
    return f"a photo of a {token}" + (f" {class_word}" if class_word else "")


def base_prompt(class_word=None):
    """The pretrained concept c₀: something the base model already draws."""
    return f"a photo of a {class_word}" if class_word else "a photo"


def load_images(folder, resolution):
    """Images of a concept folder as a tensor [N, 3, R, R] in [−1, 1]: any mode → RGB, resize + center crop.

    Files without an image extension are skipped (and named in the returned notes); an image that cannot be
    decoded is an error naming it.
    """
    if not os.path.isdir(folder):
        raise CPError(f"concept folder {folder} does not exist")
    images, skipped = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.isdir(path):
            continue
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(name)
            continue
        try:
            with Image.open(path) as im:
                im.load()
                images.append(to_square_rgb(im, resolution))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise CPError(f"cannot read image {path}: {e}") from None
    if not images:
        raise CPError(f"concept folder {folder} has no images" + (f" (skipped {', '.join(skipped)})" if skipped else ""))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [f"skipped non-image file {s}" for s in skipped]


def to_square_rgb(im, size):
    if im.mode in ("RGBA", "LA", "P", "PA"):  # transparent pixels become white
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    im = im.convert("RGB")
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def add_tokens(model, tokens):
    """Make each token one vocabulary entry with its own embedding row; set the rows given as tensors.

    Returns the id of every token. A token that is not yet in the vocabulary gets a row initialised at the mean
    embedding (a neutral start for textual inversion).
    """
    new = [t for t in tokens if t not in model.tokenizer.get_vocab()]
    if new:
        model.tokenizer.add_tokens(new)
        emb = model.text_encoder.get_input_embeddings().weight
        mean = emb.detach().mean(0)
        model.text_encoder.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
        emb = model.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for t in new:
                emb[model.tokenizer.convert_tokens_to_ids(t)] = mean
    ids = {t: model.tokenizer.convert_tokens_to_ids(t) for t in tokens}
    with torch.no_grad():
        emb = model.text_encoder.get_input_embeddings().weight
        for t, row in tokens.items():
            if row is not None:
                emb[ids[t]] = row.to(emb)
    return ids


def trainable_row(model, token_id):
    """A trainable copy of one token's embedding row, spliced into the embedding lookup by a forward hook.

    The optimizer then holds this row alone: training the whole matrix under a gradient mask would carry its
    gradient and AdamW's two moments, about 450 MB at SD's 49,408 × 768 in fp32, for one row. Remove the hook
    and write the row back when done.
    """
    emb = model.text_encoder.get_input_embeddings()
    row = torch.nn.Parameter(emb.weight[token_id].detach().clone())

    def splice(module, args, out):
        return torch.where((args[0] == token_id).unsqueeze(-1), row.to(out.dtype), out)

    return row, emb.register_forward_hook(splice)


# ---------------------------------------------------------------------------------------------------------------
# putting a state's weights into the model


def apply_state(model, state):
    """Load a state's tokens and LoRA(s) into a freshly loaded model, ready to sample or to continue."""
    add_tokens(model, state.tokens)
    hp = Hparams(**state.hparams)
    if hp.method == "clora":
        for i, weights in enumerate(state.pool):
            install_adapter(model.unet, f"task{i}", weights, hp)
    elif state.lora is not None:
        install_adapter(model.unet, "current", state.lora, hp)


def install_adapter(unet, name, weights, hp):
    lora.inject(unet, hp.targets, hp.rank, hp.alpha, name)
    if weights is not None:
        lora.set_adapter(unet, name, weights)
    return lora.lora_parameters(unet, [name])


def snapshot(unet, name):
    return {p: (A.detach().clone(), B.detach().clone()) for p, (A, B) in lora.get_adapter(unet, name).items()}


def flat(weights):
    """{path: (A, B)} → {"path.A": A, "path.B": B}, the naming of the Fisher and the anchor."""
    return {f"{p}.{ab}": t for p, pair in weights.items() for ab, t in zip("AB", pair)}


# ---------------------------------------------------------------------------------------------------------------
# the losses


def ewc_penalty(unet, name, state, hp):
    """(λ/2) Σ F*(φ − φ*)² over the adapter's parameters."""
    if not state.fisher:
        return torch.zeros(())
    live = flat(lora.get_adapter(unet, name))
    return hp.ewc_lambda / 2 * sum((state.fisher[k].to(p) * (p - state.anchor[k].to(p)) ** 2).sum()
                                   for k, p in live.items())


def clora_penalty(unet, name, hp):
    """λ_c Σ_layers ‖(Σ_{m<n} s_m B_m A_m) ⊙ (s_n B_n A_n)‖², s = α/r; the old sum is constant."""
    total = torch.zeros(())
    for _, m in unet.named_modules():
        if isinstance(m, lora.LoRALinear) and name in m.lora_A and len(m.lora_A) > 1:
            old = sum(m.delta(n) for n in m.lora_A if n != name).detach()
            total = total + (old * m.delta(name)).square().sum()
    return hp.clora_lambda * total


class Batches:
    """Random batches of current-task latents, sampled from the VAE posterior each time (held in memory only)."""

    def __init__(self, model, images, batch_size, gen):
        with torch.no_grad():
            mean, std = model.vae.encode(images.to(model.device, model.dtype))
        self.mean, self.std, self.scale = mean, std, model.scaling_factor
        self.batch_size, self.gen = batch_size, gen

    def __call__(self, n=None):
        idx = torch.randint(0, len(self.mean), (n or self.batch_size,), generator=self.gen)
        eps = torch.randn(self.mean[idx].shape, generator=self.gen).to(self.mean)
        return (self.mean[idx] + self.std[idx] * eps) * self.scale


def draw_noise(model, x0, gen):
    t = torch.randint(0, len(model.alphas_cumprod), (x0.shape[0],), generator=gen).to(model.device)
    return t, torch.randn(x0.shape, generator=gen).to(x0)


def task_loss(model, x0, prompts, hp, gen):
    """L_denoise (+ δ·L_DC when the method uses DC) from one UNet batch: the first `dc_batch` images under all K
    prompts of S (target first; that column also serves L_denoise), the other images under the target only."""
    t, eps = draw_noise(model, x0, gen)
    context = model.encode_text(prompts)
    B, K, dev = len(x0), len(prompts), x0.device
    n_dc = min(hp.dc_batch, B) if hp.uses("dc") and K > 1 else 0
    image = torch.cat([torch.arange(n_dc).repeat_interleave(K), torch.arange(n_dc, B)]).to(dev)  # UNet rows
    prompt = torch.cat([torch.arange(K).repeat(n_dc), torch.zeros(B - n_dc, dtype=torch.long)]).to(dev)
    pred = model.unet(add_noise(x0, eps, t, model.alphas_cumprod)[image], t[image], context[prompt])
    split, errors, terms = n_dc * K, [], {}
    if n_dc:
        e_dc = dc_errors(pred[:split].view(n_dc, K, *x0.shape[1:]), eps[:n_dc], "mean")
        errors.append(e_dc[:, 0])
        terms["dc"] = hp.dc_weight * dc_score.dc_cross_entropy(e_dc, 0, hp.dc_temp).mean()
    if n_dc < B:
        errors.append(dc_errors(pred[split:].unsqueeze(1), eps[n_dc:], "mean")[:, 0])
    return {"denoise": torch.cat(errors).mean(), **terms}


def dc_subset(state, target, c0, hp, rng):
    """S: the current concept first, then c₀, then random earlier concepts, at most k prompts."""
    earlier = [c["prompt"] for c in state.concepts]
    return [target, c0] + rng.sample(earlier, min(len(earlier), max(hp.dc_k - 2, 0)))


def teacher_outputs(model, name, x0, context, t, eps):
    """Noise predictions [B, K, ...] and errors [B, K] of the model with only adapter `name` (None: base) on."""
    names = lora.adapter_names(model.unet)
    for n in names:
        lora.set_enabled(model.unet, n, n == name)
    with torch.no_grad():
        e, pred = dc_score.denoising_errors(model.unet, x0, context, t, eps, model.alphas_cumprod, "mean",
                                            return_pred=True)
    return e, pred


def dsc_loss(model, x0, prompts, j_index, teacher2, hp, gen):
    """L_DSC over the subset [c_n, c₀, (c_j)]: teachers T1 ("teacher1") and T2 (`teacher2`, None = base model)."""
    t, eps = draw_noise(model, x0, gen)
    context = model.encode_text(prompts)
    e1, pred1 = teacher_outputs(model, "teacher1", x0, context, t, eps)
    e2, pred2 = teacher_outputs(model, teacher2, x0, context, t, eps)
    for n in lora.adapter_names(model.unet):
        lora.set_enabled(model.unet, n, n == "current")
    e, pred = dc_score.denoising_errors(model.unet, x0, context, t, eps, model.alphas_cumprod, "mean",
                                        return_pred=True)
    p1, p2 = dc_score.posterior(e1, hp.dc_temp), dc_score.posterior(e2, hp.dc_temp)
    return {"dsc_h": hp.dsc_w_h * (dc_score.soft_cross_entropy(p1, e, hp.dc_temp) +
                                   dc_score.soft_cross_entropy(p2, e, hp.dc_temp)).mean(),
            "dsc_n": hp.dsc_w_n * ((pred[:, 0] - pred1[:, 0]).square().mean() +
                                   (pred[:, j_index] - pred2[:, j_index]).square().mean())}


def fisher_diagonal(model, params, batches, prompts_fn, hp, gen):
    """F̂ = mean over single images of (∇_φ L)², L = L_denoise (+ δ L_DC for the DC-informed Fisher)."""
    squares = [torch.zeros_like(p) for p in params]
    for _ in range(hp.fisher_samples):
        loss = sum(task_loss(model, batches(1), prompts_fn(), hp, gen).values())
        grads = torch.autograd.grad(loss, params)
        for s, g in zip(squares, grads):
            s += g.detach() ** 2
    return [s / hp.fisher_samples for s in squares]


# ---------------------------------------------------------------------------------------------------------------
# one task


class Progress:
    """One updating line: step, loss terms, it/s, ETA."""

    def __init__(self, total, label, stream=sys.stderr):
        self.total, self.label, self.stream, self.start = total, label, stream, time.time()

    def __call__(self, step, terms):
        elapsed = time.time() - self.start
        rate = step / max(elapsed, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        losses = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        print(f"\r{self.label} {step}/{self.total} | {losses} | {rate:.2f} it/s | ETA {eta:.0f}s ",
              end="\n" if step == self.total else "", file=self.stream, flush=True)


def optimize(params_groups, steps, loss_fn, label, log):
    """AdamW over the given parameter groups; stops with CPError on a non-finite loss."""
    opt = torch.optim.AdamW(params_groups, weight_decay=0.0)
    progress = Progress(steps, label) if log else None
    terms = {}
    for step in range(1, steps + 1):
        terms = loss_fn()
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise CPError(f"non-finite loss at {label} step {step} ({', '.join(f'{k}={v.item():.3g}' for k, v in terms.items())}); "
                          "try a lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step % 5 == 0 or step == steps):
            progress(step, {k: v.item() for k, v in terms.items()})
    return {k: v.item() for k, v in terms.items()}


def learn_concept(model, state, folder, name=None, class_word=None, log=True):
    """Learn one concept on top of `state` (already applied to `model`); returns the new state (unsaved)."""
    hp = Hparams(**state.hparams)
    name = name or os.path.basename(os.path.normpath(folder))
    token = f"<{name}>"
    if any(c["name"] == name for c in state.concepts):
        raise CPError(f"concept {name!r} is already learned in this state (use --name to pick another name)")
    images, notes = load_images(folder, model.resolution)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    task = len(state.concepts)
    seed = hp.seed * 1000 + task
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    started = time.time()

    # the new token: its embedding row trains during this task only
    ids = add_tokens(model, {**{t: None for t in state.tokens}, token: None})
    row, hook = trainable_row(model, ids[token])
    groups = [{"params": [row], "lr": hp.token_lr}]

    adapter = None
    if hp.uses("lora"):
        adapter = f"task{task}" if hp.uses("clora") else "current"
        if adapter not in lora.adapter_names(model.unet):
            install_adapter(model.unet, adapter, None, hp)
        groups.append({"params": lora.set_trainable(model.unet, adapter), "lr": hp.lr})
    params = lora.lora_parameters(model.unet, [adapter]) if adapter else []

    target, c0 = concept_prompt(token, class_word), base_prompt(class_word)
    batches = Batches(model, images, hp.batch_size, gen)
    prompts_fn = (lambda: dc_subset(state, target, c0, hp, rng)) if hp.uses("dc") else (lambda: [target])

    # the state keeps the EWC statistics on the CPU: move them to the LoRA's device once, not at every step
    ewc_stats = replace(state, fisher={k: v.to(model.device) for k, v in state.fisher.items()},
                        anchor={k: v.to(model.device) for k, v in state.anchor.items()})

    def train_loss():
        terms = task_loss(model, batches(), prompts_fn(), hp, gen)
        if hp.uses("ewc"):
            terms["ewc"] = ewc_penalty(model.unet, adapter, ewc_stats, hp)
        if hp.uses("clora"):
            terms["clora"] = clora_penalty(model.unet, adapter, hp)
        return terms

    metrics = {"task": task, "name": name, "images": len(images)}
    try:
        metrics["train"] = optimize(groups, hp.steps, train_loss, f"[{name}] train", log)
    finally:  # a failed task must not leave the row spliced into a model that may be used again
        hook.remove()
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[ids[token]] = row
    new_tokens = {**state.tokens, token: row.detach().clone().cpu()}

    fisher, anchor = state.fisher, state.anchor
    if hp.uses("dsc"):
        teacher1 = snapshot(model.unet, adapter)
        install_adapter(model.unet, "teacher1", teacher1, hp)
        teacher2 = None
        if state.pool:
            teacher2 = "teacher2"
            install_adapter(model.unet, teacher2, None, hp)
        lora.set_trainable(model.unet, adapter)

        def consolidation_loss():
            j = rng.randrange(len(state.concepts)) if state.concepts else None
            if j is not None:
                lora.set_adapter(model.unet, teacher2, state.pool[j])
            prompts = [target, c0] + ([state.concepts[j]["prompt"]] if j is not None else [])
            terms = dsc_loss(model, batches(), prompts, len(prompts) - 1, teacher2, hp, gen)
            if hp.uses("ewc"):
                terms["ewc"] = ewc_penalty(model.unet, adapter, ewc_stats, hp)
            return terms

        metrics["consolidate"] = optimize([{"params": params, "lr": hp.lr}], hp.dsc_steps, consolidation_loss,
                                          f"[{name}] consolidate", log)
        for n in ("teacher1", teacher2):
            if n:
                lora.remove(model.unet, n)
        lora.set_enabled(model.unet, adapter, True)

    final = {p: (A.cpu(), B.cpu()) for p, (A, B) in snapshot(model.unet, adapter).items()} if adapter else {}
    if hp.uses("ewc"):
        f_hat = fisher_diagonal(model, params, batches, prompts_fn, hp, gen)
        anchor = flat(final)
        fisher = {k: hp.ewc_gamma * state.fisher.get(k, 0) + f.cpu() for k, f in zip(anchor, f_hat)}
        metrics["fisher_mean"] = float(np.mean([f.mean().item() for f in fisher.values()]))

    for p in params:
        p.requires_grad_(False)
    metrics["lora_norm"] = float(sum(((B @ A) * hp.alpha / hp.rank).square().sum() for A, B in final.values()) ** 0.5)
    metrics["seconds"] = round(time.time() - started, 1)
    concept = {"name": name, "token": token, "prompt": target, "class_word": class_word, "task": task}
    return State(model=state.model, hparams=state.hparams, concepts=state.concepts + [concept],
                 history=state.history + [metrics],
                 lora=None if hp.uses("clora") or not adapter else final,
                 pool=state.pool + ([final] if adapter else []), tokens=new_tokens, fisher=fisher, anchor=anchor)


# ---------------------------------------------------------------------------------------------------------------
# saving and loading the state


def new_state(model, hp):
    if hp.method not in METHODS:
        raise CPError(f"unknown method {hp.method!r} (choose from {', '.join(METHODS)})")
    return State(model={"path": model.path, "fingerprint": model.fingerprint}, hparams=asdict(hp))


def _write_atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(state, folder):
    """Write every tensor file under a name new to this task, then replace the manifest (the commit point)."""
    os.makedirs(os.path.join(folder, "pool"), exist_ok=True)
    n = len(state.concepts)
    files = {"tokens": f"tokens_{n:03d}.safetensors", "ewc": f"ewc_{n:03d}.safetensors",
             "lora": f"lora_{n:03d}.safetensors" if state.lora else None,
             "pool": [f"pool/task_{i:03d}.safetensors" for i in range(len(state.pool))]}
    tensors = {"tokens": state.tokens, "ewc": {**{"fisher." + k: v for k, v in state.fisher.items()},
                                               **{"anchor." + k: v for k, v in state.anchor.items()}}}
    for key in ("tokens", "ewc"):
        _write_atomic(os.path.join(folder, files[key]),
                      lambda p, t=tensors[key]: save_file({k: v.contiguous() for k, v in t.items()}, p))
    hp = Hparams(**state.hparams)
    write_lora = lambda path, w: _write_atomic(os.path.join(folder, path), lambda p: lora.write_lora_file(
        w, {k: hp.alpha for k in w}, p, "diffusers"))
    if state.lora:
        write_lora(files["lora"], state.lora)
    for path, w in zip(files["pool"], state.pool):
        if not os.path.exists(os.path.join(folder, path)):  # a pool entry never changes once written
            write_lora(path, w)
    manifest = dict(format="cp-state/1", model=state.model, method=hp.method, hparams=state.hparams,
                    concepts=state.concepts, history=state.history, files=files)
    _write_atomic(os.path.join(folder, MANIFEST),
                  lambda p: open(p, "w").write(json.dumps(manifest, indent=1)))
    keep = {files["tokens"], files["ewc"], files["lora"], MANIFEST}
    for f in os.listdir(folder):  # files of the previous task, now replaced
        if f not in keep and f != "pool" and os.path.isfile(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))


def load_state(folder):
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
        files = m["files"]
        read = lambda name: load_file(os.path.join(folder, name))
        ewc = read(files["ewc"])
        return State(model=m["model"], hparams=m["hparams"], concepts=m["concepts"], history=m["history"],
                     lora=_pairs(lora.read_lora_file(os.path.join(folder, files["lora"]))) if files["lora"] else None,
                     pool=[_pairs(lora.read_lora_file(os.path.join(folder, p))) for p in files["pool"]],
                     tokens=read(files["tokens"]),
                     fisher={k[7:]: v for k, v in ewc.items() if k.startswith("fisher.")},
                     anchor={k[7:]: v for k, v in ewc.items() if k.startswith("anchor.")})
    except (OSError, KeyError, ValueError) as e:
        raise CPError(f"cannot load state {folder}: {e}") from None


def _pairs(mods):
    return {p: (A, B) for p, (A, B, _) in mods.items()}


def check_model(state, model):
    if state.model["fingerprint"] != model.fingerprint:
        raise CPError(f"this state was made with another base model ({state.model['path']}, fingerprint "
                      f"{state.model['fingerprint']}); the model given has fingerprint {model.fingerprint}")


def load_with_state(folder, model_path=None, device="cpu", dtype=torch.float32):
    """The base model named by a state (or `model_path`), with the state's tokens and LoRA(s) applied."""
    import unet
    state = load_state(folder)
    model = unet.load_model(model_path or state.model["path"], device, dtype)
    check_model(state, model)
    apply_state(model, state)
    return model, state
