"""Continual personalization: learn concepts one at a time, keep no image, forget as little as possible.

Task n brings concept c_n (images, a new token `<name>`, the prompt "a photo of a <name>"). The pretrained concept c₀
is a prompt the base model already knows ("a photo of a {class word}"). With φ the adapter's parameters (A and B of a
LoRA, d and b of a VeRA adapter), t ~ U{0..T−1} and ε ~ N(0, I) (Jha et al., ICLR 2025; README "The method in one
page"), each term is one function, in this order below:

    L_denoise = E ‖ε − ε_φ(x_t, t, c_n)‖²  (mean over dims)                                     denoise_loss
    L_DC      = τ E[−log p_φ(c_n | x)],  p_φ(c_i | x) = softmax_i(−e_i / τ) over S ∋ c_n, c₀         dc_loss
    EWC       = (λ/2) Σ F*(φ − φ*)²                                                              ewc_penalty
                F̂ = E_x[(∇_φ L)²] at the end of a task, rescaled to mean 1                       fisher_diagonal
                F* ← γ F* + F̂, stored rescaled to mean 1                                         update_fisher
                (L: L_denoise for `ewc`, `dsc-ewc`; L_DC for `*ewc-dc`; F̂ = 1 for `ewc-l2`)       fisher_estimate
    C-LoRA    = λ_c Σ_layers ‖(Σ_{m<n} B_m A_m) ⊙ (B_n A_n)‖²                                  clora_penalty
    merge     = per element of ΔW the larger |ΔW| of the carried LoRA and the task's, rank r by SVD (lora.py)
    DSC       = w_h τ [H(p_T1, p_S) + H(p_T2, p_S)] + w_n [‖ε_T1(c_n) − ε_S(c_n)‖² + ‖ε_T2(c_j) − ε_S(c_j)‖²]
                over S = {c_n, c₀, c_j}; T1 the task's adapter, T2 the stored one of c_j           dsc_loss
    e_i       = mean over dims ‖ε − ε_φ(x_t, t, c_i)‖², one (t, ε) per image shared by the prompts of S (dc_score.py)

Every DC cross-entropy is multiplied by τ, which puts it in the units of the errors (as τ → 0, τ·(−log p_y) tends to
the margin e_y − min_k e_k; its gradient (q − p)·∂e is bounded whatever τ): w_h and δ are ratios to L_denoise. Every
method trains on L_denoise plus its penalty; `ewc-dc` and `dsc-ewc-dc` can add δ·L_DC (δ = 0, as in the paper). The
default, `dsc-ewc`, is DSC with the EWC penalty of the denoising Fisher; `dsc-ewc-dc` takes the DC-informed Fisher.
`ewc-l2` (a uniform Fisher) and `merge` (each task's LoRA trained alone, then merged) are the controls.

A task runs in four steps (learn_concept): train it, consolidate (DSC; the first task has no earlier concept and is
not consolidated), update the Fisher (EWC), assemble the next state. Storing a state is cp_state.py's.
"""
import contextlib
import math
import random
import re
import time
from dataclasses import dataclass, field, fields

import torch

import dc_score
import lora
import unet

METHODS = ("seq", "ti", "clora", "merge", "ewc", "ewc-l2", "ewc-dc", "dsc", "dsc-ewc", "dsc-ewc-dc")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a concept name: its token is <name>, its exported file name.safetensors
MAX_STEPS = 100_000  # most steps of a task's training or consolidation
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast's dtype (None: no autocast)


class CPError(Exception):
    """Bad input or a failed run, reported to the user as one line."""


def knob(default, help, run=False):
    """A field of Hparams: its default, the help `train.py -h` prints for its flag, and whether it is a run setting
    (how long and how fast one task trains: given anew by each run) rather than a setting of the state's method."""
    return field(default=default, metadata={"help": help, "run": run})


