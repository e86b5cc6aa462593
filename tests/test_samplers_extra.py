"""A1111's remaining samplers: PLMS (diffusers' PNDMScheduler(skip_prk_steps=True) twin; A1111's plms as the img2img
oracle), Restart (A1111's restart_sampler, transcribed below as an oracle, fed the same noise; statistics on
Gaussian data), DPM fast / DPM adaptive (k-diffusion's DPMSolver transcribed as the oracle, fed the same noise;
statistics on Gaussian data), DDIM CFG++ (A1111's ddim_cfgpp transcribed as the oracle)."""
from __future__ import annotations

import math

import pytest
import torch

from fastsd.denoisers import EpsDenoiser
from fastsd.samplers import A1111_NAMES, SAMPLERS, get_sampler, restart_steps
from fastsd.schedule_types import TIMESTEP_SAMPLERS, check_sampler, sigma_table
from fastsd.schedules import SAMPLER_SCHEDULES, alphas_cumprod, schedule_for
from test_samplers import (SHAPE, FakeUNet, _a1111_karras, diffusers_loop, fastsd_loop,
                           kdiff_sample_dpmpp_2s_ancestral, rel_err)
from test_samplers_sde import (C, MU, chain_std, gaussian_denoiser, kdiff_sample_dpmpp_2m_sde,
                                kdiff_sample_dpmpp_3m_sde)

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
    higher than the other schedulers (401, not 351, at 20 steps and strength 0.35 run as A1111's 8 steps) and, the
    repeat being gone from the slice, calls the UNet after its warm-up one timestep below the sample's level (the
    sample at 351 is treated as at 301: an interval skipped). fastsd (and A1111) start the warm-up over on the partial
    schedule."""
    g = torch.Generator().manual_seed(3)
    init, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    _, ref_ts = diffusers_loop("plms", 20, noise, strength=0.35, init=init)
    _, ts = fastsd_loop("plms", 20, noise, strength=0.35, init=init)
    assert ref_ts == [401.0, 351.0] + [301.0 - 50 * k for k in range(7)]
    assert ts == [351.0, 301.0, 301.0] + [251.0 - 50 * k for k in range(6)]


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
    assert len(pairs) == 31 and pairs[0][0] == pytest.approx(tail.sigmas[0].item(), rel=1e-6)  # (A1111's 30 + 1 steps)
    assert sum(pairs[j][0] > pairs[j - 1][1] for j in range(1, 31)) == 1


def test_restart_registry():
    spec = get_sampler("Restart")
    assert spec is SAMPLERS["restart"] is get_sampler("k_restart") and A1111_NAMES["restart"] == "Restart"
    assert spec.stochastic and SAMPLER_SCHEDULES["restart"] == ("euler", True)
    assert torch.equal(spec.schedule(20).sigmas, schedule_for("euler_karras", 20).sigmas)
    check_sampler("exponential", "restart")  # A1111 takes any schedule type (and, from 20 steps, only its ends)


# --------------------------------------------------------------------------------------------- Restart: statistics

def through_gaussian(spec, sig, n: int):
    """n samples of N(MU, C^2) data noised to sig[0] through the sampler with the exact denoiser (seeded), the same
    with the sampler's noise dropped, and the standard error of a std / true std."""
    g = torch.Generator().manual_seed(11)
    x = MU + (C ** 2 + sig[0].item() ** 2).sqrt() * torch.randn(n, 8, generator=g, dtype=torch.float64)
    out = spec(gaussian_denoiser(MU), x, sig, disable=True, generator=g)
    broken = spec(gaussian_denoiser(MU), x, sig, disable=True, noise_sampler=lambda a, b: torch.zeros_like(x))
    return out, broken, 1 / math.sqrt(2 * (n - 1))


@pytest.mark.parametrize("steps,bias", [(20, 0.025), (40, 0.01), (100, 0.002)])
def test_restart_gaussian_statistics(steps, bias):
    """On N(MU, C^2) data with the exact denoiser: the chain's exact std (linear chain, probe columns) within the
    discretisation bias of C; 20000 samples agree with it; the restart noise dropped is far off."""
    n = 20000
    spec = SAMPLERS["restart"]
    sig = spec.schedule(steps).sigmas
    exact = chain_std(spec, sig, {})
    assert ((exact / C - 1).abs() < bias).all(), exact / C - 1
    out, broken, se = through_gaussian(spec, sig, n)
    assert ((out.mean(0) - MU).abs() < 4.5 * exact / math.sqrt(n)).all()
    assert ((out.std(0) / exact - 1).abs() < 4.5 * se).all()
    assert ((broken.std(0) / exact - 1).abs() > 10 * se).any()


# --------------------------------------------------------------------------------------------- CFG, fused

@pytest.mark.parametrize("name,steps,n_calls", [("plms", 6, 7), ("restart", 6, 11), ("restart", 20, 39)])
def test_cfg_every_model_call_goes_through_cfg_step(name, steps, n_calls):
    """Guided: each batched model call goes into one fused cfg_step (the restart noise included in one of them); the
    result equals the unfused loop's (guidance first, then the update)."""
    from test_samplers import _cfg_setup, fused_and_unfused

    x, cond, uncond = _cfg_setup(B=2)
    spec = SAMPLERS[name]
    got = fused_and_unfused(spec, spec.schedule(steps), x, cond, uncond)
    _, unet, cfg_calls = got["fused"]
    assert unet.batches == [4] * n_calls and cfg_calls == [True] * n_calls
    assert got["fused"][1].ts == got["unfused"][1].ts
    assert rel_err(got["fused"][0], got["unfused"][0]) < 1e-12


