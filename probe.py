"""Linear probe and kNN on a frozen encoder (paper section 4.1, MAE's protocol) — one flat script.

    python probe.py --ckpt runs/default/ckpt.pt                  # fast mode: cached features, head, kNN
    python probe.py --ckpt runs/default/ckpt.pt --mode full      # train-time augmentation through the encoder
    python probe.py --ckpt runs/default/ckpt.pt --random-init    # the floor: same architecture, untrained
    python probe.py --ckpt ckpt.pt --train-dir imagenet/train --test-dir imagenet/val --mode full

Protocol (the paper's and mae's, docs/reference.md "Linear probe"; where we depart, a comment says so):
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

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import builtin
import data
from model import M3AE, PRESETS, load_model, make_config
from util import (NORMS, SeededSamples, checkpoint_data_level, checkpoint_data_seed, checkpoint_norm, lr_at,
                  make_parser, mix_seed, pretraining_info, save_atomic)

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
    p = make_parser(__doc__, prog="probe.py")
    add_encoder_args(p)
    add_data_args(p)
    add_head_args(p)
    a = p.add_argument
    a("--mode", default="fast", choices=["fast", "full"], help="fast: cached features; full: augmentation")
    a("--label", default="shape", choices=builtin.Builtin.LABELS, help="built-in data: what to classify, the main "
      "object's shape (10 classes) or its colour (11); results go to probe_<mode>[_colour].json")
    a("--knn-k", type=int, default=20, help="kNN neighbours")
    a("--knn-t", type=float, default=0.07, help="kNN temperature of the vote weights exp(sim / t)")
    args = p.parse_args(argv)
    if not args.ckpt and not args.random_init:
        p.error("give --ckpt (or --random-init [--preset])")
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


@dataclass
class EvalData:
    """Which images an evaluation reads and how they are viewed. Folders (ImageFolder class sub-folders; the OOD
    folder any layout) when given, else the built-in splits (sizes, data seed and level, label). The view:
    resize + centre crop_pct + normalise with (mean, std). Features are cached under cache_dir."""
    mean: tuple
    std: tuple
    crop_pct: float
    cache_dir: str
    folders: dict  # split name -> folder, for the splits given as folders
    sizes: dict  # split name -> built-in image count (None: the split's default)
    data_seed: int = 0
    data_level: str = "easy"
    label: str = "shape"
    batch_size: int = 256
    workers: int = 0

    @property
    def real(self):
        return bool(self.folders)


def eval_data(args, ckpt, splits=("train", "test")):
    """EvalData from probe.py's / ood.py's flags (add_encoder_args + add_data_args) and what the checkpoint says
    (its normalisation, data seed and level); the one place flags become values."""
    folders = {s: getattr(args, f"{s}_dir") for s in splits if getattr(args, f"{s}_dir", None)}
    mean, std = NORMS[args.norm] if args.norm != "auto" else checkpoint_norm(ckpt, real_data_default=bool(folders))
    crop = args.crop_pct if args.crop_pct is not None else (0.875 if folders else 1.0)
    return EvalData(mean=mean, std=std, crop_pct=crop, cache_dir=cache_dir_for(args.ckpt, args.cache_dir, args.preset),
                    folders=folders, sizes={s: getattr(args, f"{s}_size", None) for s in splits},
                    data_seed=args.data_seed if args.data_seed is not None else checkpoint_data_seed(ckpt),
                    data_level=args.data_level or checkpoint_data_level(ckpt), label=getattr(args, "label", "shape"),
                    batch_size=args.batch_size_features, workers=args.workers)


def labelled_source(d, which, image_size):
    """(source of dict(image, label), identity string, class names) for split `which` (train, test or ood) of
    EvalData d: its folder when given, else the built-in split."""
    folder = d.folders.get(which)
    if folder:
        if which == "ood":  # any layout, no labels needed
            return Unlabelled(data.ImageOnlyFolder(folder)), folder_identity(folder) + ":unlabelled", None
        source = data.ImageFolder(folder)
        return source, folder_identity(folder), source.classes
    source = builtin.Builtin(which, d.sizes.get(which), image_size, seed=d.data_seed, level=d.data_level,
                             label=d.label)
    identity = f"builtin:{which}:{len(source)}:{image_size}px:seed{d.data_seed}:{d.data_level}:{d.label}"
    return source, identity, source.classes


class Unlabelled(torch.utils.data.Dataset):
    """An image-only source (no classes) with label -1, for OOD folders."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return dict(image=self.source[i]["image"], label=-1)


def split_features(model, d, which, model_key=None):
    """(features, labels, class names) of split `which` (train, test or ood) of EvalData d, through its
    evaluation view, cached on disk."""
    image_size = model.config.image_size
    source, identity, classes = labelled_source(d, which, image_size)
    transform = data.EvalTransform(image_size, d.mean, d.std, d.crop_pct)
    view = f"eval:{image_size}:{d.crop_pct}:{d.mean}:{d.std}"
    x, y = cached_features(model, model_key or weights_hash(model), data.LabelledDataset(source, transform),
                           f"{identity}|{view}|cls", d.cache_dir, d.batch_size, d.workers)
    return x, y, classes


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
# the head's recipe, and the quick checks train.py runs at the end on the built-in data


