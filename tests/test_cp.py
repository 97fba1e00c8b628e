"""Continual personalization: every method end to end on a tiny model, the penalties by hand, the state on disk."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cp
import cp_state
import train
import dc_score
import lora
import unet

FAST = dict(steps=3, batch_size=2, fisher_samples=2, dsc_steps=2)


def write_concept(folder, seed, n=3, size=(20, 24)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    return [write_concept(str(root / name), i) for i, name in enumerate(["alpha", "beta"])]


def fresh(tiny_model_dir, method, **kw):
    model = unet.load_model(tiny_model_dir)
    return model, cp.new_state(model, cp.Hparams(method=method, **{**FAST, **kw}))


def state_tensors(state):
    out = {f"tokens.{k}": v for k, v in state.tokens.items()}
    out.update({f"fisher.{k}": v for k, v in state.fisher.items()})
    out.update({f"anchor.{k}": v for k, v in state.anchor.items()})
    for i, w in enumerate(state.pool + ([state.lora] if state.lora else [])):
        out.update({f"lora{i}.{k}": v for k, v in cp.flat(w).items()})
    return out


@pytest.mark.parametrize("method", cp.METHODS)
def test_two_tasks_and_round_trip(tiny_model_dir, concepts, tmp_path, method):
    model, state = fresh(tiny_model_dir, method)
    for folder in concepts:
        state = train.learn_folder(model, state, folder)
        cp_state.save_state(state, str(tmp_path))
        loaded = cp_state.load_state(str(tmp_path))
        a, b = state_tensors(state), state_tensors(loaded)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert loaded.concepts == state.concepts
    assert [c["token"] for c in state.concepts] == ["<alpha>", "<beta>"]
    assert len(state.pool) == (0 if method == "ti" else 2) and (state.lora is None) == (method in ("ti", "clora"))
    assert bool(state.fisher) == ("ewc" in method)
    assert all((h["lora_norm"] == 0) == (method == "ti") for h in state.history)  # bench/continual.py reads it
    # a fresh model with the loaded state gives the same UNet output as the trained one
    again = unet.load_model(tiny_model_dir)
    cp.apply_state(again, cp_state.load_state(str(tmp_path)))
    x, ctx = torch.randn(1, 4, 8, 8), model.encode_text(["a photo of a <alpha>"])
    with torch.no_grad():
        assert torch.allclose(model.unet(x, 10, ctx), again.unet(x, 10, again.encode_text(["a photo of a <alpha>"])),
                              atol=1e-5)


def randomize(unet, name, seed, scale=0.1):
    """Give adapter `name` non-zero weights of its own (a fresh LoRA has B = 0: every adapter would be the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for A, B in lora.get_adapter(unet, name).values():
            A.copy_(torch.randn(A.shape, generator=g) * scale)
            B.copy_(torch.randn(B.shape, generator=g) * scale)


def alpha_task(model, images, state, seed=0):
    """Task n = len(state.concepts) of concept alpha on `images`, its draws seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return cp.Task(len(state.concepts), "alpha", "<alpha>", "a photo of a red star", None, "a photo", "current",
                   cp.Batches(model, images, 2, gen), gen, cp.random.Random(seed), ({}, {}))


def test_ewc_penalty_by_hand(tiny_model_dir):
    model = unet.load_model(tiny_model_dir)
    cp.install_adapter(model.unet, "current", None, cp.Hparams())
    randomize(model.unet, "current", 0)
    live = cp.flat(lora.get_adapter(model.unet, "current"))
    g = torch.Generator().manual_seed(1)
    fisher = {k: torch.rand(v.shape, generator=g) for k, v in live.items()}
    anchor = {k: v.detach() + torch.randn(v.shape, generator=g) for k, v in live.items()}
    by_hand = sum(float((fisher[k] * (live[k].detach() - anchor[k]) ** 2).sum()) for k in live)
    assert cp.ewc_penalty(model.unet, "current", fisher, anchor, 0.3).item() == pytest.approx(0.3 / 2 * by_hand,
                                                                                               rel=1e-5)
    assert cp.ewc_penalty(model.unet, "current", fisher, {k: v.detach() for k, v in live.items()}, 0.3).item() == 0
    assert cp.ewc_penalty(model.unet, "current", {}, {}, 0.3).item() == 0  # before the first Fisher


def test_fisher_nonnegative_mean_one_and_shaped_like_lora(tiny_model_dir, concepts):
    for method in ("ewc", "ewc-dc"):
        model, state = fresh(tiny_model_dir, method)
        state = train.learn_folder(model, state, concepts[0])
        live = cp.flat(lora.get_adapter(model.unet, "current"))
        assert state.fisher.keys() == live.keys()
        assert all(state.fisher[k].shape == live[k].shape and (state.fisher[k] >= 0).all() for k in live)
        total = sum(f.sum() for f in state.fisher.values()) / sum(f.numel() for f in state.fisher.values())
        assert total.item() == pytest.approx(1.0, rel=1e-5)  # the first task: F* = F̂, rescaled to mean 1
        assert all(torch.equal(state.anchor[k], live[k].detach()) for k in live)


def test_online_fisher_update(tiny_model_dir, concepts, monkeypatch):
    """F* ← γ F* + F̂ at the end of every task, the anchor the adapter after it."""
    made = []

    def fixed_fisher(params, sample_loss, n):
        made.append([torch.full_like(p, float(len(made) + 1)) * torch.rand_like(p) for p in params])
        return made[-1]
    monkeypatch.setattr(cp, "fisher_diagonal", fixed_fisher)
    model, state = fresh(tiny_model_dir, "ewc", ewc_gamma=0.7)
    first = train.learn_folder(model, state, concepts[0])
    second = train.learn_folder(model, first, concepts[1])
    keys = list(cp.flat(lora.get_adapter(model.unet, "current")))
    mean = lambda ts: sum(t.sum() for t in ts) / sum(t.numel() for t in ts)
    grown = [0.7 * made[0][i] / mean(made[0]) + made[1][i] for i in range(len(keys))]  # F* stored at mean 1
    for i, k in enumerate(keys):
        torch.testing.assert_close(first.fisher[k], made[0][i] / mean(made[0]))
        torch.testing.assert_close(second.fisher[k], grown[i] / mean(grown))
        torch.testing.assert_close(second.anchor[k], cp.flat(second.lora)[k])
    assert not torch.equal(first.anchor[keys[-1]], second.anchor[keys[-1]])


def test_dc_fisher_is_the_mean_squared_gradient_of_the_dc_cross_entropy(tiny_model_dir, concepts):
    """`ewc-dc`'s F̂, against a hand computation that scores each prompt with its own UNet call: the mean over single
    images of (∇_φ −τ log p_φ(c_n | x))² over S, 2 × fisher_samples of them at stratified timesteps, rescaled to mean
    1."""
    model = unet.load_model(tiny_model_dir)
    hp = cp.Hparams(method="ewc-dc", fisher_samples=3, dc_k=3, dc_temp=0.05)
    cp.install_adapter(model.unet, "current", None, hp)
    randomize(model.unet, "current", 2)
    params = lora.set_trainable(model.unet, "current")
    state = cp.State(model={}, hparams=hp, concepts=[{"prompt": "a photo of a blue star"},
                                                     {"prompt": "a red star"}])
    images, _ = train.load_images(concepts[0], model.resolution)
    fisher, anchor = cp.update_fisher(model, state, alpha_task(model, images, state, 5),
                                     lora.snapshot(model.unet, "current"))

    t_ = alpha_task(model, images, state, 5)  # the same draws, consumed in the same order
    squares = [torch.zeros_like(p) for p in params]
    ts = cp.stratified_timesteps(6, len(model.alphas_cumprod), t_.gen)
    assert sorted(ts * 6 // len(model.alphas_cumprod)) == list(range(6))  # one timestep from each sixth of the schedule
    for i in range(6):
        x0 = t_.batches(1)
        prompts = cp.dc_subset(state, t_.target, t_.c0, hp, t_.rng)
        assert prompts[:2] == ["a photo of a red star", "a photo"] and len(prompts) == 3
        t, eps = cp.draw_noise(model, x0, t_.gen, ts[i:i + 1])
        x_t = unet.add_noise(x0, eps, t, model.alphas_cumprod)
        e = torch.stack([((model.unet(x_t, t, model.encode_text([p])) - eps) ** 2).mean() for p in prompts])
        ce = -hp.dc_temp * torch.log_softmax(-e / hp.dc_temp, 0)[0]
        for s, g in zip(squares, torch.autograd.grad(ce, params)):
            s += g ** 2
    mean = sum(s.sum() for s in squares) / sum(s.numel() for s in squares)
    for k, s in zip(cp.flat(lora.get_adapter(model.unet, "current")), squares):
        torch.testing.assert_close(fisher[k], s / mean, rtol=1e-3, atol=1e-4)  # F̂ has mean 1


@pytest.mark.parametrize("dc_batch", [0, 2, 3])
def test_denoise_and_dc_losses_match_a_full_batch_of_errors(tiny_model_dir, dc_batch):
    """L_denoise, the mean squared error of the target's noise prediction (dc_batch 0), and the ragged UNet batch of
    δ·L_DC (dc_batch images × K prompts, the rest × the target) give what scoring every image under every prompt
    and keeping the rows each term uses gives."""
    model = unet.load_model(tiny_model_dir)
    hp = cp.Hparams(method="ewc-dc", dc_batch=dc_batch, dc_weight=0.5, dc_temp=0.05)
    x0, prompts = torch.randn(3, 4, 8, 8), ["a photo of a red star", "a photo", "a blue star"]
    if dc_batch:
        terms = cp.denoise_and_dc_loss(model, x0, prompts, hp, torch.Generator().manual_seed(1))
    else:
        terms = {"denoise": cp.denoise_loss(model, x0, prompts[:1], torch.Generator().manual_seed(1))}
    t, eps = cp.draw_noise(model, x0, torch.Generator().manual_seed(1))
    e = dc_score.denoising_errors(model.unet, x0, model.encode_text(prompts), t, eps, model.alphas_cumprod)
    assert terms["denoise"].item() == pytest.approx(e[:, 0].mean().item(), rel=1e-5)
    if dc_batch:
        ce = -torch.log_softmax(-e[:dc_batch] / 0.05, -1)[:, 0].mean()
        assert terms["dc"].item() == pytest.approx(0.5 * 0.05 * ce.item(), rel=1e-4)  # δ τ L_DC


def test_dc_weight_without_dc_batch_is_refused():
    with pytest.raises(cp.CPError, match="--dc-batch"):
        cp.check_hparams(cp.Hparams(method="ewc-dc", dc_weight=0.5, dc_batch=0))
    cp.check_hparams(cp.Hparams(method="ewc-dc", dc_weight=0.0, dc_batch=0))


def test_dc_subset():
    hp = cp.Hparams(dc_k=4)
    state = cp.State(model={}, hparams=hp, concepts=[{"prompt": f"p{i}"} for i in range(5)])
    rng = cp.random.Random(0)
    seen = set()
    for _ in range(50):
        s = cp.dc_subset(state, "target", "c0", hp, rng)
        assert s[:2] == ["target", "c0"] and len(s) == 4 and len(set(s[2:])) == 2
        assert set(s[2:]) <= {"p0", "p1", "p2", "p3", "p4"}
        seen.update(s[2:])
    assert len(seen) == 5  # every earlier concept gets drawn
    assert cp.dc_subset(cp.State(model={}, hparams=hp), "target", "c0", hp, rng) == ["target", "c0"]
    two = cp.State(model={}, hparams=hp, concepts=[{"prompt": "p0"}])
    assert cp.dc_subset(two, "target", "c0", hp, rng) == ["target", "c0", "p0"]
    assert cp.dc_subset(state, "target", "c0", cp.Hparams(dc_k=2), rng) == ["target", "c0"]


def test_clora_penalty_by_hand():
    layer = lora.LoRALinear(torch.nn.Linear(3, 2, bias=False))
    layer.add("task0", 1, 2.0)
    layer.add("task1", 1, 1.0)
    with torch.no_grad():
        layer.lora_A["task0"].copy_(torch.tensor([[1.0, 0.0, 2.0]]))
        layer.lora_B["task0"].copy_(torch.tensor([[1.0], [3.0]]))
        layer.lora_A["task1"].copy_(torch.tensor([[0.5, 1.0, 1.0]]))
        layer.lora_B["task1"].copy_(torch.tensor([[2.0], [0.0]]))
    net = torch.nn.Sequential(layer)
    # old = 2·B0A0 = [[2,0,4],[6,0,12]]; new = 1·B1A1 = [[1,2,2],[0,0,0]]; old⊙new = [[2,0,8],[0,0,0]] → 4+64 = 68
    assert cp.clora_penalty(net, "task1", 0.5).item() == pytest.approx(0.5 * 68.0)


def test_dsc_loss_by_hand_with_three_different_adapters(tiny_model_dir):
    """Student "current", teachers "teacher1" and "teacher2", all different: each term against predictions made by
    hand, one UNet call per (adapter, prompt). T1 is distilled on c_n (column 0), T2 on c_j (column 2)."""
    model = unet.load_model(tiny_model_dir)
    hp = cp.Hparams(method="dsc", dsc_w_h=0.7, dsc_w_n=1.3, dc_temp=0.05)
    for i, name in enumerate(("current", "teacher1", "teacher2")):
        cp.install_adapter(model.unet, name, None, hp)
        randomize(model.unet, name, 10 + i)
    x0, prompts = torch.randn(2, 4, 8, 8), ["a photo of a red star", "a photo", "a blue star"]
    got = cp.dsc_loss(model, x0, prompts, hp, torch.Generator().manual_seed(0))
    t, eps = cp.draw_noise(model, x0, torch.Generator().manual_seed(0))
    x_t = unet.add_noise(x0, eps, t, model.alphas_cumprod)
    out = {}
    with torch.no_grad():
        for name in ("current", "teacher1", "teacher2"):
            lora.enable_only(model.unet, name)
            pred = torch.stack([model.unet(x_t, t, model.encode_text([p]).expand(2, -1, -1)) for p in prompts], 1)
            out[name] = pred, ((pred - eps[:, None]) ** 2).mean((2, 3, 4))
    log_s = torch.log_softmax(-out["current"][1] / hp.dc_temp, -1)
    h = sum(-(torch.softmax(-out[n][1] / hp.dc_temp, -1) * log_s).sum(-1) for n in ("teacher1", "teacher2"))
    n_term = (out["current"][0][:, 0] - out["teacher1"][0][:, 0]).square().mean() + \
        (out["current"][0][:, 2] - out["teacher2"][0][:, 2]).square().mean()
    assert got["dsc_h"].item() == pytest.approx(0.7 * 0.05 * h.mean().item(), rel=1e-4)  # w_h τ H
    assert got["dsc_n"].item() == pytest.approx(1.3 * n_term.item(), rel=1e-4)


def test_dsc_teacher2_is_the_pool_entry_of_the_earlier_concept_it_distils(tiny_model_dir, concepts, tmp_path,
                                                                           monkeypatch):
    """T2 = the LoRA saved after task j, distilled on c_j's prompt; the first task, with no earlier concept, is not
    consolidated and keeps its adapter as training left it."""
    folders = concepts + [write_concept(str(tmp_path / "gamma"), 7)]
    seen, trained = [], []
    real, real_train = cp.dsc_loss, cp.train_task

    def recording(model, x0, prompts, hp, gen):
        seen.append((list(prompts), lora.snapshot(model.unet, "teacher2")))
        return real(model, x0, prompts, hp, gen)

    def train_task(model, *a):  # the adapter as training leaves it
        out = real_train(model, *a)
        trained.append(cp.flat(lora.snapshot(model.unet, "current")))
        return out
    monkeypatch.setattr(cp, "dsc_loss", recording)
    monkeypatch.setattr(cp, "train_task", train_task)
    model, state = fresh(tiny_model_dir, "dsc", dsc_steps=4)
    for i, folder in enumerate(folders):
        before, seen[:] = state, []
        state = train.learn_folder(model, state, folder)
        assert len(seen) == (0 if i == 0 else 4)
        if i == 0:
            kept = cp.flat(state.pool[0])
            assert all(torch.equal(kept[k], trained[0][k]) for k in kept)
        for prompts, weights in seen:
            assert prompts[:2] == [state.concepts[-1]["prompt"], "a photo"] and len(prompts) == 3
            j = [c["prompt"] for c in before.concepts].index(prompts[2])
            pool = before.pool[j]
            assert all(torch.equal(weights[p][0], pool[p][0]) and torch.equal(weights[p][1], pool[p][1])
                       for p in pool)
        if i == 2:  # over the steps, both earlier concepts were drawn, and their LoRAs differ
            assert len({p[2] for p, _ in seen}) == 2
            assert not torch.equal(*[cp.flat(w)[next(iter(cp.flat(w)))] for w in before.pool])


def test_ti_changes_only_the_token_row(tiny_model_dir, concepts):
    model, state = fresh(tiny_model_dir, "ti")
    before_unet = {k: v.clone() for k, v in model.unet.state_dict().items()}
    before_emb = model.text_encoder.get_input_embeddings().weight.detach().clone()
    state = train.learn_folder(model, state, concepts[0])
    after_emb = model.text_encoder.get_input_embeddings().weight.detach()
    assert all(torch.equal(before_unet[k], v) for k, v in model.unet.state_dict().items())
    token_id = model.tokenizer.convert_tokens_to_ids("<alpha>")
    assert torch.equal(after_emb[:before_emb.shape[0]], before_emb)
    assert not torch.allclose(after_emb[token_id], before_emb.mean(0))


def test_token_row_trains_like_the_masked_matrix(tiny_model_dir):
    """The spliced-in row gives, step by step, the losses, gradients and rows of the whole embedding matrix trained
    by AdamW under a gradient mask that keeps only the token's row (built here by hand)."""
    hp = cp.Hparams(method="seq")
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a <alpha> next to a <alpha>"]  # twice: the row's gradient sums over both places
    new, ref = unet.load_model(tiny_model_dir), unet.load_model(tiny_model_dir)
    token_id = unet.add_tokens(new, {"<alpha>": None})["<alpha>"]
    assert unet.add_tokens(ref, {"<alpha>": None})["<alpha>"] == token_id
    row, hook = unet.trainable_row(new, token_id)
    emb = ref.text_encoder.get_input_embeddings().weight.requires_grad_(True)
    mask = torch.zeros(emb.shape[0], 1)
    mask[token_id] = 1
    emb.register_hook(lambda g: g * mask)
    before = emb.detach().clone()
    optimizers = {id(new): torch.optim.AdamW([row], lr=hp.token_lr, weight_decay=0.0),
                  id(ref): torch.optim.AdamW([emb], lr=hp.token_lr, weight_decay=0.0)}
    for step in range(3):
        losses = []
        for model in (new, ref):
            loss = cp.denoise_loss(model, x0, prompts, torch.Generator().manual_seed(step))
            optimizers[id(model)].zero_grad()
            loss.backward()
            optimizers[id(model)].step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        torch.testing.assert_close(row.grad, emb.grad[token_id])
        torch.testing.assert_close(row.detach(), emb.detach()[token_id])
    assert not torch.allclose(row.detach(), before[token_id])  # the row did train
    others = torch.arange(emb.shape[0]) != token_id
    assert torch.equal(emb.detach()[others], before[others])
    new_emb = new.text_encoder.get_input_embeddings().weight  # the matrix itself takes no gradient and stays as is
    assert not new_emb.requires_grad and new_emb.grad is None and torch.equal(new_emb, before)
    hook.remove()


def test_optimizer_holds_the_token_row_not_the_matrix(tiny_model_dir, concepts, monkeypatch):
    held = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, groups, **kw):
            super().__init__(groups, **kw)
            held.append([tuple(p.shape) for g in self.param_groups for p in g["params"]])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    model, state = fresh(tiny_model_dir, "ti")
    state = train.learn_folder(model, state, concepts[0])
    emb = model.text_encoder.get_input_embeddings()
    assert held == [[(emb.weight.shape[1],)]]
    # the trained row is written back into the matrix, and the lookup is plain again
    token_id = model.tokenizer.convert_tokens_to_ids("<alpha>")
    assert torch.equal(emb.weight[token_id], state.tokens["<alpha>"])
    assert not emb._forward_hooks and not emb.weight.requires_grad