# --------------------------------------------------------------------------------------------- DPM fast / adaptive: oracle

class KDiffPIDStepSizeController:
    """Test oracle: k-diffusion's PIDStepSizeController (crowsonkb/k-diffusion k_diffusion/sampling.py), transcribed."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def limiter(self, x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self.limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def kdiff_get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """Test oracle: k-diffusion's get_ancestral_step (with eta), transcribed."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


class KDiffDPMSolver:
    """Test oracle: k-diffusion's DPMSolver (its dpm_solver_{1,2,3}_step, dpm_solver_fast, dpm_solver_adaptive),
    transcribed; the only changes: ts' linspace and the adaptive atol / rtol keep t_start's dtype (float64 in the
    tight tests, where k-diffusion under A1111 gets float32 scalars from its Python-float sigma_min / sigma_max and
    builds float32 atol / rtol; see the float32 test)."""

    def __init__(self, model, extra_args=None, eps_callback=None, info_callback=None):
        self.model = model
        self.extra_args = {} if extra_args is None else extra_args
        self.eps_callback = eps_callback
        self.info_callback = info_callback

    def t(self, sigma):
        return -sigma.log()

    def sigma(self, t):
        return t.neg().exp()

    def eps(self, eps_cache, key, x, t, *args, **kwargs):
        if key in eps_cache:
            return eps_cache[key], eps_cache
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma, *args, **self.extra_args, **kwargs)) / self.sigma(t)
        if self.eps_callback is not None:
            self.eps_callback()
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        x_1 = x - self.sigma(t_next) * h.expm1() * eps
        return x_1, eps_cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, 'eps_r1', u1, s1)
        x_2 = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        return x_2, eps_cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, 'eps_r1', u1, s1)
        u2 = x - self.sigma(s2) * (r2 * h).expm1() * eps - self.sigma(s2) * (r2 / r1) * (
            (r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        eps_r2, eps_cache = self.eps(eps_cache, 'eps_r2', u2, s2)
        x_3 = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        return x_3, eps_cache

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta=0., s_noise=1., noise_sampler=None):
        if not t_end > t_start and eta:
            raise ValueError('eta must be 0 for reverse sampling')

        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device, dtype=t_start.dtype)

        if nfe % 3 == 0:
            orders = [3] * (m - 2) + [2, 1]
        else:
            orders = [3] * (m - 1) + [nfe % 3]

        for i in range(len(orders)):
            eps_cache = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = kdiff_get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.

            eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
            denoised = x - self.sigma(t) * eps
            if self.info_callback is not None:
                self.info_callback({'x': x, 'i': i, 't': ts[i], 't_up': t, 'denoised': denoised})

            if orders[i] == 1:
                x, eps_cache = self.dpm_solver_1_step(x, t, t_next_, eps_cache=eps_cache)
            elif orders[i] == 2:
                x, eps_cache = self.dpm_solver_2_step(x, t, t_next_, eps_cache=eps_cache)
            else:
                x, eps_cache = self.dpm_solver_3_step(x, t, t_next_, eps_cache=eps_cache)

            x = x + su * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))

        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.,
                            icoeff=1., dcoeff=0., accept_safety=0.81, eta=0., s_noise=1., noise_sampler=None):
        if order not in {2, 3}:
            raise ValueError('order should be 2 or 3')
        forward = t_end > t_start
        if not forward and eta:
            raise ValueError('eta must be 0 for reverse sampling')
        h_init = abs(h_init) * (1 if forward else -1)
        atol = torch.tensor(atol, dtype=t_start.dtype)
        rtol = torch.tensor(rtol, dtype=t_start.dtype)
        s = t_start
        x_prev = x
        accept = True
        pid = KDiffPIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}

        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            eps_cache = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                sd, su = kdiff_get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.

            eps, eps_cache = self.eps(eps_cache, 'eps', x, s)
            denoised = x - self.sigma(s) * eps

            if order == 2:
                x_low, eps_cache = self.dpm_solver_1_step(x, s, t_, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_2_step(x, s, t_, eps_cache=eps_cache)
            else:
                x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_3_step(x, s, t_, eps_cache=eps_cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            accept = pid.propose_step(error)
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                info['n_accept'] += 1
            else:
                info['n_reject'] += 1
            info['nfe'] += order
            info['steps'] += 1

            if self.info_callback is not None:
                self.info_callback({'x': x, 'i': info['steps'] - 1, 't': s, 't_up': s, 'denoised': denoised,
                                    'error': error, 'h': pid.h, **info})

        return x, info


def kdiff_sample_dpm_fast(model, x, sigma_min, sigma_max, n, eta, noise_sampler, dtype=torch.float64):
    """Test oracle: k-diffusion's sample_dpm_fast (no tqdm/callback), scalars in `dtype`."""
    solver = KDiffDPMSolver(model)
    return solver.dpm_solver_fast(x, solver.t(torch.tensor(sigma_max, dtype=dtype)),
                                  solver.t(torch.tensor(sigma_min, dtype=dtype)), n, eta, 1., noise_sampler)


def kdiff_sample_dpm_adaptive(model, x, sigma_min, sigma_max, eta, noise_sampler, order=3, dtype=torch.float64):
    """Test oracle: k-diffusion's sample_dpm_adaptive with its defaults (return_info), scalars in `dtype`."""
    solver = KDiffDPMSolver(model)
    return solver.dpm_solver_adaptive(x, solver.t(torch.tensor(sigma_max, dtype=dtype)),
                                      solver.t(torch.tensor(sigma_min, dtype=dtype)), order, eta=eta,
                                      noise_sampler=noise_sampler)


def _dpm_setup(steps, strength=1.0):
    """The dpm_fast schedule (img2img: its tail), FakeUNet denoiser, start x, 200 noise draws, a call recorder."""
    sched = schedule_for("dpm_fast", steps)
    sched = sched.tail(sched.img2img_start(strength))
    sig = sched.sigmas
    den = EpsDenoiser(FakeUNet(), alphas_cumprod())  # no schedule: every sigma gets the log-interpolated timestep
    g = torch.Generator().manual_seed(21)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * sig[0].item()
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(200)]
    calls = []

    def model(x, sigma):  # the oracle passes a (B,) sigma, fastsd a 0-d one
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        calls.append(s)
        return den(x, s)

    return sig, x, noises, model, calls


def _flat(pairs):
    return [v for p in pairs for v in p]


def _stream(noises, asked):
    it = iter(noises)
    return lambda a, b: asked.append((float(a), float(b))) or next(it)


def _run_both(name, steps, eta, strength=1.0, order=3, dtype=torch.float64):
    sig, x, noises, model, calls = _dpm_setup(steps, strength)
    smin, smax = sig[sig > 0][-1].item(), sig[0].item()
    ref_asked, asked = [], []
    if name == "dpm_fast":
        ref = kdiff_sample_dpm_fast(model, x, smin, smax, len(sig) - 1, eta, _stream(noises, ref_asked), dtype)
        info = None
    else:
        ref, info = kdiff_sample_dpm_adaptive(model, x, smin, smax, eta, _stream(noises, ref_asked), order, dtype)
    ref_calls = list(calls)
    calls.clear()
    seen = []
    opts = {"order": order} if name == "dpm_adaptive" else {}
    out = SAMPLERS[name](model, x, sig, disable=True, eta=eta, noise_sampler=_stream(noises, asked),
                         callback=lambda d: seen.append((d["i"], float(d["sigma"]))), **opts)
    return out, ref, calls, ref_calls, asked, ref_asked, seen, info


DPM_ERRORS: dict = {}  # the largest relative error seen per case, printed with -s


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 1.0), (10, 1.0),
                                            (20, 1.0), (31, 1.0), (20, 0.6), (10, 0.3)])
