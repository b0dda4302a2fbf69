"""One dataclass describes a training run; a recipe is a named instance of it.

Each option is declared once, as a field: its default, its help, its check and its flag. The command
line (`cli.add_config_flags`) and `validate()` are generated from the fields, so a new option is one
field here plus the code that uses it. The command line starts from a recipe and replaces the fields
the user gave (`dataclasses.replace`), so `config.json` in a run folder is always the complete,
resolved description of what ran.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cifarlab.data.loader import Augment
from cifarlab.device import PRECISIONS
from cifarlab.errors import CifarlabError, unknown_name
from cifarlab.models import model_names
from cifarlab.optim import OPTIMIZERS, SCHEDULES

Check = Callable[[Any, "TrainConfig"], bool]


def option(default: Any, help: str, bounds: tuple[Check, str] | None = None, *, flag: bool = True,
           choices: tuple | None = None, names: Callable[[], list[str]] | None = None) -> Any:
    """A config field with what the command line and `validate()` need to know about it.

    `bounds` (check, rule): check(value, config) False raises "--flag VALUE: rule"; `names` lists the
    registry a value must be in (an unknown one gets a did-you-mean); `choices` is a fixed set argparse
    enforces; `flag=False` keeps a field off the generic flags (recipes set it, or the command line
    treats it specially)."""
    check, rule = bounds if bounds else (None, "")
    meta = {"help": help, "check": check, "rule": rule, "flag": flag, "choices": choices, "names": names}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def resize_schedule(text: str, full_size: int) -> list[tuple[int, float]] | None:
    """--progressive-resize parsed into (size, share of the run) pairs; [] for ''; None when malformed."""
    try:
        pairs = [(int(size), float(share)) for size, share in (item.split(":") for item in text.split(",") if item)]
    except ValueError:
        return None
    sizes = [size for size, _ in pairs] + [full_size]
    rising = all(8 <= a < b for a, b in zip(sizes, sizes[1:]))
    shares = [share for _, share in pairs]
    return pairs if rising and all(share > 0 for share in shares) and sum(shares) < 1 else None


def at_least(low: float) -> tuple[Check, str]:
    return (lambda v, c: v >= low), f"must be {low} or more"


def in_unit() -> tuple[Check, str]:
    return (lambda v, c: 0 <= v < 1), "must be in [0, 1)"


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    recipe: str = option("seed", "the recipe this config started from", flag=False)
    model: str = option("cifar10_cnn", "registered model name; `cifarlab models` lists them", names=model_names)
    model_args: dict = option({}, "keyword arguments of the model's builder", flag=False)
    # data (--data/--dataset are one mutually exclusive pair on the command line: see cli.add_data_args)
    data: str | None = option(None, "a local source (archive, folder); None means `dataset`", flag=False)
    dataset: str | None = option(None, "official archive to download: cifar10 | cifar100", flag=False)
    val_split: int | None = option(None, "images held out (stratified, seeded) for validation; default 5000 when "
                                 "the source has no test split, else 0 (evaluate on test); 0 trains on everything",
                                 (lambda v, c: v is None or v >= 0, "must be 0 or more"))
    image_size: int = option(32, "pixels; images of other sizes are resized", at_least(8))
    progressive_resize: str = option("", "train on smaller images first: SIZE:SHARE pairs, e.g. 16:0.25,24:0.375 "
                                     "trains the first quarter of the run's steps on images scaled down to 16 px, "
                                     "the next 0.375 at 24 px, the rest at --image-size (fast90); '' turns it off",
                                     (lambda v, c: resize_schedule(v, c.image_size) is not None,
                                      "SIZE:SHARE pairs with sizes rising from 8 to below --image-size and shares "
                                      "above 0 adding up to less than 1, e.g. 16:0.25,24:0.375"))
    # augmentation (the defaults are the loader's own, cifarlab.data.Augment)
    translate: int = option(Augment.translate, "pixels of random translation (reflected edges); 0 turns it off",
                          at_least(0))
    flip: bool = option(Augment.flip, "random horizontal flips")
    alternate_flip: bool = option(Augment.alternate_flip, "with --flip: each image flipped at random in the "
                                  "first epoch, then the other way every other epoch (airbench)",
                                  (lambda v, c: not v or c.flip, "needs --flip"))
    randaugment: int = option(Augment.randaugment, "RandAugment: ops per image; 0 turns it off", at_least(0))
    randaugment_magnitude: int = option(Augment.randaugment_magnitude, "RandAugment magnitude, 0..30",
                                      (lambda v, c: 0 <= v <= 30, "must be in 0..30"))
    cutout: int = option(Augment.cutout, "side of the square cut out of each image, pixels; 0 turns it off",
                       (lambda v, c: 0 <= v <= c.image_size, "must be in 0..{c.image_size}"))
    mixup: float = option(Augment.mixup, "Beta(alpha, alpha) of mixup; 0 turns it off", at_least(0))
    cutmix: float = option(Augment.cutmix, "Beta(alpha, alpha) of cutmix (with mixup: one of the two per batch)",
                         at_least(0))
    # optimisation
    epochs: float = option(10, "passes over the training images; a fraction ends the last pass part-way "
                           "(fast75 trains 1.8125, airbench 9.9)", (lambda v, c: v > 0, "must be greater than 0"))
    time_budget: float = option(0.0, "seconds for training plus the final evaluation: the first steps are timed, "
                                "then the run's length is fixed so it ends in time, its schedule reaching zero "
                                "there (replaces --epochs); 0 turns it off", at_least(0))
    max_steps: int = option(0, "stop after this many steps, the schedule reaching zero there (--time-budget sets "
                            "it); 0: --epochs whole epochs", at_least(0))
    batch_size: int = option(128, "images per optimisation step", at_least(1))
    lr: float = option(1e-3, "peak learning rate", (lambda v, c: v > 0, "must be greater than 0"))
    optimizer: str = option("adam", "sgd is Nesterov SGD; muon: Muon for the conv filters, Nesterov SGD for the "
                            "rest", names=lambda: list(OPTIMIZERS))
    momentum: float = option(0.9, "SGD momentum (Nesterov)", at_least(0))
    muon_lr: float = option(0.24, "--optimizer muon: the conv filters' learning rate (their steps are "
                            "orthogonalised, so it is a step size, not per image); the other parameters take "
                            "Nesterov SGD at --lr", at_least(0))
    weight_decay: float = option(0.0, "on weights only (norms and biases too with --bias-decay)", at_least(0))
    schedule: str = option("constant", "per-step learning rate; onecycle warms up, then falls linearly to 0; "
                           "triangle (airbench94's) warms up from 0.2 of the peak and falls to 0.07 of it",
                      names=lambda: list(SCHEDULES))
    warmup_epochs: float = option(0.0, "linear warm-up of the learning rate, in epochs", at_least(0))
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", in_unit())
    bias_lr_scale: float = option(1.0, "lr multiplier for 1-D parameters (norm shifts, biases), as airbench does",
                                (lambda v, c: v > 0, "must be greater than 0"))
    bias_decay: bool = option(False, "decay 1-D parameters (norm shifts, biases) as much per step as the "
                              "weights, as airbench does; off: they are not decayed")
    clip_grad: float = option(0.0, "clip the gradient norm to this; 0 turns it off", at_least(0))
    lookahead: bool = option(False, "airbench's lookahead: every 5 steps the weights move to a slow average of "
                                    "themselves that tightens towards the end")
    whiten_bias_epochs: int = option(0, "fast_net: train the whitening stem's bias for this many epochs, then "
                                     "freeze it (airbench: 3); 0 trains it throughout", at_least(0))
    eval_each_epoch: bool = option(True, "evaluate on the held-out split after every epoch (the validation "
                                   "curves); off: after the last one only (fast75 and fast94: runs of seconds)")
    ema: float = option(0.0, "evaluate and save an exponential moving average of the weights with this decay "
                      "(e.g. 0.999); 0 turns it off", in_unit())
    # machinery
    seed: int = option(0, "seed for the split, initialisation, order and augmentation")
    device: str = option("auto", "auto picks cuda when available", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto: on a CPU whichever of fp32 and bf16 (where oneDNN has native bf16) "
                            "trains faster here, measured once (cifarlab.tuning); bf16, else fp16, on CUDA. fp16 "
                            "trains with a gradient scaler", choices=PRECISIONS)
    # 500, not 1000: a third faster on a 2-core CPU, whose caches a batch of 1,000 overflows (docs/notes.md)
    eval_batch_size: int = option(500, "images per evaluation batch", at_least(1))
    channels_last: bool | None = option(None, "memory layout: channels_last, or NCHW with --no-channels-last; "
                                        "unset, whichever trains faster here (measured once, like precision)")
    compile: bool = option(False, "torch.compile the training model (inductor): faster steps after a compile "
                           "of tens of seconds on first use (cached in the cache folder for later runs)")
    cuda_graph: bool = option(False, "on CUDA: record the model's training forward and backward once as CUDA "
                              "graphs and replay them every step (one launch where eager mode makes hundreds: "
                              "for small nets whose steps wait on the host); no effect on a CPU; one process (under "
                              "torchrun the steps run eagerly)",
                              (lambda v, c: not (v and (c.compile or c.progressive_resize)),
                               "records one compiled or one-size model: with --compile or --progressive-resize "
                               "add --no-cuda-graph"))
    cudnn_benchmark: bool = option(True, "on CUDA: let cuDNN time its algorithms for each new shape and keep the "
                                   "fastest (faster steps after a first use that costs seconds)")
    tta: int = option(0, "test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror + 1-px "
                    "shifts", choices=(0, 1, 2))
    tta_share: float = option(1.0, "with --tta: the share of each evaluation batch, least confident first, that "
                              "gets the other views; the rest keep their plain prediction (fast90: 0.5)",
                              (lambda v, c: 0 < v <= 1, "must be in (0, 1]"))
    gpu_memory_fraction: float | None = option(None, "cap this process's share of the GPU's memory, in (0, 1], "
                                               "so a class can share one GPU (the notebook used 0.22); default "
                                               "$CIFARLAB_GPU_MEMORY_FRACTION, else no cap; no effect on the CPU",
                                               (lambda v, c: v is None or 0 < v <= 1, "must be in (0, 1]"))
    checkpoint_every: int = option(0, "also save RUN_DIR/checkpoint.pt every N steps (it is always saved after "
                                 "each epoch)", at_least(0))
    checkpoint_seconds: float = option(0.0, "save at an epoch's end only once this many seconds have passed since the "
                                       "last save (0: after every epoch); for runs of seconds, where a save costs "
                                       "more than the epoch a crash would lose; a stop signal always saves",
                                       at_least(0))
    layer_stats: int = option(0, "every N steps, record each conv and linear layer's gradient and weight norms, "
                              "update-to-weight ratio, output statistics and dead-ReLU fraction in "
                              "RUN_DIR/layers.csv (`report` draws them: docs/depth.md); 0 turns it off; not "
                              "recorded with --compile or CUDA graphs (its hooks need eager steps)", at_least(0))
    sync_bn: bool = option(False, "under torchrun: BatchNorm statistics over the global batch (CUDA only)")

    def validate(self) -> "TrainConfig":
        for spec in dataclasses.fields(self):
            value, meta = getattr(self, spec.name), spec.metadata
            if meta["names"] is not None and value not in meta["names"]():
                raise unknown_name(spec.name.replace("_", " "), value, meta["names"]())
            if meta["choices"] is not None and value not in meta["choices"]:
                raise CifarlabError(f"{flag_name(spec.name)} {value}: choose from "
                                    f"{', '.join(map(str, meta['choices']))}")
            if meta["check"] is not None and not meta["check"](value, self):
                shown = f"{value:g}" if isinstance(value, float) else value  # --epochs 0, not 0.0
                raise CifarlabError(f"{flag_name(spec.name)} {shown}: {meta['rule'].format(c=self)}")
        return self

    def builder_args(self, num_classes: int) -> dict:
        """The model builder's keyword arguments for data with `num_classes` classes."""
        args = {**self.model_args, "num_classes": num_classes}
        if self.image_size != 32:
            args["image_size"] = self.image_size
        return args

    @property
    def filter_lr(self) -> float | None:
        """The conv filters' rate in a group of their own (Muon's orthogonal steps); None for other optimizers."""
        return self.muon_lr if self.optimizer == "muon" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


