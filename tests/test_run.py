"""How a task runs (cp.Run, train.py's run flags): the default run is the plain one, micro-batches add up to the
batch, fp16's loss scaling, flips and captions, and the progress lines."""
import io
import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file

import cp
import cp_state
import dc_score
import lora
import train
import unet
from test_cp import randomize, write_concept

FAST = ["--steps", "3", "--batch-size", "4", "--fisher-samples", "2", "--dsc-steps", "2", "--no-preview"]


def saved_tensors(folder):
    """The trained tensors of a saved state: its LoRA, tokens, Fisher and anchor."""
    with open(os.path.join(folder, cp_state.MANIFEST)) as f:
        m = json.load(f)
    files = m["files"]
    return {f"{part}:{k}": v for part in ("lora", "tokens", "ewc")
            for k, v in load_file(os.path.join(folder, files[part])).items()}, m


def test_default_flags_train_as_the_explicit_plain_run(tiny_model_dir, tmp_path):
    """With no run flag, training is the plain fp32, one-batch run, and a checkpointed UNet changes no number."""
    concept = write_concept(str(tmp_path / "alpha"), 0, n=4)
    runs = {"default": [], "explicit": ["--precision", "fp32", "--grad-accum", "1"],
            "checkpointed": ["--gradient-checkpointing"], "accumulated": ["--grad-accum", "2"]}
    saved = {}
    for name, flags in runs.items():
        train.main(["--concept", concept, "--state", str(tmp_path / name), "--model", tiny_model_dir, *FAST, *flags])
        saved[name] = saved_tensors(str(tmp_path / name))
    default, m = saved["default"]
    for name in ("explicit", "checkpointed"):
        assert default.keys() == saved[name][0].keys()
        assert all(torch.equal(default[k], saved[name][0][k]) for k in default), name
    assert m["history"][0]["run"] == {"steps": 3, "batch_size": 4, "lr": 0.003, "token_lr": 0.05, "dsc_steps": 2,
                                      "device": "cpu", "precision": "fp32", "grad_accum": 1,
                                      "gradient_checkpointing": False, "flip": False, "captions": 0}
    assert saved["checkpointed"][1]["history"][0]["run"]["gradient_checkpointing"] is True
    assert saved["accumulated"][1]["history"][0]["run"]["grad_accum"] == 2


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradients it steps on."""
    seen = []

    def step(self, closure=None):
        RecordingAdamW.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def one_step_gradients(tiny_model_dir, monkeypatch, runs):
    """The gradient that cp.optimize steps on, and the losses it logs, for each Run: one step on a fixed batch of 4
    (each micro-batch its share of it) of L_denoise + an EWC penalty, which does not depend on the batch."""
    model = unet.load_model(tiny_model_dir)
    cp.install_adapter(model.unet, "current", None, cp.Hparams())
    randomize(model.unet, "current", 0)
    params = lora.set_trainable(model.unet, "current")
    start = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([9, 300, 600, 990])
    context = model.encode_text(["a photo of a red star"])
    live = cp.flat(lora.get_adapter(model.unet, "current"))
    fisher = {k: torch.rand(v.shape, generator=g) for k, v in live.items()}
    anchor = {k: torch.zeros_like(v) for k, v in live.items()}
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.seen.clear()
    logged = []
    for run in runs:
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        parts = iter(range(run.grad_accum))

        def loss():
            size = 4 // run.grad_accum
            first = next(parts) * size
            s = slice(first, first + size)
            e = dc_score.denoising_errors(model.unet, x0[s], context, t[s], eps[s], model.alphas_cumprod)
            return {"denoise": e.mean(), "ewc": cp.ewc_penalty(model.unet, "current", fisher, anchor, 0.5)}
        task = types.SimpleNamespace(run=run, name="x", index=0)
        with cp.autocast("cpu", run.precision):
            cp.optimize([{"params": params, "lr": 1e-3}], 1, loss, "train", task)
        logged.append(run.trace[-1])
    return RecordingAdamW.seen, logged


def test_micro_batches_add_up_to_the_batch(tiny_model_dir, monkeypatch):
    """N micro-batches of B/N images step on the gradient of the whole batch (the mean over the micro-batches; the
    penalty counted once), and log the whole batch's losses."""
    grads, logged = one_step_gradients(tiny_model_dir, monkeypatch, [cp.Run(grad_accum=n) for n in (1, 2, 4)])
    assert len(grads) == 3 and any(g.abs().sum() > 0 for g in grads[0])
    for n in (1, 2):
        for a, b in zip(grads[0], grads[n]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())
        assert logged[n]["denoise"] == pytest.approx(logged[0]["denoise"], rel=1e-5)
        assert logged[n]["ewc"] == pytest.approx(logged[0]["ewc"], rel=1e-6)


def test_fp16_steps_on_unscaled_gradients(tiny_model_dir, monkeypatch):
    """fp16 autocast with loss scaling: the optimizer sees the fp32 run's gradient, to fp16's precision."""
    grads, _ = one_step_gradients(tiny_model_dir, monkeypatch, [cp.Run(), cp.Run(precision="fp16")])
    assert len(grads) == 2
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-3 * a.abs().max().item())


