"""kernels.cfg_step vs the torch reference (kernels._reference.cfg_step), under the Triton interpreter; gradients
through the registered op and opcheck."""
import pytest
import torch

from fastsd import backends
from fastsd.denoisers import CFGDenoiser
from fastsd.kernels._reference import cfg_step as cfg_step_reference
from fastsd.samplers import (SAMPLERS, ancestral_coeffs, brownian_noise_sampler, ddpm_coeffs, denoise_and_step,
                             dpm2_coeffs, dpmpp_2m_coeffs, dpmpp_2m_sde_coeffs, dpmpp_2s_coeffs, euler_coeffs,
                             heun_coeffs, lms_coeffs, sample_dpmpp_sde, unipc_corrector_coeffs,
                             unipc_predictor_coeffs)
from fastsd.kernels.cfg_step import cfg_step, cfg_step_config, cfg_step_op

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_RTOL = 1e-6  # max abs error / max abs of the reference
SCALE = 7.5

# (name, coeffs, has_old, has_noise): each sampler's coefficient pattern (sigma 14.6 -> 9.7, prev 20.1)
PATTERNS = [
    ("euler", euler_coeffs(14.6, 9.7), False, False),
    ("heun", heun_coeffs(14.6, 9.7), True, False),  # the correction: a = 1, c = -b
    ("euler_a", ancestral_coeffs(14.6, 9.7, 1.0), False, True),
    ("ddim_eta", ancestral_coeffs(14.6, 9.7, 0.5), False, True),
    ("ddpm", ddpm_coeffs(14.6, 9.7), False, True),
    ("dpmpp_2m_first", dpmpp_2m_coeffs(None, 14.6, 9.7), False, False),
    ("dpmpp_2m", dpmpp_2m_coeffs(20.1, 14.6, 9.7), True, False),
    ("dpmpp_2m_last", dpmpp_2m_coeffs(0.3, 0.1, 0.0), True, False),  # a = 0, c = 0: x and old not read
    ("dpmpp_2m_sde", dpmpp_2m_sde_coeffs(20.1, 14.6, 9.7), True, True),  # every term
    # lms order 4: a = 1 + c0/s, b = -c0/s, c = 1 (old = the earlier derivatives' combined term)
    ("lms", (1 + lms_coeffs([14.6, 20.1, 27.0, 35.2], 9.7)[0] / 14.6,
             -lms_coeffs([14.6, 20.1, 27.0, 35.2], 9.7)[0] / 14.6, 1.0, 0.0), True, False),
    ("dpm2", dpm2_coeffs(14.6, 11.9, 9.7), True, False),  # the second call: a, b and c (c < 0)
    ("dpm2_a", dpm2_coeffs(14.6, 9.7, 6.4, 7.3), True, True),  # every term, b and c of opposite signs
    ("dpmpp_2s_a", dpmpp_2s_coeffs(14.6, 9.7, 6.4, 7.3), True, True),
    # unipc: a = 0 (the corrected sample comes in old_denoised), b = A Q + P0, c = 1
    ("unipc", (0.0, unipc_predictor_coeffs(20.1, 14.6, 9.7)[0] * unipc_corrector_coeffs(27.0, 20.1, 14.6)[1]
               + unipc_predictor_coeffs(20.1, 14.6, 9.7)[1], 1.0, 0.0), True, False),
]


