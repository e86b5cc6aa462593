"""Native (C++) pieces of the cpu backend: compiled on this machine at first use with the C++ compiler (`$CXX`,
else g++), cached under the tuner's cache folder keyed by source, flags, torch and CPU, loaded with ctypes.
Each piece checks itself (a self-test) before the backend uses it, and the backend keeps its torch-ops path
where a piece can't build, load or pass. `FASTSD_CPU_NATIVE=0` never builds or uses any of them.

Linked against the installed torch's library folder: an OpenMP piece then shares torch's libgomp (one thread
pool); one that uses ATen's C++ API (`torch_api=True`) also gets its headers and libraries.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

from fastsd import cpuinfo
from fastsd.files import cache_dir

ENV = "FASTSD_CPU_NATIVE"
# the parts of -ffast-math the kernels need (vectorised sums, floor), not -ffast-math itself: with it GCC links
# crtfastmath.o, which turns on flush-to-zero / denormals-are-zero for the whole process when the library loads
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mtune=generic")
FAST_MATH = ("-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
             "-freciprocal-math", "-ffinite-math-only")
AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma")
AVX2 = ("-mavx2", "-mfma")


def disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no")


def isa_flags() -> tuple[str, ...]:
    """The vector ISA ATen runs here (its restriction included), not -march=native: a library built under
    ATEN_CPU_CAPABILITY=avx2 runs the code an AVX2-only CPU would."""
    isa = cpuinfo.aten_capability()
    if isa == "AVX512" and "avx512f" in cpuinfo.cpu_flags():
        return AVX512
    if isa in ("AVX2", "AVX512") and "avx2" in cpuinfo.cpu_flags():
        return AVX2
    return ()


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def command(cxx: str, source: Path, flags: tuple[str, ...], output: Path, torch_api: bool) -> list[str]:
    lib = Path(torch.__file__).parent / "lib"
    api = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{lib.parent / 'include'}"] if torch_api else []
    link = ["-ltorch_cpu", "-lc10"] if torch_api else []
    return [cxx, *flags, *api, str(source), f"-L{lib}", *link, f"-Wl,-rpath,{lib}", "-o", str(output)]


def sources(source: Path) -> list[bytes]:
    """The source's text and that of the local headers it includes (`#include "name.h"`): the build's cache key."""
    text = source.read_bytes()
    return [text] + [(source.parent / h.decode()).read_bytes()
                     for h in re.findall(rb'^\s*#include\s+"([^"]+)"', text, re.M)]


def build(source: Path, flags: tuple[str, ...], *, torch_api: bool, cxx: str | None = None,
          folder: Path | None = None) -> Path:
    """The compiled library, from the cache or compiled now; raises RuntimeError with one line on failure."""
    cxx = cxx or compiler()
    if not cxx or not shutil.which(cxx):
        raise RuntimeError(f"no C++ compiler ({cxx or 'g++'} not found; set CXX)")
    folder = folder or cache_dir() / "native"
    key = hashlib.sha256(b"\0".join([*sources(source),
                                     " ".join(command(cxx, source, flags, Path("x"), torch_api)).encode(),
                                     torch.__version__.encode(), cpuinfo.fingerprint().encode()])).hexdigest()[:16]
    path = folder / f"{source.stem}-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")  # another process may build the same file at once
    os.close(fd)
    try:
        done = subprocess.run(command(cxx, source, flags, Path(tmp), torch_api), capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{Path(cxx).name} failed: {(errors or ['no output'])[0][:200]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checked(build: Callable[[], Path], setup: Callable[[ctypes.CDLL], None],
                 self_test: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL | None, str | None]:
    """Build (or find) a library, load it, declare its entry points (`setup`) and run its self-test: the library
    and None, or None and why not (the first line of what failed: the capability check says no). Nothing is
    built where FASTSD_CPU_NATIVE=0."""
    if disabled():
        return None, f"{ENV}=0"
    try:
        lib = ctypes.CDLL(str(build()))
        setup(lib)
        self_test(lib)
    except Exception as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    return lib, None