def test_dpm_fast_matches_k_diffusion(steps, strength, eta):
    """The same model calls at the same sigmas (to ~1e-15), floor(n/3) + 1 steps with n calls, the same noise draws
    (k-diffusion also draws one for its last step, times su = 0: fastsd skips it), the same result (observed
    <= 2e-15 relative in float64)."""
    out, ref, calls, ref_calls, asked, ref_asked, seen, _ = _run_both("dpm_fast", steps, eta, strength)
    n = len(calls)
    assert n == len(ref_calls) and calls == pytest.approx(ref_calls, rel=1e-13)
    m = n // 3 + 1
    assert [i for i, _ in seen] == list(range(m)) and seen[0][1] == pytest.approx(calls[0], rel=1e-13)
    assert len(asked) == (m - 1 if eta else 0) and len(ref_asked) == m
    assert _flat(asked) == pytest.approx(_flat(ref_asked[:len(asked)]), rel=1e-13)
    err = rel_err(out, ref)
    DPM_ERRORS[("dpm_fast", steps, strength, eta)] = err
    assert err < 1e-12


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("order", [3, 2])
@pytest.mark.parametrize("steps,strength", [(20, 1.0), (20, 0.5)])
def test_dpm_adaptive_matches_k_diffusion(steps, strength, order, eta):
    """The same attempts (accepted and rejected: the same model calls at the same sigmas), the same noise draws on
    the accepted steps (k-diffusion's last one times su = 0, skipped here), the same result (observed <= 3e-15
    relative in float64); the callback once per attempt."""
    out, ref, calls, ref_calls, asked, ref_asked, seen, info = _run_both("dpm_adaptive", steps, eta, strength, order)
    assert len(calls) == len(ref_calls) == info["nfe"] and calls == pytest.approx(ref_calls, rel=1e-12)
    if (strength, order, eta) == (1.0, 3, 1.0):
        assert info["n_reject"] > 0  # this run exercises a rejection
    assert [i for i, _ in seen] == list(range(info["steps"]))
    assert len(asked) == (info["n_accept"] - 1 if eta else 0) and len(ref_asked) == info["n_accept"]
    assert _flat(asked) == pytest.approx(_flat(ref_asked[:len(asked)]), rel=1e-12)
    err = rel_err(out, ref)
    DPM_ERRORS[("dpm_adaptive", steps, strength, order, eta)] = err
    assert err < 1e-12


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_dpm_fast_adaptive_match_k_diffusion_with_float32_scalars(name):
    """As A1111 runs k-diffusion: sigma_min / sigma_max as Python floats, so its t grid, step sizes, atol and rtol
    are float32 (fastsd's float64): the same steps, the levels within float32 rounding (adaptive: accumulated over
    its steps, observed 2.7e-6), the results close (observed 4e-8 / 3e-7)."""
    out, ref, calls, ref_calls, *_ = _run_both(name, 20, 1.0, dtype=torch.float32)
    assert len(calls) == len(ref_calls) and calls == pytest.approx(ref_calls, rel=1e-6 if name == "dpm_fast" else 1e-5)
    err = rel_err(out, ref)
    DPM_ERRORS[(name, "float32 scalars")] = err
    assert err < 1e-5


