"""Fine-tune a pretrained encoder end to end for classification (mae's main_finetune.py, official's
finetune_main) — one flat script, read top to bottom.

    python finetune.py --ckpt runs/default/ckpt.pt     # built-in data, tiny, 2 CPU cores, minutes
    python finetune.py --ckpt ckpt.pt --train-dir fashion_mnist/train --test-dir fashion_mnist/test
    python finetune.py --random-init --preset tiny     # the floor: the same recipe from scratch
    torchrun --nproc_per_node=8 finetune.py --ckpt mae_vit_base.pt --train-dir in1k/train \\
        --test-dir in1k/val --val-fraction 0 --epochs 100 --batch-size 1024 --workers 10 \\
        --out-dir runs/ft_in1k                          # mae's ViT-B recipe, 8 GPUs

Recipe (mae's ViT-B defaults; each a flag; docs/finetune.md):
  * model: the checkpoint's image encoder (any train.py or convert.py checkpoint) + a Linear head
    (trunc-normal std 2e-5, zero bias: mae). Feature (--global-pool, default): the mean of the patch
    tokens after the last block, then a fresh LayerNorm (mae's fc_norm); --no-global-pool: the CLS
    token after the encoder's final norm (what probe.py reads). Drop path 0.1 in the encoder blocks.
  * optimiser: AdamW (0.9, 0.999), weight decay 0.05 on Linear weights, lr = blr x batch / 256 with
    blr 5e-4, layer-wise lr decay 0.65 (layer_decay_groups), warmup then cosine to 1e-6 per step.
    Epochs: 10 (mae: 100); warmup if not given epochs / 20 (mae: 5 of 100).
  * data: RandomResizedCrop(0.08-1, bicubic) + flip + RandAugment (n 2, m 9, mstd 0.5: timm's
    rand-m9-mstd0.5-inc1, its 15 ops, in PIL) + normalise + random erasing (0.25); then mixup 0.8 /
    cutmix 1.0 (one per batch, switch 0.5) on label-smoothed (0.1) soft targets.
  * evaluation: the centre view (probe.py's: evalcommon), top-1 (and top-5 with more than 5
    classes) of the last epoch's weights on --test-dir; the validation split (--val-fraction of the
    training images, stratified, or --val-dir) is scored each epoch, for the log; nothing is chosen
    on test. Small data at CPU scale (32 px, a few hundred steps): a larger --blr, --crop-pct 1 and
    a lighter augmentation, chosen on the validation split (docs/results.md section 1c).
Folders, splits, the normalisation and every bad input as probe.py (evalcommon.py): one line, exit
2.

OUT_DIR is one run (rundir.py, as train.py): ckpt.pt (the fine-tuned M3AE, which probe.py reads,
plus its head), config.json, log.jsonl, curves.png; --resume continues it bit-identically (each
sample's augmentation from (seed, epoch, index), each step's mixup and drop path from (seed, step)),
--overwrite replaces it. The result, finetune_<dataset>[_random_init].json, goes next to the
pretrained checkpoint (listed in its outputs.txt), as probe.py's.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
import rundir
from checkpoint import CheckpointError, pretraining_info
from evalcommon import (add_data_args, add_encoder_args, add_label_arg, builtin_name, check_label,
                        check_paths, die, eval_data, fail, folder_name, labelled_source,
                        load_encoder, need_classes, out_path_for, result_name, run_folder,
                        skip_report, stratified_split, write_result)
from loader import InputError, check_readable, epoch_batches, make_loader, setup
from model import M3AE
from train import Training, default_workers, draw_curves, finish, given_flags
from util import add_flags, at_least, check_fields, flag_name, fraction, knob, lr_at, make_parser
from util import DiskFull, mix_seed

PROG = "finetune.py"

# -----------------------------------------------------------------------------
# settings: the recipe's, one field each (a flag of the same name); the encoder and data flags are
# probe.py's (evalcommon)

POSITIVE = (lambda v: 0 < v < float("inf"), "must be > 0 and finite")
ONCE = "invocation"


@dataclass(frozen=True)
class Recipe:
    epochs: int = knob(10, "training epochs (mae: 100 for ViT-B)", at_least(1, 10**6))
    batch_size: int = knob(64, "global batch, summed over ranks (mae: 1024)", at_least(2))
    blr: float = knob(5e-4, "base lr: peak lr = blr x batch / 256 (mae's ViT-B)", POSITIVE)
    lr: float = knob(None, "absolute peak lr (instead of --blr)", POSITIVE, type=float)
    min_lr: float = knob(1e-6, "lr at the end of the cosine", at_least(0.0))
    warmup_epochs: float = knob(None, "linear warmup, in epochs (default: epochs / 20, mae's 5 of "
                                "100)", at_least(0.0), type=float)
    weight_decay: float = knob(0.05, "AdamW weight decay on Linear weights", at_least(0.0))
    beta2: float = knob(0.999, "AdamW beta2 (beta1 is 0.9)", fraction())
    layer_decay: float = knob(0.65, "layer-wise lr decay: lr x decay^(depth + 1 - layer), layer 0 "
                              "the embeddings, i + 1 block i, depth + 1 the head (1: off)",
                              (lambda v: 0 < v <= 1, "must be in (0, 1]"))
    drop_path: float = knob(0.1, "stochastic depth of the last encoder block, rising from 0 at the "
                            "first (the model's drop_path_rate)", at_least(0.0, 0.9))
    mixup: float = knob(0.8, "mixup's Beta(alpha, alpha) (0: off)", at_least(0.0))
    cutmix: float = knob(1.0, "cutmix's Beta(alpha, alpha) (0: off)", at_least(0.0))
    mixup_prob: float = knob(1.0, "share of batches mixed", fraction(high_open=False))
    mixup_switch_prob: float = knob(0.5, "share of mixed batches that cutmix when both are on",
                                    fraction(high_open=False))
    smoothing: float = knob(0.1, "label smoothing", fraction())
    randaug_n: int = knob(2, "RandAugment operations per image (0: off)", at_least(0, 15))
    randaug_m: float = knob(9.0, "RandAugment magnitude, of 10", at_least(0.0, 10.0))
    randaug_mstd: float = knob(0.5, "RandAugment: the magnitude's std, drawn per operation",
                               at_least(0.0))
    reprob: float = knob(0.25, "random erasing probability", fraction(high_open=False))
    min_crop: float = knob(0.08, "RandomResizedCrop's smallest area share", at_least(0.01, 1.0))
    global_pool: bool = knob(True, "feature: mean of the patch tokens + a LayerNorm (mae); "
                             "--no-global-pool: the CLS token after the encoder's final norm")
    clip_grad: float = knob(0.0, "max grad norm; 0 = no clipping (mae)", at_least(0.0))
    # systems and bookkeeping (resume: "invocation", one command's own)
    device: str = knob("cuda" if torch.cuda.is_available() else "cpu", "torch device", type=str,
                       resume=ONCE)
    workers: int = knob(default_workers(), "DataLoader workers per rank", at_least(0), resume=ONCE)
    batch_size_features: int = knob(256, "images per forward when evaluating", at_least(1),
                                    resume=ONCE)
    out: str = knob(None, "JSON result path; if not given, finetune_<dataset>[_random_init].json "
                    "next to the checkpoint", type=str, resume=ONCE)
    dtype: str = knob(None, "autocast dtype (default: bf16 on CUDA, fp32 on CPU)", type=str,
                      choices=("bf16", "fp32"), resume=ONCE)
    compile: bool = knob(None, "torch.compile (default: on CUDA)", type=bool, resume=ONCE)
    out_dir: str = knob(None, "the run's folder (default: finetune_<dataset>[_random_init] next to "
                        "the checkpoint)", type=str, resume=ONCE)
    resume: bool = knob(False, "continue the run in OUT_DIR (settings not repeated come from it)",
                        resume=ONCE)
    overwrite: bool = knob(False, "delete the run in OUT_DIR (only its own files) and start afresh",
                           resume=ONCE)
    log_every: int = knob(10, "log every N steps", at_least(1), resume="free")
    stop_after: int = knob(None, "save and exit after this step (simulates an interruption)",
                           at_least(1), type=int, resume=ONCE)

    def __post_init__(self):
        check_fields(self)


# --resume: the settings of one command, those a resume may change; the rest (the encoder and data
# flags too) define the run
ONCE_FLAGS = {f.name for f in fields(Recipe) if f.metadata["resume"] == ONCE}
FREE_FLAGS = {f.name for f in fields(Recipe) if f.metadata["resume"] == "free"}


def build_parser():
    p = make_parser(__doc__, prog=PROG, conflict_handler="resolve")
    a = p.add_argument
    add_encoder_args(p, "fine-tune", "checkpoint from train.py or convert.py (official or mae "
                     "weights)", "head init, data order, augmentation, mixup, drop path, the "
                     "validation split", features=False)
    add_data_args(p)  # probe.py's folder, split and view flags; the two below say what val is here
    add_label_arg(p)
    a("--val-dir", help="ImageFolder root scored each epoch (the same class folders as "
      "--train-dir); if not given, --val-fraction of --train-dir is held out")
    a("--val-fraction", type=float, default=0.1, help="share of the training images held out "
      "(stratified by class, seeded by --seed), scored each epoch for the log; 0: train on all")
    add_flags(p.add_argument_group("the recipe (finetune.Recipe)"), Recipe)
    p.set_defaults(cache_dir=None)  # evalcommon's checks read it; fine-tuning caches no features
    return p


def settings(argv=None):
    """Parse, then check every value, path and combination before any work: one line naming the
    flag, exit 2. --resume: every setting not given again comes from the run's record."""
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    dataset = folder_name(args.train_dir) if args.train_dir else builtin_name(args.label)
    args.out_dir = args.out_dir or os.path.join(run_folder(args.ckpt, args.preset), f"finetune_"
                                                f"{dataset}{'_random_init' * args.random_init}")
    if args.resume:
        args = resumed(p, args, given_flags(p, argv))
    if not args.ckpt and not args.random_init:
        p.error("give --ckpt (or --random-init [--preset])")
    if bool(args.train_dir) != bool(args.test_dir):
        p.error("real data needs both --train-dir and --test-dir")
    check_label(p, args)
    if args.val_dir and not args.train_dir:
        p.error("--val-dir goes with --train-dir (the built-in data holds out --val-fraction)")
    if not 0.0 <= args.val_fraction < 1.0:
        fail(p, "--val-fraction", args.val_fraction, "must be in [0, 1)")
    if args.ckpt and os.path.abspath(os.path.dirname(args.ckpt)) == os.path.abspath(args.out_dir):
        fail(p, "--out-dir", args.out_dir, "is the pretrained checkpoint's folder (a fine-tuning "
             "run needs its own)")
    try:
        recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
        if recipe.resume and recipe.overwrite:
            raise ValueError("argument --overwrite: not with --resume")
        rundir.check_out_dir(recipe.out_dir, recipe.resume, recipe.overwrite)
    except (ValueError, rundir.RunDirError) as e:
        p.error(str(e))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(p, "--device", args.device, "needs a CUDA GPU and none is visible (use --device cpu)")
    check_paths(p, args, ("train", "test", "val"), purpose="fine-tuning")
    return args


