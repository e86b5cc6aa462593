"""Images in and out: PIL <-> tensors, masks, A1111 infotext (the PNG "parameters" chunk), atomic saves."""
from __future__ import annotations

import json
import os
import re
import stat
import warnings
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from fastsd.files import atomic_write


MAX_INPUT_PIXELS = 8192 * 8192  # an init image or mask above this is refused (decompression bombs included)


# The formats an init image or mask is read in (a GIF's and a TIFF's first frame): what A1111 users have. PIL's
# other plugins are never reached by a file given on a command line; some hand the data to outside programs (EPS:
# Ghostscript), whatever the file's name.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def format_signature(head: bytes) -> str | None:
    """The image format PIL's plugins claim for a file starting with `head` (their prefix checks alone: nothing is
    parsed or run), or None."""
    Image.init()
    head = head[:16].ljust(16, b"\0")  # (some plugins' checks unpack bytes a shorter file lacks)
    return next((fmt for fmt in Image.ID if Image.OPEN[fmt][1] and Image.OPEN[fmt][1](head)), None)


def load_image(path: str, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Read an image file of INPUT_FORMATS; ValueError (one line naming the file) for a missing, unreadable or
    oversized file, a FIFO or device, another format, or float pixels that are NaN or infinite. Images with
    more than 8 bits per channel are scaled down to 8 bits, not clipped."""
    try:
        st = os.stat(path)  # before opening: a FIFO would block the open until something writes to it
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: not a readable image ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {path}: is a folder, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path}: is not a regular file (a FIFO, device or socket), not an image")
    known = f"{', '.join(INPUT_FORMATS[:-1])} or {INPUT_FORMATS[-1]}"
    with warnings.catch_warnings():  # the size is checked here, not by PIL's bomb warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path, formats=INPUT_FORMATS)
        except Image.UnidentifiedImageError:
            try:
                with open(path, "rb") as f:
                    kind = format_signature(f.read(16))
            except OSError:
                kind = None
            if kind is None:
                raise ValueError(f"{what} {path}: not a readable image (not {known})") from None
            if kind in INPUT_FORMATS:
                raise ValueError(f"{what} {path}: not a readable image (a damaged {kind} file)") from None
            raise ValueError(f"{what} {path}: {kind} images are not read; give {known}") from None
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise _unreadable(what, path, e) from None
        with im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{what} {path}: {im.width}x{im.height} pixels is above the limit of "
                                 f"{max_pixels} pixels")
            try:
                im.load()
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
                raise _unreadable(what, path, e) from None
            out = im.copy()
    return checked_8bit(upright(out), f"{what} {path}")


def _unreadable(what: str, path: str, e: Exception) -> ValueError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ValueError(f"{what} {path}: not a readable image ({reason})")


def upright(im: Image.Image) -> Image.Image:
    """An input image as A1111 reads one (its images.fix_image): turned as its EXIF Orientation says (a phone's
    photo), and a palette or RGB PNG with a transparent colour as RGBA (so a mask's transparency is its alpha); a
    damaged EXIF leaves the image as it is."""
    try:
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        pass
    if im.mode in ("RGB", "P") and isinstance(im.info.get("transparency"), bytes):
        im = im.convert("RGBA")
    return im


def checked_8bit(im: Image.Image, what: str) -> Image.Image:
    """`to_8bit`, after checking that a float image's pixels are finite (no colour for NaN or inf): ValueError
    naming `what`."""
    if im.mode == "F" and not np.isfinite(np.asarray(im)).all():
        raise ValueError(f"{what}: has pixel values that are NaN or infinite")
    return to_8bit(im)


def to_8bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit integer and float images -> 8-bit "L" scaled to their range (PIL's convert would clip
    them to 255: a 16-bit PNG would turn almost white); other modes are returned as they are."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if a.size and a.max() <= 1.0 else 255.0
        else:
            top = 65535.0 if im.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        return Image.fromarray(np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    return im


def check_mask(image: Image.Image | None, mask: Image.Image | None) -> None:
    """ValueError for a mask with no pixel. A mask of another size than the image is taken: it is resized to the
    generation size as the image is (A1111's resize_image; diffusers' mask processor resizes it too)."""
    if mask is not None and image is not None and 0 in mask.size:
        raise ValueError(f"mask is {mask.width}x{mask.height} pixels: an empty image")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1] (as diffusers' VaeImageProcessor)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Mask image -> (1, 1, H, W) float32 in {0, 1}; white (>= 0.5) = repaint, as A1111 and diffusers."""
    a = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (torch.from_numpy(a)[None, None] >= 0.5).float()


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in ~[-1, 1] -> PIL images; rounding as diffusers' numpy_to_pil ((x/2+0.5)*255, round)."""
    a = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(im) for im in (a * 255).round().astype(np.uint8)]


# SD1.x latent channels -> RGB, a least-squares fit of decoded colours to latents (the "approx cheap"
# preview A1111 and ComfyUI use); good enough to watch an image form, not a decoder.
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])


