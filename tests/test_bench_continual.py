"""bench/continual.py: A, P, F and KID by hand, a --quick run on the toy oracle, the CLIP (real-model) path,
--resume and --tuned, and a SIGTERM reaching the worker processes, on the tiny random model."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, sigterm_after_children, write_tokenizer

sys.path.insert(0, os.path.join(ROOT, "bench"))
import continual  # noqa: E402
import train  # noqa: E402

TINY = ["--steps", "2", "--batch-size", "2", "--fisher-samples", "2", "--dsc-steps", "2", "--sample-steps", "2",
        "--n-samples", "2", "--n-real", "3", "--dc-timesteps", "2", "--grid-n", "2", "--quiet"]


def test_apf_by_hand():
    nan = float("nan")
    acc = [[0.5, 0.9, 0.3],
           [nan, 0.6, 0.4],
           [nan, nan, 1.0]]
    A, P, F = continual.apf(acc)
    assert A == pytest.approx((0.3 + 0.4 + 1.0) / 3)
    assert P == pytest.approx((0.5 + 0.6 + 1.0) / 3)
    assert F == pytest.approx(((0.9 - 0.3) + (0.6 - 0.4)) / 2)  # the max over m is not at m = i for concept 1
    assert np.isnan(continual.apf([[0.7]])[2])


def test_a_after_each_task_and_the_paired_difference_to_seq_by_hand():
    nan = float("nan")
    run = lambda seed, a, acc: {"seed": seed, "A": a, "acc": acc}
    acc = [[0.5, 0.9, 0.3], [nan, 0.6, 0.4], [nan, nan, 1.0]]
    assert continual.a_after_each_task(acc) == pytest.approx([0.5, (0.9 + 0.6) / 2, (0.3 + 0.4 + 1.0) / 3])
    runs = {"seq": [run(0, 0.2, acc), run(1, 0.4, acc)], "dsc": [run(1, 0.7, acc), run(0, 0.3, acc)],
            "ewc": [run(2, 0.9, acc)]}
    paired = continual.paired_to_seq(runs)
    assert paired["dsc"] == pytest.approx((0.2, 0.1))  # seed 0: 0.3 − 0.2, seed 1: 0.7 − 0.4 (by list place: ± 0.3)
    assert "ewc" not in paired and "seq" not in paired  # no seq run of seed 2 to pair with
    other = [[0.1, 0.9, 0.3], [nan, 0.2, 0.4], [nan, nan, 0.1]]  # A after each task 0.1, 0.55, 0.8 / 3
    runs["dsc"] = [run(0, 0.3, other), run(1, 0.7, acc)]  # seed 0: −0.4, −0.2, −0.3 to seq's; seed 1: 0, 0, 0
    per_task = continual.paired_to_seq(runs, lambda r: continual.a_after_each_task(r["acc"]))
    assert [x for pair in per_task["dsc"] for x in pair] == pytest.approx([-0.2, 0.2, -0.1, 0.1, -0.15, 0.15])
    assert continual.seeds_ran(runs) == "`seq` 2, `dsc` 2, `ewc` 1"  # the seeds each method ran, not --seeds
    assert continual.seeds_ran({"seq": runs["seq"], "dsc": runs["dsc"]}) == "2"


def test_order_reverse_learns_the_same_concepts_backwards(tmp_path):
    """`--order reverse`: the first --tasks concepts of the split, the last of them learned first."""
    for order, want in (("forward", continual.SPLITS["tuning"][:3]), ("reverse", continual.SPLITS["tuning"][2::-1])):
        args = continual.parse_args(["--split", "tuning", "--tasks", "3", "--n-real", "1", "--order", order])
        names, folders, real = continual.toy_concepts(args, str(tmp_path))
        assert names == want and [os.path.basename(f) for f in folders] == want and len(real) == 3


def test_kid_by_hand_and_on_shifted_sets():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(4) for j in range(4) if i != j) / 12
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert continual.kid(x, y) == pytest.approx(xx + yy - 2 * xy)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same, shifted = continual.kid(a, b), continual.kid(a, b + 1.0)
    assert abs(same) < 0.05 and shifted > 1.0
    assert continual.kid(b + 1.0, a) == pytest.approx(shifted)


def run_bench(*args):
    r = subprocess.run([sys.executable, "bench/continual.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def check_outputs(out, methods, n_tasks, seeds):
    for f in ("results.md", "results.json", "grid.png", "plot.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    report = json.load(open(os.path.join(out, "results.json")))
    assert report["command"].startswith("python bench/continual.py")
    assert list(report["summary"]) == methods and len(report["concepts"]) == n_tasks
    for method in methods:
        runs = report["runs"][method]
        assert [r["seed"] for r in runs] == list(range(seeds))
        for r in runs:
            acc = np.array(r["acc"], dtype=float)
            assert acc.shape == (n_tasks, n_tasks)
            assert np.isnan(acc[np.tril_indices(n_tasks, -1)]).all()  # concept i is not scored before task i
            defined = acc[np.triu_indices(n_tasks)]
            assert ((defined >= 0) & (defined <= 1)).all()
            confusion = np.array(r["confusion"])
            assert confusion.shape == (n_tasks, n_tasks + 1) and np.allclose(confusion.sum(1), 1)
            assert np.allclose(np.diag(confusion), acc[:, -1])
            assert 0 <= r["A"] <= 1 and 0 <= r["P"] <= 1 and -1 <= r["F"] <= 1 and 0 <= r["dc_acc"] <= 1
            assert -1 <= r["feat_sim"] <= 1 and np.isfinite(r["kid"])
            assert len(r["dc_acc_per_concept"]) == n_tasks and len(r["tasks"]) == n_tasks
            pools = [t["pool"] for t in r["tasks"]]
            assert pools == list(range(1, n_tasks + 1))  # every LoRA method stores one entry per task
            assert r["tasks"][-1]["state_bytes"] > r["tasks"][0]["state_bytes"]
            assert all(t["lora_norm"] > 0 and t["train_seconds"] >= 0 for t in r["tasks"])
    table = open(os.path.join(out, "results.md")).read()
    assert report["command"] in table and all(f"`{m}`" in table for m in methods)
    assert Image.open(os.path.join(out, "grid.png")).height >= n_tasks * 16
    return report


def test_quick_toy(tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    r = run_bench("--quick", "--model", tiny_model_dir, "--methods", "clora,dsc-ewc-dc", "--out", out, *TINY)
    assert r.stdout.startswith("python bench/continual.py --quick")
    assert "task 2/2" in r.stdout
    report = check_outputs(out, ["clora", "dsc-ewc-dc"], 2, 1)
    assert report["judge"].startswith("toy oracle") and report["judge_acc_real"] >= 0.8  # fresh renders: easy
    assert report["summary"]["dsc-ewc-dc"]["fisher_params"] > 0 == report["summary"]["clora"]["fisher_params"]


def write_tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel
    n_vocab = write_tokenizer(folder, ["photo", "ball", "box"])
    special = dict(bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=n_vocab, max_position_embeddings=77, **special),
                         vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
              ).save_pretrained(folder)
    return folder


def test_clip_mode(tiny_model_dir, tmp_path):
    clip = write_tiny_clip(str(tmp_path / "clip"))
    rng = np.random.default_rng(0)
    folders = []
    for name, base in (("ball", (200, 40, 40)), ("box", (40, 40, 200))):
        os.makedirs(tmp_path / name)
        for k in range(4):
            pixels = np.clip(np.array(base) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{k}.jpg")
        folders.append(str(tmp_path / name))
    out = str(tmp_path / "out")
    run_bench("--model", tiny_model_dir, "--clip", clip, "--concepts", ",".join(folders), "--class-words", "ball,box",
              "--holdout", "2", "--methods", "ewc-dc", "--seeds", "2", "--jobs", "2", "--out", out, *TINY)
    report = check_outputs(out, ["ewc-dc"], 2, 2)
    assert report["judge"].startswith("CLIP") and report["concepts"] == ["ball", "box"]
    assert report["judge_acc_real"] == 1.0  # red vs blue photos: apart even in a random CLIP
    for r in report["runs"]["ewc-dc"]:
        assert -1 <= r["clip_i"] <= 1 and -1 <= r["clip_t"] <= 1
        assert r["tasks"][0]["concept"] == "ball"
    assert "CLIP-I" in open(os.path.join(out, "results.md")).read()
    assert report["summary"]["ewc-dc"]["A"][1] is not None  # std over the 2 seeds


def test_resume_keeps_finished_runs_and_tuned_values_reach_their_method(tiny_model_dir, tmp_path):
    out, tuned = str(tmp_path / "out"), tmp_path / "chosen.json"
    tuned.write_text(json.dumps({"ewc": {"ewc_lambda": 3.0}, "clora": {"clora_lambda": 7.0}, "seq": {"dc_temp": 0.02}}))
    common = ["--quick", "--model", tiny_model_dir, "--out", out, *TINY]
    run_bench(*common, "--methods", "seq", "--tuned", str(tuned))
    report = json.load(open(os.path.join(out, "results.json")))
    first = report["runs"]["seq"]
    assert report["hparams"]["seq"]["dc_temp"] == 0.02
    os.remove(os.path.join(out, "samples", "seq.safetensors"))  # as in a clean clone: samples are not in git
    r = run_bench(*common, "--methods", "seq,ewc", "--resume", "--tuned", str(tuned))
    assert "resuming: 1 runs kept" in r.stdout and "[seq seed 0]" not in r.stdout and "[ewc seed 0]" in r.stdout
    assert "seq.safetensors is missing" in r.stdout
    report = check_outputs(out, ["seq", "ewc"], 2, 1)
    assert report["runs"]["seq"] == first
    assert report["concepts"] == continual.SPLITS["evaluation"][:2]
    assert report["runs"]["ewc"][0]["hparams"]["ewc_lambda"] == 3.0
    assert first[0]["hparams"]["ewc_lambda"] == continual.cp.Hparams().ewc_lambda  # seq: the default
    again = run_bench(*common, "--methods", "ewc", "--resume", "--tuned", str(tuned))  # seq not asked for: kept
    assert "resuming: 2 runs kept" in again.stdout and "[ewc seed 0]" not in again.stdout
    kept = json.load(open(os.path.join(out, "results.json")))
    assert list(kept["runs"]) == ["ewc", "seq"] and kept["runs"]["seq"] == first
    assert {r["commit"] for runs in kept["runs"].values() for r in runs} == {continual.code_version()}
    for change in (["--n-samples", "3"], ["--methods", "ewc"]):  # other settings; other tuned values for ewc
        tuned.write_text(json.dumps({"ewc": {"ewc_lambda": 4.0}}))
        bad = subprocess.run([sys.executable, "bench/continual.py", *common, "--methods", "seq", "--resume",
                              "--tuned", str(tuned), *change], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and "other settings" in bad.stderr and "Traceback" not in bad.stderr


def test_model_inside_the_repository_is_recorded_relative_to_it(tmp_path, monkeypatch):
    shipped = os.path.join(ROOT, "toy", "model")
    assert continual.in_repo(shipped) == os.path.join("toy", "model")  # the default --model, an absolute path
    monkeypatch.chdir(os.path.join(ROOT, "toy"))
    assert continual.in_repo("model") == os.path.join("toy", "model")  # a relative one, from another folder
    assert continual.in_repo(str(tmp_path)) == str(tmp_path)  # outside the repository: as given
    assert continual.in_repo(ROOT + "-copy/toy/model") == ROOT + "-copy/toy/model"  # a sibling, not inside


def test_method_hparams_presets_then_tuned_then_flags(tmp_path):
    """As train.py resolves a new state: the model preset, the method's preset, --tuned, the flags; --no-presets
    leaves cp.Hparams' defaults under --tuned and the flags (bench/tune.py's cells)."""
    presets = train.load_presets()["methods"]
    args = continual.parse_args(["--ewc-gamma", "0.5"])
    assert continual.method_hparams(args, ["seq", "ewc"], {"lr": 0.1}) == \
        {"seq": {"lr": 0.1, **presets["seq"], "ewc_gamma": 0.5}, "ewc": {"lr": 0.1, **presets["ewc"], "ewc_gamma": 0.5}}
    args.no_presets = True
    assert continual.method_hparams(args, ["seq", "ewc"]) == {"seq": {"ewc_gamma": 0.5}, "ewc": {"ewc_gamma": 0.5}}
    args.tuned = str(tmp_path / "chosen.json")
    (tmp_path / "chosen.json").write_text(json.dumps({"ewc": {"ewc_lambda": 9.0, "ewc_gamma": 0.1}}))
    assert continual.method_hparams(args, ["seq", "ewc"]) == {"seq": {"ewc_gamma": 0.5},
                                                              "ewc": {"ewc_lambda": 9.0, "ewc_gamma": 0.5}}
    (tmp_path / "chosen.json").write_text(json.dumps({"ewc": {"ewc_lambda": -1.0}}))
    with pytest.raises(SystemExit, match="ewc: --ewc-lambda -1.0"):
        continual.method_hparams(args, ["ewc"])


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc")
def test_sigterm_ends_the_worker_processes_too(tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--methods", "seq", "--seeds", "2", "--jobs", "2", "--out", str(tmp_path),
            *TINY, "--steps", "100000"]  # runs that would last hours
    returncode, left = sigterm_after_children([sys.executable, "bench/continual.py", *args],
                                              b"spawn_main", 2)  # the pool's workers, not its resource tracker
    assert not left
    assert returncode == 128 + signal.SIGTERM  # exited through main's `finally`


class PointMassEps(torch.nn.Module):
    """The exact eps-predictor when the prompt's class is a single latent, stored flat in context[:, 0]."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.ac = alphas_cumprod

    def forward(self, x, t, context):
        a = self.ac[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * context[:, 0].view(x.shape)) / (1 - a).sqrt()


