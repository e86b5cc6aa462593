"""SD1.5 launch shapes, derived from `fastsd.config.SD15` (one source for report.py, traffic.py and
benchmarks/kernel_cases.py).

Every call the UNet, its sampler step and the VAE decoder make to an op a kernel stands in for, at any
image size and batch, with how often it is made per UNet call / per decode:

- `unet_attention_calls(res, batch)`: self- and cross-attention of every SpatialTransformer
  (B = 2 * batch with classifier-free guidance, Lq = tokens of the level, Lk = Lq or 77, D = C / heads);
- `unet_group_norm_calls(res, batch)` and `vae_decoder_group_norm_calls(res, batch)`: ResBlock norms
  (+SiLU), SpatialTransformer / attention-block norms, the final norms;
- `latent_shape(res, batch)`: the sampler step's latents.

`res` is the image size in px (an int, or (height, width)); latents are res / 8 (VAEConfig.downscale).
The VAE's attention block is one 512-wide head: outside the attention kernel's contract (D <= 256), so it
is not listed as a kernel launch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fastsd.config import SD15, SDConfig

TEXT_TOKENS = 77  # CLIP context per prompt chunk (cross-attention keys)


@dataclass(frozen=True)
class AttentionCall:
    where: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    count: int = 1  # calls per UNet call

    @property
    def label(self) -> str:
        return f"{self.where} B{self.B} H{self.H} Lq{self.Lq} Lk{self.Lk} D{self.D}"


@dataclass(frozen=True)
class GroupNormCall:
    where: str
    N: int
    C: int
    H: int
    W: int
    eps: float
    silu: bool
    groups: int = 32
    count: int = 1  # calls per UNet call / per VAE decode

    @property
    def label(self) -> str:
        return (f"{self.where} N{self.N} C{self.C} {self.H}x{self.W} G{self.groups} eps{self.eps:g}"
                + (" silu" if self.silu else ""))


def _hw(res) -> tuple[int, int]:
    return (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))


def latent_hw(res, config: SDConfig = SD15) -> tuple[int, int]:
    h, w = _hw(res)
    f = config.vae.downscale
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not a multiple of {f}")
    return h // f, w // f


def latent_shape(res, batch: int = 1, config: SDConfig = SD15) -> tuple[int, int, int, int]:
    return (batch, config.unet.in_channels, *latent_hw(res, config))


def _tally(calls):
    """Merge identical calls, counting them, in first-seen order."""
    counts = Counter(calls)
    return [type(c)(**{**c.__dict__, "count": n}) for c, n in counts.items()]


def _unet_blocks(res, config: SDConfig):
    """Walk the UNet as fastsd.models.unet.UNet builds it: yields ("res", cin, cout, h, w), ("attn", c, h, w)
    and ("out", c, h, w) in call order."""
    u = config.unet
    h, w = latent_hw(res, config)
    mc, n_levels = u.model_channels, len(u.channel_mult)
    ch, skips = mc, [mc]
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            yield "res", ch, mult * mc, h, w
            ch = mult * mc
            if u.attention_levels[level]:
                yield "attn", ch, h, w, f"L{level}"
            skips.append(ch)
        if level != n_levels - 1:
            h, w = -(-h // 2), -(-w // 2)  # stride-2 3x3 conv, padding 1
            skips.append(ch)
    yield "res", ch, ch, h, w
    yield "attn", ch, h, w, "mid"
    yield "res", ch, ch, h, w
    for level in reversed(range(n_levels)):
        mult = u.channel_mult[level]
        for i in range(u.num_res_blocks + 1):
            yield "res", ch + skips.pop(), mult * mc, h, w
            ch = mult * mc
            if u.attention_levels[level]:
                yield "attn", ch, h, w, f"L{level}"
            if level != 0 and i == u.num_res_blocks:
                h, w = 2 * h, 2 * w
    yield "out", ch, h, w


def unet_attention_calls(res, batch: int = 1, cfg: bool = True, config: SDConfig = SD15) -> list[AttentionCall]:
    """Attention launches of one UNet call (batch images, doubled by CFG)."""
    B = batch * (2 if cfg else 1)
    heads = config.unet.num_heads
    calls = []
    for blk in _unet_blocks(res, config):
        if blk[0] != "attn":
            continue
        _, c, h, w, lvl = blk
        where = f"{lvl} {h}x{w}"
        calls.append(AttentionCall(f"self {where}", B, heads, h * w, h * w, c // heads))
        calls.append(AttentionCall(f"cross {where}", B, heads, h * w, TEXT_TOKENS, c // heads))
    return _tally(calls)


def unet_group_norm_calls(res, batch: int = 1, cfg: bool = True, config: SDConfig = SD15) -> list[GroupNormCall]:
    """GroupNorm launches of one UNet call: ResBlock in/out norms (eps 1e-5, SiLU; the decoder's in-norm sees
    the concatenated skip), SpatialTransformer norms (eps 1e-6), the final norm (SiLU)."""
    N = batch * (2 if cfg else 1)
    G = config.unet.norm_groups
    calls = []
    for blk in _unet_blocks(res, config):
        if blk[0] == "res":
            _, cin, cout, h, w = blk
            calls.append(GroupNormCall("unet resblock", N, cin, h, w, 1e-5, True, G))
            calls.append(GroupNormCall("unet resblock", N, cout, h, w, 1e-5, True, G))
        elif blk[0] == "attn":
            _, c, h, w, _lvl = blk
            calls.append(GroupNormCall("unet transformer", N, c, h, w, 1e-6, False, G))
        else:
            _, c, h, w = blk
            calls.append(GroupNormCall("unet out", N, c, h, w, 1e-5, True, G))
    return _tally(calls)


def vae_decoder_group_norm_calls(res, batch: int = 1, config: SDConfig = SD15) -> list[GroupNormCall]:
    """GroupNorm launches of one VAE decode (fastsd.models.vae.Decoder), all eps 1e-6: ResnetBlock norms with
    SiLU, the attention block's norm without, the final norm with SiLU."""
    v = config.vae
    G = v.norm_groups
    h, w = latent_hw(res, config)
    chans = [v.ch * m for m in v.ch_mult]
    cin = chans[-1]
    calls = []

    def resnet(ci, co):
        calls.append(GroupNormCall("vae resblock", batch, ci, h, w, 1e-6, True, G))
        calls.append(GroupNormCall("vae resblock", batch, co, h, w, 1e-6, True, G))

    resnet(cin, cin)
    calls.append(GroupNormCall("vae attn norm", batch, cin, h, w, 1e-6, False, G))
    resnet(cin, cin)
    for level in reversed(range(len(chans))):
        for _ in range(v.num_res_blocks + 1):
            resnet(cin, chans[level])
            cin = chans[level]
        if level != 0:
            h, w = 2 * h, 2 * w
    calls.append(GroupNormCall("vae out", batch, cin, h, w, 1e-6, True, G))
    return _tally(calls)
