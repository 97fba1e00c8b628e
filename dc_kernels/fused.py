"""The fused DC loss: errors, DC posterior and cross-entropy in one launch forward and one backward.

For the noise predictions pred[B, K, *latent] of B images under K prompts and the noise of each image noise[B, *latent]
(shared by its K prompts: README "The method in one page"),

    e[b, k]  = (1/D) sum_d (pred[b, k, d] - noise[b, d])^2                 (the mean over the latent's D dims)
    log p[b, k] = log_softmax_k(-e[b, k] / tau)                              (the DC posterior over the K prompts)
    L[b] = -log p[b, y_b]                      hard target: the DC cross-entropy of the Fisher and of δ·L_DC
    L[b] = -sum_k q[b, k] log p[b, k]          soft target: DSC, q the teachers' posteriors (a row sums to s_b)

and, from e and the upstream gradients gL[B] and ge[B, K] alone,

    dL[b]/de[b, k] = (q[b, k] - s_b p[b, k]) / tau                   (hard: q one-hot at y_b, s_b = 1)
    dpred[b, k, d] = (2/D) (pred[b, k, d] - noise[b, d]) (ge[b, k] + gL[b] dL[b]/de[b, k])
    dnoise[b, d]   = -sum_k dpred[b, k, d]

Forward: one program per image holds its K predictions as the rows of one tile, reads the noise once for all K,
accumulates in fp32 (fp64 for fp64 inputs) and ends with the log-softmax and the cross-entropy: one launch writes e
and L. Backward: one launch over (image, chunk of D) recomputes p from the saved e and writes dpred and dnoise.
Nothing of size B·K·D is saved or materialised; fp16 and bf16 inputs are read as they are. `index` [B] (optional)
says which row of noise image b uses: the ragged batch's gather happens in the kernel.

`torch.ops.cp.dc_loss` is a torch.library op with its autograd formula (`torch.ops.cp.dc_loss_backward`), so
torch.compile(fullgraph=True) and CUDA-graph capture take it whole. dc_score's `dc_errors`, `dc_cross_entropy` and
`soft_cross_entropy` call it where `dc_kernels.dc_loss_impl` says so, and are the formulas it is tested against.
This module imports triton: it is imported only when a call takes the kernel.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction



def _acc_dtype(pred, noise):
    """fp32 accumulation, fp64 for fp64 inputs (as dc_score.dc_errors)."""
    return torch.float64 if torch.float64 in (pred.dtype, noise.dtype) else torch.float32


# Elements per tile: the forward loops over D in tiles of KP x (FWD_TILE / KP); a backward program covers one.
FWD_TILE, BWD_TILE = 16384, 4096


@triton.jit
def _log_posterior(e, rows, temp):
    """log softmax_k(-e_k / temp) over the valid rows of e [KP] (-inf elsewhere)."""
    z = tl.where(rows, -e / temp, float("-inf"))
    z = z - tl.max(z, axis=0)
    return z - tl.log(tl.sum(tl.exp(z), axis=0))


@triton.jit
def _hard_target(target, b, column, TARGET_PTR: tl.constexpr):
    y = column
    if TARGET_PTR:
        y = tl.load(target + b).to(tl.int32)
    return y


@triton.jit
def _fwd_kernel(pred, noise, index, target, teacher, e_out, loss_out, K, D, spb, spk, snb, stb, stk, column, temp,
                MODE: tl.constexpr, HAS_INDEX: tl.constexpr, TARGET_PTR: tl.constexpr,
                KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    rows = k < K
    nb = b
    if HAS_INDEX:
        nb = tl.load(index + b).to(tl.int64)
    p = pred + b * spb + k[:, None].to(tl.int64) * spk
    n = noise + nb * snb
    acc = tl.zeros([KP, BLOCK], dtype=ACC)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        x = tl.load(n + d, mask=d < D, other=0.0).to(ACC)
        diff = tl.load(p + d[None, :], mask=rows[:, None] & (d < D)[None, :], other=0.0).to(ACC) - x[None, :]
        acc += diff * diff
    e = tl.sum(acc, axis=1) / D
    tl.store(e_out + b * K + k, e, mask=rows)
    if MODE == 1:  # hard: -log p[y]; a target outside [0, K) gives NaN
        y = _hard_target(target, b, column, TARGET_PTR)
        loss = -tl.sum(tl.where(k == y, _log_posterior(e, rows, temp), 0.0), axis=0)
        tl.store(loss_out + b, tl.where((y >= 0) & (y < K), loss, float("nan")))
    if MODE == 2:  # soft: -sum_k q log p
        q = tl.load(teacher + b * stb + k * stk, mask=rows, other=0.0).to(ACC)
        tl.store(loss_out + b, -tl.sum(q * tl.where(rows, _log_posterior(e, rows, temp), 0.0), axis=0))


@triton.jit
def _bwd_kernel(pred, noise, index, target, teacher, e, g_loss, g_e, dpred, dnoise, K, D, spb, spk, snb, stb, stk,
                sgl, sgb, sgk, column, temp, MODE: tl.constexpr, HAS_INDEX: tl.constexpr,
                TARGET_PTR: tl.constexpr, HAS_GL: tl.constexpr, HAS_GE: tl.constexpr, NOISE_GRAD: tl.constexpr,
                KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    rows = k < K
    de = tl.zeros([KP], dtype=ACC)  # dLoss/de[b, k] for every k, recomputed by every program of image b
    if HAS_GE:
        de += tl.load(g_e + b * sgb + k * sgk, mask=rows, other=0.0).to(ACC)
    if HAS_GL:
        p = tl.exp(_log_posterior(tl.load(e + b * K + k, mask=rows, other=0.0), rows, temp))
        if MODE == 1:
            q = (k == _hard_target(target, b, column, TARGET_PTR)).to(ACC)
            s = 1.0
        else:
            q = tl.load(teacher + b * stb + k * stk, mask=rows, other=0.0).to(ACC)
            s = tl.sum(q, axis=0)
        de += tl.load(g_loss + b * sgl).to(ACC) * (q - s * p) / temp
    coef = 2.0 * de / D
    nb = b
    if HAS_INDEX:
        nb = tl.load(index + b).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rows[:, None] & (d < D)[None, :]
    x = tl.load(noise + nb * snb + d, mask=d < D, other=0.0).to(ACC)
    y = tl.load(pred + b * spb + k[:, None].to(tl.int64) * spk + d[None, :], mask=mask, other=0.0).to(ACC)
    grad = tl.where(mask, (y - x[None, :]) * coef[:, None], 0.0)
    tl.store(dpred + (b * K + k[:, None]) * D + d[None, :], grad.to(dpred.dtype.element_ty), mask=mask)
    if NOISE_GRAD:
        tl.store(dnoise + b * D + d, (-tl.sum(grad, axis=0)).to(dnoise.dtype.element_ty), mask=d < D)


INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 when triton was first imported


def _flat(x, *shape):
    """x viewed as [*shape, D] with a unit-stride last dim (copied only when it cannot be)."""
    x = x.reshape(*shape, -1)
    return x if x.stride(-1) == 1 else x.contiguous()


def _mode(target, teacher, column):
    return 2 if teacher is not None else 1 if target is not None or column >= 0 else 0


def _launch(pred, noise, index, target, teacher, mode, tile):
    """The tensors both kernels read (pred [B, K, D], noise [N, D], index and target dense), their sizes and strides,
    and the constexprs of the tile."""
    B, K = pred.shape[:2]
    p, n = _flat(pred, B, K), _flat(noise, noise.shape[0])
    index, target = (x if x is None else x.contiguous() for x in (index, target))
    kp = triton.next_power_of_2(K)
    limit = 1 << 16 if INTERPRETED else tile  # the interpreter pays per program and per op, not per element
    meta = dict(MODE=mode, KP=kp, BLOCK=min(triton.next_power_of_2(p.shape[2]), max(limit // kp, 16)),
                ACC=tl.float64 if _acc_dtype(pred, noise) == torch.float64 else tl.float32)
    args = (K, p.shape[2], p.stride(0), p.stride(1), n.stride(0), *(teacher.stride() if mode == 2 else (0, 0)))
    return (p, n, index, target, teacher), args, meta


@torch.library.custom_op("cp::dc_loss", mutates_args=())
def _dc_loss_op(pred: torch.Tensor, noise: torch.Tensor, index: Optional[torch.Tensor], target: Optional[torch.Tensor],
                teacher: Optional[torch.Tensor], column: int, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [B], or [0] with neither target nor teacher; e [B, K]): `dc_loss` with its arguments checked."""
    mode = _mode(target, teacher, column)
    tensors, args, meta = _launch(pred, noise, index, target, teacher, mode, FWD_TILE)
    B, K = pred.shape[:2]
    e = torch.empty(B, K, device=pred.device, dtype=_acc_dtype(pred, noise))
    loss = torch.empty(B if mode else 0, device=pred.device, dtype=e.dtype)
    _fwd_kernel[(B,)](*tensors, e, loss, *args, column, temp, HAS_INDEX=index is not None,
                      TARGET_PTR=target is not None, num_warps=16, **meta)
    return loss, e


