"""python -m fastsd.serve driven by `webuiapi` (PyPI 0.9.17, mix1009's "Python API client for
AUTOMATIC1111/stable-diffusion-webui"), the client many A1111 scripts use: each method against a real server
(random:tiny and its inpainting twin, 64 px, 1-2 steps), checking what comes back (image sizes, seeds, infotexts),
and the clean errors it surfaces for what fastsd does not do (interrogate, ControlNet and other extensions' routes).

webuiapi sends every field of its signature (eta 1.0, s_noise 1, seed_resize_from_w/h 0, hr_* defaults,
sampler_index, scheduler "automatic" (a scheduler's lowercase `name`), image_cfg_scale, ...), PNG data: URLs for
images, and reads `images` / `image`, `info` (json.loads, else the text) / `html_info`, `parameters`.
Note: webuiapi mutates its txt2img / img2img default `alwayson_scripts={}` when given extension units
(ControlNet, ADetailer, ...), so the tests that pass those give their own dict."""
import base64
import hashlib
import io
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest
import webuiapi  # (the `test` extra's)
from PIL import Image, ImageDraw
from serve_server import MAIN_ARGS, STYLES_DIR, shared

from fastsd.image import parse_infotext

USER, PASSWORD = "alice", "s3cret"
SMALL = {"width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """random:tiny saved as an A1111 checkpoint file, whose title carries its short hash; (path, sha256)."""
    from safetensors.torch import save_file

    from fastsd import load_pipeline
    from fastsd.checkpoint import ldm_state_dict

    path = tmp_path_factory.mktemp("webuiapi") / "tiny_model.safetensors"
    save_file(ldm_state_dict(load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")), path)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(checkpoint):
    # the main serve tests' two tiny models, LoRA and embeddings folders, plus a checkpoint file, styles and basic
    # auth: one process for the module
    return shared(*MAIN_ARGS, "--model", checkpoint[0], "--styles-file", STYLES_DIR, "--api-auth",
                  f"{USER}:{PASSWORD}")


@pytest.fixture(scope="module")
def api(server):
    url = urlparse(server.url)
    return webuiapi.WebUIApi(host=url.hostname, port=url.port, username=USER, password=PASSWORD, steps=1)


def params_of(text: str) -> dict:
    return parse_infotext(text)[2]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def gradient(width=64, height=64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def run_in_thread(call):
    """Start `call` in a thread; returns (thread, box), box["result"] or box["error"] once joined."""
    box = {}

    def target():
        try:
            box["result"] = call()
        except Exception as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def joined(thread, box):
    """What the call started by run_in_thread returned (its exception raised here)."""
    thread.join(120)
    assert not thread.is_alive(), "the request did not come back"
    if "error" in box:
        raise box["error"]
    return box["result"]


def wait_running(api, timeout=120.0) -> dict:
    """get_progress until the request is sampling and has a live preview; the progress it read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["progress"] > 0 and progress["state"]["sampling_step"] > 0 and progress["current_image"]:
            return progress
        time.sleep(0.02)
    raise AssertionError("the request never showed progress")


def test_credentials_are_needed_and_sent(server, api):
    url = urlparse(server.url)
    anonymous = webuiapi.WebUIApi(host=url.hostname, port=url.port)
    assert "authentication required" in anonymous.get_options()["detail"]
    with pytest.raises(RuntimeError) as e:
        anonymous.txt2img(prompt="a cat", **SMALL)
    assert e.value.args[0] == 401
    wrong = webuiapi.WebUIApi(host=url.hostname, port=url.port, username=USER, password="nope")
    with pytest.raises(RuntimeError) as e:
        wrong.txt2img(prompt="a cat", **SMALL)
    assert e.value.args[0] == 401
    assert api.get_options()["sd_model_checkpoint"] == "random:tiny"


def test_lists(api, checkpoint):
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ SDE", "UniPC", "LCM"} <= set(samplers)
    assert all(isinstance(s["aliases"], list) for s in api.get_samplers())
    assert api.util_get_scheduler_names() == sorted(["automatic", "uniform", "karras", "exponential", "polyexponential",
                                                     "sgm_uniform", "kl_optimal", "align_your_steps", "simple",
                                                     "normal", "ddim", "beta"])
    assert [s["label"] for s in api.get_schedulers()][:3] == ["Automatic", "Uniform", "Karras"]
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in api.get_latent_upscale_modes()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]
    assert [(lo["name"], lo["path"]) for lo in api.get_loras()] == [("detail", "detail.safetensors"),
                                                                    ("style", "style.pt")]
    embeddings = api.get_embeddings()
    assert embeddings["skipped"] == {} and embeddings["loaded"]["shinystyle"]["vectors"] == 2
    assert [m["model_name"] for m in api.get_sd_models()] == ["random:tiny", "random:tiny-inpainting", "tiny_model"]
    assert api.util_get_current_model() == "random:tiny"
    styles = {s["name"]: s for s in api.get_prompt_styles()}
    assert styles["framed"] == {"name": "framed", "prompt": "a photo of {prompt}, 35mm",
                                "negative_prompt": "blurry, lowres"}
    assert styles["dup"]["prompt"] == "second"  # (b.csv's, read after a.csv)
    assert api.get_sd_vae() == []
    for empty in (api.get_hypernetworks, api.get_face_restorers, api.get_realesrgan_models):
        assert empty() == []
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert not (api.has_controlnet or api.has_adetailer or api.has_animatediff)  # (its check_extensions)
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["api_auth"] is None  # (never the credentials)
    assert api.get_memory()["ram"]["used"] > 0
    assert api.refresh_checkpoints() is None


