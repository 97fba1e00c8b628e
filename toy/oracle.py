"""The oracle: a small CNN that judges images of the toy world (toy/world.py).

Four heads on shared features: shape (world.SHAPES), color (world.COLORS), pattern (world.PATTERNS: plain,
striped, checkered, dotted, ringed) and concept (world.CONCEPTS + "none").
It is trained only on rendered images, never on generated ones, so it can judge the tiny model's prompt following
and a personalized model's concept fidelity; `features` (the penultimate layer) serves the benchmark's KID.
The judge is an ensemble of MEMBERS such oracles trained from different seeds, and its verdict the argmax of their
mean probabilities: on generated images, which are unlike any render, single oracles disagree (one concept's score
moved by up to 0.4 between two seeds, bench/TOY.md), and the mean of three is a steadier judge.
Renders are degraded at random (blur, noise, color shift) so that the softer images a diffusion model makes are
still read correctly. "none" is learned from pretraining shapes, clutter and concepts cut into shuffled tiles, so
an image with a concept's colors but not its structure is not taken for the concept.

    python -m toy.oracle --train --threads 1     # fit 3 oracles, report held-out accuracy, write toy/oracle.safetensors
    python -m toy.oracle --eval                  # held-out accuracy of the shipped weights on fresh renders
    python -m toy.oracle --eval-model toy/model  # prompt following of a model on HELD_OUT captions
    python -m toy.oracle --eval-state runs/default  # concept accuracy of samples of every concept in a state
    python -m toy.oracle --eval-vae toy/model    # concept accuracy on the model's VAE reconstructions of renders
    python -m toy.oracle --eval-model toy/model --seen   # ... on patterned combinations pretraining does show
    python -m toy.oracle --eval-text toy/model   # does the text encoder tell pattern, shape and color words apart?
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from toy import world

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oracle.safetensors")
CONCEPT_LABELS = list(world.CONCEPTS) + ["none"]
MEMBERS = 3  # oracles in the judge, one per training seed (one alone is a noisy judge of generated images)
HEADS = {"shape": world.SHAPES, "color": list(world.COLORS), "pattern": world.PATTERNS, "concept": CONCEPT_LABELS}


class Oracle(nn.Module):
    def __init__(self, width=24, feat=128):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, feat]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=2), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(feat, len(v)) for k, v in HEADS.items()})

    def features(self, x):
        return self.body(x).mean((2, 3))

    def forward(self, x):
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def to_input(images):
    """uint8 numpy [N, 64, 64, 3] or float tensor [N, 3, 64, 64] in [0, 1] -> float tensor in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = images.float()
    if x.shape[-1] != world.SIZE:
        x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


_CACHE = {}


def load_oracle(path=WEIGHTS):
    """The judge: every Oracle stored in `path` (keys "0.body...", "1.body...": an nn.ModuleList's state dict)."""
    if path not in _CACHE:
        state = load_file(path)
        judge = nn.ModuleList(Oracle() for _ in range(1 + max(int(k.split(".")[0]) for k in state)))
        judge.load_state_dict(state)
        _CACHE[path] = judge.eval()
    return _CACHE[path]


@torch.no_grad()
def predict(images, judge=None, batch=256):
    """{"shape", "color", "pattern", "concept"}: arrays of label names (concept "none" = not a concept), each the
    argmax of the members' mean probabilities."""
    judge = judge or load_oracle()
    x = to_input(images)
    idx = {k: [] for k in HEADS}
    for i in range(0, len(x), batch):
        outs = [net(x[i:i + batch]) for net in judge]
        for k in HEADS:
            idx[k].append(sum(o[k].softmax(1) for o in outs).argmax(1))
    return {k: np.array(HEADS[k])[torch.cat(v).numpy()] for k, v in idx.items()}


@torch.no_grad()
def features(images, judge=None, batch=256):
    """Penultimate features [N, 128] of the first member (float32 tensor)."""
    net = (judge or load_oracle())[0]
    x = to_input(images)
    return torch.cat([net.features(x[i:i + batch]) for i in range(0, len(x), batch)])


