"""python -m fastsd.serve through a real HTTP client: A1111's request and response shapes (request bodies
from A1111's API docs in tests/fixtures/a1111/), seeds, infotexts, the CLI's image for the same seed, the
model switch, and the bad requests each answered with a 4xx and a one-line detail."""
import base64
import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from serve_server import auth_server, decode, info, main_server, png_b64

from fastsd.generate import main as generate_main
from fastsd.image import parse_infotext
from fastsd.serve.__main__ import main as serve_main

FIXTURES = Path(__file__).parent / "fixtures" / "a1111"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def client():
    with main_server().client() as c:
        yield c


def test_lists_in_a1111_shapes(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ 2M Karras"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                                "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal",
                                                "DDIM", "Beta"]  # A1111 1.10's list, in its order
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)
    assert schedulers[2]["default_rho"] == 7.0 and schedulers[5]["aliases"] == ["SGMUniform"]
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["random:tiny", "random:tiny-inpainting"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    loras = client.get("/sdapi/v1/loras").json()
    assert [lo["name"] for lo in loras] == ["detail", "style"]
    assert all("/" not in lo["path"] for lo in loras)  # names and file names, never the server's paths
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "random:tiny"
    idle = client.get("/sdapi/v1/progress").json()
    assert set(idle) == {"progress", "eta_relative", "state", "current_image", "textinfo", "current_task"}
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]
    # what clients call at start or as a health check (A1111's shapes)
    for empty in ("realesrgan-models", "script-info", "extensions", "hypernetworks", "face-restorers"):
        assert client.get(f"/sdapi/v1/{empty}").json() == []
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["use_cpu"] == ["all"] and flags["api_auth"] is None
    assert "/" not in json.dumps(flags)  # no server path
    mem = client.get("/sdapi/v1/memory").json()
    assert 0 < mem["ram"]["used"] < mem["ram"]["total"] and 0 < mem["ram"]["free"] <= mem["ram"]["total"]
    assert mem["cuda"] == {"error": "unavailable"}
    for path in ("unload-checkpoint", "reload-checkpoint", "interrogate"):
        r = client.post(f"/sdapi/v1/{path}", json={})
        assert r.status_code == 501 and r.json()["detail"].startswith(f"/{path}: not supported; ")


def test_txt2img_docs_body_images_infotext_and_the_cli_image(client, tmp_path):
    body = fixture("txt2img_docs.json")
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data, meta = r.json(), info(r)
    assert set(data) == {"images", "parameters", "info"}
    assert data["parameters"]["prompt"] == "a photo of a cat" and data["parameters"]["batch_size"] == 2
    assert meta["all_seeds"] == [42, 43] and meta["seed"] == 42 and meta["sampler_name"] == "Euler a"
    assert meta["warnings"] == [] and meta["interrupted"] is False
    images = [decode(b) for b in data["images"]]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    for im, text, seed in zip(images, meta["infotexts"], meta["all_seeds"]):
        assert im.text["parameters"] == text  # each PNG carries its own infotext, as A1111's do
        prompt, negative, params = parse_infotext(text)
        assert (prompt, negative) == ("a photo of a cat", "blurry")
        assert params["Seed"] == str(seed) and params["Steps"] == "3" and params["Sampler"] == "Euler a"
        assert params["Size"] == "64x64" and params["CFG scale"] == "7.0"
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    # the CLI with the same settings (and the server's one thread) makes the same pixels for seed 43
    out = tmp_path / "cli.png"
    assert generate_main(["a photo of a cat", "--negative-prompt", "blurry", "--model", "random:tiny", "--steps", "3",
                          "--cfg-scale", "7", "--sampler", "Euler a", "--seed", "43", "--width", "64", "--height", "64",
                          "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    with Image.open(out) as cli:
        assert np.array_equal(np.asarray(cli), np.asarray(images[1]))
        assert cli.text["parameters"] == meta["infotexts"][1]


def test_random_seed_n_iter_clip_skip_and_unhonoured_fields(client):
    r = client.post("/sdapi/v1/txt2img", json=fixture("txt2img_wiki.json"))
    assert r.status_code == 200, r.text
    meta = info(r)
    seed = meta["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32 and meta["all_seeds"] == [seed, seed + 1]
    assert len(r.json()["images"]) == 2 and meta["clip_skip"] == 2
    params = [parse_infotext(t)[2] for t in meta["infotexts"]]
    assert [p["Seed"] for p in params] == [str(seed), str(seed + 1)] and params[0]["Clip skip"] == "2"
    assert params[0]["Sampler"] == "Euler"  # A1111's default sampler_index
    notes = " | ".join(meta["warnings"])
    assert "sd_vae" not in notes and meta["sd_vae_name"] is None  # "Automatic": the model's own VAE (none near it)
    assert "enable_hr" not in notes and "hr_" not in notes
    assert float(params[0]["Hires upscale"]) == 2 and params[0]["Hires upscaler"] == "Latent"  # the wiki's hires ran
    assert decode(r.json()["images"][0]).size == (128, 128) and params[0]["Size"] == "64x64"
    assert "some_extension_field" not in notes  # unknown fields are ignored, as A1111 does


def test_null_fields_take_their_defaults(client):
    """A1111's request models make every field Optional: clients send null for fields they leave alone ("seed":
    null is a random seed there). Null takes the field's default; a wrong type is still a 422."""
    nulls = dict.fromkeys(("seed", "subseed", "enable_hr", "batch_size", "n_iter", "sampler_name", "scheduler",
                           "negative_prompt", "override_settings_restore_afterwards", "script_args", "eta"))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1, "width": 64, "height": 64, **nulls})
    assert r.status_code == 200, r.text
    meta = info(r)
    assert 0 <= meta["seed"] < 2**32 and len(meta["all_seeds"]) == 1 and not meta["warnings"]
    assert parse_infotext(meta["infotexts"][0])[2]["Sampler"] == "Euler"
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": "x"})
    assert r.status_code == 422 and "seed" in r.json()["detail"]


def test_s_min_uncond_is_a1111s_ngms(client):
    """A1111's s_min_uncond ("Negative Guidance minimum sigma") runs (not warned as unsupported) and is in the
    infotext as A1111 writes it."""
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "s_min_uncond": 2.5, "cfg_scale": 5})
    assert r.status_code == 200, r.text
    meta = info(r)
    assert not any("s_min_uncond" in w for w in meta["warnings"]), meta["warnings"]
    assert parse_infotext(meta["infotexts"][0])[2]["NGMS"] == "2.5"


