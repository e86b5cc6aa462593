"""Fuzzing the .safetensors reader: thousands of structured random headers (valid ones, then mutated:
wrong JSON types, missing/extra keys, bad shapes and offsets, overlaps, holes, truncation, deep nesting,
bad lengths). Every failure must be a CheckpointError (one line for the user), never another exception;
whatever the reader accepts, the safetensors library reads identically."""
import json
import random
import struct

import pytest
import torch
from safetensors import safe_open

from fastsd.tensorfile import SAFETENSORS_DTYPES, CheckpointError, read_safetensors

DTYPES = list(SAFETENSORS_DTYPES)
CASES = 3000


def _valid(rng: random.Random):
    """(header dict, data bytes) of a well-formed file with 0-4 tensors."""
    header, data = {}, b""
    for i in range(rng.randint(0, 4)):
        dt = rng.choice(DTYPES)
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=SAFETENSORS_DTYPES[dt]).element_size()
        header[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
        data += bytes(rng.getrandbits(8) for _ in range(nbytes))
    if rng.random() < 0.3:
        header["__metadata__"] = {"format": "pt"}
    return header, data


def _mutate(rng: random.Random, header: dict, data: bytes):
    """A random corruption: returns (header object or raw bytes, data bytes, length override or None)."""
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(14)
    h = json.loads(json.dumps(header))
    if kind == 0:
        return rng.choice([[], 3, "x", None, True, [h]]), data, None
    if kind == 1 and names:
        h[rng.choice(names)] = rng.choice([[], 5, "F32", None, {"dtype": "F32"}])
    elif kind == 2 and names:
        h[rng.choice(names)].pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == 3 and names:
        h[rng.choice(names)]["extra"] = 1
    elif kind == 4 and names:
        h[rng.choice(names)]["shape"] = rng.choice(["3", [-1], [1.5], [True], [2 ** 70], None, [[1]]])
    elif kind == 5 and names:
        h[rng.choice(names)]["data_offsets"] = rng.choice([[0], [5, 1], [-1, 3], [0, 2 ** 70], "0,4", [0, 1, 2],
                                                          [0.0, 4.0], None])
    elif kind == 6 and names:
        h[rng.choice(names)]["dtype"] = rng.choice(["F8_E4M3", "f32", 32, None, ["F32"]])
    elif kind == 7 and len(names) >= 2:  # overlap: the second tensor starts inside the first
        a, b = rng.sample(names, 2)
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (h[b]["data_offsets"][1]
                                                                                   - h[b]["data_offsets"][0])]
    elif kind == 8:
        return h, data + b"\0" * rng.randint(1, 9), None  # a hole at the end
    elif kind == 9 and data:
        return h, data[:rng.randrange(len(data))], None  # truncated
    elif kind == 10:
        depth = rng.choice([100, 5000, 200000])
        return ("[" * depth + "]" * depth).encode(), data, None
    elif kind == 11:
        return b"\xff\xfe{not utf8", data, None
    elif kind == 12:
        raw = json.dumps(h).encode()
        return raw, data, rng.choice([0, 1, len(raw) + 10 ** 6, 2 ** 63, len(raw) - 1])
    else:
        h["__metadata__"] = rng.choice([[], {"a": 1}, "x"])
    return h, data, None


def _write(path, header, data: bytes, length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _read_all(path):
    refs = read_safetensors(str(path))
    return {k: r.load() for k, r in refs.items()}


@pytest.mark.parametrize("seed", range(3))
def test_reader_fails_only_with_checkpoint_error(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "f.safetensors"
    accepted = refused = 0
    for case in range(CASES // 3):
        header, data = _valid(rng)
        mutated = case % 4 != 0  # one in four stays valid
        h, d, length = _mutate(rng, header, data) if mutated else (header, data, None)
        _write(path, h, d, length)
        try:
            got = _read_all(path)
        except CheckpointError as e:
            refused += 1
            assert "\n" not in str(e) and str(path) in str(e)
            assert mutated, f"a valid file was refused: {e}"
            continue
        accepted += 1
        with safe_open(str(path), framework="pt") as f:  # the library agrees with what we accepted
            assert sorted(f.keys()) == sorted(got)
            for k in got:  # bit for bit (NaN payloads included)
                a, b = f.get_tensor(k), got[k]
                assert a.dtype == b.dtype and a.shape == b.shape, k
                assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k
    assert accepted > 150 and refused > 300


def test_specific_bad_headers(tmp_path):
    path = tmp_path / "x.safetensors"
    cases = {
        "header is a JSON list": ([], b""),
        "is not {dtype, shape, data_offsets}": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
        "nested too deeply": (("[" * 100000 + "]" * 100000).encode(), b""),
        "bytes for shape": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        "overlap or hole": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                             "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6),
        "truncated": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    }
    for match, (header, data) in cases.items():
        _write(path, header, data)
        with pytest.raises(CheckpointError, match=match):
            read_safetensors(str(path))
