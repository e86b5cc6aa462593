"""A1111's variation seed (subseed, subseed_strength): the start noise of image i is A1111's slerp of the seed's
noise toward subseed + i's (with a variation strength every image keeps the seed, A1111's all_seeds); in the
infotext as "Variation seed" / "Variation seed strength"; the CLI and the server
take it (the server as A1111's fields). A1111's seed resize (seed_resize_from_w/h): the noise drawn at that size and
pasted centred into the real size's, checked against a transcription of A1111's ImageRNG.first."""
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
from fastsd.philox import PhiloxGenerator
from fastsd.pipeline import Pipeline, seeded_generators, seeded_noise, variation_noise
from fastsd.settings import GenerationSettings

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


def assert_alone_matches(alone, in_batch):
    """Image i of a batch made again alone: bit-equal on the AMD VMs; on Intel (AMX, or held to AVX2) MKL/oneDNN round
    a batch and a single image differently, a level apart in a few values (as tests/test_pipeline.py)."""
    diff = np.abs(_px(alone) - _px(in_batch))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


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
        [("3", "40", "0.5"), ("3", "41", "0.5")]  # (A1111: the seed for every image when it varies them)
    assert "Variation seed" not in base[0].info["parameters"]
    # image 1 made again alone: seed 3, variation seed 41
    again = pipe.generate("a cat", seed=3, subseed=41, subseed_strength=0.5, **KW)[0]
    assert_alone_matches(again, half[1])
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
        assert meta["all_seeds"] == [5, 5, 5, 5]  # A1111's all_seeds when a variation strength is given
        assert not any("subseed" in w for w in meta["warnings"])
        seeds = [parse_infotext(t)[2] for t in meta["infotexts"]]
        assert [(p["Seed"], p["Variation seed"]) for p in seeds] == [("5", "30"), ("5", "31"), ("5", "32"),
                                                                     ("5", "33")]
        # the fourth image (second iteration) made again alone
        one = c.post("/sdapi/v1/txt2img", json={**req, "seed": 5, "subseed": 33, "batch_size": 1, "n_iter": 1})
        assert_alone_matches(decode(one.json()["images"][0]), decode(r.json()["images"][3]))
        rand = info(c.post("/sdapi/v1/txt2img", json={**req, "subseed": -1, "n_iter": 1}))
        assert rand["subseed"] >= 0 and rand["all_subseeds"] == [rand["subseed"], rand["subseed"] + 1]
        none = info(c.post("/sdapi/v1/txt2img", json={**req, "subseed_strength": 0, "n_iter": 1}))
        # (A1111's Processed reports all_subseeds[0] whatever the strength: the subseed given)
        assert none["subseed"] == 30 and "Variation seed" not in none["infotexts"][0]
        bad = c.post("/sdapi/v1/txt2img", json={**req, "subseed_strength": 3})
        assert bad.status_code == 422 and "subseed_strength must be in [0, 1]" in json.dumps(bad.json())
        bad = c.post("/sdapi/v1/txt2img", json={**req, "subseed": -2})
        assert bad.status_code == 422 and "subseed must be -1 (random) or at least 0" in json.dumps(bad.json())


# ---- seed resize (A1111's seed_resize_from_w / _h) ----------------------------------------------------------------

