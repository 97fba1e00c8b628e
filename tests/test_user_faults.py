"""The faults a new user meets, each with the one line they get: the hands-on sweep of train.py and sample.py as a
test file to read from top to bottom.

Each case is what a user types (or what their disk does to them) and what they get back: one `error: ` line with
exit status 1 and no traceback, or the documented `note:` or `warning:` line; after a fault, the state's files are
exactly as they were (names and bytes, `digest`) and a new state leaves no folder. The runs are train.main and
sample.main in this process at tiny settings (a traceback would be an exception other than SystemExit here); two run
as a user does, in a subprocess, to see from outside what reaches the terminal. The last group is the runs that go
right. Other faults of the state folder (two writers, damaged files, every manifest field, every bad flag) are in
tests/test_state.py; other bad inputs of the command lines in tests/test_train_cli.py.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from PIL import Image

import cp
import cp_state
import lora
import sample
import train
import unet
from test_cp import fresh, write_concept
from test_loading import copy_model
from test_state import FAST_FLAGS, copy_state, exit_message, manifest, write_manifest, write_presets
from test_train_cli import ROOT, assert_one_line_error, digest


TINY = [*FAST_FLAGS, "--steps", "1", "--batch-size", "1"]  # the suite's fast flags, one image a step, one step


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """tests/test_state.py's `saved` at the cheapest method that trains a LoRA (seq): a state with concept alpha
    learned and saved, and the folders of concepts beta and gamma."""
    root = tmp_path_factory.mktemp("state")
    alpha, beta, gamma = (write_concept(str(root / n), i) for i, n in enumerate(["alpha", "beta", "gamma"]))
    model, state = fresh(tiny_model_dir, "seq", steps=1, batch_size=1)
    cp_state.save_state(train.learn_folder(model, state, alpha), str(root / "state"))
    return dict(state=str(root / "state"), beta=beta, gamma=gamma, model=tiny_model_dir)


def never(*args, **kwargs):
    raise AssertionError("this run should have stopped before getting here")


def full_disk(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def folder_bytes(folder):
    """{name: bytes} of every file in a folder, hidden ones and those in subfolders too."""
    return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(folder) for f in files}


# ---------------------------------------------------------------------------------------------------------------
# 1. A name that differs from a learned one only in case: CLIP's tokenizer lowercases, so <ALPHA> is <alpha>.


def test_a_name_that_differs_only_in_case_is_refused(saved, tmp_path, monkeypatch):
    state = copy_state(saved, tmp_path)
    before = digest(state)
    monkeypatch.setattr(cp, "train_task", never)
    message = exit_message(train.main, ["--concept", saved["beta"], "--name", "ALPHA", "--state", state, *TINY])
    assert message == "error: concept 'ALPHA': its token <ALPHA> reads as <alpha>, which this state has already " \
                      "learned (the tokenizer ignores case); pick another --name"
    assert digest(state) == before


def test_sample_reads_a_token_in_another_case_as_the_learned_one(saved, tmp_path, capsys):
    out = str(tmp_path / "out.png")
    sample.main(["--state", saved["state"], "--prompt", "a photo of a <ALPHA>", "-n", "1", "--steps", "1",
                 "--out", out])
    assert "warning" not in capsys.readouterr().err
    sample.main(["--state", saved["state"], "--prompt", "a photo of a <nothing>", "-n", "1", "--steps", "1",
                 "--out", out, "--overwrite"])
    assert "warning: <nothing> not learned: this state has <alpha>; the tokenizer reads it as plain text" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 2. One-off run settings do not stick. tests/test_state.py's test_a_one_off_flag_applies_to_its_own_run_only has
# the case, with the note of a state setting given (--ewc-lambda) that stays; what this adds: the plain run after a
# one-off --steps trains the presets' steps, not the last run's (presets that say 1 step, against --steps 2: cheap).


def test_a_plain_run_after_a_one_off_steps_trains_the_presets_steps(saved, tmp_path, monkeypatch):
    with open(train.PRESETS_FILE) as f:
        models = json.load(f)["models"]
    models["toy"].update(steps=1, batch_size=1)
    monkeypatch.setattr(train, "PRESETS_FILE", write_presets(tmp_path / "presets.json", models=models))
    state = copy_state(saved, tmp_path)
    train.main(["--concept", saved["beta"], "--state", state, "--no-preview", "--steps", "2"])
    train.main(["--concept", saved["gamma"], "--state", state, "--no-preview"])
    assert [h["run"]["steps"] for h in manifest(state)["history"]][1:] == [2, 1]


# ---------------------------------------------------------------------------------------------------------------
# 3. --grad-accum is checked against the batch size that will run, before the model loads: tests/test_state.py's
# test_grad_accum_is_checked_against_the_batch_that_will_run.


# ---------------------------------------------------------------------------------------------------------------
# 4. Faults that used to end in a traceback: a damaged base model folder, a state folder that cannot be written,
# a disk without room, a disk that fills up at the save or at the export.


def damaged_model(tiny_model_dir, tmp_path, damage):
    """A copy of the tiny model with one damage; returns (its folder, what the error line must name)."""
    folder = copy_model(tiny_model_dir, tmp_path)
    if damage == "unet/config.json":
        with open(os.path.join(folder, "unet", "config.json"), "w") as f:
            f.write('{"in_channels": 4,')
        return folder, f"{os.path.join(folder, 'unet', 'config.json')}: not valid JSON"
    shutil.rmtree(os.path.join(folder, damage))
    return folder, f"{folder}: no {damage}/ folder"


@pytest.mark.parametrize("damage", ["text_encoder", "scheduler", "unet/config.json"])
def test_a_damaged_model_folder_is_one_line_naming_what_is_wrong(saved, tiny_model_dir, tmp_path, damage):
    model, named = damaged_model(tiny_model_dir, tmp_path, damage)
    new, state, out = str(tmp_path / "new"), copy_state(saved, tmp_path), str(tmp_path / "out.png")
    before = digest(state)
    for folder in (new, state):
        message = exit_message(train.main, ["--concept", saved["beta"], "--state", folder, "--model", model,
                                            "--method", "seq", *TINY])
        assert message.startswith(f"error: {named}"), message
    assert not os.path.exists(new) and digest(state) == before
    assert exit_message(sample.main, ["--model", model, "--prompt", "a photo", "--out", out]).startswith(
        f"error: {named}")
    assert not os.path.exists(out)


def test_a_damaged_model_folder_from_the_command_line(saved, tiny_model_dir, tmp_path):
    model, named = damaged_model(tiny_model_dir, tmp_path, "text_encoder")
    r = subprocess.run([sys.executable, "train.py", "--concept", saved["beta"], "--state", str(tmp_path / "new"),
                        "--model", model, *TINY], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, named)
    assert not os.path.exists(tmp_path / "new")


def test_a_state_folder_that_cannot_be_written_is_one_line_before_training(saved, tmp_path, monkeypatch):
    """As root, chmod stops no write: the folder's write probe is made to fail as a read-only folder fails it."""
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
    state = copy_state(saved, tmp_path)
    before = digest(state)
    monkeypatch.setattr(cp_state.tempfile, "mkstemp", denied)
    monkeypatch.setattr(cp, "train_task", never)
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", state, *TINY])
    assert message == f"error: cannot write the state folder {state}: [Errno 13] Permission denied: '{state}'"
    assert digest(state) == before


