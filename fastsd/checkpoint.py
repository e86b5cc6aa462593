"""Find and read a model source, tell what it is, and stream its weights into fastsd's modules.

Sources: an LDM single file (.safetensors, or .ckpt read with weights_only=True), a diffusers folder,
a repo id in the local Hugging Face cache (offline), or "random:<preset>" (random weights).
Loading is strict: missing, unexpected and wrong-shape keys are reported by name.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastsd import convert
from fastsd.config import PRESETS, SDConfig, VAEConfig
from fastsd.models.clip import CLIPTextModel
from fastsd.models.unet import UNet
from fastsd.models.vae import AutoencoderKL
from fastsd.tensorfile import (
    CheckpointError,
    TensorRef,
    check_regular_file,
    read_tensor_file,
    safetensors_metadata,
    shown,
)

LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip": "cond_stage_model.transformer."}

# Keys of a full LDM training checkpoint that are not model weights: the noise-schedule buffers,
# EMA copies (A1111 loads the main weights, as we do), the VAE's training loss, CLIP's position ids; what other
# tools leave and A1111 ignores: CLIP's logit scale and text projection (SD1 conditions on the last hidden
# states; older ComfyUI saves hold both), the textual-inversion trainer's embedding_manager.
IGNORED_LDM_KEYS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar|lvlb_weights"
    r"|model_ema\..*|first_stage_model\.loss\..*|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids"
    r"|cond_stage_model\.logit_scale|cond_stage_model\.transformer\.(text_model\.)?text_projection\.weight"
    r"|embedding_manager\..*)$")

# Keys ComfyUI saves to mark a model sampled otherwise than SD1's epsilon prediction on its training schedule.
SAMPLING_MARKERS = {"v_pred": "a v-prediction model", "ztsnr": "a zero-terminal-SNR model"}
EPSILON_ONLY = "fastsd samples epsilon-prediction models on SD1's training schedule only"

# What a file is when it is not SD1.x: (a key pattern, the family's name).
OTHER_FAMILIES = [
    (r"^conditioner\.embedders\.", "SDXL"),
    (r"^cond_stage_model\.model\.", "Stable Diffusion 2.x (OpenCLIP text encoder)"),
    (r"^model\.diffusion_model\.joint_blocks\.", "Stable Diffusion 3"),
    (r"^(model\.diffusion_model\.)?double_blocks\.", "FLUX"),
    (r"^lora_(unet|te)_|\.lora_(up|down)\.", "a LoRA (not a full model)"),
    (r"^(encoder|decoder)\.(down|up|mid)", "a standalone VAE (not a full model; "
     "load it with --vae / vae=)"),
    (r"^((encoder|decoder)\.layers\.\d+|\d+\.conv\.\d+)\.weight$", "a TAESD tiny autoencoder (not a full model; "
     "load it with --vae taesd:FILE / vae=)"),
]


@dataclass
class Checkpoint:
    """What a source holds, not read yet: tensors per model under fastsd (LDM) names, and the config."""

    config: SDConfig
    unet: dict[str, TensorRef]
    vae: dict[str, TensorRef]
    clip: dict[str, TensorRef]
    kind: str  # "sd1" or "sd1-inpainting"
    name: str  # for infotext: the file or folder name without extension
    path: str | None = None  # the file, for the A1111 model hash; None for folders and random weights
    tokenizer_dir: str | None = None
    notes: list[str] = field(default_factory=list)
    tokenizer: object = None  # the folder's fastsd.tokenizer.Tokenizer, loaded (checked) with the configs


def _kind(cfg: SDConfig) -> str:
    return "sd1-inpainting" if cfg.unet.in_channels == 9 else "sd1"


def detect_family(keys: list[str]) -> str | None:
    """None for SD1.x LDM files, else the name of what was found."""
    for pattern, family in OTHER_FAMILIES:
        rx = re.compile(pattern)
        if any(rx.search(k) for k in keys):
            return family
    return None


def from_ldm_file(path: str) -> Checkpoint:
    refs = read_tensor_file(path)
    keys = list(refs)
    family = detect_family(keys)
    if family is not None:
        raise CheckpointError(f"{path}: this is {family}; fastsd loads Stable Diffusion 1.x checkpoints only")
    marker = next((k for k in SAMPLING_MARKERS if k in refs), None)
    if marker is not None:
        raise CheckpointError(f"{path}: {SAMPLING_MARKERS[marker]} (its {marker!r} key, as ComfyUI marks one); "
                              + EPSILON_ONLY)
    _check_yaml_beside(path)
    _check_modelspec(path)
    parts: dict[str, dict[str, TensorRef]] = {name: {} for name in LDM_PREFIXES}
    unexpected = []
    for k, ref in refs.items():
        if IGNORED_LDM_KEYS.match(k):
            continue
        for name, prefix in LDM_PREFIXES.items():
            if k.startswith(prefix):
                parts[name][k[len(prefix):]] = ref
                break
        else:
            unexpected.append(k)
    parts["clip"] = convert.clip_keys(parts["clip"])
    if not parts["unet"] and parts["vae"] and not parts["clip"]:
        raise CheckpointError(f"{path}: this is a standalone VAE (first_stage_model.* only), not a full model; load "
                              "it with --vae / vae=")
    if not parts["unet"]:
        sample = ", ".join(shown(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* weights; "
                              f"{len(keys)} tensors such as {sample})")
    if not parts["clip"]:
        raise CheckpointError(f"{path}: has a UNet but no CLIP weights ({LDM_PREFIXES['clip']}*); "
                              "fastsd needs a full single-file checkpoint")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys outside the SD1.x models: {_names(unexpected)}")
    try:
        vae = convert.vae_config_from_ldm(parts["vae"]) if parts["vae"] else VAEConfig()  # (none: --vae gives it)
        cfg = SDConfig(clip=convert.clip_config_from_ldm(parts["clip"]), vae=vae,
                       unet=convert.unet_config_from_ldm(parts["unet"]))
    except KeyError as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x checkpoint (missing {e.args[0]})") from None
    except CheckpointError as e:  # (a config's tensor of a wrong shape)
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x checkpoint ({e})") from None
    if cfg.unet.context_dim != 768 and cfg.unet.context_dim != cfg.clip.hidden_size:
        raise CheckpointError(f"{path}: UNet cross-attention width {cfg.unet.context_dim} does not match the text "
                              f"encoder's {cfg.clip.hidden_size} (Stable Diffusion 2.x?)")
    _check_ldm_shapes(path, cfg, keys)
    return Checkpoint(cfg, parts["unet"], parts["vae"], parts["clip"], _kind(cfg), Path(path).stem, path=path)


def _check_ldm_shapes(path: str, cfg: SDConfig, keys: list[str]) -> None:
    """What an SD1.x single file must have for sampling to work, checked at load (else an IndexError or a
    shape error would come at the first prompt): 4 or 9 UNet input channels, a token embedding row for every
    id of the SD1 tokenizer, and 77 positions."""
    from fastsd.tokenizer import MAX_LENGTH, VOCAB_SIZE

    def key(suffix: str) -> str:
        return next((k for k in keys if k.endswith(suffix)), suffix)

    conv_in = key("model.diffusion_model.input_blocks.0.0.weight")
    if cfg.unet.in_channels not in (4, 9):
        kind = " (an InstructPix2Pix model)" if cfg.unet.in_channels == 8 else ""
        raise CheckpointError(f"{path}: {conv_in} has shape ({cfg.unet.model_channels}, {cfg.unet.in_channels}, ...): "
                              f"{cfg.unet.in_channels} input channels{kind}; fastsd loads UNets of 4 (text-to-image) "
                              "or 9 (inpainting) input channels")
    if cfg.clip.vocab_size < VOCAB_SIZE:
        raise CheckpointError(f"{path}: {key('embeddings.token_embedding.weight')} has {cfg.clip.vocab_size} rows; "
                              f"the SD1 CLIP tokenizer's ids need {VOCAB_SIZE}")
    if cfg.clip.max_positions < MAX_LENGTH:
        raise CheckpointError(f"{path}: {key('embeddings.position_embedding.weight')} has {cfg.clip.max_positions} "
                              f"rows; SD1 prompts are {MAX_LENGTH} tokens long")


def _check_yaml_beside(path: str) -> None:
    """A1111 reads the LDM config beside a checkpoint (NAME.yaml); one whose parameterization is not eps ("v": a
    v-prediction model) would sample wrongly here: CheckpointError naming it."""
    yaml = Path(path).with_suffix(".yaml")
    try:
        text = yaml.read_text(errors="replace") if yaml.is_file() and yaml.stat().st_size <= MAX_JSON_BYTES else ""
    except OSError:  # (unreadable: A1111 would fail on it; the checkpoint itself is what fastsd reads)
        return
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.M)
    if m and m[1] != "eps":
        raise CheckpointError(f"{yaml}: parameterization {m[1]!r} (a v-prediction model, A1111 reads this file "
                              f"beside {Path(path).name}); " + EPSILON_ONLY)


def _check_modelspec(path: str) -> None:
    """The model-spec metadata of a .safetensors (kohya's sd-scripts write it): a prediction type other than
    epsilon ("v": a v-parameterization fine-tune) would sample wrongly here: CheckpointError naming it."""
    if not path.lower().endswith(".safetensors"):
        return
    pred = safetensors_metadata(path).get("modelspec.prediction_type", "")
    if pred.strip().lower() not in ("", "epsilon", "eps"):
        raise CheckpointError(f"{path}: its metadata says modelspec.prediction_type {pred[:40]!r} (a "
                              "v-prediction model?); " + EPSILON_ONLY)


def _check_scheduler(root: Path) -> None:
    """A diffusers folder's scheduler_config.json, when there is one: a prediction type or a zero-terminal-SNR
    schedule fastsd does not sample would give wrong images, so CheckpointError naming the field."""
    path = root / "scheduler" / "scheduler_config.json"
    data = _json(path) if os.path.lexists(path) else {}
    if not isinstance(data, dict):
        return
    pred = data.get("prediction_type")
    if pred not in (None, "epsilon"):
        raise CheckpointError(f"{path}: prediction_type {_shown(pred)}; " + EPSILON_ONLY)
    if data.get("rescale_betas_zero_snr"):
        raise CheckpointError(f"{path}: rescale_betas_zero_snr true (a zero-terminal-SNR model); " + EPSILON_ONLY)


def _folder_weights(folder: Path, stems: tuple[str, ...]) -> dict[str, TensorRef]:
    """A diffusers / transformers part's weights: one file, else shards listed by an index (diffusers' and
    transformers' names, `variant` fp16 files after the plain ones)."""
    for stem in stems:
        for fmt in ("safetensors", "bin"):
            for one, index in ((f"{stem}.{fmt}", f"{stem}.{fmt}.index.json"),
                               (f"{stem}.fp16.{fmt}", f"{stem}.{fmt}.index.fp16.json")):
                if os.path.lexists(folder / one):  # (a broken link, a FIFO, ... is named by read_tensor_file)
                    return read_tensor_file(str(folder / one))
                if os.path.lexists(folder / index):
                    return _sharded_weights(folder / index)
    raise CheckpointError(f"{folder}: no weights file ({stems[0]}.safetensors or .bin)")


def _sharded_weights(index: Path) -> dict[str, TensorRef]:
    """The tensors of the shards an index.json's weight_map names, each where the map says (strict: a tensor the
    map doesn't list, or lists in another shard, is named)."""
    data = _json(index)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(f, str) for f in wmap.values()):
        raise CheckpointError(f"{index}: not a weights index (no weight_map of tensor names to shard files)")
    refs: dict[str, TensorRef] = {}
    for shard in sorted(set(wmap.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: shard {shown(shard)} is not a file name in this folder")
        for k, ref in read_tensor_file(str(index.parent / shard)).items():
            if wmap.get(k) != shard:
                raise CheckpointError(f"{index.parent / shard}: holds {shown(k)}, which the index "
                                      + (f"puts in {shown(wmap[k])}" if k in wmap else "does not list"))
            refs[k] = ref
    missing = [k for k in wmap if k not in refs]
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} listed tensors are in no shard ({_names(missing)})")
    return refs


MAX_JSON_BYTES = 1 << 20  # model_index.json and config.json files are a few KiB


def _json(path: Path) -> dict:
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing")
    size = check_regular_file(path)  # a FIFO would block, /dev/zero never end
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, too large for a model config (at most {MAX_JSON_BYTES})")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: too large for a model config (more than {MAX_JSON_BYTES} bytes)")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a number of more than 4300 digits
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "integer string conversion" in why:
            why = "a number too long to read"
        raise CheckpointError(f"{path}: not valid JSON ({why})") from None


