"""The DC terms in the units of the denoising loss (cp.py's docstring): τ·H and δ·τ·L_DC scale with the errors like
L_denoise, stay bounded as τ → 0 and tend to the margin; every call site scores errors as the calibration of τ does;
τ does not depend on how many prompts S holds; DSC's two forms of targets."""
import contextlib
import inspect

import pytest
import torch

import cp
import dc_score
import train
import unet
from test_cp import concepts, fresh, randomize  # noqa: F401 (concepts is a fixture)

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
    cp.enable_only(model.unet, "current")  # the student, as dsc_loss leaves it
    both = cp.denoise_and_dc_loss(model, x0, PROMPTS, hp, gen(seed), tau)
    return {"denoise": cp.denoise_loss(model, x0, PROMPTS[:1], gen(seed)),
            "dc": cp.dc_loss(model, x0, PROMPTS, tau, gen(seed)),
            "ragged denoise": both["denoise"], "ragged dc": both["dc"],
            **cp.dsc_loss(model, x0, PROMPTS, 2, "teacher2", hp, gen(seed), tau)}


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


@pytest.mark.parametrize("targets", cp.DSC_TARGETS)
def test_every_term_scales_with_the_errors(tiny_model_dir, monkeypatch, targets):
    """(a) Errors × s and τ × s: each DC term × s, like L_denoise and DSC's noise term. Without the factor τ a DC term
    would not move (the posterior is the same)."""
    model, hp = dsc_model(tiny_model_dir, dsc_w_h=0.7, dsc_w_n=1.3, dc_weight=0.5, dc_batch=2, dsc_targets=targets)
    tau = 0.02
    base = every_term(model, hp, tau)
    for s in (4.0, 0.25):
        with errors_scaled(monkeypatch, s):
            scaled = every_term(model, hp, s * tau)
        for k, v in base.items():
            assert scaled[k].item() == pytest.approx(s * v.item(), rel=1e-4), (k, s)


def error_gradients(model, x0, prompts, seed, params):
    """e [B, K] of the student at the draws of `seed`, and Σ_k ‖∂e_bk/∂φ‖ averaged over the images b."""
    e = cp.subset_errors(model, x0, prompts, torch.Generator().manual_seed(seed))
    norms = [torch.cat([g.flatten() for g in torch.autograd.grad(e[b, k], params, retain_graph=True)]).norm()
             for b in range(e.shape[0]) for k in range(e.shape[1])]
    return e.detach(), float(sum(norms)) / e.shape[0]


def grad_norm(term, params):
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(term, params)]).norm())


@pytest.mark.parametrize("targets", cp.DSC_TARGETS)
def test_dc_terms_stay_bounded_and_tend_to_the_margin_as_tau_shrinks(tiny_model_dir, targets):
    """(b) τ from 1e-2 to 1e-6: ‖∇_φ‖ of each DC term ≤ its weight × (number of teachers) × mean_b Σ_k ‖∂e_bk/∂φ‖
    (its gradient is (q − p)·∂e, |q − p| ≤ 1), and its value lies within weight × τ log K of the margin
    Σ_k q_k (e_k − min e), q the target (one-hot c_n for L_DC, the teacher's posterior for DSC)."""
    model, hp = dsc_model(tiny_model_dir, dsc_w_h=0.7, dsc_w_n=0.0, dc_weight=0.5, dc_batch=2, dsc_targets=targets)
    params = cp.lora.set_trainable(model.unet, "current")
    x0, K = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)), len(PROMPTS)
    cp.enable_only(model.unet, "current")
    e, bound = error_gradients(model, x0, PROMPTS, 0, params)
    teachers = {}
    for name in ("teacher1", "teacher2"):
        cp.enable_only(model.unet, name)
        with torch.no_grad():
            teachers[name] = cp.subset_errors(model, x0, PROMPTS, torch.Generator().manual_seed(0))
    margin = lambda q, err: float(((q * (err - err.min(1, keepdim=True).values)).sum(1)).mean())
    cols = {"teacher1": [0, 1], "teacher2": [2, 1]} if targets == "column" else {"teacher1": [0, 1, 2],
                                                                                "teacher2": [0, 1, 2]}
    for tau in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        gen = lambda: torch.Generator().manual_seed(0)
        cp.enable_only(model.unet, "current")
        dc = cp.dc_loss(model, x0, PROMPTS, tau, gen())
        assert grad_norm(dc, params) <= bound * 1.001
        assert margin(torch.eye(K)[[0, 0]], e) - 1e-6 <= dc.item() <= margin(torch.eye(K)[[0, 0]], e) + tau * 1.1
        ragged = cp.denoise_and_dc_loss(model, x0, PROMPTS, hp, gen(), tau)["dc"]
        assert grad_norm(ragged, params) <= hp.dc_weight * bound * 1.001
        assert ragged.item() == pytest.approx(hp.dc_weight * dc.item(), rel=1e-4, abs=1e-9)
        h = cp.dsc_loss(model, x0, PROMPTS, 2, "teacher2", hp, gen(), tau)["dsc_h"]
        assert grad_norm(h, params) <= 2 * hp.dsc_w_h * bound * 1.001, tau
        want = sum(margin(dc_score.posterior(teachers[n][:, c], tau), e[:, c]) for n, c in cols.items())
        assert hp.dsc_w_h * want - 1e-6 <= h.item() <= hp.dsc_w_h * (want + 2 * tau * 1.1), tau
    assert want > 1e-4 and margin(torch.eye(K)[[0, 0]], e) > 1e-4  # the margins are not 0: without τ, the terms
    # would grow as 1/τ


