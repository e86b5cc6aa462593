"""Ahead-of-time compile report for the Triton kernels (no GPU needed).

    python -m fastsd.kernels.report [--arch 80,86,89,90] [--dtype fp16,bf16,fp32] [--res 512,768] [--batch 1,2]
                                    [--unique] [--all-candidates] [--json] [--ptx-dir DIR] [--quick] [--jobs 2]
    python -m fastsd.kernels.report --project h100        # roofline PROJECTION (kernels/traffic.py), no compiling

Compiles every kernel launch SD1.5 makes (kernels/shapes.py: the UNet at batch 1 and 2 with CFG, the VAE
decoder at batch 1 and 2, the sampler step; 512 and 768 px) in fp16, bf16 and fp32 for sm_80 (A100), sm_86
(RTX 30xx), sm_89 (RTX 40xx / L4) and sm_90 (H100), exactly as the launchers would specialise them (the launch
plans are built from meta tensors in the model's real layout, `to_q(x).view(B, L, H, D).transpose(1, 2)`, and
run through Triton's own argument specialisation), then reads per binary:

- registers, spills (local + stack) and shared memory with the bundled `cuobjdump -res-usage`; shared memory
  is checked against the arch's per-block limit (sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB);
- blocks per SM (occupancy) from registers, warps and shared memory against the arch's SM limits;
- global loads in the PTX by width: `ld.global` (v4.b32 = 16 bytes, ...) and `cp.async` (its byte count), in
  total and per pointer argument (each load's address traced back to the kernel parameter it is computed from:
  "act" = the activation tensors the kernel streams, q/k/v or x), the `cp.async` and TMA (`cp.async.bulk.tensor`) counts, and the pipeline stages (the requested num_stages when
  the PTX holds the pipeliner's cp.async, else 1);
- tensor-core instructions (mma.sync / HMMA on sm_80-89, wgmma / HGMMA on sm_90) for attention;
- padding waste (attention: tensor-core work executed / useful, from the block shapes).

Rules (exit status 1 and the "FAILED" lines when broken; tests/kernels/test_report.py runs them): no spills;
shared memory within the arch limit; fp16/bf16 attention and group_norm with 16-byte loads of the activations
and no 2-byte scalar ones (GroupNorm's per-channel weight/bias may be read narrow), >= 2 pipeline stages in
the looping ones (attention, gn_fused, gn_partial_stats); fp16/bf16 attention on tensor cores; padding waste <= 1.3x.

Launches the dispatcher sends elsewhere (kernels/dispatch.py: fp32 attention at padded head dim > 128 on a
GPU -> SDPA) are listed as routed, not compiled. Identical binaries (kernel, signature, constexprs,
divisibility, options, arch) are compiled once; Triton's on-disk cache makes re-runs fast. Compilation needs
the real `triton.jit` functions, which TRITON_INTERPRET=1 replaces, so under the interpreter `run_report`
re-runs this module in a subprocess without it.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import torch

from . import shapes
from ._utils import interpreter_enabled
from fastsd.cli import ArgumentParser, int_in, positive_int

ARCHS = (80, 86, 89, 90)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESOLUTIONS = (512, 768)
BATCHES = (1, 2)               # images per prompt (the UNet runs 2x with CFG)
CFG_MODEL_DTYPES = ("fp16", "bf16", "fp32")  # cfg_step: latents x fp32, the model output any of these
MAX_WASTE = 1.3

# per-arch limits (CUDA C Programming Guide, compute capabilities table)
ARCH_LIMITS = {
    80: dict(gpu="A100", smem_block=163 * 1024, smem_sm=164 * 1024, threads_sm=2048, blocks_sm=32),
    86: dict(gpu="RTX 30xx", smem_block=99 * 1024, smem_sm=100 * 1024, threads_sm=1536, blocks_sm=16),
    89: dict(gpu="RTX 40xx / L4", smem_block=99 * 1024, smem_sm=100 * 1024, threads_sm=1536, blocks_sm=24),
    90: dict(gpu="H100", smem_block=227 * 1024, smem_sm=228 * 1024, threads_sm=2048, blocks_sm=32),
}
REGS_SM = 65536


def blocks_per_sm(arch: int, regs: int, num_warps: int, smem: int) -> int:
    """Resident blocks per SM: the minimum over the block, thread, register (256-register allocation units per
    warp) and shared-memory (+1 KB reserved per block) limits."""
    lim = ARCH_LIMITS[arch]
    threads = 32 * num_warps
    by_threads = lim["threads_sm"] // threads
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_SM // regs_per_warp) // num_warps
    by_smem = lim["smem_sm"] // (smem + 1024) if smem else lim["blocks_sm"]
    return max(0, min(lim["blocks_sm"], by_threads, by_regs, by_smem))


# ----------------------------------------------------------------------------------------------
# launch plans -> compile jobs
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    kernel: str          # "module:function"
    label: str           # row label (kernel name shown)
    shape: str
    dtype: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    programs: int = 0
    waste: float | None = None
    check_tc: bool = False
    routed: str | None = None   # not compiled: the dispatcher sends this launch elsewhere (reason)
    key: tuple = field(default=(), repr=False)


def _signature(fn, args, constexprs):
    """Signature, constexprs and divisibility attrs the JIT would derive from these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = fn.arg_names
    non_const = [p.name for p in fn.params if not p.is_constexpr]
    assert len(non_const) == len(args), (fn.__name__, len(non_const), len(args))
    sig, consts, attrs = {}, dict(constexprs), {}
    for name, arg in zip(non_const, args):
        ty, spec = native_specialize_impl(BaseBackend, arg, False, True, True)
        if ty == "constexpr":
            sig[name] = "constexpr"
            consts[name] = spec
        else:
            sig[name] = ty
            if spec == "D":
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    sig = {n: sig[n] for n in names}
    return sig, consts, attrs


