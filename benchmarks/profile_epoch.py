"""Where one epoch's time goes: the loader (index + augmentation + normalisation) against the
training steps, and the top operators of the steps by self CPU time (torch.profiler).

    python benchmarks/profile_epoch.py --recipe fast75 --steps 40
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cifarlab.config import recipe
from cifarlab.data import load_data, channel_stats
from cifarlab.device import set_cpu_threads
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer
from cifarlab.trainer import data_dependent_init, make_loaders, memory_format

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fast75")
    parser.add_argument("--steps", type=int, default=40, help="training steps to time and profile")
    args = parser.parse_args()
    threads = set_cpu_threads()
    config = recipe(args.recipe)
    device = torch.device("cpu")
    bundle = load_data(str(DATA), val_split=config.val_split, seed=config.seed)
    mean, std = channel_stats(bundle.train.images)
    model = create_model(config.model, **config.model_args).to(memory_format=memory_format(config))
    data_dependent_init(model, bundle, device, mean, std)
    train_loader, _ = make_loaders(bundle, config, device, mean, std)
    optimizer = build_optimizer(model, config)

    start = time.perf_counter()
    batches = [batch for _, batch in zip(range(args.steps), train_loader)]
    loader_seconds = time.perf_counter() - start

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    step(*batches[0][:2])  # warm-up (oneDNN primitive creation)
    start = time.perf_counter()
    for batch in batches[1:]:
        step(*batch[:2])
    step_seconds = (time.perf_counter() - start) * len(batches) / (len(batches) - 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[1:6]:
            step(*batch[:2])

    per_epoch = len(train_loader) / len(batches)
    print(f"recipe {args.recipe}: {config.model} {config.model_args}, batch {config.batch_size}, "
          f"{'channels_last' if config.channels_last else 'NCHW'}, {threads} threads, torch {torch.__version__}")
    print(f"loader: {loader_seconds * per_epoch:.2f} s/epoch; steps: {step_seconds * per_epoch:.2f} s/epoch; "
          f"loader share {100 * loader_seconds / (loader_seconds + step_seconds):.1f}%")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
