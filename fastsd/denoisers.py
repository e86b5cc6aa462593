"""k-diffusion-style denoiser wrappers: `denoiser(x, sigma, **extra) -> x0` (the "denoised" prediction).

x is the k-space sample x = x0 + sigma * eps (see fastsd.schedules). sigma is a python float or a 0-d tensor
(one noise level for the whole batch: fastsd's samplers pass the schedule's 0-d CPU float64 sigmas[i], so all
scalings and the timestep lookup stay on the host with no device sync), or a (B,) tensor (one level per sample,
as k-diffusion's own samplers pass `sigmas[i] * s_in`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from fastsd.backends import reference
from fastsd.prompt_schedule import at_call
from fastsd.schedules import Schedule, sigma_to_t, sigmas_from_alphas_cumprod


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.dim()))


class EpsDenoiser:
    """Wraps an eps-prediction UNet, called as `unet_fn(x_in, t, **extra)`, into `denoiser(x, sigma, **extra)`.

    x_in = x / sqrt(sigma^2 + 1) (= the VP latents diffusers feeds its UNet), t = the UNet timestep for sigma,
    x0 = x - sigma * eps.

    Timesteps: when a `schedule` is attached (constructor or `with_schedule`), a sigma that is one of the
    schedule's sigmas (or KDPM2 midpoints) gets exactly the schedule's timestep (diffusers' `scheduler.timesteps`:
    fractional for Euler "linspace", rounded for DPM++ Karras). Any other sigma gets the fractional timestep from log-sigma
    interpolation (diffusers' `_sigma_to_t`, k-diffusion's `sigma_to_t`), rounded if `quantize`.
    t is passed as a float32 (B,) tensor on x's device (float32 keeps fractional timesteps exact; fp16 would not).

    Extra args go through to unet_fn, except `c_concat` (inpainting: masked-image latents and mask), which is
    concatenated to the scaled x on the channel dim, unscaled, as LDM's hybrid conditioning does.
    """

    def __init__(self, unet_fn: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor, *,
                 schedule: Schedule | None = None, quantize: bool = False):
        self.unet_fn = unet_fn
        self.alphas_cumprod = alphas_cumprod
        self.quantize = quantize
        self.schedule = schedule
        sig = sigmas_from_alphas_cumprod(torch.as_tensor(alphas_cumprod).detach().cpu())
        # float32 log, as diffusers' np.log of its float32 table; float64 from there on
        self._log_sigmas = torch.from_numpy(np.log(sig.float().numpy())).double()
        self.sigma_min = float(sig[0])
        self.sigma_max = float(sig[-1])
        if schedule is not None:
            tab_s, tab_t = schedule.timestep_table()  # the main sigmas, and KDPM2's midpoints
            self._table = {float(s): float(t) for s, t in zip(tab_s.tolist(), tab_t.tolist())}
            self._table_t = (tab_s, tab_t)
        else:
            self._table, self._table_t = {}, None
        self._dev_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def with_schedule(self, schedule: Schedule | None) -> "EpsDenoiser":
        """The same model with `schedule`'s (sigma, timestep) pairs used for the sigma -> t conversion."""
        return EpsDenoiser(self.unet_fn, self.alphas_cumprod, schedule=schedule, quantize=self.quantize)

    # -- sigma -> timestep ------------------------------------------------------------------------------------

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Timesteps (float64, sigma's shape and device) for noise levels: the schedule's own timestep where
        sigma is one of its sigmas (float32 sigmas match too: the schedule's are float32 values), else
        log-sigma interpolation (`fastsd.schedules.sigma_to_t`), rounded if `quantize`. No device sync."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.device not in self._dev_cache:
            tables = (self._log_sigmas,) + (self._table_t or ())
            self._dev_cache[sigma.device] = tuple(v.to(sigma.device) for v in tables)
        log_sigmas, *table = self._dev_cache[sigma.device]
        t = sigma_to_t(sigma, log_sigmas)
        if self.quantize:
            t = t.round()
        if table:
            tab_s, tab_t = table
            match = sigma.reshape(-1, 1) == tab_s[None, :]
            t = torch.where(match.any(1), (match * tab_t[None, :]).sum(1), t.reshape(-1)).reshape(sigma.shape)
        return t

    def t_for_sigma(self, sigma: float) -> float:
        """Host-side conversion of one noise level."""
        t = self._table.get(float(sigma))
        return t if t is not None else float(self.sigma_to_t(float(sigma)))

    # -- call ---------------------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, **extra: Any) -> torch.Tensor:
        B = x.shape[0]
        if isinstance(sigma, torch.Tensor) and sigma.dim() > 0 and sigma.numel() > 1:
            sig = sigma.reshape(B)
            c_in = _append_dims((sig.double() ** 2 + 1) ** -0.5, x.dim()).to(x.dtype)
            t = self.sigma_to_t(sig).to(device=x.device, dtype=torch.float32)
            s = _append_dims(sig, x.dim()).to(x.dtype)
        else:  # one noise level for the whole batch: all scalars on the host
            s = float(sigma)
            c_in = (s * s + 1.0) ** -0.5
            t = torch.full((B,), self.t_for_sigma(s), device=x.device, dtype=torch.float32)
        x_in = x * c_in
        c_concat = extra.pop("c_concat", None)
        if c_concat is not None:
            x_in = torch.cat([x_in, c_concat.to(x_in.dtype)], dim=1)
        eps = self.unet_fn(x_in, t, **extra)
        return x - eps.to(x.dtype) * s


class ScheduledContext:
    """A1111's prompt editing and composable prompts over a batch (fastsd.prompt_schedule): `contexts` (N, L, D) the
    encodings of every text the batch's prompts name; `parts[i]` image i's [(weight, [(last step, row of contexts),
    ...]), ...], one part of weight 1 for a prompt without AND. CFGDenoiser takes one for cond (and one without AND
    for uncond) and reads it at each model call's index (from 0): `at` gives the (B, L, D) context where no image
    composes (`composed` False), `parts_at` the parts' (M, L, D) contexts, the image of each and its weight."""

    def __init__(self, contexts: torch.Tensor, parts: list[list[tuple[float, list[tuple[int, int]]]]]):
        self.contexts, self.parts = contexts, parts
        self.composed = any(len(p) != 1 or p[0][0] != 1.0 for p in parts)

    def at(self, call: int) -> torch.Tensor:
        if self.composed:
            raise ValueError("a composed (AND) context has parts: parts_at")
        return self.contexts[[at_call(p[0][1], call) for p in self.parts]]

    def parts_at(self, call: int) -> "Parts":
        rows, owners, weights = [], [], []
        for i, parts in enumerate(self.parts):
            for weight, schedule in parts:
                rows.append(at_call(schedule, call))
                owners.append(i)
                weights.append(weight)
        return Parts(self.contexts[rows], owners, weights)


@dataclass(frozen=True)
class Parts:
    """One model call's composed cond: the parts' contexts (M, L, D), each part's image and weight."""
    contexts: torch.Tensor
    owners: list[int]
    weights: list[float]


def _as_dict(c: torch.Tensor | ScheduledContext | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(c, (torch.Tensor, ScheduledContext)):
        return {"context": c}
    return dict(c)


class CFGDenoiser:
    """Classifier-free guidance: uncond + scale * (cond - uncond), with both halves in ONE batched call.

    cond / uncond: a context tensor (B or 1, L, D) or a ScheduledContext (prompt editing: each call takes the
    context of its index, counted from 0 by this denoiser), or a dict of per-branch extra args (e.g. {"context": ...}).
    Extra args given at call time (e.g. `c_concat` for inpainting) are shared by both branches. The denoiser is
    called on torch.cat([x, x]) with [uncond, cond] concatenated on the batch dim; batch-1 per-branch tensors are
    broadcast to x's batch. Guidance in x0 space equals diffusers' guidance on eps (x0 = x - sigma*eps is affine
    in eps). Without an uncond (guidance scale <= 1, as diffusers) only the cond branch runs.

    The sampler protocol: `split_guidance(x, sigma, **extra)` gives (uncond_x0, cond_x0, scale) from one
    batched call so a sampler can fuse the guidance into its update with `cfg_step` (the backend's op:
    one kernel on the triton backend); None when unguided (then the sampler calls it). Wrappers forward both
    (KnownRegionDenoiser). `s_min_uncond` / `s_min_uncond_all`: A1111's NGMS, `skip_early` of `total_calls`: its
    Skip Early CFG (`skips_uncond`).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], cond: torch.Tensor | Mapping[str, Any],
                 uncond: torch.Tensor | Mapping[str, Any] | None, scale: float,
                 cfg_step: Callable = reference.cfg_step, s_min_uncond: float = 0.0, s_min_uncond_all: bool = False,
                 skip_early: float = 0.0, total_calls: int = 1):
        self.denoiser = denoiser
        self.s_min_uncond = float(s_min_uncond)
        self.s_min_uncond_all = bool(s_min_uncond_all)
        self.skip_early = float(skip_early)
        self.total_calls = max(1, int(total_calls))
        self.cond = _as_dict(cond)
        self.uncond = None if uncond is None else _as_dict(uncond)
        self.scale = float(scale)
        self.cfg_step = cfg_step
        if self.uncond is not None and set(self.uncond) != set(self.cond):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(self.cond)} and {sorted(self.uncond)}")
        if self.uncond is None and self.scale != 1.0:
            raise ValueError("guidance scale != 1 needs an uncond")
        self.calls = 0  # model calls so far: the index a ScheduledContext is read at

    def _this_call(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """cond and uncond of this model call (a ScheduledContext read at its index), the call counted."""
        call, self.calls = self.calls, self.calls + 1

        def at(d):
            if d is None:
                return None
            return {k: (v.parts_at(call) if v.composed else v.at(call)) if isinstance(v, ScheduledContext) else v
                    for k, v in d.items()}

        return at(self.cond), at(self.uncond)

    @staticmethod
    def _batch(v: Any, B: int) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1 and B != 1:
            return v.expand(B, *v.shape[1:])
        return v

    @property
    def guided(self) -> bool:
        """True when a call runs both branches (an uncond and scale != 1)."""
        return self.uncond is not None and self.scale != 1.0

    def branches(self, x: torch.Tensor, sigma: float | torch.Tensor, **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond_x0, cond_x0) from ONE batched denoiser call on torch.cat([x, x]): the two halves of its
        output (views, no copy)."""
        if not self.guided:
            raise ValueError("branches() needs guidance (an uncond and scale != 1)")
        B = x.shape[0]
        cond, uncond = self._this_call()
        if isinstance(cond.get("context"), Parts):
            return self._composed(x, sigma, cond, uncond, extra)
        kw: dict[str, Any] = {}
        for k, c in cond.items():
            if isinstance(c, torch.Tensor):
                kw[k] = torch.cat([self._batch(uncond[k], B), self._batch(c, B)])
            else:  # non-tensor options (flags, scales) must agree between the branches
                if uncond[k] != c:
                    raise ValueError(f"non-tensor arg {k!r} differs between cond and uncond")
                kw[k] = c
        for k, v in extra.items():
            kw[k] = torch.cat([self._batch(v, B)] * 2) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        if isinstance(sigma, torch.Tensor) and sigma.dim() > 0 and sigma.numel() > 1:
            sigma = torch.cat([sigma.reshape(B)] * 2)
        uncond_x0, cond_x0 = self.denoiser(torch.cat([x, x]), sigma, **kw).chunk(2)
        return uncond_x0, cond_x0

    def skips_uncond(self, sigma) -> bool:
        """Whether the next model call runs without the uncond branch (unguided: the cond's x0, or the parts'
        combination with the first part for the uncond), as A1111's CFGDenoiser decides, its calls counted from 0
        in a pass: "Skip Early CFG" (skip_early > 0) while call / total_calls <= skip_early (total_calls: A1111's
        total_steps, `samplers.prompt_steps` of the pass's steps); "Negative Guidance minimum sigma" (s_min_uncond
        > 0) when the call's noise level is below s_min_uncond and it is an odd call, or any with s_min_uncond_all
        ("NGMS all steps")."""
        if self.skip_early > 0 and self.calls / self.total_calls <= self.skip_early:
            return True
        if self.s_min_uncond <= 0 or not (self.calls % 2 == 1 or self.s_min_uncond_all):
            return False
        level = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        return level < self.s_min_uncond

    def split_guidance(self, x: torch.Tensor, sigma, **extra: Any):
        """(uncond_x0, cond_x0, scale) for a sampler to fuse, or None when this call is unguided."""
        if not self.guided or self.skips_uncond(sigma):
            return None
        return (*self.branches(x, sigma, **extra), self.scale)

    def _composed(self, x: torch.Tensor, sigma, cond: dict, uncond: dict | None, extra: dict):
        """A1111's composable prompts: one denoiser call on [x for the uncond (guided), x of each part's image], then
        (uncond_x0, cond_x0) with cond_x0 = uncond_x0 + sum of weight * (part_x0 - uncond_x0) over the image's
        parts, so that the guidance gives uncond + scale * sum weight (part - uncond) (A1111's combine_denoised);
        unguided, the image's first part stands for the uncond (A1111's skip_uncond) and cond_x0 alone is returned."""
        parts: Parts = cond["context"]
        if set(cond) != {"context"}:
            raise ValueError("composed (AND) prompts take a context only")
        B = x.shape[0]
        if max(parts.owners) == 0 and B > 1:  # one prompt for every image (as a batch-1 context is broadcast)
            n = len(parts.owners)
            parts = Parts(parts.contexts.repeat(B, 1, 1), [b for b in range(B) for _ in range(n)], parts.weights * B)
        idx = torch.tensor(parts.owners, device=x.device)

        def rows(v):  # a per-image tensor (or one for all) at the parts' images
            return self._batch(v, B)[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 else v

        guided = uncond is not None
        x_in, ctx = rows(x), parts.contexts.to(x.device)
        kw = {k: rows(v) for k, v in extra.items()}
        if isinstance(sigma, torch.Tensor) and sigma.dim() > 0 and sigma.numel() > 1:
            sigma = sigma.reshape(B)[idx] if not guided else torch.cat([sigma.reshape(B), sigma.reshape(B)[idx]])
        if guided:
            x_in, ctx = torch.cat([x, x_in]), torch.cat([self._batch(uncond["context"], B), ctx])
            kw = {k: torch.cat([self._batch(extra[k], B), v]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                  for k, v in kw.items()}
        out = self.denoiser(x_in, sigma, context=ctx, **kw)
        base, part_x0 = (out[:B], out[B:]) if guided else (out[[parts.owners.index(i) for i in range(B)]], out)
        combined = base.clone()
        for r, (i, w) in enumerate(zip(parts.owners, parts.weights)):
            combined[i] += w * (part_x0[r] - base[i])
        return (base, combined) if guided else combined

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, **extra: Any) -> torch.Tensor:
        if not self.guided or self.skips_uncond(sigma):
            cond = self._this_call()[0]
            if isinstance(cond.get("context"), Parts):
                return self._composed(x, sigma, cond, None, extra)
            kw = {k: self._batch(v, x.shape[0]) for k, v in cond.items()}
            return self.denoiser(x, sigma, **kw, **extra)
        return reference.cfg_guidance(*self.branches(x, sigma, **extra), self.scale)


class KnownRegionDenoiser:
    """4-channel-model inpainting (A1111's way): after every model call the known region's prediction is
    replaced by the image's own latents, so each step re-noises them from the sampler's current noise.
    The replacement is affine, so it commutes with guidance: the guidance split is forwarded with both
    branches blended, and a sampler still fuses the guidance into its update."""

    def __init__(self, model, x0: torch.Tensor, mask: torch.Tensor):
        self.model, self.x0, self.mask = model, x0, mask  # mask (1, 1, h, w): 1 = repaint
        self.cfg_step = getattr(model, "cfg_step", reference.cfg_step)

    def _blend(self, x0_pred: torch.Tensor) -> torch.Tensor:
        return self.x0 * (1 - self.mask) + x0_pred * self.mask

    def split_guidance(self, x: torch.Tensor, sigma, **extra: Any):
        split = getattr(self.model, "split_guidance", None)
        parts = split(x, sigma, **extra) if split is not None else None
        if parts is None:
            return None
        uncond, cond, scale = parts
        return self._blend(uncond), self._blend(cond), scale

    def __call__(self, x: torch.Tensor, sigma, **extra: Any) -> torch.Tensor:
        return self._blend(self.model(x, sigma, **extra))
