"""A1111's img2img_color_correction ("Apply color correction to img2img results to match original colors").

A1111 (modules/processing.py): setup_color_correction(image) = cv2.cvtColor(np.asarray(image), COLOR_RGB2LAB) of each
init image after its resize, "only masked" crop and fill (StableDiffusionProcessingImg2Img.init); each decoded result
(process_images_inner, before apply_overlay) becomes
    image = Image.fromarray(cv2.cvtColor(exposure.match_histograms(cv2.cvtColor(np.asarray(result), RGB2LAB),
                                                                   correction, channel_axis=2), LAB2RGB))
    blendLayers(image, result, BlendType.LUMINOSITY).convert("RGB")   # blendmodes 2022: the corrected is the
                                                                        # background, its output truncated to 8 bits
and the infotext has no key for it. The oracles here are those libraries themselves (the test extra installs them):
OpenCV's conversions are checked over every 8-bit input, skimage's histogram matching and blendmodes' blend on random
images of odd and unequal sizes; blendmodes' `luminosity` is the float blend of both its 2022 (A1111's pin) and later
versions, the 2022 version's output being np.clip(., 0, 1) * 255 truncated."""
import numpy as np
import pytest
from PIL import Image
from serve_server import decode, info, main_server, png_b64
from test_img2img_options import KW
from test_inpaint_mask_weight import _cli_main, _noise_image

from fastsd import color_correction as cc
from fastsd.image import parse_infotext
from fastsd.masking import resize_image

RNG = np.random.default_rng(37)


@pytest.fixture(scope="module")
def tiny():
    import fastsd

    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


def _cv2():
    return pytest.importorskip("cv2")


def _pictures(n: int):
    """`n` pairs of random uint8 RGB arrays of odd, unequal sizes; every third one of few distinct values (a
    posterised picture: histograms with gaps) and one nearly flat (a single value in a channel)."""
    out = []
    for k in range(n):
        (h, w), (h2, w2) = RNG.integers(1, 60, 2), RNG.integers(1, 60, 2)
        a = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
        b = RNG.integers(0, 256, (h2, w2, 3), dtype=np.uint8)
        if k % 3 == 0:
            a = a // 64 * 64
        if k == 1:
            b[..., 2] = 77
        out.append((a, b))
    return out


# ---- the math against OpenCV, scikit-image and blendmodes --------------------------------------------------------

@pytest.mark.parametrize("code,ours", [("COLOR_RGB2LAB", cc.rgb_to_lab), ("COLOR_LAB2RGB", cc.lab_to_rgb)])
def test_lab_conversions_are_opencvs_for_every_8bit_input(code, ours):
    """All 2**24 inputs, in slices: the same bytes as cv2.cvtColor (its fixed-point tables, cube root and rounding)."""
    cv2 = _cv2()
    every = np.arange(1 << 24, dtype=np.uint32)
    for k in range(16):
        v = every[k << 20:(k + 1) << 20]
        px = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(1024, 1024, 3)
        got, want = ours(px), cv2.cvtColor(px, getattr(cv2, code))
        assert got.dtype == np.uint8 and np.array_equal(got, want), np.argwhere((got != want).any(-1))[:3]


def test_lab_known_colours():
    """Without OpenCV too: black, white and mid grey (L * 255 / 100, a and b + 128), and back."""
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [119, 119, 119]]], np.uint8)
    assert cc.rgb_to_lab(rgb).tolist() == [[[0, 128, 128], [255, 128, 128], [128, 128, 128]]]
    assert np.array_equal(cc.lab_to_rgb(cc.rgb_to_lab(rgb)), rgb)


def test_match_histograms_is_skimages():
    exposure = pytest.importorskip("skimage.exposure")
    for a, b in _pictures(12):
        want = exposure.match_histograms(a, b, channel_axis=2)
        assert want.dtype == np.uint8 and np.array_equal(cc.match_histograms(a, b), want), (a.shape, b.shape)


def test_match_histograms_to_itself_is_the_identity():
    """Without skimage too: each value's quantile is a knot of the interpolation, so nothing moves; a constant
    reference makes every value that constant."""
    a, b = _pictures(1)[0]
    assert np.array_equal(cc.match_histograms(a, a), a)
    assert (cc.match_histograms(a, np.full_like(b, 9)) == 9).all()


