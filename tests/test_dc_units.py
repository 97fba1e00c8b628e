"""The DC terms in the units of the denoising loss (cp.py's docstring): τ·H and δ·τ·L_DC scale with the errors like
L_denoise, stay bounded as τ → 0 and tend to the margin."""
import contextlib
from dataclasses import replace

import pytest
import torch

import cp
import dc_score
import lora
import unet
from test_cp import randomize

PROMPTS = ["a photo of a red star", "a photo", "a blue star"]


def dsc_model(tiny_model_dir, **kw):
    """The tiny model with three different adapters: the student "current", "teacher1" and "teacher2"."""
    model = unet.load_model(tiny_model_dir)
    hp = cp.Hparams(method="dsc", **kw)
    for i, name in enumerate(("current", "teacher1", "teacher2")):
        cp.install_adapter(model.unet, name, None, hp)
        randomize(model.unet, name, 30 + i, scale=0.3)  # large enough that the teachers and the student disagree
    return model, hp


def every_term(model, hp, tau, seed=0):
    """Each loss term of the methods, on the same images and draws: L_denoise, L_DC, the ragged δ·L_DC batch, DSC."""
    x0, gen = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)), torch.Generator().manual_seed
    hp = replace(hp, dc_temp=tau)
    lora.enable_only(model.unet, "current")  # the student, as dsc_loss leaves it
    both = cp.denoise_and_dc_loss(model, x0, PROMPTS, hp, gen(seed))
    return {"denoise": cp.denoise_loss(model, x0, PROMPTS[:1], gen(seed)),
            "dc": cp.dc_loss(model, x0, PROMPTS, tau, gen(seed)),
            "ragged denoise": both["denoise"], "ragged dc": both["dc"],
            **cp.dsc_loss(model, x0, PROMPTS, hp, gen(seed))}


def subset_errors(model, x0, prompts, gen):
    """e [B, K] of the enabled adapter: every prompt at one (t, ε) per image, drawn as the losses draw them."""
    t, eps = cp.draw_noise(model, x0, gen)
    context = model.encode_text(prompts)
    return dc_score.dc_errors(dc_score.noise_predictions(model.unet, x0, context, t, eps, model.alphas_cumprod), eps)


@contextlib.contextmanager
def errors_scaled(monkeypatch, s):
    """Every noise and every noise prediction multiplied by √s (the UNet sees the same x_t): every error e = ‖ε − ε̂‖²
    is multiplied by s exactly (s a power of 4)."""
    root = s ** 0.5
    draw, predict = cp.draw_noise, dc_score.noise_predictions
    with monkeypatch.context() as m:
        m.setattr(cp, "draw_noise", lambda *a, **k: (lambda t, eps: (t, eps * root))(*draw(*a, **k)))
        m.setattr(dc_score, "noise_predictions",
                  lambda unet_, x0, ctx, t, noise, ac, *a, **k: predict(unet_, x0, ctx, t, noise / root, ac, *a, **k)
                  * root)
        yield


def test_every_term_scales_with_the_errors(tiny_model_dir, monkeypatch):
    """(a) Errors × s and τ × s: each DC term × s, like L_denoise and DSC's noise term. Without the factor τ a DC term
    would not move (the posterior is the same)."""
    model, hp = dsc_model(tiny_model_dir, dsc_w_h=0.7, dsc_w_n=1.3, dc_weight=0.5, dc_batch=2)
    tau = 0.02
    base = every_term(model, hp, tau)
    for s in (4.0, 0.25):
        with errors_scaled(monkeypatch, s):
            scaled = every_term(model, hp, s * tau)
        for k, v in base.items():
            assert scaled[k].item() == pytest.approx(s * v.item(), rel=1e-4), (k, s)


def error_gradients(model, x0, prompts, seed, params):
    """e [B, K] of the student at the draws of `seed`, and Σ_k ‖∂e_bk/∂φ‖ averaged over the images b."""
    e = subset_errors(model, x0, prompts, torch.Generator().manual_seed(seed))
    norms = [torch.cat([g.flatten() for g in torch.autograd.grad(e[b, k], params, retain_graph=True)]).norm()
             for b in range(e.shape[0]) for k in range(e.shape[1])]
    return e.detach(), float(sum(norms)) / e.shape[0]


def grad_norm(term, params):
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(term, params)]).norm())


def test_dc_terms_stay_bounded_and_tend_to_the_margin_as_tau_shrinks(tiny_model_dir):
    """(b) τ from 1e-2 to 1e-6: ‖∇_φ‖ of each DC term ≤ its weight × (number of teachers) × mean_b Σ_k ‖∂e_bk/∂φ‖
    (its gradient is (q − p)·∂e, |q − p| ≤ 1), and its value lies within weight × τ log K of the margin
    Σ_k q_k (e_k − min e), q the target (one-hot c_n for L_DC, the teacher's posterior for DSC)."""
    model, hp = dsc_model(tiny_model_dir, dsc_w_h=0.7, dsc_w_n=0.0, dc_weight=0.5, dc_batch=2)
    params = cp.lora.set_trainable(model.unet, "current")
    x0, K = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)), len(PROMPTS)
    lora.enable_only(model.unet, "current")
    e, bound = error_gradients(model, x0, PROMPTS, 0, params)
    teachers = {}
    for name in ("teacher1", "teacher2"):
        lora.enable_only(model.unet, name)
        with torch.no_grad():
            teachers[name] = subset_errors(model, x0, PROMPTS, torch.Generator().manual_seed(0))
    margin = lambda q, err: float(((q * (err - err.min(1, keepdim=True).values)).sum(1)).mean())
    for tau in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        hp = replace(hp, dc_temp=tau)
        gen = lambda: torch.Generator().manual_seed(0)
        lora.enable_only(model.unet, "current")
        dc = cp.dc_loss(model, x0, PROMPTS, tau, gen())
        assert grad_norm(dc, params) <= bound * 1.001
        assert margin(torch.eye(K)[[0, 0]], e) - 1e-6 <= dc.item() <= margin(torch.eye(K)[[0, 0]], e) + tau * 1.1
        ragged = cp.denoise_and_dc_loss(model, x0, PROMPTS, hp, gen())["dc"]
        assert grad_norm(ragged, params) <= hp.dc_weight * bound * 1.001
        assert ragged.item() == pytest.approx(hp.dc_weight * dc.item(), rel=1e-4, abs=1e-9)
        h = cp.dsc_loss(model, x0, PROMPTS, hp, gen())["dsc_h"]
        assert grad_norm(h, params) <= 2 * hp.dsc_w_h * bound * 1.001, tau
        want = sum(margin(dc_score.posterior(teachers[n], tau), e) for n in teachers)
        assert hp.dsc_w_h * want - 1e-6 <= h.item() <= hp.dsc_w_h * (want + 2 * tau * 1.1), tau
    assert want > 1e-4 and margin(torch.eye(K)[[0, 0]], e) > 1e-4  # the margins are not 0: without τ, the terms
    # would grow as 1/τ
