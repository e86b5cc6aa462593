"""The CPU paths of backend auto, op by op at SD1.5 shapes, against what --backend torch runs:

    python -m benchmarks.cpu_paths [--repeat 5] [--threads 2]

Rows: attention (SDPA vs fastsd/cpu_attention.py, bf16; SDPA in fp32 for reference), convolution and
linear (plain F.conv2d / F.linear vs the prepacked weights of fastsd/cpu_pack.py), and the transformer
feed-forward (one pass vs 2048-token chunks). Min of --repeat calls after one warm-up, in ms; the error
column is the relative (Frobenius) error of each path against an fp32 computation of the same inputs.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import bench, cpu_model
from fastsd import backend
from fastsd.cpu_attention import attention_chunked
from fastsd.cpu_pack import pack_weights
from fastsd.models.layers import BasicTransformerBlock

ATTENTION = [(4096, 4096, 40, 8), (1024, 1024, 80, 8), (256, 256, 160, 8), (4096, 77, 40, 8), (4096, 4096, 512, 1)]
CONV = [(320, 320, 64), (640, 640, 32), (1280, 1280, 16), (1280, 1280, 8), (2560, 1280, 8)]
NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
LINEAR = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 5120), (512, 1280, 10240)]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def _ms(fn, repeat: int) -> float:
    times, _ = bench(fn, "cpu", 1, repeat)
    return min(times) * 1e3


def rows(repeat: int):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    for lq, lk, d, h in ATTENTION:
        q, k, v = rnd(2, h, lq, d) * 1.2, rnd(2, h, lk, d) * 1.2, rnd(2, h, lk, d)
        ref = F.scaled_dot_product_attention(q, k, v)
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        shape = f"2x{h} heads, {lq}x{lk} keys, D {d}"
        yield ("attention", shape, "bf16", "SDPA", _ms(lambda: F.scaled_dot_product_attention(qb, kb, vb), repeat),
               _rel(F.scaled_dot_product_attention(qb, kb, vb), ref))
        yield ("attention", shape, "bf16", "chunked", _ms(lambda: attention_chunked(qb, kb, vb), repeat),
               _rel(attention_chunked(qb, kb, vb), ref))
        yield ("attention", shape, "fp32", "SDPA", _ms(lambda: F.scaled_dot_product_attention(q, k, v), repeat), 0.0)
    for cin, cout, side in CONV:
        for dtype in (torch.bfloat16, torch.float32):
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1).requires_grad_(False)
            x = rnd(2, cin, side, side)
            ref = conv(x)
            conv = conv.to(dtype, memory_format=torch.channels_last)
            xd = x.to(dtype).contiguous(memory_format=torch.channels_last)
            shape, dt = f"3x3 {cin}->{cout}, 2x{side}x{side}", NAMES[dtype]
            yield "conv", shape, dt, "plain", _ms(lambda: conv(xd), repeat), _rel(conv(xd), ref)
            pack_weights(conv)
            yield "conv", shape, dt, "prepacked", _ms(lambda: conv(xd), repeat), _rel(conv(xd), ref)
    for m, kdim, n in LINEAR:
        for dtype in (torch.bfloat16, torch.float32):
            lin = torch.nn.Linear(kdim, n).requires_grad_(False)
            x = rnd(m, kdim)
            ref = lin(x)
            lin, xd = lin.to(dtype), x.to(dtype)
            shape, dt = f"{m}x{kdim} -> {n}", NAMES[dtype]
            yield "linear", shape, dt, "plain", _ms(lambda: lin(xd), repeat), _rel(lin(xd), ref)
            pack_weights(lin)
            yield "linear", shape, dt, "prepacked", _ms(lambda: lin(xd), repeat), _rel(lin(xd), ref)
    for tokens, c in ((4096, 320), (1024, 640)):
        block = BasicTransformerBlock(c, 8, 768).requires_grad_(False)
        x = rnd(2, tokens, c)
        ref = x + block.ff.net(block.norm3(x))
        block, xd = block.bfloat16(), x.bfloat16()
        shape = f"2x{tokens} tokens x {c}"
        with backend.use("torch"):
            yield ("feed-forward", shape, "bf16", "one pass", _ms(lambda: xd + block.ff.net(block.norm3(xd)), repeat),
                   _rel(xd + block.ff.net(block.norm3(xd)), ref))
        yield ("feed-forward", shape, "bf16", "chunked", _ms(lambda: block._feed_forward_chunked(xd), repeat),
               _rel(block._feed_forward_chunked(xd), ref))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| op | shape | dtype | path | ms (min) | rel err vs fp32 |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for op, shape, dt, path, ms, err in rows(a.repeat):
            print(f"| {op} | {shape} | {dt} | {path} | {ms:.2f} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
