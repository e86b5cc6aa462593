"""GenerationSettings is the one definition of the generation parameters: Pipeline.generate's keywords and
the CLI's options are checked against it here; validation names the argument and runs before any model."""
import inspect
import re

import pytest

from fastsd.generate import build_parser
from fastsd.pipeline import Pipeline
from fastsd.settings import FIELDS, GenerationSettings


def test_generate_signature_is_the_settings():
    params = inspect.signature(Pipeline.generate).parameters
    for name, f in FIELDS.items():
        assert name in params, name
        if name != "prompt":
            assert params[name].default == f.default, name
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_cli_options_are_the_settings():
    p = build_parser()
    dests = {a.dest: a for a in p._actions}
    for name, f in FIELDS.items():
        assert name in dests, name
        if name != "prompt":
            assert dests[name].default == f.default, name
            assert dests[name].help == f.metadata["help"]
    assert "--cfg-scale" in dests["guidance_scale"].option_strings
    assert dests["width"].default is None  # None = the init image's size (img2img keeps it), else 512


@pytest.mark.parametrize("kw,err,match", [
    (dict(prompt=None), TypeError, "prompt must be a string"),
    (dict(steps=2.5), TypeError, "steps must be an integer"),
    (dict(steps=True), TypeError, "steps must be an integer"),
    (dict(width="512"), TypeError, "width must be an integer"),
    (dict(steps=1001), ValueError, "steps must be at most 1000"),
    (dict(width=100000), ValueError, "above 4096"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be a finite number"),
    (dict(seed=2**63 - 1, num_images=2), ValueError, "seed + num_images must stay below 2**63"),
    (dict(seed=-1), ValueError, "seed must be at least 0"),
    (dict(sampler=3), TypeError, "sampler must be a string"),
    (dict(prompt="a \ud800 cat"), ValueError, "prompt is not valid text: '\\ud800' at character 2"),
    (dict(negative_prompt="x\udcff"), ValueError, "negative_prompt is not valid text"),
])
def test_validation_names_the_argument(kw, err, match):
    s = GenerationSettings(**{"prompt": "a cat", **kw})
    with pytest.raises(err, match=re.escape(match)):
        s.validate()


def test_large_sizes_need_allow_large():
    s = GenerationSettings("a", width=8192, height=512)
    with pytest.raises(ValueError):
        s.validate()
    s.validate(allow_large=True)


def test_resolve_returns_a_copy():
    from PIL import Image

    s = GenerationSettings("a cat")
    r = Pipeline.resolve(None, s, Image.new("RGB", (100, 60)))
    assert (r.width, r.height) == (96, 56) and r.seed is not None
    assert s.width is None and s.seed is None  # the caller's settings are untouched


def test_the_sampler_option_help_names_every_sampler():
    import dataclasses

    from fastsd.samplers import SAMPLERS
    from fastsd.settings import GenerationSettings

    (field,) = [f for f in dataclasses.fields(GenerationSettings) if f.name == "sampler"]
    listed = field.metadata["help"].split(", ")
    assert all(name in listed for name in SAMPLERS), listed


def test_numpy_numbers_are_taken_as_python_numbers():
    """numpy's scalars (what numpy code passes) are the Python numbers they stand for, converted at once, so the
    checks and everything after (the infotext) see int / float / bool; a bool (np.bool_ too) or a float where an
    integer goes is refused as before."""
    import numpy as np

    s = GenerationSettings("a cat", steps=np.int64(4), guidance_scale=np.float32(7.5), seed=np.uint32(3),
                           width=np.int32(64), height=np.int64(64), num_images=np.int8(2), strength=np.float16(0.5),
                           hires_scale=np.float64(1.5), hires_steps=np.int64(2), s_min_uncond_all=np.True_,
                           subseed_strength=np.float32(0.25))
    s.validate()
    names = ("steps", "guidance_scale", "seed", "width", "height", "num_images", "strength", "hires_scale",
             "hires_steps", "s_min_uncond_all", "subseed_strength")
    got = {k: (type(v), v) for k, v in s.kwargs().items() if k in names}
    assert got == {"steps": (int, 4), "guidance_scale": (float, 7.5), "seed": (int, 3), "width": (int, 64),
                   "height": (int, 64), "num_images": (int, 2), "strength": (float, 0.5), "hires_scale": (float, 1.5),
                   "hires_steps": (int, 2), "s_min_uncond_all": (bool, True), "subseed_strength": (float, 0.25)}
    assert type(s.replace(steps=np.int16(5)).steps) is int
    # a float32 / float16 is its shortest decimal (what was meant, and what the infotext then says), not its binary
    assert s.replace(guidance_scale=np.float32(7.3), strength=np.float16(0.8)).kwargs()["guidance_scale"] == 7.3
    assert s.replace(strength=np.float16(0.8)).strength == 0.8 and s.replace(strength=np.float64(0.1)).strength == 0.1
    for kw, match in ((dict(steps=np.True_), "steps must be an integer, got True"),
                      (dict(steps=np.float32(4)), "steps must be an integer, got 4.0"),
                      (dict(guidance_scale=np.False_), "guidance_scale must be a number, got False"),
                      (dict(s_min_uncond_all=np.int64(1)), "s_min_uncond_all must be True or False, got 1"),
                      (dict(guidance_scale=np.float32("nan")), "guidance_scale must be a finite number")):
        with pytest.raises((TypeError, ValueError), match=re.escape(match)):
            GenerationSettings("a cat", **kw).validate()


@pytest.mark.parametrize("strength", [5, -0.1, 1.0001])
def test_strength_is_checked_in_txt2img_too(strength):
    """strength outside [0, 1] is a mistake whatever the mode, though txt2img does not use it (the hires fix has its
    own, hires_strength)."""
    for kw in ({}, dict(hires_scale=1.5)):
        with pytest.raises(ValueError, match=re.escape(f"strength must be in [0, 1], got {strength}")):
            GenerationSettings("a cat", strength=strength, **kw).validate()
    GenerationSettings("a cat", strength=0.0, hires_scale=1.5, hires_strength=1.0).validate()
    with pytest.raises(ValueError, match=re.escape(f"hires_strength must be in [0, 1], got {strength}")):
        GenerationSettings("a cat", hires_scale=1.5, hires_strength=strength).validate()
