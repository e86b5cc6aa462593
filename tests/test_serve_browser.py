"""The page at / in a real browser: Debian's Chromium (installed by .ci/run when missing; never a browser
download), driven by Playwright's Python API. It types a prompt, clicks Generate, sees the progress bar move
with a live preview and an image with its infotext appear; the screenshot is kept as a test artifact."""
import json
import os
import shutil
import threading
import time

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


# the page's progress bar values, as the page sets them (a test's own recorder: the page keeps none)
RECORD_PROGRESS = """() => { window.seen = [];
  new MutationObserver(() => window.seen.push(document.getElementById('progress').value))
    .observe(document.getElementById('progress'), {attributes: true, attributeFilter: ['value']}); }"""


def open_page(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector("#generate:not([disabled])")  # the server's lists are loaded


def fill(page, **fields):
    for field, value in fields.items():
        page.fill("#" + field.replace("_", "-"), str(value))


def another_clients_job(server, **body) -> tuple[threading.Thread, dict]:
    """Another client's long txt2img (150 steps, 8 iterations) in a thread, returned once it samples: (the thread,
    {"r": its response once answered})."""
    out = {}

    def post():
        with server.client() as c:
            out["r"] = c.post("/sdapi/v1/txt2img", json={"prompt": "another client's job", "steps": 150, "n_iter": 8,
                                                         "seed": 1, **body})

    other = threading.Thread(target=post, daemon=True)
    other.start()
    with server.client() as c:
        deadline = time.monotonic() + 120
        while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline and other.is_alive()
            time.sleep(0.05)
    return other, out


def generated(page, figures: int = 1) -> dict:
    """The infotext parameters of the newest image, once `figures` are in the gallery."""
    page.wait_for_selector(f"#gallery figure:nth-child({figures}) img", timeout=180_000)
    return parse_infotext(page.inner_text("#gallery figure:first-child .infotext"))[2]


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
    page.evaluate(RECORD_PROGRESS)
    page.click("#generate")
    # the bar moves: a value strictly between 0 and 1 is shown while the job runs, with a live preview
    page.wait_for_function("window.seen.some(v => v > 0 && v < 1)", timeout=120_000)
    assert page.locator("#preview").get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_selector("#gallery figure img", timeout=180_000)
    seen = page.evaluate("window.seen")
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
    page.check("#hires")
    assert page.inner_text("#generate") == "Generate (txt2img)" and page.is_enabled("#hr-scale")
    page.set_input_files("#init-image", str(tmp_path / "init.png"))
    page.wait_for_selector("#init-preview:not([hidden])")
    # hires fix is txt2img's: off, with a note, while an init image is loaded; the button says which runs
    assert page.inner_text("#generate") == "Generate (img2img)"
    assert page.is_disabled("#hires") and page.is_disabled("#hr-scale") and page.is_visible("#hires-note")
    page.eval_on_selector("#strength", "e => { e.value = '0.5'; e.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#strength-value") == "0.5"
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=180_000)
    params = parse_infotext(page.inner_text("#gallery .infotext"))[2]
    assert params["Denoising strength"] == "0.5" and params["Seed"] == "99" and params["Size"] == "64x64"
    assert "Hires upscale" not in params
    page.click("#init-clear")
    assert page.inner_text("#generate") == "Generate (txt2img)"
    assert page.is_enabled("#hires") and page.is_enabled("#hr-scale") and page.is_hidden("#hires-note")


