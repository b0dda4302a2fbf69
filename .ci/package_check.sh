#!/usr/bin/env bash
# The package outside this checkout: build the sdist and wheel, install the wheel into a fresh virtual
# environment in a temporary folder (torch and the other dependencies come from the system site, so
# nothing large is downloaded again), and run it there on a tiny image folder this script writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PYTHON -m build --sdist --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
$PYTHON -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps "$work"/dist/cifarlab-*.whl
cd "$work"  # away from the checkout: what runs is the wheel's copy
where=$("$work/venv/bin/python" -c "import cifarlab; print(cifarlab.__file__)")
case "$where" in "$work/venv/"*) ;; *) echo "package check: imported $where, not the wheel's copy"; exit 1;; esac
"$work/venv/bin/cifarlab" --version
"$work/venv/bin/cifarlab" --help > /dev/null
"$work/venv/bin/python" - <<'PY'
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for name in ("cat", "dog"):
    Path("images", name).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"images/{name}/{i}.png")
PY
CIFARLAB_CACHE="$work/cache" "$work/venv/bin/cifarlab" train --data images --max-steps 1 --batch-size 8 \
    --val-split 4 --device cpu --precision fp32 --no-channels-last --out run > /dev/null
test -f run/summary.json
echo "package check: wheel $(basename "$work"/dist/cifarlab-*.whl) installed, ran --help, --version and a one-step train"
