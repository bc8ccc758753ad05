"""Compile the attention kernels for a GPU that is not here, and read what the compiler made of them.

    python kernels/compile_check.py                  # every autotune config, bf16, D 32/64/128, boolean mask
    python kernels/compile_check.py --dtype fp32 --head-dims 64 --modes 0 1 2
    python kernels/compile_check.py --quick          # one config per kernel and mode (what the tests run)

Triton compiles ahead of time for a named target (default sm_90, H100/H200) with its bundled ptxas, no
GPU or driver needed. For each kernel and config this prints the registers per thread, the spill stack
(bytes of local memory per thread: any is slow), dynamic shared memory, and how many Hopper warpgroup
matrix instructions (HGMMA, wgmma) the SASS holds: a tile loop without them runs on slower units.
The arguments are specialised the way a launch from attention.py would be (16-byte aligned pointers and
strides, unit stride of the mask constant), so the code is the code a launch would get. Exits 1 when a
kernel fails to compile.
"""

import argparse
import os
import subprocess
import sys
import tempfile

# The real compiler, not the interpreter, must sit behind @triton.jit: set before triton is imported.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the default
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention as A  # noqa: E402

KERNELS = {"fwd": A._attn_fwd_kernel, "bwd_dq": A._attn_bwd_dq_kernel, "bwd_dkdv": A._attn_bwd_dkdv_kernel}
DATA_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
PTR_TYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
TORCH_DTYPE = {"bf16": A.torch.bfloat16, "fp16": A.torch.float16, "fp32": A.torch.float32}


def signature(fn, dtype, mode, head_dim, block_m, block_n, scale_type="fp32"):
    """(signature, constexprs, attrs) for ASTSource, as a launch from attention.py would specialise them.
    scale_type: how the float scale arguments arrive; fp32 from an eager launch, fp64 from torch.compile's
    launch of a user kernel (torch 2.11)."""
    sig, attrs = {}, {}
    consts = dict(HEAD_DIM=head_dim, MODE=mode, DOT_PRECISION=A._dot_precision(TORCH_DTYPE[dtype]), UPCAST_DOT=False,
                  SCAN_BLOCK=A._scan_block(321, mode), BLOCK_M=block_m, BLOCK_N=block_n)  # 321: M3AE's decoder
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name == "stride_mn" and mode == A.BOOL_MASK:  # a contiguous mask: stride 1 becomes a constant
            sig[name] = "constexpr"
            consts[name] = 1
        elif name in DATA_PTRS or name in ("LSE", "DELTA", "MASK", "LENS"):
            sig[name] = {"LSE": "*fp32", "DELTA": "*fp32", "MASK": "*i1", "LENS": "*i64"}.get(name, PTR_TYPE[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name.startswith("stride"):
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # D, H*D and N*H*D are multiples of 16 for D >= 16
        elif name in ("H", "N_Q", "N_K"):
            sig[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = scale_type
        else:
            raise ValueError(f"compile_check does not know kernel argument {name!r}")
    return sig, consts, attrs


def _tool(name):
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def inspect_cubin(cubin):
    """(registers, spill stack bytes, HGMMA count) from cuobjdump and nvdisasm (None where a tool is missing)."""
    regs = stack = hgmma = None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        if _tool("cuobjdump"):
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
            for word in usage.split():
                if word.startswith("REG:"):
                    regs = int(word[4:])
                elif word.startswith("STACK:"):
                    stack = int(word[6:])
        if _tool("nvdisasm"):
            sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
            hgmma = sass.count("HGMMA")
    return regs, stack, hgmma


def compile_one(kernel, dtype, mode, head_dim, config, arch, scale_type="fp32"):
    fn = kernel.fn  # the JITFunction behind the autotuner
    sig, consts, attrs = signature(fn, dtype, mode, head_dim, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                                   scale_type)
    compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return compiled.metadata.shared, *inspect_cubin(compiled.asm["cubin"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(PTR_TYPE))
    ap.add_argument("--head-dims", nargs="+", type=int, default=[32, 64, 128], choices=list(A.HEAD_DIMS))
    ap.add_argument("--modes", nargs="+", type=int, default=[A.BOOL_MASK], choices=[0, 1, 2],
                    help="0: no mask, 1: key_lengths, 2: boolean mask")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--quick", action="store_true", help="only the first config of each kernel")
    ap.add_argument("--scale-type", default="fp32", choices=["fp32", "fp64"],
                    help="type of the float scale arguments: fp32 as an eager launch passes them, fp64 as "
                         "torch.compile (torch 2.11) passes them to a user kernel")
    args = ap.parse_args(argv)

    print(f"triton {triton.__version__}, target sm_{args.arch}, scale arguments {args.scale_type}\n")
    print("| kernel | dtype | D | mode | BLOCK_M x BLOCK_N | warps | stages | regs | spill B | smem KB | HGMMA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failures, rows = 0, []
    for name, kernel in KERNELS.items():
        configs = kernel.configs[:1] if args.quick else kernel.configs
        for dtype in args.dtype:
            for head_dim in args.head_dims:
                for mode in args.modes:
                    for cfg in configs:
                        label = (f"| {name} | {dtype} | {head_dim} | {mode} | {cfg.kwargs['BLOCK_M']} x "
                                 f"{cfg.kwargs['BLOCK_N']} | {cfg.num_warps} | {cfg.num_stages} |")
                        try:
                            smem, regs, stack, hgmma = compile_one(kernel, dtype, mode, head_dim, cfg, args.arch,
                                                                     args.scale_type)
                        except Exception as e:  # report every failure, then exit 1
                            failures += 1
                            print(f"{label} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]} |||||")
                            continue
                        rows.append(dict(kernel=name, dtype=dtype, spill=stack, hgmma=hgmma))
                        print(f"{label} {regs} | {stack} | {smem / 1024:.1f} | {hgmma} |", flush=True)
    print(f"\n{len(rows)} compiled, {failures} failed")
    return rows, failures


if __name__ == "__main__":
    sys.exit(1 if main()[1] else 0)
