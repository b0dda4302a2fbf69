#!/usr/bin/env bash
# GPU issue (#11) in one call of about 5 minutes on one H100/H200 (the device tool): the no-host-sync test,
# fast94 against airbench94 side by side (5 seeds each), and fast94 with --compile (cold, then warm cache).
# The long recipes have their own script: benchmarks/gpu_recipes.sh.
#
# The device machine has no network and no ../shared, so carry a folder `gpu/` (listed in
# .git/info/exclude) holding the data archive and the wheels, made here first:
#   mkdir -p gpu && cp ../shared/data/cifar10-jpeg-train.tar.gz gpu/
#   pip wheel --no-deps airbench pytest pluggy iniconfig packaging pygments -w gpu/
# then run:  bash benchmarks/gpu_check.sh   with carry ["gpu"] and a timeout of about 480 s.
# Results go to $OUT (the device tool's output folder), or /tmp/gpu-out.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
timeout 300 python benchmarks/vs_airbench.py --data "$DATA" --target 94 --runs 5 2>&1 | tee "$OUT/vs_airbench94.txt"
for attempt in cold warm; do
  start=$(date +%s%N)
  timeout 150 python -m cifarlab train --data "$DATA" --recipe fast94 --device cuda --out "/tmp/compile-$attempt" \
    --compile 2>&1 | tail -1 | tee -a "$OUT/compile.txt"
  echo "fast94 --compile ($attempt cache): whole command $(( ($(date +%s%N) - start) / 1000000 )) ms" \
    | tee -a "$OUT/compile.txt"
done
