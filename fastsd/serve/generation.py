"""An A1111 request -> a checked `Plan` (on the request side, before the job is queued: every mistake is a
BadRequest then) -> images on the worker thread (`run_plan`) -> A1111's response body.

A1111's batches: `batch_size` images per iteration, `n_iter` iterations, image i of the request uses
seed + i (A1111's all_seeds; with a variation strength all keep the seed and their variation seeds count up), so
each iteration is one Pipeline.generate call with seed (and subseed) + it * batch_size.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import re
import time
import dataclasses
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from fastsd import hires, masking
from fastsd.lora import drop_tags, parse_prompt, strip_tags
from fastsd.a1111 import hires_scheduled, image_infotext, sampler_label, scheduled
from fastsd.schedule_types import split_joint
from fastsd.samplers import A1111_NAMES, ETA_SAMPLERS, SIGMA_DEFAULTS, SIGMA_TAKERS, takes_sigma_param
from fastsd.serve.imageformat import encode_image, image_format
from fastsd.serve.infotext import apply_infotext
from fastsd.serve.jobqueue import Cancelled
from fastsd.serve.limits import BadRequest, Limits
from fastsd.serve.schemas import Img2ImgRequest, Txt2ImgRequest
from fastsd.settings import SEED_LIMIT, GenerationSettings, is_finite

log = logging.getLogger("fastsd.serve")

SEED_RANGE = 2**32  # seed -1: A1111 draws from this range
MAX_MASK_BLUR, LATENT_FILL = masking.MAX_MASK_BLUR, masking.LATENT_FILL  # (A1111's img2img mapping: fastsd.masking)

# A1111's separate `scheduler` field (1.9+): read with `fastsd.a1111.scheduled` (shared with the CLI's --infotext)
SAME_SAMPLER = (None, "", "Use same sampler")  # hr_sampler_name values that mean the first pass's (A1111's UI)
ETA = {"ddpm": 1.0, "ddim_cfgpp": 0.0}  # the other samplers A1111's eta applies to, and the eta fastsd runs them with
A1111_FIELDS = {"schedule_type": "scheduler", "guidance_scale": "cfg_scale", "num_images": "batch_size", "strength": "denoising_strength",
                "hires_strength": "denoising_strength", "hires_scale": "hr_scale", "hires_width": "hr_resize_x",
                "hires_height": "hr_resize_y", "hires_steps": "hr_second_pass_steps", "hires_upscaler": "hr_upscaler",
                "hires_sampler": "hr_sampler_name", "hires_prompt": "hr_prompt",
                "hires_negative_prompt": "hr_negative_prompt"}


@dataclass(frozen=True)
class Plan:
    kind: str                               # txt2img | img2img
    model: object                           # registry.ModelEntry
    settings: GenerationSettings            # one iteration: num_images = batch_size, seed of the first image
    n_iter: int
    image: Image.Image | None
    mask: Image.Image | None
    loras: tuple[tuple[str, float, str], ...]  # (path, weight, name) from --lora-dir
    warnings: tuple[str, ...]
    send_images: bool
    parameters: dict                        # the request as understood, echoed as A1111 does
    overlay: Image.Image | None = None      # inpainting: laid over each result (A1111's apply_overlay)
    paste_to: tuple[int, int, int, int] | None = None  # "only masked": the result's place in the overlay (x, y, w, h)
    masked_content: str = "original"        # inpainting_fill 2 / 3: the masked latents replaced (Pipeline.generate)
    latent_mask: str = "bicubic"            # A1111's mask to latent size (its latmask; "bicubic-soft" without mask_round)
    infotext_extra: dict = dataclasses.field(default_factory=dict)  # A1111's inpainting keys (masking.infotext_params)
    styles: tuple[str, ...] = ()            # the request's style names (A1111's info "styles")
    vae: str | None = None                  # the VAE file the job runs with (sd_vae), None: the model's own
    hires_model: object = None              # hr_checkpoint_name's registry.ModelEntry, None: the model's own
    subseed: int = -1                       # the subseed asked or drawn (info.subseed), used only with a strength
    image_format: tuple[str, int] = ("png", 80)  # A1111's samples_format, jpeg_quality: the answer's images
    more: tuple = ()                        # init images 2.. (masking.Inpaint): image i of a batch starts from init i
    resize_mode: int = 0                    # Pipeline.generate's: 3 = A1111's latent upscale of the init image


def a1111_names(message: str) -> str:
    """A GenerationSettings message with A1111's field names (cfg_scale, not guidance_scale)."""
    for ours, theirs in A1111_FIELDS.items():
        message = re.sub(rf"\b{ours}\b", theirs, message)
    return message


