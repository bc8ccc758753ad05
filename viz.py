"""See what a pretrained M3AE does: masked reconstructions, the caption's effect, attention maps.

    python viz.py --ckpt runs/default/ckpt.pt           # every figure, 4 built-in test samples
    python viz.py --ckpt runs/default/ckpt.pt --mode recon --samples 6 --first 10
    python viz.py --ckpt runs/default/ckpt.pt --mode attention --word circle --patch 3,4
    python viz.py --ckpt ckpt.pt --image cat.jpg --caption "a cat on a sofa" --other-caption "a car"

Figures (PNG, drawn with PIL alone; images scaled up nearest-neighbour so that 64 px stays legible)
in --out-dir (default: viz/ next to the checkpoint, listed in its outputs.txt), a row per sample:
  recon.png            original | masked input (removed patches grey) | reconstruction with the
                       visible patches pasted back | the raw prediction (every patch) | the
                       image-only reconstruction (no caption: MAE's mode). Below: the caption
                       (removed slots in blue), the masked caption (removed slots as blanks), and
                       the model's top-1 word for each removed slot in [brackets] (green = right,
                       red = wrong), paired and text-only (no image).
  caption_effect.png   the same masked image (the same noise) reconstructed with its own caption,
                       with no caption and with another caption, each with its MSE on the removed
                       patches: does the text inform the image (the paper's claim), and how much.
  attention_word.png   as the paper's Figure 7: one word's attention over the image patches, per
                       encoder layer (averaged over heads), the last layer larger, on the image.
  attention_patch.png  as the paper's Figure 8: one patch's attention over the caption's words, per
                       layer (a heat table) and the last layer (bars).
Without a tokenizer (an MAE baseline, a checkpoint converted without a vocab) no caption is read:
recon.png shows the images alone, and the caption and attention figures are skipped.

Conventions (model.py's): images normalised with the pretraining data's mean/std, a row-major patch
grid, masks 1 = removed, key padding True = pad. Masking noise comes from a torch.Generator seeded
with --seed, so a figure is reproducible. Reconstruction errors are the training image loss
(model.patch_mse) on removed patches. Attention maps read the encoder on the whole, unmasked input
(as the paper's figures do), through model.attention_maps (the math path: SDPA and the fused kernel
never form the weights).
"""

import argparse
import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import builtin
import data
from checkpoint import (NORMS, CheckpointError, checkpoint_data_level, checkpoint_data_seed,
                        checkpoint_norm, checkpoint_tokenizer)
from evalcommon import check_file, die, read_model, write_output
from model import patch_mse, patchify, per_sample_mean, unpatchify
from util import make_parser, masking_noise

MODES = ("recon", "caption", "attention")  # "all" runs the three; "attention" writes two files

# Default word for the word-attention map: the first word that names a shape in the built-in
# vocabulary (the label's word, what Figure 7 shows), else the first word that is not one of these
# stop words.
SHAPE_NAMES = ({w for names in builtin.SHAPE_WORDS.values() for name in names for w in name.split()}
               - {"shape", "round", "five-pointed", "v", "bow", "lightning", "sign"}
               | set(builtin.GENERIC_WORDS))
STOP_WORDS = {"a", "an", "the", "there", "is", "are", "of", "on", "in", "at", "with", "and", "to",
              "near", "next", "over", "by", "its", "it", "this", "that", "some", "photo", "picture",
              "image"}

# -----------------------------------------------------------------------------
# arguments


def build_parser():
    p = make_parser(__doc__, prog="viz.py")
    a = p.add_argument
    a("--ckpt", required=True, default=argparse.SUPPRESS, help="checkpoint file from train.py or "
      "convert.py (a dict with 'model' and 'config'); required")
    a("--tokenizer", help="a sentencepiece .model or BERT vocab.txt; if not given, the one the "
      "checkpoint carries, else the run's --tokenizer, else tokenizer.model next to the checkpoint")
    a("--mode", default="all", choices=[*MODES, "all"], help="which figures: recon, caption (the "
      "caption's effect), attention (word -> patches and patch -> words), or all")
    a("--out-dir", help="where the PNGs go; if not given, viz/ next to the checkpoint")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (CPU "
      "is enough: a few forward passes)")
    a("--seed", type=int, default=0, help="masking noise: the same seed gives the same masks and "
      "figures")
    # what to show
    a("--samples", type=int, default=4, help="built-in data: how many samples (one row each)")
    a("--first", type=int, default=0, help="built-in data: index of the first sample")
    a("--split", default="test", choices=list(builtin.Builtin.SPLITS), help="built-in data: which "
      "split")
    a("--data-seed", type=int, help="built-in data: which procedural dataset; if not given, the "
      "checkpoint's")
    a("--data-level", choices=list(builtin.LEVELS), help="built-in data: difficulty; if not given, "
      "the checkpoint's")
    a("--image", action="append", help="an image file to show (repeatable); if not given, built-in "
      "samples")
    a("--caption", action="append", help="its caption (repeatable, one per --image); if not given, "
      "no caption")
    a("--other-caption", help="caption mode: the 'different caption' for every sample; if not "
      "given, the next sample's caption (the next --image's), and none at all for a single sample")
    a("--word", help="attention: the word whose attention over the image is drawn; if not given, "
      "the first word naming a shape, else the first word that is not a stop word")
    a("--patch", help="attention: ROW,COL of the patch whose attention over the words is drawn "
      "(0-based); if not given, the patch under the main object's centre on built-in data, the "
      "centre patch otherwise")
    # masking and view
    a("--image-mask-ratio", type=float, help="fraction of patches removed; if not given, the "
      "checkpoint's")
    a("--text-mask-ratio", type=float, help="recon: fraction of text slots removed, padding "
      "counted as in training; if not given, the checkpoint's")
    a("--caption-text-mask-ratio", type=float, default=0.0, help="caption mode: fraction of text "
      "slots removed (0: the whole caption is visible, so the image sees everything the text says)")
    a("--norm", default="auto", choices=["auto", *NORMS], help="normalisation statistics; auto = "
      "those the checkpoint was pretrained with (builtin or cc12m)")
    a("--crop-pct", type=float, default=1.0, help="--image: centre crop of the shorter side before "
      "resizing")
    a("--scale", type=int, help="display magnification of the images; if not given, up to 256 px "
      "(e.g. 4 x 64 px)")
    a("--true-colour", action="store_true", help="save true-colour PNGs (else 256 colours, about 4 "
      "times smaller; the drawing's own colours exact, image pixels within ~35/255)")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.caption and not args.image:
        p.error("--caption goes with --image")
    if args.image and args.caption and len(args.caption) != len(args.image):
        p.error(f"give one --caption per --image ({len(args.image)} images, "
                f"{len(args.caption)} captions)")
    if args.samples < 1:
        p.error("--samples must be >= 1")
    check_file(p, "--ckpt", args.ckpt, "a checkpoint from train.py or convert.py")
    if args.tokenizer:
        check_file(p, "--tokenizer", args.tokenizer,
                   "a sentencepiece .model, e.g. tokenizer.model next to the checkpoint")
    for path in args.image or []:
        check_file(p, "--image", path, "an image file")
        if not path.lower().endswith(data.IMAGE_EXTENSIONS):
            exts = " ".join(data.IMAGE_EXTENSIONS)
            p.error(f"--image {path}: not an image file name (one of {exts})")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"--out-dir {args.out_dir}: exists and is not a folder")
    return args