def _fmt_config(constexprs, options, keys):
    parts = [f"{k.replace('BLOCK_', 'B')}={constexprs[k]}" for k in keys if k in constexprs]
    return " ".join(parts + [f"w={options.get('num_warps', 4)}", f"s={options.get('num_stages', 3)}"])


def _job(fn, args, cx, opts, *, label, shape, dtype, arch, keys, grid, **kw) -> Job:
    sig, consts, attrs = _signature(fn, args, cx)
    programs = 1
    for g in grid:
        programs *= g
    return Job(f"{fn.fn.__module__}:{fn.__name__}", label, shape, dtype, arch, sig, consts, attrs, opts,
               _fmt_config(cx, opts, keys) + f" grid={programs}", programs=programs, **kw)


def _attention_jobs(res, batch, dname, arch, all_candidates, quick) -> list[Job]:
    from . import attention as A
    from .dispatch import gpu_attention_reason

    dt = DTYPES[dname]
    calls = shapes.unet_attention_calls(res, batch)
    if quick:
        calls = calls[:6]
    jobs = []
    for c in calls:
        shape = f"{res}px {c.label} (x{c.count}/UNet call)"
        routed = gpu_attention_reason(c.D, dt)
        if routed:
            jobs.append(Job("", "attention", shape, dname, arch, {}, {}, {}, {}, "SDPA", routed=routed))
            continue
        # the UNet's layout: to_q(x).view(B, L, H, D).transpose(1, 2)
        q = torch.empty(c.B, c.Lq, c.H, c.D, dtype=dt, device="meta").transpose(1, 2)
        k = torch.empty(c.B, c.Lk, c.H, c.D, dtype=dt, device="meta").transpose(1, 2)
        cands = A.attention_candidates(c.D, c.Lq, c.Lk, dt, arch, batch_heads=c.B * c.H)
        for i, cfg in enumerate(cands if all_candidates else cands[:1]):
            fn, grid, args, cx, opts = A.launch_plan(q, k, k, A.empty_output(q), arch=arch, config=cfg)
            jobs.append(_job(fn, args, cx, opts, label="attention" if i == 0 else "attention (alt)", shape=shape,
                             dtype=dname, arch=arch, keys=("BLOCK_M", "BLOCK_N", "D0", "D1", "TAIL_N"), grid=grid,
                             waste=A.padding_waste(cfg, c.Lq, c.Lk, c.D), check_tc=dt != torch.float32))
    return jobs