def test_skip_early_cfg_and_ngms_all_steps_are_a1111_options(client):
    """A1111's options skip_early_cond ("Skip Early CFG") and s_min_uncond_all ("NGMS all steps"): per request in
    override_settings (not warned), for later requests by POST /sdapi/v1/options (GET reports them), written in the
    infotext as A1111 writes them; the per-request value wins over the option; a bad value is a 422 naming it."""
    small = {**SMALL, "cfg_scale": 5, "steps": 4, "seed": 3, "s_min_uncond": 2.5}
    try:
        r = client.post("/sdapi/v1/txt2img", json={**small, "override_settings": {"skip_early_cond": 0.25,
                                                                                  "s_min_uncond_all": True}})
        assert r.status_code == 200, r.text
        meta = info(r)
        assert not any("skip_early_cond" in w or "s_min_uncond_all" in w for w in meta["warnings"]), meta["warnings"]
        params = parse_infotext(meta["infotexts"][0])[2]
        assert params["Skip Early CFG"] == "0.25" and params["NGMS all steps"] == "True"
        assert client.get("/sdapi/v1/options").json()["skip_early_cond"] == 0.0  # (the override was this request's)
        r = client.post("/sdapi/v1/options", json={"skip_early_cond": 0.5, "s_min_uncond_all": True})
        assert r.status_code == 200 and r.json()["applied"] == {"skip_early_cond": 0.5, "s_min_uncond_all": True}
        options = client.get("/sdapi/v1/options").json()
        assert options["skip_early_cond"] == 0.5 and options["s_min_uncond_all"] is True
        params = parse_infotext(info(client.post("/sdapi/v1/txt2img", json=small))["infotexts"][0])[2]
        assert params["Skip Early CFG"] == "0.5" and params["NGMS all steps"] == "True"
        r = client.post("/sdapi/v1/txt2img", json={**small, "override_settings": {"skip_early_cond": 0}})
        assert "Skip Early CFG" not in parse_infotext(info(r)["infotexts"][0])[2]
    finally:
        client.post("/sdapi/v1/options", json={"skip_early_cond": 0.0, "s_min_uncond_all": False})
    assert "Skip Early CFG" not in parse_infotext(info(client.post("/sdapi/v1/txt2img", json=small))["infotexts"][0])[2]


def test_ensd_is_an_a1111_option(client, tmp_path):
    """A1111's eta_noise_seed_delta (ENSD) per request in override_settings and for later ones by POST /options: an
    Euler a image made with it is the CLI's with --eta-noise-seed-delta, its infotext says ENSD."""
    small = {**SMALL, "steps": 2, "seed": 5, "sampler_name": "Euler a", "cfg_scale": 1}
    try:
        assert client.get("/sdapi/v1/options").json()["eta_noise_seed_delta"] == 0
        r = client.post("/sdapi/v1/txt2img", json={**small, "override_settings": {"eta_noise_seed_delta": 31337}})
        assert r.status_code == 200, r.text
        assert parse_infotext(info(r)["infotexts"][0])[2]["ENSD"] == "31337"
        served = decode(r.json()["images"][0])
        assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337}).status_code == 200
        assert np.array_equal(np.asarray(decode(client.post("/sdapi/v1/txt2img", json=small).json()["images"][0])),
                              np.asarray(served))
    finally:
        client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 0})
    out = tmp_path / "cli.png"
    assert generate_main(["a cat", "--model", "random:tiny", "--steps", "2", "--cfg-scale", "1", "--sampler", "Euler a",
                          "--seed", "5", "--width", "64", "--height", "64", "--eta-noise-seed-delta", "31337",
                          "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    with Image.open(out) as cli:
        assert np.array_equal(np.asarray(cli), np.asarray(served))


def test_eta_runs_for_the_ancestral_samplers_and_ddim_and_is_warned_for_others(client):
    """A1111's request field eta: Euler a, DPM++ 2S a and DDIM run with it (not warned; "Eta" / "Eta DDIM" in the
    infotext, Euler a at eta 0 is Euler's image); a sampler fastsd runs with its own eta gets the warning; eta 2 is
    a 422."""
    small = {**SMALL, "steps": 3, "seed": 8, "cfg_scale": 3}
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "Euler a", "eta": 0.0})
    meta = info(r)
    assert not any("eta" in w for w in meta["warnings"]) and parse_infotext(meta["infotexts"][0])[2]["Eta"] == "0.0"
    euler = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "Euler"})
    assert np.array_equal(np.asarray(decode(r.json()["images"][0])), np.asarray(decode(euler.json()["images"][0])))
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "DDIM", "eta": 0.3})
    assert parse_infotext(info(r)["infotexts"][0])[2]["Eta DDIM"] == "0.3"
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "DPM++ 2S a", "eta": 0.3})
    assert parse_infotext(info(r)["infotexts"][0])[2]["Eta"] == "0.3"
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "DPM++ 2M SDE", "eta": 0.3})
    assert parse_infotext(info(r)["infotexts"][0])[2]["Eta"] == "0.3"
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "DPM fast", "eta": 0.3})
    assert parse_infotext(info(r)["infotexts"][0])[2]["Eta"] == "0.3" and not info(r)["warnings"]
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "Euler a", "eta": 2})
    assert r.status_code == 422 and "eta must be in [0, 1], got 2" in r.json()["detail"]
    try:  # A1111's options eta_ancestral / eta_ddim: the eta of a request that gives none
        options = client.get("/sdapi/v1/options").json()
        assert (options["eta_ancestral"], options["eta_ddim"]) == (1.0, 0.0)
        assert client.post("/sdapi/v1/options", json={"eta_ancestral": 0.0}).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "Euler a"})
        assert np.array_equal(np.asarray(decode(r.json()["images"][0])), np.asarray(decode(euler.json()["images"][0])))
        r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "Euler a", "eta": 1.0})  # the request's
        assert "Eta" not in parse_infotext(info(r)["infotexts"][0])[2]
        r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "DDIM",
                                                   "override_settings": {"eta_ddim": 0.3}})
        assert parse_infotext(info(r)["infotexts"][0])[2]["Eta DDIM"] == "0.3"
        r = client.post("/sdapi/v1/options", json={"eta_ddim": 1.5})
        assert r.status_code == 422 and "eta_ddim must be a number in [0, 1], got 1.5" in r.json()["detail"]
    finally:
        client.post("/sdapi/v1/options", json={"eta_ancestral": 1.0, "eta_ddim": 0.0})


