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


LOCK_FILE = ".lock"


class RunLock:
    """One writer per run folder: RUN_DIR/.lock holds the writer's pid under an exclusive flock.

    The kernel drops a flock when its process dies, even by kill -9, so a lock left behind by a dead
    run is simply taken over; no guessing from pids, which get reused. The file is removed on exit.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path, self.fd = run_dir, run_dir / LOCK_FILE, -1

    def __enter__(self) -> "RunLock":
        import fcntl

        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CifarlabError(f"{self.run_dir}: another cifarlab process (pid {holder}) is writing this "
                                    f"run folder; wait for it or stop it first") from None
            try:  # the holder we waited on may have removed the file: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)
        raise CifarlabError(f"{self.path}: could not take the run folder's lock")

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)  # before closing, while still ours
            os.close(self.fd)
            self.fd = -1


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
