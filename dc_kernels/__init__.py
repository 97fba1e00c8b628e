"""The fused DC loss and the choice, per call, between it and its PyTorch reference.

dc_loss: the DC errors, posterior and cross-entropy as one Triton launch forward and one backward, a torch.library
op (dc_kernels/fused.py), or the same formula in plain PyTorch (dc_kernels/reference.py); dc_errors: the same without
a target. `dc_loss_impl` says which one a call takes.

The package is not called `kernels`: that is the import name of Hugging Face's hub-kernels distribution, which
transformers imports, and a top-level folder of that name would be found first and break it.

Triton is imported only when a call would take the kernel (a CUDA tensor, or impl="triton"). Where triton is missing
or fails to import (Windows, macOS, a broken wheel, a missing compiler or driver library) every call takes the
reference; a CUDA call says so once, on one line.
"""
import importlib
import sys

from .reference import checked_target, dc_errors_reference, dc_loss_reference

# Most prompts per image the kernel takes (the rows of one tile); more go to the reference.
KMAX = 64
# The kernel serves CUDA tensors with at least this many elements (more than 64 SD latents of 4x64x64): at and below
# that size an earlier errors-only kernel was slower than the reference (bench/GPU.md); `python bench/speed.py --only
# kernel` prints the crossover of this kernel on a GPU, from which it is set.
KERNEL_MIN_NUMEL = 64 * 4 * 64 * 64 + 1

_fused = None  # dc_kernels.fused once imported, or the exception that stopped it


def fused_module():
    """dc_kernels.fused (which imports triton), imported on the first call; the exception instead where it cannot be."""
    global _fused
    if _fused is None:
        try:
            _fused = importlib.import_module(".fused", __name__)
        except (ImportError, OSError) as e:  # OSError: a shared library the wheel needs cannot be loaded
            _fused = e
    return _fused


def kernel_wins(pred):
    """Whether the compiled kernel is the faster path for pred [B, K, *latent] (see KERNEL_MIN_NUMEL)."""
    if not (pred.is_cuda and pred.shape[1] <= KMAX and pred.numel() >= KERNEL_MIN_NUMEL):
        return False
    fused = fused_module()
    if isinstance(fused, Exception):
        if not getattr(fused, "reported", False):
            print(f"warning: triton cannot be imported ({type(fused).__name__}: {fused}); the DC loss runs on its "
                  "PyTorch reference", file=sys.stderr)
            fused.reported = True
        return False
    return not fused.INTERPRETED


def dc_loss_impl(pred, impl="auto"):
    """Which path `dc_loss` and `dc_errors` take for pred: 'reference', 'triton' (compiled) or 'triton-interpret'.

    'auto' is the kernel where `kernel_wins`, else the reference (always, on a CPU); 'triton' insists on the kernel,
    under the interpreter when triton was imported with TRITON_INTERPRET=1.
    """
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "auto":
        return "triton" if kernel_wins(pred) else "reference"
    if impl == "reference":
        return impl
    fused = fused_module()
    if isinstance(fused, Exception):
        raise RuntimeError(f"impl 'triton': triton cannot be imported ({type(fused).__name__}: {fused}); "
                           "pip install triton, on Linux")
    if pred.shape[1] > KMAX:
        raise ValueError(f"the kernel takes at most {KMAX} prompts per image, got {pred.shape[1]}")
    if fused.INTERPRETED:
        return "triton-interpret"
    if not pred.is_cuda:
        raise RuntimeError("the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 in the environment "
                           "before triton is first imported (to run it on CPU under the interpreter)")
    return "triton"


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
    return fused_module().fused_dc_loss(pred, noise, target, temp, teacher, reduction, index)


def dc_errors(pred, noise, reduction="sum", impl="auto", index=None):
    """e[B, K] = sum (or mean) over the latent dims of (pred[b, k] - noise[b])^2 (noise[index[b]] with index),
    differentiable in pred and noise: `dc_loss` without a target."""
    return dc_loss(pred, noise, reduction=reduction, index=index, impl=impl)[1]


__all__ = ["dc_errors", "dc_errors_reference", "dc_loss", "dc_loss_impl", "dc_loss_reference", "kernel_wins"]
