"""python -m fastsd.batch / fastsd.batch.run in this process: job files, resume, bad lines, batching that
never changes a PNG, and a SIGKILLed run resumed (tests/test_batch_ray.py: the same on Ray)."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import fastsd
from fastsd.batch import Defaults, run
from fastsd.batch.runner import load_jobs
from fastsd.batch.__main__ import main
from fastsd.batch.jobs import BadJob, Job, read_job_file, text_prompts
from fastsd.batch.worker import BatchWorker
from fastsd.image import parse_infotext, png_writer

TINY = dict(model="random:tiny", threads=1, progress=False)
SMALL = Defaults(steps=2, width=64, height=64)


def write(path, text):
    path.write_text(text)
    return str(path)


def manifest(folder):
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- job files --------------------------------------------------------------------------------------

def test_jsonl_csv_txt_defaults_ids_and_seeds(tmp_path):
    jsonl = write(tmp_path / "j.jsonl", '{"prompt": "a cat", "seed": 7, "cfg": 5, "sampler": "Euler a"}\n\n'
                  '{"prompt": "a dog", "id": "dog", "size": "64x128", "negative_prompt": "blur"}\n'
                  '{"prompt": "a cow", "seed": -1, "loras": ["x:0.5", {"name": "y"}]}\n')
    d = Defaults(steps=3, width=64, height=64, seed=100, sampler="ddim")
    a, b, c = read_job_file(jsonl, d)
    assert (a.line, b.line, c.line) == (1, 3, 4)
    assert a.settings.seed == 7 and a.settings.guidance_scale == 5.0 and a.settings.sampler == "euler_a"
    assert (b.id, b.file, b.settings.width, b.settings.height) == ("dog", "dog.png", 64, 128)
    assert b.settings.seed == 101 and c.settings.seed == 102  # --seed + record index; A1111's -1 = not given
    assert b.settings.negative_prompt == "blur" and b.settings.steps == 3 and b.settings.sampler == "ddim"
    assert c.loras == (("x", 0.5), ("y", 1.0))
    tagged = read_job_file(write(tmp_path / "t.jsonl", '{"prompt": "a <lora:z:0.3> cat", "loras": ["x"]}\n'), d)[0]
    assert tagged.loras == (("x", 1.0), ("z", 0.3)) and tagged.settings.prompt == "a <lora:z:0.3> cat"
    pair = read_job_file(write(tmp_path / "p.jsonl", '{"prompt": "a <lora:z:1:0.5> cat", '
                               '"loras": ["x:0.2:0.4", "w:1:1"]}\n'), d)[0]  # A1111's TE:UNET weights, tag and field
    assert pair.loras == (("x", (0.2, 0.4)), ("w", 1.0), ("z", (1.0, 0.5)))
    assert pair.manifest_settings()["loras"] == ["x:0.2:0.4", "w:1", "z:1:0.5"]
    assert text_prompts(tagged) == ("a  cat", "")  # what the text encoder sees (as fastsd.serve)
    assert a.id.startswith("00001-") and read_job_file(jsonl, d)[0].id == a.id  # stable
    assert read_job_file(jsonl, Defaults(steps=4, width=64, height=64))[0].id != a.id  # defaults are content
    csv = write(tmp_path / "j.csv", 'prompt,steps,cfg\n"a cat, sitting",4,\n"two\nlines",,3.5\n')
    e, f = read_job_file(csv, d)
    assert (e.settings.prompt, e.settings.steps, e.settings.guidance_scale) == ("a cat, sitting", 4, 7.5)
    assert (f.line, f.settings.prompt, f.settings.steps, f.settings.guidance_scale) == (3, "two\nlines", 3, 3.5)
    txt = write(tmp_path / "j.txt", "# prompts\na cat\n\na cat\n")
    g, h = read_job_file(txt, Defaults())
    assert (g.line, h.line) == (2, 4) and g.id != h.id  # same prompt, other line: another job
    assert g.settings.seed != h.settings.seed and (g.settings.width, g.settings.height) == (512, 512)


def test_every_settings_option_is_a_job_default():
    """The CLI adds one option per GenerationSettings field (fastsd.generate's builder): each must reach the
    jobs through Defaults, or a new field would be an option that silently does nothing; and each is a job field
    too (the hires fix, the variation seed and seed resize included)."""
    import dataclasses

    from fastsd.batch.__main__ import build_parser
    from fastsd.batch.jobs import FIELDS as JOB_FIELDS
    from fastsd.settings import FIELDS

    from fastsd.batch.jobs import IMG2IMG

    per_job = {f.name for f in dataclasses.fields(Defaults)} - {"loras", "styles"} - set(IMG2IMG)
    assert per_job == set(FIELDS) - {"prompt", "num_images"}
    assert per_job <= set(vars(build_parser().parse_args(["j.txt", "--out", "o"])))
    assert per_job | {"prompt"} | set(IMG2IMG) <= set(JOB_FIELDS.values())


def test_bad_lines_become_failed_jobs_with_line_and_reason(tmp_path):
    path = write(tmp_path / "bad.jsonl", "\n".join([
        '{"prompt": "ok", "id": "a"}', 'not json', '{"prompt": "x", "sampler": "heun++"}',
        '{"prompt": "x", "width": -64}', '{"prompt": "x", "stpes": 3}', '{"prompt": "x", "id": "a"}',
        '["a list"]', '{"prompt": "x", "steps": "many"}', '{"prompt": "x", "id": "../up"}', '{"seed": 3}',
        '{"prompt": "x", "size": "64x64", "width": 32}', '{"prompt": "x", "loras": 5}']))
    jobs = read_job_file(path, SMALL)
    assert isinstance(jobs[0], Job)
    bad = {j.line: j.error for j in jobs[1:]}
    assert all(isinstance(j, BadJob) for j in jobs[1:])
    assert bad[2].startswith("invalid JSON")
    assert bad[3].startswith("unknown sampler 'heun++'")
    assert bad[4] == "width must be a positive multiple of 8, got -64"
    assert bad[5].startswith("unknown field 'stpes'")
    assert bad[6] == "duplicate id 'a' (first on line 1)"
    assert bad[7] == "a job line must be a JSON object, got list"
    assert bad[8] == "steps must be an integer, got 'many'"
    assert bad[9].startswith("id '../up' must be")
    assert bad[10] == "no prompt"
    assert bad[11] == "size '64x64' contradicts width 32"
    assert bad[12].startswith("loras must be a list")
    assert len({j.id for j in jobs}) == len(jobs) and all("\n" not in e for e in bad.values())


# ---- local runs -------------------------------------------------------------------------------------

def test_run_writes_pngs_manifest_and_resumes(tmp_path, capsys):
    jobs = write(tmp_path / "jobs.jsonl", '{"prompt": "a cat", "seed": 1, "id": "cat"}\n'
                 '{"prompt": "a dog", "negative_prompt": "blur", "seed": 2}\nnot json\n'
                 '{"prompt": "a cow", "loras": ["no-such-lora"]}\n')
    out = str(tmp_path / "out")
    summary = {}
    rows = run(jobs, out=out, defaults=SMALL, summary=summary, **TINY)
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r["status"] for r in rows] == ["done", "done", "failed", "failed"]
    assert rows[2]["error"].startswith("invalid JSON") and "no-such-lora" in rows[3]["error"]
    assert summary["done"] == 2 and summary["failed"] == 2
    cat = rows[0]
    assert cat["file"] == "cat.png" and cat["seed"] == 1 and cat["settings"]["steps"] == 2
    with Image.open(os.path.join(out, "cat.png")) as im:
        assert im.size == (64, 64)
        prompt, neg, params = parse_infotext(im.text["parameters"])
    assert (prompt, params["Seed"], params["Steps"], params["Size"]) == ("a cat", "1", "2", "64x64")
    assert sorted(os.listdir(out)) == sorted([".fastsd-batch.lock", "manifest.jsonl", "cat.png", rows[1]["file"]])
    assert len(manifest(out)) == 4
    # the same PNG as Pipeline.generate gives for the job
    pipe = fastsd.load_pipeline("random:tiny")
    im = pipe.generate("a dog", negative_prompt="blur", seed=2, steps=2, width=64, height=64, progress=False)[0]
    buf = io.BytesIO()
    png_writer(im, im.info["parameters"])(buf)
    assert open(os.path.join(out, rows[1]["file"]), "rb").read() == buf.getvalue()

    mtime = os.stat(os.path.join(out, "cat.png")).st_mtime_ns
    again = {}
    assert run(jobs, out=out, defaults=SMALL, summary=again, **TINY) == rows  # resume: nothing to do
    assert again["done"] == again["failed"] == 0 and again["before"] == 4 and len(manifest(out)) == 4
    os.unlink(os.path.join(out, "cat.png"))  # listed but gone: made again
    run(jobs, out=out, defaults=SMALL, summary=again, **TINY)
    assert again["done"] == 1 and os.stat(os.path.join(out, "cat.png")).st_mtime_ns != mtime
    run(jobs, out=out, defaults=SMALL, summary=again, retry_failed=True, **TINY)
    assert again["done"] == 0 and again["failed"] == 2 and len(manifest(out)) == 7


def _png_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".png")}


def test_one_lora_set_for_every_job_is_merged_for_good(tmp_path, monkeypatch):
    """When every job of a run uses the same LoRA set, the worker merges it for good (no copy of the weights);
    with jobs that switch it keeps the originals; the PNGs are the same either way."""
    from fastsd.pipeline import Pipeline
    from fastsd.testing_lora import write_random_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    write_random_lora(str(folder / "ink.safetensors"), fastsd.load_pipeline("random:tiny", device="cpu"),
                      fmt="kohya_ldm", rank=4, seed=1)
    keeps, load_loras = [], Pipeline.load_loras

    def recording(self, items, *, keep_originals=True):
        keeps.append(keep_originals)
        return load_loras(self, items, keep_originals=keep_originals)

    monkeypatch.setattr(Pipeline, "load_loras", recording)
    inked = [{"prompt": "a cat", "seed": 1, "id": "a", "loras": ["ink:0.7"]},
             {"prompt": "a dog", "seed": 2, "id": "b", "loras": ["ink:0.7"]}]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert [r["status"] for r in run(inked, out=one, defaults=SMALL, lora_dir=str(folder), **TINY)] == ["done"] * 2
    assert keeps == [False]
    rows = run(inked + [{"prompt": "a cow", "seed": 3, "id": "c"}], out=two, defaults=SMALL, lora_dir=str(folder),
               **TINY)
    assert [r["status"] for r in rows] == ["done"] * 3 and keeps[0] is False and all(keeps[1:])
    for name in ("a.png", "b.png"):
        with Image.open(os.path.join(one, name)) as x, Image.open(os.path.join(two, name)) as y:
            assert x.tobytes() == y.tobytes() and x.text == y.text


def test_loras_by_a1111_alias(tmp_path):
    """A job names a LoRA by its A1111 alias (kohya's ss_output_name), in its loras field or a prompt tag: the PNG is
    the one naming its file stem, but for the infotext, which keeps the name the job used."""
    from fastsd.testing_lora import set_metadata, write_random_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    path = str(folder / "ink_v2.safetensors")
    write_random_lora(path, fastsd.load_pipeline("random:tiny", device="cpu"), fmt="kohya_ldm", rank=4, seed=1)
    set_metadata(path, {"ss_output_name": "ink"})
    jobs = [{"prompt": "a cat", "seed": 1, "id": "alias", "loras": ["ink:0.7"]},
            {"prompt": "a cat", "seed": 1, "id": "stem", "loras": ["ink_v2:0.7"]},
            {"prompt": "a cat <lora:ink:0.7>", "seed": 1, "id": "tag"}]
    out = str(tmp_path / "out")
    assert [r["status"] for r in run(jobs, out=out, defaults=SMALL, lora_dir=str(folder), **TINY)] == ["done"] * 3
    images = {}
    for name in ("alias", "stem", "tag"):
        with Image.open(os.path.join(out, f"{name}.png")) as im:
            images[name] = (im.tobytes(), parse_infotext(im.text["parameters"])[0])
    assert images["alias"][0] == images["stem"][0] == images["tag"][0]
    assert images["alias"][1] == images["tag"][1] == "a cat <lora:ink:0.7>"
    assert images["stem"][1] == "a cat <lora:ink_v2:0.7>"


def test_plan_batches_groups_compatible_jobs():
    """Same size, steps, sampler, cfg, clip skip, LoRAs and prompt chunk count (prompt or negative) share a
    batch, in the order of each group's first job, up to `batch` jobs; the groups of one LoRA set run together (at
    --batch 1 too: a file cycling through LoRA styles unloaded and merged weights at every job)."""
    from fastsd.batch.jobs import make_jobs, plan_batches, records_from_list
    from fastsd.tokenizer import Tokenizer

    long = "a red house and a tree, " * 20  # > 75 tokens: 2 chunks
    recs = [{"prompt": "a"}, {"prompt": "b", "size": "64x128"}, {"prompt": "c"}, {"prompt": long},
            {"prompt": "d", "negative_prompt": long}, {"prompt": "e", "cfg": 3}, {"prompt": "f", "loras": ["x"]},
            {"prompt": "g"}, {"prompt": "h", "sampler": "ddim"}, {"prompt": "i", "steps": 3}, {"prompt": "j"}]
    jobs = make_jobs(records_from_list(recs), SMALL)
    plan = [[j.settings.prompt[:1] for j in b] for b in plan_batches(jobs, 2, Tokenizer())]
    assert plan == [["a", "c"], ["g", "j"], ["b"], ["a", "d"], ["e"], ["h"], ["i"], ["f"]]
    assert plan_batches(jobs, 1, None) == [[j] for j in jobs if j.settings.prompt != "f"] + [[jobs[6]]]
    styles = make_jobs(records_from_list([{"prompt": p, "loras": [s]} for p in "abc" for s in ("x", "y", "z")]), SMALL)
    assert [b[0].loras[0][0] + b[0].settings.prompt for b in plan_batches(styles, 1, None)] == [
        "xa", "xb", "xc", "ya", "yb", "yc", "za", "zb", "zc"]


def test_batched_jobs_give_the_pngs_of_jobs_run_alone(tmp_path, capsys):
    """Compatible jobs share one UNet call; each PNG is byte-identical to the job run alone."""
    jobs = [{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "negative_prompt": "blur", "seed": 2},
            {"prompt": "a cow " * 40, "seed": 3}]
    alone, together = str(tmp_path / "alone"), str(tmp_path / "together")
    run(jobs, out=alone, defaults=SMALL, **TINY)
    capsys.readouterr()
    run(jobs, out=together, defaults=SMALL, batch=4, always_batch=True, **TINY)
    err = capsys.readouterr().err
    assert "2 jobs at 64x64 in one UNet call: identical to one at a time" in err and "-> batching" in err
    assert _png_bytes(alone) == _png_bytes(together) and len(_png_bytes(alone)) == 3
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k not in ("seconds", "finished")} for r in rows),
                                key=lambda r: r["id"])
    assert strip(manifest(alone)) == strip(manifest(together))


def test_batches_that_would_change_pixels_run_one_at_a_time(tmp_path, monkeypatch, capsys):
    """The probe compares batched rows with lone runs bit for bit: a batch path that differs (here made to
    differ on purpose) is not used, and the PNGs are still those of lone runs."""
    real = BatchWorker._latents

    def skewed(self, jobs, steps=None, sampler=None):
        x, t = real(self, jobs, steps, sampler)
        return (x + 1e-3 if len(jobs) > 1 else x), t

    jobs = [{"prompt": f"a cat {i}", "seed": i} for i in range(2)]
    run(jobs, out=str(tmp_path / "alone"), defaults=SMALL, **TINY)
    monkeypatch.setattr(BatchWorker, "_latents", skewed)
    run(jobs, out=str(tmp_path / "b"), defaults=SMALL, batch=2, always_batch=True, **TINY)
    assert "NOT identical to one at a time" in capsys.readouterr().err
    assert _png_bytes(str(tmp_path / "alone")) == _png_bytes(str(tmp_path / "b"))


# ---- the hires fix, variation seeds, seed resize -----------------------------------------------------

def write_tiny_upscaler(path) -> str:
    """A small random Real-ESRGAN compact model (4x) as a .safetensors file."""
    import torch
    from safetensors.torch import save_file

    from fastsd.config import CompactConfig
    from fastsd.models.compact import SRVGGNetCompact

    torch.manual_seed(0)
    model = SRVGGNetCompact(CompactConfig(features=8, convs=1))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory):
    """An upscaler folder: 4x-Tiny (write_tiny_upscaler) and broken (not an upscaler)."""
    folder = tmp_path_factory.mktemp("upscalers")
    write_tiny_upscaler(folder / "4x-Tiny.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\xff" * 100)
    return str(folder)


def _generated_png(pipe, **settings) -> bytes:
    """The PNG of Pipeline.generate's image, written as the batch runner writes one."""
    im = pipe.generate(**settings, progress=False)[0]
    buf = io.BytesIO()
    png_writer(im, im.info["parameters"])(buf)
    return buf.getvalue()


def test_hires_and_variation_jobs_are_generates_images_batched_or_not(tmp_path, upscalers, capsys, monkeypatch):
    """A hires job's PNG is Pipeline.generate's (and python -m fastsd.generate's) for the same settings, pixels and
    infotext, with a latent, an image (Lanczos) and a model upscaler (by its name in --upscaler-dir, named so in the
    infotext), also when its first pass shared a UNet call with another job's (--batch 2 --always-batch: the
    second pass runs per job). Jobs with a variation seed run alone: two with subseed 9 both get 9's noise (in one
    batch the second would get 10's); seed resize, with a subseed derived from the job, as generate's."""
    from fastsd.pipeline import Pipeline

    monkeypatch.delenv("FASTSD_UPSCALER_DIR", raising=False)
    second_passes, hires_pass = [], Pipeline.hires_pass

    def recording(self, s, x, seeds, *args, **kwargs):
        second_passes.append((x.shape[0], len(seeds)))
        return hires_pass(self, s, x, seeds, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "hires_pass", recording)
    records = [
        {"prompt": "a cat", "seed": 1, "id": "lat1", "hires_scale": 1.25},
        {"prompt": "a dog", "seed": 2, "id": "lat2", "hr_scale": 1.25, "negative_prompt": "blur"},
        {"prompt": "a cow", "seed": 3, "id": "lan1", "hires_scale": 1.25, "hires_upscaler": "Lanczos", "hires_steps": 1,
         "hires_prompt": "a big animal"},
        {"prompt": "a hen", "seed": 4, "id": "lan2", "hires_scale": 1.25, "hires_upscaler": "lanczos",
         "hires_steps": 1, "hires_prompt": "a big animal"},
        {"prompt": "an owl", "seed": 5, "id": "esr", "hr_resize_x": 96, "hr_resize_y": 80, "hr_upscaler": "4x-Tiny",
         "denoising_strength": 0.5},
        {"prompt": "a pig", "seed": 6, "id": "var1", "subseed": 9, "subseed_strength": 0.5},
        {"prompt": "a hen", "seed": 7, "id": "var2", "subseed": 9, "subseed_strength": 0.5},
        {"prompt": "a fox", "seed": 8, "id": "rsz", "seed_resize_from_w": 96, "seed_resize_from_h": 48,
         "subseed_strength": 0.3}]
    jobs = write(tmp_path / "jobs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "out")
    size = ["--steps", "2", "--width", "64", "--height", "64", "--threads", "1", "--no-progress"]
    assert main([jobs, "--model", "random:tiny", "--out", out, *size, "--batch", "2", "--always-batch",
                 "--upscaler-dir", upscalers]) == 0
    err = capsys.readouterr().err
    assert "2 jobs at 64x64 in one UNet call: identical to one at a time" in err and "-> batching" in err
    # (on the tiny model a batch of 2 often gives the same bits as 2 lone runs: that each second pass runs alone is
    # checked here, not only through the pixels)
    assert second_passes == [(1, 1)] * 5
    subseed = manifest(out)[-1]["settings"]["subseed"]  # rsz's, derived from its line and content
    assert isinstance(subseed, int)
    assert read_job_file(jobs, Defaults(steps=2, width=64, height=64))[-1].settings.subseed == subseed  # stable
    pipe = fastsd.load_pipeline("random:tiny")
    want = {"lat1": dict(prompt="a cat", seed=1, hires_scale=1.25),
            "lat2": dict(prompt="a dog", negative_prompt="blur", seed=2, hires_scale=1.25),
            "lan1": dict(prompt="a cow", seed=3, hires_scale=1.25, hires_upscaler="Lanczos", hires_steps=1,
                         hires_prompt="a big animal"),
            "lan2": dict(prompt="a hen", seed=4, hires_scale=1.25, hires_upscaler="Lanczos", hires_steps=1,
                         hires_prompt="a big animal"),
            "esr": dict(prompt="an owl", seed=5, hires_width=96, hires_height=80, hires_strength=0.5,
                        hires_upscaler=os.path.join(upscalers, "4x-Tiny.safetensors")),  # (as the CLI passes it)
            "var1": dict(prompt="a pig", seed=6, subseed=9, subseed_strength=0.5),
            "var2": dict(prompt="a hen", seed=7, subseed=9, subseed_strength=0.5),
            "rsz": dict(prompt="a fox", seed=8, seed_resize_from_w=96, seed_resize_from_h=48, subseed=subseed,
                        subseed_strength=0.3)}
    pngs = _png_bytes(out)
    assert sorted(pngs) == sorted(f"{name}.png" for name in want)
    for name, kw in want.items():
        assert pngs[f"{name}.png"] == _generated_png(pipe, steps=2, width=64, height=64, **kw), name
    with Image.open(os.path.join(out, "esr.png")) as im:
        params = parse_infotext(im.text["parameters"])[2]
        assert im.size == (96, 80) and params["Hires upscaler"] == "4x-Tiny" and params["Denoising strength"] == "0.5"
    with Image.open(os.path.join(out, "var2.png")) as im:
        assert parse_infotext(im.text["parameters"])[2]["Variation seed"] == "9"
    from fastsd.generate import main as generate

    cli = str(tmp_path / "cli.png")
    assert generate(["an owl", "--model", "random:tiny", *size, "--seed", "5", "--hires-width", "96", "--hires-height",
                     "80", "--hires-strength", "0.5", "--hires-upscaler", "4x-Tiny", "--upscaler-dir", upscalers,
                     "--out", cli]) == 0
    assert open(cli, "rb").read() == pngs["esr.png"]


def test_a1111_hires_fields_enable_hr_and_variation_seeds(tmp_path):
    """A1111's API names map to the hires fields (its denoising_strength is the hires pass's); enable_hr false drops
    the hires fix (fields and options), true without a scale or size is A1111's hr_scale 2; a size replaces the
    scale; "Use same sampler / scheduler" = not given. A subseed left out or -1 is derived from the job (stable) when
    subseed_strength > 0, --subseed S gives job i S + i; at strength 0 a subseed is dropped."""
    d = Defaults(steps=2, width=64, height=64)
    path = write(tmp_path / "j.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"prompt": "a", "hr_scale": 2, "denoising_strength": 0.4, "hr_second_pass_steps": 3,
         "hr_upscaler": "latent (bicubic)", "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras", "hr_prompt": "b",
         "hr_negative_prompt": "c"},
        {"prompt": "a", "enable_hr": True},
        {"prompt": "a", "enable_hr": False, "hr_scale": 9, "hr_upscaler": "nonsense"},
        {"prompt": "a", "enable_hr": True, "hr_resize_x": 96, "hr_scale": 3},
        {"prompt": "a", "hr_scale": 2, "hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler"},
        {"prompt": "a", "subseed": -1, "subseed_strength": 0.5},
        {"prompt": "a", "subseed": 5},
        {"prompt": "a", "enable_hr": "maybe"},
        {"prompt": "a", "enable_hr": True, "hr_scale": 1}]))
    a, b, c, e, f, g, h, i, same = read_job_file(path, d)
    assert same.settings.hires and same.settings.hires_scale == 1.0  # (A1111 1.6+: a same-size second pass)
    s = a.settings
    assert (s.hires_scale, s.hires_strength, s.hires_steps, s.hires_upscaler, s.hires_sampler, s.hires_schedule_type,
            s.hires_prompt, s.hires_negative_prompt) == (2.0, 0.4, 3, "Latent (bicubic)", "dpmpp_2m", "karras", "b",
                                                         "c")
    assert {k: v for k, v in a.manifest_settings().items() if k.startswith("hires_")} == {
        "hires_scale": 2.0, "hires_steps": 3, "hires_strength": 0.4, "hires_upscaler": "Latent (bicubic)",
        "hires_sampler": "dpmpp_2m", "hires_prompt": "b", "hires_negative_prompt": "c", "hires_scheduler": "karras"}
    assert b.settings.hires_scale == 2.0
    assert not c.settings.hires and c.settings.hires_upscaler == "Latent" and not any(
        k.startswith("hires_") for k in c.manifest_settings())
    assert (e.settings.hires_width, e.settings.hires_scale) == (96, 1.0) and e.settings.hires
    assert f.settings.hires and (f.settings.hires_sampler, f.settings.hires_schedule_type) == (None, None)
    assert 0 <= g.settings.subseed < 2**32 and g.settings.subseed != g.settings.seed
    assert read_job_file(path, d)[5].settings.subseed == g.settings.subseed  # stable: a resumed job draws the same
    # noise
    assert (g.manifest_settings()["subseed"], g.manifest_settings()["subseed_strength"]) == (g.settings.subseed, 0.5)
    assert h.settings.subseed is None and "subseed" not in h.manifest_settings()
    assert isinstance(i, BadJob) and i.error == "enable_hr must be true or false, got 'maybe'"
    csv = write(tmp_path / "j.csv", "prompt,enable_hr,hr_scale\nx,false,2\ny,TRUE,\nz,,1.5\n")
    assert [j.settings.hires_scale for j in read_job_file(csv, d)] == [1.0, 2.0, 1.5]
    opts = Defaults(steps=2, width=64, height=64, hires_scale=1.5, subseed=100, subseed_strength=0.2)
    assert [j.settings.hires_scale for j in read_job_file(csv, opts)] == [1.0, 1.5, 1.5]  # enable_hr false: no hires
    assert [j.settings.subseed for j in read_job_file(csv, opts)] == [100, 101, 102]  # --subseed S: S + index


