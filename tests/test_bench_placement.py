"""bench/placement.py: a concept learned with one part of the UNet trained outright; nothing else moves."""
import os
import sys

import pytest
import torch

import cp
import train
import lora
import unet as U
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import placement  # noqa: E402


@pytest.mark.parametrize("part", ["ff", "attn"])
def test_only_the_part_trains(tiny_model_dir, part, monkeypatch):
    model = U.load_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    monkeypatch.setattr(lora, "set_trainable", placement.train_part(part, lora.set_trainable))
    hp = cp.Hparams(method="seq", steps=3, batch_size=2, lr=1e-2)
    train.learn_folder(model, cp.new_state(model, hp), os.path.join(ROOT, "examples", "concepts", "house"))
    moved = {n for n, p in model.unet.named_parameters() if n in before and not torch.equal(before[n], p)}
    in_part = {n for n in before if ".lora_" not in n and any(s in n for s in placement.PARTS[part])}
    assert moved and moved == in_part  # every weight of the part moved, and nothing else (the LoRA's B stays 0)
    assert all(B.abs().sum() == 0 for _, B in lora.get_adapter(model.unet, "current").values())
