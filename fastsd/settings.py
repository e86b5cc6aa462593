"""The generation parameters, defined once: `Pipeline.generate`'s keywords, the CLI's options and the
infotext all come from `GenerationSettings` (tests/test_settings.py holds the three together).

Each field's metadata gives its CLI flag and help; `validate()` checks types and ranges before any model
runs (TypeError / ValueError naming the argument).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass, field

from fastsd import hires

MAX_SIDE = 4096  # pixels; larger needs allow_large (--allow-large)
MAX_STEPS = 1000
MAX_IMAGES = 64
SEED_LIMIT = 2**63
RANDN_SOURCES = ("CPU", "GPU", "NV")  # A1111's randn_source option's values
# Samplers that take no schedule type (fastsd.schedule_types.check_sampler). Those that step by diffusers' discrete
# timesteps rather than over any sigmas (A1111's DDIM/PLMS/UniPC take no schedule type either; fastsd's UniPC works
# over sigmas, so it takes one):
TIMESTEP_SAMPLERS = ("ddim", "ddim_cfgpp", "ddpm", "plms")
# those that read only the schedule's ends (A1111 hands its DPM fast / adaptive the model's sigma_min and sigma_max
# in txt2img, whatever the schedule type); a type would only move the ends (Simple, SGM Uniform, DDIM, Align Your
# Steps do) where A1111 does not, so they take none.
ENDS_SAMPLERS = ("dpm_fast", "dpm_adaptive")


def _opt(help: str, flag: str | None = None, **cli) -> dict:
    return {"help": help, "flag": flag, "cli": cli}


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str = field(default="", metadata=_opt("the prompt; A1111 emphasis (word:1.2), (word), [word] and BREAK "
                                                  "work", flag="prompt"))
    negative_prompt: str = field(default="", metadata=_opt("what the image should not show"))
    steps: int = field(default=20, metadata=_opt(f"sampling steps (1..{MAX_STEPS})"))
    guidance_scale: float = field(default=7.5, metadata=_opt("classifier-free guidance scale; <= 1 runs no "
                                                             "unconditional batch", flag="--cfg-scale"))
    sampler: str = field(default="euler_a", metadata=_opt("euler_a, euler, euler_karras, heun, heun_karras, lms, "
                                                          "lms_karras, dpm2, dpm2_karras, dpm2_a, dpm2_a_karras, "
                                                          "ddim, ddim_cfgpp, ddpm, dpmpp_2m, dpmpp_2m_karras, dpmpp_2s_a, "
                                                          "dpmpp_2s_a_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, "
                                                          "dpmpp_2m_sde_heun, dpmpp_2m_sde_heun_karras, dpmpp_sde, "
                                                          "dpmpp_sde_karras, dpmpp_3m_sde, dpmpp_3m_sde_karras, unipc, "
                                                          "unipc_karras, lcm, plms, restart, dpm_fast, dpm_adaptive, "
                                                          "or an A1111 name such as 'DPM++ 2M Karras'"))
    seed: int | None = field(default=None, metadata=_opt("random when not given; image i of a batch uses seed + i "
                                                         "(with --subseed-strength: the seed, A1111's)"))
    width: int | None = field(default=None, metadata=_opt("a multiple of 8; default: the init image's width, else "
                                                          "512"))
    height: int | None = field(default=None, metadata=_opt("a multiple of 8; default: the init image's height, "
                                                           "else 512"))
    num_images: int = field(default=1, metadata=_opt(f"images per run (1..{MAX_IMAGES})"))
    strength: float = field(default=0.8, metadata=_opt("img2img: how much to change the init image, in [0, 1] "
                                                              "(A1111's denoising strength)"))
    clip_skip: int = field(default=1, metadata=_opt("A1111 clip skip: 1 = last CLIP layer, 2 = penultimate"))
    subseed: int | None = field(default=None, metadata=_opt("A1111 variation seed: image i's start noise is moved "
                                                            "toward subseed + i's by --subseed-strength; random when "
                                                            "not given"))
    subseed_strength: float = field(default=0.0, metadata=_opt("A1111 variation strength in [0, 1]: 0 = the seed's "
                                                               "image, 1 = the variation seed's"))
    hires_scale: float = field(default=1.0, metadata=_opt(
        "A1111 hires fix (txt2img): other than 1, the image made at width x height is upscaled by this (below 1: "
        "downscaled, as A1111's API takes) and refined by a second pass at that size "
        f"(0..{hires.MAX_SCALE:g}; 1 with --enable-hires: a second pass at the same size)"))
    hires_width: int = field(default=0, metadata=_opt("hires fix to this width instead of --hires-scale (A1111's "
                                                      "'Resize width to'; 0 = follow the height's ratio; with "
                                                      "--hires-height the image is scaled to cover both and cropped)"))
    hires_height: int = field(default=0, metadata=_opt("hires fix to this height instead of --hires-scale"))
    hires_steps: int = field(default=0, metadata=_opt("hires fix: steps of the second pass (0 = --steps)"))
    hires_strength: float = field(default=0.7, metadata=_opt("hires fix: denoising strength of the second pass in "
                                                             "[0, 1] (0 = upscale only)"))
    hires_upscaler: str | None = field(default="Latent", metadata=_opt(
        "hires fix upscaler, A1111's names: " + ", ".join(hires.UPSCALERS) + "; or an upscaler model (ESRGAN, "
        "Real-ESRGAN, SwinIR): a .pth/.safetensors file, or its name in --upscaler-dir"))
    seed_resize_from_w: int = field(default=0, metadata=_opt(
        "A1111 'Resize seed from width': with --seed-resize-from-h, each image's start noise is drawn as at this "
        "size and pasted centred into its noise at the real size (cropped when larger), so a seed keeps its "
        "composition at another size; a multiple of 8, 0 = off (both or neither)"))
    seed_resize_from_h: int = field(default=0, metadata=_opt("A1111 'Resize seed from height' (with "
                                                             "--seed-resize-from-w); 0 = off"))
    hires_sampler: str | None = field(default=None, metadata=_opt("hires fix: the second pass's sampler (A1111's "
                                                                  "'Hires sampler'); default: --sampler"))
    schedule_type: str = field(default="automatic", metadata=_opt(
        "A1111's 'Schedule type' for the sampler's noise levels: automatic (the sampler's own), uniform, karras, "
        "exponential, polyexponential, sgm_uniform, kl_optimal, align_your_steps, simple, normal, ddim, beta (none "
        "but automatic for " + ", ".join(TIMESTEP_SAMPLERS + ENDS_SAMPLERS) + "; a *_karras sampler takes only "
        "automatic or karras)"))
    hires_prompt: str = field(default="", metadata=_opt("hires fix: the second pass's prompt (A1111's 'Hires "
                                                        "prompt'); empty = --prompt's; its <lora:...> tags must be "
                                                        "the prompt's"))
    hires_negative_prompt: str = field(default="", metadata=_opt("hires fix: the second pass's negative prompt; "
                                                                 "empty = --negative-prompt's"))
    hires_schedule_type: str | None = field(default=None, metadata=_opt(
        "hires fix: the second pass's schedule type (A1111's 'Hires schedule type'; --schedule-type's values); "
        "default: --schedule-type"))
    s_min_uncond: float = field(default=0.0, metadata=_opt(
        "A1111's 'Negative Guidance minimum sigma' (NGMS): below this noise level every other model call skips the "
        "unconditional batch (the negative prompt), a faster end of the run; 0 = off"))
    s_min_uncond_all: bool = field(default=False, metadata=_opt(
        "A1111's 'NGMS all steps': with --s-min-uncond, every model call below that noise level skips the "
        "unconditional batch, not every other one"))
    skip_early_cond: float = field(default=0.0, metadata=_opt(
        "A1111's 'Ignore negative prompt during early sampling' (Skip Early CFG): the model calls of this fraction "
        "of a pass's steps, from its start, skip the unconditional batch (in [0, 1]; 0 = off)"))
    eta_noise_seed_delta: int = field(default=0, metadata=_opt(
        "A1111's 'Eta noise seed delta' (ENSD): after each image's start noise, the noise its sampler draws "
        "(Euler a and the other stochastic samplers) comes from seed + this instead of going on from the seed; "
        "0 = off (31337 is the value many A1111 infotexts carry)"))
    eta: float | None = field(default=None, metadata=_opt(
        "A1111's eta of Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE (Heun), DPM++ 3M SDE, DPM fast, "
        "DPM adaptive (its 'Eta', default 1: 0 makes their steps deterministic) and DDIM ('Eta DDIM', default 0), "
        "in [0, 1]; other samplers take none; default: the sampler's"))
    initial_noise_multiplier: float = field(default=1.0, metadata=_opt(
        "A1111's 'Noise multiplier for img2img': img2img's (and inpainting's) start noise times this (>= 0); "
        "1 = as drawn"))
    s_churn: float = field(default=0.0, metadata=_opt(
        "A1111's 'Sigma churn' (Karras et al.'s S_churn) for Euler, Heun and DPM2: each step first adds noise that "
        "raises its noise level by the factor 1 + min(this / steps, 0.414) (>= 0; 0 = off, a deterministic run)"))
    s_tmin: float = field(default=0.0, metadata=_opt(
        "A1111's 'Sigma tmin': --s-churn only at the steps whose noise level is at least this (>= 0)"))
    s_tmax: float = field(default=0.0, metadata=_opt(
        "A1111's 'Sigma tmax': --s-churn only at the steps whose noise level is at most this (>= 0; 0 = no bound)"))
    s_noise: float = field(default=1.0, metadata=_opt(
        "A1111's 'Sigma noise': the scale of the noise --s-churn adds and of the noise DPM2 a, DPM++ 2S a, DPM++ SDE, "
        "DPM++ 2M SDE (Heun), DPM++ 3M SDE and DPM fast add each step (>= 0; 1 = as drawn)"))
    randn_source: str = field(default="CPU", metadata=_opt(
        "A1111's 'Random number generator source': CPU (torch's CPU generator, the same noise on every machine), "
        "GPU (the noise torch draws on an NVIDIA GPU, A1111's default: an A1111 infotext without 'RNG' was made "
        "with it) or NV (the same numbers: A1111's name for drawing them elsewhere); fastsd draws each on any device"))
    enable_hires: bool = field(default=False, metadata=_opt(
        "A1111's enable_hr: run the hires fix even at --hires-scale 1 without --hires-width/--hires-height (a second "
        "pass at the same size, as A1111 1.6+); a scale other than 1 or a size runs it anyway"))
    inpainting_mask_weight: float = field(default=1.0, metadata=_opt(
        "A1111's 'Inpainting conditioning mask strength' (its inpainting_mask_weight option) of an inpainting "
        "(9-channel) model, in [0, 1]: the image it is conditioned on is torch.lerp(image, image * (1 - mask), this) "
        "(img2img without a mask: the whole picture masked; the hires fix's second pass too); 1 = the masked area "
        "blanked (the default), 0 = the whole image unmasked"))
    img2img_fix_steps: bool = field(default=False, metadata=_opt(
        "A1111's 'With img2img, do exactly the amount of steps the slider specifies' (img2img_fix_steps): img2img and "
        "inpainting run all --steps steps, at the end of a schedule of int(steps / min(strength, 0.999)) steps, "
        "instead of int(min(strength, 0.999) * steps) + 1 steps of a --steps schedule (the hires fix's second pass "
        "always runs so, as A1111's)"))
    img2img_extra_noise: float = field(default=0.0, metadata=_opt(
        "A1111's 'Extra noise multiplier for img2img and hires fix' (img2img_extra_noise), in [0, 1]: the start "
        "latents of img2img, inpainting and the hires fix's second pass get the start noise times this once more "
        "(image + (sigma + this) * noise); 0 = off"))
    img2img_color_correction: bool = field(default=False, metadata=_opt(
        "A1111's 'Apply color correction to img2img results to match original colors' (img2img_color_correction): "
        "each img2img and inpainting result's LAB histograms matched to its init image's (as the model gets it), "
        "under the result's luminosity, before the inpainting overlay (fastsd.color_correction); txt2img ignores it, "
        "and the infotext has no key for it, as A1111's"))

    def __post_init__(self):  # numpy's numbers (np.int64, np.float32, np.bool_) as the Python ones they stand for
        for name in FIELDS:
            if (v := plain(getattr(self, name))) is not getattr(self, name):
                object.__setattr__(self, name, v)

    @property
    def hires(self) -> bool:
        """The hires fix runs: enable_hires (A1111's enable_hr: at scale 1, a same-size second pass), or a scale
        other than 1 or a target width / height."""
        return self.enable_hires is True or self.hires_scale != 1 or bool(self.hires_width) or bool(self.hires_height)

    def image_seed(self, i: int) -> int:
        """Image i's seed (A1111's all_seeds): seed + i; with a variation strength every image keeps the seed and
        its variation seed, subseed + i, is what moves."""
        return self.seed + (0 if self.subseed_strength else i)

    def hires_prompts(self) -> tuple[str, str]:
        """(prompt, negative prompt) of the hires fix's second pass: A1111's hr_prompt / hr_negative_prompt, the
        first pass's where empty."""
        return self.hires_prompt or self.prompt, self.hires_negative_prompt or self.negative_prompt

    def hires_prompt_steps(self) -> int:
        """The steps A1111 schedules the hires pass's prompt editing over (`samplers.prompt_steps` of its sampler and
        steps)."""
        from fastsd.samplers import prompt_steps

        return prompt_steps(self.hires_sampler or self.sampler, self.hires_steps or self.steps)

    def hires_schedule(self) -> str:
        """The hires pass's schedule type: hires_schedule_type where given, else the first pass's."""
        return self.schedule_type if self.hires_schedule_type is None else self.hires_schedule_type

    def hires_target(self) -> hires.Target:
        """Where the hires fix takes the first pass (width / height resolved, or 512 where not given)."""
        return hires.target(self.width or 512, self.height or 512, self.hires_scale, self.hires_width,
                            self.hires_height)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs (scale > 1): only then is the negative prompt encoded and an
        unconditional batch run (as diffusers)."""
        return self.guidance_scale > 1

    def validate(self, *, has_image: bool = False, has_mask: bool = False, allow_large: bool = False) -> None:
        """TypeError / ValueError naming the argument; nothing is run."""
        _check_str(self.prompt, "prompt")
        _check_str(self.negative_prompt, "negative_prompt")
        _check_str(self.hires_prompt, "hires_prompt")
        _check_str(self.hires_negative_prompt, "hires_negative_prompt")
        _check_int(self.steps, "steps", 1, MAX_STEPS)
        _check_int(self.num_images, "num_images", 1, MAX_IMAGES)
        _check_int(self.clip_skip, "clip_skip", 1, 12)  # (A1111's slider: 12 = SD1's first layer's output)
        _check_float(self.guidance_scale, "guidance_scale")
        _check_float(self.strength, "strength")
        if not isinstance(self.sampler, str):
            raise TypeError(f"sampler must be a string, got {type(self.sampler).__name__}")
        _check_str(self.schedule_type, "schedule_type")
        from fastsd import schedule_types  # (imports torch: not at the top, so --help answers without it)

        schedule_types.resolve_schedule_type(self.schedule_type)
        if self.hires_schedule_type is not None:
            _check_str(self.hires_schedule_type, "hires_schedule_type")
            try:
                schedule_types.resolve_schedule_type(self.hires_schedule_type)
            except ValueError as e:
                raise ValueError(f"hires_schedule_type: {e}") from None
        limit = 1 << 20 if allow_large else MAX_SIDE
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is None:
                continue
            _check_int(v, name, None, None)
            if v < 8 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")
            if v > limit:
                raise ValueError(f"{name} {v} is above {limit} px (allow_large / --allow-large lifts the limit)")
        _check_float(self.s_min_uncond, "s_min_uncond")
        if self.s_min_uncond < 0:
            raise ValueError(f"s_min_uncond must be >= 0, got {self.s_min_uncond}")
        if not isinstance(self.s_min_uncond_all, bool):
            raise TypeError(f"s_min_uncond_all must be True or False, got {self.s_min_uncond_all!r}")
        _check_int(self.eta_noise_seed_delta, "eta_noise_seed_delta", 0, SEED_LIMIT - 1)
        _check_str(self.randn_source, "randn_source")
        if self.randn_source not in RANDN_SOURCES:
            raise ValueError(f"randn_source must be one of {', '.join(RANDN_SOURCES)}, got {self.randn_source!r}")
        if self.eta is not None:
            _check_fraction(self.eta, "eta")
        _check_fraction(self.inpainting_mask_weight, "inpainting_mask_weight")
        check_bool(self.img2img_fix_steps, "img2img_fix_steps")
        _check_fraction(self.img2img_extra_noise, "img2img_extra_noise")
        check_bool(self.img2img_color_correction, "img2img_color_correction")
        _check_float(self.initial_noise_multiplier, "initial_noise_multiplier")
        if self.initial_noise_multiplier < 0:
            raise ValueError(f"initial_noise_multiplier must be >= 0, got {self.initial_noise_multiplier}")
        for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
            _check_float(getattr(self, name), name)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_fraction(self.skip_early_cond, "skip_early_cond")
        _check_fraction(self.subseed_strength, "subseed_strength")
        if self.subseed is not None:
            _check_int(self.subseed, "subseed", 0, None)
            if self.subseed + self.num_images > SEED_LIMIT:
                raise ValueError(f"subseed + num_images must stay below 2**63, got subseed {self.subseed} with "
                                 f"{self.num_images} images")
        self._validate_seed_resize(limit)
        self._validate_hires(has_image, limit)
        if not 0.0 <= self.strength <= 1.0:  # (checked in txt2img too, where it is not used: surely a mistake)
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if has_mask and not has_image:
            raise ValueError("a mask needs an init image (the image to inpaint)")
        if has_image and self.img2img_fix_steps:
            self._validate_fix_steps()
        if self.seed is not None:
            _check_int(self.seed, "seed", 0, None)
            if self.image_seed(self.num_images - 1) >= SEED_LIMIT:  # (the last image's: seed + i, or the seed)
                raise ValueError(f"seed + num_images must stay below 2**63, got seed {self.seed} with "
                                 f"{self.num_images} images")
        from fastsd.samplers import get_sampler

        # raise, listing the valid names
        schedule_types.check_sampler(self.schedule_type, get_sampler(self.sampler).name)
        from fastsd.samplers import A1111_NAMES, ETA_SAMPLERS, ETA_TAKERS, SIGMA_TAKERS, sigma_params

        name = get_sampler(self.sampler).name
        if self.eta is not None and name not in ETA_SAMPLERS:
            raise ValueError(f"eta: {A1111_NAMES.get(name, self.sampler)} takes none here ({ETA_TAKERS} do)")
        unused = next(iter(sigma_params(self, name, taken=False)), None)
        if unused is not None:
            raise ValueError(f"{unused}: {A1111_NAMES.get(name, self.sampler)} takes none ({SIGMA_TAKERS[unused]} do)")

    @property
    def seed_resize(self) -> bool:
        """A1111's seed resize runs: both sizes given (> 0)."""
        return self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0

    def _validate_seed_resize(self, limit: int) -> None:
        """Multiples of 8 up to the size limit, 0 = off; one without the other is refused (A1111 ignores a lone
        one silently; here it is surely a mistake)."""
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            v = getattr(self, name)
            _check_int(v, name, 0, None)
            if v % 8 or v > limit:
                raise ValueError(f"{name} must be 0 or a multiple of 8 up to {limit}, got {v}")
        if (self.seed_resize_from_w > 0) != (self.seed_resize_from_h > 0):
            raise ValueError(f"seed_resize_from_w and seed_resize_from_h go together (both > 0, or both 0 = off), "
                             f"got {self.seed_resize_from_w} and {self.seed_resize_from_h}")

    def _validate_fix_steps(self) -> None:
        """img2img_fix_steps' schedule (`hires.second_pass_steps`, the hires fix's rule) must be one fastsd makes."""
        if self.strength == 0:  # (A1111: a schedule of 0 steps, which its DDIM can't make and its k-diffusion runs
            # none of: the image back as it is)
            raise ValueError("img2img_fix_steps runs steps / strength steps: it needs a strength above 0")
        n, run = hires.second_pass_steps(self.steps, self.strength)
        if n > MAX_STEPS:
            size = f"{n}" if n < 2**31 else "over 2**31"
            raise ValueError(f"img2img_fix_steps: strength {self.strength} with {run} steps needs a schedule of {size} "
                             f"steps (A1111's steps / strength), above {MAX_STEPS}: raise the strength or lower the "
                             "steps")

    def _validate_hires(self, has_image: bool, limit: int) -> None:
        check_bool(self.enable_hires, "enable_hires")
        _check_float(self.hires_scale, "hires_scale")
        if not 0.0 < self.hires_scale <= hires.MAX_SCALE:  # (A1111's API takes a downscale: int(width * scale))
            raise ValueError(f"hires_scale must be in (0, {hires.MAX_SCALE:g}], got {self.hires_scale}")
        for name in ("hires_width", "hires_height"):  # (any size, as A1111: the image is its latents' // 8 * 8)
            v = getattr(self, name)
            _check_int(v, name, 0, None)
            if v > limit:
                raise ValueError(f"{name} must be 0 or a size up to {limit}, got {v}")
        _check_int(self.hires_steps, "hires_steps", 0, MAX_STEPS)
        _check_fraction(self.hires_strength, "hires_strength")
        if self.hires_upscaler is not None and not isinstance(self.hires_upscaler, str):
            raise TypeError(f"hires_upscaler must be a string, got {type(self.hires_upscaler).__name__}")
        hires.resolve_upscaler(self.hires_upscaler)  # (None: Latent, written as no "Hires upscaler", A1111's API)
        if self.hires_sampler is not None and not isinstance(self.hires_sampler, str):
            raise TypeError(f"hires_sampler must be a string, got {type(self.hires_sampler).__name__}")
        if self.hires_sampler is not None or self.hires_schedule_type is not None:
            from fastsd.samplers import get_sampler
            from fastsd.schedule_types import check_sampler

            field = "hires_sampler" if self.hires_schedule_type is None else "hires_schedule_type"
            try:
                check_sampler(self.hires_schedule(), get_sampler(self.hires_sampler or self.sampler).name)
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
        if not self.hires:
            return
        if has_image:
            raise ValueError("the hires fix is for txt2img; img2img runs at the size it is given")
        n, run = hires.second_pass_steps(self.hires_steps or self.steps, self.hires_strength or 1.0)
        if n > MAX_STEPS:
            size = f"{n}" if n < 2**31 else "over 2**31"
            raise ValueError(f"hires_strength {self.hires_strength} with {run} steps needs a schedule of {size} steps "
                             f"(A1111's steps / strength), above {MAX_STEPS}: raise hires_strength or lower the steps")
        t = self.hires_target()
        w, h = t.size
        if min(w, h) < 8 or max(w, h) > limit:
            raise ValueError(f"the hires fix would make a {w}x{h} image: each side must be 8..{limit} px")
        if max(t.up_w, t.up_h) > limit:  # (a resize of another aspect: A1111 scales to cover it, then crops)
            raise ValueError(f"the hires fix would upscale to {t.up_w}x{t.up_h} before its crop to {w}x{h} (A1111 "
                             f"scales to cover the resize, then crops), above the limit of {limit} px a side")

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def kwargs(self) -> dict:
        """The keywords of Pipeline.generate these settings stand for."""
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(GenerationSettings)}


