"""What probe.py, ood.py and viz.py share, apart from the science: the encoder and data flags and
their checks, which images an evaluation reads, and the files written next to a checkpoint.

Rules (issue #24): every path flag is checked before any work, and a bad input ends the run with one
line (argparse's exit 2), never a traceback. A checkpoint is read with weights_only=True (a pickle
that would run code is refused, never unpickled). Every file written next to a checkpoint is written
atomically (temp file, fsync, replace) and listed in that folder's outputs.txt, so that train.py
--overwrite removes it with the run and nothing else.
"""

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

import builtin
import data
import rundir
from checkpoint import (NORMS, CheckpointError, checkpoint_data_level, checkpoint_data_seed,
                        checkpoint_norm, load_model)
from model import M3AE, PRESETS, make_config
from util import foreign_output, mix_seed, write_atomic

# -----------------------------------------------------------------------------
# flags (probe.py adds the head's), each checked before any work


ENCODER_CKPT_HELP = "checkpoint file from train.py or convert.py (a dict with 'model' and 'config')"


def add_encoder_args(p, verb="evaluate", ckpt=ENCODER_CKPT_HELP,
                     seeded="head init, shuffling, the validation split", features=True):
    """The encoder's flags: which checkpoint (or a random-init one), the seed; with features=True
    also the device, how features are extracted and cached, and where the JSON goes (probe.py,
    ood.py; finetune.py declares those in its Recipe). verb, ckpt, seeded: the script's words in
    the help."""
    a = p.add_argument
    a("--ckpt", help=f"{ckpt}; if not given, --random-init with --preset's architecture")
    a("--random-init", action="store_true", help=f"{verb} an untrained encoder (the floor): the "
      "checkpoint's architecture (or --preset's) with fresh weights drawn from --seed")
    a("--preset", default="tiny", choices=list(PRESETS), help="architecture for --random-init "
      "without --ckpt")
    a("--seed", type=int, default=0, help=f"{seeded} (and the weights under --random-init)")
    if not features:
        return
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a("--batch-size-features", type=int, default=256, help="images per encoder forward when "
      "extracting")
    a("--workers", type=int, default=0, help="DataLoader workers")
    a("--cache-dir", help="feature cache; if not given, features/ next to the checkpoint")
    a("--out", help="JSON result path; if not given, a name from the checkpoint and the dataset "
      "next to the checkpoint")


def add_data_args(p):
    a = p.add_argument
    a("--train-dir", help="ImageFolder root (one sub-folder of images per class) to fit on; if not "
      "given, the built-in data")
    a("--test-dir", help="ImageFolder root to evaluate on (the same class folders as --train-dir); "
      "if not given, the built-in test split (and no --train-dir)")
    a("--val-dir", help="ImageFolder root that chooses the grid's lr (the same class folders as "
      "--train-dir); if not given, --val-fraction of --train-dir is held out")
    a("--val-fraction", type=float, default=0.1, help="share of the training images held out "
      "(stratified by class, seeded by --seed) to choose the grid's lr when there is no --val-dir")
    a("--train-size", type=int, help="training images; if not given, all (built-in: the split's "
      "5000). On folders a seeded stratified subset (--data-seed)")
    a("--test-size", type=int, help="test images; if not given, all (built-in: the split's 2000). "
      "On folders a seeded stratified subset (--data-seed)")
    a("--data-seed", type=int, help="built-in data: which procedural dataset, if not given the "
      "checkpoint's; folders: which --train-size/--test-size subset, if not given 0")
    a("--data-level", choices=list(builtin.LEVELS), help="built-in data: difficulty; if not given, "
      "the checkpoint's")
    a("--norm", default="auto", choices=["auto", *NORMS], help="normalisation statistics; auto = "
      "those the checkpoint was pretrained with (builtin or cc12m)")
    a("--crop-pct", type=float, help="evaluation centre crop; if not given, 0.875 for folders, 1.0 "
      "for built-in")
    a("--test-classes", default="all", choices=["all", "present"], help="all: --test-dir (and "
      "--val-dir) must hold every class of --train-dir; present: they may lack some, and are "
      "scored on the classes they hold (the head still chooses among all the training classes)")


