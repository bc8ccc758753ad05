"""tokenizer.py: sentencepiece (round trips, padding and truncation, unknown text, determinism, training and its
fallbacks), BERT WordPiece (cases worked by hand), either kind from a file or from bytes."""

import errno
import os
import pickle

import pytest
import torch

import builtin
import data
import tokenizer
from tokenizer import Tokenizer, WordPiece, get_tokenizer, load_tokenizer, tokenizer_from_bytes

TEXT_LEN = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    captions = list(builtin.Builtin("pretrain", 2000).captions()) + [f"sample {i}" for i in range(1000)]
    return Tokenizer.train(captions, str(path), vocab_size=300)



def test_tokenizer_round_trip_padding_and_truncation(tok):
    caption = next(c for c in builtin.Builtin("pretrain", 100).captions() if len(c.split()) >= 5)  # long enough to cut
    ids, pad = tok.encode(caption, TEXT_LEN)
    assert ids.shape == pad.shape == (TEXT_LEN,) and ids.dtype == torch.int64 and pad.dtype == torch.bool
    n = int((~pad).sum())
    assert 0 < n < TEXT_LEN and torch.equal(pad, ids == data.PAD_ID) and not pad[:n].any() and pad[n:].all()
    assert tok.decode(ids) == caption
    assert len(tok.pieces(ids)) == TEXT_LEN and tok.pieces(ids)[-1] == "<pad>"
    # pieces drop the word marker, except a piece that is only the marker
    assert "".join(tok.pieces(ids[:n])).replace("\u2581", "") == caption.replace(" ", "")
    short, short_pad = tok.encode(caption, 3)
    assert torch.equal(short, ids[:3]) and not short_pad.any()  # truncated, no padding
    assert tok.encode("A Small RED Star", 8)[0].tolist() == tok.encode("a small red star", 8)[0].tolist()  # uncased


@pytest.mark.parametrize("caption", [None, "", "   ", b""])
def test_tokenizer_empty_is_all_padding(tok, caption):
    ids, pad = tok.encode(caption, TEXT_LEN)
    assert (ids == data.PAD_ID).all() and pad.all()


def test_tokenizer_unknown_text_and_bytes(tok):
    ids, pad = tok.encode("a red star \U0001F642 \u661f\u661f \u00e9t\u00e9", TEXT_LEN)
    assert data.UNK_ID in ids.tolist() and (ids[~pad] > 0).all()
    assert torch.equal(tok.encode(b"a red star", TEXT_LEN)[0], tok.encode("a red star", TEXT_LEN)[0])
    ids, pad = tok.encode(b"a red \xff\xfe star", TEXT_LEN)  # invalid UTF-8: replaced (U+FFFD), not fatal
    assert tok.decode(ids).replace("\u2047", "").split() == ["a", "red", "star"] and (~pad).sum() >= 3
    assert tok.decode([]) == "" and tok.decode(torch.zeros(4, dtype=torch.int64)) == ""


def test_tokenizer_is_deterministic_saved_and_picklable(tok, tmp_path):
    captions = list(builtin.Builtin("pretrain", 2000).captions()) + [f"sample {i}" for i in range(1000)]
    again = Tokenizer.train(captions, str(tmp_path / "b.model"), vocab_size=300)
    assert tok.sp.serialized_model_proto() == again.sp.serialized_model_proto()
    loaded = Tokenizer(str(tmp_path / "b.model"))
    assert loaded.vocab_size == tok.vocab_size
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode("a blue ring", 8)[0], tok.encode("a blue ring", 8)[0])
    assert tok.sp.pad_id() == data.PAD_ID and tok.sp.unk_id() == data.UNK_ID
    assert tok.sp.bos_id() == -1 and tok.sp.eos_id() == -1


