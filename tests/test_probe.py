"""probe.py: LARS by hand, the head on separable features, kNN, the feature cache, end-to-end runs, the table."""

import json
import math
import os

import pytest
import torch

import builtin
import data
import evalcommon
import probe
from checkpoint import checkpoint_dict
from model import M3AE, make_config

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
        f = probe.cached_features(model, probe.weights_hash(model), dataset, data_key, str(cache), batch_size=4)
        assert f.index.tolist() == list(range(6)) and f.skipped == {}
        return f.x, f.y

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
    from checkpoint import load_model

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
    assert r["mode"] == "fast" and r["classes"] == 10 and r["dataset"] == "builtin"
    assert r["train_size"] + r["val_size"] == 64 and r["val_size"] == 6 and r["test_size"] == 32  # 0.1 held out
    for k in ("top1", "top5", "knn_top1", "knn_top5", "train_top1", "val_top1"):
        assert 0.0 <= r[k] <= 100.0
    assert r["top5"] >= r["top1"] and r["recipe"]["optimizer"] == "lars" and r["recipe"]["name"] == "grid"
    sel = r["selection"]
    assert [g["base_lr"] for g in sel["grid"]] == sorted(probe.LR_GRID) and r["base_lr"] == sel["chosen_base_lr"]
    assert r["val_top1"] == max(g["val_top1"] for g in sel["grid"] if g["val_top1"] is not None)
    assert r["pretraining"]["steps"] == 0
    out = ckpt.parent / "probe_builtin_fast.json"
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert len(os.listdir(ckpt.parent / "features")) == 2  # train and test
    assert "linear probe (fast" in capsys.readouterr().out
    # the untrained floor: another file, other features; the same seed gives the same result
    r0 = probe.main(["--ckpt", str(ckpt), "--random-init", "--seed", "1", *SMALL])
    assert r0["random_init"] and r0["model_hash"] != r["model_hash"]
    assert (ckpt.parent / "probe_builtin_fast_random_init.json").exists()
    assert len(os.listdir(ckpt.parent / "features")) == 4
    assert probe.main(["--ckpt", str(ckpt), "--random-init", "--seed", "1", *SMALL])["top1"] == r0["top1"]
    # the paper's fixed recipe: its own file, the whole training split, no selection
    rp = probe.main(["--ckpt", str(ckpt), "--recipe", "paper", *SMALL])
    assert rp["recipe"]["base_lr"] == 0.1 and rp["selection"] is None and rp["train_size"] == 64
    assert (ckpt.parent / "probe_builtin_fast_paper.json").exists()
    colour = probe.main(["--ckpt", str(ckpt), "--label", "colour", *SMALL])
    assert colour["dataset"] == "builtin_colour" and (ckpt.parent / "probe_builtin_colour_fast.json").exists()


def test_quick_probe_is_probe_py_with_the_paper_recipe_at_base_lr_6_4(ckpt):
    # train.py's quick probe keeps the fixed built-in recipe (LARS, base lr 6.4, the whole training split):
    # `probe.py --recipe paper --base-lr 6.4` gives the same numbers
    model, _ = probe.load_encoder(str(ckpt))
    W = model.config.image_size
    transform = data.EvalTransform(W, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0)
    sets = [data.LabelledDataset(builtin.Builtin(s, n, W), transform) for s, n in (("train", 64), ("test", 32))]
    accs = probe.quick_probe(model, *sets, seed=0)
    for label in ("shape", "colour"):
        r = probe.main(["--ckpt", str(ckpt), "--train-size", "64", "--test-size", "32", "--recipe", "paper",
                        "--base-lr", "6.4", "--label", label, "--data-level", "easy"])
        assert r["top1"] == accs[label]


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
    assert r["data"] == "folder" and r["classes"] == 2 and r["train_size"] + r["val_size"] == 12
    assert r["test_size"] == 6 and r["skipped"]["train"] == {"corrupt": 1}
    r = probe.main(["--ckpt", str(ckpt), "--train-dir", str(tmp_path / "train"), "--test-dir",
                    str(tmp_path / "test"), "--epochs", "2", "--batch-size", "4", "--recipe", "paper"])
    assert r["recipe"]["base_lr"] == 0.1 and r["train_size"] == 12  # the paper's, on the whole training split
    assert r["dataset"] == str(tmp_path.name) and (ckpt.parent / f"probe_{tmp_path.name}_fast_paper.json").exists()
    # full mode with the grid: every head on the same augmented batches, validation on the cached centre view
    r = probe.main(["--ckpt", str(ckpt), "--mode", "full", "--train-dir", str(tmp_path / "train"), "--test-dir",
                    str(tmp_path / "test"), "--epochs", "1", "--batch-size", "4", "--lr-grid", "0.1", "6.4"])
    assert r["mode"] == "full" and [g["base_lr"] for g in r["selection"]["grid"]] == [0.1, 6.4]


