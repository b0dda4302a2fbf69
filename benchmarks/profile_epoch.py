"""Where one epoch's time goes: the loader (index + augmentation + normalisation) against the
training steps, and the top operators of the steps by self CPU time (torch.profiler).

    python benchmarks/profile_epoch.py --recipe fast75 --steps 40 [--precision fp32] [--batch-size 512]

The steps are `engine.train_step` on the run `build_run` makes, so this times what `train` runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cifarlab.build import build_run, local_runtime
from cifarlab.config import recipe
from cifarlab.data import load_data
from cifarlab.engine import train_step

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fast75")
    parser.add_argument("--data", default=str(DATA), help="the training source (default: the shared archive)")
    parser.add_argument("--steps", type=int, default=40, help="training steps to time and profile")
    parser.add_argument("--precision", help="override the recipe's precision (auto, fp32, bf16, fp16)")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    args = parser.parse_args()
    config = recipe(args.recipe)
    if args.precision:
        config = dataclasses.replace(config, precision=args.precision)
    if args.batch_size:
        config = dataclasses.replace(config, batch_size=args.batch_size)
    bundle = load_data(args.data, val_split=config.val_split, seed=config.seed)
    config, runtime = local_runtime(config, bundle)  # precision and layout as `train` resolves them
    run = build_run(config, bundle, runtime)  # the same model, init, groups, schedule and step as `train`

    start = time.perf_counter()
    batches = [batch for _, batch in zip(range(args.steps), run.train_loader)]
    synchronize(runtime.device)
    loader_seconds = time.perf_counter() - start

    run.step.model.train()
    train_step(run.step, batches[0])  # warm-up (oneDNN primitive creation)
    start = time.perf_counter()
    for batch in batches[1:]:
        train_step(run.step, batch)
    synchronize(runtime.device)  # wait for the last step (a GPU runs ahead of the host)
    step_seconds = (time.perf_counter() - start) * len(batches) / (len(batches) - 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches[1:6]:
            train_step(run.step, batch)

    per_epoch = len(run.train_loader) / len(batches)
    print(f"recipe {args.recipe}: {config.model} {config.model_args}, batch {config.batch_size}, "
          f"{'channels_last' if config.channels_last else 'NCHW'}, precision {runtime.amp_dtype or torch.float32}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"loader: {loader_seconds * per_epoch:.2f} s/epoch; steps: {step_seconds * per_epoch:.2f} s/epoch; "
          f"loader share {100 * loader_seconds / (loader_seconds + step_seconds):.1f}%")
    sort = "self_cuda_time_total" if runtime.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=12))


if __name__ == "__main__":
    main()
