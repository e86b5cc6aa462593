"""The page's "img2img options" (A1111's Settings > img2img: "With img2img, do exactly the amount of steps the slider
specifies", "Extra noise multiplier for img2img and hires fix", "Inpainting conditioning mask strength") in a real
browser (as tests/test_serve_browser.py): each field shows the server's option and goes in the request's
override_settings only when changed from it; the result's infotext says so ("Extra noise", "Conditional mask
weight"); Read parameters and Send to img2img bring those keys back; a value outside 0..1 is the browser's to refuse,
an empty field is the server's value."""
import base64
import io
import time

import numpy as np
from PIL import Image
from serve_server import main_server
from test_serve_browser import fill, generated, open_page  # (skips as that file does)
from test_serve_browser_inpaint import bodies, init_file, load_init

SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 11}
BASE = {"sd_model_checkpoint", "sd_vae"}  # what every request's override_settings has
OPTION_KEYS = {"img2img_fix_steps", "img2img_extra_noise", "inpainting_mask_weight", "img2img_color_correction"}


def img2img_page(page, tmp_path):
    open_page(page, main_server())
    page.fill("#prompt", "a green hill")
    fill(page, **SMALL)
    load_init(page, init_file(tmp_path, (64, 64)), (64, 64))
    set_strength(page, "0.5")


def set_strength(page, value: str) -> None:
    page.eval_on_selector("#strength", f"e => {{ e.value = '{value}'; e.dispatchEvent(new Event('input')); }}")


