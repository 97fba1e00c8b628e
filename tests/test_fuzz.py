"""The state on disk under seeded random damage: truncations, flipped bits in safetensors headers, tensor data and the
manifest, files swapped between roles and between attempts, wrong JSON types, missing and extra keys, hostile names,
folders and links in place of files. Each damage must be refused in one line (cp.CPError or unet.LoadError, never
another exception) or leave a state that gives exactly the original's token rows, LoRA tensors and sample; no load
writes anything, inside the state or beside it; the original, restored, loads again after each."""
import contextlib
import copy
import io
import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from collections import Counter
from dataclasses import replace

import pytest
import torch

import cp
import cp_state
import sample
import train
import unet
from test_cp import fresh, state_tensors, write_concept
from test_train_cli import FAST as CLI_FAST, ROOT, assert_one_line_error

PROMPT = "a photo of a <alpha> and a <beta>"
WRONG = [None, True, 7, 1.5, "x", [], {}, [1], {"a": 1}]  # a value of every JSON type


def read_tree(folder):
    """{relative path: bytes} of the plain files under a folder (not the lock: each writer puts its id there)."""
    return {os.path.relpath(os.path.join(r, f), folder).replace(os.sep, "/"): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(folder) for f in fs if f != cp_state.LOCK}


def snapshot(folder, skip=()):
    """Everything under a folder as it is, links and folders included (links not followed), but `skip`."""
    out = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name) if os.path.isdir(folder) else []:
        if entry.name in skip or entry.name == cp_state.LOCK:
            continue
        if entry.is_symlink():
            out[entry.name] = ("link", os.readlink(entry.path))
        elif entry.is_dir():
            out.update({f"{entry.name}/{k}": v for k, v in snapshot(entry.path).items()} or {entry.name: ("dir",)})
        else:
            out[entry.name] = ("file", open(entry.path, "rb").read())
    return out


def write_tree(folder, files):
    if os.path.lexists(folder):
        shutil.rmtree(folder)  # removes links, never what they point to
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def outputs(base, state):
    """What a loaded state gives: its tensors, and a 2-step sample of both concepts on a copy of the loaded model."""
    model = copy.deepcopy(base)
    cp_state.check_model(state, model)
    cp.apply_state(model, state)
    return state_tensors(state), sample.sample(model, [PROMPT], steps=2, seed=0), model


def same(a, b):
    (ta, ia, _), (tb, ib, _) = a, b
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and torch.equal(ia, ib)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to share out: one thread runs them several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def original(tiny_model_dir, tmp_path_factory):
    """A state of two concepts (ewc: tokens, Fisher and anchor, the carried LoRA, two pool entries) as bytes, the
    files of its first save (another attempt's), a third concept, one loaded model and the state's outputs."""
    root = tmp_path_factory.mktemp("fuzz")
    concepts = [write_concept(str(root / n), i) for i, n in enumerate(["alpha", "beta", "gamma"])]
    folder = str(root / "state")
    model, state = fresh(tiny_model_dir, "ewc")
    state = train.learn_folder(model, state, concepts[0])
    cp_state.save_state(state, folder)
    first = read_tree(folder)
    cp_state.save_state(train.learn_folder(model, state, concepts[1]), folder)
    base = unet.load_model(tiny_model_dir)
    files = read_tree(folder)
    m = json.loads(files[cp_state.MANIFEST])
    return dict(files=files, first=first, manifest=m, data=cp_state._named(m["files"]), base=base,
                reference=outputs(base, cp_state.load_state(folder)), gamma=concepts[2],
                images=train.load_images(concepts[2], base.resolution)[0])


# ---------------------------------------------------------------------------------------------------------------
# the damages: each changes a copy of the state in `folder` and says what it did


def rewrite(folder, name, data):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def edit_manifest(folder, change):
    m = json.loads(open(os.path.join(folder, cp_state.MANIFEST), "rb").read())
    change(m)
    rewrite(folder, cp_state.MANIFEST, json.dumps(m, indent=1).encode())


def header_end(data):
    return 8 + int.from_bytes(data[:8], "little")


def flipped(data, at, bit):
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]


def truncate(rng, folder, o):
    name = rng.choice(sorted(o["files"]))
    at = rng.randrange(len(o["files"][name]))
    rewrite(folder, name, o["files"][name][:at])
    return f"{name} truncated to {at} bytes"


