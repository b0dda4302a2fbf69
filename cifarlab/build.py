"""From a config and data to the objects a run trains with: the one place that builds them.

`cifarlab train`, `lr-find`, the benchmarks and the notebook API all call `build_run`, so they train
the same network (its data-dependent init and memory layout) with the same parameter groups,
optimizer, schedule, weight averaging, gradient scaler and loaders.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from cifarlab.config import TrainConfig, resize_schedule
from cifarlab.data import Augment, DataBundle, TensorLoader, channel_stats
from cifarlab.data.download import cache_root
from cifarlab.device import autocast_dtype, open_device
from cifarlab.distributed import DistInfo, broadcast_object, shard_log_path
from cifarlab.ema import Lookahead, WeightEMA
from cifarlab.engine import Step
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model, sized_for_input
from cifarlab.optim import build_optimizer, build_scheduler, param_groups
from cifarlab.rundir import ModelInfo
from cifarlab.tuning import resolve_auto

WHITENING_IMAGES = 5000  # images a data-dependent init sees (the fast net's whitening stem)


@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs: its device, the autocast dtype, and its torchrun rank."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    dist: DistInfo = DistInfo()


def resolve_runtime(config: TrainConfig, bundle: DataBundle, device: torch.device,
                    dist: DistInfo = DistInfo()) -> tuple[TrainConfig, Runtime]:
    """The config with its measured choices made (precision and layout, `tuning`; under torchrun rank
    0's, so every rank trains alike) and the runtime they imply."""
    config, note = resolve_auto(config, device, len(bundle.classes))
    config = broadcast_object(config)
    if device.type == "cuda":  # shapes are fixed within a run: let cuDNN time its algorithms once and keep the best
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    if note:
        print(note)
    return config, Runtime(device, autocast_dtype(device, config.precision), dist)


def local_runtime(config: TrainConfig, bundle: DataBundle) -> tuple[TrainConfig, Runtime]:
    """One process on the config's device, every core it may use (lr-find, benchmarks, notebooks)."""
    return resolve_runtime(config, bundle, open_device(config.device, config.gpu_memory_fraction))


@dataclass
class Run:
    """The objects one run trains with. `model` is what is saved; `step.model` is what trains (`model`
    in a DDP wrapper under torchrun); `final_model` is what is evaluated and saved: the weight average
    when there is one."""

    model: nn.Module
    step: Step
    train_loader: TensorLoader
    eval_loader: TensorLoader | None
    info: ModelInfo  # what model.pt records beside the weights: the builder's arguments, classes, normalisation
    parameters: int  # trained parameters as built (counted once: --whiten-bias-epochs freezes one later)

    @property
    def final_model(self) -> nn.Module:
        return self.step.ema.module if self.step.ema is not None else self.model


def build_run(config: TrainConfig, bundle: DataBundle, runtime: Runtime) -> Run:
    check_any_size(config)
    stats = channel_stats(bundle.train.images)
    model_args = config.builder_args(len(bundle.classes))
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = create_model(config.model, **model_args).to(runtime.device, memory_format=layout)
    data_dependent_init(model, bundle, runtime.device, stats, config.seed)
    check_whiten_bias_freeze(model, config)
    train_loader, eval_loader = make_loaders(bundle, config, runtime, stats)
    groups = param_groups(model, config.lr, config.weight_decay, config.bias_lr_scale, filter_lr=config.filter_lr,
                          bias_decay=config.bias_decay)
    optimizer = build_optimizer(config.optimizer, groups, config.momentum, runtime.amp_dtype)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    ema = WeightEMA(model, config.ema) if config.ema else None
    lookahead = Lookahead(model, total_steps(config, len(train_loader))) if config.lookahead else None
    trained = compiled(wrap_distributed(model, config, runtime), config.compile)
    graph_batch = config.batch_size if train_loader.drop_last else len(bundle.train)  # every step's size
    trained = graphed(trained, config, runtime, graph_batch)
    step = Step(trained, optimizer, runtime.device, scheduler=scheduler, ema=ema, lookahead=lookahead,
                amp_dtype=runtime.amp_dtype, label_smoothing=config.label_smoothing, clip_grad=config.clip_grad)
    info = ModelInfo(config.model, model_args, bundle.classes, *stats, config.image_size, config.to_dict())
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Run(model, step, train_loader, eval_loader, info, parameters)


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The run's length in steps: --max-steps (what --time-budget sets), else --epochs' worth."""
    return config.max_steps or max(round(config.epochs * steps_per_epoch), 1)


def epoch_image_size(config: TrainConfig, epoch: int, steps_per_epoch: int) -> int:
    """The image size epoch `epoch` (from 1) trains at: --progressive-resize's size where its first step
    falls in the run, else --image-size. Whole epochs, so a resumed epoch has the size it had."""
    progress, edge = (epoch - 1) * steps_per_epoch / total_steps(config, steps_per_epoch), 0.0
    for size, share in resize_schedule(config.progressive_resize, config.image_size) or []:
        edge += share
        if progress < edge - 1e-9:
            return size
    return config.image_size


def size_cost(config: TrainConfig, size: int) -> float:
    """A step at `size` px in full-size steps: its share of the pixels (fast90's 16- and 24-px steps
    measured 0.19-0.21 and 0.48-0.51 of a 32-px one on two CPU kinds: 0.25 and 0.56 err on the safe side)."""
    return (size / config.image_size) ** 2


def mean_step_cost(config: TrainConfig) -> float:
    """--progressive-resize's average step over the run, in full-size steps (1 without it)."""
    pairs = resize_schedule(config.progressive_resize, config.image_size) or []
    return 1 - sum(share * (1 - size_cost(config, size)) for size, share in pairs)


def step_costs(config: TrainConfig, steps_per_epoch: int, start: int, stop: int) -> float:
    """The cost of the run's steps start..stop-1 (from 0) in full-size steps, each at its epoch's size."""
    total = 0.0
    for epoch in range(start // steps_per_epoch + 1, (stop - 1) // steps_per_epoch + 2):
        steps = min(stop, epoch * steps_per_epoch) - max(start, (epoch - 1) * steps_per_epoch)
        total += steps * size_cost(config, epoch_image_size(config, epoch, steps_per_epoch))
    return total


def epoch_count(config: TrainConfig, steps_per_epoch: int) -> int:
    """The passes the run starts: the last one stops part-way when its steps end inside it."""
    return math.ceil(total_steps(config, steps_per_epoch) / steps_per_epoch)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int,
                   done: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """The config's schedule over the run's steps, `done` of them taken already."""
    return build_scheduler(optimizer, config.schedule, total_steps(config, steps_per_epoch),
                           round(config.warmup_epochs * steps_per_epoch), done)


def make_loaders(bundle: DataBundle, config: TrainConfig, runtime: Runtime,
                 stats: tuple[list[float], list[float]]) -> tuple[TensorLoader, TensorLoader | None]:
    """The training loader (this rank's shard of each global batch under torchrun) and the evaluation
    loader (the whole split on every rank: identical weights give identical results, no reduction)."""
    augment = Augment(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Augment)})
    if not (augment.translate or augment.flip or augment.extras):
        augment = None
    train_loader = TensorLoader(bundle.train, config.batch_size, runtime.device, stats, shuffle=True,
                                augment=augment, seed=config.seed, shard=(runtime.dist.rank, runtime.dist.world))
    train_loader.shard_log = shard_log_path(runtime.dist)
    split = bundle.eval_split
    eval_loader = (TensorLoader(bundle.split(split), config.eval_batch_size, runtime.device, stats)
                   if split is not None else None)
    return train_loader, eval_loader


