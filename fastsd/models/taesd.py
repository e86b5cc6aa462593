"""TAESD, the tiny autoencoder for SD's latents (madebyollin/taesd; diffusers' AutoencoderTiny).

Names mirror the original files: `taesd_encoder.pth` is an nn.Sequential whose keys are its indices
(`0.weight`, `1.conv.0.weight`, ...), `taesd_decoder.pth` likewise with a parameter-free Clamp at index 0
(its first conv is `1.weight`); here they sit under `encoder.` and `decoder.`. diffusers' layout
(`encoder.layers.N`, `decoder.layers.N - 1`) is renamed to these by rule in fastsd/convert.py.

SD1.5's TAESD (the default config): encoder conv, Block, then three times (stride-2 conv, 3 Blocks), conv to
4 latent channels; decoder Clamp, conv, ReLU, then three times (3 Blocks, 2x upsample, conv), Block, conv
to RGB; 64 channels throughout. The latents are the UNet's own (no scaling factor); images are in [-1, 1]
at the model's boundary (the network itself works in [0, 1]).
"""
from __future__ import annotations

import torch
from torch import nn

from fastsd.config import TAESDConfig


NO_ENCODER = ("this TAESD has no encoder (only a decoder file was found): image-to-image and inpainting need "
              "taesd_encoder beside the decoder")


def conv(cin: int, cout: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3), the decoder's index 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block: relu(conv(relu(conv(relu(conv(x))))) + skip(x)). Keys: conv.{0,2,4}, skip (only when
    the width changes)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(conv(cin, cout), nn.ReLU(inplace=True), conv(cout, cout), nn.ReLU(inplace=True),
                                  conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def encoder(cfg: TAESDConfig) -> nn.Sequential:
    c = cfg.channels
    layers: list[nn.Module] = []
    for i, n in enumerate(cfg.encoder_blocks):
        layers.append(conv(cfg.image_channels, c) if i == 0 else conv(c, c, stride=2, bias=False))
        layers += [Block(c, c) for _ in range(n)]
    layers.append(conv(c, cfg.latent_channels))
    return nn.Sequential(*layers)


def decoder(cfg: TAESDConfig) -> nn.Sequential:
    c = cfg.channels
    layers: list[nn.Module] = [Clamp(), conv(cfg.latent_channels, c), nn.ReLU(inplace=True)]
    last = len(cfg.decoder_blocks) - 1
    for i, n in enumerate(cfg.decoder_blocks):
        layers += [Block(c, c) for _ in range(n)]
        if i != last:
            layers += [nn.Upsample(scale_factor=2), conv(c, c, bias=False)]
    layers.append(conv(c, cfg.image_channels))
    return nn.Sequential(*layers)


class TAESD(nn.Module):
    """A decoder, and an encoder unless with_encoder=False (a decoder-only TAESD is common: previews and
    txt2img need no encoder)."""

    def __init__(self, cfg: TAESDConfig = TAESDConfig(), *, with_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder(cfg) if with_encoder else None
        self.decoder = decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def downscale(self) -> int:
        return self.cfg.downscale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) (the UNet's scale when scale_factor is 1)."""
        if self.encoder is None:
            raise ValueError(NO_ENCODER)
        return self.encoder(x.to(self.dtype).add(1).div(2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        return self.decoder(z.to(self.dtype)).mul(2).sub(1)