@dataclass
class Hparams:
    """Every knob of a task, each a train.py flag. The defaults are what a plain `python train.py` runs: the default
    method at its tuned preset on the shipped toy model (presets.json; tests/test_state.py keeps them equal).
    The state records its method's settings; the run settings (RUN_KNOBS) belong to one run and are not stored."""
    method: str = knob("dsc-ewc", "continual-personalization method (README \"The method in one page\")")
    steps: int = knob(600, "optimizer steps on the new concept", run=True)
    batch_size: int = knob(8, "images per optimizer step", run=True)
    lr: float = knob(3e-3, "LoRA (or VeRA) learning rate", run=True)
    token_lr: float = knob(5e-2, "learning rate of the new token's embedding row", run=True)
    dsc_steps: int = knob(100, "consolidation steps after training (dsc*)", run=True)
    rank: int = knob(8, "LoRA rank r")
    alpha: float = knob(8.0, "LoRA alpha: the update B A is scaled by alpha / r")
    targets: str = knob("kv+ff", "LoRA placement: kv+ff (attn2.to_k/to_v, feed-forward), kv, attn (all q/k/v/out)")
    adapter: str = knob("lora", "lora, or vera (d, b over a shared random projection; alpha unused)")
    ewc_lambda: float = knob(8.1e-05, "λ: weight of the EWC penalty (on a Fisher of mean 1)")
    ewc_gamma: float = knob(0.9, "γ: online-EWC decay of the accumulated Fisher")
    fisher_samples: int = knob(16, "per-image gradients averaged into F̂ (the DC Fisher takes twice as many)")
    dc_weight: float = knob(0.0, "δ: weight of L_DC (in error units: τ·CE) in the training loss of ewc-dc and "
                            "dsc-ewc-dc (0: the DC scores only build the Fisher, as in the paper)")
    dc_temp: float = knob(0.01, "τ of the DC posterior over mean-over-dims errors (for another base model, choose "
                          "it from the error gap that bench/diagnose.py's gap mode prints)")
    dc_k: int = knob(5, "k: most prompts in the DC subset S")
    dc_batch: int = knob(2, "images of each batch that δ·L_DC scores under all of S (its cost grows with k)")
    clora_lambda: float = knob(3.0, "λ_c: weight of C-LoRA's self-regularization")
    dsc_w_h: float = knob(0.01, "w_h: weight of DSC's DC-score distillation τ·H (error units: a ratio to L_denoise)")
    dsc_w_n: float = knob(1.0, "w_n: weight of DSC's noise-prediction distillation")
    seed: int = knob(0, "seed of task n is seed * 1000 + n (batches, noise, the DC subset)")

    def uses(self, part):
        """Which ingredients the method combines: lora, ewc, dc_fisher (the DC-informed Fisher), l2 (a uniform
        Fisher), dc_loss (δ·L_DC), dsc, clora, merge (a fresh LoRA per task, merged into the carried one)."""
        m = self.method
        return {"lora": m != "ti", "ewc": "ewc" in m, "dc_fisher": m.endswith("ewc-dc"), "l2": m == "ewc-l2",
                "dc_loss": m.endswith("ewc-dc") and self.dc_weight > 0,
                "dsc": m.startswith("dsc"), "clora": m == "clora", "merge": m == "merge"}[part]


RUN_KNOBS = tuple(f.name for f in fields(Hparams) if f.metadata["run"])


# --- the losses, in the paper's order: L_denoise, L_DC (and δ·L_DC), EWC and its Fisher, C-LoRA, DSC -----------------
def denoise_loss(model, x0, prompts, gen):
    """L_denoise = E ‖ε − ε_φ(x_t, t, c)‖², the mean squared error of the noise prediction: image i under prompts[i],
    or every image under prompts[0] when it is the only one."""
    t, eps = draw_noise(model, x0, gen)
    image = torch.arange(len(x0))
    rows = (image, image if len(prompts) > 1 else torch.zeros_like(image))
    pred = dc_score.noise_predictions(model.unet, x0, model.encode_text(prompts), t, eps, model.alphas_cumprod,
                                      rows=rows)
    return (eps - pred).square().mean()


def dc_loss(model, x0, prompts, tau, gen, t=None):
    """L_DC = τ · mean over images of −log p_φ(c_n | x) at temperature τ, over S = prompts (c_n first): all K prompts
    in one UNet batch, one (t, ε) per image shared by the K prompts (a paired comparison); t drawn unless given."""
    t, eps = draw_noise(model, x0, gen, t)
    pred = dc_score.noise_predictions(model.unet, x0, model.encode_text(prompts), t, eps, model.alphas_cumprod)
    return tau * dc_score.dc_cross_entropy(pred, eps, 0, tau)[0].mean()