def _sampler(req, warnings: list[str]) -> tuple[str, str]:
    """(sampler, schedule type) of A1111's sampler_name and scheduler (`fastsd.a1111.scheduled`, its API's rules)."""
    try:
        return scheduled(_sampler_name(req), req.scheduler, "scheduler", warnings)
    except ValueError as e:
        raise BadRequest(f"sampler_name: {e}") from None


def _sampler_name(req) -> str:
    return req.sampler_name or req.sampler_index or "Euler"


def _size(req, field: str, limits: Limits, warnings: list[str]) -> int:
    """A size field within the server's limits, rounded down to a multiple of 8 (warned when it was not one)."""
    v = getattr(req, field)
    got = limits.check_size(field, v)
    if got != v:
        warnings.append(f"{field} {v}: rounded down to {got} (a multiple of 8)")
    return got


def _hires(req, sampler: str, schedule_type: str, limits: Limits, warnings: list[str], upscalers) -> dict:
    """A1111's hires-fix fields as GenerationSettings' hires_* keywords (none without enable_hr); hr_upscaler a
    built-in name, or a model of --upscaler-dir (`upscalers`, serve.upscalers.Upscalers) as its file."""
    if not getattr(req, "enable_hr", False):
        return {}
    resize = {}
    for field, ours in (("hr_resize_x", "hires_width"), ("hr_resize_y", "hires_height")):
        v = getattr(req, field)
        if v < 0 or v > limits.max_side:  # (any size else, as A1111: the image is the latents' // 8 of it)
            raise BadRequest(f"{field} must be 0 or a size up to this server's limit of {limits.max_side} px "
                             f"(--max-size), got {v}")
        resize[ours] = v
    if req.hr_second_pass_steps:  # (0: the first pass's steps)
        limits.check_steps(req.hr_second_pass_steps, "hr_second_pass_steps")
    name = _sampler_name(req) if req.hr_sampler_name in SAME_SAMPLER else req.hr_sampler_name  # "Hires sampler"
    # A1111's "Use same scheduler" (or none): the first pass's scheduler as its API set it (the request's, else
    # the joint sampler name's)
    same = (req.hr_scheduler or "").strip().lower() in ("", "use same scheduler")
    try:
        second, second_type = hires_scheduled(name, (req.scheduler or split_joint(_sampler_name(req))[1]) if same
                                              else req.hr_scheduler, schedule_type, "hr_scheduler", warnings)
    except ValueError as e:
        raise BadRequest(f"hr_sampler_name: {e}") from None
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength  # A1111's txt2img default
    scale = 1.0 if any(resize.values()) else req.hr_scale  # (A1111 ignores hr_scale for a resize target)
    return {"enable_hires": True, "hires_scale": scale, **resize, "hires_steps": req.hr_second_pass_steps,
            "hires_strength": strength, "hires_upscaler": upscalers.hires(req.hr_upscaler),
            "hires_sampler": second if second != sampler else None, "hires_schedule_type": second_type,
            **_hires_prompts(req, limits)}


def _hires_sizes(s: GenerationSettings, limits: Limits) -> None:
    """The hires fix's images within the server's limits (--max-size): the final one 8.. px a side, and the one the
    first pass is upscaled to before A1111's crop (hr_resize_x x hr_resize_y of another aspect ratio than the first
    pass: scaled to cover it, then cropped; an image upscaler makes and VAE-encodes that whole image, as A1111).
    Left to GenerationSettings.validate when the scale is not one it takes (its own message)."""
    if not s.hires or not (is_finite(s.hires_scale) and 0 < s.hires_scale <= hires.MAX_SCALE):
        return
    t = s.hires_target()
    w, h = t.size
    if min(w, h) < 8:
        raise BadRequest(f"the hires fix would make a {w}x{h} image: each side must be 8..{limits.max_side} px "
                         "(this server's limit, --max-size)")
    if max(w, h) > limits.max_side:
        raise BadRequest(f"the hires fix would make a {w}x{h} image, above this server's limit of {limits.max_side} "
                         "px (--max-size)")
    if s.hires_width and s.hires_height and max(t.up_w, t.up_h) > limits.max_side:
        raise BadRequest(f"the hires fix would upscale to {t.up_w}x{t.up_h} before its crop to {w}x{h} (hr_resize_x x "
                         f"hr_resize_y {s.hires_width}x{s.hires_height} is of another aspect ratio than the first "
                         f"pass's {s.width}x{s.height}: A1111 scales to cover it, then crops), above this server's "
                         f"limit of {limits.max_side} px (--max-size)")


