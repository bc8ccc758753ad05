"""Data for M3AE: everything between files on disk and the tensors model.py eats.

    python data.py --sheet out.png     # contact sheet of the built-in dataset (also written to docs/)
    python data.py --bench             # decode + augment images/s per worker, draft mode vs naive decode

Conventions (model.py's, restated):
  * images (3, H, W) float32, normalised with the dataset's mean/std (BUILTIN_* or CC12M_*).
  * text (T,) int64 sentencepiece ids, pad id 0 (PAD_ID), unk id 1, no special tokens; text_padding_mask
    (T,) bool, True = padding.
  * a pretraining sample is a dict: image, text, text_padding_mask, has_image, has_text (0-d bool tensors).
    Image-only: text all PAD, mask all True, has_text False. Text-only: image all zeros, has_image False.
  * a labelled sample (probe, OOD) is dict(image, label (0-d int64)).

Bad input never raises out of a dataset. A sample that cannot be used comes back as a dict with a "skip"
key naming the reason (plus zero placeholders of the right shapes, so that a batch of nothing but skips
still has 0-row tensors); `collate` drops it and counts it. Reasons: missing, unreadable, empty_file,
corrupt (truncated, undecodable, not an image), too_large (decompression bomb), empty_caption (a text-only
sample with nothing to read). Inputs that can be repaired are converted and counted as "converted:<what>":
cmyk, greyscale, high_bit_depth, palette, alpha (composited on white), other_mode, non_utf8 (caption bytes
decoded with U+FFFD replacement), empty_caption (a pair whose caption is empty becomes image-only).

Sources (map-style: dict(image=path | bytes | PIL, caption=str | bytes | None[, label])):
  Builtin (procedural, the default), CsvPairs, ImageFolder, ImageOnlyFolder, TextLines; and a stream,
  WebDatasetShards (img2dataset .tar shards, split over DDP ranks and DataLoader workers).
PairedDataset / LabelledDataset turn a source into model-ready samples.
"""

import argparse
import bisect
import csv
import glob
import io
import itertools
import json
import math
import os
import posixpath
import random
import re
import tarfile
import textwrap
import time
import warnings
import zlib
from collections import Counter
from functools import lru_cache

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageDraw, ImageFont

PAD_ID, UNK_ID = 0, 1
# Official (m3ae_public) CC12M statistics, for real web data.
CC12M_MEAN, CC12M_STD = (0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)
# Per-channel pixel mean/std of Builtin("pretrain", 5000, 64, seed=0, level="hard"), measured with
# image_mean_std(). The "easy" level's are within 0.025 of them (0.507/0.500/0.491, 0.254/0.242/0.249), so one
# normalisation serves both; tests/test_data.py recomputes both from a few hundred samples.
BUILTIN_MEAN, BUILTIN_STD = (0.4989, 0.5008, 0.4970), (0.2633, 0.2617, 0.2629)
# Largest image decoded (pixels); PIL's own bomb limit (Image.MAX_IMAGE_PIXELS) also applies.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
MAX_TOKENIZER_CAPTIONS = 2_000_000  # a tokenizer is trained on at most the first 2M captions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PAIRED, IMAGE_ONLY, TEXT_ONLY = 0, 1, 2  # sample roles (paired_share_roles)


# -----------------------------------------------------------------------------
# tokenizer


def caption_text(caption, notes=None):
    """A caption as str. bytes are decoded as UTF-8; invalid bytes become U+FFFD and "non_utf8" is appended
    to `notes` (a list) when given. None -> ""."""
    if caption is None:
        return ""
    if isinstance(caption, (bytes, bytearray, memoryview)):
        raw = bytes(caption)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if notes is not None:
                notes.append("non_utf8")
            return raw.decode("utf-8", errors="replace")
    return str(caption)


class Tokenizer:
    """sentencepiece BPE, trained on the run's captions: pad id 0, unk id 1, no bos/eos (the official BERT
    tokenizer adds no [CLS]/[SEP] either). Case-folded like bert-base-uncased (nmt_nfkc_cf). BPE, not
    unigram: on the built-in captions (few distinct words, very repetitive) unigram stops at ~180 pieces
    and spells common words letter by letter ("v i o le t"); BPE keeps them whole."""

    def __init__(self, model_file=None, model_proto=None):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto) if model_proto else \
            spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.pad_id() != PAD_ID:
            raise ValueError(f"{model_file}: pad id is {self.sp.pad_id()}, expected {PAD_ID}")

    # DataLoader workers may be spawned: pickle the model bytes, not the C++ object.
    def __getstate__(self):
        return {"proto": self.sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.__init__(model_proto=state["proto"])

    @classmethod
    def train(cls, captions, model_file, vocab_size):
        """Train on an iterable of captions (str or bytes) and save to model_file (written atomically).
        Deterministic: fixed seed and thread count. Uses the first MAX_TOKENIZER_CAPTIONS captions. If the
        corpus cannot fill vocab_size pieces, the vocabulary comes out smaller (sentencepiece's
        hard_vocab_limit=False) and we say so; if vocab_size is below the corpus's character count, it is
        raised to that count (every character needs a piece) and we say so."""
        def sentences():
            for c in captions:
                text = " ".join(caption_text(c).split())  # one line each; newlines inside a caption are spaces
                if text:
                    yield text

        spm.set_random_generator_seed(0)
        options = dict(vocab_size=vocab_size, model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1,
                       eos_id=-1, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc_cf",
                       character_coverage=0.9995, num_threads=4, minloglevel=2)
        corpus = list(itertools.islice(sentences(), MAX_TOKENIZER_CAPTIONS))
        if not corpus:
            raise ValueError("no non-empty captions to train a tokenizer on")
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto, **options)
        except RuntimeError as e:
            # "Vocabulary size is smaller than required_chars. 50 vs 73.": every character needs a piece
            need = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
            if not need:
                raise
            options["vocab_size"] = int(need.group(1)) + 8
            print(f"tokenizer: vocab_size {vocab_size} is below the corpus's {need.group(1)} characters; "
                  f"training with {options['vocab_size']}")
            proto = io.BytesIO()
            spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto, **options)
        tok = cls(model_proto=proto.getvalue())
        if tok.vocab_size < vocab_size:
            print(f"tokenizer: the corpus supports {tok.vocab_size} pieces, fewer than the {vocab_size} asked for")
        os.makedirs(os.path.dirname(os.path.abspath(model_file)), exist_ok=True)
        tmp = f"{model_file}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(proto.getvalue())
        os.replace(tmp, model_file)
        return tok

    def encode(self, caption, text_len):
        """caption (str, bytes, None) -> ids (text_len,) int64 padded with PAD_ID or truncated, and the
        padding mask (text_len,) bool, True = pad. None, '' or whitespace -> all padding. Characters the
        model cannot encode (emoji, unseen scripts) become UNK_ID."""
        text = caption_text(caption)
        ids = self.sp.encode(text)[:text_len] if text.strip() else []
        out = torch.full((text_len,), PAD_ID, dtype=torch.int64)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        pad = torch.ones(text_len, dtype=torch.bool)
        pad[: len(ids)] = False
        return out, pad

    def decode(self, ids):
        """ids (sequence or tensor) -> str, ignoring PAD_ID."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.sp.decode([int(i) for i in ids if i != PAD_ID])

    def pieces(self, ids):
        """One readable piece per id: '<pad>', '<unk>', or the piece without sentencepiece's word marker
        (a piece that is only the marker stays '\u2581', so every id shows something)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        out = []
        for i in map(int, ids):
            piece = self.sp.id_to_piece(i)
            special = self.sp.is_control(i) or self.sp.is_unknown(i)
            out.append(piece if special else (piece.replace("\u2581", "") or "\u2581"))
        return out


