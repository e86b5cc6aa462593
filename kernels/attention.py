"""Flash-style attention forward (non-causal), the Triton stand-in for the torch reference
(`kernels._reference.attention`, i.e. F.scaled_dot_product_attention), registered as `fastsd::attention`.

    out = softmax(q @ k^T * scale) @ v,  q (B, H, Lq, D), k/v (B, H, Lk, D), D <= 256.

One program owns BLOCK_M query rows of one (batch, head) and streams K/V in BLOCK_N-row tiles, keeping the
running row max `m`, row sum `l` and the output accumulator in fp32 registers (online softmax): the Lq x Lk
score matrix never exists in memory. log2(e) * scale is one factor, applied in the exp2 argument as one FMA
per score (`s * qk_scale - m`).

Head dim: split into at most two power-of-two chunks D0 + D1 >= 16 each (40 -> 32 + 16, 80 -> 64 + 16,
160 -> 128 + 32), so tensor cores multiply <= 1.2x the useful head dim instead of the next power of two
(64 / 128 / 256: 1.6x); each chunk has its own accumulator. Keys: full BLOCK_N tiles run without masks,
one masked tail tile of TAIL_N = next_pow2(Lk % BLOCK_N) >= 16 keys covers the rest (Lk = 77: one
64-key tile + a 16-key tail, 80 keys computed).

Vector loads: q/k/v/o views `to_q(x).view(B, L, H, D).transpose(1, 2)` have a head stride of D (40 at
64x64 latents), which Triton cannot prove 16-byte aligned, so it emits 2-byte loads and no cp.async. When
the host proves alignment (`_utils.aligned16`: pointers 16-byte aligned, batch/head/row strides multiples of
8 elements, D contiguous), the ALIGNED constexpr adds `tl.multiple_of` hints to the base offsets and row
strides; any other layout runs the unhinted variant (correct, slower).

Configs: per GPU arch (sm_80 / 86 / 89 / 90: their shared-memory and register limits) and dtype, a short
candidate list per (head dim, Lq bucket, Lk bucket); every candidate compiles with no spills within the arch's
limits at every SD1.5 shape (`python -m fastsd.kernels.report`). On a GPU `triton.autotune` picks among the
candidates at the first call of each key (head dim, Lq bucket, Lk bucket, dtype); the interpreter and the
report's default column use the first. Small grids (the 16x16 and 8x8 levels) get smaller BLOCK_M so the
grid reaches more of the SMs.

The output is allocated as (B, Lq, H, D) and returned as its (B, H, Lq, D) transpose: same shape and
dtype as q, and the usual `out.transpose(1, 2).reshape(B, Lq, H * D)` that follows is free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import aligned16, cast_rtne, cdiv, check_dtype, check_runnable, interpreted, interpreter_bf16_fix, launch, next_power_of_2

__all__ = ["attention", "attention_config", "attention_candidates", "AttentionConfig", "head_dim_chunks"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_WASTE = 1.3  # tensor-core work executed / useful, per launch


@triton.jit
def _load_2d(base, rows, cols, stride_r, stride_c, mask_r, mask_c, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Tile base[rows, cols]; masks only where the constexpr flags say so (full tiles load unmasked)."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if MASK_R and MASK_C:
        t = tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    elif MASK_R:
        t = tl.load(ptrs, mask=mask_r[:, None], other=0.0)
    elif MASK_C:
        t = tl.load(ptrs, mask=mask_c[None, :], other=0.0)
    else:
        t = tl.load(ptrs)
    return t


@triton.jit
def _store_2d(base, rows, cols, stride_r, stride_c, val, mask_r, mask_c, MASK_C: tl.constexpr):
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if MASK_C:
        tl.store(ptrs, val, mask=mask_r[:, None] & mask_c[None, :])
    else:
        tl.store(ptrs, val, mask=mask_r[:, None])


@triton.jit
def _attn_step(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, offs_n, offs_d0, offs_d1,
               stride_kn, stride_kd, stride_vn, stride_vd, LK, qk_scale,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASK_N: tl.constexpr,
               SCALE_POS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
               BF16_FIX: tl.constexpr, P_DTYPE: tl.constexpr):
    """One K/V tile of the online softmax."""
    cur_n = start_n + offs_n
    mask_n = cur_n < LK
    mask_d0 = offs_d0 < HEAD_DIM
    # K tiles loaded transposed, (D chunk, BLOCK_N)
    k0 = _load_2d(k_base, offs_d0, cur_n, stride_kd, stride_kn, mask_d0, mask_n, D0 > HEAD_DIM, MASK_N)
    if UPCAST_DOT:  # interpreter only, see launch_plan
        k0 = k0.to(tl.float32)
    s = tl.dot(q0, k0, input_precision=INPUT_PRECISION)
    if D1 > 0:
        mask_d1 = offs_d1 < HEAD_DIM
        k1 = _load_2d(k_base, offs_d1, cur_n, stride_kd, stride_kn, mask_d1, mask_n, D0 + D1 > HEAD_DIM, MASK_N)
        if UPCAST_DOT:
            k1 = k1.to(tl.float32)
        s = tl.dot(q1, k1, s, input_precision=INPUT_PRECISION)
    if SCALE_POS:  # max(s) * scale = max(s * scale): the scale rides in the exp2 argument (one FMA per score)
        if MASK_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    else:
        s = s * qk_scale
        if MASK_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf); m_new is finite (>= 1 valid key)
    # P is rounded to the input dtype for the tensor-core dot; the row sum uses the same rounded values so the
    # weights stay normalised (halves the bf16 error when few keys dominate).
    p = cast_rtne(p, P_DTYPE, BF16_FIX)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if UPCAST_DOT:
        p = p.to(tl.float32)
    v0 = _load_2d(v_base, cur_n, offs_d0, stride_vn, stride_vd, mask_n, mask_d0, MASK_N, D0 > HEAD_DIM)
    if UPCAST_DOT:
        v0 = v0.to(tl.float32)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=INPUT_PRECISION)
    if D1 > 0:
        v1 = _load_2d(v_base, cur_n, offs_d1, stride_vn, stride_vd, mask_n, mask_d1, MASK_N, D0 + D1 > HEAD_DIM)
        if UPCAST_DOT:
            v1 = v1.to(tl.float32)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, LQ, LK, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr, ALIGNED: tl.constexpr, SCALE_POS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BF16_FIX: tl.constexpr,
):
    # LQ_BUCKET / LK_BUCKET: autotune keys only (unused here)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_off = b * stride_qb + h * stride_qh
    k_off = b * stride_kb + h * stride_kh
    v_off = b * stride_vb + h * stride_vh
    o_off = b * stride_ob + h * stride_oh
    if ALIGNED:  # proven on the host (_utils.aligned16): 16-byte vector loads, cp.async
        q_off = tl.multiple_of(q_off, 8)
        k_off = tl.multiple_of(k_off, 8)
        v_off = tl.multiple_of(v_off, 8)
        o_off = tl.multiple_of(o_off, 8)
        stride_qm = tl.multiple_of(stride_qm, 8)
        stride_kn = tl.multiple_of(stride_kn, 8)
        stride_vn = tl.multiple_of(stride_vn, 8)
        stride_om = tl.multiple_of(stride_om, 8)
    q_base = Q + q_off
    k_base = K + k_off
    v_base = V + v_off
    o_base = O + o_off

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    D1A: tl.constexpr = D1 if D1 > 0 else 16  # placeholder width when there is no second chunk (never loaded)
    offs_d1 = D0 + tl.arange(0, D1A)
    mask_m = offs_m < LQ

    q0 = _load_2d(q_base, offs_m, offs_d0, stride_qm, stride_qd, mask_m, offs_d0 < HEAD_DIM, True, D0 > HEAD_DIM)
    if UPCAST_DOT:
        q0 = q0.to(tl.float32)
    q1 = tl.zeros([BLOCK_M, D1A], dtype=q0.dtype)
    if D1 > 0:
        q1 = _load_2d(q_base, offs_m, offs_d1, stride_qm, stride_qd, mask_m, offs_d1 < HEAD_DIM, True,
                      D0 + D1 > HEAD_DIM)
        if UPCAST_DOT:
            q1 = q1.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1A], dtype=tl.float32)
    P_DTYPE: tl.constexpr = V.dtype.element_ty

    n_full = (LK // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full tiles: no masks
        acc0, acc1, m_i, l_i = _attn_step(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, offs_n,
                                          offs_d0, offs_d1, stride_kn, stride_kd, stride_vn, stride_vd, LK,
                                          qk_scale, HEAD_DIM, D0, D1, False, SCALE_POS, INPUT_PRECISION,
                                          UPCAST_DOT, BF16_FIX, P_DTYPE)
    if TAIL_N > 0:  # the masked tail tile: TAIL_N >= Lk % BLOCK_N keys, a power of two (77 = 64 + 16 keys)
        acc0, acc1, m_i, l_i = _attn_step(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, n_full,
                                          tl.arange(0, TAIL_N),
                                          offs_d0, offs_d1, stride_kn, stride_kd, stride_vn, stride_vd, LK,
                                          qk_scale, HEAD_DIM, D0, D1, True, SCALE_POS, INPUT_PRECISION,
                                          UPCAST_DOT, BF16_FIX, P_DTYPE)

    inv_l = 1.0 / l_i
    O_DTYPE: tl.constexpr = O.dtype.element_ty
    _store_2d(o_base, offs_m, offs_d0, stride_om, stride_od, cast_rtne(acc0 * inv_l[:, None], O_DTYPE, BF16_FIX),
              mask_m, offs_d0 < HEAD_DIM, D0 > HEAD_DIM)
    if D1 > 0:
        _store_2d(o_base, offs_m, offs_d1, stride_om, stride_od,
                  cast_rtne(acc1 * inv_l[:, None], O_DTYPE, BF16_FIX), mask_m, offs_d1 < HEAD_DIM,
                  D0 + D1 > HEAD_DIM)


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class AttentionConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    D0: int = 0   # head-dim chunks (filled by attention_config from the head dim)
    D1: int = 0

    @property
    def BLOCK_D(self) -> int:  # padded head dim the tensor cores multiply
        return self.D0 + self.D1


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(D0, D1): D0 the largest power of two <= D (>= 16), D1 the power of two >= 16 covering the rest (0 if
    none), unless one power of two is as small: 40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 ->
    (64, 0), 8 -> (16, 0), 120 -> (128, 0)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM}")
    whole = max(16, next_power_of_2(head_dim))
    d0 = max(16, 1 << (int(head_dim).bit_length() - 1))
    rest = head_dim - d0
    if rest <= 0:
        return whole, 0
    d1 = max(16, next_power_of_2(rest))
    return (d0, d1) if d0 + d1 < whole else (whole, 0)


ARCHS = (80, 86, 89, 90)


def lq_bucket(lq: int) -> int:
    """Autotune key for the query length: 0 (<= 64), 1 (<= 256), 2 (<= 1024), 3 (longer)."""
    return 0 if lq <= 64 else 1 if lq <= 256 else 2 if lq <= 1024 else 3


def lk_bucket(lk: int) -> int:
    """Autotune key for the key length: 0 (<= 128, e.g. the 77 text tokens), 1 (longer)."""
    return 0 if lk <= 128 else 1


def attention_candidates(head_dim: int, lq: int, lk: int, dtype: torch.dtype, arch: int | None = None,
                         batch_heads: int = 16, num_sms: int = 132) -> list[AttentionConfig]:
    """Configs to try for one launch, best guess first (the interpreter, the report's default column and
    `attention_config` use the first; on a GPU `triton.autotune` times them all). Every candidate is one the
    report (`python -m fastsd.kernels.report --all-candidates`) compiled for sm_80/86/89/90 at the SD1.5 shapes
    with no spills, shared memory within the arch's limit, 16-byte loads in the K/V loop and padding waste
    <= 1.3x; candidates that would pad more than 1.3x at this (Lq, Lk, D) are dropped.

    fp16/bf16 (tensor cores; d = D0 + D1 the padded head dim):
      d <= 64 (D40): self-attention BLOCK_M 128 x BLOCK_N 128, 8 warps, 3 stages (the 16-wide second head-dim
        chunk needs >= 8 elements per thread for 16-byte loads: 16 x 128 keys over 256 threads); 77 keys:
        64 x 64, 4 warps (64-key tile + 16-key tail); sm_90 also tries 128 x 64 with 4 warps (208 registers
        there, spills on sm_80/86/89).
      d <= 128 (D80): 64 x 64, 4 warps, 3 stages (sm_90 also tries 128 x 64).
      d <= 160 (D160): 64 x 32, 4 warps, 2 stages (wgmma on sm_90) and 16 x 64 with 2 warps, which 4x the
        grid: first when 64-row blocks would leave SMs idle (the 16x16 and 8x8 levels: 64 and 16 programs).
      d > 160 (up to 256): 64 x 32, 8 warps, 2 stages.
    fp32 ("ieee" FMA dots, no tensor cores), d <= 128: 32 x 32, 4 warps, 2 stages. fp32 at d > 128: no config was found
      clean at every SD1.5 shape on all four archs (of M16-32 x N16-32 with 2-8 warps, each one checked
      spilled somewhere), so `kernels.dispatch.supports` sends it to SDPA on a GPU; the interpreter (CPU) runs
      the 16 x 16 config below.
    """
    d0, d1 = head_dim_chunks(head_dim)
    d = d0 + d1
    short = lk <= 128
    c = lambda m, n, w, s: dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    if dtype == torch.float32:
        cands = [c(32, 32, 4, 2)] if d <= 128 else [c(16, 16, 4, 2)]
    elif d <= 64:
        cands = [c(64, 64, 4, 3)] if short else [c(128, 128, 8, 3)]
        if arch == 90:
            cands.append(c(128, 64, 4, 3))
    elif d <= 128:
        cands = [c(64, 64, 4, 3)] + ([c(128, 64, 4, 3)] if arch == 90 else [])
    elif d <= 160:
        cands = [c(64, 32, 4, 2), c(16, 64, 2, 2)]
        if cdiv(lq, 64) * batch_heads < num_sms:
            cands.reverse()
    else:
        cands = [c(64, 32, 8, 2)]
    out = [AttentionConfig(D0=d0, D1=d1, **k) for k in cands]
    ok = [cfg for cfg in out if padding_waste(cfg, lq, lk, head_dim) <= MAX_WASTE]
    return ok or out[:1]


def attention_config(head_dim: int, lq: int, lk: int, dtype: torch.dtype, arch: int | None = None) -> AttentionConfig:
    """The default (first) candidate."""
    return attention_candidates(head_dim, lq, lk, dtype, arch)[0]


def tail_n(lk: int, block_n: int) -> int:
    """Keys of the masked tail tile: 0 when Lk is a multiple of BLOCK_N, else next_pow2(Lk % BLOCK_N), >= 16."""
    r = lk % block_n
    return 0 if r == 0 else max(16, next_power_of_2(r))


def padding_waste(cfg: AttentionConfig, lq: int, lk: int, head_dim: int) -> float:
    """Tensor-core work executed / useful: padded query rows x computed keys x padded head dim."""
    keys = (lk // cfg.BLOCK_N) * cfg.BLOCK_N + tail_n(lk, cfg.BLOCK_N)
    return (cdiv(lq, cfg.BLOCK_M) * cfg.BLOCK_M * keys * cfg.BLOCK_D) / (lq * lk * head_dim)


# ---------------------------------------------------------------------------------------------- launcher
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


def device_arch(device: torch.device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_plan(q, k, v, out, scale: float | None = None, *, arch: int | None = None,
                config: AttentionConfig | None = None):
    """Everything a launch needs: (kernel, grid, positional args, constexprs, options). Shared by `attention`
    and `kernels.report` (which passes meta tensors and an arch to get the same signature). The
    interpreter-only flags are set from the tensors' device (CPU = interpreter), never from the environment."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if arch is None:
        arch = device_arch(q.device)
    cfg = config or attention_config(D, Lq, Lk, q.dtype, arch)
    interp = interpreted(q.device)
    args = (q, k, v, out, float(scale) * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, Lq, Lk, lq_bucket(Lq), lk_bucket(Lk))
    constexprs = dict(HEAD_DIM=D, D0=cfg.D0, D1=cfg.D1, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                      TAIL_N=tail_n(Lk, cfg.BLOCK_N),
                      ALIGNED=aligned16(q, k, v, out), SCALE_POS=scale > 0,
                      INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                      # Triton 3.9's interpreter multiplies bf16 tensors as their raw uint16 bits
                      # (InterpreterBuilder.create_dot); there, bf16 operands go through an fp32 dot
                      # (same values: bf16 products are exact in fp32). Never on a GPU.
                      UPCAST_DOT=interp and q.dtype == torch.bfloat16,
                      # and it truncates fp32 -> bf16 casts; see kernels._utils.cast_rtne
                      BF16_FIX=interpreter_bf16_fix(q.dtype, q.device))
    grid = (cdiv(Lq, cfg.BLOCK_M), B * H)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _attn_fwd_kernel, grid, args, constexprs, options


