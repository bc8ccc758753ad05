"""viz.py: every mode writes a PNG of its layout's size, reconstructions keep visible patches bit for bit, the
attention rows behind the maps sum to 1, words are found, and --image/--caption work."""

import os

import pytest
import torch
from PIL import Image

import builtin
import data
import train
import viz
from checkpoint import load_model
from model import M3AE, make_config, patchify
from tokenizer import Tokenizer

SAMPLES = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real train.py run (2 steps of the tiny preset at 64 px, 32 tokens: the geometry the sizes below assume):
    ckpt.pt, tokenizer.model, config.json."""
    out = tmp_path_factory.mktemp("run")
    train.main(["--preset", "tiny", "--image-size", "64", "--text-len", "32", "--train-size", "64", "--batch-size",
                "16", "--workers", "0", "--warmup-steps",
                "1", "--vocab-size", "256", "--no-probe", "--steps", "2", "--out-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def loaded(run):
    """(model, tokenizer, batch of SAMPLES built-in test samples, samples) as viz.main prepares them."""
    model, _ = load_model(run / "ckpt.pt")
    model.eval()
    tokenizer = Tokenizer(str(run / "tokenizer.model"))
    c = model.config
    source = builtin.Builtin("test", SAMPLES, c.image_size)
    samples = [dict(source[i], name=str(i)) for i in range(SAMPLES)]
    transform = data.EvalTransform(c.image_size, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0)
    return model, tokenizer, viz.make_batch(samples, tokenizer, c.text_len, transform), samples


def word_counts(tokenizer, captions, text_len):
    return [len(viz.caption_words(tokenizer, *tokenizer.encode(caption, text_len))) for caption in captions]


def expected_sizes(model, tokenizer, captions):
    """{file: (width, height)} from the layout functions, at the default scale (4 x 64 px = 256)."""
    c, n, S = model.config, len(captions), 256
    return {"recon.png": viz.recon_layout(n, S).size, "caption_effect.png": viz.caption_layout(n, S).size,
            "attention_word.png": viz.word_layout(n, S, c.depth).size,
            "attention_patch.png": viz.patch_layout(word_counts(tokenizer, captions, c.text_len), S, c.depth).size}


@pytest.mark.parametrize("mode, files", [("recon", ["recon.png"]), ("caption", ["caption_effect.png"]),
                                         ("attention", ["attention_word.png", "attention_patch.png"])])
def test_each_mode_writes_a_png_of_its_layout_size(run, loaded, tmp_path, mode, files):
    model, tokenizer, _, samples = loaded
    written = viz.main(["--ckpt", str(run / "ckpt.pt"), "--mode", mode, "--samples", str(SAMPLES),
                        "--out-dir", str(tmp_path)])
    assert sorted(os.path.basename(p) for p in written.values()) == sorted(files) == sorted(os.listdir(tmp_path))
    sizes = expected_sizes(model, tokenizer, [s["caption"] for s in samples])
    for name in files:
        path = tmp_path / name
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            assert im.size == sizes[name], name
            assert len(im.getcolors(1 << 16) or range(1 << 16)) > 10  # drawn on, not a blank canvas


def test_image_and_caption_flags_and_default_out_dir(run, tmp_path, capsys):
    # a non-square photo-sized PNG: resized and centre-cropped to the model's 64 px
    builtin.Builtin("test", 3)[2]["image"].resize((120, 90)).save(tmp_path / "mine.png")
    argv = ["--ckpt", str(run / "ckpt.pt"), "--image", str(tmp_path / "mine.png"), "--caption", "a red circle",
            "--word", "circle", "--patch", "3,4", "--scale", "2", "--true-colour"]
    written = viz.main(argv)
    assert set(written) == {"recon", "caption", "attention_word", "attention_patch"}
    assert all(os.path.dirname(p) == str(run / "viz") for p in written.values())  # viz/ next to the checkpoint
    model, _ = load_model(run / "ckpt.pt")
    tokenizer = Tokenizer(str(run / "tokenizer.model"))
    n_words = word_counts(tokenizer, ["a red circle"], model.config.text_len)
    assert n_words == [3]
    with Image.open(written["recon"]) as im:
        assert im.size == viz.recon_layout(1, 128).size and im.mode == "RGB"  # --true-colour: no palette
    with Image.open(written["attention_patch"]) as im:
        assert im.size == viz.patch_layout(n_words, 128, model.config.depth).size
    # a single --image and no --other-caption: no other caption (not a built-in one), and the run says so
    assert "no 'other caption' column" in capsys.readouterr().out
    with Image.open(written["caption"]) as im:
        assert im.size == viz.caption_layout(1, 128, other=False).size != viz.caption_layout(1, 128).size
    with pytest.raises(SystemExit):
        viz.main(argv[:2] + ["--caption", "no image"])
    with pytest.raises(SystemExit):
        viz.main(argv[:4] + ["--patch", "8,0", "--mode", "attention"])  # the tiny grid is 8 x 8


def test_reconstruction_keeps_visible_patches_exactly(loaded, run):
    model, _, batch, _ = loaded
    c = model.config
    images, text, pad = batch["image"], batch["text"], batch["pad"]
    noise = viz.masking_noise(0, SAMPLES, c.num_patches, c.text_len)
    target = patchify(images, c.patch_size)
    paired = viz.reconstruct(model, images, text, pad, *noise)
    image_only = viz.reconstruct(model, images, image_noise=noise[0])
    for res in (paired, image_only):
        visible = res["image_mask"] == 0  # (B, N)
        assert visible.sum() == SAMPLES * 16  # 16 of 64 patches kept at 0.75
        pasted, pred = patchify(res["pasted"], c.patch_size), patchify(res["prediction"], c.patch_size)
        assert torch.equal(pasted[visible], target[visible])  # bit for bit
        assert torch.equal(pasted[~visible], pred[~visible])
        assert not torch.equal(pred[visible], target[visible])  # (so the paste did something)
        assert res["image_mse"].shape == (SAMPLES,) and (res["image_mse"] > 0).all()
    # fixed noise: the same seed gives the same masks and outputs, another seed other masks
    again = viz.reconstruct(model, images, text, pad, *viz.masking_noise(0, SAMPLES, c.num_patches, c.text_len))
    first = viz.reconstruct(model, images, text, pad, *noise)
    assert torch.equal(again["pasted"], first["pasted"]) and torch.equal(again["text_pred"], first["text_pred"])
    other = viz.reconstruct(model, images, text, pad, *viz.masking_noise(1, SAMPLES, c.num_patches, c.text_len))
    assert not torch.equal(other["image_mask"], first["image_mask"])
    # text-only: no image entries; text predictions for every slot
    text_only = viz.reconstruct(model, text=text, pad=pad, text_noise=noise[1])
    assert text_only["pasted"] is None and text_only["text_pred"].shape == text.shape
    right, removed = zip(*viz.text_accuracy(text, pad, text_only["text_mask"], text_only["text_pred"]))
    assert all(0 <= r <= m for r, m in zip(right, removed)) and sum(removed) > 0

    # norm_pix checkpoints: still exact on visible patches; removed ones un-normalised with the original's stats
    norm_model, _ = load_model(run / "ckpt.pt", norm_pix_loss=True)
    res = viz.reconstruct(norm_model.eval(), images, text, pad, *noise)
    raw = norm_model.reconstruct(images, text, pad, *noise)["image_pred"]
    visible = res["image_mask"] == 0
    pasted = patchify(res["pasted"], c.patch_size)
    assert torch.equal(pasted[visible], target[visible])
    assert torch.allclose(pasted[~visible], viz.unnormalise_patches(raw, target)[~visible], atol=1e-6)


def test_unnormalise_patches_inverts_the_norm_pix_target():
    target = torch.randn(2, 5, 12) * 3 + 1
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normalised = (target - mean) / (var + 1e-6).sqrt()  # model.image_loss's norm_pix target
    assert torch.allclose(viz.unnormalise_patches(normalised, target), target, atol=1e-5)


def test_mask_ratios_are_restored():
    model = M3AE(make_config("tiny", vocab_size=20, depth=1, dec_depth=1, image_size=64, text_len=32))
    before = model.config
    with viz.mask_ratios(model, image=0.5, text=0.0):
        assert model.config.image_mask_ratio == 0.5 and model.config.text_mask_ratio == 0.0
        out = model.reconstruct(torch.randn(1, 3, 64, 64), torch.randint(1, 20, (1, 32)))
        assert out["image_mask"].sum() == 32 and out["text_mask"].sum() == 0
    assert model.config is before


def test_attention_rows_used_for_the_maps_sum_to_one(loaded):
    model, tokenizer, batch, _ = loaded
    c = model.config
    images, text, pad = batch["image"], batch["text"], batch["pad"]
    words = [viz.caption_words(tokenizer, text[i], pad[i]) for i in range(SAMPLES)]
    slots = [ws[viz.pick_word(ws)[0]][1] for ws in words]
    maps, rows = viz.word_attention(model, images, text, pad, slots)
    assert maps.shape == (c.depth, SAMPLES, c.grid_size, c.grid_size) and rows.shape[:2] == (c.depth, SAMPLES)
    assert torch.allclose(rows.sum(-1), torch.ones(c.depth, SAMPLES), atol=1e-5)
    assert torch.allclose(maps.sum(dim=(-1, -2)), rows[:, :, 1 : 1 + c.num_patches].sum(-1))
    assert (maps >= 0).all() and (maps.sum(dim=(-1, -2)) < 1).all()  # not renormalised: CLS and words take some
    # padded keys get nothing
    assert (rows[:, :, 1 + c.num_patches :][:, pad] == 0).all()

    per_word, rows = viz.patch_attention(model, images, text, pad, [(3, 4), (0, 0)], words)
    assert torch.allclose(rows.sum(-1), torch.ones(c.depth, SAMPLES), atol=1e-5)
    for b, ws in enumerate(words):  # words partition the caption's slots: their weights add up to the text share
        assert torch.allclose(per_word[:, b, : len(ws)].sum(-1), rows[:, b, 1 + c.num_patches :].sum(-1), atol=1e-6)

    # a row that does not sum to 1 is refused
    weights = [torch.full((1, 2, 5, 5), 0.2), torch.full((1, 2, 5, 5), 0.3)]
    assert torch.allclose(viz.attention_rows(weights[:1], [[1, 2]]), torch.full((1, 1, 5), 0.2))
    with pytest.raises(AssertionError, match="layer 2"):
        viz.attention_rows(weights, [[1]])
    assert (viz.attention_rows(weights[:1], [[]]) == 0).all()  # no query (no caption): zeros


def test_caption_words_and_pick_word(loaded):
    _, tokenizer, _, _ = loaded
    ids, pad = tokenizer.encode("there is a yellow rhombus on the right", 32)
    words = viz.caption_words(tokenizer, ids, pad)
    assert [w for w, _ in words] == "there is a yellow rhombus on the right".split()
    assert sorted(s for _, slots in words for s in slots) == list(range(int((~pad).sum())))
    texts = [w for w, _ in words]
    assert viz.pick_word(words) == (texts.index("rhombus"), False)  # default: the word naming the shape
    assert viz.pick_word(words, "Right") == (texts.index("right"), True)
    assert viz.pick_word(words, "yell") == (texts.index("yellow"), True)  # a word starting with it
    assert viz.pick_word(words, "circle") == (texts.index("rhombus"), False)  # absent: the default
    plain = viz.caption_words(tokenizer, *tokenizer.encode("there is a yellow thing", 32))
    assert plain[viz.pick_word(plain)[0]][0] == "thing"
    assert viz.pick_word(viz.caption_words(tokenizer, *tokenizer.encode("", 32))) == (None, False)
    # real captions share their frame ("a black and white product photo of a ..."): the default is the word
    # that tells the shown captions apart, not the first one
    real = [(w, [k]) for k, w in enumerate("a black and white product photo of a sneaker".split())]
    shared = frozenset("a black and white product photo of".split())
    assert real[viz.pick_word(real, common=shared)[0]][0] == "sneaker"
    assert real[viz.pick_word(real)[0]][0] == "black"  # with nothing shared: the first non-stop word
    tiny = make_config("tiny", image_size=64)  # 64 px, 8 px patches: an 8 x 8 grid
    assert viz.default_patch(dict(box=(40, 8, 56, 24)), tiny) == (2, 6)  # the box's centre (48, 16) px
    assert viz.default_patch(dict(box=None), tiny) == (4, 4)


def test_other_caption_comes_from_the_users_data(run, tmp_path, capsys):
    samples = [dict(caption="a red circle", label=None), dict(caption="a blue square", label=None)]
    assert viz.other_captions(samples) == ["a blue square", "a red circle"]  # the next --image's caption
    assert viz.other_captions(samples[:1]) is None  # a single sample: none, never a built-in caption
    assert viz.other_captions(samples[:1], "a cat") == ["a cat"]
    for i, caption in enumerate(["a red circle", "a blue square"]):
        builtin.Builtin("test", 2)[i]["image"].save(tmp_path / f"{i}.png")
    argv = ["--ckpt", str(run / "ckpt.pt"), "--mode", "caption", "--out-dir", str(tmp_path / "out"),
            "--image", str(tmp_path / "0.png"), "--caption", "a red circle",
            "--image", str(tmp_path / "1.png"), "--caption", "a blue square"]
    written = viz.main(argv)
    assert "other caption" in capsys.readouterr().out
    with Image.open(written["caption"]) as im:
        assert im.size == viz.caption_layout(2, 256).size


def test_path_flags_fail_loudly(run, tmp_path, capsys):
    ckpt = str(run / "ckpt.pt")
    (tmp_path / "notes.txt").write_text("x")
    cases = [(["--ckpt", str(tmp_path / "nope.pt")], "--ckpt", "no such file"),
             (["--ckpt", str(tmp_path)], "--ckpt", "is a folder"),
             (["--ckpt", ckpt, "--tokenizer", str(tmp_path / "tok.model")], "--tokenizer", "no such file"),
             (["--ckpt", ckpt, "--image", str(tmp_path / "cat.jpg")], "--image", "no such file"),
             (["--ckpt", ckpt, "--image", str(tmp_path / "notes.txt")], "--image", "not an image file name")]
    for argv, flag, problem in cases:
        with pytest.raises(SystemExit) as e:
            viz.main(argv + ["--out-dir", str(tmp_path / "out")])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"{flag} {argv[argv.index(flag) + 1]}: {problem}" in line, line
    assert not (tmp_path / "out").exists()


# --- issue #24: no traceback for a bad input; touch only what the run wrote ---------------------------------


def one_line_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        viz.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_bad_ckpt_is_one_line_and_exit_2_never_unpickled(tmp_path, capsys):
    from test_probe import bad_checkpoints

    paths, marker = bad_checkpoints(tmp_path)
    for what, path in paths.items():
        assert str(path) in one_line_exit_2(capsys, ["--ckpt", str(path), "--out-dir", str(tmp_path / "o")]), what
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_a_garbage_tokenizer_entry_is_one_line(run, tmp_path, capsys):
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    for entry in ({"kind": "sentencepiece", "blob": b"\x00garbage" * 50}, {"kind": "nonsense", "blob": b"x"},
                  b"not a dict"):
        torch.save(dict(ckpt, tokenizer=entry), tmp_path / "ckpt.pt")
        err = one_line_exit_2(capsys, ["--ckpt", str(tmp_path / "ckpt.pt"), "--samples", "1"])
        assert "tokenizer" in err, err
    assert not (tmp_path / "viz").exists()


def test_a_tokenizer_smaller_than_the_vocabulary_decodes_within_it(run, tmp_path, capsys):
    # the checkpoint's text embedding has 256 ids; a vocab.txt of 8: every prediction must be one of those 8
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red",
                                                   "circle"]) + "\n")
    model, _ = load_model(run / "ckpt.pt")
    with torch.no_grad():  # make the model predict ids the tokenizer does not have
        model.text_head.bias[8:] += 100.0
    torch.save(dict(torch.load(run / "ckpt.pt", weights_only=True), model=model.state_dict()), tmp_path / "c.pt")
    written = viz.main(["--ckpt", str(tmp_path / "c.pt"), "--tokenizer", str(tmp_path / "vocab.txt"),
                        "--samples", "1", "--mode", "recon"])
    assert os.path.exists(written["recon"])
    assert "8 ids" in capsys.readouterr().out  # said once, at load
    from tokenizer import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "vocab.txt"))
    batch = viz.make_batch([dict(caption="a red circle", image=Image.new("RGB", (64, 64)))], tok, 32,
                           data.EvalTransform(64, builtin.BUILTIN_MEAN, builtin.BUILTIN_STD, crop_pct=1.0))
    res = viz.reconstruct(model.eval(), batch["image"], batch["text"], batch["pad"], vocab_size=tok.vocab_size)
    assert int(res["text_pred"].max()) < tok.vocab_size


def test_no_tokenizer_needed_without_captions(run, tmp_path, capsys):
    # an MAE baseline / an official checkpoint converted without a vocab: no tokenizer anywhere
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt.pop("tokenizer", None)
    (tmp_path / "mae").mkdir()
    torch.save(dict(ckpt, args=dict(ckpt.get("args", {}), no_text=True, tokenizer=None)), tmp_path / "mae" / "c.pt")
    argv = ["--ckpt", str(tmp_path / "mae" / "c.pt"), "--samples", "2"]
    written = viz.main(argv)
    out = capsys.readouterr().out
    assert set(written) == {"recon"} and os.path.exists(written["recon"])
    notes = [line for line in out.splitlines() if "no tokenizer" in line]
    assert len(notes) == 1 and "skipped" in notes[0], out
    with Image.open(written["recon"]) as im:
        assert im.size == viz.recon_layout(2, 256, text=False).size
    builtin.Builtin("test", 1)[0]["image"].save(tmp_path / "a.png")
    assert set(viz.main(argv[:2] + ["--image", str(tmp_path / "a.png")])) == {"recon"}
    # asking for captions without a tokenizer: one line
    err = one_line_exit_2(capsys, argv[:2] + ["--image", str(tmp_path / "a.png"), "--caption", "a red circle"])
    assert "tokenizer" in err
    err = one_line_exit_2(capsys, argv + ["--mode", "attention"])
    assert "tokenizer" in err


def test_the_pngs_are_recorded_next_to_the_checkpoint(run, tmp_path):
    import rundir

    written = viz.main(["--ckpt", str(run / "ckpt.pt"), "--samples", "1", "--mode", "recon"])
    assert "viz/recon.png" in rundir.run_files(str(run))
    assert not [n for n in os.listdir(run / "viz") if ".m3ae-tmp." in n]
    viz.main(["--ckpt", str(run / "ckpt.pt"), "--samples", "1", "--mode", "recon", "--out-dir", str(tmp_path)])
    assert written and "recon.png" not in rundir.run_files(str(run))
