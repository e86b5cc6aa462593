"""Attention for bf16 tensors on a CPU: as accurate as PyTorch's CPU SDPA, and faster where bf16 is native
(README "The CPU path" has the numbers, from `python -m fastsd.benchmarks.cpu_paths`).

The queries are cut into chunks whose score block (heads x queries x keys, ~2M elements) stays in cache;
each chunk is three GEMMs and one softmax:

    m   = rowmax(q k^T)                  (bf16 GEMM, only for the row max)
    s   = scale * q k^T - scale * m      (baddbmm: fp32 accumulation, scale and shift before the one rounding)
    out = softmax(s) v                   (softmax in fp32 inside, p rounded to bf16 for the GEMM)

The shift keeps it accurate: softmax is shift-invariant, and with the row max subtracted before rounding,
the logits that matter (those near the max) are near 0, where bf16 is fine-grained. Rounding q k^T itself
to bf16 is well above torch's error on sharp logits; the shifted form stays within 2x of torch's
(tests/test_cpu_paths.py holds both).
"""
from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 21  # score elements per chunk: 2M (4 MiB in bf16); 1M and 4M were no faster


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                      block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D), non-causal; any strides."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    n = b * h
    scale = d ** -0.5 if scale is None else scale
    qs = q.reshape(n, lq, d)
    kt = k.reshape(n, lk, d).transpose(1, 2).contiguous()  # (n, D, Lk): oneDNN would copy a transposed view per GEMM
    vv = v.reshape(n, lk, d)
    out = torch.empty(n, lq, d, dtype=q.dtype, device=q.device)
    rows = max(1, block_elements // lk)  # query rows per chunk, over all heads of the chunk
    heads, chunk = (max(1, min(n, rows // lq)), lq) if rows >= lq else (1, rows)
    for i in range(0, n, heads):
        kt_i, v_i = kt[i:i + heads], vv[i:i + heads]
        for j in range(0, lq, chunk):
            qc = qs[i:i + heads, j:j + chunk]
            m = rowmax_bf16(torch.bmm(qc, kt_i))  # (heads, chunk, 1) row max of q k^T, bf16-rounded
            s = torch.baddbmm(m.mul_(-scale), qc, kt_i, alpha=scale)  # (q k^T - m) * scale, rounded once
            torch.bmm(torch.softmax(s, -1), v_i, out=out[i:i + heads, j:j + chunk])
    return out.view(b, h, lq, d)


def rowmax_bf16(s: torch.Tensor) -> torch.Tensor:
    """s.amax(-1, keepdim=True) for bf16, exactly, through the int16 view of its bits (PyTorch's bf16 amax is
    not vectorised; int16 amax + amin together are ~3x faster). As int16, non-negative floats order as their
    bits; negative ones in reverse, so a row with no non-negative entry has its float max at the int16 minimum."""
    if s.dtype != torch.bfloat16:
        return s.amax(-1, keepdim=True)
    bits = s.view(torch.int16)
    hi, lo = bits.amax(-1, keepdim=True), bits.amin(-1, keepdim=True)
    return torch.where(hi >= 0, hi, lo).view(torch.bfloat16)
