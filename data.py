"""Data for M3AE: everything between the user's files on disk and the tensors model.py eats.

Conventions (model.py's, restated):
  * images (3, H, W) float32, normalised with the dataset's mean/std (CC12M_* for real data).
  * text (T,) int64 token ids (tokenizer.py), pad id 0 (PAD_ID), no special tokens;
    text_padding_mask (T,) bool, True = padding.
  * a pretraining sample is a dict: image, text, text_padding_mask, has_image, has_text (0-d bool
    tensors). Image-only: text all PAD, mask all True, has_text False. Text-only: image all zeros,
    has_image False.
  * a labelled sample (probe, OOD) is dict(image, label (0-d int64)).

Bad input never raises out of a dataset. A sample that cannot be used comes back as a dict with a
"skip" key naming the reason (plus zero placeholders of the right shapes, so that a batch of nothing
but skips still has 0-row tensors); `collate` drops it and counts it. Reasons: missing, broken_link
(a symlink whose target is gone, or a loop of links), unreadable, empty_file, corrupt (truncated,
undecodable, not an image), too_large (decompression bomb), empty_caption (a text-only sample with
nothing to read), missing_shard / corrupt_shard (a shard gone or damaged while reading). Inputs that
can be repaired are converted and counted as "converted:<what>": cmyk, greyscale, high_bit_depth,
palette, alpha (composited on white), other_mode, exif_rotated (turned or mirrored upright by its
EXIF Orientation), non_utf8 (caption bytes decoded with U+FFFD replacement), long_caption (cut to
MAX_CAPTION_CHARS characters), empty_caption (a pair whose caption is empty becomes image-only). A
source that cannot be used at all (no such file or folder, nothing in it, no such column, a shard
pattern that matches no file, member keys that match nothing) raises ValueError when it is built:
one line naming the file and what was expected. The whole table, each row with its test:
docs/data.md.

Sources (map-style: dict(image=path | bytes | PIL, caption=str | bytes | None[, label])):
  CsvPairs, ImageFolder, ImageOnlyFolder, TextLines (and builtin.Builtin, the procedural demo set);
  and a stream, WebDatasetShards (img2dataset .tar shards, split over DDP ranks and DataLoader
  workers).
PairedDataset / LabelledDataset turn a source into model-ready samples.
"""

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
import warnings
import zlib
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

PAD_ID, UNK_ID = 0, 1
# Longest caption kept, in characters; longer ones are cut and counted ("converted:long_caption").
# Far more than any text_len of tokens needs, and it bounds the tokenizer's work per caption.
MAX_CAPTION_CHARS = 4096
# Official (m3ae_public) CC12M statistics, for real web data.
CC12M_MEAN, CC12M_STD = (0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)
# ImageNet statistics (torchvision's, used by mae and by most ViT fine-tuning code).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Largest image decoded (pixels); PIL's own bomb limit (Image.MAX_IMAGE_PIXELS) also applies.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Largest webdataset members read, by the size in their tar header (checked before reading): an
# image member (far above any photo: a 64 MiB JPEG is a 100+ MP image, refused by MAX_PIXELS anyway)
# and a caption member (.txt, .json: MAX_CAPTION_CHARS characters are 16 KiB at most; img2dataset's
# JSON adds a few KB). A larger one skips its sample ("too_large") instead of being read whole into
# memory.
MAX_IMAGE_MEMBER_BYTES = 64 << 20
MAX_CAPTION_MEMBER_BYTES = 1 << 20
# Most shards a --wds-shards pattern may name (CC12M is 1,243 shards; LAION-5B at 10,000 samples a
# shard is 500,000): '{0..999999999}' is refused before expanding it, not after filling the memory
# with names.
MAX_SHARDS = 1_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PAIRED, IMAGE_ONLY, TEXT_ONLY = 0, 1, 2  # sample roles (paired_share_roles)


# -----------------------------------------------------------------------------
# captions


def caption_text(caption, notes=None):
    """A caption as str of at most MAX_CAPTION_CHARS characters. bytes are decoded as UTF-8; invalid
    bytes become U+FFFD ("non_utf8"); a longer caption keeps its first MAX_CAPTION_CHARS characters
    ("long_caption"); the conversions are appended to `notes` (a list) when given. None -> ""."""
    if caption is None:
        return ""
    if isinstance(caption, (bytes, bytearray, memoryview)):
        raw = bytes(caption)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if notes is not None:
                notes.append("non_utf8")
            text = raw.decode("utf-8", errors="replace")
    else:
        text = str(caption)
    if len(text) > MAX_CAPTION_CHARS:
        if notes is not None:
            notes.append("long_caption")
        text = text[:MAX_CAPTION_CHARS]
    return text


