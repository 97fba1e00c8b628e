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
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import save_file

import cp
import cp_state
import lora
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
FIXED = ("method", "rank", "alpha", "targets", "adapter")  # a state's adapter layout cannot change between tasks


def as_flag_types(values):
    """{hparam: value} with a number given for a text hparam (τ: "auto" or a number) written as its flag has it, so
    that 0.01 from a JSON file and "0.01" from the command line are the same setting."""
    text = {f.name for f in fields(cp.Hparams) if f.type in (str, "str")}
    return {k: str(v) if k in text and isinstance(v, (int, float)) else v for k, v in values.items()}


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
        for values in [*models.values(), *methods.values()]:
            values.update(as_flag_types(values))
        if default not in cp.METHODS:
            raise cp.CPError(f"unknown default_method {default!r}")
    except FileNotFoundError:
        raise cp.CPError(f"presets file {path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, cp.CPError) as e:
        raise cp.CPError(f"presets file {path} is damaged: {type(e).__name__}: {e}") from None
    return presets


def model_preset(presets, unet):
    """(kind, {hparam: value}) of the first model preset, smallest first, whose max_unet_params the UNet fits
    (null: no bound); the base model's size picks the training settings."""
    n = sum(p.numel() for p in unet.parameters())
    bound = lambda values: math.inf if values["max_unet_params"] is None else values["max_unet_params"]
    for kind, values in sorted(presets["models"].items(), key=lambda kv: bound(kv[1])):
        if n <= bound(values):
            return kind, {k: v for k, v in values.items() if k not in ("max_unet_params", "why")}
    raise cp.CPError(f"no model preset in presets.json fits a UNet of {n:,} parameters")


def add_hparam_flags(parser, presets=None, skip=()):
    """Every cp.Hparams field as a flag, its help the field's. A flag not given is None: the state's value, else the
    presets', else cp.Hparams' default, which is what a plain run uses; the help names the presets that change it."""
    defaults = cp.Hparams()
    choices = {"method": cp.METHODS, "targets": list(lora.TARGETS), "adapter": lora.ADAPTERS,
               "fisher_norm": cp.FISHER_NORMS, "dsc_first": cp.DSC_FIRST, "dsc_targets": cp.DSC_TARGETS}
    for f in fields(cp.Hparams):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        changed = [f"{kind} model: {v[f.name]}" for kind, v in (presets or {}).get("models", {}).items()
                   if f.name in v and v[f.name] != default]
        changed += [f"{m}: {v[f.name]}" for m, v in (presets or {}).get("methods", {}).items()
                    if f.name in v and v[f.name] != default]
        help = f"{f.metadata['help']} (default {default}{''.join('; ' + c for c in changed)})"
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=None,
                            choices=choices.get(f.name), help=help.replace("%", "%%"))


def presets_help(presets):
    """The epilog of -h: where defaults come from, and every preset's values."""
    if isinstance(presets, cp.CPError):
        return f"presets: {presets}"
    show = lambda values: ", ".join(f"{k} {v}" for k, v in values.items() if k not in ("max_unet_params", "why")) \
        or "no values of its own"
    lines = [f"Defaults: a plain run is the default method, {presets['default_method']}, at its tuned preset on the "
             f"shipped toy model: the defaults above. Another --method takes its own preset and a larger base model "
             f"its own training settings (both from {PRESETS_FILE}: {presets['source']}); a continued state keeps its "
             "values; flags win.", "model presets:"]
    lines += [f"  {kind}: {show(v)}" for kind, v in presets["models"].items()]
    lines += ["method presets:"] + [f"  {m}: {show(v)}" for m, v in presets["methods"].items()]
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
    p.add_argument("--model", default=None, help="diffusers folder or single-file checkpoint (default: toy/model)")
    p.add_argument("--name", help="concept name, letters, digits, _ and - only; its token is <name> (default: the "
                   "folder name)")
    p.add_argument("--class-word", help="class word appended to the prompt, also the pretrained concept c0")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--precision", default="auto", choices=["auto", *cp.PRECISIONS], help="auto: bf16 on a GPU that "
                   "has it, else fp16 (with loss scaling) on a GPU, fp32 on the CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the UNet's activations in the "
                   "backward pass: far less memory for a second forward pass")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="split each batch into N micro-batches "
                   "(less memory, the same batch; default 1)")
    p.add_argument("--flip", action="store_true", help="mirror each training image at random (not for text or "
                   "asymmetric concepts)")
    p.add_argument("--sample-every", type=int, default=0, metavar="N", help="draw the new concept every N training "
                   "steps into grids/ (default 0: never)")
    p.add_argument("--export", metavar="DIR", help="write into DIR (created if missing) the LoRA (diffusers; kohya; "
                   "kohya with the tokens bundled, for A1111; VeRA: PEFT's folder layout) and the token embeddings")
    p.add_argument("--overwrite", action="store_true", help="let --export replace files in DIR (without it, an "
                   "export that would replace a file is refused before any work)")
    p.add_argument("--no-preview", action="store_true", help="skip the grid of every learned concept after training")
    add_hparam_flags(p, None if isinstance(presets, cp.CPError) else presets)
    return p.parse_args(argv)


