"""Learn one concept, continuing a continual-personalization state (the methods and losses live in cp.py).

    python train.py --concept examples/concepts/pine_tree          # tiny default model, presets.json's default method
    python train.py --concept my_dog --model path/to/sd15 --class-word dog --method dsc-ewc-dc   # another method
    python train.py --state runs/default --export exported/             # LoRA (diffusers + kohya) and tokens
    python train.py --concept examples/concepts/pine_tree --adapter vera --state runs/vera   # VeRA instead of LoRA
    python train.py --concept my_dog --model sd15 --gradient-checkpointing --precision fp16   # less GPU memory

Each run adds one concept to the state directory (default runs/default), appends every step's losses to its
log.jsonl and draws every learned concept into its grids/ folder. Bad input ends with a one-line error and exit
status 1; the state is then left as it was (a new one leaves no folder). One run at a time writes a state: a second
run on a state in use stops at once, naming the process that holds it.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, fields

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import cp
import cp_state
import lora
import sample
import unet

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


PRESETS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets.json")
TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "model")
FIXED = ("method", "rank", "alpha", "targets", "adapter")  # a state's adapter layout cannot change between tasks


def load_presets(path=None):
    """presets.json, checked: {"models": {kind: {"max_unet_params", "why", hparam: value}}, "default_method",
    "methods": {method: {hparam: value}}, ...}. A missing or damaged file, an unknown method or hparam, or a value
    cp.check_hparams refuses is a cp.CPError naming it."""
    path = path or PRESETS_FILE
    try:
        with open(path) as f:
            presets = json.load(f)
        models, methods, default = presets["models"], presets["methods"], presets["default_method"]
        names = {f.name for f in fields(cp.Hparams)} - {"method"}
        for kind, values in models.items():
            extra = set(values) - names - {"max_unet_params", "why"}
            if extra:
                raise cp.CPError(f"model preset {kind!r} sets unknown hparams {sorted(extra)}")
        for method, values in methods.items():
            if method not in cp.METHODS:
                raise cp.CPError(f"unknown method {method!r}")
            if set(values) - names:
                raise cp.CPError(f"method preset {method!r} sets unknown hparams {sorted(set(values) - names)}")
            cp.check_hparams(cp.Hparams(**values, method=method))
        if default not in cp.METHODS:
            raise cp.CPError(f"unknown default_method {default!r}")
    except FileNotFoundError:
        raise cp.CPError(f"presets file {path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, cp.CPError) as e:
        raise cp.CPError(f"presets file {path} is damaged: {type(e).__name__}: {e}") from None
    return presets


def model_preset(presets, n_params):
    """(kind, {hparam: value}) of the first model preset, smallest first, whose max_unet_params a UNet of n_params
    parameters fits (null: no bound); the base model's size picks the training settings (`unet_size`)."""
    bound = lambda values: math.inf if values["max_unet_params"] is None else values["max_unet_params"]
    for kind, values in sorted(presets["models"].items(), key=lambda kv: bound(kv[1])):
        if n_params <= bound(values):
            return kind, {k: v for k, v in values.items() if k not in ("max_unet_params", "why")}
    raise cp.CPError(f"no model preset in presets.json fits a UNet of {n_params:,} parameters")


def unet_size(model_path):
    """The parameters of the UNet at a model path, from its config alone (built on the meta device: no weight is
    read); a single-file checkpoint has SD v1's. A path that is not a model is a unet.LoadError."""
    if os.path.isdir(model_path):
        config = unet.check_folder(model_path, weights=False)[0]["unet"]
    elif os.path.isfile(model_path):
        config = unet.PRESETS["sd-v1"]["unet"]
    else:
        raise unet.LoadError(f"{model_path}: no such model folder or checkpoint file")
    with torch.device("meta"):
        return sum(p.numel() for p in unet.UNet(config).parameters())


