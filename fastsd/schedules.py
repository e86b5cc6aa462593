"""Noise schedules for SD1.x in k-diffusion's sigma parametrisation, matching diffusers' schedulers exactly.

SD1.x is a discrete DDPM with T = 1000 training steps. Its noise level at step t is
`sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])` (k-diffusion's "VE" view of the VP process):
a sampler state `x = x0 + sigma * eps` ("k-space") relates to the VP latents diffusers' DDIM/DDPM/DPM-Solver
carry by `x_vp = x / sqrt(1 + sigma^2)`; Euler/Euler a in diffusers already work in k-space.

`schedule_for(sampler_name, steps)` returns a `Schedule`: the exact sigmas (descending, plus a final
sigma) and the matching UNet timesteps diffusers' twin scheduler would use, built with
`XScheduler.from_config(SD15)` and each class's own defaults:

  ddpm             DDPMScheduler                 "leading" int timesteps (steps_offset=1), final sigma 0
  ddim             DDIMScheduler                 "leading" int timesteps, final sigma = sigma[t=0]
                                                  (set_alpha_to_one=False: the last step lands on alphas_cumprod[0])
  euler, euler_a   Euler(Ancestral)Discrete      "linspace" float timesteps (fractional in general), sigma by
                                                  linear interpolation in t of the 1000 sigmas, final sigma 0
  dpmpp_2m, unipc  DPMSolverMultistep, UniPC     its own "linspace": linspace(0, 999, n+1).round()[::-1][:-1]
                                                  (int), final sigma 0 (final_sigmas_type="zero"); also
                                                  dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde
  dpmpp_2m_karras  DPMSolverMultistep(use_karras_sigmas=True), also unipc_karras and the SDE ones' _karras:
                                                  Karras sigmas between sigma[0] and sigma[999]; the UNet gets
                                                  round(sigma_to_t(sigma)) (an int timestep whose own sigma
                                                  differs slightly from the Karras sigma the solver uses)
  euler_karras, heun_karras, lms(_karras)          Euler/Heun/LMSDiscrete: Euler's "linspace" schedule, or with
                                                  use_karras_sigmas=True the same Karras sigmas, the UNet getting
                                                  the fractional sigma_to_t(sigma) (not rounded); also
                                                  dpmpp_2s_a(_karras) (no diffusers twin) and dpmpp_sde(_karras)
                                                  (DPMSolverSDE's, the same to fp32 ulps)
  plms             PNDMScheduler(skip_prk_steps=True): DDIM's schedule; diffusers' timesteps list the second one
                                                  twice (the warm-up's second UNet call, a Heun step)
  restart          no twin: Euler's Karras schedule (A1111's default for Restart)
  dpm_fast, dpm_adaptive  "ends": no twin; the samplers take only the schedule's first and last nonzero sigma
                                                  (and dpm_fast its step count): Euler's schedule, the table's
                                                  sigma_max ... sigma_min then 0; for one step [sigma_max, sigma_min]
                                                  (Euler's one step is [sigma_min, 0]; out_scale then 0.99957)
  dpm2(_karras), dpm2_a(_karras)                   KDPM2(Ancestral)Discrete: Euler's sigmas, Karras ones with
                                                  rounded timesteps; each step but the last also calls the UNet at
                                                  a midpoint sigma (`Schedule.mid_sigmas`, with its fractional
                                                  timestep in `mid_timesteps`)

All arithmetic mirrors diffusers' dtypes (float32 betas/alphas_cumprod, numpy interpolation), so sigmas and
timesteps come out bit-identical to diffusers' `scheduler.sigmas` / `scheduler.timesteps` (as float32 values;
stored here as float64 tensors so host-side coefficient math loses nothing further).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fastsd.config import SchedulerConfig

_DEFAULT_CFG = SchedulerConfig()


# --------------------------------------------------------------------------------------------- training schedule

def betas_for(cfg: SchedulerConfig = _DEFAULT_CFG, *, ldm: bool = False) -> torch.Tensor:
    """The training betas (T,) float32.

    Default: exactly diffusers' `torch.linspace(sqrt(b0), sqrt(b1), T, dtype=float32) ** 2` (float32 linspace).
    `ldm=True`: the CompVis/LDM (and so k-diffusion-with-LDM-model / A1111) way, linspace and square in
    float64 then cast; the two differ by ~1 ulp in about half the entries (~1e-6 relative in alphas_cumprod).
    """
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        if ldm:
            return (torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float64) ** 2).float()
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "linear":
        if ldm:
            return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64).float()
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    raise ValueError(f"unsupported beta_schedule {cfg.beta_schedule!r} (expected 'scaled_linear' or 'linear')")


def alphas_cumprod(cfg: SchedulerConfig = _DEFAULT_CFG, *, ldm: bool = False) -> torch.Tensor:
    """(T,) float32 cumulative product of (1 - betas); float32 cumprod as diffusers (float64 then cast if ldm)."""
    betas = betas_for(cfg, ldm=ldm)
    if ldm:
        return torch.cumprod(1.0 - betas.double(), 0).float()
    return torch.cumprod(1.0 - betas, 0)


def sigmas_from_alphas_cumprod(ac: torch.Tensor) -> torch.Tensor:
    """k-diffusion sigmas ((1 - a) / a) ** 0.5, ascending in t; computed in ac's dtype (float32 as diffusers)."""
    return ((1 - ac) / ac) ** 0.5


