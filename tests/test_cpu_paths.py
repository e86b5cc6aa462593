"""The cpu backend (fastsd/backends/cpu.py: packed weights, native or chunked attention, chunked feed-forward, measured
choices) against the plain-torch reference that --backend torch runs. The whole file runs again
in subprocesses restricted to AVX2 and to AVX-512 without BF16 (test_cpu_paths_restricted), whatever this
machine's ISA."""
import copy
import functools
import inspect
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsd import backends, cpuinfo, load_pipeline
from fastsd.backends import (cpu, cpu_attention_fp32, cpu_attention_native, cpu_geglu, cpu_group_norm, cpu_pack, cpu_tune,
                             cpu_winograd, cpu_winograd_bf16, cpu_winograd_native, reference)
from fastsd.backends.cpu_attention import attention_chunked, rowmax_bf16
from fastsd.backends.cpu_pack import PackableConv2d, PackableLinear, make_packable, make_plain
from fastsd.models import layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(B, H, Lq, Lk, D, sharpness=2.0, seed=0):
    """(B, L, H, D)-transposed views, as CrossAttention makes them; logits with std ~ sharpness."""
    g = torch.Generator().manual_seed(seed)
    s = sharpness ** 0.5
    q = (torch.randn(B, Lq, H, D, generator=g) * s).transpose(1, 2)
    k = (torch.randn(B, Lk, H, D, generator=g) * s).transpose(1, 2)
    v = torch.randn(B, Lk, H, D, generator=g).transpose(1, 2)
    return q, k, v


# head dims 40/80/160 (SD1.5), 77 keys, query counts that don't divide the chunk, one 512-wide head (VAE)
SHAPES = [(2, 8, 300, 300, 40), (2, 8, 300, 77, 40), (1, 4, 129, 129, 80), (2, 2, 65, 77, 160), (1, 1, 200, 200, 512)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block", [1 << 12, 1 << 21], ids=["small-chunks", "default-chunks"])
def test_chunked_bf16_attention_is_as_accurate_as_torch(shape, block):
    B, H, Lq, Lk, D = shape
    qb, kb, vb = (t.bfloat16() for t in _qkv(B, H, Lq, Lk, D))
    ref = reference.attention(qb.float(), kb.float(), vb.float())  # fp32 on the same inputs, as tests/kernels
    out = attention_chunked(qb, kb, vb, block_elements=block)
    assert out.shape == qb.shape and out.dtype == torch.bfloat16
    rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    torch_err = rel(reference.attention(qb, kb, vb))
    assert rel(out) <= 2 * torch_err, (rel(out), torch_err)


@pytest.mark.parametrize("D", [40, 80], ids=["exp2-residual", "softmax"])
def test_chunked_attention_keeps_sharp_logits_accurate(D):
    """Logits with std ~60: rounding q k^T to bf16 before the softmax would lose ~0.1-1 per logit, and their
    unshifted exp overflows; the shift by the row max keeps the error near torch's. The output is then ~one
    row of v, which SDPA gets almost exactly: a normalisation after a rounded GEMM doubled torch's error."""
    q, k, v = _qkv(1, 2, 256, 256, D, sharpness=60.0, seed=3)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref = reference.attention(qb.float(), kb.float(), vb.float())
    assert torch.isinf(torch.exp((q @ k.transpose(-1, -2)) * D ** -0.5)).any()  # exp without the shift: inf
    rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    naive = torch.softmax((qb @ kb.transpose(-1, -2)) * D ** -0.5, -1) @ vb  # unshifted bf16 logits
    ours, torch_err = rel(attention_chunked(qb, kb, vb)), rel(reference.attention(qb, kb, vb))
    assert ours <= 1.5 * torch_err < rel(naive), (ours, torch_err, rel(naive))


NATIVE_WHY = cpu_attention_native.unavailable()
needs_native = pytest.mark.skipif(NATIVE_WHY is not None or not cpuinfo.native_bf16(),
                                  reason=f"native bf16 attention unavailable: {NATIVE_WHY or 'no native bf16'}")


@needs_native
@pytest.mark.parametrize("keys_rows", [False, True], ids=["native", "native_t"])
@pytest.mark.parametrize("shape", SHAPES + [(1, 3, 40, 600, 40)], ids=lambda s: "x".join(map(str, s)))
def test_native_bf16_attention_is_as_accurate_as_torch(shape, keys_rows):
    """SDPA's roundings (p and the output rounded once each): its error, not just within 2x of it; strided
    (B, L, H, D) views in, odd key counts, query counts that don't fill a block; for native_t keys past one chunk
    of its online softmax (600, two and a bit)."""
    B, H, Lq, Lk, D = shape
    qb, kb, vb = (t.bfloat16() for t in _qkv(B, H, Lq, Lk, D))
    ref = reference.attention(qb.float(), kb.float(), vb.float())
    attend = functools.partial(cpu_attention_native.attention_native, keys_rows=keys_rows)
    out = attend(qb, kb, vb)
    assert out.shape == qb.shape and out.dtype == torch.bfloat16
    rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(out) <= 1.15 * rel(reference.attention(qb, kb, vb)), (rel(out), rel(reference.attention(qb, kb, vb)))
    contiguous = attend(qb.contiguous(), kb.contiguous(), vb.contiguous(), scale=0.3)
    assert torch.equal(contiguous, attend(qb, kb, vb, scale=0.3))  # strides only
    assert not torch.equal(contiguous, out)  # the scale is used
    # p rounded to bf16 by integer rounding (a CPU without AVX512-BF16's conversion): the same bits
    lib = cpu_attention_native._library()[0]
    assert torch.equal(cpu_attention_native._run(lib, qb, kb, vb, None, bf16_cvt=False, keys_rows=keys_rows), out)


@needs_native
@pytest.mark.parametrize("keys_rows", [False, True], ids=["native", "native_t"])
def test_native_attention_keeps_sharp_logits_accurate(keys_rows):
    """Logits with std ~60; for native_t over 3001 keys (12 chunks): a later chunk's larger maximum rescales
    what the earlier ones summed."""
    for shape in [(1, 2, 256, 255, 40), (1, 2, 100, 3001, 40)]:
        q, k, v = _qkv(*shape, sharpness=60.0, seed=3)
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        ref = reference.attention(qb.float(), kb.float(), vb.float())
        rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        out = cpu_attention_native.attention_native(qb, kb, vb, keys_rows=keys_rows)
        assert rel(out) <= 1.15 * rel(reference.attention(qb, kb, vb)), shape


needs_native_fp32 = pytest.mark.skipif(NATIVE_WHY is not None or not cpu_attention_native.avx512(),
                                       reason=f"native fp32 attention not offered: {NATIVE_WHY or 'no AVX-512'}")


@needs_native_fp32
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] <= cpu_attention_native.FP32_MAX_HEAD_DIM] +
                         [(1, 2, 256, 255, 40)], ids=lambda s: "x".join(map(str, s)))
def test_native_fp32_attention_is_as_accurate_as_torch(shape):
    """fp32 against fp64 on the same inputs: SDPA's error (p v summed over blocks of keys; one long sum doubled it)."""
    _assert_fp32_attention_accuracy(cpu_attention_native.attention_native, shape)