def _a1111_blend(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """blendmodes 2022's blendLayers(bg, fg, LUMINOSITY) of opaque RGB: its float blend (`luminosity`, the same in
    later versions), clipped to [0, 1], times 255, truncated (imageFloatToInt)."""
    blend = pytest.importorskip("blendmodes.blend")
    return (np.clip(blend.luminosity(background / 255, foreground / 255), 0, 1) * 255).astype(np.uint8)


def test_luminosity_blend_is_blendmodes():
    """Saturated colours under bright and dark ones take both of the ClipColor branches (below 0, above 1); the
    installed blendLayers is within 1 of it (blendmodes after 2022 rounds where 2022 truncates), or equal."""
    blend = pytest.importorskip("blendmodes.blend")
    branches = np.zeros(2, int)
    for bg, fg in _pictures(8):
        bg = np.resize(bg, fg.shape).astype(np.uint8)
        bg[::3] = [255, 0, 0]  # (pure red under the foreground's luminosity: a channel leaves [0, 1])
        got = cc.luminosity_blend(bg, fg)
        assert np.array_equal(got, _a1111_blend(bg, fg))
        shifted = bg / 255 + (cc._lum(fg / 255) - cc._lum(bg / 255))[..., None]
        branches += [(shifted.min(-1) < 0).sum(), (shifted.max(-1) > 1).sum()]
        layers = blend.blendLayers(Image.fromarray(bg), Image.fromarray(fg), blend.BlendType.LUMINOSITY)
        assert np.abs(np.asarray(layers.convert("RGB")).astype(int) - got).max() <= 1
    assert (branches > 0).all(), branches


def _a1111_correction(init: np.ndarray, result: np.ndarray) -> np.ndarray:
    """A1111's setup_color_correction + apply_color_correction, run with the libraries."""
    cv2, exposure = _cv2(), pytest.importorskip("skimage.exposure")
    target = cv2.cvtColor(init, cv2.COLOR_RGB2LAB)
    lab = exposure.match_histograms(cv2.cvtColor(result, cv2.COLOR_RGB2LAB), target, channel_axis=2)
    return _a1111_blend(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype("uint8"), result)


def test_correction_is_a1111s():
    """The whole correction, an init image of another size than the result too (A1111's resize_mode 3)."""
    for init, result in _pictures(10):
        got = cc.apply_correction(cc.correction_target(Image.fromarray(init)), Image.fromarray(result))
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), _a1111_correction(init, result))


# ---- Pipeline.generate ----------------------------------------------------------------------------------------

