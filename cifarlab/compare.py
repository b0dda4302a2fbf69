"""Several run folders side by side: a table, one picture of their curves, and a self-contained HTML page.

Everything here only reads run folders, and a run may still be training while it is read: its
metrics.csv is then read up to the last complete row (the writer may be halfway through a line),
and it has no summary.json yet. A folder that cannot be read is reported in one line and skipped,
so one bad path never hides the comparison of the others.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cifarlab.errors import CifarlabError
from cifarlab.layer_plots import draw_depth_comparison
from cifarlab.layer_stats import read_layer_stats
from cifarlab.plots import draw_comparison
from cifarlab.report import CSP, SCRIPT, STYLE, figure_png, html_table, png_tag
from cifarlab.rundir import (CONFIG_FILE, LAYERS_FILE, LOCK_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, atomic_file,
                             read_metrics, write_text)
# state_dict entries that are buffers, not trained weights (BatchNorm's running statistics)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
COMPARE_PNG = "compare.png"
COMPARE_DEPTH_PNG = "compare_depth.png"  # the runs' gradient norm by depth (--layer-stats)
COMPARE_HTML = "compare.html"
DEFAULT_RUNS_ROOT = Path("runs")


@dataclass
class RunSummary:
    """What a run folder holds, read once: enough to compare it without opening it again."""

    name: str  # how the run is labelled in tables and legends (its folder name, made unique)
    path: Path
    config: dict
    metrics: list[dict[str, float | None]]  # one row per finished epoch; None where a column was empty
    summary: dict | None  # summary.json, present only once the run finished
    status: str  # "finished", "training" (a live process holds its lock) or "stopped"


# --- reading one run folder ------------------------------------------------------------------------

def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CifarlabError(f"{path}: corrupt JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CifarlabError(f"{path}: unreadable ({error})") from None
    if not isinstance(data, dict):
        raise CifarlabError(f"{path}: corrupt JSON (expected an object, got {type(data).__name__})")
    return data


def _lock_held(lock: Path) -> bool:
    """Whether a live process holds the run folder's .lock (runs.RunLock takes an exclusive flock on it).

    Read from /proc/locks rather than by trying the lock ourselves: a probe that held the lock for an
    instant could make a run starting at that moment think another process was writing the folder.
    Where /proc/locks is missing (not Linux), the pid written in the file is checked instead.
    """
    try:
        inode = lock.stat().st_ino
    except OSError:
        return False  # no lock file: the writer exited and removed it, or never started
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _pid_alive(lock)
    # lines look like "1: FLOCK  ADVISORY  WRITE 3153 fe:00:2146833 0 EOF"
    return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode)
               for fields in (line.split() for line in table.splitlines()))


def _pid_alive(lock: Path) -> bool:
    try:
        os.kill(int(lock.read_text().split()[0]), 0)
    except PermissionError:
        return True  # alive, owned by another user
    except (OSError, ValueError, IndexError):
        return False
    return True


def read_run(path: Path) -> RunSummary:
    """One run folder; a CifarlabError (one line) when it is missing, not a run folder, or corrupt."""
    if not path.exists():
        raise CifarlabError(f"{path}: no such folder")
    if not path.is_dir() or not (path / CONFIG_FILE).exists():
        raise CifarlabError(f"{path}: not a run folder (no config.json)")
    config = _read_json_object(path / CONFIG_FILE)
    metrics = read_metrics(path / METRICS_FILE)
    summary = _read_json_object(path / SUMMARY_FILE) if (path / SUMMARY_FILE).exists() else None
    status = "finished" if summary is not None else "training" if _lock_held(path / LOCK_FILE) else "stopped"
    name = Path(os.path.abspath(path)).name  # "." and "runs/a/.." named too, symlinks kept as given
    return RunSummary(name, path, config, metrics, summary, status)


def _unique_names(runs: list[RunSummary]) -> None:
    """Two folders of the same name (a/run, b/run) are labelled by their paths, so legends tell them apart."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)


