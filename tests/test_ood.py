"""ood.py: metrics against brute-force definitions (ties included), Mahalanobis scores, end-to-end run."""

import json

import numpy as np
import pytest
import torch

import ood
from model import M3AE, checkpoint_dict, make_config

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
    s = ood.msp_scores(head, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert s[0] < -0.99 and s[1] == pytest.approx(-1 / 3)  # confident -> low score; uniform -> -1/3


# --- end to end ---------------------------------------------------------------------------------------


def test_ood_script_end_to_end(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(M3AE(make_config("tiny", vocab_size=50))), path)
    r = ood.main(["--ckpt", str(path), "--train-size", "64", "--test-size", "32", "--ood-size", "32",
                  "--epochs", "3", "--batch-size", "16"])
    assert r["sizes"] == dict(in_train=64, in_test=32, ood=32) and r["classes"] == 10
    assert set(r["scores"]) == {"mahalanobis", "relative_mahalanobis", "msp"}
    for m in r["scores"].values():
        assert set(m) == {"auroc", "fpr95", "aupr_in", "aupr_out"} and all(0 <= v <= 100 for v in m.values())
    assert json.loads((tmp_path / "ood.json").read_text()) == json.loads(json.dumps(r))
    assert "relative_mahalanobis" in capsys.readouterr().out
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
