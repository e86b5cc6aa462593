"""fastsd.serve's upscalers: --upscaler-dir (checked at start), GET /sdapi/v1/upscalers and /latent-upscale-modes in
A1111's shapes, txt2img's hr_upscaler naming a model of the folder, and A1111's Extras tab (/extra-single-image:
its resize modes, crop, second upscaler, size limits; a model's answer equal to fastsd.upscalers' own upscale), run
as a job on the worker thread. Tiny random models and images; the server runs in this process (the same torch, so
the same pixels as load_upscaler here), started through the command line's own functions."""
import base64
import contextlib
import io
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file
from serve_server import decode, in_process, info, started

from fastsd.config import CompactConfig, ESRGANConfig
from fastsd.hires import LATENT_MODES
from fastsd.image import parse_infotext
from fastsd.models.compact import SRVGGNetCompact
from fastsd.models.esrgan import RRDBNet
from fastsd.serve.__main__ import main as serve_main
from fastsd.upscalers import list_upscalers, load_upscaler

SMALL = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}
MAX_SIZE, MAX_PIXELS = 256, 96 * 96  # the server's --max-size and --max-image-pixels here


def save(model, path) -> str:
    torch.manual_seed(0)
    for p in model.parameters():  # random weights all through, small enough that the output isn't clipped flat
        p.data.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A1111's models/ESRGAN: a 4x RRDBNet under the file name A1111 downloads for "R-ESRGAN 4x+", a 2x compact
    model in a subfolder, a broken file, and a file that is no model."""
    root = tmp_path_factory.mktemp("serve-upscalers") / "ESRGAN"
    (root / "sub").mkdir(parents=True)
    save(RRDBNet(ESRGANConfig(features=8, blocks=1)), root / "RealESRGAN_x4plus.safetensors")
    save(SRVGGNetCompact(CompactConfig(features=8, convs=2, scale=2)), root / "sub" / "compact2x.safetensors")
    (root / "broken.pth").write_bytes(b"\x80\x02 not a pickle of tensors")
    (root / "notes.txt").write_text("not a model")
    return root




def listed(folder) -> list[str]:
    """The folder's model names in list_upscalers' order (the answers' order)."""
    return list(list_upscalers(str(folder)))


@contextlib.contextmanager
def serving(state):
    """build_app(state) on a real uvicorn in this process; yields an httpx client."""
    with in_process(state) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def state(folder):
    """The server's state as `python -m fastsd.serve --upscaler-dir DIR ...` makes it (fp32: the dtype load_upscaler
    uses by default)."""
    with started("--upscaler-dir", str(folder), "--max-size", str(MAX_SIZE), "--max-image-pixels",
                 str(MAX_PIXELS)) as st:
        yield st


@pytest.fixture(scope="module")
def client(state):
    with serving(state) as c:
        yield c


def image(w=16, h=24, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def b64(im: Image.Image, **text) -> str:
    png = PngImagePlugin.PngInfo()
    for k, v in text.items():
        png.add_text(k, v)
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=png)
    return base64.b64encode(buf.getvalue()).decode()


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def counts(client) -> dict:
    """The queue's job counts once no job runs (a job's count is written after its answer is out)."""
    deadline = time.monotonic() + 30
    while (p := client.get("/sdapi/v1/progress").json())["state"]["job"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return p["state"]["fastsd"]


def extras(client, im=None, **fields):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(im or image()), **fields})
    assert r.status_code == 200, r.text
    return r.json(), decode(r.json()["image"])


# ---- the command line --------------------------------------------------------------------------------------


def test_upscaler_dir_is_checked_at_start_and_defaults_to_the_environment(monkeypatch, capsys, folder):
    from fastsd.serve import __main__
    from fastsd.serve.__main__ import build_parser

    monkeypatch.setattr(__main__, "_serve", lambda state, sock, level: sock.close() or 0)  # never serve here
    argv = ["--port", "0", "--model", "random:tiny"]
    assert serve_main([*argv, "--upscaler-dir", "/nonexistent/upscalers"]) == 2
    out, err = capsys.readouterr()
    assert err == "error: --upscaler-dir /nonexistent/upscalers: not a folder\n" and "listening" not in out
    assert serve_main([*argv, "--upscaler-dir", str(folder / "notes.txt")]) == 2
    assert capsys.readouterr().err == f"error: --upscaler-dir {folder / 'notes.txt'}: not a folder\n"
    monkeypatch.setenv("FASTSD_UPSCALER_DIR", "/nonexistent/from-env")
    assert build_parser().parse_args([]).upscaler_dir == "/nonexistent/from-env"
    assert serve_main(argv) == 2
    assert capsys.readouterr().err == "error: --upscaler-dir /nonexistent/from-env: not a folder\n"
    assert build_parser().parse_args(["--upscaler-dir", str(folder)]).upscaler_dir == str(folder)  # the flag wins


