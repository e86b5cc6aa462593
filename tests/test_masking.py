"""A1111's inpainting mask handling (fastsd.masking): the mask read as A1111 reads it (an RGBA mask's alpha), its
Gaussian blur (OpenCV's kernel and border), and the init image laid back over the result outside the blurred
mask (apply_overlay), as the server does for A1111's img2img requests."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import convolve1d
from serve_server import decode, info, main_server, png_b64

from fastsd import masking


def scipy_blur(a: np.ndarray, blur_x: float, blur_y: float) -> np.ndarray:
    """cv2.GaussianBlur's two passes as A1111 calls them: kernel size 2 int(2.5 s + 0.5) + 1, sigma s, border
    reflect-101 (scipy's "mirror"), 8-bit rounding after each."""
    out = a.astype(np.float64)
    for sigma, axis in ((blur_x, 1), (blur_y, 0)):
        if sigma > 0:
            k = 2 * int(2.5 * sigma + 0.5) + 1
            x = np.arange(k) - (k - 1) / 2
            w = np.exp(-x * x / (2 * sigma * sigma))
            out = np.clip(np.floor(convolve1d(out, w / w.sum(), axis=axis, mode="mirror") + 0.5), 0, 255)
    return out


@pytest.mark.parametrize("shape", [(37, 53), (5, 3), (1, 9), (64, 1), (120, 90)])
@pytest.mark.parametrize("blur", [(4, 4), (1, 7), (0, 3), (20, 20), (64, 64), (2.5, 0)])
def test_blur_is_opencvs_gaussian(shape, blur):
    a = (np.random.default_rng(sum(shape)).random(shape) > 0.6).astype(np.uint8) * 255
    got = np.asarray(masking.blur(Image.fromarray(a), *blur)).astype(int)
    assert np.abs(got - scipy_blur(a, *blur)).max() == 0
    if blur == (0, 0):
        assert (got == a).all()


def test_binary_mask_reads_an_rgba_masks_alpha():
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 200))
    rgba.putpixel((2, 0), (255, 255, 255, 100))
    assert np.asarray(masking.binary_mask(rgba)).tolist() == [[0, 255, 0, 0], [0, 0, 0, 0]]
    assert np.asarray(masking.binary_mask(rgba, round_alpha=False)).tolist() == [[0, 200, 100, 0], [0, 0, 0, 0]]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    assert np.asarray(masking.binary_mask(opaque)).tolist() == [[255, 255]]  # no transparency: its grey levels


def test_overlay_keeps_the_init_image_outside_the_mask():
    init = Image.new("RGB", (16, 8), (10, 200, 30))
    result = Image.new("RGB", (16, 8), (250, 0, 120))
    result.info["parameters"] = "a cat\nSteps: 1"
    mask = Image.new("L", (16, 8), 0)
    mask.paste(255, (8, 0, 16, 8))
    mask.putpixel((7, 0), 64)  # a blurred edge: 2 x 64 = 128 of the result
    out = masking.apply_overlay(result, masking.overlay_of(init, mask))
    a = np.asarray(out).astype(int)
    assert (a[:, :7] == [10, 200, 30]).all() and (a[:, 8:] == [250, 0, 120]).all()
    assert np.abs(a[0, 7] - (np.array([10, 200, 30]) * 127 + np.array([250, 0, 120]) * 128) / 255).max() <= 1
    assert out.info["parameters"] == "a cat\nSteps: 1" and out.mode == "RGB"


def test_server_inpainting_as_a1111():
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "denoising_strength": 1.0,
            "init_images": [png_b64(init)], "mask": png_b64(mask)}
    server = main_server()
    with server.client() as c:
        for extra, edge in (({}, 4), ({"mask_blur": 0}, 0), ({"mask_blur_x": 8, "mask_blur_y": 2}, 8),
                            ({"inpaint_full_res": False}, 4), ({"inpaint_full_res": False, "inpainting_fill": 1}, 4)):
            r = c.post("/sdapi/v1/img2img", json={**body, **extra})
            assert r.status_code == 200, r.text
            out = np.asarray(decode(r.json()["images"][0])).astype(int)
            blurred = scipy_blur(np.asarray(mask), *((edge, edge) if "mask_blur_x" not in extra else (8, 2)))
            kept = blurred == 0
            assert (out[kept] == [200, 30, 30]).all()  # untouched: the init image's own pixels, not the VAE's
            assert np.abs(out[28:36, 28:36] - [200, 30, 30]).max() > 20  # repainted inside
            assert info(r)["warnings"] == []
        r = c.post("/sdapi/v1/img2img", json={**body, "mask_blur": 513})
        assert r.status_code == 422 and "mask_blur must be at most 512" in json.dumps(r.json())
        # the 9-channel inpainting model gets the same overlay
        r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": {
            "sd_model_checkpoint": "random:tiny-inpainting"}})
        assert r.status_code == 200, r.text
        out = np.asarray(decode(r.json()["images"][0])).astype(int)
        assert (out[:8, :8] == [200, 30, 30]).all()


