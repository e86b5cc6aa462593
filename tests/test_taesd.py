"""TAESD against diffusers' AutoencoderTiny on the same random weights, in every file layout fastsd reads
(the original taesd_decoder/encoder pair as .safetensors and .pth, a diffusers folder, one diffusers file),
in the pipeline (decode, encode, txt2img and img2img against diffusers' pipelines, previews), and bad
input: one line, exit 2 on the CLI, nothing written."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from oracles import A1111Img2Img, rel_err, save_diffusers_folder
from PIL import Image
from test_generate_cli import _fails  # one-line error, exit 2, nothing written

from fastsd import CheckpointError, load_pipeline
from fastsd.backends import openvino as ovb
from fastsd.config import TINY, TAESDConfig
from fastsd.generate import main
from fastsd.image import parse_infotext
from fastsd.testing import SD15_SCHEDULER, diffusers_taesd, tokenizer

TOL = 1e-4  # max abs err / max abs ref, fp32
OPENVINO = pytest.param("openvino", marks=pytest.mark.skipif(ovb.import_error() is not None,
                                                             reason=f"openvino is not installed ({ovb.INSTALL})"))


def original_layout(twin) -> tuple[dict, dict]:
    """(encoder, decoder) state dicts as madebyollin/taesd's taesd_encoder.pth / taesd_decoder.pth hold them:
    nn.Sequential indices; the decoder's index 0 is a Clamp, so diffusers' decoder.layers.N is N + 1."""
    enc, dec = {}, {}
    for k, v in twin.state_dict().items():
        part, _, idx, rest = k.split(".", 3)
        if part == "encoder":
            enc[f"{idx}.{rest}"] = v.clone()
        else:
            dec[f"{int(idx) + 1}.{rest}"] = v.clone()
    return enc, dec


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """SD1.5's TAESD architecture with diffusers' random init, written in every layout; and the twin."""
    root = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(0)
    twin = diffusers_taesd().eval().requires_grad_(False)
    twin.save_pretrained(str(root / "diffusers"))
    enc, dec = original_layout(twin)
    (root / "st").mkdir()
    safetensors.torch.save_file(enc, str(root / "st" / "taesd_encoder.safetensors"))
    safetensors.torch.save_file(dec, str(root / "st" / "taesd_decoder.safetensors"))
    (root / "pth").mkdir()
    torch.save(enc, root / "pth" / "taesd_encoder.pth")
    torch.save(dec, root / "pth" / "taesd_decoder.pth")
    (root / "dec_only").mkdir()
    safetensors.torch.save_file(dec, str(root / "dec_only" / "taesd_decoder.safetensors"))
    safetensors.torch.save_file(twin.state_dict(), str(root / "one_file.safetensors"))
    return root, twin


LAYOUTS = ["taesd:{r}/st/taesd_decoder.safetensors", "taesd:{r}/pth/taesd_decoder.pth", "taesd:{r}/diffusers",
           "taesd:{r}/st", "taesd:{r}/pth/taesd_encoder.pth", "taesd:{r}/one_file.safetensors",
           "{r}/st/taesd_decoder.safetensors", "{r}/diffusers"]  # the last two: found by their keys / config


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_weights(files, layout):
    from fastsd.vae_files import resolve_vae

    root, twin = files
    model = resolve_vae(layout.format(r=root), TINY).build(dtype=torch.float32, device=torch.device("cpu"))
    assert model.cfg == TAESDConfig()
    enc, dec = original_layout(twin)
    expected = {**{"decoder." + k: v for k, v in dec.items()}, **{"encoder." + k: v for k, v in enc.items()}}
    ours = model.state_dict()
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], v) for k, v in expected.items())


@pytest.mark.parametrize("backend", ["torch", "auto", OPENVINO])  # auto: channels_last, prepacked oneDNN weights
def test_decode_and_encode_match_autoencoder_tiny(files, backend):
    root, twin = files
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend=backend,
                         vae=f"taesd:{root}/st/taesd_decoder.safetensors")
    assert pipe.vae.encoder is not None and pipe.config.vae.downscale == 8
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 4, 8, 12, generator=g) * 2
    img = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1
    sf = twin.config.scaling_factor  # 1.0: TAESD works on the UNet's latents as they are
    with torch.no_grad():
        ours = pipe.decode(lat)
        assert ours.shape == (2, 3, 64, 96)
        assert rel_err(ours, twin.decode(lat / sf).sample) <= TOL
        # diffusers' retrieve_latents takes AutoencoderTiny's latents as they are: no posterior, no draw
        assert rel_err(pipe.encode_images(img, [g, g]), twin.encode(img).latents * sf) <= TOL


# ---- in the pipeline ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_with_taesd(files, tmp_path_factory):
    """A TINY diffusers folder (UNet, text encoder) + the TAESD: fastsd's pipeline and diffusers' models."""
    root, twin = files
    folder = tmp_path_factory.mktemp("tiny")
    unet, _, clip = save_diffusers_folder(TINY, folder)
    pipe = load_pipeline(str(folder), device="cpu", dtype="fp32", backend="torch", vae=f"taesd:{root}/diffusers")
    return pipe, (unet, twin, clip)


def _diffusers(models, img2img=False):
    import diffusers

    unet, vae, clip = models
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    p = cls(vae=vae, text_encoder=clip, tokenizer=tokenizer(), unet=unet, safety_checker=None, feature_extractor=None,
            scheduler=diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER), requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def _ours(pipe, prompt, neg, steps, **kw):
    """generate's stages, stopping at the decoded float image in [-1, 1]."""
    from fastsd.settings import GenerationSettings

    image, latents = kw.pop("image", None), kw.pop("latents", None)
    s = pipe.resolve(GenerationSettings(prompt, neg, steps, 7.5, "euler", **kw), image)
    cond, uncond = pipe.encode_prompt([prompt], [neg])
    p = pipe.prepare_latents(s, [s.seed], image=image, latents=latents)
    return pipe.decode(pipe.denoise(p, cond, uncond, s, progress=False)).clamp(-1, 1)


