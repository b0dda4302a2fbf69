"""Accuracy reached within a wall-clock budget: `cifarlab train --time-budget B` per recipe and budget.

Each run is the whole command in a fresh process (warm data cache); the budget covers training and
the final evaluation, as `--time-budget` promises. Prints one table and draws accuracy against
seconds, one line per recipe. The recipe `auto` names none: `--time-budget` then picks it (cifarlab.pick),
and the row says which it picked:

    python benchmarks/time_budget.py --recipes fast75 seed --budgets 30 60 120 300 --plot docs/time_budget.png
    python benchmarks/time_budget.py --recipes auto --budgets 10 30 60 180
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cifarlab.config import recipe
from cifarlab.data import load_data
from cifarlab.pick import CANDIDATES, cpu_speed, pick_recipe
from cifarlab.tuning import describe_cpu, resolve_auto

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def run_once(name: str, budget: float, out: Path) -> dict:
    command = [sys.executable, "-m", "cifarlab", "train", "--data", str(DATA), "--time-budget", str(budget),
               "--out", str(out), *(["--recipe", name] if name != "auto" else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    tta = summary["tta"]["accuracy"] if summary.get("tta") else None
    picked = json.loads((out / "config.json").read_text())["recipe"]
    return {"recipe": name, "picked": picked, "budget": budget,
            "accuracy": tta if tta is not None else summary["accuracy"],
            "plain": summary["accuracy"], "used": summary["time_budget"]["used_seconds"],
            "steps": summary["time_budget"]["steps"], "wall": wall, "precision": summary["precision"],
            "channels_last": summary.get("channels_last")}


def draw(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == name]
        ax.plot([r["budget"] for r in mine], [100 * r["accuracy"] for r in mine], marker="o", label=name)
    ax.axhline(75, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in rows})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the budgets are labelled
    ax.set_xlabel("--time-budget (s): training + final evaluation")
    ax.set_ylabel("validation accuracy (%), 5,000 held out")
    ax.set_title("Best model in a time budget", fontsize=11)
    figure.suptitle(describe_cpu(), fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["fast75", "seed"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[30, 60, 120, 300])
    parser.add_argument("--plot", type=Path, help="write the accuracy-against-seconds plot here (PNG)")
    args = parser.parse_args()
    load_data(str(DATA))  # warms the data cache (decoding is a one-off), not timed
    for name in args.recipes:  # and the once-per-machine precision/layout timing
        if name == "auto":  # the speeds the pick needs, up to the longest budget
            pick_recipe(max(args.budgets), {n: recipe(n) for n in CANDIDATES}, cpu_speed)
        else:
            resolve_auto(recipe(name), torch.device("cpu"), 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            for budget in args.budgets:
                rows.append(run_once(name, budget, Path(tmp) / f"{name}-{budget:g}"))
                r = rows[-1]
                print(f"  {name} ({r['picked']}) {budget:g}s: {100 * r['accuracy']:.2f}% ({r['steps']} steps, "
                      f"{r['used']:.1f}s used, {r['wall']:.1f}s whole command)", flush=True)
    layouts = sorted({f"{r['picked']}: {r['precision']}, {'channels_last' if r['channels_last'] else 'NCHW'}"
                      for r in rows})
    print(f"\nmachine: {describe_cpu()}; measured choices: {'; '.join(layouts)}")
    print("| recipe | budget s | accuracy (TTA) | plain | steps | training + evaluation s | whole command s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["recipe"] if r["recipe"] == r["picked"] else f"{r['recipe']} ({r['picked']})"
        print(f"| {label} | {r['budget']:g} | {100 * r['accuracy']:.2f}% | {100 * r['plain']:.2f}% | "
              f"{r['steps']} | {r['used']:.1f} | {r['wall']:.1f} |")
    if args.plot:
        draw(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
