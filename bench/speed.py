"""Speed and memory benchmarks: the hand-written UNet vs diffusers' UNet2DConditionModel (same weights, same inputs).

Each figure is the median of several timed runs after warm-up; both implementations run in the same process,
alternating, so the ratio ours/diffusers is fair on a busy machine. Prints a table and writes JSON.

    python bench/speed.py                       # all sections, writes bench/speed.json
    python bench/speed.py --only unet --repeats 5
    python bench/speed.py --only conv           # direct vs im2col for every 3×3 convolution of the UNet
    python bench/speed.py --only pretrain       # a pretraining step of every VAE and UNet candidate of toy/pretrain.py
    python bench/speed.py --only kernel         # the fused DC loss vs eager and compiled PyTorch (see bench_kernel)
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import triton.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import unet  # noqa: E402
import dc_score  # noqa: E402
from dc_kernels import dc_loss_impl  # noqa: E402


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
                patch_bytes += (n * m(x.detach()).numel() // wshape[0] * wshape[1] * wshape[2] * wshape[3]
                                * x.element_size())
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


# ---------------------------------------------------------------------------------------------------------------
# the fused DC loss: what a step computes from the UNet's predictions, three ways

TAU = 0.05  # the DC posterior's temperature (cp.Hparams.dc_temp)


def loss_case(name, B, K, latent, device, dtype, seed=0):
    """pred (requiring grad), and loss(impl, pred) -> (outputs, their upstream gradients) for one case:
    'fisher' and 'sweep': the DC cross-entropy, target 0 (the Fisher's, B = 1); 'dsc': the soft cross-entropy
    against a teacher's posterior (DSC takes one per teacher); 'task': δ·L_DC's ragged batch, the first 2 of B images
    under K prompts and the others under the target alone (L_DC of the 2, and the errors L_denoise reads)."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * K + B - 2 if name == "task" else B * K
    pred = torch.randn(rows, *latent, generator=g).to(device, dtype).requires_grad_()
    noise = torch.randn(B, *latent, generator=g).to(device, dtype)
    teacher = torch.softmax(torch.randn(B, K, generator=g), -1).to(device)
    g_image = torch.full((B,), 1 / B, device=device)
    g_dc = torch.zeros(2, K, device=device)
    g_dc[:, 0] = 1 / B  # L_denoise reads the target's column of the DC images

    def loss(impl, pred):
        if name == "task":
            ce, e_dc = dc_score.dc_cross_entropy(pred[:2 * K].view(2, K, *latent), noise[:2], 0, TAU, impl=impl)
            e = dc_score.dc_errors(pred[2 * K:, None], noise[2:], impl=impl)[:, 0]
            return (ce, e_dc, e), (g_image[:2], g_dc, g_image[2:])
        if name == "dsc":
            L, _ = dc_score.soft_cross_entropy(pred.view(B, K, *latent), noise, teacher, TAU, impl=impl)
        else:
            L, _ = dc_score.dc_cross_entropy(pred.view(B, K, *latent), noise, 0, TAU, impl=impl)
        return (L,), (g_image,)
    return pred, loss


def device_ms(fn, cuda, repeats):
    """Device milliseconds per call. CUDA: fn captured in a CUDA graph and replayed back to back, timed by CUDA
    events (triton.testing.do_bench_cudagraph; no host work in the way), or, if fn cannot be captured, 100 calls
    back to back between two events. CPU: the median of `repeats` calls."""
    if not cuda:
        return 1e3 * median_time(fn, repeats, "cpu"), "wall"
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"), "cudagraph"
    except Exception:  # noqa: BLE001 (any capture failure: time it uncaptured)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 100, "events"


def host_costs(fn, cuda, n=50):
    """(enqueue ms, synced latency ms) per call: the host's time to queue n calls back to back (synchronised once,
    after), and the median of n calls each waited for."""
    sync("cuda" if cuda else "cpu")
    start = time.perf_counter()
    for _ in range(n):
        fn()
    enqueue = (time.perf_counter() - start) / n
    sync("cuda" if cuda else "cpu")
    return 1e3 * enqueue, 1e3 * median_time(fn, n, "cuda" if cuda else "cpu", warmup=0)


def launches(fn):
    """(kernels, host syncs) of one call: device events in the profiler (kernels, copies, fills) and the syncs
    torch's sync-debug mode reports."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return n, sum("synchroniz" in str(w.message) for w in caught)


def time_loss(loss, pred, cuda, repeats):
    """Forward and forward+backward of one way of computing the loss (loss(pred) -> (outputs, upstream gradients)):
    device time, host enqueue and synced latency, kernels and host syncs of a forward+backward."""
    def forward_backward():
        outputs, grads = loss(pred)
        return torch.autograd.grad(outputs, pred, grads)
    forward_backward()  # compile, warm the allocator
    fwd, _ = device_ms(lambda: loss(pred), cuda, repeats)
    fb, timer = device_ms(forward_backward, cuda, repeats)
    enqueue, latency = host_costs(forward_backward, cuda)
    kernels, syncs = launches(forward_backward) if cuda else (None, None)
    return dict(fwd_ms=fwd, fwdbwd_ms=fb, timer=timer, enqueue_ms=enqueue, latency_ms=latency, kernels=kernels,
                syncs=syncs)


def step_ms(device, dtype, rows, latent, repeats):
    """Device time of the UNet's forward+backward over `rows` latents (a training step's UNet batch): SD v1.5 on CUDA,
    the tiny preset on a CPU."""
    cfg = unet.PRESETS["sd-v1" if device.type == "cuda" and latent[-1] >= 32 else "tiny"]["unet"]
    torch.manual_seed(0)
    with torch.device(device):
        net = unet.UNet(cfg).to(dtype)
        x = torch.randn(rows, *latent, dtype=dtype)
        t = torch.randint(0, 1000, (rows,))
        c = torch.randn(rows, 77, cfg["cross_attention_dim"], dtype=dtype)
    params = [p for p in net.parameters()]
    step = lambda: torch.autograd.grad(net(x, t, c).float().square().mean(), params)  # noqa: E731
    step()
    if device.type == "cuda":
        return triton.testing.do_bench(step, rep=500, return_mode="median")
    return 1e3 * median_time(step, repeats, "cpu")


def bench_kernel(device, dtype, repeats, quick=False):
    """The fused DC loss (dc_kernels/fused.py) against the eager PyTorch reference and torch.compile of the same
    reference, at the shapes a step uses and over B·K.

    Cases: fisher (B = 1, K = 5, hard target), task (δ·L_DC's ragged batch: B = 8, the first 2 images under K = 3
    prompts), dsc (B = 8, K = 3, soft target), and sweep (K = 4, B·K from 4 to 4096, hard target); latents 4x64x64 on
    CUDA, the toy model's 4x16x16 on a CPU, 4x8x8 with quick. Each way: forward and forward+backward device time
    (ms; CUDA graphs replayed back to back, timed by CUDA events), the host's enqueue time and the synced latency of
    a forward+backward, its kernels (profiler) and host syncs (sync-debug mode). 'kernel' is the Triton op itself
    (impl='triton'; CUDA only); 'auto' says which path dc_score's functions pick by themselves. dtype None: bf16, fp16
    and fp32.
    The compiled reference (torch.compile, fullgraph) runs on CUDA only (inductor takes about a minute per shape on
    a small CPU) and in bf16 only, the training dtype. Last, the loss's share of a training step: the task case
    against the UNet's forward+backward over the same rows.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    latent = (4, 8, 8) if quick else (4, 64, 64) if cuda else (4, 16, 16)
    D = latent[0] * latent[1] * latent[2]
    dtypes = [dtype] if dtype else [torch.bfloat16, torch.float16, torch.float32]
    sweep = (4, 16, 64) if quick else (4, 16, 64, 256, 1024, 4096)
    cases = [("fisher", 1, 5), ("task", 8, 3), ("dsc", 8, 3)] + [("sweep", bk // 4, 4) for bk in sweep]
    roof = copy_bandwidth(device, 20 if cuda else repeats, 2**30 if cuda else 2**26)
    rows = []
    for dt in dtypes:
        for name, B, K in cases:
            pred, loss = loss_case(name, B, K, latent, device, dt)
            first = pred[:2 * K if name == "task" else B * K].view(-1, K, *latent)  # what the DC loss is given
            row = dict(section="kernel", case=name, dtype=str(dt).replace("torch.", ""), B=B, K=K, D=D,
                       auto=dc_loss_impl(first), copy_GBs=roof)
            ways = {"eager": lambda p, f=loss: f("reference", p)}
            if cuda and not quick and dt == torch.bfloat16:
                torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no stale guards
                ways["compiled"] = torch.compile(ways["eager"], fullgraph=True, dynamic=False)
            if cuda and dc_loss_impl(first, "triton") == "triton":
                ways["kernel"] = lambda p, f=loss: f("triton", p)
            for way, fn in ways.items():
                row.update({f"{way}_{k}": v for k, v in time_loss(fn, pred, cuda, repeats).items()})
            if "kernel_fwdbwd_ms" in row:
                # an ideal forward+backward reads pred and the noise twice and writes dpred: (3 B·K + 2 B) D elements
                row["kernel_GBs"] = (3 * B * K + 2 * B) * D * pred.element_size() / row["kernel_fwdbwd_ms"] / 1e6
                for way in ("eager", "compiled"):
                    if f"{way}_fwdbwd_ms" in row:
                        row[f"speedup_vs_{way}"] = row[f"{way}_fwdbwd_ms"] / row["kernel_fwdbwd_ms"]
                # dispatch chooses between the kernel and the eager reference: is its choice the faster one?
                picked, other = ("kernel", "eager") if row["auto"] == "triton" else ("eager", "kernel")
                row["auto_is_faster"] = row[f"{picked}_fwdbwd_ms"] <= row[f"{other}_fwdbwd_ms"]
            rows.append(row)
            print(kernel_line(row), flush=True)
    task = next(r for r in rows if r["case"] == "task" and r["dtype"] == str(dtypes[0]).replace("torch.", ""))
    n_rows = 2 * task["K"] + task["B"] - 2
    unet_ms = step_ms(device, dtypes[0], n_rows, latent, repeats)
    share = dict(section="kernel-step", dtype=task["dtype"], rows=n_rows, latent="x".join(map(str, latent)),
                 unet_fwdbwd_ms=unet_ms, **{f"{w}_share": task[f"{w}_fwdbwd_ms"] / (unet_ms + task[f"{w}_fwdbwd_ms"])
                                           for w in ("eager", "compiled", "kernel") if f"{w}_fwdbwd_ms" in task})
    rows.append(share)
    print(f"training step ({share['rows']} UNet rows of {share['latent']}, {share['dtype']}): UNet forward+backward "
          f"{unet_ms:.2f} ms; the task loss's share: " + ", ".join(f"{k[:-6]} {v:.3%}" for k, v in share.items()
                                                                    if k.endswith("_share")))
    crossover = kernel_crossover(rows, D)
    if crossover:
        print(f"the kernel is at least as fast as every reference from B·K = {crossover // D} on, in every dtype: "
              f"KERNEL_MIN_NUMEL = {crossover} (dc_kernels/__init__.py)")
    return rows


def kernel_line(r):
    """One printed line: per way, forward / forward+backward device us, host enqueue and synced latency, kernels."""
    ways = [w for w in ("eager", "compiled", "kernel") if f"{w}_fwdbwd_ms" in r]
    cells = " | ".join(f"{w} {r[f'{w}_fwd_ms'] * 1e3:7.1f} / {r[f'{w}_fwdbwd_ms'] * 1e3:7.1f} us (host "
                       f"{r[f'{w}_enqueue_ms'] * 1e3:6.1f}, synced {r[f'{w}_latency_ms'] * 1e3:6.1f}" +
                       (f", {r[f'{w}_kernels']} kernels, {r[f'{w}_syncs']} syncs)" if r[f"{w}_kernels"] is not None
                        else ")") for w in ways)
    speed = " ".join(f"x{r[k]:.2f} vs {k[11:]}" for k in ("speedup_vs_eager", "speedup_vs_compiled") if k in r)
    return f"kernel {r['case']:6s} {r['dtype']:8s} B={r['B']:<4d} K={r['K']} auto={r['auto']:9s} | {cells} | {speed}"


def kernel_crossover(rows, D):
    """The smallest B·K·D of the sweep from which the kernel's forward+backward is no slower than the eager or the
    compiled reference at every larger size, in every dtype measured (None without kernel figures)."""
    sweep = [r for r in rows if r.get("case") == "sweep" and "kernel_fwdbwd_ms" in r]
    if not sweep:
        return None
    wins = {}
    for r in sweep:
        best = min(r[f"{w}_fwdbwd_ms"] for w in ("eager", "compiled") if f"{w}_fwdbwd_ms" in r)
        wins[r["B"] * r["K"]] = wins.get(r["B"] * r["K"], True) and r["kernel_fwdbwd_ms"] <= best
    sizes = sorted(wins)
    winning = [bk for i, bk in enumerate(sizes) if all(wins[s] for s in sizes[i:])]
    return winning[0] * D if winning else None


def bench_methods(device, dtype, repeats, model_path=None, steps=(4, 12)):
    """Per-step cost of each method relative to `seq` on the second task (EWC needs a Fisher from the first).

    A step's cost is (time of n2 steps − time of n1 steps) / (n2 − n1): fixed costs (Fisher, setup) cancel.
    DSC's consolidation step is timed the same way through dsc_steps.
    """
    from dataclasses import replace

    import cp
    import train
    model_path = model_path or os.path.join(ROOT, "toy", "model")
    concepts = os.path.join(ROOT, "examples", "concepts")
    folders = sorted(os.path.join(concepts, d) for d in os.listdir(concepts))[:2]
    rows, per_step = [], {}
    for method in cp.METHODS:
        def task_seconds(n, dsc_n=0):
            model = unet.load_model(model_path, device)
            state = cp.new_state(model, cp.Hparams(method=method, steps=2, dsc_steps=2, fisher_samples=2))
            state = train.learn_folder(model, state, folders[0])
            state.hparams = replace(state.hparams, steps=n, dsc_steps=dsc_n, fisher_samples=2)
            t0 = time.perf_counter()
            train.learn_folder(model, state, folders[1])
            sync(device)
            return time.perf_counter() - t0
        n1, n2 = steps
        per_step[method] = statistics.median((task_seconds(n2) - task_seconds(n1)) / (n2 - n1) for _ in range(repeats))
        row = dict(section="methods", method=method, step_s=per_step[method], vs_seq=per_step[method] / per_step["seq"])
        if method.startswith("dsc"):
            row["consolidation_step_s"] = statistics.median(
                (task_seconds(n1, n2) - task_seconds(n1, n1)) / (n2 - n1) for _ in range(repeats))
        rows.append(row)
        extra = (f"  consolidation step {row['consolidation_step_s'] * 1e3:7.1f} ms" if "consolidation_step_s" in row
                 else "")
        print(f"method {method:11s} step {row['step_s'] * 1e3:8.1f} ms  vs seq {row['vs_seq']:.2f}x{extra}", flush=True)
    return rows


def bench_train(device, dtype, repeats, model_path=None):
    """End-to-end `python train.py --concept ...` with defaults: wall time and peak resident memory of the process."""
    import resource
    import subprocess
    import tempfile
    concepts = os.path.join(ROOT, "examples", "concepts")
    concept = os.path.join(concepts, sorted(os.listdir(concepts))[0])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--concept", concept,
               "--state", os.path.join(tmp, "state"), "--device", device]
        cmd += ["--model", model_path] if model_path else []
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
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default float32; the kernel section: bfloat16, float16 and float32")
    p.add_argument("--quick", action="store_true", help="kernel section: small shapes, no torch.compile")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed.json"))
    args = p.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; dtype {args.dtype or 'default'}; "
          f"median of {args.repeats}")
    rows = []
    for name in args.only.split(","):
        dtype = getattr(torch, args.dtype) if args.dtype else None if name == "kernel" else torch.float32
        rows += SECTIONS[name](args.device, dtype, args.repeats, **({"quick": args.quick} if name == "kernel" else {}))
    with open(args.out, "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, dtype=args.dtype, repeats=args.repeats,
                       command="python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
