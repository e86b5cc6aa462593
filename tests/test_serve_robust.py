"""fastsd.serve against the audit's findings: an internal error is a clean 500 that leaves the connection usable;
values JSON can't carry back are refused before any work; the seed range is checked for the whole request; a
LoRA file replaced on disk is read again; the embeddings list says what the model can use, and errors name
files, not the server's folders; /skip; init images only in the formats clients send."""
import base64
import hashlib
import http.client
import io
import json
import logging
import math
import os
import shutil
import threading
import time

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file
from serve_server import Server, decode, in_process, info, png_b64

from fastsd import Interrupted
from fastsd.config import TINY
from fastsd.settings import SEED_LIMIT, GenerationSettings
from fastsd.serve.generation import PNG_INFO_DEFAULTS

SMALL = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}


# ---- an unexpected exception: a JSON 500, logged once, the connection kept ----------------------------------


@pytest.fixture
def bare_server():
    """build_app on a real uvicorn in this process (no model: the routes that need one are patched)."""
    from fastsd.serve.app import ServerState
    from fastsd.serve.jobqueue import JobQueue
    from fastsd.serve.limits import Limits
    from fastsd.serve.networks import Networks
    from fastsd.serve.registry import ModelEntry, Registry

    state = ServerState(Registry([ModelEntry("m", "m.safetensors", None, None)]), Networks(None, None), Limits(),
                        JobQueue(4))
    with in_process(state) as port:
        yield port
    state.queue.close()


class Plan:  # what the txt2img route reads of a plan before the job runs
    class settings:
        steps = 1

    n_iter = 1
    image_format = ("png", 80)


def fail(*args):
    raise RuntimeError("boom in /srv/secret/place")


@pytest.mark.parametrize("where", ["build_plan", "run_plan"])  # on the request's thread, on the worker
def test_internal_error_is_a_clean_500_and_the_connection_stays_usable(bare_server, monkeypatch, caplog, where):
    from fastsd.serve import app

    monkeypatch.setattr(app, "build_plan", fail if where == "build_plan" else lambda *a: Plan)
    monkeypatch.setattr(app, "run_plan", fail)
    conn = http.client.HTTPConnection("127.0.0.1", bare_server, timeout=30)
    with caplog.at_level(logging.INFO):
        conn.request("POST", "/sdapi/v1/txt2img", json.dumps(SMALL), {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        sock = conn.sock
        conn.request("GET", "/sdapi/v1/sd-models")  # the same keep-alive connection
        after = conn.getresponse()
        assert after.status == 200 and json.loads(after.read())[0]["model_name"] == "m"
        assert conn.sock is sock  # not reconnected
    conn.close()
    assert r.status == 500 and body["error"] == "RuntimeError"
    assert body["detail"] == "internal error (RuntimeError); the server log has the details"
    assert "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].name == "fastsd.serve", [rec.getMessage() for rec in errors]
    assert errors[0].exc_info[0] is RuntimeError  # the traceback is in the log


# ---- LoRAs and embeddings from folders of the test's own ----------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A LoRA folder (two valid random LoRAs) and an embeddings folder: one that fits random:tiny's text encoder
    (128 wide), one of SD2's 1024, one of random bytes, one empty."""
    from fastsd import load_pipeline
    from fastsd.config import TINY
    from fastsd.testing_lora import write_random_lora

    root = tmp_path_factory.mktemp("serve-robust")
    loras, embs, spare = root / "loras", root / "embeddings", root / "spare"
    for d in (loras, embs, spare):
        d.mkdir()
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    for name, seed in (("a", 1), ("b", 2)):
        write_random_lora(str(spare / f"{name}.safetensors"), pipe, fmt="kohya_ldm", rank=4, seed=seed, strength=1.0)
    gen = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, TINY.clip.hidden_size, generator=gen)}, str(embs / "goodemb.safetensors"))
    save_file({"emb_params": torch.randn(1, 1024, generator=gen)}, str(embs / "wideemb.safetensors"))
    (embs / "brokenemb.safetensors").write_bytes(os.urandom(500))
    (embs / "emptyemb.pt").write_bytes(b"")
    return loras, embs, spare


def png_of(c, prompt: str) -> str:
    """The sha256 of the PNG's bytes (compared, not shown, when two differ)."""
    r = c.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 2, "prompt": prompt})
    assert r.status_code == 200, r.text
    return hashlib.sha256(base64.b64decode(r.json()["images"][0])).hexdigest()


