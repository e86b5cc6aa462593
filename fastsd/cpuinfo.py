"""What this CPU can do, as the libraries fastsd runs on will use it: the vector ISA in effect, native
bf16, and a fingerprint that names the machine for cached per-CPU measurements (fastsd/cpu_tune.py).

The ISA in effect is the hardware's unless restricted: ATen's `ATEN_CPU_CAPABILITY`, oneDNN's
`ONEDNN_MAX_CPU_ISA` and MKL's `MKL_ENABLE_INSTRUCTIONS` make an AVX-512 machine behave like an AVX2 one
(how the tests exercise AVX2 paths on any machine).
"""
from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import platform

ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# AVX512-BF16 without AMX (as Zen 4/5, Cooper Lake) on a CPU with AMX: oneDNN, and MKL (whose bf16 GEMM PyTorch's
# SDPA calls) held below AMX
NO_AMX_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX512_E3"}
# AVX-512 without BF16 (Skylake-SP to Ice Lake): oneDNN and MKL held at plain AVX-512
NO_BF16_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"}
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16",
                     "amx_int8", "asimd", "sve", "bf16")
# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above which it runs bf16 in hardware
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


PROC_CPUINFO = "/proc/cpuinfo"


def _cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    # the machine's own file is read once per process (native_bf16() runs on every bf16 attention call); a
    # file given by a caller (tests) is read each time
    return dict(_proc_cpuinfo_fields()) if cpuinfo == PROC_CPUINFO else _read_cpuinfo_fields(cpuinfo)


@functools.cache
def _proc_cpuinfo_fields() -> dict[str, str]:
    return _read_cpuinfo_fields(PROC_CPUINFO)


def _read_cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    out.setdefault(k.strip(), v.strip())
                elif not line.strip() and out:
                    break  # the first processor is enough
    except OSError:
        pass
    return out


def cpu_flags(cpuinfo: str = PROC_CPUINFO) -> frozenset[str]:
    """The hardware's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return _proc_flags() if cpuinfo == PROC_CPUINFO else _flags(_read_cpuinfo_fields(cpuinfo))


@functools.cache
def _proc_flags() -> frozenset[str]:  # parsed once: native_bf16() and amx() run on every bf16 attention call
    return _flags(_proc_cpuinfo_fields())


def _flags(fields: dict[str, str]) -> frozenset[str]:
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def cpu_model(cpuinfo: str = PROC_CPUINFO) -> str:
    return _cpuinfo_fields(cpuinfo).get("model name") or platform.processor() or platform.machine()


def aten_capability() -> str:
    """The vector ISA ATen dispatches its CPU kernels to (e.g. "AVX512", "AVX2", "DEFAULT")."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch
        return "unknown"


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 math runs in hardware here: AVX512-BF16 or AMX-BF16 flags, and neither oneDNN nor
    ATen restricted below them. CPUs without it emulate bf16 GEMMs, slower than fp32."""
    flags = cpu_flags(cpuinfo)
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn and onednn not in _ONEDNN_BF16_ISAS:
        return False
    return not os.environ.get("ATEN_CPU_CAPABILITY", "").lower().startswith(("avx2", "default", "zvector"))


THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE_PAGES_ENV = "FASTSD_CPU_HUGE_PAGES"


def memory_bytes() -> int | None:
    """The RAM this process may use: the machine's, or its cgroup's limit when lower (a container); None
    where neither can be read."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as f:
                sizes.append(int(f.read().strip()))  # "max" (no limit): not a number
        except (OSError, ValueError):
            pass
    return min(sizes) if sizes else None


def describe() -> dict:
    """The ISA facts a measurement depends on (benchmark rows, run summaries, the tuning cache)."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "aten_capability": aten_capability(),
            "cpu_flags": sorted(f for f in FLAGS_OF_INTEREST if f in flags),
            "native_bf16": native_bf16(),
            "isa_env": {k: os.environ[k] for k in ISA_ENV if os.environ.get(k)},
            "huge_pages": huge_pages()}


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"); None where it can't be read."""
    try:
        with open(THP_MODE) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@functools.cache
def huge_pages() -> bool:
    """Whether the cpu backend puts its large long-lived buffers (Winograd-transformed weights) on transparent huge
    pages here: the kernel's THP mode is `always` or `madvise`, Python can advise a mapping, and
    FASTSD_CPU_HUGE_PAGES is not 0."""
    if os.environ.get(HUGE_PAGES_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def amx(cpuinfo: str = PROC_CPUINFO) -> bool:
    """Whether oneDNN may run bf16 on AMX tiles here: native bf16 with the amx_bf16 flag, and ONEDNN_MAX_CPU_ISA
    unset or an AMX one."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return (native_bf16(cpuinfo) and "amx_bf16" in cpu_flags(cpuinfo)
            and (not onednn or "AMX" in onednn or onednn in ("ALL", "DEFAULT")))


def isa_label() -> str:
    """A short name of the ISA in effect, e.g. "AVX512+BF16", "AVX512+BF16+AMX", "AVX2", "AVX2 (restricted)"."""
    d = describe()
    label = d["aten_capability"] + ("+BF16" if d["native_bf16"] else "") + ("+AMX" if amx() else "")
    return label + (" (restricted)" if d["isa_env"] else "")


@functools.cache
def fingerprint() -> str:
    """A short hash of the CPU model, ISA in effect and torch version: measurements made under another
    fingerprint are not reused."""
    import torch

    key = json.dumps({**describe(), "torch": torch.__version__, "machine": platform.machine()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
