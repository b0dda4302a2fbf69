"""The command line: parses and validates arguments, then calls the library. No training logic here."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

from cifarlab import __version__
from cifarlab.config import RECIPES, TrainConfig, flag_name, load_config, recipe
from cifarlab.errors import INTERRUPTED_STATUS, CifarlabError, RunInterrupted

EPILOG = """examples:
  cifarlab train --recipe fast75 --out runs/first      # downloads CIFAR-10 once, trains in seconds on a CPU
  cifarlab train --data photos/ --epochs 5              # a folder of class folders (or an archive of one)
  cifarlab eval runs/first --json
  cifarlab report runs/first
  cifarlab explain runs/first photo.jpg --out seen      # feature maps and Grad-CAM of one image
  cifarlab serve runs/first                             # a local page to try the model
  cifarlab compare runs/first runs/second --out comparison
  cifarlab train --config runs/first --channels-last    # run it again, one setting changed
  cifarlab predict runs/first photo.jpg --json
  cifarlab export runs/first --format onnx
"""


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """--data or --dataset (one of the two): train, eval and lr-find read a source the same way."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="SOURCE",
                        help="a local source: the official archive or its folder, an image folder root "
                             "(train/ and test/ or val/ with one folder per class, or class folders), "
                             "or a .tar/.tar.gz/.zip of one")
    source.add_argument("--dataset", choices=["cifar10", "cifar100"],
                        help="download the official archive (cached; mirror via CIFARLAB_DATA_URL)")


FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
RUNTIME_FLAGS = ("device", "gpu_memory_fraction")  # the config fields eval and predict take too


def add_config_flags(parser: argparse.ArgumentParser, title: str, exclude: tuple[str, ...] = (),
                     only: tuple[str, ...] | None = None) -> None:
    """One flag per TrainConfig field (or the fields in `only`), generated from the field: its type, help
    and choices. Every flag defaults to None, meaning "the recipe's value"; `validate()` checks what
    was given. eval and predict take their --device and --gpu-memory-fraction from here too."""
    group = parser.add_argument_group(title)
    for spec in dataclasses.fields(TrainConfig):
        meta = spec.metadata
        if not meta["flag"] or spec.name in exclude or (only is not None and spec.name not in only):
            continue
        kind = FLAG_TYPES[spec.type.split(" |")[0]]
        help_text = meta["help"] + (f" (one of: {', '.join(meta['names']())})" if meta["names"] else "")
        if kind is bool:
            group.add_argument(flag_name(spec.name), action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag_name(spec.name), type=kind, default=None, choices=meta["choices"],
                               help=help_text, metavar=None if meta["choices"] else spec.name.upper())


def config_overrides(args: argparse.Namespace) -> dict:
    """The config fields the user gave on the command line (the generated flags and --data/--dataset;
    --recipe picks the config they override)."""
    return {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainConfig)
            if spec.name != "recipe" and getattr(args, spec.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifarlab", description="Train, evaluate and inspect CNN classifiers "
                                     "on CIFAR-10, CIFAR-100 and folders of labelled images.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model and write a run folder",
                                description="Train a model. Starts from a recipe; each flag given overrides "
                                            "the recipe's value. Writes config.json, metrics.csv, model.pt, "
                                            "summary.json and eval/eval.json into the run folder: numbers only "
                                            "(`report` draws the curves and the evaluation views from them).")
    add_data_args(train)
    base = train.add_mutually_exclusive_group()
    base.add_argument("--recipe", help=f"named settings to start from: {', '.join(sorted(RECIPES))} "
                                       "(default: seed; with --time-budget and no --model, the one "
                                       "expected to be most accurate in the budget on this CPU)")
    base.add_argument("--config", metavar="RUN_DIR_OR_JSON",
                      help="start from a run's config.json (or its run folder) to run it again; flags override")
    train.add_argument("--out", metavar="DIR", help="run folder to create (default: a new folder under runs/)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue an interrupted run exactly where its checkpoint left it, with its own settings")
    train.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard event files into the run folder (needs the tensorboard package)")
    add_config_flags(train, "training options (each overrides the recipe's value; 0 turns an extra off)")

    evaluate = commands.add_parser("eval", help="evaluate a trained model on a split",
                                   description="Evaluate a run folder or model.pt on a data split.")
    evaluate.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    add_data_args(evaluate)
    evaluate.add_argument("--split", choices=["test", "val", "train"],
                          help="default: the split the run reported on (val if it held one out, else test)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object (tta_level: the level used)")
    evaluate.add_argument("--tta", type=int, choices=[0, 1, 2],
                          help="test-time augmentation: 1 = image + mirror, 2 = also 1-px shifts (6 views); "
                               "reports accuracy with and without it and the gain. Default: the run's own level, "
                               "so eval agrees with what train printed; 0 turns it off")
    add_config_flags(evaluate, "where it runs", only=RUNTIME_FLAGS)
    evaluate.add_argument("--out", metavar="DIR", help="write eval.json, confusion_matrix.png, reliability.png and "
                                                       "worst_mistakes.png there")
    _add_inspection_commands(commands)
    _add_explain_commands(commands)
    commands.add_parser("models", help="list the registered models with parameters and forward FLOPs",
                        description="Every name --model accepts, with its parameter count and forward MFLOPs "
                                    "per 32x32 image (a multiply-add counts as 2 FLOPs).")
    for command in commands.choices.values():  # `cifarlab train ... --debug` works as well as `cifarlab --debug train`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks for errors")
    return parser


