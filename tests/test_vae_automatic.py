"""A1111's "Automatic" VAE (its sd_vae option's default, modules/sd_vae.py): a checkpoint NAME.safetensors with a VAE
file beside it (NAME.vae.pt / .vae.ckpt / .vae.safetensors, else the first listed one whose name starts with NAME)
runs that VAE instead of its own, in load_pipeline, the generate CLI and the server alike; `none` (A1111's "None")
keeps the checkpoint's own, an explicit --vae wins, the infotext records "VAE: NAME.vae.pt" / "VAE hash", and a
broken file beside the model is one line (exit 2). Tiny random models written to a tmp folder."""
import os
import shutil
import warnings

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from fastsd import CheckpointError, load_pipeline
from fastsd.config import TINY
from fastsd.file_hashes import file_hash
from fastsd.generate import main
from fastsd.image import parse_infotext
from fastsd.models.vae import AutoencoderKL
from fastsd.vae_files import AutomaticVAE, vae_near_checkpoint

GEN = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "seed": 3, "sampler": "euler"}
CLI = ["a cat", "--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--sampler", "euler",
       "--no-progress", "--dtype", "fp32", "--backend", "torch"]
NOTE = 'fastsd: VAE dreamy.vae.pt beside the model (A1111\'s "Automatic"); --vae none uses the checkpoint\'s own'


