"""Run a VAE half on overlapping tiles and blend the seams, so large images fit in memory.

Each tile's output is weighted by a ramp that rises across the overlap from both neighbours, and the
weighted sum is divided by the summed weights: seams fade linearly instead of cutting. GroupNorm
statistics are per tile, so tiled results differ slightly from untiled ones (as in diffusers' tiling).
"""
from __future__ import annotations

from typing import Callable

import torch


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def tile_count(h: int, w: int, *, tile: int, overlap: int) -> int:
    """How many tiles `tiled` runs fn on for an h x w input."""
    return len(_starts(h, tile, tile - overlap)) * len(_starts(w, tile, tile - overlap))


def _ramp(n: int, overlap: int, first: bool, last: bool, device: torch.device) -> torch.Tensor:
    w = torch.ones(n, device=device)
    ramp = (torch.arange(overlap, device=device) + 1.0) / (overlap + 1)  # strictly inside (0, 1)
    if not first and overlap:
        w[:overlap] = ramp
    if not last and overlap:
        w[n - overlap:] = ramp.flip(0)
    return w


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int,
          scale: float) -> torch.Tensor:
    """fn maps (B, C, h, w) to (B, C', h*scale, w*scale); apply it on tile x tile windows of x
    overlapping by `overlap` (input pixels) and blend. scale: 8 for decode, 1/8 for encode."""
    b, _, h, w = x.shape
    stride = tile - overlap
    out = weight = None
    ys, xs = _starts(h, tile, stride), _starts(w, tile, stride)
    o = round(overlap * scale)
    for yi, y in enumerate(ys):
        for xi, x0 in enumerate(xs):
            part = fn(x[:, :, y:y + tile, x0:x0 + tile]).float()
            if out is None:
                out = torch.zeros(b, part.shape[1], round(h * scale), round(w * scale), device=part.device)
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=part.device)
            th, tw = part.shape[2:]
            wy = _ramp(th, o, yi == 0, yi == len(ys) - 1, part.device)
            wx = _ramp(tw, o, xi == 0, xi == len(xs) - 1, part.device)
            wt = wy[:, None] * wx[None, :]
            oy, ox = round(y * scale), round(x0 * scale)
            out[:, :, oy:oy + th, ox:ox + tw] += part * wt
            weight[:, :, oy:oy + th, ox:ox + tw] += wt
    return out / weight  # float32