def _assert_fp32_attention_accuracy(kernel, shape):
    """`kernel` on fp32 (B, L, H, D) views within 1.25x of SDPA's error against fp64 (or of fp32's rounding where
    SDPA is exact: one key, out = v); sharp logits at 255 keys. Returns the inputs and the output."""
    B, H, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Lq, Lk, D, sharpness=60.0 if Lk == 255 else 2.0)
    ref = reference.attention(q.double(), k.double(), v.double())
    out = kernel(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    rel = lambda o: ((o.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    torch_err = rel(reference.attention(q, k, v))
    assert rel(out) <= max(1.25 * torch_err, 1.2e-7), (rel(out), torch_err)
    return (q, k, v), out


MICRO_WHY = cpu_attention_fp32.unavailable()
needs_micro_kernel = pytest.mark.skipif(MICRO_WHY is not None, reason=f"fp32 attention kernel not offered: {MICRO_WHY}")


@needs_micro_kernel
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] <= cpu_attention_fp32.MAX_HEAD_DIM] +
                         [(1, 2, 256, 255, 40), (1, 3, 5, 1, 8), (2, 1, 97, 300, 24), (1, 2, 49, 16, 160)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp32_micro_kernel_attention_is_as_accurate_as_torch(shape):
    """fp32 against fp64 on the same inputs, with the kernel of the ISA in effect (AVX2 or AVX-512): SDPA's error
    (p v summed per chunk of keys: one running sum over all keys tripled it); a partial query block, partial key
    panels / tiles, one key, sharp logits."""
    (q, k, v), out = _assert_fp32_attention_accuracy(cpu_attention_fp32.attention_fp32, shape)
    assert torch.equal(out, cpu_attention_fp32.attention_fp32(q.contiguous(), k.contiguous(), v.contiguous()))
    ref3 = reference.attention(q.double(), k.double(), v.double(), scale=0.3)  # another scale
    rel3 = lambda o: ((o.double() - ref3).norm() / ref3.norm()).item()  # noqa: E731
    assert rel3(cpu_attention_fp32.attention_fp32(q, k, v, scale=0.3)) <= max(1.25 * rel3(
        reference.attention(q, k, v, scale=0.3)), 1.2e-7)


@needs_micro_kernel
def test_fp32_micro_kernel_attention_refuses_what_it_cannot_run():
    """Head dims off its multiples of 8 and other dtypes never reach the kernel; its C entry point answers bad
    arguments with an error code, not a crash."""
    q = torch.randn(1, 2, 8, 44)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_attention_fp32.attention_fp32(q, q, q)
    with pytest.raises(ValueError, match="fp32"):
        cpu_attention_fp32.attention_fp32(q[..., :40].double(), q[..., :40].double(), q[..., :40].double())
    lib = cpu_attention_fp32._library()[0]
    x = torch.zeros(64)
    ptrs = [x.data_ptr(), 0, 0, 0] * 4
    assert lib.fastsd_attention_fp32(*ptrs, 1, 1, 1, 1, 12, 1.0, 48, 128, 1) == 1  # d = 12
    assert lib.fastsd_attention_fp32(*ptrs, 1, 1, 1, 1, 8, 1.0, 50, 128, 1) == 1  # no code for that block size
    block = cpu_attention_fp32.BLOCK_M[cpu_attention_fp32.isa()]
    assert lib.fastsd_attention_fp32(*ptrs, 1, 1, 1, 1, 8, 1.0, block, 0, 1) == 1  # no keys per chunk
    assert lib.fastsd_attention_fp32(*ptrs, 1, 1, 1, 1, 8, 1.0, block, 64, 1) == 0  # one query, one key
    k = torch.randn(1, 2, 5, 8)
    assert cpu_attention_fp32.attention_fp32(torch.randn(1, 2, 0, 8), k, k).shape == (1, 2, 0, 8)  # no queries


def test_fp32_micro_kernel_is_the_one_of_the_isa_in_effect():
    isa, flags = cpuinfo.aten_capability(), set(cpuinfo.cpu_flags())
    expected = ("avx512" if isa == "AVX512" and {"avx512f", "fma"} <= flags
                else "avx2" if isa == "AVX2" and {"avx2", "fma"} <= flags else None)
    assert cpu_attention_fp32.isa() == expected
    assert (cpu_attention_fp32.offered_here() is None) == (expected is not None)
    if expected is None:
        assert MICRO_WHY is not None


def test_native_attention_build_failures_are_one_line_and_leave_nothing(tmp_path):
    """No compiler, or a compiler that fails: RuntimeError with one line, no file left in the cache folder;
    a built library is found again by its key, not rebuilt."""
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_attention_native.build(cxx="/nonexistent/g++", folder=tmp_path)
    with pytest.raises(RuntimeError, match="^false failed") as e:
        cpu_attention_native.build(cxx="false", folder=tmp_path)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []
    if NATIVE_WHY is None:
        path = cpu_attention_native.build(folder=tmp_path)
        stamp = path.stat().st_mtime_ns
        assert cpu_attention_native.build(folder=tmp_path) == path and path.stat().st_mtime_ns == stamp
        assert [p.name for p in tmp_path.iterdir()] == [path.name]


@needs_native
def test_native_attention_refuses_what_it_cannot_run():
    """Odd head dims never reach the kernel (the cpu backend sends them to the chunked path); the C entry point
    itself answers bad arguments with an error code and a message, not a crash."""
    q = torch.randn(1, 2, 8, 41).bfloat16()
    with pytest.raises(ValueError, match="even head dim"):
        cpu_attention_native.attention_native(q, q, q)
    lib = cpu_attention_native._library()[0]
    x = torch.zeros(8, dtype=torch.bfloat16)
    ptrs = [x.data_ptr(), 0, 0, 0] * 4
    assert lib.fastsd_attention(1, *ptrs, 1, 1, 1, 1, 3, 1.0, 64, 512, 1) == 1  # bf16, d = 3
    assert b"head dim must be even" in lib.fastsd_attention_error()
    with pytest.raises(ValueError, match="fp32"):
        cpu_attention_native.attention_native(q.half(), q.half(), q.half())


@pytest.mark.skipif(NATIVE_WHY is not None, reason=f"native attention unavailable: {NATIVE_WHY}")
def test_loading_the_native_library_leaves_denormals_alone():
    """Loading the library changes no floating-point mode of the process (built with -ffast-math, GCC linked
    crtfastmath.o, which set flush-to-zero / denormals-are-zero for every op once it loaded)."""
    code = ("import torch; from fastsd.backends import cpu_attention_native as n; x = torch.tensor([1e-39]); "
            "before = (x * 1.0).item(); lib, why = n._library(); print(lib is not None, before == (x * 1.0).item() > 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def _mapping_flags(address: int) -> list[str]:
    """The VmFlags of this process' mapping holding `address` (`hg`: advised huge pages)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


@pytest.mark.skipif(not cpuinfo.huge_pages(), reason="no transparent huge pages here (THP mode never, or turned off)")
def test_winograd_weights_are_on_huge_pages():
    """The Winograd-transformed weights (both layouts: contiguous from CONTIGUOUS_FROM_K output channels, a view below)
    land in mappings advised for huge pages, 2 MiB aligned, and convolve as before; small buffers stay torch's."""
    from fastsd.backends import cpu_huge_pages

    for k, c in ((cpu_winograd.CONTIGUOUS_FROM_K, 64), (320, 320)):
        conv = torch.nn.Conv2d(c, k, 3, padding=1).requires_grad_(False)
        u = cpu_winograd.weight_transform(conv.weight, cpu_winograd.F2)
        assert "hg" in _mapping_flags(u.data_ptr()) and u.data_ptr() % cpu_huge_pages.HUGE_PAGE == 0
        x = torch.randn(1, c, 16, 16).to(memory_format=torch.channels_last)
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        got = cpu_winograd.conv3x3(x, u, conv.bias, cpu_winograd.F2)
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6
    t = cpu_huge_pages.empty((3, 1 << 19))  # 6 MiB: its mapping outlives the views made on the way
    t.fill_(2.0)
    assert t.shape == (3, 1 << 19) and t.is_contiguous() and t.sum().item() == 3 * 2 * (1 << 19)
    assert "hg" not in _mapping_flags(cpu_huge_pages.empty((1000,)).data_ptr())


def test_huge_pages_can_be_turned_off():
    """FASTSD_CPU_HUGE_PAGES=0: Winograd weights come from torch's allocator and cpuinfo says so (it is part of the
    tuner's fingerprint, so choices timed on the other kind of pages are not reused)."""
    code = inspect.getsource(_mapping_flags) + (
        "import torch; from fastsd import cpuinfo; from fastsd.backends import cpu_winograd as W; "
        "u = W.weight_transform(torch.randn(1280, 64, 3, 3), W.F2); "
        "print(cpuinfo.huge_pages(), 'hg' in _mapping_flags(u.data_ptr()), cpuinfo.fingerprint())")
    outs = []
    for setting in ("0", "1"):
        env = {**{k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}, "FASTSD_CPU_HUGE_PAGES": setting}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.split())
    thp = cpuinfo.thp_mode() in ("always", "madvise")
    assert outs[0][:2] == ["False", "False"]
    assert outs[1][:2] == [str(thp)] * 2
    assert (outs[0][2] != outs[1][2]) == thp  # the same fingerprint where there are none anyway


GN_WHY = cpu_group_norm.unavailable()


@pytest.mark.skipif(GN_WHY is not None, reason=f"native GroupNorm unavailable: {GN_WHY}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [((2, 24, 7, 5), 4, True, True, 0.0), ((1, 320, 16, 16), 32, True, True, 0.0),
                                  ((1, 64, 9, 1), 32, False, False, 0.0), ((3, 12, 5, 6), 3, True, True, 40.0),
                                  ((1, 48, 1, 1), 6, False, True, 0.0)],
                         ids=["odd", "unet", "no-affine", "large-mean", "one-pixel"])
def test_native_group_norm_is_as_accurate_as_torch(dtype, case):
    """GroupNorm (+ SiLU) of channels-last fp32/bf16 input: within 2x of PyTorch's own error against fp64, as every
    native piece's self-test (odd sizes, one pixel per image, no weight, values far from zero; below PyTorch's own
    at the UNet's shapes); what the cpu backend's op runs by default."""
    shape, groups, silu, affine, offset = case
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 2 + offset).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)) if affine else (None, None)
    out = cpu_group_norm.group_norm_native(x, groups, w, b, eps=1e-5, silu=silu)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    theirs = F.group_norm(x, groups, None if w is None else w.to(dtype), None if b is None else b.to(dtype), 1e-5)
    theirs = F.silu(theirs) if silu else theirs
    err = lambda o: cpu_group_norm.reference_error(o, x, groups, w, b, 1e-5, silu)  # noqa: E731
    assert err(out) <= 2 * err(theirs), (err(out), err(theirs))
    with torch.no_grad():  # the backend's op: the native kernel (FASTSD_CPU_TUNE=0 here: the default) ...
        ws, bs = (None, None) if w is None else (w.to(dtype), b.to(dtype))
        assert torch.equal(cpu.group_norm(x, groups, ws, bs, eps=1e-5, silu=silu),
                           cpu_group_norm.group_norm_native(x, groups, ws, bs, eps=1e-5, silu=silu))
        plain = x.contiguous()  # ... on channels-last input only; torch's ops otherwise
        if not plain.is_contiguous(memory_format=torch.channels_last):
            assert torch.equal(cpu.group_norm(plain, groups, ws, bs, eps=1e-5, silu=silu),
                               cpu._group_norm_torch(plain, groups, ws, bs, 1e-5, silu))


GEGLU_WHY = cpu_geglu.unavailable()


@pytest.mark.skipif(GEGLU_WHY is not None, reason=f"native GEGLU unavailable: {GEGLU_WHY}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(3, 7, 2 * 13), (1, 2048, 2560), (2, 5, 2 * 1029), (64, 2 * 9)],
                         ids=["odd", "unet-chunk", "wide-rows", "narrow"])
def test_native_geglu_is_as_accurate_as_torch(dtype, case):
    """h * GELU(gate) of fp32/bf16 rows (odd widths, more columns than a work item, GELU's tails): within 2x of
    PyTorch's own error against fp64 (its vectorised erf is the formula the kernel uses; its scalar tail, libm's
    erf, is more accurate: a few values alone are no comparison); what the cpu backend's op runs by default, also
    on rows a stride apart."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(*case, generator=g) * 3
    if case[-1] >= 18:
        p[..., case[-1] // 2:][..., :9] = torch.linspace(-8, 8, 9)  # GELU's tails among the gates
    p = p.to(dtype)
    out = cpu_geglu.geglu_native(p)
    assert out.dtype == dtype and out.shape == (*case[:-1], case[-1] // 2) and out.is_contiguous()
    err = lambda o: cpu_geglu.reference_error(o, p)  # noqa: E731
    assert err(out) <= 2 * err(cpu_geglu.geglu_torch(p)), (err(out), err(cpu_geglu.geglu_torch(p)))
    assert torch.equal(cpu._geglu(p), out)  # FASTSD_CPU_TUNE=0 here: the default
    wide = torch.cat([p, p[..., :4]], dim=-1)[..., :case[-1]]  # rows 4 values further apart
    assert wide.stride(-2) != wide.shape[-1] or wide.shape[-2] == 1
    assert torch.equal(cpu_geglu.geglu_native(wide), out)


def test_native_geglu_refuses_what_it_cannot_run():
    for bad in (torch.randn(4, 7), torch.randn(4, 8).half(), torch.randn(8, 4).t()):
        assert not cpu_geglu.covers(bad)
        with pytest.raises(ValueError, match="even width"):
            cpu_geglu._run(None, bad)
    with torch.no_grad():
        x = torch.randn(3, 8).half()
        torch.testing.assert_close(cpu._geglu(x), cpu_geglu.geglu_torch(x))  # torch's ops for what it can't run


def test_native_build_key_covers_the_headers_a_source_includes():
    """A change to cpu_exp2.h, cpu_vec.h or cpu_winograd_transforms.h (included by the native sources) must rebuild
    them: its text is part of the key."""
    from fastsd.backends import cpu_native
    header = (cpu_group_norm.SOURCE.parent / "cpu_exp2.h").read_bytes()
    for source in (cpu_group_norm.SOURCE, cpu_geglu.SOURCE, cpu_attention_native.SOURCE,
                   cpu_attention_fp32.SOURCE):
        assert header in cpu_native.sources(source)
    vec = (cpu_group_norm.SOURCE.parent / "cpu_vec.h").read_bytes()  # the attention kernels' vector type
    assert all(vec in cpu_native.sources(s) for s in (cpu_attention_native.SOURCE, cpu_attention_fp32.SOURCE))
    transforms = (cpu_group_norm.SOURCE.parent / "cpu_winograd_transforms.h").read_bytes()  # shared by both
    assert cpu_native.sources(cpu_winograd_native.SOURCE) == [cpu_winograd_native.SOURCE.read_bytes(), transforms]
    assert transforms in cpu_native.sources(cpu_winograd_bf16.SOURCE)


def test_native_group_norm_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="channels-last"):
        cpu_group_norm._run(None, torch.randn(1, 6, 4, 4), 4, None, None, 1e-5, False)  # 4 groups, 6 channels
    with pytest.raises(ValueError, match="channels-last"):
        cpu_group_norm._run(None, torch.randn(1, 8, 4, 4).half(), 4, None, None, 1e-5, False)


def test_native_attention_can_be_turned_off_and_says_why():
    code = ("import os, torch; from fastsd.backends import cpu, cpu_attention_native as n; "
            "from fastsd.backends.cpu_attention import attention_chunked; "
            "from fastsd.backends import cpu_group_norm as gn; "
            "q = torch.randn(1, 2, 64, 40).bfloat16(); print(n.unavailable()); print(gn.unavailable()); "
            "torch.set_grad_enabled(False); print(torch.equal(cpu.attention(q, q, q), attention_chunked(q, q, q)))")
    env = {**os.environ, "FASTSD_CPU_NATIVE": "0", "FASTSD_CPU_TUNE": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    # without it: chunked where bf16 is native, SDPA where it is emulated or AMX runs SDPA's GEMMs (the fallback there)
    chunked = cpuinfo.native_bf16() and not cpuinfo.amx()
    assert r.stdout.split() == ["FASTSD_CPU_NATIVE=0", "FASTSD_CPU_NATIVE=0", "True" if chunked else "False"]


def _load_with_one_warning(dtype: str, what: str):
    """A random:tiny cpu pipeline loaded with warnings recorded: exactly one about `what`, naming the faked reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline("random:tiny", device="cpu", dtype=dtype, backend="cpu")
    msgs = [str(w.message) for w in caught if what in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0], msgs
    return pipe