def _add_inspection_commands(commands) -> None:
    """report, predict, export and lr-find: looking at and using what a run learned."""
    report = commands.add_parser("report", help="write a self-contained report.html for a run folder",
                                 description="Write RUN_DIR/report.html: config, timing, learning curves, "
                                             "generalisation gap and evaluation views, images embedded.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--out", metavar="FILE", help="where to write it (default: RUN_DIR/report.html)")

    compare = commands.add_parser("compare", help="runs side by side: one picture of their curves and a table",
                                  description="Train and validation curves of every run in one picture (one "
                                              "colour per run) and a table: recipe, model, parameters, best and "
                                              "final accuracy, epochs, seconds, images/s, device. A run still "
                                              "training is read as far as it got; a bad folder is skipped with "
                                              "a line saying why.")
    compare.add_argument("runs", metavar="RUN_DIR", nargs="+")
    compare.add_argument("--out", metavar="DIR", help="write compare.png and a self-contained compare.html there")
    runs = commands.add_parser("runs", help="list the runs under runs/ (or DIR), newest first",
                               description="One line per run folder: status, recipe, model, epochs, accuracy, time.")
    runs.add_argument("root", metavar="DIR", nargs="?", default="runs")

    predict = commands.add_parser("predict", help="label image files with a trained model",
                                  description="Top-k classes with probabilities for image files of any size or "
                                              "mode (resized to the model's training resolution).")
    predict.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    predict.add_argument("images", metavar="IMAGE", nargs="+")
    predict.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: 3)")
    predict.add_argument("--tta", type=int, choices=[0, 1, 2], default=0, help="test-time augmentation, as eval")
    add_config_flags(predict, "where it runs", only=RUNTIME_FLAGS)
    predict.add_argument("--json", action="store_true",
                         help="print a JSON list: {path, label, probability, topk: [{label, probability}]} per image")

    export = commands.add_parser("export", help="export a trained model to ONNX, safetensors or TorchScript",
                                 description="Export and check the file against the PyTorch model. ONNX and "
                                             "TorchScript take float RGB images in 0..1 and include the "
                                             "normalisation; safetensors holds weights and metadata.")
    export.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    export.add_argument("--format", required=True, choices=["onnx", "safetensors", "torchscript"])
    export.add_argument("--out", metavar="FILE", help="default: model.onnx / model.safetensors / model.ts.pt "
                                                      "beside the checkpoint")

    finder = commands.add_parser("lr-find", help="learning-rate range test: loss against an exponentially "
                                                 "growing learning rate",
                                 description="Train a throw-away model from the recipe while the learning rate "
                                             "grows from --start-lr to --end-lr; stop when the loss diverges; "
                                             "plot it and print the suggested rate (steepest descent).")
    add_data_args(finder)
    finder.add_argument("--recipe", default="seed", help="settings to start from (default: seed)")
    add_config_flags(finder, "the recipe's settings (as train; the sweep replaces its learning-rate schedule)",
                     exclude=SWEPT)
    finder.add_argument("--steps", type=int, default=200, help="steps of the sweep (default: 200)")
    finder.add_argument("--start-lr", type=float, default=1e-7)
    finder.add_argument("--end-lr", type=float, default=10.0)
    finder.add_argument("--out", metavar="FILE", default="lr_find.png", help="the plot (default: lr_find.png)")


