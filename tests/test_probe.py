"""probe.py: LARS by hand, the head on separable features, kNN, the feature cache, end-to-end runs, the table."""

import json
import math
import os

import pytest
import torch

import builtin
import data
import probe
from model import M3AE, checkpoint_dict, make_config

# --- LARS ------------------------------------------------------------------------------------------


def test_lars_first_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = probe.LARS([w, b], lr=2.0, momentum=0.9, trust_coefficient=0.001)
    w.grad = torch.tensor([[0.0, 0.6], [0.8, 0.0]], dtype=torch.float64)  # ||g|| = 1
    b.grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
    opt.step()
    # matrix: trust ratio 0.001 x 5 / 1 = 0.005, mu = 0.005 g, w -= 2 x mu = w - 0.01 g
    assert torch.allclose(w, torch.tensor([[3.0, -0.006], [-0.008, 4.0]], dtype=torch.float64), atol=1e-15)
    # bias (1-D, as mae): no trust ratio, plain momentum SGD: b -= 2 x g
    assert torch.allclose(b, torch.tensor([0.0, 3.0], dtype=torch.float64), atol=1e-15)

    # second step, same gradients: mu = 0.9 mu + ratio' g, ratio' from the new ||w||
    ratio2 = 0.001 * math.sqrt(3.0**2 + 0.006**2 + 0.008**2 + 4.0**2) / 1.0
    mu = 0.9 * 0.005 + ratio2
    opt.step()
    expected = torch.tensor([[3.0, -0.006 - 2 * mu * 0.6], [-0.008 - 2 * mu * 0.8, 4.0]], dtype=torch.float64)
    assert torch.allclose(w, expected, atol=1e-15)
    assert torch.allclose(b, torch.tensor([0.0 - 2 * 1.9 * 0.5, 3.0 + 2 * 1.9 * 0.5], dtype=torch.float64))


