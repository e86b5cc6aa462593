"""The CPU paths of backend auto, op by op at SD1.5 shapes, against what --backend torch runs:

    python -m fastsd.benchmarks.cpu_paths [--repeat 5] [--threads 2]

Rows: attention (SDPA vs fastsd/backends/cpu_attention.py and cpu_attention_native.py, bf16 in both its layouts,
native and native_t; SDPA and the native kernel in fp32, head dims <= 160, and the micro-kernel of the ISA in
effect, cpu_attention_fp32.py), convolution
and linear (plain F.conv2d / F.linear vs weights
prepacked as fastsd/backends/cpu_pack.py packs them; fp32 3x3 convolutions also as Winograd F(4x4) and F(2x2),
fastsd/backends/cpu_winograd.py, where each has enough tiles, with its native transforms and in torch ops; * marks
the variant the cpu backend offers there),
the transformer feed-forward (one pass vs 2048-token chunks), and GroupNorm + SiLU on channels-last input (torch's
ops as the cpu backend runs them vs fastsd/backends/cpu_group_norm.py). bf16 rows run only where bf16 is native (else
they say why). Under `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2` it
times the AVX2 paths of an AVX-512 machine. Min of --repeat calls after one warm-up, in ms; the error
column is the relative (Frobenius) error of each path against an fp32 computation: of the same bf16-rounded
inputs for bf16 attention (as tests/kernels), of the fp32 inputs and weights for the other rows.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .common import bench
from fastsd.backends import (cpu_attention_fp32, cpu_attention_native, cpu_group_norm, cpu_winograd,
                             cpu_winograd_bf16, cpu_winograd_native, reference)
from fastsd.backends.cpu import _group_norm_torch, feed_forward_chunked
from fastsd.backends.cpu_attention import attention_chunked
from fastsd.backends.cpu_attention_native import attention_native
from fastsd.backends.cpu_pack import LINEAR_EXAMPLE_ROWS, keep_temporaries_mapped, packing_unavailable
from fastsd.cpuinfo import cpu_model, isa_label, native_bf16
from fastsd.models.layers import BasicTransformerBlock
from fastsd.cli import ArgumentParser, positive_int, thread_count

ATTENTION = [(4096, 4096, 40, 8), (1024, 1024, 80, 8), (256, 256, 160, 8), (4096, 77, 40, 8), (4096, 4096, 512, 1)]
CONV = [(320, 320, 64, 3), (640, 640, 32, 3), (1280, 1280, 32, 3), (1280, 1280, 16, 3), (2560, 1280, 16, 3),
        (1280, 1280, 8, 3), (2560, 1280, 8, 3), (2560, 1280, 4, 3), (960, 320, 64, 3), (640, 320, 64, 1),
        (2560, 1280, 8, 1)]
NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
GROUP_NORM = [(320, 64), (640, 32), (1280, 16)]  # channels, side; 32 groups, with SiLU, batch 2
LINEAR = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 5120), (512, 1280, 10240)]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def _ms(fn, repeat: int) -> float:
    times, _ = bench(fn, "cpu", 1, repeat)
    return min(times) * 1e3


def _packed_rows(kind, shape, dtype, module, x, ref, repeat):
    """plain vs prepacked (packed for this input shape, as the CPU path packs) for one conv / linear."""
    dt = NAMES[dtype]
    yield kind, shape, dt, "plain", _ms(lambda: module(x), repeat), _rel(module(x), ref)
    why = packing_unavailable(dtype)
    if why:
        yield kind, shape, dt, "prepacked", None, why
        return
    w = module.weight.detach()
    if kind == "conv":
        wp = torch.ops.mkldnn._reorder_convolution_weight(w, list(module.padding), list(module.stride),
                                                           list(module.dilation), module.groups, list(x.shape))
        fn = lambda: torch.ops.mkldnn._convolution_pointwise(  # noqa: E731
            x, wp, module.bias, list(module.padding), list(module.stride), list(module.dilation), module.groups,
            "none", [], "")
    else:
        wp = torch.ops.mkldnn._reorder_linear_weight(w, LINEAR_EXAMPLE_ROWS)
        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, wp, module.bias, "none", [], "")  # noqa: E731
    yield kind, shape, dt, "prepacked", _ms(fn, repeat), _rel(fn(), ref)


def _native_row(shape, why, qkv, ref, repeat, fn=attention_native, name="native"):
    """A native attention kernel's row (its dtype is q's), or why it doesn't run here."""
    dt = NAMES[qkv[0].dtype]
    if why:
        return "attention", shape, dt, name, None, why
    return "attention", shape, dt, name, _ms(lambda: fn(*qkv), repeat), _rel(fn(*qkv), ref)