PINNED = ('{"prompt": "a cat", "seed": 7, "cfg": 5, "sampler": "Euler a"}\n'
          '{"prompt": "a dog", "negative_prompt": "blur", "size": "64x128", "scheduler": "karras", '
          '"sampler": "euler"}\n'
          '{"prompt": "a <lora:ink:0.5> cow", "loras": ["x:0.2:0.4"], "clip_skip": 2}\n')


def test_ids_of_job_files_without_the_new_fields_are_unchanged(tmp_path):
    """Ids (and derived seeds) fastsd.batch gave this file before the hires fix and variation seeds were fields; and
    the same with options that these jobs don't turn on, or a record whose enable_hr false drops its hires fields."""
    path = write(tmp_path / "pin.jsonl", PINNED)
    ids = ["00001-2ef701842f", "00002-dd6fbd4cdc", "00003-7875031911"]
    for d in (Defaults(steps=3, width=64, height=64),
              Defaults(steps=3, width=64, height=64, hires_upscaler="Lanczos", hires_steps=5, hires_prompt="x",
                       subseed=4, seed_resize_from_w=0)):
        jobs = read_job_file(path, d)
        assert [j.id for j in jobs] == ids and [j.settings.seed for j in jobs] == [7, 3715087692, 2020934425]
    assert [j.id for j in read_job_file(path, Defaults())] == ["00001-bd729414e2", "00002-8cd3f29046",
                                                               "00003-f1cdd1e5e2"]
    csv = write(tmp_path / "pin.csv", 'prompt,steps,cfg\n"a cat, sitting",4,\n')
    assert read_job_file(csv, Defaults(steps=3, width=64, height=64))[0].id == "00002-58c88d6044"
    off = write(tmp_path / "off.jsonl", PINNED.replace('"Euler a"}', '"Euler a", "enable_hr": false, "hr_scale": 2}'))
    assert read_job_file(off, Defaults(steps=3, width=64, height=64))[0].id == ids[0]


