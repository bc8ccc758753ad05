"""The built-in dataset: procedural image-caption pairs with labels, the zero-download demo of every
script.

    python builtin.py --sheet docs/builtin_sheet.png     # contact sheet (level "easy", 32 px: the
                                                         default)
    python builtin.py --bench                            # decode + augment images/s, draft mode vs
                                                         naive decode

Builtin(split, size, image_size, seed, level, label) is a map-style source like data.py's real ones:
it yields dict(image=PIL RGB, caption=str, label=int, box=...), so data.PairedDataset /
LabelledDataset take it as they take a CSV or a folder. Why it looks the way it does (and how its
captions and levels were chosen): docs/data.md.
"""

import argparse
import bisect
import io
import math
import random
import textwrap
import time
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data import CC12M_MEAN, CC12M_STD, EvalTransform, PretrainTransform, load_image

# Per-channel pixel mean/std of Builtin("pretrain", 5000, 64, seed=0, level="hard"), measured with
# image_mean_std(). The "easy" level's are within 0.025 of them (0.507/0.500/0.491,
# 0.254/0.242/0.249), so one normalisation serves both; tests/test_builtin.py recomputes both from a
# few hundred samples.
BUILTIN_MEAN, BUILTIN_STD = (0.4989, 0.5008, 0.4970), (0.2633, 0.2617, 0.2629)

# -----------------------------------------------------------------------------
# the built-in dataset: small shapes on cluttered backgrounds, captions that name them
#
# Why this design: at small scale MAE beats M3AE on an easy dataset (an independent miniature
# reference, in docs/reference.md): when pixels alone separate the classes, the text adds nothing.
# Here the label (the main object's shape) covers ~2% of the pixels (1-4%), while textured,
# high-contrast, noisy backgrounds carry most of the pixel variance, so a pixel-reconstruction loss
# spends its capacity on the background; distractor shapes make "which shape is there" ambiguous
# without knowing which one matters. The caption names the main object (shape ~80% of the time,
# colour, size, position, distractor count, background), so predicting masked words forces the
# encoder to find and describe that object. All sizes scale with image_size.

# Shapes in unit coordinates (y up, inside the unit disc): a list of (fill, polygon) drawn in order;
# fill 0 cuts a hole (ring, crescent).
def _ngon(n, r=1.0, start_deg=90.0, cx=0.0, cy=0.0):
    a = np.deg2rad(start_deg) + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _star(points=5, outer=1.0, inner=0.42):
    p = _ngon(2 * points, 1.0)
    return p * np.where(np.arange(2 * points) % 2 == 0, outer, inner)[:, None]


def _heart():
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y + 2.5], axis=1) / 17.0


SHAPES = {
    "circle": [(255, _ngon(40, 0.95))],
    "square": [(255, np.array([[-0.75, -0.75], [0.75, -0.75], [0.75, 0.75], [-0.75, 0.75]]))],
    "triangle": [(255, _ngon(3, 1.0, cy=-0.15))],
    "star": [(255, _star())],
    "cross": [(255, np.array([[-0.3, 0.95], [0.3, 0.95], [0.3, 0.3], [0.95, 0.3], [0.95, -0.3],
                              [0.3, -0.3], [0.3, -0.95], [-0.3, -0.95], [-0.3, -0.3], [-0.95, -0.3],
                              [-0.95, 0.3], [-0.3, 0.3]]))],
    "heart": [(255, _heart())],
    "diamond": [(255, np.array([[0.0, 1.0], [0.55, 0.0], [0.0, -1.0], [-0.55, 0.0]]))],
    "ring": [(255, _ngon(40, 0.95)), (0, _ngon(40, 0.55))],
    "arrow": [(255, np.array([[-1.0, -0.2], [0.15, -0.2], [0.15, -0.6], [1.0, 0.0], [0.15, 0.6],
                              [0.15, 0.2], [-1.0, 0.2]]))],
    "crescent": [(255, _ngon(40, 0.95)), (0, _ngon(40, 0.8, cx=0.42, cy=0.2))],
    # held out (OOD): never drawn in the pretrain/train/test splits, not even as distractors
    "bolt": [(255, np.array([[-0.3, 1.0], [0.5, 1.0], [0.1, 0.25], [0.6, 0.25], [-0.45, -1.0],
                             [-0.1, -0.15], [-0.6, -0.15]]))],
    "chevron": [(255, np.array([[-1.0, 0.1], [0.0, -0.75], [1.0, 0.1], [1.0, 0.65], [0.0, -0.2],
                                [-1.0, 0.65]]))],
    "hourglass": [(255, np.array([[-0.75, 1.0], [0.75, 1.0], [0.1, 0.0], [0.75, -1.0],
                                  [-0.75, -1.0], [-0.1, 0.0]]))],
}