def test_sigma_churn_and_noise_as_a1111(client):
    """A1111's request fields s_churn / s_tmin / s_tmax / s_noise run for the samplers that take them (Euler, Heun,
    DPM2; s_noise also the SDE / ancestral ones but Euler a), written as "Sigma churn" ... in the infotext, which
    --infotext-style reading gives back; an option of those names other than its default wins over the request's
    field (A1111's Sampler.initialize); a sampler that takes none gets a warning; a negative value is a 422."""
    small = {**SMALL, "steps": 3, "seed": 9, "cfg_scale": 3, "sampler_name": "Euler"}
    plain = client.post("/sdapi/v1/txt2img", json=small)
    churned = client.post("/sdapi/v1/txt2img", json={**small, "s_churn": 2.0, "s_noise": 1.01, "s_tmax": 20.0})
    meta = info(churned)
    assert not meta["warnings"], meta["warnings"]
    params = parse_infotext(meta["infotexts"][0])[2]
    assert (params["Sigma churn"], params["Sigma noise"], params["Sigma tmax"]) == ("2.0", "1.01", "20.0")
    assert "Sigma tmin" not in params and "Sigma churn" not in parse_infotext(info(plain)["infotexts"][0])[2]
    image = lambda r: np.asarray(decode(r.json()["images"][0]))  # noqa: E731
    assert not np.array_equal(image(churned), image(plain))
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "DPM++ 2M SDE", "s_noise": 0.9})
    assert parse_infotext(info(r)["infotexts"][0])[2]["Sigma noise"] == "0.9" and not info(r)["warnings"]
    r = client.post("/sdapi/v1/txt2img", json={**small, "sampler_name": "Euler a", "s_churn": 1.0, "s_noise": 0.9})
    assert sorted(w.split(":")[0] for w in info(r)["warnings"]) == ["s_churn 1.0", "s_noise 0.9"]
    assert "Sigma churn" not in parse_infotext(info(r)["infotexts"][0])[2]
    r = client.post("/sdapi/v1/txt2img", json={**small, "s_churn": -1})
    assert r.status_code == 422 and "s_churn must be >= 0, got -1" in r.json()["detail"]
    try:
        options = {"s_churn": 2.0, "s_noise": 1.01, "s_tmax": 20.0}
        assert client.post("/sdapi/v1/options", json=options).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={**small, "s_churn": 0.5})  # the option wins
        assert np.array_equal(image(r), image(churned))
        assert client.get("/sdapi/v1/options").json()["s_churn"] == 2.0
        r = client.post("/sdapi/v1/txt2img", json={**small, "override_settings": {"s_churn": 0.0, "s_noise": 1.0,
                                                                                    "s_tmax": 0.0}})
        assert np.array_equal(image(r), image(plain))
        r = client.post("/sdapi/v1/options", json={"s_noise": -0.5})
        assert r.status_code == 422 and "s_noise must be a number >= 0, got -0.5" in r.json()["detail"]
    finally:
        client.post("/sdapi/v1/options", json={"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0})


def test_img2img_noise_multiplier(client):
    """A1111's initial_noise_multiplier: img2img's request field (not warned any more), else the option of that name;
    in the infotext as "Noise multiplier"; a multiplier changes the image."""
    body = {**SMALL, "seed": 2, "steps": 3, "denoising_strength": 0.6, "init_images": [png_b64(Image.new("RGB", (64, 64), "teal"))]}
    try:
        r = client.post("/sdapi/v1/img2img", json={**body, "initial_noise_multiplier": 0.5})
        assert r.status_code == 200, r.text
        meta = info(r)
        assert not any("initial_noise_multiplier" in w for w in meta["warnings"]), meta["warnings"]
        assert parse_infotext(meta["infotexts"][0])[2]["Noise multiplier"] == "0.5"
        half = np.asarray(decode(r.json()["images"][0]))
        plain = np.asarray(decode(client.post("/sdapi/v1/img2img", json=body).json()["images"][0]))
        assert not np.array_equal(half, plain)
        assert client.post("/sdapi/v1/options", json={"initial_noise_multiplier": 0.5}).status_code == 200
        assert np.array_equal(np.asarray(decode(client.post("/sdapi/v1/img2img", json=body).json()["images"][0])), half)
        r = client.post("/sdapi/v1/img2img", json={**body, "initial_noise_multiplier": 1.0})  # the request's wins
        assert np.array_equal(np.asarray(decode(r.json()["images"][0])), plain)
    finally:
        client.post("/sdapi/v1/options", json={"initial_noise_multiplier": 1.0})


def test_loras_and_embeddings_by_name_from_their_folders(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a cat <lora:detail:0.7>"})
    assert r.status_code == 422  # detail.safetensors is an empty file
    assert "detail.safetensors" in r.json()["detail"], r.text  # the LoRA loader's one-line error
    listed = client.get("/sdapi/v1/embeddings").json()
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a cat, shinystyle"})
    assert r.status_code == 200, r.text
    assert list(listed["loaded"]) == ["shinystyle"] and listed["skipped"] == {}
    assert not any("shinystyle" in w for w in info(r)["warnings"])


def test_refresh_embeddings_reads_the_folder_again(tmp_path):
    """POST /refresh-embeddings (A1111 1.8+): files added, changed or removed since the start are seen, no restart."""
    import torch
    from safetensors.torch import save_file
    from serve_server import shared

    from fastsd.config import TINY

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(1, TINY.clip.hidden_size)}, folder / "first.safetensors")
    server = shared("--model", "random:tiny", "--embeddings-dir", str(folder))
    try:
        with server.client() as c:
            assert list(c.get("/sdapi/v1/embeddings").json()["loaded"]) == ["first"]
            (folder / "first.safetensors").unlink()
            save_file({"emb_params": torch.randn(3, TINY.clip.hidden_size)}, folder / "second.safetensors")
            (folder / "broken.pt").write_bytes(b"not a pickle")
            assert list(c.get("/sdapi/v1/embeddings").json()["loaded"]) == ["first"]  # (read at start)
            r = c.post("/sdapi/v1/refresh-embeddings")
            assert r.status_code == 200 and r.json() is None
            listed = c.get("/sdapi/v1/embeddings").json()
            assert list(listed["loaded"]) == ["second"] and listed["loaded"]["second"]["vectors"] == 3
            assert listed["skipped"] == {}  # (unreadable: logged, not listed, as A1111)
            assert "embedding broken skipped: broken.pt" in server.log_text()
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a cat, second"})
            assert r.status_code == 200, r.text
    finally:
        server.stop()


def test_disable_extra_networks_drops_the_lora_tags(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:detail:0.7>", "disable_extra_networks": True,
                                               "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    assert parse_infotext(info(r)["infotexts"][0])[0] == "a cat"


def test_img2img_docs_body_with_mask(client):
    body = fixture("img2img_docs.json")
    init = Image.new("RGB", (80, 72), (200, 30, 30))
    mask = Image.new("L", (80, 72), 0)
    mask.paste(255, (20, 20, 60, 52))
    body["init_images"], body["mask"] = [png_b64(init)], "data:image/png;base64," + png_b64(mask)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    meta = info(r)
    out = decode(r.json()["images"][0])
    assert out.size == (64, 64) and meta["denoising_strength"] == 0.75
    params = parse_infotext(meta["infotexts"][0])[2]
    assert (params["Sampler"], params["Schedule type"], params["Denoising strength"]) == ("DPM++ 2M", "Karras", "0.75")
    assert not any(w.startswith("mask_blur") for w in meta["warnings"])  # applied, as A1111 (test_masking.py)
    corner = np.asarray(out)[:4, :4].reshape(-1, 3)  # far from the mask: the init image laid back over the result
    assert (corner == [200, 30, 30]).all()
    assert r.json()["parameters"]["init_images"] is None  # not echoed back (include_init_images false)


def test_model_switch_via_options_and_override(client):
    try:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "random:tiny-inpainting", "foo": 1})
        assert r.status_code == 200 and r.json()["ignored"] == ["foo"]
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "random:tiny-inpainting"
        small = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": 1}
        r = client.post("/sdapi/v1/txt2img", json=small)
        assert parse_infotext(info(r)["infotexts"][0])[2]["Model"] == "random:tiny-inpainting"
        r = client.post("/sdapi/v1/txt2img", json={**small, "override_settings": {"sd_model_checkpoint": "random:tiny"}})
        assert parse_infotext(info(r)["infotexts"][0])[2]["Model"] == "random:tiny"
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope", "CLIP_stop_at_last_layers": 2})
        assert r.status_code == 422 and "unknown model 'nope'" in r.json()["detail"]
        options = client.get("/sdapi/v1/options").json()  # nothing of the refused change was applied
        assert options["sd_model_checkpoint"] == "random:tiny-inpainting" and options["CLIP_stop_at_last_layers"] == 1
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "random:tiny"})