def a1111_first(shape, seeds, subseeds, subseed_strength, seed_resize_from_h, seed_resize_from_w, source="CPU"):
    """modules/rng.py ImageRNG.first, transcribed with randn as A1111's on "CPU" (torch.manual_seed, then torch.randn
    from the global RNG, or from the image's generator when one is given) or "NV" (manual_seed makes the global NV
    generator a new one of the seed). shape: one image's (C, H, W). Returns the noise and the generators (A1111's
    sampler noise continues from them)."""
    def randn(seed, shape, generator=None):
        if source == "NV":
            return (generator or PhiloxGenerator(seed)).randn(shape)
        torch.manual_seed(seed)
        return torch.randn(shape, generator=generator)

    generators = [PhiloxGenerator(seed) if source == "NV" else torch.Generator().manual_seed(seed) for seed in seeds]
    noise_shape = shape if seed_resize_from_h <= 0 or seed_resize_from_w <= 0 else \
        (shape[0], seed_resize_from_h // 8, seed_resize_from_w // 8)
    xs = []
    with torch.random.fork_rng(devices=[]):
        for i, (seed, generator) in enumerate(zip(seeds, generators)):
            subnoise = None
            if subseeds is not None and subseed_strength != 0:
                subnoise = randn(0 if i >= len(subseeds) else subseeds[i], noise_shape)
            noise = randn(seed, noise_shape) if noise_shape != shape else randn(seed, shape, generator=generator)
            if subnoise is not None:
                noise = a1111_slerp(subseed_strength, noise, subnoise)
            if noise_shape != shape:
                x = randn(seed, shape, generator=generator)
                dx = (shape[2] - noise_shape[2]) // 2
                dy = (shape[1] - noise_shape[1]) // 2
                w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx = 0 if dx < 0 else dx
                ty = 0 if dy < 0 else dy
                dx = max(-dx, 0)
                dy = max(-dy, 0)
                x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
                noise = x
            xs.append(noise)
    return torch.stack(xs), generators


# (width, height) real -> (w, h) resized from: smaller, larger, mixed, odd surpluses / shortfalls in latent cells,
# the real size itself (no resize in A1111)
SIZES = [((64, 64), (32, 32)), ((64, 48), (128, 96)), ((64, 48), (40, 80)), ((96, 64), (72, 88)),
         ((64, 64), (88, 24)), ((64, 64), (64, 64))]


@pytest.mark.parametrize("size,resize", SIZES)
@pytest.mark.parametrize("subseed_strength", [0.0, 0.3])
@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_seed_resize_noise_is_a1111s(pipe, size, resize, subseed_strength, source):
    s = GenerationSettings("x", seed=10, width=size[0], height=size[1], num_images=3, subseed=50,
                           subseed_strength=subseed_strength, seed_resize_from_w=resize[0],
                           seed_resize_from_h=resize[1], randn_source=source)
    s.validate()
    seeds = [10, 11, 12]
    shape = pipe.latent_shape(s)
    gens = seeded_generators(seeds, source=source)
    got = pipe._start_noise(s, seeds, gens, shape)
    want, a1111_gens = a1111_first(shape[1:], seeds, [50, 51, 52], subseed_strength, resize[1], resize[0], source)
    assert got.shape == want.shape == shape
    if subseed_strength:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, want)
    # the generators are where A1111's are: the sampler's step noise is the same
    assert torch.equal(seeded_noise(gens, (3,), "cpu"), torch.stack([torch.randn(3, generator=a) if source == "CPU"
                                                                     else a.randn((3,)) for a in a1111_gens]))
    plain, _ = a1111_first(shape[1:], seeds, [50, 51, 52], subseed_strength, 0, 0, source)
    if resize != size:  # a resize changes the noise
        assert not torch.allclose(got, plain)


def test_seed_resize_off_changes_nothing(pipe):
    base = pipe.generate("a cat", seed=3, num_images=2, **KW)
    # off is fastsd's (diffusers') draw: image i's first torch.randn from a generator seeded with seed + i
    drawn = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)])
    assert [_px(a).tolist() for a in pipe.generate("a cat", seed=3, num_images=2, latents=drawn, **KW)] == \
        [_px(a).tolist() for a in base]
    same = pipe.generate("a cat", seed=3, num_images=2, seed_resize_from_w=64, seed_resize_from_h=64, **KW)
    assert [_px(a).tolist() for a in same] == [_px(a).tolist() for a in base]  # the real size: no resize (A1111)
    assert "Seed resize from" not in base[0].info["parameters"]


def test_generate_with_seed_resize(pipe):
    kw = dict(seed=3, num_images=2, subseed=20, subseed_strength=0.4, seed_resize_from_w=32, seed_resize_from_h=96)
    got = pipe.generate("a cat", **kw, **KW)
    want, _ = a1111_first((4, 8, 8), [3, 3], [20, 21], 0.4, 96, 32)  # (A1111's all_seeds: the seed for both)
    from_noise = pipe.generate("a cat", seed=3, num_images=2, latents=want, **KW)
    for g, f in zip(got, from_noise):  # (A1111's slerp per image vs fastsd's batched one: rounding)
        assert np.abs(_px(g) - _px(f)).max() <= 1
    assert np.abs(_px(got[0]) - _px(pipe.generate("a cat", seed=3, num_images=2, subseed=20, subseed_strength=0.4,
                                                  **KW)[0])).max() > 8
    params = [parse_infotext(im.info["parameters"])[2] for im in got]
    assert [(p["Seed"], p["Variation seed"], p["Seed resize from"]) for p in params] == \
        [("3", "20", "32x96"), ("3", "21", "32x96")]
    again = pipe.generate("a cat", **{**kw, "subseed": 21, "num_images": 1}, **KW)[0]
    assert_alone_matches(again, got[1])  # image 1 made again alone


