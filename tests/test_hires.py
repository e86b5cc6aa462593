"""A1111's hires fix: its target-size rules, its second-pass steps (the requested steps at the end of a schedule of
steps / strength), latent and image upscalers, the infotext keys, progress and interrupts over both passes, bad
settings named, and the CLI and server options."""
import json
import re

import numpy as np
import pytest
import torch
from serve_server import decode, info, main_server

import fastsd
from fastsd import hires
from fastsd.generate import main as cli
from fastsd.image import parse_infotext, pil_to_tensor, tensor_to_pil
from fastsd.pipeline import Prepared, seeded_noise
from fastsd.samplers import get_sampler
from fastsd.settings import GenerationSettings

KW = dict(prompt="a cat", steps=3, width=64, height=48, guidance_scale=1.0, sampler="euler", progress=False)
SETTINGS = {k: v for k, v in KW.items() if k != "progress"}


@pytest.fixture(scope="module")
def pipe():
    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


def a1111_target(width, height, hr_scale, hr_resize_x, hr_resize_y):
    """calculate_target_resolution of A1111's StableDiffusionProcessingTxt2Img: (to_x, to_y, truncate_x, truncate_y)."""
    truncate_x = truncate_y = 0
    if hr_resize_x == 0 and hr_resize_y == 0:
        return int(width * hr_scale), int(height * hr_scale), 0, 0
    if hr_resize_y == 0:
        to_x, to_y = hr_resize_x, hr_resize_x * height // width
    elif hr_resize_x == 0:
        to_x, to_y = hr_resize_y * width // height, hr_resize_y
    else:
        if width / height < hr_resize_x / hr_resize_y:
            to_x, to_y = hr_resize_x, hr_resize_x * height // width
        else:
            to_x, to_y = hr_resize_y * width // height, hr_resize_y
        truncate_x = (to_x - hr_resize_x) // 8
        truncate_y = (to_y - hr_resize_y) // 8
    return to_x, to_y, truncate_x, truncate_y


@pytest.mark.parametrize("case", [(512, 512, 2, 0, 0), (512, 768, 1.5, 0, 0), (520, 456, 1.7, 0, 0),
                                  (512, 768, 2, 1024, 0), (512, 768, 2, 0, 1000), (512, 768, 2, 1024, 1024),
                                  (768, 512, 2, 1024, 1024), (640, 384, 2, 1000, 720), (384, 640, 1, 600, 1200)])
def test_target_is_a1111s(case):
    t = hires.target(*case)
    assert (t.up_w, t.up_h, t.trunc_x, t.trunc_y) == a1111_target(*case)
    x = torch.zeros(1, 4, *t.latent_size)
    assert hires.crop(x, t).shape[2:] == (t.size[1] // 8, t.size[0] // 8)  # the crop gives the final size
    if case[3] and case[4]:  # both given: the final image is the requested one (to the multiple of 8 below)
        assert all(abs(got - want) < 16 for got, want in zip(t.size, case[3:]))


@pytest.mark.parametrize("steps,strength,want", [(20, 0.7, (28, 20)), (10, 0.5, (20, 10)), (4, 1.0, (4, 4)),
                                                 (3, 0.35, (8, 3))])
def test_second_pass_steps_are_a1111s(steps, strength, want):
    """setup_img2img_steps with its steps given: int(steps / min(strength, 0.999)) in all, the last `steps` run."""
    assert hires.second_pass_steps(steps, strength) == want


def _unet_calls(pipe, monkeypatch):
    calls = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, t, c: calls.append(tuple(x.shape)) or forward(x, t, c))
    return calls


def test_hires_is_the_first_pass_upscaled_and_refined(pipe, monkeypatch):
    """The stages by hand (A1111's sample + sample_hr_pass with the "Latent" upscaler) give the same bits."""
    s = pipe.resolve(GenerationSettings(**SETTINGS, seed=7, num_images=2), None)
    calls = _unet_calls(pipe, monkeypatch)
    got = pipe.generate(**{**KW, "num_images": 2}, seed=7, hires_scale=2, hires_steps=2, hires_strength=0.6)
    assert [im.size for im in got] == [(128, 96)] * 2
    assert calls == [(2, 4, 6, 8)] * 3 + [(2, 4, 12, 16)] * 2  # 3 first-pass steps, then the 2 hires steps
    calls.clear()
    cond, _ = pipe.encode_prompt([s.prompt], None)
    x = pipe.denoise(pipe.prepare_latents(s, [7, 8]), cond, None, s, progress=False)
    up = torch.nn.functional.interpolate(x, size=(12, 16), mode="bilinear", antialias=False)
    full = get_sampler("euler").schedule(3)  # int(2 / 0.6) = 3 steps, the last 2 run
    sched = full.tail(1)
    assert torch.equal(sched.sigmas, full.sigmas[1:]) and len(sched) == 2
    gens = [torch.Generator().manual_seed(seed) for seed in (7, 8)]
    p = Prepared(up + seeded_noise(gens, (4, 12, 16), pipe.device) * float(sched.sigmas[0]), sched, gens, x0=up)
    want = tensor_to_pil(pipe.decode(pipe.denoise(p, cond, None, s.replace(width=128, height=96, steps=3),
                                                  progress=False)))
    assert [np.asarray(a).tolist() for a in got] == [np.asarray(b).tolist() for b in want]


