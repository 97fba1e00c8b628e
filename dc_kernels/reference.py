"""The PyTorch reference of the fused DC loss (dc_kernels/fused.py), which needs no Triton:

    e[b, k] = sum_d (pred[b, k, d] - noise[b, d])^2        (reduction "sum"; "mean" divides by D)
    L[b]    = -log softmax_k(-e[b, k] / tau)[y_b]            (hard target y_b)
            = -sum_k q[b, k] log softmax_k(-e[b, k] / tau)   (soft target: a teacher's q)

autograd differentiates it: the formula the kernel is tested against, and the path every CPU call takes.
"""
import torch


def _acc_dtype(pred, noise):
    return torch.float64 if torch.float64 in (pred.dtype, noise.dtype) else torch.float32


def checked_target(pred, noise, reduction, index, target, teacher):
    """The target as the kernel and the reference take it (an int column or a LongTensor [B] on pred's device), after
    checking every argument of `dc_loss`."""
    if target is not None and not isinstance(target, (int, torch.Tensor)):
        target = torch.as_tensor(target, device=pred.device)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if pred.dim() < 3 or pred.shape[2:] != noise.shape[1:] or \
            (pred.shape[0] != noise.shape[0] if index is None else index.shape != pred.shape[:1]):
        raise ValueError(f"expected pred [B, K, *latent], noise [B, *latent] (or [N, *latent] with index [B]), got "
                         f"{tuple(pred.shape)} and {tuple(noise.shape)}")
    if isinstance(target, int) and not 0 <= target < pred.shape[1]:
        raise ValueError(f"target {target} is not one of the {pred.shape[1]} prompts")
    if isinstance(target, torch.Tensor) and target.shape != pred.shape[:1]:
        raise ValueError(f"expected one target per image, [{pred.shape[0]}], got {tuple(target.shape)}")
    if teacher is not None and (teacher.shape != pred.shape[:2] or target is not None):
        raise ValueError(f"expected a teacher [B, K] = {tuple(pred.shape[:2])} and no target, got "
                         f"{tuple(teacher.shape)} and {target}")
    return target


def dc_errors_reference(pred, noise, reduction="sum"):
    """Plain PyTorch e[b, k]: materializes the difference; fp32 result (fp64 for fp64 inputs)."""
    acc = _acc_dtype(pred, noise)
    sq = (pred.to(acc) - noise.to(acc).unsqueeze(1)).square().flatten(2)
    return sq.sum(-1) if reduction == "sum" else sq.mean(-1)


def dc_loss_reference(pred, noise, target=None, temp=1.0, teacher=None, reduction="mean", index=None):
    """`dc_loss` in plain PyTorch, differentiated by autograd: the formula the kernel is tested against."""
    e = dc_errors_reference(pred, noise if index is None else noise[index], reduction)
    if target is None and teacher is None:
        return e.new_empty(0), e
    log_p = torch.log_softmax(-e / temp, dim=-1)
    if teacher is not None:
        return -(teacher * log_p).sum(-1), e
    return -(log_p[:, target] if isinstance(target, int) else log_p.gather(-1, target[:, None]).squeeze(-1)), e
