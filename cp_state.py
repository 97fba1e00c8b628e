"""The state of continual personalization on disk: a folder that one process writes at a time.

    manifest.json                 the commit point: format, model identity, method and hparams, concepts, history,
                                  file names and each file's SHA-256
    tokens_NNN_<id>.safetensors   the learned token rows
    ewc_NNN_<id>.safetensors      the Fisher F* and the anchor φ* of EWC
    lora_NNN_<id>.safetensors     the carried adapter (diffusers/PEFT keys; VeRA: with its shared projection)
    pool/task_NNN_<id>.safetensors  the adapter after each task (DSC's teachers, C-LoRA's sum)
    .lock, log.jsonl, grids/      the writer's lock; beside the state, not part of it: step losses, pictures

A save writes every file under names new to the attempt, then replaces the manifest, which names them and records
the SHA-256 of the bytes written: an interrupted save leaves the previous state whole. A save refuses a folder whose
manifest changed since the state was loaded (compare-and-swap). A load checks the manifest's format and every field
(type, range, what the fields say of each other), then reads every file it names, each a plain file inside the
folder whose SHA-256 must match: a missing, damaged or mis-shaped file, or a damaged manifest, is a one-line CPError
naming it, and nothing on disk changes. The manifest's hparams are the settings of the state's method; the run
settings (cp.RUN_KNOBS: steps, batch size, learning rates) that each task ran with are in its history entry. The
method itself (cp.State, what a task changes) lives in cp.py.
"""
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, fields

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead (`lock_state`)
    fcntl = None
    import msvcrt
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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
FORMAT = "cp-state/4"
LAST_READER = "b96337c"  # the last commit of cp that reads the formats before FORMAT (cp-state/1 to /3)
NULL, NUMBER = type(None), (int, float)
# every field of a manifest: a type or a tuple of types (compared exactly: an int is never a bool), {key: field}
# (exactly these keys), [field] (a list of them). What the fields say of each other: _check_manifest.
FIELDS = {"format": str, "model": {"path": str, "fingerprint": str}, "method": str, "hparams": dict,
          "concepts": [{"name": str, "token": str, "prompt": str, "class_word": (str, NULL), "task": int}],
          "history": [dict], "files": {"tokens": str, "ewc": str, "lora": (str, NULL), "pool": [str]}, "sums": dict}
# the settings of the state's method (a task's run settings are in its history entry)
HPARAMS = {f.name: {int: int, float: NUMBER, str: str}[f.type] for f in fields(cp.Hparams) if not f.metadata["run"]}


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


def check_writable(folder):
    """Create and remove a file in the state folder and in its pool/, as a save will: a folder where the lock file
    can be written but no new file created would otherwise fail only at the save, after training."""
    try:
        os.makedirs(os.path.join(folder, "pool"), exist_ok=True)
        for where in (folder, os.path.join(folder, "pool")):
            fd, probe = tempfile.mkstemp(dir=where, prefix="manifest.json.", suffix=".tmp")
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise cp.CPError(f"cannot write the state folder {folder}: {e}") from None


def check_space(folder, state, model):
    """Refuse, before training, a disk without room for the state that the next save writes: every token row, the
    carried adapter, a new pool entry and the EWC statistics (each adapter-sized), at float32, with a margin."""
    hp = state.hparams
    shapes = [(hp.rank + m.out_features) if hp.adapter == "vera" else hp.rank * (m.in_features + m.out_features)
              for _, m in lora.target_modules(model.unet, hp.targets)]
    adapter = 4 * sum(shapes) if hp.uses("lora") else 0
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    need = 4 * width * (len(state.tokens) + 1) + adapter * (2 + 2 * hp.uses("ewc")) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise cp.CPError(f"the disk of {folder} has {free / 2**20:.1f} MiB free; the state's next save needs about "
                         f"{need / 2**20:.1f} MiB: free some space first")


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
        if os.path.lexists(path) and not _inside(folder, MANIFEST):
            raise cp.CPError(f"{path} is damaged: it is a link, not a file of the state folder")
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
    except (ValueError, RecursionError) as e:
        raise cp.CPError(f"{path} is damaged: not a state manifest ({type(e).__name__}: {e})") from None
    if type(m) is dict and m.get("format") != FORMAT:  # before its fields: another format has other fields
        old = type(m.get("format")) is str and re.fullmatch(r"cp-state/[123]", m["format"])
        raise cp.CPError(f"{path} has state format {m.get('format')!r}; this version of cp reads {FORMAT} only"
                         + (f" (commit {LAST_READER} of cp reads it: check it out to sample or continue this state)"
                            if old else ""))
    try:
        _check_manifest(m)
    except ValueError as e:
        raise cp.CPError(f"{path} is damaged: {e}") from None
    return m


