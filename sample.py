"""DDIM sampling with classifier-free guidance, and the `sample.py` command line.

DDIM (Song et al. 2021, eq. 12 with η = 0): from the noise prediction ε̂ at step t,
    x̂₀ = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t,    x_{t'} = √ᾱ_{t'}·x̂₀ + √(1−ᾱ_{t'})·ε̂.
Classifier-free guidance (Ho & Salimans 2022): ε̂ = ε_∅ + s·(ε_c − ε_∅), one UNet batch for both halves.

    python sample.py --prompt "a photo of a red star on a blue background" -n 4 --out grid.png   # toy/model
    python sample.py --state runs/default --prompt "a photo of a <striped_ring> next to a <checkered_heart>"
"""
import argparse
import math
import os
import re
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "model")


def ddim_timesteps(steps, scheduler_config):
    """diffusers' "leading" spacing: T/steps apart, shifted by steps_offset, from high noise to low."""
    n_train = scheduler_config["num_train_timesteps"]
    ratio = n_train // steps
    return (torch.arange(steps - 1, -1, -1) * ratio + scheduler_config.get("steps_offset", 0)).tolist(), ratio


def guided_eps(unet, x, t, cond, uncond, scale):
    """ε_∅ + s·(ε_c − ε_∅), both halves in one batch."""
    eps_u, eps_c = unet(torch.cat([x, x]), torch.full((2 * x.shape[0],), t, device=x.device),
                        torch.cat([uncond, cond])).chunk(2)
    return eps_u + scale * (eps_c - eps_u)


