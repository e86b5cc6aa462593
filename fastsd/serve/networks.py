"""LoRAs and textual-inversion embeddings, chosen by name from the folders the server was started with
(`--lora-dir`, `--embeddings-dir`). A name is a file's stem (for a LoRA also its A1111 alias, kohya's
ss_output_name: fastsd.lora.lora_by_name); a name with a path in it (`../x`, `/etc/x`, `a/b`) is refused, and only
files found in the folder can be named.

Tags and names follow fastsd.lora (the CLI's and the batch runner's grammar). LoRAs are applied through
`Pipeline.load_lora` / `unload_loras`; the set merged stays until a job asks for another (or one of its files is
replaced on disk), so repeated requests with the same LoRAs merge once.
"""
from __future__ import annotations

import os
import re

from fastsd.embeddings import OtherWidth
from fastsd.files import files_by_stem
from fastsd.lora import lora_by_name, list_loras, parse_prompt, weight_text
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
        self._merged: dict[int, tuple] = {}  # id(pipe) -> the (path, weight, file identity) tuple merged into it
        self._embeddings: dict[int, tuple[dict, dict[str, str]]] = {}  # id(pipe) -> (usable, skipped): load_embeddings
        self._empty: list[str] = []  # names of empty embedding files

    def loras(self) -> dict[str, str]:
        return list_loras(self.lora_dir) if self.lora_dir else {}

    def embeddings(self) -> dict[str, str]:
        return files_by_stem(self.embeddings_dir, EMBEDDING_EXTS)

    def parse(self, prompt: str) -> tuple[tuple[str, float, str], ...]:
        """The LoRAs a prompt's <lora:NAME:WEIGHT> tags ask for, checked against --lora-dir: ((path, weight, NAME),
        ...)."""
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
            try:
                path = lora_by_name(name, available)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            if path is None:
                raise BadRequest(f"<lora:{name}>: unknown LoRA; this server has: {', '.join(available) or 'none'} "
                                 "(GET /sdapi/v1/loras)")
            out.append((path, w, name))
        return tuple(out)

    def apply(self, pipe, loras: tuple[tuple[str, float, str], ...]) -> None:
        """Make `pipe` carry exactly `loras` ((path, weight, name): `parse`'s) on the worker thread, between jobs. A
        file replaced since it was merged (A1111 looks at the modification time) is read again."""
        want = tuple((*item, file_identity(item[0])) for item in loras)
        if self._merged.get(id(pipe), ()) == want:
            return
        if self._merged.get(id(pipe)):
            pipe.unload_loras()
        self._merged[id(pipe)] = ()
        from fastsd import CheckpointError

        try:
            pipe.load_loras(loras)
        except (CheckpointError, ValueError, OSError) as e:  # a bad LoRA file: named by its file, not the folder
            pipe.unload_loras()
            raise BadRequest(file_names(str(e), [item[0] for item in loras])) from None
        except BaseException:  # anything else: the model goes back to no LoRA at all, the error goes on
            pipe.unload_loras()
            raise
        self._merged[id(pipe)] = want

    # ---- embeddings ------------------------------------------------------------------------------------

    def load_embeddings(self, pipes) -> dict[str, str]:
        """Index --embeddings-dir into each pipeline and read every file now (A1111 reads them at start), so the
        list tells what a prompt can use with each model. Returns {name: why} of the files some model can't use
        (empty, unreadable, another text encoder's width)."""
        self._empty = [n for n, p in self.embeddings().items() if os.path.getsize(p) == 0]  # not indexed (A1111)
        skipped_any = {}
        for pipe in pipes:
            usable, skipped, wide = {}, {n: "an empty file" for n in self._empty}, {}
            for name in pipe.load_embeddings(self.embeddings_dir) if self.embeddings_dir else ():
                try:
                    usable[name] = pipe.embeddings.get(name)  # kept by the pipeline: not read again
                except Exception as e:  # whatever a file does to the reader, that file is skipped
                    skipped[name] = file_names(str(e) or type(e).__name__, [pipe.embeddings.files[name]])
                    if isinstance(e, OtherWidth):
                        wide[name] = e.shape
            self._embeddings[id(pipe)] = usable, skipped, wide
            skipped_any |= skipped
        return skipped_any

    def embedding_list(self, pipe) -> tuple[dict, dict[str, tuple[int, int]]]:
        """({name: Embedding} usable with `pipe`, {name: (vectors, width)} of those read but of another width than
        its text encoder's: A1111's skipped embeddings; the other files that can't be used are only logged)."""
        return self._embeddings.get(id(pipe), ({}, {}, {}))[::2]

    def check_embeddings(self, pipe, *prompts: str) -> None:
        """BadRequest naming the file when the prompts name an embedding `pipe` can't use (found as the pipeline
        finds them, with the LoRAs merged now: their bundled embeddings take a name an unusable file has)."""
        from fastsd import CheckpointError

        if pipe.embeddings is not None:
            try:
                pipe.embeddings.used(list(prompts))
            except (CheckpointError, OSError, ValueError) as e:
                raise BadRequest(file_names(str(e), pipe.embeddings.files.values())) from None

    def empty_embeddings(self, *prompts: str) -> list[str]:
        """A warning line for each empty embedding file the prompts name (its word goes to CLIP as plain text)."""
        words = set(re.findall(r"[\w\-.]+", " ".join(prompts)))
        return [f"embedding {n!r}: not loaded (an empty file); used as plain text" for n in self._empty if n in words]


def file_identity(path: str) -> tuple[int, int, int] | None:
    """What tells a replaced file from the one read before: (inode, size, modification time in ns); None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def file_names(message: str, paths) -> str:
    """The first line of `message`, each of `paths` in it shown by its file name (the server's folders are not)."""
    for path in paths:
        message = message.replace(path, os.path.basename(path))
    return message.splitlines()[0] if message else message
