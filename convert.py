"""Weight conversion between model.py and the two reference implementations.

    python convert.py official CKPT OUT.pt --tokenizer vocab.txt
                                                official JAX M3AE (young-geng/m3ae_public): pickle
                                                or flat .npz
    python convert.py mae CKPT OUT.pt           facebookresearch/mae PyTorch checkpoint -> our image
                                                path
    python convert.py to-official OURS.pt OUT   ours -> flat official names (.npz, or a .pkl the
                                                official scripts' load_checkpoint reads)
    python convert.py to-timm OURS.pt OUT.pth   our encoder -> a timm VisionTransformer state_dict
                                                (no head)
    python convert.py to-mae OURS.pt OUT.pth    our image path -> a facebookresearch/mae checkpoint
                                                {"model": ...}

Every command into our format builds the model and loads the converted weights with strict=True
before writing, so a bad mapping fails here, not later in train.py. Errors name the offending
parameter (ConversionError). The output is model.checkpoint_dict(...), which model.load_model reads
with torch.load(weights_only=True).

Besides "model" and "config", a checkpoint may carry what is needed to feed it, so that it is
self-contained:
    "tokenizer": {"kind": "sentencepiece" | "wordpiece", "blob": bytes}
        tokenizer.tokenizer_from_bytes reads it
    "data": {"mean": [3 floats], "std": [3 floats], "source": str}
        the normalisation the encoder expects
(image size and text length are in "config"). Both load with weights_only=True. `official` always
records the official preprocessing (CC12M statistics) and, with --tokenizer, BERT's vocabulary;
`mae` records ImageNet's.

Official parameters are flax names joined with "/" (e.g.
"encoder/Block_0/Attention_0/Dense_0/kernel"); a flax Dense kernel is (in, out), the transpose of a
torch Linear weight. Reading the official release never runs code from the file: see SafeUnpickler.
"""

import ast
import io
import math
import os
import pickle
import re
import sys
import warnings
import zipfile

import numpy as np
import torch

from data import CC12M_MEAN, CC12M_STD, IMAGENET_MEAN, IMAGENET_STD
from tokenizer import load_tokenizer
from util import DiskFull, HelpFormatter, foreign_output, make_parser, write_atomic


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or parameter at fault."""


# -----------------------------------------------------------------------------
# what a converted checkpoint records besides its weights


def data_entry(mean, std, source):
    """The checkpoint's "data" entry: the per-channel normalisation the encoder was trained with."""
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std], "source": source}


# The official data pipeline normalises with CC12M statistics (its image_normalization='cc12m', what
# the README's pretraining command uses); mae, like timm, with ImageNet's.
OFFICIAL_DATA = data_entry(CC12M_MEAN, CC12M_STD, "official M3AE preprocessing (CC12M mean/std)")
MAE_DATA = data_entry(IMAGENET_MEAN, IMAGENET_STD,
                      "facebookresearch/mae preprocessing (ImageNet mean/std)")


def read_tokenizer(path, flag="--tokenizer"):
    """tokenizer.load_tokenizer(path) (a WordPiece vocab.txt or a sentencepiece model), errors
    naming `flag`."""
    try:
        return load_tokenizer(path)
    except ValueError as e:
        raise ConversionError(f"{flag} {e}") from None


def check_vocab_size(tok, vocab_size, path, hint="", flag="--tokenizer"):
    """A tokenizer must have exactly as many tokens as the model's text embedding has rows."""
    if tok.vocab_size != vocab_size:
        raise ConversionError(f"{flag} {path}: {tok.vocab_size} tokens, but the model's text "
                              f"embedding has {vocab_size} rows: not this checkpoint's "
                              f"vocabulary{hint}")


def tokenizer_entry(tok):
    """The checkpoint's "tokenizer" entry: {"kind", "blob"}, read back by
    tokenizer.tokenizer_from_bytes."""
    return {"kind": tok.kind, "blob": tok.to_bytes()}


def refuse_non_finite(params, path):
    """ConversionError naming the first parameters (by the file's own names) that hold NaN or inf:
    converted, they would load without complaint and make every loss NaN, far from here."""
    bad = [name for name, value in params.items() if not _finite(value)]
    if bad:
        raise ConversionError(f"{path}: non-finite weights (NaN or inf) in {len(bad)} "
                              f"parameter(s): {', '.join(map(str, bad[:3]))}"
                              f"{' ...' if len(bad) > 3 else ''}; nothing written")


def _finite(value):
    """Whether a tensor or array (of any numeric dtype) holds no NaN or inf."""
    if torch.is_tensor(value):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    value = np.asarray(value)
    if value.dtype.kind in "biuSUOMm":
        # integers are finite; strings and objects are refused elsewhere
        return True
    if value.dtype.kind not in "fc":
        # e.g. bfloat16 from ml_dtypes, which np.isfinite does not know
        value = value.astype(np.float32)
    return bool(np.isfinite(value).all())


# -----------------------------------------------------------------------------
# official names <-> ours

# (official regex, our name template). Applied to the name without its leaf ("kernel", "scale",
# ...).
_BLOCK = r"(encoder|decoder)/Block_(\d+)/"
OFFICIAL_TO_OURS = [
    (r"cls_token", "cls_token"),
    (r"encoder_image_type_embedding", "enc_image_type"),
    (r"encoder_text_type_embedding", "enc_text_type"),
    (r"decoder_image_type_embedding", "dec_image_type"),
    (r"decoder_text_type_embedding", "dec_text_type"),
    (r"image_mask_embedding", "image_mask_token"),
    (r"text_mask_embedding", "text_mask_token"),
    (r"image_embedding", "patch_embed"),
    (r"text_embedding", "text_embed"),
    (_BLOCK + r"LayerNorm_0", r"\1.blocks.\2.norm1"),
    (_BLOCK + r"Attention_0/Dense_0", r"\1.blocks.\2.attn.qkv"),
    (_BLOCK + r"Attention_0/Dense_1", r"\1.blocks.\2.attn.proj"),
    (_BLOCK + r"LayerNorm_1", r"\1.blocks.\2.norm2"),
    (_BLOCK + r"TransformerMLP_0/fc1", r"\1.blocks.\2.mlp.fc1"),
    (_BLOCK + r"TransformerMLP_0/fc2", r"\1.blocks.\2.mlp.fc2"),
    (r"(encoder|decoder)/LayerNorm_0", r"\1.norm"),
    (r"decoder_input_projection", "decoder_embed"),
    (r"decoder_image_output/Dense_0", "image_head"),
    (r"decoder_text_output/Dense_0", "text_head"),
]
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def official_name_to_ours(name):
    """'encoder/Block_0/Attention_0/Dense_0/kernel' -> 'encoder.blocks.0.attn.qkv.weight'."""
    stem, _, leaf = name.rpartition("/")
    if not stem:  # a bare parameter such as cls_token
        stem, leaf = leaf, None
    if leaf is not None and leaf not in _LEAVES:
        raise ConversionError(f"unknown official parameter {name!r} (leaf {leaf!r})")
    for pattern, template in OFFICIAL_TO_OURS:
        if re.fullmatch(pattern, stem):
            ours = re.sub(pattern, template, stem)
            return ours if leaf is None else f"{ours}.{_LEAVES[leaf]}"
    raise ConversionError(f"unknown official parameter {name!r}")


