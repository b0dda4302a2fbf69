"""Which of several training options pay, from few runs: a two-level factorial sweep.

Every combination of the options on and off (or, with --half, the half of them whose last option is
on exactly when an even number of the others are: a resolution-V design for five options, whose main
effects and pairwise interactions stay unconfounded), each over --seeds seeds. Each option's main
effect is the mean accuracy of the runs with it minus that of the runs without: half the runs on each
side, so five options cost 16 configurations x 3 seeds = 48 runs, and each effect is a mean over 24
against 24 (against 5 against 5 for one option at a time in 50 runs).

Runs are `cifarlab train` called in-process by --workers processes (no start-up per run; on a GPU
several workers fill the gaps that host-bound steps leave), so their times are not for quoting.

    python benchmarks/sweep.py --data gpu/cifar10-jpeg-train.tar.gz --recipe fast94 --device cuda \\
        --seeds 3 --workers 4 --half --option=--alternate-flip --option=--lookahead \\
        --option="--schedule triangle" --option=--bias-decay --option="--whiten-bias-epochs 3"
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import statistics
import tempfile
import traceback
from pathlib import Path


def designs(count: int, half: bool) -> list[tuple[int, ...]]:
    """Each configuration as 0/1 per option: the full factorial, or its half fraction."""
    if not half:
        return list(itertools.product((0, 1), repeat=count))
    return [(*levels, 1 - sum(levels) % 2) for levels in itertools.product((0, 1), repeat=count - 1)]


def run_one(argv: list[str]) -> dict:
    """`cifarlab train ARGV` in this process; its accuracy (with TTA where the recipe has it) and seconds."""
    from cifarlab.cli import main

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", *argv])
    except Exception:  # one failed run is a row short, not a lost sweep
        traceback.print_exc()
        code = 1
    if code:
        return {"accuracy": None}
    summary = json.loads((Path(argv[argv.index("--out") + 1]) / "summary.json").read_text())
    tta = summary.get("tta")
    return {"accuracy": tta["accuracy"] if tta else summary["accuracy"],
            "seconds": summary["train_seconds"] + summary["tta_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--option", action="append", required=True,
                        help="the flags of one option, e.g. --option=--lookahead (repeat per option)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--half", action="store_true", help="the half fraction (needs 3 or more options)")
    args, extra = parser.parse_known_args()  # anything else goes to every run (e.g. --epochs 8)
    configs = designs(len(args.option), args.half and len(args.option) >= 3)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [[*extra, "--data", args.data, "--recipe", args.recipe, "--device", args.device, "--seed", str(seed),
                 "--out", f"{tmp}/{c}-{seed}",
                 *(word for on, flags in zip(levels, args.option) if on for word in flags.split())]
                for seed in range(args.seeds) for c, levels in enumerate(configs)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:  # CUDA needs spawned workers
            results = pool.map(run_one, jobs, chunksize=1)
    runs = list(zip([levels for _ in range(args.seeds) for levels in configs], results))
    failed = sum(r["accuracy"] is None for _, r in runs)
    runs = [(levels, r) for levels, r in runs if r["accuracy"] is not None]
    print(f"{args.recipe} {' '.join(extra)}: {len(configs)} configurations x {args.seeds} seeds"
          f"{f', {failed} runs failed' if failed else ''}")
    print("| " + " | ".join(args.option) + " | accuracy (mean of seeds) | seconds |")
    print("|" + "---|" * (len(args.option) + 2))
    for levels in configs:
        mine = [r for lv, r in runs if lv == levels]
        if mine:
            print("| " + " | ".join("on" if on else "" for on in levels) +
                  f" | {100 * statistics.mean(r['accuracy'] for r in mine):.2f}% | "
                  f"{statistics.median(r['seconds'] for r in mine):.2f} |")
    spread = statistics.pstdev([r["accuracy"] for _, r in runs]) if len(runs) > 1 else 0.0
    print(f"\nmain effects (points; runs with the option minus runs without; spread of all runs "
          f"{100 * spread:.2f}):")
    for k, flags in enumerate(args.option):
        on = [r["accuracy"] for lv, r in runs if lv[k]]
        off = [r["accuracy"] for lv, r in runs if not lv[k]]
        if on and off:
            error = (statistics.pvariance(on) / len(on) + statistics.pvariance(off) / len(off)) ** 0.5
            print(f"  {flags:32s} {100 * (statistics.mean(on) - statistics.mean(off)):+.2f} +- {100 * error:.2f}"
                  f"  ({len(on)} against {len(off)} runs)")


if __name__ == "__main__":
    main()