def _config(path: Path, parse, check=None):
    """A model config from a config.json; CheckpointError naming the file when it lacks what SD1.x needs.
    check(data, path): the values checked first (types, ranges), one CheckpointError naming field and value."""
    data = _json(path)
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        if check is not None:
            check(data, path)
        return parse(data)
    except KeyError as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x config (no {shown(e.args[0])})") from None
    except CheckpointError as e:
        msg = str(e)
        if msg.startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {msg}") from None
    except (TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x config ({e})") from None


# Bounds far above any real SD1.x model (4 levels of up to 1280 channels, 2 layers each; CLIP-L: 12 layers of
# 768), so that a typo in config.json can't make fastsd build a model of millions of layers or channels
MAX_LEVELS, MAX_CHANNELS, MAX_LAYERS = 8, 1 << 16, 64
UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _shown(value) -> str:
    """A config value as config.json writes it (null, "abc", NaN), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_kl_config(cfg: dict, path: Path | str) -> None:
    """The values of a diffusers AutoencoderKL config.json that fastsd's VAE is built from, checked before
    anything is built: one CheckpointError naming `path`, the field and its value. A field left out takes
    diffusers' default; one given (even as null) must be what a Stable Diffusion 1.x VAE can be."""
    bad, positive = _checker(cfg, path)
    blocks = _levels(cfg, path, bad, "VAE ", "[128, 256, 512, 512]")
    positive("layers_per_block", MAX_LAYERS)
    positive("latent_channels", MAX_CHANNELS)
    positive("norm_num_groups", MAX_CHANNELS)
    _divides(cfg, "norm_num_groups", 32, blocks, bad)
    for key in ("in_channels", "out_channels"):
        if key in cfg and not (_is_int(cfg[key]) and cfg[key] == 3):
            raise bad(key, "a Stable Diffusion VAE takes and makes RGB images: 3")
    scale = cfg.get("scaling_factor", 0.18215)
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0
            or (isinstance(scale, float) and not math.isfinite(scale))):
        raise bad("scaling_factor", "expected a finite positive number (SD1.x VAEs use 0.18215)")
    if cfg.get("act_fn", "silu") != "silu":
        raise bad("act_fn", 'fastsd runs the Stable Diffusion VAE\'s "silu"')
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = cfg.get(key, [block] * len(blocks))
        if not isinstance(types, list) or types != [block] * len(types):
            raise bad(key, f'fastsd runs Stable Diffusion\'s "{block}" blocks only')
        if len(types) != len(blocks):
            raise bad(key, f"{len(types)} blocks but block_out_channels has {len(blocks)}")
    for key in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
        if cfg.get(key, True) is not True:
            raise bad(key, "a Stable Diffusion VAE has it true")