_SHAPES_COMPLEX = {k: [(fill, p[:, 0] + 1j * p[:, 1]) for fill, p in polys]
                   for k, polys in SHAPES.items()}

SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"], "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangular shape"], "star": ["star", "five-pointed star"],
    "cross": ["cross", "plus sign", "plus"], "heart": ["heart", "heart shape"],
    "diamond": ["diamond", "rhombus", "lozenge"], "ring": ["ring", "hoop", "donut"],
    "arrow": ["arrow"], "crescent": ["crescent", "crescent moon", "moon"],
    "chevron": ["chevron", "v shape"], "hourglass": ["hourglass", "bow tie"],
    "bolt": ["lightning bolt", "bolt", "zigzag"],
}
GENERIC_WORDS = ["shape", "object", "thing", "figure"]
# colour name -> (synonyms, RGB in [0, 1])
COLOURS = {
    "red": (["red", "crimson", "scarlet"], (0.86, 0.12, 0.12)),
    "orange": (["orange", "amber"], (0.96, 0.51, 0.08)),
    "yellow": (["yellow", "golden"], (0.96, 0.86, 0.12)),
    "green": (["green", "emerald"], (0.16, 0.67, 0.24)),
    "blue": (["blue", "cobalt"], (0.12, 0.27, 0.86)),
    "purple": (["purple", "violet"], (0.51, 0.2, 0.71)),
    "pink": (["pink", "rose"], (0.96, 0.43, 0.71)),
    "cyan": (["cyan", "turquoise"], (0.12, 0.78, 0.82)),
    "white": (["white", "ivory"], (0.96, 0.96, 0.96)),
    "black": (["black", "dark"], (0.08, 0.08, 0.08)),
    "brown": (["brown", "chocolate"], (0.47, 0.27, 0.12)),
}
_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c][1] for c in _COLOUR_NAMES], dtype=np.float32)  # (11, 3)
_COLOUR_RGB255 = [tuple(int(255 * v + 0.5) for v in COLOURS[c][1]) for c in _COLOUR_NAMES]
BACKGROUNDS = {  # kind -> (prepositional phrases, noun phrases)
    "striped": (["on a striped background", "against stripes", "over a stripy pattern"],
                ["a striped background", "stripes", "a stripy pattern"]),
    "checkered": (["on a checkered background", "on a chequerboard", "against a checked pattern"],
                  ["a checkered background", "a chequerboard", "a checked pattern"]),
    "spotted": (["on a spotted background", "against blotches", "on a blotchy backdrop"],
                ["a spotted background", "blotches", "a blotchy backdrop"]),
    "gradient": (["on a gradient", "against a smooth gradient", "over a fading backdrop"],
                 ["a gradient", "a smooth gradient", "a fading backdrop"]),
    "mottled": (["on a mottled background", "against a cloudy texture", "over a mottled pattern"],
                ["a mottled background", "a cloudy texture", "a mottled pattern"]),
    "scribbled": (["on a scribbled background", "among random lines", "over a tangle of lines"],
                  ["a scribbled background", "random lines", "a tangle of lines"]),
}
SIZE_PHRASES = {"small": ["small", "tiny", "of small size"],
                "medium": ["medium-sized", "mid-sized", "of medium size"],
                "large": ["large", "big", "of large size"]}
