"""What --layer-stats costs the seed recipe: the same training steps timed with the recorder off and on.

One process builds the seed recipe's run on the shared CIFAR-10 images, then times spans of --span steps
(a multiple of the cadence, so each span holds span / cadence recordings), alternating off and on,
--repeats of each; the cost is the median span on over the median span off, minus one (and the same
from the fastest spans, which other jobs on a shared machine disturb least). Training steps
are the seed recipe's whole epoch but its evaluation, so this is (at most) the share of its epoch time:

    flock /tmp/cifarlab-bench.lock python benchmarks/layer_stats_cost.py
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cifarlab.build import build_run, local_runtime
from cifarlab.config import recipe
from cifarlab.data import load_data
from cifarlab.device import keep_freed_memory, set_cpu_threads
from cifarlab.engine import train_step
from cifarlab.layer_stats import open_layer_stats
from cifarlab.trainer import seed_everything
from cifarlab.tuning import describe_cpu

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--recipe", default="seed")
    parser.add_argument("--every", type=int, help="cadence (default: the recipe's --layer-stats)")
    parser.add_argument("--span", type=int, default=100, help="steps per timed span")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = recipe(args.recipe)
    every = args.every or config.layer_stats
    if args.span % every:
        parser.error(f"--span {args.span}: must be a multiple of the cadence {every}")
    set_cpu_threads(1)
    keep_freed_memory()  # as the trainer does
    bundle = load_data(args.data, config.val_split, seed=config.seed)
    config, runtime = local_runtime(config, bundle)
    seed_everything(config.seed)
    run = build_run(config, bundle, runtime)
    batches = iter(())
    epoch = 0

    def span() -> float:
        nonlocal batches, epoch
        started = time.perf_counter()
        for _ in range(args.span):
            batch = next(batches, None)
            if batch is None:  # a new pass over the images, as the trainer's next epoch
                epoch += 1
                run.train_loader.set_epoch(epoch)
                batches = iter(run.train_loader)
                batch = next(batches)
            train_step(run.step, batch)
        return time.perf_counter() - started

    run.step.model.train()
    span()  # warm-up: first-use allocations and kernel choices
    off, on = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            off.append(span())
            with open_layer_stats(Path(folder), run.model, run.step.optimizer, every):
                on.append(span())
    base, recorded = statistics.median(off), statistics.median(on)
    steps_per_epoch = len(run.train_loader)
    print(f"{args.recipe}: {runtime.amp_dtype or torch.float32}, every {every} steps, spans of {args.span} steps, "
          f"{args.repeats} each; {describe_cpu()}")
    print(f"off: median {base:.2f} s per span ({', '.join(f'{s:.2f}' for s in off)})")
    print(f"on:  median {recorded:.2f} s per span ({', '.join(f'{s:.2f}' for s in on)})")
    print(f"cost: {100 * (recorded / base - 1):+.1f}% of the training time "
          f"({1000 * (recorded - base) / (args.span // every):.0f} ms per recording; an epoch of "
          f"{steps_per_epoch} steps takes about {base * steps_per_epoch / args.span:.0f} s here)")
    # other jobs on a shared machine only ever slow a span down: the fastest spans are the least disturbed
    print(f"fastest spans: {100 * (min(on) / min(off) - 1):+.1f}% ({min(off):.2f} s off, {min(on):.2f} s on)")


if __name__ == "__main__":
    main()