def _hires_model(req, s: GenerationSettings, model, server):
    """A1111's hr_checkpoint_name: another of the server's models for the hires pass (by the names /sd-models lists;
    "Use same checkpoint", empty or the request's own model: None), checked against the request's (latents, LoRA
    tags) before the job is queued."""
    name = getattr(req, "hr_checkpoint_name", None)
    if not s.hires or name in (None, "", "Use same checkpoint"):
        return None
    entry = server.registry.find(name, "hr_checkpoint_name")
    if entry is model:
        return None
    try:
        model.pipe.check_hires_pipe(entry.pipe, s)
    except ValueError as e:
        raise BadRequest(f"hr_checkpoint_name: {e}") from None
    return entry


def _hires_prompts(req, limits: Limits) -> dict:
    """A1111's hr_prompt / hr_negative_prompt ("" = the first pass's); the hires prompt's <lora:...> tags must be the
    prompt's (one set of LoRAs is merged for both passes), dropped with it under disable_extra_networks."""
    prompt, negative = req.hr_prompt or "", req.hr_negative_prompt or ""
    limits.check_prompt("hr_prompt", prompt)
    limits.check_prompt("hr_negative_prompt", negative)
    if req.disable_extra_networks:
        prompt = drop_tags(prompt)
    try:
        if prompt and Counter(parse_prompt(prompt)[1]) != Counter(parse_prompt(req.prompt)[1]):
            raise BadRequest("hr_prompt: its <lora:...> tags must be the prompt's (fastsd merges a run's LoRAs once, "
                             "for both passes)")
    except ValueError as e:  # a malformed tag
        raise BadRequest(f"hr_prompt: {e}") from None
    return {"hires_prompt": prompt, "hires_negative_prompt": negative}


def _firstphase(req, warnings: list[str]) -> dict:
    """A1111's legacy firstphase_width / firstphase_height (its StableDiffusionProcessingTxt2Img.__post_init__): when
    either is non-zero they replace width / height, with or without enable_hr; the hires target is then hr_scale /
    hr_resize_x/y of that size (calculate_target_resolution overwrites the width/height target __post_init__ set).
    Only one of them given would be a first pass of size 0 there (a failure): a 422 here. Returns the request's
    width / height as sent, for the echoed parameters."""
    fw, fh = req.firstphase_width, req.firstphase_height
    if not (fw or fh):
        return {}
    if fw <= 0 or fh <= 0:
        raise BadRequest(f"firstphase_width {fw}, firstphase_height {fh}: give both as sizes (A1111's first-pass "
                         "size replaces width and height), or neither")
    asked = {"width": req.width, "height": req.height}
    warnings.append(f"firstphase_width/height {fw}x{fh}: A1111's legacy first-pass size, run in place of width/height "
                    f"{req.width}x{req.height}" + (" (the hires fix scales it)" if req.enable_hr else ""))
    req.width, req.height = fw, fh
    return asked


def _seed_resize(req, limits: Limits, warnings: list[str]) -> dict:
    """A1111's seed_resize_from_w/h as GenerationSettings' keywords: -1 (its default) or 0 = off; a size is rounded
    down to a multiple of 8 (the same latent size, so the same noise); as A1111, one without the other does nothing
    (warned)."""
    got = {}
    for field in ("seed_resize_from_w", "seed_resize_from_h"):
        v = getattr(req, field)
        if v < -1:
            raise BadRequest(f"{field} must be -1 or 0 (off) or a size, got {v}")
        got[field] = _size(req, field, limits, warnings) if v > 0 else 0
    if bool(got["seed_resize_from_w"]) != bool(got["seed_resize_from_h"]):
        warnings.append(f"seed_resize_from_w {req.seed_resize_from_w}, seed_resize_from_h {req.seed_resize_from_h}: "
                        "the seed is resized only when both are > 0 (as A1111), ignored")
        return {}
    return got


MAX_STYLES = 100  # styles a request may name


def _apply_styles(req, styles: dict, warnings: list[str]) -> dict:
    """The request's `styles` applied to its prompts in place, A1111's way (fastsd.styles; hr_prompt /
    hr_negative_prompt too when given, as A1111 styles its hires prompts), so the <lora:...> tags of a style are
    read as the prompt's; returns the prompts as asked (A1111 echoes the request unstyled in "parameters"). As A1111,
    a name the server lacks is skipped (an A1111 client sends the names of its own styles.csv): named in `warnings`."""
    if not req.styles:
        return {}
    if len(req.styles) > MAX_STYLES:  # (each style rewrites the whole prompt: thousands would cost seconds)
        raise BadRequest(f"styles: {len(req.styles)} names, above this server's limit of {MAX_STYLES}")
    from fastsd.styles import apply_styles

    asked = {"prompt": req.prompt, "negative_prompt": req.negative_prompt}
    req.prompt, req.negative_prompt, unknown = apply_styles(styles, req.styles, req.prompt, req.negative_prompt)
    for field, negative in (("hr_prompt", False), ("hr_negative_prompt", True)):
        if getattr(req, field, ""):
            asked[field] = getattr(req, field)
            pair = ("", asked[field]) if negative else (asked[field], "")
            setattr(req, field, apply_styles(styles, req.styles, *pair)[1 if negative else 0])
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        warnings.append(f"styles: {names}: not a style of this server (GET /sdapi/v1/prompt-styles lists them), "
                        "ignored" if styles else f"styles: {names}: this server has no styles (--styles-file), ignored")
    return asked