NUMBER_WORDS = ["no", "one", "two", "three", "four"]
ARROW_DIRECTIONS = ["right", "up", "left", "down"]  # rotation 0, 90, 180, 270 degrees

# Difficulty levels: geometry as fractions of image_size, counts, noise and which backgrounds are
# drawn. "hard" is the task described above (at 64 px: main object 11-17 px, distractors 5-9 px).
# Measured on the 2-core dev box (docs/log.md), a tiny ViT trained *with labels* stays at chance on
# it for 300 steps, so no self-supervised encoder learns it in the minutes a default run has. "easy"
# keeps everything a caption describes (shape, colour, size, position, distractors, background) but
# makes the object large (45-65% of the side), draws fewer distractors, little noise and only the
# smooth backgrounds: learnable in minutes, while colour and background still carry most of the
# pixel variance. Captions and labels are drawn the same way.
LEVELS = {
    "easy": dict(main_size=(0.45, 0.65), distractor_size=(0.08, 0.14),
                 distractor_opacity=(0.45, 0.85), distractor_count_cdf=(0.5, 0.9, 1.0, 1.0),
                 noise_sigma=(0.0, 0.03), backgrounds=("gradient", "mottled")),
    "hard": dict(main_size=(0.17, 0.27), distractor_size=(0.08, 0.14),
                 distractor_opacity=(0.45, 0.85),
                 # P(n distractors <= 0, 1, 2, 3); at most 4
                 distractor_count_cdf=(0.1, 0.3, 0.55, 0.8),
                 noise_sigma=(0.02, 0.09),  # gaussian pixel noise, in [0, 1] units
                 backgrounds=tuple(BACKGROUNDS)),
}
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


class _Rng:
    """Scalar draws from Python's random.Random, through .random() only: that stream is guaranteed
    to stay the same across Python versions (the other methods are not), and a scalar draw costs
    ~0.2 us against ~2 us for numpy's Generator; a scene takes ~60 of them."""

    def __init__(self, key):
        self.random = random.Random(key).random

    def uniform(self, a, b):
        return a + (b - a) * self.random()

    def integer(self, n):
        return min(int(self.random() * n), n - 1)

    def pick(self, options):
        return options[self.integer(len(options))]

    def rgb(self):
        return self.random(), self.random(), self.random()


def _position_phrases(row, col):
    """Phrases for a 3x3 grid cell; row, col in 0..2 (top/left first)."""
    r = [["top", "upper"], None, ["bottom", "lower"]][row]
    c = [["left"], None, ["right"]][col]
    if r is None and c is None:
        return ["in the centre", "in the middle", "at the center"]
    if r is None:
        return [f"on the {c[0]}", f"at the {c[0]} side", f"to the {c[0]}"]
    if c is None:
        return [f"at the {r[0]}", f"near the {r[-1]} edge", f"at the {r[-1]} middle"]
    return [f"in the {r[0]} {c[0]}", f"near the {r[-1]} {c[0]} corner", f"at the {r[0]} {c[0]}"]


# how often each part of a caption is there (see _caption)
CAPTION_PARTS = dict(background_only=0.03, generic_noun=0.15, colour=0.9, size=0.3, position=0.2,
                     count=0.1, background=0.1)


