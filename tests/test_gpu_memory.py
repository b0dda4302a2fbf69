"""The per-process GPU memory cap (device.py): parsing the flag and the variable, and applying it.

The tests run on the CPU; the CUDA call is checked by replacing torch.cuda.set_per_process_memory_fraction
with a recorder, so what cifarlab asks of torch is checked without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from cifarlab.device import GPU_MEMORY_ENV, gpu_memory_fraction, limit_gpu_memory
from cifarlab.errors import CifarlabError


@pytest.fixture(autouse=True)
def no_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable may be set on a shared teaching machine; every test starts without it."""
    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *args: calls.append(args))
    return calls


def test_no_flag_and_no_variable_means_no_cap() -> None:
    assert gpu_memory_fraction(None) is None


@pytest.mark.parametrize("value", [0.22, 1.0, 1e-3])
def test_valid_flag(value: float) -> None:
    assert gpu_memory_fraction(value) == value


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01, float("nan"), float("inf")])
def test_flag_out_of_range(value: float) -> None:
    with pytest.raises(CifarlabError, match=r"--gpu-memory-fraction .*\(0, 1\]") as info:
        gpu_memory_fraction(value)
    assert "\n" not in str(info.value)


def test_variable_is_used_when_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GPU_MEMORY_ENV, " 0.22 ")
    assert gpu_memory_fraction(None) == pytest.approx(0.22)
    assert gpu_memory_fraction(0.5) == 0.5  # the flag wins over the variable
    monkeypatch.setenv(GPU_MEMORY_ENV, "")
    assert gpu_memory_fraction(None) is None  # set but empty: as if unset


@pytest.mark.parametrize("text", ["lots", "22%", "1.5", "0", "nan"])
def test_bad_variable_names_it_and_the_range(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(GPU_MEMORY_ENV, text)
    with pytest.raises(CifarlabError) as info:
        gpu_memory_fraction(None)
    message = str(info.value)
    assert f"{GPU_MEMORY_ENV}={text}" in message and "(0, 1]" in message and "\n" not in message


def test_cpu_gets_a_note_and_no_cap(recorded: list[tuple]) -> None:
    assert limit_gpu_memory(0.22, torch.device("cpu")) == "note: --gpu-memory-fraction 0.22 has no effect on the CPU"
    assert limit_gpu_memory(None, torch.device("cpu")) is None
    assert recorded == []


def test_cuda_device_is_capped(recorded: list[tuple]) -> None:
    """torch.device("cuda") without an index is passed as None (the current device): torch refuses a bare
    "cuda" device there. A torchrun rank's cuda:N is passed as N."""
    assert limit_gpu_memory(0.22, torch.device("cuda")) is None
    assert limit_gpu_memory(0.5, torch.device("cuda", 3)) is None
    assert limit_gpu_memory(None, torch.device("cuda")) is None  # no cap asked: torch is not called
    assert recorded == [(0.22, None), (0.5, 3)]
    assert all(isinstance(fraction, float) for fraction, _ in recorded)  # torch refuses anything else


def test_out_of_memory_under_a_cap_names_the_cap_and_a_smaller_batch() -> None:
    import dataclasses

    from cifarlab.config import recipe
    from cifarlab.trainer import out_of_memory

    capped = dataclasses.replace(recipe("seed"), gpu_memory_fraction=0.22)
    message = str(out_of_memory(torch.device("cuda", 0), capped))
    assert "try --batch-size 64" in message and "may use 0.22 of the GPU's memory (--gpu-memory-fraction)" in message
    assert "gpu-memory-fraction" not in str(out_of_memory(torch.device("cuda", 0), recipe("seed")))
