"""What every fastsd command line shares: one-line errors and warnings, the thread count, the run summary.

Imports nothing heavy: `--help` and argument errors answer before torch is imported.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default."""


def usage_error(parser: argparse.ArgumentParser, msg: str):
    """argparse's error exit (status 2, "prog: error: msg") without the long usage block: one line."""
    parser.exit(2, f"{parser.prog}: error: {msg}\n")


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
