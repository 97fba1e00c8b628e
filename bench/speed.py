"""Speed and memory benchmarks: the hand-written UNet vs diffusers' UNet2DConditionModel (same weights, same inputs).

Each figure is the median of several timed runs after warm-up; both implementations run in the same process,
alternating, so the ratio ours/diffusers is fair on a busy machine. Prints a table and writes JSON.

    python bench/speed.py                       # all sections, writes bench/speed.json
    python bench/speed.py --only unet --repeats 5
    python bench/speed.py --only conv           # direct vs im2col for every 3×3 convolution of the UNet
    python bench/speed.py --only pretrain       # a pretraining step of every VAE and UNet candidate of toy/pretrain.py
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import unet  # noqa: E402
from kernels import dc_errors, dc_loss_impl  # noqa: E402


# (name, UNet config, batch, latent side) of the UNet benchmarks: SD v1.5 at a small latent size, the tiny preset
UNET_CASES = (("sd-v1.5", unet.PRESETS["sd-v1"]["unet"], 2, 32), ("tiny", unet.PRESETS["tiny"]["unet"], 8, 16))


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
    """Peak bytes one call allocates above what was allocated before it (CUDA only; torch does not track CPU
    allocations): what it needs beyond the weights already in memory."""
    if device != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - before


def bench_unet(device, dtype, repeats, cases=UNET_CASES):
    """Forward (no grad) and forward+backward of both UNets, by default on the SD v1.5 config and the small preset.
    Peak memory (CUDA) is what one call needs beyond the weights, weight gradients included."""
    from diffusers import UNet2DConditionModel
    rows = []
    for name, cfg, batch, side in cases:
        torch.manual_seed(0)
        with torch.device(device):  # initialised where they run: fast on a GPU for SD's 860M parameters
            theirs = UNet2DConditionModel(**cfg).to(dtype)
            ours = unet.UNet(cfg).to(dtype)
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
            for i in range(repeats):  # alternate, first one then the other first, so both see the same load
                for k in (list(nets) if i % 2 == 0 else list(nets)[::-1]):
                    times[k].append(median_time(lambda: run(nets[k]), 1, device, warmup=0))
            med = {k: statistics.median(v) for k, v in times.items()}
            for net in (ours, theirs):
                net.zero_grad(set_to_none=True)
            mem = {k: peak_memory(lambda: run(f), device) for k, f in nets.items()}
            # the median of paired ratios: each pair ran back to back, so slow drifts of machine load cancel
            ratio = statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))
            rows.append(dict(section="unet", config=name, shape=f"{batch}x4x{side}x{side}", mode=mode,
                             ours_s=med["ours"], diffusers_s=med["diffusers"], ratio=ratio,
                             ours_peak_bytes=mem["ours"], diffusers_peak_bytes=mem["diffusers"]))
            r = rows[-1]
            peaks = f"  peak {mem['ours'] / 2**20:.0f} / {mem['diffusers'] / 2**20:.0f} MiB" if mem["ours"] else ""
            print(f"unet {name:8s} {r['shape']:12s} {mode:17s} ours {r['ours_s'] * 1e3:9.1f} ms  "
                  f"diffusers {r['diffusers_s'] * 1e3:9.1f} ms  ratio {r['ratio']:.3f}{peaks}", flush=True)
            for net in (ours, theirs):
                net.zero_grad(set_to_none=True)
        del ours, theirs
    return rows


def bench_conv(device, dtype, repeats):
    """Every 3×3 convolution the UNet runs (SD v1.5 at 2×4×32×32, the tiny preset at 8×4×16×16), both ways: the
    direct convolution of nn.Conv2d (oneDNN on a CPU) and `unet.conv2d_im2col`, forward and forward+backward; one
    row per distinct shape saying which path `unet.Conv2d` takes, and totals over all the UNet's calls."""
    rows = []
    for name, cfg, batch, side in UNET_CASES:
        net = unet.UNet(cfg).to(device, dtype)
        calls = []
        hooks = [m.register_forward_hook(lambda m, inp, out: calls.append((m, tuple(inp[0].shape))))
                 for m in net.modules() if isinstance(m, unet.Conv2d)]
        with torch.no_grad():
            net(torch.randn(batch, 4, side, side, device=device, dtype=dtype), torch.zeros(batch, dtype=torch.long,
                device=device), torch.randn(batch, 77, cfg["cross_attention_dim"], device=device, dtype=dtype))
        for h in hooks:
            h.remove()
        shapes = {}  # one timing per distinct (input shape, weight shape, stride), weighted by how often it runs
        for m, shape in calls:
            key = (shape, tuple(m.weight.shape), m.stride[0])
            shapes[key] = (m, shapes.get(key, (m, 0))[1] + 1)
        total = {f"{k}_{p}": 0.0 for k in ("direct", "im2col", "ours") for p in ("f", "fb")}
        patch_bytes = 0  # what the im2col path keeps for the weights' gradient: the unfolded patches
        for (shape, wshape, stride), (m, n) in sorted(shapes.items()):
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            row = dict(section="conv", config=name, input="x".join(map(str, shape)), out_channels=wshape[0],
                       stride=stride, calls=n, ours="im2col" if m.uses_im2col(x) else "direct")
            if m.uses_im2col(x):
                patch_bytes += n * m(x.detach()).numel() // wshape[0] * wshape[1] * wshape[2] * wshape[3] * x.element_size()
            paths = {"direct": lambda: torch.nn.Conv2d.forward(m, x), "im2col": lambda: unet.conv2d_im2col(m, x)}
            for k, f in paths.items():
                with torch.no_grad():
                    row[f"{k}_f_s"] = median_time(f, repeats, device)
                row[f"{k}_fb_s"] = median_time(lambda: f().sum().backward(), repeats, device)
            for p in ("f", "fb"):
                for k in paths:
                    total[f"{k}_{p}"] += n * row[f"{k}_{p}_s"]
                total[f"ours_{p}"] += n * row[f"{row['ours']}_{p}_s"]
            rows.append(row)
            print(f"conv {name:8s} {row['input']:14s} -> {wshape[0]:5d} s{stride} x{n:<3d} | forward direct "
                  f"{row['direct_f_s'] * 1e3:7.2f} ms im2col {row['im2col_f_s'] * 1e3:7.2f} ms | forward+backward "
                  f"direct {row['direct_fb_s'] * 1e3:7.2f} ms im2col {row['im2col_fb_s'] * 1e3:7.2f} ms | "
                  f"ours: {row['ours']}", flush=True)
            net.zero_grad(set_to_none=True)
        print(f"conv {name:8s} all calls, forward / forward+backward: all direct (nn.Conv2d) {total['direct_f']:.3f} "
              f"s / {total['direct_fb']:.3f} s, all im2col {total['im2col_f']:.3f} s / {total['im2col_fb']:.3f} s, "
              f"ours (unet.Conv2d) {total['ours_f']:.3f} s / {total['ours_fb']:.3f} s", flush=True)
        weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        print(f"conv {name:8s} memory: unfolded patches kept for the backward by ours {patch_bytes / 2**20:.1f} MiB; "
              f"all the UNet's weights, and so their gradients, {weight_bytes / 2**20:.1f} MiB", flush=True)
        rows.append(dict(section="conv", config=name, input="all calls", patch_bytes=patch_bytes,
                         weight_bytes=weight_bytes, **{k + "_s": v for k, v in total.items()}))
    return rows


