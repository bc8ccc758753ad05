"""convert.py: official <-> ours name mapping, the official pickle/npz readers (and their refusal to run code),
mae -> ours, error messages, the command line, the tokenizer and preprocessing a checkpoint records, and the
exports to timm and mae."""

import argparse
import collections
import io
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import checkpoint_dict, load_model
import convert
from convert import (ConversionError, SafeUnpickler, StandIn, build_model, config_from_official, convert_mae,
                     convert_official, official_name_to_ours, official_to_state_dict, our_name_to_official,
                     ours_to_mae, ours_to_official, safe_load_pickle)
from model import M3AE, sincos_2d
from tokenizer import WordPiece, tokenizer_from_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_m3ae_tiny.npz")


def fixture_params():
    f = np.load(FIXTURE)
    return {k[len("param/params/"):]: f[k] for k in f.files if k.startswith("param/params/")}


def unflatten(flat):
    nested = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def fixture_images():
    return torch.from_numpy(np.load(FIXTURE)["image_nhwc"]).permute(0, 3, 1, 2).contiguous()


# -----------------------------------------------------------------------------
# names


def test_round_trip_official_ours_official_is_bit_identical():
    params = fixture_params()
    ours = official_to_state_dict(params)
    # every official name used once, no two onto one, our state_dict covered exactly
    assert len({official_name_to_ours(n) for n in params}) == len(params) == len(ours)
    cfg = config_from_official(dict(emb_dim=64, depth=2, num_heads=4, dec_emb_dim=32, dec_depth=2, dec_num_heads=4,
                                    image_size=32, patch_size=8, text_len=16, vocab_size=100))
    assert set(ours) == set(M3AE(cfg).state_dict())
    back = ours_to_official(ours)
    assert set(back) == set(params)
    for name, value in params.items():
        assert back[name].dtype == np.float32 and np.array_equal(back[name], value), name
        assert our_name_to_official(official_name_to_ours(name)) == name


# -----------------------------------------------------------------------------
# official: npz and pickle through the command line


def test_cli_official_npz_reproduces_fixture(tmp_path, capsys):
    out = str(tmp_path / "ours.pt")
    assert convert.main(["official", FIXTURE, out]) == 0
    assert "64/2/4" in capsys.readouterr().out  # the inferred config is printed
    model, ckpt = load_model(out)  # weights_only=True inside
    assert ckpt["source"]["format"] == "official"
    with torch.no_grad():
        cls, tok = model.encode(fixture_images())
    expected = torch.from_numpy(np.load(FIXTURE)["representation_image_only"])
    assert (torch.cat([cls[:, None], tok], 1) - expected).abs().max() <= 1e-5


class TrainStateLike:
    """Stands for flax's TrainState in the pickle: the converter must never import it."""

    def __init__(self, params):
        self.step = np.int64(7)
        self.params = params
        self.opt_state = (collections.OrderedDict(mu=np.zeros(3, np.float32)),)


def test_official_pickle_layout_equals_npz(tmp_path):
    params = fixture_params()
    data = {"step": 7, "epoch": 1, "variant": {"m3ae.num_heads": 4, "m3ae.dec_num_heads": 4, "data.image_size": 32,
                                               "data.tokenizer_max_length": 16},
            "state": TrainStateLike({"params": unflatten(params)})}
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    from_pkl, _, meta = convert_official(str(path))
    from_npz, _, _ = convert_official(FIXTURE)
    assert meta["step"] == 7
    assert from_pkl.config == from_npz.config
    a, b = from_pkl.state_dict(), from_npz.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bare_nested_params_pickle_with_head_flags(tmp_path):
    path = tmp_path / "params.pkl"
    path.write_bytes(pickle.dumps({"params": unflatten(fixture_params())}, protocol=2))
    model, notes, _ = convert_official(str(path), image_size=32, text_len=16, num_heads=4, dec_num_heads=4)
    assert (model.config.num_heads, model.config.dec_num_heads, model.config.image_size) == (4, 4, 32)
    # without flags or a config entry, a 64-wide encoder is assumed to have head dim 64, and said so
    model, notes, _ = convert_official(str(path), dec_num_heads=4)
    assert model.config.num_heads == 1 and any("assumed head dim 64" in n for n in notes)
    assert model.config.image_size == 256 and model.config.text_len == 64  # the documented defaults


