"""Fetch the official CIFAR archives once, check their published MD5, and keep them in the cache folder."""
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


def fetch_official(name: str) -> Path:
    """Path of the verified official archive for `name`, downloading it first if needed."""
    if name not in OFFICIAL_ARCHIVES:
        raise CifarlabError(f"unknown dataset '{name}': choose from {', '.join(OFFICIAL_ARCHIVES)}")
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
