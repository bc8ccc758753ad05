"""Write webdataset shards of photo-like JPEGs in img2dataset's layout, to time the real input pipeline without
a download (bench/gpu_speed.sh; no network on the GPU machine).

    python bench/fake_shards.py OUT_DIR --shards 16 --per-shard 160     # OUT_DIR/00000.tar ... 00015.tar

Each shard holds, per sample, {key}.jpg, {key}.txt and {key}.json next to each other, keys of 9 digits (5 for the
shard, 4 for the sample), as img2dataset writes them. The images are 500x375 (CC12M / CC3M photos are mostly
around that size): a smooth random colour field, a few blurred shapes and sensor-like noise, saved at JPEG
quality 90, so that decoding costs about what a photo of that size costs (a flat image decodes much faster).
Deterministic in --seed.
"""

import argparse
import io
import json
import os
import random
import tarfile
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "brown", "grey"]
THINGS = ["dog", "cat", "car", "house", "tree", "boat", "chair", "bird", "flower", "bicycle", "mountain", "cup"]
PLACES = ["on a beach", "in a garden", "on a street", "in a kitchen", "near a lake", "in the snow", "at night"]


def photo(rng, width, height):
    """A photo-like RGB image: low-frequency colour field, shapes, blur, per-pixel noise."""
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(20, width // 2)), int(rng.integers(20, height // 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def caption(r):
    words = [r.choice(["a", "the", "one"]), r.choice(COLOURS), r.choice(THINGS), r.choice(PLACES)]
    if r.random() < 0.5:
        words += ["with", r.choice(["a", "two", "some"]), r.choice(COLOURS), r.choice(THINGS)]
    return " ".join(words)


def write_shard(job):
    out_dir, shard, per_shard, width, height, seed = job
    path = os.path.join(out_dir, f"{shard:05d}.tar")
    with tarfile.open(path + ".tmp", "w") as tar:
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            rng = np.random.default_rng([seed, shard, i])
            buf = io.BytesIO()
            photo(rng, width, height).save(buf, format="JPEG", quality=90)
            text = caption(random.Random(f"{seed}/{key}"))
            meta = dict(key=key, caption=text, url=f"https://example.invalid/{key}.jpg", status="success",
                        width=width, height=height, original_width=width, original_height=height)
            for name, payload in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", text.encode()),
                                  (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    os.replace(path + ".tmp", path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=160, help="samples per shard")
    p.add_argument("--size", default="500x375", help="image width x height")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="processes writing shards")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    os.makedirs(args.out_dir, exist_ok=True)
    jobs = [(args.out_dir, s, args.per_shard, width, height, args.seed) for s in range(args.shards)]
    with Pool(min(args.procs, args.shards)) as pool:
        paths = pool.map(write_shard, jobs)
    mb = sum(os.path.getsize(q) for q in paths) / 2**20
    print(f"wrote {len(paths)} shards x {args.per_shard} samples ({width}x{height} JPEG) = {mb:.1f} MB in "
          f"{args.out_dir}")
    return paths


if __name__ == "__main__":
    main()
