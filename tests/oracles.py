"""diffusers / transformers models built to match a fastsd SDConfig: the oracles of the parity tests.
Used only by tests, never at run time."""
from __future__ import annotations

import torch

from fastsd.config import SDConfig


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


def transformers_clip(cfg: SDConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    c = cfg.clip
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, max_position_embeddings=c.max_positions,
        hidden_act="quick_gelu", layer_norm_eps=c.layer_norm_eps, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1, projection_dim=c.hidden_size))


def diffusers_models(cfg: SDConfig, seed: int = 0):
    """(unet, vae, text_encoder) with random weights; the VAE and UNet outputs are made non-trivial by
    scaling the zero-initialised-in-training layers' random init (all layers here are random anyway)."""
    torch.manual_seed(seed)
    unet, vae, clip = diffusers_unet(cfg), diffusers_vae(cfg), transformers_clip(cfg)
    return unet.eval(), vae.eval(), clip.eval()


def save_diffusers_folder(cfg: SDConfig, path, seed: int = 0, safe_serialization: bool = True):
    unet, vae, clip = diffusers_models(cfg, seed)
    unet.save_pretrained(f"{path}/unet", safe_serialization=safe_serialization)
    vae.save_pretrained(f"{path}/vae", safe_serialization=safe_serialization)
    clip.save_pretrained(f"{path}/text_encoder", safe_serialization=safe_serialization)
    return unet, vae, clip


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|"""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
