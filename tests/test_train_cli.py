"""train.py and sample.py as a user runs them: the happy path, export, interruption, and every bad input."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_cp import write_concept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "3", "--batch-size", "2", "--fisher-samples", "2", "--dsc-steps", "2", "--no-preview"]


def run(*args, check=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def digest(folder):
    """Every file of a state folder, names and bytes (not the lock file: each writer puts its process id there)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            if f != ".lock":
                h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def read_stderr_until(p, text, timeout=120):
    """What a running process printed to stderr (a binary pipe) until `text` appeared, it ended or time ran out."""
    seen, deadline = "", time.time() + timeout
    while text not in seen and time.time() < deadline:
        chunk = os.read(p.stderr.fileno(), 4096).decode(errors="replace")
        if not chunk:
            break
        seen += chunk
    return seen


def assert_one_line_error(r, *fragments):
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def learned(tiny_model_dir, tmp_path_factory):
    """A state with one concept learned through the CLI (ewc-dc), and a second concept folder."""
    root = tmp_path_factory.mktemp("cli")
    a, b = write_concept(str(root / "alpha"), 0), write_concept(str(root / "beta"), 1)
    state = str(root / "state")
    r = run("train.py", "--concept", a, "--state", state, "--model", tiny_model_dir, "--method", "ewc-dc", *FAST)
    assert "learned <alpha>" in r.stdout and os.path.exists(os.path.join(state, "manifest.json"))
    return dict(root=root, state=state, second=b, model=tiny_model_dir)


def test_second_concept_sample_and_export(learned, tmp_path):
    state = str(tmp_path / "state")
    subprocess.run(["cp", "-r", learned["state"], state], check=True)
    r = run("train.py", "--concept", learned["second"], "--state", state, *FAST, "--export", str(tmp_path / "export"))
    assert "learned <beta>" in r.stdout and "2 concepts" in r.stdout
    exported = sorted(os.listdir(tmp_path / "export"))
    assert exported == ["alpha.safetensors", "beta.safetensors", "lora_kohya.safetensors",
                        "lora_kohya_with_tokens.safetensors", "pytorch_lora_weights.safetensors"]
    assert f"exported to {tmp_path / 'export'}: " in r.stdout and "A1111: lora_kohya_with_tokens" in r.stdout
    beta = load_file(str(tmp_path / "export" / "beta.safetensors"))
    assert list(beta) == ["<beta>"]
    bundled = load_file(str(tmp_path / "export" / "lora_kohya_with_tokens.safetensors"))  # as A1111 reads them
    assert sorted(k for k in bundled if not k.startswith("lora_unet_")) == \
        ["bundle_emb.alpha.string_to_param.*", "bundle_emb.beta.string_to_param.*"]
    assert torch.equal(bundled["bundle_emb.beta.string_to_param.*"], beta["<beta>"][None])
    plain = load_file(str(tmp_path / "export" / "lora_kohya.safetensors"))
    assert sorted(plain) == sorted(k for k in bundled if k.startswith("lora_unet_"))
    assert all(torch.equal(plain[k], bundled[k]) for k in plain)
    out = tmp_path / "both.png"
    run("sample.py", "--state", state, "--prompt", "a photo of a <alpha> and a <beta>", "-n", "2", "--steps", "3",
        "--out", str(out))
    assert Image.open(out).size == (32, 16)


def test_killed_during_training_leaves_state_unchanged(learned, tmp_path):
    state = str(tmp_path / "state")
    subprocess.run(["cp", "-r", learned["state"], state], check=True)
    before = digest(state)
    p = subprocess.Popen([sys.executable, "train.py", "--concept", learned["second"], "--state", state,
                          "--steps", "100000", "--no-preview"], cwd=ROOT, stderr=subprocess.PIPE)
    seen = read_stderr_until(p, "] train ")
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL and "] train " in seen, seen[-2000:]  # killed while training, not before
    p.stderr.close()
    assert digest(state) == before
    r = run("sample.py", "--state", state, "--prompt", "a photo of a <alpha>", "-n", "1", "--steps", "2",
            "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0
    r = run("train.py", "--concept", learned["second"], "--state", state, *FAST)  # the killed run's lock is gone
    assert "2 concepts" in r.stdout


def test_bad_inputs_one_line_error_state_unchanged(learned, tmp_path):
    state = learned["state"]
    before = digest(state)
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    write_concept(str(corrupt), 3)
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        (["--concept", str(tmp_path / "missing")], ["does not exist"]),
        (["--concept", str(empty)], ["has no images"]),
        (["--concept", str(corrupt)], ["broken.png"]),
        (["--concept", learned["second"], "--model", str(tmp_path)], ["not a diffusers model folder"]),
        (["--concept", learned["second"], "--name", "alpha"], ["already learned"]),
        (["--concept", learned["second"], "--method", "seq"], ["--method 'seq': this state's method is 'ewc-dc'"]),
        (["--concept", learned["second"], "--lr", "1e30", "--token-lr", "1e30", "--steps", "20"], ["non-finite loss"]),
        (["--concept", learned["second"], "--steps", "-5"], ["--steps -5"]),  # every flag: tests/test_state.py
    ]
    for extra, fragments in cases:
        r = run("train.py", "--state", state, *FAST, *extra, check=False)
        assert_one_line_error(r, *fragments)
    assert digest(state) == before