def test_hires_and_variation_jobs_batch_only_with_equal_settings():
    """The same hires fix (all its fields, resolved) and seed resize batch together; a job with a variation seed
    with no other; settings that change nothing (a subseed at strength 0, enable_hr false) don't split a batch."""
    from fastsd.batch.jobs import make_jobs, plan_batches, records_from_list
    from fastsd.tokenizer import Tokenizer

    recs = [{"prompt": "a"}, {"prompt": "b", "hires_scale": 1.5}, {"prompt": "c", "hr_scale": 1.5},
            {"prompt": "d", "hires_scale": 1.5, "hires_upscaler": "Lanczos"},
            {"prompt": "e", "subseed": 1, "subseed_strength": 0.5},
            {"prompt": "f", "subseed": 1, "subseed_strength": 0.5},
            {"prompt": "g", "seed_resize_from_w": 32, "seed_resize_from_h": 32},
            {"prompt": "h", "seed_resize_from_w": 32, "seed_resize_from_h": 32}, {"prompt": "i", "subseed": 3},
            {"prompt": "j", "enable_hr": False, "hr_scale": 2}]
    jobs = make_jobs(records_from_list(recs), SMALL)
    plan = [[j.settings.prompt for j in b] for b in plan_batches(jobs, 2, Tokenizer())]
    assert plan == [["a", "i"], ["j"], ["b", "c"], ["d"], ["e"], ["f"], ["g", "h"]]


