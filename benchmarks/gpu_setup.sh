# Sourced by the gpu_*.sh scripts: install from the carried gpu/ folder, name the card, set OUT and DATA.
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DATA=gpu/cifar10-jpeg-train.tar.gz
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
pip install -q --no-deps gpu/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
