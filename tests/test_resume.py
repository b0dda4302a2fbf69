"""Nothing lost: exact resume after kill -9, Ctrl-C and SIGTERM; checkpoints that are safe to load;
divergence, a full disk and out-of-memory answered in one line with the last good checkpoint kept."""
from __future__ import annotations

import csv
import dataclasses
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from cifarlab.cli import main
from cifarlab.config import TrainConfig
from cifarlab.rundir import CHECKPOINT_FILE, LOCK_FILE, RunLock
from cifarlab.errors import INTERRUPTED_STATUS, CifarlabError
from cifarlab.trainer import run_training


TINY_MODEL = {"channels": [8, 8, 16, 16], "hidden": 32}


@pytest.fixture(autouse=True)
def quick_in_process_runs(monkeypatch) -> Iterator[None]:
    """In-process runs use a small CNN and skip writing eval.json's views. The subprocess tests (the
    kill test among them) run the real recipe."""
    import cifarlab.cli as cli_module
    import cifarlab.device as device_module
    import cifarlab.trainer as trainer_module

    real_recipe = cli_module.recipe
    monkeypatch.setattr(cli_module, "recipe", lambda name: dataclasses.replace(real_recipe(name),
                                                                               model_args=TINY_MODEL))
    monkeypatch.setattr(trainer_module, "write_eval_views", lambda *args, **kwargs: None)
    # one thread: on a busy 2-core machine two OpenMP threads wait on each other and tiny steps run ~10x slower.
    # train sets its threads itself; eval and predict through open_device
    threads = torch.get_num_threads()
    one_thread = lambda *args: torch.set_num_threads(1) or 1  # noqa: E731
    monkeypatch.setattr(trainer_module, "set_cpu_threads", one_thread)
    monkeypatch.setattr(device_module, "set_cpu_threads", one_thread)
    yield
    torch.set_num_threads(threads)


def test_in_process_runs_here_use_one_thread() -> None:
    from cifarlab.device import open_device

    torch.set_num_threads(2)
    assert open_device("cpu").type == "cpu" and torch.get_num_threads() == 1  # eval's device set-up too


@pytest.fixture
def images(tmp_path: Path, image_folder_writer) -> Path:
    """Three classes of 20 images: 48 train / 12 val, 6 steps per epoch at batch size 8."""
    root = tmp_path / "images"
    image_folder_writer(root, {name: 20 for name in ("cat", "dog", "frog")})
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--epochs", "2", "--batch-size", "8", "--val-split", "12", "--seed", "3",
            "--out", str(out), *extra]


def one_cpu() -> None:
    """Runs in the child before exec: one CPU, so torch uses one thread and sums in one order."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=one_cpu,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, **popen)


def finish(process: subprocess.Popen, timeout: float = 480) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Minutes, not seconds: a busy machine may run a step 10x slower; a hung run still fails here."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared: {process.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Press Ctrl-C (SIGINT to this process) during training step `step`, counted from 1."""
    calls = []
    real = F.cross_entropy

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupting)


def metrics_without_time(run: Path) -> list[dict]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_run(a: Path, b: Path) -> None:
    first, second = (torch.load(run / "model.pt", weights_only=True)["state_dict"] for run in (a, b))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert metrics_without_time(a) == metrics_without_time(b)
    layers = [(run / "layers.csv").read_text() if (run / "layers.csv").exists() else None for run in (a, b)]
    assert layers[0] == layers[1]  # --layer-stats: the same rows, none twice, none lost
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


# --- exact resume ----------------------------------------------------------------------------------

