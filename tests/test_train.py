"""train.py: optimizer groups, schedule, determinism helpers, and end-to-end runs (resume, SIGKILL, DDP, NaN)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import loader
import train
import util
from checkpoint import load_model
from model import M3AE, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run small enough for CI: tiny preset, 96 built-in pairs, global batch 16 (6 steps an epoch), no workers.
SMALL = ["--preset", "tiny", "--train-size", "96", "--batch-size", "16", "--workers", "0", "--warmup-steps", "2",
         "--log-every", "1", "--vocab-size", "256", "--no-probe"]


def run(out_dir, *extra):
    return train.main(SMALL + ["--out-dir", str(out_dir), *extra])


def params(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_weight_decay_groups():
    model = M3AE(make_config("tiny", vocab_size=30))
    decay, no_decay = train.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    # decayed: exactly the Linear weights
    assert decayed == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) for n in [n + ".weight"]}
    for name in ("cls_token", "enc_image_type", "enc_text_type", "dec_image_type", "dec_text_type", "image_mask_token",
                 "text_mask_token", "text_embed.weight", "encoder.norm.weight", "encoder.blocks.0.norm1.weight",
                 "encoder.blocks.0.attn.qkv.bias", "patch_embed.bias"):
        assert name in exempt, name
    for name in ("patch_embed.weight", "encoder.blocks.0.attn.qkv.weight", "decoder.blocks.1.mlp.fc2.weight",
                 "text_head.weight", "image_head.weight", "decoder_embed.weight"):
        assert name in decayed, name


def test_linear_scaling_rule_and_flops():
    c = make_config("base", vocab_size=30522)
    per_sample = train.train_flops_per_sample(c)
    # order of magnitude check against the ViT-B/16 rule of thumb: encoder on 81 tokens ~ 3 x 2 x 86M x 81
    assert 3 * 2 * 85e6 * 81 < per_sample < 3 * 2 * 85e6 * 81 * 4


def test_epoch_indices_split_global_batches_across_ranks():
    n, per_rank, world = 50, 4, 2
    single, steps1 = loader.epoch_indices(n, per_rank * world, 0, 1, seed=3, epoch=1)
    ranks = [loader.epoch_indices(n, per_rank, r, world, seed=3, epoch=1) for r in range(world)]
    assert steps1 == ranks[0][1] == n // (per_rank * world)
    for b in range(steps1):
        union = sorted(k for r in range(world) for k in ranks[r][0][b * per_rank : (b + 1) * per_rank])
        assert union == sorted(single[b * per_rank * world : (b + 1) * per_rank * world])
    all_keys = [k for r in range(world) for k in ranks[r][0]]
    assert len(all_keys) == len(set(all_keys))  # no sample twice in an epoch
    assert loader.epoch_indices(n, 8, 0, 1, 3, 2)[0] != single  # another epoch, another order


# --- end to end ---------------------------------------------------------------------------------------------


def test_smoke_run_writes_everything_and_probes(tmp_path):
    result = train.main(SMALL[:-1] + ["--out-dir", str(tmp_path), "--steps", "3", "--probe-train-size", "64",
                                      "--probe-test-size", "32"])
    assert 0.0 <= result["probe_top1"] <= 100.0 and result["steps"] == 3
    # the quick probe is probe.py's fast mode: the same number from the same checkpoint, images and seed
    import probe

    paper = ["--recipe", "paper", "--base-lr", "6.4"]  # the quick probe's recipe (probe.quick_probe)
    full = probe.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--train-size", "64", "--test-size", "32", *paper])
    assert full["top1"] == result["probe_top1"]
    colour = probe.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--train-size", "64", "--test-size", "32",
                         "--label", "colour", *paper])
    assert colour["top1"] == result["probe_top1_colour"] and colour["classes"] == 11
    assert (tmp_path / "probe_builtin_colour_fast_paper.json").exists()
    assert math.isfinite(result["text_ce_own_image"]) and math.isfinite(result["text_ce_other_image"])
    for name in ("ckpt.pt", "config.json", "log.jsonl", "tokenizer.model", "probe.json"):
        assert (tmp_path / name).exists(), name
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["text_loss"] > 0 and r["images_per_s"] > 0 for r in records)
    model, ckpt = load_model(tmp_path / "ckpt.pt")  # weights_only
    assert ckpt["step"] == 3 and set(ckpt) >= {"optimizer", "rng", "epoch", "batch_in_epoch"}
    assert json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"] == model.config.vocab_size


def test_no_text_trains_the_mae_baseline_and_never_touches_text(tmp_path):
    run(tmp_path, "--steps", "2", "--text-weight", "0")
    ckpt = params(tmp_path)
    assert ckpt["args"]["no_text"] and "tokenizer" not in ckpt  # no caption read, no tokenizer trained
    assert not (tmp_path / "tokenizer.model").exists()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all("text_loss" not in r and r["loss"] == r["image_loss"] for r in records)
    config = load_model(tmp_path / "ckpt.pt")[0].config
    torch.manual_seed(0)  # train.py builds the model right after seeding with --seed (0)
    fresh = M3AE(config).state_dict()  # so this is its initial state; the text path must still be there
    for name in ("text_embed.weight", "text_head.weight", "enc_text_type", "text_mask_token"):
        assert torch.equal(ckpt["model"][name], fresh[name]), name
    assert not torch.equal(ckpt["model"]["patch_embed.weight"], fresh["patch_embed.weight"])


def test_paired_share_mixes_image_only_and_text_only_samples(tmp_path):
    run(tmp_path, "--steps", "2", "--paired-share", "0.25")
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and r["text_loss"] > 0 for r in records)


def test_csv_data_with_bad_rows_trains_and_counts_skips(tmp_path, capsys):
    """--data csv end to end: missing and corrupt images are skipped and reported at the end of the epoch; a
    micro-batch in which every sample is bad becomes a zero-weight step instead of a NaN."""
    from PIL import Image

    rows = ["filepath,caption"]
    for i in range(8):
        Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a photo number {i} of a blue thing")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    rows += [f"missing{i}.jpg,a lost photo" for i in range(6)] + ["bad.jpg,a broken photo"] * 2
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    args = ["--data", "csv", "--csv", str(tmp_path / "pairs.csv"), "--batch-size", "4", "--steps", "4"]
    run(tmp_path / "run", *args)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    out = capsys.readouterr()
    assert "missing 6" in out.out + out.err and "corrupt 2" in out.out + out.err
    # only bad rows: refused before anything is written (it trained on nothing, loss 0.0, and saved before)
    (tmp_path / "bad.csv").write_text("filepath,caption\n" + "missing.jpg,a lost photo\n" * 8)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "bad", "--data", "csv", "--csv", str(tmp_path / "bad.csv"), "--batch-size", "4", "--steps", "2")
    assert e.value.code == 2 and "--csv: none of its first 8 images can be read (missing: 8)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_webdataset_shards_train_and_resume(tmp_path):
    """--data wds end to end: two img2dataset-style shards, an epoch longer than the stream (each rank wraps
    around), and a resume that skips what was read."""
    import io
    import tarfile

    from PIL import Image

    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
            for i in range(6):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (48, 40), (40 * i, 20 * s, 90)).save(buf, format="JPEG")
                caption = f"a picture {i} from shard {s}".encode()
                for name, payload in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    args = ["--data", "wds", "--wds-shards", str(tmp_path / "shard-{0..1}.tar"), "--epoch-samples", "32",
            "--batch-size", "4"]
    run(tmp_path / "run", *args, "--steps", "10", "--stop-after", "3")
    run(tmp_path / "run", *args, "--steps", "10", "--resume")
    ckpt = params(tmp_path / "run")
    assert ckpt["step"] == 10 and ckpt["epoch"] == 1  # 8 steps an epoch: 12 samples read 2.7 times, wrapped
    # in the main process (no workers) the augmentation RNG is restored too, so the resume is exact
    run(tmp_path / "once", *args, "--steps", "10")
    for name, value in params(tmp_path / "once")["model"].items():
        assert torch.equal(value, ckpt["model"][name]), name
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in records)


def test_resume_is_bit_identical(tmp_path):
    """K steps, stop, resume (with another worker count) to N == N steps in one go: parameters, optimizer
    state and data order (the run crosses an epoch boundary after 6 steps)."""
    run(tmp_path / "once", "--steps", "8")
    run(tmp_path / "split", "--steps", "8", "--stop-after", "5")
    assert params(tmp_path / "split")["step"] == 5
    run(tmp_path / "split", "--steps", "8", "--resume", "--workers", "2")
    a, b = params(tmp_path / "once"), params(tmp_path / "split")
    assert a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] == 1
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log = [json.loads(line)["loss"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert log == [json.loads(line)["loss"] for line in (tmp_path / "once" / "log.jsonl").read_text().splitlines()]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # an absurd learning rate overflows the activations after the first update
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient norm at step 2; stopped without "
                                                 r"saving. The last good checkpoint is .*ckpt.pt \(step 1\)"):
        run(tmp_path, "--steps", "5", "--base-lr", "1e30", "--warmup-steps", "0", "--save-every", "1")
    ckpt = params(tmp_path)
    assert ckpt["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_gradient_with_a_finite_loss_is_never_saved(tmp_path, monkeypatch):
    """The failure users hit: a finite loss, a NaN gradient norm, AdamW turns every weight NaN; the periodic save
    must not write them, and the checkpoint the message names must be the good one."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def poisoned(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        calls.append(1)
        if len(calls) == 3:  # step 3: one gradient entry NaN, the loss stays finite
            parameters[0].grad.view(-1)[0] = float("nan")
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    with pytest.raises(FloatingPointError, match=r"at step 3; stopped without saving.*\(step 2\)"):
        run(tmp_path, "--steps", "6", "--save-every", "1", "--log-every", "5")
    ckpt = params(tmp_path)
    assert ckpt["step"] == 2 and not checkpoint.nonfinite({"m": ckpt["model"], "o": ckpt["optimizer"]})
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)


