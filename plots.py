"""Charts drawn with PIL alone (no plotting library): what the scripts show instead of JSON lines.

    python plots.py curves runs/m3ae runs/mae --out curves.png     # training curves, several runs
                                                                   overlaid
    python plots.py tsne --ckpt runs/m3ae/ckpt.pt --ckpt runs/mae/ckpt.pt --test-dir labelled/test

train.py draws OUT_DIR/curves.png at each save and at the end (training_curves); ood.py draws the
score histograms of the paper's Fig. 6 (histograms); sweep.py the ablation bars of Figs. 3-5
(bar_chart); `tsne` the frozen features of two checkpoints side by side, coloured by class (the
paper's Fig. 9; tsne() is exact t-SNE in torch, for up to a few thousand points).
"""

import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

import rundir
from util import foreign_output, make_parser, write_atomic

# a colour per series or class: distinguishable, and readable on white (Tableau 10)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
W, H = 480, 320  # one panel
MARGIN = dict(left=64, right=16, top=34, bottom=40)


def font(size=13):
    """PIL's bundled font at `size` px (a fixed-size bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def colour(i):
    return PALETTE[i % len(PALETTE)]


def ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step) + 1)]


def label(v):
    if float(v).is_integer() and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2g}"


def log_ticks(lo, hi):
    """Tick values 1, 2, 5 x 10^k inside [10^lo, 10^hi] (lo, hi: log10 bounds); their log10."""
    found = [math.log10(m * 10.0**k) for k in range(math.floor(lo) - 1, math.ceil(hi) + 1)
             for m in (1, 2, 5) if lo <= math.log10(m * 10.0**k) <= hi]
    if len(found) > 6:  # a wide range: the powers of ten alone
        found = [t for t in found if float(t).is_integer()] or found
    return found if len(found) >= 2 else ticks(lo, hi)


def axes(draw, title, xlabel, ylabel, x_range, y_range, log_y=False, xticks=True):
    """Frame, title, labels and ticks of one panel; returns the data -> pixel map."""
    (x0, x1), (y0, y1) = x_range, y_range
    if log_y:
        y0, y1 = math.log10(y0), math.log10(y1)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    left, top, right, bottom = (MARGIN["left"], MARGIN["top"], W - MARGIN["right"],
                                H - MARGIN["bottom"])

    def at(x, y):
        y = math.log10(max(y, 1e-30)) if log_y else y
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    draw.text((left, 8), title, fill=(0, 0, 0), font=font(14))
    draw.text(((left + right) / 2 - 3 * len(xlabel), H - 18), xlabel, fill=(60, 60, 60),
              font=font(12))
    if ylabel and ylabel != title:
        draw.text((4, top - 16), ylabel, fill=(60, 60, 60), font=font(12))
    for t in ticks(x0, x1) if xticks else []:
        px = at(t, 10 ** y0 if log_y else y0)[0]
        draw.line([px, bottom, px, bottom + 4], fill=(90, 90, 90))
        draw.text((px - 10, bottom + 6), label(t), fill=(60, 60, 60), font=font(11))
    for t in (log_ticks(y0, y1) if log_y else ticks(y0, y1)):
        py = bottom - (t - y0) / (y1 - y0) * (bottom - top)
        draw.line([left - 4, py, left, py], fill=(90, 90, 90))
        draw.line([left, py, right, py], fill=(235, 235, 235))
        draw.text((4, py - 6), label(10**t if log_y else t), fill=(60, 60, 60), font=font(11))
    return at


def legend(draw, names, x=None, y=None):
    x, y = x if x is not None else MARGIN["left"] + 8, y if y is not None else MARGIN["top"] + 6
    for i, name in enumerate(names):
        draw.rectangle([x, y + 16 * i + 3, x + 10, y + 16 * i + 13], fill=colour(i))
        draw.text((x + 14, y + 16 * i), str(name), fill=(0, 0, 0), font=font(12))


def line_chart(series, title, xlabel="step", ylabel="", log_y=False):
    """series: {name: [(x, y), ...]} -> one panel (PIL image), a line per series, a legend if
    several."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    points = [(x, y) for pts in series.values() for x, y in pts
              if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        draw.text((MARGIN["left"], H // 2), f"{title}: nothing to draw", fill=(0, 0, 0),
                  font=font(13))
        return img
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    at = axes(draw, title, xlabel, ylabel, (min(xs), max(xs)), (min(ys), max(ys)), log_y)
    for i, pts in enumerate(series.values()):
        pts = [at(x, y) for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour(i), width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2],
                         fill=colour(i))
    if len(series) > 1:
        legend(draw, list(series))
    return img


