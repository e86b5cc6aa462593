"""k-diffusion-style samplers for SD1.x, each matching its diffusers twin scheduler numerically.

Signature (all samplers): `sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts) -> x`

  model     `model(x, sigma, **extra_args) -> denoised` (x0 prediction), e.g. a CFGDenoiser around an
            EpsDenoiser. sigma is passed as the schedule's 0-d CPU float64 tensor sigmas[i] (a two-call
            sampler's midpoint as a 0-d CPU float64 tensor too: `Schedule.mid_sigmas` holds KDPM2's).
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
  ddim_cfgpp  DDIM with CFG++ (Chung et al. 2024; A1111's "DDIM CFG++"): a guided call's x0 is taken at
              lambda = scale / 12.5 (A1111's mapping of the guidance scale [0, 12.5] onto [0, 1]), D_l = D_u +
              lambda (D_c - D_u), and the step renoises along the unconditional branch's eps (x - D_u)/s:
              x' = D_l + s_down (x - D_u)/s + s_up z, i.e. a = s_down/s, b = 1, c = -a with old_denoised = D_u,
              d = s_up. An unguided call (scale <= 1) is a plain DDIM step. On DDIM's schedule (no diffusers twin)
  euler_a     the same ancestral step with eta = 1 (on the Euler "linspace" schedule)
  lms         linear multistep of order 4 on the ODE (fewer on the first steps): x' = x + sum_j c_j d_j over the
              derivatives d_j = (x_j - D_j)/s_j of this and the 3 previous steps, c_j the integral from s to s' of
              the Lagrange basis polynomial of s_j over those steps' sigmas (exact, numpy polynomials). The older
              derivatives involve older x's, so their sum H = sum_{j>=1} c_j d_j is formed with plain torch ops and
              passed as old_denoised: a = 1 + c_0/s, b = -c_0/s, c = 1 (c = 0 on the first step)
              (diffusers LMSDiscreteScheduler.step with its default order=4)
  dpm2        the Euler step to the midpoint m = sqrt(s s') (diffusers' float32 log-lerp) with D1, then, unless
              s' = 0 (a plain Euler step), the model at (x_m, m), D2, and x' = x + (s' - s)(x_m - D2)/m written
              from x_m: a = s'/m, b = (s - s')/m, c = (m - s)/m with old_denoised = D1
              (diffusers KDPM2DiscreteScheduler: two model calls a step, one for the last)
  dpm2_a      the same with the target s_down of the ancestral split (eta 1) and m = sqrt(s s_down) (= s'):
              a = s_down/m, b = (s - s_down)/m, c = (m - s)/m, d = s_up, fresh noise after the second call
              (diffusers KDPM2AncestralDiscreteScheduler)
  dpmpp_2s_a  DPM-Solver++(2S) with the ancestral split (k-diffusion's sample_dpmpp_2s_ancestral, eta 1): the Euler
              (first-order DPM-Solver++) step to m = sqrt(s s_down) with D1, then x' = (s_down/s) x +
              (1 - s_down/s) D2 written from x_m: a = s_down/m, b = 1 - s_down/s, c = s_down/s - s_down/m,
              d = s_up; the last step (s_down = 0) is one Euler step (no diffusers twin)
  unipc       UniPC (bh2, order 2, data prediction): the UniC corrector replaces the model's input x_i by
              x_i^c = K_i + Q D_i (K_i: a combination of x_{i-1}^c, D_{i-1}, D_{i-2}), then the UniP predictor
              (DPM-Solver++(2M)'s step) goes from x_i^c: a = 0, b = (s'/s) Q + P0, c = 1 with old_denoised =
              (s'/s) K_i + P1 D_{i-1} (torch ops), and x_i^c is kept for the next corrector (first step: the
              plain predictor from x, a = s'/s; last step: x' = D) (diffusers UniPCMultistepScheduler)
  ddpm        DDPM posterior q(x_{t-1} | x_t, x0) with "fixed_small" variance beta~_t; in k-space its mean is
              (s'^2/s^2) x + (1 - s'^2/s^2) x0 and its std s' sqrt(s^2 - s'^2) / s: the ancestral step with eta = 1
              (on the "leading" schedule)
  dpmpp_2m    h = log(s/s'); first step and the step to s' = 0: a = s'/s, b = 1 - e^-h; otherwise with
              r = log(s_prev/s)/h: a = s'/s, b = (1 - e^-h)(1 + 1/(2r)), c = -(1 - e^-h)/(2r)
              (diffusers' DPMSolverMultistep dpmsolver++ midpoint order 2, lower_order_final, final sigma 0).
  dpmpp_2m_sde  the same with diffusers' "sde-dpmsolver++" (midpoint): a = (s'/s) e^-h, E = 1 - e^-2h, b = E (first
              step and the step to 0) or E (1 + 1/(2r)), c = -E/(2r), d = s' sqrt(E) (new noise each step)
  dpmpp_2m_sde_heun  the same with solver_type "heun": with p = 1 - E/(2h), b = E + p/r, c = -p/r
  dpmpp_3m_sde  k-diffusion's sample_dpmpp_3m_sde (A1111's), eta 1: x' = a x + b D + c1 D_-1 + c2 D_-2 + d z
              (dpmpp_3m_sde_coeffs); the older outputs' part c1 D_-1 + c2 D_-2 is formed with torch ops and passed
              as old_denoised (c = 1). Order 1, 2 on the first two steps, then 3. variant="diffusers": diffusers'
              third-order "sde-dpmsolver++" (solver_order=3, other weights, order 2 on the next-to-last step below
              15 steps; it does not converge)
  dpmpp_sde   k-diffusion's sample_dpmpp_sde (r = 1/2, eta 1): the ancestral step to m = sqrt(s s') with D1 and
              noise z1 (ancestral_coeffs(s, m)), the model at (x_m, m) -> D2, then the ancestral step from x to s'
              with D2, written with a = 0 and x as old_denoised: b = 1 - s_down/s, c = s_down/s, d = s_up, the
              noise the Brownian increment of the whole step (s, s') (a torchsde Brownian tree,
              `brownian_noise_sampler`); the last step is one Euler step (diffusers DPMSolverSDEScheduler)
  lcm         t = the timestep of s, c_skip = 0.25/((10t)^2+0.25), c_out = 10t/sqrt((10t)^2+0.25):
              a = c_skip/sqrt(1+s^2), b = c_out, d = s' (fresh noise; none after the last step) (LCMScheduler)
  plms        pseudo linear multistep on eps = (x - D)/s (which is the UNet's eps): x' = x + (s' - s) eps', eps' the
              Adams-Bashforth combination of this and the up to 3 previous steps' eps (weights 3/2, -1/2; 23/12, -16/12,
              5/12; 55/24, -59/24, 37/24, -9/24), the older part formed with torch ops and passed as old_denoised
              (a = 1 + w0 (s'-s)/s, b = -w0 (s'-s)/s, c = 1); the first step (unless it is the only one) is a Heun
              step, two model calls, eps' = (e0 + e1)/2 (diffusers PNDMScheduler(skip_prk_steps=True): n + 1 calls)
  restart     Heun steps (heun's coefficients, an Euler step to sigma 0) over A1111's restart list (`restart_steps`:
              from 20 steps a shorter Karras schedule plus restart segments that go back up from ~0.1 to ~2), the
              jump up the noise d = sqrt(s_up^2 - s'^2) added by the update of the step before it (fresh noise)
  dpm_fast    DPM-Solver-Fast (k-diffusion's sample_dpm_fast, eta 1): n = len(sigmas) - 1 model calls as floor(n/3) + 1
              single-step DPM-Solver-3/2/1 steps, uniform in log sigma from sigmas[0] to the last nonzero sigma (only
              the ends and n are used). Each step's calls are written as rows over (x, D_0, D_1, D_2)
              (`dpm_solver_rows`): call k's update has b = its row's D_k weight, the rest (x and the earlier D) formed
              with torch ops as old_denoised (c = 1; on the first call a = x's weight); ancestral split to s_down
              (>= sigma_min) and s_up noise on the last call. Ends at sigma_min, not 0 (see sample_dpm_fast)
  dpm_adaptive  DPM-Solver-23 with adaptive steps (k-diffusion's sample_dpm_adaptive, eta 1): the same steps, the
              embedded second-order result for the error estimate (RMS over the whole batch), PID step-size control,
              rejected attempts retried; the noise is added after the accept decision with plain torch ops
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from numpy.polynomial import Polynomial

from fastsd.backends import reference
from fastsd.config import SchedulerConfig
from fastsd.schedules import (Schedule, alphas_cumprod, dpm2_ancestral_sigmas, dpm2_mid_sigma, schedule_for, sigma_to_t,
                              sigmas_from_alphas_cumprod)

try:
    from tqdm.auto import trange as _trange
except ImportError:  # pragma: no cover
    def _trange(n, disable=None):
        return range(n)

Coeffs = tuple[float, float, float, float]
CFGPP_SCALE = 12.5  # A1111's DDIM CFG++: the guidance scale / 12.5 is CFG++'s lambda (its cond_scale_miltiplier)
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- the update

def sampler_update(x: torch.Tensor, denoised: torch.Tensor, old_denoised: Optional[torch.Tensor],
                   noise: Optional[torch.Tensor], coeffs: Coeffs) -> torch.Tensor:
    """x_next = a*x + b*denoised + c*old_denoised + d*noise; terms with a zero coefficient are skipped
    (old_denoised / noise may then be None). The reference cfg_step without guidance."""
    return reference.cfg_step(x, None, denoised, None, coeffs, old_denoised, noise)[0]


def denoise_and_step(model, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict, coeffs: Coeffs,
                     old_denoised: Optional[torch.Tensor] = None,
                     draw_noise: Optional[Callable[[], torch.Tensor]] = None, *,
                     cfgpp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step -> (x_next, denoised): the model call, then the update with `coeffs`.

    A model with `split_guidance` that returns its two branch outputs gets the guidance fused into the
    update (its `cfg_step`); otherwise (no split, or an unguided call) it is called as
    `model(x, sigma, **extra_args)` and the output goes through the same op without guidance.
    `draw_noise()` is called once, after the model call and only when coeffs' noise term is non-zero (the RNG
    draw order of the unfused loop). `cfgpp` (coeffs (a, 1 - a, 0, d) of a step x' = D + a (x - D) + d z): a
    guided call takes CFG++'s update instead, D at scale / CFGPP_SCALE and x - D_uncond as the direction
    (a, 1, -a, d) with old_denoised = D_uncond (see ddim_cfgpp above)."""
    split = getattr(model, "split_guidance", None)
    parts = split(x, sigma, **extra_args) if split is not None else None
    uncond, cond, scale = parts if parts is not None else (None, model(x, sigma, **extra_args), None)
    if cfgpp and uncond is not None:
        if coeffs[2] != 0 or old_denoised is not None or coeffs[0] + coeffs[1] != 1:
            raise ValueError(f"CFG++ needs a step of the form x' = D + a (x - D) + d z, got coeffs {coeffs}")
        coeffs, scale, old_denoised = (coeffs[0], 1.0, -coeffs[0], coeffs[3]), scale / CFGPP_SCALE, uncond
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


