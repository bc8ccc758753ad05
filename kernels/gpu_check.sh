#!/usr/bin/env bash
# Everything the kernels need a GPU for, in one command (a lent GPU is scarce: one call does it all).
#
#   OUT=/tmp/gpu_check bash kernels/gpu_check.sh                  # every step; logs in $OUT, one per step
#   OUT=/tmp/gpu_check bash kernels/gpu_check.sh compiled train_triton    # only the steps named
#
# Steps, most important first, each under its own time limit so that one slow step cannot eat the rest:
#   info          GPU, driver, torch and triton versions, clocks
#   bench         python kernels/bench.py               (B=256, bf16, eager calls)
#   bench_graph   python kernels/bench.py --cuda-graph  (the same, CUDA-graph replays: no launch cost)
#   tests         tests/test_kernels.py on CUDA: every reference comparison on real hardware with the
#                 autotuned configs, plus the GPU-only tests (torch.compile fullgraph, autotuned configs)
#   compiled      only the GPU-only tests of torch.compile, and the autotuned configs at M3AE's shapes (bf16)
#   profile       python kernels/bench.py --profile     (where an eager call's CPU time goes)
#   train_triton  python train.py --bench --preset base, compiled, with our kernel
#   train_sdpa    the same with SDPA
# Uses whatever python3 the machine has (torch and triton preinstalled; pytest-xdist for the tests).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"

step() {  # step NAME SECONDS TAIL command...: run with a time limit, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2 tail=$3
    shift 3
    echo "=== $name: $* ($(date -u +%T))"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "--- $name rc=$? ($(date -u +%T))"
    tail -n "$tail" "$OUT/$name.log"
}

TRAIN=(train.py --bench --preset base --batch-size 256 --bench-steps 10 --compile)
run() {
    case $1 in
        info) step info 30 6 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit \
            --format=csv; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, \
            torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")'" ;;
        bench) step bench 180 40 "$PY" kernels/bench.py ;;
        bench_graph) step bench_graph 100 40 "$PY" kernels/bench.py --cuda-graph ;;
        tests) step tests 170 8 "$PY" -m pytest tests/test_kernels.py -v -n 12 -p no:cacheprovider \
            -k "not sm90_without_a_gpu and not bench_smoke" ;;
        compiled) step compiled 100 8 "$PY" -m pytest tests/test_kernels.py -v -n 5 -p no:cacheprovider \
            -k "fullgraph or (autotuned and (encoder or decoder) and bf16)" ;;
        profile) step profile 35 30 "$PY" kernels/bench.py --profile ;;
        train_triton) step train_triton 110 3 "$PY" "${TRAIN[@]}" --attn triton ;;
        train_sdpa) step train_sdpa 95 3 "$PY" "${TRAIN[@]}" --attn sdpa ;;
        *) echo "unknown step $1"; exit 2 ;;
    esac
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(info bench bench_graph tests profile train_triton train_sdpa)
for s in "${steps[@]}"; do run "$s"; done