def test_txt2img_seeds_batch_sampler_and_scheduler(api):
    r = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=21, batch_size=2, n_iter=2, steps=2,
                    cfg_scale=5, width=64, height=48, sampler_name="DPM++ 2M", scheduler="karras")
    assert [im.size for im in r.images] == [(64, 48)] * 4
    assert r.info["seed"] == 21 and r.info["all_seeds"] == [21, 22, 23, 24] and r.info["warnings"] == []
    assert r.info["interrupted"] is False and (r.info["width"], r.info["height"]) == (64, 48)
    assert r.parameters["seed"] == 21 and r.parameters["scheduler"] == "karras"  # (the request as sent)
    for image, text, seed in zip(r.images, r.info["infotexts"], r.info["all_seeds"]):
        assert image.info["parameters"] == text
        prompt, negative, params = parse_infotext(text)
        assert (prompt, negative) == ("a red fox", "blurry")
        assert params["Seed"] == str(seed) and params["Steps"] == "2" and params["CFG scale"] == "5.0"
        assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras" and params["Size"] == "64x48"
    assert len({pixels(im).tobytes() for im in r.images}) == 4
    # image 2 of the batch again alone with its seed (batch and lone runs may round a few levels apart, README)
    again = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=23, steps=2, cfg_scale=5, width=64,
                        height=48, sampler_name="DPM++ 2M", scheduler="karras")
    assert again.info["infotexts"][0] == r.info["infotexts"][2]
    assert np.abs(pixels(again.image) - pixels(r.images[2])).max() <= 8
    # webuiapi's defaults: Euler a (sampler_index too), scheduler "automatic"; A1111 runs sampler_name, not the index
    r = api.txt2img(prompt="a cat", seed=3, sampler_index="DDIM", **SMALL)
    assert params_of(r.info["infotexts"][0])["Sampler"] == "Euler a" and r.info["warnings"] == []


