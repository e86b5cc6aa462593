"""k-diffusion-style samplers for SD1.x, each matching its diffusers twin scheduler numerically.

Signature (all samplers): `sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts) -> x`

  model     `model(x, sigma, **extra_args) -> denoised` (x0 prediction), e.g. a CFGDenoiser around an
            EpsDenoiser. sigma is passed as the schedule's 0-d CPU float64 tensor sigmas[i].
  x         the start sample in k-space, x = x0 + sigma * eps, at noise level sigmas[0]
            (txt2img: randn * schedule.init_noise_sigma; img2img: x0 + sigmas[start] * randn).
  sigmas    (n+1,) descending noise levels (a `Schedule.sigmas`; last entry 0 or sigma_min).
  returns   x at sigmas[-1]. diffusers' final latents are x * schedule.out_scale (differs from 1 only for DDIM,
            which ends at sigma_min = sigma[t=0] with set_alpha_to_one=False).

k-space vs diffusers: Euler / Euler a in diffusers carry k-space latents already. DDIM, DDPM and DPM-Solver carry
VP latents x_vp = x / sqrt(1 + sigma^2) (= sqrt(alphas_cumprod) * x); their UNet input is x_vp itself, which is
what EpsDenoiser feeds the UNet (c_in = 1/sqrt(sigma^2+1)), so the model calls are identical.

Every update is a linear combination, with host-computed float coefficients (a, b, c, d):
    x_next = a * x + b * denoised + c * old_denoised + d * noise
applied together with the CFG guidance by the model's `cfg_step` (the backend's op: one fused kernel on the
triton backend) in `denoise_and_step`, the one helper every sampler's step goes through. A model that can
split its guidance exposes `split_guidance(x, sigma, **extra) -> (uncond, cond, scale) | None` (see
fastsd.denoisers.CFGDenoiser); samplers never look at its type. Per sampler (s = sigmas[i], s' = sigmas[i+1]):

  euler       a = s'/s, b = 1 - s'/s                                   (probability-flow ODE, Euler step)
  heun        the Euler step to x2 with D1 = the model at (x, s), then, unless s' = 0, the model again at (x2, s'),
              D2, and Heun's trapezoid x' = x + (s'-s)(d1 + d2)/2 (d = (x - D)/sigma) written from x2:
              a = 1, b = (s - s')/(2s'), c = -b with old_denoised = D1 (diffusers HeunDiscreteScheduler: two model
              calls a step, one for the last)
  ddim(eta)   ancestral step: s_up = eta * s' * sqrt(s^2 - s'^2) / s, s_down = sqrt(s'^2 - s_up^2),
              a = s_down/s, b = 1 - a, d = s_up. eta=0 is exactly the Euler step: diffusers' DDIM update
              x_vp' = sqrt(a')*x0 + sqrt(1-a')*eps is, divided by sqrt(a'), x' = x0 + s' * eps = x0 + (s'/s)(x - x0).
  euler_a     the same ancestral step with eta = 1 (on the Euler "linspace" schedule)
  ddpm        DDPM posterior q(x_{t-1} | x_t, x0) with "fixed_small" variance beta~_t; in k-space its mean is
              (s'^2/s^2) x + (1 - s'^2/s^2) x0 and its std s' sqrt(s^2 - s'^2) / s: the ancestral step with eta = 1
              (on the "leading" schedule)
  dpmpp_2m    h = log(s/s'); first step and the step to s' = 0: a = s'/s, b = 1 - e^-h; otherwise with
              r = log(s_prev/s)/h: a = s'/s, b = (1 - e^-h)(1 + 1/(2r)), c = -(1 - e^-h)/(2r)
              (diffusers' DPMSolverMultistep dpmsolver++ midpoint order 2, lower_order_final, final sigma 0).
  dpmpp_2m_sde  the same with diffusers' "sde-dpmsolver++" (midpoint): a = (s'/s) e^-h, E = 1 - e^-2h, b = E (first
              step and the step to 0) or E (1 + 1/(2r)), c = -E/(2r), d = s' sqrt(E) (fresh noise each step)
  lcm         t = the timestep of s, c_skip = 0.25/((10t)^2+0.25), c_out = 10t/sqrt((10t)^2+0.25):
              a = c_skip/sqrt(1+s^2), b = c_out, d = s' (fresh noise; none after the last step) (LCMScheduler)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from fastsd.backends import reference
from fastsd.config import SchedulerConfig
from fastsd.schedules import Schedule, alphas_cumprod, schedule_for, sigma_to_t, sigmas_from_alphas_cumprod

try:
    from tqdm.auto import trange as _trange
except ImportError:  # pragma: no cover
    def _trange(n, disable=None):
        return range(n)

Coeffs = tuple[float, float, float, float]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- the update

def sampler_update(x: torch.Tensor, denoised: torch.Tensor, old_denoised: Optional[torch.Tensor],
                   noise: Optional[torch.Tensor], coeffs: Coeffs) -> torch.Tensor:
    """x_next = a*x + b*denoised + c*old_denoised + d*noise; terms with a zero coefficient are skipped
    (old_denoised / noise may then be None). The reference cfg_step without guidance."""
    return reference.cfg_step(x, None, denoised, None, coeffs, old_denoised, noise)[0]


def denoise_and_step(model, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict, coeffs: Coeffs,
                     old_denoised: Optional[torch.Tensor] = None,
                     draw_noise: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step -> (x_next, denoised): the model call, then the update with `coeffs`.

    A model with `split_guidance` that returns its two branch outputs gets the guidance fused into the
    update (its `cfg_step`); otherwise (no split, or an unguided call) it is called as
    `model(x, sigma, **extra_args)` and the output goes through the same op without guidance.
    `draw_noise()` is called once, after the model call and only when coeffs' noise term is non-zero (the RNG
    draw order of the unfused loop)."""
    split = getattr(model, "split_guidance", None)
    parts = split(x, sigma, **extra_args) if split is not None else None
    uncond, cond, scale = parts if parts is not None else (None, model(x, sigma, **extra_args), None)
    noise = draw_noise() if coeffs[3] != 0 else None
    step = getattr(model, "cfg_step", reference.cfg_step)
    return step(x, uncond, cond, scale, coeffs, old_denoised, noise)


