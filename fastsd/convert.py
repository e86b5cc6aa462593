"""Key rename rules diffusers -> LDM (fastsd's module names are the LDM names), and model configs read
from a diffusers config.json or inferred from LDM tensor shapes."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from fastsd.config import CLIPConfig, CompactConfig, ESRGANConfig, SwinIRConfig, TAESDConfig, UNetConfig, VAEConfig
from fastsd.tensorfile import CheckpointError, TensorRef

Rule = tuple[str, "str | Callable[[re.Match], str]"]

# Inside a resnet, diffusers name -> LDM name (UNet ResBlock, VAE ResnetBlock).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# VAE mid-block attention; query/key/value/proj_attn are the names of diffusers < 0.14 folders.
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def rename_key(key: str, rules: list[Rule]) -> str:
    """`key` renamed by the first rule whose pattern matches it (unchanged when none does)."""
    for pattern, repl in rules:
        key, n = re.subn(pattern, repl, key, count=1)
        if n:
            return key
    return key


LCM_COND_PROJ = "time_embedding.cond_proj.weight"  # an LCM-distilled UNet's guidance projection, in both formats


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    per = cfg.num_res_blocks + 1  # input blocks per level (resnets + downsample); output blocks per level
    n = len(cfg.channel_mult)

    def res(rest: str) -> str:
        name, _, tail = rest.partition(".")
        return f"{UNET_RESNET.get(name, name)}.{tail}"

    def up_slot(i: int) -> int:  # the upsampler follows the resnet, and the attention if the level has one
        return 2 if cfg.attention_levels[n - 1 - i] else 1

    return [
        (r"^time_embedding\.linear_1\.", "time_embed.0."),
        (r"^time_embedding\.linear_2\.", "time_embed.2."),
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^conv_norm_out\.", "out.0."),
        (r"^conv_out\.", "out.2."),
        (r"^down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.*)",
         lambda m: f"input_blocks.{1 + int(m['i']) * per + int(m['j'])}.0.{res(m['rest'])}"),
        (r"^down_blocks\.(?P<i>\d+)\.attentions\.(?P<j>\d+)\.",
         lambda m: f"input_blocks.{1 + int(m['i']) * per + int(m['j'])}.1."),
        (r"^down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(int(m['i']) + 1) * per}.0.op."),
        (r"^mid_block\.resnets\.(?P<j>\d+)\.(?P<rest>.*)", lambda m: f"middle_block.{2 * int(m['j'])}.{res(m['rest'])}"),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
        (r"^up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.*)",
         lambda m: f"output_blocks.{int(m['i']) * per + int(m['j'])}.0.{res(m['rest'])}"),
        (r"^up_blocks\.(?P<i>\d+)\.attentions\.(?P<j>\d+)\.",
         lambda m: f"output_blocks.{int(m['i']) * per + int(m['j'])}.1."),
        (r"^up_blocks\.(?P<i>\d+)\.upsamplers\.0\.", lambda m: f"output_blocks.{int(m['i']) * per + per - 1}."
                                                             f"{up_slot(int(m['i']))}."),
    ]


# kohya LoRA files write diffusers module paths with "_" for "." (lora_unet_down_blocks_1_attentions_0_proj_in):
# these put back the dots of the block structure, so that unet_rules apply to them.
UNDERSCORED_UNET_BLOCKS: list[Rule] = [
    (r"^(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_", r"\1.\2.\3.\4."),
    (r"^mid_block_(attentions|resnets)_(\d+)_", r"mid_block.\1.\2."),
    (r"^time_embedding_linear_(\d+)$", r"time_embedding.linear_\1"),
]


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    n = len(cfg.ch_mult)

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut.", "nin_shortcut.", 1)

    def attn(m: re.Match) -> str:
        name, leaf = m["rest"].rsplit(".", 1)
        return f"{m['part']}.mid.attn_1.{VAE_ATTN.get(name, name)}.{leaf}"

    return [
        (r"^(?P<part>encoder|decoder)\.conv_norm_out\.", r"\g<part>.norm_out."),
        (r"^encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.*)",
         lambda m: f"encoder.down.{m['i']}.block.{m['j']}.{resnet(m['rest'])}"),
        (r"^encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.", r"encoder.down.\g<i>.downsample."),
        (r"^decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.*)",
         lambda m: f"decoder.up.{n - 1 - int(m['i'])}.block.{m['j']}.{resnet(m['rest'])}"),
        (r"^decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m['i'])}.upsample."),
        (r"^(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<j>\d+)\.(?P<rest>.*)",
         lambda m: f"{m['part']}.mid.block_{int(m['j']) + 1}.{resnet(m['rest'])}"),
        (r"^(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<rest>.*)", attn),
    ]


# TAESD: diffusers' AutoencoderTiny names -> the original files' nn.Sequential indices (fastsd's names). The
# original decoder has a parameter-free Clamp at index 0, which diffusers folds into forward().
TAESD_RULES: list[Rule] = [
    (r"^encoder\.layers\.(?P<i>\d+)\.", r"encoder.\g<i>."),
    (r"^decoder\.layers\.(?P<i>\d+)\.", lambda m: f"decoder.{int(m['i']) + 1}."),
]


def rename(refs: dict[str, TensorRef], rules: list[Rule]) -> dict[str, TensorRef]:
    return {rename_key(k, rules): v for k, v in refs.items()}


def clip_keys(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """CLIP keys as `text_model.*`: the original SD1.x files (transformers < 4.22) and transformers >= 5
    saves have no `text_model.` level; position_ids is a buffer some files carry and fastsd recomputes."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in refs.items()
            if not k.endswith("position_ids")}


