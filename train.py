"""Pretrain M3AE (or its MAE baseline) — one flat loop, read top to bottom.

    python train.py                                   # tiny preset, built-in data, 2 CPU cores, minutes
    python train.py --no-text                         # the MAE baseline: same recipe, image-only mode
    python train.py --csv pairs.csv --preset base     # your image-caption pairs (header: filepath,caption)
    torchrun --nproc_per_node=8 train.py --preset base --wds-shards 'cc12m/{00000..01242}.tar' --epoch-samples 10000000
    python train.py --bench --preset base             # throughput on random tensors (images/s, MFU)

Recipe (paper section 4, official code): AdamW (0.9, 0.95), weight decay 0.05 on Linear weights only,
lr = base_lr x global_batch / 256, linear warmup then cosine decay per step, image/text mask 0.75/0.75,
loss 1.0 x MSE + 0.5 x CE. Every value is a flag (`--help`).

Determinism: each sample's augmentation is drawn from (seed, epoch, index) and each global batch's masking
noise from (seed, step), not from a process-wide stream, so a resumed run, a run on more ranks and a run with
more workers see the same samples with the same masks (map-style data; a webdataset stream resumes at the same
sample with fresh augmentation draws). OUT_DIR belongs to one run (rundir.py): --resume continues it, --overwrite
replaces it; checkpoints are verified before they replace the previous one.
"""

import argparse
import copy
import itertools
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tqdm import tqdm

import builtin
import data
import probe
import rundir
from model import M3AE, PRESETS, M3AEConfig, attention_impl, checkpoint_dict, make_config, num_kept
from tokenizer import MAX_TOKENIZER_CAPTIONS, get_tokenizer
from util import SeededSamples, checkpoint_tokenizer, lr_at, make_parser, masking_noise, mix_seed

# -----------------------------------------------------------------------------
# arguments