def _caption(rng, s):
    """A compositional caption for scene s: "<colour> <shape>" first, then optional parts in varied
    order and punctuation (CAPTION_PARTS: size 30%, position 20%, distractor count 10%, background
    10%), synonyms for every word; incomplete on purpose: 10% omit the colour, 15% name no shape (a
    generic noun instead), 3% describe only the background.

    Why the colour comes first and the caption is short (measured on the 2-core dev box,
    docs/log.md): with 75% of the text slots masked, the decoder can only use the image for a masked
    word once it knows which kind of word the slot holds, and with ~2 visible words per caption the
    slot's position is most of that evidence. Earlier captions (eight clause templates, every part
    50-85% of the time, the colour anywhere in the first five words) gave a 1000-step M3AE a text
    loss no lower beside its own image than beside another sample's (2.268 vs 2.269): a language
    model of the captions that never looked at the image, so the text could not shape the image
    features. With the colour's slot fixed, the text starts to read the image within ~600 steps."""
    k = s["n_distractors"]
    bg_pp, bg_np = BACKGROUNDS[s["background"]]
    p = CAPTION_PARTS
    if rng.random() < p["background_only"]:
        return rng.pick(["{}", "{} with some clutter", "just {}"]).format(rng.pick(bg_np))
    if rng.random() < p["generic_noun"]:
        noun = rng.pick(GENERIC_WORDS)
    else:
        noun = rng.pick(SHAPE_WORDS[s["shape"]])
        if s["shape"] == "arrow" and rng.random() < 0.5:
            noun += f" pointing {ARROW_DIRECTIONS[s['direction']]}"
    obj = f"{rng.pick(COLOURS[s['colour']][0])} {noun}" if rng.random() < p["colour"] else noun
    if rng.random() < p["size"]:
        obj += ", " + rng.pick(SIZE_PHRASES[s["size_word"]])
    extras = []
    if rng.random() < p["position"]:
        extras.append(rng.pick(_position_phrases(*s["cell"])))
    if rng.random() < p["count"]:
        extras.append(rng.pick(["alone", "on its own"]) if k == 0 else
                      rng.pick([f"and {NUMBER_WORDS[k]} faint {'shape' if k == 1 else 'shapes'}",
                                f"with {NUMBER_WORDS[k]} other {'shape' if k == 1 else 'shapes'}"]))
    if rng.random() < p["background"]:
        extras.append(rng.pick(bg_pp))
    if len(extras) > 1 and rng.random() < 0.5:
        extras.reverse()
    return ", ".join([obj] + extras) if rng.random() < 0.5 else " ".join([obj] + extras)


def _draw_scene(rng, classes, distractor_classes, image_size, lv):
    """Everything a caption can mention, drawn before rendering (so captions() need not render). lv:
    a LEVELS entry."""
    W = image_size
    shape = rng.integer(len(classes))
    # the object's size within the level's range: its thirds are small/medium/large
    u_size = rng.random()
    size = (lv["main_size"][0] + (lv["main_size"][1] - lv["main_size"][0]) * u_size) * W
    r = size / 2
    cx, cy = rng.uniform(r + 1, W - r - 1), rng.uniform(r + 1, W - r - 1)
    direction = rng.integer(4)
    # arrows point one of 4 ways (named in captions); other shapes tilt by up to 40 degrees
    angle = (direction * 90 + rng.uniform(-20, 20) if classes[shape] == "arrow"
             else rng.uniform(-40, 40))
    background = rng.pick(lv["backgrounds"])
    bg_colours = rng.rgb(), rng.rgb()
    # the main object's colour contrasts with both background colours (else it is invisible to
    # anyone)
    # (11,)
    dist = np.linalg.norm(_COLOUR_RGB[:, None] - np.array(bg_colours)[None], axis=2).min(axis=1)
    eligible = np.flatnonzero(dist > 0.4)
    colour = int(eligible[rng.integer(len(eligible))]) if len(eligible) else int(dist.argmax())
    others = [c for c in distractor_classes if c != classes[shape]]
    n = bisect.bisect(lv["distractor_count_cdf"], rng.random())
    distractors = []
    for _ in range(n):
        ds = rng.uniform(*lv["distractor_size"]) * W
        lo, hi = ds / 2 + 1, W - ds / 2 - 1
        distractors.append(dict(shape=rng.pick(others), size=ds, angle=rng.uniform(0, 360),
                                centre=(rng.uniform(lo, hi), rng.uniform(lo, hi)),
                                rgb=_COLOUR_RGB255[rng.integer(len(_COLOUR_RGB255))],
                                opacity=rng.uniform(*lv["distractor_opacity"])))
    size_word = ("small", "medium", "large")[min(int(3 * u_size), 2)]
    s = dict(label=shape, shape=classes[shape], size=size, size_word=size_word, centre=(cx, cy),
             angle=angle, direction=direction, colour=_COLOUR_NAMES[colour],
             cell=(min(int(3 * cy / W), 2), min(int(3 * cx / W), 2)), background=background,
             bg_colours=bg_colours, n_distractors=n, distractors=distractors,
             noise=rng.uniform(*lv["noise_sigma"]))
    return s


