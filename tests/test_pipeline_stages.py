"""The staged Pipeline: generate = encode_prompt -> prepare_latents -> denoise -> decode, on_step previews and
interrupts, no unconditional batch at guidance <= 1, and a backend switched on a live pipeline."""
import re
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


def test_more_misuse_is_named_before_any_work(pipe):
    """Found by a bad-input hunt of the Python API: each was a deep torch / PIL error, an overflow or silently taken."""
    cases = [(dict(hires_pipe="x", hires_scale=1.5), TypeError, "hires_pipe must be a Pipeline, got str"),
             (dict(infotext_extra=[1, 2]), TypeError, "infotext_extra must be a dict of infotext keys"),
             (dict(infotext_extra={"a\nb": 1}), TypeError, "infotext_extra must be a dict of infotext keys"),
             (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), TypeError,
              "latents must be a dense floating-point tensor, got a torch.int64"),
             (dict(latents=torch.zeros(1, 4, 8, 8).to_sparse()), TypeError, "latents must be a dense floating-point"),
             (dict(latents=torch.full((1, 4, 8, 8), float("inf"))), ValueError, "latents has NaN or infinite values")]
    for kw, error, match in cases:
        with pytest.raises(error, match=re.escape(match)):
            pipe.generate("a cat", **{**KW, **kw})
    with pytest.raises(ValueError, match=re.escape("image is 7x7 pixels: below 8 on a side, give width and height")):
        pipe.generate("a cat", image=Image.new("RGB", (7, 7)), steps=1, progress=False)
    assert pipe.generate("a cat", image=Image.new("RGB", (7, 7)), steps=1, width=64, height=64,
                         progress=False)[0].size == (64, 64)  # (resized to the size given)
    with pytest.raises(ValueError, match=re.escape("height 4104 is above 4096 px")):  # (the size the image gave)
        pipe.generate("a cat", image=Image.new("RGB", (64, 4104)), steps=1, progress=False)
    for kw in (dict(progress="no"), dict(allow_large="x"), dict(tiled_vae="yes"), dict(tiled_vae=0)):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be True or False"):
            pipe.generate("a cat", **{**KW, **kw})
    with pytest.raises(TypeError, match="compile must be True or False, got 'no'"):
        fastsd.load_pipeline("random:tiny", compile="no")
    for seed in (2**64, "x", 1.5, -1, True):
        with pytest.raises(ValueError, match=re.escape("seed (of the random weights) must be an integer in [0, 2**63)")):
            fastsd.load_pipeline("random:tiny", seed=seed)


