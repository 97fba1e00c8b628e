"""The toy world, its oracle and the shipped tiny model (toy/)."""
import os

import numpy as np
import pytest
import torch

from toy import oracle, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "toy", "model")


def test_renderer_is_deterministic_and_covers_every_shape_and_color():
    seen = set()
    for shape in world.SHAPES:
        for color in world.COLORS:
            a = world.render(shape, color, "white", np.random.default_rng(7))
            b = world.render(shape, color, "white", np.random.default_rng(7))
            assert a.shape == (64, 64, 3) and a.dtype == np.uint8
            assert np.array_equal(a, b)
            # the object really is drawn: many pixels differ from the white background, in roughly its color
            obj = np.abs(a.astype(int) - 242).sum(-1) > 60
            assert obj.mean() > 0.03
            assert np.abs(a[obj].mean(0) - world.COLORS[color]).max() < 40
            seen.add(a.tobytes())
    assert len(seen) == len(world.SHAPES) * len(world.COLORS)
    assert len(world.SHAPES) >= 6 and len(world.COLORS) >= 6


def test_concepts_render_with_random_pose_and_never_in_pretraining_captions():
    assert len(world.CONCEPTS) >= 10
    for name in world.CONCEPTS:
        a = world.render_concept(name, np.random.default_rng(1))
        assert np.array_equal(a, world.render_concept(name, np.random.default_rng(1)))
        assert not np.array_equal(a, world.render_concept(name, np.random.default_rng(2)))
    images, captions, labels = world.sample_caption_batch(64, np.random.default_rng(0))
    assert images.shape == (64, 64, 64, 3)
    for cap, (shape, color, bg, pattern, color2) in zip(captions, labels):
        assert shape in cap and color in cap
        assert (shape, color, bg) not in world.HELD_OUT
        if pattern != "plain":
            assert f"{color} and {color2} {pattern} {shape}" in cap
    assert {lab[3] for lab in labels} == set(world.PATTERNS)
    rng = np.random.default_rng(0)
    looks = {(s, *world.sample_pattern(s, c, rng), c) for s in world.SHAPES for c in world.COLORS for _ in range(50)}
    assert not {(s, p, frozenset({c, c2})) for s, p, c2, c in looks} & world.LOOKALIKES
    held = {world.sample_labels(np.random.default_rng(i)) for i in range(300)}
    assert not held & set(world.HELD_OUT)


def test_example_concepts_are_shipped():
    root = os.path.join(ROOT, "examples", "concepts")
    names = [n for n in sorted(os.listdir(root)) if n in world.CONCEPTS]
    assert len(names) >= 6
    for n in names:
        pngs = [f for f in os.listdir(os.path.join(root, n)) if f.endswith(".png")]
        assert 5 <= len(pngs) <= 8


def test_oracle_classifies_fresh_renders():
    images, labels = oracle.render_set(120, seed=[999, 3])
    acc = oracle.accuracy(oracle.load_oracle(), images, labels)
    assert all(v >= 0.9 for v in acc.values()), acc
    f = oracle.features(images[:4])
    assert f.shape == (4, 128) and torch.isfinite(f).all()


def test_judge_is_the_argmax_of_its_members_mean_probabilities():
    judge = oracle.load_oracle()
    assert len(judge) == oracle.MEMBERS
    images, _ = oracle.render_set(60, seed=[999, 4])
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 60, images.shape), 0, 255).astype(np.uint8)
    with torch.no_grad():
        probs = [net(oracle.to_input(noisy))["concept"].softmax(1) for net in judge]
    want = np.array(oracle.CONCEPT_LABELS)[torch.stack(probs).mean(0).argmax(1).numpy()]
    assert (oracle.predict(noisy, judge)["concept"] == want).all()
    # noise makes the members disagree, so a judge that ignored a member would differ somewhere
    singles = [np.array(oracle.CONCEPT_LABELS)[p.argmax(1).numpy()] for p in probs]
    assert any((s != want).any() for s in singles)
    # probabilities, not logits: members sure of concepts 0 and 2 (logits 5, 4, -100 and -100, 4, 5) give
    # mean probabilities (0.37, 0.27, 0.37), so concept 0; mean logits would pick concept 1
    pair = torch.nn.ModuleList(oracle.Oracle().eval() for _ in range(2))
    for net, first, last in zip(pair, (5.0, -100.0), (-100.0, 5.0)):
        head = net.heads["concept"]
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, -200.0)
        head.bias.data[:3] = torch.tensor([first, 4.0, last])
    assert (oracle.predict(images[:4], pair)["concept"] == oracle.CONCEPT_LABELS[0]).all()


