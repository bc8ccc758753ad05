"""Linear probe and kNN on a frozen encoder (paper section 4.1, MAE's protocol) — one flat script.

    python probe.py --ckpt runs/default/ckpt.pt                  # fast mode: cached features, head, kNN
    python probe.py --ckpt runs/default/ckpt.pt --mode full      # train-time augmentation through the encoder
    python probe.py --ckpt runs/default/ckpt.pt --random-init    # the floor: same architecture, untrained
    python probe.py --ckpt ckpt.pt --train-dir imagenet/train --test-dir imagenet/val --mode full
    python probe.py --table runs/sweep                           # aggregate a sweep (sweep.sh) into a table

Protocol (../shared/REFERENCE.md, "Linear probe"; where we depart, a comment says so):
  * feature: the CLS token after the encoder's final LayerNorm, image only (no text), no masking, frozen.
  * head: BatchNorm1d without affine (eps 1e-6, as mae) + Linear (trunc-normal std 0.01, zero bias, as mae).
  * optimiser: LARS (momentum 0.9, trust coefficient 0.001, no weight decay), lr = base_lr x batch / 256 with
    the paper's base_lr 0.1 on real data, but 6.4 on the small built-in data (a departure: head_recipe says why);
    linear warmup (10 of 90 epochs) then cosine, per step. `--optimizer sgd` swaps in plain momentum SGD.
  * fast mode (default): features of the evaluation view are extracted once and cached on disk under
    features/<key>.pt next to the checkpoint, key = hash of the weights + dataset + transform; the head
    trains on them (no augmentation: a departure from the paper, which crops every epoch). Seconds on a CPU.
  * full mode: every epoch, RandomResizedCrop(scale 0.08-1) + flip, through the frozen encoder (paper's
    protocol; slow: one encoder pass per sample per epoch). Evaluation uses the cached centre view.
  * kNN (a second opinion, no training): cosine similarity on the same cached features, k = 20 neighbours,
    votes weighted by exp(similarity / 0.07) (DINO's weighted kNN).
Prints top-1/top-5 and writes a JSON result (default: probe_<mode>.json next to the checkpoint).
"""

