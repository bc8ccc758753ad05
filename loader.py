"""Where a training process runs and how it is fed: torchrun ranks and devices (Env, setup), and the run's one
DataLoader, whose order depends on (seed, epoch, index) alone, so that a resumed run, a run on more ranks and a
run with more workers see the same samples (train.py's exact resume). Map-style data goes through an
EpochKeys sampler; a webdataset stream takes its epoch through set_epoch.
"""

import itertools
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
from util import SeededSamples, mix_seed


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. a stream pass that gives no batch); the message is one line."""


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
                    raise DataError(
                        f"a pass over {len(dataset.shards)} shard(s) gave no batch of {loader.batch_size} on rank "
                        f"{env.rank} ({env.world} rank(s) x {max(loader.num_workers, 1)} loader(s) each): every shard "
                        f"is empty or unreadable, or each worker reads fewer than {loader.batch_size} usable samples "
                        f"(drop_last); use fewer --workers, a smaller --batch-size or more shards")

        return itertools.islice(endless(), skip * grad_accum, None), epoch_samples // global_batch
    keys, steps = epoch_indices(len(dataset), per_rank, env.rank, env.world, seed, epoch)
    loader.sampler.keys = keys[skip * per_rank :]
    return iter(loader), steps
