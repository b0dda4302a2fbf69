#!/usr/bin/env bash
# Long-recipes issue (#14) in one call of about 7 minutes on one H100/H200: fast95 against airbench95
# (3 seeds each), fast96 against airbench96 (1 seed each), and the seconds per epoch of the ResNet recipes
# at their paper batch and at batch 512 (from which their full runs are planned: README, "Recipes").
# Set-up as benchmarks/gpu_check.sh (carry ["gpu"]); timeout about 480 s.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
timeout 170 python benchmarks/vs_airbench.py --data "$DATA" --target 95 --runs 3 2>&1 | tee "$OUT/vs_airbench95.txt"
timeout 200 python benchmarks/vs_airbench.py --data "$DATA" --target 96 --runs 1 2>&1 | tee "$OUT/vs_airbench96.txt"
for recipe in resnet56 resnet18; do
  for batch in 128 512; do
    timeout 40 python benchmarks/profile_epoch.py --data "$DATA" --recipe "$recipe" --steps 60 --batch-size "$batch" \
      2>&1 | grep -v "^USDT" | head -3 | tee -a "$OUT/epochs.txt"
  done
done