import argparse
import glob
import hashlib
import json
import os
import re
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import builtin
import data
from model import M3AE, PRESETS, load_model, make_config
from train import SeededSamples, lr_at, mix_seed, save_atomic

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMS = {"builtin": (builtin.BUILTIN_MEAN, builtin.BUILTIN_STD), "cc12m": (data.CC12M_MEAN, data.CC12M_STD),
         "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

# -----------------------------------------------------------------------------
# arguments (the encoder/data/head groups are shared with ood.py)


def add_encoder_args(p):
    a = p.add_argument
    a("--ckpt", help="checkpoint from train.py or convert.py (a dict with 'model' and 'config')")
    a("--random-init", action="store_true", help="evaluate an untrained encoder (the floor): the checkpoint's "
      "architecture (or --preset's) with fresh weights drawn from --seed")
    a("--preset", default="tiny", choices=list(PRESETS), help="architecture for --random-init without --ckpt")
    a("--seed", type=int, default=0, help="head init and shuffling (and the weights under --random-init)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--batch-size-features", type=int, default=256, help="images per encoder forward when extracting")
    a("--workers", type=int, default=0, help="DataLoader workers")
    a("--cache-dir", help="feature cache (default: features/ next to the checkpoint)")
    a("--out", help="JSON result path (default: next to the checkpoint)")


def add_data_args(p):
    a = p.add_argument
    a("--train-dir", help="ImageFolder root (class sub-folders) to fit on; default: the built-in data")
    a("--test-dir", help="ImageFolder root to evaluate on (same class folders as --train-dir)")
    a("--train-size", type=int, help="built-in data: training images (default: the split's 5000)")
    a("--test-size", type=int, help="built-in data: test images (default: the split's 2000)")
    a("--data-seed", type=int, help="built-in data: which procedural dataset (default: the checkpoint's)")
    a("--data-level", choices=list(builtin.LEVELS), help="built-in data: difficulty (default: the checkpoint's)")
    a("--norm", default="auto", choices=["auto", *NORMS],
      help="normalisation statistics; auto = those the checkpoint was pretrained with (builtin or cc12m)")
    a("--crop-pct", type=float, help="evaluation centre crop (default 0.875 for folders, 1.0 for built-in)")


def add_head_args(p):
    a = p.add_argument
    a("--optimizer", default="lars", choices=["lars", "sgd"], help="LARS as the paper, or momentum SGD")
    a("--epochs", type=int, help="head training epochs (default 90 as the paper; 10 for --mode full on "
      "the built-in data)")
    a("--batch-size", type=int, default=256, help="head batch (paper: 16384 mae, 2048 official)")
    a("--base-lr", type=float, help="lr = base_lr x batch / 256 (default 0.1 as the paper; 6.4 for LARS on the "
      "built-in data: see head_recipe)")
    a("--warmup-epochs", type=float, help="linear warmup (default: epochs / 9, the paper's 10 of 90)")
    a("--weight-decay", type=float, default=0.0, help="paper: 0")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_args(p)
    add_data_args(p)
    add_head_args(p)
    a = p.add_argument
    a("--mode", default="fast", choices=["fast", "full"], help="fast: cached features; full: augmentation")
    a("--label", default="shape", choices=builtin.Builtin.LABELS, help="built-in data: what to classify, the main "
      "object's shape (10 classes) or its colour (11); results go to probe_<mode>[_colour].json")
    a("--knn-k", type=int, default=20, help="kNN neighbours")
    a("--knn-t", type=float, default=0.07, help="kNN temperature of the vote weights exp(sim / t)")
    a("--table", metavar="SWEEP_DIR", help="only aggregate SWEEP_DIR/<variant>_s<seed>/*.json into a table")
    args = p.parse_args(argv)
    if not args.table and not args.ckpt and not args.random_init:
        p.error("give --ckpt (or --random-init [--preset], or --table)")
    if bool(args.train_dir) != bool(args.test_dir):
        p.error("real data needs both --train-dir and --test-dir")
    if args.train_dir and args.label != "shape":
        p.error("--label picks a built-in attribute; folders label by class folder")
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


def load_encoder(args):
    """(model in eval mode, the checkpoint dict or {}). --random-init keeps the architecture, redraws weights."""
    ckpt = {}
    if args.ckpt:
        model, ckpt = load_model(args.ckpt)
        config = model.config
    else:
        config = make_config(args.preset, vocab_size=PRESETS[args.preset].get("vocab_size", 1024))
    if args.random_init:
        torch.manual_seed(args.seed)
        model = M3AE(config)
    return model.to(args.device).eval(), ckpt


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


def normalisation(args, ckpt):
    if args.norm != "auto":
        return NORMS[args.norm]
    default = "cc12m" if getattr(args, "train_dir", None) else "builtin"  # viz.py's args have no --train-dir
    pretrained_on = ckpt.get("args", {}).get("data", default)
    return NORMS["builtin" if pretrained_on == "builtin" else "cc12m"]


def data_seed(args, ckpt):
    return args.data_seed if args.data_seed is not None else ckpt.get("args", {}).get("data_seed", 0)


def data_level(args, ckpt):
    """The built-in difficulty the checkpoint was pretrained on ("hard" for checkpoints older than the knob)."""
    return getattr(args, "data_level", None) or ckpt.get("args", {}).get("data_level", "hard")


def labelled_source(args, ckpt, which, image_size):
    """(source of dict(image, label), identity string, class names) for split `which` in train/test/ood. The
    built-in data by default; --train-dir/--test-dir (and ood.py's --ood-dir) for real images."""
    folder = getattr(args, f"{which}_dir", None)
    if folder:
        if which == "ood":  # any layout, no labels needed
            return Unlabelled(data.ImageOnlyFolder(folder)), folder_identity(folder) + ":unlabelled", None
        source = data.ImageFolder(folder)
        return source, folder_identity(folder), source.classes
    size = getattr(args, f"{which}_size", None)
    seed, level, label = data_seed(args, ckpt), data_level(args, ckpt), getattr(args, "label", "shape")
    source = builtin.Builtin(which, size, image_size, seed=seed, level=level, label=label)
    return source, f"builtin:{which}:{len(source)}:{image_size}px:seed{seed}:{level}:{label}", source.classes


class Unlabelled(torch.utils.data.Dataset):
    """An image-only source (no classes) with label -1, for OOD folders."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return dict(image=self.source[i]["image"], label=-1)


def eval_view(args, ckpt, image_size):
    """(transform, identity string) of the evaluation view: resize + centre crop + normalise."""
    mean, std = normalisation(args, ckpt)
    crop = args.crop_pct if args.crop_pct is not None else (0.875 if args.train_dir else 1.0)
    return data.EvalTransform(image_size, mean, std, crop), f"eval:{image_size}:{crop}:{mean}:{std}"


# -----------------------------------------------------------------------------
# features, cached


@torch.no_grad()
def extract_features(model, dataset, batch_size=256, workers=0):
    """Frozen CLS features after the final norm, image only, no masking. Returns (features (N, D) float32 on
    the CPU, labels (N,) int64, number of skipped samples). Unreadable images are skipped by data.collate."""
    model.eval()
    device = model.cls_token.device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=data.collate)
    feats, labels, skipped = [], [], 0
    for batch in tqdm(loader, desc="features", leave=False, disable=len(loader) < 8):
        skipped += sum(n for k, n in batch["skipped"].items() if not k.startswith("converted:"))
        if len(batch["label"]):
            feats.append(model.encode(batch["image"].to(device))[0].float().cpu())
            labels.append(batch["label"])
    dim = model.config.emb_dim
    return (torch.cat(feats) if feats else torch.zeros(0, dim)), (torch.cat(labels) if labels else
                                                                 torch.zeros(0, dtype=torch.int64)), skipped


def cached_features(model, model_key, dataset, data_key, cache_dir, batch_size=256, workers=0):
    """extract_features, memoised on disk: cache_dir/<key>.pt with key = sha256(model_key, data_key). A new
    checkpoint (other weights), another dataset or another transform gives another key, so stale features are
    never read. Returns (features, labels)."""
    key = hashlib.sha256(json.dumps([model_key, data_key]).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"]
    t0 = time.perf_counter()
    x, y, skipped = extract_features(model, dataset, batch_size, workers)
    print(f"features: {len(x)} x {x.size(1)} from {data_key} in {time.perf_counter() - t0:.1f}s"
          + (f" ({skipped} unreadable images skipped)" if skipped else "") + f" -> {path}")
    os.makedirs(cache_dir, exist_ok=True)
    save_atomic({"features": x, "labels": y, "model": model_key, "data": data_key}, path)
    return x, y


def cache_dir_for(args):
    if args.cache_dir:
        return args.cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt else
                        os.path.join("runs", f"random_init_{args.preset}"), "features")


def out_path_for(args, name):
    """Default JSON result path: <checkpoint dir>/<name>[_random_init].json."""
    if args.out:
        return args.out
    folder = os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt else os.path.join(
        "runs", f"random_init_{args.preset}")
    return os.path.join(folder, f"{name}{'_random_init' if args.random_init else ''}.json")


def split_features(args, model, ckpt, which, model_key=None):
    """(features, labels, class names) of split `which` (train, test or ood) through the evaluation view."""
    image_size = model.config.image_size
    source, identity, classes = labelled_source(args, ckpt, which, image_size)
    transform, view = eval_view(args, ckpt, image_size)
    x, y = cached_features(model, model_key or weights_hash(model), data.LabelledDataset(source, transform),
                           f"{identity}|{view}|cls", cache_dir_for(args), args.batch_size_features, args.workers)
    return x, y, classes


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


def train_head(epoch_batches, dim, num_classes, steps_per_epoch, epochs, batch_size=256, base_lr=0.1,
               optimizer="lars", warmup_epochs=None, weight_decay=0.0, seed=0, device="cpu"):
    """Train make_head(dim, num_classes) for epochs x steps_per_epoch steps. epoch_batches(epoch) yields
    (features (B, dim), labels (B,)) on `device`. lr = base_lr x batch / 256, linear warmup then cosine per
    step (train.lr_at). Returns the head in eval mode."""
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
    for epoch in range(epochs):
        for x, y in epoch_batches(epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr_max, warmup, total)
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


def train_head_on_features(x, y, num_classes, epochs=90, batch_size=256, seed=0, **recipe):
    """Fast mode: the head on cached features, reshuffled every epoch (drop_last: BatchNorm needs > 1 row)."""
    batch_size = min(batch_size, len(x))
    steps = max(1, len(x) // batch_size)

    def epoch_batches(epoch):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        for idx in perm[: steps * batch_size].split(batch_size):
            yield x[idx], y[idx]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run faster on one thread (and OpenMP stalls when cores are busy)
    try:
        return train_head(epoch_batches, x.size(1), num_classes, steps, epochs, batch_size, seed=seed, **recipe)
    finally:
        torch.set_num_threads(threads)


def train_head_full(model, dataset, num_classes, epochs=10, batch_size=256, seed=0, workers=0, **recipe):
    """Full mode: every epoch each training image is augmented afresh (seeded by (seed, epoch, index) through
    train.SeededSamples) and encoded by the frozen encoder; only the head learns."""
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

    return train_head(epoch_batches, model.config.emb_dim, num_classes, steps, epochs, batch_size, seed=seed,
                      device=device, **recipe)


@torch.no_grad()
def topk_accuracy(logits, y, ks=(1, 5)):
    """{k: % of rows whose label is among the k highest logits}, k capped at the number of classes."""
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


def head_recipe(args, default_epochs=90):
    """The head's training recipe from the flags. Default base lr: the paper's 0.1 for real data; 6.4 for the
    built-in data. Why: LARS moves each weight matrix by lr x 0.001 x ||w|| per step, so how far the head can
    travel scales with lr x steps, and under the linear scaling rule lr x steps = base_lr x images x epochs / 256
    whatever the batch. mae's ImageNet probe (1.28M images, lr 6.4, ~7000 steps) travels 256 x further than the
    same recipe on our 5000 images; on synthetic features of that size, base lr 0.1 reaches 33% where SGD or
    Adam reach 64%, base lr 6.4 reaches 64.6% (README, "Linear probe"). 6.4 is mae's absolute lr."""
    epochs = args.epochs if args.epochs is not None else default_epochs
    builtin_lars = args.optimizer == "lars" and not args.train_dir
    base_lr = args.base_lr if args.base_lr is not None else (6.4 if builtin_lars else 0.1)
    return dict(epochs=epochs, batch_size=args.batch_size, base_lr=base_lr, optimizer=args.optimizer,
                warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay)


def pretraining_info(ckpt):
    """What the checkpoint was trained with (from train.py's args), for the result and the sweep table."""
    a = ckpt.get("args", {})
    keys = ("steps", "seed", "no_text", "text_mask_ratio", "image_mask_ratio", "paired_share", "data", "data_seed",
            "data_level")
    return {k: a[k] for k in keys if k in a}


def main(argv=None):
    args = get_args(argv)
    if args.table:
        return write_table(args.table)
    t0 = time.perf_counter()
    model, ckpt = load_encoder(args)
    model_key = weights_hash(model)
    xtr, ytr, classes = split_features(args, model, ckpt, "train", model_key)
    xte, yte, test_classes = split_features(args, model, ckpt, "test", model_key)
    if args.train_dir and args.test_dir and classes != test_classes:
        raise SystemExit(f"--train-dir and --test-dir have different class folders: {classes} vs {test_classes}")
    num_classes = len(classes)
    t_features = time.perf_counter() - t0

    knn = knn_accuracy(xtr, ytr, xte, yte, num_classes, args.knn_k, args.knn_t)
    t1 = time.perf_counter()
    if args.mode == "fast":
        recipe = head_recipe(args, 90)
        head = train_head_on_features(xtr, ytr, num_classes, seed=args.seed, **recipe)
    else:
        # the built-in data gets 10 epochs by default: each epoch is a full encoder pass over the train split
        recipe = head_recipe(args, 90 if args.train_dir else 10)
        source, _, _ = labelled_source(args, ckpt, "train", model.config.image_size)
        mean, std = normalisation(args, ckpt)
        augment = data.PretrainTransform(model.config.image_size, mean, std, scale=(0.08, 1.0))  # paper's probe aug
        head = train_head_full(model, data.LabelledDataset(source, augment), num_classes, seed=args.seed,
                               workers=args.workers, **recipe)
    head = head.cpu()
    with torch.no_grad():
        test_acc = topk_accuracy(head(xte), yte)
        train_acc = topk_accuracy(head(xtr), ytr)
    result = dict(
        ckpt=args.ckpt, random_init=args.random_init, seed=args.seed, mode=args.mode, model_hash=model_key[:16],
        data="folder" if args.train_dir else "builtin", data_seed=None if args.train_dir else data_seed(args, ckpt),
        label=None if args.train_dir else args.label,
        classes=num_classes, train_size=len(xtr), test_size=len(xte), feature_dim=xtr.size(1),
        top1=test_acc[1], top5=test_acc[5], train_top1=train_acc[1], knn_top1=knn[1], knn_top5=knn[5],
        knn=dict(k=args.knn_k, t=args.knn_t, similarity="cosine", votes="exp(sim/t)"),
        recipe={**recipe, "lr": recipe["base_lr"] * min(args.batch_size, len(xtr)) / 256,
                "warmup_epochs": recipe["warmup_epochs"] if recipe["warmup_epochs"] is not None
                else recipe["epochs"] / 9},
        pretraining=pretraining_info(ckpt),
        seconds=dict(features=round(t_features, 1), head=round(time.perf_counter() - t1, 1)),
    )
    out = out_path_for(args, f"probe_{args.mode}" + ("_colour" if args.label == "colour" else ""))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    name = "random-init encoder" if args.random_init else (args.ckpt or "")
    print(f"{name}: linear probe ({args.mode}, {args.optimizer}, {recipe['epochs']} epochs) top-1 "
          f"{test_acc[1]:.2f}% top-5 {test_acc[5]:.2f}% (train top-1 {train_acc[1]:.2f}%) | kNN (k={args.knn_k}) "
          f"top-1 {knn[1]:.2f}% top-5 {knn[5]:.2f}% | {len(xtr)} train / {len(xte)} test -> {out}")
    return result


# -----------------------------------------------------------------------------
# the sweep's table (sweep.sh trains the variants, runs probe.py and ood.py, then `probe.py --table DIR`)

# sweep.sh's run names -> what they are; the paper's numbers (ImageNet linear probe / OOD AUROC, CC12M pretraining)
VARIANTS = {
    "m3ae": "M3AE (text mask 0.75, 100% paired)",
    "mae": "MAE (same recipe, --no-text)",
    "text015": "M3AE, text mask 0.15",
    "paired10": "M3AE, 10% paired",
    "paired0": "M3AE, 0% paired",
    "textw2": "M3AE, text loss weight 2.0 (not the paper's 0.5)",
    "random": "random-init encoder (floor)",
}
ORDERINGS = [  # (what, metric, better variant, worse variant, the paper's numbers)
    ("1. M3AE > MAE, linear probe", "top1", "m3ae", "mae", "59.4 vs 45.2"),
    ("1. M3AE > MAE, kNN", "knn_top1", "m3ae", "mae", "(paper: linear probe only)"),
    ("1. M3AE > MAE, linear probe, colour label", "top1_colour", "m3ae", "mae", "(ours: built-in data)"),
    ("1. M3AE > MAE, kNN, colour label", "knn_top1_colour", "m3ae", "mae", "-"),
    ("2. text mask 0.75 > 0.15, linear probe", "top1", "m3ae", "text015", "64.1 vs 53.3"),
    ("2. text mask 0.75 > 0.15, kNN", "knn_top1", "m3ae", "text015", "-"),
    ("2. text mask 0.75 > 0.15, linear probe, colour label", "top1_colour", "m3ae", "text015", "-"),
    ("3. paired 100% > 10%, linear probe", "top1", "m3ae", "paired10", "59.4 vs 53.3"),
    ("3. paired 10% > 0%, linear probe", "top1", "paired10", "paired0", "53.3 vs 45.2"),
    ("3. paired 100% > 10%, kNN", "knn_top1", "m3ae", "paired10", "-"),
    ("3. paired 10% > 0%, kNN", "knn_top1", "paired10", "paired0", "-"),
    ("3. paired 100% > 10%, linear probe, colour label", "top1_colour", "m3ae", "paired10", "-"),
    ("3. paired 10% > 0%, linear probe, colour label", "top1_colour", "paired10", "paired0", "-"),
    ("4. M3AE > MAE, OOD AUROC Mahalanobis", "ood_mahalanobis", "m3ae", "mae", "71.4 vs 69.0"),
    ("4. M3AE > MAE, OOD AUROC MSP", "ood_msp", "m3ae", "mae", "78.5 vs 77.2"),
]


def collect(sweep_dir):
    """{variant: {seed: {metric: value}}} from SWEEP_DIR/<variant>_s<seed>/ probe_fast.json (shape label),
    probe_fast_colour.json (colour label: metrics *_colour) and ood.json; the random-init floor from
    m3ae_s<seed>/*_random_init.json."""
    runs = {}
    for folder in sorted(glob.glob(os.path.join(sweep_dir, "*_s*"))):
        m = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(folder))
        if not m:
            continue
        variant, seed = m.group(1), int(m.group(2))
        for suffix, name in (("", variant), ("_random_init", "random")):
            if suffix and variant != "m3ae":
                continue
            row = {}
            for fname, fields, tag in ((f"probe_fast{suffix}.json", ("top1", "knn_top1"), ""),
                                       (f"probe_fast_colour{suffix}.json", ("top1", "knn_top1"), "_colour"),
                                       (f"ood{suffix}.json", None, "")):
                path = os.path.join(folder, fname)
                if not os.path.exists(path):
                    continue
                with open(path) as f:
                    r = json.load(f)
                if fields:
                    row.update({k + tag: r[k] for k in fields})
                    row["setup"] = (f"pretraining steps {r.get('pretraining', {}).get('steps', '?')}, probe "
                                    f"{r.get('train_size', '?')} train / {r.get('test_size', '?')} test images")
                else:
                    row.update({f"ood_{s}": v["auroc"] for s, v in r["scores"].items()})
            if row:
                runs.setdefault(name, {})[seed] = row
    return runs


