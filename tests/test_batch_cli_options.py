"""python -m fastsd.batch: a mistake in an option every job shares (--lora, --lora-dir, --upscaler-dir,
--hires-upscaler, the settings, the device) is a usage error -- exit 2, one `error:` line, nothing written -- found
before the output folder is created or a worker starts; a job line's own bad LoRA stays that job's failure, with a
one-line reason."""
import json
import os
import shutil

import pytest

import fastsd
from fastsd.batch import Defaults, run
from fastsd.batch.__main__ import main

ARGS = ["--model", "random:tiny", "--steps", "2", "--width", "64", "--height", "64", "--threads", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A LoRA folder: ink (a real LoRA of random:tiny), deep (the same, in a subfolder), and files that are
    not LoRAs."""
    from fastsd.testing_lora import write_random_lora

    folder = tmp_path_factory.mktemp("loras")
    write_random_lora(str(folder / "ink.safetensors"), fastsd.load_pipeline("random:tiny", device="cpu"),
                      fmt="kohya_ldm", rank=4, seed=1)
    (folder / "sub").mkdir()
    shutil.copy(folder / "ink.safetensors", folder / "sub" / "deep.safetensors")
    (folder / "garbage.safetensors").write_bytes(b"\xff" * 1000)
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "junk.pt").write_bytes(b"this is no torch checkpoint")
    return str(folder)


@pytest.fixture(autouse=True)
def _no_lora_dir_from_the_environment(monkeypatch):
    monkeypatch.delenv("FASTSD_LORA_DIR", raising=False)
    monkeypatch.delenv("FASTSD_UPSCALER_DIR", raising=False)


def _jobs(tmp_path, lines=('{"prompt": "a cat", "seed": 1, "id": "a"}', '{"prompt": "a dog", "seed": 2, "id": "b"}')):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _snapshot(folder):
    """Every file of the folder (hidden ones too) with its bytes and mtime."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = (f.read(), os.stat(p).st_mtime_ns)
    return out


def _usage_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
    return err


# option -> what the error line says ({dir}: the LoRA folder, {tmp}: the test's folder, {jobs}: the job file)
CASES = {
    "lora-not-in-folder": (["--lora", "nosuch", "--lora-dir", "{dir}"],
                           "--lora nosuch: no nosuch.safetensors, .pt or .ckpt in {dir}"),
    "lora-dir-missing": (["--lora", "ink", "--lora-dir", "{tmp}/nonexistent"],
                         "--lora-dir {tmp}/nonexistent: no such folder"),
    "lora-dir-missing-without-lora": (["--lora-dir", "{tmp}/nonexistent"],  # though no job names a LoRA
                                      "--lora-dir {tmp}/nonexistent: no such folder"),
    "lora-dir-a-file": (["--lora", "ink", "--lora-dir", "{jobs}"], "--lora-dir {jobs}: not a folder"),
    "lora-without-folder": (["--lora", "ink"], "--lora ink: needs a LoRA folder"),
    "lora-weight-huge": (["--lora", "ink:1e308", "--lora-dir", "{dir}"], "LoRA 'ink': "),
    "lora-weight-not-a-number": (["--lora", "ink:abc", "--lora-dir", "{dir}"], "LoRA 'ink' weight must be a number"),
    "lora-garbage": (["--lora", "garbage", "--lora-dir", "{dir}"],
                     "--lora garbage: {dir}/garbage.safetensors: not a valid safetensors file"),
    "lora-empty": (["--lora", "empty", "--lora-dir", "{dir}"],
                   "--lora empty: {dir}/empty.safetensors: not a safetensors file"),
    "lora-junk-pt": (["--lora", "junk", "--lora-dir", "{dir}"], "--lora junk: {dir}/junk.pt: not a torch checkpoint"),
    "lora-path-missing": (["--lora", "{tmp}/missing.safetensors:0.5"],
                          "--lora {tmp}/missing.safetensors: no such file"),
    "lora-path-a-folder": (["--lora", "{dir}"], "--lora {dir}: a folder, not a LoRA file"),
    "upscaler-dir-missing": (["--upscaler-dir", "{tmp}/nonexistent"],
                             "--upscaler-dir {tmp}/nonexistent: no such folder"),
    "upscaler-dir-a-file": (["--upscaler-dir", "{jobs}"], "--upscaler-dir {jobs}: not a folder"),
    "hires-upscaler-unknown": (["--hires-upscaler", "4x-Nope"], "unknown hires upscaler '4x-Nope'"),
    "hires-upscaler-not-in-folder": (["--hires-upscaler", "4x-Nope", "--upscaler-dir", "{dir}"],
                                     "upscaler '4x-Nope': not one of A1111's built-in upscalers, and no such model in "
                                     "{dir}"),
    "hires-upscaler-not-an-upscaler": (["--hires-upscaler", "garbage", "--upscaler-dir", "{dir}"],
                                       "--hires-upscaler garbage: {dir}/garbage.safetensors: not a valid safetensors"),
    "hires-upscaler-path-missing": (["--hires-upscaler", "{tmp}/none.pth"],
                                    "hires upscaler {tmp}/none.pth: no such file"),
    "hires-scale": (["--hires-scale", "9"], "hires_scale must be in (0, 8], got 9.0"),
    "hires-schedule-type": (["--hires-schedule-type", "nope"], "hires_schedule_type: unknown schedule type 'nope'"),
    "subseed-strength": (["--subseed-strength", "2"], "subseed_strength must be in [0, 1], got 2.0"),
    "subseed": (["--subseed", "-5"], "subseed must be at least 0, got -5"),
    "seed-resize-alone": (["--seed-resize-from-w", "64"], "seed_resize_from_w and seed_resize_from_h go together"),
    "width": (["--width", "60"], "width must be a positive multiple of 8, got 60"),
    "steps": (["--steps", "0"], "steps must be at least 1, got 0"),
    "cfg": (["--cfg-scale", "nan"], "guidance_scale must be a finite number"),
    "device": (["--device", "tpu"], "unknown device 'tpu'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_wide_option_mistakes_are_usage_errors_that_write_nothing(case, tmp_path, loras, capsys):
    extra, match = CASES[case]
    jobs = _jobs(tmp_path)
    fill = {"dir": loras, "tmp": str(tmp_path), "jobs": jobs}
    extra, match = [a.format(**fill) for a in extra], match.format(**fill)
    out = str(tmp_path / "out")
    _usage_error([jobs, *ARGS, *extra, "--out", out], capsys, match)
    assert not os.path.exists(out)  # no folder, no lock file, no manifest
    # a folder of an earlier run is left as it was: no lock file, no failed rows appended
    os.makedirs(out)
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        f.write(json.dumps({"id": "old", "line": 1, "status": "done", "file": "old.png", "model": "random:tiny"})
                + "\n")
    with open(os.path.join(out, "old.png"), "wb") as f:
        f.write(b"not really a png")
    before = _snapshot(out)
    _usage_error([jobs, *ARGS, *extra, "--out", out], capsys, match)
    assert _snapshot(out) == before


def test_a_good_run_wide_lora_still_runs_every_job(tmp_path, loras, capsys):
    out = str(tmp_path / "out")
    assert main([_jobs(tmp_path), *ARGS, "--lora", "deep:0.7", "--lora-dir", loras, "--out", out]) == 0  # in sub/
    with open(os.path.join(out, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["id"], r["status"], r["settings"]["loras"]) for r in rows] == [("a", "done", ["deep:0.7"]),
                                                                            ("b", "done", ["deep:0.7"])]
    out2 = str(tmp_path / "out2")  # a LoRA given as a file path needs no folder
    assert main([_jobs(tmp_path), *ARGS, "--lora", os.path.join(loras, "ink.safetensors"), "--out", out2]) == 0


def test_a_job_lines_bad_lora_is_that_jobs_one_line_failure(tmp_path, loras, capsys):
    jobs = _jobs(tmp_path, ['{"prompt": "a cat", "seed": 1, "id": "ok"}',
                            '{"prompt": "a dog", "seed": 2, "id": "missing", "loras": ["nosuch"]}',
                            '{"prompt": "a cow", "seed": 3, "id": "huge", "loras": ["ink:1e308"]}',
                            '{"prompt": "a <lora:ink:1e308> hen", "seed": 4, "id": "tag"}',
                            '{"prompt": "a pig", "seed": 5, "id": "garbage", "loras": ["garbage"]}',
                            '{"prompt": "an owl", "seed": 6, "id": "inked", "loras": ["ink:0.5"]}'])
    out = str(tmp_path / "out")
    assert main([jobs, *ARGS, "--lora-dir", loras, "--out", out]) == 1
    capsys.readouterr()
    rows = {}  # by the prompt's last word; a line that could not become a job (no settings recorded) by its number
    with open(os.path.join(out, "manifest.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["settings"]["prompt"].split()[-1] if "settings" in r else r["line"]] = r
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {"cat": "done", "dog": "failed", 3: "failed", 4: "failed", "pig": "failed", "owl": "done"}, status
    errors = {k: r["error"] for k, r in rows.items() if r["status"] == "failed"}
    assert "no nosuch.safetensors" in errors["dog"]
    assert errors[3].startswith("LoRA 'ink': ") and "1e+308" in errors[3]  # a line that can't become a job
    assert errors[4].startswith("prompt: <lora:ink:1e308>: ")
    assert "garbage.safetensors: not a valid safetensors file" in errors["pig"]
    for e in errors.values():  # one line, a reason: not an internal exception's repr
        assert "\n" not in e and "Error:" not in e, e


def test_hires_and_variation_options_are_run_wide_defaults(tmp_path, capsys):
    """--hires-* / --subseed* options apply to the jobs that leave the field out; a job's enable_hr false turns the
    hires fix off, its own fields win; --subseed S gives job i S + i."""
    jobs = _jobs(tmp_path, ['{"prompt": "a cat", "seed": 1, "id": "a"}',
                            '{"prompt": "a dog", "seed": 2, "id": "b", "enable_hr": false}',
                            '{"prompt": "a cow", "seed": 3, "id": "c", "hr_scale": 1.25, "subseed": 7}'])
    out = str(tmp_path / "out")
    assert main([jobs, *ARGS, "--hires-scale", "1.5", "--hires-steps", "1", "--hires-upscaler", "Lanczos",
                 "--subseed", "100", "--subseed-strength", "0.25", "--out", out]) == 0
    from PIL import Image

    with open(os.path.join(out, "manifest.jsonl")) as f:
        rows = {r["id"]: r["settings"] for r in map(json.loads, f)}
    sizes = {}
    for name in "abc":
        with Image.open(os.path.join(out, f"{name}.png")) as im:
            sizes[name] = im.size
    assert sizes == {"a": (96, 96), "b": (64, 64), "c": (80, 80)}
    assert (rows["a"]["hires_upscaler"], rows["a"]["hires_steps"], rows["c"]["hires_scale"]) == ("Lanczos", 1, 1.25)
    assert "hires_scale" not in rows["b"] and [rows[n]["subseed"] for n in "abc"] == [100, 101, 7]


def test_python_api_checks_the_default_loras_before_the_folder(tmp_path, loras):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"^--lora nosuch: no nosuch\.safetensors"):
        run(["a cat"], model="random:tiny", out=out, defaults=Defaults(loras=(("nosuch", 1.0),)), lora_dir=loras)
    with pytest.raises(ValueError, match=r"^--lora ink: "):  # a weight the merge would refuse (fastsd.lora)
        run(["a cat"], model="random:tiny", out=out, defaults=Defaults(loras=(("ink", 1e308),)), lora_dir=loras)
    with pytest.raises(ValueError, match=r"no such folder"):
        run(["a cat"], model="random:tiny", out=out, lora_dir=str(tmp_path / "nonexistent"))
    assert not os.path.exists(out)


def test_sizes_that_are_multiples_of_8_are_not_refused_up_front():
    from fastsd.batch.runner import check_run_options

    d = Defaults(width=56, height=72)
    d.validate()
    check_run_options(d, None, local=True)
