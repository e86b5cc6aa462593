"""The benchmark harness: `python -m fastsd.benchmarks run ...` (see README "Performance").

    python -m fastsd.benchmarks run --suite unet --res 256,512 --dtype fp32,bf16 --backend torch,triton \\
        --compare diffusers --warmup 1 --repeat 5 --json out.jsonl --plot out.png
    python -m fastsd.benchmarks run --suite unet,pipeline --dtype bf16 --backend openvino --compare diffusers,openvino
    python -m fastsd.benchmarks run --quick                       # random:tiny, 64 px, a smoke test (< 1 min on CPU)
    python -m fastsd.benchmarks table out.jsonl [--plot out.png]  # the markdown table (and plot) of saved results

Each configuration (suite x op x res x dtype x backend) runs in a fresh `python -m fastsd.benchmarks.worker`
process, so its peak RSS is its own. With `--compare diffusers` the timing process runs fastsd and its
diffusers twin (same weights) alternately, A B A B, and reports fastsd/diffusers time per adjacent pair
and their median; `--compare openvino` adds (or, alone, takes) "openvino-diffusers", plain OpenVINO
models converted from the twins with the openvino backend's settings (benchmarks/openvino_twins.py):
the implementations take turns, A B C A B C, with ratios per round against each other. Peak memory per
implementation then comes from one more fresh process per implementation (`rss_isolated`; skip them
with --no-memory-runs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

from fastsd import cpuinfo
from fastsd.cli import ArgumentParser, usage_error

from . import common
from .suites import OPS
from .worker import ROW_PREFIX

SUITES = ("unet", "pipeline", "vae", "clip", "kernels")
COMPARE = {"diffusers": "diffusers", "openvino": "openvino-diffusers"}  # --compare name -> impl
ISA_ENVS = {"avx2": cpuinfo.AVX2_ENV, "avx512": cpuinfo.NO_BF16_ENV,  # --isa name -> the workers' environment
            "avx512-bf16": cpuinfo.NO_AMX_ENV}
GIB = 2 ** 30


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _usage(msg: str):
    """A user's mistake: argparse's error exit (status 2, one `python -m fastsd.benchmarks: error:` line, no
    traceback), before any worker starts."""
    usage_error(parser(), msg)


def _list(option: str, value: str) -> list[str]:
    """A comma-separated option's names; one that names none (`--suite ,`) would run nothing."""
    names = _csv(value)
    if not names:
        _usage(f"{option} {value!r}: names nothing; give at least one (comma-separated)")
    return names