def test_native_attention_that_fails_to_build_warns_once_and_runs_chunked(monkeypatch):
    """A bf16 pipeline on a native-bf16 CPU whose native kernel can't be built (no compiler here, faked):
    one warning at load naming why, and the chunked path generates."""
    monkeypatch.setattr(cpuinfo, "native_bf16", lambda cpuinfo="": True)
    monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="": False)  # (with AMX the fallback is SDPA, not chunked)
    monkeypatch.setattr(cpu_attention_native, "_library", lambda: (None, "no C++ compiler (g++ not found; set CXX)"))
    cpu._warn_native.cache_clear()
    calls = []
    real = cpu.attention_chunked
    monkeypatch.setattr(cpu, "attention_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        pipe = _load_with_one_warning("bf16", "native attention")
        img = pipe.generate("a cat", steps=1, width=64, height=64, seed=0, progress=False)[0]
        assert np.asarray(img).std() > 0 and calls
    finally:
        cpu._warn_native.cache_clear()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp32_attention_kernel_that_fails_to_build_warns_once_at_load(monkeypatch, dtype):
    """The fp32 micro-kernel can't be built (no compiler, faked): one warning at load for an fp32 model and for a
    bf16 one without AMX (its attention may run in fp32), none with AMX; the pipeline generates without it."""
    if cpu_attention_fp32.offered_here() is not None:
        pytest.skip(f"no micro-kernel for this CPU: {cpu_attention_fp32.offered_here()}")
    if dtype == "bf16" and not cpuinfo.native_bf16():
        pytest.skip("bf16 is not native here")
    monkeypatch.setattr(cpu_attention_fp32, "_library", lambda: (None, "no C++ compiler (g++ not found; set CXX)"))
    cpu._warn_native.cache_clear()
    try:
        for amx in ((False, True) if dtype == "bf16" else (cpuinfo.amx(),)):
            monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="", amx=amx: amx)
            cpu._warn_native.cache_clear()
            if amx and dtype == "bf16":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    load_pipeline("random:tiny", device="cpu", dtype=dtype, backend="cpu")
                assert not [w for w in caught if "fp32 attention kernel" in str(w.message)]
                continue
            pipe = _load_with_one_warning(dtype, "fp32 attention kernel")
            img = pipe.generate("a cat", steps=1, width=64, height=64, seed=0, progress=False)[0]
            assert np.asarray(img).std() > 0
    finally:
        cpu._warn_native.cache_clear()


def test_native_winograd_that_fails_to_build_warns_once_and_runs_torch_ops(monkeypatch):
    """An fp32 pipeline where the native Winograd transforms can't be built (no compiler here, faked): one warning
    at load naming why; Winograd convolutions run their torch-ops transforms, and the pipeline generates."""
    monkeypatch.setattr(cpu_winograd_native, "_library", lambda: (None, "no C++ compiler (g++ not found; set CXX)"))
    cpu._warn_native.cache_clear()
    try:
        pipe = _load_with_one_warning("fp32", "native Winograd")
        assert cpu_winograd.implementation() == "torch"
        x, _, b, u = _winograd_case(((1, 16, 20, 20), 8, True, True), cpu_winograd.F4)
        assert torch.equal(cpu_winograd.conv3x3(x, u, b, cpu_winograd.F4),
                           cpu_winograd.conv3x3_torch(x, u, b, cpu_winograd.F4))
        img = pipe.generate("a cat", steps=1, width=64, height=64, seed=0, progress=False)[0]
        assert np.asarray(img).std() > 0
    finally:
        cpu._warn_native.cache_clear()


def test_native_geglu_that_fails_to_build_warns_once_and_runs_torch_ops(monkeypatch):
    """No compiler (faked): one warning at load naming why; GEGLU runs torch's ops and the pipeline generates."""
    monkeypatch.setattr(cpu_geglu, "_library", lambda: (None, "no C++ compiler (g++ not found; set CXX)"))
    cpu._warn_native.cache_clear()
    try:
        pipe = _load_with_one_warning("fp32", "native GEGLU kernel")
        p = torch.randn(5, 16)
        assert torch.equal(cpu._geglu(p), cpu_geglu.geglu_torch(p))
        img = pipe.generate("a cat", steps=1, width=64, height=64, seed=0, progress=False)[0]
        assert np.asarray(img).std() > 0
    finally:
        cpu._warn_native.cache_clear()


def test_native_group_norm_that_fails_to_build_warns_once_and_runs_torch_ops(monkeypatch):
    """No compiler (faked): one warning at load naming why; GroupNorm runs torch's ops and the pipeline generates."""
    monkeypatch.setattr(cpu_group_norm, "_library", lambda: (None, "no C++ compiler (g++ not found; set CXX)"))
    cpu._warn_native.cache_clear()
    try:
        pipe = _load_with_one_warning("fp32", "native GroupNorm kernel")
        x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert torch.equal(cpu.group_norm(x, 32, None, None, silu=True),
                               cpu._group_norm_torch(x, 32, None, None, 1e-5, True))
        img = pipe.generate("a cat", steps=1, width=64, height=64, seed=0, progress=False)[0]
        assert np.asarray(img).std() > 0
    finally:
        cpu._warn_native.cache_clear()


@pytest.mark.parametrize("d", [40, 44, 200])  # the fp32 kernels (where offered), SDPA beyond their head dims
def test_bf16_attention_in_fp32_is_a_candidate_without_amx(monkeypatch, d):
    """Without AMX the tuner also times bf16 attention computed in fp32 (rounded to bf16 once): within SDPA's bf16
    error against fp64; with AMX it is not among the candidates."""
    if not cpuinfo.native_bf16():
        pytest.skip("bf16 is not native here: bf16 attention runs SDPA")
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 70, 77, d))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    seen = {}

    class Record:
        def choose(self, key, candidates, default):
            seen[key] = set(candidates)
            return "fp32" if "fp32" in candidates else default

    monkeypatch.setattr(cpu, "tuner", Record)
    for amx in (False, True):
        monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="", amx=amx: amx)
        with torch.no_grad():
            out = cpu.attention(q, k, v)
        key = list(seen)[-1]
        assert ("fp32" in seen[key]) == (not amx) and (" fp32" in key) == (not amx)
        if not amx:
            assert out.dtype == torch.bfloat16
            assert _rel(out, ref) <= 2 * _rel(reference.attention(q, k, v), ref)


def test_attention_dispatch_on_cpu():
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 64, 77, 40))
    ref = reference.attention(q, k, v)
    chunked = attention_chunked(q, k, v)
    assert not torch.equal(ref, chunked)  # the two paths are distinguishable
    assert backends.get("auto", "cpu") is cpu.BACKEND
    with torch.no_grad():
        assert torch.equal(reference.attention(q, k, v), ref)  # the plain reference
        # where bf16 is native: the native kernel where it builds (FASTSD_CPU_TUNE=0 here: the default), else
        # chunked, or with AMX SDPA (its GEMMs run on AMX); emulated bf16 keeps SDPA
        if not cpuinfo.native_bf16():
            expected = ref
        elif NATIVE_WHY is None:
            expected = cpu_attention_native.attention_native(q, k, v)
            assert not torch.equal(expected, chunked) and not torch.equal(expected, ref)
        else:
            expected = ref if cpuinfo.amx() else chunked
        assert torch.equal(cpu.attention(q, k, v), expected)
        q41, k41, v41 = (t.bfloat16() for t in _qkv(1, 2, 64, 77, 41))  # odd head dim: never native
        assert torch.equal(cpu.attention(q41, k41, v41),
                           attention_chunked(q41, k41, v41) if cpuinfo.native_bf16() and not cpuinfo.amx()
                           else reference.attention(q41, k41, v41))
        # fp32 (FASTSD_CPU_TUNE=0 here: the defaults): the micro-kernel of the ISA in effect (AVX2 or AVX-512) for
        # head dims multiples of 8 up to 80, else the brgemm kernel on AVX-512 (head dims <= 160), else SDPA
        qf, kf, vf = q.float(), k.float(), v.float()
        fp32_native = NATIVE_WHY is None and cpu_attention_native.avx512()
        micro = MICRO_WHY is None
        assert torch.equal(cpu.attention(qf, kf, vf), cpu_attention_fp32.attention_fp32(qf, kf, vf) if micro
                           else cpu_attention_native.attention_native(qf, kf, vf) if fp32_native
                           else reference.attention(qf, kf, vf))
        if fp32_native or micro:
            assert not torch.equal(cpu.attention(qf, kf, vf), reference.attention(qf, kf, vf))
        if fp32_native and micro:  # the two kernels are distinguishable
            assert not torch.equal(cpu.attention(qf, kf, vf), cpu_attention_native.attention_native(qf, kf, vf))
        for qo in (torch.randn(1, 2, 64, 44), torch.randn(1, 2, 64, 160)):  # no micro-kernel code for 44; 160
            # beyond its default
            assert torch.equal(cpu.attention(qo, qo, qo), cpu_attention_native.attention_native(qo, qo, qo)
                               if fp32_native else reference.attention(qo, qo, qo))
        wide = torch.randn(1, 1, 64, 512)  # the VAE's head: SDPA in fp32 (the kernel's error there is 1.9x SDPA's)
        assert torch.equal(cpu.attention(wide, wide, wide), reference.attention(wide, wide, wide))
    qg = q.clone().requires_grad_()  # autograd on: reference ops (the chunked path writes into out= buffers)
    assert torch.equal(cpu.attention(qg, k, v), ref)


@needs_native
def test_native_t_is_the_bf16_default_for_many_keys_without_amx(monkeypatch):
    """FASTSD_CPU_TUNE=0 here (the defaults): keys along the rows for the 64x64 self-attention's kind of shape
    (a head dim not in whole 16-float vectors, many keys) without AMX; native with AMX, for D 80, for few keys."""
    monkeypatch.setattr(cpu, "NATIVE_T_MIN_KEYS", 300)
    cases = [((1, 2, 64, 300, 40), True), ((1, 2, 64, 299, 40), False), ((1, 2, 64, 300, 80), False)]
    for amx in (False, True):
        monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="", amx=amx: amx)
        for shape, many in cases:
            q, k, v = (t.bfloat16() for t in _qkv(*shape))
            native, native_t = (cpu_attention_native.attention_native(q, k, v, keys_rows=t) for t in (False, True))
            assert not torch.equal(native, native_t)  # distinguishable
            with torch.no_grad():
                assert torch.equal(cpu.attention(q, k, v), native_t if many and not amx else native), (shape, amx)