RECIPES: dict[str, TrainConfig] = {
    # The notebook's lesson with its blanks filled: its CNN, Adam, NLL loss, normalised inputs, plus
    # the flips and 2-px translations every CIFAR recipe uses. Reaches >= 75% (README table). Records the
    # layer statistics every 50 steps, 7 times an epoch, for under 1% of its training time (docs/depth.md).
    "seed": TrainConfig(
        recipe="seed", model="cifar10_cnn", model_args={"channels": [32, 32, 64, 128], "hidden": 256},
        epochs=10, batch_size=128, lr=1e-3, optimizer="adam", layer_stats=50,
    ),
    # The speed recipes follow airbench94: the whitened fast_net, Nesterov SGD with momentum 0.85, a
    # learning rate of 11.5 per 1024 images in airbench's decoupled form, which for our batch-mean loss
    # is lr = 11.5 * batch / (1024 * (1 + 1 / 0.15)) = 0.001465 * batch, weight decay 0.0153 per 1024
    # images (torch's coupled weight_decay 0.0153 / 11.5), 64x the lr for BatchNorm shifts, label
    # smoothing 0.2, a 23% warm-up then linear decay, 2-px translations, flips, and 6-view test-time
    # augmentation. fast94 adds airbench's lookahead and alternating flips (+0.35 and +0.16 points in a
    # 48-run factorial sweep on one H200; its triangle schedule lost 0.25, bias decay and freezing the
    # whitening bias after 3 epochs were neutral: docs/notes.md), replays its steps from CUDA graphs
    # (0.21 s an epoch against 0.26 eager) and evaluates after its last epoch only (0.16 s an epoch; as
    # airbench times itself). Its epochs take a sixth of a second: it checkpoints every 30 s, not every epoch.
    "fast94": TrainConfig(
        recipe="fast94", model="fast_net", model_args={"widths": [64, 256, 256]}, epochs=10, batch_size=1024,
        optimizer="sgd", lr=0.001465 * 1024, momentum=0.85, weight_decay=0.0153 / 11.5, bias_lr_scale=64,
        label_smoothing=0.2, schedule="onecycle", warmup_epochs=2.3, tta=2, checkpoint_seconds=30,
        alternate_flip=True, lookahead=True, cuda_graph=True, eval_each_epoch=False,
    ),
    # airbench95 and airbench96 on our pipeline: the same method, wider, longer, with lookahead as they
    # use it (the lr and weight decay by the formulas above from their 10.0 and 9.0 per 1024 images).
    # fast96 adds a third conv per block with a residual around the last two, 12-px cutout, 4-px shifts.
    "fast95": TrainConfig(
        recipe="fast95", model="fast_net", model_args={"widths": [128, 384, 384]}, epochs=15, batch_size=1024,
        optimizer="sgd", lr=10 / (1 + 1 / 0.15), momentum=0.85, weight_decay=0.0153 / 10, bias_lr_scale=64,
        label_smoothing=0.2, schedule="onecycle", warmup_epochs=0.23 * 15, lookahead=True, tta=2,
        checkpoint_seconds=30,
    ),
    "fast96": TrainConfig(
        recipe="fast96", model="fast_net", model_args={"widths": [128, 512, 512], "block_convs": 3}, epochs=40,
        batch_size=1024, optimizer="sgd", lr=9 / (1 + 1 / 0.15), momentum=0.85, weight_decay=0.0153 / 9,
        bias_lr_scale=64, label_smoothing=0.2, schedule="onecycle", warmup_epochs=0.23 * 40, translate=4,
        cutout=12, lookahead=True, tta=2, checkpoint_seconds=30,
    ),
    # fast94's method shrunk to what clears 75% fastest on 2 CPU cores: a quarter-width net whose
    # whitening stem has stride 2 (every later layer runs at 16x16: a quarter of the FLOPs; 5x the
    # images/s of the stride-1 net), ReLU for GELU (steps 5-10% faster, about half a point), batch 512,
    # Muon for the conv filters (airbench94_muon's update, at lr 0.15), which gets in 2 epochs what SGD
    # needed 3 for, and the whitening bias frozen after epoch 1 (no stem backward in epoch 2, at no cost
    # in accuracy); flips but no translations (a run this short underfits: +0.45 points); 1.8125 epochs
    # (160 steps: +0.56 points over 1.75 for 4% more steps); precision and layout measured per machine;
    # evaluated after its last epoch only (the one after epoch 1 cost 0.25 s of a 16 s command).
    # Chosen on the validation split (docs/notes.md has the tables).
    "fast75": TrainConfig(
        recipe="fast75", model="fast_net", model_args={"widths": [32, 64, 128], "whiten_stride": 2,
                                                       "activation": "relu"}, epochs=1.8125,
        batch_size=512, optimizer="muon", muon_lr=0.15, lr=0.001465 * 512, momentum=0.85,
        weight_decay=0.0153 / 11.5, bias_lr_scale=64, label_smoothing=0.2, schedule="onecycle",
        warmup_epochs=0.46, tta=2, whiten_bias_epochs=1, translate=0, eval_each_epoch=False,
    ),
    # He et al. (2015) section 4.2 on a cosine schedule: SGD (Nesterov) 0.1, momentum 0.9, weight decay
    # 1e-4 on weights only, batch 128, 4-px translations and flips; the paper reports 93.0% on the test set.
    "resnet56": TrainConfig(
        recipe="resnet56", model="resnet56", epochs=180, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9,
        weight_decay=1e-4, schedule="cosine", warmup_epochs=1, translate=4,
    ),
    # The common long schedule for the 32x32 PreAct ResNet-18: 200 epochs cosine, SGD 0.1, wd 5e-4,
    # translate 4 + flip + 16-px cutout (DeVries & Taylor report 96.0% for ResNet-18 with it).
    "resnet18": TrainConfig(
        recipe="resnet18", model="preact_resnet18", epochs=200, batch_size=128, lr=0.1, optimizer="sgd",
        momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1, translate=4, cutout=16,
    ),
}

