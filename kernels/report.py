"""Ahead-of-time compile report for the Triton kernels (no GPU needed).

    python -m fastsd.kernels.report [--arch 80,90] [--json] [--quick] [--unique] [--res 512,768] [--dtype fp16,bf16] [--jobs 2]

Compiles every kernel launch SD1.5 makes at 512 px and 768 px (UNet batch 2 for CFG, VAE decoder
batch 1 and 2) in fp16 and bf16 for each requested sm arch (cfg_step: fp32 latents of 1 and 2 images
with an fp16/bf16/fp32 model output, every sampler flag combination), exactly as the launchers would specialise
them (the launch plans are built from meta tensors and run through Triton's own argument
specialisation), then reads registers, spills and shared memory with the bundled `cuobjdump
-res-usage` and checks the attention PTX/SASS for tensor-core instructions (mma.sync / HMMA on sm_80,
wgmma / HGMMA or mma on sm_90).

Launches whose binaries are identical (same kernel, signature, constexprs, divisibility, options and
arch) are compiled once; Triton's on-disk cache (~/.triton/cache) makes re-runs fast.

Compilation needs the real `triton.jit` functions, which TRITON_INTERPRET=1 replaces, so under the
interpreter (e.g. from pytest) `run_report` re-runs this module in a subprocess without it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
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

from ._utils import interpreter_enabled

ARCHS = (80, 90)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
UNET_BATCH = 2      # classifier-free guidance: cond + uncond
HEADS = 8
TEXT_LEN = 77
GROUPS = 32


# ----------------------------------------------------------------------------------------------
# SD1.5 launch shapes
# ----------------------------------------------------------------------------------------------
def attention_shapes(res: int) -> list[tuple[str, int, int, int]]:
    """(where, Lq, Lk, head_dim) for the UNet at image size `res` (latent res/8). SD1.5 has
    SpatialTransformers at latent /1, /2, /4 (head dims 40, 80, 160) and in the middle block (/8, 160);
    each has self-attention (Lk = Lq) and cross-attention on the 77 CLIP tokens."""
    lat = res // 8
    levels = [(f"{lat}x{lat}", lat * lat, 40), (f"{lat // 2}x{lat // 2}", (lat // 2) ** 2, 80),
              (f"{lat // 4}x{lat // 4}", (lat // 4) ** 2, 160), (f"mid {lat // 8}x{lat // 8}", (lat // 8) ** 2, 160)]
    out = []
    for where, L, D in levels:
        out.append((f"self {where}", L, L, D))
        out.append((f"cross {where}", L, TEXT_LEN, D))
    return out


LATENT_CHANNELS = 4
CFG_BATCHES = (1, 2)  # images per prompt: the model output is (2B, 4, h, w) (uncond + cond halves)
CFG_MODEL_DTYPES = ("fp16", "bf16", "fp32")  # the latents x are fp32; the model output any of these


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


def group_norm_shapes(res: int) -> list[tuple[str, int, int, int, float, bool]]:
    """(where, N, C, side, eps, silu): UNet ResBlock norms (eps 1e-5, SiLU) on every channel count
    they see, including the decoder's concatenated skips, SpatialTransformer norms (eps 1e-6, no SiLU),
    the UNet's final norm, and the VAE decoder's norms (eps 1e-6) at N = 1 and 2."""
    lat = res // 8
    resblock = {lat: (320, 640, 960), lat // 2: (320, 640, 960, 1280, 1920),
                lat // 4: (640, 1280, 1920, 2560), lat // 8: (1280, 2560)}
    transformer = {lat: 320, lat // 2: 640, lat // 4: 1280, lat // 8: 1280}
    out = []
    for side, chans in resblock.items():
        for c in chans:
            out.append(("unet resblock", UNET_BATCH, c, side, 1e-5, True))
    for side, c in transformer.items():
        out.append(("unet transformer", UNET_BATCH, c, side, 1e-6, False))
    vae = [(512, lat, True), (512, lat, False), (512, 2 * lat, True), (512, 4 * lat, True),
           (256, 4 * lat, True), (256, 8 * lat, True), (128, 8 * lat, True)]
    for n in (1, 2):
        for c, side, silu in vae:
            out.append(("vae " + ("resblock" if silu else "attn norm"), n, c, side, 1e-6, silu))
    return out


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
    check_tc: bool = False
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


def _cfg_step_jobs(archs, dtypes, resolutions, quick) -> list[Job]:
    """kernels.cfg_step at the SD1.5 latent shapes: fp32 latents, model output (2B, 4, h, w) in
    CFG_MODEL_DTYPES (plus any other requested dtype), every sampler flag combination."""
    from . import cfg_step as CS
    meta = dict(device="meta")
    f32 = dict(dtype=torch.float32, **meta)
    all_dt = dict(DTYPES, fp32=torch.float32)
    model_dtypes = [d for d in all_dt if d in CFG_MODEL_DTYPES or d in dtypes]
    patterns = cfg_step_patterns()
    batches = CFG_BATCHES
    if quick:  # the guided patterns at one shape, fp16 model output
        model_dtypes, patterns, batches, resolutions = ["fp16"], [p for p in patterns if p[4]], (1,), resolutions[:1]
    jobs = []
    for res in resolutions:
        lat = res // 8
        for B in batches:
            shape = (B, LATENT_CHANNELS, lat, lat)
            for dname in model_dtypes:
                out = torch.empty((2 * B, *shape[1:]), dtype=all_dt[dname], **meta)
                uncond, cond = out.chunk(2)
                x, old, noise = (torch.empty(shape, **f32) for _ in range(3))
                for arch in archs:
                    for label, coeffs, has_old, has_noise, guided in patterns:
                        x_out = torch.empty(shape, **f32)
                        d_out = torch.empty(shape, **f32)
                        fn, grid, args, cx, opts = CS.launch_plan(x, uncond if guided else None, cond,
                                                                  old if has_old else None,
                                                                  noise if has_noise else None, x_out, d_out,
                                                                  7.5, coeffs)
                        sig, consts, attrs = _signature(fn, args, cx)
                        jobs.append(Job(f"{__package__}.cfg_step:_cfg_step_kernel", "cfg_step",
                                        f"{res}px B{B} x fp32 {'x'.join(map(str, shape))}, model out "
                                        f"{2 * B}x{'x'.join(map(str, shape[1:]))} ({label})",
                                        dname, arch, sig, consts, attrs, opts,
                                        _fmt_config(cx, opts, ("BLOCK",)) + f" grid={grid[0]}"))
    return jobs


def build_jobs(archs=ARCHS, dtypes=tuple(DTYPES), resolutions=(512, 768), quick=False) -> list[Job]:
    from . import attention as A, group_norm as GN
    meta = dict(device="meta")
    jobs = []
    for res in resolutions:
        att = attention_shapes(res)
        gn = group_norm_shapes(res)
        if quick:  # one self + one cross per head dim, and a UNet + VAE group norm
            att = [s for s in att if not s[0].startswith("self mid")]
            att = att[:6]
            gn = [gn[0], gn[-1]]
        for dname in dtypes:
            dt = DTYPES[dname]
            for arch in archs:
                for where, Lq, Lk, D in att:
                    C = HEADS * D
                    # the UNet's layout: to_q(x).view(B, L, H, D).transpose(1, 2)
                    q = torch.empty(UNET_BATCH, Lq, HEADS, D, dtype=dt, **meta).transpose(1, 2)
                    k = torch.empty(UNET_BATCH, Lk, HEADS, D, dtype=dt, **meta).transpose(1, 2)
                    out = A.empty_output(q)
                    fn, grid, args, cx, opts = A.launch_plan(q, k, k, out, arch=arch)
                    sig, consts, attrs = _signature(fn, args, cx)
                    jobs.append(Job(f"{__package__}.attention:_attn_fwd_kernel", "attention",
                                    f"{res}px {where} B{UNET_BATCH} H{HEADS} Lq{Lq} Lk{Lk} D{D} (C{C})",
                                    dname, arch, sig, consts, attrs, opts,
                                    _fmt_config(cx, opts, ("BLOCK_M", "BLOCK_N", "BLOCK_D")), check_tc=True))
                for where, N, C, side, eps, silu in gn:
                    x = torch.empty(N, C, side, side, dtype=dt, **meta)
                    w = torch.empty(C, dtype=dt, **meta)
                    launches, cfg = GN.launch_plan(x, torch.empty_like(x), w, w, GROUPS, eps, silu)
                    for fn, grid, args, cx, opts in launches:
                        sig, consts, attrs = _signature(fn, args, cx)
                        name = fn.__name__.replace("_gn_", "gn_").replace("_kernel", "")
                        extra = f" splits={cfg.num_splits}" if "stats" in name else ""
                        jobs.append(Job(f"kernels.group_norm:{fn.__name__}", name,
                                        f"{res}px {where} N{N} C{C} {side}x{side} G{GROUPS} eps{eps:g}"
                                        + (" silu" if silu else ""), dname, arch, sig, consts, attrs, opts,
                                        _fmt_config(cx, opts, ("BLOCK_C", "BLOCK_S", "BLOCK_CG", "BLOCK_SPLIT"))
                                        + extra))
    jobs += _cfg_step_jobs(archs, dtypes, resolutions, quick)
    for j in jobs:
        j.key = (j.kernel, j.arch, tuple(sorted(j.signature.items())), tuple(sorted((k, str(v)) for k, v in j.constexprs.items())),
                 tuple(sorted(j.attrs)), tuple(sorted(j.options.items())))
    return jobs


# ----------------------------------------------------------------------------------------------
# compiling and reading the binary
# ----------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_one(kernel: str, arch: int, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile one binary for sm_<arch>; registers/spills/smem from cuobjdump, tensor-core use."""
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
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _RES_RE.search(res)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res}")
    regs, stack, static_smem, local = map(int, m.groups())
    tc = []
    if "wgmma.mma_async" in ptx:
        tc.append("wgmma")
    if re.search(r"\bmma\.sync", ptx):
        tc.append("mma")
    sass_tc = sorted(set(re.findall(r"\b(HGMMA|HMMA)\b", sass)))
    return dict(regs=regs, stack=stack, local=local, spills=stack + local,
                shared=int(compiled.metadata.shared) + static_smem, ptx_tc="+".join(tc) or "-",
                sass_tc="+".join(sass_tc) or "-")