def test_flip_mirrors_about_half_the_draws_on_a_generator_of_its_own():
    images = torch.randn(3, 3, 4, 6)
    exact = types.SimpleNamespace(vae=types.SimpleNamespace(encode=lambda x: (x, torch.zeros_like(x))),
                                  device="cpu", dtype=torch.float32, scaling_factor=1.0)  # latents = the images
    plain_gen, flip_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = cp.Batches(exact, images, 4, plain_gen)
    flipped = cp.Batches(exact, images, 4, flip_gen, flip=torch.Generator().manual_seed(6))
    mirrored = 0
    for _ in range(16):
        a, b = plain(), flipped()
        assert torch.equal(plain.drawn, flipped.drawn)  # the same images drawn
        for i, j in enumerate(flipped.drawn):
            assert torch.equal(a[i], images[j])
            assert torch.equal(b[i], images[j]) or torch.equal(b[i], images[j].flip(-1))
            mirrored += torch.equal(b[i], images[j].flip(-1))
    assert 16 <= mirrored <= 48  # of 64 draws
    assert torch.equal(plain_gen.get_state(), flip_gen.get_state())  # the task's stream is untouched
    flips = flipped.flip.get_state()
    flipped(8, torch.Generator().manual_seed(7))  # a draw of its own (τ's calibration): flips from its generator too
    assert torch.equal(flipped.flip.get_state(), flips) and torch.equal(plain_gen.get_state(), flip_gen.get_state())


def test_captions_beside_images(tmp_path):
    folder = write_concept(str(tmp_path / "dog"), 0, n=3)
    (tmp_path / "dog" / "0.txt").write_text("a photo of {token} on\n the grass\n")
    (tmp_path / "dog" / "notes.txt").write_text("not a caption")
    assert train.load_captions(folder, "<dog>") == ["a photo of <dog> on the grass", None, None]
    assert train.load_images(folder, 16)[1] == ["skipped non-image file notes.txt"]  # a caption is no note
    (tmp_path / "dog" / "0.txt").unlink()
    assert train.load_captions(folder, "<dog>") is None
    (tmp_path / "dog" / "2.txt").write_text("a photo of my dog")
    with pytest.raises(cp.CPError, match=r"2\.txt has no \{token\}"):
        train.load_captions(folder, "<dog>")


@pytest.mark.parametrize("method,dc_weight", [("seq", 0.0), ("ewc-dc", 0.5)])
def test_captions_drive_l_denoise_and_the_target_l_dc(tiny_model_dir, method, dc_weight):
    """Against every image scored under every prompt: L_denoise on each image's caption, L_DC on S (target first)."""
    model = unet.load_model(tiny_model_dir)
    hp = cp.Hparams(method=method, dc_batch=2, dc_weight=dc_weight, dc_temp=0.05)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts, captions = ["a photo of a red star", "a photo", "a blue star"], ["a red star", "a star", "a blue photo"]
    if dc_weight:
        terms = cp.denoise_and_dc_loss(model, x0, prompts, hp, torch.Generator().manual_seed(1), captions)
    else:
        terms = {"denoise": cp.denoise_loss(model, x0, captions, torch.Generator().manual_seed(1))}
    t, eps = cp.draw_noise(model, x0, torch.Generator().manual_seed(1))
    e = dc_score.denoising_errors(model.unet, x0, model.encode_text(prompts + captions), t, eps, model.alphas_cumprod)
    captioned, target = e[[0, 1, 2], [3, 4, 5]].mean().item(), e[:, 0].mean().item()
    assert terms["denoise"].item() == pytest.approx(captioned, rel=1e-5)
    assert abs(captioned - target) > 1e-4 * target  # the check above tells the captions from the target
    if dc_weight:
        ce = -torch.log_softmax(-e[:2, :3] / 0.05, -1)[:, 0].mean()
        assert terms["dc"].item() == pytest.approx(0.5 * 0.05 * ce.item(), rel=1e-4)  # δ τ L_DC
    else:
        assert "dc" not in terms


def test_progress_prints_plain_lines_off_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for stream in (io.StringIO(), Terminal()):
        progress = train.Progress(600, "[x] train", stream)
        for step in range(5, 601, 5):  # cp.optimize reports every fifth step
            progress(step, {"denoise": 0.5})
        text = stream.getvalue()
        if isinstance(stream, Terminal):
            assert text.count("\r") == 120 and text.count("\n") == 1
        else:
            assert "\r" not in text
            assert [line.split()[2] for line in text.splitlines()] == [f"{s}/600" for s in range(5, 600, 60)] + \
                ["600/600"]


def test_a_first_run_that_fails_leaves_no_folder_it_created(tiny_model_dir, tmp_path, monkeypatch):
    """A new --state, and the folders above it that the run made, are gone when the run ends before its first save:
    a bad --model, a concept folder without images, a save that fails (it leaves an empty pool/). A folder that was
    there before stays."""
    concept, empty = write_concept(str(tmp_path / "alpha"), 0, n=2), tmp_path / "empty"
    empty.mkdir()
    new = str(tmp_path / "runs" / "deeper" / "state")

    def fails(argv, fragment):
        with pytest.raises(SystemExit) as e:
            train.main([*argv, *FAST])
        assert str(e.value.code).startswith("error: ") and fragment in str(e.value.code), e.value.code

    fails(["--concept", concept, "--state", new, "--model", str(empty)], "not a diffusers model folder")
    fails(["--concept", str(empty), "--state", new, "--model", tiny_model_dir], "has no images")
    assert sorted(os.listdir(tmp_path)) == ["alpha", "empty"]

    def full_disk(path, write):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cp_state, "_write_file", full_disk)
    fails(["--concept", concept, "--state", new, "--model", tiny_model_dir, "--method", "seq"], "No space left")
    assert sorted(os.listdir(tmp_path)) == ["alpha", "empty"]
    kept = tmp_path / "kept"
    kept.mkdir()
    fails(["--concept", str(empty), "--state", str(kept), "--model", tiny_model_dir], "has no images")
    assert os.path.isdir(kept)