# -----------------------------------------------------------------------------
# decoding: any image in, RGB out, or a reason to skip


class SkipSample(Exception):
    """Raised by load_image; datasets turn it into a {"skip": reason} sample."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def load_image(src, size=None, max_pixels=MAX_PIXELS, notes=None):
    """Decode src (a path, bytes or a PIL image) to an RGB PIL image, or raise SkipSample(reason).

    size: the side the caller will produce. JPEGs are decoded with draft mode (libjpeg's DCT scaling
    by 1/2, 1/4, 1/8) to the smallest scale whose shorter side is still >= 2 x size, and any image
    whose shorter side is >= 4 x size is then box-reduced (Image.reduce) to >= 2 x size: a 1600x1200
    photo for a 64 px crop is decoded at 200x150, not 1.9M pixels. Non-RGB modes are converted
    (CMYK; greyscale L/1; 16-bit I;16/I and float F scaled to 8 bits, not clipped; palette P with or
    without transparency; alpha RGBA/LA/PA composited on white), an EXIF Orientation other than 1 is
    applied (as
    PIL.ImageOps.exif_transpose does: "exif_rotated"), and each conversion is appended to `notes` (a
    list) when given. Skips: missing, broken_link, unreadable, empty_file, too_large (more than
    max_pixels, or PIL's decompression-bomb limit, checked from the header before decoding), corrupt
    (truncated or undecodable).
    """
    if isinstance(src, Image.Image):
        im = src
    else:
        im = _decode(src, size, max_pixels)
    upright = _upright(im)  # read now: conversions below may drop the EXIF block
    im = _to_rgb(im, notes)
    if size:
        # draft (above) and reduce work on the stored pixels. Both aim at the shorter side (draft at
        # a square box), which turning the image does not change, so the turn comes last, on the
        # fewest pixels.
        factor = min(im.size) // (2 * size)
        if factor >= 2:
            im = im.reduce(factor)
    if upright is not None:
        im = im.transpose(upright)
        if notes is not None:
            notes.append("exif_rotated")
    return im


_EXIF_ORIENTATION = 0x0112
# EXIF Orientation -> the transpose that shows the stored pixels upright
# (PIL.ImageOps.exif_transpose's table; 2, 4, 5 and 7 mirror as well). 1 is upright already; other
# values are invalid and ignored.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _upright(im):
    """The transpose that turns im upright by its EXIF Orientation, or None."""
    try:
        return _UPRIGHT.get(int(im.getexif().get(_EXIF_ORIENTATION, 1)))
    except Exception:
        # a damaged EXIF block (PIL raises several types): the pixels are fine, keep them as stored
        return None


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
    except OSError as e:  # gone, a directory, no permission, an I/O error
        if os.path.islink(path) and not os.path.exists(path):  # its target gone, or a loop of links
            raise SkipSample("broken_link") from None
        raise SkipSample("missing" if isinstance(e, FileNotFoundError) else "unreadable") from None


def _open(fp, size, max_pixels):
    with warnings.catch_warnings():
        # PIL's warning level is a skip too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
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
        except Exception:
            # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...) on bad bytes
            raise SkipSample("corrupt") from None


def _to_rgb(im, notes):
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" not in im.info:
        kind, im = "palette", im.convert("RGB")
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        rgba = im.convert("RGBA")
        kind, im = (("palette" if mode == "P" else "alpha"),
                    Image.new("RGB", im.size, (255, 255, 255)))
        im.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    elif mode in ("L", "1"):
        kind, im = "greyscale", im.convert("RGB")
    elif mode == "CMYK":
        kind, im = "cmyk", im.convert("RGB")
    elif mode.startswith("I") or mode == "F":
        # PIL's convert("L") clips 16-bit values at 255; scale instead (float images: [0, 1] or [0,
        # 255])
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
# transforms (PIL + torch; randomness from torch's global RNG, so seeding torch per sample fixes a
# sample)


def to_tensor(img, mean, std):
    """PIL RGB (H, W) -> (3, H, W) float32, (x / 255 - mean) / std."""
    m, s = _mean_std_255(tuple(mean), tuple(std))
    # channel-first before any arithmetic: broadcasting over a trailing axis of 3 is several times
    # slower
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float()
    return x.sub_(m).div_(s)


@lru_cache(maxsize=16)
def _mean_std_255(mean, std):
    return torch.tensor(mean).view(3, 1, 1) * 255, torch.tensor(std).view(3, 1, 1) * 255


def random_resized_crop_box(width, height, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (left, top, right, bottom): area fraction in `scale`,
    log-uniform aspect ratio in `ratio`, 10 tries, then a centre crop clamped to `ratio`. Uses
    torch's global RNG."""
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
    """RandomResizedCrop(image_size, scale, ratio 3/4-4/3, bicubic) + horizontal flip (p 0.5) +
    normalise."""

    def __init__(self, image_size, mean, std, scale=(0.2, 1.0), flip=True):
        self.image_size, self.mean, self.std, self.scale, self.flip = (
            image_size, mean, std, scale, flip)

    def __call__(self, img):
        box = random_resized_crop_box(*img.size, scale=self.scale)
        x = to_tensor(img.resize((self.image_size, self.image_size), Image.BICUBIC, box=box),
                      self.mean, self.std)
        return x.flip(-1) if self.flip and torch.rand(()).item() < 0.5 else x


class EvalTransform:
    """Resize the shorter side to image_size / crop_pct (bicubic), centre crop image_size,
    normalise; done as one resize of the centre box. crop_pct 1.0 on an image_size square image is
    the identity."""

    def __init__(self, image_size, mean, std, crop_pct=0.875):
        self.image_size, self.mean, self.std, self.crop_pct = image_size, mean, std, crop_pct

    def __call__(self, img):
        W, H = img.size
        side = min(W, H) * self.crop_pct  # the crop's side in source pixels
        box = ((W - side) / 2, (H - side) / 2, (W + side) / 2, (H + side) / 2)
        if not (W == H == self.image_size and side == W):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        return to_tensor(img, self.mean, self.std)


# -----------------------------------------------------------------------------
# sources on disk (map-style: records of dict(image, caption[, label]))


def _image_files(root, broken_links=False):
    """Every image under root, recursively, sorted, files before sub-folders (hidden files and
    folders left out). Symlinked folders are followed (as torchvision's ImageFolder follows them),
    each real folder once: a link back up the tree (a loop) or a second link to a listed folder adds
    nothing, so the walk ends. A link that leads nowhere (its target gone, or a loop of links) is
    left out, so that every path listed can be stat'ed; with broken_links=True it is listed too, for
    a dataset to skip and count as "broken_link"."""
    out, seen, stack = [], set(), [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")),
                                 key=lambda e: e.name)
        except OSError:  # gone since it was listed, or no permission: nothing from it (as os.walk)
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        folders = []
        for e in entries:
            if _is_dir(e):
                folders.append(e.path)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS) and (
                    broken_links or not e.is_symlink() or os.path.exists(e.path)):
                out.append(e.path)
        stack += reversed(folders)  # depth first, in name order, like os.walk
    return out


