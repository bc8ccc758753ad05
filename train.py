"""Pretrain M3AE (or its MAE baseline) — one flat loop, read top to bottom.

    python train.py                            # tiny preset, built-in data, 2 CPU cores, minutes
    python train.py --no-text                  # the MAE baseline: same recipe, image-only mode
    python train.py --csv pairs.csv            # your image-caption pairs (header: filepath,caption)
    torchrun --nproc_per_node=8 train.py --preset base --wds-shards 'cc12m/{00000..01242}.tar' \
        --epoch-samples 10000000               # CC12M-scale, 8 GPUs
    python train.py --bench --preset base      # throughput on random tensors (images/s, MFU)

Recipe (paper section 4, official code): AdamW (0.9, 0.95), weight decay 0.05 on Linear weights
only, lr = base_lr x global_batch / 256, linear warmup then cosine decay per step, image/text mask
0.75/0.75, loss 1.0 x MSE + 0.5 x CE. Every setting is declared once, as a field: the run's in `Run`
below, the model's, masking's and loss's in model.M3AEConfig; each field is a flag of the same name
(`--help`).

Determinism: each sample's augmentation is drawn from (seed, epoch, index) and each global batch's
masking noise from (seed, step), not from a process-wide stream, so a resumed run, a run on more
ranks and a run with more workers see the same samples with the same masks (map-style data; a
webdataset stream resumes at the same sample with fresh augmentation draws). OUT_DIR belongs to one
run (rundir.py): nothing is written there until every input was checked; --resume continues it,
--overwrite replaces it.
"""

import argparse
import copy
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tqdm import tqdm

import builtin
import checkpoint
import data
import plots
import probe
import rundir
from model import M3AE, PRESETS, M3AEConfig, make_config, num_kept
from tokenizer import MAX_TOKENIZER_CAPTIONS, load_tokenizer
from loader import (DataError, InputError, build_datasets, epoch_batches, make_loader,
                    make_tokenizer, open_sources, setup)
from util import (DiskFull, add_flags, at_least, check_fields, flag_name, fraction, knob, lr_at,
                  make_parser, masking_noise, mix_seed, resume_merge, write_atomic)

# -----------------------------------------------------------------------------
# settings: the run's own, one field each (the model's are M3AEConfig's); resume= says how --resume
# treats it