def test_server_mask_round_reaches_the_latent_mask():
    """The server asks for A1111's latent mask: rounded, or with mask_round false its grey levels (an L mask's
    blurred edge is not thresholded then, so the image changes; before latent_mask it could not)."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "init_images": [png_b64(init)],
            "mask": png_b64(mask), "inpaint_full_res": False, "mask_blur": 8}
    with main_server().client() as c:
        rounded, soft = (np.asarray(decode(c.post("/sdapi/v1/img2img", json={**body, **extra}).json()["images"][0]))
                         for extra in ({}, {"mask_round": False}))
    assert np.abs(rounded.astype(int) - soft).max() > 0


def test_server_infotext_has_a1111s_inpainting_keys():
    """As A1111's img2img init writes them (extra_generation_params): after Denoising strength, in its order."""
    from fastsd.image import parse_infotext

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "init_images": [png_b64(init)],
            "mask": png_b64(mask)}
    cases = [({}, {"Mask blur": "4", "Inpaint area": "Only masked", "Masked area padding": "0",
                   "Masked content": "fill"}),
             ({"inpaint_full_res": False, "inpainting_fill": 1, "mask_blur": 0}, {}),
             ({"inpainting_mask_invert": 1, "inpaint_full_res_padding": 8, "inpainting_fill": 2},
              {"Mask mode": "Inpaint not masked", "Mask blur": "4", "Inpaint area": "Only masked",
               "Masked area padding": "8", "Masked content": "latent noise"}),
             ({"inpaint_full_res": False, "mask_blur_x": 4, "mask_blur_y": 2, "inpainting_fill": 3},
              {"Masked content": "latent nothing"})]  # (A1111's mask_blur is None when x and y differ)
    keys = ("Mask mode", "Mask blur", "Inpaint area", "Masked area padding", "Masked content")
    with main_server().client() as c:
        for extra, want in cases:
            r = c.post("/sdapi/v1/img2img", json={**body, **extra})
            assert r.status_code == 200, r.text
            params = parse_infotext(info(r)["infotexts"][0])[2]
            assert {k: v for k, v in params.items() if k in keys} == want, extra
            names = list(params)
            assert names[names.index("Denoising strength") + 1] == "RNG"  # (A1111's: the last of its own keys)
            assert names[names.index("RNG") + 1:][:len(want)] == list(want)  # A1111's order (extra params after)
        plain = parse_infotext(info(c.post("/sdapi/v1/img2img", json={**body, "mask": None}))["infotexts"][0])[2]
        assert not set(keys) & set(plain)


# ---- "only masked" (inpaint_full_res) and "fill" (inpainting_fill 0), against transcriptions of A1111's code ----

def a1111_get_crop_region_v2(mask: Image.Image, pad: int = 0):
    """modules/masking.py get_crop_region_v2 (A1111 1.9+)."""
    if box := mask.getbbox():
        x1, y1, x2, y2 = box
        return (max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.size[0]), min(y2 + pad, mask.size[1])) \
            if pad else box


