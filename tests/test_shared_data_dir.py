"""A class's shared data folder ($CIFARLAB_DATA_DIR, then $TEACHER_DIR/JHL_data) is used before any download.

Every test points CIFARLAB_DATA_URL at a closed port on 127.0.0.1, so an attempted download fails at
once with "could not download": a test that loads data without that error downloaded nothing.
"""
from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from cifarlab.data import download
from cifarlab.data.download import fetch_official, md5_of
from cifarlab.data.splits import load_data
from cifarlab.errors import CifarlabError
from conftest import OfficialData, write_archive, write_cifar10, write_cifar100


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """No shared folder unless a test sets one (a teaching machine may have TEACHER_DIR set), and a
    download URL nothing listens on."""
    monkeypatch.delenv("CIFARLAB_DATA_DIR", raising=False)
    monkeypatch.delenv("TEACHER_DIR", raising=False)
    # a port held bound, not listening, for the whole test: refused at once, and no other process
    # (a torchrun rendezvous, a test server) can take it meanwhile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
        monkeypatch.setenv("CIFARLAB_DATA_URL", url)
        yield url


def cifar10_copy(folder: Path, monkeypatch: pytest.MonkeyPatch, *, archive: bool = True, extracted: bool = False,
                 seed: int = 0) -> OfficialData:
    """What torchvision's download=True leaves in `folder`: the archive (its MD5 made the expected one)
    and/or the extracted cifar-10-batches-py/, with all five training batches."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder.parent / f"{folder.name}-src-{seed}"
    data = write_cifar10(source, batches=5, per_batch=4, test=6, seed=seed)
    if archive:
        written = write_archive(source, folder / "cifar-10-python.tar.gz", "cifar-10-batches-py/")
        monkeypatch.setitem(download.OFFICIAL_ARCHIVES, "cifar10", ("cifar-10-python.tar.gz", md5_of(written)))
    if extracted:
        write_cifar10(folder / "cifar-10-batches-py", batches=5, per_batch=4, test=6, seed=seed)
    return data


def assert_same(bundle, data: OfficialData) -> None:
    assert bundle.classes == data.classes
    assert np.array_equal(bundle.train.images.numpy(), data.train_data.reshape(-1, 3, 32, 32))
    assert np.array_equal(bundle.train.labels.numpy(), data.train_labels)
    assert np.array_equal(bundle.test.labels.numpy(), data.test_labels)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (root included) with its mode, size and modification time."""
    def entry(path: Path) -> tuple:
        s = path.stat()
        return (s.st_mode, s.st_size, s.st_mtime_ns)
    return {"": entry(root), **{str(p.relative_to(root)): entry(p) for p in root.rglob("*")}}


def test_archive_in_the_data_dir_is_used_without_a_download(tmp_path, monkeypatch, cache_dir) -> None:
    shared = tmp_path / "shared"
    data = cifar10_copy(shared, monkeypatch)
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(shared))
    notes: list[str] = []
    bundle = load_data(dataset="cifar10", notes=notes)
    assert_same(bundle, data)
    assert bundle.source == "cifar10"  # the config names the dataset, not the classroom's path
    assert not (cache_dir / "downloads").exists()
    assert notes == [f"note: cifar10 read from {shared / 'cifar-10-python.tar.gz'} ($CIFARLAB_DATA_DIR)"]


def test_teacher_dir_extracted_folder(tmp_path, monkeypatch, cache_dir) -> None:
    """The extracted folder alone is enough; the real MD5 table stays, since no archive is checked."""
    teacher = tmp_path / "teacher"
    data = cifar10_copy(teacher / "JHL_data", monkeypatch, archive=False, extracted=True)
    monkeypatch.setenv("TEACHER_DIR", str(teacher))
    assert fetch_official("cifar10") == teacher / "JHL_data" / "cifar-10-batches-py"
    assert_same(load_data(dataset="cifar10"), data)
    assert not (cache_dir / "downloads").exists()


def test_extracted_folder_is_preferred_to_the_archive(tmp_path, monkeypatch) -> None:
    shared = tmp_path / "shared"
    cifar10_copy(shared, monkeypatch, archive=True, extracted=True)
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(shared))
    assert fetch_official("cifar10") == shared / "cifar-10-batches-py"  # no decompressing needed


def test_cifar100_extracted_folder(tmp_path, monkeypatch) -> None:
    shared = tmp_path / "shared"
    data = write_cifar100(shared / "cifar-100-python")
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(shared))
    bundle = load_data(dataset="cifar100")
    assert bundle.classes == data.classes and np.array_equal(bundle.train.labels.numpy(), data.train_labels)


