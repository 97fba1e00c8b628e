"""Custom kernels. dc_loss: the fused DC loss (errors, posterior, cross-entropy) as one Triton launch forward and one
backward, a torch.library op (kernels/dc_loss.py), with its PyTorch reference (kernels/reference.py); dc_errors: the
same without a target. Each call takes one or the other (`dc_loss_impl`).

Without Triton (Windows, macOS) every call takes the reference, the path a CPU takes anyway."""
from .reference import checked_target, dc_errors_reference, dc_loss_reference

try:
    from .dc_loss import dc_loss_impl, fused_dc_loss, kernel_wins
except ModuleNotFoundError as e:
    if e.name != "triton":
        raise

    def kernel_wins(pred):
        return False

    def dc_loss_impl(pred, impl="auto"):
        """'reference': the only path without Triton."""
        if impl not in ("auto", "triton", "reference"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
        if impl == "triton":
            raise RuntimeError("impl 'triton': Triton is not installed (pip install triton, on Linux)")
        return "reference"


def dc_loss(pred, noise, target=None, temp=1.0, teacher=None, reduction="mean", index=None, impl="auto"):
    """(L [B], e [B, K]): the DC cross-entropy of each image and its errors, from predictions pred [B, K, *latent]
    and noise [B, *latent] (or noise [N, *latent] and index [B], the row of noise each image uses).

    target: the prompt of each image (an int, or a LongTensor [B]): L = -log p(c_target | x) (dc_score's
    `dc_cross_entropy` of e); teacher [B, K]: L = -sum_k teacher[:, k] log p(c_k | x) (`soft_cross_entropy`);
    neither: L is empty. temp: tau of the posterior (a float). impl: see `dc_loss_impl`.
    """
    target = checked_target(pred, noise, reduction, index, target, teacher)
    if dc_loss_impl(pred, impl) == "reference" or pred.shape[0] == 0:
        return dc_loss_reference(pred, noise, target, temp, teacher, reduction, index)
    return fused_dc_loss(pred, noise, target, temp, teacher, reduction, index)


def dc_errors(pred, noise, reduction="sum", impl="auto", index=None):
    """e[B, K] = sum (or mean) over the latent dims of (pred[b, k] - noise[b])^2 (noise[index[b]] with index),
    differentiable in pred and noise: `dc_loss` without a target."""
    return dc_loss(pred, noise, reduction=reduction, index=index, impl=impl)[1]


__all__ = ["dc_errors", "dc_errors_reference", "dc_loss", "dc_loss_impl", "dc_loss_reference", "kernel_wins"]