def _invert(pattern, template):
    """Turn one (official regex, our template) row around: (our regex, official template). The k-th
    group of the official regex becomes the k-th group of ours, so the table above is written
    once."""
    groups = re.findall(r"\(([^)]*)\)", pattern)
    parts = re.split(r"\\(\d)", template)  # literal, group number, literal, ...
    ours = "".join(re.escape(p) if i % 2 == 0 else f"({groups[int(p) - 1]})"
                   for i, p in enumerate(parts))
    k = iter(range(1, len(groups) + 1))
    official = re.sub(r"\([^)]*\)", lambda m: f"\\{next(k)}", pattern)
    return ours, official


OURS_TO_OFFICIAL = [_invert(p, t) for p, t in OFFICIAL_TO_OURS]


def our_name_to_official(name):
    """'encoder.blocks.0.attn.qkv.weight' -> 'encoder/Block_0/Attention_0/Dense_0/kernel'."""
    stem, leaf = name, None
    if name.endswith((".weight", ".bias")):
        stem, _, leaf = name.rpartition(".")
    for pattern, template in OURS_TO_OFFICIAL:
        if re.fullmatch(pattern, stem):
            official = re.sub(pattern, template, stem)
            break
    else:
        raise ConversionError(f"parameter {name!r} has no official counterpart")
    if leaf is None:
        return official
    if leaf == "bias":
        return official + "/bias"
    # a torch "weight" is a flax LayerNorm "scale", an Embed "embedding" or a Dense "kernel"
    if re.search(r"(^|\.)norm\d?$", stem):
        return official + "/scale"
    return official + ("/embedding" if stem == "text_embed" else "/kernel")


def official_to_state_dict(params):
    """{official flat name: array} -> {our name: float32 tensor}; Dense kernels are transposed."""
    state, source = {}, {}
    for name, value in params.items():
        ours = official_name_to_ours(name)
        if ours in state:
            raise ConversionError(f"official parameters {source[ours]!r} and {name!r} both map to "
                                  f"{ours!r}")
        if np.asarray(value).dtype.kind in "SUOMm":
            raise ConversionError(f"official parameter {name!r} holds {np.asarray(value).dtype} "
                                  "values, not numbers")
        value = np.asarray(value, dtype=np.float32)
        if name.endswith("/kernel"):
            if value.ndim != 2:
                raise ConversionError(f"official parameter {name!r}: a Dense kernel must be 2-D, "
                                      f"got {value.shape}")
            value = value.T
        state[ours], source[ours] = torch.from_numpy(np.ascontiguousarray(value)), name
    return state


def ours_to_official(state_dict):
    """{our name: tensor} -> {official flat name: float32 numpy array}; Linear weights transposed
    back to kernels."""
    out = {}
    for name, value in state_dict.items():
        official = our_name_to_official(name)
        value = value.detach().cpu().float().numpy()
        out[official] = np.ascontiguousarray(value.T if official.endswith("/kernel") else value)
    return out


def config_from_official(official, **overrides):
    """Our config for an official config dict (the keys of m3ae_public's get_default_config).

    Official numerics are GELU tanh, LayerNorm eps 1e-6 and per-sample loss averaging: our defaults
    too."""
    from model import M3AEConfig

    keys = ("image_size", "patch_size", "vocab_size", "text_len", "emb_dim", "depth", "num_heads",
            "dec_emb_dim", "dec_depth", "dec_num_heads", "mlp_ratio", "image_mask_ratio",
            "text_mask_ratio")
    fields = {k: official[k] for k in keys if k in official}
    return M3AEConfig(**{**fields, "gelu": "tanh", "ln_eps": 1e-6, **overrides})


# -----------------------------------------------------------------------------
# reading a pickle without running it
#
# The official training script saves {"step", "epoch", "variant", "state"} with cloudpickle, where
# "state" is a flax TrainState holding the parameters (already numpy: it saves
# jax.device_get(state)) next to the optimizer, whose closures cloudpickle stores *by value*.
# pickle.load would import flax/optax and rebuild those functions; we want only the arrays.
# SafeUnpickler materialises numpy arrays and plain containers, turns every other class into an
# inert StandIn that merely records what pickle hands it, and refuses anything that looks like a
# function. It never imports a module named by the file: the allowed objects below are fixed in
# advance.


class StandIn:
    """An object of a class we did not import. It keeps what the pickle gave it (constructor args,
    __setstate__ state, list/dict items) and has no other behaviour; `stand_in.params` reads the
    recorded state dict."""

    origin = "?"  # "module.Name" of the class it replaces, set on each generated subclass

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], entries={})
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):  # pickle's BUILD
        self.__dict__["state"] = state

    def append(self, item):  # APPEND(S) on a list subclass
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):  # SETITEM(S) on a dict subclass
        self.entries[key] = value

    def __getattr__(self, name):
        # only reached for names not in __dict__: look in the recorded state
        state = self.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(f"stand-in for {self.origin} has no recorded attribute {name!r}")

    def __repr__(self):
        return f"<stand-in for {self.origin}>"


def _numpy_globals():
    """The numpy callables an array pickle needs, under the module names numpy 1 and numpy 2
    write."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric
    allowed = {}
    for mod in ("numpy.core", "numpy._core"):
        # ndarray, protocol <= 4
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # numpy scalars (e.g. the step)
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        # ndarray, protocol 5 (cloudpickle's)
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


def _latin1_encode(text, encoding="latin1"):
    """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); nothing else is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ConversionError("refusing _codecs.encode with arguments other than (str, 'latin1')")
    return text.encode("latin1")


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0/1 objects), restricted to building stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise ConversionError(f"refusing copyreg._reconstructor for {cls!r}")
    return cls()


