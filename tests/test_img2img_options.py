"""A1111's img2img_fix_steps ("With img2img, do exactly the amount of steps the slider specifies") and
img2img_extra_noise ("Extra noise multiplier for img2img and hires fix", infotext "Extra noise").

The oracles are A1111's code, restated here: sd_samplers_common.setup_img2img_steps(p, steps)
    if opts.img2img_fix_steps or steps is not None:   # (the hires pass passes steps: always this way)
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps; t_enc = int(min(p.denoising_strength, 0.999) * steps)
and KDiffusionSampler.sample_img2img: sigma_sched = get_sigmas(p, steps)[steps - t_enc - 1:] (t_enc + 1 steps),
xi = x + noise * sigma_sched[0]; with img2img_extra_noise > 0: xi += noise * img2img_extra_noise (the same noise,
after img2img's initial_noise_multiplier), and "Extra noise" in the infotext."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from serve_server import decode, info, main_server, png_b64
from test_inpaint_mask_weight import _cli_main, _noise_image

from fastsd.image import parse_infotext
from fastsd.infotext_settings import settings_from_infotext

KW = dict(seed=5, width=64, height=64, progress=False)


@pytest.fixture(scope="module")
def tiny():
    import fastsd

    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


def _a1111_steps(steps: int, strength: float, fix: bool) -> tuple[int, int]:
    """(schedule length, t_enc) of A1111's setup_img2img_steps (strength > 0)."""
    if fix:
        return int(steps / min(strength, 0.999)), steps - 1
    return steps, int(min(strength, 0.999) * steps)


def _run(pipe, monkeypatch, **kw):
    """(each denoise call's Prepared, UNet calls, on_step calls, images) of pipe.generate(**kw)."""
    preps, unet_calls, steps = [], [], []
    real = type(pipe).denoise

    def spy(self, p, *a, **k):
        preps.append((p, p.x.clone()))
        return real(self, p, *a, **k)

    monkeypatch.setattr(type(pipe), "denoise", spy)
    hook = pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        images = pipe.generate("a cat", on_step=lambda i, n, _: steps.append((i, n)), **kw)
    finally:
        hook.remove()
        monkeypatch.undo()
    return preps, len(unet_calls), steps, images


@pytest.mark.parametrize("steps,strength", [(10, 1.0), (10, 0.5), (8, 0.3), (7, 0.05), (5, 0.999), (3, 0.34)])
@pytest.mark.parametrize("fix", [False, True])
def test_steps_and_schedule_are_a1111s(tiny, monkeypatch, steps, strength, fix):
    """Euler (one UNet call a step): t_enc + 1 UNet calls and steps, over the last t_enc + 1 steps of A1111's
    schedule length (the sampler's own schedule of that many steps); the infotext's Steps stay the slider's."""
    n, t_enc = _a1111_steps(steps, strength, fix)
    preps, calls, seen, (image,) = _run(tiny, monkeypatch, image=_noise_image(), steps=steps, strength=strength,
                                        sampler="euler", img2img_fix_steps=fix, **KW)
    (p, _), = preps
    full = tiny.schedule("euler", n).sigmas
    assert torch.equal(p.schedule.sigmas, full[n - t_enc - 1:])
    assert torch.equal(p.full_sigmas, full)
    assert calls == t_enc + 1 == len(seen) and seen[-1] == (t_enc + 1, t_enc + 1)
    if fix:
        assert calls == steps
    assert parse_infotext(image.info["parameters"])[2]["Steps"] == str(steps)


def test_fix_steps_changes_nothing_else(tiny, monkeypatch):
    """Off is today's run (bit for bit); on at strength 1 too (the same schedule: int(steps / 0.999) = steps);
    txt2img ignores it (A1111's option is img2img's); at strength 0.5 another image."""
    image = _noise_image()
    base = tiny.generate("a cat", image=image, steps=6, strength=0.5, **KW)[0]
    assert tiny.generate("a cat", image=image, steps=6, strength=0.5, img2img_fix_steps=False, **KW)[0].tobytes() \
        == base.tobytes()
    assert tiny.generate("a cat", image=image, steps=6, strength=0.5, img2img_fix_steps=True, **KW)[0].tobytes() \
        != base.tobytes()
    one = tiny.generate("a cat", image=image, steps=6, strength=1.0, **KW)[0]
    assert tiny.generate("a cat", image=image, steps=6, strength=1.0, img2img_fix_steps=True, **KW)[0].tobytes() \
        == one.tobytes()
    t2i = tiny.generate("a cat", steps=3, **KW)[0]
    assert tiny.generate("a cat", steps=3, img2img_fix_steps=True, **KW)[0].tobytes() == t2i.tobytes()
    assert "fix" not in t2i.info["parameters"].lower()


