"""The output folder of a batch run: `ID.png` per finished job and `manifest.jsonl`, one JSON line per
finished (or failed) job, appended and fsync'd before the next job is reported done.

One writer: the process that holds `DIR/.fastsd-batch.lock` (the driver; Ray workers return PNG bytes
to it) writes the PNGs and the manifest, so a second run into the same folder is refused instead of
interleaving. A PNG is written to a temp file, fsync'd and renamed (fastsd.files.atomic_write) before its
manifest line is appended: a SIGKILL at any moment leaves at most a stray `.fastsd-*.part` temp file, which
the next run removes, and never a half-written PNG under its final name. Resume = a job is done when its
last manifest line says "done" and its file exists; a torn last line (a crash mid-append) is ignored.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import time
import warnings

from fastsd.files import atomic_write

MANIFEST = "manifest.jsonl"
LOCK = ".fastsd-batch.lock"


class OutputFolderError(ValueError):
    pass


class OutputWriteError(OutputFolderError):
    """A result could not be written mid-run: the run stops, the jobs recorded before stay (exit 1, not 2)."""


def _is_row(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("id"), str)
            and all(isinstance(row.get(k), (str, type(None))) for k in ("file", "model", "status")))


class OutputFolder:
    def __init__(self, folder: str, model: str):
        self.folder, self.model = folder, model
        self.path = os.path.join(folder, MANIFEST)
        self._lock_fd: int | None = None
        self._fd: int | None = None

    # ---- open / close ---------------------------------------------------------------------------------

    def open(self) -> "OutputFolder":
        """Create the folder, take the lock, remove stale temp files, read the manifest."""
        from fastsd.files import check_writable_folder

        check_writable_folder(self.folder, f"--out {self.folder}")
        self.created = not os.path.lexists(self.folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.folder, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputFolderError(f"--out {self.folder}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputFolderError(f"--out {self.folder}: another fastsd.batch run is writing there") from None
        try:
            for stale in glob.glob(os.path.join(glob.escape(self.folder), ".fastsd-*.part")):
                os.unlink(stale)  # temp files of a killed run (we hold the lock: nobody else writes here)
            self.rows = self._read()
        except OSError as e:
            self.close()
            raise OutputFolderError(f"--out {self.folder}: {e.filename}: {e.strerror}") from None
        others = {r.get("model") for r in self.rows.values()} - {self.model, None}
        if others:
            self.close()
            raise OutputFolderError(f"--out {self.folder}: its manifest is for model {sorted(others)[0]}, not "
                                    f"{self.model}; use another folder")
        return self

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    def remove_if_unused(self) -> None:
        """Close, and remove the folder when this run created it and wrote no result there (a run that failed or was
        interrupted before its first job finished leaves no empty folder)."""
        self.close()
        if self.created and not os.path.exists(self.path):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, LOCK))
                os.rmdir(self.folder)

    def __enter__(self) -> "OutputFolder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading --------------------------------------------------------------------------------------

    def _read(self) -> dict[str, dict]:
        """The last row per job id. A line that is not a row (not JSON, or an id, file or model that is not text) is
        skipped with a warning (but the last one, which a crash may have torn). OSError where it can't be read."""
        rows: dict[str, dict] = {}
        try:
            with open(self.path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").split("\n")
        except FileNotFoundError:
            return rows
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # (JSONDecodeError, a number above Python's digit limit)
                row = None
            if _is_row(row):
                rows[row["id"]] = row
            elif n < len(lines):  # not the torn tail: someone edited the file
                warnings.warn(f"{self.path} line {n} is not a manifest row; ignored", stacklevel=2)
        return rows

    def is_done(self, job_id: str) -> bool:
        row = self.rows.get(job_id)
        return (row is not None and row.get("status") == "done"
                and os.path.isfile(os.path.join(self.folder, row.get("file", ""))))

    def has_failed(self, job_id: str) -> bool:
        row = self.rows.get(job_id)
        return row is not None and row.get("status") == "failed"

    # ---- writing --------------------------------------------------------------------------------------

    def write_png(self, name: str, data: bytes) -> str:
        """The PNG bytes under `name`, atomically and fsync'd (a manifest line will point at it)."""
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        return atomic_write(os.path.join(self.folder, name), write)

    def append(self, row: dict) -> dict:
        """One manifest line, fsync'd. The first append of a run starts on a fresh line (after a torn tail)."""
        row = {**row, "model": self.model, "finished": round(time.time(), 3)}
        data = json.dumps(row, ensure_ascii=False) + "\n"
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(self._fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = "\n" + data
        _write_all(self._fd, data.encode("utf-8"))
        os.fsync(self._fd)
        self.rows[row["id"]] = row
        return row


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` (os.write may write less, as when the disk fills mid-line: the rest is written or ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
