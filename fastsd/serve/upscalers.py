"""Upscaler models by name from `--upscaler-dir` (fastsd/upscalers.py: A1111's models/ESRGAN), for the hires fix's
`hr_upscaler`, A1111's /upscalers list and its Extras tab (/extra-single-image: A1111's postprocessing upscale,
`scripts/postprocessing_upscale.py`, run on the worker thread). As with LoRAs, a name is a file's stem (or A1111's
built-in name of a file it downloads, "R-ESRGAN 4x+"), never a path, and answers name files, not the server's folder.
"""
from __future__ import annotations

import html
import os
import threading
from dataclasses import dataclass, replace

from PIL import Image

from fastsd import hires
from fastsd.serve.imageformat import image_format
from fastsd.serve.limits import BadRequest, Limits
from fastsd.serve.networks import file_identity, file_names

BUILTIN = ("None", "Lanczos", "Nearest")  # A1111's sd_upscalers without a model, first in its list (hires.IMAGE_RESAMPLE)
BUILTIN_SCALE = 4  # what A1111's list reports for them (UpscalerData's default)


class Upscalers:
    """The models of `folder` (read at each request, as A1111's refresh would: files added later are found), and
    what each file holds (architecture, scale), read once per file version."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self._read: dict[str, tuple] = {}  # path -> (file_identity, arch, scale, error)
        self._lock = threading.Lock()

    def models(self) -> dict[str, str]:
        """{name: path} of the folder's models (fastsd.upscalers.list_upscalers), less a name that a built-in one
        shadows."""
        from fastsd.upscalers import list_upscalers

        if not self.folder:
            return {}
        return {n: p for n, p in list_upscalers(self.folder).items() if hires.builtin_upscaler(n) is None}

    def describe(self, path: str) -> tuple[str | None, int | None, str | None]:
        """(arch, scale, None) of a model file, or (None, None, why) for one fastsd can't read (named by its file
        name); cached by the file's identity (inode, size, modification time)."""
        from fastsd import CheckpointError
        from fastsd.upscalers import read_upscaler

        ident = file_identity(path)
        with self._lock:
            got = self._read.get(path)
        if got is not None and got[0] == ident:
            return got[1:]
        try:
            src = read_upscaler(path)
            got = (ident, src.arch, src.scale, None)
        except (CheckpointError, OSError, ValueError) as e:
            got = (ident, None, None, file_names(str(e) or type(e).__name__, [path]))
        with self._lock:
            self._read[path] = got
        return got[1:]

    def a1111(self) -> list[dict]:
        """A1111's /upscalers: the built-in image upscalers, then the folder's models (model_path relative to the
        folder; scale null for a file fastsd can't read)."""
        items = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": BUILTIN_SCALE}
                 for n in BUILTIN]
        for name, path in self.models().items():
            arch, scale, _ = self.describe(path)
            items.append({"name": name, "model_name": arch, "model_path": os.path.relpath(path, self.folder),
                          "model_url": None, "scale": scale})
        return items

    def model_path(self, name: str, field: str, builtins: tuple[str, ...] = BUILTIN) -> str:
        """The file of the folder's model `name` (fastsd.upscalers.upscaler_path), checked readable; BadRequest
        naming `field` (and what it takes: `builtins` and the models) otherwise."""
        from fastsd.lora import check_lora_name
        from fastsd.upscalers import A1111_FILES, upscaler_path

        try:
            check_lora_name(name)
        except ValueError:
            raise BadRequest(f"{field}: upscaler name {name!r} refused: upscalers are chosen by name from "
                             "--upscaler-dir, not by path") from None
        if not self.folder:
            raise BadRequest(f"{field}: unknown upscaler {name!r}; this server has no upscaler folder (start it with "
                             "--upscaler-dir DIR)")
        try:
            path = upscaler_path(name, self.folder)
        except ValueError:
            want = (f" (A1111 downloads {A1111_FILES[name]}.pth for it; fastsd downloads nothing)"
                    if name in A1111_FILES else "")
            shown = ", ".join((*builtins, *self.models()))
            lists = "/upscalers, /latent-upscale-modes" if builtins != BUILTIN else "/upscalers"
            raise BadRequest(f"{field}: unknown upscaler {name!r}{want}; this server has: {shown} "
                             f"(GET /sdapi/v1{lists})") from None
        why = self.describe(path)[2]
        if why is not None:
            raise BadRequest(f"{field}: {why}")
        return path

    def hires(self, name: str | None, field: str = "hr_upscaler") -> str | None:
        """txt2img's hr_upscaler as GenerationSettings' hires_upscaler: A1111's built-in names as they are (unset:
        None, Latent as A1111's default, with no "Hires upscaler" in the infotext as A1111's), a model's name as
        its file."""
        if not name:
            return None
        return hires.builtin_upscaler(name) or self.model_path(name, field, hires.UPSCALERS)