def copy_bandwidth(device, repeats, nbytes):
    """GB/s of a device-to-device copy of `nbytes` (bytes read + bytes written): the memory roof, measured."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), repeats, device.type) / 1e9


def bench_kernel(device, dtype, repeats, K=4, latent=(4, 64, 64)):
    """Fused DC-error kernel vs the eager PyTorch reference at SD latent size, B*K from 4 to 64.

    Effective GB/s counts the bytes an ideal implementation moves: forward reads pred and noise once
    ((B*K + B) * D elements); forward+backward adds a read of both and a write of dpred ((3 B*K + 2 B) * D).
    'roof' is the share of a device-to-device copy's GB/s measured in the same run, on a buffer larger than any
    cache (1 GiB on CUDA); inputs small enough to stay in a GPU's L2 cache can exceed it.
    On CPU the 'kernel' column is the reference unless TRITON_INTERPRET=1 (then it is the interpreter, and slow);
    the path column says which ran.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    dtypes = [torch.float32, torch.float16 if cuda else torch.bfloat16]
    D = 1
    for s in latent:
        D *= s
    roof = copy_bandwidth(device, 20 if cuda else repeats, 2**30 if cuda else 2**28)
    rows = []
    for dtype in dtypes:
        for BK in (4, 8, 16, 32, 64):
            B = max(1, BK // K)
            pred = torch.randn(B, BK // B, *latent, device=device, dtype=dtype, requires_grad=True)
            noise = torch.randn(B, *latent, device=device, dtype=dtype)
            g = torch.ones(B, BK // B, device=device)
            path = dc_loss_impl(pred)
            n_rep = 50 if cuda else 3 if path == "triton-interpret" else repeats
            es = pred.element_size()
            row = dict(device=name, path=path, dtype=str(dtype).replace("torch.", ""), BK=BK, D=D)
            for label, impl in (("kernel", "auto"), ("ref", "reference")):
                with torch.no_grad():
                    t_f = median_time(lambda: dc_errors(pred, noise, impl=impl), n_rep, device.type)
                t_fb = median_time(lambda: torch.autograd.grad(dc_errors(pred, noise, impl=impl), pred, g),
                                   n_rep, device.type)
                row[f"fwd_ms_{label}"] = 1e3 * t_f
                row[f"fwdbwd_ms_{label}"] = 1e3 * t_fb
                row[f"fwd_GBs_{label}"] = (BK + B) * D * es / t_f / 1e9
                row[f"fwdbwd_GBs_{label}"] = (3 * BK + 2 * B) * D * es / t_fb / 1e9
            row["speedup_fwdbwd"] = row["fwdbwd_ms_ref"] / row["fwdbwd_ms_kernel"]
            row["copy_GBs"] = roof
            row["roof_fwd"], row["roof_fwdbwd"] = row["fwd_GBs_kernel"] / roof, row["fwdbwd_GBs_kernel"] / roof
            rows.append(row)
    print(f"\nDC-error kernel on {name} (latent {'x'.join(map(str, latent))}, K={K}); ms, effective GB/s, share of "
          f"the copy roof ({roof:.1f} GB/s)")
    print(f"{'path':>16} {'dtype':>8} {'B*K':>4} | {'fwd':>8} {'GB/s':>6} {'roof':>5} {'ref fwd':>8} {'GB/s':>6} | "
          f"{'fwd+bwd':>8} {'GB/s':>6} {'roof':>5} {'ref f+b':>8} {'GB/s':>6} | {'speedup':>7}")
    for r in rows:
        print(f"{r['path']:>16} {r['dtype']:>8} {r['BK']:>4} | {r['fwd_ms_kernel']:8.3f} {r['fwd_GBs_kernel']:6.1f} "
              f"{r['roof_fwd']:5.0%} {r['fwd_ms_ref']:8.3f} {r['fwd_GBs_ref']:6.1f} | {r['fwdbwd_ms_kernel']:8.3f} "
              f"{r['fwdbwd_GBs_kernel']:6.1f} {r['roof_fwdbwd']:5.0%} {r['fwdbwd_ms_ref']:8.3f} "
              f"{r['fwdbwd_GBs_ref']:6.1f} | {r['speedup_fwdbwd']:7.2f}")
    return rows


def bench_methods(device, dtype, repeats, model_path=None, steps=(4, 12)):
    """Per-step cost of each method relative to `seq` on the second task (EWC needs a Fisher from the first).

    A step's cost is (time of n2 steps − time of n1 steps) / (n2 − n1): fixed costs (Fisher, setup) cancel.
    DSC's consolidation step is timed the same way through dsc_steps.
    """
    from dataclasses import replace

    import cp
    model_path = model_path or os.path.join(ROOT, "toy", "model")
    folders = sorted(os.path.join(ROOT, "examples", "concepts", d) for d in os.listdir(os.path.join(ROOT, "examples", "concepts")))[:2]
    rows, per_step = [], {}
    for method in cp.METHODS:
        def task_seconds(n, dsc_n=0):
            model = unet.load_model(model_path, device)
            state = cp.new_state(model, cp.Hparams(method=method, steps=2, dsc_steps=2, fisher_samples=2))
            state = cp.learn_concept(model, state, folders[0], log=False)
            state.hparams = replace(state.hparams, steps=n, dsc_steps=dsc_n, fisher_samples=2)
            t0 = time.perf_counter()
            cp.learn_concept(model, state, folders[1], log=False)
            sync(device)
            return time.perf_counter() - t0
        n1, n2 = steps
        per_step[method] = statistics.median((task_seconds(n2) - task_seconds(n1)) / (n2 - n1) for _ in range(repeats))
        row = dict(section="methods", method=method, step_s=per_step[method], vs_seq=per_step[method] / per_step["seq"])
        if method.startswith("dsc"):
            row["consolidation_step_s"] = statistics.median(
                (task_seconds(n1, n2) - task_seconds(n1, n1)) / (n2 - n1) for _ in range(repeats))
        rows.append(row)
        extra = f"  consolidation step {row['consolidation_step_s'] * 1e3:7.1f} ms" if "consolidation_step_s" in row else ""
        print(f"method {method:11s} step {row['step_s'] * 1e3:8.1f} ms  vs seq {row['vs_seq']:.2f}x{extra}", flush=True)
    return rows


def bench_train(device, dtype, repeats, model_path=None):
    """End-to-end `python train.py --concept ...` with defaults: wall time and peak resident memory of the process."""
    import resource
    import subprocess
    import tempfile
    concept = os.path.join(ROOT, "examples", "concepts", sorted(os.listdir(os.path.join(ROOT, "examples", "concepts")))[0])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--concept", concept, "--state", os.path.join(tmp, "state"),
               "--device", device] + (["--model", model_path] if model_path else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"train.py end to end: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB ({' '.join(cmd[1:])})", flush=True)
    return [dict(section="train", command=" ".join(cmd[1:]), seconds=seconds, peak_rss_bytes=peak)]


def bench_pretrain(device, dtype, repeats):
    """One pretraining step's forward + backward for every candidate of toy/pretrain.py: each VAE on a batch of 16
    32×32 crops, each UNet with the text encoder on a batch of 32 latents (what sets the pretraining budget)."""
    from toy import pretrain
    rows = []
    text = pretrain.text_encoder_from(unet.load_tokenizer(os.path.join(ROOT, "toy", "model", "tokenizer"))).to(device)
    ids = torch.randint(0, 200, (32, 77), device=device)
    for kind, cfgs in (("vae", pretrain.VAES), ("unet", pretrain.UNETS)):
        for name, cfg in cfgs.items():
            if kind == "vae":
                net, x = unet.VAE(cfg).to(device), torch.randn(16, 3, 32, 32, device=device)
                step = lambda: (lambda m, s: net.decode(m + s))(*net.encode(x)).square().mean().backward()
            else:
                net, x = unet.UNet(cfg).to(device), torch.randn(32, 4, 16, 16, device=device)
                t = torch.randint(0, 1000, (32,), device=device)
                step = lambda: net(x, t, text(ids).last_hidden_state).square().mean().backward()
            with torch.autocast(device, dtype, enabled=dtype != torch.float32):
                seconds = median_time(step, repeats, device)
            params = sum(p.numel() for p in net.parameters())
            rows.append(dict(section="pretrain", kind=kind, candidate=name, params=params, step_s=seconds))
            print(f"pretrain {kind} {name:7s} {params / 1e6:5.2f} M parameters  step {seconds * 1e3:7.1f} ms",
                  flush=True)
    return rows


SECTIONS = {"unet": bench_unet, "conv": bench_conv, "kernel": bench_kernel, "methods": bench_methods,
            "train": bench_train, "pretrain": bench_pretrain}


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
