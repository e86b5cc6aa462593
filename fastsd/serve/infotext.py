"""A1111's `infotext` request field (A1111 1.8+, its Api.apply_infotext): the infotext is parsed (with the CLI's
--infotext reader, fastsd.infotext_settings) and fills the request's fields the client did not set, and its
override_settings where the client set none of that name; the request's own fields win, and their infotext keys are
not read."""
from __future__ import annotations

from fastsd.serve.limits import BadRequest

# GenerationSettings field (settings_from_infotext's keywords) -> the request's field
FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "guidance_scale": "cfg_scale",
          "seed": "seed", "width": "width", "height": "height", "subseed": "subseed",
          "subseed_strength": "subseed_strength", "seed_resize_from_w": "seed_resize_from_w",
          "seed_resize_from_h": "seed_resize_from_h", "hires_scale": "hr_scale", "hires_width": "hr_resize_x",
          "hires_height": "hr_resize_y", "hires_steps": "hr_second_pass_steps", "hires_prompt": "hr_prompt",
          "hires_negative_prompt": "hr_negative_prompt", "s_min_uncond": "s_min_uncond", "eta": "eta",
          "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise",
          "hires_strength": "denoising_strength", "strength": "denoising_strength"}
# GenerationSettings field -> the A1111 option it is in override_settings (A1111's infotext_to_setting_name_mapping)
OPTIONS = {"clip_skip": "CLIP_stop_at_last_layers", "skip_early_cond": "skip_early_cond",
           "s_min_uncond_all": "s_min_uncond_all", "eta_noise_seed_delta": "eta_noise_seed_delta",
           "initial_noise_multiplier": "initial_noise_multiplier", "randn_source": "randn_source",
           "inpainting_mask_weight": "inpainting_mask_weight", "img2img_extra_noise": "img2img_extra_noise"}
# the infotext's names, taken as written (the request's own checks read them: A1111's paste fields)
NAMES = {"Sampler": "sampler_name", "Schedule type": "scheduler", "Hires sampler": "hr_sampler_name",
         "Hires schedule type": "hr_scheduler", "Hires upscaler": "hr_upscaler",
         "Hires checkpoint": "hr_checkpoint_name"}
MAX_INFOTEXT = 40_000  # characters: four prompts at the server's 8000-character limit and the settings
HIRES_KEYS = ("Hires upscale", "Hires upscaler", "Hires resize")  # with "Denoising strength": A1111's enable_hr


def apply_infotext(req, kind: str, warnings: list[str]) -> None:
    """Fill `req` (a Txt2ImgRequest / Img2ImgRequest) from its `infotext`, as A1111's apply_infotext: each field the
    request did not set that the infotext has; override_settings of A1111's options the infotext sets (Clip skip,
    ENSD, RNG, VAE, ...) unless the request's override_settings name them ("Model hash" is not applied: A1111's
    disable_weights_auto_swap default); an infotext without "Clip skip" is clip skip 1, as A1111's parser reads it.
    A value the infotext has that can't be read is a BadRequest naming the key; keys fastsd doesn't use are named
    in `warnings`."""
    from fastsd.image import parse_infotext
    from fastsd.infotext_settings import settings_from_infotext

    if not req.infotext:
        return
    if len(req.infotext) > MAX_INFOTEXT:
        raise BadRequest(f"infotext: {len(req.infotext)} characters, above the {MAX_INFOTEXT} an infotext may have")
    given, fields = set(req.model_fields_set) - {"infotext"}, type(req).model_fields
    skip = {ours for ours, theirs in FIELDS.items() if theirs in given} | {"hires_upscaler"}  # (taken as written)
    try:
        out, notes = settings_from_infotext(req.infotext, skip=skip)
    except ValueError as e:
        raise BadRequest(f"infotext: {e}") from None
    params = parse_infotext(req.infotext)[2]
    warnings += [f"infotext: {n}" for n in notes if not n.startswith("inpainting keys not read")]
    filled = {FIELDS[k]: v for k, v in out.items() if k in FIELDS and FIELDS[k] in fields}
    filled |= {field: params[key] for key, field in NAMES.items() if key in params and field in fields}
    if kind == "txt2img" and "Denoising strength" in params and any(k in params for k in HIRES_KEYS):
        filled["enable_hr"] = True
    for field, value in filled.items():
        if field not in given:
            setattr(req, field, value)
    over = dict(req.override_settings or {})
    options = {OPTIONS[k]: v for k, v in out.items() if k in OPTIONS}
    if params:
        options.setdefault("CLIP_stop_at_last_layers", 1)  # (A1111's parse_generation_parameters default)
    if params.get("VAE"):
        options["sd_vae"] = params["VAE"]
    for name, value in options.items():
        over.setdefault(name, value)
    if over:
        req.override_settings = over
