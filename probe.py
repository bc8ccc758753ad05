"""Linear probe and kNN on a frozen encoder (paper section 4.1, MAE's protocol) — one flat script.

    python probe.py --ckpt runs/default/ckpt.pt                  # fast mode: cached features, lr grid, kNN
    python probe.py --ckpt runs/default/ckpt.pt --mode full      # train-time augmentation through the encoder
    python probe.py --ckpt runs/default/ckpt.pt --random-init    # the floor: same architecture, untrained
    python probe.py --ckpt ckpt.pt --train-dir imagenet/train --test-dir imagenet/val --recipe paper --mode full

Protocol (the paper's and mae's, docs/reference.md "Linear probe"; where we depart, a comment says so):
  * feature: the CLS token after the encoder's final LayerNorm, image only (no text), no masking, frozen.
  * head: BatchNorm1d without affine (eps 1e-6, as mae) + Linear (trunc-normal std 0.01, zero bias, as mae).
  * optimiser: LARS (momentum 0.9, trust coefficient 0.001, no weight decay), lr = base_lr x batch / 256, linear
    warmup (10 of 90 epochs) then cosine, per step. `--optimizer sgd` swaps in plain momentum SGD.
  * the lr (--recipe):
      grid (default)  one head per base lr of --lr-grid, all trained at once on the same batches (one batched
                      head); the lr is chosen on a validation split held out from the training data (--val-fraction,
                      stratified by class, seeded by --seed; or --val-dir), never on the test split. The head kept
                      is the one trained on the training split without the validation images (no refit). Why: a
                      single base lr does not fit every dataset size (LARS moves the head by lr x 0.001 x ||w|| a
                      step, so how far it travels scales with base_lr x images x epochs / 256; at the paper's 0.1 a
                      head on a few thousand images barely leaves its random init). docs/probe.md has measurements.
      paper           the paper's fixed recipe, one head on the whole training split: LARS, base lr 0.1
                      (--base-lr), 90 epochs, warmup 10, batch as given. For ImageNet-scale runs.
  * fast mode (default): features of the evaluation view are extracted once and cached on disk under
    features/<key>.pt next to the checkpoint, key = hash of the weights + dataset + transform; the head
    trains on them (no augmentation: a departure from the paper, which crops every epoch). Seconds on a CPU.
  * full mode: every epoch, RandomResizedCrop(scale 0.08-1) + flip, through the frozen encoder (paper's
    protocol; slow: one encoder pass per sample per epoch; a progress bar per epoch). Validation and test use
    the cached centre view.
  * kNN (a second opinion, no training): cosine similarity on the same cached features (the whole training
    split, validation images included), k = 20 neighbours, votes weighted by exp(similarity / 0.07) (DINO's).
Prints top-1/top-5 and writes a JSON result named by checkpoint and dataset: probe_<dataset>_<mode>[_paper]
[_random_init].json next to the checkpoint (<dataset>: the --train-dir folder's name, or builtin[_colour]).
"""

import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import builtin
import data
from checkpoint import (NORMS, checkpoint_data_level, checkpoint_data_seed, checkpoint_norm, load_model,
                        pretraining_info, save_atomic)
from model import M3AE, PRESETS, make_config
from util import SeededSamples, lr_at, make_parser, mix_seed

# base lrs of the default grid (lr = base_lr x batch / 256). 0.1 is the paper's, 6.4 mae's absolute lr (the old
# built-in default); the large end is for small datasets, where LARS needs base_lr x images x epochs / 256 to be
# large for the head to leave its init (docs/probe.md).
LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 6.4, 10.0, 30.0, 100.0)

# -----------------------------------------------------------------------------
# arguments (the encoder/data/head groups are shared with ood.py). Flags whose default is None say what "not
# given" means: the help formatter appends "(default: None)".


def add_encoder_args(p):
    a = p.add_argument
    a("--ckpt", help="checkpoint file from train.py or convert.py (a dict with 'model' and 'config'); if not "
      "given, --random-init with --preset's architecture")
    a("--random-init", action="store_true", help="evaluate an untrained encoder (the floor): the checkpoint's "
      "architecture (or --preset's) with fresh weights drawn from --seed")
    a("--preset", default="tiny", choices=list(PRESETS), help="architecture for --random-init without --ckpt")
    a("--seed", type=int, default=0, help="head init, shuffling, the validation split (and the weights under "
      "--random-init)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a("--batch-size-features", type=int, default=256, help="images per encoder forward when extracting")
    a("--workers", type=int, default=0, help="DataLoader workers")
    a("--cache-dir", help="feature cache; if not given, features/ next to the checkpoint")
    a("--out", help="JSON result path; if not given, a name from the checkpoint and the dataset next to the "
      "checkpoint")


def add_data_args(p):
    a = p.add_argument
    a("--train-dir", help="ImageFolder root (one sub-folder of images per class) to fit on; if not given, the "
      "built-in data")
    a("--test-dir", help="ImageFolder root to evaluate on (the same class folders as --train-dir); if not given, "
      "the built-in test split (and no --train-dir)")
    a("--val-dir", help="ImageFolder root that chooses the grid's lr (the same class folders as --train-dir); if "
      "not given, --val-fraction of --train-dir is held out")
    a("--val-fraction", type=float, default=0.1, help="share of the training images held out (stratified by "
      "class, seeded by --seed) to choose the grid's lr when there is no --val-dir")
    a("--train-size", type=int, help="training images; if not given, all (built-in: the split's 5000). On "
      "folders a seeded stratified subset (--data-seed)")
    a("--test-size", type=int, help="test images; if not given, all (built-in: the split's 2000). On folders a "
      "seeded stratified subset (--data-seed)")
    a("--data-seed", type=int, help="built-in data: which procedural dataset, if not given the checkpoint's; "
      "folders: which --train-size/--test-size subset, if not given 0")
    a("--data-level", choices=list(builtin.LEVELS), help="built-in data: difficulty; if not given, the "
      "checkpoint's")
    a("--norm", default="auto", choices=["auto", *NORMS],
      help="normalisation statistics; auto = those the checkpoint was pretrained with (builtin or cc12m)")
    a("--crop-pct", type=float, help="evaluation centre crop; if not given, 0.875 for folders, 1.0 for built-in")


def add_head_args(p, full_mode=True):
    a = p.add_argument
    a("--recipe", default="grid", choices=["grid", "paper"], help="grid: one head per --lr-grid base lr, the lr "
      "chosen on the validation split; paper: one head at --base-lr on the whole training split")
    a("--lr-grid", type=float, nargs="+", default=list(LR_GRID), help="--recipe grid: the base lrs tried")
    a("--optimizer", default="lars", choices=["lars", "sgd"], help="LARS as the paper, or momentum SGD")
    a("--epochs", type=int, help="head training epochs; if not given, 90 as the paper" + (" (10 for --mode full "
      "on the built-in data)" if full_mode else ""))
    a("--batch-size", type=int, default=256, help="head batch (paper: 16384 mae, 2048 official)")
    a("--base-lr", type=float, help="--recipe paper: lr = base_lr x batch / 256; if not given, 0.1 as the paper")
    a("--warmup-epochs", type=float, help="linear warmup; if not given, epochs / 9 (the paper's 10 of 90)")
    a("--weight-decay", type=float, default=0.0, help="as the paper: 0")


def fail(p, flag, value, problem):
    """argparse's error (usage, then one line, exit 2): '--flag VALUE: problem'."""
    p.error(f"{flag} {value}: {problem}")


def check_file(p, flag, path, what):
    if not os.path.exists(path):
        fail(p, flag, path, f"no such file ({what})")
    if os.path.isdir(path):
        fail(p, flag, path, f"is a folder, not a file ({what})")


def check_image_folder(p, flag, path, labelled=True):
    """Check a folder flag before any work; returns (class names or None, image files per class or in all).
    labelled: an ImageFolder root (class sub-folders of images); else any folder with images below it."""
    exts = " ".join(data.IMAGE_EXTENSIONS)
    if not os.path.exists(path):
        fail(p, flag, path, "no such folder")
    if not os.path.isdir(path):
        fail(p, flag, path, "not a folder (give a folder of images)")
    if not labelled:
        n = len(data._image_files(path))
        if n == 0:
            fail(p, flag, path, f"no image files in it or below it (looked for {exts})")
        return None, n
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))  # ImageFolder's
    if not classes:
        fail(p, flag, path, f"no class sub-folders (an ImageFolder root holds one folder of images per class: "
             f"{os.path.join(path, '<class>', '*.png')})")
    counts = {c: len(data._image_files(os.path.join(path, c))) for c in classes}
    if sum(counts.values()) == 0:
        fail(p, flag, path, f"no image files in its {len(classes)} class folders (looked for {exts})")
    return classes, counts