# ---- the lists ---------------------------------------------------------------------------------------------


def test_upscalers_list_in_a1111_shape(client, folder):
    got = client.get("/sdapi/v1/upscalers").json()
    assert got[:3] == [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                       for n in ("None", "Lanczos", "Nearest")]
    models = {u["name"]: u for u in got[3:]}
    assert [u["name"] for u in got[3:]] == listed(folder)
    assert sorted(listed(folder)) == sorted(["RealESRGAN_x4plus", "broken", "compact2x", "R-ESRGAN 4x+"])
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in got)
    assert models["RealESRGAN_x4plus"] == {"name": "RealESRGAN_x4plus", "model_name": "ESRGAN", "model_url": None,
                                           "model_path": "RealESRGAN_x4plus.safetensors", "scale": 4}
    assert models["R-ESRGAN 4x+"] == {**models["RealESRGAN_x4plus"], "name": "R-ESRGAN 4x+"}  # A1111's name, same file
    assert models["compact2x"] == {"name": "compact2x", "model_name": "Compact", "model_url": None,
                                   "model_path": os.path.join("sub", "compact2x.safetensors"), "scale": 2}
    assert models["broken"]["scale"] is None and models["broken"]["model_name"] is None  # listed, not a failure
    assert str(folder) not in json.dumps(got)  # file names, never the server's folder


def test_upscaler_files_are_read_once_per_version(client, folder, monkeypatch):
    import fastsd.upscalers

    read = fastsd.upscalers.read_upscaler
    calls = []
    monkeypatch.setattr(fastsd.upscalers, "read_upscaler", lambda path: calls.append(os.path.basename(path)) or read(path))
    first = client.get("/sdapi/v1/upscalers").json()
    assert client.get("/sdapi/v1/upscalers").json() == first
    assert len(calls) <= 3 and len(set(calls)) == len(calls)  # (those no test before read), each once
    calls.clear()
    extra = folder / "late.safetensors"
    save(SRVGGNetCompact(CompactConfig(features=8, convs=1)), extra)
    try:
        got = client.get("/sdapi/v1/upscalers").json()
        assert [u["name"] for u in got[3:]] == listed(folder) and "late" in listed(folder)
        assert calls == ["late.safetensors"]  # a new file is found and read; the others are not read again
        assert client.get("/sdapi/v1/upscalers").json() == got and calls == ["late.safetensors"]
        save(RRDBNet(ESRGANConfig(features=8, blocks=1, upsamples=1)), extra)  # replaced: another model, scale 2
        os.utime(extra, ns=(time.time_ns(), time.time_ns() + 10**9))
        late = {u["name"]: u for u in client.get("/sdapi/v1/upscalers").json()}["late"]
        assert calls == ["late.safetensors"] * 2 and (late["model_name"], late["scale"]) == ("ESRGAN", 2)
    finally:
        extra.unlink()
    assert "late" not in [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]


def test_latent_upscale_modes(client):
    assert client.get("/sdapi/v1/latent-upscale-modes").json() == [
        {"name": n} for n in ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                              "Latent (nearest)", "Latent (nearest-exact)")]  # A1111's shared.latent_upscale_modes
    assert [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()] == list(LATENT_MODES)


# ---- txt2img's hr_upscaler ---------------------------------------------------------------------------------


@pytest.fixture
def upscaler_calls(state, monkeypatch):
    """The files the pipeline's hires fix (checked before the run, then run) and the Extras tab load, in order."""
    pipe = state.registry.current.pipe
    calls, load = [], pipe.upscaler
    monkeypatch.setattr(pipe, "upscaler", lambda path: calls.append(path) or load(path))
    return calls