def mean_std(values):
    """'mean ± sample std (n)'; a single value has no spread."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def write_table(sweep_dir):
    runs = collect(sweep_dir)
    metrics = [("top1", "linear probe top-1"), ("knn_top1", "kNN top-1"), ("top1_colour", "linear probe top-1, colour"),
               ("knn_top1_colour", "kNN top-1, colour"), ("ood_mahalanobis", "OOD AUROC Mahalanobis"),
               ("ood_relative_mahalanobis", "OOD AUROC rel. Mahalanobis"), ("ood_msp", "OOD AUROC MSP")]
    lines = ["| run | seeds | " + " | ".join(name for _, name in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for variant in [*[v for v in VARIANTS if v in runs], *sorted(set(runs) - set(VARIANTS))]:
        seeds = runs[variant]
        cells = [mean_std([r[k] for r in seeds.values() if k in r]) for k, _ in metrics]
        lines.append(f"| {VARIANTS.get(variant, variant)} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", "| paper's ordering | paper | ours (mean ± std) | holds on the mean | seeds where it holds |",
              "|---|---|---|---|---|"]
    for what, metric, a, b, paper in ORDERINGS:
        ra, rb = runs.get(a, {}), runs.get(b, {})
        shared = sorted(s for s in set(ra) & set(rb) if metric in ra[s] and metric in rb[s])
        if not shared:
            lines.append(f"| {what} | {paper} | not run | - | - |")
            continue
        va, vb = [ra[s][metric] for s in shared], [rb[s][metric] for s in shared]
        wins = sum(x > y for x, y in zip(va, vb))
        holds = "yes" if np.mean(va) > np.mean(vb) else "**no**"
        lines.append(f"| {what} | {paper} | {mean_std(va)} vs {mean_std(vb)} | {holds} | {wins}/{len(shared)} |")
    setups = sorted({r["setup"] for seeds in runs.values() for r in seeds.values() if "setup" in r})
    lines += ["", f"Runs in {sweep_dir}: " + "; ".join(setups) + ". Mean ± sample std over seeds; an ordering "
              "\"holds\" when the first mean is higher; the last column counts seeds where it holds pairwise."]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(sweep_dir, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return runs


if __name__ == "__main__":
    main()