def a1111_expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):
    """modules/masking.py expand_crop_region."""
    x1, y1, x2, y2 = crop_region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height = (x2 - x1) / ratio_processing
        desired_height_diff = int(desired_height - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= image_height:
            diff = y2 - image_height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= image_height:  # noqa: PLR1730 (A1111's code as it is)
            y2 = image_height
    else:
        desired_width = (y2 - y1) * ratio_processing
        desired_width_diff = int(desired_width - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= image_width:
            diff = x2 - image_width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= image_width:  # noqa: PLR1730
            x2 = image_width
    return x1, y1, x2, y2


def a1111_resize_image(resize_mode, im, width, height):
    """modules/images.py resize_image with upscaler_for_img2img None (LANCZOS)."""
    def resize(im, w, h):
        return im.resize((w, h), resample=Image.LANCZOS)

    if resize_mode == 0:
        res = resize(im, width, height)
    elif resize_mode == 1:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    else:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def a1111_fill(image, mask):
    """modules/masking.py fill."""
    from PIL import ImageFilter, ImageOps
    image_mod = Image.new('RGBA', (image.width, image.height))
    image_masked = Image.new('RGBa', (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert('L')))
    image_masked = image_masked.convert('RGBa')
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert('RGBA')
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def a1111_only_masked(image, blurred_mask, width, height, pad, inpainting_fill, result):
    """StableDiffusionProcessingImg2Img.init's inpaint_full_res path (mask_for_overlay, crop_region, paste_to,
    overlay_images, the crop, fill), then processing.apply_overlay / uncrop on `result` (the model's output)."""
    from PIL import ImageOps
    mask_for_overlay = blurred_mask
    mask = blurred_mask.convert('L')
    crop_region = a1111_get_crop_region_v2(mask, pad)
    crop_region = a1111_expand_crop_region(crop_region, width, height, mask.width, mask.height)
    x1, y1, x2, y2 = crop_region
    image_mask = a1111_resize_image(2, mask.crop(crop_region), width, height)
    paste_to = (x1, y1, x2 - x1, y2 - y1)
    image_masked = Image.new('RGBa', (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert('L')))
    overlay = image_masked.convert('RGBA')
    image = a1111_resize_image(2, image.crop(crop_region), width, height)
    if inpainting_fill != 1:
        image = a1111_fill(image, image_mask)
    x, y, w, h = paste_to
    base_image = Image.new('RGBA', (overlay.width, overlay.height))
    base_image.paste(a1111_resize_image(1, result, w, h), (x, y))
    out = base_image.convert('RGBA')
    out.alpha_composite(overlay)
    return image, image_mask, out.convert('RGB'), paste_to


def blob_mask(size, boxes):
    """A black mask with white boxes."""
    m = Image.new("L", size, 0)
    for box in boxes:
        m.paste(255, box)
    return m


MASKS = [  # (image size, white boxes)
    ((64, 64), [(24, 24, 40, 40)]),
    ((96, 80), [(70, 10, 90, 30)]),              # near the right edge
    ((96, 80), [(0, 0, 5, 80)]),                 # a tall strip on the left edge
    ((120, 50), [(0, 45, 120, 50)]),             # a wide strip on the bottom edge
    ((77, 131), [(40, 60, 41, 61)]),             # one pixel
    ((200, 90), [(10, 10, 20, 15), (150, 70, 190, 88)]),  # two blobs far apart
    ((64, 64), [(0, 0, 64, 64)]),                # everything
]


@pytest.mark.parametrize("size,boxes", MASKS)
@pytest.mark.parametrize("pad", [0, 1, 4, 32, 500])
@pytest.mark.parametrize("target", [(64, 64), (128, 64), (64, 128), (512, 384), (40, 96)])
def test_crop_region_and_expand_are_a1111s(size, boxes, pad, target):
    for blur in (0, 4):
        mask = masking.blur(blob_mask(size, boxes), blur, blur)
        region = masking.crop_region(mask, pad)
        assert region == a1111_get_crop_region_v2(mask, pad)
        got = masking.expand_crop_region(region, *target, *size)
        assert got == a1111_expand_crop_region(region, *target, *size)
        x1, y1, x2, y2 = got
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]


def test_crop_region_of_a_blank_mask_is_none():
    assert masking.crop_region(Image.new("L", (32, 16), 0), 8) is None
    assert a1111_get_crop_region_v2(Image.new("L", (32, 16), 0), 8) is None


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("src,dst", [((48, 48), (64, 64)), ((44, 48), (64, 64)), ((48, 44), (64, 64)),
                                     ((100, 37), (64, 96)), ((30, 90), (128, 64)), ((64, 64), (64, 64)),
                                     ((33, 32), (64, 64)), ((640, 480), (64, 48))])
def test_resize_image_is_a1111s(mode, src, dst):
    rng = np.random.default_rng(sum(src) + mode)
    im = Image.fromarray(rng.integers(0, 256, (src[1], src[0], 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(masking.resize_image(mode, im, *dst)),
                          np.asarray(a1111_resize_image(mode, im, *dst)))
    grey = im.convert("L")  # a mask: the same values on fastsd's L canvas as on A1111's RGB one
    assert np.array_equal(np.asarray(masking.resize_image(mode, grey, *dst)),
                          np.asarray(a1111_resize_image(mode, grey, *dst).convert("L")))


@pytest.mark.parametrize("size,boxes", MASKS[:6])
def test_fill_is_a1111s(size, boxes):
    rng = np.random.default_rng(size[0])
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for blur in (0, 4, 16):
        mask = masking.blur(blob_mask(size, boxes), blur, blur)
        got = masking.fill(im, mask)
        assert np.array_equal(np.asarray(got), np.asarray(a1111_fill(im, mask)))
        keep = np.asarray(mask) == 0
        assert np.array_equal(np.asarray(got)[keep], np.asarray(im)[keep])  # unmasked pixels as they were
    flat = Image.new("RGB", (64, 64), (10, 200, 30))
    mask = blob_mask((64, 64), [(20, 20, 40, 40)])
    filled = np.asarray(masking.fill(flat, mask)).astype(int)[20:40, 20:40]  # the colour around (PIL's
    assert np.abs(filled.mean((0, 1)) - [10, 200, 30]).max() < 1 and np.abs(filled - [10, 200, 30]).max() < 8
    # premultiplied 8-bit layers are a few levels off in places)


@pytest.mark.parametrize("size,boxes", MASKS)
@pytest.mark.parametrize("target,pad,fill", [((64, 64), 0, 0), ((64, 64), 32, 1), ((96, 64), 8, 0),
                                             ((48, 96), 0, 1)])
def test_only_masked_is_a1111s(size, boxes, target, pad, fill):
    rng = np.random.default_rng(size[1] + pad)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    mask = masking.blur(blob_mask(size, boxes), 4, 4)
    got = masking.prepare(im, mask, target, only_masked=True, padding=pad, fill_content=fill != 1)
    result = Image.fromarray(rng.integers(0, 256, (target[1], target[0], 3), dtype=np.uint8))
    result.info["parameters"] = "a cat"
    want_image, want_mask, want_out, want_paste = a1111_only_masked(im, mask, *target, pad, fill, result)
    assert got.paste_to == want_paste and got.note is None
    assert np.array_equal(np.asarray(got.image), np.asarray(want_image))
    assert np.array_equal(np.asarray(got.mask), np.asarray(want_mask.convert("L")))
    out = masking.apply_overlay(result, got.overlay, got.paste_to)
    assert out.size == size and out.info["parameters"] == "a cat"
    assert np.array_equal(np.asarray(out), np.asarray(want_out))
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out)[kept], np.asarray(im)[kept])


def test_only_masked_with_a_blank_mask_is_plain_img2img():
    im = Image.new("RGB", (80, 40), (1, 2, 3))
    got = masking.prepare(im, Image.new("L", (80, 40), 0), (64, 64), only_masked=True, padding=4, fill_content=True)
    assert got.mask is None and got.overlay is None and got.paste_to is None and got.image.size == (64, 64)
    assert "blank" in got.note


def test_whole_picture_overlay_is_a1111s():
    """inpaint_full_res off: A1111's overlay (the doubled mask, through RGBa) and fill on the resized image."""
    from PIL import ImageOps
    rng = np.random.default_rng(5)
    im = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    mask = masking.blur(blob_mask((70, 50), [(20, 10, 50, 30)]), 6, 6)
    got = masking.prepare(im, mask, (64, 64), only_masked=False, padding=0, fill_content=True)
    image = a1111_resize_image(0, im, 64, 64)
    image_mask = a1111_resize_image(0, mask, 64, 64)
    mask_for_overlay = Image.fromarray(np.clip(np.asarray(image_mask).astype(np.float32) * 2, 0, 255)
                                       .astype(np.uint8))
    image_masked = Image.new('RGBa', (64, 64))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert('L')))
    assert np.array_equal(np.asarray(got.overlay), np.asarray(image_masked.convert("RGBA")))
    assert np.array_equal(np.asarray(got.image), np.asarray(a1111_fill(image, image_mask)))
    assert np.array_equal(np.asarray(got.mask), np.asarray(image_mask)) and got.paste_to is None


