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


def spandrel():
    """spandrel (the upscaler-model loader of A1111 >= 1.8 and ComfyUI), the oracle of fastsd/upscalers.py. It
    imports torchvision only for two architectures fastsd doesn't read (LaMa, RestoreFormer); PyPI's torchvision
    wheels are built against CUDA torch and break on the CPU wheel, so `.ci/run` installs spandrel without it
    and the three names those modules import are given placeholders here (nothing calls them)."""
    import importlib.util
    import sys
    import types

    import pytest

    if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return pytest.importorskip("spandrel")
    stubs = [types.ModuleType(n) for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")]
    tv, tr, fn = stubs
    fn.InterpolationMode = fn.rotate = fn.normalize = None
    tv.transforms, tr.functional = tr, fn
    sys.modules.update({m.__name__: m for m in stubs})
    try:  # (the placeholders leave sys.modules again: other libraries look for a real torchvision there)
        return pytest.importorskip("spandrel")
    finally:
        for m in stubs:
            sys.modules.pop(m.__name__, None)