def _check_manifest(m):
    """Every field of a manifest by type (FIELDS, HPARAMS), then by range and against each other; ValueError names
    the first that is wrong."""
    _fit(m, FIELDS, "")
    _keys(m["hparams"], HPARAMS, "hparams")
    for k, v in m["hparams"].items():
        _fit(v, HPARAMS[k], f"hparams.{k}")
    hp = cp.Hparams(**m["hparams"])
    try:
        cp.check_hparams(hp)
    except cp.CPError as e:
        raise ValueError(f"hparams: {e}") from None
    concepts, files, n = m["concepts"], m["files"], len(m["concepts"])
    roles = [("files.tokens", files["tokens"], f"tokens_{n:03d}"), ("files.ewc", files["ewc"], f"ewc_{n:03d}")]
    roles += [("files.lora", files["lora"], f"lora_{n:03d}")] if files["lora"] is not None else []
    roles += [(f"files.pool[{i}]", name, f"pool/task_{i:03d}") for i, name in enumerate(files["pool"])]
    for where, name, stem in roles:  # the names a save gives, so never a path out of the folder
        if not re.fullmatch(re.escape(stem) + r"_[0-9a-f]+\.safetensors", name):
            raise ValueError(f"{where} must be {stem}_<id>.safetensors, got {name!r}")
    sums, bad = m["sums"], next((i for i, c in enumerate(concepts) if c["task"] != i), None)
    named = next((i for i, c in enumerate(concepts)  # a name becomes a token and an exported file name
                  if not cp.NAME.fullmatch(c["name"]) or c["token"] != f"<{c['name']}>"), None)
    for wrong, message in (
            (m["method"] != hp.method, f"method {m['method']!r} is not hparams.method {hp.method!r}"),
            (bad is not None, f"concepts[{bad}].task must be {bad}, the concept's place"),
            (named is not None, f"concepts[{named}] must have a name of letters, digits, '_' and '-', and the token "
                                "<name>"),
            (len({c["name"] for c in concepts}) < n or len({c["token"] for c in concepts}) < n,
             "two concepts share a name or a token"),
            (len(m["history"]) != n, f"history must hold one entry per concept ({n}), got {len(m['history'])}"),
            (len(files["pool"]) != (n if hp.uses("lora") else 0) or
             (files["lora"] is not None) != (hp.uses("lora") and not hp.uses("clora") and n > 0),
             f"files do not fit {n} concepts of method {hp.method}"),
            (sorted(sums) != sorted(_named(files)),
             "sums must hold the SHA-256 of each file of files, and no other"),
            (not all(type(v) is str and re.fullmatch("[0-9a-f]{64}", v) for v in sums.values()),
             "sums must be SHA-256 digests (64 hex digits)")):
        if wrong:
            raise ValueError(message)


def _fit(value, field, where):
    """ValueError naming `where` unless `value` fits `field` (FIELDS' notation)."""
    if isinstance(field, dict):
        _keys(value, field, where)
        for k, v in value.items():
            _fit(v, field[k], f"{where}.{k}" if where else k)
    elif isinstance(field, list):
        _fit(value, list, where)
        for i, v in enumerate(value):
            _fit(v, field[0], f"{where}[{i}]")
    else:
        kinds = field if isinstance(field, tuple) else (field,)
        if type(value) not in kinds:
            words = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
                     NULL: "null"}
            need = " or ".join(words[k] for k in kinds if not (k is int and float in kinds))  # NUMBER: "a number"
            raise ValueError(f"{where or 'the manifest'} must be {need}, got "
                             f"{'null' if value is None else type(value).__name__}")


def _keys(value, names, where, required=None):
    """`value` is an object whose keys are among `names` and include `required` (None: all of `names`)."""
    _fit(value, dict, where)
    missing = sorted(set(names if required is None else required) - set(value))
    unknown = sorted(set(value) - set(names))
    if missing or unknown:
        raise ValueError(f"{where or 'the manifest'} " + (f"lacks {missing[0]!r}" if missing else
                                                        f"has an unknown key {unknown[0]!r}"))


