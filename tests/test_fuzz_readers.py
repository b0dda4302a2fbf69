"""Fuzzing the readers: random and mutated archives, official batches and image files give either data
or one clean CifarlabError, never another exception or a hang. Bounded to run in well under 30 s."""
from __future__ import annotations

import io
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarlab.data.sources import Splits, read_source
from cifarlab.errors import CifarlabError
from conftest import image_array, write_archive, write_cifar10, write_image_folders

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PER_EXAMPLE_S = 10  # a reader that takes longer than this on a few kB is hanging


def _seeds() -> dict[str, bytes]:
    """Valid inputs to mutate: image-folder archives, an official-format archive, and single images."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_image_folders(root / "folders", {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/dog": 1})
        write_cifar10(root / "official", batches=1, per_batch=4, test=2)
        seeds = {name: write_archive(root / "folders", root / name).read_bytes()
                 for name in ("folders.tar", "folders.tar.gz", "folders.zip")}
        seeds["official.tar.gz"] = write_archive(root / "official", root / "official.tar.gz",
                                                 "cifar-10-batches-py/").read_bytes()
        seeds["official.tar"] = write_archive(root / "official", root / "official.tar").read_bytes()
    for fmt in ("PNG", "JPEG", "BMP", "GIF"):
        buffer = io.BytesIO()
        Image.fromarray(image_array(1)).save(buffer, format=fmt)
        seeds[f"image.{fmt.lower()}"] = buffer.getvalue()
    return seeds


SEEDS = _seeds()
ARCHIVES = sorted(name for name in SEEDS if not name.startswith("image."))
IMAGES = sorted(name for name in SEEDS if name.startswith("image."))


@st.composite
def mutated(draw, names: list[str]) -> tuple[str, bytes]:
    """A seed with a few bytes overwritten, a slice cut out or duplicated, and maybe truncated."""
    name = draw(st.sampled_from(names))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["set", "cut", "copy"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
        if not data:
            break
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return name, bytes(data)


def _read_cleanly(path: Path) -> None:
    """The property: data, or a CifarlabError naming the source; anything else fails the test."""
    def hang(signum, frame):
        raise TimeoutError(f"reading {path} took over {PER_EXAMPLE_S}s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(PER_EXAMPLE_S)
    try:
        result = read_source(path)
        assert isinstance(result, Splits) and len(result.train) > 0
    except CifarlabError as error:
        assert str(path.parent.name) in str(error) or str(path.name) in str(error), error
        assert "\n" not in str(error)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@SETTINGS
@given(suffix=st.sampled_from([".tar", ".tar.gz", ".tgz", ".zip"]), data=st.binary(max_size=4096))
def test_random_bytes_as_an_archive(suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"source{suffix}"
        path.write_bytes(data)
        _read_cleanly(path)


@SETTINGS
@given(case=mutated(ARCHIVES))
def test_mutated_archives(case: tuple[str, bytes]) -> None:
    name, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        _read_cleanly(path)


@SETTINGS
@given(case=mutated(IMAGES), junk=st.binary(max_size=512), where=st.sampled_from(["train/cat", "cat"]))
def test_image_folders_with_mutated_and_random_files(case: tuple[str, bytes], junk: bytes, where: str) -> None:
    name, data = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        layout = {"train/cat": 1, "train/dog": 1} if where.startswith("train") else {"cat": 1, "dog": 1}
        write_image_folders(root, layout)
        (root / where / f"mutated{Path(name).suffix}").write_bytes(data)
        (root / where / "random.png").write_bytes(junk)
        _read_cleanly(root)


@pytest.mark.parametrize("name", ARCHIVES)
def test_the_seeds_themselves_read(name: str) -> None:
    """The unmutated seeds are valid: the fuzzing starts from real data."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(SEEDS[name])
        assert len(read_source(path).train) > 0


_LABELS = st.one_of(
    st.none(), st.integers(), st.text(max_size=3), st.dictionaries(st.integers(), st.integers(), max_size=2),
    st.lists(st.one_of(st.integers(-5, 15), st.integers(), st.text(max_size=2), st.none(),
                       st.lists(st.integers(0, 3), max_size=2)), max_size=6),
)


@SETTINGS
@given(labels=_LABELS, rows=st.integers(0, 6), width=st.sampled_from([3072, 3071]),
       dtype=st.sampled_from(["uint8", "float32", "int64"]), key=st.sampled_from([b"labels", b"fine_labels", "labels"]))
def test_official_batches_with_arbitrary_contents(labels, rows: int, width: int, dtype: str, key) -> None:
    """Well-formed pickles whose values are wrong in every way a stranger's file could make them."""
    import pickle

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "official"
        write_cifar10(folder, batches=1, per_batch=4, test=None)
        batch = {b"data": np.zeros((rows, width), dtype=dtype), key: labels}
        (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
        _read_cleanly(folder)
