"""Standalone VAE files (--vae / load_pipeline(vae=)): LDM files with and without `first_stage_model.`,
A1111-style EMA .ckpt files, diffusers folders; the VAE replaces the model's, the infotext names it, and
bad files are one-line errors (exit 2 on the CLI, nothing written)."""
import json
import re

import pytest
import safetensors.torch
import torch
from oracles import rel_err
from test_generate_cli import _fails  # one-line error, exit 2, nothing written

from fastsd import CheckpointError, GenerationSettings, load_pipeline
from fastsd.config import SD15, TINY, VAEConfig
from fastsd.generate import main
from fastsd.file_hashes import file_hash
from fastsd.image import parse_infotext
from fastsd.models.vae import AutoencoderKL

TOL = 1e-4


def random_vae(cfg: VAEConfig, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval().requires_grad_(False)


def diffusers_twin(vae: AutoencoderKL, cfg: VAEConfig):
    """diffusers' AutoencoderKL with these weights, converted by diffusers' own LDM converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from fastsd.config import SDConfig
    from fastsd.testing import diffusers_vae

    twin = diffusers_vae(SDConfig(vae=cfg))
    sd = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae.state_dict().items()},
                                    dict(twin.config))
    twin.load_state_dict(sd, strict=True)
    return twin.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    vae = random_vae(TINY.vae, seed=5)
    sd = vae.state_dict()
    safetensors.torch.save_file(sd, str(root / "plain.safetensors"))
    safetensors.torch.save_file({"first_stage_model." + k: v for k, v in sd.items()}, str(root / "prefixed.safetensors"))
    # as vae-ft-mse-840000-ema-pruned.ckpt: a state_dict wrapper, EMA counters and a loss leftover
    ema = {**sd, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000),
           "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": ema, "global_step": 840000}, root / "vae-ema-pruned.ckpt")
    twin = diffusers_twin(vae, TINY.vae)
    twin.save_pretrained(str(root / "diffusers-vae"))
    return root, vae, twin


@pytest.mark.parametrize("name", ["plain.safetensors", "prefixed.safetensors", "vae-ema-pruned.ckpt",
                                  "diffusers-vae", "diffusers-vae/diffusion_pytorch_model.safetensors"])
def test_vae_files_replace_the_models_vae(files, name):
    root, vae, twin = files
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch", vae=str(root / name))
    ours = pipe.vae.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in vae.state_dict().items()) and ours.keys() == vae.state_dict().keys()
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(pipe.decode(lat), twin.decode(lat / 0.18215).sample) <= TOL
        img = torch.rand(1, 3, 32, 32) * 2 - 1
        assert rel_err(pipe.encode_images(img, None), twin.encode(img).latent_dist.mean * 0.18215) <= TOL
    assert pipe.vae_name == name.split("/")[-1]


def test_the_models_own_vae_is_not_used(files):
    root, vae, _ = files
    own = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    new = load_pipeline("random:tiny", device="cpu", dtype="fp32", vae=str(root / "plain.safetensors"))
    assert torch.equal(own.unet.out[2].weight, new.unet.out[2].weight)  # the rest of the model is the same
    lat = torch.randn(1, 4, 8, 8)
    assert not torch.allclose(own.decode(lat), new.decode(lat))


def test_infotext_names_the_vae_as_a1111(files):
    root, _, _ = files
    pipe = load_pipeline("random:tiny", device="cpu", vae=str(root / "prefixed.safetensors"))
    im = pipe.generate("a cat", steps=1, width=32, height=32, seed=1, progress=False)[0]
    params = parse_infotext(im.info["parameters"])[2]
    assert params["VAE"] == "prefixed.safetensors"
    assert params["VAE hash"] == file_hash(str(root / "prefixed.safetensors"))  # sha256[:10], as A1111
    pipe = load_pipeline("random:tiny", device="cpu", vae=str(root / "diffusers-vae"))
    params = parse_infotext(pipe.infotext(GenerationSettings("x", seed=1, width=32, height=32)))[2]
    assert params["VAE"] == "diffusers-vae" and "VAE hash" not in params  # a folder has no file hash
    plain = load_pipeline("random:tiny", device="cpu")
    assert "VAE" not in parse_infotext(plain.infotext(GenerationSettings("x", seed=1, width=32, height=32)))[2]


# ---- bad input ------------------------------------------------------------------------------------------

def _one_line_error(vae, match, model="random:tiny"):
    with pytest.raises(CheckpointError, match=match) as e:
        load_pipeline(model, device="cpu", vae=str(vae))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_vae_files(files, tmp_path):
    root, vae, _ = files
    sd = vae.state_dict()
    full = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            **{"first_stage_model." + k: v for k, v in sd.items()}}
    safetensors.torch.save_file(full, str(tmp_path / "full.safetensors"))
    _one_line_error(tmp_path / "full.safetensors", "a full Stable Diffusion checkpoint, not a VAE file")
    safetensors.torch.save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)},
                                str(tmp_path / "lora.safetensors"))
    _one_line_error(tmp_path / "lora.safetensors", r"not a VAE file \(this is a LoRA")
    broken = {k: v for k, v in sd.items() if k != "decoder.mid.attn_1.q.weight"}
    broken["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    safetensors.torch.save_file(broken, str(tmp_path / "broken.safetensors"))
    err = _one_line_error(tmp_path / "broken.safetensors", "VAE weights do not fit the model")
    assert "decoder.mid.attn_1.q.weight" in err and "decoder.conv_out.weight (3, 16, 3, 3) vs (3, 32, 3, 3)" in err
    wide = random_vae(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16), seed=0)
    safetensors.torch.save_file(wide.state_dict(), str(tmp_path / "flux-like.safetensors"))
    _one_line_error(tmp_path / "flux-like.safetensors", "16 latent channels but the model's UNet makes 4")
    sdxl = tmp_path / "sdxl-vae"
    sdxl.mkdir()
    for f in (root / "diffusers-vae").iterdir():
        (sdxl / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((sdxl / "config.json").read_text())
    (sdxl / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.13025}))
    _one_line_error(sdxl, "scaling_factor 0.13025 is not the model's 0.18215")
    _one_line_error(tmp_path / "missing.safetensors", "no such file or folder")
    _one_line_error(tmp_path, "no VAE in this folder")


def test_standalone_vae_as_model_points_to_vae(files):
    root, _, _ = files
    with pytest.raises(CheckpointError, match="standalone VAE.*--vae"):
        load_pipeline(str(root / "plain.safetensors"), device="cpu")
    with pytest.raises(CheckpointError, match=r"standalone VAE \(first_stage_model.\* only\).*--vae"):
        load_pipeline(str(root / "prefixed.safetensors"), device="cpu")


def test_cli_vae_file_and_bad_vae(files, tmp_path, capsys):
    root, _, _ = files
    tiny = ["--model", "random:tiny", "--steps", "1", "--width", "32", "--height", "32", "--no-progress"]
    out = tmp_path / "ok.png"
    assert main(["a cat", *tiny, "--vae", str(root / "vae-ema-pruned.ckpt"), "--seed", "1", "--out", str(out)]) == 0
    assert "vae vae-ema-pruned.ckpt" in capsys.readouterr().err  # the run summary names it
    from PIL import Image

    with Image.open(out) as im:
        assert parse_infotext(im.text["parameters"])[2]["VAE"] == "vae-ema-pruned.ckpt"
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _fails(["--vae", str(tmp_path / "bad.safetensors")], tmp_path, capsys, "not a valid safetensors file")
    _fails(["--vae", str(tmp_path / "nope.ckpt")], tmp_path, capsys, "no such file or folder")
    _fails(["--vae", str(root / "plain.safetensors"), "--model", str(root / "plain.safetensors")], tmp_path, capsys,
           "standalone VAE")


@pytest.mark.slow
def test_sd15_size_vae_file(tmp_path):
    """An SD1.5-size VAE (the real architecture, random weights, .ckpt) decodes as diffusers does."""
    vae = random_vae(SD15.vae, seed=2)
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in vae.state_dict().items()}},
               tmp_path / "vae.ckpt")
    twin = diffusers_twin(vae, SD15.vae)
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch", vae=str(tmp_path / "vae.ckpt"))
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(pipe.decode(lat), twin.decode(lat / 0.18215).sample) <= TOL


# ---- bad values in a diffusers VAE folder's config.json --------------------------------------------------

BAD_CONFIGS = [
    ("norm_num_groups", 0), ("norm_num_groups", -32), ("norm_num_groups", 7), ("norm_num_groups", "32"),
    ("norm_num_groups", None),
    ("block_out_channels", [0, 0, 0, 0]), ("block_out_channels", [-1, 2]), ("block_out_channels", [32.5, 32, 64, 64]),
    ("block_out_channels", [32, 48, 64, 64]), ("block_out_channels", [1 << 40] * 4),
    ("in_channels", -3), ("in_channels", "3"), ("in_channels", 0), ("out_channels", 4),
    ("layers_per_block", "1"), ("layers_per_block", None), ("layers_per_block", 1000), ("latent_channels", "4"),
    ("scaling_factor", "abc"), ("scaling_factor", None), ("scaling_factor", float("nan")),
    ("scaling_factor", float("inf")), ("scaling_factor", [0.18215]),
    ("act_fn", "gelu"), ("act_fn", 3), ("act_fn", None),
    ("down_block_types", ["Foo"] * 4), ("down_block_types", None),
    ("up_block_types", ["UpDecoderBlock2D"] * 3), ("mid_block_add_attention", False), ("use_quant_conv", False),
]


def _bad_config_folder(files, tmp_path, field, value):
    root = files[0]
    bad = tmp_path / "bad-vae"
    bad.mkdir()
    for f in (root / "diffusers-vae").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, field: value}))  # NaN/Infinity as Python's json writes them
    return bad


@pytest.fixture(scope="module")
def pipe_with_vae(files):
    """A pipeline whose VAE was replaced by the good diffusers folder, to see that a bad one leaves it."""
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    pipe.load_vae(str(files[0] / "diffusers-vae"))
    return pipe


@pytest.mark.parametrize("field, value", BAD_CONFIGS, ids=lambda v: json.dumps(v) if not isinstance(v, str) else v)
def test_bad_vae_config_values_are_one_line_errors(files, pipe_with_vae, tmp_path, field, value):
    bad = _bad_config_folder(files, tmp_path, field, value)
    err = _one_line_error(bad, re.escape(str(bad / "config.json")) + f": {field} ")  # names the file and field
    assert json.dumps(value)[:20] in err  # and the value, as the file writes it
    pipe = pipe_with_vae
    vae, state = pipe.vae, {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"config.json: {field} "):
        pipe.load_vae(str(bad))
    assert pipe.vae is vae and pipe.vae_name == "diffusers-vae" and pipe.config.vae == vae.cfg  # the old VAE stays
    assert all(torch.equal(v, state[k]) for k, v in pipe.vae.state_dict().items())


@pytest.mark.parametrize("field, value", [("norm_num_groups", 0), ("block_out_channels", [-1, 2]),
                                          ("in_channels", -3), ("scaling_factor", "abc"), ("act_fn", "gelu"),
                                          ("norm_num_groups", -32), ("down_block_types", ["Foo"] * 4)])
def test_cli_bad_vae_config_values(files, tmp_path, capsys, field, value):
    bad = _bad_config_folder(files, tmp_path, field, value)
    _fails(["--vae", str(bad)], tmp_path, capsys, f"{bad / 'config.json'}: {field} ")


def test_vae_config_without_optional_fields_still_loads(files, tmp_path):
    """Older diffusers configs leave out act_fn, the block types, scaling_factor and the newer flags: the
    defaults (SD's) are taken."""
    root = files[0]
    bad = _bad_config_folder(files, tmp_path, "act_fn", "silu")
    cfg = json.loads((bad / "config.json").read_text())
    keep = ("_class_name", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
    (bad / "config.json").write_text(json.dumps({k: cfg[k] for k in keep}))
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", vae=str(bad))
    good = load_pipeline("random:tiny", device="cpu", dtype="fp32", vae=str(root / "diffusers-vae"))
    lat = torch.randn(1, 4, 8, 8)
    assert torch.equal(pipe.decode(lat), good.decode(lat))
