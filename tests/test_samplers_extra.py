"""A1111's remaining samplers: PLMS (diffusers' PNDMScheduler(skip_prk_steps=True) twin; A1111's plms as the img2img
oracle), Restart (A1111's restart_sampler, transcribed below as an oracle, fed the same noise; statistics on
Gaussian data)."""
from __future__ import annotations

import math

import pytest
import torch

from fastsd.denoisers import EpsDenoiser
from fastsd.samplers import A1111_NAMES, SAMPLERS, get_sampler, restart_steps
from fastsd.schedule_types import TIMESTEP_SAMPLERS, check_sampler
from fastsd.schedules import SAMPLER_SCHEDULES, alphas_cumprod, schedule_for
from test_samplers import SHAPE, FakeUNet, _a1111_karras, diffusers_loop, fastsd_loop, rel_err
from test_samplers_sde import C, MU, chain_std, gaussian_denoiser

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --------------------------------------------------------------------------------------------- PLMS: diffusers

@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 25])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plms_matches_diffusers(steps, dtype):
    """The UNet sees exactly PNDM's timesteps, its repeated second one included (n + 1 calls), and the final latents
    are diffusers' (observed <= 1e-7 in float64, 1.6e-6 in float32: diffusers steps with float32 alphas)."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref, ref_ts = diffusers_loop("plms", steps, noise)
    out, ts = fastsd_loop("plms", steps, noise)
    assert ts == ref_ts and len(ts) == steps + (steps > 1)
    if steps > 1:
        assert ts[1] == ts[2]  # the warm-up's second call, then the first multistep call, at the same timestep
    assert rel_err(out, ref) < 3e-6


def test_plms_img2img_at_full_strength_matches_diffusers():
    g = torch.Generator().manual_seed(3)
    init, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    ref, ref_ts = diffusers_loop("plms", 20, noise, strength=1.0, init=init)
    out, ts = fastsd_loop("plms", 20, noise, strength=1.0, init=init)
    assert ts == ref_ts and rel_err(out, ref) < 3e-6


def test_plms_img2img_differs_from_diffusers_as_documented():
    """diffusers' img2img slices PNDM's n + 1 timesteps (the repeat included) at t_start * order: it starts a level
    higher than the other schedulers (351, not 301, at 20 steps and strength 0.35) and, the repeat being gone from
    the slice, calls the UNet after its warm-up one timestep below the sample's level (the sample at 301 is treated
    as at 251: an interval skipped). fastsd (and A1111) start the warm-up over on the partial schedule."""
    g = torch.Generator().manual_seed(3)
    init, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    _, ref_ts = diffusers_loop("plms", 20, noise, strength=0.35, init=init)
    _, ts = fastsd_loop("plms", 20, noise, strength=0.35, init=init)
    assert ref_ts == [351.0, 301.0] + [251.0 - 50 * k for k in range(6)]
    assert ts == [301.0, 251.0, 251.0] + [201.0 - 50 * k for k in range(5)]


# --------------------------------------------------------------------------------------------- PLMS: A1111 oracle

def a1111_plms(eps_model, x, sigmas):
    """Test oracle: A1111's modules/sd_samplers_timesteps_impl.py `plms`, transcribed over a descending sigma list
    (its alphas / alphas_prev are 1/(1 + s^2) of this and the next level), in VP space (x = x_k / sqrt(1 + s^2)),
    with `eps_model(x_vp, sigma)`. For two or more steps (A1111 gives a single step's Heun call another timestep)."""
    s = sigmas.tolist()
    alphas = [1 / (1 + v * v) for v in s[:-1]]
    alphas_prev = [1 / (1 + v * v) for v in s[1:]]
    old_eps = []

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1. - a_prev) * e_t
        return math.sqrt(a_prev) * pred_x0 + dir_xt, pred_x0

    for index in range(len(s) - 1):
        e_t = eps_model(x, s[index])
        if len(old_eps) == 0:
            x_prev, _ = get_x_prev_and_pred_x0(x, e_t, index)
            e_t_next = eps_model(x_prev, s[index + 1])
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, _ = get_x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