def add_hparam_flags(parser, presets=None, skip=()):
    """Every cp.Hparams field (but `skip`) as a flag in one of two groups, the state's settings and the run's; its
    help the field's. A flag not given is None: resolved by `resolve_hparams`; the help names the presets that change
    its default. Returns the group of run settings."""
    defaults = cp.Hparams()
    choices = {"method": cp.METHODS, "targets": list(lora.TARGETS), "adapter": lora.ADAPTERS}
    groups = {False: parser.add_argument_group(
                  "state settings", "the method on this state: recorded by its first task, kept by the next ones (a "
                  "flag changes one for this and later tasks, with a note; method, rank, alpha, targets and adapter "
                  "cannot change)"),
              True: parser.add_argument_group(
                  "run settings", "this run only, never stored: a flag not given takes the presets' value (model "
                  "and method), whatever an earlier run was given")}
    for f in fields(cp.Hparams):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        changed = [f"{kind} model: {v[f.name]}" for kind, v in (presets or {}).get("models", {}).items()
                   if f.name in v and v[f.name] != default]
        changed += [f"{m}: {v[f.name]}" for m, v in (presets or {}).get("methods", {}).items()
                    if f.name in v and v[f.name] != default]
        help = f"{f.metadata['help']} (default {default}{''.join('; ' + c for c in changed)})"
        groups[f.metadata["run"]].add_argument("--" + f.name.replace("_", "-"), type=type(default), default=None,
                                               choices=choices.get(f.name), help=help.replace("%", "%%"))
    return groups[True]


def presets_help(presets):
    """The epilog of -h: where defaults come from, and every preset's values."""
    if isinstance(presets, cp.CPError):
        return f"presets: {presets}"
    show = lambda values: ", ".join(f"{k} {v}" for k, v in values.items() if k not in ("max_unet_params", "why")) \
        or "no values of its own"
    lines = [f"Defaults: a plain run is the default method, {presets['default_method']}, at its tuned preset on the "
             "shipped toy model: the defaults above. Another --method takes its own preset, and a larger base model "
             f"its own run settings (both from {PRESETS_FILE}, chosen by bench/tune.py on the tuning concepts); "
             "a continued state keeps its method's settings; flags win.", "model presets:"]
    lines += [f"  {kind}: {show(v)}" for kind, v in presets["models"].items()]
    lines += ["method presets:"] + [f"  {m}: {show(v)}" for m, v in presets["methods"].items()]
    untuned = [m for m in cp.METHODS if m not in presets["methods"]]
    lines += [f"  not tuned yet, at the defaults above: {', '.join(untuned)}"] if untuned else []
    return "\n".join(lines)