_SAFE_GLOBALS = {
    **_numpy_globals(),
    # containers pickle spells as calls (set([...]) in protocol 2, bytearray(...) in protocol < 5,
    # complex(...))
    **{("builtins", t.__name__): t
       for t in (dict, list, tuple, set, frozenset, bytearray, complex)},
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
}
# Modules whose every global is refused even when the name looks like a class: nothing from here
# belongs in a checkpoint (os.system, subprocess.Popen, builtins.eval, importlib.import_module,
# ...).
_REFUSED_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__",
                    "importlib", "shutil", "runpy", "ctypes", "pickle", "_pickle", "marshal",
                    "code", "pty", "socket", "webbrowser"}


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class never imports: numpy arrays and plain containers are real,
    other classes become StandIn subclasses, functions are refused (ConversionError).

    Without importing a name we cannot ask whether it is a class, so we go by PEP 8: a CapWords name
    is taken for a class and replaced by a stand-in (which, called or not, runs nothing); any other
    name is taken for a function and refused. The exception is cloudpickle's own helpers
    (_make_function, _builtin_type, ...), which rebuild the optimizer's closures in the official
    TrainState: we need only the parameters, so their calls are recorded as stand-ins and never
    executed."""

    _classes = {}  # (module, name) -> StandIn subclass, so two references give the same class

    def find_class(self, module, name):
        # protocol <= 2 writes Python 2 module names (__builtin__, copy_reg); the base class would
        # map them here
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        top, last = module.split(".")[0], name.rpartition(".")[2]
        is_cloudpickle = top == "cloudpickle"
        looks_like_class = last.lstrip("_")[:1].isupper()  # CapWords, perhaps _Private
        if top in _REFUSED_MODULES or not (looks_like_class or is_cloudpickle):
            raise ConversionError(f"refusing to load global {module}.{name}: a checkpoint holds "
                                  "data, and this looks like a function (or is from a module that "
                                  "must never run while loading)")
        if is_cloudpickle and name.startswith("_make_skeleton"):
            return _skeleton_class  # a class built by value: NEWOBJ needs a real type back
        return self._stand_in_class(module, name)

    @classmethod
    def _stand_in_class(cls, module, name):
        key = (module, name)
        if key not in cls._classes:
            safe = re.sub(r"\W", "_", name)
            cls._classes[key] = type(safe, (StandIn,),
                                     {"origin": f"{module}.{name}", "__module__": __name__})
        return cls._classes[key]

    def persistent_load(self, pid):
        raise ConversionError("refusing a persistent id: not a plain pickle of arrays")


def _skeleton_class(*args, **kwargs):
    """Stand-in for cloudpickle's _make_skeleton_class(type_constructor, name, ...): a fresh StandIn
    class."""
    name = args[1] if len(args) > 1 and isinstance(args[1], str) else "by_value_class"
    return SafeUnpickler._stand_in_class("<pickled by value>", name)


def safe_load_pickle(data):
    """Unpickle bytes with SafeUnpickler. Refusals raise ConversionError; anything unreadable
    too."""
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except ConversionError:
        raise
    except Exception as e:
        # random bytes can fail in many ways (UnpicklingError, EOFError, KeyError, ...)
        raise ConversionError(f"not a readable pickle ({type(e).__name__}: "
                              f"{_first_line(e)})") from None


def _first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:200]


# -----------------------------------------------------------------------------
# official checkpoint files -> flat {name: array}


def _as_mapping(obj):
    """A dict-like view of a container from the pickle: dicts as they are, stand-ins by what they
    recorded (a TrainState's attributes, a FrozenDict's wrapped dict)."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, StandIn):
        if isinstance(obj.state, dict):
            return obj.state
        if isinstance(obj.state, tuple) and len(obj.state) == 2 and isinstance(obj.state[1], dict):
            return {**(obj.state[0] or {}), **obj.state[1]}
        if obj.entries:
            return obj.entries
        if len(obj.args) == 1 and isinstance(obj.args[0], dict):  # FrozenDict(dict) and the like
            return obj.args[0]
    return None


def _flatten(tree, prefix=""):
    """Nested dicts of arrays -> {"a/b/c": array}. A leaf that is not an array is an error naming
    its path."""
    flat = {}
    for key, value in _as_mapping(tree).items():
        path = f"{prefix}{key}"
        if _as_mapping(value) is not None:
            flat.update(_flatten(value, path + "/"))
        elif isinstance(value, (np.ndarray, np.generic)):
            flat[path] = np.asarray(value)
        else:
            raise ConversionError(f"official parameter {path!r} is a {type(value).__name__}, not "
                                  "an array")
    return flat


def find_official_params(obj):
    """The parameter tree of an official checkpoint, whatever its wrapping: the training script's
    {"state": TrainState} (params under state.params["params"]), a flax variables dict {"params":
    ...}, or bare parameters. Returns (flat params, metadata dict)."""
    meta = {}
    top = _as_mapping(obj)
    if top is None:
        raise ConversionError(f"expected a dict of parameters, found {obj!r:.80}")
    if "state" in top:
        for key in ("step", "epoch"):
            if isinstance(top.get(key), (int, np.integer)):
                meta[key] = int(top[key])
        if isinstance(top.get("variant"), dict):
            meta["variant"] = top["variant"]
        state = _as_mapping(top["state"])
        if state is None or "params" not in state:
            raise ConversionError("checkpoint has 'state' but no 'state.params'")
        top = _as_mapping(state["params"])
    while top is not None and set(top) == {"params"}:  # flax variables {"params": {...}}
        top = _as_mapping(top["params"])
    if top is None:
        raise ConversionError("official parameters are not a dict")
    return _flatten(top), meta


