"""An out-dir belongs to one run: train.py's bookkeeping of OUT_DIR, apart from the training loop.

    OUT_DIR/.lock          held (flock) while a train.py runs there: a second run in the same out-dir stops at once
    OUT_DIR/config.json    the run's model config, flags and data fingerprint, written when it starts
    OUT_DIR/ckpt.pt        the latest checkpoint; ckpt_prev.pt the one before it, kept until a new one is verified
    OUT_DIR/log.jsonl      one record per logged step (a resume drops the records it will replay)
    OUT_DIR/tokenizer.model  the tokenizer trained on this run's captions

Rules: a new run refuses an out-dir that holds another run's files unless told --overwrite; --resume takes every
flag the user does not repeat from the run itself and refuses a changed flag that would alter the model, the
tokenizer or the data (RESUME_FIXED), naming each; a checkpoint is written to a temp file, read back, and only
then replaces ckpt.pt (the old one becomes ckpt_prev.pt); temp files of killed runs are removed at start.
"""

import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil

import torch

CKPT, PREV, CONFIG, LOG, TOKENIZER, LOCK = "ckpt.pt", "ckpt_prev.pt", "config.json", "log.jsonl", "tokenizer.model", \
    ".lock"
RUN_FILES = (CKPT, PREV, CONFIG, LOG, TOKENIZER, "vocab.txt", "probe.json")

# Flags that a resume may not change: the model and its loss, the tokenizer, the data and the order it is read in.
RESUME_FIXED = ("preset", "image_size", "patch_size", "text_len", "image_mask_ratio", "text_mask_ratio", "image_weight",
                "text_weight", "no_text", "norm_pix", "data", "data_seed", "data_level", "train_size", "wds_shards",
                "epoch_samples", "csv", "csv_img_key", "csv_caption_key", "csv_separator", "wds_image_key",
                "wds_caption_key", "text_file", "image_dir", "paired_share", "tokenizer", "vocab_size", "seed",
                "batch_size")
# Flags that belong to one invocation, never taken from the run's record.
PER_INVOCATION = ("resume", "overwrite", "out_dir", "stop_after", "bench", "bench_steps", "device", "workers",
                  "compile", "dtype", "attn", "heads", "profile", "given", "resume_notes", "init_from")


class RunDirError(Exception):
    """A problem with OUT_DIR that the user must resolve; the message is one line that says how."""


# -----------------------------------------------------------------------------
# claiming the out-dir


def claim(out_dir, resume=False, overwrite=False):
    """Lock OUT_DIR for this process (released when it exits, even by kill -9), remove temp files of killed runs,
    and check the out-dir is this run's to use. Returns the open lock file: keep it alive for the whole run."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, LOCK), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise RunDirError(f"--out-dir {out_dir} is in use by another train.py (pid {holder}); one run per out-dir: "
                          f"wait for it or choose another --out-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp.*")):  # we hold the lock: no writer is alive
        os.remove(tmp)
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if present and overwrite:
        for name in present:
            os.remove(os.path.join(out_dir, name))
    elif present and not resume:
        lock.close()
        raise RunDirError(f"--out-dir {out_dir} already holds a run ({', '.join(present)}): pass --resume to continue "
                          f"it, --overwrite to delete it and start afresh, or choose another --out-dir")
    return lock


# -----------------------------------------------------------------------------
# what the run was told, and what it read


def file_fingerprint(path):
    """(size, sha256 of the first 64 MiB): catches an edited or replaced file without reading a huge one whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(64 << 20))
    return [os.path.getsize(path), h.hexdigest()[:16]]


def data_fingerprint(files=(), shards=(), folders=()):
    """What the run's data is, to compare at --resume: files by content, shards and folders by their listing."""
    fp = {os.path.abspath(p): file_fingerprint(p) for p in files if p}
    for s in shards:
        fp[os.path.abspath(s)] = [os.path.getsize(s)] if os.path.exists(s) else ["missing"]
    for folder in folders:
        if folder:
            listing = sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                             for d, _, names in os.walk(folder) for f in names)
            fp[os.path.abspath(folder)] = [len(listing), hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]]
    return fp


def recorded_args(out_dir):
    """The flags the run in OUT_DIR was started with (its checkpoint's, else its config.json's), or None."""
    for name, key in ((CKPT, "args"), (PREV, "args"), (CONFIG, "args")):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            if name == CONFIG:
                with open(path) as f:
                    return json.load(f)[key]
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key]
        except Exception:  # an unreadable checkpoint: the next file in the list speaks for the run
            continue
    return None