# -----------------------------------------------------------------------------
# the restricted unpickler


class Unknown:
    def __init__(self):
        self.weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
        self.tag = "x"


class WritesOnConstruction:
    """A class whose construction has an effect: as a stand-in, constructing it must do nothing."""

    def __init__(self, path):
        open(path, "w").close()

    def __reduce__(self):
        return WritesOnConstruction, (self.path,)


def write_sentinel(path):
    open(path, "w").close()


class CallsFunction:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_safe_unpickler_loads_data_and_stand_ins(protocol):
    obj = {"a": {"b": np.ones((2, 2), np.float32), "c": [np.int32(3), (1.5, "s")]}, "u": Unknown(),
           "od": collections.OrderedDict(k=np.float64(2.0)), "set": {1, 2}, "dt": np.dtype("float16")}
    out = safe_load_pickle(pickle.dumps(obj, protocol=protocol))
    assert np.array_equal(out["a"]["b"], obj["a"]["b"]) and out["a"]["b"].dtype == np.float32
    assert out["a"]["c"][0] == 3 and out["a"]["c"][1] == (1.5, "s")
    assert isinstance(out["od"], collections.OrderedDict) and out["set"] == {1, 2} and out["dt"] == np.float16
    u = out["u"]
    assert isinstance(u, StandIn) and not isinstance(u, Unknown) and u.origin.endswith("Unknown")
    assert np.array_equal(u.weights["w"], obj["u"].weights["w"]) and u.tag == "x"


@pytest.mark.parametrize("fn", ["os.system", "eval", "test_function"])
def test_safe_unpickler_refuses_functions_and_runs_nothing(tmp_path, fn):
    sentinel = tmp_path / "SENTINEL"
    payload = {"os.system": CallsFunction(os.system, f"touch {sentinel}"),
               "eval": CallsFunction(eval, f"open({str(sentinel)!r}, 'w')"),
               "test_function": CallsFunction(write_sentinel, str(sentinel))}[fn]
    data = pickle.dumps({"params": {"x": np.zeros(1)}, "evil": payload})
    with pytest.raises(ConversionError, match="refusing to load global"):
        safe_load_pickle(data)
    assert not sentinel.exists()
    # the same payload through the command line: one line, exit code 2, still nothing ran
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    assert convert.main(["official", str(path), str(tmp_path / "out.pt")]) == 2
    assert not sentinel.exists() and not (tmp_path / "out.pt").exists()


