"""Continual personalization: learn concepts one at a time, keep no image, forget as little as possible.

Task n brings concept c_n (a folder of images, a new token `<name>`, the prompt "a photo of a <name>"). The
pretrained concept c₀ is a prompt the base model already knows ("a photo of a {class word}"). With φ the adapter's
parameters (A and B of a LoRA, d and b of a VeRA adapter), t ~ U{0..T−1} and ε ~ N(0, I) (Jha et al., ICLR 2025;
README "The method in one page"):

    L_denoise = E ‖ε − ε_φ(x_t, t, c_n)‖²                      (mean over dims)
    L_DC      = E[−log p_φ(c_n | x)],  p_φ(c_i | x) = softmax_i(−e_i / τ) over a subset S ∋ c_n, c₀
                (τ calibrated per task: median over draws of std_i e_i, so −e/τ spreads by about one nat)
    EWC       = (λ/2) Σ F*(φ − φ*)²,   F̂ = E_x[(∇_φ L)²] at the end of a task, rescaled to mean 1,  F* ← γ F* + F̂
                (optionally F* rescaled to mean 1 too, so that λ weighs the same on every task)
                (L = L_denoise for `ewc`; L = L_DC for `ewc-dc`: the DC scores build the Fisher)
    C-LoRA    = λ_c Σ_layers ‖(Σ_{m<n} B_m A_m) ⊙ (B_n A_n)‖²
    DSC       = w_h [H(p_T1, p_S) + H(p_T2, p_S)] + w_n [‖ε_T1(c_n) − ε_S(c_n)‖² + ‖ε_T2(c_j) − ε_S(c_j)‖²]
                (first task: T2 = the base model on c₀, or no T2 terms)

Every method trains on L_denoise plus its penalty; `ewc-dc` can add δ·L_DC (δ = 0 by default, as in the paper).
A task runs in four steps: train it, consolidate (DSC), update the Fisher (EWC), assemble the next state.
The state (weights, tokens, Fisher, anchor, the LoRA pool, a JSON manifest) is saved file by file under names new
to the attempt, then the manifest, which names them, replaces the old one: an interrupted save leaves the old state
whole. One process writes a state at a time (a lock file), and every file is checked when a state is loaded.
How a task runs on the hardware (precision, micro-batches, checkpointing) is a `Run`, recorded in the task's history.
"""
import contextlib
import copy
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead (`lock_state`)
    fcntl = None
    import msvcrt
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import dc_score
import lora

METHODS = ("seq", "ti", "clora", "ewc", "ewc-dc", "dsc", "dsc-ewc", "dsc-ewc-dc")
FISHER_NORMS = ("task", "total")
DSC_FIRST = ("base", "none")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST = "manifest.json"
PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets.json")
LOCK = ".lock"
LOG, GRIDS = "log.jsonl", "grids"  # beside the state, not part of it: every saved step's losses, train.py's pictures
# every name a save writes (data files carry the attempt's id), and the only names a state folder may hold
# without a manifest (its lock, the log and pictures, leftovers of a first save that was killed)
STATE_NAME = re.compile(r"\.lock|pool|grids|log\.jsonl|manifest\.json(\.\w+\.tmp)?|"
                        r"(tokens|ewc|lora)_\d+_\w+\.safetensors")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a concept name: its token is <name>, its exported file name.safetensors
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast's dtype (None: no autocast)


class CPError(Exception):
    """Bad input or a failed run, reported to the user as one line."""


@dataclass
class Hparams:
    """Every knob of a task (each one a train.py flag). examples/README.md, "Defaults", says how each value was
    chosen."""
    method: str = "ewc-dc"         # continual-personalization method (README "The method in one page")
    steps: int = 600               # optimizer steps on the new concept
    batch_size: int = 8            # images per optimizer step
    lr: float = 3e-3               # LoRA (or VeRA) learning rate
    token_lr: float = 5e-2         # learning rate of the new token's embedding row
    rank: int = 8                  # LoRA rank r
    alpha: float = 8.0             # LoRA alpha: the update B A is scaled by alpha / r
    targets: str = "kv+ff"         # LoRA placement: kv+ff (attn2.to_k/to_v, feed-forward), kv, attn (all q/k/v/out)
    adapter: str = "lora"          # "lora" or "vera" (d, b over a shared random projection; alpha unused)
    ewc_lambda: float = 0.01       # λ: weight of the EWC penalty (on a Fisher of mean 1; tuned values: presets.json)
    ewc_gamma: float = 0.9         # γ: online-EWC decay of the accumulated Fisher
    fisher_norm: str = "task"      # task: each F̂ rescaled to mean 1 (F* grows to 1/(1−γ)); total: F* too, after each update
    fisher_samples: int = 16       # per-image gradients averaged into F̂
    dc_weight: float = 0.0         # δ: weight of L_DC in ewc-dc's training loss (0: the DC scores only build the Fisher)
    dc_temp: str = "auto"          # τ of the DC posterior over mean-over-dims errors: a number, or auto (calibrated per task, cp.calibrate_temp)
    dc_k: int = 5                  # k: most prompts in the DC subset S
    dc_batch: int = 2              # images of each batch that δ·L_DC scores under all of S (its cost grows with k)
    clora_lambda: float = 1.0      # λ_c: C-LoRA self-regularization (tuned value: presets.json)
    dsc_steps: int = 100           # consolidation steps after training (dsc*)
    dsc_w_h: float = 1.0           # w_h: weight of the DC-score distillation
    dsc_w_n: float = 1.0           # w_n: weight of the noise-prediction distillation
    dsc_first: str = "base"        # T2 on the first task, which has no earlier concept: base (the base model on c₀) or none
    seed: int = 0                  # seed of task n is seed * 1000 + n (batches, noise, the DC subset)

    def uses(self, part):
        """Which ingredients the method combines: 'lora', 'ewc', 'dc', 'dsc', 'clora'."""
        m = self.method
        return {"lora": m != "ti", "ewc": "ewc" in m, "dc": m.endswith("ewc-dc"),
                "dc_loss": m.endswith("ewc-dc") and self.dc_weight > 0,
                "dsc": m.startswith("dsc"), "clora": m == "clora"}[part]


