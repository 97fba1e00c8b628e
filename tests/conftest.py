"""Test setup: the repo root on sys.path, markers, a tiny random SD model written in diffusers layout, and the child
processes of a process (through /proc) for the tests that stop a benchmark with SIGTERM."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

# On a machine without CUDA the kernel tests (tests/test_kernels.py, which ask for the Triton kernel) run it under
# Triton's interpreter, which has to be chosen before triton is first imported (diffusers may import it). Everything
# else on a CPU runs the PyTorch reference, as in normal use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")


def byte_alphabet():
    """CLIP's reversible byte → printable-character table (the 256 base symbols of its BPE vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder, words=()):
    """A minimal CLIP BPE tokenizer: bytes, bytes + '</w>', merges that spell `words`, and the two specials."""
    os.makedirs(folder, exist_ok=True)
    base = byte_alphabet()
    vocab = base + [c + "</w>" for c in base]
    merges = []
    for word in words:
        cur = word[0]
        for i, ch in enumerate(word[1:]):
            last = i == len(word) - 2
            merges.append(f"{cur} {ch + '</w>' if last else ch}")
            cur = cur + ch + ("</w>" if last else "")
            vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
    return len(vocab)


def write_tiny_model(folder, seed=0):
    """Random tiny SD v1-style model saved by diffusers and transformers themselves (independent of unet.py)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    import unet

    torch.manual_seed(seed)
    preset = unet.PRESETS["tiny"]
    n_vocab = write_tokenizer(os.path.join(folder, "tokenizer"), ["photo", "red", "blue", "star"])
    te = CLIPTextModel(CLIPTextConfig(**dict(preset["text_encoder"], vocab_size=n_vocab, bos_token_id=n_vocab - 2,
                                             eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)))
    te.save_pretrained(os.path.join(folder, "text_encoder"))
    UNet2DConditionModel(**preset["unet"]).save_pretrained(os.path.join(folder, "unet"))
    vcfg = {k: v for k, v in preset["vae"].items()}
    n = len(vcfg["block_out_channels"])
    vae = AutoencoderKL(**vcfg, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    vae.save_pretrained(os.path.join(folder, "vae"))
    DDIMScheduler(**{k: v for k, v in preset["scheduler"].items()}, clip_sample=False).save_pretrained(
        os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f)
    return folder


@pytest.fixture(scope="session", autouse=True)
def fingerprint_cache(tmp_path_factory):
    """The fingerprint cache of every test (and of the scripts they run) in a temporary folder, not the home folder."""
    folder, before = str(tmp_path_factory.mktemp("cache")), os.environ.get("CP_CACHE_DIR")
    os.environ["CP_CACHE_DIR"] = folder
    yield folder
    if before is None:
        del os.environ["CP_CACHE_DIR"]
    else:
        os.environ["CP_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a random tiny SD model in diffusers folder layout (built once per test session)."""
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


def proc(pid, name):
    """/proc/pid/name as bytes; b"" once the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def state_and_parent(pid):
    """(state, parent pid) from /proc/pid/stat; (b"", None) once the process is gone."""
    fields = proc(pid, "stat").rsplit(b")", 1)[-1].split()  # after the command name, which may hold spaces
    return (fields[0], int(fields[1])) if len(fields) > 1 else (b"", None)


def alive(pid):
    return state_and_parent(pid)[0] not in (b"", b"Z")  # a zombie has ended


def children(pid, marker):
    """The live processes pid has started whose command line holds marker (bytes)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and alive(e) and state_and_parent(e)[1] == pid
            and marker in proc(e, "cmdline")]


def sigterm_after_children(cmd, marker, n):
    """Run cmd from the repository root until it has started n processes whose command line holds marker, SIGTERM
    it, and return (its exit status, those children still alive 30 s after it exited)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    started = []
    try:
        for _ in range(600):  # they start once the parent has loaded what it needs
            started = children(p.pid, marker)
            if len(started) == n or p.poll() is not None:
                break
            time.sleep(0.2)
        assert len(started) == n, p.stderr.read()[-2000:] if p.poll() is not None else started
        time.sleep(2)
        p.terminate()
        returncode, deadline = p.wait(timeout=60), time.time() + 30
        while any(map(alive, started)) and time.time() < deadline:
            time.sleep(0.2)
        return returncode, [pid for pid in started if alive(pid)]
    finally:
        for pid in [p.pid] + started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        p.wait()


def writes_denied(folder):
    """Whether the OS refuses a new file in `folder` (not for root, which chmod does not stop)."""
    try:
        open(os.path.join(folder, "probe"), "w").close()
    except PermissionError:
        return True
    os.remove(os.path.join(folder, "probe"))
    return False


def full_disk(opener):
    """A stand-in for `opener` (open, os.fdopen) on a full disk: the file is opened, and every write fails."""
    class FullDisk:
        def __init__(self, *args, **kwargs):
            self.file = opener(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return FullDisk