def _compile_job(args):
    try:
        return compile_one(*args)
    except Exception as e:  # reported per row
        return dict(error=f"{type(e).__name__}: {e}"[:2000])


def run_local(archs=ARCHS, dtypes=tuple(DTYPES), resolutions=(512, 768), quick=False, jobs=2) -> list[dict]:
    if interpreter_enabled():
        raise RuntimeError("compiling needs TRITON_INTERPRET unset; use run_report()")
    all_jobs = build_jobs(archs, dtypes, resolutions, quick)
    unique = {}
    for j in all_jobs:
        unique.setdefault(j.key, (j.kernel, j.arch, j.signature, j.constexprs, j.attrs, j.options))
    keys = list(unique)
    if jobs > 1 and len(keys) > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
            results = dict(zip(keys, ex.map(_compile_job, [unique[k] for k in keys])))
    else:
        results = {k: _compile_job(unique[k]) for k in keys}
    rows = []
    for j in all_jobs:
        r = dict(kernel=j.label, shape=j.shape, dtype=j.dtype, arch=f"sm_{j.arch}", config=j.config,
                 tensor_cores_required=j.check_tc, binary=keys.index(j.key), unique_binaries=len(keys))
        r.update(results[j.key])
        rows.append(r)
    return rows


def run_report(archs=ARCHS, dtypes=tuple(DTYPES), resolutions=(512, 768), quick=False, jobs=2,
               timeout=900) -> list[dict]:
    """Rows of the report; under the interpreter, computed in a clean subprocess."""
    if not interpreter_enabled():
        return run_local(archs, dtypes, resolutions, quick, jobs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", f"{__package__}.report", "--json", "--arch", ",".join(map(str, archs)),
           "--dtype", ",".join(dtypes), "--res", ",".join(map(str, resolutions)), "--jobs", str(jobs)]
    if quick:
        cmd.append("--quick")
    p = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    if p.returncode not in (0, 1) or not p.stdout.strip():  # 1 = report ran, some rows failed
        raise RuntimeError(f"kernels.report subprocess failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout)


def format_table(rows: list[dict], unique: bool = False) -> str:
    """Aligned text table; `unique` keeps the first launch of each distinct binary."""
    all_rows = rows
    if unique:
        seen = set()
        rows = [r for r in rows if not (r["binary"] in seen or seen.add(r["binary"]))]
    cols = ["kernel", "shape", "dtype", "arch", "config", "regs", "spill(local/stack)", "smem", "tensor cores"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["kernel"], r["shape"], r["dtype"], r["arch"], r["config"], "ERROR", r["error"][:60], "", ""])
            continue
        tc = f"{r['ptx_tc']} ({r['sass_tc']})" if r["tensor_cores_required"] else ""
        table.append([r["kernel"], r["shape"], r["dtype"], r["arch"], r["config"], str(r["regs"]),
                      f"{r['local']}/{r['stack']}", str(r["shared"]), tc])
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(cols), line(["-" * w for w in widths])] + [line(t) for t in table]
    rows = all_rows
    n_err = sum("error" in r for r in rows)
    n_spill = sum(r.get("spills", 0) > 0 for r in rows)
    n_notc = sum(r["tensor_cores_required"] and r.get("ptx_tc", "-") == "-" for r in rows)
    uniq = rows[0]["unique_binaries"] if rows else 0
    out.append(f"\n{len(rows)} launches ({'one row per distinct binary' if unique else 'all rows'}), {uniq} distinct binaries; {n_err} failed to compile, "
               f"{n_spill} with spills, {n_notc} attention launches without tensor-core instructions")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsd.kernels.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated sm archs (default 80,90)")
    ap.add_argument("--dtype", default="fp16,bf16")
    ap.add_argument("--res", default="512,768", help="image sizes in px")
    ap.add_argument("--quick", action="store_true", help="a representative subset of shapes")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    ap.add_argument("--unique", action="store_true", help="one table row per distinct binary")
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.arch.split(",") if x)
    dtypes = tuple(x for x in a.dtype.split(",") if x)
    resolutions = tuple(int(x) for x in a.res.split(",") if x)
    rows = run_report(archs, dtypes, resolutions, a.quick, a.jobs)
    print(json.dumps(rows, indent=1) if a.json else format_table(rows, a.unique))
    bad = any("error" in r or r.get("spills", 0) for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