@pytest.mark.parametrize("steps,strength", [(20, 1.0), (20, 0.35), (20, 0.8), (10, 0.5), (7, 0.3)])
def test_plms_img2img_matches_a1111(steps, strength):
    sched = schedule_for("plms", steps)
    sched = sched.tail(sched.img2img_start(strength))
    g = torch.Generator().manual_seed(3)
    init, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    x = init + noise * sched.sigmas[0].item()
    den = EpsDenoiser(FakeUNet(), alphas_cumprod(), schedule=sched)

    def eps_model(x_vp, sigma):
        xk = x_vp * math.sqrt(1 + sigma * sigma)
        return (xk - den(xk, torch.tensor(sigma, dtype=torch.float64))) / sigma

    s0, s_end = sched.sigmas[0].item(), sched.sigmas[-1].item()
    ref = a1111_plms(eps_model, x / math.sqrt(1 + s0 * s0), sched.sigmas) * math.sqrt(1 + s_end * s_end)
    calls = []
    out = SAMPLERS["plms"](lambda x, sigma: calls.append(float(sigma)) or den(x, sigma), x, sched.sigmas,
                           disable=True)
    assert len(calls) == len(sched) + 1
    assert rel_err(out, ref) < 1e-12


def test_plms_registry_and_schedule_types():
    assert get_sampler("PLMS") is get_sampler("k_plms") is SAMPLERS["plms"] and A1111_NAMES["plms"] == "PLMS"
    assert not SAMPLERS["plms"].stochastic and SAMPLER_SCHEDULES["plms"] == ("ddim", False)
    assert "plms" in TIMESTEP_SAMPLERS
    with pytest.raises(ValueError, match="does not apply to plms"):
        check_sampler("karras", "plms")
    check_sampler("automatic", "plms")


def test_plms_callback_once_a_step():
    sched = schedule_for("plms", 6)
    seen = []
    SAMPLERS["plms"](EpsDenoiser(FakeUNet(), alphas_cumprod(), schedule=sched), torch.ones(SHAPE, dtype=torch.float64),
                     sched.sigmas, disable=True, callback=lambda d: seen.append((d["i"], float(d["sigma"]))))
    assert seen == list(enumerate(sched.sigmas[:-1].tolist()))


# --------------------------------------------------------------------------------------------- Restart: A1111 oracle

def kdiff_get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    """k-diffusion's get_sigmas_karras (float32 ramp, a final 0 appended); part of the oracle."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def a1111_restart_sampler(model, x, sigmas, randn_like, s_noise=1.0):
    """Test oracle: A1111's modules/sd_samplers_extra.py restart_sampler (restart_list None), transcribed; its
    randn_like (A1111's TorchHijack) is the `randn_like` given. Returns (x, the (old, new) sigma pairs walked)."""
    sigmas = sigmas.float()
    step_list = []

    def to_d(x, sigma, denoised):
        return (x - denoised) / sigma

    def heun_step(x, old_sigma, new_sigma):
        denoised = model(x, old_sigma)
        d = to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, new_sigma)
            d_2 = to_d(x_2, new_sigma, denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
        return x

    steps = sigmas.shape[0] - 1
    if steps >= 20:
        restart_steps_, restart_times = 9, 1
        if steps >= 36:
            restart_steps_ = steps // 4
            restart_times = 2
        sigmas = kdiff_get_sigmas_karras(steps - restart_steps_ * restart_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps_ + 1, restart_times, 2]}
    else:
        restart_list = {}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps_, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = kdiff_get_sigmas_karras(restart_steps_, sigmas[min_idx].item(),
                                                        sigmas[max_idx].item())[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:]))
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + randn_like(x) * s_noise * (old_sigma ** 2 - last_sigma ** 2) ** 0.5
        x = heun_step(x, old_sigma.item(), new_sigma.item())
        last_sigma = new_sigma
    return x, [(a.item(), b.item()) for a, b in step_list]


