"""Images in and out: PIL <-> tensors, masks, A1111 infotext (the PNG "parameters" chunk), atomic saves."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def load_image(path: str, what: str = "image") -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except (OSError, Image.UnidentifiedImageError) as e:
        raise ValueError(f"{what} {path}: not a readable image ({e})") from None


def check_mask(image: Image.Image | None, mask: Image.Image | None) -> None:
    if mask is not None and image is not None and mask.size != image.size:
        raise ValueError(f"mask size {mask.size[0]}x{mask.size[1]} differs from the image size "
                         f"{image.size[0]}x{image.size[1]}")


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


# ---- A1111 infotext ------------------------------------------------------------------------------

def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """A1111's layout: the prompt, 'Negative prompt: ...' (when given), then 'Key: value, Key: value'."""
    def value(v: object) -> str:
        s = str(v)
        return json.dumps(s, ensure_ascii=False) if any(c in s for c in ',:\n') else s  # as A1111's quote()

    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of format_infotext (and reads A1111's own): (prompt, negative_prompt, params as strings)."""
    *head, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:  # no settings line
        head, last = head + [last], ""
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_neg, line = True, line[len("Negative prompt:"):].strip()
        (neg_lines if in_neg else prompt_lines).append(line)
    params = {}
    for k, v in _PARAM_RE.findall(last):
        params[k.strip()] = json.loads(v) if len(v) > 1 and v[0] == v[-1] == '"' else v.strip()
    return "\n".join(prompt_lines).strip(), "\n".join(neg_lines).strip(), params


def file_hash(path: str) -> str:
    """A1111's 'Model hash': the first 10 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def save_png(image: Image.Image, path: str, infotext: str | None = None) -> None:
    """Write a PNG atomically (temp file in the same folder, then rename): an interrupted or failed
    save leaves no half-written file. The infotext goes in the 'parameters' text chunk, as A1111's."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastsd-", suffix=".png.part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images (PIL images or uint8 arrays, same shape)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
