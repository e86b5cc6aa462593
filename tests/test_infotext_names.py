"""A1111 1.9+'s sampler + "Schedule type" in the infotexts fastsd writes, on every path (Pipeline / CLI, CLI
--infotext, the server's txt2img / img2img / infotext field, batch jobs, the hires fix), as A1111 1.10 writes them
(its create_infotext: "Sampler" without a schedule, "Schedule type" the schedule's label, "Automatic" where the
sampler has no schedule of its own), read back to the same run; old joint names ("DPM++ 2M Karras") read; unknown
names one line (CLI) or a 4xx / a warning where A1111 falls back (server)."""
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from serve_server import info, main_server, png_b64

from fastsd.a1111 import sampler_fields, sampler_keys, sampler_label
from fastsd.generate import main
from fastsd.image import format_infotext, parse_infotext
from fastsd.infotext_settings import InfotextError, settings_from_infotext
from fastsd.load import load_pipeline
from fastsd.samplers import SAMPLERS, get_sampler
from fastsd.schedule_types import split_joint
from fastsd.settings import GenerationSettings

TINY = ["--model", "random:tiny", "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
KEYS = ("Sampler", "Schedule type", "Hires sampler", "Hires schedule type")


def fields(text: str) -> dict:
    return {k: v for k, v in parse_infotext(text)[2].items() if k in KEYS}


def png_text(path) -> tuple[str, list]:
    with Image.open(path) as im:
        return im.text["parameters"], np.asarray(im.convert("RGB")).tolist()


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("random:tiny", device="cpu", dtype=torch.float32)


# ---- what is written, per sampler -----------------------------------------------------------------------------

# (fastsd's sampler or A1111's name, schedule type) -> ("Sampler", "Schedule type") as A1111 1.10 writes that run
A1111_WRITES = [
    (("Euler", "automatic"), ("Euler", "Automatic")),
    (("Euler a", "automatic"), ("Euler a", "Automatic")),
    (("LMS", "automatic"), ("LMS", "Automatic")),
    (("Heun", "automatic"), ("Heun", "Automatic")),
    (("DPM fast", "automatic"), ("DPM fast", "Automatic")),
    (("DPM adaptive", "automatic"), ("DPM adaptive", "Automatic")),
    (("DDIM", "automatic"), ("DDIM", "Automatic")),  # (timestep samplers: p.scheduler, "Automatic", as it is)
    (("DDIM CFG++", "automatic"), ("DDIM CFG++", "Automatic")),
    (("PLMS", "automatic"), ("PLMS", "Automatic")),
    (("UniPC", "automatic"), ("UniPC", "Automatic")),
    (("LCM", "automatic"), ("LCM", "Automatic")),
    (("Restart", "automatic"), ("Restart", "Karras")),  # A1111's Automatic for it: Karras (also fastsd's own)
    (("DPM++ 2M Karras", "automatic"), ("DPM++ 2M", "Karras")),  # the pre-1.9 twins: split
    (("dpmpp_2m_karras", "automatic"), ("DPM++ 2M", "Karras")),
    (("DPM++ 2M", "Karras"), ("DPM++ 2M", "Karras")),
    (("DPM++ SDE Karras", "automatic"), ("DPM++ SDE", "Karras")),
    (("DPM++ 2S a Karras", "automatic"), ("DPM++ 2S a", "Karras")),
    (("DPM++ 2M SDE Karras", "automatic"), ("DPM++ 2M SDE", "Karras")),
    (("DPM++ 2M SDE Heun Karras", "automatic"), ("DPM++ 2M SDE Heun", "Karras")),
    (("Euler Karras", "automatic"), ("Euler", "Karras")),
    (("LMS Karras", "automatic"), ("LMS", "Karras")),
    (("DPM++ 2M SDE", "Exponential"), ("DPM++ 2M SDE", "Exponential")),
    (("DPM2", "Karras"), ("DPM2", "Karras")),  # (A1111's DPM2: its next-to-last level dropped)
    (("DPM2 a", "Karras"), ("DPM2 a", "Karras")),
    (("DPM++ 3M SDE", "Exponential"), ("DPM++ 3M SDE", "Exponential")),
    (("Euler a", "sgm_uniform"), ("Euler a", "SGM Uniform")),
    (("DPM++ 2M", "KL Optimal"), ("DPM++ 2M", "KL Optimal")),
    (("Euler", "Align Your Steps"), ("Euler", "Align Your Steps")),
    (("Euler", "Polyexponential"), ("Euler", "Polyexponential")),
    (("Euler", "Simple"), ("Euler", "Simple")),
    (("Euler", "Normal"), ("Euler", "Normal")),
    (("Euler", "DDIM"), ("Euler", "DDIM")),
    (("Euler", "Uniform"), ("Euler", "Uniform")),
    (("Heun", "Beta"), ("Heun", "Beta")),
]


@pytest.mark.parametrize("given, want", A1111_WRITES)
def test_sampler_and_schedule_type_as_a1111_1_10_writes_them(given, want):
    name, kind = given
    assert sampler_keys(get_sampler(name).name, kind) == want
    assert sampler_label(name) == want[0]  # (the server's info "sampler_name": A1111's p.sampler_name)


def test_runs_a1111_has_no_name_for_keep_fastsds_convention():
    """fastsd's own schedule of a sampler whose A1111 Automatic is another (plain dpmpp_2m: its diffusers twin's
    levels): no "Schedule type", which fastsd reads as that own schedule; DPM2 Karras's twin: fastsd's name."""
    assert sampler_keys("dpmpp_2m", "automatic") == ("DPM++ 2M", None)
    assert sampler_keys("dpmpp_2m_sde", "automatic") == ("DPM++ 2M SDE", None)
    assert sampler_keys("dpm2_karras", "automatic") == ("dpm2_karras", None)
    for text, sampler in (("Sampler: DPM++ 2M", "dpmpp_2m"), ("Sampler: dpm2_karras", "dpm2_karras")):
        kw, warnings = settings_from_infotext(f"a\nSteps: 2, {text}, Seed: 1, Size: 64x64")
        assert (kw["sampler"], kw.get("schedule_type", "automatic"), warnings) == (sampler, "automatic", [])


def _run(pipe, sampler, kind, cache={}):
    key = (sampler, kind)
    if key not in cache:
        s = pipe.schedule(sampler, 4, kind)
        cache[key] = (SAMPLERS[sampler].fn, s.sigmas.tolist(), s.timesteps.tolist())
    return cache[key]


KINDS = ("automatic", "karras", "exponential", "sgm_uniform", "simple")
FIRST = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "dpm2", "dpm2_karras", "ddim", "unipc",
         "restart", "dpm_fast", "lms_karras")


