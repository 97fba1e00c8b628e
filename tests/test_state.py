"""The state directory under faults: two writers, a killed save, damaged files, failed writes, foreign files, bad
flags. Each case ends in a one-line error (or in success) and loses nothing that was saved."""
import copy
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import cp
import cp_state
import lora
import sample
import train
import unet
from test_cp import FAST, fresh, write_concept
from test_train_cli import ROOT, assert_one_line_error, digest

FAST_FLAGS = ["--steps", "3", "--batch-size", "2", "--fisher-samples", "2", "--dsc-steps", "2", "--no-preview"]


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A state (ewc-dc) with concept alpha learned and saved, and the folders of concepts beta and gamma."""
    root = tmp_path_factory.mktemp("state")
    alpha, beta, gamma = (write_concept(str(root / n), i) for i, n in enumerate(["alpha", "beta", "gamma"]))
    model, state = fresh(tiny_model_dir, "ewc-dc")
    cp_state.save_state(train.learn_folder(model, state, alpha), str(root / "state"))
    return dict(state=str(root / "state"), alpha=alpha, beta=beta, gamma=gamma, model=tiny_model_dir)


def copy_state(saved, tmp_path):
    folder = str(tmp_path / "state")
    shutil.copytree(saved["state"], folder)
    return folder


def continue_state(folder, tiny_model_dir, concept, **hparams):
    """Load a state into a fresh model and learn one more concept (not saved), at the fast run settings."""
    model, state = unet.load_model(tiny_model_dir), cp_state.load_state(folder)
    state.hparams = dataclasses.replace(state.hparams, **{**FAST, **hparams})
    cp.apply_state(model, state)
    return train.learn_folder(model, state, concept)


def manifest(folder):
    with open(os.path.join(folder, cp_state.MANIFEST)) as f:
        return json.load(f)


def exit_message(main, argv):
    """Run a CLI's main in this process; the message it exits with must be one `error: ` line (exit status 1)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), e.value.code
    assert e.value.code.startswith("error: ") and "\n" not in e.value.code, e.value.code
    return e.value.code


