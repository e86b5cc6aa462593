"""kernels.group_norm vs the torch reference (kernels._reference.group_norm), under the Triton interpreter:
the one-launch kernel and the split-statistics path, gradients through the registered op, opcheck."""
import pytest
import torch

from fastsd import backends
from fastsd.kernels import shapes
from fastsd.kernels._reference import group_norm as group_norm_reference
from fastsd.kernels.group_norm import fused_config, group_norm, group_norm_config, group_norm_op, launch_count

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_RTOL = 1e-4


def _make(N, C, H, W, dtype, channels_last, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    # a per-channel offset larger than the spread: sum/sumsq statistics would cancel badly
    x = (torch.randn(N, C, H, W, generator=g) * 2 + torch.randn(1, C, 1, 1, generator=g) * 8 + 5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(C, generator=g) + 1) if affine else None
    b = torch.randn(C, generator=g) if affine else None
    return x, w, b


def _check(x, G, w, b, eps, silu, **kw):
    y = group_norm(x, G, w, b, eps=eps, silu=silu, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()
    ref = group_norm_reference(x.float(), G, w, b, eps=eps, silu=silu)
    err = (y.float() - ref).abs().max().item()
    if x.dtype == torch.float32:
        assert err <= FP32_RTOL * ref.abs().max().item(), err
    else:
        torch_err = (group_norm_reference(x, G, w, b, eps=eps, silu=silu).float() - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-6 * ref.abs().max().item(), (err, torch_err)
    return y


# (N, C, H, W, dtype, silu, eps): SD1.5 UNet (320..2560, Cg 10..80) and VAE (128/256/512, Cg 4..16)
CASES = [
    (2, 320, 7, 9, "fp32", True, 1e-5),
    (2, 640, 8, 8, "fp16", True, 1e-5),
    (1, 960, 7, 9, "bf16", True, 1e-5),
    (2, 1280, 4, 4, "fp16", False, 1e-6),
    (1, 1920, 3, 5, "fp32", True, 1e-5),
    (1, 2560, 2, 3, "bf16", True, 1e-5),
    (1, 128, 33, 33, "fp16", True, 1e-6),
    (1, 256, 17, 15, "fp32", False, 1e-6),
    (2, 512, 9, 7, "bf16", True, 1e-6),
    (1, 64, 1, 1, "fp32", True, 1e-5),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("N,C,H,W,dtype,silu,eps", CASES,
                         ids=[f"N{c[0]}C{c[1]}-{c[2]}x{c[3]}-{c[4]}-{'silu' if c[5] else 'nosilu'}-eps{c[6]:g}" for c in CASES])
def test_group_norm_matches_reference(N, C, H, W, dtype, silu, eps, channels_last):
    x, w, b = _make(N, C, H, W, DTYPES[dtype], channels_last)
    _check(x, 32, w, b, eps, silu)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_group_spans_many_programs(channels_last):
    """Each group's statistics come from many stats programs (13 spatial splits x channel blocks)."""
    x, w, b = _make(2, 128, 20, 21, torch.float32, channels_last, seed=1)
    cfg = group_norm_config(2, 128, 420, 32, channels_last, sp_per_prog=33)
    assert cfg.num_splits == 13
    _check(x, 32, w, b, 1e-6, True, _sp_per_prog=33)


def test_group_norm_default_split_heuristic():
    """The default config splits big planes (VAE 512 px: 1M-element groups) over many programs and
    keeps the finalize tile bounded."""
    cfg = group_norm_config(1, 128, 512 * 512, 32, False)
    assert cfg.num_splits >= 32 and cfg.BLOCK_CG * cfg.BLOCK_SPLIT <= 4096
    assert cfg.sp_per_prog * cfg.num_splits >= 512 * 512
    cfg = group_norm_config(1, 128, 512 * 512, 32, True)
    assert cfg.num_splits >= 32 and cfg.BLOCK_CG * cfg.BLOCK_SPLIT <= 4096
    # a default multi-split launch, end to end (NCHW, 80x80 = 6400 > 4 tiles of 1024)
    x, w, b = _make(1, 128, 80, 80, torch.float16, False, seed=2)
    assert group_norm_config(1, 128, 6400, 32, False).num_splits == 2
    _check(x, 32, w, b, 1e-6, True, _sp_per_prog=group_norm_config(1, 128, 6400, 32, False).sp_per_prog)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_group_norm_no_affine_and_other_groups(dtype):
    x, _, _ = _make(2, 48, 5, 6, DTYPES[dtype], False, seed=3, affine=False)
    _check(x, 3, None, None, 1e-5, False)
    _check(x, 48, None, torch.randn(48), 1e-5, True)  # Cg = 1, bias only


def test_group_norm_half_weights_and_no_copy():
    x, w, b = _make(1, 64, 6, 6, torch.float16, True, seed=4)
    ptr = x.data_ptr()
    _check(x, 32, w.half(), b.half(), 1e-5, True)
    assert x.data_ptr() == ptr


def test_group_norm_rejects_bad_inputs():
    x = torch.randn(1, 30, 4, 4)
    with pytest.raises(ValueError):
        group_norm(x, 32, None, None)
    with pytest.raises(ValueError):
        group_norm(x[0], 3, None, None)
    with pytest.raises(ValueError):
        group_norm(x, 3, torch.ones(29), None)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ops_group_norm_triton_backend_matches_torch(channels_last):
    x, w, b = _make(2, 320, 6, 5, torch.float32, channels_last, seed=5)
    ref = backends.get("torch").ops.group_norm(x, 32, w, b, eps=1e-5, silu=True)
    out = backends.get("triton").ops.group_norm(x, 32, w, b, eps=1e-5, silu=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_group_norm_one_launch_at_every_unet_shape():
    """Issue #14: one launch per call for every UNet norm (512 and 768 px) and the 512 px VAE decoder's 64x64
    level; split statistics only for the big VAE levels. 61 UNet launches per step (was 183)."""
    for res in (512, 768):
        for c in shapes.unet_group_norm_calls(res, 2):
            assert launch_count(c.N, c.C, c.H, c.W, c.groups) == 1, c
    vae = shapes.vae_decoder_group_norm_calls(512)
    assert all(launch_count(c.N, c.C, c.H, c.W, c.groups) == 1 for c in vae if c.H <= 64)
    assert any(launch_count(c.N, c.C, c.H, c.W, c.groups) == 3 for c in vae if c.H == 512)
    assert sum(c.count * launch_count(c.N, c.C, c.H, c.W, c.groups) for c in shapes.unet_group_norm_calls(512)) == 61


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("N,C,H,W,dtype", [(2, 640, 12, 12, "fp16"), (1, 96, 9, 16, "bf16"), (2, 64, 33, 31, "fp32")])
def test_group_norm_fused_tiles(N, C, H, W, dtype, channels_last):
    """The one-launch kernel's tile choices: exact tiles (12x12 = 9 x 16), masked channel rows, odd planes."""
    assert fused_config(C, H * W, 32, channels_last) is not None
    x, w, b = _make(N, C, H, W, DTYPES[dtype], channels_last, seed=12)
    _check(x, 32, w, b, 1e-5, True)


def test_group_norm_non_contiguous_view():
    """A view that is neither NCHW- nor NHWC-like (a spatial crop): copied once, same result."""
    x, w, b = _make(1, 64, 10, 12, torch.float32, False, seed=13)
    view = x[:, :, 1:8, 2:9]
    assert not view.is_contiguous()
    y = group_norm(view, 32, w, b, eps=1e-5, silu=True)
    torch.testing.assert_close(y, group_norm_reference(view, 32, w, b, eps=1e-5, silu=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,channels_last,affine,silu", [("fp32", False, True, True), ("fp32", True, False, False),
                                                             ("bf16", False, True, True), ("fp16", True, True, False)])
def test_group_norm_gradients_match_reference(dtype, channels_last, affine, silu):
    """dx, dweight, dbias through fastsd::group_norm's registered backward vs autograd through the reference;
    fp16/bf16 within 2x the reference's own error against fp32."""
    x, w, b = _make(2, 64, 5, 7, DTYPES[dtype], channels_last, seed=14, affine=affine)
    if affine:
        w, b = w.to(x.dtype), b.to(x.dtype)
    gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(15)).to(x.dtype)

    def grads(fn, tensors):
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
        fn(*leaves).backward(gout.to(leaves[0].dtype))
        return [None if t is None else t.grad for t in leaves]

    f = lambda a, c, d: group_norm(a, 32, c, d, eps=1e-5, silu=silu)
    r = lambda a, c, d: group_norm_reference(a, 32, c, d, eps=1e-5, silu=silu)
    up = lambda t: None if t is None else t.float()
    got, ref, ref32 = grads(f, (x, w, b)), grads(r, (x, w, b)), grads(r, (up(x), up(w), up(b)))
    for a, rr, r32 in zip(got, ref, ref32):
        if r32 is None:
            assert a is None
            continue
        err = (a.float() - r32).abs().max().item()
        scale = r32.abs().max().item()
        if dtype == "fp32":
            assert err <= 1e-4 * scale, err
        else:
            assert err <= 2 * (rr.float() - r32).abs().max().item() + 1e-6 * scale, err


def test_group_norm_opcheck():
    x, w, b = _make(1, 32, 3, 5, torch.float32, False, seed=16)
    torch.library.opcheck(group_norm_op, (x, 8, w, b, 1e-5, True))
    torch.library.opcheck(group_norm_op, (x.to(memory_format=torch.channels_last).requires_grad_(), 8, None, None,
                                          1e-6, False))