def _checker(cfg: dict, path):
    """(bad, positive) for config `cfg` read from `path`: bad(field, want) is the CheckpointError naming the
    file, the field and its value; positive(field, top) refuses a field given but not an integer in 1..top."""
    def bad(field: str, want: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} {_shown(cfg[field])}; {want}")

    def positive(field: str, top: int) -> None:
        if field in cfg and not (_is_int(cfg[field]) and 0 < cfg[field] <= top):
            raise bad(field, f"expected a positive integer (at most {top})")

    return bad, positive


def _levels(cfg: dict, path, bad, what: str, example: str) -> list[int]:
    """block_out_channels of a UNet or VAE config: 1 to MAX_LEVELS positive integers, each a multiple of the first
    (LDM's models have base channels * a multiplier per level)."""
    if "block_out_channels" not in cfg:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x {what}config (no 'block_out_channels')")
    blocks = cfg["block_out_channels"]
    if (not isinstance(blocks, list) or not 0 < len(blocks) <= MAX_LEVELS
            or not all(_is_int(b) and 0 < b <= MAX_CHANNELS for b in blocks)):
        raise bad("block_out_channels", f"expected a list of 1 to {MAX_LEVELS} positive integers (at most "
                                        f"{MAX_CHANNELS}; SD1.x: {example})")
    if any(b % blocks[0] for b in blocks):
        raise bad("block_out_channels", f"each must be a multiple of the first, {blocks[0]}")
    return blocks


