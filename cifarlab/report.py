"""One self-contained report.html per run (`cifarlab report RUN_DIR`).

Every picture is embedded as a base64 PNG and the styles and the one small script are inline, so the
file can be mailed, archived or opened offline and shows the same thing. A Content-Security-Policy
forbids loading anything from anywhere else: if a future change slipped in an external URL, the
browser would refuse it rather than quietly phone home.

The script sets document.title to `loaded:N/M` once the page has loaded (N images decoded of M);
the browser test reads it to check every image rendered.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from cifarlab.errors import CifarlabError
from cifarlab.evaluation import EVAL_VIEWS, run_images
from cifarlab.layer_plots import layer_figures
from cifarlab.plots import draw_curves, draw_generalisation_gap
from cifarlab.records import EpochRecord, History
from cifarlab.rundir import (CONFIG_FILE, EVAL_DIR, EVAL_JSON, METRIC_COLUMNS, METRICS_FILE, REPORT_FILE, SUMMARY_FILE,
                             read_metrics, write_text)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.headline { font-size: 1.25em; margin: 0.3em 0 1em; } .muted { color: #666; }
.row { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
"""
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.title = "loaded:" + ok + "/" + images.length;
});
"""


def png_tag(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def html_table(rows: list[list], header: list[str] | None = None) -> str:
    def cell(value, tag: str = "td") -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f'<{tag}{" class=num" if numeric else ""}>{html.escape(str(value))}</{tag}>'
    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    return "<table>" + head + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


# --- sections: each takes the run folder's contents and returns HTML --------------------------------

def _headline_section(run: dict) -> str:
    """What the run reached, first: the accuracy it reported (and with test-time augmentation)."""
    s = run["summary"]
    if not s:
        return "<p class='headline muted'>the run has not finished (no summary.json yet)</p>"
    tta = s.get("tta")
    extra = f", <b>{_pct(tta['accuracy'])}</b> with test-time augmentation (level {tta['level']})" if tta else ""
    return (f'<p class=headline>{html.escape(str(s.get("eval_split") or "no"))} accuracy '
            f'<b>{_pct(s.get("accuracy"))}</b>{extra} after {s.get("epochs", "?")} epochs of '
            f'{html.escape(str(s.get("model", "?")))} ({html.escape(str(s.get("recipe", "?")))}), '
            f'{s.get("wall_seconds", "?")} s on {html.escape(str(s.get("device", "?")))}</p>')


def _details_section(run: dict) -> str:
    """Timing, software and the full config, last; the config folded away (it is long)."""
    s, config = run["summary"], run["config"]
    rows = [[label, s[key]] for label, key in (
        ("recipe", "recipe"), ("model", "model"), ("evaluated on", "eval_split"), ("training images", "train_images"),
        ("evaluation images", "eval_images"), ("wall time (s)", "wall_seconds"), ("training time (s)", "train_seconds"),
        ("throughput (images/s)", "images_per_second"), ("device", "device"), ("threads", "threads"),
        ("precision", "precision")) if key in s]
    rows += [[f"{name} version", version] for name, version in s.get("versions", {}).items()]
    config_rows = [[key, json.dumps(value) if isinstance(value, (dict, list)) else value]
                   for key, value in config.items()]
    return (f"<h2>Run</h2><h3>Timing and throughput</h3>{html_table(rows)}"
            f"<details><summary>Full config ({len(config_rows)} settings)</summary>{html_table(config_rows)}"
            f"</details>")


def _curves_section(run: dict) -> str:
    """The notebook's picture, drawn here from metrics.csv: `train` writes the numbers only."""
    rows = run["metrics"]
    if not rows:
        return f"<h2>Learning curves</h2><p class=muted>no epoch has finished yet (no rows in {METRICS_FILE})</p>"
    history = History([EpochRecord(**{column: row.get(column) for column in METRIC_COLUMNS}) for row in rows])
    figure = draw_curves(history, len(rows))
    return f"<h2>Learning curves</h2>{png_tag(figure_png(figure), 'learning curves')}"


def _gap_section(run: dict) -> str:
    rows = [r for r in run["metrics"] if r.get("val_acc") is not None]
    if not rows:
        return "<h2>Generalisation gap</h2><p class=muted>no validation accuracy was recorded</p>"
    epochs = [r["epoch"] for r in rows]
    train, val = [r["train_acc"] for r in rows], [r["val_acc"] for r in rows]
    figure = draw_generalisation_gap(epochs, train, val)
    table = html_table([[e, _pct(t), _pct(v), f"{100 * (t - v):+.2f}"] for e, t, v in zip(epochs, train, val)],
                       ["epoch", "train accuracy", "validation accuracy", "gap (points)"])
    note = ("<p>Train accuracy is measured on augmented images while the weights still change during the "
            "epoch; validation accuracy on plain held-out images at the epoch's end. A gap that keeps widening "
            "while validation accuracy stalls is overfitting.</p>")
    return f"<h2>Generalisation gap</h2>{png_tag(figure_png(figure), 'generalisation gap')}{note}{table}"


