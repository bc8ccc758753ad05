"""Tokenizers: caption text -> token ids (pad id 0, no special tokens), the convention model.py
expects.

    Tokenizer      sentencepiece BPE trained on the run's own captions (what train.py makes by
                   default)
    WordPiece      BERT's uncased WordPiece read from a vocab.txt (bert-base-uncased's: what the
                   official M3AE weights were trained with)

Both kinds share one interface: encode(caption, text_len) -> (ids (T,) int64, padding mask (T,)
bool, True = pad), encode_with_span(text, substring, text_len) -> (ids, pad, (start, end)) with
ids[start:end] the substring's tokens in context, decode(ids) -> str, pieces(ids) -> one readable
string per id, starts_word(ids) -> whether each id begins a word, vocab_size, kind
("sentencepiece" / "wordpiece") and to_bytes() (the whole tokenizer as bytes, what a checkpoint
stores under "tokenizer": {"kind", "blob"};
tokenizer_from_bytes(kind, blob) rebuilds it). load_tokenizer(path) reads either kind from a file,
telling them apart by content; get_tokenizer() loads one or trains sentencepiece.
"""

import io
import itertools
import os
import re
import unicodedata

import sentencepiece as spm
import torch

from data import PAD_ID, UNK_ID, caption_text
from util import write_atomic

MAX_TOKENIZER_CAPTIONS = 2_000_000  # a tokenizer is trained on at most the first 2M captions
# Bounds on a tokenizer file, checked before it is read whole: a checkpoint stores the tokenizer, so
# a huge one would make every checkpoint huge. A 32000-piece sentencepiece model is about 0.8 MB;
# bert-base-uncased's vocab.txt is 232 KB, its longest token a few dozen bytes.
MAX_MODEL_BYTES = 64 << 20  # a sentencepiece .model
MAX_VOCAB_BYTES = 16 << 20  # a WordPiece vocab.txt
MAX_TOKEN_BYTES = 200  # one vocab.txt line


def padded(ids, text_len):
    """ids (at most text_len of them) -> (ids (text_len,) int64 padded with PAD_ID, padding mask
    (text_len,) bool, True = pad): the one layout both tokenizers return."""
    out = torch.full((text_len,), PAD_ID, dtype=torch.int64)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    pad = torch.ones(text_len, dtype=torch.bool)
    pad[: len(ids)] = False
    return out, pad


def encode_with_span(tokenizer, text, substring, text_len, at=None):
    """tokenizer.encode(text, text_len) and the token span of one occurrence of `substring` in text:
    (ids (text_len,), pad (text_len,), (start, end)) with ids[start:end] exactly the tokens that
    occurrence became in context. `at`: the occurrence's first character; if not given, the first
    occurrence. How: text up to the substring's start and text up to its end are encoded on their
    own; both must be prefixes of the whole text's tokens, and the span lies between them. That
    holds when the substring begins and ends on token boundaries, which a name between spaces or
    punctuation does (BPE and WordPiece never merge across a space; WordPiece also splits at every
    punctuation mark), whatever its pieces in context are: "top" after a space may be "t o p" where
    a caption's first word "top" is "to p", and a name glued to "(" has no word marker. A
    substring that begins or ends inside a piece ("boot" in "boots" when "boots" is one piece),
    that is not in the text, that becomes no token, or whose tokens text_len cuts: ValueError, one
    line."""
    text = caption_text(text)
    at = text.find(substring) if at is None else at
    if not substring or at < 0 or text[at: at + len(substring)] != substring:
        where = f" at character {at}" if at is not None and at >= 0 else ""
        raise ValueError(f"{substring!r} is not in {text!r}{where}")

    def tokens(s):  # every token, uncut (NFKC may expand a character into up to 18)
        ids, pad = tokenizer.encode(s, 18 * len(s) + 1)
        return ids[~pad].tolist()

    whole, before = tokens(text), tokens(text[:at])
    through = tokens(text[: at + len(substring)])
    start, end = len(before), len(through)
    if whole[:start] != before or whole[:end] != through:
        raise ValueError(f"{substring!r} does not begin and end on token boundaries in {text!r} "
                         "(a piece of the text straddles its edge)")
    if end == start:
        raise ValueError(f"{substring!r} becomes no token in {text!r}")
    if end > text_len:
        raise ValueError(f"{substring!r} is tokens {start}-{end} of {text!r}, beyond text_len "
                         f"{text_len}")
    ids, pad = padded(whole[:text_len], text_len)
    return ids, pad, (start, end)


