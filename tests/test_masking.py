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
        for extra, edge in (({}, 4), ({"mask_blur": 0}, 0), ({"mask_blur_x": 8, "mask_blur_y": 2}, 8)):
            r = c.post("/sdapi/v1/img2img", json={**body, **extra})
            assert r.status_code == 200, r.text
            out = np.asarray(decode(r.json()["images"][0])).astype(int)
            blurred = scipy_blur(np.asarray(mask), *((edge, edge) if "mask_blur_x" not in extra else (8, 2)))
            kept = blurred == 0
            assert (out[kept] == [200, 30, 30]).all()  # untouched: the init image's own pixels, not the VAE's
            assert np.abs(out[28:36, 28:36] - [200, 30, 30]).max() > 20  # repainted inside
            assert not any("mask_blur" in w for w in info(r)["warnings"])
        r = c.post("/sdapi/v1/img2img", json={**body, "mask_blur": 65})
        assert r.status_code == 422 and "mask_blur must be 0..64" in json.dumps(r.json())
        # the 9-channel inpainting model gets the same overlay
        r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": {
            "sd_model_checkpoint": "random:tiny-inpainting"}})
        assert r.status_code == 200, r.text
        out = np.asarray(decode(r.json()["images"][0])).astype(int)
        assert (out[:8, :8] == [200, 30, 30]).all()