def _eval_section(run: dict) -> str:
    ev, folder = run["eval"], run["dir"] / EVAL_DIR
    if not ev:
        return (f"<h2>Evaluation</h2><p class=muted>no {EVAL_DIR}/{EVAL_JSON} in this run folder "
                f"(run <code>cifarlab eval RUN_DIR --out RUN_DIR/{EVAL_DIR}</code>)</p>")
    lines = [f"{html.escape(str(ev.get('split')))}: accuracy <b>{_pct(ev['accuracy'])}</b> "
             f"({ev['correct']}/{ev['n']}), loss {ev.get('loss', float('nan')):.4f}, "
             f"expected calibration error <b>{_pct(ev['ece'])}</b> (15 equal-width confidence bins)"]
    if ev.get("tta"):
        t = ev["tta"]
        lines.append(f"test-time augmentation ({t['views']} views): {_pct(t['accuracy'])}, "
                     f"gain {100 * t['gain']:+.2f} points (views below show the TTA predictions)")
    per_class = html_table([[name, _pct(v["accuracy"]), _pct(v["precision"]), _pct(v["recall"]), v["support"]]
                            for name, v in ev["per_class"].items()],
                           ["class", "accuracy", "precision", "recall", "images"])
    tag = _eval_pictures(run)
    return (f"<h2>Evaluation</h2><p>{'<br>'.join(lines)}</p>"
            f"<div class=row><div><h3>Confusion matrix</h3>{tag['confusion_matrix.png']}</div>"
            f"<div><h3>Per class</h3>{per_class}</div></div>"
            f"<div class=row><div><h3>Calibration</h3>{tag['reliability.png']}</div>"
            f"<div><h3>Most confident mistakes</h3>{tag['worst_mistakes.png']}</div></div>")


def _eval_pictures(run: dict) -> dict[str, str]:
    """Each evaluation picture as an <img> tag: the eval folder's PNG where `eval --out` drew it, else
    drawn now from eval.json (`train` writes only the numbers). The worst mistakes show images, read
    again from the run's source as `eval` reads it; a note takes their place if it cannot be read."""
    ev, folder, tags = run["eval"], run["dir"] / EVAL_DIR, {}

    def images():
        return run_images(run["config"], ev["split"])
    for name, draw in EVAL_VIEWS.items():
        alt = name.removesuffix(".png").replace("_", " ")
        try:
            png = (folder / name).read_bytes() if (folder / name).exists() else figure_png(
                draw(ev, images, list(ev["per_class"])))
        except CifarlabError as error:
            tags[name] = f"<p class=muted>not drawn: {html.escape(str(error))}</p>"
            continue
        tags[name] = png_tag(png, alt)
    return tags


def _layers_section(run: dict) -> str:
    """--layer-stats' pictures (cifarlab.layer_plots; docs/depth.md reads them); nothing without layers.csv."""
    return "".join(f"<h2>{html.escape(title)}</h2>{png_tag(figure_png(figure), title)}"
                   for title, figure in layer_figures(run["dir"]))


def _explain_section(run: dict) -> str:
    from cifarlab.report_explain import explain_section  # its own module: kernels, feature maps, Grad-CAM

    return explain_section(run, lambda figure, alt: png_tag(figure_png(figure), alt))


# the headline, the curves and the confusion matrix first; details and the full config last
SECTIONS = [_headline_section, _curves_section, _eval_section, _gap_section, _explain_section, _layers_section,
            _details_section]


def load_run(run_dir: Path) -> dict:
    if not run_dir.is_dir() or not (run_dir / CONFIG_FILE).exists():
        raise CifarlabError(f"{run_dir}: not a run folder (no {CONFIG_FILE})")
    return {"dir": run_dir, "config": _read_json(run_dir / CONFIG_FILE),
            "summary": _read_json(run_dir / SUMMARY_FILE), "metrics": read_metrics(run_dir / METRICS_FILE),
            "eval": _read_json(run_dir / EVAL_DIR / EVAL_JSON)}


def render_report(run_dir: Path) -> str:
    run = load_run(run_dir)
    title = html.escape(run_dir.resolve().name)
    body = "".join(section(run) for section in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>cifarlab report: {title}</title><style>{STYLE}</style></head>"
            f"<body><h1>cifarlab run <code>{title}</code></h1>{body}<script>{SCRIPT}</script></body></html>\n")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write report.html (into the run folder unless `out` says where) and return its path."""
    path = Path(out) if out is not None else run_dir / REPORT_FILE
    write_text(path, render_report(run_dir))
    return path