def test_the_hires_pass_resizes_the_seed_too(pipe, monkeypatch):
    calls = []
    start_noise = Pipeline._start_noise

    def spy(self, s, seeds, gens, shape):
        noise = start_noise(self, s, seeds, gens, shape)
        calls.append((s.width, s.height, s.seed_resize_from_w, s.seed_resize_from_h, noise))
        return noise

    monkeypatch.setattr(Pipeline, "_start_noise", spy)
    im = pipe.generate("a cat", seed=6, seed_resize_from_w=48, seed_resize_from_h=48, hires_scale=2, **KW)[0]
    assert [c[:4] for c in calls] == [(64, 64, 48, 48), (128, 128, 48, 48)]
    want, _ = a1111_first((4, 16, 16), [6], None, 0, 48, 48)  # A1111's hires ImageRNG at the second pass's size
    assert torch.equal(calls[1][4], want)
    assert parse_infotext(im.info["parameters"])[2]["Seed resize from"] == "48x48"


@pytest.mark.parametrize("kw,match", [
    (dict(seed_resize_from_w=30, seed_resize_from_h=32), "seed_resize_from_w must be 0 or a multiple of 8 up to "
                                                         "4096, got 30"),
    (dict(seed_resize_from_w=32, seed_resize_from_h=-8), "seed_resize_from_h must be at least 0, got -8"),
    (dict(seed_resize_from_w=8192, seed_resize_from_h=32), "seed_resize_from_w must be 0 or a multiple of 8 up to "
                                                           "4096, got 8192"),
    (dict(seed_resize_from_w=64), "seed_resize_from_w and seed_resize_from_h go together (both > 0, or both 0 = "
                                  "off), got 64 and 0"),
    (dict(seed_resize_from_w=32.0, seed_resize_from_h=32), "seed_resize_from_w must be an integer, got 32.0"),
    (dict(seed_resize_from_w=32, seed_resize_from_h=32, latents=torch.zeros(1, 4, 8, 8)),
     "they can't resize given latents"),
])
def test_bad_seed_resize_settings_are_named(pipe, kw, match):
    with pytest.raises((TypeError, ValueError), match=re.escape(match)):
        pipe.generate("a cat", seed=1, **{**KW, **kw})