def group_norm_calls(res, batch, quick=False) -> list[shapes.GroupNormCall]:
    """Distinct group_norm launches: the UNet's (batch with CFG) and the VAE decoder's (batch)."""
    calls = list(dict.fromkeys(shapes.unet_group_norm_calls(res, batch) + shapes.vae_decoder_group_norm_calls(res, batch)))
    return [calls[0], calls[-1]] if quick else calls


def _group_norm_jobs(res, batch, dname, arch, quick) -> list[Job]:
    from . import group_norm as GN

    dt = DTYPES[dname]
    jobs = []
    for c in group_norm_calls(res, batch, quick):
        x = torch.empty(c.N, c.C, c.H, c.W, dtype=dt, device="meta")
        w = torch.empty(c.C, dtype=dt, device="meta")
        launches, cfg = GN.launch_plan(x, torch.empty_like(x), w, w, c.groups, c.eps, c.silu)
        for fn, grid, args, cx, opts in launches:
            name = fn.__name__.replace("_gn_", "gn_").replace("_kernel", "")
            extra = f" splits={cfg.num_splits}" if "stats" in name else ""
            jobs.append(_job(fn, args, cx, opts, label=name, shape=f"{res}px {c.label} (x{c.count})", dtype=dname,
                             arch=arch, keys=("BLOCK_C", "BLOCK_S", "BLOCK_CG", "BLOCK_SPLIT"), grid=grid))
            jobs[-1].config += extra
    return jobs


def cfg_step_patterns() -> list[tuple[str, tuple[float, float, float, float], bool, bool, bool]]:
    """(label, coeffs, needs old_denoised, needs noise, guided): every flag combination the samplers launch, with
    guidance (a bare CFGDenoiser) and without (scale 1, or a wrapped model such as 4-channel inpainting).
    Only which coefficients are zero matters for the binary."""
    steps = [("euler | dpmpp_2m 1st", (0.5, 0.5, 0.0, 0.0), False, False),
             ("euler_a | ddpm | ddim eta>0", (0.5, 0.5, 0.0, 0.5), False, True),
             ("dpmpp_2m", (0.5, 0.6, -0.1, 0.0), True, False),
             ("dpmpp_2m last (a=0)", (0.0, 1.0, 0.0, 0.0), False, False)]
    return [(f"{'cfg' if guided else 'no cfg'}: {lbl}", co, old, noise, guided)
            for guided in (True, False) for lbl, co, old, noise in steps]


def _cfg_step_jobs(res, batch, dname, arch, quick) -> list[Job]:
    """The fused CFG + sampler update: fp32 latents, model output (2B, 4, h, w) in `dname`."""
    from . import cfg_step as CS

    meta = dict(device="meta")
    f32 = dict(dtype=torch.float32, **meta)
    shape = shapes.latent_shape(res, batch)
    out = torch.empty((2 * batch, *shape[1:]), dtype=DTYPES[dname], **meta)
    uncond, cond = out.chunk(2)
    x, old, noise = (torch.empty(shape, **f32) for _ in range(3))
    patterns = [p for p in cfg_step_patterns() if p[4]][:1] if quick else cfg_step_patterns()
    jobs = []
    for label, coeffs, has_old, has_noise, guided in patterns:
        fn, grid, args, cx, opts = CS.launch_plan(x, uncond if guided else None, cond, old if has_old else None,
                                                  noise if has_noise else None, torch.empty(shape, **f32),
                                                  torch.empty(shape, **f32), 7.5, coeffs)
        jobs.append(_job(fn, args, cx, opts, label="cfg_step",
                         shape=f"{res}px B{batch} x fp32 {'x'.join(map(str, shape))}, model out "
                               f"{2 * batch}x{'x'.join(map(str, shape[1:]))} ({label})",
                         dtype=dname, arch=arch, keys=("BLOCK",), grid=grid))
    return jobs


