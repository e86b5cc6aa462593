"""Writing files so that nothing is half-written, nothing is silently overwritten, and modes follow the umask.

`atomic_write(path, write)`: the content goes to a temp file in the same folder, which then takes the
final name (rename, or a hard link when the name must not exist yet); a failure or interrupt leaves no
part file and no final file. `next_free_name`: A1111's numbered names (`00012-SEED.png`), claimed with an
exclusive link so two runs writing into one folder at once never take the same name.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

_umask: int | None = None


def cache_dir() -> Path:
    """fastsd's cache folder (tuner choices, native builds, OpenVINO models, file hashes): $FASTSD_CACHE_DIR, else
    $XDG_CACHE_HOME/fastsd, else ~/.cache/fastsd."""
    if os.environ.get("FASTSD_CACHE_DIR"):
        return Path(os.environ["FASTSD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastsd"


def umask() -> int:
    global _umask
    if _umask is None:
        _umask = os.umask(0)
        os.umask(_umask)
    return _umask


def atomic_write(path: str, write: Callable[[str], None], *, overwrite: bool = True) -> str:
    """`write(tmp_path)` fills a temp file beside `path`, which then becomes `path` with mode 0666 & ~umask.
    overwrite=False: FileExistsError if `path` exists (checked atomically at the moment of linking)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastsd-", suffix=".part", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name exists: never replaces another run's file
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


_NUMBERED = re.compile(r"^(\d{5,})-")


def next_number(folder: str) -> int:
    """1 + the highest A1111-style number (`NNNNN-...`) among the folder's files (0 when none)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    return 1 + max((int(m.group(1)) for n in names if (m := _NUMBERED.match(n))), default=-1)


def write_numbered(folder: str, suffix: str, write: Callable[[str], None]) -> str:
    """Write to the folder's next free `NNNNN-<suffix>` name (A1111's counter), atomically; another run
    taking the same number at the same moment makes this one take the next."""
    n = next_number(folder)
    while True:
        path = os.path.join(folder, f"{n:05d}-{suffix}")
        try:
            return atomic_write(path, write, overwrite=False)
        except FileExistsError:
            n += 1


def check_writable_folder(folder: str, what: str) -> None:
    """ValueError unless `folder` is (or can be created as) a folder where this process can create files:
    probed by creating and removing a temp file in it, or in its nearest existing parent."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        if os.path.islink(probe):  # (makedirs would say "File exists")
            raise ValueError(f"{what}: {probe} is a broken symbolic link (to {os.readlink(probe)})")
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{what}: {probe} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fastsd-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{what}: can't write in {probe} ({e.strerror})") from None


def files_by_stem(folder: str | None, exts: tuple[str, ...], *, by_name: bool = False) -> dict[str, str]:
    """{stem: path} of the files with one of `exts` (any case) in `folder` and its subfolders, hidden files
    left out, sorted by stem; of two files with one stem the first in sorted path order wins. `by_name`: keyed by
    the file name (extension included) instead."""
    found: dict[str, str] = {}
    if not folder:
        return found
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in exts and not f.startswith("."):
                found.setdefault(f if by_name else stem, os.path.join(root, f))
    return dict(sorted(found.items()))
