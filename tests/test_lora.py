"""LoRA (lora.py): diffusers reads our files and gives the same UNet output; merge, stacking, trainability, errors."""
import copy
import errno
import os
import re
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import unet as U
from conftest import full_disk, writes_denied

CFG = U.PRESETS["tiny"]["unet"]
KV_PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def make(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return U.UNet(cfg).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 5, CFG["cross_attention_dim"], generator=g))


def randomize(net, name, std=0.3, seed=2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for A, B in lora.get_adapter(net, name).values():
            B.normal_(0, std)


@torch.no_grad()
def run(net):
    return net(*inputs())


def diffusers_pipeline(state_dict):
    """A StableDiffusionPipeline around diffusers' UNet with the given weights; only the UNet is needed for LoRA."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ref = diffusers.UNet2DConditionModel(**CFG).eval()
    ref.load_state_dict(state_dict, strict=True)
    return diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=ref,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def add_mixed(net, name):
    """One adapter whose rank and alpha differ between modules (alpha != rank everywhere)."""
    lora.inject(net, "kv", rank=4, alpha=2.5, name=name)
    lora.inject(net, ("attn1.to_q",), rank=2, alpha=7.0, name=name)
    lora.inject(net, ("attn1.to_out.0",), rank=3, alpha=1.0, name=name)


@pytest.mark.parametrize("fmt,targets", [("diffusers", "kv"), ("diffusers", "attn"), ("diffusers", "kv+ff"),
                                         ("diffusers", "mixed"), ("kohya", "kv"), ("kohya", "attn"),
                                         ("kohya", "kv+ff")])
def test_diffusers_loads_our_file(tmp_path, fmt, targets):
    net = make()
    pipe = diffusers_pipeline(net.state_dict())
    base = run(net)
    if targets == "mixed":
        add_mixed(net, "task0")
    else:
        lora.inject(net, targets, rank=4, alpha=2.5, name="task0")
    randomize(net, "task0")
    ours = run(net)
    assert (ours - base).abs().max() > 1e-2  # the LoRA matters, so equality below means something
    f = tmp_path / "lora.safetensors"
    lora.save_lora(net, f, "task0", format=fmt)
    with safe_open(str(f), framework="pt") as h:
        keys = list(h.keys())
    assert all(".lora_" in k or k.endswith(".alpha") for k in keys)
    assert len([k for k in keys if "lora_A" in k or "lora_down" in k]) == len(lora.get_adapter(net, "task0"))
    pipe.load_lora_weights(str(f))
    with torch.no_grad():
        theirs = pipe.unet(*inputs()).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_save_load_roundtrip(tmp_path, fmt):
    net = make()
    add_mixed(net, "a")
    randomize(net, "a")
    f = tmp_path / "a.safetensors"
    lora.save_lora(net, f, "a", format=fmt)
    other = make()
    assert lora.load_lora(other, f, "b") == sorted(lora.get_adapter(net, "a"))
    torch.testing.assert_close(run(other), run(net), atol=0, rtol=0)
    assert lora.get_alpha(other, "b") == lora.get_alpha(net, "a")
    # loading into an existing adapter replaces its weights
    randomize(other, "b", seed=9)
    assert not torch.equal(run(other), run(net))
    lora.load_lora(other, f, "b")
    torch.testing.assert_close(run(other), run(net), atol=0, rtol=0)


def test_kohya_file_bundles_token_embeddings(tmp_path):
    """bundle_emb.<name>.string_to_param.* [1, dim] beside the LoRA, as AUTOMATIC1111 reads it; our loader skips it."""
    net = make()
    add_mixed(net, "a")
    randomize(net, "a")
    layers, f = lora.get_adapter(net, "a"), tmp_path / "bundled.safetensors"
    rows = {"dog": torch.randn(32), "mug-2": torch.randn(32)}
    lora.write_lora_file(layers, lora.get_alpha(net, "a"), f, "kohya", rows)
    with safe_open(str(f), framework="pt") as file:
        bundled = {k: file.get_tensor(k) for k in file.keys() if k.startswith("bundle_emb.")}
    assert bundled.keys() == {f"bundle_emb.{n}.string_to_param.*" for n in rows}
    assert all(torch.equal(bundled[f"bundle_emb.{n}.string_to_param.*"], row[None]) for n, row in rows.items())
    other = make()
    lora.load_lora(other, f, "b")
    torch.testing.assert_close(run(other), run(net), atol=0, rtol=0)
    with pytest.raises(ValueError, match="only the kohya format"):
        lora.write_lora_file(layers, lora.get_alpha(net, "a"), f, "diffusers", rows)


@pytest.mark.parametrize("adapter", lora.ADAPTERS)
def test_scale_multiplies_every_delta(adapter):
    net = make()
    lora.inject(net, "kv", rank=4, alpha=3.0, name="a", adapter=adapter)
    lora.inject(net, "kv", rank=4, alpha=3.0, name="b", adapter=adapter)
    with torch.no_grad():
        for name in ("a", "b"):
            for _, b in lora.get_adapter(net, name).values():  # B of a LoRA, b of VeRA: zero when fresh
                b.normal_(0, 0.3)
    before = {n: lora.deltas(net, n) for n in ("a", "b")}
    lora.merge(net)
    lora.scale(net, 2.5)  # unmerges first: the weights hold no stale delta
    assert all(torch.allclose(lora.deltas(net, n)[p], 2.5 * d, atol=1e-6) for n in before for p, d in
               before[n].items())
    lora.scale(net, 0.0)
    torch.testing.assert_close(run(net), run(make()), atol=1e-5, rtol=0)  # the merge and unmerge: rounding only


def test_zero_B_is_base_and_state_dict_keys():
    net = make()
    keys, base = set(net.state_dict()), run(net)
    paths = lora.inject(net, "attn", rank=4, alpha=8.0, name="task0")
    assert len(paths) == 32 and all(isinstance(net.get_submodule(p), nn.Linear) for p in paths)
    A, B = lora.get_adapter(net, "task0")[KV_PATH]
    assert A.abs().sum() > 0 and B.abs().sum() == 0
    assert torch.equal(run(net), base)
    sd = net.state_dict()
    assert {k for k in sd if ".lora_" not in k} == keys
    assert f"{KV_PATH}.lora_A.task0" in sd and f"{KV_PATH}.lora_B.task0" in sd
    lora.remove(net)
    assert set(net.state_dict()) == keys and lora.adapter_names(net) == []
    assert type(net.get_submodule(KV_PATH)) is nn.Linear


def test_merge_unmerge():
    net = make()
    lora.inject(net, "attn", rank=4, alpha=3.0, name="a")
    lora.inject(net, "kv", rank=2, alpha=1.0, name="b")
    randomize(net, "a")
    randomize(net, "b", seed=3)
    W0 = {p: m.weight.detach().clone() for p, m in net.named_modules() if isinstance(m, lora.LoRALinear)}
    out = run(net)
    lora.merge(net)
    m = net.get_submodule(KV_PATH)
    assert (m.weight - W0[KV_PATH]).abs().max() > 1e-3
    torch.testing.assert_close(run(net), out, atol=1e-5, rtol=1e-5)
    lora.unmerge(net)
    for p, w in W0.items():
        torch.testing.assert_close(net.get_submodule(p).weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(net), out, atol=1e-5, rtol=1e-5)


def test_stacked_adapters_sum_and_disable():
    net = make()
    lora.inject(net, "kv", rank=4, alpha=4.0, name="a")
    lora.inject(net, "kv", rank=2, alpha=6.0, name="b")
    randomize(net, "a")
    randomize(net, "b", seed=3)
    m = net.get_submodule(KV_PATH)
    x = torch.randn(3, 5, m.in_features)
    with torch.no_grad():
        base = F.linear(x, m.weight, m.bias)
        da, db = (x @ m.delta(n).T for n in ("a", "b"))
        torch.testing.assert_close(m(x), base + da + db, atol=1e-5, rtol=1e-5)
        lora.set_enabled(net, "b", False)
        torch.testing.assert_close(m(x), base + da, atol=1e-5, rtol=1e-5)
    only_a = copy.deepcopy(net)
    lora.remove(only_a, "b")
    assert lora.adapter_names(only_a) == ["a"]
    torch.testing.assert_close(run(net), run(only_a), atol=0, rtol=0)
    lora.set_enabled(net, "b", True)
    assert (run(net) - run(only_a)).abs().max() > 1e-3


def test_only_lora_trainable():
    net = make()
    pa = lora.inject(net, "kv", rank=4, alpha=4.0, name="a")
    lora.inject(net, "attn", rank=4, alpha=4.0, name="b")
    params = lora.set_trainable(net, "b")
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(trainable) == len(params) == 2 * 32
    assert all(n.endswith((".lora_A.b", ".lora_B.b")) for n in trainable)
    lora.set_trainable(net, ["a", "b"])
    assert sum(p.requires_grad for p in net.parameters()) == 2 * 32 + 2 * len(pa)
    lora.set_trainable(net, "a")
    net(*inputs()).square().mean().backward()
    _, B = lora.get_adapter(net, "a")[KV_PATH]
    assert B.grad is not None and B.grad.abs().sum() > 0  # B = 0 at init, so only B gets a gradient first
    assert all(p.grad is None for n, p in net.named_parameters() if ".lora_" not in n)


def test_load_errors(tmp_path):
    net = make()
    lora.inject(net, "kv", rank=4, alpha=4.0, name="a")
    # another rank into an existing adapter
    big = make()
    lora.inject(big, "kv", rank=8, alpha=4.0, name="a")
    for fmt in ("diffusers", "kohya"):
        lora.save_lora(big, tmp_path / f"r8_{fmt}.safetensors", "a", format=fmt)
        with pytest.raises(ValueError, match=r"(lora_A|lora_down)\.weight: rank 8 in file but adapter 'a' has rank 4"):
            lora.load_lora(net, tmp_path / f"r8_{fmt}.safetensors", "a")
    # another architecture: a module this UNet lacks, and a layer of another width
    deeper = make(cfg=dict(CFG, layers_per_block=2))
    wider = make(cfg=dict(CFG, cross_attention_dim=48))
    for other, msg in ((deeper, r"attentions[._]1.*not a Linear layer of this UNet"), (wider, r"attn2.*32x48")):
        lora.inject(other, "kv", rank=4, alpha=4.0, name="x")
        for fmt in ("diffusers", "kohya"):
            f = tmp_path / f"other_{fmt}.safetensors"
            lora.save_lora(other, f, "x", format=fmt)
            fresh = make()
            with pytest.raises(ValueError, match=msg):
                lora.load_lora(fresh, f, "x")
            assert lora.adapter_names(fresh) == []  # nothing was half-loaded
    # files with non-LoRA or non-UNet tensors, or half a pair
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    kv = f"lora_unet_{KV_PATH.replace('.', '_')}.lora_down.weight"
    for bad, key in (({"unet.conv_in.weight": torch.zeros(1)}, "unet.conv_in.weight"),
                     ({kv: torch.zeros(4, 32), te: torch.zeros(1)}, te),
                     ({f"unet.{KV_PATH}.lora_A.weight": torch.zeros(4, 32)}, f"unet.{KV_PATH}.lora_A.weight")):
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=re.escape(key)):
            lora.load_lora(make(), tmp_path / "bad.safetensors", "x")


# ---- a full disk or a folder that cannot be written: an OSError (what callers catch), no partial file ------------

LAYERS = {KV_PATH: (torch.randn(4, 32), torch.randn(32, 4))}
VERA = {KV_PATH: (torch.randn(4), torch.randn(32))}
PROJECTION = (torch.randn(4, 32), torch.randn(32, 4))
WRITERS = {
    "diffusers": lambda d: lora.write_lora_file(LAYERS, {KV_PATH: 2.0}, d / "a.safetensors"),
    "kohya": lambda d: lora.write_lora_file(LAYERS, {KV_PATH: 2.0}, d / "a.safetensors", "kohya",
                                            {"<x>": torch.randn(32)}),
    "vera file": lambda d: lora.write_vera(VERA, str(d / "a.safetensors"), PROJECTION),
    "vera folder": lambda d: lora.write_vera(VERA, str(d), PROJECTION)}


FullDisk = full_disk(open)  # open() for lora.py on a full disk


def denied(path, mode="r", *args, **kwargs):
    """open() for lora.py in a folder that cannot be written (where chmod does not stop this user: root)."""
    if set(mode) & set("wax+"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return open(path, mode, *args, **kwargs)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_is_an_oserror(tmp_path, monkeypatch, writer):
    monkeypatch.setattr(lora, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as e:
        WRITERS[writer](tmp_path)
    assert e.value.errno == errno.ENOSPC and "No space left" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the half-written file is removed


@pytest.mark.parametrize("writer", WRITERS)
def test_a_read_only_folder_is_an_oserror(tmp_path, monkeypatch, writer):
    folder = tmp_path / "out"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        if not writes_denied(folder):
            monkeypatch.setattr(lora, "open", denied, raising=False)
        with pytest.raises(PermissionError) as e:
            WRITERS[writer](folder)
        assert e.value.errno == errno.EACCES and str(folder) in str(e.value)
    finally:
        os.chmod(folder, 0o700)
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no file size limit here (Windows); as simulated above")
@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_the_os_refuses_is_an_oserror(tmp_path, writer):
    """A real failed write, no open() replaced: files limited to 100 bytes (RLIMIT_FSIZE, signal ignored) fail with
    EFBIG, as a full disk fails with ENOSPC."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(OSError) as e:
            WRITERS[writer](tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert e.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []


def test_the_writers_files_read_back(tmp_path):
    WRITERS["diffusers"](tmp_path)
    [(A, B, alpha)] = lora.read_lora_file(tmp_path / "a.safetensors").values()
    assert torch.equal(A, LAYERS[KV_PATH][0]) and torch.equal(B, LAYERS[KV_PATH][1]) and alpha == 2.0
    for writer, path in (("vera file", tmp_path / "a.safetensors"), ("vera folder", tmp_path)):
        WRITERS[writer](tmp_path)
        layers, projection, cfg = lora.read_vera(str(path))
        assert torch.equal(layers[KV_PATH][1], VERA[KV_PATH][1]) and torch.equal(projection[0], PROJECTION[0])


def test_magnitude_merge_by_hand():
    """Per element of ΔW the larger magnitude (the old one on a tie), then the best rank-r approximation: exact at
    full rank; at rank 1 its squared error is the smaller eigenvalue of MᵀM (Eckart–Young), worked out by hand."""
    s = 0.5
    old = {"m": (torch.tensor([[2.0, -3.0]]), torch.tensor([[2.0], [0.0]]))}  # ΔW_old = s·B·A = [[2, -3], [0, 0]]
    new = {"m": (torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0], [2.0]]))}  # ΔW_new = [[1, 3], [1, 3]]
    merged = torch.tensor([[2.0, -3.0], [1.0, 3.0]])  # the tie at (0, 1) keeps the old −3
    A, B = lora.magnitude_merge(old, new, s, 2)["m"]
    assert A.shape == (2, 2) and B.shape == (2, 2)
    torch.testing.assert_close(s * B @ A, merged)
    A, B = lora.magnitude_merge(old, new, s, 1)["m"]  # MᵀM = [[5, −3], [−3, 18]]: eigenvalues (23 ± √205) / 2
    assert float((merged - s * B @ A).square().sum()) == pytest.approx((23 - 205 ** 0.5) / 2, rel=1e-5)
    A, B = lora.magnitude_merge(None, new, s, 3)["m"]  # nothing merged yet: the new LoRA, padded to rank 3
    assert A.shape == (3, 2) and B.shape == (2, 3) and not A[2].any() and not B[:, 2].any()
    torch.testing.assert_close(s * B @ A, s * new["m"][1] @ new["m"][0])
