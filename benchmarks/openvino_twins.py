"""The "openvino-diffusers" implementation of the harness: plain OpenVINO models converted from the
diffusers twins (fastsd.testing; fastsd's weights), run the way OpenVINO's own SD pipelines run them.

Same conversion and settings as fastsd's openvino backend, so a ratio between the two measures fastsd's
own overhead and graph only: `openvino.convert_model` of a TorchScript trace of the f32 twin, the same
disk cache (fastsd/backends/openvino.py, part names "diffusers-*"), static shapes per call, the same
compile config (precision hint for the dtype, torch's thread count, LATENCY). The twins' forwards are
replaced by the compiled models; for the pipeline suite, a diffusers StableDiffusionPipeline runs on
such twins (its scheduler and pre/post-processing in torch, as optimum-intel's OV pipelines do).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fastsd.backends import openvino as ovb


class UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        unet = self.unet  # the class's forward: the twin's own may be replaced by the compiled model
        return type(unet).forward(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                  return_dict=False)[0]


class VAEDecodeGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return type(self.vae).decode(self.vae, z, return_dict=False)[0]


class VAEEncodeGraph(nn.Module):
    """The posterior's moments (mean, logvar), as diffusers' AutoencoderKL._encode."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.quant_conv(self.vae.encoder(x))


class TextGraph(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, ids):
        return type(self.clip).forward(self.clip, ids, return_dict=False)[0]


def _f32(module: nn.Module) -> nn.Module:
    return module if next(module.parameters()).dtype == torch.float32 else copy.deepcopy(module).float()


class OVTwin:
    """One diffusers module compiled by OpenVINO; call with the graph's inputs (torch tensors)."""

    def __init__(self, module: nn.Module, part: str, graph: type[nn.Module]):
        self.module, self.part, self.graph = module, part, graph
        self.hint = ovb.precision(next(module.parameters()).dtype)
        self.compiled: ovb.Compiled | None = None

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if self.compiled is None:
            meta = {**ovb.base_meta(), "part": f"diffusers-{self.part}", "weights": ovb.fingerprint(self.module),
                    "config": repr(getattr(self.module, "config", None))}
            self.compiled = ovb.Compiled(ovb.converted(meta, lambda: self.graph(_f32(self.module)), inputs),
                                         self.hint)
        return self.compiled(*inputs)


def unet(twin) -> OVTwin:
    return OVTwin(twin, "unet", UNetGraph)


def unet_call(ov: OVTwin, sample, timestep, encoder_hidden_states) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
    return ov(sample.float(), t, encoder_hidden_states.float())[0]


def vae_decode(twin) -> OVTwin:
    return OVTwin(twin, "vae-decode", VAEDecodeGraph)


def vae_encode(twin) -> OVTwin:
    return OVTwin(twin, "vae-encode", VAEEncodeGraph)


def text(twin) -> OVTwin:
    return OVTwin(twin, "text", TextGraph)


def pipeline(pipe, sampler: str = "euler"):
    """A diffusers StableDiffusionPipeline (fastsd.testing.diffusers_pipeline) whose UNet, VAE decoder and
    text encoder forwards run the compiled OpenVINO models; its own twins (they share fastsd's tensors)."""
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from fastsd import testing

    sp = testing.diffusers_pipeline(pipe, sampler=sampler)
    dtype = pipe.dtype
    ov_unet, ov_dec, ov_text = unet(sp.unet), vae_decode(sp.vae), text(sp.text_encoder)

    def unet_forward(sample, timestep, encoder_hidden_states, return_dict=True, **_):
        out = unet_call(ov_unet, sample, timestep, encoder_hidden_states).to(dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def decode(z, return_dict=True, generator=None):
        out = ov_dec(z.float())[0].to(dtype)
        return DecoderOutput(sample=out) if return_dict else (out,)

    def text_forward(input_ids, attention_mask=None, **_):
        return (ov_text(input_ids.long())[0].to(dtype),)

    sp.unet.forward, sp.vae.decode, sp.text_encoder.forward = unet_forward, decode, text_forward
    return sp
