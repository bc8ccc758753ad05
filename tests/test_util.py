"""util.py: the lr schedule, seed mixing, masking noise, the help formatter and the checkpoint conventions."""

import math
import os
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


def test_checkpoint_norm_prefers_the_data_entry_then_args():
    assert util.checkpoint_norm({"data": {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]}}) == ((0.1, 0.2, 0.3), (1, 2, 3))
    assert util.checkpoint_norm({"args": {"data": "builtin"}}) == util.NORMS["builtin"]
    assert util.checkpoint_norm({"args": {"data": "csv"}}) == util.NORMS["cc12m"]
    assert util.checkpoint_norm({}) == util.NORMS["builtin"]
    assert util.checkpoint_norm({}, real_data_default=True) == util.NORMS["cc12m"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train.py", "probe.py", "ood.py", "viz.py", "convert.py", "sweep.py", "builtin.py", "bench/boundary.py",
           "bench/fake_shards.py", "bench/heads_bench.py", "bench/loader_speed.py", "kernels/bench.py",
           "kernels/compile_check.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    # `--help` exits 0 with a usage line and does no work; the main scripts show each flag's default (util's formatter)
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
    if script in ("train.py", "probe.py", "ood.py", "viz.py"):
        assert "(default: " in done.stdout