def _name_override(over: dict, key: str):
    """override_settings' `key` (popped): a name, "" or null (the server's); anything else is surely a client's bug,
    refused (as A1111 fails on it)."""
    value = over.pop(key, None)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"override_settings.{key} must be a name (a string; \"\" or null: the server's), got "
                         f"{value!r:.200}")
    return value


def _overrides(req, server, warnings: list[str], from_infotext: frozenset = frozenset()):
    """(model entry, clip_skip, VAE file or None, the sampling options (ServerState.sampling_options)) from
    override_settings, else the server's options; the VAE file checked against the model (fastsd/serve/vaes.py).
    `from_infotext`: the override_settings keys the request's infotext filled (named so in messages)."""
    over = dict(req.override_settings or {})
    model, name = server.registry.current, _name_override(over, "sd_model_checkpoint")
    if name not in (None, ""):  # as A1111's process_images: a name that is no checkpoint's is dropped
        found = server.registry.lookup(name)
        if found is not None:
            model = found
        else:
            note = (f"override_settings.sd_model_checkpoint {name!r:.200}: not a model of this server (GET "
                    f"/sdapi/v1/sd-models lists them), ran on {model.title}")
            log.warning("%s", note)
            warnings.append(note)
    key = "CLIP_stop_at_last_layers"
    clip_field = (f"the infotext's Clip skip (override_settings.{key})" if key in from_infotext
                  else f"override_settings.{key}" if key in over
                  else f"{key} (this server's option, set by POST /sdapi/v1/options; override_settings overrides it)")
    clip_skip = clip_skip_for(over.pop(key, server.clip_skip), model, clip_field)
    asked = _name_override(over, "sd_vae")  # "" and null: the server's option
    field = "sd_vae" if asked in (None, "") else "override_settings.sd_vae"
    vae = server.vaes.checked_path(server.vaes.option if asked in (None, "") else asked, model, field, warnings)
    sampling = {k: over.pop(k, v) for k, v in server.sampling_options.items()}
    try:
        check_sampling_options(sampling)
    except BadRequest as e:
        raise BadRequest(f"override_settings.{e}") from None
    for key in sorted(set(over) - {"samples_format", "jpeg_quality"}):  # (those two: serve.imageformat's)
        warnings.append(f"override_settings.{key}: not supported, ignored")
    return model, clip_skip, vae, sampling


def clip_skip_for(value, model, field: str) -> int:
    """A1111's CLIP_stop_at_last_layers for `model` (a registry entry; None: any, A1111's slider 1..12): 0 runs as 1,
    as A1111 (its `hidden_states[-n]` only for n > 1); at most the text encoder's layers (12 on SD1). BadRequest
    naming `field` otherwise."""
    top = 12 if model is None else model.pipe.config.clip.num_layers
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        why = "" if model is None or top == 12 else f" ({model.name}'s text encoder has {top} layers)"
        raise BadRequest(f"{field} must be an integer in 0..{top}{why}, got {value!r}")
    return max(value, 1)


ETA_OPTIONS = ("eta_ancestral", "eta_ddim")  # A1111's options for the eta field (its samplers' defaults)


def check_sampling_options(options: dict) -> None:
    """A1111's Skip Early CFG / NGMS all steps / ENSD / noise multiplier / RNG source / inpainting conditioning mask
    strength / img2img fix steps / extra noise options (GenerationSettings' fields of their names) as
    GenerationSettings.validate checks them, its eta options, and its sigma churn / tmin / tmax / noise options
    (numbers >= 0, whatever the sampler): BadRequest naming the option."""
    for key in (*ETA_OPTIONS, *SIGMA_DEFAULTS):
        v, top = options.get(key, 0.0), 1 if key in ETA_OPTIONS else math.inf
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (is_finite(v) and 0 <= v <= top):
            raise BadRequest(f"{key} must be a number in [0, 1], got {v!r}" if key in ETA_OPTIONS else
                             f"{key} must be a number >= 0, got {v!r}")
    try:
        GenerationSettings(**{k: v for k, v in options.items() if k not in ETA_OPTIONS and k not in SIGMA_DEFAULTS}
                           ).validate()
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None


