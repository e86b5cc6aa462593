"""Upscaler models (fastsd/upscalers.py, models/esrgan.py, models/compact.py): outputs equal to spandrel's (the
loader of A1111 >= 1.8 and ComfyUI) on the same random weights in Real-ESRGAN's, the original ESRGAN's and the
ESRGAN repository's later key layouts, every scale; bad files in one line; A1111's upscale rule (passes, sizes);
tiles; the hires fix with a model; the CLI's --upscaler-dir and A1111's built-in names."""
import re

import numpy as np
import pytest
import torch
from oracles import rel_err, spandrel
from PIL import Image
from safetensors.torch import save_file

import fastsd
from fastsd.config import CompactConfig, ESRGANConfig
from fastsd.generate import main as cli
from fastsd.image import parse_infotext
from fastsd.models.compact import SRVGGNetCompact
from fastsd.models.esrgan import RRDBNet
from fastsd.tensorfile import CheckpointError
from fastsd.upscalers import list_upscalers, load_upscaler, read_upscaler, upscaler_path

ESRGANS = [ESRGANConfig(features=16, blocks=2), ESRGANConfig(features=16, blocks=1, unshuffle=2),
           ESRGANConfig(features=8, blocks=1, unshuffle=4), ESRGANConfig(features=8, blocks=1, upsamples=3),
           ESRGANConfig(features=8, blocks=1, upsamples=1)]


def random_model(cfg, seed=0, std=0.1):
    torch.manual_seed(seed)
    m = RRDBNet(cfg) if isinstance(cfg, ESRGANConfig) else SRVGGNetCompact(cfg)
    for p in m.parameters():  # (default inits leave PReLU slopes equal and biases small: every weight random)
        p.data.normal_(0, std)
    return m.eval()


