"""img2img and inpainting details as AUTOMATIC1111's (its modules/processing.py StableDiffusionProcessingImg2Img,
images.resize_image, api.img2imgapi), where no oracle library exists: each test holds the property that defines
A1111's behaviour (the audit: notes s35 inpaint_audit)."""
import numpy as np
import pytest
from PIL import Image
from serve_server import decode, info, main_server, png_b64

from fastsd import GenerationSettings, masking
from fastsd.image import parse_infotext, pil_to_tensor


@pytest.fixture(scope="module")
def tiny():
    import fastsd

    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


@pytest.fixture(scope="module")
def tiny_inpainting():
    import fastsd

    return fastsd.load_pipeline("random:tiny-inpainting", device="cpu", dtype="fp32", backend="torch")


def _noise_image(size, seed=2) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _params(image: Image.Image) -> dict:
    return parse_infotext(image.info["parameters"])[2]


def test_conditional_mask_weight_key_of_a_9_channel_model(tiny, tiny_inpainting):
    """A1111's create_infotext writes "Conditional mask weight" (its inpainting_mask_weight, 1.0) for every image of
    a 9-channel model, txt2img too (is_using_inpainting_conditioning), right after "Denoising strength"; none for a
    4-channel model."""
    image, kw = _noise_image((64, 64)), dict(steps=1, seed=1, width=64, height=64, progress=False)
    for extra in ({}, {"image": image}):
        params = _params(tiny_inpainting.generate("a cat", **extra, **kw)[0])
        assert params["Conditional mask weight"] == "1.0"
        assert "Conditional mask weight" not in _params(tiny.generate("a cat", **extra, **kw)[0])
    keys = list(_params(tiny_inpainting.generate("a cat", image=image, **kw)[0]))
    assert keys[keys.index("Denoising strength") + 1] == "Conditional mask weight"


def test_server_info_is_using_inpainting_conditioning():
    """A1111's info.is_using_inpainting_conditioning: true for any run of a 9-channel model (with or without a
    mask), false for a 4-channel one."""
    body = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 3, "init_images": [png_b64(
        _noise_image((64, 64)))]}
    with main_server().client(timeout=300) as c:
        for model, want in (("random:tiny-inpainting", True), ("random:tiny", False)):
            r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": {"sd_model_checkpoint": model}})
            assert r.status_code == 200, r.text
            assert info(r)["is_using_inpainting_conditioning"] is want
            assert (parse_infotext(info(r)["infotexts"][0])[2].get("Conditional mask weight") == "1.0") is want


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_only_masked_blank_mask_falls_back_with_the_resize_mode(mode):
    """A1111's "Only masked" with a blank mask runs plain img2img of the whole picture, the init image brought to
    width x height by resize_mode as any img2img (its `crop_region is None` branch), not always stretched."""
    image = _noise_image((96, 40))
    got = masking.prepare(image, Image.new("L", image.size, 0), (64, 64), only_masked=True, padding=4,
                          fill_content=True, resize_mode=mode)
    assert got.mask is None and got.overlay is None and got.note == masking.BLANK_MASK
    assert got.image.tobytes() == masking.resize_image(mode, image, 64, 64).tobytes()


def test_server_mask_blur_as_a1111s_api():
    """A1111's API takes any mask_blur: one above its UI slider's 64 blurs (the overlay's edge spreads that far), one
    of 0 or less blurs nothing (its `if mask_blur_x > 0`) and writes no "Mask blur" key; both were 422s."""
    init = _noise_image((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    body = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 3, "init_images": [png_b64(init)],
            "mask": png_b64(mask), "inpaint_full_res": False, "inpainting_fill": 1}
    a = np.asarray(init).astype(int)
    with main_server().client(timeout=300) as c:
        outs = {}
        for blur in (0, -2, 100):
            r = c.post("/sdapi/v1/img2img", json={**body, "mask_blur": blur})
            assert r.status_code == 200, r.text
            outs[blur] = np.asarray(decode(r.json()["images"][0])).astype(int)
            params = parse_infotext(info(r)["infotexts"][0])[2]
            assert params.get("Mask blur") == ("100" if blur == 100 else None)
    assert (outs[-2] == outs[0]).all()
    assert (outs[0][np.asarray(mask) == 0] == a[np.asarray(mask) == 0]).all()  # (the overlay, unblurred)
    assert (outs[100][:4, :4] != a[:4, :4]).any()  # (a blur of 100 reaches the corners)


def test_9_channel_conditioning_mask_without_mask_round(tiny_inpainting):
    """A1111's inpainting_image_conditioning rounds its mask only with mask_round: without it (latent_mask
    "bicubic-soft") the mask channel keeps the blurred mask's grey levels (sampled to latent size) and the masked
    image is the image times 1 - mask; with it, the thresholded mask as before."""
    import torch

    image = _noise_image((64, 64))
    mask = masking.blur(Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)), 8, 8)
    s = tiny_inpainting.resolve(GenerationSettings("a cat", steps=2, seed=1), image)
    grey = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    for how, m in (("bicubic-soft", grey), ("bicubic", (grey >= 0.5).float())):
        got = tiny_inpainting.prepare_latents(s, [1], image=image, mask=mask, latent_mask=how).extra["c_concat"]
        want_masked = tiny_inpainting.encode_images(pil_to_tensor(image) * (1 - m), None)
        assert torch.equal(got[:, :1], torch.nn.functional.interpolate(m, size=(8, 8)))
        assert torch.allclose(got[:, 1:], want_masked, atol=1e-6)
        soft = ((got[:, :1] > 0) & (got[:, :1] < 1)).any()
        assert bool(soft) == (how == "bicubic-soft")