def resumed(p, args, given):
    """--resume: the run's recorded settings, but those of this command alone (ONCE_FLAGS) and
    those given again of FREE_FLAGS; another given again with another value is refused, naming it
    (a changed run is a new run)."""
    record = rundir.recorded(args.out_dir)
    if record is None:
        return args
    merged, refused = vars(args), []
    for name, value in record["run"].items():
        if name in ONCE_FLAGS or name not in merged:
            continue
        if name in given and name in FREE_FLAGS:
            continue
        if name in given and merged[name] != value:
            refused.append(f"{flag_name(name)} {value!r} -> {merged[name]!r}")
        merged[name] = value
    if refused:
        p.error(f"--resume cannot change the run: {'; '.join(refused)} (drop these flags to "
                "continue as recorded, or start a new run in another --out-dir)")
    return argparse.Namespace(**merged)


# -----------------------------------------------------------------------------
# the model: the image encoder, its feature, a Linear head


class Classifier(nn.Module):
    """The M3AE image encoder on [CLS, every patch] (no masking, no text) and a Linear head.
    global_pool (mae's default): mean of the patch tokens after the last block, then fc_norm, a
    fresh LayerNorm, as mae's models_vit.py does: there the encoder's final norm is dropped and
    fc_norm takes its place, so we do the same (averaging after the final norm and normalising
    again would be two norms in a row). Else the CLS token after the encoder's final norm, the
    feature probe.py reads (M3AE.encode)."""

    # what the image encoder is made of; the text path and the decoder are frozen (never used)
    ENCODER = ("patch_embed.", "cls_token", "enc_image_type", "encoder.")

    def __init__(self, m3ae, num_classes, global_pool=True):
        super().__init__()
        self.m3ae, self.global_pool, c = m3ae, global_pool, m3ae.config
        self.fc_norm = nn.LayerNorm(c.emb_dim, eps=c.ln_eps) if global_pool else None
        self.head = nn.Linear(c.emb_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # mae's head init
        nn.init.zeros_(self.head.bias)
        for name, p in m3ae.named_parameters():
            unused = global_pool and name.startswith("encoder.norm.")
            p.requires_grad_(name.startswith(self.ENCODER) and not unused)

    @property
    def config(self):
        return self.m3ae.config

    def forward(self, images):
        m = self.m3ae
        x = m.embed_image(images)  # (B, N, D)
        x = torch.cat([m.cls_token.expand(x.size(0), -1, -1), x], dim=1)  # (B, 1 + N, D)
        for block in m.encoder.blocks:
            x = block(x, None, m.config.attn_impl)
        feature = self.fc_norm(x[:, 1:].mean(1)) if self.global_pool else m.encoder.norm(x)[:, 0]
        return self.head(feature)  # (B, classes)

    def head_state(self):
        """What the checkpoint keeps beside the M3AE weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("m3ae.")}


def layer_id(name, depth):
    """mae's get_layer_id_for_vit: 0 for the embeddings (patch projection, CLS, type), i + 1 for
    encoder block i, depth + 1 for what follows (the final norm or fc_norm, the head)."""
    if name.startswith(("m3ae.patch_embed.", "m3ae.cls_token", "m3ae.enc_image_type")):
        return 0
    if name.startswith("m3ae.encoder.blocks."):
        return int(name.split(".")[3]) + 1
    return depth + 1


def layer_decay_groups(net, weight_decay, layer_decay):
    """mae's param_groups_lrd: one group per (layer, decayed or not), each with lr_scale =
    layer_decay^(depth + 1 - layer_id) (the head 1, block i decay^(depth - i), the embeddings
    decay^(depth + 1)). Weight decay on Linear weights only: train.param_groups' rule, the same set
    as mae's (every matrix but CLS and positions; our patch projection is a Linear)."""
    depth = net.config.depth
    decayed = {id(m.weight) for m in net.modules() if isinstance(m, nn.Linear)}
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        lid, decay = layer_id(name, depth), id(p) in decayed
        group = groups.setdefault((lid, decay), dict(
            params=[], weight_decay=weight_decay if decay else 0.0, layer_id=lid,
            lr_scale=layer_decay ** (depth + 1 - lid)))
        group["params"].append(p)
    return list(groups.values())


# -----------------------------------------------------------------------------
# augmentation: RandAugment and random erasing per image (in the loader, seeded per sample), mixup
# and cutmix per batch (seeded per step)

FILL = (124, 116, 104)  # timm's fill for the geometric ops: the ImageNet mean in 0-255


def _signed(v):
    return -v if torch.rand(()).item() < 0.5 else v


def _affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=FILL)