def grid(panels, cols=3, title=None):
    """Panels side by side, `cols` a row, under an optional title line."""
    rows = math.ceil(len(panels) / cols)
    head = 30 if title else 0
    pw, ph = max(p.width for p in panels), max(p.height for p in panels)
    sheet = Image.new("RGB", (cols * pw, rows * ph + head), "white")
    if title:
        ImageDraw.Draw(sheet).text((10, 8), title, fill=(0, 0, 0), font=font(15))
    for k, p in enumerate(panels):
        sheet.paste(p, ((k % cols) * pw, head + (k // cols) * ph))
    return sheet


def histograms(groups, title, xlabel="score", bins=40):
    """groups: {name: 1-D values} -> overlaid histograms (normalised to a density, outlines), one
    panel."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    values = {k: [float(v) for v in vs if math.isfinite(float(v))] for k, vs in groups.items()}
    everything = [v for vs in values.values() for v in vs]
    lo, hi = min(everything), max(everything)
    hi = hi if hi > lo else lo + 1
    width = (hi - lo) / bins
    dens = {}
    for k, vs in values.items():
        counts = [0] * bins
        for v in vs:
            counts[min(bins - 1, int((v - lo) / width))] += 1
        dens[k] = [c / (len(vs) * width) for c in counts]
    at = axes(draw, title, xlabel, "density", (lo, hi), (0, max(max(d) for d in dens.values())))
    for i, d in enumerate(dens.values()):
        pts = []
        for b, h in enumerate(d):
            pts += [at(lo + b * width, h), at(lo + (b + 1) * width, h)]
        draw.line([at(lo, 0)] + pts + [at(hi, 0)], fill=colour(i), width=2)
    legend(draw, list(groups), x=W - MARGIN["right"] - 170)
    return img


def bar_chart(groups, title, ylabel="top-1 %", floor=None):
    """groups: {label: (mean, std)} -> bars with +-std whiskers; floor: a dashed reference line
    (e.g. the random-init encoder's score)."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    tops = [m + s for m, s in groups.values()] + ([floor] if floor is not None else [])
    lows = [m - s for m, s in groups.values()] + ([floor] if floor is not None else [])
    lo = max(0.0, min(lows) - 0.15 * (max(tops) - min(lows) + 1e-9))
    at = axes(draw, title, "", ylabel, (0, len(groups)), (lo, max(tops) * 1.06 + 1e-9),
              xticks=False)
    for i, (name, (m, s)) in enumerate(groups.items()):
        x0, x1 = at(i + 0.2, lo)[0], at(i + 0.8, lo)[0]
        draw.rectangle([x0, at(0, m)[1], x1, at(0, lo)[1]], fill=colour(i))
        cx = (x0 + x1) / 2
        draw.line([cx, at(0, m - s)[1], cx, at(0, m + s)[1]], fill=(0, 0, 0), width=1)
        draw.text((x0, at(0, m + s)[1] - 14), f"{m:.1f}", fill=(0, 0, 0), font=font(11))
        draw.text((x0, H - MARGIN["bottom"] + 6), str(name)[:14], fill=(0, 0, 0), font=font(11))
    if floor is not None:
        y = at(0, floor)[1]
        for x in range(MARGIN["left"], W - MARGIN["right"], 8):
            draw.line([x, y, x + 4, y], fill=(120, 120, 120))
        draw.text((W - MARGIN["right"] - 90, y - 14), f"random init {floor:.1f}", fill=(90, 90, 90),
                  font=font(11))
    return img


def scatter(points, labels, names, title):
    """points (N, 2), labels (N,) ints, names: one per class -> a 2-D map coloured by class, the
    legend to its right."""
    img = Image.new("RGB", (W + 130, H), "white")
    draw = ImageDraw.Draw(img)
    xs, ys = points[:, 0].tolist(), points[:, 1].tolist()
    at = axes(draw, title, "", "", (min(xs), max(xs)), (min(ys), max(ys)))
    for x, y, c in zip(xs, ys, labels.tolist()):
        px, py = at(x, y)
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour(c))
    legend(draw, names, x=W + 4)
    return img


def save_png(img, path):
    """util.write_atomic: the old picture or the new one, never half of one."""
    write_atomic(path, lambda f: img.save(f, format="PNG"))


# -----------------------------------------------------------------------------
# training curves (train.py draws them at each save; `python plots.py curves` overlays runs)


def training_curves(run_dirs, names=None):
    """One panel per logged quantity (every loss term by name, then lr, grad norm, images/s, MFU),
    each run a line. Returns the sheet (PIL image), or None when no run has a record."""
    logs = {name: [r for r in rundir.read_log(d) if "step" in r]  # a cut line is left out
            for name, d in zip(names or [os.path.basename(os.path.normpath(d)) or d
                                         for d in run_dirs], run_dirs)}
    keys = []
    for recs in logs.values():
        for r in recs:
            keys += [k for k, v in r.items()
                     if k != "step" and isinstance(v, (int, float)) and k not in keys]
    if not keys:
        return None
    # the loss terms first
    order = sorted(keys, key=lambda k: (k != "loss", not k.endswith("loss"), k))
    panels = [line_chart({n: [(r["step"], r[k]) for r in recs if k in r]
                          for n, recs in logs.items()}, k,
                         ylabel=k, log_y=k in ("lr", "grad_norm") or k.endswith("loss"))
              for k in order]
    return grid(panels, cols=min(3, len(panels)), title=", ".join(logs) + ": log.jsonl, by step")


# -----------------------------------------------------------------------------
# exact t-SNE (van der Maaten & Hinton 2008), small and readable, for a few thousand points


def tsne(x, perplexity=30.0, iters=500, seed=0):
    """x (N, D) -> (N, 2). Exact: binary search of each point's bandwidth to the perplexity,
    symmetric P, Student-t Q, gradient descent with momentum and early exaggeration (x12 for the
    first 250 steps). O(N^2) memory and time per step: keep N to a few thousand."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()  # the bandwidth search in float64; the descent in float32
    n = len(x)
    d = torch.cdist(x, x).pow(2)
    target = math.log(min(perplexity, (n - 1) / 3))
    beta = torch.ones(n, dtype=torch.float64)
    lo, hi = torch.full_like(beta, 0.0), torch.full_like(beta, float("inf"))
    eye = torch.eye(n, dtype=torch.bool)
    for _ in range(64):  # bisect each row's precision until its entropy is log(perplexity)
        p = torch.exp(-(d - d.masked_fill(eye, float("inf")).min(1, keepdim=True).values)
                      * beta[:, None])
        p = p.masked_fill(eye, 0.0)
        p = p / p.sum(1, keepdim=True)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
        big = entropy > target  # too flat: raise beta
        lo = torch.where(big, beta, lo)
        hi = torch.where(big, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    p = ((p + p.T) / (2 * n)).float()
    y = torch.randn(n, 2, generator=g) * 1e-4
    velocity = torch.zeros_like(y)
    for it in range(iters):
        exaggerate = 12.0 if it < 250 else 1.0
        num = 1.0 / (1.0 + torch.cdist(y, y).pow(2))
        num = num.masked_fill(eye, 0.0)
        q = (num / num.sum()).clamp_min(1e-12)
        w = (exaggerate * p - q) * num  # (N, N)
        grad = 4.0 * (w.sum(1, keepdim=True) * y - w @ y)
        velocity = (0.5 if it < 250 else 0.8) * velocity - 200.0 * grad
        y = y + velocity
    return (y - y.mean(0)).float()


@torch.no_grad()
def folder_features(ckpt_path, folder, size=1000, seed=0, batch_size=256):
    """(CLS features (n, D), labels (n,), class names) of a checkpoint's frozen encoder on up to
    `size` images of an ImageFolder, the same classes' share each (a seeded pick), the evaluation
    view (resize, centre)."""
    import checkpoint
    import data

    model, ckpt = checkpoint.load_model(ckpt_path)
    model.eval()
    source = data.ImageFolder(folder)
    labels = torch.tensor([source[i]["label"] for i in range(len(source))])
    g = torch.Generator().manual_seed(seed)
    per_class = max(1, size // len(source.classes))
    pick = torch.cat([(labels == c).nonzero().squeeze(1)
                      [torch.randperm(int((labels == c).sum()), generator=g)][:per_class]
                      for c in range(len(source.classes))])
    mean, std = checkpoint.checkpoint_norm(ckpt, real_data_default=True)
    dataset = data.LabelledDataset(source, data.EvalTransform(model.config.image_size, mean, std))
    feats, kept = [], []
    for start in range(0, len(pick), batch_size):
        samples = [dataset[int(i)] for i in pick[start : start + batch_size]]
        good = [s for s in samples if "skip" not in s]
        if good:
            feats.append(model.encode(torch.stack([s["image"] for s in good]))[0])
            kept += [int(s["label"]) for s in good]
    if not kept:
        raise ValueError(f"{folder}: no readable image")
    return torch.cat(feats), torch.tensor(kept), [c.replace("_", " ") for c in source.classes]


def tsne_figure(ckpts, test_dir, size=1000, seed=0):
    """The frozen CLS features of each checkpoint on the same `size` images of an ImageFolder,
    mapped by tsne, side by side."""
    panels = []
    for path in ckpts:
        feats, labels, classes = folder_features(path, test_dir, size, seed)
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        panels.append(scatter(tsne(feats, seed=seed), labels, classes,
                              f"{name}: t-SNE of frozen CLS"))
    return grid(panels, cols=len(panels),
                title=f"frozen features on {test_dir} ({len(labels)} images), coloured by class")


def main(argv=None):
    p = make_parser(__doc__, prog="plots.py")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curves", help="training curves of one or more runs, overlaid")
    c.add_argument("runs", nargs="+", help="run folders (each with a log.jsonl)")
    c.add_argument("--out", default="curves.png", help="the PNG to write")
    t = sub.add_parser("tsne",
                       help="t-SNE maps of frozen features, one per checkpoint, side by side")
    t.add_argument("--ckpt", action="append", required=True,
                   help="a checkpoint (repeat for several)")
    t.add_argument("--test-dir", required=True,
                   help="an ImageFolder root (one sub-folder per class)")
    t.add_argument("--size", type=int, default=1000,
                   help="images (stratified by class), at most ~3000")
    t.add_argument("--seed", type=int, default=0, help="which images, and the map's initialisation")
    t.add_argument("--out", default="tsne.png", help="the PNG to write")
    args = p.parse_args(argv)
    refused = foreign_output(args.out, "png")
    if refused:
        p.error(f"argument --out: {refused}")
    if args.what == "curves":
        missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, "log.jsonl"))]
        if missing:
            p.error(f"argument runs: no log.jsonl in {', '.join(missing)}")
        sheet = training_curves(args.runs)
        if sheet is None:
            p.error("argument runs: the logs hold no record yet")
    else:
        if not 10 <= args.size <= 3000:
            p.error(f"argument --size: {args.size} must be in [10, 3000] (exact t-SNE is "
                    "quadratic)")
        try:
            sheet = tsne_figure(args.ckpt, args.test_dir, args.size, args.seed)
        except ValueError as e:
            p.error(str(e).splitlines()[0])
    save_png(sheet, args.out)
    print(f"wrote {args.out}")
    return args.out


# -----------------------------------------------------------------------------
# a confusion matrix (zeroshot.py draws one beside its JSON)


def confusion_matrix(counts, names, title):
    """counts: (C, C) ints, row = true class, column = predicted -> a PIL image: each cell shaded by
    its share of the row (white 0, dark blue 1), its count written in it, the diagonal outlined;
    rows named "k name" on the left, columns numbered k on top, each row's accuracy on the right."""
    counts = torch.as_tensor(counts).long()
    C = len(names)
    cell = max(14, min(44, 560 // max(C, 1)))
    left, top, right = 150, 58, 64
    img = Image.new("RGB", (left + C * cell + right, top + C * cell + 12), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill=(0, 0, 0), font=font(14))
    draw.text((8, 28), "row: true class, column: predicted; shade: share of the row",
              fill=(90, 90, 90), font=font(11))
    rows = counts.sum(1).clamp(min=1)
    small = font(max(8, min(12, cell // 3)))
    for j in range(C):
        draw.text((left + j * cell + cell // 2 - 4, top - 14), str(j), fill=(60, 60, 60),
                  font=small)
    for i in range(C):
        y = top + i * cell
        draw.text((4, y + cell // 2 - 7), f"{i} {names[i]}"[:22], fill=(0, 0, 0), font=font(12))
        for j in range(C):
            share = counts[i, j].item() / rows[i].item()
            shade = tuple(int(255 - share * (255 - c)) for c in (8, 48, 107))
            box = [left + j * cell, y, left + (j + 1) * cell - 1, y + cell - 1]
            draw.rectangle(box, fill=shade, outline=(0, 0, 0) if i == j else (225, 225, 225))
            if counts[i, j] and cell >= 20:
                draw.text((box[0] + 2, box[1] + cell // 2 - 6), str(counts[i, j].item()),
                          fill=(255, 255, 255) if share > 0.5 else (0, 0, 0), font=small)
        acc = 100.0 * counts[i, i].item() / rows[i].item()
        draw.text((left + C * cell + 6, y + cell // 2 - 7), f"{acc:.0f}%", fill=(0, 0, 0),
                  font=font(12))
    return img


if __name__ == "__main__":
    main()