def test_dpm_adaptive_error_norms_over_the_whole_batch():
    """k-diffusion's error is one RMS over the batch: running two images together takes other steps than running
    each alone (so a batch's images differ from the same seeds run one by one)."""
    sig, x, _, model, calls = _dpm_setup(20)
    x = torch.cat([x[:1], x[1:] * 1e-3])  # a second image far from the first
    together = SAMPLERS["dpm_adaptive"](model, x, sig, disable=True, eta=0.0)
    n_together = len(calls)
    calls.clear()
    alone = SAMPLERS["dpm_adaptive"](model, x[:1], sig, disable=True, eta=0.0)
    assert len(calls) != n_together and rel_err(together[:1], alone) > 1e-6


def test_dpm_fast_adaptive_callback_counts_and_progress():
    """dpm_fast: one callback per step (floor(n/3) + 1 of them), "nfe" reaching n and "progress" 1 at the last;
    dpm_adaptive: one per attempt, i past len(sigmas) - 1 on a short schedule (its steps are its own), "progress"
    non-decreasing to ~1 (the pipeline's step counter, i + 1 over len(schedule), would run past its total)."""
    sig, x, _, model, _ = _dpm_setup(20)
    seen = []
    SAMPLERS["dpm_fast"](model, x, sig, disable=True, eta=0.0, callback=lambda d: seen.append(
        (d["i"], d["nfe"], d["progress"])))
    assert [i for i, _, _ in seen] == list(range(7)) and seen[-1][1:] == (20, 1.0)
    sig4, x4, _, model4, calls = _dpm_setup(4)
    seen, info = [], {}
    SAMPLERS["dpm_adaptive"](model4, x4, sig4, disable=True, eta=0.0, info=info, callback=lambda d: seen.append(
        (d["i"], d["nfe"], d["progress"], d["accepted"])))
    assert [d[0] for d in seen] == list(range(info["steps"])) and info["steps"] > len(sig4) - 1
    assert len(calls) == info["nfe"] == seen[-1][1] and seen[-1][3]
    progress = [d[2] for d in seen]
    assert progress == sorted(progress) and progress[-1] > 1 - 1e-5


def test_dpm_fast_orders_and_levels():
    from fastsd.samplers import dpm_fast_orders

    assert dpm_fast_orders(1) == [1] and dpm_fast_orders(2) == [2] and dpm_fast_orders(3) == [2, 1]
    assert dpm_fast_orders(20) == [3] * 6 + [2] and dpm_fast_orders(21) == [3] * 6 + [2, 1]
    assert all(sum(dpm_fast_orders(n)) == n for n in range(1, 60))
    sched = schedule_for("dpm_fast", 20)  # the table's ends, then 0
    table = sigma_table()
    assert sched.sigmas[0].item() == float(table[-1]) and sched.sigmas[-2].item() == float(table[0])
    assert sched.sigmas[-1].item() == 0.0 and len(sched) == 20


def test_dpm_fast_adaptive_registry_and_schedule_types():
    for name, label, alias in (("dpm_fast", "DPM fast", "k_dpm_fast"), ("dpm_adaptive", "DPM adaptive", "k_dpm_ad")):
        spec = get_sampler(label)
        assert spec is SAMPLERS[name] is get_sampler(alias) is get_sampler(f"sample_{name}")
        assert A1111_NAMES[name] == label and spec.stochastic and SAMPLER_SCHEDULES[name] == ("ends", False)
        assert torch.equal(spec.schedule(12).sigmas, schedule_for("euler", 12).sigmas)
        check_sampler("automatic", name)
        with pytest.raises(ValueError, match=f"does not apply to {name}: it takes only the schedule's ends"):
            check_sampler("karras", name)


# --------------------------------------------------------------------------------------------- DPM fast / adaptive: statistics

