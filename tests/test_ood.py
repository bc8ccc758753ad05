"""ood.py: metrics against brute-force definitions (ties included), Mahalanobis scores, end-to-end run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ood
from checkpoint import checkpoint_dict
from model import M3AE, make_config

# --- brute-force definitions -------------------------------------------------------------------------


def brute_auroc(pos, neg):
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


def brute_curve(pos, neg):
    """(tpr, fpr, precision) at every threshold t among the scores, "positive" meaning score >= t."""
    out = []
    for t in sorted(set(pos) | set(neg), reverse=True):
        tp, fp = sum(p >= t for p in pos), sum(n >= t for n in neg)
        out.append((tp / len(pos), fp / len(neg), tp / (tp + fp)))
    return out


def brute_fpr_at_tpr(pos, neg, tpr=0.95):
    return min(f for t, f, _ in brute_curve(pos, neg) if t >= tpr)


def brute_average_precision(pos, neg):
    ap, last_recall = 0.0, 0.0
    for recall, _, precision in brute_curve(pos, neg):
        ap += (recall - last_recall) * precision
        last_recall = recall
    return ap


def cases():
    """Small cases with heavy ties (integer scores), and a few fixed ones."""
    rng = np.random.default_rng(0)
    out = [([3, 2, 1], [2, 0]), ([1, 1, 1], [1, 1]), ([5], [1, 2, 3]), ([0, 0, 1], [1, 1, 2, 2])]
    for _ in range(40):
        n_pos, n_neg = rng.integers(1, 25, size=2)
        shift = rng.integers(0, 3)
        out.append((list(rng.integers(0, 6, n_pos) + shift), list(rng.integers(0, 6, n_neg))))
    for _ in range(5):  # continuous, no ties
        out.append((list(rng.normal(1, 1, 30)), list(rng.normal(0, 1, 40))))
    return out


def test_auroc_hand_values():
    # pairs: 3>2 3>0 2=2 2>0 1<2 1>0 -> (4 + 0.5) / 6
    assert ood.auroc([3, 2, 1], [2, 0]) == pytest.approx(0.75)
    assert ood.auroc([1, 1], [1, 1, 1]) == pytest.approx(0.5)
    assert ood.auroc([2, 3], [0, 1]) == 1.0 and ood.auroc([0, 1], [2, 3]) == 0.0


@pytest.mark.parametrize("pos, neg", cases())
def test_metrics_match_brute_force_with_ties(pos, neg):
    assert ood.auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)
    assert ood.fpr_at_tpr(pos, neg) == pytest.approx(brute_fpr_at_tpr(pos, neg), abs=1e-12)
    assert ood.fpr_at_tpr(pos, neg, 0.5) == pytest.approx(brute_fpr_at_tpr(pos, neg, 0.5), abs=1e-12)
    assert ood.average_precision(pos, neg) == pytest.approx(brute_average_precision(pos, neg), abs=1e-12)


def test_average_precision_without_ties_is_mean_precision_at_each_positive():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 20), rng.normal(0, 1, 30)
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg], reverse=True)
    hits, precisions = 0, []
    for k, (_, is_pos) in enumerate(ranked, 1):
        if is_pos:
            hits += 1
            precisions.append(hits / k)
    assert ood.average_precision(pos, neg) == pytest.approx(np.mean(precisions))


def test_average_ranks_share_ties():
    assert ood.average_ranks(np.array([10.0, 20.0, 10.0, 5.0, 20.0])).tolist() == [2.5, 4.5, 2.5, 1.0, 4.5]


def test_ood_metrics_convention():
    perfect = ood.ood_metrics(score_in=[0.0, 1.0, 2.0], score_ood=[5.0, 6.0])  # OOD scores higher: separated
    assert perfect == dict(auroc=100.0, fpr95=0.0, aupr_in=100.0, aupr_out=100.0)
    reversed_ = ood.ood_metrics(score_in=[5.0, 6.0], score_ood=[0.0, 1.0, 2.0])
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 100.0
    # AUROC is symmetric: OOD as positive with the score as is gives the same number
    rng = np.random.default_rng(2)
    s_in, s_ood = rng.normal(0, 1, 50), rng.normal(0.5, 1, 60)
    assert ood.ood_metrics(s_in, s_ood)["auroc"] == pytest.approx(100 * ood.auroc(s_ood, s_in))


# --- scores --------------------------------------------------------------------------------------------


def test_squared_mahalanobis_matches_the_definition():
    rng = np.random.default_rng(0)
    x, means = rng.normal(size=(7, 4)), rng.normal(size=(3, 4))
    a = rng.normal(size=(4, 4))
    precision = a @ a.T
    d = ood.squared_mahalanobis(x, means, precision)
    for i in range(7):
        for k in range(3):
            v = x[i] - means[k]
            assert d[i, k] == pytest.approx(v @ precision @ v)


def gaussians(n, rng, shift=0.0):
    """10 classes in 16-d, class means spread on a sphere, a shared anisotropic covariance, mapped onto a
    hyperplane like a LayerNorm output (features minus their mean: a singular covariance)."""
    centres = np.random.default_rng(42).normal(size=(10, 16)) * 2
    scale = np.linspace(0.3, 2.0, 16)
    y = rng.integers(0, 10, n)
    x = centres[y] + rng.normal(size=(n, 16)) * scale + shift
    return x - x.mean(1, keepdims=True), y


def test_mahalanobis_separates_in_from_out_on_synthetic_gaussians():
    rng = np.random.default_rng(0)
    xtr, ytr = gaussians(2000, rng)
    x_in, _ = gaussians(500, rng)
    # OOD: the same covariance, class means the in-distribution never had (inside the background's spread)
    x_ood = rng.normal(size=(500, 16)) * np.linspace(0.3, 2.0, 16) + rng.normal(size=(500, 16)) * 1.5
    x_ood -= x_ood.mean(1, keepdims=True)
    g = ood.fit_gaussians(xtr, ytr)
    assert np.isfinite(g["precision"]).all()
    (md_in, rmd_in), (md_ood, rmd_ood) = ood.mahalanobis_scores(g, x_in), ood.mahalanobis_scores(g, x_ood)
    assert ood.ood_metrics(md_in, md_ood)["auroc"] > 90
    assert ood.ood_metrics(rmd_in, rmd_ood)["auroc"] > 70
    # the class-conditional distance of an in-distribution sample is about the dimension (15 on the hyperplane)
    assert 12 < np.median(md_in) < 18


def test_msp_scores():
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 2) * 10)
        head.bias.zero_()
    s = ood.msp_scores(head, torch.tensor([[1.0, 0.0], [0.0, 0.0], [5.0, 0.0], [6.0, 0.0]]))
    # minus log max softmax: confident -> near 0 (low score); uniform -> log 3 (high: OOD-like)
    assert 0 < s[0] < 0.01 and s[1] == pytest.approx(np.log(3))
    # the same ranking as minus the probability, without its ties at 1.0: max softmax of rows 3 and 4 rounds to 1
    # in float64, their scores still differ
    assert s[2] > s[3] > 0
    assert (torch.tensor([[50.0, 0, 0], [60.0, 0, 0]], dtype=torch.float64).softmax(1)[:, 0] == 1).all()


def test_ood_metrics_refuse_empty_or_non_finite_scores():
    with pytest.raises(ValueError, match="no OOD score"):
        ood.ood_metrics([0.1, 0.2], [])
    with pytest.raises(ValueError, match="no in-distribution score"):
        ood.ood_metrics([], [0.1])
    with pytest.raises(ValueError, match="1 of 2 OOD scores are not finite"):
        ood.ood_metrics([0.1, 0.2], [0.3, float("nan")])


# --- MSP: the head decides which way it reads ----------------------------------------------------------------


def far_and_between(n, kind, seed, C=10, D=32):
    """In-distribution: C well-separated classes (centre 6 e_k in the first C dims, unit noise in all D). OOD:
    between the classes (at the mean of the centres) in those dims and shifted by 4 in the other D - C: far from
    every class and from the training mean (a large ||BN(x)||). Scaled and offset away from zero mean / unit
    variance (the BatchNorm's job)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(C, D)
    centres[:, :C] = 6 * torch.eye(C)
    x = torch.randn(n, D, generator=g)
    if kind == "in":
        y = torch.randint(0, C, (n,), generator=g)
        x = x + centres[y]
    else:
        y = torch.full((n,), -1)
        x = x + centres.mean(0)
        x[:, C:] += 4.0
    return x * 3 + 10, y


def test_every_score_separates_well_separated_ood_features(tmp_path, monkeypatch, capsys):
    # Convention: positive = in-distribution, scores higher = more OOD, AUROC > 50 = better than chance.
    # The OOD features lie far from every class and from the training mean. A head that barely left its random
    # init (the old default: LARS at the paper's base lr 0.1, 90 epochs, on a few thousand samples) has logits
    # ~ w.BN(x) with a small random w: its max softmax grows with ||BN(x)||, so these far-away OOD samples look MORE
    # confident and MSP's AUROC falls far below 50 (the reports of 27-29 beside Mahalanobis 98). The head fitted
    # with the lr grid separates the classes, is unsure between them, and MSP reads the right way.
    import probe

    xtr, ytr = far_and_between(2000, "in", 0)
    x_in, y_in = far_and_between(500, "in", 1)
    x_ood, _ = far_and_between(500, "ood", 2)
    classes = [f"c{k}" for k in range(10)]
    splits = {"train": probe.Split(xtr, ytr, torch.arange(2000), classes, {}, "train"),
              "test": probe.Split(x_in, y_in, torch.arange(500), classes, {}, "test"),
              "ood": probe.Split(x_ood, torch.full((500,), -1), torch.arange(500), None, {}, "ood")}
    monkeypatch.setattr(probe, "split_features", lambda model, d, which, key=None: splits[which])
    folders = []
    for name in ("in/train", "in/test", "far"):  # real folders for the path checks (the features are the above)
        for c in (classes if name != "far" else ["x"]):
            (tmp_path / name / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / name / c / "0.png")
        folders.append(str(tmp_path / name))
    argv = ["--random-init", "--train-dir", folders[0], "--test-dir", folders[1], "--ood-dir", folders[2],
            "--cache-dir", str(tmp_path / "features")]
    r = ood.main(argv + ["--out", str(tmp_path / "grid.json")])
    for score in ("mahalanobis", "relative_mahalanobis", "msp"):
        assert r["scores"][score]["auroc"] > 90, (score, r["scores"][score])
    assert r["msp_head"]["test_top1"] > 95 and r["msp_head"]["recipe"]["name"] == "grid"
    # the cause, pinned: the paper's fixed recipe (the old default on folders) reads these OOD samples as the
    # most confident ones
    old = ood.main(argv + ["--recipe", "paper", "--out", str(tmp_path / "paper.json")])
    assert old["scores"]["msp"]["auroc"] < 50 and old["scores"]["mahalanobis"]["auroc"] > 90
    assert old["msp_head"]["test_top1"] < 50


# --- end to end ---------------------------------------------------------------------------------------


def test_ood_script_end_to_end(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(M3AE(make_config("tiny", vocab_size=50))), path)
    r = ood.main(["--ckpt", str(path), "--train-size", "64", "--test-size", "32", "--ood-size", "32",
                  "--epochs", "3", "--batch-size", "16"])
    assert r["sizes"] == dict(in_train=64, in_test=32, ood=32, head_fit=58) and r["classes"] == 10
    assert set(r["scores"]) == {"mahalanobis", "relative_mahalanobis", "msp"}
    for m in r["scores"].values():
        assert set(m) == {"auroc", "fpr95", "aupr_in", "aupr_out"} and all(0 <= v <= 100 for v in m.values())
    assert r["msp_head"]["selection"]["val_size"] == 6  # the MSP head's lr chosen on held-out train images
    strict = lambda c: pytest.fail(f"{c} in the JSON")
    assert json.loads((tmp_path / "ood_builtin.json").read_text(), parse_constant=strict) == json.loads(json.dumps(r))
    assert "relative_mahalanobis" in capsys.readouterr().out
    # the paper's Fig. 6 beside the JSON: one histogram panel per score, listed for --overwrite
    from PIL import Image

    assert Image.open(tmp_path / "ood_builtin.png").size[0] >= 3 * 480
    assert "ood_builtin.png" in (tmp_path / "outputs.txt").read_text().split()
    # probe.py on the same checkpoint reuses the in-distribution features (one cache, the same keys)
    import probe

    calls = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    probe.main(["--ckpt", str(path), "--train-size", "64", "--test-size", "32", "--epochs", "1"])
    assert calls == []
    # real data needs all three folders
    with pytest.raises(SystemExit):
        ood.main(["--ckpt", str(path), "--train-dir", str(tmp_path)])


def image_folders(root, classes, n=3):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (60 * i, 120, 200)).save(root / c / f"{i}.png")
    return root


