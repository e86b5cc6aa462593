"""fastsd.batch with init images, masks and styles (A1111's img2img API fields, its img2img "Batch" tab from a folder):
a job's PNG is Pipeline.generate's with the same image, mask and settings (and python -m fastsd.generate --infotext
makes it again), folder mode with masks and PNG info, resume after an edited init image, relative paths, bad input
failing its job alone in one line, and a Ray run with init images."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import fastsd
from fastsd import masking
from fastsd.batch import Defaults, run
from fastsd.batch.__main__ import main
from fastsd.batch.runner import load_jobs
from fastsd.image import parse_infotext, png_writer

SMALL = Defaults(steps=2, width=64, height=64)
TINY = dict(model="random:tiny", threads=1, progress=False)


def noise_png(path, size=(64, 64), seed=0, infotext=None):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    with open(path, "wb") as f:
        png_writer(im, infotext)(f)
    return str(path)


def square_mask(path, size=(64, 64)):
    m = np.zeros((size[1], size[0]), np.uint8)
    m[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
    Image.fromarray(m).save(path)
    return str(path)


def manifest(folder):
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    png_writer(im, im.info.get("parameters"))(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipe():
    from fastsd.cli import set_threads

    set_threads(1)
    return fastsd.load_pipeline("random:tiny", device="cpu")


def test_img2img_and_inpainting_jobs_are_generates_images(tmp_path, pipe, capsys):
    """img2img (A1111's denoising_strength is img2img's strength here; resize_mode 1 from an image of another size;
    the noise multiplier) and inpainting (whole picture, original content, a mask of another size resized as the
    server does; "only masked" with fill): each PNG is Pipeline.generate's with the image and mask brought to the
    model as the CLI's A1111 inpainting does, the overlay laid over, A1111's img2img infotext; and
    python -m fastsd.generate --infotext OUT.png --init-image IN.png makes it again."""
    from fastsd.generate import main as generate

    img = noise_png(tmp_path / "in.png", (80, 64))
    square = noise_png(tmp_path / "sq.png", (64, 64), seed=1)
    mask = square_mask(tmp_path / "mask.png", (32, 32))  # (another size than the image: resized with it)
    jobs = [{"id": "i2i", "prompt": "a cat", "seed": 3, "init_image": img, "denoising_strength": 0.5,
             "resize_mode": 1, "initial_noise_multiplier": 0.9},
            {"id": "whole", "prompt": "a dog", "seed": 4, "init_image": square, "mask": mask, "strength": 0.75,
             "inpaint_full_res": False, "inpainting_fill": 1, "mask_blur": 2},
            {"id": "only", "prompt": "a hen", "seed": 5, "init_image": square, "mask": mask, "strength": 0.6,
             "inpaint_full_res_padding": 8}]
    out = str(tmp_path / "out")
    rows = run(jobs, out=out, defaults=SMALL, **TINY)
    assert [r["status"] for r in rows] == ["done"] * 3
    got = {r["id"]: open(os.path.join(out, r["file"]), "rb").read() for r in rows}

    base = dict(steps=2, progress=False)
    init = Image.open(img).convert("RGB")
    want = pipe.generate("a cat", seed=3, width=64, height=64, strength=0.5, initial_noise_multiplier=0.9,
                         image=masking.resize_image(1, init, 64, 64), **base)[0]
    assert got["i2i"] == png_bytes(want)
    prompt, _, params = parse_infotext(want.info["parameters"])
    assert (params["Denoising strength"], params["Noise multiplier"], params["Size"]) == ("0.5", "0.9", "64x64")

    sq, m = Image.open(square).convert("RGB"), Image.open(mask)
    for job_id, prompt, seed, strength, only, pad, fill, blur in (("whole", "a dog", 4, 0.75, False, 0, 1, 2),
                                                                  ("only", "a hen", 5, 0.6, True, 8, 0, 4)):
        prep = masking.prepare(sq, masking.blur(masking.binary_mask(m), blur, blur), (64, 64), only_masked=only,
                               padding=pad, fill_content=fill != 1)
        extra = masking.infotext_params(prep, blur_x=blur, blur_y=blur, invert=False, padding=pad, fill=fill)
        im = pipe.generate(prompt, seed=seed, width=64, height=64, strength=strength, image=prep.image,
                           mask=prep.mask, latent_mask="bicubic", infotext_extra=extra, **base)[0]
        assert got[job_id] == png_bytes(masking.apply_overlay(im, prep.overlay, prep.paste_to)), job_id
    params = parse_infotext(Image.open(os.path.join(out, "only.png")).info["parameters"])[2]
    assert (params["Mask blur"], params["Inpaint area"], params["Masked area padding"], params["Masked content"]) == \
        ("4", "Only masked", "8", "fill")
    row = {r["id"]: r for r in manifest(out)}["whole"]
    assert (row["init_image"], row["mask"]) == (square, mask)
    assert {k: row["settings"][k] for k in ("strength", "inpaint_full_res", "inpainting_fill", "mask_blur_x")} == \
        {"strength": 0.75, "inpaint_full_res": False, "inpainting_fill": 1, "mask_blur_x": 2}
    assert len(row["settings"]["init_image_sha256"]) == 64 and len(row["settings"]["mask_sha256"]) == 64

    # A1111's "PNG Info -> img2img" with the CLI: the same image (the CLI resizes by "just resize", resize_mode 0)
    again = str(tmp_path / "again.png")
    run([{**jobs[0], "resize_mode": 0, "id": "plain"}], out=out, defaults=SMALL, **TINY)
    plain = os.path.join(out, "plain.png")
    assert generate(["--infotext", plain, "--init-image", img, "--model", "random:tiny", "--threads", "1",
                     "--out", again, "--overwrite", "--no-progress"]) == 0
    assert Image.open(again).tobytes() == Image.open(plain).tobytes()
    assert Image.open(again).info["parameters"] == Image.open(plain).info["parameters"]
    assert generate(["--infotext", os.path.join(out, "whole.png"), "--init-image", square, "--mask", mask,
                     "--mask-blur", "2", "--inpaint-area", "whole", "--masked-content", "original", "--model",
                     "random:tiny", "--threads", "1", "--out", again, "--overwrite", "--no-progress"]) == 0
    assert Image.open(again).tobytes() == Image.open(os.path.join(out, "whole.png")).tobytes()


def test_img2img_jobs_are_never_batched(tmp_path, capsys):
    """img2img jobs of one shape run one per call (no probe, no batch), and give the PNGs of --batch 1."""
    img = noise_png(tmp_path / "a.png")
    jobs = [{"id": f"j{i}", "prompt": "a cat", "seed": i, "init_image": img} for i in range(3)]
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    run(jobs, out=one, defaults=SMALL, **TINY)
    run(jobs, out=many, defaults=SMALL, batch=3, always_batch=True, **TINY)
    assert "in one UNet call" not in capsys.readouterr().err
    assert all(open(os.path.join(one, f"j{i}.png"), "rb").read() == open(os.path.join(many, f"j{i}.png"), "rb").read()
               for i in range(3))


def test_folder_mode_with_masks_and_png_info(tmp_path, capsys, monkeypatch):
    """--img2img-dir IN --mask-dir MASKS: one job per image (natural order, id = stem), the mask of its stem; an image
    without a mask fails alone in one line, a file that isn't an image and a mask without an image are said in one
    line each; --use-png-info appends the input's prompts to --prompt / --negative-prompt and takes its seed, steps,
    CFG scale and sampler."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("in")
    os.makedirs("masks")
    noise_png("in/img10.png", seed=1)
    noise_png("in/img2.png", seed=2, infotext="a hat\nNegative prompt: ugly\nSteps: 3, Sampler: DDIM, CFG scale: 5, "
                                             "Seed: 42, Size: 64x64")
    noise_png("in/img3 copy.png", seed=3)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    square_mask("masks/img10.png")
    square_mask("masks/img2.webp")
    square_mask("masks/stray.png")
    argv = ["--img2img-dir", "in", "--mask-dir", "masks", "--prompt", "a dog", "--negative-prompt", "blur",
            "--out", "out", "--model", "random:tiny", "--steps", "2", "--threads", "1", "--no-progress",
            "--inpaint-full-res", "false", "--seed", "7", "--strength", "0.6"]
    assert main(argv + ["--use-png-info"]) == 1
    err = capsys.readouterr().err
    assert "1 files that are not images left out (such as 'notes.txt')" in err
    assert "1 masks with no image of their name in --img2img-dir, left out (such as 'stray.png')" in err
    rows = manifest("out")
    assert [(r["line"], r["status"]) for r in rows if r["status"] == "failed"] == [(2, "failed")]
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error"] == "img3 copy.png: no mask img3 copy.* in --mask-dir masks"
    done = {r["id"]: r for r in rows if r["status"] == "done"}
    assert sorted(done) == ["img10", "img2"] and os.path.isfile("out/img2.png") and os.path.isfile("out/img10.png")
    s2, s10 = done["img2"]["settings"], done["img10"]["settings"]
    assert (s2["prompt"], s2["negative_prompt"], s2["seed"], s2["steps"], s2["cfg"], s2["sampler"]) == \
        ("a dog a hat", "blur ugly", 42, 3, 5.0, "ddim")
    assert (s10["prompt"], s10["negative_prompt"], s10["seed"], s10["steps"], s10["strength"]) == \
        ("a dog", "blur", 9, 2, 0.6)  # (--seed 7 + its index 2: img2, img3 copy, img10)
    assert done["img2"]["mask"] == os.path.join("masks", "img2.webp")
    params = parse_infotext(Image.open("out/img10.png").info["parameters"])[2]
    assert params["Denoising strength"] == "0.6" and params["Mask blur"] == "4"

    # A1111: a folder of one mask is every image's mask
    os.makedirs("one")
    square_mask("one/m.png")
    assert main(["--img2img-dir", "in", "--mask-dir", "one", "--out", "out1", "--model", "random:tiny", "--steps",
                 "1", "--threads", "1", "--no-progress"]) == 0
    assert all(r["mask"] == os.path.join("one", "m.png") for r in manifest("out1"))
    assert sorted(os.listdir("out1")) == sorted(["img2.png", "img3_copy.png", "img10.png", "manifest.jsonl",
                                                 ".fastsd-batch.lock"])
    capsys.readouterr()
    for bad, msg in ((["--img2img-dir", "nothere"], "--img2img-dir nothere: no such folder"),
                     (["jobs.jsonl", "--img2img-dir", "in"], "not both"),
                     (["jobs.jsonl", "--mask-dir", "masks"], "--mask-dir is for --img2img-dir"),
                     (["--img2img-dir", "masks", "--use-png-info", "Prompt,Model hash"], "'Model hash' is not one"),
                     (["--img2img-dir", "in", "--resize-mode", "5"], "--resize-mode must be 0 (just resize)")):
        assert main(bad + ["--out", "o", "--model", "random:tiny"]) == 2
        assert msg in capsys.readouterr().err
        assert not os.path.exists("o")