def get_tokenizer(model_file, captions, vocab_size):
    """Load model_file if it exists, else train on captions() (a callable returning an iterable, so that the
    corpus is only read when needed) and save it there."""
    if os.path.exists(model_file):
        return Tokenizer(model_file)
    return Tokenizer.train(captions(), model_file, vocab_size)


# -----------------------------------------------------------------------------
# the built-in dataset: small shapes on cluttered backgrounds, captions that name them
#
# Why this design: at small scale MAE beats M3AE on an easy dataset (../shared/REFERENCE.md, "Measured in
# miniature"): when pixels alone separate the classes, the text adds nothing. Here the label (the main
# object's shape) covers ~2% of the pixels (1-4%), while textured, high-contrast, noisy backgrounds carry most
# of the pixel variance, so a pixel-reconstruction loss spends its capacity on the background; distractor
# shapes make "which shape is there" ambiguous without knowing which one matters. The caption names the
# main object (shape ~80% of the time, colour, size, position, distractor count, background), so predicting
# masked words forces the encoder to find and describe that object. All sizes scale with image_size.

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
    "cross": [(255, np.array([[-0.3, 0.95], [0.3, 0.95], [0.3, 0.3], [0.95, 0.3], [0.95, -0.3], [0.3, -0.3],
                              [0.3, -0.95], [-0.3, -0.95], [-0.3, -0.3], [-0.95, -0.3], [-0.95, 0.3],
                              [-0.3, 0.3]]))],
    "heart": [(255, _heart())],
    "diamond": [(255, np.array([[0.0, 1.0], [0.55, 0.0], [0.0, -1.0], [-0.55, 0.0]]))],
    "ring": [(255, _ngon(40, 0.95)), (0, _ngon(40, 0.55))],
    "arrow": [(255, np.array([[-1.0, -0.2], [0.15, -0.2], [0.15, -0.6], [1.0, 0.0], [0.15, 0.6], [0.15, 0.2],
                              [-1.0, 0.2]]))],
    "crescent": [(255, _ngon(40, 0.95)), (0, _ngon(40, 0.8, cx=0.42, cy=0.2))],
    # held out (OOD): never drawn in the pretrain/train/test splits, not even as distractors
    "bolt": [(255, np.array([[-0.3, 1.0], [0.5, 1.0], [0.1, 0.25], [0.6, 0.25], [-0.45, -1.0], [-0.1, -0.15],
                             [-0.6, -0.15]]))],
    "chevron": [(255, np.array([[-1.0, 0.1], [0.0, -0.75], [1.0, 0.1], [1.0, 0.65], [0.0, -0.2],
                                [-1.0, 0.65]]))],
    "hourglass": [(255, np.array([[-0.75, 1.0], [0.75, 1.0], [0.1, 0.0], [0.75, -1.0], [-0.75, -1.0],
                                  [-0.1, 0.0]]))],
}

_SHAPES_COMPLEX = {k: [(fill, p[:, 0] + 1j * p[:, 1]) for fill, p in polys] for k, polys in SHAPES.items()}

SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"], "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangular shape"], "star": ["star", "five-pointed star"],
    "cross": ["cross", "plus sign", "plus"], "heart": ["heart", "heart shape"],
    "diamond": ["diamond", "rhombus", "lozenge"], "ring": ["ring", "hoop", "donut"], "arrow": ["arrow"],
    "crescent": ["crescent", "crescent moon", "moon"],
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
SIZE_PHRASES = {"small": ["small", "tiny", "of small size"], "medium": ["medium-sized", "mid-sized", "of medium size"],
                "large": ["large", "big", "of large size"]}
NUMBER_WORDS = ["no", "one", "two", "three", "four"]
ARROW_DIRECTIONS = ["right", "up", "left", "down"]  # rotation 0, 90, 180, 270 degrees

# Difficulty levels: geometry as fractions of image_size, counts, noise and which backgrounds are drawn.
# "hard" is the task described above (at 64 px: main object 11-17 px, distractors 5-9 px). Measured on the
# 2-core dev box (README, "Data"), a tiny ViT trained *with labels* stays at chance on it for 300 steps, so no
# self-supervised encoder learns it in the minutes a default run has. "easy" keeps everything a caption
# describes (shape, colour, size, position, distractors, background) but makes the object large (45-65% of
# the side), draws fewer distractors, little noise and only the smooth backgrounds: learnable in minutes, while
# colour and background still carry most of the pixel variance. Captions and labels are drawn the same way.
LEVELS = {
    "easy": dict(main_size=(0.45, 0.65), distractor_size=(0.08, 0.14), distractor_opacity=(0.45, 0.85),
                 distractor_count_cdf=(0.5, 0.9, 1.0, 1.0), noise_sigma=(0.0, 0.03),
                 backgrounds=("gradient", "mottled")),
    "hard": dict(main_size=(0.17, 0.27), distractor_size=(0.08, 0.14), distractor_opacity=(0.45, 0.85),
                 distractor_count_cdf=(0.1, 0.3, 0.55, 0.8),  # P(n distractors <= 0, 1, 2, 3); at most 4
                 noise_sigma=(0.02, 0.09),  # gaussian pixel noise, in [0, 1] units
                 backgrounds=tuple(BACKGROUNDS)),
}
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