def _tiny_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g),
            torch.randint(0, 1000, (2, 77), generator=g), torch.tensor([10.0, 500.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_weights_give_the_same_outputs_and_state_dict(dtype):
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    models = {"unet": pipe.unet, "vae": pipe.vae, "clip": pipe.clip}
    x, ctx, ids, t = _tiny_inputs()

    def run():
        return (pipe.unet(x.to(dtype), t, ctx.to(dtype)), pipe.vae.decode(x.to(dtype)), pipe.clip(ids)[0])

    with torch.no_grad():
        exact = run()  # fp32
        for m in models.values():
            m.to(dtype, memory_format=torch.channels_last)
        before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
        ref = run()
        counts = [make_packable(m) for m in models.values()]
        out = run()  # packs at the first call, for the shapes it sees
        out2 = run()
    why = cpu_pack.packing_unavailable(dtype)
    packed = [m for m in pipe.unet.modules() if isinstance(m, (PackableConv2d, PackableLinear)) and m.weight.is_mkldnn]
    if why is not None:  # e.g. bf16 on a CPU without AVX512-BF16: nothing packs, nothing breaks
        assert counts == [0, 0, 0] and not packed
    else:
        assert all(c > 0 for c in counts) and packed
        plain = [m for m in pipe.unet.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
        assert not plain  # every conv and linear is packable (1x1 included: packed for their input shape)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    for o, o2, r, e in zip(out, out2, ref, exact):
        assert torch.equal(o, o2)  # the call that packs and the calls after it agree
        if dtype == torch.float32:  # oneDNN's fp32 GEMM instead of MKL's: rounding-level differences
            assert rel(o, r) < 1e-5
        else:  # bf16: as close to the fp32 result as the unpacked model is
            assert rel(o, e) <= 1.5 * rel(r, e), (rel(o, e), rel(r, e))
    for name, m in models.items():
        after = m.state_dict()
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after), name
        make_plain(m)  # and back: plain modules, the original weights bit for bit
        assert not any(isinstance(mod, (PackableConv2d, PackableLinear)) for mod in m.modules())
        assert all(torch.equal(v, before[name][k]) for k, v in m.state_dict().items()), name


def test_replace_weight_drops_a_packed_weight_without_reordering_it_back(monkeypatch):
    """A LoRA unload / switch puts an original weight back: the merged weight it replaces is dropped packed."""
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))
    monkeypatch.setenv("FASTSD_CPU_TUNE", "0")  # packed by default
    conv = cpu.BACKEND.prepare(torch.nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False))
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    new = torch.nn.Parameter(torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last),
                             requires_grad=False)
    with torch.no_grad():
        conv(x)
        assert conv.weight.is_mkldnn
        monkeypatch.setattr(cpu_pack._Packable, "unpack", lambda self: pytest.fail("reordered back"))
        cpu.BACKEND.replace_weight(conv, new)
        assert conv.weight is new and isinstance(conv, PackableConv2d)
        assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, new, conv.bias, padding=1), atol=1e-5)


def test_first_call_hands_replaced_dense_weights_back_as_it_packs(monkeypatch):
    """The call that packs every layer trims the heap each TRIM_BYTES of dense weights it replaced (else the dense
    and the packed weights are held together until the run ends); layers that stay plain don't count."""
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))
    monkeypatch.setenv("FASTSD_CPU_TUNE", "0")  # packed by default
    trims = []
    monkeypatch.setattr(cpu_pack, "release_freed_memory", lambda: trims.append(cpu_pack.PACKED[0]))
    monkeypatch.setattr(cpu_pack, "_replaced", [0])
    convs = [torch.nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False) for _ in range(5)]
    nbytes = convs[0].weight.nbytes
    monkeypatch.setattr(cpu_pack, "TRIM_BYTES", 2 * nbytes)  # a trim after every second packed layer
    model = cpu.BACKEND.prepare(torch.nn.Sequential(*convs))
    x = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    start = cpu_pack.PACKED[0]
    with torch.no_grad():
        model(x)
        assert [n - start for n in trims] == [2, 4] and cpu_pack._replaced[0] == nbytes
        model(x)  # packed already: nothing replaced, no trim
    assert len(trims) == 2

    class Plain:
        def choose(self, key, candidates, default):
            return "plain"

    monkeypatch.setattr(cpu_tune, "tuner", Plain)
    plain = cpu.BACKEND.prepare(torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False)
                                                      for _ in range(3)]))
    with torch.no_grad():
        plain(x)
    assert len(trims) == 2 and cpu_pack._replaced[0] == nbytes


def test_convolutions_pack_for_the_input_shape_they_see():
    """oneDNN's blocked weight layout depends on the input shape on some ISAs (AVX2): a weight packed
    for one shape is repacked when the layer is called with another, and the results stay exact."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 96, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(64, 96, 3, padding=1).requires_grad_(False)
    plain.load_state_dict(conv.state_dict())
    assert make_packable(conv) == (cpu_pack.packing_unavailable(torch.float32) is None)
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))
    with torch.no_grad():
        for side in (8, 5, 8, 13):
            x = torch.randn(2, 64, side, side).contiguous(memory_format=torch.channels_last)
            assert torch.equal(conv(x), plain(x))  # the same oneDNN convolution, bit for bit
            assert conv.weight.is_mkldnn and conv._packed_for == tuple(x.shape)
        with torch.enable_grad():  # autograd: the plain op on the dense weight
            y = conv(torch.randn(1, 64, 4, 4, requires_grad=True))
        assert y.requires_grad


def test_shapes_that_chose_plain_and_packed_alternate(monkeypatch):
    """A layer packed at one input shape and measured faster plain at another runs both, alternating (a
    batch runner switches batch sizes): the plain call gets the dense weight, not the packed one."""
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))

    class Choice:  # packed at batch 2, plain at batch 4
        def choose(self, key, candidates, default):
            return "plain" if " x(4," in key else "packed"

    monkeypatch.setattr(cpu_tune, "tuner", Choice)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    plain = torch.nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    plain.load_state_dict(conv.state_dict())
    make_packable(conv)
    with torch.no_grad():
        for batch in (2, 4, 2, 4):
            x = torch.randn(batch, 8, 6, 6)
            torch.testing.assert_close(conv(x), plain(x))
            assert conv.weight.is_mkldnn == (batch == 2)


def _interrupt_once(monkeypatch, method: str) -> list:
    """torch.nn.Module.<method> ("register_buffer" / "register_parameter") raises KeyboardInterrupt at its next call
    for `weight`, as a Ctrl-C landing while a layer swaps its weight; [True] until it has."""
    real, armed = getattr(torch.nn.Module, method), [True]

    def interrupted(self, name, *args, **kwargs):
        if armed[0] and name == "weight":
            armed[0] = False
            raise KeyboardInterrupt
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, method, interrupted)
    return armed


@pytest.mark.parametrize("step", ["pack", "repack", "unpack"])
def test_an_interrupted_weight_swap_leaves_the_old_weight(monkeypatch, step):
    """A Ctrl-C (any exception) while a layer swaps its weight (dense for packed at its first call, packed for another
    input shape, packed back to dense) leaves it the weight it had and the state that goes with it, never no weight:
    it runs on as an uninterrupted twin does, bit for bit, and its state_dict is its weight of before."""
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))
    monkeypatch.setenv("FASTSD_CPU_TUNE", "0")  # packed by default
    torch.manual_seed(0)
    layer = (torch.nn.Linear(16, 24) if step == "pack" else torch.nn.Conv2d(8, 16, 3, padding=1)).requires_grad_(False)
    twin, original = copy.deepcopy(layer), layer.weight.detach().clone()
    make_packable(layer), make_packable(twin)
    xs = [torch.randn(3, 16)] if step == "pack" else [torch.randn(1, 8, side, side) for side in (6, 9)]
    with torch.no_grad():
        if step != "pack":
            layer(xs[0]), twin(xs[0])  # packed for the first shape
            assert layer.weight.is_mkldnn
        before, state = layer.weight, (layer._packed_for, layer._form, layer.__dict__.get("_last_packed"))
        armed = _interrupt_once(monkeypatch, "register_parameter" if step == "unpack" else "register_buffer")
        with pytest.raises(KeyboardInterrupt):
            layer.unpack() if step == "unpack" else layer(xs[-1])
        assert not armed[0]
        assert layer.weight is before and (layer._packed_for, layer._form, layer.__dict__.get("_last_packed")) == state
        assert torch.equal(layer.state_dict()["weight"], original)
        for x in xs + xs:
            assert torch.equal(layer(x), twin(x))
    make_plain(layer)
    assert type(layer) in (torch.nn.Linear, torch.nn.Conv2d) and torch.equal(layer.weight, original)


def test_pointwise_convolution_runs_as_a_packed_linear_where_chosen(monkeypatch):
    """A 1x1 convolution has a third choice, "linear": oneDNN's packed linear over the pixels of channels-last
    input, its weight packed as a (K, C) linear's. Chosen at one shape and "packed" at another, both agree with the
    plain layer; its state_dict and make_plain give the weight back bit for bit; other convolutions never get it."""
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))
    offered = {}

    class Choice:  # linear at batch 1, packed at batch 2
        def choose(self, key, candidates, default):
            offered[key] = set(candidates)
            return "linear" if " x(1," in key and "linear" in candidates else "packed"

    monkeypatch.setattr(cpu_tune, "tuner", Choice)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, 1).requires_grad_(False).to(memory_format=torch.channels_last)
    conv3 = torch.nn.Conv2d(24, 40, 3, padding=1).requires_grad_(False)
    plain = torch.nn.Conv2d(24, 40, 1).requires_grad_(False)
    plain.load_state_dict(conv.state_dict())
    original = conv.weight.detach().clone()
    make_packable(conv), make_packable(conv3)
    with torch.no_grad():
        for batch in (1, 2, 1):
            x = torch.randn(batch, 24, 7, 5).contiguous(memory_format=torch.channels_last)
            y = conv(x)
            assert conv.weight.is_mkldnn and conv._form == ("linear" if batch == 1 else "packed")
            assert y.shape == (batch, 40, 7, 5) and y.is_contiguous(memory_format=torch.channels_last)
            assert _rel(y, plain(x)) < 1e-6
        conv3(torch.randn(1, 24, 7, 5))
    assert {k.endswith(" linear") for k in offered} == {True, False}  # the 1x1 layer's keys only
    assert all(("linear" in c) == k.endswith(" linear") for k, c in offered.items())
    assert tuple(cpu_pack.dense_weight(conv).shape) == (40, 24, 1, 1)
    assert torch.equal(conv.state_dict()["weight"], original)
    make_plain(conv)
    assert type(conv) is torch.nn.Conv2d and torch.equal(conv.weight, original) and conv.weight.shape == (40, 24, 1, 1)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (input shape, output channels, bias, channels_last): odd sizes (tiles cut by the border), 1x1, batch 2
WINOGRAD_CASES = [((2, 5, 9, 11), 7, True, True), ((1, 3, 1, 1), 4, False, False), ((1, 64, 32, 32), 48, True, True),
                  ((2, 16, 8, 12), 16, False, False), ((1, 320, 64, 64), 320, True, True)]


WINOGRAD_NATIVE_WHY = cpu_winograd_native.unavailable()
needs_winograd_native = pytest.mark.skipif(WINOGRAD_NATIVE_WHY is not None,
                                           reason=f"native Winograd transforms unavailable: {WINOGRAD_NATIVE_WHY}")
WINOGRAD_IMPLEMENTATIONS = {
    "torch": cpu_winograd.conv3x3_torch,
    "native": lambda *a: cpu_winograd.conv3x3_native(cpu_winograd_native.library(), *a),
    "native-split": lambda *a: cpu_winograd.conv3x3_native(cpu_winograd_native.library(), *a, pos_chunk=1),
}


def _winograd_case(case, v):
    shape, k, with_bias, nhwc = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
    w = torch.randn(k, shape[1], 3, 3, generator=g) / (3 * shape[1] ** 0.5)
    b = torch.randn(k, generator=g) if with_bias else None
    return x, w, b, cpu_winograd.weight_transform(w, v)


@pytest.mark.parametrize("impl", [pytest.param(name, marks=needs_winograd_native if name != "torch" else ())
                                  for name in WINOGRAD_IMPLEMENTATIONS])
@pytest.mark.parametrize("v", [cpu_winograd.F4, cpu_winograd.F2], ids=lambda v: f"F{v.m}")
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}")
def test_winograd_conv3x3_matches_the_convolution(case, v, impl):
    """F(4x4, 3x3) and F(2x2, 3x3) against an fp64 convolution: fp32 rounding only (F(4x4)'s transform factors
    up to 8 make it a few times the direct convolution's: ~1e-6 relative; F(2x2)'s are 1 and 1/2), the result
    in channels_last; with the torch-ops transforms, the native ones, and the native ones a row of transformed
    positions at a time."""
    x, w, b, u = _winograd_case(case, v)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    y = WINOGRAD_IMPLEMENTATIONS[impl](x, u, b, v)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    direct = _rel(torch.nn.functional.conv2d(x, w, b, padding=1), ref)
    assert _rel(y, ref) < (5e-6 if v is cpu_winograd.F4 else 1e-6), (_rel(y, ref), direct)


@pytest.mark.parametrize("impl", [pytest.param(name, marks=needs_winograd_native if name != "torch" else ())
                                  for name in ("torch", "native")])
@pytest.mark.parametrize("v", [cpu_winograd.F4, cpu_winograd.F2], ids=lambda v: f"F{v.m}")
@pytest.mark.parametrize("case", WINOGRAD_CASES[2:], ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}")
def test_winograd_of_a_bf16_layer_keeps_torch_bf16_error(case, v, impl):
    """A bf16 layer's Winograd runs in fp32 and rounds once: against an fp64 convolution of the fp32 data its error
    is torch's own bf16 convolution's (within 2x: the kernels' rule; it measures ~1x, where bf16 operands in the
    GEMMs would give 1.6x for F(2x2) and 8x for F(4x4)), the result bf16 and channels_last."""
    x, w, b, _ = _winograd_case(case, v)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()
    torch_err = _rel(torch.nn.functional.conv2d(xb, wb, bb, padding=1), ref)
    y = cpu_winograd.in_fp32(WINOGRAD_IMPLEMENTATIONS[impl], xb, cpu_winograd.weight_transform(wb, v), bb, v)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, ref) <= 2 * torch_err, (_rel(y, ref), torch_err)
    if impl == "native":
        with pytest.raises(ValueError, match="fp32"):  # the native transforms never read bf16 memory as fp32
            cpu_winograd.conv3x3_native(cpu_winograd_native.library(), xb, cpu_winograd.weight_transform(wb, v), bb, v)


@pytest.mark.parametrize("from_k", [16, 10_000], ids=["contiguous", "view"])
def test_winograd_weight_layout_by_output_channels(monkeypatch, from_k):
    """From CONTIGUOUS_FROM_K output channels the transformed weight is a contiguous (a*a, C, K) tensor (one GEMM over
    the weight transposed to (9, C, K)), below it a view of a (K, a*a, C) one (K batched GEMMs): the same values up
    to the BLAS's rounding order (bitwise where its kernels sum alike), the same convolution with either transforms,
    and a replaced weight's transform written over the earlier one in its layout."""
    monkeypatch.setattr(cpu_winograd, "CONTIGUOUS_FROM_K", from_k)
    x, w, b, u = _winograd_case(((1, 24, 20, 20), 16, True, True), cpu_winograd.F4)
    assert u.shape == (36, 24, 16) and u.is_contiguous() == (from_k <= 16)
    assert u.permute(2, 0, 1).is_contiguous() == (from_k > 16)
    monkeypatch.setattr(cpu_winograd, "CONTIGUOUS_FROM_K", 10_000 if from_k <= 16 else 16)
    other = cpu_winograd.weight_transform(w, cpu_winograd.F4)  # the other layout
    assert other.is_contiguous() != u.is_contiguous() and _rel(other, u) < 1e-6
    ref = torch.nn.functional.conv2d(x, w, b, padding=1)
    impls = [cpu_winograd.conv3x3_torch] + ([WINOGRAD_IMPLEMENTATIONS["native"]] if WINOGRAD_NATIVE_WHY is None else [])
    for impl in impls:
        assert _rel(impl(x, u, b, cpu_winograd.F4), ref) < 5e-6
    monkeypatch.setattr(cpu_winograd, "CONTIGUOUS_FROM_K", from_k)
    u2 = cpu_winograd.weight_transform(w * 2, cpu_winograd.F4, out=u)
    assert u2.data_ptr() == u.data_ptr() and u2.stride() == u.stride()
    assert torch.equal(u2, cpu_winograd.weight_transform(w * 2, cpu_winograd.F4))


