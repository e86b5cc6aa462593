"""Winograd F(2x2) with bf16 operands (fastsd/backends/cpu_winograd_bf16.py, cpu_winograd.F2B): its one-call
convolution against the same arithmetic in torch (fp32 transforms, rounded operands, fp64 GEMMs), the same bits for
every split, within twice torch's own bf16 error, where it is offered, and a packable layer that chose it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from fastsd import cpuinfo
from fastsd.backends import cpu, cpu_native, cpu_pack, cpu_tune, cpu_winograd, cpu_winograd_bf16, cpu_winograd_native
from test_cpu_paths import _rel, _winograd_case

WHY = cpu_winograd_bf16.unavailable()
needs_gemm = pytest.mark.skipif(WHY is not None, reason=f"bf16 Winograd convolution unavailable: {WHY}")
F2B = cpu_winograd.F2B


def test_builds_and_passes_its_self_test_where_bf16_is_native():
    """Where bf16 is native and a C++ compiler is at hand the library loads: a self-test that fails (a wrong kernel)
    fails here rather than only skipping the tests below."""
    if not cpuinfo.native_bf16() or cpu_native.disabled() or not shutil.which(cpu_native.compiler() or "g++"):
        pytest.skip("bf16 not native here, or no compiler, or FASTSD_CPU_NATIVE=0")
    assert cpu_winograd_bf16.unavailable() is None


def _emulated(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F2B's arithmetic in torch ops: the fp32 input transform of the bf16 data rounded to bf16, fp64 GEMMs of the
    rounded operands (fastsd's sum in fp32), the output transform plus the bias in fp32, rounded to bf16."""
    v = cpu_winograd.F2B
    n, c, h, w_ = x.shape
    th, tw = cpu_winograd.tile_counts(h, w_, v)
    xp = torch.nn.functional.pad(x.float().permute(0, 2, 3, 1), (0, 0, 1, 1 + tw * 2 - w_, 1, 1 + th * 2 - h))
    tiles = xp.unfold(1, 4, 2).unfold(2, 4, 2)  # (n, th, tw, c, 4, 4)
    t = torch.mm(v.in_t, tiles.permute(4, 5, 0, 1, 2, 3).reshape(16, -1)).view(16, -1, c).bfloat16()
    wt = cpu_winograd.weight_transform(w, cpu_winograd.F2).bfloat16()  # (16, C, K): F2B's values (tested below)
    prod = torch.bmm(t.double(), wt.double()).float()
    y = torch.mm(v.out_t, prod.view(16, -1)).view(2, 2, n, th, tw, -1).permute(2, 3, 0, 4, 1, 5)
    y = y.reshape(n, th * 2, tw * 2, -1)[:, :h, :w_]
    if bias is not None:
        y = y + bias.float()
    return y.bfloat16().permute(0, 3, 1, 2)


@needs_gemm
@pytest.mark.parametrize("case", [((1, 1, 2, 2), 1), ((2, 71, 19, 13), 67), ((1, 64, 16, 16), 64),
                                  ((1, 6, 33, 3), 130)], ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}")
