"""The fused DC loss: the errors, posterior and cross-entropy of dc_score.py in one Triton launch forward and one
backward, a torch.library op (dc_kernels/fused.py), and the choice, per call, of whether a call takes it.

dc_score's `dc_errors`, `dc_cross_entropy` and `soft_cross_entropy` are the formulas, in plain PyTorch; where
`dc_loss_impl` says so they hand their arguments to `fused_dc_loss` instead, which computes the same thing without
materialising B·K·D temporaries. tests/test_kernels.py checks the kernel against those formulas.

The package is not called `kernels`: that is the import name of Hugging Face's hub-kernels distribution, which
transformers imports, and a top-level folder of that name would be found first and break it.

Triton is imported only when a call would take the kernel (a CUDA tensor, or impl="triton"). Where triton is missing
or fails to import (Windows, macOS, a broken wheel, a missing compiler or driver library) every call takes the
formulas; a CUDA call says so once, on one line.
"""
import importlib
import sys

# Most prompts per image the kernel takes (the rows of one tile); more go to the reference.
KMAX = 64
# The kernel serves CUDA tensors with more elements than 64 SD latents of 4x64x64: below that size the reference was
# the faster path on the last GPU measured (bench/GPU.md names the kernel and commit); `python bench/speed.py --only
# kernel` prints the crossover on a GPU, from which to set it.
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
    """Which path dc_score's DC functions take for pred: 'reference' (their PyTorch formulas), 'triton' (the compiled
    kernel) or 'triton-interpret'.

    'auto' is the kernel where `kernel_wins`, else the formulas (always, on a CPU); 'triton' insists on the kernel,
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


def fused_dc_loss(pred, noise, target, temp, teacher, index):
    """(L [B], e [B, K]) of the fused op, its arguments checked by dc_score: target an int column or a LongTensor [B]
    (or None), teacher [B, K] (or None; neither: L is empty)."""
    return fused_module().call_op(pred, noise, target, temp, teacher, index)