def test_every_run_reads_back_to_itself(pipe):
    """sampler_fields' keys (first pass, and a hires pass of every sampler on every type) read back by --infotext's
    reader to the same sampler function and noise levels for both passes, with no warning."""
    checked = 0
    for (c1, t1), c2, t2 in itertools.product(itertools.product(FIRST, KINDS), SAMPLERS, (None, *KINDS)):
        s = GenerationSettings(prompt="a", steps=4, width=64, height=64, seed=1, sampler=c1, schedule_type=t1,
                               hires_scale=2.0, hires_sampler=c2, hires_schedule_type=t2)
        try:
            s.validate()
        except ValueError:
            continue
        keys = sampler_fields(c1, t1, c2, t2)
        text = format_infotext("a", "", {"Steps": 4, **{k: v for k, v in keys.items() if not k.startswith("H")},
                                         "Seed": 1, "Size": "64x64", "Denoising strength": 0.5, "Hires upscale": 2,
                                         **{k: v for k, v in keys.items() if k.startswith("H")}})
        kw, warnings = settings_from_infotext(text)
        r = GenerationSettings(**{"steps": 4, **kw})
        first, second = get_sampler(r.sampler).name, get_sampler(r.hires_sampler or r.sampler).name
        assert warnings == [], (c1, t1, c2, t2, text)
        assert _run(pipe, first, r.schedule_type) == _run(pipe, c1, t1), (c1, t1, c2, t2, text)
        assert _run(pipe, second, r.hires_schedule()) == _run(pipe, c2, s.hires_schedule()), (c1, t1, c2, t2, text)
        checked += 1
    assert checked > 1000