@needs_winograd_native
def test_native_winograd_is_what_conv3x3_runs_and_is_deterministic(monkeypatch):
    """Where the native transforms load, conv3x3 runs them (the tuner's key for a Winograd layer says so): the
    same bits every call and for every split of the positions (the GEMMs keep their shapes); split tile rows
    (fewer GEMM rows: the BLAS may block its sums otherwise) within rounding; the C entry points refuse a tile size
    or position range they have no code for."""
    x, w, b, u = _winograd_case(((1, 72, 40, 36), 24, True, True), cpu_winograd.F4)
    lib = cpu_winograd_native.library()
    real_out = cpu_winograd_native.output_transform
    y = cpu_winograd.conv3x3(x, u, b, cpu_winograd.F4)
    assert cpu_winograd.implementation() == f"native v{cpu_winograd_native.VERSION}"
    assert torch.equal(y, cpu_winograd.conv3x3_native(lib, x, u, b, cpu_winograd.F4))
    for pos_chunk in (1, 4):
        assert torch.equal(y, cpu_winograd.conv3x3_native(lib, x, u, b, cpu_winograd.F4, pos_chunk=pos_chunk))
    monkeypatch.setattr(cpu_winograd, "CHUNK_BYTES", 200_000)  # a few tile rows per chunk, then positions split
    assert _rel(cpu_winograd.conv3x3_native(lib, x, u, b, cpu_winograd.F4), y) < 1e-6
    monkeypatch.setattr(cpu_winograd, "SMALL_CHUNK_BYTES", 260_000)  # tiles and products of 2 tile rows together
    monkeypatch.setattr(cpu_winograd, "MIN_CHUNK_TILES", 16)
    calls = []
    monkeypatch.setattr(cpu_winograd_native, "output_transform", lambda *a: calls.append(a[7]) or real_out(*a))
    assert _rel(cpu_winograd.conv3x3_native(lib, x, u, b, cpu_winograd.F4), y) < 1e-6
    assert calls == [2] * 5  # 10 tile rows, 9 tiles each
    conv = torch.nn.Conv2d(72, 24, 3, padding=1).requires_grad_(False)
    if make_packable(conv):  # where oneDNN packing is available
        assert conv._tune_key(x).endswith(f" winograd native v{cpu_winograd_native.VERSION}")
        assert "winograd" not in conv._tune_key(x[..., :4, :4])  # too small: no Winograd candidate
    t = torch.empty(8)
    assert lib.fastsd_winograd_input(5, x.data_ptr(), 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, t.data_ptr(), 1) == 1
    assert lib.fastsd_winograd_input(6, x.data_ptr(), 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 5, 2,
                                     t.data_ptr(), 1) == 1  # positions 5..6 of 6
    with pytest.raises(RuntimeError, match="no code for"):
        cpu_winograd_native.input_transform(lib, x.permute(0, 2, 3, 1), cpu_winograd.F4, 9, 0, 1, 6, 1, t)


def test_winograd_without_native_transforms_runs_the_torch_ops():
    code = ("import torch; from fastsd.backends import cpu_winograd as W, cpu_winograd_native as n; "
            "x = torch.randn(1, 8, 16, 16); w = torch.randn(4, 8, 3, 3); u = W.weight_transform(w, W.F4); "
            "print(n.unavailable(), W.implementation(), torch.equal(W.conv3x3(x, u, None, W.F4), "
            "W.conv3x3_torch(x, u, None, W.F4)))")
    env = {**os.environ, "FASTSD_CPU_NATIVE": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["FASTSD_CPU_NATIVE=0", "torch", "True"]


def test_winograd_applies_only_where_it_can(monkeypatch):
    """F(4x4) from 8x8 of its tiles (29-32 px) up, F(2x2) below that from 8x8 of its tiles (15-16 px) up, neither
    for other convolutions or dtypes; bf16 only without AMX; FASTSD_CPU_WINOGRAD=all offers both, =4x4 F(4x4) only,
    =0 neither."""
    conv = lambda **kw: torch.nn.Conv2d(8, 8, kw.pop("k", 3), **{"padding": 1, **kw})  # noqa: E731
    x = lambda side, dtype=torch.float32: torch.zeros(1, 8, side, side, dtype=dtype)  # noqa: E731
    monkeypatch.setenv("FASTSD_CPU_WINOGRAD", "all")  # F(2x2) whatever this machine's RAM
    variant = lambda side, **kw: cpu_winograd.variant_for(conv(**kw), x(side))  # noqa: E731
    assert variant(64) is variant(32) is variant(29) is cpu_winograd.F4
    assert variant(28) is variant(16) is variant(15) is cpu_winograd.F2 and variant(14) is None
    monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="": False)
    assert cpu_winograd.variant_for(conv(), x(32, torch.bfloat16)) is cpu_winograd.F4
    assert cpu_winograd.variant_for(conv(), x(16, torch.bfloat16)) is cpu_winograd.F2
    assert cpu_winograd.variant_for(conv(), x(32, torch.float16)) is None
    monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="": True)  # AMX's bf16 convolution is the faster
    assert cpu_winograd.variant_for(conv(), x(32, torch.bfloat16)) is None and variant(32) is cpu_winograd.F4
    for other in (dict(stride=2), dict(k=1, padding=0), dict(groups=2), dict(dilation=2, padding=2), dict(padding=0)):
        assert variant(32, **other) is None and variant(16, **other) is None, other
    monkeypatch.setenv("FASTSD_CPU_WINOGRAD", "4x4")  # F(2x2)'s memory-for-time trade turned off
    assert variant(32) is cpu_winograd.F4 and variant(16) is None
    monkeypatch.setenv("FASTSD_CPU_WINOGRAD", "0")  # both turned off
    assert variant(32) is None and variant(16) is None


@pytest.mark.parametrize("setting", ["", "all", "4x4"])
def test_winograd_f2_needs_the_memory_unless_asked_for(monkeypatch, setting):
    """Unset, F(2x2) (+1.3 GiB for SD1.5 in fp32) is offered only where the process may use F2_MIN_MEMORY of
    RAM (the machine's, or a container's limit); `all` offers it anyway, `4x4` never."""
    monkeypatch.setenv("FASTSD_CPU_WINOGRAD", setting)
    for ram in (8 << 30, cpu_winograd.F2_MIN_MEMORY, None):  # None: not readable
        monkeypatch.setattr(cpuinfo, "memory_bytes", lambda: ram)  # noqa: B023
        want = setting == "all" or (setting == "" and ram is not None and ram >= cpu_winograd.F2_MIN_MEMORY)
        assert (cpu_winograd.F2 in cpu_winograd.offered()) == want, (setting, ram)
        assert cpu_winograd.F4 in cpu_winograd.offered()


def test_memory_bytes_is_the_smaller_of_the_machine_and_its_cgroup(tmp_path, monkeypatch):
    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(cpuinfo, "CGROUP_MEMORY_LIMITS", (str(v2), str(v1)))
    assert cpuinfo.memory_bytes() == machine  # no cgroup files
    v2.write_text("max\n")  # no limit
    assert cpuinfo.memory_bytes() == machine
    v1.write_text(f"{machine // 4}\n")  # a container's limit
    assert cpuinfo.memory_bytes() == machine // 4


