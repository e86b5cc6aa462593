"""What one request may ask of the server (sizes, steps, images, body bytes), and decoding of the base64
images a request carries under those limits: every violation is a `BadRequest` with a one-line message."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

# What A1111's clients send (its API decodes any format PIL reads). Nothing else reaches PIL's other plugins,
# some of which hand the data to outside programs (EPS: Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class BadRequest(Exception):
    """A request the server refuses: answered with `status` and the one-line message as `detail`."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))  # (a name from the request may
        self.status = status                                                # hold line breaks: one line still)


@dataclass(frozen=True)
class Limits:
    """Defaults protect a small machine; each has a command-line flag (python -m fastsd.serve --help)."""

    max_side: int = 2048               # --max-size: width and height, pixels
    max_steps: int = 150               # --max-steps
    max_images: int = 8                # --max-batch: batch_size x n_iter per request
    max_body: int = 32 * 1024 * 1024   # --max-body-mb: request body, bytes
    max_image_pixels: int = 4096 * 4096  # --max-image-pixels: a decoded init image or mask
    max_prompt_chars: int = 8000       # prompt and negative prompt, each
    max_queue: int = 16                # --max-queue: jobs waiting behind the running one

    def check_size(self, name: str, value: int) -> int:
        """A width/height within 8..max_side, rounded down to a multiple of 8 (A1111 does the same)."""
        if value < 8:
            raise BadRequest(f"{name} must be at least 8, got {value}")
        if value > self.max_side:
            raise BadRequest(f"{name} {value} is above this server's limit of {self.max_side} px (--max-size)")
        return value // 8 * 8

    def check_steps(self, steps: int, name: str = "steps") -> None:
        if steps < 1:
            raise BadRequest(f"{name} must be at least 1, got {steps}")
        if steps > self.max_steps:
            raise BadRequest(f"{name} {steps} is above this server's limit of {self.max_steps} (--max-steps)")

    def check_images(self, batch_size: int, n_iter: int) -> None:
        for name, v in (("batch_size", batch_size), ("n_iter", n_iter)):
            if v < 1:
                raise BadRequest(f"{name} must be at least 1, got {v}")
        if batch_size * n_iter > self.max_images:
            raise BadRequest(f"batch_size {batch_size} x n_iter {n_iter} = {batch_size * n_iter} images is above this "
                             f"server's limit of {self.max_images} per request (--max-batch)")

    def check_prompt(self, name: str, text: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise BadRequest(f"{name} has {len(text)} characters, above this server's limit of {self.max_prompt_chars}")

    def decode_image(self, data: str, what: str) -> Image.Image:
        """A base64 image (optionally a data: URL) of one of IMAGE_FORMATS (a GIF's first frame) -> PIL image,
        refused above max_image_pixels before its pixels are decoded (decompression bombs). URLs are refused: the
        server fetches nothing."""
        from fastsd.image import to_8bit, upright  # torch comes with it: not at import, so --help stays quick

        return to_8bit(upright(self._read_image(data, what)))  # (A1111's images.read: EXIF-turned, ...)

    def image_info(self, data: str, what: str) -> tuple[dict, Image.Exif]:
        """A base64 image's metadata as PIL reads it (PNG text chunks, ...) and its EXIF, under decode_image's
        checks (the whole file is read: PNG text may follow the pixels)."""
        im = self._read_image(data, what)
        try:
            exif = im.getexif()
        except (OSError, SyntaxError, ValueError):  # (damaged EXIF: the rest of the metadata is still there)
            exif = Image.Exif()
        return dict(im.info), exif

    def _read_image(self, data: str, what: str) -> Image.Image:
        if not isinstance(data, str):
            raise BadRequest(f"{what} must be a base64 string, got {type(data).__name__}")
        if data.startswith(("http://", "https://")):
            raise BadRequest(f"{what}: image URLs are not fetched; send the image as base64")
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{what} is not valid base64") from None
        try:
            im = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        except Image.UnidentifiedImageError:
            raise _unidentified(what, raw) from None
        except Image.DecompressionBombError as e:
            raise BadRequest(f"{what} refused: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise _unreadable(what, e) from None
        with im:
            if im.width * im.height > self.max_image_pixels:
                raise BadRequest(f"{what} is {im.width}x{im.height} pixels, above this server's limit of "
                                 f"{self.max_image_pixels} pixels (--max-image-pixels)")
            try:
                im.load()
                return im.copy()
            except (OSError, SyntaxError, ValueError) as e:
                raise _unreadable(what, e) from None


def _unidentified(what: str, raw: bytes) -> BadRequest:
    """None of IMAGE_FORMATS opened `raw`: another format (named by its signature: PIL's plugins' prefix checks
    alone, nothing is parsed), a damaged file of one of them, or no image at all."""
    from fastsd.image import format_signature  # (torch comes with it: not at import)

    known = f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]}"
    kind = format_signature(raw)
    if kind is None:
        return BadRequest(f"{what} is not a readable image (not {known})")
    if kind in IMAGE_FORMATS:
        return BadRequest(f"{what} is not a readable image (a damaged {kind} file)")
    return BadRequest(f"{what}: {kind} images are not read by this server; send {known}")


def _unreadable(what: str, e: Exception) -> BadRequest:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return BadRequest(f"{what} is not a readable image ({reason})")
