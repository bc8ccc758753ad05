"""zeroshot.py: the masked tokens are exactly the class name's, shared forwards equal one forward per caption,
how templates and synonyms average, the text-free refusal, bad inputs in one line, end-to-end runs on a folder,
on the built-in data and on the converted official fixture (WordPiece)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import builtin
import convert
import zeroshot
from checkpoint import checkpoint_dict, load_model
from model import M3AE, make_config
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_m3ae_tiny.npz")
NAMES = [["ankle boot", "boot"], ["t-shirt/top"], ["bag"]]
TEMPLATES = ["a photo of a {}", "{} on a plain background", "a black and white picture ({}) here"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """sentencepiece on built-in captions and lines that hold every word and mark of the names and templates."""
    extra = ["a photo of a t-shirt/top, an ankle boot or a bag", "on a plain background",
             "a black and white picture (of it) here"] * 30
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer.train(list(builtin.Builtin("pretrain", 1000).captions()) + extra, str(path), 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return M3AE(make_config("tiny", vocab_size=tok.vocab_size, attn_impl="math")).eval()


def save_ckpt(path, model, tok, **args):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint_dict(model, args={"data": "builtin", "data_seed": 0, "steps": 0, "no_text": False, **args},
                               tokenizer={"kind": tok.kind, "blob": tok.to_bytes()}), path)
    return str(path)


def image_folder(root, classes, per_class=4, size=40):
    g = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


# -----------------------------------------------------------------------------
# what is masked, and the shared forwards


def test_the_masked_tokens_are_exactly_the_names_multi_piece(tok, model):
    captions = zeroshot.make_captions(tok, TEMPLATES, NAMES, model.config.text_len)
    assert len(captions) == len(TEMPLATES) * 4
    for cap in captions:
        visible = zeroshot.visible_text(cap)
        enc = model.forward_encoder(torch.zeros(1, 3, 32, 32), cap.ids[None], cap.pad[None],
                                    image_visible=torch.ones(1, model.config.num_patches, dtype=torch.bool),
                                    text_visible=visible[None])
        removed = sorted(i for i in enc.text.ids_removed[0].tolist() if not cap.pad[i])
        assert removed == list(range(*cap.span))  # the hidden real tokens are the name's, no other
        assert tok.decode(cap.ids[cap.span[0]:cap.span[1]]) == cap.name  # ... and they spell it
        before, after = TEMPLATES[cap.t].split("{}")
        n = int((~cap.pad).sum())
        assert tok.decode(cap.ids[:cap.span[0]]) == before.strip() and tok.decode(cap.ids[cap.span[1]:n]) == after.strip()
        assert enc.image.ids_removed.numel() == 0  # every patch visible
    assert any(c.span[1] - c.span[0] > 2 for c in captions)  # multi-piece names are in the test


def test_shared_forwards_equal_one_forward_per_caption(tok, model):
    """One forward per group gives every name's CE; each equals the model's own masked text loss of that caption
    alone (model.forward with the script's visible masks: its mean CE over the removed real tokens)."""
    captions = zeroshot.make_captions(tok, TEMPLATES, NAMES, model.config.text_len)
    groups = zeroshot.caption_groups(captions)
    assert sorted(i for g in groups for i in g) == list(range(len(captions)))
    assert len(groups) < len(captions)  # "ankle boot" / "bag" ... share where their token counts agree
    for g in groups:  # a group: one template, one span, the same visible tokens
        assert len({(captions[i].t, captions[i].span) for i in g}) == 1
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    shared = torch.zeros(2, len(captions))
    for g in groups:
        shared[:, g] = zeroshot.name_ce(model, images, captions, g)
    prior = zeroshot.text_prior(model, captions, groups)
    all_patches = torch.ones(1, model.config.num_patches, dtype=torch.bool)
    for i, cap in enumerate(captions):
        vis = zeroshot.visible_text(cap)[None]
        for b in range(2):
            alone = model(images[b:b + 1], cap.ids[None], cap.pad[None], image_visible=all_patches,
                          text_visible=vis)["text_loss"]
            torch.testing.assert_close(shared[b, i], alone, atol=1e-5, rtol=1e-5)
        no_image = model(None, cap.ids[None], cap.pad[None], text_visible=vis)["text_loss"]
        torch.testing.assert_close(prior[i], no_image, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared[0], shared[1])  # the image matters to a random model too


# -----------------------------------------------------------------------------
# how the scores average


def test_templates_and_synonyms_average_as_documented():
    """score(image, class) = mean over templates of (mean over the class's names of CE)."""
    ids, pad = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.bool)
    # class 0 has two names (a, b), class 1 one (c); two templates
    layout = [(0, 0, "a"), (0, 0, "b"), (0, 1, "c"), (1, 0, "a"), (1, 0, "b"), (1, 1, "c")]
    captions = [zeroshot.Caption(t, c, n, ids, pad, (0, 1)) for t, c, n in layout]
    W = zeroshot.score_weights(captions, 2)
    ce = torch.tensor([[1.0, 3.0, 2.5, 5.0, 7.0, 3.5]], dtype=torch.float64)
    score = ce @ W
    # class 0: template 0 -> (1 + 3) / 2 = 2, template 1 -> (5 + 7) / 2 = 6, mean 4; class 1: (2.5 + 3.5) / 2 = 3
    assert score.tolist() == [[4.0, 3.0]]
    # not a plain mean over the class's captions when names differ in number: a class with 3 names and one
    # with 1 name weigh their templates alike (W's rows of one class sum to 1)
    assert torch.allclose(W.sum(0), torch.ones(2, dtype=torch.float64))
    # the prior removed before or after averaging: the same (linear)
    prior = torch.tensor([0.5, 0.1, 1.0, 0.2, 0.4, 2.0], dtype=torch.float64)
    torch.testing.assert_close((ce - prior) @ W, score - prior @ W)
    # lowest wins; top-5 capped at the class count; the confusion matrix rows are true classes
    m = zeroshot.metrics(torch.tensor([[4.0, 3.0], [1.0, 2.0], [0.5, 0.2]]), torch.tensor([0, 0, 1]), ["x", "y"])
    assert m["top1"] == pytest.approx(200 / 3) and m["top5"] == 100.0
    assert m["confusion"] == [[1, 1], [0, 1]] and m["per_class_top1"] == {"x": 50.0, "y": 100.0}


