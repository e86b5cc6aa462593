"""A1111's inpainting_mask_weight option ("Inpainting conditioning mask strength", infotext "Conditional mask
weight"): a 9-channel model's masked image is A1111's inpainting_image_conditioning
`torch.lerp(source_image, source_image * (1.0 - conditioning_mask), inpainting_mask_weight)` (source in [-1, 1], the
mask rounded; no mask: a mask of ones), and its hires pass below 1 is conditioned on the upscaled picture
(sample_hr_pass). diffusers has no such option: the formula is the oracle, computed here on the same inputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from serve_server import decode, info, main_server, png_b64

from fastsd.image import parse_infotext, tensor_to_pil
from fastsd.infotext_settings import settings_from_infotext

KW = dict(steps=2, seed=1, width=64, height=64, progress=False)


@pytest.fixture(scope="module")
def tiny_inpainting():
    import fastsd

    return fastsd.load_pipeline("random:tiny-inpainting", device="cpu", dtype="fp32", backend="torch")


def _noise_image(size=(64, 64), seed=2) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mask() -> Image.Image:
    m = np.zeros((64, 64), np.uint8)
    m[8:40, 16:56] = 255
    return Image.fromarray(m)


def _source(image: Image.Image) -> torch.Tensor:
    """A1111's source_image: the image in [0, 1] (np.array / 255, CHW), then * 2 - 1 (contiguous: the VAE's group
    norms of a blank image amplify the rounding differences of another memory layout)."""
    a = np.ascontiguousarray(np.moveaxis(np.asarray(image, dtype=np.float32) / 255.0, 2, 0))
    return torch.from_numpy(a)[None] * 2 - 1


def _a1111_masked(source: torch.Tensor, mask: Image.Image | None, weight: float) -> torch.Tensor:
    """A1111's conditioning image (before its encode): the mask as np.array(L) / 255 rounded, else ones."""
    if mask is None:
        m = source.new_ones(1, 1, *source.shape[-2:])
    else:
        m = torch.round(torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None])
    return torch.lerp(source, source * (1.0 - m), weight)


def _concats(pipe, monkeypatch, **kw) -> tuple[list[torch.Tensor], list, list[Image.Image]]:
    """(the c_concat of each denoise call, each call's Prepared and its result, the images) of pipe.generate(**kw)."""
    seen, calls = [], []
    real = type(pipe).denoise

    def spy(self, p, *a, **k):
        seen.append(p.extra["c_concat"].clone())
        calls.append((p, real(self, p, *a, **k)))
        return calls[-1][1]

    monkeypatch.setattr(type(pipe), "denoise", spy)
    images = pipe.generate("a cat", **kw)
    monkeypatch.undo()
    return seen, calls, images


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("masked", [True, False])
def test_conditioning_image_is_a1111s_lerp(tiny_inpainting, monkeypatch, weight, masked):
    """Inpainting (and img2img without a mask: the whole picture masked): the masked-image latents are the encode of
    A1111's lerp at the weight; the mask channel is the mask (ones without one) at latent size, whatever the weight;
    the infotext writes the weight."""
    image, mask = _noise_image(), _mask() if masked else None
    (got,), _, (out,) = _concats(tiny_inpainting, monkeypatch, image=image, mask=mask, strength=0.6,
                                 inpainting_mask_weight=weight, **KW)
    want = tiny_inpainting.encode_images(_a1111_masked(_source(image), mask, weight), None)
    assert torch.allclose(got[:, 1:], want, atol=1e-6)
    m = torch.ones(1, 1, 8, 8) if mask is None else torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]
    assert torch.equal(got[:, :1], torch.nn.functional.interpolate(m, size=(8, 8)))
    assert parse_infotext(out.info["parameters"])[2]["Conditional mask weight"] == str(weight)