def test_state_from_another_model_is_refused(learned, tmp_path):
    from conftest import write_tiny_model
    other = write_tiny_model(str(tmp_path / "other"), seed=1)
    before = digest(learned["state"])
    r = run("train.py", "--state", learned["state"], "--model", other, "--concept", learned["second"], *FAST,
            check=False)
    assert_one_line_error(r, "another base model")
    assert digest(learned["state"]) == before


def test_non_image_files_are_skipped_with_a_note(learned, tmp_path):
    folder = tmp_path / "gamma"
    write_concept(str(folder), 4)
    (folder / "notes.txt").write_text("my dog")
    state = str(tmp_path / "state")
    r = run("train.py", "--concept", str(folder), "--state", state, "--model", learned["model"], *FAST)
    assert "skipped non-image file notes.txt" in r.stderr


def test_export_loads_in_diffusers(learned, tmp_path):
    """The exported LoRA (diffusers' file, and the kohya file without tokens) and token embedding, loaded by diffusers'
    own loaders, reproduce our conditioned UNet; the kohya file with the tokens bundled (A1111's) diffusers refuses,
    and the usage note sends diffusers to the other files."""
    import torch
    from diffusers import StableDiffusionPipeline

    import cp_state
    import lora
    export = tmp_path / "export"
    r = run("train.py", "--state", learned["state"], "--export", str(export))
    note = r.stdout.strip().splitlines()[-1]
    assert note.startswith("load: diffusers: pytorch_lora_weights.safetensors or lora_kohya.safetensors") and \
        "lora_kohya_with_tokens.safetensors alone (tokens bundled; diffusers refuses it)" in note
    ours, _ = cp_state.load_with_state(learned["state"])
    pipe = StableDiffusionPipeline.from_pretrained(learned["model"], local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(export / "alpha.safetensors"))
    prompt = "a photo of a <alpha>"
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        assert torch.allclose(context, ours.encode_text([prompt]), atol=1e-5)
        mine = ours.unet(x, t, ours.encode_text([prompt]))
        lora.set_enabled(ours.unet, "current", False)
        base = ours.unet(x, t, ours.encode_text([prompt]))
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(export / name))
        with torch.no_grad():
            theirs = pipe.unet(x, t, context).sample
        assert (theirs - mine).abs().max().item() < 1e-4 < (base - mine).abs().max().item(), name  # the LoRA mattered
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):  # its bundle_emb.* keys
        pipe.load_lora_weights(str(export / "lora_kohya_with_tokens.safetensors"))


