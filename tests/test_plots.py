"""plots.py: the PIL charts (training curves, histograms, bars, t-SNE maps) and their command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(folder, records, cut=False):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        if cut:
            f.write('{"step": 99, "lo')


def records(scale, terms=("image_loss", "text_loss")):
    return [{"step": s, "loss": scale / s, **{t: scale / s / 2 for t in terms}, "lr": 1e-3 * s, "grad_norm": 1.0,
             "images_per_s": 100.0} for s in range(1, 11)]


def test_training_curves_draw_every_logged_quantity_and_overlay_runs(tmp_path):
    write_log(tmp_path / "m3ae", records(4.0), cut=True)  # a cut last line is left out, not fatal
    write_log(tmp_path / "mae", records(3.0, terms=("image_loss",)))
    sheet = plots.training_curves([str(tmp_path / "m3ae"), str(tmp_path / "mae")])
    # six quantities (loss, image_loss, text_loss, lr, grad_norm, images_per_s): 3 panels a row, 2 rows
    assert sheet.size == (3 * plots.W, 2 * plots.H + 30)
    colours = {c for _, c in sheet.getcolors(1 << 20)}
    assert plots.colour(0) in colours and plots.colour(1) in colours  # both runs are drawn
    assert plots.training_curves([str(tmp_path / "nothing")]) is None


def test_curves_command_refuses_a_folder_without_a_log_and_writes_the_png(tmp_path):
    write_log(tmp_path / "a", records(2.0))
    out = tmp_path / "c.png"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "plots.py"), "curves", str(tmp_path / "a"), "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and Image.open(out).size[0] > 0
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "plots.py"), "curves", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no log.jsonl in" in bad.stderr and "Traceback" not in bad.stderr


def test_histograms_bars_and_scatter_are_images():
    g = torch.Generator().manual_seed(0)
    h = plots.histograms({"in": torch.randn(500, generator=g), "out": torch.randn(500, generator=g) + 2}, "OOD")
    b = plots.bar_chart({"M3AE": (60.0, 2.0), "MAE": (50.0, 1.0)}, "probe", floor=40.0)
    s = plots.scatter(torch.randn(30, 2, generator=g), torch.arange(3).repeat(10), ["a", "b", "c"], "map")
    assert h.size == b.size == (plots.W, plots.H) and s.size == (plots.W + 130, plots.H)


def test_tsne_keeps_separated_clusters_apart():
    """Three well-separated Gaussian clusters in 16-D: in the 2-D map each point's nearest neighbour is of
    its own cluster (exact t-SNE preserves local structure)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(60)
    x = torch.randn(180, 16, generator=g) + 6 * torch.nn.functional.one_hot(labels, 16).float()
    y = plots.tsne(x, perplexity=20)
    d = torch.cdist(y, y) + torch.eye(180) * 1e9
    assert y.shape == (180, 2) and torch.isfinite(y).all()
    assert (labels[d.argmin(1)] == labels).float().mean() > 0.98


@pytest.mark.parametrize("bad", [[0.0, 0.0], [float("nan"), 1.0]])
def test_degenerate_values_draw_without_error(bad):
    assert plots.line_chart({"a": [(1, bad[0]), (2, bad[1])]}, "x").size == (plots.W, plots.H)