def _inside(folder, name):
    """`name` is a file or folder of the state folder itself: no link on the way (a link could lead out of it)."""
    path = os.path.join(folder, *name.split("/"))
    return os.path.realpath(path) == os.path.join(os.path.realpath(folder), *name.split("/"))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    sums = {name: old["sums"][name] for name in kept}
    files = {"tokens": f"tokens_{n:03d}_{attempt}.safetensors", "ewc": f"ewc_{n:03d}_{attempt}.safetensors",
             "lora": f"lora_{n:03d}_{attempt}.safetensors" if state.lora else None,
             "pool": kept + [f"pool/task_{i:03d}_{attempt}.safetensors" for i in range(len(kept), len(state.pool))]}
    tensors = {"tokens": state.tokens, "ewc": {**{"fisher." + k: v for k, v in state.fisher.items()},
                                               **{"anchor." + k: v for k, v in state.anchor.items()}}}
    write_lora = lambda w, projection=None: lambda p: (
        lora.write_vera(w, p, projection) if hp.adapter == "vera" else
        lora.write_lora_file(w, {k: hp.alpha for k in w}, p, "diffusers"))
    writes = [(files[k], lambda p, t=tensors[k]: lora.write_safetensors({k: v.contiguous() for k, v in t.items()}, p))
              for k in ("tokens", "ewc")]
    # VeRA: the carried file holds the shared projection, the pool files leave it out
    writes += [(files["lora"], write_lora(state.lora, state.projection))] if state.lora else []
    writes += [(name, write_lora(w)) for name, w in zip(files["pool"][len(kept):], state.pool[len(kept):])]
    written = []
    try:
        os.makedirs(os.path.join(folder, "pool"), exist_ok=True)
        for name, write in writes:
            written.append(os.path.join(folder, name))  # before writing: a half-written file is removed too
            _write_file(written[-1], write)
            sums[name] = _sha256(written[-1])  # read back after the fsync: the bytes as written
        hparams = {k: v for k, v in asdict(hp).items() if k in HPARAMS}
        manifest = json.dumps(dict(format=FORMAT, model=state.model, method=hp.method, hparams=hparams,
                                   concepts=state.concepts, history=state.history, files=files,
                                   sums={name: sums[name] for name in _named(files)}), indent=1)
        written.append(os.path.join(folder, f"{MANIFEST}.{attempt}.tmp"))
        _write_file(written[-1], lambda p: _write_text(p, manifest))
        os.replace(written[-1], os.path.join(folder, MANIFEST))
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
    """The state a folder's manifest names. Every file is read and checked against the manifest (its SHA-256, its
    tensors): a missing, damaged or mis-shaped file is a cp.CPError that names it. Needs no lock: a save committed
    while reading means reading again. The run settings of the loaded hparams are cp.Hparams' defaults.
    """
    while True:
        m = read_manifest(folder)
        if m is None:
            raise cp.CPError(f"{folder} holds no state (no {MANIFEST})")
        try:
            state = _read_state(folder, m)
        except cp.CPError:
            if read_manifest(folder) == m:
                raise
            continue
        return state


def _read_state(folder, m):
    """The state of a checked manifest (read_manifest); its files are checked as they are read."""
    hp, concepts, files, sums = cp.Hparams(**m["hparams"]), m["concepts"], m["files"], m["sums"]
    state = cp.State(model=m["model"], hparams=hp, concepts=concepts, history=m["history"],
                     base=copy.deepcopy(m))  # as it is on disk, whatever happens to the state
    tokens = {c["token"] for c in concepts}

    def read(name, reader):
        """reader(path) of a plain file inside the folder whose bytes have the manifest's SHA-256."""
        path = os.path.join(folder, name)
        try:
            if not os.path.lexists(path):
                raise FileNotFoundError
            if not _inside(folder, name) or not os.path.isfile(path):
                raise _damaged(folder, name, "is a link or a folder, not a file of the state folder")
            if _sha256(path) != sums[name]:
                raise cp.CPError(f"state file {path} is damaged: its bytes do not have the SHA-256 that {MANIFEST} "
                                 "records")
            return reader(path)
        except FileNotFoundError:
            raise cp.CPError(f"state file {path} is missing") from None
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise cp.CPError(f"state file {path} is damaged: {e}") from None

    state.tokens = read(files["tokens"], load_file)
    if set(state.tokens) != tokens or any(v.dim() != 1 for v in state.tokens.values()):
        raise _damaged(folder, files["tokens"], f"holds {sorted(state.tokens)}, not one 1-D row per concept")
    ewc = read(files["ewc"], load_file)
    state.fisher = {k[7:]: v for k, v in ewc.items() if k.startswith("fisher.")}
    state.anchor = {k[7:]: v for k, v in ewc.items() if k.startswith("anchor.")}
    read_adapter = lambda p: lora.read_vera(p)[:2] if hp.adapter == "vera" else \
        (_pairs(lora.read_lora_file(p), hp.alpha), None)
    adapters = [read(name, read_adapter) for name in _lora_files(files)]
    state.lora, state.projection = adapters[0] if files["lora"] else (None, None)
    state.pool = [w for w, _ in (adapters[1:] if files["lora"] else adapters)]
    return state


def _damaged(folder, name, what):
    return cp.CPError(f"state file {os.path.join(folder, name)} is damaged: it {what}")


def _pairs(mods, alpha):
    """{module: (A, B)} of a LoRA file written with the manifest's alpha (another alpha would scale every update)."""
    if any(a != alpha for _, _, a in mods.values()):
        raise ValueError(f"it holds LoRA alpha {sorted({a for _, _, a in mods.values()})}; the manifest's "
                         f"hparams.alpha is {alpha}")
    return {p: (A, B) for p, (A, B, _) in mods.items()}


def check_model(state, model):
    """The state fits `model`: made with the same base weights (a fingerprint), every tensor shaped for it."""
    if state.model["fingerprint"] != model.fingerprint:
        raise cp.CPError(f"this state was made with another base model ({state.model['path']}, fingerprint "
                         f"{state.model['fingerprint']}); the model given has fingerprint {model.fingerprint}")
    # the same weights, perhaps moved: the next save records where they are now
    state.model = {"path": model.path, "fingerprint": model.fingerprint}
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
    try:
        model = unet.load_model(model_path or state.model["path"], device, dtype)
    except unet.LoadError as e:
        if model_path:
            raise
        raise cp.CPError(f"{e} (the base model this state was made with: if it moved, give its new place with "
                         "--model)") from None
    check_model(state, model)
    cp.apply_state(model, state)
    return model, state