@pytest.fixture
def winograd_chosen(monkeypatch):
    """Every layer's measured choice is Winograd where it is offered, F(2x2) too whatever this machine's RAM."""
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))

    class Choice:
        def choose(self, key, candidates, default):
            return next((c for c in candidates if c.startswith("winograd")), default)

    monkeypatch.setattr(cpu_tune, "tuner", Choice)
    monkeypatch.setenv("FASTSD_CPU_WINOGRAD", "all")


def test_layer_that_chose_winograd(winograd_chosen):
    """A packable 3x3 convolution whose measured choice is winograd: the same result as the plain layer, the
    plain weight kept (state_dict bit for bit), the transformed weight dropped by make_plain and rebuilt from
    a weight replaced meanwhile (a LoRA merge); at a shape it doesn't cover, the layer packs as before."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(16, 24, 3, padding=1).requires_grad_(False)
    plain.load_state_dict(conv.state_dict())
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    make_packable(conv)
    x = torch.randn(2, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
        assert _rel(y, plain(x)) < 5e-6 and conv._winograd is not None and not conv.weight.is_mkldnn
        assert torch.equal(conv(x), y)
        assert set(conv._winograd) == {"winograd"}  # F(4x4) at 32x32
        mid = torch.randn(2, 16, 16, 16)
        assert _rel(conv(mid), plain(mid)) < 5e-6 and set(conv._winograd) == {"winograd", "winograd2"}  # F(2x2)
        small = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(conv(small), plain(small))  # 4 tiles: not covered, packed
        assert conv.weight.is_mkldnn and set(conv._winograd) == {"winograd", "winograd2"}  # still chosen there
        assert torch.equal(conv(x), y) and not conv.weight.is_mkldnn
    assert all(torch.equal(v, before[k]) for k, v in conv.state_dict().items())
    make_plain(conv)
    assert type(conv) is torch.nn.Conv2d and "_winograd" not in conv.__dict__
    conv.weight = torch.nn.Parameter(conv.weight * 2, requires_grad=False)  # what a LoRA merge does
    make_packable(conv)
    with torch.no_grad():
        assert _rel(conv(x) - conv.bias.view(1, -1, 1, 1), 2 * (y - conv.bias.view(1, -1, 1, 1))) < 5e-6


def test_bf16_layer_that_chose_winograd(winograd_chosen, monkeypatch):
    """Without AMX a bf16 3x3 convolution is offered Winograd (in fp32): chosen, its result is within twice the
    error of the plain bf16 layer, bf16, and its bf16 weight stays as it was (state_dict bit for bit); with AMX it is
    not offered and the layer packs."""
    if cpu_pack.packing_unavailable(torch.bfloat16):
        pytest.skip(cpu_pack.packing_unavailable(torch.bfloat16))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1).requires_grad_(False)
    ref_conv = torch.nn.Conv2d(16, 24, 3, padding=1).requires_grad_(False).double()
    ref_conv.load_state_dict(conv.state_dict())
    conv = conv.bfloat16()
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    x = torch.randn(2, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = ref_conv(x.double())
        plain_err = _rel(conv(x.bfloat16()), ref)
        for amx in (False, True):
            monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="", amx=amx: amx)
            layer = copy.deepcopy(conv)
            make_packable(layer)
            y = layer(x.bfloat16())
            assert y.dtype == torch.bfloat16 and _rel(y, ref) <= 2 * plain_err, (amx, _rel(y, ref), plain_err)
            assert (layer._winograd is None) == amx and layer.weight.is_mkldnn == amx
            assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_replaced_weight_reuses_the_winograd_memory(winograd_chosen):
    """A weight replaced through the cpu backend (a LoRA merge or unload) keeps the layer's transformed weight
    aside, and the new weight's transform is written over it at the next call (no fresh memory): same result as
    a plain layer with the new weight; a run that doesn't use it, or unprepare, drops what is kept aside."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1).requires_grad_(False)
    cpu.BACKEND.prepare(conv)
    x32, x16 = (torch.randn(2, 16, s, s).contiguous(memory_format=torch.channels_last) for s in (32, 16))
    with torch.no_grad():
        conv(x32), conv(x16)
        ptrs = {n: u.data_ptr() for n, u in conv._winograd.items()}
        assert set(ptrs) == {"winograd", "winograd2"}
        new = torch.nn.Parameter(torch.randn_like(conv.weight), requires_grad=False)
        cpu.BACKEND.replace_weight(conv, new)
        assert conv._winograd is None and set(conv._winograd_spare) == {"winograd", "winograd2"}
        plain = torch.nn.functional.conv2d
        for x in (x32, x16):
            assert _rel(conv(x), plain(x, new.detach(), conv.bias, padding=1)) < 5e-6
        assert {n: u.data_ptr() for n, u in conv._winograd.items()} == ptrs  # written over, not allocated
        assert not conv.__dict__.get("_winograd_spare")  # both used
        cpu.BACKEND.replace_weight(conv, torch.nn.Parameter(new * 2, requires_grad=False))
        small = torch.randn(1, 16, 4, 4)  # 1 tile: no Winograd at this shape; a run there leaves the spares unused
        with cpu.BACKEND.running(conv):
            torch.testing.assert_close(conv(small), plain(small, new * 2, conv.bias, padding=1))
            assert set(conv._winograd_spare) == {"winograd", "winograd2"} and conv._winograd is None
        assert "_winograd_spare" not in conv.__dict__  # dropped after the run
        conv(x32)
        cpu.BACKEND.replace_weight(conv, new)
        assert "_winograd_spare" in conv.__dict__
    cpu.BACKEND.unprepare(conv)
    assert type(conv) is torch.nn.Conv2d and "_winograd_spare" not in conv.__dict__


def test_cached_choice_follows_a_new_default_without_measuring(tmp_path, monkeypatch):
    """A choice cached under another default (a newer fastsd's rule, e.g. SDPA for bf16 attention with AMX) is
    picked again from its cached times with the new default, nothing measured: 0.95x is not the 10% a
    non-default candidate needs, so the default wins either way round."""
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: False)
    monkeypatch.setattr(cpu_tune, "reference_ms", lambda: 1.0)  # never slow (that check: test_cpu_tune_slow.py)
    measured = []
    monkeypatch.setattr(cpu_tune, "measure", lambda c: measured.append(set(c)) or {"native": 1.0, "sdpa": 0.95})
    path = tmp_path / "tune.json"
    nop = lambda: None  # noqa: E731
    assert cpu_tune.Tuner(path).choose("k", {"native": nop, "sdpa": nop}, default="native") == "native"
    saved = path.read_text()
    assert cpu_tune.Tuner(path).choose("k", {"native": nop, "sdpa": nop}, default="sdpa") == "sdpa"
    assert cpu_tune.Tuner(path).choose("k", {"native": nop, "sdpa": nop}, default="native") == "native"
    assert len(measured) == 2 and path.read_text() == saved  # (sdpa, within CLOSE of the default, timed again)


def test_tuner_measures_again_when_a_candidate_is_new(tmp_path, monkeypatch):
    """A choice cached before a candidate existed (an older fastsd's) is measured again with it."""
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: False)
    monkeypatch.setattr(cpu_tune, "reference_ms", lambda: 1.0)  # never slow (that check: test_cpu_tune_slow.py)
    times = {"a": 1.0, "b": 0.5, "c": 0.2}
    measured = []
    monkeypatch.setattr(cpu_tune, "measure", lambda c: measured.append(set(c)) or {k: times[k] for k in c})
    path = tmp_path / "tune.json"
    nop = lambda: None  # noqa: E731
    assert cpu_tune.Tuner(path).choose("k", {"a": nop, "b": nop}, default="a") == "b"
    assert cpu_tune.Tuner(path).choose("k", {"a": nop, "b": nop}, default="a") == "b" and len(measured) == 2
    assert cpu_tune.Tuner(path).choose("k", {"a": nop, "b": nop, "c": nop}, default="a") == "c"
    assert measured == [{"a", "b"}, {"a", "b"}, {"a", "b", "c"}, {"a", "c"}]  # each win confirmed against the default
    assert cpu_tune.Tuner(path).choose("k", {"a": nop, "b": nop, "c": nop}, default="a") == "c" and len(measured) == 4
    # fewer candidates than measured (a setting that offers fewer, e.g. FASTSD_CPU_WINOGRAD=4x4 after the
    # default): the best of them from the cached times, nothing measured, the cached entry kept for the others
    saved = path.read_text()
    assert cpu_tune.Tuner(path).choose("k", {"a": nop, "b": nop}, default="a") == "b"
    times["b"] = 0.95  # no longer 10% faster than the default (only in the cache; never measured at this time)
    assert cpu_tune.Tuner(path).choose("k", {"a": nop, "b": nop}, default="a") == "b"
    assert len(measured) == 4 and path.read_text() == saved
    assert cpu_tune.Tuner(path).choose("k", {"a": nop, "b": nop, "c": nop}, default="a") == "c" and len(measured) == 4


HEAP_PROBE = """
import resource, torch
from fastsd.backends import cpu_pack
print(cpu_pack.keep_temporaries_mapped())
first = torch.empty(30 << 18)  # 30 MiB: from glibc's heap (kept) or its own fresh mmap (glibc's start threshold)
heap = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
print(any(int(lo, 16) <= first.data_ptr() < int(hi, 16) for lo, hi in heap))
del first
faults = []
for _ in range(8):  # 8 model calls: temporaries of 2-30 MiB, each freed two allocations later
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = []
    for mib in (24, 8, 30, 16, 2, 20, 12):
        live.append(torch.ones(mib << 18))
        if len(live) > 2:
            live.pop(0)
    del live
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[3:]))
"""