def add_label_arg(p):
    """--label, the built-in data's class: probe.py, finetune.py and zeroshot.py read it; results
    and runs are named builtin[_colour] (EvalData.name)."""
    p.add_argument("--label", default="shape", choices=builtin.Builtin.LABELS,
                   help="built-in data: classify the main object's shape (10 classes) or its "
                   "colour (11, which the captions name)")


def builtin_name(label):
    """The built-in data's name in result and run names: builtin, or builtin_colour."""
    return "builtin" + ("_colour" if label == "colour" else "")


def check_label(p, args):
    """--label is the built-in data's: folders label by class folder."""
    if args.label != "shape" and (getattr(args, "train_dir", None) or args.test_dir):
        p.error("--label picks a built-in attribute; folders label by class folder")


def fail(p, flag, value, problem):
    """argparse's error (usage, then one line, exit 2): '--flag VALUE: problem'."""
    p.error(f"{flag} {value}: {problem}")


def die(prog, message):
    """A bad input found after parsing (a checkpoint's content, a folder's images): argparse's error
    line without the usage, exit 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_file(p, flag, path, what):
    if not os.path.exists(path):
        fail(p, flag, path, f"no such file ({what})")
    if os.path.isdir(path):
        fail(p, flag, path, f"is a folder, not a file ({what})")


def check_image_folder(p, flag, path, labelled=True):
    """(class names or None, images per class or in all). labelled: an ImageFolder root (class
    sub-folders of images); else any folder with images below it."""
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
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        fail(p, flag, path, "no class sub-folders (an ImageFolder root holds one folder of images "
             f"per class: {os.path.join(path, '<class>', '*.png')})")
    counts = {c: len(data._image_files(os.path.join(path, c))) for c in classes}
    if sum(counts.values()) == 0:
        fail(p, flag, path, f"no image files in its {len(classes)} class folders (looked for "
             f"{exts})")
    return classes, counts


def class_difference(train_classes, other_classes, train_flag, other_flag, other_path):
    """One line naming the classes that differ between two ImageFolder roots (None: they agree)."""
    if other_classes == train_classes:
        return None
    what = other_flag.lstrip("-").split("-")[0]
    missing = ", ".join(c for c in train_classes if c not in other_classes)
    extra = ", ".join(c for c in other_classes if c not in train_classes)
    parts = [f"missing from {what}: {missing}" if missing else "",
             f"extra in {what}: {extra}" if extra else ""]
    return (f"{other_flag} {other_path}: class folders differ from {train_flag}'s ("
            + "; ".join(x for x in parts if x) + ")")


def check_output(p, flag, path, kind):
    """Before any work: an output path that is not a folder and holds no file of the user's
    (util.foreign_output)."""
    if path and os.path.isdir(path):
        fail(p, flag, path, "is a folder (give the file's path)")
    refused = path and foreign_output(path, kind)
    if refused:
        p.error(f"argument {flag}: {refused}")


def check_paths(p, args, splits, purpose="a linear probe"):
    """Every path flag, before any work: the checkpoint a file, the folders of images (the training
    one with at least 2 classes, for `purpose`), the same classes in each, sizes within them."""
    if args.ckpt:
        check_file(p, "--ckpt", args.ckpt, "a checkpoint from train.py or convert.py")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        fail(p, "--cache-dir", args.cache_dir, "exists and is not a folder")
    check_output(p, "--out", args.out, "json")
    found = {s: check_image_folder(p, f"--{s}-dir", getattr(args, f"{s}_dir"), labelled=s != "ood")
             for s in splits if getattr(args, f"{s}_dir", None)}
    if "train" in found:
        classes, counts = found["train"]
        filled = [c for c in classes if counts[c]]
        if len(filled) < 2:
            fail(p, "--train-dir", args.train_dir, f"{len(filled)} class folder with images "
                 f"({', '.join(filled)}): {purpose} needs at least 2 classes")
        for s in ("test", "val"):
            if s not in found:
                continue
            other = found[s][0]
            if getattr(args, "test_classes", "all") == "present" and set(other) <= set(classes):
                continue  # scored on the classes it holds
            line = class_difference(classes, other, "--train-dir", f"--{s}-dir",
                                    getattr(args, f"{s}_dir"))
            if line:
                p.error(line + ("; --test-classes present scores the classes it holds"
                                if set(other) < set(classes) else ""))
    for s in splits:  # sizes: positive, and within a folder's images
        size = getattr(args, f"{s}_size", None)
        if size is not None and size < 1:
            fail(p, f"--{s}-size", size, "must be >= 1")
        if size is not None and s in found:
            counts = found[s][1]
            n = sum(counts.values()) if isinstance(counts, dict) else counts
            if size > n:
                fail(p, f"--{s}-size", size, f"more than the {n} image files in --{s}-dir "
                     f"{getattr(args, f'{s}_dir')}")
    return found


def need_classes(prog, train, purpose="a linear probe"):
    """Refuse (one line, exit 2) a training split whose readable images hold fewer than 2 classes: a
    probe of one class is 100% right, an OOD score of one class reads nothing."""
    present = train.y.unique().tolist()
    if len(present) < 2:
        names = ", ".join(train.classes[k] if train.classes else str(k) for k in present)
        die(prog, f"{train.what}: the usable images hold {len(present)} class ({names}): {purpose} "
            "needs at least 2 classes")


# -----------------------------------------------------------------------------
# the checkpoint, and the files written next to it


def read_model(path):
    """checkpoint.load_model with every way a file fails to be a checkpoint one CheckpointError line
    (load_model lets a config or a state dict of other shapes through as other errors)."""
    try:
        return load_model(path)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{path}: not a usable checkpoint: {reason}") from None


def load_encoder(ckpt_path=None, random_init=False, preset="tiny", seed=0, device="cpu"):
    """(model in eval mode, the checkpoint dict or {}). random_init keeps the checkpoint's
    architecture (or the preset's) with fresh weights drawn from `seed`: the floor every probe is
    read against."""
    ckpt = {}
    if ckpt_path:
        model, ckpt = read_model(ckpt_path)
        config = model.config
    else:
        config = make_config(preset, vocab_size=PRESETS[preset].get("vocab_size", 1024))
    if random_init:
        torch.manual_seed(seed)
        model = M3AE(config)
    return model.to(device).eval(), ckpt


def run_folder(ckpt_path, preset):
    """Where results and features go: next to the checkpoint, else runs/random_init_<preset>."""
    if ckpt_path:
        return os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.join("runs", f"random_init_{preset}")


def out_path_for(ckpt_path, out, preset, random_init, name):
    """Default JSON result path: <checkpoint dir>/<name>[_random_init].json."""
    if out:
        return out
    name += "_random_init" if random_init else ""
    return os.path.join(run_folder(ckpt_path, preset), f"{name}.json")


def result_name(prefix, d, mode=None, recipe="grid"):
    """probe_<dataset>_<mode>[_paper] / ood_<dataset>[_paper] (the caller adds _random_init)."""
    tags = ([mode] if mode else []) + (["paper"] if recipe == "paper" else [])
    return prefix + "_" + d.name + "".join(f"_{x}" for x in tags)


def write_output(path, write, kind, mode="wb", folder=None):
    """util.write_atomic (a failure, a full disk included, leaves the old file and no temp
    file; DiskFull says so in one line), then the path listed in FOLDER/outputs.txt when it lies
    inside FOLDER (the checkpoint's), so that train.py --overwrite removes it with the run. A file
    at `path` that is not an earlier output of `kind` (util.OUTPUT_KINDS) is never replaced."""
    refused = foreign_output(path, kind)
    if refused:
        raise SystemExit(refused)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, write, mode)
    if folder and os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep):
        rundir.record_output(folder, path)
    return path


def finite_or_raise(obj, where="result"):
    """Every number of a nested dict/list finite, else ValueError naming the first bad key path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            finite_or_raise(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            finite_or_raise(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}")


def own_result_path(path, result):
    """`path`, unless it already holds the result of another dataset (other folders under the same
    name, e.g. two datasets whose folders are both called probe_train): then the name gets a short
    hash of this result's folders, and a note says so. A result never silently replaces another
    dataset's."""
    try:
        with open(path) as f:
            old = json.load(f).get("folders")
    except (OSError, ValueError, AttributeError):
        return path
    if old is None or old == result.get("folders"):
        return path
    tag = hashlib.sha256(json.dumps(result.get("folders"), sort_keys=True).encode()).hexdigest()[:6]
    stem, ext = os.path.splitext(path)
    mine = f"{stem}-{tag}{ext}"
    print(f"note: {path} holds the result of other folders ({old}); writing {mine} instead")
    return mine


def write_result(result, path, folder=None):
    """The result as JSON (write_output), never with NaN or infinity: a number that is not finite,
    or a write that fails, ends the run with one line instead of a file that reads like a result.
    Returns the path written (own_result_path: never another dataset's result file)."""
    path = own_result_path(path, result)
    try:
        finite_or_raise(result)
        text = json.dumps(result, indent=2, allow_nan=False)
    except ValueError as e:
        raise SystemExit(f"not writing {path}: a value is not a finite number ({e})") from None
    try:
        return write_output(path, lambda f: f.write(text), "json", "w", folder)
    except OSError as e:
        raise SystemExit(f"{path} not written: {e.strerror or e}") from None


# -----------------------------------------------------------------------------
# which images, seen how


GENERIC_FOLDER_NAMES = {"train", "training", "trn", "val", "valid", "validation", "test", "testing",
                        "eval", "images", "imgs", "data", "in", "ood", "out"}


def folder_name(path):
    """A dataset's name for result files: the folder's, or its parent's when the folder is a split
    (train, test, val, images ...): /data/fashion_mnist/train -> fashion_mnist."""
    parts = [x for x in os.path.abspath(path).split(os.sep) if x]
    name = parts[-1] if parts else "root"
    if name.lower() in GENERIC_FOLDER_NAMES and len(parts) > 1:
        name = parts[-2]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "folder"


def folder_identity(root):
    """A folder's identity for the feature cache key: its path, each image's path, size, mtime."""
    h = hashlib.sha256(os.path.abspath(root).encode())
    for path in data._image_files(root):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"folder:{os.path.abspath(root)}:{h.hexdigest()[:16]}"


@dataclass
class EvalData:
    """Which images an evaluation reads and how it views them: a folder per split when given
    (ImageFolder class sub-folders; the OOD folder any layout), else the built-in splits. sizes: per
    split, the built-in image count or a folder's seeded stratified subset (None: all). The view:
    resize, centre crop_pct, normalise with (mean, std). Features are cached under cache_dir; what
    is written inside run_dir (the checkpoint's folder) is listed in its outputs.txt."""
    mean: tuple
    std: tuple
    crop_pct: float
    cache_dir: str
    folders: dict
    sizes: dict
    data_seed: int = 0
    data_level: str = "easy"
    label: str = "shape"
    test_classes: str = "all"  # "present": test / val folders may lack training classes
    batch_size: int = 256
    workers: int = 0
    subset_seed: int = 0
    run_dir: str = None

    @property
    def real(self):
        return bool(self.folders)

    @property
    def name(self):
        """The in-distribution dataset's name: the training folder's, or builtin[_colour]."""
        if self.real:
            return folder_name(self.folders["train"])
        return builtin_name(self.label)


def eval_data(args, ckpt, splits=("train", "test", "val")):
    """EvalData from the encoder and data flags and what the checkpoint says (its normalisation,
    data seed and level): the one place these flags become values."""
    folders = {s: getattr(args, f"{s}_dir") for s in splits if getattr(args, f"{s}_dir", None)}
    if args.norm == "auto":
        mean, std = checkpoint_norm(ckpt, real_data_default=bool(folders))
    else:
        mean, std = NORMS[args.norm]
    seed, run = args.data_seed, run_folder(args.ckpt, args.preset)
    crop = args.crop_pct if args.crop_pct is not None else (0.875 if folders else 1.0)
    return EvalData(
        mean=mean, std=std, crop_pct=crop, folders=folders,
        cache_dir=args.cache_dir or os.path.join(run, "features"),
        sizes={s: getattr(args, f"{s}_size", None) for s in splits},
        data_seed=seed if seed is not None else checkpoint_data_seed(ckpt),
        data_level=args.data_level or checkpoint_data_level(ckpt),
        label=getattr(args, "label", "shape"), test_classes=getattr(args, "test_classes", "all"),
        batch_size=args.batch_size_features,
        workers=args.workers, subset_seed=seed or 0, run_dir=run if args.ckpt else None)


def stratified_counts(counts, n, cap=None):
    """How many of each class to pick so that n picks keep the class shares: floor(n x share), then
    one more for the largest remainders (ties: the lower class); cap (per class) bounds each."""
    cap = list(counts) if cap is None else cap
    exact = [n * c / sum(counts) for c in counts]
    quota = [min(int(math.floor(e)), m) for e, m in zip(exact, cap)]
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - quota[k]), k))
    left = n - sum(quota)
    while left > 0 and any(quota[k] < cap[k] for k in order):
        for k in order:
            if left > 0 and quota[k] < cap[k]:
                quota[k] += 1
                left -= 1
    return quota


