"""Attention for bf16 tensors on a CPU: as accurate as PyTorch's CPU SDPA, and faster where bf16 is native
(docs/cpu-path.md has the numbers, from `python -m fastsd.benchmarks.cpu_paths`).

The queries are cut into chunks whose score block (heads x queries x keys, ~2M elements) stays in cache;
each chunk's buffers are made once per call. Per chunk, the row max of q k^T (a first bf16 GEMM) is
subtracted inside a second GEMM (fp32 accumulation, scale and shift before the one rounding), so the logits
that matter (those near the max) are rounded near 0, where bf16 is fine-grained, and their exp can't
overflow; rounding q k^T itself to bf16 is well above torch's error on sharp logits. Then:

- narrow heads ([v, 1] padded to <= RESIDUAL_MAX_WIDTH columns: SD1.5's 64x64 level, D 40), c = scale * log2(e):

    m   = rowmax([q, 0] [k^T; 1])        (q copied into a [q, shift, 0] buffer; k^T with a row of ones)
    s   = c * [q, -m] [k^T; 1]           (= c * (q k^T - m): the shift is one more GEMM term, beta 0)
    p   = exp2(s)                        (in place; PyTorch's exp2 is faster than exp)
    o   = p [v, 1]                       (v with a column of ones, padded to 16 columns: the unnormalised output
                                          and the row sums in one GEMM, rounded to bf16)
    r   = p [v, 1] - o                   (baddbmm, beta -1: what that rounding lost)
    out = (o + r)[:, :D] / (o + r)[:, D] (in fp32, rounded once)

- wider heads, c = scale: s = baddbmm(-c m, q, k^T, alpha=c), out = softmax(s) v (fp32 inside, p rounded to
  bf16 for the GEMM).

The output must be rounded once, after the normalisation, as SDPA does: dividing the bf16-rounded p [v, 1] by
its rounded row sums doubled torch's error (2.1-2.5x on sharp logits). The residual GEMM restores that
precision and, for a 48-column v, costs less than softmax's passes over the score block; for wide heads it
costs more (tests/test_cpu_paths.py holds both within 2x of SDPA's error against fp32 on the same bf16 inputs).
"""
from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 21  # score elements per chunk: 2M (4 MiB in bf16); smaller chunks were slower
PAD = 16  # v's columns (head dim + the ones column) are padded to a multiple of this
RESIDUAL_MAX_WIDTH = 48  # widest padded [v, 1] normalised after the GEMM (with the residual); softmax beyond
LOG2E = 1.4426950408889634
VERSION = 4  # part of the tuner's key: choices timed against another version of this algorithm are measured again


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                      block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D), non-causal; any strides."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    n = b * h
    scale = d ** -0.5 if scale is None else scale
    width = -(-(d + 1) // PAD) * PAD
    residual = width <= RESIDUAL_MAX_WIDTH
    c = scale * LOG2E if residual else scale
    qs = q.reshape(n, lq, d)
    ka = d + 2 if residual else d  # [k^T; 1; 0] (an even K, as bf16 GEMMs pair their inputs)
    kt = torch.empty(n, ka, lk, dtype=k.dtype, device=k.device)  # laid out once: oneDNN would copy a view per GEMM
    kt[:, :d] = k.reshape(n, lk, d).transpose(1, 2)
    if residual:
        kt[:, d] = 1
        kt[:, d + 1] = 0
        vs = torch.zeros(n, lk, width, dtype=v.dtype, device=v.device)  # [v, 1, 0...]
        vs[..., :d] = v.reshape(n, lk, d)
        vs[..., d] = 1
    else:
        vs = v.reshape(n, lk, d)
    out = torch.empty(n, lq, d, dtype=q.dtype, device=q.device)
    rows = max(1, block_elements // lk)  # query rows per chunk, over all heads of the chunk
    heads, chunk = (max(1, min(n, rows // lq)), lq) if rows >= lq else (1, rows)
    s_buf = torch.empty(heads, chunk, lk, dtype=q.dtype, device=q.device)
    if residual:
        qa_buf = torch.zeros(heads, chunk, ka, dtype=q.dtype, device=q.device)  # [q, shift, 0]
        o_buf, r_buf = (torch.empty(heads, chunk, width, dtype=q.dtype, device=q.device) for _ in range(2))
        f_buf = torch.empty(heads, chunk, width, dtype=torch.float32, device=q.device)
    for i in range(0, n, heads):
        kt_i, v_i = kt[i:i + heads], vs[i:i + heads]
        for j in range(0, lq, chunk):
            qc = qs[i:i + heads, j:j + chunk]
            s, dst = s_buf[:qc.shape[0], :qc.shape[1]], out[i:i + heads, j:j + chunk]
            if not residual:
                m = rowmax_bf16(torch.bmm(qc, kt_i, out=s))  # (heads, chunk, 1) row max of q k^T, bf16-rounded
                torch.baddbmm(m.mul_(-c), qc, kt_i, alpha=c, out=s)  # (q k^T - m) * c, rounded once
                torch.bmm(torch.softmax(s, -1), v_i, out=dst)
                continue
            qa, o, r, f = (buf[:qc.shape[0], :qc.shape[1]] for buf in (qa_buf, o_buf, r_buf, f_buf))
            qa[..., :d] = qc
            qa[..., d] = 0
            qa[..., d:d + 1] = rowmax_bf16(torch.bmm(qa, kt_i, out=s)).neg_()
            torch.baddbmm(s, qa, kt_i, beta=0, alpha=c, out=s)  # (q k^T - m) * c, rounded once
            torch.bmm(s.exp2_(), v_i, out=o)
            torch.baddbmm(o, s, v_i, beta=-1, out=r)
            f.copy_(o).add_(r)
            torch.div(f[..., :d], f[..., d:d + 1], out=dst)
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