class _Rng:
    """Scalar draws from Python's random.Random, through .random() only: that stream is guaranteed to stay
    the same across Python versions (the other methods are not), and a scalar draw costs ~0.2 us against
    ~2 us for numpy's Generator; a scene takes ~60 of them."""

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
CAPTION_PARTS = dict(background_only=0.03, generic_noun=0.15, colour=0.9, size=0.3, position=0.2, count=0.1,
                     background=0.1)


def _caption(rng, s):
    """A compositional caption for scene s: "<colour> <shape>" first, then optional parts in varied order and
    punctuation (CAPTION_PARTS: size 30%, position 20%, distractor count 10%, background 10%), synonyms for
    every word; incomplete on purpose: 10% omit the colour, 15% name no shape (a generic noun instead), 3%
    describe only the background.

    Why the colour comes first and the caption is short (measured on the 2-core dev box, README "Data"): with
    75% of the text slots masked, the decoder can only use the image for a masked word once it knows which
    kind of word the slot holds, and with ~2 visible words per caption the slot's position is most of that
    evidence. Earlier captions (eight clause templates, every part 50-85% of the time, the colour anywhere in
    the first five words) gave a 1000-step M3AE a text loss no lower beside its own image than beside another
    sample's (2.268 vs 2.269): a language model of the captions that never looked at the image, so the text
    could not shape the image features. With the colour's slot fixed, the text starts to read the image
    within ~600 steps."""
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
    """Everything a caption can mention, drawn before rendering (so captions() need not render). lv: a LEVELS
    entry."""
    W = image_size
    shape = rng.integer(len(classes))
    u_size = rng.random()  # the object's size within the level's range: its thirds are small/medium/large
    size = (lv["main_size"][0] + (lv["main_size"][1] - lv["main_size"][0]) * u_size) * W
    r = size / 2
    cx, cy = rng.uniform(r + 1, W - r - 1), rng.uniform(r + 1, W - r - 1)
    direction = rng.integer(4)
    # arrows point one of 4 ways (named in captions); other shapes tilt by up to 40 degrees
    angle = direction * 90 + rng.uniform(-20, 20) if classes[shape] == "arrow" else rng.uniform(-40, 40)
    background = rng.pick(lv["backgrounds"])
    bg_colours = rng.rgb(), rng.rgb()
    # the main object's colour contrasts with both background colours (else it is invisible to anyone)
    dist = np.linalg.norm(_COLOUR_RGB[:, None] - np.array(bg_colours)[None], axis=2).min(axis=1)  # (11,)
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
    s = dict(label=shape, shape=classes[shape], size=size, size_word=size_word, centre=(cx, cy), angle=angle,
             direction=direction, colour=_COLOUR_NAMES[colour], cell=(min(int(3 * cy / W), 2), min(int(3 * cx / W), 2)),
             background=background, bg_colours=bg_colours, n_distractors=n, distractors=distractors,
             noise=rng.uniform(*lv["noise_sigma"]))
    return s


# Rendering: a background is one (W, W) pattern in [0, 1] that blends its two colours (Image.composite),
# shapes are pasted through anti-aliased masks (Image.paste), and the noise is added once in numpy: each
# step is a C call on a whole image or mask (~1,500 images/s on one core of the 2-core dev box at 64 px).


@lru_cache(maxsize=8)
def _grid(W):
    yy, xx = np.mgrid[0:W, 0:W].astype(np.float32)
    return yy, xx


@lru_cache(maxsize=8)
def _noise_bank(W):
    """A fixed field of N(0, 1) noise, 4x the image side: each image takes a random window of it (drawing
    fresh normals per image would cost more than the rest of the rendering)."""
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
            x, y, w, h = rng.uniform(-2, 16), rng.uniform(-2, 16), rng.uniform(2, 7), rng.uniform(2, 7)
            mix = _mix(c1, c2, rng.uniform(0.5, 1.0))
            draw.ellipse((x, y, x + w, y + h), fill=_rgb255(v + rng.uniform(-0.15, 0.15) for v in mix))
        return img.resize((W, W), Image.BILINEAR)
    if kind == "mottled":  # a coarse random grid of colours between c1 and c2, upsampled (cloudy)
        k = 3 + rng.integer(5)
        u = np.array([rng.random() for _ in range(4 * k * k)], dtype=np.float32).reshape(k, k, 4)
        c1, c2 = np.array(c1, dtype=np.float32), np.array(c2, dtype=np.float32)
        coarse = c1 + (c2 - c1) * u[:, :, :1] + 0.2 * u[:, :, 1:] - 0.1  # (k, k, 3): mix + jitter
        return Image.fromarray((np.clip(coarse, 0, 1) * 255 + 0.5).astype(np.uint8)).resize((W, W), Image.BICUBIC)
    # scribbled: random lines of random colours over a vertical gradient
    img = _blend(c1, c2, _vertical_ramp(W))
    draw = ImageDraw.Draw(img)
    for _ in range(10 + rng.integer(15)):
        x0, y0, x1, y1 = (rng.uniform(-8 * u, W + 8 * u) for _ in range(4))
        draw.line((x0, y0, x1, y1), fill=_rgb255(rng.rgb()), width=max(1, round(rng.uniform(1, 2.5) * u)))
    return img


def _blend(c1, c2, pattern):
    """PIL RGB: colour c1 where the 'L' image pattern is 0, c2 where it is 255, linear in between."""
    return Image.composite(Image.new("RGB", pattern.size, _rgb255(c2)), Image.new("RGB", pattern.size, _rgb255(c1)),
                           pattern)


@lru_cache(maxsize=8)
def _vertical_ramp(W):
    return Image.fromarray(np.repeat(np.linspace(0, 255, W, dtype=np.float32)[:, None], W, 1).astype(np.uint8))