@dataclass
class State:
    """Everything carried from task to task: no image, no latent, only weights and statistics."""
    model: dict                                    # {"path", "fingerprint"}
    hparams: Hparams
    concepts: list = field(default_factory=list)   # [{"name", "token", "prompt", "class_word", "task"}]
    history: list = field(default_factory=list)    # per-task metrics
    lora: dict = None                              # {module path: (A, B)} of the carried LoRA (not clora / ti);
                                                   # VeRA: {module path: (d, b)}
    pool: list = field(default_factory=list)       # one {module path: (A, B)} per task: the LoRA after that task
    tokens: dict = field(default_factory=dict)     # token → embedding row
    fisher: dict = field(default_factory=dict)     # "path.A" / "path.B" (VeRA: "path.d" / "path.b") → F*
    anchor: dict = field(default_factory=dict)     # "path.A" / "path.B" (VeRA: "path.d" / "path.b") → φ*
    projection: tuple = None                       # VeRA: the frozen (A, B) its adapters share
    base: dict = None                              # the manifest this state continues (None: never saved)


@dataclass
class Run:
    """How one task runs, not what it learns: train.py's flags, chosen anew by each run (the first four are recorded
    in the task's history). The defaults are the plain run: fp32, one batch per step."""
    precision: str = "fp32"              # fp32, or autocast to bf16 or fp16 (fp16 with loss scaling)
    grad_accum: int = 1                  # micro-batches per optimizer step, each of batch_size / grad_accum images
    gradient_checkpointing: bool = False  # recompute the UNet's activations in the backward pass (less memory)
    flip: bool = False                   # mirror each drawn image with probability 1/2 (a generator of its own)
    sample_every: int = 0                # call preview(step) every this many training steps (0: never)
    preview: object = None               # preview(step): the caller's picture of the new concept during training
    trace: list = field(default_factory=list)  # every optimizer step's loss terms, appended as dicts


def check_hparams(hp):
    """Refuse, naming the flag, any value that cannot work (called before any work is done)."""
    def bad(name, need):
        return CPError(f"--{name.replace('_', '-')} {getattr(hp, name)!r}: must be {need}")
    if hp.method not in METHODS:
        raise CPError(f"unknown method {hp.method!r} (choose from {', '.join(METHODS)})")
    if hp.targets not in lora.PRESETS:
        raise bad("targets", " or ".join(lora.PRESETS))
    if hp.adapter not in lora.ADAPTERS:
        raise bad("adapter", " or ".join(lora.ADAPTERS))
    if hp.adapter == "vera" and hp.uses("clora"):
        raise CPError("clora's penalty is defined on per-task LoRAs; use --adapter lora with --method clora")
    for name, low in (("steps", 1), ("batch_size", 1), ("rank", 1), ("fisher_samples", 1), ("dc_k", 2),
                      ("dc_batch", 0), ("dsc_steps", 0), ("seed", 0)):
        if type(getattr(hp, name)) is not int or getattr(hp, name) < low:
            raise bad(name, f"an integer ≥ {low}")
    number = lambda v: type(v) in (int, float) and math.isfinite(v)
    for name in ("lr", "token_lr", "alpha"):
        if not (number(getattr(hp, name)) and getattr(hp, name) > 0):
            raise bad(name, "a finite number > 0")
    if hp.dc_temp != "auto" and not (fixed_temp(hp) or 0) > 0:
        raise bad("dc_temp", "auto or a finite number > 0")
    for name, choices in (("fisher_norm", FISHER_NORMS), ("dsc_first", DSC_FIRST)):
        if getattr(hp, name) not in choices:
            raise bad(name, " or ".join(choices))
    for name in ("ewc_lambda", "dc_weight", "clora_lambda", "dsc_w_h", "dsc_w_n"):
        if not (number(getattr(hp, name)) and getattr(hp, name) >= 0):
            raise bad(name, "a finite number ≥ 0 (0 turns the term off)")
    if not (number(hp.ewc_gamma) and 0 <= hp.ewc_gamma <= 1):
        raise bad("ewc_gamma", "between 0 and 1")