def test_cfg_options_are_job_fields_and_options(tmp_path):
    """A1111's Skip Early CFG, NGMS (all steps) and ENSD as job fields (CSV text too) and as the options' defaults: each
    PNG is Pipeline.generate's for its settings; jobs with other values never share a UNet call; a bad value is that
    job's one-line failure."""
    from fastsd.batch.jobs import make_jobs, plan_batches, records_from_list
    from fastsd.tokenizer import Tokenizer

    jobs = write(tmp_path / "jobs.csv", "id,prompt,seed,skip_early_cond,s_min_uncond,s_min_uncond_all,"
                 "eta_noise_seed_delta,sampler\nearly,a cat,1,0.5,,,,\nall,a dog,2,,3,true,,\nplain,a cow,3,,,,,\n"
                 "ensd,a fox,6,,,,31337,euler_a\nbad,a hen,4,2,,,,\nflag,a pig,5,,,maybe,,\n")
    out = str(tmp_path / "out")
    defaults = Defaults(steps=3, width=64, height=64, s_min_uncond=1.5, guidance_scale=5.0)
    rows = run(jobs, out=out, defaults=defaults, **TINY)
    status = {r["id"] if "id" in r else r["line"]: r.get("error", r["status"]) for r in rows}
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"] * 2, rows
    assert rows[4]["error"] == "skip_early_cond must be in [0, 1], got 2.0", status
    assert rows[5]["error"] == "s_min_uncond_all must be true or false, got 'maybe'", status
    pipe = fastsd.load_pipeline("random:tiny")
    kw = dict(steps=3, width=64, height=64, guidance_scale=5.0)
    want = {"early": dict(prompt="a cat", seed=1, skip_early_cond=0.5, s_min_uncond=1.5),
            "all": dict(prompt="a dog", seed=2, s_min_uncond=3.0, s_min_uncond_all=True),
            "plain": dict(prompt="a cow", seed=3, s_min_uncond=1.5),
            "ensd": dict(prompt="a fox", seed=6, s_min_uncond=1.5, eta_noise_seed_delta=31337, sampler="euler_a")}
    pngs = _png_bytes(out)
    for name, settings in want.items():
        assert pngs[f"{name}.png"] == _generated_png(pipe, **kw, **settings), name
    with Image.open(os.path.join(out, "all.png")) as im:
        assert parse_infotext(im.text["parameters"])[2]["NGMS all steps"] == "True"
    recs = [{"prompt": "a"}, {"prompt": "b", "skip_early_cond": 0.2}, {"prompt": "c", "skip_early_cond": 0.2},
            {"prompt": "d", "s_min_uncond_all": True}]
    plan = [[j.settings.prompt for j in b] for b in plan_batches(make_jobs(records_from_list(recs), SMALL), 2,
                                                                   Tokenizer())]
    assert sorted(plan) == [["a"], ["b", "c"], ["d"]]


