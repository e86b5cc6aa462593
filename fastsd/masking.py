"""A1111's inpainting mask handling around the sampler (its `StableDiffusionProcessingImg2Img.init` and
`apply_overlay`): the mask read as A1111 reads it, blurred with its Gaussian, and the init image laid back over the
result outside the (blurred) mask, so what was not to be repainted keeps its pixels instead of the VAE's copy.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's create_binary_mask: an RGBA mask with any transparency is its alpha channel thresholded at 128,
    anything else its grey levels."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.split()[-1].convert("L").point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L")


def _kernel(sigma: float) -> np.ndarray:
    """OpenCV's Gaussian kernel for A1111's size 2 * int(2.5 sigma + 0.5) + 1, normalised."""
    k = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    w = np.exp(-x * x / (2.0 * sigma * sigma))
    return w / w.sum()


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    w = _kernel(sigma)
    r = len(w) // 2
    n = a.shape[axis]
    idx = np.arange(-r, n + r)
    while True:  # OpenCV's default border, BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), repeated for short sides
        out = (idx < 0) | (idx >= n)
        if not out.any():
            break
        idx = np.where(idx < 0, -idx, idx)
        idx = np.where(idx >= n, 2 * (n - 1) - idx, idx) if n > 1 else np.zeros_like(idx)
    padded = np.take(a, idx, axis=axis)
    size = padded.shape[axis] + len(w) - 1  # the full linear convolution by FFT (a wide kernel costs no more)
    full = np.fft.irfft(np.fft.rfft(padded, size, axis=axis) * np.expand_dims(np.fft.rfft(w, size), 1 - axis),
                        size, axis=axis)
    return np.take(full, np.arange(2 * r, 2 * r + n), axis=axis)  # the "valid" part, one value per pixel


def blur(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """A1111's mask blur: a horizontal Gaussian of sigma blur_x, then a vertical one of blur_y (each skipped at 0),
    rounded to 8 bits after each as cv2.GaussianBlur does (cv2's fixed-point rounding can differ by one level)."""
    a = np.asarray(mask.convert("L"), dtype=np.float64)
    for sigma, axis in ((blur_x, 1), (blur_y, 0)):
        if sigma > 0:
            a = np.clip(np.floor(_blur_axis(a, sigma, axis) + 0.5), 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def overlay_of(image: Image.Image, mask: Image.Image) -> Image.Image:
    """What A1111 lays over each result ("just resize", not "only masked"): the init image (at the output size) with
    alpha = the inverse of twice the blurred mask, clipped: opaque where the mask is black, clear inside it."""
    keep = np.clip(np.asarray(mask.convert("L"), dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    out = image.convert("RGB").convert("RGBA")
    out.putalpha(ImageOps.invert(Image.fromarray(keep)))
    return out


def apply_overlay(result: Image.Image, overlay: Image.Image) -> Image.Image:
    """A1111's apply_overlay: `overlay` alpha-composited over `result`; the result's PNG text (infotext) is kept."""
    out = result.convert("RGBA")
    out.alpha_composite(overlay)
    out = out.convert("RGB")
    out.info.update(result.info)
    return out