def _draw_shape(img, shape, size, angle, centre, rgb, opacity):
    """Paste one anti-aliased shape into the PIL image img, in place. size: diameter in pixels; rgb: 0-255."""
    r = size / 2
    cx, cy = centre
    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
    x1, y1 = min(math.ceil(cx + r) + 1, img.width), min(math.ceil(cy + r) + 1, img.height)
    S = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * S, (y1 - y0) * S))
    draw = ImageDraw.Draw(canvas)
    # points as complex numbers: one multiply rotates and scales, conj flips y (shapes are y-up, images
    # y-down), one add moves into the canvas; viewed as floats they are the flat x, y list PIL wants
    turn = complex(math.cos(math.radians(angle)), math.sin(math.radians(angle))) * (r * S)
    offset = complex((cx - x0) * S, (cy - y0) * S)
    for fill, z in _SHAPES_COMPLEX[shape]:
        draw.polygon((np.conj(z * turn) + offset).view(np.float64).tolist(), fill=round(fill * opacity))
    img.paste(rgb, (x0, y0), canvas.reduce(S))  # the box-filtered mask: coverage x opacity


def _render(rng, s, W):
    img = _background(rng, s, W)
    for d in s["distractors"]:  # first, so that the main object is never occluded
        _draw_shape(img, d["shape"], d["size"], d["angle"], d["centre"], d["rgb"], d["opacity"])
    _draw_shape(img, s["shape"], s["size"], s["angle"], s["centre"], _COLOUR_RGB255[_COLOUR_NAMES.index(s["colour"])],
                1.0)
    bank = _noise_bank(W)
    oy, ox = rng.integer(len(bank) - W), rng.integer(len(bank) - W)
    a = np.asarray(img, dtype=np.float32) + bank[oy : oy + W, ox : ox + W] * (255 * s["noise"])  # (W, W, 3)
    return Image.fromarray((np.clip(a, 0, 255) + 0.5).astype(np.uint8))


class Builtin(torch.utils.data.Dataset):
    """Procedural image-caption pairs with labels (no downloads). Sample i is a pure function of
    (seed, split, i): one random.Random seeded with a key unique to (seed, split id, i), so splits never share
    samples and any sample can be drawn alone.

    One main object of random shape, colour, size, tilt and position, smaller, fainter distractors of other
    in-distribution shapes, a textured background, gaussian noise; `level` ("easy" or "hard", see LEVELS) sets
    sizes, counts, noise and which backgrounds. OOD_CLASSES never appear in the other splits, not even as
    distractors. Returns dict(image=PIL RGB (image_size square), caption=str, label=int, box=(x0, y0, x1, y1) of
    the main object in pixels).

    `label` picks what the label is, an index into self.classes: "shape" (default), the main object's shape
    (CLASSES; for split "ood", OOD_CLASSES), or "colour", the main object's colour (COLOURS' keys, every split).
    Both are named by most captions; neither changes the images or captions.
    """

    CLASSES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring", "arrow", "crescent"]
    OOD_CLASSES = ["chevron", "hourglass", "bolt"]
    SPLITS = {"pretrain": (0, 20000), "train": (1, 5000), "test": (2, 2000), "ood": (3, 2000)}  # id, size

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
        s["caption"] = _caption(_Rng(f"caption {key}"), s)  # its own stream: the grammar can change, images stay
        return rng, s

    def __getitem__(self, i):
        rng, s = self._scene(i)
        (cx, cy), r = s["centre"], s["size"] / 2
        return dict(image=_render(rng, s, self.image_size), caption=s["caption"], label=self._label_of(s, self.label),
                    box=(cx - r, cy - r, cx + r, cy + r))

    def labels(self, label=None):
        """Every label of the split for `label` ("shape" or "colour"; default self.label), without rendering."""
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
# decoding: any image in, RGB out, or a reason to skip


