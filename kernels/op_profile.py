"""Where a training step's time goes, by op class: `python train.py --bench --profile` prints this table.

torch.profiler records every op of a few steps. On CUDA each GPU kernel's time goes to the op that launched it
(aten::mm, m3ae::masked_attention_bwd, or under torch.compile the fused kernel's own name, e.g.
triton_poi_fused_add_native_layer_norm_3); on CPU each op's self time (its time minus its children's) counts.
Either way every microsecond is counted once, and a name is put in the first class of OP_CLASSES whose pattern
it contains. The same code runs on both: the tests run it on CPU (tests/test_bench.py).
"""

import re
import warnings
from collections import Counter

import torch

# (class, pattern searched in the lower-cased op or kernel name); the first match wins, so the order matters:
# the optimizer's ops first (op_times tags every op inside an optimizer step: AdamW's per-tensor mul_, sqrt on
# CPU), the loss's log_softmax before attention's softmax, SDPA's cutlass fmha kernels before the GEMMs' cutlass
# kernels, masking's index ops before element-wise ones.
OP_CLASSES = [
    ("optimizer (adamw, _foreach, fused)", r"adam|_foreach|optimizer|multi_tensor"),
    ("loss (mse, cross_entropy, log_softmax)", r"mse_loss|cross_entropy|log_softmax|nll_loss"),
    ("attention (sdpa, ours, math softmax)", r"attention|attn|flash|fmha|sdpa|softmax"),
    ("GEMM (mm, addmm, bmm)", r"(^|[^a-z])(add)?mm|bmm|matmul|linear|gemm|cutlass|cublas|xmma|nvjet"),
    ("gather/scatter/index/sort (masking, embedding)", r"gather|scatter|index|sort|embedding|nonzero"),
    ("norm, activation, element-wise", r"norm|gelu|tanh|add|sub|mul|div|pow|sum|mean|sqrt|exp|where|elementwise"
     r"|reduce|masked_fill"),
    ("copy, cast, fill", r"copy|clone|contiguous|cat|stack|fill|zero|memset|memcpy|cast|convert"),
]
OTHER = "other"
# inductor's fused point-wise / reduction kernels (triton_poi_*, triton_red_*, triton_per_*) are never matrix
# products, though their names may say addmm (a bias add fused after an extern mm)
FUSED_ELEMENTWISE = re.compile(r"triton_(poi|red|per)_")


def op_class(name):
    """The class of an op or kernel name (OP_CLASSES), OTHER when none matches."""
    low = name.lower()
    for cls, pattern in OP_CLASSES:
        if re.search(pattern, low) and not (cls.startswith("GEMM") and FUSED_ELEMENTWISE.match(low)):
            return cls
    return OTHER


def _in_optimizer_step(e):
    """Whether a CPU event runs inside optimizer.step() (torch records it as "Optimizer.step#AdamW.step")."""
    while e is not None:
        if e.name.startswith("Optimizer."):
            return True
        e = e.cpu_parent
    return False


def op_times(events, device):
    """{op name: microseconds} over profiler events: on "cuda" the GPU time of the kernels each op launched
    (kernels with no launching op under their own name), on "cpu" each op's self CPU time. Ops inside an
    optimizer step are named "NAME [optimizer step]"."""
    times = Counter()
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    tag = lambda e, name: f"{name} [optimizer step]" if _in_optimizer_step(e) else name
    if device == "cuda":
        for e in cpu:
            for k in e.kernels:  # the kernels this op launched itself (its children's are theirs)
                # an op that says nothing (e.g. a record_function around a launch) is named by its kernel
                times[tag(e, e.name if op_class(e.name) != OTHER else k.name)] += k.duration
        gpu_total = sum(e.self_device_time_total for e in events  # every kernel, memcpy and memset once
                        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", 0))
        unlinked = gpu_total - sum(times.values())
        if unlinked > 0:
            times["(GPU time with no launching op)"] += unlinked
        elif unlinked < -0.001 * gpu_total:  # a kernel under two ops would be counted twice: say so
            warnings.warn(f"op_profile: ops claim {-unlinked:.0f} us more GPU time than the kernels took")
    else:
        for e in cpu:
            if not e.is_async:
                times[tag(e, e.name)] += e.self_cpu_time_total
    return times


def profile_steps(step, steps, cuda):
    """Run step() `steps` times under torch.profiler; returns op_times of what it recorded."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()  # every kernel of the last step inside the trace
    return op_times(prof.events(), "cuda" if cuda else "cpu")


def format_table(times, steps, step_ms, device, top=12):
    """Markdown tables: ms per step and % by class, then the `top` ops by time with their class. step_ms: the
    step as timed without the profiler, set beside the recorded time."""
    by_class = Counter()
    for name, t in times.items():
        by_class[op_class(name)] += t
    total = sum(by_class.values()) or 1
    ms = lambda us: us / 1e3 / steps
    if device == "cuda":  # the GPU's time is its own; short of the step is time it waited for the CPU
        head = (f"profile: GPU time of the kernels each op launched, {steps} steps: {ms(total):.2f} ms per step, "
                f"the GPU busy {ms(total) / step_ms:.0%} of the {step_ms:.2f} ms step timed without the profiler")
    else:  # the profiler slows CPU ops, and Python between ops is not recorded
        head = (f"profile: CPU self time of the ops, {steps} steps: {ms(total):.2f} ms per step under the profiler "
                f"(timed without it: {step_ms:.2f} ms a step)")
    lines = [head, "", "| op class | ms/step | % |", "|---|---|---|"]
    for cls, t in sorted(by_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cls} | {ms(t):.3f} | {100 * t / total:.1f}% |")
    lines += ["", f"| top {top} ops | class | ms/step | % |", "|---|---|---|---|"]
    for name, t in times.most_common(top):
        short = name if len(name) <= 80 else name[:77] + "..."
        lines.append(f"| {short} | {op_class(name)} | {ms(t):.3f} | {100 * t / total:.1f}% |")
    return "\n".join(lines)