def test_latent_noise_of_every_iteration_is_the_first_iterations(tiny, monkeypatch):
    """A1111 fills the masked latents with "latent noise" once, in its img2img init, from all_seeds[0:batch_size]:
    every n_iter iteration gets the first iteration's seeds' noise (the server runs an iteration per generate call:
    fill_seed). Pipeline.generate's default is the run's own seeds."""
    import fastsd.pipeline as pipeline
    from fastsd.serve import generation

    drawn = []

    def spy(seeds, *args, **kw):
        drawn.append(list(seeds))
        return first_draws(seeds, *args, **kw)

    first_draws = pipeline.first_draws
    monkeypatch.setattr(pipeline, "first_draws", spy)
    image, mask = _noise_image((64, 64)), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(image=image, mask=mask, steps=1, num_images=2, masked_content="latent noise", progress=False)
    a = tiny.generate("a cat", seed=12, fill_seed=10, **kw)
    assert drawn == [[10, 11]]
    b = tiny.generate("a cat", seed=12, **kw)
    assert drawn[-1] == [12, 13] and a[0].tobytes() != b[0].tobytes()
    with pytest.raises(ValueError, match=r"^fill_seed must be a seed \(an integer >= 0\), got -1$"):
        tiny.generate("a cat", seed=12, fill_seed=-1, **kw)

    class Job:  # (run_plan's view of a queued job)
        kind, cancelled, stopped = "img2img", False, False

        def on_step(self, *args):
            pass

    seen = []
    plan = generation.Plan("img2img", type("Entry", (), {"pipe": tiny, "name": "t", "hash": ""})(),
                           tiny.resolve(GenerationSettings("a cat", steps=1, seed=10, num_images=2), image),
                           2, image, mask, (), (), True, {}, masked_content="latent noise")
    networks = type("Networks", (), {"apply": lambda self, pipe, loras: None})()
    vaes = type("Vaes", (), {"apply": lambda self, pipe, vae: None})()
    drawn.clear()
    monkeypatch.setattr(tiny, "generate", lambda *a, **k: seen.append(k["fill_seed"]) or pipeline.Pipeline.generate(
        tiny, *a, **k))
    generation.run_plan(plan, Job(), networks, vaes)
    assert seen == [10, 10] and drawn == [[10, 11], [10, 11]]


def test_generate_takes_an_init_image_per_image_of_the_batch(tiny):
    """A1111's init_images: image i of the batch starts from init image i (its seed seed + i): each result is the
    one of a batch of that init image alone at that place, and close to a run of it alone at its seed."""
    a, b = _noise_image((32, 32), 2), _noise_image((48, 40), 3)  # (each resized to the size, as one would be)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    kw = dict(steps=1, seed=5, num_images=2, strength=0.6, width=32, height=32, mask=mask, progress=False)
    both = tiny.generate("a cat", image=[a, b], **kw)
    assert both[0].tobytes() == tiny.generate("a cat", image=[a, a], **kw)[0].tobytes()
    assert both[1].tobytes() == tiny.generate("a cat", image=[b, b], **kw)[1].tobytes()
    alone = tiny.generate("a cat", image=b, **{**kw, "seed": 6, "num_images": 1})[0]
    assert np.abs(np.asarray(alone).astype(int) - np.asarray(both[1])).max() <= 1
    assert _params(both[1])["Seed"] == "6"
    with pytest.raises(ValueError, match=r"^image: 3 images for num_images 2: give one, or one per image$"):
        tiny.generate("a cat", image=[a, b, a], **kw)
    with pytest.raises(TypeError, match=r"^image must be a PIL image or a list of one per image of the batch"):
        tiny.generate("a cat", image=[a, "b.png"], **kw)


