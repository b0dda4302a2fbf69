"""Where and in what precision to run: device choice, CPU threads, and the autocast context."""
from __future__ import annotations

import contextlib
import os

import torch

from cifarlab.errors import CifarlabError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CifarlabError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise CifarlabError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BF16 or AMX). Without them bf16 autocast on
    CPU is emulated and ran about 10x *slower* than fp32 in our measurements, so 'auto' avoids it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise CifarlabError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_cpu_threads(processes: int = 1) -> int:
    """Use every core this process may run on (the affinity mask, not the machine's count), shared
    evenly among `processes` processes on this node (torchrun's ranks would otherwise oversubscribe)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(n // processes, 1)
    torch.set_num_threads(n)
    return n
