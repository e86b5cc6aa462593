"""Which of torch / triton was faster, per op and shape, as measured by the kernels benchmark suite on a GPU
(issue #14 item 10: backend `auto` on CUDA follows measurements).

File (JSON), one per GPU arch, written by `python -m fastsd.benchmarks run --suite kernels --device cuda
--backend torch,triton` (benchmarks/suites.py calls `record`), default path
`$FASTSD_KERNEL_VERDICTS`, else `<cache>/kernel-verdicts-sm<arch>.json` with <cache> = `$FASTSD_CACHE_DIR`, else
`$XDG_CACHE_HOME/fastsd`, else `~/.cache/fastsd`:

    {"format": "fastsd-kernel-verdicts/1",
     "arch": 90, "device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "triton": "3.x",
     "verdicts": {"attention": {"fp16 B2 H8 Lq4096 Lk4096 D40": {"winner": "triton", "torch_s": 1.9e-4,
                                                                "triton_s": 1.5e-4, "updated": "2026-..."}},
                  "group_norm": {...}, "cfg_step": {...}}}

Keys are `dispatch.shape_key(op, ...)`. `prefer_triton(op, key)` -> True (triton won), False (torch won), None (no
verdict: auto takes triton where the kernel supports the inputs). A file for another arch than the device's is
ignored (no verdict).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

FORMAT = "fastsd-kernel-verdicts/1"


def default_path(arch: int | None) -> Path:
    if os.environ.get("FASTSD_KERNEL_VERDICTS"):
        return Path(os.environ["FASTSD_KERNEL_VERDICTS"])
    if os.environ.get("FASTSD_CACHE_DIR"):
        base = Path(os.environ["FASTSD_CACHE_DIR"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastsd"
    return base / f"kernel-verdicts-sm{arch if arch is not None else 'none'}.json"


_CACHE: dict[str, tuple[float, dict]] = {}


def load(path: str | os.PathLike) -> dict:
    """The file's content (re-read when its mtime changes); {} when missing or not this format."""
    p = str(path)
    try:
        mtime = os.stat(p).st_mtime
    except OSError:
        return {}
    hit = _CACHE.get(p)
    if hit and hit[0] == mtime:
        return hit[1]
    try:
        with open(p) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        data = {}
    _CACHE[p] = (mtime, data)
    return data


def prefer_triton(op: str, shape_key: str, path: str | os.PathLike | None = None, *, arch: int | None = None) -> bool | None:
    """True / False where the verdict file says triton / torch was faster for (op, shape_key); None without a
    verdict. `arch` (the device's, e.g. 90) must match the file's when both are known."""
    data = load(path if path is not None else default_path(arch))
    if not data or (arch is not None and data.get("arch") not in (None, arch)):
        return None
    v = data.get("verdicts", {}).get(op, {}).get(shape_key)
    if not isinstance(v, dict) or v.get("winner") not in ("torch", "triton"):
        return None
    return v["winner"] == "triton"


def winner(torch_s: float | None, triton_s: float | None) -> str | None:
    if not torch_s or not triton_s:
        return None
    return "triton" if triton_s < torch_s else "torch"


def record(entries: list[dict], *, arch: int | None, device: str = "", path: str | os.PathLike | None = None,
           versions: dict | None = None) -> Path:
    """Merge measured entries {op, shape_key, torch_s, triton_s} into the verdict file (atomic write); entries
    missing either time are skipped. Returns the path."""
    p = Path(path) if path is not None else default_path(arch)
    data = dict(load(p)) or {"format": FORMAT, "verdicts": {}}
    data.update(format=FORMAT, arch=arch, device=device, **(versions or {}))
    verdicts = data.setdefault("verdicts", {})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for e in entries:
        w = winner(e.get("torch_s"), e.get("triton_s"))
        if w is None:
            continue
        verdicts.setdefault(e["op"], {})[e["shape_key"]] = {"winner": w, "torch_s": e["torch_s"],
                                                           "triton_s": e["triton_s"], "updated": stamp}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, p)
    return p


def entries_from_rows(rows: list[dict]) -> list[dict]:
    """Pair the kernels suite's torch and triton rows (same op and shape_key, status ok) into entries."""
    by = {}
    for r in rows:
        if r.get("status", "ok") != "ok" or not r.get("shape_key") or not r.get("time_s"):
            continue
        by.setdefault((r["op"], r["shape_key"]), {})[r["backend"]] = r["time_s"]
    return [{"op": op, "shape_key": key, "torch_s": t.get("torch"), "triton_s": t.get("triton")}
            for (op, key), t in by.items()]