def test_hires_keys_as_a1111_writes_them():
    assert sampler_fields("euler", "automatic", "dpmpp_2m_karras") == {
        "Sampler": "Euler", "Schedule type": "Automatic", "Hires sampler": "DPM++ 2M", "Hires schedule type": "Karras"}
    assert sampler_fields("dpmpp_2m_karras", "automatic", "dpmpp_2m", "karras") == {
        "Sampler": "DPM++ 2M", "Schedule type": "Karras", "Hires sampler": None, "Hires schedule type": None}
    assert sampler_fields("dpmpp_2m_karras", "automatic", "euler_karras") == {
        "Sampler": "DPM++ 2M", "Schedule type": "Karras", "Hires sampler": "Euler", "Hires schedule type": None}
    assert sampler_fields("euler", "karras", "euler", "exponential") == {
        "Sampler": "Euler", "Schedule type": "Karras", "Hires sampler": None, "Hires schedule type": "Exponential"}
    # a second pass on a schedule with no A1111 label: the first pass as no label (Automatic) or its joint name reads
    assert sampler_fields("euler", "automatic", "dpmpp_2m") == {
        "Sampler": "Euler", "Schedule type": None, "Hires sampler": "DPM++ 2M", "Hires schedule type": None}
    assert sampler_fields("euler", "sgm_uniform", "dpmpp_2m", "automatic") == {
        "Sampler": "Euler SGM Uniform", "Schedule type": None, "Hires sampler": "DPM++ 2M", "Hires schedule type": None}
    assert split_joint("Euler SGM Uniform") == ("Euler", "SGM Uniform")  # (the longest label, not " Uniform")


# ---- the command line --------------------------------------------------------------------------------------


def test_cli_writes_split_names_and_infotext_reads_them_back(tmp_path, capsys):
    """python -m fastsd.generate: the old twin name and the 1.9+ pair both written "Sampler: DPM++ 2M, Schedule type:
    Karras"; --infotext of that PNG (and of A1111's own text, 1.9+ or old) makes the same image and writes the same
    keys (the bug: it wrote "Sampler: DPM++ 2M Karras")."""
    old, new, plain = tmp_path / "old.png", tmp_path / "new.png", tmp_path / "plain.png"
    assert main(["a cat", *TINY, "--seed", "3", "--sampler", "DPM++ 2M Karras", "--out", str(old)]) == 0
    assert main(["a cat", *TINY, "--seed", "3", "--sampler", "DPM++ 2M", "--schedule-type", "Karras",
                 "--out", str(new)]) == 0
    assert main(["a cat", *TINY, "--seed", "3", "--sampler", "euler", "--out", str(plain)]) == 0
    (old_text, old_px), (new_text, new_px) = png_text(old), png_text(new)
    assert fields(old_text) == fields(new_text) == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}
    assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale" in old_text and old_px == new_px
    assert fields(png_text(plain)[0]) == {"Sampler": "Euler", "Schedule type": "Automatic"}

    again = tmp_path / "again.png"
    assert main(["--infotext", str(new), "--model", "random:tiny", "--no-progress", "--out", str(again)]) == 0
    again_text, again_px = png_text(again)
    assert fields(again_text) == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"} and again_px == new_px
    for i, params in enumerate(["Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: DPM++ 2M Karras",
                                "Sampler: DPM++ 2M, Schedule type: Automatic"]):  # 1.10, before 1.9, 1.9+ Automatic
        src, out = tmp_path / f"a{i}.txt", tmp_path / f"a{i}.png"
        src.write_text(new_text.replace("Sampler: DPM++ 2M, Schedule type: Karras", params) + ", Version: v1.10.1")
        assert main(["--infotext", str(src), "--model", "random:tiny", "--no-progress", "--out", str(out)]) == 0
        text, px = png_text(out)
        assert fields(text) == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"} and px == new_px, params
    capsys.readouterr()


