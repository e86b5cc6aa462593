"""The page's A1111 habits in a real browser (Debian's Chromium via Playwright, as tests/test_serve_browser.py):
the seed buttons, Skip and Interrupt naming the page's own job, the styles picker, the gallery kept across a
reload (bounded), the lightbox, copying the infotext, "Send to img2img", and closing the tab cancelling the job."""
import json
import time

from serve_server import main_server, styles_server
from test_serve_browser import another_clients_job, fill, generated, open_page  # (skips as that file does)

from fastsd.image import parse_infotext

SMALL = {"steps": 1, "width": 64, "height": 64}


def posted(page, path: str) -> list:
    """The JSON bodies the page POSTs to `path` from now on."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith(path) else None)
    return bodies


def seeds(page) -> list[str]:
    return [parse_infotext(t)[2]["Seed"] for t in page.locator("#gallery .infotext").all_inner_texts()]


def test_seed_buttons_random_and_reuse(page):
    """A1111's 🎲 (-1: random) and ♻ (the selected image's seed, else the newest image's)."""
    server = main_server()
    open_page(page, server)
    assert page.is_hidden("#styles-row")  # a server without styles: no picker
    page.fill("#prompt", "two kites")
    fill(page, batch=2, seed=-1, **SMALL)
    page.click("#generate")
    generated(page, 2)
    first, second = seeds(page)
    page.click("#seed-reuse")
    assert page.input_value("#seed") == first  # the newest image's (the batch's first)
    page.click("#gallery figure:nth-child(2) img")  # selects it (and shows it full size)
    page.click("#lightbox-close")
    page.click("#seed-reuse")
    assert page.input_value("#seed") == second
    page.click("#generate")
    generated(page, 3)
    assert seeds(page)[0] == second  # the reused seed runs
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"


def test_skip_and_interrupt_name_the_pages_own_job(page):
    """Skip leaves the current iteration of the batch count and the job goes on; both buttons send the page's task
    id (the server stops only that job: tests/test_serve_page_api.py)."""
    server = main_server()
    open_page(page, server)
    jobs, skips, interrupts = posted(page, "/txt2img"), posted(page, "/skip"), posted(page, "/interrupt")
    page.fill("#prompt", "a field")
    fill(page, count=2, steps=40, seed=11, width=64, height=64)
    assert page.is_disabled("#skip")
    page.click("#generate")
    page.wait_for_selector("#skip:not([disabled])", timeout=120_000)
    page.click("#skip")
    generated(page, 2)
    assert seeds(page) == ["11", "12"]  # the skipped iteration's (half-denoised) image and the next one's
    assert "skip" in page.inner_text("#note") and page.inner_text("#status") == "done: 2 image(s)"
    assert jobs[0]["n_iter"] == 2 and skips == [{"id_task": jobs[0]["force_task_id"]}]
    assert page.is_disabled("#skip") and page.is_disabled("#interrupt")
    fill(page, count=1, steps=150)
    page.click("#generate")
    page.wait_for_selector("#interrupt:not([disabled])", timeout=120_000)
    page.click("#interrupt")
    generated(page, 3)
    assert page.inner_text("#status") == "interrupted"
    assert interrupts == [{"id_task": jobs[1]["force_task_id"]}] and jobs[0]["force_task_id"] != jobs[1]["force_task_id"]


def test_interrupt_while_waiting_cancels_the_pages_job_only(page):
    """Behind another client's job, Interrupt lets the page's request go: the server drops the waiting job, the
    other client's job runs on."""
    server = main_server()
    open_page(page, server)
    interrupts = posted(page, "/interrupt")
    other, out = another_clients_job(server, width=64, height=64, force_task_id="task(other)")
    with server.client() as c:
        dropped = c.get("/sdapi/v1/progress").json()["state"]["fastsd"].get("dropped", 0)
        page.fill("#prompt", "my queued job")
        fill(page, **SMALL)
        page.click("#generate")
        page.wait_for_selector("#interrupt:not([disabled])")  # (once the page knows its job waits)
        assert page.inner_text("#status") == "waiting: 1 job ahead" and page.is_disabled("#skip")
        page.click("#interrupt")
        page.wait_for_function("document.getElementById('status').textContent === 'cancelled'")
        assert page.is_hidden("#error") and page.is_enabled("#generate") and interrupts == []
        deadline = time.monotonic() + 10
        while (p := c.get("/sdapi/v1/progress").json())["state"]["fastsd"].get("dropped", 0) == dropped:
            assert time.monotonic() < deadline, p["state"]
            time.sleep(0.05)
        assert p["current_task"] == "task(other)" and not p["state"]["interrupted"] and p["state"]["queued"] == 0
        c.post("/sdapi/v1/interrupt", json={"id_task": "task(other)"})
        other.join(60)
    assert page.locator("#gallery figure").count() == 0