def samples(folder):
    model, _ = cp_state.load_with_state(folder)
    lora.merge(model.unet)
    return sample.sample(model, ["a photo of a <alpha>"], steps=2, guidance=5.0, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# two writers


def test_two_runs_on_one_state_one_wins(saved, tmp_path):
    """Both start at once; the one that takes the lock trains and saves, the other stops before training."""
    state = copy_state(saved, tmp_path)
    runs = [subprocess.Popen([sys.executable, "train.py", "--concept", saved[c], "--state", state, *FAST_FLAGS,
                              "--steps", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in ("beta", "gamma")]
    outs = [p.communicate(timeout=600) for p in runs]
    assert sorted(p.returncode for p in runs) == [0, 1], [o[1][-1000:] for o in outs]
    won = [p.returncode for p in runs].index(0)
    winner, (lost_out, lost_err) = runs[won], outs[1 - won]
    assert "state saved to" in outs[won][0]
    assert "Traceback" not in lost_err and "] train " not in lost_err and "state saved" not in lost_out
    assert lost_err.strip().splitlines()[-1] == \
        f"error: state {state} is in use by process {winner.pid} (one run at a time writes a state)"
    assert [c["name"] for c in manifest(state)["concepts"]] == ["alpha", ["beta", "gamma"][won]]


def test_save_refuses_a_manifest_changed_since_load(saved, tiny_model_dir, tmp_path):
    """Without the lock (two processes through the API), the second save would drop the first one's concept."""
    state = copy_state(saved, tmp_path)
    first = continue_state(state, tiny_model_dir, saved["beta"])
    second = continue_state(state, tiny_model_dir, saved["gamma"])
    cp_state.save_state(first, state)
    before = digest(state)
    with pytest.raises(cp.CPError, match="changed since this run loaded it"):
        cp_state.save_state(second, state)
    assert digest(state) == before
    assert [c["name"] for c in cp_state.load_state(state).concepts] == ["alpha", "beta"]


def test_reader_sees_a_whole_state_during_a_save(saved, tiny_model_dir, tmp_path, monkeypatch):
    """A save that commits while a reader reads (and removes the files of the manifest it read): it reads again."""
    state = copy_state(saved, tmp_path)
    newer = continue_state(state, tiny_model_dir, saved["beta"])
    read_file, committed = cp_state.load_file, []

    def commit_then_read(path):
        if not committed:
            committed.append(cp_state.save_state(newer, state))
        return read_file(path)
    monkeypatch.setattr(cp_state, "load_file", commit_then_read)
    assert [c["name"] for c in cp_state.load_state(state).concepts] == ["alpha", "beta"] and committed


KILLED_SAVE = """
import os, signal, sys
import cp, cp_state, train, unet
folder, concept, model_dir = sys.argv[1:]
model, state = unet.load_model(model_dir), cp_state.load_state(folder)
state.hparams.lr *= 3  # this attempt's LoRA differs from the next one's
state.hparams.steps, state.hparams.batch_size = 3, 2  # run settings, which a state does not store
cp.apply_state(model, state)
state = train.learn_folder(model, state, concept)
write = cp_state._write_file
def write_until_manifest(path, what):
    if os.path.basename(path).startswith(cp_state.MANIFEST):
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, what)
cp_state._write_file = write_until_manifest
cp_state.save_state(state, folder)
"""


def test_save_killed_before_the_manifest_is_never_reused(saved, tiny_model_dir, tmp_path):
    """C-LoRA keeps a task's LoRA only in the pool: a killed save's pool file must not stand in for the next."""
    folder, alpha = str(tmp_path / "state"), write_concept(str(tmp_path / "alpha"), 0)
    model, state = fresh(tiny_model_dir, "clora")
    cp_state.save_state(train.learn_folder(model, state, alpha), folder)
    r = subprocess.run([sys.executable, "-c", KILLED_SAVE, folder, saved["beta"], tiny_model_dir], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    aborted = [f"pool/{f}" for f in os.listdir(os.path.join(folder, "pool"))
               if f"pool/{f}" not in manifest(folder)["files"]["pool"]]
    assert len(aborted) == 1 and [c["name"] for c in cp_state.load_state(folder).concepts] == ["alpha"]
    again = continue_state(folder, tiny_model_dir, saved["beta"])
    cp_state.save_state(again, folder)
    kept = cp_state.load_state(folder).pool[-1]
    left = {p: (A, B) for p, (A, B, _) in lora.read_lora_file(os.path.join(folder, aborted[0])).items()}
    same = lambda x, y: all(torch.equal(x[p][i], y[p][i]) for p in x for i in (0, 1))
    assert same(kept, again.pool[-1]) and not same(left, again.pool[-1])


# ---------------------------------------------------------------------------------------------------------------
# damaged files


def truncate(folder, m):
    path = os.path.join(folder, m["files"]["lora"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return m["files"]["lora"]


def remove(folder, m):
    os.remove(os.path.join(folder, m["files"]["tokens"]))
    return m["files"]["tokens"]


def reshape(folder, m):
    """One LoRA A with an extra input column: a valid file with its sum, and the right rank, but not for this model."""
    path = os.path.join(folder, m["files"]["lora"])
    w = {p: (A, B) for p, (A, B, _) in lora.read_lora_file(path).items()}
    p = sorted(w)[0]
    w[p] = (torch.cat([w[p][0], w[p][0][:, :1]], 1), w[p][1])
    lora.write_lora_file(w, {k: m["hparams"]["alpha"] for k in w}, path)
    m["sums"][m["files"]["lora"]] = cp_state._sha256(path)
    with open(os.path.join(folder, cp_state.MANIFEST), "w") as f:
        json.dump(m, f)
    return m["files"]["lora"]


def not_json(folder, m):
    with open(os.path.join(folder, cp_state.MANIFEST), "w") as f:
        f.write('{"format": "cp-state/4", "files": ')
    return cp_state.MANIFEST


@pytest.mark.parametrize("damage", [truncate, remove, reshape, not_json])
def test_damaged_state_is_a_one_line_error(saved, tmp_path, damage):
    state = copy_state(saved, tmp_path)
    name = damage(state, manifest(state))
    before = digest(state)
    out, export = tmp_path / "out.png", tmp_path / "export"
    for main, argv in [(train.main, ["--concept", saved["beta"], "--state", state, *FAST_FLAGS]),
                       (sample.main, ["--state", state, "--prompt", "a photo of a <alpha>", "--out", str(out)]),
                       (train.main, ["--state", state, "--export", str(export)])]:
        assert name in exit_message(main, argv)
        assert digest(state) == before and not out.exists() and not export.exists()


def test_damaged_state_from_the_command_line(saved, tmp_path):
    """The same, seen from outside: exit status 1, one line, no traceback."""
    state = copy_state(saved, tmp_path)
    name = truncate(state, manifest(state))
    r = subprocess.run([sys.executable, "sample.py", "--state", state, "--prompt", "a photo of a <alpha>"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, name, "is damaged")


# ---------------------------------------------------------------------------------------------------------------
# nothing is silently misread: every file's SHA-256, the format, every manifest field


def write_manifest(folder, m):
    with open(os.path.join(folder, cp_state.MANIFEST), "w") as f:
        json.dump(m, f, indent=1)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def flip(path, part):
    """Flip one bit in the middle of a safetensors file's JSON header or of its tensor data."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        header = 8 + int.from_bytes(data[:8], "little")
        at = 8 + (header - 8) // 2 if part == "header" else header + (len(data) - header) // 2
        data[at] ^= 0x10
        f.seek(0)
        f.write(data)


def test_every_file_has_its_sha256_in_the_manifest(saved, tiny_model_dir, tmp_path, monkeypatch):
    """Written with each file; a kept pool entry keeps its sum (it is not hashed anew: carried from the old
    manifest); a new file gets its own."""
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    assert m["format"] == "cp-state/4" and list(m["sums"]) == cp_state._named(m["files"])
    assert all(m["sums"][n] == sha256(os.path.join(state, n)) for n in m["sums"])
    newer, hashed, sha = continue_state(state, tiny_model_dir, saved["beta"]), [], cp_state._sha256
    monkeypatch.setattr(cp_state, "_sha256", lambda path: hashed.append(os.path.relpath(path, state)) or sha(path))
    cp_state.save_state(newer, state)
    new = manifest(state)
    assert new["files"]["pool"][0] == m["files"]["pool"][0] and new["sums"][m["files"]["pool"][0]] == \
        m["sums"][m["files"]["pool"][0]]
    assert sorted(hashed) == sorted(set(cp_state._named(new["files"])) - {m["files"]["pool"][0]})
    assert all(new["sums"][n] == sha256(os.path.join(state, n)) for n in cp_state._named(new["files"]))


@pytest.mark.parametrize("role, part", [("tokens", "data"), ("ewc", "data"), ("lora", "data"), ("pool", "data"),
                                        ("pool", "header")])
def test_a_flipped_byte_is_refused_naming_the_file(saved, tmp_path, role, part):
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    name = m["files"]["pool"][0] if role == "pool" else m["files"][role]
    flip(os.path.join(state, name), part)
    before = digest(state)
    with pytest.raises(cp.CPError) as e:
        cp_state.load_state(state)
    assert str(e.value) == f"state file {os.path.join(state, name)} is damaged: its bytes do not have the SHA-256 " \
                           "that manifest.json records"
    message = exit_message(sample.main, ["--state", state, "--prompt", "a photo", "--out", str(tmp_path / "o.png")])
    assert name in message and "is damaged" in message and "SHA-256" in message
    assert digest(state) == before and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("old", ["cp-state/1", "cp-state/2", "cp-state/3"])
def test_a_state_of_an_older_format_is_refused_naming_the_commit_that_reads_it(saved, tmp_path, old):
    """The formats before cp-state/4 held other hparams (the run settings, switches since removed): refused in one
    line that names the last commit of cp that reads them, the state untouched."""
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    m["format"] = old
    write_manifest(state, m)
    before = digest(state)
    line = f"{os.path.join(state, 'manifest.json')} has state format {old!r}; this version of cp reads cp-state/4 " \
           f"only (commit {cp_state.LAST_READER} of cp reads it: check it out to sample or continue this state)"
    with pytest.raises(cp.CPError) as e:
        cp_state.load_state(state)
    assert str(e.value) == line
    assert exit_message(train.main, ["--concept", saved["beta"], "--state", state, *FAST_FLAGS]) == f"error: {line}"
    assert exit_message(sample.main, ["--state", state, "--prompt", "a photo"]) == f"error: {line}"
    assert digest(state) == before


@pytest.mark.parametrize("found", [999, "cp-state/5", "nonsense", None, "missing"])
def test_a_manifest_of_an_unknown_format_is_refused(saved, tmp_path, found):
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    if found == "missing":
        del m["format"]
    else:
        m["format"] = found
    write_manifest(state, m)
    before = digest(state)
    shown = None if found == "missing" else found
    line = f"{os.path.join(state, 'manifest.json')} has state format {shown!r}; this version of cp reads " \
           "cp-state/4 only"
    with pytest.raises(cp.CPError) as e:
        cp_state.load_state(state)
    assert str(e.value) == line
    assert exit_message(train.main, ["--concept", saved["beta"], "--state", state, *FAST_FLAGS]) == f"error: {line}"
    assert digest(state) == before


def set_field(path, value):
    """change(m): the manifest with the field at `path` ("a.b.0.c", or a tuple of keys) set to `value` (DELETE:
    removed)."""
    def change(m):
        keys = path if isinstance(path, tuple) else path.split(".")
        *parents, last = [int(k) if k.isdigit() else k for k in keys]
        for k in parents:
            m = m[k]
        if value is DELETE:
            del m[last]
        else:
            m[last] = value
    return change


DELETE = object()
FIELD_CASES = [  # (field, value, the message after "manifest.json is damaged: ")
    ("history", 7, "history must be a list, got int"),
    ("history", [7], "history[0] must be an object, got int"),
    ("history", [], "history must hold one entry per concept (1), got 0"),
    ("concepts", {}, "concepts must be a list, got dict"),
    ("concepts.0.name", 3, "concepts[0].name must be a string, got int"),
    ("concepts.0.token", None, "concepts[0].token must be a string, got null"),
    ("concepts.0.prompt", ["a photo"], "concepts[0].prompt must be a string, got list"),
    ("concepts.0.class_word", 1.5, "concepts[0].class_word must be a string or null, got float"),
    ("concepts.0.task", "0", "concepts[0].task must be an integer, got str"),
    ("concepts.0.task", False, "concepts[0].task must be an integer, got bool"),
    ("concepts.0.task", 5, "concepts[0].task must be 0, the concept's place"),
    ("concepts.0.extra", 1, "concepts[0] has an unknown key 'extra'"),
    ("concepts.0.prompt", DELETE, "concepts[0] lacks 'prompt'"),
    ("model", "toy/model", "model must be an object, got str"),
    ("model.fingerprint", DELETE, "model lacks 'fingerprint'"),
    ("model.path", 0, "model.path must be a string, got int"),
    ("method", None, "method must be a string, got null"),
    ("method", "seq", "method 'seq' is not hparams.method 'ewc-dc'"),
    ("files", [], "files must be an object, got list"),
    ("files.pool", "pool", "files.pool must be a list, got str"),
    ("files.lora", 1, "files.lora must be a string or null, got int"),
    ("files.tokens", "../x", "files.tokens must be tokens_001_<id>.safetensors, got '../x'"),
    ("files.ewc", "/etc/passwd", "files.ewc must be ewc_001_<id>.safetensors, got '/etc/passwd'"),
    ("files.pool.0", "pool/../../x.safetensors", "files.pool[0] must be pool/task_000_<id>.safetensors, got "
                                                 "'pool/../../x.safetensors'"),
    ("files.lora", None, "files do not fit 1 concepts of method ewc-dc"),
    ("files.tokens", "tokens_001.safetensors", "files.tokens must be tokens_001_<id>.safetensors"),
    ("hparams", [], "hparams must be an object, got list"),
    ("hparams.ewc_lambda", "fast", "hparams.ewc_lambda must be a number, got str"),
    ("hparams.steps", 600, "hparams has an unknown key 'steps'"),
    ("hparams.rank", 8.0, "hparams.rank must be an integer, got float"),
    ("hparams.dc_temp", None, "hparams.dc_temp must be a number, got null"),
    ("hparams.dc_temp", "auto", "hparams.dc_temp must be a number, got str"),
    ("hparams.alpha", -1, "hparams: --alpha -1: must be a finite number > 0"),
    ("hparams.targets", "qkv", "hparams: --targets 'qkv': must be"),
    ("hparams.ewc_lamda", 1.0, "hparams has an unknown key 'ewc_lamda'"),
    ("hparams.seed", DELETE, "hparams lacks 'seed'"),
    ("extra", {}, "the manifest has an unknown key 'extra'"),
    ("sums", DELETE, "the manifest lacks 'sums'"),
    ("sums", "0" * 64, "sums must be an object, got str"),
    (("sums", "pool/x.safetensors"), "0" * 64, "sums must hold the SHA-256 of each file of files, and no other"),
]


FIELD_IDS = [f"{'.'.join(c[0]) if isinstance(c[0], tuple) else c[0]}={c[1]!r}"[:40] for c in FIELD_CASES]


@pytest.mark.parametrize("field, value, expected", FIELD_CASES, ids=FIELD_IDS)
def test_every_manifest_field_is_checked(saved, tmp_path, field, value, expected):
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    set_field(field, value)(m)
    write_manifest(state, m)
    before = digest(state)
    with pytest.raises(cp.CPError) as e:
        cp_state.load_state(state)
    assert str(e.value).startswith(f"{os.path.join(state, 'manifest.json')} is damaged: {expected}"), str(e.value)
    assert "\n" not in str(e.value) and digest(state) == before


def test_a_manifest_field_from_the_command_line(saved, tmp_path):
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    m["history"] = 7
    write_manifest(state, m)
    r = subprocess.run([sys.executable, "sample.py", "--state", state, "--prompt", "a photo"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "manifest.json is damaged: history must be a list, got int")


def test_values_the_files_contradict_are_refused(saved, tmp_path):
    """Fields of the right type that the files say otherwise of: an alpha that would rescale every update, a sum
    that is not a SHA-256, a manifest the files do not fit."""
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    for field, value, expected in [
            ("hparams.alpha", 4.0, f"state file {os.path.join(state, m['files']['lora'])} is damaged: it holds LoRA "
                                   "alpha [8.0]; the manifest's hparams.alpha is 4.0"),
            (("sums", m["files"]["tokens"]), "abc", "manifest.json is damaged: sums must be SHA-256 digests"),
            (("sums", m["files"]["tokens"]), "0" * 64, "is damaged: its bytes do not have the SHA-256"),
            ("hparams.rank", 4, "the model needs")]:
        changed = copy.deepcopy(m)
        set_field(field, value)(changed)
        write_manifest(state, changed)
        with pytest.raises(cp.CPError, match=re.escape(expected)):
            cp_state.load_with_state(state)
    write_manifest(state, m)
    cp_state.load_with_state(state)


@pytest.mark.parametrize("what", ["file link", "pool link", "folder", "manifest link"])
def test_a_link_or_a_folder_in_place_of_a_file_is_refused(saved, tmp_path, what):
    """Even a link to a copy of the very same bytes: what the state holds is its own files."""
    state = copy_state(saved, tmp_path)
    m = manifest(state)
    outside = tmp_path / "outside"
    shutil.copytree(state, outside)
    name = {"file link": m["files"]["lora"], "pool link": m["files"]["pool"][0], "folder": m["files"]["tokens"],
            "manifest link": cp_state.MANIFEST}[what]
    path = os.path.join(state, name)
    if what == "pool link":
        shutil.rmtree(os.path.join(state, "pool"))
        os.symlink(outside / "pool", os.path.join(state, "pool"))
    elif what == "folder":
        os.remove(path)
        os.mkdir(path)
    else:
        os.remove(path)
        os.symlink(outside / name, path)
    with pytest.raises(cp.CPError) as e:
        cp_state.load_state(state)
    assert path in str(e.value) and "is damaged" in str(e.value) and "link" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# failed writes


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_write_leaves_the_previous_state(saved, tiny_model_dir, tmp_path, monkeypatch, code):
    """The write of each file of a save fails in turn, half-written: the previous state loads and samples as before,
    and nothing of the attempt is left behind."""
    state = copy_state(saved, tmp_path)
    newer = continue_state(state, tiny_model_dir, saved["beta"])
    before, reference = digest(state), samples(state)
    write, calls = cp_state._write_file, []

    def failing_write(path, what):
        calls.append(path)
        if len(calls) == fail_at:
            with open(path, "wb") as f:
                f.write(b"\0" * 8)
            raise OSError(code, os.strerror(code), path)
        write(path, what)
    monkeypatch.setattr(cp_state, "_write_file", failing_write)
    for fail_at in range(1, 6):  # tokens, ewc, lora, the new pool entry, the manifest
        calls.clear()
        with pytest.raises(cp.CPError, match=os.strerror(code)) as e:
            cp_state.save_state(newer, state)
        assert "\n" not in str(e.value) and "previous state is unchanged" in str(e.value)
        assert digest(state) == before and torch.equal(samples(state), reference), f"write {fail_at} failed"
    fail_at = 0
    calls.clear()
    cp_state.save_state(newer, state)
    assert len(calls) == 5 and [c["name"] for c in cp_state.load_state(state).concepts] == ["alpha", "beta"]


# ---------------------------------------------------------------------------------------------------------------
# what the state folder owns


def test_state_folder_owns_only_its_files(saved, tiny_model_dir, tmp_path):
    state = copy_state(saved, tmp_path)
    for name in ("holiday.jpg", "pool/notes.txt"):
        with open(os.path.join(state, name), "w") as f:
            f.write("not the state's")
    old = set(cp_state._named(manifest(state)["files"]))
    cp_state.save_state(continue_state(state, tiny_model_dir, saved["beta"]), state)
    new = set(cp_state._named(manifest(state)["files"]))
    on_disk = {os.path.relpath(os.path.join(r, f), state) for r, _, fs in os.walk(state) for f in fs}
    assert on_disk == new | {cp_state.MANIFEST, "holiday.jpg", "pool/notes.txt"}  # the replaced files only are gone
    assert old - new and len(old & new) == 1  # the first pool entry is kept as it was written

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    assert "it is not a state" in exit_message(train.main, ["--concept", saved["beta"], "--state", str(thesis),
                                                            *FAST_FLAGS])
    model, state = fresh(tiny_model_dir, "seq")
    with pytest.raises(cp.CPError, match="it is not a state"):
        cp_state.save_state(state, str(thesis))
    assert os.listdir(thesis) == ["thesis.tex"]


NO_FCNTL = """
import fcntl, os, sys, types
import cp, dc_score, lora, unet  # cp_state's imports first: others take a module named msvcrt for Windows itself
lockf, fcntl_module = fcntl.lockf, fcntl
sys.modules["fcntl"] = None  # as on Windows: msvcrt instead, here a stand-in on POSIX record locks
msvcrt = sys.modules["msvcrt"] = types.ModuleType("msvcrt")
msvcrt.LK_NBLCK = 2
def locking(fd, mode, n):  # like msvcrt.locking: n bytes from the file position, OSError when another holds them
    assert mode == msvcrt.LK_NBLCK
    lockf(fd, fcntl_module.LOCK_EX | fcntl_module.LOCK_NB, n, os.lseek(fd, 0, os.SEEK_CUR))
msvcrt.locking = locking
import cp_state
assert cp_state.fcntl is None
try:
    lock = cp_state.lock_state(sys.argv[1])
except cp.CPError as e:
    sys.exit(f"error: {e}")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin
"""


def test_lock_without_fcntl(tmp_path):
    """Where fcntl is missing (Windows), msvcrt's lock keeps a second writer out and names the first."""
    state = str(tmp_path / "state")
    first = subprocess.Popen([sys.executable, "-c", NO_FCNTL, state], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline() == "locked\n"
    second = subprocess.run([sys.executable, "-c", NO_FCNTL, state], cwd=ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert second.returncode == 1 and second.stderr.strip() == \
        f"error: state {state} is in use by process {first.pid} (one run at a time writes a state)"
    first.communicate("", timeout=60)
    third = subprocess.run([sys.executable, "-c", NO_FCNTL, state], cwd=ROOT, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=300)
    assert third.returncode == 0 and third.stdout == "locked\n", third.stderr


def test_log_and_grids_belong_beside_a_state(tmp_path):
    """A folder holding only what train.py writes beside a state (a first run killed after them) is still a state's."""
    folder = tmp_path / "state"
    (folder / cp_state.GRIDS).mkdir(parents=True)
    (folder / cp_state.LOG).write_text("")
    assert cp_state.read_manifest(str(folder)) is None
    cp_state.lock_state(str(folder)).close()


# ---------------------------------------------------------------------------------------------------------------
# flags and images


BAD_FLAGS = [["--steps", "-5"], ["--steps", "0"], ["--batch-size", "0"], ["--rank", "0"], ["--fisher-samples", "0"],
             ["--dsc-steps", "-1"], ["--dc-batch", "-1"], ["--dc-k", "1"], ["--seed", "-1"], ["--lr", "nan"],
             ["--lr", "0"], ["--token-lr", "inf"], ["--alpha", "-1"], ["--dc-temp", "0"], ["--ewc-lambda", "-1"],
             ["--dc-weight", "nan"], ["--clora-lambda", "inf"], ["--dsc-w-h", "-1"], ["--dsc-w-n", "nan"],
             ["--ewc-gamma", "1.5"], ["--dc-temp", "warm"], ["--dc-temp", "auto"],
             ["--steps", "1.5"], ["--steps", "1000000000"], ["--dsc-steps", "10000000"], ["--targets", "qkv"],
             ["--method", "lora"],
             ["--precision", "fp8"], ["--grad-accum", "0"], ["--grad-accum", "3"], ["--sample-every", "-1"],
             ["--name", "../../x"], ["--name", "my dog"], ["--name", "lora_kohya"]]
BAD_SAMPLE_FLAGS = [["-n", "0"], ["--steps", "0"], ["--steps", "5000"], ["--guidance", "nan"], ["-n", "two"],
                    ["--lora-scale", "inf"]]


def test_bad_flags_are_refused_before_any_work(saved, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(unet, "load_model", no_work)
    state, new = copy_state(saved, tmp_path), str(tmp_path / "new")
    before = digest(state)
    for flags in BAD_FLAGS:
        for folder in (state, new):
            message = exit_message(train.main, ["--concept", saved["beta"], "--state", folder, *flags])
            assert (f"concept name {flags[1]!r}" if flags[0] == "--name" else flags[0]) in message
    assert digest(state) == before and not os.path.exists(new)
    for flags in BAD_SAMPLE_FLAGS:
        assert flags[0] in exit_message(sample.main, ["--prompt", "a photo", "--out", str(tmp_path / "o.png"), *flags])
    assert sorted(os.listdir(tmp_path)) == ["state"]


def test_every_flag_says_what_it_does_and_what_a_plain_run_uses(capsys, monkeypatch):
    """Each method flag's help is its cp.Hparams field's, with the default a plain run uses and the presets that
    change it."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    with pytest.raises(SystemExit):
        train.parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    presets = train.load_presets()
    for f in dataclasses.fields(cp.Hparams):
        help_text = text.split(f" --{f.name.replace('_', '-')} ", 1)[1].split(" --", 1)[0]
        assert len(f.metadata["help"].split()) >= 3 and f.metadata["help"] in help_text, (f.name, help_text)
        assert f"(default {f.default}" in help_text, (f.name, help_text)
        for m, values in presets["methods"].items():
            if values.get(f.name, f.default) != f.default:
                assert f"{m}: {values[f.name]}" in help_text, (f.name, help_text)


def test_the_defaults_are_what_a_plain_run_uses(monkeypatch):
    """cp.Hparams() is the default method at its preset on the shipped toy model: what `python train.py` runs and
    what `-h` calls the defaults."""
    presets = train.load_presets()
    model = unet.load_model(os.path.join(ROOT, "toy", "model"))
    assert train.unet_size(os.path.join(ROOT, "toy", "model")) == sum(p.numel() for p in model.unet.parameters())
    kind, model_values = train.model_preset(presets, train.unet_size(os.path.join(ROOT, "toy", "model")))
    plain, changed = train.resolve_hparams(train.parse_args([]), None, presets, model_values)
    assert kind == "toy" and plain == cp.Hparams() and changed == {}


def test_decompression_bomb_is_an_error_naming_the_file(tmp_path, monkeypatch):
    write_concept(str(tmp_path), 0, n=1)  # 20 × 24 = 480 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # Pillow refuses images of more than twice this
    with pytest.raises(cp.CPError, match=r"0\.png.*decompression bomb"):
        train.load_images(str(tmp_path), 16)


# ---------------------------------------------------------------------------------------------------------------
# presets


def write_presets(path, **change):
    with open(train.PRESETS_FILE) as f:
        presets = json.load(f)
    presets.update(change)
    with open(path, "w") as f:
        json.dump(presets, f)
    return str(path)


@pytest.mark.parametrize("damage", ["missing", "not json", "no methods", "unknown method", "unknown hparam",
                                    "bad value", "bad default"])
def test_a_bad_presets_file_is_a_one_line_error_before_any_work(saved, tmp_path, monkeypatch, damage):
    path = tmp_path / "presets.json"
    methods = json.load(open(train.PRESETS_FILE))["methods"]
    if damage == "not json":
        path.write_text('{"models": ')
    elif damage == "no methods":
        path.write_text('{"models": {}, "default_method": "seq"}')
    elif damage != "missing":
        write_presets(path, **{"unknown method": dict(methods={**methods, "ewc-xl": {}}),
                               "unknown hparam": dict(methods={**methods, "ewc": {"ewc_lamda": 1.0}}),
                               "bad value": dict(methods={**methods, "ewc": {"ewc_lambda": -1.0}}),
                               "bad default": dict(default_method="best")}[damage])
    monkeypatch.setattr(train, "PRESETS_FILE", str(path))
    monkeypatch.setattr(unet, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    new = str(tmp_path / "new")
    message = exit_message(train.main, ["--concept", saved["beta"], "--state", new, "--model", saved["model"]])
    assert "presets file" in message and str(path) in message
    assert ("missing" if damage == "missing" else "damaged") in message
    assert not os.path.exists(new)
    with pytest.raises(cp.CPError):
        train.load_presets()


def test_new_state_takes_model_then_method_presets_then_flags_and_keeps_them(saved, tmp_path, monkeypatch, capsys):
    """A new state: the model preset, under the method's, under the flags. The state records its method's settings;
    the run settings (steps, batch size, learning rates) are recorded per task and never carried to the next run."""
    models = {"toy": {"max_unet_params": 10 ** 8, "steps": 3, "batch_size": 4, "lr": 0.002},
              "sd-v1": {"max_unet_params": None, "steps": 500, "lr": 1e-4}}
    path = write_presets(tmp_path / "presets.json", models=models, default_method="ewc",
                         methods={"ewc": {"ewc_lambda": 0.5, "batch_size": 2, "fisher_samples": 5}, "seq": {}})
    monkeypatch.setattr(train, "PRESETS_FILE", path)
    folder = str(tmp_path / "state")
    train.main(["--concept", saved["beta"], "--state", folder, "--model", saved["model"], "--no-preview",
                "--fisher-samples", "2", "--lr", "0.004"])
    m = manifest(folder)
    hp, ran = m["hparams"], m["history"][0]["run"]
    assert (hp["method"], hp["ewc_lambda"], hp["fisher_samples"]) == ("ewc", 0.5, 2)
    assert not set(cp.RUN_KNOBS) & set(hp) and (ran["steps"], ran["batch_size"], ran["lr"]) == (3, 2, 0.004)
    out = capsys.readouterr().out
    assert "model preset toy" in out and "ewc_lambda 0.5" in out and "flags given: lr, fisher_samples" in out
    write_presets(path, models=models, default_method="ewc", methods={"ewc": {"ewc_lambda": 0.9}, "seq": {}})
    train.main(["--concept", saved["gamma"], "--state", folder, "--no-preview"])
    m = manifest(folder)
    assert m["hparams"] == hp  # a continued state keeps its method's settings ...
    assert (m["history"][1]["run"]["batch_size"], m["history"][1]["run"]["lr"]) == (4, 0.002)  # ... not the run's
    assert train.model_preset(train.load_presets(path), 10 ** 8 + 1) == ("sd-v1", {"steps": 500, "lr": 1e-4})


def test_a_one_off_flag_applies_to_its_own_run_only(saved, tmp_path, monkeypatch, capsys):
    """After a run with --steps 5, the next plain run trains as many steps as the run before it (the presets'); a
    state setting given on the command line changes the state, with a note, and stays."""
    models = {"toy": {"max_unet_params": 10 ** 8, "steps": 2, "batch_size": 2}}
    monkeypatch.setattr(train, "PRESETS_FILE", write_presets(tmp_path / "presets.json", models=models))
    folder, flags = str(tmp_path / "state"), ["--model", saved["model"], "--method", "seq", "--no-preview"]
    train.main(["--concept", saved["alpha"], "--state", folder, *flags])
    train.main(["--concept", saved["beta"], "--state", folder, "--steps", "5", "--ewc-lambda", "0.25", "--no-preview"])
    assert "note: --ewc-lambda 0.25 changes this state's ewc_lambda" in capsys.readouterr().err
    train.main(["--concept", saved["gamma"], "--state", folder, "--no-preview"])
    m = manifest(folder)
    assert [h["run"]["steps"] for h in m["history"]] == [2, 5, 2]
    assert m["hparams"]["ewc_lambda"] == 0.25 and "changes this state's" not in capsys.readouterr().err


@pytest.mark.parametrize("batch, accum, ok", [(6, 3, True), (6, 4, False), (8, 3, False), (8, 4, True)])
def test_grad_accum_is_checked_against_the_batch_that_will_run(saved, tmp_path, monkeypatch, batch, accum, ok):
    """--grad-accum must divide the batch size this run trains with (its flag, else the presets'), checked before
    the model loads."""
    class Loaded(Exception):
        pass

    def load_model(*a, **k):
        raise Loaded
    folder = copy_state(saved, tmp_path)
    flags = ["--concept", saved["beta"], "--state", folder, "--grad-accum", str(accum)]
    flags += ["--batch-size", str(batch)] if batch != 8 else []  # 8: the toy model's preset
    monkeypatch.setattr(unet, "load_model", load_model)
    if ok:
        with pytest.raises(Loaded):
            train.main(flags)
    else:
        assert exit_message(train.main, flags) == f"error: --grad-accum {accum}: must be an integer ≥ 1 that " \
                                                    f"divides --batch-size {batch}"


def test_help_lists_every_presets_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        train.parse_args(["-h"])
    text = capsys.readouterr().out
    presets = train.load_presets()
    assert f"the default method, {presets['default_method']}, at its tuned preset" in " ".join(text.split())
    for kind, values in presets["models"].items():
        assert f"{kind}: steps {values['steps']}" in text
    for method, values in presets["methods"].items():
        line = next(line for line in text.splitlines() if line.strip().startswith(method + ":"))
        assert all(f"{k} {v}" in line for k, v in values.items()), line