class Tokenizer:
    """sentencepiece BPE, trained on the run's captions: pad id 0, unk id 1, no bos/eos (the
    official BERT tokenizer adds no [CLS]/[SEP] either). Case-folded like bert-base-uncased
    (nmt_nfkc_cf). BPE, not unigram: on the built-in captions (few distinct words, very repetitive)
    unigram stops at ~180 pieces and spells common words letter by letter ("v i o le t"); BPE keeps
    them whole."""

    kind = "sentencepiece"

    def __init__(self, model_file=None, model_proto=None, name=None):
        name = name or model_file or "sentencepiece model"
        if model_proto is None:
            model_proto = read_bounded(model_file, MAX_MODEL_BYTES, "a sentencepiece model")
        self.sp = _sentencepiece(model_proto, name)
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.pad_id() != PAD_ID:
            raise ValueError(f"{name}: pad id is {self.sp.pad_id()}, expected {PAD_ID}")

    def to_bytes(self):
        """The serialized model proto: Tokenizer(model_proto=...) and tokenizer_from_bytes read it
        back."""
        return self.sp.serialized_model_proto()

    # DataLoader workers may be spawned: pickle the model bytes, not the C++ object.
    def __getstate__(self):
        return {"proto": self.to_bytes()}

    def __setstate__(self, state):
        self.__init__(model_proto=state["proto"])

    @classmethod
    def train(cls, captions, model_file, vocab_size):
        """Train on an iterable of captions (str or bytes) and save to model_file (write_atomic:
        never a partial file, and a full disk says so).
        Deterministic: fixed seed and thread count. Uses the first MAX_TOKENIZER_CAPTIONS captions.
        If the corpus cannot fill vocab_size pieces, the vocabulary comes out smaller
        (sentencepiece's hard_vocab_limit=False) and we say so; if vocab_size is below the corpus's
        character count, it is raised to that count (every character needs a piece) and we say
        so."""
        # sentencepiece drops lines longer than this many bytes (and fails if it drops all): cut
        # them to it instead, on a character boundary. caption_text already cut them to
        # data.MAX_CAPTION_CHARS characters.
        max_bytes = 4192

        def sentences():
            for c in captions:
                # one line each; newlines inside a caption are spaces
                text = " ".join(caption_text(c).split())
                text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                if text:
                    yield text

        spm.set_random_generator_seed(0)
        options = dict(vocab_size=vocab_size, model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID,
                       bos_id=-1, eos_id=-1, hard_vocab_limit=False,
                       normalization_rule_name="nmt_nfkc_cf", character_coverage=0.9995,
                       num_threads=4, minloglevel=2, max_sentence_length=max_bytes)
        corpus = list(itertools.islice(sentences(), MAX_TOKENIZER_CAPTIONS))
        if not corpus:
            raise ValueError("no non-empty captions to train a tokenizer on")
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto,
                                           **options)
        except RuntimeError as e:
            # "Vocabulary size is smaller than required_chars. 50 vs 73.": every character needs a
            # piece
            need = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
            if not need:
                raise
            options["vocab_size"] = int(need.group(1)) + 8
            print(f"tokenizer: vocab_size {vocab_size} is below the corpus's {need.group(1)} "
                  f"characters; training with {options['vocab_size']}")
            proto = io.BytesIO()
            spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto,
                                           **options)
        tok = cls(model_proto=proto.getvalue())
        if tok.vocab_size < vocab_size:
            print(f"tokenizer: the corpus supports {tok.vocab_size} pieces, fewer than the "
                  f"{vocab_size} asked for")
        write_atomic(model_file, lambda f: f.write(proto.getvalue()))
        return tok

    def encode(self, caption, text_len):
        """caption (str, bytes, None) -> ids (text_len,) int64 padded with PAD_ID or truncated, and
        the padding mask (text_len,) bool, True = pad. None, '' or whitespace -> all padding.
        Characters the model cannot encode (emoji, unseen scripts) become UNK_ID."""
        text = caption_text(caption)
        ids = self.sp.encode(text)[:text_len] if text.strip() else []
        return padded(ids, text_len)

    def encode_with_span(self, text, substring, text_len, at=None):
        """encode(text, text_len) and the token span of `substring` in it: (ids, pad, (start, end)),
        ids[start:end] its tokens in context (tokenizer.encode_with_span)."""
        return encode_with_span(self, text, substring, text_len, at)

    def decode(self, ids):
        """ids (sequence or tensor) -> str, ignoring PAD_ID."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.sp.decode([int(i) for i in ids if i != PAD_ID])

    def pieces(self, ids):
        """One readable piece per id: '<pad>', '<unk>', or the piece without sentencepiece's word
        marker (a piece that is only the marker stays '\u2581', so every id shows something)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        out = []
        for i in map(int, ids):
            piece = self.sp.id_to_piece(i)
            special = self.sp.is_control(i) or self.sp.is_unknown(i)
            out.append(piece if special else (piece.replace("\u2581", "") or "\u2581"))
        return out

    def starts_word(self, ids):
        """One bool per id: True where the piece begins a word (it carries sentencepiece's word
        marker) or is <pad>/<unk>, which stand as words of their own."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return [self.sp.id_to_piece(i).startswith("\u2581") or self.sp.is_control(i)
                or self.sp.is_unknown(i) for i in map(int, ids)]


# -----------------------------------------------------------------------------
# BERT's uncased WordPiece
#
# What the official M3AE feeds its model: transformers.BertTokenizer("bert-base-uncased") (the
# Python one, not the Rust "fast" one) called with add_special_tokens=False, padding to max_length
# 64 and truncation. Rewritten here so that no new dependency is needed; every step below is one of
# its steps, in its order, and a comment says where a detail is easy to get wrong. We follow
# transformers 4.x (the official code's era); 5.x changed two corner cases (a final capital sigma, a
# special token broken by a zero-width character). Character classes come from the running Python's
# unicodedata, as they do in BERT's own tokenizer. The Rust "fast" tokenizer differs from the Python
# one on unassigned code points (it keeps them, as [UNK]; the Python one drops them).

# never split, never lower-cased
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDPIECE_MAX_WORD_CHARS = 100  # a longer word becomes [UNK] whole
WORDPIECE_CONTINUATION = "##"  # prefix of a piece that continues a word


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    # Every "C" category (Cc controls, Cf format characters such as the zero-width space U+200B,
    # zero-width joiner U+200D, soft hyphen U+00AD and BOM U+FEFF, Co private use, Cs surrogates, Cn
    # unassigned) is removed: transformers' test is category.startswith("C"). Tab, newline and CR
    # are whitespace instead.
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    # All ASCII that is neither a letter, a digit nor a space counts ($, ^, `, +, <, ...), then
    # Unicode P*.
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    # CJK Unified Ideographs and their extensions A-E, plus the compatibility ideographs: each
    # becomes a word of its own. Hiragana, katakana and hangul are not in these blocks and stay
    # ordinary letters.
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def bert_basic_tokenize(text):
    """BERT's basic tokenizer, uncased: text (no special tokens in it) -> words and punctuation
    marks."""
    # transformers lower-cases the text one character at a time before the basic tokenizer runs (a
    # regex that skips special tokens), so no context rule applies: a final capital sigma becomes
    # σ, not ς.
    text = "".join(ch.lower() for ch in text)
    # clean: drop NUL, U+FFFD and controls; every whitespace character becomes a space
    text = "".join(" " if _is_whitespace(ch) else ch for ch in text
                   if ch not in "\x00\ufffd" and not _is_control(ch))
    text = "".join(f" {ch} " if _is_cjk(ord(ch)) else ch for ch in text)
    # one code point per composed character before splitting
    text = unicodedata.normalize("NFC", text)
    words = []
    for token in text.split():
        # strip accents: decompose, drop nonspacing marks (Mn); é -> e, and a lone combining mark
        # vanishes
        token = "".join(ch for ch in unicodedata.normalize("NFD", token.lower())
                        if unicodedata.category(ch) != "Mn")
        # every punctuation character is a word of its own
        word = ""
        for ch in token:
            if _is_punctuation(ch):
                if word:
                    words.append(word)
                words.append(ch)
                word = ""
            else:
                word += ch
        if word:
            words.append(word)
    # as BERT: re-split, in case a step left whitespace inside a word
    return " ".join(words).split()


class WordPiece:
    """BERT's uncased WordPiece from a vocab.txt: one token per line, the id is the line number
    (from 0). The vocabulary must put [PAD] on the first line (pad id 0, as model.py expects;
    bert-base-uncased does) and contain [UNK] (bert-base-uncased: id 100). Like the official M3AE,
    no [CLS]/[SEP] is added.

    Pipeline (bert-base-uncased's): split out literal special tokens ([PAD] [UNK] [CLS] [SEP]
    [MASK], exact case) and keep them whole; the rest goes through the basic tokenizer
    (bert_basic_tokenize: lower-case, drop control and zero-width characters, split CJK ideographs,
    strip accents, split punctuation) and then greedy longest-match-first WordPiece per word: a word
    is covered by a first piece and '##' continuations, and is [UNK] as a whole if it cannot be
    covered or is longer than 100 characters."""

    kind = "wordpiece"

    def __init__(self, vocab_file=None, vocab_bytes=None, name=None):
        name = name or vocab_file or "WordPiece vocabulary"
        if vocab_bytes is None:
            vocab_bytes = read_bounded(vocab_file, MAX_VOCAB_BYTES, "a WordPiece vocab.txt")
        self.tokens = _vocab_lines(vocab_bytes, name)
        # a token listed twice keeps its last line, as BERT's vocabulary loader does
        self.vocab = {token: i for i, token in enumerate(self.tokens)}
        self.vocab_size = len(self.tokens)
        if self.tokens[0] != "[PAD]":
            first = self.tokens[0]
            raise ValueError(f"{name}: first line is {first[:40]!r}, expected '[PAD]' (pad id "
                             f"{PAD_ID}): not a WordPiece vocab.txt like bert-base-uncased's")
        if "[UNK]" not in self.vocab:
            raise ValueError(f"{name}: no '[UNK]' line: a WordPiece vocab.txt needs one for "
                             "unknown words")
        self.unk_id = self.vocab["[UNK]"]
        specials = [t for t in WORDPIECE_SPECIALS if t in self.vocab]
        self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def to_bytes(self):
        """The vocabulary as UTF-8 text, one token per line (what WordPiece(vocab_bytes=...)
        reads)."""
        return ("\n".join(self.tokens) + "\n").encode("utf-8")

    def __getstate__(self):
        return {"vocab": self.to_bytes()}

    def __setstate__(self, state):
        self.__init__(vocab_bytes=state["vocab"])

    def tokenize(self, caption):
        """caption (str, bytes, None) -> the token strings, before truncation."""
        out = []
        # split() with a capturing group: special tokens land at the odd positions
        for i, part in enumerate(self._specials.split(caption_text(caption))):
            if i % 2:
                out.append(part)
            else:
                for word in bert_basic_tokenize(part):
                    out.extend(self._word_pieces(word))
        return out

    def _word_pieces(self, word):
        if len(word) > WORDPIECE_MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = word[start:end] if start == 0 else WORDPIECE_CONTINUATION + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]  # one uncovered stretch makes the whole word unknown
            pieces.append(piece)
            start = end
        return pieces

    def encode(self, caption, text_len):
        """caption (str, bytes, None) -> ids (text_len,) int64 padded with PAD_ID or truncated, and
        the padding mask (text_len,) bool, True = pad: the official pipeline's input_ids and 1 -
        attention_mask. None, '' or text with nothing BERT keeps -> all padding. A literal '[PAD]'
        inside a caption is id 0 but not padding, exactly as in the official pipeline."""
        ids = [self.vocab[t] for t in self.tokenize(caption)[:text_len]]
        return padded(ids, text_len)

    def encode_with_span(self, text, substring, text_len, at=None):
        """encode(text, text_len) and the token span of `substring` in it: (ids, pad, (start, end)),
        ids[start:end] its tokens in context (tokenizer.encode_with_span)."""
        return encode_with_span(self, text, substring, text_len, at)

    def decode(self, ids):
        """ids -> str, ignoring PAD_ID: pieces joined by spaces, '##' continuations glued to the
        piece before (lower-cased and without accents: the text as the model saw it)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        text = " ".join(self.tokens[int(i)] for i in ids if int(i) != PAD_ID)
        return text.replace(" " + WORDPIECE_CONTINUATION, "").strip()

    def pieces(self, ids):
        """One readable piece per id: the token without its '##' continuation marker ('[PAD]',
        '[UNK]' and other specials as they are); starts_word() says which pieces continue a word."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        out = []
        for i in map(int, ids):
            token = self.tokens[i]
            continues = (token.startswith(WORDPIECE_CONTINUATION)
                         and len(token) > len(WORDPIECE_CONTINUATION))
            out.append(token[len(WORDPIECE_CONTINUATION):] if continues else token)
        return out

    def starts_word(self, ids):
        """One bool per id: False for a '##' continuation, True otherwise (specials stand as words
        of their own)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return [not (self.tokens[i].startswith(WORDPIECE_CONTINUATION) and
                     len(self.tokens[i]) > len(WORDPIECE_CONTINUATION)) for i in map(int, ids)]


