"""A1111's API request and response shapes (field names, types and defaults as in A1111's
modules/api/models.py, which derives them from its processing classes).

Unknown fields are ignored, as A1111's pydantic models do. Fields fastsd knows but cannot honour are not
dropped silently: `unhonoured()` names each one set to a non-default value, and the response's info carries
those lines under "warnings".
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

# half of a UTF-16 pair, alone: JSON's "\ud800" escape reads as one, but it is not Unicode text
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def unsendable(value, where: str) -> tuple[str, str] | None:
    """(where, why) of the first part of `value` (lists and dicts looked into, keys too) that JSON can't carry
    back, or None: a NaN or infinite number (JSON has none; Python reads NaN, and 1e400 as inf) or a string
    holding a lone surrogate ("\\ud800" is valid JSON but not Unicode). The response echoes the request, so such a
    value would fail it after the work was done."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, f"Input should be a finite number, got {value}"
    if isinstance(value, str) and (m := LONE_SURROGATE.search(value)):
        return where, f"Input should be Unicode text, got a lone surrogate {m.group()!a} at character {m.start()}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if found := unsendable(key, where) or unsendable(item, f"{where}.{key}"):
            return found
    return None


INT_FIELDS = (int, int | None)  # the annotations a fraction is truncated for


class _Body(BaseModel):
    @field_validator("*", mode="before")
    @classmethod
    def _truncate_fractions(cls, value, info: ValidationInfo):
        """A finite float in an integer field is truncated (12.5 -> 12), as A1111's pydantic v1 models do (aiyabot
        sends hr_second_pass_steps = steps / 2); NaN, inf and non-numbers are left to the field's check (a 422); a
        float of 2**63 or more is refused as given (1e+308, not its 309 digits)."""
        if isinstance(value, float) and math.isfinite(value) and cls.model_fields[info.field_name].annotation in \
                INT_FIELDS:
            if abs(value) >= 2**63:
                raise PydanticCustomError("int_too_large", "Input should be an integer between -2**63 and 2**63, "
                                          "got {got}", {"got": repr(value)})
            return int(value)
        return value

    @field_validator("*")
    @classmethod
    def _sendable(cls, value, info: ValidationInfo):
        """Every value must go back out as JSON: refused up front (422 naming the field), before any work."""
        if found := unsendable(value, info.field_name):
            where, why = found
            raise PydanticCustomError("unsendable", why if where == info.field_name else f"{why} (at {where})")
        return value


class _Request(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """A1111's request models make every field Optional, and clients send null for fields they leave alone
        (`"seed": null` is a random seed there, its get_fixed_seed): here null takes the field's default."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                or cls.model_fields[k].default is None}

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None

    def unhonoured(self) -> list[str]:
        """One line per field set to something fastsd does not do."""
        notes = []
        for name in ("restore_faces", "tiling", "save_images"):
            if getattr(self, name):
                notes.append(f"{name}: not supported, ignored" + ("; the server saves no files" if name == "save_images"
                                                                   else ""))
        if self.override_settings and not self.override_settings_restore_afterwards:
            notes.append("override_settings_restore_afterwards false: not supported; override_settings applied to "
                         "this request only (POST /sdapi/v1/options sets them for later ones)")
        if self.refiner_checkpoint:
            notes.append("refiner_checkpoint: refiners are not supported, ignored")
        if self.script_name or self.script_args:
            notes.append(f"script_name {self.script_name!r}: scripts are not supported, ignored")
        if self.alwayson_scripts:
            notes.append(f"alwayson_scripts {sorted(self.alwayson_scripts)}: scripts are not supported, ignored")
        return notes


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    init_images: list | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float = 0.75

    def unhonoured(self) -> list[str]:
        notes = super().unhonoured()
        if self.resize_mode not in (0, 1, 2, 3):
            notes.append(f"resize_mode {self.resize_mode}: A1111's are 0 (just resize), 1 (crop and resize), 2 (resize "
                         "and fill) and 3 (latent upscale); run as 2, as A1111's resize_image does")
        if self.latent_mask:
            notes.append("latent_mask: not supported, ignored")
        if self.include_init_images:
            notes.append("include_init_images: the init images are not sent back")
        return notes


class OptionsRequest(_Body):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = None
    sd_vae: str | None = None
    CLIP_stop_at_last_layers: int | None = None
    skip_early_cond: float | None = None  # A1111's "Ignore negative prompt during early sampling"
    s_min_uncond_all: bool | None = None  # A1111's "NGMS all steps"
    eta_noise_seed_delta: int | None = None  # A1111's ENSD
    initial_noise_multiplier: float | None = None  # A1111's "Noise multiplier for img2img"
    eta_ancestral: float | None = None  # A1111's eta of its ancestral samplers (a request's eta wins)
    eta_ddim: float | None = None  # A1111's eta of DDIM (likewise)
    s_churn: float | None = None  # A1111's "sigma churn" (and tmin, tmax, noise): they win over a request's fields
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    randn_source: str | None = None  # A1111's "Random number generator source": CPU, GPU or NV
    inpainting_mask_weight: float | None = None  # A1111's "Inpainting conditioning mask strength", in [0, 1]
    img2img_fix_steps: bool | None = None  # A1111's "With img2img, do exactly the amount of steps the slider specifies"
    img2img_extra_noise: float | None = None  # A1111's "Extra noise multiplier for img2img and hires fix", in [0, 1]
    img2img_color_correction: bool | None = None  # A1111's "Apply color correction to img2img results to match ..."
    samples_format: str | None = None  # A1111's format of the images answered: png, jpg, jpeg or webp
    jpeg_quality: int | None = None  # A1111's quality of those JPEG / WEBP images, 1..100


class ProgressRequest(_Body):
    """A1111's POST /internal/progress body: the task (a request's force_task_id), the id of the live preview the
    client has (-1: none; the same preview is not sent again) and whether it wants one."""

    model_config = ConfigDict(extra="ignore")

    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


class PNGInfoRequest(_Body):
    model_config = ConfigDict(extra="ignore")

    image: str  # base64 (or a data: URL), as A1111's


class ExtrasSingleImageRequest(_Body):
    """A1111's Extras tab (its ExtrasSingleImageRequest: fields, defaults and bounds)."""

    model_config = ConfigDict(extra="ignore")

    image: str = ""  # base64 (or a data: URL)
    resize_mode: Literal[0, 1] = 0  # 0: by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False



class FileData(_Body):
    """A1111's FileData: one image of an Extras batch."""

    model_config = ConfigDict(extra="ignore")

    data: str = ""  # base64 (or a data: URL)
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasSingleImageRequest):
    """A1111's ExtrasBatchImagesRequest: the single-image fields for every image of `imageList`."""

    imageList: list[FileData] = Field(default_factory=list)