def test_safe_unpickler_constructs_unknown_classes_inertly(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    obj = WritesOnConstruction.__new__(WritesOnConstruction)
    obj.path = str(sentinel)
    out = safe_load_pickle(pickle.dumps(obj))
    assert isinstance(out, StandIn) and out.args == (str(sentinel),) and not sentinel.exists()


def test_cloudpickle_helpers_are_recorded_not_run(tmp_path, monkeypatch):
    """The official TrainState carries optax closures that cloudpickle stores by value, rebuilt on load by
    cloudpickle.cloudpickle._make_function(...). Simulated here with a fake module (cloudpickle itself is not
    installed): the call is recorded as a stand-in, never executed, and the parameters still come out."""
    import types

    sentinel = tmp_path / "SENTINEL"
    fake = types.ModuleType("cloudpickle.cloudpickle")

    def _make_function(*args):  # the real one builds a function; this one would leave a trace
        write_sentinel(str(sentinel))

    _make_function.__module__, _make_function.__qualname__ = fake.__name__, "_make_function"
    fake._make_function = _make_function
    monkeypatch.setitem(sys.modules, "cloudpickle", types.ModuleType("cloudpickle"))
    monkeypatch.setitem(sys.modules, "cloudpickle.cloudpickle", fake)
    state = TrainStateLike({"params": unflatten(fixture_params())})
    state.tx = CallsFunction(_make_function, b"code", {}, "init_fn", None, None)
    data = pickle.dumps({"step": 1, "epoch": 0, "variant": {}, "state": state}, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"_make_function" in data
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    model, _, _ = convert_official(str(path), image_size=32, text_len=16, num_heads=4, dec_num_heads=4)
    assert not sentinel.exists()
    assert torch.equal(model.cls_token, torch.from_numpy(fixture_params()["cls_token"]))


# -----------------------------------------------------------------------------
# mae -> ours


def mae_pos_embed(dim, grid):
    """mae's fixed table, written out from its description: (1 + grid**2, dim), a zero row for CLS, then per patch
    (row-major) the 1D sin|cos embedding of the column in the first half and of the row in the second half."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def emb_1d(pos):
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.divmod(np.arange(grid * grid), grid)
    table = np.concatenate([emb_1d(cols), emb_1d(rows)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table])[None]).float()


def synthetic_mae_state(D=32, depth=2, p=4, img=16, Dd=16, dec_depth=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    sd = {"cls_token": r(1, 1, D), "pos_embed": mae_pos_embed(D, img // p),
          "patch_embed.proj.weight": r(D, C, p, p), "patch_embed.proj.bias": r(D),
          "mask_token": r(1, 1, Dd), "decoder_pos_embed": mae_pos_embed(Dd, img // p)}
    for prefix, n, d in (("blocks", depth, D), ("decoder_blocks", dec_depth, Dd)):
        for i in range(n):
            b = f"{prefix}.{i}."
            sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                       b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                       b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(4 * d, d),
                       b + "mlp.fc1.bias": r(4 * d), b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d)})
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D), "decoder_embed.weight": r(Dd, D),
               "decoder_embed.bias": r(Dd), "decoder_norm.weight": 1 + r(Dd), "decoder_norm.bias": r(Dd),
               "decoder_pred.weight": r(p * p * C, Dd), "decoder_pred.bias": r(p * p * C)})
    return sd


def mae_encoder_by_hand(sd, images, num_heads, p, gelu="none"):
    """mae's encoder with no masking (also timm's VisionTransformer forward_features: same names, same
    computation), in plain torch ops on the original tensors. gelu "none" is timm's exact erf GELU; "tanh" the
    approximation the official weights were trained with (timm's act_layer=partial(nn.GELU, approximate='tanh'))."""

    def ln(x, prefix):
        return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)

    def linear(x, prefix):
        return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)  # (B, D, g, g)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    cls = sd["cls_token"] + sd["pos_embed"][:, :1]
    x = torch.cat([cls.expand(x.size(0), -1, -1), x], dim=1)
    B, T, D = x.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        qkv = linear(ln(x, b + "norm1"), b + "attn.qkv").reshape(B, T, 3, num_heads, D // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(D // num_heads)).softmax(-1) @ v
        x = x + linear(a.transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        h = linear(ln(x, b + "norm2"), b + "mlp.fc1")
        if gelu == "tanh":
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        else:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU, as timm's nn.GELU
        x = x + linear(h, b + "mlp.fc2")
        i += 1
    return ln(x, "norm")


def test_mae_pos_embed_is_our_sincos_table():
    for dim, grid in ((32, 4), (768, 14)):
        table = mae_pos_embed(dim, grid)
        assert torch.all(table[0, 0] == 0)
        assert (table[0, 1:] - sincos_2d(dim, grid)).abs().max() < 1e-6


def test_mae_mapping_matches_mae_encoder_computed_by_hand():
    sd = synthetic_mae_state()
    model, notes, missing = convert_mae(sd, num_heads=4, dec_num_heads=2, vocab_size=50, text_len=8)
    c = model.config
    assert (c.image_size, c.patch_size, c.emb_dim, c.depth, c.dec_emb_dim, c.dec_depth, c.gelu) == \
           (16, 4, 32, 2, 16, 2, "none")
    assert torch.all(model.enc_image_type == 0) and torch.all(model.dec_image_type == 0)
    assert torch.equal(model.image_mask_token, sd["mask_token"]) and torch.equal(model.image_head.weight,
                                                                                  sd["decoder_pred.weight"])
    assert torch.equal(model.decoder.norm.weight, sd["decoder_norm.weight"])
    assert set(missing) == {"text_embed.weight", "enc_text_type", "dec_text_type", "text_mask_token",
                            "text_head.weight", "text_head.bias"}
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls, tok = model.encode(images)
        expected = mae_encoder_by_hand(sd, images, num_heads=4, p=4)
    assert (torch.cat([cls[:, None], tok], 1) - expected).abs().max() < 1e-5


def test_cli_mae_checkpoint_with_argparse_namespace(tmp_path, capsys):
    sd = synthetic_mae_state()
    path, out = tmp_path / "mae.pth", tmp_path / "ours.pt"
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_tiny", lr=1e-3), "epoch": 3}, path)
    assert convert.main(["mae", str(path), str(out), "--num-heads", "4", "--dec-num-heads", "2",
                         "--vocab-size", "50"]) == 0
    printed = capsys.readouterr().out
    assert "text_embed.weight" in printed and "zero" in printed and "ImageNet" in printed
    model, ckpt = load_model(str(out))
    assert ckpt["data"]["mean"] == [0.485, 0.456, 0.406] and ckpt["data"]["std"] == [0.229, 0.224, 0.225]
    assert "tokenizer" not in ckpt
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    w = sd["patch_embed.proj.weight"]  # conv (D, C, p, p) -> Linear over (row, col, channel)
    assert torch.equal(model.patch_embed.weight, w.permute(0, 2, 3, 1).reshape(w.size(0), -1))


# -----------------------------------------------------------------------------
# errors name the parameter


def official_npz(tmp_path, params):
    path = tmp_path / "p.npz"
    np.savez(path, config=np.array(repr(dict(num_heads=4, dec_num_heads=4, image_size=32, text_len=16))),
             **{"param/params/" + k: v for k, v in params.items()})
    return str(path)


def test_error_unknown_official_key(tmp_path):
    params = {**fixture_params(), "encoder/Block_0/Extra_0/kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ConversionError, match="encoder/Block_0/Extra_0/kernel"):
        convert_official(official_npz(tmp_path, params))


def test_error_missing_official_key(tmp_path):
    params = fixture_params()
    del params["decoder/Block_1/LayerNorm_1/scale"]
    with pytest.raises(ConversionError, match="decoder/Block_1/LayerNorm_1/scale"):
        convert_official(official_npz(tmp_path, params))


def test_error_shape_mismatch(tmp_path):
    params = fixture_params()
    params["encoder/Block_1/TransformerMLP_0/fc2/kernel"] = np.zeros((255, 64), np.float32)
    with pytest.raises(ConversionError, match="shape mismatch.*encoder/Block_1/TransformerMLP_0/fc2/kernel"):
        convert_official(official_npz(tmp_path, params))


def test_error_mae_unknown_missing_and_shape():
    sd = synthetic_mae_state()
    with pytest.raises(ConversionError, match="blocks.0.attn.q_norm.weight"):
        convert_mae({**sd, "blocks.0.attn.q_norm.weight": torch.ones(8)}, num_heads=4, dec_num_heads=2)
    with pytest.raises(ConversionError, match="lacks.*'decoder_norm.bias'"):
        convert_mae({k: v for k, v in sd.items() if k != "decoder_norm.bias"}, num_heads=4, dec_num_heads=2)
    sd["decoder_blocks.1.mlp.fc1.bias"] = torch.zeros(7)
    with pytest.raises(ConversionError, match="decoder_blocks.1.mlp.fc1.bias"):
        convert_mae(sd, num_heads=4, dec_num_heads=2)


@pytest.mark.parametrize("command,content", [("official", os.urandom(4096)), ("mae", b"just some text\n" * 20)])
def test_cli_not_a_checkpoint_one_line_exit_2(tmp_path, command, content):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), command, str(path),
                        str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.py: error: ") and "Traceback" not in r.stderr


class RunsACommand:
    def __reduce__(self):
        return os.system, ("true",)


def write_bad_input(kind, tmp_path):
    """A bad CKPT argument for convert.py: its path."""
    path = tmp_path / f"{kind}.bin"
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 16)
    elif kind == "text":
        path.write_bytes(b"not a checkpoint at all\n" * 20)
    elif kind == "refused_pickle":  # protocol 4, a global that would run a command: torch also warns on stderr
        path.write_bytes(pickle.dumps({"a": RunsACommand()}, protocol=4))
    elif kind == "not_a_model":  # a torch file, but its "model" does not fit its config
        torch.save({"model": {"a": torch.zeros(1)}, "config": {}}, path)
    return path


@pytest.mark.parametrize("kind", ["missing", "folder", "garbage", "text", "refused_pickle", "not_a_model"])
def test_cli_every_bad_input_is_one_line_exit_2(tmp_path, kind):
    """Each command that reads a file, on each kind of bad file: exit 2, one line on stderr (argparse's form,
    naming the file), no traceback, nothing written."""
    path = write_bad_input(kind, tmp_path)
    for command in ("official", "mae", "to-timm"):
        out = tmp_path / f"out-{command}.pt"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), command, str(path), str(out)],
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (command, r.stderr)
        assert lines[0].startswith("convert.py: error: ") and str(path) in lines[0], (command, lines[0])
        assert not out.exists()