def test_weight_1_is_todays_conditioning_bit_for_bit(tiny_inpainting, monkeypatch):
    """At the default weight 1 the masked image is the image times 1 - mask exactly (fastsd's conditioning before the
    option), and the images are those of a run that does not name the option; other weights change the image."""
    image, mask = _noise_image(), _mask()
    (got,), _, (one,) = _concats(tiny_inpainting, monkeypatch, image=image, mask=mask, inpainting_mask_weight=1.0,
                                 **KW)
    m = torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]
    assert torch.equal(got[:, 1:], tiny_inpainting.encode_images(_source(image) * (1 - m), None))
    default = tiny_inpainting.generate("a cat", image=image, mask=mask, **KW)[0]
    assert one.tobytes() == default.tobytes() and one.info == default.info
    half = tiny_inpainting.generate("a cat", image=image, mask=mask, inpainting_mask_weight=0.5, **KW)[0]
    assert half.tobytes() != one.tobytes()


def test_txt2img_is_untouched_but_its_hires_pass_is_not(tiny_inpainting, monkeypatch):
    """txt2img's conditioning (A1111's txt2img_image_conditioning: a blank image, a mask of ones) takes no weight; the
    hires fix's second pass (latent upscaler) below 1 is conditioned on the decoded upscaled latents lerped toward
    blank (A1111's sample_hr_pass: img2img_image_conditioning(decode_first_stage(samples), samples)); at 1 on the blank
    image as before."""
    hires = dict(hires_scale=1.5, hires_steps=1, hires_strength=0.5, hires_upscaler="Latent")
    blank = tiny_inpainting.encode_images(torch.zeros(1, 3, 64, 64), None)
    for weight in (0.0, 0.5, 1.0):
        seen, calls, (out,) = _concats(tiny_inpainting, monkeypatch, inpainting_mask_weight=weight, **hires, **KW)
        first, second = seen
        assert torch.equal(first[:, :1], torch.ones(1, 1, 8, 8)) and torch.allclose(first[:, 1:], blank, atol=1e-6)
        source = tiny_inpainting.decode(calls[1][0].x0)  # (the upscaled latents the second pass starts from)
        want = tiny_inpainting.encode_images(_a1111_masked(source, None, weight), None)
        assert second.shape[2:] == (12, 12) and torch.equal(second[:, :1], torch.ones(1, 1, 12, 12))
        assert torch.allclose(second[:, 1:], want, atol=1e-5)
        assert parse_infotext(out.info["parameters"])[2]["Conditional mask weight"] == str(weight)
    assert not torch.allclose(want, tiny_inpainting.encode_images(source * 0.5, None), atol=1e-3)  # (weight 1 vs .5)


def test_hires_pass_with_an_image_upscaler_takes_the_image_in_0_1(tiny_inpainting, monkeypatch):
    """With an image upscaler A1111's sample_hr_pass hands img2img_image_conditioning the upscaled images as
    np.array / 255 (in [0, 1], where the encoder takes [-1, 1]): below 1 the second pass's masked image is their lerp
    toward blank as that; at 1 blank, as txt2img's."""
    hires = dict(hires_scale=1.5, hires_steps=1, hires_strength=0.5, hires_upscaler="Nearest")
    for weight in (0.5, 1.0):
        seen, calls, _ = _concats(tiny_inpainting, monkeypatch, inpainting_mask_weight=weight, **hires, **KW)
        (up,) = [im.resize((96, 96), Image.NEAREST) for im in tensor_to_pil(tiny_inpainting.decode(calls[0][1]))]
        source = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(up, np.float32) / 255.0, 2, 0)))[None]
        want = tiny_inpainting.encode_images(_a1111_masked(source, None, weight), None)
        assert torch.allclose(seen[1][:, 1:], want, atol=1e-5) and torch.equal(seen[1][:, :1], torch.ones(1, 1, 12, 12))


