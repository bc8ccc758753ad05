#!/usr/bin/env bash
# The README's experiment table in miniature, on the built-in data: the paper's four orderings over seeds.
#
#   STEPS=250 ./sweep.sh                       # every knob below is an environment variable
#   STEPS=2 SEEDS=0 OUT=runs/sweep_smoke TRAIN_ARGS="--train-size 128 --batch-size 16 --warmup-steps 1" \
#       EVAL_ARGS="--train-size 64 --test-size 32 --epochs 3" OOD_ARGS="--ood-size 32" ./sweep.sh   # smoke
#
# Per seed: pretrain five variants with train.py (M3AE; MAE = --no-text; text mask 0.15; 10% and 0% paired,
# the rest split into unpaired images and texts), then probe.py (fast mode: linear probe + kNN) and ood.py
# (Mahalanobis, relative Mahalanobis, MSP) on each checkpoint, and both on a random-init encoder (the floor).
# Finally `probe.py --table` writes OUT/table.md: mean ± std over seeds, and whether each ordering holds.
# Re-running is cheap: train.py --resume skips finished runs and probe/ood read their cached features.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-250}                                   # pretraining steps per run (global batch 64)
SEEDS=${SEEDS:-"0 1 2"}                               # pretraining seed = probe seed
VARIANTS=${VARIANTS:-"m3ae mae text015 paired10 paired0"}
OUT=${OUT:-runs/sweep}
TRAIN_ARGS=${TRAIN_ARGS:-}                            # extra train.py flags
EVAL_ARGS=${EVAL_ARGS:-}                              # extra flags for both probe.py and ood.py
OOD_ARGS=${OOD_ARGS:-}                                # extra ood.py flags (e.g. --ood-size 1000)

flags() {
  case $1 in
    m3ae) echo "" ;;                                  # text mask 0.75, 100% paired: the paper's M3AE
    mae) echo "--no-text" ;;                          # the same recipe, image-only
    text015) echo "--text-mask-ratio 0.15" ;;
    paired10) echo "--paired-share 0.1" ;;
    paired0) echo "--paired-share 0" ;;
    *) echo "unknown variant $1" >&2; exit 1 ;;
  esac
}

for seed in $SEEDS; do
  for v in $VARIANTS; do
    dir=$OUT/${v}_s$seed
    $PY train.py --steps "$STEPS" --seed "$seed" --out-dir "$dir" --no-probe --resume $(flags "$v") $TRAIN_ARGS
    $PY probe.py --ckpt "$dir/ckpt.pt" --seed "$seed" $EVAL_ARGS
    $PY ood.py --ckpt "$dir/ckpt.pt" --seed "$seed" $EVAL_ARGS $OOD_ARGS
  done
  $PY probe.py --ckpt "$OUT/m3ae_s$seed/ckpt.pt" --random-init --seed "$seed" $EVAL_ARGS
  $PY ood.py --ckpt "$OUT/m3ae_s$seed/ckpt.pt" --random-init --seed "$seed" $EVAL_ARGS $OOD_ARGS
done
$PY probe.py --table "$OUT"
