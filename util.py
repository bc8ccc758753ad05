"""What several scripts share, in one leaf module (it imports nothing of this project): seeded
sampling, the lr schedule, the command-line formatter, `knob`, the one way a setting is declared,
and write_atomic, the one way a file is written.

A setting is declared once, as a dataclass field made with `knob` (model.M3AEConfig, train.Run): its
default, its help text, what values are valid and how a --resume treats it live in the field's
metadata; the flag (`--text-mask-ratio` for `text_mask_ratio`), its check and its resume rule all
follow from it (add_flags, check_fields, resume_rule). No script keeps a list of flag names.
"""

import argparse
import dataclasses
import errno
import json
import math
import os
import shutil

import torch


# -----------------------------------------------------------------------------
# seeded sampling: every random draw keyed by numbers, not by a process-wide stream (exact resume,
# any rank count)


def mix_seed(*numbers):
    """A 63-bit seed from a few integers (SplitMix64-style mixing), e.g. (seed, epoch, index)."""
    x = 0
    for n in numbers:
        x = (x ^ (n + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) >> 1


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that sample (epoch, index) draws its augmentation from its own
    seed: what a sample looks like no longer depends on the worker, the rank or the resume point
    (exact resume)."""

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
    """Masking noise (B, N) and (B, T) from one generator seeded with `seed` (model.random_masking
    keeps the lowest-noise positions). train.py seeds it per global batch, mix_seed(seed, step, 1),
    and slices its rows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch_size, num_patches, generator=g),
            torch.rand(batch_size, text_len, generator=g))