def test_large_temporaries_stay_mapped_between_calls():
    """keep_temporaries_mapped: a 30 MiB block comes from the heap, not a fresh mmap, and once a call's large
    temporaries have been in the heap, later calls fault (almost) no fresh pages in. With FASTSD_CPU_HEAP=0
    (glibc's own thresholds) the block is mmap'd, and the same calls faulted 15,840-79,200 pages in on most
    runs here (0 on one: glibc's thresholds adapt, not always in time)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FASTSD_CPU_HEAP")}

    def probe(extra):
        r = subprocess.run([sys.executable, "-c", HEAP_PROBE], env={**env, **extra}, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        kept, in_heap, faults = r.stdout.split()
        return kept == "True", in_heap == "True", int(faults)

    kept, in_heap, faults = probe({})
    if not kept:
        pytest.skip("no glibc mallopt in this process")
    assert in_heap and faults < 1000
    assert probe({"FASTSD_CPU_HEAP": "0"})[:2] == (False, False)


LARGE_BLOCK_PROBE = """
import resource, torch
from fastsd.backends import cpu_pack
print(cpu_pack.keep_temporaries_mapped())
heap = lambda: [[int(v, 16) for v in l.split()[0].split("-")] for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
in_heap = lambda t: any(lo <= t.data_ptr() < hi for lo, hi in heap())
big = 64 << 18  # 64 MiB of fp32: above glibc's largest mmap threshold
def calls(n):  # n decoder-like calls, three 64 MiB temporaries each: pages faulted in by the last n - 4 (the heap
    # takes 2-3 calls to hold all three: other blocks land between them)
    faults = []
    for _ in range(n):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        live = [torch.ones(big) for _ in range(3)]
        del live
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return sum(faults[4:])
outside = in_heap(torch.empty(big))
faults_outside = calls(8)  # before any large block was freed into the heap (it would be reused after)
with cpu_pack.large_blocks_in_heap():
    with cpu_pack.large_blocks_in_heap():
        nested = in_heap(torch.empty(big))
    inside = in_heap(torch.empty(big))
    faults_inside = calls(8)
after = in_heap(torch.empty(8 * big))  # larger than any freed block: mmap again (a freed one would be reused)
print(outside, nested, inside, after, faults_inside, faults_outside)
"""


def test_large_blocks_come_from_the_heap_while_a_model_runs():
    """large_blocks_in_heap (the cpu backend's running()): a 64 MiB block, above glibc's largest mmap threshold,
    comes from the heap inside (nested too) and from a fresh mmap outside (after it, one larger than any block
    freed into the heap); decoder-like calls inside fault (almost) no fresh pages in once the heap holds their
    blocks (after 2-3 calls; the test skips four), the same calls outside 16,384 per block."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FASTSD_CPU_HEAP")}
    r = subprocess.run([sys.executable, "-c", LARGE_BLOCK_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    kept, *flags, faults_inside, faults_outside = r.stdout.split()
    if kept != "True":
        pytest.skip("no glibc mallopt in this process")
    assert flags == ["False", "True", "True", "False"]
    assert int(faults_inside) < 1000 and int(faults_outside) >= 4 * 3 * 16384


def test_one_slow_sample_does_not_decide_a_choice(monkeypatch):
    """Candidates slower than the time budget are still timed twice after the warm-up, the faster time kept:
    a single hiccup (seen on a VM: a 70 ms Winograd convolution timed once at 171 ms, packed kept) can't
    make the slower one win."""
    clock = [0.0]
    monkeypatch.setattr(cpu_tune.time, "perf_counter", lambda: clock[0])
    costs = {"fast": iter([0.0, 0.9, 0.4, 0.4]), "slow": iter([0.0, 0.6, 0.6, 0.6])}  # warm-up first

    def run(name):
        clock[0] += next(costs[name])

    times = cpu_tune.measure({"fast": lambda: run("fast"), "slow": lambda: run("slow")})
    assert times == pytest.approx({"fast": 0.4, "slow": 0.6})  # two timed rounds although the first spent 1.5 s > BUDGET_S
    assert next(costs["fast"]) == 0.4  # and not a third
    assert cpu_tune.pick(times, default="slow") == "fast"


def test_a_win_over_the_default_is_confirmed_before_it_is_taken(tmp_path, monkeypatch):
    """A candidate that beats the default in the first timings is timed again against it, the faster time of each
    kept: the default's slow first samples (a VM's slow stretch) don't decide; a real win stands."""
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: False)
    rounds = iter([{"a": 1.0, "b": 0.5, "c": 0.9}, {"a": 0.4, "b": 0.5}, {"a": 1.0, "b": 0.5}, {"a": 0.9, "b": 0.45}])
    seen = []
    monkeypatch.setattr(cpu_tune, "measure", lambda c: seen.append(set(c)) or {k: v for k, v in next(rounds).items() if k in c})
    nop = lambda: None  # noqa: E731
    t = cpu_tune.Tuner(tmp_path / "tune.json")
    assert t.choose("k", {"a": nop, "b": nop, "c": nop}, default="a") == "a"
    assert seen == [{"a", "b", "c"}, {"a", "b"}]
    assert t.entries()["k"]["ms"] == {"a": 400.0, "b": 500.0, "c": 900.0}
    assert t.choose("k2", {"a": nop, "b": nop}, default="a") == "b" and len(seen) == 4
    assert t.entries()["k2"]["ms"] == {"a": 900.0, "b": 450.0}


def test_a_close_loss_to_the_default_is_timed_again(tmp_path, monkeypatch):
    """A candidate that loses to the default but within CLOSE of it is timed again against it (its own first samples
    may have hit a slow stretch) and wins if the second timing says so; one further behind is not timed again."""
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: False)
    rounds = iter([{"a": 1.0, "b": 1.3, "c": 1.4}, {"a": 1.0, "b": 0.4}, {"a": 1.0, "b": 1.6, "c": 3.0}])
    seen = []
    monkeypatch.setattr(cpu_tune, "measure", lambda c: seen.append(set(c)) or {k: v for k, v in next(rounds).items() if k in c})
    nop = lambda: None  # noqa: E731
    t = cpu_tune.Tuner(tmp_path / "tune.json")
    assert t.choose("k", {"a": nop, "b": nop, "c": nop}, default="a") == "b"
    assert seen == [{"a", "b", "c"}, {"a", "b"}] and t.entries()["k"]["ms"] == {"a": 1000.0, "b": 400.0, "c": 1400.0}
    assert t.choose("k2", {"a": nop, "b": nop, "c": nop}, default="a") == "a" and len(seen) == 3


def test_tuned_choice_is_measured_cached_and_honoured(tmp_path, monkeypatch):
    """FASTSD_CPU_TUNE unset: the first call at a shape times plain vs packed and records the winner in
    the cache file, which a new process reuses; a layer whose winner is plain keeps its dense weight."""
    monkeypatch.setenv("FASTSD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: False)  # whatever else runs on this machine now
    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
    make_packable(conv)
    x = torch.randn(1, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    timed = []
    real_measure = cpu_tune.measure

    def fake_measure(candidates):  # the real timing runs (the candidates are called), plain made the winner
        timed.append(real_measure(candidates))
        return {"packed": 2.0, "plain": 1.0}

    monkeypatch.setattr(cpu_tune, "measure", fake_measure)
    with torch.no_grad():
        out = conv(x)
        conv(x)
    assert len(timed) == 2 and set(timed[0]) == {"packed", "plain"} and all(v > 0 for v in timed[0].values())
    assert set(timed[1]) == {"packed", "plain"}  # plain's win timed again against the default
    assert not conv.weight.is_mkldnn  # plain won
    entries = cpu_tune.tuner().entries()
    assert [e["choice"] for e in entries.values()] == ["plain"]
    conv2 = torch.nn.Conv2d(32, 32, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
    conv2.load_state_dict(conv.state_dict())
    make_packable(conv2)
    reorders = []
    real_pack = cpu_pack.PackableConv2d._pack
    monkeypatch.setattr(cpu_pack.PackableConv2d, "_pack", lambda *a: reorders.append(1) or real_pack(*a))
    with torch.no_grad():
        assert torch.equal(conv2(x), out)
    assert len(timed) == 2 and not conv2.weight.is_mkldnn  # the cached choice, not measured again
    assert not reorders  # nor packed for nothing (a LoRA switch re-decides every layer it touched)
    assert cpu_tune.Tuner(cpu_tune.tuner().path).cached(next(iter(entries))) == "plain"  # a new process' view


def test_tuner_margin_force_and_corrupt_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: False)  # whatever else runs on this machine now
    path = tmp_path / "tune.json"
    t = cpu_tune.Tuner(path)
    calls = {"a": 0, "b": 0}
    cands = {"a": lambda: calls.__setitem__("a", calls["a"] + 1), "b": lambda: calls.__setitem__("b", calls["b"] + 1)}
    times = {"a": 1.0, "b": 0.95}
    monkeypatch.setattr(cpu_tune, "measure", lambda c: {k: times[k] for k in c})
    assert t.choose("k1", cands, default="a") == "a"  # 5% faster is within the margin: the default stays
    times["b"] = 0.5
    assert t.choose("k2", cands, default="a") == "b"
    assert t.choose("k1", cands, default="a") == "a"  # cached, not re-measured
    monkeypatch.setenv("FASTSD_CPU_TUNE", "1")  # force: measure again once per key in this process
    assert t.choose("k1", cands, default="a") == "b"
    monkeypatch.setenv("FASTSD_CPU_TUNE", "0")  # off: the default, no measuring
    assert cpu_tune.Tuner(path).choose("k9", cands, default="a") == "a"
    path.write_text("{not json")  # a corrupt cache is ignored and rewritten
    monkeypatch.delenv("FASTSD_CPU_TUNE")
    fresh = cpu_tune.Tuner(path)
    assert fresh.cached("k2") is None and fresh.choose("k2", cands, default="a") == "b"
    assert cpu_tune.Tuner(path).cached("k2") == "b"
    with pytest.raises(ValueError):
        fresh.choose("k3", cands, default="c")


def test_choice_measured_on_a_busy_machine_is_measured_again_when_quiet(tmp_path, monkeypatch):
    """More runnable tasks than CPUs while timing: the choice is used and saved marked busy; a later process
    measures it again if it finds the machine quiet (once), keeps it if the machine is busy again."""
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)
    path = tmp_path / "tune.json"
    busy, times, measured = [True], {"a": 1.0, "b": 0.5}, []
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: busy[0])
    monkeypatch.setattr(cpu_tune, "measure", lambda c: measured.append(1) or {k: times[k] for k in c})
    cands = {"a": lambda: None, "b": lambda: None}
    t = cpu_tune.Tuner(path)
    assert t.choose("k", cands, default="a") == "b" and t.entries()["k"]["busy"] and len(measured) == 2  # + confirmed
    assert cpu_tune.Tuner(path).choose("k", cands, default="a") == "b" and len(measured) == 2  # busy again: kept
    busy[0], times["b"] = False, 2.0  # quiet now, and b turns out slower
    quiet = cpu_tune.Tuner(path)
    assert quiet.choose("k", cands, default="a") == "a" and len(measured) == 3  # the default won: nothing to confirm
    assert quiet.choose("k", cands, default="a") == "a" and len(measured) == 3  # measured once per process
    assert "busy" not in cpu_tune.Tuner(path).entries()["k"] and cpu_tune.Tuner(path).cached("k") == "a"


def test_machine_busy_reads_the_runnable_count(monkeypatch, tmp_path):
    """Busy only when every one of BUSY_READS reads of /proc/loadavg has more runnable tasks than this process'
    CPUs: one runnable-for-an-instant task is not load; a quiet first read returns at once."""
    import builtins

    real_open = builtins.open
    cpus = len(os.sched_getaffinity(0))
    for counts, want, reads in (([cpus], False, 1), ([cpus + 1] * cpu_tune.BUSY_READS, True, cpu_tune.BUSY_READS),
                                ([cpus + 1, cpus, cpus + 1], False, 2)):
        seen = []

        def fake_open(f, *a, **k):
            if f != "/proc/loadavg":
                return real_open(f, *a, **k)
            fake = tmp_path / f"loadavg{len(seen)}"
            fake.write_text(f"1.00 1.00 1.00 {counts[len(seen)]}/300 12345\n")
            seen.append(f)
            return real_open(fake, *a, **k)

        monkeypatch.setattr(builtins, "open", fake_open)
        try:
            assert cpu_tune.machine_busy() is want
        finally:
            monkeypatch.setattr(builtins, "open", real_open)
        assert len(seen) == reads


def test_bf16_without_native_support_runs_unpacked(monkeypatch):
    """A CPU without native bf16 (faked: torch's capability query and the CPU flags say no): --dtype bf16
    loads with one warning, packs nothing, chunks no attention, and generates."""
    monkeypatch.setattr(cpu_pack, "onednn_bf16_supported", lambda: False)
    monkeypatch.setattr(cpuinfo, "native_bf16", lambda cpuinfo="": False)
    cpu_pack.packing_unavailable.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = load_pipeline("random:tiny", device="cpu", dtype="bf16", backend="auto")
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and "bf16 is emulated on this CPU" in msgs[0], msgs
        assert pipe.dtype == torch.bfloat16
        assert not any(isinstance(m, (PackableConv2d, PackableLinear)) for m in pipe.unet.modules())
        img = pipe.generate("a cat", steps=2, width=64, height=64, seed=1, progress=False)[0]
        assert np.asarray(img).std() > 0
    finally:
        cpu_pack.packing_unavailable.cache_clear()


