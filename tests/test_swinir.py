"""SwinIR upscalers (fastsd/models/swinir.py, convert.swinir_config_from_keys, read_upscaler): outputs equal to
spandrel's (the loader of A1111 >= 1.8 and ComfyUI) on the same random weights for every upsampler (classical
pixelshuffle x2/x3/x4, lightweight pixelshuffledirect, real-world nearest+conv x2/x4, x1), 1conv and 3conv, on
sizes that are not window multiples; the official files' configs read off their shapes; the files' buffers ignored,
Real-ESRGAN's params_ema .pth wrapper and .safetensors read; bad files in one line; the A1111 name "SwinIR 4x"; the
model through Upscaler.run / upscale."""
import re

import numpy as np
import pytest
import torch
from oracles import rel_err, spandrel
from test_upscalers import as_tensor, save
from test_upscalers import image as upscaler_image

from fastsd import convert
from fastsd.config import SwinIRConfig
from fastsd.models.swinir import SwinIR
from fastsd.tensorfile import CheckpointError, TensorRef
from fastsd.upscalers import list_upscalers, load_upscaler, read_upscaler, upscaler_path

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")  # (spandrel's SwinIR, the oracle)


def small(**kw):
    base = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4, mlp_ratio=2.0, upsampler="pixelshuffle",
                scale=2, resi_connection="1conv")
    return SwinIRConfig(**{**base, **kw})


CASES = {  # (depths 2 and 3: a group ending on an unshifted block; heads differing per group)
    "classical-x2": small(),
    "classical-x3-3conv": small(scale=3, resi_connection="3conv", depths=(2, 3), num_heads=(2, 4)),
    "classical-x4-w8": small(scale=4, window_size=8, mlp_ratio=4.0),
    "lightweight-x4": small(upsampler="pixelshuffledirect", scale=4, embed_dim=12, num_heads=(3, 2)),
    "lightweight-x2-3conv": small(upsampler="pixelshuffledirect", resi_connection="3conv"),
    "real-x4-3conv": small(upsampler="nearest+conv", scale=4, resi_connection="3conv", window_size=8),
    "real-x2": small(upsampler="nearest+conv", scale=2),
    "x1-jpeg-w7": small(upsampler="", scale=1, window_size=7, img_range=255.0),  # (the JPEG models' range)
}


def training_size(cfg: SwinIRConfig) -> int:
    """The official models' img_size (their buffers' size): 64, 126 for the JPEG ones (window 7)."""
    return cfg.img_size if cfg.ape else 126 if cfg.window_size == 7 else 64


def oracle(cfg: SwinIRConfig, seed: int = 0):
    """spandrel's SwinIR built as `cfg`, every weight random (its state dict holds the official buffers too)."""
    spandrel()
    from spandrel.architectures.SwinIR import SwinIR as Theirs

    torch.manual_seed(seed)
    m = Theirs(img_size=training_size(cfg), in_chans=cfg.in_channels, embed_dim=cfg.embed_dim, depths=list(cfg.depths),
               num_heads=list(cfg.num_heads), window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, upscale=cfg.scale,
               upsampler=cfg.upsampler, resi_connection=cfg.resi_connection, img_range=cfg.img_range, ape=cfg.ape,
               patch_norm=cfg.patch_norm)
    for name, p in m.named_parameters():  # (default inits leave biases zero and norms at one: every weight random)
        p.data.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    return m.eval()


def image(w=21, h=13, seed=0):  # (not a multiple of any window here)
    return upscaler_image(w, h, seed)


@pytest.mark.parametrize("name", CASES)
def test_outputs_are_spandrels(name, tmp_path):
    """spandrel's model and state dict (with the relative position index and attention mask buffers) read back by
    fastsd: the config is the one built, the output spandrel's, on an image that is not a window multiple."""
    cfg = CASES[name]
    theirs = oracle(cfg)
    sd = theirs.state_dict()
    assert any(k.endswith("attn_mask") for k in sd) and any(k.endswith("relative_position_index") for k in sd)
    desc = spandrel().ModelLoader().load_from_state_dict(sd)
    assert desc.architecture.id == "SwinIR" and desc.scale == cfg.scale
    up = load_upscaler(save(sd, tmp_path / f"{name}.safetensors"))
    assert up.arch == "SwinIR" and up.config == cfg and up.scale == cfg.scale
    x = torch.rand(1, 3, 21, 13)
    with torch.no_grad():
        ref = desc.model.eval()(x)
        ours = up.model(x.contiguous(memory_format=torch.channels_last))  # (as Upscaler.run gives it)
    assert ref.shape == ours.shape == (1, 3, 21 * cfg.scale, 13 * cfg.scale)
    assert rel_err(ours, ref) < 1e-5, rel_err(ours, ref)