def merge_resume_args(args, given, recorded):
    """--resume: every flag the user did not give comes from the run's record; a given flag that differs is refused
    if it is in RESUME_FIXED. Returns the notes on the allowed changes (e.g. more steps)."""
    changed = {k: (recorded[k], getattr(args, k)) for k in given
               if k in recorded and k not in PER_INVOCATION and recorded[k] != getattr(args, k)}
    fixed = {k: v for k, v in changed.items() if k in RESUME_FIXED}
    if fixed:
        what = "; ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in fixed.items())
        raise RunDirError(f"--resume cannot change what the run trains on or with: {what} (drop these flags to "
                          f"continue as recorded, or start a new run in another --out-dir)")
    for k, v in recorded.items():
        if k not in given and k not in PER_INVOCATION and hasattr(args, k):
            setattr(args, k, v)
    return [f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items()]


def check_fingerprint(recorded, current):
    """Refuse a resume whose data or tokenizer files changed since the run started, naming each."""
    diff = [f"{p} ({recorded.get(p)} -> {current.get(p)})" for p in sorted(set(recorded) | set(current))
            if recorded.get(p) != current.get(p)]
    if diff:
        raise RunDirError(f"--resume: the run's data or tokenizer changed since it started: {'; '.join(diff[:5])}"
                          + (f" and {len(diff) - 5} more" if len(diff) > 5 else ""))


# -----------------------------------------------------------------------------
# checkpoints


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
    """Write ckpt to OUT_DIR/ckpt.pt safely: refuse non-finite weights or optimizer state; write a temp file, fsync,
    read it back; only then the old ckpt.pt becomes ckpt_prev.pt and the new one takes its place. A failed write
    removes its temp file and leaves ckpt.pt as it was; a full disk says so and names the directory."""
    bad = nonfinite({"model": ckpt["model"], "optimizer": ckpt.get("optimizer", {})})
    if bad:
        raise FloatingPointError(f"not saving a checkpoint with non-finite values ({', '.join(bad[:3])}"
                                 f"{' ...' if len(bad) > 3 else ''}); the last good checkpoint is "
                                 f"{os.path.join(out_dir, CKPT)}")
    path = os.path.join(out_dir, CKPT)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        if torch.load(tmp, map_location="cpu", weights_only=True, mmap=True).get("step") != ckpt.get("step"):
            raise OSError(f"{tmp} did not read back as written")
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(out_dir).free
        full = getattr(e, "errno", None) == errno.ENOSPC or (isinstance(e, (OSError, RuntimeError)) and
                                                             free < max(written, 1 << 20))
        if full:
            raise RunDirError(f"no space left on the device of {os.path.abspath(out_dir)} while writing a checkpoint "
                              f"({free >> 20} MiB free, {written >> 20} MiB written when it failed); "
                              f"{CKPT} is as it was: free space, then --resume") from e
        raise
    if os.path.exists(path):  # ckpt.pt -> ckpt_prev.pt by a hard link, so that ckpt.pt never goes missing
        prev, prev_tmp = os.path.join(out_dir, PREV), f"{os.path.join(out_dir, PREV)}.tmp.{os.getpid()}"
        try:
            os.link(path, prev_tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, prev_tmp)
        os.replace(prev_tmp, prev)
    os.replace(tmp, path)


def load_checkpoint(out_dir, map_location="cpu", set_aside=True):
    """(checkpoint dict, file name) of the newest readable checkpoint in OUT_DIR, or (None, None) when there is
    none. An unreadable ckpt.pt (truncated, corrupt) is set aside as ckpt.pt.corrupt (by rank 0 alone:
    set_aside), with a message, and the previous one is used."""
    for name in (CKPT, PREV):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            return torch.load(path, map_location=map_location, weights_only=True), name
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if set_aside:
                os.replace(path, path + ".corrupt")
                print(f"{path} cannot be read ({reason}); moved to {name}.corrupt, trying {PREV}")
    if os.path.exists(os.path.join(out_dir, CKPT + ".corrupt")):
        raise RunDirError(f"no readable checkpoint in {out_dir} (see {CKPT}.corrupt); --overwrite starts afresh")
    return None, None


def trim_log(out_dir, step):
    """Keep the log records of steps <= step (a resume replays the steps after its checkpoint)."""
    path = os.path.join(out_dir, LOG)
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp.log", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp.log", path)