_AUTOTUNED: dict = {}


def _autotuned_kernel(arch: int, head_dim: int, lq: int, lk: int, dtype: torch.dtype):
    """`triton.autotune` over this launch's candidates only (GPU). Keyed by (head dim, Lq bucket, Lk bucket)
    plus the argument dtypes (Triton adds them to the key)."""
    cands = attention_candidates(head_dim, lq, lk, dtype, arch)
    key = (arch, tuple(cands))  # one autotuner per candidate set (Lq of one bucket may drop a padding-heavy one)
    if key not in _AUTOTUNED:
        configs = [triton.Config(dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N), num_warps=c.num_warps,
                                 num_stages=c.num_stages) for c in cands]
        tail = triton.heuristics({"TAIL_N": lambda a: tail_n(a["LK"], a["BLOCK_N"])})(_attn_fwd_kernel)
        _AUTOTUNED[key] = triton.autotune(configs, key=["HEAD_DIM", "LQ_BUCKET", "LK_BUCKET"])(tail)
    return _AUTOTUNED[key], cands


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = empty_output(q)
    plan = launch_plan(q, k, v, out, scale)
    if q.device.type == "cuda":
        kernel, grid, args, constexprs, options = plan
        tuned, _ = _autotuned_kernel(device_arch(q.device), q.shape[3], q.shape[2], k.shape[2], q.dtype)
        cx = {n: v_ for n, v_ in constexprs.items() if n not in ("BLOCK_M", "BLOCK_N", "TAIL_N")}
        B, H, Lq = q.shape[:3]
        tuned[lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H)](*args, **cx)
    else:
        launch(plan, q.device)
    return out