def resolve_hparams(args, state, presets, model_values=None):
    """The flags given, over the state's values; for a new state, over the method's preset, over the model's
    (model_values; None: flags are only being checked). The state's adapter layout cannot change."""
    given = {f.name: getattr(args, f.name) for f in fields(cp.Hparams) if getattr(args, f.name) is not None}
    if state is not None:
        for k in FIXED:
            if k in given and given[k] != getattr(state.hparams, k):
                raise cp.CPError(f"this state uses {k}={getattr(state.hparams, k)!r}; start a new --state to use "
                                 f"{given[k]!r}")
        hp = replace(state.hparams, **given)
    else:
        method = given.get("method", presets["default_method"])
        hp = cp.Hparams(**{**(model_values or {}), **presets["methods"].get(method, {}), **given, "method": method})
    cp.check_hparams(hp)
    return hp


def describe_settings(hp, source, given):
    """The line printed at the start of a run: every setting, and where the defaults came from."""
    flags = f"; flags given: {', '.join(given)}" if given else ""
    return f"settings ({source}{flags}): " + ", ".join(f"{k} {v}" for k, v in asdict(hp).items())


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def concept_name(folder, name=None):
    """A concept's name, checked: `name` when given (an empty one is refused, not replaced), else the folder's."""
    given = name is not None
    name = name if given else os.path.basename(os.path.normpath(folder))
    cp.check_name(name, given)
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
            raise cp.CPError(f"cannot read image {path}: {e}") from None
    if not images:
        raise cp.CPError(f"concept folder {folder} has no images"
                         + (f" (skipped {', '.join(skipped)})" if skipped else ""))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [f"skipped non-image file {s}" for s in skipped]


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


def check_export(folder, files, overwrite=False):
    """An export folder that cannot be one, or files in it an export would replace (unless `overwrite`), refused
    before any work."""
    import sample
    blocker = sample.blocked_by(folder)
    if blocker:
        raise cp.CPError(f"--export {folder}: {blocker} is a file, not a folder")
    replaced = [f for f in files if os.path.lexists(os.path.join(folder, f))]
    if replaced and not overwrite:
        raise cp.CPError(f"--export {folder} already holds {', '.join(replaced)}; give --overwrite to replace "
                         f"{'them' if len(replaced) > 1 else 'it'}")