def default_workers():
    """DataLoader workers per rank: the CPUs this process may use, shared among the ranks of this
    node, one left for the training process itself; at least 1, at most 16."""
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1))
    return max(1, min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


POSITIVE = (lambda v: v > 0 and v < float("inf"), "must be > 0 and finite")
FREE, ONCE = "free", "invocation"


@dataclass(frozen=True)
class Run:
    # model (its geometry, masking and loss: M3AEConfig's flags)
    preset: str = knob("tiny", "model size; presets and their geometry: `python model.py`",
                       choices=tuple(PRESETS))
    no_text: bool = knob(False, "MAE baseline: image-only mode; no captions read, no tokenizer")
    init_from: str = knob(None, "start from these weights (train.py's or convert.py's checkpoint): "
                          "its architecture and, unless --tokenizer is given, its tokenizer and "
                          "normalisation", type=str, resume=ONCE, path="file")
    # data: the source follows from --csv / --wds-shards; neither: the built-in demo set
    data: str = knob(None, "data source (default: csv with --csv, wds with --wds-shards, else "
                     "builtin)", type=str, choices=("builtin", "csv", "wds"))
    csv: str = knob(None, "CSV/TSV of image paths (relative to the file) and captions", type=str,
                    path="file")
    csv_img_key: str = knob(None, "--csv: the image path column (default: the first of filepath, "
                            "image, image_path, path, file, filename)", type=str, needs="csv")
    csv_caption_key: str = knob(None, "--csv: the caption column (default: caption, text or title)",
                                type=str, needs="csv")
    csv_separator: str = knob(None, "--csv: field separator (default: tab for .tsv, comma for "
                              ".csv, else sniffed)", type=str, needs="csv")
    wds_shards: str = knob(None, "webdataset .tar shards as img2dataset writes them: "
                           "'dir/{00000..00099}.tar', a glob, or a comma-separated list", type=str)
    wds_image_key: str = knob("jpg;jpeg;png;webp", "--wds-shards: image member extensions, first "
                              "present wins")
    wds_caption_key: str = knob("txt;json", "--wds-shards: caption member extensions (json: its "
                                "'caption')")
    epoch_samples: int = knob(None, "--wds-shards: samples per epoch (a stream has no length)",
                              at_least(1, 10**12), type=int)
    text_file: str = knob(None, "extra unpaired captions, one per line (text-only samples)",
                          type=str, path="file")
    image_dir: str = knob(None, "extra unpaired images, a folder read recursively (image-only "
                          "samples)", type=str, path="folder")
    paired_share: float = knob(1.0, "fraction of pairs kept paired; the rest: half images only, "
                               "half texts only", fraction(high_open=False))
    data_seed: int = knob(0, "built-in data: which procedural dataset (kept fixed across --seed)",
                          at_least(0))
    data_level: str = knob("easy", "built-in data: difficulty", choices=tuple(builtin.LEVELS))
    train_size: int = knob(20000, "built-in data: pretraining pairs", at_least(1, 10**8))
    tokenizer: str = knob(None, "tokenizer file: sentencepiece .model or BERT vocab.txt (default: "
                          "trained on the run's captions)", type=str, path="file")
    vocab_size: int = knob(1024, "vocabulary when training a tokenizer", at_least(8, 262144))
    tokenizer_captions: int = knob(MAX_TOKENIZER_CAPTIONS, "a tokenizer is trained on at most this "
                                   "many captions", at_least(1, 10**8))
    workers: int = knob(default_workers(),
                        "DataLoader workers per rank (default: CPUs / ranks - 1)",
                        at_least(0, 256), resume=ONCE)
    # optimisation
    batch_size: int = knob(64, "global batch (summed over ranks and accumulation steps)",
                           at_least(1))
    grad_accum: int = knob(1, "gradient accumulation steps", at_least(1), resume=FREE)
    steps: int = knob(1000, "optimizer steps in total", at_least(1, 10**9), resume=FREE)
    warmup_steps: int = knob(50, "linear warmup steps", at_least(0), resume=FREE)
    base_lr: float = knob(None, "peak lr = base_lr x batch / 256 (default: 1.5e-4, the paper's; "
                          "6e-3 for tiny: docs/log.md)", POSITIVE, type=float, resume=FREE)
    lr: float = knob(None, "absolute peak lr (instead of --base-lr)", POSITIVE, type=float,
                     resume=FREE)
    min_lr: float = knob(0.0, "lr at the end of the cosine", at_least(0.0), resume=FREE)
    weight_decay: float = knob(0.05, "AdamW weight decay on Linear weights (param_groups)",
                               at_least(0.0), resume=FREE)
    beta2: float = knob(0.95, "AdamW beta2 (beta1 is 0.9)", fraction(), resume=FREE)
    clip_grad: float = knob(0.0, "max grad norm; 0 = no clipping (official)", at_least(0.0),
                            resume=FREE)
    seed: int = knob(0, "initial weights, data order, augmentation and masks",
                     at_least(0, 2**63 - 1))
    # systems
    device: str = knob("cuda" if torch.cuda.is_available() else "cpu", "cuda, cuda:N or cpu",
                       resume=ONCE)
    dtype: str = knob(None, "autocast dtype (default: bf16 on CUDA, fp32 on CPU)", type=str,
                      choices=("bf16", "fp32"), resume=ONCE)
    compile: bool = knob(None, "torch.compile (default: on CUDA)", type=bool, resume=ONCE)
    peak_tflops: float = knob(989.0, "accelerator peak for MFU (H100 SXM bf16 dense: 989)",
                              POSITIVE, resume=ONCE)
    # bookkeeping
    out_dir: str = knob("runs/default",
                        "checkpoints, tokenizer, config.json and log.jsonl: one run", resume=ONCE)
    resume: bool = knob(False, "continue the run in OUT_DIR (settings not repeated come from "
                        "the run)", resume=ONCE)
    overwrite: bool = knob(False, "delete the run in OUT_DIR (only its own files) and start afresh",
                           resume=ONCE)
    save_every: int = knob(500, "checkpoint every N steps (and at the end)", at_least(1),
                           resume=FREE)
    log_every: int = knob(25, "log, and check for non-finite loss and gradients, every N steps",
                          at_least(1), resume=FREE)
    stop_after: int = knob(None, "save and exit after this step (simulates an interruption)",
                           at_least(1), type=int, resume=ONCE)
    probe: bool = knob(True, "built-in data: quick probe at the end", resume=FREE)
    probe_train_size: int = knob(5000, "built-in data: labelled images to fit the quick probe",
                                 at_least(2, 10**6), resume=FREE)
    probe_test_size: int = knob(2000, "built-in data: labelled images to score it",
                                at_least(1, 10**6), resume=FREE)
    bench: bool = knob(False, "time --bench-steps steps on random tensors and exit", resume=ONCE)
    bench_steps: int = knob(20, "--bench: timed steps (after 3 warm-up steps)", at_least(1),
                            resume=ONCE)
    profile: bool = knob(False, "--bench: then profile a few steps by op class (torch.profiler)",
                         resume=ONCE, needs="bench")

    def __post_init__(self):
        check_fields(self)

    @property
    def peak_lr(self):
        # linear scaling
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    @property
    def run_tokenizer(self):
        """The run's own copy of its tokenizer in OUT_DIR (either name), or None before it is
        written."""
        for name in (rundir.TOKENIZER, rundir.VOCAB):
            if os.path.isfile(os.path.join(self.out_dir, name)):
                return os.path.join(self.out_dir, name)
        return None


def preset_note(f):
    """--help for a model field: its default in each preset (a preset sets it unless the flag is
    given)."""
    default = getattr(M3AEConfig(), f.name)
    if not any(f.name in p for p in PRESETS.values()):
        return f" (default: {default})"
    return (" (default: the preset's: "
            + ", ".join(f"{n} {p.get(f.name, default)}" for n, p in PRESETS.items()) + ")")


def build_parser():
    p = make_parser(__doc__, prog="train.py")
    add_flags(p.add_argument_group("the run (train.Run)"), Run)
    add_flags(p.add_argument_group("model, masking and loss (model.M3AEConfig)"), M3AEConfig,
              unset=True, note=preset_note)
    return p


def given_flags(p, argv):
    """The dest names of the flags present on the command line (the rest took their defaults)."""
    probe_parser = copy.deepcopy(p)
    for action in probe_parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe_parser.parse_known_args(argv)[0]))