@pytest.mark.parametrize("name,file,label", [
    ("compact2x", "sub/compact2x.safetensors", "compact2x"),
    ("R-ESRGAN 4x+", "RealESRGAN_x4plus.safetensors", "R-ESRGAN 4x+"),  # A1111's name of the file it downloads
    ("RealESRGAN_x4plus", "RealESRGAN_x4plus.safetensors", "R-ESRGAN 4x+"),  # (named as A1111 names it)
])
def test_hr_upscaler_names_a_model_of_the_folder(client, folder, upscaler_calls, name, file, label):
    body = {**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": name, "hr_second_pass_steps": 1}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert set(upscaler_calls) == {str(folder / file)}  # the file handed to the pipeline (its check, its hires fix)
    params = parse_infotext(info(r)["infotexts"][0])[2]
    assert params["Hires upscaler"] == label and params["Hires upscale"] == "1.5"
    assert decode(r.json()["images"][0]).size == (96, 96)
    assert r.json()["parameters"]["hr_upscaler"] == name and str(folder) not in r.text


@pytest.mark.parametrize("name,label", [(None, None), ("latent (BICUBIC)", "Latent (bicubic)"),
                                        ("Lanczos", "Lanczos"), ("None", "None")])
def test_hr_upscaler_built_in_names_as_before(client, upscaler_calls, name, label):
    """Unset: Latent, with no "Hires upscaler" key (A1111's API writes none)."""
    body = {**SMALL, "enable_hr": True, "hr_scale": 1.25, "hr_second_pass_steps": 1,
            **({"hr_upscaler": name} if name else {})}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert parse_infotext(info(r)["infotexts"][0])[2].get("Hires upscaler") == label and upscaler_calls == []


HR_BAD = [  # (hr_upscaler, the detail's start)
    ("nope", "hr_upscaler: unknown upscaler 'nope'; this server has: Latent, Latent (antialiased), Latent (bicubic), "
             "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), None, Lanczos, Nearest, "
             "{models} (GET /sdapi/v1/upscalers, /latent-upscale-modes)"),
    ("R-ESRGAN 2x+", "hr_upscaler: unknown upscaler 'R-ESRGAN 2x+' (A1111 downloads RealESRGAN_x2plus.pth for it; "
                     "fastsd downloads nothing); this server has: "),
    ("../ESRGAN/compact2x", "hr_upscaler: upscaler name '../ESRGAN/compact2x' refused: upscalers are chosen by name"),
    ("sub/compact2x", "hr_upscaler: upscaler name 'sub/compact2x' refused"),
    ("/etc/passwd", "hr_upscaler: upscaler name '/etc/passwd' refused"),
    ("notes", "hr_upscaler: unknown upscaler 'notes'"),
    ("broken", "hr_upscaler: broken.pth: "),
]


@pytest.mark.parametrize("name,words", HR_BAD, ids=[b[0] for b in HR_BAD])
def test_hr_upscaler_mistakes_are_4xx_before_any_work(client, folder, name, words):
    before = counts(client)
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "hr_upscaler": name})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(words.format(models=", ".join(listed(folder)))), detail
    assert "\n" not in detail and str(folder) not in detail, detail
    assert counts(client) == before  # no job ran
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "hr_upscaler": name})  # no enable_hr: not looked at
    assert r.status_code == 200, r.text


def test_without_an_upscaler_folder(state):
    """A server started without --upscaler-dir: only the built-in upscalers; a model name is a 4xx saying why."""
    from dataclasses import replace

    from fastsd.serve.upscalers import Upscalers

    with serving(replace(state, upscalers=Upscalers(None))) as c:
        assert [u["name"] for u in c.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]
        for path, body in (("txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": "compact2x"}),
                           ("extra-single-image", {"image": b64(image()), "upscaler_1": "compact2x"})):
            r = c.post(f"/sdapi/v1/{path}", json=body)
            assert r.status_code == 422 and r.json()["detail"].endswith(
                "unknown upscaler 'compact2x'; this server has no upscaler folder (start it with --upscaler-dir DIR)")


# ---- the Extras tab ----------------------------------------------------------------------------------------