def test_cli_old_dpm2_karras_and_the_hires_pass(tmp_path):
    """"DPM2 a Karras" (A1111's, before 1.9) runs A1111's DPM2 a on Karras: written split; a hires pass's sampler
    and schedule split as A1111 1.9+ ("Hires sampler: DPM++ 2M, Hires schedule type: Karras"), read back by
    --infotext to the same image and keys."""
    src, out = tmp_path / "old.txt", tmp_path / "old.png"
    src.write_text("a cat\nSteps: 2, Sampler: DPM2 a Karras, CFG scale: 7, Seed: 4, Size: 32x32")
    assert main(["--infotext", str(src), "--model", "random:tiny", "--no-progress", "--out", str(out)]) == 0
    assert fields(png_text(out)[0]) == {"Sampler": "DPM2 a", "Schedule type": "Karras"}

    hires, again = tmp_path / "hires.png", tmp_path / "again.png"
    assert main(["a cat", *TINY, "--seed", "4", "--sampler", "Euler", "--hires-scale", "1.5", "--hires-steps", "1",
                 "--hires-sampler", "DPM++ 2M Karras", "--out", str(hires)]) == 0
    text, px = png_text(hires)
    assert fields(text) == {"Sampler": "Euler", "Schedule type": "Automatic", "Hires sampler": "DPM++ 2M",
                            "Hires schedule type": "Karras"}
    assert main(["--infotext", str(hires), "--model", "random:tiny", "--no-progress", "--out", str(again)]) == 0
    assert png_text(again) == (text, px)


