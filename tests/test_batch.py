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
    pair = read_job_file(write(tmp_path / "p.jsonl", '{"prompt": "a <lora:z:1:0.5> cat", "loras": ["x:0.2:0.4", "w:1:1"]}\n'),
                         d)[0]  # A1111's TE:UNET weights, in a tag and in the loras field
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
    jobs through Defaults, or a new field would be an option that silently does nothing."""
    import dataclasses

    from fastsd.batch.__main__ import build_parser
    from fastsd.settings import FIELDS

    from fastsd.batch.jobs import NOT_BATCHED

    per_job = {f.name for f in dataclasses.fields(Defaults)} - {"loras"}
    assert per_job == set(FIELDS) - {"prompt", "num_images", "strength", *NOT_BATCHED}
    assert not set(NOT_BATCHED) & set(vars(build_parser().parse_args(["j.txt", "--out", "o"])))  # not offered
    assert per_job <= set(vars(build_parser().parse_args(["j.txt", "--out", "o"])))


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


def test_plan_batches_groups_compatible_jobs():
    """Same size, steps, sampler, cfg, clip skip, LoRAs and prompt chunk count (prompt or negative) share a
    batch, in the order of each group's first job, up to `batch` jobs."""
    from fastsd.batch.jobs import make_jobs, plan_batches, records_from_list
    from fastsd.tokenizer import Tokenizer

    long = "a red house and a tree, " * 20  # > 75 tokens: 2 chunks
    recs = [{"prompt": "a"}, {"prompt": "b", "size": "64x128"}, {"prompt": "c"}, {"prompt": long},
            {"prompt": "d", "negative_prompt": long}, {"prompt": "e", "cfg": 3}, {"prompt": "f", "loras": ["x"]},
            {"prompt": "g"}, {"prompt": "h", "sampler": "ddim"}, {"prompt": "i", "steps": 3}, {"prompt": "j"}]
    jobs = make_jobs(records_from_list(recs), SMALL)
    plan = [[j.settings.prompt[:1] for j in b] for b in plan_batches(jobs, 2, Tokenizer())]
    assert plan == [["a", "c"], ["g", "j"], ["b"], ["a", "d"], ["e"], ["f"], ["h"], ["i"]]
    assert plan_batches(jobs, 1, None) == [[j] for j in jobs]


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