def test_sigma_params_are_job_fields(tmp_path):
    """A1111's sigma churn / noise as job fields: the PNG is Pipeline.generate's for those settings; a sampler that
    takes none is that job's one-line failure."""
    jobs = [{"prompt": "a cat", "seed": 1, "id": "churn", "sampler": "euler", "s_churn": 1.5, "s_noise": 1.01},
            {"prompt": "a cat", "seed": 1, "id": "plain", "sampler": "euler"},
            {"prompt": "x", "id": "bad", "sampler": "euler_a", "s_churn": 1}]
    out = str(tmp_path / "out")
    rows = run(jobs, out=out, defaults=SMALL, **TINY)
    assert [r["status"] for r in rows] == ["done", "done", "failed"], rows
    assert rows[2]["error"] == "s_churn: Euler a takes none (Euler, Heun and DPM2 do)"
    pipe, kw = fastsd.load_pipeline("random:tiny"), dict(steps=2, width=64, height=64, sampler="euler", seed=1)
    pngs = _png_bytes(out)
    assert pngs["churn.png"] == _generated_png(pipe, prompt="a cat", s_churn=1.5, s_noise=1.01, **kw)
    assert pngs["plain.png"] == _generated_png(pipe, prompt="a cat", **kw) != pngs["churn.png"]