def build_jobs(archs=ARCHS, dtypes=tuple(DTYPES), resolutions=RESOLUTIONS, batches=BATCHES, quick=False,
               all_candidates=False) -> list[Job]:
    jobs = []
    for res in resolutions:
        for batch in batches:
            for dname in dtypes:
                for arch in archs:
                    jobs += _attention_jobs(res, batch, dname, arch, all_candidates, quick)
                    jobs += _group_norm_jobs(res, batch, dname, arch, quick)
                    if dname in CFG_MODEL_DTYPES:
                        jobs += _cfg_step_jobs(res, batch, dname, arch, quick)
    for j in jobs:
        j.key = (j.kernel, j.arch, tuple(sorted(j.signature.items())),
                 tuple(sorted((k, str(v)) for k, v in j.constexprs.items())),
                 tuple(sorted(j.attrs)), tuple(sorted(j.options.items())))
    return jobs


# ----------------------------------------------------------------------------------------------
# compiling and reading the binary
# ----------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# the activation tensors each kernel streams (the vector-width rule applies to their loads; per-channel
# parameters such as GroupNorm's weight/bias are read once per channel block and may be narrow)
STREAMED = {"_attn_fwd_kernel": ("Q", "K", "V"), "_gn_fused_kernel": ("X",), "_gn_apply_kernel": ("X",),
            "_gn_partial_stats_kernel": ("X",), "_cfg_step_kernel": ("X", "UNCOND", "COND", "OLD", "NOISE")}
_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_LD_RE = re.compile(r"\bld\.global([\w.:]*)")
_CP_RE = re.compile(r"\bcp\.async\.c[ag]\.shared\.global[\w.:]*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def global_loads(ptx: str) -> dict[int, int]:
    """{bytes per instruction: count} over `ld.global` (vector width x element bits) and `cp.async` (its size)."""
    widths = collections.Counter()
    for m in _LD_RE.finditer(ptx):
        vec, bits = 1, 0
        for tok in m.group(1).split("."):
            if tok in ("v2", "v4", "v8"):
                vec = int(tok[1:])
            elif re.fullmatch(r"[bsuf](8|16|32|64)", tok):
                bits = int(tok[1:])
        widths[vec * bits // 8] += 1
    for m in _CP_RE.finditer(ptx):
        widths[int(m.group(1), 0)] += 1
    return dict(sorted(widths.items()))


_INSTR_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)\s+(.*?);\s*$")
_REG_RE = re.compile(r"%[a-z]+\d+")
_PARAM_RE = re.compile(r"\[\s*\w+_param_(\d+)\s*\]")


def loads_by_pointer(ptx: str, params: list[str], pointers: set[str] | None = None) -> dict[str, dict[int, int]]:
    """{pointer argument name: {bytes per instruction: count}}: each global load's (and cp.async's) address
    register is traced back through the PTX definitions (add / mad / mov / cvt ...) to the kernel parameter
    it is computed from (`ld.param.b64 ... [kernel_param_i]`; `params` = the non-constexpr argument names in
    order; `pointers` the pointer-typed ones, default all). Loads whose address reaches no pointer parameter are
    counted under "?"."""
    defs: dict[str, list[list[str]]] = collections.defaultdict(list)
    param_of: dict[str, int] = {}
    loads = []  # (address register, bytes)
    for line in ptx.splitlines():
        m = _INSTR_RE.match(line)
        if not m:
            continue
        op, operands = m.groups()
        if op.startswith("ld.param"):
            pm = _PARAM_RE.search(operands)
            regs = _REG_RE.findall(operands)
            if pm and regs:
                param_of[regs[0]] = int(pm.group(1))
            continue
        if op.startswith("ld.global"):
            width = global_loads(line)
            addr = _REG_RE.findall(operands.split("[", 1)[1]) if "[" in operands else []
            if addr and width:
                loads.append((addr[0], next(iter(width))))
            continue
        if op.startswith("cp.async.c"):
            cm = _CP_RE.search(line)
            brackets = re.findall(r"\[([^\]]*)\]", operands)
            if cm and len(brackets) >= 2:
                regs = _REG_RE.findall(brackets[1])
                if regs:
                    loads.append((regs[0], int(cm.group(1), 0)))
            continue
        if op.startswith(("st.", "bar", "bra", "ret", "setp", "cp.async.", "@")):
            continue
        regs = _REG_RE.findall(operands)
        if len(regs) >= 1 and not operands.lstrip().startswith("{"):
            defs[regs[0]].append(regs[1:])

    def roots(reg, seen):
        if reg in param_of:
            i = param_of[reg]
            is_ptr = pointers is None or (i < len(params) and params[i] in pointers)
            return {i} if is_ptr else set()
        if reg in seen:
            return set()
        seen.add(reg)
        out = set()
        for srcs in defs.get(reg, []):
            for r in srcs:
                if r.startswith("%rd"):  # pointers are 64-bit
                    out |= roots(r, seen)
        return out

    result: dict[str, dict[int, int]] = collections.defaultdict(collections.Counter)
    for reg, width in loads:
        found = sorted(roots(reg, set()))
        name = "+".join(params[i] if i < len(params) else f"param{i}" for i in found) or "?"
        result[name][width] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(result.items())}