class Settings(NamedTuple):
    run: Run
    config: M3AEConfig  # vocab_size: the preset's, or --init-from's, until the tokenizer is known
    init: Optional[dict]  # --init-from's checkpoint
    notes: list  # what --resume was told to change


def settings(argv=None):
    """Parse, then check every value, path and combination before any work: one line naming the
    flag, exit 2. With --resume, every setting not given again comes from the run's record."""
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, given = p.parse_args(argv), given_flags(p, argv)
    model_flags = {f.name: getattr(args, f.name) for f in fields(M3AEConfig)
                   if f.metadata["help"] and getattr(args, f.name) is not None}
    init, notes = None, []
    try:
        run = Run(**{f.name: getattr(args, f.name) for f in fields(Run)})
        record = rundir.recorded(run.out_dir) if run.resume and not run.bench else None
        if record:
            merged, notes, refused = resume_merge(Run, record["run"], asdict(run), given)
            # a field added since the run started (a fork's new knob) takes its default
            current = {**asdict(M3AEConfig(**record["model"])), **model_flags}
            model, more, too = resume_merge(M3AEConfig, record["model"], current, model_flags)
            if refused + too:
                p.error("--resume cannot change what the run trains on or with: "
                        f"{'; '.join(refused + too)} (drop these flags to continue as recorded, or "
                        "start a new run in another --out-dir)")
            # one of the two sets the peak: the one given wins
            if "lr" in given or "base_lr" in given:
                merged.update(base_lr=None) if "lr" in given else merged.update(lr=None)
            run, config, notes = Run(**merged), M3AEConfig(**model), notes + more
        elif run.init_from and not run.bench:
            init = checkpoint.read(run.init_from)
            shape = ([f.name for f in fields(M3AEConfig) if f.name in model_flags
                      and f.metadata["shape"]] + (["preset"] if "preset" in given else []))
            if shape:
                p.error(f"argument {flag_name(shape[0])}: the architecture comes from --init-from")
            config = checkpoint.model_config(init, **model_flags)
        else:
            config = make_config(run.preset, **model_flags)
        run = check_run(p, run, config)
    except (ValueError, rundir.RunDirError) as e:
        p.error(str(e).replace("ValueError: ", ""))
    return Settings(run, config, init, notes)


def check_run(p, run, config):
    """The combinations no single field can check; fills in the data source and the default base
    lr."""
    if run.base_lr is not None and run.lr is not None:
        p.error("argument --lr: give --lr (absolute) or --base-lr (scaled by batch / 256), "
                "not both")
    no_text = run.no_text or config.text_loss_weight == 0  # a zero text weight is the MAE baseline
    if config.image_loss_weight == 0 and no_text:
        p.error("argument --image-loss-weight: 0 with no text loss leaves nothing to train")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group is joined later
    if run.batch_size % (world * run.grad_accum):
        p.error(f"argument --batch-size: {run.batch_size} must divide by ranks x --grad-accum = "
                f"{world} x {run.grad_accum}")
    micro = run.batch_size // (world * run.grad_accum)
    # prefetched batches
    loader_bytes = micro * 3 * config.image_size**2 * 4 * (2 * max(run.workers, 1) + 2)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if loader_bytes > memory // 2:
        p.error(f"argument --batch-size: {run.batch_size} ({micro} images of {config.image_size} "
                f"px per micro-batch) needs ~{loader_bytes >> 30} GiB of loader memory, over half "
                f"of this machine's {memory >> 30} GiB: use --grad-accum, more ranks or a smaller "
                f"batch")
    if run.stop_after is not None and run.stop_after > run.steps:
        p.error(f"argument --stop-after: {run.stop_after} is past --steps {run.steps}")
    if run.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"argument --device: {run.device} needs a CUDA GPU and none is visible "
                "(use --device cpu)")
    if run.resume and run.overwrite:
        p.error("argument --overwrite: not with --resume (--overwrite deletes the run that "
                "--resume continues)")
    if run.no_text and run.text_file:
        p.error("argument --text-file: text-only samples teach the MAE baseline (--no-text) "
                "nothing")
    if run.resume and run.init_from:
        p.error("argument --init-from: a resumed run continues from its own checkpoint; "
                "drop --init-from")
    # the data source follows from the flags; a contradiction is refused
    inferred = "csv" if run.csv else ("wds" if run.wds_shards else "builtin")
    if run.csv and run.wds_shards:
        p.error("argument --csv: give --csv or --wds-shards, not both")
    if run.data not in (None, inferred):
        need = {"csv": "--csv FILE", "wds": "--wds-shards PATTERN",
                "builtin": "neither --csv nor --wds-shards"}
        p.error(f"argument --data: {run.data!r} needs {need[run.data]}")
    if (inferred == "wds") != (run.epoch_samples is not None):
        p.error("argument --epoch-samples: needed with --wds-shards (a stream has no length), "
                "and only with it")
    if inferred == "wds":
        try:
            # refuses a pattern that matches nothing, and missing files
            data.expand_shards(run.wds_shards)
        except ValueError as e:
            p.error(f"argument --wds-shards: {run.wds_shards!r} cannot be read: {e}")
    if inferred == "wds" and run.epoch_samples < micro * max(run.workers, 1):
        print(f"warning: --epoch-samples {run.epoch_samples} is less than one micro-batch for each "
              f"of the {max(run.workers, 1)} worker(s) of {world} rank(s): each epoch ends before "
              f"every worker delivers")
    if inferred == "wds" and run.epoch_samples < run.batch_size:
        p.error(f"argument --epoch-samples: {run.epoch_samples} is less than one --batch-size "
                f"{run.batch_size}")
    if not run.bench:
        try:
            rundir.check_out_dir(run.out_dir, run.resume, run.overwrite)
        except rundir.RunDirError as e:
            p.error(str(e))
    # legal but almost surely unintended: one line each
    if run.warmup_steps >= run.steps:
        print(f"warning: --warmup-steps {run.warmup_steps} >= --steps {run.steps}: the lr never "
              f"leaves warmup")
    if config.image_mask_ratio == 0 and (config.text_mask_ratio == 0 or no_text):
        print("warning: nothing is masked (--image-mask-ratio 0, no text masking): the loss is "
              "over no token")
    # tiny: peak lr 1.5e-3 at batch 64 barely taught the text to read the image in 1000 steps; 6e-3
    # does (measured on the built-in data: docs/log.md)
    base_lr = run.base_lr if run.base_lr or run.lr else (6e-3 if run.preset == "tiny" else 1.5e-4)
    return replace(run, data=inferred, base_lr=base_lr, no_text=no_text)


