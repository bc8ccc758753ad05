"""kernels/: the Triton masked-attention kernel against its float64 reference, and wired into model.py.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), one program at a time in numpy: shapes stay small. The interpreter uses one block
config (BLOCK_M=32, BLOCK_N=16), so lengths 1, 17, 65 and 130 cover one partial block, several blocks
with a ragged end, and 9 key blocks. Tests marked `needs_cuda` run only on a GPU (torch.compile, the
autotuned configs at M3AE's shapes).

Tolerances, as the largest |error| over max(1, max |reference|):
  fp32 1e-4: interpreter products are exact fp32 (on a GPU: tf32x3, about as good), so the error is fp32
       rounding in the online softmax and in sums over at most 130 keys (seen: ~1e-6); 1e-4 leaves room
       for other summation orders and the GPU's approximate exp2, and still catches any real bug (a
       wrong mask or scale moves results by 1e-1 or more).
  bf16 2e-2: the outputs are rounded to bf16 (2**-8 = 4e-3 relative) and so are P and dS before their
       matmuls, as on tensor cores; errors seen up to ~1e-2 at these sizes.
  fp16 5e-3: the same with a 2**-11 mantissa.
The float64 reference takes the very same (rounded) inputs, so input rounding is not counted.
"""

import os
import subprocess
import sys

import pytest
import torch

import kernels.attention as A
from kernels import masked_attention, padding_from_lengths, reference_attention

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_qkv(B, H, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, H, Nk, D, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, H, Nk, D, generator=g).to(DEVICE, dtype).requires_grad_()
    dout = torch.randn(B, H, Nq, D, generator=g).to(DEVICE, dtype)
    return q, k, v, dout


