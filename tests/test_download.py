"""Fetching the official archives (download.py) from a local HTTP server: never the internet."""
from __future__ import annotations

import functools
import json
import http.server
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from cifarlab.data import download
from cifarlab.data.download import archive_url, cache_root, fetch_official, md5_of
from cifarlab.data.splits import load_data
from cifarlab.errors import CifarlabError


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving one folder, counting the requests it answers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        # a short poll interval: shutdown() waits for one poll, 0.5 s by default
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    running = _Server(folder)
    yield running
    running.close()


@pytest.fixture
def served_cifar10(server, cifar10_tar_gz, monkeypatch):
    """The test's CIFAR-10 archive served as cifar-10-python.tar.gz, its MD5 the expected one."""
    archive, data = cifar10_tar_gz
    shutil.copy(archive, server.folder / "cifar-10-python.tar.gz")
    monkeypatch.setenv("CIFARLAB_DATA_URL", server.url)
    monkeypatch.setitem(download.OFFICIAL_ARCHIVES, "cifar10", ("cifar-10-python.tar.gz", md5_of(archive)))
    return server, data


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on, held bound (not listening) for the test, so no other process can take
    it meanwhile: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        yield s.getsockname()[1]


def test_cache_root_follows_the_environment(tmp_path, monkeypatch, cache_dir) -> None:
    assert cache_root() == cache_dir
    monkeypatch.delenv("CIFARLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "cifarlab"


def test_archive_url(monkeypatch) -> None:
    assert archive_url("cifar-10-python.tar.gz") == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    monkeypatch.setenv("CIFARLAB_DATA_URL", "http://mirror.example/data")
    assert archive_url("x.tar.gz") == "http://mirror.example/data/x.tar.gz"
    monkeypatch.setenv("CIFARLAB_DATA_URL", "http://mirror.example/data/")
    assert archive_url("x.tar.gz") == "http://mirror.example/data/x.tar.gz"
    monkeypatch.setenv("CIFARLAB_DATA_URL", "http://mirror.example/some/c10.tar.gz")
    assert archive_url("x.tar.gz") == "http://mirror.example/some/c10.tar.gz"


def test_download_verify_cache_and_parse(served_cifar10, cache_dir) -> None:
    server, data = served_cifar10
    bundle = load_data(dataset="cifar10")
    assert server.requests == ["/cifar-10-python.tar.gz"]
    target = cache_dir / "downloads" / "cifar-10-python.tar.gz"
    assert target.exists() and md5_of(target) == download.OFFICIAL_ARCHIVES["cifar10"][1]
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no partial file left beside it
    assert bundle.source == "cifar10" and bundle.classes == data.classes
    assert bundle.eval_split == "test" and bundle.val is None  # the official test split is used
    assert np.array_equal(bundle.train.images.numpy(), data.train_data.reshape(-1, 3, 32, 32))
    assert np.array_equal(bundle.train.labels.numpy(), data.train_labels)
    assert np.array_equal(bundle.test.images.numpy(), data.test_data.reshape(-1, 3, 32, 32))
    assert np.array_equal(bundle.test.labels.numpy(), data.test_labels)
    # a second load neither downloads nor re-verifies over the network
    again = load_data(dataset="cifar10")
    assert len(server.requests) == 1
    assert np.array_equal(again.train.images.numpy(), bundle.train.images.numpy())


def test_default_dataset_is_cifar10(served_cifar10) -> None:
    server, data = served_cifar10
    assert load_data().classes == data.classes
    assert server.requests == ["/cifar-10-python.tar.gz"]


def test_full_archive_url(served_cifar10, monkeypatch) -> None:
    server, _ = served_cifar10
    (server.folder / "mirror").mkdir()
    shutil.copy(server.folder / "cifar-10-python.tar.gz", server.folder / "mirror" / "c10.tgz")
    monkeypatch.setenv("CIFARLAB_DATA_URL", server.url + "mirror/c10.tgz")
    assert fetch_official("cifar10").name == "cifar-10-python.tar.gz"
    assert server.requests == ["/mirror/c10.tgz"]


def test_damaged_cached_archive_is_fetched_again(served_cifar10, cache_dir) -> None:
    server, _ = served_cifar10
    target = fetch_official("cifar10")
    target.write_bytes(b"damaged")
    assert fetch_official("cifar10") == target
    assert len(server.requests) == 2
    assert md5_of(target) == download.OFFICIAL_ARCHIVES["cifar10"][1]


def test_checksum_mismatch(server, cifar10_tar_gz, monkeypatch, cache_dir) -> None:
    """The real MD5 table: the test's archive is not the official one, and must be refused."""
    archive, _ = cifar10_tar_gz
    shutil.copy(archive, server.folder / "cifar-10-python.tar.gz")
    monkeypatch.setenv("CIFARLAB_DATA_URL", server.url)
    with pytest.raises(CifarlabError, match="checksum") as info:
        load_data(dataset="cifar10")
    message = str(info.value)
    assert download.OFFICIAL_ARCHIVES["cifar10"][1] in message and md5_of(archive) in message
    assert server.url in message
    downloads = cache_dir / "downloads"
    assert list(downloads.iterdir()) == []  # neither the target nor a partial file
    assert server.requests == ["/cifar-10-python.tar.gz"]


def test_missing_file_on_the_server(server, monkeypatch, cache_dir) -> None:
    monkeypatch.setenv("CIFARLAB_DATA_URL", server.url)
    with pytest.raises(CifarlabError, match="--data") as info:
        fetch_official("cifar100")
    assert "cifar-100-python.tar.gz" in str(info.value)
    assert list((cache_dir / "downloads").iterdir()) == []


def test_unreachable_url_fails_quickly(monkeypatch, cache_dir, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/"
    monkeypatch.setenv("CIFARLAB_DATA_URL", url)
    start = time.monotonic()
    with pytest.raises(CifarlabError) as info:
        load_data(dataset="cifar10")
    # refused at once: well under the time-out (30 s), which a busy machine does not come near
    assert time.monotonic() - start < download.TIMEOUT_S / 2
    message = str(info.value)
    assert "--data" in message and url in message and "\n" not in message
    downloads = cache_dir / "downloads"
    assert not downloads.exists() or list(downloads.iterdir()) == []


def test_a_server_that_never_answers_times_out(monkeypatch, cache_dir, silent_port: int) -> None:
    """Connected, then no reply: the download gives up after its time-out (1 s here), not never."""
    url = f"http://127.0.0.1:{silent_port}/"
    monkeypatch.setenv("CIFARLAB_DATA_URL", url)
    monkeypatch.setattr(download, "TIMEOUT_S", 1.0)
    errors: list[CifarlabError] = []

    def fetch() -> None:
        try:
            fetch_official("cifar10")
        except CifarlabError as error:
            errors.append(error)

    start = time.monotonic()
    thread = threading.Thread(target=fetch, daemon=True)  # a hang fails this test instead of stopping the suite
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the download still waits, long past its time-out"
    assert time.monotonic() - start >= 1.0
    (error,) = errors
    assert "timed out" in str(error) and url in str(error) and "\n" not in str(error)
    assert list((cache_dir / "downloads").iterdir()) == []


def test_unknown_dataset_name() -> None:
    with pytest.raises(CifarlabError, match="cifar10"):
        fetch_official("mnist")


def test_cifar100_download(server, cifar100_writer, archive_writer, tmp_path, monkeypatch) -> None:
    data = cifar100_writer(tmp_path / "c100")
    archive = archive_writer(tmp_path / "c100", server.folder / "cifar-100-python.tar.gz", "cifar-100-python/")
    monkeypatch.setenv("CIFARLAB_DATA_URL", server.url)
    monkeypatch.setitem(download.OFFICIAL_ARCHIVES, "cifar100", ("cifar-100-python.tar.gz", md5_of(archive)))
    bundle = load_data(dataset="cifar100")
    assert bundle.source == "cifar100" and bundle.classes == data.classes
    assert np.array_equal(bundle.train.labels.numpy(), data.train_labels)
    assert server.requests == ["/cifar-100-python.tar.gz"]


def _make_train_command(repo: Path) -> list[str]:
    """The arguments `make train` would give `cifarlab` in `repo` (make -n prints without running)."""
    shutil.copy(Path(__file__).resolve().parents[1] / "Makefile", repo / "Makefile")
    (repo / "pyproject.toml").touch()
    printed = subprocess.run(["make", "-n", "train", "PYTHON=python3"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout
    line = next(line for line in printed.splitlines() if "-m cifarlab train" in line)
    return line.split("-m cifarlab ", 1)[1].split()


def test_make_train_takes_the_shared_images_where_they_exist_and_the_download_elsewhere(
        served_cifar10, tmp_path, cache_dir, capsys) -> None:
    from cifarlab.cli import main

    repo = tmp_path / "checkout"
    repo.mkdir()
    args = _make_train_command(repo)  # no ../shared beside this checkout
    assert args[:3] == ["train", "--dataset", "cifar10"] and "--data" not in args
    assert main([*args, "--epochs", "1", "--val-split", "10", "--out", str(tmp_path / "run")]) == 0
    server, _ = served_cifar10
    assert server.requests == ["/cifar-10-python.tar.gz"]  # the official archive, from the (local) server
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["recipe"] == "seed"
    capsys.readouterr()

    shared = tmp_path / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"")
    assert _make_train_command(repo)[:3] == ["train", "--data", "../shared/data/cifar10-jpeg-train.tar.gz"]