# -----------------------------------------------------------------------------
# model, tokenizer, data


def load_samples(args, ckpt, image_size):
    """(samples, description). A sample is dict(image=PIL RGB, caption=str, name=str, label=int or
    None, box=(x0, y0, x1, y1) of the main object in image pixels, or None). --image files if given,
    else built-in samples."""
    if args.image:
        captions = args.caption or [""] * len(args.image)
        samples = []
        for path, caption in zip(args.image, captions):
            try:
                image = data.load_image(path, image_size)
            except data.SkipSample as e:
                raise SystemExit(f"{path}: cannot read the image ({e.reason})") from None
            samples.append(dict(image=image, caption=caption, name=os.path.basename(path),
                                label=None, box=None))
        return samples, f"{len(samples)} image(s) from --image"
    seed = args.data_seed if args.data_seed is not None else checkpoint_data_seed(ckpt)
    level = args.data_level or checkpoint_data_level(ckpt)
    last = args.first + args.samples - 1
    source = builtin.Builtin(args.split, last + 1, image_size, seed=seed, level=level)
    samples = []
    for i in range(args.first, args.first + args.samples):
        s = source[i]
        samples.append(dict(image=s["image"], caption=s["caption"], box=s["box"], label=s["label"],
                            name=f"{args.split} #{i} ({source.classes[s['label']]})"))
    return samples, f"built-in {args.split} samples {args.first}-{last} (data seed {seed})"


def load_tokenizer(args, ckpt, vocab_size):
    """The checkpoint's tokenizer (checkpoint.checkpoint_tokenizer), or None when there is none to
    be found (an MAE baseline, an official checkpoint converted without a vocab): then no caption is
    read and only image figures are drawn. A tokenizer that is there but unusable, or captions
    asked for without one, ends the run in one line."""
    try:
        tokenizer = checkpoint_tokenizer(ckpt, args.ckpt, args.tokenizer)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        if args.tokenizer or "tokenizer" in ckpt or not reason.startswith("no tokenizer"):
            where = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--ckpt {args.ckpt}"
            die("viz.py", f"{where}: unusable tokenizer: {reason}")
        reason = reason.split(";")[0]
        if args.caption or args.mode in ("caption", "attention"):
            die("viz.py", f"{reason}; captions need one: pass --tokenizer (a sentencepiece .model "
                "or a vocab.txt)")
        print(f"note: {reason}: image figures only; the caption and attention figures are skipped "
              "(pass --tokenizer to draw them)")
        return None
    if tokenizer.vocab_size < vocab_size:
        print(f"note: the tokenizer has {tokenizer.vocab_size} ids, the model's text embedding "
              f"{vocab_size}: predicted words are read among the tokenizer's ids")
    return tokenizer


def make_batch(samples, tokenizer, text_len, transform):
    """Tensors for the model: image (B, 3, H, W) normalised, text (B, T) ids (pad 0), pad (B, T)
    True = pad; text and pad None without a tokenizer (no caption read)."""
    images = torch.stack([transform(s["image"]) for s in samples])
    if tokenizer is None:
        return dict(image=images, text=None, pad=None)
    encoded = [tokenizer.encode(s["caption"], text_len) for s in samples]
    return dict(image=images, text=torch.stack([t for t, _ in encoded]),
                pad=torch.stack([m for _, m in encoded]))


@contextmanager
def mask_ratios(model, image=None, text=None):
    """Temporarily set the model's image/text mask ratios (None keeps the checkpoint's). The encoder
    and the decoder both read them from model.config, so swapping the config is enough."""
    saved = model.config
    changes = {k: v for k, v in (("image_mask_ratio", image), ("text_mask_ratio", text))
               if v is not None}
    model.config = replace(saved, **changes)
    try:
        yield
    finally:
        model.config = saved


# -----------------------------------------------------------------------------
# reconstruction (pure functions on tensors; the tests call them)


def unnormalise_patches(pred, target):
    """Undo mae's norm_pix target: pred (B, N, P) was trained against (target - mean) / sqrt(var +
    1e-6) per patch, so map it back with the *original* patch's own mean and (unbiased) variance, as
    mae's visualisation does. This borrows two numbers per removed patch from the hidden image: say
    so wherever it is shown."""
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return pred * (var + 1e-6).sqrt() + mean