def test_non_finite_weights_are_refused_naming_them_and_nothing_written(tmp_path, capsys):
    """NaN or inf weights would convert without complaint and make every loss NaN far away: refused, exit 2,
    one line naming the first offending parameters by the file's own names, no output file."""
    params = fixture_params()
    params["encoder/Block_1/LayerNorm_0/scale"][3] = np.nan
    params["text_embedding/embedding"][0, 0] = np.inf
    official = official_npz(tmp_path, params)
    mae = tmp_path / "mae.pth"
    sd = synthetic_mae_state()
    sd["decoder_pred.bias"][0] = float("nan")
    torch.save({"model": sd}, mae)
    ours = tmp_path / "ours.pt"
    assert convert.main(["official", FIXTURE, str(ours)]) == 0
    ckpt = torch.load(ours, weights_only=True)
    ckpt["model"]["encoder.norm.weight"][0] = float("-inf")
    torch.save(ckpt, ours)
    capsys.readouterr()
    for argv, names in ((["official", official], "'encoder/Block_1/LayerNorm_0/scale', 'text_embedding/embedding'"),
                        (["mae", str(mae), "--num-heads", "4", "--dec-num-heads", "2"], "'decoder_pred.bias'"),
                        (["to-timm", str(ours)], "'encoder.norm.weight'")):
        out = tmp_path / "out.pt"
        assert convert.main(argv + [str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "non-finite weights (NaN or inf)" in err and argv[1] in err, err
        assert all(n.strip("'") in err for n in names.split(", ")), err
        assert not out.exists() and not [f for f in os.listdir(tmp_path) if "m3ae-tmp" in f]


def test_an_interrupted_conversion_leaves_no_partial_output(tmp_path, monkeypatch):
    """Outputs are written to <out>.m3ae-tmp.<pid> and moved into place: killed mid-write (here: interrupted
    while torch.save writes), the output is as it was before (absent, or the old file), and no temp file
    is left."""
    save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):  # (torch.save to a path: a partial file under the final name)
            f = open(f, "wb")
        f.write(b"half a checkpoint")
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    out = tmp_path / "ours.pt"
    with pytest.raises(KeyboardInterrupt):
        convert.main(["official", FIXTURE, str(out)])
    assert os.listdir(tmp_path) == []
    save({"older": torch.zeros(1)}, out)  # an earlier output (a file of another kind is never replaced)
    older = out.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        convert.main(["official", FIXTURE, str(out)])
    assert os.listdir(tmp_path) == ["ours.pt"] and out.read_bytes() == older
    monkeypatch.setattr(torch, "save", save)
    assert convert.main(["official", FIXTURE, str(out)]) == 0 and os.listdir(tmp_path) == ["ours.pt"]
    assert out.read_bytes() != older


def test_output_that_is_an_input_or_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    ours = tmp_path / "ours.pt"
    assert convert.main(["official", FIXTURE, str(ours)]) == 0
    before = ours.read_bytes()
    (tmp_path / "alias.pt").symlink_to(ours)
    (tmp_path / "folder").mkdir()
    capsys.readouterr()
    for argv, says in ((["to-timm", str(ours), str(ours)], "is the input CKPT"),
                       (["to-mae", str(ours), str(tmp_path / "alias.pt")], "is the input CKPT"),
                       (["to-official", str(ours), str(tmp_path / "ours")], None),  # writes ours.npz: fine
                       (["to-timm", str(ours), str(tmp_path / "folder")], "is a folder"),
                       (["to-timm", str(ours), str(tmp_path / "no" / "such" / "x.pt")], "no folder")):
        code = convert.main(argv)
        err = capsys.readouterr().err.strip()
        if says is None:
            assert code == 0 and (tmp_path / "ours.npz").exists()
            continue
        assert code == 2 and len(err.splitlines()) == 1 and says in err, err
        assert ours.read_bytes() == before  # the input is never touched
    assert convert.main(["official", str(tmp_path / "ours.npz"), str(tmp_path / "ours.npz")]) == 2


# -----------------------------------------------------------------------------
# ours -> official


def test_to_official_round_trip(tmp_path):
    ours = str(tmp_path / "ours.pt")
    assert convert.main(["official", FIXTURE, ours]) == 0
    params = fixture_params()
    # npz: the flat official names, bit-identical to the fixture's
    assert convert.main(["to-official", ours, str(tmp_path / "back.npz")]) == 0
    back = np.load(tmp_path / "back.npz")
    assert set(back.files) - {"config"} == set(params)
    assert all(np.array_equal(back[k], v) for k, v in params.items())
    # pkl: what the official scripts read (data["state"].params["params"], nested) with plain pickle
    assert convert.main(["to-official", ours, str(tmp_path / "back.pkl")]) == 0
    with open(tmp_path / "back.pkl", "rb") as f:
        data = pickle.load(f)
    kernel = data["state"].params["params"]["encoder"]["Block_0"]["Attention_0"]["Dense_0"]["kernel"]
    assert np.array_equal(kernel, params["encoder/Block_0/Attention_0/Dense_0/kernel"])
    # and both read back into the same model
    for name in ("back.npz", "back.pkl"):
        model, _, _ = convert_official(str(tmp_path / name))
        a, b = model.state_dict(), load_model(ours)[0].state_dict()
        assert model.config == load_model(ours)[0].config and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# what a converted checkpoint records: tokenizer and preprocessing


def write_vocab(path, n):
    """A WordPiece vocab.txt of n lines: [PAD], [UNK], then made-up words and continuations."""
    lines = ["[PAD]", "[UNK]"] + [f"w{i}" if i % 2 else f"##w{i}" for i in range(2, n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), lines


def test_cli_official_records_wordpiece_and_official_preprocessing(tmp_path, capsys):
    vocab, lines = write_vocab(tmp_path / "vocab.txt", 100)  # the fixture's text embedding has 100 rows
    out = str(tmp_path / "ours.pt")
    assert convert.main(["official", FIXTURE, out, "--tokenizer", vocab]) == 0
    printed = capsys.readouterr().out
    assert "recorded tokenizer: wordpiece, 100 tokens" in printed and "0.5762, 0.5503, 0.5213" in printed
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # bytes and plain lists only
    assert ckpt["data"] == {"mean": [0.5762, 0.5503, 0.5213], "std": [0.3207, 0.3169, 0.3307],
                            "source": ckpt["data"]["source"]} and "CC12M" in ckpt["data"]["source"]
    assert (ckpt["config"]["image_size"], ckpt["config"]["text_len"]) == (32, 16)  # the file's own geometry
    tok = tokenizer_from_bytes(ckpt["tokenizer"]["kind"], ckpt["tokenizer"]["blob"])
    assert isinstance(tok, WordPiece) and tok.tokens == lines
    # w5w4 = w5 ##w4; w5w7 has no ##w7 to finish it: [UNK]
    assert tok.encode("w3 W5w4 w5w7", 6)[0].tolist() == [3, 5, 4, 1, 0, 0]
    # the weights are still the fixture's
    model, _ = load_model(out)
    with torch.no_grad():
        cls, tokens = model.encode(fixture_images())
    expected = torch.from_numpy(np.load(FIXTURE)["representation_image_only"])
    assert (torch.cat([cls[:, None], tokens], 1) - expected).abs().max() <= 1e-5
    # without --tokenizer: the preprocessing is recorded all the same, and the missing tokenizer is pointed out
    assert convert.main(["official", FIXTURE, out]) == 0
    assert "--tokenizer" in capsys.readouterr().out
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert "tokenizer" not in ckpt and ckpt["data"]["mean"] == [0.5762, 0.5503, 0.5213]


@pytest.mark.parametrize("lines", [99, 101, "junk"])
def test_cli_official_refuses_a_tokenizer_that_does_not_fit(tmp_path, capsys, lines):
    if lines == "junk":
        vocab = str(tmp_path / "vocab.txt")
        (tmp_path / "vocab.txt").write_bytes(bytes(range(256)) * 8)  # neither kind
    else:
        vocab, _ = write_vocab(tmp_path / "vocab.txt", lines)
    out = tmp_path / "ours.pt"
    assert convert.main(["official", FIXTURE, str(out), "--tokenizer", vocab]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert.py: error: --tokenizer ") and vocab in err[0]
    assert ("100 rows" in err[0]) if lines != "junk" else ("neither" in err[0])
    assert not out.exists()


def test_cli_mae_tokenizer_sets_the_text_vocabulary(tmp_path, capsys):
    path, out = tmp_path / "mae.pth", tmp_path / "ours.pt"
    torch.save({"model": synthetic_mae_state()}, path)
    vocab, lines = write_vocab(tmp_path / "vocab.txt", 37)
    assert convert.main(["mae", str(path), str(out), "--num-heads", "4", "--dec-num-heads", "2",
                         "--tokenizer", vocab]) == 0
    model, ckpt = load_model(str(out))
    assert model.config.vocab_size == 37 and ckpt["tokenizer"]["kind"] == "wordpiece"
    assert convert.main(["mae", str(path), str(out), "--num-heads", "4", "--dec-num-heads", "2",
                         "--tokenizer", vocab, "--vocab-size", "50"]) == 2
    assert "--vocab-size 50" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# exports: ours -> timm, ours -> mae


def timm_vit_names(depth):
    """The state_dict names of timm's VisionTransformer with a class token and no head (num_classes=0)."""
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return names


def test_to_timm_reproduces_our_encoder(tmp_path):
    """The official fixture's weights (tanh GELU, LayerNorms and type embeddings away from their init) exported to
    timm's names, then run by the hand-written timm forward: the same features as model.encode(images)."""
    ours = str(tmp_path / "ours.pt")
    assert convert.main(["official", FIXTURE, ours]) == 0
    model, _ = load_model(ours)
    assert model.enc_image_type.abs().max() > 1e-3  # so that forgetting to fold it in would show
    out = str(tmp_path / "vit.pth")
    assert convert.main(["to-timm", ours, out]) == 0
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert set(sd) == timm_vit_names(model.config.depth)
    D, grid = model.config.emb_dim, model.config.grid_size
    assert sd["pos_embed"].shape == (1, 1 + grid * grid, D) and torch.all(sd["pos_embed"][0, 0] == 0)
    assert sd["patch_embed.proj.weight"].shape == (D, 3, model.config.patch_size, model.config.patch_size)
    images = fixture_images()
    with torch.no_grad():
        cls, tokens = model.encode(images)
        theirs = mae_encoder_by_hand(sd, images, model.config.num_heads, model.config.patch_size, gelu="tanh")
    assert (torch.cat([cls[:, None], tokens], 1) - theirs).abs().max() <= 1e-5


def test_mae_ours_mae_round_trip_is_bit_identical(tmp_path):
    sd = synthetic_mae_state()
    grid, D, Dd = 16 // 4, 32, 16
    # mae's fixed tables as our sin-cos function computes them, so that exact equality is a fair demand
    sd["pos_embed"] = torch.cat([torch.zeros(1, D), sincos_2d(D, grid)])[None]
    sd["decoder_pos_embed"] = torch.cat([torch.zeros(1, Dd), sincos_2d(Dd, grid)])[None]
    model, _, _ = convert_mae(sd, num_heads=4, dec_num_heads=2)
    back, left_out = ours_to_mae(model.state_dict(), model.config)
    assert set(back) == set(sd) and set(left_out) == convert._TEXT_PATH
    for name, value in sd.items():
        assert torch.equal(back[name], value), name
    # through the files: to-mae writes mae's checkpoint layout
    ours, out = str(tmp_path / "ours.pt"), str(tmp_path / "mae.pth")
    torch.save(checkpoint_dict(model), ours)
    assert convert.main(["to-mae", ours, out]) == 0
    written = torch.load(out, map_location="cpu", weights_only=True)
    assert set(written) == {"model"} and all(torch.equal(written["model"][k], v) for k, v in sd.items())
    # mae's own numpy-made tables: equal to rounding
    sd = synthetic_mae_state()
    model, _, _ = convert_mae(sd, num_heads=4, dec_num_heads=2)
    back, _ = ours_to_mae(model.state_dict(), model.config)
    for name, value in sd.items():
        assert (back[name] - value).abs().max() <= (1e-6 if "pos_embed" in name else 0), name


def test_ours_mae_ours_keeps_the_type_embeddings(tmp_path):
    """An M3AE exported to mae and read back: the type embeddings folded into mae's position tables come back."""
    ours = str(tmp_path / "ours.pt")
    assert convert.main(["official", FIXTURE, ours]) == 0
    model, _ = load_model(ours)
    sd, _ = ours_to_mae(model.state_dict(), model.config)
    back, notes, _ = convert_mae(sd, num_heads=4, dec_num_heads=4, vocab_size=100, text_len=16)
    assert any("taken back" in n for n in notes)
    a, b = model.state_dict(), back.state_dict()
    for name in a:
        if name in ("enc_image_type", "dec_image_type"):
            assert (a[name] - b[name]).abs().max() <= 1e-6, name
        elif name not in convert._TEXT_PATH:
            assert torch.equal(a[name], b[name]), name


def test_mae_position_tables_with_a_cls_row_or_a_constant_still_compute_mae(tmp_path):
    """A mae table whose CLS row is not zero (mae adds it to CLS) and whose patch rows carry a constant (what to-mae
    writes): the converted model still computes mae's encoder exactly."""
    sd = synthetic_mae_state()
    g = torch.Generator().manual_seed(3)
    sd["pos_embed"] = sd["pos_embed"].clone()
    sd["pos_embed"][0, 0] = torch.randn(32, generator=g) * 0.1
    sd["pos_embed"][0, 1:] += torch.randn(32, generator=g) * 0.1
    model, notes, _ = convert_mae(sd, num_heads=4, dec_num_heads=2)
    assert any("taken back" in n for n in notes)
    images = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        cls, tok = model.encode(images)
        expected = mae_encoder_by_hand(sd, images, num_heads=4, p=4)
    assert (torch.cat([cls[:, None], tok], 1) - expected).abs().max() < 1e-5


def test_converted_official_checkpoint_runs_through_every_script(tmp_path, capsys):
    """The released weights' path end to end on the fixture: convert with a WordPiece vocab, then probe.py, ood.py
    and viz.py (every mode, the text path included) with no tokenizer or normalisation flag, and train.py
    continuing pretraining from it with that vocabulary."""
    import ood
    import probe
    import train
    import viz

    vocab, _ = write_vocab(tmp_path / "vocab.txt", 100)
    ckpt = str(tmp_path / "official.pt")
    assert convert.main(["official", FIXTURE, ckpt, "--tokenizer", vocab]) == 0
    small = ["--train-size", "40", "--test-size", "20", "--epochs", "2", "--batch-size", "16"]
    r = probe.main(["--ckpt", ckpt, *small])
    assert r["train_size"] + r["val_size"] == 40 and 0 <= r["top1"] <= 100
    r = ood.main(["--ckpt", ckpt, *small, "--ood-size", "20"])
    assert all(0 <= s["auroc"] <= 100 for s in r["scores"].values())
    written = viz.main(["--ckpt", ckpt, "--samples", "2", "--out-dir", str(tmp_path / "viz")])
    assert set(written) == {"recon", "caption", "attention_word", "attention_patch"}
    assert all(os.path.getsize(p) > 1000 for p in written.values())
    # continue pretraining from the converted weights: its architecture, its vocabulary, its normalisation
    out = tmp_path / "cont"
    train.main(["--init-from", ckpt, "--out-dir", str(out), "--steps", "2", "--batch-size", "8", "--train-size",
                "16", "--workers", "0", "--no-probe", "--warmup-steps", "1"])
    cont = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert cont["config"]["emb_dim"] == 64 and cont["config"]["vocab_size"] == 100
    assert cont["tokenizer"]["kind"] == "wordpiece" and (out / "vocab.txt").exists()
    assert cont["data"]["mean"] == [0.5762, 0.5503, 0.5213]
    before = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert not torch.equal(cont["model"]["patch_embed.weight"], before["patch_embed.weight"])  # it trained
    assert (cont["model"]["patch_embed.weight"] - before["patch_embed.weight"]).abs().max() < 0.1  # from there
    with pytest.raises(SystemExit):  # the architecture comes from --init-from
        train.main(["--init-from", ckpt, "--out-dir", str(tmp_path / "x"), "--preset", "base"])