def load_runs(paths: list[Path]) -> tuple[list[RunSummary], list[str]]:
    """The readable runs among `paths`, and one line for each folder that was skipped and why.

    Raises CifarlabError only when no folder at all could be read: there is then nothing to compare.
    """
    if not paths:
        raise CifarlabError("no run folders given; pass one or more folders written by cifarlab train")
    runs, reasons = [], []
    for path in paths:
        try:
            runs.append(read_run(Path(path)))
        except CifarlabError as error:
            reasons.append(str(error))
    if not runs:
        raise CifarlabError(f"no readable run folder among the {len(paths)} given ({' | '.join(reasons)}); "
                            f"pass folders written by cifarlab train")
    _unique_names(runs)
    return runs, [f"{reason}; skipped" for reason in reasons]


# --- the comparison --------------------------------------------------------------------------------

def count_parameters(model_file: Path) -> int | None:
    """Trained weights in model.pt's state_dict (BatchNorm running statistics left out); None when
    the file is missing or unreadable. weights_only=True: a model file cannot run code."""
    if not model_file.exists():
        return None
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)["state_dict"]
        return sum(t.numel() for name, t in state.items()
                   if isinstance(t, torch.Tensor) and not name.endswith(BUFFER_SUFFIXES))
    except Exception:  # a damaged or foreign file: the table shows "-" rather than failing the comparison
        return None


def _column(run: RunSummary, key: str) -> list[float]:
    return [row[key] for row in run.metrics if row.get(key) is not None]


def _seconds(run: RunSummary) -> float:
    """The summary's wall time once finished; until then the epochs' own times, summed."""
    seconds = (run.summary or {}).get("wall_seconds")
    return seconds if seconds is not None else sum(_column(run, "seconds"))


def _epochs_done(run: RunSummary) -> int:
    return run.metrics[-1]["epoch"] if run.metrics else 0


def comparison_rows(runs: list[RunSummary]) -> list[dict]:
    """One row per run: what it is, how well it did on validation, and what it cost."""
    rows = []
    for run in runs:
        summary, val = run.summary or {}, _column(run, "val_acc")
        parameters = summary.get("parameters")
        rows.append({
            "name": run.name,
            "recipe": summary.get("recipe", run.config.get("recipe")),
            "model": summary.get("model", run.config.get("model")),
            "parameters": parameters if parameters is not None else count_parameters(run.path / MODEL_FILE),
            "best_val_acc": max(val) if val else None,
            "final_val_acc": val[-1] if val else None,
            "epochs_done": _epochs_done(run),
            "epochs_planned": run.config.get("epochs"),
            "seconds": _seconds(run),
            "images_per_second": summary.get("images_per_second"),
            "device": summary.get("device"),
            "status": run.status,
        })
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _cells(row: dict) -> list[str]:
    """A comparison row as the strings both the text and the HTML table show."""
    text = lambda value: "-" if value is None else str(value)  # noqa: E731
    return [row["name"], text(row["recipe"]), text(row["model"]),
            "-" if row["parameters"] is None else f"{row['parameters']:,}",
            _pct(row["best_val_acc"]), _pct(row["final_val_acc"]),
            f"{row['epochs_done']}/{text(row['epochs_planned'])}", f"{row['seconds']:.1f}",
            "-" if row["images_per_second"] is None else f"{row['images_per_second']:.1f}",
            text(row["device"]), row["status"]]


COMPARISON_HEADER = ["run", "recipe", "model", "parameters", "best val acc", "final val acc", "epochs",
                     "seconds", "images/s", "device", "status"]
NUMERIC_COLUMNS = {3, 4, 5, 6, 7, 8}  # right-aligned, so digits line up


