"""Fetch the official CIFAR archives once, check their published MD5, and keep them in the cache folder.

Before downloading, the shared data folders a class may have are searched: $CIFARLAB_DATA_DIR, then
$TEACHER_DIR/JHL_data (where the teaching notebook's torchvision download leaves the archive and its
extracted folder). Those folders are only read, never written: they are often read-only.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from cifarlab.errors import CifarlabError

DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/"
# name -> (archive file name, MD5 published on the CIFAR page)
OFFICIAL_ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
TIMEOUT_S = 30
DATA_DIR_ENV = "CIFARLAB_DATA_DIR"
TEACHER_DIR_ENV = "TEACHER_DIR"
TEACHER_DATA_FOLDER = "JHL_data"  # the notebook's convention: datasets.CIFAR10(root=$TEACHER_DIR/JHL_data)
# name -> (the folder the official archive extracts to, the files a complete extracted copy holds)
EXTRACTED_FOLDERS = {
    "cifar10": ("cifar-10-batches-py", ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")),
    "cifar100": ("cifar-100-python", ("meta", "train", "test")),
}


def cache_root() -> Path:
    """CIFARLAB_CACHE, else ~/.cache/cifarlab (XDG_CACHE_HOME respected)."""
    if os.environ.get("CIFARLAB_CACHE"):
        return Path(os.environ["CIFARLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifarlab"


def archive_url(file_name: str) -> str:
    """CIFARLAB_DATA_URL is a mirror's base URL (the file name is appended) or a full URL to the archive."""
    base = os.environ.get("CIFARLAB_DATA_URL", DEFAULT_URL)
    return base if base.endswith((".tar.gz", ".tgz")) else base.rstrip("/") + "/" + file_name


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shared_data_dirs() -> list[tuple[str, Path]]:
    """The shared data folders to search, in order, as (how to name it, folder). A variable that names
    a missing folder is an error: a typo would otherwise turn into a silent 170 MB download."""
    found = []
    for variable, below in ((DATA_DIR_ENV, ""), (TEACHER_DIR_ENV, TEACHER_DATA_FOLDER)):
        value = os.environ.get(variable, "")
        if not value:
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise CifarlabError(f"{variable}={value}: no such folder; point it at the shared data folder or unset it")
        # no JHL_data under $TEACHER_DIR yet is not an error: it just holds no dataset (yet)
        found.append((f"${variable}/{below}", folder / below) if below else (f"${variable}", folder))
    return found


def shared_copy(name: str, folder: Path) -> Path | None:
    """The dataset's extracted folder (when complete) or official archive (MD5 checked) in `folder`, or
    None when it holds neither. The extracted folder comes first: it needs no decompressing."""
    file_name, expected_md5 = OFFICIAL_ARCHIVES[name]
    extracted_name, files = EXTRACTED_FOLDERS[name]
    extracted, archive = folder / extracted_name, folder / file_name
    missing = [f for f in files if not (extracted / f).is_file()]
    if extracted.is_dir() and not missing:
        return extracted
    if archive.is_file():
        actual_md5 = md5_of(archive)
        if actual_md5 != expected_md5:
            raise CifarlabError(f"{archive}: checksum mismatch (MD5 {actual_md5}, expected {expected_md5}); the "
                                f"shared copy is damaged or not the official archive: replace it, or pass --data PATH")
        return archive
    if extracted.is_dir():  # a half-extracted copy and no archive to fall back on
        raise CifarlabError(f"{extracted}: incomplete copy of {name} (no {missing[0]}); extract "
                            f"{file_name} there again, or pass --data PATH")
    return None


def find_shared(name: str, notes: list[str] | None = None) -> Path | None:
    """The first shared copy of `name`, in search order. A note says which folder was used and which
    were passed over, since with both variables set that is not obvious (or, before a download, that
    the folders held no copy)."""
    folders = shared_data_dirs()
    empty: list[str] = []  # folders searched before the one used, which held no copy
    for label, folder in folders:
        copy = shared_copy(name, folder)
        if copy is None:
            empty.append(f"{label} ({folder})")
            continue
        if notes is not None:
            note = f"note: {name} read from {copy} ({label})"
            if empty:
                note += f"; no copy in {', '.join(empty)}"
            unused = [f"{other} ({path})" for other, path in folders[len(empty) + 1:]]
            if unused:
                note += f"; {', '.join(unused)} not searched"
            notes.append(note)
        return copy
    if empty and notes is not None:
        notes.append(f"note: no copy of {name} in {', '.join(empty)}; using the download cache")
    return None


def fetch_official(name: str, notes: list[str] | None = None) -> Path:
    """Path of the verified official data for `name`: a shared copy (archive or extracted folder) when
    one of the shared data folders holds it, else the cached archive, downloaded first if needed."""
    if name not in OFFICIAL_ARCHIVES:
        raise CifarlabError(f"unknown dataset '{name}': choose from {', '.join(OFFICIAL_ARCHIVES)}")
    shared = find_shared(name, notes)
    if shared is not None:
        return shared
    file_name, expected_md5 = OFFICIAL_ARCHIVES[name]
    target = cache_root() / "downloads" / file_name
    if target.exists() and md5_of(target) == expected_md5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = archive_url(file_name)
    partial = target.with_name(target.name + f".part{os.getpid()}")
    print(f"downloading {url} -> {target}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(partial, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        actual_md5 = md5_of(partial)
        if actual_md5 != expected_md5:
            raise CifarlabError(f"{url}: checksum mismatch (MD5 {actual_md5}, expected {expected_md5}); "
                                f"the download is corrupt or not the official archive")
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as error:
        raise CifarlabError(f"could not download {url} ({getattr(error, 'reason', error)}); if you are offline, "
                            f"pass --data PATH to a local copy of {file_name} or an image folder") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