def _divides(cfg: dict, field: str, default: int, blocks: list[int], bad) -> None:
    """Refuse `field` (its value, else `default`) unless it divides every one of block_out_channels."""
    if any(b % cfg.get(field, default) for b in blocks):
        raise bad(field, f"the block_out_channels {_shown(blocks)} must all be divisible by it")


def check_unet_config(cfg: dict, path) -> None:
    """The values of a diffusers UNet2DConditionModel config.json that fastsd's UNet is built from, checked
    before anything is built (as check_kl_config does for the VAE): one CheckpointError naming
    `path`, the field and its value. A field left out takes diffusers' default."""
    convert.check_unet_family(cfg)  # (another family is named as such, not by the first value that differs)
    bad, positive = _checker(cfg, path)
    if cfg.get("use_linear_projection") not in (None, False):
        raise bad("use_linear_projection", "expected false (SD1.x UNets project with 1x1 convolutions)")
    blocks = _levels(cfg, path, bad, "", "[320, 640, 1280, 1280]")
    if "in_channels" in cfg and not (_is_int(cfg["in_channels"]) and cfg["in_channels"] in (4, 9)):
        kind = "an InstructPix2Pix model; " if cfg["in_channels"] == 8 else ""
        raise bad("in_channels", kind + "fastsd loads UNets of 4 (text-to-image) or 9 (inpainting) input channels")
    positive("out_channels", MAX_CHANNELS)
    positive("layers_per_block", MAX_LAYERS)
    positive("cross_attention_dim", MAX_CHANNELS)
    positive("norm_num_groups", MAX_CHANNELS)
    _divides(cfg, "norm_num_groups", 32, blocks, bad)
    heads = cfg.get("attention_head_dim", 8)  # diffusers' legacy name: in SD1.x configs, the head count
    if isinstance(heads, list):
        if len(heads) != len(blocks) or not all(_is_int(h) and 0 < h <= MAX_CHANNELS for h in heads):
            raise bad("attention_head_dim", f"expected a positive integer or a list of {len(blocks)} "
                                            "(one per block_out_channels)")
        if len(set(heads)) != 1:
            raise bad("attention_head_dim", "per-level head counts are SD2.x style; SD1.x has the same at each level")
        heads = heads[0]
    elif not (_is_int(heads) and 0 < heads <= MAX_CHANNELS):
        raise bad("attention_head_dim", "expected a positive integer (the head count; SD1.x: 8)")
    _divides({"attention_head_dim": heads}, "attention_head_dim", 8, blocks, bad)
    for key, names in (("down_block_types", UNET_DOWN_BLOCKS), ("up_block_types", UNET_UP_BLOCKS)):
        if key not in cfg:
            if key == "down_block_types":
                raise CheckpointError(f"{path}: not a Stable Diffusion 1.x config (no 'down_block_types')")
            continue
        types = cfg[key]
        if not isinstance(types, list) or not all(isinstance(t, str) and t in names for t in types):
            raise bad(key, f"expected a list of {' or '.join(repr(n) for n in names)}")
        if len(types) != len(blocks):
            raise bad(key, f"{len(types)} blocks but block_out_channels has {len(blocks)}")
    size = cfg.get("sample_size")
    if size is not None and not (_is_int(size) and size > 0 or isinstance(size, list)
                                 and all(_is_int(v) and v > 0 for v in size)):
        raise bad("sample_size", "expected a positive integer")