def _restart_setup(sigmas, steps):
    # A1111's Karras levels are float32 (k-diffusion's get_sigmas_karras), as the oracle walks them
    sig = _a1111_karras(steps).float().double() if sigmas == "a1111_karras" else schedule_for(sigmas, steps).sigmas
    den = EpsDenoiser(FakeUNet(), alphas_cumprod())
    g = torch.Generator().manual_seed(9)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * sig[0].item()
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4)]
    calls = []
    model = lambda x, sigma: calls.append(float(sigma)) or den(x, sigma)  # noqa: E731
    return sig, x, noises, model, calls


@pytest.mark.parametrize("sigmas", ["restart", "a1111_karras"])
@pytest.mark.parametrize("steps", [1, 4, 19, 20, 25, 35, 36, 50])
def test_restart_matches_a1111(sigmas, steps):
    """The same model calls at the same sigmas (both walk k-diffusion's float32 Karras levels), the same noise
    draws (A1111's randn_like fed the noise fastsd's noise_sampler gets), the same result (observed <= 1e-15
    relative below 20 steps, <= 1.1e-8 with a restart); `steps` Heun steps and 2 * steps - 1 model calls."""
    sig, x, noises, model, calls = _restart_setup(sigmas, steps)
    it_ref, ref_draws = iter(noises), []
    ref, pairs = a1111_restart_sampler(model, x, sig, lambda x: ref_draws.append(1) or next(it_ref))
    ref_calls, n_ref_draws = list(calls), len(ref_draws)
    calls.clear()
    it = iter(noises)
    asked = []
    out = SAMPLERS["restart"](model, x, sig, disable=True,
                              noise_sampler=lambda a, b: asked.append((float(a), float(b))) or next(it))
    assert restart_steps(sig.tolist()) == pairs and len(pairs) == steps
    assert calls == ref_calls and len(calls) == 2 * steps - 1
    assert len(asked) == n_ref_draws == (0 if steps < 20 else 1 if steps < 36 else 2)
    assert all(b > a for a, b in asked)  # each draw takes x back up: from the segment's end to its start
    # A1111 computes the jump's noise std sqrt(s_up^2 - s^2) in float32 (its sigmas' dtype): 5e-8 relative off
    # fastsd's float64 one at 25 steps, 1e-8 of the result
    assert rel_err(out, ref) < (1e-12 if steps < 20 else 1e-7)


@pytest.mark.parametrize("steps", [1, 5, 19])
def test_restart_below_20_steps_is_heun(steps):
    sig, x, _, model, calls = _restart_setup("restart", steps)
    out = SAMPLERS["restart"](model, x, sig, disable=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, SAMPLERS["heun_karras"](model, x, sig, disable=True))


@pytest.mark.parametrize("steps,times", [(20, 1), (30, 1), (36, 2), (80, 2)])
def test_restart_steps_rule(steps, times):
    sig = schedule_for("restart", steps).sigmas.tolist()
    pairs = restart_steps(sig)
    r = 9 if steps < 36 else steps // 4
    assert len(pairs) == steps
    ups = [j for j in range(1, steps) if pairs[j][0] > pairs[j - 1][1]]
    assert len(ups) == times
    for j in ups:  # R steps from the level nearest 2 down to the level nearest 0.1 of the main schedule
        seg = pairs[j:j + r]
        assert all(a > b for a, b in seg) and abs(seg[0][0] - 2) < 0.6 and abs(seg[-1][1] - 0.1) < 0.04
    main = [p for j, p in enumerate(pairs) if not any(u <= j < u + r for u in ups)]
    assert len(main) == steps - r * times and main[0][0] == pytest.approx(sig[0], rel=1e-6)
    assert main[-1] == (pytest.approx(sig[-2], rel=1e-6), 0.0)


