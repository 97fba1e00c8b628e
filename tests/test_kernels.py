"""The fused DC loss (dc_kernels): its Triton forward and backward against the autograd of dc_score's formulas,
on CPU under the Triton interpreter (compiled on CUDA when a GPU is present and TRITON_INTERPRET is not 1); the
torch.library op under torch.compile and CUDA-graph capture; one launch each way, no host sync; dispatch."""
import os
import subprocess
import sys

import pytest
import torch

# interpreter on CPU-only machines, compiled with a GPU; set before triton is first imported (as conftest.py does)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton", reason="Triton is not installed (Linux only); the PyTorch reference serves instead")

from conftest import ROOT  # noqa: E402
import dc_kernels  # noqa: E402
import dc_score  # noqa: E402
from dc_kernels import dc_loss_impl, kernel_wins  # noqa: E402
from dc_kernels import fused  # noqa: E402  (the Triton module)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU_KERNEL = pytest.mark.skipif(not fused.INTERPRETED, reason="TRITON_INTERPRET is not 1: the kernel cannot run on CPU")
DEVICES = [pytest.param("cpu", marks=CPU_KERNEL), pytest.param("cuda", marks=CUDA)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the single-device tests run the kernel
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}  # relative
# what each way of scoring passes to dc_loss: no target (the errors alone), a hard target as an int or one per
# image, a teacher whose rows sum to 1 or (DSC's two teachers added) to 2
MODES = ["errors", "column", "targets", "teacher", "teacher2"]


def dc_loss(pred, noise, target=None, temp=1.0, teacher=None, index=None, impl="auto"):
    """(L, e) of the dc_score function each way of scoring calls: a teacher (soft_cross_entropy), a hard target
    (dc_cross_entropy), neither (dc_errors; L empty). impl "reference" runs the formulas, "triton" the kernel."""
    if teacher is not None:
        if target is not None:
            raise ValueError("a teacher or a target, not both")
        return dc_score.soft_cross_entropy(pred, noise, teacher, temp, index, impl)
    if target is not None:
        return dc_score.dc_cross_entropy(pred, noise, target, temp, index, impl)
    e = dc_score.dc_errors(pred, noise, index, impl)
    return e.new_empty(0), e


def dc_loss_reference(*args, **kw):
    return dc_loss(*args, **kw, impl="reference")


def dc_errors(pred, noise, impl="auto", index=None):
    return dc_score.dc_errors(pred, noise, index, impl)


def inputs(shape, dtype, device, seed=0, mode="column", noise_grad=True):
    """pred [B, K, *latent] and noise [B, *latent] requiring grad, and dc_loss's keyword arguments for `mode`."""
    g = torch.Generator().manual_seed(seed)
    B, K = shape[:2]
    pred = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    noise = torch.randn((B,) + shape[2:], generator=g).to(device, dtype).requires_grad_(noise_grad)
    teacher = torch.softmax(torch.randn(B, K, generator=g), -1).to(device, dtype)
    kw = dict(errors=dict(), column=dict(target=K - 1, temp=0.7),
              targets=dict(target=torch.randint(0, K, (B,), generator=g).to(device), temp=0.3),
              teacher=dict(teacher=teacher, temp=0.5), teacher2=dict(teacher=2 * teacher, temp=0.05))[mode]
    return pred, noise, kw


def run(impl, pred, noise, seed=1, **kw):
    """(L, e, dpred[, dnoise][, dteacher]) of dc_loss with impl, for random upstream gradients of L and e."""
    L, e = dc_loss(pred, noise, impl=impl, **kw)
    g = torch.Generator().manual_seed(seed)
    outs = [(L, torch.randn(L.shape, generator=g)), (e, torch.randn(e.shape, generator=g))]
    outs, grads = zip(*[(o, go.to(o.device, o.dtype)) for o, go in outs if o.numel()])
    wrt = [x for x in (pred, noise, kw.get("teacher")) if x is not None and x.requires_grad]
    return (L, e, *torch.autograd.grad(outs, wrt, grads))