def class_difference(train_classes, other_classes, train_flag, other_flag, other_path):
    """One line naming the classes that differ between two ImageFolder roots, or None when they agree."""
    if other_classes == train_classes:
        return None
    missing = [c for c in train_classes if c not in other_classes]
    extra = [c for c in other_classes if c not in train_classes]
    what = other_flag.lstrip("-").split("-")[0]
    parts = [f"missing from {what}: {', '.join(missing)}" if missing else "",
             f"extra in {what}: {', '.join(extra)}" if extra else ""]
    return (f"{other_flag} {other_path}: class folders differ from {train_flag}'s ("
            + "; ".join(x for x in parts if x) + ")")


def check_paths(p, args, splits):
    """Every path flag, checked before any work (p.error: one line naming the flag, the value, what is valid)."""
    if args.ckpt:
        check_file(p, "--ckpt", args.ckpt, "a checkpoint from train.py or convert.py")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        fail(p, "--cache-dir", args.cache_dir, "exists and is not a folder")
    if args.out and os.path.isdir(args.out):
        fail(p, "--out", args.out, "is a folder (give the JSON file's path)")
    classes = {}
    for split in splits:
        flag, path = f"--{split}-dir", getattr(args, f"{split}_dir", None)
        if path:
            classes[split] = check_image_folder(p, flag, path, labelled=split != "ood")
    if "train" in classes:
        for split in ("test", "val"):
            if split in classes:
                line = class_difference(classes["train"][0], classes[split][0], "--train-dir", f"--{split}-dir",
                                        getattr(args, f"{split}_dir"))
                if line:
                    p.error(line)
    for split in splits:  # sizes: positive, and within a folder's images
        size = getattr(args, f"{split}_size", None)
        if size is None:
            continue
        if size < 1:
            fail(p, f"--{split}-size", size, "must be >= 1")
        if split in classes:
            counts = classes[split][1]
            n = sum(counts.values()) if isinstance(counts, dict) else counts
            if size > n:
                fail(p, f"--{split}-size", size, f"more than the {n} image files in --{split}-dir "
                     f"{getattr(args, f'{split}_dir')}")
    return classes


def check_head_args(p, args):
    if args.recipe == "paper" and args.val_dir:
        p.error("--val-dir chooses the grid's lr; --recipe paper has a fixed lr (drop one of them)")
    if args.recipe == "grid":
        if args.base_lr is not None:
            p.error("--base-lr is --recipe paper's lr; the grid's are --lr-grid")
        if not args.val_dir and not 0.0 < args.val_fraction < 1.0:
            fail(p, "--val-fraction", args.val_fraction, "must be in (0, 1) (or give --val-dir)")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lr_grid):
            fail(p, "--lr-grid", " ".join(map(str, args.lr_grid)), "every base lr must be a positive number")
    if args.val_dir and not args.train_dir:
        p.error("--val-dir goes with --train-dir (the built-in data holds out --val-fraction)")
    if args.epochs is not None and args.epochs < 1:
        fail(p, "--epochs", args.epochs, "must be >= 1")
    if args.batch_size < 2:
        fail(p, "--batch-size", args.batch_size, "must be >= 2 (the head's BatchNorm needs 2 rows)")


def build_parser():
    p = make_parser(__doc__, prog="probe.py")
    add_encoder_args(p)
    add_data_args(p)
    add_head_args(p)
    a = p.add_argument
    a("--mode", default="fast", choices=["fast", "full"], help="fast: cached features; full: augmentation")
    a("--label", default="shape", choices=builtin.Builtin.LABELS, help="built-in data: what to classify, the main "
      "object's shape (10 classes) or its colour (11); results go to probe_builtin[_colour]_<mode>.json")
    a("--knn-k", type=int, default=20, help="kNN neighbours")
    a("--knn-t", type=float, default=0.07, help="kNN temperature of the vote weights exp(sim / t)")
    a("--save-head", metavar="PATH", help="also save the chosen head (BatchNorm + Linear state dict, classes, "
      "view) to PATH; if not given, not saved")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.ckpt and not args.random_init:
        p.error("give --ckpt (or --random-init [--preset])")
    if bool(args.train_dir) != bool(args.test_dir):
        p.error("real data needs both --train-dir and --test-dir")
    if args.train_dir and args.label != "shape":
        p.error("--label picks a built-in attribute; folders label by class folder")
    check_head_args(p, args)
    if args.save_head and os.path.isdir(args.save_head):
        fail(p, "--save-head", args.save_head, "is a folder (give the file's path)")
    check_paths(p, args, ("train", "test", "val"))
    return args


