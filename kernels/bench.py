"""Benchmark kernels/attention.py at M3AE's attention shapes, beside the alternatives it must beat.

    python kernels/bench.py                      # CUDA: B=256, bf16, encoder and decoder shapes
    python kernels/bench.py --batch 64 --dtype fp16
    python kernels/bench.py --profile            # CUDA: where an eager call's time goes (torch.profiler)
    python kernels/bench.py --smoke              # tiny shapes; on a machine without CUDA through Triton's
                                                 # interpreter, so the script is exercised by the tests

Shapes (ViT-B/16 at 256 px, 75% of patches and of caption slots masked, the paper's setting):
  encoder  [CLS, 64 kept patches, 16 kept caption slots] = 81 tokens, 12 heads, head dim 64
  decoder  [CLS, 256 patches, 64 caption slots]        = 321 tokens, 16 heads, head dim 32 (512 / 16)
Padding: each sample draws a caption length in [0, 64]; in the encoder the 16 kept slots are random caption
positions (padding scattered among the last 16 keys), in the decoder the caption is whole (padding at the
end). CLS and the patches are always visible, as in the model.

Implementations: ours with the mask and without; SDPA with the boolean (B, 1, 1, Nk) mask and without (the
ceiling: its flash backend); FlexAttention (compiled) with a BlockMask built once from the same padding;
the plain matmul-softmax. q, k, v are laid out as model.py passes them: (B, H, N, D) views of (B, N, H, D)
buffers (one per tensor, so that no implementation pays for a copy the others do not).

FLOPs counted (dense, the same for every row, masked keys included): forward 4 * B * H * Nq * Nk * D (two
matmuls); backward 2.5x the forward (five matmuls, one of them the recomputed q k^T), so forward+backward
is 3.5x the forward. Times are medians of triton.testing.do_bench (CUDA events, after warm-up), or with
--cuda-graph of do_bench_cudagraph (replays of a captured graph: no CPU launch cost in the number).
The ratio columns are time / time of SDPA with the mask (smaller is better).
"""

import argparse
import datetime
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton decides at import time whether @triton.jit runs in the interpreter: set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.attention import masked_attention, reference_attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# name, heads, head dim, image tokens, caption slots (all after CLS), padding kind
CASES = [
    ("encoder", 12, 64, 64, 16, "scattered"),
    ("decoder", 16, 32, 256, 64, "trailing"),
]
SMOKE_CASES = [  # same structure, interpreter-sized
    ("encoder", 2, 64, 8, 4, "scattered"),
    ("decoder", 2, 32, 16, 8, "trailing"),
]


def make_padding(batch, n_image, n_text, kind, generator, caption_len=64):
    """(B, 1 + n_image + n_text) bool, True = padding; only caption slots are ever padded."""
    lengths = torch.randint(0, caption_len + 1, (batch,), generator=generator)  # real tokens per caption
    if kind == "trailing":  # decoder: every caption slot, in order
        positions = torch.arange(n_text).expand(batch, n_text) * caption_len // n_text
    else:  # encoder: n_text kept slots, random caption positions per sample
        positions = torch.rand(batch, caption_len, generator=generator).argsort(dim=1)[:, :n_text]
    text_pad = positions >= lengths[:, None]  # (B, n_text)
    return torch.cat([torch.zeros(batch, 1 + n_image, dtype=torch.bool), text_pad], dim=1)


# --- the implementations, one signature: f(q, k, v, pad) -> (B, H, Nq, D) -------------------------


def ours_mask(q, k, v, pad):
    return masked_attention(q, k, v, key_padding_mask=pad)


def ours_no_mask(q, k, v, pad):
    return masked_attention(q, k, v)


def sdpa_mask(q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])  # True = attend


def sdpa_no_mask(q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v)