def assert_matches(got, want, dtype, equal_nan=False):
    """Losses and errors (fp32) to 1e-5; gradients, rounded to the input dtype by both, to an ulp of the largest."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = TOL[torch.float32 if i < 2 and dtype != torch.float64 else dtype]
        scale = b.float().nan_to_num().abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(scale, 1e-3), equal_nan=equal_nan)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 3, 5, 7), (2, 3, 4, 5, 5), (3, 5, 4, 8, 8), (1, 2, 4, 64, 64)])
def test_matches_reference(shape, dtype, mode, device):
    """B = 1, K = 1, D = 105 (no multiple of a block), SD's 4x64x64 latent; every target kind; both upstream
    gradients (of L and of e) at once."""
    pred, noise, kw = inputs(shape, dtype, device, mode=mode)
    got, want = run("triton", pred, noise, **kw), run("reference", pred, noise, **kw)
    assert got[1].dtype == torch.float32 and got[1].shape == shape[:2]
    assert got[0].shape == ((0,) if mode == "errors" else shape[:1])
    assert got[2].dtype == dtype and got[2].shape == pred.shape and got[3].shape == noise.shape
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode, device):
    pred, noise, kw = inputs((2, 3, 2, 3), torch.float64, device, mode=mode)
    teacher = kw.pop("teacher", None)
    args = (pred, noise) if teacher is None else (pred, noise, teacher.requires_grad_())

    def f(pred, noise, teacher=None):
        L, e = dc_loss(pred, noise, teacher=teacher, impl="triton", **kw)
        return (L, e) if L.numel() else e
    assert torch.autograd.gradcheck(f, args)
    assert_matches(run("triton", *args[:2], teacher=teacher, **kw), run("reference", *args[:2], teacher=teacher, **kw),
                   torch.float64)


def test_reference_is_the_formula():
    pred, noise, _ = inputs((2, 3, 4, 3, 3), torch.float64, "cpu")
    teacher, temp = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 1.0]], dtype=torch.float64), 0.7
    L_hard, e = dc_loss_reference(pred, noise, torch.tensor([2, 0]), temp)
    L_soft, _ = dc_loss_reference(pred, noise, temp=temp, teacher=teacher)
    for b in range(2):
        for k in range(3):
            d = pred[b, k] - noise[b]
            assert torch.allclose(e[b, k], (d * d).mean())
        p = [torch.exp(-e[b, k] / temp) / torch.exp(-e[b] / temp).sum() for k in range(3)]
        assert torch.allclose(L_hard[b], -torch.log(p[[2, 0][b]]))
        assert torch.allclose(L_soft[b], -sum(teacher[b, k] * torch.log(p[k]) for k in range(3)))


@pytest.mark.parametrize("device", DEVICES)
def test_layouts(device):
    """Slices, swapped B and K, channels_last, noise expanded over B (stride 0), unaligned data, and expanded upstream
    gradients are read as they are; every result equals the reference's."""
    big, noise, kw = inputs((2, 5, 4, 6, 6), torch.float32, device, mode="targets")
    unaligned = torch.randn(1 + big.numel(), device=device, requires_grad=True)[1:].view(big.shape)  # 4 bytes off
    cl = big.detach().flatten(0, 1).to(memory_format=torch.channels_last).requires_grad_().view(big.shape)
    cases = [
        (big[:, 1:4], noise),  # a slice of a larger prompt batch
        (big.transpose(0, 1)[:2], noise),  # B and K swapped: non-contiguous over B and K
        (big[:, :, :, :, ::2], noise[..., ::2]),  # strided latent: copied
        (cl, noise.detach().to(memory_format=torch.channels_last)),  # channels_last: copied
        (big[:, :2], noise[:1].expand(2, 4, 6, 6)),  # the same noise for every image
        (unaligned, noise),
    ]
    for pred, n in cases:
        K = pred.shape[1]
        args = dict(target=torch.stack([kw["target"] % K, kw["target"]], 1)[:, 0], temp=0.3)  # strided targets
        assert_matches(run("triton", pred, n, **args), run("reference", pred, n, **args), torch.float32)
    for L_grad in (True, False):  # loss.sum().backward() hands the op expanded gradients of stride 0
        got, want = [], []
        for impl, out in (("triton", got), ("reference", want)):
            L, e = dc_loss(big, noise, target=0, temp=0.5, impl=impl)
            out += torch.autograd.grad(L.sum() if L_grad else e.sum(), (big, noise))
        assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_index_gathers_the_noise(device):
    """The ragged batch: row b against noise[index[b]], indices repeated (two images share a noise row, whose
    gradient adds up) or missing; K = 1 (denoising_errors' ragged rows) and K = 3."""
    for K, index in ((1, [2, 0, 0, 1, 2]), (3, [1, 1]), (1, [0])):
        pred, _, _ = inputs((len(index), K, 4, 3, 3), torch.float32, device)
        noise = torch.randn(3, 4, 3, 3, device=device, requires_grad=True)
        index = torch.tensor([[i, 9] for i in index], device=device)[:, 0]  # strided: read densely
        for kw in (dict(), dict(target=K - 1, temp=0.2)):
            got = run("triton", pred, noise, index=index, **kw)
            assert_matches(got, run("reference", pred, noise, index=index, **kw), torch.float32)
        assert torch.equal(dc_errors(pred, noise, index=index, impl="triton"),
                           dc_errors(pred, noise[index], impl="triton"))


