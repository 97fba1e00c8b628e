"""Learn one concept, continuing a continual-personalization state (the methods and losses live in cp.py).

    python train.py --concept examples/concepts/pine_tree                    # tiny default model, method ewc-dc
    python train.py --concept my_dog --model path/to/sd15 --class-word dog --method dsc-ewc-dc
    python train.py --state runs/default --export exported/             # LoRA (diffusers + kohya) and tokens
    python train.py --concept examples/concepts/pine_tree --adapter vera --state runs/vera   # VeRA instead of LoRA

Each run adds one concept to the state directory (default runs/default) and writes a preview grid beside it.
Bad input ends with a one-line error and exit status 1; the state is then left as it was. One run at a time
writes a state: a second run on a state in use stops at once, naming the process that holds it.
"""
import argparse
import inspect
import os
import re
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
    p.add_argument("--name", help="concept name; its token is <name> (default: the folder name)")
    p.add_argument("--class-word", help="class word appended to the prompt, also the pretrained concept c0")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--export", metavar="DIR", help="write the LoRA (diffusers and kohya; VeRA: PEFT's folder layout) "
                   "and the token embeddings")
    p.add_argument("--no-preview", action="store_true", help="skip the preview grid after training")
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


def export(model, state, folder):
    """LoRA in diffusers and kohya formats (C-LoRA's per-task adapters as one rank-stacked LoRA), VeRA as PEFT's
    adapter_model.safetensors + adapter_config.json, and the tokens."""
    os.makedirs(folder, exist_ok=True)
    hp = state.hparams
    weights = state.lora if state.lora else lora.stack(state.pool) if hp.method == "clora" and state.pool else None
    written = []
    if weights and hp.adapter == "vera":
        lora.write_vera(weights, folder, state.projection)
        written += [lora.VERA_WEIGHTS, lora.VERA_CONFIG]
    elif weights:
        ranks = {p: A.shape[0] for p, (A, _) in weights.items()}
        alphas = {p: hp.alpha * ranks[p] / hp.rank for p in weights}  # keeps the scale α/r of every adapter
        for fmt, name in (("diffusers", "pytorch_lora_weights.safetensors"), ("kohya", "lora_kohya.safetensors")):
            lora.write_lora_file(weights, alphas, os.path.join(folder, name), fmt)
            written.append(name)
    for token, row in state.tokens.items():  # one file per token, the layout diffusers' load_textual_inversion reads
        name = token.strip("<>") + ".safetensors"
        save_file({token: row.contiguous()}, os.path.join(folder, name))
        written.append(name)
    return written


def run(args):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not args.concept and not args.export:
        raise cp.CPError("nothing to do: give --concept DIR to learn a concept, or --export DIR")
    if args.concept and not os.path.isdir(args.concept):
        raise cp.CPError(f"concept folder {args.concept} does not exist")
    presets = cp.load_presets()
    resolve_hparams(args, None, presets)  # every flag checked before any work
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
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            state = cp.learn_concept(model, state, args.concept, args.name, args.class_word)
        cp.save_state(state, args.state)
        last = state.history[-1]
        print(f"learned {state.concepts[-1]['token']} in {last['seconds']}s; state saved to {args.state} "
              f"({len(state.concepts)} concepts)")
        if not args.no_preview:
            import sample
            preview = os.path.normpath(args.state) + f"-preview-{state.concepts[-1]['name']}.png"
            images = sample.sample(model, [state.concepts[-1]["prompt"]] * 4, steps=25, guidance=5.0, seed=0)
            sample.to_grid(images).save(preview)
            print(f"preview: {preview}  (prompt: \"{state.concepts[-1]['prompt']}\")")
    if args.export:
        written = export(model, state, args.export)
        print(f"exported to {args.export}: {', '.join(written)}")


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
