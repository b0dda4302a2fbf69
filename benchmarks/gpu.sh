#!/usr/bin/env bash
# Every GPU measurement in one script, for the device tool's one H100/H200 (a fresh machine each time,
# no network, no ../shared). Steps run in the order named, each under a timeout; a step whose estimate
# no longer fits in BUDGET seconds (default 540) is skipped, so the script always ends in time and a
# second call can take the rest:
#   bash benchmarks/gpu.sh sync cold 94 compile 95       then      bash benchmarks/gpu.sh muon 96 resnet
# Steps (estimated seconds on an H200):
#   sync    (60)  tests/test_gpu.py: an epoch of steps with no host synchronisation
#   cold    (60)  one fast94 command on a fresh data cache (decoding the JPEGs included)
#   94     (200)  fast94 against airbench94, 5 seeds each (benchmarks/vs_airbench.py)
#   compile(150)  fast94 --compile, cold then warm inductor cache, whole command timed
#   95     (150)  fast95 against airbench95, 3 seeds each
#   muon    (90)  fast94 with --optimizer muon at airbench94_muon's 8 epochs, 5 seeds (our side only)
#   eager94 (90)  fast94 as it was before 2026-11-28 (eager steps, every epoch evaluated, no lookahead
#                 or alternating flips), 5 seeds (our side only): the baseline of the changes since
#   sweep94(240)  airbench94's five settings fast94 lacked (--alternate-flip, --lookahead, --schedule
#                 triangle, --bias-decay, --whiten-bias-epochs 3) on that baseline, as a half-factorial
#                 sweep, 16 configurations x 3 seeds, 4 runs at a time (benchmarks/sweep.py): each
#                 one's main effect over 24 against 24 runs (docs/notes.md has the 2026-11-28 result)
#   96     (200)  fast96 against airbench96, 1 seed each
#   resnet (100)  seconds per epoch of resnet56 and resnet18 at batch 128 and 512
#   timeline(40)  fast94 once, each output line stamped (benchmarks/timeline.py): where the whole
#                 command's seconds go beyond training
#   profile94(40) fast94's steps: host against GPU time (benchmarks/profile_epoch.py)
#   airbench(150) airbench94/95/96 alone (5/3/1 seeds), and ours94 (60) fast94 alone (3 seeds): for a
#                 call that measures the anchors beside our side on the same machine
#
# Carry a folder `gpu/` (listed in .git/info/exclude) made here first:
#   mkdir -p gpu && cp ../shared/data/cifar10-jpeg-train.tar.gz gpu/ && pip wheel --no-deps airbench -w gpu/
# Results go to $OUT (the device tool's output folder), or /tmp/gpu-out. FLAGS94 (e.g. --eval-each-epoch): extra
# flags of the timeline step.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${BUDGET:-540}
FLAGS94=${FLAGS94:-}
DATA=gpu/cifar10-jpeg-train.tar.gz
STARTED=$(date +%s)
mkdir -p "$OUT"

# step NAME ESTIMATE COMMAND...: run COMMAND into $OUT/NAME.txt unless fewer than ESTIMATE seconds are left
step() {
  local name=$1 estimate=$2 left
  shift 2
  left=$(( BUDGET - $(date +%s) + STARTED ))
  if (( left < estimate )); then
    echo "skipped $name: ${left}s left, needs about ${estimate}s" | tee -a "$OUT/skipped.txt"
    return
  fi
  echo "== $name ($(date -u +%H:%M:%S) UTC, ${left}s left)"
  timeout "$left" bash -c '"$@"' _ "$@" 2>&1 | grep -v "^USDT" | tee -a "$OUT/$name.txt"
}

# timed LABEL COMMAND...: the command's last line and its whole wall time
timed() {
  local label=$1 start
  shift
  start=$(date +%s%N)
  "$@" 2>&1 | tail -1
  echo "$label: whole command $(( ($(date +%s%N) - start) / 1000000 )) ms"
}

