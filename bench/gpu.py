"""The GPU check in one call: every CUDA path of the project run and timed at SD v1.5 size. The steps add up
to more than one call's 570 s budget, which cuts the last ones: run them in groups with --only.

Steps, each in its own process with its own time limit (a failed step is recorded and the next one runs):
  tests              the kernel tests, compiled (tests/test_kernels.py: every dtype and shape, the CUDA-only ones)
  kernel             `bench/speed.py --only kernel`: the fused DC loss vs the eager and the compiled PyTorch
                     reference at a step's shapes and B*K 4..4096, bf16/fp16/fp32; kernels, syncs, share of a step
  unet-bf16/-fp16    our UNet vs diffusers' at the SD v1.5 config, latents 1x4x64x64 and 4x4x64x64 (512 px)
  model              a random-weight SD v1.5-size model folder (diffusers layout) and two 512 px concepts
  train-*            `train.py` end to end, 50 steps of seq, ewc-dc and dsc-ewc-dc: steps/s, peak memory
  sample             `sample.py --state` at 512 px, 25 DDIM steps: seconds per image
  train-task2        the ewc-dc state reloaded by `train.py`: a second concept on top of the first
  methods            every method, 20 steps on one loaded model, with and without gradient checkpointing (and ewc-dc
                     checkpointed in fp16, and in 2 micro-batches): steps/s, peak memory
The figures go to one markdown file and one JSON file, with the device, torch and triton versions.
Nothing is downloaded. Without diffusers (installed, or given with --diffusers as a wheel, a folder of wheels or a
source folder, or a diffusers-*.whl beside the checkout) only the UNet comparisons are skipped.

    python bench/gpu.py                                   # CUDA: writes bench/GPU.md and bench/results/gpu.json
    python bench/gpu.py --diffusers ../diffusers-0.42.1-py3-none-any.whl
    python bench/gpu.py --only train-seq,sample           # some steps again, in the order given
    python bench/gpu.py --only model,methods              # the memory and speed of every method
    python bench/gpu.py --dry                             # the same steps on the CPU with tiny configs
"""
import argparse
import functools
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONCEPTS = ("pine_tree", "striped_ring")  # toy-world concepts, rendered at 512 px: the first learned, then the second


class Skip(Exception):
    """A step that cannot run here (the message says why); not a failure."""


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory():
    """Peak GPU bytes torch allocated and reserved in this process (None on CPU)."""
    if not torch.cuda.is_available():
        return dict(peak_allocated_bytes=None, peak_reserved_bytes=None)
    return dict(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                peak_reserved_bytes=torch.cuda.max_memory_reserved())


# ---------------------------------------------------------------------------------------------------------------
# the steps: each runs in a child process (`gpu.py --step NAME`) and returns a JSON-able dict


def step_tests(ctx):
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-rs", "-m", "not slow",  # no CPU inductor
           "-p", "no:cacheprovider"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(p.stdout[-4000:], p.stderr[-2000:])
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    if p.returncode != 0:
        raise RuntimeError(f"pytest exited with {p.returncode}: {summary}")
    return dict(command=shlex.join(["python"] + cmd[1:]), summary=summary, counts=counts)


def step_kernel(ctx):
    import speed
    out = os.path.join(ctx.work, "kernel.json")
    argv = ["--only", "kernel", "--device", ctx.device] + ["--quick"] * ctx.dry
    speed.main(argv + ["--out", out])
    with open(out) as f:
        return dict(command=shlex.join(["python", "bench/speed.py"] + argv), rows=json.load(f)["rows"])


def step_unet(ctx, dtype):
    try:
        import diffusers
    except ImportError as e:
        raise Skip(f"diffusers is not importable here ({e}); bring a wheel: --diffusers PATH") from None
    import speed
    import unet
    cfg = unet.PRESETS[ctx.preset]["unet"]
    side = cfg["sample_size"]  # SD v1.5: 64, a 512 px image
    cases = [(ctx.preset, cfg, batch, side) for batch in (1, 4)]
    rows = speed.bench_unet(ctx.device, getattr(torch, dtype), ctx.repeats, cases)
    return dict(diffusers=diffusers.__version__, dtype=dtype, repeats=ctx.repeats, rows=rows)