def _is_dir(entry):
    """entry.is_dir(), following a link; False for a broken one (is_dir raises on a loop of
    links)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


class CsvPairs(torch.utils.data.Dataset):
    """A CSV/TSV with a header: an image path column and a caption column. Delimiter by extension
    (.tsv, .tab: tab, no quoting; .csv: comma) or sniffed. Columns are named by image_column /
    caption_column (open_clip's --csv-img-key / --csv-caption-key, matched case-insensitively), else
    the first of filepath/image/image_path/path/file/filename and caption/text/title present.
    Relative paths are relative to the CSV's folder. Fields of any length are read (captions are cut
    later, by caption_text). Captions with invalid UTF-8 are kept as bytes, so PairedDataset can
    count them. A missing or empty file, a header with no rows, or a column it cannot find:
    ValueError naming the file (and the header it saw). need_caption=False (the MAE baseline): a
    file without a caption column is read as images alone."""

    IMAGE_COLUMNS = ("filepath", "image", "image_path", "path", "file", "filename")
    CAPTION_COLUMNS = ("caption", "text", "title")
    # the csv module's own limit is 131072 characters; C long is 32-bit on Windows
    FIELD_LIMIT = 2**31 - 1

    def __init__(self, path, image_column=None, caption_column=None, delimiter=None,
                 need_caption=True):
        self.root = os.path.dirname(os.path.abspath(path))
        ext = os.path.splitext(path)[1].lower()
        limit = csv.field_size_limit(self.FIELD_LIMIT)  # process-wide: set for this read only
        try:
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
                rows = [r for r in reader if r]  # blank lines are no rows
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except csv.Error as e:  # e.g. a NUL byte
            raise ValueError(f"{path}: not a readable CSV/TSV ({e})") from None
        except OSError as e:  # a folder, no permission
            raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
        finally:
            csv.field_size_limit(limit)
        if not any(header):
            raise ValueError(f"{path}: empty file; expected a header row naming an image and a "
                             "caption column")
        lower = [h.lower() for h in header]

        def column(name, candidates, what):
            for c in ([name] if name else candidates):
                if c.lower() in lower:
                    return lower.index(c.lower())
            looked = f"named {name!r}" if name else f"called any of {', '.join(candidates)}"
            raise ValueError(f"{path}: no {what} column {looked}; the header is "
                             f"{delimiter.join(header)!r}")

        i = column(image_column, self.IMAGE_COLUMNS, "image")
        try:
            j = column(caption_column, self.CAPTION_COLUMNS, "caption")
        except ValueError:
            if need_caption:
                raise
            j = None  # images alone
        if not rows:
            raise ValueError(f"{path}: a header and no rows")
        self.rows = [(r[i] if len(r) > i else "", None if j is None else r[j] if len(r) > j else "")
                     for r in rows]

    def __len__(self):
        return len(self.rows)

    @staticmethod
    def _caption(text):
        if text is None:
            return None
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:  # lone surrogates: the file had invalid UTF-8 here
            return text.encode("utf-8", errors="surrogateescape")

    def __getitem__(self, i):
        path, caption = self.rows[i]
        # an empty path stays "" (a missing file), not None (which would mean a text-only record)
        return dict(image=os.path.join(self.root, path) if path.strip() else "",
                    caption=self._caption(caption))

    def captions(self):
        for _, caption in self.rows:
            if caption is not None:
                yield self._caption(caption)


def _require_folder(root):
    if not os.path.exists(root):
        raise ValueError(f"{root}: no such folder")
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a folder")


def class_folders(root):
    """The class names of an ImageFolder root: its sub-folders (links followed), sorted, hidden ones
    left out."""
    return sorted(d.name for d in os.scandir(root) if _is_dir(d) and not d.name.startswith("."))


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/*.jpg -> dict(image=path, label); classes are the sorted folder names, or
    `classes` when given (another folder's list: labels index into it, and root may lack some of
    them, e.g. a test folder evaluated on the classes it has). A missing folder, one without class
    sub-folders, one with a class not in `classes`, or no image in any of them: ValueError naming
    the folder."""

    def __init__(self, root, classes=None):
        _require_folder(root)
        present = class_folders(root)
        if classes is not None and set(present) - set(classes):
            raise ValueError(f"{root}: class folders not in the training folder's: "
                             f"{', '.join(sorted(set(present) - set(classes)))}")
        self.classes = list(classes) if classes is not None else present
        if not present:
            raise ValueError(f"{root}: no class sub-folders (ImageFolder reads "
                             "root/<class>/**/*.jpg)")
        # broken links are listed: loading them skips and counts them ("broken_link")
        self.samples = [(p, k) for k, c in enumerate(self.classes) if c in present
                        for p in _image_files(os.path.join(root, c), broken_links=True)]
        if not self.samples:
            raise ValueError(f"{root}: no images in its class sub-folders "
                             f"{', '.join(self.classes)} (extensions {' '.join(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return dict(image=path, label=label)


class ImageOnlyFolder(torch.utils.data.Dataset):
    """Every image under root (recursive, sorted) -> dict(image=path, caption=None): unpaired
    images. A missing folder or one with no image at any depth: ValueError naming the folder."""

    def __init__(self, root):
        _require_folder(root)
        # loading a broken link skips it ("broken_link")
        self.files = _image_files(root, broken_links=True)
        if not self.files:
            raise ValueError(f"{root}: no images at any depth (extensions "
                             f"{' '.join(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return dict(image=self.files[i], caption=None)

    def captions(self):
        return iter(())


class TextLines(torch.utils.data.Dataset):
    """One caption per line (blank lines dropped) -> dict(image=None, caption=bytes): unpaired text.
    Lines are kept as bytes so that invalid UTF-8 is counted when decoded (PairedDataset). A missing
    file or one without a non-blank line: ValueError naming the file."""

    def __init__(self, path):
        try:
            with open(path, "rb") as f:
                self.lines = [line.rstrip(b"\r") for line in f.read().split(b"\n") if line.strip()]
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except OSError as e:  # a folder, no permission
            raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
        if not self.lines:
            raise ValueError(f"{path}: no captions (every line is blank)")

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        return dict(image=None, caption=self.lines[i])

    def captions(self):
        return iter(self.lines)


# -----------------------------------------------------------------------------
# model-ready samples


def paired_share_roles(n, paired_share, seed=0):
    """(n,) int64 roles for n pairs: 0 paired, 1 image-only, 2 text-only. round(n * paired_share)
    pairs stay paired; of the rest, half (rounded up) keep only their image and half only their
    text. Each pair has one role, so an image-only sample's caption and a text-only sample's image
    are never used: the unpaired images and texts really are unpaired (the paper's paired-share
    knob)."""
    if not 0.0 <= paired_share <= 1.0:
        raise ValueError(f"paired_share must be in [0, 1], got {paired_share}")
    n_paired = round(n * paired_share)
    n_image = (n - n_paired + 1) // 2
    roles = torch.full((n,), TEXT_ONLY, dtype=torch.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    roles[perm[:n_paired]] = PAIRED
    roles[perm[n_paired : n_paired + n_image]] = IMAGE_ONLY
    return roles


def pretrain_sample(image, caption, tokenizer, text_len, transform, role=PAIRED,
                    max_pixels=MAX_PIXELS):
    """One pretraining sample (see the module docstring) from an image source (path, bytes or PIL;
    None = no image by design, e.g. a text file) and a caption (str, bytes; None = no caption by
    design); role PAIRED / IMAGE_ONLY / TEXT_ONLY drops a modality. Never raises on bad input:
    returns a skip sample."""
    H = transform.image_size
    notes = []
    use_image = image is not None and role != TEXT_ONLY
    use_text = caption is not None and role != IMAGE_ONLY
    text, pad = (torch.full((text_len,), PAD_ID, dtype=torch.int64),
                 torch.ones(text_len, dtype=torch.bool))
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
                text_padding_mask=torch.ones(text_len, dtype=torch.bool),
                has_image=torch.tensor(False), has_text=torch.tensor(False))


def _skip(reason, placeholder):
    """A skip sample: the reason, and zero tensors of the real shapes (so an all-skipped batch has 0
    rows)."""
    return {"skip": reason, **placeholder}


class PairedDataset(torch.utils.data.Dataset):
    """source[i] = dict(image, caption) -> pretraining sample. roles (n,) from paired_share_roles,
    or None for every sample as it comes (a TextLines source gives text-only samples, an
    ImageOnlyFolder image-only)."""

    def __init__(self, source, tokenizer, text_len, transform, roles=None, max_pixels=MAX_PIXELS):
        if roles is not None and len(roles) != len(source):
            raise ValueError(f"{len(roles)} roles for {len(source)} samples")
        self.source, self.tokenizer, self.text_len, self.transform = (
            source, tokenizer, text_len, transform)
        self.roles, self.max_pixels = roles, max_pixels

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rec = self.source[i]
        role = PAIRED if self.roles is None else int(self.roles[i])
        return pretrain_sample(rec.get("image"), rec.get("caption"), self.tokenizer, self.text_len,
                               self.transform, role, self.max_pixels)


class LabelledDataset(torch.utils.data.Dataset):
    """source[i] = dict(image, label) -> dict(image (3, H, W) float32, label 0-d int64), or a skip
    sample."""

    def __init__(self, source, transform, max_pixels=MAX_PIXELS):
        self.source, self.transform, self.max_pixels = source, transform, max_pixels

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rec = self.source[i]
        label = torch.tensor(rec["label"], dtype=torch.int64)
        H = self.transform.image_size
        try:
            return dict(image=self.transform(load_image(rec["image"], H, self.max_pixels)),
                        label=label)
        except SkipSample as e:
            return _skip(e.reason, dict(image=torch.zeros(3, H, H), label=label))


# -----------------------------------------------------------------------------
# webdataset shards (img2dataset layout: key.jpg, key.txt, key.json per sample, members adjacent)


def expand_shards(spec):
    """'dir/{00000..00009}.tar' (zero-padded ranges, also {a,b}), comma lists, globs, or a list of
    those -> list of paths, in order. Every shard must be a file when this is called: a glob that
    matches nothing, or listed paths that are not files, raise ValueError naming them. So does a
    pattern of more than MAX_SHARDS shards, counted before anything is expanded ('{0..999999999}'
    would not fit in memory). (A shard that goes missing later, while it is read, is counted as a
    missing_shard skip.)"""
    n = _count(spec)
    if n > MAX_SHARDS:
        raise ValueError(f"the shard pattern {spec!r} expands to {n:,} shards, more than the "
                         f"{MAX_SHARDS:,} allowed: check its {{a..b}} ranges")
    paths = _expand(spec)
    if not paths:
        raise ValueError(f"no shards in {spec!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more"
                                          if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} of the {len(paths)} shards in {spec!r} are not files: "
                         f"{named}")
    return paths


def _top_level_parts(spec):
    """spec split on the commas outside braces."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(spec[start:k])
            start = k + 1
    return parts + [spec[start:]]


def _brace_items(body):
    """(how many, the items) of one innermost brace group: a zero-padded range 'a..b', made lazily
    (its length is known without building it, whatever its size), else the comma-separated items."""
    # (longer numbers: int() refuses 4,300 digits)
    rng = re.fullmatch(r"(\d{1,18})\.\.(\d{1,18})", body)
    if rng:
        a, b = rng.groups()
        numbers = range(int(a), int(b) + 1)
        return len(numbers), (str(n).zfill(len(a)) for n in numbers)
    items = body.split(",")
    return len(items), iter(items)


def _count(spec):
    """How many patterns _expand(spec) makes (a glob counts as one), without making them. Every item
    of a brace group stands in the same place of the same string, so the first item's count is each
    item's count."""
    if isinstance(spec, (list, tuple)):
        return sum(_count(s) for s in spec)
    parts = _top_level_parts(spec.strip())
    if len(parts) > 1:
        return sum(_count(s) for s in parts)
    m = re.search(r"\{([^{}]*)\}", parts[0])
    if not m:
        return 1 if parts[0] else 0
    n, items = _brace_items(m.group(1))
    return n * _count(parts[0][: m.start()] + next(items, "") + parts[0][m.end() :])


def _expand(spec):
    """expand_shards without the checks on files, except that a glob must match something."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in _expand(s)]
    spec = spec.strip()
    parts = _top_level_parts(spec)
    if len(parts) > 1:
        return [p for s in parts for p in _expand(s)]
    if not spec:
        return []
    m = re.search(r"\{([^{}]*)\}", spec)
    if m:
        head, tail = spec[: m.start()], spec[m.end() :]
        return [p for item in _brace_items(m.group(1))[1] for p in _expand(head + item + tail)]
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(spec))
        if not matches:
            raise ValueError(f"no file matches the shard pattern {spec!r}")
        return matches
    return [spec]


class ShardPlan(NamedTuple):
    """shard_plan's answer. slots[rank * workers + worker]: the shards that slot opens, in order.
    shardless: how many slots have no shard of their own (0 when there are at least as many shards
    as slots)."""

    slots: list
    shardless: int


def shard_plan(shards, world=1, workers=1, seed=0, epoch=0):
    """Which shards (a list of paths) each slot of WebDatasetShards opens in `epoch`, for `world`
    DDP ranks x `workers` DataLoader workers per rank (0 workers, loading in the main process, is
    one slot per rank).

    The shard order is reshuffled per (seed, epoch). With at least as many shards as slots, slot s
    opens order[s::slots]: each shard is read by one slot. With fewer, `shardless` slots would get
    none, so every slot opens every shard and decodes only the samples whose running index is its
    own (index % slots): each sample is still yielded once per pass, but every shard is read once
    per slot. A caller can lower the workers to len(shards) // world, or refuse."""
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    slots = world * max(workers, 1)
    if len(order) >= slots:
        return ShardPlan([order[s::slots] for s in range(slots)], 0)
    return ShardPlan([list(order) for _ in range(slots)], slots - len(order))


_SHARD_ERROR = "/error"  # marks a missing or damaged shard; no member's extension can contain "/"
_SAMPLE_SKIP = "/skip"  # marks a sample not to read (a member too large), with its skip reason


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Stream pretraining samples from .tar shards, read sequentially with the standard library's
    tarfile.

    Members are grouped by key (folder + file name before the first dot; the rest, lower-cased, is
    the member's extension: "000001.jpg" is sample "000001", member "jpg"). The image is the first
    of image_keys present; the caption the first of caption_keys present, where a key ending in
    "json" stands for that JSON's "caption" field (the defaults read img2dataset shards:
    jpg/jpeg/png/webp, txt, else json). Keys that match no member of the first samples raise
    ValueError naming the members seen, since a misnamed key would otherwise skip, or strip the
    caption from, every sample.

    Each (DDP rank, DataLoader worker) slot reads the shards shard_plan gives it, in an order
    reshuffled per epoch: set_epoch stores the epoch in shared memory, so workers kept alive across
    epochs (persistent_workers=True) read the new one when their next pass starts. Each sample is
    yielded exactly once per pass, whatever the number of shards. A shuffle buffer of raw
    (undecoded) samples mixes within a slot. paired_share < 1 gives each key a fixed role (paired /
    image-only / text-only) from a hash. Needs tokenizer, text_len and transform to yield samples;
    captions() works without them.
    """

    def __init__(self, shards, tokenizer=None, text_len=64, transform=None, paired_share=1.0,
                 seed=0, rank=None, world=None, shuffle_buffer=500, max_pixels=MAX_PIXELS,
                 image_keys=("jpg", "jpeg", "png", "webp"), caption_keys=("txt", "json")):
        self.shards = expand_shards(shards)
        self.tokenizer, self.text_len, self.transform = tokenizer, text_len, transform
        self.paired_share, self.seed = paired_share, seed
        self.shuffle_buffer, self.max_pixels = shuffle_buffer, max_pixels
        self.image_keys = _member_keys(image_keys, "image_keys")
        self.caption_keys = _member_keys(caption_keys, "caption_keys")
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if initialised
                                                   else 0)
        self.world = world if world is not None else (torch.distributed.get_world_size()
                                                      if initialised else 1)
        # shared memory: DataLoader workers (forked or spawned) see set_epoch's value, not a copy of
        # it
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._check_keys()

    def set_epoch(self, epoch):
        """Call before each pass over a DataLoader of this dataset (before iter(loader)): every
        worker reads the epoch once, when its pass starts."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self):
        return int(self._epoch)

    def _slot(self):
        """(this process's slot, DataLoader workers per rank)."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, workers

    def _groups(self, path, wanted):
        """Yield (key, {ext: bytes}) per sample of one shard, in order; a sample's members are read
        only if wanted(n) for its index n in the shard, else it comes as (key, None). Members that
        no image or caption key names are listed but not read (None). A sample with a member larger
        than its bound (by the tar header, before reading) comes as (key, {_SAMPLE_SKIP:
        "too_large"}). A missing or damaged shard yields (path, {_SHARD_ERROR: reason}) and ends."""
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
                    if members is not None and _SAMPLE_SKIP not in members:
                        ext = ext.lower()
                        limit = self._member_limit(ext)
                        if limit is not None and m.size > limit:
                            # its other members are not read either
                            members = {_SAMPLE_SKIP: "too_large"}
                        else:
                            members[ext] = tar.extractfile(m).read() if limit is not None else None
        except FileNotFoundError:
            yield path, {_SHARD_ERROR: "missing_shard"}
            return
        except (tarfile.TarError, OSError, EOFError):
            # samples read before the damage were yielded already. (A shard cut exactly between
            # members cannot be told apart: tarfile reads a short header as the end of the archive.)
            yield path, {_SHARD_ERROR: "corrupt_shard"}
            return
        if key is not None:
            yield key, members

    def _member_limit(self, ext):
        """The most bytes read of a member with this extension; None for one no key names (never
        read)."""
        if ext in self.caption_keys:
            return MAX_CAPTION_MEMBER_BYTES
        return MAX_IMAGE_MEMBER_BYTES if ext in self.image_keys else None

    def _raw(self, epoch):
        """This slot's raw samples of the epoch, in shard order: (key, members)."""
        slot, workers = self._slot()
        plan = shard_plan(self.shards, self.world, workers, self.seed, epoch)
        if not plan.shardless:
            for path in plan.slots[slot]:
                yield from self._groups(path, lambda n: True)
            return
        slots = len(plan.slots)
        index = 0  # running sample index over all shards, the same in every slot
        for path in plan.slots[slot]:
            for key, members in self._groups(path,
                                             lambda n, base=index: (base + n) % slots == slot):
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
        # fixed per key: the same role every epoch
        h = zlib.crc32(f"{self.seed}/{key}".encode()) / 2**32
        if h < self.paired_share:
            return PAIRED
        return IMAGE_ONLY if (h - self.paired_share) / (1 - self.paired_share) < 0.5 else TEXT_ONLY

    def _image(self, members):
        return next((members[k] for k in self.image_keys if k in members), None)

    def _caption(self, members):
        """The sample's caption (str or bytes), or None."""
        for k in self.caption_keys:
            if k not in members:
                continue
            if not k.endswith("json"):
                return members[k]
            try:
                caption = json.loads(members[k]).get("caption")
            except (ValueError, AttributeError):  # not JSON, or JSON but not an object
                continue
            if caption is not None:
                return caption
        return None

    def _check_keys(self, window=16):
        """Raise if none of the first `window` samples has an image member, or none has a
        caption."""
        head = ((path, members) for path in self.shards
                for _, members in self._groups(path, lambda n: True))
        readable = [(path, m) for path, m in itertools.islice(head, window)
                    if _SHARD_ERROR not in m and _SAMPLE_SKIP not in m]
        if not readable:
            return  # nothing readable up front: damaged shards are counted as skips when read
        where = f"{readable[0][0]}: the first {len(readable)} samples"
        seen = ", ".join(sorted({ext for _, m in readable for ext in m}))
        if not any(self._image(m) is not None for _, m in readable):
            raise ValueError(f"{where} have no image member {'/'.join(self.image_keys)} "
                             f"(image_keys); their members are {seen}")
        if not any(self._caption(m) is not None for _, m in readable):
            raise ValueError(f"{where} have no caption member {'/'.join(self.caption_keys)} "
                             "(caption_keys; json: its \"caption\" field); their members are "
                             f"{seen}")

    def _sample(self, key, members):
        for mark in (_SHARD_ERROR, _SAMPLE_SKIP):
            if mark in members:
                return _skip(members[mark],
                             _pretrain_placeholder(self.transform.image_size, self.text_len))
        image, caption = self._image(members), self._caption(members)
        if image is None:
            return _skip("missing", _pretrain_placeholder(self.transform.image_size, self.text_len))
        return pretrain_sample(image, b"" if caption is None else caption, self.tokenizer,
                               self.text_len, self.transform, self._role(key), self.max_pixels)

    def __iter__(self):
        if self.tokenizer is None or self.transform is None:
            raise ValueError("WebDatasetShards needs tokenizer and transform to yield samples")
        epoch = self.epoch  # read once: the whole pass uses one epoch
        slot, _ = self._slot()
        rng = random.Random(f"{self.seed}/{epoch}/{slot}")
        buffer = []
        for raw in self._raw(epoch):
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
        """The caption of every sample of every shard, in order, read as samples read it (images
        unread)."""
        for path in self.shards:
            for _, members in self._groups(path, lambda n: True):
                caption = None if _SHARD_ERROR in members else self._caption(members)
                if caption is not None:
                    yield caption


def _member_keys(keys, name):
    """A tuple of lower-case member extensions from a tuple or one string ("jpg" or ".jpg")."""
    keys = tuple(k.lower().lstrip(".") for k in ((keys,) if isinstance(keys, str) else keys))
    if not keys or not all(keys):
        raise ValueError(f"{name} must name member extensions, e.g. ('jpg',) or ('txt', 'json'); "
                         f"got {keys!r}")
    return keys


# -----------------------------------------------------------------------------
# batches and skip accounting


def collate(samples):
    """Stack samples into a batch, dropping skip samples. batch["skipped"] is a dict of counts:
    reason -> number of samples skipped for it, and "converted:<what>" -> number of conversions (it
    travels with the batch, so counts cross DataLoader worker processes; feed it to SkipLog.add). A
    batch of nothing but skips has 0 rows (every tensor shaped (0, ...)). Tensors are stacked,
    numbers become tensors, other values (strings) stay lists."""
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
            batch[k] = (torch.tensor(values) if values
                        else torch.tensor([], dtype=torch.as_tensor(v).dtype))
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
        self.counts.update(skipped["skipped"] if isinstance(skipped.get("skipped"), dict)
                           else skipped)

    def total(self):
        return sum(self.counts.values())

    def skipped(self):
        """Samples dropped (conversions, which keep the sample, not counted)."""
        return sum(n for k, n in self.counts.items() if not k.startswith("converted:"))

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
            return ", ".join(f"{k} {n}"
                             for k, n in sorted(items, key=lambda kv: (-kv[1], kv[0]))) or "none"

        skipped = [(k, n) for k, n in self.counts.items() if not k.startswith("converted:")]
        converted = [(k.split(":", 1)[1], n)
                     for k, n in self.counts.items() if k.startswith("converted:")]
        return f"skipped: {line(skipped)}; converted: {line(converted)}"
