"""A1111's conventions that the server (`fastsd.serve`) and the command line (`--infotext`) read alike: its sampler +
"Schedule type" pairs (1.9+), and where an image keeps its infotext (the PNG "parameters" text, or the EXIF
UserComment of a JPEG or WEBP).
"""
from __future__ import annotations

from fastsd.samplers import A1111_NAMES, SAMPLERS, resolve_sampler_name
from fastsd.schedule_types import (AUTOMATIC, DISCARD_PENULTIMATE, check_sampler, resolve_schedule_type,
                                   schedule_label, split_joint)

# A1111 1.9+'s "Automatic" schedule of the samplers whose default is not uniform (its samplers' 'scheduler' option)
A1111_AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_2s_a": "karras", "dpmpp_sde": "karras", "dpm2": "karras",
                   "dpm2_a": "karras", "restart": "karras",
                   "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential"}
# the (sampler, schedule type) pairs fastsd has as one sampler (its diffusers twin); other schedule types run as
# GenerationSettings.schedule_type. Not DPM2, DPM2 a, DPM++ 3M SDE: A1111 drops their next-to-last Karras level
# (discard_next_to_last_sigma), which their twins keep, so their Karras runs as the type (Pipeline.schedule).
SCHEDULED = {(name.removesuffix("_karras"), "karras"): name for name in SAMPLERS
             if name.endswith("_karras") and name not in DISCARD_PENULTIMATE}
# Those three twins' own schedule has no A1111 name: their infotext names them by fastsd's name, which A1111 doesn't
# know and `scheduled` reads back as the twin
UNNAMED_TWINS = frozenset(n for n in DISCARD_PENULTIMATE if n.endswith("_karras"))


def twins_as_a1111(s):
    """GenerationSettings `s` with a (hires) sampler given by A1111's name of an UNNAMED_TWINS sampler ("DPM2 Karras",
    "k_dpm_2_a_ka", ...) on its own or the Karras schedule as A1111 runs it: the sampler on the Karras type (its
    next-to-last level dropped); fastsd's twin only by its own name (dpm2_karras). Names that can't be read are left
    for validate's message."""
    def pair(name, kind):
        try:
            canonical = resolve_sampler_name(name)
            typed = resolve_schedule_type(kind or AUTOMATIC) in (AUTOMATIC, "karras")
        except ValueError:
            return None
        if canonical in UNNAMED_TWINS and name.strip().lower() != canonical and typed:
            return canonical.removesuffix("_karras"), "karras"
        return None

    if isinstance(s.sampler, str) and isinstance(s.schedule_type, str) and (got := pair(s.sampler, s.schedule_type)):
        s = s.replace(sampler=got[0], schedule_type=got[1])
    if isinstance(s.hires_sampler, str) and isinstance(s.hires_schedule_type, (str, type(None))) and \
            (got := pair(s.hires_sampler, s.hires_schedule_type)):
        s = s.replace(hires_sampler=got[0], hires_schedule_type=got[1])
    return s


def sampler_label(name: str) -> str:
    """A1111 1.9+'s sampler name of a canonical sampler (its "sampler_name"): without a schedule ("DPM++ 2M" for
    dpmpp_2m_karras; `sampler_keys`), fastsd's own for UNNAMED_TWINS."""
    return sampler_keys(resolve_sampler_name(name), AUTOMATIC)[0]


def scheduled(name: str, scheduler: str | None, field: str, warnings: list[str], *, paste: bool = False
              ) -> tuple[str, str]:
    """(sampler, schedule type) for A1111's sampler name (an A1111 name, a joint one such as "DPM++ 2M Karras", or a
    canonical one) and `scheduler` value, by A1111 1.9+'s rules. Its API (paste False): a `scheduler` given wins
    over a joint name's schedule, none given is the joint name's or else Automatic. Its infotext paste (paste
    True): the joint name's wins; neither given is the sampler's own schedule (an infotext from before 1.9, or
    fastsd's with the sampler's own schedule). Automatic is the sampler's A1111 default (A1111_AUTOMATIC, else the
    sampler's own); Karras runs the sampler's Karras twin where it has one (not for DPM2, DPM2 a, DPM++ 3M SDE:
    SCHEDULED; their twins only by fastsd's name, UNNAMED_TWINS); another type runs as
    GenerationSettings.schedule_type. A type fastsd doesn't know (A1111 falls back to the model's schedule) or one
    that can't drive the sampler is warned (in `warnings`, naming `field`) and the sampler's own used. ValueError
    for an unknown sampler."""
    if name.strip() in UNNAMED_TWINS and _type(scheduler or AUTOMATIC) in (AUTOMATIC, "karras"):
        return name.strip(), AUTOMATIC  # (fastsd's infotext of such a twin on its own schedule, or its name)
    base, suffix = split_joint(name)
    sampler = resolve_sampler_name(base)
    if sampler.endswith("_karras"):  # a canonical or k_ joint name (dpmpp_2m_karras, k_dpmpp_2m_ka)
        sampler, suffix = sampler.removesuffix("_karras"), suffix or "karras"
    if paste:
        value = suffix if suffix is not None else scheduler
        if suffix is not None and scheduler and _type(scheduler) not in (AUTOMATIC, _type(suffix)):
            warnings.append(f"{field} {scheduler!r}: ignored, {name!r} names its schedule, as A1111 reads it")
        if not value:
            return sampler, AUTOMATIC
    else:
        value = scheduler or suffix
    try:
        sched = resolve_schedule_type(value)
    except ValueError as e:
        warnings.append(f"{field}: {e}; the sampler's own schedule was used")
        return sampler, AUTOMATIC
    if sched == AUTOMATIC:
        sched = A1111_AUTOMATIC.get(sampler, AUTOMATIC)
    if (sampler, sched) in SCHEDULED:
        return SCHEDULED[sampler, sched], AUTOMATIC
    try:
        check_sampler(sched, sampler)
    except ValueError:
        warnings.append(f"{field} {value!r}: not supported with {A1111_NAMES.get(sampler, sampler)}; the sampler's own "
                        "schedule was used")
        return sampler, AUTOMATIC
    return sampler, sched