def latents_preview(latents: torch.Tensor) -> Image.Image:
    """Unscaled latents (1, 4, h, w) -> an RGB preview image of h x w pixels."""
    rgb = torch.einsum("chw,cr->rhw", latents[0].float().cpu(), LATENT_RGB)
    return tensor_to_pil(rgb[None])[0]


# ---- A1111 infotext ------------------------------------------------------------------------------

def quote(v: object) -> str:
    """An infotext value as A1111's infotext_utils.quote writes it: JSON-quoted when it holds ',', ':' or a newline."""
    s = str(v)
    return json.dumps(s, ensure_ascii=False) if any(c in s for c in ',:\n') else s


def format_params(params: dict[str, object]) -> str:
    """'Key: value, Key: value' as A1111 joins them (None left out; a value equal to its key is the key alone)."""
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """A1111's layout: the prompt, 'Negative prompt: ...' (when given), then 'Key: value, Key: value'."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(format_params(params))
    return "\n".join(lines)


# A1111's re_param, its quantifiers possessive where giving back can't make a match (a key's characters can't be
# ":", a space can't be a key's first character or a quote), which `_params` reads in linear time
_PARAM_RE = re.compile(r'\s*+(\w[\w \-/]++):\s*+("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY_RUN, _WORD = re.compile(r'[\w \-/]*'), re.compile(r'\w')  # (the characters of a key; its first's)


def _params(line: str) -> list[tuple[str, str]]:
    """_PARAM_RE.findall(line), in linear time: where no key starts at a character of a run of key characters that
    ':' does not end, none starts at any of its characters, so the scan skips the run; one that ':' ends has its key
    at its first word character but the last (findall tries each character: quadratic in the run's length, 30 s for a
    40,000-character line)."""
    found, i = [], 0
    while i < len(line):
        if m := _PARAM_RE.match(line, i):
            found.append(m.groups())
            i = m.end()
            continue
        end = _KEY_RUN.match(line, i).end()
        if end == i:
            i += 1
        elif not line.startswith(":", end):
            i = end
        else:  # (its first word character but the last starts a key (of 2+ characters), as from a space before)
            i = max(i + 1, w.start()) if (w := _WORD.search(line, i, end - 1)) else end
    return found


def _unquote(v: str) -> str:
    """A value as A1111's unquote reads it: a JSON string when quoted and valid, else the text as it is."""
    if len(v) > 1 and v[0] == v[-1] == '"':
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v.strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of format_infotext (and reads A1111's own): (prompt, negative_prompt, params as strings)."""
    *head, last = text.strip().split("\n")
    if len(found := _params(last)) < 3:  # no settings line
        head, last = head + [last], ""
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_neg, line = True, line[len("Negative prompt:"):].strip()
        (neg_lines if in_neg else prompt_lines).append(line)
    params = {k.strip(): _unquote(v) for k, v in (found if last else [])}
    return "\n".join(prompt_lines).strip(), "\n".join(neg_lines).strip(), params


def png_writer(image: Image.Image, infotext: str | None = None, texts: dict[str, str] | None = None
               ) -> Callable[[str], None]:
    """A writer of the PNG with the infotext in its 'parameters' text chunk (A1111's), and `texts` in chunks of
    their own (A1111's "postprocessing"), for fastsd.files."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", _png_text(infotext))
    for key, text in (texts or {}).items():
        if text:
            info.add_text(key, _png_text(text))
    return lambda path: image.save(path, format="PNG", pnginfo=info)


def _png_text(text: str) -> str:
    """Text a PNG chunk can hold (UTF-8): the bytes of a file name that is not UTF-8 (which Python gives as
    surrogate escapes, and which an infotext names) written as \\xNN, any other lone surrogate as \\udNNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def save_png(image: Image.Image, path: str, infotext: str | None = None, *, overwrite: bool = True) -> str:
    """Write a PNG atomically (fastsd.files.atomic_write): an interrupted or failed save leaves no
    half-written file; overwrite=False refuses to replace an existing file (FileExistsError)."""
    return atomic_write(path, png_writer(image, infotext), overwrite=overwrite)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images (PIL images or uint8 arrays, same shape)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