fast94() {  # fast94 OUT_FOLDER [EXTRA...]
  local out=$1
  shift
  python -m cifarlab train --data "$DATA" --recipe fast94 --device cuda --out "$out" "$@"
}

variant94() {  # variant94 NAME FLAGS...: fast94 with FLAGS, 5 seeds
  local name=$1
  shift
  step "$name" 90 python benchmarks/vs_airbench.py --data "$DATA" --target 94 --runs 5 --side cifarlab "$@"
}

# fast94's settings before 2026-11-28, the baseline of eager94 and sweep94
EAGER94="--no-cuda-graph --eval-each-epoch --no-lookahead --no-alternate-flip"
export DATA FLAGS94
export -f timed fast94  # step runs its command in a child bash, under timeout
# No pip needed: scripts under benchmarks/ import the package from this checkout, and airbench (pure
# Python) straight from its wheel; the device's Python has torch, pytest and the rest.
export PYTHONPATH=$PWD:$(ls "$PWD"/gpu/airbench-*.whl)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__)"; nproc; } | tee "$OUT/gpu.txt"

for name in "$@"; do
  case $name in
    sync) step sync 60 python -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
    cold) step cold 60 timed "fast94, fresh data cache" fast94 /tmp/fast94-cold
          cat /tmp/fast94-cold/metrics.csv >> "$OUT/cold.txt" ;;  # the first epoch against the rest
    timeline) step timeline 40 python benchmarks/timeline.py python -m cifarlab train --data "$DATA" \
                --recipe fast94 --device cuda --out /tmp/fast94-timeline $FLAGS94 ;;
    profile94) step profile94 40 python benchmarks/profile_epoch.py --data "$DATA" --recipe fast94 --steps 60 ;;
    94) step 94 200 python benchmarks/vs_airbench.py --data "$DATA" --target 94 --runs 5 ;;
    airbench) for target_runs in 94:5 95:3 96:1; do  # the anchors alone, beside a call that ran our side
                step airbench 50 python benchmarks/vs_airbench.py --data "$DATA" --target "${target_runs%:*}" \
                  --runs "${target_runs#*:}" --side airbench
              done ;;
    ours94) step ours94 60 python benchmarks/vs_airbench.py --data "$DATA" --target 94 --runs 3 --side cifarlab ;;
    compile) step compile 150 timed "fast94 --compile, cold inductor cache" fast94 /tmp/compile-cold --compile \
               --no-cuda-graph
             step compile 40 timed "fast94 --compile, warm inductor cache" fast94 /tmp/compile-warm --compile \
               --no-cuda-graph ;;
    95) step 95 150 python benchmarks/vs_airbench.py --data "$DATA" --target 95 --runs 3 ;;
    muon) step muon 90 python benchmarks/vs_airbench.py --data "$DATA" --target 94 --runs 5 --side cifarlab \
            --optimizer muon --epochs 8 ;;
    eager94) variant94 eager94 $EAGER94 ;;
    sweep94) step sweep94 240 python benchmarks/sweep.py --data "$DATA" --recipe fast94 --device cuda --seeds 3 \
               --workers 4 --half $EAGER94 --option=--alternate-flip --option=--lookahead \
               --option="--schedule triangle" --option=--bias-decay --option="--whiten-bias-epochs 3" ;;
    96) step 96 200 python benchmarks/vs_airbench.py --data "$DATA" --target 96 --runs 1 ;;
    resnet) for recipe in resnet56 resnet18; do
              for batch in 128 512; do
                step resnet 25 python benchmarks/profile_epoch.py --data "$DATA" --recipe "$recipe" --steps 60 \
                  --batch-size "$batch"
              done
            done ;;
    *) echo "unknown step $name" ;;
  esac
done
echo "done in $(( $(date +%s) - STARTED )) s" | tee -a "$OUT/gpu.txt"