def png_bomb(side: int) -> bytes:
    """A side x side 1-bit PNG of zeros, written row by row: a few hundred kB that would decode to side^2 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


SMALL = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64}
BAD = [  # (endpoint, body or raw bytes, expected status, words the detail must contain)
    ("txt2img", b'{"prompt": "a cat", ', 422, "invalid JSON"),
    ("txt2img", {"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"prompt": ["a", "list"]}, 422, "prompt: Input should be a valid string"),
    ("txt2img", [1, 2], 422, "body: Input should be a valid dictionary"),
    ("txt2img", {**SMALL, "width": 100001}, 422, "width 100001 is above this server's limit of 2048"),
    ("txt2img", {**SMALL, "steps": 10**6}, 422, "steps 1000000 is above this server's limit of 150"),
    ("txt2img", {**SMALL, "batch_size": 10**4}, 422, "10000 images is above this server's limit of 8"),
    ("txt2img", {**SMALL, "cfg_scale": "nan"}, 422, "cfg_scale: Input should be a finite number, got nan"),
    ("txt2img", {**SMALL, "seed": -7}, 422, "seed must be -1 (random) or at least 0"),
    ("txt2img", {**SMALL, "sampler_name": "Heun++"}, 422, "unknown sampler 'Heun++'"),
    ("txt2img", {**SMALL, "prompt": "<lora:../../etc/passwd:1>"}, 422, "refused: LoRAs are chosen by name"),
    ("txt2img", {**SMALL, "prompt": "<lora:/etc/passwd>"}, 422, "refused: LoRAs are chosen by name"),
    ("txt2img", {**SMALL, "prompt": "<lora:missing:0.5>"}, 422, "unknown LoRA; this server has: detail, style"),
    ("img2img", {**SMALL}, 422, "init_images: img2img needs at least one base64 image"),
    ("img2img", {**SMALL, "init_images": ["@@not base64@@"]}, 422, "init_images[0] is not valid base64"),
    ("img2img", {**SMALL, "init_images": [base64.b64encode(b"GIF89a garbage").decode()]}, 422,
     "init_images[0] is not a readable image"),
    ("img2img", {**SMALL, "init_images": ["https://example.com/cat.png"]}, 422, "image URLs are not fetched"),
    ("img2img", {**SMALL, "init_images": [base64.b64encode(png_bomb(20000)).decode()]}, 422,
     "init_images[0] refused: Image size (400000000 pixels) exceeds limit"),
    ("img2img", {**SMALL, "init_images": [base64.b64encode(png_bomb(5000)).decode()]}, 422,
     "5000x5000 pixels, above this server's limit of 16777216 pixels"),
    ("img2img", {**SMALL, "denoising_strength": 1.5, "init_images": [png_b64(Image.new("RGB", (64, 64)))]}, 422,
     "denoising_strength must be in [0, 1]"),
    ("options", {"CLIP_stop_at_last_layers": 40}, 422, "CLIP_stop_at_last_layers must be an integer in 0..2 "
                                                        "(random:tiny's text encoder has 2 layers), got 40"),
    ("options", {"CLIP_stop_at_last_layers": -1}, 422, "CLIP_stop_at_last_layers must be an integer in 0..2 "
                                                        "(random:tiny's text encoder has 2 layers), got -1"),
    ("txt2img", {**SMALL, "s_min_uncond": -1}, 422, "s_min_uncond must be >= 0"),
    ("options", {"skip_early_cond": 1.5}, 422, "skip_early_cond must be in [0, 1], got 1.5"),
    ("txt2img", {**SMALL, "override_settings": {"skip_early_cond": -0.5}}, 422,
     "override_settings.skip_early_cond must be in [0, 1], got -0.5"),
    ("txt2img", {**SMALL, "override_settings": {"s_min_uncond_all": "yes"}}, 422,
     "override_settings.s_min_uncond_all must be True or False, got 'yes'"),
    ("options", {"eta_noise_seed_delta": -3}, 422, "eta_noise_seed_delta must be at least 0, got -3"),
]


@pytest.mark.parametrize("endpoint,body,status,words", BAD, ids=[f"{i}-{b[3][:30]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_a_4xx_with_one_line(client, endpoint, body, status, words):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = client.post(f"/sdapi/v1/{endpoint}", **kw)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    assert words in detail, detail


def test_body_above_the_limit_is_413_and_the_server_still_serves(client):
    r = client.post("/sdapi/v1/txt2img", content=b"{" + b" " * (33 << 20) + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "above this server's limit" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json=SMALL)
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_auth_basic_and_token():
    with auth_server().client() as c:
        r = c.get("/sdapi/v1/sd-models")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert "authentication required" in r.json()["detail"]
        assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 401
        assert c.get("/sdapi/v1/sd-models", auth=("alice", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/sdapi/v1/sd-models", auth=("alice", "s3cret")).status_code == 200
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer tok123"}).status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds nothing; its API calls need the credentials


@pytest.mark.parametrize("args,words", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is not a loopback address"),
    (["--host", "0.0.0.0", "--api-auth", "nopassword"], "--api-auth takes USER:PASS"),
    (["--lora-dir", "/nonexistent/loras"], "--lora-dir /nonexistent/loras: not a folder"),
    (["--model", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
])
def test_command_line_mistakes_end_with_one_line_and_never_listen(args, words, capsys):
    argv = ["--port", "0", *(["--model", "random:tiny"] if "--model" not in args else []), *args]
    assert serve_main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert "listening" not in out


def test_bad_input_from_a_server_hunt_is_a_422(client):
    """What a bad-input hunt of the server found answering 500 (2026-12-07): base64 of 0-3 bytes (PIL's BMP check
    read past them), an extras scale of 1e308 or a resize of 300 digits (float overflow), an override_settings number
    too large for a float, corrupt EXIF for png-info (now read without it); and a request naming thousands of styles
    (each rewrites the prompt: seconds of work, a prompt past the limit)."""
    small = png_b64(Image.new("RGB", (16, 16), "teal"))
    for path, body in (("/sdapi/v1/png-info", {"image": ""}),
                       ("/sdapi/v1/img2img", {**SMALL, "init_images": ["QUJD"]}),
                       ("/sdapi/v1/extra-single-image", {"image": "data:image/png;base64", "upscaler_1": "Lanczos"})):
        r = client.post(path, json=body)
        assert r.status_code == 422 and "not a readable image" in r.json()["detail"], (path, r.text)
    for extra in ({"upscaling_resize": 1e308}, {"resize_mode": 1, "upscaling_resize_w": 2 ** 1100,
                                                "upscaling_resize_h": 64}):
        r = client.post("/sdapi/v1/extra-single-image", json={"image": small, "upscaler_1": "Lanczos", **extra})
        assert r.status_code == 422 and "above this server's limit" in r.json()["detail"], r.text
    raw = '{"prompt": "a", "steps": 1, "width": 64, "height": 64, "override_settings": {"s_churn": %d}}' % 2 ** 1100
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "s_churn must be a number >= 0" in r.json()["detail"], r.text
    buf = __import__("io").BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG", exif=b"Exif\x00\x00garbage")
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 200, r.text
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["framed"] * 20000})
    assert r.status_code == 422 and "styles: 20000 names, above this server's limit of 100" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a <lora:de\ntail:1> cat"})
    assert r.status_code == 422 and "\n" not in r.json()["detail"] and "de\\ntail" in r.json()["detail"], r.text
    for over, match in (({"CLIP_stop_at_last_layers": "abc"}, "override_settings.CLIP_stop_at_last_layers must be an "
                                                               "integer in 0..2 (random:tiny's text encoder has 2 "
                                                               "layers), got 'abc'"),
                        ({"CLIP_stop_at_last_layers": 3}, "override_settings.CLIP_stop_at_last_layers must be")):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": over})
        assert r.status_code == 422 and match in r.json()["detail"], r.text


def test_a_checkpoint_file_is_known_by_its_full_sha256_too(tmp_path):
    """A1111: /sd-models' sha256 and the sd_checkpoint_hash option are the file's full sha256, and a checkpoint may be
    named by it (its aliases: title, name, short hash, sha256)."""
    import hashlib

    from safetensors.torch import save_file

    from fastsd import load_pipeline
    from fastsd.checkpoint import ldm_state_dict
    from fastsd.serve.registry import Registry, load_entries

    path = tmp_path / "tiny.safetensors"
    save_file(ldm_state_dict(load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    registry = Registry(load_entries([str(path)], device="cpu", dtype="fp32", backend="torch")
                        + load_entries(["random:tiny"], device="cpu", dtype="fp32", backend="torch"))
    entry = registry.entries[0]
    assert (entry.sha256, entry.hash, entry.title) == (digest, digest[:10], f"tiny.safetensors [{digest[:10]}]")
    assert entry.a1111()["sha256"] == digest and registry.entries[1].a1111()["sha256"] is None
    assert registry.find(digest) is entry and registry.find(digest[:10]) is entry


def test_a_json_body_without_content_type_is_read_as_json(client):
    """A1111's FastAPI 0.94 reads a body without a Content-Type as JSON (`requests.post(url, data=json.dumps(body))`
    sends none), whatever FastAPI is installed here; text/plain and a form (which a web page may send cross-site
    without a preflight) stay a 422, and so does a body without a Content-Type from a browser (an Origin header)."""
    raw = json.dumps({**SMALL, "seed": 9}).encode()
    r = client.post("/sdapi/v1/txt2img", content=raw)
    assert "content-type" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 200 and info(r)["seed"] == 9, r.text
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and info(r)["seed"] == 9, r.text
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": kind})
        assert r.status_code == 422 and "body: Input should be a valid dictionary" in r.json()["detail"], (kind, r.text)
    # a browser's cross-site POST of a Blob with no type: no Content-Type, no preflight, but an Origin header
    r = client.post("/sdapi/v1/options", content=b'{"CLIP_stop_at_last_layers": 2}',
                    headers={"Origin": "http://example.com"})
    assert r.status_code == 422 and "body: Input should be a valid dictionary" in r.json()["detail"], r.text
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1


def test_sd_model_hash_is_always_a_string(client):
    """info.sd_model_hash is A1111's short hash of a checkpoint file (its infotext's "Model hash"), and "" for a
    model with no single file (random:, a diffusers folder): a string, which clients such as sd-backend-client
    require; the infotext then claims no "Model hash"."""
    r = client.post("/sdapi/v1/txt2img", json=SMALL)
    meta = info(r)
    assert meta["sd_model_name"] == "random:tiny" and meta["sd_model_hash"] == ""
    assert "Model hash" not in parse_infotext(meta["infotexts"][0])[2]


def test_a_fraction_in_an_integer_field_is_truncated_as_a1111(client):
    """A1111's pydantic v1 request models truncate a finite float in an int field (aiyabot sends
    hr_second_pass_steps = steps / 2); NaN, inf and a numeric string with a fraction stay a 422 naming the field."""
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 2.5, "width": 64.9, "seed": 12.7, "batch_size": 1.5,
                                               "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1.5})
    assert r.status_code == 200, r.text
    meta, params = info(r), r.json()["parameters"]
    assert (meta["steps"], meta["width"], meta["seed"], meta["batch_size"]) == (2, 64, 12, 1)
    assert params["hr_second_pass_steps"] == 1 and params["steps"] == 2
    assert parse_infotext(meta["infotexts"][0])[2]["Hires steps"] == "1"
    raw = '{"prompt": "a", "steps": NaN}'
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("steps: Input should be a finite number"), r.text
    r = client.post("/sdapi/v1/txt2img", content=raw.replace("NaN", "1e400"),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("steps: Input should be a finite number"), r.text
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": "12.5"})
    assert r.status_code == 422 and r.json()["detail"].startswith("seed: Input should be a valid integer"), r.text


def test_an_unknown_or_empty_checkpoint_override_runs_on_the_current_model(client):
    """A1111's process_images drops an override_settings sd_model_checkpoint that names no checkpoint (unknown, "",
    null) and runs on the current one; fastsd does the same and names an unknown one in info.warnings and its log.
    POST /options keeps "" as "no change" and refuses an unknown name (as A1111's set_config)."""
    for name, warned in (("v1-5-pruned-emaonly", True), ("/etc/passwd", True), ("", False), (None, False)):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": name}})
        assert r.status_code == 200, (name, r.text)
        meta = info(r)
        assert parse_infotext(meta["infotexts"][0])[2]["Model"] == meta["sd_model_name"] == "random:tiny"
        notes = [w for w in meta["warnings"] if "sd_model_checkpoint" in w]
        assert notes == ([f"override_settings.sd_model_checkpoint {name!r}: not a model of this server (GET "
                          "/sdapi/v1/sd-models lists them), ran on random:tiny"] if warned else []), notes
    assert "override_settings.sd_model_checkpoint 'v1-5-pruned-emaonly': not a model" in main_server().log_text()
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "", "sd_vae": ""})
    assert r.status_code == 200 and r.json()["applied"] == {} and r.json()["warnings"] == [], r.text
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "random:tiny" and options["sd_vae"] == "Automatic"