def test_server_only_masked_as_a1111():
    """inpaint_full_res (A1111's API default): the region around the mask repainted at width x height and put back
    into the init image, which keeps its size; the padding, inpainting_fill 0 vs 1, a blank mask, the warnings."""
    rng = np.random.default_rng(7)
    init_a = np.zeros((80, 96, 3), np.uint8)
    init_a[:] = [200, 30, 30]
    init_a[::2, ::3] = rng.integers(0, 256, (40, 32, 3))  # some texture, for the VAE and the fill
    init_a[20:44, 60:84] = [20, 40, 230]  # blue under the mask: "original" keeps it, "fill" paints it over
    init = Image.fromarray(init_a)
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (60, 20, 84, 44))
    kept = scipy_blur(np.asarray(mask), 4, 4) == 0
    inside = np.asarray(mask) == 255
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "denoising_strength": 0.4,
            "init_images": [png_b64(init)], "mask": png_b64(mask)}  # (A1111's img2img: 1 step, from the 2nd level)
    server = main_server()
    outs = {}
    with server.client() as c:
        for name, extra in (("default", {}), ("pad", {"inpaint_full_res_padding": 24}), ("original",
                            {"inpainting_fill": 1}), ("noise", {"inpainting_fill": 2}), ("nothing", {"inpainting_fill": 3}),
                            ("inpaint-model", {"override_settings": {"sd_model_checkpoint": "random:tiny-inpainting"}})):
            r = c.post("/sdapi/v1/img2img", json={**body, **extra})
            assert r.status_code == 200, r.text
            im = decode(r.json()["images"][0])
            assert im.size == (96, 80)  # the init image's size, not width x height
            outs[name] = out = np.asarray(im).astype(int)
            assert (out[kept] == init_a[kept]).all()  # outside the blurred mask: the init image's own pixels
            assert np.abs(out[inside] - init_a[inside]).max() > 20  # repainted inside
            assert info(r)["warnings"] == []
        differ = {k: np.abs(outs[k][inside] - outs["default"][inside]).max() for k in outs}
        assert differ["pad"] > 10  # another crop, another picture
        assert differ["original"] > 10  # "fill" and "original" start the model from different pixels
        assert differ["noise"] > 10 and differ["nothing"] > 10  # the masked latents replaced (pipeline test below)
        assert np.abs(outs["noise"][inside] - outs["nothing"][inside]).max() > 10
        # a mask with no white pixel: A1111 falls back to img2img of the whole picture at width x height
        r = c.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(Image.new("L", (96, 80), 0))})
        assert r.status_code == 200, r.text
        assert decode(r.json()["images"][0]).size == (64, 64)
        assert [w for w in info(r)["warnings"] if "no white pixel" in w and "Inpaint Only mask" in w]
        for extra, message in (({"inpaint_full_res_padding": -1}, "inpaint_full_res_padding must be at least 0"),
                               ({"inpainting_fill": 4}, "inpainting_fill must be 0 (fill)")):
            r = c.post("/sdapi/v1/img2img", json={**body, **extra})
            assert r.status_code == 422 and message in r.json()["detail"], r.text