# -----------------------------------------------------------------------------
# LARS: torch has none. Layer-wise trust ratio (You et al. 2017), written from the paper's update rule.


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is rescaled by the trust ratio
    trust_coefficient x ||w|| / ||g + wd w||. Per parameter p with gradient g:

        d = g + weight_decay x p                    (matrices only)
        d = d x trust_coefficient x ||p|| / ||d||   (matrices only, when both norms are > 0)
        mu = momentum x mu + d                      (mu starts at 0)
        p = p - lr x mu

    1-D parameters (biases; our BatchNorm has none) skip weight decay and the trust ratio, as mae does;
    official (optax) applies both to every parameter. With weight_decay 0 (the probe's) the choice only
    decides whether the bias step is rescaled."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = p.norm(), d.norm()
                    ratio = torch.where((p_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * p_norm / d_norm, torch.ones_like(p_norm))
                    d = d * ratio
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])


# -----------------------------------------------------------------------------
# encoder and data


def load_encoder(ckpt_path=None, random_init=False, preset="tiny", seed=0, device="cpu"):
    """(model in eval mode, the checkpoint dict or {}). random_init keeps the checkpoint's architecture (or the
    preset's, without a checkpoint) and draws fresh weights from `seed`: the floor every probe is read against."""
    ckpt = {}
    if ckpt_path:
        model, ckpt = load_model(ckpt_path)
        config = model.config
    else:
        config = make_config(preset, vocab_size=PRESETS[preset].get("vocab_size", 1024))
    if random_init:
        torch.manual_seed(seed)
        model = M3AE(config)
    return model.to(device).eval(), ckpt


def weights_hash(model):
    """sha256 of the config (geometry) and every tensor of the state dict: the feature cache's model key. We hash
    the weights rather than the checkpoint file so that --random-init (no file) is keyed the same way, and a
    checkpoint re-saved with other optimizer state keeps its features."""
    h = hashlib.sha256()
    config = asdict(model.config)
    config.pop("attn_impl")  # the implementation does not change what the encoder computes
    h.update(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def folder_identity(root):
    """A folder's dataset identity for the cache key: its path and every image's (path, size, mtime)."""
    h = hashlib.sha256(os.path.abspath(root).encode())
    for path in data._image_files(root):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"folder:{os.path.abspath(root)}:{h.hexdigest()[:16]}"


GENERIC_FOLDER_NAMES = {"train", "training", "trn", "val", "valid", "validation", "test", "testing", "eval",
                        "images", "imgs", "data", "in", "ood", "out"}


def folder_name(path):
    """A dataset's name from its folder, for result file names: the folder's name, or its parent's when the
    folder is a split (train, test, val, images ...): /data/fashion_mnist/train -> fashion_mnist."""
    parts = [x for x in os.path.abspath(path).split(os.sep) if x]
    name = parts[-1] if parts else "root"
    if name.lower() in GENERIC_FOLDER_NAMES and len(parts) > 1:
        name = parts[-2]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "folder"


@dataclass
class EvalData:
    """Which images an evaluation reads and how they are viewed. Folders (ImageFolder class sub-folders; the OOD
    folder any layout) when given, else the built-in splits (sizes, data seed and level, label). sizes: per split,
    the built-in image count, or for a folder the size of a seeded stratified subset (None: all). The view:
    resize + centre crop_pct + normalise with (mean, std). Features are cached under cache_dir."""
    mean: tuple
    std: tuple
    crop_pct: float
    cache_dir: str
    folders: dict  # split name -> folder, for the splits given as folders
    sizes: dict  # split name -> image count (None: the split's default / the whole folder)
    data_seed: int = 0
    data_level: str = "easy"
    label: str = "shape"
    batch_size: int = 256
    workers: int = 0
    subset_seed: int = 0

    @property
    def real(self):
        return bool(self.folders)

    @property
    def name(self):
        """The in-distribution dataset's name (result files): the training folder's name, or builtin[_colour]."""
        if self.real:
            return folder_name(self.folders["train"])
        return "builtin" + ("_colour" if self.label == "colour" else "")


def eval_data(args, ckpt, splits=("train", "test", "val")):
    """EvalData from probe.py's / ood.py's flags (add_encoder_args + add_data_args) and what the checkpoint says
    (its normalisation, data seed and level); the one place flags become values."""
    folders = {s: getattr(args, f"{s}_dir") for s in splits if getattr(args, f"{s}_dir", None)}
    mean, std = NORMS[args.norm] if args.norm != "auto" else checkpoint_norm(ckpt, real_data_default=bool(folders))
    crop = args.crop_pct if args.crop_pct is not None else (0.875 if folders else 1.0)
    return EvalData(mean=mean, std=std, crop_pct=crop, cache_dir=cache_dir_for(args.ckpt, args.cache_dir, args.preset),
                    folders=folders, sizes={s: getattr(args, f"{s}_size", None) for s in splits},
                    data_seed=args.data_seed if args.data_seed is not None else checkpoint_data_seed(ckpt),
                    data_level=args.data_level or checkpoint_data_level(ckpt), label=getattr(args, "label", "shape"),
                    batch_size=args.batch_size_features, workers=args.workers,
                    subset_seed=args.data_seed if args.data_seed is not None else 0)


def stratified_counts(counts, n, cap=None):
    """How many of each class to pick so that n picks keep the class shares: floor(n x share), then one more for
    the classes with the largest remainders (ties: the lower class). cap (per class, optional) bounds each."""
    total = sum(counts)
    cap = list(counts) if cap is None else cap
    exact = [n * c / total for c in counts]
    quota = [min(int(math.floor(e)), m) for e, m in zip(exact, cap)]
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - quota[k]), k))
    left = n - sum(quota)
    while left > 0:
        grew = False
        for k in order:
            if left > 0 and quota[k] < cap[k]:
                quota[k] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return quota


def stratified_pick(labels, n, seed, cap=None):
    """Sorted indices of n of `labels` (a 1-D int tensor), each class's share kept (stratified_counts), a seeded
    random choice within each class. cap: {label: most picks of that label}."""
    labels = torch.as_tensor(labels)
    classes, counts = labels.unique(return_counts=True)
    caps = None if cap is None else [cap[int(c)] for c in classes]
    quota = stratified_counts(counts.tolist(), n, caps)
    g = torch.Generator().manual_seed(seed)
    picked = [torch.zeros(0, dtype=torch.int64)]
    for c, q in zip(classes.tolist(), quota):
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:q]])
    return torch.cat(picked).sort().values


