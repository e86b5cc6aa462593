"""fastsd.train / fastsd.train.sample given bad input: every user mistake is ONE `error:` line and exit status 2,
no traceback, checked before training starts, and nothing half-made is left (no empty --out folder, no
changed file in a run folder that is refused)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd.train import datasets, sample, trainer as train

# the audit's base command: a 2-step run of a tiny UNet
BASE = ["--dataset", "digits", "--steps", "2", "--batch-size", "4", "--no-progress", "--model-channels", "8",
        "--norm-groups", "4", "--num-heads", "2", "--context-dim", "8", "--save-every", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of main(argv), whether it returns or exits through argparse."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for n in needles:
        assert n in lines[0], err


def tree_digest(folder: str) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for f in files + dirs:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest() \
                if os.path.isfile(p) else "dir"
    return out


# --------------------------------------------------------------------------------------------- 1. options

@pytest.mark.parametrize("extra, needle", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--log-every", "0"], "--log-every"), (["--log-every", "-1"], "--log-every"),
    (["--norm-groups", "0"], "--norm-groups"), (["--num-heads", "0"], "--num-heads"),
    (["--model-channels", "0"], "--model-channels"), (["--model-channels", "-8"], "--model-channels"),
    (["--context-dim", "0"], "--context-dim"), (["--context-dim", "-1"], "--context-dim"),
    (["--channel-mult", "0,0"], "--channel-mult"), (["--channel-mult", ",,"], "--channel-mult"),
    (["--num-res-blocks", "-1"], "--num-res-blocks"),
    (["--image-size", "0"], "--image-size"), (["--image-size", "-8"], "--image-size"),
    (["--image-size", "100000"], "--image-size"), (["--batch-size", "100000000"], "--batch-size"),
    (["--threads", "-1"], "--threads"),
    (["--ema-decay", "nan"], "--ema-decay"), (["--ema-decay", "2"], "--ema-decay"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--warmup-steps", "-5"], "--warmup-steps"), (["--save-every", "-1"], "--save-every"),
    (["--cond-drop", "nan"], "--cond-drop"), (["--seed", "-1"], "--seed"),
    (["--attention-levels", "2,5"], "--attention-levels"),  # 0/1 per level, not level numbers
    (["--attention-levels", "1,1,1"], "--attention-levels"),  # 3 entries, 2 levels
    (["--channel-mult", "1,2", "--attention-levels", "1"], "--attention-levels"),
    (["--norm-groups", "3"], "--norm-groups 3"),  # width 8 not divisible
    (["--num-heads", "3"], "--num-heads 3"),
    (["--model-channels", "6", "--channel-mult", "2,2"], "width 6"),  # the first block's width, 6, too
    (["--image-size", "1024", "--batch-size", "65536"], "memory"),  # estimated before anything is allocated
])
def test_bad_options_are_one_line_before_anything_is_made(extra, needle, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = run_cli(train.main, [*BASE, "--out", out, *extra], capsys)
    assert_one_error(code, err, needle)
    assert not os.path.exists(out)


def test_diverged_loss_stops_with_one_line_and_saves_nothing(tmp_path, capsys):
    """A loss that turns non-finite stops the run at once (one `error:` line, exit 2): no NaN model is written,
    and a run that never saved leaves no folder."""
    out = str(tmp_path / "run")
    code, _, err = run_cli(train.main, [*BASE, "--lr", "1e30", "--steps", "6", "--warmup-steps", "0", "--out", out],
                           capsys)
    assert_one_error(code, err, "training diverged", "at step", "lower --lr", "nothing was saved")
    assert not os.path.exists(out)


# --------------------------------------------------------------------------------------------- 2. data folders

def _folder(tmp_path, name="data") -> str:
    root = tmp_path / name
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for c in ("a", "b"):
        for i in range(2):
            Image.new("L", (8, 8), 100).save(root / c / f"{i}.png")
    return str(root)


def test_folder_with_fifo_is_refused_not_hung(tmp_path):
    root = _folder(tmp_path)
    os.mkfifo(os.path.join(root, "a", "2.png"))
    with pytest.raises(datasets.DatasetError, match=r"2\.png: not a regular file"):
        datasets.load_dataset("folder", root, image_size=8)


def test_folder_with_dir_named_like_an_image(tmp_path):
    root = _folder(tmp_path)
    os.mkdir(os.path.join(root, "a", "2.png"))
    with pytest.raises(datasets.DatasetError, match=r"2\.png: not a regular file"):
        datasets.load_dataset("folder", root, image_size=8)


def test_folder_eps_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []

    def fake_gs(*a, **k):
        calls.append(a)
        raise OSError("ghostscript ran")

    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake_gs)
    root = _folder(tmp_path)
    with open(os.path.join(root, "a", "2.png"), "w") as f:  # EPS content under a .png name
        f.write("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n")
    with pytest.raises(datasets.DatasetError, match=r"2\.png: not a PNG, JPEG, WebP, BMP, GIF or TIFF image"):
        datasets.load_dataset("folder", root, image_size=8)
    assert calls == []


def test_folder_decompression_bomb_is_one_line(tmp_path):
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)

    root = _folder(tmp_path)
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    with open(os.path.join(root, "a", "bomb.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                + chunk(b"IEND", b""))
    with pytest.raises(datasets.DatasetError, match=r"bomb\.png: ") as e:
        datasets.load_dataset("folder", root, image_size=8)
    assert "\n" not in str(e.value)


def test_folder_16bit_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "d16"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):  # mid grey in 16 bits: 32768 / 65535
            Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / c / f"{i}.png")
    ds = datasets.load_dataset("folder", str(root), image_size=8)
    assert ds.channels == 1
    values = np.concatenate([ds.train_x.ravel(), ds.test_x.ravel()])
    np.testing.assert_allclose(values, 128 / 255 * 2 - 1, atol=1e-6)  # clipping gave 1.0 (white)


def test_bad_folder_leaves_no_out_folder(tmp_path, capsys):
    root = _folder(tmp_path)
    os.mkfifo(os.path.join(root, "b", "9.png"))
    out = str(tmp_path / "run")
    code, _, err = run_cli(train.main, [*BASE, "--dataset", "folder", "--data-path", root, "--image-size", "8",
                                        "--out", out], capsys)
    assert_one_error(code, err, "9.png", "not a regular file")
    assert not os.path.exists(out)


# --------------------------------------------------------------------------------------------- 3. --resume

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A good 2-step run and one of a wider model (its state file is the 'other sizes' case)."""
    base = tmp_path_factory.mktemp("runs")
    ok, big = str(base / "ok"), str(base / "big")
    assert train.main([*BASE, "--out", ok]) == 0
    big_args = list(BASE)
    big_args[big_args.index("--model-channels") + 1] = "16"
    assert train.main([*big_args, "--out", big]) == 0
    return ok, big


