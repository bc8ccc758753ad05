"""Pretrain M3AE (or its MAE baseline) — one flat loop, read top to bottom.

    python train.py                                   # tiny preset, built-in data, 2 CPU cores, minutes
    python train.py --no-text                         # the MAE baseline: same recipe, image-only mode
    torchrun --nproc_per_node=8 train.py --preset base --data wds --wds-shards 'cc12m/{00000..01242}.tar'
    python train.py --bench --preset base             # throughput on random tensors (images/s, MFU)

Recipe (paper section 4, official code): AdamW (0.9, 0.95), weight decay 0.05 on Linear weights only,
lr = base_lr x global_batch / 256, linear warmup then cosine decay per step, image/text mask 0.75/0.75,
loss 1.0 x MSE + 0.5 x CE. Every value is a flag (`--help`).

Determinism: each sample's augmentation is drawn from (seed, epoch, index) and each global batch's masking
noise from (seed, step), not from a process-wide stream, so a resumed run, a run on more ranks and a run with
more workers see the same samples with the same masks (map-style data; a webdataset stream resumes at the same
sample with fresh augmentation draws). Checkpoints are written atomically (temp file + os.replace).
"""

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import builtin
import data
from model import M3AE, PRESETS, checkpoint_dict, make_config
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # model
    a("--preset", default="tiny", choices=list(PRESETS), help="model size (model.py PRESETS)")
    a("--image-size", type=int, help="image side in pixels (default: the preset's)")
    a("--patch-size", type=int, help="patch side in pixels (default: the preset's)")
    a("--text-len", type=int, help="caption length in tokens (default: the preset's)")
    a("--image-mask-ratio", type=float, default=0.75, help="fraction of patches removed (paper: 0.75)")
    a("--text-mask-ratio", type=float, default=0.75, help="fraction of text slots removed, padding counted (0.75)")
    a("--image-weight", type=float, default=1.0, help="weight of the pixel MSE")
    a("--text-weight", type=float, default=0.5, help="weight of the text CE; 0 trains the MAE baseline like --no-text")
    a("--no-text", action="store_true", help="MAE baseline: image-only mode, captions never read")
    a("--norm-pix", action="store_true", help="per-patch normalised pixel targets (mae's norm_pix_loss)")
    a("--attn", default="auto", choices=["auto", "triton", "sdpa", "math"], help="attention implementation")
    # data
    a("--data", default="builtin", choices=["builtin", "wds", "csv"], help="pretraining data source")
    a("--data-seed", type=int, default=0, help="built-in data: which procedural dataset (kept fixed across --seed)")
    a("--data-level", default="easy", choices=list(builtin.LEVELS), help="built-in data: difficulty (builtin.LEVELS)")
    a("--train-size", type=int, default=20000, help="built-in data: pretraining pairs")
    a("--wds-shards", help="webdataset shards: a brace pattern, glob or comma list of .tar files (--data wds)")
    a("--epoch-samples", type=int, help="--data wds: samples per epoch (streams have no length)")
    a("--csv", help="CSV/TSV with an image path and a caption column (--data csv)")
    a("--text-file", help="extra unpaired captions, one per line (text-only samples)")
    a("--image-dir", help="extra unpaired images, a folder (image-only samples)")
    a("--paired-share", type=float, default=1.0,
      help="fraction of pairs kept paired; the rest split half into unpaired images, half into unpaired texts")
    a("--tokenizer", help="a sentencepiece .model to use (default: OUT_DIR/tokenizer.model, trained if absent)")
    a("--vocab-size", type=int, default=1024, help="sentencepiece vocabulary when training a tokenizer")
    a("--workers", type=int, default=1, help="DataLoader workers per rank")
    # optimisation
    a("--batch-size", type=int, default=64, help="global batch (summed over ranks and accumulation steps)")
    a("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    a("--steps", type=int, default=1000, help="optimizer steps in total")
    a("--warmup-steps", type=int, default=50, help="linear warmup steps")
    a("--base-lr", type=float, help="lr = base_lr x global batch / 256 (default: 1.5e-4, the paper's; 6e-3 for "
                                    "the tiny preset, whose 1000 CPU steps at batch 64 need a larger step: README)")
    a("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay on Linear weights (see param_groups)")
    a("--beta2", type=float, default=0.95, help="AdamW beta2 (beta1 is 0.9)")
    a("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = no clipping (official)")
    a("--seed", type=int, default=0, help="initial weights, data order, augmentation and masks")
    # systems
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if any)")
    a("--dtype", default=None, choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)")
    a("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16 dense: 989)")
    # bookkeeping
    a("--out-dir", default="runs/default", help="checkpoints, tokenizer, config.json and log.jsonl go here")
    a("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    a("--log-every", type=int, default=25, help="log and check for non-finite loss every N steps")
    a("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt if it exists")
    a("--stop-after", type=int, help="save and exit after this step (simulates an interruption)")
    a("--probe", action=argparse.BooleanOptionalAction, default=True, help="quick linear probe at the end")
    a("--probe-train-size", type=int, default=5000, help="built-in data: labelled images to fit the quick probe")
    a("--probe-test-size", type=int, default=2000, help="built-in data: labelled images to score it")
    a("--bench", action="store_true", help="time --bench-steps steps on random tensors and exit")
    a("--bench-steps", type=int, default=20, help="--bench: timed steps (after 3 warm-up steps)")
    args = p.parse_args(argv)
    if args.base_lr is None:
        # tiny: peak lr 1.5e-3 at batch 64. Measured on the built-in data (README, "Quick start"): at base 1.5e-3
        # the text barely learned to read the image in 1000 steps; at 6e-3 it does, and the colour probe shows it
        args.base_lr = 6e-3 if args.preset == "tiny" else 1.5e-4
    if args.text_weight == 0:
        args.no_text = True  # a zero text weight is the MAE baseline: don't feed captions the loss ignores
    return args


def model_config(args, vocab_size):
    overrides = dict(image_mask_ratio=args.image_mask_ratio, text_mask_ratio=args.text_mask_ratio,
                     image_loss_weight=args.image_weight, text_loss_weight=args.text_weight,
                     norm_pix_loss=args.norm_pix, attn_impl=args.attn, vocab_size=vocab_size)
    for name in ("image_size", "patch_size", "text_len"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return make_config(args.preset, **overrides)


# -----------------------------------------------------------------------------
# optimisation pieces


def param_groups(model, weight_decay):
    """Decay Linear weights only. No decay on biases, LayerNorms, the text embedding table, CLS, type
    embeddings and mask tokens. (Official decays LayerNorm scales; mae decays CLS and mask tokens; we
    exempt both, the usual ViT practice.)"""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def lr_at(step, max_lr, warmup, total, min_lr=0.0):
    """Linear warmup from 0 over `warmup` steps, then half-cosine to min_lr at `total` (per step)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def train_flops_per_sample(c, with_text=True, with_image=True):
    """Analytic FLOPs of one training step per sample (forward x 3), counting a multiply-add as 2."""
    def transformer(n, d, depth):  # qkv 6nd^2 + proj 2nd^2 + mlp 16nd^2 (ratio 4) + attention 4n^2d
        return depth * (2 * n * d * d * (4 + 2 * c.mlp_ratio) + 4 * n * n * d)
    N, T = (c.num_patches if with_image else 0), (c.text_len if with_text else 0)
    n_enc = 1 + int(N * (1 - c.image_mask_ratio)) + int(T * (1 - c.text_mask_ratio))
    n_dec = 1 + N + T
    fwd = (2 * N * c.patch_dim * c.emb_dim + transformer(n_enc, c.emb_dim, c.depth)
           + 2 * n_enc * c.emb_dim * c.dec_emb_dim + transformer(n_dec, c.dec_emb_dim, c.dec_depth)
           + 2 * N * c.dec_emb_dim * c.patch_dim + 2 * T * c.dec_emb_dim * c.vocab_size)
    return 3 * fwd


# -----------------------------------------------------------------------------
# determinism and checkpoints


def mix_seed(*numbers):
    """A 63-bit seed from a few integers (SplitMix64-style mixing), e.g. (seed, epoch, index)."""
    x = 0
    for n in numbers:
        x = (x ^ (n + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) >> 1


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that sample (epoch, index) draws its augmentation from its own seed: what a
    sample looks like no longer depends on the worker, the rank or the resume point (exact resume)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]


def epoch_indices(n, batch_per_rank, rank, world, seed, epoch):
    """This rank's (epoch, index) keys for one epoch: one global permutation, whole global batches only
    (drop_last), sample i of global batch b goes to rank i // batch_per_rank, so the union over ranks of
    step b equals what one process with the global batch would see."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    perm = torch.randperm(n, generator=g).tolist()
    global_batch = batch_per_rank * world
    steps = n // global_batch
    keys = []
    for b in range(steps):
        start = b * global_batch + rank * batch_per_rank
        keys.extend((epoch, i) for i in perm[start : start + batch_per_rank])
    return keys, steps


def masking_noise(seed, step, global_batch, rows, num_patches, text_len):
    """Masking noise for rows `rows` (a slice) of global batch `step`: drawn for the whole global batch from
    (seed, step), so one process and N ranks (or any accumulation split) give each sample the same mask."""
    g = torch.Generator().manual_seed(mix_seed(seed, step, 1))
    image_noise = torch.rand(global_batch, num_patches, generator=g)[rows]
    text_noise = torch.rand(global_batch, text_len, generator=g)[rows]
    return image_noise, text_noise


def rng_state():
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    s["numpy"] = list(np.random.get_state())
    s["numpy"][1] = torch.from_numpy(s["numpy"][1].astype(np.int64))  # weights_only can load tensors, not arrays
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    numpy_state = list(s["numpy"])
    numpy_state[1] = numpy_state[1].numpy().astype(np.uint32)
    np.random.set_state(tuple(numpy_state))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_atomic(obj, path):
    """Write to a temp file in the same folder, fsync, then os.replace: a crash leaves the old file intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# data (data.py does the work; this picks the sources)


def build_data(args, image_size, text_len):
    """Returns (tokenizer, pretraining dataset, (probe train, probe test) or None). The pretraining dataset is
    map-style (built-in, CSV, plus text-file / image-dir extras: exact resume) or a stream (webdataset shards)."""
    if args.data == "builtin":
        pairs = builtin.Builtin("pretrain", args.train_size, image_size, seed=args.data_seed, level=args.data_level)
        mean, std = builtin.BUILTIN_MEAN, builtin.BUILTIN_STD
    elif args.data == "csv":
        pairs = data.CsvPairs(args.csv)
        mean, std = data.CC12M_MEAN, data.CC12M_STD
    else:
        pairs = data.WebDatasetShards(args.wds_shards)
        mean, std = data.CC12M_MEAN, data.CC12M_STD
    extras = ([data.TextLines(args.text_file)] if args.text_file else []) + (
        [data.ImageOnlyFolder(args.image_dir)] if args.image_dir else [])

    def captions():  # the tokenizer's training corpus: every caption the run will see
        yield from pairs.captions()
        for extra in extras:
            yield from extra.captions()

    tokenizer = get_tokenizer(args.tokenizer or os.path.join(args.out_dir, "tokenizer.model"), captions,
                                   args.vocab_size)
    if args.data == "builtin":
        # Built-in captions name positions ("top left"): a flip or a crop would make them wrong, and procedural
        # data never runs short of distinct images. So: normalise only.
        transform = data.EvalTransform(image_size, mean, std, crop_pct=1.0)
    else:
        transform = data.PretrainTransform(image_size, mean, std)  # RandomResizedCrop(0.2-1) + flip (official)
    if args.data == "wds":
        dataset = data.WebDatasetShards(args.wds_shards, tokenizer=tokenizer, text_len=text_len, transform=transform,
                                        paired_share=args.paired_share, seed=args.data_seed)
    else:
        # the paper's paired-share knob (section 4.1): a fraction of pairs stays paired, the rest is split
        roles = data.paired_share_roles(len(pairs), args.paired_share, args.data_seed)
        parts = [data.PairedDataset(pairs, tokenizer, text_len, transform, roles=roles)]
        parts += [data.PairedDataset(extra, tokenizer, text_len, transform) for extra in extras]
        dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    probe_sets = None
    if args.data == "builtin":
        evaluate = data.EvalTransform(image_size, mean, std, crop_pct=1.0)  # built-in images are already square
        probe_sets = tuple(
            data.LabelledDataset(builtin.Builtin(split, size, image_size, seed=args.data_seed, level=args.data_level),
                                 evaluate)
            for split, size in (("train", args.probe_train_size), ("test", args.probe_test_size)))
    return tokenizer, dataset, probe_sets


# -----------------------------------------------------------------------------
# the quick probe at the end of a run


def quick_probe(model, train_set, test_set, seed=0):
    """probe.py's fast mode with its defaults for the built-in data (frozen CLS features after the final norm,
    BatchNorm(affine=False) + Linear, LARS, 90 epochs, base lr 6.4), once per label of the built-in data (the
    main object's shape, then its colour) on the same features: {label: test top-1 in %}. The same numbers as
    `python probe.py --ckpt OUT_DIR/ckpt.pt --seed SEED [--label colour]` on the same image counts."""
    import probe  # here, not at the top: probe.py imports this file

    parser = argparse.ArgumentParser()
    probe.add_head_args(parser)  # the head recipe's defaults live in probe.py, once
    recipe = probe.head_recipe(parser.parse_args([], argparse.Namespace(train_dir=None)))
    xtr, _, _ = probe.extract_features(model, train_set)
    xte, _, _ = probe.extract_features(model, test_set)
    accs = {}
    for label in builtin.Builtin.LABELS:
        ytr, yte = (torch.tensor(s.source.labels(label)) for s in (train_set, test_set))
        num_classes = len(train_set.source.label_classes(label))
        head = probe.train_head_on_features(xtr, ytr, num_classes, seed=seed, **recipe)
        with torch.no_grad():
            accs[label] = probe.topk_accuracy(head(xte), yte, ks=(1,))[1]
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
    """text_grounding on the first n pairs of the built-in test split (what train.py prints at the end). From a
    checkpoint: model, ckpt = load_model(path); a = ckpt["args"]; builtin_text_grounding(model,
    Tokenizer(os.path.join(a["out_dir"], "tokenizer.model")), a["data_seed"], a["data_level"], a["seed"])."""
    c = model.config
    pairs = builtin.Builtin("test", n, c.image_size, seed=data_seed, level=level)
    evaluate = data.EvalTransform(c.image_size, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0)
    return text_grounding(model, data.PairedDataset(pairs, tokenizer, c.text_len, evaluate), seed=seed)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    # --- distributed set-up (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK) ---
    ddp = "RANK" in os.environ
    if ddp:
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    else:
        rank, world = 0, 1
    master = rank == 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype or ("bf16" if cuda else "fp32")]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    use_compile = cuda if args.compile is None else args.compile
    if args.batch_size % (world * args.grad_accum):
        sys.exit(f"--batch-size {args.batch_size} must divide by ranks x grad-accum = {world * args.grad_accum}")
    per_rank = args.batch_size // world  # samples per rank per optimizer step
    micro_batch = per_rank // args.grad_accum

    if args.bench:
        return bench(args, device, autocast, use_compile, micro_batch)

    # --- data, model, optimizer ---
    os.makedirs(args.out_dir, exist_ok=True)
    geometry = model_config(args, vocab_size=1)  # image size and text length before the tokenizer exists
    if ddp and not master:
        dist.barrier()  # rank 0 trains (or loads) the tokenizer first; the others then load its file
    tokenizer, dataset, probe_sets = build_data(args, geometry.image_size, geometry.text_len)
    if ddp and master:
        dist.barrier()
    config = model_config(args, tokenizer.vocab_size)
    torch.manual_seed(args.seed)  # the initial weights depend on --seed alone (the same on every rank)
    model = M3AE(config).to(device)
    if args.no_text:  # the MAE baseline never uses the text path: freeze it (DDP then expects no gradient)
        for name, p in model.named_parameters():
            if name.startswith(("text_", "enc_text", "dec_text")):
                p.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=0.0, betas=(0.9, args.beta2),
                                  fused=cuda)
    max_lr = args.base_lr * args.batch_size / 256  # the linear scaling rule (mae, official)
    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        if master:
            print(f"resumed from {ckpt_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    if master:
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump({"model": asdict(config), "args": vars(args), "world_size": world}, f, indent=2)
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.preset}: {n / 1e6:.2f}M parameters, {'MAE baseline (no text)' if args.no_text else 'M3AE'}, "
              f"global batch {args.batch_size} = {world} ranks x {args.grad_accum} accum x {micro_batch}, "
              f"lr {max_lr:.2e}, device {device}, autocast {dtype}, compile {use_compile}")
    raw_model = model
    if use_compile:
        model = torch.compile(model)
    if ddp:
        # unpaired data can leave one modality's parameters without a gradient on some rank
        model = DDP(model, device_ids=[device.index] if cuda else None,
                    find_unused_parameters=args.paired_share < 1 or bool(args.text_file or args.image_dir))

    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    if stream and not args.epoch_samples:
        sys.exit("--data wds needs --epoch-samples (a stream has no length)")
    seeded = None if stream else SeededSamples(dataset, args.seed)

    def epoch_batches(epoch, skip):
        """(iterator over this rank's micro-batches of `epoch`, after the first `skip` steps; steps in the epoch)."""
        loader_kw = dict(batch_size=micro_batch, collate_fn=data.collate, num_workers=args.workers,
                         pin_memory=cuda, drop_last=True)
        if stream:  # shards are split over ranks and workers by data.py; resume skips what was read

            def endless():  # a rank whose shards run short starts another pass, so every rank has `steps` steps
                for sweep in itertools.count():
                    dataset.set_epoch(mix_seed(epoch, sweep))
                    yield from torch.utils.data.DataLoader(dataset, **loader_kw)

            steps = args.epoch_samples // args.batch_size
            return itertools.islice(endless(), skip * args.grad_accum, None), steps
        keys, steps = epoch_indices(len(seeded), per_rank, rank, world, args.seed, epoch)
        loader = torch.utils.data.DataLoader(seeded, sampler=keys[skip * per_rank :], **loader_kw)
        return iter(loader), steps

    flops_per_sample = train_flops_per_sample(config, with_text=not args.no_text)
    log_file = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None
    skips = data.SkipLog()

    def save(path=ckpt_path):
        rng = [None] * world
        if ddp:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if master:
            save_atomic(checkpoint_dict(raw_model, optimizer=optimizer.state_dict(), step=step, epoch=epoch,
                                        batch_in_epoch=batch_in_epoch, rng=rng, args=vars(args)), path)

    def check_finite():
        """One host sync: stop, naming the first bad step, if any loss since the last check was not finite.
        Called before every save, so a checkpoint never holds weights updated by a non-finite loss."""
        if first_bad.item() >= 0:
            if log_file:
                log_file.close()
            raise FloatingPointError(f"non-finite loss at step {first_bad.item() + 1}; stopped. The last good "
                                     f"checkpoint (if any) is {ckpt_path}, written before that step")

    # --- the loop ---
    first_bad = torch.tensor(-1, device=device)  # index of the first step with a non-finite loss, kept on device
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    t_last, samples_since = time.perf_counter(), 0
    while step < args.steps:
        batches, steps_in_epoch = epoch_batches(epoch, batch_in_epoch)
        if steps_in_epoch == 0:
            sys.exit(f"the dataset ({len(dataset) if not stream else args.epoch_samples}) is smaller than one "
                     f"global batch ({args.batch_size})")
        while batch_in_epoch < steps_in_epoch and step < args.steps:
            lr = lr_at(step, max_lr, args.warmup_steps, args.steps, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = torch.zeros(3, device=device)  # loss, image loss, text loss (summed over micro-batches)
            for micro in range(args.grad_accum):
                batch = next(batches)
                skips.add(batch.pop("skipped"))
                weight = 1.0
                if len(batch["image"]) == 0:  # every sample was bad: a blank one with weight 0 keeps DDP in step
                    batch, weight = blank_batch(batch), 0.0
                start = rank * per_rank + micro * micro_batch  # this micro-batch's rows of the global batch
                rows = slice(start, start + len(batch["image"]))  # (a batch shrinks when bad samples are skipped)
                batch["image_noise"], batch["text_noise"] = masking_noise(
                    args.seed, step, args.batch_size, rows, config.num_patches, config.text_len)
                text_only = ~batch["has_image"]  # read on the host, before the copy: no device sync
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = nullcontext() if (not ddp or micro == args.grad_accum - 1) else model.no_sync()
                with sync, autocast:
                    out = forward_batch(model, batch, args.no_text, text_only)
                    loss = out["loss"] * (weight / args.grad_accum)
                loss.backward()
                parts += torch.stack([out["loss"], out["image_loss"], out["text_loss"]]).detach() * (weight / args.grad_accum)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else
                                                 float("inf"))
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(parts[0]), step, first_bad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_in_epoch += 1
            samples_since += args.batch_size
            bar.update(1)

            if step % args.log_every == 0 or step == args.steps:
                check_finite()
                if ddp:
                    dist.all_reduce(parts, op=dist.ReduceOp.AVG)
                if master:
                    dt = time.perf_counter() - t_last
                    rate = samples_since / dt
                    rec = dict(step=step, loss=parts[0].item(), image_loss=parts[1].item(),
                               text_loss=parts[2].item(), lr=lr, grad_norm=grad_norm.item(), images_per_s=rate)
                    if cuda:
                        rec["mfu"] = rate * flops_per_sample / (args.peak_tflops * 1e12 * world)
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img=f"{rec['image_loss']:.4f}",
                                    txt=f"{rec['text_loss']:.3f}", lr=f"{lr:.2e}", ips=f"{rate:.0f}",
                                    **({"mfu": f"{rec['mfu']:.1%}"} if cuda else {}))
                t_last, samples_since = time.perf_counter(), 0
            if step % args.save_every == 0 or step == args.steps or step == args.stop_after:
                check_finite()
                save()
            if step == args.stop_after:
                bar.close()
                if ddp:
                    dist.destroy_process_group()
                return None
        if batch_in_epoch >= steps_in_epoch:
            if master and skips.total():
                tqdm.write(f"epoch {epoch}: {skips.report()}")
            epoch, batch_in_epoch, skips = epoch + 1, 0, data.SkipLog()
    bar.close()

    # --- a quick look at what it learned ---
    result = None
    if master and args.probe and probe_sets is not None:
        accs = quick_probe(raw_model, *probe_sets, seed=args.seed)
        result = {"probe_top1": accs["shape"], "probe_top1_colour": accs["colour"], "steps": step,
                  "model": "MAE (no text)" if args.no_text else "M3AE"}
        print(f"quick linear probe (probe.py fast mode: frozen CLS, BatchNorm + Linear, LARS) top-1: main object's "
              f"shape {accs['shape']:.2f}% (10 classes), its colour {accs['colour']:.2f}% (11 classes)")
        if not args.no_text:
            own, other = builtin_text_grounding(raw_model, tokenizer, args.data_seed, args.data_level, args.seed)
            result.update(text_ce_own_image=own, text_ce_other_image=other)
            print(f"text grounding: masked-word cross-entropy {own:.3f} beside its own image, {other:.3f} beside "
                  f"another's (1000 held-out pairs; equal = the text ignores the image)")
        with open(os.path.join(args.out_dir, "probe.json"), "w") as f:
            json.dump(result, f)
    if log_file:
        log_file.close()
    if ddp:
        dist.destroy_process_group()
    return result


def blank_batch(empty):
    """One image-only sample of zeros shaped like the rows of `empty` (a batch whose samples were all skipped)."""
    blank = {k: torch.zeros((1, *v.shape[1:]), dtype=v.dtype) for k, v in empty.items()}
    blank["text_padding_mask"][:] = True
    blank["has_image"][:] = True
    return blank


def forward_batch(model, batch, no_text, text_only):
    """Paired and image-only samples go through one forward (an image-only sample is an all-padding caption),
    text-only samples through a second one with no image; their losses add (as official's unpaired text).
    text_only: host-side (B,) bool, so that splitting the batch needs no device sync."""
    if no_text:
        return model(batch["image"], image_noise=batch["image_noise"])
    if not text_only.any():
        return model(batch["image"], batch["text"], batch["text_padding_mask"], batch["image_noise"],
                     batch["text_noise"])
    device = batch["text"].device
    pick = lambda rows: {k: v[rows.nonzero().squeeze(1).to(device)] for k, v in batch.items()}
    outs = []
    if (~text_only).any():
        b = pick(~text_only)
        outs.append(model(b["image"], b["text"], b["text_padding_mask"], b["image_noise"], b["text_noise"]))
    b = pick(text_only)
    outs.append(model(None, b["text"], b["text_padding_mask"], text_noise=b["text_noise"]))
    return {k: sum(o[k] for o in outs) for k in ("loss", "image_loss", "text_loss")}


# -----------------------------------------------------------------------------


def bench(args, device, autocast, use_compile, micro_batch):
    """Time training steps on random tensors: images/s, step time, peak memory, MFU."""
    config = model_config(args, args.vocab_size)
    model = M3AE(config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=1e-4, betas=(0.9, args.beta2),
                                  fused=device.type == "cuda")
    step_model = torch.compile(model) if use_compile else model
    B = micro_batch
    images = torch.randn(B, 3, config.image_size, config.image_size, device=device)
    text = torch.randint(1, config.vocab_size, (B, config.text_len), device=device)
    text[:, config.text_len // 2 :] = 0  # half-length captions: the key-padding path is exercised
    pad = text == 0

    def one_step():
        with autocast:
            out = step_model(images, None if args.no_text else text, None if args.no_text else pad)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    for _ in range(3):  # warm-up (and compilation)
        one_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.bench_steps):
        one_step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.bench_steps
    rate = B / dt
    flops = train_flops_per_sample(config, with_text=not args.no_text) * rate
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "n/a (CPU)"
    print(f"bench: preset {args.preset}, batch {B}, attn {config.attn_impl}, compile {use_compile}, "
          f"{'image-only' if args.no_text else 'paired'}, device {device}")
    print(f"  step {dt * 1e3:.1f} ms | {rate:.1f} images/s | {flops / 1e12:.2f} TFLOP/s | "
          f"MFU {flops / (args.peak_tflops * 1e12):.1%} (peak {args.peak_tflops:.0f} TFLOP/s) | peak memory {mem}")
    return dict(step_ms=dt * 1e3, images_per_s=rate, tflops=flops / 1e12)


if __name__ == "__main__":
    main()
