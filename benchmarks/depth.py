"""Why depth needs shortcuts: He et al. (2015) Fig. 6 in minutes on a CPU.

Trains plain-20, plain-56, ResNet-20 and ResNet-56 on the same subset of the shared CIFAR-10 images with
the same short schedule (SGD, momentum 0.9, constant lr, the paper's weight decay, flips and 2-px shifts),
records their layer statistics (cifarlab.layer_stats), and draws training and validation error against
steps (plain left, residual right) above each net's weight-gradient norm by depth:

    python benchmarks/depth.py --out runs/depth --plot docs/img/depth.png

Each net's layers.csv and curves.json land in OUT/<model>/ (`cifarlab report`-style pictures of one net:
cifarlab.layer_plots). The defaults are what docs/depth.md shows; --train-images, --steps and --val-images
make it smaller (the notebook's last section runs a reduced version).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from cifarlab.build import build_run, local_runtime
from cifarlab.config import TrainConfig
from cifarlab.data import DataBundle, load_data
from cifarlab.engine import evaluate, train_step
from cifarlab.layer_stats import open_layer_stats, read_layer_stats
from cifarlab.rundir import LAYERS_FILE, write_json
from cifarlab.trainer import seed_everything
from cifarlab.tuning import describe_cpu

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
MODELS = ["plain20", "plain56", "resnet20", "resnet56"]


def subset(data: str, train_images: int, val_images: int, seed: int) -> DataBundle:
    """A seeded random `train_images` of the training split and `val_images` of the held-out split."""
    bundle = load_data(data, val_split=max(val_images, 10), seed=seed)
    order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))
    return DataBundle(bundle.train.subset(order[:train_images].sort().values), bundle.val, None, bundle.source)


def shared_config(args: argparse.Namespace, bundle: DataBundle) -> TrainConfig:
    """The four nets' config but the model: precision and layout are whichever trains plain-20 fastest
    here (cifarlab.tuning), the same for all four."""
    config = TrainConfig(model=MODELS[0], optimizer="sgd", lr=args.lr, momentum=0.9, weight_decay=1e-4,
                         warmup_epochs=args.warmup_steps * args.batch_size / args.train_images, precision=args.precision,
                         batch_size=args.batch_size, max_steps=args.steps, seed=args.seed,
                         layer_stats=min(args.layer_stats, args.steps))
    return local_runtime(config, bundle)[0]


def train_curve(config: TrainConfig, bundle: DataBundle, args: argparse.Namespace, out: Path) -> dict:
    """Train `config.model` for args.steps steps; every args.eval_every steps the training error over the
    steps since the last point and the validation error. Layer statistics go to out/layers.csv."""
    name = config.model
    config, runtime = local_runtime(config, bundle)
    seed_everything(config.seed)
    run = build_run(config, bundle, runtime)
    curve = {"model": name, "step": [], "train_error": [], "val_error": [],
             "precision": str(runtime.amp_dtype or torch.float32), "channels_last": config.channels_last}
    errors, step, epoch, started = [], 0, 0, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open_layer_stats(out, run.model, run.step.optimizer, config.layer_stats):
        while step < args.steps:
            epoch += 1
            run.train_loader.set_epoch(epoch)
            for batch in run.train_loader:
                run.model.train()
                errors.append(1 - train_step(run.step, batch)[1])
                step += 1
                if step % args.eval_every == 0 or step == args.steps:
                    curve["step"].append(step)
                    curve["train_error"].append(torch.stack(errors).mean().item())
                    curve["val_error"].append(1 - evaluate(run.model, run.eval_loader, runtime.device).accuracy)
                    errors = []
                if step == args.steps:
                    break
    curve["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "curves.json", curve)
    return curve


def draw(curves: dict[str, dict], layers: dict[str, list[dict]], title: str):
    """Fig. 6 on top (plain left, residual right; dashed: training, solid: validation), the
    weight-gradient norm by depth below (at the first and the last recording time)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5), layout="constrained")
    (plain_ax, res_ax), (plain_g, res_g) = figure.subplots(2, 2)
    colours = {"20": "tab:orange", "56": "tab:red"}
    for ax, grad_ax, family, label in ((plain_ax, plain_g, "plain", "plain"), (res_ax, res_g, "resnet", "ResNet")):
        for depth, colour in colours.items():
            name = f"{family}{depth}"
            if name not in curves:
                continue
            c = curves[name]
            ax.plot(c["step"], [100 * e for e in c["train_error"]], "--", color=colour, linewidth=1)
            ax.plot(c["step"], [100 * e for e in c["val_error"]], "-", color=colour, linewidth=2,
                    label=f"{label}-{depth}")
            steps = sorted({r["step"] for r in layers[name]})
            for step, style in ((steps[0], ":"), (steps[-1], "-")):
                points = sorted((r["depth"], r["grad_norm"]) for r in layers[name] if r["step"] == step)
                grad_ax.plot(*zip(*points), style, color=colour, marker="o", markersize=2,
                             label=f"{label}-{depth}, step {step}")
        ax.set_title(f"{label} nets (dashed: training error, solid: validation error)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("error (%)")
        ax.grid(alpha=0.3)
        grad_ax.set_yscale("log")
        grad_ax.set_title(f"{label} nets: weight-gradient norm by depth", fontsize=10)
        grad_ax.set_xlabel("layer depth (1: first conv, last: the classifier)")
        grad_ax.set_ylabel("||dL/dW||")
        grad_ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend()
            grad_ax.legend(fontsize=7)
    for pair in ((plain_ax, res_ax), (plain_g, res_g)):  # one scale per row
        limits = [ax.get_ylim() for ax in pair if ax.lines]
        for ax in pair:
            ax.set_ylim(min(low for low, _ in limits), max(high for _, high in limits))
    figure.suptitle(title, fontsize=9)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.025)
    parser.add_argument("--warmup-steps", type=int, default=160, help="linear warm-up of the lr over these steps")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--layer-stats", type=int, default=50, help="record the layer statistics every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/depth"))
    parser.add_argument("--plot", type=Path, help="write the figure here (PNG; default OUT/depth.png)")
    args = parser.parse_args()
    started = time.perf_counter()
    bundle = subset(args.data, args.train_images, args.val_images, args.seed)
    config, curves, layers = shared_config(args, bundle), {}, {}
    for name in args.models:
        curves[name] = train_curve(dataclasses.replace(config, model=name), bundle, args, args.out / name)
        layers[name] = read_layer_stats(args.out / name / LAYERS_FILE)
        c = curves[name]
        print(f"{name}: training error {100 * c['train_error'][-1]:.1f}%, validation error "
              f"{100 * c['val_error'][-1]:.1f}% after {args.steps} steps ({c['seconds']:.0f} s, {c['precision']}, "
              f"channels_last {c['channels_last']})", flush=True)
    seconds = time.perf_counter() - started
    precisions = "/".join(sorted({c["precision"].removeprefix("torch.") for c in curves.values()}))
    title = (f"{args.train_images} CIFAR-10 training images, {args.val_images} validation, {args.steps} steps of "
             f"{args.batch_size}, SGD lr {args.lr:g} ({args.warmup_steps} warm-up), {precisions}; {seconds:.0f} s on\n"
             f"{describe_cpu()}")
    print(title.replace("\n", " "))
    plot = args.plot or args.out / "depth.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    draw(curves, layers, title).savefig(plot, dpi=80)
    print(f"wrote {plot}")


if __name__ == "__main__":
    main()