def test_get_tokenizer_trains_once_and_falls_back_on_small_corpora(tmp_path, capsys):
    path = str(tmp_path / "run" / "tokenizer.model")
    calls = []

    def corpus():
        calls.append(1)
        return ["a red star", "a blue ring on stripes", b"a green \xff cross", "", None]

    t = get_tokenizer(path, corpus, vocab_size=5000)  # far more than the corpus holds
    assert os.path.exists(path) and t.vocab_size < 5000 and "fewer than" in capsys.readouterr().out
    assert get_tokenizer(path, corpus, vocab_size=5000).vocab_size == t.vocab_size and len(calls) == 1
    small = Tokenizer.train(["abcdefghijklmnopqrstuvwxyz 0123456789"], str(tmp_path / "s.model"), vocab_size=10)
    assert small.vocab_size > 10 and "characters" in capsys.readouterr().out  # retried with enough pieces
    with pytest.raises(ValueError):
        Tokenizer.train(["", "  "], str(tmp_path / "e.model"), vocab_size=10)


def test_tokenizer_trains_on_long_captions(tmp_path):
    """sentencepiece drops lines over 4192 bytes, and fails when it drops them all: long captions are cut
    instead (on a character boundary: 'x' + Cyrillic puts the cut inside a 2-byte character), not lost."""
    cat, dog = "\u043a\u043e\u0448\u043a\u0430", "\u0441\u043e\u0431\u0430\u043a\u0430"  # Russian, 2 bytes a letter
    words = ["alpha", "beta", "gamma", "delta", cat, dog]
    captions = [" ".join(words[(i + j) % len(words)] for j in range(3000)) for i in range(30)]
    captions += ["x" + "\u0436" * 5000, "\u00e9" * (data.MAX_CAPTION_CHARS + 100)]  # over 4192 bytes either way
    tok = Tokenizer.train(captions, str(tmp_path / "long.model"), vocab_size=100)
    text = f"alpha {cat} beta"
    ids, pad = tok.encode(text, 8)
    assert data.UNK_ID not in ids[~pad].tolist() and tok.decode(ids) == text


# -----------------------------------------------------------------------------
# WordPiece (BERT uncased) on a vocabulary made here; every expected id below is worked out by hand

WP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",  # 0-4
            "a", "dog", "cat", "cafe", "play",  # 5-9
            "##ing", "##s", ",", "!", ".",  # 10-14
            "\u72d7", "4", "##2", "##nd", "##a",  # 15-19: 狗 (a CJK ideograph), digits
            "[", "]", "mask", "$", "\u03bf\u03b4\u03bf\u03c3",  # 20-24: οδοσ (no final sigma)
            "\u03bf\u03b4\u03bf\u03c2", "the"]  # 25-26: οδος (final sigma)


@pytest.fixture(scope="module")
def wp(tmp_path_factory):
    path = tmp_path_factory.mktemp("wp") / "vocab.txt"
    path.write_text("\n".join(WP_VOCAB) + "\n", encoding="utf-8")
    return WordPiece(str(path))


@pytest.mark.parametrize("caption,expected", [
    ("Caf\u00e9", [8]),  # lower-cased, accent stripped (NFD, drop Mn)
    ("Cafe\u0301", [8]),  # an already decomposed accent too
    ("dog,cat!", [6, 12, 7, 13]),  # every punctuation mark is a word
    ("$dog", [23, 6]),  # ASCII symbols count as punctuation although Unicode calls $ a currency sign
    ("zebra dog", [1, 6]),  # nothing covers "z": [UNK]
    ("dogz", [1]),  # "dog" + an uncovered rest: the whole word is [UNK], not "dog [UNK]"
    ("\u72d7dog", [15, 6]),  # a CJK ideograph is split off as its own word
    ("dog\U0001F642", [1]),  # an emoji is not punctuation: it stays inside the word, which then is [UNK]
    ("do\u200bg", [6]),  # zero-width space (Cf) is removed, not turned into a space
    ("\ufeffd\x00o\u00adg\x07", [6]),  # BOM, NUL, soft hyphen, BEL: all removed
    ("do\ue000g\u0378", [6]),  # private use (Co) and unassigned (Cn) too: every "C" category is control
    ("dog\tcat\ncat\u3000dog", [6, 7, 7, 6]),  # tab, newline and ideographic space are whitespace
    ("DoG CaT", [6, 7]),  # mixed case
    ("42nd", [16, 17, 18]),  # digits are ordinary characters: 4 ##2 ##nd
    ("4.2", [16, 14, 1]),  # ... but the point splits them, and "2" alone is not in this vocabulary
    ("playing dogs", [9, 10, 6, 11]),  # ## continuations, longest match first
    ("a [MASK] dog", [5, 4, 6]),  # a special token written in the caption stays whole
    ("[mask]", [20, 22, 21]),  # but only in its exact case: lower case is plain text
    ("\u039f\u0394\u039f\u03a3", [24]),  # ΟΔΟΣ: lower-cased letter by letter, so σ, not the final ς
])
def test_wordpiece_cases_worked_by_hand(wp, caption, expected):
    ids, pad = wp.encode(caption, 8)
    assert ids[: len(expected)].tolist() == expected and not pad[: len(expected)].any()
    assert pad[len(expected):].all() and (ids[len(expected):] == data.PAD_ID).all()


