"""The notebook as a learner writes it, timed to 75% on the held-out images: the baseline a learner feels.

Everything the teaching notebook does and nothing it does not: a torchvision ImageFolder with
per-image ToTensor and Normalize, a DataLoader at batch 64 with one worker per core, the notebook's
CIFAR10CNN (4 convs + ReLU, max-pooling after convs 2-4, 256 hidden units, log-softmax) in fp32, Adam
at 1e-3, NLL loss, no augmentation, an evaluation after every epoch. It holds out the same stratified
5,000 images as `cifarlab train` (seed 0). Prints one line per epoch and a last line:

    python benchmarks/learner_baseline.py [--epochs 8] [--json]

The clock starts after the archive is unpacked (a learner unpacks once) and stops at the end of the
first evaluation at >= 75%. `time_to_accuracy.py --learner` runs it in the same run as the recipes.
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from cifarlab.data.splits import stratified_split
from cifarlab.tuning import describe_cpu

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's, as tutorials quote them


class CIFAR10CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
                                        nn.LogSoftmax(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feature_extractor(x))


def train(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for data, target in loader:
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def test(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum((model(data).argmax(1) == target).sum().item() for data, target in loader)
    return correct / len(loader.dataset)


def time_to_75(root: Path, max_epochs: int, seed: int = 0, n_val: int = 5000, target: float = 0.75) -> dict:
    """Train as the notebook does until the held-out accuracy reaches `target`; the seconds and epochs it took."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    images = datasets.ImageFolder(str(root), transform=transforms.Compose([transforms.ToTensor(),
                                                                           transforms.Normalize(MEAN, STD)]))
    train_idx, val_idx = stratified_split(torch.tensor(images.targets), n_val, seed)
    workers = len(os.sched_getaffinity(0))
    train_loader = DataLoader(Subset(images, train_idx.tolist()), batch_size=64, shuffle=True, num_workers=workers,
                              persistent_workers=True)
    val_loader = DataLoader(Subset(images, val_idx.tolist()), batch_size=64, num_workers=workers,
                            persistent_workers=True)
    model = CIFAR10CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve = []
    for epoch in range(1, max_epochs + 1):
        train(model, train_loader, optimizer)
        curve.append(test(model, val_loader))
        seconds = time.perf_counter() - started
        print(f"  learner epoch {epoch}: val {100 * curve[-1]:.2f}% at {seconds:.1f}s", flush=True)
        if curve[-1] >= target:
            return {"to_75": seconds, "epoch_75": epoch, "curve": curve}
    return {"to_75": None, "epoch_75": None, "curve": curve}


def unpacked(archive: Path, into: Path) -> Path:
    """The archive's image folder root (train/<class>/...), unpacked under `into`."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return next(p.parent for p in sorted(into.rglob("airplane")) if p.is_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the shared JPEG archive")
    parser.add_argument("--epochs", type=int, default=8, help="give up after this many epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = parser.parse_args()
    print(f"machine: {describe_cpu()}; fp32, NCHW, batch 64, {len(os.sched_getaffinity(0))} loader workers")
    with tempfile.TemporaryDirectory() as tmp:
        result = time_to_75(unpacked(args.data, Path(tmp)), args.epochs, args.seed)
    reached = (f"75% at epoch {result['epoch_75']}, {result['to_75']:.1f}s" if result["to_75"] is not None
               else f"75% not reached in {args.epochs} epochs")
    print(f"learner baseline: {reached}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
