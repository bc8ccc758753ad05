#!/usr/bin/env bash
# docs/results.md section 1c: fine-tuning (finetune.py) against the linear probe (probe.py) from
# M3AE, MAE and random init, on real labelled folders, the same budget for each.
#
#   SWEEP=runs/real_v1 OUT=runs/ft_v1 bench/finetune_sweep.sh select   # 1. blr, crop on val
#   SWEEP=runs/real_v1 OUT=runs/ft_v1 BLR="m3ae:5e-3 mae:5e-3 random:2e-2" CROP=1 \
#       bench/finetune_sweep.sh table                                   # 2. the table
#   ... OUT=runs/ft_v1_m3ae2e-2 INITS=m3ae BLR=m3ae:2e-2 bench/finetune_sweep.sh table  # one init
#
# SWEEP holds sweep.sh's runs {m3ae,mae}_sS/ckpt.pt (with VARIANTS="m3ae mae"), whose own
# probe_<dataset>_fast.json files give the linear-probe column; random init is M3AE's architecture
# with weights from --seed. `select` fine-tunes each init on the first dataset, seed 0, PLAIN,
# for each blr of GRID and evaluation crop of CROPS, and prints the validation top-1 (the 10% of
# train finetune.py holds out): both are chosen there, never on test. `table` runs every init x
# seed x dataset x {PLAIN, mae's recipe} and writes OUT/table.md. Runs go JOBS at a time, one
# torch thread each; finished runs are skipped, so a re-run is cheap.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
PY=${PY:-.venv/bin/python}
SWEEP=${SWEEP:?SWEEP= the sweep.sh folder with m3ae_sS and mae_sS}
OUT=${OUT:-runs/ft}
SEEDS=${SEEDS:-"0 1 2"}
DATA=${DATA:-runs/realdata}
DATASETS=${DATASETS:-"fashion_mnist mnist5k"}          # DATA/<name>/{train,test}
INITS=${INITS:-"m3ae mae random"}
GRID=${GRID:-"5e-4 2e-3 5e-3 2e-2"}                    # blr (mae's 5e-4 first)
CROPS=${CROPS:-"0.875 1"}                               # --crop-pct (evalcommon's 0.875 first)
BLR=${BLR:-"m3ae:5e-4 mae:5e-4 random:5e-4"}
CROP=${CROP:-0.875}
EPOCHS=${EPOCHS:-10}
JOBS=${JOBS:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PLAIN="--mixup 0 --cutmix 0 --randaug-n 0 --reprob 0 --min-crop 1 --smoothing 0 --drop-path 0"
export PY SWEEP OUT DATA EPOCHS PLAIN

# one job: `finetune_sweep.sh one DATASET INIT SEED REGIME BLR CROP NAME`
if [ "${1:-}" = one ]; then
  set -- "${@:2}"
  dataset=$1 init=$2 seed=$3 regime=$4 blr=$5 crop=$6 name=$7
  ckpt=$SWEEP/${init}_s$seed/ckpt.pt extra=""
  [ "$init" = random ] && ckpt=$SWEEP/m3ae_s$seed/ckpt.pt extra=--random-init
  [ "$regime" = plain ] && extra="$extra $PLAIN"
  [ -s "$OUT/$name.json" ] && exit 0
  mkdir -p "$(dirname "$OUT/$name")"
  $PY finetune.py --ckpt "$ckpt" $extra --seed "$seed" --train-dir "$DATA/$dataset/train" \
    --test-dir "$DATA/$dataset/test" --workers 0 --epochs "$EPOCHS" --blr "$blr" \
    --crop-pct "$crop" --out-dir "$OUT/$name" --out "$OUT/$name.json" --overwrite \
    >"$OUT/$name.log" 2>&1 \
    || { echo "FAILED: $name"; tail -n 5 "$OUT/$name.log"; exit 1; }
  echo "$(date -u +%T) done $name"
  exit 0
fi

blr_of() { for kv in $BLR; do [ "${kv%%:*}" = "$1" ] && echo "${kv#*:}"; done; }
first=${DATASETS%% *}
mkdir -p "$OUT"
case ${1:-} in
  select)
    for init in $INITS; do for c in $CROPS; do for b in $GRID; do
      echo "$first $init 0 plain $b $c select/${init}_blr${b}_crop$c"; done; done; done \
      | xargs -P "$JOBS" -L 1 bash "$SELF" one
    for init in $INITS; do for c in $CROPS; do for b in $GRID; do
      f=$OUT/select/${init}_blr${b}_crop$c.json
      printf '%s blr %s crop %s: val top-1 %s\n' $init $b $c "$($PY -c 'import json, sys
print("%.1f" % json.load(open(sys.argv[1]))["val_top1"])' "$f")"
    done; done; done | tee "$OUT/select.txt" ;;
  table)
    for d in $DATASETS; do for init in $INITS; do for s in $SEEDS; do
      for r in plain recipe; do
        echo "$d $init $s $r $(blr_of $init) $CROP $d/${init}_s${s}_$r"; done
    done; done; done | xargs -P "$JOBS" -L 1 bash "$SELF" one
    $PY - "$OUT" "$SWEEP" "$SEEDS" "$DATASETS" "$INITS" <<'EOF' | tee "$OUT/table.md"
import glob, json, os, statistics, sys
out, sweep, seeds, datasets, inits = sys.argv[1], sys.argv[2], *(a.split() for a in sys.argv[3:])
def probe(d, init, s):
    run = f"{sweep}/{'m3ae' if init == 'random' else init}_s{s}"
    name = f"probe_{d}_fast{'_random_init' if init == 'random' else ''}.json"
    path = os.path.join(run, name)
    return json.load(open(path))["top1"] if os.path.exists(path) else float("nan")
def ms(v):
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
print("| dataset | init | fine-tune PLAIN | fine-tune mae's recipe | linear probe | seeds |")
print("|---|---|---|---|---|---|")
for d in datasets:
    for init in inits:
        col = lambda r: [json.load(open(f"{out}/{d}/{init}_s{s}_{r}.json"))["top1"] for s in seeds]
        print(f"| {d} | {init} | {ms(col('plain'))} | {ms(col('recipe'))} | "
              f"{ms([probe(d, init, s) for s in seeds])} | {' / '.join(seeds)} |")
EOF
    ;;
  *) echo "usage: [SWEEP=... OUT=...] $0 select|table" >&2; exit 2 ;;
esac