@pytest.mark.parametrize("value,err,match", [
    (1.5, ValueError, "inpainting_mask_weight must be in [0, 1], got 1.5"),
    (-0.1, ValueError, "inpainting_mask_weight must be in [0, 1], got -0.1"),
    (float("nan"), ValueError, "inpainting_mask_weight must be a finite number"),
    ("0.5", TypeError, "inpainting_mask_weight must be a number"),
])
def test_bad_weights_are_named(tiny_inpainting, value, err, match):
    with pytest.raises(err, match=match.replace("[", r"\[").replace("]", r"\]")):
        tiny_inpainting.generate("a cat", image=_noise_image(), inpainting_mask_weight=value, **KW)


@pytest.mark.parametrize("value,match", [("2", "inpainting_mask_weight must be in [0, 1], got 2.0"),
                                         ("-1", "inpainting_mask_weight must be in [0, 1], got -1.0"),
                                         ("half", "argument --inpainting-mask-weight: invalid float value: 'half'")])
def test_cli_bad_value_exits_2_in_one_line(tmp_path, capsys, value, match):
    code = _cli_main(["a cat", "--model", "random:tiny-inpainting", "--inpainting-mask-weight", value,
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def _cli_main(argv):
    """python -m fastsd.generate's main, its argparse exit (SystemExit) as the code."""
    from fastsd.generate import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_option_and_infotext_round_trip(tmp_path, tiny_inpainting):
    """--inpainting-mask-weight makes Pipeline.generate's image, whose infotext says "Conditional mask weight: 0.25";
    --infotext of that PNG reads the weight back (the same image again), and the command line's option wins over
    it; an infotext's weight is the settings' inpainting_mask_weight."""
    image, mask = _noise_image(), _mask()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    args = ["--model", "random:tiny-inpainting", "--dtype", "fp32", "--backend", "torch", "--steps", "2", "--seed",
            "1", "--no-progress", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
    assert _cli_main(["a cat", *args, "--inpainting-mask-weight", "0.25", "--out", str(tmp_path / "a.png")]) == 0
    want = tiny_inpainting.generate("a cat", image=image, mask=mask, inpainting_mask_weight=0.25, **KW)[0]
    with Image.open(tmp_path / "a.png") as a:
        text = a.text["parameters"]
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(want))
    assert parse_infotext(text)[2]["Conditional mask weight"] == "0.25"
    assert settings_from_infotext(text)[0]["inpainting_mask_weight"] == 0.25
    assert _cli_main([*args, "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    assert _cli_main([*args, "--infotext", str(tmp_path / "a.png"), "--inpainting-mask-weight", "1",
                      "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "b.png") as b, Image.open(tmp_path / "c.png") as c:
        assert np.array_equal(np.asarray(b), np.asarray(Image.open(tmp_path / "a.png")))
        assert parse_infotext(b.text["parameters"])[2]["Conditional mask weight"] == "0.25"
        assert parse_infotext(c.text["parameters"])[2]["Conditional mask weight"] == "1.0"


def test_server_override_settings_and_options():
    """The server's A1111 option: GET /sdapi/v1/options has it (1.0); override_settings sets it for that request only
    (the infotext writes it, the image changes, the option is back after); POST /sdapi/v1/options sets it for later
    requests; a request's `infotext` with "Conditional mask weight" sets it as A1111's paste does; a bad value is a
    422 naming it."""
    init, mask = _noise_image(), _mask()
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "init_images": [png_b64(init)],
            "mask": png_b64(mask), "inpaint_full_res": False, "mask_blur": 0,
            "override_settings": {"sd_model_checkpoint": "random:tiny-inpainting"}}

    def run(c, **over):
        r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": {**body["override_settings"], **over}})
        assert r.status_code == 200, r.text
        return parse_infotext(info(r)["infotexts"][0])[2]["Conditional mask weight"], decode(r.json()["images"][0])

    with main_server().client(timeout=300) as c:
        assert c.get("/sdapi/v1/options").json()["inpainting_mask_weight"] == 1.0
        weight, one = run(c)
        assert weight == "1.0"
        weight, half = run(c, inpainting_mask_weight=0.5)
        assert weight == "0.5" and half.tobytes() != one.tobytes()
        assert c.get("/sdapi/v1/options").json()["inpainting_mask_weight"] == 1.0
        pasted = "a cat\nSteps: 2, Conditional mask weight: 0.5, RNG: CPU"  # (A1111's paste: the option)
        r = c.post("/sdapi/v1/img2img", json={**body, "infotext": pasted})
        assert r.status_code == 200, r.text
        assert decode(r.json()["images"][0]).tobytes() == half.tobytes()
        r = c.post("/sdapi/v1/img2img", json={**body, "override_settings": {**body["override_settings"],
                                                                            "inpainting_mask_weight": 1.5}})
        assert r.status_code == 422 and "inpainting_mask_weight must be in [0, 1]" in r.text, r.text
        assert c.post("/sdapi/v1/options", json={"inpainting_mask_weight": -1}).status_code == 422
        try:
            r = c.post("/sdapi/v1/options", json={"inpainting_mask_weight": 0.5})
            assert r.status_code == 200 and r.json()["applied"] == {"inpainting_mask_weight": 0.5}, r.text
            assert c.get("/sdapi/v1/options").json()["inpainting_mask_weight"] == 0.5
            weight, again = run(c)
            assert weight == "0.5" and again.tobytes() == half.tobytes()
        finally:
            c.post("/sdapi/v1/options", json={"inpainting_mask_weight": 1.0})
        assert c.get("/sdapi/v1/options").json()["inpainting_mask_weight"] == 1.0


def test_batch_field_and_option(tmp_path, capsys):
    """A batch job's inpainting_mask_weight field, and the --inpainting-mask-weight default for jobs without one: the
    infotext writes the job's weight, a job of the default's weight is the default's image, another weight another
    image; a bad value fails its job alone, a bad option is exit 2."""
    from fastsd.batch import Defaults, run
    from fastsd.batch.__main__ import main

    _noise_image().save(tmp_path / "in.png")
    _mask().save(tmp_path / "m.png")
    job = {"prompt": "a cat", "seed": 1, "init_image": str(tmp_path / "in.png"), "mask": str(tmp_path / "m.png"),
           "inpaint_full_res": False, "inpainting_fill": 1, "mask_blur": 0}
    weights = {"option": None, "quarter": 0.25, "half": 0.5, "one": 1.0}
    jobs = [{**job, "id": k, **({} if w is None else {"inpainting_mask_weight": w})} for k, w in weights.items()]
    out = str(tmp_path / "out")
    rows = run([*jobs, {**job, "id": "bad", "inpainting_mask_weight": 2}], out=out, model="random:tiny-inpainting",
               threads=1, progress=False, dtype="fp32", backend="torch",
               defaults=Defaults(steps=2, width=64, height=64, inpainting_mask_weight=0.25))
    assert "inpainting_mask_weight must be in [0, 1], got 2" in rows[-1]["error"]
    got = {}
    for row, (job_id, weight) in zip(rows, weights.items()):
        with Image.open(f"{out}/{row['file']}") as im:
            assert parse_infotext(im.text["parameters"])[2]["Conditional mask weight"] == str(weight or 0.25)
            got[job_id] = np.asarray(im.convert("RGB"))
    assert np.array_equal(got["option"], got["quarter"])
    assert not np.array_equal(got["half"], got["one"]) and not np.array_equal(got["quarter"], got["one"])
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    capsys.readouterr()
    assert main([str(tmp_path / "jobs.jsonl"), "--model", "random:tiny-inpainting", "--out", str(tmp_path / "o2"),
                 "--inpainting-mask-weight", "1.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inpainting_mask_weight must be in [0, 1], got 1.5" in err[0], err
    assert not (tmp_path / "o2").exists()