def check_clip_config(cfg: dict, path) -> None:
    """The values of a transformers CLIPTextModel config.json (or its text_config) that fastsd's text encoder is
    built from, checked first: one CheckpointError naming `path`, the field and its value."""
    from fastsd.tokenizer import MAX_LENGTH, VOCAB_SIZE

    if "text_config" in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise _checker(cfg, path)[0]("text_config", "expected an object")
        cfg = cfg["text_config"]
    bad, positive = _checker(cfg, path)
    positive("hidden_size", MAX_CHANNELS)
    positive("intermediate_size", 4 * MAX_CHANNELS)
    positive("num_hidden_layers", MAX_LAYERS)
    positive("num_attention_heads", MAX_CHANNELS)
    if _is_int(cfg.get("hidden_size")) and _is_int(cfg.get("num_attention_heads")) \
            and cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise bad("num_attention_heads", f"hidden_size {cfg['hidden_size']} must be divisible by it")
    if "vocab_size" in cfg and not (_is_int(cfg["vocab_size"]) and VOCAB_SIZE <= cfg["vocab_size"] <= 1 << 20):
        raise bad("vocab_size", f"expected an integer of at least {VOCAB_SIZE} (the SD1 CLIP tokenizer's size)")
    if "max_position_embeddings" in cfg and not (_is_int(cfg["max_position_embeddings"])
                                                 and MAX_LENGTH <= cfg["max_position_embeddings"] <= MAX_CHANNELS):
        raise bad("max_position_embeddings", f"expected an integer of at least {MAX_LENGTH} (SD1 prompts' length)")
    if "layer_norm_eps" in cfg:
        eps = cfg["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and 0 < eps < 1):
            raise bad("layer_norm_eps", "expected a small positive number (SD1.x: 1e-05)")
    if "eos_token_id" in cfg:
        vocab = cfg.get("vocab_size", VOCAB_SIZE)
        if not (_is_int(cfg["eos_token_id"]) and 0 <= cfg["eos_token_id"] < vocab):
            raise bad("eos_token_id", f"expected a token id, 0 to {vocab - 1}")


def from_diffusers_folder(path: str) -> Checkpoint:
    root = Path(path)
    missing = [d for d in ("unet", "vae", "text_encoder") if not (root / d).is_dir()]
    if missing:
        index = root / "model_index.json"
        if os.path.lexists(index) and "unet" not in (data := _json(index)):
            if not isinstance(data, dict):
                raise CheckpointError(f"{index}: a JSON {type(data).__name__}, not a diffusers model index")
            cls = data.get("_class_name", "?")
            raise CheckpointError(f"{path}: a diffusers {cls} folder; fastsd loads Stable Diffusion 1.x only")
        raise CheckpointError(f"{path}: not a complete diffusers folder (missing {', '.join(d + '/' for d in missing)})")
    ucfg = _config(root / "unet" / "config.json", convert.unet_config_from_diffusers, check_unet_config)
    _check_scheduler(root)
    ccfg = _config(root / "text_encoder" / "config.json", convert.clip_config_from_transformers, check_clip_config)
    if ucfg.context_dim != ccfg.hidden_size:
        raise CheckpointError(f"{path}: UNet cross-attention width {ucfg.context_dim} does not match the text "
                              f"encoder's {ccfg.hidden_size}")
    tok, tokenizer = root / "tokenizer", None
    if any(os.path.lexists(tok / name) for name in ("vocab.json", "merges.txt")):
        from fastsd.tokenizer import Tokenizer

        tokenizer = Tokenizer(tok)  # checked before any weights are read: CheckpointError naming the file
    vcfg, vae = diffusers_vae(root / "vae")
    cfg = SDConfig(clip=ccfg, vae=vcfg, unet=ucfg)
    unet = convert.rename(_folder_weights(root / "unet", ("diffusion_pytorch_model",)), convert.unet_rules(ucfg))
    clip = convert.clip_keys(_folder_weights(root / "text_encoder", ("model", "pytorch_model")))
    return Checkpoint(cfg, unet, vae, clip, _kind(cfg), root.name,
                      tokenizer_dir=str(tok) if tokenizer is not None else None, tokenizer=tokenizer)


def diffusers_vae(folder: Path) -> tuple[VAEConfig, dict[str, TensorRef]]:
    """A diffusers AutoencoderKL folder (config.json + weights): its config and its weights under LDM names."""
    data = _json(folder / "config.json")
    if isinstance(data, dict):  # (_config names anything else)
        check_kl_config(data, folder / "config.json")
    cfg = _config(folder / "config.json", convert.vae_config_from_diffusers)
    refs = convert.rename(_folder_weights(folder, ("diffusion_pytorch_model",)), convert.vae_rules(cfg))
    return cfg, convert.vae_attention_as_conv(refs)


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(home) / "hub"


def find_in_hf_cache(repo_id: str) -> str | None:
    """The newest snapshot folder of `repo_id` in the local Hugging Face cache, or None. Never downloads."""
    snaps = hf_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snaps.is_dir():
        return None
    ref = snaps.parent / "refs" / "main"
    if ref.exists() and (snaps / ref.read_text().strip()).is_dir():
        return str(snaps / ref.read_text().strip())
    found = sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def resolve(source: str) -> Checkpoint | SDConfig:
    """A Checkpoint for files and folders, or the preset SDConfig for "random:<preset>"."""
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r} in {source!r}; choose one of "
                                  + ", ".join("random:" + p for p in PRESETS))
        return PRESETS[preset]
    if os.path.isdir(source):
        return from_diffusers_folder(source)
    if os.path.lexists(source):  # a file; or a FIFO, a device, a broken link or a loop, named by read_tensor_file
        return from_ldm_file(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith((".safetensors", ".ckpt")):
        snap = find_in_hf_cache(source)
        if snap is not None:
            return from_diffusers_folder(snap)
        raise CheckpointError(f"{source}: no such file or folder, and no such repo in the local Hugging Face cache "
                              f"({hf_cache_dir()}); fastsd never downloads — point --model at a file or folder")
    raise CheckpointError(f"{source}: no such file or folder")


def _names(names: list[str], limit: int = 8) -> str:
    text = ", ".join(shown(n) for n in names[:limit])
    return text + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


# Weight dtypes a model is filled from (cast to the model's dtype); integer, bool, complex and fp8 tensors are
# refused, in .safetensors and .ckpt files alike (fp8 would need its scales; the others are not weights)
LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def mismatches(module: nn.Module, refs: dict[str, TensorRef]) -> list[str]:
    """Strict check by name and shape: what keeps `refs` from filling `module` ([] when it fits)."""
    expected = dict(module.named_parameters())
    missing = [k for k in expected if k not in refs]
    unexpected = [k for k in refs if k not in expected]
    wrong = [f"{shown(k)} {tuple(refs[k].shape)} vs {tuple(p.shape)}" for k, p in expected.items()
             if k in refs and tuple(refs[k].shape) != tuple(p.shape)]
    dtypes = [f"{shown(k)} {str(refs[k].dtype).removeprefix('torch.')}" for k in expected
              if k in refs and refs[k].dtype is not None and refs[k].dtype not in LOADABLE_DTYPES]
    return [f"{len(missing)} missing ({_names(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_names(unexpected)})" if unexpected else "",
            f"{len(wrong)} with the wrong shape (file vs model: {_names(wrong)})" if wrong else "",
            f"{len(dtypes)} not floating-point weights ({_names(dtypes)}; fastsd loads float16, bfloat16, float32 "
            "and float64 tensors)" if dtypes else ""]


def fill(module: nn.Module, refs: dict[str, TensorRef], *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Fill a module built on the meta device, reading one tensor at a time (never two copies of the model)."""
    for name, _ in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        ref = refs[name]
        if ref.load_into is not None and device.type == "cpu":  # read (and converted) straight into the weight
            t = torch.empty(ref.shape, dtype=dtype)
            ref.load_into(t)
        else:
            t = ref.load().to(device=device, dtype=dtype)
        setattr(module.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
    return module.eval()


def build_models(src: Checkpoint | SDConfig, *, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 with_vae: bool = True):
    """(clip, vae, unet, config): from a Checkpoint, or with random weights from a preset SDConfig.
    with_vae=False: the VAE is neither checked nor built (None; another VAE replaces it)."""
    cfg = src.config if isinstance(src, Checkpoint) else src
    ctors = {"clip": (CLIPTextModel, cfg.clip), "vae": (AutoencoderKL, cfg.vae), "unet": (UNet, cfg.unet)}
    if not isinstance(src, Checkpoint):
        with torch.random.fork_rng(devices=[]):  # random weights from `seed`; the caller's RNG state is left alone
            torch.manual_seed(seed)
            models = {n: cls(sub).to(device=device, dtype=dtype).eval().requires_grad_(False)
                      for n, (cls, sub) in ctors.items()}  # all three, so the others' weights don't depend on vae
        return models["clip"], models["vae"] if with_vae else None, models["unet"], cfg
    if not with_vae:
        del ctors["vae"]
    elif not src.vae:
        raise CheckpointError(f"{src.path or src.name}: has no VAE weights ({LDM_PREFIXES['vae']}*); give a VAE file "
                              "with --vae / vae=")
    with torch.device("meta"):
        models = {n: cls(sub) for n, (cls, sub) in ctors.items()}
    found = {n: [p for p in mismatches(m, getattr(src, n)) if p] for n, m in models.items()}
    problems = [f"{n} weights do not fit the model: " + "; ".join(ps) for n, ps in found.items() if ps]
    if problems:
        raise CheckpointError(f"{src.path or src.name}: " + " | ".join(problems))
    for n, m in models.items():
        fill(m, getattr(src, n), dtype=dtype, device=device)
    return models["clip"], models.get("vae"), models["unet"], cfg


def ldm_state_dict(src, parts: tuple[str, ...] = ("unet", "vae", "clip")) -> dict[str, torch.Tensor]:
    """An LDM single-file state dict of a Checkpoint (reads every tensor: meant for conversion) or of anything
    holding the models as attributes (a Pipeline): `parts` under their LDM prefixes."""
    out = {}
    for name in parts:
        part = getattr(src, name)
        items = part.state_dict().items() if isinstance(part, nn.Module) else ((k, r.load()) for k, r in part.items())
        out.update({LDM_PREFIXES[name] + k: v.contiguous() for k, v in items})
    return out


SD1_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}


def sd1_models_in_hf_cache() -> list[str]:
    """Repo ids in the local Hugging Face cache whose snapshot is an SD1.x diffusers pipeline."""
    found = []
    root = hf_cache_dir()
    for d in sorted(root.glob("models--*")) if root.is_dir() else []:
        repo = d.name[len("models--"):].replace("--", "/")
        snap = find_in_hf_cache(repo)
        index = Path(snap) / "model_index.json" if snap else None
        if index is not None and index.exists():
            try:
                cls = json.loads(index.read_text()).get("_class_name")
            except json.JSONDecodeError:
                continue
            if cls in SD1_PIPELINES:
                found.append(repo)
    return found


def damaged_weights(**models: nn.Module) -> str | None:
    """Named models (unet=, clip=, vae=) -> "their weights hold NaN or infinite values (KEY and N more); the
    model file is damaged", or None when every weight is finite. For the message of a NaN result, after it
    (a pass over every weight)."""
    bad = sorted(f"{LDM_PREFIXES[part]}{name}" for part, module in models.items()
                 for name, t in itertools.chain(module.named_parameters(), module.named_buffers())
                 if _holds_nonfinite(t))
    if not bad:
        return None
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"the model's weights hold NaN or infinite values ({bad[0]}{more}); the model file is damaged"


def _holds_nonfinite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return False
    try:
        if t.is_mkldnn:  # the cpu backend's packed weights: read back in the plain layout
            t = t.to_dense()
        return t.layout == torch.strided and not bool(torch.isfinite(t).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False