def test_a_lora_file_replaced_on_disk_is_read_again(folders):
    loras, _, spare = folders
    swap = loras / "swap.safetensors"
    shutil.copy(spare / "a.safetensors", swap)
    assert (spare / "a.safetensors").stat().st_size == (spare / "b.safetensors").stat().st_size
    server = Server(["--model", "random:tiny", "--lora-dir", str(loras)])
    try:
        with server.client() as c:
            with_a = png_of(c, "a cat <lora:swap:1>")
            assert png_of(c, "a cat <lora:swap:1>") == with_a  # the same file: merged once, the same image
            shutil.copy(spare / "b.safetensors", swap)  # same size: only the modification time tells
            with_b = png_of(c, "a cat <lora:swap:1>")
            assert with_b != with_a
            for weight in ("1e308", "0:1e30"):  # fastsd.lora's weight bound, refused before any merge
                r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": f"a cat <lora:swap:{weight}>"})
                assert r.status_code == 422 and f"<lora:swap:{weight}>" in r.json()["detail"], r.text
            swap.write_bytes(b"garbage")
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a cat <lora:swap:1>"})
            assert r.status_code == 422 and r.json()["detail"].startswith("swap.safetensors: "), r.text
            assert str(loras) not in r.text
    finally:
        server.stop()
    shutil.copy(spare / "b.safetensors", swap)
    fresh = Server(["--model", "random:tiny", "--lora-dir", str(loras)])
    try:
        with fresh.client() as c:
            assert png_of(c, "a cat <lora:swap:1>") == with_b  # byte for byte: b merged into clean weights
    finally:
        fresh.stop()


@pytest.fixture(scope="module")
def server(folders):
    s = Server(["--model", "random:tiny", "--embeddings-dir", str(folders[1])])
    yield s
    s.stop()


def test_embeddings_list_what_the_model_can_use_and_errors_name_files(server, folders):
    embs = folders[1]
    with server.client() as c:
        listed = c.get("/sdapi/v1/embeddings").json()
        assert list(listed["loaded"]) == ["goodemb"]
        assert listed["loaded"]["goodemb"]["shape"] == 128 and listed["loaded"]["goodemb"]["vectors"] == 2
        # A1111's skipped: only what was read but is of another width, in loaded's shape; broken and empty files are
        # not listed (the log names them)
        assert listed["skipped"] == {"wideemb": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                 "shape": 1024, "vectors": 1}}
        assert str(embs) not in json.dumps(listed)
        for word, file in (("wideemb", "wideemb.safetensors: an embedding of width 1024"),
                           ("brokenemb", "brokenemb.safetensors: ")):
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": f"a {word}, cat"})
            assert r.status_code == 422 and r.json()["detail"].startswith(file), r.text
            assert str(embs) not in r.text
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a goodemb cat, emptyemb"})
        assert r.status_code == 200, r.text
        assert info(r)["warnings"] == ["embedding 'emptyemb': not loaded (an empty file); used as plain text"]
        assert "TI hashes" in info(r)["infotexts"][0]
    log = server.log_text()
    assert "warning: embedding wideemb skipped: wideemb.safetensors" in log
    assert "warning: embedding brokenemb skipped: brokenemb.safetensors" in log


# ---- requests checked before any work ---------------------------------------------------------------------


def float_fields(model) -> list[str]:
    return [n for n, f in model.model_fields.items() if "float" in str(f.annotation)]