def test_bad_hires_and_variation_fields_are_that_jobs_one_line_failure(tmp_path, upscalers):
    jobs = [{"prompt": "a cat", "seed": 1, "id": "ok", "hires_scale": 1.5},
            {"prompt": "x", "id": "big", "hires_scale": 9},
            {"prompt": "x", "id": "nope", "hires_scale": 1.5, "hires_upscaler": "4x-Nope"},
            {"prompt": "x", "id": "broken", "hires_scale": 1.5, "hires_upscaler": "broken"},
            {"prompt": "a <lora:ink:0.5> x", "id": "tags", "hires_scale": 1.5, "hires_prompt": "a <lora:ink:1> x"},
            {"prompt": "x", "id": "bad-tag", "hires_scale": 1.5, "hires_prompt": "<lora:ink:abc>"},
            {"prompt": "x", "id": "strength", "subseed_strength": 2},
            {"prompt": "x", "id": "resize", "seed_resize_from_w": 64},
            {"prompt": "x", "id": "flag", "enable_hr": "yes"},
            {"prompt": "x", "id": "type", "hr_scale": "big"}]
    rows = run(jobs, out=str(tmp_path / "out"), defaults=SMALL, upscaler_dir=upscalers, **TINY)
    status = {r["line"]: r["status"] for r in rows}
    assert status == {1: "done", **{n: "failed" for n in range(2, 11)}}, rows
    errors = [r["error"] for r in rows[1:]]
    assert errors[0] == "hires_scale must be in (0, 8], got 9.0"
    assert errors[1].startswith("upscaler '4x-Nope': not one of A1111's built-in upscalers, and no such model in ")
    assert "broken.safetensors" in errors[2]
    assert errors[3].startswith("hires_prompt: its <lora:...> tags must be the prompt's")
    assert errors[4].startswith("hires_prompt: <lora:ink:abc>: the weight 'abc' is not a number")
    assert errors[5] == "subseed_strength must be in [0, 1], got 2.0"
    assert errors[6].startswith("seed_resize_from_w and seed_resize_from_h go together")
    assert errors[7] == "enable_hr must be true or false, got 'yes'"
    assert errors[8] == "hires_scale must be a number, got 'big'"
    assert all("\n" not in e and "Error" not in e for e in errors), errors
    with Image.open(os.path.join(str(tmp_path / "out"), "ok.png")) as im:
        assert im.size == (96, 96)