def _sigma_params(req, sampler: str, options: dict, warnings: list[str]) -> dict:
    """A1111's sigma churn / tmin / tmax / noise of a request, as its Sampler.initialize takes them: an option (of
    the server or override_settings) other than its default wins, else the request's field; those `sampler` takes
    none of are dropped (a warning for a request's value)."""
    out = {}
    for key, default in SIGMA_DEFAULTS.items():
        asked, option = getattr(req, key), options.pop(key)
        value = option if option != default else asked if asked is not None else default
        if value != default and not takes_sigma_param(sampler, key):
            if asked not in (None, default):
                warnings.append(f"{key} {asked}: {A1111_NAMES.get(sampler, sampler)} takes none (fastsd: "
                                f"{SIGMA_TAKERS[key]} do), ignored")
            value = default
        out[key] = value
    return out


def _images(req: Img2ImgRequest, limits: Limits, size: tuple[int, int], warnings: list[str]
            ) -> tuple[list[masking.Inpaint], dict, int]:
    """The init images (and mask) as the model gets them, made here (A1111's resize_mode 0-3, LANCZOS) so a job waiting
    in the queue holds images, not base64 text; for a mask, A1111's inpainting: the mask blurred, "only masked"
    (inpaint_full_res, its default) or the whole picture, "fill" or "original" content, the overlay laid over each
    result (and where, for "only masked"); and A1111's inpainting keys for the infotext. One Inpaint per init image
    (A1111's init_images: one per image of the batch); and the resize mode Pipeline.generate runs: 3 ("just resize
    (latent upscale)": the image kept at its size, its latents resized) where no mask or crop took the image to the
    size, else 0."""
    if not req.init_images:
        raise BadRequest("init_images: img2img needs at least one base64 image")
    try:  # (the mapping itself is masking.a1111_img2img, shared with fastsd.batch)
        if req.mask:
            masking.check_inpaint_fields(req)
        images = [limits.decode_image(data, f"init_images[{i}]") for i, data in enumerate(req.init_images)]
        mask = limits.decode_image(req.mask, "mask") if req.mask else None
        req.init_images, req.mask = None, None  # the base64 text is not kept while the job waits
        got, extra, mode = masking.a1111_img2img(req, images, mask, size, warnings)
    except masking.Img2ImgError as e:
        raise BadRequest(str(e)) from None
    if mode == 3:  # (each image encoded at its own size)
        _encodable(images, limits)
    return got, extra, mode


def _encodable(images: list, limits: Limits) -> None:
    """resize_mode 3 encodes each init image at its own size (A1111's): BadRequest for one above --max-size."""
    for i, im in enumerate(images):
        if max(im.size) > limits.max_side:
            raise BadRequest(f"init_images[{i}] is {im.width}x{im.height} pixels: resize_mode 3 (latent upscale) "
                             f"encodes it at that size, above this server's limit of {limits.max_side} px (--max-size)")


def _batch_size(req, warnings: list[str]) -> int:
    """img2img's images per iteration: A1111's batch_size, or the number of init_images when there are several
    (image i of the batch starts from init image i; more than batch_size are refused, as A1111 does)."""
    count = len(req.init_images or ())
    if count <= 1 or count == req.batch_size:
        return req.batch_size
    if count > req.batch_size:
        raise BadRequest(f"init_images: {count} images for batch_size {req.batch_size}: one per image of the batch, "
                         "at most batch_size (A1111: \"bad number of images passed\")")
    warnings.append(f"batch_size {req.batch_size}: {count} init_images given, so {count} images per iteration (one "
                    "per init image, as A1111)")
    return count


