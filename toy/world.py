"""The toy world (bench/TOY.md): a deterministic procedural renderer of 64x64 RGB images with captions.

Pretraining images are one shape on a plain background, either of one color ("a photo of a red star on a blue
background") or patterned in two colors ("a red and white checkered heart"): stripes, checkers, dots or rings, the
visual vocabulary a personal object is later composed from, as a real model knows textures before it meets your
mug. Concepts are composite objects (a checkered heart with fixed colors, a striped ring around a dot, ...) that
pretraining never shows: the pattern-shape-color combinations they resemble are held out (LOOKALIKES). Each is
rendered with a random pose, scale and background, so it has unlimited held-out images.
"Clutter" (random patterned blobs) is the VAE's extra training data, so the codec is not limited to plain shapes.
Everything is a pure function of a numpy Generator, so a seed fixes the image.

    python -m toy.world --write-examples     # examples/concepts/<name>/*.png
"""
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64        # output resolution
SS = 4           # supersampling factor of the canvas
SPRITE = 256     # resolution of an object drawn in unit coordinates [-1, 1]^2

COLORS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 75, 220),
          "yellow": (240, 210, 35), "purple": (135, 50, 175), "orange": (245, 130, 25)}
BACKGROUNDS = {"white": (242, 242, 242), "black": (20, 20, 20), "gray": (128, 128, 128), **COLORS}
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
SIZES = {"small": (0.22, 0.32), "large": (0.36, 0.46)}   # object radius as a fraction of the image side
PATTERNS = ["plain", "striped", "checkered", "dotted", "ringed"]
PATTERN_P = [0.4, 0.15, 0.15, 0.15, 0.15]
SECOND_COLORS = {**COLORS, "white": (250, 250, 250), "black": (20, 20, 20)}   # the other color of a pattern
PHRASES = ["a photo of a {obj} on a {bg} background", "a {obj} on a {bg} background", "a photo of a {obj}",
           "a {obj}", "{obj}, {bg} background", "a picture of a {obj} in front of a {bg} background"]

# (shape, color, background) triples that pretraining never shows; the prompt-following bar is measured on them.
HELD_OUT = [("circle", "red", "blue"), ("square", "green", "white"), ("triangle", "blue", "yellow"),
            ("star", "yellow", "black"), ("heart", "purple", "gray"), ("cross", "orange", "green"),
            ("circle", "purple", "orange"), ("square", "orange", "purple"), ("triangle", "red", "gray"),
            ("star", "blue", "white"), ("heart", "green", "black"), ("cross", "yellow", "red")]
_HELD = set(HELD_OUT)
# (shape, pattern, {two colors}) that a concept resembles: pretraining never shows them
LOOKALIKES = {("heart", "checkered", frozenset({"red", "white"})), ("star", "striped", frozenset({"orange", "blue"})),
              ("square", "dotted", frozenset({"purple", "white"})), ("circle", "ringed", frozenset({"blue", "white"})),
              ("circle", "dotted", frozenset({"red", "black"})), ("square", "dotted", frozenset({"white", "black"})),
              ("triangle", "striped", frozenset({"red", "white"}))}


def _jitter(rgb, rng, amount=14):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


class Pen:
    """Draws on an RGBA sprite in unit coordinates: (-1, -1) top-left, (1, 1) bottom-right."""

    def __init__(self):
        self.img = Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
        self.d = ImageDraw.Draw(self.img)

    def p(self, x, y):
        return ((x + 1) * SPRITE / 2, (y + 1) * SPRITE / 2)

    def poly(self, pts, fill):
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def disc(self, x, y, r, fill):
        self.d.ellipse([*self.p(x - r, y - r), *self.p(x + r, y + r)], fill=fill)

    def rect(self, x0, y0, x1, y1, fill):
        self.d.rectangle([*self.p(x0, y0), *self.p(x1, y1)], fill=fill)

    def pattern(self, mask_fn, paint_fn):
        """Paint a pattern clipped to a shape: mask_fn(Pen) draws the shape, paint_fn(Pen) the full-sprite pattern."""
        mask, layer = Pen(), Pen()
        mask_fn(mask)
        paint_fn(layer)
        self.img.paste(layer.img, (0, 0), mask.img.getchannel("A"))


