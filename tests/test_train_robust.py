"""fastsd.train as users of diffusers' / kohya's train scripts run it (the s35 bug hunt): divergence, interrupted
checkpoint writes, --fresh, odd image folders, evaluate's output paths, options a dataset does not use."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsd.train import sample, trainer as train
from test_train_inputs import BASE, assert_one_error, one_thread, run_cli, tree_digest  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A 2-step run with its checkpoint (copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("good") / "run")
    assert train.main([*BASE, "--out", out]) == 0
    return out


def _copy(run: str, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(run, dst)
    return dst


def _step(path: str, key: str = "step") -> int:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    return int(meta[key]) if key == "step" else json.loads(meta["state"])["step"]


# --------------------------------------------------------------------------------------------- divergence

def test_divergence_keeps_the_last_good_checkpoint(good_run, tmp_path, capsys, monkeypatch):
    """Extending a good run whose loss then blows up: one error line naming the kept checkpoint; the model and
    state files are the step-2 ones, untouched (no NaN weights written over them)."""
    run = _copy(good_run, tmp_path)
    before = tree_digest(run)
    real = train.Trainer.lr_at
    monkeypatch.setattr(train.Trainer, "lr_at", lambda self, step: 1e30 if step >= 2 else real(self, step))
    code, _, err = run_cli(train.main, [*BASE, "--steps", "8", "--out", run], capsys)
    assert err.startswith("resuming ")
    assert_one_error(code, err.split("\n", 1)[1], "training diverged", "(step 2) was kept")
    assert tree_digest(run) == before


def test_sample_refuses_non_finite_weights(good_run, tmp_path, capsys):
    run = _copy(good_run, tmp_path)
    model = os.path.join(run, train.MODEL_FILE)
    t = load_file(model)
    save_file({k: torch.full_like(v, float("nan")) for k, v in t.items()}, model)
    grid = str(tmp_path / "g.png")
    code, _, err = run_cli(sample.main, [run, "--n", "1", "--steps", "1", "--out", grid, "--no-progress"], capsys)
    assert_one_error(code, err, "model.safetensors", "non-finite weights")
    assert not os.path.exists(grid)


# --------------------------------------------------------------------------------------------- checkpoints

class Killed(BaseException):
    """kill -9 stand-in: nothing after it runs (no save, no clean-up)."""


def _kill_on_write(monkeypatch, n: int):
    """Make the n-th tensor file written from now on 'kill' the process before it lands."""
    real, count = train.save_tensors, [0]

    def save(path, tensors, metadata=None):
        count[0] += 1
        if count[0] == n:
            raise Killed
        return real(path, tensors, metadata)

    monkeypatch.setattr(train, "save_tensors", save)


def test_killed_between_checkpoint_files_never_leaves_a_stale_model(good_run, tmp_path, monkeypatch, capsys):
    """Killed after the first of the two tensor files of the final save, then run again: model.safetensors is the
    final step's EMA, the same as a run that was never killed (it used to stay at the previous checkpoint)."""
    clean = str(tmp_path / "clean")
    shutil.copytree(good_run, clean)
    assert train.main([*BASE, "--steps", "4", "--out", clean]) == 0
    run = _copy(good_run, tmp_path)
    _kill_on_write(monkeypatch, 2)
    with pytest.raises(Killed):
        train.main([*BASE, "--steps", "4", "--out", run])
    monkeypatch.undo()
    assert train.main([*BASE, "--steps", "4", "--out", run]) == 0
    model = os.path.join(run, train.MODEL_FILE)
    assert _step(model) == _step(os.path.join(run, train.STATE_FILE), "state") == 4
    a, b = load_file(model), load_file(os.path.join(clean, train.MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_run_killed_before_its_first_checkpoint_keeps_the_old_run(good_run, tmp_path, monkeypatch, capsys):
    """--fresh with other sizes, killed before it saved: the folder is untouched and the old run still resumes
    (config.json used to be replaced at the start, leaving the new config beside the old state)."""
    run = _copy(good_run, tmp_path)
    before = tree_digest(run)
    wide = [*BASE, "--model-channels", "16", "--steps", "6", "--out", run, "--fresh"]

    def killed(self):
        raise Killed

    monkeypatch.setattr(train.Trainer, "train_step", killed)
    with pytest.raises(Killed):
        train.main(wide)
    monkeypatch.undo()
    assert tree_digest(run) == before
    code, out, err = run_cli(train.main, [*BASE, "--steps", "3", "--out", run], capsys)
    assert code == 0 and json.loads(out)["resumed_from"] == 2, err
    _kill_on_write(monkeypatch, 1)  # killed inside its first save: after config.json, before any tensor file
    with pytest.raises(Killed):
        train.main(wide)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(run, train.STATE_FILE))  # no old state beside the new config
    code, out, err = run_cli(train.main, wide[:-1], capsys)  # the same command without --fresh now just runs
    assert code == 0 and json.loads(out)["resumed_from"] == 0, err


# --------------------------------------------------------------------------------------------- evaluate / sample

@pytest.mark.parametrize("extra, needle", [
    (["--json", "{tmp}/no/such/folder/e.json"], "--json"),
    (["--json", "{tmp}"], "is a folder"),
    (["--grid", "{tmp}/no/such/folder/g.png"], "--grid"),
    (["--grid", "{tmp}/g.txt"], "expected a .png path"),
])
def test_evaluate_output_paths_are_checked_before_any_work(extra, needle, good_run, tmp_path, capsys, monkeypatch):
    """A bad --json / --grid used to be a traceback after the whole evaluation (or a PNG named .txt)."""
    from fastsd.train import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking its outputs"))
    extra = [e.format(tmp=tmp_path) for e in extra]
    code, _, err = run_cli(evaluate.main, [good_run, *extra, "--no-progress"], capsys)
    assert_one_error(code, err, needle)
    assert os.listdir(tmp_path) == []


def test_evaluate_grids_per_scale_keep_the_folder(tmp_path, capsys):
    """Several CFG scales: FILE-cfgN.png beside FILE.png, even when a folder's name holds '.png' (it used to become
    'grids-cfg1.png.d/g.png', a missing folder: a traceback after the evaluation)."""
    from fastsd.train import evaluate

    run = str(tmp_path / "run")
    assert train.main([*BASE, "--conditional", "--out", run]) == 0
    folder = tmp_path / "grids.png.d"
    folder.mkdir()
    grid = str(folder / "g.png")
    code, _, err = run_cli(evaluate.main, [run, "--cfg-scale", "1", "2", "--steps", "1", "--n-per-class", "2",
                                           "--fd-repeats", "1", "--json", str(tmp_path / "e.json"), "--grid", grid,
                                           "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["g-cfg1.png", "g-cfg2.png"]


def test_sample_out_that_is_a_folder_is_one_line(good_run, tmp_path, capsys):
    out = tmp_path / "g.png"
    out.mkdir()
    code, _, err = run_cli(sample.main, [good_run, "--n", "1", "--steps", "1", "--out", str(out), "--no-progress"],
                           capsys)
    assert_one_error(code, err, "is a folder")


# --------------------------------------------------------------------------------------------- image folders

def _pngs(folder, n=2, size=(8, 8)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", size, 40 * i).save(folder / f"{i}.png")


def test_folder_skips_hidden_files(tmp_path):
    """macOS copies leave ._name.jpg AppleDouble files (not images) beside the photos: they are skipped, as in HF
    datasets' imagefolder, instead of failing the whole dataset."""
    from fastsd.train import datasets

    _pngs(tmp_path / "a")
    _pngs(tmp_path / "b")
    (tmp_path / "a" / "._0.png").write_bytes(b"\0\x05\x16\x07 AppleDouble")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0")
    ds = datasets.load_dataset("folder", str(tmp_path), image_size=8)
    assert ds.class_names == ["a", "b"] and len(ds.train_x) + len(ds.test_x) == 4


def test_folder_applies_exif_orientation(tmp_path):
    """A phone JPEG stored landscape with Orientation 6 (rotate 90) is trained upright: its bright top half, as
    stored, becomes the right half."""
    from PIL import Image

    from fastsd.train import datasets

    im = Image.new("L", (16, 16), 0)
    im.paste(255, (0, 0, 16, 8))  # stored: top half white
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "a").mkdir()
    im.save(tmp_path / "a" / "photo.jpg", exif=exif, quality=100)
    x = datasets.load_image_folder(str(tmp_path), 16).train_x[0, 0]
    assert x[:, 12:].mean() > 0.8 and x[:, :4].mean() < -0.8  # shown: right half white


def test_folder_refuses_a_class_without_images(tmp_path):
    """torchvision's ImageFolder refuses this too: a class that is never trained would still get an embedding."""
    from fastsd.train import datasets

    _pngs(tmp_path / "a")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "0.txt").write_text("a caption")
    with pytest.raises(datasets.DatasetError, match="class folder 'captions' has no images"):
        datasets.load_dataset("folder", str(tmp_path), image_size=8)


def test_flat_folder_is_one_class_and_loose_images_beside_classes_are_refused(tmp_path):
    """diffusers' imagefolder layout (images, maybe a metadata.jsonl, no subfolders) is one class; images beside
    class folders would be silently left out, so they are refused."""
    from fastsd.train import datasets

    flat = tmp_path / "pets"
    _pngs(flat, 3)
    (flat / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a pet"}\n')
    ds = datasets.load_dataset("folder", str(flat), image_size=8)
    assert ds.class_names == ["pets"] and len(ds.train_x) + len(ds.test_x) == 3
    _pngs(flat / "cats")
    with pytest.raises(datasets.DatasetError, match=r"3 image\(s\) beside the class subfolders"):
        datasets.load_dataset("folder", str(flat), image_size=8)


def test_folder_broken_symlink_is_named_as_such(tmp_path):
    from fastsd.train import datasets

    _pngs(tmp_path / "a")
    os.symlink(tmp_path / "gone.png", tmp_path / "a" / "2.png")
    with pytest.raises(datasets.DatasetError, match=r"2\.png: a broken symbolic link"):
        datasets.load_dataset("folder", str(tmp_path), image_size=8)


# --------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("extra, needle", [
    (["--data-path", "."], "--data-path: the digits dataset is built in"),  # forgot --dataset folder: trained digits
    (["--channels", "3"], "--channels: only for --dataset folder"),
])
def test_options_the_dataset_does_not_use_are_refused(extra, needle, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = run_cli(train.main, [*BASE, "--out", out, *extra], capsys)
    assert_one_error(code, err, needle)
    assert not os.path.exists(out)


def test_resume_names_the_changed_options(good_run, tmp_path, capsys):
    run = _copy(good_run, tmp_path)
    before = tree_digest(run)
    code, _, err = run_cli(train.main, [*BASE, "--lr", "0.001", "--conditional", "--out", run], capsys)
    assert_one_error(code, err, "other settings", "--lr 0.002 there, 0.001 now", "--conditional False there, True now")
    assert tree_digest(run) == before


def test_steps_below_the_checkpoint_say_so_and_change_nothing(good_run, tmp_path, capsys):
    """--steps 1 on a step-2 run: said in a line; config.json keeps steps 2 (it used to be rewritten with 1 while
    the model stayed at step 2) and the checkpoint files stay as they were."""
    run = _copy(good_run, tmp_path)
    keep = ("config.json", train.MODEL_FILE, train.STATE_FILE)
    before = {k: v for k, v in tree_digest(run).items() if k in keep}
    code, out, err = run_cli(train.main, [*BASE, "--steps", "1", "--out", run], capsys)
    assert code == 0 and json.loads(out)["steps"] == 2, err
    assert "already at step 2 (--steps 1): nothing to train" in err
    assert {k: v for k, v in tree_digest(run).items() if k in keep} == before


def test_evaluate_on_a_too_small_held_out_split_is_one_line(tmp_path, capsys):
    """2 images per class hold out 1 each: halves of one image have no covariance (numpy warnings, then 'error:
    Eigenvalues did not converge' or a NaN distance); now a clear line before any sampling."""
    from fastsd.train import evaluate

    for c in ("a", "b"):
        _pngs(tmp_path / "data" / c)
    run = str(tmp_path / "run")
    assert train.main([*BASE, "--dataset", "folder", "--data-path", str(tmp_path / "data"), "--image-size", "8",
                       "--out", run]) == 0
    capsys.readouterr()
    code, _, err = run_cli(evaluate.main, [run, "--steps", "1", "--n-per-class", "2", "--no-progress"], capsys)
    assert_one_error(code, err, "held-out split has 2 image(s)", "too small")
    assert not os.path.exists(os.path.join(run, "eval.json"))


def test_ctrl_c_while_the_data_loads_is_one_line(tmp_path, capsys, monkeypatch):
    """Before the signal handlers are set (the data is loading) Ctrl-C used to print a KeyboardInterrupt traceback."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_dataset", interrupted)
    out = str(tmp_path / "run")
    code, _, err = run_cli(train.main, [*BASE, "--out", out], capsys)
    assert code == 130 and err.strip() == "interrupted before training started; nothing was written", err
    assert not os.path.exists(out)


def test_second_ctrl_c_during_the_save_does_not_lose_the_run(tmp_path, capsys, monkeypatch):
    """An impatient second Ctrl-C arriving while the first one's checkpoint is written used to break off that save,
    and a run without an earlier checkpoint then had its whole folder removed."""
    import signal

    real_step, real_save = train.Trainer.train_step, train.Trainer.save

    def step(self):
        loss = real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    def save(self, out):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(self, out)

    monkeypatch.setattr(train.Trainer, "train_step", step)
    monkeypatch.setattr(train.Trainer, "save", save)
    out = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)
    code, _, err = run_cli(train.main, [*BASE, "--steps", "50", "--out", out], capsys)
    assert code == 130, err
    assert "interrupted; the checkpoint" in err
    assert _step(os.path.join(out, train.STATE_FILE), "state") == 3 == _step(os.path.join(out, train.MODEL_FILE))
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored


# --------------------------------------------------------------------------------------------- labels

def test_cifar100_python_file_gets_its_100_classes(tmp_path, capsys):
    """CIFAR-100's python 'train' file (fine_labels 0..99, names in 'meta') given to --dataset cifar10: its labels
    used to index past a 10-class embedding (an IndexError traceback once training started)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"fine_labels": [0, 1, 2, 3, 96, 97, 98, 99]}
    (tmp_path / "train").write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"n{i}".encode() for i in range(100)]
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    run = str(tmp_path / "run")
    code, _, err = run_cli(train.main, [*BASE, "--dataset", "cifar10", "--data-path", str(tmp_path / "train"),
                                        "--conditional", "--image-size", "8", "--out", run], capsys)
    assert code == 0, err
    cfg = train.load_run_config(run)
    assert cfg.num_classes == 100 and cfg.class_names[99] == "n99"