@torch.no_grad()
def sample(model, prompts, negative_prompt="", steps=50, guidance=7.5, seed=0, latents=None, progress=False):
    """Images in [0, 1], shape [len(prompts), 3, H, W], from a `unet.Model`. Same seed → same images."""
    n = len(prompts)
    cond = model.encode_text(prompts)
    uncond = model.encode_text([negative_prompt] * n)
    if latents is None:
        side, ch = model.unet.config["sample_size"], model.unet.config["in_channels"]
        latents = torch.randn(n, ch, side, side, generator=torch.Generator().manual_seed(seed))
    x = latents.to(model.device, model.dtype)
    abar = model.alphas_cumprod.to(model.device)
    final_abar = 1.0 if model.scheduler_config.get("set_alpha_to_one", False) else abar[0]
    timesteps, ratio = ddim_timesteps(steps, model.scheduler_config)
    for i, t in enumerate(timesteps):
        eps = guided_eps(model.unet, x, t, cond, uncond, guidance).float()
        a_t = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else final_abar
        x0 = (x.float() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = (a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps).to(model.dtype)
        if progress and (sys.stderr.isatty() or i + 1 == len(timesteps)):  # a log file gets the last step only
            print(f"\rsampling step {i + 1}/{len(timesteps)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return ((model.decode_latents(x).float() + 1) / 2).clamp(0, 1).cpu()


def to_grid(images, ncols=None, labels=None):
    """A PIL RGB image holding images [N, 3, H, W] in [0, 1] in a grid; `labels`: one per row, written to its left."""
    n, _, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), dtype=np.uint8)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i]
    grid = Image.fromarray(grid, "RGB")
    if not labels:
        return grid
    font = ImageFont.load_default()
    margin = max(int(font.getlength(text)) for text in labels) + 8
    out = Image.new("RGB", (margin + grid.width, grid.height), "white")
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        draw.text((4, r * h + h // 2), text, fill="black", font=font, anchor="lm")
    return out


def concept_grid(model, prompts, labels, n=4, steps=25, guidance=5.0, seed=0):
    """One row of n images per prompt. Column j starts every row from the same noise (seed j), in every grid: rows
    compare with each other, and a grid with the same grid of another state."""
    side, ch = model.unet.config["sample_size"], model.unet.config["in_channels"]
    noise = torch.cat([torch.randn(1, ch, side, side, generator=torch.Generator().manual_seed(seed + j))
                       for j in range(n)])
    rows = [sample(model, [p] * n, steps=steps, guidance=guidance, latents=noise) for p in prompts]
    return to_grid(torch.cat(rows), n, labels)


def unknown_tokens(prompt, tokens, tokenizer):
    """The <token>s written in a prompt that the tokenizer reads as none of the learned `tokens` (it would split
    them into pieces). Compared by token ids, not by text: CLIP lowercases, so `<PINE_TREE>` is the learned
    `<pine_tree>`."""
    import unet
    return [t for t in re.findall(r"<[^<>\s]+>", prompt) if unet.reads_as(tokenizer, t, tokens) is None]


OUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # RGB grids (GIF: 256 colours)


def out_extensions():
    """The extensions of OUT_EXTENSIONS that this Pillow can write."""
    formats = Image.registered_extensions()
    return [e for e in OUT_EXTENSIONS if formats.get(e) in Image.SAVE]


def blocked_by(path):
    """The file that stands where the folder `path`, or a folder above it, would go; None if nothing does."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def check_out(path, overwrite=False):
    """What is wrong with an --out path (before any work), or None: a folder, an extension Pillow cannot write a
    grid in, an existing file (unless `overwrite`), a file where its folder would go."""
    known = ", ".join(out_extensions())
    if os.path.isdir(path):
        return f"--out {path} is a folder; give an image file name ({known})"
    ext = os.path.splitext(path)[1].lower()
    if ext not in out_extensions():
        return f"--out {path}: {f'unknown extension {ext}' if ext else 'no extension'}; use one of {known}"
    if os.path.lexists(path) and not overwrite:
        return f"--out {path} exists; give --overwrite to replace it"
    blocker = blocked_by(os.path.dirname(path) or ".")
    if blocker:
        return f"--out {path}: {blocker} is a file, not a folder"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate an image grid with DDIM + classifier-free guidance.")
    p.error = lambda message: sys.exit(f"error: {message}")  # usage errors too: one line, exit status 1
    p.add_argument("--model", default=None, help="diffusers folder or single-file checkpoint (default: the "
                   "state's model, else toy/model)")
    p.add_argument("--state", help="a train.py state directory: its learned tokens and LoRA are applied")
    p.add_argument("--prompt", required=True, help="text prompt; a state's tokens are written <name>")
    p.add_argument("--negative-prompt", default="", help="prompt guided away from (default: the empty prompt)")
    p.add_argument("-n", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale s (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--out", default="samples.png", help="image file of the grid: .png, .jpg, .jpeg, .webp, .bmp, "
                   ".tif or .tiff (default samples.png); a missing folder is created")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (without it, one is "
                   "refused before any work)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplies the state's LoRA (default 1; 0: the base "
                   "model with the learned tokens)")
    p.add_argument("--strict", action="store_true", help="a <token> the state has not learned is an error, not a "
                   "warning")
    args = p.parse_args(argv)
    for wrong, message in ((args.n < 1, f"-n {args.n}: must be ≥ 1"),
                           (not 1 <= args.steps <= 1000, f"--steps {args.steps}: must be 1 to 1000 (SD's T)"),
                           (not math.isfinite(args.guidance), f"--guidance {args.guidance}: must be finite"),
                           (not math.isfinite(args.lora_scale), f"--lora-scale {args.lora_scale}: must be finite"),
                           (args.device == "cuda" and not torch.cuda.is_available(),
                            "--device cuda: this machine has no CUDA device")):
        if wrong:
            p.error(message)
    wrong = check_out(args.out, args.overwrite)  # before the model loads: a grid that cannot be saved costs nothing
    if wrong:
        p.error(wrong)

    import cp
    import cp_state
    import lora
    import unet
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        if args.state:
            model, state = cp_state.load_with_state(args.state, args.model, device, dtype)
            lora.scale(model.unet, args.lora_scale)
            lora.merge(model.unet)  # fold the LoRA(s) into the weights: plain-speed sampling
        else:
            model, state = unet.load_model(args.model or DEFAULT_MODEL, device, dtype), None
    except (unet.LoadError, cp.CPError) as e:
        sys.exit(f"error: {e}")
    learned = [c["token"] for c in state.concepts] if state else []
    unknown = unknown_tokens(args.prompt + " " + args.negative_prompt, learned, model.tokenizer)
    if unknown:
        message = (f"{', '.join(unknown)} not learned: " + (f"this state has {', '.join(learned)}" if learned else
                   "no --state given" if not state else "this state has no concepts"))
        if args.strict:
            sys.exit(f"error: {message}")
        print(f"warning: {message}; the tokenizer reads it as plain text", file=sys.stderr)
    images = sample(model, [args.prompt] * args.n, args.negative_prompt, args.steps, args.guidance, args.seed,
                    progress=True)
    try:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        to_grid(images).save(args.out)
    except OSError as e:
        sys.exit(f"error: cannot write {args.out}: {e}")
    print(f"wrote {args.out} ({args.n} image{'s' * (args.n != 1)}, {args.steps} DDIM steps, guidance {args.guidance}, "
          f"seed {args.seed})")


if __name__ == "__main__":
    main()