def test_grids_log_and_previews(learned, tmp_path):
    """After the task: every learned concept and c0 drawn from fixed noise into grids/, every step's losses in
    log.jsonl; --sample-every draws the new concept during training; plain progress lines into a pipe."""
    state = str(tmp_path / "state")
    subprocess.run(["cp", "-r", learned["state"], state], check=True)
    flags = [f for f in FAST if f != "--no-preview"]
    r = run("train.py", "--concept", learned["second"], "--state", state, *flags, "--sample-every", "2")
    assert "\r" not in r.stderr and "[beta] train 3/3" in r.stderr
    grids = os.path.join(state, "grids")
    assert sorted(os.listdir(grids)) == ["after_002.png", "latest.png", "task_002_step_00002.png"]
    with open(os.path.join(grids, "after_002.png"), "rb") as a, open(os.path.join(grids, "latest.png"), "rb") as b:
        assert a.read() == b.read()
    grid = Image.open(os.path.join(grids, "after_002.png"))
    assert grid.height == 3 * 16 and grid.width > 4 * 16  # <alpha>, <beta>, "a photo"; four columns and labels
    assert Image.open(os.path.join(grids, "task_002_step_00002.png")).height == 16
    with open(os.path.join(state, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    assert [(s["concept"], s["phase"], s["step"]) for s in steps] == \
        [(c, "train", i) for c in ("alpha", "beta") for i in (1, 2, 3)]
    assert all(set(s) == {"task", "concept", "phase", "step", "denoise", "ewc"} for s in steps)
    with open(os.path.join(state, "manifest.json")) as f:
        assert steps[-1]["denoise"] == pytest.approx(json.load(f)["history"][-1]["train"]["denoise"])


def test_a_grid_that_cannot_be_written_is_a_warning(learned, tmp_path):
    """The state is saved before the pictures: a failed one (grids/ is a file here) warns and changes nothing."""
    state = str(tmp_path / "state")
    subprocess.run(["cp", "-r", learned["state"], state], check=True)
    with open(os.path.join(state, "grids"), "w") as f:
        f.write("in the way")
    flags = [f for f in FAST if f != "--no-preview"]
    r = run("train.py", "--concept", learned["second"], "--state", state, *flags, "--sample-every", "2")
    assert "2 concepts" in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.count("warning: ") == 2 and "task_002_step_00002.png was not written" in r.stderr
    with open(os.path.join(state, "log.jsonl")) as f:
        assert len(f.readlines()) == 6


def test_unsafe_names_are_refused_before_any_work(learned, tmp_path):
    state, before = learned["state"], digest(learned["state"])
    odd = tmp_path / "my dog"
    write_concept(str(odd), 5)
    for extra, fragment in ((["--concept", learned["second"], "--name", "../../x"], "'../../x'"),
                            (["--concept", learned["second"], "--name", "a/b"], "'a/b'"),
                            (["--concept", str(odd)], "give --name"),
                            (["--concept", learned["second"], "--name", ""], "'': use")):  # not the folder's name
        r = run("train.py", "--state", state, *FAST, *extra, check=False)
        assert_one_line_error(r, "concept name", fragment)
        assert "] train " not in r.stderr
    assert digest(state) == before and sorted(os.listdir(tmp_path)) == ["my dog"]


def test_export_refuses_a_name_that_cannot_be_a_file(learned, tmp_path):
    """A manifest edited to hold a name that is no file name is damaged: nothing is written outside the export
    folder."""
    state = str(tmp_path / "state")
    subprocess.run(["cp", "-r", learned["state"], state], check=True)
    path = os.path.join(state, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    m["concepts"][0]["name"] = "../../evil"
    with open(path, "w") as f:
        json.dump(m, f)
    r = run("train.py", "--state", state, "--export", str(tmp_path / "out" / "export"), check=False)
    assert_one_line_error(r, "manifest.json is damaged: concepts[0] must have a name of letters")
    assert sorted(os.listdir(tmp_path)) == ["state"]


def test_sample_warns_of_a_token_the_state_has_not_learned(learned, tmp_path):
    out = tmp_path / "typo.png"
    args = ("sample.py", "--state", learned["state"], "--prompt", "a photo of a <alpah>", "-n", "1", "--steps", "2",
            "--lora-scale", "0.5", "--out", str(out))
    r = run(*args)
    assert "warning: <alpah> not learned: this state has <alpha>" in r.stderr and out.exists()
    out.unlink()
    r = run(*args, "--strict", check=False)
    assert_one_line_error(r, "<alpah> not learned: this state has <alpha>")
    assert not out.exists()
    r = run("sample.py", "--state", learned["state"], "--prompt", "a photo of a <alpha>", "-n", "1", "--steps", "2",
            "--strict", "--out", str(out))
    assert "warning" not in r.stderr and out.exists()


def test_export_refuses_a_file_in_the_way_and_files_it_would_replace(learned, tmp_path):
    """--export DIR: a file where DIR would go is refused, and so are files in DIR the export would write, unless
    --overwrite; other files in DIR are left alone. With --concept, all of it before the model loads."""
    state, export = learned["state"], tmp_path / "export"
    before = digest(state)
    (tmp_path / "file").write_text("not a folder")
    for target in (tmp_path / "file", tmp_path / "file" / "sub"):
        r = run("train.py", "--state", state, "--export", str(target), check=False)
        assert_one_line_error(r, f"{tmp_path / 'file'} is a file, not a folder")
    export.mkdir()
    (export / "notes.txt").write_text("mine")
    run("train.py", "--state", state, "--export", str(export))
    written = {n: (export / n).read_bytes() for n in os.listdir(export)}
    (export / "alpha.safetensors").write_bytes(b"an older export")
    r = run("train.py", "--state", state, "--export", str(export), check=False)
    assert_one_line_error(r, "already holds pytorch_lora_weights.safetensors, lora_kohya.safetensors, "
                          "lora_kohya_with_tokens.safetensors, alpha.safetensors; give --overwrite to replace them")
    assert (export / "alpha.safetensors").read_bytes() == b"an older export"
    r = run("train.py", "--state", state, "--concept", learned["second"], *FAST, "--export", str(export), check=False)
    assert_one_line_error(r, "already holds", "give --overwrite")
    assert "settings (" not in r.stdout  # refused before the model loaded
    run("train.py", "--state", state, "--export", str(export), "--overwrite")
    assert {n: (export / n).read_bytes() for n in os.listdir(export)} == written
    assert (export / "notes.txt").read_text() == "mine" and digest(state) == before
    assert sorted(os.listdir(tmp_path)) == ["export", "file"]


def test_export_without_a_state_is_an_error_and_creates_nothing(learned, tmp_path):
    r = run("train.py", "--state", str(tmp_path / "typo"), "--export", str(tmp_path / "out"), check=False)
    assert_one_line_error(r, f"{tmp_path / 'typo'} holds no state")
    assert os.listdir(tmp_path) == []
