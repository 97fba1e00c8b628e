"""Diffusion classifier scores (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier").

For a clean latent x0, a timestep t and noise eps shared by every prompt c_k (a paired comparison),

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,     e_k = mean_dims (eps - eps_theta(x_t, t, c_k))^2

and the classifier posterior is p(c_k | x) = softmax_k(-e_k / tau). The errors are means over the latent's dims, in
the units of the denoising loss whatever the latent's size. B images x K prompts run as one UNet batch of B*K rows
(row b*K + k); the noise is never copied K times. From the predictions pred [B, K, *latent] and the noise
[B, *latent]:

    dc_errors           e[b, k]
    posterior           p(c_k | x) = softmax_k(-e_k / tau)             (log_posterior: its log)
    dc_cross_entropy    -log p(c_target | x)                           (L_DC / tau, the DC Fisher)
    soft_cross_entropy  H(q, p) = -sum_k q_k log p(c_k | x)            (DSC, q a teacher's posterior)

On a CUDA device, at the sizes where it is faster, the three functions of pred hand their work to the fused Triton
kernel (dc_kernels/), which computes the same formulas in one launch each way.

The UNet is any callable unet(x [N, C, h, w], t [N], context [N, L, Cc]) -> eps [N, C, h, w].
"""
import torch

import dc_kernels
from unet import add_noise


def noise_predictions(unet, latents, context, t, noise, alphas_cumprod, prompts=None, rows=None):
    """eps_theta(x_t, t, c_k) of B latents [B, C, h, w] under K prompt embeddings context [K, L, Cc] at timesteps t [B]
    (or one int), x_t made with noise [B, C, h, w] shared across prompts: [B, K, C, h, w].

    prompts: optional LongTensor [B, K'] choosing, per image, which rows of context to score (default: all K).
    rows: optional (image [R], prompt [R]): only these (image, prompt) pairs, a ragged batch: [R, C, h, w].
    """
    B, dev = latents.shape[0], latents.device
    t = torch.as_tensor(t, device=dev).reshape(-1).expand(B)
    ragged = rows is not None
    if not ragged:
        if prompts is None:
            prompts = torch.arange(context.shape[0], device=dev).expand(B, -1)
        rows = torch.arange(B, device=dev).repeat_interleave(prompts.shape[1]), prompts.reshape(-1)  # r = b*K + k
    image, prompt = (r.to(dev) for r in rows)
    pred = unet(add_noise(latents, noise, t, alphas_cumprod)[image], t[image], context[prompt])
    return pred if ragged else pred.view(B, prompts.shape[1], *latents.shape[1:])


def denoising_errors(unet, latents, context, t, noise, alphas_cumprod, prompts=None, return_pred=False):
    """e[B, K]: errors of B latents [B, C, h, w] under K prompt embeddings context [K, L, Cc] at timesteps t [B]
    (or one int) with noise [B, C, h, w] shared across prompts. Differentiable when called under grad.

    prompts: as in `noise_predictions`. return_pred: also return the noise predictions [B, K, C, h, w], as (e, pred).
    """
    pred = noise_predictions(unet, latents, context, t, noise, alphas_cumprod, prompts)
    e = dc_errors(pred, noise)
    return (e, pred) if return_pred else e


def check_args(pred, noise, index=None, target=None, teacher=None):
    """The target as the formulas and the kernel take it (an int column, or a LongTensor [B] on pred's device), after
    checking every argument of the DC functions: a ValueError names what does not fit."""
    if target is not None and not isinstance(target, (int, torch.Tensor)):
        target = torch.as_tensor(target, device=pred.device)
    if pred.dim() < 3 or pred.shape[2:] != noise.shape[1:] or \
            (pred.shape[0] != noise.shape[0] if index is None else index.shape != pred.shape[:1]):
        raise ValueError(f"expected pred [B, K, *latent], noise [B, *latent] (or [N, *latent] with index [B]), got "
                         f"{tuple(pred.shape)} and {tuple(noise.shape)}")
    if isinstance(target, int) and not 0 <= target < pred.shape[1]:
        raise ValueError(f"target {target} is not one of the {pred.shape[1]} prompts")
    if isinstance(target, torch.Tensor) and target.shape != pred.shape[:1]:
        raise ValueError(f"expected one target per image, [{pred.shape[0]}], got {tuple(target.shape)}")
    if teacher is not None and teacher.shape != pred.shape[:2]:
        raise ValueError(f"expected a teacher [B, K] = {tuple(pred.shape[:2])}, got {tuple(teacher.shape)}")
    return target


def takes_kernel(pred, impl):
    """Whether this call runs the fused kernel (dc_kernels.dc_loss_impl: 'auto' on a CUDA device where it is faster,
    'triton' always, 'reference' never); an empty batch never does."""
    return dc_kernels.dc_loss_impl(pred, impl) != "reference" and pred.shape[0] > 0


def dc_errors(pred, noise, index=None, impl="auto"):
    """e[b, k] = mean_d (noise[b, d] - pred[b, k, d])^2 of pred [B, K, *latent] and noise [B, *latent]
    (noise[index[b]] with index [B]); accumulated in fp32 (fp64 for fp64 inputs)."""
    check_args(pred, noise, index)
    if takes_kernel(pred, impl):
        return dc_kernels.fused_dc_loss(pred, noise, None, 1.0, None, index)[1]
    acc = torch.float64 if torch.float64 in (pred.dtype, noise.dtype) else torch.float32
    noise = noise if index is None else noise[index]
    return (pred.to(acc) - noise.to(acc).unsqueeze(1)).square().flatten(2).mean(-1)


def log_posterior(e, temp=1.0):
    """log p(c_k | x) = log softmax_k(-e_k / temp) over the last dim."""
    return torch.log_softmax(-e / temp, dim=-1)


def posterior(e, temp=1.0):
    """p(c_k | x) = softmax_k(-e_k / temp) over the last dim."""
    return torch.softmax(-e / temp, dim=-1)


def dc_cross_entropy(pred, noise, target, temp=1.0, index=None, impl="auto"):
    """(L [B], e [B, K]): L = -log p(c_target | x) per image, p the posterior of the errors e = `dc_errors`;
    target: the prompt of each image, an int column or a LongTensor [B]."""
    target = check_args(pred, noise, index, target)
    if takes_kernel(pred, impl):
        return dc_kernels.fused_dc_loss(pred, noise, target, temp, None, index)
    e = dc_errors(pred, noise, index, "reference")
    log_p = log_posterior(e, temp)
    if isinstance(target, int):  # a column: no index tensor to copy to the device
        return -log_p[:, target], e
    return -log_p.gather(-1, target[:, None]).squeeze(-1), e


def soft_cross_entropy(pred, noise, teacher, temp=1.0, index=None, impl="auto"):
    """(L [B], e [B, K]): L = H(q, p) = -sum_k q_k log p(c_k | x) per image, q = teacher [B, K] (a teacher's
    posterior), p the posterior of the errors e = `dc_errors`."""
    check_args(pred, noise, index, teacher=teacher)
    if takes_kernel(pred, impl):
        return dc_kernels.fused_dc_loss(pred, noise, None, temp, teacher, index)
    e = dc_errors(pred, noise, index, "reference")
    return -(teacher * log_posterior(e, temp)).sum(-1), e
