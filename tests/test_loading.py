"""Loading: diffusers folders, single-file LDM checkpoints (checked against diffusers' own converter), bad files."""
import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

import unet
from conftest import full_disk, writes_denied

PRESET = unet.PRESETS["tiny"]


def load_reference(folder):
    return (UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval(),
            AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval())


def outputs(unet_fn, decode_fn):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return unet_fn(x, torch.tensor([10, 900]), c), decode_fn(z)


def assert_same_outputs(model, folder):
    ref_unet, ref_vae = load_reference(folder)
    ours = outputs(model.unet, model.vae.decode)
    theirs = outputs(lambda *a: ref_unet(*a).sample, lambda z: ref_vae.decode(z).sample)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-4


def to_ldm(folder, vae_attention_as_conv=True):
    """Our rule table run backwards: a diffusers folder's weights under original SD v1 checkpoint names."""
    unet_sd = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    vae_sd = load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    te_sd = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    ldm = {}
    for sd, table in ((unet_sd, unet.ldm_names(unet_sd, unet.unet_ldm_map(PRESET["unet"]), "model.diffusion_model.")),
                      (vae_sd, unet.ldm_names(vae_sd, unet.vae_ldm_map(PRESET["vae"]), "first_stage_model."))):
        for k, v in sd.items():
            conv = vae_attention_as_conv and ".attn_1." in table[k] and table[k].endswith("weight") and v.dim() == 2
            ldm[table[k]] = v[:, :, None, None] if conv else v
    ldm.update({"cond_stage_model.transformer." + k: v for k, v in te_sd.items()})
    return ldm, unet_sd, vae_sd


def test_diffusers_folder_loads_and_matches(tiny_model_dir):
    model = unet.load_model(tiny_model_dir)
    assert model.resolution == 16 and model.alphas_cumprod.shape == (1000,)
    assert model.encode_text(["a photo of a red star"]).shape == (1, 77, 32)
    assert_same_outputs(model, tiny_model_dir)


def test_rule_table_agrees_with_diffusers_converter(tiny_model_dir):
    ldm, unet_sd, vae_sd = to_ldm(tiny_model_dir)
    unet_back = convert_ldm_unet_checkpoint(ldm, unet.read_config(os.path.join(tiny_model_dir, "unet", "config.json")))
    vae_back = convert_ldm_vae_checkpoint(ldm, unet.read_config(os.path.join(tiny_model_dir, "vae", "config.json")))
    for ours, theirs in ((unet_sd, unet_back), (vae_sd, vae_back)):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # the 1×1-conv form was exercised


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_and_matches(tiny_model_dir, tmp_path, suffix):
    ldm, _, _ = to_ldm(tiny_model_dir)
    ldm["model_ema.decay"] = torch.tensor(0.9999)  # real checkpoints carry extras outside the three networks
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".ckpt":
        torch.save({"state_dict": ldm, "global_step": 10}, path)
    else:
        save_file(ldm, path)
    model = unet.load_model(path, config=tiny_model_dir)
    assert_same_outputs(model, tiny_model_dir)
    assert model.fingerprint == unet.load_model(tiny_model_dir).fingerprint


def test_legacy_vae_attention_names(tiny_model_dir, tmp_path):
    folder = tmp_path / "legacy"
    os.system(f"cp -r {tiny_model_dir} {folder}")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = load_file(str(path))
    renamed = {}
    for k, v in sd.items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(path))
    assert_same_outputs(unet.load_model(str(folder)), tiny_model_dir)


