"""Custom kernels. dc_errors: fused per-(image, prompt) denoising errors with a Triton forward and backward."""
from .dc_loss import dc_errors, dc_errors_impl, dc_errors_reference

__all__ = ["dc_errors", "dc_errors_impl", "dc_errors_reference"]