# --- the lr grid -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_grid_heads_are_single_heads_trained_at_once(optimizer):
    x, y = separable(300)
    lrs = [0.1, 6.4, 30.0] if optimizer == "lars" else [0.01, 0.1, 1.0]
    grid = probe.train_grid_on_features(x, y, 10, lrs, epochs=10, batch_size=64, optimizer=optimizer)
    assert not grid.training and grid.diverged == [False] * 3
    norms = grid.weight.detach().flatten(1).norm(dim=1)
    assert norms[2] > 1.3 * norms[0]  # the heads went apart (LARS's per-head trust ratio matters)
    for i, lr in enumerate(lrs):
        single = probe.train_head_on_features(x, y, 10, epochs=10, batch_size=64, base_lr=lr, optimizer=optimizer)
        head = grid.head(i)
        assert torch.allclose(head[1].weight, single[1].weight, rtol=1e-4, atol=1e-6), lr
        assert torch.allclose(head[1].bias, single[1].bias, rtol=1e-4, atol=1e-6), lr
        assert torch.allclose(head[0].running_mean, single[0].running_mean)
        with torch.no_grad():
            assert torch.allclose(grid(x)[i], single(x), rtol=1e-4, atol=1e-5)


def test_choose_lr_best_validation_top1_ties_to_the_smaller_lr_and_skips_diverged():
    nan = float("nan")
    assert probe.choose_lr([10.0, 50.0, 80.0, 80.0, 70.0]) == 2
    assert probe.choose_lr([nan, 50.0, nan]) == 1 and probe.choose_lr([nan, nan]) is None


def features_split(x, y, classes, what="synthetic"):
    return probe.Split(x, y, torch.arange(len(x)), classes, {}, what)


def fake_features(monkeypatch, splits):
    """probe.split_features returns the given Split per split name instead of running an encoder."""
    monkeypatch.setattr(probe, "split_features", lambda model, d, which, key=None: splits[which])


def class_folders(root, classes, n=1, size=8):
    """root/<class>/<i>.png for each class: tiny real PNGs (enough for the path checks)."""
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (40 * i % 255, 90, 160)).save(root / c / f"{i}.png")
    return root