def test_resize_mode_3_resizes_the_latents(tiny):
    """A1111's resize_mode 3, "just resize (latent upscale)": the init image is not resized but encoded at its own
    size, its latents then resized to width/8 x height/8 (bilinear); a mask with it only when the image has the output
    size (then it is mode 0: A1111 fails otherwise)."""
    import torch

    image = _noise_image((96, 40))
    s = tiny.resolve(GenerationSettings("a cat", steps=2, seed=1, width=64, height=64), image)
    x0 = tiny.prepare_latents(s, [1], image=image, resize_mode=3).x0
    want = torch.nn.functional.interpolate(tiny.encode_images(pil_to_tensor(image), None), size=(8, 8),
                                           mode="bilinear")
    assert torch.equal(x0, want)
    assert not torch.allclose(x0, tiny.prepare_latents(s, [1], image=image).x0, atol=1e-3)
    kw = dict(steps=1, seed=1, width=64, height=64, strength=0.5, progress=False)
    out = tiny.generate("a cat", image=image, resize_mode=3, **kw)[0]
    assert out.size == (64, 64) and out.tobytes() != tiny.generate("a cat", image=image, **kw)[0].tobytes()
    mask = Image.new("L", (64, 64), 255)
    with pytest.raises(ValueError, match=r"^resize_mode 3 \(latent upscale\) takes no mask unless"):
        tiny.generate("a cat", image=image, mask=mask, resize_mode=3, **kw)
    square = _noise_image((64, 64))
    assert tiny.generate("a cat", image=square, mask=mask, resize_mode=3, **kw)[0].tobytes() == \
        tiny.generate("a cat", image=square, mask=mask, **kw)[0].tobytes()
    with pytest.raises(ValueError, match=r"^resize_mode must be one of 0 \(just resize\)"):
        tiny.generate("a cat", image=image, resize_mode=4, **kw)


def test_resize_image_mode_3_is_a1111s_else_branch():
    """A1111's images.resize_image runs any mode but 0 and 1 as 2 (resize and fill): its 3 on a mask."""
    mask = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 96), dtype=np.uint8))
    assert masking.resize_image(3, mask, 64, 64).tobytes() == masking.resize_image(2, mask, 64, 64).tobytes()


def test_server_init_images_and_resize_mode_3():
    """The server as A1111's img2img API: several init_images run one per image of the batch (batch_size becomes
    their count when it is larger; more than batch_size is refused), resize_mode 3 resizes the latents (no warning,
    not mode 0's image), and with a mask on the whole picture needs an init image of the output size."""
    a, b, wide = _noise_image((64, 64), 2), _noise_image((64, 64), 3), _noise_image((96, 40), 4)
    base = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 3, "denoising_strength": 0.6}
    with main_server().client(timeout=300) as c:
        def run(**kw):
            r = c.post("/sdapi/v1/img2img", json={**base, **kw})
            assert r.status_code == 200, r.text
            return [np.asarray(decode(x)) for x in r.json()["images"]], info(r)

        two, got = run(init_images=[png_b64(a), png_b64(b)], batch_size=4)
        assert len(two) == 2 and got["all_seeds"] == [3, 4] and got["batch_size"] == 2
        assert any("2 init_images given" in w for w in got["warnings"])
        same_b, _ = run(init_images=[png_b64(b), png_b64(b)], batch_size=2)
        assert (two[1] == same_b[1]).all() and (two[0] != same_b[0]).any()
        r = c.post("/sdapi/v1/img2img", json={**base, "init_images": [png_b64(a)] * 3, "batch_size": 2})
        assert r.status_code == 422 and "init_images: 3 images for batch_size 2" in r.text
        latent, got = run(init_images=[png_b64(wide)], resize_mode=3)
        plain, _ = run(init_images=[png_b64(wide)], resize_mode=0)
        assert got["warnings"] == [] and (latent[0] != plain[0]).any()
        blank, got = run(init_images=[png_b64(wide)], resize_mode=3, mask=png_b64(Image.new("L", (96, 40), 0)))
        assert (blank[0] == latent[0]).all() and got["warnings"] == [masking.BLANK_MASK]  # ("only masked"'s fallback)
        mask = png_b64(Image.new("L", (64, 64), 255))
        r = c.post("/sdapi/v1/img2img", json={**base, "init_images": [png_b64(wide)], "resize_mode": 3, "mask": mask,
                                              "inpaint_full_res": False})
        assert r.status_code == 422 and "resize_mode 3 (latent upscale) with a mask needs" in r.text
        run(init_images=[png_b64(a)], resize_mode=3, mask=mask, inpaint_full_res=False)  # (the output's size: 0)