def test_txt2img_and_img2img_match_diffusers_with_autoencoder_tiny(tiny_with_taesd):
    pipe, models = tiny_with_taesd
    prompt, neg = "a photo of an astronaut riding a horse", "blurry"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = _ours(pipe, prompt, neg, 4, width=64, height=64, latents=latents)
    ref = _diffusers(models)(prompt, negative_prompt=neg, num_inference_steps=4, guidance_scale=7.5, height=64,
                             width=64, latents=latents.clone(), output_type="pt").images
    assert ref.std() > 0.01  # an image, not a constant
    assert rel_err(ours, ref * 2 - 1) <= 1e-3
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    # img2img: AutoencoderTiny draws no posterior noise, so the start noise is the seed's first draw
    ours = _ours(pipe, prompt, neg, 6, image=img, strength=0.5, seed=11)
    ref = A1111Img2Img(_diffusers(models, img2img=True))(
        prompt, negative_prompt=neg, image=img, strength=0.5, num_inference_steps=6, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(11), output_type="pt").images  # (A1111's 4 steps of 6)
    assert rel_err(ours, ref * 2 - 1) <= 1e-3


def test_previews_are_taesd_decodes_every_n_steps(tiny_with_taesd):
    pipe, _ = tiny_with_taesd
    seen = []
    out = pipe.generate("a cat", steps=5, width=64, height=48, seed=3, progress=False, preview_every=2,
                        on_step=lambda step, total, im: seen.append((step, total, im)))
    assert [(s, t, im is not None) for s, t, im in seen] == [(1, 5, False), (2, 5, True), (3, 5, False),
                                                              (4, 5, True), (5, 5, True)]
    assert seen[-1][2].size == (64, 48)  # TAESD: full size
    # the last preview is the decoded prediction at the last step: the final image (Euler ends at sigma 0)
    assert np.abs(np.asarray(seen[-1][2], np.int16) - np.asarray(out[0], np.int16)).max() <= 1