def make_padding(kind, B, Nk, seed=0):
    """kwargs for masked_attention: no padding, a (B, Nk) bool mask, or (B,) lengths."""
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return {}
    if kind == "lengths_mixed":  # all, a third, none, and past Nk (clamped): 0 / some / all keys visible
        lengths = torch.tensor([Nk, max(1, Nk // 3), 0, Nk + 7][:B])
        return {"key_lengths": lengths.to(DEVICE)}
    pad = torch.zeros(B, Nk, dtype=torch.bool)
    if kind == "mask_mixed":  # per sample: all visible, scattered, trailing padding, all padding
        assert B == 4
        pad[1] = torch.rand(Nk, generator=g) < 0.5
        pad[2, max(1, Nk // 3):] = True
        pad[3] = True
    elif kind == "mask_interior":  # whole key blocks padded between visible ones (interpreter BLOCK_N=16)
        pad[:, 16:48] = True
        pad[-1, 50:] = True
    elif kind != "mask_all_visible":
        raise ValueError(kind)
    return {"key_padding_mask": pad.to(DEVICE)}


def padding_mask(kwargs, B, Nk):
    if "key_padding_mask" in kwargs:
        return kwargs["key_padding_mask"]
    if "key_lengths" in kwargs:
        return padding_from_lengths(kwargs["key_lengths"], Nk)
    return torch.zeros(B, Nk, dtype=torch.bool, device=DEVICE)


def run_kernel(q, k, v, dout, **kwargs):
    out = masked_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, grads


def run_reference(q, k, v, dout, **kwargs):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q64, k64, v64, **kwargs)
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out, grads


def assert_near(x, ref, tol, what):
    assert torch.isfinite(x).all(), f"{what}: NaN or Inf"
    err = (x.double() - ref).abs().max().item() if x.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol} * {scale:.3g}"


# (id, B, H, Nq, Nk, D, dtype, padding): every length in {1, 17, 65, 130} on both sides, every head dim,
# Nq != Nk, each padding form; a few cases per dtype (the interpreter is slow).
CASES = [
    ("1x1_nomask", 1, 1, 1, 1, 16, torch.float32, "none"),
    ("1x17_mask_mixed", 4, 1, 1, 17, 32, torch.float32, "mask_mixed"),
    ("17x17_lengths", 4, 1, 17, 17, 64, torch.float32, "lengths_mixed"),
    ("65x130_mask_mixed", 4, 1, 65, 130, 16, torch.float32, "mask_mixed"),
    ("130x65_nomask", 1, 2, 130, 65, 128, torch.float32, "none"),
    ("65x65_mask_interior", 2, 1, 65, 65, 32, torch.float32, "mask_interior"),
    ("17x65_mask_all_visible", 2, 2, 17, 65, 64, torch.float32, "mask_all_visible"),
    ("bf16_17x130_mask_mixed", 4, 1, 17, 130, 64, torch.bfloat16, "mask_mixed"),
    ("bf16_130x17_lengths", 4, 1, 130, 17, 128, torch.bfloat16, "lengths_mixed"),
    ("bf16_65x65_nomask", 1, 2, 65, 65, 32, torch.bfloat16, "none"),
    ("bf16_1x65_mask_mixed", 4, 1, 1, 65, 16, torch.bfloat16, "mask_mixed"),
    ("fp16_17x65_mask_mixed", 4, 1, 17, 65, 64, torch.float16, "mask_mixed"),
]


@pytest.mark.parametrize("B,H,Nq,Nk,D,dtype,padding", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_float64_reference(B, H, Nq, Nk, D, dtype, padding):
    q, k, v, dout = make_qkv(B, H, Nq, Nk, D, dtype)
    kwargs = make_padding(padding, B, Nk)
    out, grads = run_kernel(q, k, v, dout, **kwargs)
    ref, ref_grads = run_reference(q, k, v, dout, **kwargs)
    assert out.shape == (B, H, Nq, D) and out.dtype == dtype
    tol = TOL[dtype]
    assert_near(out, ref, tol, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == dtype
        assert_near(g, r, tol, name)
    # exact zeros where the semantics say so: padded keys get no gradient, rows without keys give 0
    pad = padding_mask(kwargs, B, Nk)
    _, dk, dv = grads
    assert (dk.transpose(1, 2)[pad] == 0).all() and (dv.transpose(1, 2)[pad] == 0).all()
    empty = pad.all(dim=1)
    assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["mask", "lengths"])
def test_all_keys_padded_gives_zeros_and_zero_grads(dtype, form):
    B, H, Nq, Nk, D = 2, 2, 17, 33, 32
    q, k, v, dout = make_qkv(B, H, Nq, Nk, D, dtype, seed=3)
    kwargs = ({"key_padding_mask": torch.ones(B, Nk, dtype=torch.bool, device=DEVICE)} if form == "mask"
              else {"key_lengths": torch.zeros(B, dtype=torch.int32, device=DEVICE)})
    out, grads = run_kernel(q, k, v, dout, **kwargs)
    assert torch.isfinite(out).all() and (out == 0).all()
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


def test_no_keys_at_all():
    q, k, v, dout = make_qkv(1, 2, 5, 0, 16, torch.float32)
    out, grads = run_kernel(q, k, v, dout)
    assert out.shape == (1, 2, 5, 16) and (out == 0).all() and (grads[0] == 0).all()
    assert grads[1].shape == (1, 2, 0, 16)


def test_lengths_and_mask_forms_agree_exactly():
    B, H, Nq, Nk, D = 3, 2, 20, 40, 32
    q, k, v, dout = make_qkv(B, H, Nq, Nk, D, torch.float32, seed=1)
    lengths = torch.tensor([40, 9, 23], device=DEVICE)
    a = run_kernel(q, k, v, dout, key_lengths=lengths)
    b = run_kernel(q, k, v, dout, key_padding_mask=padding_from_lengths(lengths, Nk))
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same blocks visited, same arithmetic


def test_mask_scan_over_several_chunks(monkeypatch):
    """The scan for the last visible key reads the mask row in one chunk up to 1024 keys; force 16-key
    chunks so that its loop runs here too."""
    monkeypatch.setattr(A, "_scan_block", lambda n_keys, mode: 16)
    B, H, Nq, Nk, D = 4, 1, 17, 65, 16
    q, k, v, dout = make_qkv(B, H, Nq, Nk, D, torch.float32, seed=4)
    kwargs = make_padding("mask_mixed", B, Nk)
    kwargs["key_padding_mask"][0, 40:] = True  # last visible key inside the third chunk
    out, grads = run_kernel(q, k, v, dout, **kwargs)
    ref, ref_grads = run_reference(q, k, v, dout, **kwargs)
    assert_near(out, ref, 1e-4, "out")
    for g, r in zip(grads, ref_grads):
        assert_near(g, r, 1e-4, "grad")


def test_strided_inputs_as_model_passes_them():
    """q, k, v as views of a (B, N, 3, H, D) projection (model.py), a strided mask: no copy, same result."""
    B, N, H, D = 2, 19, 2, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, D) each, non-contiguous, unit last stride
    assert not q.is_contiguous()
    big_pad = torch.rand(B, 2 * N, generator=g) < 0.3
    pad = big_pad[:, ::2].to(DEVICE)  # stride 2 along keys
    dout = torch.randn(B, H, N, D, generator=g).to(DEVICE)
    out = masked_attention(q, k, v, key_padding_mask=pad)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c, grads_c = run_kernel(qc, kc, vc, dout, key_padding_mask=pad.contiguous())
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)
    torch.testing.assert_close(grads, grads_c, atol=0, rtol=0)
    # the output is a (B, N, H, D) buffer seen as (B, H, N, D): model.py's transpose + reshape is free
    assert out.transpose(1, 2).is_contiguous()


def test_custom_scale_and_stride0_output_gradient():
    q, k, v, _ = make_qkv(2, 1, 17, 17, 16, torch.float32, seed=2)
    pad = torch.zeros(2, 17, dtype=torch.bool, device=DEVICE)
    pad[1, 5:] = True
    out = masked_attention(q, k, v, key_padding_mask=pad, scale=0.3)
    grads = torch.autograd.grad(out.sum(), (q, k, v))  # d(sum) is an expanded, all-stride-0 tensor
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, key_padding_mask=pad, scale=0.3)
    ref_grads = torch.autograd.grad(ref.sum(), (q64, k64, v64))
    assert_near(out, ref, 1e-4, "out")
    for g, r in zip(grads, ref_grads):
        assert_near(g, r, 1e-4, "grad")


def _errors():
    f32 = dict(dtype=torch.float32, device=DEVICE)
    q = torch.randn(2, 2, 8, 16, **f32)
    k = torch.randn(2, 2, 9, 16, **f32)
    pad = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    lens = torch.tensor([3, 9], device=DEVICE)
    return [
        ("head_dim_24", (torch.randn(2, 2, 8, 24, **f32),) * 3, {}, "head dim 24"),
        ("float64", (q.double(), k.double(), k.double()), {}, "float64"),
        ("mixed_dtypes", (q, k.half(), k), {}, "share a dtype"),
        ("3d", (q[0], k[0], k[0]), {}, "4-D"),
        ("k_v_shapes", (q, k, k[:, :, :5]), {}, "same shape"),
        ("batch_mismatch", (q, k[:1], k[:1]), {}, "batch and heads"),
        ("qk_head_dims", (q, torch.randn(2, 2, 9, 32, **f32), torch.randn(2, 2, 9, 32, **f32)), {}, "same head dim"),
        ("last_stride", (torch.randn(2, 2, 16, 8, **f32).transpose(-1, -2), k, k), {}, "unit stride"),
        ("mask_shape", (q, k, k), {"key_padding_mask": pad[:, :8]}, r"shape \(B, Nk\)"),
        ("mask_dtype", (q, k, k), {"key_padding_mask": pad.float()}, "bool"),
        ("mask_per_query", (q, k, k), {"key_padding_mask": pad[:, None, :].expand(2, 8, 9)}, r"shape \(B, Nk\)"),
        ("lengths_shape", (q, k, k), {"key_lengths": lens[:1]}, r"shape \(B,\)"),
        ("lengths_dtype", (q, k, k), {"key_lengths": lens.float()}, "int32 or int64"),
        ("both", (q, k, k), {"key_padding_mask": pad, "key_lengths": lens}, "not both"),
    ]


@pytest.mark.parametrize("args,kwargs,match", [e[1:] for e in _errors()], ids=[e[0] for e in _errors()])
def test_clear_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        masked_attention(*args, **kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(A, "INTERPRET", False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        masked_attention(q, q, q)


# --- wired into model.py ----------------------------------------------------------------------------


def test_model_attention_triton_agrees_with_math_and_sdpa():
    from model import attention

    torch.manual_seed(0)
    B, H, T, hs = 4, 2, 9, 16
    q, k, v = (torch.randn(B, H, T, hs, device=DEVICE, requires_grad=True) for _ in range(3))
    pad = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    pad[1, 5:] = True
    pad[2, :] = True  # a fully padded caption row: zeros, never NaN
    pad[3, ::2] = True
    results = {}
    for impl in ("math", "sdpa", "triton"):
        y = attention(q, k, v, pad, impl=impl)
        results[impl] = (y, *torch.autograd.grad(y.square().sum(), (q, k, v)))
    for got, want in zip(results["triton"], results["math"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(results["triton"], results["sdpa"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (results["triton"][0][2] == 0).all()


def test_tiny_m3ae_forward_backward_triton_matches_math():
    from model import M3AE, make_config

    cfg = make_config("tiny", vocab_size=50, attn_impl="triton")
    B, g = 2, torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = M3AE(cfg).to(DEVICE)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g).to(DEVICE)
    text = torch.randint(1, cfg.vocab_size, (B, cfg.text_len), generator=g)
    pad = torch.arange(cfg.text_len)[None, :] >= torch.tensor([cfg.text_len, 3])[:, None]  # True = padding
    text, pad = text.masked_fill(pad, 0).to(DEVICE), pad.to(DEVICE)
    noise = (torch.rand(B, cfg.num_patches, generator=g).to(DEVICE),
             torch.rand(B, cfg.text_len, generator=g).to(DEVICE))
    results = {}
    for impl in ("math", "triton"):
        model.config.attn_impl = impl
        model.zero_grad(set_to_none=True)
        out = model(images, text, pad, *noise)
        out["loss"].backward()
        out.update(model.reconstruct(images, text, pad, *noise))
        results[impl] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (out_m, grads_m), (out_t, grads_t) = results["math"], results["triton"]
    for key in ("loss", "image_pred", "text_logits"):
        torch.testing.assert_close(out_t[key], out_m[key], atol=1e-4, rtol=1e-4)
    assert grads_t.keys() == grads_m.keys() and len(grads_t) > 0
    for name in grads_m:
        torch.testing.assert_close(grads_t[name], grads_m[name], atol=1e-4, rtol=1e-3, msg=name)


# --- the benchmark script and the sm_90 build -------------------------------------------------------------


def test_bench_smoke_runs():
    from kernels import bench

    text = bench.main(["--smoke", "--batch", "1"])
    for label in ("ours (mask)", "ours (no mask)", "sdpa (mask)", "sdpa (no mask)", "flex (block mask)", "math"):
        assert f"| {label} |" in text
    assert "### encoder" in text and "### decoder" in text


def test_kernels_compile_for_sm90_without_a_gpu():
    """The real compiler (not the interpreter) lowers each kernel, for each padding form, for H100:
    catches what the interpreter cannot (types, layouts, constexpr control flow), and checks that the
    bf16 tile loops use Hopper's warpgroup MMA."""
    if not os.path.exists(os.path.join(os.path.dirname(A.triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build has no bundled ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    rows = []
    # bf16 in every padding form; fp32 (tf32x3 products, another code path) with the boolean mask only;
    # bf16 again with the scales typed fp64, as torch.compile passes them (a compile error until pinned to fp32)
    for dtype, modes, scale in (("bf16", ["0", "1", "2"], "fp32"), ("fp32", ["2"], "fp32"), ("bf16", ["2"], "fp64")):
        cmd = [sys.executable, os.path.join(ROOT, "kernels", "compile_check.py"), "--quick", "--dtype", dtype,
               "--head-dims", "64", "--modes", *modes, "--scale-type", scale]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        rows += [line.split("|") for line in res.stdout.splitlines() if line.startswith(("| fwd", "| bwd"))]
    assert len(rows) == 3 * 3 + 3 + 3
    for row in rows:
        kernel, dtype, hgmma, spill = row[1].strip(), row[2].strip(), row[11].strip(), row[9].strip()
        if hgmma != "None":
            assert int(hgmma) > 0, f"{kernel} {dtype}: no HGMMA in the SASS"
        if dtype == "bf16" and spill != "None":
            assert int(spill) == 0, f"{kernel} bf16 spills {spill} bytes"


# --- GPU only ---------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("form", ["mask", "lengths", "none"])
def test_torch_compile_fullgraph(form):
    """torch.compile sees the kernels as custom ops: fullgraph=True fails on any graph break."""
    torch._dynamo.reset()
    B, H, N, D = 4, 4, 81, 64
    q, k, v, dout = make_qkv(B, H, N, N, D, torch.bfloat16, seed=7)
    kwargs = make_padding({"mask": "mask_mixed", "lengths": "lengths_mixed", "none": "none"}[form], B, N)

    def f(q, k, v):
        return masked_attention(q, k, v, **kwargs)

    compiled = torch.compile(f, fullgraph=True)
    out_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(out_c, (q, k, v), dout)
    out_e, grads_e = run_kernel(q, k, v, dout, **kwargs)
    torch.testing.assert_close(out_c, out_e, atol=1e-2, rtol=1e-2)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=1e-2, rtol=1e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(12, 81, 64), (16, 321, 32), (2, 130, 128), (3, 17, 16)],
                         ids=["encoder", "decoder", "d128", "d16"])
def test_cuda_autotuned_configs_match_reference(shape, dtype):
    """On a GPU the autotuner picks real block sizes (64-128): check them at M3AE's shapes."""
    H, N, D = shape
    B = 4
    q, k, v, dout = make_qkv(B, H, N, N, D, dtype, seed=11)
    kwargs = make_padding("mask_mixed", B, N)
    out, grads = run_kernel(q, k, v, dout, **kwargs)
    ref, ref_grads = run_reference(q, k, v, dout, **kwargs)
    tol = 1e-3 if dtype == torch.float32 else TOL[dtype]  # fp32 on a GPU: tf32x3 products
    assert_near(out, ref, tol, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_near(g, r, tol, name)
