"""Custom kernels. dc_loss: the fused DC loss (errors, posterior, cross-entropy) as one Triton launch forward and one
backward, a torch.library op, with its PyTorch reference; dc_errors: the same without a target."""
from .dc_loss import dc_errors, dc_errors_reference, dc_loss, dc_loss_impl, dc_loss_reference, kernel_wins

__all__ = ["dc_errors", "dc_errors_reference", "dc_loss", "dc_loss_impl", "dc_loss_reference", "kernel_wins"]