def test_held_out_label_outside_the_classes_is_refused(tmp_path):
    """MNIST-style files whose t10k labels go past the training labels' classes: one DatasetError, not an
    IndexError when evaluate labels them."""
    import numpy as np

    from fastsd.train import datasets
    from test_train import _write_idx

    imgs = np.zeros((10, 4, 4))
    _write_idx(str(tmp_path / "train-images-idx3-ubyte"), imgs)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.arange(10) % 3)
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), imgs[:2])
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.array([0, 7]))
    with pytest.raises(datasets.DatasetError, match=r"held-out labels run 0\.\.7 but there are 3 classes"):
        datasets.load_dataset("mnist", str(tmp_path))


def test_folder_images_are_made_small_as_they_are_read(tmp_path, monkeypatch):
    """Only one full-size image is alive at a time (a folder of 12-megapixel photos was held in memory whole before
    any was resized: ~36 MB each); the pixels are the same as resizing after reading them all."""
    import weakref

    from fastsd.train import datasets

    _pngs(tmp_path / "a", 3, size=(64, 48))
    _pngs(tmp_path / "b", 3, size=(64, 48))
    real, alive = datasets.read_image, []

    def read(path):
        assert sum(r() is not None for r in alive) == 0, "a full-size image is still held"
        im = real(path)
        alive.append(weakref.ref(im))
        return im

    monkeypatch.setattr(datasets, "read_image", read)
    ds = datasets.load_image_folder(str(tmp_path), 8)
    assert len(alive) == 6 and ds.channels == 1 and ds.train_x.shape[1:] == (1, 8, 8)


