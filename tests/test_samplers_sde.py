"""A1111's SDE samplers: DPM++ SDE (k-diffusion's sample_dpmpp_sde with its torchsde Brownian tree; diffusers'
DPMSolverSDEScheduler), DPM++ 2M SDE Heun and DPM++ 3M SDE (diffusers' DPMSolverMultistepScheduler twins;
k-diffusion's 3M SDE as a variant). Oracles: diffusers fed the same noise or seed, k-diffusion transcriptions (marked
as such) fed a fixed Brownian path, and the statistics of Gaussian data, whose exact denoiser is linear."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastsd.denoisers import EpsDenoiser
from fastsd.samplers import SAMPLERS, brownian_noise_sampler, dpmpp_3m_sde_coeffs, get_sampler
from fastsd.schedules import alphas_cumprod, schedule_for
from test_samplers import (SHAPE, FakeUNet, _a1111_karras, diffusers_loop, fastsd_loop, kdiff_get_ancestral_step,
                           make_scheduler, rel_err)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

def twin_opts(name: str) -> dict:
    """The diffusers twin's math: for 3M SDE its variant (fastsd's default is k-diffusion's, sample_dpmpp_3m_sde)."""
    return {"variant": "diffusers"} if name.startswith("dpmpp_3m_sde") else {}


NEW = ["dpmpp_sde", "dpmpp_sde_karras", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_karras", "dpmpp_3m_sde",
       "dpmpp_3m_sde_karras"]


# --------------------------------------------------------------------------------------------- diffusers parity

@pytest.mark.parametrize("name", ["dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_karras", "dpmpp_3m_sde",
                                  "dpmpp_3m_sde_karras"])
@pytest.mark.parametrize("steps", [3, 4, 10, 14, 15, 25])
def test_diffusers_parity_same_generator(name, steps):
    """One seeded generator for the start noise and every step's noise (diffusers draws fp32 randn in step()):
    the same timesteps and the same final latents as DPMSolverMultistepScheduler with solver_type="heun" /
    solver_order=3. 14 and 15 steps straddle diffusers' lower-order next-to-last step (3M below 15 steps)."""
    g_ref, g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    noise_ref = torch.randn(SHAPE, generator=g_ref, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    ref, ref_ts = diffusers_loop(name, steps, noise_ref, generator=g_ref)
    out, ts = fastsd_loop(name, steps, noise, generator=g, opts=twin_opts(name))
    assert ts == ref_ts
    assert rel_err(out, ref) < 3e-6  # observed <= 1e-6 (diffusers steps in float32)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde_heun_karras", "dpmpp_3m_sde"])
def test_diffusers_parity_variance_noise(name):
    """The noise handed to diffusers as variance_noise, to fastsd through noise_sampler: same result."""
    steps = 12
    g = torch.Generator().manual_seed(3)
    start = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(steps)]
    it = iter(noises)
    sched = make_scheduler(name)
    sched.set_timesteps(steps)
    unet = FakeUNet()
    lat = start * sched.init_noise_sigma
    for t, z in zip(sched.timesteps, noises):
        lat = sched.step(unet(sched.scale_model_input(lat, t), t), t, lat, variance_noise=z).prev_sample
    out, _ = fastsd_loop(name, steps, start, opts={"noise_sampler": lambda s, sn: next(it), **twin_opts(name)})
    assert rel_err(out, lat) < 3e-6


@pytest.mark.parametrize("name,steps,strength", [("dpmpp_3m_sde", 20, 0.8), ("dpmpp_3m_sde_karras", 10, 0.6),
                                                  ("dpmpp_2m_sde_heun", 20, 0.5), ("dpmpp_2m_sde_heun_karras", 10, 0.6)])
