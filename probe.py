"""Linear probe and kNN on a frozen encoder (paper section 4.1, MAE's protocol) — one flat script.

    python probe.py --ckpt runs/default/ckpt.pt                # fast: cached features, lr grid, kNN
    python probe.py --ckpt runs/default/ckpt.pt --mode full    # augmentation through the encoder
    python probe.py --ckpt runs/default/ckpt.pt --random-init  # the floor: untrained, same shape
    python probe.py --ckpt ckpt.pt --train-dir in1k/train --test-dir in1k/val --recipe paper

Protocol (the paper's and mae's, docs/reference.md "Linear probe"; a comment marks each departure):
  * feature: the CLS token after the encoder's final LayerNorm, image only, no masking, frozen.
  * head: BatchNorm1d without affine (eps 1e-6) + Linear (trunc-normal std 0.01, zero bias), as mae.
  * optimiser: LARS (momentum 0.9, trust coefficient 0.001, no weight decay), lr = base_lr x batch /
    256, linear warmup (10 of 90 epochs) then cosine, per step. `--optimizer sgd`: momentum SGD.
  * the lr, --recipe grid (default): one head per base lr of --lr-grid, trained at once on the same
    batches; the one kept has the best top-1 on a validation split held out from the training data
    (--val-fraction, stratified, seeded by --seed; or --val-dir), never on test; no refit. --recipe
    paper: one head on the whole training split at base lr 0.1 (--base-lr), for ImageNet-scale data.
    Why a grid: at the paper's lr a head on a few thousand images barely moves (docs/probe.md).
  * fast mode (default): the evaluation view's features, cached in features/<key>.pt next to the
    checkpoint; the head trains on them without augmentation (a departure: the paper crops every
    epoch). full mode: RandomResizedCrop(0.08-1) + flip every epoch through the frozen encoder (the
    paper's; slow); validation and test read the cached centre view.
  * kNN (no training): cosine similarity, k = 20 neighbours, votes weighted exp(sim / 0.07), DINO's.
Writes probe_<dataset>_<mode>[_paper][_random_init].json next to the checkpoint (<dataset>: the
--train-dir folder's name, or builtin[_colour]), listed in its outputs.txt (evalcommon.py).
"""

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import builtin
import data
from checkpoint import CheckpointError, pretraining_info
from evalcommon import (Indexed, add_data_args, add_encoder_args, add_label_arg, check_label,
                        check_output, check_paths, die, eval_data, fail, labelled_source,
                        load_encoder, need_classes, out_path_for, result_name, skip_report,
                        stratified_split, write_output, write_result)
from util import SeededSamples, lr_at, make_parser, mix_seed

# the default grid's base lrs, lr = base_lr x batch / 256 (paper: 0.1, mae: 6.4; docs/probe.md)
LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 6.4, 10.0, 30.0, 100.0)

# -----------------------------------------------------------------------------
# command line: evalcommon's encoder and data flags, the head's (shared with ood.py), probe.py's own


def add_head_args(p, full_mode=True):
    a = p.add_argument
    a("--recipe", default="grid", choices=["grid", "paper"], help="grid: one head per --lr-grid "
      "base lr, the lr chosen on the validation split; paper: one head at --base-lr on the whole "
      "training split")
    a("--lr-grid", type=float, nargs="+", default=list(LR_GRID),
      help="--recipe grid: the base lrs tried")
    a("--optimizer", default="lars", choices=["lars", "sgd"],
      help="LARS as the paper, or momentum SGD")
    a("--epochs", type=int, help="head training epochs; if not given, 90 as the paper"
      + (" (10 for --mode full on the built-in data)" if full_mode else ""))
    a("--batch-size", type=int, default=256, help="head batch (paper: 16384 mae, 2048 official)")
    a("--base-lr", type=float, help="--recipe paper: lr = base_lr x batch / 256; if not given, 0.1 "
      "as the paper")
    a("--warmup-epochs", type=float,
      help="linear warmup; if not given, epochs / 9 (the paper's 10 of 90)")
    a("--weight-decay", type=float, default=0.0, help="as the paper: 0")


