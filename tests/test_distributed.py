"""Training across processes: the loader's shards, the functions of distributed.py (in one process and in a
2-process gloo group), and `torchrun --nproc_per_node=2` on CPU (gloo).

The torchrun tests start real processes (`python -m torch.distributed.run`, so no PATH lookup) on a
tiny learnable problem: each class is a colour, so a few epochs reach the same accuracy on 1 and 2
processes (the same global batch sees the same images per step; the notebook CNN has no BatchNorm,
so the averaged gradients equal the 1-process ones up to rounding).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import distributed
from cifarlab.cli import main
from cifarlab.config import RECIPES
from cifarlab.data import Augment, TensorLoader
from cifarlab.data.sources import ImageSet

RUN_FILES = ["config.json", "eval", "metrics.csv", "model.pt", "summary.json"]
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture
def colour_root(tmp_path: Path) -> Path:
    """Three classes, 24 noisy images each, told apart by their colour."""
    rng = np.random.default_rng(0)
    root = tmp_path / "colours"
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(24):
            array = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(array).save(root / name / f"{i:02d}.png")
    return root


def test_rank_shards_are_disjoint_and_together_are_the_one_process_batch() -> None:
    n = 40
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(n), [str(i) for i in range(n)])
    mean, std = [0.5] * 3, [0.25] * 3
    loader = lambda rank, world: TensorLoader(data, 8, torch.device("cpu"), (mean, std), shuffle=True,  # noqa: E731
                                              augment=Augment(translate=2), seed=5, shard=(rank, world))
    single, rank0, rank1 = (list(loader(r, w)) for r, w in ((0, 1), (0, 2), (1, 2)))
    assert len(single) == len(rank0) == len(rank1) == 5
    for (x, y), (x0, y0), (x1, y1) in zip(single, rank0, rank1):
        assert len(y0) == len(y1) == 4 and not set(y0.tolist()) & set(y1.tolist())
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)  # the same augmentation draws too


# --- distributed.py directly: one process, and a 2-process gloo group on 127.0.0.1 --------------------

DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def test_without_torchrun_every_function_is_a_no_op_for_one_process(monkeypatch, capsys) -> None:
    for name in (*DIST_VARIABLES, "CIFARLAB_DEBUG_SHARD_LOG"):
        monkeypatch.delenv(name, raising=False)
    info, device = distributed.setup(torch.device("cpu"))
    assert (info, device) == (distributed.DistInfo(0, 1, 0, 1), torch.device("cpu"))
    assert not info.enabled and info.is_main and not torch.distributed.is_initialized()
    assert distributed.all_reduce_mean([1.5, -2.0], device) == [1.5, -2.0]
    value = {"run": "folder"}
    assert distributed.broadcast_object(value) is value
    distributed.barrier()
    distributed.teardown()
    distributed.print0("printed once")
    distributed.report_failure(info, RuntimeError("boom"))  # one process: its own error is enough
    assert capsys.readouterr() == ("printed once\n", "")
    assert distributed.is_main() and distributed.shard_log_path(info) is None


def test_what_torchrun_sets_is_read_and_a_failing_rank_names_itself(monkeypatch, capsys, tmp_path: Path) -> None:
    for name, value in zip(DIST_VARIABLES, ("3", "4", "1", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CIFARLAB_DEBUG_SHARD_LOG", str(tmp_path / "shards"))
    info = distributed.env_info()
    assert info == distributed.DistInfo(rank=3, world=4, local_rank=1, local_world=2)
    assert info.enabled and not info.is_main
    assert distributed.shard_log_path(info) == tmp_path / "shards.rank3"
    distributed.report_failure(info, ValueError("bad batch"))
    assert capsys.readouterr().err == ("cifarlab: rank 3 of 4 failed: ValueError: bad batch; "
                                       "torchrun stops the other ranks\n")


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a group started by torch.multiprocessing: distributed.py as the trainer calls it."""
    import contextlib
    import io

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    info, device = distributed.setup(torch.device("cpu"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        distributed.print0(f"from rank {rank}")
    result = {"info": [info.rank, info.world, info.local_rank, info.local_world], "device": str(device),
              "backend": torch.distributed.get_backend(), "is_main": distributed.is_main(),
              "mean": distributed.all_reduce_mean([float(rank), 10.0 * rank + 1], device),
              "object": distributed.broadcast_object({"chosen by": rank}), "printed": printed.getvalue()}
    distributed.barrier()
    distributed.teardown()
    result["initialized after teardown"] = torch.distributed.is_initialized()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_distributed_functions_in_a_two_process_gloo_group(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # rank 0's store listens here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_gloo_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 240  # starting two Pythons with torch takes seconds; a hang takes for ever
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the 2-process group hung"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["info"] == [rank, 2, rank, 2] and result["device"] == "cpu" and result["backend"] == "gloo"
        assert result["is_main"] == (rank == 0)
        assert result["mean"] == [0.5, 6.0]  # (0 + 1) / 2 and (1 + 11) / 2
        assert result["object"] == {"chosen by": 0}  # rank 0's value on every rank
        assert result["printed"] == ("from rank 0\n" if rank == 0 else "")
        assert result["initialized after teardown"] is False


def torchrun(*args: str, cwd: Path, env: dict | None = None, script: list[str] | None = None,
             timeout: int = 480) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *(script or ["-m", "cifarlab"]), *args]
    # its own session, so a hung run is killed whole (torchrun's workers too), never left behind
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               start_new_session=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


TINY = ["--model", "cifar10_cnn", "--epochs", "4", "--batch-size", "16", "--val-split", "18", "--seed", "1",
        "--device", "cpu", "--lr", "0.003"]


def test_two_processes_write_one_complete_run_folder_and_match_one_process(colour_root: Path, tmp_path: Path,
                                                                          capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shard_log = tmp_path / "shards"
    result = torchrun("train", "--data", str(colour_root), *TINY, cwd=work,
                      env={"CIFARLAB_DEBUG_SHARD_LOG": str(shard_log)})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1  # rank 0 named the folder, the other rank used it
    run = runs[0]
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES
    assert result.stdout.count("epoch 4/4") == 1  # printed once, by rank 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["train_images"] == 54

    epochs0 = [list(map(int, line.split())) for line in Path(f"{shard_log}.rank0").read_text().splitlines()]
    epochs1 = [list(map(int, line.split())) for line in Path(f"{shard_log}.rank1").read_text().splitlines()]
    assert len(epochs0) == len(epochs1) == 4
    for seen0, seen1 in zip(epochs0, epochs1):
        assert len(seen0) == len(seen1) == 24  # 3 steps of 8 per rank (54 images, global batch 16, drop_last)
        assert not set(seen0) & set(seen1)

    one = tmp_path / "one"
    assert main(["train", "--data", str(colour_root), *TINY, "--out", str(one)]) == 0
    capsys.readouterr()
    single = json.loads((one / "summary.json").read_text())
    assert single["accuracy"] > 0.9  # learnable: the comparison below means something
    assert abs(summary["accuracy"] - single["accuracy"]) <= 1 / 18 + 1e-9  # within one of the 18 images

    assert main(["eval", str(run), "--json"]) == 0  # the saved model is the unwrapped one: it loads as usual
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["accuracy"])


FAILING = """
import os, sys, time
from pathlib import Path
from cifarlab import cli, trainer
if os.environ["RANK"] == "1":
    def fail(*args, **kwargs):
        Path(sys.argv[1]).write_text(repr(time.time()))
        raise RuntimeError("injected failure on rank 1")
    trainer.train_step = fail
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_failure_on_one_rank_ends_every_rank_with_a_clear_message(colour_root: Path, tmp_path: Path) -> None:
    script, failed_at = tmp_path / "failing.py", tmp_path / "failed_at"
    script.write_text(FAILING)
    result = torchrun("train", "--data", str(colour_root), *TINY, "--out", str(tmp_path / "run"), cwd=tmp_path,
                      script=[str(script), str(failed_at)])
    assert result.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure on rank 1" in result.stderr
    # timed from the failure, not from the start (two Pythons importing torch on a busy machine): torchrun
    # stopped rank 0, which waited on rank 1 in a collective whose own time-out is 30 minutes
    assert time.time() - float(failed_at.read_text()) < 90
    assert not (tmp_path / "run" / "model.pt").exists()


DIES_AFTER_A_CHECKPOINT = """
import os, sys
from cifarlab import cli
from cifarlab.resume import Checkpointer
if os.environ["RANK"] == "0":
    save = Checkpointer._save
    def save_then_die(self, epoch, sums):
        save(self, epoch, sums)
        if sums is not None:  # the first mid-epoch checkpoint: epoch 2, batch 1 (step 4)
            os._exit(9)  # as if the node were lost right after writing it
    Checkpointer._save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_torchrun_run_killed_mid_epoch_resumes_under_torchrun_to_the_same_weights(colour_root: Path,
                                                                                   tmp_path: Path) -> None:
    # 3 steps an epoch: step 4 is mid-epoch; a low rate keeps the loss (and so the gradients) far from 0
    args = ["--data", str(colour_root), *TINY, "--checkpoint-every", "4", "--lr", "0.0003"]
    assert torchrun("train", *args, "--out", str(tmp_path / "full"), cwd=tmp_path).returncode == 0
    script = tmp_path / "dies.py"
    script.write_text(DIES_AFTER_A_CHECKPOINT)
    killed = torchrun("train", *args, "--out", str(tmp_path / "cut"), cwd=tmp_path, script=[str(script)])
    assert killed.returncode != 0 and not (tmp_path / "cut" / "model.pt").exists()

    resumed = torchrun("train", "--resume", str(tmp_path / "cut"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming") == 1 and "at epoch 2, batch 1/3" in resumed.stdout
    full, cut = (torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("full", "cut"))
    assert full.keys() == cut.keys()
    for name in full:  # the ranks restored the same state and redrew the same batches: the same steps
        assert torch.equal(full[name], cut[name]), name
    rows = [(tmp_path / run / "metrics.csv").read_text().splitlines() for run in ("full", "cut")]
    assert len(rows[0]) == len(rows[1]) == 5  # a header and 4 epochs, written once
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == RUN_FILES



RECORDS_THE_BIAS = """
import os, sys
import torch
from cifarlab import cli, trainer
freeze = trainer.freeze_whiten_bias
def freeze_and_record(run, config, runtime, epoch):
    freeze(run, config, runtime, epoch)
    bias = run.model.whiten.bias
    torch.save((bias.detach().clone(), bias.requires_grad), f"{os.environ['BIAS_LOG']}.{os.environ['RANK']}.{epoch}")
trainer.freeze_whiten_bias = freeze_and_record
sys.exit(cli.main(sys.argv[1:]))
"""
SPEED_RECIPES = sorted(name for name in RECIPES if name.startswith("fast"))  # every one, new ones too


@pytest.mark.parametrize("name", SPEED_RECIPES)
def test_every_speed_recipe_trains_under_torchrun_and_freezes_the_whitening_bias(name: str, colour_root: Path,
                                                                               tmp_path: Path) -> None:
    # 54 training images at a global batch of 18: 3 steps an epoch, 2 epochs; the bias trains in the
    # first and is frozen from the second's start, where each rank builds its DDP wrapper again without it
    script, out, log = tmp_path / "records.py", tmp_path / "run", tmp_path / "bias"
    script.write_text(RECORDS_THE_BIAS)
    result = torchrun("train", "--recipe", name, "--data", str(colour_root), "--val-split", "18",
                      "--batch-size", "18", "--epochs", "2", "--whiten-bias-epochs", "1", "--device", "cpu",
                      "--precision", "fp32", "--no-channels-last", "--out", str(out), cwd=tmp_path,
                      script=[str(script)], env={"BIAS_LOG": str(log)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["recipe"] == name
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # a header and both epochs
    (start0, trains0), (start1, trains1), (frozen0, trains2), (frozen1, trains3) = (
        torch.load(f"{log}.{rank}.{epoch}") for epoch in (1, 2) for rank in (0, 1))
    assert trains0 and trains1 and not trains2 and not trains3
    assert not start0.any() and torch.equal(frozen0, frozen1) and frozen0.abs().sum() > 0  # trained alike
    final = torch.load(out / "model.pt", weights_only=True)["state_dict"]["whiten.bias"]
    if not json.loads((out / "config.json").read_text())["lookahead"]:
        assert torch.equal(final, frozen0)  # not one step moved it after the freeze