# Rendering: a background is one (W, W) pattern in [0, 1] that blends its two colours
# (Image.composite), shapes are pasted through anti-aliased masks (Image.paste), and the noise is
# added once in numpy: each step is a C call on a whole image or mask (~1,500 images/s on one core
# of the 2-core dev box at 64 px).


@lru_cache(maxsize=8)
def _grid(W):
    yy, xx = np.mgrid[0:W, 0:W].astype(np.float32)
    return yy, xx


@lru_cache(maxsize=8)
def _noise_bank(W):
    """A fixed field of N(0, 1) noise, 4x the image side: each image takes a random window of it
    (drawing fresh normals per image would cost more than the rest of the rendering)."""
    side = max(4 * W, 256)
    return np.random.default_rng(12345).standard_normal((side, side, 3), dtype=np.float32)


def _rgb255(c):
    return tuple(int(255 * min(max(v, 0.0), 1.0) + 0.5) for v in c)


def _mix(c1, c2, t):
    return tuple(a + (b - a) * t for a, b in zip(c1, c2))


def _background(rng, s, W):
    """PIL RGB (W, W): one of six textures in the scene's two colours c1, c2."""
    c1, c2 = s["bg_colours"]
    u = W / 64  # pixel constants below are for 64 px images
    kind = s["background"]
    if kind in ("striped", "checkered", "gradient"):
        yy, xx = _grid(W)
        a = rng.uniform(0, math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)  # (W, W) coordinate across the pattern
        if kind == "striped":
            w = np.sin(t * (2 * math.pi / (rng.uniform(4, 12) * u)) + rng.uniform(0, 2 * math.pi))
            w = np.clip(w * (rng.uniform(1, 4) * 0.5) + 0.5, 0, 1)  # from soft sine to hard stripes
        elif kind == "checkered":
            cell = rng.uniform(4, 11) * u
            v = yy * math.cos(a) - xx * math.sin(a)
            w = (np.floor(t / cell) + np.floor(v / cell)) % 2
        else:
            w = (t - t.min()) / (t.max() - t.min())
        return _blend(c1, c2, Image.fromarray((w * 255 + 0.5).astype(np.uint8)))
    if kind == "spotted":  # soft blotches: ellipses on a 16 px canvas, upsampled
        img = Image.new("RGB", (16, 16), _rgb255(c1))
        draw = ImageDraw.Draw(img)
        for _ in range(5 + rng.integer(7)):
            x, y, w, h = (rng.uniform(-2, 16), rng.uniform(-2, 16), rng.uniform(2, 7),
                          rng.uniform(2, 7))
            mix = _mix(c1, c2, rng.uniform(0.5, 1.0))
            draw.ellipse((x, y, x + w, y + h),
                         fill=_rgb255(v + rng.uniform(-0.15, 0.15) for v in mix))
        return img.resize((W, W), Image.BILINEAR)
    if kind == "mottled":  # a coarse random grid of colours between c1 and c2, upsampled (cloudy)
        k = 3 + rng.integer(5)
        u = np.array([rng.random() for _ in range(4 * k * k)], dtype=np.float32).reshape(k, k, 4)
        c1, c2 = np.array(c1, dtype=np.float32), np.array(c2, dtype=np.float32)
        coarse = c1 + (c2 - c1) * u[:, :, :1] + 0.2 * u[:, :, 1:] - 0.1  # (k, k, 3): mix + jitter
        return Image.fromarray((np.clip(coarse, 0, 1) * 255 + 0.5).astype(np.uint8)).resize(
            (W, W), Image.BICUBIC)
    # scribbled: random lines of random colours over a vertical gradient
    img = _blend(c1, c2, _vertical_ramp(W))
    draw = ImageDraw.Draw(img)
    for _ in range(10 + rng.integer(15)):
        x0, y0, x1, y1 = (rng.uniform(-8 * u, W + 8 * u) for _ in range(4))
        draw.line((x0, y0, x1, y1), fill=_rgb255(rng.rgb()),
                  width=max(1, round(rng.uniform(1, 2.5) * u)))
    return img