@pytest.mark.parametrize("fill", [0, 1])
def test_server_only_masked_is_a1111s_composition_of_the_model_output(fill):
    """The served image = A1111's "only masked" steps (transcribed above) around the same Pipeline's output on the
    same crop: bit for bit (one CPU thread here, as the server runs)."""
    import torch

    from fastsd.load import load_pipeline

    rng = np.random.default_rng(7)
    init_a = np.zeros((80, 96, 3), np.uint8)
    init_a[:] = [200, 30, 30]
    init_a[::2, ::3] = rng.integers(0, 256, (40, 32, 3))
    init, mask = Image.fromarray(init_a), blob_mask((96, 80), [(60, 20, 84, 44)])
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 48, "seed": 3, "denoising_strength": 0.6,
            "init_images": [png_b64(init)], "mask": png_b64(mask), "inpaint_full_res_padding": 6,
            "inpainting_fill": fill}
    with main_server().client() as c:
        r = c.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    served = np.asarray(decode(r.json()["images"][0]))
    blurred = masking.blur(mask, 4, 4)
    image, image_mask, _, _ = a1111_only_masked(init, blurred, 64, 48, 6, fill, Image.new("RGB", (64, 48)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = load_pipeline("random:tiny", device="cpu").generate(
            "a cat", steps=2, guidance_scale=7.0, sampler="euler", seed=3, width=64, height=48, strength=0.6,
            image=image, mask=image_mask.convert("L"), latent_mask="bicubic", progress=False)[0]  # (A1111's latmask)
    finally:
        torch.set_num_threads(threads)
    _, _, want, _ = a1111_only_masked(init, blurred, 64, 48, 6, fill, got)
    assert np.array_equal(served, np.asarray(want))


@pytest.mark.parametrize("content", ["latent noise", "latent nothing"])
def test_masked_content_replaces_the_masked_latents(content, monkeypatch):
    """A1111's inpainting_fill 2 / 3: the image latents under the (latent-size) mask become each seed's first normal
    draw (create_random_tensors) / zeros before the start noise is added; the rest stays the image's."""
    import torch

    import fastsd
    from fastsd.pipeline import seeded_noise
    from fastsd.settings import GenerationSettings

    pipe = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 8, 48, 40))
    s = pipe.resolve(GenerationSettings("a cat", steps=4, seed=5, num_images=2, strength=0.5), image)
    base = pipe.prepare_latents(s, [5, 6], image=image, mask=mask)
    got = pipe.prepare_latents(s, [5, 6], image=image, mask=mask, masked_content=content)
    m = base.mask.bool().expand_as(base.x0)
    assert m.any() and (~m).any()
    assert torch.equal(got.x0[~m], base.x0[~m]) and torch.equal(got.x[~m], base.x[~m])
    want = seeded_noise([torch.Generator().manual_seed(seed) for seed in (5, 6)], base.x0.shape[1:], pipe.device) \
        if content == "latent noise" else torch.zeros_like(base.x0)
    assert torch.equal(got.x0[m], want[m])
    torch.testing.assert_close(got.x - got.x0, base.x - base.x0, rtol=0, atol=1e-5)  # the same start noise on top
    with pytest.raises(ValueError, match="masked_content must be one of 'original', 'latent noise', 'latent nothing'"):
        pipe.generate("a cat", image=image, mask=mask, masked_content="fill", steps=1)
    one = pipe.generate("a cat", image=image, mask=mask, masked_content=content, steps=2, seed=5, progress=False)[0]
    assert one.size == (64, 64)