def test_absolute_position_embedding_and_no_patch_norm(tmp_path):
    """ape (the embedding's size is the only size it runs at: the image padded to it, the tiles at most that big)
    and no patch_embed.norm, against spandrel's model built so (its loader builds neither)."""
    cfg = small(ape=True, patch_norm=False, img_size=16, window_size=8)
    theirs = oracle(cfg)
    up = load_upscaler(save(theirs.state_dict(), tmp_path / "ape.safetensors"))
    assert up.config == cfg and "patch_embed.norm.weight" not in theirs.state_dict()
    x = torch.rand(1, 3, 14, 13)
    with torch.no_grad():
        assert rel_err(up.model(x), theirs(x)) < 1e-5
    with pytest.raises(ValueError, match="takes images up to 16x16"):
        up.model(torch.rand(1, 3, 17, 8))
    assert up.run(image(40, 30)).size == (80, 60)  # (in tiles of 16 px)


@pytest.mark.parametrize("kind", ["safetensors", "params_ema", "no buffers"])
def test_files_and_wrappers(kind, tmp_path):
    """The same weights as .safetensors, as A1111's SwinIR_4x.pth ({"params_ema": ...}, the official release's
    wrapper), and without the buffers (fastsd's own state dict) give the same model."""
    cfg = CASES["real-x4-3conv"]
    theirs = oracle(cfg)
    sd = theirs.state_dict()
    if kind == "safetensors":
        path = save(sd, tmp_path / "x.safetensors")
    elif kind == "params_ema":
        path = str(tmp_path / "SwinIR_4x.pth")
        torch.save({"params_ema": sd}, path)
    else:
        path = str(tmp_path / "x.pth")
        torch.save({k: v for k, v in sd.items() if not convert.SWINIR_BUFFERS.fullmatch(k)}, path)
        assert not any("attn_mask" in k or "position_index" in k for k in read_upscaler(path).refs)
    x = torch.rand(1, 3, 12, 9)
    with torch.no_grad():
        assert rel_err(load_upscaler(path).model(x), theirs(x)) < 1e-5


OFFICIAL = {  # the official releases' configs (their main_test_swinir.py), read back from the shapes of their keys
    "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN (A1111's SwinIR 4x)": SwinIRConfig(),
    "001_classicalSR_DF2K_s64w8_SwinIR-M_x2": SwinIRConfig(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6,
                                                           upsampler="pixelshuffle", scale=2, resi_connection="1conv"),
    "001_classicalSR_DF2K_s64w8_SwinIR-M_x3": SwinIRConfig(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6,
                                                           upsampler="pixelshuffle", scale=3, resi_connection="1conv"),
    "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4": SwinIRConfig(embed_dim=60, depths=(6,) * 4, num_heads=(6,) * 4,
                                                              upsampler="pixelshuffledirect", scale=4,
                                                              resi_connection="1conv"),
    "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x2_GAN": SwinIRConfig(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6,
                                                                scale=2, resi_connection="1conv"),
    "006_colorCAR_DFWB_s126w7_SwinIR-M_jpeg10": SwinIRConfig(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6,
                                                             window_size=7, upsampler="", scale=1,
                                                             resi_connection="1conv", img_range=255.0),
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_configs_from_shapes(name, monkeypatch):
    """fastsd's module names and shapes for each official config are spandrel's (less the buffers), and the config
    read off them is that config."""
    cfg = OFFICIAL[name]
    spandrel()
    from spandrel.architectures.SwinIR import SwinIR as Theirs

    monkeypatch.setattr(Theirs, "_init_weights", lambda self, m: None)  # (the weights' values don't matter here)
    theirs = Theirs(img_size=training_size(cfg), in_chans=3, embed_dim=cfg.embed_dim, depths=list(cfg.depths),
                    num_heads=list(cfg.num_heads), window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio,
                    upscale=cfg.scale, upsampler=cfg.upsampler, resi_connection=cfg.resi_connection,
                    img_range=cfg.img_range)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if not convert.SWINIR_BUFFERS.fullmatch(k)}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SwinIR(cfg).state_dict().items()}
    assert shapes == want
    assert convert.swinir_config_from_keys({k: TensorRef(s, None) for k, s in shapes.items()}) == cfg


