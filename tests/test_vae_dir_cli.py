"""--vae-dir (default $FASTSD_VAE_DIR) for python -m fastsd.generate and python -m fastsd.batch: A1111's models/VAE,
listed as the server lists it (fastsd.vae_files.listed_vaes). A1111's "Automatic" finds there the first file whose
name starts with the checkpoint's stem (a NAME.vae.* beside the checkpoint still first), --vae NAME names a file of
it by file name or stem (A1111's sd_vae), and a bad folder or an unknown name is one line, exit 2, nothing written.
Tiny random models and VAEs in tmp folders (test_vae_automatic's)."""
import json
import os

import numpy as np
import pytest
import safetensors.torch
from PIL import Image
from test_generate_cli import _fails  # one-line error, exit 2, nothing written
from test_vae_automatic import CLI, NOTE, models, vae_weights  # noqa: F401 (models: a fixture, as ckpts)

from fastsd.batch.__main__ import main as batch_main
from fastsd.file_hashes import file_hash
from fastsd.generate import main
from fastsd.image import parse_infotext
from fastsd.vae_files import cli_vae

FOLDER_NOTE = ('fastsd: VAE dreamy-ft.safetensors in --vae-dir, named as the model (A1111\'s "Automatic"); --vae '
               'none uses the checkpoint\'s own')


@pytest.fixture(autouse=True)
def _no_vae_dir_from_the_environment(monkeypatch):
    monkeypatch.delenv("FASTSD_VAE_DIR", raising=False)


@pytest.fixture(scope="module")
def ckpts(request):
    """test_vae_automatic's models: models/dreamy.safetensors with dreamy.vae.pt beside it, plain/dreamy.safetensors
    (the same checkpoint, nothing beside it)."""
    return request.getfixturevalue("models")


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """A1111's models/VAE: dreamy-ft.safetensors (named as the checkpoint dreamy.safetensors), aaa.safetensors (first
    by name, another model's), sub/mse.safetensors (in a subfolder) and a file that is no VAE file."""
    root = tmp_path_factory.mktemp("vae-dir") / "VAE"
    (root / "sub").mkdir(parents=True)
    for name, seed in (("dreamy-ft.safetensors", 31), ("aaa.safetensors", 32), ("sub/mse.safetensors", 33)):
        safetensors.torch.save_file(vae_weights(seed), str(root / name))
    (root / "notes.txt").write_text("not a VAE")
    return root