def test_extras_with_a_model_is_load_upscalers_upscale(client, folder, upscaler_calls):
    im = image(16, 24)
    path = str(folder / "sub" / "compact2x.safetensors")
    model = load_upscaler(path)
    data, out = extras(client, im, upscaler_1="compact2x", upscaling_resize=3)  # 16x24 -> 48x72: 2x twice, Lanczos
    assert out.size == (48, 72) and np.array_equal(pixels(out), pixels(model.upscale(im, 48, 72)))
    assert data["html_info"] == "<p>Postprocess upscale by: 3.0, Postprocess upscaler: compact2x</p>"
    assert data["warnings"] == [] and upscaler_calls == [path]
    # resize_mode 1 with crop (A1111's default): scaled to cover 40x40 (by 2.5: 40x60, rounded down to 40x56),
    # centred on a 40x40 canvas
    data, out = extras(client, im, resize_mode=1, upscaling_resize_w=40, upscaling_resize_h=40, upscaler_1="compact2x")
    assert out.size == (40, 40)
    assert np.array_equal(pixels(out), pixels(model.upscale(im, 40, 56).crop((0, 8, 40, 48))))
    assert data["html_info"] == ("<p>Postprocess upscale to: 40x40, Postprocess crop to: 40x40, "
                                 "Postprocess upscaler: compact2x</p>")
    # A1111's own name of a file it downloads
    data, out = extras(client, im, upscaler_1="R-ESRGAN 4x+", upscaling_resize=2)
    ref = load_upscaler(str(folder / "RealESRGAN_x4plus.safetensors")).upscale(im, 32, 48)
    assert np.array_equal(pixels(out), pixels(ref)) and "Postprocess upscaler: R-ESRGAN 4x+" in data["html_info"]