def rows(repeat: int, all_dtypes: bool = False):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bf16 = native_bf16() or all_dtypes
    no_bf16 = "bf16 is emulated on this CPU (the CPU path runs fp32 here); --all-dtypes times it anyway"
    dtypes = (torch.bfloat16, torch.float32) if bf16 else (torch.float32,)
    for lq, lk, d, h in ATTENTION:
        q, k, v = rnd(2, h, lq, d) * 1.2, rnd(2, h, lk, d) * 1.2, rnd(2, h, lk, d)
        ref = F.scaled_dot_product_attention(q, k, v)
        shape = f"2x{h} heads, {lq}x{lk} keys, D {d}"
        if bf16:
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            refb = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float())  # fp32 on the rounded inputs
            yield ("attention", shape, "bf16", "SDPA", _ms(lambda: F.scaled_dot_product_attention(qb, kb, vb), repeat),
                   _rel(F.scaled_dot_product_attention(qb, kb, vb), refb))
            yield ("attention", shape, "bf16", "chunked", _ms(lambda: attention_chunked(qb, kb, vb), repeat),
                   _rel(attention_chunked(qb, kb, vb), refb))
            yield _native_row(shape, cpu_attention_native.unavailable(), (qb, kb, vb), refb, repeat)
            yield _native_row(shape, cpu_attention_native.unavailable(), (qb, kb, vb), refb, repeat,
                              functools.partial(attention_native, keys_rows=True), "native_t")
        else:
            yield "attention", shape, "bf16", "chunked", None, no_bf16
        yield ("attention", shape, "fp32", "SDPA", _ms(lambda: F.scaled_dot_product_attention(q, k, v), repeat), 0.0)
        if d <= cpu_attention_native.FP32_MAX_HEAD_DIM:
            yield _native_row(shape, cpu_attention_native.fp32_unavailable(), (q, k, v), ref, repeat)
        if cpu_attention_fp32.covers(q):
            yield _native_row(shape, cpu_attention_fp32.unavailable(), (q, k, v), ref, repeat,
                              cpu_attention_fp32.attention_fp32, f"{(cpu_attention_fp32.isa() or 'micro').upper()} kernel")
    for cin, cout, side, ksize in CONV:
        for dtype in dtypes:
            conv = torch.nn.Conv2d(cin, cout, ksize, padding=ksize // 2).requires_grad_(False)
            x = rnd(2, cin, side, side)
            ref = conv(x)
            conv = conv.to(dtype, memory_format=torch.channels_last)
            xd = x.to(dtype).contiguous(memory_format=torch.channels_last)
            shape = f"{ksize}x{ksize} {cin}->{cout}, 2x{side}x{side}"
            yield from _packed_rows("conv", shape, dtype, conv, xd, ref, repeat)
            offered = cpu_winograd.variants_for(conv, xd)
            covered = cpu_winograd.covers(conv, xd)
            for v in cpu_winograd.VARIANTS.values():  # each variant with enough tiles here; "*": those offered
                if covered and cpu_winograd.enough_tiles(xd, v) and (not v.bf16 or dtype == torch.bfloat16):
                    name = f"Winograd F({v.m}x{v.m})" + (" bf16 operands" if v.bf16 else "") + "*" * (v in offered)
                    lib = cpu_winograd_native.library()
                    why = cpu_winograd_bf16.unavailable() if v.bf16 else cpu_winograd_native.unavailable()
                    if why is not None:
                        yield "conv", shape, NAMES[dtype], f"{name} native", None, why
                        continue
                    u = cpu_winograd.weight_transform(conv.weight, v)
                    fn = (lambda: cpu_winograd.conv3x3(xd, u, conv.bias, v)) if v.bf16 else (  # noqa: E731
                        lambda: cpu_winograd.in_fp32(functools.partial(cpu_winograd.conv3x3_native, lib), xd, u,
                                                     conv.bias, v))
                    yield "conv", shape, NAMES[dtype], f"{name} native", _ms(fn, repeat), _rel(fn(), ref)
                    if not v.bf16:  # (bf16 operands: its one native call only)
                        fn = lambda: cpu_winograd.in_fp32(cpu_winograd.conv3x3_torch, xd, u, conv.bias, v)  # noqa: E731
                        yield "conv", shape, NAMES[dtype], f"{name} torch ops", _ms(fn, repeat), _rel(fn(), ref)
    for m, kdim, n in LINEAR:
        for dtype in dtypes:
            lin = torch.nn.Linear(kdim, n).requires_grad_(False)
            x = rnd(m, kdim)
            ref = lin(x)
            yield from _packed_rows("linear", f"{m}x{kdim} -> {n}", dtype, lin.to(dtype), x.to(dtype), ref, repeat)
    for tokens, c in ((4096, 320), (1024, 640)):
        for dtype in dtypes:
            block = BasicTransformerBlock(c, 8, 768).requires_grad_(False)
            x = rnd(2, tokens, c)
            ref = x + block.ff.net(block.norm3(x))
            block, xd = block.to(dtype), x.to(dtype)
            shape, dt = f"2x{tokens} tokens x {c}", NAMES[dtype]
            yield ("feed-forward", shape, dt, "one pass", _ms(lambda: reference.feed_forward(block, xd), repeat),
                   _rel(reference.feed_forward(block, xd), ref))
            yield ("feed-forward", shape, dt, "chunked", _ms(lambda: feed_forward_chunked(block, xd), repeat),
                   _rel(feed_forward_chunked(block, xd), ref))
    for c, side in GROUP_NORM:
        x = rnd(2, c, side, side)
        w, b = rnd(c), rnd(c)
        ref = F.silu(F.group_norm(x, 32, w, b))
        for dtype in dtypes:
            xd = x.to(dtype).contiguous(memory_format=torch.channels_last)
            wd, bd = w.to(dtype), b.to(dtype)
            shape, dt = f"{c} ch, 2x{side}x{side}, 32 groups, + SiLU", NAMES[dtype]
            fn = lambda: _group_norm_torch(xd, 32, wd, bd, 1e-5, True)  # noqa: E731
            yield "group norm", shape, dt, "torch ops", _ms(fn, repeat), _rel(fn(), ref)
            if cpu_group_norm.unavailable():
                yield "group norm", shape, dt, "native", None, cpu_group_norm.unavailable()
            else:
                fn = lambda: cpu_group_norm.group_norm_native(xd, 32, wd, bd, silu=True)  # noqa: E731
                yield "group norm", shape, dt, "native", _ms(fn, repeat), _rel(fn(), ref)


def main(argv=None) -> None:
    ap = ArgumentParser(prog="python -m fastsd.benchmarks.cpu_paths", description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=positive_int, default=5)
    ap.add_argument("--threads", type=thread_count, default=None)
    ap.add_argument("--all-dtypes", action="store_true", help="time bf16 even where it is emulated (slow)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_temporaries_mapped()  # as the cpu backend's prepare() does: large temporaries stay in the heap
    print(f"{cpu_model()}, ISA {isa_label()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| op | shape | dtype | path | ms (min) | rel err vs fp32 |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for op, shape, dt, path, ms, err in rows(a.repeat, a.all_dtypes):
            if ms is None:  # a row this CPU can't run: err holds why
                print(f"| {op} | {shape} | {dt} | {path} | not run: {err} | |", flush=True)
            else:
                print(f"| {op} | {shape} | {dt} | {path} | {ms:.2f} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
