"""A1111's conventions that the server (`fastsd.serve`) and the command line (`--infotext`) read alike: its sampler +
"Schedule type" pairs (1.9+), and where an image keeps its infotext (the PNG "parameters" text, or the EXIF
UserComment of a JPEG or WEBP).
"""
from __future__ import annotations

from fastsd.samplers import A1111_NAMES, SAMPLERS
from fastsd.schedule_types import AUTOMATIC, check_sampler, resolve_schedule_type, schedule_label

# A1111 1.9+'s "Automatic" schedule of the samplers whose default is not uniform (its samplers' 'scheduler' option)
A1111_AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_2s_a": "karras", "dpmpp_sde": "karras",
                   "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential"}
# the (sampler, schedule type) pairs fastsd has as one sampler (its diffusers twin); other schedule types run as
# GenerationSettings.schedule_type
SCHEDULED = {(name.removesuffix("_karras"), "karras"): name for name in SAMPLERS if name.endswith("_karras")}


def scheduled(sampler: str, name: str, scheduler: str | None, field: str, warnings: list[str]) -> tuple[str, str]:
    """(sampler, schedule type) for a sampler (canonical; `name` as asked) and A1111's `scheduler` value, by A1111
    1.9+'s rules: a joint name's schedule wins ("DPM++ 2M Karras" runs Karras whatever `scheduler` says); Automatic
    (or none) is the sampler's A1111 default (Karras for DPM++ 2M, 2S a and SDE, Exponential for the 2M / 3M SDE
    ones, else the sampler's own). Karras runs the sampler's Karras twin where it has one (its diffusers twin, as
    the joint name); another type runs as GenerationSettings.schedule_type. A type fastsd doesn't know (A1111 falls
    back to the model's schedule) or one that can't drive the sampler is warned (in `warnings`, naming `field`) and
    the sampler's own used."""
    try:
        sched = resolve_schedule_type(scheduler)
    except ValueError as e:
        warnings.append(f"{field}: {e}; the sampler's own schedule was used")
        return sampler, AUTOMATIC
    if sampler.endswith("_karras"):
        if sched not in (AUTOMATIC, "karras"):
            warnings.append(f"{field} {scheduler!r}: ignored, {name!r} names its schedule (Karras), as A1111")
        return sampler, AUTOMATIC
    if sched == AUTOMATIC:
        sched = A1111_AUTOMATIC.get(sampler, AUTOMATIC)
    if (sampler, sched) in SCHEDULED:
        return SCHEDULED[sampler, sched], AUTOMATIC
    try:
        check_sampler(sched, sampler)
    except ValueError:
        warnings.append(f"{field} {scheduler!r}: not supported with {A1111_NAMES.get(sampler, sampler)}; the "
                        "sampler's own schedule was used")
        return sampler, AUTOMATIC
    return sampler, sched


def hires_scheduled(second: str, name: str, scheduler: str | None, schedule_type: str, field: str,
                    warnings: list[str]) -> str:
    """The hires fix's second-pass sampler for A1111's hires sampler (canonical; `name` as asked) and its schedule
    (`scheduled`), given the first pass's schedule type: fastsd runs one schedule type for both passes, so a second
    pass's apart from the first's is warned and the first's run."""
    second, second_type = scheduled(second, name, scheduler, field, warnings)
    if second_type != schedule_type:
        warnings.append(f"{field}: the second pass's schedule ({schedule_label(second_type) or 'Automatic'}) "
                        f"apart from the first pass's is not supported; it runs the first pass's "
                        f"({schedule_label(schedule_type) or 'Automatic'})")
        if schedule_type != AUTOMATIC:
            second = second.removesuffix("_karras")
    return second


# ---- the infotext in an image's metadata ---------------------------------------------------------------------

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286  # EXIF UserComment (in the Exif IFD, 0x8769): where A1111 writes a JPEG's or WEBP's infotext


def user_comment(raw) -> str | None:
    """An EXIF UserComment's text: its 8-byte character code (UNICODE: UTF-16 big-endian, as A1111's piexif
    writes; ASCII; undefined) then the text."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    code, body = raw[:8], raw[8:]
    encoding = "utf-16-be" if code == b"UNICODE\0" else "ascii" if code == b"ASCII\0\0\0" else "utf-8"
    return body.decode(encoding, errors="replace").rstrip("\0")


def image_infotext(info: dict, exif) -> str | None:
    """An image's infotext as A1111's "PNG Info" finds it: the "parameters" text of `info` (PIL's Image.info), else
    the EXIF UserComment of `exif` (PIL's Image.getexif()); None when there is neither."""
    text = info.get("parameters")
    if isinstance(text, str):
        return text
    return user_comment(exif.get_ifd(EXIF_IFD).get(USER_COMMENT))