def test_extras_built_in_upscalers_as_a1111(client):
    im = image(16, 24, seed=1)
    data, out = extras(client, im, upscaler_1="Lanczos")  # upscaling_resize 2 by default
    assert data["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"  # (A1111's int 2)
    assert np.array_equal(pixels(out), pixels(im.resize((32, 48), Image.LANCZOS)))
    data, out = extras(client, im, upscaler_1="Nearest", upscaling_resize=1.5)
    assert np.array_equal(pixels(out), pixels(im.resize((24, 36), Image.NEAREST).resize((24, 32), Image.LANCZOS)))
    # A1111's Upscaler.upscale: a pass at the scale asked, then Lanczos down to a multiple of 8 (36 -> 32)
    data, out = extras(client, im, upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.25,
                       upscaling_resize=2)
    blend = Image.blend(im.resize((32, 48), Image.LANCZOS), im.resize((32, 48), Image.NEAREST), 0.25)
    assert np.array_equal(pixels(out), pixels(blend))
    assert data["html_info"] == ("<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos, "
                                 "Postprocess upscaler 2: Nearest</p>")
    # resize_mode 1 without crop: the covering size (rounded down to 8 px), not stretched (A1111 crops only when asked)
    data, out = extras(client, im, resize_mode=1, upscaling_resize_w=40, upscaling_resize_h=40,
                       upscaling_crop=False, upscaler_1="Lanczos")
    assert out.size == (40, 56) and data["html_info"] == ("<p>Postprocess upscale to: 40x40, "
                                                         "Postprocess upscaler: Lanczos</p>")
    # resize_mode 1 with crop where the rounding leaves the cover short: black borders, as A1111's paste
    data, out = extras(client, im, resize_mode=1, upscaling_resize_w=36, upscaling_resize_h=36, upscaler_1="Lanczos")
    assert out.size == (36, 36) and (pixels(out)[:, :2] == 0).all() and (pixels(out)[:, -2:] == 0).all()


def test_extras_none_sends_the_image_back_and_keeps_its_infotext(client):
    im = Image.new("RGBA", (20, 12), (10, 200, 30, 128))
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(im, parameters="a cat\nSteps: 3, Seed: 7"),
                                                          "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 1})
    assert r.status_code == 200, r.text
    out = decode(r.json()["image"])
    assert out.mode == "RGB" and out.size == (20, 12) and np.array_equal(pixels(out), pixels(im))  # as A1111: RGB
    assert r.json()["html_info"] == "<p></p>" and out.text == {"parameters": "a cat\nSteps: 3, Seed: 7"}
    assert r.json()["warnings"] == ["upscaler_2 'Lanczos': used only with an upscaler_1 (as A1111), ignored"]
    data, out = extras(client, image(), upscaler_1="Lanczos", gfpgan_visibility=0.5, codeformer_visibility=1,
                       codeformer_weight=0.3)
    assert out.size == (32, 48) and out.text == {"postprocessing": "Postprocess upscale by: 2, "
                                                                    "Postprocess upscaler: Lanczos"}
    assert data["warnings"] == [
        "gfpgan_visibility 0.5: face restoration is not supported (fastsd has no GFPGAN or CodeFormer), ignored",
        "codeformer_visibility 1: face restoration is not supported (fastsd has no GFPGAN or CodeFormer), ignored"]


def test_extras_runs_as_a_job_on_the_worker_thread(client, monkeypatch):
    from fastsd import upscalers

    seen, release, run = [], threading.Event(), upscalers.upscale_by

    def held(*args):
        seen.append(threading.current_thread().name)
        release.wait(30)
        return run(*args)

    monkeypatch.setattr(upscalers, "upscale_by", held)
    before = counts(client).get("finished", 0)
    answer = []
    thread = threading.Thread(target=lambda: answer.append(
        client.post("/sdapi/v1/extra-single-image", json={"image": b64(image()), "upscaler_1": "Lanczos"})))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        progress = client.get("/sdapi/v1/progress").json()
        assert seen == ["fastsd-worker"] and progress["state"]["job"] == "extras", progress
    finally:
        release.set()
        thread.join(30)
    assert answer[0].status_code == 200 and decode(answer[0].json()["image"]).size == (32, 48)
    assert counts(client)["finished"] == before + 1


EXTRAS_BAD = [  # (fields, the detail's start)
    ({"image": ""}, "image: the Extras tab needs a base64 image"),
    ({"image": "@@not base64@@"}, "image is not valid base64"),
    ({"image": base64.b64encode(b"GIF89a garbage").decode()}, "image is not a readable image"),
    ({"image": "https://example.com/cat.png"}, "image: image URLs are not fetched"),
    ({"image": b64(image(100, 100))}, "image is 100x100 pixels, above this server's limit of 9216 pixels"),
    ({"upscaler_1": "nope"}, "upscaler_1: unknown upscaler 'nope'; this server has: None, Lanczos, Nearest, {models} "
                             "(GET /sdapi/v1/upscalers)"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "nope"}, "upscaler_2: unknown upscaler 'nope'"),
    ({"upscaler_1": "Latent"}, "upscaler_1: 'Latent' is a latent upscale mode, for the hires fix only"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "latent (nearest)"}, "upscaler_2: 'Latent (nearest)' is a latent"),
    ({"upscaler_1": "../../etc/passwd"}, "upscaler_1: upscaler name '../../etc/passwd' refused"),
    ({"upscaler_1": "broken"}, "upscaler_1: broken.pth: "),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 1000}, "the upscale would make a 16000x24000 image, above this "
                                                          "server's limit of 256 px (--max-size)"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 1e300}, "the upscale would make a "),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 10**9}, "the upscale would make a "),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 300, "upscaling_resize_h": 8},
     "the upscale would make a 296x448 image (before the crop to 300x8), above this server's limit of 256 px"),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 260, "upscaling_resize_h": 8,
      "image": b64(image(32, 8))}, "the upscale would make a 256x64 image (before the crop to 260x8), above this "
                                   "server's limit of 256 px"),  # the canvas alone is too wide
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 200, "upscaling_resize_h": 8,
      "upscaling_crop": False}, "the upscale would make a 200x296 image, above this server's limit of 256 px"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 0.25}, "the upscale would make a 0x0 image from 16x24: less than 8"),
    ({"upscaling_resize": 0}, "upscaling_resize: Input should be greater than 0"),
    ({"resize_mode": 2}, "resize_mode: Input should be 0 or 1"),
    ({"upscaling_resize_w": 0}, "upscaling_resize_w: Input should be greater than or equal to 1"),
    ({"extras_upscaler_2_visibility": 1.5}, "extras_upscaler_2_visibility: Input should be less than or equal to 1"),
    ({"gfpgan_visibility": -1}, "gfpgan_visibility: Input should be greater than or equal to 0"),
    ({"upscaler_1": 4}, "upscaler_1: Input should be a valid string"),
]