def default_workers():
    """DataLoader workers per rank: the CPUs this process may use, shared among the ranks of this node, one left
    for the training process itself; at least 1, at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, cpus // ranks_here - 1))


def build_parser():
    p = make_parser(__doc__, prog="train.py")
    a = p.add_argument
    # model
    a("--preset", default="tiny", choices=list(PRESETS), help="model size (model.py PRESETS)")
    a("--image-size", type=int, help="image side in pixels (default: the preset's)")
    a("--patch-size", type=int, help="patch side in pixels (default: the preset's)")
    a("--text-len", type=int, help="caption length in tokens (default: the preset's)")
    a("--image-mask-ratio", type=float, default=0.75, help="fraction of patches removed (the paper's)")
    a("--text-mask-ratio", type=float, default=0.75, help="fraction of text slots removed, padding counted")
    a("--image-weight", type=float, default=1.0, help="weight of the pixel MSE")
    a("--text-weight", type=float, default=0.5, help="weight of the text CE; 0 trains the MAE baseline like --no-text")
    a("--no-text", action="store_true", help="MAE baseline: image-only mode, captions never read")
    a("--norm-pix", action="store_true", help="per-patch normalised pixel targets (mae's norm_pix_loss)")
    a("--attn", default="auto", choices=["auto", "triton", "sdpa", "math"], help="attention implementation")
    # data: the source follows from what is given (--csv, --wds-shards; neither: the built-in demo set)
    a("--data", choices=["builtin", "csv", "wds"], help="pretraining data source (default: csv if --csv is given, "
      "wds if --wds-shards is, else builtin); a source that contradicts the other flags is refused")
    a("--csv", help="CSV/TSV of image paths (relative to the file) and captions")
    a("--csv-img-key", help="--csv: the image path column (default: the first of filepath, image, image_path, path, "
      "file, filename in the header)")
    a("--csv-caption-key", help="--csv: the caption column (default: the first of caption, text, title)")
    a("--csv-separator", help="--csv: the field separator (default: tab for .tsv/.tab, comma for .csv, else sniffed)")
    a("--wds-shards", help="webdataset .tar shards as img2dataset writes them: a brace pattern "
      "'dir/{00000..00099}.tar', a glob, or a comma-separated list")
    a("--wds-image-key", default="jpg;jpeg;png;webp", help="--wds-shards: member extensions that hold the image, "
      "first present wins")
    a("--wds-caption-key", default="txt;json", help="--wds-shards: member extensions that hold the caption (json: "
      "its 'caption' field), first present wins")
    a("--epoch-samples", type=int, help="--wds-shards: samples per epoch (a stream has no length)")
    a("--text-file", help="extra unpaired captions, one per line (text-only samples)")
    a("--image-dir", help="extra unpaired images, a folder read recursively (image-only samples)")
    a("--paired-share", type=float, default=1.0,
      help="fraction of pairs kept paired; the rest split half into unpaired images, half into unpaired texts")
    a("--data-seed", type=int, default=0, help="built-in data: which procedural dataset (kept fixed across --seed)")
    a("--data-level", default="easy", choices=list(builtin.LEVELS), help="built-in data: difficulty")
    a("--train-size", type=int, default=20000, help="built-in data: pretraining pairs")
    a("--init-from", help="start from these weights (a checkpoint of train.py or convert.py, e.g. the official "
      "release converted): its architecture and, unless --tokenizer is given, its tokenizer and normalisation")
    a("--tokenizer", help="a tokenizer file to use: sentencepiece .model or BERT vocab.txt (default: "
      "OUT_DIR/tokenizer.model, trained on the run's captions)")
    a("--vocab-size", type=int, default=1024, help="vocabulary when training a tokenizer")
    a("--tokenizer-captions", type=int, default=MAX_TOKENIZER_CAPTIONS,
      help="a tokenizer is trained on at most this many captions, the first ones the data yields")
    a("--workers", type=int, default=default_workers(), help="DataLoader workers per rank (default: this node's "
      "CPUs / ranks - 1)")
    # optimisation
    a("--batch-size", type=int, default=64, help="global batch (summed over ranks and accumulation steps)")
    a("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    a("--steps", type=int, default=1000, help="optimizer steps in total")
    a("--warmup-steps", type=int, default=50, help="linear warmup steps")
    a("--base-lr", type=float, help="peak lr = base_lr x global batch / 256 (default: 1.5e-4, the paper's; 6e-3 for "
      "the tiny preset, whose 1000 CPU steps at batch 64 need a larger step: docs/log.md)")
    a("--lr", type=float, help="absolute peak lr (instead of --base-lr)")
    a("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay on Linear weights (see param_groups)")
    a("--beta2", type=float, default=0.95, help="AdamW beta2 (beta1 is 0.9)")
    a("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = no clipping (official)")
    a("--seed", type=int, default=0, help="initial weights, data order, augmentation and masks")
    # systems
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    a("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    a("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16 dense: 989)")
    # bookkeeping
    a("--out-dir", default="runs/default", help="checkpoints, tokenizer, config.json and log.jsonl go here: one run")
    a("--resume", action="store_true", help="continue the run in OUT_DIR (flags not repeated come from the run)")
    a("--overwrite", action="store_true", help="delete the run in OUT_DIR and start afresh")
    a("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    a("--log-every", type=int, default=25, help="log and check for non-finite loss and gradients every N steps")
    a("--stop-after", type=int, help="save and exit after this step (simulates an interruption)")
    a("--probe", action=argparse.BooleanOptionalAction, default=True, help="built-in data: quick probe at the end")
    a("--probe-train-size", type=int, default=5000, help="built-in data: labelled images to fit the quick probe")
    a("--probe-test-size", type=int, default=2000, help="built-in data: labelled images to score it")
    a("--bench", action="store_true", help="time --bench-steps steps on random tensors and exit")
    a("--bench-steps", type=int, default=20, help="--bench: timed steps (after 3 warm-up steps)")
    a("--heads", default="auto", choices=["auto", "all", "removed"], help="the output heads on every token, or only "
      "on the removed tokens the loss reads (M3AE.forward(predictions=False): the same loss, less work); auto = "
      "removed on CUDA, all on CPU (where the other float summation order would change the demo's numbers)")
    a("--profile", action="store_true", help="--bench: then profile min(5, --bench-steps) more steps with "
      "torch.profiler and print where a step's time goes, by op class (GPU time on CUDA, CPU time on CPU)")
    return p


def given_flags(p, argv):
    """The dest names of the flags present on the command line (the rest took their defaults)."""
    probe_parser = copy.deepcopy(p)
    for action in probe_parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe_parser.parse_known_args(argv)[0]))


def get_args(argv=None):
    """Parse, then check every value, path and combination before any work: one line naming the flag, exit 2."""
    p = build_parser()
    args = p.parse_args(argv)
    args.given = sorted(given_flags(p, argv if argv is not None else sys.argv[1:]))
    if args.resume and not args.bench:  # flags the user did not repeat come from the run (rundir.merge_resume_args)
        recorded = rundir.recorded_args(args.out_dir)
        if recorded is not None:
            try:
                args.resume_notes = rundir.merge_resume_args(args, set(args.given), recorded)
            except rundir.RunDirError as e:
                p.error(str(e))
            if "lr" in args.given or "base_lr" in args.given:  # one of the two sets the peak: the new one wins
                args.base_lr, args.lr = (None, args.lr) if "lr" in args.given else (args.base_lr, None)
    check_args(p, args)
    return args


def check_args(p, args):
    def bad(flag, value, valid):
        p.error(f"argument --{flag}: {value!r} {valid}")

    for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("log_every", 1), ("save_every", 1),
                      ("warmup_steps", 0), ("workers", 0), ("train_size", 1), ("vocab_size", 8),
                      ("tokenizer_captions", 1), ("probe_train_size", 2), ("probe_test_size", 1), ("bench_steps", 1)):
        if getattr(args, name) < low:
            bad(name.replace("_", "-"), getattr(args, name), f"must be >= {low}")
    for name in ("image_size", "patch_size", "text_len", "epoch_samples", "stop_after"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            bad(name.replace("_", "-"), getattr(args, name), "must be >= 1")
    for name in ("image_mask_ratio", "text_mask_ratio"):
        if not 0.0 <= getattr(args, name) < 1.0:
            bad(name.replace("_", "-"), getattr(args, name), "must be in [0, 1): the fraction removed")
    for name in ("image_weight", "text_weight", "weight_decay", "clip_grad", "min_lr"):
        if not getattr(args, name) >= 0.0:
            bad(name.replace("_", "-"), getattr(args, name), "must be >= 0")
    if not 0.0 <= args.paired_share <= 1.0:
        bad("paired-share", args.paired_share, "must be in [0, 1]")
    if not 0.0 <= args.beta2 < 1.0:
        bad("beta2", args.beta2, "must be in [0, 1)")
    for name in ("base_lr", "lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            bad(name.replace("_", "-"), getattr(args, name), "must be > 0")
    if args.base_lr is not None and args.lr is not None:
        p.error("argument --lr: give --lr (absolute) or --base-lr (scaled by batch / 256), not both")
    if args.image_weight == 0 and (args.text_weight == 0 or args.no_text):
        p.error("argument --image-weight: 0 with no text loss leaves nothing to train")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group is joined later
    if args.batch_size % (world * args.grad_accum):
        bad("batch-size", args.batch_size, f"must divide by ranks x --grad-accum = {world} x {args.grad_accum}")
    if args.profile and not args.bench:
        p.error("argument --profile: only with --bench")
    if args.stop_after is not None and args.stop_after > args.steps:
        bad("stop-after", args.stop_after, f"is past --steps {args.steps}")
    # devices
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        bad("device", args.device, "needs a CUDA GPU and none is visible (use --device cpu)")
    if args.compile and not args.device.startswith("cuda") and not args.bench:
        pass  # torch.compile on CPU works (slowly); nothing to refuse
    # the data source follows from the flags; a contradiction is refused
    inferred = "csv" if args.csv else ("wds" if args.wds_shards else "builtin")
    if args.csv and args.wds_shards:
        p.error("argument --csv: give --csv or --wds-shards, not both")
    if args.data is None:
        args.data = inferred
    elif args.data != inferred:
        need = {"csv": "--csv FILE", "wds": "--wds-shards PATTERN", "builtin": "neither --csv nor --wds-shards"}
        p.error(f"argument --data: {args.data!r} needs {need[args.data]}" + (
            f" (got {'--csv' if args.csv else '--wds-shards'})" if inferred != "builtin" else ""))
    if args.data != "csv":
        for name in ("csv_img_key", "csv_caption_key", "csv_separator"):
            if getattr(args, name) is not None:
                p.error(f"argument --{name.replace('_', '-')}: only with --csv")
    if args.data == "wds" and not args.epoch_samples:
        p.error("argument --epoch-samples: --wds-shards needs it (samples per epoch: a stream has no length)")
    if args.data != "wds" and args.epoch_samples:
        p.error("argument --epoch-samples: only with --wds-shards (other sources have a length)")
    # paths, before any work
    if args.init_from:
        clash = [f for f in ("preset", "image_size", "patch_size", "text_len") if f in args.given]
        if clash:
            p.error(f"argument --{clash[0].replace('_', '-')}: the architecture comes from --init-from")
        if args.resume:
            p.error("argument --init-from: a resumed run continues from its own checkpoint; drop --init-from")
    for flag, path, kind in (("init-from", args.init_from, "file"), ("csv", args.csv, "file"),
                             ("text-file", args.text_file, "file"), ("tokenizer", args.tokenizer, "file"),
                             ("image-dir", args.image_dir, "folder")):
        if path and not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
            bad(flag, path, f"is not a {kind}")
    if args.data == "wds":
        try:
            data.expand_shards(args.wds_shards)  # refuses a pattern that matches nothing, and missing files
        except ValueError as e:
            bad("wds-shards", args.wds_shards, f"cannot be read: {e}")
    # legal but almost surely unintended: one line each
    if args.warmup_steps >= args.steps:
        print(f"warning: --warmup-steps {args.warmup_steps} >= --steps {args.steps}: the lr never leaves warmup")
    if args.data == "wds" and args.epoch_samples < args.batch_size // world * max(args.workers, 1):
        print(f"warning: --epoch-samples {args.epoch_samples} is less than one micro-batch for each of the "
              f"{max(args.workers, 1)} worker(s) of {world} rank(s): each epoch ends before every worker delivers")
    if args.image_mask_ratio == 0 and (args.text_mask_ratio == 0 or args.no_text):
        print("warning: nothing is masked (--image-mask-ratio 0, no text masking): the loss is over no token")

    if args.base_lr is None and args.lr is None:
        # tiny: peak lr 1.5e-3 at batch 64. Measured on the built-in data (docs/log.md): at base 1.5e-3 the text
        # barely learned to read the image in 1000 steps; at 6e-3 it does, and the colour probe shows it
        args.base_lr = 6e-3 if args.preset == "tiny" else 1.5e-4
    if args.text_weight == 0:
        args.no_text = True  # a zero text weight is the MAE baseline: don't feed captions the loss ignores
    c = model_config(args, vocab_size=1)
    if c.image_size % c.patch_size:
        p.error(f"argument --image-size: {c.image_size} is not a multiple of the patch size {c.patch_size}")


def model_config(args, vocab_size, init_config=None):
    """The preset with the flags' geometry, or with --init-from the initial checkpoint's architecture; the masking
    and loss flags apply to both."""
    overrides = dict(image_mask_ratio=args.image_mask_ratio, text_mask_ratio=args.text_mask_ratio,
                     image_loss_weight=args.image_weight, text_loss_weight=args.text_weight,
                     norm_pix_loss=args.norm_pix, attn_impl=args.attn, vocab_size=vocab_size)
    if init_config is not None:
        return M3AEConfig(**{**init_config, **overrides})
    for name in ("image_size", "patch_size", "text_len"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return make_config(args.preset, **overrides)


def load_init(args, write=True):
    """--init-from: the checkpoint to start from (e.g. the official weights through convert.py), and the tokenizer
    it brings (--tokenizer wins), written into OUT_DIR so that a --resume finds it. Returns the checkpoint."""
    try:
        init = torch.load(args.init_from, map_location="cpu", weights_only=True)
        tok = checkpoint_tokenizer(init, args.init_from, args.tokenizer)  # refuses one larger than the model's
        if not args.tokenizer:
            name = rundir.TOKENIZER if tok.kind == "sentencepiece" else "vocab.txt"
            args.tokenizer = os.path.join(args.out_dir, name)
            if write:  # rank 0 only; the other ranks read it after the barrier
                with open(args.tokenizer, "wb") as f:
                    f.write(tok.to_bytes())
    except Exception as e:
        build_parser().error(f"argument --init-from: {args.init_from}: {str(e).splitlines()[0] if str(e) else e!r}")
    return init


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


def train_flops_per_sample(c, with_text=True, with_image=True, predictions=True):
    """Analytic FLOPs of one training step per sample, counting a multiply-add as 2: the matrix products only
    (layer norms, softmax, element-wise work and the optimizer are not counted), dense (padding and padded keys
    count). Each forward product has two in the backward (input and weight gradients), so a step is 3x the
    forward, less one product for the patch embedding, whose input (the pixels) needs no gradient.
    predictions=False: the heads only on the removed tokens (M3AE.forward(predictions=False)).
    Equal to torch.utils.flop_counter's count of a step with attn "math" (tests/test_bench.py)."""
    def transformer(n, d, depth):  # qkv 6nd^2 + proj 2nd^2 + mlp 4nd*hidden + attention 4n^2d (q k^T, p v)
        return depth * (8 * n * d * d + 4 * n * d * int(d * c.mlp_ratio) + 4 * n * n * d)
    N, T = (c.num_patches if with_image else 0), (c.text_len if with_text else 0)
    kept_img, kept_txt = num_kept(N, c.image_mask_ratio), num_kept(T, c.text_mask_ratio)
    n_enc, n_dec = 1 + kept_img + kept_txt, 1 + N + T
    head_img, head_txt = (N, T) if predictions else (N - kept_img, T - kept_txt)
    patch_embed = 2 * N * c.patch_dim * c.emb_dim
    fwd = (patch_embed + transformer(n_enc, c.emb_dim, c.depth)
           + 2 * n_enc * c.emb_dim * c.dec_emb_dim + transformer(n_dec, c.dec_emb_dim, c.dec_depth)
           + 2 * head_img * c.dec_emb_dim * c.patch_dim + 2 * head_txt * c.dec_emb_dim * c.vocab_size)
    return 3 * fwd - patch_embed


