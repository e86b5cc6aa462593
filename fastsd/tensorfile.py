"""Lazy tensor files: read a checkpoint's names and shapes first, then one tensor at a time.

`.safetensors` is read with plain file reads at the header's offsets (no mmap), straight into the
tensor's own buffer, so loading holds the final model plus one tensor at most. `.ckpt`/`.pt`/`.bin`
go through `torch.load(weights_only=True)` only, which refuses pickles that would run code (the few globals
old training files name, Lightning's ModelCheckpoint and numpy scalars, unpickle to inert stand-ins).
"""
from __future__ import annotations

import json
import os
import pickle
import stat
import struct
import threading
import zipfile
from dataclasses import dataclass
from typing import Callable

import torch


class CheckpointError(Exception):
    """A checkpoint or model folder that can't be loaded; the message is one line, meant for users (line breaks
    that come from a file, e.g. in a tensor name, are shown escaped as \\n)."""

    def __init__(self, message="", *args):
        if isinstance(message, str):
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message, *args)


def shown(name: object) -> str:
    """A tensor name (or any key) as a message shows it: as it is when printable, else repr (line breaks,
    control and bidi characters escaped), so a name from a file can't break the one-line message."""
    return name if isinstance(name, str) and name.isprintable() else repr(name)


# What os.stat says a path is, for "not a regular file (a FIFO)"
_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path) -> int:
    """The size of `path` after checking it is a regular file (symlinks followed), before it is opened: a FIFO
    or a device would block or never end. CheckpointError naming the path and what it is otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise CheckpointError(f"{path}: " + ("a broken symbolic link" if broken else "no such file or folder")) from None
    except OSError as e:
        import errno

        why = "a symbolic link loop" if e.errno == errno.ELOOP else (e.strerror or type(e).__name__)
        raise CheckpointError(f"{path}: cannot be read ({why})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
        if kind == "a folder":
            raise CheckpointError(f"{path}: a folder, not a file")
        raise CheckpointError(f"{path}: not a regular file ({kind})")
    return st.st_size


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
    dtype: torch.dtype | None = None  # as stored in the file (None: not known before reading)
    load_into: Callable[[torch.Tensor], None] | None = None  # fill a CPU tensor of `shape`, any dtype, from the file

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> "TensorRef":
        """The same tensor with `fn` applied when it is read (e.g. a reshape); `shape` is the result's shape."""
        return TensorRef(shape, lambda: fn(self.load()), self.dtype)


MAX_HEADER_BYTES = 100_000_000
ELEMENT_SIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in SAFETENSORS_DTYPES.values()}


def read_safetensors(path: str) -> dict[str, TensorRef]:
    """The tensors of a .safetensors file, its header checked against the format before any data is read."""
    header, base, size = read_header(path)
    entries = _check_header(path, header, size - base)
    return {name: TensorRef(shape, _safetensors_reader(path, base + start, end - start, dtype, shape), dtype,
                            _safetensors_filler(path, base + start, end - start, dtype))
            for name, (dtype, shape, start, end) in entries.items()}


def safetensors_metadata(path: str) -> dict[str, str]:
    """The header's `__metadata__` (string -> string; {} when there is none)."""
    header = read_header(path)[0]
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def read_header(path: str) -> tuple[object, int, int]:
    """(the parsed JSON header, not checked yet; the byte offset of the tensor data; the file size)."""
    size = check_regular_file(path)
    try:
        f = open(path, "rb")
    except OSError as e:  # (no read permission)
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {n} past the file's end)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not a valid safetensors file (header is not JSON: {why})") from None
    return header, 8 + n, size


