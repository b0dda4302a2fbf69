"""Training across processes with torch.distributed, set up from the environment torchrun provides.

As nanoGPT does it: `torchrun --nproc_per_node=N -m cifarlab train ...` starts N copies of the same
command with RANK, WORLD_SIZE and LOCAL_RANK set; `setup()` joins them into one process group (nccl
on CUDA, gloo on CPU) and picks this rank's device. Without those variables everything here is a
no-op for one process, so the single-process path has no special cases.

A failing rank is ended by torchrun: when one worker exits non-zero, its agent stops the others
(SIGTERM, then SIGKILL) and reports which rank failed first, so peers blocked in a collective do
not hang. The failing rank prints its own error first (`report_failure`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from cifarlab.errors import CifarlabError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this node

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """What torchrun set for this process (rank 0 of 1 when not started by it)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes; returns this rank's info and device.

    On CUDA each rank takes GPU LOCAL_RANK and the backend is nccl; on CPU it is gloo."""
    info = env_info()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise CifarlabError(f"LOCAL_RANK {info.local_rank}: this node has only {torch.cuda.device_count()} "
                                f"GPUs; give torchrun --nproc_per_node at most that")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return info, device


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only: N ranks would otherwise print every line N times."""
    if is_main():
        print(*args, **kwargs)


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each value (one collective for the list); unchanged for one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def broadcast_object(value: T) -> T:
    """Rank 0's value on every rank (rank 0 names the run folder and makes the measured choices; the
    others only learn them). Pickled between our own processes only."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_log_path(info: DistInfo) -> Path | None:
    """CIFARLAB_DEBUG_SHARD_LOG=PREFIX makes each rank append its training images' indices to
    PREFIX.rankN, one line per epoch (for tests that check the shards are disjoint)."""
    prefix = os.environ.get("CIFARLAB_DEBUG_SHARD_LOG")
    return Path(f"{prefix}.rank{info.rank}") if prefix else None


def report_failure(info: DistInfo, error: BaseException) -> None:
    """Say which rank failed before torchrun stops the others (their output would hide it)."""
    if info.enabled:
        print(f"cifarlab: rank {info.rank} of {info.world} failed: {type(error).__name__}: {error}; "
              f"torchrun stops the other ranks", file=sys.stderr, flush=True)
