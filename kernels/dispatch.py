"""When model.py's attention runs our fused kernel instead of SDPA: impl "auto" on CUDA, and
"triton".

model.attention hands off here; this file holds the rule and the measurements it rests on, so that
the model file keeps only the math and SDPA paths.
"""

import torch

from .attention import HEAD_DIMS, masked_attention

# What impl="auto" runs on CUDA, from the H200 measurements of 2026-11-26 (docs/gpu_2026-11-26,
# kernels/README.md: batch 256, bf16, forward + backward of one attention call, ours against SDPA
# with the same mask):
#   * launches captured (torch.compile, CUDA graphs): ours won at both of M3AE's shapes, the
#     encoder's 81 tokens (D 64; 0.53x SDPA's time) and the decoder's 321 (D 32; 0.39x), and the
#     whole compiled base step took 74.1 ms against 90.2 ms;
#   * eager: each call of ours costs ~0.9 ms of Python launch work (autotuner lookup, two Triton
#     launchers), which the GPU work hides only at the decoder's size: encoder 2.40x SDPA's time
#     (3.5x without a mask), decoder 0.40x (0.78x without a mask).
# So eager calls use our kernel only for sequences of at least EAGER_TRITON_MIN_SEQ keys. The two
# measured points bracket the cross-over (81 lost, 321 won, with and without a mask); 256 is the
# decoder's lower end (1 + 256 patches at 256 px) and keeps every encoder shape (at most 1 + 64 + 16
# = 81 tokens) on SDPA. Lengths between 81 and 321 were not measured.
EAGER_TRITON_MIN_SEQ = 256


def attention_impl(device_type, launch_free, seq_len, head_dim):
    """impl="auto"'s choice, "triton" or "sdpa". device_type: "cuda", "cpu", ...; launch_free: the
    call is being traced by torch.compile or captured in a CUDA graph (no per-call Python launch
    cost); seq_len: keys per sample; head_dim: per head (the kernel takes 16, 32, 64 and 128; huge's
    80 stays on SDPA)."""
    if device_type != "cuda":
        return "sdpa"  # off CUDA the kernel only runs in Triton's interpreter (tests)
    if head_dim not in HEAD_DIMS:
        return "sdpa"
    return "triton" if launch_free or seq_len >= EAGER_TRITON_MIN_SEQ else "sdpa"


def fused_attention(q, k, v, key_padding_mask=None, auto=False):
    """Our fused kernel's output, (B, nh, Tq, hs); with auto=True, None where attention_impl picks
    SDPA (the caller then runs SDPA). q, k, v, key_padding_mask: as model.attention."""
    if auto:
        # traced by torch.compile, or captured into a CUDA graph: Python launches no kernel at
        # run time
        launch_free = (torch.compiler.is_compiling()
                       or (q.is_cuda and torch.cuda.is_current_stream_capturing()))
        if attention_impl(q.device.type, launch_free, k.size(-2), q.size(-1)) != "triton":
            return None
    return masked_attention(q, k, v, key_padding_mask)