# ---------------------------------------------------------------------------------------------- registered op
@torch.library.custom_op("fastsd::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel as a torch op (torch.compile sees one opaque node; autograd uses `_attention_backward`)."""
    return _forward(q, k, v, scale)


@attention_op.register_fake
def _attention_fake(q, k, v, scale):
    return empty_output(q)


def attention_backward_reference(q, k, v, scale: float, grad_out):
    """Gradients of softmax(q k^T scale) v, recomputed in fp32 with torch ops (the reference's backward;
    O(Lq * Lk) memory). Returns dq, dk, dv in the inputs' dtypes."""
    qf, kf, vf, go = q.float(), k.float(), v.float(), grad_out.float()
    p = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)
    dv = p.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _attention_backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    return (*attention_backward_reference(q, k, v, ctx.scale, grad_out), None)


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Lq, D), k/v (B, H, Lk, D); scale defaults to D**-0.5.
    Returns q's shape and dtype (strides: a transposed (B, Lq, H, D) buffer). Differentiable (through
    `fastsd::attention`'s registered backward)."""
    _check(q, k, v)
    check_runnable("attention", q.device)
    return attention_op(q, k, v, float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[3]))


__all__ += ["attention_op", "attention_backward_reference", "padding_waste", "launch_plan", "empty_output"]