def head_recipe(optimizer="lars", epochs=90, batch_size=256, base_lr=None, warmup_epochs=None, weight_decay=0.0,
                real_data=False):
    """The head's training recipe. Default base lr: the paper's 0.1 for real data; 6.4 for LARS on the built-in
    data. Why: LARS moves each weight matrix by lr x 0.001 x ||w|| per step, so how far the head can travel
    scales with lr x steps, and under the linear scaling rule lr x steps = base_lr x images x epochs / 256
    whatever the batch. mae's ImageNet probe (1.28M images, lr 6.4, ~7000 steps) travels 256 x further than the
    same recipe on our 5000 images; on synthetic features of that size, base lr 0.1 reaches 33% where SGD or
    Adam reach 64%, base lr 6.4 reaches 64.6% (docs/results.md, "Linear probe"). 6.4 is mae's absolute lr."""
    if base_lr is None:
        base_lr = 6.4 if optimizer == "lars" and not real_data else 0.1
    return dict(epochs=epochs, batch_size=batch_size, base_lr=base_lr, optimizer=optimizer,
                warmup_epochs=warmup_epochs, weight_decay=weight_decay)


def recipe_from_args(args, real_data, default_epochs=90):
    return head_recipe(args.optimizer, args.epochs if args.epochs is not None else default_epochs, args.batch_size,
                       args.base_lr, args.warmup_epochs, args.weight_decay, real_data)


def quick_probe(model, train_set, test_set, seed=0):
    """probe.py's fast mode with its defaults for the built-in data (frozen CLS features after the final norm,
    BatchNorm(affine=False) + Linear, LARS, 90 epochs, base lr 6.4), once per label of the built-in data (the
    main object's shape, then its colour) on the same features: {label: test top-1 in %}. The same numbers as
    `python probe.py --ckpt OUT_DIR/ckpt.pt --seed SEED [--label colour]` on the same image counts."""
    recipe = head_recipe()
    xtr, _, _ = extract_features(model, train_set)
    xte, _, _ = extract_features(model, test_set)
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


def main(argv=None):
    args = get_args(argv)
    t0 = time.perf_counter()
    model, ckpt = load_encoder(args.ckpt, args.random_init, args.preset, args.seed, args.device)
    d = eval_data(args, ckpt)
    model_key = weights_hash(model)
    xtr, ytr, classes = split_features(model, d, "train", model_key)
    xte, yte, test_classes = split_features(model, d, "test", model_key)
    if d.real and classes != test_classes:
        raise SystemExit(f"--train-dir and --test-dir have different class folders: {classes} vs {test_classes}")
    num_classes = len(classes)
    t_features = time.perf_counter() - t0

    knn = knn_accuracy(xtr, ytr, xte, yte, num_classes, args.knn_k, args.knn_t)
    t1 = time.perf_counter()
    if args.mode == "fast":
        recipe = recipe_from_args(args, d.real, 90)
        head = train_head_on_features(xtr, ytr, num_classes, seed=args.seed, **recipe)
    else:
        # the built-in data gets 10 epochs by default: each epoch is a full encoder pass over the train split
        recipe = recipe_from_args(args, d.real, 90 if d.real else 10)
        source, _, _ = labelled_source(d, "train", model.config.image_size)
        augment = data.PretrainTransform(model.config.image_size, d.mean, d.std, scale=(0.08, 1.0))  # paper's aug
        head = train_head_full(model, data.LabelledDataset(source, augment), num_classes, seed=args.seed,
                               workers=args.workers, **recipe)
    head = head.cpu()
    with torch.no_grad():
        test_acc = topk_accuracy(head(xte), yte)
        train_acc = topk_accuracy(head(xtr), ytr)
    result = dict(
        ckpt=args.ckpt, random_init=args.random_init, seed=args.seed, mode=args.mode, model_hash=model_key[:16],
        data="folder" if d.real else "builtin", data_seed=None if d.real else d.data_seed,
        label=None if d.real else args.label,
        classes=num_classes, train_size=len(xtr), test_size=len(xte), feature_dim=xtr.size(1),
        top1=test_acc[1], top5=test_acc[5], train_top1=train_acc[1], knn_top1=knn[1], knn_top5=knn[5],
        knn=dict(k=args.knn_k, t=args.knn_t, similarity="cosine", votes="exp(sim/t)"),
        recipe={**recipe, "lr": recipe["base_lr"] * min(args.batch_size, len(xtr)) / 256,
                "warmup_epochs": recipe["warmup_epochs"] if recipe["warmup_epochs"] is not None
                else recipe["epochs"] / 9},
        pretraining=pretraining_info(ckpt),
        seconds=dict(features=round(t_features, 1), head=round(time.perf_counter() - t1, 1)),
    )
    out = out_path_for(args.ckpt, args.out, args.preset, args.random_init,
                       f"probe_{args.mode}" + ("_colour" if args.label == "colour" else ""))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    name = "random-init encoder" if args.random_init else (args.ckpt or "")
    print(f"{name}: linear probe ({args.mode}, {args.optimizer}, {recipe['epochs']} epochs) top-1 "
          f"{test_acc[1]:.2f}% top-5 {test_acc[5]:.2f}% (train top-1 {train_acc[1]:.2f}%) | kNN (k={args.knn_k}) "
          f"top-1 {knn[1]:.2f}% top-5 {knn[5]:.2f}% | {len(xtr)} train / {len(xte)} test -> {out}")
    return result


if __name__ == "__main__":
    main()
