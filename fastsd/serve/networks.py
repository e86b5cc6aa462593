"""LoRAs and textual-inversion embeddings, chosen by name from the folders the server was started with
(`--lora-dir`, `--embeddings-dir`). A name is a file's stem; a name with a path in it (`../x`, `/etc/x`,
`a/b`) is refused, and only files found in the folder can be named.

LoRAs are applied through `Pipeline.load_lora` / `unload_loras` (fastsd.lora) when this fastsd has them;
the set merged stays until a job asks for another, so repeated requests with the same LoRAs merge once.
"""
from __future__ import annotations

import os
import re

from fastsd.serve.limits import BadRequest

LORA_EXTS = (".safetensors", ".pt", ".ckpt")
EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")
_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(?::[^>]*)?>")  # A1111: <lora:name>, <lora:name:w>, <lora:name:w:w2>


def strip_lora_tags(prompt: str) -> str:
    """The prompt without its <lora:...> tags (A1111's disable_extra_networks)."""
    return _TAG.sub("", prompt)


def scan(folder: str | None, exts: tuple[str, ...]) -> dict[str, str]:
    """{stem: path} of the files with one of `exts` in `folder` and its subfolders (A1111 searches them too),
    sorted by name; the first of two files with the same stem wins."""
    found: dict[str, str] = {}
    if not folder:
        return found
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in exts and not f.startswith("."):
                found.setdefault(stem, os.path.join(root, f))
    return dict(sorted(found.items()))


def check_name(name: str, what: str, option: str) -> None:
    if (not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".") or os.path.isabs(name)
            or ".." in name):
        raise BadRequest(f"{what} name {name!r} refused: {what}s are chosen by name from {option}, not by path")


def lora_support() -> bool:
    """Whether this fastsd can merge LoRAs (fastsd.lora and Pipeline.load_lora)."""
    try:
        import fastsd.lora  # noqa: F401
    except ImportError:
        return False
    from fastsd.pipeline import Pipeline

    return hasattr(Pipeline, "load_lora")


class Networks:
    def __init__(self, lora_dir: str | None, embeddings_dir: str | None):
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.can_merge = lora_support()
        self._merged: dict[int, tuple] = {}  # id(pipe) -> the (path, weight) tuple merged into it
        self.loaded_embeddings: dict[str, bool] = {}

    def loras(self) -> dict[str, str]:
        return scan(self.lora_dir, LORA_EXTS)

    def embeddings(self) -> dict[str, str]:
        return scan(self.embeddings_dir, EMBEDDING_EXTS)

    def parse(self, prompt: str) -> tuple[tuple[str, float], ...]:
        """The LoRAs a prompt's <lora:NAME:WEIGHT> tags ask for, checked against --lora-dir: ((path, weight), ...)."""
        tags = _TAG.findall(prompt)
        if not tags:
            return ()
        available = self.loras()
        out = []
        for name, weight in tags:
            check_name(name, "LoRA", "--lora-dir")
            if not self.lora_dir:
                raise BadRequest(f"<lora:{name}>: this server has no LoRA folder (start it with --lora-dir DIR)")
            if name not in available:
                raise BadRequest(f"<lora:{name}>: unknown LoRA; this server has: {', '.join(available) or 'none'} "
                                 "(GET /sdapi/v1/loras)")
            try:
                w = float(weight) if weight else 1.0
            except ValueError:
                raise BadRequest(f"<lora:{name}:{weight}>: the weight must be a number") from None
            out.append((available[name], w))
        if not self.can_merge:
            raise BadRequest("<lora:...> tags: this fastsd build cannot apply LoRAs yet (no fastsd.lora); "
                             "remove the tags")
        return tuple(out)

    def apply(self, pipe, loras: tuple[tuple[str, float], ...]) -> None:
        """Make `pipe` carry exactly `loras` (on the worker thread, between jobs)."""
        if self._merged.get(id(pipe), ()) == loras:
            return
        if self._merged.get(id(pipe)):
            pipe.unload_loras()
        self._merged[id(pipe)] = ()
        from fastsd import CheckpointError

        path = None
        try:
            for path, weight in loras:
                pipe.load_lora(path, weight)
        except (CheckpointError, ValueError, OSError) as e:  # a bad LoRA file: named by its file, not the folder
            pipe.unload_loras()
            raise BadRequest(str(e).replace(path, os.path.basename(path)).splitlines()[0]) from None
        except BaseException:  # anything else: the model goes back to no LoRA at all, the error goes on
            pipe.unload_loras()
            raise
        self._merged[id(pipe)] = loras

    # ---- embeddings ------------------------------------------------------------------------------------

    def load_embeddings(self, pipes) -> dict[str, bool]:
        """Load --embeddings-dir into each pipeline (at start). {name: loaded}; nothing is loaded when this
        fastsd has no textual-inversion support (Pipeline.load_embeddings)."""
        names = self.embeddings()
        loaded: set[str] = set()
        if self.embeddings_dir and names:
            for pipe in pipes:
                if hasattr(pipe, "load_embeddings"):
                    loaded.update(pipe.load_embeddings(self.embeddings_dir))
        self.loaded_embeddings = {n: n in loaded for n in names}
        return self.loaded_embeddings

    def embedding_notes(self, *prompts: str) -> list[str]:
        """A line for each embedding a prompt names that could not be loaded (its word goes to CLIP as text)."""
        words = set(re.findall(r"[\w\-.]+", " ".join(prompts)))
        return [f"embedding {n!r}: not loaded (this fastsd has no textual-inversion support); used as plain text"
                for n, ok in self.loaded_embeddings.items() if not ok and n in words]