def newest_pixels(page) -> np.ndarray:
    src = page.get_attribute("#gallery figure:first-child img", "src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def option_fields(page) -> tuple:
    return (page.is_checked("#fix-steps"), page.input_value("#extra-noise"), page.input_value("#mask-weight"))


def test_defaults_send_nothing_new(page, tmp_path):
    img2img_page(page, tmp_path)
    sent = bodies(page)
    assert option_fields(page) == (False, "0", "1")  # the server's options (A1111's defaults)
    assert page.is_enabled("#extra-noise") and page.is_visible("#options-set")
    page.click("#generate")
    params = generated(page)
    assert set(sent[-1]["override_settings"]) == BASE
    assert "Extra noise" not in params and "Conditional mask weight" not in params  # (a 4-channel model)
    assert params["Denoising strength"] == "0.5" and page.is_hidden("#error")
    # a field changed and put back: still nothing; an empty field is the server's value (and shows it)
    page.fill("#extra-noise", "0.2")
    page.fill("#extra-noise", "0")
    page.check("#fix-steps")
    page.uncheck("#fix-steps")
    page.fill("#mask-weight", "")
    page.click("#generate")
    generated(page, 2)
    assert set(sent[-1]["override_settings"]) == BASE and page.input_value("#mask-weight") == "1"
    # txt2img sends none either
    txt = bodies(page, "/txt2img")
    page.click("#init-clear")
    page.click("#generate")
    generated(page, 3)
    assert set(txt[-1]["override_settings"]) == BASE


def test_each_option_changes_the_request_and_the_result(page, tmp_path):
    img2img_page(page, tmp_path)
    sent = bodies(page)
    page.click("#generate")  # the reference: the server's options
    generated(page)
    plain = newest_pixels(page)
    page.click("#generate")  # the same request again: the same image (so a difference below is the option's)
    generated(page, 2)
    assert (newest_pixels(page) == plain).all()
    # Exact steps: all 2 steps run, at the end of a schedule of 4 (no infotext key, as A1111)
    page.check("#fix-steps")
    page.click("#generate")
    params = generated(page, 3)
    assert {k: v for k, v in sent[-1]["override_settings"].items() if k not in BASE} == {"img2img_fix_steps": True}
    assert params["Steps"] == "2" and "Extra noise" not in params
    assert (newest_pixels(page) != plain).any()
    page.uncheck("#fix-steps")
    # Extra noise
    page.fill("#extra-noise", "0.3")
    page.click("#generate")
    params = generated(page, 4)
    assert {k: v for k, v in sent[-1]["override_settings"].items() if k not in BASE} == {"img2img_extra_noise": 0.3}
    assert params["Extra noise"] == "0.3" and "Conditional mask weight" not in params
    assert (newest_pixels(page) != plain).any()
    # Mask weight, on the inpainting model (written on each of its images; 1.0 is the server's option)
    page.select_option("#model", label="random:tiny-inpainting")
    page.fill("#extra-noise", "0")
    page.click("#generate")
    params = generated(page, 5)
    assert set(sent[-1]["override_settings"]) == BASE and params["Conditional mask weight"] == "1.0"
    weighted = newest_pixels(page)
    page.fill("#mask-weight", "0.4")
    page.click("#generate")
    params = generated(page, 6)
    assert {k: v for k, v in sent[-1]["override_settings"].items() if k not in BASE} == {"inpainting_mask_weight": 0.4}
    assert params["Conditional mask weight"] == "0.4" and "Extra noise" not in params
    assert (newest_pixels(page) != weighted).any()
    assert page.is_hidden("#error")


def test_color_correction_checkbox(page, tmp_path):
    """A1111's "Apply color correction to img2img results to match original colors": off as the server's option;
    checked, it goes in override_settings and changes the image (no infotext key, as A1111's)."""
    img2img_page(page, tmp_path)
    sent = bodies(page)
    assert not page.is_checked("#color-correction")
    page.click("#generate")
    generated(page)
    plain = newest_pixels(page)
    assert set(sent[-1]["override_settings"]) == BASE
    page.check("#color-correction")
    page.click("#generate")
    params = generated(page, 2)
    assert {k: v for k, v in sent[-1]["override_settings"].items() if k not in BASE} == {
        "img2img_color_correction": True}
    assert not any("olor" in k for k in params) and (newest_pixels(page) != plain).any()
    assert page.is_hidden("#error")


def test_infotext_brings_the_options_back(page, tmp_path):
    img2img_page(page, tmp_path)
    sent = bodies(page)
    page.select_option("#model", label="random:tiny-inpainting")
    fill(page, extra_noise="0.15", mask_weight="0.7")
    page.click("#generate")
    params = generated(page)
    assert (params["Extra noise"], params["Conditional mask weight"]) == ("0.15", "0.7")
    fill(page, extra_noise="0", mask_weight="1")
    page.click("#gallery figure:first-child .send")  # A1111's Send to img2img: the image's infotext into the fields
    assert option_fields(page) == (False, "0.15", "0.7")
    page.click("#generate")
    generated(page, 2)
    assert {k: v for k, v in sent[-1]["override_settings"].items() if k not in BASE} == {
        "img2img_extra_noise": 0.15, "inpainting_mask_weight": 0.7}
    # ↙ Read parameters: a pasted infotext's keys; one without them leaves the fields as they are (A1111's paste)
    page.fill("#prompt", "a pond\nSteps: 3, Sampler: Euler, Seed: 7, Size: 64x64, Extra noise: 0.25, "
                         "Conditional mask weight: 0.6")
    page.click("#read-params")
    assert option_fields(page) == (False, "0.25", "0.6") and page.input_value("#steps") == "3"
    page.fill("#prompt", "a pond\nSteps: 4, Sampler: Euler, Seed: 8, Size: 64x64")
    page.click("#read-params")
    assert option_fields(page) == (False, "0.25", "0.6") and page.input_value("#steps") == "4"


def test_values_outside_0_to_1_are_refused_by_the_browser(page, tmp_path):
    img2img_page(page, tmp_path)
    sent = bodies(page)
    for field, value, flaw in (("#extra-noise", "1.5", "rangeOverflow"), ("#mask-weight", "-0.1", "rangeUnderflow")):
        page.fill(field, value)
        page.click("#generate")  # the browser's own check stops the form: nothing is sent
        time.sleep(0.3)
        assert sent == [] and page.eval_on_selector(field, f"e => e.validity.{flaw}")
        assert page.eval_on_selector(field, "e => document.activeElement === e")  # it points at the field
        page.fill(field, "")  # empty: the server's value
    page.click("#generate")
    generated(page)
    assert set(sent[-1]["override_settings"]) == BASE and option_fields(page) == (False, "0", "1")
    assert page.is_hidden("#error")


def test_the_fields_show_the_servers_options(page, tmp_path):
    """Options the server has (POST /sdapi/v1/options) are the fields' values, sent only when changed."""
    server = main_server()
    with server.client() as c:
        assert c.post("/sdapi/v1/options", json={"img2img_extra_noise": 0.2, "img2img_fix_steps": True}).status_code \
            == 200
        try:
            img2img_page(page, tmp_path)
            sent = bodies(page)
            assert option_fields(page) == (True, "0.2", "1")
            page.click("#generate")
            params = generated(page)
            assert set(sent[-1]["override_settings"]) == BASE and params["Extra noise"] == "0.2"
            page.fill("#extra-noise", "0")
            page.uncheck("#fix-steps")
            page.click("#generate")
            params = generated(page, 2)
            assert {k: v for k, v in sent[-1]["override_settings"].items() if k not in BASE} == {
                "img2img_extra_noise": 0, "img2img_fix_steps": False}
            assert "Extra noise" not in params
        finally:
            c.post("/sdapi/v1/options", json={"img2img_extra_noise": 0.0, "img2img_fix_steps": False})
        assert {k: c.get("/sdapi/v1/options").json()[k] for k in OPTION_KEYS} == {
            "img2img_fix_steps": False, "img2img_extra_noise": 0.0, "inpainting_mask_weight": 1.0,
            "img2img_color_correction": False}