def flip_header(rng, folder, o):
    name = rng.choice(o["data"])
    at, bit = rng.randrange(header_end(o["files"][name])), rng.randrange(8)
    rewrite(folder, name, flipped(o["files"][name], at, bit))
    return f"{name}: bit {bit} of header byte {at} flipped"


def flip_data(rng, folder, o):
    name = rng.choice([n for n in o["data"] if len(o["files"][n]) > header_end(o["files"][n])])
    at, bit = rng.randrange(header_end(o["files"][name]), len(o["files"][name])), rng.randrange(8)
    rewrite(folder, name, flipped(o["files"][name], at, bit))
    return f"{name}: bit {bit} of data byte {at} flipped"


def flip_manifest(rng, folder, o):
    data = o["files"][cp_state.MANIFEST]
    at, bit = rng.randrange(len(data)), rng.randrange(8)
    rewrite(folder, cp_state.MANIFEST, flipped(data, at, bit))
    return f"manifest: bit {bit} of byte {at} ({chr(data[at])!r}) flipped"


def swap(rng, folder, o):
    a, b = rng.sample(o["data"], 2)
    rewrite(folder, a, o["files"][b])
    if rng.random() < 0.5:
        rewrite(folder, b, o["files"][a])
        return f"{a} and {b} swapped"
    return f"{a} holds {b}'s bytes"


def other_attempt(rng, folder, o):
    """A file of the first save (tokens_001_..., its manifest) in place of the current one of the same role."""
    role = rng.choice(["tokens_", "ewc_", "lora_", cp_state.MANIFEST])
    old = next(n for n in o["first"] if n.startswith(role))
    new = next(n for n in o["files"] if n.startswith(role))
    rewrite(folder, new, o["first"][old])
    return f"{new} holds the first save's {old}"


def fields(m):
    """The paths of the manifest's fields that its checks know (not inside a history entry, which holds anything)."""
    paths = [(k,) for k in m]
    paths += [(k, kk) for k in ("model", "hparams", "files", "sums") for kk in m[k]]
    paths += [("files", "pool", i) for i in range(len(m["files"]["pool"]))]
    paths += [("concepts", i) + tail for i, c in enumerate(m["concepts"]) for tail in [()] + [(k,) for k in c]]
    return paths + [("history", i) for i in range(len(m["history"]))]


def parent(m, path):
    for k in path[:-1]:
        m = m[k]
    return m


def wrong_type(rng, folder, o):
    path = rng.choice(fields(o["manifest"]))
    now = parent(o["manifest"], path)[path[-1]]
    value = rng.choice([v for v in WRONG if type(v) is not type(now)])
    edit_manifest(folder, lambda m: parent(m, path).__setitem__(path[-1], value))
    return f"manifest {'.'.join(map(str, path))} = {value!r}"


def missing_key(rng, folder, o):
    path = rng.choice(fields(o["manifest"]))
    edit_manifest(folder, lambda m: parent(m, path).__delitem__(path[-1]))
    return f"manifest {'.'.join(map(str, path))} removed"


def extra_key(rng, folder, o):
    path = rng.choice([(), ("model",), ("hparams",), ("files",), ("sums",), ("concepts", 0), ("concepts", 1)])
    key, value = rng.choice(["extra", "pool/x.safetensors", "../x", "Lora", "__proto__"]), rng.choice(WRONG)
    edit_manifest(folder, lambda m: parent(m, path + (key,)).__setitem__(key, value))
    return f"manifest {'.'.join(map(str, path + (key,)))} added = {value!r}"


def hostile_name(rng, folder, o):
    """A file, a sum or a concept named out of the state (a concept's name only names exported files)."""
    outside = os.path.join(os.path.dirname(folder), "outside")
    target = rng.choice(o["data"])
    name = rng.choice(["../x.safetensors", f"../outside/{target}", f"{outside}/{target}", "/etc/passwd", "..",
                       f"pool/../{target}", "", ".", "pool", cp_state.MANIFEST, f"./{target}", f"{target}\0x",
                       "pool/task_000_../../../x.safetensors", f"{target}/"])
    where = rng.choice(["files", "sums", "concept"])
    if where == "files":
        path = rng.choice([p for p in fields(o["manifest"]) if p[0] == "files" and p[-1] != "pool"])
        edit_manifest(folder, lambda m: parent(m, path).__setitem__(path[-1], name))
    elif where == "sums":
        edit_manifest(folder, lambda m: m["sums"].__setitem__(name, m["sums"].pop(target)))
    else:
        edit_manifest(folder, lambda m: m["concepts"][0].__setitem__("name", name))
    return f"{where} {target} named {name!r}" if where == "sums" else f"{where} named {name!r}"