def vae_attention_as_conv(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """diffusers stores the VAE attention projections as Linear (C, C); LDM as 1x1 conv (C, C, 1, 1)."""
    out = {}
    for k, ref in refs.items():
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) and len(ref.shape) == 2:
            ref = ref.map(lambda t: t.reshape(*t.shape, 1, 1), (*ref.shape, 1, 1))
        out[k] = ref
    return out


# ---- configs from diffusers config.json --------------------------------------------------------------

def _require(cond: bool, what: str) -> None:
    if not cond:
        raise CheckpointError(f"not an SD1.x model: {what}")


def check_unet_family(c: dict) -> None:
    """CheckpointError("not an SD1.x model: ...") for a UNet config.json of another family (SD2.x, SDXL, ...);
    run before its values are checked (checkpoint.check_unet_config), so that the family is what is named."""
    _require(c.get("use_linear_projection") is not True, "its UNet uses linear projections (SD2.x style)")
    _require(c.get("addition_embed_type") is None and c.get("class_embed_type") is None,
             "its UNet has extra conditioning embeddings (SDXL or another family)")
    heads = c.get("attention_head_dim", 8)  # diffusers' legacy name: in SD1.x configs this is the head count
    _require(not isinstance(heads, list) or all(h == heads[0] for h in heads),
             f"its UNet has per-level heads {heads} (SD2.x style)")
    _require(c.get("transformer_layers_per_block", 1) in (1, None), "its UNet stacks several transformer layers")


def unet_config_from_diffusers(c: dict) -> UNetConfig:
    check_unet_family(c)
    _require(not c.get("use_linear_projection", False), "its UNet uses linear projections (SD2.x style)")
    heads = c.get("attention_head_dim", 8)
    _require(isinstance(heads, int) or len(set(heads)) == 1, f"its UNet has per-level heads {heads} (SD2.x style)")
    blocks = c["block_out_channels"]
    mc = blocks[0]
    _require(all(b % mc == 0 for b in blocks), f"block_out_channels {blocks} are not multiples of the first")
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(b // mc for b in blocks), num_res_blocks=c.get("layers_per_block", 2),
        attention_levels=tuple(t.startswith("CrossAttn") for t in c["down_block_types"]),
        num_heads=heads if isinstance(heads, int) else heads[0], context_dim=c.get("cross_attention_dim", 768),
        norm_groups=c.get("norm_num_groups", 32), time_cond_proj_dim=c.get("time_cond_proj_dim"))