@pytest.mark.parametrize("kind", ["Txt2ImgRequest", "Img2ImgRequest"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_field_refuses_non_finite_numbers(kind, bad):
    from pydantic import ValidationError

    from fastsd.serve import schemas

    model = getattr(schemas, kind)
    names = float_fields(model)
    assert {"eta", "s_tmax", "subseed_strength", "refiner_switch_at", "denoising_strength"} <= set(names)
    for name in names:
        with pytest.raises(ValidationError) as e:
            model.model_validate({name: bad})
        (err,) = e.value.errors()
        assert err["loc"] == (name,) and err["msg"] == f"Input should be a finite number, got {bad}"


NOT_ECHOABLE = [  # (endpoint, raw JSON body, the detail)
    ("txt2img", '{"eta": NaN}', "eta: Input should be a finite number, got nan"),
    ("txt2img", '{"eta": Infinity, "sampler_name": "DDIM"}', "eta: Input should be a finite number, got inf"),
    ("txt2img", '{"s_tmax": 1e400}', "s_tmax: Input should be a finite number, got inf"),  # strict JSON
    ("txt2img", '{"hr_scale": -1e400}', "hr_scale: Input should be a finite number, got -inf"),
    ("txt2img", '{"denoising_strength": NaN}', "denoising_strength: Input should be a finite number, got nan"),
    ("txt2img", '{"refiner_switch_at": 1e999}', "refiner_switch_at: Input should be a finite number, got inf"),
    ("txt2img", '{"subseed_strength": NaN}', "subseed_strength: Input should be a finite number, got nan"),
    ("img2img", '{"image_cfg_scale": 1e400}', "image_cfg_scale: Input should be a finite number, got inf"),
    ("img2img", '{"initial_noise_multiplier": NaN}', "initial_noise_multiplier: Input should be a finite number"),
    ("txt2img", '{"override_settings": {"CLIP_stop_at_last_layers": NaN}}',
     "override_settings: Input should be a finite number, got nan (at override_settings.CLIP_stop_at_last_layers)"),
    ("txt2img", '{"script_args": [1, [2, 1e400]]}',
     "script_args: Input should be a finite number, got inf (at script_args.1.1)"),
    ("txt2img", '{"prompt": "a \\ud800 cat"}',
     "prompt: Input should be Unicode text, got a lone surrogate '\\ud800' at character 2"),
    ("txt2img", '{"hr_negative_prompt": "\\udfff"}', "hr_negative_prompt: Input should be Unicode text"),
    ("txt2img", '{"comments": {"\\ud83d": 1}}', "comments: Input should be Unicode text"),
]


@pytest.mark.parametrize("endpoint,fields,words", NOT_ECHOABLE, ids=[b[1][:40] for b in NOT_ECHOABLE])
def test_values_json_cannot_echo_are_refused_before_any_work(server, endpoint, fields, words):
    body = json.dumps({**SMALL, "init_images": [png_b64(Image.new("RGB", (64, 64)))]})[:-1] + ", " + fields[1:]
    with server.client() as c:
        before = c.get("/sdapi/v1/progress").json()["state"]["fastsd"]
        r = c.post(f"/sdapi/v1/{endpoint}", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(words), r.text
        assert c.get("/sdapi/v1/progress").json()["state"]["fastsd"] == before  # no job ran, none failed


def test_seed_range_is_checked_for_all_iterations_up_front(server):
    with server.client() as c:
        before = c.get("/sdapi/v1/progress").json()["state"]["fastsd"]
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": SEED_LIMIT - 3, "n_iter": 4})
        assert r.status_code == 422, r.text
        assert c.get("/sdapi/v1/progress").json()["state"]["fastsd"] == before  # no image was made and thrown away
        assert r.json()["detail"] == (f"seed {SEED_LIMIT - 3} with batch_size 1 x n_iter 4 = 4 images would pass the "
                                      f"largest seed, 2**63 - 1 (image i uses seed + i); use a seed of at most "
                                      f"{SEED_LIMIT - 4}")
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": SEED_LIMIT - 4, "batch_size": 2, "n_iter": 2})
        assert r.status_code == 200, r.text
        assert info(r)["all_seeds"][-1] == SEED_LIMIT - 1 and len(r.json()["images"]) == 4


def test_restore_afterwards_false_is_named_in_the_warnings(server):
    with server.client() as c:
        over = {"override_settings": {"CLIP_stop_at_last_layers": 2}}
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, **over, "override_settings_restore_afterwards": False})
        assert r.status_code == 200, r.text
        notes = info(r)["warnings"]
        assert any(w.startswith("override_settings_restore_afterwards false: not supported") for w in notes), notes
        assert c.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # as the warning says
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, **over})
        assert not any("restore_afterwards" in w for w in info(r)["warnings"])


# ---- /skip --------------------------------------------------------------------------------------------------


def test_skip_leaves_the_current_iteration_and_goes_on(server):
    with server.client() as c:
        assert c.post("/sdapi/v1/skip").status_code == 200  # nothing running: nothing to do
        result = {}
        body = {**SMALL, "steps": 150, "n_iter": 3}
        worker = threading.Thread(target=lambda: result.update(r=c.post("/sdapi/v1/txt2img", json=body)))
        worker.start()
        with server.client() as watcher:
            deadline = time.monotonic() + 60
            while watcher.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
                assert time.monotonic() < deadline and worker.is_alive()
                time.sleep(0.01)
            assert watcher.post("/sdapi/v1/skip").status_code == 200
        worker.join(120)
        r = result["r"]
        assert r.status_code == 200, r.text
        meta = info(r)
        assert meta["interrupted"] is False and meta["all_seeds"] == [5, 6, 7]
        (note,) = [w for w in meta["warnings"] if w.startswith("skipped")]
        assert "its 1 image(s) are that step's prediction, not finished" in note  # A1111 sends it half-denoised
        seeds = [int(t.split("Seed: ")[1].split(",")[0]) for t in meta["infotexts"]]
        assert seeds == [5, 6, 7] and len(r.json()["images"]) == 3


