"""fastsd.philox: the noise torch.randn draws on an NVIDIA GPU, drawn on the CPU (A1111's random number sources "GPU"
and "NV"), held to Random123's known answers for Philox4x32-10, to numbers CUDA printed, and to A1111's; and
`randn_source` through a generation (start noise, step noise, ENSD, hires), the infotext, the CLI, the server and
fastsd.batch."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from serve_server import decode, info, main_server

import fastsd
from fastsd.batch import Defaults, run
from fastsd.generate import main as cli
from fastsd.image import parse_infotext
from fastsd.infotext_settings import InfotextError, settings_from_infotext
from fastsd.philox import PhiloxGenerator, box_muller_first, philox4x32

# Random123 (github.com/DEShawResearch/random123) tests/kat_vectors, philox4x32 10 rounds: counter, key -> output
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
# torch.manual_seed(0); torch.randn(8, 8, device="cuda") on an NVIDIA GPU, as a public CUDA / Triton tutorial printed
# it (4 decimals)
CUDA_SEED_0 = [[-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284],
               [-1.0745, -0.3631, -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820],
               [-0.1271, 1.2169, 1.4353, 1.0605, -0.4941, -1.4244, -0.7244, -1.2973],
               [0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373, 1.3506, -0.2879],
               [-0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150],
               [0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554],
               [-0.1836, 0.3824, 0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863],
               [-0.5499, -0.3231, -0.5469, 0.9049, 0.2837, 0.1210, 0.4730, -1.0823]]
# A1111's modules/rng_philox.py documents Generator(seed=0).randn((3, 4)) as these (8 decimals): a few float32 ulps
# from what its float64 arithmetic (and fastsd's) gives, as CUDA's own float32 Box-Muller with a fast sine is
A1111_SEED_0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
KW = dict(steps=2, width=64, height=64, guidance_scale=1.0, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


@pytest.fixture(scope="module")
def default_pipe():  # (the CLI's, the server's and fastsd.batch's dtype and backend)
    return fastsd.load_pipeline("random:tiny")


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox4x32_10_known_answers(counter, key, want):
    got = philox4x32(np.array(counter, dtype=np.uint64)[:, None], np.array(key, dtype=np.uint64)[:, None])
    assert got.dtype == np.uint32 and tuple(int(w) for w in got[:, 0]) == want


def test_the_numbers_cuda_draws():
    assert torch.equal(PhiloxGenerator(0).randn((8, 8)).mul(1e4).round().div(1e4), torch.tensor(CUDA_SEED_0))
    torch.testing.assert_close(PhiloxGenerator(0).randn((3, 4)), torch.tensor(A1111_SEED_0), rtol=0, atol=3e-7)


def test_draws_go_on_seeds_are_64_bit_and_the_noise_is_normal():
    g = PhiloxGenerator(0)
    first, second = g.randn((4, 8)), g.randn((4, 8))
    assert not torch.equal(first, second) and g.initial_seed() == 0
    # draw n is counter word 0 = n (curand's offset 4n); element i is subsequence i
    w = philox4x32((np.ones(32, np.uint64), np.zeros(32, np.uint64), np.arange(32, dtype=np.uint64),
                    np.zeros(32, np.uint64)), (np.zeros(32, np.uint64), np.zeros(32, np.uint64)))
    assert torch.equal(second.flatten(), torch.from_numpy(box_muller_first(w[0], w[1])))
    assert torch.equal(PhiloxGenerator(-1).randn((9,)), PhiloxGenerator(2**64 - 1).randn((9,)))  # (torch's rule)
    assert not torch.equal(PhiloxGenerator(5).randn((9,)), PhiloxGenerator(5 + 2**32).randn((9,)))
    x = PhiloxGenerator(12345).randn((1000, 1000))
    assert x.dtype == torch.float32 and x.shape == (1000, 1000)
    assert abs(x.mean().item()) < 0.005 and abs(x.std().item() - 1) < 0.005  # (5 standard errors)
    assert abs((x > 1.959964).float().mean().item() - 0.025) < 0.001


def _nv_draws(seed, shape, n):
    g = PhiloxGenerator(seed)
    return [g.randn(shape) for _ in range(n)]


def test_a_generation_draws_cudas_noise(pipe, monkeypatch):
    """randn_source "NV" / "GPU": image i's start noise is the first draw of seed + i's generator, its sampler noise
    the draws after it (A1111's ImageRNG with its NV generators); "GPU" is the same noise (fastsd draws CUDA's on any
    device); the infotext says "RNG: NV", nothing for "GPU" (A1111's default), "RNG: CPU" for CPU."""
    nv = pipe.generate("a cat", seed=7, num_images=2, sampler="euler", randn_source="NV", **KW)
    latents = torch.cat([PhiloxGenerator(s).randn((1, 4, 8, 8)) for s in (7, 8)])
    given = pipe.generate("a cat", seed=7, num_images=2, sampler="euler", latents=latents, **KW)
    gpu = pipe.generate("a cat", seed=7, num_images=2, sampler="euler", randn_source="GPU", **KW)
    cpu = pipe.generate("a cat", seed=7, num_images=2, sampler="euler", **KW)
    for a, b, c, d in zip(nv, given, gpu, cpu):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
        assert not np.array_equal(np.asarray(a), np.asarray(d))
    assert [parse_infotext(im.info["parameters"])[2].get("RNG") for im in (nv[0], gpu[0], cpu[0])] == \
        ["NV", None, "CPU"]
    # Euler a, and a hires pass (a new ImageRNG: the seed's first draw again, then its draws on): every draw the
    # generation makes, in order, is the generators' next one
    import fastsd.pipeline as fp

    drawn, seeded_noise = [], fp.seeded_noise
    monkeypatch.setattr(fp, "seeded_noise", lambda gens, shape, device: drawn.append(seeded_noise(gens, shape, device))
                        or drawn[-1])
    pipe.generate("a cat", seed=7, num_images=2, sampler="euler_a", randn_source="NV", hires_scale=1.5,
                  hires_steps=2, **{**KW, "steps": 3})
    first = [torch.cat(d) for d in zip(*(_nv_draws(s, (1, 4, 8, 8), 3) for s in (7, 8)))]
    second = [torch.cat(d) for d in zip(*(_nv_draws(s, (1, 4, 12, 12), 2) for s in (7, 8)))]
    assert len(drawn) == 5 and all(torch.equal(a, b) for a, b in zip(drawn, first + second))


def test_ensd_with_cudas_noise(pipe):
    """ENSD with "NV": the sampler noise comes from NV generators of seed + ENSD (A1111's create_generator)."""
    kw = dict(KW, sampler="euler_a", num_images=2, randn_source="NV")
    ensd = pipe.generate("a cat", seed=7, eta_noise_seed_delta=31337, **kw)
    latents = torch.cat([PhiloxGenerator(s).randn((1, 4, 8, 8)) for s in (7, 8)])
    rebuilt = pipe.generate("a cat", seed=7 + 31337, latents=latents, **kw)
    for a, b in zip(ensd, rebuilt):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("text,want", [
    ("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64", "GPU"),  # (A1111 writes no RNG for its default)
    ("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, RNG: NV", "NV"),
    ("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, RNG: CPU", "CPU"),
    ("a cat", None),  # a prompt alone sets no noise
])
def test_the_infotext_names_the_source(text, want):
    kwargs, warnings = settings_from_infotext(text)
    assert kwargs.get("randn_source") == want and not warnings
    assert "randn_source" not in settings_from_infotext(text, skip={"randn_source"})[0]


def test_a_bad_source_is_one_line(pipe, default_pipe, tmp_path, capsys):
    with pytest.raises(InfotextError, match="'RNG: XPU': not one of A1111's CPU, GPU, NV"):
        settings_from_infotext("a cat\nSteps: 2, Seed: 1, RNG: XPU")
    with pytest.raises(ValueError, match="randn_source must be one of CPU, GPU, NV, got 'nv'"):
        pipe.generate("a cat", randn_source="nv", **KW)
    out = tmp_path / "x.png"
    args = ["a cat", "--model", "random:tiny", "--steps", "1", "--width", "64", "--height", "64", "--seed", "3",
            "--no-progress", "--out", str(out)]
    assert cli([*args, "--randn-source", "GPU "]) == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: randn_source must be one of CPU, GPU, NV, got 'GPU '"
    assert cli([*args, "--randn-source", "NV"]) == 0
    with Image.open(out) as im:
        assert parse_infotext(im.info["parameters"])[2]["RNG"] == "NV"
        made = np.asarray(im)
    assert np.array_equal(made, np.asarray(default_pipe.generate("a cat", seed=3, steps=1, width=64, height=64,
                                                             randn_source="NV", progress=False)[0]))
    again = tmp_path / "again.png"  # the infotext without RNG (A1111's GPU) makes the same image
    text = Image.open(out).info["parameters"].replace(", RNG: NV", "")
    (tmp_path / "info.txt").write_text(text)
    assert cli(["--infotext", str(tmp_path / "info.txt"), "--model", "random:tiny", "--no-progress", "--out",
                str(again)]) == 0
    with Image.open(again) as im:
        assert np.array_equal(np.asarray(im), made) and "RNG" not in parse_infotext(im.info["parameters"])[2]


def test_the_server_takes_a1111s_option(default_pipe):
    """randn_source as A1111's option: override_settings, POST / GET /sdapi/v1/options (fastsd's default CPU); a bad
    value is a 422 naming it."""
    req = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler a",
           "cfg_scale": 1}
    want = np.asarray(default_pipe.generate("a cat", seed=5, sampler="euler_a", randn_source="GPU", **KW)[0])
    with main_server().client() as c:  # (a server the other tests share: its option set back at the end)
        try:
            assert c.get("/sdapi/v1/options").json()["randn_source"] == "CPU"
            r = c.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"randn_source": "GPU"}})
            assert r.status_code == 200, r.text
            assert np.array_equal(np.asarray(decode(r.json()["images"][0])), want)
            assert "RNG" not in parse_infotext(info(r)["infotexts"][0])[2]
            assert c.post("/sdapi/v1/options", json={"randn_source": "NV"}).status_code == 200
            assert c.get("/sdapi/v1/options").json()["randn_source"] == "NV"
            r = c.post("/sdapi/v1/txt2img", json=req)
            assert np.array_equal(np.asarray(decode(r.json()["images"][0])), want)
            assert parse_infotext(info(r)["infotexts"][0])[2]["RNG"] == "NV"
            bad = c.post("/sdapi/v1/options", json={"randn_source": "TPU"})
            assert bad.status_code == 422
            assert bad.json()["detail"] == "randn_source must be one of CPU, GPU, NV, got 'TPU'"
            assert c.get("/sdapi/v1/options").json()["randn_source"] == "NV"
        finally:
            c.post("/sdapi/v1/options", json={"randn_source": "CPU"})

def test_batch_jobs_take_the_source(default_pipe, tmp_path):
    jobs = [{"prompt": "a cat", "seed": 1, "id": "nv", "randn_source": "NV"},
            {"prompt": "a cat", "seed": 1, "id": "cpu"}, {"prompt": "a cat", "id": "bad", "randn_source": 2}]
    out = tmp_path / "out"
    rows = run(jobs, out=str(out), defaults=Defaults(steps=2, width=64, height=64), model="random:tiny", threads=1,
               progress=False)
    assert [r["status"] for r in rows] == ["done", "done", "failed"], rows
    assert rows[2]["error"] == "randn_source must be CPU, GPU or NV, got 2"
    kw = dict(steps=2, width=64, height=64, seed=1, progress=False)
    with Image.open(io.BytesIO((out / "nv.png").read_bytes())) as im:
        assert np.array_equal(np.asarray(im), np.asarray(default_pipe.generate("a cat", randn_source="NV", **kw)[0]))
    with Image.open(out / "cpu.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(default_pipe.generate("a cat", **kw)[0]))
