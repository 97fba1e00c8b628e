"""Fused diffusion-classifier errors (README "The method in one page"; dc_score.py says how they are used).

For predictions pred[B, K, *latent] (B images x K prompts) and the noise shared across prompts noise[B, *latent]

    e[b, k] = sum_d (pred[b, k, d] - noise[b, d])^2        (reduction="sum"; "mean" divides by D)

The Triton forward reads each pred element once and the noise by broadcast (never expanded to K copies), accumulates
in fp32 (fp64 for fp64 inputs) and writes only e. The backward recomputes the difference from the inputs,
    de/dpred[b, k, d] = 2 (pred - noise) * g[b, k]  (/D for the mean),   de/dnoise = -sum_k de/dpred[b, k],
so nothing but the two inputs is saved. dnoise (only when noise requires grad) is that sum done in PyTorch.

Layout: pred is viewed as [B, K, D] and noise as [B, D] with arbitrary strides over B and K (a slice of a bigger
batch, or noise expanded over B, is read in place). Only if the latent dims cannot be viewed as one unit-stride run
is the tensor copied with .contiguous() (once in the forward, again in the backward).

Dispatch: CUDA tensors run the compiled kernel; CPU tensors run the PyTorch reference, or the kernel under Triton's
interpreter when TRITON_INTERPRET=1 (read at call time; it must also have been set before `import triton`, since
Triton picks interpreter or compiler for its own library functions at import).
"""
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import _acc_dtype, _check, dc_errors_reference


@triton.jit
def _fwd_kernel(pred, noise, part, D, K, spb, spk, snb, n_chunks, scale,
                BLOCK: tl.constexpr, ITERS: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)  # row = b * K + k
    chunk = tl.program_id(1)
    b = (row // K).to(tl.int64)
    p = pred + b * spb + (row % K).to(tl.int64) * spk
    n = noise + b * snb
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in range(ITERS):
        offs = (chunk * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        d = tl.load(p + offs, mask=mask, other=0.0).to(ACC) - tl.load(n + offs, mask=mask, other=0.0).to(ACC)
        acc += d * d
    tl.store(part + row.to(tl.int64) * n_chunks + chunk, tl.sum(acc, axis=0) * scale)


@triton.jit
def _bwd_kernel(pred, noise, g, dpred, D, K, spb, spk, snb, scale,
                BLOCK: tl.constexpr, ITERS: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (row // K).to(tl.int64)
    p = pred + b * spb + (row % K).to(tl.int64) * spk
    n = noise + b * snb
    out = dpred + row.to(tl.int64) * D
    coef = tl.load(g + row).to(ACC) * (2.0 * scale)
    for i in range(ITERS):
        offs = (chunk * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        d = tl.load(p + offs, mask=mask, other=0.0).to(ACC) - tl.load(n + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out + offs, (d * coef).to(dpred.dtype.element_ty), mask=mask)


def _rows(pred, noise):
    """pred as [B, K, D] and noise as [B, D], each with a unit-stride last dim (copied only if needed)."""
    B, K = pred.shape[:2]
    p, n = pred.reshape(B, K, -1), noise.reshape(B, -1)
    if p.stride(2) != 1:
        p = p.contiguous()
    if n.stride(1) != 1:
        n = n.contiguous()
    return p, n


def _launch_args(p, n):
    B, K, D = p.shape
    if isinstance(_fwd_kernel, InterpretedFunction):  # the interpreter pays per program, not per element
        block, iters = min(triton.next_power_of_2(D), 1 << 16), 1
    else:  # one program covers up to 4 steps of 1024 elements of one (b, k) row
        block = min(triton.next_power_of_2(D), 1024)
        iters = min(4, triton.cdiv(D, block))
    acc = tl.float64 if _acc_dtype(p, n) == torch.float64 else tl.float32
    grid = (B * K, triton.cdiv(D, block * iters))
    return grid, (D, K, p.stride(0), p.stride(1), n.stride(0)), dict(BLOCK=block, ITERS=iters, ACC=acc)


class _DCErrors(torch.autograd.Function):

    @staticmethod
    def forward(ctx, pred, noise, scale):
        ctx.save_for_backward(pred, noise)
        ctx.scale = scale
        p, n = _rows(pred, noise)
        grid, args, meta = _launch_args(p, n)
        part = torch.empty(grid, device=pred.device, dtype=_acc_dtype(pred, noise))
        _fwd_kernel[grid](p, n, part, *args, grid[1], scale, **meta)
        return part.sum(1).view(pred.shape[:2])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        pred, noise = ctx.saved_tensors
        p, n = _rows(pred, noise)
        grid, args, meta = _launch_args(p, n)
        dpred = torch.empty(p.shape, device=pred.device, dtype=pred.dtype)
        _bwd_kernel[grid](p, n, g.contiguous(), dpred, *args, ctx.scale, **meta)
        dnoise = None
        if ctx.needs_input_grad[1]:
            dnoise = dpred.sum(1, dtype=_acc_dtype(pred, noise)).neg_().to(noise.dtype).view(noise.shape)
        return dpred.view(pred.shape), dnoise, None


def dc_errors_impl(pred, impl="auto"):
    """Which path dc_errors takes for this tensor: 'reference', 'triton' (compiled) or 'triton-interpret'."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "auto":
        impl = "triton" if pred.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    if impl == "reference":
        return impl
    if isinstance(_fwd_kernel, InterpretedFunction):
        return "triton-interpret"
    if not pred.is_cuda:
        raise RuntimeError("the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 in the environment "
                           "before triton is first imported (to run it on CPU under the interpreter)")
    return "triton"


def dc_errors(pred, noise, reduction="sum", impl="auto"):
    """e[B, K] = sum (or mean) over latent dims of (pred[b, k] - noise[b])^2, differentiable in pred and noise.

    impl: 'auto' (kernel on CUDA or under TRITON_INTERPRET=1, else reference), 'triton' or 'reference'.
    """
    _check(pred, noise, reduction)
    if dc_errors_impl(pred, impl) == "reference" or pred.numel() == 0:
        return dc_errors_reference(pred, noise, reduction)
    return _DCErrors.apply(pred, noise, 1.0 if reduction == "sum" else 1.0 / pred[0, 0].numel())