def test_a_new_state_folder_that_cannot_be_written_leaves_no_folder(saved, tmp_path, monkeypatch):
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
    new = str(tmp_path / "runs" / "new")
    monkeypatch.setattr(cp_state.tempfile, "mkstemp", denied)
    monkeypatch.setattr(cp, "train_task", never)
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", new, "--method", "seq", *TINY])
    assert message.startswith(f"error: cannot write the state folder {new}: [Errno 13] Permission denied")
    assert os.listdir(tmp_path) == []


def test_a_disk_without_room_for_the_save_is_one_line_before_training(saved, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cp_state.shutil, "disk_usage", lambda path: usage._replace(free=100 << 10))
    monkeypatch.setattr(cp, "train_task", never)
    state = copy_state(saved, tmp_path)
    before = digest(state)
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", state, *TINY])
    assert message.startswith(f"error: the disk of {state} has 0.1 MiB free; the state's next save needs about ")
    assert message.endswith(" MiB: free some space first")
    assert digest(state) == before


def test_a_disk_that_fills_up_at_the_save_leaves_the_previous_state(saved, tmp_path, monkeypatch):
    """The first file of the save is written, the next ones find the disk full."""
    state = copy_state(saved, tmp_path)
    before, write, written = digest(state), lora.write_safetensors, []

    def write_until_full(tensors, path, metadata=None):
        if os.path.dirname(os.path.abspath(path)) in (state, os.path.join(state, "pool")):
            if written:
                raise full_disk(path)
            written.append(path)
        write(tensors, path, metadata)
    monkeypatch.setattr(lora, "write_safetensors", write_until_full)
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", state, *TINY])
    assert message.startswith(f"error: cannot save the state to {state}: [Errno 28] No space left on device: ")
    assert message.endswith("; the previous state is unchanged") and written
    assert digest(state) == before
    _, loaded = cp_state.load_with_state(state)  # the model loads with it too
    assert [c["name"] for c in loaded.concepts] == ["alpha"]


