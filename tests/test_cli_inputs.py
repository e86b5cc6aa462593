"""python -m fastsd.generate with the inputs new users get wrong (issue 13): output files and names, limits,
bad numbers, unreadable images, run summary, fast --help. Each mistake: one `error:` line, exit 2, nothing
written, checked before any model work where it can be."""
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fastsd.generate import main

TINY = ["--model", "random:tiny", "--steps", "1", "--width", "64", "--height", "64", "--no-progress", "--threads", "1"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastsd.generate", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _one_error(capsys, code, match):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("fastsd: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    return lines[0]


def test_files_follow_the_umask_and_numbered_names_never_collide(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        procs = [subprocess.Popen([sys.executable, "-m", "fastsd.generate", "a cat", *TINY, "--seed", "5", "--out",
                                   str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        os.umask(old)
    assert all(p.returncode == 0 for p in procs), outs
    paths = sorted(o.strip() for o, _ in outs)
    assert len(set(paths)) == 2 and sorted(os.listdir(out)) == ["00000-5.png", "00001-5.png"]  # both kept
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
    a, b = (np.asarray(Image.open(p)) for p in paths)
    assert np.array_equal(a, b)  # the same seed: the same image, twice


def test_an_existing_png_is_kept_unless_overwrite(tmp_path, capsys):
    target = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(target)
    os.chmod(target, 0o640)
    _one_error(capsys, main(["a cat", *TINY, "--out", str(target)]), "the file exists (--overwrite replaces it)")
    assert Image.open(target).size == (8, 8)
    assert main(["a cat", *TINY, "--out", str(target), "--overwrite"]) == 0
    assert Image.open(target).size == (64, 64)


@pytest.mark.parametrize("out,match", [
    ("castle.jpg", "fastsd writes PNG"),
    ("castle.webp", "fastsd writes PNG"),
    ("/proc/x.png", "can't write in /proc"),
    ("/proc/sub", "can't write in /proc"),
])
def test_bad_out_is_refused_before_any_work(tmp_path, capsys, out, match):
    out = out if out.startswith("/") else str(tmp_path / out)
    t0 = time.perf_counter()
    _one_error(capsys, main(["a cat", "--model", "random:sd15", "--out", out]), match)
    assert time.perf_counter() - t0 < 20  # refused before the (large) model was built
    assert not os.path.exists(out) or out.startswith("/proc")


def test_out_that_is_a_folder_named_png_and_no_empty_folder_after_a_failure(tmp_path, capsys):
    (tmp_path / "dir.png").mkdir()
    _one_error(capsys, main(["a cat", *TINY, "--out", str(tmp_path / "dir.png")]), "is a folder")
    new = tmp_path / "new" / "deeper"
    _one_error(capsys, main(["a cat", *TINY, "--model", str(tmp_path / "missing.safetensors"), "--out", str(new)]),
               "no such file or folder")
    assert not (tmp_path / "new").exists()  # the failed run left no folder behind


@pytest.mark.parametrize("args,match", [
    (["--width", "100000"], "width 100000 is above 4096 px"),
    (["--height", "8192"], "height 8192 is above 4096 px"),
    (["--steps", "1001"], "steps must be at most 1000"),
    (["--cfg-scale", "nan"], "guidance_scale must be a finite number"),
    (["--cfg-scale", "inf"], "guidance_scale must be a finite number"),
    (["--strength", "nan", "--init-image", "x.png"], "strength must be a finite number"),
    (["--strength", "1.5"], "strength must be in [0, 1], got 1.5"),  # without --init-image too
    (["--strength", "-0.5"], "strength must be in [0, 1], got -0.5"),
    (["--seed", str(2 ** 63 - 1), "--num-images", "2"], "seed + num_images must stay below 2**63"),
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--device", "meta"], "device 'meta' is not supported"),
])
def test_limits_and_bad_numbers(tmp_path, capsys, args, match):
    _one_error(capsys, main(["a cat", *TINY, "--out", str(tmp_path / "o"), *args]), match)
    assert not (tmp_path / "o").exists()


def test_allow_large_lifts_the_limit(tmp_path):
    out = tmp_path / "wide.png"
    assert main(["a cat", *TINY, "--width", "4104", "--height", "64", "--allow-large", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (4104, 64)


def test_undecodable_prompt_bytes_and_img2img_with_little_strength(tmp_path, capsys):
    """A command line's undecodable bytes reach Python as lone surrogates; strength x steps under one step runs
    one step (A1111's img2img: int(strength * steps) + 1 steps)."""
    _one_error(capsys, main(["a \udcff cat", *TINY, "--out", str(tmp_path / "o")]), "prompt is not valid text")
    assert not (tmp_path / "o").exists()
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "in.png")
    assert main(["a cat", *TINY, "--init-image", str(tmp_path / "in.png"), "--strength", "0.1", "--steps", "2",
                 "--out", str(tmp_path / "o.png")]) == 0
    with Image.open(tmp_path / "o.png") as im:
        assert "Steps: 2," in im.info["parameters"] and "Denoising strength: 0.1," in im.info["parameters"]


def test_nan_latents_are_an_error_not_a_black_image(tmp_path, capsys):
    """A1111 checks for NaN by default: a guidance scale of 1e300 overflows the guided prediction."""
    _one_error(capsys, main(["a cat", *TINY, "--cfg-scale", "1e300", "--out", str(tmp_path / "o")]),
               "the sampling gave NaN or infinite values at step 1 in float32: a LoRA, an embedding or a guidance")
    assert not (tmp_path / "o").exists()


def test_text_encoding_overflow_without_emphasis_is_not_blamed_on_emphasis(monkeypatch):
    import torch

    from fastsd import load_pipeline

    pipe = load_pipeline("random:tiny", backend="torch")
    forward = type(pipe.clip).forward
    monkeypatch.setattr(type(pipe.clip), "forward", lambda self, ids, **kw: (forward(self, ids, **kw)[0] * torch.inf,
                                                                               None))
    with pytest.raises(ValueError, match="the text encoding overflows"):
        pipe.encode_prompt(["a cat"], None, 1)
    with pytest.raises(ValueError, match="emphasis weights overflow"):
        pipe.encode_prompt(["a (cat:1.2)"], None, 1)


def test_overflowing_prompt_weight_is_an_error_not_a_black_image(tmp_path, capsys):
    huge = "9" * 400  # a weight that parses to inf
    _one_error(capsys, main([f"a ({'cat'}:{huge})", *TINY, "--out", str(tmp_path / "o")]),
               "the emphasis weight of 'cat' is not a finite number (inf)")
    assert not (tmp_path / "o").exists()


def test_decompression_bomb_and_16_bit_init_images(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(bomb)  # 100 Mpixel, a few KB on disk
    _one_error(capsys, main(["a cat", *TINY, "--init-image", str(bomb), "--out", str(tmp_path / "o")]),
               "above the limit")
    from fastsd.image import load_image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit grayscale PNG
    got = np.asarray(load_image(str(tmp_path / "deep.png")).convert("L"), dtype=np.float64)
    want = np.round(ramp / 65535.0 * 255.0)
    assert np.abs(got - want).max() <= 1 and (got >= 255).mean() < 0.01  # scaled, not clipped to white


def test_run_summary_and_threads(tmp_path):
    r = _cli("a cat", *TINY[:-2], "--threads", "1", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr
    summary = [ln for ln in r.stderr.splitlines() if ln.startswith("fastsd: ")]
    assert len(summary) == 1
    s = summary[0]
    import torch

    from fastsd.load import default_dtype

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the default dtype on this CPU at the run's thread count (measured without AMX)
    try:
        dtype = str(default_dtype(torch.device("cpu"))).removeprefix("torch.")
    finally:
        torch.set_num_threads(threads)
    for part in ("model random:tiny", f"cpu {dtype}", "ISA ", "backend cpu", "1 threads", "64x64", "1 steps"):
        assert part in s, s


def test_help_shows_defaults_and_does_not_import_torch():
    code = ("import sys, contextlib, io\nfrom fastsd.generate import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        main(['--help'])\n    except SystemExit:\n"
            "        pass\nassert 'torch' not in sys.modules, 'torch imported'\nprint(buf.getvalue())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # (as wrapped to the terminal's width)
    assert "(default: 20)" in text and "(default: euler_a)" in text and "--threads" in text


def test_benchmark_table_of_a_missing_file():
    r = subprocess.run([sys.executable, "-m", "fastsd.benchmarks", "table", "missing.jsonl"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("module, build, argv", [
    ("fastsd.generate", "build_parser", ["a cat", "--steps", "abc"]),
    ("fastsd.generate", "build_parser", []),  # no prompt
    ("fastsd.generate", "build_parser", ["a cat", "--threads", "0"]),
    ("fastsd.serve.__main__", "build_parser", ["--port", "abc"]),
    ("fastsd.batch.__main__", "build_parser", ["jobs.jsonl"]),  # no --out
    ("fastsd.benchmarks.run", "parser", ["run", "--no-such-option"]),
    ("fastsd.benchmarks.run", "parser", []),  # no command
    ("fastsd.train.trainer", "build_parser", ["--steps", "x"]),
    ("fastsd.train.sample", "build_parser", []),
])
def test_argument_errors_are_one_line(capsys, module, build, argv):
    """argparse's own errors (a missing argument, a value of the wrong type, an unknown option) are one line
    naming the command, exit 2, without argparse's usage block."""
    import importlib

    parser = getattr(importlib.import_module(module), build)()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith(f"{parser.prog}: error: ") and "--help" in err[0], err


def test_openvino_auto_missing_model_is_one_line(tmp_path, capsys):
    from fastsd.backends import openvino_auto

    assert openvino_auto.main(["--model", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.safetensors" in err[0], err


@pytest.mark.parametrize("module, argv, words", [
    ("fastsd.benchmarks.lora", ["--repeat", "0"], "--repeat"),
    ("fastsd.benchmarks.lora", ["--model", "missing.safetensors"], "missing.safetensors"),
    ("fastsd.benchmarks.lora", ["--res", "100"], "--res"),
    ("fastsd.benchmarks.roofline", ["--model", "random:nope"], "random:nope"),
    ("fastsd.benchmarks.batch", ["--size", "-8"], "--size"),
    ("fastsd.benchmarks.cpu_paths", ["--threads", "x"], "--threads"),
    ("fastsd.benchmarks.openvino_start", ["--steps", "0"], "--steps"),
    ("fastsd.benchmarks.quality", ["--res", "0"], "--res"),
    ("fastsd.kernels.report", ["--jobs", "0"], "--jobs"),
    ("fastsd.kernels.report", ["--arch", "abc"], "--arch: unknown arch 'abc'; choose from 80, 86, 89, 90"),
    ("fastsd.kernels.report", ["--arch", ","], "--arch: expected one or more comma-separated sm archs"),
    ("fastsd.kernels.report", ["--dtype", "fp8"], "--dtype: unknown dtype 'fp8'"),
    ("fastsd.kernels.report", ["--res", "100"], "--res: expected an integer from 64 to 4096, a multiple of 8, got 100"),
    ("fastsd.kernels.traffic", ["--res", "0"], "--res: expected an integer from 64 to 4096, a multiple of 8, got 0"),
    ("fastsd.backends.openvino_auto", ["--threads", "0"], "--threads: expected an integer from 1 to 1024"),
    ("fastsd.backends.openvino_auto", ["--res", "-64"], "--res: expected an integer from 64 to 4096"),
    ("fastsd.kernels.report", ["--project", "nope"], "--project: invalid choice: 'nope'"),
    ("fastsd.kernels.report", ["--ptx-dir", "/proc/no/such"], "--ptx-dir /proc/no/such: can't be made"),
    ("fastsd.kernels.traffic", ["--no-such-option"], "--no-such-option"),
])
def test_dev_benchmark_argument_errors_are_one_line(capsys, module, argv, words):
    """The benchmark and kernel-report scripts answer a bad option or a model that isn't there with one line, exit
    2, before any work."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith(f"python -m {module}: error: ") and words in err[0], err


def test_init_images_are_read_as_a1111_reads_them(tmp_path):
    """A phone's JPEG (EXIF Orientation 6: stored sideways) comes in upright, and a palette PNG with transparent
    colours as RGBA (A1111's images.fix_image), in the CLI's and the server's readers."""
    import base64

    from fastsd.image import load_image
    from fastsd.serve.limits import Limits

    stored = Image.new("RGB", (48, 32), "white")
    stored.paste((255, 0, 0), (0, 0, 8, 32))  # red on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(1, (0, 0, 8, 16))
    pal.save(tmp_path / "mask.png", transparency=bytes([0, 200]))  # (per-colour alpha: PIL's bytes)
    server = Limits()
    for read in (lambda p: load_image(str(p)),
                 lambda p: server.decode_image(base64.b64encode(p.read_bytes()).decode(), "image")):
        upright = read(tmp_path / "phone.jpg")
        assert upright.size == (32, 48)
        rgb = np.asarray(upright.convert("RGB"))
        assert rgb[:6, :, 1].max() < 60 and rgb[12:, :, 1].min() > 200  # the red edge on top (turned 90 degrees)
        mask = read(tmp_path / "mask.png")
        assert mask.mode == "RGBA" and mask.getextrema()[-1] == (0, 200)
