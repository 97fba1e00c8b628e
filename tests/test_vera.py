"""VeRA (lora.py): PEFT gives the same UNet output from our files and we from its; identity at b = 0, merge, what
trains; VeRA states through cp, train.py and sample.py."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import cp
import cp_state
import train
import lora
import sample
import unet as U
from test_cp import FAST, concepts, state_tensors  # noqa: F401 (concepts is a fixture)
from test_lora import CFG, KV_PATH, inputs, make, run
from test_train_cli import FAST as CLI_FAST, assert_one_line_error, run as run_cli, write_concept


def randomize(net, name, seed=2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for d, b in lora.get_adapter(net, name).values():
            d.normal_(0, 1)
            b.normal_(0, 1)


def diffusers_unet(net):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ref = diffusers.UNet2DConditionModel(**CFG).eval()
    ref.load_state_dict(net.state_dict(), strict=True)
    return ref


@pytest.mark.filterwarnings("ignore:Specified to not")  # PEFT's notes on regenerating the projection from its key
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_loads_our_vera(tmp_path, save_projection):
    from peft import PeftModel
    net = make()
    ref = diffusers_unet(net)
    base = run(net)
    lora.inject(net, "attn", rank=4, name="a", adapter="vera", seed=3)  # layers of several in/out sizes
    randomize(net, "a")
    ours = run(net)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters, so equality below means something
    lora.write_vera(lora.get_adapter(net, "a"), str(tmp_path), lora.get_projection(net) if save_projection else None,
                    seed=3)
    peft_unet = PeftModel.from_pretrained(ref, str(tmp_path)).get_base_model()
    with torch.no_grad():
        theirs = peft_unet(*inputs()).sample
    diff = (theirs - ours).abs().max().item()
    print(f"PEFT loads our VeRA (save_projection={save_projection}): max abs diff {diff:.2e}")
    assert diff <= 1e-5
    other = make()  # and our own loader reads the same folder back
    assert lora.load_vera(other, str(tmp_path), "b") == sorted(lora.get_adapter(net, "a"))
    torch.testing.assert_close(run(other), ours, atol=1e-6, rtol=0)


def test_we_load_peft_vera(tmp_path):
    from peft import VeraConfig, get_peft_model
    net = make()
    ref = diffusers_unet(net)
    peft_model = get_peft_model(ref, VeraConfig(r=4, target_modules=list(lora.ATTN), projection_prng_key=5))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 1)
        theirs = peft_model.get_base_model()(*inputs()).sample
    peft_model.save_pretrained(str(tmp_path))
    layers, projection, cfg = lora.read_vera(str(tmp_path))
    # the same seed gives PEFT's projection, so files without it (save_projection=False) load too
    for ours, peft_p in zip(lora.vera_projection(4, 64, 64, seed=5), projection):
        torch.testing.assert_close(ours, peft_p, atol=1e-7, rtol=0)
    assert len(lora.load_vera(net, str(tmp_path), "p")) == 32
    diff = (run(net) - theirs).abs().max().item()
    print(f"we load PEFT's VeRA: max abs diff {diff:.2e}")
    assert diff <= 1e-5 and (theirs - run(make())).abs().max() > 1e-2


def test_b_zero_is_base_merge_unmerge_and_trainable():
    net = make()
    keys, base = set(net.state_dict()), run(net)
    lora.inject(net, "kv", rank=4, alpha=8.0, name="a")  # a LoRA beside, to check that only the VeRA trains
    paths = lora.inject(net, "attn", rank=6, name="v", adapter="vera")
    d, b = lora.get_adapter(net, "v")[KV_PATH]
    assert d.shape == (6,) and torch.all(d == lora.VERA_D_INITIAL) and b.abs().sum() == 0
    assert torch.equal(run(net), base)
    # one projection for all layers, sized to the largest in/out, not in the state dict
    A, B = lora.get_projection(net)
    assert all(net.get_submodule(p).projection is lora.get_projection(net) for p in paths)
    assert A.shape == (6, 64) and B.shape == (64, 6)
    assert {k for k in net.state_dict() if ".lora_" not in k and ".vera_" not in k} == keys
    assert len([k for k in net.state_dict() if ".vera_" in k]) == 2 * 32
    # ΔW = Λ_b B Λ_d A with A, B cut to the layer
    randomize(net, "v")
    m = net.get_submodule(KV_PATH)
    expected = torch.diag(b) @ B[:m.out_features] @ torch.diag(d) @ A[:, :m.in_features]
    torch.testing.assert_close(m.delta("v"), expected, atol=1e-5, rtol=1e-5)
    W0 = {p: net.get_submodule(p).weight.detach().clone() for p in paths}
    out = run(net)
    lora.merge(net)
    assert (m.weight - W0[KV_PATH]).abs().max() > 1e-3
    torch.testing.assert_close(run(net), out, atol=1e-5, rtol=1e-5)
    lora.unmerge(net)
    for p, w in W0.items():
        torch.testing.assert_close(net.get_submodule(p).weight, w, atol=1e-6, rtol=0)
    # only d and b of the trained adapter
    params = lora.set_trainable(net, "v")
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(trainable) == len(params) == 2 * 32
    assert all(n.endswith((".vera_lambda_d.v", ".vera_lambda_b.v")) for n in trainable)
    net(*inputs()).square().mean().backward()
    assert d.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in net.named_parameters() if ".vera_" not in n)
    lora.remove(net, "v")
    assert lora.adapter_names(net) == ["a"] and lora.get_projection(net) is None


def test_load_vera_errors(tmp_path):
    deeper = make(cfg=dict(CFG, layers_per_block=2))
    lora.inject(deeper, "kv", rank=4, name="x", adapter="vera")
    lora.write_vera(lora.get_adapter(deeper, "x"), str(tmp_path), lora.get_projection(deeper))
    net = make()
    with pytest.raises(ValueError, match=r"attentions\.1.*not a Linear layer of this UNet"):
        lora.load_vera(net, str(tmp_path), "x")
    assert lora.adapter_names(net) == []  # nothing was half-loaded
    lora.inject(net, "kv", rank=4, name="a", adapter="vera", seed=1)  # another projection is already in use
    mine = str(tmp_path / "mine.safetensors")
    other = make()
    lora.inject(other, "kv", rank=4, name="y", adapter="vera", seed=2)
    lora.write_vera(lora.get_adapter(other, "y"), mine, lora.get_projection(other))
    with pytest.raises(ValueError, match="share another projection"):
        lora.load_vera(net, mine, "y")
    assert lora.adapter_names(net) == ["a"]
    d, _ = lora.get_adapter(other, "y")[KV_PATH]
    save_file({f"base_model.model.{KV_PATH}.vera_lambda_d": d.detach()}, str(tmp_path / "half.safetensors"),
              metadata={lora.VERA_CONFIG: '{"peft_type": "VERA", "r": 4}'})
    with pytest.raises(ValueError, match="vera_lambda_d only"):
        lora.load_vera(make(), str(tmp_path / "half.safetensors"), "z")


def test_vera_task_trains_d_b_and_token_row_only(tiny_model_dir, concepts, monkeypatch):  # noqa: F811
    model = U.load_model(tiny_model_dir)
    state = cp.new_state(model, cp.Hparams(method="ewc", adapter="vera", **FAST))
    emb0 = model.text_encoder.get_input_embeddings().weight.detach().clone()
    seen, optimize = [], cp.optimize

    def spy(groups, *a, **k):
        seen.append(([n for n, p in model.unet.named_parameters() if p.requires_grad],
                     [n for n, p in model.text_encoder.named_parameters() if p.requires_grad]))
        return optimize(groups, *a, **k)
    monkeypatch.setattr(cp, "optimize", spy)
    state = train.learn_folder(model, state, concepts[0])
    unet_names, text_names = seen[0]
    layers = len(lora.target_modules(model.unet, state.hparams.targets))  # the defaults' kv+ff: 16 in the test UNet
    assert len(unet_names) == 2 * layers and all(".vera_lambda_" in n and n.endswith(".current") for n in unet_names)
    assert text_names == []  # the new token's row trains as its own parameter (unet.trainable_row)
    emb = model.text_encoder.get_input_embeddings().weight.detach()
    token = model.tokenizer.convert_tokens_to_ids("<alpha>")
    assert torch.equal(emb[:emb0.shape[0]], emb0) and token == emb0.shape[0]  # only the new row moved
    # the EWC statistics are over d and b
    assert state.fisher.keys() == cp.flat(state.lora).keys() and all(k.endswith((".d", ".b")) for k in state.fisher)
    assert all(state.fisher[k].shape == v.shape for k, v in cp.flat(state.lora).items())
    assert sum(f.sum() for f in state.fisher.values()) > 0


@pytest.mark.parametrize("method", ["seq", "ewc-dc", "dsc-ewc"])
def test_vera_two_tasks_and_round_trip(tiny_model_dir, concepts, tmp_path, method):  # noqa: F811
    model = U.load_model(tiny_model_dir)
    state = cp.new_state(model, cp.Hparams(method=method, adapter="vera", **FAST))
    for folder in concepts:
        state = train.learn_folder(model, state, folder)
        cp_state.save_state(state, str(tmp_path))
        loaded = cp_state.load_state(str(tmp_path))
        a, b = state_tensors(state), state_tensors(loaded)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(x, y) for x, y in zip(state.projection, loaded.projection))
    assert all(d.shape == (cp.Hparams().rank,) and b.ndim == 1 for d, b in state.lora.values())
    again = U.load_model(tiny_model_dir)
    cp.apply_state(again, cp_state.load_state(str(tmp_path)))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        mine = model.unet(x, 10, model.encode_text(["a photo of a <alpha>"]))
        assert torch.allclose(mine, again.unet(x, 10, again.encode_text(["a photo of a <alpha>"])), atol=1e-5)
        lora.set_enabled(again.unet, "current", False)
        assert (mine - again.unet(x, 10, again.encode_text(["a photo of a <alpha>"]))).abs().max() > 1e-4



@pytest.mark.slow
def test_vera_cli_round_trip_sample_export_and_refusals(tiny_model_dir, tmp_path):
    a, b = write_concept(str(tmp_path / "alpha"), 0), write_concept(str(tmp_path / "beta"), 1)
    state = str(tmp_path / "state")
    run_cli("train.py", "--concept", a, "--state", state, "--model", tiny_model_dir, "--adapter", "vera",
            "--method", "ewc", *CLI_FAST, "--lr", "0.1")  # 3 steps at 0.1: b moves far enough to show in an image
    r = run_cli("train.py", "--concept", b, "--state", state, *CLI_FAST, "--lr", "0.1", "--export",
                str(tmp_path / "export"))
    assert "learned <beta>" in r.stdout and "2 concepts" in r.stdout
    loaded = cp_state.load_state(state)
    assert loaded.hparams.adapter == "vera"
    assert len(loaded.pool) == 2 and all(d.ndim == 1 for d, _ in loaded.lora.values())
    # sample.py --state applies the VeRA: its image is ours with the adapter, not without it
    prompt = "a photo of a <alpha> and a <beta>"
    run_cli("sample.py", "--state", state, "--prompt", prompt, "-n", "1", "--steps", "3", "--out",
            str(tmp_path / "s.png"))
    cli = np.asarray(Image.open(tmp_path / "s.png"), dtype=float)
    model, _ = cp_state.load_with_state(state)
    grid = lambda: np.asarray(sample.to_grid(sample.sample(model, [prompt], steps=3, seed=0)), dtype=float)
    with_vera = grid()
    lora.set_enabled(model.unet, "current", False)
    without = grid()
    assert np.abs(cli - with_vera).max() <= 1 < np.abs(cli - without).max()
    # the export is PEFT's folder, which PEFT loads onto diffusers' UNet with the same output
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    assert sorted(os.listdir(tmp_path / "export")) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "alpha.safetensors", "beta.safetensors"]
    peft_unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(os.path.join(tiny_model_dir, "unet")),
                                          str(tmp_path / "export")).get_base_model()
    lora.set_enabled(model.unet, "current", True)
    x, ctx = torch.randn(1, 4, 8, 8), model.encode_text([prompt])
    with torch.no_grad():
        assert (peft_unet(x, 10, ctx).sample - model.unet(x, 10, ctx)).abs().max() <= 1e-5
    # the adapter is fixed for the state's lifetime; clora has no VeRA form
    before = sorted(os.listdir(state))
    r = run_cli("train.py", "--concept", str(tmp_path / "alpha"), "--name", "gamma", "--state", state,
                "--adapter", "lora", *CLI_FAST, check=False)
    assert_one_line_error(r, "this state's adapter is 'vera'")
    assert sorted(os.listdir(state)) == before
    r = run_cli("train.py", "--concept", a, "--state", str(tmp_path / "c"), "--model", tiny_model_dir,
                "--adapter", "vera", "--method", "clora", *CLI_FAST, check=False)
    assert_one_line_error(r, "clora", "--adapter lora")
    assert not os.path.exists(tmp_path / "c")