def _check_header(path: str, header, data_bytes: int) -> dict[str, tuple]:
    """{name: (dtype, shape, start, end)} after checking the header against the safetensors format: an object
    of entries {dtype, shape, data_offsets}, each tensor's bytes = elements x element size, the tensors
    covering the data block exactly (sorted by offset: no overlap, no hole, nothing past the end)."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file ({msg})")

    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map names to strings")
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {shown(name)} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise bad(f"entry {shown(name)} has a dtype that is not a string")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {shown(name)} has dtype {dtype}, which fastsd does not read")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise bad(f"entry {shown(name)} has a malformed shape or data_offsets")
        numel = 1
        for d in shape:
            numel *= d
        if numel * ELEMENT_SIZE[SAFETENSORS_DTYPES[dtype]] != offsets[1] - offsets[0]:
            raise bad(f"tensor {shown(name)}: {offsets[1] - offsets[0]} bytes for shape {tuple(shape)} of {dtype}")
        entries[name] = (SAFETENSORS_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    at = 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != at:
            raise bad(f"tensor {shown(name)} starts at byte {start} of the data, expected {at} (overlap or hole)")
        at = end
    if at > data_bytes:
        raise CheckpointError(f"{path}: file is truncated ({data_bytes} bytes of data; the tensors need {at})")
    if at != data_bytes:
        raise bad(f"{data_bytes - at} bytes of data after the last tensor")
    return entries


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _safetensors_reader(path: str, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
    def load() -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(buf.numpy())) != nbytes:
                raise CheckpointError(f"{path}: file is truncated")
        return buf.view(dtype).reshape(shape)

    return load


CHUNK_BYTES = 16 << 20  # the scratch a converting read goes through (one per thread, kept: warm memory)
_local = threading.local()


def _safetensors_filler(path: str, offset: int, nbytes: int, dtype: torch.dtype):
    """Read a tensor's bytes straight into `out` when it has the file's dtype, else a chunk at a time through one
    reused scratch buffer, converted into `out` (no full-size temporary: loading an fp16 file as bf16 writes each
    weight's memory once)."""
    def fill(out: torch.Tensor) -> None:
        if out.numel() * dtype.itemsize != nbytes or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"{path}: a tensor of {nbytes} bytes of {dtype} can't fill {tuple(out.shape)} {out.dtype}")
        with open(path, "rb") as f:
            f.seek(offset)
            if out.dtype == dtype:
                if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
                    raise CheckpointError(f"{path}: file is truncated")
                return
            scratch = getattr(_local, "scratch", None)
            if scratch is None:
                scratch = _local.scratch = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
            flat, step = out.view(-1), CHUNK_BYTES // dtype.itemsize
            for i in range(0, flat.numel(), step):
                n = min(step, flat.numel() - i) * dtype.itemsize
                if f.readinto(memoryview(scratch.numpy())[:n]) != n:
                    raise CheckpointError(f"{path}: file is truncated")
                flat[i:i + n // dtype.itemsize].copy_(scratch[:n].view(dtype))

    return fill


def torch_load(path: str):
    """A torch pickle (.ckpt, .pt, .bin) loaded with weights_only=True: code in the pickle is never run.
    What it holds (tensors, dicts, lists, numbers, strings) as it is; CheckpointError when it can't be read."""
    check_regular_file(path)
    mmap_ok = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format can't be memory-mapped
    if not mmap_ok:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # a legacy torch file starts with a pickle protocol 2+ opcode
                raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
        except pickle.UnpicklingError as first:
            sd = _load_with_stand_ins(path, mmap_ok, first)  # (a refusal too when it names another global)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln or "global" in ln.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{path}: refused to load: the pickle asks for more than tensors ({why[:200]}); "
                              "fastsd only loads checkpoints with torch.load(weights_only=True) — "
                              "convert it to .safetensors from a source you trust") from None
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    odd = _odd_tensor(sd)
    if odd is not None:
        raise CheckpointError(f"{path}: {odd}; model files hold plain tensors of real numbers")
    return sd


