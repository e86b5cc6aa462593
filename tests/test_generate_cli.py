"""python -m fastsd.generate: end to end on random weights, and one-line errors with no output file."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastsd.generate import main
from fastsd.image import parse_infotext, save_png

TINY = ["--model", "random:tiny", "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]


def test_end_to_end_subprocess_writes_png_with_infotext(tmp_path):
    out = tmp_path / "cat.png"
    r = subprocess.run([sys.executable, "-m", "fastsd.generate", "a photo of a cat", "--negative-prompt", "blurry",
                        *TINY, "--seed", "42", "--sampler", "Euler a", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        prompt, neg, params = parse_infotext(im.text["parameters"])
        assert im.size == (32, 32)
    assert (prompt, neg) == ("a photo of a cat", "blurry")
    assert params["Steps"] == "2" and params["Sampler"] == "Euler a" and params["Seed"] == "42"
    assert params["CFG scale"] == "7.5" and params["Size"] == "32x32"


def test_batch_into_folder_and_img2img_inpaint(tmp_path, capsys):
    assert main(["a cat", *TINY, "--seed", "1", "--num-images", "2", "--out", str(tmp_path / "o")]) == 0
    files = sorted((tmp_path / "o").iterdir())
    assert [f.name.endswith(s) for f, s in zip(files, ("-1.png", "-2.png"))] == [True, True]
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "init.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    assert main(["a cat", *TINY, "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "--strength", "0.5", "--steps", "4", "--out", str(tmp_path / "inp.png")]) == 0
    with Image.open(tmp_path / "inp.png") as im:
        assert parse_infotext(im.text["parameters"])[2]["Denoising strength"] == "0.5"


def _fails(args, tmp_path, capsys, match):
    out = tmp_path / "out"
    code = main(["a cat", *TINY, "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert match in err, err
    assert not out.exists() or not any(out.iterdir())
    return err


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    Image.new("L", (16, 32)).save(tmp_path / "small_mask.png")
    return tmp_path


def test_bad_sizes_steps_sampler(tmp_path, capsys):
    _fails(["--width", "33"], tmp_path, capsys, "width must be a positive multiple of 8")
    _fails(["--height", "0"], tmp_path, capsys, "height must be a positive multiple of 8")
    _fails(["--steps", "0"], tmp_path, capsys, "steps must be at least 1")
    _fails(["--sampler", "heun++"], tmp_path, capsys, "unknown sampler 'heun++'; valid names: euler, euler_a")


def test_bad_img2img_inputs(images, capsys):
    init, mask = str(images / "init.png"), str(images / "small_mask.png")
    _fails(["--init-image", init, "--strength", "1.5"], images, capsys, "strength must be in [0, 1]")
    _fails(["--init-image", init, "--strength", "-0.1"], images, capsys, "strength must be in [0, 1]")
    _fails(["--init-image", str(images / "nope.png")], images, capsys, "--init-image")
    _fails(["--mask", mask], images, capsys, "a mask needs an init image")


def test_bad_model_and_out(tmp_path, capsys, monkeypatch):
    _fails(["--model", str(tmp_path / "missing.safetensors")], tmp_path, capsys, "no such file or folder")
    (tmp_path / "afile").write_text("x")
    err = _fails(["--out", str(tmp_path / "afile" / "sub")], tmp_path, capsys, "--out")
    assert "afile is not a folder" in err
    _fails(["--out", str(tmp_path / "nodir" / "x.png")], tmp_path, capsys, "does not exist")
    monkeypatch.delenv("FASTSD_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "emptyhub"))
    code = main(["a cat", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no model given: pass --model" in err and len(err.splitlines()) == 1


def test_save_is_atomic(tmp_path, monkeypatch):
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))

    def broken_save(self, fp, *a, **k):
        with open(fp, "wb") as f:  # a half-written file, then the failure
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_png(img, str(tmp_path / "x.png"), "p")
    assert os.listdir(tmp_path) == []


def test_default_model_from_env_or_the_one_sd1_model_in_hf_cache(tmp_path, monkeypatch):
    import json

    from fastsd.generate import default_model

    monkeypatch.setenv("FASTSD_MODEL", "random:tiny")
    assert default_model() == "random:tiny"
    monkeypatch.delenv("FASTSD_MODEL")
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))

    def add(repo, cls):
        snap = hub / ("models--" + repo.replace("/", "--")) / "snapshots" / "c0ffee"
        snap.mkdir(parents=True)
        (snap / "model_index.json").write_text(json.dumps({"_class_name": cls}))

    add("org/sdxl", "StableDiffusionXLPipeline")
    add("org/sd15", "StableDiffusionPipeline")
    assert default_model() == "org/sd15"
    add("org/sd15-inpaint", "StableDiffusionInpaintPipeline")
    with pytest.raises(ValueError, match="found 2 in the local Hugging Face cache"):
        default_model()
