"""Fused multi-head attention with a key-padding mask, in Triton: forward, backward, reference.

    out = softmax(q @ k^T * scale, over the visible keys) @ v       q: (B, H, Nq, D), k, v: (B, H, Nk, D)

Why a kernel: torch's scaled_dot_product_attention leaves its flash backend as soon as a mask is given,
materialises the mask broadcast per head, and returns NaN for a query whose keys are all padding. M3AE's
encoder and decoder attend over [CLS, patches, caption] where only the caption is padded, so the padding
is a (B, Nk) vector; here it stays one. The kernels read it per key block, stop at the last visible key
and never build a (B, H, Nq, Nk) mask or score matrix.

Conventions (the same as model.py):
  * key_padding_mask (B, Nk) bool, True = padding: that key is hidden from every query of its sample.
    key_lengths (B,) int is the per-sample length form: keys [0, len) visible, the rest padding.
  * a query with no visible key gets output 0 and sends zero gradient everywhere (never NaN).
  * padded keys get zero dK and dV; padded *queries* are computed like any other.

Algorithm (flash attention, online softmax, fp32 statistics):
  forward   one program per (query block, batch*head); loops over key blocks, keeps a running row max
            m and row sum l in base 2 (scale is pre-multiplied by log2(e) so exp2 can be used), and
            stores out and lse = m + log2(l) (base 2, the only statistic the backward needs).
  backward  two passes, no atomics:
            dQ pass   one program per query block, loops over key blocks; it also computes
                      delta = rowsum(dO * O) (the backward "preprocess") and stores it for the next pass.
            dK/dV     one program per key block, loops over query blocks, reads delta and lse.
            P is recomputed from q, k and lse in both passes: nothing of size Nq x Nk is saved.

Inputs may have any strides whose last one is 1 (model.py passes q, k, v as permuted views of the qkv
projection): strides go to the kernels, nothing is copied. Outputs are allocated (B, N, H, D) and
returned as a (B, H, N, D) view, so model.py's `y.transpose(1, 2).reshape(B, T, C)` is free.

On a machine without a GPU set TRITON_INTERPRET=1 *before* triton is imported; the same kernels then
run on CPU tensors in Triton's interpreter (slowly: the tests keep shapes small).
"""

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Read once, as Triton itself decides at import time whether @triton.jit gives an interpreted function.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))

# which padding form a launch uses (a constexpr: each form compiles its own kernel)
NO_MASK, LENGTHS, BOOL_MASK = 0, 1, 2


# -----------------------------------------------------------------------------
# block configurations
#
# On a GPU, triton.autotune picks among a few configs per (Nq, Nk, D, mask form, dtype). In the
# interpreter one small config is used (the interpreter runs each program in numpy, and big blocks only
# cost time); its BLOCK_M != BLOCK_N so that the tests catch any mix-up of the two.