def _vocab_lines(blob, name):
    """vocab.txt bytes -> its lines, read as BERT's loader reads them: UTF-8, universal newlines
    ('\n', '\r\n' or '\r' end a line), a final newline optional. Refused (ValueError naming it):
    empty, over MAX_VOCAB_BYTES, not UTF-8, or a line over MAX_TOKEN_BYTES."""
    if not blob:
        raise ValueError(f"{name}: empty: a WordPiece vocab.txt has one token per line, "
                         "[PAD] first")
    if len(blob) > MAX_VOCAB_BYTES:
        raise ValueError(f"{name}: {len(blob):,} bytes, more than the {MAX_VOCAB_BYTES:,} a "
                         "WordPiece vocab.txt may have (bert-base-uncased's is 231,508)")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text (byte {e.start}): not a WordPiece "
                         "vocab.txt") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = lines[:-1] if lines[-1] == "" else lines
    for i, line in enumerate(lines):
        # (4: UTF-8's most)
        if len(line) * 4 > MAX_TOKEN_BYTES and len(line.encode("utf-8")) > MAX_TOKEN_BYTES:
            raise ValueError(f"{name}: line {i + 1} is {len(line.encode('utf-8')):,} bytes, more "
                             f"than the {MAX_TOKEN_BYTES} a WordPiece token may have: not a "
                             "vocab.txt")
    return lines


