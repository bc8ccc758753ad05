"""data.py: transforms, every file format, sharding, and every bad input.

Every file is built in tmp_path, some from the real photos committed in tests/fixtures/real (CC0 / public
domain, see the README there); nothing is downloaded.
"""

import csv
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import builtin
import data
from tokenizer import Tokenizer

TEXT_LEN = 16
FIXTURES = Path(__file__).parent / "fixtures" / "real"
ROTATED = {3: "chelsea_exif_orientation3.jpg", 6: "chelsea_exif_orientation6.jpg", 8: "chelsea_exif_orientation8.jpg"}


# -----------------------------------------------------------------------------
# helpers


def jpeg_bytes(w=96, h=72, seed=0, mode="RGB", quality=90):
    rng = np.random.default_rng(seed)
    a = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    out = io.BytesIO()
    a.convert(mode).save(out, "JPEG", quality=quality)
    return out.getvalue()


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def fixture_captions():
    """[(file name, caption)] of the committed real photos (captions.csv, header filepath,title)."""
    with open(FIXTURES / "captions.csv", newline="") as f:
        return [(r["filepath"], r["title"]) for r in csv.DictReader(f)]


def mean_abs_diff(a, b):
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean()


def finite(sample):
    return all(torch.isfinite(v).all() for v in sample.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    captions = list(builtin.Builtin("pretrain", 2000).captions()) + [f"sample {i}" for i in range(1000)]
    return Tokenizer.train(captions, str(path), vocab_size=300)


@pytest.fixture(scope="module")
def t64():
    return data.PretrainTransform(64, data.CC12M_MEAN, data.CC12M_STD)


# -----------------------------------------------------------------------------
# transforms and decoding


def test_pretrain_transform_shapes_ranges_and_determinism(t64):
    img = Image.open(io.BytesIO(jpeg_bytes(500, 375))).convert("RGB")
    torch.manual_seed(3)
    x = t64(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
    lo = (0 - torch.tensor(data.CC12M_MEAN)) / torch.tensor(data.CC12M_STD)
    hi = (1 - torch.tensor(data.CC12M_MEAN)) / torch.tensor(data.CC12M_STD)
    assert (x >= lo[:, None, None] - 1e-5).all() and (x <= hi[:, None, None] + 1e-5).all()
    torch.manual_seed(3)
    assert torch.equal(t64(img), x)  # seeded: the same crop and flip
    assert not torch.equal(t64(img), x)  # unseeded: another one
    t256 = data.PretrainTransform(256, data.CC12M_MEAN, data.CC12M_STD)
    assert t256(img).shape == (3, 256, 256)


def test_random_resized_crop_boxes():
    torch.manual_seed(0)
    for _ in range(200):
        l, t, r, b = data.random_resized_crop_box(500, 375)
        w, h = r - l, b - t
        assert 0 <= l < r <= 500 and 0 <= t < b <= 375
        assert 0.19 <= w * h / (500 * 375) <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    l, t, r, b = data.random_resized_crop_box(1000, 10)  # no valid try: centre crop clamped to the ratio
    assert (r - l, b - t) == (13, 10) and l == (1000 - 13) // 2


def test_eval_transform_is_deterministic_and_identity_on_builtin():
    img = builtin.Builtin("test", 1)[0]["image"]
    t = data.EvalTransform(64, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0)
    assert torch.equal(t(img), data.to_tensor(img, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD))  # nothing resampled
    photo = Image.open(io.BytesIO(jpeg_bytes(500, 375))).convert("RGB")
    e = data.EvalTransform(224, data.CC12M_MEAN, data.CC12M_STD)
    torch.manual_seed(0)
    a = e(photo)
    torch.manual_seed(1)
    assert a.shape == (3, 224, 224) and torch.equal(a, e(photo))


def test_draft_mode_and_reduce_decode_small():
    big = jpeg_bytes(1600, 1200)
    im = data.load_image(big, size=64)
    assert im.mode == "RGB" and 128 <= min(im.size) < 300 and im.size[0] * im.size[1] < 1600 * 1200 / 40
    assert data.load_image(big).size == (1600, 1200)  # no target: full size
    assert min(data.load_image(big, size=256).size) >= 512
    png = io.BytesIO()
    Image.new("RGB", (1200, 900), (10, 200, 30)).save(png, "PNG")
    im = data.load_image(png.getvalue(), size=64)  # no draft for PNG, but reduce()
    assert 128 <= min(im.size) < 256 and im.getpixel((5, 5)) == (10, 200, 30)


# -----------------------------------------------------------------------------
# EXIF orientation and the committed real photos


@pytest.mark.parametrize("orientation", sorted(ROTATED))
def test_exif_orientation_real_photos_load_upright(orientation):
    """Real JPEGs whose pixels are stored turned, with the EXIF Orientation that shows them upright."""
    upright = data.load_image(FIXTURES / "chelsea.jpg")
    notes = []
    im = data.load_image(FIXTURES / ROTATED[orientation], notes=notes)
    assert notes == ["exif_rotated"] and im.size == upright.size == (160, 106)
    assert mean_abs_diff(im, upright) < 4  # JPEG noise only; the photo upside down or mirrored is ~35 away
    assert mean_abs_diff(upright.transpose(Image.Transpose.ROTATE_180), upright) > 25
    notes = []
    small = data.load_image(FIXTURES / ROTATED[orientation], 32, notes=notes)
    assert notes == ["exif_rotated"] and small.size == (160, 106)  # too small to draft: same pixels
    assert mean_abs_diff(small, im) == 0


# The transpose that stores an upright image so that EXIF Orientation o shows it upright again
STORE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
         7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # JPEG: draft-mode decoding; PNG: reduce()
def test_exif_orientation_with_draft_and_reduce(fmt):
    """Every orientation (mirrors too), full size equal to PIL's exif_transpose, and small: decoded from the
    stored pixels at 1/8 (draft) or box-reduced, then turned, so it is the upright photo at the small size."""
    # 624 x 416: whole 16-pixel JPEG blocks and whole 13-pixel reduce() boxes, in every orientation
    big = data.load_image(FIXTURES / "chelsea.jpg").resize((624, 416), Image.BICUBIC)
    smalls = {}
    for o, store in STORE.items():
        exif = Image.Exif()
        exif[0x0112] = o  # the EXIF Orientation tag
        buf = io.BytesIO()
        fast = {"compress_level": 1} if fmt == "PNG" else {}
        (big if store is None else big.transpose(store)).save(buf, fmt, exif=exif, **fast)
        notes = []
        full = data.load_image(buf.getvalue(), notes=notes)
        reference = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
        assert full.size == (624, 416) and np.array_equal(np.asarray(full), np.asarray(reference))
        assert notes == ([] if o == 1 else ["exif_rotated"])
        smalls[o] = data.load_image(buf.getvalue(), 16)
    assert smalls[1].size == ((78, 52) if fmt == "JPEG" else (48, 32))  # draft at 1/8, or reduce(13)
    for o, small in smalls.items():
        assert small.size == smalls[1].size and mean_abs_diff(small, smalls[1]) < 1, o  # turned after, not before


def exif_bytes(tags):
    exif = Image.Exif()
    exif.update(tags)
    return exif.tobytes()


@pytest.mark.parametrize("exif", [b"Exif\x00\x00garbage", b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff",
                                  exif_bytes({0x0112: 9})])  # damaged blocks; an orientation that does not exist
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL says so on open; the pixels are fine
def test_exif_damaged_or_invalid_is_ignored(exif):
    buf = io.BytesIO()
    photo = data.load_image(FIXTURES / "chelsea.jpg")
    photo.save(buf, "JPEG", exif=exif)
    notes = []
    im = data.load_image(buf.getvalue(), notes=notes)
    assert notes == [] and im.size == photo.size and mean_abs_diff(im, photo) < 4  # as stored


def test_real_photos_through_both_transforms():
    """Every committed real photo (RGB and greyscale JPEGs, three EXIF-rotated) decodes and transforms."""
    pretrain = data.PretrainTransform(64, data.CC12M_MEAN, data.CC12M_STD)
    evaluate = data.EvalTransform(64, data.CC12M_MEAN, data.CC12M_STD)
    names = sorted(p.name for p in FIXTURES.glob("*.jpg"))
    assert len(names) == 15 and sorted(n for n, _ in fixture_captions()) == names
    counts = {}
    torch.manual_seed(0)
    for name in names:
        notes = []
        im = data.load_image(FIXTURES / name, 64, notes=notes)
        for note in notes:
            counts[note] = counts.get(note, 0) + 1
        for t in (pretrain, evaluate):
            x = t(im)
            assert x.shape == (3, 64, 64) and torch.isfinite(x).all() and x.std() > 0.05, name
    assert counts == {"greyscale": 6, "exif_rotated": 3}


# -----------------------------------------------------------------------------
# bad input: each file built here, each outcome checked (decoded-and-converted, or skipped with a reason)


def _png_header_only(w, h):
    """A PNG whose IHDR claims w x h pixels, followed by no real data: a bomb we never decode."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, payload: struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_bad(kind, tmp):
    """Returns (source for load_image, expected: ("skip", reason) or ("converted", note, check(rgb image)))."""
    p = tmp / kind
    if kind == "corrupt":
        p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
        return str(p), ("skip", "corrupt")
    if kind == "not_an_image":
        p.write_bytes(b"hello, I am a caption file named like an image\n")
        return str(p), ("skip", "corrupt")
    if kind == "truncated_jpeg":
        b = jpeg_bytes(256, 192)
        p.write_bytes(b[: len(b) // 2])
        return str(p), ("skip", "corrupt")
    if kind == "truncated_png":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        p.write_bytes(buf.getvalue()[:-200])
        return str(p), ("skip", "corrupt")
    if kind == "zero_byte":
        p.write_bytes(b"")
        return str(p), ("skip", "empty_file")
    if kind == "zero_bytes_in_memory":
        return b"", ("skip", "empty_file")
    if kind == "missing":
        return str(tmp / "nope.jpg"), ("skip", "missing")
    if kind == "directory":
        p.mkdir()
        return str(p), ("skip", "unreadable")
    if kind == "bomb_header":
        p.write_bytes(_png_header_only(100_000, 100_000))
        return str(p), ("skip", "too_large")
    if kind == "cmyk":
        Image.new("RGB", (32, 32), (255, 0, 0)).convert("CMYK").save(p, "JPEG", quality=95)
        return str(p), ("converted", "cmyk", lambda im: _close(im.getpixel((16, 16)), (255, 0, 0), 40))
    if kind == "16bit":
        a = np.full((32, 32), 32768, dtype=np.uint16)
        a[:, :8] = 65535
        Image.fromarray(a).save(p, "PNG")
        assert Image.open(p).mode.startswith("I")
        return str(p), ("converted", "high_bit_depth", lambda im: im.getpixel((0, 0)) == (255,) * 3 and
                        _close(im.getpixel((20, 20)), (128,) * 3, 1))
    if kind == "palette":
        Image.new("RGB", (32, 32), (0, 0, 255)).convert("P").save(p, "PNG")
        return str(p), ("converted", "palette", lambda im: _close(im.getpixel((3, 3)), (0, 0, 255), 10))
    if kind == "palette_transparency":
        im = Image.new("P", (32, 32), 1)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.paste(0, (0, 0, 16, 32))
        im.save(p, "PNG", transparency=0)  # index 0 (the left half) is transparent
        return str(p), ("converted", "palette", lambda im: im.getpixel((2, 2)) == (255, 255, 255) and
                        im.getpixel((30, 2)) == (255, 0, 0))
    if kind == "rgba":
        im = Image.new("RGBA", (32, 32), (0, 255, 0, 255))
        im.paste((0, 0, 0, 0), (0, 0, 16, 32))
        im.save(p, "PNG")
        return str(p), ("converted", "alpha", lambda im: im.getpixel((2, 2)) == (255, 255, 255) and
                        im.getpixel((30, 2)) == (0, 255, 0))
    if kind == "la":
        Image.new("LA", (32, 32), (50, 0)).save(p, "PNG")
        return str(p), ("converted", "alpha", lambda im: im.getpixel((2, 2)) == (255, 255, 255))
    if kind == "greyscale":
        Image.new("L", (32, 32), 77).save(p, "JPEG")
        return str(p), ("converted", "greyscale", lambda im: _close(im.getpixel((2, 2)), (77,) * 3, 2))
    if kind == "1bit":
        Image.new("1", (32, 32), 1).save(p, "PNG")
        return str(p), ("converted", "greyscale", lambda im: im.getpixel((2, 2)) == (255, 255, 255))
    raise ValueError(kind)


def _close(a, b, tol):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


BAD = ["corrupt", "not_an_image", "truncated_jpeg", "truncated_png", "zero_byte", "zero_bytes_in_memory",
       "missing", "directory", "bomb_header", "cmyk", "16bit", "palette", "palette_transparency", "rgba", "la",
       "greyscale", "1bit"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_images(kind, tmp_path, tok, t64):
    src, expected = make_bad(kind, tmp_path)
    notes = []
    if expected[0] == "skip":
        with pytest.raises(data.SkipSample) as e:
            data.load_image(src, 64, notes=notes)
        assert e.value.reason == expected[1]
    else:
        im = data.load_image(src, 64, notes=notes)
        assert im.mode == "RGB" and notes == [expected[1]] and expected[2](im)
    # the same file through a dataset: never raises, a skip sample or a converted sample, never NaN
    sample = data.PairedDataset([dict(image=src, caption="a red star")], tok, TEXT_LEN, t64)[0]
    assert finite(sample)
    if expected[0] == "skip":
        assert sample["skip"] == expected[1] and sample["image"].shape == (3, 64, 64)
    else:
        assert "skip" not in sample and sample["converted"] == [expected[1]]
        assert sample["has_image"] and sample["has_text"]
    labelled = data.LabelledDataset([dict(image=src, label=3)], data.EvalTransform(64, (0.5,) * 3, (0.5,) * 3))[0]
    assert finite(labelled) and ("skip" in labelled) == (expected[0] == "skip") and labelled["label"] == 3


def test_decompression_bomb_by_pixel_limit(tmp_path):
    p = save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    with pytest.raises(data.SkipSample, match="too_large"):
        data.load_image(p, 64, max_pixels=10_000)
    assert data.load_image(p, 64, max_pixels=20_000).size == (200, 100)


def test_captions_empty_and_non_utf8(tok, t64, tmp_path):
    img = save(Image.new("RGB", (40, 40), "red"), tmp_path / "a.png")
    ds = data.PairedDataset([dict(image=img, caption=""), dict(image=img, caption=b"  "),
                             dict(image=None, caption=""), dict(image=img, caption=b"a red \xff star"),
                             dict(image=None, caption=b"\xc3\x28 ring"), dict(image=None, caption=None),
                             dict(image=img, caption=b"\xff")],
                            tok, TEXT_LEN, t64)
    for i in (0, 1):  # a pair with an empty caption becomes image-only, counted
        s = ds[i]
        assert s["has_image"] and not s["has_text"] and s["text_padding_mask"].all()
        assert s["converted"] == ["empty_caption"]
    assert ds[2]["skip"] == "empty_caption"  # text-only with nothing to read
    s = ds[3]  # invalid UTF-8: decoded with replacement, counted, kept
    assert s["has_text"] and s["converted"] == ["non_utf8"] and (~s["text_padding_mask"]).sum() > 2
    s = ds[4]
    assert not s["has_image"] and s["has_text"] and s["converted"] == ["non_utf8"] and (s["image"] == 0).all()
    assert ds[5]["skip"] == "missing"
    s = ds[6]  # non-empty bytes that leave no token: image-only, like an empty caption
    assert s["has_image"] and not s["has_text"] and s["converted"] == ["non_utf8", "empty_caption"]
    batch = data.collate([ds[i] for i in range(len(ds))])
    assert len(batch["image"]) == 5 and batch["skipped"] == {
        "empty_caption": 1, "missing": 1, "converted:empty_caption": 3, "converted:non_utf8": 3}


# -----------------------------------------------------------------------------
# collate and skip accounting


def test_collate_drops_skips_and_counts(tok, t64, tmp_path):
    good = save(Image.new("RGB", (40, 30), "blue"), tmp_path / "g.jpg")
    records = [dict(image=good, caption="a blue square"), dict(image=str(tmp_path / "x.jpg"), caption="x"),
               dict(image=good, caption=None)]
    ds = data.PairedDataset(records, tok, TEXT_LEN, t64)
    batch = data.collate([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["text"].shape == (2, TEXT_LEN)
    assert batch["has_text"].tolist() == [True, False] and batch["has_image"].all()
    assert batch["skipped"] == {"missing": 1}
    empty = data.collate([ds[1], ds[1]])  # nothing left: 0 rows, the right shapes, the counts
    assert empty["image"].shape == (0, 3, 64, 64) and empty["text"].shape == (0, TEXT_LEN)
    assert empty["text_padding_mask"].dtype == torch.bool and empty["skipped"] == {"missing": 2}
    labelled = data.collate([dict(image=torch.zeros(3, 4, 4), label=torch.tensor(1))] * 3)
    assert labelled["label"].tolist() == [1, 1, 1] and labelled["skipped"] == {}
    log = data.SkipLog()
    log.add(batch["skipped"])
    log.add(empty)  # a whole batch works too
    log.add({"converted:cmyk": 2})
    assert log.total() == 5 and log.report() == "skipped: missing 3; converted: cmyk 2"
    assert data.SkipLog().report() == "skipped: none; converted: none"


def test_skip_counts_cross_dataloader_workers(tok, t64, tmp_path):
    good = save(Image.new("RGB", (40, 30), "blue"), tmp_path / "g.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    images = [good, str(bad), str(tmp_path / "missing.jpg")]
    records = [dict(image=images[i % 3], caption=f"sample {i}") for i in range(24)]
    loader = torch.utils.data.DataLoader(data.PairedDataset(records, tok, TEXT_LEN, t64), batch_size=4,
                                         num_workers=2, collate_fn=data.collate)
    log, rows = data.SkipLog(), 0
    for batch in loader:
        log.add(batch.pop("skipped"))
        rows += len(batch["image"])
        assert all(torch.isfinite(v).all() for v in batch.values() if v.is_floating_point())
    assert rows == 8 and dict(log.counts) == {"corrupt": 8, "missing": 8}


# -----------------------------------------------------------------------------
# paired share


def test_paired_share_roles():
    for n, share in ((101, 0.5), (100, 0.3), (7, 0.0), (7, 1.0), (1, 0.5)):
        roles = data.paired_share_roles(n, share, seed=0)
        counts = [(roles == r).sum().item() for r in (data.PAIRED, data.IMAGE_ONLY, data.TEXT_ONLY)]
        rest = n - round(n * share)
        assert counts == [round(n * share), (rest + 1) // 2, rest // 2]
        assert torch.equal(roles, data.paired_share_roles(n, share, seed=0))
    assert not torch.equal(data.paired_share_roles(100, 0.5, 0), data.paired_share_roles(100, 0.5, 1))
    with pytest.raises(ValueError):
        data.paired_share_roles(10, 1.5)


def test_roles_make_unpaired_samples(tok, t64, tmp_path):
    img = save(Image.new("RGB", (40, 40), "red"), tmp_path / "a.png")
    missing = str(tmp_path / "never_opened.png")
    roles = torch.tensor([data.PAIRED, data.IMAGE_ONLY, data.TEXT_ONLY])
    ds = data.PairedDataset([dict(image=img, caption="a red star"), dict(image=img, caption="a red star"),
                             dict(image=missing, caption="a red star")], tok, TEXT_LEN, t64, roles=roles)
    paired, image_only, text_only = ds[0], ds[1], ds[2]
    assert paired["has_image"] and paired["has_text"]
    assert image_only["has_image"] and not image_only["has_text"] and (image_only["text"] == data.PAD_ID).all()
    assert image_only["text_padding_mask"].all()
    # the text-only sample's image is never read (its file does not even exist)
    assert "skip" not in text_only and not text_only["has_image"] and (text_only["image"] == 0).all()
    assert text_only["has_text"] and torch.equal(text_only["text"], paired["text"])


def test_mixed_sources_concat(tok, t64, tmp_path):
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        save(Image.new("RGB", (50, 40), (i * 80, 0, 0)), folder / f"{i}.png")
    (tmp_path / "texts.txt").write_bytes(b"a red star\n\nthe blue ring\r\n")
    pairs = builtin.Builtin("pretrain", 10)
    mixed = torch.utils.data.ConcatDataset([
        data.PairedDataset(pairs, tok, TEXT_LEN, t64, roles=data.paired_share_roles(10, 0.5, 0)),
        data.PairedDataset(data.TextLines(tmp_path / "texts.txt"), tok, TEXT_LEN, t64),
        data.PairedDataset(data.ImageOnlyFolder(tmp_path / "imgs"), tok, TEXT_LEN, t64)])
    batch = data.collate([mixed[i] for i in range(len(mixed))])
    assert len(batch["image"]) == 15 and batch["skipped"] == {}
    assert batch["has_image"].sum() == 10 - 2 + 3 and batch["has_text"].sum() == 10 - 3 + 2


# -----------------------------------------------------------------------------
# file formats


def test_csv_and_tsv_pairs(tmp_path, tok, t64):
    (tmp_path / "img").mkdir()
    for i in range(3):
        save(Image.new("RGB", (30, 30), (0, 0, 80 * i)), tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "pairs.csv").write_text('filepath,caption\nimg/0.jpg,"a blue, dark square"\nimg/1.jpg,a ring\n'
                                        "img/9.jpg,a missing file\n,no path\n")
    (tmp_path / "pairs.tsv").write_bytes(b'url\tcaption\timage\nhttp://x\ta "quoted" star\timg/2.jpg\n'
                                         b"http://y\tbad \xff bytes\timg/0.jpg\n")
    (tmp_path / "pairs.txt").write_text("image;title\nimg/1.jpg;semicolons\nimg/2.jpg;sniffed\n")
    csv_ = data.CsvPairs(tmp_path / "pairs.csv")
    assert len(csv_) == 4 and csv_[0] == dict(image=str(tmp_path / "img" / "0.jpg"), caption="a blue, dark square")
    tsv = data.CsvPairs(tmp_path / "pairs.tsv")
    assert tsv[0]["caption"] == 'a "quoted" star' and tsv[0]["image"].endswith("2.jpg")
    assert tsv[1]["caption"] == b"bad \xff bytes"  # kept as bytes: counted as non_utf8 when decoded
    sniffed = data.CsvPairs(tmp_path / "pairs.txt")
    assert [r["caption"] for r in sniffed] == ["semicolons", "sniffed"]
    assert list(csv_.captions())[1] == "a ring"
    explicit = data.CsvPairs(tmp_path / "pairs.tsv", image_column="image", caption_column="url")
    assert explicit[0]["caption"] == "http://x"
    with pytest.raises(ValueError, match="caption"):
        data.CsvPairs(tmp_path / "pairs.tsv", caption_column="nope")
    batch = data.collate([data.PairedDataset(csv_, tok, TEXT_LEN, t64)[i] for i in range(4)]
                         + [data.PairedDataset(tsv, tok, TEXT_LEN, t64)[1]])
    assert len(batch["image"]) == 3 and batch["skipped"] == {"missing": 2, "converted:non_utf8": 1}


def test_image_folder_and_image_only_folder(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 3)):
        (tmp_path / "data" / cls / "nested").mkdir(parents=True)
        for i in range(n):
            save(Image.new("RGB", (20, 20)), tmp_path / "data" / cls / ("nested" if i else "") / f"{i}.PNG")
    (tmp_path / "data" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "ant" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "data" / "README").write_text("a file beside the classes")
    folder = data.ImageFolder(tmp_path / "data")
    assert folder.classes == ["ant", "zebra"] and len(folder) == 5
    assert [folder[i]["label"] for i in range(5)] == [0, 0, 0, 1, 1]
    labelled = data.LabelledDataset(folder, data.EvalTransform(16, (0.5,) * 3, (0.5,) * 3))
    batch = data.collate([labelled[i] for i in range(5)])
    assert batch["image"].shape == (5, 3, 16, 16) and batch["label"].dtype == torch.int64
    only = data.ImageOnlyFolder(tmp_path / "data")
    assert len(only) == 5 and only[0]["caption"] is None and list(only.captions()) == []


def test_folders_with_broken_links_and_link_loops(tmp_path):
    """A symlink whose target is gone, a loop of links (l1.jpg -> l2.jpg -> l1.jpg) and a folder link back up
    the tree (cat/up -> root): the listing ends, a linked folder is followed and each real image listed once,
    and a broken link is skipped and counted ("broken_link") when loaded, never a traceback. The plain listing
    leaves broken links out, so that every path it gives can be stat'ed (probe.py's cache key stats them)."""
    root, other = tmp_path / "root", tmp_path / "other"
    cat = root / "cat"
    cat.mkdir(parents=True)
    other.mkdir()
    save(Image.new("RGB", (20, 20), "red"), cat / "a.png")
    save(Image.new("RGB", (20, 20), "blue"), other / "b.png")
    (cat / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (cat / "l1.jpg").symlink_to(cat / "l2.jpg")
    (cat / "l2.jpg").symlink_to(cat / "l1.jpg")
    (cat / "up").symlink_to(root, target_is_directory=True)
    (cat / "linked").symlink_to(other, target_is_directory=True)
    (root / "x").symlink_to(root / "y")  # a loop of links beside the class folders: no class
    (root / "y").symlink_to(root / "x")
    listed = {}
    worker = threading.Thread(target=lambda: listed.update(plain=data._image_files(root),
                                                           all=data._image_files(root, broken_links=True)))
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "listing a folder with a link loop did not end"
    names = [os.path.relpath(p, root) for p in listed["all"]]
    assert names == ["cat/a.png", "cat/gone.jpg", "cat/l1.jpg", "cat/l2.jpg", "cat/linked/b.png"]
    assert [os.path.relpath(p, root) for p in listed["plain"]] == ["cat/a.png", "cat/linked/b.png"]
    assert all(os.stat(p).st_size > 0 for p in listed["plain"])
    transform = data.EvalTransform(16, (0.5,) * 3, (0.5,) * 3)
    folder = data.ImageFolder(root)
    assert folder.classes == ["cat"] and len(folder) == 5
    batch = data.collate([data.LabelledDataset(folder, transform)[i] for i in range(len(folder))])
    assert batch["skipped"] == {"broken_link": 3} and batch["image"].shape == (2, 3, 16, 16)
    only = data.ImageOnlyFolder(root)
    batch = data.collate([data.PairedDataset(only, None, TEXT_LEN, transform)[i] for i in range(len(only))])
    assert batch["skipped"] == {"broken_link": 3} and batch["has_image"].all() and len(batch["image"]) == 2
    with pytest.raises(data.SkipSample, match="broken_link"):
        data.load_image(str(cat / "l1.jpg"))


def test_text_lines(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"first caption\r\n\n   \nsecond \xff caption\nlast without newline")
    lines = data.TextLines(tmp_path / "t.txt")
    assert len(lines) == 3 and lines[0] == dict(image=None, caption=b"first caption")
    assert lines[1]["caption"] == b"second \xff caption" and list(lines.captions())[2] == b"last without newline"


def test_real_photos_as_csv_and_tsv_with_named_columns(tmp_path, tok, t64):
    """The real photos through open_clip-style files: filepath,title (found by default) and img<TAB>desc
    (named, as with --csv-img-key / --csv-caption-key); a named column that is not there names the header."""
    expected = fixture_captions()
    by_default = data.CsvPairs(FIXTURES / "captions.csv")
    assert [(os.path.basename(r["image"]), r["caption"]) for r in by_default] == expected
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("img\tdesc\n" + "".join(f"{os.path.relpath(FIXTURES / n, tmp_path)}\t{c}\n" for n, c in expected))
    named = data.CsvPairs(tsv, image_column="img", caption_column="DESC")  # matched case-insensitively
    assert [(os.path.basename(r["image"]), r["caption"]) for r in named] == expected
    with pytest.raises(ValueError, match=r"pairs.tsv: no image column called any of filepath, .*'img\\tdesc'"):
        data.CsvPairs(tsv)
    with pytest.raises(ValueError, match=r"pairs.tsv: no caption column named 'caption'; the header is 'img\\tdesc'"):
        data.CsvPairs(tsv, image_column="img", caption_column="caption")
    for source in (by_default, named):
        batch = data.collate([data.PairedDataset(source, tok, TEXT_LEN, t64)[i] for i in range(len(source))])
        assert len(batch["image"]) == 15 and batch["has_text"].all()
        assert batch["skipped"] == {"converted:greyscale": 6, "converted:exif_rotated": 3}


def test_long_captions_are_read_cut_and_counted(tmp_path, tok, t64):
    """A caption far past the csv module's 131072-character field limit, in every kind of source: read, cut
    to MAX_CAPTION_CHARS characters, counted as converted:long_caption; the samples are otherwise normal."""
    photo = FIXTURES / "chelsea.jpg"
    long = "a ginger cat, sitting; " * 10_000  # 230,000 characters, with the CSV delimiter inside
    cut = long[: data.MAX_CAPTION_CHARS]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), (str(photo), long), (str(photo), "a cat")])
    (tmp_path / "pairs.tsv").write_text(f"filepath\tcaption\n{photo}\t{long}\n")
    (tmp_path / "lines.txt").write_text(f"{long}\n")
    members = [("0.jpg", photo.read_bytes()), ("0.txt", long.encode()),
               ("1.jpg", photo.read_bytes()), ("1.json", json.dumps({"caption": long}).encode())]
    shard = write_tar(tmp_path / "long.tar", members)
    csv_pairs = data.CsvPairs(tmp_path / "pairs.csv")
    assert len(csv_pairs) == 2 and csv_pairs[0]["caption"] == long  # read whole; cut when made a sample
    samples = [data.PairedDataset(csv_pairs, tok, TEXT_LEN, t64)[i] for i in range(2)]
    samples += [data.PairedDataset(data.CsvPairs(tmp_path / "pairs.tsv"), tok, TEXT_LEN, t64)[0],
                data.PairedDataset(data.TextLines(tmp_path / "lines.txt"), tok, TEXT_LEN, t64)[0]]
    samples += list(data.WebDatasetShards(shard, tok, TEXT_LEN, t64, shuffle_buffer=0))
    short = samples.pop(1)
    assert "converted" not in short and short["has_text"]
    for s in samples:
        assert s["converted"] == ["long_caption"] and s["has_text"] and "skip" not in s
        assert torch.equal(s["text"], tok.encode(cut, TEXT_LEN)[0])
    assert data.collate(samples)["skipped"] == {"converted:long_caption": 5}
    notes = []
    assert data.caption_text(long.encode(), notes) == cut and notes == ["long_caption"]
    notes = []
    assert data.caption_text(cut, notes) == cut and notes == []  # exactly the maximum: kept as it is


def make_unusable(kind, tmp):
    """(a call that builds a source from an unusable file or folder, the path it must name, the message)."""
    photo = (FIXTURES / "chelsea.jpg").read_bytes()
    if kind.startswith("csv"):
        p = tmp / "pairs.csv"
        content = {"csv_empty": "", "csv_header_only": "filepath,caption\n", "csv_blank_rows": "filepath,title\n\n\n",
                   "csv_no_such_columns": "img,desc\nchelsea.jpg,a cat\n",
                   "csv_named_column_missing": "img,desc\nchelsea.jpg,a cat\n"}.get(kind)
        if content is not None:
            p.write_text(content)
        if kind == "csv_folder":
            p.mkdir()
        expected = {"csv_missing": "no such file", "csv_folder": "cannot read it", "csv_empty": "empty file",
                    "csv_header_only": "a header and no rows", "csv_blank_rows": "a header and no rows",
                    "csv_no_such_columns": "no image column called any of filepath, .* the header is 'img,desc'",
                    "csv_named_column_missing": "no caption column named 'title'; the header is 'img,desc'"}[kind]
        named = dict(image_column="img", caption_column="title") if kind == "csv_named_column_missing" else {}
        return lambda: data.CsvPairs(p, **named), p, expected
    if kind.startswith("text"):
        p = tmp / "captions.txt"
        if kind != "text_missing":
            p.write_text({"text_empty": "", "text_blank_lines": "\n   \n\r\n\t\n"}[kind])
        return lambda: data.TextLines(p), p, "no such file" if kind == "text_missing" else "no captions"
    root = tmp / "images"
    if kind.endswith("not_a_folder"):
        root.write_bytes(photo)
    elif kind == "image_folder_no_classes":  # images, but not in class sub-folders
        root.mkdir()
        (root / "chelsea.jpg").write_bytes(photo)
    elif kind.endswith("no_images"):
        for sub in ("cat/nested", "dog", ".hidden"):
            (root / sub).mkdir(parents=True)
        (root / "cat" / "nested" / "notes.txt").write_text("not an image")
        (root / ".hidden" / "chelsea.jpg").write_bytes(photo)  # hidden: not read
    build = data.ImageFolder if kind.startswith("image_folder") else data.ImageOnlyFolder
    expected = {"missing": "no such folder", "not_a_folder": "not a folder", "no_classes": "no class sub-folders",
                "no_images": "no images"}[kind.split("folder_")[1]]
    if kind == "image_folder_no_images":
        expected = "no images in its class sub-folders cat, dog"
    return lambda: build(root), root, expected


UNUSABLE = ["csv_missing", "csv_folder", "csv_empty", "csv_header_only", "csv_blank_rows", "csv_no_such_columns",
            "csv_named_column_missing", "text_missing", "text_empty", "text_blank_lines", "image_folder_missing",
            "image_folder_not_a_folder", "image_folder_no_classes", "image_folder_no_images",
            "image_only_folder_missing", "image_only_folder_not_a_folder", "image_only_folder_no_images"]


@pytest.mark.parametrize("kind", UNUSABLE)
def test_unusable_sources_raise_one_line_naming_the_path(kind, tmp_path):
    build, path, expected = make_unusable(kind, tmp_path)
    with pytest.raises(ValueError) as e:
        build()
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(expected, message), message


# -----------------------------------------------------------------------------
# webdataset shards


def write_tar(path, members):
    """A tar of (name, bytes) members, in order; returns its path as str."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def write_shards(folder, n_shards, per_shard, extra=None):
    """img2dataset layout: key.jpg, key.txt, key.json per sample; captions 'sample <global index>'."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s in range(n_shards):
        members = []
        for _ in range(per_shard):
            key = f"{s:05d}{k:04d}"
            members += [(f"{key}.jpg", jpeg_bytes(40, 30, k)), (f"{key}.txt", f"sample {k}".encode()),
                        (f"{key}.json", b'{"caption": "ignored"}')]
            k += 1
        paths.append(write_tar(folder / f"{s:05d}.tar", members + (extra or {}).get(s, [])))
    return paths, k


def fixture_shards(folder, per_shard, txt=True):
    """The real photos as img2dataset writes them: key.jpg, key.json (url, caption, key, status...) and,
    with txt, key.txt; 9-digit keys shard * 10000 + index."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = fixture_captions()
    paths = []
    for s in range(0, len(pairs), per_shard):
        members = []
        for i, (name, caption) in enumerate(pairs[s : s + per_shard]):
            key = f"{s // per_shard * 10000 + i:09d}"
            meta = dict(url=f"fixture:{name}", caption=caption, key=key, status="success", error_message=None)
            members += [(f"{key}.jpg", (FIXTURES / name).read_bytes()), (f"{key}.json", json.dumps(meta).encode())]
            members += [(f"{key}.txt", caption.encode())] if txt else []
        paths.append(write_tar(folder / f"{s // per_shard:05d}.tar", members))
    return paths


def shard_captions(ds, tok, workers, epoch=0):
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=data.collate)
    out = []
    for batch in loader:
        out += [tok.decode(t) for t in batch["text"]]
    return out


