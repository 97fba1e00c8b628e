"""Where must a concept's adapter sit? Learn one concept with one part of the UNet trainable, then score it.

A LoRA can only change what the layers it wraps compute. Before asking which LoRA placement learns a concept, ask
which *part* of the base UNet can: train that part's weights outright (with the new token's row, as `seq` does),
everything else frozen, then judge 32 samples with the oracle as `bench/learnability.py` does. If no LoRA
placement learns a concept that a fully trained part does, the placement, not the base model, is the limit.

    python bench/placement.py --concept house --part full --lr 1e-4      # every UNet weight
    python bench/placement.py --concept house --part ff --lr 1e-3        # the transformer blocks' feed-forward only
    python bench/placement.py --concept house --lora kv+ff --lr 3e-3     # a LoRA at a preset (as train.py --targets)

Parts: full, attn (self- and cross-attention), ff, resnets. `resnets` also trains conv_in: with conv_in frozen,
the CPU backward of torch 2.13 crashed (segmentation fault) on this UNet. One run takes about 75-95 s on one thread.
Each result is appended to --out (JSON lines) and printed; --grid writes 16 of the samples.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cp  # noqa: E402
import train  # noqa: E402
import lora  # noqa: E402
import sample  # noqa: E402
import unet as unet_lib  # noqa: E402
from toy import oracle  # noqa: E402

PARTS = {"full": ("",), "attn": ("attn1.", "attn2."), "ff": (".ff.",), "resnets": ("resnets.", "conv_in.")}


def train_part(part, freeze_all_but_adapter):
    """A stand-in for lora.set_trainable: the task's LoRA is still installed (B = 0, untouched), but the optimizer
    gets the weights of `part` instead."""
    def set_trainable(unet, names):
        freeze_all_but_adapter(unet, names)
        params = [p for n, p in unet.named_parameters() if ".lora_" not in n and any(s in n for s in PARTS[part])]
        for p in params:
            p.requires_grad_(True)
        return params
    return set_trainable


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concept", required=True, help="a folder name under examples/concepts")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--part", choices=list(PARTS), help="train this part of the UNet outright")
    what.add_argument("--lora", choices=list(lora.TARGETS), help="train a LoRA at this preset (train.py's --targets)")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, default=cp.Hparams.steps)
    ap.add_argument("--rank", type=int, default=cp.Hparams.rank, help="LoRA rank (alpha = rank)")
    ap.add_argument("--model", default=os.path.join(ROOT, "toy", "model"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/cp/placement.jsonl")
    ap.add_argument("--grid", help="write 16 samples to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = unet_lib.load_model(args.model, "cpu", torch.float32)
    hp = cp.Hparams(method="seq", lr=args.lr, steps=args.steps, rank=args.rank, alpha=float(args.rank),
                    targets=args.lora or "kv")
    if args.part:  # in this process only: cp.train_task's call of lora.set_trainable returns the part's weights
        lora.set_trainable = train_part(args.part, lora.set_trainable)
    state = cp.new_state(model, hp)
    t0 = time.time()
    state = train.learn_folder(model, state, os.path.join(ROOT, "examples", "concepts", args.concept))
    seconds = time.time() - t0
    images = sample.sample(model, [state.concepts[0]["prompt"]] * 32, steps=50, guidance=7.5, seed=0)
    acc = float(np.mean(oracle.predict(images)["concept"] == args.concept))
    row = dict(concept=args.concept, part=args.part, lora=args.lora, lr=args.lr, steps=args.steps,
               rank=args.rank if args.lora else None, accuracy=acc, train_seconds=round(seconds))
    print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    if args.grid:
        sample.to_grid(images[:16], 8).save(args.grid)


if __name__ == "__main__":
    main()
