"""Training images/s of recipes' networks at several image sizes on this CPU: what progressive resizing
buys (a step costs about what its pixels cost) and how one network's steps compare with another's.

    python benchmarks/step_sizes.py --recipes fast94 fast90 --sizes 16 24 32

Each figure is `cifarlab.tuning.training_speed`: the fastest of a few forward + backward + optimizer
steps on a random batch of the recipe's size, in the precision and layout the tuner picks here (both
measured once per machine and cached, as `cifarlab train` does).
"""
from __future__ import annotations

import argparse
import dataclasses

from cifarlab.config import recipe
from cifarlab.tuning import describe_cpu, training_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["fast94", "fast90"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[16, 24, 32], help="image sizes in pixels")
    args = parser.parse_args()
    print(describe_cpu())
    print("| recipe | " + " | ".join(f"{size} px images/s" for size in args.sizes) + " | step time against the largest |")
    print("|---" * (len(args.sizes) + 2) + "|")
    for name in args.recipes:
        speeds = [training_speed(dataclasses.replace(recipe(name), image_size=size), 10) for size in args.sizes]
        ratios = " / ".join(f"{speeds[-1] / speed:.2f}" for speed in speeds)
        print(f"| {name} | " + " | ".join(f"{speed:,.0f}" for speed in speeds) + f" | {ratios} |")


if __name__ == "__main__":
    main()