def test_clip_skip_0_is_1_and_12_is_the_first_layer_of_sd1s_text_encoder(client):
    """A1111's CLIP_stop_at_last_layers: a slider 1..12; 0 (or 1) is the last layer; n > 1 is hidden_states[-n], so 12
    on SD1's 12-layer text encoder is the first layer's output (through the final LayerNorm). A value above the
    model's layers is a 422 naming them."""
    import torch

    from fastsd.config import CLIPConfig
    from fastsd.models.clip import CLIPTextModel
    from fastsd.serve.generation import clip_skip_for
    from fastsd.settings import GenerationSettings

    body = {**SMALL, "seed": 4}
    one = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 1}})
    zero = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 0}})
    assert zero.status_code == 200 and info(zero)["clip_skip"] == 1, zero.text
    assert zero.json()["images"] == one.json()["images"]
    try:
        r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
        assert r.status_code == 200 and r.json()["applied"] == {"CLIP_stop_at_last_layers": 1}, r.text
        r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 12})  # random:tiny has 2 layers
        assert r.status_code == 422 and r.json()["detail"] == ("CLIP_stop_at_last_layers must be an integer in 0..2 "
                                                               "(random:tiny's text encoder has 2 layers), got 12")
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    sd1 = SimpleNamespace(name="v1-5", pipe=SimpleNamespace(config=SimpleNamespace(clip=CLIPConfig())))
    assert CLIPConfig().num_layers == 12 and clip_skip_for(12, sd1, "x") == 12 and clip_skip_for(0, sd1, "x") == 1
    with pytest.raises(Exception, match=r"x must be an integer in 0\.\.12, got 13"):
        clip_skip_for(13, sd1, "x")
    GenerationSettings(clip_skip=12).validate()
    cfg = CLIPConfig(hidden_size=32, intermediate_size=64, num_layers=12, num_heads=2)
    torch.manual_seed(0)
    clip = CLIPTextModel(cfg).eval()
    ids = torch.tensor([[cfg.eos_token_id - 1, 5, cfg.eos_token_id]])
    with torch.no_grad():
        got, _ = clip(ids, clip_skip=12)
        tm = clip.text_model
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(torch.arange(3))[None]
        want = tm.final_layer_norm(tm.encoder.layers[0](x))
    assert torch.equal(got, want)