def test_save_refuses_non_finite_state(tmp_path):
    model = M3AE(make_config("tiny", vocab_size=30))
    state = model.state_dict()
    state["cls_token"] = torch.full_like(state["cls_token"], float("inf"))
    with pytest.raises(FloatingPointError, match="cls_token"):
        checkpoint.save_checkpoint({"model": state, "step": 1}, str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--image-mask-ratio", "1.5"], "--image-mask-ratio: 1.5 must be in [0, 1)"),
    (["--text-mask-ratio", "-0.5"], "--text-mask-ratio: -0.5 must be in [0, 1)"),
    (["--log-every", "0"], "--log-every: 0 must be >= 1"),
    (["--save-every", "0"], "--save-every: 0 must be >= 1"),
    (["--batch-size", "0"], "--batch-size: 0 must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum: 0 must be >= 1"),
    (["--batch-size", "10", "--grad-accum", "3"], "--batch-size: 10 must divide by ranks x --grad-accum = 1 x 3"),
    (["--paired-share", "1.2"], "--paired-share: 1.2 must be in [0, 1]"),
    (["--base-lr", "0"], "--base-lr: 0.0 must be > 0"),
    (["--lr", "inf"], "--lr: inf must be > 0 and finite"),
    (["--seed", str(2**70)], "--seed: 1180591620717411303424 must be in [0, 9223372036854775807]"),
    (["--text-len", "100000"], "--text-len: 100000 must be in [1, 1024]"),
    (["--batch-size", "1000000000"], "--batch-size: 1000000000 (1000000000 images of 32 px per micro-batch) needs"),
    (["--resume", "--overwrite"], "--overwrite: not with --resume"),
    (["--wds-shards", "x/{0..999999999}.tar", "--epoch-samples", "64"], "--wds-shards: 'x/{0..999999999}.tar'"),
    (["--lr", "1e-3", "--base-lr", "1e-3"], "give --lr (absolute) or --base-lr"),
    (["--image-weight", "0", "--no-text"], "--image-loss-weight: 0 with no text loss leaves nothing to train"),
    (["--image-size", "30"], "--image-size: 30 is not a multiple of --patch-size 8"),
    (["--image-size", "28"], "(patch sizes that divide it: [2, 4, 7, 14])"),
    (["--data", "wds"], "--data: 'wds' needs --wds-shards PATTERN"),
    (["--data", "builtin", "--csv", __file__], "--data: 'builtin' needs neither --csv nor --wds-shards"),
    (["--csv", "nope.csv"], "--csv: 'nope.csv' is not a file"),
    (["--wds-shards", "nope-{0..3}.tar", "--epoch-samples", "8"], "--wds-shards: 'nope-{0..3}.tar'"),
    (["--wds-shards", "x.tar"], "--epoch-samples: needed with --wds-shards"),
    (["--csv-img-key", "img"], "--csv-img-key: only with --csv"),
    (["--image-dir", "no/such/folder"], "--image-dir: 'no/such/folder' is not a folder"),
    (["--text-file", "no_such.txt"], "--text-file: 'no_such.txt' is not a file"),
    (["--tokenizer", "no_such.model"], "--tokenizer: 'no_such.model' is not a file"),
    (["--stop-after", "9", "--steps", "5"], "--stop-after: 9 is past --steps 5"),
])
def test_bad_flags_fail_before_any_work_with_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + ["--out-dir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1], err[-1]
    assert not (tmp_path / "run").exists()  # nothing was made: no tokenizer, no out-dir


def test_warnings_for_legal_but_unintended_settings(tmp_path, capsys):
    run(tmp_path, "--steps", "2", "--warmup-steps", "5", "--image-mask-ratio", "0", "--text-mask-ratio", "0")
    out = capsys.readouterr().out
    assert "--warmup-steps 5 >= --steps 2" in out and "nothing is masked" in out
    pattern = _shards(tmp_path / "s", [8, 8])
    run(tmp_path / "w", "--wds-shards", pattern, "--epoch-samples", "4", "--batch-size", "4", "--steps", "1",
        "--workers", "2")
    assert "--epoch-samples 4 is less than one micro-batch for each of the 2 worker(s)" in capsys.readouterr().out


def test_an_out_dir_belongs_to_one_run(tmp_path, capsys):
    run(tmp_path, "--steps", "2")
    # a rerun without --resume is refused, naming what is there and the two ways on
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "2", "--vocab-size", "128")
    assert e.value.code == 2 and "already holds a run (ckpt.pt" in capsys.readouterr().err
    # --resume refuses a changed geometry, naming each field, and keeps what was not repeated
    with pytest.raises(SystemExit):
        run(tmp_path, "--steps", "4", "--resume", "--image-size", "64", "--seed", "3")
    err = capsys.readouterr().err
    assert "--image-size 32 -> 64" in err and "--seed 0 -> 3" in err
    run(tmp_path, "--steps", "3", "--resume")
    assert params(tmp_path)["step"] == 3
    # --overwrite starts afresh: a new tokenizer for the new vocabulary
    run(tmp_path, "--steps", "1", "--overwrite", "--vocab-size", "128")
    assert params(tmp_path)["step"] == 1 and load_model(tmp_path / "ckpt.pt")[0].config.vocab_size <= 128


