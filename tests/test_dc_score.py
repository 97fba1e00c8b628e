"""dc_score: batched per-(image, prompt) errors, posterior and cross-entropies, adaptive classification."""
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import unet as unet_lib
from dc_score import (dc_cross_entropy, dc_errors, denoising_errors, log_posterior, noise_predictions, posterior,
                      soft_cross_entropy)

AC = unet_lib.alphas_cumprod_from_config(unet_lib.PRESETS["tiny"]["scheduler"])


class TinyEps(nn.Module):
    """A stand-in noise predictor with the UNet's signature, mixing x, t and the context nonlinearly."""

    def __init__(self, c=4, cc=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.ctx = nn.Linear(cc, c)
        self.temb = nn.Linear(1, c)

    def forward(self, x, t, context):
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 1000
        gate = self.ctx(context.mean(1))[:, :, None, None]
        return torch.tanh(self.conv(x)) * gate + self.temb(t)[:, :, None, None]


def setup(B=3, K=4, c=4, hw=5, cc=8, L=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyEps(c, cc).to(dtype)
    x0, noise = (torch.randn(B, c, hw, hw, generator=g, dtype=dtype) for _ in range(2))
    context = torch.randn(K, L, cc, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (B,), generator=g)
    return net, x0, context, t, noise


def naive_errors(net, x0, context, t, noise):
    e = torch.zeros(x0.shape[0], context.shape[0], dtype=torch.float64)
    for b in range(x0.shape[0]):
        x_t = unet_lib.add_noise(x0[b:b + 1], noise[b:b + 1], t[b:b + 1], AC)
        for k in range(context.shape[0]):
            sq = (net(x_t, t[b:b + 1], context[k:k + 1]).double() - noise[b].double()) ** 2
            e[b, k] = sq.mean()
    return e


def test_errors_match_per_pair_loop():
    net, x0, context, t, noise = setup()
    e = denoising_errors(net, x0, context, t, noise, AC)
    assert e.shape == (3, 4) and e.dtype == torch.float32
    torch.testing.assert_close(e.double(), naive_errors(net, x0, context, t, noise), rtol=1e-5, atol=1e-5)


def test_prompt_subsets_and_scalar_t():
    net, x0, context, t, noise = setup()
    full, pred = denoising_errors(net, x0, context, 500, noise, AC, return_pred=True)
    x_t = unet_lib.add_noise(x0, noise, torch.full((3,), 500), AC)
    torch.testing.assert_close(pred[1, 2], net(x_t[1:2], 500, context[2:3])[0])
    prompts = torch.tensor([[2, 0], [1, 3], [3, 3]])
    sub = denoising_errors(net, x0, context, 500, noise, AC, prompts=prompts)
    torch.testing.assert_close(sub, full.gather(1, prompts))


def test_ragged_rows_score_only_their_pairs():
    net, x0, context, t, noise = setup()
    image, prompt = torch.tensor([0, 0, 2, 1, 2]), torch.tensor([3, 1, 0, 2, 0])
    pred = noise_predictions(net, x0, context, t, noise, AC, rows=(image, prompt))
    assert pred.shape == (5, 4, 5, 5)
    torch.testing.assert_close(pred, noise_predictions(net, x0, context, t, noise, AC)[image, prompt])
    e = dc_errors(pred[:, None], noise, index=image)[:, 0]
    torch.testing.assert_close(e, denoising_errors(net, x0, context, t, noise, AC)[image, prompt])


def test_cross_entropies_of_the_predictions_are_those_of_their_errors():
    """dc_cross_entropy and soft_cross_entropy of the predictions return the errors `denoising_errors` gives and the
    cross-entropies of the posterior of those errors, written out here."""
    net, x0, context, t, noise = setup()
    pred = noise_predictions(net, x0, context, t, noise, AC)
    e = denoising_errors(net, x0, context, t, noise, AC)
    L, e_dc = dc_cross_entropy(pred, noise, 0, 0.1)
    torch.testing.assert_close(e_dc, e)
    torch.testing.assert_close(L, -torch.log_softmax(-e / 0.1, -1)[:, 0])
    q = posterior(e.flip(-1), 0.3)
    L, e_dc = soft_cross_entropy(pred, noise, q, 0.1)
    torch.testing.assert_close(e_dc, e)
    torch.testing.assert_close(L, -(q * torch.log_softmax(-e / 0.1, -1)).sum(-1))


def test_identical_prompts_identical_errors():
    net, x0, context, t, noise = setup()
    context = torch.cat([context[:2], context[:1]])
    e = denoising_errors(net, x0, context, t, noise, AC)
    torch.testing.assert_close(e[:, 0], e[:, 2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(e[:, 0], e[:, 1])


def test_posterior_normalized_and_permutes_with_prompts():
    net, x0, context, t, noise = setup()
    perm = torch.tensor([2, 0, 3, 1])
    e = denoising_errors(net, x0, context, t, noise, AC)
    e_perm = denoising_errors(net, x0, context[perm], t, noise, AC)
    torch.testing.assert_close(e_perm, e[:, perm])
    for temp in (0.1, 1.0):
        p = posterior(e, temp)
        torch.testing.assert_close(p.sum(-1), torch.ones(3))
        torch.testing.assert_close(posterior(e_perm, temp), p[:, perm])
        assert (p.argmax(-1) == e.argmin(-1)).all()


def test_cross_entropies():
    """By hand: errors e = pred² (noise 0, one latent dim), their posterior at τ = 2 and both cross-entropies."""
    e = torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.5, 0.5]])
    pred, noise = e.sqrt()[..., None], torch.zeros(2, 1)
    torch.testing.assert_close(dc_errors(pred, noise), e)
    p = posterior(e, 2.0)
    by_hand = torch.tensor([1.0, math.exp(-0.5), math.exp(-1.5)])  # exp(-e/2) relative to the first
    torch.testing.assert_close(p[0], by_hand / by_hand.sum())
    torch.testing.assert_close(log_posterior(e, 2.0), p.log())
    torch.testing.assert_close(dc_cross_entropy(pred, noise, torch.tensor([0, 2]), 2.0)[0], -p[[0, 1], [0, 2]].log())
    torch.testing.assert_close(dc_cross_entropy(pred, noise, 1, 2.0)[0], -p[:, 1].log())
    # H(p, p) is the entropy; H(one-hot, q) is the cross-entropy to that class; huge errors stay finite
    torch.testing.assert_close(soft_cross_entropy(pred, noise, p, 2.0)[0], -(p * p.log()).sum(-1))
    torch.testing.assert_close(soft_cross_entropy(pred, noise, torch.eye(3)[[2, 0]], 2.0)[0],
                               dc_cross_entropy(pred, noise, [2, 0], 2.0)[0])
    assert torch.isfinite(dc_cross_entropy(pred * 100, noise, 2)[0]).all()


def test_gradients_match_finite_differences():
    net, x0, context, t, noise = setup(B=2, K=2, c=2, hw=2, cc=4, L=2, dtype=torch.float64)
    params = dict(net.named_parameters())

    def e_of(x0, context, w_ctx):
        p = dict(params, **{"ctx.weight": w_ctx})
        return denoising_errors(lambda *a: functional_call(net, p, a), x0, context, t, noise, AC)

    inputs = [x.detach().clone().requires_grad_() for x in (x0, context, params["ctx.weight"])]
    assert torch.autograd.gradcheck(e_of, inputs)


def test_gradients_reach_the_real_unet():
    torch.manual_seed(0)
    net = unet_lib.UNet(unet_lib.PRESETS["tiny"]["unet"])
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context, t = torch.randn(3, 5, 32), torch.tensor([100, 700])
    e = denoising_errors(net, x0, context, t, noise, AC)
    with torch.no_grad():
        torch.testing.assert_close(e.double(), naive_errors(net, x0, context, t, noise), rtol=1e-4, atol=1e-5)
    (-log_posterior(e)[:, 0]).mean().backward()
    to_k = net.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").weight
    assert to_k.grad is not None and to_k.grad.abs().sum() > 0