# -----------------------------------------------------------------------------
# either kind, from a file or from bytes

TOKENIZER_KINDS = ("sentencepiece", "wordpiece")


def tokenizer_kind(blob):
    """'sentencepiece' for bytes that parse as a sentencepiece model proto, 'wordpiece' for UTF-8
    text without NUL bytes (a vocab.txt), None for anything else. Goes by content: the file name
    does not matter."""
    try:
        # (empty bytes load as an empty processor without complaint: a model has pieces)
        if blob and spm.SentencePieceProcessor(model_proto=blob).get_piece_size() > 0:
            return "sentencepiece"
    # sentencepiece raises RuntimeError or OSError, depending on how the parse fails
    except Exception:
        pass
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "wordpiece" if blob and b"\x00" not in blob else None


def tokenizer_from_bytes(kind, blob, name=None):
    """Rebuild a tokenizer from (kind, to_bytes()), e.g. a checkpoint's "tokenizer" entry.
    ValueError, one line (naming `name` when given), for anything that is not a tokenizer of that
    kind."""
    if kind == "sentencepiece":
        return Tokenizer(model_proto=bytes(blob), name=name)
    if kind == "wordpiece":
        return WordPiece(vocab_bytes=bytes(blob), name=name)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of "
                     f"{', '.join(TOKENIZER_KINDS)}")