def test_cli_bf16_without_native_support_gives_an_image_and_one_warning_line(tmp_path):
    code = ("import sys, fastsd.backends.cpu_pack as p, fastsd.cpuinfo as c; p.onednn_bf16_supported = lambda: False; "
            "c.native_bf16 = lambda cpuinfo='': False; from fastsd.generate import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, "-c", code, "a cat", "--model", "random:tiny", "--dtype", "bf16", "--steps",
                        "2", "--width", "64", "--height", "64", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    warning_lines = [ln for ln in r.stderr.splitlines() if "bf16" in ln]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("warning: "), r.stderr
    assert "Traceback" not in r.stderr


RESTRICTIONS = {"avx2": (cpuinfo.AVX2_ENV, "AVX2", False, "avx2"),
                # AVX-512 without BF16 (Skylake to Ice Lake): fp32 the default, the fp32 native attention
                "avx512-no-bf16": (cpuinfo.NO_BF16_ENV, "AVX512", False, "avx512f"),
                # AVX512-BF16 without AMX (Zen 4/5, Cooper Lake) on a CPU with AMX: bf16 the default, Winograd
                # offered to bf16 convolutions
                "avx512-bf16-no-amx": (cpuinfo.NO_AMX_ENV, "AVX512", True, "amx_bf16")}


@pytest.mark.skipif(bool(os.environ.get("ONEDNN_MAX_CPU_ISA")), reason="already restricted")
@pytest.mark.parametrize("isa", list(RESTRICTIONS))
def test_cpu_paths_restricted(isa):
    """This file again in a process restricted to AVX2 (oneDNN, ATen, MKL): the kernels and weight layouts
    of a CPU without AVX-512, on any machine; restricted to AVX-512 without BF16 where the machine has AVX-512;
    and with oneDNN held below AMX where the machine has AMX. (torch's bf16 packing check still reads the
    hardware's flags; the no-native-bf16 case is faked above.)"""
    env_add, capability, bf16, needs = RESTRICTIONS[isa]
    if needs not in cpuinfo.cpu_flags():
        pytest.skip(f"no {needs} on this machine")
    env = {**os.environ, **env_add}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", "not test_cpu_paths_restricted"], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    check = subprocess.run([sys.executable, "-c", "import torch; from fastsd import cpuinfo; "
                            "print(torch.backends.cpu.get_cpu_capability(), cpuinfo.native_bf16(), cpuinfo.amx())"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert check.stdout.split() == [capability, str(bf16), "False"], check.stdout + check.stderr


def test_feed_forward_chunks_match_one_pass(monkeypatch):
    torch.manual_seed(0)
    block = layers.BasicTransformerBlock(64, 2, 32).eval()
    x, ctx = torch.randn(2, 50, 64), torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = block(x, ctx)  # reference ops
        monkeypatch.setattr(cpu, "FF_CHUNK_TOKENS", 16)  # 100 tokens: 7 chunks, the last one short
        cpu.BACKEND.prepare(block)
        out = block(x, ctx)
        # row-wise, so the same result up to the GEMM's rounding at another row count (bit-equal on the AMD
        # VMs; within 2.4e-7 on an Intel Xeon with AMX, where MKL takes another path for a short last chunk)
        torch.testing.assert_close(cpu.feed_forward_chunked(block, x, 16), cpu.feed_forward_chunked(block, x, 1000),
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    cpu.BACKEND.unprepare(block)
    assert block.ops is reference.OPS and block.attn1.ops is reference.OPS


@pytest.mark.parametrize("tune", ["0", "measure"])
def test_pipeline_lays_out_models_per_backend(tune, tmp_path, monkeypatch):
    if tune == "measure":  # the measured choices, from an empty cache
        monkeypatch.setenv("FASTSD_CACHE_DIR", str(tmp_path))
        monkeypatch.delenv("FASTSD_CPU_TUNE")
    auto = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="auto")
    plain = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    assert any(isinstance(m, PackableConv2d) for m in auto.unet.modules())
    assert any(isinstance(m, PackableLinear) for m in auto.clip.modules())
    assert not any(isinstance(m, (PackableConv2d, PackableLinear)) for m in plain.unet.modules())
    kw = dict(seed=7, steps=4, width=64, height=64, sampler="euler", progress=False)
    a = np.asarray(auto.generate("a red cube", **kw)[0], dtype=np.float32)
    b = np.asarray(plain.generate("a red cube", **kw)[0], dtype=np.float32)
    assert a.std() > 5 and np.abs(a - b).max() <= 2  # fp32: the same image up to 8-bit rounding
    again = np.asarray(auto.generate("a red cube", **kw)[0], dtype=np.float32)
    assert np.array_equal(a, again)  # the first (measuring, packing) run and later runs agree exactly
    if tune == "0":  # defaults: everything packs at its first call
        assert all(m.weight.is_mkldnn for m in auto.unet.modules() if isinstance(m, PackableConv2d))
    else:
        assert len(cpu_tune.tuner().entries()) > 10  # the measured choices were recorded


def test_default_dtype_follows_the_cpu(tmp_path, monkeypatch):
    from fastsd import load as pipeline

    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    for k in cpuinfo.ISA_ENV:
        monkeypatch.delenv(k, raising=False)
    assert cpuinfo.native_bf16(str(with_bf16)) and not cpuinfo.native_bf16(str(without))
    assert not cpuinfo.native_bf16(str(tmp_path / "missing"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # restricted below AVX512-BF16: not native any more
    assert not cpuinfo.native_bf16(str(with_bf16))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert cpuinfo.native_bf16(str(with_bf16))
    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert not cpuinfo.amx(str(with_amx)) and not cpuinfo.amx(str(with_bf16))  # oneDNN held below AMX
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert cpuinfo.amx(str(with_amx)) and not cpuinfo.amx(str(with_bf16))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpuinfo.amx(str(with_amx))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("FASTSD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpuinfo, "native_bf16", lambda: True)
    monkeypatch.setattr(cpuinfo, "amx", lambda: True)
    assert pipeline.parse_dtype(None, cpu) == torch.bfloat16 and pipeline.parse_dtype(None, cuda) == torch.float16
    assert pipeline.parse_dtype("fp32", cpu) == torch.float32
    assert not (tmp_path / "cache").exists()  # with AMX bf16 is taken unmeasured
    monkeypatch.setattr(cpuinfo, "native_bf16", lambda: False)
    assert pipeline.parse_dtype(None, cpu) == torch.float32


@pytest.mark.parametrize("bf16_ms, fp32_ms, expected", [(1.0, 0.6, torch.float32), (0.6, 1.0, torch.bfloat16),
                                                        (1.0, 0.95, torch.bfloat16)])  # within MARGIN: bf16
def test_default_dtype_without_amx_is_the_measured_faster(tmp_path, monkeypatch, bf16_ms, fp32_ms, expected):
    """AVX512-BF16 without AMX: bf16 only where the tuner times a bf16 linear faster than the fp32 one (Intel
    with AMX hidden runs bf16 dot products at half the fp32 FMA's rate), recorded per CPU."""
    from fastsd import load as pipeline

    monkeypatch.setenv("FASTSD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cpu_tune.MODE_ENV, raising=False)
    monkeypatch.setattr(cpuinfo, "native_bf16", lambda: True)
    monkeypatch.setattr(cpuinfo, "amx", lambda: False)
    timed = []

    def measure(candidates):
        timed.append(sorted(candidates))
        outs = {name: fn() for name, fn in candidates.items()}
        assert outs["bf16"].dtype == torch.bfloat16 and outs["fp32"].dtype == torch.float32
        assert (outs["bf16"].float() - outs["fp32"]).abs().max() < 0.05 * outs["fp32"].abs().max()  # one linear
        return {"bf16": bf16_ms, "fp32": fp32_ms}

    monkeypatch.setattr(cpu_tune, "measure", measure)
    assert pipeline.default_dtype(torch.device("cpu")) == expected
    assert timed and timed[0] == ["bf16", "fp32"]
    entries = cpu_tune.tuner().entries()
    (key,) = [k for k in entries if k.startswith("default dtype")]
    assert entries[key]["choice"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[expected]
    assert f"{torch.get_num_threads()} threads" in key
    n = len(timed)
    assert pipeline.default_dtype(torch.device("cpu")) == expected and len(timed) == n  # cached, not timed again
    with warnings.catch_warnings(record=True) as caught:  # bf16 asked for: one warning where fp32 is faster
        warnings.simplefilter("always")
        pipe = load_pipeline("random:tiny", device="cpu", dtype="bf16", backend="torch")
    msgs = [str(w.message) for w in caught]
    assert pipe.dtype == torch.bfloat16 and len(timed) == n
    assert msgs == (["bf16 runs slower than fp32 on this CPU (AVX512-BF16 without AMX, measured): it runs, but fp32 "
                     "is faster here (--dtype fp32, the default on this CPU)"] if expected == torch.float32 else []), msgs
    monkeypatch.setenv("FASTSD_CACHE_DIR", str(tmp_path / "off"))
    monkeypatch.setenv(cpu_tune.MODE_ENV, "0")
    assert pipeline.default_dtype(torch.device("cpu")) == torch.bfloat16 and len(timed) == n  # tuning off: bf16


def test_rowmax_bf16_is_amax():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 70, 333, generator=g) * 5).bfloat16()
    s[0] -= 100  # rows with no non-negative entry
    s[1, :10] = 0.0
    s[1, 10:20] = -0.0
    s[2, :5] += 1000
    assert torch.equal(rowmax_bf16(s), s.amax(-1, keepdim=True))
    assert torch.equal(rowmax_bf16(s[1:]), s[1:].amax(-1, keepdim=True))  # every row has a non-negative entry


def test_changed_private_ops_fall_back_to_plain_with_one_warning(monkeypatch):
    """A torch whose private oneDNN ops are renamed or gone: nothing packs, one warning, the model runs."""
    monkeypatch.setattr(cpu_pack, "_PRIVATE_OPS", cpu_pack._PRIVATE_OPS + ("_renamed_in_a_later_torch",))
    cpu_pack.packing_unavailable.cache_clear()
    cpu_pack._warn_once.cache_clear()
    try:
        pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counts = [make_packable(m) for m in pipe.models()]
        assert counts == [0, 0, 0]
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and "_renamed_in_a_later_torch" in msgs[0], msgs
        img = pipe.generate("a cat", steps=1, width=64, height=64, seed=0, progress=False)[0]
        assert img.size == (64, 64)
    finally:
        cpu_pack.packing_unavailable.cache_clear()
        cpu_pack._warn_once.cache_clear()


@pytest.mark.parametrize("shape", [(32, 4, 3, 3), (24, 5, 3, 3), (40, 3, 1, 1), (64, 64, 3, 3)])
def test_lora_conv_merge_same_bits_in_any_layout(shape):
    """A LoRA merged into a convolution gives the same bits whether its weight comes contiguous (a packed
    layer's dense weight, the torch backend) or channels_last (the CPU path's, after an unload), for either
    output layout: under the AVX2 restriction (test_cpu_paths_restricted) MKL rounded some elements
    differently by their place in a row, which made re-loading a LoRA after unload_loras 1 ulp off the first merge."""
    from fastsd.lora import LoraLayer, merged_weight

    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    for rank in (4, 7):
        layer = LoraLayer("unet", "m", "k", torch.randn(rank, *shape[1:], generator=g),
                          torch.randn(shape[0], rank, 1, 1, generator=g), 0.37)
        outs = [merged_weight(w.contiguous(memory_format=fin), layer, 0.8, fout)
                for fin in (torch.contiguous_format, torch.channels_last)
                for fout in (torch.contiguous_format, torch.channels_last)]
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        want = w.double() + 0.8 * 0.37 * (layer.up.double().reshape(shape[0], rank)
                                          @ layer.down.double().reshape(rank, -1)).reshape(shape)
        torch.testing.assert_close(outs[0].double(), want, rtol=1e-6, atol=1e-5)
