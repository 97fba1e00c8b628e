"""Loading: diffusers folders, single-file LDM checkpoints (checked against diffusers' own converter), bad files."""
import os

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

import unet

PRESET = unet.PRESETS["tiny"]


def load_reference(folder):
    return (UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval(),
            AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval())


def outputs(unet_fn, decode_fn):
    g = torch.Generator().manual_seed(0)
    x, c, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g)
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
    unet_back = convert_ldm_unet_checkpoint(ldm, unet.read_json(os.path.join(tiny_model_dir, "unet", "config.json")))
    vae_back = convert_ldm_vae_checkpoint(ldm, unet.read_json(os.path.join(tiny_model_dir, "vae", "config.json")))
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