def test_diffusers_img2img_parity(name, steps, strength):
    """img2img: the partial schedule restarts the multistep warm-up, as diffusers' does. (3M's lower-order
    next-to-last step looks at the partial schedule's length here, at the full one in diffusers: the cases here
    have both on the same side of 15; 20 steps at strength 0.5 would not match.)"""
    g = torch.Generator().manual_seed(3)
    init, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    g_ref, g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref, ref_ts = diffusers_loop(name, steps, noise, strength=strength, init=init, generator=g_ref)
    out, ts = fastsd_loop(name, steps, noise, strength=strength, init=init, generator=g, opts=twin_opts(name))
    assert ts == ref_ts and len(ts) == int(steps * strength) + 1  # (A1111's img2img steps)
    assert rel_err(out, ref) < 3e-6


def _dpmsolver_sde(karras: bool, steps: int, seed: int):
    import diffusers

    from test_samplers import SD15
    sched = diffusers.DPMSolverSDEScheduler.from_config(SD15, use_karras_sigmas=karras, noise_sampler_seed=seed)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [1, 2, 4, 15, 30])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_sde_matches_diffusers_dpmsolver_sde(karras, steps):
    """diffusers' DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde with torchsde's Brownian tree, seeded by
    noise_sampler_seed) run over its own sigmas, and fastsd's sampler over the same sigmas with the Brownian noise
    of the same seed (an int: one tree over the batch, as diffusers'): the same model calls and final latents.
    (On its own schedules fastsd's Euler-schedule sigmas differ from DPMSolverSDE's by fp32 ulps, which the
    Brownian path turns into ~1e-4 differences: the Karras one matches to the bit.)"""
    sched = _dpmsolver_sde(karras, steps, seed=33)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(SHAPE, generator=g)
    unet = FakeUNet()
    lat = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        lat = sched.step(unet(sched.scale_model_input(lat, t), t), t, lat).prev_sample
    sig = torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]]).double() if steps > 1 else sched.sigmas[:2].double()
    if karras:
        assert torch.equal(sig, schedule_for("dpmpp_sde_karras", steps).sigmas)
    ours_unet = FakeUNet()
    den = EpsDenoiser(ours_unet, alphas_cumprod())  # its own sigma -> timestep (DPMSolverSDE's log interpolation)
    x = noise.double() * sig[0].item()
    out = SAMPLERS["dpmpp_sde"](den, x, sig, disable=True, noise_sampler=brownian_noise_sampler(x, sig, 33))
    assert len(ours_unet.ts) == len(unet.ts) == 2 * steps - 1
    assert np.allclose(ours_unet.ts, unet.ts, rtol=0, atol=2e-3)  # diffusers keeps its linspace timesteps
    assert rel_err(out, lat.double()) < 2e-6  # observed <= 5e-7 (diffusers steps in fp32)
    other = SAMPLERS["dpmpp_sde"](den, x, sig, disable=True, noise_sampler=brownian_noise_sampler(x, sig, 34))
    assert steps == 1 or rel_err(other, lat.double()) > 1e-3  # the seed matters (no noise on a one-step run)


def test_brownian_noise_per_image_seeds():
    """A list of seeds: one tree per image (A1111's create_noise_sampler), so image i's noise is that of its seed
    alone at batch 1, whatever the batch; an int seeds one tree over the whole batch (diffusers'). Unit variance,
    the increments of one path (noise(a, c) from noise(a, b) and noise(b, c)), the sign of the direction."""
    sig = schedule_for("dpmpp_sde_karras", 10).sigmas
    x = torch.zeros(3, 4, 16, 16)
    batch = brownian_noise_sampler(x, sig, [5, 6, 7])
    alone = brownian_noise_sampler(x[:1], sig, [6])
    a, b, c = (sig[i] for i in (0, 3, 6))
    assert torch.equal(batch(a, c)[1:2], alone(a, c))
    assert not torch.allclose(batch(a, c)[0], batch(a, c)[1])
    whole = brownian_noise_sampler(x, sig, 6)(a, c)  # its first image is seed 6's alone (so diffusers' int seed
    # gives A1111's noise at batch 1), the others follow on in that tree's draws
    assert whole.shape == x.shape and torch.equal(whole[:1], alone(a, c))
    assert not torch.allclose(whole[1], batch(a, c)[2]) and not torch.allclose(whole[1], whole[0])
    n_ab, n_bc, n_ac = batch(a, b), batch(b, c), batch(a, c)
    ab, bc = math.sqrt(a - b), math.sqrt(b - c)
    assert torch.allclose(n_ac, (n_ab * ab + n_bc * bc) / math.sqrt(a - c), atol=2e-5)
    assert torch.equal(batch(c, a), -n_ac)
    z = torch.cat([brownian_noise_sampler(x, sig, [s, s + 1, s + 2])(a, c) for s in range(0, 60, 3)])
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert x.dtype == batch(a, b).dtype and brownian_noise_sampler(x.double(), sig, 1)(a, b).dtype == torch.float64
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        brownian_noise_sampler(x, sig, [1, 2])


