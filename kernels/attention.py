"""Flash-style attention forward (non-causal), the Triton stand-in for `fastsd.ops.attention`.

Torch reference: `fastsd.ops.attention_reference` (F.scaled_dot_product_attention).

    out = softmax(q @ k^T * scale) @ v,  q (B, H, Lq, D), k/v (B, H, Lk, D), D <= 256.

One program owns BLOCK_M query rows of one (batch, head) and streams K/V in BLOCK_N-row tiles, keeping
the running row max `m`, row sum `l` and the (BLOCK_M, BLOCK_D) output accumulator in fp32 registers
(online softmax): the Lq x Lk score matrix never exists in memory. exp2 is used with log2(e) folded
into the scale. The head dim is padded to a power of two >= 16 inside the kernel only (masked loads,
never a padded copy); Lq/Lk tails are masked, keys beyond Lk get score -inf. All strides are kernel
arguments, so q/k/v may be any strided views (e.g. `x.view(B, L, H, D).transpose(1, 2)`).

The output is allocated as (B, Lq, H, D) and returned as its (B, H, Lq, D) transpose: same shape and
dtype as q, and the usual `out.transpose(1, 2).reshape(B, Lq, H * D)` that follows is free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import cast_rtne, cdiv, check_dtype, interpreter_bf16_fix, interpreter_enabled, next_power_of_2

__all__ = ["attention", "attention_config", "AttentionConfig"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, LQ, LK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BF16_FIX: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < HEAD_DIM

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST_DOT:  # interpreter only, see launch_plan
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, LK, BLOCK_N):
        cur_n = start_n + offs_n
        mask_n = cur_n < LK
        # K tile loaded transposed, (BLOCK_D, BLOCK_N)
        kt = tl.load(k_base + cur_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # log2-domain scores, fp32
        s = s + tl.where(mask_n, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every K tile holds >= 1 valid key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        # P is rounded to the input dtype for the tensor-core dot; the row sum uses the same rounded
        # values so the weights stay normalised (halves the bf16 error when few keys dominate).
        p = cast_rtne(p, V.dtype.element_ty, BF16_FIX)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        v = tl.load(v_base + cur_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    acc = acc * (1.0 / l_i)[:, None]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             cast_rtne(acc, O.dtype.element_ty, BF16_FIX), mask=mask_m[:, None] & mask_d[None, :])


@dataclass(frozen=True)
class AttentionConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


def attention_config(head_dim: int, lq: int, lk: int, dtype: torch.dtype, arch: int | None = None) -> AttentionConfig:
    """Block sizes per head dim (one config; no autotuning, so the interpreter, the GPU and
    `kernels.report` all see the same binary).

    BLOCK_D = next power of two >= max(D, 16) (SD1.5: 40 -> 64, 80 -> 128, 160 -> 256).
    The fp32 accumulator is BLOCK_M x BLOCK_D and the score tile BLOCK_M x BLOCK_N, both in registers:
      BLOCK_D <= 128: BLOCK_M 128, BLOCK_N 64, 8 warps, 3 stages (2 for BLOCK_D 128: K/V smem)
      BLOCK_D == 256: BLOCK_M  64, BLOCK_N 32, 8 warps, 2 stages (~100 KB smem: 2 CTAs/SM on sm_90)
    Short query sequences (Lq <= 64, e.g. the 8x8 middle block) use BLOCK_M 64 and 4 warps.
    Picked from a sweep with `kernels.report.compile_one`: 4 warps at BLOCK_M 128 hits 255 registers
    (and spills on sm_90); BLOCK_N 64 at BLOCK_D 256 costs ~1.5x the smem for no fewer registers.
    Every SD1.5 shape compiles with zero spills on sm_80 and sm_90; `arch` is accepted so a per-arch
    table can be added, the choice is currently the same for both.
    fp32 inputs use exact ("ieee") dots; fp16/bf16 use tensor cores (mma.sync / wgmma).
    """
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM}")
    block_d = max(16, next_power_of_2(head_dim))
    if block_d <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3 if block_d <= 64 else 2)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if lq <= 64:
        cfg.update(BLOCK_M=64, num_warps=4)
    return AttentionConfig(BLOCK_D=block_d, **cfg)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"shapes don't match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Lq < 1 or k.shape[2] < 1 or D < 1:
        raise ValueError("Lq, Lk and D must be >= 1")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} > {MAX_HEAD_DIM} is outside the kernel's contract")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, D) view of a (B, Lq, H, D) buffer."""
    B, H, Lq, D = q.shape
    return torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


def launch_plan(q, k, v, out, scale: float | None = None, *, arch: int | None = None):
    """Everything a launch needs: (kernel, grid, positional args, constexprs, options).
    Shared by `attention` and `kernels.report` (which passes meta tensors to get the same signature)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if arch is None and q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        arch = 10 * major + minor
    cfg = attention_config(D, Lq, Lk, q.dtype, arch)
    args = (q, k, v, out, float(scale) * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, Lq, Lk)
    constexprs = dict(HEAD_DIM=D, BLOCK_D=cfg.BLOCK_D, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                      INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                      # Triton 3.9's interpreter multiplies bf16 tensors as their raw uint16 bits
                      # (InterpreterBuilder.create_dot); there, bf16 operands go through an fp32 dot
                      # (same values: bf16 products are exact in fp32). Always False on a GPU.
                      UPCAST_DOT=interpreter_enabled() and q.dtype == torch.bfloat16,
                      # and it truncates fp32 -> bf16 casts; see kernels._utils.cast_rtne
                      BF16_FIX=interpreter_bf16_fix(q.dtype))
    grid = (cdiv(Lq, cfg.BLOCK_M), B * H)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _attn_fwd_kernel, grid, args, constexprs, options


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Lq, D), k/v (B, H, Lk, D); scale defaults to D**-0.5.
    Returns q's shape and dtype (strides: a transposed (B, Lq, H, D) buffer)."""
    _check(q, k, v)
    if q.device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError("kernels.attention on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)")
    out = empty_output(q)
    kernel, grid, args, constexprs, options = launch_plan(q, k, v, out, scale)
    if interpreter_enabled():
        options = {}  # the interpreter ignores warps/stages
    kernel[grid](*args, **constexprs, **options)
    return out