def test_a_random_subseed_is_drawn_and_reported_as_a1111(client):
    """A1111 draws subseed -1 (get_fixed_seed) whether or not a variation strength uses it: info.subseed and
    all_subseeds hold the drawn number, and sending it back gives the same image."""
    body = {**SMALL, "seed": 5, "batch_size": 2, "subseed": -1}
    for strength in (0, 0.3):
        r = client.post("/sdapi/v1/txt2img", json={**body, "subseed_strength": strength})
        meta = info(r)
        sub = meta["subseed"]
        assert isinstance(sub, int) and 0 <= sub < 2**32 and meta["all_subseeds"] == [sub, sub + 1], meta
        again = client.post("/sdapi/v1/txt2img", json={**body, "subseed_strength": strength, "subseed": sub})
        assert again.json()["images"] == r.json()["images"] and info(again)["subseed"] == sub


def test_firstphase_size_replaces_width_and_height_as_a1111(client):
    """A1111's legacy firstphase_width/height (StableDiffusionProcessingTxt2Img.__post_init__): non-zero, they are the
    first pass's size in place of width/height, enable_hr or not; the hires target is hr_scale of it. One without
    the other is a 422 (A1111 would run a first pass of size 0)."""
    body = {**SMALL, "width": 128, "height": 128, "firstphase_width": 64, "firstphase_height": 64}
    r = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_scale": 2})
    assert r.status_code == 200, r.text
    meta, params = info(r), r.json()["parameters"]
    assert decode(r.json()["images"][0]).size == (128, 128) and (meta["width"], meta["height"]) == (64, 64)
    text = parse_infotext(meta["infotexts"][0])[2]
    assert text["Size"] == "64x64" and float(text["Hires upscale"]) == 2
    assert (params["width"], params["height"]) == (128, 128)  # (the request echoed as sent, as A1111)
    assert any(w.startswith("firstphase_width/height 64x64: A1111's legacy first-pass size") for w in meta["warnings"])
    r = client.post("/sdapi/v1/txt2img", json={**body, "firstphase_height": 72})
    assert r.status_code == 200 and decode(r.json()["images"][0]).size == (64, 72), r.text
    r = client.post("/sdapi/v1/txt2img", json={**body, "firstphase_height": 0})
    assert r.status_code == 422 and r.json()["detail"].startswith("firstphase_width 64, firstphase_height 0: give "
                                                                  "both"), r.text