def analyze_ptx(ptx: str, num_stages: int) -> dict:
    loads = global_loads(ptx)
    cp_async = len(_CP_RE.findall(ptx))
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    tc = []
    if "wgmma.mma_async" in ptx:
        tc.append("wgmma")
    if re.search(r"\bmma\.sync", ptx):
        tc.append("mma")
    return dict(loads={str(k): v for k, v in loads.items()}, ld16=loads.get(16, 0),
                ld_narrow=sum(v for k, v in loads.items() if k < 16), ld_scalar=sum(v for k, v in loads.items() if k <= 2),
                cp_async=cp_async, tma=tma, stages=num_stages if (cp_async or tma) else 1,
                ptx_tc="+".join(tc) or "-")


def compile_one(kernel: str, arch: int, signature: dict, constexprs: dict, attrs: dict, options: dict,
                ptx_dir: str | None = None) -> dict:
    """Compile one binary for sm_<arch>; resources from cuobjdump, loads / pipelining / tensor cores from PTX."""
    import triton
    from triton.backends.compiler import GPUTarget

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    mod, name = kernel.split(":")
    fn = getattr(importlib.import_module(mod), name)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = ""  # disassembling is the slow part of a warm run: only attention's tensor-core check needs it
        if name == "_attn_fwd_kernel":
            sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _RES_RE.search(res)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res}")
    regs, stack, static_smem, local = map(int, m.groups())
    shared = int(compiled.metadata.shared) + static_smem
    params = [n for n, ty in signature.items() if ty != "constexpr"]
    by_ptr = loads_by_pointer(ptx, params, {n for n in params if str(signature[n]).startswith("*")})
    streamed = [p for p in STREAMED.get(name, ()) if p in by_ptr]
    stream_loads = collections.Counter()
    for p in streamed:
        stream_loads.update(by_ptr[p])
    out = dict(regs=regs, stack=stack, local=local, spills=stack + local, shared=shared,
               loads_by_pointer={p: {str(k): v for k, v in w.items()} for p, w in by_ptr.items()},
               stream_ld16=stream_loads.get(16, 0), stream_ld_scalar=sum(v for k, v in stream_loads.items() if k <= 2),
               sass_tc="+".join(sorted(set(re.findall(r"\b(HGMMA|HMMA)\b", sass)))) or "-",
               **analyze_ptx(ptx, options.get("num_stages", 3)))
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        digest = hashlib.sha1(ptx.encode()).hexdigest()[:12]
        out["ptx_file"] = os.path.join(ptx_dir, f"{name.strip('_')}-sm{arch}-{digest}.ptx")
        with open(out["ptx_file"], "w") as f:
            f.write(ptx)
    return out


def _compile_job(args):
    try:
        return compile_one(*args)
    except Exception as e:  # reported per row
        return dict(error=f"{type(e).__name__}: {e}"[:2000])