# -----------------------------------------------------------------------------
# optimisation pieces


def param_groups(model, weight_decay):
    """Decay Linear weights only. No decay on biases, LayerNorms, the text embedding table, CLS,
    type embeddings and mask tokens. (Official decays LayerNorm scales; mae decays CLS and mask
    tokens; we exempt both, the usual ViT practice.)"""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def train_flops_per_sample(c, with_text=True, with_image=True):
    """Analytic FLOPs of one training step per sample, counting a multiply-add as 2: the matrix
    products only (layer norms, softmax, element-wise work and the optimizer are not counted), dense
    (padding and padded keys count). Each forward product has two in the backward (input and weight
    gradients), so a step is 3x the forward, less one product for the patch embedding, whose input
    (the pixels) needs no gradient. The output heads run on the removed tokens only
    (M3AE.forward_loss). Equal to torch.utils.flop_counter's count of a step with attn "math"
    (tests/test_bench.py)."""
    # qkv 6nd^2 + proj 2nd^2 + mlp 4nd*hidden + attention 4n^2d (q k^T, p v)
    def transformer(n, d, depth):
        return depth * (8 * n * d * d + 4 * n * d * int(d * c.mlp_ratio) + 4 * n * n * d)
    N, T = (c.num_patches if with_image else 0), (c.text_len if with_text else 0)
    kept_img, kept_txt = num_kept(N, c.image_mask_ratio), num_kept(T, c.text_mask_ratio)
    n_enc, n_dec = 1 + kept_img + kept_txt, 1 + N + T
    head_img, head_txt = N - kept_img, T - kept_txt
    patch_embed = 2 * N * c.patch_dim * c.emb_dim
    fwd = (patch_embed + transformer(n_enc, c.emb_dim, c.depth)
           + 2 * n_enc * c.emb_dim * c.dec_emb_dim + transformer(n_dec, c.dec_emb_dim, c.dec_depth)
           + 2 * head_img * c.dec_emb_dim * c.patch_dim
           + 2 * head_txt * c.dec_emb_dim * c.vocab_size)
    return 3 * fwd - patch_embed


def rng_state():
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    s["numpy"] = list(np.random.get_state())
    # weights_only loads tensors, not arrays
    s["numpy"][1] = torch.from_numpy(s["numpy"][1].astype(np.int64))
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


@dataclass
class Training:
    """What the loop changes: the model (the plain module, what is saved), what it steps (compiled
    and / or DDP-wrapped), the optimizer, and where it is."""
    model: M3AE
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    ramp: Optional[list] = None  # [step, lr]: a --resume changed the schedule there (scheduled_lr)

    def progress(self):
        return dict(step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                    ramp=self.ramp)


def scheduled_lr(step, run, ramp=None):
    """The lr of `step`: linear warmup, then cosine to --min-lr at --steps (util.lr_at). After a
    --resume that changed the schedule (more --steps, another --lr), ramp = [step, lr the old
    schedule gave there]: the lr goes linearly from that value to the new schedule over
    --warmup-steps steps, never jumping (a finished run resumed with more steps would restart the
    cosine near its peak)."""
    lr = lr_at(step, run.peak_lr, run.warmup_steps, run.steps, run.min_lr)
    if ramp is not None and run.warmup_steps > 0 and step < ramp[0] + run.warmup_steps:
        lr = ramp[1] + (lr - ramp[1]) * (step - ramp[0] + 1) / run.warmup_steps
    return lr


def save(t, env, run, extra):
    """Every rank's RNG state is gathered (a collective: all ranks call this); rank 0 writes
    (checkpoint.save_checkpoint: verified, the previous one kept, never with non-finite values)."""
    rng = [None] * env.world
    if env.ddp:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    if env.master:
        checkpoint.save_checkpoint(checkpoint.checkpoint_dict(
            t.model, optimizer=t.optimizer.state_dict(), rng=rng, args=asdict(run), **t.progress(),
            **extra), run.out_dir)
        draw_curves(run.out_dir)


