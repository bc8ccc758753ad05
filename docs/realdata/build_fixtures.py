"""Small real-photo JPEG fixtures (each <= 20 KB) from scikit-image 0.26.0's bundled sample data.

Output: $ROOT/fixtures/real/*.jpg + README.md + captions.csv, ready to copy into tests/fixtures/real/.
"""
import csv
import io
import os
import shutil

import numpy as np
from PIL import Image

ROOT = os.environ.get("ROOT", "runs/realdata")
DL = os.environ.get("DL", os.path.join(ROOT, "dl"))
SK = os.path.join(DL, "ski/skimage/data")
OUT = os.path.join(ROOT, "fixtures/real")
LIMIT = 20 * 1024

# (out name, skimage file, license as stated in skimage/data/_fetchers.py, caption, max side)
ITEMS = [
    ("astronaut.jpg", "astronaut.png", "public domain (NASA; 'No known copyright restrictions, released into the public domain')",
     "a portrait photo of the astronaut Eileen Collins", 160),
    ("camera.jpg", "camera.png", "CC0 (photographer Lav Varshney)", "a black and white photo of a person with a camera on a tripod", 160),
    ("chelsea.jpg", "chelsea.png", "CC0 (photographer Stefan van der Walt)", "a photo of a ginger cat named Chelsea", 160),
    ("coffee.jpg", "coffee.png", "CC0 (photographer Rachel Michetti)", "a photo of a cup of coffee on a saucer", 160),
    ("rocket.jpg", "rocket.jpg", "public domain (SpaceX, released into the public domain)", "a photo of a rocket on a launch pad", 160),
    ("hubble_deep_field.jpg", "hubble_deep_field.jpg", "public domain (NASA)", "a telescope photo of many distant galaxies", 160),
    ("brick.jpg", "brick.png", "CC0 (CC0Textures Bricks25)", "a grayscale photo of a brick wall", 128),
    ("grass.jpg", "grass.png", "CC0 (CC0Textures)", "a grayscale photo of grass", 128),
    ("gravel.jpg", "gravel.png", "CC0 (CC0Textures Gravel04)", "a grayscale photo of gravel", 128),
    ("cell.jpg", "cell.png", "CC0 (quantitative phase image, qpformat authors)", "a microscope image of a cell floating in saline", 128),
    ("retina.jpg", "retina.jpg", "CC0 1.0 (Mikael Haggstrom, Wikimedia Commons)", "a fundus photograph of a human retina", 160),
    ("clock.jpg", "clock_motion.png", "public domain (photographer Stefan van der Walt)", "a motion blurred photo of a wall clock", 160),
]


def save_small(img, path, exif=None):
    for q in (90, 85, 80, 75, 70, 60, 50):
        buf = io.BytesIO()
        kw = {"format": "JPEG", "quality": q, "optimize": True}
        if exif is not None:
            kw["exif"] = exif
        img.save(buf, **kw)
        if buf.tell() <= LIMIT:
            with open(path, "wb") as fh:
                fh.write(buf.getvalue())
            return q, buf.tell()
    raise SystemExit(f"{path}: cannot get under {LIMIT} bytes")


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    rows, readme = [], []
    for name, src, lic, cap, side in ITEMS:
        im = Image.open(os.path.join(SK, src))
        im = im.convert("L") if im.mode in ("L", "I", "I;16", "1") else im.convert("RGB")
        im.thumbnail((side, side), Image.LANCZOS)
        q, n = save_small(im, os.path.join(OUT, name))
        rows.append((name, cap))
        readme.append(f"| {name} | scikit-image 0.26.0 (PyPI) | skimage/data/{src} | {lic} | {im.mode} {im.width}x{im.height}, q{q}, {n} B |")

    # EXIF orientation fixtures made from chelsea.png: the upright picture is 160x106 (landscape).
    up = Image.open(os.path.join(SK, "chelsea.png")).convert("RGB")
    up.thumbnail((160, 160), Image.LANCZOS)
    for orient, stored, note in (
        (6, up.transpose(Image.ROTATE_90), "stored pixels 106x160 (upright rotated 90 deg CCW); EXIF Orientation=6 (rotate 90 CW to display) -> upright 160x106"),
        (3, up.transpose(Image.ROTATE_180), "stored pixels upside down; EXIF Orientation=3 (rotate 180) -> upright 160x106"),
        (8, up.transpose(Image.ROTATE_270), "stored pixels 106x160 (upright rotated 90 deg CW); EXIF Orientation=8 (rotate 90 CCW to display) -> upright 160x106"),
    ):
        exif = Image.Exif()
        exif[0x0112] = orient
        name = f"chelsea_exif_orientation{orient}.jpg"
        q, n = save_small(stored, os.path.join(OUT, name), exif=exif.tobytes())
        # self-check: exif_transpose must give back the upright landscape image
        from PIL import ImageOps
        chk = ImageOps.exif_transpose(Image.open(os.path.join(OUT, name)))
        assert chk.size == up.size, (name, chk.size)
        diff = np.abs(np.asarray(chk, dtype=np.int16) - np.asarray(up, dtype=np.int16)).mean()
        assert diff < 8, (name, diff)
        rows.append((name, "a photo of a ginger cat named Chelsea"))
        readme.append(f"| {name} | scikit-image 0.26.0 (PyPI) | skimage/data/chelsea.png | CC0 (photographer Stefan van der Walt) | "
                      f"derived: {note}; orientation tag set with Pillow; q{q}, {n} B |")

    with open(os.path.join(OUT, "captions.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    with open(os.path.join(OUT, "README.md"), "w") as fh:
        fh.write("# Real photo fixtures\n\n"
                 "Downscaled (Pillow LANCZOS thumbnail) and re-encoded as JPEG from the sample images that the\n"
                 "scikit-image 0.26.0 wheel on PyPI bundles in `skimage/data/` (licenses as stated in\n"
                 "`skimage/data/_fetchers.py` of that wheel). Every file is <= 20 KB. `captions.csv`\n"
                 "(header `filepath,title`) gives a caption per image. Rebuilt by `build_fixtures.py`.\n\n"
                 "| file | source package | original file | license | notes |\n|---|---|---|---|---|\n")
        fh.write("\n".join(readme) + "\n")
    print("\n".join(readme))


if __name__ == "__main__":
    main()