def stratified_split(labels, fraction, seed):
    """(fit, held out) indices of labels: round(fraction x N) held out, stratified by class, every class keeping
    at least one sample on the fit side."""
    labels = torch.as_tensor(labels)
    classes, counts = labels.unique(return_counts=True)
    held = stratified_pick(labels, round(fraction * len(labels)), mix_seed(seed, 17),
                           cap={int(c): int(n) - 1 for c, n in zip(classes, counts)})
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def labelled_source(d, which, image_size):
    """(source of dict(image, label), identity string, class names, description) for split `which` (train, test,
    val or ood) of EvalData d: its folder when given (a seeded stratified subset when d.sizes says so; the OOD
    folder a seeded random subset), else the built-in split."""
    folder = d.folders.get(which)
    size = d.sizes.get(which)
    if folder:
        if which == "ood":  # any layout, no labels needed
            source, identity, classes = Unlabelled(data.ImageOnlyFolder(folder)), folder_identity(folder), None
            labels = torch.zeros(len(source), dtype=torch.int64)
            identity += ":unlabelled"
        else:
            source = data.ImageFolder(folder)
            identity, classes = folder_identity(folder), source.classes
            labels = torch.tensor([k for _, k in source.samples], dtype=torch.int64)
        if size is not None and size < len(source):
            picked = stratified_pick(labels, size, mix_seed(d.subset_seed, 23))
            source = torch.utils.data.Subset(source, picked.tolist())
            identity += f":subset{size}:seed{d.subset_seed}"
        return source, identity, classes, f"--{which}-dir {folder}"
    source = builtin.Builtin(which, size, image_size, seed=d.data_seed, level=d.data_level, label=d.label)
    identity = f"builtin:{which}:{len(source)}:{image_size}px:seed{d.data_seed}:{d.data_level}:{d.label}"
    return source, identity, source.classes, f"built-in {which} split"


class Unlabelled(torch.utils.data.Dataset):
    """An image-only source (no classes) with label -1, for OOD folders."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return dict(image=self.source[i]["image"], label=-1)


class Indexed(torch.utils.data.Dataset):
    """dataset[i] plus index=i (skip samples too), so that features can be traced back to their source rows."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return dict(self.dataset[i], index=i)


class Split(NamedTuple):
    """A split's cached features: x (N, D) float32, y (N,) labels (-1 for OOD), index (N,) the source row of each
    feature (unreadable images leave gaps), classes (names or None), skipped {reason: count}, what (a
    description naming the folder or split)."""
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    classes: list
    skipped: dict
    what: str