def parse_args(argv):
    try:
        presets = load_presets()
    except cp.CPError as e:  # -h still works; a run stops on it with one line
        presets = e
    p = argparse.ArgumentParser(description="Learn one concept with continual personalization.",
                                epilog=presets_help(presets), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # usage errors too: one line, exit status 1
    p.add_argument("--concept", help="folder of images of the new concept")
    p.add_argument("--state", default="runs/default", help="state directory (created if missing)")
    p.add_argument("--model", default=None, help="diffusers folder or single-file checkpoint (default: the state's, "
                   "else toy/model)")
    p.add_argument("--name", help="concept name, letters, digits, _ and - only; its token is <name> (default: the "
                   "folder name)")
    p.add_argument("--class-word", help="class word appended to the prompt, also the pretrained concept c0")
    p.add_argument("--export", metavar="DIR", help="write into DIR (created if missing) the LoRA (diffusers; kohya; "
                   "kohya with the tokens bundled, for A1111; VeRA: PEFT's folder layout) and the token embeddings")
    p.add_argument("--overwrite", action="store_true", help="let --export replace files in DIR (without it, an "
                   "export that would replace a file is refused before any work)")
    p.add_argument("--no-preview", action="store_true", help="skip the grid of every learned concept after training")
    run = add_hparam_flags(p, None if isinstance(presets, cp.CPError) else presets)
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    run.add_argument("--precision", default="auto", choices=["auto", *cp.PRECISIONS], help="auto: bf16 on a GPU "
                     "that has it, else fp16 (with loss scaling) on a GPU, fp32 on the CPU")
    run.add_argument("--gradient-checkpointing", action="store_true", help="recompute the UNet's activations in the "
                     "backward pass: far less memory for a second forward pass")
    run.add_argument("--grad-accum", type=int, default=1, metavar="N", help="split each batch into N micro-batches "
                     "(less memory, the same batch; default 1)")
    run.add_argument("--flip", action="store_true", help="mirror each training image at random (not for text or "
                     "asymmetric concepts)")
    run.add_argument("--sample-every", type=int, default=0, metavar="N", help="draw the new concept every N training "
                     "steps into grids/ (default 0: never)")
    return p.parse_args(argv)


def resolve_hparams(args, state_hparams, presets, model_values):
    """The settings this run trains with, resolved once: the flags given, over the state's settings (state_hparams;
    None for a new state), over the method's preset, over the model's (model_values). The run settings (cp.RUN_KNOBS)
    never come from the state. A state's adapter layout (FIXED) cannot change. Returns (hparams, {name: (the state's
    value, the flag's)} of the state settings a flag changes)."""
    given = {f.name: getattr(args, f.name) for f in fields(cp.Hparams) if getattr(args, f.name) is not None}
    method = state_hparams.method if state_hparams else given.get("method", presets["default_method"])
    values = {**model_values, **presets["methods"].get(method, {}), "method": method}
    changed = {}
    if state_hparams is not None:
        kept = {k: v for k, v in asdict(state_hparams).items() if k not in cp.RUN_KNOBS}
        for k in FIXED:
            if k in given and given[k] != kept[k]:
                raise cp.CPError(f"--{k.replace('_', '-')} {given[k]!r}: this state's {k} is {kept[k]!r}, fixed "
                                 "for all its tasks; start a new --state to use another")
        changed = {k: (kept[k], v) for k, v in given.items() if k in kept and v != kept[k]}
        values.update(kept)
    hp = cp.Hparams(**{**values, **given})
    cp.check_hparams(hp)
    return hp, changed


def describe_settings(hp, source, given):
    """The lines printed at the start of a run: the state's settings and the run's, and where the defaults came from."""
    flags = f"; flags given: {', '.join(given)}" if given else ""
    show = lambda run: ", ".join(f"{k} {v}" for k, v in asdict(hp).items() if (k in cp.RUN_KNOBS) == run)
    return f"state settings ({source}{flags}): {show(False)}\nrun settings: {show(True)}"


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def concept_name(folder, name=None):
    """A concept's name, checked: `name` when given (an empty one is refused, not replaced), else the folder's. A
    name whose token file an export would write over one of its adapter files is refused too."""
    given = name is not None
    name = name if given else os.path.basename(os.path.normpath(folder))
    cp.check_name(name, given)
    if name + ".safetensors" in (*LORA_FILES, lora.VERA_WEIGHTS):
        raise cp.CPError(f"concept name {name!r}: an export writes {name}.safetensors for its own adapter; pick "
                         "another" + (" --name" if given else " name with --name"))
    return name


def read_concept(folder, resolution, name=None):
    """(images [N, 3, R, R] in [−1, 1], name, captions) of a concept folder: its name is the folder's unless given;
    skipped files are noted on stderr."""
    name = concept_name(folder, name)
    images, notes = load_images(folder, resolution)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return images, name, load_captions(folder, f"<{name}>")


def learn_folder(model, state, folder, name=None, class_word=None, **kw):
    """cp.learn_concept on the concept a folder holds (`read_concept`)."""
    images, name, captions = read_concept(folder, model.resolution, name)
    return cp.learn_concept(model, state, images, name, class_word, captions, **kw)


def concept_files(folder):
    """The image files of a concept folder (sorted) and the other files; a caption IMAGE.txt is neither."""
    if not os.path.isdir(folder):
        raise cp.CPError(f"concept folder {folder} does not exist")
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
            raise cp.CPError(f"cannot read caption {path}: {e}") from None
        if "{token}" not in text:
            raise cp.CPError(f"caption {path} has no {{token}} (where the concept's token goes)")
        captions.append(text.replace("{token}", token))
    return captions if any(captions) else None


def load_images(folder, resolution):
    """Images of a concept folder as a tensor [N, 3, R, R] in [−1, 1]: upright, any mode → RGB, resize + center crop
    (`to_square_rgb`).

    Files without an image extension are skipped, and images so large that Pillow warns or smaller than the model's
    side (upscaled, so blurred) are read: each is named in the returned notes. An image that cannot be decoded, or
    one past Pillow's decompression-bomb limit, is an error naming it.
    """
    names, skipped = concept_files(folder)
    images, notes = [], [f"skipped non-image file {s}" for s in skipped]
    for name in names:
        path = os.path.join(folder, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said in a note of our own
                with Image.open(path) as im:
                    im.load()
                    images.append(to_square_rgb(im, resolution))
                    w, h = im.size
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
            raise cp.CPError(f"cannot read image {path}: {e}") from None
        if w * h > (Image.MAX_IMAGE_PIXELS or math.inf):
            notes.append(f"{name} is {w * h / 1e6:.1f} megapixels: read whole, then brought down to "
                         f"{resolution}×{resolution}")
        if min(w, h) < resolution:
            notes.append(f"{name} is {w}×{h}, smaller than the model's {resolution}×{resolution}: upscaled, so blurred")
    if not images:
        raise cp.CPError(f"concept folder {folder} has no images"
                         + (f" (skipped {', '.join(skipped)})" if skipped else ""))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, notes


# Modes wider than 8 bits: the top of the range that maps to 255. The I;16 modes by their type's range (65535 =
# 257 · 255). Mode I is a 32-bit container (Pillow's mode for 16-bit PNGs in some versions and for 32-bit TIFFs) and
# F holds floats with no fixed range (float TIFFs are [0, 1] by convention): values within 0..65535 (I) or [0, 1]
# (F) are read by that range, so a dark image stays dark; other values by the image's own [min, max], so that no
# range this cannot know saturates to all white or all black.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb(im):
    """An 8-bit RGB image of any mode PIL opens, each read by its range (WIDE_MODES); transparent pixels white."""
    if im.mode == "LAB":  # Pillow's convert would reinterpret the L, a, b bytes as R, G, B
        raise ValueError("CIELab images are not read; save it as RGB")
    if im.mode in WIDE_MODES:
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = 0.0, WIDE_MODES[im.mode]
        if a.min() < lo or a.max() > hi:
            lo, hi = a.min(), max(a.max(), a.min() + 1e-12)
        im = Image.fromarray(np.round((a - lo) / (hi - lo) * 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def to_square_rgb(im, size):
    """An opened image as the uint8 array [size, size, 3] it trains on: turned upright as its EXIF orientation says
    (a phone's portrait photo is often stored landscape), 8-bit RGB (`to_rgb`), the short side resized to `size`,
    center-cropped."""
    im = to_rgb(ImageOps.exif_transpose(im))
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


# file name: (format, tokens bundled). A1111 reads bundled tokens; diffusers' load_lora_weights refuses a file that
# holds them and ComfyUI does not read them: both take the plain kohya file and the token files.
LORA_FILES = {"pytorch_lora_weights.safetensors": ("diffusers", False), "lora_kohya.safetensors": ("kohya", False),
              "lora_kohya_with_tokens.safetensors": ("kohya", True)}


def export_files(hp, names):
    """The files `export` writes for a state of these hparams that holds concepts `names`."""
    adapter = [] if not hp.uses("lora") else [lora.VERA_WEIGHTS, lora.VERA_CONFIG] if hp.adapter == "vera" else \
        list(LORA_FILES)
    return adapter + [name + ".safetensors" for name in names]


def check_export(folder, files, state_folder, overwrite=False):
    """An export folder that cannot be one (a file in the way, the state folder or a folder inside it), or files in
    it an export would replace (unless `overwrite`), refused before any work."""
    blocker = sample.blocked_by(folder)
    if blocker:
        raise cp.CPError(f"--export {folder}: {blocker} is a file, not a folder")
    inside = os.path.join(os.path.realpath(state_folder), "")
    if os.path.join(os.path.realpath(folder), "").startswith(inside):
        raise cp.CPError(f"--export {folder}: that is the state folder {state_folder} or inside it; export to a "
                         "folder of its own")
    replaced = [f for f in files if os.path.lexists(os.path.join(folder, f))]
    if replaced and not overwrite:
        raise cp.CPError(f"--export {folder} already holds {', '.join(replaced)}; give --overwrite to replace "
                         f"{'them' if len(replaced) > 1 else 'it'}")


def export(state, folder):
    """LoRA in diffusers and kohya formats (C-LoRA's per-task adapters as one rank-stacked LoRA; the kohya file twice,
    with and without the tokens bundled), VeRA as PEFT's adapter_model.safetensors + adapter_config.json, and the
    tokens. Every file is written into a temporary folder inside `folder` first and moved into place only when all
    are written: a failed export (a full disk) leaves `folder` as it was."""
    hp = state.hparams
    rows = {c["name"]: state.tokens[c["token"]] for c in state.concepts}
    files = export_files(hp, rows)
    if len(set(files)) < len(files):  # a concept named like an adapter file (refused when it was learned)
        raise cp.CPError(f"a concept's name is one of the export's own files ({', '.join(files)}); nothing was "
                         "exported")
    weights = state.lora if state.lora else lora.stack(state.pool) if hp.method == "clora" and state.pool else None
    tmp, created = None, cp_state.first_missing(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=folder)
        if weights and hp.adapter == "vera":
            lora.write_vera(weights, tmp, state.projection)
        elif weights:
            ranks = {p: A.shape[0] for p, (A, _) in weights.items()}
            alphas = {p: hp.alpha * ranks[p] / hp.rank for p in weights}  # keeps the scale α/r of every adapter
            for name, (fmt, bundled) in LORA_FILES.items():
                lora.write_lora_file(weights, alphas, os.path.join(tmp, name), fmt, rows if bundled else None)
        for c in state.concepts:  # one file per token, the layout diffusers' load_textual_inversion reads
            lora.write_safetensors({c["token"]: rows[c["name"]].contiguous()},
                                   os.path.join(tmp, c["name"] + ".safetensors"))
        for name in files:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    except OSError as e:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        path = os.path.abspath(folder)
        while created and path.startswith(created):  # the folders this export made, empty again
            with contextlib.suppress(OSError):
                os.rmdir(path)
            path = os.path.dirname(path)
        raise cp.CPError(f"cannot write the export to {folder}: {e}; nothing was exported") from None
    shutil.rmtree(tmp, ignore_errors=True)
    return files


def usage_note(files):
    """One line: which program loads which exported file."""
    tokens = "each <name>.safetensors with load_textual_inversion"
    if lora.VERA_WEIGHTS in files:
        return f"load: PeftModel.from_pretrained(unet, DIR) (PEFT's VeRA) and {tokens}"
    if "lora_kohya.safetensors" not in files:
        return f"load: {tokens} (diffusers), or in a UI's embeddings folder"
    return ("load: diffusers: pytorch_lora_weights.safetensors or lora_kohya.safetensors with load_lora_weights, "
            f"{tokens}; ComfyUI: lora_kohya.safetensors, the <name>.safetensors in its embeddings folder; A1111: "
            "lora_kohya_with_tokens.safetensors alone (tokens bundled; diffusers refuses it)")


def precision(args, device):
    """--precision, with auto resolved for the device."""
    if args.precision != "auto":
        return args.precision
    return "fp32" if device != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def write_grids(model, state, folder, run):
    """Every learned concept (one row each, in the order learned) and the pretrained prompts c0, from the same noise
    after every task: grids/after_NNN.png, and the latest as grids/latest.png."""
    c0 = list(dict.fromkeys(cp.base_prompt(c["class_word"]) for c in state.concepts))
    os.makedirs(os.path.join(folder, cp_state.GRIDS), exist_ok=True)
    path = os.path.join(folder, cp_state.GRIDS, f"after_{len(state.concepts):03d}.png")
    with cp.autocast(model.device.type, run.precision):
        grid = sample.concept_grid(model, [c["prompt"] for c in state.concepts] + c0,
                                   [c["token"] for c in state.concepts] + c0)
    grid.save(path)
    shutil.copyfile(path, os.path.join(folder, cp_state.GRIDS, "latest.png"))
    return path


def execute(args):
    """Check every flag and resolve the settings once, before any work; then learn and export (`learn_and_export`)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not args.concept and not args.export:
        raise cp.CPError("nothing to do: give --concept DIR to learn a concept, or --export DIR")
    if device == "cuda" and not torch.cuda.is_available():
        raise cp.CPError("--device cuda: this machine has no CUDA device")
    if args.concept and not os.path.isdir(args.concept):
        raise cp.CPError(f"concept folder {args.concept} " + ("is a file, not a folder of images"
                                                             if os.path.exists(args.concept) else "does not exist"))
    presets = load_presets()
    name = concept_name(args.concept, args.name) if args.concept else None
    if args.concept:
        load_captions(args.concept, f"<{name}>")  # a caption without {token} is refused now, not after loading
    manifest = cp_state.read_manifest(args.state)
    if manifest is None and not args.concept:
        raise cp.CPError(f"{args.state} holds no state (no {cp_state.MANIFEST}): nothing to export")
    model_path = args.model or (manifest["model"]["path"] if manifest else TOY_MODEL)
    try:
        kind, model_values = model_preset(presets, unet_size(model_path))
    except unet.LoadError as e:
        if args.model or not manifest:
            raise
        raise cp.CPError(f"{e} (the base model this state was made with: if it moved, give its new place with "
                         "--model)") from None
    hparams, changed = resolve_hparams(args, manifest and cp.Hparams(**manifest["hparams"]), presets, model_values)
    run = cp.Run(precision=precision(args, device), grad_accum=args.grad_accum, flip=args.flip,
                 gradient_checkpointing=args.gradient_checkpointing, sample_every=args.sample_every, progress=Progress)
    cp.check_run(run, hparams)
    if args.export:  # the files the export will write, checked before anything is read or written
        names = [c["name"] for c in manifest["concepts"]] if manifest else []
        check_export(args.export, export_files(hparams, names + ([name] if name else [])), args.state, args.overwrite)
    if args.concept:
        for k, (old, new) in changed.items():
            print(f"note: --{k.replace('_', '-')} {new} changes this state's {k} (its earlier tasks were learned "
                  f"with {old}); later runs keep {new}", file=sys.stderr)
        given = [f.name for f in fields(cp.Hparams) if getattr(args, f.name) is not None]
        source = f"the state's, {plural(len(manifest['concepts']), 'concept')}" if manifest else \
            f"new state: model preset {kind}, method preset {hparams.method} of presets.json"
        print(describe_settings(hparams, source, given), flush=True)
    created = cp_state.first_missing(args.state) if args.concept else None
    lock = cp_state.lock_state(args.state) if args.concept else None  # held while this run lasts
    try:
        if args.concept:
            cp_state.check_writable(args.state)
        learn_and_export(args, name, manifest, hparams, model_path, run, device)
    except BaseException:
        if lock:  # a run that saved nothing leaves no folder it created
            cp_state.unlock_unsaved(args.state, lock, created)
        raise


def learn_and_export(args, name, manifest, hparams, model_path, run, device):
    """The work of `execute` once the settings are resolved: --concept (as `name`) learned into the locked --state
    and saved, then --export."""
    state = cp_state.load_state(args.state) if manifest else None
    if state and state.base != manifest:
        raise cp.CPError(f"the state in {args.state} changed while this run started (another run saved to it); run "
                         "again")
    model = unet.load_model(model_path, device)
    if state is None:
        state = cp.new_state(model, hparams)
    cp_state.check_model(state, model)
    state.hparams = hparams
    cp.apply_state(model, state)

    if args.concept:
        cp_state.check_space(args.state, state, model)
        if run.sample_every:
            run.preview = previewer(model, state, args, name)
        state = learn_folder(model, state, args.concept, name, args.class_word, run=run)
        cp_state.save_state(state, args.state)
        last = state.history[-1]
        print(f"learned {state.concepts[-1]['token']} in {last['seconds']}s; state saved to {args.state} "
              f"({plural(len(state.concepts), 'concept')})")
        try:  # the state is saved: what follows only records it
            cp_state.append_log(args.state, run.trace)
            if not args.no_preview:
                print(f"grid: {write_grids(model, state, args.state, run)}  (rows: "
                      f"{', '.join(c['token'] for c in state.concepts)}, then c0)")
        except OSError as e:
            print(f"warning: the step log or the grid was not written: {e}", file=sys.stderr)
    if args.export:
        written = export(state, args.export)
        print(f"exported to {args.export}: {', '.join(written)}\n{usage_note(written)}")


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def previewer(model, state, args, name):
    """preview(step): the new concept during training, one row from the grids' noise, in grids/."""
    prompt, n = cp.concept_prompt(f"<{name}>", args.class_word), len(state.concepts) + 1

    def preview(step):
        path = os.path.join(args.state, cp_state.GRIDS, f"task_{n:03d}_step_{step:05d}.png")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sample.concept_grid(model, [prompt], [f"step {step}"]).save(path)
        except OSError as e:  # a picture, not a reason to stop training
            print(f"warning: {path} was not written: {e}", file=sys.stderr)
    return preview


def main(argv=None):
    args = parse_args(argv)
    try:
        execute(args)
    except (cp.CPError, unet.LoadError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted; the state directory still holds the previous task")


if __name__ == "__main__":
    main()
