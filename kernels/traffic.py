"""Bytes moved per kernel vs the unfused torch op sequence it replaces, at SD1.5 shapes (kernels/shapes.py), and
the roofline PROJECTION built on them (`python -m fastsd.kernels.report --project h100`).

    python -m fastsd.kernels.traffic [--res 512] [--dtype fp16]

COMPUTED from the launch configs and tensor shapes (nothing is measured: there is no GPU here). Bytes are
global-memory requests counted at tensor granularity, with no cache model:
  - kernels: every load/store the launch issues, re-reads included (e.g. attention's K/V are streamed
    again by every query block even though on a GPU most of those re-reads hit L2), scratch included;
  - unfused torch: each op reads its inputs once and writes its output once (GEMM operand re-reads
    inside cuBLAS are NOT counted), i.e. a lower bound for the torch sequence.
Both choices favour torch, so the ratios are conservative.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from . import shapes
from ._utils import cdiv
from fastsd.cli import ArgumentParser, int_in

ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass
class Row:
    op: str
    case: str
    per_call: int | None   # launches of this shape per UNet call (None: not counted)
    kernel_bytes: int
    torch_bytes: int
    torch_ops: str         # the unfused sequence counted
    min_bytes: int = 0     # every input read once, every output written once (SDPA's traffic for attention)
    flops: float = 0.0     # useful FLOPs (attention: 4 B H Lq Lk D; elementwise ops: ~ per element)
    waste: float = 1.0     # tensor-core work executed / useful (attention's padding)

    @property
    def ratio(self) -> float:
        return self.torch_bytes / self.kernel_bytes


def _seq(ops):
    """[(name, read_bytes, write_bytes)] -> (total bytes, 'name+name+...')."""
    return sum(r + w for _, r, w in ops), " + ".join(n for n, _, _ in ops)


# ------------------------------------------------------------------------------------------------ attention
def attention_rows(res: int, dtype: str, batch: int = 1) -> list[Row]:
    from . import attention as A
    import torch

    e = ELEM[dtype]
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    rows = []
    for c in shapes.unet_attention_calls(res, batch):
        L, Lk, D = c.Lq, c.Lk, c.D
        cfg = A.attention_config(D, L, Lk, dt, 90)
        bh = c.B * c.H
        q = o = L * D * e
        kv = Lk * D * e
        n_qblocks = cdiv(L, cfg.BLOCK_M)
        kernel = bh * (q + o + 2 * n_qblocks * kv)
        S = L * Lk * e  # one head's score / probability matrix
        torch_bytes, seq = _seq([("baddbmm(q,k^T)*scale", bh * (q + kv), bh * S), ("softmax", bh * S, bh * S),
                                 ("bmm(P,v)", bh * (S + kv), bh * o)])
        rows.append(Row("attention", f"{c.label} (BLOCK_M {cfg.BLOCK_M}: K/V read {n_qblocks}x)", c.count, kernel,
                        torch_bytes, seq, min_bytes=bh * (q + o + 2 * kv), flops=4.0 * bh * L * Lk * D,
                        waste=A.padding_waste(cfg, L, Lk, D)))
    return rows


# ------------------------------------------------------------------------------------------------ group norm
def group_norm_rows(res: int, dtype: str, batch: int = 1) -> list[Row]:
    """The UNet's GroupNorm(+SiLU) launches (batch with CFG) and the VAE decoder's (one image per batch)."""
    from . import group_norm as GN

    e = ELEM[dtype]
    rows = []
    for c in shapes.unet_group_norm_calls(res, batch) + shapes.vae_decoder_group_norm_calls(res, batch):
        N, C, HW, G = c.N, c.C, c.H * c.W, c.groups
        x = y = N * C * HW * e
        params = 2 * C * e
        fused = GN.fused_config(C, HW, G, channels_last=False)
        if fused is not None:  # one launch: x read twice (statistics, normalise), y written once
            kernel, _ = _seq([("fused", 2 * x + params, y)])
            how = "1 launch"
        else:
            cfg = GN.group_norm_config(N, C, HW, G, channels_last=False)
            partials = 2 * N * C * cfg.num_splits * 4            # per-channel (mean, M2) partials, fp32
            stats = 2 * N * G * 4                                # per-group (mean, rstd), fp32
            per_channel = cdiv(HW, cfg.BLOCK_S) * N * C * (2 * e + 2 * 4)  # apply programs: weight, bias, mean, rstd
            kernel, _ = _seq([("stats", x, partials), ("finalize", partials, stats), ("apply", x + per_channel, y)])
            how = f"3 launches, stats splits {cfg.num_splits}"
        stats = 2 * N * G * 4
        ops = [("F.group_norm moments pass", x, stats), ("F.group_norm apply pass", x + stats + params, y)]
        if c.silu:
            ops.append(("F.silu", y, y))
        torch_bytes, seq = _seq(ops)
        rows.append(Row("group_norm+silu" if c.silu else "group_norm", f"{c.label} ({how})",
                        c.count if c.where.startswith("unet") else None, kernel, torch_bytes, seq,
                        min_bytes=x + params + y, flops=(12.0 if c.silu else 8.0) * N * C * HW))
    return rows


# ------------------------------------------------------------------------------------------------ cfg step
PATTERNS = [("euler / dpmpp_2m 1st", True, False, False), ("euler_a / ddpm (noise)", True, False, True),
            ("dpmpp_2m (old)", True, True, False), ("dpmpp_2m last (a=0)", False, False, False)]


def cfg_step_rows(res: int, model_dtype: str, images: int = 1) -> list[Row]:
    """Fused: read x, uncond, cond (+ old, + noise), write x_next and denoised. Unfused: the exact torch op
    sequence of fastsd.backends.reference.cfg_step (guidance as CFGDenoiser did it, then the update)."""
    n = images * 4 * (res // 8) ** 2
    em, ex = ELEM[model_dtype], 4  # latents fp32; denoised promoted to fp32
    rows = []
    for label, has_x, has_old, has_noise in PATTERNS:
        kernel = n * (2 * em + (ex if has_x else 0) + (ex if has_old else 0) + (ex if has_noise else 0) + 2 * ex)
        ops = []
        if em != ex:
            ops += [("uncond.float()", n * em, n * ex), ("cond.float()", n * em, n * ex)]
        ops += [("cond-uncond", 2 * n * ex, n * ex), ("*scale", n * ex, n * ex), ("uncond+", 2 * n * ex, n * ex),
                ("denoised*b", n * ex, n * ex)]
        if has_x:
            ops.append(("add(x,alpha=a)", 2 * n * ex, n * ex))
        if has_old:
            ops.append(("add_(old,alpha=c)", 2 * n * ex, n * ex))
        if has_noise:
            ops.append(("add_(noise,alpha=d)", 2 * n * ex, n * ex))
        torch_bytes, seq = _seq(ops)
        rows.append(Row("cfg_step", f"{label}: x fp32 {images}x4x{res // 8}x{res // 8}, model out "
                                    f"{model_dtype} {2 * images}x4x{res // 8}x{res // 8}", None, kernel, torch_bytes,
                        f"{len(ops)} ops: {seq}", min_bytes=kernel, flops=10.0 * n))
    return rows


# ------------------------------------------------------------------------------------------------ output
def _mb(b: float) -> str:
    return f"{b / 2 ** 20:,.2f}"


def format_markdown(rows: list[Row]) -> str:
    out = ["| op | case | launches / UNet call | kernel MiB | unfused torch MiB | torch / kernel |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.op} | {r.case} | {'-' if r.per_call is None else r.per_call} | {_mb(r.kernel_bytes)} | {_mb(r.torch_bytes)} | {r.ratio:.2f}x |")
    return "\n".join(out)


def all_rows(res: int = 512, dtype: str = "fp16", batch: int = 1) -> dict[str, list[Row]]:
    return {"attention": attention_rows(res, dtype, batch), "group_norm": group_norm_rows(res, dtype, batch),
            "cfg_step": cfg_step_rows(res, "fp32", batch) + cfg_step_rows(res, dtype, batch)}


# ------------------------------------------------------------------------------------------------ projection
# Datasheet peaks (dense, no sparsity): HBM bandwidth, fp16/bf16 tensor-core FLOP/s with fp32 accumulation, fp32 FMA.
GPUS = {
    "h100": dict(name="H100 SXM5 80GB", bw=3.35e12, tc=989.4e12, fp32=66.9e12),
    "a100": dict(name="A100 SXM4 80GB", bw=2.039e12, tc=312e12, fp32=19.5e12),
    "4090": dict(name="RTX 4090", bw=1.008e12, tc=165.2e12, fp32=82.6e12),
}


def roofline_s(bytes_: float, flops: float, gpu: dict, tensor_cores: bool = True) -> float:
    """max(bytes / bandwidth, FLOPs / peak): the time no implementation can beat, launch latency not included."""
    return max(bytes_ / gpu["bw"], flops / (gpu["tc"] if tensor_cores else gpu["fp32"]))


def projection_rows(gpu_name: str, res: int = 512, dtype: str = "fp16", batch: int = 1) -> list[dict]:
    """Per launch shape: roofline time of the Triton kernel, of SDPA (attention: q/k/v read once, o written once,
    useful FLOPs only: SDPA's best case) and of the unfused torch sequence; times count per UNet call.
    Kernel HBM bytes for attention are min_bytes too: one (batch, head)'s K/V (<= 1.5 MB at SD1.5 shapes) stays in
    L2 (40-50 MB) across its query blocks, so the re-reads traffic.py counts are assumed L2 hits here; the kernel
    pays its padding waste in FLOPs. Likewise the one-launch GroupNorm's second read of its group (<= 0.6 MB).
    Launch latency (~2-5 us per launch, host-bound without CUDA graphs) is not included."""
    gpu = GPUS[gpu_name]
    tc = dtype != "fp32"
    out = []
    rows = all_rows(res, dtype, batch)
    for r in rows["attention"]:
        out.append(dict(op="attention", case=r.case.split(" (")[0], per_call=r.per_call,
                        triton_s=roofline_s(r.min_bytes, r.flops * r.waste, gpu, tc),
                        sdpa_s=roofline_s(r.min_bytes, r.flops, gpu, tc),
                        unfused_s=roofline_s(r.torch_bytes, r.flops, gpu, tc), waste=r.waste))
    for r in rows["group_norm"] + rows["cfg_step"][:1]:
        if r.op != "cfg_step" and r.per_call is None:
            continue  # VAE rows: not part of the UNet step
        hbm = r.min_bytes if "(1 launch)" in r.case else r.kernel_bytes  # fused GN: second read of x from L2
        out.append(dict(op=r.op, case=r.case, per_call=r.per_call or 1,
                        triton_s=roofline_s(hbm, r.flops, gpu, False), sdpa_s=None,
                        unfused_s=roofline_s(r.torch_bytes, r.flops, gpu, False), waste=1.0))
    return out


def format_projection(gpu_name: str, res: int = 512, dtype: str = "fp16", batch: int = 1, json_out: bool = False) -> str:
    if gpu_name not in GPUS:
        raise SystemExit(f"error: unknown GPU {gpu_name!r}; choose from {', '.join(GPUS)}")
    rows = projection_rows(gpu_name, res, dtype, batch)
    if json_out:
        import json

        return json.dumps(rows, indent=1)
    gpu = GPUS[gpu_name]
    us = lambda t: "-" if t is None else f"{t * 1e6:,.1f}"
    lines = [f"# PROJECTION, not a measurement: roofline times on {gpu['name']} ({gpu['bw'] / 1e12:.2f} TB/s, "
             f"{gpu['tc'] / 1e12:.0f} TFLOP/s fp16/bf16 tensor cores), SD1.5 UNet step at {res} px, batch {batch} "
             f"with CFG, {dtype}",
             "# time = max(HBM bytes / bandwidth, FLOPs / peak); launch latency, occupancy and L2 effects not modelled "
             "(attention K/V re-reads assumed L2 hits). No GPU timing exists yet: measure with",
             "#   python -m fastsd.benchmarks run --suite kernels,unet --device cuda --backend torch,triton", "",
             "| op | case | launches / UNet call | padding waste | Triton kernel us | SDPA us (best case) | unfused torch us |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['case']} | {r['per_call']} | {r['waste']:.2f} | {us(r['triton_s'])} | "
                     f"{us(r['sdpa_s'])} | {us(r['unfused_s'])} |")
    for op in ("attention", "group_norm", "cfg_step"):
        rs = [r for r in rows if r["op"].startswith(op)]
        t = sum(r["triton_s"] * r["per_call"] for r in rs)
        u = sum(r["unfused_s"] * r["per_call"] for r in rs)
        sd = sum(r["sdpa_s"] * r["per_call"] for r in rs) if op == "attention" else None
        lines.append(f"| **{op}, per UNet step** | | {sum(r['per_call'] for r in rs)} | | {us(t)} | {us(sd)} | {us(u)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m fastsd.kernels.traffic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int_in(64, 4096, multiple=8), default=512)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    a = ap.parse_args(argv)
    groups = all_rows(a.res, a.dtype)
    print(f"# Bytes moved, SD1.5 {a.res} px, {a.dtype} (COMPUTED from shapes and launch configs, not measured)\n")
    print(__doc__.split("\n\n")[2].strip() + "\n")
    for name, rows in groups.items():
        print(format_markdown(rows))
        if name == "attention":
            k = sum(r.kernel_bytes * r.per_call for r in rows)
            t = sum(r.torch_bytes * r.per_call for r in rows)
            useful = sum(r.flops * r.per_call for r in rows)
            executed = sum(r.flops * r.waste * r.per_call for r in rows)
            print(f"\nPer UNet call: attention tensor-core work {executed / 1e9:,.0f} GFLOP executed for "
                  f"{useful / 1e9:,.0f} useful ({executed / useful:.2f}x padding waste, default configs).")
            print(f"Per UNet call (all {sum(r.per_call for r in rows)} attention launches): kernel {_mb(k)} MiB, unfused torch {_mb(t)} MiB "
                  f"({t / k:.1f}x).")
        print("\nunfused sequences counted:")
        for seq in dict.fromkeys(r.torch_ops for r in rows):
            print(f"- {seq}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