def export(model, state, folder, overwrite=False):
    """LoRA in diffusers and kohya formats (C-LoRA's per-task adapters as one rank-stacked LoRA; the kohya file twice,
    with and without the tokens bundled), VeRA as PEFT's adapter_model.safetensors + adapter_config.json, and the
    tokens. Files already in `folder` are replaced only if `overwrite`."""
    hp = state.hparams
    rows = {c["name"]: state.tokens[c["token"]] for c in state.concepts}
    taken = {*LORA_FILES, lora.VERA_WEIGHTS}
    for name in rows:  # a state saved before names were checked may hold any name
        if not cp.NAME.fullmatch(name) or name + ".safetensors" in taken:
            raise cp.CPError(f"concept name {name!r} cannot name a file in {folder}; nothing was exported")
    files = export_files(hp, rows)
    check_export(folder, files, overwrite)
    weights = state.lora if state.lora else lora.stack(state.pool) if hp.method == "clora" and state.pool else None
    try:
        os.makedirs(folder, exist_ok=True)
        if weights and hp.adapter == "vera":
            lora.write_vera(weights, folder, state.projection)
        elif weights:
            ranks = {p: A.shape[0] for p, (A, _) in weights.items()}
            alphas = {p: hp.alpha * ranks[p] / hp.rank for p in weights}  # keeps the scale α/r of every adapter
            for name, (fmt, bundled) in LORA_FILES.items():
                lora.write_lora_file(weights, alphas, os.path.join(folder, name), fmt, rows if bundled else None)
        for c in state.concepts:  # one file per token, the layout diffusers' load_textual_inversion reads
            save_file({c["token"]: rows[c["name"]].contiguous()}, os.path.join(folder, c["name"] + ".safetensors"))
    except OSError as e:
        raise cp.CPError(f"cannot write the export to {folder}: {e}") from None
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
    import sample
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
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not args.concept and not args.export:
        raise cp.CPError("nothing to do: give --concept DIR to learn a concept, or --export DIR")
    if device == "cuda" and not torch.cuda.is_available():
        raise cp.CPError("--device cuda: this machine has no CUDA device")
    if args.concept and not os.path.isdir(args.concept):
        raise cp.CPError(f"concept folder {args.concept} does not exist")
    presets = load_presets()
    if args.concept:
        name = concept_name(args.concept, args.name)
        load_captions(args.concept, f"<{name}>")  # a caption without {token} is refused now, not after loading
    run = cp.Run(precision=precision(args, device), grad_accum=args.grad_accum, flip=args.flip,
                 gradient_checkpointing=args.gradient_checkpointing, sample_every=args.sample_every, progress=Progress)
    cp.check_run(run, resolve_hparams(args, None, presets))  # every flag checked before any work
    if args.export:
        check_export(args.export, [])  # a file in the way is refused before anything is read or written
    created = cp_state.first_missing(args.state) if args.concept else None
    lock = cp_state.lock_state(args.state) if args.concept else None  # held while this run lasts
    try:
        learn_and_export(args, presets, run, device)
    except BaseException:
        if lock:  # a run that saved nothing leaves no folder it created
            cp_state.unlock_unsaved(args.state, lock, created)
        raise


def learn_and_export(args, presets, run, device):
    """The work of `execute` once every flag is checked: --concept learned into the locked --state and saved, then
    --export."""
    # an export alone needs a state (load_state's error), not an empty one
    state = cp_state.load_state(args.state) if not args.concept or cp_state.read_manifest(args.state) else None
    hparams = resolve_hparams(args, state, presets)
    if args.export:  # the files the export will write, checked before the model loads
        names = [c["name"] for c in state.concepts] if state else []
        new = [concept_name(args.concept, args.name)] if args.concept else []
        check_export(args.export, export_files(hparams, names + new), args.overwrite)
    model_path = args.model or (state.model["path"] if state else os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "toy", "model"))
    model = unet.load_model(model_path, device)
    given = [f.name for f in fields(cp.Hparams) if getattr(args, f.name) is not None]
    if state is not None:
        cp_state.check_model(state, model)
        source = f"the state's, {len(state.concepts)} concepts"
    else:
        kind, model_values = model_preset(presets, model.unet)
        hparams = resolve_hparams(args, None, presets, model_values)
        state = cp.new_state(model, hparams)
        source = f"new state: model preset {kind}, method preset {hparams.method} of presets.json"
    state.hparams = hparams
    if args.concept:
        cp_state.check_units(state)
        print(describe_settings(hparams, source, given), flush=True)
    cp.apply_state(model, state)

    if args.concept:
        if run.sample_every:
            run.preview = previewer(model, state, args)
        state = learn_folder(model, state, args.concept, args.name, args.class_word, run=run)
        cp_state.save_state(state, args.state)
        last = state.history[-1]
        print(f"learned {state.concepts[-1]['token']} in {last['seconds']}s; state saved to {args.state} "
              f"({len(state.concepts)} concepts)")
        try:  # the state is saved: what follows only records it
            cp_state.append_log(args.state, run.trace)
            if not args.no_preview:
                print(f"grid: {write_grids(model, state, args.state, run)}  (rows: "
                      f"{', '.join(c['token'] for c in state.concepts)}, then c0)")
        except OSError as e:
            print(f"warning: the step log or the grid was not written: {e}", file=sys.stderr)
    if args.export:
        written = export(model, state, args.export, args.overwrite)
        print(f"exported to {args.export}: {', '.join(written)}\n{usage_note(written)}")


def previewer(model, state, args):
    """preview(step): the new concept during training, one row from the grids' noise, in grids/."""
    import sample
    name = concept_name(args.concept, args.name)
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