def shuffle_tiles(image, rng):
    """The image cut into 4x4 or 8x8 tiles, shuffled: its colors without its structure."""
    k = [4, 8][rng.integers(2)]
    s = world.SIZE // k
    tiles = image.reshape(k, s, k, s, 3).transpose(0, 2, 1, 3, 4).reshape(k * k, s, s, 3)
    tiles = tiles[rng.permutation(k * k)]
    return tiles.reshape(k, k, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(world.SIZE, world.SIZE, 3)


def render_set(n, seed):
    """n labeled renders, a third each: pretraining-style shapes (plain and patterned, held-out triples included),
    concepts, and non-concepts that share their colors (clutter, concepts with shuffled tiles). The concept label
    of everything but a concept is "none"; patterned shapes have no color label; only pretraining-style shapes have a
    pattern label."""
    rng = np.random.default_rng(seed)
    images, labels = [], {k: [] for k in HEADS}
    for i in range(n):
        shape = color = pattern_id = -100  # no shape/color/pattern label but for pretraining-style images
        concept = len(world.CONCEPTS)
        if i % 3 == 0:
            shape, color = rng.integers(len(world.SHAPES)), rng.integers(len(world.COLORS))
            bgs = [b for b in world.BACKGROUNDS if b != HEADS["color"][color]]
            pattern, color2 = world.sample_pattern(world.SHAPES[shape], HEADS["color"][color], rng)
            images.append(world.render(world.SHAPES[shape], HEADS["color"][color], bgs[rng.integers(len(bgs))], rng,
                                       pattern=pattern, color2=color2))
            pattern_id = world.PATTERNS.index(pattern)
            if pattern != "plain":
                color = -100  # two colors: the color head learns from plain shapes only
        elif i % 3 == 1:
            concept = rng.integers(len(world.CONCEPTS))
            images.append(world.render_concept(CONCEPT_LABELS[concept], rng))
        elif rng.random() < 0.5:
            images.append(world.render_clutter(rng))
        else:
            images.append(shuffle_tiles(world.render_concept(CONCEPT_LABELS[rng.integers(len(world.CONCEPTS))], rng),
                                        rng))
        for k, v in zip(HEADS, (shape, color, pattern_id, concept)):
            labels[k].append(int(v))
    return np.stack(images), {k: torch.tensor(v) for k, v in labels.items()}


def degrade(x, g):
    """Random blur, noise and color shift, per image, on inputs in [-1, 1]."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = torch.rand(n, 1, 1, 1, generator=g)
    x = x + a * (blur - x)
    x = x + torch.rand(n, 1, 1, 1, generator=g) * 0.15 * torch.randn(x.shape, generator=g)
    x = x + 0.08 * torch.randn(n, 3, 1, 1, generator=g)
    return x.clamp(-1, 1)


def accuracy(judge, images, labels):
    pred = predict(images, judge)
    out = {}
    for k in HEADS:
        keep = labels[k] >= 0
        want = np.array(HEADS[k])[labels[k][keep].numpy()]
        out[k] = float((pred[k][keep.numpy()] == want).mean())
    return out


def train(n_train=15000, steps=2500, batch=64, seed=0):
    torch.manual_seed(seed)
    t0 = time.time()
    images, labels = render_set(n_train, seed=[seed, 1])
    print(f"oracle: rendered {n_train} training images in {time.time() - t0:.0f} s", flush=True)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8, converted per batch
    net = Oracle()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        x = x_all[idx].float() / 127.5 - 1
        x = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        out = net(degrade(x, g))
        loss = sum(F.cross_entropy(out[k], labels[k][idx], ignore_index=-100) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step + 1 == steps:
            print(f"\roracle {step + 1}/{steps} loss {loss.item():.4f}", end="", flush=True)
    print(f"\noracle: trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    return net.eval()


def held_out_prompts(n_plain=8, n_patterned=2):
    """Prompts on the HELD_OUT triples, which pretraining never shows: plain ("a photo of a red circle on a blue
    background", n_plain each) and in every pattern ("... a red and white striped circle ...", n_patterned each).
    Returns (prompts, wanted labels {head: value or None})."""
    prompts, want = [], []
    for shape, color, bg in world.HELD_OUT:
        prompts += [f"a photo of a {color} {shape} on a {bg} background"] * n_plain
        want += [{"shape": shape, "color": color, "pattern": "plain"}] * n_plain
        for pattern in world.PATTERNS[1:]:
            color2 = next(c for c in world.SECOND_COLORS if c not in (color, bg)
                          and (shape, pattern, frozenset({color, c})) not in world.LOOKALIKES)
            obj = world.describe(shape, color, pattern=pattern, color2=color2)
            prompts += [f"a photo of a {obj} on a {bg} background"] * n_patterned
            want += [{"shape": shape, "color": None, "pattern": pattern}] * n_patterned  # color head: plain only
    return prompts, want


def seen_prompts(n=96, seed=0):
    """Patterned prompts on shape x color x background combinations that pretraining does show (neither HELD_OUT nor
    a lookalike): can the model draw what it was trained on? Same return as held_out_prompts."""
    rng, held = np.random.default_rng(seed), set(world.HELD_OUT)
    prompts, want = [], []
    while len(prompts) < n:
        shape = world.SHAPES[rng.integers(len(world.SHAPES))]
        color = list(world.COLORS)[rng.integers(len(world.COLORS))]
        bg = list(world.BACKGROUNDS)[rng.integers(len(world.BACKGROUNDS))]
        if (shape, color, bg) in held or bg == color:
            continue
        pattern = world.PATTERNS[1 + rng.integers(len(world.PATTERNS) - 1)]
        others = [c for c in world.SECOND_COLORS if c not in (color, bg)
                  and (shape, pattern, frozenset({color, c})) not in world.LOOKALIKES]
        color2 = others[rng.integers(len(others))]
        prompts.append(f"a photo of a {world.describe(shape, color, pattern=pattern, color2=color2)} on a {bg} "
                       "background")
        want.append({"shape": shape, "color": None, "pattern": pattern})
    return prompts, want


@torch.no_grad()
def text_separation(path):
    """How far the text encoder moves "a photo of a red and white striped heart on a gray background" (the whole
    [77, d] output, L2) when one word changes: the pattern word (mean over the three other patterns), the shape
    word (heart -> circle), the color word (red -> blue). A word the encoder cannot tell apart cannot condition."""
    import unet
    model = unet.load_model(path)
    words = {"pattern": ["checkered", "dotted", "ringed"], "shape": ["circle"], "color": ["blue"]}
    text = "a photo of a {color} and white {pattern} {shape} on a gray background"
    base = dict(color="red", pattern="striped", shape="heart")
    ref = model.encode_text([text.format(**base)])[0]
    return {k: float(np.mean([(model.encode_text([text.format(**{**base, k: w})])[0] - ref).norm().item()
                              for w in ws])) for k, ws in words.items()}


def eval_model(path, steps=50, guidance=7.5, seed=0, seen=False):
    """Prompt following on held_out_prompts() (seen: on seen_prompts()): the oracle's shape, color and pattern
    accuracy on generated images (color over the plain prompts, pattern over the patterned ones, shape over all)."""
    import sample
    import unet
    model = unet.load_model(path)
    prompts, want = seen_prompts() if seen else held_out_prompts()
    images = torch.cat([sample.sample(model, prompts[i:i + 32], steps=steps, guidance=guidance, seed=seed + i)
                        for i in range(0, len(prompts), 32)])
    pred = predict(images)
    out = {"n": len(prompts), "n_patterned": sum(w["pattern"] != "plain" for w in want)}
    for head in ("shape", "color", "pattern"):
        hits = [p == w[head] for p, w in zip(pred[head], want) if w[head] is not None and
                (head != "pattern" or w[head] != "plain")]
        out[head] = float(np.mean(hits)) if hits else float("nan")
    return out, images


def eval_vae(vae, n=64, seed=0):
    """Can a VAE carry each concept? The oracle's concept accuracy on n fresh renders per concept and on their
    reconstructions (decode of the posterior mean). A concept the VAE cannot reconstruct cannot be learned."""
    out = {}
    for i, name in enumerate(world.CONCEPTS):
        rng = np.random.default_rng([seed, 6, i])  # not the seeds of examples/concepts
        renders = np.stack([world.render_concept(name, rng) for _ in range(n)])
        x = to_input(renders)
        with torch.no_grad():
            rec = ((vae.decode(vae.encode(x)[0]) + 1) / 2).clamp(0, 1)
        out[name] = {"renders": float(np.mean(predict(renders)["concept"] == name)),
                     "reconstructions": float(np.mean(predict(rec)["concept"] == name))}
    return out


def eval_state(folder, n=32, steps=50, guidance=7.5, seed=0):
    """Concept fidelity of a personalized model: the share of samples of each learned concept's prompt that the
    oracle assigns to that concept."""
    import cp_state
    import sample
    model, state = cp_state.load_with_state(folder)
    out = {}
    for c in state.concepts:
        images = torch.cat([sample.sample(model, [c["prompt"]] * min(32, n - i), steps=steps, guidance=guidance,
                                          seed=seed + i) for i in range(0, n, 32)])
        out[c["name"]] = float(np.mean(predict(images)["concept"] == c["name"]))
    return out, images


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--members", type=int, default=MEMBERS, help="--train: oracles in the judge (seeds 0, 1, ...)")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--eval-model", default=None, help="a model folder: prompt following on held-out combinations")
    ap.add_argument("--seen", action="store_true", help="--eval-model on patterned prompts of combinations that "
                    "pretraining shows instead")
    ap.add_argument("--eval-text", default=None, help="a model folder: how far its text encoder moves a prompt "
                    "when the pattern, shape or color word changes")
    ap.add_argument("--eval-vae", default=None, help="a model folder: oracle concept accuracy on VAE reconstructions")
    ap.add_argument("--eval-state", default=None, help="a train.py state: oracle concept accuracy of its samples")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of --eval-model/--eval-state (as sample.py)")
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG scale of --eval-model/--eval-state (as sample.py)")
    ap.add_argument("--grid", default=None, help="write the --eval-model images (or the last concept's) to this PNG")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        judge = nn.ModuleList(train(seed=seed) for seed in range(args.members))
        save_file(judge.state_dict(), WEIGHTS)
        _CACHE.clear()
        args.eval = True
    if args.eval:
        images, labels = render_set(2000, seed=[12345, 2])  # seeds disjoint from training
        print("oracle held-out accuracy on 2000 fresh renders:",
              {k: round(v, 4) for k, v in accuracy(load_oracle(), images, labels).items()}, flush=True)
    if args.eval_model:
        t0 = time.time()
        acc, images = eval_model(args.eval_model, steps=args.steps, guidance=args.guidance, seen=args.seen)
        print(f"prompt following of {args.eval_model} on {acc['n']} {'seen' if args.seen else 'held-out'} captions "
              f"(DDIM {args.steps} steps, CFG {args.guidance}): color {acc['color']:.3f}, shape {acc['shape']:.3f}, "
              f"pattern {acc['pattern']:.3f} (on {acc['n_patterned']} patterned) "
              f"({time.time() - t0:.0f} s)", flush=True)
    if args.eval_text:
        d = text_separation(args.eval_text)
        print(f"text encoder of {args.eval_text}: L2 change of the prompt's encoding when one word changes: "
              + ", ".join(f"{k} {v:.2f}" for k, v in d.items()), flush=True)
    if args.eval_vae:
        t0 = time.time()
        import unet
        for name, acc in eval_vae(unet.load_model(args.eval_vae).vae).items():
            print(f"{name:16s} renders {acc['renders']:.3f}  VAE reconstructions {acc['reconstructions']:.3f}",
                  flush=True)
        print(f"(64 fresh renders per concept, {time.time() - t0:.0f} s)", flush=True)
    if args.eval_state:
        t0 = time.time()
        acc, images = eval_state(args.eval_state, steps=args.steps, guidance=args.guidance)
        scores = ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        print(f"concept accuracy of 32 samples per concept of {args.eval_state} (DDIM {args.steps} steps, CFG "
              f"{args.guidance}): {scores} ({time.time() - t0:.0f} s)", flush=True)
    if args.grid and (args.eval_model or args.eval_state):
        import sample
        sample.to_grid(images, ncols=8).save(args.grid)


if __name__ == "__main__":
    main()