def data_dependent_init(model: nn.Module, bundle: DataBundle, device: torch.device,
                        stats: tuple[list[float], list[float]], seed: int = 0) -> None:
    """Models that set weights from data (the fast net's whitening stem) get a seeded random sample of
    the training images, normalised as the loader will: the same on every rank, so it is reproducible.
    Random, not the first images: an image folder is read class by class, so its first 5,000 images
    are all airplanes."""
    init = getattr(model, "init_from_data", None)
    if init is not None:
        order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))
        sample = bundle.train.subset(order[:WHITENING_IMAGES].sort().values)
        images, _ = next(iter(TensorLoader(sample, len(sample), device, stats)))
        init(images)


def check_any_size(config: TrainConfig) -> None:
    """--progressive-resize needs a model that takes smaller images (global pooling before its head):
    refused before any step rather than a shape error at the first one."""
    if config.progressive_resize and sized_for_input(config.model):
        raise CifarlabError(f"--progressive-resize {config.progressive_resize}: {config.model} takes only "
                            f"{config.image_size}-px images (its head is sized for them); train a model with "
                            f"global pooling (fast_net, the resnets) or leave the option out")


def check_whiten_bias_freeze(model: nn.Module, config: TrainConfig) -> None:
    """--whiten-bias-epochs needs a whitening stem with a trained bias."""
    if not config.whiten_bias_epochs:
        return
    whiten = getattr(model, "whiten", None)
    if whiten is None or whiten.bias is None or not whiten.bias.requires_grad:
        raise CifarlabError(f"--whiten-bias-epochs: model '{config.model}' has no trained whitening bias "
                            f"(fast_net has one)")