def test_a_disk_that_fills_up_at_the_export_leaves_the_export_folder_as_it_was(saved, tmp_path, monkeypatch):
    """An earlier export, changed since, and a file of the user's: --overwrite would replace the export's files,
    but the disk fills up at the token file, after the LoRA files were written."""
    state, export = copy_state(saved, tmp_path), tmp_path / "export"
    export.mkdir()
    (export / "pytorch_lora_weights.safetensors").write_bytes(b"an older export")
    (export / "notes.txt").write_text("mine")
    before, write = folder_bytes(export), lora.write_safetensors

    def full_at_the_tokens(tensors, path, metadata=None):
        if os.path.basename(path) == "alpha.safetensors":
            raise full_disk(path)
        write(tensors, path, metadata)
    monkeypatch.setattr(lora, "write_safetensors", full_at_the_tokens)
    message = exit_message(train.main, ["--state", state, "--export", str(export), "--overwrite"])
    assert message.startswith(f"error: cannot write the export to {export}: [Errno 28] No space left on device: ")
    assert message.endswith("; nothing was exported")
    assert folder_bytes(export) == before and sorted(os.listdir(export)) == sorted(before)  # no .export-* left


# ---------------------------------------------------------------------------------------------------------------
# 5. A concept named as an export's adapter file would overwrite it with its token file: refused when it is learned.


@pytest.mark.parametrize("name", ["lora_kohya", "pytorch_lora_weights"])
def test_a_name_an_export_writes_for_its_adapter_is_refused_at_training(saved, tmp_path, monkeypatch, name):
    monkeypatch.setattr(unet, "load_model", never)
    state = copy_state(saved, tmp_path)
    before = digest(state)
    message = exit_message(train.main, ["--concept", saved["beta"], "--name", name, "--state", state, *TINY])
    assert message == f"error: concept name {name!r}: an export writes {name}.safetensors for its own adapter; " \
                      "pick another --name"
    folder = write_concept(str(tmp_path / name), 0, n=1)  # the folder's name, no --name
    message = exit_message(train.main, ["--concept", folder, "--state", state, *TINY])
    assert message.startswith(f"error: concept name {name!r}: ") and message.endswith("pick another name with --name")
    assert digest(state) == before


# ---------------------------------------------------------------------------------------------------------------
# 6. Smaller ones: a file for a folder, images too large or too small, a typo of --steps, what -h says, an export
# into the state, a base model that moved.


def test_a_file_given_as_the_concept_folder(tmp_path):
    photo = tmp_path / "dog.png"
    Image.new("RGB", (20, 20)).save(photo)
    message = exit_message(train.main, ["--concept", str(photo), "--state", str(tmp_path / "new")])
    assert message == f"error: concept folder {photo} is a file, not a folder of images"
    assert sorted(os.listdir(tmp_path)) == ["dog.png"]


def test_an_image_past_pillows_pixel_limit_is_a_note_not_a_warning(tmp_path, monkeypatch, capsys):
    folder = write_concept(str(tmp_path / "big"), 0, n=1)  # 20 × 24 = 480 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # past it but not twice past it: Pillow warns and reads it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, _, _ = train.read_concept(folder, 16)
    assert images.shape == (1, 3, 16, 16)
    err = capsys.readouterr().err
    assert err.startswith("note: 0.png is ") and err.endswith(" megapixels: read whole, then brought down to 16×16\n")
    assert err.count("\n") == 1 and not [w for w in caught if w.category is Image.DecompressionBombWarning]


