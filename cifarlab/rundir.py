"""The run folder: every file name in it, the one atomic write all writers use, and reading and
writing each file (config, metrics, model, resume checkpoint, summary).

Every file is written to a temporary name beside its target, fsynced, then renamed over it: a kill at
any instant leaves either the old file or the new one, never half of one. Torch files are plain dicts
of tensors and JSON-compatible values, read with `torch.load(weights_only=True)`, which refuses any
pickle that would build other objects: a file from a stranger cannot run code.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import platform
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.models import create_model
from cifarlab.records import EpochRecord

CONFIG_FILE = "config.json"  # the resolved TrainConfig
METRICS_FILE = "metrics.csv"  # one row per finished epoch, flushed as it ends
LAYERS_FILE = "layers.csv"  # --layer-stats: one row per recorded step and layer (cifarlab.layer_stats)
MODEL_FILE = "model.pt"  # the result: weights and what eval/predict need
SUMMARY_FILE = "summary.json"  # accuracy, timing, device, versions: written last
CHECKPOINT_FILE = "checkpoint.pt"  # resume state while the run is unfinished
LOCK_FILE = ".lock"
EVAL_DIR = "eval"  # the evaluation views, as `eval --out` writes them
EVAL_JSON = "eval.json"
REPORT_FILE = "report.html"
MODEL_FORMAT = "cifarlab.model/1"
CHECKPOINT_FORMAT = "cifarlab.checkpoint/1"


# --- the one atomic write --------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A temporary path in `target`'s folder to write; on success it is fsynced and renamed over
    `target`, on any failure removed. The rename is atomic, so readers see the old or the new file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_torch(obj: object, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def save_figure(figure, path: Path, dpi: int = 100) -> None:
    """A matplotlib Figure as PNG (a report built meanwhile never reads half a picture)."""
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")


def safe_load(path: Path) -> object:
    """torch.load with weights_only=True: tensors and plain values only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CifarlabError(f"{path}: refused to load: it holds objects other than tensors and plain values, "
                            f"which could run code ({_first_line(error, prefer='global')})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CifarlabError(f"{path}: corrupt or truncated checkpoint ({_first_line(error)})") from None


def _first_line(error: BaseException, prefer: str = "") -> str:
    """One line of a long message; with `prefer`, the first line naming it (torch's refusal names the
    blocked global on a later line, after advice to turn the check off, which we do not repeat)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    chosen = next((line for line in lines if prefer and prefer.lower() in line.lower()), lines[0])
    return chosen[:200]


# --- the folder itself -----------------------------------------------------------------------------

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


def remove_temporaries(run_dir: Path) -> None:
    """Half-written temporary files a killed run left (their targets are intact: rename is atomic)."""
    for stray in [*run_dir.glob("*.tmp"), *run_dir.glob(".*.tmp")]:
        stray.unlink(missing_ok=True)


# --- the model file --------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    """What model.pt records beside the weights, so a model file works without its run folder."""

    name: str
    args: dict
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    config: dict  # the run's TrainConfig as a dict


def save_model(path: Path, model: nn.Module, info: ModelInfo) -> None:
    save_torch({"format": MODEL_FORMAT, "model": info.name, "model_args": info.args, "classes": info.classes,
                "mean": info.mean, "std": info.std, "image_size": info.image_size, "config": info.config,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def resolve_model_path(path: Path) -> Path:
    """A run folder means its model.pt; a file is taken as it is."""
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.exists():
            raise CifarlabError(f"{path.parent}: not a run folder (no {MODEL_FILE}; did the run finish?)")
    elif not path.exists():
        raise CifarlabError(f"{path}: no such run folder or checkpoint")
    return path


def load_model(path: Path, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, ModelInfo]:
    """The model (weights loaded, on `device`, in eval mode) and what it was trained on."""
    path = resolve_model_path(path)
    data = safe_load(path)
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise CifarlabError(f"{path}: not a cifarlab model file (expected format {MODEL_FORMAT})")
    info = ModelInfo(data["model"], dict(data["model_args"]), list(data["classes"]), list(data["mean"]),
                     list(data["std"]), int(data["image_size"]), dict(data["config"]))
    model = create_model(info.name, **info.args)
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as error:
        raise CifarlabError(f"{path}: weights do not fit model '{info.name}' ({str(error).splitlines()[0]})") from None
    # the layout it trained in: its kernels (bf16 ones especially) round differently in the other, and `eval`
    # is to reproduce what `train` reported
    layout = torch.channels_last if info.config.get("channels_last") else torch.contiguous_format
    return model.to(device, memory_format=layout).eval(), info


# --- the resume checkpoint -------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write the resume state; on failure (a full disk) the previous checkpoint is left as it was."""
    path = run_dir / CHECKPOINT_FILE
    try:
        save_torch({"format": CHECKPOINT_FORMAT, **state}, path)
    except (OSError, RuntimeError) as error:  # torch reports some write failures as RuntimeError
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint exists"
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        raise CifarlabError(f"{path}: could not save the checkpoint ({reason}); {kept}") from None
    return path


def load_checkpoint(run_dir: Path, keys: set[str]) -> dict:
    """The checkpoint of a run folder, checked to be one holding `keys`, read with weights_only=True."""
    if not run_dir.is_dir():
        raise CifarlabError(f"--resume {run_dir}: no such run folder")
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        if (run_dir / MODEL_FILE).exists():
            raise CifarlabError(f"--resume {run_dir}: the run has finished ({MODEL_FILE} is written); "
                                f"nothing to resume")
        raise CifarlabError(f"--resume {run_dir}: no {CHECKPOINT_FILE} (the run stopped before its first "
                            f"checkpoint, or this is not a run folder); start it again")
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not keys <= state.keys():
        raise CifarlabError(f"{path}: not a cifarlab training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


# --- metrics: metrics.csv, and TensorBoard event files when asked for --------------------------------

METRIC_COLUMNS = [f.name for f in fields(EpochRecord)]
# metrics.csv column -> TensorBoard tag; grouped so train and validation share a chart
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
                    "val_acc": "accuracy/val", "lr": "lr", "seconds": "seconds_per_epoch"}


def require_tensorboard() -> None:
    """`tensorboard` is a large optional extra: checked before the run folder exists, so a missing
    package fails at once and leaves nothing behind."""
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs it; torch does not ship it)
    except ImportError:
        raise CifarlabError("--tensorboard: the 'tensorboard' package is not installed "
                            "(pip install 'cifarlab[tensorboard]' or pip install tensorboard)") from None


