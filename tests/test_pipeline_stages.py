"""The staged Pipeline: generate = encode_prompt -> prepare_latents -> denoise -> decode, on_step previews and
interrupts, no unconditional batch at guidance <= 1, and a backend switched on a live pipeline."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fastsd
from fastsd.backends.cpu_pack import PackableConv2d
from fastsd.image import tensor_to_pil
from fastsd.settings import GenerationSettings

KW = dict(steps=3, width=64, height=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


def _unet_batches(pipe, monkeypatch):
    batches = []
    real = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, t, c: batches.append(x.shape[0]) or real(x, t, c))
    return batches


def test_generate_is_its_stages(pipe):
    img = pipe.generate("a red cube", negative_prompt="blurry", sampler="dpmpp_2m", **KW)[0]
    s = pipe.resolve(GenerationSettings("a red cube", "blurry", 3, 7.5, "dpmpp_2m", 3, 64, 64), None)
    cond, uncond = pipe.encode_prompt([s.prompt], [s.negative_prompt])
    p = pipe.prepare_latents(s, [3])
    staged = tensor_to_pil(pipe.decode(pipe.denoise(p, cond, uncond, s, progress=False)))[0]
    assert np.array_equal(np.asarray(img), np.asarray(staged))


def test_on_step_previews_and_interrupt(pipe):
    seen = []
    pipe.generate("a cat", on_step=lambda i, n, prev: seen.append((i, n, prev.size, prev.mode)), **KW)
    lat = 64 // pipe.config.vae.downscale
    assert seen == [(i, 3, (lat, lat), "RGB") for i in (1, 2, 3)]

    def stop(i, n, prev):
        if i == 2:
            raise fastsd.Interrupted()
        seen.append(i)

    seen.clear()
    with pytest.raises(fastsd.Interrupted):
        pipe.generate("a cat", on_step=stop, **KW)
    assert seen == [1]


def _stop_at(k):
    def on_step(i, n, prev):
        if i == k:
            raise fastsd.Interrupted()
    return on_step


def _pixels(im):
    return np.asarray(im).astype(int)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "lcm", "dpmpp_2m"])
def test_interrupt_decode_returns_the_images_of_that_steps_prediction(pipe, sampler):
    """A1111's interrupt / skip: the images of the prediction at the step left (half-denoised), same infotext."""
    kw = dict(KW, sampler=sampler, num_images=2)
    with pytest.raises(fastsd.Interrupted) as stop:
        pipe.generate("a cat", on_step=_stop_at(1), **kw)
    lat = 64 // pipe.config.vae.downscale
    assert stop.value.step == 1 and stop.value.latents.shape == (2, 4, lat, lat)
    half = pipe.generate("a cat", on_step=_stop_at(1), on_interrupt="decode", **kw)
    assert [_pixels(im).tolist() for im in half] == [_pixels(im).tolist()
                                                     for im in tensor_to_pil(pipe.decode(stop.value.latents))]
    full = pipe.generate("a cat", **kw)
    assert [im.info["parameters"] for im in half] == [im.info["parameters"] for im in full]
    assert all(np.abs(_pixels(h) - _pixels(f)).max() > 8 for h, f in zip(half, full))  # not the finished image
    if sampler == "euler":  # its last step lands on its prediction: left at step 3 of 3 = the finished image
        last = pipe.generate("a cat", on_step=_stop_at(3), on_interrupt="decode", **kw)
        assert all(np.abs(_pixels(a) - _pixels(f)).max() <= 1 for a, f in zip(last, full))


def test_on_interrupt_takes_raise_or_decode(pipe):
    with pytest.raises(ValueError, match='on_interrupt must be "raise" or "decode"'):
        pipe.generate("a cat", on_interrupt="keep", **KW)


def test_a_prediction_of_nan_stops_at_its_step(pipe, monkeypatch):
    """A1111's NaN check at the step it happens (not after the last step, nor a black image), even when
    interrupted there; the model's weights are finite here, so the message names the usual causes."""
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", lambda x, t, c: calls.append(1) or torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="NaN or infinite values at step 1 in float32: a LoRA, an embedding or a "):
        pipe.generate("a cat", on_step=_stop_at(1), on_interrupt="decode", **KW)
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_nan_in_the_weights_is_named_as_a_damaged_model(backend):
    """A NaN result blames the weights when they hold NaN/inf (a damaged file), UNet or text encoder; the cpu
    backend's packed weights are read back for it (damaged before the first run packs them)."""
    pipe = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend=backend)
    with torch.no_grad():
        pipe.unet.out[2].bias[1] = float("nan")
        pipe.unet.out[2].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError) as e:
        pipe.generate("a cat", **KW)
    assert str(e.value) == ("the sampling gave NaN or infinite values at step 1 in float32: the model's weights hold "
                            "NaN or infinite values (model.diffusion_model.out.2.bias and 1 more); the model file is "
                            "damaged")
    if backend == "cpu":
        assert pipe.unet.out[2].weight.is_mkldnn  # packed at the first call, NaN and all
    with torch.no_grad():
        pipe.clip.text_model.final_layer_norm.weight[0] = float("inf")
    with pytest.raises(ValueError) as e:
        pipe.generate("a cat", **KW)
    assert str(e.value) == ("the text encoding overflows (NaN or infinite): the model's weights hold NaN or infinite "
                            "values (cond_stage_model.transformer.text_model.final_layer_norm.weight); the model file "
                            "is damaged")