def vae_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in AutoencoderKL(TINY.vae).state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/dreamy.safetensors with dreamy.vae.pt beside it (A1111's style: a .pt of the VAE's state dict), another
    VAE file, and plain/dreamy.safetensors: the same checkpoint with nothing beside it."""
    from fastsd.checkpoint import ldm_state_dict

    root = tmp_path_factory.mktemp("automatic")
    (root / "models").mkdir()
    (root / "plain").mkdir()
    sd = ldm_state_dict(load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch"))
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "models" / "dreamy.safetensors"))
    shutil.copy(root / "models" / "dreamy.safetensors", root / "plain" / "dreamy.safetensors")
    torch.save({"state_dict": vae_weights(21)}, root / "models" / "dreamy.vae.pt")
    safetensors.torch.save_file(vae_weights(22), str(root / "other.safetensors"))
    return root


def image(pipe) -> np.ndarray:
    return np.asarray(pipe.generate(**GEN, progress=False)[0])


def load(path, **kw):
    return load_pipeline(str(path), device="cpu", dtype="fp32", backend="torch", **kw)


def test_the_vae_beside_the_checkpoint_is_loaded_as_with_vae(models):
    ckpt, beside = models / "models" / "dreamy.safetensors", models / "models" / "dreamy.vae.pt"
    with pytest.warns(AutomaticVAE) as got:
        pipe = load(ckpt)
    assert [str(w.message) for w in got] == [NOTE.removeprefix("fastsd: ")]
    assert pipe.vae_name == "dreamy.vae.pt" and pipe.vae_path == str(beside)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit VAE, "none" and "Automatic"-less models say nothing
        explicit = load(ckpt, vae=str(beside))
        own = load(ckpt, vae="none")
        plain = load(models / "plain" / "dreamy.safetensors")
        other = load(ckpt, vae=str(models / "other.safetensors"))
    assert np.array_equal(image(pipe), image(explicit))
    assert own.vae_name is None and plain.vae_name is None and np.array_equal(image(own), image(plain))
    assert not np.array_equal(image(own), image(pipe))
    assert other.vae_name == "other.safetensors" and not np.array_equal(image(other), image(pipe))  # --vae wins
    for word in ("None", "NONE"):
        assert load(ckpt, vae=word).vae_name is None
    with pytest.warns(AutomaticVAE):
        assert load(ckpt, vae="Automatic").vae_name == "dreamy.vae.pt"
    params = parse_infotext(pipe.generate(**GEN, progress=False)[0].info["parameters"])[2]
    assert params["VAE"] == "dreamy.vae.pt" and params["VAE hash"] == file_hash(str(beside))  # as A1111's


def test_a1111s_rule_for_the_file_near_a_checkpoint(tmp_path):
    """NAME.vae.pt, .vae.ckpt, .vae.safetensors beside it in that order; else the first file (A1111's natural order)
    of those beside it and the listed ones whose name starts with NAME; never the checkpoint itself."""
    ckpt = tmp_path / "anime-v2.safetensors"
    ckpt.write_bytes(b"")
    assert vae_near_checkpoint(str(ckpt)) is None and vae_near_checkpoint(None) is None
    assert vae_near_checkpoint("random:tiny") is None and vae_near_checkpoint(str(tmp_path)) is None
    (tmp_path / "anime.vae.pt").write_bytes(b"")  # another checkpoint's: its name does not start with anime-v2
    (tmp_path / "readme.txt").write_bytes(b"")
    assert vae_near_checkpoint(str(ckpt)) is None
    (tmp_path / "anime-v2-fp16.vae.safetensors").write_bytes(b"")
    (tmp_path / "anime-v2-10.vae.pt").write_bytes(b"")
    (tmp_path / "anime-v2-9.vae.pt").write_bytes(b"")
    assert vae_near_checkpoint(str(ckpt)) == str(tmp_path / "anime-v2-9.vae.pt")  # natural order: 9 before 10
    listed = {"anime-v2-1.safetensors": "/elsewhere/anime-v2-1.safetensors"}
    assert vae_near_checkpoint(str(ckpt), listed) == "/elsewhere/anime-v2-1.safetensors"
    for name in ("anime-v2.vae.safetensors", "anime-v2.vae.ckpt", "anime-v2.vae.pt"):
        (tmp_path / name).write_bytes(b"")
        assert vae_near_checkpoint(str(ckpt), listed) == str(tmp_path / name)
    itself = tmp_path / "solo.vae.safetensors"  # a checkpoint named like a VAE file is not its own VAE
    itself.write_bytes(b"")
    assert vae_near_checkpoint(str(itself)) is None


def test_the_cli_uses_it_says_so_and_records_it(models, tmp_path, capsys):
    ckpt = str(models / "models" / "dreamy.safetensors")
    runs = {}
    for name, extra in (("auto", []), ("explicit", ["--vae", str(models / "models" / "dreamy.vae.pt")]),
                        ("none", ["--vae", "none"]), ("other", ["--vae", str(models / "other.safetensors")])):
        out = tmp_path / f"{name}.png"
        assert main([*CLI, "--model", ckpt, *extra, "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert (NOTE in err.splitlines()) == (name == "auto"), err
        with Image.open(out) as im:
            runs[name] = (np.asarray(im.convert("RGB")), parse_infotext(im.text["parameters"])[2])
    assert np.array_equal(runs["auto"][0], runs["explicit"][0]) and runs["auto"][1] == runs["explicit"][1]
    assert runs["auto"][1]["VAE"] == "dreamy.vae.pt"
    assert runs["auto"][1]["VAE hash"] == file_hash(str(models / "models" / "dreamy.vae.pt"))
    assert "VAE" not in runs["none"][1] and "VAE hash" not in runs["none"][1]
    assert not np.array_equal(runs["none"][0], runs["auto"][0])
    assert runs["other"][1]["VAE"] == "other.safetensors"


def test_a_broken_file_beside_the_model_is_one_line(models, tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(models / "models" / "dreamy.safetensors", folder / "dreamy.safetensors")
    (folder / "dreamy.vae.pt").write_bytes(b"\x80\x02 not a pickle of tensors")
    with pytest.raises(CheckpointError) as e:
        load(folder / "dreamy.safetensors")
    assert "dreamy.vae.pt" in str(e.value) and "\n" not in str(e.value) and "--vae none" in str(e.value)
    out = tmp_path / "out"
    assert main([*CLI, "--model", str(folder / "dreamy.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "dreamy.vae.pt" in err, err
    assert not out.exists() or not any(out.iterdir())
    assert load(folder / "dreamy.safetensors", vae="none").vae_name is None  # the way out
    # a VAE for another latent space beside it: refused the same way
    cfg = TINY.vae.__class__(**{**TINY.vae.__dict__, "z_channels": 8, "embed_dim": 8})
    torch.manual_seed(0)
    safetensors.torch.save_file({k: v.contiguous() for k, v in AutoencoderKL(cfg).state_dict().items()},
                                str(folder / "dreamy.vae.safetensors"))
    (folder / "dreamy.vae.pt").unlink()
    with pytest.raises(CheckpointError, match="8 latent channels"):
        load(folder / "dreamy.safetensors")


def test_the_infotexts_vae_names_a_file_beside_the_model(models, tmp_path, capsys):
    """--infotext "VAE: NAME" (A1111's paste sets sd_vae to it): a file of that name beside the model is used."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(models / "models" / "dreamy.safetensors", folder / "dreamy.safetensors")
    shutil.copy(models / "other.safetensors", folder / "second.vae.safetensors")
    text = tmp_path / "p.txt"
    text.write_text("a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32, VAE: second.vae.safetensors")
    out = tmp_path / "x.png"
    assert main(["--infotext", str(text), *CLI[1:], "--model", str(folder / "dreamy.safetensors"),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fastsd: VAE second.vae.safetensors beside the model, as the --infotext names it" in err, err
    assert "may differ" not in err
    with Image.open(out) as im:
        assert parse_infotext(im.text["parameters"])[2]["VAE"] == "second.vae.safetensors"


def test_batch_checks_and_records_the_vae_beside_the_model(models, tmp_path):
    """fastsd.batch checks the Automatic VAE before its folder is made and keeps it in the manifest's model label (a
    folder's images belong to one VAE); "none" is the checkpoint's own."""
    from fastsd.batch.runner import _check_model, model_label

    ckpt = str(models / "models" / "dreamy.safetensors")
    near = _check_model(ckpt, None)
    assert near is not None and os.path.samefile(near, models / "models" / "dreamy.vae.pt")
    assert model_label(ckpt, near) == f"{os.path.abspath(ckpt)} with VAE {os.path.abspath(near)}"
    assert _check_model(ckpt, "none") is None and _check_model("random:tiny", "none") is None
    assert _check_model(str(models / "plain" / "dreamy.safetensors"), None) is None
    broken = tmp_path / "dreamy.safetensors"
    shutil.copy(ckpt, broken)
    (tmp_path / "dreamy.vae.pt").write_bytes(b"\x80\x02 not a pickle of tensors")
    with pytest.raises(CheckpointError, match="dreamy.vae.pt"):
        _check_model(str(broken), None)


# ---- the server -----------------------------------------------------------------------------------------------

def txt2img(client, **over):
    from serve_server import decode, info

    body = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "seed": 3, "sampler_name": "Euler", **over}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    return np.asarray(decode(r.json()["images"][0])), info(r)


def test_the_server_default_is_automatic_and_none_opts_out(models, capsys):
    from serve_server import in_process, started

    ckpt = models / "models" / "dreamy.safetensors"
    want_auto = image(load(ckpt, vae=str(models / "models" / "dreamy.vae.pt")))
    want_own = image(load(ckpt, vae="none"))
    with started("--model", str(ckpt)) as st, in_process(st) as port, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        assert 'fastsd: dreamy.safetensors: VAE dreamy.vae.pt beside the model (A1111\'s "Automatic"); sd_vae "None"' \
            in capsys.readouterr().err
        assert c.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
        assert c.get("/sdapi/v1/sd-vae").json() == [{"model_name": "dreamy.vae.pt", "filename": "dreamy.vae.pt"}]
        over = {"sd_model_checkpoint": "dreamy.safetensors"}
        auto, meta = txt2img(c, override_settings=over)
        assert meta["sd_vae_name"] == "dreamy.vae.pt" == parse_infotext(meta["infotexts"][0])[2]["VAE"]
        own, meta = txt2img(c, override_settings={**over, "sd_vae": "None"})
        assert meta["sd_vae_name"] is None
        # (the server's warm process and a fresh pipeline may take different CPU-path pieces: <= 1 level apart)
        assert np.abs(auto.astype(int) - want_auto).max() <= 1 and np.abs(own.astype(int) - want_own).max() <= 1
        assert not np.array_equal(auto, own)
        try:
            assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "dreamy.safetensors",
                                                      "sd_vae": "None"}).status_code == 200
            again, meta = txt2img(c)
            assert np.array_equal(again, own) and meta["sd_vae_name"] is None
            back, meta = txt2img(c, override_settings={"sd_vae": "Automatic"})
            assert np.array_equal(back, auto) and meta["sd_vae_name"] == "dreamy.vae.pt"
            # an infotext's "VAE: dreamy.vae.pt" (A1111's paste): the file of that name
            text = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32"
            pasted, meta = txt2img(c, infotext=text + ", VAE: dreamy.vae.pt")
            assert meta["sd_vae_name"] == "dreamy.vae.pt"
            assert np.array_equal(pasted, txt2img(c, infotext=text, override_settings={"sd_vae": "Automatic"})[0])
        finally:
            c.post("/sdapi/v1/options", json={"sd_vae": "Automatic", "sd_model_checkpoint": "random:tiny"})
        _, meta = txt2img(c)  # random:tiny has nothing beside it
        assert meta["sd_vae_name"] is None


def test_a_broken_file_beside_a_served_model_stops_the_start(models, tmp_path, monkeypatch, capsys):
    from fastsd.serve import __main__
    from fastsd.serve.__main__ import main as serve_main

    monkeypatch.setattr(__main__, "_serve", lambda state, sock, level: sock.close() or 0)  # never serve here
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(models / "models" / "dreamy.safetensors", folder / "dreamy.safetensors")
    (folder / "dreamy.vae.pt").write_bytes(b"\x80\x02 not a pickle of tensors")
    threads = torch.get_num_threads()
    try:
        code = serve_main(["--port", "0", "--dtype", "fp32", "--threads", str(threads), "--model",
                           str(folder / "dreamy.safetensors")])
    finally:
        torch.set_num_threads(threads)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(err) == 1 and "dreamy.vae.pt" in err[0] and "Automatic" in err[0], err
    assert os.path.exists(folder / "dreamy.vae.pt")