def test_run_plan_skip_moves_to_the_next_iteration():
    """The same without timing: iteration 2 of 3 is skipped at its step 2."""
    from fastsd.serve.generation import Plan, run_plan
    from fastsd.serve.jobqueue import Job
    from fastsd.serve.networks import Networks
    from fastsd.serve.vaes import Vaes
    from fastsd.serve.registry import ModelEntry

    job = Job("txt2img", None, steps=3, iterations=3)

    class Pipe:  # Pipeline.generate's contract: on_interrupt="decode" gives the images at the step left
        vae_name = None  # (the model's own VAE: for the answer's sd_vae_name / sd_vae_hash)
        config = TINY  # (a 4-channel model: info.is_using_inpainting_conditioning)

        def vae_hash(self):
            return None

        def generate(self, seed, on_step, on_interrupt, **kw):
            assert on_interrupt == "decode"
            im = Image.new("RGB", (8, 8))
            for step in (1, 2, 3):
                job.skipped |= seed == 11 and step == 2  # /skip arrives
                try:
                    on_step(step, 3, None)
                except Interrupted:
                    im.info["parameters"] = f"Seed: {seed}, half"
                    return [im]
            im.info["parameters"] = f"Seed: {seed}"
            return [im]

    s = GenerationSettings("x", seed=10, width=8, height=8)
    plan = Plan("txt2img", ModelEntry("m", "m", None, Pipe()), s, 3, None, None, (), (), True, {})
    out = run_plan(plan, job, Networks(None, None), Vaes(None))
    meta = json.loads(out["info"])
    assert meta["infotexts"] == ["Seed: 10", "Seed: 11, half", "Seed: 12"] and meta["interrupted"] is False
    assert meta["version"] == "fastsd" and meta["is_using_inpainting_conditioning"] is False
    assert meta["warnings"] == ["skipped at step 2 of iteration 2; its 1 image(s) are that step's prediction, "
                                "not finished"]
    assert not job.halted  # the worker counts the job as finished, not interrupted




def test_run_plan_of_a_job_whose_client_left_decodes_nothing(monkeypatch):
    """A1111 decodes what an interrupted job reached; a job whose client has gone (or that the shutdown stops) has
    nobody to send it to: it stops at its next step without a VAE decode, and the worker counts it cancelled."""
    import fastsd
    from fastsd.serve.generation import Plan, run_plan
    from fastsd.serve.jobqueue import Cancelled, Job, JobQueue
    from fastsd.serve.networks import Networks
    from fastsd.serve.vaes import Vaes
    from fastsd.serve.registry import ModelEntry

    pipe = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    decodes = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k))
    s = GenerationSettings("x", seed=10, width=64, height=64, steps=4)
    plan = Plan("txt2img", ModelEntry("m", "m", None, pipe), s, 2, None, None, (), (), True, {})
    queue = JobQueue(max_queue=2)
    try:
        job = Job("txt2img", lambda j: run_plan(plan, j, Networks(None, None), Vaes(None)), steps=4, iterations=2)
        stepped = job.on_step

        def on_step(step, total, preview):
            if step == 2:
                queue.cancel(job)  # the client goes away while step 2 runs
            stepped(step, total, preview)

        job.on_step = on_step
        queue.submit(job)
        with pytest.raises(Cancelled, match="txt2img stopped at step 2"):
            job.future.result(timeout=60)
        queue.close()
        queue.join(timeout=10)
        assert decodes == [] and queue.counts["cancelled"] == 1 and queue.counts.get("finished", 0) == 0
        # an interrupted job (its client still there) gets that step's images, decoded once
        job = Job("txt2img", lambda j: run_plan(plan, j, Networks(None, None), Vaes(None)), steps=4, iterations=2)
        job.interrupted = True
        assert len(run_plan(plan, job, Networks(None, None), Vaes(None))["images"]) == 1 and decodes == [1]
    finally:
        queue.close()


# ---- /png-info -----------------------------------------------------------------------------------------------


