"""util.py: the lr schedule, seed mixing, masking noise, the help formatter and knob, a setting's one declaration."""

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import util


def test_lr_schedule_values():
    lr = lambda s: util.lr_at(s, max_lr=1.0, warmup=10, total=110, min_lr=0.1)
    assert lr(0) == pytest.approx(0.1)  # (step + 1) / warmup
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr(110) == pytest.approx(0.1)
    assert lr(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_mix_seed_is_stable_and_distinct():
    seeds = {util.mix_seed(0, e, i) for e in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)
    assert util.mix_seed(1, 2, 3) == util.mix_seed(1, 2, 3) != util.mix_seed(1, 3, 2)


def test_masking_noise_is_one_generator_stream():
    image, text = util.masking_noise(3, 4, 16, 8)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(image, torch.rand(4, 16, generator=g)) and torch.equal(text, torch.rand(4, 8, generator=g))


def test_util_is_a_leaf():
    """util.py imports nothing of this project (model.py and every script import it)."""
    src = open(os.path.join(ROOT, "util.py")).read()
    mine = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    imported = set(re.findall(r"^(?:from|import) (\w+)", src, re.M))
    assert imported and not imported & mine, imported & mine


@dataclasses.dataclass
class Knobs:
    size: int = util.knob(3, "a size", util.at_least(1, 10))
    ratio: float = util.knob(0.5, "a fraction", util.fraction(), aliases=("--old-ratio",), resume="free")
    kind: str = util.knob("a", "a choice", choices=("a", "b"), resume="invocation")
    flag: bool = util.knob(False, "a switch")
    hidden: int = util.knob(7)  # no help: no flag

    def __post_init__(self):
        util.check_fields(self)


def test_a_knob_is_its_flag_its_check_and_its_resume_rule():
    p = argparse.ArgumentParser()
    util.add_flags(p, Knobs)
    args = p.parse_args(["--size", "4", "--old-ratio", "0.25", "--kind", "b", "--flag"])
    assert vars(args) == dict(size=4, ratio=0.25, kind="b", flag=True)  # names follow the fields, aliases work
    with pytest.raises(SystemExit):
        p.parse_args(["--hidden", "1"])
    for bad, match in ((dict(size=11), r"--size: 11 must be in \[1, 10\]"),
                       (dict(ratio=1.0), r"--ratio: 1.0 must be in \[0, 1\)"),
                       (dict(ratio=float("nan")), "--ratio: nan"), (dict(kind="c"), "--kind: 'c' must be one of a, b")):
        with pytest.raises(ValueError, match=match):
            Knobs(**bad)
    recorded = dataclasses.asdict(Knobs())
    merged, notes, refused = util.resume_merge(Knobs, recorded, dataclasses.asdict(Knobs(ratio=0.1, kind="b")),
                                               {"ratio"})
    assert merged == dict(recorded, ratio=0.1, kind="b") and notes == ["--ratio 0.5 -> 0.1"] and not refused
    assert util.resume_merge(Knobs, recorded, dataclasses.asdict(Knobs(size=4)), {"size"})[2] == ["--size 3 -> 4"]
    # not given: the record wins (a "fixed" value differing only by default is no change)
    assert util.resume_merge(Knobs, recorded, dataclasses.asdict(Knobs(size=4)), set())[0]["size"] == 3


def test_train_flags_are_the_fields():
    """No hand-kept list of flag names: every declared field of train.Run and model.M3AEConfig is a flag of
    train.py with the field's name, and every flag is a field."""
    import model
    import train

    dests = {a.dest for a in train.build_parser()._actions if a.dest != "help"}
    declared = {f.name for cls in (train.Run, model.M3AEConfig) for f in dataclasses.fields(cls)
                if f.metadata["help"]}
    assert dests == declared


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train.py", "probe.py", "ood.py", "viz.py", "convert.py", "sweep.py", "builtin.py", "bench/boundary.py",
           "bench/fake_shards.py", "bench/loader_speed.py", "kernels/bench.py",
           "kernels/compile_check.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    # `--help` exits 0 with a usage line and does no work; the main scripts show each flag's default (util's formatter)
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
    if script in ("train.py", "probe.py", "ood.py", "viz.py"):
        assert "(default: " in done.stdout


def test_train_help_shows_each_presets_geometry():
    """--image-size / --patch-size said only "default: the preset's"; now each preset's value is listed."""
    import train

    text = " ".join(train.build_parser().format_help().split())
    assert "image side in pixels; a multiple of --patch-size (default: the preset's: tiny 32, small 256" in text
    assert "patch side in pixels (default: the preset's: tiny 8, small 16, base 16" in text


def test_an_output_replaces_only_an_earlier_output_of_its_kind(tmp_path):
    from util import foreign_output

    free = tmp_path / "free.json"
    assert foreign_output(str(free), "json") is None  # nothing there
    mine = {"result.json": b'{\n  "ckpt": "run/ckpt.pt", "top1": 50.0}', "a.png":
            b"\x89PNG\r\n\x1a\n....", "h.pt": b"PK\x03\x04....", "o.pkl": b"\x80\x04...."}
    for name, head in mine.items():
        (tmp_path / name).write_bytes(head)
    kinds = {"result.json": "json", "a.png": "png", "h.pt": "zip", "o.pkl": "pickle"}
    for name, kind in kinds.items():
        assert foreign_output(str(tmp_path / name), kind) is None, name
    users = {"pairs.csv": b"filepath,caption\na.jpg,a dog\n", "conf.json": b'{"lr": 1}',
             "photo.jpg": b"\xff\xd8\xff\xe0....", "notes.txt": b"mine", "l.json": b'["ckpt"]',
             "s.json": b'"ckpt"'}
    for name, body in users.items():
        (tmp_path / name).write_bytes(body)
        for kind in kinds.values():
            line = foreign_output(str(tmp_path / name), kind)
            assert "exists and is not a" in line and "not replaced" in line, (name, kind)
    (tmp_path / "link.json").symlink_to(tmp_path / "nowhere")  # a dangling link is not replaced
    assert foreign_output(str(tmp_path / "link.json"), "json") is not None


def test_no_script_writes_its_output_over_a_users_file(tmp_path, capsys):
    """--out (and --save-head, convert's output, plots' --out) naming a user's CSV: refused in one
    line before any work, the file as it was; a default result name that is a user's file is not
    replaced at write time either."""
    import convert
    import plots
    import probe
    import zeroshot
    from checkpoint import checkpoint_dict
    from evalcommon import write_output
    from model import M3AE, make_config

    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    torch.save(checkpoint_dict(M3AE(make_config("tiny", vocab_size=50, depth=1)),
                               args={"data": "builtin", "data_seed": 0, "steps": 0}), ckpt)
    csv = tmp_path / "pairs.csv"
    body = "filepath,caption\na.jpg,a dog on a beach\n"
    csv.write_text(body)
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for main, argv in ((probe.main, ["--ckpt", str(ckpt), "--out", str(csv)]),
                       (probe.main, ["--ckpt", str(ckpt), "--save-head", str(csv)]),
                       (zeroshot.main, ["--ckpt", str(ckpt), "--out", str(csv)]),
                       (plots.main, ["curves", str(tmp_path / "run"), "--out", str(csv)])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"{csv} exists and is not a" in err, (argv, err)
    assert convert.main(["to-timm", str(ckpt), str(csv)]) != 0
    assert "not replaced" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not replaced"):
        write_output(str(csv), lambda f: f.write("{}"), "json", "w")
    assert csv.read_text() == body
