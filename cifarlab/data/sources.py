"""Read a data source into uint8 tensors: official CIFAR pickles, image folders, and archives of either.

Everything is read into memory and never extracted to disk, so an archive cannot write outside a
folder (no path traversal) and a failed read leaves nothing behind. The official batches are pickles;
they are parsed by an unpickler that admits only the few globals numpy arrays need.
"""
from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import pickle
import tarfile
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cifarlab.errors import CifarlabError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
TEST_FOLDER_NAMES = ("test", "val")

# relative POSIX path -> a function returning the file's bytes
FileTree = dict[str, Callable[[], bytes]]


@dataclass
class ImageSet:
    """A split held as tensors: images uint8 [N, 3, H, W], labels int64 [N], class names by label."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes)


@dataclass
class Splits:
    train: ImageSet
    test: ImageSet | None


# --- safe unpickling of the official batches -------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2; only (de)codes text
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of the CIFAR format")
        return super().find_class(module, name)


def safe_unpickle(data: bytes, where: str) -> dict:
    """Unpickle a CIFAR batch without letting a crafted file run code."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # any malformed pickle: one clean message
        raise CifarlabError(f"{where}: not a valid CIFAR batch ({error})") from None
    if not isinstance(obj, dict):
        raise CifarlabError(f"{where}: not a valid CIFAR batch (expected a dict, got {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_tensors(batch: dict, label_key: str, num_classes: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    data, labels = batch.get("data"), batch.get(label_key)
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
            or data.shape[0] == 0):
        raise CifarlabError(f"{where}: 'data' is not an N x 3072 uint8 array with N > 0")
    try:  # a crafted batch may hold anything here: strings, nested lists, dicts
        labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
    except (ValueError, TypeError, OverflowError):
        labels = None
    if labels is None or labels.shape != (data.shape[0],) or labels.min() < 0 or labels.max() >= num_classes:
        raise CifarlabError(f"{where}: '{label_key}' missing, of the wrong length, or out of range")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _names(meta: dict, key: str, where: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise CifarlabError(f"{where}: no '{key}' list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_official(files: dict[str, bytes | Callable[[], bytes]], where: str) -> Splits:
    """Official python-format batches, keyed by base name (CIFAR-10 or CIFAR-100 fine labels)."""
    read = lambda name: safe_unpickle(files[name](), f"{where}:{name}")  # noqa: E731
    if "batches.meta" in files:  # CIFAR-10
        classes = _names(read("batches.meta"), "label_names", f"{where}:batches.meta")
        train_names = sorted((n for n in files if n.startswith("data_batch_")), key=lambda n: int(n.rsplit("_", 1)[1]))
        label_key, test_name = "labels", "test_batch"
    else:  # CIFAR-100
        classes = _names(read("meta"), "fine_label_names", f"{where}:meta")
        train_names, label_key, test_name = ["train"], "fine_labels", "test"

    def split(names: list[str]) -> ImageSet:
        parts = [_batch_tensors(read(n), label_key, len(classes), f"{where}:{n}") for n in names]
        return ImageSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), classes)

    if not train_names:
        raise CifarlabError(f"{where}: no training batches (data_batch_N) found")
    return Splits(split(train_names), split([test_name]) if test_name in files else None)


def _official_files(tree: FileTree) -> dict[str, Callable[[], bytes]] | None:
    """The official batches in a tree, by base name, or None if the tree is not in the official layout."""
    by_name = {PurePosixPath(p).name: reader for p, reader in tree.items()}
    if "batches.meta" in by_name and "data_batch_1" in by_name:
        return by_name
    if {"meta", "train"} <= by_name.keys() and not any(p.startswith("train/") for p in tree):
        return by_name
    return None


# --- image folders ---------------------------------------------------------------------------------