def _add_explain_commands(commands) -> None:
    """explain and serve: what the network sees."""
    explain = commands.add_parser("explain", help="what the network sees: top-5, feature maps, where it looks",
                                  description="For each image: the top-5 classes, the feature maps after every "
                                              "convolution and pooling layer, and attribution maps over the image; "
                                              "numbers in an .npz beside the pictures drawn from them, and the "
                                              "first layer's filters (kernels.png).")
    explain.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    explain.add_argument("images", metavar="IMAGE", nargs="+")
    explain.add_argument("--out", metavar="DIR", help="where to write (default: RUN_DIR/explain)")
    explain.add_argument("--method", action="append", choices=["gradcam", "ig", "occlusion"],
                         help="attribution map, repeatable (default: gradcam and ig, Integrated Gradients)")
    explain.add_argument("--layer", metavar="NAME", help="conv or pooling layer for Grad-CAM (default: the last "
                                                         "convolution, after the pooling that follows it, if any)")
    explain.add_argument("--json", action="store_true", help="print a JSON list: {path, label, probability, "
                                                             "topk, gradcam_layer, files} per image")

    serve = commands.add_parser("serve", help="a local page: drop an image, see top-5, Grad-CAM and feature maps",
                                description="Serve a page where an image dropped or picked is explained by the "
                                            "run's model (top-5, Grad-CAM overlay, feature maps). Ctrl-C stops.")
    serve.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port)")


def _apply_flags(config: TrainConfig, overrides: dict) -> TrainConfig:
    """The recipe with the flags the user gave (train and lr-find apply them the same way)."""
    overrides = dict(overrides)
    if overrides.get("model", config.model) != config.model:
        overrides["model_args"] = {}  # the recipe's model arguments belong to the recipe's model
    if "data" in overrides:  # config.json records an absolute path: `eval RUN_DIR` works from any folder
        overrides["data"] = str(Path(overrides["data"]).expanduser().absolute())
    if "data" in overrides or "dataset" in overrides:  # one source replaces the other
        overrides.setdefault("data", None)
        overrides.setdefault("dataset", None)
    return dataclasses.replace(config, **overrides)


def _default_recipe(args: argparse.Namespace, overrides: dict) -> str:
    """seed, or with --time-budget (and no --model) the recipe expected to be most accurate in it here."""
    if not overrides.get("time_budget") or "model" in overrides or args.resume is not None:
        return "seed"
    from cifarlab.pick import CANDIDATES, recipe_for_budget

    return recipe_for_budget(overrides["time_budget"], {name: _apply_flags(recipe(name), overrides)
                                                        for name in CANDIDATES})


def _train_command(args: argparse.Namespace) -> None:
    from cifarlab.trainer import run_training

    overrides = config_overrides(args)
    config = load_config(Path(args.config)) if args.config else recipe(args.recipe or _default_recipe(args, overrides))
    if args.resume is not None:
        given = [flag_name(name) for name in [*overrides, *(["recipe"] if args.recipe else []),
                                              *(["config"] if args.config else []), *(["out"] if args.out else [])]]
        if given:
            raise CifarlabError(f"--resume {args.resume}: continues the run with its own settings; drop "
                                f"{', '.join(given)}")
        run_training(config, tensorboard=args.tensorboard, resume=args.resume)
        return
    run_training(_apply_flags(config, overrides), args.out, tensorboard=args.tensorboard)


def _eval_command(args: argparse.Namespace) -> None:
    from cifarlab.evaluation import evaluate_model

    result = evaluate_model(Path(args.model), data=args.data, dataset=args.dataset, split=args.split,
                            device=args.device or "auto", tta=args.tta, out=Path(args.out) if args.out else None,
                            memory_fraction=args.gpu_memory_fraction)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['split']} accuracy {100 * result['accuracy']:.2f}% "
              f"({result['correct']}/{result['n']}), loss {result['loss']:.4f}  [{result['data']}]")
        if "tta" in result:
            tta = result["tta"]
            print(f"with test-time augmentation ({tta['views']} views): {100 * tta['accuracy']:.2f}%, "
                  f"gain {100 * tta['gain']:+.2f} points")
        width = max(len(name) for name in result["per_class_accuracy"])
        scores = result.get("per_class")
        for name, accuracy in result["per_class_accuracy"].items():
            extra = (f"  precision {100 * scores[name]['precision']:6.2f}%  recall {100 * scores[name]['recall']:6.2f}%"
                     if scores else "")
            print(f"  {name:<{width}}  {100 * accuracy:6.2f}%{extra}")
        if "out" in result:
            print(f"expected calibration error {100 * result['ece']:.2f}%; wrote the views to {result['out']}")


