"""Find and read a model source, tell what it is, and stream its weights into fastsd's modules.

Sources: an LDM single file (.safetensors, or .ckpt read with weights_only=True), a diffusers folder,
a repo id in the local Hugging Face cache (offline), or "random:<preset>" (random weights).
Loading is strict: missing, unexpected and wrong-shape keys are reported by name.
"""
from __future__ import annotations

import json
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
from fastsd.tensorfile import CheckpointError, TensorRef, read_tensor_file

LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip": "cond_stage_model.transformer."}
# Keys of a full LDM training checkpoint that are not model weights: the noise-schedule buffers,
# EMA copies (A1111 loads the main weights, as we do), the VAE's training loss, CLIP's position ids.
IGNORED_LDM_KEYS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar|model_ema\..*"
    r"|first_stage_model\.loss\..*|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids)$")

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
        sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* weights; "
                              f"{len(keys)} tensors such as {sample})")
    for name in ("vae", "clip"):
        if not parts[name]:
            raise CheckpointError(f"{path}: has a UNet but no {name.upper()} weights ({LDM_PREFIXES[name]}*); "
                                  "fastsd needs a full single-file checkpoint")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys outside the SD1.x models: {_names(unexpected)}")
    try:
        cfg = SDConfig(clip=convert.clip_config_from_ldm(parts["clip"]), vae=convert.vae_config_from_ldm(parts["vae"]),
                       unet=convert.unet_config_from_ldm(parts["unet"]))
    except KeyError as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x checkpoint (missing {e.args[0]})") from None
    if cfg.unet.context_dim != 768 and cfg.unet.context_dim != cfg.clip.hidden_size:
        raise CheckpointError(f"{path}: UNet cross-attention width {cfg.unet.context_dim} does not match the text "
                              f"encoder's {cfg.clip.hidden_size} (Stable Diffusion 2.x?)")
    return Checkpoint(cfg, parts["unet"], parts["vae"], parts["clip"], _kind(cfg), Path(path).stem, path=path)


def _folder_weights(folder: Path, stems: tuple[str, ...]) -> dict[str, TensorRef]:
    for stem in stems:
        for ext in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            f = folder / (stem + ext)
            if f.exists():
                return read_tensor_file(str(f))
    raise CheckpointError(f"{folder}: no weights file ({stems[0]}.safetensors or .bin)")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else 'nested too deeply'})") from None


def _config(path: Path, parse):
    """A model config from a config.json; CheckpointError naming the file when it lacks what SD1.x needs."""
    data = _json(path)
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return parse(data)
    except KeyError as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x config (no {e.args[0]!r})") from None
    except (TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x config ({e})") from None


def from_diffusers_folder(path: str) -> Checkpoint:
    root = Path(path)
    missing = [d for d in ("unet", "vae", "text_encoder") if not (root / d).is_dir()]
    if missing:
        index = root / "model_index.json"
        if index.exists() and "unet" not in _json(index):
            cls = _json(index).get("_class_name", "?")
            raise CheckpointError(f"{path}: a diffusers {cls} folder; fastsd loads Stable Diffusion 1.x only")
        raise CheckpointError(f"{path}: not a complete diffusers folder (missing {', '.join(d + '/' for d in missing)})")
    ucfg = _config(root / "unet" / "config.json", convert.unet_config_from_diffusers)
    vcfg, vae = diffusers_vae(root / "vae")
    ccfg = _config(root / "text_encoder" / "config.json", convert.clip_config_from_transformers)
    if ucfg.context_dim != ccfg.hidden_size:
        raise CheckpointError(f"{path}: UNet cross-attention width {ucfg.context_dim} does not match the text "
                              f"encoder's {ccfg.hidden_size}")
    cfg = SDConfig(clip=ccfg, vae=vcfg, unet=ucfg)
    unet = convert.rename(_folder_weights(root / "unet", ("diffusion_pytorch_model",)), convert.unet_rules(ucfg))
    clip = convert.clip_keys(_folder_weights(root / "text_encoder", ("model", "pytorch_model")))
    tok = root / "tokenizer"
    return Checkpoint(cfg, unet, vae, clip, _kind(cfg), root.name,
                      tokenizer_dir=str(tok) if (tok / "vocab.json").exists() else None)


def diffusers_vae(folder: Path) -> tuple[VAEConfig, dict[str, TensorRef]]:
    """A diffusers AutoencoderKL folder (config.json + weights): its config and its weights under LDM names."""
    from fastsd.vae_files import check_kl_config  # (vae_files imports this module)

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
    if os.path.isfile(source):
        return from_ldm_file(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith((".safetensors", ".ckpt")):
        snap = find_in_hf_cache(source)
        if snap is not None:
            return from_diffusers_folder(snap)
        raise CheckpointError(f"{source}: no such file or folder, and no such repo in the local Hugging Face cache "
                              f"({hf_cache_dir()}); fastsd never downloads — point --model at a file or folder")
    raise CheckpointError(f"{source}: no such file or folder")


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def mismatches(module: nn.Module, refs: dict[str, TensorRef]) -> list[str]:
    """Strict check by name and shape: what keeps `refs` from filling `module` ([] when it fits)."""
    expected = dict(module.named_parameters())
    missing = [k for k in expected if k not in refs]
    unexpected = [k for k in refs if k not in expected]
    wrong = [f"{k} {tuple(refs[k].shape)} vs {tuple(p.shape)}" for k, p in expected.items()
             if k in refs and tuple(refs[k].shape) != tuple(p.shape)]
    return [f"{len(missing)} missing ({_names(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_names(unexpected)})" if unexpected else "",
            f"{len(wrong)} with the wrong shape (file vs model: {_names(wrong)})" if wrong else ""]


def fill(module: nn.Module, refs: dict[str, TensorRef], *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Fill a module built on the meta device, reading one tensor at a time (never two copies of the model)."""
    for name, _ in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        t = refs[name].load().to(device=device, dtype=dtype)
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
    with torch.device("meta"):
        models = {n: cls(sub) for n, (cls, sub) in ctors.items()}
    found = {n: [p for p in mismatches(m, getattr(src, n)) if p] for n, m in models.items()}
    problems = [f"{n} weights do not fit the model: " + "; ".join(ps) for n, ps in found.items() if ps]
    if problems:
        raise CheckpointError(f"{src.name}: " + " | ".join(problems))
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
