"""A1111's infotext -> `GenerationSettings` keywords: A1111's "PNG Info -> Send to txt2img" (the CLI's `--infotext`).

    from fastsd.infotext_settings import read_infotext, settings_from_infotext
    kwargs, warnings = settings_from_infotext(read_infotext("00012-42.png"))
    settings = GenerationSettings(**{**kwargs, "steps": 30})

Keys that only describe the run (Model, Model hash, VAE, VAE hash, Lora hashes, TI hashes, Version) set nothing
(`model_mismatch` compares Model / VAE with what a run loads); keys fastsd doesn't know are named in one warning and
ignored; a value that can't be read is an `InfotextError` (a ValueError) naming the key.
"""
from __future__ import annotations

import math
import os
import re
import stat
import sys
from typing import Callable, Collection

from fastsd import hires as _hires
from fastsd.image import parse_infotext

MAX_TEXT_BYTES = 1 << 20  # a .txt / stdin infotext above this is refused (an infotext is a few KB)
DESCRIPTIVE = ("Model hash", "Model", "VAE hash", "VAE", "Lora hashes", "TI hashes", "Version", "Hashes")
HIRES_KEYS = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler", "Hires schedule type")
SAME_SAMPLER, SAME_SCHEDULER = "Use same sampler", "Use same scheduler"  # A1111's "Hires sampler / schedule type"
INPAINT_KEYS = ("Mask mode", "Mask blur", "Inpaint area", "Masked area padding", "Masked content")  # (masking.py)
MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