def write_tokenizer(folder, size):
    """The toy model's BPE tokenizer with its vocabulary padded by never-produced entries to `size` (SD's 49,408),
    so that a new token gets a row of a full-size embedding matrix. Returns the ids of the two special tokens."""
    src = os.path.join(ROOT, "toy", "model", "tokenizer")
    shutil.copytree(src, folder, dirs_exist_ok=True)
    with open(os.path.join(src, "vocab.json")) as f:
        vocab = json.load(f)
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), size)})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    return vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def step_model(ctx):
    """A random-weight model of the preset's size in diffusers layout (fp16 files), and the concept folders."""
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import unet
    from toy import world
    preset, folder = unet.PRESETS[ctx.preset], ctx.model
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    bos, eos = write_tokenizer(os.path.join(folder, "tokenizer"), preset["text_encoder"]["vocab_size"])
    n = len(preset["vae"]["block_out_channels"])
    configs = {"unet": dict(preset["unet"], _class_name="UNet2DConditionModel"),
               "vae": dict(preset["vae"], _class_name="AutoencoderKL", down_block_types=["DownEncoderBlock2D"] * n,
                           up_block_types=["UpDecoderBlock2D"] * n)}
    params = {}
    with torch.device(ctx.device):  # random init where it is fast
        for name, net in (("unet", unet.UNet(configs["unet"])), ("vae", unet.VAE(configs["vae"]))):
            os.makedirs(os.path.join(folder, name))
            with open(os.path.join(folder, name, "config.json"), "w") as f:
                json.dump(configs[name], f, indent=1)
            save_file({k: v.half().contiguous().cpu() for k, v in net.state_dict().items()},
                      os.path.join(folder, name, "diffusion_pytorch_model.safetensors"))
            params[name] = sum(p.numel() for p in net.parameters())
        te = CLIPTextModel(CLIPTextConfig(**dict(preset["text_encoder"], bos_token_id=bos, eos_token_id=eos,
                                                 pad_token_id=eos)))
        te.half().save_pretrained(os.path.join(folder, "text_encoder"))
        params["text_encoder"] = sum(p.numel() for p in te.parameters())
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(dict(preset["scheduler"], _class_name="DDIMScheduler", clip_sample=False), f, indent=1)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}, f)
    for i, name in enumerate(CONCEPTS):
        concept = os.path.join(ctx.work, "concepts", name)
        shutil.rmtree(concept, ignore_errors=True)
        os.makedirs(concept)
        rng = np.random.default_rng(i)
        for j in range(4):
            image = Image.fromarray(world.render_concept(name, rng)).resize((512, 512), Image.BICUBIC)
            image.save(os.path.join(concept, f"{j}.png"))
    return dict(folder=folder, parameters=params, vocab=preset["text_encoder"]["vocab_size"],
                concepts={name: "4 images, 512 px" for name in CONCEPTS})


def timed(module, name, log):
    """Wrap module.name so that each call's wall time (and its arguments' step counts) lands in `log`."""
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        sync()
        start = time.perf_counter()
        out = fn(*args, **kw)
        sync()
        log.append((args, time.perf_counter() - start))
        return out
    setattr(module, name, wrapper)


