"""What every fastsd command line shares: one-line errors and warnings, the thread count, the run summary.

Imports nothing heavy: `--help` and argument errors answer before torch is imported.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default (where its help doesn't already say it, and it is not None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def usage_error(parser: argparse.ArgumentParser, msg: str):
    """argparse's error exit (status 2, "prog: error: msg") without the long usage block: one line."""
    parser.exit(2, f"{parser.prog}: error: {msg}\n")


class ArgumentParser(argparse.ArgumentParser):
    """fastsd's command lines: argparse's own errors (a missing argument, `--steps abc`, an unknown option) are one
    line too (usage_error), pointing at --help for the usage."""

    def error(self, message: str):
        usage_error(self, f"{message} (--help lists the options)")


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a training-run command (its first argument is a run folder, which must exist)."""
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run):
        usage_error(parser, f"run folder {args.run}: no such folder")
    return args


def add_run_sampling_args(p: argparse.ArgumentParser, *, sampler: str) -> None:
    """The options that sample a training run: run folder, sampler, steps, seed, clipping, progress."""
    p.add_argument("run", help="run folder written by python -m fastsd.train")
    p.add_argument("--sampler", default=sampler, help="euler_a, euler(_karras), heun(_karras), lms(_karras), "
                   "dpm2(_karras), dpm2_a(_karras), ddim, ddpm, dpmpp_2m(_karras), dpmpp_2s_a(_karras), "
                   "dpmpp_2m_sde(_karras), dpmpp_2m_sde_heun(_karras), dpmpp_sde(_karras), dpmpp_3m_sde(_karras), "
                   "unipc(_karras), lcm, plms, restart, dpm_fast, dpm_adaptive")
    p.add_argument("--steps", type=int_in(1, 1000), default=50)
    p.add_argument("--seed", type=int_in(0, 2 ** 63 - 1), default=0)
    p.add_argument("--no-clip", action="store_true", help="don't clip predicted x0 to [-1, 1] while sampling")
    p.add_argument("--no-progress", action="store_true")


BACKENDS = ("auto", "torch", "cpu", "triton", "openvino")


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    """--backend, as every command that loads a pipeline takes it (load_pipeline's `backend`)."""
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: triton on cuda, the tuned cpu path on a cpu (openvino where measured faster); "
                   "torch: the plain reference; openvino: OpenVINO models on a cpu (the openvino extra)")


def require(module: str, extra: str) -> None:
    """ImportError as a one-line ValueError naming the extra to install (e.g. scikit-learn for training)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(f"this needs the '{extra}' extra ({module} is not installed): "
                         f"pip install -e \".[{extra}]\"") from None


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    kind = "fastsd" if getattr(category, "notice", False) else "warning"  # (a notice: fastsd.vae_files.AutomaticVAE)
    print(f"{kind}: {message}", file=sys.stderr)


def one_line_warnings() -> None:
    """Warnings shown to a user as "warning: ...", without a source location."""
    warnings.showwarning = _one_line_warning


def physical_cores() -> int:
    """Physical cores (not SMT siblings) of the CPUs this process may run on; os.cpu_count() as a fallback."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def int_in(lo: int, hi: int | None = None, *, multiple: int = 1):
    """An argparse type: an integer in [lo, hi], a multiple of `multiple` (one-line error otherwise)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo or (hi is not None and v > hi) or v % multiple:
            want = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            of = f", a multiple of {multiple}" if multiple > 1 else ""
            raise argparse.ArgumentTypeError(f"expected an integer {want}{of}, got {v}")
        return v
    return parse


MAX_THREADS = 1024  # beyond it OpenMP fails to start its threads (or crashes) on an ordinary machine
thread_count = int_in(1, MAX_THREADS)  # the argparse type of every --threads


def float_in(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = True):
    """An argparse type: a finite number in the range [lo, hi) (or (lo, ...) with lo_open)."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        lo_ok = v > lo if lo_open else v >= lo
        hi_ok = v < hi if hi_open else v <= hi
        if not math.isfinite(v) or not lo_ok or not hi_ok:
            bounded = (lo, hi) != (-math.inf, math.inf)
            rng = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if bounded else ""
            raise argparse.ArgumentTypeError(f"expected a finite number{rng}, got {s}")
        return v
    return parse


def set_threads(n: int | None) -> int:
    """torch's intra-op threads: n, else the physical cores. Returns the count in use."""
    import torch

    torch.set_num_threads(n or physical_cores())
    return torch.get_num_threads()


def run_summary(pipe, threads: int, extra: str = "") -> str:
    """One line naming what a run uses: model, device, dtype, ISA, backend, threads (and `extra`)."""
    from fastsd import cpuinfo

    isa = f", ISA {cpuinfo.isa_label()}" if pipe.device.type == "cpu" else ""
    dtype = str(pipe.dtype).removeprefix("torch.")
    return (f"fastsd: model {pipe.name}, {pipe.device.type} {dtype}{isa}, backend {pipe.backend.name}, "
            f"{threads} threads{extra}")