def test_a_second_run_in_the_same_out_dir_fails_at_once(tmp_path, capsys):
    proc = _spawn(tmp_path, "--steps", "1000", "--save-every", "2")
    _wait_for(tmp_path / "ckpt.pt", proc)
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "1000", "--resume")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert e.value.code == 2 and f"in use by another train.py (pid {proc.pid})" in capsys.readouterr().err
    assert time.time() - t0 < 5
    run(tmp_path, "--steps", "1", "--overwrite")  # the lock died with its holder


def test_resume_keeps_the_data_source_and_refuses_changed_data(tmp_path, capsys):
    from PIL import Image

    rows = ["img\tdesc"] + [f"{i}.png\ta photo number {i}" for i in range(8)]
    for i in range(8):
        Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    run(tmp_path / "run", "--csv", str(tmp_path / "pairs.tsv"), "--csv-img-key", "img", "--csv-caption-key", "desc",
        "--batch-size", "4", "--steps", "4", "--stop-after", "2")
    assert params(tmp_path / "run")["args"]["data"] == "csv"  # --csv alone chose the source
    train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--workers", "0"])  # no other flag: the run's own
    ckpt = params(tmp_path / "run")
    assert ckpt["step"] == 4 and ckpt["args"]["csv"] == str(tmp_path / "pairs.tsv") and ckpt["args"]["data"] == "csv"
    assert ckpt["data"]["mean"] == list(train.data.CC12M_MEAN)
    (tmp_path / "pairs.tsv").write_text("\n".join(rows[:5]) + "\n")  # the file changes under the run
    with pytest.raises(SystemExit):
        train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--steps", "6", "--workers", "0"])
    assert "data or tokenizer changed since it started: csv" in capsys.readouterr().err


