"""tokenizer.py: round trips, padding and truncation, unknown text, determinism, training and its fallbacks."""

import os
import pickle

import pytest
import torch

import builtin
import data
from tokenizer import Tokenizer, get_tokenizer

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