def test_wordpiece_long_words_truncation_padding(wp):
    assert wp.tokenize("a" * 100) == ["a"] + ["##a"] * 99  # 100 characters: still split
    assert wp.tokenize("a" * 101) == ["[UNK]"]  # longer than 100: unknown whole, without trying
    ids, pad = wp.encode("dog cat dog cat dog", 3)
    assert ids.tolist() == [6, 7, 6] and not pad.any()  # truncated
    ids, pad = wp.encode("dog [PAD] cat", 5)  # the official pipeline: a literal [PAD] is id 0 but not padding
    assert ids.tolist() == [6, 0, 7, 0, 0] and pad.tolist() == [False, False, False, True, True]
    for empty in (None, "", "   ", b"", "\u200b\x00 \ufffd"):
        ids, pad = wp.encode(empty, 6)
        assert ids.shape == pad.shape == (6,) and ids.dtype == torch.int64 and pad.dtype == torch.bool
        assert (ids == data.PAD_ID).all() and pad.all()
    assert wp.encode(b"dog \xff cat", 4)[0].tolist() == [6, 7, 0, 0]  # invalid UTF-8 -> U+FFFD -> dropped


def test_wordpiece_decode_pieces_and_word_starts(wp):
    ids, _ = wp.encode("Playing dogs, a cat!", 10)
    assert wp.decode(ids) == "playing dogs , a cat !"  # as the model saw it: lower case, spaced punctuation
    n = 8
    assert wp.pieces(ids[:n]) == ["play", "ing", "dog", "s", ",", "a", "cat", "!"]
    assert wp.starts_word(ids[:n]) == [True, False, True, False, True, True, True, True]
    assert wp.pieces([0, 1]) == ["[PAD]", "[UNK]"] and wp.starts_word([0, 1]) == [True, True]
    assert wp.vocab_size == len(WP_VOCAB) and wp.kind == "wordpiece" and wp.unk_id == 1


def test_wordpiece_vocab_file_rules(tmp_path):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes("\r\n".join(WP_VOCAB).encode("utf-8"))  # CRLF, no final newline: the same vocabulary
    assert WordPiece(str(crlf)).tokens == WP_VOCAB
    bad = tmp_path / "bad.txt"
    bad.write_text("a\n[PAD]\n[UNK]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt.*expected '\\[PAD\\]'"):
        WordPiece(str(bad))
    bad.write_text("[PAD]\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt.*\\[UNK\\]"):
        WordPiece(str(bad))


def test_load_tokenizer_goes_by_content_not_name(tok, wp, tmp_path):
    # each kind under the other's file name
    (tmp_path / "vocab.txt").write_bytes(tok.to_bytes())
    (tmp_path / "tokenizer.model").write_bytes(wp.to_bytes())
    sp, bert = load_tokenizer(str(tmp_path / "vocab.txt")), load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert isinstance(sp, Tokenizer) and sp.kind == "sentencepiece" and sp.vocab_size == tok.vocab_size
    assert isinstance(bert, WordPiece) and bert.tokens == WP_VOCAB
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)) * 4)
    for name in ("junk.bin", "missing.model"):
        with pytest.raises(ValueError, match=name):
            load_tokenizer(str(tmp_path / name))
    # get_tokenizer loads an existing file of either kind and trains nothing
    corpus = lambda: pytest.fail("must not train")  # noqa: E731
    assert isinstance(get_tokenizer(str(tmp_path / "tokenizer.model"), corpus, 100), WordPiece)