def save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def image(w=24, h=20, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def as_tensor(im):
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255


REAL = [ESRGANConfig(), CompactConfig()]  # RealESRGAN_x4plus / 4x-UltraSharp's size, realesr-general-x4v3's


@pytest.mark.parametrize("cfg", ESRGANS + [CompactConfig(features=16, convs=3), CompactConfig(features=8, convs=1, scale=2)]
                         + REAL, ids=lambda c: f"{type(c).__name__[:-6]}x{c.scale}" + ("-real" if c in REAL else ""))
def test_outputs_are_spandrels_in_both_layouts(cfg, tmp_path):
    """spandrel reads the Real-ESRGAN-named file (fastsd's names) and gives the same numbers; its own state dict (the
    original ESRGAN's `model.N` layout for RRDBNet) read back by fastsd gives them too."""
    sp = spandrel()
    # (at the real widths std 0.1 grows the activations ~2x a conv: 1e16 at RRDBNet-23's output, where two conv
    # algorithms' fp32 sums part by ~1e-5; 0.03 keeps them in the range of an image)
    m = random_model(cfg, std=0.03 if cfg in REAL else 0.1)
    desc = sp.ModelLoader().load_from_state_dict(m.state_dict())
    x = torch.rand(1, 3, 20, 12)
    with torch.no_grad():
        ref, ours = desc.model.eval()(x), m(x)
    assert desc.scale == cfg.scale and ref.shape == ours.shape == (1, 3, 20 * cfg.scale, 12 * cfg.scale)
    assert rel_err(ours, ref) < 1e-5
    their_keys = desc.model.state_dict()
    up = load_upscaler(save(their_keys, tmp_path / "theirs.safetensors"))
    assert up.config == cfg and up.scale == cfg.scale
    with torch.no_grad():
        assert rel_err(up.model(x), ref) < 1e-5
    if isinstance(cfg, ESRGANConfig):
        assert any(k.startswith("model.1.sub.") for k in their_keys)  # (the original layout was the one read)


def test_esrgan_repo_names_and_pth_wrappers(tmp_path):
    """The ESRGAN repository's later names (RRDB_trunk, trunk_conv, upconvN, HRconv; BSRGAN's files) and
    Real-ESRGAN's {"params_ema": ...} .pth wrapper, read through torch.load(weights_only=True)."""
    m = random_model(ESRGANS[0])
    rename = {"body.": "RRDB_trunk.", "conv_body.": "trunk_conv.", "conv_up1.": "upconv1.", "conv_up2.": "upconv2.",
              "conv_hr.": "HRconv."}
    renamed = {}
    for k, v in m.state_dict().items():
        for a, b in rename.items():
            if k.startswith(a):
                k = b + k[len(a):].replace(".rdb", ".RDB")
        renamed[k] = v
    assert any(k.startswith("RRDB_trunk.0.RDB1.") for k in renamed)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        want = m(x)
        for i, path in enumerate([save(renamed, tmp_path / "bsrgan.safetensors"), tmp_path / "RealESRGAN_x4plus.pth"]):
            if i:
                torch.save({"params_ema": m.state_dict()}, path)
            got = load_upscaler(str(path)).model(x)
            assert torch.allclose(got, want, atol=1e-5)


def test_bad_files_are_one_line_and_named(tmp_path):
    m = random_model(ESRGANS[0])
    sd = m.state_dict()
    cases = {
        "unknown": ({"layers.0.residual_group.blocks.0.attn.qkv.weight": torch.zeros(3, 3)},  # (no bias table)
                    "not an ESRGAN / Real-ESRGAN / SwinIR upscaler"),
        "shape": ({**sd, "conv_hr.weight": torch.zeros(16, 16, 1, 1)}, "conv_hr.weight (16, 16, 1, 1) vs (16, 16, 3, 3)"),
        "missing": ({k: v for k, v in sd.items() if k != "body.1.rdb2.conv3.bias"}, "1 missing (body.1.rdb2.conv3.bias)"),
        "extra": ({**sd, "conv_extra.weight": torch.zeros(1)}, "1 unexpected (conv_extra.weight)"),
        "gray": (random_model(ESRGANConfig(in_channels=1, out_channels=1, features=8, blocks=1)).state_dict(),
                 "1-channel images"),
    }
    for name, (data, match) in cases.items():
        path = save(data, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError) as e:
            read_upscaler(path)
        assert match in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(path), name
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_upscaler(str(tmp_path / "list.pth"))


def test_run_tiles_and_pads(tmp_path):
    """An image of one tile is the model's output exactly; tiles blended over 8 px differ from it only a little at
    the seams, and not at all for a model whose output doesn't depend on neighbours (placement and blending exact);
    an x2 Real-ESRGAN model (2x2 pixel blocks folded) takes an odd-sized image."""
    up = load_upscaler(save(random_model(CompactConfig(features=8, convs=1)).state_dict(), tmp_path / "c.safetensors"))
    im = image(70, 53)
    whole, tiles = up.run(im, tile=0), up.run(im, tile=32, overlap=8)
    assert whole.size == tiles.size == (280, 212)
    with torch.no_grad():
        exact = up.model(as_tensor(im)).clamp(0, 1).mul(255).round()[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(whole), exact.astype(np.uint8))
    diff = np.abs(np.asarray(whole).astype(int) - np.asarray(tiles).astype(int))
    assert 0 < diff.mean() < 1, diff.mean()  # the seams differ a little (zero padding at each tile's edges)
    with torch.no_grad():
        up.model.body[-1].weight.zero_()  # the convs' part gone: the output is the input upsampled (nearest) ...
        up.model.body[-1].bias.zero_()
    nearest = np.asarray(im.resize((280, 212), Image.NEAREST))
    for t in (32, 40, 0):  # ... which every tile gives exactly, so the tiles' placement and blending show exactly
        assert np.array_equal(np.asarray(up.run(im, tile=t, overlap=8)), nearest), t
    x2 = load_upscaler(save(random_model(ESRGANS[1]).state_dict(), tmp_path / "x2.safetensors"))
    assert x2.run(image(23, 17)).size == (46, 34)


def test_upscale_is_a1111s_rule(tmp_path, monkeypatch):
    """A1111's resize_image with a model: run while smaller than the scaled size rounded down to 8 px (at most 3
    times), Lanczos to that size, then to the size asked; a 1x model once; no run when not enlarging."""
    up = load_upscaler(save(random_model(ESRGANS[1]).state_dict(), tmp_path / "x2.safetensors"))
    sizes = []
    run = up.run
    monkeypatch.setattr(up, "run", lambda im, **kw: (sizes.append(im.size), run(im, **kw))[1])
    out = up.upscale(image(16, 12), 75, 50)  # scale 4.6875: dest (72, 56); 16 -> 32 -> 64 -> 128 (3 runs)
    assert out.size == (75, 50) and sizes == [(16, 12), (32, 24), (64, 48)]
    sizes.clear()
    assert up.upscale(image(16, 12), 40, 30).size == (40, 30) and sizes == [(16, 12), (32, 24)]
    sizes.clear()
    assert up.upscale(image(16, 12), 16, 10).size == (16, 10) and sizes == []
    one = load_upscaler(save(random_model(ESRGANS[2]).state_dict(), tmp_path / "x1.safetensors"))
    assert one.scale == 1
    ones = []
    run1 = one.run
    monkeypatch.setattr(one, "run", lambda im, **kw: (ones.append(im.size), run1(im, **kw))[1])
    assert one.upscale(image(16, 12), 32, 24).size == (32, 24) and ones == [(16, 12)]


def test_folder_names_and_a1111_builtin_names(tmp_path):
    sd = random_model(CompactConfig(features=8, convs=1)).state_dict()
    (tmp_path / "sub").mkdir()
    save(sd, tmp_path / "sub" / "RealESRGAN_x4plus.safetensors")
    save(sd, tmp_path / "4x-UltraSharp.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    have = list_upscalers(str(tmp_path))
    assert set(have) == {"RealESRGAN_x4plus", "4x-UltraSharp", "R-ESRGAN 4x+"}
    assert upscaler_path("R-ESRGAN 4x+", str(tmp_path)) == have["RealESRGAN_x4plus"]
    for name, match in [("R-ESRGAN 2x+", "A1111 downloads RealESRGAN_x2plus.pth"), ("../x", "without a path"),
                        ("nope", "it has: '4x-UltraSharp', 'R-ESRGAN 4x+', 'RealESRGAN_x4plus'")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            upscaler_path(name, str(tmp_path))
    with pytest.raises(ValueError, match="needs an upscaler folder"):
        upscaler_path("4x-UltraSharp", None)


@pytest.fixture(scope="module")
def pipe():
    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


def test_hires_with_a_model_is_upscale_then_encode(pipe, tmp_path):
    """hires_strength 0 (upscale only): the image is the first pass's, upscaled by the model (A1111's rule), encoded
    and decoded; the infotext names the model by its stem; the model is loaded once and again when its file changes."""
    path = save(random_model(CompactConfig(features=8, convs=1)).state_dict(), tmp_path / "4x-Tiny.safetensors")
    kw = dict(prompt="a cat", steps=2, width=32, height=24, guidance_scale=1.0, seed=5, progress=False)
    first = pipe.generate(**kw)[0]
    got = pipe.generate(**kw, hires_scale=2, hires_strength=0, hires_upscaler=path)[0]
    up = pipe.upscaler(path)
    from fastsd.image import pil_to_tensor, tensor_to_pil

    want = tensor_to_pil(pipe.decode(pipe.encode_images(pil_to_tensor(up.upscale(first, 64, 48)), None)))[0]
    assert got.size == (64, 48) and np.array_equal(np.asarray(got), np.asarray(want))
    assert parse_infotext(got.info["parameters"])[2]["Hires upscaler"] == "4x-Tiny"
    assert pipe.upscaler(path) is up
    save(random_model(CompactConfig(features=8, convs=1), seed=1).state_dict(), path)
    import os

    os.utime(path, ns=(1, 1))  # (a new mtime even on a coarse clock)
    assert pipe.upscaler(path) is not up
    refined = pipe.generate(**kw, hires_scale=2, hires_upscaler=path)[0]
    assert refined.size == (64, 48)


def test_cli_upscaler_dir_and_errors(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    save(random_model(CompactConfig(features=8, convs=1)).state_dict(), folder / "realesr-general-x4v3.safetensors")
    args = ["a cat", "--model", "random:tiny", "--steps", "2", "--width", "32", "--height", "32", "--no-progress",
            "--hires-scale", "2", "--hires-steps", "1"]
    monkeypatch.delenv("FASTSD_UPSCALER_DIR", raising=False)
    out = tmp_path / "a.png"
    assert cli([*args, "--hires-upscaler", "R-ESRGAN General 4xV3", "--upscaler-dir", str(folder), "--out", str(out)]) == 0
    im = Image.open(out)
    assert im.size == (64, 64)  # (A1111's name for the file it would download, so A1111 finds it)
    assert parse_infotext(im.info["parameters"])[2]["Hires upscaler"] == "R-ESRGAN General 4xV3"
    monkeypatch.setenv("FASTSD_UPSCALER_DIR", str(folder))  # the folder from the environment; --infotext names it
    (tmp_path / "info.txt").write_text(im.info["parameters"])
    assert cli([*args, "--infotext", str(tmp_path / "info.txt"), "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(im))
    capsys.readouterr()
    for extra, match in [(["--hires-upscaler", "4x-Missing"], "upscaler '4x-Missing': not one of A1111's built-in"),
                         (["--hires-upscaler", str(tmp_path / "none.pth")], "none.pth: no such file"),
                         (["--hires-upscaler", "4x-Missing", "--upscaler-dir", str(tmp_path / "nope")],
                          "no such folder")]:
        bad = tmp_path / "bad.png"
        assert cli([*args, *extra, "--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0] and not bad.exists(), err
    (folder / "broken.pth").write_bytes(b"\x80\x02not a pickle")
    assert cli([*args, "--hires-upscaler", "broken", "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "broken.pth" in err[-1] and not (tmp_path / "c.png").exists()


def test_upscale_cli_is_a1111s_extras(tmp_path, capsys, monkeypatch):
    """python -m fastsd.upscale: A1111's postprocessing upscale (by a scale; to a size, cropped onto a canvas or not)
    with a model or Lanczos; the source's infotext kept, A1111's "postprocessing" text added; numbered names in a
    folder; mistakes one line, exit 2, nothing written."""
    from fastsd.upscale import main as upscale
    from fastsd.upscalers import centred, upscale_by

    monkeypatch.delenv("FASTSD_UPSCALER_DIR", raising=False)
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    model = save(random_model(CompactConfig(features=8, convs=1)).state_dict(), folder / "RealESRGAN_x4plus.safetensors")
    src = tmp_path / "in.png"
    from fastsd.image import png_writer

    png_writer(image(20, 12), "a cat\nSteps: 2, Seed: 1")(str(src))
    out = tmp_path / "out"
    assert upscale([str(src), "--upscaler", "R-ESRGAN 4x+", "--upscaler-dir", str(folder), "--scale", "2.5",
                    "--dtype", "fp32", "--out", str(out)]) == 0
    (written,) = sorted(out.iterdir())
    got = Image.open(written)
    want = upscale_by(image(20, 12), 2.5, load_upscaler(model).run)  # (A1111's Upscaler.upscale: 48x24 after 1 pass)
    assert written.name == "00000-in.png" and got.size == (48, 24)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert got.text == {"parameters": "a cat\nSteps: 2, Seed: 1",
                        "postprocessing": "Postprocess upscale by: 2.5, Postprocess upscaler: R-ESRGAN 4x+"}
    one = tmp_path / "one.png"
    assert upscale([str(src), "--upscaler", "lanczos", "--width", "64", "--height", "64", "--out", str(one)]) == 0
    # scale to cover 64x64: 16/3; made 104x64 (rounded down to 8 px), centred on the 64x64 canvas
    want = centred(upscale_by(image(20, 12), 16 / 3, lambda im: im.resize((106, 64), Image.LANCZOS)), (64, 64))
    got = Image.open(one)
    assert got.size == (64, 64) and np.array_equal(np.asarray(got), np.asarray(want))
    assert got.text["postprocessing"] == ("Postprocess upscale to: 64x64, Postprocess crop to: 64x64, "
                                          "Postprocess upscaler: Lanczos")
    assert upscale([str(src), "--upscaler", model, "--width", "64", "--height", "64", "--no-crop", "--out",
                    str(one), "--overwrite"]) == 0
    got = Image.open(one)  # the covering size, rounded down to 8 px (two passes of the model); a file by A1111's name
    assert got.size == (104, 64) and got.text["postprocessing"].endswith("Postprocess upscaler: R-ESRGAN 4x+")
    capsys.readouterr()
    for args, match in [(["--upscaler", "Latent"], "a latent upscale mode"),
                        (["--upscaler", "4x-Nope", "--upscaler-dir", str(folder)], "no such model in"),
                        (["--upscaler", "4x-Nope"], "needs an upscaler folder"),
                        (["--upscaler", "lanczos", "--scale", "9"], "--scale must be in [1, 8]"),
                        (["--upscaler", "lanczos", "--width", "64"], "--width and --height go together"),
                        (["--upscaler", "lanczos", "--out", str(one)], "the file exists"),
                        (["--upscaler", str(tmp_path / "in.png")], "not a torch checkpoint")]:
        bad = tmp_path / "bad"
        assert upscale([str(src), *args, "--out", str(bad)] if "--out" not in args else [str(src), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0] and not bad.exists(), (args, err)


def test_openvino_pipelines_run_upscalers_on_the_cpu_backends_weights(tmp_path):
    """OpenVINO has no graph for an upscaler: a pipeline on the openvino backend prepares it as the cpu backend
    does (packed convolutions), with the same output as plain torch to within one 8-bit level."""
    pytest.importorskip("openvino")
    path = save(random_model(CompactConfig(features=8, convs=1)).state_dict(), tmp_path / "c.safetensors")
    ov = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="openvino")
    up = ov.upscaler(path)
    assert type(up.model.body[0]) is not torch.nn.Conv2d  # (cpu_pack's packable subclass)
    im = image(40, 30)
    diff = np.abs(np.asarray(up.run(im)).astype(int) - np.asarray(load_upscaler(path).run(im)).astype(int))
    assert diff.max() <= 1