def test_png_info_reads_the_infotext_as_a1111_and_refreshes_answer_null(server):
    with server.client() as c:
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "negative_prompt": "blurry, dark"})
        text = info(r)["infotexts"][0]
        got = c.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
        assert got["info"] == text and got["items"] == {}
        params = got["parameters"]
        assert params["Prompt"] == "a cat" and params["Negative prompt"] == "blurry, dark"
        assert (params["Seed"], params["Steps"], params["Size-1"], params["Size-2"]) == ("5", "1", "64", "64")
        assert "Size" not in params and params["RNG"] == "CPU" and "Emphasis" not in params

        exif = Image.Exif()  # a JPEG as A1111 writes one: the infotext in EXIF UserComment, UTF-16 big-endian
        exif[0x8769] = {0x9286: b"UNICODE\0" + "a dog\nSteps: 4, Sampler: Euler, Seed: 9, Size: 8x16".encode("utf-16-be")}
        buf = io.BytesIO()
        Image.new("RGB", (8, 16)).save(buf, "JPEG", exif=exif)
        got = c.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
        assert got["info"] == "a dog\nSteps: 4, Sampler: Euler, Seed: 9, Size: 8x16"
        assert got["parameters"] == {"Steps": "4", "Sampler": "Euler", "Seed": "9", "Size-1": "8", "Size-2": "16",
                                     "Prompt": "a dog", "Negative prompt": "", **PNG_INFO_DEFAULTS}
        assert PNG_INFO_DEFAULTS["Clip skip"] == "1" and PNG_INFO_DEFAULTS["RNG"] == "GPU"  # (A1111's, as text)

        odd = PngImagePlugin.PngInfo()  # escapes JSON can't read, or can read but not send: 200, kept as text
        odd.add_text("parameters", 'a cat\nSteps: 2, Sampler: "a\\qb", Model: "\\ud800x", Seed: 3')
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=odd)
        r = c.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["Sampler"] == '"a\\qb"' and r.json()["parameters"]["Model"].endswith("x")

        got = c.post("/sdapi/v1/png-info", json={"image": b64_image("PNG")}).json()  # no infotext: A1111's defaults
        empty = {"Prompt": "", "Negative prompt": "", **PNG_INFO_DEFAULTS}
        assert got == {"info": "", "items": {}, "parameters": empty}
        odd = PngImagePlugin.PngInfo()  # a weighted prompt: A1111 adds "Emphasis: Original"; a hires size split
        odd.add_text("parameters", "a (cat:1.2)\nSteps: 2, Seed: 3, Hires resize: 96x128, Clip skip: 2")
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=odd)
        params = c.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()[
            "parameters"]
        assert (params["Emphasis"], params["Hires resize-1"], params["Hires resize-2"], params["Clip skip"]) == \
            ("Original", "96", "128", "2") and "Hires resize" not in params
        huge = PngImagePlugin.PngInfo()  # a weight no float holds: fastsd refuses it in a prompt, /png-info answers
        huge.add_text("parameters", "a (cat:" + "9" * 400 + ")\nSteps: 2, Seed: 3, Size: 8x8")
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=huge)
        r = c.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
        assert r.status_code == 200 and r.json()["parameters"]["Emphasis"] == "Original"
        for route in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):  # nothing to rescan: null, as A1111
            r = c.post(f"/sdapi/v1/{route}")
            assert r.status_code == 200 and r.json() is None
        r = c.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})
        assert r.status_code == 422 and r.json()["detail"] == "image is not a readable image (not PNG, JPEG, WEBP, " \
            "GIF or BMP)"


# ---- init images: the formats clients send, nothing else reaches PIL ----------------------------------------


def b64_image(fmt: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 10, 10)).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_init_images_in_the_formats_clients_send(fmt):
    from fastsd.serve.limits import Limits

    im = Limits().decode_image(b64_image(fmt), "init_images[0]")
    assert im.size == (16, 8) and im.convert("RGB").getpixel((3, 3))[0] > 150


def test_other_formats_are_refused_by_name_and_never_parsed(monkeypatch):
    from PIL import EpsImagePlugin

    from fastsd.serve.limits import BadRequest, Limits

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("the EPS plugin ran"))
    eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n").decode()
    for data, fmt in ((eps, "EPS"), (b64_image("TIFF"), "TIFF"), (b64_image("PPM"), "PPM")):
        with pytest.raises(BadRequest) as e:
            Limits().decode_image(data, "init_images[0]")
        assert str(e.value) == (f"init_images[0]: {fmt} images are not read by this server; send PNG, JPEG, WEBP, "
                                "GIF or BMP") and e.value.status == 422