def test_prompt_following_prompts_are_held_out_and_cover_every_pattern():
    prompts, want = oracle.held_out_prompts()
    plain = [w for w in want if w["pattern"] == "plain"]
    assert len(plain) >= 96 and len(want) - len(plain) >= 96
    assert {w["pattern"] for w in want} == set(world.PATTERNS)
    for p, w in zip(prompts, want):
        shape, color, bg = next(t for t in world.HELD_OUT if f" {t[0]} on a {t[2]} background" in p)
        assert w["shape"] == shape and (w["color"] in (color, None))
        if w["pattern"] != "plain":
            color2 = p.split(" and ")[1].split()[0]
            assert p == f"a photo of a {color} and {color2} {w['pattern']} {shape} on a {bg} background"
            assert (shape, w["pattern"], frozenset({color, color2})) not in world.LOOKALIKES and color2 != bg


def test_seen_prompts_are_patterned_pretraining_combinations():
    prompts, want = oracle.seen_prompts()
    assert len(prompts) == 96 and {w["pattern"] for w in want} == set(world.PATTERNS[1:])
    for p, w in zip(prompts, want):
        words = p.split()
        color, color2, bg = words[4], words[6], words[-2]
        assert p == f"a photo of a {color} and {color2} {w['pattern']} {w['shape']} on a {bg} background"
        assert (w["shape"], color, bg) not in world.HELD_OUT and bg not in (color, color2)
        assert (w["shape"], w["pattern"], frozenset({color, color2})) not in world.LOOKALIKES


def test_text_separation_measures_each_word(tiny_model_dir):
    d = oracle.text_separation(tiny_model_dir)  # a random text encoder: every word moves the encoding
    assert set(d) == {"pattern", "shape", "color"} and all(v > 0 for v in d.values())


def _tiny_model():
    import unet
    return unet.load_model(MODEL)


def test_shipped_model_loads_and_samples():
    import sample
    model = _tiny_model()
    assert model.resolution == 64 and model.unet.config["cross_attention_dim"] == model.text_encoder.config.hidden_size
    # every word of the world is a single token of the shipped tokenizer
    words = set(world.SHAPES) | set(world.BACKGROUNDS) | {"photo", "background"}
    for w in words:
        assert len(model.tokenizer(w).input_ids) == 3, w
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL) for f in fs)
    assert size <= 30 * 2 ** 20
    img = sample.sample(model, ["a photo of a red circle on a white background"], steps=10, guidance=5.0, seed=0)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all() and img.std() > 0.05


def test_shipped_model_follows_color_prompts():
    import sample
    model = _tiny_model()
    colors = list(world.COLORS)
    prompts = [f"a photo of a {c} square on a gray background" for c in colors]
    images = sample.sample(model, prompts, steps=20, guidance=5.0, seed=1)
    pred = oracle.predict(images)
    assert np.mean(pred["color"] == np.array(colors)) >= 4 / 6, pred["color"]


def test_diffusers_reads_the_shipped_model_offline_and_agrees():
    diffusers = pytest.importorskip("diffusers")
    import sample
    model = _tiny_model()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    prompt = ["a photo of a blue star on a yellow background"]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = sample.sample(model, prompt, steps=10, guidance=5.0, latents=latents)
    theirs = pipe(prompt, num_inference_steps=10, guidance_scale=5.0, latents=latents, height=64, width=64,
                  output_type="pt").images
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 1e-3


