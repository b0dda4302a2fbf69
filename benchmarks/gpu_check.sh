#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 8 minutes on one H100/H200 (the device tool):
# fast94 against airbench94 side by side (5 seeds each), then a training epoch of the long recipes.
#
# The device machine has no network and no ../shared, so carry a folder `gpu/` (listed in
# .git/info/exclude) holding the data archive and the airbench wheel, made here first:
#   mkdir -p gpu && cp ../shared/data/cifar10-jpeg-train.tar.gz gpu/ && pip wheel --no-deps airbench -w gpu/
# then run:  bash benchmarks/gpu_check.sh   with carry ["gpu"] and a timeout of about 480 s.
# Results go to $OUT (the device tool's output folder), or /tmp/gpu-out.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DATA=gpu/cifar10-jpeg-train.tar.gz
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
pip install -q --no-deps gpu/airbench-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 330 python benchmarks/vs_airbench.py --data "$DATA" --runs 5 2>&1 | tee "$OUT/vs_airbench.txt"
for recipe in resnet56 resnet18 fast94; do
  timeout 40 python benchmarks/profile_epoch.py --data "$DATA" --recipe "$recipe" --steps 60 2>&1 \
    | grep -v "^USDT" | head -8 | tee -a "$OUT/epochs.txt"
done
