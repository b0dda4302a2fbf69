"""From a source to the splits a run uses: train, and the split it is evaluated on (test or held-out val)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cifarlab.data.cache import load_splits
from cifarlab.data.download import fetch_official
from cifarlab.data.sources import ImageSet, Splits
from cifarlab.errors import CifarlabError

DEFAULT_VAL_SPLIT = 5000  # images held out when the source has no test split


@dataclass
class DataBundle:
    train: ImageSet  # what the model is trained on (the val images removed)
    val: ImageSet | None  # held-out images from the training source, if any
    test: ImageSet | None  # the source's own test split, if it has one
    source: str  # a path, or 'cifar10' / 'cifar100'

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def eval_split(self) -> str | None:
        """The split a run reports on: the held-out val when there is one, else the source's test."""
        return "val" if self.val is not None else ("test" if self.test is not None else None)

    def split(self, name: str) -> ImageSet:
        chosen = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if chosen is None:
            raise CifarlabError(f"{self.source}: has no '{name}' split (it has: "
                                f"{', '.join(n for n in ('train', 'val', 'test') if getattr(self, n) is not None)})")
        return chosen


def stratified_split(labels: torch.Tensor, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): n_val images drawn per class in proportion to its size, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    if not 0 <= n_val <= len(labels) - len(classes):
        raise ValueError(f"n_val {n_val}: must be 0..{len(labels) - len(classes)} so every class keeps a training image")
    exact = counts.double() * n_val / len(labels)
    take = torch.minimum(exact.floor().long(), counts - 1)  # every class keeps a training image
    # the images flooring left over go one each to the largest remainders among classes with room,
    # so the total is exactly n_val (load_data guarantees n_val <= images - classes)
    while int(take.sum()) < n_val:
        room = take < counts - 1
        order = torch.argsort(torch.where(room, exact - take, torch.full_like(exact, -1e9)), descending=True)
        take[order[: min(n_val - int(take.sum()), int(room.sum()))]] += 1
    val_parts = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        val_parts.append(members[torch.randperm(len(members), generator=generator)[:k]])
    val = torch.cat(val_parts).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def resolve_source(data: str | None, dataset: str | None, notes: list[str] | None = None) -> tuple[Path, str]:
    """(local path to read, how to name the source in configs). A named dataset may come from a shared
    data folder; `notes` then says which one."""
    if data and dataset:
        raise CifarlabError("pass either --data SOURCE or --dataset NAME, not both")
    if data:
        path = Path(data).expanduser()
        if not path.exists():
            raise CifarlabError(f"{data}: no such file or folder")
        return path, str(path.resolve())
    name = dataset or "cifar10"
    return fetch_official(name, notes), name


def load_data(data: str | None = None, dataset: str | None = None, val_split: int | None = None,
              seed: int = 0, image_size: int = 32, notes: list[str] | None = None) -> DataBundle:
    """Load a source (a local path, or an official dataset by name) and hold out the validation split.

    val_split None means: 5000 images when the source has no test split, none when it has one.
    """
    path, source = resolve_source(data, dataset, notes)
    splits: Splits = load_splits(path, image_size, notes)
    if len(splits.train.classes) < 2:
        raise CifarlabError(f"{path}: only one class ({splits.train.classes[0]}); a classifier needs two or more")
    n_val = (DEFAULT_VAL_SPLIT if splits.test is None else 0) if val_split is None else val_split
    if n_val < 0 or n_val >= len(splits.train) - len(splits.train.classes) + 1:
        raise CifarlabError(f"--val-split {n_val}: must be from 0 to {len(splits.train) - len(splits.train.classes)} "
                            f"for {path} ({len(splits.train)} training images)")
    if n_val == 0:
        return DataBundle(splits.train, None, splits.test, source)
    train_idx, val_idx = stratified_split(splits.train.labels, n_val, seed)
    return DataBundle(splits.train.subset(train_idx), splits.train.subset(val_idx), splits.test, source)
