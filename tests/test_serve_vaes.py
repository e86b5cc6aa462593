"""fastsd.serve's VAE files: --vae-dir (checked at start), GET /sdapi/v1/sd-vae in A1111's shape, the sd_vae option
(POST /sdapi/v1/options, a request's override_settings) with A1111's values "Automatic", "None" and a file name, the
VAE swapped on the worker before each job (the image equal to a pipeline given the file with load_vae; the model's own
VAE back bit for bit), the infotext's "VAE" / "VAE hash", bad names and files answered 422 in one line naming the file,
nothing changed. Tiny random models; the server runs in this process (the same torch, so the same pixels)."""
import os
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from serve_server import decode, in_process, info, started

from fastsd import load_pipeline
from fastsd.config import TINY
from fastsd.file_hashes import file_hash
from fastsd.image import parse_infotext
from fastsd.models.vae import AutoencoderKL
from fastsd.serve.__main__ import main as serve_main
from fastsd.serve.vaes import Vaes

SMALL = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}


def save_vae(path, seed: int, cfg=TINY.vae, prefix: str = "") -> str:
    torch.manual_seed(seed)
    sd = AutoencoderKL(cfg).state_dict()
    safetensors.torch.save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A1111's models/VAE: two VAE files (one in a subfolder, with the LDM prefix), a VAE for 8 latent channels, a
    broken file and a file that is no VAE file."""
    root = tmp_path_factory.mktemp("serve-vaes") / "VAE"
    (root / "sub").mkdir(parents=True)
    save_vae(root / "vae-ft-mse.safetensors", 11)
    save_vae(root / "sub" / "other.safetensors", 12, prefix="first_stage_model.")
    save_vae(root / "eight.safetensors", 13, cfg=TINY.vae.__class__(**{**TINY.vae.__dict__, "z_channels": 8,
                                                                       "embed_dim": 8}))
    (root / "broken.pt").write_bytes(b"\x80\x02 not a pickle of tensors")
    (root / "notes.txt").write_text("not a VAE")
    return root


@pytest.fixture(scope="module")
def state(folder):
    with started("--vae-dir", str(folder)) as st:
        yield st


@pytest.fixture(scope="module")
def client(state):
    with in_process(state) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        yield c


def txt2img(client, **over):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **over})
    assert r.status_code == 200, r.text
    return np.asarray(decode(r.json()["images"][0])), info(r)


def test_vae_dir_is_checked_at_start_and_defaults_to_the_environment(monkeypatch, capsys, folder):
    from fastsd.serve import __main__
    from fastsd.serve.__main__ import build_parser

    monkeypatch.setattr(__main__, "_serve", lambda state, sock, level: sock.close() or 0)  # never serve here
    argv = ["--port", "0", "--model", "random:tiny"]
    assert serve_main([*argv, "--vae-dir", str(folder / "notes.txt")]) == 2
    assert capsys.readouterr().err == f"error: --vae-dir {folder / 'notes.txt'}: not a folder\n"
    monkeypatch.setenv("FASTSD_VAE_DIR", "/nonexistent/vae")
    assert build_parser().parse_args([]).vae_dir == "/nonexistent/vae"
    assert serve_main(argv) == 2 and capsys.readouterr().err == "error: --vae-dir /nonexistent/vae: not a folder\n"


def test_sd_vae_list_and_options_in_a1111_shape(client, state):
    assert client.get("/sdapi/v1/sd-vae").json() == [
        {"model_name": "broken.pt", "filename": "broken.pt"}, {"model_name": "eight.safetensors",
                                                               "filename": "eight.safetensors"},
        {"model_name": "other.safetensors", "filename": os.path.join("sub", "other.safetensors")},
        {"model_name": "vae-ft-mse.safetensors", "filename": "vae-ft-mse.safetensors"}]
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
    assert client.post("/sdapi/v1/refresh-vae").status_code == 200
    try:
        r = client.post("/sdapi/v1/options", json={"sd_vae": "vae-ft-mse.safetensors"})
        assert r.status_code == 200 and r.json()["applied"] == {"sd_vae": "vae-ft-mse.safetensors"}
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == "vae-ft-mse.safetensors"
        r = client.post("/sdapi/v1/options", json={"sd_vae": "eight.safetensors"})  # a file that can't drive it
        assert r.status_code == 422 and "eight.safetensors" in r.json()["detail"]
        assert str(state.vaes.folder) not in r.json()["detail"]
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == "vae-ft-mse.safetensors"  # unchanged
        # a name the server lacks is set, as A1111's opts.set: jobs then run the model's own VAE, warned (A1111's
        # "Couldn't find VAE named X; using None instead")
        r = client.post("/sdapi/v1/options", json={"sd_vae": "nope.safetensors"})
        assert r.status_code == 200 and r.json()["applied"] == {"sd_vae": "nope.safetensors"}, r.text
        assert r.json()["warnings"] == ["sd_vae: unknown VAE 'nope.safetensors', the model's own VAE used (as "
                                        "A1111's None; GET /sdapi/v1/sd-vae lists this server's)"]
        _, meta = txt2img(client)
        assert meta["sd_vae_name"] is None and meta["warnings"] == r.json()["warnings"]
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200


def test_a_vae_file_runs_as_load_vae_and_the_models_own_comes_back(client, folder):
    own, meta = txt2img(client)
    assert meta["sd_vae_name"] is None and "VAE" not in parse_infotext(meta["infotexts"][0])[2]
    got, meta = txt2img(client, override_settings={"sd_vae": "vae-ft-mse.safetensors"})
    path = str(folder / "vae-ft-mse.safetensors")
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    pipe.load_vae(path)
    want = np.asarray(pipe.generate(**{"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3,
                                       "sampler": "euler"}, progress=False)[0])
    # (the server's warm process and this fresh pipeline may take different CPU-path pieces: <= 1 level apart)
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and np.abs(got.astype(int) - own).mean() > 10 * diff.mean() + 1, (diff.max(), diff.mean())
    params = parse_infotext(meta["infotexts"][0])[2]
    assert params["VAE"] == meta["sd_vae_name"] == "vae-ft-mse.safetensors"  # A1111: the file name
    assert params["VAE hash"] == meta["sd_vae_hash"] == file_hash(path)
    for value in ("None", "Automatic"):  # the model's own (random:tiny has no file, so nothing is near it)
        again, meta = txt2img(client, override_settings={"sd_vae": value})
        assert np.array_equal(again, own) and meta["sd_vae_name"] is None
    stem, _ = txt2img(client, override_settings={"sd_vae": "other"})  # a stem names the file too
    assert not np.array_equal(stem, own) and not np.array_equal(stem, got)


def test_the_option_sets_later_requests_and_override_settings_wins(client):
    own, _ = txt2img(client)
    try:
        assert client.post("/sdapi/v1/options", json={"sd_vae": "other.safetensors"}).status_code == 200
        other, meta = txt2img(client)
        assert meta["sd_vae_name"] == "other.safetensors" and not np.array_equal(other, own)
        none, meta = txt2img(client, override_settings={"sd_vae": "None"})
        assert np.array_equal(none, own) and meta["sd_vae_name"] is None
    finally:
        client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})


def test_a_file_is_read_once_while_it_is_kept(client, monkeypatch):
    from fastsd.vae_files import VAESource

    built = []
    real = VAESource.build
    monkeypatch.setattr(VAESource, "build", lambda self, **kw: built.append(self.name) or real(self, **kw))
    for value in ("vae-ft-mse.safetensors", "None", "vae-ft-mse.safetensors", "Automatic", "vae-ft-mse.safetensors",
                  "other.safetensors"):
        txt2img(client, override_settings={"sd_vae": value})
    assert built == ["vae-ft-mse.safetensors", "other.safetensors"]


@pytest.mark.parametrize("value,message", [
    ("eight.safetensors", "eight.safetensors"),  # 8 latent channels for a 4-channel UNet
    ("broken.pt", "broken.pt")])
def test_bad_vae_files_are_422s_and_change_nothing(client, state, value, message):
    own, _ = txt2img(client)
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_vae": value}})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail and str(state.vaes.folder) not in detail
    after, meta = txt2img(client)
    assert np.array_equal(after, own) and meta["sd_vae_name"] is None


@pytest.mark.parametrize("value", ["notes.txt", "vae-ft-mse-840000-ema-pruned.safetensors",
                                   "../VAE/vae-ft-mse.safetensors"])  # (never a path; a non-string: a 422)
def test_an_unknown_vae_runs_the_models_own_as_a1111_and_is_warned(client, state, value):
    """A1111's resolve_vae for a name it lacks: "Couldn't find VAE named X; using None instead" (the checkpoint's
    own VAE), the request answered; fastsd names it in info.warnings and its log. "" and null: the server's option."""
    own, _ = txt2img(client)
    got, meta = txt2img(client, override_settings={"sd_vae": value})
    assert np.array_equal(got, own) and meta["sd_vae_name"] is None
    assert meta["warnings"] == [f"override_settings.sd_vae: unknown VAE {value!r}, the model's own VAE used (as "
                                "A1111's None; GET /sdapi/v1/sd-vae lists this server's)"]
    try:
        assert client.post("/sdapi/v1/options", json={"sd_vae": "vae-ft-mse.safetensors"}).status_code == 200
        file_vae, _ = txt2img(client)
        for empty in ("", None):
            got, meta = txt2img(client, override_settings={"sd_vae": empty})
            assert np.array_equal(got, file_vae) and meta["sd_vae_name"] == "vae-ft-mse.safetensors"
            assert meta["warnings"] == []
    finally:
        client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})