def test_cli_unknown_names_are_one_line(tmp_path, capsys):
    for args, match in [(["--sampler", "DPM++ 4M"], "unknown sampler 'DPM++ 4M'; valid names: euler, euler_a"),
                        (["--sampler", "DPM++ 2M Turbo"], "unknown sampler 'DPM++ 2M Turbo'; valid names:"),
                        (["--schedule-type", "Turbo"], "unknown schedule type 'Turbo'; valid: Automatic, Uniform, "
                                                       "Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, "
                                                       "Align Your Steps, Simple, Normal, DDIM, Beta"),
                        (["--sampler", "DDIM", "--schedule-type", "Karras"], "schedule type 'Karras' does not apply "
                                                                             "to ddim")]:
        out = tmp_path / "x.png"
        assert main(["a cat", *TINY, "--out", str(out), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
        assert not out.exists()
    src = tmp_path / "bad.txt"
    src.write_text("a cat\nSteps: 2, Sampler: DPM++ 4M Karras, Seed: 1, Size: 32x32")
    assert main(["--infotext", str(src), "--model", "random:tiny", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'Sampler: DPM++ 4M Karras': unknown sampler 'DPM++ 4M'" in err, err
    with pytest.raises(InfotextError, match="unknown sampler 'UniPC 2'"):
        settings_from_infotext("a\nSteps: 2, Sampler: UniPC 2, Seed: 1, Size: 32x32")
    # a schedule type A1111 doesn't know: A1111 falls back to Automatic (a logged warning), so does --infotext
    kw, warnings = settings_from_infotext("a\nSteps: 2, Sampler: Euler, Schedule type: Turbo, Seed: 1, Size: 32x32")
    assert (kw["sampler"], kw["schedule_type"]) == ("euler", "automatic")
    assert warnings == ["Schedule type: unknown schedule type 'Turbo'; valid: Automatic, Uniform, Karras, Exponential, "
                        "Polyexponential, SGM Uniform, KL Optimal, Align Your Steps, Simple, Normal, DDIM, Beta; the "
                        "sampler's own schedule was used"]


# ---- the server ----------------------------------------------------------------------------------------------

SMALL = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 11}


@pytest.fixture(scope="module")
def client():
    with main_server().client() as c:
        yield c


def _post(client, body, endpoint="txt2img"):
    r = client.post(f"/sdapi/v1/{endpoint}", json=body)
    assert r.status_code == 200, r.text
    meta = info(r)
    return fields(meta["infotexts"][0]), meta, r.json()["images"][0]


@pytest.mark.parametrize("request_fields, want", [
    ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, ("DPM++ 2M", "Karras")),
    ({"sampler_name": "DPM++ 2M Karras"}, ("DPM++ 2M", "Karras")),  # the old twin name (A1111's API splits it)
    ({"sampler_name": "DPM++ 2M"}, ("DPM++ 2M", "Karras")),  # no scheduler: Automatic, DPM++ 2M's Karras
    ({"sampler_name": "DPM++ 2M", "scheduler": "Automatic"}, ("DPM++ 2M", "Karras")),
    ({"sampler_name": "DPM++ 2M SDE"}, ("DPM++ 2M SDE", "Exponential")),
    ({"sampler_name": "Euler a"}, ("Euler a", "Automatic")),
    ({}, ("Euler", "Automatic")),  # (sampler_index's default, "Euler")
    ({"sampler_name": "DDIM"}, ("DDIM", "Automatic")),
    ({"sampler_name": "UniPC", "scheduler": "automatic"}, ("UniPC", "Automatic")),
    ({"sampler_name": "k_euler", "scheduler": "sgm_uniform"}, ("Euler", "SGM Uniform")),
    ({"sampler_name": "Euler", "scheduler": "SGMUniform"}, ("Euler", "SGM Uniform")),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"}, ("DPM++ 2M", "Exponential")),  # (API: wins)
])
def test_server_txt2img_writes_split_names(client, request_fields, want):
    got, meta, _ = _post(client, {**SMALL, **request_fields})
    assert (got.get("Sampler"), got.get("Schedule type")) == want and meta["warnings"] == []
    assert meta["sampler_name"] == want[0]


def test_server_same_image_for_old_and_new_names_and_infotext(client):
    a = _post(client, {**SMALL, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    b = _post(client, {**SMALL, "sampler_name": "DPM++ 2M Karras"})
    assert a[2] == b[2]
    text = a[1]["infotexts"][0]
    c = _post(client, {"infotext": text})  # A1111's infotext field: the same run, the same keys
    assert c[0] == a[0] == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"} and c[2] == a[2]
    d = _post(client, {"infotext": text.replace("DPM++ 2M, Schedule type: Karras", "DPM++ 2M Karras")})
    assert d[0] == a[0] and d[2] == a[2]
    png = client.post("/sdapi/v1/png-info", json={"image": a[2]}).json()
    assert png["parameters"]["Sampler"] == "DPM++ 2M" and png["parameters"]["Schedule type"] == "Karras"


def test_server_img2img_and_hires(client):
    init = png_b64(Image.new("RGB", (64, 64), (30, 120, 200)))
    got, meta, _ = _post(client, {**SMALL, "init_images": [init], "denoising_strength": 0.5,
                                  "sampler_name": "DPM++ SDE Karras"}, "img2img")
    assert got == {"Sampler": "DPM++ SDE", "Schedule type": "Karras"} and meta["warnings"] == []
    got, meta, _ = _post(client, {**SMALL, "init_images": [init], "denoising_strength": 0.5,
                                  "sampler_name": "Euler", "scheduler": "Exponential"}, "img2img")
    assert got == {"Sampler": "Euler", "Schedule type": "Exponential"}
    hires = {**SMALL, "steps": 1, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1}
    got, meta, image = _post(client, {**hires, "sampler_name": "Euler", "hr_sampler_name": "DPM++ 2M Karras"})
    assert got == {"Sampler": "Euler", "Schedule type": "Automatic", "Hires sampler": "DPM++ 2M",
                   "Hires schedule type": "Karras"} and meta["warnings"] == []
    again = _post(client, {"infotext": meta["infotexts"][0]})
    assert again[0] == got and again[2] == image
    got, meta, _ = _post(client, {**hires, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                                  "hr_sampler_name": "Euler a", "hr_scheduler": "Use same scheduler"})
    assert got == {"Sampler": "DPM++ 2M", "Schedule type": "Karras", "Hires sampler": "Euler a"}
    got, meta, _ = _post(client, {**hires, "sampler_name": "DPM++ 2M", "hr_scheduler": "Exponential"})
    assert got == {"Sampler": "DPM++ 2M", "Schedule type": "Karras", "Hires schedule type": "Exponential"}


def test_server_unknown_names(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "DPM++ 4M"})
    assert r.status_code == 422 and "sampler_name: unknown sampler 'DPM++ 4M'; valid names: euler" in r.text
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "DPM++ 4M Karras"})
    assert r.status_code == 422 and "unknown sampler 'DPM++ 4M'" in r.text
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "infotext": "a\nSteps: 2, Sampler: Nope, Seed: 1, Size: 64x64"})
    assert r.status_code == 422 and "unknown sampler 'Nope'" in r.text
    # A1111 falls back (its "Sampler Scheduler autocorrection" warning) for an unknown scheduler or one its sampler
    # ignores: a warning, the sampler's own schedule, written "Automatic"
    got, meta, _ = _post(client, {**SMALL, "sampler_name": "Euler", "scheduler": "Turbo"})
    assert got == {"Sampler": "Euler", "Schedule type": "Automatic"}
    assert len(meta["warnings"]) == 1 and meta["warnings"][0].startswith("scheduler: unknown schedule type 'Turbo'; "
                                                                          "valid: Automatic, Uniform, Karras")
    got, meta, _ = _post(client, {**SMALL, "sampler_name": "DDIM", "scheduler": "Karras"})
    assert got == {"Sampler": "DDIM", "Schedule type": "Automatic"}
    assert json.dumps(meta["warnings"]) == json.dumps(["scheduler 'Karras': not supported with DDIM; the sampler's own "
                                                       "schedule was used"])