def test_grid_picks_the_lr_on_validation_never_on_test(tmp_path, monkeypatch):
    # Features where the best lr on test is another than on validation: the test labels are what a head of
    # another lr predicts. A probe that chose on test would report 100%; ours keeps the validation choice.
    xtr, ytr = separable(600, dim=16)
    noise = torch.randn(xtr.shape, generator=torch.Generator().manual_seed(5)) * 120  # overlapping classes
    xtr = xtr + noise
    classes = [f"c{k}" for k in range(10)]
    fit, val = probe.stratified_split(ytr, 0.1, 0)
    lrs = [0.03, 1.0, 30.0]
    grid = probe.train_grid_on_features(xtr[fit], ytr[fit], 10, lrs)
    val_top1, _ = probe.grid_scores(grid, xtr[val], ytr[val])
    best = probe.choose_lr(val_top1.tolist())
    other = next(i for i in range(3) if val_top1[i] < val_top1[best])  # a head validation ranks lower
    xte = separable(300, dim=16, seed=7)[0]
    with torch.no_grad():
        yte = grid(xte)[other].argmax(1)  # test labels = that head's predictions: it is 100% right on test
    fake_features(monkeypatch, {"train": features_split(xtr, ytr, classes), "test": features_split(xte, yte, classes)})
    argv = ["--random-init", "--lr-grid", *map(str, lrs), "--out", str(tmp_path / "r.json")]
    r = probe.main(argv)
    assert r["base_lr"] == lrs[best] != lrs[other]
    assert r["val_top1"] == pytest.approx(val_top1[best].item()) and r["top1"] < 100.0
    with torch.no_grad():
        assert r["top1"] == pytest.approx(100.0 * (grid(xte)[best].argmax(1) == yte).float().mean().item())


def imbalanced_separable(counts, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    return (centres[y] + 0.5 * torch.randn(len(y), dim, generator=g)) * 40 + 100, y


def test_grid_separates_what_the_papers_recipe_collapses_to_the_majority_class(tmp_path, monkeypatch):
    # A few hundred samples, imbalanced: at the paper's base lr 0.1 (90 one-batch epochs) only the bias moves,
    # and the head predicts the majority class for everything; the grid finds an lr that separates the classes.
    counts = [int(120 * 0.6 ** k) + 4 for k in range(8)]
    xtr, ytr = imbalanced_separable(counts)
    xte, yte = imbalanced_separable([30] * 8, seed=1)
    classes = [f"c{k}" for k in range(8)]
    fake_features(monkeypatch, {"train": features_split(xtr, ytr, classes), "test": features_split(xte, yte, classes)})
    paper = probe.main(["--random-init", "--recipe", "paper", "--out", str(tmp_path / "p.json")])
    assert paper["top1"] == pytest.approx(paper["majority_share"]) == pytest.approx(100 / 8)
    grid = probe.main(["--random-init", "--out", str(tmp_path / "g.json")])
    assert grid["top1"] > 95.0 and grid["val_top1"] > 95.0


def solid_colour_folders(root, train_counts, test_count, seed=0):
    """An ImageFolder pair of real PNGs: class k = noisy images of one colour (separable even for an untrained
    encoder), train counts as given (imbalanced), test_count per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(len(train_counts), 3))
    for split, counts in (("train", train_counts), ("test", [test_count] * len(train_counts))):
        for k, n in enumerate(counts):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                px = np.clip(colours[k] + rng.normal(0, 25, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / f"c{k}" / f"{i}.png")
    return root / "train", root / "test"


def test_small_imbalanced_folder_the_grid_beats_the_majority_share_the_paper_recipe_gives(tmp_path):
    train_dir, test_dir = solid_colour_folders(tmp_path / "solid", [int(80 * 0.6 ** k) + 3 for k in range(8)], 15)
    argv = ["--random-init", "--train-dir", str(train_dir), "--test-dir", str(test_dir), "--cache-dir",
            str(tmp_path / "features")]
    paper = probe.main(argv + ["--recipe", "paper", "--out", str(tmp_path / "p.json")])
    assert paper["top1"] == pytest.approx(paper["majority_share"])  # everything predicted as the majority class
    assert paper["knn_top1"] > 90.0  # while the features separate the classes
    grid = probe.main(argv + ["--out", str(tmp_path / "g.json")])
    assert grid["top1"] > 90.0 and grid["train_size"] + grid["val_size"] == paper["train_size"]
    # --train-size on a folder: a seeded stratified subset (class shares kept)
    sub = probe.main(argv + ["--train-size", "100", "--out", str(tmp_path / "s.json")])
    assert sub["train_size"] + sub["val_size"] == 100


# --- splits and subsets ------------------------------------------------------------------------------------


def test_stratified_pick_and_split_keep_class_shares():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 4 + [4] * 1)
    picked = evalcommon.stratified_pick(y, 20, seed=0)
    assert len(picked) == 20 and y[picked].bincount(minlength=5).tolist() == [10, 6, 3, 1, 0]
    assert torch.equal(picked, evalcommon.stratified_pick(y, 20, seed=0))  # seeded
    assert not torch.equal(picked, evalcommon.stratified_pick(y, 20, seed=1))
    fit, val = probe.stratified_split(y, 0.1, seed=0)
    assert len(val) == 10 and sorted(fit.tolist() + val.tolist()) == list(range(100))
    assert y[val].bincount(minlength=5).tolist() == [5, 3, 2, 0, 0]  # 0.1 x counts, largest remainder first
    assert y[fit].bincount(minlength=5).min() >= 1  # every class keeps a training sample (the single 4 too)


# --- fail loudly -------------------------------------------------------------------------------------------


def error_line(capsys, argv, main=probe.main, code=2):
    """Run main(argv), expect SystemExit(code) (2: argparse's error), return the message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    if code == 2:
        assert e.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]
    return str(e.value.code)


def test_path_flags_are_checked_before_any_work(tmp_path, capsys, ckpt):
    good = class_folders(tmp_path / "good", ["a", "b"])
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "noimg"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "notes.txt").write_text("not an image")
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    base = ["--ckpt", str(ckpt)]
    cases = [
        (["--ckpt", str(tmp_path / "nope.pt")], "--ckpt", "no such file"),
        (["--ckpt", str(tmp_path)], "--ckpt", "is a folder"),
        (base + ["--train-dir", str(tmp_path / "missing"), "--test-dir", str(good)], "--train-dir", "no such folder"),
        (base + ["--train-dir", str(a_file), "--test-dir", str(good)], "--train-dir", "not a folder"),
        (base + ["--train-dir", str(empty), "--test-dir", str(good)], "--train-dir", "no class sub-folders"),
        (base + ["--train-dir", str(good), "--test-dir", str(no_images)], "--test-dir", "no image files"),
        (base + ["--train-dir", str(good), "--test-dir", str(good), "--val-dir", str(empty)], "--val-dir",
         "no class sub-folders"),
        (base + ["--train-dir", str(good), "--test-dir", str(good), "--train-size", "3"], "--train-size",
         "more than the 2 image files"),
    ]
    for argv, flag, problem in cases:
        line = error_line(capsys, argv)
        value = argv[argv.index(flag) + 1]
        assert f"{flag} {value}: {problem}" in line, (line, flag, problem)
    assert not (ckpt.parent / "features").exists()  # nothing was extracted