@pytest.mark.parametrize("sampler", ["euler_a", "lcm"])
def test_guidance_at_most_one_runs_no_unconditional_batch(pipe, monkeypatch, sampler):
    batches = _unet_batches(pipe, monkeypatch)
    pipe.generate("a cat", sampler=sampler, guidance_scale=1.0, num_images=2, **KW)
    assert batches == [2, 2, 2]  # two images, no uncond copies
    batches.clear()
    pipe.generate("a cat", sampler=sampler, guidance_scale=0.5, **KW)
    assert batches == [1, 1, 1]
    batches.clear()
    pipe.generate("a cat", sampler=sampler, guidance_scale=7.5, **KW)
    assert batches == [2, 2, 2]  # cond + uncond in one call


def test_guidance_at_most_one_encodes_no_negative_prompt(pipe, monkeypatch):
    texts = []
    real = pipe.clip.forward
    monkeypatch.setattr(pipe.clip, "forward", lambda ids, *a, **k: texts.append(ids.shape[0]) or real(ids, *a, **k))
    img = pipe.generate("a cat", negative_prompt="blurry, " * 60, guidance_scale=1.0, **KW)[0]
    assert sum(texts) == 1  # the prompt alone (diffusers encodes no negative without guidance either)
    assert "Negative prompt: blurry" in img.info["parameters"]  # still recorded
    plain = pipe.generate("a cat", guidance_scale=1.0, **KW)[0]
    assert np.array_equal(np.asarray(img), np.asarray(plain))  # a long negative pads nothing then
    texts.clear()
    pipe.generate("a cat", negative_prompt="blurry", guidance_scale=7.5, **KW)
    assert sum(texts) == 2  # prompt and negative
    cond, uncond = pipe.encode_prompt(["a cat"], None)
    assert uncond is None and cond.shape[0] == 1


def test_backend_switch_on_a_live_pipeline():
    p = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="auto")
    assert p.backend.name == "cpu"
    a = np.asarray(p.generate("a cat", **KW)[0], dtype=np.int16)
    assert any(isinstance(m, PackableConv2d) and m.weight.is_mkldnn for m in p.unet.modules())
    p.backend = "torch"
    assert p.backend.name == "torch"
    assert not any(isinstance(m, PackableConv2d) for m in p.unet.modules())  # unprepared: plain modules again
    assert all(m.ops is fastsd.backends.reference.OPS for m in p.unet.modules() if hasattr(m, "ops"))
    b = np.asarray(p.generate("a cat", **KW)[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 2
    with pytest.raises(fastsd.BackendError):
        p.backend = "nonsense"


def test_api_misuse_raises_named_errors(pipe):
    with pytest.raises(TypeError, match="prompt must be a string"):
        pipe.generate(None, **KW)
    with pytest.raises(TypeError, match="image must be a PIL image"):
        pipe.generate("a cat", image="x.png", **KW)
    with pytest.raises(TypeError, match="steps must be an integer"):
        pipe.generate("a cat", steps=2.5, width=64, height=64, progress=False)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe.generate("a cat", guidance_scale=float("nan"), **KW)
    img = Image.new("RGB", (64, 64))
    with pytest.raises(TypeError, match="mask must be a PIL image"):
        pipe.generate("a cat", image=img, mask=np.zeros((64, 64)), **KW)


def test_an_all_black_mask_is_warned(pipe):
    """A mask with no white pixel repaints nothing (the known region is everything): said, not silent."""
    image = Image.new("RGB", (64, 64), (10, 120, 200))
    with pytest.warns(UserWarning, match="the mask has no white pixel"):
        pipe.generate("a cat", image=image, mask=Image.new("L", (64, 64), 100), steps=2, seed=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mask with white: no warning
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 8, 8))
        pipe.generate("a cat", image=image, mask=mask, steps=2, seed=1, progress=False)