def test_conv_is_its_arithmetic_for_every_split(case):
    """The one-call convolution is the emulated arithmetic (up to the GEMMs' fp32 summation order: the same bits for
    nearly every value, one bf16 step at most) for batches, odd sizes and channels (a padded pair), output
    channels beyond a block; the same bits for every block size and group count and both roundings, from NCHW or
    channels_last input; bad operands refused."""
    shape, k = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).bfloat16()
    w = (torch.randn(k, shape[1], 3, 3, generator=g) / (3 * shape[1] ** 0.5)).bfloat16()
    b = torch.randn(k, generator=g).bfloat16()
    u = cpu_winograd.weight_transform(w, F2B)
    lib = cpu_winograd_bf16.library()
    y = cpu_winograd_bf16.conv(lib, x, u, b)
    assert y.dtype == torch.bfloat16 and y.shape == (shape[0], k, *shape[2:])
    assert y.is_contiguous(memory_format=torch.channels_last)
    want = _emulated(x, w, b)
    assert (y != want).float().mean() < 0.01
    torch.testing.assert_close(y.float(), want.float(), rtol=2 ** -7, atol=1e-5)
    xl = x.contiguous(memory_format=torch.channels_last)
    for block_t, groups, cvt, xin in ((1, 1, True, x), (7, 3, False, xl), (16, 2, True, xl), (64, 5, False, x)):
        assert torch.equal(y, cpu_winograd_bf16.conv(lib, xin, u, b, cvt, block_t=block_t, groups=groups))
    torch.testing.assert_close(cpu_winograd_bf16.conv(lib, x, u, None).float(), _emulated(x, w, None).float(),
                               rtol=2 ** -7, atol=1e-5)
    with pytest.raises(ValueError, match="bf16 x"):
        cpu_winograd_bf16.conv(lib, x.float(), u, b)
    with pytest.raises(ValueError, match="bf16 x"):
        cpu_winograd_bf16.conv(lib, x, u[:, :-2], b)  # not a whole number of output channels


def test_layout_is_panels_of_pairs():
    """(P, C, K) -> per position, panels of BLOCK_N output channels (the last narrower), each (C2/2, width, 2) with C
    odd padded by a zero pair member, from a strided view."""
    bn = cpu_winograd_bf16.BLOCK_N
    u = torch.arange(2 * 3 * (bn + 3), dtype=torch.float32).view(2, 3, bn + 3)
    p = cpu_winograd_bf16.layout(u.transpose(1, 2).contiguous().transpose(1, 2))
    assert p.shape == (2, 4 * (bn + 3)) and p.dtype == torch.bfloat16 and p.is_contiguous()
    first, last = p[:, :4 * bn].view(2, 2, bn, 2), p[:, 4 * bn:].view(2, 2, 3, 2)
    assert torch.equal(first[:, 0, :, 1], u[:, 1, :bn].bfloat16())
    assert torch.equal(first[:, 1, :, 0], u[:, 2, :bn].bfloat16())
    assert torch.equal(last[:, 1, :, 0], u[:, 2, bn:].bfloat16()) and not last[:, 1, :, 1].any()


CASES = [((2, 5, 9, 11), 7, True, True), ((1, 64, 32, 32), 48, True, True), ((2, 16, 8, 12), 16, False, False),
         ((1, 320, 32, 32), 320, False, True), ((1, 96, 17, 15), 130, True, False)]


@needs_gemm
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}")
def test_conv_keeps_twice_torch_bf16_error(case):
    """Against an fp64 convolution of the fp32 data: within 2x torch's own bf16 convolution (it measures 1.4-1.7x;
    F(2x2)'s transforms in fp32 take 1.0x), the result bf16 and channels_last, the same bits on a second call."""
    shape, k = case[:2]
    x, w, b, _ = _winograd_case(case, cpu_winograd.F2)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()
    torch_err = _rel(torch.nn.functional.conv2d(xb, wb, bb, padding=1), ref)
    u = cpu_winograd.weight_transform(wb, F2B)
    assert u.dtype == torch.bfloat16 and u.shape == (16, (shape[1] + 1) // 2 * 2 * k)
    y = cpu_winograd.conv3x3(xb, u, bb, F2B)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, ref) <= 2 * torch_err, (_rel(y, ref), torch_err)
    assert torch.equal(y, cpu_winograd.conv3x3(xb, u, bb, F2B))


def _offer_everything(monkeypatch):
    """Both native libraries 'available' and no AMX, whatever this machine: where F2B is offered is a rule."""
    monkeypatch.setattr(cpu_winograd_bf16, "library", lambda: object())
    monkeypatch.setattr(cpu_winograd_native, "library", lambda: object())
    monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="": False)
    monkeypatch.setattr(cpuinfo, "memory_bytes", lambda: 64 << 30)