def read_official(path):
    """Read an official checkpoint: a flat .npz ("param/params/<path>" keys as the fixture, or plain
    "<path>"; an optional "config" string holds the official config) or a pickle. Returns (flat
    params, metadata)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None
    if data[:4] == b"PK\x03\x04":  # a zip: numpy's npz
        try:
            # no pickled objects from an npz either
            f = np.load(io.BytesIO(data), allow_pickle=False)
            arrays = {k: f[k] for k in f.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{path}: unreadable npz ({_first_line(e)})") from None
        meta = {}
        if "config" in arrays:
            try:
                meta["config"] = dict(ast.literal_eval(str(arrays.pop("config"))))
            except (ValueError, TypeError, SyntaxError):
                raise ConversionError(f"{path}: its 'config' entry is not a Python dict "
                                      "literal") from None
        for prefix in ("param/params/", "params/"):
            if any(k.startswith(prefix) for k in arrays):
                # the fixture also holds inputs and outputs: skip them
                return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, meta
        return arrays, meta
    try:
        return find_official_params(safe_load_pickle(data))
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None


# -----------------------------------------------------------------------------
# config from shapes

# Heads per width in the presets (head dim 64, except huge: 1280 wide, 16 heads of 80). The decoder
# is 512 wide with 16 heads in every preset. Any other width needs --num-heads/--dec-num-heads or
# the file's own config.
ENCODER_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = {512: 16}


def _heads(width, flag, from_file, table, what, notes):
    if flag:
        return flag
    if from_file:
        return from_file
    if width in table:
        return table[width]
    if width % 64:
        raise ConversionError(f"{what} width {width} is not a preset width and not a multiple of "
                              f"64: pass the head count with --{what.replace(' ', '-')}")
    notes.append(f"{what}: width {width} is not a preset width; assumed head dim 64 "
                 f"({width // 64} heads)")
    return width // 64


def _depth(names, side):
    blocks = [int(m.group(1)) for n in names if (m := re.match(rf"{side}/Block_(\d+)/", n))]
    if not blocks:
        raise ConversionError(f"no {side}/Block_i parameters found")
    return max(blocks) + 1


def _shape(params, name):
    if name not in params:
        raise ConversionError(f"missing official parameter {name!r}")
    return params[name].shape


def infer_official_config(params, meta=None, image_size=None, text_len=None, num_heads=None,
                          dec_num_heads=None):
    """Our config from the shapes of official parameters. Head counts and the image/text geometry
    are not in the shapes: flags win, then the file's own config (the fixture's "config" entry),
    then the presets' rule and the defaults (256 px, 64 tokens). Returns (config, notes on what was
    assumed)."""
    from model import M3AEConfig

    file_cfg = dict((meta or {}).get("config") or {})
    variant = (meta or {}).get("variant") or {}
    # the pickle's "variant": the training script's flags (its data config has image_size,
    # tokenizer_max_length) or what to-official writes
    for ours, theirs in (("image_size", "data.image_size"),
                         ("text_len", "data.tokenizer_max_length"), ("num_heads", "m3ae.num_heads"),
                         ("dec_num_heads", "m3ae.dec_num_heads")):
        for key in (ours, theirs):
            value = variant.get(key)
            if ours not in file_cfg and isinstance(value, (int, np.integer)) and value > 0:
                file_cfg[ours] = int(value)
    notes = []
    emb_dim = _shape(params, "cls_token")[-1]
    dec_emb_dim = _shape(params, "decoder_input_projection/kernel")[1]
    patch_rows = _shape(params, "image_embedding/kernel")[0]
    patch_size = math.isqrt(patch_rows // 3)
    if patch_size * patch_size * 3 != patch_rows:
        raise ConversionError(f"official parameter 'image_embedding/kernel' has {patch_rows} rows, "
                              "not p*p*3")
    image_size = image_size or file_cfg.get("image_size") or 256
    cfg = M3AEConfig(
        image_size=image_size,
        patch_size=patch_size,
        vocab_size=_shape(params, "text_embedding/embedding")[0],
        text_len=text_len or file_cfg.get("text_len") or 64,
        emb_dim=emb_dim,
        depth=_depth(params, "encoder"),
        num_heads=_heads(emb_dim, num_heads, file_cfg.get("num_heads"), ENCODER_HEADS, "num heads",
                         notes),
        dec_emb_dim=dec_emb_dim,
        dec_depth=_depth(params, "decoder"),
        dec_num_heads=_heads(dec_emb_dim, dec_num_heads, file_cfg.get("dec_num_heads"),
                             DECODER_HEADS, "dec num heads", notes),
        mlp_ratio=_shape(params, "encoder/Block_0/TransformerMLP_0/fc1/kernel")[1] / emb_dim,
        gelu="tanh",  # official numerics (flax nn.gelu)
        ln_eps=1e-6,
    )
    if cfg.image_size % cfg.patch_size:
        raise ConversionError(f"image size {cfg.image_size} is not a multiple of the patch size "
                              f"{cfg.patch_size}")
    return cfg, notes


# -----------------------------------------------------------------------------
# building and checking the model


def build_model(config, state, allow_missing=False, source_name=None):
    """M3AE(config) with `state` loaded; every converted tensor must exist in the model with the
    same shape. With allow_missing, model parameters absent from `state` keep their initialisation;
    returns (model, missing). source_name(our name) -> the checkpoint's own name, for error
    messages."""
    from model import M3AE

    def named(name):
        theirs = source_name(name) if source_name else None
        return f"{name!r}" + (f" (checkpoint {theirs!r})" if theirs and theirs != name else "")

    torch.manual_seed(0)  # parameters a source lacks get a reproducible initialisation
    model = M3AE(config)
    expected = model.state_dict()
    for name, value in state.items():
        if name not in expected:
            raise ConversionError(f"converted parameter {named(name)} does not exist in the model")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ConversionError(f"shape mismatch for {named(name)}: converted "
                                  f"{tuple(value.shape)}, model {tuple(expected[name].shape)} for "
                                  "the inferred config")
    missing = [n for n in expected if n not in state]
    if missing and not allow_missing:
        raise ConversionError(f"checkpoint lacks {len(missing)} parameter(s), first "
                              f"{named(missing[0])}")
    full = {**expected, **state}
    model.load_state_dict(full, strict=True)  # the final word: every key used, none left over
    return model, missing


def convert_official(path, image_size=None, text_len=None, num_heads=None, dec_num_heads=None):
    """Official checkpoint file -> (model, notes)."""
    params, meta = read_official(path)
    refuse_non_finite(params, path)
    config, notes = infer_official_config(params, meta, image_size, text_len, num_heads,
                                          dec_num_heads)
    model, _ = build_model(config, official_to_state_dict(params), source_name=our_name_to_official)
    return model, notes, meta


# -----------------------------------------------------------------------------
# facebookresearch/mae (timm names) -> our image path

_MAE_RENAMES = [  # (mae regex, our template); the block internals already share timm's names
    (r"blocks\.(\d+)\.(.+)", r"encoder.blocks.\1.\2"),
    (r"decoder_blocks\.(\d+)\.(.+)", r"decoder.blocks.\1.\2"),
    (r"norm\.(weight|bias)", r"encoder.norm.\1"),
    (r"decoder_norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"patch_embed\.proj\.bias", "patch_embed.bias"),
    (r"decoder_embed\.(weight|bias)", r"decoder_embed.\1"),
    (r"decoder_pred\.(weight|bias)", r"image_head.\1"),
    (r"mask_token", "image_mask_token"),
    (r"cls_token", "cls_token"),
]
_MAE_FIXED = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos tables: we recompute them
_TEXT_PATH = {"text_embed.weight", "enc_text_type", "dec_text_type", "text_mask_token",
              "text_head.weight", "text_head.bias"}  # what mae cannot provide


def _mae_name(ours):
    """Our name -> mae's, for error messages (the inverse of _MAE_RENAMES and the patch
    embedding)."""
    for a, b in (("encoder.blocks.", "blocks."), ("decoder.blocks.", "decoder_blocks."),
                 ("encoder.norm.", "norm."), ("decoder.norm.", "decoder_norm."),
                 ("image_head.", "decoder_pred."), ("patch_embed.", "patch_embed.proj."),
                 ("image_mask_token", "mask_token")):
        if ours.startswith(a):
            return b + ours[len(a):]
    return ours


def mae_to_state_dict(mae_state):
    """mae's state_dict -> ours (image path only). The Conv2d patch embedding (D, C, p, p) becomes
    our Linear over patches flattened (row, col, channel): permute to (D, p, p, C), then flatten."""
    state = {}
    for name, value in mae_state.items():
        if name in _MAE_FIXED:
            continue
        value = value.detach().float()
        if name == "patch_embed.proj.weight":
            if value.ndim != 4:
                raise ConversionError(f"mae parameter {name!r} must be a (D, C, p, p) conv weight, "
                                      f"got {tuple(value.shape)}")
            state["patch_embed.weight"] = value.permute(0, 2, 3, 1).reshape(
                value.size(0), -1).contiguous()
            continue
        for pattern, template in _MAE_RENAMES:
            if re.fullmatch(pattern, name):
                state[re.sub(pattern, template, name)] = value.clone()
                break
        else:
            raise ConversionError(f"unknown mae parameter {name!r}")
    return state


def infer_mae_config(mae_state, image_size=None, vocab_size=None, text_len=None, num_heads=None,
                     dec_num_heads=None):
    """Our config for a mae state_dict: widths and depths from shapes, image size from pos_embed
    (else 224), erf GELU (timm's), and the text geometry from the flags (mae has none). Returns
    (config, notes)."""
    from model import M3AEConfig

    def shape(name):
        if name not in mae_state:
            raise ConversionError(f"missing mae parameter {name!r}")
        return tuple(mae_state[name].shape)

    def depth(prefix):
        ids = [int(m.group(1)) for n in mae_state if (m := re.match(rf"{prefix}\.(\d+)\.", n))]
        if not ids:
            raise ConversionError(f"no mae parameters {prefix}.i.* found")
        return max(ids) + 1

    notes = []
    D, C, p, _ = shape("patch_embed.proj.weight")
    Dd = shape("decoder_embed.weight")[0]
    if "pos_embed" in mae_state:  # (1, 1 + grid**2, D): the grid the model was trained on
        grid = math.isqrt(shape("pos_embed")[1] - 1)
        if image_size and image_size != grid * p:
            notes.append(f"pos_embed says {grid * p} px; using --image-size {image_size}")
        image_size = image_size or grid * p
    cfg = M3AEConfig(
        image_size=image_size or 224,  # mae trains at 224 px
        patch_size=p,
        in_chans=C,
        vocab_size=vocab_size or M3AEConfig.vocab_size,
        text_len=text_len or 64,
        emb_dim=D,
        depth=depth("blocks"),
        num_heads=_heads(D, num_heads, None, ENCODER_HEADS, "num heads", notes),
        dec_emb_dim=Dd,
        dec_depth=depth("decoder_blocks"),
        dec_num_heads=_heads(Dd, dec_num_heads, None, DECODER_HEADS, "dec num heads", notes),
        mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / D,
        gelu="none",  # timm's nn.GELU: exact erf, not official's tanh
        ln_eps=1e-6,
    )
    return cfg, notes


def _torch_why(e):
    """The line of torch.load's many-line message that says what was wrong."""
    lines = [l.strip()
             for l in str(e).splitlines() if "WeightsUnpickler error" in l or "Unsupported" in l]
    return (lines[-1] if lines else _first_line(e))[:200]


def _torch_load(path):
    """torch.load(weights_only=True), without torch's warnings: a pickle torch did not write
    (protocol 4) draws a UserWarning on stderr, which would turn a one-line refusal into four."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def load_mae_checkpoint(path):
    """torch.load with weights_only=True. The real mae checkpoints also store the training
    argparse.Namespace under "args", which weights_only refuses; we then allow exactly that one
    class (torch's safe_globals) and nothing else, rather than falling back to an unrestricted
    load."""
    import argparse as _argparse

    try:
        try:
            ckpt = _torch_load(path)
        except pickle.UnpicklingError as e:
            if "argparse.Namespace" not in str(e):
                raise
            with torch.serialization.safe_globals([_argparse.Namespace]):
                ckpt = _torch_load(path)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None
    except Exception as e:
        raise ConversionError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: "
                              f"{_torch_why(e)})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected {{'model': state_dict}} or a state_dict of "
                              "tensors")
    return state


def _split_pos_table(table, dim, grid_size, what, notes):
    """A mae position table (1, 1 + N, dim) -> (its CLS row (dim,), the constant it adds to every
    patch row (1, 1, dim)). Our positions are fixed sin-cos: mae's own table is exactly that
    (constant 0), and to-mae writes sin-cos plus our image type embedding, which comes back here as
    that embedding. Anything else (a learned or interpolated table) cannot be represented: we warn
    and use our sin-cos table alone."""
    from model import sincos_2d

    if tuple(table.shape) != (1, 1 + grid_size**2, dim):
        # --image-size chose another grid: nothing to compare
        notes.append(f"mae's {what} is {tuple(table.shape)}, not for a {grid_size}x{grid_size} "
                     "grid: ignored")
        return torch.zeros(dim), torch.zeros(1, 1, dim)
    offset = table[0, 1:].float() - sincos_2d(dim, grid_size)  # (N, dim)
    constant = offset.mean(dim=0)
    spread = (offset - constant).abs().max().item()
    if spread > 1e-4:
        notes.append(f"WARNING: mae's {what} is not our sin-cos table plus a constant (off by "
                     f"{spread:.2e}): our fixed positions replace it")
        constant = torch.zeros(dim)
    elif constant.abs().max() <= 1e-6:  # mae's own table (computed in numpy): rounding noise only
        constant = torch.zeros(dim)
    else:
        notes.append(f"mae's {what} is our sin-cos table plus a constant (what to-mae writes): "
                     "taken back as the image type embedding")
    return table[0, 0].float(), constant.reshape(1, 1, dim)


def convert_mae(path_or_state, image_size=None, vocab_size=None, text_len=None, num_heads=None,
                dec_num_heads=None):
    """mae checkpoint (path or state_dict) -> (model, notes, missing). The image path computes
    exactly mae's: positions are our sin-cos table (mae's), the image type embeddings are zero (mae
    has none) unless the position tables carry one folded in by to-mae, which is taken back. The
    text path stays initialised."""
    mae_state = (load_mae_checkpoint(path_or_state) if isinstance(path_or_state, str)
                 else path_or_state)
    refuse_non_finite(mae_state,
                      path_or_state if isinstance(path_or_state, str) else "mae state_dict")
    config, notes = infer_mae_config(mae_state, image_size, vocab_size, text_len, num_heads,
                                     dec_num_heads)
    state = mae_to_state_dict(mae_state)
    state["enc_image_type"] = torch.zeros(1, 1, config.emb_dim)
    state["dec_image_type"] = torch.zeros(1, 1, config.dec_emb_dim)
    if "pos_embed" in mae_state:
        cls_row, state["enc_image_type"] = _split_pos_table(mae_state["pos_embed"], config.emb_dim,
                                                            config.grid_size, "pos_embed", notes)
        if cls_row.any() and "cls_token" in state:
            # mae adds this row to CLS; our CLS has no position
            state["cls_token"] = state["cls_token"] + cls_row
    if "decoder_pos_embed" in mae_state:
        cls_row, state["dec_image_type"] = _split_pos_table(mae_state["decoder_pos_embed"],
                                                            config.dec_emb_dim, config.grid_size,
                                                            "decoder_pos_embed", notes)
        if cls_row.abs().max() > 1e-6:
            notes.append("WARNING: mae's decoder_pos_embed has a non-zero CLS row, which we cannot "
                         "represent")
    model, missing = build_model(config, state, allow_missing=True, source_name=_mae_name)
    lacking = [n for n in missing if n not in _TEXT_PATH]
    if lacking:
        # only the text path may be missing: an image-path parameter left at its init would be
        # silent
        raise ConversionError(f"mae checkpoint lacks {len(lacking)} parameter(s), first "
                              f"{_mae_name(lacking[0])!r}")
    return model, notes, missing


# -----------------------------------------------------------------------------
# ours -> official, timm and mae files


def read_ours(ckpt_path):
    """Our checkpoint (train.py's or convert.py's) -> (checkpoint dict, M3AEConfig); ConversionError
    naming the file if it is not one: unreadable, no config, a "model" that is not exactly
    M3AE(config)'s parameters (names and shapes, compared on the meta device: nothing allocated), or
    weights that are not finite."""
    from model import M3AE, M3AEConfig

    try:
        ckpt = _torch_load(ckpt_path)
        config = M3AEConfig(**ckpt["config"])
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in M3AE(config).state_dict().items()}
        state = ckpt["model"]
        found = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    except Exception as e:
        raise ConversionError(f"{ckpt_path}: not a checkpoint of ours ({type(e).__name__}: "
                              f"{_torch_why(e)})") from None
    if found != expected or len(state) != len(found):
        wrong = ([k for k in expected if found.get(k) != expected[k]]
                 + [k for k in state if k not in expected])
        raise ConversionError(f"{ckpt_path}: not a checkpoint of ours: its \"model\" does not "
                              f"match its config ({len(wrong)} parameter(s) missing, extra or of "
                              f"another shape, first {wrong[0]!r})")
    refuse_non_finite(state, ckpt_path)
    return ckpt, config


def write_official(ckpt_path, out_path):
    """Our checkpoint -> the official flat names. .npz: "/"-joined names plus a "config" string;
    .pkl: the training script's layout, {"step", "epoch", "variant", "state"} with
    state.params["params"] nested, where state is a types.SimpleNamespace (what official's
    load_checkpoint/linear_main read: state.params)."""
    ckpt, config = read_ours(ckpt_path)
    flat = ours_to_official(ckpt["model"])
    official_cfg = {k: getattr(config, k) for k in ("emb_dim", "depth", "num_heads", "dec_emb_dim",
                                                    "dec_depth", "dec_num_heads", "mlp_ratio",
                                                    "image_size", "patch_size", "text_len",
                                                    "vocab_size")}
    if out_path.endswith(".pkl"):
        import types

        nested = {}
        for name, value in flat.items():
            *parents, leaf = name.split("/")
            node = nested
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        data = {"step": int(ckpt.get("step", 0) or 0), "epoch": 0, "variant": official_cfg,
                "state": types.SimpleNamespace(params={"params": nested})}
        write_output(out_path, lambda f: pickle.dump(data, f))
    else:
        write_output(official_out_path(out_path),
                     lambda f: np.savez(f, config=np.array(repr(official_cfg)), **flat))
    return flat, config


def official_out_path(out_path):
    """Where to-official writes: OUT as given for .pkl and .npz, else OUT.npz (numpy's own rule)."""
    return out_path if out_path.endswith((".pkl", ".npz")) else out_path + ".npz"


def _image_pos_table(dim, grid_size, type_embedding):
    """timm/mae's position table (1, 1 + N, dim): a zero row for CLS, then our fixed sin-cos
    positions plus our image type embedding. timm and mae have no type embeddings; ours is added to
    every patch before masking, exactly as a position row is, so adding it into every patch row of
    the table is exact."""
    from model import sincos_2d

    table = sincos_2d(dim, grid_size) + type_embedding.detach().float().reshape(1, dim)
    return torch.cat([table.new_zeros(1, dim), table])[None].contiguous()


def _conv_patch_weight(weight, patch_size, in_chans):
    """Our patch Linear weight (D, p*p*C), over patches flattened (row, col, channel) -> a Conv2d
    weight (D, C, p, p), the inverse of what mae_to_state_dict does."""
    return weight.detach().float().reshape(weight.size(0), patch_size, patch_size, in_chans) \
        .permute(0, 3, 1, 2).contiguous()


def ours_to_timm(state, config):
    """Our encoder -> a state_dict for timm's VisionTransformer with a class token,
    global_pool="token" and no head (num_classes=0): cls_token, pos_embed (the image type embedding
    folded in), patch_embed.proj (a conv), blocks.i.* (timm's names already), norm. Our
    encode(images) CLS is timm's forward_features(x)[:, 0]."""
    out = {"cls_token": state["cls_token"],
           "pos_embed": _image_pos_table(config.emb_dim, config.grid_size, state["enc_image_type"]),
           "patch_embed.proj.weight": _conv_patch_weight(state["patch_embed.weight"],
                                                         config.patch_size, config.in_chans),
           "patch_embed.proj.bias": state["patch_embed.bias"]}
    for name, value in state.items():
        if name.startswith(("encoder.blocks.", "encoder.norm.")):
            out[name[len("encoder."):]] = value
    return {name: value.detach().float().clone() for name, value in out.items()}


def ours_to_mae(state, config):
    """Our image path -> mae's MaskedAutoencoderViT state_dict: the encoder as in ours_to_timm, and
    the decoder under mae's names (decoder_embed, mask_token, decoder_pos_embed with our decoder
    image type folded in the same way, decoder_blocks.i.*, decoder_norm, decoder_pred). Returns
    (state_dict, our parameters left out: the text path, which mae does not have)."""
    out = ours_to_timm(state, config)
    out["decoder_pos_embed"] = _image_pos_table(config.dec_emb_dim, config.grid_size,
                                                state["dec_image_type"])
    done = {"cls_token", "patch_embed.weight", "patch_embed.bias", "enc_image_type",
            "dec_image_type"}
    left_out = []
    for name, value in state.items():
        if name in done or name.startswith("encoder."):
            continue
        if name in _TEXT_PATH:
            left_out.append(name)
        else:
            out[_mae_name(name)] = value.detach().float().clone()
    return out, left_out


def _export_notes(config):
    """What the export changes, and how to build the matching timm/mae model."""
    notes = ["our image type embedding is folded into pos_embed's patch rows (exact: both are "
             "added to every patch); pos_embed holds our fixed sin-cos table with a zero CLS row, "
             "as mae's"]
    if config.gelu != "none":
        notes.append(f"this model uses GELU approximate={config.gelu!r} (the official weights); "
                     "timm and mae default to the exact erf GELU, which differs by ~1e-3 per "
                     "layer: for identical outputs build the model with "
                     f"act_layer=functools.partial(torch.nn.GELU, approximate={config.gelu!r})")
    if config.ln_eps != 1e-6:
        notes.append(f"LayerNorm eps is {config.ln_eps:g} here, 1e-6 in timm's ViT and mae")
    return notes


# -----------------------------------------------------------------------------
# command line


def _save(model, out_path, source, **extra):
    from checkpoint import checkpoint_dict

    ckpt = checkpoint_dict(model, source=source, **extra)
    write_output(out_path, lambda f: torch.save(ckpt, f))


def write_output(out_path, write):
    """write(f) into a temp file beside out_path (<out>.m3ae-tmp.<pid>, a name only this project
    makes), then os.replace: an interrupted or failed conversion never leaves a partial output, nor
    an old one half overwritten. The temp file is removed on any failure; an OSError becomes a
    ConversionError naming the output (a full disk says so)."""
    try:
        write_atomic(out_path, write)
    except DiskFull:
        raise ConversionError(f"no space left on the device of "
                              f"{os.path.dirname(os.path.abspath(out_path))} while writing "
                              f"{out_path}; nothing written") from None
    except OSError as e:
        raise ConversionError(f"cannot write {out_path} ({e.strerror or e})") from None


def check_out(out_path, inputs):
    """Before any work: refuse an output that is a folder, whose folder does not exist, or that is
    one of the inputs (the conversion would replace the file it reads). inputs: (flag, path)
    pairs."""
    if os.path.isdir(out_path):
        raise ConversionError(f"output {out_path} is a folder: give the path of the file to write")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise ConversionError(f"output {out_path}: no folder {folder} to write it in")
    for flag, path in inputs:
        if (path and os.path.exists(path) and os.path.exists(out_path)
                and os.path.samefile(path, out_path)):
            raise ConversionError(f"output {out_path} is the input {flag} {path}: write the output "
                                  "elsewhere")
    refused = foreign_output(out_path, "pickle" if out_path.endswith(".pkl") else "zip")
    if refused:
        raise ConversionError(f"output {refused}")


def _print_config(config):
    print(f"config: {config.emb_dim}/{config.depth}/{config.num_heads} (width/depth/heads), "
          f"decoder {config.dec_emb_dim}/{config.dec_depth}/{config.dec_num_heads}, mlp ratio "
          f"{config.mlp_ratio:g}, {config.image_size} px / patch {config.patch_size}, vocab "
          f"{config.vocab_size}, text {config.text_len}, gelu {config.gelu}")


def _print_recorded(config, data, tok, tok_path):
    if tok is not None:
        print(f"recorded tokenizer: {tok.kind}, {tok.vocab_size} tokens, from {tok_path}")
    mean, std = (", ".join(f"{v:g}" for v in data[k]) for k in ("mean", "std"))
    print(f"recorded preprocessing: {data['source']}: mean ({mean}), std ({std}); images "
          f"{config.image_size} px, captions {config.text_len} tokens")


def _vit_name(config, mae=False):
    """timm's / mae's model name for our encoder geometry, or None when none matches."""
    names = {(384, 12, 6, 16): "vit_small_patch16", (768, 12, 12, 16): "vit_base_patch16",
             (1024, 24, 16, 16): "vit_large_patch16", (1280, 32, 16, 14): "vit_huge_patch14"}
    name = names.get((config.emb_dim, config.depth, config.num_heads, config.patch_size))
    if name is None or (mae and name == "vit_small_patch16"):
        # mae defines base, large and huge only
        return None
    return name if mae else f"{name}_224"


def main(argv=None):
    parser = make_parser(__doc__.split("\n\n")[0], prog="convert.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("official", "official JAX checkpoint (pickle or .npz) -> ours"),
                        ("mae", "facebookresearch/mae checkpoint -> ours (image path)")):
        p = sub.add_parser(name, help=help_, formatter_class=HelpFormatter)
        p.add_argument("ckpt")
        p.add_argument("out")
        p.add_argument("--image-size", type=int,
                       help="default: the file's own, else 256 (official) / 224 (mae)")
        p.add_argument("--text-len", type=int, help="default: the file's own, else 64")
        p.add_argument("--num-heads", type=int,
                       help="default: the presets' rule (head dim 64; 1280 -> 16)")
        p.add_argument("--dec-num-heads", type=int, help="default: 16 for a 512-wide decoder")
        if name == "official":
            p.add_argument("--tokenizer", help="bert-base-uncased's vocab.txt (30522 lines; or any "
                           "WordPiece vocab.txt or sentencepiece model with as many tokens as the "
                           "text embedding has rows): recorded in the checkpoint")
        else:
            p.add_argument("--tokenizer", help="a tokenizer (sentencepiece model or WordPiece "
                           "vocab.txt) for the initialised text path: sets its vocabulary size, "
                           "recorded in the checkpoint")
            p.add_argument("--vocab-size", type=int, help="text vocabulary of the (initialised) "
                           "text path (default: the --tokenizer's size, else 32000)")
    for name, help_ in (("to-official",
                         "ours -> official flat names (.npz, or .pkl for official scripts)"),
                        ("to-timm", "our encoder -> a timm VisionTransformer state_dict (no head)"),
                        ("to-mae",
                         "our image path -> a facebookresearch/mae checkpoint {'model': ...}")):
        p = sub.add_parser(name, help=help_, formatter_class=HelpFormatter)
        p.add_argument("ckpt")
        p.add_argument("out")
    args = parser.parse_args(argv)
    out = official_out_path(args.out) if args.command == "to-official" else args.out

    try:
        check_out(out, [("CKPT", args.ckpt), ("--tokenizer", getattr(args, "tokenizer", None))])
        if args.command == "official":
            # a wrong file fails before the work
            tok = read_tokenizer(args.tokenizer) if args.tokenizer else None
            model, notes, meta = convert_official(args.ckpt, args.image_size, args.text_len,
                                                  args.num_heads, args.dec_num_heads)
            config = model.config
            _print_config(config)
            for note in notes:
                print(note)
            extra = {"data": OFFICIAL_DATA}
            if tok is not None:
                check_vocab_size(tok, config.vocab_size, args.tokenizer,
                                 hint=" (the official weights need bert-base-uncased's vocab.txt, "
                                      "30522 lines)")
                extra["tokenizer"] = tokenizer_entry(tok)
            _print_recorded(config, OFFICIAL_DATA, tok, args.tokenizer)
            if tok is None:
                print("no tokenizer recorded: pass --tokenizer vocab.txt (bert-base-uncased's) to "
                      "make the checkpoint self-contained")
            _save(model, args.out, {"format": "official", "path": os.path.abspath(args.ckpt),
                                    "step": meta.get("step", -1)}, **extra)
        elif args.command == "mae":
            tok = read_tokenizer(args.tokenizer) if args.tokenizer else None
            vocab_size = args.vocab_size
            if tok is not None:
                if vocab_size and vocab_size != tok.vocab_size:
                    raise ConversionError(f"--vocab-size {vocab_size} disagrees with --tokenizer "
                                          f"{args.tokenizer} ({tok.vocab_size} tokens): give one "
                                          "of them")
                vocab_size = tok.vocab_size
            model, notes, missing = convert_mae(args.ckpt, args.image_size, vocab_size,
                                                args.text_len, args.num_heads, args.dec_num_heads)
            _print_config(model.config)
            for note in notes:
                print(note)
            if not model.enc_image_type.any():
                print("image/decoder type embeddings set to zero (mae has none): the image path is "
                      "mae's exactly")
            print(f"not in the mae checkpoint, left initialised ({len(missing)}): "
                  f"{', '.join(missing)}")
            extra = {"data": MAE_DATA}
            if tok is not None:
                extra["tokenizer"] = tokenizer_entry(tok)
            _print_recorded(model.config, MAE_DATA, tok, args.tokenizer)
            _save(model, args.out, {"format": "mae", "path": os.path.abspath(args.ckpt)}, **extra)
        elif args.command == "to-official":
            flat, config = write_official(args.ckpt, args.out)
            _print_config(config)
            print(f"wrote {len(flat)} official parameters")
        else:
            ckpt, config = read_ours(args.ckpt)
            _print_config(config)
            for note in _export_notes(config):
                print(note)
            if args.command == "to-timm":
                state = ours_to_timm(ckpt["model"], config)
                write_output(args.out, lambda f: torch.save(state, f))
                name = _vit_name(config)
                print(f"wrote {len(state)} timm tensors; load them with strict=True into "
                      + (f'timm.create_model("{name}", img_size={config.image_size}, num_classes=0)'
                         if name else f"timm's VisionTransformer(img_size={config.image_size}, "
                         f"patch_size={config.patch_size}, embed_dim={config.emb_dim}, "
                         f"depth={config.depth}, num_heads={config.num_heads}, "
                         f"mlp_ratio={config.mlp_ratio:g}, num_classes=0)"))
            else:
                state, left_out = ours_to_mae(ckpt["model"], config)
                write_output(args.out, lambda f: torch.save({"model": state}, f))
                name = _vit_name(config, mae=True)
                print(f"wrote {len(state)} mae tensors; left out (mae has no text path): "
                      f"{', '.join(left_out)}")
                print("fine-tune with mae's main_finetune.py --finetune " + args.out
                      + (f" --model {name}" if name else "") + f" --input_size {config.image_size} "
                      "(add --cls_token to classify from CLS as our probe does; mae's default "
                      "global pooling drops our final norm)")
            data = ckpt.get("data")
            if data:
                mean, std = (", ".join(f"{v:g}" for v in data[k]) for k in ("mean", "std"))
                print(f"normalise inputs as the checkpoint says: mean ({mean}), std ({std}) "
                      f"[{data['source']}]")
    except ConversionError as e:
        return _error(str(e), args)
    except Exception as e:
        # anything else a malformed input provokes in numpy or torch: one line, not a traceback
        return _error(f"cannot convert it ({type(e).__name__}: {_first_line(e)})", args)
    print(f"wrote {out}")
    return 0


def _error(message, args):
    """Print one line, `convert.py: error: ...` (argparse's form) naming the input, and return exit
    code 2."""
    if args.ckpt not in message and not message.startswith(("--", "output ")):
        message = f"{args.ckpt}: {message}"
    print(f"convert.py: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