def test_a_failed_task_leaves_no_row_spliced_in(tiny_model_dir, concepts):
    model = unet.load_model(tiny_model_dir)
    state = cp.new_state(model, cp.Hparams(**dict(FAST, method="seq", lr=1e30, token_lr=1e30)))
    with pytest.raises(cp.CPError, match="non-finite"):
        train.learn_folder(model, state, concepts[0])
    assert not model.text_encoder.get_input_embeddings()._forward_hooks


def test_state_holds_no_image_or_latent(tiny_model_dir, concepts, tmp_path):
    model, state = fresh(tiny_model_dir, "dsc-ewc-dc")
    for folder in concepts:
        state = train.learn_folder(model, state, folder)
    cp_state.save_state(state, str(tmp_path))
    for root, _, files in os.walk(tmp_path):
        for f in files:
            assert f.endswith((".json", ".safetensors")), f
            if f.endswith(".safetensors"):
                for k, v in load_file(os.path.join(root, f)).items():
                    assert v.dim() <= 2, f"{f}:{k} has shape {tuple(v.shape)}"  # images/latents are 3-4-D


def test_interrupted_save_leaves_previous_state(tiny_model_dir, concepts, tmp_path, monkeypatch):
    model, state = fresh(tiny_model_dir, "ewc")
    state = train.learn_folder(model, state, concepts[0])
    cp_state.save_state(state, str(tmp_path))
    snapshot = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(tmp_path) for f in fs}
    state2 = train.learn_folder(model, state, concepts[1])

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(lora, "write_lora_file", crash)
    with pytest.raises(cp.CPError, match="disk full"):
        cp_state.save_state(state2, str(tmp_path))
    loaded = cp_state.load_state(str(tmp_path))
    assert [c["name"] for c in loaded.concepts] == ["alpha"]
    manifest = open(os.path.join(tmp_path, cp_state.MANIFEST), "rb").read()
    assert manifest == snapshot[cp_state.MANIFEST]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_any_image_mode_and_size(tmp_path, mode):
    rng = np.random.default_rng(0)
    im = Image.fromarray((rng.random((37, 23, 3)) * 255).astype(np.uint8))
    im = im.convert(mode) if mode != "I;16" else im.convert("L").convert("I;16")
    im.save(tmp_path / ("a.tif" if mode in ("CMYK", "I;16") else "a.png"))
    x, notes = train.load_images(str(tmp_path), 16)
    assert x.shape == (1, 3, 16, 16) and -1 <= x.min() and x.max() <= 1 and notes == []


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_denoising_fisher_by_hand(tiny_model_dir, concepts, precision):
    """`ewc`'s F̂: the mean over single images of (∇_φ ‖ε − ε_φ(x_t, t, c_n)‖²/D)², rescaled to mean 1; in fp32
    whatever precision the task trains in (unscaled fp16 gradients underflow)."""
    model = unet.load_model(tiny_model_dir)
    hp = cp.Hparams(method="ewc", fisher_samples=3)
    cp.install_adapter(model.unet, "current", None, hp)
    randomize(model.unet, "current", 4)
    params = lora.set_trainable(model.unet, "current")
    state = cp.State(model={}, hparams=hp)
    images, _ = train.load_images(concepts[0], model.resolution)
    with cp.autocast("cpu", precision):  # the latents are encoded under it, as in training
        task, t_ = alpha_task(model, images, state, 3), alpha_task(model, images, state, 3)
        fisher, _ = cp.update_fisher(model, state, task, lora.snapshot(model.unet, "current"))
    squares = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        x0 = t_.batches(1)
        t, eps = cp.draw_noise(model, x0, t_.gen)
        pred = model.unet(unet.add_noise(x0, eps, t, model.alphas_cumprod), t, model.encode_text([t_.target]))
        for s, g in zip(squares, torch.autograd.grad(((pred - eps) ** 2).mean(), params)):
            s += g ** 2
    mean = sum(s.sum() for s in squares) / sum(s.numel() for s in squares)
    for k, s in zip(cp.flat(lora.get_adapter(model.unet, "current")), squares):
        torch.testing.assert_close(fisher[k], s / mean, rtol=1e-3, atol=1e-4)


