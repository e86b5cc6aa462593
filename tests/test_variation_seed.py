"""A1111's variation seed (subseed, subseed_strength): the start noise of image i is A1111's slerp of seed + i's
noise toward subseed + i's; in the infotext as "Variation seed" / "Variation seed strength"; the CLI and the server
take it (the server as A1111's fields)."""
import json
import math
import re

import numpy as np
import pytest
import torch
from serve_server import decode, info, main_server

import fastsd
from fastsd.generate import main as cli
from fastsd.image import parse_infotext
from fastsd.pipeline import variation_noise

KW = dict(steps=2, width=64, height=64, guidance_scale=1.0, sampler="euler", progress=False)


@pytest.fixture(scope="module")
def pipe():
    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


def a1111_slerp(val, low, high):
    """modules/rng.py slerp, as A1111 calls it: on one image's noise (C, H, W)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _noise(seed, shape=(4, 8, 12)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.5, 0.93, 1.0])
def test_variation_noise_is_a1111s_slerp_per_image(strength):
    low = torch.stack([_noise(1), _noise(2), _noise(3)])
    high = torch.stack([_noise(11), _noise(12), low[2]])  # image 2: the same noise, A1111's linear fallback
    got = variation_noise(low, high, strength)
    want = torch.stack([a1111_slerp(strength, lo, hi) for lo, hi in zip(low, high)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[2], low[2], rtol=0, atol=1e-6)
    end = low if strength == 0 else high if strength == 1 else None
    if end is not None:
        torch.testing.assert_close(got[:2], end[:2], rtol=0, atol=2e-6)
    else:  # in between, and of unit variance as a start noise must be (slerp keeps the norm of independent noise)
        assert (got[:2] - low[:2]).abs().max() > 0.01 and (got[:2] - high[:2]).abs().max() > 0.01
        assert abs(got[:2].std().item() - 1) < 0.1


def _px(im):
    return np.asarray(im).astype(int)


def test_generate_with_a_variation_seed(pipe):
    base = pipe.generate("a cat", seed=3, num_images=2, **KW)
    assert [_px(a).tolist() for a in pipe.generate("a cat", seed=3, num_images=2, subseed=40, subseed_strength=0,
                                                   **KW)] == [_px(a).tolist() for a in base]
    # strength 1: image i is the variation seed subseed + i's image (slerp lands on its noise, up to rounding)
    full = pipe.generate("a cat", seed=3, num_images=2, subseed=40, subseed_strength=1.0, **KW)
    for im, seed in zip(full, (40, 41)):
        assert np.abs(_px(im) - _px(pipe.generate("a cat", seed=seed, **KW)[0])).max() <= 1
    half = pipe.generate("a cat", seed=3, num_images=2, subseed=40, subseed_strength=0.5, **KW)
    for h, b, f in zip(half, base, full):
        assert np.abs(_px(h) - _px(b)).max() > 8 and np.abs(_px(h) - _px(f)).max() > 8
    params = [parse_infotext(im.info["parameters"])[2] for im in half]
    assert [(p["Seed"], p["Variation seed"], p["Variation seed strength"]) for p in params] == \
        [("3", "40", "0.5"), ("4", "41", "0.5")]
    assert "Variation seed" not in base[0].info["parameters"]
    # image 1 made again alone: seed 4, variation seed 41
    again = pipe.generate("a cat", seed=4, subseed=41, subseed_strength=0.5, **KW)[0]
    assert _px(again).tolist() == _px(half[1]).tolist()
    # no variation seed given: a random one, recorded
    rand = pipe.generate("a cat", seed=3, subseed_strength=0.25, **KW)[0]
    assert parse_infotext(rand.info["parameters"])[2]["Variation seed"].isdigit()


@pytest.mark.parametrize("kw,match", [
    (dict(subseed_strength=1.5), "subseed_strength must be in [0, 1], got 1.5"),
    (dict(subseed_strength=-0.1), "subseed_strength must be in [0, 1], got -0.1"),
    (dict(subseed_strength=math.nan), "subseed_strength must be a finite number"),
    (dict(subseed=-1, subseed_strength=0.5), "subseed must be at least 0"),
    (dict(subseed=2**63 - 1, subseed_strength=0.5, num_images=2), "subseed + num_images must stay below 2**63"),
    (dict(subseed_strength=0.5, latents=torch.zeros(1, 4, 8, 8)), "it can't vary given latents"),
])
def test_bad_variation_settings_are_named(pipe, kw, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        pipe.generate("a cat", seed=1, **{**KW, **kw})


def test_cli_variation_seed(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert cli(["a cat", "--model", "random:tiny", "--steps", "1", "--width", "64", "--height", "64", "--seed", "2",
                "--subseed", "9", "--subseed-strength", "0.3", "--out", str(out), "--no-progress"]) == 0
    from PIL import Image

    params = parse_infotext(Image.open(out).info["parameters"])[2]
    assert params["Variation seed"] == "9" and params["Variation seed strength"] == "0.3"
    assert cli(["a cat", "--model", "random:tiny", "--subseed-strength", "2", "--out", str(tmp_path / "w.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: subseed_strength must be in [0, 1], got 2.0" and not (tmp_path / "w.png").exists()


def test_server_takes_a1111s_variation_fields():
    server = main_server()
    req = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
           "batch_size": 2, "n_iter": 2, "subseed": 30, "subseed_strength": 0.4}
    with server.client() as c:
        r = c.post("/sdapi/v1/txt2img", json=req)
        assert r.status_code == 200, r.text
        meta = info(r)
        assert meta["subseed"] == 30 and meta["all_subseeds"] == [30, 31, 32, 33] and meta["subseed_strength"] == 0.4
        assert not any("subseed" in w for w in meta["warnings"])
        seeds = [parse_infotext(t)[2] for t in meta["infotexts"]]
        assert [(p["Seed"], p["Variation seed"]) for p in seeds] == [("5", "30"), ("6", "31"), ("7", "32"),
                                                                     ("8", "33")]
        # the fourth image (second iteration) made again alone
        one = c.post("/sdapi/v1/txt2img", json={**req, "seed": 8, "subseed": 33, "batch_size": 1, "n_iter": 1})
        assert _px(decode(one.json()["images"][0])).tolist() == _px(decode(r.json()["images"][3])).tolist()
        rand = info(c.post("/sdapi/v1/txt2img", json={**req, "subseed": -1, "n_iter": 1}))
        assert rand["subseed"] >= 0 and rand["all_subseeds"] == [rand["subseed"], rand["subseed"] + 1]
        none = info(c.post("/sdapi/v1/txt2img", json={**req, "subseed_strength": 0, "n_iter": 1}))
        assert none["subseed"] == -1 and "Variation seed" not in none["infotexts"][0]
        bad = c.post("/sdapi/v1/txt2img", json={**req, "subseed_strength": 3})
        assert bad.status_code == 422 and "subseed_strength must be in [0, 1]" in json.dumps(bad.json())
        bad = c.post("/sdapi/v1/txt2img", json={**req, "subseed": -2})
        assert bad.status_code == 422 and "subseed must be -1 (random) or at least 0" in json.dumps(bad.json())