def test_every_dc_call_site_scores_errors_as_the_calibration_does(tiny_model_dir, concepts, monkeypatch):
    """(c) The reduction of the errors (mean over the latent's dims) at every DC call of a task that uses them all:
    τ's calibration, δ·L_DC, DSC's teachers and student, the DC Fisher. τ and the errors it divides share a unit."""
    seen = {}
    for name in ("dc_errors", "dc_cross_entropy", "soft_cross_entropy", "denoising_errors"):
        real = getattr(dc_score, name)

        def recording(*a, _real=real, _name=name, **k):
            bound = inspect.signature(_real).bind(*a, **k)
            bound.apply_defaults()
            caller = inspect.currentframe().f_back.f_code.co_name
            seen.setdefault(caller, set()).add(bound.arguments["reduction"])
            return _real(*a, **k)
        monkeypatch.setattr(dc_score, name, recording)
    for targets in cp.DSC_TARGETS:
        model, state = fresh(tiny_model_dir, "dsc-ewc-dc", dc_weight=0.5, dsc_targets=targets, dc_temp="auto")
        for folder in concepts:
            state = train.learn_folder(model, state, folder)
    calibration = seen.pop("subset_errors")  # calibrate_temp's errors
    assert {"dc_loss", "denoise_and_dc_loss", "teacher_ce", "teacher_outputs"} <= set(seen)
    assert len(calibration) == 1 and all(r == calibration for r in seen.values()), seen


def test_tau_does_not_depend_on_how_many_prompts_s_holds(tiny_model_dir, concepts, monkeypatch):
    """The calibration scores c_n against c₀ only, on every task, while S (dc_k 5) holds earlier concepts too from the
    second task on. (That the logits of c_n and c₀ then differ by about one nat: tests/test_cp.py.)"""
    calibrated, subsets, errors, subset = [], [], cp.subset_errors, cp.dc_subset
    monkeypatch.setattr(cp, "subset_errors", lambda model, x0, prompts, gen: calibrated.append(list(prompts)) or
                        errors(model, x0, prompts, gen))
    monkeypatch.setattr(cp, "dc_subset", lambda *a: (lambda s: subsets.append(s) or s)(subset(*a)))
    model, state = fresh(tiny_model_dir, "ewc-dc", dc_k=5, dc_temp="auto")
    for folder in concepts:
        calibrated[:] = []
        state = train.learn_folder(model, state, folder)
        assert calibrated == [[state.concepts[-1]["prompt"], "a photo"]]  # once a task, c_n against c₀
    assert len(subsets[-1]) == 3  # while the last task's S (the DC Fisher's) holds c_n, c₀ and the earlier concept


def test_column_targets_by_hand(tiny_model_dir):
    """`--dsc-targets column`: τ H over [c_n, c₀] against T1's posterior there, plus τ H over [c_j, c₀] against T2's;
    with c_j = c₀ (T2 the base model on the first task) T2 has nothing to teach."""
    model, hp = dsc_model(tiny_model_dir, dsc_w_h=0.7, dsc_w_n=1.3, dsc_targets="column")
    x0, tau = torch.randn(2, 4, 8, 8), 0.05
    got = cp.dsc_loss(model, x0, PROMPTS, 2, "teacher2", hp, torch.Generator().manual_seed(0), tau)
    first = cp.dsc_loss(model, x0, PROMPTS[:2], 1, None, hp, torch.Generator().manual_seed(0), tau)
    e = {}
    for name in ("current", "teacher1", "teacher2"):
        cp.enable_only(model.unet, name)
        with torch.no_grad():
            e[name] = cp.subset_errors(model, x0, PROMPTS, torch.Generator().manual_seed(0))
    h = lambda teacher, cols: -(torch.softmax(-e[teacher][:, cols] / tau, -1)
                                * torch.log_softmax(-e["current"][:, cols] / tau, -1)).sum(-1).mean()
    assert got["dsc_h"].item() == pytest.approx(0.7 * tau * (h("teacher1", [0, 1]) + h("teacher2", [2, 1])).item(),
                                                rel=1e-4)
    assert first["dsc_h"].item() == pytest.approx(0.7 * tau * h("teacher1", [0, 1]).item(), rel=1e-4)
