"""Textual-inversion embeddings, used the A1111 way: a prompt word equal to an embedding file's name (its
stem) stands for the embedding's vectors.

Files: A1111's `.pt` (`string_to_param: {"*": (n, 768)}`, read with torch.load(weights_only=True)), its
`.safetensors` (`emb_params`), and diffusers' `learned_embeds.bin` / `.safetensors` (`{token: (768,) or
(n, 768)}`; named by their folder, as the name learned_embeds says nothing). A folder is searched recursively; files are indexed by name at once but read only when a
prompt uses them, so a broken file that no prompt names costs nothing, and one that a prompt names is a
one-line CheckpointError (wrong width, SDXL's clip_l/clip_g, NaN or absurdly large values, not an embedding).

Matching is A1111's: on token ids. The name is tokenized like the prompt; where a prompt piece's ids
continue with a name's ids (the longest name first) the embedding takes that place, n vectors in n token
slots (fastsd/tokenizer.py `encode_with_embeddings`), and fastsd/conditioning.py puts the vectors in place
of those token embeddings (the model's weights are never touched).

A LoRA file may bundle embeddings (A1111's `bundle_emb.NAME.*` keys, read by fastsd.lora): while that LoRA is loaded
they are used as files are, under NAME (`Embeddings.set_bundled`), a file of the same name winning as in A1111.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsd.file_hashes import sha256
from fastsd.tensorfile import CheckpointError, read_safetensors, torch_load
from fastsd.tokenizer import CHUNK_LENGTH

EXTS = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # (n, D) float32
    path: str
    hash: str  # the infotext's "TI hashes": A1111's short hash, sha256[:12] of the file; a bundled one's LoRA name


class OtherWidth(CheckpointError):
    """An embedding that reads as (vectors, D) with D not the text encoder's width (an SD2 one for SD1: what A1111
    loads and lists as skipped); `shape` is (vectors, D)."""

    def __init__(self, message: str, shape: tuple[int, int]):
        super().__init__(message)
        self.shape = shape


def read_embedding(path: str, name: str, width: int) -> Embedding:
    """One embedding file -> Embedding, checked against the text encoder's `width`."""
    if path.lower().endswith(".safetensors"):
        data = {k: ref.load() for k, ref in read_safetensors(path).items()}
    else:
        data = torch_load(path)
    return Embedding(name, embedding_vectors(data, path, width), path, sha256(path)[:12])


def embedding_vectors(data, where: str, width: int) -> torch.Tensor:
    """The (vectors, `width`) float32 tensor of what an embedding file holds (a LoRA's bundled embedding too:
    fastsd.lora), checked; CheckpointError starting with `where` (the file) otherwise."""
    vec = _vectors(data, where)
    if vec.ndim == 1:
        vec = vec[None]
    if vec.ndim != 2 or vec.shape[0] == 0:
        raise CheckpointError(f"{where}: an embedding of shape {tuple(vec.shape)}; expected (vectors, {width})")
    if vec.shape[1] != width:
        hint = " (a Stable Diffusion 2.x embedding)" if vec.shape[1] == 1024 else ""
        raise OtherWidth(f"{where}: an embedding of width {vec.shape[1]}{hint}; this model's text encoder takes "
                         f"{width}", tuple(vec.shape))
    if vec.shape[0] > CHUNK_LENGTH:
        raise CheckpointError(f"{where}: {vec.shape[0]} vectors; an embedding must fit in one {CHUNK_LENGTH}-token "
                              "chunk")
    _check_values(vec, where)
    return vec.detach().float().contiguous()


# The largest |value| taken in an embedding. A textual inversion is trained in place of token embeddings,
# which the text encoder adds to its position embeddings and normalizes (LayerNorm squares them), so real
# ones are of the token embeddings' own size; values this far beyond that are a broken or non-embedding
# file, and much larger ones overflow the text encoding (the prompt would fail with an error that blames
# something else, or make a black image). The bound is generous on purpose: it only refuses nonsense.
MAX_VALUE = 1e4


def _check_values(vec: torch.Tensor, path: str) -> None:
    """CheckpointError naming the file when the vectors are not finite real numbers of a sane size."""
    if vec.is_complex():
        raise CheckpointError(f"{path}: an embedding of complex numbers ({vec.dtype}); expected real vectors")
    values = vec.detach().to(torch.float64)
    if not torch.isfinite(values).all():
        raise CheckpointError(f"{path}: an embedding with NaN or infinite values (a broken file)")
    biggest = values.abs().max().item()
    if biggest > MAX_VALUE:
        raise CheckpointError(f"{path}: an embedding with values as large as {biggest:.3g}; token embeddings are "
                              f"far smaller (at most {MAX_VALUE:g} is taken): a broken or non-embedding file")


def _vectors(data, path: str) -> torch.Tensor:
    """The (n, D) tensor of an A1111, A1111-safetensors or diffusers embedding file."""
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path}: not a textual-inversion embedding (holds a {type(data).__name__})")
    if "string_to_param" in data:  # A1111 .pt: {"string_to_param": {"*": tensor}, "name": ..., "step": ...}
        params = data["string_to_param"]
        tensors = list(params.values()) if isinstance(params, dict) else []
        if len(tensors) != 1 or not isinstance(tensors[0], torch.Tensor):
            raise CheckpointError(f"{path}: string_to_param holds {len(tensors)} entries; an embedding has one")
        return tensors[0]
    if "emb_params" in data:  # A1111 .safetensors
        if not isinstance(data["emb_params"], torch.Tensor):
            raise CheckpointError(f"{path}: emb_params holds a {type(data['emb_params']).__name__}; an embedding "
                                  "holds a tensor there")
        return data["emb_params"]
    if "clip_g" in data:  # (a lone clip_l is one tensor, as A1111 reads it: OneTrainer's SD1 bundles hold that)
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l / clip_g); fastsd runs Stable Diffusion 1.x")
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(data) == 1 and len(tensors) == 1:  # diffusers: {token: tensor}
        return tensors[0]
    raise CheckpointError(f"{path}: not a textual-inversion embedding (no string_to_param or emb_params; keys "
                          f"{', '.join(list(map(str, data))[:5])})")