def test_from_the_command_line_a_large_image_is_a_note_and_no_raw_warning(saved, tmp_path):
    """The same as a user sees it (Pillow's limit lowered in the child), on a concept named <ALPHA>: refused after
    its images are read, so no training is paid for."""
    folder = write_concept(str(tmp_path / "big"), 0, n=1)
    state = copy_state(saved, tmp_path)
    child = "import sys; from PIL import Image; import train; Image.MAX_IMAGE_PIXELS = 300; train.main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", child, "--concept", folder, "--name", "ALPHA", "--state", state,
                        *TINY], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "its token <ALPHA> reads as <alpha>")
    assert "note: 0.png is " in r.stderr and "DecompressionBombWarning" not in r.stderr


def test_an_image_smaller_than_the_model_is_upscaled_with_a_note(tmp_path, capsys):
    folder = write_concept(str(tmp_path / "small"), 0, n=1, size=(8, 8))
    train.read_concept(folder, 16)
    assert capsys.readouterr().err == "note: 0.png is 8×8, smaller than the model's 16×16: upscaled, so blurred\n"


def test_steps_with_extra_zeros_are_refused_before_any_work(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(unet, "load_model", never)
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", str(tmp_path / "new"),
                                        "--steps", "1000000000"])
    assert message == f"error: --steps 1000000000: must be at most {cp.MAX_STEPS:,}"
    assert os.listdir(tmp_path) == []


def test_help_names_no_tuning_command_line_nor_scores(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["-h"])
    assert e.value.code == 0
    epilog = capsys.readouterr().out.split("\nDefaults: ", 1)[1]
    with open(train.PRESETS_FILE) as f:
        source = json.load(f)["source"]  # how bench/tune.py was run and what it scored: for presets.json's readers
    assert "python bench/tune.py" not in epilog and "--jobs" not in epilog and "mean A" not in epilog
    assert source not in " ".join(epilog.split())
    assert "method presets:" in epilog  # the values themselves are there


def test_an_export_into_the_state_folder_is_refused(saved, tmp_path, monkeypatch):
    state = copy_state(saved, tmp_path)
    before = digest(state)
    for target in (state, os.path.join(state, "export"), os.path.join(state, "pool")):
        message = exit_message(train.main, ["--state", state, "--export", target])
        assert message == f"error: --export {target}: that is the state folder {state} or inside it; export to a " \
                          "folder of its own"
    monkeypatch.setattr(unet, "load_model", never)
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", state, *TINY,
                                        "--export", os.path.join(state, "export")])
    assert "that is the state folder" in message
    assert digest(state) == before and not os.path.exists(os.path.join(state, "export"))


def test_a_base_model_that_moved(saved, tiny_model_dir, tmp_path):
    """The state made with a copy of the model at `old` (the same weights: the fingerprint the state holds), which the
    user then moves."""
    old, new, state = copy_model(tiny_model_dir, tmp_path), str(tmp_path / "moved"), copy_state(saved, tmp_path)
    m = manifest(state)
    m["model"]["path"] = old
    write_manifest(state, m)
    os.rename(old, new)
    before = digest(state)
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", state, *TINY])
    assert message == f"error: {old}: no such model folder or checkpoint file (the base model this state was made " \
                      "with: if it moved, give its new place with --model)"
    assert digest(state) == before
    train.main(["--concept", saved["beta"], "--state", state, "--model", new, *TINY])
    m = manifest(state)
    assert m["model"]["path"] == new and [c["name"] for c in m["concepts"]] == ["alpha", "beta"]


# ---------------------------------------------------------------------------------------------------------------
# Good ones: a first concept and a second on one state, each with its learned line, and an export listing its files.


def test_a_first_and_a_second_concept_then_an_export(saved, tiny_model_dir, tmp_path, capsys):
    state, export = str(tmp_path / "state"), str(tmp_path / "export")
    train.main(["--concept", saved["beta"], "--state", state, "--model", tiny_model_dir, "--method", "seq", *TINY])
    out = capsys.readouterr().out
    assert "\nlearned <beta> in " in out and out.rstrip().endswith(f"; state saved to {state} (1 concept)")
    train.main(["--concept", saved["gamma"], "--state", state, *TINY])
    out = capsys.readouterr().out
    assert "\nlearned <gamma> in " in out and out.rstrip().endswith(f"; state saved to {state} (2 concepts)")
    train.main(["--state", state, "--export", export])
    files = ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "lora_kohya_with_tokens.safetensors",
             "beta.safetensors", "gamma.safetensors"]
    assert capsys.readouterr().out.startswith(f"exported to {export}: {', '.join(files)}\nload: ")
    assert sorted(os.listdir(export)) == sorted(files)
