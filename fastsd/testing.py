"""Oracles for tests and benchmarks: diffusers / transformers twins of a fastsd pipeline, holding
fastsd's own weights. Never imported by fastsd at run time (diffusers is a test extra).

The twins are built from the fastsd config (tests/oracles.py uses these builders too), and filled from fastsd's state dicts: fastsd's module names are
the LDM checkpoint names, so `{LDM_PREFIXES[model] + key: tensor}` is an LDM single-file state dict,
which diffusers' own converters (`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
`convert_ldm_clip_checkpoint`) turn into diffusers names; `load_state_dict(strict=True)` then proves
every weight found its place. Whatever random or loaded weights fastsd has, diffusers runs the same ones.

The UNet and VAE twins are built on the meta device and take fastsd's tensors themselves
(`load_state_dict(assign=True)`): no second copy of the weights in memory, and the twin's parameters
ARE fastsd's (changing one changes the other; nothing here changes weights). The CLIP twin is small
and gets a copy.
"""
from __future__ import annotations

import torch

from fastsd.checkpoint import ldm_state_dict
from fastsd.config import SDConfig, TAESDConfig

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")


def diffusers_unet(cfg: SDConfig):
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)]
    return UNet2DConditionModel(
        sample_size=64, in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=[u.model_channels * m for m in u.channel_mult], layers_per_block=u.num_res_blocks,
        down_block_types=down, up_block_types=up, cross_attention_dim=u.context_dim,
        attention_head_dim=u.num_heads, norm_num_groups=u.norm_groups)


def diffusers_vae(cfg: SDConfig):
    from diffusers import AutoencoderKL

    v = cfg.vae
    n = len(v.ch_mult)
    return AutoencoderKL(
        in_channels=v.in_channels, out_channels=v.out_ch, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[v.ch * m for m in v.ch_mult],
        layers_per_block=v.num_res_blocks, latent_channels=v.z_channels, norm_num_groups=v.norm_groups,
        scaling_factor=v.scale_factor, sample_size=256)


def diffusers_taesd(cfg: TAESDConfig = TAESDConfig()):
    """diffusers' AutoencoderTiny of a fastsd TAESDConfig (the default: SD1.5's TAESD, madebyollin/taesd)."""
    from diffusers import AutoencoderTiny

    n_enc, n_dec = len(cfg.encoder_blocks), len(cfg.decoder_blocks)
    return AutoencoderTiny(
        in_channels=cfg.image_channels, out_channels=cfg.image_channels, latent_channels=cfg.latent_channels,
        encoder_block_out_channels=[cfg.channels] * n_enc, decoder_block_out_channels=[cfg.channels] * n_dec,
        num_encoder_blocks=list(cfg.encoder_blocks), num_decoder_blocks=list(cfg.decoder_blocks),
        scaling_factor=cfg.scale_factor)


def taesd_diffusers_state_dict(model) -> dict[str, torch.Tensor]:
    """A fastsd TAESD's weights under AutoencoderTiny's names: the original decoder's index 0 is its Clamp,
    which diffusers has no module for, so decoder index N is diffusers' layers.N-1."""
    out = {}
    for k, v in model.state_dict().items():
        part, idx, rest = k.split(".", 2)
        out[f"{part}.layers.{int(idx) - (part == 'decoder')}.{rest}"] = v
    return out


def taesd_twin(model):
    """diffusers' AutoencoderTiny holding a fastsd TAESD's weights (a copy), strictly loaded."""
    twin = diffusers_taesd(model.cfg)
    sd = taesd_diffusers_state_dict(model)
    if model.encoder is None:  # decoder only: the twin's encoder keeps its own (unused) weights
        sd.update({k: v for k, v in twin.state_dict().items() if k.startswith("encoder.")})
    twin.load_state_dict(sd, strict=True)
    device = next(model.parameters()).device
    return twin.to(device=device, dtype=model.dtype, memory_format=torch.contiguous_format).eval().requires_grad_(False)