def _rewrite_state(path, meta):
    from safetensors.torch import save_file

    tensors, _ = train.load_tensors(path)
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("case, file, needle", [
    ("truncated", "train_state.safetensors", "not a readable safetensors file"),
    ("empty", "train_state.safetensors", "not a readable safetensors file"),
    ("other_sizes", "train_state.safetensors", "other sizes"),
    ("garbage_meta", "train_state.safetensors", "'state' metadata"),
    ("no_meta", "train_state.safetensors", "no 'state' metadata"),
    ("state_is_dir", "train_state.safetensors", "not a regular file"),
    ("config_null", "config.json", "unreadable config"),
    ("config_garbage", "config.json", "unreadable config"),
    ("config_bad_types", "config.json", "unreadable config"),
])
def test_resume_from_bad_run_folder(case, file, needle, runs, tmp_path, capsys):
    ok, big = runs
    run = str(tmp_path / "run")
    shutil.copytree(ok, run)
    state, cfg = os.path.join(run, train.STATE_FILE), os.path.join(run, train.CONFIG_FILE)
    if case == "truncated":
        data = open(state, "rb").read()
        open(state, "wb").write(data[:1000])
    elif case == "empty":
        open(state, "wb").close()
    elif case == "other_sizes":
        shutil.copy(os.path.join(big, train.STATE_FILE), state)
    elif case == "garbage_meta":
        _rewrite_state(state, {"state": "garbage"})
    elif case == "no_meta":
        _rewrite_state(state, None)
    elif case == "state_is_dir":
        os.unlink(state)
        os.mkdir(state)
    elif case == "config_null":
        open(cfg, "w").write("null")
    elif case == "config_garbage":
        open(cfg, "w").write("{bad")
    elif case == "config_bad_types":
        d = json.load(open(cfg))
        d["unet"]["model_channels"] = None
        open(cfg, "w").write(json.dumps(d))
    before = tree_digest(run)
    code, _, err = run_cli(train.main, [*BASE, "--steps", "3", "--resume", "--out", run], capsys)
    assert_one_error(code, err, file, needle)
    assert tree_digest(run) == before  # nothing written, no temp file left


