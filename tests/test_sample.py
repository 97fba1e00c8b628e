"""DDIM sampler with classifier-free guidance: determinism, the guidance formula, output format, CLI."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import sample
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_same_seed_same_images(tiny_model_dir):
    model = unet.load_model(tiny_model_dir)
    a = sample.sample(model, ["a red star", "a blue star"], steps=4, guidance=3.0, seed=7)
    b = sample.sample(model, ["a red star", "a blue star"], steps=4, guidance=3.0, seed=7)
    c = sample.sample(model, ["a red star", "a blue star"], steps=4, guidance=3.0, seed=8)
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_one_is_the_conditional_prediction(tiny_model_dir):
    model = unet.load_model(tiny_model_dir)
    x = torch.randn(2, 4, 8, 8)
    cond, uncond = model.encode_text(["a red star", "a blue star"]), model.encode_text(["", ""])
    with torch.no_grad():
        guided = sample.guided_eps(model.unet, x, 500, cond, uncond, 1.0)
        plain = model.unet(x, 500, cond)
        assert torch.allclose(guided, plain, atol=1e-5)
        strong = sample.guided_eps(model.unet, x, 500, cond, uncond, 3.0)
        e_u = model.unet(x, 500, uncond)
        assert torch.allclose(strong, e_u + 3.0 * (plain - e_u), atol=1e-4)


def test_ddim_timesteps_match_leading_spacing():
    steps, ratio = sample.ddim_timesteps(50, {"num_train_timesteps": 1000, "steps_offset": 1})
    assert ratio == 20 and steps[0] == 981 and steps[-1] == 1 and len(steps) == 50


def test_grid_size_and_mode():
    grid = sample.to_grid(torch.rand(5, 3, 16, 16))
    assert grid.size == (48, 32) and grid.mode == "RGB"


def test_cli_writes_png(tiny_model_dir, tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "sample.py", "--model", tiny_model_dir, "--prompt", "a red star", "-n", "2",
                        "--steps", "3", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (32, 16)
    assert r.stderr.count("sampling step") == 1 and "sampling step 3/3\n" in r.stderr  # off a terminal: one line
    bad = subprocess.run([sys.executable, "sample.py", "--model", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "not a diffusers model folder" in bad.stderr and "Traceback" not in bad.stderr


def test_out_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    """--out: a folder, no or an unknown extension, an existing file (without --overwrite), a file where its folder
    would go: one line `error: `, before any model is loaded, and nothing written."""
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(unet, "load_model", no_model)
    (tmp_path / "old.png").write_bytes(b"an older grid")
    (tmp_path / "file").write_text("not a folder")
    cases = [(tmp_path, "is a folder; give an image file name (.png, .jpg, .jpeg, .webp"),
             (tmp_path / "grid", "no extension; use one of .png, .jpg"),
             (tmp_path / "grid.gif", "unknown extension .gif"),
             (tmp_path / "old.png", "exists; give --overwrite to replace it"),
             (tmp_path / "file" / "grid.png", f"{tmp_path / 'file'} is a file, not a folder")]
    for out, fragment in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(["--prompt", "a red star", "--out", str(out)])
        assert e.value.code.startswith("error: --out ") and fragment in e.value.code, e.value.code
    assert sorted(os.listdir(tmp_path)) == ["file", "old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"an older grid"


def test_out_makes_its_folder_and_replaces_only_with_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "grid.JPG"
    argv = ["--model", tiny_model_dir, "--prompt", "a red star", "-n", "1", "--steps", "2", "--out", str(out)]
    sample.main(argv)
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (16, 16)
    with pytest.raises(SystemExit, match="exists; give --overwrite"):
        sample.main(argv)
    out.write_bytes(b"")
    sample.main([*argv, "--overwrite"])
    assert Image.open(out).format == "JPEG"


def toy_with_pine_tree():
    """toy/model with `<pine_tree>` learned (a random embedding row), as a state's tokens are added."""
    model = unet.load_model(os.path.join(ROOT, "toy", "model"))
    unet.add_tokens(model, {"<pine_tree>": torch.randn(model.text_encoder.get_input_embeddings().weight.shape[1])})
    return model


def test_a_token_is_known_by_its_ids_not_its_spelling():
    """CLIP's tokenizer lowercases: `<PINE_TREE>` is the learned `<pine_tree>`; `<other>` is not learned."""
    model, learned = toy_with_pine_tree(), ["<pine_tree>"]
    assert unet.token_ids(model.tokenizer, "<PINE_TREE>") == unet.token_ids(model.tokenizer, "<pine_tree>")
    assert sample.unknown_tokens("a photo of a <PINE_TREE> beside a <pine_tree>", learned, model.tokenizer) == []
    assert sample.unknown_tokens("a <other> beside a <Pine_Tree>", learned, model.tokenizer) == ["<other>"]
    assert sample.unknown_tokens("a <pine_tree>", [], model.tokenizer) == ["<pine_tree>"]
    assert unet.reads_as(model.tokenizer, "<Pine_Tree>", ["<star>", *learned]) == "<pine_tree>"
    assert unet.reads_as(model.tokenizer, "<other>", learned) is None


def test_the_cli_warns_only_of_a_token_not_learned(tmp_path, monkeypatch, capsys):
    import cp_state
    model = toy_with_pine_tree()
    state = SimpleNamespace(concepts=[{"name": "pine_tree", "token": "<pine_tree>"}])
    monkeypatch.setattr(cp_state, "load_with_state", lambda *a: (model, state))
    argv = ["--state", "any", "-n", "1", "--steps", "1", "--overwrite", "--out", str(tmp_path / "g.png")]
    sample.main([*argv, "--prompt", "a photo of a <PINE_TREE>"])
    assert "warning" not in capsys.readouterr().err
    sample.main([*argv, "--prompt", "a photo of a <other>"])
    assert "warning: <other> not learned: this state has <pine_tree>" in capsys.readouterr().err