def test_every_scheduler_name_webuiapi_lists(api):
    """util_get_scheduler_names() gives the lowercase names (webuiapi's default scheduler is "automatic"): each runs
    as its label; "automatic" as "Automatic" (DPM++ 2M: A1111's Karras), with the same pixels."""
    labels = {s["name"]: s["label"] for s in api.get_schedulers()}
    images = {}
    for name in api.util_get_scheduler_names():
        r = api.txt2img(prompt="a cat", seed=4, sampler_name="DPM++ 2M", scheduler=name, **SMALL)
        assert r.info["warnings"] == [], (name, r.info["warnings"])
        expected = "Karras" if name == "automatic" else labels[name]
        assert params_of(r.info["infotexts"][0])["Schedule type"] == expected, name
        images[name] = pixels(r.image)
    label = api.txt2img(prompt="a cat", seed=4, sampler_name="DPM++ 2M", scheduler="Automatic", **SMALL)
    assert np.array_equal(pixels(label.image), images["automatic"])
    assert np.array_equal(images["automatic"], images["karras"])
    assert not np.array_equal(images["karras"], images["exponential"])
    r = api.txt2img(prompt="a cat", seed=4, scheduler="bogus", **SMALL)
    assert "unknown schedule type 'bogus'" in " ".join(r.info["warnings"])


def test_hires_fix_fields(api):
    r = api.txt2img(prompt="a cat", seed=9, width=64, height=48, steps=1, enable_hr=True, hr_scale=2,
                    hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=1, denoising_strength=0.5,
                    hr_sampler_name="Euler", hr_scheduler="karras", hr_prompt="a dog", sampler_name="DPM++ 2M",
                    scheduler="exponential")
    assert r.image.size == (128, 96) and r.info["warnings"] == []
    assert (r.info["width"], r.info["height"], r.info["denoising_strength"]) == (64, 48, 0.5)
    params = params_of(r.info["infotexts"][0])
    assert params["Size"] == "64x48" and params["Hires upscale"] == "2.0" and params["Hires upscaler"] == "Latent"
    assert params["Hires steps"] == "1" and params["Denoising strength"] == "0.5"
    assert params["Hires sampler"] == "Euler" and params["Hires schedule type"] == "Karras"
    assert params["Schedule type"] == "Exponential" and params["Hires prompt"] == "a dog"
    r = api.txt2img(prompt="a cat", seed=9, width=64, height=48, steps=1, enable_hr=True, hr_resize_x=96,
                    hr_resize_y=80, hr_upscaler=webuiapi.HiResUpscaler.Lanczos, hr_second_pass_steps=1)
    assert r.image.size == (96, 80)
    params = params_of(r.info["infotexts"][0])
    assert params["Hires resize"] == "96x80" and params["Hires upscaler"] == "Lanczos"
    # an upscaler A1111 has and this server lacks: the client raises with the 422's one line
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="a cat", enable_hr=True, hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x, **SMALL)
    assert e.value.args[0] == 422 and "R-ESRGAN 4x+" in e.value.args[1]


def test_styles_and_override_settings(api):
    r = api.txt2img(prompt="cat", styles=["framed", "nope"], seed=2, **SMALL)
    prompt, negative, _ = parse_infotext(r.info["infotexts"][0])
    assert (prompt, negative) == ("a photo of cat, 35mm", "blurry, lowres") and r.info["prompt"] == prompt
    assert r.parameters["styles"] == ["framed", "nope"]
    assert ["nope" in w for w in r.info["warnings"]] == [True]
    r = api.txt2img(prompt="a cat", seed=2, override_settings={"CLIP_stop_at_last_layers": 2,
                                                               "eta_noise_seed_delta": 31337}, **SMALL)
    params = params_of(r.info["infotexts"][0])
    assert params["Clip skip"] == "2" and params["ENSD"] == "31337" and r.info["clip_skip"] == 2
    options = api.get_options()  # override_settings_restore_afterwards (webuiapi's True)
    assert options["CLIP_stop_at_last_layers"] == 1 and options["eta_noise_seed_delta"] == 0
    r = api.txt2img(prompt="a cat", seed=2, override_settings={"sd_model_checkpoint": "random:tiny-inpainting",
                                                               "samples_format": "jpg"}, **SMALL)
    assert r.info["sd_model_name"] == "random:tiny-inpainting" and r.image.format == "JPEG"
    assert api.util_get_current_model() == "random:tiny" and api.get_options()["samples_format"] == "png"