def test_failed_save_cleans_up_and_says_disk_full(tmp_path, monkeypatch):
    run(tmp_path, "--steps", "2", "--save-every", "1")
    before = params(tmp_path)["step"]
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4416 vs 4302")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(util.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(util.DiskFull, match=r"no space left on the device of .*while writing ckpt.pt"):
        run(tmp_path, "--steps", "4", "--save-every", "1", "--resume")
    monkeypatch.setattr(torch, "save", real_save)
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]  # the temp file is gone
    assert params(tmp_path)["step"] == before  # ckpt.pt as it was


def test_stale_temp_files_and_a_corrupt_checkpoint(tmp_path, capsys):
    run(tmp_path, "--steps", "4", "--save-every", "2")
    assert params(tmp_path)["step"] == 4 and torch.load(tmp_path / "ckpt_prev.pt", weights_only=True)["step"] == 2
    (tmp_path / "ckpt.pt.m3ae-tmp.999").write_bytes(b"x" * 1000)  # a killed run's torn write
    (tmp_path / "thesis.tmp.docx").write_bytes(b"the user's draft")  # not ours: never touched
    with open(tmp_path / "ckpt.pt", "r+b") as f:  # truncate the newest checkpoint
        f.truncate(os.path.getsize(tmp_path / "ckpt.pt") // 3)
    run(tmp_path, "--steps", "6", "--save-every", "2", "--resume")
    out = capsys.readouterr().out
    assert "ckpt.pt cannot be read" in out and "resumed from ckpt_prev.pt at step 2" in out
    assert not (tmp_path / "ckpt.pt.m3ae-tmp.999").exists() and params(tmp_path)["step"] == 6
    assert (tmp_path / "thesis.tmp.docx").read_bytes() == b"the user's draft"
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the replayed steps 3-4 are logged once


def _spawn(out_dir, *extra, wrapper=""):
    """train.py in a child process (optionally with `wrapper` code run first, e.g. to slow its saves)."""
    code = f"import sys; sys.path.insert(0, {ROOT!r})\n{wrapper}\nimport train; train.main(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *SMALL, "--out-dir", str(out_dir), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_during_training_and_during_a_save_leaves_a_loadable_checkpoint(tmp_path):
    # 1. killed while training: the last checkpoint loads and the run resumes from it
    proc = _spawn(tmp_path, "--steps", "1000", "--save-every", "2")
    _wait_for(tmp_path / "ckpt.pt", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = params(tmp_path)["step"]
    assert step >= 2 and step % 2 == 0
    run(tmp_path, "--steps", str(step + 2), "--resume", "--save-every", "2")
    assert params(tmp_path)["step"] == step + 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))  # each step once, although the kill came after the last save

    # 2. killed in the middle of writing the second checkpoint: half its bytes are on disk, in the temp file
    slow = tmp_path / "slow"
    marker = tmp_path / "half_written"
    wrapper = f"""
import io, time, torch
real_save, calls = torch.save, []
def slow_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    open({str(marker)!r}, "w").close()
    time.sleep(600)
torch.save = slow_save
"""
    proc = _spawn(slow, "--steps", "1000", "--save-every", "2", wrapper=wrapper)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(name.startswith("ckpt.pt.m3ae-tmp") for name in os.listdir(slow))  # the torn write is there...
    assert params(slow)["step"] == 2  # ...and ckpt.pt is still the complete first checkpoint
    run(slow, "--steps", "4", "--resume", "--save-every", "2")
    assert params(slow)["step"] == 4


