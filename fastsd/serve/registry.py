"""The models a server was started with (`--model`, repeatable), all loaded at start and kept warm, and the
one requests use when they name none (A1111's `sd_model_checkpoint` option). Requests choose a model by
the names /sdapi/v1/sd-models lists (title, model name, file name or hash), never by path.

Loaded up front rather than on first use: a bad --model fails at start with one line instead of on some
client's request, and no request waits for a load (SD1.5 loads in seconds to minutes on a small CPU, longer
than many clients' timeouts).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from fastsd.serve.limits import BadRequest


@dataclass(frozen=True)
class ModelEntry:
    name: str            # pipe.name: the file's stem, the folder's name, or random:<preset>
    filename: str        # the file or folder name (no path) as given; = name for random:<preset>
    hash: str | None     # A1111's short hash (sha256[:10]) of a checkpoint file
    pipe: object         # fastsd.Pipeline
    sha256: str | None = None  # the file's full sha256 (A1111's sd_checkpoint_hash, /sd-models' sha256)

    @property
    def title(self) -> str:
        """A1111's title: 'v1-5-pruned-emaonly.safetensors [6ce0161689]'."""
        return f"{self.filename} [{self.hash}]" if self.hash else self.filename

    def names(self) -> set[str]:
        return {n for n in (self.title, self.name, self.filename, self.hash, self.sha256) if n}

    def a1111(self) -> dict:
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.filename, "config": None}


class Registry:
    def __init__(self, entries: list[ModelEntry]):
        if not entries:
            raise ValueError("no model: give --model at least once")
        seen: dict[str, str] = {}
        for e in entries:
            for n in e.names():
                if n in seen and seen[n] != e.title:
                    raise ValueError(f"--model: two models are both called {n!r}; give each a distinct file name")
                seen[n] = e.title
        self.entries = entries
        self._current = entries[0]
        self._lock = threading.Lock()

    @property
    def current(self) -> ModelEntry:
        return self._current

    def lookup(self, name) -> ModelEntry | None:
        """The model `name` names (title, model name, file name or hash; A1111's checkpoint_aliases), or None."""
        return next((e for e in self.entries if isinstance(name, str) and name in e.names()), None)

    def find(self, name: str, what: str = "sd_model_checkpoint") -> ModelEntry:
        if not isinstance(name, str):
            raise BadRequest(f"{what} must be a string, got {type(name).__name__}")
        for e in self.entries:
            if name in e.names():
                return e
        raise BadRequest(f"{what}: unknown model {name!r}; this server has: "
                         f"{', '.join(e.title for e in self.entries)} (GET /sdapi/v1/sd-models)")

    def switch(self, name: str) -> ModelEntry:
        entry = self.find(name)
        with self._lock:
            self._current = entry
        return entry


def load_entries(sources: list[str], *, device, dtype, backend) -> list[ModelEntry]:
    """Load every --model; a CheckpointError/ValueError names the source that failed."""
    from fastsd import load_pipeline
    from fastsd.file_hashes import sha256

    entries = []
    for src in sources:
        # (the checkpoint's own VAE: the sd_vae option's "Automatic" VAE beside it is swapped in by serve.vaes, which
        # keeps the own for "None")
        pipe = load_pipeline(src, device=device, dtype=dtype, backend=backend, vae="none")
        filename = pipe.name if pipe.path is None else os.path.basename(os.path.normpath(pipe.path))
        short = pipe.model_hash()  # (a file's: computed once, the full digest then comes from the hash cache)
        entries.append(ModelEntry(pipe.name, filename, short, pipe, sha256(pipe.path) if short else None))
    return entries