@pytest.mark.parametrize("steps,bias", [(20, 0.015), (60, 0.002)])
def test_dpm_fast_gaussian_statistics(steps, bias):
    """On N(MU, C^2) data with the exact denoiser the sampler ends at sigma_min: the target law is N(MU, C^2 +
    sigma_min^2). The chain's exact std (probe columns) within the discretisation bias; 20000 samples agree with
    it; without the noise far off."""
    n = 20000
    spec = SAMPLERS["dpm_fast"]
    sig = spec.schedule(steps).sigmas
    target = (C ** 2 + sig[-2].item() ** 2).sqrt()
    exact = chain_std(spec, sig, {})
    DPM_ERRORS[("dpm_fast gaussian bias", steps)] = (exact / target - 1).abs().max().item()
    assert ((exact / target - 1).abs() < bias).all(), exact / target - 1
    out, broken, se = through_gaussian(spec, sig, n)
    assert ((out.mean(0) - MU).abs() < 4.5 * exact / math.sqrt(n)).all()
    assert ((out.std(0) / exact - 1).abs() < 4.5 * se).all()
    assert ((broken.std(0) / target - 1).abs() > 10 * se).any()


def test_dpm_adaptive_gaussian_statistics():
    """The adaptive chain's steps depend on the data (the batch's error): on the probe columns (their own steps,
    linear given those) the exact std is within its bias of N(MU, C^2 + sigma_min^2) (measured: 2.7% with the
    defaults in 7 steps, 0.26% with rtol 0.01, atol 0.001 in 11); 20000 samples' mean and std within 4.5
    standard errors plus 1% of it (their own steps: 11); without the noise far off."""
    n = 20000
    spec = SAMPLERS["dpm_adaptive"]
    sig = spec.schedule(20).sigmas
    target = (C ** 2 + sig[-2].item() ** 2).sqrt()
    for opts, bias in (({}, 0.035), ({"rtol": 0.01, "atol": 0.001}, 0.004)):
        exact = chain_std(spec, sig, opts)
        DPM_ERRORS[("dpm_adaptive gaussian bias", str(opts))] = (exact / target - 1).abs().max().item()
        assert ((exact / target - 1).abs() < bias).all(), exact / target - 1
    g = torch.Generator().manual_seed(12)
    s0 = sig[0].item()
    x = MU + (C ** 2 + s0 ** 2).sqrt() * torch.randn(n, 8, generator=g, dtype=torch.float64)
    info = {}
    out = spec(gaussian_denoiser(MU), x, sig, disable=True, generator=g, info=info)
    se = 1 / math.sqrt(2 * (n - 1))
    DPM_ERRORS[("dpm_adaptive gaussian std", info["n_accept"])] = (out.std(0) / target - 1).abs().max().item()
    assert ((out.mean(0) - MU).abs() < 4.5 * target / math.sqrt(n)).all()
    assert ((out.std(0) / target - 1).abs() < 0.01 + 4.5 * se).all(), out.std(0) / target
    broken = spec(gaussian_denoiser(MU), x, sig, disable=True, noise_sampler=lambda a, b: torch.zeros_like(x))
    assert ((broken.std(0) / target - 1).abs() > 10 * se).any()


def test_dpm_fast_adaptive_fused_cfg_equals_unfused():
    """Guided: every batched model call goes into one fused cfg_step; the result equals the unfused loop's."""
    from test_samplers import _cfg_setup, fused_and_unfused

    x, cond, uncond = _cfg_setup(B=2)
    for name, n_calls in (("dpm_fast", 10), ("dpm_adaptive", None)):
        spec = SAMPLERS[name]
        got = fused_and_unfused(spec, spec.schedule(10), x, cond, uncond)
        _, unet, cfg_calls = got["fused"]
        assert set(unet.batches) == {4} and cfg_calls == [True] * len(unet.batches)
        assert n_calls is None or len(unet.batches) == n_calls
        assert len(unet.batches) == len(got["unfused"][1].batches)
        assert rel_err(got["fused"][0], got["unfused"][0]) < 1e-12


def test_dpm_errors_report():
    """Prints the oracle errors gathered above (run with -s)."""
    for k, v in sorted(DPM_ERRORS.items(), key=str):
        print("DPM", k, f"{v:.2e}")


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_pipeline_progress_of_the_dpm_solvers(name):
    """Pipeline.generate's on_step counts their progress (the solver's fraction of the way) against the schedule's
    steps: never past the total, the last call at the total (its preview made)."""
    import fastsd

    pipe = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    seen = []
    im = pipe.generate("a cat", steps=4, width=64, height=64, seed=1, sampler=name, guidance_scale=1.0,
                       progress=False, on_step=lambda step, total, preview: seen.append((step, total, preview)))[0]
    assert im.size == (64, 64) and seen
    assert all(1 <= step <= total == 4 for step, total, _ in seen)
    assert [s for s, _, _ in seen] == sorted(s for s, _, _ in seen)
    assert seen[-1][0] == 4 and seen[-1][2] is not None


# --------------------------------------------------------------------------------------------- DDIM CFG++: A1111

