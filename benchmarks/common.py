"""Shared pieces of the benchmark harness: the machine/version record, timers, memory readings.

Timing: warm-up calls first, then N timed calls; min/median/max of the N. On CUDA each call is timed
with CUDA events (and synchronised), on CPU with time.perf_counter. Memory: on CPU the peak RSS
(VmHWM in /proc/self/status) of a fresh subprocess per configuration, with the post-import baseline;
the high-water mark is reset after the models are built (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0)
so `rss_peak_run_bytes` is the peak while running only. On CUDA: torch.cuda.max_memory_allocated /
max_memory_reserved after `reset_peak_memory_stats()`.
"""
from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every result row carries these keys (tests/test_benchmarks.py checks them).
ROW_FIELDS = (
    "suite", "op", "name", "status", "impl", "backend", "dtype", "device", "device_name", "cpu_count", "threads",
    "model", "res", "latent", "batch", "shape", "torch", "triton", "diffusers", "python", "git_commit",
    "timestamp", "command", "warmup", "times", "time_s", "it_s", "rss_baseline_bytes", "rss_peak_bytes",
    "rss_peak_run_bytes", "rss_isolated", "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes",
    "isa", "cpu_capability", "cpu_flags", "native_bf16", "isa_env", "huge_pages", "cpu_tune", "cpu_tune_cached",
    "cpu_env", "native_attention", "native_winograd", "native_winograd_bf16", "memory_bytes", "openvino",
    "ov_precision",
)
TIME_FIELDS = ("min", "median", "max", "n", "all")


# ------------------------------------------------------------------------------------------ the machine

def checkout_off_path() -> None:
    """Take fastsd checkouts off sys.path (`python -m` and pytest put the working folder there): in one, kernels/
    and benchmarks/ (installed as fastsd.kernels / fastsd.benchmarks) shadow PyPI's `kernels`, which transformers
    (so diffusers too) imports, and `benchmarks`. Works on Python 3.10, which ignores PYTHONSAFEPATH."""
    def is_checkout(p: str) -> bool:
        root = os.path.abspath(p or os.curdir)
        return all(os.path.isfile(os.path.join(root, f, "__init__.py")) for f in ("fastsd", "kernels", "benchmarks"))

    sys.path[:] = [p for p in sys.path if not is_checkout(p)]


def cpu_model() -> str:
    from fastsd.cpuinfo import cpu_model as model

    return model()


def isa_fields() -> dict[str, Any]:
    """The ISA this process runs with (restrictions included), the CPU-tuning state it starts from, the
    FASTSD_CPU_* settings in effect (e.g. FASTSD_CPU_WINOGRAD=4x4), whether the cpu backend's native
    attention kernel, Winograd transforms and bf16 Winograd GEMMs run ("on", else why not), whether the
    Winograd weights get huge pages (cpuinfo.huge_pages) and the RAM it may use (which decides whether
    Winograd F(2x2) is offered): every result row carries them, since CPU numbers hold for one ISA and one
    setting only."""
    from fastsd import cpuinfo
    from fastsd.backends import cpu_attention_native, cpu_tune, cpu_winograd_bf16, cpu_winograd_native

    d = cpuinfo.describe()
    return {"isa": cpuinfo.isa_label(), "cpu_capability": d["aten_capability"], "cpu_flags": d["cpu_flags"],
            "native_bf16": d["native_bf16"], "isa_env": d["isa_env"], "huge_pages": d["huge_pages"],
            "cpu_tune": cpu_tune.mode(),
            "cpu_tune_cached": len(cpu_tune.tuner().entries()), "cpu_env": cpu_settings(),
            "native_attention": cpu_attention_native.unavailable() or "on",
            "native_winograd": cpu_winograd_native.unavailable() or "on",
            "native_winograd_bf16": cpu_winograd_bf16.unavailable() or "on", "memory_bytes": cpuinfo.memory_bytes()}