def _type(value: str) -> str | None:
    try:
        return resolve_schedule_type(value)
    except ValueError:
        return None


def effective_schedule(sampler: str, schedule_type: str) -> str:
    """What `Pipeline.schedule` runs for a canonical sampler under a schedule type, as one name: "karras" for a
    Karras twin's own schedule or the Karras type, "automatic" for another sampler's own, else the type; the own
    schedule of the DPM2 / DPM2 a / DPM++ 3M SDE twins is not the Karras type (A1111 drops a level of that)."""
    if sampler.endswith("_karras") and sampler in DISCARD_PENULTIMATE:
        return "karras twin"
    if schedule_type == "karras" or (schedule_type == AUTOMATIC and sampler.endswith("_karras")):
        return "karras"
    return schedule_type


def hires_scheduled(name: str, scheduler: str | None, schedule_type: str, field: str, warnings: list[str], *,
                    paste: bool = False) -> tuple[str, str | None]:
    """(sampler, schedule type) of the hires fix's second pass for A1111's hires sampler name and the schedule it
    asks for (`scheduled`; the caller passes the first pass's scheduler for A1111's "Use same scheduler"), given
    the first pass's schedule type: the type None where what the first pass's type gives that sampler is the
    schedule asked for (GenerationSettings.hires_schedule_type unset), else the second pass's own."""
    second, second_type = scheduled(name, scheduler, field, warnings, paste=paste)
    same = second.removesuffix("_karras") if schedule_type not in (AUTOMATIC, "karras") else second
    if effective_schedule(same, schedule_type) == effective_schedule(second, second_type):
        return same, None
    return second, second_type


# the samplers whose own schedule (Pipeline.schedule's "automatic") is A1111's Automatic for them, a type
OWN_TYPE = {"restart": "karras"}  # (Restart's own: Euler's Karras levels, typed_schedule("karras") bit for bit)


def sampler_keys(sampler: str, schedule_type: str) -> tuple[str, str | None]:
    """("Sampler", "Schedule type") of the infotext for a run of canonical `sampler` on `schedule_type`, as A1111
    1.9+ writes them: its sampler name without a schedule ("DPM++ 2M") and the schedule's label: the type's, Karras
    for a `_karras` twin ("DPM++ 2M Karras" is written "DPM++ 2M" + "Karras"), "Automatic" for the own schedule of
    a sampler A1111 runs on no schedule type of its own (Euler, Euler a, DDIM, UniPC, ...: A1111 1.10 writes
    "Automatic" there), Restart's Karras. None (no "Schedule type": fastsd's reader takes the sampler's own) for the
    own schedule of a sampler whose A1111 Automatic is another one (A1111_AUTOMATIC: fastsd's plain dpmpp_2m runs
    its diffusers twin's levels, which no A1111 label names) and for UNNAMED_TWINS (written by fastsd's name)."""
    kind = resolve_schedule_type(schedule_type)
    if sampler in UNNAMED_TWINS:
        return sampler, None
    if sampler.endswith("_karras"):
        return A1111_NAMES[sampler.removesuffix("_karras")], "Karras"
    if kind == AUTOMATIC:
        if sampler in OWN_TYPE:
            return A1111_NAMES[sampler], schedule_label(OWN_TYPE[sampler])
        return A1111_NAMES[sampler], (None if sampler in A1111_AUTOMATIC else "Automatic")
    return A1111_NAMES[sampler], schedule_label(kind)


def sampler_fields(sampler: str, schedule_type: str, second: str | None = None,
                   hires_schedule_type: str | None = None) -> dict[str, str | None]:
    """The infotext's "Sampler", "Schedule type" and, with the hires fix's second pass (canonical `second`; its
    schedule type `hires_schedule_type`, None: the first pass's), "Hires sampler" / "Hires schedule type" (None:
    not written), as A1111 1.9+ writes them (`sampler_keys`): the hires ones where they are not the first pass's,
    so `fastsd.infotext_settings` reads the run back. A second pass on a schedule with no label (`sampler_keys`'
    None) after a first pass with one writes the first pass as no label reads ("Automatic" left out), or as the
    joint name A1111 1.9+ still reads ("DPM++ 2M Karras"), and names the hires sampler."""
    first, first_label = sampler_keys(sampler, schedule_type)
    out = {"Sampler": first, "Schedule type": first_label, "Hires sampler": None, "Hires schedule type": None}
    if second is None:
        return out
    name, label = sampler_keys(second, schedule_type if hires_schedule_type is None else hires_schedule_type)
    if (name, label) == (first, first_label):
        return out
    out["Hires sampler"] = name if name != first else None
    if label == first_label:
        return out
    if label is not None:
        out["Hires schedule type"] = label
        return out
    out["Schedule type"] = None  # (the second pass reads the first's label where it has none of its own)
    if first_label != "Automatic":
        out["Sampler"], out["Hires sampler"] = f"{first} {first_label}", name
    return out


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