# -----------------------------------------------------------------------------
# distributed set-up, determinism and checkpoints


@dataclass
class Env:
    """Where this process runs: rank among `world` (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK), its device, and
    the autocast context and compile choice that follow from it."""
    rank: int
    world: int
    device: torch.device
    autocast: object
    compile: bool

    @property
    def ddp(self):
        return self.world > 1 or "RANK" in os.environ

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.type == "cuda"


def setup(device, dtype=None, compile=None):
    """Join the torchrun process group if there is one; pick the device, the autocast dtype (bf16 on CUDA) and
    torch.compile (on CUDA) unless told otherwise."""
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": None}[dtype or ("bf16" if cuda else "fp32")]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return Env(rank, world, device, autocast, cuda if compile is None else compile)


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


class EpochKeys(torch.utils.data.Sampler):
    """The sampler of the run's one map-style DataLoader: the (epoch, index) keys of the current epoch, set before
    each pass, so that the loader and its workers live across epochs (persistent_workers)."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def make_loader(dataset, micro_batch, workers, env, seed):
    """One DataLoader for the whole run, its workers kept alive across epochs: a new loader per epoch would start
    every worker again at each boundary (and re-open the shards). Map-style data goes through SeededSamples and
    EpochKeys; a stream (webdataset) takes its epoch through set_epoch, which reaches live workers."""
    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    if stream and workers > len(dataset.shards) // env.world:
        # fewer shards than (rank, worker) slots: the short slots would read every shard for their share of samples
        fit = len(dataset.shards) // env.world
        if env.master:
            print(f"note: {len(dataset.shards)} shard(s) for {env.world} rank(s) x {workers} workers: using {fit} "
                  f"worker(s) per rank, so that each reads its own shards")
        workers = fit
    return torch.utils.data.DataLoader(dataset if stream else SeededSamples(dataset, seed),
                                       sampler=None if stream else EpochKeys(), batch_size=micro_batch,
                                       collate_fn=data.collate, num_workers=workers, pin_memory=env.cuda,
                                       drop_last=True, persistent_workers=workers > 0)


def epoch_batches(loader, epoch, skip, per_rank, env, seed, epoch_samples=None, global_batch=None, grad_accum=1):
    """(iterator over this rank's micro-batches of `epoch`, after its first `skip` steps; steps in the epoch).
    Map-style data: a seeded permutation (epoch_indices). A stream (webdataset): data.py splits the shards over
    ranks and workers, a rank whose shards run short starts another pass, a resume skips what was read, and a
    pass that yields no batch at all is an error, never an endless loop."""
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):

        def endless():
            for sweep in itertools.count():
                dataset.set_epoch(mix_seed(epoch, sweep))
                batches = 0
                for batch in loader:
                    batches += 1
                    yield batch
                if batches == 0:
                    raise RuntimeError(
                        f"a pass over {len(dataset.shards)} shard(s) gave no batch of {loader.batch_size} on rank "
                        f"{env.rank} ({env.world} rank(s) x {max(loader.num_workers, 1)} loader(s) each): every shard "
                        f"is empty or unreadable, or each worker reads fewer than {loader.batch_size} usable samples "
                        f"(drop_last); use fewer --workers, a smaller --batch-size or more shards")

        return itertools.islice(endless(), skip * grad_accum, None), epoch_samples // global_batch
    keys, steps = epoch_indices(len(dataset), per_rank, env.rank, env.world, seed, epoch)
    loader.sampler.keys = keys[skip * per_rank :]
    return iter(loader), steps


def global_masking_noise(seed, step, global_batch, rows, num_patches, text_len):
    """Masking noise for rows `rows` (a slice) of global batch `step`: drawn for the whole global batch from
    (seed, step), so one process and N ranks (or any accumulation split) give each sample the same mask."""
    image_noise, text_noise = masking_noise(mix_seed(seed, step, 1), global_batch, num_patches, text_len)
    return image_noise[rows], text_noise[rows]


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


def save_checkpoint(model, optimizer, progress, env, args, extra):
    """Every rank's RNG state is gathered (a collective: all ranks call this); rank 0 writes (rundir.save_checkpoint:
    verified, the previous one kept, never with non-finite values)."""
    rng = [None] * env.world
    if env.ddp:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    if env.master:
        rundir.save_checkpoint(checkpoint_dict(model, optimizer=optimizer.state_dict(), rng=rng, args=run_args(args),
                                               **progress, **extra), args.out_dir)


def run_args(args):
    """The flags a checkpoint and config.json record (what a --resume takes back), without per-invocation notes."""
    return {k: v for k, v in vars(args).items() if k not in ("given", "resume_notes")}


# -----------------------------------------------------------------------------
# data (data.py does the work; this picks the sources)


def build_data(args, image_size, text_len, norm=None):
    """Returns (tokenizer, pretraining dataset, (probe train, probe test) or None, (mean, std)). The pretraining
    dataset is map-style (built-in, CSV, plus text-file / image-dir extras: exact resume) or a stream (webdataset
    shards). A source that cannot be read ends the run here with one line naming it."""
    flag = "csv" if args.data == "csv" else "wds-shards"
    keys = dict(image_keys=args.wds_image_key.split(";"), caption_keys=args.wds_caption_key.split(";"))
    try:
        if args.data == "builtin":
            pairs = builtin.Builtin("pretrain", args.train_size, image_size, seed=args.data_seed, level=args.data_level)
            mean, std = builtin.BUILTIN_MEAN, builtin.BUILTIN_STD
        elif args.data == "csv":
            pairs = data.CsvPairs(args.csv, args.csv_img_key, args.csv_caption_key, args.csv_separator)
            mean, std = data.CC12M_MEAN, data.CC12M_STD
        else:
            pairs = data.WebDatasetShards(args.wds_shards, **keys)
            mean, std = data.CC12M_MEAN, data.CC12M_STD
        flag = "text-file"
        extras = [data.TextLines(args.text_file)] if args.text_file else []
        flag = "image-dir"
        extras += [data.ImageOnlyFolder(args.image_dir)] if args.image_dir else []
    except ValueError as e:
        build_parser().error(f"argument --{flag}: {e}")
    if norm is not None:  # --init-from: the normalisation the initial weights were trained with
        mean, std = norm

    def captions():  # the tokenizer's training corpus: the first --tokenizer-captions captions the run will see
        corpus = itertools.chain(pairs.captions(), *(extra.captions() for extra in extras))
        total = min(args.tokenizer_captions, len(pairs) + sum(map(len, extras))) if args.data != "wds" else None
        yield from tqdm(itertools.islice(corpus, args.tokenizer_captions), total=total or args.tokenizer_captions,
                        desc="tokenizer corpus", unit=" captions", leave=False, mininterval=1.0)

    tokenizer = get_tokenizer(args.tokenizer or os.path.join(args.out_dir, rundir.TOKENIZER), captions,
                              args.vocab_size)
    if args.data == "builtin":
        # Built-in captions name positions ("top left"): a flip or a crop would make them wrong, and procedural
        # data never runs short of distinct images. So: normalise only.
        transform = data.EvalTransform(image_size, mean, std, crop_pct=1.0)
    else:
        transform = data.PretrainTransform(image_size, mean, std)  # RandomResizedCrop(0.2-1) + flip (official)
    if args.data == "wds":
        dataset = data.WebDatasetShards(args.wds_shards, tokenizer=tokenizer, text_len=text_len, transform=transform,
                                        paired_share=args.paired_share, seed=args.data_seed, **keys)
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
    return tokenizer, dataset, probe_sets, (mean, std)


# -----------------------------------------------------------------------------
# one optimizer step


def blank_batch(empty):
    """One image-only sample of zeros shaped like the rows of `empty` (a batch whose samples were all skipped)."""
    blank = {k: torch.zeros((1, *v.shape[1:]), dtype=v.dtype) for k, v in empty.items()}
    blank["text_padding_mask"][:] = True
    blank["has_image"][:] = True
    return blank


def heads_all(args, env):
    """--heads: True = the output heads run on every token (predictions returned), False = on the removed ones."""
    return args.heads == "all" or (args.heads == "auto" and not env.cuda)


def forward_batch(model, batch, no_text, text_only, predictions=True):
    """Paired and image-only samples go through one forward (an image-only sample is an all-padding caption),
    text-only samples through a second one with no image; their losses add (as official's unpaired text).
    text_only: host-side (B,) bool, so that splitting the batch needs no device sync."""
    if no_text:
        return model(batch["image"], image_noise=batch["image_noise"], predictions=predictions)
    if not text_only.any():
        return model(batch["image"], batch["text"], batch["text_padding_mask"], batch["image_noise"],
                     batch["text_noise"], predictions=predictions)
    device = batch["text"].device
    pick = lambda rows: {k: v[rows.nonzero().squeeze(1).to(device)] for k, v in batch.items()}
    outs = []
    if (~text_only).any():
        b = pick(~text_only)
        outs.append(model(b["image"], b["text"], b["text_padding_mask"], b["image_noise"], b["text_noise"],
                          predictions=predictions))
    b = pick(text_only)
    outs.append(model(None, b["text"], b["text_padding_mask"], text_noise=b["text_noise"], predictions=predictions))
    return {k: sum(o[k] for o in outs) for k in ("loss", "image_loss", "text_loss")}


def train_step(model, optimizer, batches, step, lr, env, args, config, skips):
    """One optimizer step over args.grad_accum micro-batches of this rank. Returns (loss parts (3,) on the
    device: loss, image loss, text loss, averaged over micro-batches; the gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    per_rank = args.batch_size // env.world
    micro_batch = per_rank // args.grad_accum
    parts = torch.zeros(3, device=env.device)
    for micro in range(args.grad_accum):
        batch = next(batches)
        skips.add(batch.pop("skipped"))
        weight = 1.0
        if len(batch["image"]) == 0:  # every sample was bad: a blank one with weight 0 keeps DDP in step
            batch, weight = blank_batch(batch), 0.0
        start = env.rank * per_rank + micro * micro_batch  # this micro-batch's rows of the global batch
        rows = slice(start, start + len(batch["image"]))  # (a batch shrinks when bad samples are skipped)
        batch["image_noise"], batch["text_noise"] = global_masking_noise(
            args.seed, step, args.batch_size, rows, config.num_patches, config.text_len)
        text_only = ~batch["has_image"]  # read on the host, before the copy: no device sync
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        sync = nullcontext() if (not env.ddp or micro == args.grad_accum - 1) else model.no_sync()
        with sync, env.autocast:
            out = forward_batch(model, batch, args.no_text, text_only, heads_all(args, env))
            loss = out["loss"] * (weight / args.grad_accum)
        loss.backward()
        parts += torch.stack([out["loss"], out["image_loss"], out["text_loss"]]).detach() * (weight / args.grad_accum)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts, grad_norm


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    env = setup(args.device, args.dtype, args.compile)
    per_rank = args.batch_size // env.world  # samples per rank per optimizer step
    micro_batch = per_rank // args.grad_accum
    if args.bench:
        return bench(args, env, micro_batch)

    # --- the out-dir is this run's (rank 0 holds its lock), then the tokenizer and the data ---
    lock = claim_out_dir(args) if env.master else None
    if env.ddp and not env.master:
        dist.barrier()  # rank 0 trains (or loads) the tokenizer first; the others then load its file
    init = load_init(args, write=env.master) if args.init_from else None
    init_config = init["config"] if init else None
    init_norm = (tuple(init["data"]["mean"]), tuple(init["data"]["std"])) if init and "data" in init else None
    geometry = model_config(args, 1, init_config)  # image size and text length before the tokenizer exists
    tokenizer, dataset, probe_sets, norm = build_data(args, geometry.image_size, geometry.text_len, init_norm)
    if env.ddp and env.master:
        dist.barrier()
    fingerprint = run_fingerprint(args) if env.master else None  # read once, by rank 0, which checks and saves it

    # --- model and optimizer; the initial weights depend on --seed alone (the same on every rank) ---
    config = model_config(args, init_config["vocab_size"] if init else tokenizer.vocab_size, init_config)
    torch.manual_seed(args.seed)
    model = M3AE(config).to(env.device)
    if init:
        model.load_state_dict(init["model"])
    if args.no_text:  # the MAE baseline never uses the text path: freeze it (DDP then expects no gradient)
        for name, p in model.named_parameters():
            if name.startswith(("text_", "enc_text", "dec_text")):
                p.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=0.0, betas=(0.9, args.beta2),
                                  fused=env.cuda)
    max_lr = args.lr if args.lr is not None else args.base_lr * args.batch_size / 256  # linear scaling (mae, official)

    # --- resume: the newest readable checkpoint, the run's data unchanged, the log without replayed steps ---
    progress = dict(step=0, epoch=0, batch_in_epoch=0)
    if args.resume:
        ckpt, name = rundir.load_checkpoint(args.out_dir, map_location=env.device, set_aside=env.master)
        if ckpt is not None:
            if env.master:
                rundir.check_fingerprint(ckpt.get("fingerprint", fingerprint), fingerprint)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            progress = {k: ckpt[k] for k in progress}
            if len(ckpt["rng"]) == env.world:
                set_rng_state(ckpt["rng"][env.rank])
        if env.master:
            rundir.trim_log(args.out_dir, progress["step"])
            print(f"resumed from {name} at step {progress['step']} (epoch {progress['epoch']}, batch "
                  f"{progress['batch_in_epoch']})" if ckpt else f"--resume: no checkpoint in {args.out_dir} yet, "
                  "starting at step 0", *[f"; {n}" for n in getattr(args, "resume_notes", [])])
    if env.master:
        with open(os.path.join(args.out_dir, rundir.CONFIG), "w") as f:
            json.dump({"model": asdict(config), "args": run_args(args), "world_size": env.world,
                       "fingerprint": fingerprint}, f, indent=2)
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.preset}: {n / 1e6:.2f}M parameters, {'MAE baseline (no text)' if args.no_text else 'M3AE'}, "
              f"data {args.data}, global batch {args.batch_size} = {env.world} ranks x {args.grad_accum} accum x "
              f"{micro_batch}, lr {max_lr:.2e}, device {env.device}, autocast "
              f"{args.dtype or ('bf16' if env.cuda else 'fp32')}, compile {env.compile}, workers {args.workers}")

    # --- compile and DDP wrap the model the loop steps; `model` stays the plain module we save ---
    step_model = torch.compile(model) if env.compile else model
    if env.ddp:
        # unpaired data can leave one modality's parameters without a gradient on some rank
        step_model = DDP(step_model, device_ids=[env.device.index] if env.cuda else None,
                         find_unused_parameters=args.paired_share < 1 or bool(args.text_file or args.image_dir))

    # --- the loop; what a checkpoint carries besides weights and progress: how to read data for this encoder ---
    extra = dict(fingerprint=fingerprint, data={"mean": list(norm[0]), "std": list(norm[1]), "source": args.data},
                 tokenizer={"kind": tokenizer.kind, "blob": tokenizer.to_bytes()})
    finished = loop(step_model, model, optimizer, dataset, progress, max_lr, env, args, config, micro_batch,
                    per_rank, extra)

    # --- a quick look at what it learned (built-in data) ---
    result = None
    if finished and env.master and args.probe and probe_sets is not None:
        result = end_of_run_check(model, tokenizer, probe_sets, args, progress["step"])
    if env.ddp:
        # Leave together: rank 0 may still be writing the last checkpoint or probing, and a gloo rank that tears
        # its process group down while a peer is busy can abort at exit (SIGABRT seen once in CI). The DDP wrapper
        # holds the process group too, so it goes first.
        dist.barrier()
        del step_model
        dist.destroy_process_group()
    if lock:
        lock.close()
    return result