@_dc_loss_op.register_fake
def _(pred, noise, index, target, teacher, column, temp):
    B, K = pred.shape[:2]
    e = pred.new_empty(B, K, dtype=_acc_dtype(pred, noise))
    return e.new_empty(B if _mode(target, teacher, column) else 0), e


@torch.library.custom_op("cp::dc_loss_backward", mutates_args=())
def _dc_loss_backward_op(g_loss: Optional[torch.Tensor], g_e: Optional[torch.Tensor], e: torch.Tensor,
                         pred: torch.Tensor, noise: torch.Tensor, index: Optional[torch.Tensor],
                         target: Optional[torch.Tensor], teacher: Optional[torch.Tensor], column: int, temp: float,
                         noise_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpred, shaped as pred; dnoise per image [B, *latent], or [0] without noise_grad)."""
    tensors, args, meta = _launch(pred, noise, index, target, teacher, _mode(target, teacher, column), BWD_TILE)
    B, K, D = tensors[0].shape
    dpred = torch.empty(B, K, D, device=pred.device, dtype=pred.dtype)
    dnoise = torch.empty((B, D) if noise_grad else 0, device=pred.device, dtype=noise.dtype)
    has_gl = g_loss is not None and meta["MODE"] != 0
    _bwd_kernel[(B, triton.cdiv(D, meta["BLOCK"]))](
        *tensors, e, g_loss, g_e, dpred, dnoise, *args, g_loss.stride(0) if has_gl else 0,
        *(g_e.stride() if g_e is not None else (0, 0)), column, temp, HAS_INDEX=index is not None,
        TARGET_PTR=target is not None, HAS_GL=has_gl, HAS_GE=g_e is not None, NOISE_GRAD=noise_grad, num_warps=4,
        **meta)
    return dpred.view(pred.shape), dnoise.view((B, *pred.shape[2:]) if noise_grad else (0,))


@_dc_loss_backward_op.register_fake
def _(g_loss, g_e, e, pred, noise, index, target, teacher, column, temp, noise_grad):
    B = pred.shape[0]
    return pred.new_empty(pred.shape), noise.new_empty((B, *pred.shape[2:]) if noise_grad else (0,))


def _setup_context(ctx, inputs, output):
    pred, noise, index, target, teacher, column, temp = inputs
    ctx.save_for_backward(pred, noise, index, target, teacher, output[1])
    ctx.column, ctx.temp = column, temp
    ctx.set_materialize_grads(False)  # an output without a gradient costs no zero-filled tensor


def _backward(ctx, g_loss, g_e):
    pred, noise, index, target, teacher, e = ctx.saved_tensors
    dpred, dnoise = torch.ops.cp.dc_loss_backward(g_loss, g_e, e, pred, noise, index, target, teacher, ctx.column,
                                                  ctx.temp, ctx.needs_input_grad[1])
    if ctx.needs_input_grad[1] and index is not None:  # images sharing a noise row add up
        dnoise = torch.zeros_like(noise).index_add_(0, index, dnoise)
    dteacher = None
    if ctx.needs_input_grad[4] and g_loss is not None:  # dL/dq = -log p: never needed at the call sites
        dteacher = (-g_loss[:, None] * torch.log_softmax(-e / ctx.temp, -1)).to(teacher.dtype)
    return dpred, dnoise if ctx.needs_input_grad[1] else None, None, None, dteacher, None, None


_dc_loss_op.register_autograd(_backward, setup_context=_setup_context)


def call_op(pred, noise, target, temp, teacher, index):
    """`dc_kernels.fused_dc_loss`: the op, its arguments already checked by dc_score."""
    column, target = (target, None) if isinstance(target, int) else (-1, target)
    return torch.ops.cp.dc_loss(pred, noise, index, target, teacher, column, float(temp))