def test_page_hires_fix(page):
    server = main_server()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 3")
    page.fill("#prompt", "a lighthouse")
    assert page.is_disabled("#hr-scale")  # the hires inputs wait for the box
    page.check("#hires")
    for field, value in (("#steps", "2"), ("#seed", "7"), ("#width", "64"), ("#height", "48"), ("#hr-scale", "1.5"),
                         ("#hr-steps", "2"), ("#hr-strength", "0.6")):
        page.fill(field, value)
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
    generations = []
    page.on("request", lambda r: generations.append(r.url) if "/txt2img" in r.url else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#auth-row:not([hidden])")  # the API answered 401: the page asks
    assert "401: authentication required" in page.inner_text("#error")
    assert page.is_disabled("#generate")  # until the server's lists are loaded
    page.fill("#auth", "alice:s3cret")
    page.press("#auth", "Enter")  # loads the lists; submits nothing (the field is not in the form)
    page.wait_for_selector("#generate:not([disabled])")
    samplers = page.locator("#sampler option").count()
    assert samplers > 3 and page.locator("#model option").all_inner_texts() == ["random:tiny"]
    assert page.locator("#error").is_hidden()
    page.fill("#auth", "tok123")  # other credentials: every list refilled, not appended to
    page.dispatch_event("#auth", "change")
    page.wait_for_selector("#generate:not([disabled])")
    assert page.locator("#sampler option").count() == samplers
    assert page.locator("#model option").all_inner_texts() == ["random:tiny"]
    assert page.locator("#vae option").all_inner_texts() == ["Automatic", "None"]
    assert page.locator("#lora option").all_inner_texts() == ["(none)"]
    assert page.locator("#hr-checkpoint option").all_inner_texts() == ["Use same checkpoint", "random:tiny"]
    assert generations == []


def test_page_follows_its_own_job_behind_another_clients(page):
    """Another client's job runs: the page's job waits ("waiting: 1 job ahead") without showing the other job's
    progress or preview, and its Skip stays off; then its own job runs with its own progress, Esc interrupts
    it. Leaving the page while its job is under way asks first (leaving cancels the job)."""
    server = main_server()
    tab = page
    open_page(tab, server)
    tab.evaluate(RECORD_PROGRESS)
    other, out = another_clients_job(server, width=128, height=128)
    with server.client() as c:
        tab.fill("#prompt", "my own job")
        fill(tab, steps=150, seed=3, width=64, height=64, batch=2)
        tab.click("#generate")
        tab.wait_for_function("document.getElementById('status').textContent === 'waiting: 1 job ahead'")
        time.sleep(0.6)  # a few more polls: still only its own (waiting) job
        assert tab.inner_text("#status") == "waiting: 1 job ahead"
        assert tab.is_hidden("#preview") and tab.evaluate("window.seen") == [0]
        # waiting: Interrupt would cancel it (tests/test_serve_browser_a1111.py), Skip has nothing to skip
        assert tab.is_enabled("#interrupt") and tab.is_disabled("#skip")
        assert tab.evaluate("() => { const e = new Event('beforeunload', {cancelable: true}); dispatchEvent(e);"
                            " return e.defaultPrevented; }")  # leaving now would drop the job: the browser asks
        assert c.get("/sdapi/v1/progress").json()["state"]["job"] == "Batch 1 out of 8"  # the other job runs on
        c.post("/sdapi/v1/interrupt")  # (the other client's)
        other.join(60)
    tab.wait_for_selector("#interrupt:not([disabled])", timeout=120_000)  # its own job runs
    tab.wait_for_function("window.seen.some(v => v > 0 && v < 1)", timeout=60_000)
    assert tab.inner_text("#status").startswith("step ") and tab.is_visible("#preview")
    tab.keyboard.press("Escape")  # A1111's key: interrupts the page's own job
    params = generated(tab)
    assert tab.inner_text("#status") == "interrupted" and params["Seed"] == "3"
    assert "interrupted at step" in tab.inner_text("#note") and tab.is_hidden("#error")
    assert tab.is_disabled("#interrupt") and json.loads(out["r"].json()["info"])["interrupted"] is True
    assert not tab.evaluate("() => { const e = new Event('beforeunload', {cancelable: true}); dispatchEvent(e);"
                            " return e.defaultPrevented; }")  # nothing under way: leaving is quiet


def test_page_number_fields_never_block_or_send_zero(page):
    """LoRA weight 0.75, hires denoising 0.33 and upscale 1.33 are accepted; an empty seed is -1 (random), other
    empty fields their defaults; a seed above 2**53 runs exactly as typed."""
    server = main_server()
    open_page(page, server)
    page.select_option("#lora", "detail")
    page.fill("#lora-weight", "0.75")
    page.click("#lora-add")
    assert page.input_value("#prompt").endswith("<lora:detail:0.75>")
    page.fill("#prompt", "a quiet lake")  # (the test's LoRA files are empty)
    page.check("#hires")
    fill(page, hr_scale="1.33", hr_strength="0.33", hr_steps="1", width=64, height=64, seed="", cfg="", steps="")
    page.click("#generate")
    params = generated(page)
    assert (params["Steps"], params["CFG scale"], params["Hires upscale"], params["Denoising strength"]) == (
        "20", "7.0", "1.33", "0.33")
    assert params["Seed"] != "0" and page.input_value("#seed") == "-1"  # random, and the field says so
    assert page.locator("#error").is_hidden()
    page.uncheck("#hires")
    assert page.is_disabled("#hr-scale") and page.is_disabled("#hr-strength")
    fill(page, seed="9007199254740993", steps=1)
    page.click("#generate")
    params = generated(page, 2)
    assert params["Seed"] == "9007199254740993" and "Hires upscale" not in params
    assert page.get_attribute("#gallery figure:first-child a", "download") == "00001-9007199254740993.png"


def test_page_batch_in_seed_order_and_narrow_windows(page):
    server = main_server()
    open_page(page, server)
    page.fill("#prompt", "three boats")
    fill(page, steps=1, seed=1234, width=64, height=64, batch=3)
    page.press("#prompt", "Control+Enter")  # A1111's key: generates
    generated(page, 3)
    captions = page.locator("#gallery .infotext").all_inner_texts()
    assert [parse_infotext(t)[2]["Seed"] for t in captions] == ["1234", "1235", "1236"]
    assert [a.get_attribute("download") for a in page.locator("#gallery a[download]").all()] == [
        "00000-1234.png", "00001-1235.png", "00002-1236.png"]
    try:
        for width in (400, 360):  # one column, nothing wider than the window
            page.set_viewport_size({"width": width, "height": 800})
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            lefts = page.eval_on_selector_all(".grid label", "ls => ls.map(l => l.getBoundingClientRect().left)")
            assert len(set(lefts)) == 1, lefts
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_page_errors_notes_and_the_progress_bar(page):
    server = main_server()
    open_page(page, server)
    # a server that stops answering mid-run: a plain message, and the bar goes back to 0
    held = []
    page.route("**/sdapi/v1/txt2img", lambda route: held.append(route))  # answered below
    page.route("**/internal/progress", lambda route: route.fulfill(json={
        "active": True, "queued": False, "completed": False, "progress": 0.4, "eta": 3, "live_preview": None,
        "id_live_preview": -1, "textinfo": "step 4 of 10", "jobs_ahead": None}))
    try:
        page.click("#generate")
        page.wait_for_function("document.getElementById('progress').value === 0.4")
        held[0].abort()
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error") == "cannot reach the server (is it running?)"
        assert page.eval_on_selector("#progress", "e => e.value") == 0 and page.is_enabled("#generate")
        page.unroute("**/sdapi/v1/txt2img")
        detail = "the queue is full (16 jobs waiting); retry in about 5 s"
        page.route("**/sdapi/v1/txt2img", lambda route: route.fulfill(
            status=503, headers={"Retry-After": "5"}, json={"detail": detail}))
        page.click("#generate")
        page.wait_for_function(f"document.getElementById('error').textContent === '503: {detail}'")
    finally:
        page.unroute("**/sdapi/v1/txt2img")
        page.unroute("**/internal/progress")
    # a server's warning is a note, not an error
    page.fill("#prompt", "a cat")
    page.select_option("#sampler", "DDIM")
    page.select_option("#scheduler", "Karras")
    fill(page, steps=1, width=64, height=64)
    page.click("#generate")
    generated(page)
    assert page.is_hidden("#error") and "note: scheduler 'Karras': not supported with DDIM" in page.inner_text("#note")