class SkipSample(Exception):
    """Raised by load_image; datasets turn it into a {"skip": reason} sample."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def load_image(src, size=None, max_pixels=MAX_PIXELS, notes=None):
    """Decode src (a path, bytes or a PIL image) to an RGB PIL image, or raise SkipSample(reason).

    size: the side the caller will produce. JPEGs are decoded with draft mode (libjpeg's DCT scaling by
    1/2, 1/4, 1/8) to the smallest scale whose shorter side is still >= 2 x size, and any image whose shorter
    side is >= 4 x size is then box-reduced (Image.reduce) to >= 2 x size: a 1600x1200 photo for a 64 px
    crop is decoded at 200x150, not 1.9M pixels. Non-RGB modes are converted (CMYK; greyscale L/1; 16-bit
    I;16/I and float F scaled to 8 bits, not clipped; palette P with or without transparency; alpha
    RGBA/LA/PA composited on white) and the conversion is appended to `notes` (a list) when given.
    Skips: missing, unreadable, empty_file, too_large (more than max_pixels, or PIL's decompression-bomb
    limit, checked from the header before decoding), corrupt (truncated or undecodable).
    """
    if isinstance(src, Image.Image):
        im = src
    else:
        im = _decode(src, size, max_pixels)
    im = _to_rgb(im, notes)
    if size:
        factor = min(im.size) // (2 * size)
        if factor >= 2:
            im = im.reduce(factor)
    return im


def _decode(src, size, max_pixels):
    if src is None:
        raise SkipSample("missing")
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise SkipSample("empty_file")
        return _open(io.BytesIO(src), size, max_pixels)
    path = os.fspath(src)
    try:
        if os.path.getsize(path) == 0:
            raise SkipSample("empty_file")
        with open(path, "rb") as f:
            return _open(f, size, max_pixels)
    except FileNotFoundError:
        raise SkipSample("missing") from None
    except OSError:  # a directory, no permission, an I/O error
        raise SkipSample("unreadable") from None


def _open(fp, size, max_pixels):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's warning level is a skip too
        try:
            im = Image.open(fp)  # reads the header only
            if im.width * im.height > max_pixels:
                raise SkipSample("too_large")
            if size and im.format == "JPEG":
                im.draft(None, (2 * size, 2 * size))
            im.load()
            return im
        except SkipSample:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            raise SkipSample("too_large") from None
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...) on bad bytes
            raise SkipSample("corrupt") from None


def _to_rgb(im, notes):
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" not in im.info:
        kind, im = "palette", im.convert("RGB")
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        rgba = im.convert("RGBA")
        kind, im = ("palette" if mode == "P" else "alpha"), Image.new("RGB", im.size, (255, 255, 255))
        im.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    elif mode in ("L", "1"):
        kind, im = "greyscale", im.convert("RGB")
    elif mode == "CMYK":
        kind, im = "cmyk", im.convert("RGB")
    elif mode.startswith("I") or mode == "F":
        # PIL's convert("L") clips 16-bit values at 255; scale instead (float images: [0, 1] or [0, 255])
        a = np.asarray(im, dtype=np.float32)
        a = a / 257 if mode.startswith("I") else (a * 255 if a.size and a.max() <= 1 else a)
        grey = Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8))
        kind, im = "high_bit_depth", grey.convert("RGB")
    else:  # YCbCr, LAB, HSV, RGBX, ...
        kind, im = "other_mode", im.convert("RGB")
    if notes is not None:
        notes.append(kind)
    return im


# -----------------------------------------------------------------------------
# transforms (PIL + torch; randomness from torch's global RNG, so seeding torch per sample fixes a sample)


def to_tensor(img, mean, std):
    """PIL RGB (H, W) -> (3, H, W) float32, (x / 255 - mean) / std."""
    m, s = _mean_std_255(tuple(mean), tuple(std))
    # channel-first before any arithmetic: broadcasting over a trailing axis of 3 is several times slower
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float()
    return x.sub_(m).div_(s)


@lru_cache(maxsize=16)
def _mean_std_255(mean, std):
    return torch.tensor(mean).view(3, 1, 1) * 255, torch.tensor(std).view(3, 1, 1) * 255


def random_resized_crop_box(width, height, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (left, top, right, bottom): area fraction in `scale`, log-uniform
    aspect ratio in `ratio`, 10 tries, then a centre crop clamped to `ratio`. Uses torch's global RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(()).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(()).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            return left, top, left + w, top + h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class PretrainTransform:
    """RandomResizedCrop(image_size, scale, ratio 3/4-4/3, bicubic) + horizontal flip (p 0.5) + normalise."""

    def __init__(self, image_size, mean, std, scale=(0.2, 1.0), flip=True):
        self.image_size, self.mean, self.std, self.scale, self.flip = image_size, mean, std, scale, flip

    def __call__(self, img):
        box = random_resized_crop_box(*img.size, scale=self.scale)
        x = to_tensor(img.resize((self.image_size, self.image_size), Image.BICUBIC, box=box), self.mean, self.std)
        return x.flip(-1) if self.flip and torch.rand(()).item() < 0.5 else x


class EvalTransform:
    """Resize the shorter side to image_size / crop_pct (bicubic), centre crop image_size, normalise; done as
    one resize of the centre box. crop_pct 1.0 on an image_size square image is the identity."""

    def __init__(self, image_size, mean, std, crop_pct=0.875):
        self.image_size, self.mean, self.std, self.crop_pct = image_size, mean, std, crop_pct

    def __call__(self, img):
        W, H = img.size
        side = min(W, H) * self.crop_pct  # the crop's side in source pixels
        box = ((W - side) / 2, (H - side) / 2, (W + side) / 2, (H + side) / 2)
        if not (W == H == self.image_size and side == W):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        return to_tensor(img, self.mean, self.std)


def pretrain_transform(image_size, mean, std, scale=(0.2, 1.0), flip=True):
    """The paper's pretraining augmentation (see PretrainTransform)."""
    return PretrainTransform(image_size, mean, std, scale, flip)


def eval_transform(image_size, mean, std, crop_pct=0.875):
    """Resize + centre crop (see EvalTransform); crop_pct=1.0 for the built-in data, already image_size."""
    return EvalTransform(image_size, mean, std, crop_pct)


# -----------------------------------------------------------------------------
# sources on disk (map-style: records of dict(image, caption[, label]))


def _image_files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return out


