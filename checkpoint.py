"""The checkpoint format, in one place: what a checkpoint holds, how it is written and read back.

A checkpoint is a dict; every entry loads with torch.load(weights_only=True):
  model, config          the state dict and the M3AEConfig fields (asdict): the model is rebuilt
                         from these alone
  args                   train.py's run settings (train.Run), when train.py wrote it
  data                   {"mean", "std", "source"}: the normalisation the encoder was trained with
  tokenizer              {"kind", "blob"}: the tokenizer itself (tokenizer.py), so a checkpoint is
                         self-contained
  optimizer, step, epoch, batch_in_epoch, rng, fingerprint    train.py's resume state
Older checkpoints lack `data` / `tokenizer`: checkpoint_norm and the scripts fall back to `args`.

Writing (save_checkpoint): never with a NaN or an infinity; a temp file only this project names
(TMP_MARK), fsync, read back, and only then it replaces ckpt.pt, whose previous version becomes
ckpt_prev.pt.
"""

import os
import shutil
from dataclasses import asdict, fields

import torch

import builtin
import data
from model import M3AE, M3AEConfig
from tokenizer import load_tokenizer, tokenizer_from_bytes
from util import tmp_path, write_atomic

CKPT, PREV = "ckpt.pt", "ckpt_prev.pt"
NORMS = {"builtin": (builtin.BUILTIN_MEAN, builtin.BUILTIN_STD),
         "cc12m": (data.CC12M_MEAN, data.CC12M_STD),
         "imagenet": (data.IMAGENET_MEAN, data.IMAGENET_STD)}


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message is one line naming it."""


# -----------------------------------------------------------------------------
# building and reading


def checkpoint_dict(model, **extra):
    return {"model": model.state_dict(), "config": asdict(model.config), **extra}


def read(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True) with a one-line CheckpointError for anything that is not a
    checkpoint this project (or torch.save of plain tensors) wrote: a missing file, a folder,
    garbage, a pickle that would run code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: an empty file, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        reason = lines[0][:200] if lines else type(e).__name__
        named = [x for x in lines if "GLOBAL" in x or "Unsupported global" in x]
        if named:  # a pickle naming code to run: refused, never loaded
            reason = f"it names Python code to run, refused ({named[0][:120]})"
        elif "Weights only load failed" in str(e):  # any other bytes torch.save did not write
            what = next((x for x in lines if x.startswith("Unsupported")),
                        "not torch.save's format")
            reason = f"not a file torch.save wrote ({what})"
        raise CheckpointError(f"{path}: not a readable checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model / config "
                              "entry); convert.py turns official and mae checkpoints into one")
    return ckpt


def model_config(ckpt, **overrides):
    """The M3AEConfig a checkpoint was written with (fields this version does not know are
    refused)."""
    names = {f.name for f in fields(M3AEConfig)}
    unknown = set(ckpt["config"]) - names
    if unknown:
        raise CheckpointError("the checkpoint's config has fields this code does not know: "
                              f"{sorted(unknown)}")
    return M3AEConfig(**{**ckpt["config"], **overrides})


def load_model(path, map_location="cpu", **config_overrides):
    """Build an M3AE from a checkpoint written by train.py or convert.py. Returns (model,
    checkpoint)."""
    ckpt = read(path, map_location)
    try:
        model = M3AE(model_config(ckpt, **config_overrides))
        model.load_state_dict(ckpt["model"])
    # a config or weights that do not fit the model
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: its weights do not fit its config: {first}") from None
    return model, ckpt


# -----------------------------------------------------------------------------
# what a checkpoint says about its training


def checkpoint_norm(ckpt, real_data_default=False):
    """(mean, std) the encoder was trained with: the checkpoint's `data` entry, else its train.py
    --data (the built-in statistics for built-in runs, CC12M's for real data); with neither, CC12M's
    when evaluating on real folders (real_data_default) and the built-in statistics otherwise."""
    if "data" in ckpt:
        return tuple(ckpt["data"]["mean"]), tuple(ckpt["data"]["std"])
    default = "cc12m" if real_data_default else "builtin"
    pretrained_on = ckpt.get("args", {}).get("data", default)
    return NORMS["builtin" if pretrained_on == "builtin" else "cc12m"]


def checkpoint_data_seed(ckpt):
    return ckpt.get("args", {}).get("data_seed", 0)


def checkpoint_data_level(ckpt):
    """The built-in difficulty the checkpoint was pretrained on ("hard" for checkpoints older than
    the knob)."""
    return ckpt.get("args", {}).get("data_level", "hard")


def pretraining_info(ckpt):
    """What the checkpoint was trained with, for result files and the sweep table: the run's
    settings that tell runs apart (train.py's args) and the model's masking and loss fields."""
    a, c = ckpt.get("args", {}), ckpt.get("config", {})
    run = {k: a[k] for k in ("steps", "seed", "no_text", "paired_share", "data", "data_seed",
                             "data_level")
           if k in a}
    objective = {f.name: c[f.name] for f in fields(M3AEConfig) if f.name in c
                 and not f.metadata["shape"] and f.metadata["resume"] == "fixed"}
    return {**run, **objective}


def checkpoint_tokenizer(ckpt, ckpt_path=None, override=None):
    """The tokenizer of a checkpoint: `override` (a --tokenizer file of either kind) if given, else
    the one the checkpoint carries (train.py and convert.py --tokenizer record it), else the file
    its run was told to use, else tokenizer.model next to it. Raises ValueError (one line, the
    places tried) when there is none, or when its vocabulary is larger than the model's text
    embedding."""
    vocab = ckpt.get("config", {}).get("vocab_size")
    tried = []
    if override:
        tok = load_tokenizer(override)
    elif "tokenizer" in ckpt:
        tok = tokenizer_from_bytes(ckpt["tokenizer"]["kind"], ckpt["tokenizer"]["blob"])
    else:
        tok = None
        tried = [ckpt.get("args", {}).get("tokenizer"),
                 os.path.join(os.path.dirname(os.path.abspath(ckpt_path)),
                              "tokenizer.model") if ckpt_path else None]
        for path in filter(None, tried):
            if os.path.exists(path):
                tok = load_tokenizer(path)
                break
        if tok is None:
            raise ValueError("no tokenizer: the checkpoint carries none and none was found (tried "
                             f"{[t for t in tried if t]}); pass --tokenizer (a sentencepiece "
                             ".model or a vocab.txt)")
    if vocab is not None and tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model's text embedding only "
                         f"{vocab}: not this checkpoint's tokenizer")
    return tok


# -----------------------------------------------------------------------------
# writing: temp file, fsync, replace; never a NaN; a full disk said in words


def nonfinite(tensors):
    """Names of the floating tensors in a (nested) dict / list that hold a NaN or an infinity."""
    bad = []

    def walk(x, name):
        if torch.is_tensor(x):
            if x.is_floating_point() and not torch.isfinite(x).all():
                bad.append(name)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}.{i}")

    walk(tensors, "")
    return bad


def save_checkpoint(ckpt, out_dir):
    """Write ckpt to OUT_DIR/ckpt.pt safely: refuse non-finite weights or optimizer state; write a
    temp file, fsync, read it back (write_atomic's write step); only then the old ckpt.pt becomes
    ckpt_prev.pt (a hard link, so that ckpt.pt never goes missing) and the new one takes its
    place."""
    bad = nonfinite({"model": ckpt["model"], "optimizer": ckpt.get("optimizer", {})})
    path = os.path.join(out_dir, CKPT)
    if bad:
        raise FloatingPointError("not saving a checkpoint with non-finite values "
                                 f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); the "
                                 f"last good checkpoint is {path}")

    def write(f):
        torch.save(ckpt, f)
        f.flush()
        if (torch.load(f.name, map_location="cpu", weights_only=True, mmap=True).get("step")
                != ckpt.get("step")):
            raise OSError(f"{f.name} did not read back as written")

    def keep_previous():  # ckpt.pt -> ckpt_prev.pt by a hard link: ckpt.pt never goes missing
        if os.path.exists(path):
            prev = os.path.join(out_dir, PREV)
            prev_tmp = tmp_path(prev)
            try:
                os.link(path, prev_tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)

    write_atomic(path, write, before_replace=keep_previous)


def set_aside(path):
    """Rename a damaged file to <path>.corrupt (or .corrupt.1, .2, ...: an earlier one is never
    overwritten)."""
    target, n = path + ".corrupt", 0
    while os.path.exists(target):
        n += 1
        target = f"{path}.corrupt.{n}"
    os.replace(path, target)
    return target


def load_checkpoint(out_dir, map_location="cpu", aside=True):
    """(checkpoint dict, file name) of the newest readable checkpoint in OUT_DIR, or (None, None)
    when there is none. An unreadable one (truncated, corrupt) is set aside (by rank 0 alone: aside)
    with a message, and the previous one is tried; CheckpointError when both exist and neither
    reads."""
    damaged = []
    for name in (CKPT, PREV):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            return torch.load(path, map_location=map_location, weights_only=True), name
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            moved = set_aside(path) if aside else path
            damaged.append(os.path.basename(moved))
            print(f"{path} cannot be read ({reason}); moved to {os.path.basename(moved)}")
    if damaged or any(n.startswith(CKPT + ".corrupt") for n in os.listdir(out_dir)):
        raise CheckpointError(f"no readable checkpoint in {out_dir} (set aside: "
                              f"{', '.join(damaged) or CKPT + '.corrupt'}); "
                              "--overwrite starts afresh")
    return None, None
