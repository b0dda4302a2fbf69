"""airbench94/95/96 against cifarlab's fast94/95/96 on the same GPU and the same data, N seeds each.

airbench comes from PyPI (`pip install airbench`, a benchmark-only extra: `.[bench]`). Its
`CifarLoader` reads `cifar10/train.pt` and `cifar10/test.pt` from the working folder; they are
written here from our cached tensors of the same source (train: our training split; test: our
held-out validation split), so both train and evaluate on identical images.

    python benchmarks/vs_airbench.py --data data/cifar10-jpeg-train.tar.gz --runs 5 [--target 95] [--side airbench]

Prints, per side: accuracy mean +- std (6-view TTA as each reports it), training + TTA seconds by
CUDA events for airbench and by our summary (`train_seconds` + `tta_seconds`, host clock after a
sync) for ours, and the whole `cifarlab train` command's wall time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cifarlab.data import load_data


def write_airbench_data(data: str, val_split: int, folder: Path) -> None:
    """train.pt / test.pt in airbench's layout: uint8 images [N, 32, 32, 3], int64 labels, class names."""
    bundle = load_data(data, val_split=val_split)
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", bundle.train), ("test", bundle.val)):
        torch.save({"images": split.images.permute(0, 2, 3, 1).contiguous(), "labels": split.labels,
                    "classes": bundle.classes}, folder / f"{name}.pt")


# each airbench variant's own augmentation (its lib_airbench9N.hyp['aug'])
AIRBENCH_AUG = {94: {"flip": True, "translate": 2}, 95: {"flip": True, "translate": 2},
                96: {"flip": True, "translate": 4, "cutout": 12}}


def run_airbench(target: int, runs: int, workdir: Path) -> list[dict]:
    import airbench

    os.chdir(workdir)  # its loaders read ./cifar10/{train,test}.pt
    train_loader = airbench.CifarLoader("cifar10", train=True, batch_size=1024, aug=AIRBENCH_AUG[target],
                                        altflip=True)
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    train = getattr(airbench, f"train{target}")
    getattr(airbench, f"warmup{target}")(train_loader, verbose=False)  # cuDNN autotuning, as its README does
    results = []
    for seed in range(runs):
        torch.manual_seed(seed)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model = train(train_loader, verbose=False)
        accuracy = airbench.evaluate(model, test_loader, tta_level=2)
        end.record()
        torch.cuda.synchronize()
        results.append({"accuracy": accuracy, "seconds": start.elapsed_time(end) / 1000, "wall": None})
        print(f"  airbench{target} seed {seed}: {100 * accuracy:.2f}% in {results[-1]['seconds']:.2f}s", flush=True)
    return results


def run_cifarlab(target: int, runs: int, data: str, val_split: int, workdir: Path, extra: list[str]) -> list[dict]:
    results = []
    for seed in range(runs):
        out = workdir / f"fast{target}-{seed}"
        command = [sys.executable, "-m", "cifarlab", "train", "--data", data, "--recipe", f"fast{target}", "--seed", str(seed),
                   "--val-split", str(val_split), "--device", "cuda", "--out", str(out), *extra]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        summary = json.loads((out / "summary.json").read_text())
        accuracy = summary["tta"]["accuracy"] if summary.get("tta") else summary["accuracy"]
        results.append({"accuracy": accuracy, "seconds": summary["train_seconds"] + summary.get("tta_seconds", 0.0),
                        "wall": wall})
        epochs = [float(row["seconds"]) for row in csv.DictReader((out / "metrics.csv").read_text().splitlines())]
        print(f"  fast{target} seed {seed}: {100 * accuracy:.2f}% in {results[-1]['seconds']:.2f}s "
              f"(whole command {wall:.1f}s; epoch 1 {epochs[0]:.2f}s, then {statistics.median(epochs[1:]):.3f}s "
              f"median, evaluation included)", flush=True)
    return results


def row(name: str, results: list[dict]) -> str:
    accuracies = [r["accuracy"] for r in results]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    walls = [r["wall"] for r in results if r["wall"] is not None]
    wall = f"{statistics.median(walls):.1f}" if walls else "-"
    return (f"| {name} | {len(results)} | {100 * statistics.mean(accuracies):.2f} +- {100 * spread:.2f}% | "
            f"{statistics.median(r['seconds'] for r in results):.2f} | {wall} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the training source (e.g. the shared JPEG archive)")
    parser.add_argument("--runs", type=int, default=5, help="seeds per side")
    parser.add_argument("--target", type=int, default=94, choices=(94, 95, 96),
                        help="airbench9N against cifarlab's fast9N")
    parser.add_argument("--val-split", type=int, default=5000, help="held-out images both sides are tested on")
    parser.add_argument("--side", default="both", choices=("both", "airbench", "cifarlab"),
                        help="run both sides, or only one (airbench first when both)")
    args, extra = parser.parse_known_args()  # anything else goes to `cifarlab train` (e.g. --compile)
    if not torch.cuda.is_available():
        sys.exit("vs_airbench: needs a CUDA GPU (airbench runs on CUDA only)")
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        theirs = ours = None
        if args.side in ("both", "airbench"):  # the anchor first: it is the cheaper side
            write_airbench_data(data, args.val_split, workdir / "cifar10")
            theirs = run_airbench(args.target, args.runs, workdir)
        if args.side in ("both", "cifarlab"):
            ours = run_cifarlab(args.target, args.runs, data, args.val_split, workdir, extra)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; data {args.data}, "
          f"{args.val_split} held-out images as the test set")
    print("| | runs | accuracy (6-view TTA) | training + TTA s (median) | whole command s (median) |")
    print("|---|---|---|---|---|")
    if theirs is not None:
        print(row(f"airbench{args.target} (PyPI, not compiled)", theirs))
    if ours is not None:
        print(row(f"cifarlab fast{args.target} {' '.join(extra)}".strip(), ours))


if __name__ == "__main__":
    main()