def check_outputs(json_path: str | None, plot_path: str | None) -> None:
    """--json and --plot checked before the run (not after it, when the results would be lost): a results file
    that is a folder or whose folder can't be made, a plot whose folder is missing, no matplotlib to draw it."""
    if json_path is not None:
        if os.path.isdir(json_path):
            _usage(f"--json {json_path}: is a folder; give a file name (results are appended to it)")
        folder = os.path.dirname(os.path.abspath(json_path))
        up = folder
        while not os.path.exists(up):  # the missing folders are made; the nearest existing one must be a folder
            up = os.path.dirname(up)
        if not os.path.isdir(up):
            _usage(f"--json {json_path}: {up} is not a folder")
        if os.path.exists(json_path) and not os.access(json_path, os.W_OK):
            _usage(f"--json {json_path}: the file is not writable")
        if not os.access(up, os.W_OK) and not os.path.exists(json_path):
            _usage(f"--json {json_path}: the folder {up} is not writable")
    if plot_path is not None:
        folder = os.path.dirname(os.path.abspath(plot_path))
        if os.path.isdir(plot_path):
            _usage(f"--plot {plot_path}: is a folder; give a .png file name")
        if not os.path.isdir(folder):
            _usage(f"--plot {plot_path}: no such folder {folder}")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            _usage(f"--plot {plot_path}: the plot needs matplotlib, which is not installed (pip install matplotlib)")


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m fastsd.benchmarks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run benchmarks")
    r.add_argument("--suite", default="unet", help=f"comma-separated: {', '.join(SUITES)}, or all (default unet)")
    r.add_argument("--res", default=None, help="image sizes in px, comma-separated (default 512; --quick: 64)")
    r.add_argument("--dtype", default=None, help="fp32,fp16,bf16 (default: fastsd's default under --isa: fp16 on CUDA; on a CPU bf16 "
                   "where it computes faster than fp32 (AMX, or AVX512-BF16 measured so), else fp32)")
    r.add_argument("--backend", default="auto",
                   help="fastsd backends: torch,cpu,triton,openvino,auto (default auto, the default path)")
    r.add_argument("--compare", default=None, help="also time, on the same weights: diffusers, openvino (plain "
                   "OpenVINO models of the diffusers twins), or both: diffusers,openvino")
    r.add_argument("--model", default=None, help="random:sd15 (default), random:tiny (--quick), or a checkpoint path")
    r.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    r.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2; --quick 1)")
    r.add_argument("--repeat", type=int, default=None, help="timed calls (default 5; --quick 3)")
    r.add_argument("--batch", type=int, default=1, help="images per prompt (the UNet runs 2x this for CFG)")
    r.add_argument("--vae", default="kl", choices=["kl", "taesd"], help="vae and pipeline suites: the KL VAE, or "
                   "TAESD (SD1.5's architecture, random weights; diffusers' AutoencoderTiny with --compare)")
    r.add_argument("--steps", type=int, default=None, help="pipeline suite: sampling steps (default 20; --quick 4)")
    r.add_argument("--sampler", default="euler", help="pipeline suite: the sampler (default euler; e.g. lcm)")
    r.add_argument("--cfg", type=float, default=7.5, help="pipeline suite: guidance scale (<= 1: no uncond batch)")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker")
    r.add_argument("--quick", action="store_true", help="random:tiny at 64 px, few repeats: a CI smoke test")
    r.add_argument("--json", default=None, help="JSON-lines output (default benchmarks/results/<timestamp>.jsonl)")
    r.add_argument("--plot", default=None, help="write a PNG plot of it/s (matplotlib)")
    r.add_argument("--no-memory-runs", action="store_true",
                   help="with --compare: skip the per-implementation memory processes")
    r.add_argument("--timeout", type=float, default=None, help="seconds per worker process (default none)")
    r.add_argument("--isa", default="native", choices=["native", *ISA_ENVS],
                   help="avx2: run the workers restricted to AVX2 (oneDNN, ATen and MKL), as on a CPU without "
                   "AVX-512; avx512: oneDNN and MKL held at AVX-512 without BF16 (Skylake-SP to Ice Lake; fp32 the "
                   "default); avx512-bf16: oneDNN and MKL held below AMX on a CPU that has it, as on one with "
                   "AVX512-BF16 and no AMX (default native)")
    t = sub.add_parser("table", help="print the markdown table of a results file")
    t.add_argument("jsonl")
    t.add_argument("--plot", default=None)
    return ap


# ------------------------------------------------------------------------------------------ configurations