def test_img2img(api):
    init = gradient()
    r = api.img2img(images=[init], prompt="a dog", seed=5, denoising_strength=0.5, steps=2, width=64, height=48)
    assert r.image.size == (64, 48) and r.info["all_seeds"] == [5] and r.info["warnings"] == []
    params = params_of(r.info["infotexts"][0])
    assert params["Denoising strength"] == "0.5" and params["Seed"] == "5" and params["Size"] == "64x48"
    other = api.img2img(images=[init.transpose(Image.Transpose.ROTATE_90)], prompt="a dog", seed=5,
                        denoising_strength=0.5, steps=2, width=64, height=48)
    assert not np.array_equal(pixels(r.image), pixels(other.image))  # the init image is used
    r = api.img2img(images=[init], prompt="a dog", seed=5, steps=2, width=64, height=64, include_init_images=True)
    assert any("include_init_images" in w for w in r.info["warnings"])  # (not echoed: fastsd's choice, README)


@pytest.mark.parametrize("mode", ["L", "RGB", "1"])
def test_inpaint_whole_picture_keeps_the_unmasked_pixels(api, mode):
    init = gradient()
    mask = Image.new(mode, init.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 31), fill="white")
    r = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, inpaint_full_res=False, prompt="a dog",
                    seed=6, denoising_strength=0.9, width=64, height=64)
    assert r.image.size == (64, 64) and r.info["warnings"] == []
    diff = np.abs(pixels(r.image) - pixels(init)).max(axis=-1)
    assert diff[44:, 44:].max() == 0 and diff[:24, :24].max() > 0  # A1111's overlay outside the blurred mask
    params = params_of(r.info["infotexts"][0])
    assert params["Mask blur"] == "4" and params["Denoising strength"] == "0.9"
    assert "Inpaint area" not in params and "Masked content" not in params  # (A1111 writes neither here)


def test_inpaint_invert_only_masked_and_the_inpainting_model(api):
    init = gradient()
    mask = Image.new("L", init.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 31), fill=255)
    r = api.img2img(images=[init], mask_image=mask, inpainting_mask_invert=1, inpaint_full_res=False, mask_blur=0,
                    prompt="a dog", seed=6, width=64, height=64)
    diff = np.abs(pixels(r.image) - pixels(init)).max(axis=-1)
    assert diff[:32, :32].max() == 0 and diff[32:, 32:].max() > 0
    assert params_of(r.info["infotexts"][0])["Mask mode"] == "Inpaint not masked"
    # webuiapi's defaults: inpaint_full_res (A1111's "Only masked") with padding 0; the answer has the init's size
    big = gradient(96, 80)
    r = api.img2img(images=[big], mask_image=mask.resize(big.size), prompt="a dog", seed=6, width=64, height=64,
                    override_settings={"sd_model_checkpoint": "random:tiny-inpainting"})
    assert r.image.size == (96, 80) and r.info["is_using_inpainting_conditioning"] is True
    params = params_of(r.info["infotexts"][0])
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "0"
    assert params["Masked content"] == "fill" and params["Conditional mask weight"] == "1.0"


def test_png_info_round_trip(api):
    r = api.txt2img(prompt="a red fox", negative_prompt="blur", seed=11, steps=2, cfg_scale=5, width=64, height=48,
                    sampler_name="DPM++ 2M", scheduler="karras")
    read = api.png_info(r.image)  # (webuiapi sends the PNG again, its text chunks kept)
    assert read.info == r.info["infotexts"][0] and read.images == []
    p = read.parameters
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Steps"]) == ("a red fox", "blur", "11", "2")
    assert (p["Sampler"], p["Schedule type"], p["CFG scale"]) == ("DPM++ 2M", "Karras", "5.0")
    assert (p["Size-1"], p["Size-2"]) == ("64", "48")
    again = api.txt2img(prompt=p["Prompt"], negative_prompt=p["Negative prompt"], seed=int(p["Seed"]),
                        steps=int(p["Steps"]), cfg_scale=float(p["CFG scale"]), width=int(p["Size-1"]),
                        height=int(p["Size-2"]), sampler_name=p["Sampler"], scheduler=p["Schedule type"])
    assert again.info["infotexts"] == r.info["infotexts"]
    assert np.array_equal(pixels(again.image), pixels(r.image))
    plain = api.png_info(gradient(8, 8))
    assert plain.info == "" and plain.parameters["Prompt"] == "" and plain.parameters["Clip skip"] == "1"


