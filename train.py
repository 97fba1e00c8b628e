"""Learn one concept, continuing a continual-personalization state (the methods and losses live in cp.py).

    python train.py --concept examples/concepts/pine_tree          # tiny default model, presets.json's default method
    python train.py --concept my_dog --model path/to/sd15 --class-word dog --method dsc-ewc-dc   # another method
    python train.py --state runs/default --export exported/             # LoRA (diffusers + kohya) and tokens
    python train.py --concept examples/concepts/pine_tree --adapter vera --state runs/vera   # VeRA instead of LoRA
    python train.py --concept my_dog --model sd15 --gradient-checkpointing --precision fp16   # less GPU memory

Each run adds one concept to the state directory (default runs/default), appends every step's losses to its
log.jsonl and draws every learned concept into its grids/ folder. Bad input ends with a one-line error and exit
status 1; the state is then left as it was. One run at a time writes a state: a second run on a state in use stops
at once, naming the process that holds it.
"""
import argparse
import inspect
import os
import re
import shutil
import sys
from dataclasses import asdict, fields, replace

import torch
from safetensors.torch import save_file

import cp
import lora
import unet

FIXED = ("method", "rank", "alpha", "targets", "adapter")  # a state's adapter layout cannot change between tasks


def add_hparam_flags(parser, skip=()):
    """Every cp.Hparams field as a flag, its help the comment beside the field; None means "the state's value, else
    the presets', else cp.Hparams' default"."""
    defaults = cp.Hparams()
    comments = dict(re.findall(r"^ +(\w+): \w+ = .*?# (.+)$", inspect.getsource(cp.Hparams), re.M))
    for f in fields(cp.Hparams):
        if f.name not in skip:
            what = comments.get(f.name, "")  # a field without a comment fails tests/test_state.py, not the CLI
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None,
                                choices={"method": cp.METHODS, "targets": list(lora.PRESETS),
                                         "adapter": lora.ADAPTERS, "fisher_norm": cp.FISHER_NORMS,
                                         "dsc_first": cp.DSC_FIRST}.get(f.name),
                                help=f"{what} (default {getattr(defaults, f.name)})".replace("%", "%%"))


def presets_help():
    """The epilog of -h: where defaults come from, and every preset's values."""
    try:
        presets = cp.load_presets()
    except cp.CPError as e:
        return f"presets: {e}"
    show = lambda values: ", ".join(f"{k} {v}" for k, v in values.items() if k not in ("max_unet_params", "why")) \
        or "no values of its own"
    lines = [f"Defaults, weakest first: cp.Hparams, then a preset of {cp.PRESETS} for the base model's size, then "
             f"the method's tuned preset ({presets['source']}); a continued state keeps its own values; flags win. "
             f"Default method: {presets['default_method']}.", "model presets:"]
    lines += [f"  {kind}: {show(v)}" for kind, v in presets["models"].items()]
    lines += ["method presets:"] + [f"  {m}: {show(v)}" for m, v in presets["methods"].items()]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Learn one concept with continual personalization.", epilog=presets_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--export", metavar="DIR", help="write the LoRA (diffusers; kohya with the tokens bundled; VeRA: "
                   "PEFT's folder layout) and the token embeddings")
    p.add_argument("--no-preview", action="store_true", help="skip the grid of every learned concept after training")
    add_hparam_flags(p)
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


LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}


def export(model, state, folder):
    """LoRA in diffusers and kohya formats (C-LoRA's per-task adapters as one rank-stacked LoRA; the kohya file with
    the tokens bundled), VeRA as PEFT's adapter_model.safetensors + adapter_config.json, and the tokens."""
    hp = state.hparams
    rows = {c["name"]: state.tokens[c["token"]] for c in state.concepts}
    taken = {*LORA_FILES.values(), lora.VERA_WEIGHTS}
    for name in rows:  # a state saved before names were checked may hold any name
        if not cp.NAME.fullmatch(name) or name + ".safetensors" in taken:
            raise cp.CPError(f"concept name {name!r} cannot name a file in {folder}; nothing was exported")
    os.makedirs(folder, exist_ok=True)
    weights = state.lora if state.lora else lora.stack(state.pool) if hp.method == "clora" and state.pool else None
    written = []
    if weights and hp.adapter == "vera":
        lora.write_vera(weights, folder, state.projection)
        written += [lora.VERA_WEIGHTS, lora.VERA_CONFIG]
    elif weights:
        ranks = {p: A.shape[0] for p, (A, _) in weights.items()}
        alphas = {p: hp.alpha * ranks[p] / hp.rank for p in weights}  # keeps the scale α/r of every adapter
        for fmt, name in LORA_FILES.items():
            lora.write_lora_file(weights, alphas, os.path.join(folder, name), fmt, rows if fmt == "kohya" else None)
            written.append(name)
    for c in state.concepts:  # one file per token, the layout diffusers' load_textual_inversion reads
        save_file({c["token"]: rows[c["name"]].contiguous()}, os.path.join(folder, c["name"] + ".safetensors"))
        written.append(c["name"] + ".safetensors")
    return written


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
    os.makedirs(os.path.join(folder, cp.GRIDS), exist_ok=True)
    path = os.path.join(folder, cp.GRIDS, f"after_{len(state.concepts):03d}.png")
    with cp.autocast(model.device.type, run.precision):
        grid = sample.concept_grid(model, [c["prompt"] for c in state.concepts] + c0,
                                   [c["token"] for c in state.concepts] + c0)
    grid.save(path)
    shutil.copyfile(path, os.path.join(folder, cp.GRIDS, "latest.png"))
    return path