@pytest.mark.parametrize("how", ["bicubic", "bicubic-soft"])
def test_latent_mask_is_a1111s_latmask(how):
    """latent_mask="bicubic" (the server's, A1111's way): the blurred mask shrunk to latent size as A1111's
    processing.py does (PIL's default resize of the RGB mask, / 255, np.around with mask_round; not rounded
    without), where diffusers' "nearest" samples the thresholded mask; the 9-channel concat keeps the latter, but
    without mask_round (A1111's torch.round is skipped then: tests/test_inpaint_a1111.py)."""
    import torch

    import fastsd
    from fastsd.settings import GenerationSettings

    pipe = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    blurred = masking.blur(blob_mask((64, 48), [(13, 9, 37, 30)]), 4, 4)
    s = pipe.resolve(GenerationSettings("a cat", steps=4, seed=5, strength=0.5), image)
    got = pipe.prepare_latents(s, [5], image=image, mask=blurred, latent_mask=how)
    latmask = np.moveaxis(np.array(blurred.convert("RGB").resize((8, 6)), dtype=np.float32), 2, 0) / 255  # A1111's
    latmask = np.around(latmask[0]) if how == "bicubic" else latmask[0]
    assert np.array_equal(got.mask[0, 0].numpy(), latmask)
    assert (how == "bicubic") != ((latmask > 0) & (latmask < 1)).any()  # grey levels kept only without rounding
    nearest = pipe.prepare_latents(s, [5], image=image, mask=blurred)
    assert not torch.equal(nearest.mask, got.mask)  # the box's edges land elsewhere
    with pytest.raises(ValueError, match="latent_mask must be one of 'nearest', 'bicubic', 'bicubic-soft'"):
        pipe.generate("a cat", image=image, mask=blurred, latent_mask="bilinear", steps=1)
    inpaint = fastsd.load_pipeline("random:tiny-inpainting", device="cpu", dtype="fp32", backend="torch")
    a = inpaint.prepare_latents(s, [5], image=image, mask=blurred, latent_mask=how).extra["c_concat"]
    b = inpaint.prepare_latents(s, [5], image=image, mask=blurred).extra["c_concat"]
    assert torch.equal(a, b) == (how == "bicubic")  # A1111's 9-channel conditioning samples the rounded mask
    # (nearest), as diffusers, unless mask_round is off