def test_read_only_folder_is_never_written(tmp_path, monkeypatch, cache_dir) -> None:
    """Tests run as root, whom chmod does not stop; so the check is that nothing under the folder
    changed (no new file, no changed size, mode or time), and that the decoded cache went to CIFARLAB_CACHE."""
    teacher = tmp_path / "teacher"
    data = cifar10_copy(teacher / "JHL_data", monkeypatch, archive=True, extracted=True)
    for path in [teacher, *teacher.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    monkeypatch.setenv("TEACHER_DIR", str(teacher))
    before = snapshot(teacher)
    try:
        first = load_data(dataset="cifar10")
        again = load_data(dataset="cifar10")  # the second load comes from the tensor cache
        assert snapshot(teacher) == before
    finally:
        for path in [teacher, *teacher.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert_same(first, data)
    assert np.array_equal(again.train.images.numpy(), first.train.images.numpy())
    assert len(list((cache_dir / "tensors").glob("*.pt"))) == 1


def test_both_set_the_data_dir_wins_and_a_note_says_so(tmp_path, monkeypatch) -> None:
    mine, teacher = tmp_path / "mine", tmp_path / "teacher"
    mine_data = cifar10_copy(mine, monkeypatch, archive=False, extracted=True, seed=1)
    cifar10_copy(teacher / "JHL_data", monkeypatch, archive=False, extracted=True, seed=2)
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(mine))
    monkeypatch.setenv("TEACHER_DIR", str(teacher))
    notes: list[str] = []
    assert_same(load_data(dataset="cifar10", notes=notes), mine_data)
    assert len(notes) == 1 and "\n" not in notes[0]
    assert f"read from {mine / 'cifar-10-batches-py'} ($CIFARLAB_DATA_DIR)" in notes[0]
    assert f"$TEACHER_DIR/JHL_data ({teacher / 'JHL_data'}) not searched" in notes[0]


def test_both_set_the_teacher_copy_when_the_data_dir_has_none(tmp_path, monkeypatch) -> None:
    mine, teacher = tmp_path / "mine", tmp_path / "teacher"
    mine.mkdir()
    teacher_data = cifar10_copy(teacher / "JHL_data", monkeypatch, archive=True, seed=2)
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(mine))
    monkeypatch.setenv("TEACHER_DIR", str(teacher))
    notes: list[str] = []
    assert_same(load_data(dataset="cifar10", notes=notes), teacher_data)
    assert "($TEACHER_DIR/JHL_data)" in notes[0] and f"no copy in $CIFARLAB_DATA_DIR ({mine})" in notes[0]


def test_a_damaged_archive_is_an_error_not_a_download(tmp_path, monkeypatch, offline) -> None:
    """The real MD5 table: the test's archive is not the official one, so the shared copy is refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    write_cifar10(tmp_path / "src")
    archive = write_archive(tmp_path / "src", shared / "cifar-10-python.tar.gz", "cifar-10-batches-py/")
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(shared))
    with pytest.raises(CifarlabError, match="checksum mismatch") as info:
        load_data(dataset="cifar10")
    message = str(info.value)
    assert str(archive) in message and md5_of(archive) in message and "\n" not in message
    assert offline not in message  # refused before any download was tried


def test_an_incomplete_extracted_folder(tmp_path, monkeypatch) -> None:
    shared = tmp_path / "shared"
    cifar10_copy(shared, monkeypatch, archive=False, extracted=True)
    (shared / "cifar-10-batches-py" / "data_batch_4").unlink()  # extraction interrupted
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(shared))
    with pytest.raises(CifarlabError, match="incomplete copy of cifar10 \\(no data_batch_4\\)"):
        fetch_official("cifar10")
    cifar10_copy(shared, monkeypatch, archive=True)  # the archive beside it is used instead
    assert fetch_official("cifar10") == shared / "cifar-10-python.tar.gz"


@pytest.mark.parametrize("variable", ["CIFARLAB_DATA_DIR", "TEACHER_DIR"])
def test_a_variable_naming_a_missing_folder_is_an_error(tmp_path, monkeypatch, variable: str) -> None:
    monkeypatch.setenv(variable, str(tmp_path / "nowhere"))
    with pytest.raises(CifarlabError, match=f"{variable}=.*nowhere: no such folder") as info:
        load_data(dataset="cifar10")
    assert "\n" not in str(info.value)


def test_nothing_shared_falls_back_to_the_download(tmp_path, monkeypatch, offline) -> None:
    """$TEACHER_DIR without JHL_data holds no copy: the usual download is tried (here: refused)."""
    (tmp_path / "teacher").mkdir()
    monkeypatch.setenv("TEACHER_DIR", str(tmp_path / "teacher"))
    notes: list[str] = []
    with pytest.raises(CifarlabError, match="could not download"):
        load_data(dataset="cifar10", notes=notes)
    assert notes == [f"note: no copy of cifar10 in $TEACHER_DIR/JHL_data ({tmp_path / 'teacher' / 'JHL_data'}); "
                     f"using the download cache"]


def test_a_local_source_ignores_the_shared_folders(tmp_path, monkeypatch, cifar10_tar_gz) -> None:
    archive, data = cifar10_tar_gz
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(tmp_path / "nowhere"))  # not even checked
    assert_same(load_data(data=str(archive)), data)