# --------------------------------------------------------------------------------------------- one writer

def test_a_second_trainer_on_the_same_run_is_refused(good_run, tmp_path, capsys):
    """Two trainers on one --out (launched twice by mistake) used to both train and overwrite each other's
    checkpoints; the one that comes second is now one line, exit 2, and changes nothing."""
    import fcntl

    run = _copy(good_run, tmp_path)
    before = tree_digest(run)
    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first trainer holds while it runs
    try:
        code, _, err = run_cli(train.main, [*BASE, "--steps", "4", "--out", run], capsys)
    finally:
        os.close(fd)
    assert_one_error(code, err, "another fastsd.train run is writing there")
    assert tree_digest(run) == before
    code, out, err = run_cli(train.main, [*BASE, "--steps", "3", "--out", run], capsys)  # free again
    assert code == 0 and json.loads(out)["steps"] == 3, err


def test_temp_files_of_a_killed_save_are_removed(good_run, tmp_path, capsys):
    """kill -9 during an atomic write leaves its `.fastsd-*.part` temp file (a whole checkpoint's size); the next
    session of the run removes those a minute old (a fresh one may be a sample/evaluate write in progress)."""
    import time

    run = _copy(good_run, tmp_path)
    old, new = os.path.join(run, ".fastsd-killed.part"), os.path.join(run, ".fastsd-writing.part")
    for p in (old, new):
        open(p, "wb").write(b"\0" * 100)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    code, _, err = run_cli(train.main, [*BASE, "--steps", "3", "--out", run], capsys)
    assert code == 0, err
    assert not os.path.exists(old) and os.path.exists(new)