def _solarize_add(img, add, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


# timm's rand-...-inc1 operations (_RAND_INCREASING_TRANSFORMS): m = magnitude / 10 in [0, 1]
RAND_OPS = {
    "AutoContrast": lambda im, m: ImageOps.autocontrast(im),
    "Equalize": lambda im, m: ImageOps.equalize(im),
    "Invert": lambda im, m: ImageOps.invert(im),
    "Rotate": lambda im, m: im.rotate(_signed(30 * m), Image.BICUBIC, fillcolor=FILL),
    "PosterizeIncreasing": lambda im, m: ImageOps.posterize(im, max(1, 4 - int(4 * m))),
    "SolarizeIncreasing": lambda im, m: ImageOps.solarize(im, 256 - int(256 * m)),
    "SolarizeAdd": lambda im, m: _solarize_add(im, int(110 * m)),
    "ColorIncreasing": lambda im, m: ImageEnhance.Color(im).enhance(max(0.1, 1 + _signed(.9 * m))),
    "ContrastIncreasing": lambda im, m: ImageEnhance.Contrast(im).enhance(
        max(0.1, 1 + _signed(.9 * m))),
    "BrightnessIncreasing": lambda im, m: ImageEnhance.Brightness(im).enhance(
        max(0.1, 1 + _signed(.9 * m))),
    "SharpnessIncreasing": lambda im, m: ImageEnhance.Sharpness(im).enhance(
        max(0.1, 1 + _signed(.9 * m))),
    "ShearX": lambda im, m: _affine(im, (1, _signed(0.3 * m), 0, 0, 1, 0)),
    "ShearY": lambda im, m: _affine(im, (1, 0, 0, _signed(0.3 * m), 1, 0)),
    "TranslateXRel": lambda im, m: _affine(im, (1, 0, _signed(0.45 * m) * im.size[0], 0, 1, 0)),
    "TranslateYRel": lambda im, m: _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * m) * im.size[1])),
}