def stratified_pick(labels, n, seed, cap=None):
    """Sorted indices of n of `labels` (1-D ints), each class's share kept, a seeded random choice
    within each class. cap: {label: most picks of that label}."""
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
    """(fit, held out) indices: round(fraction x N) held out, stratified; every class keeps one."""
    labels = torch.as_tensor(labels)
    classes, counts = labels.unique(return_counts=True)
    held = stratified_pick(labels, round(fraction * len(labels)), mix_seed(seed, 17),
                           cap={int(c): int(n) - 1 for c, n in zip(classes, counts)})
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def labelled_source(d, which, image_size):
    """(source of dict(image, label), identity for the cache key, class names, description) of split
    `which` (train, test, val or ood) of EvalData d: its folder when given, a seeded stratified
    subset when d.sizes says so (the OOD folder: any layout, label -1), else the built-in split."""
    folder, size = d.folders.get(which), d.sizes.get(which)
    if not folder:
        source = builtin.Builtin(which, size, image_size, seed=d.data_seed, level=d.data_level,
                                 label=d.label)
        identity = (f"builtin:{which}:{len(source)}:{image_size}px:seed{d.data_seed}:"
                    f"{d.data_level}:{d.label}")
        return source, identity, source.classes, f"built-in {which} split"
    identity = folder_identity(folder)
    if which == "ood":
        source = [dict(image=f, label=-1) for f in data.ImageOnlyFolder(folder).files]
        classes = None
        labels, identity = [0] * len(source), identity + ":unlabelled"
    else:  # test / val on the training folder's class list: the same label for the same name
        train_classes = data.class_folders(d.folders["train"]) if which != "train" else None
        source = data.ImageFolder(folder, train_classes)
        classes, labels = source.classes, [k for _, k in source.samples]
    if size is not None and size < len(source):
        picked = stratified_pick(labels, size, mix_seed(d.subset_seed, 23))
        source = torch.utils.data.Subset(source, picked.tolist())
        identity += f":subset{size}:seed{d.subset_seed}"
    return source, identity, classes, f"--{which}-dir {folder}"


class Indexed(torch.utils.data.Dataset):
    """dataset[i] plus index=i: which source row each feature came from."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return dict(self.dataset[i], index=i)


def skip_report(skipped):
    ranked = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {n}" for k, n in ranked) or "none"