def draw_curves(out_dir):
    """OUT_DIR/curves.png from log.jsonl: every loss term by name, lr, grad norm, images/s. A chart
    that cannot be drawn is a warning, never the end of a run."""
    try:
        sheet = plots.training_curves([out_dir])
        if sheet is not None:
            plots.save_png(sheet, os.path.join(out_dir, rundir.CURVES))
    except Exception as e:  # noqa: BLE001 (a picture must not cost a run)
        print(f"warning: {rundir.CURVES} not drawn: "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")


# -----------------------------------------------------------------------------
# one optimizer step


def blank_batch(empty):
    """One image-only sample of zeros shaped like the rows of `empty` (a batch whose samples were
    all skipped)."""
    blank = {k: torch.zeros((1, *v.shape[1:]), dtype=v.dtype) for k, v in empty.items()}
    blank["text_padding_mask"][:] = True
    blank["has_image"][:] = True
    return blank


def forward_batch(model, batch, no_text, text_only):
    """The loss terms of a batch, by name. Paired and image-only samples go through one forward (an
    image-only sample is an all-padding caption), text-only samples through a second one with no
    image; their terms add (as official's unpaired text). text_only: host-side (B,) bool, so that
    splitting needs no device sync."""
    if no_text:
        return model(batch["image"], image_noise=batch["image_noise"])
    if not text_only.any():
        return model(batch["image"], batch["text"], batch["text_padding_mask"],
                     batch["image_noise"], batch["text_noise"])
    device = batch["text"].device
    pick = lambda rows: {k: v[rows.nonzero().squeeze(1).to(device)] for k, v in batch.items()}
    outs = []
    if (~text_only).any():
        b = pick(~text_only)
        outs.append(model(b["image"], b["text"], b["text_padding_mask"], b["image_noise"],
                          b["text_noise"]))
    b = pick(text_only)
    outs.append(model(None, b["text"], b["text_padding_mask"], text_noise=b["text_noise"]))
    return {k: sum(o[k] for o in outs if k in o) for k in {k for o in outs for k in o}}


def train_step(t, batches, lr, env, run, config, skips):
    """One optimizer step over run.grad_accum micro-batches of this rank. Returns (the loss terms by
    name, averaged over micro-batches, on the device; the gradient norm before clipping; samples
    used)."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    per_rank = run.batch_size // env.world
    micro_batch = per_rank // run.grad_accum
    terms, used = {}, 0
    for micro in range(run.grad_accum):
        batch = next(batches)
        skips.add(batch.pop("skipped"))
        weight, used = 1.0, used + len(batch["image"])
        # every sample was bad: a blank one with weight 0 keeps DDP in step
        if len(batch["image"]) == 0:
            batch, weight = blank_batch(batch), 0.0
        # this micro-batch's rows of the global batch (a batch shrinks when bad samples are skipped)
        start = env.rank * per_rank + micro * micro_batch
        rows = slice(start, start + len(batch["image"]))
        # masking noise drawn for the whole global batch from (seed, step): the same masks on any
        # rank count
        noise = masking_noise(mix_seed(run.seed, t.step, 1), run.batch_size, config.num_patches,
                              config.text_len)
        batch["image_noise"], batch["text_noise"] = noise[0][rows], noise[1][rows]
        text_only = ~batch["has_image"]  # read on the host, before the copy: no device sync
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        sync = (nullcontext() if (not env.ddp or micro == run.grad_accum - 1)
                else t.step_model.no_sync())
        with sync, env.autocast:
            out = forward_batch(t.step_model, batch, run.no_text, text_only)
        (out["loss"] * (weight / run.grad_accum)).backward()
        for name, value in out.items():
            terms[name] = terms.get(name, 0) + value.detach() * (weight / run.grad_accum)
    clip = run.clip_grad if run.clip_grad > 0 else float("inf")
    grad_norm = nn.utils.clip_grad_norm_(t.model.parameters(), clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return terms, grad_norm, used


# -----------------------------------------------------------------------------


def main(argv=None):
    # every flag checked; --resume: the run's own settings
    run, config, init, notes = settings(argv)
    env = setup(run.device, run.dtype, run.compile)
    if run.bench:
        return bench(run, config, env)

    # --- every input read and checked before anything is written into OUT_DIR ---
    try:
        sources = open_sources(run, config.image_size, init)
        tokenizer = make_tokenizer(run, sources, init) if env.master else None
    except InputError as e:
        build_parser().error(str(e))
    if tokenizer is not None and not (init or run.resume):
        config = replace(config, vocab_size=tokenizer.vocab_size)
    elif run.no_text and not (init or run.resume):
        config = replace(config, vocab_size=run.vocab_size)

    # --- OUT_DIR is this run's from here on (rank 0 holds its lock); its tokenizer, then the data
    # ---
    lock = None
    if env.master:
        lock = claim(run)
        keep_tokenizer(run, tokenizer)
    if env.ddp:
        dist.barrier()  # rank 0 claimed OUT_DIR and wrote the tokenizer; the others read it now
        if not env.master and not run.no_text:
            tokenizer = load_tokenizer(run.run_tokenizer)
            config = replace(config, vocab_size=config.vocab_size if init or run.resume
                             else tokenizer.vocab_size)
    dataset, probe_sets = build_datasets(run, sources, tokenizer, config)
    # rank 0 checks and saves it
    fingerprint = run_fingerprint(run, tokenizer) if env.master else None

    # --- model and optimizer; the initial weights depend on --seed alone (the same on every rank)
    # ---
    torch.manual_seed(run.seed)
    model = M3AE(config).to(env.device)
    if init:
        model.load_state_dict(init["model"])
    # the MAE baseline never uses the text path: freeze it (DDP then expects no gradient)
    if run.no_text:
        for name, p in model.named_parameters():
            if name.startswith(("text_", "enc_text", "dec_text")):
                p.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, run.weight_decay), lr=0.0,
                                  betas=(0.9, run.beta2), fused=env.cuda)
    t = Training(model, model, optimizer)
    if run.resume and not resume(t, run, env, fingerprint, notes):
        return finish(lock, env)
    if env.master:
        rundir.write_config(run.out_dir, {"run": asdict(run), "model": asdict(config),
                                          "world_size": env.world, "fingerprint": fingerprint})
        print(f"{run.preset if not init else os.path.basename(run.init_from)}: "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{'MAE baseline (no text)' if run.no_text else 'M3AE'}, data {run.data}, "
              f"global batch {run.batch_size} = {env.world} ranks x {run.grad_accum} accum x "
              f"{run.batch_size // env.world // run.grad_accum}, lr {run.peak_lr:.2e}, device "
              f"{env.device}, autocast {run.dtype or ('bf16' if env.cuda else 'fp32')}, compile "
              f"{env.compile}, workers {run.workers}")

    # --- compile and DDP wrap the model the loop steps; t.model stays the plain module we save ---
    t.step_model = torch.compile(model) if env.compile else model
    if env.ddp:
        # unpaired data can leave one modality's parameters without a gradient on some rank
        t.step_model = DDP(t.step_model, device_ids=[env.device.index] if env.cuda else None,
                           find_unused_parameters=(run.paired_share < 1
                                                   or bool(run.text_file or run.image_dir)))

    # --- the loop; what a checkpoint carries besides weights and progress: how to read data for
    # this encoder ---
    extra = dict(fingerprint=fingerprint, data={"mean": list(sources.norm[0]),
                                                "std": list(sources.norm[1]), "source": run.data})
    if tokenizer is not None:
        extra["tokenizer"] = {"kind": tokenizer.kind, "blob": tokenizer.to_bytes()}
    finished = loop(t, dataset, env, run, config, extra)

    # --- a quick look at what it learned (built-in data), and what was saved where ---
    result = None
    if finished and env.master:
        if run.probe and probe_sets is not None:
            result = end_of_run_check(model, tokenizer, probe_sets, run, t.step)
        summary(run, t.step)
    finish(lock, env, t)
    return result


def claim(run):
    """rundir.claim, its refusal as a one-line error (exit 2); the user's own input files are never
    deleted."""
    try:
        return rundir.claim(run.out_dir, run.overwrite,
                            inputs=(run.tokenizer, run.init_from, run.csv, run.text_file))
    except rundir.RunDirError as e:
        build_parser().error(str(e))


def keep_tokenizer(run, tokenizer):
    """The run keeps its own copy of its tokenizer in OUT_DIR (a --resume and a moved folder need
    nothing else)."""
    if tokenizer is None:
        return
    path = os.path.join(run.out_dir,
                        rundir.TOKENIZER if tokenizer.kind == "sentencepiece" else rundir.VOCAB)
    if run.tokenizer and os.path.exists(path) and os.path.samefile(path, run.tokenizer):
        return  # the user's own file, already in place
    if not os.path.exists(path):
        write_atomic(path, lambda f: f.write(tokenizer.to_bytes()))


def run_fingerprint(run, tokenizer):
    """What the run reads (rundir.data_fingerprint), by role: the CSV or shards, the extras, the
    tokenizer."""
    shards = data.expand_shards(run.wds_shards) if run.data == "wds" else []
    return rundir.data_fingerprint(files={"csv": run.csv, "text_file": run.text_file},
                                   shards=shards, folders={"image_dir": run.image_dir},
                                   tokenizer_bytes=tokenizer.to_bytes() if tokenizer else None)


def resume(t, run, env, fingerprint, notes):
    """--resume: the newest readable checkpoint, the run's data unchanged, the log without replayed
    steps. Returns False when the run has nothing left to train."""
    try:
        ckpt, name = checkpoint.load_checkpoint(run.out_dir, map_location=env.device,
                                                aside=env.master)
        if ckpt is not None and env.master:
            rundir.check_fingerprint(ckpt.get("fingerprint") or fingerprint, fingerprint)
    except (checkpoint.CheckpointError, rundir.RunDirError) as e:
        build_parser().error(str(e))
    if ckpt is None:
        print(f"--resume: no checkpoint in {run.out_dir} yet, starting at step 0")
        return True
    if ckpt["step"] > run.steps:
        build_parser().error(f"argument --steps: {run.steps} is below the run's step "
                             f"{ckpt['step']}: a run cannot train backwards (more steps, or none: "
                             "the run is as it was)")
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.step, t.epoch, t.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    t.ramp = ckpt.get("ramp")
    if len(ckpt["rng"]) == env.world:
        set_rng_state(ckpt["rng"][env.rank])
    # the lr policy on a changed schedule: no jump (scheduled_lr), said with the lr before and after
    free = {f.name for f in fields(Run) if f.metadata["resume"] == "free"}  # the rest is unchanged
    before_run = replace(run, **{k: v for k, v in ckpt.get("args", {}).items() if k in free})
    before, after = scheduled_lr(t.step, before_run, t.ramp), scheduled_lr(t.step, run, t.ramp)
    if abs(before - after) > 1e-12 * max(abs(before), abs(after)) and t.step < run.steps:
        t.ramp = [t.step, before]
        notes = notes + [f"the lr schedule changed: at step {t.step} the run's schedule gives "
                         f"{before:.3g} and the new one {after:.3g}; the lr moves from one to the "
                         f"other over --warmup-steps {run.warmup_steps} steps, then follows the "
                         f"new cosine to step {run.steps}"]
    if t.step >= run.steps:
        if env.master:
            print(f"{run.out_dir} is already at step {t.step} of --steps {run.steps}: nothing to "
                  f"train (to train longer: --resume --steps N)")
        return False
    if env.master:
        rundir.trim_log(run.out_dir, t.step)
        print(f"resumed from {name} at step {t.step} (epoch {t.epoch}, batch {t.batch_in_epoch})",
              *[f"; {n}" for n in notes])
    return True


def finish(lock, env, t=None):
    if env.ddp:
        # Leave together: rank 0 may still be writing the last checkpoint or probing, and a gloo
        # rank that tears its process group down while a peer is busy can abort at exit (SIGABRT
        # seen once in CI). The DDP wrapper holds the process group too, so it goes first.
        dist.barrier()
        if t is not None:
            t.step_model = None
        dist.destroy_process_group()
    if lock:
        lock.close()


def loop(t, dataset, env, run, config, extra):
    """Train from t's step to run.steps. Logs every --log-every steps, saves every --save-every.
    Returns False when --stop-after ended it early. Non-finite values: each step marks, on the
    device, whether its loss and gradient norm were finite; the mark is read at every log and before
    every save (no extra host sync), so the run stops at most --log-every steps after a bad step,
    before any save, with the last good weights saved."""
    flops_per_sample = train_flops_per_sample(config, with_text=not run.no_text)
    per_rank = run.batch_size // env.world
    loader = make_loader(dataset, per_rank // run.grad_accum, run.workers, env, run.seed)
    log_file = open(os.path.join(run.out_dir, rundir.LOG), "a") if env.master else None
    skips, seen, used = data.SkipLog(), data.SkipLog(), 0  # this epoch's, the run's, samples used
    # the first step with a non-finite loss or gradient
    first_bad = torch.tensor(-1, device=env.device)
    last_saved = t.step if run.resume else None

    def check():
        good = (f"{os.path.join(run.out_dir, checkpoint.CKPT)} (step {last_saved})"
                if last_saved is not None else "none: no checkpoint was written before it")
        if first_bad.item() >= 0:
            raise FloatingPointError(f"non-finite loss or gradient norm at step "
                                     f"{first_bad.item() + 1}; stopped without saving. The last "
                                     f"good checkpoint is {good}")
        if used == 0 and env.world == 1:
            raise DataError(f"no readable sample in {t.step} steps ({skips.report()}); stopped "
                            f"without saving. The last good checkpoint is {good}")

    first_step = t.step
    bar = tqdm(total=run.steps, initial=t.step, disable=not env.master, dynamic_ncols=True)
    t_last, samples_since = time.perf_counter(), 0
    while t.step < run.steps:
        batches, steps_in_epoch = epoch_batches(loader, t.epoch, t.batch_in_epoch, per_rank, env,
                                                run.seed, run.epoch_samples, run.batch_size,
                                                run.grad_accum)
        while t.batch_in_epoch < steps_in_epoch and t.step < run.steps:
            lr = scheduled_lr(t.step, run, t.ramp)
            terms, grad_norm, n = train_step(t, batches, lr, env, run, config, skips)
            finite = torch.isfinite(terms["loss"]) & torch.isfinite(grad_norm)
            first_bad = torch.where((first_bad < 0) & ~finite, t.step, first_bad)
            t.step, t.batch_in_epoch, used, samples_since = t.step + 1, t.batch_in_epoch + 1, \
                used + n, samples_since + run.batch_size
            bar.update(1)
            if t.step % run.log_every == 0 or t.step == run.steps:
                check()
                rec = {"step": t.step, **log_record(terms, env)}
                if env.master:
                    rate = samples_since / (time.perf_counter() - t_last)
                    rec.update(lr=lr, grad_norm=grad_norm.item(), images_per_s=rate)
                    if env.cuda:
                        rec["mfu"] = rate * flops_per_sample / (run.peak_tflops * 1e12 * env.world)
                    rundir.append_log(log_file, rec)
                    bar.set_postfix({k.replace("_loss", ""): f"{v:.4g}" for k, v in rec.items()
                                     if k.endswith("loss")}
                                    | dict(lr=f"{lr:.2e}", ips=f"{rate:.0f}"))
                t_last, samples_since = time.perf_counter(), 0
            if t.step % run.save_every == 0 or t.step == run.steps or t.step == run.stop_after:
                check()
                save(t, env, run, extra)
                last_saved = t.step
            if t.step == run.stop_after:
                break
        if t.batch_in_epoch >= steps_in_epoch:
            if env.master and skips.skipped():  # conversions alone are summed up at the end
                tqdm.write(f"epoch {t.epoch}: {skips.report()}")
            seen.counts.update(skips.counts)
            t.epoch, t.batch_in_epoch, skips = t.epoch + 1, 0, data.SkipLog()
        if t.step == run.stop_after:
            break
    bar.close()
    if log_file:
        log_file.close()
    seen.counts.update(skips.counts)
    if env.master and seen.total():
        print(f"data, steps {first_step + 1}-{t.step}: {seen.report()}")
    return t.step >= run.steps


def log_record(terms, env):
    """The loss terms as floats by name, averaged over ranks (the union of the ranks' names; a
    missing term is 0 on that rank, as an absent modality)."""
    names = sorted(terms)
    if env.ddp:
        gathered = [None] * env.world
        dist.all_gather_object(gathered, names)
        names = sorted(set().union(*gathered))
        values = torch.stack([terms[k] if k in terms else torch.zeros((), device=env.device)
                              for k in names])
        dist.all_reduce(values, op=dist.ReduceOp.AVG)
        return dict(zip(names, values.tolist()))
    return {k: terms[k].item() for k in names}


def summary(run, step):
    """What was saved where, and the next commands."""
    ckpt = os.path.join(run.out_dir, checkpoint.CKPT)
    print(f"done: {ckpt} (step {step}), {os.path.join(run.out_dir, rundir.LOG)}, "
          f"{os.path.join(run.out_dir, rundir.CONFIG)}. Next: python probe.py --ckpt {ckpt} "
          f"--train-dir TRAIN --test-dir TEST; python viz.py --ckpt {ckpt}; more steps: python "
          f"train.py --out-dir {run.out_dir} --resume --steps {2 * step}")


def end_of_run_check(model, tokenizer, probe_sets, run, step):
    """The built-in data's quick probe (probe.py's fast mode, both labels) and the text-grounding
    check; printed and written to OUT_DIR/probe.json."""
    accs = probe.quick_probe(model, *probe_sets, seed=run.seed)
    result = {"probe_top1": accs["shape"], "probe_top1_colour": accs["colour"], "steps": step,
              "model": "MAE (no text)" if run.no_text else "M3AE"}
    print(f"quick linear probe (probe.py fast mode: frozen CLS, BatchNorm + Linear, LARS) top-1: "
          f"main object's shape {accs['shape']:.2f}% (10 classes), its colour "
          f"{accs['colour']:.2f}% (11 classes)")
    if not run.no_text:
        own, other = probe.builtin_text_grounding(model, tokenizer, run.data_seed, run.data_level,
                                                  run.seed)
        result.update(text_ce_own_image=own, text_ce_other_image=other)
        print(f"text grounding: masked-word cross-entropy {own:.3f} beside its own image, "
              f"{other:.3f} beside another's (1000 held-out pairs; equal = the text ignores the "
              f"image)")
    write_atomic(os.path.join(run.out_dir, "probe.json"), lambda f: json.dump(result, f), mode="w")
    return result


# -----------------------------------------------------------------------------


def bench(run, config, env):
    """Time training steps on random tensors: images/s, step time, peak memory, MFU; with --profile,
    then where a step's time goes by op class (kernels/op_profile.py)."""
    device, B = env.device, run.batch_size // env.world // run.grad_accum
    config = replace(config, vocab_size=run.vocab_size)
    model = M3AE(config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, run.weight_decay), lr=1e-4,
                                  betas=(0.9, run.beta2), fused=env.cuda)
    step_model = torch.compile(model) if env.compile else model
    images = torch.randn(B, 3, config.image_size, config.image_size, device=device)
    text = torch.randint(1, config.vocab_size, (B, config.text_len), device=device)
    text[:, config.text_len // 2 :] = 0  # half-length captions: the key-padding path is exercised

    def one_step():
        with env.autocast:
            out = step_model(images, None if run.no_text else text)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        one_step()
    if env.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(run.bench_steps):
        one_step()
    if env.cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / run.bench_steps
    rate = B / dt
    flops = train_flops_per_sample(config, with_text=not run.no_text) * rate
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if env.cuda else "n/a (CPU)"
    attn = config.attn_impl
    if attn == "auto":  # what it resolves to at this run's encoder and decoder lengths
        from kernels.dispatch import attention_impl

        n_img, n_txt = config.num_patches, 0 if run.no_text else config.text_len
        n_enc = (1 + num_kept(n_img, config.image_mask_ratio)
                 + num_kept(n_txt, config.text_mask_ratio))
        pick = lambda n, d: attention_impl(device.type, env.compile, n, d)
        attn = (f"auto (encoder {n_enc} tokens: "
                f"{pick(n_enc, config.emb_dim // config.num_heads)}, decoder {1 + n_img + n_txt}: "
                f"{pick(1 + n_img + n_txt, config.dec_emb_dim // config.dec_num_heads)})")
    print(f"bench: preset {run.preset}, batch {B}, vocab {config.vocab_size}, attn {attn}, "
          f"compile {env.compile}, {'image-only' if run.no_text else 'paired'}, device {device}")
    print(f"  step {dt * 1e3:.1f} ms | {rate:.1f} images/s | {flops / 1e12:.2f} TFLOP/s | "
          f"MFU {flops / (run.peak_tflops * 1e12):.1%} (peak {run.peak_tflops:.0f} TFLOP/s) | "
          f"peak memory {mem}")
    result = dict(step_ms=dt * 1e3, images_per_s=rate, tflops=flops / 1e12)
    if run.profile:
        # imported here: it imports triton, which the rest of --bench may not need
        from kernels import op_profile

        steps = min(5, run.bench_steps)
        times = op_profile.profile_steps(one_step, steps, env.cuda)
        print(op_profile.format_table(times, steps, dt * 1e3, device.type))
        result["profile_us"] = dict(times)
    return result


if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, DataError, DiskFull, checkpoint.CheckpointError) as e:
        # a run that cannot go on: one line, the reason and what is saved
        sys.exit(f"train.py: error: {e}")