# -----------------------------------------------------------------------------
# the command line


def test_end_to_end_on_a_folder_with_names_and_templates(tmp_path, tok, model, capsys):
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model, tok)
    test = image_folder(tmp_path / "shoes" / "test", ["ankle_boot", "bag", "t-shirt_top"])
    (tmp_path / "names.txt").write_text("# synonyms\nankle_boot: ankle boot, boot\nt-shirt_top: t-shirt/top\n")
    (tmp_path / "tpl.txt").write_text("\n".join(TEMPLATES) + "\n")
    r = zeroshot.main(["--ckpt", ckpt, "--test-dir", test, "--names", str(tmp_path / "names.txt"),
                       "--templates", str(tmp_path / "tpl.txt"), "--batch-size", "5"])
    assert r["names"] == {"ankle_boot": ["ankle boot", "boot"], "bag": ["bag"], "t-shirt_top": ["t-shirt/top"]}
    assert r["test_size"] == 12 and r["chance_top1"] == pytest.approx(100 / 3)
    assert r["forwards"]["captions"] == 12 and r["forwards"]["groups"] < 12
    for key in ("with_image", "prior_removed"):
        assert np.array(r[key]["confusion"]).sum() == 12 and np.array(r[key]["confusion"]).sum(1).tolist() == [4] * 3
        assert 0 <= r[key]["top1"] <= r[key]["top5"] <= 100
    out = tmp_path / "run" / "zeroshot_shoes_tpl.json"
    with open(out) as f:
        assert json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in the JSON")) == r
    png = tmp_path / "run" / "zeroshot_shoes_tpl.png"
    assert Image.open(png).size[0] > 300
    listed = (tmp_path / "run" / "outputs.txt").read_text().split()
    assert {"zeroshot_shoes_tpl.json", "zeroshot_shoes_tpl.png"} <= set(listed)
    assert "zero-shot top-1" in capsys.readouterr().out


@pytest.mark.parametrize("label", ["shape", "colour"])
def test_builtin_default_names_the_captions_words(tmp_path, tok, model, label):
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model, tok)
    r = zeroshot.main(["--ckpt", ckpt, "--test-size", "12", "--label", label])
    assert r["dataset"] == ("builtin" if label == "shape" else "builtin_colour")
    assert r["classes"] == (10 if label == "shape" else 11) and r["test_size"] == 12
    assert r["templates"] == list(zeroshot.BUILTIN_TEMPLATES[label])
    if label == "shape":
        assert r["names"]["star"] == builtin.SHAPE_WORDS["star"]
    assert os.path.exists(tmp_path / "run" / f"zeroshot_{r['dataset']}.png")