def check_row(r: dict) -> list[str]:
    """The report's rules for one row; [] when it passes."""
    if r.get("routed"):
        return []
    if "error" in r:
        return ["does not compile"]
    bad = []
    if r["spills"]:
        bad.append(f"spills {r['spills']} B")
    if r["shared"] > r["smem_limit"]:
        bad.append(f"shared memory {r['shared']} > {r['smem_limit']}")
    if r["blocks_per_sm"] < 1:
        bad.append("does not fit on an SM")
    half = r["dtype"] in ("fp16", "bf16")
    streams = r["kernel"].startswith("attention") or r["kernel"] in ("gn_fused", "gn_apply", "gn_partial_stats")
    if half and streams:
        if r["stream_ld16"] == 0:
            bad.append("no 16-byte loads of the activations")
        if r["stream_ld_scalar"]:
            bad.append(f"{r['stream_ld_scalar']} scalar (<= 2-byte) loads of the activations")
    if half and (r["kernel"].startswith("attention") or r["kernel"] in ("gn_fused", "gn_partial_stats")):
        if r["stages"] < 2:  # the looping kernels (gn_apply and gn_finalize run one tile per program)
            bad.append("not pipelined (< 2 stages)")
    if half and r["kernel"].startswith("attention"):
        if r["ptx_tc"] == "-" or r["sass_tc"] == "-":
            bad.append("no tensor-core instructions")
    if r.get("waste") is not None and r["waste"] > MAX_WASTE:
        bad.append(f"padding waste {r['waste']:.2f}x > {MAX_WASTE}x")
    return bad


def run_local(archs=ARCHS, dtypes=tuple(DTYPES), resolutions=RESOLUTIONS, batches=BATCHES, quick=False, jobs=2,
              all_candidates=False, ptx_dir=None) -> list[dict]:
    if interpreter_enabled():
        raise RuntimeError("compiling needs TRITON_INTERPRET unset; use run_report()")
    all_jobs = build_jobs(archs, dtypes, resolutions, batches, quick, all_candidates)
    unique = {}
    for j in all_jobs:
        if not j.routed:
            unique.setdefault(j.key, (j.kernel, j.arch, j.signature, j.constexprs, j.attrs, j.options, ptx_dir))
    keys = list(unique)
    if jobs > 1 and len(keys) > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
            results = dict(zip(keys, ex.map(_compile_job, [unique[k] for k in keys])))
    else:
        results = {k: _compile_job(unique[k]) for k in keys}
    rows = []
    for j in all_jobs:
        r = dict(kernel=j.label, shape=j.shape, dtype=j.dtype, arch=f"sm_{j.arch}", config=j.config,
                 programs=j.programs, waste=j.waste, tensor_cores_required=j.check_tc,
                 smem_limit=ARCH_LIMITS[j.arch]["smem_block"], unique_binaries=len(keys))
        if j.routed:
            r.update(routed=j.routed, binary=None)
        else:
            r["binary"] = keys.index(j.key)
            r.update(results[j.key])
            if "error" not in r:
                r["blocks_per_sm"] = blocks_per_sm(j.arch, r["regs"], j.options.get("num_warps", 4), r["shared"])
        r["failed"] = check_row(r)
        rows.append(r)
    return rows


