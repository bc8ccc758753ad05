"""An out-dir belongs to one run (rundir.py, train.py): nothing is written before every input is checked, only
the run's own files are ever deleted, and every fault (a cut log line, a full disk, a moved folder) resumes."""

import errno
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import rundir
import train
import util

SMALL = ["--preset", "tiny", "--train-size", "96", "--batch-size", "16", "--workers", "0", "--warmup-steps", "2",
         "--log-every", "1", "--vocab-size", "256", "--no-probe"]


def run(out_dir, *extra):
    return train.main(SMALL + ["--out-dir", str(out_dir), *extra])


def refused(capsys, out_dir, *extra):
    """Run train.py expecting a one-line refusal (exit 2); returns that line."""
    with pytest.raises(SystemExit) as e:
        run(out_dir, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    return err[-1]


def step(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["step"]


def listing(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def captioned_images(folder, n=8, captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,caption" if captions else "filepath"]
    for i in range(n):
        Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,a photo number {i}" if captions else f"{i}.png")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "pairs.csv")


def test_a_refused_start_touches_no_file(tmp_path, capsys):
    """The reproduced loss: a *.tmp.* file of the user's was deleted before the out-dir was refused."""
    out = tmp_path / "x"
    out.mkdir()
    (out / "thesis.tmp.docx").write_text("draft")
    (out / "config.json").write_text('{"run": {}, "model": {}}')  # a run's record
    before = listing(out)
    assert "already holds a run (config.json)" in refused(capsys, out, "--steps", "2")
    assert listing(out) == before and not (out / ".lock").exists()


def test_overwrite_checks_every_input_first_and_spares_the_users_files(tmp_path, capsys):
    run(tmp_path / "r", "--steps", "2")
    before = listing(tmp_path / "r")
    (tmp_path / "garbage.model").write_bytes(os.urandom(300))
    line = refused(capsys, tmp_path / "r", "--steps", "2", "--overwrite", "--tokenizer", str(tmp_path / "garbage.model"))
    assert "--tokenizer" in line and listing(tmp_path / "r") == before  # the old run is intact
    # a CSV whose captions are all empty: no tokenizer can be trained; refused before the old run is touched
    csv = captioned_images(tmp_path / "d", 16)
    with open(csv, "w") as f:
        f.write("filepath,caption\n" + "".join(f"{i}.png,\n" for i in range(8)) * 2)
    assert "no tokenizer" in refused(capsys, tmp_path / "r", "--steps", "2", "--overwrite", "--csv", csv)
    assert listing(tmp_path / "r") == before
    # the user's own vocab.txt kept in the out-dir and passed as --tokenizer: kept, and used
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "shape", "colour"] +
                      [chr(c) for c in range(ord("a"), ord("z") + 1)]) + "\n"
    (tmp_path / "r" / "vocab.txt").write_text(vocab)
    (tmp_path / "r" / "notes.txt").write_text("mine")
    (tmp_path / "r" / "probe_old.json").write_text("{}")
    rundir.record_output(str(tmp_path / "r"), str(tmp_path / "r" / "probe_old.json"))  # what probe.py does
    for sub, mine in (("features", False), ("viz", True)):  # a feature cache; pictures beside a note
        (tmp_path / "r" / sub / "k").mkdir(parents=True)
        (tmp_path / "r" / sub / "k" / "x.pt").write_bytes(b"0")
        rundir.record_output(str(tmp_path / "r"), str(tmp_path / "r" / sub / "k" / "x.pt"))
        if mine:
            (tmp_path / "r" / sub / "keep.txt").write_text("mine")
    run(tmp_path / "r", "--steps", "1", "--overwrite", "--tokenizer", str(tmp_path / "r" / "vocab.txt"))
    assert (tmp_path / "r" / "vocab.txt").read_text() == vocab and (tmp_path / "r" / "notes.txt").exists()
    assert not (tmp_path / "r" / "probe_old.json").exists()  # the old run's result is gone with it
    assert not (tmp_path / "r" / "features").exists()  # its emptied folders too, up to the out-dir
    assert os.listdir(tmp_path / "r" / "viz") == ["keep.txt"]  # a folder holding a user's file stays
    assert not (tmp_path / "r" / "tokenizer.model").exists()  # the old run's tokenizer too
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"]["kind"] == "wordpiece" and step(tmp_path / "r") == 1


@pytest.mark.parametrize("name, body", [("config.json", b'{"lr": 0.1, "notes": "mine"}'),
                                        ("log.jsonl", b"day 1: tried lr 0.1\n"),
                                        ("ckpt.pt", b"my own notes"), ("curves.png", b"\xff\xd8\xff")])
def test_a_users_file_with_a_run_files_name_is_never_replaced(tmp_path, capsys, name, body):
    """A run file is known by its name *and* its content: a user's config.json in the out-dir was
    called a run, and --overwrite (which the refusal suggested) deleted it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_bytes(body)
    for flags in ([], ["--overwrite"], ["--resume"]):
        line = refused(capsys, out, "--steps", "2", *flags)
        assert f"{name} exists and is not a" in line and "choose another --out-dir" in line, line
    assert listing(out) == {name: body}


@pytest.mark.parametrize("case", ["file", "read_only", "unwritable_fs", "train_size", "steps_below",
                                  "resume_overwrite"])
def test_bad_out_dirs_and_sizes_are_one_line_before_any_write(tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("not a folder")
        assert "is a file" in refused(capsys, out)
        return
    if case == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere: a read-only folder cannot be made here")
        tmp_path.chmod(0o500)
        try:
            assert "not writable" in refused(capsys, out)
        finally:
            tmp_path.chmod(0o700)
        return
    if case == "unwritable_fs":  # a folder even root cannot make (here, in /proc): one line, not a traceback
        assert "--out-dir /proc/m3ae_test cannot be made or written" in refused(capsys, "/proc/m3ae_test")
        return
    if case == "train_size":
        assert "--batch-size: 16 is more than the 1 samples" in refused(capsys, out, "--train-size", "1")
        assert not out.exists()
        return
    run(out, "--steps", "4")
    before = listing(out)
    if case == "steps_below":
        assert "--steps: 2 is below the run's step 4" in refused(capsys, out, "--resume", "--steps", "2")
    else:
        assert "--overwrite: not with --resume" in refused(capsys, out, "--resume", "--overwrite")
    assert listing(out) == before


def test_overwrite_may_start_from_the_runs_own_checkpoint(tmp_path):
    """--init-from OUT_DIR/ckpt.pt with --overwrite: read before anything is deleted (it was deleted first,
    then 'No such file')."""
    run(tmp_path, "--steps", "2")
    train.main(SMALL[2:] + ["--out-dir", str(tmp_path), "--steps", "1", "--overwrite", "--init-from",
                            str(tmp_path / "ckpt.pt")])  # SMALL without --preset: the init's architecture
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["args"]["init_from"] == str(tmp_path / "ckpt.pt")


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    run(tmp_path, "--steps", "3")
    before = listing(tmp_path)
    capsys.readouterr()
    run(tmp_path, "--resume")
    assert "already at step 3 of --steps 3: nothing to train" in capsys.readouterr().out
    assert listing(tmp_path) == before


def test_a_cut_log_line_and_a_moved_folder_still_resume(tmp_path):
    run(tmp_path / "a", "--steps", "4", "--stop-after", "2")
    with open(tmp_path / "a" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a full disk cut the last record
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # and the run folder is copied elsewhere
    shutil.rmtree(tmp_path / "a")
    run(tmp_path / "moved", "--resume")
    assert step(tmp_path / "moved") == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "moved" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_full_disk_while_logging_is_one_line_and_resumes(tmp_path, monkeypatch):
    class FullLog:
        name = str(tmp_path / "log.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(util.DiskFull, match="No space left on device.* then --resume"):
        rundir.append_log(FullLog(), {"step": 1})


def test_the_mae_baseline_needs_no_caption_and_trains_no_tokenizer(tmp_path):
    csv = captioned_images(tmp_path / "d", 16, captions=False)  # an image-only CSV: no caption column
    run(tmp_path / "r", "--csv", csv, "--no-text", "--steps", "2", "--batch-size", "8")
    assert step(tmp_path / "r") == 2 and not (tmp_path / "r" / "tokenizer.model").exists()
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert "tokenizer" not in ckpt and ckpt["args"]["no_text"]


def test_broken_links_in_the_image_dir_are_skipped_not_fatal(tmp_path):
    csv = captioned_images(tmp_path / "d", 16)
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (i, 2, 3)).save(extra / f"{i}.png")
    os.symlink(tmp_path / "gone.png", extra / "dangling.png")
    os.symlink(extra, extra / "loop")
    run(tmp_path / "r", "--csv", csv, "--image-dir", str(extra), "--steps", "2", "--batch-size", "8")
    assert step(tmp_path / "r") == 2


def test_more_steps_at_resume_never_jump_the_lr(tmp_path, capsys):
    """A finished 6-step run resumed with --steps 12: the cosine is now over 12 steps, and the lr goes from
    what the old schedule gave (0 at its end) to the new schedule over --warmup-steps (2) steps, said in one
    note (it jumped from ~0 to near the peak before)."""
    run(tmp_path, "--steps", "6")
    capsys.readouterr()
    run(tmp_path, "--steps", "12", "--resume")
    out = capsys.readouterr().out
    assert "the lr schedule changed: at step 6 the run's schedule gives 0 and the new one" in out
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    peak = 6e-3 * 16 / 256
    new = [train.lr_at(s, peak, 2, 12) for s in range(12)]
    assert lrs[6] == pytest.approx(0.5 * new[6]) and lrs[7] == pytest.approx(new[7])  # halfway, then on it
    assert lrs[5] == pytest.approx(train.lr_at(5, peak, 2, 6)) and all(lr <= peak for lr in lrs)
    # resumed again without a change: no new ramp, the same schedule (the run goes on as planned)
    run(tmp_path, "--steps", "12", "--resume")
    assert "already at step 12" in capsys.readouterr().out


def test_conversions_alone_make_one_line_at_the_end_not_one_per_epoch(tmp_path, capsys):
    """Greyscale images are converted (kept), not skipped: 4 epochs of them used to print 4 'epoch N: skipped:
    none; converted: ...' lines (41 on a small real set); now one line for the run, and the summary."""
    csv = captioned_images(tmp_path / "d", 16)
    for i in range(16):
        Image.open(tmp_path / "d" / f"{i}.png").convert("L").save(tmp_path / "d" / f"{i}.png")
    run(tmp_path / "r", "--csv", csv, "--steps", "8", "--batch-size", "8")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "epoch 0:" not in text and "data, steps 1-8: skipped: none; converted: greyscale 64" in text
    assert "done: " in out.out and "Next: python probe.py" in out.out  # what was saved where, what to run next


def test_a_run_recorded_before_a_new_knob_still_resumes(tmp_path):
    """A fork adds a model field: runs recorded without it resume with its default (it raised KeyError)."""
    run(tmp_path, "--steps", "4", "--stop-after", "2")
    record = json.loads((tmp_path / "config.json").read_text())
    del record["model"]["image_mask_ratio"]  # as if the field did not exist when the run started
    (tmp_path / "config.json").write_text(json.dumps(record))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["config"]["image_mask_ratio"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    run(tmp_path, "--resume")
    assert step(tmp_path) == 4