def dpm2_coeffs(sigma: float, sigma_mid: float, sigma_target: float, sigma_up: float = 0.0) -> Coeffs:
    """DPM2's second update, from the midpoint x_m (model at sigma_mid -> D2) with D1 as old_denoised:
    x' = x + (t - s)(x_m - D2)/m with x = (s/m) x_m - (s/m - 1) D1, i.e. a = t/m, b = (s - t)/m, c = (m - s)/m;
    t = sigma_next (dpm2) or sigma_down plus sigma_up noise (dpm2_a)."""
    m = sigma_mid
    return sigma_target / m, (sigma - sigma_target) / m, (m - sigma) / m, sigma_up


def dpmpp_2s_coeffs(sigma: float, sigma_mid: float, sigma_down: float, sigma_up: float) -> Coeffs:
    """DPM-Solver++(2S)'s second update from the midpoint x_m = (m/s) x + (1 - m/s) D1 (D1 as old_denoised):
    x' = (s_down/s) x + (1 - s_down/s) D2 = (s_down/m) x_m + (1 - s_down/s) D2 + (s_down/s - s_down/m) D1,
    plus s_up noise."""
    r = sigma_down / sigma
    return sigma_down / sigma_mid, 1.0 - r, r - sigma_down / sigma_mid, sigma_up


def lms_coeffs(sigmas_back: list[float], sigma_next: float) -> list[float]:
    """Linear multistep coefficients c_j = integral from s_0 to sigma_next of the Lagrange basis polynomial of
    node j over the nodes `sigmas_back` = [s_0 (this step), s_1 (the previous), ...], exactly (numpy
    polynomials in tau - s_0; diffusers integrates the same polynomial with scipy's quad)."""
    s0 = sigmas_back[0]
    nodes = [v - s0 for v in sigmas_back]
    out = []
    for j, uj in enumerate(nodes):
        others = [u for k, u in enumerate(nodes) if k != j]
        basis = Polynomial.fromroots(others) if others else Polynomial([1.0])
        basis = basis / float(np.prod([uj - u for u in others]))
        out.append(float(basis.integ()(sigma_next - s0)))  # the antiderivative that is 0 at tau = s_0
    return out


def _unipc_b(h: float) -> tuple[float, float]:
    """UniPC's b_1, b_2 for bh2 with data prediction (hh = -h, B(h) = expm1(hh)), as diffusers' loop builds them."""
    hh = -h
    b_h = math.expm1(hh)
    k1 = b_h / hh - 1.0  # h_phi_1 / hh - 1
    k2 = k1 / hh - 0.5
    return k1 / b_h, 2.0 * k2 / b_h


def unipc_corrector_coeffs(sigma_prev2: Optional[float], sigma_prev: float,
                           sigma: float) -> tuple[float, float, float, float]:
    """UniC (bh2) for the sample at `sigma` from the previous corrected sample at sigma_prev: (Ax, Q, K1, K2) with
    x^c = Ax x^c_prev + Q D + K1 D_prev + K2 D_prev2; order 2 when sigma_prev2 is given, else 1 (rho = 1/2)."""
    h = math.log(sigma_prev / sigma)
    e = -math.expm1(-h)  # 1 - e^-h = -B(h)
    if sigma_prev2 is None:
        rc0, rc1, r1 = 0.0, 0.5, 1.0
    else:
        r1 = -math.log(sigma_prev2 / sigma_prev) / h
        b1, b2 = _unipc_b(h)
        rc0 = (b1 - b2) / (1.0 - r1)  # R = [[1, 1], [r1, 1]] solved
        rc1 = b1 - rc0
    # x^c = (s/s_prev) x + e D_prev + e (rc0 (D_prev2 - D_prev) / r1 + rc1 (D - D_prev))
    return sigma / sigma_prev, e * rc1, e * (1.0 - rc0 / r1 - rc1), e * rc0 / r1


def unipc_predictor_coeffs(sigma_prev: Optional[float], sigma: float,
                           sigma_next: float) -> tuple[float, float, float]:
    """UniP (bh2, rho = 1/2 at order 2: DPM-Solver++(2M)) from x^c at sigma: (A, P0, P1) with
    x' = A x^c + P0 D + P1 D_prev; order 2 when sigma_prev is given; x' = D on the step to sigma 0."""
    a, p0, p1, _ = dpmpp_2m_coeffs(sigma_prev, sigma, sigma_next)
    return a, p0, p1


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


def _sde_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float, float, float]:
    """The terms the multistep SDE steps share (k-diffusion's with `eta`): h = log(s/s'), he = (1 + eta) h,
    E = 1 - e^-he, x's weight e^-he (written (s'/s) e^-h at eta 1, diffusers' form, for its bits) and the noise's
    s' sqrt(1 - e^-2 eta h)."""
    h = math.log(sigma / sigma_next)
    he = (1.0 + eta) * h
    a = sigma_next / sigma * math.exp(-h) if eta == 1.0 else math.exp(-he)
    return h, he, -math.expm1(-he), a, sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h))