def default_dtype(device: str, isa: str, threads: int | None = None) -> str:
    """fastsd's default dtype for `device`, as the workers will run it: under the --isa environment and thread
    count (on a CPU with AVX512-BF16 and no AMX it is measured, fastsd.load.bf16_measured_faster)."""
    import torch

    from fastsd.load import DTYPES, default_dtype as fastsd_default

    if isa in ("avx2", "avx512") and not device.startswith("cuda"):
        return "fp32"
    if device.startswith("cuda") or (isa == "native" and (cpuinfo.amx() or not cpuinfo.native_bf16())):
        dtype = fastsd_default(torch.device(device))  # decided here without measuring
        return next(name for name, d in DTYPES.items() if d == dtype)
    code = ("import sys, torch\nfrom fastsd.load import DTYPES, default_dtype\n"
            f"if {threads!r}: torch.set_num_threads({threads!r})\n"
            "d = default_dtype(torch.device('cpu'))\nprint(next(n for n, x in DTYPES.items() if x == d))")
    env = {**os.environ, **ISA_ENVS.get(isa, {})}
    p = subprocess.run([sys.executable, "-c", code], cwd=common.REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        last = ((p.stderr or p.stdout).strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: finding fastsd's default dtype under --isa {isa} failed: {last}")
    return p.stdout.split()[-1]


def resolve_defaults(a: argparse.Namespace) -> argparse.Namespace:
    from fastsd.load import parse_device

    try:  # --device tpu, or cuda without a GPU: one line, not torch's RuntimeError from the first worker
        a.device = str(parse_device(a.device))
    except ValueError as e:  # (torch's own message lists every device type it knows: not useful here)
        _usage(f"--device {a.device}: " + ("unknown device; choose cpu or cuda (or cuda:N)"
                                           if str(e).startswith("unknown device") else str(e)))
    a.model = a.model or ("random:tiny" if a.quick else "random:sd15")
    if not a.model.startswith("random:") and os.path.exists(a.model):
        a.model = os.path.abspath(a.model)  # the workers run in the checkout, not in this working folder
    res = a.res or ("64" if a.quick else "512")
    try:
        a.res = [int(x) for x in _list("--res", res)]
    except ValueError:
        _usage(f"--res {res}: expected sizes in px, comma-separated (e.g. 256,512)")
    if any(r % 8 or r < 8 for r in a.res):
        _usage(f"--res {res}: sizes must be positive multiples of 8")
    a.backend = _list("--backend", a.backend)
    a.suite = list(SUITES) if a.suite.strip() == "all" else _list("--suite", a.suite)
    for s in a.suite:
        if s not in SUITES:
            _usage(f"unknown suite {s!r}; choose from {', '.join(SUITES)} or all")
    check_outputs(a.json, a.plot)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.repeat = a.repeat if a.repeat is not None else (3 if a.quick else 5)
    a.steps = a.steps if a.steps is not None else (4 if a.quick else 20)
    # --quick: one thread unless asked; on a loaded 2-core machine a second OpenMP thread that is
    # descheduled stalls every tiny parallel op by a scheduler tick (~4-12 ms)
    a.threads = a.threads if a.threads is not None else (1 if a.quick else None)
    check_run_values(a)
    if a.isa == "avx512-bf16" and "amx_bf16" not in cpuinfo.cpu_flags():
        _usage("--isa avx512-bf16 hides AMX from a CPU that has it; this one has none (run --isa native)")
    if a.isa == "avx512" and "avx512f" not in cpuinfo.cpu_flags():
        _usage("--isa avx512 holds an AVX-512 CPU below BF16; this one has no AVX-512")
    if a.dtype is not None:
        a.dtype = _list("--dtype", a.dtype)
        for d in a.dtype:
            if d not in ("fp32", "fp16", "bf16"):
                _usage(f"unknown dtype {d!r}; choose fp32, fp16, bf16")
    for b in a.backend:
        if b not in ("torch", "cpu", "triton", "openvino", "auto"):
            _usage(f"unknown backend {b!r}; choose torch, cpu, triton, openvino, auto")
    a.compare = _csv(a.compare or "")
    for c in a.compare:
        if c not in COMPARE:
            _usage(f"unknown --compare {c!r}; choose diffusers, openvino or diffusers,openvino")
    if "openvino" in a.compare and openvino_skip_reason(a):
        _usage(f"--compare openvino: {openvino_skip_reason(a)}")
    a.dtype = a.dtype or _csv(default_dtype(a.device, a.isa, a.threads))  # (may measure: after the checks)
    return a


def check_run_values(a: argparse.Namespace) -> None:
    """Numbers out of range, an unknown sampler or a model that isn't there: one `error:` line (exit 2) before any
    worker starts (not a row per worker with its traceback)."""
    from fastsd.samplers import resolve_sampler_name

    for name, value, low in (("--warmup", a.warmup, 0), ("--repeat", a.repeat, 1), ("--batch", a.batch, 1),
                             ("--steps", a.steps, 1), ("--threads", a.threads, 1)):
        if value is not None and value < low:
            _usage(f"{name} must be at least {low}, got {value}")
    if a.timeout is not None and not (a.timeout > 0 and math.isfinite(a.timeout)):
        _usage(f"--timeout must be a positive number of seconds, got {a.timeout}")
    if not math.isfinite(a.cfg):
        _usage(f"--cfg must be a finite number, got {a.cfg}")
    try:
        resolve_sampler_name(a.sampler)
    except ValueError as e:
        _usage(str(e))
    if (err := common.model_error(a.model)) is not None:  # (a file that is there: its workers read it)
        _usage(err)
    if os.path.exists(a.model) and not (os.path.isfile(a.model) or os.path.isdir(a.model)):
        _usage(f"--model {a.model}: not a checkpoint file or model folder")


def triton_skip_reason(a) -> str | None:
    """Why fastsd's triton backend can't be timed in the model suites of this run (None when it can).
    On CPU never: even the tiny model takes many minutes under the Triton interpreter (the kernels
    suite times the interpreter at tiny shapes with --quick)."""
    import torch

    from fastsd.backends.triton import unavailable

    if a.device == "cpu":
        return "Triton kernels need a GPU; on CPU they run only under the (very slow) interpreter"
    return unavailable(torch.device(a.device))


def openvino_skip_reason(a) -> str | None:
    """Why OpenVINO can't be timed in this run (None when it can)."""
    import torch

    from fastsd.backends.openvino import unavailable

    return unavailable(torch.device(a.device))


def base_spec(a, suite: str, op: str, res: int | None, dtype: str) -> dict:
    return {"suite": suite, "op": op, "model": a.model, "res": res, "dtype": dtype, "batch": a.batch,
            "device": a.device, "warmup": a.warmup, "repeat": a.repeat, "steps": a.steps, "threads": a.threads,
            "quick": a.quick, "seed": 0, "isa": a.isa, "sampler": a.sampler, "cfg": a.cfg, "vae": a.vae}


def plan(a) -> list[dict]:
    """Work items: {"spec": ..., "kind": "time" | "memory" | "skip", ...}."""
    items = []
    skips = {"triton": triton_skip_reason(a), "openvino": openvino_skip_reason(a)}
    others = [COMPARE[c] for c in a.compare]
    for suite in a.suite:
        for dtype in a.dtype:
            for res in ([None] if suite == "clip" else a.res):
                if suite == "kernels":
                    spec = {**base_spec(a, suite, "all", res, dtype), "backends": a.backend, "impls": ["fastsd"],
                            "mode": "time", "backend": "torch"}
                    items.append({"kind": "time", "spec": spec})
                    continue
                for op in OPS[suite]:
                    other_mem_done = set()
                    for backend in a.backend:
                        spec = {**base_spec(a, suite, op, res, dtype), "backend": backend}
                        if skips.get(backend):
                            status = "needs CUDA" if backend == "triton" else "needs openvino"
                            items.append({"kind": "skip", "spec": {**spec, "impls": ["fastsd"]},
                                          "reason": skips[backend], "status": status})
                            continue
                        items.append({"kind": "time", "spec": {**spec, "impls": ["fastsd", *others], "mode": "time"}})
                        if others and not a.no_memory_runs:
                            items.append({"kind": "memory", "spec": {**spec, "impls": ["fastsd"], "mode": "memory"}})
                            for impl in others:
                                if impl not in other_mem_done:
                                    items.append({"kind": "memory",
                                                  "spec": {**spec, "impls": [impl], "mode": "memory"}})
                                    other_mem_done.add(impl)
    return items


# ------------------------------------------------------------------------------------------ running

def run_worker(spec: dict, timeout: float | None = None) -> tuple[list[dict], str | None]:
    env = dict(os.environ)  # the worker takes the checkout (its cwd) off sys.path itself
    env.setdefault("TQDM_DISABLE", "1")
    env.update(ISA_ENVS.get(spec.get("isa"), {}))
    try:
        p = subprocess.run([sys.executable, "-m", "fastsd.benchmarks.worker", json.dumps(spec)], cwd=common.REPO, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"worker timed out after {timeout} s"
    rows = [json.loads(line[len(ROW_PREFIX):]) for line in p.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
        return rows, f"worker exited with {p.returncode}: " + " | ".join(tail)
    return rows, None


def _name(suite: str, op: str) -> str:
    return f"{suite} {op}" if suite != "kernels" else f"kernel {op}"


def complete(row: dict, spec: dict, run: dict) -> dict:
    """Fill the run-wide and configuration fields; every row ends up with all of common.ROW_FIELDS."""
    out = {"suite": spec["suite"], "op": spec["op"], "model": spec["model"], "res": spec["res"], "dtype": spec["dtype"],
           "batch": spec["batch"], "backend": spec.get("backend"), "impl": "fastsd", "warmup": spec["warmup"],
           "repeat": spec["repeat"], **({"steps": spec["steps"]} if spec["suite"] == "pipeline" else {}),
           "status": "ok", "latent": None, "shape": None, "rss_isolated": True, **run}
    out.update(row)
    out["name"] = _name(out["suite"], out["op"])
    if spec.get("vae") == "taesd" and spec["suite"] in ("vae", "pipeline"):
        out["name"] += " (taesd)"
    for k in common.ROW_FIELDS:
        out.setdefault(k, None)
    if out["times"] is None:
        out["times"] = common.summary([])
    return out


def run_wide_fields(a, argv: list[str]) -> dict:
    import torch

    return {"git_commit": common.git_commit(), "command": "python -m fastsd.benchmarks " + shlex.join(argv),
            "device": a.device, "device_name": common.device_name(a.device), "cpu_count": os.cpu_count(),
            "threads": a.threads or torch.get_num_threads(), "cpu_env": common.cpu_settings(), **common.versions()}


def _finish(r: dict, spec: dict, run: dict, memory: dict) -> dict:
    row = complete(r, spec, run)
    if row["impl"] != "fastsd":
        row["backend"] = None  # diffusers' own attention / norms (or OpenVINO), whatever fastsd's backend
        row["fastsd_backend"] = spec.get("backend")
    key = (spec["suite"], spec["op"], spec["res"], spec["dtype"], row["impl"],
           spec["backend"] if row["impl"] == "fastsd" else None)
    if len(spec["impls"]) > 1:  # the timing process held both implementations: its memory readings are mixed
        for k in ("rss_baseline_bytes", "rss_loaded_bytes", "rss_peak_bytes", "rss_peak_run_bytes",
                  "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes"):
            row["timing_process_" + k] = row.get(k)
            row[k] = memory.get(key, {}).get(k)
        row["rss_isolated"] = key in memory
    return row


def execute(a, argv: list[str], log=sys.stderr, on_rows=None) -> list[dict]:
    """Run the plan; rows are finished (memory readings merged) one configuration group at a time and
    handed to `on_rows` as soon as they are, so an interrupted run keeps what it measured."""
    run = run_wide_fields(a, argv)
    items = plan(a)
    pending: list[tuple[dict, dict]] = []  # timing rows of the current group, (row, spec)
    memory: dict[tuple, dict] = {}
    out: list[dict] = []

    def emit(rows: list[dict]) -> None:
        out.extend(rows)
        if on_rows and rows:
            on_rows(rows)

    skipped: list[dict] = []

    def flush() -> None:
        emit([_finish(r, spec, run, memory) for r, spec in pending] + skipped)
        pending.clear()
        skipped.clear()
        memory.clear()

    group = None
    for i, item in enumerate(items):
        spec = item["spec"]
        g = (spec["suite"], spec["op"], spec["res"], spec["dtype"])
        if g != group:
            flush()
            group = g
        what = (f"[{i + 1}/{len(items)}] {item['kind']:6s} {_name(spec['suite'], spec['op'])} res={spec['res']} "
                f"{spec['dtype']} backend={spec.get('backend')} impls={'+'.join(spec['impls'])}")
        stamp = common.timestamp()
        if item["kind"] == "skip":
            print(what + f": skipped ({item['reason']})", file=log, flush=True)
            skipped.append(complete({"status": item["status"], "reason": item["reason"], "timestamp": stamp}, spec, run))
            continue
        t0 = time.perf_counter()
        rows, err = run_worker(spec, a.timeout)
        print(what + f": {time.perf_counter() - t0:.1f} s" + (f"  ERROR {err}" if err else ""), file=log, flush=True)
        if err and not rows:
            rows = [{"impl": imp, "status": "error", "reason": err} for imp in spec["impls"]]
        for r in rows:
            r.setdefault("timestamp", stamp)
            if err:
                r["status"], r["reason"] = "error", err
        if item["kind"] == "memory":
            for r in rows:
                key = (spec["suite"], spec["op"], spec["res"], spec["dtype"], r.get("impl"),
                       spec["backend"] if r.get("impl") == "fastsd" else None)
                memory[key] = r
            continue
        pending.extend((r, spec) for r in rows)
    flush()
    return out


# ------------------------------------------------------------------------------------------ output

def _f(x, fmt="{:.4g}") -> str:
    return "" if x is None else fmt.format(x)


def _gib(row, key="rss_peak_run_bytes") -> str:
    v, base = row.get(key), row.get("rss_baseline_bytes")
    if v is None:
        v, key = row.get("rss_peak_bytes"), "rss_peak_bytes"
    if v is None or base is None:
        return ""
    return f"{(v - base) / GIB:.2f}"


def _status(r: dict) -> str:
    reason = r.get("reason")
    return r["status"] + (f": {reason}" if r["status"] != "ok" and reason and reason != r["status"] else "")


def markdown(rows: list[dict]) -> str:
    out = []
    model_rows = [r for r in rows if r["suite"] != "kernels"]
    if model_rows:
        r0 = model_rows[0]
        isas = sorted({str(r.get("isa")) for r in model_rows})
        out.append(f"{r0['device_name']} ({r0['device']}), ISA {' / '.join(isas)}, {r0['threads']} threads, "
                   f"torch {r0['torch']}, diffusers {r0['diffusers']}, openvino {r0.get('openvino')}, "
                   f"git {r0['git_commit']}" + "".join(f", {k}={v}" for k, v in (r0.get("cpu_env") or {}).items()))
        out.append("")
        out.append("| bench | model | impl | backend | ISA | dtype | res | batch | median s | min s | max s | n | it/s "
                   "| fastsd/diffusers | fastsd/plain OV | max rel err | peak RSS GiB | status |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in model_rows:
            t = r["times"] or {}
            ratio, vs_ov = "", ""
            medians = r.get("ratio_medians") or {}
            if r["impl"] == "fastsd":
                ratio = _f(medians.get("diffusers", r.get("ratio_median") if r.get("compare_impl") == "diffusers"
                                       else None), "{:.3f}")
                vs_ov = _f(medians.get("openvino-diffusers"), "{:.3f}")
            backend = str(r["backend"] or "-") + (f" ({r['ov_precision']})" if r.get("ov_precision") else "")
            status = _status(r)
            if r.get("interpreter"):
                status += " (Triton interpreter)"
            if r.get("stages_s"):
                status += " — " + ", ".join(f"{k.removesuffix('_s')} {v:.3g}s" for k, v in r["stages_s"].items())
            out.append("| " + " | ".join([
                r["name"], str(r["model"]), r["impl"], backend, str(r.get("isa") or ""), r["dtype"],
                _f(r["res"], "{}"),
                str(r["batch"]), _f(t.get("median")), _f(t.get("min")), _f(t.get("max")), _f(t.get("n"), "{}"),
                _f(r.get("it_s"), "{:.3g}"), ratio, vs_ov, _f(r.get("max_rel_err"), "{:.2e}"), _gib(r), status]) + " |")
        out.append("")
        out.append("it/s: UNet steps/s (unet; one step = batch 2B for CFG), sampling-loop steps/s (pipeline), "
                   "calls/s (vae, clip). fastsd/diffusers: median over adjacent A/B pairs of fastsd time / diffusers "
                   "time (< 1: fastsd faster); fastsd/plain OV likewise against openvino-diffusers (OpenVINO models of "
                   "the diffusers twins; backend column: the OpenVINO precision hint). Peak RSS: above the "
                   "post-import baseline, while running (after the models were built), each implementation in its "
                   "own process.")
    k_rows = [r for r in rows if r["suite"] == "kernels"]
    if k_rows:
        out.append("")
        out.append("| kernel | shape | backend | dtype | median ms | min ms | TFLOP/s | GB/s | max rel err | status |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in k_rows:
            t = r["times"] or {}
            ms = lambda v: "" if v is None else f"{v * 1e3:.4g}"  # noqa: E731
            status = _status(r)
            if r.get("interpreter"):
                status += " (Triton interpreter)"
            out.append("| " + " | ".join([
                r["op"], str(r["shape"] or ""), str(r["backend"]), r["dtype"], ms(t.get("median")), ms(t.get("min")),
                _f(r.get("tflops"), "{:.3g}"), _f(r.get("gbps"), "{:.3g}"), _f(r.get("max_rel_err"), "{:.2e}"),
                status]) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    """it/s (pipeline: images/s) per implementation/backend/dtype against resolution, one panel per model
    benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["suite"] != "kernels" and r["status"] == "ok" and r.get("time_s")]
    metric = lambda r: (r["batch"] / r["time_s"]) if r["suite"] == "pipeline" else r.get("it_s")  # noqa: E731
    names = sorted({r["name"] for r in rows})
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        sel = [r for r in rows if r["name"] == name]
        res = sorted({r["res"] or 0 for r in sel})
        series = sorted({(r["impl"], r["backend"] or "-", r["dtype"]) for r in sel})
        w = 0.8 / max(len(series), 1)
        for j, s in enumerate(series):
            ys = []
            for x in res:
                m = [metric(r) for r in sel if (r["impl"], r["backend"] or "-", r["dtype"]) == s and (r["res"] or 0) == x]
                ys.append((m[0] or 0) if m else 0)
            ax.bar([i + j * w for i in range(len(res))], ys, w, label="/".join(s))
        ax.set_xticks([i + w * (len(series) - 1) / 2 for i in range(len(res))], [str(x or "-") for x in res])
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel("images/s" if sel[0]["suite"] == "pipeline" else "it/s")
        ax.set_title(name)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"{r0['device_name']} · {r0['threads']} threads · git {r0['git_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    if a.cmd == "table":
        check_outputs(None, a.plot)
        try:
            with open(a.jsonl) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {a.jsonl}: not a readable results file ({getattr(e, 'strerror', None) or e})",
                  file=sys.stderr)
            return 2
        print(markdown(rows))
        if a.plot:
            plot(rows, a.plot)
        return 0
    a = resolve_defaults(a)
    path = a.json or os.path.join(common.REPO, "benchmarks", "results",
                                  time.strftime("%Y%m%d-%H%M%S") + ".jsonl")
    rows = execute(a, argv, on_rows=lambda rs: write_jsonl(rs, path))
    print(markdown(rows))
    print(f"\n{len(rows)} rows appended to {path}", file=sys.stderr)
    if a.plot:
        plot(rows, a.plot)
        print(f"plot: {a.plot}", file=sys.stderr)
    return 1 if any(r["status"] == "error" for r in rows) else 0