def test_class_mismatch_names_the_classes_that_differ(tmp_path, capsys, ckpt):
    train = class_folders(tmp_path / "tr", ["cat", "dog", "fox"])
    test = class_folders(tmp_path / "te", ["cat", "dog", "owl"])
    line = error_line(capsys, ["--ckpt", str(ckpt), "--train-dir", str(train), "--test-dir", str(test)])
    assert f"--test-dir {test}: class folders differ from --train-dir's" in line
    assert "missing from test: fox" in line and "extra in test: owl" in line
    val = class_folders(tmp_path / "va", ["cat"])
    line = error_line(capsys, ["--ckpt", str(ckpt), "--train-dir", str(train), "--test-dir", str(train),
                               "--val-dir", str(val)])
    assert "missing from val: dog, fox" in line and "extra" not in line


def test_all_unreadable_folder_is_an_error_naming_it_and_the_skips(tmp_path, ckpt):
    good = class_folders(tmp_path / "good", ["a", "b"], n=4)
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        for i in range(3):
            (bad / c / f"{i}.jpg").write_bytes(b"not a jpeg")
    (bad / "a" / "empty.png").write_bytes(b"")
    out = tmp_path / "r.json"
    for train, test in ((bad, good), (good, bad)):
        with pytest.raises(SystemExit) as e:
            probe.main(["--ckpt", str(ckpt), "--train-dir", str(train), "--test-dir", str(test), "--out", str(out)])
        msg = str(e.value.code)
        assert str(bad) in msg and "all 7 skipped" in msg and "corrupt 6" in msg and "empty_file 1" in msg
        assert "\n" not in msg and not out.exists()
    assert not any("bad" in str(p) for p in (ckpt.parent / "features").glob("*"))  # nothing empty cached