def test_strength_0_upscales_only_and_image_upscalers_decode_and_encode(pipe, monkeypatch):
    calls = _unet_calls(pipe, monkeypatch)
    only = pipe.generate(**KW, seed=3, hires_scale=2, hires_strength=0)[0]
    assert len(calls) == 3 and only.size == (128, 96)
    s = pipe.resolve(GenerationSettings(**SETTINGS, seed=3), None)
    cond, _ = pipe.encode_prompt([s.prompt], None)
    x = pipe.denoise(pipe.prepare_latents(s, [3]), cond, None, s, progress=False)
    want = tensor_to_pil(pipe.decode(torch.nn.functional.interpolate(x, size=(12, 16), mode="bilinear")))[0]
    assert np.asarray(only).tolist() == np.asarray(want).tolist()
    lanczos = pipe.generate(**KW, seed=3, hires_scale=2, hires_strength=0, hires_upscaler="lanczos")[0]
    low = tensor_to_pil(pipe.decode(x))[0].resize((128, 96), resample=hires.IMAGE_RESAMPLE["Lanczos"])
    want = tensor_to_pil(pipe.decode(pipe.encode_images(pil_to_tensor(low), None)))[0]
    assert np.asarray(lanczos).tolist() == np.asarray(want).tolist()
    assert np.abs(np.asarray(lanczos).astype(int) - np.asarray(only).astype(int)).max() > 8


def test_infotext_keys_are_a1111s(pipe):
    im = pipe.generate(**KW, seed=2, hires_scale=1.5, hires_steps=2)[0]
    text = im.info["parameters"]
    assert im.size == (96, 72)
    assert text.endswith("Size: 64x48, Model: \"random:tiny\", Denoising strength: 0.7, RNG: CPU, Hires upscale: 1.5, "
                         "Hires steps: 2, Hires upscaler: Latent")
    im = pipe.generate(**KW, seed=2, hires_width=128, hires_height=128, hires_upscaler="Latent (nearest-exact)")[0]
    params = parse_infotext(im.info["parameters"])[2]
    assert im.size == (128, 128) and params["Hires resize"] == "128x128" and "Hires steps" not in params
    assert params["Hires upscaler"] == "Latent (nearest-exact)" and params["Size"] == "64x48"
    assert "Hires" not in pipe.generate(**KW, seed=2)[0].info["parameters"]