def load_tokenizer(path):
    """A tokenizer file of either kind: a sentencepiece .model or a WordPiece vocab.txt, told apart
    by content. ValueError, one line naming the path, when it is not a file, unreadable, empty,
    larger than its kind may be, or neither kind."""
    blob = read_bounded(path, max(MAX_MODEL_BYTES, MAX_VOCAB_BYTES), "a tokenizer")
    kind = tokenizer_kind(blob)
    if kind is None:
        raise ValueError(f"{path}: not a sentencepiece model or a BERT vocab.txt: neither a model "
                         "proto nor UTF-8 text (one token per line, [PAD] first)")
    return tokenizer_from_bytes(kind, blob, name=path)


def get_tokenizer(model_file, captions, vocab_size):
    """Load model_file if it exists (either kind, see load_tokenizer), else train sentencepiece on
    captions() (a callable returning an iterable, so that the corpus is only read when needed) and
    save it there."""
    if os.path.exists(model_file):
        return load_tokenizer(model_file)
    return Tokenizer.train(captions(), model_file, vocab_size)


# -----------------------------------------------------------------------------
# files


def read_bounded(path, limit, what):
    """The bytes of the file at `path`. ValueError, one line naming it, when it is a folder, cannot
    be read, is empty, or is larger than `limit` bytes: the size is checked before reading, and no
    more than limit + 1 bytes are ever read (a file that grows, a pipe)."""
    try:
        if os.path.isdir(path):
            raise ValueError(f"{path}: a folder, not {what} file")
        size = os.path.getsize(path)
        if size > limit:
            raise ValueError(f"{path}: {size:,} bytes, more than the {limit:,} {what} may have")
        with open(path, "rb") as f:
            blob = f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(blob) > limit:
        raise ValueError(f"{path}: more than the {limit:,} bytes {what} may have")
    if not blob:
        raise ValueError(f"{path}: empty file, not {what}")
    return blob


def _sentencepiece(blob, name):
    """A SentencePieceProcessor from model bytes. ValueError, one line naming `name`, for bytes over
    MAX_MODEL_BYTES or that are not a model with pieces (sentencepiece's own error is a multi-line
    C++ trace)."""
    if len(blob) > MAX_MODEL_BYTES:
        raise ValueError(f"{name}: {len(blob):,} bytes, more than the {MAX_MODEL_BYTES:,} a "
                         "sentencepiece model may have")
    try:
        sp = spm.SentencePieceProcessor(model_proto=blob) if blob else None
    except Exception:  # RuntimeError or OSError, depending on how the parse fails
        sp = None
    if sp is None or sp.get_piece_size() == 0:
        raise ValueError(f"{name}: not a sentencepiece model ({len(blob):,} bytes that do not "
                         "parse as one)")
    return sp
