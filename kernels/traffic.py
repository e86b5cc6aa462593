"""Bytes moved per kernel vs the unfused torch op sequence it replaces, at SD1.5 512 px shapes.

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

import argparse
import sys
from dataclasses import dataclass

from ._utils import cdiv

ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}
HEADS = 8
TEXT_LEN = 77
UNET_BATCH = 2  # CFG: uncond + cond
GROUPS = 32
# SpatialTransformers per UNet call at each level (2 down + 3 up at the three attention levels, 1 in the middle)
TRANSFORMERS = {0: 5, 1: 5, 2: 5, "mid": 1}


@dataclass
class Row:
    op: str
    case: str
    per_call: int | None   # attention: launches of this shape per UNet call (None: not counted)
    kernel_bytes: int
    torch_bytes: int
    torch_ops: str         # the unfused sequence counted

    @property
    def ratio(self) -> float:
        return self.torch_bytes / self.kernel_bytes


def _seq(ops):
    """[(name, read_bytes, write_bytes)] -> (total bytes, 'name+name+...')."""
    return sum(r + w for _, r, w in ops), " + ".join(n for n, _, _ in ops)


# ------------------------------------------------------------------------------------------------ attention
def attention_rows(res: int, dtype: str) -> list[Row]:
    from . import attention as A
    import torch

    e = ELEM[dtype]
    lat = res // 8
    levels = [(0, lat, 40), (1, lat // 2, 80), (2, lat // 4, 160), ("mid", lat // 8, 160)]
    rows = []
    for lvl, side, D in levels:
        L = side * side
        for kind, Lk in (("self", L), ("cross", TEXT_LEN)):
            cfg = A.attention_config(D, L, Lk, torch.float16)
            bh = UNET_BATCH * HEADS
            q = o = L * D * e
            kv = Lk * D * e
            n_qblocks = cdiv(L, cfg.BLOCK_M)
            kernel = bh * (q + o + 2 * n_qblocks * kv)
            S = L * Lk * e  # one head's score / probability matrix
            torch_bytes, seq = _seq([("baddbmm(q,k^T)*scale", bh * (q + kv), bh * S), ("softmax", bh * S, bh * S),
                                     ("bmm(P,v)", bh * (S + kv), bh * o)])
            where = f"{side}x{side}" if lvl != "mid" else f"mid {side}x{side}"
            rows.append(Row("attention", f"{kind} {where} B{UNET_BATCH} H{HEADS} Lq{L} Lk{Lk} D{D} "
                                         f"(BLOCK_M {cfg.BLOCK_M}: K/V read {n_qblocks}x)",
                            TRANSFORMERS[lvl], kernel, torch_bytes, seq))
    return rows


# ------------------------------------------------------------------------------------------------ group norm
def group_norm_rows(res: int, dtype: str) -> list[Row]:
    from . import group_norm as GN
    from .report import group_norm_shapes

    e = ELEM[dtype]
    rows, seen = [], set()
    for where, N, C, side, eps, silu in group_norm_shapes(res):
        # the fused GroupNorm+SiLU launches: UNet ResBlocks (batch 2) and VAE decoder ResBlocks (one image)
        if not silu or (N, C, side) in seen or where.startswith("vae") and N != 1:
            continue
        seen.add((N, C, side))
        HW = side * side
        cfg = GN.group_norm_config(N, C, HW, GROUPS, channels_last=False)
        x = y = N * C * HW * e
        partials = 2 * N * C * cfg.num_splits * 4            # per-channel (mean, M2) partials, fp32
        stats = 2 * N * GROUPS * 4                           # per-group (mean, rstd), fp32
        apply_blocks = cdiv(HW, cfg.BLOCK_S) * N             # apply programs per channel block
        per_channel = apply_blocks * C * (2 * e + 2 * 4)     # each apply program: its weight, bias, mean, rstd
        kernel, _ = _seq([("stats", x, partials), ("finalize", partials, stats), ("apply", x + per_channel, y)])
        torch_bytes, seq = _seq([("F.group_norm moments pass", x, stats),
                                 ("F.group_norm apply pass", x + stats + 2 * C * e, y), ("F.silu", y, y)])
        rows.append(Row("group_norm+silu", f"{where} N{N} C{C} {side}x{side} G{GROUPS} "
                                           f"(stats splits {cfg.num_splits})", None, kernel, torch_bytes, seq))
    return rows


# ------------------------------------------------------------------------------------------------ cfg step
PATTERNS = [("euler / dpmpp_2m 1st", True, False, False), ("euler_a / ddpm (noise)", True, False, True),
            ("dpmpp_2m (old)", True, True, False), ("dpmpp_2m last (a=0)", False, False, False)]


def cfg_step_rows(res: int, model_dtype: str, images: int = 1) -> list[Row]:
    """Fused: read x, uncond, cond (+ old, + noise), write x_next and denoised. Unfused: the exact torch op
    sequence of fastsd.ops.cfg_step_reference (guidance as CFGDenoiser did it, then the update)."""
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
                        f"{len(ops)} ops: {seq}"))
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


def all_rows(res: int = 512, dtype: str = "fp16") -> dict[str, list[Row]]:
    return {"attention": attention_rows(res, dtype), "group_norm": group_norm_rows(res, dtype),
            "cfg_step": cfg_step_rows(res, "fp32") + cfg_step_rows(res, dtype)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsd.kernels.traffic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=512)
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
            print(f"\nPer UNet call (all 32 attention launches): kernel {_mb(k)} MiB, unfused torch {_mb(t)} MiB "
                  f"({t / k:.1f}x).")
        print("\nunfused sequences counted:")
        for seq in dict.fromkeys(r.torch_ops for r in rows):
            print(f"- {seq}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