def test_cli_seed_resize(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "r.png"
    assert cli(["a cat", "--model", "random:tiny", "--steps", "1", "--width", "64", "--height", "64", "--seed", "2",
                "--seed-resize-from-w", "32", "--seed-resize-from-h", "48", "--out", str(out), "--no-progress"]) == 0
    assert parse_infotext(Image.open(out).info["parameters"])[2]["Seed resize from"] == "32x48"
    assert cli(["a cat", "--model", "random:tiny", "--seed-resize-from-w", "33", "--seed-resize-from-h", "32",
                "--out", str(tmp_path / "w.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: seed_resize_from_w must be 0 or a multiple of 8 up to 4096, got 33"
    assert not (tmp_path / "w.png").exists()


def test_server_takes_a1111s_seed_resize_fields():
    server = main_server()
    req = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
           "batch_size": 2, "seed_resize_from_w": 40, "seed_resize_from_h": 32}
    with server.client() as c:
        r = c.post("/sdapi/v1/txt2img", json=req)
        assert r.status_code == 200, r.text
        meta = info(r)
        assert (meta["seed_resize_from_w"], meta["seed_resize_from_h"]) == (40, 32)
        assert not any("seed_resize" in w for w in meta["warnings"])
        assert [parse_infotext(t)[2]["Seed resize from"] for t in meta["infotexts"]] == ["40x32", "40x32"]
        off = c.post("/sdapi/v1/txt2img", json={**req, "seed_resize_from_w": -1, "seed_resize_from_h": -1})
        off_meta = info(off)
        assert (off_meta["seed_resize_from_w"], off_meta["seed_resize_from_h"]) == (-1, -1)
        assert "Seed resize from" not in off_meta["infotexts"][0]
        assert _px(decode(off.json()["images"][0])).tolist() != _px(decode(r.json()["images"][0])).tolist()
        # as A1111, one without the other does nothing (here warned); 45 is 40 in latent cells (rounded, warned)
        one = c.post("/sdapi/v1/txt2img", json={**req, "seed_resize_from_h": -1})
        assert [_px(decode(b)).tolist() for b in one.json()["images"]] == \
            [_px(decode(b)).tolist() for b in off.json()["images"]]
        assert any("resized only when both are > 0" in w for w in info(one)["warnings"])
        rounded = c.post("/sdapi/v1/txt2img", json={**req, "seed_resize_from_w": 45})
        assert "seed_resize_from_w 45: rounded down to 40 (a multiple of 8)" in info(rounded)["warnings"]
        assert rounded.json()["images"] == r.json()["images"]
        bad = c.post("/sdapi/v1/txt2img", json={**req, "seed_resize_from_w": -2})
        assert bad.status_code == 422 and "seed_resize_from_w must be -1 or 0 (off) or a size, got -2" in \
            json.dumps(bad.json())


# ---- A1111's eta_noise_seed_delta (ENSD) ------------------------------------------------------------------------

def _first_draws(seeds, shape=(4, 8, 8)):
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("sampler", ["euler_a", "lcm", "dpm2_a"])
def test_ensd_seeds_the_sampler_noise_as_a1111(pipe, sampler):
    """A1111's ENSD (its ImageRNG.first replaces each image's generator by one of seed + ENSD once the start noise is
    drawn): a run with ENSD d is the run of seed + d started from the seed's own first draw (given latents draw
    nothing, so that run's sampler noise is seed + d's from the start), image by image in a batch (image i: seed + i
    + d); it differs from the run without ENSD; the infotext says "ENSD: d" and reads back."""
    from fastsd.infotext_settings import settings_from_infotext

    kw = dict(KW, sampler=sampler, guidance_scale=3.0, num_images=2)
    ensd = pipe.generate("a cat", seed=7, eta_noise_seed_delta=31337, **kw)
    rebuilt = pipe.generate("a cat", seed=7 + 31337, latents=_first_draws([7, 8]), **kw)
    plain = pipe.generate("a cat", seed=7, **kw)
    for a, b, c in zip(ensd, rebuilt, plain):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert "ENSD: 31337" in ensd[0].info["parameters"] and "ENSD" not in plain[0].info["parameters"]
    assert settings_from_infotext(ensd[1].info["parameters"])[0]["eta_noise_seed_delta"] == 31337


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm2_karras"])
def test_sigma_churn_draws_each_images_noise(pipe, sampler):
    """A1111's sigma churn (tests/test_samplers_extra.py holds the loops to k-diffusion's): its noise comes from each
    image's generator (image i of a batch is image seed + i alone), so ENSD changes a churned image; s_noise scales
    it; "Sigma churn" / "Sigma noise" are written and read back; s_tmin above every sigma turns the churn off.
    (Image seed + i of a batch is compared with the first of a batch from seed + i: a batch of another size may
    round differently.)"""
    from fastsd.infotext_settings import settings_from_infotext

    kw = dict(KW, sampler=sampler, guidance_scale=3.0, steps=3)
    plain = pipe.generate("a cat", seed=4, **kw)[0]
    batch = pipe.generate("a cat", seed=4, num_images=2, s_churn=2.0, **kw)
    shifted = pipe.generate("a cat", seed=5, num_images=2, s_churn=2.0, **kw)[0]
    assert np.array_equal(np.asarray(batch[1]), np.asarray(shifted))
    churned = pipe.generate("a cat", seed=4, s_churn=2.0, **kw)[0]
    assert not np.array_equal(np.asarray(churned), np.asarray(plain))
    ensd = pipe.generate("a cat", seed=4, s_churn=2.0, eta_noise_seed_delta=3, **kw)[0]
    assert not np.array_equal(np.asarray(ensd), np.asarray(churned)) and "ENSD: 3" in ensd.info["parameters"]
    assert "ENSD" not in pipe.generate("a cat", seed=4, eta_noise_seed_delta=3, **kw)[0].info["parameters"]
    noisier = pipe.generate("a cat", seed=4, s_churn=2.0, s_noise=1.05, **kw)[0]
    assert not np.array_equal(np.asarray(noisier), np.asarray(churned))
    got = settings_from_infotext(noisier.info["parameters"])[0]
    assert (got["s_churn"], got["s_noise"]) == (2.0, 1.05)
    off = pipe.generate("a cat", seed=4, s_churn=2.0, s_tmin=1e4, **kw)[0]
    assert np.array_equal(np.asarray(off), np.asarray(plain))


def test_sigma_params_by_sampler(pipe):
    """s_noise scales DPM++ 2M SDE's noise (changes its image) but Euler's only through a churn; a sampler that takes
    none of them refuses them by name; an infotext's value for such a sampler is warned and not read."""
    from fastsd.infotext_settings import settings_from_infotext

    kw = dict(KW, guidance_scale=3.0, steps=3, seed=2)
    sde = dict(kw, sampler="dpmpp_2m_sde")
    assert not np.array_equal(np.asarray(pipe.generate("a cat", s_noise=0.5, **sde)[0]),
                              np.asarray(pipe.generate("a cat", **sde)[0]))
    euler = pipe.generate("a cat", s_noise=0.5, **kw)[0]
    assert np.array_equal(np.asarray(euler), np.asarray(pipe.generate("a cat", **kw)[0]))
    with pytest.raises(ValueError, match=re.escape("s_churn: Euler a takes none (Euler, Heun and DPM2 do)")):
        pipe.generate("a cat", s_churn=1.0, **dict(kw, sampler="euler_a"))
    with pytest.raises(ValueError, match="s_noise: Euler a takes none"):
        pipe.generate("a cat", s_noise=0.5, **dict(kw, sampler="euler_a"))
    with pytest.raises(ValueError, match="s_tmax must be >= 0"):
        pipe.generate("a cat", s_tmax=-1.0, **kw)
    got, warnings = settings_from_infotext("a cat\nSteps: 4, Sampler: DPM++ 2M, Sigma churn: 1.5, Seed: 1, Size: 64x64")
    assert "s_churn" not in got and warnings == ["Sigma churn: 1.5: fastsd takes it for Euler, Heun and DPM2 only; "
                                                 "DPM++ 2M runs without it, ignored"]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras", "dpmpp_sde"])
def test_ensd_changes_nothing_without_generator_noise(pipe, sampler):
    """A deterministic sampler draws no sampler noise, and A1111's DPM++ SDE draws its own (a Brownian tree seeded by
    the image's seed, as A1111's): ENSD leaves their images as they were and is not written."""
    kw = dict(KW, sampler=sampler, guidance_scale=3.0)
    with_ensd = pipe.generate("a cat", seed=3, eta_noise_seed_delta=5, **kw)[0]
    assert np.array_equal(np.asarray(with_ensd), np.asarray(pipe.generate("a cat", seed=3, **kw)[0]))
    assert "ENSD" not in with_ensd.info["parameters"]


def test_ensd_in_the_hires_pass_and_bad_values(pipe):
    """The hires fix's second pass draws its start noise from the seed again and its sampler noise from seed + ENSD
    (A1111 makes a new ImageRNG for it); ENSD is a whole number from 0."""
    kw = dict(KW, sampler="euler_a", hires_scale=1.5, hires_steps=1)
    a = pipe.generate("a cat", seed=2, eta_noise_seed_delta=9, **kw)[0]
    b = pipe.generate("a cat", seed=2, **kw)[0]
    assert a.size == (96, 96) and not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="eta_noise_seed_delta must be at least 0"):
        pipe.generate("a cat", seed=2, eta_noise_seed_delta=-1, **KW)
    with pytest.raises(TypeError, match="eta_noise_seed_delta must be an integer"):
        pipe.generate("a cat", seed=2, eta_noise_seed_delta=1.5, **KW)


# ---- A1111's initial_noise_multiplier ("Noise multiplier for img2img") ---------------------------------------------

def test_img2img_noise_multiplier_scales_the_start_noise(pipe):
    """img2img's start noise times initial_noise_multiplier (A1111's x *= p.initial_noise_multiplier before
    sample_img2img): the run with multiplier m from latents L is the run from m * L, for img2img and inpainting; the
    infotext says "Noise multiplier: m" and reads back; txt2img (and its hires fix) is untouched; bad values named."""
    from PIL import Image

    from fastsd.infotext_settings import settings_from_infotext

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    lat = _first_draws([4])
    kw = dict(KW, sampler="euler_a", guidance_scale=3.0, strength=0.7, seed=4)
    for extra in ({}, {"mask": mask}):
        scaled = pipe.generate("a cat", image=image, latents=lat, initial_noise_multiplier=0.8, **kw, **extra)[0]
        by_hand = pipe.generate("a cat", image=image, latents=lat * 0.8, **kw, **extra)[0]
        assert np.array_equal(np.asarray(scaled), np.asarray(by_hand))
        assert not np.array_equal(np.asarray(scaled), np.asarray(pipe.generate("a cat", image=image, latents=lat, **kw,
                                                                                **extra)[0]))
        assert "Noise multiplier: 0.8" in scaled.info["parameters"]
        assert settings_from_infotext(scaled.info["parameters"])[0]["initial_noise_multiplier"] == 0.8
    t2i = dict(KW, seed=4, hires_scale=1.5, hires_steps=1)
    a, b = (pipe.generate("a cat", initial_noise_multiplier=m, **t2i)[0] for m in (0.5, 1.0))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and "Noise multiplier" not in a.info["parameters"]
    with pytest.raises(ValueError, match="initial_noise_multiplier must be >= 0"):
        pipe.generate("a cat", image=image, initial_noise_multiplier=-0.5, **kw)


# ---- A1111's eta (Euler a's "Eta", DDIM's "Eta DDIM") -------------------------------------------------------------

def test_eta_of_euler_a_and_ddim(pipe):
    """eta reaches Euler a and DDIM (tests/test_samplers_extra.py holds Euler a's to k-diffusion's): Euler a at eta 0
    is Euler's image; another eta changes the image, is written as A1111 writes it ("Eta", "Eta DDIM"; not at the
    sampler's default) and read back for that sampler only; another sampler refuses an eta by name."""
    from fastsd.infotext_settings import settings_from_infotext
    from fastsd.samplers import ETA_TAKERS

    kw = dict(KW, guidance_scale=3.0, seed=6, steps=4)
    euler = np.asarray(pipe.generate("a cat", **{**kw, "sampler": "euler"})[0])
    assert np.array_equal(np.asarray(pipe.generate("a cat", eta=0.0, **{**kw, "sampler": "euler_a"})[0]), euler)
    for sampler, eta, key, default in (("euler_a", 0.5, "Eta", 1.0), ("ddim", 0.5, "Eta DDIM", 0.0),
                                       ("dpm_fast", 0.5, "Eta", 1.0)):
        base = pipe.generate("a cat", **{**kw, "sampler": sampler})[0]
        same = pipe.generate("a cat", eta=default, **{**kw, "sampler": sampler})[0]
        other = pipe.generate("a cat", eta=eta, **{**kw, "sampler": sampler})[0]
        assert np.array_equal(np.asarray(base), np.asarray(same)) and key not in same.info["parameters"]
        assert not np.array_equal(np.asarray(base), np.asarray(other))
        assert f"{key}: {eta}" in other.info["parameters"]
        assert settings_from_infotext(other.info["parameters"])[0]["eta"] == eta
    text = "a cat\nSteps: 4, Sampler: DDIM CFG++, Eta DDIM: 0.5, Seed: 1, Size: 64x64"
    got, warnings = settings_from_infotext(text)
    assert "eta" not in got and warnings == [f"Eta DDIM: 0.5: fastsd takes an eta for {ETA_TAKERS} only; DDIM CFG++ "
                                             "runs with its own, ignored"]
    with pytest.raises(ValueError, match=re.escape(f"eta: Euler takes none here ({ETA_TAKERS} do)")):
        pipe.generate("a cat", eta=0.5, **{**kw, "sampler": "euler"})
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        pipe.generate("a cat", eta=1.5, **{**kw, "sampler": "euler_a"})


def test_the_seed_range_is_checked_on_the_images_seeds():
    """With a variation strength every image keeps the seed, so the largest seed takes a batch; without, seed + i."""
    GenerationSettings("a cat", seed=2**63 - 1, num_images=2, subseed=1, subseed_strength=0.5).validate()
    with pytest.raises(ValueError, match="seed \\+ num_images must stay below 2\\*\\*63"):
        GenerationSettings("a cat", seed=2**63 - 1, num_images=2).validate()
