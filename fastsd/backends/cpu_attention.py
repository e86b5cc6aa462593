"""Attention for bf16 tensors on a CPU: as accurate as PyTorch's CPU SDPA, and faster where bf16 is native
(README "The CPU path" has the numbers, from `python -m fastsd.benchmarks.cpu_paths`).

The queries are cut into chunks whose score block (heads x queries x keys, ~2M elements) stays in cache;
each chunk is three GEMMs and one exp, all written into two buffers made once per call:

    m   = rowmax(q k^T)                  (bf16 GEMM, only for the row max)
    s   = c * q k^T - c * m              (baddbmm: fp32 accumulation, scale and shift before the one rounding;
                                          c = scale * log2(e), so that exp2 gives exp: PyTorch's exp2 is faster)
    p   = exp2(s)                        (in place; s <= ~0, so no overflow; rounded to bf16 for the GEMM)
    out = (p [v, 1]) / (p 1)             (v with a column of ones, padded to 16 columns: one GEMM gives the
                                          unnormalised output and the row sums of the rounded p)

The shift keeps it accurate: the logits that matter (those near the max) are near 0, where bf16 is
fine-grained. Rounding q k^T itself to bf16 is well above torch's error on sharp logits; the shifted form stays
within 2x of torch's (tests/test_cpu_paths.py holds both). Dividing by the row sums after the GEMM, instead of
normalising p before it (softmax), saves softmax's max and normalisation passes over the score block; the
padded GEMM is faster than the 40-column one SD1.5's 64x64 attention has.
"""
from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 21  # score elements per chunk: 2M (4 MiB in bf16); smaller chunks were slower
PAD = 16  # v's columns (head dim + the ones column) are padded to a multiple of this
LOG2E = 1.4426950408889634
VERSION = 2  # part of the tuner's key: choices timed against another version of this algorithm are measured again


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                      block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D), non-causal; any strides."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    n = b * h
    c = (d ** -0.5 if scale is None else scale) * LOG2E
    qs = q.reshape(n, lq, d)
    kt = k.reshape(n, lk, d).transpose(1, 2).contiguous()  # (n, D, Lk): oneDNN would copy a transposed view per GEMM
    width = -(-(d + 1) // PAD) * PAD
    v1 = torch.zeros(n, lk, width, dtype=v.dtype, device=v.device)  # [v, 1, 0...]
    v1[..., :d] = v.reshape(n, lk, d)
    v1[..., d] = 1
    out = torch.empty(n, lq, d, dtype=q.dtype, device=q.device)
    rows = max(1, block_elements // lk)  # query rows per chunk, over all heads of the chunk
    heads, chunk = (max(1, min(n, rows // lq)), lq) if rows >= lq else (1, rows)
    s_buf = torch.empty(heads, chunk, lk, dtype=q.dtype, device=q.device)
    o_buf = torch.empty(heads, chunk, width, dtype=q.dtype, device=q.device)
    for i in range(0, n, heads):
        kt_i, v_i = kt[i:i + heads], v1[i:i + heads]
        for j in range(0, lq, chunk):
            qc = qs[i:i + heads, j:j + chunk]
            s, o = s_buf[:qc.shape[0], :qc.shape[1]], o_buf[:qc.shape[0], :qc.shape[1]]
            m = rowmax_bf16(torch.bmm(qc, kt_i, out=s))  # (heads, chunk, 1) row max of q k^T, bf16-rounded
            torch.baddbmm(m.mul_(-c), qc, kt_i, alpha=c, out=s)  # (q k^T - m) * c, rounded once
            torch.bmm(s.exp2_(), v_i, out=o)
            torch.div(o[..., :d], o[..., d:d + 1], out=out[i:i + heads, j:j + chunk])
    return out.view(b, h, lq, d)


def rowmax_bf16(s: torch.Tensor) -> torch.Tensor:
    """s.amax(-1, keepdim=True) for bf16, exactly, through the int16 view of its bits (PyTorch's bf16 amax is
    not vectorised; int16 amax is ~6x faster). As int16, non-negative floats order as their bits; negative ones
    in reverse, so a row with no non-negative entry has its float max at the int16 minimum (the second pass,
    amin, runs only when there is such a row)."""
    if s.dtype != torch.bfloat16:
        return s.amax(-1, keepdim=True)
    bits = s.view(torch.int16)
    hi = bits.amax(-1, keepdim=True)
    if bool((hi < 0).any()):
        hi = torch.where(hi >= 0, hi, bits.amin(-1, keepdim=True))
    return hi.view(torch.bfloat16)
