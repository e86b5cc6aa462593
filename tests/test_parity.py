"""fastsd's models against diffusers/transformers with the same random weights, loaded from a diffusers
folder and from an LDM single file written with fastsd's diffusers->LDM rules; and the rules themselves
proven by diffusers' own LDM->diffusers converters."""
import pytest
import safetensors.torch
import torch
from oracles import rel_err, save_diffusers_folder

from fastsd import load_pipeline
from fastsd.checkpoint import from_diffusers_folder, ldm_state_dict
from fastsd.config import SD15, TINY, TINY_INPAINT

TOL = 1e-4  # max abs err / max abs ref, fp32

CASES = [pytest.param(TINY, id="tiny"), pytest.param(TINY_INPAINT, id="tiny-inpainting"),
         pytest.param(SD15, id="sd15", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=CASES)
def saved(request, tmp_path_factory):
    """(cfg, oracles, diffusers folder, LDM .safetensors written by fastsd's rename rules)."""
    cfg = request.param
    root = tmp_path_factory.mktemp("models")
    oracles = save_diffusers_folder(cfg, root / "diffusers")
    ldm = root / "model.safetensors"
    safetensors.torch.save_file(ldm_state_dict(from_diffusers_folder(str(root / "diffusers"))), str(ldm))
    return cfg, oracles, root / "diffusers", ldm


def test_ldm_rules_round_trip_through_diffusers_converters(saved):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    _, (unet, vae, clip), _, ldm = saved
    sd = safetensors.torch.load_file(str(ldm))
    back = {"unet": convert_ldm_unet_checkpoint(dict(sd), dict(unet.config)),
            "vae": convert_ldm_vae_checkpoint(dict(sd), dict(vae.config)),
            # diffusers names CLIP keys text_model.*; transformers >= 5 state dicts drop that level
            "clip": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(dict(sd)).items()}}
    for name, model in (("unet", unet), ("vae", vae), ("clip", clip)):
        orig = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        assert sorted(back[name]) == sorted(orig), name
        for k, v in orig.items():
            assert torch.equal(back[name][k], v), f"{name}: {k}"


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.unet.in_channels, 16, 16, generator=g)
    t = torch.tensor([10.0, 781.0])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    img = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(2, cfg.vae.z_channels, 16, 16, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 49406, 49407, 49407  # BOS, prompt, EOS padding
    return x, t, ctx, img, z, ids


@pytest.mark.parametrize("fmt", ["diffusers", "ldm"])
@torch.no_grad()
def test_outputs_match_oracles(saved, fmt):
    cfg, (unet, vae, clip), folder, ldm = saved
    pipe = load_pipeline(str(folder if fmt == "diffusers" else ldm), device="cpu", dtype="fp32", backend="torch")
    assert pipe.config.unet == cfg.unet and pipe.config.vae == cfg.vae
    assert pipe.kind == ("sd1-inpainting" if cfg.unet.in_channels == 9 else "sd1")
    x, t, ctx, img, z, ids = _inputs(cfg)

    assert rel_err(pipe.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample) < TOL

    dist = vae.encode(img).latent_dist
    mean, logvar = pipe.vae.encode(img)
    assert rel_err(mean, dist.mean) < TOL
    assert rel_err(logvar, dist.logvar) < TOL
    assert rel_err(pipe.vae.decode(z), vae.decode(z).sample) < TOL

    ref = clip(ids, output_hidden_states=True)
    hidden, pooled = pipe.clip(ids)
    assert rel_err(hidden, ref.last_hidden_state) < TOL
    assert rel_err(pooled, ref.pooler_output) < TOL
    # A1111 clip skip 2 = the penultimate layer through the final LayerNorm (diffusers' clip_skip=1)
    final_ln = clip.get_submodule("text_model.final_layer_norm" if hasattr(clip, "text_model") else "final_layer_norm")
    hidden2, _ = pipe.clip(ids, clip_skip=2)
    assert rel_err(hidden2, final_ln(ref.hidden_states[-2])) < TOL