@pytest.mark.parametrize("device", DEVICES)
def test_noise_without_grad_and_mixed_dtypes(device):
    """bf16 predictions against fp32 noise that needs no gradient (a training step under autocast)."""
    pred, _, kw = inputs((2, 3, 4, 4, 4), torch.bfloat16, device, mode="column")
    noise = torch.randn(2, 4, 4, 4, device=device)
    got, want = run("triton", pred, noise, **kw), run("reference", pred, noise, **kw)
    assert len(got) == 3 and got[2].dtype == torch.bfloat16
    assert_matches(got, want, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_and_fp16_extremes(device):
    """tau = 0.01 on errors near 1e3 (logits near -1e5, p one-hot to fp32 precision); fp16 inputs whose difference
    (1.2e5) or squared error (6e4) overflows fp16, and is exact in the fp32 accumulator."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 4, 4, generator=g)
    pred = (noise[:, None] + 31 * torch.randn(2, 3, 4, 4, 4, generator=g)).to(device).requires_grad_()
    for kw in (dict(target=1, temp=0.01), dict(teacher=torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]).to(device),
                                               temp=0.01)):
        got = run("triton", pred, noise.to(device), **kw)
        assert got[1].min() > 500 and torch.isfinite(got[0]).all() and got[0].max() > 1e3
        assert_matches(got, run("reference", pred, noise.to(device), **kw), torch.float32)
    half = torch.full((1, 2, 4, 4, 4), 6e4, dtype=torch.float16, device=device)
    half[0, 1] = 245.0
    for noise, want in ((-half[:, 0], [1.2e5 ** 2, 60245.0 ** 2]), (0 * half[:, 0], [6e4 ** 2, 245.0 ** 2])):
        L, e = dc_loss(half, noise, 0, 1e10, impl="triton")
        assert e[0].tolist() == pytest.approx(want, rel=1e-6) and torch.isfinite(L).all()
        assert_matches((L, e), dc_loss_reference(half, noise, 0, 1e10), torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_its_image_only(device):
    for mode in ("column", "teacher"):
        pred, noise, kw = inputs((3, 3, 2, 4, 4), torch.float32, device, mode=mode)
        with torch.no_grad():
            pred[1, 2, 0, 1, 1] = float("nan")
        got, want = run("triton", pred, noise, **kw), run("reference", pred, noise, **kw)
        assert got[0][1].isnan() and got[1][1, 2].isnan() and got[2][1].isnan().all()
        assert torch.isfinite(got[0][[0, 2]]).all() and torch.isfinite(got[2][[0, 2]]).all()
        assert_matches(got, want, torch.float32, equal_nan=True)
    # a per-image target outside [0, K) (the reference's gather would fail on it) gives NaN for that image
    L, _ = dc_loss(pred, noise, torch.tensor([0, 1, 3], device=device), impl="triton")
    assert L[2].isnan() and torch.isfinite(L[0])


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    pred, noise, kw = inputs((3, 4, 4, 16, 16), torch.bfloat16, device, mode="teacher2")
    first, second = run("triton", pred, noise, **kw), run("triton", pred, noise, **kw)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


class Launches:
    """A kernel stand-in that counts its launches and runs the kernel."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(self.kernel)
        return self.kernel[grid]


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_each_way_and_only_e_saved(device, monkeypatch):
    log, saved = [], []
    monkeypatch.setattr(fused, "_fwd_kernel", Launches(fused._fwd_kernel, log))
    monkeypatch.setattr(fused, "_bwd_kernel", Launches(fused._bwd_kernel, log))
    pred, noise, kw = inputs((2, 3, 4, 8, 8), torch.float32, device, mode="targets")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        L, e = dc_loss(pred, noise, impl="triton", **kw)
    assert log == [fused._fwd_kernel.kernel]
    torch.autograd.grad(L.sum() + e.sum(), (pred, noise))
    assert log == [fused._fwd_kernel.kernel, fused._bwd_kernel.kernel]
    # the inputs and e [B, K]: nothing of size B*K*D beyond pred itself
    assert {t.data_ptr() for t in saved} == {pred.data_ptr(), noise.data_ptr(), kw["target"].data_ptr(), e.data_ptr()}


def test_op_registration():
    """torch.library's own checks of cp::dc_loss: schema, fake (meta) implementation, autograd registration, and
    the op traced by AOT autograd, with an index and a per-image target, and with a teacher that needs a gradient."""
    if not fused.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("the op's kernel needs CUDA or TRITON_INTERPRET=1")
    pred, noise, kw = inputs((2, 3, 2, 3, 3), torch.float32, DEVICE, mode="targets")
    torch.library.opcheck(torch.ops.cp.dc_loss.default,
                          (pred, noise, torch.tensor([1, 0], device=DEVICE), kw["target"], None, -1, 0.5))
    teacher = inputs((2, 3, 2, 3, 3), torch.float32, DEVICE, mode="teacher")[2]["teacher"].requires_grad_()
    torch.library.opcheck(torch.ops.cp.dc_loss.default, (pred, noise, None, None, teacher, -1, 0.5))


def test_compiles_whole_with_the_kernel():
    """torch.compile(fullgraph=True) of a loss that uses the op: no graph break, the same values and gradients as
    eager. Inductor on CUDA; on a CPU, AOT autograd with eager kernels (the op runs under the interpreter)."""
    if not fused.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("the op's kernel needs CUDA or TRITON_INTERPRET=1")
    pred, noise, kw = inputs((2, 3, 4, 8, 8), torch.float32, DEVICE, mode="teacher2")

    def step(pred, noise, teacher):
        L, e = dc_loss(pred, noise, temp=0.05, teacher=teacher, impl="triton")
        return L.mean() + e[:, 0].mean()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    for seed in (0, 1):  # the second call runs the compiled graph again, on new values
        pred, noise, kw = inputs((2, 3, 4, 8, 8), torch.float32, DEVICE, seed=seed, mode="teacher2")
        got = compiled(pred, noise, kw["teacher"])
        want = step(pred, noise, kw["teacher"])
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, (pred, noise)), torch.autograd.grad(want, (pred, noise))):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_reference_compiles_whole_on_cpu():
    """On a CPU dc_loss is the reference, and inductor compiles it with fullgraph=True (about a minute here)."""
    pred, noise, kw = inputs((2, 3, 4, 8, 8), torch.float32, "cpu", mode="targets")

    def step(pred, noise, target):
        L, e = dc_loss(pred, noise, target, 0.3)
        return L.mean() + e.mean()
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(pred, noise, kw["target"])
    want = step(pred, noise, kw["target"])
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (pred, noise)), torch.autograd.grad(want, (pred, noise))):
        torch.testing.assert_close(a, b)