def lr_at(step, max_lr, warmup, total, min_lr=0.0):
    """Linear warmup from 0 over `warmup` steps, then half-cosine to min_lr at
    `total` (per step)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# command line: one formatter for every script (the module docstring as it is, and every flag's
# default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every flag whose default is a value; a flag whose default is None
    or False says in its own help what happens without it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(doc, **kwargs):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, **kwargs)


# -----------------------------------------------------------------------------
# settings: each declared once, as a dataclass field; its flag, check and resume rule follow from it

# How a --resume treats a setting: "fixed" ones define what the run trains (a change is refused,
# naming it), "free" ones are taken from the run unless given again (--steps, --lr), "invocation"
# ones belong to one command and are never taken from the run (--device, --out-dir).
RESUME_RULES = ("fixed", "free", "invocation")


def knob(default, help=None, valid=None, *, choices=None, type=None, aliases=(), resume="fixed",
         shape=False, path=None, needs=None):
    """A dataclass field that declares a setting. help=None: no flag (the program sets it, e.g.
    vocab_size from the tokenizer). valid: (predicate, "what is valid"), e.g. at_least(1). type: the
    flag's type when the default is None. aliases: older flag names that still work. shape: the
    weights' shapes depend on it (so it comes from --init-from's checkpoint, never from a flag).
    path: "file" or "folder" that must exist when given. needs: the field that must be set too
    (e.g. --csv-img-key only with --csv)."""
    assert resume in RESUME_RULES, resume
    return dataclasses.field(default=default, metadata=dict(
        help=help, valid=valid, choices=choices, type=type, aliases=aliases, resume=resume,
        shape=shape, path=path, needs=needs))


def at_least(low, high=None):
    """Valid: finite, >= low (and <= high)."""
    what = f"must be >= {low}" if high is None else f"must be in [{low}, {high}]"
    return (lambda v: math.isfinite(v) and low <= v and (high is None or v <= high)), what


def fraction(high_open=True):
    """Valid: a fraction in [0, 1), or [0, 1] with high_open=False."""
    if high_open:
        return (lambda v: math.isfinite(v) and 0 <= v < 1), "must be in [0, 1)"
    return (lambda v: math.isfinite(v) and 0 <= v <= 1), "must be in [0, 1]"


def flag_name(name):
    return "--" + name.replace("_", "-")


def check_fields(obj):
    """Check every declared field of a dataclass instance against its `valid` and `choices` (None
    passes): ValueError, one line naming the flag, the value and what is valid."""
    for f in dataclasses.fields(obj):
        value, m = getattr(obj, f.name), f.metadata
        if value is None or not m:
            continue
        if m["choices"] and value not in m["choices"]:
            raise ValueError(f"argument {flag_name(f.name)}: {value!r} must be one of "
                             f"{', '.join(m['choices'])}")
        if m["valid"] and not (isinstance(value, (int, float)) and m["valid"][0](value)):
            raise ValueError(f"argument {flag_name(f.name)}: {value!r} {m['valid'][1]}")
        if m.get("path") and not (os.path.isfile if m["path"] == "file" else os.path.isdir)(value):
            raise ValueError(f"argument {flag_name(f.name)}: {value!r} is not a {m['path']}")
        if m.get("needs") and value is not False and not getattr(obj, m["needs"]):
            raise ValueError(f"argument {flag_name(f.name)}: only with {flag_name(m['needs'])}")


def add_flags(parser, cls, unset=False, note=None):
    """One flag per declared field of dataclass `cls`, named after it (`text_mask_ratio` ->
    --text-mask-ratio, plus its aliases). unset=True: every default is None (the value comes from
    elsewhere unless given, e.g. a model preset); note(field) -> text appended to the help."""
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m or not m["help"]:
            continue
        kind = m["type"] or type(f.default)
        kw = dict(dest=f.name, default=None if unset else f.default,
                  help=m["help"] + (note(f) if note else ""))
        # a switch that is off by default is --name alone; one that may be on, --no-name too
        if kind is bool:
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        else:
            kw.update(type=kind, choices=m["choices"])
        parser.add_argument(flag_name(f.name), *m["aliases"], **kw)


def resume_merge(cls, recorded, current, given):
    """--resume: each setting of dataclass `cls` comes from the run's record (`recorded`, a dict)
    unless it was given on this command line (`given`: names; `current`: this command's values by
    name) or its rule is "invocation" (this command's alone). Returns (the merged values by name,
    notes on the allowed changes, the refused ones: a given "fixed" setting that differs from the
    record)."""
    merged, notes, refused = {}, [], []
    for f in dataclasses.fields(cls):
        rule = f.metadata["resume"] if f.metadata else "fixed"
        if rule == "invocation" or f.name not in recorded:
            merged[f.name] = current[f.name]
        elif f.name not in given or current[f.name] == recorded[f.name]:
            merged[f.name] = recorded[f.name]
        else:
            change = f"{flag_name(f.name)} {recorded[f.name]!r} -> {current[f.name]!r}"
            (refused if rule == "fixed" else notes).append(change)
            merged[f.name] = current[f.name]
    return merged, notes, refused


# -----------------------------------------------------------------------------
# files: every file this project writes goes through write_atomic

# Every temp file is "<final name>.m3ae-tmp.<pid>": a name no user file has, so that removing a
# killed run's temp files can never touch anything else (tmp_path, is_our_tmp).
TMP_MARK = ".m3ae-tmp."


def tmp_path(path):
    return f"{path}{TMP_MARK}{os.getpid()}"


def is_our_tmp(name):
    """True for a file name tmp_path makes: <name>.m3ae-tmp.<digits>."""
    head, mark, pid = name.rpartition(TMP_MARK)
    return bool(head and mark and pid.isdigit())


class DiskFull(OSError):
    """No space left while writing; the message is one line naming the folder and what is as it
    was."""

    def __str__(self):
        return self.strerror  # the sentence itself, without "[Errno 28]"


def disk_full(e, folder):
    """Whether exception `e` means the disk of `folder` is full: ENOSPC on it or on its cause
    (torch's writer raises a RuntimeError without errno), or an OSError / RuntimeError with under 1
    MiB left. Measure it before the failed temp file is removed, or the free space it held hides the
    cause."""
    for x in (e, e.__cause__, e.__context__):
        if getattr(x, "errno", None) == errno.ENOSPC:
            return True
    return isinstance(e, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < (1 << 20)


# What an output may replace: nothing, or a file of the same kind this project writes, told by its
# first bytes (a result JSON names its "ckpt"); never a user's other file, e.g. a CSV or a
# checkpoint given as --out by mistake.
OUTPUT_KINDS = {
    "json": ("result JSON", lambda head, path: _json_keys(head, path, {"ckpt"})),
    "record": ("run record", lambda head, path: _json_keys(head, path, {"model", "run", "args"})),
    "jsonl": ("log", lambda head, path: head[:1] in (b"", b"{")),
    "sentencepiece": ("sentencepiece model", lambda head, path: head[:1] == b"\n"),
    "text": ("text file", lambda head, path: b"\0" not in head),
    "png": ("PNG", lambda head, path: head.startswith(b"\x89PNG\r\n\x1a\n")),
    "zip": ("torch.save / numpy file", lambda head, path: head.startswith(b"PK\x03\x04")),
    "pickle": ("pickle", lambda head, path: head[:1] == b"\x80"),
}


def _json_keys(head, path, keys):
    """A JSON object holding one of `keys` (a result names its "ckpt"; a run's record its "model")."""
    if head.lstrip()[:1] != b"{" or os.path.getsize(path) > (16 << 20):  # none of ours is that big
        return False
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except ValueError:  # not JSON, or not UTF-8
            return False
    return isinstance(obj, dict) and bool(keys & set(obj))


def foreign_output(path, kind):
    """Why an output of `kind` (OUTPUT_KINDS) must not replace `path`, in one line, or None when
    the path is free or holds an earlier output of that kind."""
    if not os.path.lexists(path):
        return None
    what, ours = OUTPUT_KINDS[kind]
    try:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if ours(f.read(8), path):
                    return None
    except OSError:  # unreadable: not known to be ours
        pass
    return (f"{path} exists and is not a {what} this project wrote: not replaced (move it or "
            "choose another path)")


def write_atomic(path, write, mode="wb", before_replace=None):
    """Write `path` through write(file) into its temp file (its folder made if need be), fsync,
    call before_replace() if given (e.g. keep the previous version), then os.replace: a crash, an
    error or a full disk leaves the old file as it was and no temp file behind. A full disk raises
    DiskFull, one line."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tmp_path(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so here
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: never leave the temp file behind
        full = isinstance(e, Exception) and disk_full(e, folder)
        if os.path.lexists(tmp):
            os.remove(tmp)
        if full:
            raise DiskFull(errno.ENOSPC, f"no space left on the device of {folder} while writing "
                           f"{os.path.basename(path)} ({shutil.disk_usage(folder).free >> 20} MiB "
                           "free); the file is as it was: free space, then run the command again "
                           "(train.py: with --resume)") from e
        raise