def test_result_json_never_holds_nan(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(SystemExit, match=r"not writing .*result.scores.msp.auroc is nan"):
        probe.write_result({"scores": {"msp": {"auroc": float("nan")}}}, str(path))
    with pytest.raises(SystemExit, match=r"result.grid\[1\] is inf"):
        probe.write_result({"grid": [1.0, float("inf")]}, str(path))
    assert not path.exists()
    probe.write_result({"top1": 50.0, "val": None}, str(path))
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {"top1": 50.0,
                                                                                                   "val": None}
    with pytest.raises(ValueError):
        probe.topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


def test_result_files_are_named_by_dataset_and_the_head_can_be_saved(tmp_path, ckpt):
    for name, colour_seed in (("shapes_a", 0), ("shapes_b", 1)):
        train, test = solid_colour_folders(tmp_path / name, [6, 6], 3, seed=colour_seed)
        r = probe.main(["--ckpt", str(ckpt), "--train-dir", str(train), "--test-dir", str(test), "--epochs", "3",
                        "--save-head", str(tmp_path / f"{name}_head.pt")])
        assert r["dataset"] == name
    files = sorted(p.name for p in ckpt.parent.glob("probe_*.json"))
    assert files == ["probe_shapes_a_fast.json", "probe_shapes_b_fast.json"]  # the second did not overwrite
    saved = torch.load(tmp_path / "shapes_b_head.pt", weights_only=True)
    head = probe.make_head(r["feature_dim"], 2)
    head.load_state_dict(saved["head"])
    assert saved["classes"] == ["c0", "c1"] and saved["recipe"]["base_lr"] == r["base_lr"]
    assert evalcommon.folder_name("/data/imagenet/train") == "imagenet" and evalcommon.folder_name("/x/my set/") == "my_set"


def test_help_strings_read_right_with_the_default_appended():
    import argparse

    import ood
    import viz

    for module in (probe, ood, viz):
        parser = module.build_parser()
        assert isinstance(parser.formatter_class, type) and issubclass(
            parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)  # util.make_parser's
        for action in parser._actions:
            text = action.help
            if action.dest == "help":
                continue
            where = (module.__name__, action.option_strings[0], text)
            assert text, where
            # the formatter appends "(default: X)": a help text must not state a default of its own besides
            assert "(default" not in text and "default:" not in text and "default " not in text, where
            if action.default is None:  # "(default: None)" follows: the text says what not giving it means
                assert "if not given" in text, where
        assert "(default: None)" not in parser.format_help()  # util.HelpFormatter shows value defaults only


# --- issue #24: no traceback for a bad input; touch only what the run wrote ---------------------------------


class Evil:
    """A pickle whose loading would run a shell command (what torch.load(weights_only=False) would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_checkpoints(tmp_path):
    """{what: path} of files a user may give as --ckpt that are not checkpoints, and the marker file the
    malicious one would create if it were ever unpickled."""
    root = tmp_path / "bad_ckpts"
    root.mkdir()
    marker = root / "PWNED"
    paths = {k: root / f"{k}.pt" for k in ("pickle", "empty", "garbage", "no_model", "wrong_shapes")}
    torch.save({"model": Evil(marker), "config": {}}, paths["pickle"])
    paths["empty"].write_bytes(b"")
    paths["garbage"].write_bytes(b"\x00\x01not a checkpoint at all" * 40)
    torch.save({"weights": [1, 2, 3]}, paths["no_model"])
    small, big = (M3AE(make_config("tiny", vocab_size=50, depth=d)) for d in (1, 2))
    torch.save(dict(checkpoint_dict(small), config=checkpoint_dict(big)["config"]), paths["wrong_shapes"])
    return paths, marker


def test_a_bad_ckpt_is_one_line_and_exit_2_never_unpickled(tmp_path, capsys, ckpt):
    paths, marker = bad_checkpoints(tmp_path)
    for what, path in paths.items():
        with pytest.raises(SystemExit) as e:
            probe.main(["--ckpt", str(path), *SMALL, "--out", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, (what, err)
        assert str(path) in err and "Traceback" not in err and "weights_only=False" not in err, (what, err)
    assert not marker.exists()  # the pickle's os.system never ran
    assert "refused" in probe_error(capsys, paths["pickle"], tmp_path)
    assert not (tmp_path / "r.json").exists()
    # a checkpoint whose tokenizer entry is garbage: the probe reads images only, and runs
    torch.save(dict(torch.load(ckpt, weights_only=True),
                    tokenizer={"kind": "sentencepiece", "blob": b"\x00garbage"}), tmp_path / "tok.pt")
    assert probe.main(["--ckpt", str(tmp_path / "tok.pt"), *SMALL, "--out", str(tmp_path / "t.json")])


def probe_error(capsys, ckpt, tmp_path):
    with pytest.raises(SystemExit):
        probe.main(["--ckpt", str(ckpt), *SMALL, "--out", str(tmp_path / "r.json")])
    return capsys.readouterr().err


def test_an_unreadable_feature_cache_is_recomputed_and_overwritten(ckpt, capsys):
    r = probe.main(["--ckpt", str(ckpt), *SMALL])
    cache = sorted((ckpt.parent / "features").glob("*.pt"))
    assert len(cache) == 2
    whole = cache[0].read_bytes()
    cache[0].write_bytes(whole[: len(whole) // 3])  # a run killed while copying, a full disk: truncated
    capsys.readouterr()
    again = probe.main(["--ckpt", str(ckpt), *SMALL])
    out = capsys.readouterr().out
    assert again["top1"] == r["top1"] and again["knn_top1"] == r["knn_top1"]
    notes = [line for line in out.splitlines() if f"{cache[0]} is unreadable" in line]
    assert len(notes) == 1, out
    assert cache[0].read_bytes() == whole  # recomputed and overwritten: the next run reads it
    probe.main(["--ckpt", str(ckpt), *SMALL])
    assert "is unreadable" not in capsys.readouterr().out


def test_a_full_disk_while_caching_features_leaves_no_temp_file_and_says_so(ckpt, capsys, monkeypatch):
    import errno

    real = torch.save

    def full(obj, f, *a, **k):
        if "features" in str(getattr(f, "name", f)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    r = probe.main(["--ckpt", str(ckpt), *SMALL])  # the features are in memory: the run goes on
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "no space left" in line]
    assert notes and all("features" in line for line in notes), out
    assert list((ckpt.parent / "features").iterdir()) == []  # no temp file, no partial cache
    assert r["top1"] >= 0 and (ckpt.parent / "probe_builtin_fast.json").exists()


def test_a_training_folder_of_one_class_is_refused(tmp_path, capsys, ckpt):
    one = class_folders(tmp_path / "one", ["cat"], n=12)  # (the old code reported 100%)
    line = error_line(capsys, ["--ckpt", str(ckpt), "--train-dir", str(one), "--test-dir", str(one)])
    assert f"--train-dir {one}" in line and "at least 2 classes" in line
    # two class folders, but every image of one of them unreadable: refused after reading, in one line
    two = class_folders(tmp_path / "two", ["cat", "dog"], n=3)
    for f in (two / "dog").iterdir():
        f.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        probe.main(["--ckpt", str(ckpt), "--train-dir", str(two), "--test-dir", str(two)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "at least 2 classes" in err, err
    assert not list(ckpt.parent.glob("probe_*.json"))


def test_results_are_written_atomically_and_recorded_for_overwrite(ckpt, tmp_path, capsys, monkeypatch):
    import errno

    import rundir

    probe.main(["--ckpt", str(ckpt), *SMALL, "--save-head", str(ckpt.parent / "head.pt")])
    listed = rundir.run_files(str(ckpt.parent))
    features = [f"features/{p.name}" for p in (ckpt.parent / "features").glob("*.pt")]
    assert len(features) == 2
    for name in ["probe_builtin_fast.json", "head.pt", *features]:
        assert name in listed, (name, listed)
    # written atomically: a failure while writing leaves the previous result as it was, and no temp file
    result = ckpt.parent / "probe_builtin_fast.json"
    before = result.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(SystemExit) as e:
        probe.main(["--ckpt", str(ckpt), *SMALL, "--seed", "5"])
    assert "no space left" in str(e.value.code) and "\n" not in str(e.value.code)
    assert result.read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir() if ".m3ae-tmp." in p.name or ".tmp." in p.name) == []
    # a result outside the checkpoint's folder (--out) is written, and not listed there
    monkeypatch.undo()
    probe.main(["--ckpt", str(ckpt), *SMALL, "--out", str(tmp_path / "elsewhere.json")])
    assert (tmp_path / "elsewhere.json").exists() and "elsewhere.json" not in rundir.run_files(str(ckpt.parent))


def test_a_result_never_replaces_another_datasets(tmp_path, ckpt, capsys):
    """Two datasets whose folders share a name (both called probe_train): the second result goes to its own
    file and says so; it replaced the first one's silently before (78.22% became 39.22%)."""
    names = []
    for k, where in enumerate(("first", "second")):
        train_dir, test_dir = solid_colour_folders(tmp_path / where, [20, 20, 20], 6, seed=k)
        (tmp_path / where / "probe_train").mkdir()
        os.rename(train_dir, tmp_path / where / "probe_train" / "train")
        argv = ["--ckpt", str(ckpt), "--train-dir", str(tmp_path / where / "probe_train" / "train"),
                "--test-dir", str(test_dir), "--epochs", "2", "--cache-dir", str(tmp_path / "features")]
        probe.main(argv)
        names.append(sorted(n for n in os.listdir(ckpt.parent) if n.startswith("probe_probe_train")))
    assert len(names[0]) == 1 and len(names[1]) == 2  # the first file is still there, beside the second
    first = json.loads((ckpt.parent / names[0][0]).read_text())
    assert str(tmp_path / "first") in json.dumps(first["folders"])
    assert "holds the result of other folders" in capsys.readouterr().out
    probe.main(argv)  # the same dataset again: its own file is replaced, no third one
    assert len([n for n in os.listdir(ckpt.parent) if n.startswith("probe_probe_train")]) == 2


def test_a_test_folder_lacking_a_class_is_scored_on_the_classes_it_holds(tmp_path, ckpt, capsys):
    train_dir, test_dir = solid_colour_folders(tmp_path / "d", [20, 20, 20], 6)
    import shutil

    shutil.rmtree(test_dir / "c1")  # the test folder lacks class c1
    argv = ["--ckpt", str(ckpt), "--train-dir", str(train_dir), "--test-dir", str(test_dir), "--epochs", "2",
            "--cache-dir", str(tmp_path / "features"), "--out", str(tmp_path / "r.json")]
    line = error_line(capsys, argv)
    assert "missing from test: c1" in line and "--test-classes present" in line
    r = probe.main(argv + ["--test-classes", "present"])
    assert r["test_size"] == 12 and r["classes"] == 3  # c0 and c2 scored; the head still has 3 classes
    # labels follow the names: a perfectly separable task stays near perfect (c2 is not read as c1)
    assert r["knn_top1"] > 90