@pytest.mark.parametrize("fields,words", EXTRAS_BAD, ids=[f"{i}-{b[1][:30]}" for i, b in enumerate(EXTRAS_BAD)])
def test_extras_mistakes_are_4xx_with_one_line_before_any_work(client, folder, fields, words):
    before = counts(client)
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(image()), **fields})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and str(folder) not in detail
    assert detail.startswith(words.format(models=", ".join(listed(folder)))), detail
    assert counts(client) == before  # refused before the queue


# ---- the page ----------------------------------------------------------------------------------------------


def test_page_offers_the_folders_models_as_hires_upscalers(client, folder):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
    chromium = os.environ.get("FASTSD_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        pytest.skip(f"no Chromium at {chromium}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(str(client.base_url) + "/")
            page.wait_for_function("document.querySelectorAll('#hr-upscaler option').length > 8")
            options = page.locator("#hr-upscaler option").all_inner_texts()
        finally:
            browser.close()
    assert options[:8] == [*LATENT_MODES, "Lanczos", "Nearest"] and options[8:] == listed(folder)


def test_a_model_broken_after_the_check_is_named_by_its_file(client, state, folder, monkeypatch):
    """The request is checked (the file read then); a file that breaks before the job runs is a 4xx naming the file,
    never the server's folder."""
    from fastsd import CheckpointError

    pipe = state.registry.current.pipe

    def broken(path):
        raise CheckpointError(f"{path}: file is truncated")

    monkeypatch.setattr(pipe, "upscaler", broken)
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "compact2x",
                                                "hr_second_pass_steps": 1})
    assert r.status_code == 422 and r.json()["detail"] == "compact2x.safetensors: file is truncated", r.text
    assert str(folder) not in r.text


def test_extras_batch_is_each_image_as_the_single_one(client):
    """A1111's /extra-batch-images: every image of imageList as /extra-single-image with the same fields, in order;
    mistakes name the image; at most --max-batch images."""
    fields = {"upscaler_1": "compact2x", "upscaling_resize": 2}
    ims = [image(16, 24, seed=1), image(24, 16, seed=2)]
    r = client.post("/sdapi/v1/extra-batch-images",
                    json={"imageList": [{"data": b64(im), "name": f"{i}.png"} for i, im in enumerate(ims)], **fields})
    assert r.status_code == 200, r.text
    got = [decode(b) for b in r.json()["images"]]
    singles = [extras(client, im, **fields)[1] for im in ims]
    assert [g.size for g in got] == [(32, 48), (48, 32)]
    assert all(np.array_equal(pixels(g), pixels(s)) for g, s in zip(got, singles))
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: compact2x</p>"  # (the last's)
    for body, match in [({"imageList": []}, "imageList: the Extras batch needs at least one"),
                        ({"imageList": [{"data": b64(ims[0]), "name": "a"}, {"data": "bm90IGFuIGltYWdl", "name": "b"}]},
                         "imageList[1] (b): image is not a readable image"),
                        ({"imageList": [{"data": b64(ims[0]), "name": "a"}] * 9}, "imageList: 9 images, above this server's limit of 8"),
                        ({"imageList": [{"data": b64(ims[0]), "name": "a"}], "upscaler_1": "Latent"},
                         "imageList[0] (a): upscaler_1: 'Latent' is a latent upscale mode")]:
        bad = client.post("/sdapi/v1/extra-batch-images", json={**fields, **body})
        assert bad.status_code == 422 and bad.json()["detail"].startswith(match), (body, bad.text)


