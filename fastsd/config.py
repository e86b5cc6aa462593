"""Frozen model configs, with the SD1.5 presets and TINY presets for fast tests.

Field names follow the original LDM / OpenAI CLIP configs (v1-inference.yaml), because module
names mirror the LDM checkpoint keys; `from_diffusers_config` functions map diffusers' config.json.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12  # ViT-L/14 text tower: head dim 64
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # pooled output is taken at the first EOS (argmax of ids in SD1 tokenizers)


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder; the decoder has num_res_blocks + 1 per level
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215  # v1-inference.yaml `scale_factor`: latents = z * 0.18215

    @property
    def downscale(self) -> int:  # 8 for SD1.5: pixels per latent along one side
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TAESDConfig:
    """Tiny autoencoder (TAESD / diffusers AutoencoderTiny): conv stages of `channels` channels, each stage
    a stride-2 conv (encoder) or 2x nearest upsample + conv (decoder) around `*_blocks[i]` residual Blocks."""

    channels: int = 64
    latent_channels: int = 4
    image_channels: int = 3
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # diffusers' num_encoder_blocks
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # diffusers' num_decoder_blocks
    # diffusers' scaling_factor: TAESD works on the UNet's latents as they are (1.0 for SD1.x's taesd)
    scale_factor: float = 1.0

    @property
    def downscale(self) -> int:  # pixels per latent along one side (8 for SD's TAESD)
        return 2 ** (len(self.decoder_blocks) - 1)


@dataclass(frozen=True)
class ESRGANConfig:
    """ESRGAN / Real-ESRGAN's RRDBNet (upscaler models): `blocks` RRDBs of three dense blocks (`growth` channels
    per dense conv) at `features` channels, then `upsamples` 2x nearest + conv stages. Real-ESRGAN's x2 / x1
    models first fold each 2x2 / 4x4 pixel block into channels (`unshuffle`), so scale = 2 ** upsamples / unshuffle."""

    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    blocks: int = 23
    growth: int = 32
    upsamples: int = 2
    unshuffle: int = 1

    @property
    def scale(self) -> int:
        return 2 ** self.upsamples // self.unshuffle


@dataclass(frozen=True)
class CompactConfig:
    """Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3): `convs` 3x3 convs with PReLU
    at `features` channels after the first, a last conv to out_channels * scale**2 channels, pixel shuffle, plus
    the input upsampled (nearest)."""

    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    convs: int = 32
    scale: int = 4


@dataclass(frozen=True)
class SwinIRConfig:
    """SwinIR (upscaler and restoration models): conv_first to `embed_dim` channels, residual Swin transformer
    groups (`depths[i]` blocks of `num_heads[i]` heads in window_size x window_size windows, MLP hidden width
    embed_dim * mlp_ratio; each group ends in a conv, `resi_connection` "1conv" or "3conv"), then the `upsampler`:
    "pixelshuffle" (classical SR), "pixelshuffledirect" (lightweight SR), "nearest+conv" (real-world SR) or ""
    (x1: denoising, JPEG artifacts). `img_size` is the training size, used only by an absolute position
    embedding (`ape`). The defaults are A1111's "SwinIR 4x" (SwinIR-L real-world x4)."""

    in_channels: int = 3
    out_channels: int = 3
    embed_dim: int = 240
    depths: tuple[int, ...] = (6,) * 9
    num_heads: tuple[int, ...] = (8,) * 9
    window_size: int = 8
    mlp_ratio: float = 2.0
    upsampler: str = "nearest+conv"
    scale: int = 4
    num_feat: int = 64  # the upsampler's channels (pixelshuffle, nearest+conv)
    resi_connection: str = "3conv"
    patch_norm: bool = True
    ape: bool = False
    img_size: int = 64
    img_range: float = 1.0  # 255 for the JPEG artifact models (window 7), as the official code builds them

    def __post_init__(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError("SwinIR needs one num_heads entry per depths entry")
        if self.upsampler not in ("pixelshuffle", "pixelshuffledirect", "nearest+conv", ""):
            raise ValueError(f"unknown SwinIR upsampler {self.upsampler!r}")
        if self.resi_connection not in ("1conv", "3conv"):
            raise ValueError(f"unknown SwinIR resi_connection {self.resi_connection!r}")

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def max_input(self) -> int | None:
        """The largest input side (img_size) for a model with an absolute position embedding, else None."""
        return self.img_size if self.ape else None


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting checkpoints: [x, mask, masked-image latents]
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # levels with a SpatialTransformer
    num_heads: int = 8  # SD1.x: 8 heads at every level (head dims 40, 80, 160)
    context_dim: int = 768
    norm_groups: int = 32
    time_cond_proj_dim: int | None = None  # LCM-distilled UNets: the size of the guidance-scale embedding added to
    # the timestep's (diffusers' time_cond_proj_dim; 256 in LCM_Dreamshaper_v7)

    def __post_init__(self):
        if len(self.attention_levels) != len(self.channel_mult):
            raise ValueError("attention_levels needs one entry per channel_mult level")


@dataclass(frozen=True)
class SchedulerConfig:
    """The SD1.x training noise schedule (v1-inference.yaml; diffusers' scheduler_config.json)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # betas = linspace(sqrt(start), sqrt(end), T) ** 2
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class SDConfig:
    clip: CLIPConfig = CLIPConfig()
    vae: VAEConfig | TAESDConfig = VAEConfig()  # TAESDConfig when a TAESD replaced the VAE (Pipeline.set_vae)
    unet: UNetConfig = UNetConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    clip_skip: int = 1  # A1111 convention: 1 = last layer, 2 = penultimate (diffusers' clip_skip + 1)


SD15 = SDConfig()
SD15_INPAINT = SDConfig(unet=UNetConfig(in_channels=9))

# Small but with the real topology (several levels, attention and plain levels, multi-head attention),
# following the SD1 conventions that the LDM loader infers configs by (CLIP head dim 64, 8 UNet heads).
TINY = SDConfig(
    clip=CLIPConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),  # 8x, as SD: 512 px = 64x64 latents
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, False), context_dim=128),
)
TINY_INPAINT = SDConfig(clip=TINY.clip, vae=TINY.vae, unet=UNetConfig(**{**TINY.unet.__dict__, "in_channels": 9}))

PRESETS = {"sd15": SD15, "sd15-inpainting": SD15_INPAINT, "tiny": TINY, "tiny-inpainting": TINY_INPAINT}