def check_head_args(p, args):
    if args.recipe == "paper" and args.val_dir:
        p.error("--val-dir chooses the grid's lr; --recipe paper has a fixed lr (drop one of them)")
    if args.recipe == "grid":
        if args.base_lr is not None:
            p.error("--base-lr is --recipe paper's lr; the grid's are --lr-grid")
        if not args.val_dir and not 0.0 < args.val_fraction < 1.0:
            fail(p, "--val-fraction", args.val_fraction, "must be in (0, 1) (or give --val-dir)")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lr_grid):
            fail(p, "--lr-grid", " ".join(map(str, args.lr_grid)),
                 "every base lr must be a positive number")
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
    a("--mode", default="fast", choices=["fast", "full"],
      help="fast: cached features; full: augmentation")
    add_label_arg(p)  # results: probe_builtin[_colour]_<mode>.json
    a("--knn-k", type=int, default=20, help="kNN neighbours")
    a("--knn-t", type=float, default=0.07, help="kNN temperature of the vote weights exp(sim / t)")
    a("--save-head", metavar="PATH", help="also save the chosen head (BatchNorm + Linear state "
      "dict, classes, view) to PATH; if not given, not saved")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.ckpt and not args.random_init:
        p.error("give --ckpt (or --random-init [--preset])")
    if bool(args.train_dir) != bool(args.test_dir):
        p.error("real data needs both --train-dir and --test-dir")
    check_label(p, args)
    check_head_args(p, args)
    check_output(p, "--save-head", args.save_head, "zip")
    check_paths(p, args, ("train", "test", "val"))
    return args


# -----------------------------------------------------------------------------
# features: the frozen CLS after the final norm, cached on disk


class Split(NamedTuple):
    """A split's features: x (N, D) float32, CPU; y (N,) labels (-1: OOD); index (N,) the source row
    of each; classes (names or None); skipped {reason: count}; what (the folder or split)."""
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    classes: list
    skipped: dict
    what: str


@torch.no_grad()
def extract_features(model, dataset, batch_size=256, workers=0):
    """The frozen CLS feature after the final norm, image only, no masking, of every readable image
    of `dataset`: a Split (classes None); data.collate skips and counts unreadable images."""
    model.eval()
    device = model.cls_token.device
    loader = torch.utils.data.DataLoader(Indexed(dataset), batch_size=batch_size,
                                         num_workers=workers, collate_fn=data.collate)
    feats, labels, rows, skipped = [], [], [], Counter()
    for batch in tqdm(loader, desc="features", leave=False, disable=len(loader) < 8):
        skips = {k: n for k, n in batch["skipped"].items() if not k.startswith("converted:")}
        skipped.update(skips)
        if len(batch["label"]):
            feats.append(model.encode(batch["image"].to(device))[0].float().cpu())
            labels.append(batch["label"])
            rows.append(batch["index"])
    ints = torch.zeros(0, dtype=torch.int64)
    cat = lambda xs, empty=ints: torch.cat(xs) if xs else empty
    return Split(cat(feats, torch.zeros(0, model.config.emb_dim)), cat(labels), cat(rows), None,
                 dict(skipped), "")


