"""Job files -> jobs: JSONL, CSV with a header, or a prompts-only .txt (or "-", standard input: JSONL or prompts);
one job (one image) per record.

A field a record leaves out takes the command line's default (`Defaults`). Each job gets a stable id: the
record's `id`, or `LLLLL-<hash>` from its line number and its resolved settings, so the same file with the
same defaults gives the same ids (and the same output names) on every run. A record that can't become a
job (invalid JSON, unknown field, unknown sampler, bad size...) becomes a `BadJob` with its line number and
a one-line reason; the rest of the file is unaffected.

Seeds: the record's seed; else `--seed S` + the record's index in the file (A1111's "seed + i"); else one
derived from the line number and the record's content (stable, so a resumed or retried job draws the same
noise). A1111's seed -1 (random) counts as no seed. The variation seed (`subseed`, used when subseed_strength > 0)
follows the same rule with `--subseed`.

The hires fix, variation seeds and seed resize are fields too: the hires fix's second pass runs per job (the worker),
and a job with a variation seed never shares a batch (`batch_key`). A1111's API names are aliases (hr_scale,
denoising_strength, ...), and its `enable_hr` switches the hires fix on or off; the keys of its txt2img payloads
that change nothing in a one-image job (batch_size 1, send_images, ...) are taken and dropped.

img2img and inpainting: `init_image` and `mask` (file paths; relative ones under the job file's folder) with A1111's
img2img request fields (IMG2IMG, as fastsd.serve takes them; the worker maps them with the server's
fastsd.masking.a1111_img2img); their content hashes are the job's settings (an edited image is a changed job).
`styles` are applied to the prompts here (fastsd.styles, as the CLI's --style). `Img2ImgFolder` / `folder_records`:
A1111's img2img batch from a folder (one job per image, its mask by file stem, its PNG info).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, fields, replace

from fastsd.hires import builtin_upscaler
from fastsd.schedule_types import AUTOMATIC, resolve_schedule_type
from fastsd.settings import FIELDS as SETTINGS
from fastsd.settings import SEED_LIMIT, GenerationSettings

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "txt"}
STDIN = "-"  # the job file read from standard input: JSONL when its first line (not blank, not '#') starts with '{'
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_SIDE = 512  # as Pipeline.resolve

# job field -> settings field (or "loras"/"id"/"size"/"enable_hr", the job's own); A1111's API names are accepted as
# aliases
FIELDS = {"id": "id", "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
          "cfg": "guidance_scale", "sampler": "sampler", "width": "width", "height": "height", "size": "size",
          "clip_skip": "clip_skip", "loras": "loras", "scheduler": "schedule_type"}
# the hires fix, the variation seed, seed resize, NGMS, Skip Early CFG, ENSD: job field -> settings field, taken as
# it is (the option's value where left out); in the manifest (and a job's id) only where it is not the settings' default
EXTRA = {f: f for f in ("hires_scale", "hires_width", "hires_height", "hires_steps", "hires_strength",
                        "hires_upscaler", "hires_sampler", "hires_prompt", "hires_negative_prompt", "subseed",
                        "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "s_min_uncond",
                        "s_min_uncond_all", "skip_early_cond", "eta_noise_seed_delta", "eta", "s_churn", "s_tmin",
                        "s_tmax", "s_noise", "randn_source", "enable_hires", "inpainting_mask_weight",
                        "img2img_extra_noise")}
EXTRA["hires_scheduler"] = "hires_schedule_type"  # (as scheduler -> schedule_type)
FIELDS.update(EXTRA, enable_hr="enable_hr")
# img2img and inpainting (A1111's img2img request fields, as fastsd.serve takes them: fastsd.masking.a1111_img2img) and
# styles: the job's own, with the defaults of A1111's API (the server's; a test checks they are its schema's)
IMG2IMG = {"resize_mode": 0, "mask_blur": None, "mask_blur_x": 4, "mask_blur_y": 4, "mask_round": True,
           "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0}
MASK_FIELDS = tuple(f for f in IMG2IMG if f != "resize_mode")  # (they change nothing without a mask)
FIELDS.update({"init_image": "init_image", "mask": "mask", "strength": "strength",
               "initial_noise_multiplier": "initial_noise_multiplier", "img2img_fix_steps": "img2img_fix_steps",
               "img2img_color_correction": "img2img_color_correction",
               "styles": "styles"}, **{f: f for f in IMG2IMG})
HIRES = tuple(f for f in EXTRA.values() if f.startswith("hires_"))  # the settings fields of the hires fix
ALIASES = {"negative": "negative_prompt", "cfg_scale": "cfg", "guidance_scale": "cfg", "sampler_name": "sampler",
           "schedule_type": "scheduler", "hires_schedule_type": "hires_scheduler",
           # A1111's txt2img API (its denoising_strength is the hires pass's there)
           "hr_scale": "hires_scale", "hr_resize_x": "hires_width", "hr_resize_y": "hires_height",
           "hr_second_pass_steps": "hires_steps", "denoising_strength": "hires_strength",
           "hr_upscaler": "hires_upscaler", "hr_sampler_name": "hires_sampler", "hr_scheduler": "hires_scheduler",
           "hr_prompt": "hires_prompt", "hr_negative_prompt": "hires_negative_prompt"}
# A1111's txt2img / img2img payload keys that change nothing in a one-image job at these values (as its clients send
# them), and keys that never change the image (what A1111 does with the image afterwards): both taken and dropped
A1111_NEUTRAL = {"batch_size": 1, "n_iter": 1, "restore_faces": False, "tiling": False,
                 "override_settings": {}, "script_name": None, "script_args": [], "alwayson_scripts": {},
                 "disable_extra_networks": False, "refiner_checkpoint": None, "include_init_images": False}
IMAGES_KEYS = ("batch_size", "n_iter")
A1111_IGNORED = ("send_images", "save_images", "do_not_save_samples", "do_not_save_grid",
                 "override_settings_restore_afterwards", "force_task_id", "comments", "outpath_samples",
                 "outpath_grids", "prompt_for_display",
                 "image_cfg_scale", "latent_mask")  # (the last two: what the server ignores too, as its A1111 does here)
INT_FIELDS = ("seed", "steps", "width", "height", "clip_skip", "hires_width", "hires_height", "hires_steps", "subseed",
              "seed_resize_from_w", "seed_resize_from_h", "eta_noise_seed_delta", "resize_mode", "mask_blur",
              "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res_padding")
FLOAT_FIELDS = ("cfg", "hires_scale", "hires_strength", "subseed_strength", "s_min_uncond", "skip_early_cond", "eta",
                "s_churn", "s_tmin", "s_tmax", "s_noise", "strength", "initial_noise_multiplier",
                "inpainting_mask_weight", "img2img_extra_noise")
BOOL_FIELDS = ("enable_hr", "s_min_uncond_all", "enable_hires", "img2img_fix_steps", "img2img_color_correction")
FLAG_FIELDS = ("mask_round", "inpaint_full_res", "inpainting_mask_invert")  # true / false, or A1111's 0 / 1
PATH_FIELDS = ("init_image", "mask")
NAME_FIELDS = {"scheduler": "a schedule type's name", "hires_scheduler": "a schedule type's name",
               "hires_sampler": "a sampler's name", "hires_upscaler": "an upscaler's name",
               "randn_source": "CPU, GPU or NV"}


@dataclass(frozen=True)
class Defaults:
    """What a record leaves out (the command line's settings options); seed None = derived per job, and so is
    subseed (where subseed_strength > 0)."""

    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "euler_a"
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    schedule_type: str = "automatic"
    loras: tuple[tuple[str, float], ...] = ()
    hires_scale: float = 1.0
    hires_width: int = 0
    hires_height: int = 0
    hires_steps: int = 0
    hires_strength: float = 0.7
    hires_upscaler: str = "Latent"
    hires_sampler: str | None = None
    hires_schedule_type: str | None = None
    hires_prompt: str = ""
    hires_negative_prompt: str = ""
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0
    eta_noise_seed_delta: int = 0
    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    randn_source: str = "CPU"
    enable_hires: bool = False
    inpainting_mask_weight: float = 1.0
    img2img_extra_noise: float = 0.0
    # img2img (jobs with an init image): A1111's denoising strength (python -m fastsd.generate's default), noise
    # multiplier, img2img_fix_steps and img2img_color_correction, its img2img fields (IMG2IMG), and the styles of jobs
    # without a `styles` field
    strength: float = 0.8
    initial_noise_multiplier: float = 1.0
    img2img_fix_steps: bool = False
    img2img_color_correction: bool = False
    resize_mode: int = 0
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    styles: tuple[str, ...] = ()

    def settings(self) -> GenerationSettings:
        """These defaults as settings (no prompt)."""
        return GenerationSettings(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in SETTINGS})

    def validate(self, allow_large: bool = False) -> None:
        """ValueError / TypeError naming the option, as GenerationSettings.validate (and the img2img fields as a
        job's)."""
        check_settings(self.settings(), allow_large)
        check_img2img(self.img2img(), "--")

    def img2img(self) -> dict:
        return {f: getattr(self, f) for f in IMG2IMG}


def check_settings(s: GenerationSettings, allow_large: bool = False, *, has_image: bool = False,
                   has_mask: bool = False) -> None:
    """GenerationSettings.validate, but for a hires upscaler that is not one of A1111's built-in names: a model
    file or a model's name in the upscaler folder, which the worker finds and loads (as it finds LoRAs), so a
    missing one is that job's failure."""
    if isinstance(s.hires_upscaler, str) and builtin_upscaler(s.hires_upscaler) is None:
        s = s.replace(hires_upscaler="Latent")
    s.validate(allow_large=allow_large, has_image=has_image, has_mask=has_mask)


def check_img2img(f: dict, prefix: str = "") -> None:
    """A1111's img2img fields (IMG2IMG) as fastsd.serve checks them: resize_mode 0-3 (A1111 runs another as 2; here
    surely a mistake), the inpainting ones as fastsd.masking.check_inpaint_fields, a mask blur of at most
    masking.MAX_MASK_BLUR. ValueError naming the field (with `prefix` "--": the option)."""
    from types import SimpleNamespace

    from fastsd import masking

    def named(msg: str) -> str:
        return f"{prefix}{msg.replace('_', '-')}" if prefix else msg

    if f["resize_mode"] not in masking.RESIZE_MODES:
        raise ValueError(named(f"resize_mode must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 "
                               f"(latent upscale), got {f['resize_mode']}"))
    try:
        masking.check_inpaint_fields(SimpleNamespace(**f))
    except masking.Img2ImgError as e:
        raise ValueError(named(str(e))) from None
    for name in ("mask_blur", "mask_blur_x", "mask_blur_y"):
        if f[name] is not None and f[name] > masking.MAX_MASK_BLUR:
            raise ValueError(named(f"{name} must be at most {masking.MAX_MASK_BLUR} (px; 0 or less: no blur), got "
                                   f"{f[name]}"))


@dataclass(frozen=True)
class Source:
    """An init image or mask file a job names: its path (relative ones under the job file's folder, as resolved) and
    the sha256 of its bytes (part of the job's settings: an edited image is a changed job). `data`: the bytes
    themselves, given to a Ray worker (its folder is not this one)."""

    path: str
    sha256: str
    size: tuple[int, int] = (0, 0)  # (width, height) upright, as load_image turns it
    data: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class JobContext:
    """What making jobs needs beyond their records: the folder relative init_image / mask paths are under (the job
    file's; "" = the current one), and the styles file (--styles-file, else $FASTSD_STYLES: read at its first use)."""

    base: str = ""
    styles_path: str | None = None
    styles_what: str = "--styles-file"
    _styles: dict = field(default_factory=dict, compare=False, repr=False)

    def styles(self) -> dict:
        from fastsd.styles import read_styles

        if "styles" not in self._styles:
            try:
                self._styles["styles"] = read_styles(self.styles_path, self.styles_what)[0]
            except ValueError as e:
                self._styles["styles"] = e
        got = self._styles["styles"]
        if isinstance(got, Exception):
            raise ValueError(str(got))
        return got


@dataclass(frozen=True)
class Job:
    id: str
    line: int
    settings: GenerationSettings  # resolved: seed, width and height set, num_images 1
    loras: tuple[tuple[str, float | tuple[float, float]], ...] = ()  # weight: both models, or (text encoder, UNet)
    init_image: Source | None = None  # img2img (settings.strength); with a mask, inpainting
    mask: Source | None = None
    img2img: tuple[tuple[str, object], ...] = ()  # A1111's img2img fields (IMG2IMG), all of them, for an init image
    styles: tuple[str, ...] = ()  # the styles applied to the settings' prompts (A1111's)

    @property
    def file(self) -> str:
        return f"{self.id}.png"

    def manifest_settings(self) -> dict:
        """The settings as the manifest records them (the job file's field names)."""
        from fastsd.lora import weight_text

        s = self.settings
        return {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": s.seed, "steps": s.steps,
                "cfg": s.guidance_scale, "sampler": s.sampler, "width": s.width, "height": s.height,
                "clip_skip": s.clip_skip, "loras": [f"{n}:{weight_text(w)}" for n, w in self.loras],
                # (only when set: a job's id digests these, and ids of jobs without them stay as they were)
                **({"scheduler": s.schedule_type} if s.schedule_type != AUTOMATIC else {}),
                **{name: getattr(s, f) for name, f in EXTRA.items() if getattr(s, f) != SETTINGS[f].default},
                **({"styles": list(self.styles)} if self.styles else {}), **self._img2img_settings()}

    def _img2img_settings(self) -> dict:
        """The image part of the settings (none for txt2img: ids of txt2img jobs are as before): the init image's and
        mask's content hashes (an image edited under the same name is a changed job), the strength, and the A1111
        img2img fields that are not A1111's defaults (the mask's only with a mask)."""
        if self.init_image is None:
            return {}
        s, f = self.settings, dict(self.img2img)
        out = {"init_image_sha256": self.init_image.sha256, "strength": s.strength}
        if s.initial_noise_multiplier != 1:
            out["initial_noise_multiplier"] = s.initial_noise_multiplier
        if s.img2img_fix_steps:
            out["img2img_fix_steps"] = True
        if s.img2img_color_correction:
            out["img2img_color_correction"] = True
        if self.mask is not None:
            out["mask_sha256"] = self.mask.sha256
        out.update({k: v for k, v in f.items() if v != IMG2IMG[k] and (self.mask is not None or k not in MASK_FIELDS)})
        return out

    def sources(self) -> dict:
        """The init image's and mask's paths, for the manifest row (outside its settings: the hashes are those)."""
        return {k: src.path for k, src in (("init_image", self.init_image), ("mask", self.mask)) if src is not None}


@dataclass(frozen=True)
class BadJob:
    id: str
    line: int
    error: str
    raw: str = field(default="", repr=False)


class JobFileError(ValueError):
    """The job file as a whole can't be read (missing, unknown format, not UTF-8, no jobs)."""


# ---- reading records ---------------------------------------------------------------------------------

def read_job_file(path: str, defaults: Defaults, *, allow_large: bool = False,
                  ctx: JobContext | None = None) -> list[Job | BadJob]:
    """The jobs of a .jsonl / .csv / .txt file, or of standard input for "-" (JSONL or one prompt a line); the
    relative init_image / mask paths of a file's jobs are under the file's folder (standard input's: the current
    one)."""
    ctx = ctx or JobContext()
    if path == STDIN:
        text = _read_stdin()
        fmt = "jsonl" if next((t.lstrip()[:1] for t in _lines(text) if not _skipped(t)), "") == "{" else "txt"
        return _file_jobs(path, text, fmt, defaults, allow_large, ctx)
    ctx = replace(ctx, base=os.path.dirname(path))
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise JobFileError(f"{path}: unknown job file type; use .jsonl (one JSON object a line), .csv (with a "
                           "header), .txt (one prompt a line) or - (standard input)")
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        raise JobFileError(f"{path}: not a regular file (a FIFO, device or socket: reading it may never end)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise JobFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise JobFileError(f"{path}: is a folder, not a job file") from None
    except UnicodeDecodeError as e:
        raise JobFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise JobFileError(f"{path}: can't read ({e.strerror})") from None
    return _file_jobs(path, text, fmt, defaults, allow_large, ctx)


def _read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise JobFileError(f"{STDIN} (standard input): not UTF-8 text (byte {e.start})") from None


def _file_jobs(path: str, text: str, fmt: str, defaults: Defaults, allow_large: bool,
               ctx: JobContext) -> list[Job | BadJob]:
    records = {"jsonl": _jsonl_records, "csv": _csv_records, "txt": _txt_records}[fmt](text)
    try:
        jobs = make_jobs(records, defaults, allow_large=allow_large, ctx=ctx)
    except JobFileError as e:
        raise JobFileError(f"{path}: {e}") from None
    if not jobs:
        raise JobFileError(f"{path}: no jobs in the file")
    return jobs


def _lines(text: str) -> list[str]:
    """The file's lines: split at \n only (with a \r before it dropped), not at the other breaks str.splitlines
    knows (U+2028, form feed, ...), which JSON strings and prompts may hold."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _skipped(line: str) -> bool:
    """A blank line or a '#' comment (no JSON line starts with '#')."""
    return not line.strip() or line.lstrip().startswith("#")


def _jsonl_records(text: str):
    """(line, record dict | error str, raw line) per line that is not blank or a '#' comment."""
    for n, raw in enumerate(_lines(text), 1):
        if _skipped(raw):
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            where = "column" if e.msg.endswith(" at") else "at column"  # ("Unterminated string starting at")
            yield n, f"invalid JSON ({e.msg} {where} {e.colno})", raw
            continue
        except RecursionError:
            yield n, "invalid JSON (nested too deeply)", raw
            continue
        except ValueError as e:  # (a number above Python's digit limit)
            yield n, f"invalid JSON ({str(e).splitlines()[0]})", raw
            continue
        yield n, rec if isinstance(rec, dict) else f"a job line must be a JSON object, got {type(rec).__name__}", raw


def _csv_records(text: str):
    """CSV with a header row naming the fields; an empty cell takes the default."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    except csv.Error as e:  # (a header cell above the csv module's field limit)
        raise JobFileError(f"invalid CSV header ({e})") from None
    if twice := next((h for h in header if h and header.count(h) > 1), None):
        raise JobFileError(f"the CSV header names {twice!r} twice")
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, f"invalid CSV ({e})", ""
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        raw = ",".join(row)
        if len(row) != len(header):
            spans = reader.line_num > line and any("\n" in cell for cell in row)  # (a quote never closed)
            yield line, f"{len(row)} cells but the header has {len(header)}" + (
                f"; a quoted cell runs from line {line} to line {reader.line_num}: a quote left open?" if spans
                else ""), raw
            continue
        yield line, {k: v for k, v in zip(header, row) if v.strip() != ""}, raw


def _txt_records(text: str):
    """One prompt a line; blank lines and lines starting with '#' are skipped; a line starting with '--' is one of
    A1111's "Prompts from file or textbox" (`--prompt "a cat" --steps 30 --seed 5`)."""
    for n, raw in enumerate(_lines(text), 1):
        if not _skipped(raw):
            yield n, _a1111_line(raw) if raw.lstrip().startswith("--") else {"prompt": raw.strip()}, raw


def _a1111_line(line: str) -> dict | str:
    """A line of A1111's "Prompts from file or textbox" script as a record (its `cmdargs`: `--NAME VALUE` pairs, the
    prompts running to the next `--`), or the one-line reason it is not one."""
    import shlex

    try:
        args = shlex.split(line)
    except ValueError as e:
        return f"A1111 prompts-from-file line: {e}"
    rec, pos = {}, 0
    while pos < len(args):
        if not args[pos].startswith("--") or pos + 1 >= len(args):
            return f"A1111 prompts-from-file line: expected --NAME VALUE at {args[pos]!r}"
        name, pos = args[pos][2:], pos + 1
        end = pos + 1
        if name in ("prompt", "negative_prompt"):
            while end < len(args) and not args[end].startswith("--"):
                end += 1
        rec[name], pos = " ".join(args[pos:end]), end
    return rec


def records_from_list(items) -> list[tuple[int, dict | str, str]]:
    """The Python API's jobs: dicts (job records) or strings (prompts); item i is 'line' i + 1."""
    out = []
    for n, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {"prompt": item}
        rec = item if isinstance(item, dict) else f"a job must be a dict or a prompt string, got {type(item).__name__}"
        out.append((n, rec, json.dumps(item, sort_keys=True, default=str) if isinstance(item, dict) else str(item)))
    return out


# ---- records -> jobs ---------------------------------------------------------------------------------

def make_jobs(records, defaults: Defaults, *, allow_large: bool = False,
              ctx: JobContext | None = None) -> list[Job | BadJob]:
    """Jobs in file order; a duplicate id makes the later record a BadJob."""
    ctx = ctx or JobContext()
    jobs: list[Job | BadJob] = []
    first: dict[str, Job] = {}  # by the id in lower case: ids differing only in case name one file on macOS / Windows
    for index, (line, rec, raw) in enumerate(records):
        try:
            if isinstance(rec, str):
                raise ValueError(rec)
            job = to_job(rec, line, index, defaults, allow_large=allow_large, ctx=ctx)
        except (ValueError, TypeError) as e:
            jobs.append(BadJob(_bad_id(line, raw), line, str(e).splitlines()[0], raw))
            continue
        if (other := first.get(job.id.lower())) is not None:
            case = "" if other.id == job.id else f" as {other.id!r}: one file on a case-insensitive file system"
            jobs.append(BadJob(_bad_id(line, raw), line, f"duplicate id {job.id!r} (first on line {other.line}{case})",
                               raw))
            continue
        first[job.id.lower()] = job
        jobs.append(job)
    return jobs


def _bad_id(line: int, raw: str) -> str:
    return f"{line:05d}-bad-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"


def to_job(rec: dict, line: int, index: int, defaults: Defaults, *, allow_large: bool = False,
           ctx: JobContext | None = None) -> Job:
    """One record -> a Job; ValueError / TypeError (one line, naming the field) when it can't be one."""
    ctx = ctx or JobContext()
    rec = _typed(_canonical_fields(rec))
    for name in ("seed", "subseed"):
        if rec.get(name) == -1:  # A1111: random
            del rec[name]
    if "size" in rec:
        rec["width"], rec["height"] = _size(rec.pop("size"), rec)
    if "prompt" not in rec:
        raise ValueError("no prompt")
    if "mask" in rec and "init_image" not in rec:
        raise ValueError("mask: a mask needs an init_image (the image to inpaint)")
    if "init_image" not in rec and (img2img_only := next((k for k in (*IMG2IMG, "strength", "initial_noise_multiplier",
                                                                      "img2img_fix_steps", "img2img_color_correction")
                                                          if k in rec), None)):
        raise ValueError(f"{img2img_only}: an img2img field, for a job with an init_image (the hires fix's strength "
                         "is hires_strength)" if img2img_only == "strength" else
                         f"{img2img_only}: an img2img field, for a job with an init_image")
    image = _source(rec, "init_image", ctx, probe=True) if "init_image" in rec else None
    mask = _source(rec, "mask", ctx) if "mask" in rec else None
    styles = _styled(rec, defaults, ctx)
    loras = parse_loras(rec["loras"]) if "loras" in rec else defaults.loras
    if isinstance(rec["prompt"], str):
        loras += prompt_loras(rec["prompt"])
    # an img2img job: no hires fix from the options (A1111's img2img has none; a record's own hires field fails it)
    base = defaults if image is None else replace(defaults, **{f: SETTINGS[f].default for f in HIRES},
                                                  enable_hires=False)
    extra = {f: rec.get(name, getattr(base, f)) for name, f in EXTRA.items()}
    extra["subseed"] = rec.get("subseed")  # (--subseed S is S + index, below, as the seed)
    if image is not None:
        extra.update(strength=rec.get("strength", defaults.strength),
                     initial_noise_multiplier=rec.get("initial_noise_multiplier", defaults.initial_noise_multiplier),
                     img2img_fix_steps=rec.get("img2img_fix_steps", defaults.img2img_fix_steps),
                     img2img_color_correction=rec.get("img2img_color_correction",
                                                      defaults.img2img_color_correction))
    w, h = (DEFAULT_SIDE, DEFAULT_SIDE) if image is None else (image.size[0] // 8 * 8, image.size[1] // 8 * 8)
    s = GenerationSettings(
        prompt=rec["prompt"], negative_prompt=rec.get("negative_prompt", defaults.negative_prompt),
        steps=rec.get("steps", defaults.steps), guidance_scale=rec.get("cfg", defaults.guidance_scale),
        sampler=rec.get("sampler", defaults.sampler), seed=rec.get("seed"),
        width=_first(rec.get("width"), defaults.width, w),  # (an init image's size, as python -m fastsd.generate)
        height=_first(rec.get("height"), defaults.height, h), num_images=1,
        clip_skip=rec.get("clip_skip", defaults.clip_skip),
        schedule_type=rec.get("scheduler", defaults.schedule_type), **extra)
    s = _enable_hr(s, rec)
    check_settings(s, allow_large, has_image=image is not None, has_mask=mask is not None)
    s = _resolved(s)
    _check_hires_loras(s)
    parts = dict(init_image=image, mask=mask, img2img=_img2img_fields(rec, defaults, mask) if image else (),
                 styles=styles)
    digest = _digest(Job("", line, s, loras, **parts))
    derived, given = {}, {}  # seeds: the digest's (stable across runs), or --seed S / --subseed S: job i's is S + i
    for name, option, hexes in (("seed", defaults.seed, digest[:8]), ("subseed", defaults.subseed, digest[8:16])):
        if getattr(s, name) is None and (name == "seed" or s.subseed_strength > 0):
            if option is None:
                derived[name] = int(hexes, 16)
            elif option + index >= SEED_LIMIT:
                raise ValueError(f"--{name} {option} + this job's index {index} passes the largest seed, 2**63 - 1")
            else:
                given[name] = option + index
    if given:  # (part of the id: another --seed S makes other images, under other ids)
        digest = _digest(Job("", line, s.replace(**given), loras, **parts))
    s = s.replace(**derived, **given) if derived or given else s
    job_id = rec.get("id")
    if isinstance(job_id, int) and not isinstance(job_id, bool) and job_id >= 0:  # ({"id": 5}: 5.png)
        job_id = str(job_id)
    if job_id is None:
        job_id = f"{line:05d}-{digest[:10]}"
    elif not isinstance(job_id, str) or not ID_RE.fullmatch(job_id):
        raise ValueError(f"id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-' (it names the PNG), "
                         "not starting with '.', '_' or '-'")
    return Job(job_id, line, s, loras, **parts)


def _img2img_fields(rec: dict, defaults: Defaults, mask: Source | None) -> tuple:
    """A1111's img2img fields of an img2img job (the record's, else the options'), checked as the server checks them
    and written one way: without a mask the mask's at their defaults (they change nothing), a mask_blur as its x and
    y (A1111's rule: mask_blur wins over mask_blur_x / _y)."""
    f = {k: rec.get(k, getattr(defaults, k)) for k in IMG2IMG}
    check_img2img(f)
    if mask is None:
        f.update({k: IMG2IMG[k] for k in MASK_FIELDS})
    elif f["mask_blur"] is not None:
        f.update(mask_blur_x=f["mask_blur"], mask_blur_y=f["mask_blur"], mask_blur=None)
    f["inpainting_mask_invert"] = int(f["inpainting_mask_invert"])
    return tuple((k, f[k]) for k in IMG2IMG)


def _source(rec: dict, name: str, ctx: JobContext, probe: bool = False) -> Source:
    """The file a record's init_image / mask names (relative: under ctx.base, the job file's folder), read for its
    sha256; with `probe`, its size as the image is read (load_image: EXIF-turned) from its header. ValueError (one line,
    load_image's) for a file that is missing or not an image."""
    import io

    from PIL import Image

    from fastsd.image import INPUT_FORMATS, load_image

    given = rec[name]
    if not isinstance(given, str) or not given.strip():
        raise TypeError(f"{name} must be an image file's path, got {given!r}")
    path = os.path.join(ctx.base, os.path.expanduser(given))
    if not os.path.isfile(path):
        load_image(path, name)  # (its one-line reason: no such file, a folder, a FIFO...)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{name} {path}: can't read ({e.strerror or e})") from None
    size = (0, 0)
    if probe:
        try:
            with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as im:
                size = im.size[::-1] if im.getexif().get(0x0112) in (5, 6, 7, 8) else im.size  # (EXIF: turned)
        except Exception:  # noqa: BLE001 - load_image says why, in its words
            size = load_image(path, name).size
    return Source(path, hashlib.sha256(data).hexdigest(), size)


def _styled(rec: dict, defaults: Defaults, ctx: JobContext) -> tuple[str, ...]:
    """The record's styles (its `styles` field, else --style's) applied to its prompts in place, A1111's way
    (fastsd.styles, as python -m fastsd.generate --style: the hires prompts too when given), before its <lora:...>
    tags are read; returns their names. ValueError for a name the styles file lacks, or no styles file."""
    from fastsd.styles import STYLES_ENV, apply_styles

    names = _style_names(rec["styles"]) if "styles" in rec else defaults.styles
    if not names or not isinstance(rec["prompt"], str):
        return names
    if ctx.styles_path is None:
        raise ValueError(f"styles {list(names)}: no styles file; give --styles-file PATH (a styles.csv or a folder of "
                         f"them) or set ${STYLES_ENV}")
    styles = ctx.styles()
    if missing := next((n for n in names if n not in styles), None):
        raise ValueError(f"styles: {missing!r}: no such style in {ctx.styles_what} {ctx.styles_path}")
    negative = rec.get("negative_prompt", defaults.negative_prompt)
    if isinstance(negative, str):
        rec["prompt"], rec["negative_prompt"], _ = apply_styles(styles, list(names), rec["prompt"], negative)
    for key, default, negative in (("hires_prompt", defaults.hires_prompt, False),
                                   ("hires_negative_prompt", defaults.hires_negative_prompt, True)):
        text = rec.get(key, default)
        if text and isinstance(text, str):
            rec[key] = apply_styles(styles, list(names), *(("", text) if negative else (text, "")))[
                1 if negative else 0]
    return names


def _style_names(v) -> tuple[str, ...]:
    """A1111's styles: a list of names, or one string of names separated by ';' (a CSV cell)."""
    if isinstance(v, str):
        v = [n.strip() for n in v.split(";") if n.strip()]
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        raise TypeError(f"styles must be a list of style names, got {v!r}")
    return tuple(v)


def _digest(job: Job) -> str:
    """The hash of a job's line and settings: its derived seeds and id."""
    content = json.dumps({**job.manifest_settings(), "line": job.line}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def _typed(rec: dict) -> dict:
    """The record's numbers as numbers (CSV cells are text), its names checked as strings, and A1111's "Use same
    sampler" / "Use same scheduler" (its hires pass's defaults) as not given."""
    from fastsd.infotext_settings import SAME_SAMPLER, SAME_SCHEDULER

    for name in INT_FIELDS:
        if name in rec:
            rec[name] = _to_int(rec[name], name)
    for name in FLOAT_FIELDS:
        if name in rec:
            rec[name] = _to_float(rec[name], name)
    for name, what in NAME_FIELDS.items():
        if name in rec and not isinstance(rec[name], str):
            raise TypeError(f"{name} must be {what}, got {rec[name]!r}")
    for name in BOOL_FIELDS:
        if name in rec:
            rec[name] = _to_bool(rec[name], name)
    for name in FLAG_FIELDS:  # (A1111's clients send true / false or 0 / 1)
        if name in rec:
            rec[name] = _to_flag(rec[name], name)
    for name in PATH_FIELDS:
        if name in rec and (not isinstance(rec[name], str) or not rec[name].strip()):
            raise TypeError(f"{name} must be an image file's path, got {rec[name]!r}")
    for name, same in (("hires_sampler", SAME_SAMPLER), ("hires_scheduler", SAME_SCHEDULER)):
        if rec.get(name, "").strip().lower() == same.lower():
            del rec[name]
    return rec


def _enable_hr(s: GenerationSettings, rec: dict) -> GenerationSettings:
    """A1111's enable_hr: false = no hires fix (the record's hires fields and the hires options are ignored, as A1111
    ignores hr_* without it); true = the hires fix, at A1111's hr_scale 2 where neither the record nor the options
    give a scale or a size (a record's scale 1: a same-size second pass, as A1111 1.6+); not given: fastsd's rule
    (GenerationSettings.hires: a scale other than 1, a size, or enable_hires)."""
    if "enable_hr" not in rec:
        return s
    if not rec["enable_hr"]:
        return s.replace(**{f: SETTINGS[f].default for f in HIRES}, enable_hires=False)
    if not s.hires and "hires_scale" not in rec:
        s = s.replace(hires_scale=2.0)
    return s.replace(enable_hires=True)


def _resolved(s: GenerationSettings) -> GenerationSettings:
    """Valid settings as they run, written one way, so jobs that make the same image have the same settings (their
    batch key, id and manifest): sampler and schedule names canonical; the hires fields at their defaults where the
    hires fix doesn't run, its scale where a size replaces it (A1111 ignores hr_scale then), its built-in upscaler's
    name canonical, its sampler and schedule None where they are the first pass's; no variation seed at strength 0."""
    from fastsd.a1111 import twins_as_a1111
    from fastsd.samplers import resolve_sampler_name

    s = twins_as_a1111(s)  # ("DPM2 Karras": A1111's, as Pipeline.generate takes it)
    s = s.replace(sampler=resolve_sampler_name(s.sampler), schedule_type=resolve_schedule_type(s.schedule_type))
    if not s.hires:
        s = s.replace(**{f: SETTINGS[f].default for f in HIRES})
    else:
        sampler = s.hires_sampler and resolve_sampler_name(s.hires_sampler)
        schedule = s.hires_schedule_type and resolve_schedule_type(s.hires_schedule_type)
        s = s.replace(hires_scale=1.0 if s.hires_width or s.hires_height else s.hires_scale,
                      hires_upscaler=builtin_upscaler(s.hires_upscaler) or s.hires_upscaler,
                      hires_sampler=None if sampler == s.sampler else sampler,
                      hires_schedule_type=None if schedule == s.schedule_type else schedule,
                      enable_hires=not (s.hires_width or s.hires_height) and s.hires_scale == 1)  # (only when needed)
    return s if s.subseed_strength else s.replace(subseed=None)


def _check_hires_loras(s: GenerationSettings) -> None:
    """The hires prompt's <lora:...> tags must be the prompt's, as Pipeline.generate requires (a job's LoRAs are
    merged once, for both passes)."""
    from fastsd.lora import parse_prompt

    if not s.hires or not s.hires_prompt:
        return
    try:
        tags = parse_prompt(s.hires_prompt)[1]
    except ValueError as e:  # (its messages name the prompt: this is the hires prompt)
        raise ValueError(f"hires_prompt: {str(e).removeprefix('prompt: ')}") from None
    if Counter(tags) != Counter(parse_prompt(s.prompt)[1]):
        raise ValueError("hires_prompt: its <lora:...> tags must be the prompt's (fastsd merges a job's LoRAs once, "
                         "for both passes)")


def _first(*values):
    return next(v for v in values if v is not None)


def _canonical_fields(rec: dict) -> dict:
    out = {}
    img2img = rec.get("init_image") is not None  # (A1111's denoising_strength: img2img's there, the hires pass's else)
    for key, v in _without_a1111_extras(rec).items():
        if v is None:  # JSON null = not given
            continue
        name = "strength" if key == "denoising_strength" and img2img else ALIASES.get(key, key)
        if name == "init_images":
            raise ValueError("init_images: fastsd.batch takes init_image, an image file's path (not A1111's base64)")
        if name not in FIELDS:
            raise ValueError(f"unknown field {key!r}; known: {', '.join(FIELDS)}")
        if name in out:
            raise ValueError(f"field {name!r} given twice (as {key!r} too)")
        out[name] = v
    return out


def _without_a1111_extras(rec: dict) -> dict:
    """The record without the keys of A1111's txt2img payloads that change nothing in a one-image job at the values
    they have there (A1111_NEUTRAL, A1111_IGNORED); another value is the record's one-line failure. A1111's old
    sampler_index is the sampler where sampler_name is not given (its rule)."""
    out = dict(rec)
    for key in [k for k in out if k in A1111_NEUTRAL and out[k] is not None]:
        v, neutral = out.pop(key), A1111_NEUTRAL[key]
        if isinstance(neutral, bool):
            same = _to_bool(v, key) == neutral if isinstance(v, (bool, str)) else False
        elif isinstance(neutral, int):  # (JSON's 1 or 1.0, CSV's "1")
            same = str(v).strip() == str(neutral) or type(v) in (int, float) and v == neutral
        else:
            same = v == neutral or (neutral is None and v == "")
        if not same:
            hint = "; one job is one image: give one line per image (seeds S, S+1, ...)" if key in IMAGES_KEYS else ""
            raise ValueError(f"{key} {v!r}: fastsd.batch takes A1111's {key} only as {json.dumps(neutral)}{hint}")
    for key in A1111_IGNORED:
        out.pop(key, None)
    if "sampler_index" in out:
        index = out.pop("sampler_index")
        if not any(out.get(k) is not None for k in ("sampler", "sampler_name")):
            out["sampler"] = index
    return out


def _to_int(v, name: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
        if m := re.fullmatch(r"\s*([+-]?\d+)\.0*\s*", v):  # ("12.0": pandas' integer column with empty cells)
            return int(m.group(1))
    if isinstance(v, int):
        return v
    raise TypeError(f"{name} must be an integer, got {v!r}")


def _to_bool(v, name: str) -> bool:
    """true / false: JSON's, or a CSV cell's text "true" / "false" (any case)."""
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be true or false, got {v!r}")
    return v


def _to_flag(v, name: str) -> bool:
    """A1111's switches of img2img: true / false, or its 0 / 1 (JSON's or a CSV cell's)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("0", "1", "true", "false"):
        return v.strip().lower() in ("1", "true")
    raise TypeError(f"{name} must be true or false (or 1 / 0), got {v!r}")


def _to_float(v, name: str) -> float:
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise TypeError(f"{name} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _size(v, rec: dict) -> tuple[int, int]:
    """'WxH' (or one number for a square) -> (width, height); may not contradict width/height."""
    m = re.fullmatch(r"\s*(-?\d+)\s*(?:[xX]\s*(-?\d+)\s*)?", str(v)) if not isinstance(v, bool) else None
    if m is None:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' such as '512x768', got {v!r}")
    w, h = int(m.group(1)), int(m.group(2) or m.group(1))
    for name, got in (("width", w), ("height", h)):
        if name in rec and rec[name] != got:
            raise ValueError(f"size {v!r} contradicts {name} {rec[name]}")
    return w, h


def parse_loras(v) -> tuple[tuple[str, float], ...]:
    """LoRAs as a list of "NAME[:WEIGHT]" / "NAME:TE:UNET" or {"name", "weight"}, a {NAME: WEIGHT} dict, or one
    string of those separated by ';' or spaces (CSV, --lora). Weight 1 when not given."""
    from fastsd.lora import normalize_weight

    if isinstance(v, str):
        v = [p for p in re.split(r"[;\s]+", v) if p]
    elif isinstance(v, dict):
        v = [{"name": k, "weight": w} for k, w in v.items()]
    if not isinstance(v, list):
        raise TypeError(f"loras must be a list such as [\"name:0.8\"], got {v!r}")
    out = []
    for item in v:
        if isinstance(item, dict):
            name, weight = item.get("name"), item.get("weight", 1.0)
        elif isinstance(item, str):
            name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
            first, sep, te = name.rpartition(":")
            if sep and first and _is_number(te):  # NAME:TE:UNET, as A1111's <lora:NAME:TE:UNET>
                name, weight = first, (te, weight)
        else:
            raise TypeError(f"a LoRA must be \"name:weight\" or {{\"name\", \"weight\"}}, got {item!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA needs a name, got {item!r}")
        if isinstance(weight, (tuple, list)) and len(weight) == 2:
            weight = tuple(_to_float(w, f"LoRA {name!r} weight") for w in weight)
        else:
            weight = _to_float(weight, f"LoRA {name!r} weight")
        try:  # the merge's own check (fastsd.lora), so a weight it refuses is this line's (or option's) mistake
            out.append((name, normalize_weight(weight)))
        except ValueError as e:
            raise ValueError(f"LoRA {name!r}: {str(e).splitlines()[0]}") from None
    return tuple(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def prompt_loras(prompt: str) -> tuple[tuple[str, float], ...]:
    """A1111's <lora:NAME:WEIGHT> tags of a prompt (the tags stay in the prompt for the infotext; the worker
    encodes the prompt without them, as fastsd.serve does)."""
    from fastsd.lora import parse_prompt  # one tag grammar for the CLI, the server and the batch runner

    return tuple(parse_prompt(prompt)[1])


def text_prompts(job: "Job") -> tuple[str, str]:
    """(prompt, negative prompt) as the text encoder sees them: without LoRA tags."""
    from fastsd.lora import strip_tags

    return strip_tags(job.settings.prompt), job.settings.negative_prompt


# ---- batching ----------------------------------------------------------------------------------------

def batch_key(job: Job, chunks: int) -> tuple:
    """Jobs with equal keys can share one UNet call: same size, steps, sampler and schedule, guidance, clip skip, LoRAs,
    and the same number of 75-token prompt chunks (encode_prompt pads a batch to its longest prompt); the same hires
    fix (the worker runs its second pass per job, with the group's one upscaler) and seed resize (the batch's start
    noise is drawn with one). A job with a variation seed shares with none: the Pipeline moves image i of a batch
    toward subseed + i (A1111's rule for the images of one run), not toward each job's own subseed. Nor does an
    img2img job: its init image is VAE-encoded (torch's CPU convolutions sum differently at batch 1 and batch > 1,
    as the decode's) and an inpainting job's mask is its own, so it runs alone, as Pipeline.generate."""
    s = job.settings
    return (s.width, s.height, s.steps, s.sampler, s.schedule_type, s.guidance_scale, s.clip_skip, chunks, job.loras,
            tuple(getattr(s, f) for f in HIRES), s.seed_resize_from_w, s.seed_resize_from_h, s.s_min_uncond,
            s.s_min_uncond_all, s.skip_early_cond, s.eta_noise_seed_delta, s.eta, s.s_churn, s.s_tmin, s.s_tmax,
            s.s_noise, s.randn_source, s.inpainting_mask_weight, s.img2img_extra_noise,
            job.id if s.subseed_strength > 0 or job.init_image is not None else None)


def prompt_chunks(job: Job, tokenizer, embeddings=None) -> int:
    """75-token chunks of the prompt, and of the negative prompt when it is encoded (guided): the most of any text
    their composable parts and prompt editing give (fastsd.prompt_schedule; Pipeline.encode_prompt pads to that);
    with `embeddings` (the pipeline's), each textual inversion a text names takes its vectors' slots."""
    from fastsd.prompt_schedule import prompt_schedule, split_and
    from fastsd.samplers import prompt_steps

    s = job.settings
    prompt, negative = text_prompts(job)
    parts = [t for t, _ in split_and(prompt)] + ([negative] if s.guided else [])
    texts = {t for p in parts for _, t in prompt_schedule(p, prompt_steps(s.sampler, s.steps))}
    if embeddings is not None:
        return max(tokenizer.encode_with_embeddings(t, embeddings)[0].shape[0] for t in texts)
    return max(tokenizer.encode_weighted(t)[0].shape[0] for t in texts)


def plan_batches(jobs: list[Job], batch: int, tokenizer) -> list[list[Job]]:
    """Jobs in groups of up to `batch` compatible ones, groups in the order of their first job, those of one LoRA set
    together (a worker changing its set unloads and merges weights: a file cycling through styles would do it at
    every job)."""
    if batch <= 1:
        planned = [[j] for j in jobs]
    else:
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            groups.setdefault(batch_key(j, prompt_chunks(j, tokenizer)), []).append(j)
        planned = [g[i:i + batch] for g in groups.values() for i in range(0, len(g), batch)]
    first: dict[tuple, int] = {}
    for j in jobs:
        first.setdefault(j.loras, len(first))
    return sorted(planned, key=lambda g: first[g[0].loras])  # (stable: file order within a set)


# ---- A1111's img2img batch from a folder -------------------------------------------------------------

PNG_INFO_PROPS = ("Prompt", "Negative prompt", "Seed", "CFG scale", "Sampler", "Steps")  # A1111's (but Model hash)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Img2ImgFolder:
    """A1111's img2img "Batch" tab: one job per image of `folder` (natural order, as A1111 lists it; id = the file's
    stem), its mask the file of the same stem in `masks` (A1111's "Inpaint batch mask directory"; a folder of one
    mask: that mask for every image, as A1111), `prompt` every job's (the negative prompt: --negative-prompt), and
    A1111's "PNG info" option: `png_info` the infotext keys taken from each input's (or from the file of its name in
    `png_info_dir`) -- its Prompt and Negative prompt appended to the prompts, its Seed, CFG scale, Sampler and Steps
    replacing them (an image without infotext: none)."""

    folder: str
    masks: str | None = None
    prompt: str = ""
    png_info: tuple[str, ...] = ()
    png_info_dir: str | None = None

    def check(self) -> None:
        """ValueError (one line, naming the option) for a folder that isn't one, an unknown PNG info key."""
        for flag, path in (("--img2img-dir", self.folder), ("--mask-dir", self.masks),
                           ("--png-info-dir", self.png_info_dir)):
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"{flag} {path}: " + ("not a folder" if os.path.exists(path) else "no such folder"))
        if bad := next((k for k in self.png_info if k not in PNG_INFO_PROPS), None):
            raise ValueError(f"--use-png-info: {bad!r} is not one of {', '.join(PNG_INFO_PROPS)}")
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a string, got {self.prompt!r}")


def _natural(name: str) -> list:
    """A1111's natural_sort_key: img2 before img10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _images_in(folder: str) -> list[str]:
    return sorted((f for f in os.listdir(folder) if not f.startswith(".") and os.path.splitext(f)[1].lower()
                   in IMAGE_EXTS and not os.path.isdir(os.path.join(folder, f))), key=_natural)


def folder_records(spec: Img2ImgFolder, defaults: Defaults, notes=None) -> list[tuple[int, dict | str, str]]:
    """(n, record or one-line error, raw) per image of spec.folder, n its place in the listing (the manifest's
    "line"). `notes(line)`: what was left out (files that are not images, masks without an image)."""
    from fastsd.image import parse_infotext
    from fastsd.infotext_settings import read_infotext

    spec.check()
    say = notes or (lambda line: print(f"fastsd.batch: {line}", file=sys.stderr))
    images = _images_in(spec.folder)
    others = [f for f in os.listdir(spec.folder) if not f.startswith(".") and f not in images
              and os.path.isfile(os.path.join(spec.folder, f))]
    if others:
        say(f"--img2img-dir {spec.folder}: {len(others)} files that are not images left out (such as {others[0]!r})")
    if not images:
        raise JobFileError(f"--img2img-dir {spec.folder}: no images in it ({', '.join(IMAGE_EXTS)})")
    masks = _images_in(spec.masks) if spec.masks is not None else []
    by_stem: dict[str, str] = {}
    for m in masks:
        by_stem.setdefault(os.path.splitext(m)[0], m)
    stems = {os.path.splitext(f)[0] for f in images}
    if len(masks) > 1 and (stray := [m for m in masks if os.path.splitext(m)[0] not in stems]):
        say(f"--mask-dir {spec.masks}: {len(stray)} masks with no image of their name in --img2img-dir, left out "
            f"(such as {stray[0]!r})")
    out = []
    for n, name in enumerate(images, 1):
        stem = os.path.splitext(name)[0]
        rec: dict = {"id": re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-") or "image",
                     "init_image": os.path.join(spec.folder, name), "prompt": spec.prompt}
        if spec.masks is not None:
            mask = masks[0] if len(masks) == 1 else by_stem.get(stem)  # (A1111: one mask is every image's)
            if mask is None:
                out.append((n, f"{name}: no mask {stem}.* in --mask-dir {spec.masks}", name))
                continue
            rec["mask"] = os.path.join(spec.masks, mask)
        if spec.png_info:
            source = os.path.join(spec.png_info_dir, name) if spec.png_info_dir else rec["init_image"]
            try:
                prompt, negative, params = parse_infotext(read_infotext(source))
            except ValueError:  # (no infotext, no such file: A1111 takes nothing then)
                prompt, negative, params = "", "", {}
            params.update({"Prompt": prompt, "Negative prompt": negative} if params or prompt else {})
            got = {k: v for k, v in params.items() if k in spec.png_info}
            if "Prompt" in got:
                rec["prompt"] = " ".join(p for p in (spec.prompt, got["Prompt"]) if p)
            if "Negative prompt" in got:
                rec["negative_prompt"] = " ".join(p for p in (defaults.negative_prompt, got["Negative prompt"]) if p)
            for key, field_name in (("Seed", "seed"), ("CFG scale", "cfg"), ("Sampler", "sampler"), ("Steps", "steps")):
                if key in got:
                    rec[field_name] = got[key]
        out.append((n, rec, name))
    return out