def test_a_diverged_adapters_fisher_is_refused():
    """A non-finite gradient would make F* NaN in silence (and the next task fail with another message)."""
    w = torch.ones(3, requires_grad=True)
    assert cp.fisher_diagonal([w], lambda: (w * 2).sum(), 2)[0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(cp.CPError, match="not finite"):
        cp.fisher_diagonal([w], lambda: (w * float("nan")).sum(), 2)


def test_stored_fisher_keeps_the_decay_over_many_tasks(monkeypatch):
    """Four updates with given F̂ (each of mean 1): the stored F* is Σ_m γ^(n−m) F̂_m rescaled to mean 1 after every
    update, so task m's F̂ weighs γ^(n−m) against the newest (rescaling the sum of the rescaled F* and a new F̂
    would weigh the past by γ/(1 + γ + ...) from the third task on)."""
    gamma, gen = 0.9, torch.Generator().manual_seed(0)
    final = {"layer": (torch.zeros(2, 3), torch.zeros(4, 2))}
    f_hats = [cp.mean_one([torch.rand(2, 3, generator=gen), torch.rand(4, 2, generator=gen)]) for _ in range(4)]
    mean = lambda f: (sum(v.sum() for v in f.values()) / sum(v.numel() for v in f.values())).item()
    state = cp.State(model={}, hparams=cp.Hparams(method="ewc", ewc_gamma=gamma))
    for n, f_hat in enumerate(f_hats):
        monkeypatch.setattr(cp, "fisher_estimate", lambda *a, f_hat=f_hat: f_hat)
        state.fisher, _ = cp.update_fisher(None, state, None, final)
        state.concepts = state.concepts + [{}]
        by_hand = {k: sum(gamma ** (n - m) * f[i] for m, f in enumerate(f_hats[:n + 1]))
                   for i, k in enumerate(cp.flat(final))}
        assert mean(state.fisher) == pytest.approx(1.0, rel=1e-5)
        for k in by_hand:
            torch.testing.assert_close(state.fisher[k], by_hand[k] / mean(by_hand), rtol=1e-5, atol=1e-6)


def test_ewc_penalty_uses_the_states_fisher_anchor_and_lambda_when_training_and_consolidating(
        tiny_model_dir, concepts, tmp_path, monkeypatch):
    """Every EWC term of task n, in training and in DSC's consolidation, is taken with the (F*, φ*) the state
    carries into task n (not an earlier task's, not swapped) and the state's λ, on the adapter being trained."""
    folders = concepts + [write_concept(str(tmp_path / "gamma"), 9)]
    calls, real = [], cp.ewc_penalty

    def recording(unet_, name, fisher, anchor, lam):
        calls.append((name, fisher, anchor, lam))
        return real(unet_, name, fisher, anchor, lam)
    monkeypatch.setattr(cp, "ewc_penalty", recording)
    model, state = fresh(tiny_model_dir, "dsc-ewc", ewc_lambda=0.37, steps=2, dsc_steps=2)
    for i, folder in enumerate(folders):
        calls[:] = []
        before = state
        state = train.learn_folder(model, state, folder)
        assert len(calls) == (2 if i == 0 else 4)  # 2 training steps + 2 consolidation steps (none on task 1)
        for name, fisher, anchor, lam in calls:
            assert name == "current" and lam == 0.37
            assert fisher.keys() == before.fisher.keys() and anchor.keys() == before.anchor.keys()
            assert all(torch.equal(fisher[k].cpu(), before.fisher[k]) for k in fisher)
            assert all(torch.equal(anchor[k].cpu(), before.anchor[k]) for k in anchor)
        if i == 2:  # the state's statistics after task 2, which differ from those after task 1
            assert not torch.equal(before.anchor[next(iter(before.anchor))],
                                   first_anchor[next(iter(first_anchor))])
        if i == 0:
            first_anchor = state.anchor


def test_teacher1_stays_frozen_while_the_student_trains(tiny_model_dir, concepts, monkeypatch):
    """DSC's T1 is the adapter as training left it, unchanged through the consolidation; only the student moves."""
    seen, real = [], cp.dsc_loss

    def recording(model, *args):
        seen.append((lora.snapshot(model.unet, "teacher1"), lora.snapshot(model.unet, "current"),
                     [p.requires_grad for p in lora.lora_parameters(model.unet, ["teacher1"])]))
        return real(model, *args)
    monkeypatch.setattr(cp, "dsc_loss", recording)
    model, state = fresh(tiny_model_dir, "dsc", dsc_steps=4, lr=0.05)
    state = train.learn_folder(model, state, concepts[0])
    seen[:] = []  # the second task is the first consolidated
    train.learn_folder(model, state, concepts[1])
    flat = [(cp.flat(t), cp.flat(s), grads) for t, s, grads in seen]
    trained = flat[0][1]  # the student starts from T1
    assert all(torch.equal(trained[k], flat[0][0][k]) for k in trained)
    for teacher, student, grads in flat:
        assert not any(grads)
        assert all(torch.equal(teacher[k], trained[k]) for k in trained)
    assert any(not torch.equal(flat[-1][1][k], trained[k]) for k in trained)  # the student did move


def test_ewc_l2_is_the_plain_l2_pull_to_the_anchor(tiny_model_dir, concepts):
    """`ewc-l2`, the control any Fisher must beat: F* is uniform, so the penalty is (λ/2)‖φ − φ*‖²."""
    model, state = fresh(tiny_model_dir, "ewc-l2", ewc_lambda=0.4)
    state = train.learn_folder(model, state, concepts[0])
    assert state.fisher and all(torch.equal(f, torch.ones_like(f)) for f in state.fisher.values())
    randomize(model.unet, "current", 3)
    live = cp.flat(lora.get_adapter(model.unet, "current"))
    by_hand = sum(float((live[k].detach() - state.anchor[k]).square().sum()) for k in live)
    got = cp.ewc_penalty(model.unet, "current", state.fisher, state.anchor, 0.4).item()
    assert got == pytest.approx(0.2 * by_hand, rel=1e-5) and by_hand > 0


def test_merge_trains_each_lora_alone_and_carries_their_magnitude_merge(tiny_model_dir, concepts, monkeypatch):
    """`merge`: each task trains a fresh LoRA on the base model alone (the carried one switched off); after it, the
    carried LoRA is the magnitude merge of the carried one and the task's, which the model then holds alone."""
    on, real = [], cp.denoise_loss

    def recording(model, *a):
        layer = next(m for _, m in model.unet.named_modules() if isinstance(m, lora.LoRALinear))
        on.append(set(layer.names()) - layer.disabled)
        return real(model, *a)
    monkeypatch.setattr(cp, "denoise_loss", recording)
    model, state = fresh(tiny_model_dir, "merge")
    first = train.learn_folder(model, state, concepts[0])
    second = train.learn_folder(model, first, concepts[1])
    assert on == [{"task0"}] * 3 + [{"task1"}] * 3 and lora.adapter_names(model.unet) == ["current"]
    scale = first.hparams.alpha / first.hparams.rank
    for carried, want in ((first.lora, lora.magnitude_merge(None, first.pool[0], scale, 8)),
                          (second.lora, lora.magnitude_merge(first.lora, second.pool[1], scale, 8))):
        assert all(torch.equal(carried[p][i], want[p][i]) for p in want for i in (0, 1))
    live = lora.snapshot(model.unet, "current")
    assert all(torch.equal(live[p][i], second.lora[p][i]) for p in live for i in (0, 1))
    assert not torch.equal(*[cp.flat(w)[next(iter(cp.flat(w)))] for w in (first.lora, second.lora)])