def test_cli_a1111_inpainting(tmp_path, capsys):
    """The CLI's A1111 inpainting options: the same masking as the server (blur, only masked, fill, overlay)."""
    from fastsd.generate import main

    rng = np.random.default_rng(1)
    init_a = np.full((80, 96, 3), (200, 30, 30), np.uint8)
    init_a[::2, ::3] = rng.integers(0, 256, (40, 32, 3))
    Image.fromarray(init_a).save(tmp_path / "init.png")
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (60, 20, 84, 44))
    mask.save(tmp_path / "mask.png")
    kept = scipy_blur(np.asarray(mask), 4, 4) == 0
    base = ["a cat", "--model", "random:tiny", "--steps", "2", "--seed", "1", "--init-image", str(tmp_path / "init.png"),
            "--mask", str(tmp_path / "mask.png"), "--no-progress"]
    outs = {}
    for name, extra in (("diffusers", []), ("blur", ["--mask-blur", "4"]),
                        ("only", ["--inpaint-area", "only-masked", "--width", "64", "--height", "64"]),
                        ("noise", ["--masked-content", "latent-noise"])):
        assert main([*base, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
        assert outs[name].shape == (80, 96, 3)  # "only masked" too: the init image's size
    for name in ("blur", "only", "noise"):  # the init image laid back over the result outside the blurred mask
        assert (outs[name][kept] == init_a[kept]).all(), name
    assert np.abs(outs["diffusers"][kept] - init_a[kept]).max() > 20  # diffusers' way: the VAE's copy everywhere
    assert np.abs(outs["noise"] - outs["blur"]).max() > 10
    from fastsd.image import parse_infotext
    keys = ("Mask blur", "Inpaint area", "Masked area padding", "Masked content")
    got = {name: {k: v for k, v in parse_infotext(Image.open(tmp_path / f"{name}.png").info["parameters"])[2].items()
                  if k in keys} for name in outs}
    assert got == {"diffusers": {}, "blur": {"Mask blur": "4"},  # (A1111's keys only where its way ran)
                   "only": {"Mask blur": "4", "Inpaint area": "Only masked", "Masked area padding": "32"},
                   "noise": {"Mask blur": "4", "Masked content": "latent noise"}}
    assert main(["a cat", "--model", "random:tiny", "--masked-content", "fill", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --masked-content: A1111's inpainting options need --mask (and --init-image)"
    assert not (tmp_path / "x.png").exists()


def test_flatten_puts_rgba_over_white():
    rgba = Image.new("RGBA", (3, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    got = np.asarray(masking.flatten(rgba)).astype(int).tolist()[0]
    assert got[0] == [10, 20, 30] and got[1] == [255, 255, 255] and all(abs(v - 127) <= 1 for v in got[2])
    assert masking.flatten(Image.new("L", (1, 1), 7)).mode == "RGB"


def test_server_resize_modes():
    """img2img's resize_mode as A1111's: 1 crops and resizes, 2 resizes and fills, 3 resizes the latents (tests/
    test_inpaint_a1111.py); another value runs as 2, warned."""
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 96, 3), dtype=np.uint8))
    body = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 3, "denoising_strength": 0.25,
            "init_images": [png_b64(init)]}  # (A1111's img2img: 2 steps, from the 3rd level)
    server = main_server()
    outs = {}
    with server.client() as c:
        for mode in (0, 1, 2, 3, 7):
            r = c.post("/sdapi/v1/img2img", json={**body, "resize_mode": mode})
            assert r.status_code == 200, r.text
            outs[mode] = np.asarray(decode(r.json()["images"][0])).astype(int)
            notes = [w for w in info(r)["warnings"] if w.startswith("resize_mode")]
            assert bool(notes) == (mode == 7), notes
    for mode in (1, 2):  # (another init image: most values change, on random weights by a little)
        assert (outs[mode] != outs[0]).mean() > 0.5 and np.abs(outs[mode] - outs[0]).mean() > 0.5
    assert (outs[7] == outs[2]).all() and (outs[3] != outs[0]).any()


def _grey_mask(size, seed=4) -> Image.Image:
    """Random grey levels: any resampler other than the one asked for (or a resize to another size first) shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8))


OTHER_SIZES = [(40, 24), (96, 96), (128, 40)]  # smaller and of another aspect, larger, wider


@pytest.mark.parametrize("size", OTHER_SIZES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_prepare_resizes_a_mask_of_another_size_as_a1111(size, mode):
    """A mask whose size differs from the init image's is taken: the whole picture's mask is brought to the output
    size by A1111's resize_image(resize_mode) as the image is, the same as that mask resized by hand beforehand; for
    "only masked" it is stretched onto the init image first (A1111 fails there: its overlay's sizes differ)."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = _grey_mask(size)
    got = masking.prepare(image, mask, (64, 64), only_masked=False, padding=0, fill_content=True, resize_mode=mode)
    want = masking.prepare(image, masking.resize_image(mode, mask, 64, 64), (64, 64), only_masked=False, padding=0,
                           fill_content=True, resize_mode=mode)
    assert got.mask.size == (64, 64) and got.mask.tobytes() == want.mask.tobytes()
    assert got.image.tobytes() == want.image.tobytes() and got.overlay.tobytes() == want.overlay.tobytes()
    if size[0] != size[1]:  # (the modes differ where the aspect ratios do)
        assert got.mask.tobytes() != masking.resize_image((mode + 1) % 3, mask, 64, 64).tobytes()
    got = masking.prepare(image, mask, (64, 64), only_masked=True, padding=4, fill_content=False)
    want = masking.prepare(image, masking.resize_image(0, mask, 64, 48), (64, 64), only_masked=True, padding=4,
                           fill_content=False)
    assert (got.paste_to, got.mask.tobytes(), got.image.tobytes(), got.overlay.tobytes()) == \
        (want.paste_to, want.mask.tobytes(), want.image.tobytes(), want.overlay.tobytes())


@pytest.fixture(scope="module")
def tiny_pipe():
    import fastsd

    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


@pytest.mark.parametrize("size", OTHER_SIZES)
@pytest.mark.parametrize("gen", [(64, 48), (48, 64)], ids=["image size", "other size"])
@pytest.mark.parametrize("latent_mask", ["nearest", "bicubic"])
def test_generate_takes_a_mask_of_another_size(tiny_pipe, size, gen, latent_mask):
    """Pipeline.generate resizes a mask of another size than the init image to the generation size as the image
    (A1111's resize_image "just resize", LANCZOS): the same image as that mask resized so by hand beforehand, not as
    one stretched to the image's size first when the generation size is another."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = _grey_mask(size)
    kw = dict(steps=2, seed=1, strength=0.7, width=gen[0], height=gen[1], latent_mask=latent_mask, progress=False)
    got = tiny_pipe.generate("a cat", image=image, mask=mask, **kw)[0]
    want = tiny_pipe.generate("a cat", image=image, mask=masking.resize_image(0, mask, *gen), **kw)[0]
    assert got.size == gen and got.tobytes() == want.tobytes()
    plain = tiny_pipe.generate("a cat", image=image, **kw)[0]
    assert got.tobytes() != plain.tobytes()  # (the mask did keep parts of the image)
    if gen != image.size and latent_mask == "nearest":  # (bicubic's 8x6 latent mask of noise: often the same)
        other = tiny_pipe.generate("a cat", image=image, mask=masking.resize_image(0, mask, *image.size), **kw)[0]
        assert got.tobytes() != other.tobytes()


def test_generate_refuses_an_empty_mask(tiny_pipe):
    image = Image.new("RGB", (64, 64))
    for bad in (Image.new("L", (0, 8)), Image.new("L", (8, 0))):
        with pytest.raises(ValueError, match=rf"^mask is {bad.width}x{bad.height} pixels: an empty image$"):
            tiny_pipe.generate("a cat", image=image, mask=bad, steps=1, progress=False)


def test_cli_takes_a_mask_of_another_size(tmp_path):
    """--mask of another size than --init-image: the image of that mask resized by hand to the generation size with
    A1111's rule beforehand, on the diffusers-like path and on A1111's (--mask-blur 0: the blur would run at the
    mask's own size, as A1111's) with the whole picture or only the masked box (the mask stretched onto the image)."""
    from fastsd.generate import main

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = _grey_mask((40, 56))
    mask.save(tmp_path / "other.png")
    base = ["a cat", "--model", "random:tiny", "--steps", "2", "--seed", "1", "--no-progress", "--threads", "1",
            "--init-image", str(tmp_path / "init.png")]
    for name, extra, by_hand in (("plain", [], (64, 48)), ("whole", ["--mask-blur", "0"], (64, 48)),
                                 ("only", ["--mask-blur", "0", "--inpaint-area", "only-masked"], (64, 48)),
                                 ("resized", ["--width", "32", "--height", "40"], (32, 40))):
        masking.resize_image(0, mask, *by_hand).save(tmp_path / "by_hand.png")
        outs = []
        for m in ("other.png", "by_hand.png"):
            assert main([*base, *extra, "--mask", str(tmp_path / m), "--out", str(tmp_path / f"{name}_{m}")]) == 0
            outs.append(Image.open(tmp_path / f"{name}_{m}"))
        assert outs[0].size == outs[1].size and outs[0].tobytes() == outs[1].tobytes(), name