# --------------------------------------------------------------------------------------------- k-diffusion oracles

def kdiff_sample_dpmpp_sde(model, x, sigmas, noise_sampler, eta=1.0, r=0.5):
    """k-diffusion's sample_dpmpp_sde (s_noise 1), transcribed in its own form (log-sigma times, expm1, two
    ancestral half-steps, the second from x with (1 - fac) D + fac D2); a test oracle, not fastsd code."""
    s = sigmas.tolist()
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda sg: -math.log(sg))
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            d = (x - denoised) / s[i]
            x = x + d * (s[i + 1] - s[i])
        else:
            t, t_next = t_fn(s[i]), t_fn(s[i + 1])
            h = t_next - t
            s_ = t + h * r
            fac = 1 / (2 * r)
            sd, su = kdiff_get_ancestral_step(sigma_fn(t), sigma_fn(s_), eta)
            s_d = t_fn(sd)
            x_2 = (sigma_fn(s_d) / sigma_fn(t)) * x - math.expm1(t - s_d) * denoised
            x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s_)) * su
            denoised_2 = model(x_2, sigma_fn(s_))
            sd, su = kdiff_get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * denoised_d
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * su
    return x


def kdiff_sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler, solver_type="midpoint", eta=1.0):
    """k-diffusion's sample_dpmpp_2m_sde (s_noise 1), transcribed; a test oracle."""
    s = sigmas.tolist()
    old_denoised, h_last, h = None, None, None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            t, s_next = -math.log(s[i]), -math.log(s[i + 1])
            h = s_next - t
            eta_h = eta * h
            x = s[i + 1] / s[i] * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (denoised - old_denoised)
            x = x + noise_sampler(s[i], s[i + 1]) * s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
        old_denoised, h_last = denoised, h
    return x


def kdiff_sample_dpmpp_3m_sde(model, x, sigmas, noise_sampler, eta=1.0):
    """k-diffusion's sample_dpmpp_3m_sde (s_noise 1), transcribed; a test oracle."""
    s = sigmas.tolist()
    denoised_1 = denoised_2 = None
    h, h_1, h_2 = None, None, None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            t, s_next = -math.log(s[i]), -math.log(s[i + 1])
            h = s_next - t
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * (denoised - denoised_1) / r
            x = x + noise_sampler(s[i], s[i + 1]) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


class BrownianPath:
    """A fixed Brownian path W in time = sigma, given at the step sigmas and the midpoints sqrt(s s'), built from
    independent normals z1 (over (s, m)) and z2 (over (m, s')) per step; `noise(a, b)` = (W(b) - W(a)) /
    sqrt|b - a| as k-diffusion's BrownianTreeNoiseSampler returns, for grid points a, b (matched to 1e-6
    relative: fastsd asks at k-diffusion's fp32 sigma_fn(t) times, the transcription at float64 ones)."""

    def __init__(self, sigmas, shape, generator):
        s = sigmas.tolist()
        self.points, self.values = [s[0]], [torch.zeros(shape, dtype=torch.float64)]
        self.z = []
        for i in range(len(s) - 1):
            if s[i + 1] == 0:
                break
            m = math.sqrt(s[i] * s[i + 1])
            z1, z2 = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
            self.z += [z1, z2]
            self.points.append(m)
            self.values.append(self.values[-1] + math.sqrt(s[i] - m) * z1)
            self.points.append(s[i + 1])
            self.values.append(self.values[-1] + math.sqrt(m - s[i + 1]) * z2)
        self.calls = []

    def _w(self, sigma):
        sigma = float(sigma)
        hits = [j for j, p in enumerate(self.points) if abs(p - sigma) <= 1e-6 * p]
        assert len(hits) == 1, (sigma, hits)
        return self.values[hits[0]]

    def noise(self, a, b):
        self.calls.append((float(a), float(b)))
        return (self._w(b) - self._w(a)) / math.sqrt(abs(float(b) - float(a)))


