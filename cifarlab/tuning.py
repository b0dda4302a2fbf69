"""Precision and memory layout chosen by measurement on the machine at hand.

On CPUs neither choice can be read off a flag: bf16 autocast is emulated and about 10x slower without
native kernels, yet even with AVX-512 BF16 it can lose to fp32 for small convolutions (the casts cost
more than they save); channels_last helps wide convolutions and hurts narrow ones, and which wins
flips with the CPU. So `--precision auto` and a recipe's `channels_last = None` are decided by timing
a few training steps of the run's own model and batch size in each candidate, once per machine: the
result is kept in the cache folder (`tuning.json`), keyed by the CPU, its thread count, the torch
version and the model, so later runs pay nothing. bf16 is a candidate only where oneDNN has native
bf16 kernels (needed, not sufficient: the timing decides). On CUDA: bf16 where supported, else fp16,
and channels_last (what tensor cores want).

The resolved values are written into the run's config (config.json and the resume checkpoint), so a
resumed run continues in exactly the precision and layout it started with.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cifarlab.config import TrainConfig
from cifarlab.data.download import cache_root
from cifarlab.device import autocast, autocast_dtype, cpu_has_fast_bf16
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer, param_groups
from cifarlab.rundir import write_json

TUNING_FILE = "tuning.json"
TIMED_STEPS = 2  # after one warm-up step per candidate (oneDNN builds its kernels on the first)
PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_auto(config: TrainConfig, device: torch.device, num_classes: int) -> tuple[TrainConfig, str | None]:
    """`config` with "auto" precision and an unset layout replaced by what runs fastest here, and a
    line saying what was measured (None when nothing was left to decide or it came from the cache)."""
    auto_precision, auto_layout = config.precision == "auto", config.channels_last is None
    if not (auto_precision or auto_layout):
        return config, None
    if device.type == "cuda":
        return dataclasses.replace(config, precision=PRECISION[autocast_dtype(device, "auto")] if auto_precision
                                   else config.precision,
                                   channels_last=True if auto_layout else config.channels_last), None
    precisions = (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]) if auto_precision else [config.precision]
    layouts = [False, True] if auto_layout else [config.channels_last]
    if len(precisions) * len(layouts) == 1:
        return dataclasses.replace(config, precision=precisions[0], channels_last=layouts[0]), None
    key = _key(config, num_classes)
    table = _read_table()
    measured = table.setdefault(key, {})
    candidates = {f"{p}/{'channels_last' if cl else 'nchw'}": (p, cl) for p in precisions for cl in layouts}
    missing = {name: choice for name, choice in candidates.items() if name not in measured}
    note = None
    if missing:
        measured.update({name: _images_per_second(config, num_classes, p, cl) for name, (p, cl) in missing.items()})
        _write_table(table)
        note = ("measured training speed (images/s) on this CPU: "
                + ", ".join(f"{name} {measured[name]:.0f}" for name in missing))
    # only among the choices left open: a precision or layout given on the command line stays
    precision, layout = max(candidates, key=measured.get).split("/")
    return dataclasses.replace(config, precision=precision, channels_last=layout == "channels_last"), note


def training_speed(config: TrainConfig, num_classes: int) -> float:
    """Training images/s of the config's model on this CPU in the precision and layout it would train in
    (measured once and cached, as resolve_auto measures them)."""
    config, _ = resolve_auto(config, torch.device("cpu"), num_classes)
    table = _read_table()
    measured = table.setdefault(_key(config, num_classes), {})
    name = f"{config.precision}/{'channels_last' if config.channels_last else 'nchw'}"
    if name not in measured:  # the precision and layout came from the flags: nothing was timed yet
        measured[name] = _images_per_second(config, num_classes, config.precision, config.channels_last)
        _write_table(table)
    return measured[name]


def _key(config: TrainConfig, num_classes: int) -> str:
    """What the timing depends on: this CPU (model name and instruction set), threads, torch, the model
    and its input size, and the batch size."""
    cpu = cpu_name()
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu}|{capability}|{torch.get_num_threads()} threads|torch {torch.__version__}|{config.model}|"
            f"{json.dumps(config.model_args, sort_keys=True)}|{num_classes} classes|{config.image_size}px|"
            f"batch {config.batch_size}")


def cpu_name() -> str:
    """The model name, with family and model (a virtual machine may call a Zen 4 just "AMD EPYC")."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def describe_cpu() -> str:
    """The CPU as benchmark tables name it: model, the instruction set torch uses, native bf16 or not."""
    bf16 = "native bf16" if cpu_has_fast_bf16() else "no native bf16"
    return (f"{cpu_name()}: {torch.backends.cpu.get_cpu_capability()}, {bf16}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def _images_per_second(config: TrainConfig, num_classes: int, precision: str, channels_last: bool) -> float:
    """Training steps of the run's model on a random batch: the same kernels as the real steps."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(config.model, **config.builder_args(num_classes)).to(memory_format=layout).train()
    dtype = autocast_dtype(device, precision)  # Muon's orthogonal steps too: the candidate's whole step
    optimizer = build_optimizer(config.optimizer, param_groups(model, 1e-3, 0.0, filter_lr=config.filter_lr),
                                config.momentum, dtype)
    images = torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(num_classes, (config.batch_size,), generator=generator)
    seconds = []
    for _ in range(1 + TIMED_STEPS):
        started = time.perf_counter()
        with autocast(device, dtype):  # nll of log_softmax: cross-entropy's cost, none of its call sites
            loss = F.nll_loss(model(images).float().log_softmax(dim=1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return config.batch_size / min(seconds[1:])


def _read_table() -> dict:
    try:
        table = json.loads((cache_root() / TUNING_FILE).read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_table(table: dict) -> None:
    try:
        write_json(cache_root() / TUNING_FILE, table)
    except OSError:  # a read-only cache only means measuring again next time
        pass