def test_offered_to_bf16_layers_with_its_tiles(monkeypatch):
    """A bf16 3x3 convolution is offered F(2x2) with bf16 operands beside the fp32 variant from 16x16 px (8x8 of
    its tiles) up; never to an fp32 layer, with AMX, without its native library (the transforms' may be missing), or
    where FASTSD_CPU_WINOGRAD is `fp32`, `4x4` or `0`."""
    _offer_everything(monkeypatch)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = lambda side, dtype=torch.bfloat16: torch.zeros(1, 8, side, side, dtype=dtype)  # noqa: E731
    F4, F2 = cpu_winograd.F4, cpu_winograd.F2
    for setting, at32, at16 in (("", (F4, F2B), (F2, F2B)), ("all", (F4, F2B), (F2, F2B)), ("fp32", (F4,), (F2,)),
                                ("4x4", (F4,), ()), ("0", (), ())):
        monkeypatch.setenv("FASTSD_CPU_WINOGRAD", setting)
        assert cpu_winograd.variants_for(conv, x(32)) == at32, setting
        assert cpu_winograd.variants_for(conv, x(16)) == at16, setting
        assert cpu_winograd.variants_for(conv, x(14)) == (), setting
        assert F2B not in cpu_winograd.variants_for(conv, x(32, torch.float32)), setting
    monkeypatch.setenv("FASTSD_CPU_WINOGRAD", "")
    assert cpu_winograd.variants_for(torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), x(32)) == ()
    monkeypatch.setattr(cpuinfo, "memory_bytes", lambda: 4 << 30)  # F(2x2) in fp32 not offered: its bf16 twin is
    assert cpu_winograd.variants_for(conv, x(16)) == (F2B,)
    with monkeypatch.context() as m:
        m.setattr(cpu_winograd_bf16, "library", lambda: None)
        assert cpu_winograd.variants_for(conv, x(32)) == (F4,)
    with monkeypatch.context() as m:  # F2B's one call has its own transforms
        m.setattr(cpu_winograd_native, "library", lambda: None)
        assert cpu_winograd.variants_for(conv, x(32)) == (F4, F2B)
    monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="": True)
    assert cpu_winograd.variants_for(conv, x(32)) == ()


