"""Custom kernels. dc_errors: fused per-(image, prompt) denoising errors with a Triton forward and backward.

Without Triton (Windows, macOS) every call takes the PyTorch reference, the path a CPU takes anyway."""
from .reference import dc_errors_reference

try:
    from .dc_loss import dc_errors, dc_errors_impl
except ModuleNotFoundError as e:
    if e.name != "triton":
        raise

    def dc_errors_impl(pred, impl="auto"):
        """'reference': the only path without Triton."""
        if impl not in ("auto", "triton", "reference"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
        if impl == "triton":
            raise RuntimeError("impl 'triton': Triton is not installed (pip install triton, on Linux)")
        return "reference"

    def dc_errors(pred, noise, reduction="sum", impl="auto"):
        """e[B, K] = sum (or mean) over latent dims of (pred[b, k] - noise[b])^2, by the PyTorch reference."""
        dc_errors_impl(pred, impl)
        return dc_errors_reference(pred, noise, reduction)

__all__ = ["dc_errors", "dc_errors_impl", "dc_errors_reference"]
