"""data.py: transforms, every file format, sharding, and every bad input.

Every file is built in tmp_path; nothing is downloaded.
"""

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import builtin
import data
from tokenizer import Tokenizer

TEXT_LEN = 16


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


def test_text_lines(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"first caption\r\n\n   \nsecond \xff caption\nlast without newline")
    lines = data.TextLines(tmp_path / "t.txt")
    assert len(lines) == 3 and lines[0] == dict(image=None, caption=b"first caption")
    assert lines[1]["caption"] == b"second \xff caption" and list(lines.captions())[2] == b"last without newline"


# -----------------------------------------------------------------------------
# webdataset shards


def write_shards(folder, n_shards, per_shard, extra=None):
    """img2dataset layout: key.jpg, key.txt, key.json per sample; captions 'sample <global index>'."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            members = []
            for _ in range(per_shard):
                key = f"{s:05d}{k:04d}"
                members += [(f"{key}.jpg", jpeg_bytes(40, 30, k)), (f"{key}.txt", f"sample {k}".encode()),
                            (f"{key}.json", b'{"caption": "ignored"}')]
                k += 1
            for name, payload in members + (extra or {}).get(s, []):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths, k


def shard_captions(ds, tok, workers, epoch=0):
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=data.collate)
    out = []
    for batch in loader:
        out += [tok.decode(t) for t in batch["text"]]
    return out


def test_expand_shards(tmp_path):
    assert data.expand_shards("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert data.expand_shards("a/{0..1}-{x,y}.tar") == ["a/0-x.tar", "a/0-y.tar", "a/1-x.tar", "a/1-y.tar"]
    assert data.expand_shards("a.tar, b/{8..10}.tar") == ["a.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert data.expand_shards(["a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    paths, _ = write_shards(tmp_path, 3, 1)
    assert data.expand_shards(str(tmp_path / "*.tar")) == paths


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
    shards = paths + [str(truncated), str(tmp_path / "gone.tar")]
    ds = data.WebDatasetShards(shards, tok, TEXT_LEN, t64, shuffle_buffer=0)
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
