"""builtin.py: the procedural dataset is a pure function of (seed, split, index), its captions and labels,
its normalisation constants, and the contact sheet."""

import os

import numpy as np
import pytest

import builtin



def test_builtin_is_a_pure_function_of_seed_split_index():
    a, b = builtin.Builtin("pretrain", 20), builtin.Builtin("pretrain", 20)
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert x["image"].tobytes() == y["image"].tobytes()
        assert x["caption"] == y["caption"] and x["label"] == y["label"]
    assert builtin.Builtin("pretrain", 20, seed=1)[0]["image"].tobytes() != a[0]["image"].tobytes()
    # index order does not matter (workers draw samples in any order)
    assert builtin.Builtin("pretrain", 20)[19]["image"].tobytes() == a[19]["image"].tobytes()
    with pytest.raises(IndexError):
        a[20]


def test_builtin_splits_never_share_samples():
    splits = {s: builtin.Builtin(s, 100) for s in ("pretrain", "train", "test", "ood")}
    images = {s: {d[i]["image"].tobytes() for i in range(len(d))} for s, d in splits.items()}
    for s in images:
        assert len(images[s]) == 100
        for t in images:
            if s < t:
                assert not images[s] & images[t], (s, t)
    assert {s: len(d) for s, d in ((s, builtin.Builtin(s)) for s in splits)} == {
        "pretrain": 20000, "train": 5000, "test": 2000, "ood": 2000}


def test_builtin_samples_labels_and_ood_classes():
    assert not set(builtin.Builtin.CLASSES) & set(builtin.Builtin.OOD_CLASSES)
    for split, classes in (("train", builtin.Builtin.CLASSES), ("ood", builtin.Builtin.OOD_CLASSES)):
        ds = builtin.Builtin(split, 300)
        labels = []
        for i in range(300):
            _, s = ds._scene(i)
            labels.append(s["label"])
            assert s["shape"] == classes[s["label"]]
            # distractors are always in-distribution shapes, never the main object's own shape
            assert all(d["shape"] in builtin.Builtin.CLASSES and d["shape"] != s["shape"] for d in s["distractors"])
        assert set(labels) == set(range(len(classes)))  # every class occurs
    # each level draws the main object in its size range (fractions of the side), inside the image
    for level, (lo, hi) in (("hard", (0.17, 0.27)), ("easy", (0.45, 0.65))):
        ds = builtin.Builtin("test", 20, image_size=64, level=level)
        for sample in (ds[i] for i in range(20)):
            assert sample["image"].mode == "RGB" and sample["image"].size == (64, 64)
            x0, y0, x1, y1 = sample["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and lo * 64 <= x1 - x0 <= hi * 64
    assert builtin.Builtin("train", 3, image_size=96)[0]["image"].size == (96, 96)
    with pytest.raises(ValueError):
        builtin.Builtin("val")
    with pytest.raises(ValueError):
        builtin.Builtin("train", level="medium")


def test_builtin_captions_name_the_object_most_of_the_time():
    ds = builtin.Builtin("pretrain", 400)
    caps = list(ds.captions())
    assert caps[:20] == [ds[i]["caption"] for i in range(20)]  # captions() without rendering: same text
    named = 0
    for i, c in enumerate(caps):
        _, s = ds._scene(i)
        assert c and c == c.strip() and "  " not in c and ",," not in c
        named += any(w in c for w in builtin.SHAPE_WORDS[s["shape"]])
    assert 0.7 < named / len(caps) < 0.9  # ~82%: 15% use a generic noun, 3% describe only the background
    assert len(set(caps)) > 350  # compositional: captions rarely repeat


def test_builtin_captions_have_their_own_random_stream(monkeypatch):
    # changing the caption grammar must not change a single image (captions draw from a separate stream)
    before = [builtin.Builtin("pretrain", 6)[i] for i in range(6)]
    monkeypatch.setattr(builtin, "_caption", lambda rng, s: rng.pick(["x", "y"]))
    after = [builtin.Builtin("pretrain", 6)[i] for i in range(6)]
    for a, b in zip(before, after):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) and a["label"] == b["label"]
        assert b["caption"] in ("x", "y") and a["caption"] != b["caption"]


def test_builtin_colour_label_is_the_main_objects_colour():
    shape, colour = builtin.Builtin("test", 300), builtin.Builtin("test", 300, label="colour")
    assert colour.classes == list(builtin.COLOURS) and shape.classes == builtin.Builtin.CLASSES
    labels = colour.labels()
    assert labels[:20] == [colour[i]["label"] for i in range(20)]  # labels() without rendering: same labels
    assert shape.labels() == shape.labels("shape") and labels == shape.labels("colour")
    named = 0
    for c, label in zip(colour.captions(), labels):
        words = c.replace(",", "").split()
        synonyms = builtin.COLOURS[colour.classes[label]][0]
        if any(w in words for w in synonyms):
            named += 1
            assert words[0] in synonyms, c  # the colour's slot is fixed: the first word (builtin._caption says why)
        # no other colour's name is used (distractors are never described by colour)
        others = {w for k, (syn, _) in builtin.COLOURS.items() if k != colour.classes[label] for w in syn}
        assert not others & set(words), c
    assert named / len(colour) > 0.8  # the caption names the colour 90% of the time (minus background-only ones)
    assert len(set(labels)) == 11 and len(set(shape.labels())) == 10
    with pytest.raises(ValueError):
        builtin.Builtin("test", 3, label="size")


@pytest.mark.parametrize("level", ["easy", "hard"])
def test_builtin_mean_std_constants(level):
    # one normalisation serves both levels: each level's statistics lie within 0.025 of the constants
    ds = builtin.Builtin("pretrain", 800, level=level)  # image means vary a lot (random colours): 800 samples
    mean, std = builtin.image_mean_std(ds[i]["image"] for i in range(len(ds)))
    assert np.allclose(mean, builtin.BUILTIN_MEAN, atol=0.025) and np.allclose(std, builtin.BUILTIN_STD, atol=0.025)


def test_contact_sheet(tmp_path):
    sheet = builtin.contact_sheet(str(tmp_path / "s.png"), rows=1, cols=2, n_ood=1)
    assert os.path.getsize(tmp_path / "s.png") > 1000 and sheet.size[0] > 2 * 64 * 3