def test_ddp_two_gloo_ranks_equal_one_process(tmp_path):
    args = SMALL + ["--steps", "3", "--device", "cpu"]
    run(tmp_path / "one", "--steps", "3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *args, "--out-dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = params(tmp_path / "one"), params(tmp_path / "two")
    assert a["step"] == b["step"] == 3
    lr = a["args"]["base_lr"] * 16 / 256
    for name in a["model"]:
        x, y = a["model"][name], b["model"][name]
        if name.endswith("attn.qkv.bias"):
            # The key bias has an exactly-zero true gradient (softmax ignores a shift shared by all keys): its
            # gradient is float noise, different in one process and in two ranks, which Adam scales up to steps of a
            # sizeable fraction of lr. Compare the q and v biases tightly and bound the k bias by the steps taken.
            (xq, xk, xv), (yq, yk, yv) = x.chunk(3), y.chunk(3)
            x, y = torch.cat([xq, xv]), torch.cat([yq, yv])
            assert (xk - yk).abs().max() <= 3 * lr, name
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)
    assert len(b["rng"]) == 2  # one RNG state per rank


def _shards(folder, counts):
    """img2dataset-style shards with counts[i] samples in shard i (jpg + txt members, 9-digit keys)."""
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(counts):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (48, 40), (40 * i % 255, 20 * s, 90)).save(buf, format="JPEG")
                for name, payload in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"picture {i} of {s}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / ("{00000..%05d}.tar" % (len(counts) - 1)))