def _kdiff_setup(sigmas, steps):
    sig = _a1111_karras(steps) if sigmas == "a1111_karras" else schedule_for(sigmas, steps).sigmas
    den = EpsDenoiser(FakeUNet(), alphas_cumprod())  # no schedule: every sigma gets the log-interpolated timestep
    g = torch.Generator().manual_seed(9)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * sig[0].item()
    calls = []
    model = lambda x, sigma: calls.append(float(sigma)) or den(x, sigma)  # noqa: E731
    return sig, x, g, model, calls


@pytest.mark.parametrize("sigmas", ["dpmpp_sde", "dpmpp_sde_karras", "a1111_karras"])
@pytest.mark.parametrize("steps", [1, 2, 4, 15])
def test_dpmpp_sde_matches_k_diffusion_on_a_brownian_path(sigmas, steps):
    """Both ask the noise sampler for (s, m) and (s, s') each step but the last, at the same times (fastsd at their
    fp32 roundings), and on one fixed Brownian path agree to rounding."""
    sig, x, g, model, calls = _kdiff_setup(sigmas, steps)
    path = BrownianPath(sig, SHAPE, g)
    ref = kdiff_sample_dpmpp_sde(model, x, sig, path.noise)
    n_ref, ref_calls, ref_noise = len(calls), list(calls), list(path.calls)
    calls.clear()
    path.calls.clear()
    out = SAMPLERS["dpmpp_sde"](model, x, sig, disable=True, noise_sampler=path.noise)
    assert len(calls) == n_ref == 2 * steps - 1
    assert np.allclose(calls, ref_calls, rtol=1e-12, atol=0)  # the same sigmas and midpoints
    assert len(path.calls) == len(ref_noise) == 2 * (steps - 1)
    assert np.allclose(path.calls, ref_noise, rtol=1e-6, atol=0)
    assert all(a == a2 and m < a and b < m for (a, m), (a2, b) in zip(path.calls[0::2], path.calls[1::2]))
    assert rel_err(out, ref) < 1e-6  # the increments divided by square roots of fp32 times (observed <= 1.3e-7)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpmpp_sde_eta_matches_k_diffusion_on_a_brownian_path(eta):
    """A1111's eta: k-diffusion's sample_dpmpp_sde with that eta (both ancestral half-steps split by it), on one
    fixed Brownian path, to rounding (eta 0: no noise asked for, the steps deterministic)."""
    sig, x, g, model, calls = _kdiff_setup("dpmpp_sde_karras", 8)
    path = BrownianPath(sig, SHAPE, g)
    ref = kdiff_sample_dpmpp_sde(model, x, sig, path.noise, eta=eta)
    out = SAMPLERS["dpmpp_sde_karras"](model, x, sig, disable=True, noise_sampler=path.noise, eta=eta)
    assert rel_err(out, ref) < 1e-6 and rel_err(out, SAMPLERS["dpmpp_sde_karras"](model, x, sig, disable=True,
                                                                                 noise_sampler=path.noise)) > 1e-3