def test_bad_files_are_one_line_and_named(tmp_path):
    sd = oracle(CASES["classical-x2"]).state_dict()
    table = "layers.0.residual_group.blocks.1.attn.relative_position_bias_table"
    swin2sr = {k.replace("relative_position_bias_table", "logit_scale"): v for k, v in sd.items()}
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "layers.1.residual_group.blocks.1.mlp.fc2.bias"},
                    "1 missing (layers.1.residual_group.blocks.1.mlp.fc2.bias)"),
        "shape": ({**sd, table: torch.zeros(81, 2)}, f"{table} (81, 2) vs (49, 2)"),
        "table": ({**sd, table.replace("blocks.1", "blocks.0"): torch.zeros(50, 2)},
                  "blocks.0.attn.relative_position_bias_table has 50 rows, not (2 x window - 1)**2"),
        "extra": ({**sd, "layers.0.residual_group.blocks.0.attn.scale": torch.zeros(1)},
                  "1 unexpected (layers.0.residual_group.blocks.0.attn.scale)"),
        "no-body-conv": ({k: v for k, v in sd.items() if not k.startswith("conv_after_body.")},
                         "a SwinIR model without conv_after_body.weight (1conv) or conv_after_body.0.weight"),
        "upsample": ({**sd, "upsample.0.weight": torch.zeros(200, 64, 3, 3)},
                     "upsample.0.weight makes 200 channels, not 4 x 64 (x2 per conv) or 9 x 64 (x3, alone)"),
        "hat": ({**sd, "layers.0.residual_group.overlap_attn.qkv.weight": torch.zeros(48, 16)}, "a HAT model"),
        "swin2sr": (swin2sr, "not an ESRGAN / Real-ESRGAN / SwinIR upscaler (keys "),
        "gray": (oracle(small(in_channels=1)).state_dict(), "an upscaler for 1-channel images"),
    }
    for name, (data, match) in cases.items():
        path = save(data, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError) as e:
            read_upscaler(path)
        assert match in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(path), (name, e.value)


def test_run_and_upscale(tmp_path):
    """Upscaler.run on one tile is the model's output exactly; tiles of any size (each padded to the window by the
    model) are placed right: an x1 model without its conv_last (the output is the input) gives the image back
    through tiles of 20 px (window 7); upscale is A1111's rule to any size."""
    up = load_upscaler(save(oracle(CASES["real-x2"]).state_dict(), tmp_path / "2x-Swin.safetensors"))
    im = image(37, 26)
    whole = up.run(im, tile=0)
    with torch.no_grad():
        exact = up.model(as_tensor(im)).clamp(0, 1).mul(255).round()[0].permute(1, 2, 0).numpy()
    assert whole.size == (74, 52) and np.array_equal(np.asarray(whole), exact.astype(np.uint8))
    assert up.run(im, tile=20, overlap=6).size == (74, 52)
    out = up.upscale(image(16, 12), 75, 50)  # (3 passes: 16 -> 128 px wide covers 72 x 56; then Lanczos)
    assert out.size == (75, 50) and out.mode == "RGB"
    one = load_upscaler(save(oracle(CASES["x1-jpeg-w7"]).state_dict(), tmp_path / "1x-Swin.safetensors"))
    with torch.no_grad():
        one.model.conv_last.weight.zero_()
        one.model.conv_last.bias.zero_()
    assert np.array_equal(np.asarray(one.run(im, tile=20, overlap=6)), np.asarray(im))


def test_swinir_runs_fp16_in_fp32(tmp_path):
    """fp16 (a CUDA pipeline's dtype) overflows SwinIR's attention and LayerNorms: load_upscaler takes fp32 for it;
    bf16 stays bf16, and other architectures keep fp16."""
    path = save(oracle(CASES["real-x2"]).state_dict(), tmp_path / "2x-Swin.safetensors")
    assert load_upscaler(path, dtype=torch.float16).dtype == torch.float32
    assert load_upscaler(path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a1111_name(tmp_path):
    """A1111's built-in "SwinIR 4x" is the file it downloads for it, SwinIR_4x.pth (models/SwinIR)."""
    torch.save({"params_ema": oracle(CASES["real-x4-3conv"]).state_dict()}, tmp_path / "SwinIR_4x.pth")
    have = list_upscalers(str(tmp_path))
    assert set(have) == {"SwinIR_4x", "SwinIR 4x"} and upscaler_path("SwinIR 4x", str(tmp_path)) == have["SwinIR_4x"]
    assert load_upscaler(have["SwinIR 4x"]).scale == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape("A1111 downloads SwinIR_4x.pth for it")):
        upscaler_path("SwinIR 4x", str(tmp_path / "empty"))