@pytest.mark.parametrize("chunk", [64, 7, 1])
def test_classify_finds_the_class_of_a_point_mass(chunk):
    """Under the exact predictor of five point-mass classes (two of them close), the lowest mean error over the
    timestep grid is each image's own class, whatever the chunking and the noise seed."""
    ac = continual.unet.alphas_cumprod_from_config(continual.unet.PRESETS["tiny"]["scheduler"])
    B, K, shape = 5, 5, (4, 4, 4)
    g = torch.Generator().manual_seed(1)
    means = torch.randn(K, 1, 64, generator=g)  # one latent per class, as the "prompt embedding"
    means[1] = means[0] + 0.3 * torch.randn(1, 64, generator=g)  # two classes close together
    label = torch.tensor([0, 1, 2, 3, 1])
    x0 = means[label, 0].view(B, *shape) + 0.1 * torch.randn(B, *shape, generator=g)
    for seed in (3, 4):
        assert torch.equal(continual.classify(PointMassEps(ac), x0, means, ac, 8, seed, chunk), label)


@pytest.mark.slow
def test_toy_model_classifies_rendered_shapes():
    """DC picks the shape of fresh rendered images among six caption prompts (chance: 1/6)."""
    from toy import world
    model = continual.unet.load_model(os.path.join(ROOT, "toy", "model"))
    rng, hits, n = np.random.default_rng(1234), 0, 24
    for _ in range(n):
        shape, color, bg = world.sample_labels(rng)
        img = torch.tensor(world.render(shape, color, bg, rng)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            x0 = model.encode_images(img)
            contexts = model.encode_text([f"a photo of a {color} {s} on a {bg} background" for s in world.SHAPES])
        pred = continual.classify(model.unet, x0, contexts, model.alphas_cumprod, n_timesteps=10, seed=0)
        hits += world.SHAPES[pred.item()] == shape
    print(f"toy DC shape accuracy {hits}/{n}")
    assert hits / n >= 0.5
