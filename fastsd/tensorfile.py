"""Lazy tensor files: read a checkpoint's names and shapes first, then one tensor at a time.

`.safetensors` is read with plain file reads at the header's offsets (no mmap), straight into the
tensor's own buffer, so loading holds the final model plus one tensor at most. `.ckpt`/`.pt`/`.bin`
go through `torch.load(weights_only=True)` only, which refuses pickles that would run code.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Callable

import torch


class CheckpointError(Exception):
    """A checkpoint or model folder that can't be loaded; the message is one line, meant for users."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorRef:
    """A tensor not read yet: its shape, and how to read it."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> "TensorRef":
        """The same tensor with `fn` applied when it is read (e.g. a reshape); `shape` is the result's shape."""
        return TensorRef(shape, lambda: fn(self.load()))


def read_safetensors(path: str) -> dict[str, TensorRef]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {n} past the file's end)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (header is not JSON: {e})") from None
    header.pop("__metadata__", None)
    base = 8 + n
    refs = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which fastsd does not read")
        if base + end > size:
            raise CheckpointError(f"{path}: file is truncated ({size} bytes; tensor {name} ends at byte {base + end})")
        refs[name] = TensorRef(tuple(info["shape"]), _safetensors_reader(path, base + start, end - start,
                                                                         dtype, tuple(info["shape"])))
    return refs


def _safetensors_reader(path: str, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
    def load() -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(buf.numpy())) != nbytes:
                raise CheckpointError(f"{path}: file is truncated")
        return buf.view(dtype).reshape(shape)

    return load


def read_pickle_checkpoint(path: str) -> dict[str, TensorRef]:
    """A torch pickle (.ckpt, .pt, .bin), loaded with weights_only=True: code in the pickle is never run."""
    try:
        mmap_ok = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format can't be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load: the pickle asks for more than tensors ({first}); "
                              "fastsd only loads checkpoints with torch.load(weights_only=True) — "
                              "convert it to .safetensors from a source you trust") from None
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    return {k: TensorRef(tuple(v.shape), (lambda v=v: v)) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_tensor_file(path: str) -> dict[str, TensorRef]:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        return read_pickle_checkpoint(path)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, .ckpt, .pt, .pth or .bin)")