def run(args):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not args.concept and not args.export:
        raise cp.CPError("nothing to do: give --concept DIR to learn a concept, or --export DIR")
    if device == "cuda" and not torch.cuda.is_available():
        raise cp.CPError("--device cuda: this machine has no CUDA device")
    if args.concept and not os.path.isdir(args.concept):
        raise cp.CPError(f"concept folder {args.concept} does not exist")
    presets = cp.load_presets()
    if args.concept:
        name = args.name or os.path.basename(os.path.normpath(args.concept))
        cp.check_name(name, given=bool(args.name))
        cp.load_captions(args.concept, f"<{name}>")  # a caption without {token} is refused now, not after loading
    settings = cp.Run(precision=precision(args, device), grad_accum=args.grad_accum, flip=args.flip,
                      gradient_checkpointing=args.gradient_checkpointing, sample_every=args.sample_every)
    cp.check_run(settings, resolve_hparams(args, None, presets))  # every flag checked before any work
    lock = cp.lock_state(args.state) if args.concept else None  # held while this run lasts
    state = cp.load_state(args.state) if cp.read_manifest(args.state) else None
    hparams = resolve_hparams(args, state, presets)
    model_path = args.model or (state.model["path"] if state else os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "toy", "model"))
    model = unet.load_model(model_path, device)
    given = [f.name for f in fields(cp.Hparams) if getattr(args, f.name) is not None]
    if state is not None:
        cp.check_model(state, model)
        source = f"the state's, {len(state.concepts)} concepts"
    else:
        kind, model_values = cp.model_preset(presets, model.unet)
        hparams = resolve_hparams(args, None, presets, model_values)
        state = cp.new_state(model, hparams)
        source = f"new state: model preset {kind}, method preset {hparams.method} of presets.json"
    state.hparams = hparams
    if args.concept:
        print(describe_settings(hparams, source, given), flush=True)
    cp.apply_state(model, state)

    if args.concept:
        if settings.sample_every:
            settings.preview = previewer(model, state, args)
        state = cp.learn_concept(model, state, args.concept, args.name, args.class_word, run=settings)
        cp.save_state(state, args.state)
        last = state.history[-1]
        print(f"learned {state.concepts[-1]['token']} in {last['seconds']}s; state saved to {args.state} "
              f"({len(state.concepts)} concepts)")
        try:  # the state is saved: what follows only records it
            cp.append_log(args.state, settings.trace)
            if not args.no_preview:
                print(f"grid: {write_grids(model, state, args.state, settings)}  (rows: "
                      f"{', '.join(c['token'] for c in state.concepts)}, then c0)")
        except OSError as e:
            print(f"warning: the step log or the grid was not written: {e}", file=sys.stderr)
    if args.export:
        written = export(model, state, args.export)
        print(f"exported to {args.export}: {', '.join(written)}")


def previewer(model, state, args):
    """preview(step): the new concept during training, one row from the grids' noise, in grids/."""
    import sample
    name = args.name or os.path.basename(os.path.normpath(args.concept))
    prompt, n = cp.concept_prompt(f"<{name}>", args.class_word), len(state.concepts) + 1

    def preview(step):
        path = os.path.join(args.state, cp.GRIDS, f"task_{n:03d}_step_{step:05d}.png")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sample.concept_grid(model, [prompt], [f"step {step}"]).save(path)
        except OSError as e:  # a picture, not a reason to stop training
            print(f"warning: {path} was not written: {e}", file=sys.stderr)
    return preview


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (cp.CPError, unet.LoadError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted; the state directory still holds the previous task")


if __name__ == "__main__":
    main()
