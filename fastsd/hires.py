"""A1111's hires fix for txt2img: generate at width x height, upscale (the latents, or the decoded image), crop to the
target and refine with a second img2img pass at the new size. The rules here are A1111's
(`StableDiffusionProcessingTxt2Img`: `calculate_target_resolution`, `sample_hr_pass`; `setup_img2img_steps`), so a
request means what it means there. Plain Python: the settings check sizes with it before torch is imported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

# A1111's hires upscalers that need no model file: its latent modes (`shared.latent_upscale_modes`:
# torch interpolate mode, antialias) and its built-in image upscalers (PIL resampling; "None" resizes with Lanczos).
LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
IMAGE_RESAMPLE = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_MODES, *IMAGE_RESAMPLE)
MAX_SCALE = 8.0
MODEL_EXTS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")  # upscaler model files


def builtin_upscaler(name: str | None) -> str | None:
    """A1111's name of a built-in upscaler (a latent mode, None, Lanczos, Nearest) as typed, case and spacing aside;
    None for any other name, and for None (unset: not A1111's "None" upscaler)."""
    if name is None:
        return None
    key = " ".join(str(name).split()).lower()
    return next((u for u in UPSCALERS if u.lower() == key), None)


def resolve_upscaler(name: str | None) -> str:
    """A1111's upscaler name (case and spacing as typed aside), or the path of an upscaler model file (ESRGAN,
    Real-ESRGAN: fastsd/upscalers.py) as it is; None (left unset, A1111's API default) is "Latent" (A1111's default
    latent_upscale_default_mode); ValueError naming what fastsd takes."""
    if name is None:
        return "Latent"
    known = builtin_upscaler(name)
    if known is not None:
        return known
    if str(name).lower().endswith(MODEL_EXTS) and os.path.isfile(name):
        return name
    if str(name).lower().endswith(MODEL_EXTS):
        raise ValueError(f"hires upscaler {name}: no such file")
    raise ValueError(f"unknown hires upscaler {name!r}; fastsd has {', '.join(repr(u) for u in UPSCALERS)}, or an "
                     "upscaler model file (ESRGAN / Real-ESRGAN / SwinIR .pth or .safetensors; by name from "
                     "--upscaler-dir)")


def upscaler_name(name: str) -> str:
    """An infotext's "Hires upscaler": A1111's built-in name, or an upscaler model's name (a file stem, found
    in --upscaler-dir later); ValueError for anything else (a path)."""
    known = builtin_upscaler(name)
    if known is not None:
        return known
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(f"hires upscaler {name!r}: neither one of A1111's built-in upscalers nor a model name")
    return name


def upscaler_label(name: str) -> str:
    """The infotext's "Hires upscaler": A1111's name; a model file's stem (A1111 names models/ESRGAN files so), or
    A1111's name for the files it downloads itself (RealESRGAN_x4plus: "R-ESRGAN 4x+"), so A1111 finds it."""
    from fastsd.upscalers import A1111_FILES

    got = resolve_upscaler(name)
    if got in UPSCALERS:
        return got
    stem = os.path.splitext(os.path.basename(got))[0]
    return next((a for a, file in A1111_FILES.items() if file == stem), stem)


def resize_image(image: Image.Image, width: int, height: int, upscaler: str) -> Image.Image:
    """A1111's images.resize_image (resize mode 0) with a built-in image upscaler (IMAGE_RESAMPLE): "None" one Lanczos
    resize; "Lanczos" / "Nearest", when width x height is larger, its Upscaler.upscale first (a resize by the scale,
    then Lanczos to that size rounded down to 8 px); then Lanczos to width x height (fastsd.upscalers.resize_with)."""
    from fastsd.upscalers import resample_pass, resize_with

    scale = max(width / image.width, height / image.height)
    return resize_with(image, width, height,
                       None if upscaler == "None" else resample_pass(IMAGE_RESAMPLE[upscaler], scale))


@dataclass(frozen=True)
class Target:
    """Where the first pass (width x height) goes: upscaled to up_w x up_h px, then `trunc_x` / `trunc_y` latent
    columns / rows cut off (half before, half after) to fit a requested size of another aspect ratio."""

    up_w: int
    up_h: int
    trunc_x: int = 0
    trunc_y: int = 0

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents after the upscale, before the crop (A1111: the target // 8)."""
        return self.up_h // 8, self.up_w // 8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the final image."""
        h, w = self.latent_size
        return (w - self.trunc_x) * 8, (h - self.trunc_y) * 8


def target(width: int, height: int, scale: float, resize_w: int = 0, resize_h: int = 0) -> Target:
    """A1111's calculate_target_resolution: by `scale`, or to resize_w x resize_h (one of them 0: the other side
    follows the aspect ratio; both: scaled to cover, then cropped)."""
    if not resize_w and not resize_h:
        return Target(int(width * scale), int(height * scale))
    if not resize_h:
        return Target(resize_w, resize_w * height // width)
    if not resize_w:
        return Target(resize_h * width // height, resize_h)
    if width / height < resize_w / resize_h:
        up_w, up_h = resize_w, resize_w * height // width
    else:
        up_w, up_h = resize_h * width // height, resize_h
    return Target(up_w, up_h, (up_w - resize_w) // 8, (up_h - resize_h) // 8)


def second_pass_steps(steps: int, strength: float) -> tuple[int, int]:
    """(schedule length, steps run) of the second pass, as A1111's setup_img2img_steps with its steps given: the
    requested steps all run, at the end of a schedule of int(steps / strength) steps (strength capped at 0.999; a
    length past 2**31 is given as 2**31: no run takes it)."""
    n = steps / min(strength, 0.999)
    return (int(n) if n < 2**31 else 2**31), steps


def crop(latents, t: Target):
    """The upscaled latents (B, C, h, w) cropped as A1111 does for a requested size of another aspect ratio."""
    h, w = latents.shape[2:]
    return latents[:, :, t.trunc_y // 2:h - (t.trunc_y + 1) // 2, t.trunc_x // 2:w - (t.trunc_x + 1) // 2]