def test_the_infotext_field_fills_what_the_request_left_unset(client):
    """A1111 1.8+'s `infotext` request field (Api.apply_infotext): parsed, it fills each field the request did not
    set (prompt, seed, steps, cfg, size, sampler, hires fix, ...) and override_settings (Clip skip, ENSD, RNG); a
    field the request sets wins. An image's infotext sent back makes that image again."""
    body = {"prompt": "a dog", "negative_prompt": "cat", "steps": 2, "cfg_scale": 5.5, "width": 64, "height": 72,
            "seed": 77, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "enable_hr": True, "hr_scale": 1.5,
            "denoising_strength": 0.4, "override_settings": {"CLIP_stop_at_last_layers": 2,
                                                            "eta_noise_seed_delta": 31337}}
    first = client.post("/sdapi/v1/txt2img", json=body)
    assert first.status_code == 200, first.text
    text = info(first)["infotexts"][0]
    again = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    assert again.status_code == 200, again.text
    meta = info(again)
    assert meta["infotexts"][0] == text and again.json()["images"] == first.json()["images"]
    assert meta["warnings"] == [] and again.json()["parameters"]["prompt"] == "a dog"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text, "seed": 78, "prompt": "a fox", "enable_hr": False})
    meta = info(r)
    params = parse_infotext(meta["infotexts"][0])[2]
    assert (meta["seed"], meta["prompt"], meta["steps"], meta["width"], meta["height"]) == (78, "a fox", 2, 64, 72)
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert params["Clip skip"] == "2" and "Hires upscale" not in params
    r = client.post("/sdapi/v1/txt2img", json={"infotext": "a dog\nSteps: many, Seed: 3, Size: 64x64"})
    assert r.status_code == 422 and r.json()["detail"] == "infotext: 'Steps: many': not an integer", r.text
    r = client.post("/sdapi/v1/txt2img", json={"infotext": "x" * 40001})
    assert r.status_code == 422 and r.json()["detail"].startswith("infotext: 40001 characters, above the 40000"), r.text


