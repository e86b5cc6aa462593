"""The page's inpainting (A1111's Inpaint and Inpaint upload tabs) in a real browser (Debian's Chromium via Playwright,
as tests/test_serve_browser.py): a mask painted with the mouse (or a finger) over the init image is sent at the
image's own size as a black and white PNG with A1111's inpaint fields; undo / clear / the eraser change it; an
uploaded mask is sent as it is; "Send to inpaint"; a phone's width."""
import base64
import io
import json

import numpy as np
from PIL import Image
from serve_server import main_server
from test_serve_browser import fill, generated, open_page  # (skips as that file does)

SMALL = {"steps": 1, "width": 64, "height": 64, "seed": 5}


def bodies(page, path: str = "/img2img") -> list:
    """The JSON bodies the page POSTs to `path` from now on."""
    got = []
    page.on("request", lambda r: got.append(json.loads(r.post_data)) if r.url.endswith(path) else None)
    return got


def load_init(page, path, size: tuple[int, int]) -> None:
    page.set_input_files("#init-image", str(path))
    page.wait_for_function("([w, h]) => { const c = document.getElementById('mask-canvas');"
                           " return c.width === w && c.height === h; }", arg=list(size))
    page.locator("#mask-canvas").scroll_into_view_if_needed()


def stroke(page, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through `points`, given as fractions of the canvas as shown."""
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for xy in at[1:]:
        page.mouse.move(*xy, steps=4)
    page.mouse.up()


def decoded(data_url: str) -> np.ndarray:
    head, _, b64 = data_url.partition(",")
    assert head == "data:image/png;base64"
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(im.convert("L"))


def params(page, figures: int = 1) -> dict:
    return generated(page, figures)


def init_file(tmp_path, size=(96, 80), name="init.png"):
    Image.new("RGB", size, (30, 120, 220)).save(tmp_path / name)
    return tmp_path / name


def test_painted_mask_and_inpaint_controls_are_sent(page, tmp_path):
    server = main_server()
    page.set_viewport_size({"width": 1280, "height": 800})
    open_page(page, server)
    sent = bodies(page)
    page.fill("#prompt", "a red ball")
    fill(page, **SMALL)
    assert page.is_hidden("#mask-editor") and page.is_disabled("#resize-mode")
    load_init(page, init_file(tmp_path), (96, 80))
    # no mask yet: the inpaint controls are off, the request is plain img2img
    assert page.is_disabled("#mask-blur") and page.is_disabled("#masked-content") and page.is_visible("#inpaint-note")
    assert page.inner_text("#generate") == "Generate (img2img)"
    # A1111's UI defaults
    assert (page.input_value("#mask-blur"), page.input_value("#mask-mode"), page.input_value("#masked-content"),
            page.input_value("#inpaint-area"), page.input_value("#inpaint-padding"),
            page.input_value("#resize-mode")) == ("4", "0", "1", "0", "32", "0")
    stroke(page, [(0.2, 0.5), (0.8, 0.5)])  # a horizontal line through the middle
    assert page.is_enabled("#mask-blur") and page.is_hidden("#inpaint-note")
    assert page.inner_text("#generate") == "Generate (inpaint)"
    page.fill("#mask-blur", "8")
    page.select_option("#mask-mode", "Inpaint not masked")
    page.select_option("#masked-content", "latent noise")
    page.select_option("#inpaint-area", "Only masked")
    page.fill("#inpaint-padding", "16")
    page.select_option("#resize-mode", "Crop and resize")
    page.click("#generate")
    got = params(page)
    body = sent[-1]
    m = decoded(body["mask"])
    assert m.shape == (80, 96)  # the init image's own size (the canvas is shown at 320 px)
    assert set(np.unique(m)) == {0, 255}  # black and white
    assert (m[40, 25:70] == 255).all()  # painted
    assert (m[:25] == 0).all() and (m[56:] == 0).all() and (m[:, :10] == 0).all() and (m[:, 88:] == 0).all()
    assert {k: body[k] for k in ("mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res",
                                 "inpaint_full_res_padding", "resize_mode")} == {
        "mask_blur": 8, "inpainting_mask_invert": 1, "inpainting_fill": 2, "inpaint_full_res": True,
        "inpaint_full_res_padding": 16, "resize_mode": 1}
    assert body["init_images"][0] == base64.b64encode((tmp_path / "init.png").read_bytes()).decode()
    # the result, with A1111's inpainting keys ("only masked": the answer has the init image's size)
    assert (got["Mask blur"], got["Mask mode"], got["Masked content"], got["Inpaint area"],
            got["Masked area padding"]) == ("8", "Inpaint not masked", "latent noise", "Only masked", "16")
    assert page.eval_on_selector("#gallery figure img", "img => [img.naturalWidth, img.naturalHeight]") == [96, 80]
    assert page.locator("#error").is_hidden()
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def test_undo_clear_and_eraser(page, tmp_path):
    server = main_server()
    open_page(page, server)
    sent = bodies(page)
    fill(page, **SMALL)
    load_init(page, init_file(tmp_path, (64, 64)), (64, 64))
    assert page.is_disabled("#mask-undo") and page.is_disabled("#mask-clear")
    stroke(page, [(0.5, 0.1), (0.5, 0.9)])  # vertical
    stroke(page, [(0.1, 0.5), (0.9, 0.5)])  # horizontal
    page.locator("#mask-canvas").click(position={"x": 0, "y": 0}, button="right")  # (no paint)
    page.keyboard.press("Control+z")  # undoes the horizontal stroke
    # Ctrl+Z in a text field is the field's own: the mask keeps its stroke
    page.focus("#prompt")
    page.keyboard.press("Control+z")
    page.uncheck("#mask-eraser")
    page.check("#mask-eraser")
    stroke(page, [(0.5, 0.8), (0.5, 0.95)])  # erases the vertical line's bottom
    page.uncheck("#mask-eraser")
    page.click("#generate")
    got = params(page)
    m = decoded(sent[-1]["mask"])
    assert m.shape == (64, 64)
    assert (m[10:45, 32] == 255).all() and (m[32, :20] == 0).all() and (m[32, 44:] == 0).all()
    assert (m[55:, :] == 0).all() and m[0, 0] == 0  # erased; the right click painted nothing
    assert got["Mask blur"] == "4" and "Masked content" not in got  # A1111 writes no "original"
    assert sent[-1]["inpainting_fill"] == 1 and sent[-1]["inpaint_full_res"] is False  # "Whole picture"
    # undo to nothing: no mask sent, plain img2img
    page.click("#mask-undo")
    page.click("#mask-undo")
    assert page.is_disabled("#mask-undo") and page.is_disabled("#mask-blur")
    assert page.inner_text("#generate") == "Generate (img2img)"
    page.click("#generate")
    got = params(page, 2)
    assert "mask" not in sent[-1] and "mask_blur" not in sent[-1] and "inpainting_fill" not in sent[-1]
    assert "Mask blur" not in got and got["Denoising strength"] == "0.75"
    # clear
    stroke(page, [(0.3, 0.3), (0.6, 0.6)])
    assert page.inner_text("#generate") == "Generate (inpaint)"
    page.click("#mask-clear")
    assert page.is_disabled("#mask-blur") and page.inner_text("#generate") == "Generate (img2img)"
    # a new init image starts with no mask; Clear (the init image) hides the editor
    stroke(page, [(0.3, 0.3), (0.6, 0.6)])
    load_init(page, init_file(tmp_path, (48, 40), "other.png"), (48, 40))
    assert page.is_disabled("#mask-blur") and page.is_disabled("#mask-undo")
    page.click("#init-clear")
    assert page.is_hidden("#mask-editor") and page.inner_text("#generate") == "Generate (txt2img)"


def test_uploaded_mask_is_sent_as_given(page, tmp_path):
    server = main_server()
    open_page(page, server)
    sent = bodies(page)
    fill(page, **SMALL)
    load_init(page, init_file(tmp_path), (96, 80))
    m = Image.new("L", (96, 80), 0)
    m.paste(255, (10, 10, 50, 40))
    m.save(tmp_path / "mask.png")
    page.set_input_files("#mask-file", str(tmp_path / "mask.png"))
    page.wait_for_selector("#mask-blur:not([disabled])")
    # shown over the image where it is white
    shown = page.evaluate("""() => { const c = document.getElementById('mask-canvas').getContext('2d');
      return [c.getImageData(30, 25, 1, 1).data[3], c.getImageData(70, 60, 1, 1).data[3]]; }""")
    assert shown == [255, 0]
    page.select_option("#masked-content", "fill")
    page.click("#generate")
    got = params(page)
    assert sent[-1]["mask"] == "data:image/png;base64," + base64.b64encode((tmp_path / "mask.png").read_bytes()).decode()
    assert got["Masked content"] == "fill" and got["Mask blur"] == "4"
    # painting on it: the painted mask is sent (the upload and the stroke); undo: the upload again
    stroke(page, [(0.8, 0.8), (0.9, 0.9)])
    page.click("#generate")
    params(page, 2)
    m2 = decoded(sent[-1]["mask"])
    assert m2.shape == (80, 96) and m2[25, 30] == 255 and m2[68, 81] == 255 and m2[5, 90] == 0
    page.keyboard.press("Control+z")
    page.click("#generate")
    params(page, 3)
    assert sent[-1]["mask"] == sent[0]["mask"]


def test_send_to_inpaint(page):
    server = main_server()
    open_page(page, server)
    sent = bodies(page)
    page.fill("#prompt", "a house")
    fill(page, steps=1, width=64, height=48, seed=12)
    page.click("#generate")
    generated(page)
    page.click("#gallery button.send-inpaint")
    page.wait_for_function("document.getElementById('mask-canvas').width === 64")
    assert page.inner_text("#generate") == "Generate (img2img)" and page.input_value("#seed") == "12"
    assert page.input_value("#height") == "48"
    stroke(page, [(0.5, 0.5)])  # a dot
    page.select_option("#model", label="random:tiny-inpainting")  # a 9-channel model: its conditioning mask
    page.click("#generate")
    got = params(page, 2)
    assert got["Model"] == "random:tiny-inpainting" and got["Conditional mask weight"] == "1.0"
    image = page.get_attribute("#gallery figure:nth-child(2) img", "src").split(",", 1)[1]
    assert sent[-1]["init_images"] == [image]
    m = decoded(sent[-1]["mask"])
    assert m.shape == (48, 64) and m[24, 32] == 255 and m[0, 0] == 0
    assert got["Mask blur"] == "4" and got["Size"] == "64x48"


TOUCH = """([x, y, type]) => {  // a finger's stroke, as a phone's browser sends it (pointer events of type touch)
  const c = document.getElementById('mask-canvas');
  const r = c.getBoundingClientRect();
  const at = (fx) => ({clientX: r.left + fx * r.width, clientY: r.top + y * r.height, pointerId: 7,
                       pointerType: type, isPrimary: true, bubbles: true, cancelable: true});
  c.dispatchEvent(new PointerEvent('pointerdown', {...at(x[0]), button: 0, buttons: 1}));
  for (const fx of x.slice(1)) c.dispatchEvent(new PointerEvent('pointermove', {...at(fx), buttons: 1}));
  c.dispatchEvent(new PointerEvent('pointerup', {...at(x[x.length - 1]), button: 0, buttons: 0}));
}"""


def test_phone_width_paints(browser, tmp_path):
    server = main_server()
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True,
                                  device_scale_factor=2)
    try:
        page = context.new_page()
        open_page(page, server)
        sent = bodies(page)
        fill(page, **SMALL)
        load_init(page, init_file(tmp_path, (512, 384)), (512, 384))
        box = page.locator("#mask-canvas").bounding_box()
        assert box["width"] < 390 and abs(box["height"] / box["width"] - 0.75) < 0.01  # scaled to fit
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.eval_on_selector("#mask-canvas", "c => getComputedStyle(c).touchAction") == "none"
        page.evaluate(TOUCH, [[0.1, 0.3, 0.5], 0.25, "touch"])  # a finger along the upper quarter
        stroke(page, [(0.75, 0.75)])  # and a mouse dot (a tablet's mouse or pen)
        page.click("#generate")
        params(page)
        m = decoded(sent[-1]["mask"])
        assert m.shape == (384, 512)
        assert m[96, 60] == 255 and m[96, 250] == 255 and m[288, 384] == 255  # image pixels, not screen ones
        assert m[96, 300] == 0 and m[200, 200] == 0 and m[288, 300] == 0
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