def test_pretraining_pipeline_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    """A miniature of `python -m toy.pretrain`: every stage, the export, and a resumed second call that finds the
    stages done; the folder it writes is a model our loader reads."""
    import sys
    import unet
    from toy import pretrain
    monkeypatch.setattr(pretrain, "N_IMAGES", 48)
    monkeypatch.setattr(pretrain, "N_CLUTTER", 16)
    monkeypatch.setattr(pretrain, "VAE_STEPS", 2)
    monkeypatch.setattr(pretrain, "TEXT_STEPS", 2)
    work, out = tmp_path / "work", tmp_path / "model"
    argv = ["pretrain", "--work", str(work), "--out", str(out), "--unet-steps", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    pretrain.main()
    model = unet.load_model(str(out))
    assert model.unet.config == {"_class_name": "UNet2DConditionModel", **pretrain.UNET_CFG}
    shipped = unet.load_model(os.path.join(ROOT, "toy", "model"))  # the defaults make the shipped model's layout
    for ours, theirs in ((model.unet.config, shipped.unet.config), (model.vae.config, shipped.vae.config)):
        assert {k: v for k, v in ours.items() if k != "scaling_factor"} == \
            {k: v for k, v in theirs.items() if k != "scaling_factor"}
    first = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    capsys.readouterr()
    pretrain.main()  # everything cached: no stage trains again, the export is the same
    assert "unet 1/3" not in capsys.readouterr().out
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first


def test_pretrained_text_encoder_names_what_captions_say_and_stays_frozen(tmp_path, monkeypatch):
    """--text pretrained: a text stage, then the UNet on top of the frozen encoder (the export carries it as it was)."""
    import sys
    import unet
    from toy import pretrain
    for name, value in (("N_IMAGES", 48), ("N_CLUTTER", 16), ("VAE_STEPS", 2)):
        monkeypatch.setattr(pretrain, name, value)
    work, out = tmp_path / "work", tmp_path / "model"
    monkeypatch.setattr(sys, "argv", ["pretrain", "--work", str(work), "--out", str(out), "--unet-steps", "3",
                                      "--text", "pretrained", "--text-steps", "3"])
    pretrain.main()
    trained = torch.load(work / "text.pt", weights_only=True)["text"]
    exported = unet.load_model(str(out)).text_encoder.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in trained.items())
    fresh = pretrain.text_encoder_from(pretrain.stage_tokenizer(str(work))).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in trained.items())  # the text stage did train
    captions = ["a red heart", "a small red and white striped heart, gray background", "circle, blue background"]
    labels = [("heart", "red", "green", "plain", ""), ("heart", "red", "gray", "striped", "white"),
              ("circle", "blue", "blue", "plain", "")]
    targets, sizes = pretrain.caption_targets(captions, labels)
    assert sizes == [len(world.SHAPES), len(world.COLORS), len(world.BACKGROUNDS), len(world.PATTERNS),
                     len(world.SECOND_COLORS)]
    assert targets[0, 2] == -100 and targets[0, 4] == -100  # no background named, plain: no second color
    assert targets[1].tolist() == [world.SHAPES.index("heart"), list(world.COLORS).index("red"),
                                   list(world.BACKGROUNDS).index("gray"), world.PATTERNS.index("striped"),
                                   list(world.SECOND_COLORS).index("white")]


def test_clutter_share_puts_clutter_under_the_empty_prompt(tmp_path, monkeypatch):
    """--clutter-share: that share of every UNet batch is clutter latents, each under the empty prompt."""
    import unet
    from toy import pretrain
    seen = []

    class Recording(unet.UNet):
        def forward(self, x, t, context):
            seen.append((x.detach().clone(), context.detach().clone()))
            return super().forward(x, t, context)
    monkeypatch.setattr(unet, "UNet", Recording)
    tokenizer = pretrain.stage_tokenizer(str(tmp_path))
    captions = ["a red heart", "a blue circle on a gray background"]
    ones = torch.ones(4, 4, 16, 16)
    text = pretrain.text_encoder_from(tokenizer)  # given as pretrained: frozen, so its encodings can be checked
    ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = text(ids).last_hidden_state[0]
    for share, expected in ((0.0, 0), (0.25, 8)):
        seen.clear()
        (tmp_path / str(share)).mkdir()
        pretrain.stage_unet(str(tmp_path / str(share)), tokenizer, 100 * ones, 0 * ones, captions, 1.0,
                            pretrain.UNETS["a8"], 1, text, clutter=(-100 * ones, 0 * ones), clutter_share=share)
        x, context = seen[0]
        from_clutter = x.mean((1, 2, 3)) < 0  # |z0| = 100 outweighs the noise at every t
        assert int(from_clutter.sum()) == expected
        assert all(torch.allclose(c, empty, atol=1e-5) for c in context[from_clutter])


def test_pretraining_cost_of_every_candidate_is_measured():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import speed
    from toy import pretrain
    rows = speed.bench_pretrain("cpu", torch.float32, 1)
    assert [(r["kind"], r["candidate"]) for r in rows] == [("vae", n) for n in pretrain.VAES] + \
        [("unet", n) for n in pretrain.UNETS]
    assert all(r["step_s"] > 0 and r["params"] > 0 for r in rows)
    params = {r["candidate"]: r["params"] for r in rows}
    assert params["a16w48"] > params["a16"] > params["a8"] and params["v3"] > params["v2"] > params["v1"]