class StandIn:
    """What a checkpoint's allowed non-tensor global unpickles to: nothing (arguments and state dropped)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class ParameterDictStandIn(dict):
    """torch.nn.ParameterDict as its parameters, {name: Parameter}: what the original textual-inversion
    trainer's embeddings hold in `string_to_param` (its module state is dropped, never its class built)."""

    def __setstate__(self, state):
        params = state.get("_parameters") if isinstance(state, dict) else None
        self.update(params if isinstance(params, dict) else {})


# Globals that old training checkpoints name besides tensors, as A1111's safe.py and ComfyUI allow them: PyTorch
# Lightning 1.x keys its callbacks' state by the ModelCheckpoint class (sd-v1-4.ckpt, LDM's VAE checkpoints);
# trainers keep numpy scalars and arrays (global_step, scores); the original textual-inversion trainer saves a
# ParameterDict. Each unpickles to a stand-in above, never to the real class or function: nothing in the file runs.
STAND_IN_GLOBALS = {name: StandIn for name in (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType", "numpy.dtypes.Int64DType", "numpy.dtypes.Int32DType")}
STAND_IN_GLOBALS["torch.nn.modules.container.ParameterDict"] = ParameterDictStandIn
_stand_in_lock = threading.Lock()


def _stand_in_classes() -> list[type]:
    """A class per allowed global, named as the global (weights_only finds allowed globals by module and name)."""
    classes = []
    for full, base in STAND_IN_GLOBALS.items():
        module, name = full.rsplit(".", 1)
        classes.append(type(name, (base,), {"__module__": module, "__qualname__": name}))
    return classes


def _load_with_stand_ins(path: str, mmap_ok: bool, first: pickle.UnpicklingError):
    """torch.load(weights_only=True) with STAND_IN_GLOBALS allowed (torch >= 2.5; else `first`, the refusal, stands)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    if allow is None:
        raise first
    with _stand_in_lock, allow(_stand_in_classes()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)


def _odd_tensor(obj, where: str = "", depth: int = 0) -> str | None:
    """What the first tensor in a loaded pickle's dicts / lists that is not a plain (strided, real-valued, holding
    data) tensor is, with where it sits; None when there is none. weights_only pickles may hold sparse, meta,
    quantized or complex tensors, which nothing here reads."""
    if isinstance(obj, torch.Tensor):
        kind = ("a sparse" if obj.layout != torch.strided else "a meta (data-less)" if obj.is_meta else
                "a quantized" if obj.is_quantized else "a complex" if obj.is_complex() else None)
        return f"{shown(where) if where else 'it'} is {kind} tensor" if kind else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    if depth > 20:
        return None
    for k, v in items:
        odd = _odd_tensor(v, f"{where}.{k}" if where else str(k), depth + 1)
        if odd is not None:
            return odd
    return None


def read_pickle_checkpoint(path: str, wrappers: tuple[str, ...] = ("state_dict",)) -> dict[str, TensorRef]:
    """A torch pickle's state dict (the first of `wrappers` it holds is looked into), via torch_load."""
    sd = torch_load(path)
    wrapper = next((w for w in wrappers if isinstance(sd, dict) and isinstance(sd.get(w), dict)), None)
    if wrapper is not None:
        sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    inert = [k for k, v in sd.items() if isinstance(v, StandIn)]
    if inert:
        raise CheckpointError(f"{path}: {shown(inert[0])} holds a numpy value, not a tensor; model files hold tensors")
    bad_keys = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path}: not a valid state dict: tensor keys must be strings, "
                              f"not {type(bad_keys[0]).__name__} ({shown(bad_keys[0])})")
    return {k: TensorRef(tuple(v.shape), (lambda v=v: v), v.dtype) for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def read_tensor_file(path: str) -> dict[str, TensorRef]:
    check_regular_file(path)
    ext = os.path.splitext(path)[1].lower()  # (A1111 and ComfyUI compare extensions in lower case too)
    if ext == ".safetensors":
        return read_safetensors(path)
    if ext in (".ckpt", ".pt", ".pth", ".bin"):
        return read_pickle_checkpoint(path)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, .ckpt, .pt, .pth or .bin)")