@pytest.mark.parametrize("kw,match", [
    (dict(strength=0.0), "img2img_fix_steps runs steps / strength steps: it needs a strength above 0"),
    (dict(strength=0.01, steps=20), "img2img_fix_steps: strength 0.01 with 20 steps needs a schedule of 2000 steps"),
])
def test_fix_steps_refuses_what_it_cant_run(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate("a cat", image=_noise_image(), img2img_fix_steps=True, **{"steps": 4, **kw, **KW})


def _a1111_noise(seed: int, shape) -> torch.Tensor:
    """A1111's start noise on "CPU": torch.manual_seed(seed), then torch.randn (its ImageRNG.first)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m_karras"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_extra_noise_start_latents(tiny, monkeypatch, sampler, multiplier):
    """xi = x + noise * sigma_sched[0], then xi += noise * extra: the same noise (img2img's after the noise
    multiplier), the k-diffusion order of the two sums; "Extra noise" in the infotext; 0 is today's run."""
    image, extra = _noise_image(), 0.3
    kw = dict(image=image, steps=4, strength=0.6, sampler=sampler, initial_noise_multiplier=multiplier, **KW)
    preps, *_, (got,) = _run(tiny, monkeypatch, img2img_extra_noise=extra, **kw)
    (p, x), = preps
    noise = _a1111_noise(KW["seed"], (1, 4, 8, 8)) * multiplier  # (A1111's x *= initial_noise_multiplier)
    want = p.x0 + noise * float(p.schedule.sigmas[0])
    want += noise * extra
    assert torch.equal(x, want)
    assert parse_infotext(got.info["parameters"])[2]["Extra noise"] == "0.3"
    base = tiny.generate("a cat", **kw)[0]
    assert tiny.generate("a cat", img2img_extra_noise=0.0, **kw)[0].tobytes() == base.tobytes()
    assert got.tobytes() != base.tobytes() and "Extra noise" not in base.info["parameters"]


def test_extra_noise_hires_pass(tiny, monkeypatch):
    """The hires fix's second pass (A1111's sample_hr_pass -> sample_img2img): its fresh noise of the seed at the new
    size, added once more times the option; the first pass is txt2img's, untouched; the infotext writes it.
    txt2img without the hires fix writes none."""
    hires = dict(steps=3, hires_scale=1.5, hires_strength=0.5, hires_upscaler="Latent", sampler="euler", **KW)
    preps, *_, (got,) = _run(tiny, monkeypatch, img2img_extra_noise=0.25, **hires)
    (first, x1), (second, x2) = preps
    assert torch.equal(x1, _a1111_noise(KW["seed"], (1, 4, 8, 8)) * first.schedule.init_noise_sigma)
    noise = _a1111_noise(KW["seed"], (1, 4, 12, 12))
    want = second.x0 + noise * float(second.schedule.sigmas[0])
    want += noise * 0.25
    assert torch.equal(x2, want)
    assert parse_infotext(got.info["parameters"])[2]["Extra noise"] == "0.25"
    plain = tiny.generate("a cat", steps=2, img2img_extra_noise=0.25, **KW)[0]
    assert "Extra noise" not in plain.info["parameters"]


@pytest.mark.parametrize("value,exc,match", [
    (1.5, ValueError, "img2img_extra_noise must be in [0, 1], got 1.5"),
    (-0.1, ValueError, "img2img_extra_noise must be in [0, 1], got -0.1"),
    (float("nan"), ValueError, "img2img_extra_noise must be a finite number"),
    ("0.5", TypeError, "img2img_extra_noise must be a number"),
])
def test_extra_noise_bad_values(tiny, value, exc, match):
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("]", r"\]")):
        tiny.generate("a cat", image=_noise_image(), steps=2, img2img_extra_noise=value, **KW)