@torch.no_grad()
def reconstruct(model, images=None, text=None, pad=None, image_noise=None, text_noise=None,
                vocab_size=None):
    """One masked forward pass with fixed noise; any modality may be None (image-only, text-only).

    Returns a dict (image entries None without images, text entries None without text):
      pasted (B, 3, H, W): the input on visible patches, exactly; the prediction on removed ones
      prediction (B, 3, H, W): the prediction on every patch
      image_mask (B, N) float, 1 = removed; image_mse (B,): the training loss on removed patches
      text_mask (B, T) float, 1 = removed; text_logits (B, T, V)
      text_pred (B, T): top-1 ids among the first vocab_size (the tokenizer's; None: all)
    Images are in the normalised space they came in. With config.norm_pix_loss the prediction is
    un-normalised with each original patch's mean/std first (unnormalise_patches); image_mse stays
    in the loss's own space.
    """
    c = model.config
    device = model.cls_token.device
    to = lambda x: None if x is None else x.to(device)
    out = model.reconstruct(to(images), to(text), to(pad), to(image_noise), to(text_noise))
    res = dict(pasted=None, prediction=None, image_mask=None, image_mse=None, text_mask=None,
               text_pred=None, text_logits=None)
    if images is not None:
        target = patchify(images.to(device), c.patch_size)  # (B, N, P)
        pred, mask = out["image_pred"].float(), out["image_mask"]
        mse = patch_mse(pred, target, c.norm_pix_loss)  # (B, N): the training loss's terms
        res["image_mse"] = torch.stack([per_sample_mean(mse[i : i + 1], mask[i : i + 1])
                                        for i in range(len(pred))]).cpu()
        if c.norm_pix_loss:
            pred = unnormalise_patches(pred, target)
        # where, not target * (1 - mask) + pred * mask: visible patches must come back bit for bit
        pasted = torch.where(mask[:, :, None].bool(), pred, target)
        res.update(pasted=unpatchify(pasted, c.patch_size).cpu(),
                   prediction=unpatchify(pred, c.patch_size).cpu(), image_mask=mask.cpu())
    if text is not None:
        logits = out["text_logits"].float().cpu()
        res.update(text_mask=out["text_mask"].cpu(), text_logits=logits,
                   text_pred=logits[..., :vocab_size].argmax(dim=-1))
    return res


def text_accuracy(text, pad, text_mask, text_pred):
    """Per sample (right, removed): how many removed, non-padding slots the top-1 gets right."""
    removed = text_mask.bool() & ~pad  # (B, T)
    right = (removed & (text_pred == text)).sum(dim=1)
    return list(zip(right.tolist(), removed.sum(dim=1).tolist()))


# -----------------------------------------------------------------------------
# words and attention


def piece(tokenizer, i):
    """(text, starts_word) of one id, for display, from the tokenizer's pieces() and starts_word()
    (either kind): '' for a sentencepiece piece that is only the word marker (a word starts)."""
    shown, starts = tokenizer.pieces([int(i)])[0], tokenizer.starts_word([int(i)])[0]
    return ("" if shown == "\u2581" else shown), starts


def caption_words(tokenizer, ids, pad):
    """The caption's words as a list of (text, slots): slots are the text positions of the word's
    pieces. A piece that starts a word (tokenizer.starts_word) opens a new one; padding skipped."""
    words = []
    for slot, (i, is_pad) in enumerate(zip(ids.tolist(), pad.tolist())):
        if is_pad:
            continue
        text, starts = piece(tokenizer, i)
        if starts or not words:
            words.append([text, [slot]])
        else:
            words[-1][0] += text
            words[-1][1].append(slot)
    return [(text or "_", slots) for text, slots in words]


def pick_word(words, word=None, common=frozenset()):
    """Index into words of the word to map: `word` (case-insensitive; a word that starts with it if
    none is equal), else the first shape name (SHAPE_NAMES), else the first non-stop word that is not
    in `common` (words every shown caption has, like "photo" in "a photo of a ..."), else the first
    non-stop word, else the first word. None when the caption is empty. Returns (index, whether
    `word` was found)."""
    if not words:
        return None, False
    texts = [t.lower() for t, _ in words]
    if word:
        w = word.lower()
        for match in ([k for k, t in enumerate(texts) if t == w],
                      [k for k, t in enumerate(texts) if t.startswith(w)]):
            if match:
                return match[0], True
    for allowed in (lambda t: t in SHAPE_NAMES,
                    lambda t: t.isalpha() and t not in STOP_WORDS and t not in common,
                    lambda t: t.isalpha() and t not in STOP_WORDS):
        hits = [k for k, t in enumerate(texts) if allowed(t)]
        if hits:
            return hits[0], False
    return 0, False


def attention_rows(weights, queries, atol=1e-5):
    """Head-averaged attention rows, (L, B, S). weights: per layer a (B, nh, S, S) tensor
    (model.attention_maps); queries: per sample, a list of sequence positions (their rows are
    averaged: a word of several pieces), or [] (that sample's rows come back as zeros).
    Every row used is checked to sum to 1 over the whole sequence (CLS, patches and text): softmax
    rows do, and a map that silently read a padded or malformed row would be wrong."""
    L, B, S = len(weights), weights[0].size(0), weights[0].size(-1)
    out = torch.zeros(L, B, S)
    for l, w in enumerate(weights):
        for b, q in enumerate(queries):
            if not q:
                continue
            rows = w[b, :, q].float().cpu()  # (nh, len(q), S)
            sums = rows.sum(dim=-1)
            if not torch.allclose(sums, torch.ones_like(sums), atol=atol):
                raise AssertionError(f"layer {l + 1}, sample {b}: attention rows sum to "
                                     f"{sums.min():.6f}..{sums.max():.6f}, not 1")
            out[l, b] = rows.mean(dim=(0, 1))
    return out


def word_attention(model, images, text, pad, word_slots):
    """Each sample's word -> image patches attention. word_slots: per sample, the word's text slots
    (or []). Returns (maps (L, B, G, G): the attention weight on each patch, not renormalised, so a
    map's sum is the share of the word's attention that goes to the image; rows (L, B, S): the full
    head-averaged rows)."""
    c = model.config
    device = model.cls_token.device
    with torch.no_grad():
        weights = model.attention_maps(images.to(device), text.to(device), pad.to(device))
    N = c.num_patches
    rows = attention_rows(weights, [[1 + N + s for s in slots] for slots in word_slots])
    return rows[:, :, 1 : 1 + N].reshape(len(weights), len(images), c.grid_size, c.grid_size), rows