def _configs(blocks):
    """blocks: (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples -> triton.Config list."""
    if INTERPRET:
        blocks = [(32, 16, 1, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


# Every config below compiles for sm_90 to warpgroup MMA (HGMMA) without spilling at D <= 64 (M3AE's
# head dims), as `python kernels/compile_check.py` shows; some spill at D = 128 and then lose the autotune.
# Left out: tiles whose MMA M dimension is 32 (BLOCK_M in the forward/dQ, BLOCK_N in dK/dV): no HGMMA.
#
# forward: BLOCK_M queries per program, BLOCK_N keys per step. M3AE's sequences are short (81 and 321),
# so small BLOCK_N configs are included: a 128-key block over 81 keys wastes a third of the work.
_FWD_CONFIGS = _configs([
    (128, 64, 8, 3), (128, 32, 4, 3), (128, 128, 8, 2),
    (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 128, 4, 2),
])
# dQ pass: BLOCK_M queries per program, loop over BLOCK_N keys (holds q, dO, dq)
_BWD_DQ_CONFIGS = _configs([
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 128, 8, 2),
])
# dK/dV pass: BLOCK_N keys per program, loop over BLOCK_M queries (holds k, v, dk, dv)
_BWD_DKDV_CONFIGS = _configs([
    (64, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 3), (16, 64, 4, 2),
])
_TUNE_KEY = ["N_Q", "N_K", "HEAD_DIM", "MODE"]  # the autotuner adds the tensors' dtypes itself


# -----------------------------------------------------------------------------
# kernels


@triton.jit
def _visible_end(mask_ptr, len_ptr, stride_mb, stride_mn, off_b, N_K,
                 MODE: tl.constexpr, SCAN: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """One past the last key a loop over sample off_b's keys must visit: Nk without a mask, the length for
    key_lengths, and with a boolean mask (SCAN) one past the last visible key, found by a scan of the
    (B, Nk) mask row: Nk bytes, in one SCAN_BLOCK-wide load for Nk <= 1024, cheap next to the K/V tiles.
    Loops stop there, so fully padded key blocks at the end (where caption padding lives) are never
    loaded."""
    if MODE == 1:
        end = tl.load(len_ptr + off_b).to(tl.int32)
        end = tl.minimum(tl.maximum(end, 0), N_K)  # lengths outside [0, Nk] are clamped
    elif MODE == 2:
        if SCAN:
            end = tl.zeros([], dtype=tl.int32)
            for start in range(0, N_K, SCAN_BLOCK):
                offs = start + tl.arange(0, SCAN_BLOCK)
                pad = tl.load(mask_ptr + off_b * stride_mb + offs * stride_mn, mask=offs < N_K, other=1)
                end = tl.maximum(end, tl.max(tl.where(pad == 0, offs + 1, 0), axis=0))
        else:
            end = N_K
    else:
        end = N_K
    return end


@triton.jit
def _key_visible(mask_ptr, stride_mb, stride_mn, off_b, offs_n, kv_end, MODE: tl.constexpr):
    """(BLOCK_N,) bool: which keys of this block a query may attend to."""
    visible = offs_n < kv_end
    if MODE == 2:
        pad = tl.load(mask_ptr + off_b * stride_mb + offs_n * stride_mn, mask=visible, other=1)
        visible = visible & (pad == 0)
    return visible


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, accumulating in fp32. UPCAST (interpreter with bf16 only): Triton's interpreter multiplies
    bf16 tiles as their raw uint16 bits (triton-lang/triton#11584), so the tiles go to fp32 first. bf16
    products are exact in fp32, as on tensor cores, so this computes what a GPU does, up to summation order."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, LENS,
    stride_qb, stride_qh, stride_qm,  # every last-dim stride is 1 (checked by the wrapper)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mn,
    H, N_Q, N_K, qk_scale,  # qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # torch.compile's launch of a user kernel types Python-float arguments as fp64 (torch 2.11): pin fp32,
    # or the loop-carried max/sum would change type (a compile error) and the math would run in fp64.
    qk_scale = tl.cast(qk_scale, tl.float32)
    # 1D grid, query blocks fastest: neighbouring programs share one (b, h) and so its K/V in L2
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    off_b = pid_bh // H
    off_h = pid_bh % H
    # 64-bit base offsets: B * H * N * D passes 2**31 elements at large batch sizes
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    kv_end = _visible_end(MASK, LENS, stride_mb, stride_mn, off_b, N_K, MODE, True, SCAN_BLOCK)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max, base-2 logits
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running unnormalised output
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = _key_visible(MASK, stride_mb, stride_mn, off_b, offs_n, kv_end, MODE)
        in_range = offs_n < kv_end
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet still has m = -inf; shift it by 0 instead, so that no
        # (-inf) - (-inf) = NaN appears: its p and alpha are then exp2(-inf) = 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    # l == 0 exactly when the row has no visible key (otherwise its max key contributes exp2(0) = 1):
    # output 0 and lse 0. With lse finite, the backward's exp2(-inf - lse) = 0 on every (masked) key of
    # such a row, so its gradients are 0 too.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.log2(l_safe))
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, MASK, LENS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mn,
    H, N_Q, N_K, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)  # fp32: see _attn_fwd_kernel
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
    row_base = pid_bh.to(tl.int64) * N_Q  # into the (B, H, Nq) lse and delta

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    # the backward preprocess, fused here: this program is the one that reads these O and dO rows anyway,
    # and the dK/dV pass (launched after this one) reads delta back. Saves a launch and a pass over O, dO.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # (BLOCK_M,) = rowsum(dO * O) = rowsum(P * dP)
    tl.store(DELTA + row_base + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)

    kv_end = _visible_end(MASK, LENS, stride_mb, stride_mn, off_b, N_K, MODE, True, SCAN_BLOCK)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = _key_visible(MASK, stride_mb, stride_mn, off_b, offs_n, kv_end, MODE)
        in_range = offs_n < kv_end
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(visible[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # the forward's softmax, recomputed
        dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)  # dL/dP
        ds = p * (dp - delta[:, None])  # dL/dS (softmax backward), S = unscaled q k^T
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK, LENS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mn,
    H, N_Q, N_K, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)  # fp32: see _attn_fwd_kernel
    num_n = tl.cdiv(N_K, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    dk_base = DK + off_b.to(tl.int64) * stride_dkb + off_h.to(tl.int64) * stride_dkh
    dv_base = DV + off_b.to(tl.int64) * stride_dvb + off_h.to(tl.int64) * stride_dvh
    row_base = pid_bh.to(tl.int64) * N_Q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N_K
    # this program owns one key block, so it only needs that block's visibility (no scan of the row)
    kv_end = _visible_end(MASK, LENS, stride_mb, stride_mn, off_b, N_K, MODE, False, SCAN_BLOCK)
    visible = _key_visible(MASK, stride_mb, stride_mn, off_b, offs_n, kv_end, MODE)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # A fully padded key block has zero gradients: skip the loop over the queries altogether.
    m_end = tl.where(tl.max(visible.to(tl.int32), axis=0) > 0, N_Q, 0)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_Q
        # rows past Nq load as 0 (q, dO, lse, delta): their terms below are then exactly 0
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        # transposed scores, keys along rows: dV = P^T dO and dK = dS^T Q need no transpose of P
        s_t = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_N, BLOCK_M)
        s_t = tl.where(visible[:, None], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # padded keys: exactly 0, hence zero dK, dV
        dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST_DOT)
        dp_t = _dot(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST_DOT)
    dk = dk * sm_scale
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# -----------------------------------------------------------------------------
# launchers, registered as custom ops so torch.compile sees one opaque op (no graph break)


def _launch(kernel):
    """wrap_triton lets torch.compile trace the launch; the interpreter's kernels are launched as they are
    (older torch's wrap_triton rejects interpreted functions, and compile needs a GPU anyway)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def _empty_bnhd(B, H, N, D, like):
    """(B, H, N, D) view of a (B, N, H, D) buffer: the layout model.py reshapes to (B, N, H*D) for free."""
    return torch.empty(B, N, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _mask_args(q, key_padding_mask, key_lengths):
    """(mode, mask pointer, lengths pointer, mask strides). An unused pointer gets q: never dereferenced."""
    if key_padding_mask is not None:
        # passed as bool (Triton loads it as bytes). Not .view(torch.uint8): inductor (torch 2.11) cannot
        # lower a bool -> uint8 view, so torch.compile failed on it (seen on an H200, 2026-11-26).
        return BOOL_MASK, key_padding_mask, q, key_padding_mask.stride(0), key_padding_mask.stride(1)
    if key_lengths is not None:
        return LENGTHS, q, key_lengths, 0, 0
    return NO_MASK, q, q, 0, 0


def _scan_block(n_keys, mode):
    """Width of the mask-row scan in _visible_end: the whole row in one load, up to 1024 keys (unused, so
    fixed, without a boolean mask: no recompiles per length)."""
    return min(max(triton.next_power_of_2(n_keys), 16), 1024) if mode == BOOL_MASK else 16


def _upcast_dot(dtype):
    return INTERPRET and dtype == torch.bfloat16


def _dot_precision(dtype):
    # 16-bit inputs: tensor cores, fp32 accumulation (the precision argument only matters for fp32).
    # fp32 inputs: "tf32x3" splits each operand into two tf32 parts and sums three tensor-core products,
    # which is accurate to about fp32 rounding (plain tf32 would cost ~1e-3 relative error). "ieee" is
    # exact fp32 but runs on FMA units and, compiled for sm_90, spills heavily (kernels/compile_check.py).
    return "tf32x3" if dtype == torch.float32 else "tf32"


@torch.library.triton_op("m3ae::masked_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   key_lengths: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) float32, base 2, of the scaled logits."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    out = _empty_bnhd(B, H, N_Q, D, q)
    lse = torch.empty(B, H, N_Q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if N_K == 0:  # no keys at all: every row is a row without visible keys
        return out.zero_(), lse.zero_()
    mode, mask, lens, smb, smn = _mask_args(q, key_padding_mask, key_lengths)

    def grid(meta):
        return (triton.cdiv(N_Q, meta["BLOCK_M"]) * B * H,)

    _launch(_attn_fwd_kernel)[grid](
        q, k, v, out, lse, mask, lens,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        smb, smn,
        H, N_Q, N_K, scale * LOG2E,
        HEAD_DIM=D, MODE=mode, DOT_PRECISION=_dot_precision(q.dtype), UPCAST_DOT=_upcast_dot(q.dtype),
        SCAN_BLOCK=_scan_block(N_K, mode),
    )
    return out, lse


@torch.library.triton_op("m3ae::masked_attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], key_lengths: Optional[torch.Tensor],
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv (each shaped like its input, in its dtype)."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    if dout.stride(-1) != 1:  # e.g. the stride-0 gradient of a .sum(): the kernels need unit stride
        dout = dout.contiguous()
    dq = _empty_bnhd(B, H, N_Q, D, q)
    dk = _empty_bnhd(B, H, N_K, D, k)
    dv = _empty_bnhd(B, H, N_K, D, v)
    if N_Q == 0 or N_K == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, H, N_Q, dtype=torch.float32, device=q.device)
    mode, mask, lens, smb, smn = _mask_args(q, key_padding_mask, key_lengths)
    precision = _dot_precision(q.dtype)

    def grid_dq(meta):
        return (triton.cdiv(N_Q, meta["BLOCK_M"]) * B * H,)

    def grid_dkdv(meta):
        return (triton.cdiv(N_K, meta["BLOCK_N"]) * B * H,)

    # dQ first: it writes delta, which the dK/dV pass reads (same stream, so ordered)
    _launch(_attn_bwd_dq_kernel)[grid_dq](
        q, k, v, out, dout, dq, lse, delta, mask, lens,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        smb, smn,
        H, N_Q, N_K, scale, scale * LOG2E,
        HEAD_DIM=D, MODE=mode, DOT_PRECISION=precision, UPCAST_DOT=_upcast_dot(q.dtype),
        SCAN_BLOCK=_scan_block(N_K, mode),
    )
    _launch(_attn_bwd_dkdv_kernel)[grid_dkdv](
        q, k, v, dout, dk, dv, lse, delta, mask, lens,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        smb, smn,
        H, N_Q, N_K, scale, scale * LOG2E,
        HEAD_DIM=D, MODE=mode, DOT_PRECISION=precision, UPCAST_DOT=_upcast_dot(q.dtype),
        SCAN_BLOCK=_scan_block(N_K, mode),
    )
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, key_lengths, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, key_lengths)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask, key_lengths = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, key_padding_mask, key_lengths, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("m3ae::masked_attention_fwd", _backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# public API


def _check(q, k, v, key_padding_mask, key_lengths, kernel=True):
    """Raise ValueError naming what is wrong; shapes and dtypes only (no device sync). kernel=False (the
    reference) skips the kernel's own limits: dtype, head dim and strides."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kernel and q.dtype not in DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use float32, float16 or bfloat16")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must agree in batch and heads (dims 0, 1), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    if kernel and q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[3]} is not supported; use one of {HEAD_DIMS}")
    if kernel:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(-1) != 1 and t.numel() > 0:
                raise ValueError(f"{name} must have unit stride in its last dim (got strides {t.stride()}); "
                                 f"call .contiguous() on it")
    B, N_K = k.shape[0], k.shape[2]
    if key_padding_mask is not None and key_lengths is not None:
        raise ValueError("give key_padding_mask or key_lengths, not both")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), "
                             f"got {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (B, N_K):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(B, N_K)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"key_lengths must be an int32 or int64 tensor, "
                             f"got {getattr(key_lengths, 'dtype', type(key_lengths).__name__)}")
        if tuple(key_lengths.shape) != (B,):
            raise ValueError(f"key_lengths must have shape (B,) = {(B,)}, got {tuple(key_lengths.shape)}")
        if key_lengths.device != q.device:
            raise ValueError(f"key_lengths is on {key_lengths.device}, q on {q.device}")


