"""What several scripts share, in one leaf module (it imports no script): seeded sampling, the lr schedule,
atomic writes, the command-line formatter, and the conventions a checkpoint carries about how it was trained.

Checkpoint convention (every key loads with torch.load(weights_only=True)):
  model, config          model.checkpoint_dict: the state dict and the M3AEConfig fields
  args                   train.py's flags (what the run was told), when train.py wrote it
  data                   {"mean", "std", "source"}: the normalisation the encoder was trained with
  tokenizer              {"kind", "blob"}: the tokenizer itself (tokenizer.py), so a checkpoint is self-contained
  optimizer, step, epoch, batch_in_epoch, rng    train.py's resume state
Older checkpoints lack `data` / `tokenizer`: checkpoint_norm and the scripts fall back to `args`.
"""

import argparse
import math
import os

import torch

import builtin
import data
from tokenizer import load_tokenizer, tokenizer_from_bytes

NORMS = {"builtin": (builtin.BUILTIN_MEAN, builtin.BUILTIN_STD), "cc12m": (data.CC12M_MEAN, data.CC12M_STD),
         "imagenet": (data.IMAGENET_MEAN, data.IMAGENET_STD)}


# -----------------------------------------------------------------------------
# seeded sampling: every random draw keyed by numbers, not by a process-wide stream (exact resume, any rank count)


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


def masking_noise(seed, batch_size, num_patches, text_len):
    """Masking noise (B, N) and (B, T) from one generator seeded with `seed` (model.random_masking keeps the
    lowest-noise positions). train.py seeds it per global batch, mix_seed(seed, step, 1), and slices its rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, num_patches, generator=g), torch.rand(batch_size, text_len, generator=g)


def lr_at(step, max_lr, warmup, total, min_lr=0.0):
    """Linear warmup from 0 over `warmup` steps, then half-cosine to min_lr at `total` (per step)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# files


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, fsync, then os.replace: a crash leaves the old file intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# command line: one formatter for every script (the module docstring as it is, and every flag's default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every flag whose default is a value; a flag whose default is None or False says
    in its own help what happens without it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(doc, **kwargs):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, **kwargs)


# -----------------------------------------------------------------------------
# what a checkpoint says about its training


def checkpoint_norm(ckpt, real_data_default=False):
    """(mean, std) the encoder was trained with: the checkpoint's `data` entry, else its train.py --data (the
    built-in statistics for built-in runs, CC12M's for real data); with neither, CC12M's when evaluating on real
    folders (real_data_default) and the built-in statistics otherwise."""
    if "data" in ckpt:
        return tuple(ckpt["data"]["mean"]), tuple(ckpt["data"]["std"])
    default = "cc12m" if real_data_default else "builtin"
    pretrained_on = ckpt.get("args", {}).get("data", default)
    return NORMS["builtin" if pretrained_on == "builtin" else "cc12m"]


def checkpoint_data_seed(ckpt):
    return ckpt.get("args", {}).get("data_seed", 0)


def checkpoint_data_level(ckpt):
    """The built-in difficulty the checkpoint was pretrained on ("hard" for checkpoints older than the knob)."""
    return ckpt.get("args", {}).get("data_level", "hard")


def pretraining_info(ckpt):
    """What the checkpoint was trained with (from train.py's args), for result files and the sweep table."""
    a = ckpt.get("args", {})
    keys = ("steps", "seed", "no_text", "text_mask_ratio", "image_mask_ratio", "paired_share", "data", "data_seed",
            "data_level")
    return {k: a[k] for k in keys if k in a}


def checkpoint_tokenizer(ckpt, ckpt_path=None, override=None):
    """The tokenizer of a checkpoint: `override` (a --tokenizer file of either kind) if given, else the one the
    checkpoint carries (train.py and convert.py --tokenizer record it), else the file its run was told to use,
    else tokenizer.model next to it. Raises ValueError (one line, the places tried) when there is none, or when
    its vocabulary is larger than the model's text embedding."""
    vocab = ckpt.get("config", {}).get("vocab_size")
    tried = []
    if override:
        tok = load_tokenizer(override)
    elif "tokenizer" in ckpt:
        tok = tokenizer_from_bytes(ckpt["tokenizer"]["kind"], ckpt["tokenizer"]["blob"])
    else:
        tok = None
        tried = [ckpt.get("args", {}).get("tokenizer"),
                 os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "tokenizer.model") if ckpt_path else None]
        for path in filter(None, tried):
            if os.path.exists(path):
                tok = load_tokenizer(path)
                break
        if tok is None:
            raise ValueError(f"no tokenizer: the checkpoint carries none and none was found (tried "
                             f"{[t for t in tried if t]}); pass --tokenizer (a sentencepiece .model or a vocab.txt)")
    if vocab is not None and tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model's text embedding only {vocab}: not this "
                         "checkpoint's tokenizer")
    return tok
