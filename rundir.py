"""An out-dir belongs to one run: train.py's bookkeeping of OUT_DIR, apart from the training loop.

    OUT_DIR/.lock          held (flock) while a train.py runs there: a second run in the same
                           out-dir stops at once
    OUT_DIR/config.json    the run's settings (train.Run), model config and data fingerprint
    OUT_DIR/ckpt.pt        the latest checkpoint; ckpt_prev.pt the one before it (checkpoint.py
                           writes both)
    OUT_DIR/log.jsonl      one record per logged step (a resume drops the records it will replay)
    OUT_DIR/curves.png     the log drawn (plots.training_curves), at each save
    OUT_DIR/tokenizer.model or vocab.txt    the run's tokenizer
    OUT_DIR/outputs.txt    what probe.py, ood.py and viz.py wrote here (so that --overwrite can
                           remove it)

Rules: nothing is written into OUT_DIR until every input was checked (check_out_dir, then claim). A
new run refuses an out-dir that holds another run unless told --overwrite, which then deletes the
files a run writes (the names above, each with the content a run writes, and those outputs.txt
lists), never a file given as an input, and nothing else; a file of one of those names with other
content (a user's own config.json) refuses the out-dir whatever the flags. Only temp files with this
project's mark (util.TMP_MARK) are ever removed as leftovers of a killed run. --resume takes every
setting the user does not repeat from the run's record and refuses a changed "fixed" one
(util.resume_merge reads the rule from each setting's declaration).
"""

import fcntl
import hashlib
import json
import os

import torch

from checkpoint import CKPT, PREV
from util import DiskFull, foreign_output, is_our_tmp, write_atomic

CONFIG, LOG, TOKENIZER, VOCAB, LOCK, OUTPUTS = ("config.json", "log.jsonl", "tokenizer.model",
                                                "vocab.txt", ".lock", "outputs.txt")
CURVES = "curves.png"
# the files a run writes, each with the kind its content is (util.OUTPUT_KINDS): a file of that name
# and another content (a user's own config.json) is not the run's, and is never deleted or replaced
RUN_FILES = {CKPT: "zip", PREV: "zip", CONFIG: "record", LOG: "jsonl", TOKENIZER: "sentencepiece",
             VOCAB: "text", "probe.json": "record", CURVES: "png", OUTPUTS: "text"}


class RunDirError(Exception):
    """A problem with OUT_DIR that the user must resolve; the message is one line that says how."""


# -----------------------------------------------------------------------------
# claiming the out-dir: checked first (read only), claimed once every input is known good


def run_files(out_dir):
    """The files of a run present in OUT_DIR: the fixed names whose content is what a run writes,
    and what outputs.txt lists (inside OUT_DIR)."""
    names = [n for n, kind in RUN_FILES.items() if os.path.isfile(os.path.join(out_dir, n))
             and foreign_output(os.path.join(out_dir, n), kind) is None]
    listed = os.path.join(out_dir, OUTPUTS)
    if os.path.isfile(listed):
        root = os.path.realpath(out_dir)
        with open(listed, errors="replace") as f:
            for line in f:
                path = os.path.realpath(os.path.join(out_dir, line.strip()))
                if line.strip() and path.startswith(root + os.sep) and os.path.isfile(path):
                    names.append(os.path.relpath(path, root))
    return sorted(set(names))