def test_tokenizer_from_bytes_and_pickle_round_trip(tok, wp):
    for t in (tok, wp):
        again = tokenizer_from_bytes(t.kind, t.to_bytes())
        assert type(again) is type(t) and again.to_bytes() == t.to_bytes()
        clone = pickle.loads(pickle.dumps(t))
        for caption in ("a blue ring", "Playing dogs!"):
            assert torch.equal(again.encode(caption, 8)[0], t.encode(caption, 8)[0])
            assert torch.equal(clone.encode(caption, 8)[0], t.encode(caption, 8)[0])
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_bytes("bpe", b"")


# -----------------------------------------------------------------------------
# bad tokenizer files and bytes: one line each, and bounded before anything is read whole


def _bad_file(kind, tmp_path, monkeypatch):
    """(path, what the one-line error must say) for one kind of bad tokenizer file."""
    path = tmp_path / "tok.bin"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "empty file"
    if kind == "garbage_model":
        path = tmp_path / "tokenizer.model"
        path.write_bytes(bytes(range(256)) * 8 + b"\x00")
        return path, "not a sentencepiece model or a BERT vocab.txt"
    if kind == "too_large":  # a sparse file: its size is refused before a byte of it is read
        with open(path, "wb") as f:
            f.truncate(tokenizer.MAX_MODEL_BYTES + 1)
        monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("read a file over the bound"))
        return path, f"{tokenizer.MAX_MODEL_BYTES + 1:,} bytes, more than"
    if kind == "folder":
        path.mkdir()
        return path, "a folder"
    if kind == "long_line":  # the 1 GB line of the issue, at 1 KB
        path.write_text("[PAD]\n[UNK]\n" + "x" * 1000 + "\n", encoding="utf-8")
        return path, "line 3 is 1,000 bytes, more than the 200"
    if kind == "large_vocab":  # a real vocab over the bound (lowered here so that the file stays small)
        monkeypatch.setattr(tokenizer, "MAX_VOCAB_BYTES", 1000)
        path.write_text("[PAD]\n[UNK]\n" + "".join(f"w{i}\n" for i in range(300)), encoding="utf-8")
        return path, "more than the 1,000 a WordPiece vocab.txt may have"
    path.write_bytes(b"\n\n")  # "blank": lines, but no [PAD]
    return path, "expected '[PAD]'"


@pytest.mark.parametrize("kind", ["empty", "garbage_model", "too_large", "folder", "long_line", "large_vocab",
                                  "blank"])
def test_load_tokenizer_refuses_every_bad_file_in_one_line(tmp_path, monkeypatch, kind):
    path, says = _bad_file(kind, tmp_path, monkeypatch)
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(path))
    assert str(path) in str(e.value) and says in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("kind, blob, says", [
    ("sentencepiece", bytes(range(256)) * 8, "not a sentencepiece model"),  # sentencepiece: a C++ trace
    ("sentencepiece", b"", "not a sentencepiece model"),
    ("sentencepiece", b"[PAD]\n[UNK]\n", "not a sentencepiece model"),
    ("wordpiece", b"", "empty"),
    ("wordpiece", b"\xff\xfe", "not UTF-8"),
    ("wordpiece", b"[PAD]\n[UNK]\n" + b"y" * 201, "line 3 is 201 bytes"),
])
def test_tokenizer_from_bytes_refuses_bad_bytes_in_one_line(kind, blob, says):
    """A checkpoint's "tokenizer" entry is read back by tokenizer_from_bytes: bad bytes are a one-line
    ValueError naming what was expected, never sentencepiece's multi-line RuntimeError."""
    with pytest.raises(ValueError) as e:
        tokenizer_from_bytes(kind, blob, name="ckpt.pt")
    message = str(e.value)
    assert message.startswith("ckpt.pt: ") and says in message and "\n" not in message, message