def a1111_ddim_cfgpp(unet, noise, timesteps, cond, uncond, scale, eta=0.0, draws=None):
    """Test oracle: A1111's sd_samplers_timesteps_impl.ddim_cfgpp with its CFG denoiser for timestep samplers
    (eps out; cond_scale * cond_scale_miltiplier 1/12.5; last_noise_uncond the uncond eps), transcribed in float64
    over the model's float32 alphas_cumprod. `timesteps` ascending, as A1111's; `draws` the standard normals it
    takes with randn_like, one a step."""
    ac = alphas_cumprod().double()
    t = torch.as_tensor(timesteps, dtype=torch.long)
    alphas = ac[t]
    alphas_prev = ac[torch.nn.functional.pad(t[:-1], pad=(1, 0))]
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    x = noise.clone()
    for i in range(len(t)):
        index = len(t) - 1 - i
        ts = torch.full((x.shape[0],), float(t[index]), dtype=torch.float64)
        out = unet(torch.cat([x, x]), torch.cat([ts, ts]), context=torch.cat([uncond, cond]))
        e_u, e_c = out.chunk(2)
        e_t = e_u + (e_c - e_u) * (scale / 12.5)
        a_t, a_prev, sigma_t = alphas[index], alphas_prev[index], sigmas[index]
        pred_x0 = (x - sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_u
        x = a_prev.sqrt() * pred_x0 + dir_xt + (sigma_t * draws[i] if draws is not None else 0)
    return x


def _cfgpp_setup(B=2):
    g = torch.Generator().manual_seed(41)
    noise = torch.randn((B, 4, 8, 8), generator=g, dtype=torch.float64)
    cond, uncond = (torch.randn(1, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return noise, cond.expand(B, -1, -1), uncond.expand(B, -1, -1)


@pytest.mark.parametrize("steps,scale,eta", [(1, 7.5, 0.0), (4, 7.5, 0.0), (10, 3.0, 0.0), (25, 12.5, 0.0),
                                             (10, 7.5, 0.6), (20, 5.0, 1.0)])
def test_ddim_cfgpp_matches_a1111(steps, scale, eta):
    """fastsd's sigma-space step (a = s_down/s, b = 1, c = -a on the uncond x0, d = s_up) is A1111's VP-space
    DDIM CFG++ loop on the same timesteps, model and normal draws: the final latents (observed <= 7.5e-8 apart)."""
    from fastsd.denoisers import CFGDenoiser

    noise, cond, uncond = _cfgpp_setup()
    sched = SAMPLERS["ddim_cfgpp"].schedule(steps)
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    ref = a1111_ddim_cfgpp(FakeUNet(), noise, sched.timesteps.flip(0).long().tolist(), cond, uncond, scale, eta, draws)
    it = iter(draws)
    model = CFGDenoiser(EpsDenoiser(FakeUNet(), alphas_cumprod(), schedule=sched), cond, uncond, scale)
    seen = []
    out = SAMPLERS["ddim_cfgpp"](model, noise * sched.init_noise_sigma, sched.sigmas, disable=True, eta=eta,
                                  noise_sampler=lambda s, sn: next(it), callback=lambda d: seen.append(d["denoised"]))
    left = len(list(it))
    assert left == (steps if eta == 0 else 0)  # with eta, a draw every step, the last (to t = 0's level) included
    assert len(seen) == steps
    assert rel_err(out * sched.out_scale, ref) < 1e-6  # (fastsd's sigmas come from float32 arithmetic: ~1e-8 apart)
    plain = SAMPLERS["ddim"](model, noise * sched.init_noise_sigma, sched.sigmas, disable=True, eta=eta,
                              noise_sampler=lambda s, sn: draws[0])
    assert rel_err(plain * sched.out_scale, ref) > 1e-4  # CFG++ is not DDIM with the same scale


def test_ddim_cfgpp_unguided_is_ddim_and_guided_runs_both_branches_once_a_step():
    """Guidance scale <= 1 (no uncond): plain DDIM steps, bit for bit. Guided: one batched UNet call a step."""
    from fastsd.denoisers import CFGDenoiser

    noise, cond, uncond = _cfgpp_setup()
    sched = SAMPLERS["ddim_cfgpp"].schedule(6)
    outs = {}
    for name in ("ddim", "ddim_cfgpp"):
        model = CFGDenoiser(EpsDenoiser(FakeUNet(), alphas_cumprod(), schedule=sched), cond, None, 1.0)
        outs[name] = SAMPLERS[name](model, noise * sched.init_noise_sigma, sched.sigmas, disable=True)
    assert torch.equal(outs["ddim"], outs["ddim_cfgpp"])
    unet = FakeUNet()
    model = CFGDenoiser(EpsDenoiser(unet, alphas_cumprod(), schedule=sched), cond, uncond, 7.5)
    SAMPLERS["ddim_cfgpp"](model, noise * sched.init_noise_sigma, sched.sigmas, disable=True)
    assert unet.batches == [4] * 6


def test_ddim_cfgpp_needs_the_split_a_model_without_it_steps_as_ddim():
    """CFG++ needs the two branches (`split_guidance`, which CFGDenoiser and the wrappers the pipeline puts around it
    forward): a plain callable giving only the guided x0 is stepped as DDIM, bit for bit."""
    from fastsd.denoisers import CFGDenoiser

    noise, cond, uncond = _cfgpp_setup()
    sched = SAMPLERS["ddim_cfgpp"].schedule(6)
    model = CFGDenoiser(EpsDenoiser(FakeUNet(), alphas_cumprod(), schedule=sched), cond, uncond, 7.5)
    opaque = lambda x, sigma, **kw: model(x, sigma, **kw)  # noqa: E731
    x = noise * sched.init_noise_sigma
    a, b = (SAMPLERS[n](opaque, x, sched.sigmas, disable=True) for n in ("ddim_cfgpp", "ddim"))
    assert torch.equal(a, b) and not torch.equal(a, SAMPLERS["ddim_cfgpp"](model, x, sched.sigmas, disable=True))


def test_ddim_cfgpp_in_the_pipeline_and_its_infotext():
    """Pipeline.generate with A1111's name: "Sampler: DDIM CFG++" in the infotext (read back as the sampler), the
    image not DDIM's at CFG 7.5, DDIM's at CFG 1 (no uncond: plain DDIM steps); a schedule type is refused."""
    import numpy as np

    from fastsd import load_pipeline
    from fastsd.infotext_settings import settings_from_infotext

    pipe = load_pipeline("random:tiny", device="cpu", dtype=torch.float32)
    base = dict(prompt="a red cube", steps=4, seed=5, width=64, height=64, progress=False)
    img = {(n, cfg): np.asarray(im) for n in ("DDIM CFG++", "ddim") for cfg in (7.5, 1.0)
           for im in [pipe.generate(**base, sampler=n, guidance_scale=cfg)[0]]}
    assert not np.array_equal(img["DDIM CFG++", 7.5], img["ddim", 7.5])
    assert np.array_equal(img["DDIM CFG++", 1.0], img["ddim", 1.0])
    text = pipe.generate(**base, sampler="DDIM CFG++")[0].info["parameters"]
    assert "Sampler: DDIM CFG++, Schedule type: Automatic, CFG scale: 7.5" in text  # (A1111 1.10 writes Automatic)
    assert settings_from_infotext(text)[0]["sampler"] == "ddim_cfgpp"
    with pytest.raises(ValueError, match="discrete"):
        pipe.generate(**base, sampler="DDIM CFG++", schedule_type="karras")


def test_ddim_cfgpp_registry_and_schedule_types():
    assert get_sampler("DDIM CFG++") is get_sampler("ddim_cfgpp") is SAMPLERS["ddim_cfgpp"]
    assert A1111_NAMES["ddim_cfgpp"] == "DDIM CFG++" and SAMPLERS["ddim_cfgpp"].stochastic
    assert SAMPLER_SCHEDULES["ddim_cfgpp"] == ("ddim", False) and "ddim_cfgpp" in TIMESTEP_SAMPLERS
    assert torch.equal(get_sampler("DDIM CFG++").schedule(10).sigmas, schedule_for("ddim", 10).sigmas)
    with pytest.raises(ValueError, match="discrete"):
        check_sampler("karras", "ddim_cfgpp")


# --------------------------------------------------------------------------------------------- eta: k-diffusion

def _k_euler_ancestral(model, x, sigmas, noise_sampler, eta):
    """k-diffusion's sample_euler_ancestral (s_noise 1), transcribed."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        s_from, s_to = float(sigmas[i]), float(sigmas[i + 1])
        sigma_down, sigma_up = kdiff_get_ancestral_step(s_from, s_to, eta)
        x = x + (x - denoised) / s_from * (sigma_down - s_from)
        if s_to > 0:
            x = x + noise_sampler(s_from, s_to) * sigma_up
    return x


def _k_dpm_2_ancestral(model, x, sigmas, noise_sampler, eta):
    """k-diffusion's sample_dpm_2_ancestral (s_noise 1), transcribed."""
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        denoised = model(x, s)
        sigma_down, sigma_up = kdiff_get_ancestral_step(s, float(sigmas[i + 1]), eta)
        d = (x - denoised) / s
        if sigma_down == 0:
            x = x + d * (sigma_down - s)
        else:
            mid = math.exp(math.log(s) + 0.5 * (math.log(sigma_down) - math.log(s)))
            x_2 = x + d * (mid - s)
            d_2 = (x_2 - model(x_2, mid)) / mid
            x = x + d_2 * (sigma_down - s)
            x = x + noise_sampler(s, float(sigmas[i + 1])) * sigma_up
    return x


ETA_ORACLES = {  # fastsd sampler -> k-diffusion's loop with eta, transcribed: (model, x, sigmas, noise_sampler, eta)
    "euler_a": _k_euler_ancestral, "dpm2_a": _k_dpm_2_ancestral, "dpmpp_2s_a": kdiff_sample_dpmpp_2s_ancestral,
    "dpmpp_2m_sde_karras": lambda m, x, s, ns, eta: kdiff_sample_dpmpp_2m_sde(m, x, s, ns, "midpoint", eta),
    "dpmpp_2m_sde_heun_karras": lambda m, x, s, ns, eta: kdiff_sample_dpmpp_2m_sde(m, x, s, ns, "heun", eta),
    "dpmpp_3m_sde_karras": lambda m, x, s, ns, eta: kdiff_sample_dpmpp_3m_sde(m, x, s, ns, eta)}


@pytest.mark.parametrize("eta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("sampler", list(ETA_ORACLES))
def test_eta_is_k_diffusions(sampler, eta):
    """Euler a, DPM2 a, DPM++ 2S a, DPM++ 2M SDE (midpoint, Heun) and 3M SDE with A1111's eta are k-diffusion's
    loops with that eta, fed the same noise (each draw keyed by its step's sigmas, so a loop that draws at eta 0
    and one that doesn't see the same noise); Euler a at eta 0 is Euler. At eta 1 DPM2 a keeps its diffusers twin's
    float32 split (within 1e-6)."""
    sigmas = schedule_for(sampler, 10).sigmas.double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * float(sigmas[0])
    noise = {round(float(a), 9): torch.randn(SHAPE, generator=g, dtype=torch.float64) for a in sigmas}
    draw = lambda a, b: noise[round(float(a), 9)]  # noqa: E731
    den = gaussian_denoiser(MU)
    ours = SAMPLERS[sampler](den, x.clone(), sigmas, eta=eta, noise_sampler=draw, disable=True)
    bound = 1e-6 if (sampler, eta) == ("dpm2_a", 1.0) else 1e-10
    assert rel_err(ours, ETA_ORACLES[sampler](den, x.clone(), sigmas, draw, eta)) < bound
    if sampler == "euler_a" and eta == 0:
        assert rel_err(ours, SAMPLERS["euler"](den, x.clone(), sigmas, disable=True)) < 1e-12


# --------------------------------------------------------------------------------------------- churn: k-diffusion

def _k_churned(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise):
    """The head of k-diffusion's sample_euler / sample_heun / sample_dpm_2 steps, transcribed: (x, sigma_hat)."""
    s = float(sigmas[i])
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.
    eps = noise_sampler(s, float(sigmas[i + 1])) * s_noise
    sigma_hat = s * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - s ** 2) ** 0.5
    return x, sigma_hat


def _k_euler(model, x, sigmas, noise_sampler, *churn):
    """k-diffusion's sample_euler (s_churn, s_tmin, s_tmax, s_noise), transcribed."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _k_churned(x, sigmas, i, noise_sampler, *churn)
        d = (x - model(x, sigma_hat)) / sigma_hat
        x = x + d * (float(sigmas[i + 1]) - sigma_hat)
    return x


def _k_heun(model, x, sigmas, noise_sampler, *churn):
    """k-diffusion's sample_heun, transcribed."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _k_churned(x, sigmas, i, noise_sampler, *churn)
        d = (x - model(x, sigma_hat)) / sigma_hat
        s_next = float(sigmas[i + 1])
        dt = s_next - sigma_hat
        if s_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, s_next)) / s_next
            x = x + (d + d_2) / 2 * dt
    return x


def _k_dpm_2(model, x, sigmas, noise_sampler, *churn):
    """k-diffusion's sample_dpm_2, transcribed."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _k_churned(x, sigmas, i, noise_sampler, *churn)
        d = (x - model(x, sigma_hat)) / sigma_hat
        s_next = float(sigmas[i + 1])
        if s_next == 0:
            x = x + d * (s_next - sigma_hat)
        else:
            sigma_mid = math.exp(math.log(sigma_hat) + 0.5 * (math.log(s_next) - math.log(sigma_hat)))
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - model(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (s_next - sigma_hat)
    return x


CHURN_ORACLES = {"euler": _k_euler, "heun_karras": _k_heun, "dpm2_karras": _k_dpm_2}


@pytest.mark.parametrize("churn", [(0.5, 0.0, math.inf, 1.0), (40.0, 0.0, math.inf, 1.003), (1.0, 0.3, 4.0, 0.9)])
@pytest.mark.parametrize("sampler", list(CHURN_ORACLES))
def test_churn_is_k_diffusions(sampler, churn):
    """Euler, Heun and DPM2 with A1111's sigma churn / tmin / tmax / noise are k-diffusion's loops with them, fed the
    same noise (s_noise as fastsd.pipeline gives it: the noise sampler's scale): one draw every step, churned or not
    (the third case churns only the steps with sigma in [0.3, 4]; the second hits gamma's sqrt(2) - 1 cap). The
    churn changes the result; without it no noise is drawn and the result is the plain sampler's, bit for bit."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    sigmas = schedule_for(sampler, 10).sigmas.double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * float(sigmas[0])
    noise = {round(float(a), 9): torch.randn(SHAPE, generator=g, dtype=torch.float64) for a in sigmas}
    asked = []
    draw = lambda a, b: asked.append(float(a)) or noise[round(float(a), 9)]  # noqa: E731
    den = gaussian_denoiser(MU)
    ours = SAMPLERS[sampler](den, x.clone(), sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                             noise_sampler=lambda a, b: draw(a, b) * s_noise, disable=True)
    assert len(asked) == len(sigmas) - 1
    ref = CHURN_ORACLES[sampler](den, x.clone(), sigmas, draw, *churn)
    assert rel_err(ours, ref) < (1e-6 if sampler.startswith("dpm2") else 1e-10)
    plain = SAMPLERS[sampler](den, x.clone(), sigmas, disable=True)
    assert rel_err(ours, plain) > 1e-4
    asked.clear()
    unchurned = SAMPLERS[sampler](den, x.clone(), sigmas, s_churn=0.0, noise_sampler=draw, disable=True)
    assert not asked and torch.equal(unchurned, plain)
    assert rel_err(plain, CHURN_ORACLES[sampler](den, x.clone(), sigmas, draw, 0.0, 0.0, math.inf, 1.0)) < 1e-6