def test_interrupt_stops_a_models_pass_at_the_next_tile(state, folder):
    """/interrupt during an Extras job: the model's pass stops before its next tile and, as A1111's tiled upscale,
    gives its input back, so A1111's rule resizes it with Lanczos; the tiles count as the job's steps (/progress); a
    client gone stops it with nothing returned."""
    from fastsd.serve.jobqueue import Cancelled, Job
    from fastsd.serve.upscalers import ExtrasPlan, run_extras

    path = str(folder / "sub" / "compact2x.safetensors")
    im = image(400, 200)  # 3 x 2 tiles of 192 px overlapping by 8
    plan = ExtrasPlan(im, (path,), 2.0, (800, 400), None, 0.0, {"Postprocess upscale by": 2.0}, None, (),
                      state.registry.current.pipe)

    def job_stopping_at(tile, attr="interrupted"):
        job, seen = Job("extras", lambda j: None), []

        def on_step(step, total, preview):
            seen.append((step, total))
            if step == tile:
                setattr(job, attr, True)
            Job.on_step(job, step, total, preview)

        job.on_step = on_step
        return job, seen

    job, seen = job_stopping_at(2)
    out = run_extras(plan, job)
    assert seen == [(0, 6), (1, 6), (2, 6)] and job.halted
    assert out["warnings"] == ["interrupted at tile 3 of 6 of a model's pass: from there the image was resized with "
                               "Lanczos (as A1111)"]
    assert np.array_equal(pixels(decode(out["image"])), pixels(im.resize((800, 400), Image.LANCZOS)))
    job, seen = job_stopping_at(None)
    whole = run_extras(plan, job)
    assert seen == [(i, 6) for i in range(6)] and whole["warnings"] == []
    assert np.array_equal(pixels(decode(whole["image"])), pixels(state.registry.current.pipe.upscaler(path).run(im)))
    job, _ = job_stopping_at(1, "cancelled")
    with pytest.raises(Cancelled):
        run_extras(plan, job)


@pytest.mark.parametrize("upscaler", ["Lanczos", "Latent", "RealESRGAN_x4plus"])
def test_a_hires_cover_above_max_size_is_a_422(client, upscaler):
    """hr_resize_x x hr_resize_y of another aspect ratio than the first pass: A1111 upscales to cover it (an image
    upscaler makes and VAE-encodes that whole image), then crops. A 32x256 first pass to 256x32 covers 256x2048: a
    422 naming --max-size before any work (it was a 200 after an image of 8x the server's limit on a side); a cover
    within the limit runs (64x128 to 128x64: 128x256, cropped to 128x64)."""
    body = {**SMALL, "width": 32, "height": 256, "enable_hr": True, "hr_resize_x": 256, "hr_resize_y": 32,
            "hr_upscaler": upscaler, "hr_second_pass_steps": 1}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == ("the hires fix would upscale to 256x2048 before its crop to 256x32 (hr_resize_x x "
                                  "hr_resize_y 256x32 is of another aspect ratio than the first pass's 32x256: A1111 "
                                  "scales to cover it, then crops), above this server's limit of 256 px (--max-size)")
    if upscaler != "Lanczos":
        return
    r = client.post("/sdapi/v1/txt2img", json={**body, "width": 64, "height": 128, "hr_resize_x": 128,
                                               "hr_resize_y": 64})
    assert r.status_code == 200 and decode(r.json()["images"][0]).size == (128, 64), r.text


def test_hires_size_messages_quote_the_servers_limit(client):
    """A hires target below 8 px or above --max-size is named with the server's limit (not the pipeline's 2**20
    px, which the server lifts to check its own)."""
    for extra, want in (({"hr_resize_x": 7}, "the hires fix would make a 0x0 image: each side must be 8..256 px "
                                             "(this server's limit, --max-size)"),
                        ({"hr_scale": 0.1}, "the hires fix would make a 0x0 image: each side must be 8..256 px"),
                        ({"hr_scale": 5}, "the hires fix would make a 320x320 image, above this server's limit of "
                                          "256 px (--max-size)")):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, **extra})
        assert r.status_code == 422 and r.json()["detail"].startswith(want), (extra, r.text)
        assert "1048576" not in r.json()["detail"]


def test_a_stored_clip_skip_the_model_cant_take_is_named_as_the_servers_option(client, state):
    """A CLIP_stop_at_last_layers option above the model's layers (POST /options refuses one for the current model,
    but a server's option may predate a model switch): the 422 says the value is the server's option."""
    saved, state.clip_skip = state.clip_skip, 12
    try:
        r = client.post("/sdapi/v1/txt2img", json=SMALL)
    finally:
        state.clip_skip = saved
    assert r.status_code == 422 and r.json()["detail"] == (
        "CLIP_stop_at_last_layers (this server's option, set by POST /sdapi/v1/options; override_settings overrides "
        "it) must be an integer in 0..2 (random:tiny's text encoder has 2 layers), got 12"), r.text
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert r.status_code == 200, r.text
