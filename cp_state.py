"""The state of continual personalization on disk: a folder that one process writes at a time.

    manifest.json                 the commit point: model identity, method and hparams, concepts, history, file names
    tokens_NNN_<id>.safetensors   the learned token rows
    ewc_NNN_<id>.safetensors      the Fisher F* and the anchor φ* of EWC
    lora_NNN_<id>.safetensors     the carried adapter (diffusers/PEFT keys; VeRA: with its shared projection)
    pool/task_NNN_<id>.safetensors  the adapter after each task (DSC's teachers, C-LoRA's sum)
    .lock, log.jsonl, grids/      the writer's lock; beside the state, not part of it: step losses, pictures

A save writes every file under names new to the attempt, then replaces the manifest, which names them: an
interrupted save leaves the previous state whole. A save refuses a folder whose manifest changed since the state was
loaded (compare-and-swap). A load reads and checks every file the manifest names; a missing, damaged or mis-shaped
file is a one-line CPError naming it. The method itself (cp.State, what a task changes) lives in cp.py.
"""
import copy
import json
import os
import re
from dataclasses import asdict

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead (`lock_state`)
    fcntl = None
    import msvcrt
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cp
import lora
import unet

MANIFEST = "manifest.json"
LOCK = ".lock"
LOG, GRIDS = "log.jsonl", "grids"  # beside the state, not part of it: every saved step's losses, train.py's pictures
# every name a save writes (data files carry the attempt's id), and the only names a state folder may hold
# without a manifest (its lock, the log and pictures, leftovers of a first save that was killed)
STATE_NAME = re.compile(r"\.lock|pool|grids|log\.jsonl|manifest\.json(\.\w+\.tmp)?|"
                        r"(tokens|ewc|lora)_\d+_\w+\.safetensors")