def test_previews_without_taesd_are_the_linear_approximation():
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    seen = []
    pipe.generate("a cat", steps=2, width=64, height=48, seed=3, progress=False,
                  on_step=lambda step, total, im: seen.append(im))
    f = pipe.config.vae.downscale
    assert [im.size for im in seen] == [(64 // f, 48 // f)] * 2
    with pytest.raises(ValueError, match="preview_every must be a positive integer"):
        pipe.generate("a cat", steps=1, width=32, height=32, preview_every=0)


@pytest.mark.parametrize("backend", ["auto", OPENVINO])
def test_decoder_only_taesd_decodes_and_refuses_img2img(files, backend):
    root, twin = files
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend=backend,
                         vae=f"taesd:{root}/dec_only/taesd_decoder.safetensors")
    assert pipe.vae.encoder is None
    assert pipe.generate("a cat", steps=1, width=32, height=32, seed=0, progress=False)[0].size == (32, 32)
    with pytest.raises(ValueError, match="no encoder") as e:
        pipe.generate("a cat", steps=2, image=Image.new("RGB", (32, 32)), progress=False)
    assert "\n" not in str(e.value)


def test_load_vae_switches_and_a_failed_switch_keeps_the_vae(files, tmp_path):
    root, _ = files
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    kl = pipe.vae
    with pytest.raises(CheckpointError):
        pipe.load_vae(str(tmp_path / "missing.safetensors"))
    assert pipe.vae is kl and pipe.vae_name is None
    pipe.load_vae(f"taesd:{root}/st")
    assert pipe.config.vae == TAESDConfig() and pipe.vae_name == "taesd_decoder.safetensors"


# ---- bad input ------------------------------------------------------------------------------------------

def _one_line_error(vae, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_pipeline("random:tiny", device="cpu", vae=vae)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_taesd_files(files, tmp_path):
    root, twin = files
    enc, dec = original_layout(twin)
    (tmp_path / "e").mkdir()
    safetensors.torch.save_file(enc, str(tmp_path / "e" / "taesd_encoder.safetensors"))
    _one_line_error(f"taesd:{tmp_path}/e/taesd_encoder.safetensors", "a TAESD encoder, and no decoder beside it")
    _one_line_error(f"taesd:{tmp_path}/e", "a TAESD encoder, and no decoder beside it")  # the folder form too
    _one_line_error("taesd:", "taesd needs a path")
    _one_line_error("taesd", "taesd needs a path")
    _one_line_error(f"taesd:{tmp_path}/nope.pth", "no such file or folder")
    broken = dict(dec)
    del broken["3.conv.2.weight"]
    broken["19.weight"] = torch.zeros(3, 32, 3, 3)
    safetensors.torch.save_file(broken, str(tmp_path / "broken.safetensors"))
    err = _one_line_error(f"taesd:{tmp_path}/broken.safetensors", "TAESD weights do not fit the model")
    assert "decoder.3.conv.2.weight" in err and "decoder.19.weight (3, 32, 3, 3) vs (3, 64, 3, 3)" in err
    f1 = {k: (torch.zeros(64, 16, 3, 3) if k == "1.weight" else v) for k, v in dec.items()}  # a 16-channel TAESD
    safetensors.torch.save_file(f1, str(tmp_path / "taef1_decoder.safetensors"))
    _one_line_error(f"taesd:{tmp_path}/taef1_decoder.safetensors", "16 latent channels but the model's UNet makes 4")
    safetensors.torch.save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    _one_line_error(f"taesd:{tmp_path}/other.safetensors", "not a TAESD file")
    cfg = json.loads((root / "diffusers" / "config.json").read_text())
    (tmp_path / "gelu").mkdir()
    (tmp_path / "gelu" / "config.json").write_text(json.dumps({**cfg, "act_fn": "gelu"}))
    _one_line_error(f"taesd:{tmp_path}/gelu", "AutoencoderTiny with act_fn 'gelu'")


def test_taesd_as_model_is_named(files):
    root, _ = files
    with pytest.raises(CheckpointError, match="TAESD tiny autoencoder.*--vae taesd:FILE"):
        load_pipeline(f"{root}/st/taesd_decoder.safetensors", device="cpu")


# ---- command line ---------------------------------------------------------------------------------------

TINY_CLI = ["--model", "random:tiny", "--steps", "3", "--width", "64", "--height", "64", "--no-progress"]


def test_cli_taesd_with_previews(files, tmp_path, capsys):
    root, _ = files
    out, prev = tmp_path / "cat.png", tmp_path / "preview.png"
    assert main(["a cat", *TINY_CLI, "--vae", f"taesd:{root}/st/taesd_decoder.safetensors", "--seed", "4",
                 "--preview", str(prev), "--preview-every", "2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        params = parse_infotext(im.text["parameters"])[2]
    from fastsd.file_hashes import file_hash

    assert params["VAE"] == "taesd_decoder.safetensors"
    assert params["VAE hash"] == file_hash(str(root / "st" / "taesd_decoder.safetensors"))
    with Image.open(prev) as p:
        assert p.size == (64, 64)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cat.png", "preview.png"]  # no temp files left


def test_cli_bad_vae_and_preview(files, tmp_path, capsys):
    root, _ = files
    _fails(["--vae", f"taesd:{tmp_path}/missing.pth"], tmp_path, capsys, "no such file or folder")
    _fails(["--vae", "taesd"], tmp_path, capsys, "taesd needs a path")
    _fails(["--preview", str(tmp_path / "p.jpg")], tmp_path, capsys, "give a .png path")
    _fails(["--preview", str(tmp_path / "nodir" / "p.png")], tmp_path, capsys, "does not exist")
    _fails(["--preview-every", "3"], tmp_path, capsys, "--preview-every needs --preview FILE")
    out = tmp_path / "same.png"
    assert main(["a cat", *TINY_CLI, "--out", str(out), "--preview", str(out)]) == 2
    assert "is the --out file" in capsys.readouterr().err
    assert not out.exists()
    # a decoder-only TAESD and img2img: refused before anything is written
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    _fails(["--vae", f"taesd:{root}/dec_only", "--init-image", str(tmp_path / "init.png")], tmp_path, capsys,
           "no encoder")
    # and the hires fix's image upscalers (which encode); its latent ones need no encoder
    _fails(["--vae", f"taesd:{root}/dec_only", "--hires-scale", "2", "--hires-upscaler", "Lanczos"], tmp_path, capsys,
           "the hires fix's 'Lanczos' upscaler encodes its image")
    assert main(["a cat", *TINY_CLI, "--vae", f"taesd:{root}/dec_only", "--hires-scale", "2",
                 "--out", str(tmp_path / "hr.png")]) == 0
    assert Image.open(tmp_path / "hr.png").size == (128, 128)