def test_restart_img2img_tail_uses_the_tails_ends():
    """img2img hands the sampler the tail: the rule sees its length and rebuilds Karras between the tail's ends."""
    sched = schedule_for("restart", 60)
    tail = sched.tail(sched.img2img_start(0.5))
    pairs = restart_steps(tail.sigmas.tolist())
    assert len(pairs) == 30 and pairs[0][0] == pytest.approx(tail.sigmas[0].item(), rel=1e-6)
    assert sum(pairs[j][0] > pairs[j - 1][1] for j in range(1, 30)) == 1


def test_restart_registry():
    spec = get_sampler("Restart")
    assert spec is SAMPLERS["restart"] is get_sampler("k_restart") and A1111_NAMES["restart"] == "Restart"
    assert spec.stochastic and SAMPLER_SCHEDULES["restart"] == ("euler", True)
    assert torch.equal(spec.schedule(20).sigmas, schedule_for("euler_karras", 20).sigmas)
    check_sampler("exponential", "restart")  # A1111 takes any schedule type (and, from 20 steps, only its ends)


# --------------------------------------------------------------------------------------------- Restart: statistics

@pytest.mark.parametrize("steps,bias", [(20, 0.025), (40, 0.01), (100, 0.002)])
def test_restart_gaussian_statistics(steps, bias):
    """On N(MU, C^2) data with the exact denoiser: the chain's exact std (linear chain, probe columns) within the
    discretisation bias of C; 20000 samples agree with it; the restart noise dropped is far off."""
    n = 20000
    spec = SAMPLERS["restart"]
    sig = spec.schedule(steps).sigmas
    exact = chain_std(spec, sig, {})
    assert ((exact / C - 1).abs() < bias).all(), exact / C - 1
    g = torch.Generator().manual_seed(11)
    s0 = sig[0].item()
    x = MU + (C ** 2 + s0 ** 2).sqrt() * torch.randn(n, 8, generator=g, dtype=torch.float64)
    out = spec(gaussian_denoiser(MU), x, sig, disable=True, generator=g)
    se = 1 / math.sqrt(2 * (n - 1))
    assert ((out.mean(0) - MU).abs() < 4.5 * exact / math.sqrt(n)).all()
    assert ((out.std(0) / exact - 1).abs() < 4.5 * se).all()
    broken = spec(gaussian_denoiser(MU), x, sig, disable=True, noise_sampler=lambda a, b: torch.zeros_like(x))
    assert ((broken.std(0) / exact - 1).abs() > 10 * se).any()


# --------------------------------------------------------------------------------------------- CFG, fused

@pytest.mark.parametrize("name,steps,n_calls", [("plms", 6, 7), ("restart", 6, 11), ("restart", 20, 39)])
def test_cfg_every_model_call_goes_through_cfg_step(name, steps, n_calls):
    """Guided: each batched model call goes into one fused cfg_step (the restart noise included in one of them); the
    result equals the unfused loop's (guidance first, then the update)."""
    from fastsd.backends import reference
    from fastsd.denoisers import CFGDenoiser
    from test_samplers import _cfg_setup

    x, cond, uncond = _cfg_setup(B=2)
    spec = SAMPLERS[name]
    sched = spec.schedule(steps)
    outs, ts = {}, {}
    for kind in ("fused", "unfused"):
        unet, cfg_calls = FakeUNet(), []

        def counting_cfg_step(*a, **k):
            cfg_calls.append(a[1] is not None)
            return reference.cfg_step(*a, **k)

        den = CFGDenoiser(EpsDenoiser(unet, alphas_cumprod(), schedule=sched), cond, uncond, 5.0,
                          cfg_step=counting_cfg_step)
        model = den if kind == "fused" else (lambda x, sigma, **kw: den(x, sigma, **kw))  # noqa: E731
        opts = {"generator": torch.Generator().manual_seed(0)} if spec.stochastic else {}
        outs[kind] = spec(model, x * sched.init_noise_sigma, sched.sigmas, disable=True, **opts)
        ts[kind] = unet.ts
        if kind == "fused":
            assert unet.batches == [4] * n_calls and cfg_calls == [True] * n_calls
    assert ts["fused"] == ts["unfused"]
    assert rel_err(outs["fused"], outs["unfused"]) < 1e-12
