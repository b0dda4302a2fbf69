"""One dataclass describes a training run; a recipe is a named instance of it.

The command line starts from a recipe and replaces the fields the user gave (`dataclasses.replace`),
so `config.json` in a run folder is always the complete, resolved description of what ran.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cifarlab.errors import CifarlabError, unknown_name
from cifarlab.models import model_names


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    recipe: str = "seed"
    model: str = "cifar10_cnn"
    model_args: dict = field(default_factory=dict)  # keyword arguments of the model's builder
    # data
    data: str | None = None  # a local source (archive, folder); None means `dataset`
    dataset: str | None = None  # official archive to download: cifar10 | cifar100 (default cifar10)
    val_split: int | None = None  # images held out; None: 5000 if the source has no test split, else 0
    image_size: int = 32  # pixels; images of other sizes are resized
    translate: int = 2  # pixels of random translation (reflected edges); 0 turns it off
    flip: bool = True  # random horizontal flips
    # optimisation
    epochs: int = 10
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # peak learning rate
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only (Nesterov)
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | onecycle | cosine
    warmup_epochs: float = 0.0  # linear warm-up at the start of onecycle / cosine, in epochs
    label_smoothing: float = 0.0
    bias_lr_scale: float = 1.0  # lr multiplier for 1-D parameters (norm shifts, biases), as airbench does
    clip_grad: float = 0.0  # max gradient norm; 0: no clipping
    ema: float = 0.0  # decay of a weight EMA that is evaluated and saved instead (e.g. 0.999); 0: off
    # augmentation beyond translate + flip (cifarlab.data.augment), each off at 0
    randaugment: int = 0  # RandAugment ops per image (magnitude 9 of 30)
    cutout: int = 0  # side of the square cut out per image, pixels
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix (with mixup too: one of the two per batch)
    # machinery
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where fast, fp16/bf16 on CUDA) | fp32 | bf16 | fp16
    eval_batch_size: int = 1000
    channels_last: bool = True  # memory layout; NCHW can be faster on CPUs for narrow convolutions
    tta: int = 0  # test-time augmentation when evaluating: 0 none, 1 mirror, 2 mirror + 1-px shifts
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: only at each epoch's end)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)

    def validate(self) -> "TrainConfig":
        checks = [
            (self.epochs >= 1, f"--epochs {self.epochs}: must be 1 or more"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be 1 or more"),
            (self.lr > 0, f"--lr {self.lr}: must be greater than 0"),
            (self.val_split is None or self.val_split >= 0, f"--val-split {self.val_split}: must be 0 or more"),
            (self.image_size >= 8, f"image_size {self.image_size}: must be 8 or more"),
            (self.translate >= 0, f"translate {self.translate}: must be 0 or more"),
            (0 <= self.label_smoothing < 1, f"label_smoothing {self.label_smoothing}: must be in [0, 1)"),
            (self.checkpoint_every >= 0, f"--checkpoint-every {self.checkpoint_every}: must be 0 or more"),
            (self.clip_grad >= 0, f"--clip-grad {self.clip_grad}: must be 0 (off) or more"),
            (0 <= self.ema < 1, f"--ema {self.ema}: must be in [0, 1) (0: off)"),
            (self.randaugment >= 0, f"--randaugment {self.randaugment}: must be 0 (off) or more"),
            (0 <= self.cutout <= self.image_size, f"--cutout {self.cutout}: must be in 0..{self.image_size}"),
            (self.mixup >= 0, f"--mixup {self.mixup}: must be 0 (off) or more"),
            (self.cutmix >= 0, f"--cutmix {self.cutmix}: must be 0 (off) or more"),
        ]
        if self.model not in model_names():
            raise unknown_name("model", self.model, model_names())
        for ok, message in checks:
            if not ok:
                raise CifarlabError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


RECIPES: dict[str, TrainConfig] = {
    # The notebook's lesson with its blanks filled: its CNN, Adam, NLL loss, normalised inputs, plus
    # the flips and 2-px translations every CIFAR recipe uses. Reaches >= 75% (README table).
    "seed": TrainConfig(
        recipe="seed", model="cifar10_cnn", model_args={"channels": [32, 32, 64, 128], "hidden": 256},
        epochs=10, batch_size=128, lr=1e-3, optimizer="adam",
    ),
    # The speed recipes follow airbench94: the whitened fast_net, Nesterov SGD with momentum 0.85, a
    # learning rate of 11.5 per 1024 images in airbench's decoupled form, which for our batch-mean loss
    # is lr = 11.5 * batch / (1024 * (1 + 1 / 0.15)) = 0.001465 * batch, weight decay 0.0153 per 1024
    # images (torch's coupled weight_decay 0.0153 / 11.5), 64x the lr for BatchNorm shifts, label
    # smoothing 0.2, a 23% warm-up then linear decay, 2-px translations, flips, and 6-view test-time
    # augmentation.
    "fast94": TrainConfig(
        recipe="fast94", model="fast_net", model_args={"widths": [64, 256, 256]}, epochs=10, batch_size=1024,
        optimizer="sgd", lr=0.001465 * 1024, momentum=0.85, weight_decay=0.0153 / 11.5, bias_lr_scale=64,
        label_smoothing=0.2, schedule="onecycle", warmup_epochs=2.3, tta=2,
    ),
    # fast94's method shrunk to the least compute that still clears 75% on 2 CPU cores: a quarter-width
    # net, 2 epochs, smaller batches (more steps per epoch), and NCHW, which beat channels_last for
    # these narrow convolutions on AVX2 CPUs (docs/profile.md).
    "fast75": TrainConfig(
        recipe="fast75", model="fast_net", model_args={"widths": [32, 64, 128]}, epochs=2, batch_size=256,
        optimizer="sgd", lr=0.001465 * 256, momentum=0.85, weight_decay=0.0153 / 11.5, bias_lr_scale=64,
        label_smoothing=0.2, schedule="onecycle", warmup_epochs=0.46, tta=2, channels_last=False,
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


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise unknown_name("recipe", name, list(RECIPES))
    return RECIPES[name]