def folder_for_file(rng, folder, o):
    name = rng.choice(sorted(o["files"]))
    os.remove(os.path.join(folder, name))
    os.mkdir(os.path.join(folder, name))
    if rng.random() < 0.5:  # what read_vera would read from a folder
        rewrite(folder, f"{name}/adapter_model.safetensors", o["files"][name])
    return f"{name} replaced by a folder"


def link_out(rng, folder, o):
    """A file, or the pool folder, replaced by a link out of the state: to a copy of the same bytes, or of others."""
    outside = os.path.join(os.path.dirname(folder), "outside")
    name = rng.choice(sorted(o["files"]) + ["pool"])
    target = name if name == "pool" or rng.random() < 0.5 else rng.choice(sorted(o["files"]))
    path = os.path.join(folder, name)
    shutil.rmtree(path) if name == "pool" else os.remove(path)
    os.symlink(os.path.join(outside, target), path)
    return f"{name} replaced by a link to outside/{target}"


def harmless(rng, folder, o):
    """Changes that damage nothing the state gives: these must load."""
    choice = rng.randrange(9)
    if choice == 0:
        rewrite(folder, "holiday.jpg", b"not the state's")
    elif choice == 1:
        m = json.loads(o["files"][cp_state.MANIFEST])
        rewrite(folder, cp_state.MANIFEST, json.dumps(m, sort_keys=True, separators=(",", ":")).encode())
    elif choice == 2:
        edit_manifest(folder, lambda m: m["hparams"].__setitem__("seed", rng.randrange(100)))
    elif choice == 3:
        edit_manifest(folder, lambda m: m["history"][1].__setitem__("seconds", rng.random()))
    elif choice == 4:
        edit_manifest(folder, lambda m: m["hparams"].__setitem__("ewc_lambda", rng.choice([0.5, 1, 1e-6])))
    elif choice == 5:
        edit_manifest(folder, lambda m: m["concepts"][1].__setitem__("class_word", "thing"))
    elif choice == 6:
        edit_manifest(folder, lambda m: m["model"].__setitem__("path", "/elsewhere/model"))
    elif choice == 7:
        rewrite(folder, cp_state.MANIFEST, o["files"][cp_state.MANIFEST] + b"\n\n")
    else:
        edit_manifest(folder, lambda m: m["history"][0].__setitem__("extra", [1, {"a": None}]))
    return f"harmless change {choice}"


DAMAGES = [truncate, flip_header, flip_data, flip_manifest, swap, other_attempt, wrong_type, missing_key, extra_key,
           hostile_name, folder_for_file, link_out, harmless]


# ---------------------------------------------------------------------------------------------------------------
# the run


