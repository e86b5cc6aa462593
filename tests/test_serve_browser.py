"""The page at / in a real browser: Debian's Chromium (installed by .ci/run when missing; never a browser
download), driven by Playwright's Python API. It types a prompt, clicks Generate, sees the progress bar move
with a live preview and an image with its infotext appear; the screenshot is kept as a test artifact."""
import os
import shutil

import pytest
from PIL import Image
from serve_server import auth_server, main_server, vae_server

from fastsd.image import parse_infotext

CHROMIUM = os.environ.get("FASTSD_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                               "(pip install -e '.[test]')")
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


def test_page_generates_an_image_with_progress(page, tmp_path):
    server = main_server()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 3")
    assert page.locator("#lora option").all_inner_texts() == ["(none)", "detail", "style"]
    page.fill("#prompt", "a red fox in the snow")
    page.fill("#negative", "blurry")
    page.select_option("#sampler", "DPM++ 2M")
    assert page.locator("#scheduler option").all_inner_texts()[:3] == ["Automatic", "Uniform", "Karras"]
    page.select_option("#scheduler", "Align Your Steps")
    # long enough for the page's 4 polls a second to see the bar move on a fast CPU
    for field, value in (("#steps", "24"), ("#seed", "1234"), ("#width", "128"), ("#height", "128")):
        page.fill(field, value)
    page.click("#generate")
    # the bar moves: a value strictly between 0 and 1 is shown while the job runs, with a live preview
    page.wait_for_function("window.fastsdProgressSeen.some(v => v > 0 && v < 1)", timeout=120_000)
    assert page.locator("#preview").get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_selector("#gallery figure img", timeout=180_000)
    seen = page.evaluate("window.fastsdProgressSeen")
    assert len({round(v, 3) for v in seen if 0 < v < 1}) >= 2, seen  # it moved, not only jumped to the end
    assert page.eval_on_selector("#progress", "e => e.value") == 1
    text = page.inner_text("#gallery .infotext")
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative, params["Seed"], params["Sampler"], params["Schedule type"]) == (
        "a red fox in the snow", "blurry", "1234", "DPM++ 2M", "Align Your Steps")
    link = page.locator("#gallery a[download]")
    assert link.get_attribute("download") == "00000-1234.png"
    assert link.get_attribute("href").startswith("data:image/png;base64,")
    assert page.eval_on_selector("#gallery figure img", "img => img.naturalWidth") == 128
    assert page.locator("#error").is_hidden()
    outside = [u for u in requests if not u.startswith((server.url, "data:"))]
    assert outside == []  # everything the page loads comes from the server
    shot = str(tmp_path / "serve-page.png")
    page.screenshot(path=shot, full_page=True)
    print(f"screenshot: {shot}")
    if os.environ.get("FASTSD_SCREENSHOT"):  # e.g. FASTSD_SCREENSHOT=docs/serve.png refreshes README's picture
        shutil.copy(shot, os.environ["FASTSD_SCREENSHOT"])


def test_page_img2img_upload(page, tmp_path):
    server = main_server()
    Image.new("RGB", (96, 80), (30, 120, 220)).save(tmp_path / "init.png")
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 3")
    page.fill("#prompt", "a blue sky")
    for field, value in (("#steps", "4"), ("#seed", "99"), ("#width", "64"), ("#height", "64")):
        page.fill(field, value)
    page.set_input_files("#init-image", str(tmp_path / "init.png"))
    page.wait_for_selector("#init-preview:not([hidden])")
    page.eval_on_selector("#strength", "e => { e.value = '0.5'; e.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#strength-value") == "0.5"
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=180_000)
    params = parse_infotext(page.inner_text("#gallery .infotext"))[2]
    assert params["Denoising strength"] == "0.5" and params["Seed"] == "99" and params["Size"] == "64x64"


def test_page_hires_fix(page):
    server = main_server()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 3")
    page.fill("#prompt", "a lighthouse")
    for field, value in (("#steps", "2"), ("#seed", "7"), ("#width", "64"), ("#height", "48"), ("#hr-scale", "1.5"),
                         ("#hr-steps", "2"), ("#hr-strength", "0.6")):
        page.fill(field, value)
    page.check("#hires")
    page.select_option("#hr-upscaler", "Latent (bicubic)")
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=180_000)
    params = parse_infotext(page.inner_text("#gallery .infotext"))[2]
    assert (params["Size"], params["Hires upscale"], params["Hires steps"], params["Hires upscaler"],
            params["Denoising strength"]) == ("64x48", "1.5", "2", "Latent (bicubic)", "0.6")
    assert page.eval_on_selector("#gallery figure img", "img => [img.naturalWidth, img.naturalHeight]") == [96, 72]
    assert "Hires checkpoint" not in params  # ("Use same checkpoint")
    # A1111's "Hires checkpoint": the server's other model for the second pass
    assert page.locator("#hr-checkpoint option").all_inner_texts() == ["Use same checkpoint", "random:tiny",
                                                                       "random:tiny-inpainting"]
    page.select_option("#hr-checkpoint", "random:tiny-inpainting")
    page.click("#generate")
    page.wait_for_selector("#gallery figure:nth-child(2) img", timeout=180_000)
    params = parse_infotext(page.inner_text("#gallery figure:first-child .infotext"))[2]
    assert params["Hires checkpoint"] == "random:tiny-inpainting" and params["Model"] == "random:tiny"


def test_page_vae_select(page):
    """The header's VAE select: A1111's Automatic and None, then --vae-dir's files; the chosen one runs (its name in
    the infotext, as A1111 writes it)."""
    server = vae_server()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#vae option').length > 2")
    assert page.locator("#vae option").all_inner_texts() == ["Automatic", "None", "vae-ft-mse.safetensors"]
    assert page.eval_on_selector("#vae", "e => e.value") == "Automatic"  # the server's sd_vae option
    page.fill("#prompt", "a boat")
    for field, value in (("#steps", "2"), ("#seed", "5"), ("#width", "64"), ("#height", "64")):
        page.fill(field, value)
    page.select_option("#vae", "vae-ft-mse.safetensors")
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=180_000)
    assert parse_infotext(page.inner_text("#gallery .infotext"))[2]["VAE"] == "vae-ft-mse.safetensors"


def test_page_shows_a_refused_request(page):
    server = main_server()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 3")
    page.fill("#prompt", "a cat")
    page.fill("#width", "100000")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "422: width 100000 is above this server's limit of 2048" in page.inner_text("#error")


def test_page_asks_for_credentials_on_a_server_with_api_auth(page):
    server = auth_server()
    page.goto(server.url + "/")
    page.wait_for_selector("#auth-row:not([hidden])")  # the API answered 401: the page asks
    assert "401: authentication required" in page.inner_text("#error")
    page.fill("#auth", "alice:s3cret")
    page.dispatch_event("#auth", "change")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 3")
    assert page.locator("#model option").all_inner_texts() == ["random:tiny"]
    assert page.locator("#error").is_hidden()