def test_ood_folders_fail_loudly(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(M3AE(make_config("tiny", vocab_size=50))), path)
    train = image_folders(tmp_path / "in" / "train", ["a", "b"])
    test = image_folders(tmp_path / "in" / "test", ["a", "b"])
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    base = ["--ckpt", str(path), "--train-dir", str(train), "--test-dir", str(test), "--epochs", "2"]
    for ood_dir, problem in ((tmp_path / "typo", "no such folder"), (empty, "no image files in it or below it")):
        with pytest.raises(SystemExit) as e:
            ood.main(base + ["--ood-dir", str(ood_dir)])
        assert e.value.code == 2 and f"--ood-dir {ood_dir}: {problem}" in capsys.readouterr().err
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for i in range(4):
        (unreadable / f"{i}.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit) as e:
        ood.main(base + ["--ood-dir", str(unreadable)])
    msg = str(e.value.code)
    assert f"--ood-dir {unreadable}" in msg and "all 4 skipped (corrupt 4)" in msg and "no metric" in msg
    assert not list(tmp_path.glob("ood*.json"))
    # a good OOD folder: the result is named by both datasets, and another OOD set does not overwrite it
    for name in ("far", "other"):
        image_folders(tmp_path / name, ["x"], n=4)
        ood.main(base + ["--ood-dir", str(tmp_path / name)])
    assert sorted(p.name for p in tmp_path.glob("ood*.json")) == ["ood_in_vs_far.json", "ood_in_vs_other.json"]


# --- issue #24: no traceback for a bad input; touch only what the run wrote ---------------------------------


def test_a_bad_ckpt_is_one_line_and_exit_2_never_unpickled(tmp_path, capsys):
    from test_probe import bad_checkpoints

    paths, marker = bad_checkpoints(tmp_path)
    for what, path in paths.items():
        with pytest.raises(SystemExit) as e:
            ood.main(["--ckpt", str(path), "--train-size", "40", "--test-size", "20", "--ood-size", "20"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, (what, err)
        assert str(path) in err and "Traceback" not in err, (what, err)
    assert not marker.exists() and not list(tmp_path.rglob("ood*.json"))


def test_one_class_in_distribution_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(M3AE(make_config("tiny", vocab_size=50))), path)
    one = image_folders(tmp_path / "in" / "train", ["a"], n=12)  # (the old code reported AUROC 50)
    far = image_folders(tmp_path / "far", ["x"], n=4)
    with pytest.raises(SystemExit) as e:
        ood.main(["--ckpt", str(path), "--train-dir", str(one), "--test-dir", str(one), "--ood-dir", str(far)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"--train-dir {one}" in line and "at least 2 classes" in line, line
    assert not list(tmp_path.glob("ood*.json"))


def test_the_result_is_recorded_next_to_the_checkpoint(tmp_path):
    import rundir

    torch.manual_seed(0)
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "ckpt.pt"
    torch.save(checkpoint_dict(M3AE(make_config("tiny", vocab_size=50))), path)
    ood.main(["--ckpt", str(path), "--train-size", "40", "--test-size", "20", "--ood-size", "20", "--epochs", "1"])
    listed = rundir.run_files(str(path.parent))
    assert "ood_builtin.json" in listed and sum(n.startswith("features/") for n in listed) == 3, listed