def masked_attention(q, k, v, key_padding_mask=None, key_lengths=None, scale=None):
    """softmax(q k^T * scale) v over the visible keys, fused in Triton; differentiable in q, k and v.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); D in (16, 32, 64, 128); float32, float16 or bfloat16, all alike;
    any strides with unit stride in the last dim. Give at most one of
      key_padding_mask: (B, Nk) bool, True = padding (hidden from every query of that sample);
      key_lengths: (B,) int32/int64, keys [0, len) visible (values clamped to [0, Nk]).
    scale defaults to D ** -0.5. Returns (B, H, Nq, D) in q's dtype (a view of a (B, Nq, H, D) buffer).
    A query with no visible key gets zeros and zero gradients. CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1 (set before triton is imported).
    """
    _check(q, k, v, key_padding_mask, key_lengths)
    if q.device.type == "cpu" and not INTERPRET:
        raise ValueError("masked_attention got CPU tensors but Triton's interpreter is off: set "
                         "TRITON_INTERPRET=1 before triton is imported, or move the tensors to CUDA")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _attention_fwd(q, k, v, key_padding_mask, key_lengths, scale)
    return out


def padding_from_lengths(key_lengths, n_keys):
    """(B,) lengths -> (B, Nk) bool key-padding mask (True = padding), the same semantics as the kernel."""
    return torch.arange(n_keys, device=key_lengths.device)[None, :] >= key_lengths[:, None]


def reference_attention(q, k, v, key_padding_mask=None, key_lengths=None, scale=None):
    """The kernel's definition in plain torch, float64 (returns float64): what the tests compare against.

    Same arguments and semantics as masked_attention; it materialises the (B, H, Nq, Nk) scores, so it is
    for small shapes only. Differentiable, with zero gradients for rows without visible keys.
    """
    _check(q, k, v, key_padding_mask, key_lengths, kernel=False)
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    pad = key_padding_mask
    if key_lengths is not None:
        pad = padding_from_lengths(key_lengths, k.shape[2])
    if pad is None:
        return scores.softmax(dim=-1) @ v
    empty = pad.all(dim=1)  # (B,) samples with no visible key
    # Their keys are un-hidden (softmax of all -inf would be NaN, and NaN survives a later masked_fill in the
    # backward), then their weights are set to 0: output 0, gradient 0.
    pad = pad & ~empty[:, None]
    weights = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(dim=-1)
    weights = weights.masked_fill(empty[:, None, None, None], 0.0)
    return weights @ v  # (B, H, Nq, D)
