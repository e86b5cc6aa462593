"""diffusers / transformers models built to match a fastsd SDConfig: the oracles of the parity tests.
Used only by tests, never at run time."""
from __future__ import annotations

import contextlib

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


def diffusers_strength(steps: int, strength: float) -> float:
    """The strength at which diffusers' img2img (int(steps * strength) steps, from one level lower) runs the tail
    that fastsd and A1111 run at `strength` (int(min(strength, 0.999) * steps) + 1 steps:
    schedules.img2img_start_index)."""
    return min(1.0, (int(min(strength, 0.999) * steps) + 1.5) / steps)


@contextlib.contextmanager
def posterior_mean():
    """diffusers' img2img encoding the init image to its posterior's mean, as fastsd does (A1111's posterior noise is
    unseeded): each generator's first draw is then the start noise, as fastsd's and A1111's."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as m

    sample = m.retrieve_latents
    m.retrieve_latents = lambda out, generator=None, sample_mode="sample": sample(out, generator, "argmax")
    try:
        yield
    finally:
        m.retrieve_latents = sample


class A1111Img2Img:
    """A diffusers img2img pipeline called as fastsd's (A1111's) img2img runs: the posterior's mean, A1111's step
    count (`diffusers_strength`); everything else is the pipeline's."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, strength: float, num_inference_steps: int, **kw):
        with posterior_mean():
            return self.pipe(*args, strength=diffusers_strength(num_inference_steps, strength),
                             num_inference_steps=num_inference_steps, **kw)


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