def rand_augment(img, n=2, magnitude=9.0, std=0.5, prob=0.5):
    """timm's RandAugment as mae uses it: n operations drawn with replacement, each applied with
    probability 0.5 at a magnitude drawn from N(magnitude, std) clipped to [0, 10]."""
    names = list(RAND_OPS)
    for k in torch.randint(len(names), (n,)).tolist():
        if torch.rand(()).item() < prob:
            m = min(10.0, max(0.0, magnitude + std * torch.randn(()).item())) / 10
            img = RAND_OPS[names[k]](img, m)
    return img


def random_erase(x, prob=0.25, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))):
    """timm's RandomErasing (mode 'pixel', one box) on a normalised (C, H, W) tensor: with
    probability `prob`, a box of area share in `area` and log-uniform aspect ratio gets N(0, 1)
    noise per pixel; 10 tries to fit one."""
    if torch.rand(()).item() >= prob:
        return x
    C, H, W = x.shape
    for _ in range(10):
        share = area[0] + (area[1] - area[0]) * torch.rand(()).item()
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(()).item())
        h, w = round(math.sqrt(share * H * W * aspect)), round(math.sqrt(share * H * W / aspect))
        if 0 < h < H and 0 < w < W:
            top = torch.randint(0, H - h + 1, ()).item()
            left = torch.randint(0, W - w + 1, ()).item()
            x = x.clone()
            x[:, top:top + h, left:left + w] = torch.randn(C, h, w)
            return x
    return x