def test_max_size_above_4096_lifts_the_pipelines_limit_as_allow_large():
    s = Server(["--model", "random:tiny", "--max-size", "4104"])
    try:
        with s.client() as c:
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "width": 4104})
            assert r.status_code == 200, r.text
            with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) as im:
                assert im.size == (4104, 64)
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "width": 4112})
            assert r.status_code == 422 and r.json()["detail"] == \
                "width 4112 is above this server's limit of 4104 px (--max-size)", r.text
    finally:
        s.stop()


def test_img2img_takes_a_jpeg_and_refuses_a_tiff(server):
    with server.client() as c:
        r = c.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_image("JPEG")], "steps": 2})
        assert r.status_code == 200 and decode(r.json()["images"][0]).size == (64, 64), r.text
        r = c.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_image("TIFF")], "steps": 2})
        assert r.status_code == 422 and "TIFF images are not read" in r.json()["detail"]


@pytest.mark.parametrize("name, scheduler, want, warned", [
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras", False), ("DPM++ 2M SDE", "Karras", "dpmpp_2m_sde_karras", False),
    ("DPM++ 2M SDE Karras", None, "dpmpp_2m_sde_karras", False), ("Heun", "", "heun", False),
    ("Euler", "Karras", "euler_karras", False), ("Heun", "Karras", "heun_karras", False),
    ("LMS", "Karras", "lms_karras", False), ("DPM2", "Karras", ("dpm2", "karras"), False),  # (DPM2, DPM2 a, 3M SDE:
    ("DPM2 a", "Karras", ("dpm2_a", "karras"), False), ("DPM++ 2S a", "Karras", "dpmpp_2s_a_karras", False),  # A1111's
    ("UniPC", "Karras", "unipc_karras", False), ("DPM2 Karras", "Karras", ("dpm2", "karras"), False),  # discard on
    ("DPM++ 3M SDE", "Karras", ("dpmpp_3m_sde", "karras"), False),  # the Karras type, not the twins' schedules)
    # other schedule types (and Karras where fastsd has no Karras twin) run as GenerationSettings.schedule_type
    ("Euler", "Exponential", ("euler", "exponential"), False), ("Euler a", "Karras", ("euler_a", "karras"), False),
    ("DPM++ 2M", "Align Your Steps", ("dpmpp_2m", "align_your_steps"), False),
    ("LCM", "SGMUniform", ("lcm", "sgm_uniform"), False), ("DPM++ 2M", "Uniform", ("dpmpp_2m", "uniform"), False),
    # A1111 1.9+'s Automatic (or none): the sampler's default schedule
    ("DPM++ 2M", "", "dpmpp_2m_karras", False), ("DPM++ 2S a", "Automatic", "dpmpp_2s_a_karras", False),
    ("DPM++ 2M SDE", None, ("dpmpp_2m_sde", "exponential"), False), ("Euler a", None, "euler_a", False),
    ("DPM2", None, ("dpm2", "karras"), False), ("DPM2 a", "Automatic", ("dpm2_a", "karras"), False),
    # its API: a scheduler given wins over a joint name's schedule ("Automatic" too: the sampler's default then)
    ("DPM++ 2M Karras", "Exponential", ("dpmpp_2m", "exponential"), False),
    ("DPM++ 2M SDE Karras", "Automatic", ("dpmpp_2m_sde", "exponential"), False),
    ("Euler Karras", "Automatic", "euler", False), ("k_dpmpp_2m_ka", None, "dpmpp_2m_karras", False),
    # old joint names with any schedule, split as A1111's get_sampler_and_scheduler
    ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential"), False),
    ("Euler a Karras", None, ("euler_a", "karras"), False), ("Euler Align Your Steps", "", ("euler", "align_your_steps"), False),
    ("DDIM", "Karras", "ddim", True), ("Euler", "Karras Exponential", "euler", True),
])
def test_a1111_sampler_and_scheduler_fields(name, scheduler, want, warned):
    """A1111 1.9+ sends the schedule apart ("DPM++ 2M SDE" + "Karras"); older clients send the joint name."""
    from types import SimpleNamespace

    from fastsd.serve.generation import _sampler

    warnings = []
    want = want if isinstance(want, tuple) else (want, "automatic")
    assert _sampler(SimpleNamespace(sampler_name=name, sampler_index=None, scheduler=scheduler), warnings) == want
    assert bool(warnings) == warned