def _report_command(args: argparse.Namespace) -> None:
    from cifarlab.report import write_report

    print(f"wrote {write_report(Path(args.run_dir), Path(args.out) if args.out else None)}")


def _compare_command(args: argparse.Namespace) -> None:
    from cifarlab.compare import comparison_rows, format_comparison, load_runs, write_comparison

    runs, problems = load_runs([Path(p) for p in args.runs])
    for problem in problems:
        print(problem, file=sys.stderr)
    print(format_comparison(comparison_rows(runs)))
    if args.out:
        paths = write_comparison(runs, Path(args.out))
        print(f"wrote {paths['png']} and {paths['html']}")


def _runs_command(args: argparse.Namespace) -> None:
    from cifarlab.compare import format_runs, list_runs

    print(format_runs(list_runs(Path(args.root)), Path(args.root)))


def _predict_command(args: argparse.Namespace) -> None:
    from cifarlab.predict import format_predictions, predict_files

    results = predict_files(Path(args.model), [Path(p) for p in args.images], top_k=args.top_k,
                            device=args.device or "auto", tta=args.tta, memory_fraction=args.gpu_memory_fraction)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))


def _explain_command(args: argparse.Namespace) -> None:
    from cifarlab.explain import DEFAULT_METHODS, explain_files, format_explanations
    from cifarlab.rundir import resolve_model_path

    out = Path(args.out) if args.out else resolve_model_path(Path(args.model)).parent / "explain"
    results = explain_files(Path(args.model), [Path(p) for p in args.images], out,
                            tuple(args.method or DEFAULT_METHODS), args.layer)
    print(json.dumps(results, indent=2) if args.json else format_explanations(results))


def _serve_command(args: argparse.Namespace) -> None:
    from cifarlab.serve import serve

    serve(Path(args.model), args.host, args.port)


def _export_command(args: argparse.Namespace) -> None:
    from cifarlab.export import export_model

    result = export_model(Path(args.model), args.format, Path(args.out) if args.out else None)
    print(f"wrote {result['path']} ({result['format']}): input {result['input']}, output {result['output']}; "
          f"max difference from the PyTorch model {result['max_abs_diff']:.2g} (tolerance {result['tolerance']:g})")


# what the lr sweep sets itself, or never reaches: not lr-find flags
SWEPT = ("lr", "schedule", "warmup_epochs", "epochs", "ema", "tta", "checkpoint_every", "sync_bn", "eval_batch_size")


def _lr_find_command(args: argparse.Namespace) -> None:
    from cifarlab.lr_find import lr_range_test, save_lr_plot

    result = lr_range_test(_apply_flags(recipe(args.recipe), config_overrides(args)), steps=args.steps, start_lr=args.start_lr,
                           end_lr=args.end_lr)
    save_lr_plot(result, Path(args.out))
    stop = f"stopped at lr {result.lrs[-1]:.3g} (loss diverged)" if result.stopped_early else "reached --end-lr"
    suggestion = f"suggested lr {result.suggestion:.3g}" if result.suggestion else "no suggestion (the loss never fell)"
    print(f"{len(result.lrs)} steps, {stop}; {suggestion}; wrote {args.out}")


def _models_command(args: argparse.Namespace) -> None:
    from cifarlab.models.catalog import format_table, list_models

    print(format_table(list_models()))


COMMANDS = {"models": _models_command, "train": _train_command, "eval": _eval_command, "report": _report_command,
            "compare": _compare_command, "runs": _runs_command, "predict": _predict_command,
            "export": _export_command, "explain": _explain_command,
            "serve": _serve_command, "lr-find": _lr_find_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except CifarlabError as error:
        if args.debug:
            traceback.print_exc()
        print(f"cifarlab: error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as stopped:
        print(f"cifarlab: {stopped}\nresume with: cifarlab train --resume {shlex.quote(str(stopped.run_dir))}",
              file=sys.stderr)
        return INTERRUPTED_STATUS
    except OSError as error:  # an unreadable path or a failed write the modules did not name themselves
        if args.debug:
            traceback.print_exc()
        where = f"{error.filename}: " if error.filename else ""
        print(f"cifarlab: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The `cifarlab` and `python -m cifarlab` entry point: `main`, then exit at once. Every file is closed
    and synced by then; what normal interpreter exit adds is tearing torch's modules down, about 1 s
    of a command that may take 15 (time_to_accuracy.py times whole commands)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