def step_train(ctx, method=None, concept=CONCEPTS[0]):
    """`train.py` on a new state with `method`, or (method None) continuing the ewc-dc state with `concept`."""
    import cp
    import cp_state
    import train
    state_dir = os.path.join(ctx.work, "states", method or "ewc-dc")
    argv = ["--model", ctx.model, "--state", state_dir, "--device", ctx.device, "--steps", str(ctx.steps),
            "--dsc-steps", str(ctx.dsc_steps), "--no-preview"]
    if method:
        shutil.rmtree(state_dir, ignore_errors=True)
        argv += ["--method", method]
        if cp.Hparams(method=method).uses("dsc"):  # only a later task consolidates: a first concept, untimed
            train.main(argv + ["--concept", os.path.join(ctx.work, "concepts", CONCEPTS[1]), "--steps", "1"])
    argv += ["--concept", os.path.join(ctx.work, "concepts", concept)]
    phases = []  # (optimize's arguments, seconds) of each phase: "train", then "consolidate" for dsc*
    timed(cp, "optimize", phases)
    start = time.perf_counter()
    train.main(argv)
    wall = time.perf_counter() - start
    state = cp_state.load_state(state_dir)  # the state reloads
    rates = {args[3].split()[-1] + "_steps_per_s": args[1] / seconds for args, seconds in phases}
    return dict(command=shlex.join(["python", "train.py"] + argv), method=state.hparams.method, wall_s=wall,
                task_s=state.history[-1]["seconds"], concepts=len(state.concepts), losses=state.history[-1]["train"],
                **rates, **peak_memory())


def step_methods(ctx):
    """A short task of every method on one loaded model, each without and with gradient checkpointing, at the
    defaults (batch 8) but for the step counts; one process, the peak memory counted afresh for each task."""
    import cp
    import lora
    import train
    import unet
    model = unet.load_model(ctx.model, ctx.device)
    concept, other = (os.path.join(ctx.work, "concepts", c) for c in CONCEPTS[:2])
    plain = "bf16" if ctx.device == "cuda" else "fp32"
    runs = [(m, cp.Run(precision=plain, gradient_checkpointing=c)) for m in cp.METHODS for c in (False, True)]
    runs += [("ewc-dc", cp.Run(precision="fp16", gradient_checkpointing=True)),
             ("ewc-dc", cp.Run(precision=plain, gradient_checkpointing=True, grad_accum=2))]
    steps, dsc_steps, fisher = (3, 2, 2) if ctx.dry else (20, 10, cp.Hparams().fisher_samples)
    phases, rows = [], []
    timed(cp, "optimize", phases)
    for i, (method, run) in enumerate([("seq", cp.Run(precision=plain))] + runs):  # the first warms up, unrecorded
        lora.remove(model.unet)
        hp = cp.Hparams(method=method, steps=2 if i == 0 else steps, dsc_steps=dsc_steps, fisher_samples=fisher)
        state = cp.new_state(model, replace(hp, steps=1))
        if hp.uses("dsc"):  # only a later task consolidates: a first concept, untimed, as step_train
            state = train.learn_folder(model, state, other, run=cp.Run(precision=plain))
            lora.remove(model.unet)
            cp.apply_state(model, state)
        state.hparams = hp
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        phases.clear()
        state = train.learn_folder(model, state, concept, run=run)
        rates = {args[3] + "_steps_per_s": args[1] / seconds for args, seconds in phases}
        if i:
            rows.append(dict(method=method, precision=run.precision, checkpointing=run.gradient_checkpointing,
                             grad_accum=run.grad_accum, task_s=state.history[-1]["seconds"], **rates, **peak_memory()))
    return dict(steps=steps, dsc_steps=dsc_steps, rows=rows)


def step_sample(ctx):
    import sample
    n = 2
    argv = ["--state", os.path.join(ctx.work, "states", "ewc-dc"), "--prompt", f"a photo of a <{CONCEPTS[0]}>",
            "-n", str(n), "--steps", "25", "--device", ctx.device, "--out", os.path.join(ctx.work, "sample.png")]
    calls = []
    timed(sample, "sample", calls)
    sample.main(argv)
    from PIL import Image
    with Image.open(os.path.join(ctx.work, "sample.png")) as im:
        size = im.size
    return dict(command=shlex.join(["python", "sample.py"] + argv), seconds_per_image=calls[0][1] / n, grid=size,
                **peak_memory())