@pytest.mark.parametrize("how", ["no_text", "zero_text_weight"])
def test_a_text_free_checkpoint_is_refused_in_one_line(tmp_path, tok, capsys, how):
    torch.manual_seed(0)
    path = tmp_path / "mae" / "ckpt.pt"
    path.parent.mkdir()
    if how == "no_text":  # what train.py --no-text writes: no tokenizer entry
        torch.save(checkpoint_dict(M3AE(make_config("tiny", vocab_size=50)), args={"no_text": True}), path)
    else:
        save_ckpt(path, M3AE(make_config("tiny", vocab_size=tok.vocab_size, text_loss_weight=0.0)), tok)
    with pytest.raises(SystemExit) as e:
        zeroshot.main(["--ckpt", str(path), "--test-size", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained without text" in err[0] and str(path) in err[0]
    assert not os.path.exists(path.parent / "zeroshot_builtin.json")


def test_bad_inputs_are_one_line_exit_2(tmp_path, tok, model, capsys):
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model, tok)
    test = image_folder(tmp_path / "shoes" / "test", ["bag", "boot"], per_class=1)
    glued = image_folder(tmp_path / "glued" / "test", ["c", "sq"], per_class=1)
    bad = tmp_path / "bad.txt"
    cases = [("no_braces", ["--templates", str(bad)], "a photo of it\n", "must hold {} once"),
             ("twice", ["--templates", str(bad)], "a {} and a {}\n", "must hold {} once"),
             ("empty", ["--templates", str(bad)], "# nothing\n\n", "has no line"),
             ("folder", ["--test-dir", test, "--names", str(bad)], "shoe: shoe\n", "no class folder 'shoe'"),
             ("format", ["--test-dir", test, "--names", str(bad)], "bag\n", "expected 'folder: name1"),
             ("names_builtin", ["--names", str(bad)], "bag: bag\n", "--names names the class folders"),
             # a name glued inside a word ("c" + "ircle" is one piece): its tokens cannot be held apart
             ("span", ["--test-dir", glued, "--templates", str(bad)], "{}ircle\n", "token boundaries")]
    for what, flags, content, says in cases:
        bad.write_text(content)
        with pytest.raises(SystemExit) as e:
            zeroshot.main(["--ckpt", ckpt, *flags])
        assert e.value.code == 2, what
        err = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then one error line
        errors = [x for x in err if x.startswith("zeroshot.py: error: ")]
        assert len(errors) == 1 and errors[0] == err[-1] and says in errors[0], (what, err)


# -----------------------------------------------------------------------------
# the released weights' path: a converted official checkpoint with a WordPiece vocabulary


def test_a_converted_official_checkpoint_runs(tmp_path, capsys):
    words = ["a", "photo", "of", "the", "black", "and", "white", "picture", "close", "-", "up", "on", "plain",
             "background", "ankle", "boot", "t", "shirt", "/", "top", "bag", "##s"]
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    lines += [f"w{i}" for i in range(100 - len(lines))]  # the fixture's text embedding has 100 rows
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n")
    ckpt = str(tmp_path / "official" / "ckpt.pt")
    os.makedirs(os.path.dirname(ckpt))
    assert convert.main(["official", FIXTURE, ckpt, "--tokenizer", str(tmp_path / "vocab.txt")]) == 0
    model, loaded = load_model(ckpt)
    assert loaded["tokenizer"]["kind"] == "wordpiece" and model.config.text_len == 16
    test = image_folder(tmp_path / "shoes" / "test", ["ankle_boot", "bag", "t-shirt_top"], per_class=2, size=48)
    (tmp_path / "names.txt").write_text("t-shirt_top: t-shirt/top, top\n")
    r = zeroshot.main(["--ckpt", ckpt, "--test-dir", test, "--names", str(tmp_path / "names.txt")])
    assert r["tokenizer"] == "wordpiece" and r["test_size"] == 6 and math.isfinite(r["top1"])
    assert r["norm"]["mean"] == [0.5762, 0.5503, 0.5213]  # the official preprocessing the conversion recorded
    # WordPiece splits "t-shirt/top" at every mark: five tokens, all of them masked
    from checkpoint import checkpoint_tokenizer
    wp = checkpoint_tokenizer(loaded)
    caps = zeroshot.make_captions(wp, list(zeroshot.DEFAULT_TEMPLATES), [["t-shirt/top"]], 16)
    for cap in caps:
        assert cap.span[1] - cap.span[0] == 5 and wp.pieces(cap.ids[cap.span[0]:cap.span[1]]) == \
            ["t", "-", "shirt", "/", "top"]
    assert os.path.exists(os.path.join(os.path.dirname(ckpt), "zeroshot_shoes.json"))
