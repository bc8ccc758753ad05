#!/usr/bin/env bash
# The experiment table of docs/results.md in miniature, on the built-in data: the paper's four orderings over seeds.
#
#   STEPS=1000 ./sweep.sh                      # every knob below is an environment variable
#   OUT=runs/real_v1 TRAIN_ARGS="--csv runs/realdata/captions/pairs.csv" \
#       PROBES="runs/realdata/fashion_mnist/train:runs/realdata/fashion_mnist/test ..." ./sweep.sh  # real data
#   STEPS=2 SEEDS=0 OUT=runs/sweep_smoke TRAIN_ARGS="--train-size 128 --batch-size 16 --warmup-steps 1" \
#       EVAL_ARGS="--train-size 64 --test-size 32 --epochs 3" OOD_ARGS="--ood-size 32" ./sweep.sh   # smoke
#
# Per seed: pretrain five variants with train.py (M3AE; MAE = --no-text; text mask 0.15; 10% and 0% paired,
# the rest split into unpaired images and texts), then probe.py (fast mode: linear probe + kNN, on the main
# object's shape, then with --label colour on its colour) and ood.py
# (Mahalanobis, relative Mahalanobis, MSP) on each checkpoint, and both on a random-init encoder (the floor).
# Finally `sweep.py OUT` writes OUT/table.md: mean ± std over seeds, and whether each ordering holds.
# Re-running is cheap: train.py --resume skips finished runs and probe/ood read their cached features.
#
# Runs go JOBS at a time (default: one per core), each with cores/JOBS torch threads: on the 2-core CPU box,
# two one-thread runs side by side train 1.7x faster in total than one two-thread run (the tiny model's
# matmuls are too small for two threads to pay). Each run's output goes to OUT/logs/RUN.log.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")"
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-1000}                                  # pretraining steps per run (global batch 64)
SEEDS=${SEEDS:-"0 1 2"}                               # pretraining seed = probe seed
VARIANTS=${VARIANTS:-"m3ae text015 paired10 paired0 mae"}   # longest first: the jobs pack better
OUT=${OUT:-runs/sweep}
TRAIN_ARGS=${TRAIN_ARGS:-}                            # extra train.py flags (e.g. --csv pairs.csv)
PROBES=${PROBES-builtin}    # builtin: the built-in shape and colour labels; else "TRAIN_DIR:TEST_DIR ..."
OODS=${OODS-builtin}        # builtin: held-out built-in shapes; else "TRAIN_DIR:TEST_DIR:OOD_DIR ..."; "": none
EVAL_ARGS=${EVAL_ARGS:-}                              # extra flags for both probe.py and ood.py
OOD_ARGS=${OOD_ARGS:-}                                # extra ood.py flags (e.g. --ood-size 1000)
CORES=$(nproc)
JOBS=${JOBS:-$CORES}                                  # runs at a time
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))}
export STEPS OUT TRAIN_ARGS EVAL_ARGS OOD_ARGS PY PROBES OODS

# the evaluations of one checkpoint (extra flags, e.g. --random-init, as arguments)
evaluate() {
  local ckpt=$1 seed=$2; shift 2
  if [ "$PROBES" = builtin ]; then
    $PY probe.py --ckpt "$ckpt" --seed "$seed" "$@" $EVAL_ARGS &&
      $PY probe.py --ckpt "$ckpt" --seed "$seed" --label colour "$@" $EVAL_ARGS || return 1
  else
    for pair in $PROBES; do
      $PY probe.py --ckpt "$ckpt" --seed "$seed" --train-dir "${pair%%:*}" --test-dir "${pair#*:}" \
        "$@" $EVAL_ARGS || return 1
    done
  fi
  if [ "$OODS" = builtin ]; then
    $PY ood.py --ckpt "$ckpt" --seed "$seed" "$@" $EVAL_ARGS $OOD_ARGS || return 1
  else
    for triple in $OODS; do
      IFS=: read -r tr te od <<<"$triple"
      $PY ood.py --ckpt "$ckpt" --seed "$seed" --train-dir "$tr" --test-dir "$te" --ood-dir "$od" \
        "$@" $EVAL_ARGS $OOD_ARGS || return 1
    done
  fi
}

flags() {
  case $1 in
    m3ae) echo "" ;;                                  # text mask 0.75, 100% paired: the paper's M3AE
    mae) echo "--no-text" ;;                          # the same recipe, image-only
    text015) echo "--text-mask-ratio 0.15" ;;
    paired10) echo "--paired-share 0.1" ;;
    paired0) echo "--paired-share 0" ;;
    textw2) echo "--text-weight 2.0" ;;                 # not in the default list: the text-weight lever (docs/log.md)
    *) echo "unknown variant $1" >&2; exit 1 ;;
  esac
}

# one job: `sweep.sh run VARIANT SEED` pretrains and evaluates one run; `sweep.sh floor SEED VARIANT`
# evaluates a random-init encoder of that run's architecture (it reads the run's config, so it comes
# after the runs; every variant has the same encoder)
if [ "${1:-}" = run ] || [ "${1:-}" = floor ]; then
  if [ "$1" = run ]; then
    v=$2 seed=$3 name=${2}_s$3
  else
    v=floor seed=$2 name=floor_s$2 of=$3
  fi
  start=$SECONDS
  # chained with &&: set -e does not apply inside a group that is followed by ||
  {
    if [ "$v" = floor ]; then
      evaluate "$OUT/${of}_s$seed/ckpt.pt" "$seed" --random-init
    else
      dir=$OUT/$name
      $PY train.py --steps "$STEPS" --seed "$seed" --out-dir "$dir" --no-probe --resume $(flags "$v") $TRAIN_ARGS &&
        evaluate "$dir/ckpt.pt" "$seed"
    fi
  } >"$OUT/logs/$name.log" 2>&1 || { echo "FAILED: $name (last lines of $OUT/logs/$name.log):"; tail -n 20 "$OUT/logs/$name.log"; exit 1; }
  echo "$(date -u +%T) done $name in $(( SECONDS - start )) s"
  exit 0
fi

mkdir -p "$OUT/logs"
echo "sweep: $STEPS steps, seeds $SEEDS, variants $VARIANTS; $JOBS jobs x $OMP_NUM_THREADS threads; logs in $OUT/logs"
for v in $VARIANTS; do for seed in $SEEDS; do flags "$v" >/dev/null; echo "run $v $seed"; done; done \
  | xargs -P "$JOBS" -L 1 bash "$SELF"
for seed in $SEEDS; do echo "floor $seed ${VARIANTS%% *}"; done | xargs -P "$JOBS" -L 1 bash "$SELF"
$PY sweep.py "$OUT"
echo "sweep: done in $SECONDS s"