def test_expand_shards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("d/000", "d/001", "d/002", "a/0-x", "a/0-y", "a/1-x", "a/1-y", "a", "b", "b/8", "b/9", "b/10"):
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        Path(f"{name}.tar").write_bytes(b"")  # expand_shards checks that they are files, not what is in them
    assert data.expand_shards("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert data.expand_shards("a/{0..1}-{x,y}.tar") == ["a/0-x.tar", "a/0-y.tar", "a/1-x.tar", "a/1-y.tar"]
    assert data.expand_shards("a.tar, b/{8..10}.tar") == ["a.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert data.expand_shards(["a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    assert data.expand_shards("d/*.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]


@pytest.mark.parametrize("spec, message", [
    ("d/*.tgz", r"no file matches the shard pattern 'd/\*.tgz'"),
    ("d/000.tar, nothing/*.tar", r"no file matches the shard pattern 'nothing/\*.tar'"),
    ("d/{000..002}.tar", r"1 of the 3 shards in 'd/\{000..002\}.tar' are not files: d/001.tar$"),
    ("e/{0..9}.tar", r"10 of the 10 shards in .* are not files: e/0.tar, e/1.tar, e/2.tar and 7 more$"),
    ("d", r"1 of the 1 shards in 'd' are not files: d$"),  # a folder
    (" , ", r"no shards in"),
])
def test_expand_shards_refuses_what_is_not_there(tmp_path, monkeypatch, tok, t64, spec, message):
    """A pattern that matches nothing, or listed shards that are not files, would make every pass of the
    stream yield nothing but skips (and train.py wait forever): refused up front, naming them."""
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    for name in ("000", "002"):
        write_tar(Path("d") / f"{name}.tar", [("0.jpg", jpeg_bytes(20, 20)), ("0.txt", b"a caption")])
    with pytest.raises(ValueError, match=message):
        data.expand_shards(spec)
    with pytest.raises(ValueError, match=message):
        data.WebDatasetShards(spec, tok, TEXT_LEN, t64)


# Expands a pattern in a child process whose address space is capped 512 MiB above what it uses after its
# imports: a list of 10^9 names fails there with MemoryError, not by filling this machine.
_EXPAND_CAPPED = """
import resource, sys, time
import data
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (512 << 20), resource.RLIM_INFINITY))
start = time.perf_counter()
try:
    data.expand_shards(sys.argv[1])
except Exception as e:
    print(type(e).__name__, round(time.perf_counter() - start, 3), str(e))
"""


@pytest.mark.parametrize("spec, count", [("/x/{0..999999999}.tar", "1,000,000,000"),
                                         ("/x/{0..999}/{0..9999}.tar, /y.tar", "10,000,001")])
def test_expand_shards_refuses_a_huge_pattern_before_expanding_it(spec, count):
    """'{0..999999999}' (a slip of the finger) is counted, not expanded: refused at once, in one line naming
    the pattern, the count and the limit, without the memory a billion names would take."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _EXPAND_CAPPED, spec], cwd=root, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    kind, seconds, message = (out.split(" ", 2) + ["", ""])[:3]  # old code: "MemoryError 2.1 "
    assert kind == "ValueError" and float(seconds) < 1.0, out
    assert message == (f"the shard pattern {spec!r} expands to {count} shards, more than the 1,000,000 allowed: "
                       "check its {a..b} ranges")
    assert data._count("d/{000..002}-{a,b}.tar, e.tar") == 7 and data.MAX_SHARDS == 1_000_000


@pytest.mark.parametrize("n_shards", [6, 3])  # more shards than 2 ranks x 2 workers, and fewer
def test_shards_every_sample_once_across_ranks_and_workers(tmp_path, tok, t64, n_shards):
    paths, total = write_shards(tmp_path, n_shards, 7)
    seen = []
    for rank in range(2):
        ds = data.WebDatasetShards(paths, tok, TEXT_LEN, t64, rank=rank, world=2, shuffle_buffer=4)
        seen += shard_captions(ds, tok, workers=2, epoch=1)
    assert sorted(seen) == sorted(f"sample {k}" for k in range(total))  # exactly once each
    single = data.WebDatasetShards(",".join(paths), tok, TEXT_LEN, t64, shuffle_buffer=0)
    orders = [shard_captions(single, tok, 0, epoch=e) for e in range(4)]
    assert all(sorted(o) == sorted(seen) for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # set_epoch reshuffles the shard order...
    assert shard_captions(single, tok, 0, epoch=0) == orders[0]  # ...deterministically
    assert len(list(single.captions())) == total


def test_shards_bad_members_and_paired_share(tmp_path, tok, t64):
    extra = {0: [("bad.jpg", b"not a jpeg"), ("bad.txt", b"broken image"), ("textonly.txt", b"no image here"),
                 ("utf.jpg", jpeg_bytes(30, 30)), ("utf.txt", b"caf\xe9 latin-1"), ("js.png", _png_rgba()),
                 ("js.json", b'{"caption": "from json"}'), ("nocap.jpg", jpeg_bytes(30, 30))]}
    paths, total = write_shards(tmp_path / "s", 1, 2, extra)
    truncated = tmp_path / "s" / "trunc.tar"  # cut inside the second sample's image data
    with tarfile.open(paths[0]) as tar:
        cut = tar.getmember("000000001.jpg").offset_data + 100
    truncated.write_bytes(open(paths[0], "rb").read()[:cut])
    gone = write_tar(tmp_path / "gone.tar", [])
    ds = data.WebDatasetShards(paths + [str(truncated), gone], tok, TEXT_LEN, t64, shuffle_buffer=0)
    os.remove(gone)  # gone after the start (a missing shard at the start is refused: expand_shards)
    log, captions = data.SkipLog(), []
    for batch in torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate):
        log.add(batch.pop("skipped"))
        captions += [tok.decode(t) for t, h in zip(batch["text"], batch["has_text"]) if h]
    c = log.counts
    assert c["corrupt"] == 1 and c["missing"] == 1 and c["missing_shard"] == 1 and c["corrupt_shard"] == 1
    assert c["converted:non_utf8"] == 1 and c["converted:alpha"] == 1 and c["converted:empty_caption"] == 1
    assert "from json" in captions and "sample 0" in captions
    # paired share: a fixed role per key, about the asked share
    paths, total = write_shards(tmp_path / "p", 2, 50)
    ds = data.WebDatasetShards(paths, tok, TEXT_LEN, t64, paired_share=0.5, shuffle_buffer=0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=100, collate_fn=data.collate))
    has_image = torch.cat([b["has_image"] for b in batches])
    has_text = torch.cat([b["has_text"] for b in batches])
    paired = (has_image & has_text).sum().item()
    assert len(has_image) == total and 35 <= paired <= 65 and (has_image | has_text).all()
    again = torch.cat([b["has_text"] for b in torch.utils.data.DataLoader(ds, batch_size=100, collate_fn=data.collate)])
    assert torch.equal(again, has_text)
    with pytest.raises(ValueError):
        iter(data.WebDatasetShards(paths)).__next__()  # captions() only: no tokenizer, no samples


def test_shard_members_larger_than_their_bound_are_skipped_unread(tmp_path, tok, t64, monkeypatch):
    """A member's size is taken from its tar header before it is read: an image over MAX_IMAGE_MEMBER_BYTES or
    a caption over MAX_CAPTION_MEMBER_BYTES skips its sample ("too_large") without being read (a 1 GB member
    would otherwise be read whole into memory); members no key names are never read. The bounds are lowered
    here so that the shard stays small."""
    monkeypatch.setattr(data, "MAX_IMAGE_MEMBER_BYTES", 20_000)
    monkeypatch.setattr(data, "MAX_CAPTION_MEMBER_BYTES", 2_000)
    shard = write_tar(tmp_path / "0.tar", [
        ("ok.jpg", jpeg_bytes(40, 30)), ("ok.txt", b"a fine sample"), ("ok.mp4", os.urandom(50_000)),
        ("bigimg.jpg", os.urandom(20_001)), ("bigimg.txt", b"its image is too large"),
        ("bigcap.jpg", jpeg_bytes(40, 30)), ("bigcap.txt", b"x" * 2_001)])
    read = []
    extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, m: read.append(m.name) or extractfile(tar, m))
    ds = data.WebDatasetShards(shard, tok, TEXT_LEN, t64, shuffle_buffer=0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate))
    assert batches[0]["skipped"] == {"too_large": 2}
    assert [tok.decode(t) for t in batches[0]["text"]] == ["a fine sample"]
    assert not {"ok.mp4", "bigimg.jpg", "bigcap.txt"} & set(read) and "ok.jpg" in read
    assert list(ds.captions()) == [b"a fine sample"]  # the tokenizer corpus: the samples the run reads


def test_shard_plan_is_what_each_slot_reads(tmp_path, tok, t64):
    paths, total = write_shards(tmp_path, 6, 3)
    shard_of = {f"sample {k}": paths[k // 3] for k in range(total)}
    for world, workers in ((3, 0), (2, 2), (1, 6)):  # at least as many shards as slots: each shard read once
        plan = data.shard_plan(paths, world, workers, seed=5, epoch=2)
        assert plan.shardless == 0 and len(plan.slots) == world * max(workers, 1)
        assert sorted(p for slot in plan.slots for p in slot) == sorted(paths)
    plan = data.shard_plan(paths, 3, 0, seed=5, epoch=2)
    for rank in range(3):  # one slot per rank: the shards it reads are the plan's, in the plan's order
        ds = data.WebDatasetShards(paths, tok, TEXT_LEN, t64, seed=5, rank=rank, world=3, shuffle_buffer=0)
        read = [shard_of[c] for c in shard_captions(ds, tok, 0, epoch=2)]
        assert read == [p for p in plan.slots[rank] for _ in range(3)]
    assert data.shard_plan(paths, 3, 0, seed=5, epoch=3).slots != plan.slots  # reshuffled per epoch
    short = data.shard_plan(paths, 2, 4)  # 8 slots, 6 shards: 2 slots have none of their own...
    assert short.shardless == 2 and all(sorted(slot) == sorted(paths) for slot in short.slots)  # ...all read all


def test_shards_epoch_reaches_persistent_workers(tmp_path, tok, t64):
    """set_epoch must reach DataLoader workers that live across epochs: two epochs, two shuffles, the same
    samples, each pass equal to a fresh loader's for that epoch."""
    paths, total = write_shards(tmp_path, 4, 6)
    ds = data.WebDatasetShards(paths, tok, TEXT_LEN, t64, shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True,
                                         collate_fn=data.collate)
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        orders.append([tok.decode(t) for batch in loader for t in batch["text"]])
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(f"sample {k}" for k in range(total))
    assert orders[0] != orders[1]
    fresh = data.WebDatasetShards(paths, tok, TEXT_LEN, t64, shuffle_buffer=4)
    assert [shard_captions(fresh, tok, 2, epoch) for epoch in (0, 1)] == orders


def test_shard_member_keys(tmp_path, tok, t64):
    """Members named otherwise than img2dataset's: named with image_keys / caption_keys; keys that match
    no member refuse at once, naming the members they saw."""
    pairs = fixture_captions()[:4]
    members = []
    for i, (name, caption) in enumerate(pairs):
        members += [(f"{i:03d}.Image.JPG", (FIXTURES / name).read_bytes()), (f"{i:03d}.desc", caption.encode()),
                    (f"{i:03d}.json", json.dumps({"url": name}).encode())]  # json without a caption
    shard = write_tar(tmp_path / "custom.tar", members)
    with pytest.raises(ValueError, match=r"custom.tar: the first 4 samples have no image member jpg/jpeg/png/webp "
                                         r"\(image_keys\); their members are desc, image.jpg, json"):
        data.WebDatasetShards(shard, tok, TEXT_LEN, t64)
    with pytest.raises(ValueError, match=r"no caption member txt/json \(caption_keys"):
        data.WebDatasetShards(shard, tok, TEXT_LEN, t64, image_keys=".image.jpg")
    with pytest.raises(ValueError, match="caption_keys must name"):
        data.WebDatasetShards(shard, tok, TEXT_LEN, t64, image_keys="image.jpg", caption_keys=())
    ds = data.WebDatasetShards(shard, tok, TEXT_LEN, t64, image_keys=("png", "image.jpg"), caption_keys=("desc",),
                               shuffle_buffer=0)
    batch = data.collate(list(ds))
    assert torch.equal(batch["text"], torch.stack([tok.encode(c, TEXT_LEN)[0] for _, c in pairs]))
    assert batch["has_image"].all() and batch["has_text"].all()
    assert list(ds.captions()) == [c.encode() for _, c in pairs]


@pytest.mark.parametrize("txt", [True, False])  # img2dataset writes key.txt unless told not to; json always
def test_real_photos_as_img2dataset_shards(tmp_path, tok, t64, txt):
    paths = fixture_shards(tmp_path / "wds", 5, txt=txt)
    captions = [c for _, c in fixture_captions()]
    ds = data.WebDatasetShards(data.expand_shards(str(tmp_path / "wds" / "{00000..00002}.tar")), tok, TEXT_LEN, t64)
    assert ds.shards == paths
    assert [data.caption_text(c) for c in ds.captions()] == captions  # the tokenizer's corpus: json too
    log, seen = data.SkipLog(), []
    for batch in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=data.collate):
        log.add(batch.pop("skipped"))
        seen += [tuple(t.tolist()) for t in batch["text"]]
        assert batch["image"].shape[1:] == (3, 64, 64) and torch.isfinite(batch["image"]).all()
    assert sorted(seen) == sorted(tuple(tok.encode(c, TEXT_LEN)[0].tolist()) for c in captions)
    assert dict(log.counts) == {"converted:greyscale": 6, "converted:exif_rotated": 3}


def _png_rgba():
    buf = io.BytesIO()
    Image.new("RGBA", (30, 30), (0, 0, 255, 128)).save(buf, "PNG")
    return buf.getvalue()


# -----------------------------------------------------------------------------
# command line


def test_rank_and_world_from_torch_distributed(tmp_path):
    """With a process group (world 1 here), shards take rank/world from it and SkipLog sums over ranks."""
    import torch.distributed as dist

    paths, _ = write_shards(tmp_path / "s", 2, 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ds = data.WebDatasetShards(paths)
        assert (ds.rank, ds.world) == (0, 1)
        assert (data.WebDatasetShards(paths, rank=1, world=4).rank, ds.world) == (1, 1)
        log = data.SkipLog()
        log.add({"corrupt": 2, "converted:cmyk": 1})
        assert dict(log.all_ranks().counts) == {"corrupt": 2, "converted:cmyk": 1}
    finally:
        dist.destroy_process_group()
