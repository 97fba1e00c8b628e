"""The PyTorch reference of the fused diffusion-classifier errors (kernels/dc_loss.py), which needs no Triton:

    e[b, k] = sum_d (pred[b, k, d] - noise[b, d])^2        (reduction="sum"; "mean" divides by D)
"""
import torch


def _acc_dtype(pred, noise):
    return torch.float64 if torch.float64 in (pred.dtype, noise.dtype) else torch.float32


def _check(pred, noise, reduction):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if pred.dim() < 3 or pred.shape[0] != noise.shape[0] or pred.shape[2:] != noise.shape[1:]:
        raise ValueError(f"expected pred [B, K, *latent] and noise [B, *latent], got {tuple(pred.shape)} "
                         f"and {tuple(noise.shape)}")


def dc_errors_reference(pred, noise, reduction="sum"):
    """Plain PyTorch e[b, k]: materializes the difference; fp32 result (fp64 for fp64 inputs)."""
    _check(pred, noise, reduction)
    acc = _acc_dtype(pred, noise)
    sq = (pred.to(acc) - noise.to(acc).unsqueeze(1)).square().flatten(2)
    return sq.sum(-1) if reduction == "sum" else sq.mean(-1)