# --------------------------------------------------------------------------------------------- timestep spacings

def leading_timesteps(n: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> np.ndarray:
    """DDIM/DDPM "leading": arange(n) * (T // n) + steps_offset, descending, int64 (n=10: 901, 801, ..., 1)."""
    _check_steps(n, num_train_timesteps)
    step_ratio = num_train_timesteps // n
    return (np.arange(0, n) * step_ratio).round()[::-1].astype(np.int64) + steps_offset


def linspace_timesteps(n: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Euler/Euler a "linspace": linspace(0, T-1, n) in float32, descending; fractional unless (T-1) % (n-1) == 0."""
    _check_steps(n, num_train_timesteps)
    return np.linspace(0, num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()


def dpm_linspace_timesteps(n: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """DPMSolverMultistep "linspace": linspace(0, T-1, n+1).round() (numpy half-to-even), descending, drop the 0."""
    _check_steps(n, num_train_timesteps)
    return np.linspace(0, num_train_timesteps - 1, n + 1).round()[::-1][:-1].astype(np.int64)


LCM_ORIGINAL_STEPS = 50  # diffusers' LCMScheduler original_inference_steps: the distillation schedule's length


def lcm_timesteps(n: int, num_train_timesteps: int = 1000, original_steps: int = LCM_ORIGINAL_STEPS) -> np.ndarray:
    """diffusers' LCMScheduler.set_timesteps(n): n of the distillation schedule's `original_steps` timesteps
    (k - 1, 2k - 1, ..., T - 1 with k = T / original_steps), evenly picked from the top, descending."""
    if not 1 <= n <= original_steps:
        raise ValueError(f"LCM takes 1 to {original_steps} steps, got {n}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, n values from sigma_max down to sigma_min (float64, no final zero)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_at(timesteps, sigma_table: np.ndarray) -> np.ndarray:
    """Sigma for (possibly fractional) timesteps: linear interpolation *in sigma* over integer t (diffusers'
    `np.interp(timesteps, arange(T), sigmas)`), float64 out."""
    sigma_table = np.asarray(sigma_table)
    return np.interp(timesteps, np.arange(0, len(sigma_table)), sigma_table)


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timesteps for sigmas (any shape, float64): linear interpolation in log-sigma (diffusers'
    `_sigma_to_t`, which is also k-diffusion's `DiscreteSchedule.sigma_to_t`). `log_sigmas` = log of the
    ascending (T,) sigma table, on sigma's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    log_sigmas = torch.as_tensor(log_sigmas, dtype=torch.float64, device=sigma.device)
    flat = sigma.reshape(-1)
    ls = flat.clamp_min(1e-10).log()
    dists = ls - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(0).argmax(0).clamp(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = ((low - ls) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(sigma.shape)


def _check_steps(n: int, T: int) -> None:
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must be in [1, {T}], got {n}")


# --------------------------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class Schedule:
    """Matching noise levels and UNet timesteps for one sampling run.

    sigmas      (n+1,) float64, descending; step i goes from sigmas[i] to sigmas[i+1]; the last entry is the
                final noise level (0, or sigma_min for DDIM with set_alpha_to_one=False).
    timesteps   (n,) float64: the timestep the UNet is called with at sigmas[i] (integer-valued for
                DDIM/DDPM/DPM, fractional for Euler "linspace"), as diffusers' `scheduler.timesteps`.
    init_noise_sigma  txt2img start: x = randn * init_noise_sigma (k-space). sigma_max for Euler (diffusers'
                init_noise_sigma), sqrt(1 + sigma_max^2) for the VP schedulers (diffusers starts those with
                unit-variance latents x_vp = randn, i.e. x = randn / alpha).
    order       diffusers' `scheduler.order` (1 for all SD samplers here), for img2img slicing.
    mid_sigmas  (n,) float64 or None: KDPM2's midpoint noise level of each step (NaN on a step without one:
                the last), as the sampler computes it (`dpm2_mid_sigma` / `dpm2_ancestral_sigmas`), and
    mid_timesteps (n,) the UNet timestep diffusers gives it (fractional); the denoiser looks these up as it
                does the main sigmas' timesteps.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: float
    order: int = 1
    mid_sigmas: torch.Tensor | None = None
    mid_timesteps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def out_scale(self) -> float:
        """Multiply the sampler's final x by this to get diffusers' final latents (x_vp at the last sigma):
        1 when the schedule ends at sigma 0; 1/sqrt(1 + sigma_min^2) = sqrt(alphas_cumprod[0]) for DDIM."""
        s = float(self.sigmas[-1])
        return 1.0 / math.sqrt(1.0 + s * s)

    def img2img_start(self, strength: float) -> int:
        """Index into sigmas/timesteps where img2img starts (see `img2img_start_index`)."""
        return img2img_start_index(len(self), strength, self.order)

    def tail(self, start: int) -> "Schedule":
        """The schedule from step `start` on (img2img): sigmas[start:], timesteps[start:]; x0 is noised to
        x = x0 + sigmas[start] * noise (what every diffusers scheduler's add_noise amounts to in k-space)."""
        mids = (None, None) if self.mid_sigmas is None else (self.mid_sigmas[start:], self.mid_timesteps[start:])
        return Schedule(self.sigmas[start:], self.timesteps[start:], self.init_noise_sigma, self.order, *mids)

    def timestep_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, timesteps): every noise level the sampler calls the model at with diffusers' timestep for
        it (the main sigmas but the final one, then the midpoints if any)."""
        if self.mid_sigmas is None:
            return self.sigmas[:-1].double(), self.timesteps.double()
        keep = ~torch.isnan(self.mid_sigmas)
        return (torch.cat([self.sigmas[:-1].double(), self.mid_sigmas[keep].double()]),
                torch.cat([self.timesteps.double(), self.mid_timesteps[keep].double()]))


def img2img_start_index(steps: int, strength: float, order: int = 1) -> int:
    """A1111's img2img (setup_img2img_steps, sample_img2img): t_enc = int(min(strength, 0.999) * steps) and the
    t_enc + 1 steps from sigmas[steps - t_enc - 1] run, at least one (strength 0: the last step); the schedule's index
    is that times `order` (diffusers' second-order schedules list each step's levels `order` times). diffusers
    runs int(steps * strength) steps from one level lower (none below 1 / steps)."""
    t_enc = int(min(strength, 0.999) * steps)
    return (steps - t_enc - 1) * order


# Schedule of each canonical sampler name: (kind, karras). kind names the diffusers scheduler class.
SAMPLER_SCHEDULES: dict[str, tuple[str, bool]] = {
    "ddpm": ("ddpm", False),
    "ddim": ("ddim", False),
    "ddim_cfgpp": ("ddim", False),  # A1111's DDIM CFG++: DDIM's timesteps (its timestep samplers', as diffusers' DDIM)
    "euler": ("euler", False),
    "heun": ("euler", False),  # diffusers' Heun: Euler's sigmas, each but the first and last visited twice
    "euler_karras": ("euler", True),
    "heun_karras": ("euler", True),
    "lms": ("euler", False),  # LMSDiscreteScheduler: Euler's schedule
    "lms_karras": ("euler", True),
    "dpm2": ("kdpm2", False),
    "dpm2_karras": ("kdpm2", True),
    "dpm2_a": ("kdpm2_a", False),
    "dpm2_a_karras": ("kdpm2_a", True),
    "dpmpp_2s_a": ("euler", False),  # no diffusers twin: Euler's (Karras) schedule
    "dpmpp_2s_a_karras": ("euler", True),
    "unipc": ("dpm", False),  # UniPCMultistepScheduler: DPM-Solver's schedule
    "unipc_karras": ("dpm", True),
    "euler_a": ("euler", False),
    "dpmpp_2m": ("dpm", False),
    "dpmpp_2m_karras": ("dpm", True),
    "dpmpp_2m_sde": ("dpm", False),
    "dpmpp_2m_sde_karras": ("dpm", True),
    "dpmpp_2m_sde_heun": ("dpm", False),  # DPMSolverMultistep(solver_type="heun")
    "dpmpp_2m_sde_heun_karras": ("dpm", True),
    "dpmpp_3m_sde": ("dpm", False),  # DPMSolverMultistep(solver_order=3)
    "dpmpp_3m_sde_karras": ("dpm", True),
    "dpmpp_sde": ("euler", False),  # Euler's (Karras) schedule, as dpmpp_2s_a (DPMSolverSDEScheduler's, to fp32 ulps)
    "dpmpp_sde_karras": ("euler", True),
    "lcm": ("lcm", False),
    "plms": ("ddim", False),  # PNDMScheduler(skip_prk_steps=True): DDIM's; it repeats timesteps[1] for its warm-up
    "restart": ("euler", True),  # no diffusers twin: A1111's default schedule for it, Karras (Euler Karras's)
    # no twin; they read only the schedule's ends (first, last nonzero) and dpm_fast its length: "ends" is Euler's,
    # from the table's sigma_max (t = 999) to its sigma_min (t = 0) then 0, A1111's sigma_max / sigma_min for them
    # (one step: [sigma_max, sigma_min], where Euler's is [sigma_min, 0])
    "dpm_fast": ("ends", False),
    "dpm_adaptive": ("ends", False),
}


def build_schedule(kind: str, steps: int, cfg: SchedulerConfig = _DEFAULT_CFG, *, karras: bool = False,
                   steps_offset: int = 1) -> Schedule:
    """The schedule diffusers' scheduler `kind` ("ddpm", "ddim", "euler" (also Euler a, Heun, LMS), "dpm",
    "kdpm2", "kdpm2_a" or "lcm"; "ends": dpm_fast / dpm_adaptive's, see SAMPLER_SCHEDULES) sets with `set_timesteps(steps)` when built from the SD1.5 scheduler config
    (steps_offset=1, set_alpha_to_one=False); `karras` as its `use_karras_sigmas=True` (euler, dpm, kdpm2*)."""
    T = cfg.num_train_timesteps
    ac = alphas_cumprod(cfg)
    table = sigmas_from_alphas_cumprod(ac).numpy()  # float32, ascending in t
    if karras and kind not in ("dpm", "euler", "kdpm2", "kdpm2_a"):
        raise ValueError(f"karras sigmas are not wired up for the {kind!r} schedule")
    if kind == "ends":  # dpm_fast / dpm_adaptive: Euler's, whose ends are the table's, but for one step
        if steps != 1:
            return build_schedule("euler", steps, cfg)
        _check_steps(steps, T)
        sigmas = np.array([table[-1], table[0]], dtype=np.float64)
        return Schedule(torch.from_numpy(sigmas), torch.tensor([float(T - 1)], dtype=torch.float64),
                        float(sigmas[0]))
    mids = (None, None)
    if kind in ("ddpm", "ddim"):
        ts = leading_timesteps(steps, T, steps_offset)
        if ts[0] >= T:  # e.g. 1000 "leading" steps with steps_offset=1 (diffusers fails inside step() then)
            raise ValueError(f"{steps} {kind.upper()} steps with steps_offset={steps_offset} reach timestep "
                             f"{ts[0]} >= num_train_timesteps={T}; use at most {T - 1} steps")
        # Indexing the table reproduces diffusers, which indexes alphas_cumprod[t] directly.
        sig = table[ts].astype(np.float64)
        # DDPM's last step goes to alpha_prev = 1 (sigma 0); DDIM's to final_alpha_cumprod = alphas_cumprod[0].
        final = 0.0 if kind == "ddpm" else float(table[0])
        sigmas = np.concatenate([sig, [final]])
        timesteps = ts.astype(np.float64)
        init = math.sqrt(1.0 + float(sigmas[0]) ** 2)
    elif kind in ("euler", "kdpm2", "kdpm2_a"):
        ts = linspace_timesteps(steps, T)
        sig = sigma_at(ts, table)
        if karras:  # between the interpolated ends (= table[0], table[999]); diffusers' float32 log table
            sig = get_sigmas_karras(steps, float(sig[-1]), float(sig[0]))
            log_table = np.log(table)
            ts = np.array([diffusers_sigma_to_t(v, log_table) for v in sig])
            if kind != "euler":  # KDPM2(Ancestral) rounds its Karras timesteps (and keeps them float64)
                ts = ts.round()
            else:
                ts = ts.astype(np.float32)
        sigmas = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
        timesteps = ts.astype(np.float64)
        init = float(sigmas.max())  # init_noise_sigma = sigmas.max() for "linspace" spacing
        if kind != "euler":
            mids = _kdpm2_mids(sigmas, table, ancestral=kind == "kdpm2_a")
    elif kind == "lcm":
        ts = lcm_timesteps(steps, T)
        sigmas = np.concatenate([table[ts].astype(np.float64), [0.0]])
        timesteps = ts.astype(np.float64)
        init = math.sqrt(1.0 + float(sigmas[0]) ** 2)  # LCMScheduler's init_noise_sigma = 1 in VP space
    elif kind == "dpm":
        if karras:
            log_sigmas = torch.from_numpy(np.log(table).astype(np.float64))
            sig = get_sigmas_karras(steps, float(table[0]), float(table[-1]))
            ts = sigma_to_t(torch.from_numpy(sig), log_sigmas).round().numpy()
        else:
            ts = dpm_linspace_timesteps(steps, T)
            sig = sigma_at(ts, table)
        sigmas = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
        timesteps = ts.astype(np.int64).astype(np.float64)
        init = math.sqrt(1.0 + float(sigmas[0]) ** 2)  # init_noise_sigma = 1 in VP space
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of 'ddpm', 'ddim', 'euler', 'dpm', "
                         "'kdpm2', 'kdpm2_a', 'lcm', 'ends'")
    return Schedule(torch.from_numpy(np.ascontiguousarray(sigmas)),
                    torch.from_numpy(np.ascontiguousarray(timesteps)), init, 1, *mids)


def diffusers_sigma_to_t(sigma, log_sigmas):
    """`sigma_to_t`'s log-sigma interpolation in numpy with the dtypes diffusers' schedulers use (a float32 log
    table, a float64 or float32 sigma), so fractional timesteps come out bit-identical to theirs (Euler/Heun/LMS
    Karras timesteps, KDPM2's midpoint timesteps). `sigma_to_t` is the float64 torch version the denoiser uses."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def dpm2_mid_sigma(sigma: float, sigma_next: float) -> float:
    """KDPM2's midpoint between two noise levels, the geometric mean computed as diffusers does (float32
    `log(s').lerp(log(s), 0.5).exp()`), so the sampler calls the model at bit-identical midpoints."""
    logs = torch.tensor([sigma_next, sigma], dtype=torch.float32).log()
    return float(logs[0].lerp(logs[1], 0.5).exp())


def dpm2_ancestral_sigmas(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """(sigma_down, sigma_up, sigma_mid) of KDPM2Ancestral's step from sigma to sigma_next: the ancestral split
    (eta 1) in float32 as diffusers computes it, and the midpoint sqrt(sigma * sigma_down) in float64.

    With eta 1, sigma_down = sigma_next^2 / sigma, so the midpoint IS sigma_next (diffusers' float32
    log-lerp-exp often lands on the very float32 value), yet diffusers gives the UNet another timestep there
    (the log-interpolated one of the midpoint) than at the next step's sigma_next (its "linspace" one). Kept
    unrounded, the midpoint differs from every float32 schedule sigma (by at most ~1e-7 relative from diffusers'
    float32 one), so the denoiser's sigma -> timestep table tells the two calls apart."""
    s, sn = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
    up = (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2) ** 0.5
    down = (sn ** 2 - up ** 2) ** 0.5
    return float(down), float(up), math.sqrt(sigma * float(down))


def _kdpm2_ancestral_mid32(sigma: float, sigma_down: float) -> torch.Tensor:
    """diffusers' float32 midpoint of KDPM2Ancestral (what its timestep is computed from)."""
    s, down = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_down, dtype=torch.float32)
    return s.log().lerp(down.log(), 0.5).exp()


def _kdpm2_mids(sigmas: np.ndarray, table: np.ndarray, *, ancestral: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """KDPM2(Ancestral)'s midpoint sigma of each step (NaN for the last step, which has none) and diffusers'
    timestep for it: its `_sigma_to_t` of the float32 midpoint against the torch float32 log table."""
    s = sigmas.tolist()
    log_sigmas = torch.from_numpy(np.log(table))
    mid, ts = [], []
    for i in range(len(s) - 1):
        if s[i + 1] == 0:  # the last step: one Euler step, no midpoint
            mid.append(math.nan)
            ts.append(math.nan)
            continue
        if ancestral:
            down, _, m = dpm2_ancestral_sigmas(s[i], s[i + 1])
            m32 = _kdpm2_ancestral_mid32(s[i], down)
        else:
            m = dpm2_mid_sigma(s[i], s[i + 1])
            m32 = torch.tensor(m, dtype=torch.float32)
        mid.append(m)
        with warnings.catch_warnings():  # numpy 2 on torch tensors (diffusers' own mix, kept for bit-equality)
            warnings.simplefilter("ignore", DeprecationWarning)
            ts.append(float(diffusers_sigma_to_t(m32, log_sigmas)))
    return torch.tensor(mid, dtype=torch.float64), torch.tensor(ts, dtype=torch.float32).double()


def schedule_for(sampler: str, steps: int, cfg: SchedulerConfig = _DEFAULT_CFG) -> Schedule:
    """Schedule for a canonical sampler name (see SAMPLER_SCHEDULES; `fastsd.samplers.get_sampler` also
    resolves A1111 aliases and has a `.schedule(steps)` shortcut)."""
    key = sampler.lower()
    if key not in SAMPLER_SCHEDULES:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_SCHEDULES)}")
    kind, karras = SAMPLER_SCHEDULES[key]
    return build_schedule(kind, steps, cfg, karras=karras)
