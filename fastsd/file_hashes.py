"""The sha256 of the files an infotext names (A1111's "Model hash", "VAE hash", "Lora hashes", "TI hashes"), kept in
a cache file as A1111 keeps its cache.json: hashing a 2 GiB checkpoint takes seconds, in every one-image run.

`sha256(path, start)`: the hex digest of the file's bytes from `start` on (a .safetensors LoRA's "addnet" hash
starts after its header). An entry is used only while the file's size, modification time (ns), inode and device
are those it was hashed at; otherwise the file is read again. The cache is `<cache_dir>/file-hashes.json`
(fastsd.files.cache_dir), written atomically and at most MAX_ENTRIES long (the oldest go first); a cache that
can't be read or written is ignored: the hash is computed as without one.
"""
from __future__ import annotations

import hashlib
import json
import os

from fastsd.files import atomic_write, cache_dir

CACHE_FILE = "file-hashes.json"
MAX_ENTRIES = 4096


def sha256(path: str, start: int = 0) -> str:
    st = os.stat(path)
    key = f"{os.path.realpath(path)}@{start}"
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    cache = _read()
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    cache.pop(key, None)
    cache[key] = {"stat": stamp, "sha256": digest}
    _write(dict(list(cache.items())[-MAX_ENTRIES:]))
    return digest


def file_hash(path: str) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    return sha256(path)[:10]


def _read() -> dict:
    try:
        with open(cache_dir() / CACHE_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(cache: dict) -> None:
    path = cache_dir() / CACHE_FILE

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(str(path), write)
    except OSError:
        pass