def load_presets(path=None):
    """presets.json, checked: {"models": {kind: {"max_unet_params", "why", hparam: value}}, "default_method",
    "methods": {method: {hparam: value}}, ...}. A missing or damaged file, an unknown method or hparam, or a value
    check_hparams refuses is a CPError naming it."""
    path = path or PRESETS
    try:
        with open(path) as f:
            presets = json.load(f)
        models, methods, default = presets["models"], presets["methods"], presets["default_method"]
        names = {f.name for f in fields(Hparams)} - {"method"}
        for kind, values in models.items():
            extra = set(values) - names - {"max_unet_params", "why"}
            if extra:
                raise CPError(f"model preset {kind!r} sets unknown hparams {sorted(extra)}")
        for method, values in methods.items():
            if method not in METHODS:
                raise CPError(f"unknown method {method!r}")
            if set(values) - names:
                raise CPError(f"method preset {method!r} sets unknown hparams {sorted(set(values) - names)}")
            check_hparams(Hparams(**values, method=method))
        if default not in METHODS:
            raise CPError(f"unknown default_method {default!r}")
    except FileNotFoundError:
        raise CPError(f"presets file {path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CPError) as e:
        raise CPError(f"presets file {path} is damaged: {type(e).__name__}: {e}") from None
    return presets


def model_preset(presets, unet):
    """(kind, {hparam: value}) of the first model preset, smallest first, whose max_unet_params the UNet fits
    (null: no bound); the base model's size picks the training settings."""
    n = sum(p.numel() for p in unet.parameters())
    bound = lambda values: math.inf if values["max_unet_params"] is None else values["max_unet_params"]
    for kind, values in sorted(presets["models"].items(), key=lambda kv: bound(kv[1])):
        if n <= bound(values):
            return kind, {k: v for k, v in values.items() if k not in ("max_unet_params", "why")}
    raise CPError(f"no model preset in presets.json fits a UNet of {n:,} parameters")


def fixed_temp(hp):
    """τ given as a number (from a flag, a preset or an older state), or None: auto, or not a finite number."""
    try:
        tau = float(hp.dc_temp)
    except (TypeError, ValueError):
        return None
    return tau if math.isfinite(tau) else None


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


# ---------------------------------------------------------------------------------------------------------------
# concepts and images


def concept_prompt(token, class_word=None):
    return f"a photo of a {token}" + (f" {class_word}" if class_word else "")


def base_prompt(class_word=None):
    """The pretrained concept c₀: something the base model already draws."""
    return f"a photo of a {class_word}" if class_word else "a photo"


def concept_files(folder):
    """The image files of a concept folder (sorted) and the other files; a caption IMAGE.txt is neither."""
    if not os.path.isdir(folder):
        raise CPError(f"concept folder {folder} does not exist")
    names = [n for n in sorted(os.listdir(folder)) if not n.startswith(".") and
             not os.path.isdir(os.path.join(folder, n))]
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    captions = {caption_file(n) for n in images}
    return images, [n for n in names if n not in images and n not in captions]


def caption_file(image):
    return os.path.splitext(image)[0] + ".txt"


def load_captions(folder, token):
    """Each image's own prompt, from IMAGE.txt beside it, with `{token}` where the concept's token goes (None for an
    image without one); None when no image has a caption."""
    captions = []
    for name in concept_files(folder)[0]:
        path = os.path.join(folder, caption_file(name))
        if not os.path.isfile(path):
            captions.append(None)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = " ".join(f.read().split())
        except (OSError, UnicodeDecodeError) as e:
            raise CPError(f"cannot read caption {path}: {e}") from None
        if "{token}" not in text:
            raise CPError(f"caption {path} has no {{token}} (where the concept's token goes)")
        captions.append(text.replace("{token}", token))
    return captions if any(captions) else None


def load_images(folder, resolution):
    """Images of a concept folder as a tensor [N, 3, R, R] in [−1, 1]: any mode → RGB, resize + center crop.

    Files without an image extension are skipped (and named in the returned notes); an image that cannot be
    decoded is an error naming it.
    """
    names, skipped = concept_files(folder)
    images = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as im:
                im.load()
                images.append(to_square_rgb(im, resolution))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
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


def enable_only(unet, name):
    """Switch adapter `name` on and every other adapter off (None: the base model alone)."""
    for n in lora.adapter_names(unet):
        lora.set_enabled(unet, n, n == name)


def snapshot(unet, name):
    return {p: (A.detach().clone(), B.detach().clone()) for p, (A, B) in lora.get_adapter(unet, name).items()}


def flat(weights):
    """{path: (A, B)} → {"path.A": A, "path.B": B}, the naming of the Fisher and the anchor (VeRA's (d, b): "path.d",
    "path.b")."""
    return {f"{p}.{k}": t for p, pair in weights.items() for k, t in zip("db" if pair[0].ndim == 1 else "AB", pair)}


# ---------------------------------------------------------------------------------------------------------------
# the losses


def ewc_penalty(unet, name, fisher, anchor, lam):
    """(λ/2) Σ F*(φ − φ*)² over the adapter's parameters (zero before the first Fisher)."""
    if not fisher:
        return torch.zeros(())
    live = flat(lora.get_adapter(unet, name))
    return lam / 2 * sum((fisher[k] * (p - anchor[k]) ** 2).sum() for k, p in live.items())


def clora_penalty(unet, name, lam):
    """λ_c Σ_layers ‖(Σ_{m<n} s_m B_m A_m) ⊙ (s_n B_n A_n)‖², s = α/r; the old sum is constant."""
    total = torch.zeros(())
    for _, m in unet.named_modules():
        if isinstance(m, lora.LoRALinear) and name in m.lora_A and len(m.lora_A) > 1:
            old = sum(m.delta(n) for n in m.lora_A if n != name).detach()
            total = total + (old * m.delta(name)).square().sum()
    return lam * total


class Batches:
    """Random batches of current-task latents, sampled from the VAE posterior each time (held in memory only).

    `flip`: a generator of its own (the task's draws stay as they are) that picks, for each drawn image, the encoding
    of its mirror image with probability 1/2. `drawn` holds the images of the last batch (for their captions)."""

    def __init__(self, model, images, batch_size, gen, flip=None):
        with torch.no_grad():
            mean, std = model.vae.encode(images.to(model.device, model.dtype))
            if flip is not None:  # the mirror images' encodings follow the originals
                mirrored = model.vae.encode(images.flip(-1).to(model.device, model.dtype))
                mean, std = torch.cat([mean, mirrored[0]]), torch.cat([std, mirrored[1]])
        self.mean, self.std, self.scale, self.n = mean, std, model.scaling_factor, len(images)
        self.batch_size, self.gen, self.flip, self.drawn = batch_size, gen, flip, None

    def __call__(self, n=None, gen=None):
        gen = gen or self.gen
        idx = torch.randint(0, self.n, (n or self.batch_size,), generator=gen)
        if gen is self.gen:
            self.drawn = idx
        eps = torch.randn(self.mean[idx].shape, generator=gen).to(self.mean)
        if self.flip is not None:
            idx = idx + self.n * (torch.rand(len(idx), generator=self.flip) < 0.5)
        return (self.mean[idx] + self.std[idx] * eps) * self.scale


def draw_noise(model, x0, gen):
    t = torch.randint(0, len(model.alphas_cumprod), (x0.shape[0],), generator=gen).to(model.device)
    return t, torch.randn(x0.shape, generator=gen).to(x0)


def task_loss(model, x0, prompts, hp, gen, tau=None, captions=None):
    """L_denoise, and δ·L_DC at temperature τ when the method trains on it (δ > 0, K > 1 prompts), from one ragged
    UNet batch: the first `dc_batch` images under all K prompts of S (target first; that column also serves
    L_denoise), the other images under the target only. `captions` (one prompt per image): L_denoise of every image
    under its own caption instead, S only for L_DC."""
    t, eps = draw_noise(model, x0, gen)
    B, K = len(x0), len(prompts)
    n_dc = min(hp.dc_batch, B) if hp.uses("dc_loss") and K > 1 else 0
    first = 0 if captions else n_dc  # the first image of the L_denoise rows
    image = torch.cat([torch.arange(n_dc).repeat_interleave(K), torch.arange(first, B)])
    prompt = torch.cat([torch.arange(K).repeat(n_dc), K + torch.arange(B) if captions else
                        torch.zeros(B - n_dc, dtype=torch.long)])
    pred = dc_score.noise_predictions(model.unet, x0, model.encode_text(prompts + (captions or [])), t, eps,
                                      model.alphas_cumprod, rows=(image, prompt))
    e = dc_score.dc_errors(pred[n_dc * K:, None], eps[first:], "mean")[:, 0]
    if not n_dc:
        return {"denoise": e.mean()}
    ce, e_dc = dc_score.dc_loss(pred[:n_dc * K].view(n_dc, K, *x0.shape[1:]), eps[:n_dc], 0, tau)
    return {"denoise": (e if captions else torch.cat([e_dc[:, 0], e])).mean(), "dc": hp.dc_weight * ce.mean()}


def subset_predictions(model, x0, prompts, gen):
    """(noise predictions [B, K, ...], ε [B, ...]): all K prompts of S (target first) in one UNet batch, one (t, ε)
    per image shared by the K prompts (a paired comparison)."""
    t, eps = draw_noise(model, x0, gen)
    return dc_score.noise_predictions(model.unet, x0, model.encode_text(prompts), t, eps, model.alphas_cumprod), eps


def subset_errors(model, x0, prompts, gen):
    """e[B, K] of `subset_predictions`."""
    return dc_score.dc_errors(*subset_predictions(model, x0, prompts, gen), "mean")


def dc_loss(model, x0, prompts, tau, gen):
    """L_DC = mean over images of −log p_φ(c_n | x) at temperature τ."""
    return dc_score.dc_loss(*subset_predictions(model, x0, prompts, gen), 0, tau)[0].mean()


def calibrate_temp(model, state, task, n=16):
    """τ for `--dc-temp auto`: the median, over n draws (an image of the task, t, ε), of the spread (std) of the
    errors among the prompts of a DC subset S. The logits −e/τ then spread by about one nat across S, so the
    posterior neither saturates (τ far below the gaps) nor flattens (far above), and τ scales with the errors
    themselves: it means the same on every base model and latent size. Its own random stream: calibrating changes
    no other draw of the task."""
    gen = torch.Generator().manual_seed(task.gen.initial_seed() + 7919)
    prompts = dc_subset(state, task.target, task.c0, state.hparams, random.Random(gen.initial_seed()))
    with torch.no_grad():
        spread = subset_errors(model, task.batches(n, gen), prompts, gen).float().std(1).median().item()
    if not spread > 0:
        raise CPError(f"cannot calibrate --dc-temp: the prompts {prompts} give the same errors on the images; "
                      "give --dc-temp a number")
    return spread


def dc_subset(state, target, c0, hp, rng):
    """S: the current concept first, then c₀, then random earlier concepts, at most k prompts."""
    earlier = [c["prompt"] for c in state.concepts]
    return [target, c0] + rng.sample(earlier, min(len(earlier), max(hp.dc_k - 2, 0)))


def teacher_outputs(model, name, x0, context, t, eps):
    """Noise predictions [B, K, ...] and errors [B, K] of the model with only adapter `name` (None: base) on."""
    enable_only(model.unet, name)
    with torch.no_grad():
        e, pred = dc_score.denoising_errors(model.unet, x0, context, t, eps, model.alphas_cumprod, "mean",
                                            return_pred=True)
    return e, pred


def dsc_loss(model, x0, prompts, j_index, teacher2, hp, gen, tau, use_t2=True):
    """L_DSC at temperature τ over the subset [c_n, c₀, (c_j)]: teachers T1 ("teacher1") and T2 (`teacher2`,
    None = base model; use_t2=False drops its two terms), student "current"."""
    t, eps = draw_noise(model, x0, gen)
    context = model.encode_text(prompts)
    teachers = [("teacher1", 0)] + ([(teacher2, j_index)] if use_t2 else [])  # (adapter, the column it teaches)
    outputs = [teacher_outputs(model, name, x0, context, t, eps) for name, _ in teachers]
    enable_only(model.unet, "current")
    pred = dc_score.noise_predictions(model.unet, x0, context, t, eps, model.alphas_cumprod)
    # the sum over teachers of H(p_T, p_S) is H(sum_T p_T, p_S): one soft cross-entropy, rows summing to 1 or 2
    teacher = sum(dc_score.posterior(e_t, tau) for e_t, _ in outputs)
    return {"dsc_h": hp.dsc_w_h * dc_score.dc_loss(pred, eps, temp=tau, teacher=teacher)[0].mean(),
            "dsc_n": hp.dsc_w_n * sum((pred[:, k] - pred_t[:, k]).square().mean()
                                      for (_, k), (_, pred_t) in zip(teachers, outputs))}


def fisher_diagonal(params, sample_loss, n):
    """F̂ = mean over n single-image losses of (∇_φ L)², rescaled to mean 1 over all of φ.

    Only the relative importance of the parameters is kept: the raw magnitudes of a denoising Fisher and of a DC
    Fisher differ by orders, and after rescaling one λ means the same for both and for every task.
    """
    squares = [torch.zeros_like(p) for p in params]
    for _ in range(n):
        for s, g in zip(squares, torch.autograd.grad(sample_loss(), params)):
            s += g.detach() ** 2
    return mean_one(squares)


def mean_one(tensors):
    """The tensors divided by the mean of all their elements (unchanged when that mean is 0)."""
    mean = sum(t.sum() for t in tensors) / sum(t.numel() for t in tensors)
    return [t / mean for t in tensors] if mean > 0 else tensors


# ---------------------------------------------------------------------------------------------------------------
# one task: train it, consolidate (DSC), update the Fisher (EWC), assemble the next state


class Progress:
    """Step, loss terms, it/s, ETA: one updating line on a terminal; where stderr is a file or a pipe, plain lines (the
    first report, then one every tenth of the steps, and the last)."""

    def __init__(self, total, label, stream=None):
        self.total, self.label, self.stream, self.start = total, label, stream or sys.stderr, time.time()
        self.tty, self.next = getattr(self.stream, "isatty", lambda: False)(), 0

    def __call__(self, step, terms):
        if not self.tty and step < min(self.next, self.total):
            return
        self.next = step + max(self.total // 10, 1)
        elapsed = time.time() - self.start
        rate = step / max(elapsed, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        losses = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        line = f"{self.label} {step}/{self.total} | {losses} | {rate:.2f} it/s | ETA {eta:.0f}s "
        print("\r" + line if self.tty else line.rstrip(), end="\n" if step == self.total or not self.tty else "",
              file=self.stream, flush=True)


def optimize(params_groups, steps, loss_fn, phase, task, preview=None):
    """AdamW over the given parameter groups; each step's gradient is the mean over `task.run.grad_accum` calls of
    loss_fn() (micro-batches), scaled against fp16 underflow when the run is fp16. Stops with CPError on a non-finite
    loss. Every step's loss terms (means over its micro-batches) go to `task.run.trace`; returns the last step's."""
    run, label = task.run, f"[{task.name}] {phase}"
    opt = torch.optim.AdamW(params_groups, weight_decay=0.0)
    scaler = torch.amp.GradScaler(params_groups[0]["params"][0].device.type, enabled=run.precision == "fp16")
    progress = Progress(steps, label) if task.log else None
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
    log: bool = True
    tau: float = None          # τ of the DC terms (the flag's number, or calibrated: calibrate_temp)
    run: Run = field(default_factory=Run)
    captions: list = None      # one prompt per image for L_denoise (None: the target prompt for all)


def learn_concept(model, state, folder, name=None, class_word=None, log=True, run=None):
    """Learn one concept on top of `state` (already applied to `model`); returns the new state (unsaved). `run`: how
    (precision, micro-batches, checkpointing, flips, previews; the steps' losses land in run.trace)."""
    run = run or Run()
    check_run(run, state.hparams)
    model.unet.gradient_checkpointing = run.gradient_checkpointing
    with autocast(model.device.type, run.precision):
        return _learn_concept(model, state, folder, name, class_word, log, run)


def autocast(device_type, precision):
    """The autocast context of a precision (none for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type, dtype) if dtype else contextlib.nullcontext()


def _learn_concept(model, state, folder, name, class_word, log, run):
    hp, given = state.hparams, name
    name = name or os.path.basename(os.path.normpath(folder))
    check_name(name, given=bool(given))
    if any(c["name"] == name for c in state.concepts):
        raise CPError(f"concept {name!r} is already learned in this state (use --name to pick another name)")
    images, notes = load_images(folder, model.resolution)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    n = len(state.concepts)
    seed = hp.seed * 1000 + n
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    flip = torch.Generator().manual_seed(2 ** 32 + seed) if run.flip else None  # never the task's stream
    adapter = (f"task{n}" if hp.uses("clora") else "current") if hp.uses("lora") else None
    token, target = f"<{name}>", concept_prompt(f"<{name}>", class_word)
    captions = load_captions(folder, token)
    # the state keeps the EWC statistics on the CPU: move them to the adapter's device once per task
    ewc = tuple({k: v.to(model.device) for k, v in stats.items()} for stats in (state.fisher, state.anchor))
    task = Task(n, name, token, target, class_word, base_prompt(class_word), adapter,
                Batches(model, images, hp.batch_size // run.grad_accum, gen, flip), gen, random.Random(seed), ewc,
                log, run=run, captions=[c or target for c in captions] if captions else None)

    started = time.time()
    metrics = {"task": n, "name": name, "images": len(images),
               "run": {"device": model.device.type, "precision": run.precision, "grad_accum": run.grad_accum,
                       "gradient_checkpointing": run.gradient_checkpointing, "flip": run.flip,
                       "captions": sum(c is not None for c in captions or [])}}
    metrics["train"], row = train_task(model, state, task)
    if hp.uses("dc") or hp.uses("dsc"):
        metrics["dc_temp"] = task_temp(model, state, task)
    if hp.uses("dsc"):
        metrics["consolidate"] = consolidate(model, state, task)
    final = {p: (A.cpu(), B.cpu()) for p, (A, B) in snapshot(model.unet, adapter).items()} if adapter else {}
    fisher, anchor = state.fisher, state.anchor
    if hp.uses("ewc"):
        fisher_started = time.time()
        fisher, anchor = update_fisher(model, state, task, final)
        metrics["fisher_seconds"] = round(time.time() - fisher_started, 1)
    metrics["seconds"] = round(time.time() - started, 1)
    return next_state(model, state, task, row, final, fisher, anchor, metrics)


def task_temp(model, state, task):
    """τ of the task's DC terms: the number given, else calibrated once per task where the terms first need it:
    before training when δ·L_DC trains, else after training, on the model that DSC's consolidation and the DC Fisher
    then score."""
    if task.tau is None:
        task.tau = fixed_temp(state.hparams) or calibrate_temp(model, state, task)
    return task.tau


def train_task(model, state, task):
    """Train the new token's embedding row and the task's adapter on L_denoise (+ δ L_DC) + the method's penalty.
    Returns the last loss terms and the trained row."""
    hp = state.hparams
    token_id = add_tokens(model, {**{t: None for t in state.tokens}, task.token: None})[task.token]
    row, hook = trainable_row(model, token_id)
    groups = [{"params": [row], "lr": hp.token_lr}]
    if task.adapter:
        if task.adapter not in lora.adapter_names(model.unet):
            install_adapter(model.unet, task.adapter, None, hp)
        groups.append({"params": lora.set_trainable(model.unet, task.adapter), "lr": hp.lr})

    def loss():
        prompts = dc_subset(state, task.target, task.c0, hp, task.rng) if hp.uses("dc_loss") else [task.target]
        x0 = task.batches()
        captions = [task.captions[i] for i in task.batches.drawn] if task.captions else None
        terms = task_loss(model, x0, prompts, hp, task.gen, tau, captions)
        if hp.uses("ewc"):
            terms["ewc"] = ewc_penalty(model.unet, task.adapter, *task.ewc, hp.ewc_lambda)
        if hp.uses("clora"):
            terms["clora"] = clora_penalty(model.unet, task.adapter, hp.clora_lambda)
        return terms

    try:
        tau = task_temp(model, state, task) if hp.uses("dc_loss") else None
        metrics = optimize(groups, hp.steps, loss, "train", task, task.run.preview)
    finally:  # a failed task must not leave the row spliced into a model that may be used again
        hook.remove()
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[token_id] = row
    return metrics, row.detach().clone().cpu()


def consolidate(model, state, task):
    """DSC: distil into the adapter T1 (the adapter as trained on this task), on c_n, and T2 (the pool's adapter
    after a random earlier concept c_j), on c_j. The first task has no earlier concept: T2 is then the base model on
    c₀ (`--dsc-first base`), or there is no T2 term (`none`)."""
    hp = state.hparams
    use_t2, tau = bool(state.pool) or hp.dsc_first == "base", task_temp(model, state, task)
    install_adapter(model.unet, "teacher1", snapshot(model.unet, task.adapter), hp)
    teacher2 = "teacher2" if state.pool else None
    if teacher2:
        install_adapter(model.unet, teacher2, None, hp)
    params = lora.set_trainable(model.unet, task.adapter)

    def loss():
        j = task.rng.randrange(len(state.concepts)) if state.concepts else None
        if j is not None:
            lora.set_adapter(model.unet, teacher2, state.pool[j])
        prompts = [task.target, task.c0] + ([state.concepts[j]["prompt"]] if j is not None else [])
        terms = dsc_loss(model, task.batches(), prompts, len(prompts) - 1, teacher2, hp, task.gen, tau, use_t2)
        if hp.uses("ewc"):
            terms["ewc"] = ewc_penalty(model.unet, task.adapter, *task.ewc, hp.ewc_lambda)
        return terms

    metrics = optimize([{"params": params, "lr": hp.lr}], hp.dsc_steps, loss, "consolidate", task)
    for name in ("teacher1", teacher2):
        if name:
            lora.remove(model.unet, name)
    enable_only(model.unet, task.adapter)
    return metrics


def fisher_estimate(model, state, task, n):
    """F̂ of the task's adapter over n single images: of the DC cross-entropy for the DC-informed methods, of
    L_denoise for `ewc`."""
    hp = state.hparams
    if hp.uses("dc"):
        tau = task_temp(model, state, task)
        sample_loss = lambda: dc_loss(model, task.batches(1), dc_subset(state, task.target, task.c0, hp, task.rng),
                                      tau, task.gen)
    else:
        sample_loss = lambda: task_loss(model, task.batches(1), [task.target], hp, task.gen)["denoise"]
    return fisher_diagonal(lora.lora_parameters(model.unet, [task.adapter]), sample_loss, n)


def update_fisher(model, state, task, final):
    """Online EWC at the end of a task: F* ← γ F* + F̂ and φ* ← φ (`final`, the adapter as the task leaves it).
    F̂ (`fisher_diagonal`) is taken of L_denoise for `ewc`, and of the DC cross-entropy −log p_φ(c_n | x) over
    S = {c_n, c₀, earlier concepts} for the DC-informed methods: the Fisher then weighs the parameters that tell c_n
    apart from what the model knew. `--fisher-norm total` rescales F* to mean 1 after the update, so that λ weighs
    the same on every task (with `task`, the mean of F* grows 1, 1 + γ, 1 + γ + γ², ... towards 1/(1−γ))."""
    hp = state.hparams
    anchor = flat(final)
    f_hat = fisher_estimate(model, state, task, hp.fisher_samples)
    fisher = {k: hp.ewc_gamma * state.fisher.get(k, 0) + f.cpu() for k, f in zip(anchor, f_hat)}
    if hp.fisher_norm == "total":
        fisher = dict(zip(fisher, mean_one(list(fisher.values()))))
    return fisher, anchor


def next_state(model, state, task, row, final, fisher, anchor, metrics):
    """The state after the task: its token row, the adapter `final` (carried, and added to the pool), the EWC
    statistics."""
    hp = state.hparams
    for p in lora.lora_parameters(model.unet, [task.adapter]) if task.adapter else []:
        p.requires_grad_(False)
    with torch.no_grad():  # ‖ΔW‖ of the task's adapter; 0 for `ti`, which trains none
        deltas = lora.deltas(model.unet, task.adapter).values() if task.adapter else []
        metrics["lora_norm"] = float(sum(w.square().sum() for w in deltas) ** 0.5)
    concept = {"name": task.name, "token": task.token, "prompt": task.target, "class_word": task.class_word,
               "task": task.index}
    projection = lora.get_projection(model.unet)
    return State(model=state.model, hparams=hp, concepts=state.concepts + [concept],
                 history=state.history + [metrics],
                 lora=None if hp.uses("clora") or not task.adapter else final,
                 pool=state.pool + ([final] if task.adapter else []), tokens={**state.tokens, task.token: row},
                 fisher=fisher, anchor=anchor, base=state.base,
                 projection=tuple(P.cpu() for P in projection) if projection else None)


# ---------------------------------------------------------------------------------------------------------------
# saving and loading the state


def new_state(model, hp):
    check_hparams(hp)
    return State(model={"path": model.path, "fingerprint": model.fingerprint}, hparams=hp)


def lock_state(folder):
    """Become the one writer of a state folder until this process ends (the OS drops the lock of a killed process).

    Returns the open lock file; keep it. A folder that is not a state is refused before anything is written to it.
    """
    read_manifest(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, LOCK), "a+")
    except OSError as e:
        raise CPError(f"cannot write the state folder {folder}: {e}") from None
    try:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # one byte far past the process id written below: a locked byte cannot be read by other processes
            os.lseek(f.fileno(), 1 << 20, os.SEEK_SET)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except BlockingIOError if fcntl else OSError:  # msvcrt: a plain OSError
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise CPError(f"state {folder} is in use by {f'process {holder}' if holder else 'another process'} "
                      "(one run at a time writes a state)") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def append_log(folder, records):
    """Add the steps of the task just saved to the log beside the state: one JSON object per line."""
    with open(os.path.join(folder, LOG), "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def read_manifest(folder):
    """The manifest of a state folder; None for a folder that does not exist or holds only what a state writes."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        foreign = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if not STATE_NAME.fullmatch(n)]
        if foreign:
            raise CPError(f"{folder} holds no {MANIFEST} and is not empty ({foreign[0]}, ...): it is not a state; "
                          "give a new or empty folder") from None
        return None
    except OSError as e:
        raise CPError(f"cannot read {path}: {e.strerror}") from None
    try:
        m = json.loads(text)
        named = _named(m["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise CPError(f"{path} is damaged: not a state manifest ({type(e).__name__}: {e})") from None
    if not all(isinstance(n, str) and re.fullmatch(r"(pool/)?[\w.-]+", n) and ".." not in n for n in named):
        raise CPError(f"{path} is damaged: it names a file outside the state folder")
    return m


def _lora_files(files):
    """The LoRA files a manifest names: the carried LoRA (if any), then the pool."""
    return ([files["lora"]] if files["lora"] else []) + files["pool"]


def _named(files):
    return [files["tokens"], files["ewc"]] + _lora_files(files)


def _write_file(path, write):
    """write(path), then force the bytes to disk (opened for writing: Windows flushes no read-only handle)."""
    write(path)
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def save_state(state, folder):
    """Write the state's files under names new to this attempt, then replace the manifest (the commit point), then
    remove the files that only the replaced manifest named. Nothing else in the folder is touched.

    The manifest on disk must still be the one `state` continues (compare-and-swap); a failed write removes what
    this attempt wrote and is a CPError: the previous state stays whole.
    """
    old = read_manifest(folder)
    if old != state.base:
        raise CPError(f"the state in {folder} changed since this run loaded it (another run saved to it); "
                      "nothing was saved")
    attempt, n, hp = os.urandom(4).hex(), len(state.concepts), state.hparams
    kept = old["files"]["pool"][:len(state.pool)] if old else []  # a committed pool entry never changes
    files = {"tokens": f"tokens_{n:03d}_{attempt}.safetensors", "ewc": f"ewc_{n:03d}_{attempt}.safetensors",
             "lora": f"lora_{n:03d}_{attempt}.safetensors" if state.lora else None,
             "pool": kept + [f"pool/task_{i:03d}_{attempt}.safetensors" for i in range(len(kept), len(state.pool))]}
    tensors = {"tokens": state.tokens, "ewc": {**{"fisher." + k: v for k, v in state.fisher.items()},
                                               **{"anchor." + k: v for k, v in state.anchor.items()}}}
    manifest = json.dumps(dict(format="cp-state/1", model=state.model, method=hp.method, hparams=asdict(hp),
                               concepts=state.concepts, history=state.history, files=files), indent=1)
    write_lora = lambda w, projection=None: lambda p: (
        lora.write_vera(w, p, projection) if hp.adapter == "vera" else
        lora.write_lora_file(w, {k: hp.alpha for k in w}, p, "diffusers"))
    writes = [(files[k], lambda p, t=tensors[k]: save_file({k: v.contiguous() for k, v in t.items()}, p))
              for k in ("tokens", "ewc")]
    # VeRA: the carried file holds the shared projection, the pool files leave it out
    writes += [(files["lora"], write_lora(state.lora, state.projection))] if state.lora else []
    writes += [(name, write_lora(w)) for name, w in zip(files["pool"][len(kept):], state.pool[len(kept):])]
    writes += [(f"{MANIFEST}.{attempt}.tmp", lambda p: _write_text(p, manifest))]
    written = []
    try:
        os.makedirs(os.path.join(folder, "pool"), exist_ok=True)
        for name, write in writes:
            written.append(os.path.join(folder, name))  # before writing: a half-written file is removed too
            _write_file(written[-1], write)
        os.replace(os.path.join(folder, writes[-1][0]), os.path.join(folder, MANIFEST))
    except BaseException as e:
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        if isinstance(e, OSError):
            raise CPError(f"cannot save the state to {folder}: {e}; the previous state is unchanged") from None
        raise
    for name in set(_named(old["files"]) if old else []) - set(_named(files)):
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    state.base = json.loads(manifest)


def load_state(folder):
    """The state a folder's manifest names. Every file is read and checked against the manifest: a missing, damaged
    or mis-shaped file is a CPError that names it. Needs no lock: a save committed while reading means reading again.
    """
    while True:
        m = read_manifest(folder)
        if m is None:
            raise CPError(f"{folder} holds no state (no {MANIFEST})")
        try:
            return _read_state(folder, m)
        except CPError:
            if read_manifest(folder) == m:
                raise


def _read_state(folder, m):
    path = os.path.join(folder, MANIFEST)
    try:
        hp = Hparams(**m["hparams"])
        check_hparams(hp)
        concepts, files = m["concepts"], m["files"]
        state = State(model=m["model"], hparams=hp, concepts=concepts, history=m["history"],
                      base=copy.deepcopy(m))  # as it is on disk, whatever happens to the state
        tokens = {c["token"] for c in concepts}
    except (CPError, KeyError, TypeError) as e:
        raise CPError(f"{path} is damaged: {type(e).__name__}: {e}") from None

    def read(name, reader):
        try:
            return reader(os.path.join(folder, name))
        except FileNotFoundError:
            raise CPError(f"state file {os.path.join(folder, name)} is missing") from None
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CPError(f"state file {os.path.join(folder, name)} is damaged: {e}") from None

    state.tokens = read(files["tokens"], load_file)
    if set(state.tokens) != tokens or any(v.dim() != 1 for v in state.tokens.values()):
        raise _damaged(folder, files["tokens"], f"holds {sorted(state.tokens)}, not one 1-D row per concept")
    ewc = read(files["ewc"], load_file)
    state.fisher = {k[7:]: v for k, v in ewc.items() if k.startswith("fisher.")}
    state.anchor = {k[7:]: v for k, v in ewc.items() if k.startswith("anchor.")}
    if len(files["pool"]) != (len(concepts) if hp.uses("lora") else 0) or \
            bool(files["lora"]) != (hp.uses("lora") and not hp.uses("clora") and len(concepts) > 0):
        raise CPError(f"{path} is damaged: its files do not fit {len(concepts)} concepts of method {hp.method}")
    read_adapter = lambda p: lora.read_vera(p)[:2] if hp.adapter == "vera" else (_pairs(lora.read_lora_file(p)), None)
    adapters = [read(name, read_adapter) for name in _lora_files(files)]
    state.lora, state.projection = adapters[0] if files["lora"] else (None, None)
    state.pool = [w for w, _ in (adapters[1:] if files["lora"] else adapters)]
    return state


def _damaged(folder, name, what):
    return CPError(f"state file {os.path.join(folder, name)} is damaged: it {what}")


def _pairs(mods):
    return {p: (A, B) for p, (A, B, _) in mods.items()}


def check_model(state, model):
    """The state fits `model`: made with the same base weights (a fingerprint), every tensor shaped for it."""
    old = len(state.model["fingerprint"]) == 16  # an older state records `unet.old_fingerprint`, 16 hex digits
    given = model.old_fingerprint if old else model.fingerprint
    if state.model["fingerprint"] != given:
        raise CPError(f"this state was made with another base model ({state.model['path']}, fingerprint "
                      f"{state.model['fingerprint']}); the model given has fingerprint {given}")
    if old:  # the same model as far as the old hash tells: the state's next save records the full fingerprint
        state.model = dict(state.model, fingerprint=model.fingerprint)
    if state.base is None:
        return
    files, hp = state.base["files"], state.hparams  # file names are relative to the state folder
    dim = model.text_encoder.get_input_embeddings().weight.shape[1]
    if any(row.shape != (dim,) for row in state.tokens.values()):
        raise _damaged("", files["tokens"], f"holds token rows not of the model's width {dim}")
    names = "db" if hp.adapter == "vera" else "AB"  # as `flat` names them
    shapes = lambda m: ((hp.rank,), (m.out_features,)) if hp.adapter == "vera" else \
        ((hp.rank, m.in_features), (m.out_features, hp.rank))
    need = {p: shapes(m) for p, m in lora.target_modules(model.unet, hp.targets)}
    for name, w in zip(_lora_files(files), ([state.lora] if state.lora else []) + state.pool):
        _check_shapes(name, {p: (tuple(A.shape), tuple(B.shape)) for p, (A, B) in w.items()}, need)
    if hp.uses("ewc") and state.concepts:
        for stats in (state.fisher, state.anchor):
            _check_shapes(files["ewc"], {k: tuple(v.shape) for k, v in stats.items()},
                          {f"{p}.{k}": s for p, pair in need.items() for k, s in zip(names, pair)})


def _check_shapes(name, got, need):
    """{tensor or module: shape} of a state file against what the model needs."""
    for k in sorted(set(got) | set(need)):
        if got.get(k) != need.get(k):
            raise _damaged("", name, f"holds {k} as {got.get(k, 'nothing')}; the model needs "
                           f"{need.get(k, 'no such tensor')}")


def load_with_state(folder, model_path=None, device="cpu", dtype=torch.float32):
    """The base model named by a state (or `model_path`), with the state's tokens and LoRA(s) applied."""
    import unet
    state = load_state(folder)
    model = unet.load_model(model_path or state.model["path"], device, dtype)
    check_model(state, model)
    apply_state(model, state)
    return model, state