def test_automatic_is_a1111s_vae_near_the_checkpoint(tmp_path):
    """A1111's find_vae_near_checkpoint: <stem>.vae.* beside the checkpoint first, else a folder file whose name
    starts with the checkpoint's stem; a model without a file (random:, folders) has none."""
    models, vaes = tmp_path / "models", tmp_path / "VAE"
    models.mkdir()
    vaes.mkdir()
    ckpt = models / "dreamy-v2.safetensors"
    ckpt.write_bytes(b"")
    entry = SimpleNamespace(pipe=SimpleNamespace(path=str(ckpt)))
    v = Vaes(str(vaes))
    assert v.path("Automatic", entry, "sd_vae") is None
    (vaes / "dreamy-v2-vae.safetensors").write_bytes(b"")
    (vaes / "aaa.safetensors").write_bytes(b"")
    assert v.path("Automatic", entry, "sd_vae") == str(vaes / "dreamy-v2-vae.safetensors")
    (models / "dreamy-v2.vae.pt").write_bytes(b"")
    assert v.path("Automatic", entry, "sd_vae") == str(models / "dreamy-v2.vae.pt")
    assert v.path("None", entry, "sd_vae") is None
    assert v.path("Automatic", SimpleNamespace(pipe=SimpleNamespace(path=None)), "sd_vae") is None
    # A1111's list: the <name>.vae.* files of the checkpoints' folders too (shown by file name), then the folder's
    listed = Vaes(str(vaes), [str(ckpt)])
    assert listed.a1111() == [{"model_name": "aaa.safetensors", "filename": "aaa.safetensors"},
                              {"model_name": "dreamy-v2-vae.safetensors", "filename": "dreamy-v2-vae.safetensors"},
                              {"model_name": "dreamy-v2.vae.pt", "filename": "dreamy-v2.vae.pt"}]
    assert listed.path("dreamy-v2.vae.pt", None, "sd_vae") == str(models / "dreamy-v2.vae.pt")
    assert "dreamy-v2.vae.pt" not in v.files()  # (no --model there)


