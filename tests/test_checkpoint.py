"""checkpoint.py: the format's conventions, temp names only this project makes, and writes that fail cleanly."""

import errno
import os
import pickle

import pytest
import torch

import checkpoint
import util
from model import M3AE, make_config


def test_checkpoint_norm_prefers_the_data_entry_then_args():
    norm = checkpoint.checkpoint_norm
    assert norm({"data": {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]}}) == ((0.1, 0.2, 0.3), (1, 2, 3))
    assert norm({"args": {"data": "builtin"}}) == checkpoint.NORMS["builtin"]
    assert norm({"args": {"data": "csv"}}) == checkpoint.NORMS["cc12m"]
    assert norm({}) == checkpoint.NORMS["builtin"]
    assert norm({}, real_data_default=True) == checkpoint.NORMS["cc12m"]


def test_temp_names_are_ours_alone():
    assert util.is_our_tmp(os.path.basename(util.tmp_path("/x/ckpt.pt")))
    for user_file in ("thesis.tmp.docx", "ckpt.pt.tmp.123", "notes.m3ae-tmp.txt", ".m3ae-tmp.12", "a.m3ae-tmp."):
        assert not util.is_our_tmp(user_file), user_file


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/m3ae_evil_ran",))


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "garbage", "pickle", "no_model"])
def test_read_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path, case):
    path = tmp_path / "x.pt"
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(1000))
    elif case == "pickle":
        path.write_bytes(pickle.dumps(Evil()))
    elif case == "no_model":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not os.path.exists("/tmp/m3ae_evil_ran")


def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    """ENOSPC with its real errno, or torch's writer error with no errno on a disk with no space left: the old
    file stays, the temp file is removed, and the message says so (measured before the temp file goes)."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(util.DiskFull, match="no space left on the device of .* while writing ckpt.pt"):
        util.write_atomic(str(path), full)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]

    def torch_style(f):  # torch's PytorchStreamWriter raises RuntimeError without an errno
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")

    monkeypatch.setattr(util.shutil, "disk_usage", lambda p: os.statvfs_result if False else
                        type("U", (), {"free": 1000, "total": 10**9, "used": 10**9})())
    with pytest.raises(util.DiskFull):
        util.write_atomic(str(path), torch_style)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_both_checkpoints_corrupt_is_one_line_and_keeps_every_copy(tmp_path):
    model = M3AE(make_config("tiny", vocab_size=50))
    for step in (1, 2):
        checkpoint.save_checkpoint(checkpoint.checkpoint_dict(model, step=step), str(tmp_path))
    for name in ("ckpt.pt", "ckpt_prev.pt"):
        (tmp_path / name).write_bytes(b"damaged " + name.encode())
    (tmp_path / "ckpt.pt.corrupt").write_bytes(b"an earlier damaged one")
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path))
    kept = sorted(os.listdir(tmp_path))
    assert kept == ["ckpt.pt.corrupt", "ckpt.pt.corrupt.1", "ckpt_prev.pt.corrupt"]
    assert (tmp_path / "ckpt.pt.corrupt").read_bytes() == b"an earlier damaged one"
    with pytest.raises(checkpoint.CheckpointError):  # and again on the next try: never a silent fresh start
        checkpoint.load_checkpoint(str(tmp_path))