def test_kill_9_at_a_random_moment_then_resume_is_exact(tmp_path: Path, image_folder_writer) -> None:
    """An uninterrupted run and a run killed -9 mid-run and resumed end identical."""
    root = tmp_path / "images"
    image_folder_writer(root, {name: 40 for name in ("a", "b", "c")})  # 96 train / 24 val: 12 steps per epoch
    args = ["--data", str(root), "--epochs", "3", "--batch-size", "8", "--val-split", "24", "--seed", "5",
            "--checkpoint-every", "5", "--layer-stats", "3"]
    full = cli("train", *args, "--out", str(tmp_path / "full"))
    wait_for(tmp_path / "full" / CHECKPOINT_FILE, full)
    first_checkpoint = time.monotonic()
    wait_for(tmp_path / "full" / "model.pt", full)
    window = time.monotonic() - first_checkpoint  # how long it trains after its first checkpoint
    assert finish(full)[0] == 0

    killed = cli("train", *args, "--out", str(tmp_path / "killed"))
    wait_for(tmp_path / "killed" / CHECKPOINT_FILE, killed)
    # a seeded moment in the first half of that window: the killed run, on a busy machine, may train faster
    # than the full one did, and must still be mid-run when the signal comes
    delay = random.Random(5).uniform(0, window / 2)
    time.sleep(delay)
    assert killed.poll() is None, f"the run finished within {delay:.2f}s; it should have been killed mid-run"
    killed.send_signal(signal.SIGKILL)
    assert finish(killed)[0] == -signal.SIGKILL

    status, out, err = finish(cli("train", "--resume", str(tmp_path / "killed")))
    assert status == 0, f"resume after {delay:.2f}s of {window:.2f}s failed: {err}"
    assert "resuming" in out
    assert_same_run(tmp_path / "full", tmp_path / "killed")


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_ctrl_c_saves_says_how_to_resume_and_resumes_exactly(optimizer: str, images: Path, tmp_path: Path,
                                                            monkeypatch, capsys) -> None:
    """In-process Ctrl-C mid-epoch, with a warm-up + one-cycle schedule that must not restart and a
    weight EMA that must continue its average (model.pt holds the EMA weights); Muon's momentum too."""
    config = dataclasses.replace(TrainConfig(), data=str(images), epochs=2, batch_size=8, val_split=12, seed=3,
                                 schedule="onecycle", warmup_epochs=0.5, lr=3e-3, model_args=TINY_MODEL, ema=0.9,
                                 optimizer=optimizer)
    run_training(config, str(tmp_path / "full"))

    real = F.cross_entropy
    interrupt_at_step(monkeypatch, 4)
    out = tmp_path / "stopped"
    import cifarlab.cli as cli_module
    monkeypatch.setattr(cli_module, "recipe", lambda name: config)
    capsys.readouterr()
    assert main(["train", "--out", str(out)]) == INTERRUPTED_STATUS
    err = capsys.readouterr().err
    assert "stopped by SIGINT at epoch 1, batch 4/6" in err
    assert f"resume with: cifarlab train --resume {out}" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv"]  # no lock

    monkeypatch.setattr(F, "cross_entropy", real)
    assert main(["train", "--resume", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert_same_run(tmp_path / "full", out)


def test_stop_after_the_last_epoch_then_resume_writes_the_same_files(images: Path, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    """Stopped between the last epoch's checkpoint and model.pt: the resume trains nothing, and writes
    model.pt, metrics and the evaluation views from the same predictions."""
    import cifarlab.trainer as trainer_module

    views = []
    monkeypatch.setattr(trainer_module, "write_eval_views",
                        lambda folder, result, *args, **kwargs: views.append(result.predictions.tolist()))
    assert main(train_args(images, tmp_path / "full")) == 0
    real_evaluate = trainer_module.evaluate
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the last epoch's evaluation
            signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", interrupting)
    out = tmp_path / "stopped"
    assert main(train_args(images, out)) == INTERRUPTED_STATUS
    assert "stopped by SIGINT after epoch 2" in capsys.readouterr().err
    monkeypatch.setattr(trainer_module, "evaluate", real_evaluate)
    assert main(["train", "--resume", str(out)]) == 0
    assert_same_run(tmp_path / "full", out)
    assert len(views) == 2 and views[0] == views[1]


def test_sigterm_saves_a_checkpoint_and_exits_with_status_3(images: Path, tmp_path: Path, capsys) -> None:
    """Also: while it runs, the run folder is locked against a second writer (a resume)."""
    out = tmp_path / "run"
    process = cli(*train_args(images, out, "--epochs", "50"))
    wait_for(out / CHECKPOINT_FILE, process)  # the end of epoch 1
    try:
        assert main(["train", "--resume", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out}: another cifarlab process (pid {process.pid}) is writing this run folder" in err
    finally:
        process.send_signal(signal.SIGTERM)
    status, _, err = finish(process)
    assert status == INTERRUPTED_STATUS, err
    assert "stopped by SIGTERM" in err and f"resume with: cifarlab train --resume {out}" in err
    assert "Traceback" not in err
    assert not (out / LOCK_FILE).exists()
    state = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] >= 1 and state["config"]["epochs"] == 50


def test_checkpoint_is_plain_data_and_written_every_n_steps(images: Path, tmp_path: Path, monkeypatch) -> None:
    saved: list[tuple[int, int]] = []
    import cifarlab.resume as resume_module

    real_save = resume_module.save_checkpoint

    def recording(run_dir, state):
        saved.append((state["epoch"], state["batches"]))
        return real_save(run_dir, state)

    monkeypatch.setattr(resume_module, "save_checkpoint", recording)
    out = tmp_path / "run"
    assert main(train_args(images, out, "--checkpoint-every", "4")) == 0
    # steps 4 and 8 (batch 2 of epoch 2), the start of epochs 2 and 3
    assert saved == [(1, 4), (2, 0), (2, 2), (3, 0)]
    assert not (out / CHECKPOINT_FILE).exists()  # a finished run keeps model.pt, not the training state


def test_checkpoint_seconds_skips_epoch_end_saves_until_that_much_time_passed(images: Path, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """With an interval longer than the run no epoch end saves; with 0, every one does."""
    import cifarlab.resume as resume_module

    saved: list[tuple[int, int]] = []
    real_save = resume_module.save_checkpoint
    monkeypatch.setattr(resume_module, "save_checkpoint",
                        lambda run_dir, state: saved.append((state["epoch"], state["batches"])) or real_save(run_dir, state))
    assert main(train_args(images, tmp_path / "quick", "--checkpoint-seconds", "3600")) == 0
    assert saved == []
    assert main(train_args(images, tmp_path / "every", "--checkpoint-seconds", "0")) == 0
    assert saved == [(2, 0), (3, 0)]


# --- the loader's part -----------------------------------------------------------------------------

def test_a_generator_state_from_another_kind_of_device_is_a_clear_error() -> None:
    from cifarlab.data import ImageSet, TensorLoader

    data = ImageSet(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), ["a"])
    loader = TensorLoader(data, 4, torch.device("cpu"), ([0.5] * 3, [0.5] * 3), shuffle=True)
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's get_state() returns
    with pytest.raises(CifarlabError, match="resume it where it was trained"):
        loader.resume_at(cuda_state, 1)


def test_loader_resume_at_reproduces_the_rest_of_the_epoch() -> None:
    from cifarlab.data import Augment, ImageSet, TensorLoader

    data = ImageSet(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 4, list("abcd"))
    loader = TensorLoader(data, 6, torch.device("cpu"), ([0.5] * 3, [0.2] * 3), shuffle=True, augment=Augment(), seed=1)
    list(loader)  # one epoch, so the next starts from a generator state that is not the seed's
    whole = list(loader)
    start = loader.epoch_state
    after = loader.state()
    loader.resume_at(start, 4)
    rest = list(loader)
    assert len(rest) == len(whole) - 4
    for (x, y), (x2, y2) in zip(whole[4:], rest):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(loader.state(), after)  # and the next epoch draws the same as it would have


# --- safe loading ----------------------------------------------------------------------------------

class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("target", ["checkpoint", "model"])
def test_crafted_checkpoint_pickle_is_refused_without_running(images: Path, tmp_path: Path, target: str,
                                                             capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    name = CHECKPOINT_FILE if target == "checkpoint" else "model.pt"
    torch.save({"format": "cifarlab.checkpoint/1", "config": _RunsShell(marker)}, run / name)
    argv = ["train", "--resume", str(run)] if target == "checkpoint" else ["eval", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{run / name}: refused to load" in err and "posix.system" in err and "weights_only" not in err
    assert err.count("\n") == 1
    assert not marker.exists()


@pytest.mark.parametrize("target", ["checkpoint", "model"])
def test_truncated_checkpoint_is_a_clean_error(images: Path, tmp_path: Path, target: str, monkeypatch,
                                               capsys) -> None:
    out = tmp_path / "run"
    if target == "checkpoint":
        interrupt_at_step(monkeypatch, 2)
        assert main(train_args(images, out)) == INTERRUPTED_STATUS
        path, argv = out / CHECKPOINT_FILE, ["train", "--resume", str(out)]
    else:
        assert main(train_args(images, out, "--epochs", "1")) == 0
        path, argv = out / "model.pt", ["eval", str(out)]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}: corrupt or truncated checkpoint" in err and err.count("\n") == 1


# --- bad resumes, the lock -------------------------------------------------------------------------

def test_resume_errors(images: Path, tmp_path: Path, capsys) -> None:
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "model.pt").write_bytes(b"")  # all a finished run is recognised by
    (tmp_path / "empty").mkdir()
    cases = [
        (["train", "--resume", str(tmp_path / "nowhere")], "no such run folder"),
        (["train", "--resume", str(tmp_path / "empty")], "no checkpoint.pt"),
        (["train", "--resume", str(finished)], "the run has finished"),
        (["train", "--resume", str(finished), "--lr", "0.1", "--epochs", "3"], "drop --epochs, --lr"),
        (["train", "--data", str(images), "--checkpoint-every", "-1"], "--checkpoint-every -1: must be 0 or more"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith("cifarlab: error: ") and err.count("\n") == 1, err


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # what kill -9 leaves: the file, without its flock
    with RunLock(out):  # so the next writer takes it over
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(CifarlabError, match=f"pid {os.getpid()}"):
            RunLock(out).__enter__()
    assert not (out / LOCK_FILE).exists()


def test_debug_flag_after_the_subcommand_shows_the_traceback(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path / "x"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "no such file or folder" in err
    assert main(["train", "--data", str(tmp_path / "x")]) == 2
    assert "Traceback" not in capsys.readouterr().err


# --- divergence, a full disk, out of memory -------------------------------------------------------

def test_diverging_run_stops_names_the_step_and_keeps_the_last_good_checkpoint(images: Path, tmp_path: Path,
                                                                             monkeypatch, capsys) -> None:
    calls = []
    real = F.cross_entropy

    def nan_from_step_9(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 9 else loss

    monkeypatch.setattr(F, "cross_entropy", nan_from_step_9)
    out = tmp_path / "run"
    assert main(train_args(images, out, "--checkpoint-every", "2")) == 2
    err = capsys.readouterr().err
    assert "training diverged: the loss became NaN or infinite at epoch 2, batch 3 (step 9)" in err
    assert f"kept the last good checkpoint {out / CHECKPOINT_FILE} (epoch 2, batch 2)" in err
    assert err.count("\n") == 1
    state = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert (state["epoch"], state["batches"]) == (2, 2)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(images: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    real_save = torch.save
    saves = []

    def disk_fills(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "cifarlab.checkpoint/1":
            saves.append(1)
        if len(saves) == 3:
            Path(f).write_bytes(b"PK\x03\x04 partial")  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills)
    out = tmp_path / "run"
    assert main(train_args(images, out, "--checkpoint-every", "2")) == 2
    err = capsys.readouterr().err
    assert f"{out / CHECKPOINT_FILE}: could not save the checkpoint (No space left on device); " \
           f"the previous checkpoint is intact" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv"]  # no temp file
    state = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert (state["epoch"], state["batches"]) == (1, 4)
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(out)]) == 0


def test_out_of_memory_advises_a_smaller_batch(images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(F, "cross_entropy", out_of_memory)
    assert main(train_args(images, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "out of memory on cpu with --batch-size 8" in err and "try --batch-size 4" in err
    assert err.count("\n") == 1


def test_unreadable_file_is_one_line(images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """chmod 000 does not stop root (the CI user here), so the refusal is simulated where files are read."""
    victim = sorted((images / "dog").iterdir())[0]
    real = Path.read_bytes

    def refuse(self):
        if self == victim:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert main(train_args(images, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err == f"cifarlab: error: {victim}: Permission denied\n"
    assert not (tmp_path / "run").exists()


# --- soak ------------------------------------------------------------------------------------------

def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_soak_fifty_train_resume_eval_cycles(tmp_path: Path, image_folder_writer, monkeypatch, capsys,
                                            cache_dir: Path) -> None:
    """50 cycles of train (stopped by Ctrl-C mid-epoch), resume and eval in one process leave no stray
    files, locks or checkpoints, restore the signal handlers, and do not grow memory."""
    root = tmp_path / "images"
    image_folder_writer(root, {name: 6 for name in ("cat", "dog", "frog")})  # 12 train / 6 val: 3 steps
    rss = []
    for cycle in range(50):
        out = tmp_path / "runs" / f"run{cycle}"
        args = ["train", "--data", str(root), "--epochs", "1", "--batch-size", "4", "--val-split", "6",
                "--seed", str(cycle), "--out", str(out)]
        with monkeypatch.context() as patch:
            interrupt_at_step(patch, 2)
            assert main(args) == INTERRUPTED_STATUS
        assert main(["train", "--resume", str(out)]) == 0
        assert main(["eval", str(out), "--json"]) == 0
        capsys.readouterr()
        if cycle in (9, 49):
            rss.append(_rss_mib())
    expected = sorted(p.name for p in (tmp_path / "runs" / "run0").iterdir())
    assert "model.pt" in expected and CHECKPOINT_FILE not in expected and LOCK_FILE not in expected
    for run in (tmp_path / "runs").iterdir():
        assert sorted(p.name for p in run.iterdir()) == expected, run
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name == LOCK_FILE]
    assert len(list((cache_dir / "tensors").iterdir())) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    print(f"RSS after cycle 10: {rss[0]:.0f} MiB, after cycle 50: {rss[1]:.0f} MiB")
    assert rss[1] - rss[0] < 0.1 * rss[0], rss  # relative: the baseline differs between machines and torch builds