def test_dpmpp_sde_asks_at_k_diffusions_fp32_times():
    """(sigma_fn(t), sigma_fn(t + h/2)) after the first model call and (sigma_fn(t), sigma_fn(t_next)) after the
    second, each time computed in fp32 as k-diffusion and diffusers do (t = -log(sigma)); none on the last step."""
    sig = schedule_for("dpmpp_sde_karras", 5).sigmas
    seen = []

    def ns(a, b):
        seen.append((a.item(), b.item()))
        return torch.zeros(SHAPE, dtype=torch.float64)

    den = EpsDenoiser(FakeUNet(), alphas_cumprod())
    SAMPLERS["dpmpp_sde"](den, torch.ones(SHAPE, dtype=torch.float64), sig, disable=True, noise_sampler=ns)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    expected = []
    for s, sn in zip(sig.tolist()[:4], sig.tolist()[1:5]):
        t, t_next = -f32(s).log(), -f32(sn).log()
        q, q_mid, q_next = (float((-v).exp()) for v in (t, t + (t_next - t) * 0.5, t_next))
        expected += [(q, q_mid), (q, q_next)]
    assert seen == expected


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_karras"])
@pytest.mark.parametrize("steps", [1, 4, 15])
def test_dpmpp_2m_sde_matches_k_diffusion(name, steps):
    """diffusers' 2M SDE (midpoint / heun) is k-diffusion's sample_dpmpp_2m_sde with eta 1 and that solver_type."""
    sig, x, g, model, calls = _kdiff_setup(name, steps)
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(steps)]
    it_ref, it = iter(noises), iter(noises)
    ref = kdiff_sample_dpmpp_2m_sde(model, x, sig, lambda a, b: next(it_ref),
                                    solver_type="heun" if "heun" in name else "midpoint")
    out = SAMPLERS[name](model, x, sig, disable=True, noise_sampler=lambda a, b: next(it))
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("sigmas", ["dpmpp_3m_sde", "dpmpp_3m_sde_karras", "a1111_karras"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 25])
def test_dpmpp_3m_sde_k_diffusion_variant_matches_k_diffusion(sigmas, steps):
    sig, x, g, model, calls = _kdiff_setup(sigmas, steps)
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(steps)]
    it_ref, it = iter(noises), iter(noises)
    ref = kdiff_sample_dpmpp_3m_sde(model, x, sig, lambda a, b: next(it_ref))
    out = SAMPLERS["dpmpp_3m_sde"](model, x, sig, disable=True, noise_sampler=lambda a, b: next(it),
                                   variant="k-diffusion")
    assert rel_err(out, ref) < 1e-12
    it = iter(noises)
    default = SAMPLERS["dpmpp_3m_sde"](model, x, sig, disable=True, noise_sampler=lambda a, b: next(it))
    assert torch.equal(default, out)  # k-diffusion's is the default
    if steps >= 4:  # a third-order step: the diffusers variant is another method
        it = iter(noises)
        dif = SAMPLERS["dpmpp_3m_sde"](model, x, sig, disable=True, noise_sampler=lambda a, b: next(it),
                                       variant="diffusers")
        assert rel_err(dif, ref) > 1e-4