def denoise_and_dc_loss(model, x0, prompts, hp, gen, captions=None):
    """L_denoise and δ·L_DC from one ragged UNet batch: the first `dc_batch` images under all K prompts of S (target
    first; that column also serves L_denoise), the other images under the target only. `captions` (one prompt per
    image): L_denoise of every image under its own caption instead, S only for L_DC."""
    t, eps = draw_noise(model, x0, gen)
    B, K = len(x0), len(prompts)
    n_dc = min(hp.dc_batch, B)
    first = 0 if captions else n_dc  # the first image of the L_denoise rows
    image = torch.cat([torch.arange(n_dc).repeat_interleave(K), torch.arange(first, B)])
    prompt = torch.cat([torch.arange(K).repeat(n_dc), K + torch.arange(B) if captions else
                        torch.zeros(B - n_dc, dtype=torch.long)])
    pred = dc_score.noise_predictions(model.unet, x0, model.encode_text(prompts + (captions or [])), t, eps,
                                      model.alphas_cumprod, rows=(image, prompt))
    e = dc_score.dc_errors(pred[n_dc * K:, None], eps[first:])[:, 0]
    ce, e_dc = dc_score.dc_cross_entropy(pred[:n_dc * K].view(n_dc, K, *x0.shape[1:]), eps[:n_dc], 0, hp.dc_temp)
    return {"denoise": (e if captions else torch.cat([e_dc[:, 0], e])).mean(),
            "dc": hp.dc_weight * hp.dc_temp * ce.mean()}


def ewc_penalty(unet, name, fisher, anchor, lam):
    """(λ/2) Σ F*(φ − φ*)² over the adapter's parameters (zero before the first Fisher)."""
    if not fisher:
        return torch.zeros(())
    live = flat(lora.get_adapter(unet, name))
    return lam / 2 * sum((fisher[k] * (p - anchor[k]) ** 2).sum() for k, p in live.items())


def fisher_diagonal(params, sample_loss, n):
    """F̂ = mean over n single-image losses of (∇_φ L)², rescaled to mean 1 over all of φ.

    Only the relative importance of the parameters is kept: the raw magnitudes of a denoising Fisher and of a DC
    Fisher differ by orders, and after rescaling one λ means the same for both and for every task.
    """
    squares = [torch.zeros_like(p) for p in params]
    for _ in range(n):
        for s, g in zip(squares, torch.autograd.grad(sample_loss(), params)):
            s += g.detach() ** 2
    if not all(s.isfinite().all() for s in squares):
        raise CPError("the Fisher's gradients are not finite (the adapter has diverged): try a lower --lr")
    return mean_one(squares)


def mean_one(tensors):
    """The tensors divided by the mean of all their elements (unchanged when that mean is 0)."""
    mean = sum(t.sum() for t in tensors) / sum(t.numel() for t in tensors)
    return [t / mean for t in tensors] if mean > 0 else tensors


def clora_penalty(unet, name, lam):
    """λ_c Σ_layers ‖(Σ_{m<n} s_m B_m A_m) ⊙ (s_n B_n A_n)‖², s = α/r; the old sum is constant."""
    total = torch.zeros(())
    for _, m in unet.named_modules():
        if isinstance(m, lora.LoRALinear) and name in m.lora_A and len(m.lora_A) > 1:
            old = sum(m.delta(n) for n in m.lora_A if n != name).detach()
            total = total + (old * m.delta(name)).square().sum()
    return lam * total


CJ = 2  # c_j's column in DSC's S = [c_n, c₀, c_j]


def dsc_loss(model, x0, prompts, hp, gen):
    """L_DSC over S = prompts = [c_n, c₀, c_j] (the module docstring), at temperature τ: the student the adapter
    "current", T1 "teacher1", T2 "teacher2"; each H over all of S; all four terms share one (t, ε) per image."""
    t, eps = draw_noise(model, x0, gen)
    context = model.encode_text(prompts)
    teachers = []
    for name in ("teacher1", "teacher2"):  # errors [B, K] and predictions [B, K, ...] of each teacher alone
        lora.enable_only(model.unet, name)
        with torch.no_grad():
            teachers.append(dc_score.denoising_errors(model.unet, x0, context, t, eps, model.alphas_cumprod,
                                                      return_pred=True))
    (e_t1, pred_t1), (e_t2, pred_t2) = teachers
    lora.enable_only(model.unet, "current")
    pred = dc_score.noise_predictions(model.unet, x0, context, t, eps, model.alphas_cumprod)
    tau = hp.dc_temp
    h_term = sum(tau * dc_score.soft_cross_entropy(pred, eps, dc_score.posterior(e, tau), tau)[0].mean()
                 for e in (e_t1, e_t2))
    n_term = (pred[:, 0] - pred_t1[:, 0]).square().mean() + (pred[:, CJ] - pred_t2[:, CJ]).square().mean()
    return {"dsc_h": hp.dsc_w_h * h_term, "dsc_n": hp.dsc_w_n * n_term}