def _blend(c1, c2, pattern):
    """PIL RGB: colour c1 where the 'L' image pattern is 0, c2 where it is 255, linear in
    between."""
    return Image.composite(Image.new("RGB", pattern.size, _rgb255(c2)),
                           Image.new("RGB", pattern.size, _rgb255(c1)), pattern)


@lru_cache(maxsize=8)
def _vertical_ramp(W):
    return Image.fromarray(
        np.repeat(np.linspace(0, 255, W, dtype=np.float32)[:, None], W, 1).astype(np.uint8))


def _draw_shape(img, shape, size, angle, centre, rgb, opacity):
    """Paste one anti-aliased shape into the PIL image img, in place. size: diameter in pixels; rgb:
    0-255."""
    r = size / 2
    cx, cy = centre
    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
    x1, y1 = min(math.ceil(cx + r) + 1, img.width), min(math.ceil(cy + r) + 1, img.height)
    S = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * S, (y1 - y0) * S))
    draw = ImageDraw.Draw(canvas)
    # points as complex numbers: one multiply rotates and scales, conj flips y (shapes are y-up,
    # images y-down), one add moves into the canvas; viewed as floats they are the flat x, y list
    # PIL wants
    turn = complex(math.cos(math.radians(angle)), math.sin(math.radians(angle))) * (r * S)
    offset = complex((cx - x0) * S, (cy - y0) * S)
    for fill, z in _SHAPES_COMPLEX[shape]:
        draw.polygon((np.conj(z * turn) + offset).view(np.float64).tolist(),
                     fill=round(fill * opacity))
    img.paste(rgb, (x0, y0), canvas.reduce(S))  # the box-filtered mask: coverage x opacity


def _render(rng, s, W):
    img = _background(rng, s, W)
    for d in s["distractors"]:  # first, so that the main object is never occluded
        _draw_shape(img, d["shape"], d["size"], d["angle"], d["centre"], d["rgb"], d["opacity"])
    _draw_shape(img, s["shape"], s["size"], s["angle"], s["centre"],
                _COLOUR_RGB255[_COLOUR_NAMES.index(s["colour"])], 1.0)
    bank = _noise_bank(W)
    oy, ox = rng.integer(len(bank) - W), rng.integer(len(bank) - W)
    # (W, W, 3)
    a = np.asarray(img, dtype=np.float32) + bank[oy : oy + W, ox : ox + W] * (255 * s["noise"])
    return Image.fromarray((np.clip(a, 0, 255) + 0.5).astype(np.uint8))


