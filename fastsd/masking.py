"""A1111's inpainting mask handling around the sampler (its `StableDiffusionProcessingImg2Img.init` and
`apply_overlay`): the mask read as A1111 reads it, blurred with its Gaussian, and the init image laid back over the
result outside the (blurred) mask, so what was not to be repainted keeps its pixels instead of the VAE's copy.
"Only masked" (A1111's inpaint_full_res): the region around the mask, grown by the padding and to the output's
aspect ratio, is what the model repaints at width x height, then put back into the whole init image. "fill"
(A1111's inpainting_fill 0): the masked area painted over with blurred colours from around it before encoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# A1111's masking.fill: (Gaussian radius, times composited), the widest blur first, the sharp image last
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
BLANK_MASK = ('inpaint_full_res: the (blurred) mask has no white pixel, so there is no region to inpaint; as A1111 '
              '("Unable to perform Inpaint Only mask because mask is blank"), the whole image went through img2img '
              'at width x height without a mask')


def binary_mask(mask: Image.Image, round_alpha: bool = True) -> Image.Image:
    """A1111's create_binary_mask: an RGBA mask with any transparency is its alpha channel, thresholded at 128
    unless `round_alpha` is False (A1111's mask_round); anything else its grey levels."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
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


def overlay_of(image: Image.Image, mask: Image.Image, double: bool = True) -> Image.Image:
    """What A1111 lays over each result: the init image with alpha = the inverse of the blurred mask, opaque where the
    mask is black, clear inside it. "Just resize" (double): the image at the output size and the mask doubled,
    clipped (so the result shows fully from mid-edge inward); "only masked": the whole init image, the mask as it is.
    As A1111, the colours go through PIL's premultiplied RGBa (the same values where the alpha is 255)."""
    m = mask.convert("L")
    if double:
        m = Image.fromarray(np.clip(np.asarray(m, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(m))
    return kept.convert("RGBA")


def apply_overlay(result: Image.Image, overlay: Image.Image,
                  paste_to: tuple[int, int, int, int] | None = None) -> Image.Image:
    """A1111's apply_overlay: with paste_to (x, y, w, h) ("only masked"), the result crop-and-resized to w x h and put
    at (x, y) on a clear canvas of the overlay's size; then `overlay` alpha-composited over it. The result's PNG
    text (infotext) is kept."""
    if paste_to is not None:
        x, y, w, h = paste_to
        out = Image.new("RGBA", overlay.size)
        out.paste(resize_image(1, result.convert("RGB"), w, h), (x, y))
    else:
        out = result.convert("RGBA")
    out.alpha_composite(overlay)
    out = out.convert("RGB")
    out.info.update(result.info)
    return out


def flatten(image: Image.Image) -> Image.Image:
    """A1111's images.flatten with its default img2img background: an RGBA image over white, as RGB."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    out = Image.new("RGBA", image.size, "white")
    out.paste(image, mask=image)
    return out.convert("RGB")


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image with its default img2img upscaler (none: LANCZOS). 0 "just resize": stretched;
    1 "crop and resize": scaled to cover width x height, centred, the overflow cut; 2 "resize and fill": scaled to
    fit inside, centred, the bands left stretched from the image's edge rows (or columns); any other mode is 2 (A1111's
    `else`: its 3, latent upscale, on a mask)."""
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    target, source = width / height, image.width / image.height
    if (target > source) if mode == 1 else (target < source):  # the width is matched exactly
        w, h = width, image.height * width // image.width
    else:
        w, h = image.width * height // image.height, height
    scaled = image.resize((w, h), Image.LANCZOS)
    out = Image.new(image.mode, (width, height))  # (A1111's canvas is RGB; the same values for a grey mask)
    top, left = height // 2 - h // 2, width // 2 - w // 2
    out.paste(scaled, (left, top))
    if mode != 1 and target != source:
        if target < source and top > 0:  # bands above and below: the first and the last row, stretched
            out.paste(scaled.resize((width, top), box=(0, 0, width, 0)), (0, 0))
            out.paste(scaled.resize((width, top), box=(0, h, width, h)), (0, top + h))
        elif target > source and left > 0:  # left and right bands: the first and the last column
            out.paste(scaled.resize((left, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(scaled.resize((left, height), box=(w, 0, w, height)), (left + w, 0))
    return out


def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """A1111's get_crop_region_v2: the box (x1, y1, x2, y2) around the mask's non-black pixels, grown by `pad` on
    each side within the image; None for a mask with no such pixel."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def _grow(a: int, b: int, by: int, limit: int) -> tuple[int, int]:
    """One side of expand_crop_region: [a, b) grown by `by` (half before, the rest after), shifted back inside
    [0, limit) when it passes an end, cut at limit when still too long."""
    a, b = a - by // 2, b + by - by // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """A1111's expand_crop_region: the region made taller or wider (whole pixels, truncated) to the aspect ratio of
    width x height, kept inside the image (so it can stay short of the ratio on a small image)."""
    x1, y1, x2, y2 = region
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masking.fill ("fill", inpainting_fill 0): the image's unmasked pixels (weighted by the inverted mask,
    premultiplied) blurred wide to sharp, each layer composited over the last, so the masked area takes the colours
    around it; unmasked pixels come out as they were."""
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_LAYERS:
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


@dataclass(frozen=True)
class Inpaint:
    """What a job needs to inpaint as A1111: the image and mask the model gets (width x height), the overlay (and
    for "only masked" where the result goes in it, x, y, w, h), a note when something was not done as asked."""
    image: Image.Image
    mask: Image.Image | None
    overlay: Image.Image | None
    paste_to: tuple[int, int, int, int] | None = None
    note: str | None = None


MASKED_CONTENT_NAMES = {0: "fill", 1: None, 2: "latent noise", 3: "latent nothing"}  # A1111's inpainting_fill
RESIZE_MODES = (0, 1, 2, 3)  # A1111's resize_mode: just resize, crop and resize, resize and fill, latent upscale


def infotext_params(got: Inpaint, *, blur_x: float, blur_y: float, invert: bool, padding: int, fill: int) -> dict:
    """A1111's inpainting keys of the infotext (its extra_generation_params, in its order) for what `prepare` did:
    "Mask mode" when inverted, "Mask blur" (its mask_blur: None when x and y differ), "Inpaint area" and "Masked area
    padding" when "only masked" ran, "Masked content" unless "original" (A1111 writes none of the last for the
    whole-image fallback of a blank mask; None values are left out of the text)."""
    return {"Mask mode": "Inpaint not masked" if invert else None,
            "Mask blur": (blur_x if blur_x == blur_y else None) if blur_x > 0 or blur_y > 0 else None,
            "Inpaint area": "Only masked" if got.paste_to is not None else None,
            "Masked area padding": padding if got.paste_to is not None else None,
            "Masked content": MASKED_CONTENT_NAMES[fill] if got.mask is not None else None}


def prepare(image: Image.Image, mask: Image.Image, size: tuple[int, int], *, only_masked: bool, padding: int,
            fill_content: bool, resize_mode: int = 0) -> Inpaint:
    """A1111's img2img init for an RGB init image and its blurred mask. only_masked (inpaint_full_res): the crop
    region around the mask (plus padding, grown to the aspect ratio of `size`) cut out of the image and the mask (a
    mask of another size stretched onto the image first) and brought to `size` ("resize and fill"); the overlay is
    the whole init image with the mask as it is; a blank mask: plain img2img of the whole image, no mask (A1111's
    fallback, the image resized by `resize_mode`, kept as it is for 3: its latents are resized). Else the image and
    the mask, whatever their sizes, each resized to `size` (A1111's `resize_mode`: 0 just resize, 1 crop and resize,
    2 resize and fill) and the doubled mask's overlay. fill_content (inpainting_fill other than 1): the image the
    model gets is `fill`ed under its mask; the overlay keeps the image as it was."""
    width, height = size
    if only_masked:
        if mask.size != image.size:  # A1111 takes the region in the mask's own pixels and crops the image with
            # it, then fails making the overlay ("images do not match"): here the mask is first stretched onto the
            # image (resize_image's "just resize"), so the region is the image's
            mask = resize_image(0, mask, *image.size)
        region = crop_region(mask, padding)
        if region is None:
            keep = image.size == size or resize_mode == 3  # (A1111: resized by resize_mode as plain img2img; 3 not)
            return Inpaint(image if keep else resize_image(resize_mode, image, *size), None, None, note=BLANK_MASK)
        x1, y1, x2, y2 = region = expand_crop_region(region, width, height, image.width, image.height)
        overlay = overlay_of(image, mask, double=False)
        model_mask = resize_image(2, mask.crop(region), width, height).convert("L")
        model_image = resize_image(2, image.crop(region), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        model_image = resize_image(resize_mode, image, *size) if image.size != size else image
        model_mask = resize_image(resize_mode, mask, *size) if mask.size != size else mask
        overlay, paste_to = overlay_of(model_image, model_mask), None
    if fill_content:
        model_image = fill(model_image, model_mask)
    return Inpaint(model_image, model_mask, overlay, paste_to)


# ---- A1111's img2img request fields -> what the model gets (shared by fastsd.serve and fastsd.batch) -------------

MAX_MASK_BLUR = 512  # px, each way (A1111's slider stops at 64, its API at nothing; the blur's cost grows with it)
# A1111's inpainting_fill ("Masked content"): 0 fill, 1 original, 2 latent noise, 3 latent nothing (0, 2 and 3 fill
# the image under the mask; 2 and 3 then replace its latents there: Pipeline.generate's masked_content)
LATENT_FILL = {0: "original", 1: "original", 2: "latent noise", 3: "latent nothing"}


class Img2ImgError(ValueError):
    """A1111 img2img fields that can't run together (one line); fastsd.serve answers it as a 422."""


def check_inpaint_fields(f) -> None:
    """A1111's inpainting fields of `f` (an object with its img2img request's attribute names: inpaint_full_res,
    inpaint_full_res_padding, inpainting_fill), checked before any image is decoded: Img2ImgError."""
    if f.inpaint_full_res and f.inpaint_full_res_padding < 0:
        raise Img2ImgError(f"inpaint_full_res_padding must be at least 0 (px), got {f.inpaint_full_res_padding}")
    if f.inpainting_fill not in LATENT_FILL:
        raise Img2ImgError(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                           f"got {f.inpainting_fill}")


def a1111_img2img(f, images: list[Image.Image], mask: Image.Image | None, size: tuple[int, int],
                  warnings: list[str]) -> tuple[list[Inpaint], dict, int]:
    """The init images (and mask) as the model gets them from A1111's img2img fields `f` (an object with its request's
    attribute names: resize_mode, mask_blur, mask_blur_x, mask_blur_y, mask_round, inpainting_fill, inpaint_full_res,
    inpaint_full_res_padding, inpainting_mask_invert; `check_inpaint_fields` first when there is a mask): each image
    flattened over white (A1111), brought to `size` by resize_mode 0-3 (LANCZOS); for a mask, A1111's inpainting: the
    mask read as A1111 (an RGBA mask's alpha), inverted, blurred, "only masked" (inpaint_full_res) or the whole picture,
    "fill" or "original" content, the overlay laid over each result (and where, for "only masked"); and A1111's
    inpainting keys for the infotext. One Inpaint per init image (A1111's init_images), and the resize mode
    Pipeline.generate runs: 3 ("just resize (latent upscale)": the image kept at its size, its latents resized; its
    caller checks that size) where no mask or crop took the image to the size, else 0. Img2ImgError (one line) for
    fields that can't run; notes (a blank mask's fallback) go to `warnings`."""
    images = [flatten(im) for im in images]  # RGBA over white (A1111)
    mode = f.resize_mode if f.resize_mode in RESIZE_MODES else 2  # (A1111's resize_image: any other is 2)
    if mask is not None:  # as A1111: binary (an RGBA mask's alpha), inverted, blurred; then cut/resized, filled, overlaid
        mask = binary_mask(mask, round_alpha=f.mask_round)
        if f.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        blur_x, blur_y = (f.mask_blur, f.mask_blur) if f.mask_blur is not None else (f.mask_blur_x, f.mask_blur_y)
        if max(blur_x, blur_y) > MAX_MASK_BLUR:  # (as A1111, a blur <= 0 is none)
            raise Img2ImgError(f"mask_blur must be at most {MAX_MASK_BLUR} (px; 0 or less: no blur), got {blur_x}, "
                               f"{blur_y} (x, y)")
        if f.inpaint_full_res and len({im.size for im in images}) > 1:
            sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
            raise Img2ImgError("init_images: with a mask and inpaint_full_res the images must have one size (A1111 "
                               f"cuts one region out of each), got {sizes}")
        if mode == 3 and not f.inpaint_full_res:
            mode = _latent_resize_with_mask(images, size)
        blurred = blur(mask, blur_x, blur_y)
        got = [prepare(im, blurred, size, only_masked=f.inpaint_full_res, padding=f.inpaint_full_res_padding,
                       fill_content=f.inpainting_fill != 1, resize_mode=mode) for im in images]
        if got[0].note:
            warnings.append(got[0].note)
        extra = infotext_params(got[0], blur_x=blur_x, blur_y=blur_y, invert=bool(f.inpainting_mask_invert),
                                padding=f.inpaint_full_res_padding, fill=f.inpainting_fill)
        return got, extra, mode if got[0].mask is None else 0
    if mode == 3:
        return [Inpaint(im, None, None) for im in images], {}, 3
    return [Inpaint(resize_image(mode, im, *size) if im.size != size else im, None, None) for im in images], {}, 0


def _latent_resize_with_mask(images: list, size: tuple[int, int]) -> int:
    """resize_mode 3 with a mask on the whole picture: A1111 fills and overlays the image at its own size against a
    mask at width x height, which fails unless they are one size (then it is "just resize"): 0, or Img2ImgError."""
    if any(im.size != size for im in images):
        raise Img2ImgError(f"resize_mode 3 (latent upscale) with a mask needs inpaint_full_res or init images of the "
                           f"output size {size[0]}x{size[1]} (A1111 fails on it), got {images[0].width}x"
                           f"{images[0].height}")
    return 0