def weights_hash(model):
    """sha256 of the config (but the attention implementation) and every tensor: the cache's model
    key. The weights, not the file: --random-init is keyed alike, and a checkpoint saved again with
    other optimizer state keeps its features."""
    h = hashlib.sha256()
    config = asdict(model.config)
    config.pop("attn_impl")
    h.update(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_features(model, model_key, dataset, data_key, cache_dir, batch_size=256, workers=0,
                    run_dir=None):
    """extract_features, memoised in cache_dir/<key>.pt, key = sha256(model_key, data_key): other
    weights, images or view, another key. A cache file that does not read (cut by a kill or a full
    disk) is computed again and replaced; one that cannot be written is skipped, with a note; an
    extraction that yields nothing is not cached."""
    key = hashlib.sha256(json.dumps([model_key, data_key, "v2"]).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.exists(path):
        try:
            c = torch.load(path, weights_only=True)
            return Split(c["features"], c["labels"], c["index"], None, c["skipped"], "")
        except Exception as e:
            reason = " ".join(str(e).split())[:120] or type(e).__name__
            print(f"note: feature cache {path} is unreadable ({reason}); computing it again")
    t0 = time.perf_counter()
    f = extract_features(model, dataset, batch_size, workers)
    skipped = sum(f.skipped.values())
    print(f"features: {len(f.x)} x {f.x.size(1)} from {data_key} in {time.perf_counter() - t0:.1f}s"
          + (f" ({skipped} unreadable images skipped: {skip_report(f.skipped)})" if skipped else "")
          + (f" -> {path}" if len(f.x) else ""))
    if len(f.x):
        entry = dict(features=f.x, labels=f.y, index=f.index, skipped=f.skipped, model=model_key,
                     data=data_key)
        try:
            write_output(path, lambda fh: torch.save(entry, fh), "zip", folder=run_dir)
        except OSError as e:
            print(f"note: features not cached: {e.strerror or e}")
    return f


def split_features(model, d, which, model_key=None):
    """The Split of `which` (train, test, val or ood) of evalcommon.EvalData d through its view,
    cached. A split with no readable image ends the run in one line naming it."""
    size = model.config.image_size
    source, identity, classes, what = labelled_source(d, which, size)
    view = data.EvalTransform(size, d.mean, d.std, d.crop_pct)
    key = f"{identity}|eval:{size}:{d.crop_pct}:{d.mean}:{d.std}|cls"
    f = cached_features(model, model_key or weights_hash(model), data.LabelledDataset(source, view),
                        key, d.cache_dir, d.batch_size, d.workers, d.run_dir)
    if len(f.x) == 0:
        raise SystemExit(f"{what}: no usable image: all {len(source)} skipped "
                         f"({skip_report(f.skipped)}); no metric computed")
    return f._replace(classes=classes, what=what)


# -----------------------------------------------------------------------------
# the head, LARS, and a grid of heads trained at once


def make_head(dim, num_classes, seed=0):
    """BatchNorm without affine (mae's eps 1e-6) + Linear with mae's init: trunc-normal std 0.01
    (timm's bounds, +-2 absolute: in effect a plain normal), zero bias."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, a=-2.0, b=2.0,
                          generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(head[1].bias)
    return head


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is rescaled by the trust ratio (You et
    al. 2017; torch has none). Per parameter p with gradient g:

        d = g + weight_decay x p                    (matrices only)
        d = d x trust_coefficient x ||p|| / ||d||   (matrices only, when both norms are > 0)
        mu = momentum x mu + d                      (mu starts at 0)
        p = p - lr x mu

    1-D parameters (biases) skip both, as in mae (docs/probe.md: official's optax differs). With
    trust_coefficient None it is momentum SGD, weight decay on every parameter (torch.optim.SGD).
    stacked: the first dim of each parameter indexes heads (HeadGrid); norms and lr are per head."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001,
                 stacked=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, stacked=stacked))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            trust, lead, lr = group["trust_coefficient"], int(group["stacked"]), group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                matrix, d = p.ndim > 1 + lead, p.grad
                if matrix or trust is None:
                    d = d.add(p, alpha=group["weight_decay"])
                if matrix and trust is not None:
                    dims = tuple(range(lead, p.ndim))
                    p_norm, d_norm = p.norm(dim=dims, keepdim=True), d.norm(dim=dims, keepdim=True)
                    d = d * torch.where((p_norm > 0) & (d_norm > 0), trust * p_norm / d_norm,
                                        torch.ones_like(p_norm))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(d)
                if torch.is_tensor(lr):  # one lr per head
                    p.sub_(lr.view(-1, *[1] * (p.ndim - 1)) * mu)
                else:
                    p.add_(mu, alpha=-lr)


class HeadGrid(nn.Module):
    """len(base_lrs) linear heads: one BatchNorm (no affine: every head sees the same normalised
    batch), a (L, C, D) weight and a (L, C) bias, each head initialised as make_head(seed).
    forward: (B, D) -> (L, B, C). head(i): head i as a make_head module (for MSP, for saving)."""

    def __init__(self, dim, num_classes, base_lrs, seed=0):
        super().__init__()
        self.base_lrs = [float(lr) for lr in base_lrs]
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        w = make_head(dim, num_classes, seed)[1].weight.detach()
        self.weight = nn.Parameter(w.expand(len(self.base_lrs), -1, -1).clone())
        self.bias = nn.Parameter(torch.zeros(len(self.base_lrs), num_classes))
        self.diverged = [False] * len(self.base_lrs)  # train_grid marks a head whose loss blew up

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
    y = y.expand(logits.size(0), -1)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def train_grid(epoch_batches, steps, dim, num_classes, base_lrs, epochs=90, batch_size=256,
               optimizer="lars", warmup_epochs=None, weight_decay=0.0, seed=0, device="cpu",
               progress=False):
    """A HeadGrid trained for epochs x steps steps on epoch_batches(epoch) -> (features (B, dim),
    labels (B,)) on `device`, all heads on the same batches, each at lr = base_lr x batch / 256 with
    linear warmup then cosine per step (util.lr_at). One head is a grid of one. A head whose loss
    stops being finite is frozen (grid.diverged). progress: a bar over epochs."""
    grid = HeadGrid(dim, num_classes, base_lrs, seed).to(device)
    lrs = torch.tensor(grid.base_lrs, device=device) * batch_size / 256
    opt = LARS(grid.parameters(), weight_decay=weight_decay, stacked=True,
               trust_coefficient=0.001 if optimizer == "lars" else None)
    alive = torch.ones(len(lrs), dtype=torch.bool, device=device)
    total = epochs * steps
    warmup = round((epochs / 9 if warmup_epochs is None else warmup_epochs) * steps)
    step = 0
    grid.train()
    bar = tqdm(range(epochs), desc=f"{len(lrs)} heads", unit="epoch", leave=False,
               disable=not progress)
    for epoch in bar:
        for x, y in epoch_batches(epoch):
            losses = grid_losses(grid(x), y)
            grid.zero_grad(set_to_none=True)
            losses.sum().backward()  # heads share no parameter: each gets its own loss's gradient
            alive &= torch.isfinite(losses).detach()
            for p in grid.parameters():
                p.grad.nan_to_num_()
            opt.param_groups[0]["lr"] = torch.where(alive, lrs * lr_at(step, 1.0, warmup, total), 0)
            opt.step()
            step += 1
            if progress and alive.any():
                bar.set_postfix(best_loss=f"{losses[alive].min().item():.4f}", refresh=False)
    grid.diverged = (~alive).tolist()
    return grid.eval()


def train_grid_on_features(x, y, num_classes, base_lrs, epochs=90, batch_size=256, seed=0,
                           **recipe):
    """Fast mode: train_grid on cached features, reshuffled every epoch (drop_last: BatchNorm needs
    2 rows), on one thread (ops as small as these run faster so; OpenMP stalls on busy cores)."""
    batch_size = min(batch_size, len(x))
    steps = max(1, len(x) // batch_size)

    def epoch_batches(epoch):
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        for idx in torch.randperm(len(x), generator=g)[: steps * batch_size].split(batch_size):
            yield x[idx], y[idx]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_grid(epoch_batches, steps, x.size(1), num_classes, base_lrs, epochs,
                          batch_size, seed=seed, **recipe)
    finally:
        torch.set_num_threads(threads)


def train_head_on_features(x, y, num_classes, base_lr=0.1, **recipe):
    """One head at base_lr on cached features (--recipe paper, train.py's quick probe)."""
    return train_grid_on_features(x, y, num_classes, [base_lr], **recipe).head(0)


def train_grid_full(model, dataset, num_classes, base_lrs, epochs=10, batch_size=256, seed=0,
                    workers=0, **recipe):
    """Full mode: every epoch each training image augmented afresh (seeded by (seed, epoch, index):
    util.SeededSamples) and encoded by the frozen encoder; only the heads learn."""
    device = model.cls_token.device
    seeded = SeededSamples(dataset, seed)
    batch_size = min(batch_size, len(dataset))
    steps = max(1, len(dataset) // batch_size)

    def epoch_batches(epoch):
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(len(dataset), generator=g)[: steps * batch_size].tolist()
        for batch in torch.utils.data.DataLoader(seeded, sampler=[(epoch, i) for i in order],
                                                 batch_size=batch_size, num_workers=workers,
                                                 collate_fn=data.collate):
            if len(batch["label"]) > 1:  # unreadable images are dropped; BatchNorm needs 2 rows
                with torch.no_grad():
                    feats = model.encode(batch["image"].to(device))[0].float()
                yield feats, batch["label"].to(device)

    return train_grid(epoch_batches, steps, model.config.emb_dim, num_classes, base_lrs, epochs,
                      batch_size, seed=seed, device=device, progress=True, **recipe)


@torch.no_grad()
def grid_scores(grid, x, y):
    """Each head's top-1 (%) and mean cross-entropy on (x, y): two (L,) tensors, NaN if diverged."""
    logits = grid(x)
    top1 = 100.0 * (logits.argmax(-1) == y).double().mean(1)
    loss = grid_losses(logits, y).double()
    bad = torch.tensor(grid.diverged) | ~torch.isfinite(logits).flatten(1).all(1)
    return top1.masked_fill(bad, float("nan")), loss.masked_fill(bad, float("nan"))


def choose_lr(val_top1):
    """Index of the head to keep: the best validation top-1, ties to the smaller lr (the grid
    ascends), never a diverged (NaN) head; None if all diverged. Not the validation loss: the
    largest lr wins it by saturating its softmax, which leaves MSP only ties (docs/probe.md)."""
    ok = [i for i in range(len(val_top1)) if math.isfinite(val_top1[i])]
    return max(ok, key=lambda i: (val_top1[i], -i)) if ok else None


# -----------------------------------------------------------------------------
# the recipe, and fitting the head that probe.py reports and ood.py's MSP reads


def head_recipe(optimizer="lars", epochs=90, batch_size=256, base_lr=None, warmup_epochs=None,
                weight_decay=0.0, real_data=False):
    """One head's fixed recipe. Base lr if not given: the paper's 0.1 on real data, 6.4 (mae's
    absolute lr) for LARS on the built-in data, where 0.1 barely moves the head (docs/probe.md)."""
    if base_lr is None:
        base_lr = 6.4 if optimizer == "lars" and not real_data else 0.1
    return dict(epochs=epochs, batch_size=batch_size, base_lr=base_lr, optimizer=optimizer,
                warmup_epochs=warmup_epochs, weight_decay=weight_decay)


def recipe_from_args(args, real_data, full=False):
    """(recipe, lr grid or None) from the head flags: --recipe paper at --base-lr (0.1), --recipe
    grid the same schedule at --lr-grid's lrs. Epochs if not given: 90, or 10 for --mode full on
    the built-in data (an encoder pass per image per epoch)."""
    epochs = args.epochs if args.epochs is not None else (90 if real_data or not full else 10)
    recipe = head_recipe(args.optimizer, epochs, args.batch_size, args.base_lr,
                         args.warmup_epochs, args.weight_decay, real_data=True)
    return recipe, (list(args.lr_grid) if args.recipe == "grid" else None)


def fit_linear_head(d, model, model_key, train, num_classes, recipe, lr_grid=None,
                    val_fraction=0.1, seed=0, workers=0, full=False):
    """(head: a make_head module, eval, CPU; fit info for the JSON; rows of `train` fitted on).
    lr_grid None (--recipe paper): one head on the whole training split. Else a grid of those base
    lrs on the training split minus a stratified val_fraction (all of it with a "val" folder), the
    lr chosen on that validation split, never on test; no refit. full: augmented (--mode full)."""
    info = dict(recipe=dict(name="paper" if lr_grid is None else "grid", **recipe))
    if recipe["warmup_epochs"] is None:
        info["recipe"]["warmup_epochs"] = recipe["epochs"] / 9
    fit_rows = torch.arange(len(train.x))
    if lr_grid is not None and "val" in d.folders:
        val = split_features(model, d, "val", model_key)
        xval, yval, on = val.x, val.y, f"--val-dir {d.folders['val']}"
    elif lr_grid is not None:
        fit_rows, val_rows = stratified_split(train.y, val_fraction, seed)
        if len(val_rows) == 0:
            raise SystemExit(f"{train.what}: {len(train.x)} usable images are too few to hold out "
                             f"--val-fraction {val_fraction} for choosing the lr; give --val-dir, "
                             "a larger --val-fraction, or --recipe paper")
        xval, yval = train.x[val_rows], train.y[val_rows]
        on = (f"{val_fraction:g} of {train.what} held out (stratified by class, seed {seed}); the "
              "head is fitted on the rest")
    xfit, yfit = train.x[fit_rows], train.y[fit_rows]
    batch = min(recipe["batch_size"], len(fit_rows))
    lrs = sorted(lr_grid) if lr_grid is not None else [recipe["base_lr"]]
    schedule = {k: v for k, v in recipe.items() if k != "base_lr"}
    t0 = time.perf_counter()
    if full:
        size = model.config.image_size
        source = labelled_source(d, "train", size)[0]
        source = torch.utils.data.Subset(source, train.index[fit_rows].tolist())
        augment = data.PretrainTransform(size, d.mean, d.std, scale=(0.08, 1.0))  # the paper's
        trained = train_grid_full(model, data.LabelledDataset(source, augment), num_classes, lrs,
                                  seed=seed, workers=workers, **schedule)
    else:
        trained = train_grid_on_features(xfit, yfit, num_classes, lrs, seed=seed, **schedule)
    trained = trained.cpu()
    if lr_grid is None:
        best = None if trained.diverged[0] else 0
    else:
        val_top1, val_loss = (t.tolist() for t in grid_scores(trained, xval, yval))
        fit_top1 = grid_scores(trained, xfit, yfit)[0].tolist()
        best = choose_lr(val_top1)
    if best is None:
        raise SystemExit(f"every head of base lr {' '.join(map(str, lrs))} diverged (non-finite "
                         "loss); try smaller lrs")
    info["recipe"].update(base_lr=lrs[best], lr=lrs[best] * batch / 256, batch_size=batch)
    if lr_grid is not None:
        finite = lambda v: round(v, 4) if math.isfinite(v) else None  # JSON: null, never NaN
        info["selection"] = dict(
            on=on, fit_size=len(fit_rows), val_size=len(yval),
            metric="val top-1, ties: the smaller lr", chosen_base_lr=lrs[best],
            val_top1=val_top1[best], refit_on_train_plus_val=False,
            grid=[dict(base_lr=lr, lr=lr * batch / 256, val_top1=finite(a), val_loss=finite(l),
                       fit_top1=finite(f))
                  for lr, a, l, f in zip(lrs, val_top1, val_loss, fit_top1)])
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return trained.head(best), info, fit_rows


# -----------------------------------------------------------------------------
# metrics


@torch.no_grad()
def topk_accuracy(logits, y, ks=(1, 5)):
    """{k: % of rows whose label is among the k highest logits}, k capped at the number of classes.
    No rows is an error (a metric from no sample would be NaN)."""
    if len(y) == 0:
        raise ValueError("topk_accuracy of no sample")
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.size(1)), dim=1).indices
        out[k] = 100.0 * (top == y[:, None]).any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def knn_accuracy(xtr, ytr, xte, yte, num_classes, k=20, t=0.07, chunk=1024):
    """Weighted kNN (DINO): the k training features most cosine-similar to a test feature vote for
    their label with weight exp(sim / t); {1: top-1 %, 5: top-5 %}, classes ranked by votes."""
    bank = F.normalize(xtr.float(), dim=1)
    k = min(k, len(bank))
    votes = []
    for q in F.normalize(xte.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (n, k)
        votes.append(torch.zeros(len(q), num_classes).scatter_add_(1, ytr[idx], (sim / t).exp()))
    return topk_accuracy(torch.cat(votes), yte)


# -----------------------------------------------------------------------------
# the checks train.py runs at the end of a run


def quick_probe(model, train_set, test_set, seed=0):
    """Fast mode on the built-in data with head_recipe() (LARS, 90 epochs, base lr 6.4, the whole
    training split), per label (shape, colour) on the same features: {label: test top-1 %}. The
    same numbers as `probe.py --recipe paper --base-lr 6.4 [--label colour]`."""
    recipe = head_recipe()
    xtr, xte = extract_features(model, train_set).x, extract_features(model, test_set).x
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
    """Does the text path read the image? The masked-word loss of held-out pairs with their own
    images and with the images rolled by one (another sample's image), the same masks: (own,
    other). own == other: the text loss is a language model of the captions alone, and the text
    cannot teach the image features anything (the mechanism of the paper's section 3)."""
    model.eval()
    batch = data.collate([pairs[i] for i in range(len(pairs))])
    images, text, pad = batch["image"], batch["text"], batch["text_padding_mask"]
    device = model.cls_token.device
    g = torch.Generator().manual_seed(seed)
    noise = [torch.rand(len(text), n, generator=g).to(device)
             for n in (model.config.num_patches, text.size(1))]
    others = images.roll(1, 0)
    sums = [0.0, 0.0]
    for i in range(0, len(text), batch_size):  # a mean over samples: chunks weighted by size
        rows = slice(i, i + batch_size)
        t, p, n = text[rows].to(device), pad[rows].to(device), [x[rows] for x in noise]
        for k, x in enumerate((images[rows], others[rows])):
            sums[k] += model(x.to(device), t, p, *n)["text_loss"].item() * len(t)
    return sums[0] / len(text), sums[1] / len(text)


def builtin_text_grounding(model, tokenizer, data_seed=0, level="easy", seed=0, n=1000):
    """text_grounding on the first n pairs of the built-in test split (train.py prints it)."""
    c = model.config
    pairs = builtin.Builtin("test", n, c.image_size, seed=data_seed, level=level)
    view = data.EvalTransform(c.image_size, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0)
    return text_grounding(model, data.PairedDataset(pairs, tokenizer, c.text_len, view), seed=seed)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    t0 = time.perf_counter()
    try:
        model, ckpt = load_encoder(args.ckpt, args.random_init, args.preset, args.seed, args.device)
    except CheckpointError as e:
        die("probe.py", f"--ckpt {e}")
    d = eval_data(args, ckpt)
    model_key = weights_hash(model)
    train = split_features(model, d, "train", model_key)
    test = split_features(model, d, "test", model_key)
    if train.classes != test.classes:  # get_args compared the folders; this guards other callers
        raise SystemExit(f"train and test classes differ: {train.classes} vs {test.classes}")
    need_classes("probe.py", train)
    num_classes, full = len(train.classes), args.mode == "full"
    t_features = time.perf_counter() - t0

    knn = knn_accuracy(train.x, train.y, test.x, test.y, num_classes, args.knn_k, args.knn_t)
    recipe, lr_grid = recipe_from_args(args, d.real, full)
    head, fit, fit_rows = fit_linear_head(d, model, model_key, train, num_classes, recipe, lr_grid,
                                          args.val_fraction, args.seed, args.workers, full)
    with torch.no_grad():
        test_acc = topk_accuracy(head(test.x), test.y)
        fit_acc = topk_accuracy(head(train.x[fit_rows]), train.y[fit_rows])
    sel, rec = fit.get("selection"), fit["recipe"]
    result = dict(
        ckpt=args.ckpt, random_init=args.random_init, seed=args.seed, mode=args.mode,
        model_hash=model_key[:16], dataset=d.name, data="folder" if d.real else "builtin",
        folders=d.folders or None, data_seed=None if d.real else d.data_seed,
        label=None if d.real else args.label, classes=num_classes, class_names=list(train.classes),
        train_size=len(fit_rows), val_size=sel["val_size"] if sel else 0, test_size=len(test.x),
        feature_dim=train.x.size(1), top1=test_acc[1], top5=test_acc[5], train_top1=fit_acc[1],
        val_top1=sel["val_top1"] if sel else None, lr=rec["lr"], base_lr=rec["base_lr"],
        knn_top1=knn[1], knn_top5=knn[5], knn=dict(k=args.knn_k, t=args.knn_t, similarity="cosine",
                                                   votes="exp(sim/t)", bank_size=len(train.x)),
        recipe=rec, selection=sel,
        majority_share=100.0 * test.y.bincount(minlength=num_classes).max().item() / len(test.y),
        skipped=dict(train=train.skipped, test=test.skipped), pretraining=pretraining_info(ckpt),
        seconds=dict(features=round(t_features, 1), head=fit["seconds"]))
    out = out_path_for(args.ckpt, args.out, args.preset, args.random_init,
                       result_name("probe", d, args.mode, args.recipe))
    out = write_result(result, out, d.run_dir)
    if args.save_head:
        view = dict(image_size=model.config.image_size, crop_pct=d.crop_pct, mean=list(d.mean),
                    std=list(d.std))
        saved = dict(head=head.state_dict(), classes=list(train.classes), view=view,
                     feature="CLS after the encoder's final norm", ckpt=args.ckpt,
                     random_init=args.random_init, model_hash=model_key[:16], recipe=rec)
        try:
            write_output(args.save_head, lambda f: torch.save(saved, f), "zip", folder=d.run_dir)
        except OSError as e:
            raise SystemExit(f"{args.save_head} not written: {e.strerror or e}") from None
    who = "random-init encoder" if args.random_init else (args.ckpt or "")
    how = (f"lr grid, base lr {rec['base_lr']:g} chosen on {sel['val_size']} validation images "
           f"(val top-1 {sel['val_top1']:.2f}%)" if sel else f"fixed base lr {rec['base_lr']:g}")
    print(f"{who} on {d.name}: linear probe ({args.mode}, {args.optimizer}, {rec['epochs']} epochs,"
          f" {how}) top-1 {test_acc[1]:.2f}% top-5 {test_acc[5]:.2f}% (train top-1 {fit_acc[1]:.2f}"
          f"%) | kNN (k={args.knn_k}) top-1 {knn[1]:.2f}% top-5 {knn[5]:.2f}% | {len(fit_rows)} "
          f"train / {result['val_size']} val / {len(test.x)} test -> {out}"
          + (f" (head -> {args.save_head})" if args.save_head else ""))
    return result


if __name__ == "__main__":
    main()
