"""Time-to-accuracy of a recipe against the notebook's `seed` recipe, measured in the same run.

Each run is the whole `cifarlab train` command in a fresh process (start-up, data from a warm cache,
training, final evaluation, writing the run folder), timed from outside. Prints one table:

    python benchmarks/time_to_accuracy.py --recipe fast75 --runs 5 --baseline-runs 3 --baseline-epochs 6

Each timed run of the recipe follows an untimed run of the same command (`--warm-runs`), so that every
timed run starts where the machine has just run it, not where a long baseline run left it.

Figures: median wall seconds, accuracy mean +- std over seeds, images/s, and the share of this
machine's measured matmul peak that training reached (forward FLOPs x 3 for forward + backward).
The headline is the ratio of the seed recipe's time to 75% (wall time up to the end of the first
epoch at >= 75%, start-up included) to the recipe's median wall time. With `--learner-runs N` the
notebook as a learner writes it (`learner_baseline.py`) runs too, interleaved with the others, and
its time to 75% gets a ratio of its own.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cifarlab.config import recipe
from cifarlab.data import load_data
from cifarlab.models.catalog import forward_flops
from cifarlab.models import create_model
from cifarlab.tuning import describe_cpu, resolve_auto

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` on this machine (the denominator of 'fraction of peak')."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def run_once(recipe_name: str, seed: int, out_root: Path, extra: list[str]) -> dict:
    out = out_root / f"{recipe_name}-seed{seed}"
    command = [sys.executable, "-m", "cifarlab", "train", "--data", str(DATA), "--recipe", recipe_name,
               "--seed", str(seed), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    # time to 75%: start-up (wall minus the epochs' own seconds) plus the epochs up to the first >= 75%
    epoch_seconds = [float(r["seconds"]) for r in rows]
    startup = wall - sum(epoch_seconds)
    reached = next((i for i, r in enumerate(rows) if r["val_acc"] and float(r["val_acc"]) >= 0.75), None)
    to_75 = startup + sum(epoch_seconds[:reached + 1]) if reached is not None else None
    headline = summary["tta"]["accuracy"] if summary.get("tta") else summary["accuracy"]  # the recipe's own TTA
    return {"wall": wall, "accuracy": headline, "images_per_second": summary["images_per_second"],
            "precision": f"{summary['precision'].removeprefix('torch.')}, "
                         f"{'channels_last' if summary.get('channels_last') else 'NCHW'}",
            "to_75": to_75, "epoch_75": reached + 1 if reached is not None else None,
            "train_seconds": summary["train_seconds"], "epochs": summary["epochs"]}


def learner_once(seed: int) -> dict:
    """One run of learner_baseline.py in a fresh process: its time to 75% (None if not reached)."""
    command = [sys.executable, str(Path(__file__).with_name("learner_baseline.py")), "--data", str(DATA),
               "--seed", str(seed), "--json"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def describe(name: str, runs: list[dict], peak: float) -> dict:
    config = recipe(name)
    model = create_model(config.model, **config.model_args)
    flops_per_image = 3 * forward_flops(model)  # forward + backward ~ 3 forward passes
    accuracies = [r["accuracy"] for r in runs]
    ips = statistics.median(r["images_per_second"] for r in runs)
    to_75 = [r["to_75"] for r in runs if r["to_75"] is not None]
    return {
        "recipe": name, "runs": len(runs), "median_wall_s": statistics.median(r["wall"] for r in runs),
        "acc_mean": statistics.mean(accuracies), "acc_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
        "images_per_s": ips, "peak_fraction": ips * flops_per_image / peak,
        "median_to_75_s": statistics.median(to_75) if to_75 else None, "all": runs,
        "precision": runs[0]["precision"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fast75")
    parser.add_argument("--runs", type=int, default=5, help="seeds 0..runs-1 of the recipe")
    parser.add_argument("--baseline", default="seed", help="recipe to compare against ('' for none)")
    parser.add_argument("--baseline-runs", type=int, default=1)
    parser.add_argument("--baseline-epochs", type=int,
                        help="stop the baseline early (its schedule is constant, so the first epochs are the same)")
    parser.add_argument("--warm-runs", type=int, default=1,
                        help="untimed runs of the recipe before each timed one (default 1; see below)")
    parser.add_argument("--learner-runs", type=int, default=0,
                        help="runs of the notebook as a learner writes it (learner_baseline.py; minutes each)")
    parser.add_argument("--device", default="cpu")
    args, extra = parser.parse_known_args()
    extra += ["--device", args.device]

    dtype = torch.float32 if args.device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.bfloat16
    peak = matmul_peak(dtype, args.device)
    where = describe_cpu() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"machine: {where}; measured {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        load_data(str(DATA))  # warms the data cache (decoding is a one-off), not timed
        for name in {args.recipe, args.baseline} - {""}:  # and the once-per-machine precision/layout timing
            resolve_auto(recipe(name), torch.device(args.device), 10)
        baseline_extra = ["--epochs", str(args.baseline_epochs)] if args.baseline_epochs else []
        plan = [(args.recipe, args.runs, extra)]
        if args.baseline:
            plan.append((args.baseline, args.baseline_runs, extra + baseline_extra))
        # interleaved (recipe seed 0, baseline seed 0, recipe seed 1, ...): a shared machine's speed drifts
        # over minutes, and the ratio should not depend on which recipe ran in the slow minutes. Each timed
        # run of the recipe follows an untimed one: on the Zen 4 of docs/benchmarks.md a 20 s fast75 run straight
        # after a 150 s seed run took 19-35 s (median 25), after anything else 18-23 s; the baseline's long
        # runs absorb such after-effects of what ran before them
        runs: list[list[dict]] = [[] for _ in plan]
        learner: list[float | None] = []
        for seed in range(max(n for _, n, _ in [*plan, ("", args.learner_runs, [])])):
            if seed < args.learner_runs:
                learner.append(learner_once(seed)["to_75"])
                print(f"  learner seed {seed}: 75% at {learner[-1] or float('nan'):.1f}s", flush=True)
            for i, ((name, n, flags), done) in enumerate(zip(plan, runs)):
                if seed < n:
                    for warm in range(args.warm_runs if i == 0 else 0):
                        run_once(name, seed, Path(tmp) / f"warm-{seed}-{warm}", flags)
                    r = run_once(name, seed, Path(tmp) / str(i), flags)
                    done.append(r)
                    reached = (f"plain val >= 75% first at epoch {r['epoch_75']}, {r['to_75']:.1f}s"
                               if r["to_75"] is not None else "plain val < 75% at every epoch's end")
                    print(f"  {name} seed {seed}: {r['wall']:.1f}s, accuracy {100 * r['accuracy']:.2f}% ({reached})",
                          flush=True)
        rows = [describe(name, done, peak) for (name, _, _), done in zip(plan, runs)]

    print("\n| recipe | runs | accuracy (val, 5000 held out) | median wall s | to 75% s | images/s | of peak | "
          "precision, layout (measured) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        to_75 = f"{r['median_to_75_s']:.1f}" if r["median_to_75_s"] is not None else "not reached"
        print(f"| {r['recipe']} | {r['runs']} | {100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f}% | "
              f"{r['median_wall_s']:.1f} | {to_75} | {r['images_per_s']:.0f} | {100 * r['peak_fraction']:.1f}% | "
              f"{r['precision']} |")
    # the recipe's whole command counts when its final (TTA) accuracy clears 75%; the baseline's time is
    # to the end of its first epoch at >= 75%
    if len(rows) == 2 and rows[1]["median_to_75_s"] and min(r["accuracy"] for r in rows[0]["all"]) >= 0.75:
        print(f"\ntime to 75%: {args.baseline} {rows[1]['median_to_75_s']:.1f}s / {args.recipe} "
              f"{rows[0]['median_wall_s']:.1f}s = {rows[1]['median_to_75_s'] / rows[0]['median_wall_s']:.1f}x")
    if learner and None not in learner:
        print(f"time to 75%: the notebook as a learner writes it {statistics.median(learner):.1f}s (median of "
              f"{len(learner)}) / {args.recipe} {rows[0]['median_wall_s']:.1f}s = "
              f"{statistics.median(learner) / rows[0]['median_wall_s']:.1f}x")


if __name__ == "__main__":
    main()