def generate(tmp_path, capsys, name: str, *args):
    """(image, infotext keys, stderr) of a generate run writing tmp_path/NAME.png."""
    out = tmp_path / f"{name}.png"
    assert main([*CLI, *args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB")), parse_infotext(im.text["parameters"])[2], err


def test_automatic_finds_the_file_named_as_the_checkpoint_in_the_folder(ckpts, vaes, tmp_path, capsys):
    plain = str(ckpts / "plain" / "dreamy.safetensors")  # (nothing beside it)
    auto, keys, err = generate(tmp_path, capsys, "auto", "--model", plain, "--vae-dir", str(vaes))
    assert FOLDER_NOTE in err.splitlines(), err
    assert keys["VAE"] == "dreamy-ft.safetensors" and keys["VAE hash"] == file_hash(str(vaes / "dreamy-ft.safetensors"))
    explicit, explicit_keys, _ = generate(tmp_path, capsys, "explicit", "--model", plain, "--vae",
                                          str(vaes / "dreamy-ft.safetensors"))
    assert np.array_equal(auto, explicit) and keys == explicit_keys
    own, own_keys, err = generate(tmp_path, capsys, "none", "--model", plain, "--vae-dir", str(vaes), "--vae", "none")
    assert "VAE" not in own_keys and "--vae-dir" not in err and not np.array_equal(own, auto)
    _, keys, _ = generate(tmp_path, capsys, "random", "--model", "random:tiny", "--vae-dir", str(vaes))
    assert "VAE" not in keys  # a model that is no file has no Automatic VAE


def test_the_vae_beside_the_checkpoint_comes_first(ckpts, vaes, tmp_path, capsys):
    """fastsd's order (A1111's find_vae_near_checkpoint up to 1.2: NAME.vae.pt / .ckpt / .safetensors beside the
    checkpoint first): dreamy.vae.pt beside the model, though dreamy-ft.safetensors comes first by name."""
    ckpt = str(ckpts / "models" / "dreamy.safetensors")
    assert cli_vae(None, ckpt, str(vaes)) == (None, None)  # (left to load_pipeline, which says so)
    _, keys, err = generate(tmp_path, capsys, "beside", "--model", ckpt, "--vae-dir", str(vaes))
    assert NOTE in err.splitlines() and FOLDER_NOTE not in err, err
    assert keys["VAE"] == "dreamy.vae.pt"


def test_vae_names_a_file_of_the_folder_by_name_or_stem(ckpts, vaes, tmp_path, capsys):
    plain = str(ckpts / "plain" / "dreamy.safetensors")
    runs = {name: generate(tmp_path, capsys, name.replace(".", "_"), "--model", plain, "--vae-dir", str(vaes),
                           "--vae", name) for name in ("mse", "mse.safetensors", "aaa")}
    assert runs["mse"][1]["VAE"] == "mse.safetensors" == runs["mse.safetensors"][1]["VAE"]  # (in a subfolder)
    assert runs["mse"][1]["VAE hash"] == file_hash(str(vaes / "sub" / "mse.safetensors"))
    assert np.array_equal(runs["mse"][0], runs["mse.safetensors"][0])
    assert runs["aaa"][1]["VAE"] == "aaa.safetensors" and not np.array_equal(runs["aaa"][0], runs["mse"][0])
    assert all(FOLDER_NOTE not in run[2] for run in runs.values())
    # a file beside the model file is listed too (as the server's /sd-vae lists it)
    _, keys, _ = generate(tmp_path, capsys, "beside", "--model", str(ckpts / "models" / "dreamy.safetensors"),
                          "--vae-dir", str(vaes), "--vae", "dreamy.vae.pt")
    assert keys["VAE"] == "dreamy.vae.pt"


def test_the_infotexts_vae_names_a_file_of_the_folder(ckpts, vaes, tmp_path, capsys):
    """--infotext "VAE: NAME" (A1111's paste sets sd_vae to it, a name of its vae_dict): the folder's file too."""
    text = tmp_path / "p.txt"
    text.write_text("a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32, VAE: aaa.safetensors")
    out = tmp_path / "x.png"
    assert main(["--infotext", str(text), *CLI[1:], "--model", str(ckpts / "plain" / "dreamy.safetensors"),
                 "--vae-dir", str(vaes), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fastsd: VAE aaa.safetensors in --vae-dir, as the --infotext names it" in err and "may differ" not in err
    with Image.open(out) as im:
        assert parse_infotext(im.text["parameters"])[2]["VAE"] == "aaa.safetensors"


def test_the_folder_defaults_to_the_environment(ckpts, vaes, tmp_path, capsys, monkeypatch):
    plain = str(ckpts / "plain" / "dreamy.safetensors")
    monkeypatch.setenv("FASTSD_VAE_DIR", str(vaes))
    _, keys, err = generate(tmp_path, capsys, "env", "--model", plain)
    assert keys["VAE"] == "dreamy-ft.safetensors" and FOLDER_NOTE in err.splitlines(), err
    _, keys, _ = generate(tmp_path, capsys, "env-name", "--model", plain, "--vae", "aaa")
    assert keys["VAE"] == "aaa.safetensors"
    monkeypatch.setenv("FASTSD_VAE_DIR", str(tmp_path / "nonexistent"))
    _fails(["--model", plain], tmp_path, capsys, f"$FASTSD_VAE_DIR {tmp_path / 'nonexistent'}: no such folder")
    _, keys, _ = generate(tmp_path, capsys, "flag", "--model", plain, "--vae-dir", str(vaes))  # --vae-dir wins
    assert keys["VAE"] == "dreamy-ft.safetensors"


def test_a_bad_folder_or_an_unknown_name_is_one_line(ckpts, vaes, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    _fails(["--vae-dir", str(missing)], tmp_path, capsys, f"--vae-dir {missing}: no such folder")
    _fails(["--vae-dir", str(vaes / "notes.txt")], tmp_path, capsys, f"--vae-dir {vaes / 'notes.txt'}: not a folder")
    err = _fails(["--vae-dir", str(vaes), "--vae", "nosuch"], tmp_path, capsys, "--vae nosuch: no such file or folder")
    assert f"the VAE folder {vaes}" in err and "aaa.safetensors, dreamy-ft.safetensors, mse.safetensors" in err, err
    _fails(["--vae-dir", str(vaes), "--vae", "notes"], tmp_path, capsys, "--vae notes:")  # (no VAE file)
    # with no folder and nothing beside the model: as before, the path that is not there
    _fails(["--vae", "dreamy-ft"], tmp_path, capsys, "dreamy-ft: no such file or folder")


def test_an_unreadable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    listdir = os.listdir

    def refused(path="."):  # (as a folder without read permission, for root too)
        if os.path.abspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refused)
    _fails(["--vae-dir", str(locked)], tmp_path, capsys, f"--vae-dir {locked}: can't be read (Permission denied)")


# ---- fastsd.batch ------------------------------------------------------------------------------------------------

BATCH = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--sampler", "euler", "--no-progress",
         "--dtype", "fp32", "--backend", "torch"]


def run_batch(tmp_path, name: str, *args) -> int:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat", "id": "a"}\n')
    return batch_main([str(jobs), *BATCH, *args, "--out", str(tmp_path / name)])


def manifest(folder) -> tuple[dict, dict]:
    """(the manifest's row, the image's infotext keys) of job a."""
    row = json.loads((folder / "manifest.jsonl").read_text().splitlines()[-1])
    with Image.open(folder / "a.png") as im:
        return row, parse_infotext(im.text["parameters"])[2]


def test_batch_takes_the_folder_and_labels_the_run_with_the_vae(ckpts, vaes, tmp_path, capsys, monkeypatch):
    plain = str(ckpts / "plain" / "dreamy.safetensors")
    label = f"{os.path.abspath(plain)} with VAE {vaes / 'dreamy-ft.safetensors'}"
    assert run_batch(tmp_path, "auto", "--model", plain, "--vae-dir", str(vaes)) == 0
    assert FOLDER_NOTE in capsys.readouterr().err.splitlines()
    row, keys = manifest(tmp_path / "auto")
    assert row["model"] == label and keys["VAE"] == "dreamy-ft.safetensors"
    monkeypatch.setenv("FASTSD_VAE_DIR", str(vaes))
    assert run_batch(tmp_path, "named", "--model", plain, "--vae", "mse") == 0
    row, keys = manifest(tmp_path / "named")
    assert row["model"] == f"{os.path.abspath(plain)} with VAE {vaes / 'sub' / 'mse.safetensors'}"
    assert keys["VAE"] == "mse.safetensors"


def test_batch_bad_folder_or_unknown_name_is_a_usage_error(ckpts, vaes, tmp_path, capsys):
    plain = str(ckpts / "plain" / "dreamy.safetensors")
    for args, match in ((["--vae-dir", str(tmp_path / "nonexistent")], "--vae-dir"),
                        (["--vae-dir", str(vaes), "--vae", "nosuch"], "--vae nosuch: no such file or folder")):
        assert run_batch(tmp_path, "out", "--model", plain, *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
        assert not (tmp_path / "out").exists()