def dpmpp_2m_sde_coeffs(sigma_prev: Optional[float], sigma: float, sigma_next: float,
                        solver_type: str = "midpoint", eta: float = 1.0) -> Coeffs:
    """DPM-Solver++(2M) SDE step (diffusers' algorithm_type="sde-dpmsolver++" with this solver_type; k-diffusion's
    sample_dpmpp_2m_sde with `eta`, 1 being diffusers'): with h = log(s/s'), he = (1 + eta) h, E = 1 - e^-he,
    x' = e^-he x + E D, the noise term s' sqrt(1 - e^-2 eta h) (zero on the step to sigma 0 and at eta 0). The
    second-order correction (D - D_prev)/r gets the weight E/2 ("midpoint") or 1 - E/he ("heun")."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if sigma_next == 0:
        return (0.0, 1.0, 0.0, 0.0)
    h, he, e, a, d = _sde_step(sigma, sigma_next, eta)
    if sigma_prev is None:
        return (a, e, 0.0, d)
    r = math.log(sigma_prev / sigma) / h
    if solver_type == "heun":
        p = 1.0 - e / he  # diffusers' (1 - e^-2h)/(-2h) + 1 at eta 1, k-diffusion's phi_2
        return (a, e + p / r, -p / r, d)
    return (a, e * (1.0 + 1.0 / (2.0 * r)), -e / (2.0 * r), d)


def dpmpp_3m_sde_coeffs(sigma_prev2: Optional[float], sigma_prev: Optional[float], sigma: float,
                        sigma_next: float, variant: str = "k-diffusion",
                        eta: float = 1.0) -> tuple[float, float, float, float, float]:
    """DPM-Solver++(3M) SDE step: (a, b, c1, c2, d) with x' = a x + b D + c1 D_prev + c2 D_prev2 + d z. Third order
    with both earlier sigmas, second order with sigma_prev only, first order with neither; x' = D on the step to
    sigma 0.

    Third order, with h = log(s/s'), r0 = log(s_prev/s)/h, r1 = log(s_prev2/s_prev)/h, E = 1 - e^-2h:
    D1_0 = (D - D_prev)/r0, D1_1 = (D_prev - D_prev2)/r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),
    D2 = (D1_0 - D1_1)/(r0+r1), x' = (s'/s) e^-h x + E D + p2 D1 + p3 D2 + s' sqrt(E) z with p2 = 1 - E/(2h) and
      variant "diffusers" (DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++"), as of
        diffusers 0.42): p3 = (E - 2h)/(4h^2) - 1/2, which tends to -1 as h -> 0; second order as
        dpmpp_2m_sde_coeffs' "midpoint" (weight E/2 on (D - D_prev)/r0);
      variant "k-diffusion" (sample_dpmpp_3m_sde with eta 1, A1111's "DPM++ 3M SDE"): p3 = -phi_3 =
        (E - 2h)/(4h^2) + 1/2 (tends to 0, DPM-Solver's third-order term); second order with phi_2 = 1 - E/(2h)
        on (D - D_prev)/r0 (dpmpp_2m_sde_coeffs' "heun").
    The two third-order steps differ by exactly 1 * D2. Another `eta` (A1111's; k-diffusion only): with
    he = (1 + eta) h in place of 2h, E = 1 - e^-he, p2 = 1 - E/he, p3 = E/he^2 - 1/he + 1/2, x' = e^-he x + ...,
    noise s' sqrt(1 - e^-2 eta h)."""
    if variant not in ("diffusers", "k-diffusion"):
        raise ValueError(f"variant must be 'diffusers' or 'k-diffusion', got {variant!r}")
    if eta != 1.0 and variant != "k-diffusion":
        raise ValueError("an eta other than 1 is k-diffusion's (diffusers' scheduler has none)")
    if sigma_next == 0:
        return (0.0, 1.0, 0.0, 0.0, 0.0)
    if sigma_prev2 is None:
        a, b, c, d = dpmpp_2m_sde_coeffs(sigma_prev, sigma, sigma_next,
                                         "heun" if variant == "k-diffusion" else "midpoint", eta)
        return (a, b, c, 0.0, d)
    h, he, e, a, d = _sde_step(sigma, sigma_next, eta)
    r0, r1 = math.log(sigma_prev / sigma) / h, math.log(sigma_prev2 / sigma_prev) / h
    p2 = 1.0 - e / he
    p3 = ((e - 2.0 * h) / (4.0 * h * h) + (0.5 if variant == "k-diffusion" else -0.5) if eta == 1.0
          else e / (he * he) - 1.0 / he + 0.5)
    k = (p2 * r0 + p3) / (r0 + r1)  # the weight of D1_0 - D1_1 in p2 D1 + p3 D2
    return (a, e + (p2 + k) / r0, -(p2 + k) / r0 - k / r1, k / r1, d)


def dpmpp_sde_coeffs(sigma: float, sigma_next: float, eta: float = 1.0) -> Coeffs:
    """DPM-Solver++(2S) SDE's second update (k-diffusion's sample_dpmpp_sde, r = 1/2, this eta): the ancestral step
    from x (not from the midpoint sample the model was called at) to sigma_down with the midpoint's D2:
    x' = (s_down/s) x + (1 - s_down/s) D2 + s_up z. Passed with a = 0 and x as old_denoised (c = s_down/s)."""
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    return (0.0, 1.0 - down / sigma, down / sigma, up)


PLMS_WEIGHTS = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
"""Adams-Bashforth weights of (PLMS) orders 1-4 on the eps of this step and the earlier ones, newest first."""


def _karras_f32(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """n Karras noise levels from sigma_max down to sigma_min (no final 0), the formula evaluated in float32 as
    k-diffusion's get_sigmas_karras does on its float32 ramp (what A1111's Restart walks)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float32)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist()


RESTART_MIN, RESTART_MAX = 0.1, 2.0  # A1111's automatic restart segment: from the level nearest 0.1 back up to ~2


def restart_steps(sigmas: list[float]) -> list[tuple[float, float]]:
    """A1111's Restart (its restart_sampler with restart_list None): the (sigma, sigma_next) of every Heun step.

    Below 20 steps (n = len(sigmas) - 1) the given steps, no restart. From 20: R = 9 restart steps done once
    (n >= 36: R = n // 4, twice); the main schedule is a new Karras one of n - R * times steps between sigmas[-2]
    and sigmas[0] (whatever the given schedule), plus 0; after the step that lands on its level nearest 0.1, the
    R + 1 Karras levels from its level nearest 2 down to that one, walked `times` times (each walk starts by going
    back up: fresh noise). n steps in all, so 2n - 1 model calls as Heun's (if the level nearest 2 is not above the
    one nearest 0.1, as in a short img2img tail, there is no restart and fewer steps)."""
    n = len(sigmas) - 1
    if n < 20:
        return list(zip(sigmas[:-1], sigmas[1:]))
    r, times = (n // 4, 2) if n >= 36 else (9, 1)
    main = _karras_f32(n - r * times, sigmas[-2], sigmas[0]) + [0.0]
    dist = lambda v: [abs(m - v) for m in main]  # noqa: E731
    lo, hi = int(np.argmin(dist(RESTART_MIN))), int(np.argmin(dist(RESTART_MAX)))
    pairs = []
    for i in range(len(main) - 1):
        pairs.append((main[i], main[i + 1]))
        if i + 1 == lo and hi < lo:
            seg = _karras_f32(r + 1, main[lo], main[hi])
            pairs += list(zip(seg[:-1], seg[1:])) * times
    return pairs


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


def brownian_noise_sampler(x: torch.Tensor, sigmas, seed: int | Sequence[int]) -> NoiseSampler:
    """k-diffusion's BrownianTreeNoiseSampler, A1111's noise for DPM++ SDE (and diffusers' DPMSolverSDEScheduler's):
    noise(a, b) = (W(b) - W(a)) / sqrt|b - a| for a Brownian motion W in time = sigma, a torchsde Brownian tree over
    [the smallest nonzero sigma, the largest] of `sigmas`, fp32 on x's device, then in x's dtype. `seed` a list, one
    per image of x (A1111's seeds): a tree per image, so an image's noise does not depend on its batch; an int: one
    tree over the whole of x (diffusers' noise_sampler_seed). The times are rounded to fp32 first, as A1111's and
    diffusers' sigma tensors hold them. The trees are built at the first call (torchsde is imported then)."""
    batched = not isinstance(seed, int)
    seeds = [int(v) for v in seed] if batched else [seed]
    if batched and len(seeds) != x.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
    positive = [v for v in torch.as_tensor(sigmas, dtype=torch.float64).tolist() if v > 0]
    t0, t1 = _f32(min(positive)), _f32(max(positive))
    shape = tuple(x.shape[1:] if batched else x.shape)
    trees = []

    def sample(sigma, sigma_next):
        a, b = _f32(float(sigma)), _f32(float(sigma_next))
        if a == b:
            return torch.zeros_like(x)
        if not trees:
            import torchsde
            w0 = torch.zeros(shape, dtype=torch.float32, device=x.device)
            trees.extend(torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds)
        # torchsde rounds its ends to its tolerance's decimals and clamps (with a warning) a time beyond them, as
        # fp32 sigma_fn(t) of the smallest sigma can be: the same clamp here, without the warning
        lo = max(min(a, b), round(t0, TREE_DIGITS))
        hi = max(min(max(a, b), round(t1, TREE_DIGITS)), lo)
        w = torch.stack([tree(lo, hi) for tree in trees]) if batched else trees[0](lo, hi)
        return (w * ((1 if b > a else -1) / math.sqrt(abs(b - a)))).to(x.dtype)  # k-diffusion's unclamped span

    return sample


TREE_DIGITS = 6  # torchsde.BrownianTree's default tol, 1e-6 (k-diffusion's and diffusers' trees): times kept to 6 decimals


def _f32(v: float) -> float:
    return float(np.float32(v))


# --------------------------------------------------------------------------------------------- samplers

def _prepare(x, sigmas, extra_args):
    extra_args = {} if extra_args is None else extra_args
    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)  # coefficients are host-side
    return extra_args, sigmas, sigmas.tolist()


def _callback(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@dataclass(frozen=True)
class Churn:
    """Karras et al.'s stochastic churn as k-diffusion's sample_euler / sample_heun / sample_dpm_2 take it (A1111's
    'Sigma churn', 'Sigma tmin', 'Sigma tmax'): at each step whose sigma is in [s_tmin, s_tmax], noise raises x
    from sigma to sigma_hat = sigma * (1 + gamma), gamma = min(s_churn / steps, sqrt(2) - 1), and the step runs
    from sigma_hat. The noise comes from `noise_sampler(sigma, sigma_next)`, one draw every step (k-diffusion draws
    one even where gamma is 0); its scale (A1111's 'Sigma noise', s_noise) is the noise sampler's."""
    s_churn: float
    s_tmin: float
    s_tmax: float
    noise_sampler: NoiseSampler

    def __call__(self, x: torch.Tensor, sigmas: torch.Tensor, s: list[float], i: int
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(x, sigma_hat as a float64 tensor, sigma_hat) of step i."""
        noise = self.noise_sampler(sigmas[i], sigmas[i + 1])
        gamma = min(self.s_churn / (len(s) - 1), 2 ** 0.5 - 1) if self.s_tmin <= s[i] <= self.s_tmax else 0.0
        if gamma <= 0:
            return x, sigmas[i], s[i]
        hat = s[i] * (gamma + 1)
        return x + noise * math.sqrt(hat ** 2 - s[i] ** 2), torch.tensor(hat, dtype=torch.float64), hat


def _churn(x, s_churn: float, s_tmin: float, s_tmax: float, generator, noise_sampler) -> Churn | None:
    """The Churn of a sampler's options (None at s_churn 0: no noise drawn); noise from `noise_sampler`, else randn
    with `generator`."""
    if not s_churn:
        return None
    return Churn(s_churn, s_tmin, s_tmax, default_noise_sampler(x, generator) if noise_sampler is None
                 else noise_sampler)


def _churned(churn: Churn | None, x, sigmas, s, i) -> tuple[torch.Tensor, torch.Tensor, float]:
    return (x, sigmas[i], s[i]) if churn is None else churn(x, sigmas, s, i)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, generator: Optional[torch.Generator] = None,
                 noise_sampler: Optional[NoiseSampler] = None):
    """Euler on the probability-flow ODE (diffusers EulerDiscreteScheduler with s_churn = 0); with `s_churn`
    k-diffusion's sample_euler's churn (`Churn`)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    churn = _churn(x, s_churn, s_tmin, s_tmax, generator, noise_sampler)
    for i in _trange(len(s) - 1, disable=disable):
        x, sigma, hat = _churned(churn, x, sigmas, s, i)
        x_next, denoised = denoise_and_step(model, x, sigma, extra_args, euler_coeffs(hat, s[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, *, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, generator: Optional[torch.Generator] = None,
                noise_sampler: Optional[NoiseSampler] = None):
    """Heun's second-order method on the probability-flow ODE (diffusers HeunDiscreteScheduler): an Euler step,
    corrected with the model at its end (not on the step to sigma 0); with `s_churn` k-diffusion's sample_heun's
    churn (`Churn`)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    churn = _churn(x, s_churn, s_tmin, s_tmax, generator, noise_sampler)
    for i in _trange(len(s) - 1, disable=disable):
        x, sigma, hat = _churned(churn, x, sigmas, s, i)
        x_next, denoised = denoise_and_step(model, x, sigma, extra_args, euler_coeffs(hat, s[i + 1]))
        if s[i + 1] > 0:
            x_next, _ = denoise_and_step(model, x_next, sigmas[i + 1], extra_args, heun_coeffs(hat, s[i + 1]),
                                         denoised)
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, *, order: int = 4):
    """Linear multistep (diffusers LMSDiscreteScheduler, step(order=4)): order `order`, lower on the first
    steps (min(i + 1, order)). Each step is one model call and one linear update; the earlier steps'
    derivatives enter as one combined tensor in old_denoised's place (see the module docstring)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    ds: list[torch.Tensor] = []  # derivatives of the earlier steps, newest first
    for i in _trange(len(s) - 1, disable=disable):
        cur = min(i + 1, order)
        cs = lms_coeffs(s[i - cur + 1:i + 1][::-1], s[i + 1])
        history = None
        for c, d in zip(cs[1:], ds):
            history = d * c if history is None else history.add_(d, alpha=c)
        k = cs[0] / s[i]
        coeffs = (1.0 + k, -k, 0.0 if history is None else 1.0, 0.0)
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeffs, history)
        _callback(callback, x, i, sigmas[i], denoised)
        if order > 1 and s[i + 1] > 0:
            ds = [(x - denoised) / s[i]] + ds[:order - 2]
        x = x_next
    return x


@torch.no_grad()
def sample_dpm2(model, x, sigmas, extra_args=None, callback=None, disable=None, *, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, generator: Optional[torch.Generator] = None,
                noise_sampler: Optional[NoiseSampler] = None):
    """DPM2 (diffusers KDPM2DiscreteScheduler; k-diffusion's sample_dpm_2): a second-order midpoint method on
    the ODE, the model at sigma and at the (log-)midpoint to the next sigma; a plain Euler step to sigma 0; with
    `s_churn` k-diffusion's churn (`Churn`)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    churn = _churn(x, s_churn, s_tmin, s_tmax, generator, noise_sampler)
    for i in _trange(len(s) - 1, disable=disable):
        x, sigma, hat = _churned(churn, x, sigmas, s, i)
        if s[i + 1] == 0:
            x_next, denoised = denoise_and_step(model, x, sigma, extra_args, euler_coeffs(hat, 0.0))
        else:
            m = dpm2_mid_sigma(hat, s[i + 1])
            x_mid, denoised = denoise_and_step(model, x, sigma, extra_args, euler_coeffs(hat, m))
            x_next, _ = denoise_and_step(model, x_mid, torch.tensor(m, dtype=torch.float64), extra_args,
                                         dpm2_coeffs(hat, m, s[i + 1]), denoised)
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


def _sample_two_call_ancestral(split, second_coeffs, model, x, sigmas, extra_args, callback, disable, noise_sampler):
    """The ancestral two-call loop of dpm2_a and dpmpp_2s_a: the Euler step to the midpoint, then the update
    with `second_coeffs(s, m, s_down, s_up)` and fresh noise; one Euler step when s_down = 0 (the last)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    for i in _trange(len(s) - 1, disable=disable):
        down, up, m = split(s[i], s[i + 1])
        if down == 0:
            x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, euler_coeffs(s[i], 0.0))
        else:
            x_mid, denoised = denoise_and_step(model, x, sigmas[i], extra_args, euler_coeffs(s[i], m))
            x_next, _ = denoise_and_step(model, x_mid, torch.tensor(m, dtype=torch.float64), extra_args,
                                         second_coeffs(s[i], m, down, up), denoised,
                                         draw_noise=lambda: noise_sampler(sigmas[i], sigmas[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


@torch.no_grad()
def sample_dpm2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta: float = 1.0,
                          generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None):
    """DPM2 ancestral (diffusers KDPM2AncestralDiscreteScheduler; k-diffusion's sample_dpm_2_ancestral, eta 1):
    DPM2 to sigma_down with the midpoint between sigma and sigma_down, then sigma_up noise from
    `noise_sampler(sigma, sigma_next)` or else randn with `generator` (drawn after the second model call, as
    diffusers; none on the last step). sigma_down/up in float32 as diffusers computes them; the midpoint (which
    is sigma_next) unrounded, see fastsd.schedules.dpm2_ancestral_sigmas. Another `eta` (A1111's): k-diffusion's
    split with it (`_ancestral_split`; diffusers has no eta)."""
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    split = dpm2_ancestral_sigmas if eta == 1.0 else functools.partial(_ancestral_split, eta=eta)
    return _sample_two_call_ancestral(split, dpm2_coeffs, model, x, sigmas, extra_args, callback, disable,
                                      noise_sampler)


def _ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """(sigma_down, sigma_up, sigma_mid) of k-diffusion's two-call ancestral steps (sample_dpmpp_2s_ancestral,
    sample_dpm_2_ancestral) with `eta`: get_ancestral_step's split in float64 and the midpoint between sigma and
    sigma_down in log space (2S: sigma_fn(t + h/2); DPM2: log-lerp at 0.5), their geometric mean."""
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    return down, up, math.sqrt(sigma * down)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta: float = 1.0,
                              generator: Optional[torch.Generator] = None,
                              noise_sampler: Optional[NoiseSampler] = None):
    """DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral with `eta`, 1 by default, A1111's
    "DPM++ 2S a"; no diffusers twin): a single-step second-order DPM-Solver++ step to sigma_down through the
    midpoint sqrt(sigma * sigma_down), then sigma_up noise (none on the last step)."""
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    return _sample_two_call_ancestral(functools.partial(_ancestral_split, eta=eta), dpmpp_2s_coeffs, model, x, sigmas,
                                      extra_args, callback, disable, noise_sampler)


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """UniPC (diffusers UniPCMultistepScheduler: bh2, solver_order 2, data prediction, lower_order_final,
    corrector on every step): each model call's output corrects the sample it was called at (UniC) and
    predicts the next (UniP) in one linear update; the corrected sample is kept for the next step."""
    _no_opts("unipc", opts)
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    n = len(s) - 1
    xc = d_prev = d_prev2 = None  # the last corrected sample, the last two model outputs
    p_prev = 0  # the previous predictor's order (the corrector's)
    for i in _trange(n, disable=disable):
        p = min(2, n - i, i + 1)  # warm-up and lower_order_final
        a, p0, p1 = unipc_predictor_coeffs(s[i - 1] if p == 2 else None, s[i], s[i + 1])
        if i == 0:
            k, q, coeffs, history = None, 0.0, (a, p0, 0.0, 0.0), None
        else:
            ax, q, k1, k2 = unipc_corrector_coeffs(s[i - 2] if p_prev == 2 else None, s[i - 1], s[i])
            k = xc * ax
            k.add_(d_prev, alpha=k1)
            if k2:
                k.add_(d_prev2, alpha=k2)
            history = None
            if a or p1:
                history = k * a
                if p1:
                    history.add_(d_prev, alpha=p1)
            coeffs = (0.0, a * q + p0, 1.0 if history is not None else 0.0, 0.0)
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeffs, history)
        _callback(callback, x, i, sigmas[i], denoised)
        if i < n - 1:
            xc = x if k is None else k.add_(denoised, alpha=q)
            d_prev2, d_prev, p_prev = d_prev, denoised, p
        x = x_next
    return x


def _sample_ancestral(coeff_fn, model, x, sigmas, extra_args, callback, disable, generator, noise_sampler,
                      cfgpp: bool = False):
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    for i in _trange(len(s) - 1, disable=disable):
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeff_fn(s[i], s[i + 1]),
                                            draw_noise=lambda: noise_sampler(sigmas[i], sigmas[i + 1]), cfgpp=cfgpp)
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
def sample_ddim_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta: float = 0.0,
                      generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None):
    """DDIM with CFG++ (A1111's "DDIM CFG++", its sd_samplers_timesteps_impl.ddim_cfgpp, in sigma space): see
    ddim_cfgpp in the module's docstring. The callback's denoised is the x0 at lambda (A1111's pred_x0)."""
    return _sample_ancestral(lambda a, b: ancestral_coeffs(a, b, eta), model, x, sigmas, extra_args, callback,
                             disable, generator, noise_sampler, cfgpp=True)


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
                        generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None,
                        solver_type: str = "midpoint", eta: float = 1.0):
    """DPM-Solver++(2M) SDE (diffusers DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", midpoint or
    with solver_type="heun" its heun variant, final sigma 0; the same math as k-diffusion's sample_dpmpp_2m_sde
    with eta 1 and this solver_type; another `eta`: k-diffusion's): dpmpp_2m's steps with new noise from
    `noise_sampler(sigma, sigma_next)` (the pipeline's: A1111's Brownian tree), else randn with `generator`
    (diffusers' stream); none on the step to sigma 0."""
    dpmpp_2m_sde_coeffs(None, 1.0, 0.0, solver_type)  # validates solver_type
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, generator, torch.float32)
    old_denoised = None
    for i in _trange(len(s) - 1, disable=disable):
        coeffs = dpmpp_2m_sde_coeffs(None if old_denoised is None else s[i - 1], s[i], s[i + 1], solver_type, eta)
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeffs, old_denoised,
                                            draw_noise=lambda: noise_sampler(sigmas[i], sigmas[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x, old_denoised = x_next, denoised
    return x


def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                             generator: Optional[torch.Generator] = None,
                             noise_sampler: Optional[NoiseSampler] = None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE with the heun-type second-order term (A1111's "DPM++ 2M SDE Heun"; diffusers
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun"))."""
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, generator=generator,
                               noise_sampler=noise_sampler, solver_type="heun", eta=eta)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                        generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None,
                        variant: str = "k-diffusion", eta: float = 1.0):
    """DPM-Solver++(3M) SDE, eta 1 (another `eta`: k-diffusion's with it): order 1 on the first step, 2 on the
    second, 3 after; x' = D on the step to sigma 0; new noise each step from `noise_sampler(sigma, sigma_next)`
    (the pipeline's: A1111's Brownian tree), else randn (fp32) with `generator`.
    The earlier denoised outputs enter as one combined tensor in old_denoised's place (c = 1), as lms does.

    variant "k-diffusion" (default): sample_dpmpp_3m_sde (A1111's "DPM++ 3M SDE"), see dpmpp_3m_sde_coeffs.
    variant "diffusers": DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++") (midpoint,
    lower_order_final: also order 2 on the next-to-last step when there are fewer than 15 steps; in img2img that
    rule looks at the partial schedule where diffusers looks at the full one); kept to hold the code to diffusers'
    steps in tests, not for use: it does not converge (below).

    The two are not the same math: diffusers' third-order D2 weight is (E - 2h)/(4h^2) - 1/2, k-diffusion's
    (E - 2h)/(4h^2) + 1/2 (E = 1 - e^-2h, D2 = (D1_0 - D1_1)/(r0 + r1)); their second-order steps weight
    (D - D_prev)/r0 by E/2 (midpoint) vs 1 - E/(2h); and k-diffusion has no lower-order next-to-last step. diffusers'
    D2 weight does not vanish as h -> 0, so its chain does not converge with the step count (on Gaussian data its
    output std is 5-9% too large at 30 steps and ~7x at 400 on its default schedule; k-diffusion's is within
    1.6% at 30 and 0.05% at 400). A1111 also runs it on a schedule with the next-to-last sigma discarded (its `discard_next_to_last_sigma`)
    and, since 1.9, the exponential one by default; fastsd uses diffusers' DPM-Solver (Karras) schedule."""
    dpmpp_3m_sde_coeffs(None, None, 1.0, 0.0, variant, eta)  # validates variant and eta
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, generator, torch.float32)
    n = len(s) - 1
    lower_second = variant == "diffusers" and n < 15
    d_prev = d_prev2 = None
    for i in _trange(n, disable=disable):
        order = 1 if i == 0 else 2 if i == 1 or (i == n - 2 and lower_second) else 3  # warm-up, lower_order_final
        a, b, c1, c2, d = dpmpp_3m_sde_coeffs(s[i - 2] if order == 3 else None, s[i - 1] if order >= 2 else None,
                                              s[i], s[i + 1], variant, eta)
        history = None
        if c1:
            history = d_prev * c1
            if c2:
                history.add_(d_prev2, alpha=c2)
        x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args,
                                            (a, b, 0.0 if history is None else 1.0, d), history,
                                            draw_noise=lambda: noise_sampler(sigmas[i], sigmas[i + 1]))
        _callback(callback, x, i, sigmas[i], denoised)
        x, d_prev, d_prev2 = x_next, denoised, d_prev
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                     generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None,
                     eta: float = 1.0):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde with r = 1/2, `eta` (1: diffusers'), s_noise 1; A1111's
    "DPM++ SDE";
    diffusers' DPMSolverSDEScheduler): per step the model at (x, s) -> D, the ancestral step to the midpoint
    m = sqrt(s s') with noise(s, m), the model at (x_m, m) -> D2, then the ancestral step from x to s' with D2
    (dpmpp_sde_coeffs) and noise(s, s'); one Euler step (x' = D) to sigma 0. The two noises are increments of one
    Brownian motion over overlapping intervals, so `noise_sampler` must be a Brownian one: by default a
    `brownian_noise_sampler` over `sigmas` seeded by a draw from `generator` (the pipeline passes one seeded by the
    images' seeds, A1111's)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = brownian_noise_sampler(x, sigmas, int(torch.randint(0, 2 ** 63 - 1, (), generator=generator)))
    for i in _trange(len(s) - 1, disable=disable):
        if s[i + 1] == 0 or s[i + 1] == s[i]:  # the last step (or an empty interval): one Euler step
            x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, euler_coeffs(s[i], s[i + 1]))
        else:
            m = math.sqrt(s[i] * s[i + 1])  # k-diffusion's sigma_fn(t + h/2)
            mid = torch.tensor(m, dtype=torch.float64)
            q, q_mid, q_next = _sigma_fn_times(s[i], s[i + 1])
            x_mid, denoised = denoise_and_step(model, x, sigmas[i], extra_args, ancestral_coeffs(s[i], m, eta),
                                               draw_noise=lambda: noise_sampler(q, q_mid))
            x_next, _ = denoise_and_step(model, x_mid, mid, extra_args, dpmpp_sde_coeffs(s[i], s[i + 1], eta), x,
                                         draw_noise=lambda: noise_sampler(q, q_next))
        _callback(callback, x, i, sigmas[i], denoised)
        x = x_next
    return x


def _sigma_fn_times(sigma: float, sigma_next: float) -> list[torch.Tensor]:
    """The times k-diffusion's sample_dpmpp_sde (and diffusers' DPMSolverSDEScheduler) ask their Brownian tree about,
    as they compute them in fp32: sigma_fn(t), sigma_fn(t + h/2), sigma_fn(t_next) for t = -log(sigma). A Brownian
    path moves by ~sqrt(dt) over dt, so an fp32 ulp of time shows in the noise at ~1e-4: the same rounding here
    keeps A1111's numbers."""
    t, t_next = (torch.tensor(v, dtype=torch.float32).log().neg() for v in (sigma, sigma_next))
    return [v.neg().exp().double() for v in (t, t + (t_next - t) * 0.5, t_next)]


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


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """PLMS (diffusers PNDMScheduler with skip_prk_steps=True, as its SD pipelines use; A1111's "PLMS", LDM's
    PLMSSampler): a Heun step first (diffusers calls the UNet a second time at the first step's target timestep,
    the repeated timestep of its list; no Heun step when it is the only step), then linear multistep of order 2, 3
    and 4 on the model's eps; n + 1 model calls for n steps. Its schedule is DDIM's ("leading", final sigma
    sigma[t=0]). img2img starts over with the warm-up on the partial schedule (A1111); diffusers does not (see
    tests/test_samplers_extra.py)."""
    _no_opts("plms", opts)
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    n = len(s) - 1
    eps: list[torch.Tensor] = []  # the earlier steps' eps, newest first (the first model call of each step)
    for i in _trange(n, disable=disable):
        h = s[i + 1] - s[i]
        if i == 0 and n > 1 and s[1] > 0:  # warm-up: Heun (diffusers' counter 0 and 1)
            x_next, denoised = denoise_and_step(model, x, sigmas[0], extra_args, euler_coeffs(s[0], s[1]))
            x_next, _ = denoise_and_step(model, x_next, sigmas[1], extra_args, heun_coeffs(s[0], s[1]), denoised)
        else:
            w = PLMS_WEIGHTS[len(eps)]
            history = None
            for c, e in zip(w[1:], eps):
                history = e * (c * h) if history is None else history.add_(e, alpha=c * h)
            k = w[0] * h / s[i]
            coeffs = (1.0 + k, -k, 0.0 if history is None else 1.0, 0.0)
            x_next, denoised = denoise_and_step(model, x, sigmas[i], extra_args, coeffs, history)
        _callback(callback, x, i, sigmas[i], denoised)
        if i < n - 1:
            eps = [(x - denoised) / s[i]] + eps[:2]
        x = x_next
    return x


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                   generator: Optional[torch.Generator] = None, noise_sampler: Optional[NoiseSampler] = None):
    """Restart sampling (Xu et al. 2023) as A1111's "Restart" (its modules/sd_samplers_extra.py restart_sampler,
    s_noise 1; no diffusers twin): Heun steps (an Euler step to sigma 0) over `restart_steps(sigmas)`; where a step
    starts above the previous one's end, fresh noise noise_sampler(s_end, s_start) (else randn with `generator`)
    times sqrt(s_start^2 - s_end^2) takes x back up, added in the previous step's update. One callback per Heun
    step (i counts them: len(sigmas) - 1 of them unless the rule finds no restart segment), two model calls each
    but the last, as A1111 (which counts it 'second_order': 2 x steps for its progress)."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    pairs = restart_steps(s)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    for j in _trange(len(pairs), disable=disable):
        a, b = pairs[j]
        up_to = pairs[j + 1][0] if j + 1 < len(pairs) else b
        up = math.sqrt(up_to * up_to - b * b) if up_to > b else 0.0
        draw = lambda: noise_sampler(f64(b), f64(up_to))  # noqa: E731
        if b == 0:
            x_next, denoised = denoise_and_step(model, x, f64(a), extra_args, (*euler_coeffs(a, b)[:3], up),
                                                draw_noise=draw)
        else:
            x2, denoised = denoise_and_step(model, x, f64(a), extra_args, euler_coeffs(a, b))
            x_next, _ = denoise_and_step(model, x2, f64(b), extra_args, (*heun_coeffs(a, b)[:3], up), denoised,
                                         draw_noise=draw)
        _callback(callback, x, j, f64(a), denoised)
        x = x_next
    return x


# --------------------------------------------------------------------------------------------- DPM-Solver (fast, adaptive)

def dpm_solver_rows(sigma: float, sigma_next: float, order: int) -> tuple[list[float], list[np.ndarray], np.ndarray,
                                                                          np.ndarray]:
    """One single-step DPM-Solver step (Lu et al. 2022, noise-prediction form, lambda = -log sigma) from sigma to
    sigma_next, as coefficient rows over (x, D_0, D_1, D_2), D_k the model's output at the k-th call:
    (levels, inputs, high, low) with levels[k] the noise level of call k, inputs[k] the row of its input
    (inputs[0] = x), `high` the row of the order-`order` result and `low` that of the embedded lower-order one
    (order 3: DPM-Solver-2 with r1 = 1/3 over the same first two calls; order 2: DPM-Solver-1; order 1: itself).

    With h = log(sigma/sigma_next), s_k = sigma e^(-r_k h) and eps_k = (u_k - D_k)/s_k (the eps the model implies at
    its input u_k): DPM-Solver-1 x' = x - (sigma - sigma_next) eps_0 (the Euler step); -2 (r1 = 1/2, or 1/3 as the
    lower one of -3) adds -(sigma - sigma_next)/(2 r1) (eps_1 - eps_0) with u_1 the first-order step to s_1;
    -3 (r1 = 1/3, r2 = 2/3) adds -(sigma_next/r2) (phi(h) - 1) (eps_2 - eps_0), phi(h) = (e^h - 1)/h, with
    u_2 = the first-order step to s_2 - s_2 (r2/r1) (phi(r2 h) - 1) (eps_1 - eps_0). (sigma_next e^h = sigma.)
    h = 0 (a zero-length step) gives x' = x after one call."""
    x_row = np.array([1.0, 0.0, 0.0, 0.0])
    if sigma_next == sigma:
        return [sigma], [x_row], x_row, x_row

    def eps(k: int, u: np.ndarray, level: float) -> np.ndarray:
        e = u.copy()
        e[1 + k] -= 1.0
        return e / level

    h = math.log(sigma / sigma_next)
    e0 = eps(0, x_row, sigma)
    first = x_row - (sigma - sigma_next) * e0
    if order == 1:
        return [sigma], [x_row], first, first
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s1 = sigma * math.exp(-r1 * h)
    u1 = x_row - (sigma - s1) * e0
    e1 = eps(1, u1, s1)
    second = first - (sigma - sigma_next) / (2.0 * r1) * (e1 - e0)
    if order == 2:
        return [sigma, s1], [x_row, u1], second, first
    r2 = 2.0 / 3.0
    s2 = sigma * math.exp(-r2 * h)
    phi = lambda v: math.expm1(v) / v  # noqa: E731
    u2 = x_row - (sigma - s2) * e0 - s2 * (r2 / r1) * (phi(r2 * h) - 1.0) * (e1 - e0)
    e2 = eps(2, u2, s2)
    third = first - sigma_next / r2 * (phi(h) - 1.0) * (e2 - e0)
    return [sigma, s1, s2], [x_row, u1, u2], third, second


def _combine(row, x: torch.Tensor, ds: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """row . (x, D_0, D_1, ...) over the terms given, with torch ops; None when every coefficient is 0."""
    out = None
    for c, t in zip(row, [x] + ds):
        if c:
            out = t * float(c) if out is None else out.add_(t, alpha=float(c))
    return out


def _dpm_solver_step(model, x, sigma, sigma_next, order, extra_args, noise_std=0.0, draw_noise=None):
    """Run one DPM-Solver step of `order` from sigma to sigma_next: each model call goes through denoise_and_step,
    whose update builds the next call's input (or the result) from the call's output D_k (b), x and the earlier
    outputs (formed with torch ops, in old_denoised's place); the first call's update also takes a = x's
    coefficient (the Euler step it is). `noise_std` * draw_noise() is added by the last update.
    -> (x_high, the model outputs, the low-order row)."""
    levels, inputs, high, low = dpm_solver_rows(sigma, sigma_next, order)
    ds: list[torch.Tensor] = []
    u = x
    for k, level in enumerate(levels):
        last = k == len(levels) - 1
        target = high if last else inputs[k + 1]
        if k == 0:
            rest, a = None, float(target[0])
        else:
            rest, a = _combine(target[:1 + k], x, ds), 0.0
        coeffs = (a, float(target[1 + k]), 0.0 if rest is None else 1.0, noise_std if last else 0.0)
        u, d = denoise_and_step(model, u, torch.tensor(level, dtype=torch.float64), extra_args, coeffs, rest,
                                draw_noise=draw_noise if last else None)
        ds.append(d)
    return u, ds, low


def _sigma_ends(s: list[float]) -> tuple[float, float]:
    """(sigma_max, sigma_min) of a schedule handed to dpm_fast / dpm_adaptive: its first and its last nonzero level."""
    nonzero = [v for v in s if v > 0]
    if len(s) < 2 or not nonzero:
        raise ValueError("dpm_fast / dpm_adaptive need a schedule of at least one step with a nonzero level")
    return s[0], nonzero[-1]


def _ancestral_clipped(sigma: float, sigma_next: float, sigma_min: float, eta: float) -> tuple[float, float]:
    """The ancestral split of a DPM-Solver step (k-diffusion's DPMSolver with eta): the deterministic part goes to
    sigma_down, but never below sigma_min (the walk's end), and the noise makes up the rest to sigma_next."""
    if not eta:
        return sigma_next, 0.0
    down, _ = ancestral_sigmas(sigma, sigma_next, eta)
    down = max(down, sigma_min)
    return down, math.sqrt(max(sigma_next * sigma_next - down * down, 0.0))


def dpm_fast_orders(n: int) -> list[int]:
    """DPM-Solver-Fast's orders for n model calls (Lu et al. 2022, Sec. 3.4): floor(n/3) + 1 steps, third order
    but the last one or two steps, which use the remaining calls (n % 3 == 0: ..., 3, 2, 1)."""
    m = n // 3 + 1
    return [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta: float = 1.0,
                    s_noise: float = 1.0, generator: Optional[torch.Generator] = None,
                    noise_sampler: Optional[NoiseSampler] = None):
    """DPM-Solver-Fast (A1111's "DPM fast": k-diffusion's sample_dpm_fast with A1111's eta 1): n = len(sigmas) - 1
    model calls spent on floor(n/3) + 1 steps of DPM-Solver-3 (the last one or two of order 2 / 1, see
    dpm_fast_orders), uniform in log sigma from sigmas[0] down to the last nonzero level of `sigmas` (sigma_min)
    -- only the schedule's ends and length are used. With eta > 0 each step goes to the ancestral sigma_down (never
    below sigma_min) and fresh noise from `noise_sampler(sigma, sigma_next)` (else randn with `generator`) times
    s_noise brings it to sigma_next; none on the last step. Returns x at sigma_min, not denoised further (as
    k-diffusion and A1111, which decode it: its std carries sigma_min ~0.03 of noise); the callback comes once per
    step (i counts the steps: fewer than n, i + 1 ends at floor(n/3) + 1), its dict with "nfe" (model calls so
    far) and "progress" = nfe / n (1 at the last step) for a progress display that should end at n."""
    extra_args, sigmas, s = _prepare(x, sigmas, extra_args)
    sigma_max, sigma_min = _sigma_ends(s)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    orders = dpm_fast_orders(len(s) - 1)
    m = len(orders)
    span = math.log(sigma_max / sigma_min)
    levels = [sigma_max] + [sigma_max * math.exp(-span * j / m) for j in range(1, m)] + [sigma_min]
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    for i in _trange(m, disable=disable):
        down, up = _ancestral_clipped(levels[i], levels[i + 1], sigma_min, eta)
        draw = lambda: noise_sampler(f64(levels[i]), f64(levels[i + 1]))  # noqa: E731
        x_next, ds, _ = _dpm_solver_step(model, x, levels[i], down, orders[i], extra_args, up * s_noise, draw)
        if callback is not None:
            nfe = sum(orders[:i + 1])
            callback({"x": x, "i": i, "sigma": f64(levels[i]), "sigma_hat": f64(levels[i]), "denoised": ds[0],
                      "nfe": nfe, "progress": nfe / (len(s) - 1)})
        x = x_next
    return x


def _open_count(disable):
    """A progress bar of unknown length (one tick per attempt), or None without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=None, disable=disable)


class PIDStepSize:
    """The step-size controller of dpm_adaptive (k-diffusion's PIDStepSizeController; Söderlind's PID control on
    the inverse error): with the last three accepted inverse errors e0 (this one), e1, e2 the step h is scaled by
    1 + atan(f - 1), f = e0^b1 e1^b2 e2^b3, b1 = (p + i + d)/k, b2 = -(p + 2d)/k, b3 = d/k (k: the order); a step is
    accepted when that factor is at least `accept_safety`. h is rescaled after a rejection too."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float = 0.81, eps: float = 1e-8):
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.inv: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1.0 / (error + self.eps)
        self.inv = [inv, *(self.inv[1:] or [inv, inv])]
        f = self.inv[0] ** self.b[0] * self.inv[1] ** self.b[1] * self.inv[2] ** self.b[2]
        factor = 1.0 + math.atan(f - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.inv = [self.inv[0], self.inv[0], self.inv[1]]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, *, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                        icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 1.0,
                        s_noise: float = 1.0, generator: Optional[torch.Generator] = None,
                        noise_sampler: Optional[NoiseSampler] = None, info: Optional[dict] = None):
    """DPM-Solver-23 (order 3; order=2: -12) with adaptive steps in lambda = -log sigma from sigmas[0] to the last
    nonzero level of `sigmas` (A1111's "DPM adaptive": k-diffusion's sample_dpm_adaptive with its defaults and
    A1111's eta 1). Only the schedule's ends are used: the number of steps is not len(sigmas) - 1 but whatever the
    error control takes. Each attempt from s with step h (starting at h_init, in lambda) calls the model `order`
    times and compares the order-`order` result with the embedded lower-order one: error = RMS over the whole
    batch (every image and element together, as k-diffusion: one image's error sizes the steps of all) of
    (x_low - x_high) / max(atol, rtol * max(|x_low|, |x_low of the last accepted step|)); PIDStepSize decides and
    rescales h. An accepted step moves to the ancestral sigma_down (eta > 0, never below sigma_min) and adds fresh
    noise from `noise_sampler(sigma, sigma_next)` (else randn with `generator`) times s_noise; a rejected one
    retries from the same x (no noise drawn). Returns x at sigma_min (as dpm_fast).

    The callback comes once per attempt, accepted or not (k-diffusion's count): i counts attempts and can exceed
    len(sigmas) - 1; its dict also has "accepted", "error", "h" (the next step size), "nfe" and "progress" (the
    fraction of the way from sigma_max to sigma_min in log sigma done after this attempt: 1 at the end, up to
    1e-5 short). `info`, if a dict, receives steps / nfe / n_accept / n_reject."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    extra_args, sigmas, s_list = _prepare(x, sigmas, extra_args)
    sigma_max, sigma_min = _sigma_ends(s_list)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    level = lambda t: sigma_max if t == t_start else sigma_min if t == t_end else math.exp(-t)  # noqa: E731
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    pid = PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    stats = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    x_prev = x
    s = t_start
    bar = _open_count(disable)
    try:
        while s < t_end - 1e-5:
            t = min(t_end, s + pid.h)
            sig_s, sig_t = level(s), level(t)
            down, up = _ancestral_clipped(sig_s, sig_t, sigma_min, eta)
            x_high, ds, low = _dpm_solver_step(model, x, sig_s, down, order, extra_args)
            x_low = _combine(low, x, ds)
            delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = float(torch.linalg.vector_norm((x_low - x_high) / delta)) / math.sqrt(x.numel())
            if not math.isfinite(error):
                raise ValueError(f"dpm_adaptive: the step error at sigma {sig_s:.4g} is not finite")
            accept = pid.propose(error)
            stats["steps"] += 1
            stats["nfe"] += order
            stats["n_accept" if accept else "n_reject"] += 1
            if callback is not None:
                done = ((t if accept else s) - t_start) / (t_end - t_start)
                callback({"x": x, "i": stats["steps"] - 1, "sigma": f64(sig_s), "sigma_hat": f64(sig_s),
                          "denoised": ds[0], "accepted": accept, "error": error, "h": pid.h, "nfe": stats["nfe"],
                          "progress": done})
            if accept:
                if up:
                    x_high = x_high.add_(noise_sampler(f64(sig_s), f64(sig_t)), alpha=up * s_noise)
                x_prev, x, s = x_low, x_high, t
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if info is not None:
        info.update(stats)
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
    brownian: bool = False  # A1111's "brownian_noise" samplers: the pipeline hands them a Brownian tree per image
    # (`brownian_noise_sampler`); called without a noise_sampler, each draws its own default (dpmpp_sde a tree,
    # the 2M / 3M SDE ones their diffusers twins' fresh normals)

    def schedule(self, steps: int, cfg: SchedulerConfig = SchedulerConfig()) -> Schedule:
        return schedule_for(self.name, steps, cfg)

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
        return self.fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **opts)


# Each matches its diffusers twin built with from_config(SD1.5 scheduler config) (see README "Generating"):
# euler EulerDiscreteScheduler, heun HeunDiscreteScheduler, euler_a EulerAncestralDiscreteScheduler, ddim DDIMScheduler, ddpm DDPMScheduler,
# dpmpp_2m DPMSolverMultistepScheduler, dpmpp_2m_karras the same with use_karras_sigmas=True, dpmpp_2m_sde(_karras)
# the same with algorithm_type="sde-dpmsolver++", lcm LCMScheduler, euler_karras / heun_karras / lms(_karras)
# Euler / Heun / LMSDiscreteScheduler (use_karras_sigmas=True for _karras), dpm2(_karras) KDPM2DiscreteScheduler,
# dpm2_a(_karras) KDPM2AncestralDiscreteScheduler, unipc(_karras) UniPCMultistepScheduler, dpmpp_2m_sde_heun(_karras)
# DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun"). dpmpp_3m_sde(_karras) is
# k-diffusion's sample_dpmpp_3m_sde on DPMSolverMultistep's (Karras) schedule: diffusers' solver_order=3 SDE step
# is another method that does not converge (variant="diffusers", see sample_dpmpp_3m_sde). dpmpp_sde(_karras) is
# DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde, torchsde Brownian noise) on the Euler (Karras) schedule.
# dpmpp_2s_a(_karras) has none: k-diffusion's sample_dpmpp_2s_ancestral on the Euler (Karras) schedule. plms is
# PNDMScheduler(skip_prk_steps=True) (on DDIM's schedule).
# restart has none: A1111's restart_sampler (Heun steps and its restart segments) on the Euler Karras schedule,
# A1111's default for it. ddim_cfgpp has none: A1111's DDIM CFG++ on DDIM's schedule. dpm_fast and dpm_adaptive have
# none: k-diffusion's sample_dpm_fast / sample_dpm_adaptive (A1111's "DPM fast" / "DPM adaptive", eta 1); they use
# only the ends of the schedule handed in (its first and last nonzero level; the number of steps too for dpm_fast),
# and their schedule ("ends") is Euler's, which runs from the model table's sigma_max to its sigma_min then 0 (the
# ends A1111 gives them in txt2img; an img2img tail starts lower, as A1111's), but for one step: [sigma_max,
# sigma_min].
SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("euler", sample_euler, False),
    SamplerSpec("euler_a", sample_euler_ancestral, True),
    SamplerSpec("heun", sample_heun, False),
    SamplerSpec("ddim", sample_ddim, True),
    SamplerSpec("ddim_cfgpp", sample_ddim_cfgpp, True),
    SamplerSpec("ddpm", sample_ddpm, True),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, False),
    SamplerSpec("dpmpp_2m_karras", sample_dpmpp_2m, False),
    SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, True, brownian=True),
    SamplerSpec("dpmpp_2m_sde_karras", sample_dpmpp_2m_sde, True, brownian=True),
    SamplerSpec("lcm", sample_lcm, True),
    SamplerSpec("euler_karras", sample_euler, False),
    SamplerSpec("heun_karras", sample_heun, False),
    SamplerSpec("lms", sample_lms, False),
    SamplerSpec("lms_karras", sample_lms, False),
    SamplerSpec("dpm2", sample_dpm2, False),
    SamplerSpec("dpm2_karras", sample_dpm2, False),
    SamplerSpec("dpm2_a", sample_dpm2_ancestral, True),
    SamplerSpec("dpm2_a_karras", sample_dpm2_ancestral, True),
    SamplerSpec("dpmpp_2s_a", sample_dpmpp_2s_ancestral, True),
    SamplerSpec("dpmpp_2s_a_karras", sample_dpmpp_2s_ancestral, True),
    SamplerSpec("unipc", sample_unipc, False),
    SamplerSpec("unipc_karras", sample_unipc, False),
    SamplerSpec("dpmpp_sde", sample_dpmpp_sde, True, brownian=True),
    SamplerSpec("dpmpp_sde_karras", sample_dpmpp_sde, True, brownian=True),
    SamplerSpec("dpmpp_2m_sde_heun", sample_dpmpp_2m_sde_heun, True, brownian=True),
    SamplerSpec("dpmpp_2m_sde_heun_karras", sample_dpmpp_2m_sde_heun, True, brownian=True),
    SamplerSpec("dpmpp_3m_sde", sample_dpmpp_3m_sde, True, brownian=True),
    SamplerSpec("dpmpp_3m_sde_karras", sample_dpmpp_3m_sde, True, brownian=True),
    SamplerSpec("plms", sample_plms, False),
    SamplerSpec("restart", sample_restart, True),
    SamplerSpec("dpm_fast", sample_dpm_fast, True),
    SamplerSpec("dpm_adaptive", sample_dpm_adaptive, True),
)}

# The samplers that take A1111's eta (its request field / options "eta_ancestral", "eta_ddim"), their default eta and
# the infotext key A1111 writes a different one under (DPM fast / adaptive: A1111 hands them its eta_ancestral, 1,
# where k-diffusion's own default is 0)
ETA_SAMPLERS = {"euler_a": (1.0, "Eta"), "ddim": (0.0, "Eta DDIM"), "dpm_fast": (1.0, "Eta"),
                "dpm_adaptive": (1.0, "Eta"),
                **{f"{n}{k}": (1.0, "Eta") for n in ("dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde",
                                                      "dpmpp_2m_sde_heun", "dpmpp_3m_sde") for k in ("", "_karras")}}

ETA_TAKERS = ("Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE (Heun), DPM++ 3M SDE, DPM fast, DPM adaptive and "
              "DDIM")  # (for messages)

# A1111's k-diffusion sampler parameters (its sampler_extra_params): the churn (s_churn, s_tmin, s_tmax; `Churn`) of
# Euler, Heun and DPM2, and s_noise, the scale of the noise of those and of its SDE / ancestral samplers but Euler a
# (fastsd.pipeline scales the samplers' noise sampler by it); their infotext keys, A1111's
CHURN_SAMPLERS = frozenset(f"{n}{k}" for n in ("euler", "heun", "dpm2") for k in ("", "_karras"))
S_NOISE_SAMPLERS = CHURN_SAMPLERS | {"dpm_fast"} | {
    f"{n}{k}" for n in ("dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
    for k in ("", "_karras")}
SIGMA_KEYS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
SIGMA_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}  # (s_tmax 0: no bound, as A1111's)
_CHURNERS = "Euler, Heun and DPM2"
SIGMA_TAKERS = {"s_churn": _CHURNERS, "s_tmin": _CHURNERS, "s_tmax": _CHURNERS,  # (for messages)
                "s_noise": "Euler, Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE (Heun), DPM++ 3M SDE and "
                           "DPM fast"}


def takes_sigma_param(sampler: str, field: str) -> bool:
    """Whether `sampler` takes A1111's churn / s_noise parameter `field` (a SIGMA_DEFAULTS key)."""
    return get_sampler(sampler).name in (S_NOISE_SAMPLERS if field == "s_noise" else CHURN_SAMPLERS)


def sigma_params(settings, sampler: str, *, taken: bool = True) -> dict:
    """The settings' churn / s_noise values (SIGMA_DEFAULTS' fields) other than their defaults that `sampler` takes
    (taken=False: those it takes none of)."""
    return {k: getattr(settings, k) for k, default in SIGMA_DEFAULTS.items()
            if getattr(settings, k) != default and takes_sigma_param(sampler, k) == taken}

# A1111's "second order" samplers (two model calls a step): it schedules prompt editing over twice their steps
SECOND_ORDER = ("heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "restart")


def prompt_steps(sampler: str, steps: int) -> int:
    """The steps A1111 schedules prompt editing over (fastsd.prompt_schedule) for `steps` steps of `sampler`: twice
    as many for its second-order samplers, whose model calls it counts."""
    return steps * 2 if get_sampler(sampler).name.removesuffix("_karras") in SECOND_ORDER else steps


# The names A1111 writes in its infotext ("Sampler: Euler a").
A1111_NAMES: dict[str, str] = {"euler": "Euler", "heun": "Heun", "euler_a": "Euler a", "ddim": "DDIM", "ddpm": "DDPM",
                               "ddim_cfgpp": "DDIM CFG++",
                               "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
                               "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "lcm": "LCM",
                               # A1111 1.9+ writes these as "Sampler: Euler, Schedule type: Karras" and reads the
                               # joint name back as sampler + schedule, as it does "DPM++ 2M Karras"
                               "euler_karras": "Euler Karras", "heun_karras": "Heun Karras",
                               "lms": "LMS", "lms_karras": "LMS Karras", "dpm2": "DPM2", "dpm2_karras": "DPM2 Karras",
                               "dpm2_a": "DPM2 a", "dpm2_a_karras": "DPM2 a Karras",
                               "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_2s_a_karras": "DPM++ 2S a Karras",
                               "unipc": "UniPC", "unipc_karras": "UniPC Karras",
                               "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_karras": "DPM++ SDE Karras",
                               "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
                               "dpmpp_2m_sde_heun_karras": "DPM++ 2M SDE Heun Karras",
                               "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_karras": "DPM++ 3M SDE Karras",
                               "plms": "PLMS", "restart": "Restart", "dpm_fast": "DPM fast",
                               "dpm_adaptive": "DPM adaptive"}

# After normalisation (lower case, "++" -> "pp", runs of spaces/hyphens -> "_", leading "k_"/"sample_" dropped),
# the A1111 names become canonical ("Euler a" -> euler_a, "DPM++ 2M Karras" -> dpmpp_2m_karras); a few more:
ALIASES: dict[str, str] = {
    "euler_ancestral": "euler_a",
    "eulera": "euler_a",
    "dpmpp2m": "dpmpp_2m",
    "dpmpp2m_karras": "dpmpp_2m_karras",
    "dpm_solver_multistep": "dpmpp_2m",
    "dpmsolver_multistep": "dpmpp_2m",
    # k-diffusion's function names and A1111's k_ aliases ("k_dpm_2_a", "k_lms_ka": _ka for Karras)
    "lms_ka": "lms_karras",
    "dpm_2": "dpm2",
    "dpm_2_ka": "dpm2_karras",
    "dpm_2_a": "dpm2_a",
    "dpm_2_a_ka": "dpm2_a_karras",
    "dpm_2_ancestral": "dpm2_a",
    "dpmpp_2s_a_ka": "dpmpp_2s_a_karras",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "dpmpp_2m_ka": "dpmpp_2m_karras",
    "dpmpp_sde_ka": "dpmpp_sde_karras",
    "dpmpp_2m_sde_ka": "dpmpp_2m_sde_karras",  # A1111 lists it for "DPM++ 2M SDE" too (a typo there)
    "dpmpp_2m_sde_heun_ka": "dpmpp_2m_sde_heun_karras",
    "dpmpp_3m_sde_ka": "dpmpp_3m_sde_karras",
    "dpm_ad": "dpm_adaptive",  # A1111's k_dpm_ad ("k_dpm_fast" resolves by the k_ rule)
}


def resolve_sampler_name(name: str) -> str:
    """Canonical sampler name for a canonical name or alias (case-insensitive); ValueError if unknown."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower().replace("++", "pp"))
    for prefix in ("sample_", "k_"):
        if key.startswith(prefix) and key[len(prefix):] in {**SAMPLERS, **ALIASES}:
            key = key[len(prefix):]
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        from fastsd.schedule_types import resolve_schedule_type, split_joint  # (a joint name with a type: a hint)

        base, suffix = split_joint(name)
        if suffix is not None and _known(base):
            raise ValueError(f"unknown sampler {name!r}: give the sampler {base!r} with the schedule type "
                             f"{resolve_schedule_type(suffix)!r} (--schedule-type)")
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} (A1111 names such as "
                         f"'Euler a', 'DPM++ 2M Karras' and k_ prefixes like 'k_euler_a' are accepted too)")
    return key


def _known(name: str) -> bool:
    try:
        resolve_sampler_name(name)
    except ValueError:
        return False
    return True


def get_sampler(name: str) -> SamplerSpec:
    """The sampler (function + schedule recipe) for a canonical name or alias, e.g. "DPM++ 2M Karras"."""
    return SAMPLERS[resolve_sampler_name(name)]