def _ngon(n, r, phase=-math.pi / 2, cy=0.0):
    return [(r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _star_pts(r_out=0.95, r_in=0.4, n=5):
    return [((r_out if k % 2 == 0 else r_in) * math.cos(-math.pi / 2 + math.pi * k / n),
             (r_out if k % 2 == 0 else r_in) * math.sin(-math.pi / 2 + math.pi * k / n)) for k in range(2 * n)]


def _heart_pts(scale=0.95):
    ts = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return list(zip(x / 17 * scale, (y + 2.5) / 17 * scale))


def _cross_pts(w=0.3, r=0.9):
    return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]


def draw_shape(pen, shape, fill):
    if shape == "circle":
        pen.disc(0, 0, 0.85, fill)
    elif shape == "square":
        pen.rect(-0.66, -0.66, 0.66, 0.66, fill)
    elif shape == "triangle":
        pen.poly(_ngon(3, 0.95, cy=0.12), fill)
    elif shape == "star":
        pen.poly(_star_pts(), fill)
    elif shape == "heart":
        pen.poly(_heart_pts(), fill)
    elif shape == "cross":
        pen.poly(_cross_pts(), fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def paint_pattern(pen, pattern, fill, other, rng):
    """Fill the whole sprite with `pattern` in colors `fill` and `other` (Pen.pattern clips it to the shape).
    k is in units of the object's radius: bands, cells, dots and rings are 6-9 px (about 2 latent pixels) at the
    median radius of 21 px; finer ones the tiny UNet drew as a worm-like texture (bench/TOY.md)."""
    pen.rect(-1, -1, 1, 1, fill)
    if pattern == "striped":    # vertical, horizontal or diagonal bands
        k, kind = rng.uniform(0.3, 0.4), rng.integers(3)
        for x in np.arange(-3, 3, 2 * k):
            pts = [(x, -1), (x + k, -1), (x + k, 1), (x, 1)] if kind < 2 else \
                [(x - 1, 1), (x + k - 1, 1), (x + k + 1, -1), (x + 1, -1)]
            pen.poly([(y, x) for x, y in pts] if kind == 1 else pts, other)
    elif pattern == "checkered":
        k = rng.uniform(0.35, 0.45)
        for i, x in enumerate(np.arange(-1, 1, k)):
            for j, y in enumerate(np.arange(-1, 1, k)):
                if (i + j) % 2:
                    pen.rect(x, y, x + k, y + k, other)
    elif pattern == "dotted":
        k = rng.uniform(0.5, 0.6)
        for i, x in enumerate(np.arange(-1, 1, k)):
            for y in np.arange(-1, 1, k):
                pen.disc(x + k / 2 + (k / 4 if i % 2 else 0), y + k / 2, k * 0.36, other)
    elif pattern == "ringed":   # concentric rings around the center
        k = rng.uniform(0.3, 0.38)
        for i, r in enumerate(np.arange(1.4, 0, -k)):
            pen.disc(0, 0, r, other if i % 2 else fill)
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")


# ---- concepts: composite objects with fixed colors; `avoid` lists backgrounds they would vanish into ----
# Every part is about 2 latent pixels (8 px) or more at the smallest size render_concept draws: finer parts were
# beyond what the tiny model can learn (bench/TOY.md, "Coarser concept drawings").

def _striped_ring(pen):
    def ring(m):
        m.disc(0, 0, 0.95, (0, 0, 0, 255))
        m.disc(0, 0, 0.55, (0, 0, 0, 0))

    def wedges(m):
        for k in range(8):
            a0, a1 = 2 * math.pi * k / 8, 2 * math.pi * (k + 1) / 8
            m.poly([(0, 0), (1.5 * math.cos(a0), 1.5 * math.sin(a0)), (1.5 * math.cos(a1), 1.5 * math.sin(a1))],
                   (20, 170, 170) if k % 2 else (250, 250, 250))
    pen.pattern(ring, wedges)
    pen.disc(0, 0, 0.3, (220, 40, 160))


def _checkered_heart(pen):
    def checker(m):
        for i in range(8):
            for j in range(8):
                x, y = -1 + i / 4, -1 + j / 4
                m.rect(x, y, x + 0.25, y + 0.25, (210, 30, 40) if (i + j) % 2 else (250, 250, 250))
    pen.pattern(lambda m: m.poly(_heart_pts(), (0, 0, 0, 255)), checker)


def _bullseye(pen):
    for r, c in [(0.95, (30, 60, 200)), (0.7, (250, 250, 250)), (0.47, (30, 60, 200)), (0.25, (230, 200, 20))]:
        pen.disc(0, 0, r, c)


def _polka_square(pen):
    def dots(m):
        m.rect(-1, -1, 1, 1, (120, 40, 170))
        for i in range(3):
            for j in range(3):
                m.disc(-0.48 + 0.48 * i, -0.48 + 0.48 * j, 0.16, (250, 250, 250))
    pen.pattern(lambda m: m.rect(-0.75, -0.75, 0.75, 0.75, (0, 0, 0, 255)), dots)


def _smiley(pen):
    pen.disc(0, 0, 0.9, (245, 205, 20))
    pen.disc(-0.32, -0.25, 0.13, (20, 20, 20))
    pen.disc(0.32, -0.25, 0.13, (20, 20, 20))
    pen.d.arc([*pen.p(-0.55, -0.45), *pen.p(0.55, 0.6)], 20, 160, fill=(20, 20, 20), width=SPRITE // 22)


def _flower(pen):
    for k in range(6):
        a = 2 * math.pi * k / 6
        pen.disc(0.55 * math.cos(a), 0.55 * math.sin(a), 0.36, (240, 110, 180))
    pen.disc(0, 0, 0.32, (245, 150, 20))


def _mushroom(pen):
    pen.rect(-0.22, -0.05, 0.22, 0.85, (230, 210, 170))
    pen.d.pieslice([*pen.p(-0.9, -0.75), *pen.p(0.9, 0.75)], 180, 360, fill=(200, 30, 30))
    for x, y in [(-0.48, -0.22), (0, -0.45), (0.48, -0.22)]:
        pen.disc(x, y, 0.16, (250, 250, 250))


def _house(pen):
    pen.rect(-0.65, -0.1, 0.65, 0.85, (150, 95, 50))
    pen.poly([(-0.85, -0.05), (0, -0.85), (0.85, -0.05)], (200, 30, 30))
    pen.rect(-0.17, 0.35, 0.17, 0.85, (50, 30, 20))
    pen.rect(0.3, 0.1, 0.52, 0.32, (150, 210, 250))


def _pine_tree(pen):
    pen.rect(-0.12, 0.55, 0.12, 0.95, (110, 70, 35))
    for cy, r in [(0.3, 0.65), (-0.05, 0.55), (-0.38, 0.45)]:
        pen.poly([(-r, cy + 0.3), (0, cy - r), (r, cy + 0.3)], (20, 120, 50))


def _rainbow(pen):
    for r, c in [(0.98, (220, 35, 35)), (0.8, (240, 215, 35)), (0.62, (40, 170, 60)), (0.44, (40, 80, 220))]:
        pen.d.pieslice([*pen.p(-r, -r + 0.3), *pen.p(r, r + 0.3)], 180, 360, fill=c)
    pen.d.pieslice([*pen.p(-0.26, -0.26 + 0.3), *pen.p(0.26, 0.26 + 0.3)], 180, 360, fill=(0, 0, 0, 0))


def _striped_star(pen):
    def stripes(m):
        m.rect(-1, -1, 1, 1, (245, 130, 25))
        for k in range(-3, 4):
            x = k * 0.8
            m.poly([(x - 1, 1), (x - 0.6, 1), (x + 1.4, -1), (x + 1, -1)], (40, 60, 200))
    pen.pattern(lambda m: m.poly(_star_pts(), (0, 0, 0, 255)), stripes)


def _eye(pen):
    pen.d.ellipse([*pen.p(-0.95, -0.55), *pen.p(0.95, 0.55)], fill=(250, 250, 250), outline=(20, 20, 20),
                  width=SPRITE // 40)
    pen.disc(0, 0, 0.45, (40, 130, 200))
    pen.disc(0, 0, 0.2, (15, 15, 15))


def _ladybug(pen):
    pen.disc(0, -0.62, 0.3, (20, 20, 20))
    pen.disc(0, 0.12, 0.78, (215, 35, 35))
    pen.rect(-0.05, -0.62, 0.05, 0.9, (20, 20, 20))
    for x, y in [(-0.4, -0.1), (0.4, -0.1), (-0.38, 0.45), (0.38, 0.45)]:
        pen.disc(x, y, 0.18, (20, 20, 20))


def _dice(pen):
    pen.rect(-0.72, -0.72, 0.72, 0.72, (20, 20, 20))
    pen.rect(-0.64, -0.64, 0.64, 0.64, (250, 250, 250))
    for x, y in [(-0.36, -0.36), (0.36, -0.36), (0, 0), (-0.36, 0.36), (0.36, 0.36)]:
        pen.disc(x, y, 0.16, (20, 20, 20))


def _sailboat(pen):
    pen.poly([(-0.9, 0.45), (0.9, 0.45), (0.6, 0.85), (-0.6, 0.85)], (150, 95, 50))
    pen.rect(-0.06, -0.95, 0.06, 0.45, (20, 20, 20))

    def stripes(m):
        for k in range(4):
            m.rect(-1, -0.95 + k * 0.6, 1, -0.65 + k * 0.6, (215, 35, 35))
            m.rect(-1, -0.65 + k * 0.6, 1, -0.35 + k * 0.6, (250, 250, 250))
    pen.pattern(lambda m: m.poly([(0.12, -0.95), (0.12, 0.35), (0.95, 0.35)], (0, 0, 0, 255)), stripes)
    pen.poly([(-0.12, -0.65), (-0.12, 0.35), (-0.75, 0.35)], (240, 210, 35))


def _traffic_light(pen):
    pen.rect(-0.46, -0.95, 0.46, 0.95, (20, 20, 20))
    for y, c in [(-0.58, (215, 35, 35)), (0, (240, 210, 35)), (0.58, (35, 165, 55))]:
        pen.disc(0, y, 0.3, c)


CONCEPTS = {  # name: (draw function, backgrounds to avoid)
    "striped_ring": (_striped_ring, ()),
    "checkered_heart": (_checkered_heart, ("white", "red")),
    "bullseye": (_bullseye, ("blue",)),
    "polka_square": (_polka_square, ("purple",)),
    "smiley": (_smiley, ("yellow", "orange")),
    "flower": (_flower, ()),
    "mushroom": (_mushroom, ("red",)),
    "house": (_house, ("red",)),
    "pine_tree": (_pine_tree, ("green",)),
    "rainbow": (_rainbow, ()),
    "striped_star": (_striped_star, ("blue", "orange")),
    "eye": (_eye, ("white",)),
    "ladybug": (_ladybug, ("red", "black")),
    "dice": (_dice, ("white", "black")),
    "sailboat": (_sailboat, ()),
    "traffic_light": (_traffic_light, ("black",)),
}


def _clutter_object(pen, rng):
    """A random blob of the codec's training data: ellipse, box or polygon, solid or with a random pattern."""
    rgb = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))
    kind, fill = rng.integers(3), rgb()
    if kind == 0:
        rx, ry = rng.uniform(0.4, 0.95, 2)
        shape = lambda m, f: m.d.ellipse([*m.p(-rx, -ry), *m.p(rx, ry)], fill=f)
    elif kind == 1:
        hx, hy = rng.uniform(0.3, 0.7, 2)
        shape = lambda m, f: m.rect(-hx, -hy, hx, hy, f)
    else:
        pts = _ngon(int(rng.integers(3, 9)), rng.uniform(0.5, 0.95), rng.uniform(0, 2 * math.pi))
        shape = lambda m, f: m.poly(pts, f)
    style, other, k = rng.integers(5), rgb(), rng.uniform(0.1, 0.35)
    if style == 0:
        shape(pen, fill)
        return

    def paint(m):
        m.rect(-1, -1, 1, 1, fill)
        if style == 1:      # stripes
            for x in np.arange(-2, 2, 2 * k):
                m.poly([(x, -1), (x + k, -1), (x + k + rng.uniform(-1, 1), 1), (x + rng.uniform(-1, 1), 1)], other)
        elif style == 2:    # checker
            for i, x in enumerate(np.arange(-1, 1, k)):
                for j, y in enumerate(np.arange(-1, 1, k)):
                    if (i + j) % 2:
                        m.rect(x, y, x + k, y + k, other)
        elif style == 3:    # dots
            for x in np.arange(-1, 1, 2 * k):
                for y in np.arange(-1, 1, 2 * k):
                    m.disc(x + k / 2, y + k / 2, k / 2, other)
        else:               # rings
            for i, r in enumerate(np.arange(1.4, 0, -k)):
                m.disc(0, 0, r, other if i % 2 else fill)
    pen.pattern(lambda m: shape(m, (0, 0, 0, 255)), paint)


def render_clutter(rng):
    """Codec training data only (the VAE, never the UNet): 1-4 random patterned objects of random colors on a
    plain or two-tone background, so the autoencoder can represent any toy image, concepts included."""
    W = SIZE * SS
    rgba = lambda: (*rng.integers(0, 256, 3).tolist(), 255)
    canvas = Image.new("RGBA", (W, W), rgba())
    if rng.random() < 0.5:
        ImageDraw.Draw(canvas).rectangle([0, int(rng.uniform(0, W)), W, W], fill=rgba())
    for _ in range(int(rng.integers(1, 5))):
        _place(lambda pen: _clutter_object(pen, rng), canvas, rng, (0.12, 0.45), max_rot=180)
    return _downsample(canvas)


def _place(draw, canvas, rng, size_range, max_rot=20):
    """Draw an object sprite, rotate, scale and paste it at a random place on the supersampled canvas."""
    pen = Pen()
    draw(pen)
    sprite = pen.img.rotate(float(rng.uniform(-max_rot, max_rot)), resample=Image.BICUBIC)
    radius = rng.uniform(*size_range) * SIZE * SS
    side = int(round(2 * radius))
    sprite = sprite.resize((side, side), Image.LANCZOS)
    cx, cy = rng.uniform(radius * 0.95, canvas.width - radius * 0.95, size=2)
    canvas.alpha_composite(sprite, (int(cx - side / 2), int(cy - side / 2)))


def _downsample(canvas):
    return np.asarray(canvas.convert("RGB").resize((SIZE, SIZE), Image.BOX))


def _compose(draw, bg_rgb, rng, size_range):
    """One object on a plain background; uint8 [64, 64, 3]."""
    canvas = Image.new("RGBA", (SIZE * SS, SIZE * SS), (*bg_rgb, 255))
    _place(draw, canvas, rng, size_range)
    return _downsample(canvas)


def render(shape, color, bg, rng, size="any", pattern="plain", color2=None):
    """One pretraining image: a `color` `shape` on a plain `bg` background, plain or with a `pattern` whose other
    color is `color2`. size: "small", "large" or "any"."""
    lo, hi = (SIZES["small"][0], SIZES["large"][1]) if size == "any" else SIZES[size]
    fill = _jitter(COLORS[color], rng)
    if pattern == "plain":
        draw = lambda pen: draw_shape(pen, shape, fill)
    else:
        other = _jitter(SECOND_COLORS[color2], rng)
        draw = lambda pen: pen.pattern(lambda m: draw_shape(m, shape, (0, 0, 0, 255)),
                                       lambda m: paint_pattern(m, pattern, fill, other, rng))
    return _compose(draw, _jitter(BACKGROUNDS[bg], rng, 10), rng, (lo, hi))


def render_concept(name, rng, bg=None):
    """One image of concept `name` with random pose, scale and (unless given) background."""
    draw, avoid = CONCEPTS[name]
    if bg is None:
        bgs = [b for b in BACKGROUNDS if b not in avoid]
        bg = bgs[rng.integers(len(bgs))]
    return _compose(draw, _jitter(BACKGROUNDS[bg], rng, 10), rng, SIZES["large"])  # parts stay >= 2 latent px


def describe(shape, color, size="any", pattern="plain", color2=None):
    """The object's words: "red star", "small red and white checkered heart"."""
    obj = f"{color} {shape}" if pattern == "plain" else f"{color} and {color2} {pattern} {shape}"
    return obj if size == "any" else f"{size} {obj}"


def caption(shape, color, bg, size, rng, pattern="plain", color2=None):
    return PHRASES[rng.integers(len(PHRASES))].format(obj=describe(shape, color, size, pattern, color2), bg=bg)


def sample_labels(rng, held_out=False):
    """A random (shape, color, bg) triple: outside HELD_OUT (pretraining) or inside it (evaluation)."""
    if held_out:
        return HELD_OUT[rng.integers(len(HELD_OUT))]
    while True:
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        bgs = [b for b in BACKGROUNDS if b != color]
        bg = bgs[rng.integers(len(bgs))]
        if (shape, color, bg) not in _HELD:
            return shape, color, bg


def sample_pattern(shape, color, rng):
    """A (pattern, second color) for a pretraining object, never one of the LOOKALIKES."""
    while True:
        pattern = PATTERNS[rng.choice(len(PATTERNS), p=PATTERN_P)]
        if pattern == "plain":
            return pattern, None
        seconds = [c for c in SECOND_COLORS if c != color]
        color2 = seconds[rng.integers(len(seconds))]
        if (shape, pattern, frozenset({color, color2})) not in LOOKALIKES:
            return pattern, color2


def sample_caption_batch(n, rng):
    """n pretraining pairs: (images uint8 [n,64,64,3], captions list[str],
    labels list[(shape, color, bg, pattern, color2)], color2 "" when plain)."""
    images, captions, labels = [], [], []
    for _ in range(n):
        shape, color, bg = sample_labels(rng)
        pattern, color2 = sample_pattern(shape, color, rng)
        size = ["any", "small", "large"][rng.choice(3, p=[0.6, 0.2, 0.2])]
        images.append(render(shape, color, bg, rng, size, pattern, color2))
        captions.append(caption(shape, color, bg, size, rng, pattern, color2))
        labels.append((shape, color, bg, pattern, color2 or ""))
    return np.stack(images), captions, labels


def write_examples(root="examples/concepts", n=6, seed=0):
    """n training PNGs per concept, from fixed seeds."""
    for i, name in enumerate(CONCEPTS):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        rng = np.random.default_rng([seed, i])
        for k in range(n):
            Image.fromarray(render_concept(name, rng)).save(os.path.join(root, name, f"{k:02d}.png"), optimize=True)


if __name__ == "__main__":
    if "--write-examples" in sys.argv:
        write_examples()
    else:
        print(__doc__)