def claim_out_dir(args):
    """rundir.claim, its refusal as a one-line error (exit 2)."""
    try:
        return rundir.claim(args.out_dir, args.resume, args.overwrite)
    except rundir.RunDirError as e:
        build_parser().error(str(e))


def run_fingerprint(args):
    """What the run reads (rundir.data_fingerprint): the CSV or shards, the extras, the tokenizer file."""
    shards = data.expand_shards(args.wds_shards) if args.data == "wds" else []
    tokenizer = args.tokenizer or os.path.join(args.out_dir, rundir.TOKENIZER)
    return rundir.data_fingerprint(files=[args.csv, args.text_file, tokenizer], shards=shards, folders=[args.image_dir])


def loop(step_model, model, optimizer, dataset, progress, max_lr, env, args, config, micro_batch, per_rank, extra):
    """Train from `progress` (step, epoch, batch_in_epoch; updated in place) to args.steps. Logs every
    --log-every steps, saves every --save-every. Returns False when --stop-after ended it early.
    Non-finite values: each step marks, on the device, whether its loss and gradient norm were finite; the mark
    is read at every log and before every save (no extra host sync), so the run stops at most --log-every steps
    after a bad step, before any save, and the checkpoint it names holds the last good weights."""
    flops_per_sample = train_flops_per_sample(config, with_text=not args.no_text)
    loader = make_loader(dataset, micro_batch, args.workers, env, args.seed)
    log_file = open(os.path.join(args.out_dir, rundir.LOG), "a") if env.master else None
    skips = data.SkipLog()
    first_bad = torch.tensor(-1, device=env.device)  # index of the first step with a non-finite loss or gradient
    saved = {"step": progress["step"] if args.resume else None}

    def check_finite():
        if first_bad.item() >= 0:
            if log_file:
                log_file.close()
            good = (f"{os.path.join(args.out_dir, rundir.CKPT)} (step {saved['step']})" if saved["step"] is not None
                    else "none: no checkpoint was written before it")
            raise FloatingPointError(f"non-finite loss or gradient norm at step {first_bad.item() + 1}; stopped "
                                     f"without saving. The last good checkpoint is {good}")

    bar = tqdm(total=args.steps, initial=progress["step"], disable=not env.master, dynamic_ncols=True)
    t_last, samples_since = time.perf_counter(), 0
    while progress["step"] < args.steps:
        batches, steps_in_epoch = epoch_batches(loader, progress["epoch"], progress["batch_in_epoch"], per_rank, env,
                                                args.seed, args.epoch_samples, args.batch_size, args.grad_accum)
        if steps_in_epoch == 0:
            sys.exit(f"train.py: error: the dataset ({args.epoch_samples if args.epoch_samples else len(dataset)} "
                     f"samples) is smaller than one global batch ({args.batch_size})")
        while progress["batch_in_epoch"] < steps_in_epoch and progress["step"] < args.steps:
            step = progress["step"]
            lr = lr_at(step, max_lr, args.warmup_steps, args.steps, args.min_lr)
            parts, grad_norm = train_step(step_model, optimizer, batches, step, lr, env, args, config, skips)
            finite = torch.isfinite(parts[0]) & torch.isfinite(grad_norm)
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            step = progress["step"] = step + 1
            progress["batch_in_epoch"] += 1
            samples_since += args.batch_size
            bar.update(1)

            if step % args.log_every == 0 or step == args.steps:
                check_finite()
                if env.ddp:
                    dist.all_reduce(parts, op=dist.ReduceOp.AVG)
                if env.master:
                    rate = samples_since / (time.perf_counter() - t_last)
                    rec = dict(step=step, loss=parts[0].item(), image_loss=parts[1].item(),
                               text_loss=parts[2].item(), lr=lr, grad_norm=grad_norm.item(), images_per_s=rate)
                    if env.cuda:
                        rec["mfu"] = rate * flops_per_sample / (args.peak_tflops * 1e12 * env.world)
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img=f"{rec['image_loss']:.4f}",
                                    txt=f"{rec['text_loss']:.3f}", lr=f"{lr:.2e}", ips=f"{rate:.0f}",
                                    **({"mfu": f"{rec['mfu']:.1%}"} if env.cuda else {}))
                t_last, samples_since = time.perf_counter(), 0
            if step % args.save_every == 0 or step == args.steps or step == args.stop_after:
                check_finite()
                save_checkpoint(model, optimizer, progress, env, args, extra)
                saved["step"] = step
            if step == args.stop_after:
                bar.close()
                if log_file:
                    log_file.close()
                return False
        if progress["batch_in_epoch"] >= steps_in_epoch:
            if env.master and skips.total():
                tqdm.write(f"epoch {progress['epoch']}: {skips.report()}")
            progress["epoch"], progress["batch_in_epoch"], skips = progress["epoch"] + 1, 0, data.SkipLog()
    bar.close()
    if log_file:
        log_file.close()
    return True


