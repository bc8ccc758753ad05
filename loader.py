"""What feeds train.py, and where it runs: the run's inputs opened and checked before anything is
written (open_sources, make_tokenizer: a bad one is an InputError naming its flag), the datasets,
torchrun ranks and devices (Env, setup), and the run's one DataLoader, whose order depends on (seed,
epoch, index) alone, so that a resumed run, a run on more ranks and a run with more workers see the
same samples (exact resume). Map-style data goes through an EpochKeys sampler; a webdataset stream
takes its epoch through set_epoch.
"""

import itertools
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import builtin
import checkpoint
import data
import rundir
from tokenizer import Tokenizer, load_tokenizer
from util import SeededSamples, mix_seed


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. a stream pass that gives no batch); the message is one
    line."""


@dataclass
class Env:
    """Where this process runs: rank among `world` (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK), its
    device, and the autocast context and compile choice that follow from it."""
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
    """Join the torchrun process group if there is one; pick the device, the autocast dtype (bf16 on
    CUDA) and torch.compile (on CUDA) unless told otherwise."""
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
    """This rank's (epoch, index) keys for one epoch: one global permutation, whole global batches
    only (drop_last), sample i of global batch b goes to rank i // batch_per_rank, so the union over
    ranks of step b equals what one process with the global batch would see."""
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
    """The sampler of the run's one map-style DataLoader: the (epoch, index) keys of the current
    epoch, set before each pass, so that the loader and its workers live across epochs
    (persistent_workers)."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def make_loader(dataset, micro_batch, workers, env, seed):
    """One DataLoader for the whole run, its workers kept alive across epochs: a new loader per
    epoch would start every worker again at each boundary (and re-open the shards). Map-style data
    goes through SeededSamples and EpochKeys; a stream (webdataset) takes its epoch through
    set_epoch, which reaches live workers."""
    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    if stream and workers > len(dataset.shards) // env.world:
        # fewer shards than (rank, worker) slots: the short slots would read every shard for their
        # share of samples
        fit = len(dataset.shards) // env.world
        if env.master:
            print(f"note: {len(dataset.shards)} shard(s) for {env.world} rank(s) x {workers} "
                  f"workers: using {fit} worker(s) per rank, so that each reads its own shards")
        workers = fit
    return torch.utils.data.DataLoader(dataset if stream else SeededSamples(dataset, seed),
                                       sampler=None if stream else EpochKeys(),
                                       batch_size=micro_batch, collate_fn=data.collate,
                                       num_workers=workers, pin_memory=env.cuda, drop_last=True,
                                       persistent_workers=workers > 0)


def epoch_batches(loader, epoch, skip, per_rank, env, seed, epoch_samples=None, global_batch=None,
                  grad_accum=1):
    """(iterator over this rank's micro-batches of `epoch`, after its first `skip` steps; steps in
    the epoch). Map-style data: a seeded permutation (epoch_indices). A stream (webdataset): data.py
    splits the shards over ranks and workers, a rank whose shards run short starts another pass, a
    resume skips what was read, and a pass that yields no batch at all is an error, never an endless
    loop."""
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
                    raise DataError(
                        f"a pass over {len(dataset.shards)} shard(s) gave no batch of "
                        f"{loader.batch_size} on rank {env.rank} ({env.world} rank(s) x "
                        f"{max(loader.num_workers, 1)} loader(s) each): every shard is empty or "
                        f"unreadable, or each worker reads fewer than {loader.batch_size} usable "
                        "samples (drop_last); use fewer --workers, a smaller --batch-size or more "
                        "shards")

        return itertools.islice(endless(), skip * grad_accum, None), epoch_samples // global_batch
    keys, steps = epoch_indices(len(dataset), per_rank, env.rank, env.world, seed, epoch)
    loader.sampler.keys = keys[skip * per_rank :]
    return iter(loader), steps


# -----------------------------------------------------------------------------
# the run's inputs: every one read and checked before anything is written into OUT_DIR


class InputError(ValueError):
    """An input that cannot be used, found after the flags were parsed: train.py prints one line
    naming the flag (exit 2, argparse's convention)."""

    def __init__(self, flag, message):
        super().__init__(f"argument --{flag}: {message}")


class Sources(NamedTuple):
    pairs: object  # the main source: builtin.Builtin, data.CsvPairs or data.WebDatasetShards
    extras: list  # data.TextLines / data.ImageOnlyFolder
    norm: tuple  # (mean, std)


def open_sources(run, image_size, init=None):
    """The run's data sources, opened and checked (a source that cannot be read ends the run with
    one line naming its flag): a map-style source must hold a readable image among its first ones
    and a full batch."""
    keys = dict(image_keys=run.wds_image_key.split(";"),
                caption_keys=run.wds_caption_key.split(";"))
    flag = "csv" if run.data == "csv" else "wds-shards"
    try:
        if run.data == "builtin":
            pairs = builtin.Builtin("pretrain", run.train_size, image_size, seed=run.data_seed,
                                    level=run.data_level)
            norm = (builtin.BUILTIN_MEAN, builtin.BUILTIN_STD)
        elif run.data == "csv":
            pairs = data.CsvPairs(run.csv, run.csv_img_key, run.csv_caption_key, run.csv_separator,
                                  need_caption=not run.no_text)
            norm = (data.CC12M_MEAN, data.CC12M_STD)
        else:
            pairs = data.WebDatasetShards(run.wds_shards, **keys)
            norm = (data.CC12M_MEAN, data.CC12M_STD)
        flag = "text-file"
        extras = [data.TextLines(run.text_file)] if run.text_file else []
        flag = "image-dir"
        extras += [data.ImageOnlyFolder(run.image_dir)] if run.image_dir else []
    except ValueError as e:
        raise InputError(flag, str(e)) from None
    for flag, source in (("csv", pairs), ("image-dir", extras[-1] if run.image_dir else None)):
        if source is not None and isinstance(source, (data.CsvPairs, data.ImageOnlyFolder)):
            check_readable(flag, source, image_size)
    if run.data != "wds" and len(pairs) + sum(map(len, extras)) < run.batch_size:
        raise InputError("batch-size", f"{run.batch_size} is more than the "
             f"{len(pairs) + sum(map(len, extras))} samples of the data: no full batch")
    # --init-from: the normalisation the weights were trained with
    if init is not None and "data" in init:
        norm = (tuple(init["data"]["mean"]), tuple(init["data"]["std"]))
    return Sources(pairs, extras, norm)


