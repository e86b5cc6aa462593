"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer"): A1111's built-in "SwinIR 4x"
(SwinIR_4x.pth = the official 003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth), the classical SR models
(001_classicalSR_*), the lightweight ones (002_lightweightSR_*), the real-world ones (003_realSR_*) and the x1
restoration ones (denoising, JPEG artifacts).

Names mirror the official files' keys: `conv_first`, `patch_embed.norm`, `absolute_pos_embed`,
`layers.{i}.residual_group.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table, norm2,
mlp.fc1, mlp.fc2}`, `layers.{i}.conv`, `norm`, `conv_after_body`, and the upsampler's `conv_before_upsample.0`,
`upsample.N`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`.

The image (mean-subtracted, times img_range) goes through conv_first; its pixels become tokens (LayerNorm'd when
patch_norm) that pass residual Swin transformer groups: blocks of self-attention inside window x window windows
(the windows shifted by half a window on every second block, a cyclic shift whose wrapped-around parts are masked
off from each other) with a learned bias per relative position and head, and a GELU MLP, each pre-LayerNorm and
residual; each group ends in a conv over its tokens as an image, plus the group's input. A LayerNorm and
conv_after_body, plus conv_first's output, feed the upsampler. The input is padded (reflected) to a multiple of
the window and the output cropped back, so any size runs. The shift mask and relative position index depend only
on the (padded) size and the window: computed here for each input, never read from a file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsd.config import SwinIRConfig

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # subtracted from 3-channel images and added back (the official models' DIV2K mean)
MASKED = -100.0  # the official shift mask's value between tokens from different parts of a shifted window


def conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing a group and the body: "1conv" one 3x3; "3conv" 3x3 to dim // 4, 1x1, 3x3 back (LeakyReLU
    0.2 between), as the big (SwinIR-L) models save parameters."""
    if kind == "1conv":
        return conv(dim, dim)
    q = dim // 4
    return nn.Sequential(conv(dim, q), nn.LeakyReLU(0.2), conv(q, q, 1), nn.LeakyReLU(0.2), conv(q, dim))


def tokens(img: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) (no copy for a channels_last image)."""
    return img.flatten(2).transpose(1, 2).contiguous()


def image(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) (channels_last, no copy)."""
    return t.transpose(1, 2).unflatten(2, size)


def relative_index(w: int, device=None) -> torch.Tensor:
    """(N*N,) for N = w*w tokens of a window: row of the bias table for each (query, key) pair, by their offset
    (dy, dx), both in [-(w-1), w-1]: (dy + w - 1) * (2w - 1) + dx + w - 1."""
    yx = torch.stack(torch.meshgrid(torch.arange(w, device=device), torch.arange(w, device=device), indexing="ij"))
    d = yx.flatten(1)[:, :, None] - yx.flatten(1)[:, None, :] + (w - 1)  # (2, N, N)
    return (d[0] * (2 * w - 1) + d[1]).flatten()


def windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, windows, w*w, C), windows in row order."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).transpose(2, 3).reshape(b, -1, w * w, c)


def unwindows(x: torch.Tensor, size: tuple[int, int], w: int) -> torch.Tensor:
    """windows() inverted: (B, windows, w*w, C) -> (B, H, W, C)."""
    b, _, _, c = x.shape
    h, wd = size
    return x.view(b, h // w, wd // w, w, w, c).transpose(2, 3).reshape(b, h, wd, c)


def shift_mask(size: tuple[int, int], w: int, shift: int, device=None) -> torch.Tensor:
    """(windows, N, N) for the shifted windows of an H x W image: 0 between tokens that were neighbours before the
    cyclic shift, MASKED between tokens of different parts (along each axis: the part that didn't move, the part
    moved from the start to the end, and the half window between them)."""
    def part(n: int) -> torch.Tensor:
        p = torch.zeros(n, dtype=torch.long, device=device)
        p[n - w:] = 1
        p[n - shift:] = 2
        return p

    region = part(size[0])[:, None] * 3 + part(size[1])[None, :]
    region = windows(region[None, :, :, None], w)[0, :, :, 0]  # (windows, N)
    same = region[:, :, None] == region[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, MASKED)


def pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`x` padded at the bottom and right to h x w by reflection (again while the pad is larger than the image;
    an image side of one pixel is repeated)."""
    while x.shape[2] < h or x.shape[3] < w:
        ih, iw = x.shape[2:]
        ph, pw = min(h - ih, ih - 1), min(w - iw, iw - 1)
        if (ih < h and ph == 0) or (iw < w and pw == 0):
            return F.pad(x, (0, w - iw, 0, h - ih), mode="replicate")
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))

    def forward(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, windows, N, C); index (N*N,) from relative_index; mask (windows, N, N) or None."""
        b, nw, n, c = x.shape
        q, k, v = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias = self.relative_position_bias_table[index].view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            bias = bias + mask.to(bias.dtype)[:, None]  # (windows, heads, N, N)
        attn = torch.matmul(q * (c // self.heads) ** -0.5, k.transpose(-1, -2)).add_(bias).softmax(-1)
        out = torch.matmul(attn, v)  # (B, windows, heads, N, C // heads)
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-LayerNorm window attention (windows shifted by `shift` when non-zero) and MLP, each residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor, size: tuple[int, int], index: torch.Tensor, mask: torch.Tensor | None):
        b, n, c = x.shape
        h = self.norm1(x).view(b, *size, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        h = unwindows(self.attn(windows(h, self.window), index, mask if self.shift else None), size, self.window)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), (1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, cfg: SwinIRConfig, depth: int, heads: int):
        super().__init__()
        w = cfg.window_size
        self.blocks = nn.ModuleList(SwinBlock(cfg.embed_dim, heads, w, w // 2 if j % 2 else 0, cfg.mlp_hidden)
                                    for j in range(depth))

    def forward(self, x, size, index, mask):
        for block in self.blocks:
            x = block(x, size, index, mask)
        return x


class RSTB(nn.Module):
    """Residual Swin transformer block: the group's blocks, a conv over their tokens as an image, plus the input."""

    def __init__(self, cfg: SwinIRConfig, depth: int, heads: int):
        super().__init__()
        self.residual_group = ResidualGroup(cfg, depth, heads)
        self.conv = residual_conv(cfg.embed_dim, cfg.resi_connection)

    def forward(self, x, size, index, mask):
        return x + tokens(self.conv(image(self.residual_group(x, size, index, mask), size)))


class PatchEmbed(nn.Module):
    """Pixels as tokens (patch size 1): only the optional LayerNorm holds weights (`patch_embed.norm`)."""

    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()


class SwinIR(nn.Module):
    def __init__(self, cfg: SwinIRConfig = SwinIRConfig()):
        super().__init__()
        self.cfg = cfg
        c, f = cfg.embed_dim, cfg.num_feat
        self.conv_first = conv(cfg.in_channels, c)
        self.patch_embed = PatchEmbed(c, cfg.patch_norm)
        if cfg.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, cfg.img_size ** 2, c))
        self.layers = nn.ModuleList(RSTB(cfg, d, h) for d, h in zip(cfg.depths, cfg.num_heads))
        self.norm = nn.LayerNorm(c)
        self.conv_after_body = residual_conv(c, cfg.resi_connection)
        s = cfg.scale
        if cfg.upsampler == "pixelshuffle":  # per factor 2 (or one factor 3): conv to 4x (9x) channels, shuffle
            self.conv_before_upsample = nn.Sequential(conv(c, f), nn.LeakyReLU())  # (slope 0.01, as the official)
            factors = [3] if s == 3 else [2] * (s.bit_length() - 1)
            self.upsample = nn.Sequential(*(m for k in factors for m in (conv(f, k * k * f), nn.PixelShuffle(k))))
            self.conv_last = conv(f, cfg.out_channels)
        elif cfg.upsampler == "pixelshuffledirect":  # one conv to out * s * s channels, shuffled
            self.upsample = nn.Sequential(conv(c, cfg.out_channels * s * s), nn.PixelShuffle(s))
        elif cfg.upsampler == "nearest+conv":  # per factor 2: nearest x2, conv, LeakyReLU 0.2
            self.conv_before_upsample = nn.Sequential(conv(c, f), nn.LeakyReLU())
            for i in range(1, s.bit_length()):
                setattr(self, f"conv_up{i}", conv(f, f))
            self.conv_hr = conv(f, f)
            self.conv_last = conv(f, cfg.out_channels)
        else:  # x1 (denoising, JPEG artifacts): the input plus a conv of the features
            self.conv_last = conv(c, cfg.out_channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        w = self.cfg.window_size
        index = relative_index(w, x.device)
        mask = shift_mask(size, w, w // 2, x.device) if max(self.cfg.depths) > 1 else None
        t = self.patch_embed.norm(tokens(x))
        if self.cfg.ape:
            t = t + self.absolute_pos_embed
        for layer in self.layers:
            t = layer(t, size, index, mask)
        return image(self.norm(t), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) in [0, 1], any size -> (B, out, H * scale, W * scale)."""
        cfg = self.cfg
        h, w = x.shape[2:]
        ws = cfg.window_size
        ph, pw = h + -h % ws, w + -w % ws
        if cfg.ape:  # the embedding has one entry per pixel of img_size x img_size
            if max(h, w) > cfg.img_size:
                raise ValueError(f"this SwinIR model (absolute position embedding) takes images up to "
                                 f"{cfg.img_size}x{cfg.img_size}, not {w}x{h}")
            ph = pw = cfg.img_size
        x = pad_to(x, ph, pw)
        mean = x.new_tensor(RGB_MEAN if cfg.in_channels == 3 else (0.0,)).view(1, -1, 1, 1)
        x = (x - mean) * cfg.img_range
        feat = self.conv_first(x)
        body = self.conv_after_body(self.features(feat)) + feat
        if cfg.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(body)))
        elif cfg.upsampler == "pixelshuffledirect":
            out = self.upsample(body)
        elif cfg.upsampler == "nearest+conv":
            y = self.conv_before_upsample(body)
            for i in range(1, cfg.scale.bit_length()):
                y = lrelu(getattr(self, f"conv_up{i}")(F.interpolate(y, scale_factor=2, mode="nearest")))
            out = self.conv_last(lrelu(self.conv_hr(y)))
        else:
            out = x + self.conv_last(body)
        out = out / cfg.img_range + mean
        return out[:, :, :h * cfg.scale, :w * cfg.scale]
