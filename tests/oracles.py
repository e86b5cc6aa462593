"""diffusers / transformers models built to match a fastsd SDConfig: the oracles of the parity tests.
Used only by tests, never at run time."""
from __future__ import annotations

import torch

from fastsd.testing import diffusers_unet, diffusers_vae, transformers_clip  # noqa: F401  (the same twins)
from fastsd.config import SDConfig


def diffusers_models(cfg: SDConfig, seed: int = 0):
    """(unet, vae, text_encoder) with random weights from `seed` (every layer random, none zeroed)."""
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
