"""kernels.dc_errors: Triton forward/backward vs the PyTorch reference, on CPU under the Triton interpreter
(and on CUDA, compiled, when a GPU is present and TRITON_INTERPRET is not 1)."""
import os
import subprocess
import sys

import pytest
import torch

# interpreter on CPU-only machines, compiled with a GPU; set before triton is first imported (as conftest.py does)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton", reason="Triton is not installed (Linux only); the PyTorch reference serves instead")

from kernels import dc_errors, dc_errors_impl, dc_errors_reference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
CPU_KERNEL = pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET is not 1: the kernel cannot run on CPU")
DEVICES = [pytest.param("cpu", marks=CPU_KERNEL), pytest.param("cuda", marks=CUDA)]
SHAPES = [(1, 1, 3, 5, 7), (2, 3, 4, 5, 5), (1, 2, 4, 64, 64), (3, 2, 4, 8, 8)]  # B*K=1, odd D, SD latent
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative, on the gradient


def inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    noise = torch.randn((shape[0],) + shape[2:], generator=g).to(device, dtype).requires_grad_()
    return pred, noise


def fwd_bwd(fn, pred, noise, reduction, g):
    e = fn(pred, noise, reduction)
    return (e, *torch.autograd.grad(e, (pred, noise), g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, reduction, device):
    pred, noise = inputs(shape, dtype, device)
    g = torch.randn(shape[:2], device=device)
    e, dp, dn = fwd_bwd(lambda *a: dc_errors(*a, impl="triton"), pred, noise, reduction, g)
    er, dpr, dnr = fwd_bwd(dc_errors_reference, pred, noise, reduction, g)
    assert e.dtype == torch.float32 and e.shape == shape[:2]
    assert dp.dtype == dtype and dp.shape == pred.shape and dn.shape == noise.shape
    torch.testing.assert_close(e, er, rtol=1e-5, atol=1e-5)
    # both round 2(pred - noise)g from fp32 to the input dtype; allow an ulp of the largest entry
    tol = TOL[dtype]
    torch.testing.assert_close(dp.float(), dpr.float(), rtol=tol, atol=tol * dpr.float().abs().max().item())
    torch.testing.assert_close(dn.float(), dnr.float(), rtol=tol, atol=tol * dnr.float().abs().max().item())


def test_reference_is_the_formula():
    pred, noise = inputs((2, 3, 4, 3, 3), torch.float64, "cpu")
    for b in range(2):
        for k in range(3):
            d = pred[b, k] - noise[b]
            assert torch.allclose(dc_errors_reference(pred, noise, "sum")[b, k], (d * d).sum())
            assert torch.allclose(dc_errors_reference(pred, noise, "mean")[b, k], (d * d).mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck_float64(reduction, device):
    pred, noise = inputs((2, 2, 7), torch.float64, device)
    assert torch.autograd.gradcheck(lambda p, n: dc_errors(p, n, reduction, impl="triton"), (pred, noise))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """Slices over K and noise expanded over B are read in place; other layouts are copied; results agree."""
    big, noise = inputs((2, 5, 4, 6, 6), torch.float32, device)
    cases = [
        (big[:, 1:4], noise),  # a slice of a larger prompt batch
        (big[:, :, :, :, ::2], noise[..., ::2]),  # strided latent: copied
        (big.transpose(-1, -2), noise.transpose(-1, -2)),  # permuted latent: copied
        (big[:, :2], noise[:1].expand(2, 4, 6, 6)),  # the same noise for every image (stride 0 over B)
        (big.transpose(0, 1)[:2], noise[:1].expand(2, 4, 6, 6)),  # B and K swapped, non-contiguous over B/K
    ]
    for pred, n in cases:
        g = torch.randn(pred.shape[:2], device=device)
        e, dp, dn = fwd_bwd(lambda *a: dc_errors(*a, impl="triton"), pred, n, "sum", g)
        er, dpr, dnr = fwd_bwd(dc_errors_reference, pred, n, "sum", g)
        torch.testing.assert_close(e, er)
        torch.testing.assert_close(dp, dpr)
        torch.testing.assert_close(dn, dnr)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_no_noise_grad(device):
    pred, _ = inputs((2, 3, 4, 4, 4), torch.float16, device)
    noise = torch.randn(2, 4, 4, 4, device=device)  # fp32, no grad
    e = dc_errors(pred, noise, "mean", impl="triton")
    torch.testing.assert_close(e, dc_errors_reference(pred, noise, "mean"))
    (dp,) = torch.autograd.grad(e.sum(), pred)
    torch.testing.assert_close(dp, 2 * (pred.float() - noise[:, None]).half() / 64, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_saves_only_the_inputs(device):
    pred, noise = inputs((2, 3, 4, 8, 8), torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dc_errors(pred, noise, impl="triton")
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {pred.data_ptr(), noise.data_ptr()}


@CUDA
def test_cuda_forward_allocates_no_difference():
    pred = torch.randn(4, 16, 4, 64, 64, device="cuda")
    noise = torch.randn(4, 4, 64, 64, device="cuda")
    dc_errors(pred, noise)  # warm up / compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dc_errors(pred, noise)
    assert torch.cuda.max_memory_allocated() - base < noise.numel() * 4  # far below one B*K*D temporary


def test_dispatch(monkeypatch):
    pred, noise = inputs((1, 2, 4, 4, 4), torch.float32, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dc_errors_impl(pred) == "reference"
    assert dc_errors_impl(pred, "reference") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if INTERPRET:
        assert dc_errors_impl(pred) == "triton-interpret"
    else:  # compiled mode: CPU tensors cannot run the kernel
        with pytest.raises(RuntimeError):
            dc_errors_impl(pred)
    with pytest.raises(ValueError):
        dc_errors(pred, noise, impl="cuda")
    with pytest.raises(ValueError):
        dc_errors(pred, noise, reduction="max")
    with pytest.raises(ValueError):
        dc_errors(pred, noise[:, :2])


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as where Triton does not install (Windows, macOS)
import torch
import cp, kernels, sample, train  # noqa: F401
pred, noise = torch.randn(2, 3, 4, 5), torch.randn(2, 4, 5)
assert torch.equal(kernels.dc_errors(pred, noise, "mean"), kernels.dc_errors_reference(pred, noise, "mean"))
assert kernels.dc_errors_impl(pred) == "reference"
kernels.dc_errors(pred, noise, impl="triton")
"""


def test_without_triton_the_reference_serves_every_call():
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stderr.strip().splitlines()[-1] == \
        "RuntimeError: impl 'triton': Triton is not installed (pip install triton, on Linux)", r.stderr[-2000:]