def test_automatic_finds_the_vae_beside_a_served_model_file(tmp_path):
    """End to end: a --model file with `<name>.vae.safetensors` beside it: /sd-vae lists that file (as A1111), and
    Automatic (the default) runs it for that model (its infotext's VAE), not for the other model."""
    import safetensors.torch as st

    from fastsd.checkpoint import ldm_state_dict

    models = tmp_path / "models"
    models.mkdir()
    st.save_file(ldm_state_dict(load_pipeline("random:tiny", device="cpu", dtype="fp32")),
                 str(models / "dreamy.safetensors"))
    save_vae(models / "dreamy.vae.safetensors", 31)
    with started("--model", str(models / "dreamy.safetensors")) as st_, in_process(st_) as port, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        assert c.get("/sdapi/v1/sd-vae").json() == [{"model_name": "dreamy.vae.safetensors",
                                                      "filename": "dreamy.vae.safetensors"}]
        _, near = txt2img(c, override_settings={"sd_model_checkpoint": "dreamy.safetensors"})
        _, other = txt2img(c)  # random:tiny: nothing beside it
    assert parse_infotext(near["infotexts"][0])[2]["VAE"] == "dreamy.vae.safetensors" == near["sd_vae_name"]
    assert other["sd_vae_name"] is None


def test_options_check_every_value_before_applying_any(folder):
    """POST /options switched the model before refusing a broken VAE file (half applied), and took a VAE file that can't
    drive the model (every later request failed): now each value is checked first, the VAE file against the model
    it would run with, as override_settings checks it."""
    with started("--model", "random:tiny-inpainting", "--vae-dir", str(folder)) as st, in_process(st) as port, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        before = c.get("/sdapi/v1/options").json()
        for body, match in (({"sd_model_checkpoint": "random:tiny-inpainting", "sd_vae": "broken.pt"},
                             "sd_vae: broken.pt"),
                            ({"sd_model_checkpoint": "nope", "sd_vae": "None"}, "unknown model 'nope'"),
                            ({"sd_vae": "eight.safetensors"}, "8 latent channels")):
            r = c.post("/sdapi/v1/options", json=body)
            assert r.status_code == 422 and match in r.json()["detail"], r.text
            assert c.get("/sdapi/v1/options").json() == before
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_vae": "broken.pt"}})
        assert r.status_code == 422 and r.json()["detail"].startswith("override_settings.sd_vae: broken.pt"), r.text
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "random:tiny-inpainting", "sd_vae": "None"})
        assert r.status_code == 200 and c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] != \
            before["sd_model_checkpoint"]