class InfotextError(ValueError):
    """A value of the infotext that can't be read; `fields`: the GenerationSettings fields it would have set."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


def _int(v: str) -> int:
    if not re.fullmatch(r"[-+]?\d+", v):
        raise ValueError("not an integer")
    return int(v)


def _float(v: str) -> float:
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", v) or not math.isfinite(float(v)):
        raise ValueError("not a finite number")
    return float(v)


def _bool(v: str) -> bool:
    if v not in ("True", "False"):  # (A1111 writes Python's)
        raise ValueError("not True or False")
    return v == "True"


def _size(v: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\s*x\s*(\d+)", v)
    if m is None:
        raise ValueError("not a size WIDTHxHEIGHT")
    return int(m[1]), int(m[2])


def _rng(v: str) -> str:
    from fastsd.settings import RANDN_SOURCES

    if v not in RANDN_SOURCES:
        raise ValueError(f"not one of A1111's {', '.join(RANDN_SOURCES)}")
    return v


# key: (the GenerationSettings fields it sets, how its value is read)
SIMPLE: dict[str, tuple[tuple[str, ...], Callable[[str], object]]] = {
    "Steps": (("steps",), _int),
    "CFG scale": (("guidance_scale",), _float),
    "Seed": (("seed",), _int),
    "Size": (("width", "height"), _size),
    "Clip skip": (("clip_skip",), _int),
    "Variation seed": (("subseed",), _int),
    "Variation seed strength": (("subseed_strength",), _float),
    "Seed resize from": (("seed_resize_from_w", "seed_resize_from_h"), _size),
    "Hires upscale": (("hires_scale",), _float),
    "Hires resize": (("hires_width", "hires_height"), _size),
    "Hires steps": (("hires_steps",), _int),
    "Hires prompt": (("hires_prompt",), str),
    "Hires negative prompt": (("hires_negative_prompt",), str),
    "Hires upscaler": (("hires_upscaler",), _hires.upscaler_name),
    "NGMS": (("s_min_uncond",), _float),
    "NGMS all steps": (("s_min_uncond_all",), _bool),
    "Skip Early CFG": (("skip_early_cond",), _float),
    "ENSD": (("eta_noise_seed_delta",), _int),
    "Noise multiplier": (("initial_noise_multiplier",), _float),
    "Conditional mask weight": (("inpainting_mask_weight",), _float),
    "Extra noise": (("img2img_extra_noise",), _float),
    "RNG": (("randn_source",), _rng),
}
KNOWN = {*SIMPLE, "Sampler", "Schedule type", "Denoising strength", "Hires sampler", "Hires schedule type", "Eta",
         "Eta DDIM", "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise", *DESCRIPTIVE}


def _read(key: str, value: str, fields: tuple[str, ...], parse: Callable[[str], object]):
    try:
        return parse(value)
    except ValueError as e:
        raise InfotextError(f"'{key}: {value}': {e}", fields) from None


def settings_from_infotext(text: str, *, skip: Collection[str] = ()) -> tuple[dict, list[str]]:
    """(GenerationSettings keywords, warnings) of an A1111 or fastsd infotext. Only what the infotext sets is in
    the keywords (the prompt and negative prompt always); `skip`: fields given elsewhere (the command line's),
    whose keys are not read (a bad value there is no error). InfotextError (one line) for a value that can't be
    read: a number or size that isn't one, an unknown sampler or hires upscaler.

    "Sampler" + "Schedule type" pair as A1111 1.9+ reads them (`fastsd.a1111.scheduled`: "DPM++ 2M" + "Karras" is
    dpmpp_2m_karras, "Automatic" is the sampler's A1111 default); without "Schedule type" (an infotext from before
    A1111 1.9, or fastsd's with the sampler's own schedule) the sampler runs its own schedule, as it did then.
    "Denoising strength" is the hires fix's when hires keys are there, else img2img's strength; a hires pass at
    "Hires upscale: 1.0" (or hires keys with "Denoising strength" and no scale or size) sets enable_hires, A1111's
    same-size second pass. No "RNG" key in
    an infotext with parameters is A1111's default, "GPU" (the noise of an NVIDIA GPU: fastsd.philox)."""
    from fastsd.a1111 import hires_scheduled, scheduled
    from fastsd.schedule_types import AUTOMATIC, resolve_schedule_type

    skip = set(skip)
    prompt, negative, params = parse_infotext(text)
    out: dict = {}
    warnings: list[str] = []
    for name, value in (("prompt", prompt), ("negative_prompt", negative)):
        if name not in skip:
            out[name] = value
    for key, (fields, parse) in SIMPLE.items():
        if key in params and not set(fields) <= skip:
            got = _read(key, params[key], fields, parse)
            for field, v in zip(fields, got if len(fields) > 1 else (got,)):
                if field not in skip:
                    out[field] = v
    if params and "RNG" not in params and "randn_source" not in skip:  # A1111 writes none for its default
        out["randn_source"] = "GPU"
    if "Hires resize" in params and "hires_scale" not in skip:  # (A1111 ignores the scale for a resize target)
        out["hires_scale"] = 1.0
    hires = any(key in params for key in HIRES_KEYS)
    # A1111's enable_hr: "Hires upscale" / "Hires resize" (A1111 writes one for every hires pass), or other hires keys
    # with "Denoising strength"; at scale 1 without a size (A1111 1.6+'s same-size second pass) only the switch runs it
    if ("Hires upscale" in params or "Hires resize" in params or (hires and "Denoising strength" in params)) and \
            "Hires resize" not in params and out.get("hires_scale", 1.0) == 1.0 and "enable_hires" not in skip:
        out["enable_hires"] = True
    if "Denoising strength" in params:
        field = "hires_strength" if hires else "strength"
        if field not in skip:
            out[field] = _read("Denoising strength", params["Denoising strength"], (field,), _float)

    # the sampler and its schedule type (A1111 1.9+'s pair, as its infotext paste reads it)
    name, sched = params.get("Sampler"), params.get("Schedule type")
    first_type = AUTOMATIC
    if name is not None and "sampler" not in skip:
        try:
            out["sampler"], first_type = scheduled(name, sched, "Schedule type", warnings, paste=True)
        except ValueError as e:
            raise InfotextError(f"'Sampler: {name}': {e}", ("sampler",)) from None
        if (sched is not None or first_type != AUTOMATIC) and "schedule_type" not in skip:
            out["schedule_type"] = first_type
    elif sched is not None and "schedule_type" not in skip:  # the command line's sampler: the type as it is
        try:
            out["schedule_type"] = first_type = resolve_schedule_type(sched)
        except ValueError as e:
            warnings.append(f"Schedule type: {e}; the sampler's own schedule is used")

    # the hires fix's sampler: "Hires sampler" / "Hires schedule type" (written when they differ from the first's)
    second_name, second_sched = params.get("Hires sampler"), params.get("Hires schedule type")
    second_name = None if second_name == SAME_SAMPLER else second_name
    second_sched = None if second_sched == SAME_SCHEDULER else second_sched
    if hires and "hires_sampler" not in skip and (second_name is not None or second_sched is not None) and \
            (second_name is not None or name is not None):
        try:
            second, second_type = hires_scheduled(second_name or name, second_sched if second_sched is not None
                                                  else sched, out.get("schedule_type", first_type),
                                                  "Hires schedule type", warnings, paste=True)
        except ValueError as e:
            raise InfotextError(f"'Hires sampler: {second_name}': {e}", ("hires_sampler",)) from None
        out["hires_sampler"] = second if second != out.get("sampler") else None
        if second_type is not None and "hires_schedule_type" not in skip:
            out["hires_schedule_type"] = second_type

    _read_eta(params, out, skip, warnings)
    _read_sigma_params(params, out, skip, warnings)
    inpaint = [k for k in params if k in INPAINT_KEYS]
    if inpaint:  # (not settings: the CLI's own options, with --init-image and --mask)
        warnings.append(f"inpainting keys not read ({', '.join(inpaint)}): give --mask-blur, --inpaint-area, "
                        "--inpaint-padding, --masked-content with --init-image and --mask")
    unknown = [k for k in params if k not in KNOWN and k not in INPAINT_KEYS]
    if unknown:
        warnings.append(f"infotext keys fastsd doesn't use, ignored: {', '.join(unknown)}")
    return out, warnings


def _read_eta(params: dict, out: dict, skip: set, warnings: list[str]) -> None:
    """A1111's "Eta" / "Eta DDIM" into `eta` where the infotext's sampler is one fastsd runs with an eta
    (samplers.ETA_SAMPLERS); for another sampler (or the command line's) a warning line."""
    from fastsd.samplers import A1111_NAMES, ETA_SAMPLERS, ETA_TAKERS, get_sampler

    key = next((k for k in ("Eta", "Eta DDIM") if k in params), None)
    if key is None or "eta" in skip:
        return
    value = _read(key, params[key], ("eta",), _float)
    sampler = out.get("sampler")
    name = get_sampler(sampler).name if sampler is not None else None
    if name in ETA_SAMPLERS and ETA_SAMPLERS[name][1] == key:
        out["eta"] = value
    else:
        runs = A1111_NAMES.get(name, name) if name else "the command line's sampler"
        warnings.append(f"{key}: {params[key]}: fastsd takes an eta for {ETA_TAKERS} only; {runs} runs with its "
                        "own, ignored")


def _read_sigma_params(params: dict, out: dict, skip: set, warnings: list[str]) -> None:
    """A1111's "Sigma churn" / "Sigma tmin" / "Sigma tmax" / "Sigma noise" into their fields where the infotext's
    sampler takes them (samplers.sigma_params); for another sampler (or the command line's) a warning line."""
    from fastsd.samplers import A1111_NAMES, SIGMA_DEFAULTS, SIGMA_KEYS, SIGMA_TAKERS, get_sampler, takes_sigma_param

    sampler = out.get("sampler")
    name = get_sampler(sampler).name if sampler is not None else None
    for field, key in SIGMA_KEYS.items():
        if key not in params or field in skip:
            continue
        value = _read(key, params[key], (field,), _float)
        if field == "s_tmax" and value == math.inf:  # (fastsd's 0: no bound)
            value = 0.0
        if name is not None and takes_sigma_param(name, field):
            out[field] = value
        elif value != SIGMA_DEFAULTS[field]:
            runs = A1111_NAMES.get(name, name) if name else "the command line's sampler"
            warnings.append(f"{key}: {params[key]}: fastsd takes it for {SIGMA_TAKERS[field]} only; {runs} runs "
                            "without it, ignored")


def _stem(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/"))
    return (base[:-len(ext)] if (ext := os.path.splitext(base)[1].lower()) in MODEL_EXTS else base).casefold()


def model_mismatch(text: str, model: str, vae: str | None) -> str | None:
    """One line naming the infotext's "Model" / "VAE" and the ones this run uses (`model`: Pipeline.name; `vae`:
    Pipeline.vae_name, None for the model's own VAE) when they differ (names compared without a file extension,
    any case); None when they agree or the infotext names none."""
    params = parse_infotext(text)[2]
    parts = []
    if params.get("Model") and _stem(params["Model"]) != _stem(model):
        parts.append(f"model {params['Model']!r}, this run loads {model!r}")
    if params.get("VAE") and (vae is None or _stem(params["VAE"]) != _stem(vae)):
        parts.append(f"VAE {params['VAE']!r}, this run uses " + (repr(vae) if vae else "the model's own"))
    return f"the infotext names {'; and '.join(parts)}: the image may differ" if parts else None


# ---- reading it ---------------------------------------------------------------------------------------------

def _decode(data: bytes, what: str) -> str:
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{what}: {len(data)} bytes, above the {MAX_TEXT_BYTES} bytes an infotext may have")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: not UTF-8 text (byte {e.start})") from None


def read_infotext(source: str, stdin=None) -> str:
    """The infotext of `source`: an image (PNG "parameters" text, or the EXIF UserComment of a JPEG / WEBP, as
    A1111's "PNG Info"), a .txt file holding the text, or "-" for `stdin` (default sys.stdin). ValueError (one
    line naming the source) for a missing or unreadable file, an image without infotext, an empty text."""
    what = "--infotext -" if source == "-" else f"--infotext {source}"
    if source == "-":
        stdin = sys.stdin if stdin is None else stdin
        buf = getattr(stdin, "buffer", None)
        try:
            text = _decode(buf.read(MAX_TEXT_BYTES + 1) if buf is not None
                           else stdin.read(MAX_TEXT_BYTES + 1).encode("utf-8", "surrogatepass"), what)
        except OSError as e:
            raise ValueError(f"{what}: can't read stdin ({e.strerror or type(e).__name__})") from None
    elif source.lower().endswith(".txt"):
        try:
            st = os.stat(source)
            if stat.S_ISDIR(st.st_mode):
                raise ValueError(f"{what}: is a folder, not a text file")
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{what}: is not a regular file (a FIFO, device or socket)")
            with open(source, "rb") as f:
                text = _decode(f.read(MAX_TEXT_BYTES + 1), what)
        except FileNotFoundError:
            raise ValueError(f"{what}: no such file") from None
        except OSError as e:
            raise ValueError(f"{what}: can't read it ({e.strerror or type(e).__name__})") from None
    else:
        from fastsd.a1111 import image_infotext
        from fastsd.image import load_image

        im = load_image(source, "--infotext")  # (its checks: missing, a folder, a FIFO, not an image, a bomb)
        text = image_infotext(im.info, im.getexif())
        if not text or not text.strip():
            raise ValueError(f"{what}: the image holds no infotext (no PNG 'parameters' text, no EXIF UserComment)")
        return text
    if not text.strip():
        raise ValueError(f"{what}: empty, no infotext")
    return text
