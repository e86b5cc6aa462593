"""AUTOMATIC1111's schedule types (1.9+: "Schedule type" beside the sampler, the API's `scheduler` field).

Each maps the number of steps and the model's sigma table (ascending in t, float32) to the noise levels a
sigma-space sampler walks, by A1111's rule (its modules/sd_schedulers.py and k-diffusion's get_sigmas_*):
ends at the table's ends (sigma_min = table[0], sigma_max = table[-1]), a final 0 appended except for KL
Optimal (which ends at sigma_min). The UNet gets each sigma's fractional timestep by log-sigma interpolation
(A1111's model wrapper without quantization; diffusers' `_sigma_to_t` with the same dtypes as its schedulers,
so Karras / Exponential / Beta match diffusers' `use_*_sigmas=True` Euler schedules bit for bit).

"automatic" is no type: the sampler's own schedule (its diffusers twin's, `fastsd.schedules.schedule_for`).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fastsd.schedules import (Schedule, SchedulerConfig, alphas_cumprod, diffusers_sigma_to_t, get_sigmas_karras,
                              sigmas_from_alphas_cumprod)
from fastsd.settings import ENDS_SAMPLERS, TIMESTEP_SAMPLERS  # noqa: F401 (here too: callers import them from here)

AUTOMATIC = "automatic"
# A1111's SD1.x "Align Your Steps" noise levels (NVIDIA's published 10-step schedule, 11 values)
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
BETA_ALPHA = BETA_BETA = 0.6  # A1111's defaults (options beta_dist_alpha / beta_dist_beta)


def _t_to_sigma(t: np.ndarray, table: np.ndarray) -> np.ndarray:
    """k-diffusion's t_to_sigma: log-sigma interpolated linearly between integer timesteps (float32 as its
    float32 table)."""
    t = np.asarray(t, dtype=np.float32)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = t - np.floor(t)
    log_table = np.log(table)
    return np.exp((1 - w) * log_table[low] + w * log_table[high])


def _uniform(n: int, table: np.ndarray) -> np.ndarray:  # also A1111's "Normal" (its sgm=False)
    return np.append(_t_to_sigma(np.linspace(len(table) - 1, 0, n), table), 0.0)


def _sgm_uniform(n: int, table: np.ndarray) -> np.ndarray:
    return np.append(_t_to_sigma(np.linspace(len(table) - 1, 0, n + 1)[:-1], table), 0.0)


def _karras(n: int, table: np.ndarray) -> np.ndarray:
    return np.append(get_sigmas_karras(n, float(table[0]), float(table[-1])), 0.0)


def _exponential(n: int, table: np.ndarray) -> np.ndarray:
    return np.append(np.exp(np.linspace(math.log(table[-1]), math.log(table[0]), n)), 0.0)


def _polyexponential(n: int, table: np.ndarray, rho: float = 1.0) -> np.ndarray:
    lo, hi = math.log(table[0]), math.log(table[-1])
    return np.append(np.exp(np.linspace(1, 0, n) ** rho * (hi - lo) + lo), 0.0)


def _kl_optimal(n: int, table: np.ndarray) -> np.ndarray:
    i = np.arange(n + 1) / n
    return np.tan(i * math.atan(table[0]) + (1.0 - i) * math.atan(table[-1]))


def _align_your_steps(n: int, table: np.ndarray) -> np.ndarray:
    if n == len(AYS_SD15):
        return np.append(AYS_SD15, 0.0)
    ys = np.log(np.array(AYS_SD15[::-1]))  # log-linear interpolation of the list to n values
    return np.append(np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(ys)), ys))[::-1], 0.0)


def _simple(n: int, table: np.ndarray) -> np.ndarray:
    every = len(table) / n
    return np.append([table[-(1 + int(x * every))] for x in range(n)], 0.0)


def _ddim(n: int, table: np.ndarray) -> np.ndarray:
    """Every (T // n)-th sigma from t = 1 up: ceil((T - 1) / (T // n)) steps, which is n only when n divides
    T - 1 evenly enough (A1111's rule: 30 steps run 31)."""
    return np.append(table[1::max(len(table) // n, 1)][::-1], 0.0)


def _beta(n: int, table: np.ndarray) -> np.ndarray:
    try:
        from scipy import stats
    except ImportError:
        raise ValueError("the Beta schedule needs scipy (pip install scipy)") from None
    lo, hi = float(table[0]), float(table[-1])
    return np.append([lo + stats.beta.ppf(x, BETA_ALPHA, BETA_BETA) * (hi - lo) for x in 1 - np.linspace(0, 1, n)],
                     0.0)


@dataclass(frozen=True)
class ScheduleType:
    name: str    # A1111's `scheduler` value
    label: str   # A1111's "Schedule type" in its UI and infotext
    sigmas: Callable[[int, np.ndarray], np.ndarray]
    rho: float = -1.0  # A1111's default_rho
    whole_table: bool = False  # reads the table between its ends (A1111's need_inner_model)
    aliases: tuple[str, ...] = ()


SCHEDULE_TYPES: dict[str, ScheduleType] = {t.name: t for t in (
    ScheduleType("uniform", "Uniform", _uniform, whole_table=True),
    ScheduleType("karras", "Karras", _karras, 7.0),
    ScheduleType("exponential", "Exponential", _exponential),
    ScheduleType("polyexponential", "Polyexponential", _polyexponential, 1.0),
    ScheduleType("sgm_uniform", "SGM Uniform", _sgm_uniform, whole_table=True, aliases=("SGMUniform",)),
    ScheduleType("kl_optimal", "KL Optimal", _kl_optimal),
    ScheduleType("align_your_steps", "Align Your Steps", _align_your_steps),
    ScheduleType("simple", "Simple", _simple, whole_table=True),
    ScheduleType("normal", "Normal", _uniform, whole_table=True),
    ScheduleType("ddim", "DDIM", _ddim, whole_table=True),
    ScheduleType("beta", "Beta", _beta, whole_table=True),
)}
# TIMESTEP_SAMPLERS, ENDS_SAMPLERS: the samplers that take no schedule type (defined in fastsd.settings, whose
# --schedule-type help names them before torch is imported)
# A1111's samplers with discard_next_to_last_sigma (its DPM2, DPM2 a, DPM++ 3M SDE): over a schedule type they walk
# the levels of steps + 1 without the next-to-last (`typed_schedule`); their own schedules stay their twins'.
DISCARD_PENULTIMATE = ("dpm2", "dpm2_karras", "dpm2_a", "dpm2_a_karras", "dpmpp_3m_sde", "dpmpp_3m_sde_karras")


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def split_joint(name: str) -> tuple[str, str | None]:
    """A1111 1.9+'s split of an old joint sampler name (its get_sampler_and_scheduler): a trailing " " + a schedule
    type's label, name or alias (any case) is the schedule: "DPM++ 2M SDE Exponential" -> ("DPM++ 2M SDE",
    "Exponential"), "Euler a" -> ("Euler a", None). The longest such suffix ("Euler SGM Uniform" -> ("Euler",
    "SGM Uniform"), where A1111 takes " Uniform" and finds no sampler "Euler SGM")."""
    name = name.strip()
    options = sorted((o for t in SCHEDULE_TYPES.values() for o in (t.label, t.name, *t.aliases)), key=len, reverse=True)
    for option in options:
        if name.lower().endswith(" " + option.lower()):
            return name[:-len(option) - 1].rstrip(), option
    return name, None


def resolve_schedule_type(name: str | None) -> str:
    """Canonical name ("automatic" for None / "" / "Automatic") of an A1111 name or label, any case
    ("Align Your Steps", "sgm_uniform", "SGMUniform"); ValueError listing the valid ones."""
    key = _key(name or AUTOMATIC)
    key = {_key(a): t.name for t in SCHEDULE_TYPES.values() for a in t.aliases}.get(key, key)
    if key == AUTOMATIC or key in SCHEDULE_TYPES:
        return key
    raise ValueError(f"unknown schedule type {name!r}; valid: Automatic, "
                     + ", ".join(t.label for t in SCHEDULE_TYPES.values()))


def schedule_label(name: str) -> str | None:
    """A1111's label for the infotext ("Schedule type: Exponential"); None for automatic."""
    key = resolve_schedule_type(name)
    return None if key == AUTOMATIC else SCHEDULE_TYPES[key].label


def check_sampler(name: str, sampler: str) -> None:
    """ValueError when a (non-automatic) schedule type can't drive `sampler` (canonical name): a sampler that steps
    by discrete timesteps, one that takes only the schedule's ends (DPM fast / adaptive), a `_karras` one with
    another type (its name says Karras: the infotext would), Beta without scipy."""
    kind = resolve_schedule_type(name)
    if kind != AUTOMATIC and sampler in TIMESTEP_SAMPLERS:
        raise ValueError(f"schedule type {name!r} does not apply to {sampler} (it steps by the model's discrete "
                         "timesteps); use Automatic or a sigma sampler such as euler or dpmpp_2m")
    if kind != AUTOMATIC and sampler in ENDS_SAMPLERS:
        raise ValueError(f"schedule type {name!r} does not apply to {sampler}: it takes only the schedule's ends "
                         "(the model's sigma_max and sigma_min; A1111 ignores the schedule type for it too) and "
                         "picks its own steps; use Automatic")
    if kind not in (AUTOMATIC, "karras") and sampler.endswith("_karras"):
        raise ValueError(f"sampler {sampler} names the Karras schedule; with schedule type {name!r} give "
                         f"{sampler.removesuffix('_karras')}")
    if kind == "beta" and importlib.util.find_spec("scipy") is None:
        raise ValueError("the Beta schedule needs scipy (pip install scipy)")


def sigma_table(cfg: SchedulerConfig = SchedulerConfig()) -> np.ndarray:
    """The model's (T,) float32 sigmas, ascending in t."""
    return sigmas_from_alphas_cumprod(alphas_cumprod(cfg)).numpy()


def typed_schedule(name: str, steps: int, cfg: SchedulerConfig = SchedulerConfig(), *,
                   discard_penultimate: bool = False) -> Schedule:
    """The Schedule of schedule type `name` for `steps` steps (A1111's DDIM type may run a step more or less):
    float32 sigmas (as A1111's and diffusers' tables), each with its fractional UNet timestep.
    `discard_penultimate`: A1111's discard_next_to_last_sigma (its DPM2, DPM2 a and DPM++ 3M SDE): the levels of
    steps + 1 with the next-to-last dropped."""
    key = resolve_schedule_type(name)
    if key == AUTOMATIC:
        raise ValueError("'automatic' is the sampler's own schedule, not a schedule type")
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"number of steps must be in [1, {cfg.num_train_timesteps}], got {steps}")
    table = sigma_table(cfg)
    raw = np.asarray(SCHEDULE_TYPES[key].sigmas(steps + discard_penultimate, table), dtype=np.float64)
    if discard_penultimate:
        raw = np.delete(raw, -2)
    # timesteps from the sigmas before their float32 rounding, as diffusers' Euler does
    timesteps = diffusers_sigma_to_t(raw[:-1], np.log(table)).astype(np.float32).astype(np.float64)
    sigmas = raw.astype(np.float32).astype(np.float64)
    return Schedule(torch.from_numpy(sigmas), torch.from_numpy(timesteps), float(sigmas.max()))