def test_styles_picker(page):
    server = styles_server()
    open_page(page, server)
    with server.client() as c:
        names = [s["name"] for s in c.get("/sdapi/v1/prompt-styles").json()]
    assert page.locator("#styles option").all_inner_texts() == names and page.is_visible("#styles")
    page.fill("#prompt", "a boat")
    fill(page, seed=3, **SMALL)
    page.select_option("#styles", ["framed"])
    page.click("#generate")
    generated(page)
    prompt, negative, _ = parse_infotext(page.inner_text("#gallery .infotext"))
    assert (prompt, negative) == ("a photo of a boat, 35mm", "blurry, lowres")


def test_gallery_survives_a_reload_within_bounds(page):
    server = main_server()
    open_page(page, server)
    page.fill("#prompt", "kept images")
    fill(page, batch=2, seed=5, **SMALL)
    page.click("#generate")
    generated(page, 2)
    texts = page.locator("#gallery .infotext").all_inner_texts()
    page.reload()
    open_page(page, server)
    assert page.locator("#gallery .infotext").all_inner_texts() == texts
    assert [a.get_attribute("download") for a in page.locator("#gallery a[download]").all()] == [
        "00000-5.png", "00001-6.png"]
    assert page.get_attribute("#gallery img", "src").startswith("data:image/png;base64,iVBOR")
    # bounded: 30 images kept before, one made now -> the newest 24
    page.evaluate("""() => { const e = JSON.parse(localStorage.getItem('fastsd-gallery'))[0];
        localStorage.setItem('fastsd-gallery', JSON.stringify(Array.from({length: 30}, () => e))); }""")
    fill(page, batch=1, seed=9, **SMALL)  # (the reload put the fields back to their defaults)
    page.click("#generate")
    generated(page, 3)
    kept = page.evaluate("JSON.parse(localStorage.getItem('fastsd-gallery'))")
    assert len(kept) == 24 and kept[0]["name"] == "00002-9.png" and "Seed: 9," in kept[0]["text"]
    page.click("#gallery-clear")
    assert page.locator("#gallery figure").count() == 0 and page.is_hidden("#gallery-bar")
    page.reload()
    open_page(page, server)
    assert page.locator("#gallery figure").count() == 0


def test_lightbox_shows_the_full_image_and_steps_through(page):
    server = main_server()
    open_page(page, server)
    interrupts = posted(page, "/interrupt")
    page.fill("#prompt", "two lamps")
    fill(page, batch=2, seed=21, **SMALL)
    page.click("#generate")
    generated(page, 2)
    srcs = [i.get_attribute("src") for i in page.locator("#gallery figure img").all()]
    page.click("#gallery figure:first-child img")
    page.wait_for_selector("#lightbox[open]")
    assert page.get_attribute("#lightbox-img", "src") == srcs[0] and page.inner_text("#lightbox-count") == "1 / 2"
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#lightbox-img", "src") == srcs[1] and page.inner_text("#lightbox-count") == "2 / 2"
    page.click("#lightbox-img")  # actual size
    assert page.eval_on_selector("#lightbox-img", "e => e.classList.contains('full') && e.width === e.naturalWidth")
    page.keyboard.press("Escape")  # closes it; no interrupt
    page.wait_for_function("!document.getElementById('lightbox').open")
    assert interrupts == [] and page.locator("#gallery figure.selected").count() == 1


def test_copy_infotext_and_send_to_img2img(page):
    server = main_server()
    open_page(page, server)
    page.fill("#prompt", "a red barn")
    page.fill("#negative", "fog")
    page.select_option("#sampler", "Euler")
    fill(page, seed=77, steps=3, width=64, height=48)
    page.click("#generate")
    generated(page)
    text = page.inner_text("#gallery .infotext")
    page.evaluate("navigator.clipboard.writeText = (t) => { window.copied = t; return Promise.resolve(); }")
    page.click("#gallery button.copy")
    assert page.evaluate("window.copied") == text
    page.fill("#prompt", "something else")
    page.select_option("#sampler", "DDIM")
    fill(page, seed=-1, steps=20, width=512, height=512)
    page.click("#gallery button.send")
    assert (page.input_value("#prompt"), page.input_value("#negative"), page.input_value("#seed"),
            page.input_value("#steps"), page.input_value("#sampler"), page.input_value("#width"),
            page.input_value("#height")) == ("a red barn", "fog", "77", "3", "Euler", "64", "48")
    assert page.inner_text("#generate") == "Generate (img2img)" and page.is_visible("#init-preview")
    sent = posted(page, "/img2img")
    page.click("#generate")
    generated(page, 2)
    image = page.get_attribute("#gallery figure:nth-child(2) img", "src").split(",", 1)[1]
    assert sent[0]["init_images"] == [image]
    params = parse_infotext(page.inner_text("#gallery figure:first-child .infotext"))[2]
    assert params["Seed"] == "77" and "Denoising strength" in params