def _make(shape, model_dtype, x_dtype=torch.float32, seed=0):
    """x, the batched (2B, ...) model output split in halves (views), old_denoised, noise."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x = (torch.randn(shape, generator=g) * 10).to(x_dtype)
    out = (torch.randn((2 * B, *shape[1:]), generator=g) * 2).to(model_dtype)
    uncond, cond = out.chunk(2)
    old = torch.randn(shape, generator=g).to(x_dtype)
    noise = torch.randn(shape, generator=g).to(x_dtype)
    return x, uncond, cond, old, noise


def _rel(a, ref):
    return (a.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()


def _check(x, uncond, cond, old, noise, coeffs, scale=SCALE, all_half=False):
    x_next, den = cfg_step(x, uncond, cond, scale, coeffs, old, noise)
    assert x_next.dtype == x.dtype and x_next.shape == x.shape
    f = lambda t: None if t is None else t.float()
    ref_x, ref_d = cfg_step_reference(f(x), f(uncond), f(cond), scale, coeffs, f(old), f(noise))
    if uncond is None:
        assert den is cond
    else:
        assert den.dtype == torch.promote_types(x.dtype, cond.dtype)
    if not all_half:  # fp32 math on (upcast) inputs: only fp32 rounding
        assert _rel(x_next, ref_x) <= FP32_RTOL and _rel(den, ref_d) <= FP32_RTOL
    else:  # everything in fp16/bf16: at most 2x torch's own error at that dtype
        tx, td = cfg_step_reference(x, uncond, cond, scale, coeffs, old, noise)
        for got, ref, tr in ((x_next, ref_x, tx), (den, ref_d, td)):
            err, torch_err = _rel(got, ref), _rel(tr, ref)
            assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    return x_next, den


@pytest.mark.parametrize("model_dtype", list(DTYPES))
@pytest.mark.parametrize("name,coeffs,has_old,has_noise", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_cfg_step_sampler_patterns(name, coeffs, has_old, has_noise, model_dtype):
    """fp32 latents, model output in any dtype; 1 x 4 x 13 x 11 = 572 elements (not a multiple of BLOCK)."""
    x, uncond, cond, old, noise = _make((1, 4, 13, 11), DTYPES[model_dtype])
    _check(x, uncond, cond, old if has_old else None, noise if has_noise else None, coeffs)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name,coeffs,has_old,has_noise", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_cfg_step_all_half(name, coeffs, has_old, has_noise, dtype):
    """x, model output, old and noise all fp16/bf16: the kernel rounds once (observed ~0.3-0.5x torch's
    error), torch after every op."""
    x, uncond, cond, old, noise = _make((2, 4, 9, 7), DTYPES[dtype], DTYPES[dtype], seed=1)
    _check(x, uncond, cond, old if has_old else None, noise if has_noise else None, coeffs, all_half=True)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 4, 7, 9), (2, 4, 97, 89)])
def test_cfg_step_odd_sizes_and_blocks(shape):
    """Tails of 1, 252 (< one 256 block) and 69064 elements (BLOCK 512: 134 full programs + 456)."""
    x, uncond, cond, old, noise = _make(shape, torch.float16, seed=2)
    n = x.numel()
    cfg = cfg_step_config(n)
    if n > 10_000:
        assert cfg.BLOCK == 512 and n % cfg.BLOCK
    _check(x, uncond, cond, old, noise, (0.7, 0.3, -0.2, 1.5))


def test_cfg_step_without_guidance_and_strided_inputs():
    x, uncond, cond, old, noise = _make((2, 4, 6, 5), torch.float32, seed=3)
    x_next, den = _check(x, None, cond, None, noise, ancestral_coeffs(3.0, 2.0))
    assert den is cond
    # non-contiguous views (a channels_last model output): copied once, same result
    out_cl = torch.cat([uncond, cond]).to(memory_format=torch.channels_last)
    _check(x, *out_cl.chunk(2), old, None, dpmpp_2m_coeffs(4.0, 3.0, 2.0))


def test_cfg_step_config_rule():
    assert cfg_step_config(4 * 64 * 64).BLOCK == 256  # SD1.5 512 px, one image: 64 programs
    assert cfg_step_config(2 * 4 * 96 * 96) == cfg_step_config(73728)
    assert cfg_step_config(73728).BLOCK == 512 and cfg_step_config(73728).num_warps == 4
    assert cfg_step_config(10 ** 8).BLOCK == 2048 and cfg_step_config(10 ** 8).num_warps == 8


def test_cfg_step_rejects_bad_inputs():
    x, uncond, cond, old, noise = _make((1, 4, 3, 3), torch.float32)
    with pytest.raises(ValueError):
        cfg_step(x, uncond, cond, SCALE, (1.0, 0.5, 0.25, 0.0), None, None)  # c != 0 without old
    with pytest.raises(ValueError):
        cfg_step(x, uncond, cond, SCALE, (1.0, 0.5, 0.0, 0.1), None, None)  # d != 0 without noise
    with pytest.raises(ValueError):
        cfg_step(x, uncond, cond[:, :2], SCALE, (1.0, 0.5, 0.0, 0.0))
    with pytest.raises(TypeError):
        cfg_step(x, uncond, cond.double(), SCALE, (1.0, 0.5, 0.0, 0.0))


class _FakeDenoiser:
    """x0 = x * 0.9 + the context's mean per sample (so the branches differ); counts batched calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, context):
        self.batches.append(x.shape[0])
        return x * 0.9 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_denoise_and_step_fuses_a_denoiser_that_splits_its_guidance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 5, 5, generator=g)
    cond, uncond = torch.randn(2, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    noise = torch.randn(2, 4, 5, 5, generator=g)
    coeffs = ancestral_coeffs(5.0, 3.0)
    den = _FakeDenoiser()
    results = {}
    for be in ("torch", "triton"):
        cfg = CFGDenoiser(den, cond, uncond, SCALE, cfg_step=backends.get(be).ops.cfg_step)
        wrapped = lambda x, sigma, **kw: cfg(x, sigma, **kw)  # noqa: E731  (no split_guidance: unfused)
        if True:
            for kind, model in (("fused", cfg), ("wrapped", wrapped)):
                draws = []
                results[be, kind] = denoise_and_step(model, x, 5.0, {}, coeffs, draw_noise=lambda: draws.append(1) or noise)
                assert draws == [1]
    assert den.batches == [4] * 4  # one batched call each time
    ref = results["torch", "wrapped"]
    for key, (x_next, d) in results.items():
        torch.testing.assert_close(x_next, ref[0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(d, ref[1], rtol=1e-6, atol=1e-5)
    # torch backend, fused or not: bitwise the same (one torch implementation)
    assert torch.equal(results["torch", "fused"][0], ref[0])


def test_ops_cfg_step_routes_to_the_kernel(monkeypatch):
    from fastsd.kernels import cfg_step as kernels

    x, uncond, cond, old, noise = _make((1, 4, 4, 4), torch.float32)
    calls = []
    real = kernels.cfg_step
    monkeypatch.setattr(kernels, "cfg_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = backends.get("torch").ops.cfg_step(x, uncond, cond, SCALE, (0.5, 0.5, 0.0, 0.0))
    ops = backends.get("triton").ops
    out = ops.cfg_step(x, uncond, cond, SCALE, (0.5, 0.5, 0.0, 0.0))
    ops.cfg_step(x.double(), None, cond.double(), None, (0.5, 0.5, 0.0, 0.0))  # fp64: reference path
    assert calls == [1]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["euler", "heun", "euler_a", "ddpm", "ddim_cfgpp", "dpmpp_2m", "dpmpp_2m_sde", "lms", "dpm2_a",
                                  "dpmpp_2s_a_karras", "unipc", "dpmpp_sde_karras", "dpmpp_2m_sde_heun",
                                  "dpmpp_3m_sde"])
def test_sampler_loops_triton_vs_torch(name, monkeypatch):
    """Whole sampler loops (6 steps) with a guided CFGDenoiser: the fused kernel on every step under triton,
    the same seeded noise stream (draw order unchanged), callbacks see the same denoised. The final latents are
    held to the float64 loop: triton's fp32 error at most twice torch's own (a 6-step chain with CFG 7.5 and
    DPM2 a's opposite-signed b, c amplifies fp32 rounding to ~3e-6 of the largest value in both)."""
    from fastsd.kernels import cfg_step as kernels

    spec = SAMPLERS[name]
    sched = spec.schedule(6)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(1, 4, 6, 6, generator=g) * sched.init_noise_sigma
    cond, uncond = torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    calls = []
    real = kernels.cfg_step
    monkeypatch.setattr(kernels, "cfg_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, seen, gens = {}, {}, {}
    for be in ("torch", "triton"):
        gens[be] = torch.Generator().manual_seed(1)
        opts = {"generator": gens[be]} if spec.stochastic else {}
        seen[be] = []
        model = CFGDenoiser(_FakeDenoiser(), cond, uncond, SCALE, cfg_step=backends.get(be).ops.cfg_step)
        out[be] = spec(model, x0, sched.sigmas, disable=True, callback=lambda d: seen[be].append(d["denoised"]),
                       **opts)
    assert torch.equal(gens["torch"].get_state(), gens["triton"].get_state())  # same number of draws
    two_calls = name.startswith(("heun", "dpm2", "dpmpp_2s", "dpmpp_sde"))
    assert len(calls) == (11 if two_calls else 6)  # Heun, DPM2, DPM++ 2S, DPM++ SDE: two calls a step, one on the last
    g64 = torch.Generator().manual_seed(1)  # the same noise values, drawn in fp32 as the fp32 loops draw them
    opts = {"noise_sampler": lambda s, sn: torch.randn(x0.shape, generator=g64).double()} if spec.stochastic else {}
    if spec.fn is sample_dpmpp_sde:  # its own default: the Brownian tree of the seed it draws from the generator
        opts = {"noise_sampler": brownian_noise_sampler(x0.double(), sched.sigmas, int(torch.randint(
            0, 2 ** 63 - 1, (), generator=g64)))}
    model = CFGDenoiser(_FakeDenoiser(), cond.double(), uncond.double(), SCALE)
    ref = spec(model, x0.double(), sched.sigmas, disable=True, **opts)
    err = {be: _rel(out[be], ref) for be in out}
    assert err["torch"] < 1e-5 and err["triton"] <= 2 * err["torch"] + 1e-7, err
    assert len(seen["triton"]) == len(seen["torch"]) == 6
    for a, b in zip(seen["triton"], seen["torch"]):  # relative to the largest value (fp32 chains, as above)
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name,coeffs,has_old,has_noise", PATTERNS[:6], ids=[p[0] for p in PATTERNS[:6]])
def test_cfg_step_gradients_match_reference(name, coeffs, has_old, has_noise, guided):
    """Gradients of x_next (and denoised) w.r.t. every input through fastsd::cfg_step's registered backward vs
    autograd through the reference."""
    x, uncond, cond, old, noise = _make((1, 4, 3, 5), torch.float32, seed=20)
    inputs = [x, uncond if guided else None, cond, old if has_old else None, noise if has_noise else None]
    g = torch.Generator().manual_seed(21)
    gx, gd = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)

    def grads(fn):
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
        xn, den = fn(leaves[0], leaves[1], leaves[2], SCALE, coeffs, leaves[3], leaves[4])
        (xn * gx + den * gd).sum().backward()
        return [None if t is None else t.grad for t in leaves]

    for got, ref in zip(grads(cfg_step), grads(cfg_step_reference)):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_cfg_step_opcheck():
    x, uncond, cond, old, noise = _make((1, 4, 3, 3), torch.float16, seed=22)
    x = x.requires_grad_()
    torch.library.opcheck(cfg_step_op, (x, uncond, cond, SCALE, [0.5, 0.4, -0.1, 0.2], old, noise))
    torch.library.opcheck(cfg_step_op, (x, None, cond, None, [0.0, 1.0, 0.0, 0.0], None, None))