def test_resume_after_an_edited_init_image(tmp_path, capsys):
    """The image is part of a job's settings (its sha256): the same run again does nothing; an edited init image under
    the same id is a changed job (said in one line, its image kept, as any job edited under its id); without an id
    (derived from the settings) it is a new job, made."""
    img = noise_png(tmp_path / "a.png")
    other = noise_png(tmp_path / "b.png", seed=5)
    jobs = [{"id": "named", "prompt": "a cat", "init_image": img}, {"prompt": "a dog", "init_image": other}]
    out = str(tmp_path / "out")
    first = run(jobs, out=out, defaults=SMALL, **TINY)
    assert [r["status"] for r in first] == ["done", "done"]
    capsys.readouterr()
    summary = {}
    assert run(jobs, out=out, defaults=SMALL, summary=summary, **TINY) == first and summary["done"] == 0
    noise_png(img, seed=9)
    noise_png(other, seed=9)
    summary = {}
    rows = run(jobs, out=out, defaults=SMALL, summary=summary, **TINY)
    err = capsys.readouterr().err
    assert "job named was made before with other settings (init_image_sha256" in err
    assert summary["done"] == 1 and rows[0] == first[0]  # the named one kept
    assert rows[1]["id"] != first[1]["id"] and rows[1]["status"] == "done"  # the derived id: a new job
    assert rows[1]["settings"]["init_image_sha256"] != first[1]["settings"]["init_image_sha256"]