def test_models_switch_and_options(api, checkpoint):
    short = checkpoint[1][:10]
    title = f"tiny_model.safetensors [{short}]"  # A1111's title: file name and short hash
    assert api.util_get_model_names() == ["random:tiny", "random:tiny-inpainting", title]
    sd_model = next(m for m in api.get_sd_models() if m["title"] == title)
    assert (sd_model["hash"], sd_model["sha256"]) == (short, checkpoint[1])
    try:
        api.util_set_model("tiny_model")  # (find_closest: the nearest title)
        assert api.util_get_current_model() == title and api.get_options()["sd_checkpoint_hash"] == checkpoint[1]
        r = api.txt2img(prompt="a cat", seed=1, **SMALL)
        assert r.info["sd_model_name"] == "tiny_model" and r.info["sd_model_hash"] == short
        read = api.png_info(r.image).parameters
        assert (read["Model"], read["Model hash"]) == ("tiny_model", short)
        api.util_set_model("random:tiny", find_closest=False)
        assert api.util_get_current_model() == "random:tiny"
        api.util_set_model("Random:Tiny Inpainting")  # (find_closest: lowercased, then the nearest title)
        assert api.util_get_current_model() == "random:tiny-inpainting"
        r = api.txt2img(prompt="a cat", seed=1, **SMALL)
        assert r.info["sd_model_name"] == "random:tiny-inpainting"
        assert params_of(r.info["infotexts"][0])["Model"] == "random:tiny-inpainting"
        assert api.set_options({"sd_model_checkpoint": "nope"})["detail"].startswith("sd_model_checkpoint: unknown")
        assert api.util_get_current_model() == "random:tiny-inpainting"
    finally:
        api.util_set_model("random:tiny")
    assert api.util_get_current_model() == "random:tiny"
    # webuiapi's save / change / restore recipe: set_options takes back what get_options gave
    saved = api.get_options()
    try:
        assert "detail" not in api.set_options({"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337})
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        params = params_of(api.txt2img(prompt="a cat", seed=1, **SMALL).info["infotexts"][0])
        assert params["Clip skip"] == "2" and params["ENSD"] == "31337"
        assert "sd_model_checkpoint" in api.set_options(saved)["applied"]
        assert api.get_options() == saved
        assert "CLIP_stop_at_last_layers" in api.set_options({"CLIP_stop_at_last_layers": "x"})["detail"]
        assert api.get_options() == saved
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0})