# --------------------------------------------------------------------------------------------- step coefficients

def euler_coeffs(sigma: float, sigma_next: float) -> Coeffs:
    r = sigma_next / sigma
    return (r, 1.0 - r, 0.0, 0.0)


def heun_coeffs(sigma: float, sigma_next: float) -> Coeffs:
    """Heun's correction from the Euler point x2: x' = x2 + (s - s')/(2 s') (D2 - D1), D1 as old_denoised."""
    k = (sigma - sigma_next) / (2.0 * sigma_next)
    return 1.0, k, -k, 0.0


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of k-diffusion's get_ancestral_step: sigma_down^2 + sigma_up^2 = sigma_next^2."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    sigma_down = math.sqrt(max(sigma_next ** 2 - sigma_up ** 2, 0.0))
    return sigma_down, sigma_up


def ancestral_coeffs(sigma: float, sigma_next: float, eta: float = 1.0) -> Coeffs:
    """Euler step to sigma_down, then add sigma_up noise (Euler a; DDIM with eta; DDPM with eta=1)."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    r = sigma_down / sigma
    return (r, 1.0 - r, 0.0, sigma_up)


def ddpm_coeffs(sigma: float, sigma_next: float) -> Coeffs:
    """DDPM ancestral step, written from the VP posterior: with a_t = 1/(1+s^2), a_p = 1/(1+s'^2), diffusers'
    x_vp' = sqrt(a_p) beta_t/(1-a_t) x0 + sqrt(alpha_t)(1-a_p)/(1-a_t) x_vp + sqrt(beta~_t) z, where
    alpha_t = a_t/a_p, beta_t = 1 - alpha_t, beta~_t = (1-a_p)/(1-a_t) beta_t; divided by sqrt(a_p) (x_vp =
    sqrt(a_t) x) this is x' = (s'^2/s^2) x + (1 - s'^2/s^2) x0 + (s' sqrt(s^2 - s'^2)/s) z."""
    r2 = (sigma_next / sigma) ** 2
    return (r2, 1.0 - r2, 0.0, sigma_next * math.sqrt(max(sigma ** 2 - sigma_next ** 2, 0.0)) / sigma)


def lcm_coeffs(sigma: float, sigma_next: float, t: float, timestep_scaling: float = 10.0) -> Coeffs:
    """LCM step (diffusers LCMScheduler): the consistency boundary condition
    denoised = c_out * x0 + c_skip * x_vp with c_skip = 0.25 / ((10t)^2 + 0.25), c_out = 10t / sqrt((10t)^2 + 0.25)
    (sigma_data 0.5, timestep_scaling 10), then fresh noise to sigma_next. In k-space (x_vp = x / sqrt(1+s^2)):
    x' = c_skip / sqrt(1+s^2) * x + c_out * x0 + s' * noise."""
    st = t * timestep_scaling
    c_skip = 0.25 / (st * st + 0.25)
    c_out = st / math.sqrt(st * st + 0.25)
    return (c_skip / math.sqrt(1.0 + sigma * sigma), c_out, 0.0, sigma_next)


def dpmpp_2m_coeffs(sigma_prev: Optional[float], sigma: float, sigma_next: float) -> Coeffs:
    """DPM-Solver++(2M) step from sigma to sigma_next; first order when sigma_prev is None (first step) or
    sigma_next == 0 (diffusers' final step with final_sigmas_type="zero")."""
    if sigma_next == 0:
        return (0.0, 1.0, 0.0, 0.0)
    h = math.log(sigma / sigma_next)  # lambda = -log(sigma) in k-space
    one_minus_exp = -math.expm1(-h)
    a = sigma_next / sigma
    if sigma_prev is None:
        return (a, one_minus_exp, 0.0, 0.0)
    r = math.log(sigma_prev / sigma) / h
    return (a, one_minus_exp * (1.0 + 1.0 / (2.0 * r)), -one_minus_exp / (2.0 * r), 0.0)


def dpmpp_2m_sde_coeffs(sigma_prev: Optional[float], sigma: float, sigma_next: float) -> Coeffs:
    """DPM-Solver++(2M) SDE step (diffusers' algorithm_type="sde-dpmsolver++", midpoint): first order as
    dpmpp_2m_coeffs; the noise term s' sqrt(1 - e^-2h) is zero on the step to sigma 0."""
    if sigma_next == 0:
        return (0.0, 1.0, 0.0, 0.0)
    h = math.log(sigma / sigma_next)
    e = -math.expm1(-2.0 * h)
    a, d = sigma_next / sigma * math.exp(-h), sigma_next * math.sqrt(e)
    if sigma_prev is None:
        return (a, e, 0.0, d)
    r = math.log(sigma_prev / sigma) / h
    return (a, e * (1.0 + 1.0 / (2.0 * r)), -e / (2.0 * r), d)


# --------------------------------------------------------------------------------------------- noise

def default_noise_sampler(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                          dtype: Optional[torch.dtype] = None) -> NoiseSampler:
    """Fresh standard normal noise shaped like x, drawn as diffusers' randn_tensor draws its step noise (on the
    generator's device, in `dtype` (x's if None: diffusers' schedulers draw in the model output's dtype, its DPM
    SDE in fp32), then moved to x's device and dtype), so the same seeded generator reproduces diffusers' stream."""
    gen_device = generator.device if generator is not None else x.device

    def sample(sigma, sigma_next):
        return torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype or x.dtype).to(x.device,
                                                                                                      x.dtype)

    return sample


# --------------------------------------------------------------------------------------------- samplers

def _prepare(x, sigmas, extra_args):
    extra_args = {} if extra_args is None else extra_args
    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)  # coefficients are host-side
    return extra_args, sigmas, sigmas.tolist()