def plain(v):
    """A number given as numpy's (np.int64, np.float32, np.bool_: what numpy code passes) or another
    numbers.Integral / numbers.Real, as the Python int, float or bool it stands for, so checks, infotexts and
    everything after see Python numbers (`Steps: 4`, not `np.int64(4)`); anything else as it is."""
    if type(v) in (int, float, bool) or isinstance(v, (str, bytes)):
        return v
    np = sys.modules.get("numpy")  # (not imported here: a numpy scalar means numpy is loaded)
    if np is not None and isinstance(v, np.bool_):
        return bool(v)
    if np is not None and isinstance(v, np.floating) and v.dtype.itemsize < 8:
        return float(str(v))  # (its shortest decimal: np.float32(7.3) is 7.3, not 7.300000190734863)
    if isinstance(v, numbers.Integral):
        return int(v)
    return float(v) if isinstance(v, numbers.Real) else v


def check_bool(v, name: str, none: bool = False):
    """`v` as a Python bool (numpy's np.bool_ taken), or None where `none` allows it; TypeError naming `name`."""
    v = plain(v)
    if not isinstance(v, bool) and not (none and v is None):
        raise TypeError(f"{name} must be True or False{' or None' * none}, got {v!r}")
    return v


def _check_str(v, name: str) -> None:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON's "\ud800", undecodable bytes in a command line)
        raise ValueError(f"{name} is not valid text: {v[e.start]!r} at character {e.start}") from None


def _check_int(v, name: str, lo: int | None, hi: int | None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be at most {hi}, got {v}")


def is_finite(v: int | float) -> bool:
    """math.isfinite, and False for an int too large for a float (JSON's 2**1100), where isfinite raises."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _check_fraction(v, name: str) -> None:
    """A number in [0, 1] (a strength, a weight); ValueError naming `name` otherwise."""
    _check_float(v, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v}")


def _check_float(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {v!r}")
    if not is_finite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
