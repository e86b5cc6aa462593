"""Load-to-first-image cost of the openvino backend: what the first image pays for conversion (cold
cache) or for reading and compiling the cached IR (warm cache), beyond the same generation once compiled.

    python -m fastsd.benchmarks.openvino_start --model random:sd15 --res 512 --dtype bf16 [--steps 2]

Runs in this process with the cache as it is ($FASTSD_CACHE_DIR or ~/.cache/fastsd/openvino): the first
run on an empty cache measures the conversion, a second run the warm start. Prints one JSON line:
cache "warm" (every entry this generation needs was there) or "cold", load_s (load_pipeline), first_s
and second_s (the same generate call twice) and overhead_s = first_s - second_s.
"""
from __future__ import annotations

import json
import time

from .common import check_model_and_res
from fastsd.cli import ArgumentParser, positive_int, thread_count


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m fastsd.benchmarks.openvino_start", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the CPU's default)")
    ap.add_argument("--steps", type=positive_int, default=2)
    ap.add_argument("--threads", type=thread_count, default=None)
    a = ap.parse_args(argv)
    check_model_and_res(ap, a.model, a.res)
    import torch

    import fastsd
    from fastsd.backends import openvino as ovb
    from fastsd.benchmarks import common

    if a.threads:
        torch.set_num_threads(a.threads)
    root = ovb.cache_root()
    before = {p.name for p in root.iterdir()} if root.is_dir() else set()
    converted = []
    real_convert = ovb.convert
    ovb.convert = lambda graph, example: converted.append(type(graph).__name__) or real_convert(graph, example)
    t0 = time.perf_counter()
    pipe = fastsd.load_pipeline(a.model, dtype=a.dtype, backend="openvino")
    load_s = time.perf_counter() - t0
    kw = dict(steps=a.steps, seed=1, width=a.res, height=a.res, progress=False)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        pipe.generate("a photo of an astronaut riding a horse", **kw)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"model": a.model, "res": a.res, "steps": a.steps, "dtype": str(pipe.dtype)[6:],
                      "threads": torch.get_num_threads(), "cache": "cold" if converted else "warm",
                      "converted": converted, "entries_before": len(before), "load_s": round(load_s, 2),
                      "first_s": round(times[0], 2), "second_s": round(times[1], 2),
                      "overhead_s": round(times[0] - times[1], 2), "precision": ovb.precision(pipe.dtype),
                      "isa": common.isa_fields()["isa"], "openvino": ovb.version(), "cpu": common.cpu_model(),
                      "git_commit": common.git_commit(), "timestamp": common.timestamp()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
