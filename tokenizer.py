"""Tokenizers: caption text -> token ids (pad id 0, no special tokens), the convention model.py expects.

    Tokenizer      sentencepiece BPE trained on the run's own captions (what train.py makes by default)

Both kinds share one interface: encode(caption, text_len) -> (ids (T,) int64, padding mask (T,) bool, True = pad),
decode(ids) -> str, pieces(ids) -> one readable string per id, vocab_size. get_tokenizer() loads or trains one.
"""

import io
import itertools
import os
import re

import sentencepiece as spm
import torch

from data import PAD_ID, UNK_ID, caption_text

MAX_TOKENIZER_CAPTIONS = 2_000_000  # a tokenizer is trained on at most the first 2M captions


class Tokenizer:
    """sentencepiece BPE, trained on the run's captions: pad id 0, unk id 1, no bos/eos (the official BERT
    tokenizer adds no [CLS]/[SEP] either). Case-folded like bert-base-uncased (nmt_nfkc_cf). BPE, not
    unigram: on the built-in captions (few distinct words, very repetitive) unigram stops at ~180 pieces
    and spells common words letter by letter ("v i o le t"); BPE keeps them whole."""

    def __init__(self, model_file=None, model_proto=None):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto) if model_proto else \
            spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.pad_id() != PAD_ID:
            raise ValueError(f"{model_file}: pad id is {self.sp.pad_id()}, expected {PAD_ID}")

    # DataLoader workers may be spawned: pickle the model bytes, not the C++ object.
    def __getstate__(self):
        return {"proto": self.sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.__init__(model_proto=state["proto"])

    @classmethod
    def train(cls, captions, model_file, vocab_size):
        """Train on an iterable of captions (str or bytes) and save to model_file (written atomically).
        Deterministic: fixed seed and thread count. Uses the first MAX_TOKENIZER_CAPTIONS captions. If the
        corpus cannot fill vocab_size pieces, the vocabulary comes out smaller (sentencepiece's
        hard_vocab_limit=False) and we say so; if vocab_size is below the corpus's character count, it is
        raised to that count (every character needs a piece) and we say so."""
        # sentencepiece drops lines longer than this many bytes (and fails if it drops all): cut them to it
        # instead, on a character boundary. caption_text already cut them to data.MAX_CAPTION_CHARS characters.
        max_bytes = 4192

        def sentences():
            for c in captions:
                text = " ".join(caption_text(c).split())  # one line each; newlines inside a caption are spaces
                text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                if text:
                    yield text

        spm.set_random_generator_seed(0)
        options = dict(vocab_size=vocab_size, model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1,
                       eos_id=-1, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc_cf",
                       character_coverage=0.9995, num_threads=4, minloglevel=2, max_sentence_length=max_bytes)
        corpus = list(itertools.islice(sentences(), MAX_TOKENIZER_CAPTIONS))
        if not corpus:
            raise ValueError("no non-empty captions to train a tokenizer on")
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto, **options)
        except RuntimeError as e:
            # "Vocabulary size is smaller than required_chars. 50 vs 73.": every character needs a piece
            need = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
            if not need:
                raise
            options["vocab_size"] = int(need.group(1)) + 8
            print(f"tokenizer: vocab_size {vocab_size} is below the corpus's {need.group(1)} characters; "
                  f"training with {options['vocab_size']}")
            proto = io.BytesIO()
            spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto, **options)
        tok = cls(model_proto=proto.getvalue())
        if tok.vocab_size < vocab_size:
            print(f"tokenizer: the corpus supports {tok.vocab_size} pieces, fewer than the {vocab_size} asked for")
        os.makedirs(os.path.dirname(os.path.abspath(model_file)), exist_ok=True)
        tmp = f"{model_file}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(proto.getvalue())
        os.replace(tmp, model_file)
        return tok

    def encode(self, caption, text_len):
        """caption (str, bytes, None) -> ids (text_len,) int64 padded with PAD_ID or truncated, and the
        padding mask (text_len,) bool, True = pad. None, '' or whitespace -> all padding. Characters the
        model cannot encode (emoji, unseen scripts) become UNK_ID."""
        text = caption_text(caption)
        ids = self.sp.encode(text)[:text_len] if text.strip() else []
        out = torch.full((text_len,), PAD_ID, dtype=torch.int64)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        pad = torch.ones(text_len, dtype=torch.bool)
        pad[: len(ids)] = False
        return out, pad

    def decode(self, ids):
        """ids (sequence or tensor) -> str, ignoring PAD_ID."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.sp.decode([int(i) for i in ids if i != PAD_ID])

    def pieces(self, ids):
        """One readable piece per id: '<pad>', '<unk>', or the piece without sentencepiece's word marker
        (a piece that is only the marker stays '\u2581', so every id shows something)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        out = []
        for i in map(int, ids):
            piece = self.sp.id_to_piece(i)
            special = self.sp.is_control(i) or self.sp.is_unknown(i)
            out.append(piece if special else (piece.replace("\u2581", "") or "\u2581"))
        return out


def get_tokenizer(model_file, captions, vocab_size):
    """Load model_file if it exists, else train on captions() (a callable returning an iterable, so that the
    corpus is only read when needed) and save it there."""
    if os.path.exists(model_file):
        return Tokenizer(model_file)
    return Tokenizer.train(captions(), model_file, vocab_size)