def decode_image(data: bytes, size: int, where: str) -> tuple[np.ndarray, bool]:
    """One image as HxWx3 uint8 at size x size; the flag says it had to be converted."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            converted = image.mode != "RGB" or image.size != (size, size)
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8), converted
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise CifarlabError(f"{where}: not a readable image ({error})") from None


PARALLEL_DECODE_MIN = 4096  # images below which one process decodes as fast as starting workers
DECODE_CHUNK = 1024  # images a worker decodes per task


def _decode_chunk(items: list[tuple[bytes, str]], size: int) -> list[tuple[np.ndarray, bool]]:
    return [decode_image(data, size, where) for data, where in items]


def decode_images(items: list[tuple[bytes, str]], size: int) -> list[tuple[np.ndarray, bool]]:
    """`decode_image` over (bytes, where) pairs, in order. Decoding a small image is Python-bound (50,000
    CIFAR JPEGs: 8 s in one process), so many images are decoded by forked worker processes, one per
    core (Linux; one process elsewhere): the same arrays, and the same first error in file order."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if len(items) < PARALLEL_DECODE_MIN or cores < 2:
        return _decode_chunk(items, size)
    Image.preinit()  # the format plugins, imported here once: a forked worker then imports nothing
    chunks = [items[i:i + DECODE_CHUNK] for i in range(0, len(items), DECODE_CHUNK)]
    # fork: workers start at once with this process's modules (spawned ones would import torch again,
    # about 2 s each); they run PIL and numpy only, nothing that a fork could leave locked
    with ProcessPoolExecutor(min(cores, len(chunks)), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(itertools.chain.from_iterable(pool.map(_decode_chunk, chunks, itertools.repeat(size))))


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/"))


def _class_files(tree: FileTree, prefix: str, where: str) -> dict[str, list[str]]:
    """class name -> sorted file paths, for the class folders directly under prefix."""
    classes: dict[str, list[str]] = {}
    for path in tree:
        if not path.startswith(prefix):
            continue
        if _is_hidden(path[len(prefix):]):
            continue  # hidden files (.DS_Store and the like) are not data
        parts = path[len(prefix):].split("/")
        if len(parts) != 2:
            raise CifarlabError(f"{where}/{path}: expected <class>/<image> under '{prefix or './'}'")
        classes.setdefault(parts[0], []).append(path)
    return {name: sorted(files) for name, files in sorted(classes.items())}


def _read_folder_split(tree: FileTree, prefix: str, size: int, where: str, notes: list[str]) -> ImageSet:
    classes = _class_files(tree, prefix, where)
    if not classes:
        raise CifarlabError(f"{where}/{prefix}: no class folders with images")
    files = [(label, path) for label, paths in enumerate(classes.values()) for path in paths]
    decoded = decode_images([(tree[path](), f"{where}/{path}") for _, path in files], size)
    images = [array for array, _ in decoded]
    labels = [label for label, _ in files]
    converted = sum(was_converted for _, was_converted in decoded)
    if converted:
        notes.append(f"note: converted {converted} image(s) under {where}/{prefix} to RGB {size}x{size}")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(stacked, torch.tensor(labels, dtype=torch.int64), list(classes))


def _empty_class_dirs(dirs: set[str], tree: FileTree) -> list[str]:
    # hidden files (.DS_Store) do not count: a folder of them alone would vanish as a class otherwise
    return sorted(d for d in dirs if not any(p.startswith(d + "/") and not _is_hidden(p[len(d) + 1:]) for p in tree))


def _read_image_folders(tree: FileTree, dirs: set[str], size: int, where: str, notes: list[str]) -> Splits:
    top = {d.split("/")[0] for d in dirs} | {p.split("/")[0] for p in tree if "/" in p}
    if "train" in top:
        test_name = next((n for n in TEST_FOLDER_NAMES if n in top), None)
        for split in ["train"] + ([test_name] if test_name else []):
            empty = _empty_class_dirs({d for d in dirs if d.count("/") == 1 and d.startswith(split + "/")}, tree)
            if empty:
                raise CifarlabError(f"{where}/{empty[0]}: empty class folder")
        train = _read_folder_split(tree, "train/", size, where, notes)
        test = _read_folder_split(tree, test_name + "/", size, where, notes) if test_name else None
        if test is not None and test.classes != train.classes:
            only_train = sorted(set(train.classes) - set(test.classes))
            only_test = sorted(set(test.classes) - set(train.classes))
            raise CifarlabError(f"{where}: class folders differ between train/ and {test_name}/ "
                                f"(only in train: {only_train}, only in {test_name}: {only_test})")
        return Splits(train, test)
    if not top or any("/" not in p for p in tree if not p.startswith(".")):
        raise CifarlabError(f"{where}: unknown layout: expected the official CIFAR batches, train/ (and test/ "
                            f"or val/) with one folder per class, or one folder per class")
    empty = _empty_class_dirs({d for d in dirs if "/" not in d and not d.startswith(".")}, tree)
    if empty:
        raise CifarlabError(f"{where}/{empty[0]}: empty class folder")
    return Splits(_read_folder_split(tree, "", size, where, notes), None)


# --- trees: a folder, or an archive read into memory -----------------------------------------------

def _strip_single_root(tree: FileTree, dirs: set[str]) -> tuple[FileTree, set[str]]:
    """Archives often wrap everything in one folder (cifar10/train/...): look inside it."""
    while True:
        # hidden entries beside the folder (a .DS_Store next to it) are not data and do not count
        roots = {p.split("/")[0] for p in (*tree, *dirs) if not p.startswith(".")}
        root = next(iter(roots)) if len(roots) == 1 else None
        if root is None or root in ("train", *TEST_FOLDER_NAMES) or root in tree:  # root in tree: a lone file
            return tree, dirs
        cut = len(root) + 1
        tree = {p[cut:]: r for p, r in tree.items() if p.startswith(root + "/")}
        dirs = {d[cut:] for d in dirs if d.startswith(root + "/")}


def _folder_tree(root: Path) -> tuple[FileTree, set[str]]:
    tree: FileTree = {}
    dirs: set[str] = set()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            dirs.add(rel)
        elif path.is_file():
            tree[rel] = path.read_bytes
    return tree, dirs


def _member_name(name: str) -> str:
    """'./train/cat/1.png' -> 'train/cat/1.png'. Drops '.' and empty parts only: a character-wise strip
    would turn './.DS_Store' into 'DS_Store', a file that no longer looks hidden."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _archive_tree(path: Path) -> tuple[FileTree, set[str]]:
    tree: FileTree = {}
    dirs: set[str] = set()
    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    name = _member_name(info.filename)
                    if not name:
                        continue
                    if info.is_dir():
                        dirs.add(name)
                    else:
                        tree[name] = (lambda data: lambda: data)(archive.read(info))
        else:
            with tarfile.open(path, "r:*") as archive:
                for member in archive:  # one sequential pass: a gzip stream cannot seek back cheaply
                    name = _member_name(member.name)
                    if not name:
                        continue  # the '.' member of `tar -C root .`
                    if member.isdir():
                        dirs.add(name)
                    elif member.isfile():
                        data = archive.extractfile(member).read()
                        tree[name] = (lambda data: lambda: data)(data)
    except PermissionError:
        raise  # not corruption: the CLI names the file and the reason
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__  # tarfile's r:* error spans lines
        raise CifarlabError(f"{path}: corrupt or truncated archive ({detail})") from None
    for name in list(tree):  # parent folders of files count as folders even when not listed
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return tree, dirs


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def read_source(path: Path, image_size: int = 32, notes: list[str] | None = None) -> Splits:
    """Read any supported local source into tensors. Conversion notes are appended to `notes`."""
    notes = [] if notes is None else notes
    where = str(path)
    if not path.exists():
        raise CifarlabError(f"{path}: no such file or folder")
    if path.is_dir():
        tree, dirs = _folder_tree(path)
    elif is_archive(path):
        tree, dirs = _archive_tree(path)
    else:
        raise CifarlabError(f"{path}: not a folder or a .tar, .tar.gz, .tgz or .zip archive")
    official = _official_files(tree)
    if official is not None:
        return _read_official(official, where)
    tree, dirs = _strip_single_root(tree, dirs)
    if not tree:
        raise CifarlabError(f"{path}: holds no files")
    return _read_image_folders(tree, dirs, image_size, where, notes)
