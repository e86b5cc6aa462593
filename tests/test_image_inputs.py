"""Init images and masks given to `python -m fastsd.generate` (fastsd.image.load_image): only PNG, JPEG, WEBP, BMP,
GIF and TIFF are opened (an EPS file, whatever its name, never reaches PIL's EPS plugin and so never Ghostscript),
a FIFO is refused instead of hanging, a float image of NaN is refused instead of becoming a picture. Each mistake:
one `error:` line naming the file, exit 2, nothing written."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from fastsd.generate import main

TINY = ["--model", "random:tiny", "--steps", "1", "--width", "64", "--height", "64", "--no-progress", "--threads", "1"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"


def _one_error(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("fastsd: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A stand-in `gs` first on PATH: the file it leaves says whether anything ran Ghostscript."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "GS_CALLED"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {marker}\n[ "$1" = "--version" ] && echo 10.0 && exit 0\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return marker


@pytest.mark.parametrize("name", ["x.eps", "x_eps.png"])
@pytest.mark.parametrize("option", ["--init-image", "--mask"])
def test_eps_never_reaches_ghostscript(tmp_path, capsys, fake_gs, name, option):
    eps = tmp_path / name
    eps.write_text(EPS)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (200, 100, 50)).save(ok)
    args = ["--init-image", str(eps)] if option == "--init-image" else ["--init-image", str(ok), "--mask", str(eps)]
    line = _one_error(capsys, main(["a cat", *TINY, *args, "--out", str(tmp_path / "o")]),
                      f"{option} {eps}", "EPS images are not read", "PNG, JPEG, WEBP, BMP, GIF or TIFF")
    assert not fake_gs.exists(), ("Ghostscript was run", fake_gs.read_text())
    assert not (tmp_path / "o").exists(), line


def test_load_image_names_the_format_it_refuses(tmp_path, fake_gs):
    from fastsd.image import load_image

    (tmp_path / "x.eps").write_text(EPS)
    with pytest.raises(ValueError, match=r"^mask .*x\.eps: EPS images are not read; give PNG, JPEG, WEBP, BMP, GIF or "
                                         r"TIFF$"):
        load_image(str(tmp_path / "x.eps"), "mask")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.ico")  # a format PIL reads, but not one an init image comes in
    with pytest.raises(ValueError, match="ICO images are not read"):
        load_image(str(tmp_path / "x.ico"))
    assert not fake_gs.exists()


def test_tiff_webp_bmp_gif_are_read(tmp_path):
    from fastsd.image import load_image

    rgb = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    for ext in ("png", "jpg", "webp", "bmp", "tiff"):
        Image.fromarray(rgb).save(tmp_path / f"x.{ext}")
        assert load_image(str(tmp_path / f"x.{ext}")).convert("RGB").size == (16, 16)
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "x.tiff"))), rgb)  # lossless
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(str(tmp_path / "anim.gif")).convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # the first frame
    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(ramp, mode="F").save(tmp_path / "float.tiff")  # a finite float TIFF: scaled to 8 bits
    got = np.asarray(load_image(str(tmp_path / "float.tiff")))
    assert got.dtype == np.uint8 and got.min() == 0 and got.max() == 255


@pytest.mark.parametrize("option", ["--init-image", "--mask"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, option):
    """Run as a process with a timeout: opening a FIFO would wait for a writer for ever."""
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(ok)
    args = ["--init-image", str(fifo)] if option == "--init-image" else ["--init-image", str(ok), "--mask", str(fifo)]
    r = subprocess.run([sys.executable, "-m", "fastsd.generate", "a cat", *TINY, *args, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("fastsd: ")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == f"error: {option} {fifo}: is not a regular file (a FIFO, device or socket), not an image"
    assert sorted(os.listdir(tmp_path)) == ["in.png", "ok.png"]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_float_pixels_are_refused(tmp_path, capsys, value):
    a = np.full((64, 64), 0.5, np.float32)
    a[3:9, 3:9] = value
    Image.fromarray(a, mode="F").save(tmp_path / "f.tiff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy cast warning on the way to the error either
        code = main(["a cat", *TINY, "--steps", "4", "--init-image", str(tmp_path / "f.tiff"), "--out",
                     str(tmp_path / "o")])  # (steps enough for img2img: without the check this run would finish)
    _one_error(capsys, code, f"--init-image {tmp_path / 'f.tiff'}", "NaN or infinite")
    assert not (tmp_path / "o").exists()