def test_good_resume_still_works(runs, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(runs[0], run)
    code, out, err = run_cli(train.main, [*BASE, "--steps", "3", "--resume", "--out", run], capsys)
    assert code == 0, err
    assert json.loads(out)["resumed_from"] == 2


# --------------------------------------------------------------------------------------------- 4. --out

def test_out_that_is_a_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = run_cli(train.main, [*BASE, "--out", str(f)], capsys)
    assert_one_error(code, err, "not a folder")
    assert f.read_text() == "x"
    code, _, err = run_cli(train.main, [*BASE, "--out", str(f / "x" / "y")], capsys)
    assert_one_error(code, err, "is a file, not a folder")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_out_that_cannot_be_created(capsys):
    code, _, err = run_cli(train.main, [*BASE, "--out", "/proc/fastsd-no-such-run"], capsys)
    assert_one_error(code, err, "--out /proc/fastsd-no-such-run")


# --------------------------------------------------------------------------------------------- 5. sample

@pytest.mark.parametrize("case, needle", [("truncated", "not a readable safetensors file"),
                                          ("other_sizes", "other sizes")])
def test_sample_bad_model_file(case, needle, runs, tmp_path, capsys):
    ok, big = runs
    run = str(tmp_path / "run")
    shutil.copytree(ok, run)
    model = os.path.join(run, train.MODEL_FILE)
    if case == "truncated":
        data = open(model, "rb").read()
        open(model, "wb").write(data[:1000])
    else:
        shutil.copy(os.path.join(big, train.MODEL_FILE), model)
    grid = str(tmp_path / "g.png")
    code, _, err = run_cli(sample.main, [run, "--n", "1", "--steps", "1", "--out", grid, "--no-progress"], capsys)
    assert_one_error(code, err, "model.safetensors", needle)
    assert not os.path.exists(grid)


@pytest.mark.parametrize("tool, extra, needle", [
    ("sample", ["--n", "100000000"], "argument --n: expected an integer from 1 to 256"),  # (hours, then no memory)
    ("sample", ["--scale", "100000"], "argument --scale: expected an integer from 1 to 32"),
    ("sample", ["--scale", "-3"], "argument --scale: expected an integer from 1 to 32"),
    ("sample", ["--cfg-scale", "nan"], "argument --cfg-scale: expected a finite number, got nan"),
    ("sample", ["--seed", "99999999999999999999999"], "argument --seed: expected an integer from 0 to"),
    ("sample", ["--seed", "-1"], "argument --seed: expected an integer from 0 to"),
    ("sample", ["--steps", "0"], "argument --steps: expected an integer from 1 to 1000"),
    ("evaluate", ["--n-per-class", "100000000"], "argument --n-per-class: expected an integer from 2 to 10000"),
    ("evaluate", ["--cfg-scale", "3", "inf"], "argument --cfg-scale: expected a finite number, got inf"),
    ("evaluate", ["--fd-repeats", "0"], "argument --fd-repeats: expected an integer from 1 to 1000"),
])
def test_sample_and_evaluate_options_out_of_range_are_one_line(tool, extra, needle, runs, tmp_path, capsys):
    from fastsd.train import evaluate

    main = sample.main if tool == "sample" else evaluate.main
    out = str(tmp_path / "out.png")
    code, _, err = run_cli(main, [runs[0], *extra, "--no-progress"] + (["--out", out] if tool == "sample" else []),
                           capsys)
    assert_one_error(code, err, needle)
    assert not os.path.exists(out)


def test_out_of_memory_while_training_is_one_line_and_other_errors_are_not_hidden(tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    monkeypatch.setattr(train, "train", oom)
    code, _, err = run_cli(train.main, [*BASE, "--out", str(tmp_path / "run")], capsys)
    assert_one_error(code, err, "out of memory while training", "use a smaller --batch-size")

    def other(*a, **k):
        raise RuntimeError("a bug, not a user's mistake")

    monkeypatch.setattr(train, "train", other)
    with pytest.raises(RuntimeError, match="a bug"):
        train.main([*BASE, "--out", str(tmp_path / "run2")])