class TrainTransform:
    """mae's training view: RandomResizedCrop(min_crop-1, bicubic) + horizontal flip +
    RandAugment, normalise, random erasing. Draws from torch's global RNG (SeededSamples seeds it
    per (seed, epoch, index))."""

    def __init__(self, image_size, mean, std, r):
        self.image_size, self.mean, self.std, self.r = image_size, mean, std, r

    def __call__(self, img):
        S, r = self.image_size, self.r
        box = data.random_resized_crop_box(*img.size, scale=(r.min_crop, 1.0))
        img = img.resize((S, S), Image.BICUBIC, box=box)
        if torch.rand(()).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = rand_augment(img, r.randaug_n, r.randaug_m, r.randaug_mstd)
        return random_erase(data.to_tensor(img, self.mean, self.std), r.reprob)


def soft_targets(y, num_classes, smoothing=0.0):
    """Label-smoothed one-hot rows: 1 - smoothing + smoothing / C on the label, smoothing / C
    elsewhere (timm's); each row sums to 1."""
    off = smoothing / num_classes
    return torch.full((len(y), num_classes), off).scatter_(1, y[:, None], 1.0 - smoothing + off)


def mix_batch(x, y, num_classes, rng, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5,
              smoothing=0.1):
    """timm's Mixup in mode 'batch', as mae uses it: with probability `prob` the batch is mixed with
    itself reversed (sample i with sample B-1-i), one lam ~ Beta(alpha, alpha) for the batch;
    cutmix (chosen with switch_prob when both are on) pastes the partner's box of area about 1 -
    lam, and lam becomes exactly 1 - the pasted share of the area; mixup blends the pixels. The
    targets: lam x own + (1 - lam) x the partner's label-smoothed one-hot (each row sums to 1).
    rng: numpy Generator (the step's draws). Returns (x, targets, lam, cutmix box or None)."""
    lam, box = 1.0, None
    if mixup > 0 or cutmix > 0:
        use_cutmix = cutmix > 0 and (mixup == 0 or rng.random() < switch_prob)
        alpha = cutmix if use_cutmix else mixup
        draw = float(rng.beta(alpha, alpha))
        if rng.random() < prob:
            lam = draw
        if lam < 1.0 and use_cutmix:
            H, W = x.shape[-2:]
            cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(H)), int(rng.integers(W))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam, box = 1.0 - (y1 - y0) * (x1 - x0) / (H * W), (y0, y1, x0, x1)
        elif lam < 1.0:
            x = x * lam + x.flip(0) * (1.0 - lam)
    t = soft_targets(y, num_classes, smoothing)
    return x, lam * t + (1.0 - lam) * t.flip(0), lam, box


# -----------------------------------------------------------------------------
# data: probe.py's folders and splits (evalcommon), the training view above, the evaluation view


def source_labels(source):
    """Every label of a labelled source without decoding an image (Builtin: without rendering)."""
    if hasattr(source, "labels"):
        return source.labels()
    return [source[i]["label"] for i in range(len(source))]


def make_splits(args, d, image_size):
    """(fit dataset, val dataset or None, test dataset, class names): the training split minus a
    stratified --val-fraction (or --val-dir), seen through TrainTransform; val and test through the
    evaluation view. A training split whose readable images hold fewer than 2 classes is refused in
    one line (the first 8 images of each class are tried)."""
    r = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
    source, _, classes, what = labelled_source(d, "train", image_size)
    labels = source_labels(source)
    firsts, readable = {}, []  # the first 8 rows of each class
    for i, k in enumerate(labels):
        if len(firsts.setdefault(k, [])) < 8:
            firsts[k].append(i)
    for k, rows in sorted(firsts.items()):
        try:
            check_readable("train-dir", [source[i] for i in rows], image_size, first=8)
            readable.append(k)
        except InputError:
            pass
    need_classes(PROG, SimpleNamespace(y=torch.tensor(readable), classes=classes, what=what),
                 "fine-tuning")
    val = None
    fit_rows = torch.arange(len(labels))
    if "val" in d.folders:
        val = labelled_source(d, "val", image_size)[0]
    elif args.val_fraction > 0:
        fit_rows, val_rows = stratified_split(labels, args.val_fraction, args.seed)
        val = torch.utils.data.Subset(source, val_rows.tolist()) if len(val_rows) else None
    view = data.EvalTransform(image_size, d.mean, d.std, d.crop_pct)
    fit = data.LabelledDataset(torch.utils.data.Subset(source, fit_rows.tolist()),
                               TrainTransform(image_size, d.mean, d.std, r))
    test = labelled_source(d, "test", image_size)[0]
    return (fit, val and data.LabelledDataset(val, view), data.LabelledDataset(test, view),
            list(classes))


