"""What checking a state's SHA-256 sums adds to a load: `cp_state.load_state` of a state of ten concepts (ewc: token
rows, Fisher and anchor, the carried LoRA, ten pool entries; kv+ff, rank 8), verified (cp-state/3) and unverified
(the same files under a cp-state/1 manifest, which records no sums), on the toy model and at SD v1.5's size. The
tensors are random, of the shapes such a state holds; the files are read from the page cache, as on a second load.

    python bench/verify.py [--repeats 7]
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cp  # noqa: E402
import cp_state  # noqa: E402
import lora  # noqa: E402
import unet  # noqa: E402


def fake_state(unet_config, dim, n=10):
    hp = cp.Hparams(method="ewc")
    with torch.device("meta"):  # only the Linear layers' shapes are needed
        modules = lora.target_modules(unet.UNet(unet_config), hp.targets)
    adapter = lambda: {p: (torch.randn(hp.rank, m.in_features), torch.randn(m.out_features, hp.rank))
                       for p, m in modules}
    concepts = [{"name": f"c{i}", "token": f"<c{i}>", "prompt": f"a photo of a <c{i}>", "class_word": None, "task": i}
                for i in range(n)]
    pool = [adapter() for _ in range(n)]
    anchor = cp.flat(pool[-1])
    return cp.State(model={"path": "none", "fingerprint": "none"}, hparams=hp, concepts=concepts,
                    history=[{} for _ in concepts], lora=pool[-1], pool=pool,
                    tokens={c["token"]: torch.randn(dim) for c in concepts},
                    fisher={k: v.abs() for k, v in anchor.items()}, anchor=anchor)


def seconds(f, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(label, state, repeats, tmp):
    verified, unverified = os.path.join(tmp, label, "v2"), os.path.join(tmp, label, "v1")
    cp_state.save_state(state, verified)
    shutil.copytree(verified, unverified)
    with open(os.path.join(unverified, cp_state.MANIFEST)) as f:
        m = json.load(f)
    m["format"] = "cp-state/1"
    del m["sums"]
    with open(os.path.join(unverified, cp_state.MANIFEST), "w") as f:
        json.dump(m, f)
    names = cp_state._named(m["files"])
    size = sum(os.path.getsize(os.path.join(verified, n)) for n in names)
    with contextlib.redirect_stderr(io.StringIO()):  # the unverified state's note
        for folder in (verified, unverified):  # warm the page cache
            cp_state.load_state(folder)
        on, off = (seconds(lambda f=f: cp_state.load_state(f), repeats) for f in (verified, unverified))
    sha = seconds(lambda: [cp_state._sha256(os.path.join(verified, n)) for n in names], repeats)
    print(f"| {label} | {len(names)} | {size / 2 ** 20:.1f} MiB | {on * 1e3:.1f} ms | {off * 1e3:.1f} ms | "
          f"+{(on - off) * 1e3:.1f} ms ({on / off - 1:+.0%}) | {sha * 1e3:.1f} ms |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    with open(os.path.join(ROOT, "toy", "model", "unet", "config.json")) as f:
        toy_unet = json.load(f)
    with open(os.path.join(ROOT, "toy", "model", "text_encoder", "config.json")) as f:
        toy_dim = json.load(f)["hidden_size"]
    print("| model | files | size | load, verified | load, unverified | verification | SHA-256 alone |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        measure("toy", fake_state(toy_unet, toy_dim), args.repeats, tmp)
        measure("SD v1.5", fake_state(unet.PRESETS["sd-v1"]["unet"], 768), args.repeats, tmp)


if __name__ == "__main__":
    main()