def build_plan(req: Txt2ImgRequest | Img2ImgRequest, kind: str, server) -> Plan:
    """Everything checked before the job is queued; BadRequest names the field."""
    limits: Limits = server.limits
    infotext_notes: list[str] = []
    sent = set(req.override_settings or {})
    apply_infotext(req, kind, infotext_notes)  # (A1111 1.8+: fills the fields the request did not set)
    from_infotext = frozenset(set(req.override_settings or {}) - sent)
    warnings = req.unhonoured() + infotext_notes
    limits.check_prompt("prompt", req.prompt)
    limits.check_prompt("negative_prompt", req.negative_prompt)
    asked = _apply_styles(req, server.styles, warnings)
    if asked:  # (a style's text counts: the limit is on what the model gets)
        limits.check_prompt("prompt", req.prompt)
        limits.check_prompt("negative_prompt", req.negative_prompt)
    limits.check_steps(req.steps)
    limits.check_images(req.batch_size, req.n_iter)
    asked |= _firstphase(req, warnings) if kind == "txt2img" else {}
    size = {name: _size(req, name, limits, warnings) for name in ("width", "height")}
    if req.seed < -1:
        raise BadRequest(f"seed must be -1 (random) or at least 0, got {req.seed}")
    seed = random.randrange(SEED_RANGE) if req.seed == -1 else req.seed
    images = req.batch_size * req.n_iter
    if seed + images > SEED_LIMIT and not req.subseed_strength:
        raise BadRequest(f"seed {seed} with batch_size {req.batch_size} x n_iter {req.n_iter} = {images} images would "
                         f"pass the largest seed, 2**63 - 1 (image i uses seed + i); use a seed of at most "
                         f"{SEED_LIMIT - images}")
    if req.subseed < -1:
        raise BadRequest(f"subseed must be -1 (random) or at least 0, got {req.subseed}")
    # A1111's variation seed; -1: random, drawn always as A1111's get_fixed_seed (info.subseed reports it), used
    # only with a strength
    drawn = random.randrange(SEED_RANGE) if req.subseed == -1 else req.subseed
    subseed = None
    if req.subseed_strength:
        subseed = drawn
        if subseed + images > SEED_LIMIT:
            raise BadRequest(f"subseed {subseed} with {images} images would pass the largest seed, 2**63 - 1; use a "
                             f"subseed of at most {SEED_LIMIT - images}")
    sampler, schedule_type = _sampler(req, warnings)
    if req.eta is not None and sampler not in ETA_SAMPLERS and req.eta != ETA.get(sampler, req.eta):
        warnings.append(f"eta {req.eta}: not supported; {A1111_NAMES.get(sampler, sampler)} runs with eta "
                        f"{ETA[sampler]}")
    model, clip_skip, vae, sampling = _overrides(req, server, warnings, from_infotext)
    fmt = image_format(server, req.override_settings)
    eta_option = {k: sampling.pop(k) for k in ETA_OPTIONS}["eta_ddim" if sampler == "ddim" else "eta_ancestral"]
    eta = (eta_option if req.eta is None else req.eta) if sampler in ETA_SAMPLERS else None  # (checked as a field)
    sigma = _sigma_params(req, sampler, sampling, warnings)
    prompt = drop_tags(req.prompt) if req.disable_extra_networks else req.prompt
    loras = server.networks.parse(prompt)
    hires_prompts = (strip_tags(req.hr_prompt or ""), req.hr_negative_prompt or "") \
        if kind == "txt2img" and req.enable_hr else ()
    if not loras:  # (a request's LoRAs may bundle a name an unusable file has, as A1111: then its job's encode tells)
        server.networks.check_embeddings(model.pipe, strip_tags(prompt), req.negative_prompt, *hires_prompts)
    warnings += server.networks.empty_embeddings(strip_tags(prompt), req.negative_prompt, *hires_prompts)
    img2img = kind == "img2img"
    if img2img and req.initial_noise_multiplier is not None:  # (A1111: the request's, else the option's)
        sampling["initial_noise_multiplier"] = req.initial_noise_multiplier
    batch_size = _batch_size(req, warnings) if img2img else req.batch_size
    s = GenerationSettings(prompt, req.negative_prompt, req.steps, req.cfg_scale, sampler, seed, size["width"],
                           size["height"], batch_size, req.denoising_strength if img2img else 0.8, clip_skip,
                           subseed, req.subseed_strength, **_hires(req, sampler, schedule_type, limits, warnings, server.upscalers),
                           **_seed_resize(req, limits, warnings), schedule_type=schedule_type,
                           s_min_uncond=req.s_min_uncond or 0.0, eta=eta, **sigma, **sampling)
    _hires_sizes(s, limits)
    try:
        s.validate(has_image=img2img, has_mask=img2img and bool(req.mask), allow_large=True)  # (--max-size rules)
    except (TypeError, ValueError) as e:
        raise BadRequest(a1111_names(str(e))) from None
    hires_model = _hires_model(req, s, model, server)
    inits, extra, resize_mode = _images(req, limits, (s.width, s.height), warnings) if img2img else \
        ([masking.Inpaint(None, None, None)], {}, 0)  # last
    got = inits[0]
    params = req.model_dump() | asked  # init_images and mask are not echoed (A1111 sends them back only on request)
    return Plan(kind, model, s, req.n_iter, got.image, got.mask, loras, tuple(warnings), req.send_images, params,
                got.overlay, got.paste_to, LATENT_FILL[req.inpainting_fill] if img2img and got.mask else "original",
                "bicubic" if not img2img or req.mask_round else "bicubic-soft", extra, tuple(req.styles or ()), vae,
                hires_model, drawn, fmt, tuple(inits[1:]), resize_mode)


