"""Precision and layout on a CPU come from timing the run's own model, once per machine, never from a flag alone;
and the allocator keeps what steps free."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarlab import tuning
from cifarlab.cli import main
from cifarlab.config import TrainConfig

CPU = torch.device("cpu")
TINY = TrainConfig(model="cifar10_cnn", model_args={"channels": [4, 4, 8, 8], "hidden": 16}, batch_size=8)


def test_the_fastest_measured_candidate_wins_and_is_remembered(monkeypatch) -> None:
    speeds = {("fp32", False): 100.0, ("fp32", True): 300.0, ("bf16", False): 200.0, ("bf16", True): 250.0}
    calls = []

    def fake(config, num_classes, precision, channels_last):
        calls.append((precision, channels_last))
        return speeds[(precision, channels_last)]

    monkeypatch.setattr(tuning, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(tuning, "_images_per_second", fake)
    resolved, note = tuning.resolve_auto(TINY, CPU, 3)
    assert (resolved.precision, resolved.channels_last) == ("fp32", True)
    assert sorted(calls) == sorted(speeds) and "fp32/channels_last 300" in note
    calls.clear()
    again, note = tuning.resolve_auto(TINY, CPU, 3)  # the table in the cache folder answers
    assert again == resolved and note is None and not calls
    other, _ = tuning.resolve_auto(dataclasses.replace(TINY, batch_size=16), CPU, 3)  # another key: measured
    assert calls


def test_a_precision_given_on_the_command_line_is_kept_when_the_table_prefers_another(monkeypatch) -> None:
    """The table of an auto run holds every combination; a run that fixes one (--precision fp32) picks
    the best layout among what is left, not the table's overall winner (it once came back bf16)."""
    speeds = {("fp32", False): 100.0, ("fp32", True): 150.0, ("bf16", False): 200.0, ("bf16", True): 250.0}
    monkeypatch.setattr(tuning, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(tuning, "_images_per_second", lambda c, n, p, cl: speeds[(p, cl)])
    assert tuning.resolve_auto(TINY, CPU, 3)[0].precision == "bf16"  # fills the table
    fp32, _ = tuning.resolve_auto(dataclasses.replace(TINY, precision="fp32"), CPU, 3)
    assert (fp32.precision, fp32.channels_last) == ("fp32", True)
    nchw, _ = tuning.resolve_auto(dataclasses.replace(TINY, channels_last=False), CPU, 3)
    assert (nchw.precision, nchw.channels_last) == ("bf16", False)


def test_bf16_is_not_tried_without_native_kernels_and_given_choices_are_kept(monkeypatch) -> None:
    tried = []
    monkeypatch.setattr(tuning, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(tuning, "_images_per_second", lambda c, n, p, cl: tried.append(p) or (2.0 if cl else 1.0))
    resolved, _ = tuning.resolve_auto(TINY, CPU, 3)
    assert set(tried) == {"fp32"} and (resolved.precision, resolved.channels_last) == ("fp32", True)
    tried.clear()
    fixed = dataclasses.replace(TINY, precision="bf16", channels_last=False)
    assert tuning.resolve_auto(fixed, CPU, 3) == (fixed, None) and not tried


def test_a_real_measurement_times_each_candidate_in_its_own_precision_and_layout(monkeypatch) -> None:
    """Each candidate trains the run's model in its own precision and layout, and its speed is the batch
    over the fastest timed step, the first (which builds the kernels) left out. The clock is the test's:
    the three steps take 1, 3 and 2 s, so the speed is batch / 2 s."""
    ticks: list[float] = []
    convs, models = [], []
    real_create = tuning.create_model

    def recording_model(*args, **kwargs):
        model = real_create(*args, **kwargs)
        models.append((model, [p.detach().clone() for p in model.parameters()]))
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda module, inputs, out: convs.append(
            (out.dtype, out.is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(tuning, "create_model", recording_model)
    monkeypatch.setattr(tuning, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: ticks.pop(0))}))
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            ticks[:] = [0, 1, 10, 13, 20, 22]  # the start and end of each step
            convs.clear()
            assert tuning._images_per_second(TINY, 3, precision, channels_last) == TINY.batch_size / 2
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            assert convs == [(dtype, channels_last)] * 3, (precision, channels_last)
            model, before = models.pop()
            assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # optimizer steps taken


def test_the_run_records_what_was_chosen(tmp_path: Path, image_folder_writer, capsys, cache_dir: Path) -> None:
    """The run's config holds the fastest candidate of the table it measured (and printed)."""
    image_folder_writer(tmp_path / "images", {name: 10 for name in ("cat", "dog")})
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "images"), "--model", "cifar10_cnn", "--epochs", "1",
                 "--batch-size", "8", "--val-split", "4", "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    (measured,) = json.loads((cache_dir / tuning.TUNING_FILE).read_text()).values()  # one model, one key
    expected = {f"{p}/{layout}" for p in (["fp32", "bf16"] if tuning.cpu_has_fast_bf16() else ["fp32"])
                for layout in ("nchw", "channels_last")}
    assert set(measured) == expected
    assert "measured training speed (images/s) on this CPU: " + ", ".join(
        f"{name} {speed:.0f}" for name, speed in measured.items()) in printed
    precision, layout = max(measured, key=measured.get).split("/")
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert (config["precision"], config["channels_last"]) == (precision, layout == "channels_last")
    assert summary["channels_last"] == config["channels_last"]
    assert summary["precision"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[config["precision"]]


FREED_BLOCK = """
import ctypes, sys
from cifarlab.device import keep_freed_memory
class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
size = 20 << 20  # an activation's size: above glibc's first mmap threshold (128 KiB), below the kept 32 MiB
block = libc.malloc(size)
ctypes.memset(block, 1, size)
mapped = libc.mallinfo2().hblkhd >= size  # a block of its own, unmapped (returned to the kernel) when freed
libc.free(block)
print(mapped, libc.mallinfo2().fordblks >= size)  # fordblks: free bytes the heap keeps for the next malloc
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_a_freed_activation_sized_block_stays_in_the_heap_once_freed_memory_is_kept() -> None:
    """By default glibc maps a 20 MiB block on its own and unmaps it when freed, so the next step faults
    its pages in again; with keep_freed_memory the block comes from the heap and stays there, free for
    the next step. Read from malloc's own accounting (mallinfo2), which does not depend on the kernel's
    page size or huge-page settings, as page-fault counts do."""
    printed = {mode: subprocess.run([sys.executable, "-c", FREED_BLOCK, mode], capture_output=True, text=True,
                                    check=True, timeout=120).stdout.split() for mode in ("default", "keep")}
    assert printed == {"default": ["True", "False"], "keep": ["False", "True"]}, printed