# ---- the Extras tab ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtrasPlan:
    image: Image.Image                    # RGB, as A1111's run_postprocessing converts it
    upscalers: tuple[str, ...]            # "Lanczos" / "Nearest" / a model's path: upscaler_1 (and upscaler_2); ()
                                          # for upscaler_1 "None"
    scale: float                          # A1111's upscale_by
    dest: tuple[int, int]                 # the upscaled size: A1111's Upscaler.upscale rounds it down to 8 px
    crop: tuple[int, int] | None          # resize_mode 1 with upscaling_crop: the canvas the result is centred on
    visibility: float                     # of upscaler_2's result, blended over upscaler_1's
    info: dict                            # A1111's postprocessing infotext keys
    parameters: str | None                # the input's infotext, kept in the answer's PNG (A1111 keeps its texts)
    warnings: tuple[str, ...]
    pipe: object                          # the current model's pipeline: Pipeline.upscaler loads (and keeps) models
    image_format: tuple[str, int] = ("png", 80)  # A1111's samples_format and jpeg_quality options


def _extras_upscaler(name: str, field: str, upscalers: Upscalers) -> str | None:
    """None for "None", else what `run_extras` takes: a PIL resampling's name, or a model's file."""
    known = hires.builtin_upscaler(name)
    if known in hires.LATENT_MODES:
        raise BadRequest(f"{field}: {known!r} is a latent upscale mode, for the hires fix only; the Extras tab takes "
                         f"{', '.join(BUILTIN)} or a model (GET /sdapi/v1/upscalers)")
    if known == "None":
        return None
    return known or upscalers.model_path(name, field)


def build_extras(req, server) -> ExtrasPlan:
    """A1111's ExtrasSingleImageRequest, checked on the request side (upscaler_1 "None": no upscale, the image goes
    back as it came, converted to RGB, as A1111's)."""
    limits: Limits = server.limits
    if not req.image:
        raise BadRequest("image: the Extras tab needs a base64 image")
    decoded = limits.decode_image(req.image, "image")
    parameters = _infotext(decoded)
    image = decoded.convert("RGB")
    warnings = [f"{name} {v:g}: face restoration is not supported (fastsd has no GFPGAN or CodeFormer), ignored"
                for name, v in (("gfpgan_visibility", req.gfpgan_visibility),
                                ("codeformer_visibility", req.codeformer_visibility)) if v > 0]
    first = _extras_upscaler(req.upscaler_1, "upscaler_1", server.upscalers)
    if first is None:
        if hires.builtin_upscaler(req.upscaler_2) != "None" and req.extras_upscaler_2_visibility > 0:
            warnings.append(f"upscaler_2 {req.upscaler_2!r}: used only with an upscaler_1 (as A1111), ignored")
        req.image = ""
        return ExtrasPlan(image, (), 1.0, image.size, None, 0.0, {}, parameters, tuple(warnings), None,
                          image_format(server))
    second = _extras_upscaler(req.upscaler_2, "upscaler_2", server.upscalers)
    from fastsd.upscalers import extras_target

    info = {}
    try:
        if req.resize_mode == 1:
            w, h = req.upscaling_resize_w, req.upscaling_resize_h
            scale, dest, crop = extras_target(image.size, resize=(w, h), crop=req.upscaling_crop)
            info["Postprocess upscale to"] = f"{w}x{h}"
            if crop:
                info["Postprocess crop to"] = f"{w}x{h}"
        else:
            scale, dest, crop = extras_target(image.size, req.upscaling_resize)
            info["Postprocess upscale by"] = scale
    except (OverflowError, ValueError):  # (1e308 times the image's side; a size of 300 digits over it)
        raise BadRequest(f"the upscale would make an image too large to size, above this server's limit of "
                         f"{limits.max_side} px (--max-size)") from None
    shown = f"{dest[0]}x{dest[1]} image" + (f" (before the crop to {crop[0]}x{crop[1]})" if crop and crop != dest
                                            else "")
    if min(dest) < 8:
        raise BadRequest(f"the upscale would make a {shown} from {image.width}x{image.height}: less than 8 px "
                         "(A1111 rounds the size down to a multiple of 8)")
    if max(*dest, *(crop or ())) > limits.max_side:
        raise BadRequest(f"the upscale would make a {shown}, above this server's limit of {limits.max_side} px "
                         "(--max-size)")
    ups = [first]
    info["Postprocess upscaler"] = hires.builtin_upscaler(req.upscaler_1) or req.upscaler_1
    if second is not None and req.extras_upscaler_2_visibility > 0:
        ups.append(second)
        info["Postprocess upscaler 2"] = hires.builtin_upscaler(req.upscaler_2) or req.upscaler_2
    req.image = ""  # the base64 text is not kept while the job waits
    return ExtrasPlan(image, tuple(ups), scale, dest, crop, req.extras_upscaler_2_visibility, info, parameters,
                      tuple(warnings), server.registry.current.pipe, image_format(server))