def check_out_dir(out_dir, resume=False, overwrite=False):
    """Read-only checks before any work: OUT_DIR (or the folder it will be made in) is a writable
    folder, and holds no other run unless --resume or --overwrite says what to do with it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"--out-dir {out_dir} is a file, not a folder")
    parent = out_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"--out-dir {out_dir}: {parent} is not writable by this user")
    foreign = [foreign_output(os.path.join(out_dir, n), kind) for n, kind in RUN_FILES.items()]
    foreign = [line for line in foreign if line]
    if foreign:  # the run would write over it: refused whatever the flags
        raise RunDirError(f"--out-dir {out_dir}: {foreign[0]}; a run writes a file of that name: "
                          "choose another --out-dir")
    present = run_files(out_dir) if os.path.isdir(out_dir) else []
    if present and not (resume or overwrite):
        raise RunDirError(f"--out-dir {out_dir} already holds a run ({', '.join(present[:6])}): "
                          "pass --resume to continue it, --overwrite to delete it and start "
                          "afresh, or choose another --out-dir")


def claim(out_dir, overwrite=False, inputs=()):
    """Lock OUT_DIR for this process (released when it exits, even by kill -9), remove this
    project's temp files of killed runs, and with --overwrite delete the previous run's files,
    except any of `inputs` (paths the user passed in). Returns the open lock file: keep it alive for
    the whole run."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, LOCK), "a+")
    except OSError as e:  # e.g. a read-only or virtual file system that os.access could not tell
        raise RunDirError(f"--out-dir {out_dir} cannot be made or written: {e.strerror or e}") \
            from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise RunDirError(f"--out-dir {out_dir} is in use by another train.py (pid {holder}); one "
                          "run per out-dir: wait for it or choose another --out-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    for name in os.listdir(out_dir):  # we hold the lock: no writer of ours is alive
        if is_our_tmp(name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    if overwrite:
        keep = {os.path.realpath(p) for p in inputs if p}
        for name in run_files(out_dir):
            path = os.path.join(out_dir, name)
            if os.path.realpath(path) not in keep:
                os.remove(path)
                prune(os.path.dirname(path), out_dir)
    return lock


def prune(folder, out_dir):
    """Remove FOLDER and the folders above it, up to OUT_DIR (kept), while each is empty: the
    sub-folders a run's outputs made (features/, viz/) go with them; one holding anything stays."""
    root = os.path.realpath(out_dir)
    folder = os.path.realpath(folder)
    while folder.startswith(root + os.sep):
        try:
            os.rmdir(folder)  # only ever an empty folder
        except OSError:
            return
        folder = os.path.dirname(folder)


def record_output(folder, path):
    """Note in FOLDER/outputs.txt that a script wrote `path` there (so that --overwrite removes
    it)."""
    rel = os.path.relpath(path, folder)
    listed = os.path.join(folder, OUTPUTS)
    if os.path.isfile(listed):
        with open(listed, errors="replace") as f:
            if rel in (line.strip() for line in f):
                return
    fd = os.open(listed, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one write of O_APPEND: lines of scripts writing at once never interleave
        os.write(fd, (rel + "\n").encode())
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# what the run was told, and what it read


def file_fingerprint(path):
    """(size, sha256 of the first 64 MiB): catches an edited or replaced file without reading a huge
    one whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(64 << 20))
    return [os.path.getsize(path), h.hexdigest()[:16]]


def folder_fingerprint(folder):
    """(file count, hash of the relative names and sizes); unreadable entries (dangling links) count
    as size -1."""
    listing = []
    for d, _, names in os.walk(folder):
        for f in names:
            path = os.path.join(d, f)
            listing.append((os.path.relpath(path, folder),
                            os.path.getsize(path) if os.path.exists(path) else -1))
    listing.sort()
    return [len(listing), hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]]


def data_fingerprint(files=None, shards=(), folders=None, tokenizer_bytes=None):
    """What the run's data is, to compare at --resume, keyed by role (e.g. "csv"), never by where a
    file sits: a run folder that is moved or copied still resumes. files, folders: {role: path or
    None}."""
    fp = {role: file_fingerprint(p) for role, p in (files or {}).items() if p}
    fp.update({role: folder_fingerprint(p) for role, p in (folders or {}).items() if p})
    if shards:
        listing = [(os.path.basename(s),
                    os.path.getsize(s) if os.path.exists(s) else -1) for s in shards]
        fp["shards"] = [len(listing), hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]]
    if tokenizer_bytes is not None:
        fp["tokenizer"] = hashlib.sha256(tokenizer_bytes).hexdigest()[:16]
    return fp


def check_fingerprint(recorded, current):
    """Refuse a resume whose data or tokenizer changed since the run started, naming each. A record
    of an older version (keyed by absolute paths) cannot be compared: it is skipped, with a note."""
    if any(os.path.isabs(k) for k in recorded):
        print("note: the run's data fingerprint is of an older version (absolute paths); not "
              "compared")
        return
    diff = [f"{k} ({recorded.get(k)} -> {current.get(k)})"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if diff:
        raise RunDirError("--resume: the run's data or tokenizer changed since it started: "
                          f"{'; '.join(diff[:5])}"
                          + (f" and {len(diff) - 5} more" if len(diff) > 5 else ""))


def recorded(out_dir):
    """What the run in OUT_DIR recorded, {"run": settings, "model": config} (its checkpoint's, else
    its config.json's), or None. A record of an older version (settings under "args") is read the
    same way."""
    for name in (CKPT, PREV, CONFIG):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            if name == CONFIG:
                with open(path) as f:
                    rec = json.load(f)
                return {"run": rec.get("run", rec.get("args")), "model": rec["model"]}
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return {"run": ckpt["args"], "model": ckpt["config"]}
        except Exception:  # an unreadable file: the next one in the list speaks for the run
            continue
    return None


def write_config(out_dir, record):
    write_atomic(os.path.join(out_dir, CONFIG), lambda f: json.dump(record, f, indent=2), mode="w")


# -----------------------------------------------------------------------------
# the log


def read_log(out_dir):
    """The records of OUT_DIR/log.jsonl; a line that does not parse (cut by a full disk or a kill)
    is dropped."""
    path = os.path.join(out_dir, LOG)
    records = []
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return [r for r in records if isinstance(r, dict)]


def trim_log(out_dir, step):
    """Keep the log records of steps <= step (a resume replays the steps after its checkpoint),
    dropping a cut line; written atomically."""
    if os.path.isfile(os.path.join(out_dir, LOG)):
        keep = [r for r in read_log(out_dir) if r.get("step", 0) <= step]
        write_atomic(os.path.join(out_dir, LOG),
                     lambda f: f.writelines(json.dumps(r) + "\n" for r in keep), "w")


def append_log(log_file, record):
    """One record per line; a full disk says so in one line (the cut line is dropped at
    --resume)."""
    try:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    except OSError as e:
        folder = os.path.dirname(os.path.abspath(log_file.name))
        raise DiskFull(e.errno, f"cannot write {log_file.name}: {e.strerror}; free space in "
                       f"{folder}, then --resume (a cut last line is dropped)") from e