@pytest.mark.parametrize("fails_at", ["fsync", "replace"])
def test_tokenizer_training_on_a_full_disk_leaves_nothing_and_says_so(tmp_path, monkeypatch, fails_at):
    """ENOSPC (the real errno) while the trained model is written: no temp file and no partial
    tokenizer.model are left, and the error is one line naming the directory. Temp files carry a name only
    this project makes (<name>.m3ae-tmp.<pid>)."""
    run = tmp_path / "run"
    model_file = str(run / "tokenizer.model")
    written = []

    def full(*args):
        written.extend(os.listdir(run))  # what was on disk when the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fails_at, full)
    captions = lambda: ["a red star", "a blue ring on stripes", "a green cross"] * 20  # noqa: E731
    with pytest.raises(OSError) as e:
        get_tokenizer(model_file, captions, vocab_size=40)
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert f"no space left on the device of {run}" in str(e.value)
    assert written == [f"tokenizer.model.m3ae-tmp.{os.getpid()}"]
    assert os.listdir(run) == []
    monkeypatch.undo()
    assert get_tokenizer(model_file, captions, vocab_size=40).vocab_size > 0
    assert os.listdir(run) == ["tokenizer.model"]


# -----------------------------------------------------------------------------
# encode_with_span: the tokens of a substring in context (zeroshot.py masks exactly these)


@pytest.fixture(scope="module")
def tok_zs(tmp_path_factory):
    """sentencepiece on built-in captions and a few lines with the punctuation of the names below."""
    path = tmp_path_factory.mktemp("tok_zs") / "tokenizer.model"
    extra = ["a photo (of it), small.", "t-shirt/top and ankle boots"] * 50
    return Tokenizer.train(list(builtin.Builtin("pretrain", 2000).captions()) + extra, str(path), 300)


@pytest.mark.parametrize("template", ["{}", "a photo of a {}.", "a photo ({}) of it", "{}, small"])
@pytest.mark.parametrize("name", ["star", "ankle boot", "t-shirt/top", "red circle"])
def test_encode_with_span_sentencepiece_multi_piece_names(tok_zs, template, name):
    tok = tok_zs
    text = template.format(name)
    ids, pad, (start, end) = tok.encode_with_span(text, name, TEXT_LEN * 2)
    assert torch.equal(ids, tok.encode(text, TEXT_LEN * 2)[0]) and torch.equal(pad, tok.encode(text, TEXT_LEN * 2)[1])
    n = int((~pad).sum())
    assert 0 <= start < end <= n
    if name in ("ankle boot", "t-shirt/top"):
        assert end - start > 2  # several pieces in this small vocabulary
    # checked by decoding, not by the construction: the span is the name, the rest is the template
    assert tok.decode(ids[start:end]) == name
    before, after = template.split("{}")
    assert tok.decode(ids[:start]) == before.strip() and tok.decode(ids[end:n]) == after.strip()


def test_encode_with_span_pieces_depend_on_context(tok_zs):
    tok = tok_zs
    # glued to "(" the name carries no word marker: its ids differ from the name encoded alone
    alone = tok.encode("star", 4)[0][:1].tolist()
    ids, _, (start, end) = tok.encode_with_span("a photo (star)", "star", TEXT_LEN)
    assert ids[start:end].tolist() != alone and tok.decode(ids[start:end]) == "star"
    # which occurrence: `at` picks it
    text = "star and star"
    first = tok.encode_with_span(text, "star", TEXT_LEN)[2]
    second = tok.encode_with_span(text, "star", TEXT_LEN, at=text.rindex("star"))[2]
    assert first[0] == 0 and second[0] > first[1]


def test_encode_with_span_wordpiece(wp):
    ids, pad, span = wp.encode_with_span("a dog,cat!", "cat", 8)
    assert span == (3, 4) and ids[:5].tolist() == [5, 6, 12, 7, 13]
    ids, pad, span = wp.encode_with_span("the playing dogs, a cat", "playing dogs", 8)
    assert span == (1, 5) and wp.pieces(ids[1:5]) == ["play", "ing", "dog", "s"]
    # a substring that ends inside a piece cannot be masked as a whole: refused in one line
    with pytest.raises(ValueError, match="token boundaries"):
        wp.encode_with_span("playing", "pla", 8)
    with pytest.raises(ValueError, match="not in"):
        wp.encode_with_span("a dog", "cat", 8)
    with pytest.raises(ValueError, match="beyond text_len"):
        wp.encode_with_span("a dog cat", "cat", 2)
    with pytest.raises(ValueError, match="no token"):
        wp.encode_with_span("a \u200b dog", "\u200b", 8)  # removed by BERT's cleaning