def test_a_stream_that_yields_no_batch_is_an_error_not_a_hang(tmp_path):
    """One shard of 3 samples, 2 workers, micro-batch 4: no worker can fill a batch (drop_last). Today's main
    looped forever at 0%; now one line names shards, batch, ranks and workers. Run with a timeout, not a wait."""
    pattern = _shards(tmp_path / "s", [3])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *SMALL[:-1], "--no-probe", "--workers",
                           "2", "--wds-shards", pattern, "--epoch-samples", "32", "--batch-size", "4", "--steps", "3",
                           "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "gave no batch of 4" in proc.stderr and "1 shard(s)" in proc.stderr, proc.stderr[-2000:]
    assert "using 1 worker(s) per rank" in proc.stdout  # 1 shard cannot feed 2 workers: reduced, said so


def test_stream_workers_live_across_epochs(tmp_path, monkeypatch):
    """Several passes and epochs over 2 shards with 2 workers: one DataLoader, its workers started once."""
    pattern = _shards(tmp_path / "s", [6, 6])
    made = []
    real = torch.utils.data.DataLoader.__init__

    def counting(self, *args, **kwargs):
        made.append(kwargs.get("persistent_workers"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", counting)
    run(tmp_path / "run", "--wds-shards", pattern, "--epoch-samples", "16", "--batch-size", "4", "--steps", "10",
        "--workers", "2")
    assert params(tmp_path / "run")["epoch"] == 2 and made == [True]  # 10 steps = 2.5 epochs of 4 steps
