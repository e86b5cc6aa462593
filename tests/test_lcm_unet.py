"""LCM-distilled UNets (LCM_Dreamshaper_v7's kind, FastSD CPU's default model): diffusers' time_cond_proj_dim, a
guidance-scale embedding in the timestep embedding, no unconditional batch. Oracle: diffusers'
LatentConsistencyModelPipeline on the same random weights."""
import numpy as np
import pytest
import safetensors.torch
import torch
from oracles import diffusers_models

from fastsd import load_pipeline
from fastsd.checkpoint import from_diffusers_folder, ldm_state_dict
from fastsd.config import TINY
from fastsd.image import psnr

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A TINY diffusers folder whose UNet has time_cond_proj_dim 32 (its cond_proj random, large enough to show)."""
    import diffusers

    unet, vae, clip = diffusers_models(TINY, 0)
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    lcm = diffusers.UNet2DConditionModel(**{**cfg, "time_cond_proj_dim": 32})
    g = torch.Generator().manual_seed(1)
    lcm.load_state_dict({**unet.state_dict(), "time_embedding.cond_proj.weight":
                         torch.randn(lcm.config.block_out_channels[0], 32, generator=g) * 0.3})
    root = tmp_path_factory.mktemp("lcm")
    lcm.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    clip.save_pretrained(root / "text_encoder")
    return root, (lcm, vae, clip)


def _diffusers_lcm(models, latents, guidance, seed):
    import diffusers

    from fastsd.testing import SD15_SCHEDULER, tokenizer

    lcm, vae, clip = models
    sp = diffusers.LatentConsistencyModelPipeline(
        vae=vae, text_encoder=clip, tokenizer=tokenizer(), unet=lcm,
        scheduler=diffusers.LCMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    sp.set_progress_bar_config(disable=True)
    img = sp(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=64, width=64, latents=latents.clone(),
             generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return (img * 255).round().astype(np.uint8)


@pytest.mark.parametrize("backend", ["torch", "cpu", "openvino"])
def test_lcm_distilled_unet_matches_diffusers_lcm_pipeline(lcm_folder, backend, monkeypatch):
    """The image of diffusers' LatentConsistencyModelPipeline (guidance 8.5 -> w 7.5 embedded, no CFG batch), 4 LCM
    steps, the same start latents and step-noise seed (observed: the same bytes); guidance 2 gives another image;
    the UNet runs at batch 1 and the negative prompt changes nothing."""
    if backend == "openvino":  # (its graph takes w as an input too)
        pytest.importorskip("openvino")
    root, models = lcm_folder
    pipe = load_pipeline(str(root), device="cpu", dtype="fp32", backend=backend)
    assert pipe.config.unet.time_cond_proj_dim == 32 and pipe.embeds_guidance
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(sampler="lcm", steps=4, width=64, height=64, latents=latents, seed=5, progress=False)
    batches = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: batches.append(x.shape[0]) or forward(x, *a, **k))
    ours = pipe.generate(PROMPT, negative_prompt="blurry", guidance_scale=8.5, **kw)[0]
    assert batches == [1, 1, 1, 1]
    ref = _diffusers_lcm(models, latents, 8.5, 5)
    assert np.asarray(ours).std() > 5 and psnr(ours, ref) >= 60
    assert np.array_equal(np.asarray(pipe.generate(PROMPT, guidance_scale=8.5, **kw)[0]), np.asarray(ours))
    low = pipe.generate(PROMPT, guidance_scale=2.0, **kw)[0]
    assert psnr(low, ref) < psnr(ours, ref) - 10 and psnr(low, _diffusers_lcm(models, latents, 2.0, 5)) >= 60


def test_lcm_distilled_single_file_infers_the_projection(lcm_folder, tmp_path):
    """An LDM single file with diffusers' cond_proj key (which diffusers' LDM converter leaves as it is): the
    projection's size is read from its shape, and the file gives the folder's image."""
    root, _ = lcm_folder
    sd = ldm_state_dict(from_diffusers_folder(str(root)))
    assert "model.diffusion_model.time_embedding.cond_proj.weight" in sd
    path = tmp_path / "lcm.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    single, folder = (load_pipeline(str(p), device="cpu", dtype="fp32", backend="torch") for p in (path, root))
    assert single.config.unet.time_cond_proj_dim == 32
    kw = dict(sampler="lcm", steps=2, width=64, height=64, seed=5, guidance_scale=8.5, progress=False)
    assert np.array_equal(np.asarray(single.generate(PROMPT, **kw)[0]), np.asarray(folder.generate(PROMPT, **kw)[0]))
