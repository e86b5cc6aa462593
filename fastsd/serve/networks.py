"""LoRAs and textual-inversion embeddings, chosen by name from the folders the server was started with
(`--lora-dir`, `--embeddings-dir`). A name is a file's stem; a name with a path in it (`../x`, `/etc/x`,
`a/b`) is refused, and only files found in the folder can be named.

Tags and names follow fastsd.lora (the CLI's and the batch runner's grammar). LoRAs are applied through
`Pipeline.load_lora` / `unload_loras`; the set merged stays until a job asks for another, so repeated requests
with the same LoRAs merge once.
"""
from __future__ import annotations

import os
import re

from fastsd.files import files_by_stem
from fastsd.lora import list_loras, parse_prompt, weight_text
from fastsd.serve.limits import BadRequest

EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")


def check_name(name: str, what: str, option: str) -> None:
    """BadRequest unless `name` is a bare file stem (fastsd.lora's rule for LoRA names)."""
    from fastsd.lora import check_lora_name

    try:
        check_lora_name(name)
    except ValueError:
        raise BadRequest(f"{what} name {name!r} refused: {what}s are chosen by name from {option}, "
                         "not by path") from None


class Networks:
    def __init__(self, lora_dir: str | None, embeddings_dir: str | None, base: list[tuple[str, object]] = ()):
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.base = dict(base)  # name -> weight of the LoRAs merged for good at start (serve --lora)
        self._merged: dict[int, tuple] = {}  # id(pipe) -> the (path, weight) tuple merged into it
        self.loaded_embeddings: dict[str, bool] = {}

    def loras(self) -> dict[str, str]:
        return list_loras(self.lora_dir) if self.lora_dir else {}

    def embeddings(self) -> dict[str, str]:
        return files_by_stem(self.embeddings_dir, EMBEDDING_EXTS)

    def parse(self, prompt: str) -> tuple[tuple[str, float], ...]:
        """The LoRAs a prompt's <lora:NAME:WEIGHT> tags ask for, checked against --lora-dir: ((path, weight), ...)."""
        try:
            tags = parse_prompt(prompt)[1]
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if not tags:
            return ()
        available = self.loras()
        out = []
        for name, w in tags:
            if name in self.base:  # merged for good at start: a tag at its weight asks for nothing more
                if self.base[name] != w:
                    raise BadRequest(f"<lora:{name}:{weight_text(w)}>: {name} is merged into this server's models "
                                     f"for good at weight {weight_text(self.base[name])} (--lora); tag it at that "
                                     "weight or leave the tag out")
                continue
            check_name(name, "LoRA", "--lora-dir")
            if not self.lora_dir:
                raise BadRequest(f"<lora:{name}>: this server has no LoRA folder (start it with --lora-dir DIR)")
            if name not in available:
                raise BadRequest(f"<lora:{name}>: unknown LoRA; this server has: {', '.join(available) or 'none'} "
                                 "(GET /sdapi/v1/loras)")
            out.append((available[name], w))
        return tuple(out)

    def apply(self, pipe, loras: tuple[tuple[str, float], ...]) -> None:
        """Make `pipe` carry exactly `loras` (on the worker thread, between jobs)."""
        if self._merged.get(id(pipe), ()) == loras:
            return
        if self._merged.get(id(pipe)):
            pipe.unload_loras()
        self._merged[id(pipe)] = ()
        from fastsd import CheckpointError

        try:
            pipe.load_loras(loras)
        except (CheckpointError, ValueError, OSError) as e:  # a bad LoRA file: named by its file, not the folder
            pipe.unload_loras()
            msg = str(e)
            for path, _ in loras:
                msg = msg.replace(path, os.path.basename(path))
            raise BadRequest(msg.splitlines()[0]) from None
        except BaseException:  # anything else: the model goes back to no LoRA at all, the error goes on
            pipe.unload_loras()
            raise
        self._merged[id(pipe)] = loras

    # ---- embeddings ------------------------------------------------------------------------------------

    def load_embeddings(self, pipes) -> dict[str, bool]:
        """Load --embeddings-dir into each pipeline (at start; files are read when a prompt first names them).
        {name: loaded}: a file Pipeline.load_embeddings skips (empty) is listed as not loaded."""
        names = self.embeddings()
        loaded: set[str] = set()
        if self.embeddings_dir and names:
            for pipe in pipes:
                loaded.update(pipe.load_embeddings(self.embeddings_dir))
        self.loaded_embeddings = {n: n in loaded for n in names}
        return self.loaded_embeddings

    def embedding_notes(self, *prompts: str) -> list[str]:
        """A line for each embedding a prompt names that could not be loaded (its word goes to CLIP as text)."""
        words = set(re.findall(r"[\w\-.]+", " ".join(prompts)))
        return [f"embedding {n!r}: not loaded (an empty file); used as plain text"
                for n, ok in self.loaded_embeddings.items() if not ok and n in words]