def vae_config_from_diffusers(c: dict) -> VAEConfig:
    blocks = c["block_out_channels"]
    return VAEConfig(ch=blocks[0], ch_mult=tuple(b // blocks[0] for b in blocks),
                     num_res_blocks=c.get("layers_per_block", 2), in_channels=c.get("in_channels", 3),
                     out_ch=c.get("out_channels", 3), z_channels=c.get("latent_channels", 4),
                     embed_dim=c.get("latent_channels", 4), norm_groups=c.get("norm_num_groups", 32),
                     scale_factor=c.get("scaling_factor", 0.18215))


def clip_config_from_transformers(c: dict) -> CLIPConfig:
    c = c.get("text_config", c)
    _require(c.get("hidden_act", "quick_gelu") == "quick_gelu", f"its text encoder uses {c.get('hidden_act')} "
             "(SD1.x's CLIP uses quick_gelu)")
    eos = c.get("eos_token_id", 49407)
    return CLIPConfig(vocab_size=c.get("vocab_size", 49408), hidden_size=c["hidden_size"],
                      intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], max_positions=c.get("max_position_embeddings", 77),
                      layer_norm_eps=c.get("layer_norm_eps", 1e-5), eos_token_id=eos)


# ---- configs inferred from LDM tensor shapes (SD1.x conventions: 8 UNet heads, CLIP head dim 64) -----

def _count(refs: dict[str, TensorRef], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in refs if (m := rx.match(k))})


def _weight_shape(refs: dict[str, TensorRef], key: str, rank: int) -> tuple[int, ...]:
    """The shape of tensor `key` (KeyError when there is none), a config is read from: CheckpointError (without the
    file's name: the caller's message has it) unless it has `rank` dims, none of them 0."""
    shape = tuple(refs[key].shape)
    if len(shape) != rank or 0 in shape:
        raise CheckpointError(f"tensor {key} has shape {shape}, not a {rank}-d layer weight")
    return shape


def unet_config_from_ldm(refs: dict[str, TensorRef]) -> UNetConfig:
    mc, cin = _weight_shape(refs, "input_blocks.0.0.weight", 4)[:2]
    out_ch = _weight_shape(refs, "out.2.weight", 4)[0]
    n_in = _count(refs, r"input_blocks\.(\d+)\.")
    n_levels = _count(refs, r"input_blocks\.(\d+)\.0\.op\.") + 1
    per = (n_in - 1 + 1) // n_levels  # resnets + downsample per level (the last level has no downsample)
    nres = per - 1
    mults, attn = [], []
    for level in range(n_levels):
        first = 1 + level * per
        mults.append(_weight_shape(refs, f"input_blocks.{first}.0.out_layers.3.weight", 4)[0] // mc)
        attn.append(f"input_blocks.{first}.1.proj_in.weight" in refs)
    ctx = _weight_shape(refs, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2)[1]
    cond_proj = refs.get(LCM_COND_PROJ)  # (an LCM-distilled UNet: diffusers' key, which its LDM converter keeps)
    return UNetConfig(in_channels=cin, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mults),
                      num_res_blocks=nres, attention_levels=tuple(attn), context_dim=ctx,
                      time_cond_proj_dim=None if cond_proj is None else _weight_shape(refs, LCM_COND_PROJ, 2)[1])


