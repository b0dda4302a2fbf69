"""The run folder: a fresh directory per run, and the small readable files written into it."""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from cifarlab.engine import EpochRecord
from cifarlab.errors import CifarlabError

METRIC_COLUMNS = [f.name for f in fields(EpochRecord)]


def new_run_dir(out: str | None, recipe: str) -> Path:
    """Create the run folder: `out` if given (it must not exist yet), else a new one under runs/."""
    if out is not None:
        path = Path(out).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CifarlabError(f"--out {path}: already exists and is not empty; runs are never overwritten")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in range(1000):
        path = Path("runs") / (f"{recipe}-{stamp}" + (f"-{suffix}" if suffix else ""))
        try:
            path.mkdir(parents=True, exist_ok=False)  # atomic: two runs started together get two folders
            return path
        except FileExistsError:
            continue
    raise CifarlabError("runs/: could not find a free folder name")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.csv, one row per epoch, flushed as each epoch ends (readable while the run goes on)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_COLUMNS)
        self.writer.writeheader()

    def write(self, record: EpochRecord) -> None:
        row = {k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in asdict(record).items()}
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def versions() -> dict:
    import torchvision

    from cifarlab import __version__

    return {"cifarlab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