def test_progress_and_interrupts_span_both_passes(pipe):
    seen = []
    pipe.generate(**KW, seed=1, hires_scale=2, hires_steps=2, on_step=lambda i, n, prev: seen.append((i, n)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]

    def stop_at(k):
        def on_step(i, n, prev):
            if i == k:
                raise fastsd.Interrupted()
        return on_step

    with pytest.raises(fastsd.Interrupted) as stop:  # its step counts as on_step does, over both passes
        pipe.generate(**KW, seed=1, hires_scale=2, hires_steps=2, on_step=stop_at(4))
    assert stop.value.step == 4 and stop.value.latents.shape[2:] == (12, 16)
    first = pipe.generate(**KW, seed=1, hires_scale=2, on_step=stop_at(2), on_interrupt="decode")[0]
    second = pipe.generate(**KW, seed=1, hires_scale=2, hires_steps=2, on_step=stop_at(4), on_interrupt="decode")[0]
    assert first.size == (64, 48) and second.size == (128, 96)  # A1111: an interrupt in the first pass skips the second


def test_inpainting_model_hires():
    pipe = fastsd.load_pipeline("random:tiny-inpainting", device="cpu", dtype="fp32", backend="torch")
    assert pipe.generate(**KW, seed=1, hires_scale=2)[0].size == (128, 96)


@pytest.mark.parametrize("kw,err,match", [
    (dict(hires_scale=0), ValueError, "hires_scale must be in (0, 8], got 0"),
    (dict(hires_scale=0.1), ValueError, "the hires fix would make a 0x0 image: each side must be 8..4096 px"),
    (dict(enable_hires="yes"), TypeError, "enable_hires must be True or False, got 'yes'"),
    (dict(hires_scale=float("inf")), ValueError, "hires_scale must be a finite number"),
    (dict(hires_width=5000), ValueError, "hires_width must be 0 or a size up to 4096, got 5000"),
    (dict(hires_height=-8), ValueError, "hires_height must be at least 0"),
    (dict(hires_scale=2, hires_strength=1.5), ValueError, "hires_strength must be in [0, 1], got 1.5"),
    (dict(hires_scale=2, hires_upscaler="R-ESRGAN 4x+"), ValueError, "unknown hires upscaler 'R-ESRGAN 4x+'"),
    (dict(hires_scale=2, hires_upscaler=3), TypeError, "hires_upscaler must be a string"),
    (dict(hires_scale=2, hires_steps=1001), ValueError, "hires_steps must be at most 1000"),
    (dict(hires_scale=2, hires_steps=40, hires_strength=0.02), ValueError,
     "hires_strength 0.02 with 40 steps needs a schedule of 2000 steps"),
    (dict(hires_scale=2, hires_strength=5e-324), ValueError,  # (was an OverflowError from int(inf))
     "hires_strength 5e-324 with 3 steps needs a schedule of over 2**31 steps"),
    (dict(width=4096, height=512, hires_scale=1.5), ValueError, "the hires fix would make a 6144x768 image"),
    (dict(width=8, height=2048, hires_width=2048, hires_height=8), ValueError,  # (the cover, before the crop)
     "the hires fix would upscale to 2048x524288 before its crop to 2048x8"),
])
def test_bad_hires_settings_are_named(pipe, kw, err, match):
    with pytest.raises(err, match=re.escape(match)):
        pipe.generate(**{**KW, **kw}, seed=1)


def test_hires_is_txt2img_only(pipe):
    with pytest.raises(ValueError, match="the hires fix is for txt2img"):
        pipe.generate(**KW, seed=1, hires_scale=2, image=tensor_to_pil(torch.zeros(1, 3, 48, 64))[0])


def test_cli_hires(tmp_path, capsys):
    out = tmp_path / "h.png"
    args = ["a cat", "--model", "random:tiny", "--steps", "2", "--width", "64", "--height", "64", "--seed", "2",
            "--no-progress"]
    assert cli([*args, "--hires-scale", "2", "--hires-upscaler", "Latent (bicubic)", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (128, 128)
        assert parse_infotext(im.info["parameters"])[2]["Hires upscaler"] == "Latent (bicubic)"
    assert cli([*args, "--hires-scale", "2", "--hires-upscaler", "4x-UltraSharp", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown hires upscaler '4x-UltraSharp'") and not (tmp_path / "x.png").exists()


def test_server_enable_hr():
    server = main_server()
    req = {"prompt": "a cat", "steps": 2, "width": 64, "height": 48, "seed": 5, "sampler_name": "Euler",
           "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "hr_sampler_name": "DDIM"}
    with server.client() as c:
        r = c.post("/sdapi/v1/txt2img", json=req)
        assert r.status_code == 200, r.text
        meta = info(r)
        assert decode(r.json()["images"][0]).size == (128, 96) and meta["denoising_strength"] == 0.75
        params = parse_infotext(meta["infotexts"][0])[2]
        assert (params["Size"], params["Hires upscale"], params["Hires steps"], params["Denoising strength"]) == \
            ("64x48", "2.0", "2", "0.75")  # (A1111's API: hr_scale a float, written as given)
        assert meta["warnings"] == [] and params["Hires sampler"] == "DDIM" and params["Sampler"] == "Euler"
        r = c.post("/sdapi/v1/txt2img", json={**req, "hr_sampler_name": None, "hr_resize_x": 100, "hr_resize_y": 0,
                                               "hr_upscaler": "Nearest", "denoising_strength": 0.5})
        assert r.status_code == 200, r.text
        assert decode(r.json()["images"][0]).size == (96, 72)  # 100 x (100 * 48 // 64), to latents: A1111's rule
        params = parse_infotext(info(r)["infotexts"][0])[2]
        assert info(r)["warnings"] == [] and params["Hires resize"] == "100x0" and params["Hires upscaler"] == "Nearest"
        quiet = info(c.post("/sdapi/v1/txt2img", json={**req, "hr_sampler_name": "Use same sampler",
                                                        "hr_scheduler": "Use same scheduler"}))
        assert quiet["warnings"] == []
        r = c.post("/sdapi/v1/txt2img", json={**req, "hr_sampler_name": None, "hr_scheduler": "Exponential",
                                               "hr_scale": 0, "hr_resize_x": 128})  # (hr_scale: ignored, as A1111)
        assert r.status_code == 200 and decode(r.json()["images"][0]).size == (128, 96)
        assert info(r)["warnings"] == []  # (its own schedule type: the hires pass runs Exponential)
        assert parse_infotext(info(r)["infotexts"][0])[2]["Hires schedule type"] == "Exponential"
        r = c.post("/sdapi/v1/txt2img", json={**req, "hr_sampler_name": None, "scheduler": "Exponential",
                                               "hr_scheduler": "Exponential"})
        assert r.status_code == 200 and info(r)["warnings"] == [], r.text
        params = parse_infotext(info(r)["infotexts"][0])[2]
        assert params["Schedule type"] == "Exponential" and "Hires schedule type" not in params
        karras = info(c.post("/sdapi/v1/txt2img", json={**req, "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras"}))
        params = parse_infotext(karras["infotexts"][0])[2]  # (split, as A1111 1.9+ writes it)
        assert (params["Hires sampler"], params["Hires schedule type"]) == ("DPM++ 2M", "Karras")
        assert not karras["warnings"]
        bad = c.post("/sdapi/v1/txt2img", json={**req, "hr_sampler_name": "Nope"})
        assert bad.status_code == 422 and "hr_sampler_name: unknown sampler 'Nope'" in bad.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={**req, "hr_scale": 1, "hr_sampler_name": None, "hr_upscaler": None})
        same = info(r)  # (A1111 1.6+: a second pass at the same size; hr_upscaler unset: Latent, no key written)
        params = parse_infotext(same["infotexts"][0])[2]
        assert same["warnings"] == [] and decode(r.json()["images"][0]).size == (64, 48)
        assert params["Hires upscale"] == "1.0" and params["Denoising strength"] == "0.75"
        assert "Hires upscaler" not in params
        first = info(c.post("/sdapi/v1/txt2img", json={**req, "enable_hr": False}))
        assert first["seed"] == same["seed"] and r.json()["images"][0] != c.post(
            "/sdapi/v1/txt2img", json={**req, "enable_hr": False}).json()["images"][0]
        for bad, match in [({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler: unknown upscaler 'ESRGAN_4x'"),
                           ({"width": 1600, "height": 1600}, "the hires fix would make a 3200x3200 image, above this "
                                                              "server's limit of 2048 px"),
                           ({"denoising_strength": 2}, "denoising_strength must be in [0, 1], got 2"),
                           ({"hr_second_pass_steps": 500}, "hr_second_pass_steps 500 is above this server's limit"),
                           ({"hr_second_pass_steps": -1}, "hr_second_pass_steps must be at least 1, got -1"),
                           ({"hr_resize_x": 5000}, "hr_resize_x must be 0 or a size up to this server's limit of 2048"),
                           ({"hr_resize_x": -8}, "hr_resize_x must be 0 or a size")]:
            r = c.post("/sdapi/v1/txt2img", json={**req, **bad})
            assert r.status_code == 422 and match in json.dumps(r.json()), (bad, r.text)


def test_hires_sampler_runs_the_second_pass(pipe, monkeypatch):
    """A1111's "Hires sampler": the second pass's sampler and schedule; the first pass's unchanged."""
    import fastsd.pipeline as pl

    used = []
    get = pl.get_sampler
    monkeypatch.setattr(pl, "get_sampler", lambda name: used.append(name) or get(name))
    a = pipe.generate(**KW, seed=4, hires_scale=2, hires_steps=4, hires_strength=0.9, hires_sampler="Euler a")[0]
    assert "Euler a" in used
    b = pipe.generate(**KW, seed=4, hires_scale=2, hires_steps=4, hires_strength=0.9)[0]
    params = parse_infotext(a.info["parameters"])[2]
    assert params["Hires sampler"] == "Euler a" and params["Sampler"] == "Euler"
    assert "Hires sampler" not in b.info["parameters"]
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() > 8
    same = pipe.generate(**KW, seed=4, hires_scale=2, hires_steps=4, hires_strength=0.9, hires_sampler="euler")[0]
    assert np.asarray(same).tolist() == np.asarray(b).tolist() and "Hires sampler" not in same.info["parameters"]
    with pytest.raises(ValueError, match="hires_sampler: unknown sampler 'x'"):
        pipe.generate(**KW, seed=4, hires_scale=2, hires_sampler="x")


def test_hires_schedule_type_runs_the_second_pass(pipe, monkeypatch):
    """A1111's "Hires schedule type": the second pass walks its own type's levels (the first pass its own), the
    infotext names it where it is not the first pass's, --infotext reads it back to the same image; a type that can't
    drive the hires sampler is named."""
    from fastsd.infotext_settings import settings_from_infotext

    calls = []
    real = type(pipe).schedule
    monkeypatch.setattr(type(pipe), "schedule", lambda self, *a: calls.append(a) or real(self, *a))
    kw = dict(KW, seed=4, hires_scale=2, hires_steps=4, hires_strength=0.9, schedule_type="karras")
    a = pipe.generate(**kw, hires_schedule_type="exponential")[0]
    assert [c[2] for c in calls] == ["karras", "exponential"]
    b = pipe.generate(**kw)[0]
    assert [c[2] for c in calls[2:]] == ["karras", "karras"]
    same = pipe.generate(**kw, hires_schedule_type="Karras")[0]  # (its A1111 label: the first pass's, unwritten)
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # (a few levels apart on the tiny model; calls: which ran)
    assert np.array_equal(np.asarray(same), np.asarray(b)) and "Hires schedule type" not in b.info["parameters"]
    params = parse_infotext(a.info["parameters"])[2]
    assert params["Schedule type"] == "Karras" and params["Hires schedule type"] == "Exponential"
    read = settings_from_infotext(a.info["parameters"])[0]
    assert read["hires_schedule_type"] == "exponential"  # (Euler + Karras read as its twin, euler_karras)
    again = pipe.generate(**{**KW, **read, "progress": False})[0]
    assert np.array_equal(np.asarray(again), np.asarray(a))
    assert parse_infotext(again.info["parameters"])[2]["Hires schedule type"] == "Exponential"
    own = pipe.generate(**kw, hires_schedule_type="automatic")[0]  # the sampler's own: written "Automatic"
    assert parse_infotext(own.info["parameters"])[2]["Hires schedule type"] == "Automatic"
    with pytest.raises(ValueError, match="hires_schedule_type: schedule type 'karras' does not apply to ddim"):
        pipe.generate(**KW, seed=4, hires_scale=2, hires_sampler="ddim", hires_schedule_type="karras")
    with pytest.raises(ValueError, match="hires_schedule_type: unknown schedule type"):
        pipe.generate(**KW, seed=4, hires_scale=2, hires_schedule_type="fast")


def test_hires_prompt_conditions_the_second_pass(pipe):
    """A1111's hr_prompt / hr_negative_prompt: the stages by hand with the hires prompts' conditioning in the second
    pass give the same bits; "Hires prompt" / "Hires negative prompt" in the infotext where they differ (A1111's
    order, after "Hires sampler"); the same text as the prompt changes nothing; its LoRA tags must be the prompt's."""
    kw = {**KW, "guidance_scale": 3.0, "negative_prompt": "blur", "seed": 4, "hires_scale": 2, "hires_steps": 2}
    got = pipe.generate(**kw, hires_prompt="a dog, detailed", hires_negative_prompt="ugly")[0]
    s = pipe.resolve(GenerationSettings(**{k: v for k, v in kw.items() if k != "progress"},
                                        hires_prompt="a dog, detailed", hires_negative_prompt="ugly"), None)
    cond, uncond = pipe.encode_prompt([s.prompt], [s.negative_prompt])
    x = pipe.denoise(pipe.prepare_latents(s, [4]), cond, uncond, s, progress=False)
    cond2, uncond2 = pipe.encode_prompt(["a dog, detailed"], ["ugly"])
    want = tensor_to_pil(pipe.decode(pipe.hires_pass(s, x, [4], cond2, uncond2, progress=False)))[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    plain = pipe.generate(**kw)[0]
    assert not np.array_equal(np.asarray(got), np.asarray(plain))
    same = pipe.generate(**kw, hires_prompt="a cat", hires_negative_prompt="blur")[0]
    assert np.array_equal(np.asarray(same), np.asarray(plain))
    assert same.info["parameters"] == plain.info["parameters"]
    params = parse_infotext(got.info["parameters"])[2]
    assert (params["Hires prompt"], params["Hires negative prompt"]) == ("a dog, detailed", "ugly")
    names = list(params)
    assert names.index("Denoising strength") < names.index("Hires prompt") < names.index("Hires upscale")
    only_negative = parse_infotext(pipe.generate(**kw, hires_negative_prompt="ugly")[0].info["parameters"])[2]
    assert "Hires prompt" not in only_negative and only_negative["Hires negative prompt"] == "ugly"
    with pytest.raises(ValueError, match="hires_prompt: its <lora:...> tags must be the prompt's"):
        pipe.generate(**kw, hires_prompt="a dog <lora:ink:0.5>")


def test_server_hr_prompt():
    req = {"prompt": "a cat", "steps": 2, "width": 64, "height": 48, "seed": 5, "enable_hr": True, "hr_scale": 2,
           "hr_second_pass_steps": 2, "cfg_scale": 3}
    with main_server().client() as c:
        plain = c.post("/sdapi/v1/txt2img", json=req)
        r = c.post("/sdapi/v1/txt2img", json={**req, "hr_prompt": "a dog", "hr_negative_prompt": "blurry"})
        assert r.status_code == 200 and info(r)["warnings"] == [], r.text
        params = parse_infotext(info(r)["infotexts"][0])[2]
        assert (params["Hires prompt"], params["Hires negative prompt"]) == ("a dog", "blurry")
        assert np.abs(np.asarray(decode(r.json()["images"][0])).astype(int)
                      - np.asarray(decode(plain.json()["images"][0]))).max() > 0
        bad = c.post("/sdapi/v1/txt2img", json={**req, "hr_prompt": "a dog <lora:detail:1>"})
        assert bad.status_code == 422 and "hr_prompt: its <lora:...> tags must be the prompt's" in bad.json()["detail"]


def test_hires_checkpoint_runs_the_second_pass_on_another_model(pipe):
    """A1111's "Hires checkpoint" (Pipeline.generate(hires_pipe=)): the first pass on this model, the hires pass
    (its text encoder, UNet) and the final decode on the other; the infotext names it; the same model is no change;
    a pipeline that can't take the latents, or no hires fix, is named."""
    other = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    other.name = "tiny-b"
    with torch.no_grad():
        for p in [*other.unet.parameters(), *other.vae.decoder.parameters()]:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    calls = {}
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.update({name: calls.get(name, 0) + 1}))
             for name, m in (("unet", pipe.unet), ("unet-b", other.unet), ("decoder", pipe.vae.decoder),
                             ("decoder-b", other.vae.decoder), ("clip-b", other.clip))]
    try:
        kw = dict(KW, seed=4, hires_scale=2, hires_steps=4, hires_strength=0.9)
        a = pipe.generate(**kw, hires_pipe=other)[0]
        assert calls == {"unet": 3, "unet-b": 4, "decoder-b": 1, "clip-b": 1}, calls
    finally:
        for h in hooks:
            h.remove()
    b = pipe.generate(**kw)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    params = parse_infotext(a.info["parameters"])[2]
    assert params["Hires checkpoint"] == "tiny-b" and params["Model"] == pipe.name
    same = pipe.generate(**kw, hires_pipe=pipe)[0]
    assert np.array_equal(np.asarray(same), np.asarray(b)) and "Hires checkpoint" not in same.info["parameters"]
    with pytest.raises(ValueError, match="hires_pipe: the run has no hires fix"):
        pipe.generate(**KW, seed=4, hires_pipe=other)
    half = fastsd.load_pipeline("random:tiny", device="cpu", dtype="bf16", backend="torch")
    with pytest.raises(ValueError, match=r"hires_pipe: its model \(random:tiny: cpu, torch.bfloat16"):
        pipe.generate(**kw, hires_pipe=half)


def test_server_hr_checkpoint_name():
    """hr_checkpoint_name names another of the server's models (by /sd-models' names) for the second pass: its
    "Hires checkpoint" in the infotext; "Use same checkpoint" and the request's own are no change; unknown: 422."""
    server = main_server()
    req = {"prompt": "a cat", "steps": 2, "width": 64, "height": 48, "seed": 3, "sampler_name": "Euler",
           "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.6}
    with server.client() as c:
        own = c.post("/sdapi/v1/txt2img", json=req)
        other = c.post("/sdapi/v1/txt2img", json={**req, "hr_checkpoint_name": "random:tiny-inpainting"})
        same = c.post("/sdapi/v1/txt2img", json={**req, "hr_checkpoint_name": "Use same checkpoint"})
        bad = c.post("/sdapi/v1/txt2img", json={**req, "hr_checkpoint_name": "nope.safetensors"})
    assert own.status_code == other.status_code == same.status_code == 200, other.text
    assert info(other)["warnings"] == [] and not np.array_equal(np.asarray(decode(other.json()["images"][0])),
                                                                 np.asarray(decode(own.json()["images"][0])))
    params = parse_infotext(info(other)["infotexts"][0])[2]
    assert params["Hires checkpoint"] == "random:tiny-inpainting" and params["Model"] == "random:tiny"
    assert same.json()["images"] == own.json()["images"]
    assert bad.status_code == 422 and "hr_checkpoint_name: unknown model 'nope.safetensors'" in bad.json()["detail"]


# ---- the audit's findings (A1111 1.10's processing.py / images.py / upscaler.py, transcribed here) ----------------

def a1111_resize_image(im, width, height, upscaler):
    """A1111's images.resize_image(0, im, width, height, upscaler_name) with its built-in "None" / "Lanczos" / "Nearest"
    (UpscalerNone/Lanczos/Nearest: Upscaler.upscale, do_upscale a PIL resize by the scale)."""
    from PIL import Image

    if upscaler == "None":
        return im.resize((width, height), resample=Image.LANCZOS)
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:  # Upscaler.upscale(img, scale)
        dest_w, dest_h = int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8)
        for i in range(3):
            if im.width >= dest_w and im.height >= dest_h and (i > 0 or scale != 1):
                break
            shape = im.size
            im = im.resize((int(im.width * scale), int(im.height * scale)),
                           resample={"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}[upscaler])
            if shape == im.size:
                break
        if im.width != dest_w or im.height != dest_h:
            im = im.resize((int(dest_w), int(dest_h)), resample=Image.LANCZOS)
    if im.width != width or im.height != height:
        im = im.resize((width, height), resample=Image.LANCZOS)
    return im


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest"])
@pytest.mark.parametrize("target", [dict(hires_scale=1.3), dict(hires_width=100, hires_height=40),
                                    dict(hires_scale=0.75)])
def test_image_upscalers_resize_as_a1111(pipe, upscaler, target):
    """"Lanczos" / "Nearest": A1111's chain (upscaled by the scale, Lanczos to that size floored to 8 px, Lanczos to
    the target; below 1 one Lanczos resize) on the decoded first pass, encoded (the mean), cropped: x1.3 (83x62, not
    a multiple of 8), a resize of another aspect (100x75 cropped to 96x40), a downscale."""
    got = pipe.generate(**KW, seed=3, hires_strength=0, hires_upscaler=upscaler, **target)[0]
    s = pipe.resolve(GenerationSettings(**SETTINGS, seed=3, **target), None)
    cond, _ = pipe.encode_prompt([s.prompt], None)
    x = pipe.denoise(pipe.prepare_latents(s, [3]), cond, None, s, progress=False)
    to_x, to_y, tx, ty = a1111_target(64, 48, target.get("hires_scale", 1), target.get("hires_width", 0),
                                      target.get("hires_height", 0))
    up = a1111_resize_image(tensor_to_pil(pipe.decode(x))[0], to_x, to_y, upscaler)
    z = pipe.encode_images(pil_to_tensor(up), None)
    z = z[:, :, ty // 2:z.shape[2] - (ty + 1) // 2, tx // 2:z.shape[3] - (tx + 1) // 2]
    want = tensor_to_pil(pipe.decode(z))[0]
    assert got.size == want.size == ((to_x // 8 - tx) * 8, (to_y // 8 - ty) * 8)
    assert np.asarray(got).tolist() == np.asarray(want).tolist()


def test_hires_checkpoint_decodes_the_first_pass_with_the_first_model(pipe, monkeypatch):
    """A1111 decodes the first pass (for an image upscaler) before loading the hires checkpoint: this pipeline's VAE
    decodes it, the other's encodes the upscaled image and decodes the result."""
    other = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    with torch.no_grad():
        for p in other.vae.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    calls = []
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.append(name))
             for name, m in (("decoder", pipe.vae.decoder), ("decoder-b", other.vae.decoder),
                             ("encoder", pipe.vae.encoder), ("encoder-b", other.vae.encoder))]
    try:
        got = pipe.generate(**KW, seed=5, hires_scale=1.5, hires_strength=0, hires_upscaler="Lanczos",
                            hires_pipe=other)[0]
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["decoder", "encoder-b", "decoder-b"]
    s = pipe.resolve(GenerationSettings(**SETTINGS, seed=5), None)
    cond, _ = pipe.encode_prompt([s.prompt], None)
    x = pipe.denoise(pipe.prepare_latents(s, [5]), cond, None, s, progress=False)
    up = tensor_to_pil(pipe.decode(x))[0].resize((96, 72), resample=hires.IMAGE_RESAMPLE["Lanczos"])
    want = tensor_to_pil(other.decode(other.encode_images(pil_to_tensor(up), None)))[0]
    assert np.asarray(got).tolist() == np.asarray(want).tolist()


def test_hires_resize_any_size(pipe, tmp_path):
    """A hires width / height not a multiple of 8 is A1111's as given (its latents are the target // 8): 100 on a
    64x48 first pass is 100x75 -> 96x72; in the settings, the infotext ("Hires resize: 100x0"), --infotext, the CLI."""
    from fastsd.infotext_settings import settings_from_infotext

    im = pipe.generate(**KW, seed=2, hires_width=100, hires_strength=0)[0]
    assert im.size == (96, 72) and parse_infotext(im.info["parameters"])[2]["Hires resize"] == "100x0"
    read, warnings = settings_from_infotext("a\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x128, Denoising strength: "
                                            "0.5, Hires resize: 1004x0, Hires upscaler: Latent")
    assert (read["hires_width"], read["hires_height"], warnings) == (1004, 0, [])
    assert GenerationSettings(**read).hires_target().size == (1000, 2008)  # A1111: 1004x2008, latents 125x251
    out = tmp_path / "r.png"
    assert cli(["a cat", "--model", "random:tiny", "--steps", "2", "--width", "64", "--height", "48", "--seed", "2",
                "--no-progress", "--hires-width", "100", "--hires-height", "44", "--hires-strength", "0",
                "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as got:  # 100x75 cropped by (75 - 44) // 8 = 3 latent rows: 96x48
        assert got.size == (96, 48) and parse_infotext(got.info["parameters"])[2]["Hires resize"] == "100x44"


def test_enable_hires_runs_a_same_size_second_pass(pipe, monkeypatch, tmp_path):
    """A1111 1.6+'s enable_hr at hr_scale 1 without a resize: a second pass at the same size (the stages by hand give
    the same bits); written "Hires upscale: 1.0" and read back (also from A1111's text) as the switch; without it
    scale 1 is no hires fix; a scale below 1 downscales (A1111's API takes it)."""
    from fastsd.infotext_settings import settings_from_infotext

    calls = _unet_calls(pipe, monkeypatch)
    got = pipe.generate(**KW, seed=6, enable_hires=True, hires_steps=2, hires_strength=0.6)[0]
    assert got.size == (64, 48) and calls == [(1, 4, 6, 8)] * 5
    params = parse_infotext(got.info["parameters"])[2]
    assert (params["Hires upscale"], params["Denoising strength"], params["Hires upscaler"]) == ("1.0", "0.6", "Latent")
    calls.clear()
    s = pipe.resolve(GenerationSettings(**SETTINGS, seed=6, enable_hires=True, hires_steps=2, hires_strength=0.6),
                     None)
    cond, _ = pipe.encode_prompt([s.prompt], None)
    x = pipe.denoise(pipe.prepare_latents(s, [6]), cond, None, s, progress=False)
    want = tensor_to_pil(pipe.decode(pipe.hires_pass(s, x, [6], cond, None, progress=False)))[0]
    assert np.asarray(got).tolist() == np.asarray(want).tolist()
    plain = pipe.generate(**KW, seed=6, hires_steps=2, hires_strength=0.6)[0]
    assert "Hires" not in plain.info["parameters"] and not np.array_equal(np.asarray(plain), np.asarray(got))
    read = settings_from_infotext(got.info["parameters"])[0]
    assert read["enable_hires"] is True and read["hires_scale"] == 1.0
    again = pipe.generate(**{**KW, **read, "progress": False})[0]
    assert np.asarray(again).tolist() == np.asarray(got).tolist()
    a1111 = "a\nSteps: 3, Sampler: Euler, Seed: 6, Size: 64x48, Denoising strength: 0.6, {}"
    for keys in ("Hires upscale: 1.0", "Hires upscale: 1, Hires upscaler: Latent", "Hires steps: 2"):
        assert settings_from_infotext(a1111.format(keys))[0]["enable_hires"] is True, keys
    for text in ("a\nSteps: 3, Sampler: Euler, Seed: 6, Size: 64x48, Denoising strength: 0.6",  # img2img's
                 a1111.format("Hires upscale: 2")):  # (the scale runs it)
        assert "enable_hires" not in settings_from_infotext(text)[0]
    out = tmp_path / "e.png"
    assert cli(["a cat", "--model", "random:tiny", "--steps", "2", "--width", "64", "--height", "48", "--seed", "2",
                "--no-progress", "--enable-hires", "--hires-steps", "1", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 48) and parse_infotext(im.info["parameters"])[2]["Hires upscale"] == "1.0"
    small = pipe.generate(**KW, seed=6, hires_scale=0.5, hires_strength=0.5)[0]
    assert small.size == (32, 24) and parse_infotext(small.info["parameters"])[2]["Hires upscale"] == "0.5"


def test_hires_infotext_keys_as_a1111_writes_them(pipe):
    """No "Hires upscaler" when it was left unset (A1111's API: hr_upscaler None, Latent); "Hires upscale" as given
    (the API's float 2.0, an int 2); the hires sampler split as A1111 1.9+ ("Hires sampler: DPM++ 2M, Hires schedule
    type: Karras"), both forms read back; "ENSD" only when the first pass's sampler draws noise."""
    from fastsd.infotext_settings import settings_from_infotext

    kw = dict(KW, seed=2, hires_scale=2.0, hires_strength=0)
    unset = pipe.generate(**kw, hires_upscaler=None)[0]
    latent = pipe.generate(**kw)[0]
    assert np.array_equal(np.asarray(unset), np.asarray(latent))
    assert "Hires upscaler" not in unset.info["parameters"] and "Hires upscaler: Latent" in latent.info["parameters"]
    assert "Hires upscale: 2.0," in latent.info["parameters"]
    assert "Hires upscale: 2," in pipe.generate(**{**kw, "hires_scale": 2})[0].info["parameters"]
    split = pipe.generate(**kw, hires_sampler="DPM++ 2M Karras")[0]
    params = parse_infotext(split.info["parameters"])[2]
    assert (params["Sampler"], params["Hires sampler"], params["Hires schedule type"]) == \
        ("Euler", "DPM++ 2M", "Karras")
    joint = split.info["parameters"].replace("Hires sampler: DPM++ 2M, Hires schedule type: Karras",
                                             "Hires sampler: DPM++ 2M Karras")
    assert "DPM++ 2M Karras" in joint
    for text in (split.info["parameters"], joint):
        read = settings_from_infotext(text)[0]
        assert (read["hires_sampler"], read.get("hires_schedule_type")) == ("dpmpp_2m_karras", None)
    same = parse_infotext(pipe.generate(**{**kw, "sampler": "DPM++ 2M Karras"})[0].info["parameters"])[2]
    assert "Hires sampler" not in same and "Hires schedule type" not in same
    ensd = dict(kw, eta_noise_seed_delta=31337)
    assert "ENSD" not in pipe.generate(**ensd, hires_sampler="Euler a")[0].info["parameters"]
    assert "ENSD: 31337" in pipe.generate(**{**ensd, "sampler": "euler_a"}, hires_sampler="Euler")[0].info["parameters"]