def freeze_whiten_bias(run: Run, config: TrainConfig, runtime: Runtime, epoch: int) -> None:
    """airbench's whitening bias: trained in the first --whiten-bias-epochs epochs, then frozen. Called at
    every epoch's start, so a resumed run freezes it too.

    Frozen by `requires_grad`, so autograd skips the stem's backward and the first conv's input
    gradient (about a tenth of fast75's FLOPs a step), and the optimizer skips a parameter with no
    gradient. DDP's reducer expects a gradient for every parameter it was built with, so under torchrun every rank
    builds its wrapper again, without the bias, at the same step: the ranks then train exactly as
    one process does (the other parameters' gradients are still averaged every step)."""
    if not config.whiten_bias_epochs or epoch <= config.whiten_bias_epochs or not run.model.whiten.bias.requires_grad:
        return
    run.model.whiten.bias.requires_grad_(False)
    if runtime.dist.enabled:
        run.step.model = compiled(wrap_distributed(run.model, config, runtime), config.compile)


def compiled(model: nn.Module, compile_model: bool) -> nn.Module:
    """`model` through torch.compile when asked (the training model only: `Run.model` stays plain, so
    saved weights keep their names and evaluation needs no second compile). Inductor's caches go to
    the cache folder, which outlives /tmp, so a later run of the same shapes compiles from cache."""
    if not compile_model:
        return model
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    return torch.compile(model)


def graphed(model: nn.Module, config: TrainConfig, runtime: Runtime, batch: int) -> nn.Module:
    """`model` whose training-mode forward and backward replay CUDA graphs recorded once (--cuda-graph).

    A small net's eager step costs the host more than the GPU (about 20 us of Python and dispatch per
    kernel, hundreds of kernels); a replay is one launch. Every step has one shape (the training loader
    drops its last partial batch), so one recording serves the run. In eval mode the module runs its
    eager forward (torch switches on `training`), so evaluation and the saved weights are unchanged.
    Recording runs three warm-up passes (cuDNN picks its algorithms there) whose BatchNorm statistics
    are put back afterwards: the run trains from the state it was built with. Parameters are updated in
    place (the optimizer, lookahead), so the graphs keep reading the current weights; a parameter frozen
    later (--whiten-bias-epochs) just stops receiving its gradient. Recording comes before the training
    clock starts (as airbench's warm-up run does), so `train_seconds` counts steps, not cuDNN's autotuning."""
    if not config.cuda_graph or runtime.device.type != "cuda":
        return model
    if runtime.dist.enabled:  # a recipe's default: the same command runs under torchrun, eagerly
        print("--cuda-graph: not under torchrun (DDP's gradient hooks run outside a recorded graph): eager steps")
        return model
    saved = [buffer.clone() for buffer in model.buffers()]
    sample = torch.randn(batch, 3, config.image_size, config.image_size, device=runtime.device)
    model.train()
    # autocast's weight cache would keep casts made while recording, stale once the weights change
    with torch.autocast("cuda", dtype=runtime.amp_dtype or torch.float32, enabled=runtime.amp_dtype is not None,
                        cache_enabled=False):
        model = torch.cuda.make_graphed_callables(model, (sample,))
        model.eval()  # and the evaluation's batch once, so cuDNN picks its algorithms here too, not in epoch 1
        with torch.no_grad():
            model(sample[:config.eval_batch_size])
        model.train()
    with torch.no_grad():
        torch._foreach_copy_(list(model.buffers()), saved)
    # the parameters' gradient accumulators were made on the recording's side stream and stay alive with
    # the recorded graph: each replay's backward then warns that the streams differ (an ordering event on
    # the GPU, no host sync: tests/test_gpu.py)
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    return model


def wrap_distributed(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """DDP around `model` under torchrun (optionally with SyncBatchNorm); `model` itself for one process.

    SyncBatchNorm replaces the BatchNorm modules inside `model` in place, so the saved weights keep the
    plain BatchNorm names and load anywhere."""
    if not runtime.dist.enabled:
        return model
    device = runtime.device
    if config.sync_bn:
        if device.type != "cuda":
            raise CifarlabError("--sync-bn: torch's SyncBatchNorm runs on CUDA only; drop it on CPU")
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