def run_report(archs=ARCHS, dtypes=tuple(DTYPES), resolutions=RESOLUTIONS, batches=BATCHES, quick=False, jobs=2,
               all_candidates=False, ptx_dir=None, timeout=3600) -> list[dict]:
    """Rows of the report; under the interpreter, computed in a clean subprocess."""
    if not interpreter_enabled():
        return run_local(archs, dtypes, resolutions, batches, quick, jobs, all_candidates, ptx_dir)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", f"{__package__}.report", "--json", "--arch", ",".join(map(str, archs)),
           "--dtype", ",".join(dtypes), "--res", ",".join(map(str, resolutions)),
           "--batch", ",".join(map(str, batches)), "--jobs", str(jobs)]
    if quick:
        cmd.append("--quick")
    if all_candidates:
        cmd.append("--all-candidates")
    if ptx_dir:
        cmd += ["--ptx-dir", ptx_dir]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode not in (0, 1) or not p.stdout.strip():  # 1 = report ran, some rows failed
        raise RuntimeError(f"kernels.report subprocess failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout)


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def launch_counts(res: int = 512, batch: int = 1) -> dict[str, int]:
    """Kernel launches per UNet step (with CFG: attention + group_norm + the fused sampler step) and per VAE
    decode, from kernels/shapes.py and the group_norm launch rule."""
    from .group_norm import launch_count

    gn = lambda calls: sum(c.count * launch_count(c.N, c.C, c.H, c.W, c.groups) for c in calls)
    att = sum(c.count for c in shapes.unet_attention_calls(res, batch))
    unet_gn = gn(shapes.unet_group_norm_calls(res, batch))
    return {"unet_step": att + unet_gn + 1, "unet_attention": att, "unet_group_norm": unet_gn, "cfg_step": 1,
            "vae_decode_group_norm": gn(shapes.vae_decoder_group_norm_calls(res, batch)),
            "unet_group_norm_calls": sum(c.count for c in shapes.unet_group_norm_calls(res, batch))}


def _loads_cell(r) -> str:
    every = " ".join(f"{k}B:{v}" for k, v in r["loads"].items()) or "-"
    return f"{every} | act 16B:{r['stream_ld16']} scalar:{r['stream_ld_scalar']}"


def format_table(rows: list[dict], unique: bool = False) -> str:
    """Aligned text table; `unique` keeps the first launch of each distinct binary."""
    shown = rows
    if unique:
        seen = set()
        shown = [r for r in rows if r.get("binary") is None or not (r["binary"] in seen or seen.add(r["binary"]))]
    cols = ["kernel", "shape", "dtype", "arch", "config", "regs", "spill", "smem/limit KB", "blk/SM", "loads",
            "cp.async", "stages", "tensor cores", "waste", "check"]
    table = []
    for r in shown:
        base = [r["kernel"], r["shape"], r["dtype"], r["arch"], r["config"]]
        if r.get("routed"):
            table.append(base + ["", "", "", "", "", "", "", "", "", "routed: " + r["routed"][:60]])
            continue
        if "error" in r:
            table.append(base + ["ERROR", r["error"][:60]] + [""] * 8 + ["FAILED"])
            continue
        tc = f"{r['ptx_tc']} ({r['sass_tc']})" if r["tensor_cores_required"] else ""
        table.append(base + [str(r["regs"]), str(r["spills"]), f"{r['shared'] / 1024:.1f}/{r['smem_limit'] // 1024}",
                             str(r["blocks_per_sm"]), _loads_cell(r), str(r["cp_async"] + r["tma"]), str(r["stages"]),
                             tc, "" if r["waste"] is None else f"{r['waste']:.2f}",
                             "ok" if not r["failed"] else "FAILED: " + "; ".join(r["failed"])])
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(cols), line(["-" * w for w in widths])] + [line(t) for t in table]
    out.append("\n" + summary(rows, unique))
    return "\n".join(out)


