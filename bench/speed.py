"""Speed and memory benchmarks: the hand-written UNet vs diffusers' UNet2DConditionModel (same weights, same inputs).

Each figure is the median of several timed runs after warm-up; both implementations run in the same process,
alternating, so the ratio ours/diffusers is fair on a busy machine. Prints a table and writes JSON.

    python bench/speed.py                       # all sections, writes bench/speed.json
    python bench/speed.py --only unet --repeats 5
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unet  # noqa: E402


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats, device, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, device):
    """Peak allocated bytes of one call (CUDA only; CPU allocations are not tracked by torch)."""
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated()


def bench_unet(device, dtype, repeats):
    """Forward (no grad) and forward+backward of both UNets on the SD v1.5 config and on the small preset."""
    from diffusers import UNet2DConditionModel
    rows = []
    for name, cfg, batch, side in (("sd-v1.5", unet.PRESETS["sd-v1"]["unet"], 2, 32),
                                   ("tiny", unet.PRESETS["tiny"]["unet"], 8, 16)):
        torch.manual_seed(0)
        theirs = UNet2DConditionModel(**cfg).to(device, dtype)
        ours = unet.UNet(cfg).to(device, dtype)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (batch,), device=device)
        c = torch.randn(batch, 77, cfg["cross_attention_dim"], device=device, dtype=dtype)
        nets = {"ours": lambda *a: ours(*a), "diffusers": lambda *a: theirs(*a).sample}

        def forward(f):
            with torch.no_grad():
                f(x, t, c)

        def forward_backward(f):
            f(x, t, c).float().square().mean().backward()

        for mode, run in (("forward", forward), ("forward+backward", forward_backward)):
            times = {k: [] for k in nets}
            for k, f in nets.items():
                run(f)  # warm-up
            for _ in range(repeats):  # alternate so both see the same machine load
                for k, f in nets.items():
                    times[k].append(median_time(lambda: run(f), 1, device, warmup=0))
            med = {k: statistics.median(v) for k, v in times.items()}
            mem = {k: peak_memory(lambda: run(f), device) for k, f in nets.items()}
            rows.append(dict(section="unet", config=name, shape=f"{batch}x4x{side}x{side}", mode=mode,
                             ours_s=med["ours"], diffusers_s=med["diffusers"], ratio=med["ours"] / med["diffusers"],
                             ours_peak_bytes=mem["ours"], diffusers_peak_bytes=mem["diffusers"]))
            r = rows[-1]
            print(f"unet {name:8s} {r['shape']:12s} {mode:17s} ours {r['ours_s'] * 1e3:9.1f} ms  "
                  f"diffusers {r['diffusers_s'] * 1e3:9.1f} ms  ratio {r['ratio']:.3f}", flush=True)
            for net in (ours, theirs):
                net.zero_grad(set_to_none=True)
        del ours, theirs
    return rows


SECTIONS = {"unet": bench_unet}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed.json"))
    args = p.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; dtype {args.dtype}; median of {args.repeats}")
    rows = []
    for name in args.only.split(","):
        rows += SECTIONS[name](args.device, getattr(torch, args.dtype), args.repeats)
    with open(args.out, "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, dtype=args.dtype, repeats=args.repeats,
                       command="python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