@CUDA
def test_cuda_graph_capture_and_no_host_sync():
    """A step (a linear layer's predictions, the fused loss, its backward) captured in a CUDA graph and replayed on
    new data gives eager's loss and gradient; the step runs under set_sync_debug_mode('error')."""
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64, device="cuda")
    x, noise = torch.randn(2 * 3, 64, device="cuda"), torch.randn(2, 64, device="cuda")
    target = torch.tensor([0, 2], device="cuda")

    def step():
        L, e = dc_loss(net(x).view(2, 3, 64), noise, target, 0.1, impl="triton")
        loss = L.mean() + e[:, 0].mean()
        return loss, torch.autograd.grad(loss, net.weight)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # compile the kernels, warm the allocator
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    want_loss, want_grad = step()
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


@CUDA
def test_cuda_ragged_step_has_no_host_sync():
    """δ·L_DC's step as task_loss runs it, from device tensors: dc_score's ragged UNet batch, the fused loss on the DC
    rows, the errors of the others, the backward into the network; nothing waits for the device."""
    import dc_score
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, device="cuda")
    net = lambda x, t, c: conv(x) * c.mean((1, 2))[:, None, None, None]  # noqa: E731 (the UNet's signature)
    x0, eps = torch.randn(8, 4, 8, 8, device="cuda"), torch.randn(8, 4, 8, 8, device="cuda")
    context, t = torch.randn(3, 2, 5, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    ac = torch.linspace(0.99, 0.01, 1000, device="cuda")
    image = torch.cat([torch.arange(2, device="cuda").repeat_interleave(3), torch.arange(2, 8, device="cuda")])
    prompt = torch.cat([torch.arange(3, device="cuda").repeat(2), torch.zeros(6, dtype=torch.long, device="cuda")])

    def step():
        pred = dc_score.noise_predictions(net, x0, context, t, eps, ac, rows=(image, prompt))
        ce, e_dc = dc_loss(pred[:6].view(2, 3, 4, 8, 8), eps[:2], 0, 0.05, impl="triton")
        e = dc_errors(pred[6:, None], eps[2:], impl="triton")[:, 0]
        return torch.autograd.grad(torch.cat([e_dc[:, 0], e]).mean() + ce.mean(), conv.weight)
    step()  # compile the kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_cuda_two_kernels_per_forward_backward():
    pred, noise, kw = inputs((8, 3, 4, 64, 64), torch.bfloat16, "cuda", mode="teacher2", noise_grad=False)
    g = torch.ones(8, device="cuda")

    def step():
        L, _ = dc_loss(pred, noise, impl="triton", **kw)
        torch.autograd.grad(L, pred, g)
        torch.cuda.synchronize()
    step()  # compile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2 and "_fwd_kernel" in kernels[0] and "_bwd_kernel" in kernels[1], kernels


@CUDA
def test_cuda_forward_allocates_no_difference():
    pred = torch.randn(4, 16, 4, 64, 64, device="cuda")
    noise = torch.randn(4, 4, 64, 64, device="cuda")
    dc_loss(pred, noise, 0, impl="triton")  # warm up / compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dc_loss(pred, noise, 0, impl="triton")
    assert torch.cuda.max_memory_allocated() - base < noise.numel() * 4  # far below one B*K*D temporary


COMPILE_FOR_SM90 = r"""
import itertools, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dc_kernels.fused import _bwd_kernel, _fwd_kernel
OPTIONAL = {"index", "target", "teacher", "g_loss", "g_e"}  # None, a constexpr, when not given
POINTERS = OPTIONAL | {"pred", "noise", "dpred", "dnoise", "e_out", "loss_out", "e"}

def arg_type(name, dtype, acc):
    if name in ("pred", "noise", "dpred", "dnoise"):
        return f"*{dtype}"
    if name in POINTERS:
        return "*i64" if name in ("index", "target") else f"*{acc}"
    return "fp32" if name == "temp" else "i32"

def compile(kernel, dtype, acc, given, **const):
    names = kernel.arg_names
    const.update({n: None for n in OPTIONAL - given if n in names}, ACC=tl.float64 if acc == "fp64" else tl.float32)
    sig = {n: "constexpr" if n in const else arg_type(n, dtype, acc) for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in POINTERS - OPTIONAL | {"D"}}
    src = ASTSource(kernel, sig, {(names.index(n),): v for n, v in const.items()}, aligned)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))

for dtype, acc, mode, index, target in (("bf16", "fp32", 1, False, False), ("fp16", "fp32", 2, True, False),
                                        ("fp32", "fp32", 0, True, False), ("fp64", "fp64", 1, False, True)):
    given = {n for n, on in (("index", index), ("target", target), ("teacher", mode == 2)) if on}
    flags = dict(MODE=mode, HAS_INDEX=index, TARGET_PTR=target)
    compile(_fwd_kernel, dtype, acc, given, KP=8, BLOCK=1024, **flags)
    for gl, ge, ng in itertools.product({mode > 0, False}, (True, False), (True, False)):
        if gl or ge:
            compile(_bwd_kernel, dtype, acc, given | {n for n, on in (("g_loss", gl), ("g_e", ge)) if on},
                    HAS_GL=gl, HAS_GE=ge, NOISE_GRAD=ng, KP=4, BLOCK=512, **flags)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tests above run the compiled kernels")
def test_kernels_compile_for_a_gpu_without_one():
    """Every variant of both kernels (dtypes, targets, index, which gradients) goes through Triton's compiler to
    an sm_90 binary: what the interpreter cannot check (types, constexpr branches) is checked without a GPU."""
    p = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT), timeout=600)
    if "ptxas" in p.stderr and "not found" in p.stderr.lower():
        pytest.skip("triton's ptxas is missing")
    assert p.returncode == 0 and p.stdout.strip() == "compiled", p.stderr[-3000:]


def test_dispatch(monkeypatch):
    """'auto' picks the kernel only on CUDA, at or above the measured size, up to KMAX prompts; never from the
    environment at call time."""
    pred, noise, _ = inputs((1, 2, 4, 4, 4), torch.float32, "cpu")
    for env in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", env)
        assert dc_loss_impl(pred) == "reference" and not kernel_wins(pred)
    assert dc_loss_impl(pred, "reference") == "reference"
    if fused.INTERPRETED:
        assert dc_loss_impl(pred, "triton") == "triton-interpret"
    else:  # compiled mode: CPU tensors cannot run the kernel
        with pytest.raises(RuntimeError):
            dc_loss_impl(pred, "triton")
    many = torch.zeros(1, dc_kernels.KMAX + 1, 1, device=DEVICE)
    assert not kernel_wins(many)
    with pytest.raises(ValueError):
        dc_loss_impl(many, "triton")
    if torch.cuda.is_available() and not fused.INTERPRETED:
        D = 4 * 64 * 64
        small = torch.empty(1, 4, D, device="cuda")
        big = torch.empty((dc_kernels.KERNEL_MIN_NUMEL + 4 * D - 1) // (4 * D), 4, D, device="cuda")
        assert not kernel_wins(small) and kernel_wins(big)


def test_bad_arguments():
    pred, noise, _ = inputs((2, 3, 4, 4, 4), torch.float32, "cpu")
    teacher = torch.full((2, 3), 1 / 3)
    for kw in (dict(impl="cuda"), dict(target=3), dict(target=-1),
               dict(target=torch.tensor([0])), dict(teacher=teacher[:, :2]), dict(teacher=teacher, target=0),
               dict(index=torch.tensor([0]))):
        with pytest.raises(ValueError):
            dc_loss(pred, noise, **kw)
    with pytest.raises(ValueError):
        dc_errors(pred, noise[:, :2])