def test_fix_steps_must_be_a_bool(tiny):
    with pytest.raises(TypeError, match="img2img_fix_steps must be True or False, got 'yes'"):
        tiny.generate("a cat", image=_noise_image(), steps=2, img2img_fix_steps="yes", **KW)


@pytest.mark.parametrize("args,match", [
    (["--img2img-extra-noise", "2"], "img2img_extra_noise must be in [0, 1], got 2.0"),
    (["--img2img-extra-noise", "-1"], "img2img_extra_noise must be in [0, 1], got -1.0"),
    (["--img2img-extra-noise", "lots"], "argument --img2img-extra-noise: invalid float value: 'lots'"),
    (["--img2img-fix-steps", "--strength", "0"], "img2img_fix_steps runs steps / strength steps"),
    (["--img2img-fix-steps", "--strength", "0.001"], "needs a schedule of 20000 steps"),
])
def test_cli_bad_values_exit_2_in_one_line(tmp_path, capsys, args, match):
    _noise_image().save(tmp_path / "in.png")
    code = _cli_main(["a cat", "--model", "random:tiny", "--init-image", str(tmp_path / "in.png"), *args,
                      "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_cli_options_and_infotext_round_trip(tmp_path, tiny):
    """--img2img-fix-steps and --img2img-extra-noise make Pipeline.generate's image; its infotext has "Extra noise"
    (A1111's key) and no key for fix steps (A1111 writes none); --infotext reads the extra noise back (the same
    image with --img2img-fix-steps again), the command line's option wins over it."""
    image = _noise_image()
    image.save(tmp_path / "in.png")
    args = ["--model", "random:tiny", "--dtype", "fp32", "--backend", "torch", "--steps", "3", "--seed", "5",
            "--strength", "0.5", "--no-progress", "--init-image", str(tmp_path / "in.png"), "--img2img-fix-steps"]
    assert _cli_main(["a cat", *args, "--img2img-extra-noise", "0.4", "--out", str(tmp_path / "a.png")]) == 0
    want = tiny.generate("a cat", image=image, steps=3, strength=0.5, img2img_fix_steps=True,
                         img2img_extra_noise=0.4, **KW)[0]
    with Image.open(tmp_path / "a.png") as a:
        text = a.text["parameters"]
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(want))
    params = parse_infotext(text)[2]
    assert params["Extra noise"] == "0.4" and params["Steps"] == "3" and not any("fix" in k.lower() for k in params)
    assert settings_from_infotext(text)[0]["img2img_extra_noise"] == 0.4
    assert _cli_main([*args, "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    assert _cli_main([*args, "--infotext", str(tmp_path / "a.png"), "--img2img-extra-noise", "0",
                      "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "b.png") as b, Image.open(tmp_path / "c.png") as c, Image.open(tmp_path / "a.png") as a:
        assert np.array_equal(np.asarray(b), np.asarray(a))
        assert "Extra noise" not in c.text["parameters"] and not np.array_equal(np.asarray(c), np.asarray(a))


def test_server_options_and_override_settings():
    """GET /sdapi/v1/options has both (False, 0.0); override_settings sets them for one request (the infotext writes
    the extra noise, the images change, the options are back after); POST /sdapi/v1/options sets them for later
    requests (the override's images again); a request's `infotext` with "Extra noise" sets it as A1111's paste
    does; bad values are 422s naming them."""
    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 3, "denoising_strength": 0.5,
            "init_images": [png_b64(_noise_image())]}

    def run(c, **over):
        r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": over})
        assert r.status_code == 200, r.text
        return parse_infotext(info(r)["infotexts"][0])[2], decode(r.json()["images"][0]).tobytes()

    defaults = {"img2img_fix_steps": False, "img2img_extra_noise": 0.0}
    with main_server().client(timeout=300) as c:
        assert {k: c.get("/sdapi/v1/options").json()[k] for k in defaults} == defaults
        params, base = run(c)
        assert "Extra noise" not in params
        params, fixed = run(c, img2img_fix_steps=True)
        assert "Extra noise" not in params and fixed != base
        params, noisy = run(c, img2img_extra_noise=0.5)
        assert params["Extra noise"] == "0.5" and noisy != base
        assert {k: c.get("/sdapi/v1/options").json()[k] for k in defaults} == defaults
        assert run(c)[1] == base
        r = c.post("/sdapi/v1/img2img", json={**body, "infotext": "a cat\nSteps: 3, Extra noise: 0.5, RNG: CPU"})
        assert r.status_code == 200 and decode(r.json()["images"][0]).tobytes() == noisy, r.text
        for bad, why in (({"img2img_extra_noise": 1.5}, "img2img_extra_noise must be in [0, 1]"),
                         ({"img2img_fix_steps": "yes"}, "img2img_fix_steps must be True or False")):
            r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": bad})
            assert r.status_code == 422 and why in r.text, r.text
        assert c.post("/sdapi/v1/options", json={"img2img_extra_noise": -1}).status_code == 422
        try:
            r = c.post("/sdapi/v1/options", json={"img2img_fix_steps": True, "img2img_extra_noise": 0.5})
            assert r.status_code == 200 and r.json()["applied"] == {"img2img_fix_steps": True,
                                                                     "img2img_extra_noise": 0.5}, r.text
            params, both = run(c)
            assert params["Extra noise"] == "0.5" and both not in (base, fixed, noisy)
            assert run(c, img2img_fix_steps=False)[1] == noisy
        finally:
            c.post("/sdapi/v1/options", json=defaults)
        assert {k: c.get("/sdapi/v1/options").json()[k] for k in defaults} == defaults


def test_batch_fields_and_options(tmp_path, capsys):
    """A batch job's img2img_fix_steps / img2img_extra_noise fields, and the options' defaults for jobs without them:
    a job of the defaults' values is the explicit job's image, others differ; the infotext writes the extra noise;
    img2img_fix_steps is an img2img field (a txt2img job with it fails alone); hires jobs of other extra noise share
    no batch (batch_key); a bad option is exit 2."""
    from fastsd.batch import Defaults, run
    from fastsd.batch.__main__ import main
    from fastsd.batch.jobs import batch_key, make_jobs, records_from_list

    _noise_image().save(tmp_path / "in.png")
    job = {"prompt": "a cat", "seed": 1, "init_image": str(tmp_path / "in.png"), "strength": 0.5}
    fields = {"option": {}, "same": {"img2img_fix_steps": True, "img2img_extra_noise": 0.25},
              "plain": {"img2img_fix_steps": False, "img2img_extra_noise": 0}, "fix": {"img2img_extra_noise": 0}}
    jobs = [{**job, "id": k, **f} for k, f in fields.items()]
    out = str(tmp_path / "out")
    defaults = Defaults(steps=3, width=64, height=64, img2img_fix_steps=True, img2img_extra_noise=0.25)
    rows = run([*jobs, {"prompt": "a cat", "id": "t2i", "img2img_fix_steps": True},
                {**job, "id": "bad", "img2img_extra_noise": 2}], out=out, model="random:tiny", threads=1,
               progress=False, dtype="fp32", backend="torch", defaults=defaults)
    assert "img2img_fix_steps: an img2img field" in rows[-2]["error"], rows[-2]
    assert "img2img_extra_noise must be in [0, 1], got 2" in rows[-1]["error"]
    got = {}
    for row, job_id in zip(rows, fields):
        with Image.open(f"{out}/{row['file']}") as im:
            params = parse_infotext(im.text["parameters"])[2]
            assert params.get("Extra noise") == ("0.25" if job_id in ("option", "same") else None), params
            got[job_id] = np.asarray(im.convert("RGB"))
    assert np.array_equal(got["option"], got["same"])
    assert not np.array_equal(got["plain"], got["fix"]) and not np.array_equal(got["fix"], got["same"])
    hires = {"prompt": "a cat", "seed": 1, "hires_scale": 1.5, "hires_strength": 0.5}
    a, b, c = make_jobs(records_from_list([hires, {**hires, "seed": 2}, {**hires, "seed": 3,
                                                                         "img2img_extra_noise": 0.5}]), Defaults())
    assert batch_key(a, 1) == batch_key(b, 1) != batch_key(c, 1)
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    capsys.readouterr()
    assert main([str(tmp_path / "jobs.jsonl"), "--model", "random:tiny", "--out", str(tmp_path / "o2"),
                 "--img2img-extra-noise", "1.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img2img_extra_noise must be in [0, 1], got 1.5" in err[0], err
    assert not (tmp_path / "o2").exists()
