"""bench/diagnose.py: the error gap `--gap` prints, against the gaps computed by hand from dc_score's errors; the
Fisher-stability measures on known vectors."""
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import cp  # noqa: E402
import dc_score  # noqa: E402
import diagnose  # noqa: E402
import train  # noqa: E402
import unet  # noqa: E402

DRAWS = 6


def write_concept(folder, seed, n=3):
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(folder)


def gaps_by_hand(model_path, folder, steps):
    """|e(c_n) − e(c₀)| of DRAWS draws: the concept learned alone with `seq` for `steps` steps (0: its token added,
    untrained), the draws from a generator seeded as diagnose.py seeds it, the errors from dc_score's predictions."""
    hp = diagnose.seq_hparams(model_path, 0, steps)[0]
    model = unet.load_model(model_path)
    images, name, captions = train.read_concept(folder, model.resolution)
    if steps:
        cp.learn_concept(model, cp.new_state(model, hp), images, name, None, captions)
    else:
        unet.add_tokens(model, {f"<{name}>": None})
    gen = torch.Generator().manual_seed(diagnose.GAP_SEED)
    x0 = cp.Batches(model, images, hp.batch_size, gen)(DRAWS)
    t, eps = cp.draw_noise(model, x0, gen)
    with torch.no_grad():
        pred = dc_score.noise_predictions(model.unet, x0, model.encode_text([f"a photo of a <{name}>", "a photo"]),
                                          t, eps, model.alphas_cumprod)
    e = dc_score.dc_errors(pred, eps)
    return (e[:, 0] - e[:, 1]).abs()


def printed(out, label):
    return float(re.search(rf"^{label} +(\S+)$", out, re.M).group(1))


@pytest.mark.parametrize("steps, concepts", [(0, 2), (1, 1)])  # trained: one concept, the training's cost
def test_the_printed_gap_is_the_lower_median_of_the_gaps_by_hand(tiny_model_dir, tmp_path, capsys, steps, concepts):
    folders = [write_concept(tmp_path / name, seed) for seed, name in enumerate(["spots", "stripes"][:concepts])]
    report = diagnose.main(["--gap", "--model", tiny_model_dir, "--concepts", ",".join(folders), "--steps", str(steps),
                            "--draws", str(DRAWS), "--device", "cpu"])
    out = capsys.readouterr().out
    lower = lambda v: float(v.sort().values[(len(v) - 1) // 2])  # of 6 values, the 3rd smallest
    by_hand = {os.path.basename(f): gaps_by_hand(tiny_model_dir, f, steps) for f in folders}
    for name, gaps in by_hand.items():
        assert gaps.abs().max() > 0 and torch.isfinite(gaps).all()
        assert report["concepts"][name] == pytest.approx(lower(gaps), rel=1e-4)
        assert printed(out, name) == pytest.approx(lower(gaps), rel=6e-3)  # printed to 3 digits
    pooled = lower(torch.cat(list(by_hand.values())))
    assert report["all"] == pytest.approx(pooled, rel=1e-4) and printed(out, "all") == pytest.approx(pooled, rel=6e-3)
    words = " ".join(out.split())  # the paragraphs are wrapped at 120 columns
    assert f"τ in use on this model: 0.01, {0.01 / report['all']:.1f}× the gap" in words  # the toy preset's τ
    assert f"that multiple of this gap is --dc-temp {diagnose.TOY_MULTIPLE * report['all']:.2g}." in words


def test_gap_refuses_what_it_cannot_measure(tmp_path, capsys):
    a, b = write_concept(tmp_path / "a" / "dog", 0), write_concept(tmp_path / "b" / "dog", 1)
    for concepts, words, says in (([a, str(tmp_path / "cat")], None, "distinct names"), ([a, b], None, "distinct"),
                                  ([a], "dog,cat", "2 words for 1 concept folders")):
        with pytest.raises(SystemExit):
            diagnose.main(["--gap", "--concepts", ",".join(concepts)] + (["--class-words", words] if words else []))
        assert says in capsys.readouterr().err


def test_fisher_stability_measures():
    a = torch.arange(1.0, 201.0)
    assert diagnose.spearman(a, a ** 3) == pytest.approx(1.0)  # a monotone map keeps the ranks
    assert diagnose.spearman(a, -a) == pytest.approx(-1.0)
    assert diagnose.overlap(a, a.flip(0), q=0.02) == 0.0 and diagnose.overlap(a, a * 2, q=0.02) == 1.0
    assert diagnose.top_share(torch.tensor([97.0] + [1.0] * 3), q=0.25) == pytest.approx(0.97)