def cpu_settings() -> dict[str, str]:
    """The FASTSD_CPU_* environment variables set in this process (they choose what the cpu backend runs)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTSD_CPU_")}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


@functools.cache
def versions() -> dict[str, str | None]:
    import torch

    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or broken
            out[name] = None
    from importlib.metadata import PackageNotFoundError, version

    try:  # from the metadata: importing openvino in every worker would move the RSS baseline
        out["openvino"] = version("openvino")
    except PackageNotFoundError:
        out["openvino"] = None
    return out


def git_commit(repo: str = REPO) -> str | None:
    """`git rev-parse --short HEAD`, plus "+dirty" when tracked or untracked (not ignored) files differ
    from HEAD; benchmark result files are not counted."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
                                cwd=repo, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if status.strip() else "")


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ memory

def proc_status(field: str) -> int | None:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Memory readings of one worker process; `mark_loaded()` after building the models."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = proc_status("VmRSS")  # after imports
        self.loaded = self.load_peak = None
        self.reset_ok = False

    def mark_loaded(self) -> None:
        self.loaded = proc_status("VmRSS")
        self.load_peak = proc_status("VmHWM")
        self.reset_ok = reset_peak_rss()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def fields(self) -> dict[str, Any]:
        hwm = proc_status("VmHWM")
        out = {"rss_baseline_bytes": self.baseline, "rss_loaded_bytes": self.loaded,
               "rss_peak_bytes": None if hwm is None else max(hwm, self.load_peak or 0),
               "rss_peak_run_bytes": hwm if self.reset_ok else None,
               "cuda_peak_allocated_bytes": None, "cuda_peak_reserved_bytes": None}
        if self.device.startswith("cuda"):
            import torch

            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out


# ------------------------------------------------------------------------------------------ timing

def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds, result) of one call: CUDA events on CUDA, perf_counter on CPU."""
    if device.startswith("cuda"):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def summary(times: list[float]) -> dict[str, Any]:
    if not times:
        return {"min": None, "median": None, "max": None, "n": 0, "all": []}
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "n": len(times),
            "all": list(times)}


def bench(fn: Callable[[], Any], device: str, warmup: int, repeat: int) -> tuple[list[float], Any]:
    """Warm-up calls, then `repeat` timed calls; (times, result of the first warm-up or timed call)."""
    first = None
    for i in range(warmup):
        _, out = time_once(fn, device)
        first = out if i == 0 else first
    times = []
    for _ in range(repeat):
        t, out = time_once(fn, device)
        first = out if first is None else first
        times.append(t)
    return times, first


def bench_alternating(fns: list[Callable[[], Any]], device: str, warmup: int, repeat: int):
    """A B C A B C ...: warm-up rounds, then `repeat` timed rounds. Returns (times per fn, output of each
    fn's first call); the ratio of two implementations per round = times_a[i] / times_b[i]."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[Any] = [None] * len(fns)
    for i in range(warmup + repeat):
        for j, fn in enumerate(fns):
            t, out = time_once(fn, device)
            if i == 0:
                outs[j] = out
            if i >= warmup:
                times[j].append(t)
    return times, outs


def model_error(model: str) -> str | None:
    """Why `model` can't be loaded, found before any work (an unknown preset, no such file or folder), or None.
    A file that is there is not read here: loading it names what is wrong with it."""
    from fastsd.checkpoint import resolve
    from fastsd.tensorfile import CheckpointError

    if model.startswith("random:") or not os.path.exists(model):
        try:
            resolve(model)
        except (ValueError, CheckpointError) as e:
            return str(e)
    return None


def check_model_and_res(parser, model: str, res: int, *, res_option: str = "--res", zero_res: bool = False) -> None:
    """A dev benchmark's --model and image size checked before any work: one `prog: error:` line, exit 2."""
    from fastsd.cli import usage_error

    if res % 8 or res < (0 if zero_res else 8):
        usage_error(parser, f"{res_option} must be {'0 or ' if zero_res else ''}a positive multiple of 8, got {res}")
    if (err := model_error(model)) is not None:
        usage_error(parser, err)


def max_rel_err(a, ref) -> float:
    """max |a - ref| / max |ref| in float64 (the first element of tuple outputs)."""
    a = a[0] if isinstance(a, (tuple, list)) else a
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.abs().max().item()
    return (a - ref).abs().max().item() / (den if den else 1.0)