# What PIL puts in Image.info that is not a text of the file's (A1111's png-info leaves these out too).
NOT_TEXT = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
            "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop", "transparency",
            "gamma", "aspect", "srgb", "xmp", "adobe", "adobe_transform"}


# What A1111's parse_generation_parameters fills in where an infotext has no such key (its /png-info answers carry
# them, for an image without infotext too)
PNG_INFO_DEFAULTS = {"Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
                     "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint",
                     "Hires prompt": "", "Hires negative prompt": "", "Mask mode": "Inpaint masked",
                     "Masked content": "original", "Inpaint area": "Whole picture", "Masked area padding": 32,
                     "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0, "Schedule min sigma": 0,
                     "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
                     "Refiner switch by sampling steps": False}


def png_info(info: dict, exif) -> dict:
    """A1111's /png-info answer for an image's metadata: `info` the infotext (its PNG "parameters" text, or the
    EXIF UserComment A1111 writes into a JPEG or WEBP), `items` the other texts, `parameters` the infotext
    parsed as A1111's parse_generation_parameters does (values as text; a "WxH" value as KEY-1 and KEY-2 only;
    its defaults for the keys not there, PNG_INFO_DEFAULTS, and "Emphasis: Original" for a prompt that weighs)."""
    from fastsd.image import parse_infotext

    items = {_sendable(k): _sendable(v) for k, v in info.items()
             if isinstance(k, str) and isinstance(v, str) and k.lower() not in NOT_TEXT}
    items.pop("parameters", None)
    text = _sendable(image_infotext(info, exif) or "")  # (fastsd.a1111, shared with the CLI's --infotext)
    prompt, negative, params = parse_infotext(text) if text else ("", "", {})
    parameters = {}
    for k, v in params.items():
        if m := re.fullmatch(r"(\d+)x(\d+)", v):
            parameters[f"{k}-1"], parameters[f"{k}-2"] = m.groups()
        else:
            parameters[k] = v
    parameters.update({"Prompt": prompt, "Negative prompt": negative})
    parameters |= {k: v for k, v in PNG_INFO_DEFAULTS.items() if k not in parameters}
    if "Emphasis" not in parameters and _weighs(prompt, negative):
        parameters["Emphasis"] = "Original"
    return {"info": text, "items": items,
            "parameters": {_sendable(k): _sendable(v) if isinstance(v, str) else v for k, v in parameters.items()}}


def _weighs(*prompts: str) -> bool:
    """A prompt weighs some text (A1111's emphasis); a prompt fastsd refuses to read (a weight that isn't a finite
    number, too many brackets open) counts as weighing: it is the image's text, not a request."""
    from fastsd.tokenizer import parse_prompt_attention

    try:
        return any(w != 1 and piece != "BREAK" for p in prompts for piece, w in parse_prompt_attention(p))
    except ValueError:
        return True