def test_dpmpp_3m_sde_variants_differ_by_one_d2():
    """The documented difference: on a third-order step diffusers' update minus k-diffusion's is exactly -1 * D2,
    D2 = (D1_0 - D1_1)/(r0 + r1) = (D/r0 - D_prev (1/r0 + 1/r1) + D_prev2/r1)/(r0 + r1)."""
    for sp2, sp, s, sn in [(14.6, 9.7, 6.4, 4.1), (3.0, 2.9, 2.7, 2.0), (1.2, 0.5, 0.2, 0.03)]:
        dif = dpmpp_3m_sde_coeffs(sp2, sp, s, sn, "diffusers")
        kd = dpmpp_3m_sde_coeffs(sp2, sp, s, sn, "k-diffusion")
        h = math.log(s / sn)
        r0, r1 = math.log(sp / s) / h, math.log(sp2 / sp) / h
        d2 = (1 / r0, -(1 / r0 + 1 / r1), 1 / r1)
        assert dif[0] == kd[0] and dif[4] == kd[4]  # a, d
        for k in range(3):  # b, c1, c2
            assert dif[1 + k] - kd[1 + k] == pytest.approx(-d2[k] / (r0 + r1), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        dpmpp_3m_sde_coeffs(None, None, 1.0, 0.5, "a1111")


# --------------------------------------------------------------------------------------------- statistics

MU = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
C = torch.linspace(0.6, 1.6, 8, dtype=torch.float64)  # data std per dimension


def gaussian_denoiser(mu):
    def den(x, sigma, **_):
        """Exact E[x0 | x] for x0 ~ N(mu, C^2): mu + C^2/(C^2 + sigma^2) (x - mu)."""
        s2 = float(sigma) ** 2
        return mu + C ** 2 / (C ** 2 + s2) * (x - mu)
    return den


def chain_std(spec, sigmas, opts):
    """The exact output std of the sampler on N(MU, C^2) data started from the exact marginal at sigmas[0], every
    noise draw an independent standard normal (a Brownian sampler's: the increments of one Brownian path): the chain
    is linear, so the output is A x + sum_k B_k z_k + const; A and the B_k are read off one run on probe columns
    (x = 1 in column 0, normal k = 1 in column k)."""
    P = 4 * len(sigmas) + 2
    x = torch.zeros(P, 8, dtype=torch.float64)
    x[0] = 1.0
    k = [0]

    def fresh(a=None, b=None):
        k[0] += 1
        z = torch.zeros(P, 8, dtype=torch.float64)
        z[k[0]] = 1.0
        return z

    path = {}  # time -> W there, over the probe columns; the path grows downwards from the first time asked

    def increment(a, b):
        for t in (float(a), float(b)):
            if t not in path:
                low = min(path, default=None)
                assert low is None or t < low
                path[t] = torch.zeros(P, 8, dtype=torch.float64) if low is None else \
                    path[low] + math.sqrt(low - t) * fresh()
        return (path[float(b)] - path[float(a)]) / math.sqrt(abs(float(b) - float(a)))

    unit = increment if spec.brownian else fresh
    out = spec(gaussian_denoiser(torch.zeros(8, dtype=torch.float64)), x, sigmas, disable=True,
               noise_sampler=unit, **opts)
    assert 0 < k[0] < P - 1
    return (out[0] ** 2 * (C ** 2 + sigmas[0].item() ** 2) + (out[1:] ** 2).sum(0)).sqrt()


# (name, opts, steps, bias): the exact chain std is within `bias` (relative) of C at this step count (measured:
# dpmpp_sde 0.38% at 200 steps, its Karras 0.68% at 30, 2M SDE Heun 0.63% / 0.15%, 3M SDE k-diffusion 0.73% /
# 0.58%, diffusers' 3M SDE Karras 0.29% at 400)
STAT_CASES = [
    ("dpmpp_sde", {}, 200, 0.006),
    ("dpmpp_sde_karras", {}, 30, 0.01),
    ("dpmpp_2m_sde_heun", {}, 60, 0.01),
    ("dpmpp_2m_sde_heun_karras", {}, 100, 0.005),
    ("dpmpp_3m_sde", {"variant": "k-diffusion"}, 100, 0.01),
    ("dpmpp_3m_sde_karras", {"variant": "k-diffusion"}, 30, 0.01),
    ("dpmpp_3m_sde_karras", {"variant": "diffusers"}, 400, 0.005),
]


@pytest.mark.parametrize("name,opts,steps,bias", STAT_CASES,
                         ids=[f"{c[0]}{'-' + c[1]['variant'] if c[1] else ''}-{c[2]}" for c in STAT_CASES])
def test_gaussian_statistics(name, opts, steps, bias):
    """20000 samples of 8-dim N(MU, C^2) data through the exact denoiser: the sample mean within 4.5 standard
    errors of MU, the sample std within 4.5 standard errors (plus the chain's small discretisation bias) of C,
    and the chain's exact std (no sampling error) within that bias of C."""
    n = 20000
    spec = get_sampler(name)
    sig = spec.schedule(steps).sigmas
    exact = chain_std(spec, sig, opts)
    assert ((exact / C - 1).abs() < bias).all(), (exact / C - 1)

    g = torch.Generator().manual_seed(11)
    s0 = sig[0].item()
    x = MU + (C ** 2 + s0 ** 2).sqrt() * torch.randn(n, 8, generator=g, dtype=torch.float64)
    out = spec(gaussian_denoiser(MU), x, sig, disable=True, generator=g, **opts)
    assert ((out.mean(0) - MU).abs() < 4.5 * exact / math.sqrt(n)).all()
    se = 1 / math.sqrt(2 * (n - 1))  # of std / true std
    ratio = out.std(0) / C
    assert ((ratio - 1).abs() < bias + 4.5 * se).all(), ratio
    assert ((out.std(0) / exact - 1).abs() < 4.5 * se).all()  # the generator path draws the law the probe computes
    assert abs((out.std(0) / exact).mean().item() - 1) < 4 * se / math.sqrt(8)

    broken = spec(gaussian_denoiser(MU), x, sig, disable=True, noise_sampler=lambda a, b: torch.zeros_like(x),
                  **opts)
    assert ((broken.std(0) / C - 1).abs() > 30 * se).all()  # dropping the noise is far outside the tolerance


def test_dpmpp_3m_sde_diffusers_variant_does_not_converge():
    """Why the k-diffusion variant exists: diffusers' third-order SDE step (D2 weight -> -1 as h -> 0) inflates
    the output std on Gaussian data, more with more steps on its default schedule (exact chain std, no sampling)."""
    spec = SAMPLERS["dpmpp_3m_sde"]
    few, many = (chain_std(spec, spec.schedule(n).sigmas, {"variant": "diffusers"}) / C - 1 for n in (30, 400))
    assert (few > 0.05).all() and (many > 1.0).all()
    kd = chain_std(spec, spec.schedule(400).sigmas, {"variant": "k-diffusion"}) / C - 1
    assert (kd.abs() < 0.002).all()


# --------------------------------------------------------------------------------------------- registry

@pytest.mark.parametrize("alias,name", [
    ("DPM++ SDE", "dpmpp_sde"), ("DPM++ SDE Karras", "dpmpp_sde_karras"), ("k_dpmpp_sde", "dpmpp_sde"),
    ("k_dpmpp_sde_ka", "dpmpp_sde_karras"), ("sample_dpmpp_sde", "dpmpp_sde"),
    ("DPM++ 3M SDE", "dpmpp_3m_sde"), ("DPM++ 3M SDE Karras", "dpmpp_3m_sde_karras"),
    ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), ("k_dpmpp_3m_sde_ka", "dpmpp_3m_sde_karras"),
    ("sample_dpmpp_3m_sde", "dpmpp_3m_sde"),
    ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun"), ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun_karras"),
    ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"), ("k_dpmpp_2m_sde_heun_ka", "dpmpp_2m_sde_heun_karras"),
    ("k_dpmpp_2m_sde_ka", "dpmpp_2m_sde_karras"), ("k_dpmpp_2m_sde", "dpmpp_2m_sde"),
])
def test_aliases(alias, name):
    assert get_sampler(alias) is SAMPLERS[name]


def test_registry():
    from fastsd.samplers import A1111_NAMES
    from fastsd.schedules import SAMPLER_SCHEDULES

    assert set(NEW) <= set(SAMPLERS) and all(SAMPLERS[n].stochastic for n in NEW)
    assert [A1111_NAMES[n] for n in NEW] == ["DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE Heun",
                                             "DPM++ 2M SDE Heun Karras", "DPM++ 3M SDE", "DPM++ 3M SDE Karras"]
    assert [SAMPLER_SCHEDULES[n] for n in NEW] == [("euler", False), ("euler", True), ("dpm", False), ("dpm", True),
                                                   ("dpm", False), ("dpm", True)]
    with pytest.raises(ValueError):
        SAMPLERS["dpmpp_2m_sde"](None, torch.zeros(1), torch.tensor([1.0, 0.0]), solver_type="euler")
