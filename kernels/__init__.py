"""Custom kernels. dc_loss: the fused DC loss (errors, posterior, cross-entropy) as one Triton launch forward and one
backward, a torch.library op, with its PyTorch reference (kernels/reference.py); dc_errors: the same without a target.

Without Triton (Windows, macOS) every call takes the reference, the path a CPU takes anyway."""
from .reference import checked_target, dc_errors_reference, dc_loss_reference

try:
    from .dc_loss import dc_errors, dc_loss, dc_loss_impl, kernel_wins
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
        """(L [B], e [B, K]) by the PyTorch reference (kernels/dc_loss.py's `dc_loss` says what they are)."""
        dc_loss_impl(pred, impl)
        target = checked_target(pred, noise, reduction, index, target, teacher)
        return dc_loss_reference(pred, noise, target, temp, teacher, reduction, index)

    def dc_errors(pred, noise, reduction="sum", impl="auto", index=None):
        """e[B, K] = sum (or mean) over latent dims of (pred[b, k] - noise[b])^2, by the PyTorch reference."""
        return dc_loss(pred, noise, reduction=reduction, index=index, impl=impl)[1]

__all__ = ["dc_errors", "dc_errors_reference", "dc_loss", "dc_loss_impl", "dc_loss_reference", "kernel_wins"]