def transformers_clip(cfg: SDConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    c = cfg.clip
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, max_position_embeddings=c.max_positions,
        hidden_act="quick_gelu", layer_norm_eps=c.layer_norm_eps, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1, projection_dim=c.hidden_size))


def _build(ctor, cfg: SDConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
    """Build on the meta device (no random init, no second copy) and take `sd`'s tensors strictly;
    if anything stays on meta (a non-persistent buffer), build normally and copy instead."""
    with torch.device("meta"):
        model = ctor(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = ctor(cfg)
        model.load_state_dict(sd, strict=True)
    # diffusers as its users run it: NCHW weights (fastsd's CPU path keeps its own in channels_last)
    model = model.to(device=device, dtype=dtype, memory_format=torch.contiguous_format)
    return model.eval().requires_grad_(False)


def unet_twin(pipe):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        config = dict(diffusers_unet(pipe.config).config)
    sd = convert_ldm_unet_checkpoint(ldm_state_dict(pipe, ("unet",)), config)
    return _build(diffusers_unet, pipe.config, sd, pipe.dtype, pipe.device)


def vae_twin(pipe):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        config = dict(diffusers_vae(pipe.config).config)
    sd = convert_ldm_vae_checkpoint(ldm_state_dict(pipe, ("vae",)), config)
    return _build(diffusers_vae, pipe.config, sd, pipe.dtype, pipe.device)


def clip_twin(pipe):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    sd = convert_ldm_clip_checkpoint(ldm_state_dict(pipe, ("clip",)))
    model = transformers_clip(pipe.config)  # small: built normally (its position_ids buffer must be real)
    keys = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in keys):  # transformers >= 5 drops the text_model level
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k in keys or not k.endswith("position_ids")}
    model.load_state_dict(sd, strict=True)
    return model.to(device=pipe.device, dtype=pipe.dtype).eval().requires_grad_(False)


def tokenizer():
    """transformers' CLIPTokenizer over fastsd's shipped vocabulary (pads with EOS, as SD1.x's does)."""
    from importlib.resources import files

    from transformers import CLIPTokenizer

    assets = files("fastsd") / "assets"
    return CLIPTokenizer(str(assets / "vocab.json"), str(assets / "merges.txt"), model_max_length=77)


# fastsd sampler -> its diffusers twin scheduler (class name, from_config extras)
DIFFUSERS_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}), "ddim": ("DDIMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}), "lcm": ("LCMScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}), "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}), "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_heun": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpmpp_2m_sde_heun_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "solver_type": "heun", "use_karras_sigmas": True}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    # its Brownian noise: the same as fastsd's for one image when its noise_sampler_seed is the image's seed
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
}  # dpmpp_2s_a(_karras), dpmpp_3m_sde(_karras): no diffusers twin (tests/test_samplers*.py hold them to k-diffusion's
#    algorithms; diffusers' solver_order=3 SDE step is another method, sample_dpmpp_3m_sde), restart (A1111's
#    restart_sampler, tests/test_samplers_extra.py)


def diffusers_scheduler(sampler: str):
    """The diffusers scheduler that fastsd's `sampler` matches, from the SD1.5 scheduler config."""
    import diffusers

    from fastsd.samplers import resolve_sampler_name

    cls, extra = DIFFUSERS_SCHEDULERS[resolve_sampler_name(sampler)]
    return getattr(diffusers, cls).from_config(SD15_SCHEDULER, **extra)


def diffusers_pipeline(pipe, unet=None, vae=None, clip=None, sampler: str = "euler"):
    """A StableDiffusionPipeline on fastsd's weights, with the twin scheduler of fastsd's `sampler`."""
    import diffusers

    sp = diffusers.StableDiffusionPipeline(
        vae=vae or vae_twin(pipe), text_encoder=clip or clip_twin(pipe), tokenizer=tokenizer(),
        unet=unet or unet_twin(pipe), scheduler=diffusers_scheduler(sampler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sp.set_progress_bar_config(disable=True)
    return sp