def try_state(folder, o):
    """Load the state in `folder`; where it loads, its outputs and a short next task. ("refused" | "equal" | "silent"
    | "traceback", detail)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # an older state's note
            state = cp_state.load_state(folder)
        got = outputs(o["base"], state)
    except (cp.CPError, unet.LoadError) as e:
        assert "\n" not in str(e), str(e)
        return "refused", str(e)
    except Exception:
        return "traceback", traceback.format_exc()
    if not same(got, o["reference"]):
        return "silent", "the state loads and gives other outputs"
    try:
        state.hparams = replace(state.hparams, steps=2, batch_size=2, dsc_steps=2)  # run settings are not stored
        cp.learn_concept(got[2], state, o["images"], "gamma")
    except (cp.CPError, unet.LoadError):
        pass
    except Exception:
        return "traceback", traceback.format_exc()
    return "equal", ""


def fuzz(o, root, n, seed):
    rng, folder = random.Random(seed), str(root / "state")
    write_tree(str(root / "outside"), o["files"])  # what links point to
    outside = snapshot(str(root), skip=("state",))
    counts, problems, kinds = Counter(), [], Counter()
    for i in range(n):
        write_tree(folder, o["files"])
        damage = DAMAGES[i % len(DAMAGES)]
        what = damage(rng, folder, o)
        before = snapshot(folder)
        result, detail = try_state(folder, o)
        counts["tried"] += 1
        counts[result] += 1
        kinds[damage.__name__, result] += 1
        if result in ("traceback", "silent") or (damage is harmless and result != "equal"):
            problems.append(f"{what}: {result}: {detail}")
        if snapshot(folder) != before:
            counts["state written"] += 1
            problems.append(f"{what}: the load changed the state folder")
        if snapshot(str(root), skip=("state",)) != outside:
            counts["outside writes"] += 1
            problems.append(f"{what}: a file outside the state changed")
            outside = snapshot(str(root), skip=("state",))
        write_tree(folder, o["files"])
        cp_state.load_state(folder)  # the original, restored, loads
    print(f"\nfuzz ({n} damages, seed {seed}): tried {counts['tried']}, refused {counts['refused']}, equal "
          f"{counts['equal']}, tracebacks {counts['traceback']}, outside writes {counts['outside writes']}, silent "
          f"{counts['silent']}, state written by a load {counts['state written']}")
    print("  " + ", ".join(f"{d.__name__} {kinds[d.__name__, 'refused']}/{kinds[d.__name__, 'equal']}"
                           for d in DAMAGES) + "  (refused/equal)")
    return counts, problems, kinds


def check_restored_trains_and_samples(o, root):
    """The restored original takes a next task, saves it (the kept pool entries keep their sums) and samples."""
    folder = str(root / "state")
    state = cp_state.load_state(folder)
    _, _, model = outputs(o["base"], state)
    state.hparams = replace(state.hparams, steps=2, batch_size=2, dsc_steps=2)  # run settings are not stored
    cp_state.save_state(cp.learn_concept(model, state, o["images"], "gamma"), folder)
    m = json.loads(open(os.path.join(folder, cp_state.MANIFEST)).read())
    assert [m["sums"][p] for p in m["files"]["pool"][:2]] == [o["manifest"]["sums"][p] for p in
                                                            o["manifest"]["files"]["pool"]]
    model, state = cp_state.load_with_state(folder)
    image = sample.sample(model, ["a photo of a <gamma>"], steps=2, seed=0)
    assert len(state.concepts) == 3 and torch.isfinite(image).all()


@pytest.mark.parametrize("n, seed", [(390, 0), pytest.param(3900, 1, marks=pytest.mark.slow)])
def test_fuzz_the_state(original, tmp_path, n, seed):
    counts, problems, kinds = fuzz(original, tmp_path, n, seed)
    assert not problems, "\n".join(problems[:10])
    assert counts["tried"] == n and counts["refused"] + counts["equal"] == n
    assert all(kinds[d.__name__, "refused"] > 0 for d in DAMAGES if d is not harmless)  # each damage was met
    check_restored_trains_and_samples(original, tmp_path)


def test_fuzz_through_the_command_lines(original, tmp_path):
    """A handful of the damages as a user meets them: one `error:` line, exit status 1, nothing written outside."""
    folder, out = str(tmp_path / "state"), tmp_path / "out"
    write_tree(str(tmp_path / "outside"), original["files"])
    out.mkdir()
    o = original
    cases = [
        (lambda: flip_data(random.Random(0), folder, o), ["sample.py", "--prompt", PROMPT, "--out", str(out / "s.png")],
         "SHA-256"),
        (lambda: edit_manifest(folder, lambda m: m.__setitem__("format", 999)),
         ["train.py", "--concept", o["gamma"], *CLI_FAST], "has state format 999"),
        (lambda: edit_manifest(folder, lambda m: m.__setitem__("history", 7)),
         ["train.py", "--export", str(out / "export")], "history must be a list, got int"),
        (lambda: link_out(random.Random(3), folder, o), ["sample.py", "--prompt", PROMPT, "--out", str(out / "s.png")],
         "link"),
        (lambda: edit_manifest(folder, lambda m: m["files"].__setitem__("lora", "../outside/" + m["files"]["lora"])),
         ["train.py", "--concept", o["gamma"], *CLI_FAST], "files.lora must be"),
    ]
    for damage, argv, fragment in cases:
        write_tree(folder, o["files"])
        damage()
        outside = snapshot(str(tmp_path), skip=("state",))
        r = subprocess.run([sys.executable, argv[0], "--state", folder, *argv[1:]], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert_one_line_error(r, fragment)
        assert snapshot(str(tmp_path), skip=("state",)) == outside and not os.listdir(out)
        print(f"\n{' '.join(argv[:1])}: {r.stderr.strip()}", end="")
    print()