class Builtin(torch.utils.data.Dataset):
    """Procedural image-caption pairs with labels (no downloads). Sample i is a pure function of
    (seed, split, i): one random.Random seeded with a key unique to (seed, split id, i), so splits
    never share samples and any sample can be drawn alone.

    One main object of random shape, colour, size, tilt and position, smaller, fainter distractors
    of other in-distribution shapes, a textured background, gaussian noise; `level` ("easy" or
    "hard", see LEVELS) sets sizes, counts, noise and which backgrounds. OOD_CLASSES never appear in
    the other splits, not even as distractors. Returns dict(image=PIL RGB (image_size square),
    caption=str, label=int, box=(x0, y0, x1, y1) of the main object in pixels).

    `label` picks what the label is, an index into self.classes: "shape" (default), the main
    object's shape (CLASSES; for split "ood", OOD_CLASSES), or "colour", the main object's colour
    (COLOURS' keys, every split). Both are named by most captions; neither changes the images or
    captions.
    """

    CLASSES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring", "arrow",
               "crescent"]
    OOD_CLASSES = ["chevron", "hourglass", "bolt"]
    # id, size
    SPLITS = {"pretrain": (0, 20000), "train": (1, 5000), "test": (2, 2000), "ood": (3, 2000)}

    LABELS = ("shape", "colour")

    def __init__(self, split, size=None, image_size=64, seed=0, level="easy", label="shape"):
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {list(self.SPLITS)}")
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; choose from {list(LEVELS)}")
        self.split, self.image_size, self.seed, self.level = split, image_size, seed, level
        self.split_id, default_size = self.SPLITS[split]
        self.size = default_size if size is None else size
        self.shapes = self.OOD_CLASSES if split == "ood" else self.CLASSES
        self.label = label
        self.classes = self.label_classes(label)

    def label_classes(self, label):
        """The class names of `label` ("shape" or "colour") in this split."""
        if label not in self.LABELS:
            raise ValueError(f"unknown label {label!r}; choose from {list(self.LABELS)}")
        return self.shapes if label == "shape" else _COLOUR_NAMES

    def _label_of(self, s, label):
        return s["label"] if label == "shape" else _COLOUR_NAMES.index(s["colour"])

    def __len__(self):
        return self.size

    def _scene(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        key = (self.seed << 44) + (self.split_id << 40) + i  # distinct for every (seed, split, i)
        rng = _Rng(key)
        s = _draw_scene(rng, self.shapes, self.CLASSES, self.image_size, LEVELS[self.level])
        # its own stream: the grammar can change, images stay
        s["caption"] = _caption(_Rng(f"caption {key}"), s)
        return rng, s

    def __getitem__(self, i):
        rng, s = self._scene(i)
        (cx, cy), r = s["centre"], s["size"] / 2
        return dict(image=_render(rng, s, self.image_size), caption=s["caption"],
                    label=self._label_of(s, self.label), box=(cx - r, cy - r, cx + r, cy + r))

    def labels(self, label=None):
        """Every label of the split for `label` ("shape" or "colour"; default self.label), without
        rendering."""
        label = label or self.label
        self.label_classes(label)  # checks the name
        return [self._label_of(self._scene(i)[1], label) for i in range(self.size)]

    def captions(self):
        """Every caption of the split, without rendering (fast: the tokenizer's corpus)."""
        for i in range(self.size):
            yield self._scene(i)[1]["caption"]


def image_mean_std(images):
    """Per-channel mean and std over all pixels of an iterable of PIL RGB images, in [0, 1]."""
    total, total_sq, n = np.zeros(3), np.zeros(3), 0
    for im in images:
        a = np.asarray(im, dtype=np.float64).reshape(-1, 3) / 255
        total += a.sum(0)
        total_sq += (a * a).sum(0)
        n += len(a)
    mean = total / n
    return tuple(mean.tolist()), tuple(np.sqrt(total_sq / n - mean**2).tolist())


# -----------------------------------------------------------------------------
# CLI: contact sheet and benchmark


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def contact_sheet(path, seed=0, image_size=64, scale=3, cols=4, rows=4, n_ood=4, level="easy"):
    """A PNG of rows x cols pretraining samples with their captions and labels, then a row of OOD
    samples."""
    font, bold = _font(13), _font(15)
    cell_w = image_size * scale + 24
    lines = 5
    cell_h = image_size * scale + 22 + 16 * lines
    title_h = 34
    sheet = Image.new("RGB", (cols * cell_w + 8, title_h + (rows + 1) * cell_h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), f"Builtin dataset, level {level!r} (seed {seed}, {image_size} px, shown "
                       f"x{scale}): caption below, probe labels in blue", font=bold, fill="black")

    def cell(x, y, sample, shape, colour):
        sheet.paste(sample["image"].resize((image_size * scale,) * 2, Image.NEAREST), (x, y))
        draw.text((x, y + image_size * scale + 2), f"{shape} / {colour}", font=font,
                  fill=(20, 60, 200))
        wrapped = textwrap.wrap(sample["caption"], width=max(10, int(cell_w / 7.2)))[:lines]
        for k, text in enumerate(wrapped):
            draw.text((x, y + image_size * scale + 18 + 16 * k), text, font=font, fill="black")

    pre = Builtin("pretrain", rows * cols, image_size=image_size, seed=seed, level=level)
    colours = [_COLOUR_NAMES[c] for c in pre.labels("colour")]
    for n in range(rows * cols):
        sample = pre[n]
        cell(8 + (n % cols) * cell_w, title_h + (n // cols) * cell_h, sample,
             Builtin.CLASSES[sample["label"]], colours[n])
    y = title_h + rows * cell_h
    draw.text((10, y),
              "out-of-distribution split (held-out shapes, never drawn in the other splits):",
              font=bold, fill=(160, 30, 30))
    ood = Builtin("ood", min(n_ood, cols), image_size=image_size, seed=seed, level=level)
    colours = [_COLOUR_NAMES[c] for c in ood.labels("colour")]
    for n in range(len(ood)):
        sample = ood[n]
        cell(8 + n * cell_w, y + 24, sample, Builtin.OOD_CLASSES[sample["label"]], colours[n])
    # 256 colours keep the PNG small (< 300 KB); the noise makes a true-colour PNG several times
    # larger
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT,
                   dither=Image.Dither.NONE).save(path, optimize=True)
    return sheet


def _photo_jpeg(width, height, seed):
    """A photo-like JPEG (smooth colour field, edges, grain), quality 90: about 2 bits per pixel,
    like web photos."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        draw.ellipse((x, y, x + rng.uniform(10, width / 4), y + rng.uniform(10, height / 4)),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    a = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def bench(seconds=1.5):
    """Images/s in one process (one DataLoader worker's view), torch on one thread."""
    torch.set_num_threads(1)

    def rate(fn, items):
        fn(items[0])  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(items[n % len(items)])
            n += 1
        return n / (time.perf_counter() - t0)

    print(f"builtin.py bench: one process, torch threads 1, Pillow {Image.__version__}, torch "
          f"{torch.__version__}")
    for w, h in ((500, 375), (1600, 1200)):
        jpegs = [_photo_jpeg(w, h, s) for s in range(4)]
        for target in (256, 64):
            t = PretrainTransform(target, CC12M_MEAN, CC12M_STD)
            ours = rate(lambda b: t(load_image(b, target)), jpegs)
            naive = rate(lambda b: t(Image.open(io.BytesIO(b)).convert("RGB")), jpegs)
            print(f"  JPEG {w}x{h} ({sum(map(len, jpegs)) // len(jpegs) // 1000} KB) -> "
                  f"{target:>3} px: load_image (draft + reduce) + RandomResizedCrop/flip "
                  f"{ours:5.0f} img/s | naive full decode + same crop {naive:5.0f} img/s | "
                  f"x{ours / naive:.1f}")
    for size in (64,):
        gen = Builtin("pretrain", image_size=size)
        r = rate(lambda i: gen[i], list(range(10_000)))
        t = EvalTransform(size, BUILTIN_MEAN, BUILTIN_STD, crop_pct=1.0)
        r2 = rate(lambda i: t(gen[i]["image"]), list(range(10_000)))
        print(f"  Builtin generation at {size} px: {r:7.0f} img/s (with normalise to tensor: "
              f"{r2:.0f} img/s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet of the built-in dataset")
    p.add_argument("--level", default="easy", choices=list(LEVELS),
                   help="--sheet: the built-in difficulty")
    p.add_argument("--image-size", type=int, default=32,
                   help="--sheet: image side (the tiny preset's: 32)")
    p.add_argument("--scale", type=int, default=6,
                   help="--sheet: nearest-neighbour upscaling for legibility")
    p.add_argument("--bench", action="store_true",
                   help="decode + augment throughput, draft mode vs naive")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.sheet or args.bench):
        p.error("give --sheet PNG and/or --bench")
    if args.sheet:
        contact_sheet(args.sheet, seed=args.seed, image_size=args.image_size, scale=args.scale,
                      level=args.level)
        print(f"wrote {args.sheet}")
    if args.bench:
        bench()


if __name__ == "__main__":
    main()
