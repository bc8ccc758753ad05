"""train.py --bench: the analytic FLOP count against torch's flop counter, --profile's op classes and table, and a
dry run of bench/gpu_speed.sh on CPU (every command and flag the GPU session will run)."""

import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from kernels import op_profile
from model import M3AE, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- FLOPs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["paired", "image", "text"])
@pytest.mark.parametrize("overrides", [{}, dict(image_size=48, text_len=20, text_mask_ratio=0.5, mlp_ratio=3.0)])
def test_flops_per_sample_equal_the_flop_counter(mode, overrides):
    """Exact: train_flops_per_sample counts every matrix product of one training step (forward and backward)
    that torch.utils.flop_counter sees. attn "math", because the counter sees attention only as matmuls or as
    CUDA's SDPA kernels; CPU's SDPA (_scaled_dot_product_flash_attention_for_cpu) is not in its table, so it
    would count no attention at all. The old formula (forward x 3) counted the patch embedding's input gradient,
    which is never computed: 1.1% too many on the tiny preset image-only, 0.1% on base."""
    c = make_config("tiny", vocab_size=50, attn_impl="math", **overrides)
    model = M3AE(c)
    B = 2
    images = torch.randn(B, 3, c.image_size, c.image_size) if mode != "text" else None
    text = torch.randint(1, 50, (B, c.text_len)) if mode != "image" else None
    if text is not None:
        text[1, 5:] = 0  # padding is computed all the same (dense count)
    with FlopCounterMode(display=False) as counter:
        model(images, text)["loss"].backward()
    expected = train.train_flops_per_sample(c, with_text=mode != "image", with_image=mode != "text")
    assert counter.get_total_flops() == B * expected


# --- --profile -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", [
    # CPU (aten op names)
    ("aten::mm", "GEMM"), ("aten::addmm", "GEMM"), ("aten::bmm", "GEMM"), ("MmBackward0", "GEMM"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"), ("aten::_softmax", "attention"),
    ("m3ae::masked_attention_bwd", "attention"), ("aten::_log_softmax", "loss"),
    ("aten::_log_softmax_backward_data", "loss"), ("aten::nll_loss_forward", "loss"), ("aten::mse_loss", "loss"),
    ("aten::native_layer_norm", "norm"), ("aten::gelu_backward", "norm"), ("aten::add", "norm"),
    ("aten::masked_fill", "norm"), ("aten::gather", "gather"), ("aten::scatter_add_", "gather"),
    ("aten::sort", "gather"), ("aten::embedding_dense_backward", "gather"), ("aten::index_select", "gather"),
    ("aten::copy_", "copy"), ("aten::_to_copy", "copy"), ("aten::cat", "copy"), ("aten::fill_", "copy"),
    ("Optimizer.step#AdamW.step", "optimizer"), ("aten::_foreach_mul_", "optimizer"),
    ("aten::mul_ [optimizer step]", "optimizer"), ("aten::_fused_adamw_", "optimizer"),
    ("aten::view", "other"), ("aten::empty_strided", "other"),
    # CUDA kernel names and torch.compile's fused kernels
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"), ("nvjet_tst_192x192_64x3", "GEMM"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"), ("_attn_bwd_dkdv_kernel", "attention"),
    ("pytorch_flash::flash_fwd_kernel", "attention"), ("triton_poi_fused_addmm_gelu_3", "norm"),
    ("triton_red_fused__log_softmax_nll_loss_forward_7", "loss"), ("triton_poi_fused__to_copy_12", "copy"),
    ("triton_per_fused_native_layer_norm_5", "norm"), ("triton_tem_fused_mm_0", "GEMM"),
    ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"), ("Memset (Device)", "copy"),
])
def test_op_classes(name, cls):
    assert op_profile.op_class(name).startswith(cls), (name, op_profile.op_class(name))


def test_bench_profile_on_cpu(capsys):
    """The tiny preset, 2 steps: the same code path a GPU takes, with CPU self times."""
    result = train.main(["--bench", "--bench-steps", "2", "--profile", "--batch-size", "4", "--device", "cpu",
                         "--vocab-size", "64"])
    text = capsys.readouterr().out
    assert re.search(r"MFU \d+\.\d%", text)
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+)% \|$", text, re.M)
    classes = {name: (float(ms), float(pct)) for name, ms, pct in rows}
    assert sum(pct for _, pct in classes.values()) == pytest.approx(100, abs=0.5)
    for cls in ("GEMM", "attention", "loss", "optimizer", "norm"):
        assert any(name.startswith(cls) and ms > 0 for name, (ms, _) in classes.items()), cls
    # every recorded op of the 2 steps is in the table, and the optimizer's own ops are tagged as its
    assert sum(result["profile_us"].values()) / 2e3 == pytest.approx(sum(ms for ms, _ in classes.values()), rel=1e-2)
    assert any(name.endswith("[optimizer step]") for name in result["profile_us"])


# --- the GPU script, dry-run on CPU --------------------------------------------------------------------


def test_gpu_speed_script_dry_run(tmp_path):
    """DRY=1: every step of bench/gpu_speed.sh with the tiny preset on CPU, except eager_triton (our kernel in
    Triton's interpreter: a minute on 2 cores; its flags are --no-compile --attn triton, both run here)."""
    script = os.path.join(ROOT, "bench", "gpu_speed.sh")
    default = re.search(r"steps=\(([^)]*)\)", open(script).read().split("[ ${#steps[@]} -eq 0 ]")[1]).group(1)
    steps = [s for s in default.split() if s != "eager_triton"]
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PY": sys.executable}
    subprocess.run(["bash", script, *steps], cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    summary = (tmp_path / "summary.md").read_text()
    for s in steps:
        assert f"## {s} (rc 0)" in summary, s
    assert summary.count("| op class |") == sum(s not in ("info", "real_data", "loader") for s in steps)
    assert "input pipeline alone:" in summary and '"step": 2' in summary and "vocab 30522" in summary