# ---- batch jobs ------------------------------------------------------------------------------------------------


def test_batch_jobs_write_split_names(tmp_path):
    from fastsd.batch import Defaults, run

    jobs = tmp_path / "j.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "a", "id": "old", "seed": 1, "sampler": "DPM++ 2M Karras"},
        {"prompt": "a", "id": "new", "seed": 1, "sampler_name": "DPM++ 2M", "scheduler": "Karras"},
        {"prompt": "a", "id": "euler", "seed": 1, "sampler": "Euler a"},
        {"prompt": "a", "id": "hires", "seed": 1, "sampler": "Euler", "hr_scale": 1.5, "hr_second_pass_steps": 1,
         "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras"}]))
    rows = run(str(jobs), out=str(tmp_path / "out"), defaults=Defaults(steps=1, width=32, height=32),
               model="random:tiny", threads=1, progress=False)
    assert [r["status"] for r in rows] == ["done"] * 4, rows
    got = {r["id"]: png_text(tmp_path / "out" / r["file"]) for r in rows}
    assert fields(got["old"][0]) == fields(got["new"][0]) == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}
    assert got["old"][1] == got["new"][1]
    assert fields(got["euler"][0]) == {"Sampler": "Euler a", "Schedule type": "Automatic"}
    assert fields(got["hires"][0]) == {"Sampler": "Euler", "Schedule type": "Automatic", "Hires sampler": "DPM++ 2M",
                                       "Hires schedule type": "Karras"}