def _callback(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """Euler on the probability-flow ODE (diffusers EulerDiscreteScheduler with s_churn = 0)."""
    _no_opts("euler", opts)
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    for i in _trange(len(s) - 1, disable=disable):
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, euler_coeffs(s[i], s[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """Heun's second-order method on the probability-flow ODE (diffusers HeunDiscreteScheduler): an Euler step,
    corrected with the model at its end (not on the step to sigma 0)."""
    _no_opts("heun", opts)
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    for i in _trange(len(s) - 1, disable=disable):
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, euler_coeffs(s[i], s[i + 1]))
        if s[i + 1] > 0:
            x_next, _ = denoise_and_step(model, x_next, sigmas[i + 1], extra_args, heun_coeffs(s[i], s[i + 1]),
                                         denoised)
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


def _sample_ancestral(coeff_fn, model, x, sigmas, extra_args, callback, disable, generator, noise_sampler):
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    for i in _trange(len(s) - 1, disable=disable):
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeff_fn(s[i], s[i + 1]),
                                            draw_noise=lambda: noise_sampler(sigmas[i], sigmas[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta: float = 1.0,
                           generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None):
    """Euler ancestral (diffusers EulerAncestralDiscreteScheduler for eta = 1). Noise comes from
    `noise_sampler(sigma, sigma_next)` or else randn with `generator`; none is drawn for the step to sigma 0."""
    return _sample_ancestral(lambda a, b: ancestral_coeffs(a, b, eta), model, x, sigmas, extra_args, callback,
                             disable, generator, noise_sampler)


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta: float = 0.0, **opts):
    """DDIM in sigma space (diffusers DDIMScheduler.step with this eta): the ancestral step with eta 0 by
    default, i.e. deterministic."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta=eta, **opts)


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None):
    """DDPM ancestral sampling with the "fixed_small" posterior variance (diffusers DDPMScheduler)."""
    return _sample_ancestral(ddpm_coeffs, model, x, sigmas, extra_args, callback, disable, generator,
                             noise_sampler)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """DPM-Solver++(2M) (diffusers DPMSolverMultistepScheduler, solver_order=2, midpoint, lower_order_final)."""
    _no_opts("dpmpp_2m", opts)
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    old_denoised = None
    for i in _trange(len(s) - 1, disable=disable):
        coeffs = dpmpp_2m_coeffs(None if old_denoised is None else s[i - 1], s[i], s[i + 1])
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeffs, old_denoised)
        _callback(callback, x, i, sigmas[i], denoised)
        x, old_denoised = x_next, denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                        generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None):
    """DPM-Solver++(2M) SDE (diffusers DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", midpoint,
    final sigma 0): dpmpp_2m's steps with fresh noise from `noise_sampler(sigma, sigma_next)`, else randn with
    `generator`; none on the step to sigma 0."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, generator, torch.float32)
    old_denoised = None
    for i in _trange(len(s) - 1, disable=disable):
        coeffs = dpmpp_2m_sde_coeffs(None if old_denoised is None else s[i - 1], s[i], s[i + 1])
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeffs, old_denoised,
                                            draw_noise=lambda: noise_sampler(sigmas[i], sigmas[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x, old_denoised = x_next, denoised
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
               generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None,
               timestep_scaling: float = 10.0, scheduler: SchedulerConfig = SchedulerConfig()):
    """Latent Consistency Model sampling (diffusers LCMScheduler): each step maps x to the model's consistency
    estimate and re-noises it to the next sigma with fresh noise (none after the last step). The boundary
    condition needs the discrete timestep of each sigma: taken from `scheduler`'s sigma table (rounded)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    table = sigmas_from_alphas_cumprod(alphas_cumprod(scheduler)).numpy()
    ts = sigma_to_t(sigmas[:-1], torch.from_numpy(np.log(table)).double()).round().tolist()
    for i in _trange(len(s) - 1, disable=disable):
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args,
                                            lcm_coeffs(s[i], s[i + 1], ts[i], timestep_scaling),
                                            draw_noise=lambda: noise_sampler(sigmas[i], sigmas[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


def _no_opts(name, opts):
    if opts:
        raise TypeError(f"sample_{name} got unexpected options {sorted(opts)}")


# --------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class SamplerSpec:
    name: str  # canonical name
    fn: Callable[..., torch.Tensor]
    stochastic: bool  # takes generator / noise_sampler

    def schedule(self, steps: int, cfg: SchedulerConfig = SchedulerConfig()) -> Schedule:
        return schedule_for(self.name, steps, cfg)

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
        return self.fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **opts)


# Each matches its diffusers twin built with from_config(SD1.5 scheduler config) (see README "Generating"):
# euler EulerDiscreteScheduler, heun HeunDiscreteScheduler, euler_a EulerAncestralDiscreteScheduler, ddim DDIMScheduler, ddpm DDPMScheduler,
# dpmpp_2m DPMSolverMultistepScheduler, dpmpp_2m_karras the same with use_karras_sigmas=True, dpmpp_2m_sde(_karras)
# the same with algorithm_type="sde-dpmsolver++", lcm LCMScheduler.
SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("euler", sample_euler, False),
    SamplerSpec("euler_a", sample_euler_ancestral, True),
    SamplerSpec("heun", sample_heun, False),
    SamplerSpec("ddim", sample_ddim, True),
    SamplerSpec("ddpm", sample_ddpm, True),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, False),
    SamplerSpec("dpmpp_2m_karras", sample_dpmpp_2m, False),
    SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, True),
    SamplerSpec("dpmpp_2m_sde_karras", sample_dpmpp_2m_sde, True),
    SamplerSpec("lcm", sample_lcm, True),
)}

# The names A1111 writes in its infotext ("Sampler: Euler a").
A1111_NAMES: dict[str, str] = {"euler": "Euler", "heun": "Heun", "euler_a": "Euler a", "ddim": "DDIM", "ddpm": "DDPM",
                               "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
                               "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "lcm": "LCM"}

# After normalisation (lower case, "++" -> "pp", runs of spaces/hyphens -> "_", leading "k_"/"sample_" dropped),
# the A1111 names become canonical ("Euler a" -> euler_a, "DPM++ 2M Karras" -> dpmpp_2m_karras); a few more:
ALIASES: dict[str, str] = {
    "euler_ancestral": "euler_a",
    "eulera": "euler_a",
    "dpmpp2m": "dpmpp_2m",
    "dpmpp2m_karras": "dpmpp_2m_karras",
    "dpm_solver_multistep": "dpmpp_2m",
    "dpmsolver_multistep": "dpmpp_2m",
}


def resolve_sampler_name(name: str) -> str:
    """Canonical sampler name for a canonical name or alias (case-insensitive); ValueError if unknown."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower().replace("++", "pp"))
    for prefix in ("sample_", "k_"):
        if key.startswith(prefix) and key[len(prefix):] in {**SAMPLERS, **ALIASES}:
            key = key[len(prefix):]
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} (A1111 names such as "
                         f"'Euler a', 'DPM++ 2M Karras' and k_ prefixes like 'k_euler_a' are accepted too)")
    return key


def get_sampler(name: str) -> SamplerSpec:
    """The sampler (function + schedule recipe) for a canonical name or alias, e.g. "DPM++ 2M Karras"."""
    return SAMPLERS[resolve_sampler_name(name)]