def skip_report(skipped):
    return ", ".join(f"{k} {n}" for k, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def split_features(model, d, which, model_key=None):
    """Split (features, labels, source rows, class names, skip counts) of split `which` (train, test, val or ood)
    of EvalData d, through its evaluation view, cached on disk. A split that yields no sample (every image
    unreadable) ends the run: SystemExit with one line naming the folder and the skip counts."""
    image_size = model.config.image_size
    source, identity, classes, what = labelled_source(d, which, image_size)
    transform = data.EvalTransform(image_size, d.mean, d.std, d.crop_pct)
    view = f"eval:{image_size}:{d.crop_pct}:{d.mean}:{d.std}"
    x, y, index, skipped = cached_features(model, model_key or weights_hash(model),
                                           data.LabelledDataset(source, transform), f"{identity}|{view}|cls",
                                           d.cache_dir, d.batch_size, d.workers)
    if len(x) == 0:
        raise SystemExit(f"{what}: no usable image: all {len(source)} skipped ({skip_report(skipped)}); "
                         "no metric computed")
    return Split(x, y, index, classes, skipped, what)


# -----------------------------------------------------------------------------
# features, cached


class Features(NamedTuple):
    x: torch.Tensor  # (N, D) float32 on the CPU
    y: torch.Tensor  # (N,) int64
    index: torch.Tensor  # (N,) int64: the dataset row of each feature
    skipped: dict  # reason -> count of unreadable samples (data.collate's reasons)


@torch.no_grad()
def extract_features(model, dataset, batch_size=256, workers=0):
    """Frozen CLS features after the final norm, image only, no masking. Returns Features(x (N, D) float32 on the
    CPU, y (N,) int64, index (N,) the dataset row of each, skipped {reason: count}): unreadable images are skipped
    by data.collate and counted."""
    model.eval()
    device = model.cls_token.device
    loader = torch.utils.data.DataLoader(Indexed(dataset), batch_size=batch_size, num_workers=workers,
                                         collate_fn=data.collate)
    feats, labels, rows, skipped = [], [], [], Counter()
    for batch in tqdm(loader, desc="features", leave=False, disable=len(loader) < 8):
        skipped.update({k: n for k, n in batch["skipped"].items() if not k.startswith("converted:")})
        if len(batch["label"]):
            feats.append(model.encode(batch["image"].to(device))[0].float().cpu())
            labels.append(batch["label"])
            rows.append(batch["index"])
    dim = model.config.emb_dim
    cat = lambda xs, empty: torch.cat(xs) if xs else empty
    return Features(cat(feats, torch.zeros(0, dim)), cat(labels, torch.zeros(0, dtype=torch.int64)),
                    cat(rows, torch.zeros(0, dtype=torch.int64)), dict(skipped))


def cached_features(model, model_key, dataset, data_key, cache_dir, batch_size=256, workers=0):
    """extract_features, memoised on disk: cache_dir/<key>.pt with key = sha256(model_key, data_key). A new
    checkpoint (other weights), another dataset or another transform gives another key, so stale features are
    never read. An extraction that yields nothing is not cached. Returns Features."""
    key = hashlib.sha256(json.dumps([model_key, data_key, "v2"]).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.exists(path):
        c = torch.load(path, weights_only=True)
        return Features(c["features"], c["labels"], c["index"], c["skipped"])
    t0 = time.perf_counter()
    f = extract_features(model, dataset, batch_size, workers)
    skipped = sum(f.skipped.values())
    print(f"features: {len(f.x)} x {f.x.size(1)} from {data_key} in {time.perf_counter() - t0:.1f}s"
          + (f" ({skipped} unreadable images skipped: {skip_report(f.skipped)})" if skipped else "")
          + (f" -> {path}" if len(f.x) else ""))
    if len(f.x):
        os.makedirs(cache_dir, exist_ok=True)
        save_atomic({"features": f.x, "labels": f.y, "index": f.index, "skipped": f.skipped, "model": model_key,
                     "data": data_key}, path)
    return f


def run_folder(ckpt_path, preset):
    """Where results and features of an encoder go: next to its checkpoint (runs/random_init_<preset> without)."""
    return os.path.dirname(os.path.abspath(ckpt_path)) if ckpt_path else os.path.join("runs", f"random_init_{preset}")


def cache_dir_for(ckpt_path, cache_dir=None, preset="tiny"):
    return cache_dir or os.path.join(run_folder(ckpt_path, preset), "features")


def out_path_for(ckpt_path, out, preset, random_init, name):
    """Default JSON result path: <checkpoint dir>/<name>[_random_init].json."""
    if out:
        return out
    return os.path.join(run_folder(ckpt_path, preset), f"{name}{'_random_init' if random_init else ''}.json")


def finite_or_raise(obj, where="result"):
    """Every number in a nested dict/list finite, else ValueError naming the first key path that is not."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            finite_or_raise(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            finite_or_raise(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}")


def write_result(result, path):
    """The result as JSON at path, never with NaN or infinity (json.dump(allow_nan=False)): a metric that is not a
    finite number ends the run with one line instead of a file that reads like a result."""
    try:
        finite_or_raise(result)
        text = json.dumps(result, indent=2, allow_nan=False)
    except ValueError as e:
        raise SystemExit(f"not writing {path}: a value is not a finite number ({e})") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# -----------------------------------------------------------------------------
# the head and its training


def make_head(dim, num_classes, seed=0):
    """BatchNorm without affine (mae's eps 1e-6) + Linear with mae's init: trunc-normal std 0.01, zero bias."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    # mae calls timm's trunc_normal_(std=0.01) with its default bounds of +-2 (absolute, i.e. 200 sigma): in
    # effect an untruncated normal. We pass the same bounds.
    nn.init.trunc_normal_(head[1].weight, std=0.01, a=-2.0, b=2.0, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(head[1].bias)
    return head


def epochs_bar(epochs, progress, desc="head"):
    return tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)


def train_head(epoch_batches, dim, num_classes, steps_per_epoch, epochs, batch_size=256, base_lr=0.1,
               optimizer="lars", warmup_epochs=None, weight_decay=0.0, seed=0, device="cpu", progress=False):
    """Train make_head(dim, num_classes) for epochs x steps_per_epoch steps. epoch_batches(epoch) yields
    (features (B, dim), labels (B,)) on `device`. lr = base_lr x batch / 256, linear warmup then cosine per
    step (util.lr_at). progress: a bar over epochs. Returns the head in eval mode."""
    head = make_head(dim, num_classes, seed).to(device)
    lr_max = base_lr * batch_size / 256
    if optimizer == "lars":
        opt = LARS(head.parameters(), weight_decay=weight_decay, momentum=0.9)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr_max, momentum=0.9, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    warmup = round((epochs / 9 if warmup_epochs is None else warmup_epochs) * steps_per_epoch)
    step = 0
    head.train()
    bar = epochs_bar(epochs, progress)
    for epoch in bar:
        for x, y in epoch_batches(epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr_max, warmup, total)
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return head.eval()


class HeadGrid(nn.Module):
    """len(base_lrs) linear heads trained at once: one BatchNorm (no affine, so nothing to learn: every head sees
    the same normalised batch) and a (L, C, D) weight / (L, C) bias, each head initialised as make_head(seed).
    forward: (B, D) -> (L, B, C) logits. head(i) is head i as a make_head module (for MSP, saving)."""

    def __init__(self, dim, num_classes, base_lrs, seed=0):
        super().__init__()
        self.base_lrs = [float(lr) for lr in base_lrs]
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        w = make_head(dim, num_classes, seed)[1].weight.detach()
        self.weight = nn.Parameter(w.expand(len(self.base_lrs), -1, -1).clone())
        self.bias = nn.Parameter(torch.zeros(len(self.base_lrs), num_classes))

    def forward(self, x):
        return self.norm(x) @ self.weight.transpose(1, 2) + self.bias[:, None, :]

    @torch.no_grad()
    def head(self, i):
        head = make_head(self.weight.size(2), self.weight.size(1)).to(self.weight.device)
        head[0].load_state_dict(self.norm.state_dict())
        head[1].weight.copy_(self.weight[i])
        head[1].bias.copy_(self.bias[i])
        return head.eval()


def grid_losses(logits, y):
    """(L,) mean cross-entropy of each head's (L, B, C) logits against labels (B,)."""
    return F.cross_entropy(logits.transpose(1, 2), y.expand(logits.size(0), -1), reduction="none").mean(1)


def train_grid(epoch_batches, dim, num_classes, steps_per_epoch, epochs, base_lrs, batch_size=256,
               optimizer="lars", warmup_epochs=None, weight_decay=0.0, seed=0, device="cpu", progress=False):
    """train_head for every base lr of base_lrs at once, on the same batches: a HeadGrid, each head stepped with its
    own lr = base_lr x batch / 256 (same warmup + cosine), LARS's trust ratio computed per head (or momentum
    SGD). Head i ends where train_head(..., base_lr=base_lrs[i]) ends, up to float rounding (tests check it). A
    head whose loss stops being finite is frozen; HeadGrid.diverged marks it. Returns the grid in eval mode."""
    grid = HeadGrid(dim, num_classes, base_lrs, seed).to(device)
    lrs = torch.tensor(grid.base_lrs, device=device) * batch_size / 256
    w, b = grid.weight, grid.bias
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    alive = torch.ones(len(lrs), dtype=torch.bool, device=device)
    total = epochs * steps_per_epoch
    warmup = round((epochs / 9 if warmup_epochs is None else warmup_epochs) * steps_per_epoch)
    step = 0
    grid.train()
    bar = epochs_bar(epochs, progress, f"{len(lrs)} heads")
    for epoch in bar:
        for x, y in epoch_batches(epoch):
            losses = grid_losses(grid(x), y)
            grid.zero_grad(set_to_none=True)
            losses.sum().backward()  # heads share no parameter: each gets the gradient of its own loss
            with torch.no_grad():
                alive &= torch.isfinite(losses)
                lr = torch.where(alive, lrs * lr_at(step, 1.0, warmup, total), torch.zeros_like(lrs))
                d = torch.nan_to_num(w.grad)
                if optimizer == "lars":
                    d = d + weight_decay * w
                    p_norm, d_norm = w.flatten(1).norm(dim=1), d.flatten(1).norm(dim=1)
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), 0.001 * p_norm / d_norm,
                                        torch.ones_like(p_norm))
                    d = d * ratio[:, None, None]
                    db = torch.nan_to_num(b.grad)  # 1-D: no weight decay, no trust ratio (as LARS above)
                else:
                    d = d + weight_decay * w
                    db = torch.nan_to_num(b.grad) + weight_decay * b
                mu_w.mul_(0.9).add_(d)
                mu_b.mul_(0.9).add_(db)
                w.sub_(lr[:, None, None] * mu_w)
                b.sub_(lr[:, None] * mu_b)
            step += 1
            if progress and alive.any():
                bar.set_postfix(best_loss=f"{losses[alive].min().item():.4f}", refresh=False)
    grid.diverged = (~alive).tolist()
    return grid.eval()


def feature_batches(x, y, batch_size, seed):
    """(epoch_batches, steps per epoch) over cached features, reshuffled every epoch (drop_last: BatchNorm needs
    > 1 row)."""
    batch_size = min(batch_size, len(x))
    steps = max(1, len(x) // batch_size)

    def epoch_batches(epoch):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        for idx in perm[: steps * batch_size].split(batch_size):
            yield x[idx], y[idx]

    return epoch_batches, steps, batch_size


def augmented_batches(model, dataset, batch_size, seed, workers=0):
    """(epoch_batches, steps per epoch): every epoch each training image augmented afresh (seeded by (seed, epoch,
    index) through util.SeededSamples) and encoded by the frozen encoder."""
    device = model.cls_token.device
    seeded = SeededSamples(dataset, seed)
    batch_size = min(batch_size, len(dataset))
    steps = max(1, len(dataset) // batch_size)

    def epoch_batches(epoch):
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(mix_seed(seed, epoch))).tolist()
        keys = [(epoch, i) for i in perm[: steps * batch_size]]
        loader = torch.utils.data.DataLoader(seeded, sampler=keys, batch_size=batch_size, num_workers=workers,
                                             collate_fn=data.collate)
        for batch in loader:
            if len(batch["label"]) > 1:  # unreadable images are dropped; BatchNorm needs > 1 row
                with torch.no_grad():
                    feats = model.encode(batch["image"].to(device))[0].float()
                yield feats, batch["label"].to(device)

    return epoch_batches, steps, batch_size


class one_thread:
    """Ops as small as a probe head's run faster on one thread (and OpenMP stalls when cores are busy)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def train_head_on_features(x, y, num_classes, epochs=90, batch_size=256, seed=0, **recipe):
    """Fast mode, one head: train_head on cached features."""
    epoch_batches, steps, batch_size = feature_batches(x, y, batch_size, seed)
    with one_thread():
        return train_head(epoch_batches, x.size(1), num_classes, steps, epochs, batch_size, seed=seed, **recipe)


def train_grid_on_features(x, y, num_classes, base_lrs, epochs=90, batch_size=256, seed=0, **recipe):
    """Fast mode, a grid of heads: train_grid on cached features (the same batches as train_head_on_features)."""
    epoch_batches, steps, batch_size = feature_batches(x, y, batch_size, seed)
    with one_thread():
        return train_grid(epoch_batches, x.size(1), num_classes, steps, epochs, base_lrs, batch_size, seed=seed,
                          **recipe)


def train_head_full(model, dataset, num_classes, epochs=10, batch_size=256, seed=0, workers=0, base_lrs=None,
                    **recipe):
    """Full mode: every epoch each training image is augmented afresh and encoded by the frozen encoder; only the
    head learns (a bar over epochs). base_lrs: train a HeadGrid on the same augmented batches instead of one
    head at recipe's base_lr."""
    epoch_batches, steps, batch_size = augmented_batches(model, dataset, batch_size, seed, workers)
    device = model.cls_token.device
    if base_lrs is not None:
        recipe.pop("base_lr", None)
        return train_grid(epoch_batches, model.config.emb_dim, num_classes, steps, epochs, base_lrs, batch_size,
                          seed=seed, device=device, progress=True, **recipe)
    return train_head(epoch_batches, model.config.emb_dim, num_classes, steps, epochs, batch_size, seed=seed,
                      device=device, progress=True, **recipe)


@torch.no_grad()
def grid_scores(grid, x, y):
    """Each head's top-1 (%) and mean cross-entropy on (x, y): two (L,) tensors (NaN for a diverged head)."""
    logits = grid(x)
    top1 = 100.0 * (logits.argmax(-1) == y).double().mean(1)
    loss = grid_losses(logits, y).double()
    bad = torch.tensor(getattr(grid, "diverged", [False] * len(top1))) | ~torch.isfinite(logits).flatten(1).all(1)
    return top1.masked_fill(bad, float("nan")), loss.masked_fill(bad, float("nan"))


def choose_lr(val_top1):
    """Index of the head to keep: the highest validation top-1, ties broken by the smaller lr (the grid is in
    ascending order): the head that travelled least from its init among the best. Not the lower validation
    cross-entropy: on separable data every large lr is 100% right and the largest wins on loss by saturating its
    softmax (max probability exactly 1 for every sample), which leaves MSP (ood.py) nothing but ties. Heads with
    NaN scores (diverged) are never chosen; None when every head diverged."""
    ok = [i for i in range(len(val_top1)) if math.isfinite(val_top1[i])]
    return max(ok, key=lambda i: (val_top1[i], -i)) if ok else None


@torch.no_grad()
def topk_accuracy(logits, y, ks=(1, 5)):
    """{k: % of rows whose label is among the k highest logits}, k capped at the number of classes. No rows is an
    error (a metric from no sample would be NaN)."""
    if len(y) == 0:
        raise ValueError("topk_accuracy of no sample")
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.size(1)), dim=1).indices
        out[k] = 100.0 * (top == y[:, None]).any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def knn_accuracy(xtr, ytr, xte, yte, num_classes, k=20, t=0.07, chunk=1024):
    """Weighted kNN (DINO): cosine similarity to every training feature, the k most similar vote for their
    label with weight exp(sim / t). Returns {1: top-1 %, 5: top-5 %} ranking classes by summed votes."""
    bank = F.normalize(xtr.float(), dim=1)
    k = min(k, len(bank))
    votes = []
    for q in F.normalize(xte.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (n, k)
        v = torch.zeros(len(q), num_classes)
        votes.append(v.scatter_add_(1, ytr[idx], (sim / t).exp()))
    return topk_accuracy(torch.cat(votes), yte)


# -----------------------------------------------------------------------------
# the head's recipe, fitting it (probe.py and ood.py), and the quick checks train.py runs at the end


def head_recipe(optimizer="lars", epochs=90, batch_size=256, base_lr=None, warmup_epochs=None, weight_decay=0.0,
                real_data=False):
    """One head's fixed recipe (quick_probe's; --recipe paper's with real_data=True or an explicit base_lr).
    Default base lr: the paper's 0.1 for real data; 6.4 for LARS on the built-in data. Why 6.4 there: LARS moves
    each weight matrix by lr x 0.001 x ||w|| per step, so how far the head can travel scales with lr x steps, and
    under the linear scaling rule lr x steps = base_lr x images x epochs / 256 whatever the batch. mae's ImageNet
    probe (1.28M images, lr 6.4, ~7000 steps) travels 256 x further than the same recipe on our 5000 images; on
    synthetic features of that size, base lr 0.1 reaches 33% where SGD or Adam reach 64%, base lr 6.4 reaches
    64.6%. 6.4 is mae's absolute lr; the grid recipe (fit_linear_head) includes it."""
    if base_lr is None:
        base_lr = 6.4 if optimizer == "lars" and not real_data else 0.1
    return dict(epochs=epochs, batch_size=batch_size, base_lr=base_lr, optimizer=optimizer,
                warmup_epochs=warmup_epochs, weight_decay=weight_decay)


def recipe_from_args(args, real_data, full=False):
    """The head recipe from probe.py's / ood.py's head flags (the one place they become values): --recipe paper is
    the paper's fixed one (base lr 0.1 unless --base-lr, on any data); --recipe grid the same schedule with the lr
    left to --lr-grid. Epochs if not given: 90, or 10 for --mode full on the built-in data (an encoder pass per
    image per epoch)."""
    epochs = args.epochs if args.epochs is not None else (90 if real_data or not full else 10)
    recipe = head_recipe(args.optimizer, epochs, args.batch_size, args.base_lr, args.warmup_epochs,
                         args.weight_decay, real_data=True)
    return recipe, (list(args.lr_grid) if args.recipe == "grid" else None)


def fit_linear_head(d, model, model_key, train, num_classes, recipe, lr_grid=None, val_fraction=0.1, seed=0,
                    workers=0, full=False):
    """The linear head probe.py reports and ood.py's MSP reads: (head (make_head module, eval, on the CPU), fit
    info for the JSON, rows of `train` it was fitted on). recipe: head_recipe's dict.

    lr_grid None (--recipe paper): one head on the whole training split at recipe's base lr. lr_grid given
    (--recipe grid): a HeadGrid over those base lrs fitted on the training split minus a stratified val_fraction
    (or on all of it when d has a "val" folder), the lr chosen on that validation split by choose_lr, never on
    test; the chosen head is kept as trained (no refit on train + val). full: each epoch's batches augmented
    through the encoder (probe.py --mode full)."""
    epochs = recipe["epochs"]
    info = dict(recipe=dict(name="paper" if lr_grid is None else "grid", **recipe))
    info["recipe"]["warmup_epochs"] = epochs / 9 if recipe["warmup_epochs"] is None else recipe["warmup_epochs"]
    if lr_grid is not None:
        if "val" in d.folders:
            val = split_features(model, d, "val", model_key)
            fit_rows, xval, yval = torch.arange(len(train.x)), val.x, val.y
            on = f"--val-dir {d.folders['val']}"
        else:
            fit_rows, val_rows = stratified_split(train.y, val_fraction, seed)
            if len(val_rows) == 0:
                raise SystemExit(f"{train.what}: {len(train.x)} usable images are too few to hold out "
                                 f"--val-fraction {val_fraction} for choosing the lr; give --val-dir, a larger "
                                 "--val-fraction, or --recipe paper")
            xval, yval = train.x[val_rows], train.y[val_rows]
            on = (f"{val_fraction:g} of {train.what} held out (stratified by class, seed {seed}); the "
                  "head is fitted on the rest")
    else:
        fit_rows = torch.arange(len(train.x))
    xfit, yfit = train.x[fit_rows], train.y[fit_rows]
    batch = min(recipe["batch_size"], len(fit_rows))
    t0 = time.perf_counter()
    lrs = sorted(lr_grid) if lr_grid is not None else None
    if full:
        source, _, _, _ = labelled_source(d, "train", model.config.image_size)
        source = torch.utils.data.Subset(source, train.index[fit_rows].tolist())
        augment = data.PretrainTransform(model.config.image_size, d.mean, d.std, scale=(0.08, 1.0))  # paper's aug
        trained = train_head_full(model, data.LabelledDataset(source, augment), num_classes, seed=seed,
                                  workers=workers, base_lrs=lrs, **recipe)
    elif lrs is not None:
        trained = train_grid_on_features(xfit, yfit, num_classes, lrs, seed=seed,
                                         **{k: v for k, v in recipe.items() if k != "base_lr"})
    else:
        trained = train_head_on_features(xfit, yfit, num_classes, seed=seed, **recipe)
    trained = trained.cpu()
    if lrs is None:
        head = trained
        info["recipe"]["lr"] = recipe["base_lr"] * batch / 256
    else:
        val_top1, val_loss = (t.tolist() for t in grid_scores(trained, xval, yval))
        fit_top1, _ = grid_scores(trained, xfit, yfit)
        best = choose_lr(val_top1)
        if best is None:
            raise SystemExit(f"every head of --lr-grid {' '.join(map(str, lrs))} diverged (non-finite loss); try "
                             "smaller lrs")
        head = trained.head(best)
        finite = lambda v: round(v, 4) if math.isfinite(v) else None  # JSON: null, never NaN
        info["recipe"].update(base_lr=lrs[best], lr=lrs[best] * batch / 256)
        info["selection"] = dict(
            on=on, fit_size=len(fit_rows), val_size=len(yval), metric="val top-1, ties: the smaller lr",
            chosen_base_lr=lrs[best], val_top1=val_top1[best], refit_on_train_plus_val=False,
            grid=[dict(base_lr=lr, lr=lr * batch / 256, val_top1=finite(a), val_loss=finite(l), fit_top1=finite(f))
                  for lr, a, l, f in zip(lrs, val_top1, val_loss, fit_top1.tolist())])
    info["recipe"]["batch_size"] = batch
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return head, info, fit_rows


def quick_probe(model, train_set, test_set, seed=0):
    """probe.py's fast mode on the built-in data with the fixed built-in recipe (frozen CLS features after the
    final norm, BatchNorm(affine=False) + Linear, LARS, 90 epochs, base lr 6.4, the whole training split), once
    per label of the built-in data (the main object's shape, then its colour) on the same features: {label: test
    top-1 in %}. The same numbers as `python probe.py --ckpt OUT_DIR/ckpt.pt --seed SEED --recipe paper
    --base-lr 6.4 [--label colour]` on the same image counts."""
    recipe = head_recipe()
    xtr = extract_features(model, train_set).x
    xte = extract_features(model, test_set).x
    accs = {}
    for label in builtin.Builtin.LABELS:
        ytr, yte = (torch.tensor(s.source.labels(label)) for s in (train_set, test_set))
        num_classes = len(train_set.source.label_classes(label))
        head = train_head_on_features(xtr, ytr, num_classes, seed=seed, **recipe)
        with torch.no_grad():
            accs[label] = topk_accuracy(head(xte), yte, ks=(1,))[1]
    return accs


@torch.no_grad()
def text_grounding(model, pairs, seed=0, batch_size=256):
    """Does the text path read the image? The masked-word cross-entropy of held-out pairs (a dataset of
    pretraining samples, e.g. built-in test pairs) with their own images, and with the same images rolled by one
    (each caption beside another sample's image), with the same masks: (own, other). A model whose text loss
    is only a language model of the captions gives own == other, and then the text cannot teach the image
    features anything (the mechanism of the paper's section 3: predicting masked words from the image)."""
    model.eval()
    batch = data.collate([pairs[i] for i in range(len(pairs))])
    images, text, pad = batch["image"], batch["text"], batch["text_padding_mask"]
    device = model.cls_token.device
    g = torch.Generator().manual_seed(seed)
    noise = [torch.rand(len(text), n, generator=g).to(device) for n in (model.config.num_patches, text.size(1))]
    others = images.roll(1, 0)
    sums = [0.0, 0.0]
    for i in range(0, len(text), batch_size):  # the loss is a mean over samples: chunks add up weighted by size
        rows = slice(i, i + batch_size)
        t, p, n = text[rows].to(device), pad[rows].to(device), [x[rows] for x in noise]
        for k, x in enumerate((images[rows], others[rows])):
            sums[k] += model(x.to(device), t, p, *n)["text_loss"].item() * len(t)
    return sums[0] / len(text), sums[1] / len(text)


def builtin_text_grounding(model, tokenizer, data_seed=0, level="easy", seed=0, n=1000):
    """text_grounding on the first n pairs of the built-in test split (what train.py prints at the end)."""
    c = model.config
    pairs = builtin.Builtin("test", n, c.image_size, seed=data_seed, level=level)
    evaluate = data.EvalTransform(c.image_size, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0)
    return text_grounding(model, data.PairedDataset(pairs, tokenizer, c.text_len, evaluate), seed=seed)


# -----------------------------------------------------------------------------


def result_name(prefix, d, mode=None, recipe="grid"):
    """probe_<dataset>_<mode>[_paper] / ood_<dataset>_vs_<ood>[_paper] (the caller adds _random_init)."""
    tags = ([mode] if mode else []) + (["paper"] if recipe == "paper" else [])
    return prefix + "_" + d.name + "".join(f"_{x}" for x in tags)


def save_head(path, head, classes, d, model, model_key, ckpt, random_init, fit):
    save_atomic(dict(head=head.state_dict(), classes=list(classes), feature="CLS after the encoder's final norm",
                     view=dict(image_size=model.config.image_size, crop_pct=d.crop_pct, mean=list(d.mean),
                               std=list(d.std)),
                     ckpt=ckpt, random_init=random_init, model_hash=model_key[:16], recipe=fit["recipe"]),
                path)


def main(argv=None):
    args = get_args(argv)
    t0 = time.perf_counter()
    model, ckpt = load_encoder(args.ckpt, args.random_init, args.preset, args.seed, args.device)
    d = eval_data(args, ckpt)
    model_key = weights_hash(model)
    train = split_features(model, d, "train", model_key)
    test = split_features(model, d, "test", model_key)
    if train.classes != test.classes:  # get_args compared the class folders; this guards other callers
        raise SystemExit(f"train and test have different classes: {train.classes} vs {test.classes}")
    num_classes = len(train.classes)
    t_features = time.perf_counter() - t0

    knn = knn_accuracy(train.x, train.y, test.x, test.y, num_classes, args.knn_k, args.knn_t)
    full = args.mode == "full"
    recipe, lr_grid = recipe_from_args(args, d.real, full)
    head, fit, fit_rows = fit_linear_head(d, model, model_key, train, num_classes, recipe, lr_grid, args.val_fraction,
                                          args.seed, args.workers, full)
    with torch.no_grad():
        test_acc = topk_accuracy(head(test.x), test.y)
        fit_acc = topk_accuracy(head(train.x[fit_rows]), train.y[fit_rows])
    sel = fit.get("selection")
    result = dict(
        ckpt=args.ckpt, random_init=args.random_init, seed=args.seed, mode=args.mode, model_hash=model_key[:16],
        dataset=d.name, data="folder" if d.real else "builtin", folders=d.folders or None,
        data_seed=None if d.real else d.data_seed, label=None if d.real else args.label,
        classes=num_classes, class_names=list(train.classes),
        train_size=len(fit_rows), val_size=sel["val_size"] if sel else 0, test_size=len(test.x),
        feature_dim=train.x.size(1),
        top1=test_acc[1], top5=test_acc[5], train_top1=fit_acc[1],
        val_top1=sel["val_top1"] if sel else None, lr=fit["recipe"]["lr"], base_lr=fit["recipe"]["base_lr"],
        knn_top1=knn[1], knn_top5=knn[5],
        knn=dict(k=args.knn_k, t=args.knn_t, similarity="cosine", votes="exp(sim/t)", bank_size=len(train.x)),
        recipe=fit["recipe"], selection=sel,
        majority_share=100.0 * test.y.bincount(minlength=num_classes).max().item() / len(test.y),
        skipped=dict(train=train.skipped, test=test.skipped),
        pretraining=pretraining_info(ckpt),
        seconds=dict(features=round(t_features, 1), head=fit["seconds"]),
    )
    name = result_name("probe", d, args.mode, args.recipe)
    out = out_path_for(args.ckpt, args.out, args.preset, args.random_init, name)
    write_result(result, out)
    if args.save_head:
        save_head(args.save_head, head, train.classes, d, model, model_key, args.ckpt, args.random_init, fit)
    name = "random-init encoder" if args.random_init else (args.ckpt or "")
    how = (f"lr grid, base lr {fit['recipe']['base_lr']:g} chosen on {sel['val_size']} validation images "
           f"(val top-1 {sel['val_top1']:.2f}%)" if sel else f"fixed base lr {fit['recipe']['base_lr']:g}")
    print(f"{name} on {d.name}: linear probe ({args.mode}, {args.optimizer}, {fit['recipe']['epochs']} epochs, {how}) "
          f"top-1 {test_acc[1]:.2f}% top-5 {test_acc[5]:.2f}% (train top-1 {fit_acc[1]:.2f}%) | kNN (k={args.knn_k}) "
          f"top-1 {knn[1]:.2f}% top-5 {knn[5]:.2f}% | {len(fit_rows)} train / {result['val_size']} val / "
          f"{len(test.x)} test -> {out}" + (f" (head -> {args.save_head})" if args.save_head else ""))
    return result


if __name__ == "__main__":
    main()
