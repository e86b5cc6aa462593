"""Throughput of python -m fastsd.batch: in this process with batch 1 / 2 / 4, and on a local Ray cluster
with 1 worker x 2 CPUs and 2 workers x 1 CPU.

    python -m fastsd.benchmarks.batch --model random:tiny --size 64 --steps 20 --jobs 24
    python -m fastsd.benchmarks.batch --model random:sd15 --size 256 --steps 20 --jobs 6 --configs local,ray1x2,ray2x1

Each configuration runs `fastsd.batch.run` on the same jobs into a fresh folder. "steady" images/min counts
from the first finished result to the last (model loading, Ray actor start-up and the batching probe
excluded); "wall" is the whole run() call. The per-image Ray overhead is a 1-worker Ray run's steady seconds
per image minus the in-process run's at the same thread count (ray1x2 - local, ray1x1 - local-t1). Local
batches run with always_batch (batched whether or not the probe finds it faster; the probe's identity check
still applies and its verdict is printed).
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time

from .common import check_model_and_res
from fastsd.cli import ArgumentParser, positive_int

DEFAULT_CONFIGS = "local,local-b2,local-b4,local-t1,local-t1-b2,local-t1-b4,ray1x1,ray1x2,ray2x1"


def config(name: str) -> dict:
    """run() keywords for a configuration name: local[-tTHREADS][-bBATCH] (2 threads unless -t; batched with
    always_batch), or rayWORKERSxCPUS (a local Ray cluster, WORKERS actors of CPUS CPUs = threads)."""
    m = re.fullmatch(r"local(?:-t(\d+))?(?:-b(\d+))?", name)
    if m:
        kw = {"threads": int(m.group(1) or 2)}
        if m.group(2):
            kw.update(batch=int(m.group(2)), always_batch=True)
        return kw
    m = re.fullmatch(r"ray(\d+)x(\d+)", name)
    if m:
        return {"ray": "auto", "workers": int(m.group(1)), "cpus_per_worker": int(m.group(2))}
    raise ValueError(f"unknown config {name!r}: local[-tN][-bN] or rayWxC")


def steady_rate(rows: list[dict]) -> float | None:
    """Images/min between the first finished result(s) and the last."""
    t = sorted(r["finished"] for r in rows if r["status"] == "done")
    first = sum(1 for x in t if x - t[0] < 0.05)  # a batch finishes its jobs together
    if len(t) <= first or t[-1] <= t[0]:
        return None
    return (len(t) - first) / (t[-1] - t[0]) * 60


def measure(name: str, jobs: list[dict], args, folder: str) -> dict:
    from fastsd.batch import Defaults, run

    defaults = Defaults(steps=args.steps, width=args.size, height=args.size)
    t0 = time.perf_counter()
    rows = run(jobs, model=args.model, out=os.path.join(folder, name), defaults=defaults, progress=False,
               **config(name))
    wall = time.perf_counter() - t0
    rate = steady_rate(rows)
    return {"config": name, "jobs": len(jobs), "done": sum(r["status"] == "done" for r in rows), "wall_s": wall,
            "steady_img_per_min": rate, "steady_s_per_img": 60 / rate if rate else None,
            "wall_img_per_min": len(rows) / wall * 60, **config(name)}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m fastsd.benchmarks.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--jobs", type=positive_int, default=24)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated: local[-tTHREADS][-bBATCH] (2 threads "
                   "unless -t), rayWORKERSxCPUS")
    p.add_argument("--json", default=None, help="append one JSON line per configuration here")
    args = p.parse_args(argv)
    check_model_and_res(p, args.model, args.size, res_option="--size")
    names = args.configs.split(",")
    try:
        [config(n) for n in names]
    except ValueError as e:
        p.error(str(e))
    from fastsd.benchmarks.common import git_commit, isa_fields, timestamp, versions

    jobs = [{"prompt": f"a photo of object number {i}", "seed": i} for i in range(args.jobs)]
    env = {"model": args.model, "size": args.size, "steps": args.steps, "commit": git_commit(),
           "time": timestamp(), **versions(), **{k: v for k, v in isa_fields().items() if k != "cpu_flags"}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastsd-batch-bench-") as folder:
        from fastsd.batch import Defaults, run

        run(jobs[:2], model=args.model, out=os.path.join(folder, "warmup"), progress=False, threads=2,
            defaults=Defaults(steps=2, width=args.size, height=args.size))  # imports, CPU tuning cache
        for name in names:
            if config(name).get("ray") and not _ray_started():
                import ray

                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            load = os.getloadavg()[0]
            row = {**measure(name, jobs, args, folder), "loadavg_before": load, "loadavg_after": os.getloadavg()[0],
                   **env}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("config", "wall_s", "steady_img_per_min", "steady_s_per_img",
                                                  "loadavg_before", "loadavg_after")}), file=sys.stderr)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    _table(rows)
    return 0


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


def _table(rows: list[dict]) -> None:
    print("| config | wall s | steady images/min | steady s/image | load avg before/after |")
    print("|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['steady_img_per_min']:.1f}" if r["steady_img_per_min"] else "-"
        spi = f"{r['steady_s_per_img']:.3f}" if r["steady_s_per_img"] else "-"
        print(f"| {r['config']} | {r['wall_s']:.1f} | {rate} | {spi} | {r['loadavg_before']:.1f} / "
              f"{r['loadavg_after']:.1f} |")
    by = {r["config"]: r for r in rows}
    for ray_name, local_name in (("ray1x2", "local"), ("ray1x1", "local-t1")):
        a, b = by.get(ray_name), by.get(local_name)
        if a and b and a["steady_s_per_img"] and b["steady_s_per_img"]:
            print(f"Ray overhead per image ({ray_name} - {local_name}, same threads): "
                  f"{a['steady_s_per_img'] - b['steady_s_per_img']:+.3f} s")


if __name__ == "__main__":
    sys.exit(main())