# --- what the losses draw: (t, ε), the DC subset S, the task's images as latents -------------------------------------
def draw_noise(model, x0, gen, t=None):
    """(t, ε) for the images x0: t ~ U{0..T−1} unless given, ε ~ N(0, I)."""
    if t is None:
        t = torch.randint(0, len(model.alphas_cumprod), (x0.shape[0],), generator=gen)
    return t.to(model.device), torch.randn(x0.shape, generator=gen).to(x0)


def stratified_timesteps(n, T, gen):
    """n timesteps, one from each of n equal strata of [0, T), in random order: n samples cover the schedule evenly,
    not by chance (the DC Fisher's split-half agreement rises with it: bench/diagnostics.md)."""
    return ((torch.randperm(n, generator=gen) + torch.rand(n, generator=gen)) * T / n).long().clamp(max=T - 1)


def dc_subset(state, target, c0, hp, rng):
    """S: the current concept first, then c₀, then random earlier concepts, at most k prompts."""
    earlier = [c["prompt"] for c in state.concepts]
    return [target, c0] + rng.sample(earlier, min(len(earlier), max(hp.dc_k - 2, 0)))


class Batches:
    """Random batches of current-task latents, sampled from the VAE posterior each time (held in memory only).
    `flip`: a generator of its own (the task's draws stay as they are) that picks, for each drawn image, the encoding
    of its mirror image with probability 1/2. A call given a generator `gen` draws everything, flips included, from
    it. `drawn` holds the images of the last batch drawn from the task's stream (for their captions)."""

    def __init__(self, model, images, batch_size, gen, flip=None):
        with torch.no_grad():
            mean, std = model.vae.encode(images.to(model.device, model.dtype))
            if flip is not None:  # the mirror images' encodings follow the originals
                mirrored = model.vae.encode(images.flip(-1).to(model.device, model.dtype))
                mean, std = torch.cat([mean, mirrored[0]]), torch.cat([std, mirrored[1]])
        # in the model's dtype: under autocast the encodings come out in fp16 or bf16, and the Fisher runs without it
        self.mean, self.std = mean.to(model.dtype), std.to(model.dtype)
        self.scale, self.n = model.scaling_factor, len(images)
        self.batch_size, self.gen, self.flip, self.drawn = batch_size, gen, flip, None

    def __call__(self, n=None, gen=None):
        gen = gen or self.gen
        idx = torch.randint(0, self.n, (n or self.batch_size,), generator=gen)
        if gen is self.gen:
            self.drawn = idx
        eps = torch.randn(self.mean[idx].shape, generator=gen).to(self.mean)
        if self.flip is not None:
            idx = idx + self.n * (torch.rand(len(idx), generator=self.flip if gen is self.gen else gen) < 0.5)
        return (self.mean[idx] + self.std[idx] * eps) * self.scale


# --- one task: train it, consolidate (DSC), update the Fisher (EWC), assemble the next state -------------------------
@dataclass
class State:
    """Everything carried from task to task: no image, no latent, only weights and statistics."""
    model: dict                                    # {"path", "fingerprint"}
    hparams: Hparams
    concepts: list = field(default_factory=list)   # [{"name", "token", "prompt", "class_word", "task"}]
    history: list = field(default_factory=list)    # per-task metrics, and the settings each task ran with
    lora: dict = None                              # {module path: (A, B)} (VeRA: (d, b)) carried (not clora / ti)
    pool: list = field(default_factory=list)       # one {module path: (A, B)} per task: the LoRA after that task
    tokens: dict = field(default_factory=dict)     # token → embedding row
    fisher: dict = field(default_factory=dict)     # "path.A" / "path.B" (VeRA: "path.d" / "path.b") → F*
    anchor: dict = field(default_factory=dict)     # "path.A" / "path.B" (VeRA: "path.d" / "path.b") → φ*
    projection: tuple = None                       # VeRA: the frozen (A, B) its adapters share
    base: dict = None                              # the manifest this state continues (None: never saved)