def summary(rows: list[dict], unique: bool = False) -> str:
    """Per-arch totals (spills, smem vs limit, vector loads, stages, padding waste) and the launch counts."""
    compiled = [r for r in rows if not r.get("routed") and "error" not in r]
    uniq = rows[0]["unique_binaries"] if rows else 0
    lines = [f"{len(rows)} launches ({'one row per distinct binary shown' if unique else 'all rows'}), {uniq} distinct "
             f"binaries; {sum('error' in r for r in rows)} failed to compile, {sum(bool(r.get('routed')) for r in rows)} "
             f"routed to torch by kernels.dispatch; {sum(bool(r['failed']) for r in rows)} break a rule"]
    for arch in sorted({r["arch"] for r in compiled}):
        rs = [r for r in compiled if r["arch"] == arch]
        att = [r for r in rs if r["kernel"].startswith("attention") and r["dtype"] != "fp32"]
        gn = [r for r in rs if r["kernel"].startswith("gn_") and r["dtype"] != "fp32"]
        wastes = [r["waste"] for r in rs if r["waste"] is not None]
        lines.append(
            f"{arch}: spills {sum(r['spills'] > 0 for r in rs)}/{len(rs)} launches; max smem "
            f"{max(r['shared'] for r in rs) / 1024:.1f} KB of {rs[0]['smem_limit'] // 1024} KB; fp16/bf16 attention: "
            f"{sum(r['stream_ld16'] > 0 and r['stream_ld_scalar'] == 0 for r in att)}/{len(att)} with 16-byte q/k/v loads "
            f"and no scalar ones, "
            f"stages {min((r['stages'] for r in att), default=0)}-{max((r['stages'] for r in att), default=0)}, "
            f"tensor cores {sum(r['ptx_tc'] != '-' for r in att)}/{len(att)}; fp16/bf16 group_norm: "
            f"{sum(r['stream_ld16'] > 0 and r['stream_ld_scalar'] == 0 for r in gn)}/{len(gn)} with 16-byte x loads and no "
            f"scalar ones, stages {min((r['stages'] for r in gn if r['kernel'] != 'gn_apply'), default=0)}+; "
            f"padding waste max {max(wastes, default=1.0):.2f}x; min blocks/SM {min(r['blocks_per_sm'] for r in rs)}")
    lc = launch_counts(512, 1)
    lines.append(f"launches at 512 px: UNet step {lc['unet_step']} ({lc['unet_attention']} attention, "
                 f"{lc['unet_group_norm']} group_norm for {lc['unet_group_norm_calls']} calls, 1 cfg_step); VAE decode "
                 f"{lc['vae_decode_group_norm']} group_norm")
    return "\n".join(lines)


def _csv(what: str, check):
    """An argparse type: a comma-separated, non-empty list, each item through `check` (a value or ValueError)."""
    def parse(s: str) -> tuple:
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected one or more comma-separated {what}, got {s!r}")
        try:
            return tuple(check(x) for x in items)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _one_of(what: str, options):
    by_name = {str(o): o for o in options}

    def check(x: str):
        if x not in by_name:
            raise ValueError(f"unknown {what} {x!r}; choose from {', '.join(by_name)}")
        return by_name[x]
    return check


def main(argv=None) -> int:
    from .traffic import GPUS

    ap = ArgumentParser(prog="python -m fastsd.kernels.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=_csv("sm archs", _one_of("arch", ARCH_LIMITS)), default=ARCHS,
                    help="comma-separated sm archs")
    ap.add_argument("--dtype", type=_csv("dtypes", _one_of("dtype", DTYPES)), default=tuple(DTYPES))
    ap.add_argument("--res", type=_csv("sizes", int_in(64, 4096, multiple=8)), default=RESOLUTIONS, help="image sizes in px")
    ap.add_argument("--batch", type=_csv("batch sizes", int_in(1, 64)), default=BATCHES,
                    help="images per prompt (the UNet runs twice as many with CFG)")
    ap.add_argument("--quick", action="store_true", help="a representative subset of shapes")
    ap.add_argument("--all-candidates", action="store_true", help="every autotune candidate, not only the default")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--ptx-dir", help="write the PTX of every distinct binary here (for audit)")
    ap.add_argument("--jobs", type=positive_int, default=2, help="parallel compile processes")
    ap.add_argument("--unique", action="store_true", help="one table row per distinct binary")
    ap.add_argument("--project", choices=list(GPUS), help="roofline PROJECTION for a GPU from kernels/traffic.py; "
                                                          "no compiling, no measurement")
    a = ap.parse_args(argv)
    if a.project:
        from .traffic import format_projection

        dtype = a.dtype[0] if a.dtype != tuple(DTYPES) else "fp16"
        print(format_projection(a.project, a.res[0], dtype, json_out=a.json))
        return 0
    if a.ptx_dir:
        try:
            os.makedirs(a.ptx_dir, exist_ok=True)
        except OSError as e:
            ap.error(f"--ptx-dir {a.ptx_dir}: can't be made ({e.strerror})")
        if not os.access(a.ptx_dir, os.W_OK):
            ap.error(f"--ptx-dir {a.ptx_dir}: not writable")
    rows = run_report(a.arch, a.dtype, a.res, a.batch, a.quick, a.jobs, a.all_candidates, a.ptx_dir)
    print(json.dumps(rows, indent=1) if a.json else format_table(rows, a.unique))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
