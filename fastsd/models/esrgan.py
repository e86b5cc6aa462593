"""ESRGAN / Real-ESRGAN's RRDBNet, the upscaler model behind most `.pth` upscaler files (4x-UltraSharp,
RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B, RealESRGAN_x2plus, ...).

Names mirror Real-ESRGAN's (basicsr's) keys: `conv_first`, `body.N.rdb{1,2,3}.conv{1..5}`, `conv_body`,
`conv_up1`, `conv_up2`, ..., `conv_hr`, `conv_last`. The original ESRGAN files (`model.0`, `model.1.sub.N.RDB1.
conv1.0`, ...) are renamed to these by rule in fastsd/convert.py.

conv_first, then `blocks` residual-in-residual dense blocks and conv_body added back to their input, then per
upsample a 2x nearest upsample + conv + LeakyReLU(0.2), then conv_hr + LeakyReLU and conv_last. Each dense block
concatenates its input with every conv's output before the next conv (growth channels each); dense blocks and
RRDBs scale their residual by 0.2. Images in [0, 1] at the model's boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsd.config import ESRGANConfig


def conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2, inplace=True)


class DenseBlock(nn.Module):
    """Five convs, each over the block input and all previous outputs: x + 0.2 * conv5(...)."""

    def __init__(self, c: int, growth: int):
        super().__init__()
        for i in range(1, 6):
            setattr(self, f"conv{i}", conv(c + (i - 1) * growth, growth if i < 5 else c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(lrelu(getattr(self, f"conv{i}")(torch.cat(feats, 1))))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, c: int, growth: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (DenseBlock(c, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    def __init__(self, cfg: ESRGANConfig = ESRGANConfig()):
        super().__init__()
        self.cfg = cfg
        c = cfg.features
        self.conv_first = conv(cfg.in_channels * cfg.unshuffle ** 2, c)
        self.body = nn.Sequential(*(RRDB(c, cfg.growth) for _ in range(cfg.blocks)))
        self.conv_body = conv(c, c)
        for i in range(1, cfg.upsamples + 1):
            setattr(self, f"conv_up{i}", conv(c, c))
        self.conv_hr = conv(c, c)
        self.conv_last = conv(c, cfg.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) in [0, 1], H and W multiples of `unshuffle` -> (B, out, H * scale, W * scale)."""
        if self.cfg.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.cfg.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.cfg.upsamples + 1):
            feat = lrelu(getattr(self, f"conv_up{i}")(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(lrelu(self.conv_hr(feat)))