class MetricsLog:
    """metrics.csv (and TensorBoard scalars with `tensorboard`), one row per epoch, flushed as each
    epoch ends so both are readable while the run goes on. A resumed run rewrites the rows its
    checkpoint holds (the file's last row may have been half-written when it was killed)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.file = open(run_dir / METRICS_FILE, "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=METRIC_COLUMNS)
        self.csv.writeheader()
        self.board = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(run_dir))

    def write(self, record: EpochRecord) -> None:
        row = {k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in asdict(record).items()}
        self.csv.writerow(row)
        self.file.flush()
        if self.board is not None:
            for column, tag in TENSORBOARD_TAGS.items():
                if getattr(record, column) is not None:
                    self.board.add_scalar(tag, getattr(record, column), record.epoch)
            self.board.flush()

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _number(text: str, path: Path, line: int, column: str) -> float | None:
    if text == "":
        return None  # the writer leaves val columns empty when nothing was evaluated
    try:
        return float(text)
    except ValueError:
        raise CifarlabError(f"{path}: corrupt CSV (line {line}: {column}={text!r} is not a number)") from None


def read_metrics(path: Path) -> list[dict[str, float | None]]:
    """metrics.csv's complete rows, numbers parsed (epoch as int). A run still training may be halfway
    through writing a line, so whatever follows the last newline is not a row yet and is left out."""
    if not path.exists():
        return []  # a run that has not finished its first epoch
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CifarlabError(f"{path}: unreadable ({error})") from None
    complete = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(complete))
    if reader.fieldnames is None:
        return []  # empty, or the header itself not written yet
    if "epoch" not in reader.fieldnames:
        raise CifarlabError(f"{path}: corrupt CSV (the header has no 'epoch' column)")
    rows = []
    for raw in reader:
        line = reader.line_num
        if None in raw or None in raw.values():  # more or fewer fields than the header names
            raise CifarlabError(f"{path}: corrupt CSV (line {line} does not have the header's "
                                f"{len(reader.fieldnames)} fields)")
        row = {column: _number(raw[column], path, line, column) for column in METRIC_COLUMNS if column in raw}
        if row["epoch"] is None:
            raise CifarlabError(f"{path}: corrupt CSV (line {line} has no epoch)")
        row["epoch"] = int(row["epoch"])
        rows.append(row)
    return rows


# --- the summary -----------------------------------------------------------------------------------

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from cifarlab import __version__

    try:  # read from the installed metadata: importing torchvision only for this took about a second
        torchvision = version("torchvision")
    except PackageNotFoundError:
        torchvision = None
    return {"cifarlab": __version__, "torch": torch.__version__, "torchvision": torchvision,
            "python": platform.python_version(), "platform": platform.platform()}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def finish_run(run_dir: Path, summary: dict) -> None:
    """Write summary.json (with the software versions) and drop the resume checkpoint: model.pt is the
    result, nothing is left to resume."""
    write_json(run_dir / SUMMARY_FILE, {**summary, "versions": versions()})
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
