"""Reading sources (sources.py), the tensor cache (cache.py) and the splits (splits.py)."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.data import cache as cache_module
from cifarlab.data import sources
from cifarlab.data.cache import load_splits, source_key
from cifarlab.data.sources import read_source, safe_unpickle
from cifarlab.data.splits import DEFAULT_VAL_SPLIT, load_data, stratified_split
from cifarlab.errors import CifarlabError
from conftest import expected_split, image_array, image_bytes, write_cifar10

TRAIN_TEST = {"train/cat": 3, "train/dog": 4, "train/ant": 2, "test/cat": 2, "test/dog": 1, "test/ant": 2}


def _assert_official(splits, data) -> None:
    """Pixels and labels round-trip exactly, rows of 3072 reshaped as [3, 32, 32] (R plane, G, B)."""
    assert splits.train.classes == data.classes
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert splits.train.images.shape == (len(data.train_data), 3, 32, 32)
    assert np.array_equal(splits.train.images.numpy(), data.train_data.reshape(-1, 3, 32, 32))
    # spot check the layout itself: channel c, row y, column x is data[c*1024 + y*32 + x]
    assert int(splits.train.images[1, 2, 5, 7]) == int(data.train_data[1, 2 * 1024 + 5 * 32 + 7])
    assert np.array_equal(splits.train.labels.numpy(), data.train_labels)
    if data.test_data is None:
        assert splits.test is None
    else:
        assert np.array_equal(splits.test.images.numpy(), data.test_data.reshape(-1, 3, 32, 32))
        assert np.array_equal(splits.test.labels.numpy(), data.test_labels)
        assert splits.test.classes == data.classes


def _assert_folder_split(image_set, written, prefix) -> None:
    images, labels, classes = expected_split(written, prefix)
    assert image_set.classes == classes
    assert np.array_equal(image_set.images.numpy(), images)
    assert np.array_equal(image_set.labels.numpy(), labels)


# --- official format -------------------------------------------------------------------------------

def test_cifar10_folder_round_trips(tmp_path, cifar10_writer) -> None:
    data = cifar10_writer(tmp_path / "cifar-10-batches-py", batches=3, per_batch=11, test=9)
    _assert_official(read_source(tmp_path / "cifar-10-batches-py"), data)


def test_cifar10_batches_are_read_in_numeric_order(tmp_path, cifar10_writer) -> None:
    """data_batch_10 comes after data_batch_2, not between 1 and 2 as a string sort would put it."""
    data = cifar10_writer(tmp_path / "c10", batches=10, per_batch=3, test=None)
    splits = read_source(tmp_path / "c10")
    _assert_official(splits, data)


def test_cifar10_official_tar_gz(cifar10_tar_gz) -> None:
    archive, data = cifar10_tar_gz
    _assert_official(read_source(archive), data)


def test_cifar10_in_parent_folder_and_other_archives(tmp_path, cifar10_writer, archive_writer) -> None:
    data = cifar10_writer(tmp_path / "src" / "cifar-10-batches-py")
    _assert_official(read_source(tmp_path / "src"), data)  # the folder the archive was extracted into
    for name in ("c10.tar", "c10.zip", "c10.tgz"):
        _assert_official(read_source(archive_writer(tmp_path / "src", tmp_path / name)), data)


def test_cifar10_without_test_batch(tmp_path, cifar10_writer) -> None:
    data = cifar10_writer(tmp_path / "c10", test=None)
    splits = read_source(tmp_path / "c10")
    assert splits.test is None
    _assert_official(splits, data)


def test_cifar100_folder_and_archive(tmp_path, cifar100_writer, archive_writer) -> None:
    data = cifar100_writer(tmp_path / "cifar-100-python")
    _assert_official(read_source(tmp_path / "cifar-100-python"), data)
    archive = archive_writer(tmp_path / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz", "cifar-100-python/")
    _assert_official(read_source(archive), data)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("member", ["data_batch_1", "batches.meta", "test_batch"])
def test_crafted_pickle_is_refused_without_running(tmp_path, cifar10_writer, member) -> None:
    folder = tmp_path / "c10"
    cifar10_writer(folder)
    marker = tmp_path / "pwned"
    (folder / member).write_bytes(pickle.dumps({b"data": _RunsShell(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(CifarlabError, match=member) as info:
        read_source(folder)
    assert str(folder) in str(info.value)
    assert not marker.exists()


def test_crafted_pickle_in_archive_is_refused(tmp_path, cifar10_writer, archive_writer) -> None:
    cifar10_writer(tmp_path / "c10")
    marker = tmp_path / "pwned"
    (tmp_path / "c10" / "data_batch_1").write_bytes(pickle.dumps({b"x": _RunsShell(marker)}, protocol=2))
    archive = archive_writer(tmp_path / "c10", tmp_path / "c10.tar.gz", "cifar-10-batches-py/")
    with pytest.raises(CifarlabError, match="data_batch_1"):
        read_source(archive)
    assert not marker.exists()


def test_safe_unpickle_accepts_numpy_and_refuses_other_globals(tmp_path) -> None:
    array = np.arange(3072, dtype=np.uint8).reshape(1, 3072)
    loaded = safe_unpickle(pickle.dumps({b"data": array, b"labels": [1]}, protocol=2), "x")
    assert np.array_equal(loaded["data"], array) and loaded["labels"] == [1]
    for evil in (pickle.dumps({b"f": Path("/etc")}, protocol=2), b"not a pickle", pickle.dumps([1, 2], protocol=2)):
        with pytest.raises(CifarlabError, match="where"):
            safe_unpickle(evil, "where")


@pytest.mark.parametrize("batch", [
    {b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4},  # wrong row length
    {b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4},  # wrong dtype
    {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3},  # labels of the wrong length
    {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]},  # label out of range
    {b"labels": [0] * 4},  # no data
])
def test_malformed_official_batch(tmp_path, cifar10_writer, batch) -> None:
    cifar10_writer(tmp_path / "c10")
    (tmp_path / "c10" / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(CifarlabError, match="data_batch_2"):
        read_source(tmp_path / "c10")


# --- image folders ---------------------------------------------------------------------------------

def test_train_test_folders(tmp_path, image_folder_writer) -> None:
    written = image_folder_writer(tmp_path / "root", TRAIN_TEST)
    notes: list[str] = []
    splits = read_source(tmp_path / "root", notes=notes)
    _assert_folder_split(splits.train, written, "train/")
    _assert_folder_split(splits.test, written, "test/")
    assert splits.train.classes == ["ant", "cat", "dog"]  # sorted, not creation order
    assert notes == []  # RGB 32x32 PNGs need no conversion


def test_train_val_folders(tmp_path, image_folder_writer) -> None:
    written = image_folder_writer(tmp_path / "root", {"train/b": 2, "train/a": 3, "val/b": 1, "val/a": 1})
    splits = read_source(tmp_path / "root")
    _assert_folder_split(splits.train, written, "train/")
    _assert_folder_split(splits.test, written, "val/")


def test_train_only_has_no_test(tmp_path, image_folder_writer) -> None:
    written = image_folder_writer(tmp_path / "root", {"train/b": 2, "train/a": 3})
    splits = read_source(tmp_path / "root")
    _assert_folder_split(splits.train, written, "train/")
    assert splits.test is None


def test_class_folders_directly(tmp_path, image_folder_writer) -> None:
    written = image_folder_writer(tmp_path / "root", {"zebra": 2, "apple": 3, "mango": 1})
    splits = read_source(tmp_path / "root")
    _assert_folder_split(splits.train, written, "")
    assert splits.train.classes == ["apple", "mango", "zebra"]
    assert splits.test is None


@pytest.mark.parametrize("archive_name", ["d.tar", "d.tar.gz", "d.tgz", "d.zip"])
@pytest.mark.parametrize("wrapper", ["", "my-data/", "outer/inner/"])
@pytest.mark.parametrize("layout", ["train_test", "classes"])
def test_image_folder_archives(tmp_path, image_folder_writer, archive_writer, archive_name, wrapper, layout) -> None:
    counts = TRAIN_TEST if layout == "train_test" else {"zebra": 2, "apple": 3}
    written = image_folder_writer(tmp_path / "src", counts)
    # reversed member order: labels must still follow sorted class names, not archive order
    archive = archive_writer(tmp_path / "src", tmp_path / archive_name, wrapper, reverse=True)
    splits = read_source(archive)
    if layout == "train_test":
        _assert_folder_split(splits.train, written, "train/")
        _assert_folder_split(splits.test, written, "test/")
    else:
        _assert_folder_split(splits.train, written, "")
        assert splits.test is None


def test_jpeg_images(tmp_path, image_folder_writer) -> None:
    written = image_folder_writer(tmp_path / "root", {"a": 2, "b": 2}, fmt="jpg")
    splits = read_source(tmp_path / "root")
    assert splits.train.images.shape == (4, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0, 0, 1, 1]
    # lossy, but each decoded image is far closer to its own source than to another one
    images, _, _ = expected_split(written, "")
    decoded = splits.train.images.float()
    distance = (decoded[:, None] - torch.from_numpy(images).float()[None]).abs().mean(dim=(2, 3, 4))
    assert torch.equal(distance.argmin(dim=1), torch.arange(4))


def test_many_images_are_decoded_by_workers_into_the_same_tensors(tmp_path, image_folder_writer, monkeypatch) -> None:
    """Above PARALLEL_DECODE_MIN images, forked workers decode chunks of them: the same images in the
    same order as one process, and a broken file raises the same error, naming it."""
    root = tmp_path / "root"
    image_folder_writer(root, {"a": 5, "b": 6, "c": 4}, fmt="jpg")
    alone = read_source(root)
    monkeypatch.setattr(sources, "PARALLEL_DECODE_MIN", 1)
    monkeypatch.setattr(sources, "DECODE_CHUNK", 4)  # 4 chunks, one of them short
    monkeypatch.setattr(sources.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    together = read_source(root)
    assert torch.equal(together.train.images, alone.train.images)
    assert torch.equal(together.train.labels, alone.train.labels) and together.train.classes == alone.train.classes
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    _raises_naming(root, "b/broken.jpg")


def test_other_sizes_and_modes_are_converted_with_a_note(tmp_path, image_folder_writer) -> None:
    root = tmp_path / "root"
    image_folder_writer(root, {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    gray = np.random.default_rng(1).integers(0, 256, size=(32, 32), dtype=np.uint8)
    Image.fromarray(gray, "L").save(root / "train/a/gray.png")
    Image.fromarray(image_array(2, (40, 28))).save(root / "train/a/wide.png")
    Image.fromarray(np.dstack([image_array(3), np.full((32, 32, 1), 255, np.uint8)]), "RGBA").save(
        root / "train/b/rgba.png")
    Image.fromarray(image_array(4)).convert("P").save(root / "train/b/palette.png")
    Image.fromarray(image_array(5, (64, 64))).save(root / "train/b/big.jpg")
    notes: list[str] = []
    splits = read_source(root, notes=notes)
    assert splits.train.images.shape == (9, 3, 32, 32)
    assert len(notes) == 1 and "converted 5 image(s)" in notes[0] and "RGB 32x32" in notes[0]
    assert "train" in notes[0]
    # the grayscale image becomes three equal channels holding its values
    files = sorted(p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.*"))
    gray_index = files.index("a/gray.png")
    assert np.array_equal(splits.train.images[gray_index].numpy(), np.stack([gray] * 3))
    assert splits.train.labels.tolist() == [0] * 4 + [1] * 5


def test_image_size_other_than_32(tmp_path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "root", {"a": 2, "b": 1})
    notes: list[str] = []
    splits = read_source(tmp_path / "root", image_size=16, notes=notes)
    assert splits.train.images.shape == (3, 3, 16, 16)
    assert notes and "16x16" in notes[0]


def test_hidden_files_are_ignored(tmp_path, image_folder_writer, archive_writer) -> None:
    root = tmp_path / "root"
    written = image_folder_writer(root, TRAIN_TEST)
    for junk in (".DS_Store", "train/.DS_Store", "train/cat/.DS_Store", "test/dog/._img000.png",
                 ".git/objects/ab/cdef"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\x00\x01 Bud1 not an image")
    for source in (root, archive_writer(root, tmp_path / "r.tar.gz"), archive_writer(root, tmp_path / "r.zip"),
                   archive_writer(root, tmp_path / "w.zip", "wrapped/")):
        splits = read_source(source)
        _assert_folder_split(splits.train, written, "train/")
        _assert_folder_split(splits.test, written, "test/")


def test_hidden_files_ignored_with_class_folders_directly(tmp_path, image_folder_writer, archive_writer) -> None:
    root = tmp_path / "root"
    written = image_folder_writer(root, {"cat": 2, "dog": 2})
    (root / ".DS_Store").write_bytes(b"\x00junk")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00junk")
    for source in (root, archive_writer(root, tmp_path / "r.tar"), archive_writer(root, tmp_path / "w.zip", "wrap/")):
        _assert_folder_split(read_source(source).train, written, "")


@pytest.mark.parametrize("counts", [{"cat": 2, "dog": 2}, {"train/cat": 2, "train/dog": 1, "test/cat": 1, "test/dog": 1}])
@pytest.mark.parametrize("wrap", [False, True])
def test_tar_made_from_dot_with_hidden_files(tmp_path, image_folder_writer, counts, wrap) -> None:
    """`tar czf d.tar.gz -C root .` names members './cat/1.png' and './.DS_Store', with a '.' member first."""
    import tarfile

    root = tmp_path / "root"
    data_root = root / "wrapper" if wrap else root
    written = image_folder_writer(data_root, counts)
    (data_root / ".DS_Store").write_bytes(b"\x00junk")
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(root, arcname=".")
    prefix = "train/" if "train/cat" in counts else ""
    _assert_folder_split(read_source(archive).train, written, prefix)


# --- bad input -------------------------------------------------------------------------------------

def _raises_naming(path: Path, *match: str, **kwargs) -> CifarlabError:
    with pytest.raises(CifarlabError) as info:
        read_source(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    for part in match:
        assert part in message, message
    assert "\n" not in message
    return info.value


def test_missing_path(tmp_path) -> None:
    _raises_naming(tmp_path / "nowhere", "no such file")


def test_plain_file_that_is_not_an_archive(tmp_path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    _raises_naming(path, "not a folder or a")


def test_empty_folder(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    _raises_naming(tmp_path / "empty")


def test_unknown_layout_files_at_root(tmp_path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.fromarray(image_array(i)).save(root / f"{i}.png")
    _raises_naming(root, "unknown layout")


def test_unknown_layout_mixed_files_and_class_folders(tmp_path, image_folder_writer) -> None:
    root = tmp_path / "mixed"
    image_folder_writer(root, {"cat": 2, "dog": 2})
    Image.fromarray(image_array(9)).save(root / "stray.png")
    _raises_naming(root, "unknown layout")


def test_too_deep_layout(tmp_path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "deep", {"a/x": 2, "b/y": 2})
    _raises_naming(tmp_path / "deep", "expected <class>/<image>")


@pytest.mark.parametrize("name", ["junk.tar.gz", "junk.tgz", "junk.tar", "junk.zip"])
def test_corrupt_archive(tmp_path, name) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises_naming(path, "corrupt or truncated")


@pytest.mark.parametrize("name", ["d.tar.gz", "d.zip"])
def test_truncated_archive(tmp_path, image_folder_writer, archive_writer, name) -> None:
    image_folder_writer(tmp_path / "src", TRAIN_TEST)
    archive = archive_writer(tmp_path / "src", tmp_path / name)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    _raises_naming(archive, "corrupt or truncated")


def test_truncated_official_archive(cifar10_tar_gz) -> None:
    archive, _ = cifar10_tar_gz
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    _raises_naming(archive, "corrupt or truncated")


@pytest.mark.parametrize("empty", ["train/dog", "test/dog", "dog"])
def test_empty_class_folder(tmp_path, image_folder_writer, archive_writer, empty) -> None:
    root = tmp_path / "root"
    if "/" in empty:
        image_folder_writer(root, {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/dog": 1})
    else:
        image_folder_writer(root, {"cat": 2, "dog": 2})
    shutil.rmtree(root / empty)
    (root / empty).mkdir()
    _raises_naming(root, "empty class folder", empty)
    for archive in (archive_writer(root, tmp_path / "r.tar"), archive_writer(root, tmp_path / "r.zip")):
        _raises_naming(archive, "empty class folder", empty)


def test_class_folder_holding_only_hidden_files_is_empty(tmp_path, image_folder_writer) -> None:
    """A folder with nothing but .DS_Store has no images: an error, not a class silently dropped."""
    root = tmp_path / "root"
    image_folder_writer(root, {"cat": 2, "dog": 2, "eel": 2})
    shutil.rmtree(root / "dog")
    (root / "dog").mkdir()
    (root / "dog" / ".DS_Store").write_bytes(b"\x00junk")
    _raises_naming(root, "empty class folder", "dog")


@pytest.mark.parametrize("in_archive", [False, True])
def test_non_image_file_in_class_folder(tmp_path, image_folder_writer, archive_writer, in_archive) -> None:
    root = tmp_path / "root"
    image_folder_writer(root, {"train/cat": 2, "train/dog": 2})
    (root / "train" / "dog" / "notes.txt").write_text("these are my dog pictures\n")
    source = archive_writer(root, tmp_path / "r.tar.gz") if in_archive else root
    error = _raises_naming(source, "not a readable image", "notes.txt")
    assert "train/dog/notes.txt" in str(error)


def test_image_with_wrong_content(tmp_path, image_folder_writer) -> None:
    root = tmp_path / "root"
    image_folder_writer(root, {"cat": 2, "dog": 2})
    (root / "cat" / "broken.png").write_bytes(image_bytes(Image.fromarray(image_array(0)))[:40])
    _raises_naming(root, "cat/broken.png")


def test_train_and_test_with_different_classes(tmp_path, image_folder_writer) -> None:
    root = tmp_path / "root"
    image_folder_writer(root, {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/eel": 1})
    _raises_naming(root, "differ", "dog", "eel")


# --- the cache -------------------------------------------------------------------------------------

class _CountingReader:
    """Stands in for read_source in cache.py: counts reads, optionally refusing any."""

    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail:
            raise AssertionError("read_source called: the cache was not used")
        return read_source(*args, **kwargs)


def _assert_same_splits(a, b) -> None:
    assert a.train.classes == b.train.classes
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert (a.test is None) == (b.test is None)
    if a.test is not None:
        assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
        assert a.test.classes == b.test.classes


@pytest.mark.parametrize("kind", ["folder", "archive", "official"])
def test_second_load_reads_the_cache(tmp_path, image_folder_writer, archive_writer, cifar10_tar_gz, cache_dir,
                                     monkeypatch, kind) -> None:
    if kind == "official":
        source = cifar10_tar_gz[0]
    else:
        image_folder_writer(tmp_path / "root", TRAIN_TEST)
        source = tmp_path / "root" if kind == "folder" else archive_writer(tmp_path / "root", tmp_path / "r.zip")
    first = load_splits(source)
    assert len(list((cache_dir / "tensors").glob("*.pt"))) == 1
    monkeypatch.setattr(cache_module, "read_source", _CountingReader(fail=True))
    second = load_splits(source)
    _assert_same_splits(first, second)
    _assert_same_splits(second, read_source(source))


def test_cache_without_test_split(tmp_path, image_folder_writer, monkeypatch) -> None:
    image_folder_writer(tmp_path / "root", {"a": 2, "b": 2})
    first = load_splits(tmp_path / "root")
    monkeypatch.setattr(cache_module, "read_source", _CountingReader(fail=True))
    second = load_splits(tmp_path / "root")
    assert second.test is None
    _assert_same_splits(first, second)


def test_changed_source_is_read_again(tmp_path, image_folder_writer, monkeypatch) -> None:
    root = tmp_path / "root"
    image_folder_writer(root, {"a": 2, "b": 2})
    reader = _CountingReader()
    monkeypatch.setattr(cache_module, "read_source", reader)
    load_splits(root)
    load_splits(root)
    assert reader.calls == 1
    # touched: same bytes, new modification time
    image = root / "a" / "img000.png"
    key = source_key(root, 32)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert source_key(root, 32) != key
    load_splits(root)
    assert reader.calls == 2
    # modified: new pixels must show up, not the cached ones
    new = np.full((32, 32, 3), 7, np.uint8)
    Image.fromarray(new).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000_000))
    splits = load_splits(root)
    assert reader.calls == 3
    assert np.array_equal(splits.train.images[0].numpy(), new.transpose(2, 0, 1))
    # a new file changes the key too
    Image.fromarray(new).save(root / "b" / "extra.png")
    assert len(load_splits(root).train) == 5 and reader.calls == 4


def test_key_depends_on_image_size_and_path(tmp_path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "r1", {"a": 1, "b": 1})
    shutil.copytree(tmp_path / "r1", tmp_path / "r2")
    assert source_key(tmp_path / "r1", 32) != source_key(tmp_path / "r1", 16)
    assert source_key(tmp_path / "r1", 32) != source_key(tmp_path / "r2", 32)
    assert load_splits(tmp_path / "r1", 16).train.images.shape[-1] == 16
    assert load_splits(tmp_path / "r1", 32).train.images.shape[-1] == 32


def test_changed_archive_is_read_again(tmp_path, image_folder_writer, archive_writer, monkeypatch) -> None:
    image_folder_writer(tmp_path / "root", {"a": 2, "b": 2})
    archive = archive_writer(tmp_path / "root", tmp_path / "r.tar")
    reader = _CountingReader()
    monkeypatch.setattr(cache_module, "read_source", reader)
    load_splits(archive)
    image_folder_writer(tmp_path / "root", {"a": 3})
    archive_writer(tmp_path / "root", archive)
    assert len(load_splits(archive).train) == 5 and reader.calls == 2


def _flip_a_pixel(entry: bytes, images: torch.Tensor) -> bytes:
    at = entry.find(images.numpy().tobytes()[:64])
    assert at >= 0
    damaged = bytearray(entry)
    damaged[at + 10] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "wrong_content", "flipped_pixel"])
def test_damaged_cache_entry_is_rebuilt(tmp_path, image_folder_writer, cache_dir, monkeypatch, damage) -> None:
    image_folder_writer(tmp_path / "root", TRAIN_TEST)
    first = load_splits(tmp_path / "root")
    (entry,) = (cache_dir / "tensors").glob("*.pt")
    data = entry.read_bytes()
    damaged = {
        "garbage": np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "wrong_content": None,
        "flipped_pixel": _flip_a_pixel(data, first.train.images),  # a readable file: only the CRC tells
    }[damage]
    if damaged is None:  # a readable file that is not a consistent entry
        torch.save({"format": 1, "classes": ["a"], "train_images": torch.zeros(3, 3, 32, 32),
                    "train_labels": torch.zeros(2, dtype=torch.int64)}, entry)
    else:
        entry.write_bytes(damaged)
    reader = _CountingReader()
    monkeypatch.setattr(cache_module, "read_source", reader)
    second = load_splits(tmp_path / "root")
    assert reader.calls == 1
    _assert_same_splits(first, second)
    # and the rebuilt entry is good again
    monkeypatch.setattr(cache_module, "read_source", _CountingReader(fail=True))
    _assert_same_splits(first, load_splits(tmp_path / "root"))


def test_cache_entry_cannot_run_code(tmp_path, image_folder_writer, cache_dir) -> None:
    image_folder_writer(tmp_path / "root", {"a": 2, "b": 2})
    first = load_splits(tmp_path / "root")
    (entry,) = (cache_dir / "tensors").glob("*.pt")
    marker = tmp_path / "pwned"
    torch.save({"x": _RunsShell(marker)}, entry)
    _assert_same_splits(first, load_splits(tmp_path / "root"))
    assert not marker.exists()


def test_failing_read_leaves_no_cache_file(tmp_path, image_folder_writer, cache_dir) -> None:
    root = tmp_path / "root"
    image_folder_writer(root, {"a": 2, "b": 2})
    (root / "b" / "notes.txt").write_text("hello")
    with pytest.raises(CifarlabError):
        load_splits(root)
    tensors = cache_dir / "tensors"
    assert not tensors.exists() or list(tensors.iterdir()) == []


def test_unwritable_cache_is_a_note(tmp_path, image_folder_writer, monkeypatch) -> None:
    image_folder_writer(tmp_path / "root", {"a": 2, "b": 2})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CIFARLAB_CACHE", str(blocker))
    notes: list[str] = []
    splits = load_splits(tmp_path / "root", notes=notes)
    assert len(splits.train) == 4
    assert any("could not write the data cache" in n for n in notes)


# --- splits ----------------------------------------------------------------------------------------

def _labels(counts: list[int]) -> torch.Tensor:
    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]


def test_stratified_split_is_proportional() -> None:
    labels = _labels([300, 200, 100])
    train, val = stratified_split(labels, 60, seed=0)
    assert torch.bincount(labels[val]).tolist() == [30, 20, 10]
    assert torch.bincount(labels[train]).tolist() == [270, 180, 90]


@pytest.mark.parametrize("counts,n_val", [([7, 5, 3], 4), ([7, 5, 3], 1), ([1, 1, 13], 5), ([10, 10, 10], 27),
                                          ([33, 17, 50, 1], 37), ([5, 5], 0)])
def test_stratified_split_exact_disjoint_complete(counts, n_val) -> None:
    labels = _labels(counts)
    train, val = stratified_split(labels, n_val, seed=3)
    assert len(val) == n_val and len(train) == len(labels) - n_val
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert train.dtype == val.dtype == torch.int64
    # each class's share is within one image of its exact proportion
    per_class = torch.bincount(labels[val], minlength=len(counts)).tolist()
    for count, taken in zip(counts, per_class):
        assert abs(taken - count * n_val / len(labels)) < 1


def test_stratified_split_keeps_a_training_image_of_every_class() -> None:
    labels = _labels([1, 9])
    train, _ = stratified_split(labels, 8, seed=0)
    assert sorted(set(labels[train].tolist())) == [0, 1]
    with pytest.raises(ValueError, match="every class keeps a training image"):
        stratified_split(_labels([10, 10, 10]), 28, seed=0)


def test_stratified_split_is_seeded() -> None:
    labels = _labels([50, 40, 30])
    a = stratified_split(labels, 24, seed=1)
    b = stratified_split(labels, 24, seed=1)
    c = stratified_split(labels, 24, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.bincount(labels[a[1]]).tolist() == torch.bincount(labels[c[1]]).tolist()


def test_load_data_default_holds_out_5000_without_test_split(tmp_path, cifar10_writer) -> None:
    data = cifar10_writer(tmp_path / "c10", batches=1, per_batch=5100, test=None)
    bundle = load_data(str(tmp_path / "c10"), seed=0)
    assert DEFAULT_VAL_SPLIT == 5000
    assert len(bundle.val) == 5000 and len(bundle.train) == 100 and bundle.test is None
    assert bundle.eval_split == "val" and bundle.split("val") is bundle.val
    assert bundle.classes == data.classes
    # stratified: each class's val count within one of its proportion
    counts = np.bincount(data.train_labels, minlength=10)
    val_counts = torch.bincount(bundle.val.labels, minlength=10).numpy()
    assert np.all(np.abs(val_counts - counts * 5000 / 5100) < 1)


def test_load_data_small_val_split(tmp_path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "root", {"a": 10, "b": 6, "c": 4})
    a = load_data(str(tmp_path / "root"), val_split=5, seed=1)
    assert len(a.val) == 5 and len(a.train) == 15 and a.test is None and a.eval_split == "val"
    for count, taken in zip([10, 6, 4], torch.bincount(a.val.labels, minlength=3).tolist()):
        assert abs(taken - count * 5 / 20) < 1
    assert a.val.classes == a.train.classes == ["a", "b", "c"]
    # val images are held out: no val image is also a train image
    train_rows = {bytes(img.numpy()) for img in a.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in a.val.images)
    b = load_data(str(tmp_path / "root"), val_split=5, seed=1)
    assert torch.equal(a.val.images, b.val.images)
    c = load_data(str(tmp_path / "root"), val_split=5, seed=2)
    assert not torch.equal(a.val.images, c.val.images)


def test_load_data_with_test_split_holds_out_nothing(tmp_path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "root", TRAIN_TEST)
    bundle = load_data(str(tmp_path / "root"))
    assert bundle.val is None and len(bundle.train) == 9 and len(bundle.test) == 5
    assert bundle.eval_split == "test"
    assert bundle.source == str((tmp_path / "root").resolve())
    with pytest.raises(CifarlabError, match="no 'val' split"):
        bundle.split("val")
    with_val = load_data(str(tmp_path / "root"), val_split=3)
    assert len(with_val.val) == 3 and len(with_val.train) == 6 and with_val.eval_split == "val"


def test_load_data_val_split_zero(tmp_path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "root", {"a": 3, "b": 3})
    bundle = load_data(str(tmp_path / "root"), val_split=0)
    assert bundle.val is None and len(bundle.train) == 6 and bundle.eval_split is None


def test_load_data_single_class(tmp_path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "root", {"train/only": 3, "test/only": 1})
    with pytest.raises(CifarlabError, match="one class") as info:
        load_data(str(tmp_path / "root"))
    assert str(tmp_path / "root") in str(info.value)


@pytest.mark.parametrize("val_split", [20, 19, 100, -1])
def test_load_data_val_split_too_large(tmp_path, image_folder_writer, val_split) -> None:
    image_folder_writer(tmp_path / "root", {"a": 10, "b": 10})
    with pytest.raises(CifarlabError, match="--val-split") as info:
        load_data(str(tmp_path / "root"), val_split=val_split)
    assert str(tmp_path / "root") in str(info.value)


def test_load_data_default_val_on_small_source_is_explained(tmp_path, image_folder_writer) -> None:
    """No test split and fewer than 5000 images: the message says what to pass instead."""
    image_folder_writer(tmp_path / "root", {"a": 3, "b": 3})
    with pytest.raises(CifarlabError, match="--val-split 5000"):
        load_data(str(tmp_path / "root"))


def test_load_data_refuses_data_and_dataset(tmp_path) -> None:
    with pytest.raises(CifarlabError, match="not both"):
        load_data(str(tmp_path), dataset="cifar10")


def test_load_data_notes_and_cache(tmp_path, image_folder_writer, cache_dir) -> None:
    image_folder_writer(tmp_path / "root", {"a": 3, "b": 3})
    Image.fromarray(image_array(0, (20, 20))).save(tmp_path / "root" / "a" / "small.png")
    notes: list[str] = []
    bundle = load_data(str(tmp_path / "root"), val_split=0, notes=notes)
    assert len(bundle.train) == 7 and any("converted 1" in n for n in notes)
    assert len(list((cache_dir / "tensors").glob("*.pt"))) == 1


def test_write_cifar10_helper_is_protocol_2(tmp_path) -> None:
    """The fixture writes what the official files are: protocol-2 pickles of dicts with bytes keys."""
    write_cifar10(tmp_path / "c", batches=1, per_batch=2, test=None)
    raw = (tmp_path / "c" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"
    loaded = pickle.loads(raw, encoding="bytes")
    assert set(loaded) >= {b"data", b"labels"} and loaded[b"data"].shape == (2, 3072)


@pytest.mark.parametrize("archive_name", [None, "w.zip", "w.tar.gz"])
def test_hidden_file_beside_the_wrapping_folder(tmp_path, image_folder_writer, archive_writer, archive_name) -> None:
    """A .DS_Store next to the single top folder must not stop the reader looking inside it."""
    root = tmp_path / "root"
    written = image_folder_writer(root / "wrapper", {"cat": 2, "dog": 2})
    (root / ".DS_Store").write_bytes(b"\x00junk")
    source = archive_writer(root, tmp_path / archive_name) if archive_name else root
    _assert_folder_split(read_source(source).train, written, "")


def test_single_file_at_the_root_is_not_a_wrapper(tmp_path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    Image.fromarray(image_array(0)).save(root / "only.png")
    _raises_naming(root, "unknown layout")


def test_load_data_missing_path(tmp_path) -> None:
    """Not a FileNotFoundError from the cache's key: the user's error, naming the path."""
    with pytest.raises(CifarlabError, match="no such file") as info:
        load_data(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(info.value)
