"""Seconds `cifarlab explain` takes for one image, start-up (imports) excluded, and the round-trip of
one upload to `cifarlab serve`: for the seed CNN (the seed recipe's model arguments) and fast_net at
64/256/256 (airbench94's widths). The target is 1 s each on 2 CPU cores. With --report RUN_DIR (a
finished run, for example of `--recipe fast75`) it also times each section of `cifarlab report` for that
run: the "What the network sees" section's target is 10 s.

    flock /tmp/cifarlab-bench.lock python benchmarks/explain_speed.py --repeat 7 --report runs/fast75

Each figure is the median of --repeat runs (the first, which warms the caches, is left out). explain
loads the model, computes the top-5, feature maps, Grad-CAM and Integrated Gradients, writes the .npz
and draws its pictures and kernels.png: what the command does after Python has started. The weights are
a fresh initialisation: the time does not depend on their values.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifarlab.config import recipe
from cifarlab.explain import explain_files
from cifarlab.models import create_model
from cifarlab.report import SECTIONS, load_run
from cifarlab.rundir import ModelInfo, save_model
from cifarlab.serve import ExplainServer

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODELS = {"seed CNN": ("cifar10_cnn", recipe("seed").model_args),
          "fast_net 64/256/256": ("fast_net", {"widths": [64, 256, 256]})}


def _run_dir(root: Path, name: str, args: dict) -> Path:
    torch.manual_seed(0)
    info = ModelInfo(name, dict(args), CLASSES, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], 32, {})
    save_model(root / name / "model.pt", create_model(name, **args), info)
    return root / name


def _median(seconds: list[float]) -> str:
    rest = seconds[1:]  # the first run warms the caches
    return f"{statistics.median(rest):.3f} s (min {min(rest):.3f}, max {max(rest):.3f})"


def time_explain(run: Path, image: Path, out: Path, repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        explain_files(run, [image], out)
        seconds.append(time.perf_counter() - started)
    return seconds


def time_serve(run: Path, image: Path, repeat: int) -> list[float]:
    server = ExplainServer(run, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, body, seconds = f"http://127.0.0.1:{server.server_address[1]}/explain", image.read_bytes(), []
    try:
        for _ in range(repeat + 1):
            started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")) as response:
                response.read()
            seconds.append(time.perf_counter() - started)
    finally:
        server.shutdown()
        server.server_close()
    return seconds


def time_report(run_dir: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds each of `cifarlab report`'s sections takes to render for run_dir, pictures included."""
    run, seconds = load_run(run_dir), {section: [] for section in SECTIONS}
    for _ in range(repeat + 1):
        for section in SECTIONS:
            started = time.perf_counter()
            section(run)
            seconds[section].append(time.perf_counter() - started)
    return {section.__name__.strip("_"): times for section, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--report", type=Path, metavar="RUN_DIR", help="also time each report section for this run")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        image = root / "photo.jpg"  # a camera-sized JPEG: decoding and resizing it is part of the work
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
        for label, (name, model_args) in MODELS.items():
            run = _run_dir(root, name, model_args)
            print(f"{label:<20}  explain {_median(time_explain(run, image, root / 'out', args.repeat))}"
                  f"   serve round-trip {_median(time_serve(run, image, args.repeat))}", flush=True)
    if args.report:
        sections = time_report(args.report, args.repeat)
        for name, seconds in sections.items():
            print(f"report {name:<22}  {_median(seconds)}")
        totals = [sum(run) for run in zip(*sections.values())][1:]  # the first run warms the caches
        print(f"report, all sections    {statistics.median(totals):.3f} s (median)")


if __name__ == "__main__":
    main()
