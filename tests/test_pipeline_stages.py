"""The staged Pipeline: generate = encode_prompt -> prepare_latents -> denoise -> decode, on_step previews and
interrupts, no unconditional batch at guidance <= 1, and a backend switched on a live pipeline."""
import numpy as np
import pytest
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