def aligned(rows: list[list[str]], right: set[int]) -> str:
    """Plain-text columns padded to their widest cell: numbers right-aligned, text left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(line(cells).rstrip() for cells in rows)


def format_comparison(rows: list[dict]) -> str:
    """The comparison as an aligned plain-text table with a header line."""
    return aligned([COMPARISON_HEADER, *(_cells(row) for row in rows)], NUMERIC_COLUMNS)


# --- pictures and the page -------------------------------------------------------------------------

def render_comparison(runs: list[RunSummary], png: bytes, depth_png: bytes | None = None) -> str:
    """compare.html: the table and the pictures, self-contained like report.html (same CSP, style, script)."""
    names = html.escape(", ".join(run.name for run in runs))
    table = html_table([_cells(row) for row in comparison_rows(runs)], COMPARISON_HEADER)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>cifarlab comparison: {names}</title><style>{STYLE}</style></head>"
            f"<body><h1>cifarlab comparison</h1><p class=muted>{names}</p><h2>Runs</h2>{table}"
            f"<h2>Learning curves</h2>{png_tag(png, 'learning curves of the compared runs')}"
            + (f"<h2>Gradient by depth</h2>{png_tag(depth_png, 'gradient norm by depth')}" if depth_png else "")
            + f"<script>{SCRIPT}</script></body></html>\n")


def write_comparison(runs: list[RunSummary], out_dir: Path) -> dict[str, Path]:
    """Write compare.png and compare.html into out_dir, and compare_depth.png, the gradient norm by depth
    side by side, when runs recorded --layer-stats; returns {"png": path, "html": path[, "depth_png": path]}."""
    png = figure_png(draw_comparison([(run.name, run.metrics) for run in runs]))
    paths = {"png": out_dir / COMPARE_PNG, "html": out_dir / COMPARE_HTML}
    layers = [(run.name, read_layer_stats(run.path / LAYERS_FILE)) for run in runs]
    depth_png = figure_png(draw_depth_comparison([r for r in layers if r[1]])) if any(r for _, r in layers) else None
    if depth_png is not None:
        paths["depth_png"] = out_dir / COMPARE_DEPTH_PNG
    for key, data in (("png", png), ("depth_png", depth_png)):
        if data is not None:
            with atomic_file(paths[key]) as tmp:
                tmp.write_bytes(data)
    write_text(paths["html"], render_comparison(runs, png, depth_png))
    return paths


# --- the runs under runs/ --------------------------------------------------------------------------

def _list_row(folder: Path) -> dict:
    """One line's worth of a run folder; an unreadable one is listed too, with the reason as its status."""
    try:
        run = read_run(folder)
    except CifarlabError as error:
        return {"name": folder.name, "recipe": None, "model": None, "status": "unreadable",
                "epochs_done": 0, "epochs_planned": None, "accuracy": None, "seconds": None, "error": str(error)}
    summary, val = run.summary or {}, _column(run, "val_acc")
    return {"name": folder.name, "recipe": summary.get("recipe", run.config.get("recipe")),
            "model": summary.get("model", run.config.get("model")), "status": run.status,
            "epochs_done": _epochs_done(run), "epochs_planned": run.config.get("epochs"),
            "accuracy": summary.get("accuracy", val[-1] if val else None), "seconds": _seconds(run)}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0  # deleted while listing: it sorts last, and its row says it is unreadable


def list_runs(root: Path = DEFAULT_RUNS_ROOT) -> list[dict]:
    """The run folders (those with a config.json) directly under root, newest first by the folder's
    modification time, which moves whenever the run renames a file into it (checkpoints, summary)."""
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).exists()]
    folders.sort(key=lambda p: (_mtime(p), p.name), reverse=True)
    return [_list_row(folder) for folder in folders]


def format_runs(rows: list[dict], root: Path = DEFAULT_RUNS_ROOT) -> str:
    """One line per run, columns aligned; a friendly line (not an error) when there is none."""
    if not rows:
        return f"no runs under {root}/ yet: `cifarlab train` writes one folder per run there"
    text = lambda value: "-" if value is None else str(value)  # noqa: E731
    cells = [[row["name"], row["status"], text(row["recipe"]), text(row["model"]),
              f"{row['epochs_done']}/{text(row['epochs_planned'])} epochs",
              "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%",
              "-" if row["seconds"] is None else f"{row['seconds']:.0f}s"] for row in rows]
    lines = aligned(cells, right={4, 5, 6}).splitlines()
    # an unreadable folder is listed with the reason, so it does not silently vanish from the list
    return "\n".join(line + (f"  ({row['error']})" if row.get("error") else "") for line, row in zip(lines, rows))