def test_extras_upscale(api):
    source = api.txt2img(prompt="a cat", seed=12, **SMALL)
    r = api.extra_single_image(image=source.image, upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert r.image.size == (128, 128) and "Postprocess upscaler: Lanczos" in r.info  # (webuiapi's info: html_info)
    assert r.image.info["parameters"] == source.info["infotexts"][0]
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    r = api.extra_single_image(image=small, upscaler_1=webuiapi.Upscaler.Nearest, upscaling_resize=2)
    assert np.array_equal(pixels(r.image), pixels(small).repeat(2, axis=0).repeat(2, axis=1))
    r = api.extra_single_image(image=gradient(40, 30), upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=100,
                               upscaling_resize_h=80, gfpgan_visibility=0.5)
    assert r.image.size == (100, 80) and any("gfpgan_visibility" in w for w in r.json["warnings"])
    r = api.extra_batch_images(images=[gradient(16, 16), gradient(16, 8)], name_list=["a.png", "b.png"],
                               upscaler_1=webuiapi.Upscaler.Nearest, upscaling_resize=1.5)
    assert [im.size for im in r.images] == [(24, 24), (24, 8)]  # A1111's Upscaler.upscale: sizes // 8 * 8
    with pytest.raises(RuntimeError) as e:
        api.extra_single_image(image=small, upscaler_1=webuiapi.Upscaler.ESRGAN_4x)
    assert e.value.args[0] == 422 and "R-ESRGAN 4x+" in e.value.args[1]


def test_progress_interrupt_and_skip(api):
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_task"] is None
    api.util_wait_for_ready(check_interval=0.05)  # (returns at once when idle)
    assert api.interrupt() == {} and api.skip() is None  # A1111's answers; idle, they stop nothing later
    r = api.txt2img(prompt="a cat", seed=1, **SMALL)
    assert r.info["interrupted"] is False and r.info["warnings"] == []

    thread, box = run_in_thread(lambda: api.txt2img(prompt="a cat", seed=1, width=64, height=64, steps=150))
    running = wait_running(api)
    assert running["state"]["job_count"] == 1 and running["state"]["sampling_steps"] == 150
    assert running["current_task"].startswith("task(txt2img-")
    assert Image.open(io.BytesIO(base64.b64decode(running["current_image"]))).size == (8, 8)  # (at latent size)
    assert api.interrupt() == {}
    r = joined(thread, box)
    assert r.info["interrupted"] is True and r.image.size == (64, 64)
    assert any(w.startswith("interrupted at step") for w in r.info["warnings"])
    api.util_wait_for_ready(check_interval=0.05)
    assert api.get_progress()["state"]["job_count"] == 0

    thread, box = run_in_thread(lambda: api.txt2img(prompt="a cat", seed=30, width=64, height=64, steps=40, n_iter=2))
    running = wait_running(api)
    assert running["state"]["job_count"] == 2 and running["state"]["job_no"] == 0
    assert api.skip() is None
    r = joined(thread, box)
    assert r.info["interrupted"] is False and r.info["all_seeds"] == [30, 31] and len(r.images) == 2
    assert len(r.info["warnings"]) == 1 and r.info["warnings"][0].startswith("skipped at step")
    assert "iteration 1;" in r.info["warnings"][0]
    # the second iteration ran whole: the image seed 31 makes alone
    alone = api.txt2img(prompt="a cat", seed=31, width=64, height=64, steps=40)
    assert alone.info["infotexts"][0] == r.info["infotexts"][1]
    assert np.array_equal(pixels(alone.image), pixels(r.images[1]))
    assert not np.array_equal(pixels(r.images[0]), pixels(r.images[1]))


def test_unsupported_features_fail_cleanly(api):
    image = gradient(16, 16)
    with pytest.raises(RuntimeError) as e:  # fastsd has no captioning model: 501, one line
        api.interrogate(image)
    assert e.value.args[0] == 501 and "/interrogate: not supported" in e.value.args[1]
    # extensions' own routes are not there: 404 (webuiapi's helpers then fail reading the missing key)
    assert api.session.get(api.get_endpoint("controlnet/version", False)).status_code == 404
    with pytest.raises(KeyError):
        api.controlnet_version()
    with pytest.raises(KeyError):
        api.list_prompt_gen_models()
    assert api.get_artists() == {"detail": "Not Found"}
    unit = webuiapi.ControlNetUnit(image=image, module="canny", model="control_canny")
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="a cat", controlnet_units=[unit], use_deprecated_controlnet=True, **SMALL)
    assert e.value.args[0] == 404
    # alwayson_scripts (ControlNet, ADetailer, ...), scripts, restore_faces, tiling: the image, and a warning each
    r = api.txt2img(prompt="a cat", seed=1, controlnet_units=[unit], adetailer=[webuiapi.ADetailer()],
                    alwayson_scripts={}, script_name="X/Y/Z plot", restore_faces=True, tiling=True, **SMALL)
    assert r.image.size == (64, 64)
    notes = " | ".join(r.info["warnings"])
    for words in ("['ADetailer', 'ControlNet']: scripts are not supported", "script_name 'X/Y/Z plot'",
                  "restore_faces: not supported", "tiling: not supported"):
        assert words in notes, notes
    r = api.img2img(images=[image], prompt="a cat", seed=1, controlnet_units=[unit], alwayson_scripts={}, **SMALL)
    assert "['ControlNet']: scripts are not supported" in " ".join(r.info["warnings"])