@torch.no_grad()
def evaluate(net, dataset, env, batch_size, workers):
    """(top-1 %, top-5 % or None with 5 classes or fewer, images scored, {skip reason: count}) of
    the plain model in eval mode, each rank scoring every world-th image, the counts summed."""
    net.eval()
    rows = list(range(env.rank, len(dataset), env.world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size,
                                         num_workers=workers, collate_fn=data.collate)
    counts, skipped = torch.zeros(3, dtype=torch.float64, device=env.device), data.SkipLog()
    for batch in loader:
        skipped.add(batch)
        if len(batch["label"]) == 0:
            continue
        y = batch["label"].to(env.device)
        with env.autocast:
            logits = net(batch["image"].to(env.device)).float()
        top = logits.topk(min(5, logits.size(1)), dim=1).indices
        counts += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                               torch.tensor(len(y), device=env.device)]).double()
    if env.ddp:
        dist.all_reduce(counts)
        skipped = skipped.all_ranks()
    net.train()
    n = int(counts[2].item())
    if n == 0:
        return None, None, 0, dict(skipped.counts)
    top5 = 100.0 * counts[1].item() / n if net.head.out_features > 5 else None
    return 100.0 * counts[0].item() / n, top5, n, dict(skipped.counts)


# -----------------------------------------------------------------------------
# one optimizer step, the loop, saving and resuming