def check_readable(flag, source, image_size, first=32):
    """Refuse a source none of whose first `first` images can be read (e.g. every path of a CSV is
    wrong)."""
    reasons = {}
    for i in range(min(first, len(source))):
        try:
            data.load_image(source[i]["image"], image_size)
            return
        except data.SkipSample as e:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
    raise InputError(flag, f"none of its first {min(first, len(source))} images can be read ("
         + ", ".join(f"{k}: {v}" for k, v in reasons.items())
         + "); paths in a CSV are relative to its folder")


def make_tokenizer(run, sources, init):
    """The run's tokenizer, and the bytes to keep in OUT_DIR: the run's own (at --resume),
    --tokenizer, --init-from's, else sentencepiece trained on the run's first captions, in a
    temporary folder (OUT_DIR is not written yet). The MAE baseline has none."""
    if run.no_text:
        return None
    try:
        if run.run_tokenizer and run.resume:
            tok = load_tokenizer(run.run_tokenizer)
        elif run.tokenizer:
            tok = load_tokenizer(run.tokenizer)
        elif init is not None:
            tok = checkpoint.checkpoint_tokenizer(init, run.init_from)
        else:
            corpus = itertools.chain(sources.pairs.captions(),
                                     *(e.captions() for e in sources.extras))
            total = None if run.data == "wds" else min(run.tokenizer_captions,
                                                       len(sources.pairs)
                                                       + sum(map(len, sources.extras)))
            corpus = tqdm(itertools.islice(corpus, run.tokenizer_captions), total=total,
                          desc="tokenizer corpus", unit=" captions", leave=False, mininterval=1.0)
            with tempfile.TemporaryDirectory() as tmp:
                tok = Tokenizer.train(corpus, os.path.join(tmp, rundir.TOKENIZER), run.vocab_size)
    except (ValueError, RuntimeError, OSError) as e:
        flag = "tokenizer" if run.tokenizer else ("init-from" if init is not None
                                                  else run.data.replace("wds", "wds-shards"))
        raise InputError(flag, "no tokenizer: "
             f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (--no-text trains the MAE "
             "baseline, which needs none)")
    return tok


def build_datasets(run, sources, tokenizer, config):
    """(pretraining dataset, (probe train, probe test) or None). Map-style (built-in, CSV, plus
    text-file / image-dir extras: exact resume) or a stream (webdataset shards)."""
    mean, std = sources.norm
    if run.data == "builtin":
        # Built-in captions name positions ("top left"): a flip or a crop would make them wrong, and
        # procedural data never runs short of distinct images. So: normalise only.
        transform = data.EvalTransform(config.image_size, mean, std, crop_pct=1.0)
    else:
        # RandomResizedCrop(0.2-1) + flip
        transform = data.PretrainTransform(config.image_size, mean, std)
    tok, T = tokenizer or NoText(), config.text_len
    if run.data == "wds":
        keys = dict(image_keys=run.wds_image_key.split(";"),
                    caption_keys=run.wds_caption_key.split(";"))
        dataset = data.WebDatasetShards(run.wds_shards, tokenizer=tok, text_len=T,
                                        transform=transform, paired_share=run.paired_share,
                                        seed=run.data_seed, **keys)
    else:
        # the paper's paired-share knob (section 4.1): a fraction of pairs stays paired, the rest is
        # split
        roles = data.paired_share_roles(len(sources.pairs), run.paired_share, run.data_seed)
        if run.no_text:  # the MAE baseline reads no caption
            roles = torch.full_like(roles, data.IMAGE_ONLY)
        parts = [data.PairedDataset(sources.pairs, tok, T, transform, roles=roles)]
        parts += [data.PairedDataset(extra, tok, T, transform) for extra in sources.extras]
        dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    probe_sets = None
    if run.data == "builtin":
        evaluate = data.EvalTransform(config.image_size, mean, std, crop_pct=1.0)
        probe_sets = tuple(data.LabelledDataset(builtin.Builtin(split, size, config.image_size,
                                                                seed=run.data_seed,
                                                                level=run.data_level), evaluate)
                           for split, size in (("train", run.probe_train_size),
                                               ("test", run.probe_test_size)))
    return dataset, probe_sets


class NoText:
    """The MAE baseline's stand-in tokenizer: every caption is empty (image-only samples; text never
    read)."""

    def encode(self, text, text_len):
        return torch.zeros(text_len, dtype=torch.int64), torch.ones(text_len, dtype=torch.bool)