def test_not_a_model(tmp_path):
    with pytest.raises(unet.LoadError, match="not a diffusers model folder"):
        unet.load_model(str(tmp_path))
    with pytest.raises(unet.LoadError, match="no such model"):
        unet.load_model(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(unet.LoadError, match="not a model"):
        unet.load_model(str(tmp_path / "notes.txt"))


def corrupt_unet(tiny_model_dir, tmp_path, change):
    folder = tmp_path / "model"
    os.system(f"cp -r {tiny_model_dir} {folder}")
    path = str(folder / "unet" / "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    change(sd)
    save_file(sd, path)
    return str(folder)


def test_missing_key_is_named(tiny_model_dir, tmp_path):
    folder = corrupt_unet(tiny_model_dir, tmp_path, lambda sd: sd.pop("conv_out.bias"))
    with pytest.raises(unet.LoadError, match=r"unet: 1 missing keys: conv_out\.bias"):
        unet.load_model(folder)


def test_unexpected_key_is_named(tiny_model_dir, tmp_path):
    folder = corrupt_unet(tiny_model_dir, tmp_path, lambda sd: sd.update({"extra.weight": torch.zeros(1)}))
    with pytest.raises(unet.LoadError, match=r"1 unexpected keys: extra\.weight"):
        unet.load_model(folder)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    folder = corrupt_unet(tiny_model_dir, tmp_path, lambda sd: sd.update({"conv_in.bias": torch.zeros(7)}))
    with pytest.raises(unet.LoadError, match=r"mis-shaped keys: conv_in\.bias \(expected \(32,\), got \(7,\)\)"):
        unet.load_model(folder)


def test_single_file_unexpected_key_is_named(tiny_model_dir, tmp_path):
    ldm, _, _ = to_ldm(tiny_model_dir)
    ldm["model.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    save_file(ldm, str(tmp_path / "m.safetensors"))
    with pytest.raises(unet.LoadError, match=r"input_blocks\.99\.0\.weight"):
        unet.load_model(str(tmp_path / "m.safetensors"), config=tiny_model_dir)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_objects_is_refused(tmp_path, capsys):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(unet.LoadError, match="refused to unpickle"):
        unet.load_model(path)
    assert "this must never run" not in capsys.readouterr().out
    torch.save({"state_dict": {"a": torch.zeros(1), "b": "text"}}, path)
    with pytest.raises(unet.LoadError, match="not tensors: b"):
        unet.read_weights(path)


# ----------------------------------------------------------------------------------------------------------------
# the fingerprint: every weight, whatever dtype the model is loaded in, cached by path, size and mtime

WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}


def copy_model(tiny_model_dir, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, folder)
    return folder


def touch(path):
    """A newer mtime (by 1 ns), the bytes unchanged."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


@pytest.mark.parametrize("net, suffix", [("unet", "conv_in.bias"), ("vae", "decoder.conv_out.bias"),
                                         ("text_encoder", "final_layer_norm.bias")])
def test_fingerprint_covers_every_weight(tiny_model_dir, tmp_path, net, suffix):
    """One bias ×1.01, in any of the three networks, is another base model."""
    base = unet.load_model(tiny_model_dir)
    folder = copy_model(tiny_model_dir, tmp_path)
    path = os.path.join(folder, WEIGHTS[net])
    sd = load_file(path)
    key = next(k for k in sd if k.endswith(suffix))  # text_model.-prefixed or not, by transformers' version
    sd[key] = sd[key] * 1.01 + 1e-3  # + 1e-3: a freshly initialised CLIP's biases are zeros
    save_file(sd, path)
    changed = unet.load_model(folder)
    assert len(changed.fingerprint) == 32 and int(changed.fingerprint, 16) >= 0
    assert changed.fingerprint != base.fingerprint
    assert unet.load_model(copy_model(tiny_model_dir, tmp_path / "same")).fingerprint == base.fingerprint


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fingerprint_does_not_depend_on_the_load_dtype(tiny_model_dir, tmp_path, monkeypatch, dtype):
    """Hashed afresh each time (a new cache folder), the same weights loaded in another dtype give one fingerprint."""
    hashed, real = [], unet.hash_weights
    monkeypatch.setattr(unet, "hash_weights", lambda nets: hashed.append(1) or real(nets))
    monkeypatch.setenv("CP_CACHE_DIR", str(tmp_path / "a"))
    ref = unet.load_model(tiny_model_dir)
    monkeypatch.setenv("CP_CACHE_DIR", str(tmp_path / "b"))
    model = unet.load_model(tiny_model_dir, dtype=dtype)
    assert model.dtype == dtype and len(hashed) == 2
    assert model.fingerprint == ref.fingerprint


def test_fingerprint_is_cached_by_path_size_and_mtime(tiny_model_dir, tmp_path, monkeypatch):
    """The second load takes the digest from the cache; a weight file with a newer mtime is hashed again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CP_CACHE_DIR", str(cache))
    folder = copy_model(tiny_model_dir, tmp_path)
    hashed, real = [], unet.hash_weights
    monkeypatch.setattr(unet, "hash_weights", lambda nets: hashed.append(1) or real(nets))
    first = unet.load_model(folder).fingerprint
    assert len(hashed) == 1 and [f.suffix for f in cache.iterdir()] == [".json"]  # one entry, no temp file left

    def no_hash(nets):
        raise AssertionError("hashed again")
    monkeypatch.setattr(unet, "hash_weights", no_hash)
    assert unet.load_model(folder).fingerprint == first
    monkeypatch.setattr(unet, "hash_weights", lambda nets: hashed.append(1) or real(nets))
    for n, net in enumerate(WEIGHTS, start=2):
        touch(os.path.join(folder, WEIGHTS[net]))
        assert unet.load_model(folder).fingerprint == first and len(hashed) == n  # hashed again: the same weights
        assert unet.load_model(folder).fingerprint == first and len(hashed) == n  # and cached for the new mtime


def test_a_cache_that_cannot_be_used_is_no_error(tiny_model_dir, tmp_path, monkeypatch):
    """A cache folder that cannot be created, or a damaged entry: the fingerprint is computed (and the entry fixed)."""
    ref = unet.load_model(tiny_model_dir).fingerprint
    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setenv("CP_CACHE_DIR", str(tmp_path / "file" / "cp"))
    assert unet.load_model(tiny_model_dir).fingerprint == ref
    cache = tmp_path / "cache"
    monkeypatch.setenv("CP_CACHE_DIR", str(cache))
    unet.load_model(tiny_model_dir)
    for damage in ["{not json", '{"stamp": 1}', '{"stamp": null, "weights": 7}', "[]"]:
        [entry] = cache.iterdir()
        entry.write_text(damage)
        assert unet.load_model(tiny_model_dir).fingerprint == ref
        assert "weights" in unet.read_config(entry)


def test_a_read_only_or_full_cache_is_no_error(tiny_model_dir, tmp_path, monkeypatch):
    """A cache folder that cannot be written (chmod 0o500; as root, the refusal simulated) or a full disk: the
    fingerprint is computed, and no file is left in the cache."""
    ref = unet.load_model(tiny_model_dir).fingerprint
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("CP_CACHE_DIR", str(cache))
    os.chmod(cache, 0o500)
    try:
        with monkeypatch.context() as m:
            if not writes_denied(cache):
                m.setattr(unet.tempfile, "mkstemp", lambda **k: (_ for _ in ()).throw(
                    PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(cache))))
            assert unet.load_model(tiny_model_dir).fingerprint == ref
    finally:
        os.chmod(cache, 0o700)
    assert list(cache.iterdir()) == []
    with monkeypatch.context() as m:
        m.setattr(unet.os, "fdopen", full_disk(os.fdopen))
        assert unet.load_model(tiny_model_dir).fingerprint == ref
    assert list(cache.iterdir()) == []


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CP_CACHE_DIR", str(tmp_path / "mine"))
    assert unet.cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("CP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert unet.cache_dir() == str(tmp_path / "xdg" / "cp")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert unet.cache_dir() == str(tmp_path / "home" / ".cache" / "cp")


# ----------------------------------------------------------------------------------------------------------------
# a damaged diffusers folder (toy/model copied): one LoadError naming what is missing or malformed, before any weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_toy(tmp_path):
    """The shipped toy model, copied to be damaged."""
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(ROOT, "toy", "model"), folder)
    return folder


def no_weights_read(monkeypatch):
    def refuse(path):
        raise AssertionError(f"{path} was read before the folder was checked")
    monkeypatch.setattr(unet, "read_weights", refuse)


@pytest.mark.parametrize("part", ["text_encoder", "scheduler", "vae", "tokenizer"])
def test_a_missing_part_folder_is_named(tmp_path, monkeypatch, part):
    folder = copy_toy(tmp_path)
    shutil.rmtree(folder / part)
    no_weights_read(monkeypatch)
    with pytest.raises(unet.LoadError) as e:
        unet.load_model(folder)
    assert str(e.value).startswith(f"{folder}: no {part}/ folder"), e.value


@pytest.mark.parametrize("file", ["text_encoder/config.json", "scheduler/scheduler_config.json",
                                  "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"])
def test_a_missing_file_is_named(tmp_path, monkeypatch, file):
    folder = copy_toy(tmp_path)
    os.remove(folder / file)
    no_weights_read(monkeypatch)
    with pytest.raises(unet.LoadError) as e:
        unet.load_model(folder)
    assert os.path.dirname(str(folder / file)) in str(e.value), e.value


@pytest.mark.parametrize("file, text, problem", [
    ("unet/config.json", '{"in_channels": 4,', "not valid JSON"),
    ("scheduler/scheduler_config.json", "", "not valid JSON"),
    ("text_encoder/config.json", "[1, 2]", "not a JSON object"),
    ("tokenizer/tokenizer_config.json", "{'single': 'quotes'}", "not valid JSON"),
    ("tokenizer/vocab.json", "\xff\xfe", "not valid JSON")])
def test_a_malformed_config_is_named(tmp_path, monkeypatch, file, text, problem):
    folder = copy_toy(tmp_path)
    (folder / file).write_bytes(text.encode("latin-1"))
    no_weights_read(monkeypatch)
    with pytest.raises(unet.LoadError) as e:
        unet.load_model(folder)
    assert str(e.value).startswith(f"{folder / file}: {problem}"), e.value


def test_a_single_files_config_folder_is_checked_first(tiny_model_dir, tmp_path, monkeypatch):
    """config= a diffusers folder without weights is enough; one without text_encoder/ is named before the file is
    read."""
    ldm, _, _ = to_ldm(tiny_model_dir)
    save_file(ldm, str(tmp_path / "m.safetensors"))
    config = tmp_path / "config"
    shutil.copytree(tiny_model_dir, config)
    for net in WEIGHTS.values():
        os.remove(config / net)
    assert unet.load_model(str(tmp_path / "m.safetensors"), config=str(config)).resolution == 16
    shutil.rmtree(config / "text_encoder")
    no_weights_read(monkeypatch)
    with pytest.raises(unet.LoadError, match=f"{config}: no text_encoder/ folder"):
        unet.load_model(str(tmp_path / "m.safetensors"), config=str(config))
    with pytest.raises(unet.LoadError, match="nowhere: no such config folder"):
        unet.load_model(str(tmp_path / "m.safetensors"), config=str(tmp_path / "nowhere"))


def test_the_cli_says_one_line(tmp_path):
    folder = copy_toy(tmp_path)
    (folder / "unet" / "config.json").write_text("{")
    r = subprocess.run([sys.executable, "sample.py", "--model", str(folder), "--prompt", "x",
                        "--out", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {folder / 'unet' / 'config.json'}: not valid JSON " \
                               "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