def patch_attention(model, images, text, pad, patches, words):
    """Each sample's patch -> caption words attention. patches: per sample (row, col); words: per
    sample, caption_words(). Returns (per_word (L, B, max words): the attention weight on each word
    (its pieces summed), not renormalised; rows (L, B, S))."""
    c = model.config
    device = model.cls_token.device
    with torch.no_grad():
        weights = model.attention_maps(images.to(device), text.to(device), pad.to(device))
    N, G = c.num_patches, c.grid_size
    rows = attention_rows(weights, [[1 + r * G + col] for r, col in patches])
    per_word = torch.zeros(len(weights), len(images), max([len(w) for w in words] + [1]))
    for b, ws in enumerate(words):
        for k, (_, slots) in enumerate(ws):
            per_word[:, b, k] = rows[:, b, [1 + N + s for s in slots]].sum(dim=-1)
    return per_word, rows


def default_patch(sample, config):
    """(row, col) under the main object's centre (built-in data), else the centre patch."""
    G, p = config.grid_size, config.patch_size
    if sample.get("box") is None:
        return G // 2, G // 2
    x0, y0, x1, y1 = sample["box"]
    clamp = lambda v: min(G - 1, max(0, int(v // p)))
    return clamp((y0 + y1) / 2), clamp((x0 + x1) / 2)


def parse_patch(spec, grid_size):
    """--patch 'ROW,COL' -> (row, col), checked against the grid (0-based)."""
    try:
        r, c = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--patch wants ROW,COL, got {spec!r}") from None
    if not (0 <= r < grid_size and 0 <= c < grid_size):
        raise SystemExit(f"--patch {spec}: the grid is {grid_size}x{grid_size} (0-based)")
    return r, c


# -----------------------------------------------------------------------------
# drawing: a title band, then one row per sample of labelled cells, with text below; PIL only


MARGIN, GAP, LABEL_H, LINE, TITLE_LINE = 10, 12, 18, 16, 20
MIN_WIDTH = 1120  # every figure is at least this wide, so that the title lines fit
TITLE_LINES = 4  # every title: what and which checkpoint, the data, two lines on how to read it
WORD_W, HEAT_W, BAR_W = 110, 26, 220  # patch-attention table: words, a heat cell per layer, the bar
MASK_GREY = (128, 128, 128)  # removed patches, as mae's figures
GREEN, RED, BLUE, GREY = (0, 130, 0), (200, 0, 0), (20, 60, 200), (140, 140, 140)  # text
BAR_BLUE, PATCH_BOX = (60, 110, 200), (0, 255, 255)  # patch attention: bars, the patch's outline


def font(size):
    """PIL's bundled font at `size` px (the bitmap one, fixed size, on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


@dataclass
class Layout:
    """Where everything goes: canvas size, the top of each row, the left of each column."""

    size: tuple
    title_h: int
    row_y: list
    col_x: list


def grid_layout(title_lines, col_widths, row_heights):
    """A canvas with a title band of `title_lines` lines, columns of the given widths (GAP apart)
    and rows of the given heights, MARGIN around; at least MIN_WIDTH wide."""
    title_h = MARGIN + TITLE_LINE * title_lines + 6
    col_x, x = [], MARGIN
    for w in col_widths:
        col_x.append(x)
        x += w + GAP
    row_y, y = [], title_h
    for h in row_heights:
        row_y.append(y)
        y += h
    return Layout((max(MIN_WIDTH, x - GAP + MARGIN), y + MARGIN), title_h, row_y, col_x)


RECON_TEXT = 4  # text items under a recon row: caption, masked, paired and text-only predictions
CAPTION_TEXT = 2  # own caption, other caption
TEXT_ITEM_LINES = 2  # lines per text item (longer captions end in "...")


def recon_layout(n, S, text=True):
    """n rows of five S x S cells with labels above and RECON_TEXT two-line text items below;
    without text (no tokenizer), four cells and nothing below."""
    below = RECON_TEXT * TEXT_ITEM_LINES * LINE if text else 0
    return grid_layout(TITLE_LINES, [S] * (5 if text else 4), [LABEL_H + S + 6 + below + GAP] * n)


def caption_layout(n, S, other=True):
    """n rows of six S x S cells, then the two captions used; other=False (no other caption): five
    cells and one caption."""
    texts = CAPTION_TEXT if other else CAPTION_TEXT - 1
    return grid_layout(TITLE_LINES, [S] * (6 if other else 5),
                       [LABEL_H + S + 6 + texts * TEXT_ITEM_LINES * LINE + GAP] * n)


def word_layout(n, S, depth):
    """n rows: the image (S), one S/2 map per layer, the last layer again at S; a caption below."""
    return grid_layout(TITLE_LINES, [S] + [S // 2] * depth + [S],
                       [LABEL_H + S + 6 + TEXT_ITEM_LINES * LINE + GAP] * n)


def patch_layout(word_counts, S, depth):
    """One row per sample: the image (S) and a table with one line per caption word (word, a heat
    cell per layer, the last layer's bar and value); two text lines below. word_counts: the
    caption's words per sample."""
    table_w = WORD_W + depth * HEAT_W + GAP + BAR_W + 60
    rows = [LABEL_H + max(S, (1 + max(k, 1)) * LINE) + 6 + 2 * LINE + GAP for k in word_counts]
    return grid_layout(TITLE_LINES, [S, table_w], rows)


@dataclass
class View:
    """How tensors become pictures: the normalisation to undo and the display magnification."""

    mean: tuple
    std: tuple
    scale: int
    image_size: int

    @property
    def S(self):
        return self.image_size * self.scale

    def pil(self, x):
        """(3, H, W) normalised -> PIL RGB, S x S, nearest-neighbour (a pixel: a scale^2 block)."""
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (self.mean, self.std))
        x = x.float().cpu() * std + mean
        a = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(a).resize((self.S, self.S), Image.NEAREST)


def grey_out(img, mask, grid_size):
    """Paint removed patches (mask (N,) 1 = removed, row-major) grey on a square PIL image."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    side = img.size[0] / grid_size  # a patch's side in display pixels
    for k in torch.nonzero(mask.bool()).flatten().tolist():
        r, c = divmod(k, grid_size)
        box = (round(c * side), round(r * side), round((c + 1) * side) - 1,
               round((r + 1) * side) - 1)
        draw.rectangle(box, fill=MASK_GREY)
    return img


def heat_colours(v):
    """(...,) values in [0, 1] -> (..., 3) uint8: black - purple - red - orange - pale yellow (a
    perceptually ordered ramp, bright = high), linear between five anchors."""
    anchors = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
                       dtype=np.float64)
    t = np.clip(np.asarray(v, dtype=np.float64), 0, 1) * (len(anchors) - 1)
    i = np.minimum(t.astype(int), len(anchors) - 2)
    f = (t - i)[..., None]
    return (anchors[i] * (1 - f) + anchors[i + 1] * f).round().astype(np.uint8)


def heat_overlay(img, heat, alpha=0.6):
    """A (G, G) map over a greyed copy of img, scaled from its own min (dark) to its max (bright):
    nearly uniform attention would otherwise paint every patch the same colour. The figure states
    the map's total separately."""
    h = heat.float().numpy()
    span = h.max() - h.min()
    h = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    colours = Image.fromarray(heat_colours(h)).resize(img.size, Image.NEAREST)
    return Image.blend(img.convert("L").convert("RGB"), colours, alpha)


def new_canvas(layout, title):
    """A white canvas of layout.size with the title lines drawn (the first in a larger font)."""
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title):
        f = font(15 if k == 0 else 13)
        line = fit(draw, line, layout.size[0] - 2 * MARGIN, f)
        draw.text((MARGIN, MARGIN + TITLE_LINE * k), line, font=f, fill="black")
    return canvas, draw


def fit(draw, text, width, f):
    """text, cut to fit `width` pixels (ending in '...' when cut)."""
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "...", font=f) > width:
        text = text[:-1]
    return text + "..."


def cell(canvas, draw, x, y, label, img):
    """An image with its label above."""
    draw.text((x, y + 2), fit(draw, label, img.size[0], font(12)), font=font(12), fill="black")
    canvas.paste(img, (x, y + LABEL_H))


def token_chips(tokenizer, ids, pad, removed=None, pred=None, blank=False):
    """One caption as chips (text, colour, starts_word), padding skipped. removed (T,) bool marks
    removed slots: with blank they show as '___', with pred (T,) ids as the top-1 piece in
    [brackets], green if right and red if wrong (visible slots grey, for context); with neither,
    removed slots are blue."""
    chips = []
    for slot, (i, is_pad) in enumerate(zip(ids.tolist(), pad.tolist())):
        if is_pad:
            continue
        text, starts = piece(tokenizer, i)
        hidden = removed is not None and bool(removed[slot])
        if not hidden:
            chips.append((text, GREY if pred is not None else "black", starts))
        elif blank:
            chips.append(("___", GREY, starts))
        elif pred is not None:
            p_text, p_starts = piece(tokenizer, pred[slot])
            chips.append((f"[{p_text or '_'}]", GREEN if int(pred[slot]) == i else RED, p_starts))
        else:
            chips.append((text or "_", BLUE, starts))
    return chips


def draw_chips(draw, x, y, width, chips, lines=TEXT_ITEM_LINES, f=None):
    """Lay chips out left to right from (x, y), a space before each word start, wrapping within
    `width` for at most `lines` lines; what does not fit becomes '...'."""
    f = f or font(13)
    cx, line = x, 0
    for k, (text, colour, starts) in enumerate(chips):
        piece = (" " if starts and cx > x else "") + text
        w = draw.textlength(piece, font=f)
        if cx + w > x + width and cx > x:
            line, cx = line + 1, x
            if line == lines:
                draw.text((x + width - draw.textlength("...", font=f), y + LINE * (lines - 1)),
                          "...", font=f, fill="black")
                return
            piece, w = text, draw.textlength(text, font=f)
        draw.text((cx, y + LINE * line), piece, font=f, fill=colour)
        cx += w


def text_item(draw, x, y, width, label, chips, label_w=150):
    """A bold-ish label and its chips (TEXT_ITEM_LINES lines)."""
    draw.text((x, y), label, font=font(13), fill="black")
    draw_chips(draw, x + label_w, y, width - label_w, chips or [("(no caption)", GREY, True)])


def save(canvas, path, true_colour=False, folder=None):
    """PNG; 256 colours unless true_colour (the noisy images make true-colour PNGs about 4 times
    larger). The palette: the drawing's own colours exactly (mask grey, text colours), the rest
    chosen by maximum coverage, not median cut: median cut spends its colours on large areas and
    turned a small yellow shape orange. Written atomically, and listed in FOLDER/outputs.txt when
    inside FOLDER (evalcommon.write_output)."""
    if not true_colour:
        fixed = [(255, 255, 255), (0, 0, 0), MASK_GREY, GREEN, RED, BLUE, GREY, BAR_BLUE, PATCH_BOX]
        free = canvas.quantize(256 - len(fixed), method=Image.Quantize.MAXCOVERAGE,
                               dither=Image.Dither.NONE)
        palette = Image.new("P", (1, 1))
        palette.putpalette(free.getpalette()[: 3 * (256 - len(fixed))]
                           + [v for c in fixed for v in c])
        canvas = canvas.quantize(palette=palette, dither=Image.Dither.NONE)  # the nearest colour
    try:
        return write_output(path, lambda f: canvas.save(f, format="PNG", optimize=True), "png",
                            folder=folder)
    except OSError as e:
        raise SystemExit(f"{path} not written: {e.strerror or e}") from None


# -----------------------------------------------------------------------------
# the figures: each returns the canvas (main saves it)


def header(what, ctx, extra):
    """Title lines: what is shown, the checkpoint and its step, the data and masking, then extra."""
    c = ctx["config"]
    step = ctx["ckpt"].get("step", "?")
    no_text = ctx["ckpt"].get("args", {}).get("no_text")
    no_text = " (trained --no-text: the text path is untrained)" if no_text else ""
    lines = [f"{what} | checkpoint {ctx['ckpt_path']} (step {step}){no_text}",
             f"{ctx['source']} | {c.image_size} px, {c.patch_size} px patches ({c.grid_size}x"
             f"{c.grid_size} grid), shown x{ctx['view'].scale} | masking seed {ctx['seed']}"]
    assert len(lines + extra) == TITLE_LINES, "the layouts reserve TITLE_LINES title lines"
    return lines + extra


def figure_recon(model, tokenizer, batch, noise, view, ctx, samples):
    """Reconstructions: paired, image-only and text-only, with the same noise for each; without a
    tokenizer (no caption read) the image-only one alone."""
    c = model.config
    images, text, pad = batch["image"], batch["text"], batch["pad"]
    image_only = reconstruct(model, images, image_noise=noise[0])
    norm_pix = ("; norm_pix targets: predictions un-normalised with each ORIGINAL patch's mean/std "
                "(as mae's visualisation; it borrows those from the hidden image)"
                if c.norm_pix_loss else "")
    if text is None:
        paired, lines = image_only, [
            f"image mask {c.image_mask_ratio:g}; MSE = training image loss on removed "
            f"patches{norm_pix}", "no caption read (no tokenizer): image-only mode, MAE's"]
    else:
        vocab = tokenizer.vocab_size  # predictions are read among the tokenizer's ids
        paired = reconstruct(model, images, text, pad, *noise, vocab_size=vocab)
        text_only = reconstruct(model, text=text, pad=pad, text_noise=noise[1], vocab_size=vocab)
        acc_paired = text_accuracy(text, pad, paired["text_mask"], paired["text_pred"])
        acc_text = text_accuracy(text, pad, text_only["text_mask"], text_only["text_pred"])
        lines = [f"image mask {c.image_mask_ratio:g}, text mask {c.text_mask_ratio:g} (padding "
                 f"slots counted, as in training); MSE = training image loss on removed "
                 f"patches{norm_pix}",
                 "text: removed slots blue in the caption, blanks in the masked caption; [top-1 "
                 "prediction] green = right, red = wrong (M3AE: image + visible words; text-only: "
                 "no image)"]
    what = "image and caption" if text is not None else "image only"
    title = header(f"Masked reconstruction ({what})", ctx, lines)
    S, n = view.S, len(images)
    lay = recon_layout(n, S, text=text is not None)
    canvas, draw = new_canvas(lay, title)
    for i in range(n):
        y, mask = lay.row_y[i], paired["image_mask"][i]
        original = view.pil(images[i])
        cells = [(samples[i]["name"], original),
                 (f"masked input ({int(mask.sum())}/{len(mask)} removed)",
                  grey_out(original, mask, c.grid_size)),
                 (f"reconstruction + visible (MSE {paired['image_mse'][i]:.3f})",
                  view.pil(paired["pasted"][i])),
                 ("raw prediction, every patch", view.pil(paired["prediction"][i]))]
        if text is not None:
            cells.append((f"image-only, no caption (MSE {image_only['image_mse'][i]:.3f})",
                          view.pil(image_only["pasted"][i])))
        for (label, img), x in zip(cells, lay.col_x):
            cell(canvas, draw, x, y, label, img)
        if text is None:
            continue
        x, ty, width = lay.col_x[0], y + LABEL_H + S + 6, lay.size[0] - 2 * MARGIN
        removed = paired["text_mask"][i].bool()
        chips = lambda **k: token_chips(tokenizer, text[i], pad[i], removed, **k)
        items = [("caption:", chips()), ("masked caption:", chips(blank=True)),
                 ("M3AE (%d/%d right):" % acc_paired[i], chips(pred=paired["text_pred"][i])),
                 ("text-only (%d/%d):" % acc_text[i], chips(pred=text_only["text_pred"][i]))]
        for k, (label, chips) in enumerate(items):
            text_item(draw, x, ty + k * TEXT_ITEM_LINES * LINE, width, label, chips)
    return canvas


def other_captions(samples, other_caption=None):
    """The 'different caption' for each sample, from the user's data: --other-caption, else the next
    sample's (cyclically; on built-in data the next one with another label when there is one). A
    single sample and no --other-caption: None (no other caption: the figure drops that column)."""
    if other_caption is not None:
        return [other_caption] * len(samples)
    if len(samples) == 1:
        return None
    out = []
    for i, s in enumerate(samples):
        others = [samples[(i + k) % len(samples)] for k in range(1, len(samples))]
        differ = [o for o in others
                  if o.get("label") is not None and o.get("label") != s.get("label")]
        out.append((differ or others)[0]["caption"])
    return out


def figure_caption(model, tokenizer, batch, noise, view, ctx, samples, other, text_mask_ratio=0.0):
    """The same masked image (same noise) with its caption, no caption and another caption (other:
    one caption per sample, or None: no other caption, that column left out). Returns the canvas and
    the (B, 3) MSEs (own, none, other), (B, 2) without another caption."""
    c = model.config
    images, text, pad = batch["image"], batch["text"], batch["pad"]
    with mask_ratios(model, text=text_mask_ratio):
        own = reconstruct(model, images, text, pad, *noise)
        if other is not None:
            encoded = [tokenizer.encode(o, c.text_len) for o in other]
            other_text = torch.stack([t for t, _ in encoded])
            other_pad = torch.stack([m for _, m in encoded])
            swapped = reconstruct(model, images, other_text, other_pad, *noise)
    none = reconstruct(model, images, image_noise=noise[0])  # image-only mode: MAE's, no caption
    mses = [own["image_mse"], none["image_mse"]]
    if other is not None:
        mses.append(swapped["image_mse"])
    mse = torch.stack(mses, dim=1)  # (B, 3), or (B, 2) without another caption
    mean = mse.mean(dim=0).tolist()
    change = (own["pasted"] - none["pasted"]).norm(dim=1)  # (B, H, W): what the caption changed
    top = change.max().clamp(min=1e-12)  # one scale for every row, so that rows compare
    title = header("Does the caption change the image reconstruction?", ctx, [
        f"the same image noise for all three (image mask {c.image_mask_ratio:g}); caption text "
        f"mask {text_mask_ratio:g} (0 = the whole caption visible); no caption = image-only mode",
        f"MSE = training image loss on removed patches (lower = better); mean: own caption "
        f"{mean[0]:.4f}, no caption {mean[1]:.4f}, "
        + (f"other {mean[2]:.4f}" if other is not None else "no other caption given")
        + "; last column: |own - none| per pixel, one scale for all rows"])
    S, n = view.S, len(images)
    lay = caption_layout(n, S, other is not None)
    canvas, draw = new_canvas(lay, title)
    for i in range(n):
        y, mask = lay.row_y[i], own["image_mask"][i]
        original = view.pil(images[i])
        cells = [(samples[i]["name"], original),
                 (f"masked input ({int(mask.sum())}/{len(mask)} removed)",
                  grey_out(original, mask, c.grid_size)),
                 (f"with its caption: MSE {mse[i, 0]:.4f}", view.pil(own["pasted"][i])),
                 (f"no caption: MSE {mse[i, 1]:.4f}", view.pil(none["pasted"][i]))]
        if other is not None:
            cells.append((f"other caption: MSE {mse[i, 2]:.4f}", view.pil(swapped["pasted"][i])))
        heat = Image.fromarray(heat_colours((change[i] / top).numpy()))
        heat = heat.resize((S, S), Image.NEAREST)
        cells.append((f"change made by its caption (max {change[i].max():.3f})", heat))
        for (label, img), x in zip(cells, lay.col_x):
            cell(canvas, draw, x, y, label, img)
        x, ty, width = lay.col_x[0], y + LABEL_H + S + 6, lay.size[0] - 2 * MARGIN
        text_item(draw, x, ty, width, "its caption:", token_chips(tokenizer, text[i], pad[i]))
        if other is not None:
            text_item(draw, x, ty + TEXT_ITEM_LINES * LINE, width, "other caption:",
                      token_chips(tokenizer, other_text[i], other_pad[i]))
    return canvas, mse


def figure_word_attention(model, tokenizer, batch, view, ctx, samples, word=None):
    """Figure 7: a word's attention over the image patches, per layer and the last layer larger."""
    images, text, pad = batch["image"], batch["text"], batch["pad"]
    words = [caption_words(tokenizer, text[i], pad[i]) for i in range(len(images))]
    # a word every caption shares says nothing about its image: map one that tells them apart
    shared = set.intersection(*[{t.lower() for t, _ in ws} for ws in words]) if len(words) > 1 \
        else set()
    chosen = [pick_word(ws, word, frozenset(shared)) for ws in words]
    if word and not all(found for (k, found), ws in zip(chosen, words) if ws):
        print(f"viz: --word {word!r} is not in every caption; those rows show their default word "
              "instead")
    slots = [ws[k][1] if k is not None else [] for (k, _), ws in zip(chosen, words)]
    maps, _ = word_attention(model, images, text, pad, slots)  # (L, B, G, G)
    title = header("Attention: word -> image patches (paper Fig. 7)", ctx, [
        "encoder on the whole unmasked image and caption, math attention path, averaged over "
        "heads; a word of several pieces averages their rows",
        "weights not renormalised; each map coloured from its own min (dark) to max (bright); % = "
        "share of the word's attention that goes to image patches (the rest: CLS and words)"])
    S, n, L = view.S, len(images), len(maps)
    lay = word_layout(n, S, L)
    canvas, draw = new_canvas(lay, title)
    for i in range(n):
        y = lay.row_y[i]
        original = view.pil(images[i])
        cell(canvas, draw, lay.col_x[0], y, samples[i]["name"], original)
        k = chosen[i][0]
        if k is None:
            draw.text((lay.col_x[1], y + LABEL_H), "(no caption: no word to map)", font=font(13),
                      fill=GREY)
            continue
        small = original.resize((S // 2, S // 2), Image.NEAREST)
        for l in range(L):
            cell(canvas, draw, lay.col_x[1 + l], y, f"layer {l + 1}: {maps[l, i].sum():.0%}",
                 heat_overlay(small, maps[l, i]))
        label = f"last layer ({L}): '{words[i][k][0]}', {maps[-1, i].sum():.0%} on image"
        cell(canvas, draw, lay.col_x[-1], y, label, heat_overlay(original, maps[-1, i]))
        chips = [(t, RED if j == k else "black", True) for j, (t, _) in enumerate(words[i])]
        text_item(draw, lay.col_x[0], y + LABEL_H + S + 6, lay.size[0] - 2 * MARGIN, "word (red):",
                  chips, 100)
    return canvas


def figure_patch_attention(model, tokenizer, batch, view, ctx, samples, patches):
    """Figure 8: a patch's attention over the caption's words, per layer (heat) and the last layer
    (bars)."""
    c = model.config
    images, text, pad = batch["image"], batch["text"], batch["pad"]
    words = [caption_words(tokenizer, text[i], pad[i]) for i in range(len(images))]
    per_word, rows = patch_attention(model, images, text, pad, patches, words)  # (L,B,W), (L,B,S)
    on_text = rows[:, :, 1 + c.num_patches :].sum(dim=-1)  # (L, B): the patch's share on words
    title = header("Attention: image patch -> caption words (paper Fig. 8)", ctx, [
        "encoder on the whole unmasked image and caption, math attention path, averaged over "
        "heads; a word's weight sums its pieces",
        "not renormalised: weight = share of the patch's whole attention row (CLS, patches, "
        "words); heat cells are scaled to each layer's max, bars to the last layer's max"])
    S, n, L = view.S, len(images), len(per_word)
    lay = patch_layout([len(w) for w in words], S, L)
    canvas, draw = new_canvas(lay, title)
    f = font(12)
    for i in range(n):
        y, (r, col) = lay.row_y[i], patches[i]
        img = view.pil(images[i])
        px = S / c.grid_size
        box = (round(col * px), round(r * px), round((col + 1) * px) - 1, round((r + 1) * px) - 1)
        ImageDraw.Draw(img).rectangle(box, outline=PATCH_BOX, width=2)
        cell(canvas, draw, lay.col_x[0], y, f"{samples[i]['name']}, patch ({r},{col}) boxed", img)
        x0 = lay.col_x[1]
        heat_x, bar_x = x0 + WORD_W, x0 + WORD_W + L * HEAT_W + GAP
        draw.text((x0, y + 2), "word", font=f, fill="black")
        for l in range(L):
            draw.text((heat_x + l * HEAT_W + 4, y + 2), f"L{l + 1}", font=f, fill="black")
        draw.text((bar_x, y + 2), f"last layer ({L})", font=f, fill="black")
        ws = words[i]
        if not ws:
            draw.text((x0, y + LABEL_H), "(no caption)", font=font(13), fill=GREY)
        w = per_word[:, i, : len(ws)]  # (L, words)
        top = w.max(dim=1).values.clamp(min=1e-12) if ws else None  # per layer
        for k, (t, _) in enumerate(ws):
            ty = y + LABEL_H + k * LINE
            draw.text((x0, ty), fit(draw, t, WORD_W - 6, f), font=f, fill="black")
            for l in range(L):
                colour = tuple(int(v) for v in heat_colours(float(w[l, k] / top[l])))
                x = heat_x + l * HEAT_W
                draw.rectangle((x, ty, x + HEAT_W - 2, ty + LINE - 2), fill=colour)
            length = round(BAR_W * float(w[-1, k] / top[-1]))
            draw.rectangle((bar_x, ty + 2, bar_x + max(length, 1), ty + LINE - 3), fill=BAR_BLUE)
            draw.text((bar_x + BAR_W + 6, ty), f"{w[-1, k]:.1%}", font=f, fill="black")
        ty = y + LABEL_H + max(S, (1 + max(len(ws), 1)) * LINE) - LINE + 6
        share = ", ".join(f"L{l + 1} {on_text[l, i]:.0%}" for l in range(L))
        caption = " ".join(textwrap.shorten(samples[i]["caption"], 200).split())
        for k, line in enumerate([f"share of the patch's attention on the caption: {share}",
                                  f"caption: {caption}"]):
            line = fit(draw, line, lay.size[0] - 2 * MARGIN, font(13))
            draw.text((lay.col_x[0], ty + (k + 1) * LINE), line, font=font(13), fill="black")
    return canvas


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    try:
        model, ckpt = read_model(args.ckpt)
    except CheckpointError as e:
        die("viz.py", f"--ckpt {e}")
    model = model.to(args.device).eval()
    c = model.config
    tokenizer = load_tokenizer(args, ckpt, c.vocab_size)
    samples, source = load_samples(args, ckpt, c.image_size)
    mean, std = NORMS[args.norm] if args.norm != "auto" else checkpoint_norm(ckpt)
    view = View(mean, std, args.scale or max(1, 256 // c.image_size), c.image_size)
    batch = make_batch(samples, tokenizer, c.text_len,
                       data.EvalTransform(c.image_size, mean, std, args.crop_pct))
    noise = masking_noise(args.seed, len(samples), c.num_patches, c.text_len)
    patches = [parse_patch(args.patch, c.grid_size) if args.patch else default_patch(s, c)
               for s in samples]
    run_dir = os.path.dirname(os.path.abspath(args.ckpt))
    out_dir = args.out_dir or os.path.join(run_dir, "viz")
    ctx = dict(config=c, ckpt=ckpt, ckpt_path=args.ckpt, source=source, view=view, seed=args.seed)
    modes = MODES if args.mode == "all" else (args.mode,)
    if tokenizer is None:
        modes = [m for m in modes if m == "recon"]  # load_tokenizer said so
    written = {}
    png = lambda key, canvas, name: written.update(
        {key: save(canvas, os.path.join(out_dir, name), args.true_colour, run_dir)})

    with mask_ratios(model, args.image_mask_ratio, args.text_mask_ratio):
        ctx["config"] = model.config  # the titles report the ratios actually used
        if "recon" in modes:
            png("recon", figure_recon(model, tokenizer, batch, noise, view, ctx, samples),
                "recon.png")
        if "caption" in modes:
            other = other_captions(samples, args.other_caption)
            if other is None:
                print("caption effect: a single sample and no --other-caption, so no 'other "
                      "caption' column (give --other-caption TEXT, or a second --image with its "
                      "--caption)")
            elif args.image and not args.caption and args.other_caption is None:
                print("caption effect: the --image samples have no --caption, so the 'other "
                      "caption' (the next image's) is empty too")
            canvas, mse = figure_caption(model, tokenizer, batch, noise, view, ctx, samples, other,
                                         args.caption_text_mask_ratio)
            png("caption", canvas, "caption_effect.png")
            means = mse.mean(dim=0).tolist()
            print(f"caption effect, MSE on removed patches (mean of {len(mse)}): own caption "
                  f"{means[0]:.4f} | no caption {means[1]:.4f} | "
                  + (f"other caption {means[2]:.4f}" if other is not None else "no other caption")
                  + f" | own < none in {int((mse[:, 0] < mse[:, 1]).sum())}/{len(mse)} samples")
        if "attention" in modes:
            png("attention_word", figure_word_attention(model, tokenizer, batch, view, ctx, samples,
                                                        args.word), "attention_word.png")
            png("attention_patch", figure_patch_attention(model, tokenizer, batch, view, ctx,
                                                          samples, patches), "attention_patch.png")
    for name, path in written.items():
        print(f"{name}: {path}")
    return written


if __name__ == "__main__":
    main()