def test_restricted_below_native_bf16_it_is_unavailable():
    """Restricted to AVX2 (no native bf16: oneDNN has no bf16 micro-kernel there) the library is not built and a bf16
    layer is offered no bf16 operands."""
    code = ("import torch; from fastsd.backends import cpu_winograd as W, cpu_winograd_bf16 as B; "
            "print(B.unavailable()); c = torch.nn.Conv2d(8, 8, 3, padding=1); "
            "print(W.F2B in W.variants_for(c, torch.zeros(1, 8, 32, 32, dtype=torch.bfloat16)))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    why, offered = r.stdout.strip().splitlines()
    assert why.startswith("needs native bf16") and offered == "False"


@needs_gemm
def test_bf16_layer_that_chose_it(monkeypatch):
    """A packable bf16 3x3 convolution whose measured choice is F(2x2) with bf16 operands: within twice the plain bf16
    layer's error, its state_dict bit for bit, the tuner's key naming its version, only that transformed weight
    kept; a replaced weight (a LoRA merge) has its transform written over the old one's memory."""
    if cpu_pack.packing_unavailable(torch.bfloat16):
        pytest.skip(cpu_pack.packing_unavailable(torch.bfloat16))

    class Choice:
        def choose(self, key, candidates, default):
            keys.append(key)
            return F2B.name if F2B.name in candidates else default

    keys = []
    monkeypatch.setattr(cpu_tune, "tuner", Choice)
    monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="": False)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, 3, padding=1).requires_grad_(False)
    ref_conv = torch.nn.Conv2d(24, 40, 3, padding=1).requires_grad_(False).double()
    ref_conv.load_state_dict(conv.state_dict())
    conv = conv.bfloat16()
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    cpu.BACKEND.prepare(conv)
    x = torch.randn(2, 24, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = ref_conv(x.double())
        plain_err = _rel(torch.nn.functional.conv2d(x.bfloat16(), before["weight"], before["bias"], padding=1), ref)
        y = conv(x.bfloat16())
        assert y.dtype == torch.bfloat16 and _rel(y, ref) <= 2 * plain_err, (_rel(y, ref), plain_err)
        assert set(conv._winograd) == {F2B.name} and not conv.weight.is_mkldnn
        assert keys[-1].endswith(f" bf16 conv v{cpu_winograd_bf16.VERSION}")
        assert all(torch.equal(v, before[k]) for k, v in conv.state_dict().items())
        ptr = conv._winograd[F2B.name].data_ptr()
        new = torch.nn.Parameter(conv.weight * 2, requires_grad=False)
        cpu.BACKEND.replace_weight(conv, new)
        y2 = conv(x.bfloat16())
        assert conv._winograd[F2B.name].data_ptr() == ptr  # written over, not allocated
        assert torch.equal(y2, cpu_winograd.conv3x3(x.bfloat16(), cpu_winograd.weight_transform(new, F2B), conv.bias,
                                                    F2B))
    cpu.BACKEND.unprepare(conv)
    assert type(conv) is torch.nn.Conv2d


def test_that_fails_to_build_warns_once_at_prepare(monkeypatch):
    """A bf16 model on a CPU with native bf16 and no AMX where the bf16 convolution can't be built (no compiler,
    faked): one warning when the cpu backend prepares it, naming why; its layers are offered no bf16 operands."""
    monkeypatch.setattr(cpu_winograd_bf16, "_library", lambda: (None, "no C++ compiler (g++ not found; set CXX)"))
    monkeypatch.setattr(cpuinfo, "native_bf16", lambda cpuinfo="": True)
    monkeypatch.setattr(cpuinfo, "amx", lambda cpuinfo="": False)
    cpu._warn_native.cache_clear()
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1)).requires_grad_(False).bfloat16()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for m in (model, torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1)).requires_grad_(False)):
                cpu.BACKEND.prepare(m.bfloat16())
        ours = [str(w.message) for w in caught if "bf16 Winograd convolution" in str(w.message)]
        assert len(ours) == 1 and "no C++ compiler" in ours[0], ours
        assert F2B not in cpu_winograd.variants_for(model[0], torch.zeros(1, 8, 32, 32, dtype=torch.bfloat16))
    finally:
        cpu._warn_native.cache_clear()


@pytest.mark.parametrize("kc", [(7, 5), (48, 64), (1300, 6)], ids=lambda kc: f"{kc[0]}x{kc[1]}")
def test_weight_transform_is_the_fp32_one_rounded_and_laid_out(kc):
    """F2B's transformed weight: F(2x2)'s fp32 transform rounded to bf16 in `layout`, bit for bit (odd C: a zero pair
    member; K past CONTIGUOUS_FROM_K; panels of BLOCK_N output channels, the last narrower), written over `out` when
    given."""
    k, c = kc
    w = torch.randn(k, c, 3, 3, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = cpu_winograd_bf16.layout(cpu_winograd.weight_transform(w, cpu_winograd.F2))
    u = cpu_winograd.weight_transform(w, F2B)
    assert u.dtype == torch.bfloat16 and u.is_contiguous() and torch.equal(u, want)
    again = cpu_winograd.weight_transform(w * 2, F2B, out=u)
    assert again.data_ptr() == u.data_ptr() and torch.equal(again, cpu_winograd_bf16.layout(
        cpu_winograd.weight_transform(w * 2, cpu_winograd.F2)))
    w32 = w.float() / 3  # an fp32 weight; its sums not exact in fp32, so within one bf16 ulp of the fp32 transform
    # summed in another order
    torch.testing.assert_close(cpu_winograd.weight_transform(w32, F2B).float(), cpu_winograd_bf16.layout(
        cpu_winograd.weight_transform(w32, cpu_winograd.F2)).float(), rtol=2 ** -7, atol=1e-6)