def end_of_run_check(model, tokenizer, probe_sets, args, step):
    """The built-in data's quick probe (probe.py's fast mode, both labels) and the text-grounding check; printed
    and written to OUT_DIR/probe.json."""
    accs = probe.quick_probe(model, *probe_sets, seed=args.seed)
    result = {"probe_top1": accs["shape"], "probe_top1_colour": accs["colour"], "steps": step,
              "model": "MAE (no text)" if args.no_text else "M3AE"}
    print(f"quick linear probe (probe.py fast mode: frozen CLS, BatchNorm + Linear, LARS) top-1: main object's "
          f"shape {accs['shape']:.2f}% (10 classes), its colour {accs['colour']:.2f}% (11 classes)")
    if not args.no_text:
        own, other = probe.builtin_text_grounding(model, tokenizer, args.data_seed, args.data_level, args.seed)
        result.update(text_ce_own_image=own, text_ce_other_image=other)
        print(f"text grounding: masked-word cross-entropy {own:.3f} beside its own image, {other:.3f} beside "
              f"another's (1000 held-out pairs; equal = the text ignores the image)")
    with open(os.path.join(args.out_dir, "probe.json"), "w") as f:
        json.dump(result, f)
    return result


# -----------------------------------------------------------------------------


def bench(args, env, micro_batch):
    """Time training steps on random tensors: images/s, step time, peak memory, MFU; with --profile, then where
    a step's time goes by op class (kernels/op_profile.py)."""
    device = env.device
    config = model_config(args, args.vocab_size)
    model = M3AE(config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=1e-4, betas=(0.9, args.beta2),
                                  fused=env.cuda)
    step_model = torch.compile(model) if env.compile else model
    B = micro_batch
    images = torch.randn(B, 3, config.image_size, config.image_size, device=device)
    text = torch.randint(1, config.vocab_size, (B, config.text_len), device=device)
    text[:, config.text_len // 2 :] = 0  # half-length captions: the key-padding path is exercised
    pad = text == 0

    predictions = heads_all(args, env)

    def one_step():
        with env.autocast:
            out = step_model(images, None if args.no_text else text, None if args.no_text else pad,
                             predictions=predictions)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        one_step()
    if env.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.bench_steps):
        one_step()
    if env.cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.bench_steps
    rate = B / dt
    flops = train_flops_per_sample(config, with_text=not args.no_text, predictions=predictions) * rate
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if env.cuda else "n/a (CPU)"
    attn = config.attn_impl
    if attn == "auto":  # what it resolves to at this run's encoder and decoder lengths
        n_img, n_txt = config.num_patches, 0 if args.no_text else config.text_len
        n_enc = 1 + num_kept(n_img, config.image_mask_ratio) + num_kept(n_txt, config.text_mask_ratio)
        pick = lambda n, d: attention_impl(device.type, env.compile, n, d)
        attn = (f"auto (encoder {n_enc} tokens: {pick(n_enc, config.emb_dim // config.num_heads)}, decoder "
                f"{1 + n_img + n_txt}: {pick(1 + n_img + n_txt, config.dec_emb_dim // config.dec_num_heads)})")
    print(f"bench: preset {args.preset}, batch {B}, vocab {config.vocab_size}, attn {attn}, compile {env.compile}, "
          f"heads {'all' if predictions else 'removed'}, {'image-only' if args.no_text else 'paired'}, device {device}")
    print(f"  step {dt * 1e3:.1f} ms | {rate:.1f} images/s | {flops / 1e12:.2f} TFLOP/s | "
          f"MFU {flops / (args.peak_tflops * 1e12):.1%} (peak {args.peak_tflops:.0f} TFLOP/s) | peak memory {mem}")
    result = dict(step_ms=dt * 1e3, images_per_s=rate, tflops=flops / 1e12)
    if args.profile:
        from kernels import op_profile  # imported here: it imports triton, which the rest of --bench may not need

        steps = min(5, args.bench_steps)
        times = op_profile.profile_steps(one_step, steps, env.cuda)
        print(op_profile.format_table(times, steps, dt * 1e3, device.type))
        result["profile_us"] = dict(times)
    return result


if __name__ == "__main__":
    main()