# name → (time limit in seconds on a GPU, 3× that with --dry); they add up to more than the budget, which cuts the
# last steps
STEPS = {
    "tests": (240, step_tests),
    "kernel": (300, step_kernel),
    "unet-bf16": (75, functools.partial(step_unet, dtype="bfloat16")),
    "unet-fp16": (75, functools.partial(step_unet, dtype="float16")),
    "model": (60, step_model),
    "train-seq": (60, functools.partial(step_train, method="seq")),
    "train-ewc-dc": (70, functools.partial(step_train, method="ewc-dc")),
    "train-dsc-ewc-dc": (100, functools.partial(step_train, method="dsc-ewc-dc")),
    "sample": (45, step_sample),
    "train-task2": (70, functools.partial(step_train, concept=CONCEPTS[1])),
    "methods": (240, step_methods),
}


# ---------------------------------------------------------------------------------------------------------------
# running the steps


def find_diffusers(given, work):
    """A folder to put on sys.path so that diffusers imports, or None (then an installed diffusers, if any).

    `given`: a folder holding `diffusers/` (or a source checkout with src/diffusers), a wheel, or a folder of wheels
    (diffusers and any pure-Python dependency this machine lacks). Not given: the newest diffusers-*.whl in or
    beside the checkout. Wheels are unpacked into the work folder: a pure-Python wheel is a zip of the package.
    """
    if given:
        given = os.path.abspath(given)
        for folder in (given, os.path.join(given, "src")):
            if os.path.isfile(os.path.join(folder, "diffusers", "__init__.py")):
                return folder
        wheels = glob.glob(os.path.join(given, "*.whl")) if os.path.isdir(given) else [given]
        if not wheels or not all(w.endswith(".whl") and os.path.isfile(w) for w in wheels):
            sys.exit(f"error: {given} is not a wheel, a folder of wheels or a folder holding diffusers/")
    else:
        wheels = sorted(glob.glob(os.path.join(ROOT, "diffusers-*.whl")) +
                        glob.glob(os.path.join(os.path.dirname(ROOT), "diffusers-*.whl")))[-1:]
        if not wheels:
            return None
    target = os.path.join(work, "wheels")
    shutil.rmtree(target, ignore_errors=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return target


def run_child(cmd, log_path, limit, env):
    """Run cmd with its output in log_path; kill it and everything it started after `limit` s. Exit status or None."""
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return p.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None


def tail(path, n=15):
    with open(path, errors="replace") as f:
        return "\n".join(line.rsplit("\r", 1)[-1] for line in f.read().splitlines()[-n:])


def run_steps(args, names):
    """Each step in a child process within its limit and the remaining budget; the results by step name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled on CUDA; tests choose alone
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.diffusers_path, env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    logs = os.path.join(args.work, "logs")
    os.makedirs(logs, exist_ok=True)
    deadline = time.time() + args.budget
    results = {}
    for i, name in enumerate(names, 1):
        limit = min(STEPS[name][0] * (3 if args.dry else 1), deadline - time.time())
        log, out = os.path.join(logs, name + ".log"), os.path.join(args.work, name + ".json")
        if os.path.exists(out):
            os.remove(out)
        if limit < 5:
            results[name] = dict(status="skipped", note=f"out of time (budget {args.budget:.0f} s)", seconds=0.0)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--work", args.work,
                   "--steps", str(args.steps), "--dsc-steps", str(args.dsc_steps), "--repeats", str(args.repeats)]
            start = time.time()
            code = run_child(cmd + (["--dry"] if args.dry else []), log, limit, env)
            seconds = time.time() - start
            if code == 0 and os.path.exists(out):
                with open(out) as f:
                    results[name] = dict(json.load(f), seconds=seconds)
            else:
                status = "timeout" if code is None else "failed"
                note = f"killed after {limit:.0f} s" if code is None else f"exit status {code}"
                results[name] = dict(status=status, note=note, seconds=seconds, log_tail=tail(log))
        r = results[name]
        print(f"[{i}/{len(names)}] {name:17s} {r['status']:8s} {r['seconds']:6.1f} s  {r.get('note', '')}",
              flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# the report


def mib(n):
    return "-" if n is None else f"{n / 2**20:,.0f}"


def us(r, key):
    return f"{r[key] * 1e3:.1f}" if r.get(key) is not None else "-"


def kernel_report(step):
    """The kernel step's table: forward+backward device time of each way, the kernel's speedups, its kernels,
    host syncs and enqueue time, which path dispatch picks; then the loss's share of a training step."""
    import speed
    rows = [r for r in step["rows"] if r["section"] == "kernel"]
    timer = {"cudagraph": "CUDA graphs replayed back to back, timed by CUDA events", "wall": "the median wall time",
             "events": "back-to-back calls between CUDA events"}[rows[0]["eager_timer"]]
    lines = [f"`{step['command']}`; latent {rows[0]['D']} elements; forward+backward time ({timer}) in µs; "
             "'kernel' is the Triton op, 'auto' what dc_score's functions pick by themselves.", "",
             "| case | dtype | B | K | eager | compiled | kernel | kernel vs eager / compiled | kernels e / c / k | "
             "syncs k | host enqueue µs e / k | auto |", "|" + " --- |" * 12]
    for r in rows:
        ratio = " / ".join(f"{r[k]:.2f}" if k in r else "-" for k in ("speedup_vs_eager", "speedup_vs_compiled"))
        kernels = " / ".join("-" if r.get(f"{w}_kernels") is None else str(r[f"{w}_kernels"])
                             for w in ("eager", "compiled", "kernel"))
        auto = r["auto"] + ("" if r.get("auto_is_faster", True) else " (**slower**)")
        lines.append(f"| {r['case']} | {r['dtype']} | {r['B']} | {r['K']} | {us(r, 'eager_fwdbwd_ms')} | "
                     f"{us(r, 'compiled_fwdbwd_ms')} | {us(r, 'kernel_fwdbwd_ms')} | {ratio} | {kernels} | "
                     f"{r.get('kernel_syncs', '-')} | {us(r, 'eager_enqueue_ms')} / {us(r, 'kernel_enqueue_ms')} | "
                     f"{auto} |")
    for s in (r for r in step["rows"] if r["section"] == "kernel-step"):
        lines += ["", f"A training step's UNet forward+backward ({s['rows']} rows of {s['latent']}, {s['dtype']}): "
                  f"{s['unet_fwdbwd_ms']:.1f} ms; the task loss's share of the step: " +
                  ", ".join(f"{k[:-6]} {v:.3%}" for k, v in s.items() if k.endswith("_share")) + "."]
    crossover = speed.kernel_crossover(rows, rows[0]["D"])
    if crossover:
        lines += ["", f"The kernel is no slower than either reference from B·K = {crossover // rows[0]['D']} on, in "
                  f"every dtype: `KERNEL_MIN_NUMEL = {crossover}` in dc_kernels/__init__.py."]
    return lines


def report(meta, results):
    """The markdown page of one run."""
    lines = [f"# GPU check: {meta['device']}", "",
             f"{'Dry run on the CPU with tiny configs (not GPU figures). ' if meta['dry'] else ''}"
             f"{meta['date']}; torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, diffusers "
             f"{meta['diffusers']}; {meta['wall_s']:.0f} s of wall time. Written by:", "",
             f"    {meta['command']}", "", "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {r['status']} | {r['seconds']:.1f} | {r.get('note', '')} |" for k, r in results.items()]
    ok = {k: r for k, r in results.items() if r["status"] == "ok"}
    if "tests" in ok:
        lines += ["", "## Kernel tests (compiled on CUDA, under the Triton interpreter on a CPU)", "",
                  f"`{ok['tests']['command']}`: {ok['tests']['summary']}"]
    if "kernel" in ok:
        lines += ["", "## The fused DC loss vs eager and compiled PyTorch", ""] + kernel_report(ok["kernel"])
    unet_rows = [r for k in ("unet-bf16", "unet-fp16") if k in ok for r in ok[k]["rows"]]
    if unet_rows:
        lines += ["", f"## Our UNet vs diffusers {ok.get('unet-bf16', ok.get('unet-fp16'))['diffusers']} "
                  f"({unet_rows[0]['config']} config)", "",
                  "Median of paired runs; peak memory: what one call allocates beyond the weights (weight gradients "
                  "included).", "",
                  "| dtype | latent | pass | ours ms | diffusers ms | ratio | peak MiB ours / diffusers |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        dtypes = [ok[k]["dtype"] for k in ("unet-bf16", "unet-fp16") if k in ok for _ in ok[k]["rows"]]
        lines += [f"| {d} | {r['shape']} | {r['mode']} | {r['ours_s'] * 1e3:.1f} | {r['diffusers_s'] * 1e3:.1f} | "
                  f"**{r['ratio']:.3f}** | {mib(r['ours_peak_bytes'])} / {mib(r['diffusers_peak_bytes'])} |"
                  for d, r in zip(dtypes, unet_rows)]
    if "model" in ok:
        p = ok["model"]["parameters"]
        lines += ["", "## train.py and sample.py on a random-weight model", "",
                  f"Model: {', '.join(f'{k} {v / 1e6:.1f} M' for k, v in p.items())} parameters, vocabulary "
                  f"{ok['model']['vocab']}; concepts rendered at 512 px."]
    train = {k: r for k, r in ok.items() if k.startswith("train-")}
    if train:
        lines += ["", "| step | method | train steps/s | consolidation steps/s | task s | wall s | "
                  "peak MiB allocated / reserved |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for k, r in train.items():
            dsc = f"{r['consolidate_steps_per_s']:.2f}" if "consolidate_steps_per_s" in r else "-"
            lines.append(f"| {k} | {r['method']} | {r['train_steps_per_s']:.2f} | {dsc} | {r['task_s']:.1f} | "
                         f"{r['wall_s']:.1f} | {mib(r['peak_allocated_bytes'])} / {mib(r['peak_reserved_bytes'])} |")
        lines += ["", "Each step runs `train.main` on these arguments in a fresh process (so that its peak memory and "
                  "the time of each phase can be read); every other hyperparameter is train.py's default (batch 8, "
                  "rank 8, bf16 autocast on CUDA):", ""] + [f"    {r['command']}" for r in train.values()]
    if "methods" in ok:
        m = ok["methods"]
        lines += ["", "## Every method, without and with gradient checkpointing", "",
                  f"`python bench/gpu.py --only model,methods`: one task of each method on the model above, "
                  f"{m['steps']} training steps (dsc*: and {m['dsc_steps']} consolidation steps) of batch 8, every "
                  "other hyperparameter at its default; one process, the peak counted afresh for each task.", "",
                  "| method | precision | checkpointing | micro-batches | train steps/s | consolidation steps/s | "
                  "task s | peak MiB allocated / reserved |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in m["rows"]:
            dsc = f"{r['consolidate_steps_per_s']:.2f}" if "consolidate_steps_per_s" in r else "-"
            lines.append(f"| {r['method']} | {r['precision']} | {'yes' if r['checkpointing'] else 'no'} | "
                         f"{r['grad_accum']} | {r['train_steps_per_s']:.2f} | {dsc} | {r['task_s']:.1f} | "
                         f"{mib(r['peak_allocated_bytes'])} / {mib(r['peak_reserved_bytes'])} |")
    if "sample" in ok:
        s = ok["sample"]
        lines += ["", f"Sampling: {s['seconds_per_image']:.2f} s per image ({s['grid'][0]}×{s['grid'][1]} px grid "
                  f"of 2, peak {mib(s['peak_allocated_bytes'])} MiB allocated):", "", f"    {s['command']}"]
    failed = {k: r for k, r in results.items() if "log_tail" in r}
    for k, r in failed.items():
        lines += ["", f"## {k}: {r['status']} ({r['note']})", "", "```", r["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="run on the CPU with the tiny preset (checks the script)")
    p.add_argument("--only", help=f"comma-separated steps, run in the order given (of {', '.join(STEPS)})")
    p.add_argument("--diffusers", default=os.environ.get("CP_DIFFUSERS"),
                   help="a diffusers wheel or source folder (default: $CP_DIFFUSERS, else a diffusers-*.whl in or "
                        "beside the checkout, else an installed diffusers)")
    p.add_argument("--work", help="scratch folder: model, states, logs (default: a folder in the temp dir)")
    p.add_argument("--out", help="markdown report (default bench/GPU.md; with --dry, in the work folder)")
    p.add_argument("--json", help="JSON results (default bench/results/gpu.json; with --dry, in the work folder)")
    p.add_argument("--budget", type=float, help="seconds for all steps together (default 570; 1500 with --dry, "
                   "whose CPU may be shared)")
    p.add_argument("--steps", type=int, help="training steps per method (default 50; 10 with --dry)")
    p.add_argument("--dsc-steps", type=int, help="consolidation steps of dsc-ewc-dc (default 25; 5 with --dry)")
    p.add_argument("--repeats", type=int, help="timed runs per UNet figure (default 5; 2 with --dry)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    args = p.parse_args(argv)
    args.work = os.path.abspath(args.work or os.path.join(tempfile.gettempdir(), "cp-gpu" + "-dry" * args.dry))
    args.device, args.preset = ("cpu", "tiny") if args.dry else ("cuda", "sd-v1")
    for name, full, dry in (("budget", 570, 1500), ("steps", 50, 10), ("dsc_steps", 25, 5), ("repeats", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry else full)
    args.model = os.path.join(args.work, "model")
    os.makedirs(args.work, exist_ok=True)
    if args.step:
        try:
            result = dict(status="ok", **STEPS[args.step][1](args))
        except Skip as e:
            result = dict(status="skipped", note=str(e))
        with open(os.path.join(args.work, args.step + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    if not args.dry and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; `python bench/gpu.py --dry` runs the same steps on the CPU")
    names = args.only.split(",") if args.only else list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        sys.exit(f"error: unknown step(s) {', '.join(unknown)} (choose from {', '.join(STEPS)})")
    args.diffusers_path = find_diffusers(args.diffusers, args.work)
    print(f"work folder {args.work}; diffusers from {args.diffusers_path or 'the installed packages, if any'}")
    start = time.time()
    results = run_steps(args, names)
    import triton
    version = subprocess.run([sys.executable, "-c", "import diffusers; print(diffusers.__version__)"],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                 p for p in (args.diffusers_path, os.environ.get("PYTHONPATH")) if p)))
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dry=args.dry,
                device=torch.cuda.get_device_name() if not args.dry else f"{platform.machine()} CPU (dry run)",
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                diffusers=version.stdout.strip() if version.returncode == 0 else "absent (UNet comparisons skipped)",
                command=shlex.join(["python", "bench/gpu.py"] + (argv if argv is not None else sys.argv[1:])),
                wall_s=time.time() - start)
    out = args.out or (os.path.join(args.work, "GPU.md") if args.dry else os.path.join(ROOT, "bench", "GPU.md"))
    json_out = args.json or (os.path.join(args.work, "gpu.json") if args.dry else
                             os.path.join(ROOT, "bench", "results", "gpu.json"))
    with open(json_out, "w") as f:
        json.dump(dict(meta, steps=results), f, indent=1)
    with open(out, "w") as f:
        f.write(report(meta, results))
    print(f"wrote {out} and {json_out} in {meta['wall_s']:.0f} s")
    if any(r["status"] in ("failed", "timeout") for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