def test_deep_and_float_images_are_scaled_and_rgba_masks_read_by_their_alpha(pipe):
    """Pipeline.generate reads images as load_image does (16-bit and float scaled to 8 bits, not clipped) and an RGBA
    mask with transparency by its alpha (A1111's create_binary_mask; the CLI's and the server's rule)."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    as_8bit = Image.fromarray((ramp / 65535 * 255).round().astype(np.uint8))
    kw = dict(KW, strength=0.5)
    deep = pipe.generate("a cat", image=Image.fromarray(ramp), **kw)[0]
    assert np.array_equal(np.asarray(deep), np.asarray(pipe.generate("a cat", image=as_8bit, **kw)[0]))
    flt = Image.fromarray((ramp / 65535).astype(np.float32), mode="F")
    assert np.array_equal(np.asarray(pipe.generate("a cat", image=flt, **kw)[0]), np.asarray(deep))
    with pytest.raises(ValueError, match="image: has pixel values that are NaN or infinite"):
        pipe.generate("a cat", image=Image.fromarray(np.full((64, 64), np.nan, np.float32), mode="F"), **kw)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # an editor's mask: transparent, an opaque square
    rgba.paste((0, 0, 0, 255), (0, 0, 32, 32))
    square = Image.new("L", (64, 64), 0)
    square.paste(255, (0, 0, 32, 32))
    got = pipe.generate("a cat", image=image, mask=rgba, **kw)[0]
    assert np.array_equal(np.asarray(got), np.asarray(pipe.generate("a cat", image=image, mask=square, **kw)[0]))


def test_one_generation_at_a_time_and_no_model_change_from_inside_one(pipe):
    """generate and what changes the models (LoRAs, VAE, embeddings, backend) hold the pipeline: another thread's
    call waits; one from an on_step callback is a ValueError naming it, and the pipeline is fine afterwards."""
    import threading

    for call in (lambda: pipe.load_lora("x.safetensors"), pipe.unload_loras, lambda: pipe.generate("a", **KW),
                 lambda: pipe.set_vae(pipe.vae, prepared=True)):
        def inner(step, total, preview, call=call):
            call()
        with pytest.raises(ValueError, match="called from inside a generation of this pipeline"):
            pipe.generate("a cat", on_step=inner, **KW)
    alone = np.asarray(pipe.generate("a cat", **KW)[0])
    entered, release, order = threading.Event(), threading.Event(), []

    def slow(step, total, preview):
        entered.set()
        release.wait(10)

    first = threading.Thread(target=lambda: order.append(("first", pipe.generate("a cat", on_step=slow, **KW))))
    first.start()
    assert entered.wait(30)
    second = threading.Thread(target=lambda: order.append(("second", pipe.unload_loras())))
    second.start()
    second.join(0.5)
    assert second.is_alive() and order == []  # waits for the generation
    release.set()
    first.join(30)
    second.join(30)
    assert [name for name, _ in order] == ["first", "second"]
    assert np.array_equal(np.asarray(order[0][1][0]), alone)


def test_paths_and_vaes_by_type(pipe, tmp_path):
    """load_pipeline takes a pathlib.Path (as load_lora does); load_embeddings and set_vae name a wrong type."""
    import pathlib

    missing = pathlib.Path(tmp_path / "nothing.safetensors")
    with pytest.raises(fastsd.CheckpointError, match="nothing.safetensors"):  # (read as a path, not a TypeError)
        fastsd.load_pipeline(missing)
    with pytest.raises(TypeError, match="load_embeddings takes a file or folder path, got NoneType"):
        pipe.load_embeddings(None)
    with pytest.raises(TypeError, match="set_vae takes a built VAE"):
        pipe.set_vae(None)


@pytest.mark.parametrize("ints,floats", [(np.int64, np.float32), (np.int32, np.float64), (np.uint16, np.float16)])
@pytest.mark.parametrize("mode", ["txt2img", "hires", "img2img"])
def test_numpy_numbers_give_the_python_numbers_image(pipe, ints, floats, mode):
    """numpy's scalars for the settings (and progress / preview_every / tiled_vae) give the image and infotext of the
    Python numbers they stand for: `Steps: 2`, not `np.int64(2)`."""
    py = dict(steps=2, seed=3, width=64, height=64, num_images=2, guidance_scale=7.5, subseed=5, subseed_strength=0.25,
              clip_skip=1)
    if mode == "hires":
        py.update(hires_scale=1.5, hires_steps=1, hires_strength=0.5, hires_width=0)
    if mode == "img2img":
        py.update(strength=0.75, initial_noise_multiplier=0.5)
    image = Image.new("RGB", (64, 64), (90, 140, 30)) if mode == "img2img" else None
    as_np = {k: ints(v) if type(v) is int else floats(v) for k, v in py.items()}
    want = pipe.generate("a red cube", image=image, progress=False, **py)
    got = pipe.generate("a red cube", image=image, progress=np.False_, preview_every=ints(1), tiled_vae=np.False_,
                        **as_np)
    assert [im.tobytes() for im in got] == [im.tobytes() for im in want]
    assert [im.info["parameters"] for im in got] == [im.info["parameters"] for im in want]
    assert "Steps: 2," in got[0].info["parameters"] and "np." not in got[0].info["parameters"]
    with pytest.raises(TypeError, match="progress must be True or False, got 0"):
        pipe.generate("a red cube", progress=ints(0), steps=1)
    with pytest.raises(TypeError, match="steps must be an integer, got True"):
        pipe.generate("a red cube", steps=np.True_)


def test_strength_is_checked_and_ignored_in_txt2img(pipe):
    """strength outside [0, 1] is refused without an init image too (one line naming it), and within it changes
    nothing there: txt2img and its hires fix (whose second pass takes hires_strength) don't use it."""
    for kw in ({}, dict(hires_scale=1.5, hires_steps=1)):
        with pytest.raises(ValueError, match=re.escape("strength must be in [0, 1], got 5")):
            pipe.generate("a red cube", strength=5, **KW, **kw)
        a, b = (pipe.generate("a red cube", strength=st, **KW, **kw)[0] for st in (0.1, 0.9))
        assert a.tobytes() == b.tobytes() and a.info["parameters"] == b.info["parameters"]
        assert "Denoising strength: 0.7" in a.info["parameters"] if kw else "Denoising" not in a.info["parameters"]