def test_relative_paths_are_under_the_job_files_folder(tmp_path, monkeypatch):
    """init_image / mask paths in a job file are relative to its folder (wherever the command runs); in a list of
    dicts (and on standard input) to the current folder."""
    (tmp_path / "jobs" / "pics").mkdir(parents=True)
    noise_png(tmp_path / "jobs" / "pics" / "a.png")
    square_mask(tmp_path / "jobs" / "pics" / "m.png")
    (tmp_path / "jobs" / "j.jsonl").write_text('{"id": "a", "prompt": "x", "init_image": "pics/a.png", '
                                               '"mask": "pics/m.png"}\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rows = run("../jobs/j.jsonl", out="out", defaults=SMALL, **TINY)
    assert rows[0]["status"] == "done" and rows[0]["init_image"] == os.path.join("../jobs", "pics/a.png")
    monkeypatch.chdir(tmp_path / "jobs")
    (job,) = load_jobs([{"prompt": "x", "init_image": "pics/a.png"}], SMALL)
    assert job.init_image.path == "pics/a.png" and job.init_image.size == (64, 64)
    monkeypatch.chdir(tmp_path)
    (bad,) = load_jobs([{"prompt": "x", "init_image": "pics/a.png"}], SMALL)
    assert bad.error == "init_image pics/a.png: no such file"
    # no width / height: the image's size (as python -m fastsd.generate); the --hires-* options are txt2img's
    (job,) = load_jobs([{"prompt": "x", "init_image": "jobs/pics/a.png"}], Defaults(steps=2, hires_scale=2))
    assert (job.settings.width, job.settings.height, job.settings.hires) == (64, 64, False)


def test_bad_input_fails_its_job_alone_in_one_line(tmp_path):
    """A missing, unreadable or folder init image, a mask without an image, an unreadable mask, strength out of range,
    img2img fields without an image, A1111's base64 init_images, a hires field in an img2img job, bad A1111 fields:
    each job fails alone with one line, the good one is made, nothing half-written."""
    good = noise_png(tmp_path / "good.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good, "rb").read()[:200])
    (tmp_path / "dir.png").mkdir()
    cases = {
        "missing": ({"init_image": "nope.png"}, "init_image nope.png: no such file"),
        "garbage": ({"init_image": str(garbage)}, f"init_image {garbage}: not a readable image"),
        "folder": ({"init_image": str(tmp_path / "dir.png")}, "is a folder, not an image"),
        "maskonly": ({"mask": good}, "mask: a mask needs an init_image (the image to inpaint)"),
        "badmask": ({"init_image": good, "mask": str(truncated)}, f"mask {truncated}: not a readable image"),
        "strength": ({"init_image": good, "strength": 1.5}, "strength must be in [0, 1], got 1.5"),
        "txt2img": ({"strength": 0.5}, "strength: an img2img field, for a job with an init_image"),
        "blur": ({"mask_blur": 4}, "mask_blur: an img2img field, for a job with an init_image"),
        "base64": ({"init_images": ["aGVsbG8="]}, "init_images: fastsd.batch takes init_image, an image file's path"),
        "hires": ({"init_image": good, "hr_scale": 2}, "the hires fix is for txt2img"),
        "mode": ({"init_image": good, "resize_mode": 5}, "resize_mode must be 0 (just resize)"),
        "fill": ({"init_image": good, "mask": good, "inpainting_fill": 7}, "inpainting_fill must be 0 (fill)"),
        "pad": ({"init_image": good, "mask": good, "inpaint_full_res_padding": -1},
                "inpaint_full_res_padding must be at least 0"),
        "latent": ({"init_image": noise_png(tmp_path / "wide.png", (96, 64)), "mask": good, "resize_mode": 3,
                    "inpaint_full_res": False, "width": 64, "height": 64},
                   "resize_mode 3 (latent upscale) with a mask needs inpaint_full_res"),
        "path": ({"init_image": 5}, "init_image must be an image file's path, got 5"),
    }
    jobs = [{"id": "ok", "prompt": "a cat", "init_image": good, "mask": good}] + [
        {"id": k, "prompt": "a cat", **rec} for k, (rec, _) in cases.items()]
    out = str(tmp_path / "out")
    rows = run(jobs, out=out, defaults=SMALL, **TINY)
    assert rows[0]["status"] == "done"
    errors = [r["error"] for r in rows[1:]]
    assert len(errors) == len(cases) and all("\n" not in e for e in errors)
    for (name, (_, msg)), error in zip(cases.items(), errors):
        assert msg in error, (name, error)
    assert sorted(os.listdir(out)) == [".fastsd-batch.lock", "manifest.jsonl", "ok.png"]


def test_styles_field_and_option(tmp_path, capsys):
    """styles (A1111's, from --styles-file): a job's `styles` field, else --style's; applied as the CLI applies them
    (the infotext and the manifest hold the styled prompts, the manifest the names); a name the file lacks fails its
    job alone, no styles file too; a --style the file lacks is a usage error."""
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nink,"{prompt}, ink drawing",blurry\nred,red,\n')
    img = noise_png(tmp_path / "a.png")
    jobs = [{"id": "field", "prompt": "a cat", "styles": ["ink", "red"]}, {"id": "default", "prompt": "a dog"},
            {"id": "i2i", "prompt": "a hen", "styles": "red", "init_image": img}, {"id": "none", "prompt": "x",
                                                                                   "styles": []},
            {"id": "unknown", "prompt": "x", "styles": ["blue"]}]
    out = str(tmp_path / "out")
    rows = run(jobs, out=out, defaults=Defaults(steps=1, width=64, height=64, styles=("ink",)),
               styles_file=str(styles), **TINY)
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"]
    assert rows[4]["error"] == f"styles: 'blue': no such style in --styles-file {styles}"
    s = {r["id"]: r["settings"] for r in rows[:4]}
    assert (s["field"]["prompt"], s["field"]["negative_prompt"], s["field"]["styles"]) == \
        ("a cat, ink drawing, red", "blurry", ["ink", "red"])
    assert (s["default"]["prompt"], s["i2i"]["prompt"], s["none"]["prompt"]) == ("a dog, ink drawing", "a hen, red", "x")
    assert "styles" not in s["none"]
    assert parse_infotext(Image.open(os.path.join(out, "field.png")).info["parameters"])[:2] == \
        ("a cat, ink drawing, red", "blurry")
    (bad,) = load_jobs([{"prompt": "x", "styles": ["ink"]}], SMALL)
    assert bad.error.startswith("styles ['ink']: no styles file; give --styles-file PATH")
    capsys.readouterr()
    assert main(["j.txt", "--style", "blue", "--styles-file", str(styles), "--out", str(tmp_path / "o"),
                 "--model", "random:tiny"]) == 2
    assert "--style 'blue': no such style in --styles-file" in capsys.readouterr().err


def test_img2img_fields_take_the_servers_names_and_defaults():
    """The job fields are the server's img2img request fields: the same names and defaults (A1111's API's)."""
    pytest.importorskip("pydantic")
    from fastsd.batch.jobs import IMG2IMG
    from fastsd.serve.schemas import Img2ImgRequest

    fields = Img2ImgRequest.model_fields
    assert {k: fields[k].default for k in IMG2IMG} == IMG2IMG
    assert fields["denoising_strength"].annotation is float and "initial_noise_multiplier" in fields


def test_ray_run_with_init_images_matches_the_local_run(tmp_path, monkeypatch):
    """On Ray the init images and masks go to the workers as bytes (their folder is not this one): the same PNGs and
    manifest as a local run, relative paths included."""
    ray = pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    noise_png("a.png")
    noise_png("b.png", (72, 64), seed=1)
    square_mask("m.png")
    jobs = [{"id": "a", "prompt": "a cat", "seed": 1, "init_image": "a.png", "strength": 0.5},
            {"id": "b", "prompt": "a dog", "seed": 2, "init_image": "b.png", "mask": "m.png"}]
    run(jobs, out="local", defaults=SMALL, **TINY)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = run(jobs, model="random:tiny", out="ray", defaults=SMALL, ray="auto", workers=1, cpus_per_worker=1,
                   progress=False)
    finally:
        ray.shutdown()
    assert [r["status"] for r in rows] == ["done"] * 2
    strip = ("seconds", "finished")
    assert [{k: v for k, v in r.items() if k not in strip} for r in manifest("ray")] == \
        [{k: v for k, v in r.items() if k not in strip} for r in manifest("local")]
    for name in ("a.png", "b.png"):
        assert open(os.path.join("ray", name), "rb").read() == open(os.path.join("local", name), "rb").read()