# ---- the command line -------------------------------------------------------------------------------

def _fails(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    jobs = write(tmp_path / "j.txt", "a cat\n")
    _fails([str(tmp_path / "none.jsonl"), "--model", "random:tiny", "--out", out], capsys, "none.jsonl: no such file")
    _fails([write(tmp_path / "j.yaml", "x"), "--model", "random:tiny", "--out", out], capsys, "unknown job file type")
    _fails([write(tmp_path / "e.txt", "\n# nothing\n"), "--model", "random:tiny", "--out", out], capsys, "no jobs")
    _fails([jobs, "--model", str(tmp_path / "nope.safetensors"), "--out", out], capsys, "no such file or folder")
    _fails([jobs, "--model", "random:tiny", "--out", out, "--sampler", "heun++"], capsys, "unknown sampler")
    assert not os.path.exists(out)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    _fails([jobs, "--model", "random:tiny", "--out", out, "--ray"], capsys, 'pip install -e ".[ray]"')
    from fastsd.batch.manifest import OutputFolder

    with OutputFolder(out, "random:tiny"):  # another run holds the folder
        _fails([jobs, "--model", "random:tiny", "--out", out], capsys, "another fastsd.batch run is writing there")
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        f.write(json.dumps({"id": "x", "status": "done", "file": "x.png", "model": "random:sd15"}) + "\n")
    _fails([jobs, "--model", "random:tiny", "--out", out], capsys, "its manifest is for model random:sd15")


def test_ray_address_that_does_not_answer_is_one_line():
    from fastsd.batch.ray_pool import _check_reachable

    with pytest.raises(ValueError, match=r"^--ray 127.0.0.1:1: nothing answers at 127.0.0.1:1 \("):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(ValueError, match="expected auto, HOST:PORT or ray://HOST:PORT"):
        _check_reachable("somewhere")
    with pytest.raises(ValueError, match=r"nothing answers at ::1:1 \((?!Name or service)"):
        _check_reachable("[::1]:1")  # (an IPv6 address in brackets: was "Name or service not known")
    _check_reachable("auto")


def test_sigkill_then_resume_does_every_job_once(tmp_path):
    """A run killed with SIGKILL mid-batch, then the same command again: every job is in the manifest
    exactly once as done, every PNG is whole, no temp file is left."""
    n = 6
    jobs = write(tmp_path / "jobs.txt", "".join(f"prompt number {i}\n" for i in range(n)))
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "fastsd.batch", jobs, "--model", "random:tiny", "--out", out, "--width", "64",
           "--height", "64", "--steps", "2", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    path = os.path.join(out, "manifest.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and open(path).read().count('"done"') >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    before = [r for r in manifest(out) if r["status"] == "done"]
    assert 2 <= len(before) < n
    for name in os.listdir(out):  # whatever has a PNG's name is a whole PNG
        if name.endswith(".png"):
            with Image.open(os.path.join(out, name)) as im:
                im.load()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = manifest(out)
    done = [row["id"] for row in rows if row["status"] == "done"]
    assert len(done) == len(set(done)) == n and [row["id"] for row in rows[:len(before)]] == [b["id"] for b in before]
    assert sorted(os.listdir(out)) == sorted([".fastsd-batch.lock", "manifest.jsonl"] + [f"{i}.png" for i in done])
    assert f"{n - len(before)} done" in r.stderr and f"({len(before)} finished before)" in r.stderr


def test_bad_input_from_a_batch_hunt(tmp_path, capsys):
    """Found by a bad-input hunt of fastsd.batch: a job line nested 100,000 deep (was a RecursionError traceback that
    stopped the batch), a valid JSON line or prompt holding U+2028 / a form feed (were split into two), a CSV quote
    left open (swallowed the rest of the file unreported), a --lora file that is no LoRA (every job failed instead
    of a usage error), a manifest with rows of wrong types (were internal errors)."""
    import torch
    from safetensors.torch import save_file

    out = str(tmp_path / "out")
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"  # (past any recursion limit: torch._dynamo raises it)
    jobs = write(tmp_path / "j.jsonl", deep + '\n{"prompt": "a cat\u2028on a mat", "id": "good"}\n')
    assert main([jobs, "--out", out, "--model", "random:tiny", "--width", "64", "--height", "64", "--steps", "1",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "line 1: invalid JSON (nested too deeply)" in err and "Traceback" not in err
    rows = {r["id"]: r for r in manifest(out)}
    assert rows["good"]["status"] == "done" and rows["good"]["line"] == 2 and len(rows) == 2
    (one,) = read_job_file(write(tmp_path / "ff.txt", "a cat\x0cwith a hat\n"), SMALL)
    assert one.settings.prompt == "a cat\x0cwith a hat"
    csv_jobs = read_job_file(write(tmp_path / "q.csv", 'prompt,id\n"a cat,x1\nb dog,x2\nc cow,x3\n'), SMALL)
    (bad,) = csv_jobs
    assert "a quoted cell runs from line 2 to line 4: a quote left open?" in bad.error
    with pytest.raises(ValueError, match=r"h\.csv: invalid CSV header \(field larger than field limit"):
        read_job_file(write(tmp_path / "h.csv", "prompt" + "x" * 200_000 + "\na cat\n"), SMALL)
    with open(os.path.join(out, "manifest.jsonl"), "a") as f:  # rows someone edited: ignored with a warning
        f.write(json.dumps({"id": ["x"], "status": "done"}) + "\n" + json.dumps({"id": "y", "file": 5}) + "\n"
                + "\n")
    with pytest.warns(UserWarning, match="is not a manifest row"):
        again = run(jobs, defaults=SMALL, out=out, **TINY)
    assert [r["status"] for r in again] == ["failed", "done"]
    assert "job good was made before with other settings" in capsys.readouterr().err  # (2 steps here, 1 before)
    lora = tmp_path / "notlora.safetensors"
    save_file({"a.weight": torch.zeros(2)}, lora)
    _fails([jobs, "--model", "random:tiny", "--out", str(tmp_path / "o2"), "--lora", str(lora)], capsys,
           "not a LoRA (no lora_down/lora_up")
    assert not os.path.exists(tmp_path / "o2")


def test_a_result_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, capsys):
    """The PNG's name taken by a folder (as a full disk or a read-only manifest would fail): one error line, exit 1,
    the job before it kept; once the folder is gone the same command finishes the rest."""
    out = tmp_path / "out"
    (out / "second.png").mkdir(parents=True)
    jobs = write(tmp_path / "j.jsonl", '{"prompt": "a cat", "id": "first"}\n{"prompt": "a dog", "id": "second"}\n'
                 '{"prompt": "an owl", "id": "third"}\n')
    argv = [jobs, "--out", str(out), "--model", "random:tiny", "--width", "64", "--height", "64", "--steps", "1",
            "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --out {out}: can't write {out / 'second.png'} (") and "resume" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert [r["id"] for r in manifest(str(out))] == ["first"] and (out / "first.png").is_file()
    first = (out / "first.png").read_bytes()
    (out / "second.png").rmdir()
    assert main(argv) == 0
    assert [r["id"] for r in manifest(str(out))] == ["first", "second", "third"]
    assert (out / "first.png").read_bytes() == first


def test_an_edited_job_reusing_an_id_is_named_and_its_image_kept(tmp_path, capsys):
    out = str(tmp_path / "out")
    run([{"prompt": "a red cat", "id": "pic"}], defaults=SMALL, out=out, **TINY)
    made = (tmp_path / "out" / "pic.png").read_bytes()
    capsys.readouterr()
    rows = run([{"prompt": "a blue dog", "id": "pic"}], defaults=SMALL, out=out, **TINY)
    err = capsys.readouterr().err
    assert "line 1: job pic was made before with other settings (prompt 'a red cat' then, 'a blue dog' now)" in err
    assert rows[0]["status"] == "done" and (tmp_path / "out" / "pic.png").read_bytes() == made
    run([{"prompt": "a red cat", "id": "pic"}], defaults=SMALL, out=out, **TINY)  # the same job again: nothing said
    assert "other settings" not in capsys.readouterr().err


def test_a_failed_job_edited_under_its_id_runs_again(tmp_path, capsys):
    """A job that failed at run time (a missing LoRA), then fixed in the job file under the same id: the rerun runs
    it (was: skipped as failed for ever, exit 1, nothing said); an unchanged failed job stays skipped."""
    out, loras = str(tmp_path / "out"), str(tmp_path)
    jobs = [{"prompt": "a cat <lora:missing:1>", "id": "x"}, {"prompt": "a dog <lora:missing:1>", "id": "y"}]
    rows = run(jobs, defaults=SMALL, out=out, lora_dir=loras, **TINY)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    capsys.readouterr()
    rows = run([{"prompt": "a cat", "id": "x"}, jobs[1]], defaults=SMALL, out=out, lora_dir=loras, **TINY)
    assert [r["status"] for r in rows] == ["done", "failed"] and (tmp_path / "out" / "x.png").is_file()
    err = capsys.readouterr().err
    assert "line 1: job x failed before with other settings (loras ['missing:1'] then, [] now): it runs again" in err
    assert [r["id"] for r in manifest(out)] == ["x", "y", "x"]


def test_folders_from_the_environment_are_checked_as_the_options(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTSD_LORA_DIR", str(tmp_path / "nope"))
    _fails([write(tmp_path / "j.txt", "a cat <lora:ink:1>\n"), "--model", "random:tiny", "--out", str(tmp_path / "o")],
           capsys, f"$FASTSD_LORA_DIR {tmp_path / 'nope'}: no such folder")
    assert not (tmp_path / "o").exists()
    fifo = tmp_path / "jobs.txt"
    os.mkfifo(fifo)  # (a job file that is a FIFO: refused, not read for ever)
    monkeypatch.delenv("FASTSD_LORA_DIR")
    _fails([str(fifo), "--model", "random:tiny", "--out", str(tmp_path / "o")], capsys, "not a regular file")
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # (was "File exists")
    _fails([write(tmp_path / "j.txt", "a cat\n"), "--model", "random:tiny", "--out", str(tmp_path / "link")], capsys,
           "is a broken symbolic link")


def test_sigterm_stops_in_one_line_and_the_rerun_resumes(tmp_path):
    jobs = write(tmp_path / "jobs.txt", "".join(f"prompt number {i}\n" for i in range(4)))
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "fastsd.batch", jobs, "--model", "random:tiny", "--out", out, "--width", "64",
           "--height", "64", "--steps", "2", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path, deadline = os.path.join(out, "manifest.jsonl"), time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and '"done"' in open(path).read():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated; finished jobs are kept: run the same command again to resume"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    done = [row["id"] for row in manifest(out) if row["status"] == "done"]
    assert len(done) == len(set(done)) == 4


def test_a_seed_option_that_passes_the_largest_seed_names_the_option():
    jobs = load_jobs(["a cat", "a dog"], Defaults(seed=2**63 - 1))
    assert isinstance(jobs[0], Job) and jobs[0].settings.seed == 2**63 - 1
    assert isinstance(jobs[1], BadJob)
    assert jobs[1].error == "--seed 9223372036854775807 + this job's index 1 passes the largest seed, 2**63 - 1"