def test_lars_weight_decay_zero_grad_and_zero_weight():
    # weight decay only: d = wd w, ratio = 0.001 ||w|| / (wd ||w||), so w -= lr x 0.001 x w
    w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    w.grad = torch.zeros_like(w)
    probe.LARS([w], lr=10.0, weight_decay=0.5).step()
    assert torch.allclose(w, 0.99 * torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    # a zero weight matrix (no trust ratio defined) takes the plain step
    z = torch.nn.Parameter(torch.zeros(2, 2))
    z.grad = torch.ones(2, 2)
    probe.LARS([z], lr=0.1).step()
    assert torch.allclose(z, torch.full((2, 2), -0.1))


# --- head, kNN ---------------------------------------------------------------------------------------


def separable(n, num_classes=10, dim=32, seed=0):
    """Well-separated clusters, offset and scaled far from zero mean / unit variance (the BatchNorm's job)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = (centres[y] + 0.5 * torch.randn(n, dim, generator=g)) * 40 + 100
    return x, y


@pytest.mark.parametrize("optimizer, base_lr", [("lars", 6.4), ("sgd", 0.1)])
def test_head_learns_linearly_separable_features(optimizer, base_lr):
    xtr, ytr = separable(1000)
    xte, yte = separable(500, seed=1)
    head = probe.train_head_on_features(xtr, ytr, 10, epochs=30, batch_size=128, base_lr=base_lr,
                                        optimizer=optimizer)
    assert not head.training
    with torch.no_grad():
        assert probe.topk_accuracy(head(xte), yte)[1] > 95.0


def test_lars_at_the_papers_lr_barely_moves_the_head_in_a_few_hundred_steps():
    # Why the built-in default is base lr 6.4 (probe.head_recipe): LARS moves w by lr x 0.001 x ||w|| a step,
    # so 210 steps at lr 0.05 leave the random initial direction almost where it was.
    xtr, ytr = separable(1000)
    heads = {lr: probe.train_head_on_features(xtr, ytr, 10, epochs=30, batch_size=128, base_lr=lr) for lr in (0.1, 6.4)}
    w0 = probe.make_head(32, 10)[1].weight
    cos = lambda w: torch.nn.functional.cosine_similarity(w.flatten(), w0.flatten(), dim=0).item()
    assert cos(heads[0.1][1].weight) > 0.9 and cos(heads[6.4][1].weight) < 0.5


def test_head_training_is_deterministic_per_seed():
    x, y = separable(300)
    a = probe.train_head_on_features(x, y, 10, epochs=2, seed=3)
    b = probe.train_head_on_features(x, y, 10, epochs=2, seed=3)
    c = probe.train_head_on_features(x, y, 10, epochs=2, seed=4)
    assert torch.equal(a[1].weight, b[1].weight) and not torch.equal(a[1].weight, c[1].weight)


def test_topk_and_knn():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    acc = probe.topk_accuracy(logits, torch.tensor([1, 1, 0]), ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3) and acc[5] == 100.0
    # k = 3 neighbours: two of class 0 at cosine 0.6, one of class 1 at cosine 1. A plain majority says 0; the
    # exp(sim / 0.07) weights say 1 (exp(1/0.07) > 2 exp(0.6/0.07)).
    bank = torch.tensor([[0.6, 0.8], [0.6, -0.8], [1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # cosine: normalised first
    assert probe.knn_accuracy(bank, labels, query, torch.tensor([1]), 3, k=3, t=0.07)[1] == 100.0
    assert probe.knn_accuracy(bank, labels, query, torch.tensor([0]), 3, k=3, t=100.0)[1] == 100.0  # ~majority
    xtr, ytr = separable(500)
    xte, yte = separable(200, seed=1)
    assert probe.knn_accuracy(xtr, ytr, xte, yte, 10)[1] > 95.0


# --- the feature cache ---------------------------------------------------------------------------------


def tiny_model(seed, **overrides):
    torch.manual_seed(seed)
    return M3AE(make_config("tiny", vocab_size=50, **overrides)).eval()


def test_feature_cache_hits_and_invalidates_when_the_checkpoint_changes(tmp_path, monkeypatch):
    calls = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    W = make_config("tiny").image_size
    transform = data.EvalTransform(W, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0)
    dataset = data.LabelledDataset(builtin.Builtin("test", 6, W), transform)
    cache = tmp_path / "features"

    def features(model, data_key="builtin:test:6"):
        return probe.cached_features(model, probe.weights_hash(model), dataset, data_key, str(cache), batch_size=4)

    a = tiny_model(0, depth=1)
    xa, ya = features(a)
    assert len(calls) == 1 and xa.shape == (6, a.config.emb_dim) and ya.tolist() == [dataset[i]["label"].item() for i in range(6)]
    xa2, _ = features(a)  # the same weights: read from disk
    assert len(calls) == 1 and torch.equal(xa, xa2)
    assert torch.equal(xa, probe.extract_features(a, dataset)[0])  # the cache holds what extraction gives
    calls.clear()

    b = tiny_model(1, depth=1)  # another checkpoint: another key, recomputed
    xb, _ = features(b)
    assert len(calls) == 1 and not torch.equal(xa, xb)
    with torch.no_grad():  # the same checkpoint file rewritten after more training: one weight moved
        a.encoder.norm.bias.add_(1e-3)
    features(a)
    assert len(calls) == 2
    features(a, data_key="builtin:test:6|another transform")  # another dataset or transform: recomputed
    assert len(calls) == 3 and len(os.listdir(cache)) == 4
    # the key hashes the weights, not the object: a reloaded copy of b hits b's entry
    torch.save(checkpoint_dict(b), tmp_path / "b.pt")
    from model import load_model

    features(load_model(tmp_path / "b.pt")[0].eval())
    assert len(calls) == 3


def test_weights_hash_ignores_attention_impl_only():
    a = tiny_model(0, depth=1)
    b = tiny_model(0, depth=1, attn_impl="math")
    assert probe.weights_hash(a) == probe.weights_hash(b)
    assert probe.weights_hash(a) != probe.weights_hash(tiny_model(1, depth=1))


def test_text_grounding_compares_own_and_other_images():
    torch.manual_seed(0)
    model = M3AE(make_config("tiny", vocab_size=30))
    text = torch.randint(1, 30, (6, 24))
    pad = torch.arange(24)[None] >= torch.tensor([[5], [9], [3], [12], [7], [24]])  # True = pad
    pairs = lambda images: [dict(image=images[i], text=text[i], text_padding_mask=pad[i]) for i in range(6)]
    same = torch.randn(1, 3, 32, 32).expand(6, -1, -1, -1)
    own, other = probe.text_grounding(model, pairs(same))
    assert own == other  # identical images: rolling them changes nothing
    images = torch.randn(6, 3, 32, 32)
    own, other = probe.text_grounding(model, pairs(images))
    assert own != other and math.isfinite(own) and math.isfinite(other)  # the text path sees the image at all
    assert probe.text_grounding(model, pairs(images), seed=1) != (own, other)  # the seed draws the masks
    chunked = probe.text_grounding(model, pairs(images), batch_size=4)  # chunks of 4 and 2: the same means
    assert chunked == pytest.approx((own, other), abs=1e-6)


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = M3AE(make_config("tiny", vocab_size=50))
    path = tmp_path / "run" / "ckpt.pt"
    path.parent.mkdir()
    torch.save(checkpoint_dict(model, args={"data": "builtin", "data_seed": 0, "steps": 0, "no_text": False}), path)
    return path


SMALL = ["--train-size", "64", "--test-size", "32", "--epochs", "3", "--batch-size", "16"]


def test_probe_script_end_to_end(ckpt, capsys):
    r = probe.main(["--ckpt", str(ckpt), *SMALL])
    assert r["mode"] == "fast" and r["train_size"] == 64 and r["test_size"] == 32 and r["classes"] == 10
    for k in ("top1", "top5", "knn_top1", "knn_top5", "train_top1"):
        assert 0.0 <= r[k] <= 100.0
    assert r["top5"] >= r["top1"] and r["recipe"]["optimizer"] == "lars" and r["recipe"]["base_lr"] == 6.4
    assert r["pretraining"]["steps"] == 0
    out = ckpt.parent / "probe_fast.json"
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert len(os.listdir(ckpt.parent / "features")) == 2  # train and test
    assert "linear probe (fast" in capsys.readouterr().out
    # the untrained floor: another file, other features; the same seed gives the same result
    r0 = probe.main(["--ckpt", str(ckpt), "--random-init", "--seed", "1", *SMALL])
    assert r0["random_init"] and r0["model_hash"] != r["model_hash"]
    assert (ckpt.parent / "probe_fast_random_init.json").exists()
    assert len(os.listdir(ckpt.parent / "features")) == 4
    assert probe.main(["--ckpt", str(ckpt), "--random-init", "--seed", "1", *SMALL])["top1"] == r0["top1"]


def test_probe_full_mode_and_folders(ckpt, tmp_path):
    r = probe.main(["--ckpt", str(ckpt), "--mode", "full", "--train-size", "32", "--test-size", "16",
                    "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "full.json")])
    assert r["mode"] == "full" and r["recipe"]["epochs"] == 1 and (tmp_path / "full.json").exists()
    # ImageFolder data: two classes of built-in images written to disk, plus one corrupt file (skipped)
    for split, n in (("train", 12), ("test", 6)):
        src = builtin.Builtin(split, n)
        for i in range(n):
            folder = tmp_path / split / builtin.Builtin.CLASSES[src[i]["label"] % 2]
            folder.mkdir(parents=True, exist_ok=True)
            src[i]["image"].resize((80, 80)).save(folder / f"{i}.png")
    (tmp_path / "train" / "circle" / "bad.jpg").write_bytes(b"not a jpeg")
    r = probe.main(["--ckpt", str(ckpt), "--train-dir", str(tmp_path / "train"), "--test-dir",
                    str(tmp_path / "test"), "--epochs", "2", "--batch-size", "4", "--out", str(tmp_path / "f.json")])
    assert r["data"] == "folder" and r["classes"] == 2 and r["train_size"] == 12 and r["test_size"] == 6
    assert r["recipe"]["base_lr"] == 0.1  # the paper's for real data