@dataclass
class Run:
    """How one task runs on the hardware, not what it learns: train.py's flags, chosen anew by each run (the first
    four are recorded in the task's history). The defaults are the plain run: fp32, one batch per step."""
    precision: str = "fp32"              # fp32, or autocast to bf16 or fp16 (fp16 with loss scaling)
    grad_accum: int = 1                  # micro-batches per optimizer step, each of batch_size / grad_accum images
    gradient_checkpointing: bool = False  # recompute the UNet's activations in the backward pass (less memory)
    flip: bool = False                   # mirror each drawn image with probability 1/2 (a generator of its own)
    sample_every: int = 0                # call preview(step) every this many training steps (0: never)
    preview: object = None               # preview(step): the caller's picture of the new concept during training
    progress: object = None              # progress(steps, label) -> report(step, terms): the caller's display
    trace: list = field(default_factory=list)  # every optimizer step's loss terms, appended as dicts


@dataclass
class Task:
    """What the steps of one task share."""
    index: int                 # n: how many concepts came before
    name: str
    token: str                 # "<name>"
    target: str                # the prompt of c_n
    class_word: str            # None: the concept has none
    c0: str                    # the prompt of the pretrained concept
    adapter: str               # the adapter this task trains (None: ti)
    batches: Batches           # the task's images, as latents
    gen: torch.Generator       # batches, t, ε
    rng: random.Random         # the DC subset, DSC's earlier concept
    ewc: tuple                 # (F*, φ*) of the state, on the adapter's device
    run: Run = field(default_factory=Run)
    captions: list = None      # one prompt per image for L_denoise (None: the target prompt for all)