def _gradient(size=(64, 64)) -> Image.Image:
    """A smooth warm picture: colours the random model's output is far from."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([200 + 55 * x / w, 120 + 60 * y / h, 40 + 0 * x], -1)
    return Image.fromarray(a.astype(np.uint8))


def _corrected(init: Image.Image, result: Image.Image) -> np.ndarray:
    return np.asarray(cc.apply_correction(cc.correction_target(init), result))


def test_off_by_default_and_in_txt2img(tiny, monkeypatch):
    """Off (the default): no correction runs, the images are as before; on in txt2img: nothing either (A1111 sets up
    corrections in img2img only)."""
    def refuse(*_):
        raise AssertionError("colour correction ran")

    monkeypatch.setattr(cc, "apply_correction", refuse)
    default = tiny.generate("a cat", image=_gradient(), steps=2, **KW)[0]
    off = tiny.generate("a cat", image=_gradient(), steps=2, img2img_color_correction=False, **KW)[0]
    assert default.tobytes() == off.tobytes()
    t2i = tiny.generate("a cat", steps=2, img2img_color_correction=True, **KW)[0]
    assert t2i.tobytes() == tiny.generate("a cat", steps=2, **KW)[0].tobytes()


def test_img2img_result_is_corrected_toward_its_init_image(tiny):
    """Each result is A1111's correction of the uncorrected result toward the init image; the infotext is the same
    (no key, as A1111's); the colours move toward the init image's."""
    init = _gradient()
    off, off2 = tiny.generate("a cat", image=init, steps=2, num_images=2, **KW)
    on, on2 = tiny.generate("a cat", image=init, steps=2, num_images=2, img2img_color_correction=True, **KW)
    assert np.array_equal(np.asarray(on), _corrected(init, off))
    assert np.array_equal(np.asarray(on2), _corrected(init, off2))
    assert on.info["parameters"] == off.info["parameters"]
    mean = np.asarray(init, float).mean((0, 1))
    assert np.abs(np.asarray(on, float).mean((0, 1)) - mean).sum() < np.abs(np.asarray(off, float).mean((0, 1))
                                                                             - mean).sum()


def test_each_init_image_corrects_its_own_result(tiny):
    """A1111's init_images: result i toward init image i."""
    inits = [_gradient(), _noise_image()]
    off = tiny.generate("a cat", image=inits, steps=2, num_images=2, **KW)
    on = tiny.generate("a cat", image=inits, steps=2, num_images=2, img2img_color_correction=True, **KW)
    for init, a, b in zip(inits, off, on):
        assert np.array_equal(np.asarray(b), _corrected(init, a))
    assert not np.array_equal(np.asarray(on[1]), _corrected(inits[0], off[1]))


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_target_is_the_init_image_as_the_model_gets_it(tiny, mode):
    """An init image of another size: the target is it brought to the generation size by resize_mode (A1111's
    resize_image), or at its own size for mode 3 (A1111 resizes the latents, not the picture)."""
    init = _gradient((96, 48))
    kw = dict(image=init, steps=2, width=64, height=64, resize_mode=mode, seed=5, progress=False)
    off = tiny.generate("a cat", **kw)[0]
    on = tiny.generate("a cat", img2img_color_correction=True, **kw)[0]
    seen = init if mode == 3 else resize_image(mode, init, 64, 64)
    assert np.array_equal(np.asarray(on), _corrected(seen, off))
    other = resize_image(0 if mode else 1, init, 64, 64)
    assert not np.array_equal(np.asarray(on), _corrected(other, off))


@pytest.mark.parametrize("value,exc,match", [
    ("yes", TypeError, "img2img_color_correction must be True or False, got 'yes'"),
    (1, TypeError, "img2img_color_correction must be True or False, got 1"),
    (None, TypeError, "img2img_color_correction must be True or False, got None"),
])
def test_bad_values_are_one_line_errors(tiny, value, exc, match):
    with pytest.raises(exc, match=match) as e:
        tiny.generate("a cat", image=_gradient(), steps=2, img2img_color_correction=value, **KW)
    assert "\n" not in str(e.value)


def test_numpy_bool_is_taken(tiny):
    a = tiny.generate("a cat", image=_gradient(), steps=2, img2img_color_correction=np.bool_(True), **KW)[0]
    b = tiny.generate("a cat", image=_gradient(), steps=2, img2img_color_correction=True, **KW)[0]
    assert a.tobytes() == b.tobytes()


# ---- the CLI, the server, batch jobs --------------------------------------------------------------------------

def test_cli_option(tmp_path, tiny):
    """--img2img-color-correction makes Pipeline.generate's corrected image; the infotext has no key for it, so
    --infotext of that PNG runs uncorrected (as A1111's paste)."""
    _gradient().save(tmp_path / "in.png")
    args = ["--model", "random:tiny", "--dtype", "fp32", "--backend", "torch", "--steps", "2", "--seed", "5",
            "--no-progress", "--init-image", str(tmp_path / "in.png")]
    assert _cli_main(["a cat", *args, "--img2img-color-correction", "--out", str(tmp_path / "a.png")]) == 0
    want = tiny.generate("a cat", image=_gradient(), steps=2, img2img_color_correction=True, **KW)[0]
    plain = tiny.generate("a cat", image=_gradient(), steps=2, **KW)[0]
    with Image.open(tmp_path / "a.png") as a:
        text = a.text["parameters"]
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(want))
    assert not any("color" in k.lower() or "colour" in k.lower() for k in parse_infotext(text)[2])
    assert _cli_main([*args, "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    with Image.open(tmp_path / "b.png") as b:
        assert np.array_equal(np.asarray(b.convert("RGB")), np.asarray(plain))


def _mask() -> Image.Image:
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


def test_server_option_and_override_settings():
    """GET /sdapi/v1/options has it (False); override_settings turns it on for one request (the image is the
    uncorrected one corrected; the option is back after), POST /sdapi/v1/options for later ones; txt2img ignores it;
    inpainting corrects before the overlay (A1111's order: the unmasked pixels stay the init image's); a bad value is
    a 422 naming it."""
    init = _gradient()
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "denoising_strength": 0.6,
            "init_images": [png_b64(init)]}

    def run(c, path="img2img", **over):
        r = c.post(f"/sdapi/v1/{path}", json={**body, **over})
        assert r.status_code == 200, r.text
        return decode(r.json()["images"][0]).convert("RGB"), info(r)["infotexts"][0]

    on = {"override_settings": {"img2img_color_correction": True}}
    with main_server().client(timeout=300) as c:
        assert c.get("/sdapi/v1/options").json()["img2img_color_correction"] is False
        (off, text), (got, text_on) = run(c), run(c, **on)
        assert np.array_equal(np.asarray(got), _corrected(init, off)) and text_on == text
        assert run(c)[0].tobytes() == off.tobytes()
        assert run(c, "txt2img", **on)[0].tobytes() == run(c, "txt2img")[0].tobytes()
        masked = {"mask": png_b64(_mask()), "mask_blur": 0}
        for full_res in (True, False):
            plain = run(c, **masked, inpaint_full_res=full_res)[0]
            fixed = run(c, **masked, **on, inpaint_full_res=full_res)[0]
            keep = np.asarray(_mask()) == 0
            assert np.array_equal(np.asarray(fixed)[keep], np.asarray(init)[keep])
            assert np.array_equal(np.asarray(plain)[keep], np.asarray(init)[keep])
            assert not np.array_equal(np.asarray(fixed)[~keep], np.asarray(plain)[~keep])
        r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": {"img2img_color_correction": "yes"}})
        assert r.status_code == 422 and "img2img_color_correction must be True or False" in r.text, r.text
        try:
            r = c.post("/sdapi/v1/options", json={"img2img_color_correction": True})
            assert r.status_code == 200 and r.json()["applied"] == {"img2img_color_correction": True}, r.text
            assert run(c)[0].tobytes() == got.tobytes()
        finally:
            c.post("/sdapi/v1/options", json={"img2img_color_correction": False})
        assert c.get("/sdapi/v1/options").json()["img2img_color_correction"] is False


def test_batch_field_and_option(tmp_path):
    """A batch job's img2img_color_correction field, and --img2img-color-correction for jobs without one: the
    option's job is the explicit one's image, the corrected uncorrected one; the manifest records it only when on
    (other jobs' ids stay as they were); an img2img field, so a txt2img job with it fails alone, as a bad value."""
    from fastsd.batch import Defaults, run

    init = _gradient()
    init.save(tmp_path / "in.png")
    job = {"prompt": "a cat", "seed": 1, "init_image": str(tmp_path / "in.png"), "strength": 0.6}
    fields = {"option": {}, "same": {"img2img_color_correction": True}, "off": {"img2img_color_correction": False}}
    jobs = [{**job, "id": k, **f} for k, f in fields.items()]
    out = str(tmp_path / "out")
    rows = run([*jobs, {"prompt": "a cat", "id": "t2i", "img2img_color_correction": True},
                {**job, "id": "bad", "img2img_color_correction": "maybe"}], out=out, model="random:tiny", threads=1,
               progress=False, dtype="fp32", backend="torch",
               defaults=Defaults(steps=2, width=64, height=64, img2img_color_correction=True))
    assert "img2img_color_correction: an img2img field" in rows[-2]["error"], rows[-2]
    assert "img2img_color_correction" in rows[-1]["error"] and "\n" not in rows[-1]["error"], rows[-1]
    got = {}
    for row, job_id in zip(rows, fields):
        with Image.open(f"{out}/{row['file']}") as im:
            got[job_id] = im.convert("RGB")
        assert row["settings"].get("img2img_color_correction") == (True if job_id != "off" else None), row
    assert got["option"].tobytes() == got["same"].tobytes()
    assert np.array_equal(np.asarray(got["same"]), _corrected(init, got["off"]))