def test_results_in_the_servers_samples_format_are_labelled_so(page):
    server = main_server()
    open_page(page, server)

    def as_jpeg(route):
        body = json.loads(route.request.post_data)
        body["override_settings"]["samples_format"] = "jpg"
        route.continue_(post_data=json.dumps(body))

    page.route("**/sdapi/v1/txt2img", as_jpeg)
    page.fill("#prompt", "a jpeg")
    fill(page, seed=4, **SMALL)
    page.click("#generate")
    generated(page)
    assert page.get_attribute("#gallery img", "src").startswith("data:image/jpeg;base64,/9j/")
    assert page.get_attribute("#gallery a[download]", "download") == "00000-4.jpg"
    assert page.eval_on_selector("#gallery img", "img => img.naturalWidth") == 64


def test_closing_the_tab_cancels_its_job(page):
    """No beacon needed: the page's txt2img request is aborted with the tab, and the server drops the job."""
    server = main_server()
    open_page(page, server)
    page.fill("#prompt", "never finished")
    fill(page, count=8, steps=150, width=64, height=64)
    page.click("#generate")
    page.wait_for_selector("#interrupt:not([disabled])", timeout=120_000)
    with server.client() as c:
        before = c.get("/sdapi/v1/progress").json()["state"]["fastsd"].get("cancelled", 0)
        page.close(run_before_unload=False)
        deadline = time.monotonic() + 15
        while (p := c.get("/sdapi/v1/progress").json())["current_task"] is not None:
            assert time.monotonic() < deadline, p["state"]
            time.sleep(0.1)
        assert p["state"]["fastsd"]["cancelled"] == before + 1


def test_read_parameters_from_a_pasted_infotext(page):
    """A1111's ↙: an infotext pasted into the prompt fills the fields."""
    server = main_server()
    open_page(page, server)
    page.fill("#prompt", "a cat, (detailed:1.2)\nNegative prompt: dog\nSteps: 7, Sampler: DPM++ 2M, "
                         "Schedule type: Karras, CFG scale: 4.5, Seed: 42, Size: 96x64, Model: \"random:tiny\"")
    page.click("#read-params")
    assert (page.input_value("#prompt"), page.input_value("#negative"), page.input_value("#steps"),
            page.input_value("#sampler"), page.input_value("#scheduler"), page.input_value("#cfg"),
            page.input_value("#seed"), page.input_value("#width"), page.input_value("#height")) == (
        "a cat, (detailed:1.2)", "dog", "7", "DPM++ 2M", "Karras", "4.5", "42", "96", "64")
    page.click("#read-params")  # now a plain prompt: nothing to read, said so
    assert page.input_value("#prompt") == "a cat, (detailed:1.2)" and "no infotext" in page.inner_text("#note")


# a PNG file made in the page (a canvas), dropped as from the file manager; returns whether the drop's default
# (the browser opening the file in place of the page) was prevented
DROP = """async (selector) => {
  const canvas = Object.assign(document.createElement('canvas'), {width: 40, height: 24});
  canvas.getContext('2d').fillRect(0, 0, 40, 24);
  const blob = await new Promise((ok) => canvas.toBlob(ok, 'image/png'));
  const data = new DataTransfer();
  data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
  const target = document.querySelector(selector);
  target.dispatchEvent(new DragEvent('dragover', {dataTransfer: data, bubbles: true, cancelable: true}));
  const drop = new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true});
  target.dispatchEvent(drop);
  return drop.defaultPrevented; }"""


def test_dropping_an_image_file_on_img2img(page):
    server = main_server()
    open_page(page, server)
    assert page.evaluate(DROP, "#gallery")  # elsewhere: ignored, but the page stays
    assert page.is_hidden("#init-preview") and page.inner_text("#generate") == "Generate (txt2img)"
    assert page.evaluate(DROP, "#img2img-set legend")
    page.wait_for_selector("#init-preview:not([hidden])")
    assert page.inner_text("#generate") == "Generate (img2img)"
    assert page.eval_on_selector("#init-preview", "e => e.naturalWidth") == 40
    assert page.evaluate("document.getElementById('init-image').files[0].name") == "dropped.png"
    # a gallery image dragged there: its data: URL (no file)
    page.click("#init-clear")
    page.evaluate("""() => { const c = Object.assign(document.createElement('canvas'), {width: 16, height: 8});
      const data = new DataTransfer();
      data.setData('text/uri-list', c.toDataURL('image/png'));
      document.getElementById('img2img-set').dispatchEvent(
        new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true})); }""")
    page.wait_for_selector("#init-preview:not([hidden])")
    assert page.eval_on_selector("#init-preview", "e => e.naturalWidth") == 16
    assert page.inner_text("#generate") == "Generate (img2img)"