def train_step(t, batch, lr, env, args, num_classes):
    """One optimizer step on this rank's batch: mixup / cutmix from the step's own generator (the
    same lam on every rank), drop path from torch's RNG seeded by (seed, step, rank), the soft
    targets' cross-entropy. Returns (loss, grad norm) on the device."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    torch.manual_seed(mix_seed(args.seed, t.step, env.rank, 3))  # drop path: keyed, exact resume
    x, y, weight = batch["image"], batch["label"], 1.0
    if len(y) == 0:  # every sample unreadable: a blank one at weight 0 keeps DDP ranks in step
        x, y, weight = torch.zeros(1, *x.shape[1:]), torch.zeros(1, dtype=torch.int64), 0.0
    rng = np.random.default_rng(mix_seed(args.seed, t.step, 2))
    x, targets, _, _ = mix_batch(x.to(env.device, non_blocking=True), y, num_classes, rng,
                                 args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob,
                                 args.smoothing)
    targets = targets.to(env.device, non_blocking=True)
    with env.autocast:
        logits = t.step_model(x)
    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean() * weight
    loss.backward()
    clip = args.clip_grad if args.clip_grad > 0 else float("inf")
    grad_norm = nn.utils.clip_grad_norm_(t.model.parameters(), clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def schedule(args, fit_size, world):
    """(steps per epoch, total steps, warmup steps, peak lr): whole global batches only."""
    per_epoch = fit_size // args.batch_size
    warmup = args.warmup_epochs if args.warmup_epochs is not None else args.epochs / 20
    peak = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    return per_epoch, per_epoch * args.epochs, round(warmup * per_epoch), peak


def loop(t, splits, env, args, num_classes, extra):
    """Train from t's step to the last epoch's end, scoring the validation split after each epoch
    and saving (also at --stop-after). Returns False when --stop-after ended it early."""
    fit, val = splits[0], splits[1]
    per_rank = args.batch_size // env.world
    per_epoch, total, warmup, peak = schedule(args, len(fit), env.world)
    loader = make_loader(fit, per_rank, args.workers, env, args.seed)
    log = open(os.path.join(args.out_dir, rundir.LOG), "a") if env.master else None
    bar = tqdm(total=total, initial=t.step, disable=not env.master, dynamic_ncols=True)
    seen, t_last, since = data.SkipLog(), time.perf_counter(), 0
    while t.step < total:
        batches, _ = epoch_batches(loader, t.epoch, t.batch_in_epoch, per_rank, env, args.seed)
        for batch in batches:
            seen.add(batch.pop("skipped"))
            lr = lr_at(t.step, peak, warmup, total, args.min_lr)
            loss, grad_norm = train_step(t, batch, lr, env, args, num_classes)
            t.step, t.batch_in_epoch, since = t.step + 1, t.batch_in_epoch + 1, since + len(
                batch["label"])
            bar.update(1)
            if t.step % args.log_every == 0 and not math.isfinite(grad_norm.item()):
                raise FloatingPointError(f"non-finite gradient at step {t.step}; stopped without "
                                         "saving (try a smaller --blr)")
            if t.step % args.log_every == 0 and env.master:
                rate = since * env.world / (time.perf_counter() - t_last)
                rundir.append_log(log, dict(step=t.step, loss=loss.item(), lr=lr,
                                            grad_norm=grad_norm.item(), images_per_s=rate))
                bar.set_postfix(loss=f"{loss.item():.4g}", lr=f"{lr:.2e}", ips=f"{rate:.0f}")
            if t.step % args.log_every == 0:
                t_last, since = time.perf_counter(), 0
            if t.step == args.stop_after:
                break
        if t.batch_in_epoch >= per_epoch:  # the epoch is whole: score val, then save
            t.epoch, t.batch_in_epoch = t.epoch + 1, 0
            if val is not None:
                t_val = time.perf_counter()
                top1, _, n, _ = evaluate(t.model, val, env, args.batch_size_features, args.workers)
                if env.master and n:
                    rundir.append_log(log, dict(step=t.step, val_top1=top1))
                    bar.set_postfix(val_top1=f"{top1:.2f}")
                t_last += time.perf_counter() - t_val  # images/s: of training alone
        if t.batch_in_epoch == 0 or t.step == args.stop_after:
            save(t, env, args, extra)
        if t.step == args.stop_after:
            break
    bar.close()
    if log:
        log.close()
    if env.master and seen.skipped():
        print(f"training data: {seen.report()}")
    return t.step >= total


def save(t, env, args, extra):
    """Rank 0 writes OUT_DIR/ckpt.pt (checkpoint.save_checkpoint: the fine-tuned M3AE as
    load_model and probe.py read it, its head, the optimizer, where the run is, `extra`) and
    curves.png."""
    if env.master:
        checkpoint.save_checkpoint(checkpoint.checkpoint_dict(
            t.model.m3ae, head=t.model.head_state(), optimizer=t.optimizer.state_dict(),
            args=vars(args), **t.progress(), **extra), args.out_dir)
        draw_curves(args.out_dir)
    if env.ddp:
        dist.barrier()


def resume(t, env, args, fingerprint):
    """--resume: the newest readable checkpoint of OUT_DIR, the data unchanged, the log without the
    steps to be replayed (a finished run is scored again)."""
    try:
        ckpt, name = checkpoint.load_checkpoint(args.out_dir, map_location=env.device,
                                                aside=env.master)
        if ckpt is not None and env.master:
            rundir.check_fingerprint(ckpt.get("fingerprint") or fingerprint, fingerprint)
    except (CheckpointError, rundir.RunDirError) as e:
        die(PROG, str(e))
    if ckpt is None:
        print(f"--resume: no checkpoint in {args.out_dir} yet, starting at step 0")
        return
    t.model.m3ae.load_state_dict(ckpt["model"])
    t.model.load_state_dict(ckpt["head"], strict=False)
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.step, t.epoch, t.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    if env.master:
        rundir.trim_log(args.out_dir, t.step)
        print(f"resumed from {name} at step {t.step} (epoch {t.epoch}, batch {t.batch_in_epoch})")


# -----------------------------------------------------------------------------


def main(argv=None):
    args = settings(argv)  # every flag and path checked; --resume: the run's own settings
    env = setup(args.device, args.dtype, args.compile)
    t0 = time.perf_counter()

    # --- the encoder (drop path on), the data it is fine-tuned and scored on ---
    try:
        m3ae, ckpt = load_encoder(args.ckpt, args.random_init, args.preset, args.seed)
    except CheckpointError as e:
        die(PROG, f"--ckpt {e}")
    d = eval_data(args, ckpt)
    m3ae = with_drop_path(m3ae, args.drop_path)
    fit, val, test, classes = make_splits(args, d, m3ae.config.image_size)
    check_batch(args, fit, env)
    fingerprint = rundir.data_fingerprint(files={"ckpt": args.ckpt}, folders={
        s: d.folders.get(s) for s in ("train", "test", "val")})

    # --- OUT_DIR is this run's from here on (rank 0 holds its lock) ---
    lock = None
    if env.master:
        lock = claim(args)
    if env.ddp:
        dist.barrier()

    # --- classifier and optimizer; the head's init depends on --seed alone (every rank alike) ---
    torch.manual_seed(mix_seed(args.seed, 1))
    net = Classifier(m3ae, len(classes), args.global_pool).to(env.device).train()
    optimizer = torch.optim.AdamW(layer_decay_groups(net, args.weight_decay, args.layer_decay),
                                  lr=0.0, betas=(0.9, args.beta2), fused=env.cuda)
    t = Training(net, net, optimizer)
    if args.resume:
        resume(t, env, args, fingerprint)
    if env.master:
        rundir.write_config(args.out_dir, {"run": vars(args), "model": asdict(m3ae.config),
                                           "world_size": env.world, "fingerprint": fingerprint})
        per_epoch, _, _, peak = schedule(args, len(fit), env.world)
        trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
        who = f"{args.ckpt or ''}{' random init' if args.random_init else ''}".strip()
        print(f"{who}: {trained / 1e6:.2f}M parameters trained, {len(classes)} classes, {len(fit)} "
              f"training images, {args.epochs} epochs x {per_epoch} steps of {args.batch_size}, "
              f"peak lr {peak:.2e}, device {env.device}, compile {env.compile}, workers "
              f"{args.workers}")
    t.step_model = torch.compile(net) if env.compile else net
    if env.ddp:
        t.step_model = DDP(t.step_model, device_ids=[env.device.index] if env.cuda else None)

    # --- the loop, then the test split, once, with the last weights ---
    extra = dict(fingerprint=fingerprint, classes=classes,
                 data=dict(mean=list(d.mean), std=list(d.std), source="finetune"))
    finished = loop(t, (fit, val), env, args, len(classes), extra)
    result = None
    if finished:
        result = score(t, (val, test), env, args, d, ckpt, classes, time.perf_counter() - t0)
    finish(lock, env, t)
    return result


def with_drop_path(m3ae, rate):
    """The same weights in a model whose encoder blocks drop paths up to `rate`
    (config.drop_path_rate: no parameter changes)."""
    if rate == m3ae.config.drop_path_rate:
        return m3ae
    model = M3AE(replace(m3ae.config, drop_path_rate=rate))
    model.load_state_dict(m3ae.state_dict())
    return model


def check_batch(args, fit, env):
    """A global batch that divides by the ranks and fits in the training split (whole batches
    only)."""
    if args.batch_size % env.world:
        die(PROG, f"--batch-size {args.batch_size} must divide by the {env.world} ranks")
    if args.batch_size > len(fit):
        die(PROG, f"--batch-size {args.batch_size} is more than the {len(fit)} training images "
            "(an epoch is whole batches)")


def claim(args):
    """rundir.claim (lock OUT_DIR; --overwrite: delete its run's files, never the checkpoint given
    as input); a refusal is one line, exit 2."""
    try:
        return rundir.claim(args.out_dir, args.overwrite, inputs=(args.ckpt,))
    except rundir.RunDirError as e:
        die(PROG, str(e))


def score(t, splits, env, args, d, ckpt, classes, seconds):
    """Top-1 / top-5 of the last weights on the test split (and the validation split), written
    next to the pretrained checkpoint (evalcommon.write_result: atomic, never a NaN, listed in its
    outputs.txt); the end-of-run summary. Returns the result (rank 0) or None."""
    val, test = splits
    top1, top5, n, skipped = evaluate(t.model, test, env, args.batch_size_features, args.workers)
    what = f"--test-dir {d.folders['test']}" if d.real else "built-in test split"
    if n == 0:
        raise SystemExit(f"{what}: no usable image: all {len(test)} skipped "
                         f"({skip_report(skipped)}); no metric computed")
    val_top1, _, val_n, _ = (evaluate(t.model, val, env, args.batch_size_features, args.workers)
                             if val is not None else (None, None, 0, None))
    if not env.master:
        return None
    recipe = {f.name: getattr(args, f.name) for f in fields(Recipe)
              if f.metadata["resume"] != ONCE}
    result = dict(
        ckpt=args.ckpt, random_init=args.random_init, seed=args.seed, dataset=d.name,
        data="folder" if d.real else "builtin", folders=d.folders or None, classes=len(classes),
        class_names=classes, top1=top1, top5=top5, val_top1=val_top1, test_size=n,
        val_size=val_n, steps=t.step, epochs=args.epochs, recipe=recipe,
        feature="global pool + LayerNorm" if args.global_pool else "CLS after the final norm",
        out_dir=args.out_dir, skipped=dict(test=skipped), pretraining=pretraining_info(ckpt),
        world_size=env.world, device=str(env.device), seconds=round(seconds, 1))
    out = out_path_for(args.ckpt, args.out, args.preset, args.random_init,
                       result_name("finetune", d))
    out = write_result(result, out, d.run_dir)
    run = args.out_dir
    print(f"done: fine-tuned {args.epochs} epochs ({t.step} steps) in {seconds:.0f} s: "
          f"top-1 {top1:.2f}%" + (f" top-5 {top5:.2f}%" if top5 is not None else "")
          + f" on {n} test images of {d.name}"
          + (f" (val top-1 {val_top1:.2f}% on {val_n})" if val_top1 is not None else "")
          + f" -> {out}; the run: {os.path.join(run, checkpoint.CKPT)}, "
          f"{os.path.join(run, rundir.LOG)}, {os.path.join(run, rundir.CURVES)}. Next: python "
          f"probe.py --ckpt {os.path.join(run, checkpoint.CKPT)} (its encoder, frozen)")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, DiskFull, CheckpointError) as e:
        sys.exit(f"{PROG}: error: {e}")  # a run that cannot go on: one line