def math_attention(q, k, v, pad):
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, H, Nq, Nk): materialised
    scores = scores.masked_fill(pad[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1) @ v


def make_flex(pad, n_heads, n):
    """FlexAttention with a BlockMask from pad, or (None, reason). The BlockMask is built once per batch
    (as a model would, for all its layers) and is not timed; flex_attention is compiled, as it must be
    to run fast."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return None, f"unavailable ({e})"
    if not pad.is_cuda:
        return None, "skipped (CPU)"

    def visible(b, h, q_idx, kv_idx):
        return ~pad[b, kv_idx]

    try:
        block_mask = create_block_mask(visible, pad.shape[0], None, n, n, device=pad.device)
        compiled = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # report and go on: the other rows still mean something
        return None, f"failed ({type(e).__name__}: {str(e)[:80]})"
    return (lambda q, k, v, _pad: compiled(q, k, v, block_mask=block_mask)), None


# --- timing ---------------------------------------------------------------------------------------


def time_ms(fn, grad_to_none, smoke, cuda_graph=False):
    """Median milliseconds of fn(). cuda_graph: time replays of a CUDA graph of fn (no CPU launch cost)."""
    if smoke or not torch.cuda.is_available():  # the interpreter: a wall clock, one run (not a benchmark)
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    if cuda_graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200, grad_to_none=grad_to_none, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def make_inputs(case, batch, dtype, device, seed=0):
    """pad (B, N) bool, the q/k/v leaves (B, N, H, D) and dout (B, H, N, D) for one case."""
    name, H, D, n_image, n_text, kind = case
    N = 1 + n_image + n_text
    g = torch.Generator().manual_seed(seed)
    pad = make_padding(batch, n_image, n_text, kind, g).to(device)
    # (B, N, H, D) leaves, used as (B, H, N, D) views: model.py's layout
    leaves = [torch.randn(batch, N, H, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]
    dout = torch.randn(batch, H, N, D, generator=g).to(device, dtype)
    return pad, leaves, dout


def run_case(case, batch, dtype, device, smoke, cuda_graph=False, seed=0):
    name, H, D, n_image, n_text, kind = case
    N = 1 + n_image + n_text
    pad, leaves, dout = make_inputs(case, batch, dtype, device, seed)

    def qkv():
        return [t.transpose(1, 2) for t in leaves]

    impls = {"ours (mask)": ours_mask, "ours (no mask)": ours_no_mask, "sdpa (mask)": sdpa_mask,
             "sdpa (no mask)": sdpa_no_mask}
    flex, why = make_flex(pad, H, N)
    impls["flex (block mask)"] = flex
    impls["math"] = math_attention

    # correctness before speed: ours against SDPA (same mask) and against the float64 reference
    with torch.no_grad():
        q, k, v = qkv()
        ours = ours_mask(q, k, v, pad).float()
        few = slice(0, 8)  # the float64 reference materialises (B, H, N, N): a few samples are enough
        ref = reference_attention(q[few], k[few], v[few], key_padding_mask=pad[few])
        err_ref = (ours[few].double() - ref).abs().max().item()
        err_sdpa = (ours - sdpa_mask(q, k, v, pad).float()).abs().max().item()
        err_flex = None if flex is None else (ours - flex(q, k, v, pad).float()).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    if not (err_ref < tol and err_sdpa < tol and (err_flex is None or err_flex < tol)):
        raise SystemExit(f"{name}: ours disagrees (max abs err vs float64 {err_ref:.2e}, vs sdpa {err_sdpa:.2e}, "
                         f"vs flex {err_flex}); not timing")

    fwd_flop = 4 * batch * H * N * N * D
    rows = []
    for label, f in impls.items():
        if f is None:
            rows.append((label, None, None, why))
            continue

        def fwd(f=f):
            with torch.no_grad():
                f(*qkv(), pad)

        def fwd_bwd(f=f):
            f(*qkv(), pad).backward(dout)

        try:
            t_fwd = time_ms(fwd, None, smoke, cuda_graph)
            t_fb = time_ms(fwd_bwd, leaves, smoke, cuda_graph)
        except Exception as e:  # e.g. out of memory for math at a big batch: report, do not hide the rest
            rows.append((label, None, None, f"failed ({type(e).__name__}: {str(e)[:60]})"))
            continue
        for t in leaves:
            t.grad = None
        rows.append((label, t_fwd, t_fb, ""))
    checks = f"max abs err of ours (mask): vs float64 {err_ref:.1e}, vs sdpa {err_sdpa:.1e}" + (
        "" if err_flex is None else f", vs flex {err_flex:.1e}")
    return dict(name=name, B=batch, H=H, N=N, D=D, fwd_flop=fwd_flop, rows=rows, checks=checks,
                visible=f"{(~pad).float().mean().item():.0%} of keys visible")


def profile_eager(batch, dtype, device, calls=20):
    """Where an eager forward+backward of ours (mask) spends its time at the encoder shape: torch.profiler's
    table, sorted by self CPU time. At this size the GPU work is ~0.2 ms, so CPU costs per call show."""
    from torch.profiler import ProfilerActivity, profile

    pad, leaves, dout = make_inputs(CASES[0], batch, dtype, device)

    def fwd_bwd():
        ours_mask(*[t.transpose(1, 2) for t in leaves], pad).backward(dout)

    for _ in range(3):  # warm-up: autotuning and compilation stay out of the profile
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fwd_bwd()
        torch.cuda.synchronize()
    return (f"profile: {calls} eager forward+backward calls of ours (mask), encoder shape, batch {batch}\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def table(result, judge=True):
    base = {lab: (tf, tfb) for lab, tf, tfb, _ in result["rows"]}["sdpa (mask)"]
    f1, f2 = result["fwd_flop"], 3.5 * result["fwd_flop"]
    lines = [f"### {result['name']}: B={result['B']}, H={result['H']}, Nq=Nk={result['N']}, D={result['D']} "
             f"({result['visible']}; {result['checks']})", "",
             "| implementation | fwd ms | fwd TFLOP/s | fwd / sdpa(mask) | fwd+bwd ms | fwd+bwd TFLOP/s | "
             "fwd+bwd / sdpa(mask) |", "|---|---|---|---|---|---|---|"]
    def ratio(t, b):
        return "n/a" if t is None or b is None else f"{t / b:.2f}x"

    for label, tf, tfb, note in result["rows"]:
        if tf is None:
            lines.append(f"| {label} | {note} | | | | | |")
            continue
        lines.append(f"| {label} | {tf:.3f} | {f1 / tf / 1e9:.3g} | {ratio(tf, base[0])} | {tfb:.3f} | "
                     f"{f2 / tfb / 1e9:.3g} | {ratio(tfb, base[1])} |")
    # the targets, forward+backward of ours with the mask against three baselines
    fb = {lab: tfb for lab, _, tfb, _ in result["rows"]}
    checks = []
    for other, limit in (("sdpa (mask)", 0.7), ("flex (block mask)", 1.0), ("sdpa (no mask)", 1.1)):
        r = None if fb["ours (mask)"] is None or fb[other] is None else fb["ours (mask)"] / fb[other]
        verdict = "n/a" if r is None else f"{r:.2f}x {'met' if r <= limit else 'MISSED'}"
        checks.append(f"vs {other} {verdict} (target <= {limit}x)")
    if judge:
        lines += ["", "targets, fwd+bwd of ours (mask): " + "; ".join(checks)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="M3AE attention benchmark (see the module docstring)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 256; 2 with --smoke)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU through the interpreter")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time CUDA-graph replays (triton.testing.do_bench_cudagraph): GPU time without the CPU "
                         "cost of launching, which at the encoder's size (~20 us of GPU work) can dominate")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: instead of the table, profile eager calls of ours (where the CPU time goes)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    batch = args.batch or (2 if args.smoke else 256)
    dtype = DTYPES[args.dtype]
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA device: only --smoke runs here (timings would be the interpreter's)")
    if args.profile:
        text = profile_eager(batch, dtype, "cuda")
        print(text)
        return text
    import triton

    device = "cuda" if cuda else "cpu"
    where = (torch.cuda.get_device_name() if cuda
             else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    out = [f"## attention benchmark, {datetime.date.today().isoformat()}: {where}; torch {torch.__version__}, "
           f"triton {triton.__version__}; {args.dtype}; command: python kernels/bench.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()]
    if args.smoke:
        out.append("(smoke run: tiny shapes, times are not a benchmark)")
    elif args.cuda_graph:
        out.append("(times: CUDA-graph replays, launch overhead excluded)")
    else:
        out.append("(times: eager calls, do_bench medians, launch overhead included)")
    for case in (SMOKE_CASES if args.smoke else CASES):
        result = run_case(case, batch, dtype, device, args.smoke, args.cuda_graph and cuda)
        out += ["", table(result, judge=not args.smoke)]
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