def _infotext(image: Image.Image) -> str | None:
    from fastsd.a1111 import image_infotext

    try:
        return image_infotext(image.info, image.getexif())
    except Exception:  # an unreadable EXIF block: the image is still upscaled, without its infotext
        return None


def run_extras(plan: ExtrasPlan, job) -> dict:
    """On the worker thread: A1111's postprocessing upscale (each upscaler from the input, the second's result
    blended over the first's with its visibility; resize_mode 1 with crop: centred on a black canvas of the size
    asked, as A1111 pastes it). Returns A1111's ExtrasSingleImageResponse (plus fastsd's `warnings`)."""
    from fastsd import CheckpointError
    from fastsd.serve.jobqueue import Cancelled
    from fastsd.upscalers import centred, resample_pass, upscale_by

    results, stopped = [], []
    for up in plan.upscalers:
        if job is not None and job.cancelled:
            raise Cancelled("extras stopped: client gone or server stopping")
        if up in hires.IMAGE_RESAMPLE:
            one_pass = resample_pass(hires.IMAGE_RESAMPLE[up], plan.scale)
        else:
            try:
                one_pass = _interruptible(plan.pipe.upscaler(up), job, stopped)
            except (CheckpointError, OSError, ValueError) as e:  # the file changed since the request was checked
                raise BadRequest(file_names(str(e) or type(e).__name__, [up])) from None
        results.append(centred(upscale_by(plan.image, plan.scale, one_pass, plan.dest), plan.crop))
    image = results[0] if results else plan.image
    if len(results) == 2:
        image = Image.blend(results[0], results[1], plan.visibility)
    if stopped:
        i, n = stopped[0]
        plan = replace(plan, warnings=(*plan.warnings, f"interrupted at tile {i + 1} of {n} of a model's "
                                                   "pass: from there the image was resized with Lanczos (as A1111)"))
    return extras_response(image, plan)


def _interruptible(model, job, stopped: list):
    """A model's pass that reports its tiles as the job's steps (/progress) and stops at the next tile when the job
    is interrupted (or skipped): as A1111's tiled upscale, it then gives its input back, so the pass changes nothing
    and A1111's rule resizes the image with Lanczos. (i, n) of the first stop goes into `stopped`."""
    from fastsd import Interrupted
    from fastsd.serve.jobqueue import Cancelled

    def one_pass(image):
        try:
            return model.run(image, on_tile=None if job is None else lambda i, n: job.on_step(i, n, None))
        except Interrupted:  # (only job.on_step raises it: the tile it stopped before is the job's step)
            if job.cancelled:
                raise Cancelled("extras stopped: client gone or server stopping") from None
            if not stopped:
                stopped.append((job.step, job.steps))
            return image
    return one_pass


def extras_response(image: Image.Image, plan: ExtrasPlan) -> dict:
    """A1111's answer: `html_info` its plaintext_to_html of the postprocessing infotext; the PNG carries the input's
    infotext ("parameters") and that one ("postprocessing"), as A1111's API sends them (a JPEG / WEBP, A1111's
    samples_format: the input's infotext in its EXIF)."""
    from fastsd.image import format_params
    from fastsd.serve.imageformat import encode_image

    text = format_params(plan.info)
    html_info = "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
    warnings = list(plan.warnings)
    encoded = encode_image(image, *plan.image_format, infotext=plan.parameters or "", texts={"postprocessing": text},
                           warnings=warnings)
    return {"html_info": html_info, "warnings": warnings, "image": encoded}



def build_extras_batch(req, server) -> list[ExtrasPlan]:
    """A1111's ExtrasBatchImagesRequest: each of `imageList` planned as a single image with the same fields (errors
    name the image: imageList[i]); at most --max-batch images."""
    if not req.imageList:
        raise BadRequest("imageList: the Extras batch needs at least one {data, name} image")
    if len(req.imageList) > server.limits.max_images:
        raise BadRequest(f"imageList: {len(req.imageList)} images, above this server's limit of "
                         f"{server.limits.max_images} per request (--max-batch)")
    plans = []
    for i, item in enumerate(req.imageList):
        one = req.model_copy(update={"image": item.data, "imageList": []})
        try:
            plans.append(build_extras(one, server))
        except BadRequest as e:
            raise BadRequest(f"imageList[{i}] ({item.name or 'no name'}): {e}", e.status) from None
    req.imageList = []  # the base64 texts are not kept while the job waits
    return plans


def run_extras_batch(plans: list[ExtrasPlan], job) -> dict:
    """On the worker thread: each image as run_extras; A1111's ExtrasBatchImagesResponse (html_info the last
    image's, as A1111's) plus fastsd's `warnings` (each once)."""
    answers = [run_extras(plan, job) for plan in plans]
    warnings = list(dict.fromkeys(w for a in answers for w in a["warnings"]))
    return {"html_info": answers[-1]["html_info"], "images": [a["image"] for a in answers], "warnings": warnings}