def _sendable(text: str) -> str:
    """The text with what JSON's UTF-8 can't carry (lone surrogates, from an escape in the infotext) as U+FFFDs."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def encode_png(image: Image.Image) -> str:
    """Base64 PNG with the image's infotext, if it has one, in its 'parameters' chunk (as A1111's API sends)."""
    from fastsd.image import png_writer

    buf = io.BytesIO()
    png_writer(image, image.info.get("parameters"))(buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def run_plan(plan: Plan, job, networks, vaes) -> dict:
    """On the worker thread: the n_iter generations, stopping at the next step when the job is stopped.
    Returns A1111's response body. As A1111, an iteration left at a step by /interrupt or /skip gives the images of
    that step's prediction (half-denoised); an interrupt runs no further iteration. A job whose client has gone
    (or stopped by the server's shutdown) raises `Cancelled` at that step instead: no images are decoded."""
    from fastsd import CheckpointError, Interrupted
    from fastsd.serve.networks import file_names

    pipe = plan.model.pipe
    hires_pipe = None if plan.hires_model is None else plan.hires_model.pipe
    for p in [p for p in (pipe, hires_pipe) if p is not None]:  # (both models get the request's LoRAs and VAE)
        networks.apply(p, plan.loras)
        vaes.apply(p, plan.vae)
    s, images, stopped_at, skipped = plan.settings, [], None, []
    if s.hires and s.hires_upscaler not in (None, *hires.UPSCALERS):  # a model of --upscaler-dir, loaded (kept) now:
        try:  # a file broken since the request was checked is named by its file name, not the server's folder
            (hires_pipe or pipe).upscaler(s.hires_upscaler)
        except (CheckpointError, OSError, ValueError) as e:
            raise BadRequest(file_names(str(e) or type(e).__name__, [s.hires_upscaler])) from None
    for it in range(plan.n_iter):
        job.iteration, job.step, job.skipped = it, 0, False  # a skip between iterations is dropped, as A1111's
        left_at = []

        def on_step(step: int, total: int, preview) -> None:
            try:
                job.on_step(step, total, preview)
            except Interrupted:
                if job.cancelled:  # the client has gone or the server stops: decode nothing for nobody
                    raise Cancelled(f"{job.kind} stopped at step {step}: client gone or server stopping") from None
                left_at.append(step)
                raise

        shift = it * s.num_images  # iteration it's images: seed + shift + i (and subseed + shift + i)
        subseed = None if s.subseed is None else s.subseed + shift
        got = pipe.generate(**s.replace(seed=s.image_seed(shift), subseed=subseed
                                        ).kwargs(), image=[plan.image, *(m.image for m in plan.more)] if plan.more
                            else plan.image, resize_mode=plan.resize_mode,
                            mask=plan.mask, masked_content=plan.masked_content,
                            latent_mask=plan.latent_mask, fill_seed=s.seed,  # (A1111: the 1st iteration's noise)
                            infotext_extra=plan.infotext_extra, progress=False, on_step=on_step,
                            on_interrupt="decode", allow_large=True, hires_pipe=hires_pipe)
        overlays = [(plan.overlay, plan.paste_to), *((m.overlay, m.paste_to) for m in plan.more)]
        images += [masking.apply_overlay(im, *overlays[min(i, len(overlays) - 1)])
                   if overlays[min(i, len(overlays) - 1)][0] is not None else im for i, im in enumerate(got)]
        if left_at:
            if job.stopped:
                stopped_at = (it, left_at[0], len(got))
                break
            skipped.append((it, left_at[0], len(got)))
    return response(plan, images, stopped_at, skipped)


def _left(what: str, it: int, step: int, kept: int) -> str:
    return f"{what} at step {step} of iteration {it + 1}; its {kept} image(s) are that step's prediction, not finished"


def response(plan: Plan, images: list[Image.Image], stopped_at: tuple[int, int, int] | None,
             skipped: list[tuple[int, int, int]] = ()) -> dict:
    s, entry = plan.settings, plan.model
    subseed = plan.subseed if s.subseed is None else s.subseed  # (A1111 reports it with no strength too)
    seeds = [s.image_seed(i) for i in range(s.num_images * plan.n_iter)]
    warnings = list(plan.warnings)
    warnings += [_left("skipped", *left) for left in skipped]
    if stopped_at is not None:
        warnings.append(_left("interrupted", *stopped_at) + "; no further iteration ran")
    infotexts = [im.info.get("parameters", "") for im in images]
    encoded = [encode_image(im, *plan.image_format, warnings=warnings) for im in images] if plan.send_images else []
    info = {"prompt": s.prompt, "all_prompts": [s.prompt] * len(seeds), "negative_prompt": s.negative_prompt,
            "all_negative_prompts": [s.negative_prompt] * len(seeds), "seed": s.seed, "all_seeds": seeds,
            "subseed": subseed, "all_subseeds": [subseed + i for i in range(len(seeds))],
            "subseed_strength": s.subseed_strength, "width": s.width,
            "height": s.height, "sampler_name": sampler_label(s.sampler), "cfg_scale": s.guidance_scale,
            "steps": s.steps, "batch_size": s.num_images, "restore_faces": False, "face_restoration_model": None,
            # A1111's short hash of a checkpoint file (the infotext's "Model hash"); "" for a model with no single
            # file (random:, a diffusers folder), whose infotext has no "Model hash": always a string, as A1111's
            "sd_model_name": entry.name, "sd_model_hash": entry.hash or "", "sd_vae_name": entry.pipe.vae_name,
            "sd_vae_hash": entry.pipe.vae_hash(),
            "seed_resize_from_w": s.seed_resize_from_w or -1, "seed_resize_from_h": s.seed_resize_from_h or -1,
            "denoising_strength": s.strength if plan.kind == "img2img" else s.hires_strength if s.hires else None,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
            "styles": list(plan.styles), "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": s.clip_skip,
            # (A1111: true for any run of a 9-channel model, txt2img too)
            "is_using_inpainting_conditioning": entry.pipe.config.unet.in_channels == 9, "version": "fastsd",
            "interrupted": stopped_at is not None, "warnings": warnings}
    return {"images": encoded, "parameters": plan.parameters,
            "info": json.dumps(info)}