class CsvPairs(torch.utils.data.Dataset):
    """A CSV/TSV with a header: an image path column and a caption column. Delimiter by extension (.tsv,
    .tab: tab, no quoting; .csv: comma) or sniffed. Columns default to the first of filepath/image/
    image_path/path/file/filename and caption/text/title present. Relative paths are relative to the CSV's
    folder. Captions with invalid UTF-8 are kept as bytes, so PairedDataset can count them."""

    IMAGE_COLUMNS = ("filepath", "image", "image_path", "path", "file", "filename")
    CAPTION_COLUMNS = ("caption", "text", "title")

    def __init__(self, path, image_column=None, caption_column=None, delimiter=None):
        self.root = os.path.dirname(os.path.abspath(path))
        ext = os.path.splitext(path)[1].lower()
        # surrogateescape keeps undecodable bytes, to be found again per caption
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            if delimiter is None:
                delimiter = {".tsv": "\t", ".tab": "\t", ".csv": ","}.get(ext)
            if delimiter is None:
                try:
                    delimiter = csv.Sniffer().sniff(f.read(65536), delimiters=",\t;|").delimiter
                except csv.Error:
                    delimiter = ","
                f.seek(0)
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = [h.strip() for h in next(reader, [])]
            rows = list(reader)
        lower = [h.lower() for h in header]

        def column(name, candidates, what):
            for c in ([name] if name else candidates):
                if c.lower() in lower:
                    return lower.index(c.lower())
            raise ValueError(f"{path}: no {what} column (looked for {name or candidates}; header is {header})")

        i = column(image_column, self.IMAGE_COLUMNS, "image")
        j = column(caption_column, self.CAPTION_COLUMNS, "caption")
        self.rows = [(r[i] if len(r) > i else "", r[j] if len(r) > j else "") for r in rows if r]

    def __len__(self):
        return len(self.rows)

    @staticmethod
    def _caption(text):
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:  # lone surrogates: the file had invalid UTF-8 here
            return text.encode("utf-8", errors="surrogateescape")

    def __getitem__(self, i):
        path, caption = self.rows[i]
        # an empty path stays "" (a missing file), not None (which would mean a text-only record)
        return dict(image=os.path.join(self.root, path) if path.strip() else "", caption=self._caption(caption))

    def captions(self):
        for _, caption in self.rows:
            yield self._caption(caption)


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/*.jpg -> dict(image=path, label); classes are the sorted folder names."""

    def __init__(self, root):
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.samples = [(p, k) for k, c in enumerate(self.classes) for p in _image_files(os.path.join(root, c))]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return dict(image=path, label=label)


class ImageOnlyFolder(torch.utils.data.Dataset):
    """Every image under root (recursive, sorted) -> dict(image=path, caption=None): unpaired images."""

    def __init__(self, root):
        self.files = _image_files(root)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return dict(image=self.files[i], caption=None)

    def captions(self):
        return iter(())


class TextLines(torch.utils.data.Dataset):
    """One caption per line (blank lines dropped) -> dict(image=None, caption=bytes): unpaired text. Lines
    are kept as bytes so that invalid UTF-8 is counted when decoded (PairedDataset)."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.lines = [line.rstrip(b"\r") for line in f.read().split(b"\n") if line.strip()]

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        return dict(image=None, caption=self.lines[i])

    def captions(self):
        return iter(self.lines)


# -----------------------------------------------------------------------------
# model-ready samples


def paired_share_roles(n, paired_share, seed=0):
    """(n,) int64 roles for n pairs: 0 paired, 1 image-only, 2 text-only. round(n * paired_share) pairs stay
    paired; of the rest, half (rounded up) keep only their image and half only their text. Each pair has one
    role, so an image-only sample's caption and a text-only sample's image are never used: the unpaired
    images and texts really are unpaired (the paper's paired-share knob)."""
    if not 0.0 <= paired_share <= 1.0:
        raise ValueError(f"paired_share must be in [0, 1], got {paired_share}")
    n_paired = round(n * paired_share)
    n_image = (n - n_paired + 1) // 2
    roles = torch.full((n,), TEXT_ONLY, dtype=torch.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    roles[perm[:n_paired]] = PAIRED
    roles[perm[n_paired : n_paired + n_image]] = IMAGE_ONLY
    return roles


def pretrain_sample(image, caption, tokenizer, text_len, transform, role=PAIRED, max_pixels=MAX_PIXELS):
    """One pretraining sample (see the module docstring) from an image source (path, bytes or PIL; None =
    no image by design, e.g. a text file) and a caption (str, bytes; None = no caption by design); role
    PAIRED / IMAGE_ONLY / TEXT_ONLY drops a modality. Never raises on bad input: returns a skip sample."""
    H = transform.image_size
    notes = []
    use_image = image is not None and role != TEXT_ONLY
    use_text = caption is not None and role != IMAGE_ONLY
    text, pad = torch.full((text_len,), PAD_ID, dtype=torch.int64), torch.ones(text_len, dtype=torch.bool)
    if use_text:
        text, pad = tokenizer.encode(caption_text(caption, notes), text_len)
        if pad.all():  # empty, whitespace, or nothing the tokenizer keeps
            use_text = False
            if use_image:
                notes.append("empty_caption")  # a pair with an empty caption becomes image-only
    if not use_image and not use_text:
        reason = "empty_caption" if caption is not None and role != IMAGE_ONLY else "missing"
        return _skip(reason, _pretrain_placeholder(H, text_len))
    if use_image:
        try:
            x = transform(load_image(image, H, max_pixels, notes))
        except SkipSample as e:
            return _skip(e.reason, _pretrain_placeholder(H, text_len))
    else:
        x = torch.zeros(3, H, H)
    sample = dict(image=x, text=text, text_padding_mask=pad, has_image=torch.tensor(use_image),
                  has_text=torch.tensor(use_text))
    if notes:
        sample["converted"] = notes
    return sample


def _pretrain_placeholder(H, text_len):
    return dict(image=torch.zeros(3, H, H), text=torch.zeros(text_len, dtype=torch.int64),
                text_padding_mask=torch.ones(text_len, dtype=torch.bool), has_image=torch.tensor(False),
                has_text=torch.tensor(False))


def _skip(reason, placeholder):
    """A skip sample: the reason, and zero tensors of the real shapes (so an all-skipped batch has 0 rows)."""
    return {"skip": reason, **placeholder}


class PairedDataset(torch.utils.data.Dataset):
    """source[i] = dict(image, caption) -> pretraining sample. roles (n,) from paired_share_roles, or None
    for every sample as it comes (a TextLines source gives text-only samples, an ImageOnlyFolder image-only)."""

    def __init__(self, source, tokenizer, text_len, transform, roles=None, max_pixels=MAX_PIXELS):
        if roles is not None and len(roles) != len(source):
            raise ValueError(f"{len(roles)} roles for {len(source)} samples")
        self.source, self.tokenizer, self.text_len, self.transform = source, tokenizer, text_len, transform
        self.roles, self.max_pixels = roles, max_pixels

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rec = self.source[i]
        role = PAIRED if self.roles is None else int(self.roles[i])
        return pretrain_sample(rec.get("image"), rec.get("caption"), self.tokenizer, self.text_len,
                               self.transform, role, self.max_pixels)


class LabelledDataset(torch.utils.data.Dataset):
    """source[i] = dict(image, label) -> dict(image (3, H, W) float32, label 0-d int64), or a skip sample."""

    def __init__(self, source, transform, max_pixels=MAX_PIXELS):
        self.source, self.transform, self.max_pixels = source, transform, max_pixels

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rec = self.source[i]
        label = torch.tensor(rec["label"], dtype=torch.int64)
        H = self.transform.image_size
        try:
            return dict(image=self.transform(load_image(rec["image"], H, self.max_pixels)), label=label)
        except SkipSample as e:
            return _skip(e.reason, dict(image=torch.zeros(3, H, H), label=label))


# -----------------------------------------------------------------------------
# webdataset shards (img2dataset layout: key.jpg, key.txt, key.json per sample, members adjacent)


def expand_shards(spec):
    """'dir/{00000..00009}.tar' (zero-padded ranges, also {a,b}), comma lists, globs, or a list of those ->
    list of paths, in order."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(spec):  # split on commas outside braces
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(spec[start:k])
            start = k + 1
    parts.append(spec[start:])
    if len(parts) > 1:
        return [p for s in parts if s.strip() for p in expand_shards(s.strip())]
    m = re.search(r"\{([^{}]*)\}", spec)
    if m:
        head, tail, body = spec[: m.start()], spec[m.end() :], m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            a, b = rng.groups()
            items = [str(n).zfill(len(a)) for n in range(int(a), int(b) + 1)]
        else:
            items = body.split(",")
        return [p for item in items for p in expand_shards(head + item + tail)]
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]


_SHARD_ERROR = "/error"  # marks a missing or damaged shard; no member's extension can contain "/"


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Stream pretraining samples from .tar shards, read sequentially with the standard library's tarfile.

    Members are grouped by key (folder + file name before the first dot): jpg/jpeg/png/webp is the image, txt
    the caption (else json's "caption"). Each (DDP rank, DataLoader worker) slot reads its own shards
    (shard order reshuffled per epoch with set_epoch); with fewer shards than slots, every slot walks all
    shards but decodes only samples whose running index is its own (index % slots), so each sample is
    yielded exactly once per epoch either way. A shuffle buffer of raw (undecoded) samples mixes within a
    slot. paired_share < 1 gives each key a fixed role (paired / image-only / text-only) from a hash.
    Needs tokenizer, text_len and transform to yield samples; captions() works without them.
    """

    def __init__(self, shards, tokenizer=None, text_len=64, transform=None, paired_share=1.0, seed=0, rank=None,
                 world=None, shuffle_buffer=500, max_pixels=MAX_PIXELS):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no shards match {shards!r}")
        self.tokenizer, self.text_len, self.transform = tokenizer, text_len, transform
        self.paired_share, self.seed = paired_share, seed
        self.shuffle_buffer, self.max_pixels = shuffle_buffer, max_pixels
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if initialised else 0)
        self.world = world if world is not None else (torch.distributed.get_world_size() if initialised else 1)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _slot(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world * workers

    def _groups(self, path, wanted):
        """Yield (key, {ext: bytes}) per sample of one shard, in order; a sample's members are read only if
        wanted(n) for its index n in the shard, else it comes as (key, None). A missing or damaged shard
        yields (path, {_SHARD_ERROR: reason}) and ends."""
        key, members, n = None, None, -1
        try:
            with tarfile.open(path, mode="r|*") as tar:  # stream mode: sequential, never seeks
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, base = posixpath.split(m.name)
                    if base.startswith("."):
                        continue
                    stem, _, ext = base.partition(".")
                    k = posixpath.join(folder, stem)
                    if k != key:
                        if key is not None:
                            yield key, members
                        key, n = k, n + 1
                        members = {} if wanted(n) else None
                    if members is not None:
                        members[ext.lower()] = tar.extractfile(m).read()
        except FileNotFoundError:
            yield path, {_SHARD_ERROR: "missing_shard"}
            return
        except (tarfile.TarError, OSError, EOFError):
            # samples read before the damage were yielded already. (A shard cut exactly between members
            # cannot be told apart: tarfile reads a short header as the end of the archive.)
            yield path, {_SHARD_ERROR: "corrupt_shard"}
            return
        if key is not None:
            yield key, members

    def _raw(self):
        """This slot's raw samples of the epoch, in shard order: (key, members)."""
        slot, slots = self._slot()
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        if len(order) >= slots:
            for path in order[slot::slots]:
                yield from self._groups(path, lambda n: True)
            return
        index = 0  # running sample index over all shards, the same in every slot
        for path in order:
            for key, members in self._groups(path, lambda n, base=index: (base + n) % slots == slot):
                if members is not None and _SHARD_ERROR in members:
                    if index % slots == slot:  # count a damaged shard once, not once per slot
                        yield key, members
                    break
                if members is not None:
                    yield key, members
                index += 1

    def _role(self, key):
        if self.paired_share >= 1:
            return PAIRED
        h = zlib.crc32(f"{self.seed}/{key}".encode()) / 2**32  # fixed per key: the same role every epoch
        if h < self.paired_share:
            return PAIRED
        return IMAGE_ONLY if (h - self.paired_share) / (1 - self.paired_share) < 0.5 else TEXT_ONLY

    def _sample(self, key, members):
        if _SHARD_ERROR in members:
            return _skip(members[_SHARD_ERROR], _pretrain_placeholder(self.transform.image_size, self.text_len))
        image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
        caption = members.get("txt")
        if caption is None and "json" in members:
            try:
                caption = json.loads(members["json"]).get("caption")
            except (ValueError, AttributeError):
                caption = None
        if image is None:
            return _skip("missing", _pretrain_placeholder(self.transform.image_size, self.text_len))
        return pretrain_sample(image, b"" if caption is None else caption, self.tokenizer, self.text_len,
                               self.transform, self._role(key), self.max_pixels)

    def __iter__(self):
        if self.tokenizer is None or self.transform is None:
            raise ValueError("WebDatasetShards needs tokenizer and transform to yield samples")
        slot, _ = self._slot()
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        buffer = []
        for raw in self._raw():
            if self.shuffle_buffer > 1:
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                k = rng.randrange(len(buffer))
                buffer[k], raw = raw, buffer[k]
            yield self._sample(*raw)
        rng.shuffle(buffer)
        for raw in buffer:
            yield self._sample(*raw)

    def captions(self):
        """Captions of every shard (txt members only; images are skipped unread)."""
        for path in self.shards:
            for _, members in self._groups(path, lambda n: True):
                if "txt" in members:
                    yield members["txt"]


# -----------------------------------------------------------------------------
# batches and skip accounting


def collate(samples):
    """Stack samples into a batch, dropping skip samples. batch["skipped"] is a dict of counts: reason ->
    number of samples skipped for it, and "converted:<what>" -> number of conversions (it travels with the
    batch, so counts cross DataLoader worker processes; feed it to SkipLog.add). A batch of nothing but skips
    has 0 rows (every tensor shaped (0, ...)). Tensors are stacked, numbers become tensors, other values
    (strings) stay lists."""
    counts = Counter(s["skip"] for s in samples if "skip" in s)
    good = [s for s in samples if "skip" not in s]
    counts.update(f"converted:{c}" for s in good for c in s.get("converted", ()))
    template = (good or samples)[0]
    batch = {}
    for k, v in template.items():
        if k in ("skip", "converted"):
            continue
        values = [s[k] for s in good]
        if torch.is_tensor(v):
            batch[k] = torch.stack(values) if values else v.new_empty((0, *v.shape))
        elif isinstance(v, (bool, int, float)):
            batch[k] = torch.tensor(values) if values else torch.tensor([], dtype=torch.as_tensor(v).dtype)
        else:
            batch[k] = values
    batch["skipped"] = dict(counts)
    return batch


class SkipLog:
    """Accumulates batch["skipped"] dicts over an epoch; report() is one line for the log."""

    def __init__(self):
        self.counts = Counter()

    def add(self, skipped):
        """skipped: a batch's "skipped" dict, or the batch itself."""
        self.counts.update(skipped["skipped"] if isinstance(skipped.get("skipped"), dict) else skipped)

    def total(self):
        return sum(self.counts.values())

    def all_ranks(self):
        """A SkipLog summed over DDP ranks (collective: every rank must call it)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, dict(self.counts))
        out = SkipLog()
        for c in gathered:
            out.counts.update(c)
        return out

    def report(self):
        """'skipped: corrupt 3, missing 1; converted: cmyk 2' (most frequent first)."""
        def line(items):
            return ", ".join(f"{k} {n}" for k, n in sorted(items, key=lambda kv: (-kv[1], kv[0]))) or "none"

        skipped = [(k, n) for k, n in self.counts.items() if not k.startswith("converted:")]
        converted = [(k.split(":", 1)[1], n) for k, n in self.counts.items() if k.startswith("converted:")]
        return f"skipped: {line(skipped)}; converted: {line(converted)}"


# -----------------------------------------------------------------------------
# CLI: contact sheet and benchmark


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def contact_sheet(path, seed=0, image_size=64, scale=3, cols=4, rows=4, n_ood=4, level="easy"):
    """A PNG of rows x cols pretraining samples with their captions and labels, then a row of OOD samples."""
    font, bold = _font(13), _font(15)
    cell_w = image_size * scale + 24
    lines = 5
    cell_h = image_size * scale + 22 + 16 * lines
    title_h = 34
    sheet = Image.new("RGB", (cols * cell_w + 8, title_h + (rows + 1) * cell_h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), f"Builtin dataset, level {level!r} (seed {seed}, {image_size} px, shown x{scale}): caption "
                       f"below, probe labels in blue", font=bold, fill="black")

    def cell(x, y, sample, shape, colour):
        sheet.paste(sample["image"].resize((image_size * scale,) * 2, Image.NEAREST), (x, y))
        draw.text((x, y + image_size * scale + 2), f"{shape} / {colour}", font=font, fill=(20, 60, 200))
        wrapped = textwrap.wrap(sample["caption"], width=max(10, int(cell_w / 7.2)))[:lines]
        for k, text in enumerate(wrapped):
            draw.text((x, y + image_size * scale + 18 + 16 * k), text, font=font, fill="black")

    pre = Builtin("pretrain", rows * cols, image_size=image_size, seed=seed, level=level)
    colours = [_COLOUR_NAMES[c] for c in pre.labels("colour")]
    for n in range(rows * cols):
        sample = pre[n]
        cell(8 + (n % cols) * cell_w, title_h + (n // cols) * cell_h, sample, Builtin.CLASSES[sample["label"]],
             colours[n])
    y = title_h + rows * cell_h
    draw.text((10, y), "out-of-distribution split (held-out shapes, never drawn in the other splits):",
              font=bold, fill=(160, 30, 30))
    ood = Builtin("ood", min(n_ood, cols), image_size=image_size, seed=seed, level=level)
    colours = [_COLOUR_NAMES[c] for c in ood.labels("colour")]
    for n in range(len(ood)):
        sample = ood[n]
        cell(8 + n * cell_w, y + 24, sample, Builtin.OOD_CLASSES[sample["label"]], colours[n])
    # 256 colours keep the PNG small (< 300 KB); the noise makes a true-colour PNG several times larger
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return sheet


def _photo_jpeg(width, height, seed):
    """A photo-like JPEG (smooth colour field, edges, grain), quality 90: about 2 bits per pixel, like web photos."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
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

    print(f"data.py bench: one process, torch threads 1, Pillow {Image.__version__}, torch {torch.__version__}")
    for w, h in ((500, 375), (1600, 1200)):
        jpegs = [_photo_jpeg(w, h, s) for s in range(4)]
        for target in (256, 64):
            t = pretrain_transform(target, CC12M_MEAN, CC12M_STD)
            ours = rate(lambda b: t(load_image(b, target)), jpegs)
            naive = rate(lambda b: t(Image.open(io.BytesIO(b)).convert("RGB")), jpegs)
            print(f"  JPEG {w}x{h} ({sum(map(len, jpegs)) // len(jpegs) // 1000} KB) -> {target:>3} px: load_image "
                  f"(draft + reduce) + RandomResizedCrop/flip {ours:5.0f} img/s | naive full decode + same crop "
                  f"{naive:5.0f} img/s | x{ours / naive:.1f}")
    for size in (64,):
        gen = Builtin("pretrain", image_size=size)
        r = rate(lambda i: gen[i], list(range(10_000)))
        t = eval_transform(size, BUILTIN_MEAN, BUILTIN_STD, crop_pct=1.0)
        r2 = rate(lambda i: t(gen[i]["image"]), list(range(10_000)))
        print(f"  Builtin generation at {size} px: {r:7.0f} img/s (with normalise to tensor: {r2:.0f} img/s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet of the built-in dataset")
    p.add_argument("--level", default="easy", choices=list(LEVELS), help="--sheet: the built-in difficulty")
    p.add_argument("--image-size", type=int, default=32, help="--sheet: image side (the tiny preset's: 32)")
    p.add_argument("--scale", type=int, default=6, help="--sheet: nearest-neighbour upscaling for legibility")
    p.add_argument("--bench", action="store_true", help="decode + augment throughput, draft mode vs naive")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.sheet or args.bench):
        p.error("give --sheet PNG and/or --bench")
    if args.sheet:
        contact_sheet(args.sheet, seed=args.seed, image_size=args.image_size, scale=args.scale, level=args.level)
        print(f"wrote {args.sheet}")
    if args.bench:
        bench()


if __name__ == "__main__":
    main()