# fast75 for minutes, not seconds (`--time-budget 300`): its stride-2 stem caps it near 85% (85.1% after 37
# epochs), so the stem is stride 1 again: 4x the FLOPs an image and about 2.5x the time a step, but 86.5%
# (4 seeds) where fast75 got 84.4% in the same 300 s (AVX2, fp32: README). Long enough for 2-px
# translations and for the whitening bias to train 2 epochs; 8 epochs without a budget.
RECIPES["fast85"] = dataclasses.replace(
    RECIPES["fast75"], recipe="fast85", model_args={**RECIPES["fast75"].model_args, "whiten_stride": 1},
    epochs=8, warmup_epochs=0.23 * 8, whiten_bias_epochs=2, translate=2, eval_each_epoch=True,  # minutes: its curve
)

# fast94 for two CPU cores: the 94%-class network where a CPU spends its time differently from a GPU.
# Its steps cost what their pixels cost (a 16-px step 0.21 of a 32-px one on the Zen 4, 24 px 0.5), so
# the first half of the run trains at 16 px and the next tenth at 24 px: coarse features cheaply, the
# last four epochs at full size so that training and test see objects at one scale (89.70% against 89.46
# and 89.36% for the schedules that spent the same time on fewer, larger epochs: docs/notes.md). Muon
# for the conv filters (8 epochs as good as SGD's 10 on a GPU), ReLU for GELU (11% faster steps), the
# final TTA's other views on the least confident half of each batch (the same accuracy, 6.7 s against
# 15.6). No CUDA graphs: they record one image size.
RECIPES["fast90"] = dataclasses.replace(
    RECIPES["fast94"], recipe="fast90", model_args={"widths": [64, 256, 256], "activation": "relu"}, epochs=11,
    warmup_epochs=0.23 * 11, optimizer="muon", progressive_resize="16:0.5,24:0.1", tta_share=0.5,
    cuda_graph=False,
)


def load_config(path: Path) -> TrainConfig:
    """A run's config.json (or the run folder holding it), to run it again (`train --config`)."""
    file = path / "config.json" if path.is_dir() else path
    try:
        values = json.loads(file.read_text())
    except FileNotFoundError:
        raise CifarlabError(f"--config {path}: no such file (give a run folder or its config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CifarlabError(f"--config {file}: not a readable config.json ({error})") from None
    if not isinstance(values, dict):
        raise CifarlabError(f"--config {file}: not a config (expected a JSON object of training settings)")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CifarlabError(f"--config {file}: unknown settings {', '.join(unknown)}")
    try:
        return TrainConfig(**values)
    except TypeError as error:
        raise CifarlabError(f"--config {file}: {error}") from None


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise unknown_name("recipe", name, list(RECIPES))
    return RECIPES[name]
