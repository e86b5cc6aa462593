"""A1111's `samples_format` and `jpeg_quality` options for the images the API answers with (its
encode_pil_to_base64): PNG with the infotext in its "parameters" text; JPEG or WEBP (at `jpeg_quality`, RGB) with the
infotext in the EXIF UserComment, as A1111's piexif writes it ("UNICODE\\0" + UTF-16 big-endian), which png-info
reads back."""
from __future__ import annotations

import base64
import io
import logging
import math
import struct

from PIL import Image

from fastsd.a1111 import EXIF_IFD, USER_COMMENT
from fastsd.serve.limits import BadRequest

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}  # A1111's samples_format values (any case)
DEFAULT = {"samples_format": "png", "jpeg_quality": 80}  # A1111's defaults
log = logging.getLogger("fastsd.serve")


def check_format(options: dict, where: str = "") -> dict:
    """`options` (samples_format / jpeg_quality, either may be missing) checked: BadRequest naming the option."""
    fmt, quality = options.get("samples_format"), options.get("jpeg_quality")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in FORMATS):
        raise BadRequest(f"{where}samples_format must be one of png, jpg, jpeg, webp (A1111's), got {fmt!r}")
    asked = quality  # a finite fraction is truncated (50.5 -> 50), as the request fields' int values are
    if isinstance(quality, float) and math.isfinite(quality) and abs(quality) < 2**63:
        quality = int(quality)
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100):
        raise BadRequest(f"{where}jpeg_quality must be an integer in 1..100, got {asked!r}")
    return {k: v for k, v in (("samples_format", fmt), ("jpeg_quality", quality)) if v is not None}


def image_format(server, override_settings: dict | None = None) -> tuple[str, int]:
    """(samples_format, jpeg_quality) of a request: its override_settings' (checked), else the server's options
    (ServerState.image_format, POST /options)."""
    over = check_format(override_settings or {}, "override_settings.")
    got = {**getattr(server, "image_format", DEFAULT), **over}
    return got["samples_format"], got["jpeg_quality"]


def user_comment_exif(text: str) -> bytes:
    """EXIF holding only `text` as the Exif IFD's UserComment, typed UNDEFINED with the UNICODE code (UTF-16 big-endian)
    as A1111's piexif.helper.UserComment.dump writes it (PIL's own Exif would type the bytes BYTE, which piexif
    can't read back): a little-endian TIFF of IFD0 (its pointer to the Exif IFD) and the Exif IFD (one entry each)."""
    data = b"UNICODE\0" + text.encode("utf-16-be", "replace")
    exif_ifd = 8 + 18  # (the header, then IFD0: entry count, one 12-byte entry, next-IFD offset)
    return (b"Exif\0\0II*\0" + struct.pack("<I", 8)
            + struct.pack("<HHHII", 1, EXIF_IFD, 4, 1, exif_ifd) + struct.pack("<I", 0)
            + struct.pack("<HHHII", 1, USER_COMMENT, 7, len(data), exif_ifd + 18) + struct.pack("<I", 0) + data)


def encode_image(image: Image.Image, samples_format: str = "png", jpeg_quality: int = 80, *,
                 infotext: str | None = None, texts: dict[str, str] | None = None,
                 warnings: list[str] | None = None) -> str:
    """Base64 of `image` in A1111's `samples_format`: a PNG carries the infotext (default: the image's "parameters")
    and `texts` in text chunks; a JPEG / WEBP the infotext in its EXIF UserComment (A1111 writes no other text). An
    infotext too long for the EXIF (64 KiB) is left out of the image: said in the log and, once, in `warnings`."""
    from fastsd.image import _png_text, png_writer

    kind = FORMATS[samples_format.lower()]
    text = image.info.get("parameters") if infotext is None else infotext
    buf = io.BytesIO()
    if kind == "PNG":
        png_writer(image, text, texts)(buf)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    exif = user_comment_exif(_png_text(text or ""))
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    try:
        rgb.save(buf, format=kind, exif=exif, quality=jpeg_quality)
    except ValueError as e:  # (a JPEG's EXIF holds at most 64 KiB: an infotext of huge prompts)
        note = (f"samples_format {samples_format}: the infotext ({len(text or '')} characters) is too long for the "
                f"image's EXIF ({e}), left out of the image (info.infotexts has it; png keeps it)")
        log.warning("%s", note)
        if warnings is not None and note not in warnings:
            warnings.append(note)
        buf = io.BytesIO()
        rgb.save(buf, format=kind, quality=jpeg_quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")