def test_samples_format_jpg_and_webp_as_a1111(client):
    """A1111's samples_format / jpeg_quality options (POST /options or override_settings): the API's images are JPEG
    or WEBP at that quality, with the infotext in the EXIF UserComment (A1111's encode_pil_to_base64), which
    png-info reads back; the Extras tab's too. Another format is a 422 naming the option."""
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"samples_format": "jpg"}})
    assert r.status_code == 200 and info(r)["warnings"] == [], r.text
    b64 = r.json()["images"][0]
    assert decode(b64).format == "JPEG"
    got = client.post("/sdapi/v1/png-info", json={"image": b64}).json()
    assert got["info"] == info(r)["infotexts"][0] and got["parameters"]["Steps"] == "1"
    small = png_b64(Image.new("RGB", (16, 16), "teal"))
    try:
        r = client.post("/sdapi/v1/options", json={"samples_format": "WEBP", "jpeg_quality": 90})
        assert r.status_code == 200 and r.json()["applied"] == {"samples_format": "WEBP", "jpeg_quality": 90}
        options = client.get("/sdapi/v1/options").json()
        assert (options["samples_format"], options["jpeg_quality"]) == ("WEBP", 90)
        r = client.post("/sdapi/v1/txt2img", json=SMALL)
        assert decode(r.json()["images"][0]).format == "WEBP"
        r = client.post("/sdapi/v1/extra-single-image", json={"image": small, "upscaler_1": "Lanczos"})
        assert r.status_code == 200 and decode(r.json()["image"]).format == "WEBP", r.text
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"samples_format": "png"}})
        assert decode(r.json()["images"][0]).format == "PNG"
    finally:
        client.post("/sdapi/v1/options", json={"samples_format": "png", "jpeg_quality": 80})
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"samples_format": "gif"}})
    assert r.status_code == 422 and r.json()["detail"] == ("override_settings.samples_format must be one of png, jpg, "
                                                           "jpeg, webp (A1111's), got 'gif'")
    r = client.post("/sdapi/v1/options", json={"jpeg_quality": 0})
    assert r.status_code == 422 and r.json()["detail"] == "jpeg_quality must be an integer in 1..100, got 0"
    assert client.get("/sdapi/v1/options").json()["samples_format"] == "png"


def test_a_fractional_jpeg_quality_is_truncated_in_options_and_override_settings(client):
    """jpeg_quality 50.5: one rule for POST /options and override_settings (A1111 takes the number in both, untyped;
    fastsd truncates it as its int request fields): 50, the same JPEG as 50; 0.5 is then out of range in both."""
    jpg = {"samples_format": "jpg"}
    fifty = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 4,
                                                   "override_settings": {**jpg, "jpeg_quality": 50}})
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 4, "override_settings": {**jpg,
                                                                                        "jpeg_quality": 50.5}})
    assert r.status_code == 200 and r.json()["images"] == fifty.json()["images"], r.text
    try:
        r = client.post("/sdapi/v1/options", json={**jpg, "jpeg_quality": 50.5})
        assert r.status_code == 200 and r.json()["applied"] == {**jpg, "jpeg_quality": 50}, r.text
        assert client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 4}).json()["images"] == fifty.json()["images"]
    finally:
        client.post("/sdapi/v1/options", json={"samples_format": "png", "jpeg_quality": 80})
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"jpeg_quality": 0.5}})
    assert r.status_code == 422 and r.json()["detail"] == ("override_settings.jpeg_quality must be an integer in "
                                                           "1..100, got 0.5"), r.text
    r = client.post("/sdapi/v1/options", json={"jpeg_quality": 0.5})
    assert r.status_code == 422 and r.json()["detail"] == "jpeg_quality must be an integer in 1..100, got 0", r.text


def test_a_huge_float_in_an_integer_field_is_named_as_given(client):
    """A float of 2**63 or more in an int field is refused as sent (1e+308), not as its 309-digit truncation."""
    for field, value, shown in (("width", 1e308, "1e+308"), ("seed", 1e300, "1e+300"), ("steps", -1e30, "-1e+30")):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, field: value})
        assert r.status_code == 422 and r.json()["detail"] == (
            f"{field}: Input should be an integer between -2**63 and 2**63, got {shown}"), r.text


def test_clip_skip_above_the_models_layers_is_refused_at_options(client):
    """POST /options checks CLIP_stop_at_last_layers against the model it would run (the current one, or the one
    it switches to): random:tiny has 2 layers, so 12 is a 422 there (it was stored, then every request failed), as
    in override_settings; an infotext's Clip skip is named as the infotext's."""
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 12})
    assert r.status_code == 422 and r.json()["detail"] == ("CLIP_stop_at_last_layers must be an integer in 0..2 "
                                                           "(random:tiny's text encoder has 2 layers), got 12"), r.text
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "sd_model_checkpoint": "random:tiny"})
    assert r.status_code == 422 and "random:tiny's text encoder has 2 layers" in r.json()["detail"], r.text
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "infotext": "a cat\nSteps: 1, Clip skip: 12, Size: 64x64"})
    assert r.status_code == 422 and r.json()["detail"] == (
        "the infotext's Clip skip (override_settings.CLIP_stop_at_last_layers) must be an integer in 0..2 "
        "(random:tiny's text encoder has 2 layers), got 12"), r.text


def test_a_checkpoint_or_vae_override_of_another_type_is_a_422(client):
    """override_settings sd_model_checkpoint / sd_vae that is no string (a number, a list): a client's bug, a 422
    naming the field (an unknown name, "" and null still fall back)."""
    for key in ("sd_model_checkpoint", "sd_vae"):
        for value in (5, ["a"], {"name": "random:tiny"}, True):
            r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {key: value}})
            assert r.status_code == 422 and r.json()["detail"] == (
                f"override_settings.{key} must be a name (a string; \"\" or null: the server's), got {value!r}"), r.text


def test_an_infotext_too_long_for_exif_is_named_in_the_warnings(client):
    """A JPEG / WEBP answer whose infotext is past the EXIF's 64 KiB (UTF-16: 8000-emoji prompts) leaves it out of
    the image: said once in info.warnings (and the log), not only the log."""
    big = "\U0001F600" * 8000
    body = {**SMALL, "prompt": big, "negative_prompt": big, "enable_hr": True, "hr_scale": 1,
            "hr_prompt": big[:-1] + "x", "batch_size": 2, "override_settings": {"samples_format": "jpg"}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    meta = info(r)
    notes = [w for w in meta["warnings"] if "too long for the image's EXIF" in w]
    assert notes == [f"samples_format jpg: the infotext ({len(meta['infotexts'][0])} characters) is too long for the "
                     "image's EXIF (EXIF data is too long), left out of the image (info.infotexts has it; png keeps "
                     "it)"], meta["warnings"]
    assert client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()["info"] == ""
    r = client.post("/sdapi/v1/txt2img", json={**body, "batch_size": 1, "override_settings": {}})
    assert r.status_code == 200 and info(r)["warnings"] == [], r.text