def _is_text(name: str) -> bool:
    """Whether a name is Unicode text (not a file name's undecodable bytes, which Python holds as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name(path: str) -> str:
    """The prompt word of an embedding file: its stem (A1111), or for diffusers' learned_embeds.* (a concept
    folder such as sd-concepts-library/cat-toy) its folder's name."""
    p = Path(path)
    return p.parent.name if p.stem == "learned_embeds" and p.parent.name else p.stem


class Embeddings:
    """The embeddings a pipeline's prompts may name: files indexed by name, read on first use, and the embeddings
    its loaded LoRAs bundle (`set_bundled`)."""

    def __init__(self, tokenizer, width: int):
        self.tokenizer, self.width = tokenizer, width
        self.files: dict[str, str] = {}  # name -> path
        self.bundled: dict[str, Embedding] = {}  # name -> a loaded LoRA's bundled embedding (fastsd.lora)
        self._loaded: dict[str, Embedding] = {}
        self._lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}  # first id -> [(ids, name)], longest first

    def add(self, path: str) -> list[str]:
        """Index a folder (recursively; empty files skipped, as A1111) or one file; a name indexed before is
        replaced. Returns the names added."""
        if os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in EXTS and p.is_file()
                           and p.stat().st_size > 0)
        elif os.path.isfile(path):
            found = [path]
        else:
            raise CheckpointError(f"{path}: no such file or folder")
        unusable = [p for p in found if not _is_text(_name(p))]  # (bytes that are not UTF-8: no prompt writes them)
        if unusable:
            warnings.warn(f"embeddings whose file names are not UTF-8 text, which no prompt can name, skipped: "
                          f"{', '.join(repr(p) for p in unusable[:3])}" + (" ..." if len(unusable) > 3 else ""),
                          stacklevel=2)
            found = [p for p in found if p not in unusable]
        names = [_name(p) for p in found]
        added: set[str] = set()
        for name, p, ids in zip(names, found, self.tokenizer.encode_batch(names)):
            if not ids or name in added:  # of two files with one name, the first in sorted order (as fastsd.serve)
                continue
            added.add(name)
            self.files[name] = p
            self._loaded.pop(name, None)
            self._index(name, ids, True)
        return sorted(added)

    def set_bundled(self, embeddings: list[Embedding]) -> None:
        """Make `embeddings` (those the loaded LoRAs bundle, in load order) the bundled ones. As A1111: a name that
        is a file's stays the file's (its embeddings folder wins; `find`: unless the file can't be used), and of two
        LoRAs bundling one name the first loaded wins."""
        bundled: dict[str, Embedding] = {}
        for e in embeddings:
            bundled.setdefault(e.name, e)
        old, self.bundled = self.bundled, bundled  # (whole: the server lists them from another thread)
        names = sorted((set(old) | set(self.bundled)) - set(self.files))
        for name, ids in zip(names, self.tokenizer.encode_batch(names)):
            if ids:
                self._index(name, ids, name in self.bundled)

    def forget_files(self) -> None:
        """Forget the files indexed (to index a folder anew); the bundled embeddings stay."""
        self.files, self._loaded, self._lookup = {}, {}, {}
        bundled, self.bundled = list(self.bundled.values()), {}
        self.set_bundled(bundled)

    def _index(self, name: str, ids: list[int], present: bool) -> None:
        """Put `name` (whose tokens are `ids`) in the lookup, or take it out."""
        rest = [e for e in self._lookup.get(ids[0], []) if e[1] != name]
        entries = rest + [(tuple(ids), name)] if present else rest
        self._lookup[ids[0]] = sorted(entries, key=lambda e: len(e[0]), reverse=True)

    def get(self, name: str) -> Embedding:
        if name not in self.files:
            return self.bundled[name]
        if name not in self._loaded:
            self._loaded[name] = read_embedding(self.files[name], name, self.width)
        return self._loaded[name]

    def find(self, ids: list[int], pos: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's ids start at ids[pos] (the longest), and how many ids it covers."""
        for name_ids, name in self._lookup.get(ids[pos], ()):
            if tuple(ids[pos:pos + len(name_ids)]) == name_ids:
                try:
                    return self.get(name), len(name_ids)
                except CheckpointError:
                    if name not in self.bundled:  # (A1111: a file it could not load leaves the name to a LoRA's)
                        raise
                    return self.bundled[name], len(name_ids)
        return None

    def used(self, texts: list[str]) -> list[Embedding]:
        """The embeddings these prompts use (as encoding them would), in order of first use."""
        seen: dict[str, Embedding] = {}
        for text in texts:
            for _, _, emb, _ in self.tokenizer.encode_with_embeddings(text, self)[2]:
                seen.setdefault(emb.name, emb)
        return list(seen.values())

    def infotext(self, texts: list[str]) -> str | None:
        """A1111's "TI hashes" value: "name: hash, name: hash" (':' and ',' taken out of names), or None."""
        used = self.used(texts)
        return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.hash}" for e in used) or None


def pipeline_embeddings(pipe) -> Embeddings:
    """pipe.embeddings, made (empty) first when the pipeline has none."""
    if pipe.embeddings is None:
        pipe.embeddings = Embeddings(pipe.tokenizer, pipe.config.clip.hidden_size)
    return pipe.embeddings