def vae_config_from_ldm(refs: dict[str, TensorRef]) -> VAEConfig:
    ch, cin = _weight_shape(refs, "encoder.conv_in.weight", 4)[:2]
    n_levels = max(1, _count(refs, r"encoder\.down\.(\d+)\."))  # (none: the KeyError of level 0's)
    nres = _count(refs, r"encoder\.down\.0\.block\.(\d+)\.")
    mults = tuple(_weight_shape(refs, f"encoder.down.{i}.block.0.conv2.weight", 4)[0] // ch for i in range(n_levels))
    z, embed = _weight_shape(refs, "post_quant_conv.weight", 4)[:2]
    return VAEConfig(ch=ch, ch_mult=mults, num_res_blocks=nres, in_channels=cin,
                     out_ch=_weight_shape(refs, "decoder.conv_out.weight", 4)[0], z_channels=z, embed_dim=embed)


def clip_config_from_ldm(refs: dict[str, TensorRef]) -> CLIPConfig:
    vocab, hidden = _weight_shape(refs, "text_model.embeddings.token_embedding.weight", 2)
    return CLIPConfig(vocab_size=vocab, hidden_size=hidden,
                      intermediate_size=_weight_shape(refs, "text_model.encoder.layers.0.mlp.fc1.weight", 2)[0],
                      num_layers=_count(refs, r"text_model\.encoder\.layers\.(\d+)\."), num_heads=max(1, hidden // 64),
                      max_positions=_weight_shape(refs, "text_model.embeddings.position_embedding.weight", 2)[0])


def _taesd_stages(refs: dict[str, TensorRef], part: str) -> tuple[list[int], list[int]]:
    """(indices of the plain convs, Blocks between each two of them) of TAESD's `part` Sequential."""
    convs = sorted({int(m[1]) for k in refs if (m := re.fullmatch(rf"{part}\.(\d+)\.weight", k))})
    blocks = [int(m[1]) for k in refs if (m := re.fullmatch(rf"{part}\.(\d+)\.conv\.0\.weight", k))]
    return convs, [sum(a < b < c for b in blocks) for a, c in zip(convs, convs[1:])]


def taesd_config_from_keys(refs: dict[str, TensorRef], scale_factor: float = 1.0) -> TAESDConfig:
    """The TAESD architecture of fastsd-named keys (`decoder.N...`, and `encoder.N...` when present): the
    stage sizes are the Block counts between consecutive plain convs; widths from the conv shapes."""
    dconv, dblocks = _taesd_stages(refs, "decoder")
    if len(dconv) < 2:
        raise CheckpointError("no TAESD decoder weights (decoder.N.weight)")
    c, latent = _weight_shape(refs, f"decoder.{dconv[0]}.weight", 4)[:2]
    cfg = TAESDConfig(channels=c, latent_channels=latent,
                      image_channels=_weight_shape(refs, f"decoder.{dconv[-1]}.weight", 4)[0],
                      decoder_blocks=tuple(dblocks), encoder_blocks=(1,) + (3,) * (len(dblocks) - 1),
                      scale_factor=scale_factor)
    econv, eblocks = _taesd_stages(refs, "encoder")
    if econv:
        ec, img = _weight_shape(refs, f"encoder.{econv[0]}.weight", 4)[:2]
        elatent = _weight_shape(refs, f"encoder.{econv[-1]}.weight", 4)[0]
        if (ec, elatent, len(eblocks)) != (c, latent, len(dblocks)):
            raise CheckpointError(f"TAESD encoder ({ec} channels, {elatent} latent channels, {len(eblocks)} stages) "
                                  f"does not match its decoder ({c}, {latent}, {len(dblocks)})")
        cfg = dataclasses.replace(cfg, encoder_blocks=tuple(eblocks), image_channels=img)
    return cfg


# ---- upscaler models (fastsd/models/esrgan.py, compact.py, swinir.py) ------------------------------------

# The ESRGAN repository's later RRDBNet names (BSRGAN and others) -> Real-ESRGAN's (fastsd's).
ESRGAN_RULES: list[Rule] = [
    (r"^RRDB_trunk\.(?P<i>\d+)\.RDB(?P<k>\d)\.", r"body.\g<i>.rdb\g<k>."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv(?P<i>\d)\.", r"conv_up\g<i>."),
    (r"^HRconv\.", "conv_hr."),
]


def esrgan_keys(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """An RRDBNet's keys under Real-ESRGAN's names. The original ESRGAN files are one nn.Sequential: `model.0` the
    first conv, `model.1.sub.N.RDBk.convj.0` the blocks and `model.1.sub.<blocks>` the body's last conv, then the
    upsampling convs, conv_hr and conv_last as the remaining `model.N` convs in order (Upsample and LeakyReLU
    entries between them hold no weights)."""
    if not any(k.startswith("model.") for k in refs):
        return rename(refs, ESRGAN_RULES)
    top = sorted({int(m[1]) for k in refs if (m := re.fullmatch(r"model\.(\d+)\.weight", k))})
    blocks = {int(m[1]) for k in refs if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))}
    if len(top) < 3 or top[0] != 0 or not blocks:
        raise CheckpointError("an ESRGAN file (model.N keys) without its first conv, blocks and last convs")
    tail = top[1:]  # after model.0: conv_up1..n, conv_hr, conv_last
    names = {0: "conv_first", tail[-1]: "conv_last", tail[-2]: "conv_hr"}
    names.update({i: f"conv_up{n}" for n, i in enumerate(tail[:-2], 1)})
    body_conv = max(blocks) + 1

    def name(m: re.Match) -> str:
        if m["top"] is not None:
            return names.get(int(m["top"]), m[0])
        if m["block"] is not None:
            return f"body.{m['block']}.rdb{m['k']}.conv{m['j']}"
        return "conv_body" if int(m["sub"]) == body_conv else m[0]

    pattern = (r"^model\.(?:(?P<top>\d+)(?=\.(?:weight|bias)$)|1\.sub\.(?:(?P<block>\d+)\.RDB(?P<k>\d)\.conv(?P<j>\d)\.0"
               r"|(?P<sub>\d+)(?=\.(?:weight|bias)$)))")
    return {re.sub(pattern, name, k, count=1): v for k, v in refs.items()}


def esrgan_config_from_keys(refs: dict[str, TensorRef]) -> ESRGANConfig:
    """The RRDBNet of Real-ESRGAN-named keys: widths from the shapes, blocks and upsamples counted; the x2 / x1
    models' pixel unshuffle read off the first conv taking 4x / 16x the image channels."""
    for k in ("conv_first.weight", "conv_last.weight", "body.0.rdb1.conv1.weight"):
        if k not in refs or len(refs[k].shape) != 4:
            raise CheckpointError(f"an ESRGAN model without a 3x3 convolution {k}")
    features, first_in = refs["conv_first.weight"].shape[:2]
    out = refs["conv_last.weight"].shape[0]
    unshuffle = next((f for f in (4, 2) if first_in == out * f * f), 1)
    return ESRGANConfig(in_channels=first_in // unshuffle ** 2, out_channels=out, features=features,
                        blocks=_count(refs, r"body\.(\d+)\.rdb1\.conv1\.weight$"),
                        growth=refs["body.0.rdb1.conv1.weight"].shape[0],
                        upsamples=_count(refs, r"conv_up(\d+)\.weight$"), unshuffle=unshuffle)


def compact_config_from_keys(refs: dict[str, TensorRef]) -> CompactConfig:
    """The SRVGGNetCompact of `body.N` keys: convs at even N, PReLU slopes at odd N; the last conv makes
    out_channels * scale**2 channels (out_channels = in_channels: its input is added back)."""
    convs = sorted(int(m[1]) for k in refs if (m := re.fullmatch(r"body\.(\d+)\.weight", k)) and len(refs[k].shape) == 4)
    if len(convs) < 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise CheckpointError("an SRVGGNetCompact model whose body.N convolutions are not at N = 0, 2, 4, ...")
    features, cin = refs["body.0.weight"].shape[:2]
    last = refs[f"body.{convs[-1]}.weight"].shape[0]
    scale = round((last / cin) ** 0.5)
    if scale < 1 or scale * scale * cin != last:
        raise CheckpointError(f"an SRVGGNetCompact model whose last convolution makes {last} channels, not "
                              f"{cin} x scale**2 for {cin} image channels")
    return CompactConfig(in_channels=cin, out_channels=cin, features=features, convs=len(convs) - 2, scale=scale)


SWINIR_KEY = "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"  # (what marks a SwinIR file)
# Buffers the official SwinIR saves (and spandrel's too): the relative position index and the shifted windows' mask
# for the training size. fastsd computes both for each input's size (models/swinir.py), so they are dropped unread.
SWINIR_BUFFERS = re.compile(r"layers\.\d+\.residual_group\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)")


def swinir_keys(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """A SwinIR file's weights: its computed buffers (SWINIR_BUFFERS) left out; every other key is kept for the
    strict check."""
    return {k: v for k, v in refs.items() if not SWINIR_BUFFERS.fullmatch(k)}


def _shape(refs: dict[str, TensorRef], key: str, dims: int, what: str) -> tuple[int, ...]:
    """The shape of `key`, which must be there with `dims` dimensions; CheckpointError naming it otherwise."""
    if key not in refs:
        raise CheckpointError(f"a SwinIR model without {key} ({what})")
    shape = tuple(refs[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"a SwinIR model whose {key} ({what}) has shape {shape}, not {dims} dimensions")
    return shape


def _indices(refs: dict[str, TensorRef], pattern: str) -> list[int]:
    """The numbers N of the keys matching `pattern` (one group), sorted."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in refs if (m := rx.match(k))})


def _swinir_upsampler(refs: dict[str, TensorRef], embed: int, cin: int) -> tuple[str, int, int, int]:
    """(upsampler, scale, num_feat, out_channels) of a SwinIR file, read off its upsampling layers."""
    ups = _indices(refs, r"upsample\.(\d+)\.weight$")
    if "conv_up1.weight" in refs:  # real-world SR: nearest x2 + conv per factor 2
        feat = _shape(refs, "conv_before_upsample.0.weight", 4, "the conv before the upsampler")[0]
        n = _indices(refs, r"conv_up(\d+)\.weight$")
        if n != list(range(1, len(n) + 1)) or len(n) > 3:
            raise CheckpointError(f"a SwinIR model (nearest+conv) whose conv_upN are N = {n}, not 1 (x2), 1, 2 (x4) "
                                  "or 1, 2, 3 (x8)")
        out = _shape(refs, "conv_last.weight", 4, "the last conv")[0]
        return "nearest+conv", 2 ** len(n), feat, out
    if "conv_before_upsample.0.weight" in refs:  # classical SR: (conv to 4x / 9x channels, pixel shuffle) per factor
        feat = _shape(refs, "conv_before_upsample.0.weight", 4, "the conv before the upsampler")[0]
        if not ups or ups != list(range(0, 2 * len(ups), 2)):
            raise CheckpointError(f"a SwinIR model (pixelshuffle) whose upsample.N convs are at N = {ups or 'none'}, "
                                  "not 0, 2, ...")
        factors = []
        for i in ups:
            made = _shape(refs, f"upsample.{i}.weight", 4, "an upsampling conv")[0]
            if made not in (4 * feat, 9 * feat) or (made == 9 * feat and len(ups) > 1):
                raise CheckpointError(f"a SwinIR model whose upsample.{i}.weight makes {made} channels, not "
                                      f"4 x {feat} (x2 per conv) or 9 x {feat} (x3, alone)")
            factors.append(2 if made == 4 * feat else 3)
        out = _shape(refs, "conv_last.weight", 4, "the last conv")[0]
        return "pixelshuffle", 2 ** len(factors) if factors[0] == 2 else 3, feat, out
    if ups:  # lightweight SR: one conv to out * s * s channels, pixel shuffle
        made = _shape(refs, "upsample.0.weight", 4, "the upsampling conv")[0]
        s = round((made / cin) ** 0.5)
        if ups != [0] or s < 2 or s * s * cin != made:
            raise CheckpointError(f"a SwinIR model (pixelshuffledirect) whose upsample.0.weight makes {made} channels, "
                                  f"not {cin} x scale**2")
        return "pixelshuffledirect", s, 64, cin
    out = _shape(refs, "conv_last.weight", 4, "the last conv")[0]
    if out != cin:  # x1 (denoising, JPEG artifacts): the output is the input plus a conv
        raise CheckpointError(f"a SwinIR model without upsampler whose conv_last.weight makes {out} channels, not "
                              f"its {cin} input channels")
    return "", 1, 64, out


def swinir_config_from_keys(refs: dict[str, TensorRef]) -> SwinIRConfig:
    """The SwinIR of official-named keys (buffers dropped by swinir_keys): widths from conv_first and the MLP;
    groups and blocks counted; heads and window from each group's relative position bias table ((2w-1)**2, heads);
    the upsampler and scale from the upsampling layers; "3conv" and patch_norm / ape by their keys."""
    if any(".overlap_attn." in k or ".conv_block.cab." in k for k in refs):
        raise CheckpointError("a HAT model (overlapping cross-attention and channel attention blocks); fastsd reads "
                              "SwinIR but not HAT")
    embed, cin = _shape(refs, "conv_first.weight", 4, "the first conv")[:2]
    groups = _indices(refs, r"layers\.(\d+)\.residual_group\.blocks\.")
    if groups != list(range(len(groups))):
        raise CheckpointError(f"a SwinIR model whose groups layers.N are N = {groups}, not 0, 1, 2, ...")
    depths, heads, window = [], [], None
    for i in groups:
        blocks = _indices(refs, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.")
        if blocks != list(range(len(blocks))):
            raise CheckpointError(f"a SwinIR model whose layers.{i} blocks are {blocks}, not 0, 1, 2, ...")
        key = f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"
        rows, h = _shape(refs, key, 2, "relative position biases per head")
        w = (round(rows ** 0.5) + 1) // 2
        if (2 * w - 1) ** 2 != rows or (window is not None and w != window):
            raise CheckpointError(f"a SwinIR model whose {key} has {rows} rows, not (2 x window - 1)**2"
                                  + (f" for window {window}" if window is not None else ""))
        if embed % h:
            raise CheckpointError(f"a SwinIR model whose {key} has {h} heads, which don't divide {embed} channels")
        window = w
        depths.append(len(blocks))
        heads.append(h)
    hidden = _shape(refs, "layers.0.residual_group.blocks.0.mlp.fc1.weight", 2, "the MLP")[0]
    if "conv_after_body.weight" in refs:
        resi = "1conv"
    elif "conv_after_body.0.weight" in refs:
        resi = "3conv"
    else:
        raise CheckpointError("a SwinIR model without conv_after_body.weight (1conv) or conv_after_body.0.weight "
                              "(3conv)")
    upsampler, scale, feat, out = _swinir_upsampler(refs, embed, cin)
    img_size = 64
    if "absolute_pos_embed" in refs:
        n = _shape(refs, "absolute_pos_embed", 3, "the absolute position embedding")[1]
        img_size = round(n ** 0.5)
        if img_size * img_size != n:
            raise CheckpointError(f"a SwinIR model whose absolute_pos_embed has {n} positions, not a square")
    return SwinIRConfig(in_channels=cin, out_channels=out, embed_dim=embed, depths=tuple(depths),
                        num_heads=tuple(heads), window_size=window, mlp_ratio=hidden / embed, upsampler=upsampler,
                        scale=scale, num_feat=feat, resi_connection=resi, patch_norm="patch_embed.norm.weight" in refs,
                        ape="absolute_pos_embed" in refs, img_size=img_size,
                        img_range=255.0 if window == 7 else 1.0)  # (the official JPEG models: window 7, range 255)
