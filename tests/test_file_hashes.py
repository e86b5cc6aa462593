"""fastsd.file_hashes: the sha256 an infotext names, cached on disk (as A1111's cache.json) while the file's size,
modification time and inode stay the same; a cache that can't be read or written changes nothing but speed."""
import hashlib
import os

import pytest

from fastsd import file_hashes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / file_hashes.CACHE_FILE


def _reads(monkeypatch) -> list[str]:
    """The paths sha256 opens for hashing (reading the cache goes through json, not this)."""
    opened, real = [], open

    def spy(path, mode="r", *a, **kw):
        if mode == "rb":
            opened.append(str(path))
        return real(path, mode, *a, **kw)
    monkeypatch.setattr(file_hashes, "open", spy, raising=False)
    return opened


def test_hash_is_sha256_and_a_second_call_reads_only_the_cache(tmp_path, cache, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(3 << 20) + b"tail")
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    opened = _reads(monkeypatch)
    assert file_hashes.sha256(str(f)) == want and file_hashes.file_hash(str(f)) == want[:10]
    assert opened == [str(f)] and cache.is_file()  # hashed once; the second call was a cache hit
    assert file_hashes.sha256(str(f), 5) == hashlib.sha256(f.read_bytes()[5:]).hexdigest()  # from an offset
    assert opened == [str(f)] * 2


def test_a_changed_file_is_hashed_again(tmp_path, cache):
    f = tmp_path / "lora.safetensors"
    f.write_bytes(b"a" * 1000)
    first = file_hashes.sha256(str(f))
    f.write_bytes(b"b" * 1000)  # same size; a new modification time
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_hashes.sha256(str(f)) == hashlib.sha256(b"b" * 1000).hexdigest() != first
    g = tmp_path / "other.safetensors"  # replaced by another file (rename over it): a new inode
    g.write_bytes(b"c" * 1000)
    os.replace(g, f)
    assert file_hashes.sha256(str(f)) == hashlib.sha256(b"c" * 1000).hexdigest()


def test_a_damaged_or_unwritable_cache_changes_nothing_but_speed(tmp_path, cache, monkeypatch):
    f = tmp_path / "vae.safetensors"
    f.write_bytes(b"x" * 100)
    want = hashlib.sha256(b"x" * 100).hexdigest()
    cache.parent.mkdir()
    for damaged in ("{not json", "[1, 2]", '{"%s@0": {"stat": "x", "sha256": 5}}' % os.path.realpath(f)):
        cache.write_text(damaged)
        assert file_hashes.sha256(str(f)) == want
    monkeypatch.setenv("FASTSD_CACHE_DIR", str(f))  # a file, not a folder: nothing can be written there
    assert file_hashes.sha256(str(f)) == want


def test_the_cache_keeps_the_newest_entries(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(file_hashes, "MAX_ENTRIES", 3)
    files = []
    for i in range(5):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]))
        file_hashes.sha256(str(files[-1]))
    import json
    kept = json.loads(cache.read_text())
    assert [k.rsplit("@", 1)[0] for k in kept] == [os.path.realpath(p) for p in files[2:]]
