"""The command line: parses and validates arguments, then calls the library. No training logic here."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path

from cifarlab.config import RECIPES, recipe
from cifarlab.errors import CifarlabError

EPILOG = """examples:
  cifarlab train --data ../shared/data/cifar10-jpeg-train.tar.gz --recipe seed
  cifarlab train --dataset cifar10 --epochs 5 --out runs/first
  cifarlab eval runs/first --json
"""


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="SOURCE",
                        help="a local source: the official archive or its folder, an image folder root "
                             "(train/ and test/ or val/ with one folder per class, or class folders), "
                             "or a .tar/.tar.gz/.zip of one")
    source.add_argument("--dataset", choices=["cifar10", "cifar100"],
                        help="download the official archive (cached; mirror via CIFARLAB_DATA_URL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifarlab", description="Train, evaluate and inspect CNN classifiers "
                                     "on CIFAR-10, CIFAR-100 and folders of labelled images.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model and write a run folder",
                                description="Train a model. Starts from a recipe; each flag given overrides "
                                            "the recipe's value. Writes config.json, metrics.csv, curves.png, "
                                            "model.pt and summary.json into the run folder.")
    _add_data_args(train)
    train.add_argument("--recipe", default="seed", help=f"named settings to start from: {', '.join(sorted(RECIPES))} "
                                                        "(default: seed)")
    train.add_argument("--model", help="registered model name (see the recipe for its default)")
    train.add_argument("--epochs", type=int, help="passes over the training images")
    train.add_argument("--batch-size", type=int, help="images per optimisation step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--val-split", type=int, metavar="N",
                       help="images held out (stratified, seeded) for validation; default 5000 when the source "
                            "has no test split, else 0 (evaluate on test); 0 trains on everything")
    train.add_argument("--seed", type=int, help="seed for the split, initialisation, order and augmentation")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto: bf16 on CPUs with native bf16 (else fp32), bf16/fp16 on CUDA")
    train.add_argument("--out", metavar="DIR", help="run folder to create (default: a new folder under runs/)")

    evaluate = commands.add_parser("eval", help="evaluate a trained model on a split",
                                   description="Evaluate a run folder or model.pt on a data split.")
    evaluate.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    _add_data_args(evaluate)
    evaluate.add_argument("--split", choices=["test", "val", "train"],
                          help="default: the split the run reported on (val if it held one out, else test)")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _train_command(args: argparse.Namespace) -> None:
    from cifarlab.trainer import run_training

    config = recipe(args.recipe)
    overrides = {name: getattr(args, name) for name in
                 ("data", "dataset", "model", "epochs", "batch_size", "lr", "val_split", "seed", "device", "precision")
                 if getattr(args, name) is not None}
    if overrides.get("model", config.model) != config.model:
        overrides["model_args"] = {}  # the recipe's model arguments belong to the recipe's model
    if "data" in overrides or "dataset" in overrides:
        overrides.setdefault("data", None)
        overrides.setdefault("dataset", None)
    run_training(dataclasses.replace(config, **overrides), args.out)


def _eval_command(args: argparse.Namespace) -> None:
    from cifarlab.evaluation import evaluate_model

    result = evaluate_model(Path(args.model), data=args.data, dataset=args.dataset, split=args.split,
                            device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['split']} accuracy {100 * result['accuracy']:.2f}% "
              f"({result['correct']}/{result['n']}), loss {result['loss']:.4f}  [{result['data']}]")
        width = max(len(name) for name in result["per_class_accuracy"])
        for name, accuracy in result["per_class_accuracy"].items():
            print(f"  {name:<{width}}  {100 * accuracy:6.2f}%")


COMMANDS = {"train": _train_command, "eval": _eval_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except CifarlabError as error:
        if args.debug:
            traceback.print_exc()
        print(f"cifarlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        return 130
    return 0
