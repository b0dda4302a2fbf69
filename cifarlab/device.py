"""Where and in what precision to run: device choice, CPU threads, and the autocast context."""
from __future__ import annotations

import contextlib
import ctypes
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
    CPU is emulated and ran about 10x *slower* than fp32 in our measurements, so it is not even tried;
    with them `tuning` times both and keeps the faster."""
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


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of returning them to the kernel.

    By default a block above a threshold (128 KiB at first, rising as large blocks are freed) is mapped
    for each allocation and unmapped when freed, and the heap's top is trimmed: a training step, which
    frees and allocates its activations every time, faults them back in page by page. fast75 on
    2 cores took 800,000 page faults; with blocks up to 32 MiB (glibc's most) kept in the heap, which
    is never trimmed and grows 256 MiB at a time, 220,000, and about 1 s less (faults are dear on a
    virtual machine; with the threshold held at 128 KiB it took 7 million and 13 s more). PyTorch's
    CPU tuning guide gets the same from jemalloc or tcmalloc; this needs nothing installed. False where
    the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20)))


GPU_MEMORY_ENV = "CIFARLAB_GPU_MEMORY_FRACTION"


def gpu_memory_fraction(flag: float | None) -> float | None:
    """The cap on this process's share of GPU memory: the flag, else $CIFARLAB_GPU_MEMORY_FRACTION, else
    None (no cap). A class sharing one GPU sets the variable once (the notebook used 0.22 per student)."""
    if flag is not None:
        where, value = f"--gpu-memory-fraction {flag}", flag
    else:
        value = os.environ.get(GPU_MEMORY_ENV, "").strip()
        if not value:
            return None
        where = f"{GPU_MEMORY_ENV}={value}"
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")  # falls through to the range check's message
    if not 0 < fraction <= 1:  # also refuses nan and inf
        raise CifarlabError(f"{where}: must be a fraction of the GPU's memory in (0, 1], e.g. 0.22")
    return fraction


def limit_gpu_memory(fraction: float | None, device: torch.device) -> str | None:
    """Cap this process's CUDA caching allocator at `fraction` of the device's memory; a note when that
    cannot apply. Call it before the first allocation on the device: memory already cached above the
    cap is not given back, so a late cap would not keep a shared GPU's other users safe."""
    if fraction is None:
        return None
    if device.type != "cuda":
        where = "the CPU" if device.type == "cpu" else device.type
        return f"note: --gpu-memory-fraction {fraction:g} has no effect on {where}"
    # device.index None means the current device (torch refuses a bare "cuda" device here)
    torch.cuda.set_per_process_memory_fraction(float(fraction), device.index)
    return None


def open_device(name: str = "auto", memory_fraction: float | None = None) -> torch.device:
    """The device one process runs on, made ready: every core on a CPU, or the GPU memory cap applied
    before the first allocation (with a note when the cap cannot apply)."""
    device = pick_device(name)
    if device.type == "cpu":
        set_cpu_threads()
    note = limit_gpu_memory(gpu_memory_fraction(memory_fraction), device)
    if note:
        print(note)
    return device
