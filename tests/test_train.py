"""Training a small model: a few-step run + sampling + evaluation (smoke), exact resume, dataset loaders,
the Frechet distance, and the CLI's one-line errors. The full digits run is a documented command (README)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd.train import datasets, evaluate, sample, trainer as train

TINY_ARGS = ["--model-channels", "16", "--num-res-blocks", "1", "--norm-groups", "4", "--num-heads", "2",
             "--context-dim", "16", "--batch-size", "16", "--log-every", "2", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: with 2 threads on a busy 2-core machine every op can wait a scheduler time slice
    for the second thread (a 6-step run took 20 s instead of 0.2 s), so the tests use one and restore it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return datasets.load_dataset("digits")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train.main(["--dataset", "digits", "--conditional", "--steps", "6", "--save-every", "4", "--out", out,
                       *TINY_ARGS]) == 0
    return out


def test_digits_dataset(digits):
    assert digits.train_x.shape[1:] == (1, 8, 8) and digits.train_x.dtype == np.float32
    assert len(digits.train_x) + len(digits.test_x) == 1797
    assert digits.train_x.min() == -1.0 and digits.train_x.max() == 1.0
    assert digits.num_classes == 10 and set(np.unique(digits.test_y)) == set(range(10))
    again = datasets.load_dataset("digits")  # the split is fixed
    np.testing.assert_array_equal(again.test_y, digits.test_y)
    np.testing.assert_array_equal(again.test_x, digits.test_x)


def test_train_sample_evaluate_smoke(tiny_run, tmp_path, capsys):
    for f in ("config.json", "model.safetensors", "train_state.safetensors", "loss.png", "train_summary.json"):
        assert os.path.exists(os.path.join(tiny_run, f)), f
    run = train.load_run_config(tiny_run)
    assert run.num_classes == 10 and run.unet.in_channels == 1 and run.unet.context_dim == 16
    assert run == train.RunConfig.from_json(run.to_json())
    summary = json.load(open(os.path.join(tiny_run, "train_summary.json")))
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])

    grid = str(tmp_path / "grid.png")
    assert sample.main([tiny_run, "--class", "all", "--n", "3", "--steps", "3", "--sampler", "ddpm",
                        "--out", grid, "--no-progress"]) == 0
    with Image.open(grid) as im:
        assert im.size == ((1 + 3 * 9) * 4, (1 + 10 * 9) * 4)  # 3 columns, one row per class, 8 px + 1 pad, x4
    one = str(tmp_path / "seven.png")
    assert sample.main([tiny_run, "--class", "7", "--n", "4", "--steps", "2", "--cfg-scale", "3",
                        "--out", one, "--no-progress"]) == 0
    assert os.path.exists(one)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fastsd-")]  # no temp files left

    out_json = str(tmp_path / "eval.json")
    assert evaluate.main([tiny_run, "--n-per-class", "4", "--steps", "2", "--fd-repeats", "2",
                          "--cfg-scale", "1", "3", "--json", out_json, "--no-progress"]) == 0
    res = json.load(open(out_json))
    assert res["classifier_heldout_accuracy"] > 0.9  # the MLP on real digits
    assert [r["cfg_scale"] for r in res["results"]] == [1.0, 3.0]
    for r in res["results"]:
        assert len(r["per_class_accuracy"]) == 10 and 0 <= r["mean_accuracy"] <= 1
        assert np.isfinite(r["fd"]) and r["floor"] > 0
    assert "| CFG scale |" in capsys.readouterr().out


def test_sampling_is_seeded(tiny_run):
    model, run = sample.load_run(tiny_run)
    a = sample.generate(model, run, [1, 2, None], cfg_scale=2.0, sampler="ddim", steps=3, seed=5)
    b = sample.generate(model, run, [1, 2, None], cfg_scale=2.0, sampler="ddim", steps=3, seed=5)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1


def _tiny_run_config(digits, steps=6):
    args = train.build_parser().parse_args(["--conditional", "--steps", str(steps), *TINY_ARGS])
    return train.config_from_args(args, digits)


def test_resume_is_exact(digits, tmp_path):
    run = _tiny_run_config(digits)
    straight = train.Trainer(run, digits)
    for _ in range(6):
        straight.train_step()
    first = train.Trainer(run, digits)
    for _ in range(3):
        first.train_step()
    first.save(str(tmp_path))
    torch.manual_seed(123)  # disturb the global RNG: load must restore it
    resumed = train.Trainer(run, digits)
    resumed.load(str(tmp_path))
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_resumes_and_extends(tiny_run, tmp_path, capsys):
    import shutil

    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--dataset", "digits", "--conditional", "--steps", "7", "--out", out, *TINY_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"] == 6 and summary["steps"] == 7
    # a different config in the same folder is refused, not silently mixed
    assert train.main(["--dataset", "digits", "--steps", "8", "--out", out, *TINY_ARGS]) == 2
    assert "other settings" in capsys.readouterr().err


def test_unconditional_run(tmp_path):
    out = str(tmp_path / "u")
    assert train.main(["--dataset", "digits", "--steps", "2", "--out", out, "--schedule", "scaled_linear",
                       *TINY_ARGS]) == 0
    run = train.load_run_config(out)
    assert run.num_classes == 0 and run.scheduler.beta_schedule == "scaled_linear"
    assert sample.main([out, "--n", "2", "--steps", "2", "--out", str(tmp_path / "u.png"), "--no-progress"]) == 0
    assert sample.main([out, "--class", "3", "--out", str(tmp_path / "x.png")]) == 2  # no classes to pick


@pytest.mark.parametrize("argv, msg", [
    (["--dataset", "mnist", "--data-path", "/nonexistent/mnist"], "no such file or folder"),
    (["--dataset", "cifar10"], "needs --data-path"),
    (["--dataset", "digits", "--resume", "--out", "/nonexistent/run"], "--resume"),
])
def test_train_cli_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1]


def test_sample_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([str(tmp_path / "missing")])
    assert e.value.code == 2
    assert sample.main([str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2  # a folder but no run in it
    assert "config.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- loaders

def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 28, 28))
    _write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.arange(20) % 10)
    ds = datasets.load_dataset("mnist", str(tmp_path))
    assert ds.train_x.shape[1:] == (1, 28, 28) and len(ds.train_x) + len(ds.test_x) == 20
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), imgs[:5])
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.arange(5))
    ds = datasets.load_dataset("mnist", str(tmp_path / "train-images-idx3-ubyte.gz"), image_size=16)
    assert len(ds.train_x) == 20 and len(ds.test_x) == 5 and ds.train_x.shape[2:] == (16, 16)
    np.testing.assert_allclose(datasets.load_dataset("mnist", str(tmp_path)).test_x[:, 0],
                               imgs[:5] / 255 * 2 - 1, atol=1e-6)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    (tmp_path / "bad" / "train-labels-idx1-ubyte").write_bytes(b"nope")
    with pytest.raises(datasets.DatasetError, match="not an IDX"):
        datasets.load_dataset("mnist", str(tmp_path / "bad"))


def test_cifar_batches(tmp_path):
    rng = np.random.default_rng(0)
    for i in (1, 2):
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": list(range(6))}
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    ds = datasets.load_dataset("cifar10", str(tmp_path))
    assert ds.train_x.shape[1:] == (3, 32, 32) and len(ds.train_x) + len(ds.test_x) == 12
    assert ds.class_names[3] == "c3"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(datasets.DatasetError, match="refusing global"):
        datasets.load_dataset("cifar10", str(tmp_path))


def test_image_folder(tmp_path):
    for cls, value in (("cats", 0), ("dogs", 255)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (20, 20), value).save(tmp_path / cls / f"{i}.png")
    ds = datasets.load_dataset("folder", str(tmp_path), image_size=8)
    assert ds.class_names == ["cats", "dogs"] and ds.channels == 1 and ds.train_x.shape[2:] == (8, 8)
    assert len(ds.test_x) == 2  # one held-out image per class
    assert set(np.unique(ds.train_x[ds.train_y == 1])) == {1.0}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(datasets.DatasetError, match="no images"):
        datasets.load_dataset("folder", str(empty))


# --------------------------------------------------------------------------------------------- metric

def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    assert abs(evaluate.frechet_distance(a, a)) < 1e-8
    shifted = a + np.array([1.0, 0, 0, 0])
    assert evaluate.frechet_distance(a, shifted) == pytest.approx(1.0, abs=1e-6)
    scaled = a * 2  # |mu|^2 + Tr(S + 4S - 2 sqrt(4 S^2)) = |mu|^2 + Tr(S)
    expected = (a.mean(0) ** 2).sum() + np.var(a, axis=0, ddof=1).sum()
    assert evaluate.frechet_distance(a, scaled) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("n_gen,size", [(500, 200), (40, 40)])
def test_fd_and_its_floor_are_measured_at_one_sample_size(monkeypatch, n_gen, size):
    """Half the held-out images against as many samples, and the floor between two such halves; with fewer
    samples than half, all three sets are cut to their number (FD's small-sample bias alike on both)."""
    sizes, real_fd = [], evaluate.frechet_distance
    monkeypatch.setattr(evaluate, "frechet_distance", lambda a, b: sizes.append((len(a), len(b))) or real_fd(a, b))
    rng = np.random.default_rng(0)
    out = evaluate.fd_with_floor(rng.normal(size=(401, 4)), rng.normal(size=(n_gen, 4)), repeats=3)
    assert sizes[:-1] == [(size, size)] * 6 and sizes[-1] == (401, n_gen) and out["half_size"] == size


@pytest.mark.parametrize("module", ["fastsd.train.trainer", "fastsd.train.evaluate"])
def test_missing_train_extra_is_one_line(tmp_path, module):
    """Without scikit-learn (the `train` extra): one error line naming the extra, no traceback."""
    import subprocess
    import sys

    args = ["--dataset", "digits", "--steps", "1", "--out", str(tmp_path)] if module.endswith("trainer") else \
        [str(tmp_path)]
    code = (f"import sys; sys.modules['sklearn'] = None; from {module} import main; "
            f"sys.exit(main({args!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "pip install -e \".[train]\"" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