def lock_state(folder):
    """Become the one writer of a state folder until this process ends (the OS drops the lock of a killed process).

    Returns the open lock file; keep it. A folder that is not a state is refused before anything is written to it.
    """
    read_manifest(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, LOCK), "a+")
    except OSError as e:
        raise cp.CPError(f"cannot write the state folder {folder}: {e}") from None
    try:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # one byte far past the process id written below: a locked byte cannot be read by other processes
            os.lseek(f.fileno(), 1 << 20, os.SEEK_SET)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except BlockingIOError if fcntl else OSError:  # msvcrt: a plain OSError
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise cp.CPError(f"state {folder} is in use by {f'process {holder}' if holder else 'another process'} "
                      "(one run at a time writes a state)") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def first_missing(path):
    """The outermost folder of `path` that does not exist (what lock_state's makedirs creates); None if it exists."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        path, top = os.path.dirname(path), path
    return top


def unlock_unsaved(folder, lock, created):
    """Undo `lock_state` for a run that ends before its first save: when it created the folder (`created`, from
    `first_missing` before locking), the lock file, the empty pool/ a failed save leaves, and every folder from
    `folder` up to `created` go, each only if nothing else is in it. The lock file is removed while still held, so
    no other run takes it in between (Windows, which removes no open file: right after)."""
    try:
        if created is None:
            return
        left = set(os.listdir(folder)) - {LOCK}
        if left - {"pool"} or (left and os.listdir(os.path.join(folder, "pool"))):
            return
        try:
            os.remove(os.path.join(folder, LOCK))
        except OSError:
            lock.close()
            os.remove(os.path.join(folder, LOCK))
        if left:
            os.rmdir(os.path.join(folder, "pool"))
        path = os.path.abspath(folder)
        while True:
            os.rmdir(path)  # refuses a folder that is not empty: another process's, left alone
            if path == created:
                break
            path = os.path.dirname(path)
    except OSError:
        pass  # a folder left behind is harmless; the error that ended the run is the one to report
    finally:
        lock.close()


def append_log(folder, records):
    """Add the steps of the task just saved to the log beside the state: one JSON object per line."""
    with open(os.path.join(folder, LOG), "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def read_manifest(folder):
    """The manifest of a state folder; None for a folder that does not exist or holds only what a state writes."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        foreign = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if not STATE_NAME.fullmatch(n)]
        if foreign:
            raise cp.CPError(f"{folder} holds no {MANIFEST} and is not empty ({foreign[0]}, ...): it is not a state; "
                          "give a new or empty folder") from None
        return None
    except OSError as e:
        raise cp.CPError(f"cannot read {path}: {e.strerror}") from None
    try:
        m = json.loads(text)
        named = _named(m["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise cp.CPError(f"{path} is damaged: not a state manifest ({type(e).__name__}: {e})") from None
    if not all(isinstance(n, str) and re.fullmatch(r"(pool/)?[\w.-]+", n) and ".." not in n for n in named):
        raise cp.CPError(f"{path} is damaged: it names a file outside the state folder")
    return m


def _lora_files(files):
    """The LoRA files a manifest names: the carried LoRA (if any), then the pool."""
    return ([files["lora"]] if files["lora"] else []) + files["pool"]


def _named(files):
    return [files["tokens"], files["ewc"]] + _lora_files(files)


def _write_file(path, write):
    """write(path), then force the bytes to disk (opened for writing: Windows flushes no read-only handle)."""
    write(path)
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def save_state(state, folder):
    """Write the state's files under names new to this attempt, then replace the manifest (the commit point), then
    remove the files that only the replaced manifest named. Nothing else in the folder is touched.

    The manifest on disk must still be the one `state` continues (compare-and-swap); a failed write removes what
    this attempt wrote and is a cp.CPError: the previous state stays whole.
    """
    old = read_manifest(folder)
    if old != state.base:
        raise cp.CPError(f"the state in {folder} changed since this run loaded it (another run saved to it); "
                      "nothing was saved")
    attempt, n, hp = os.urandom(4).hex(), len(state.concepts), state.hparams
    kept = old["files"]["pool"][:len(state.pool)] if old else []  # a committed pool entry never changes
    files = {"tokens": f"tokens_{n:03d}_{attempt}.safetensors", "ewc": f"ewc_{n:03d}_{attempt}.safetensors",
             "lora": f"lora_{n:03d}_{attempt}.safetensors" if state.lora else None,
             "pool": kept + [f"pool/task_{i:03d}_{attempt}.safetensors" for i in range(len(kept), len(state.pool))]}
    tensors = {"tokens": state.tokens, "ewc": {**{"fisher." + k: v for k, v in state.fisher.items()},
                                               **{"anchor." + k: v for k, v in state.anchor.items()}}}
    manifest = json.dumps(dict(format="cp-state/1", model=state.model, method=hp.method, hparams=asdict(hp),
                               concepts=state.concepts, history=state.history, files=files), indent=1)
    write_lora = lambda w, projection=None: lambda p: (
        lora.write_vera(w, p, projection) if hp.adapter == "vera" else
        lora.write_lora_file(w, {k: hp.alpha for k in w}, p, "diffusers"))
    writes = [(files[k], lambda p, t=tensors[k]: save_file({k: v.contiguous() for k, v in t.items()}, p))
              for k in ("tokens", "ewc")]
    # VeRA: the carried file holds the shared projection, the pool files leave it out
    writes += [(files["lora"], write_lora(state.lora, state.projection))] if state.lora else []
    writes += [(name, write_lora(w)) for name, w in zip(files["pool"][len(kept):], state.pool[len(kept):])]
    writes += [(f"{MANIFEST}.{attempt}.tmp", lambda p: _write_text(p, manifest))]
    written = []
    try:
        os.makedirs(os.path.join(folder, "pool"), exist_ok=True)
        for name, write in writes:
            written.append(os.path.join(folder, name))  # before writing: a half-written file is removed too
            _write_file(written[-1], write)
        os.replace(os.path.join(folder, writes[-1][0]), os.path.join(folder, MANIFEST))
    except BaseException as e:
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        if isinstance(e, OSError):
            raise cp.CPError(f"cannot save the state to {folder}: {e}; the previous state is unchanged") from None
        raise
    for name in set(_named(old["files"]) if old else []) - set(_named(files)):
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    state.base = json.loads(manifest)


def load_state(folder):
    """The state a folder's manifest names. Every file is read and checked against the manifest: a missing, damaged
    or mis-shaped file is a cp.CPError that names it. Needs no lock: a save committed while reading means reading again.
    """
    while True:
        m = read_manifest(folder)
        if m is None:
            raise cp.CPError(f"{folder} holds no state (no {MANIFEST})")
        try:
            return _read_state(folder, m)
        except cp.CPError:
            if read_manifest(folder) == m:
                raise


def _read_state(folder, m):
    path = os.path.join(folder, MANIFEST)
    try:
        hp = cp.Hparams(**m["hparams"])
        cp.check_hparams(hp)
        concepts, files = m["concepts"], m["files"]
        state = cp.State(model=m["model"], hparams=hp, concepts=concepts, history=m["history"],
                      base=copy.deepcopy(m))  # as it is on disk, whatever happens to the state
        tokens = {c["token"] for c in concepts}
    except (cp.CPError, KeyError, TypeError) as e:
        raise cp.CPError(f"{path} is damaged: {type(e).__name__}: {e}") from None

    def read(name, reader):
        try:
            return reader(os.path.join(folder, name))
        except FileNotFoundError:
            raise cp.CPError(f"state file {os.path.join(folder, name)} is missing") from None
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise cp.CPError(f"state file {os.path.join(folder, name)} is damaged: {e}") from None

    state.tokens = read(files["tokens"], load_file)
    if set(state.tokens) != tokens or any(v.dim() != 1 for v in state.tokens.values()):
        raise _damaged(folder, files["tokens"], f"holds {sorted(state.tokens)}, not one 1-D row per concept")
    ewc = read(files["ewc"], load_file)
    state.fisher = {k[7:]: v for k, v in ewc.items() if k.startswith("fisher.")}
    state.anchor = {k[7:]: v for k, v in ewc.items() if k.startswith("anchor.")}
    if len(files["pool"]) != (len(concepts) if hp.uses("lora") else 0) or \
            bool(files["lora"]) != (hp.uses("lora") and not hp.uses("clora") and len(concepts) > 0):
        raise cp.CPError(f"{path} is damaged: its files do not fit {len(concepts)} concepts of method {hp.method}")
    read_adapter = lambda p: lora.read_vera(p)[:2] if hp.adapter == "vera" else (_pairs(lora.read_lora_file(p)), None)
    adapters = [read(name, read_adapter) for name in _lora_files(files)]
    state.lora, state.projection = adapters[0] if files["lora"] else (None, None)
    state.pool = [w for w, _ in (adapters[1:] if files["lora"] else adapters)]
    return state


def _damaged(folder, name, what):
    return cp.CPError(f"state file {os.path.join(folder, name)} is damaged: it {what}")


def _pairs(mods):
    return {p: (A, B) for p, (A, B, _) in mods.items()}


def check_model(state, model):
    """The state fits `model`: made with the same base weights (a fingerprint), every tensor shaped for it."""
    old = len(state.model["fingerprint"]) == 16  # an older state records `unet.old_fingerprint`, 16 hex digits
    given = model.old_fingerprint if old else model.fingerprint
    if state.model["fingerprint"] != given:
        raise cp.CPError(f"this state was made with another base model ({state.model['path']}, fingerprint "
                         f"{state.model['fingerprint']}); the model given has fingerprint {given}")
    if old:  # the same model as far as the old hash tells: the state's next save records the full fingerprint
        state.model = dict(state.model, fingerprint=model.fingerprint)
    if state.base is None:
        return
    files, hp = state.base["files"], state.hparams  # file names are relative to the state folder
    dim = model.text_encoder.get_input_embeddings().weight.shape[1]
    if any(row.shape != (dim,) for row in state.tokens.values()):
        raise _damaged("", files["tokens"], f"holds token rows not of the model's width {dim}")
    names = "db" if hp.adapter == "vera" else "AB"  # as `cp.flat` names them
    shapes = lambda m: ((hp.rank,), (m.out_features,)) if hp.adapter == "vera" else \
        ((hp.rank, m.in_features), (m.out_features, hp.rank))
    need = {p: shapes(m) for p, m in lora.target_modules(model.unet, hp.targets)}
    for name, w in zip(_lora_files(files), ([state.lora] if state.lora else []) + state.pool):
        _check_shapes(name, {p: (tuple(A.shape), tuple(B.shape)) for p, (A, B) in w.items()}, need)
    if hp.uses("ewc") and state.concepts:
        for stats in (state.fisher, state.anchor):
            _check_shapes(files["ewc"], {k: tuple(v.shape) for k, v in stats.items()},
                          {f"{p}.{k}": s for p, pair in need.items() for k, s in zip(names, pair)})


def _check_shapes(name, got, need):
    """{tensor or module: shape} of a state file against what the model needs."""
    for k in sorted(set(got) | set(need)):
        if got.get(k) != need.get(k):
            raise _damaged("", name, f"holds {k} as {got.get(k, 'nothing')}; the model needs "
                           f"{need.get(k, 'no such tensor')}")


def load_with_state(folder, model_path=None, device="cpu", dtype=torch.float32):
    """The base model named by a state (or `model_path`), with the state's tokens and LoRA(s) applied."""
    state = load_state(folder)
    model = unet.load_model(model_path or state.model["path"], device, dtype)
    check_model(state, model)
    cp.apply_state(model, state)
    return model, state
