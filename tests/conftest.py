"""Shared fixtures: small data sources written into tmp dirs, and a cache that never touches ~/.cache.

The writers are handed to tests as fixtures that return plain functions, so a test can build as many
sources as it needs (several layouts, archives of them, sources that differ by one file).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache folder, the default download URL, no shared data folder and
    no GPU memory cap (a classroom machine may set these for everyone)."""
    cache = tmp_path / "cifarlab-cache"
    monkeypatch.setenv("CIFARLAB_CACHE", str(cache))
    for name in ("CIFARLAB_DATA_URL", "CIFARLAB_DATA_DIR", "TEACHER_DIR", "CIFARLAB_GPU_MEMORY_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    return cache


# --- official CIFAR format -------------------------------------------------------------------------

@dataclass
class OfficialData:
    """What a writer put into an official-format source, to compare a read against."""

    train_data: np.ndarray  # [N, 3072] uint8, in file order
    train_labels: np.ndarray  # [N] int64
    test_data: np.ndarray | None
    test_labels: np.ndarray | None
    classes: list[str]


def _pickle(obj: object, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _random_batch(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    labels[:num_classes] = np.arange(min(n, num_classes))  # every class present when n allows
    return data, labels


def write_cifar10(folder: Path, *, batches: int = 2, per_batch: int = 12, test: int | None = 10,
                  classes: list[str] | None = None, seed: int = 0) -> OfficialData:
    """The official python-format CIFAR-10 files (data_batch_1..N, test_batch, batches.meta) in `folder`."""
    classes = classes or CIFAR10_CLASSES
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    _pickle({b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": per_batch,
             b"num_vis": 3072}, folder / "batches.meta")
    datas, labels = [], []
    for i in range(1, batches + 1):
        data, label = _random_batch(rng, per_batch, len(classes))
        _pickle({b"batch_label": f"training batch {i} of {batches}".encode(), b"labels": label.tolist(),
                 b"data": data, b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]},
                folder / f"data_batch_{i}")
        datas.append(data)
        labels.append(label)
    test_data = test_labels = None
    if test is not None:
        test_data, test_labels = _random_batch(rng, test, len(classes))
        _pickle({b"batch_label": b"testing batch 1 of 1", b"labels": test_labels.tolist(), b"data": test_data},
                folder / "test_batch")
    return OfficialData(np.concatenate(datas), np.concatenate(labels), test_data, test_labels, classes)


def write_cifar100(folder: Path, *, train: int = 30, test: int | None = 12, num_classes: int = 7,
                   seed: int = 0) -> OfficialData:
    """The official python-format CIFAR-100 files (train, test, meta) in `folder`, with fine labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    classes = [f"fine{i:02d}" for i in range(num_classes)]
    _pickle({b"fine_label_names": [c.encode() for c in classes], b"coarse_label_names": [b"coarse0"]},
            folder / "meta")
    train_data, train_labels = _random_batch(rng, train, num_classes)
    _pickle({b"data": train_data, b"fine_labels": train_labels.tolist(), b"coarse_labels": [0] * train},
            folder / "train")
    test_data = test_labels = None
    if test is not None:
        test_data, test_labels = _random_batch(rng, test, num_classes)
        _pickle({b"data": test_data, b"fine_labels": test_labels.tolist(), b"coarse_labels": [0] * test},
                folder / "test")
    return OfficialData(train_data, train_labels, test_data, test_labels, classes)


# --- archives --------------------------------------------------------------------------------------

def write_archive(src: Path, archive: Path, prefix: str = "", reverse: bool = False) -> Path:
    """Pack the files and folders under `src` into a .tar, .tar.gz/.tgz or .zip named `archive`.

    Member names are `prefix` + the path relative to src (prefix like 'cifar-10-batches-py/' or
    'wrapper/'); `reverse` writes the members in reverse sorted order, so a reader cannot rely on it.
    """
    entries = sorted(src.rglob("*"), reverse=reverse)
    name = archive.name
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for path in entries:
                arcname = prefix + path.relative_to(src).as_posix()
                if path.is_dir():
                    z.writestr(arcname + "/", b"")
                else:
                    z.write(path, arcname)
    else:
        mode = "w:gz" if name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(archive, mode) as t:
            for path in entries:
                t.add(path, arcname=prefix + path.relative_to(src).as_posix(), recursive=False)
    return archive


# --- image folders ---------------------------------------------------------------------------------

def image_array(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A random HxWx3 uint8 image (size is width, height as PIL names it)."""
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def write_image_folders(root: Path, counts: dict[str, int], fmt: str = "png",
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Write `counts[folder]` random 32x32 RGB images into each folder (relative to root).

    E.g. {"train/cat": 3, "train/dog": 3, "test/cat": 2, "test/dog": 2}. Returns relative path -> the
    HxWx3 array written (for PNG exactly what a reader should get back).
    """
    written: dict[str, np.ndarray] = {}
    n = seed * 100_000
    for folder, count in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rel = f"{folder}/img{i:03d}.{fmt}"
            array = image_array(n)
            n += 1
            Image.fromarray(array).save(root / rel, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper())
            written[rel] = array
    return written


def expected_split(written: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images [N,3,32,32], labels, classes) a reader should return for the folders under `prefix`.

    Labels follow sorted class names and images sorted file names within a class.
    """
    items = sorted((p[len(prefix):], a) for p, a in written.items() if p.startswith(prefix))
    classes = sorted({p.split("/")[0] for p, _ in items})
    images = np.stack([a.transpose(2, 0, 1) for _, a in items])
    labels = np.array([classes.index(p.split("/")[0]) for p, _ in items], dtype=np.int64)
    return images, labels, classes


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def cifar10_writer() -> Callable[..., OfficialData]:
    return write_cifar10


@pytest.fixture
def cifar100_writer() -> Callable[..., OfficialData]:
    return write_cifar100


@pytest.fixture
def archive_writer() -> Callable[..., Path]:
    return write_archive


@pytest.fixture
def image_folder_writer() -> Callable[..., dict[str, np.ndarray]]:
    return write_image_folders


@pytest.fixture
def cifar10_tar_gz(tmp_path: Path) -> tuple[Path, OfficialData]:
    """An archive laid out like the official cifar-10-python.tar.gz (cifar-10-batches-py/ inside)."""
    data = write_cifar10(tmp_path / "cifar10-src")
    archive = write_archive(tmp_path / "cifar10-src", tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py/")
    return archive, data


# --- the shared real images ------------------------------------------------------------------------

SHARED_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
SHARED_PER_CLASS = 200  # 2,000 real images: enough for the predict and notebook tests, read in ~3 s


def missing(message: str) -> None:
    """Something a test needs is not on this machine: in CI (CI set, and not "false" or "0") the test
    fails, elsewhere it skips (pytest -rs lists every skip with this message)."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{message} (CI is set: a failure, not a skip)")
    pytest.skip(message)


def require_shared_archive() -> Path:
    """The shared archive; in CI its absence fails the test, elsewhere it skips."""
    if not SHARED_ARCHIVE.exists():
        missing(f"{SHARED_ARCHIVE}: the shared real images are missing")
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def shared_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 200 real JPEGs of each class from the shared archive, as `<class>/NNNN.jpg` under a folder.

    Extracted once per session (one sequential pass over the archive), never into the repository.
    """
    archive = require_shared_archive()
    root = tmp_path_factory.mktemp("shared-images")
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and int(parts[2].split(".")[0]) < SHARED_PER_CLASS:
                (root / parts[1]).mkdir(exist_ok=True)
                (root / parts[1] / parts[2]).write_bytes(tar.extractfile(member).read())
    return root


@pytest.fixture
def shared_archive(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The whole shared archive, with a cache kept for the session: decoded once (~20 s), then reused."""
    archive = require_shared_archive()
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path_factory.getbasetemp() / "shared-archive-cache"))
    return archive