def learn_concept(model, state, images, name, class_word=None, captions=None, run=None):
    """Learn concept `name` from its images [N, 3, R, R] in [−1, 1] (train.read_concept reads a folder) on top of
    `state` (applied to `model`); returns the new state (unsaved). captions: one prompt per image with the concept's
    token, None where an image has none (None: the concept's prompt for all). `run`: how (cp.Run)."""
    run, hp = run or Run(), state.hparams
    check_hparams(hp)
    check_run(run, hp)
    check_new_concept(model, state, name)
    model.unet.gradient_checkpointing = run.gradient_checkpointing
    n = len(state.concepts)
    seed = hp.seed * 1000 + n
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    flip = torch.Generator().manual_seed(2 ** 32 + seed) if run.flip else None  # never the task's stream
    adapter = (f"task{n}" if hp.uses("clora") or hp.uses("merge") else "current") if hp.uses("lora") else None
    token, target = f"<{name}>", concept_prompt(f"<{name}>", class_word)
    # the state keeps the EWC statistics on the CPU: move them to the adapter's device once per task
    ewc = tuple({k: v.to(model.device) for k, v in stats.items()} for stats in (state.fisher, state.anchor))
    task = Task(n, name, token, target, class_word, base_prompt(class_word), adapter,
                Batches(model, images, hp.batch_size // run.grad_accum, gen, flip), gen, random.Random(seed), ewc,
                run=run, captions=[c or target for c in captions] if captions else None)

    started = time.time()
    metrics = {"task": n, "name": name, "images": len(images),
               "run": {**{k: getattr(hp, k) for k in RUN_KNOBS}, "device": model.device.type,
                       "precision": run.precision, "grad_accum": run.grad_accum,
                       "gradient_checkpointing": run.gradient_checkpointing, "flip": run.flip,
                       "captions": sum(c is not None for c in captions or [])}}
    with autocast(model.device.type, run.precision):
        metrics["train"], row = train_task(model, state, task)
        if hp.uses("dsc") and state.pool:  # the first task has no earlier concept: T1 would only teach its own copy
            metrics["consolidate"] = consolidate(model, state, task)
        final = {p: (A.cpu(), B.cpu()) for p, (A, B) in lora.snapshot(model.unet, adapter).items()} if adapter else {}
        fisher, anchor = state.fisher, state.anchor
        if hp.uses("ewc"):
            fisher_started = time.time()
            fisher, anchor = update_fisher(model, state, task, final)
            metrics["fisher_seconds"] = round(time.time() - fisher_started, 1)
        metrics["seconds"] = round(time.time() - started, 1)
        return next_state(model, state, task, row, final, fisher, anchor, metrics)


def train_task(model, state, task):
    """Step 1. Train the new token's embedding row and the task's adapter on L_denoise (+ δ L_DC) + the method's
    penalty. Returns the last loss terms and the trained row."""
    hp = state.hparams
    token_id = unet.add_tokens(model, {**{t: None for t in state.tokens}, task.token: None})[task.token]
    row, hook = unet.trainable_row(model, token_id)
    groups = [{"params": [row], "lr": hp.token_lr}]
    if task.adapter:
        if task.adapter not in lora.adapter_names(model.unet):
            install_adapter(model.unet, task.adapter, None, hp)
        groups.append({"params": lora.set_trainable(model.unet, task.adapter), "lr": hp.lr})
    if hp.uses("merge") and state.lora:  # the fresh LoRA learns alone, on the base model
        lora.set_enabled(model.unet, "current", False)

    def loss():
        x0 = task.batches()
        captions = [task.captions[i] for i in task.batches.drawn] if task.captions else None
        if hp.uses("dc_loss"):  # δ·L_DC: some images of the batch also scored under all of S
            subset = dc_subset(state, task.target, task.c0, hp, task.rng)
            terms = denoise_and_dc_loss(model, x0, subset, hp, task.gen, captions)
        else:
            terms = {"denoise": denoise_loss(model, x0, captions or [task.target], task.gen)}
        if hp.uses("ewc"):
            terms["ewc"] = ewc_penalty(model.unet, task.adapter, *task.ewc, hp.ewc_lambda)
        if hp.uses("clora"):
            terms["clora"] = clora_penalty(model.unet, task.adapter, hp.clora_lambda)
        return terms

    try:
        metrics = optimize(groups, hp.steps, loss, "train", task, task.run.preview)
    finally:  # a failed task must not leave the row spliced into a model that may be used again
        hook.remove()
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[token_id] = row
    return metrics, row.detach().clone().cpu()


def consolidate(model, state, task):
    """Step 2 (DSC). Distil into the adapter T1 (the adapter as trained on this task), on c_n, and T2 (the pool's
    adapter after a random earlier concept c_j, drawn each step), on c_j. Needs an earlier concept."""
    hp = state.hparams
    install_adapter(model.unet, "teacher1", lora.snapshot(model.unet, task.adapter), hp)
    install_adapter(model.unet, "teacher2", None, hp)
    params = lora.set_trainable(model.unet, task.adapter)

    def loss():
        earlier = task.rng.randrange(len(state.concepts))
        lora.set_adapter(model.unet, "teacher2", state.pool[earlier])
        prompts = [task.target, task.c0, state.concepts[earlier]["prompt"]]
        terms = dsc_loss(model, task.batches(), prompts, hp, task.gen)
        if hp.uses("ewc"):
            terms["ewc"] = ewc_penalty(model.unet, task.adapter, *task.ewc, hp.ewc_lambda)
        return terms

    metrics = optimize([{"params": params, "lr": hp.lr}], hp.dsc_steps, loss, "consolidate", task)
    for name in ("teacher1", "teacher2"):
        lora.remove(model.unet, name)
    lora.enable_only(model.unet, task.adapter)
    return metrics


def fisher_estimate(model, state, task, n):
    """F̂ of the task's adapter: of L_denoise over n single images; for the DC-informed methods, of L_DC over
    S = {c_n, c₀, earlier concepts} (what tells c_n apart from what the model knew) over 2n single images at
    stratified timesteps, whose noisier estimates then agree as two denoising ones of n do (bench/RESULTS.md)."""
    hp = state.hparams
    params = lora.lora_parameters(model.unet, [task.adapter])
    if hp.uses("l2"):  # the uniform Fisher: the penalty is the plain L2 pull to φ*
        return [torch.ones_like(p) for p in params]
    if hp.uses("dc_fisher"):
        n = 2 * n
        ts = iter(stratified_timesteps(n, len(model.alphas_cumprod), task.gen)[:, None])
        sample_loss = lambda: dc_loss(model, task.batches(1), dc_subset(state, task.target, task.c0, hp, task.rng),
                                      hp.dc_temp, task.gen, next(ts))
    else:
        sample_loss = lambda: denoise_loss(model, task.batches(1), [task.target], task.gen)
    with torch.autocast(model.device.type, enabled=False):  # in fp32: unscaled fp16 gradients would underflow
        return fisher_diagonal(params, sample_loss, n)


def update_fisher(model, state, task, final):
    """Step 3 (EWC). F* ← γ F* + F̂ and φ* ← φ (`final`, the adapter as the task leaves it). F* is stored at mean 1,
    so that λ weighs the same on every task; the update first scales it back to the mean it had (1 + γ + ... +
    γ^(n−2) after n − 1 tasks), so that task m's F̂ still decays by γ per task."""
    hp = state.hparams
    anchor = flat(final)
    f_hat = fisher_estimate(model, state, task, hp.fisher_samples)
    past = state.fisher
    if past:
        grown = sum(hp.ewc_gamma ** i for i in range(len(state.concepts)))
        past = {k: v * grown for k, v in zip(past, mean_one(list(past.values())))}
    fisher = {k: hp.ewc_gamma * past.get(k, 0) + f.cpu() for k, f in zip(anchor, f_hat)}
    return dict(zip(fisher, mean_one(list(fisher.values())))), anchor


def next_state(model, state, task, row, final, fisher, anchor, metrics):
    """Step 4. The state after the task: its token row, the adapter `final` (carried, and added to the pool), the EWC
    statistics."""
    hp = state.hparams
    for p in lora.lora_parameters(model.unet, [task.adapter]) if task.adapter else []:
        p.requires_grad_(False)
    with torch.no_grad():  # ‖ΔW‖ of the task's adapter; 0 for `ti`, which trains none
        deltas = lora.deltas(model.unet, task.adapter).values() if task.adapter else []
        metrics["lora_norm"] = float(sum(w.square().sum() for w in deltas) ** 0.5)
    carried = final
    if hp.uses("merge"):  # the task's LoRA merged into the carried one, which the model holds from now on
        carried = lora.magnitude_merge(state.lora, final, hp.alpha / hp.rank, hp.rank)
        lora.remove(model.unet)
        install_adapter(model.unet, "current", carried, hp)
    concept = {"name": task.name, "token": task.token, "prompt": task.target, "class_word": task.class_word,
               "task": task.index}
    projection = lora.get_projection(model.unet)
    return State(model=state.model, hparams=hp, concepts=state.concepts + [concept],
                 history=state.history + [metrics],
                 lora=None if hp.uses("clora") or not task.adapter else carried,
                 pool=state.pool + ([final] if task.adapter else []), tokens={**state.tokens, task.token: row},
                 fisher=fisher, anchor=anchor, base=state.base,
                 projection=tuple(P.cpu() for P in projection) if projection else None)


def optimize(params_groups, steps, loss_fn, phase, task, preview=None):
    """AdamW; each step's gradient the mean over `task.run.grad_accum` calls of loss_fn() (micro-batches), scaled
    against fp16 underflow in fp16. A non-finite loss is a CPError. Every step's loss terms (means over its
    micro-batches) go to `task.run.trace`; returns the last step's."""
    run, label = task.run, f"[{task.name}] {phase}"
    opt = torch.optim.AdamW(params_groups, weight_decay=0.0)
    scaler = torch.amp.GradScaler(params_groups[0]["params"][0].device.type, enabled=run.precision == "fp16")
    progress = run.progress(steps, label) if run.progress else None
    terms = {}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        micro = []
        for _ in range(run.grad_accum):
            terms = loss_fn()
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                values = ", ".join(f"{k}={v.item():.3g}" for k, v in terms.items())
                raise CPError(f"non-finite loss at {label} step {step} ({values}); try a lower --lr")
            scaler.scale(loss / run.grad_accum).backward()
            micro.append({k: v.item() for k, v in terms.items()})
        scaler.step(opt)
        scaler.update()
        terms = {k: sum(m[k] for m in micro) / len(micro) for k in micro[0]}
        run.trace.append({"task": task.index, "concept": task.name, "phase": phase, "step": step, **terms})
        if progress and (step % 5 == 0 or step == steps):
            progress(step, terms)
        if preview and run.sample_every and step % run.sample_every == 0:
            preview(step)
    return terms


def autocast(device_type, precision):
    """The autocast context of a precision (none for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type, dtype) if dtype else contextlib.nullcontext()


# --- putting a state's weights into the model ------------------------------------------------------------------------
def new_state(model, hp):
    check_hparams(hp)
    return State(model={"path": model.path, "fingerprint": model.fingerprint}, hparams=hp)


def apply_state(model, state):
    """Load a state's tokens and LoRA(s) into a freshly loaded model, ready to sample or to continue."""
    unet.add_tokens(model, state.tokens)
    hp = state.hparams
    if hp.method == "clora":
        for i, weights in enumerate(state.pool):
            install_adapter(model.unet, f"task{i}", weights, hp)
    elif state.lora is not None:
        install_adapter(model.unet, "current", state.lora, hp, state.projection)


def install_adapter(unet, name, weights, hp, projection=None):
    lora.inject(unet, hp.targets, hp.rank, hp.alpha, name, hp.adapter, projection)
    if weights is not None:
        lora.set_adapter(unet, name, weights)
    return lora.lora_parameters(unet, [name])


def flat(weights):
    """{path: (A, B)} → {"path.A": A, "path.B": B}, the naming of the Fisher and the anchor (VeRA's (d, b): "path.d",
    "path.b")."""
    return {f"{p}.{k}": t for p, pair in weights.items() for k, t in zip("db" if pair[0].ndim == 1 else "AB", pair)}


def concept_prompt(token, class_word=None):
    return f"a photo of a {token}" + (f" {class_word}" if class_word else "")


def base_prompt(class_word=None):
    """The pretrained concept c₀: something the base model already draws."""
    return f"a photo of a {class_word}" if class_word else "a photo"


# --- checks, made before any work ------------------------------------------------------------------------------------
def check_hparams(hp):
    """Refuse, naming the flag, any value that cannot work."""
    def bad(name, need):
        return CPError(f"--{name.replace('_', '-')} {getattr(hp, name)!r}: must be {need}")
    if hp.method not in METHODS:
        raise CPError(f"unknown method {hp.method!r} (choose from {', '.join(METHODS)})")
    if hp.targets not in lora.TARGETS:
        raise bad("targets", " or ".join(lora.TARGETS))
    if hp.adapter not in lora.ADAPTERS:
        raise bad("adapter", " or ".join(lora.ADAPTERS))
    if hp.adapter == "vera" and (hp.uses("clora") or hp.uses("merge")):
        raise CPError(f"{hp.method} works on per-task LoRAs; use --adapter lora with --method {hp.method}")
    for name, low in (("steps", 1), ("batch_size", 1), ("rank", 1), ("fisher_samples", 1), ("dc_k", 2),
                      ("dc_batch", 0), ("dsc_steps", 0), ("seed", 0)):
        if type(getattr(hp, name)) is not int or getattr(hp, name) < low:
            raise bad(name, f"an integer ≥ {low}")
    for name in ("steps", "dsc_steps"):  # a typo's extra digits would start a run of days
        if getattr(hp, name) > MAX_STEPS:
            raise bad(name, f"at most {MAX_STEPS:,}")
    number = lambda v: type(v) in (int, float) and math.isfinite(v)
    for name in ("lr", "token_lr", "alpha", "dc_temp"):
        if not (number(getattr(hp, name)) and getattr(hp, name) > 0):
            raise bad(name, "a finite number > 0")
    for name in ("ewc_lambda", "dc_weight", "clora_lambda", "dsc_w_h", "dsc_w_n"):
        if not (number(getattr(hp, name)) and getattr(hp, name) >= 0):
            raise bad(name, "a finite number ≥ 0 (0 turns the term off)")
    if not (number(hp.ewc_gamma) and 0 <= hp.ewc_gamma <= 1):
        raise bad("ewc_gamma", "between 0 and 1")
    if hp.uses("dc_loss") and hp.dc_batch == 0:
        raise CPError(f"--dc-weight {hp.dc_weight}: δ·L_DC scores --dc-batch images of each batch, and it is 0")


def check_run(run, hp):
    """Refuse, naming the flag, run settings that cannot work with these hyperparameters."""
    if run.precision not in PRECISIONS:
        raise CPError(f"--precision {run.precision!r}: choose from {', '.join(PRECISIONS)}")
    if type(run.grad_accum) is not int or run.grad_accum < 1 or hp.batch_size % run.grad_accum:
        raise CPError(f"--grad-accum {run.grad_accum!r}: must be an integer ≥ 1 that divides --batch-size "
                      f"{hp.batch_size}")
    if type(run.sample_every) is not int or run.sample_every < 0:
        raise CPError(f"--sample-every {run.sample_every!r}: must be an integer ≥ 0 (0: no previews)")


def check_name(name, given=True):
    """A concept name becomes a token and a file name: letters, digits, '_' and '-' only."""
    if not NAME.fullmatch(name):
        raise CPError(f"concept name {name!r}: use 1 to 64 letters, digits, '_' or '-'"
                      + ("" if given else " (it is the folder's name; give --name)"))


def check_new_concept(model, state, name):
    """A new concept's name is valid, not learned yet, and its token reads, under the model's tokenizer, as no
    learned token does (the CLIP tokenizer lowercases: <Dog> and <dog> are one token)."""
    check_name(name)
    if any(c["name"] == name for c in state.concepts):
        raise CPError(f"concept {name!r} is already learned in this state (use --name to pick another name)")
    clash = unet.reads_as(model.tokenizer, f"<{name}>", [c["token"] for c in state.concepts])
    if clash:
        raise CPError(f"concept {name!r}: its token <{name}> reads as {clash}, which this state has already learned "
                      "(the tokenizer ignores case); pick another --name")
