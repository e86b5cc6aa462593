"""What `--vae` / `load_pipeline(vae=...)` names, found and checked before any weight is read.

- An LDM VAE file (`.safetensors`, or `.ckpt`/`.pt` via torch.load(weights_only=True)): `encoder.*`,
  `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, with or without the `first_stage_model.` prefix. The
  training leftovers of EMA files such as vae-ft-mse-840000-ema-pruned (`model_ema.decay`,
  `model_ema.num_updates`, `loss.*`) are skipped, as A1111 does. A diffusers AutoencoderKL weights file
  (`down_blocks` names) is renamed by the rules of fastsd/convert.py.
- A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.*); config.json's values are
  checked (types, ranges, SD's block types and silu) before anything is built from them.
- TAESD (`taesd:PATH`, or recognised by its keys): a decoder file (`taesd_decoder.safetensors` / `.pth`,
  keys are nn.Sequential indices) with its encoder found beside it by name (`taesd_encoder.*`; without
  one, TAESD decodes only); a folder holding them; a diffusers AutoencoderTiny folder or weights file
  (`decoder.layers.N`).

The VAE must make the UNet's latent channels, and a diffusers folder must use the model's latent scaling
factor (an SDXL VAE folder says 0.13025). Loading is strict: missing, unexpected and wrong-shape keys are
named. Every error is a one-line CheckpointError.

A1111's "Automatic" VAE (its sd_vae option's default, modules/sd_vae.py): a checkpoint file NAME.safetensors with
a VAE file beside it runs that VAE instead of its own: NAME.vae.pt, NAME.vae.ckpt, NAME.vae.safetensors first (the
order of A1111's first find_vae_near_checkpoint), else, as A1111's later one, the first listed VAE file (the
checkpoint folder's `*.vae.{pt,ckpt,safetensors}`, the --vae-dir files; A1111's natural sort by name)
whose name starts with NAME (`vae_near_checkpoint`). `vae="none"` (A1111's "None") keeps the checkpoint's own.

A1111's models/VAE is fastsd's --vae-dir (default $FASTSD_VAE_DIR; `vae_folder`) for generate, batch and the server
alike: `listed_vaes` lists its files as A1111's refresh_vae_list does, `vae_by_name` finds the one its sd_vae option
names, and `cli_vae` turns the command lines' --vae (a path, a listed file's name or stem, or Automatic) into a file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastsd import convert
from fastsd.checkpoint import _folder_weights, _json, _names, detect_family, diffusers_vae, fill, mismatches
from fastsd.config import SDConfig, TAESDConfig, VAEConfig
from fastsd.models.taesd import TAESD
from fastsd.models.vae import AutoencoderKL
from fastsd.tensorfile import CheckpointError, TensorRef, read_tensor_file

TAESD_PREFIX = "taesd:"
AUTOMATIC, NONE = "automatic", "none"  # vae= / --vae keywords (any case): A1111's sd_vae "Automatic" and "None"
NEAR_SUFFIXES = (".vae.pt", ".vae.ckpt", ".vae.safetensors")  # A1111's VAE beside a checkpoint, in its order
WEIGHT_EXTS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")  # safetensors first
VAE_EXTS = (".safetensors", ".ckpt", ".pt")  # A1111's models/VAE files
VAE_DIR_ENV = "FASTSD_VAE_DIR"  # --vae-dir's default
IGNORED = re.compile(r"^(loss|model_ema)\.")
TAESD_KEY = re.compile(r"^((encoder|decoder)\.)?(layers\.)?\d+\.")


@dataclass
class VAESource:
    """A VAE found and checked, not read yet."""

    kind: str                          # "kl" (AutoencoderKL) or "taesd"
    config: VAEConfig | TAESDConfig
    refs: dict[str, TensorRef]         # under fastsd's module names
    name: str                          # the infotext's "VAE": file name with extension, or folder name
    path: str | None                   # the file behind the infotext's "VAE hash"; None for folders
    origin: str                        # what the user named, for messages

    def module(self) -> nn.Module:
        """The model, built on the meta device (no memory) until `build` fills it."""
        with torch.device("meta"):
            if self.kind == "kl":
                return AutoencoderKL(self.config)
            return TAESD(self.config, with_encoder=any(k.startswith("encoder.") for k in self.refs))

    def build(self, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return fill(self.module(), self.refs, dtype=dtype, device=device).requires_grad_(False)


class AutomaticVAE(UserWarning):
    """The note load_pipeline gives when a VAE file beside the checkpoint replaces its own (A1111's "Automatic");
    fastsd's command lines print it as one `fastsd: ...` line (fastsd.cli.one_line_warnings)."""

    notice = True


def vae_keyword(spec) -> str | None:
    """AUTOMATIC or NONE when `spec` is one of those words (any case; a file of that name is "./none"), else None."""
    word = spec.strip().lower() if isinstance(spec, str) else None
    return word if word in (AUTOMATIC, NONE) else None


def natural_key(name: str) -> list:
    """A1111's shared.natural_sort_key: digits compared as numbers, the rest without case."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def vaes_beside(checkpoint: str | None) -> dict[str, str]:
    """{file name: path} of the VAE files A1111 lists from a checkpoint's folder: its `*.vae.pt` / `.vae.ckpt` /
    `.vae.safetensors` files (extension in any case; hidden files and the checkpoint itself left out), in A1111's
    natural order by name. {} for no file (a folder, random:...)."""
    if not checkpoint or not os.path.isfile(checkpoint):
        return {}
    folder = os.path.dirname(os.path.abspath(checkpoint))
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    me = os.path.basename(checkpoint)
    found = {f: os.path.join(os.path.dirname(checkpoint), f) for f in names
             if f.lower().endswith(NEAR_SUFFIXES) and not f.startswith(".") and f != me
             and os.path.isfile(os.path.join(folder, f))}
    return {f: found[f] for f in sorted(found, key=natural_key)}


def vae_near_checkpoint(checkpoint: str | None, listed: dict[str, str] | None = None) -> str | None:
    """A1111's "Automatic" VAE of the checkpoint file `checkpoint`: NAME.vae.pt, .vae.ckpt, .vae.safetensors beside
    it (NAME: its file name without the last extension, as A1111's), else the first by A1111's natural order of
    the files beside it (`vaes_beside`) and `listed` ({file name: path}, the server's --vae-dir) whose name starts
    with NAME; None without one, or for a model that is no file."""
    if not checkpoint or not os.path.isfile(checkpoint):
        return None
    folder, stem = os.path.dirname(checkpoint), os.path.basename(checkpoint).rsplit(".", 1)[0]
    for suffix in NEAR_SUFFIXES:
        path = os.path.join(folder, stem + suffix)
        if os.path.isfile(path) and not os.path.samefile(path, checkpoint):
            return path
    found = {**(listed or {}), **vaes_beside(checkpoint)}
    return next((found[n] for n in sorted(found, key=natural_key) if n.startswith(stem)
                 and not (os.path.exists(found[n]) and os.path.samefile(found[n], checkpoint))), None)


def listed_vaes(folder: str | None, model_dirs=()) -> dict[str, str]:
    """{file name: path} of the VAE files A1111 lists (its refresh_vae_list's vae_dict): the checkpoints' folders'
    `<name>.vae.*` files (here `model_dirs`, the model files' folders), then the VAE folder's (`folder`, --vae-dir),
    subfolders searched; read at each call, in A1111's natural order by name; of two files with one name the first
    found wins."""
    from fastsd.files import files_by_stem

    found: dict[str, str] = {}
    for d in model_dirs:
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            if f.lower().endswith(NEAR_SUFFIXES) and not f.startswith("."):
                found.setdefault(f, os.path.join(d, f))
    for f, path in files_by_stem(folder, VAE_EXTS, by_name=True).items():
        found.setdefault(f, path)
    return {f: found[f] for f in sorted(found, key=natural_key)}  # (A1111's natural order)


def vae_by_name(name: str, have: dict[str, str]) -> str | None:
    """The listed file (`have`: `listed_vaes`) that the sd_vae value `name` names: its file name (A1111's vae_dict
    key), or its name without the extension when one file alone has it; None otherwise."""
    if name in have:
        return have[name]
    stems = [p for n, p in have.items() if os.path.splitext(n)[0] == name]
    return stems[0] if len(stems) == 1 else None


def vae_folder(folder: str | None, flag: str = "--vae-dir") -> str | None:
    """The VAE folder (A1111's models/VAE): `folder` (given as `flag`), else $FASTSD_VAE_DIR, else None. One that is
    no folder or can't be read: ValueError, one line."""
    if folder is None and os.environ.get(VAE_DIR_ENV):
        flag, folder = f"${VAE_DIR_ENV}", os.environ[VAE_DIR_ENV]
    if folder is None:
        return None
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder"))
    try:
        os.listdir(folder)
    except OSError as e:
        raise ValueError(f"{flag} {folder}: can't be read ({e.strerror})") from None
    return folder


def cli_vae(spec: str | None, model: str, folder: str | None) -> tuple[str | None, str | None]:
    """(vae, note): what the command lines' --vae `spec` (None: A1111's "Automatic") gives load_pipeline for the model
    `model`, the VAE folder `folder` (`vae_folder`) listed with the VAE files beside a model file as the server lists
    them (`listed_vaes`). "none", taesd:PATH and an existing file or folder: as they are. Automatic: the file
    `vae_near_checkpoint` picks when it is another than the one beside the checkpoint that load_pipeline finds (and
    says) itself, with `note`, the line that says so. Else a listed file's name or stem (A1111's sd_vae, as the
    server's `vae_by_name`); a name none has is a ValueError, one line naming the listed files (where A1111's falls
    back to None), but with no VAE folder and no file listed resolve_vae says "no such file or folder" as before."""
    word = AUTOMATIC if spec is None else vae_keyword(spec)
    if word == NONE or (word is None and (spec.startswith(TAESD_PREFIX) or os.path.exists(spec))):
        return spec, None
    checkpoint = model if os.path.isfile(model) else None
    have = listed_vaes(folder, [os.path.dirname(os.path.abspath(checkpoint))] if checkpoint else [])
    if word == AUTOMATIC:
        near = vae_near_checkpoint(checkpoint, have)
        if near is None or near == vae_near_checkpoint(checkpoint):
            return spec, None
        return near, automatic_note(os.path.basename(near), "in --vae-dir, named as the model")
    found = vae_by_name(spec, have)
    if found is not None or (folder is None and not have):
        return found or spec, None
    names = list(have)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    where = f"the VAE folder {folder} or beside the model" if folder else "beside the model (no --vae-dir)"
    raise ValueError(f"--vae {spec}: no such file or folder, and no VAE file of that name (file name or stem) in "
                     f"{where}; listed: {shown or 'none'}")


def automatic_vae(checkpoint: str | None, model: SDConfig, listed: dict[str, str] | None = None) -> VAESource | None:
    """The VAE A1111's "Automatic" runs the checkpoint file `checkpoint` with (`vae_near_checkpoint`), found and
    checked to fit `model` (headers only); None when there is none. A file that does not fit: CheckpointError, one
    line naming it and the way out."""
    near = vae_near_checkpoint(checkpoint, listed)
    if near is None:
        return None
    try:
        return resolve_vae(near, model)
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"{str(e) or type(e).__name__} (the VAE file beside the model, which A1111's "
                              "\"Automatic\" loads in place of the checkpoint's own: --vae none keeps the checkpoint's "
                              "own, --vae FILE loads another)") from None


def automatic_note(name: str, where: str = "beside the model") -> str:
    """The one line saying a VAE file replaces the checkpoint's own by A1111's "Automatic" rule."""
    return f"VAE {name} {where} (A1111's \"Automatic\"); --vae none uses the checkpoint's own"


def resolve_vae(spec: str, model: SDConfig) -> VAESource | None:
    """Find what `spec` names (a file, a folder, or taesd:PATH) and check it fits `model`; reads headers only.
    "none" (NONE, A1111's "None": the checkpoint's own VAE) names nothing to load: None. "automatic" needs the
    checkpoint (load_pipeline resolves it: `automatic_vae`)."""
    if not isinstance(spec, str):
        raise TypeError(f"vae must be a string (a file, a folder or taesd:PATH), got {type(spec).__name__}")
    word = vae_keyword(spec)
    if word == NONE:
        return None
    if word == AUTOMATIC:
        raise CheckpointError(f"vae {spec!r} (A1111's \"Automatic\": the VAE file beside the checkpoint) is chosen "
                              "with the checkpoint: give it to load_pipeline, or leave --vae out")
    taesd = spec == "taesd" or spec.startswith(TAESD_PREFIX)
    path = spec[len(TAESD_PREFIX):] if spec.startswith(TAESD_PREFIX) else ("" if taesd else spec)
    if not path and taesd:
        raise CheckpointError("taesd needs a path: --vae taesd:FILE (taesd_decoder.safetensors or .pth), or a folder")
    if not path.strip():
        raise CheckpointError("an empty VAE path: give a VAE file, a diffusers VAE folder or taesd:PATH")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    src = _from_folder(Path(path), taesd, model) if os.path.isdir(path) else _from_file(path, taesd)
    latent = src.config.embed_dim if src.kind == "kl" else src.config.latent_channels
    if latent != model.unet.out_channels:
        raise CheckpointError(f"{path}: this VAE has {latent} latent channels but the model's UNet makes "
                              f"{model.unet.out_channels} (a VAE for another model family?)")
    if src.kind == "kl":  # the latents' scale belongs to the UNet's latent space: the model's
        src.config = dataclasses.replace(src.config, scale_factor=model.vae.scale_factor)
    problems = [p for p in mismatches(src.module(), src.refs) if p]
    if problems:
        what = "TAESD" if src.kind == "taesd" else "VAE"
        raise CheckpointError(f"{path}: {what} weights do not fit the model: " + "; ".join(problems))
    return src


# ---- folders -------------------------------------------------------------------------------------------

def _from_folder(root: Path, taesd: bool, model: SDConfig) -> VAESource:
    if (root / "config.json").exists():
        cfg = _json(root / "config.json")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{root / 'config.json'}: a JSON {type(cfg).__name__}, not a diffusers config")
        cls = cfg.get("_class_name")
        if cls == "AutoencoderTiny":
            return _taesd_diffusers_folder(root, cfg)
        if cls == "AutoencoderKL" and not taesd:
            vcfg, refs = diffusers_vae(root)  # (its values checked: check_kl_config)
            if abs(vcfg.scale_factor - model.vae.scale_factor) > 1e-6:
                raise CheckpointError(f"{root}: its scaling_factor {vcfg.scale_factor} is not the model's "
                                      f"{model.vae.scale_factor} (an SDXL VAE? SD1.x VAEs use 0.18215)")
            return VAESource("kl", vcfg, refs, root.name, None, str(root))
        want = "a TAESD (AutoencoderTiny)" if taesd else "a VAE (AutoencoderKL or AutoencoderTiny)"
        raise CheckpointError(f"{root}: a diffusers {cls} folder, not {want}")
    decoder = _first_file(root, "taesd_decoder")
    if decoder is not None:
        return _taesd_files(decoder)
    if _first_file(root, "taesd_encoder") is not None:
        raise CheckpointError(f"{root}: a TAESD encoder, and no decoder beside it (taesd_decoder.safetensors/.pth)")
    raise CheckpointError(f"{root}: no VAE in this folder (no config.json of a diffusers AutoencoderKL or "
                          "AutoencoderTiny, no taesd_decoder.safetensors/.pth)")


def _taesd_diffusers_folder(root: Path, cfg: dict) -> VAESource:
    for key, want in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2),
                      ("shift_factor", 0.0)):
        if (cfg.get(key) or want) != want:
            raise CheckpointError(f"{root}: an AutoencoderTiny with {key} {cfg[key]!r}; fastsd runs TAESD's {want!r}")
    scale = 1.0 if cfg.get("scaling_factor") is None else cfg["scaling_factor"]  # (AutoencoderTiny's default)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{root}: scaling_factor {scale!r} in config.json is not a finite positive number "
                              "(TAESD's is 1.0)")
    refs = convert.rename(_folder_weights(root, ("diffusion_pytorch_model",)), convert.TAESD_RULES)
    return _taesd_source(refs, root.name, None, str(root), scale=float(scale))


def _first_file(folder: Path, stem: str) -> str | None:
    for ext in WEIGHT_EXTS:
        if (folder / (stem + ext)).is_file():
            return str(folder / (stem + ext))
    return None


# ---- files ---------------------------------------------------------------------------------------------

def _from_file(path: str, taesd: bool) -> VAESource:
    refs = read_tensor_file(path)
    keys = list(refs)
    if keys and (any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys)
                 or all(TAESD_KEY.match(k) for k in keys)):
        return _taesd_files(path, refs)
    if taesd:
        raise CheckpointError(f"{path}: not a TAESD file (tensors such as {_names(keys, 3)})")
    return _kl_file(path, refs)


def _taesd_files(path: str, refs: dict[str, TensorRef] | None = None) -> VAESource:
    """A TAESD file: both halves in one (diffusers' or fastsd's names), or one half of the original pair,
    whose other half is looked for beside it under the same name with encoder/decoder swapped."""
    refs = read_tensor_file(path) if refs is None else refs
    if any(k.startswith(("encoder.", "decoder.")) for k in refs):
        return _taesd_source(convert.rename(refs, convert.TAESD_RULES), os.path.basename(path), path, path)
    role = "encoder" if "0.weight" in refs else "decoder"  # the decoder's index 0 is the parameter-free Clamp
    other = _partner(path, role)
    if role == "encoder":
        if other is None:
            raise CheckpointError(f"{path}: a TAESD encoder, and no decoder beside it (the same name with "
                                  "'decoder'); TAESD needs its decoder")
        enc, dec, dec_path = refs, read_tensor_file(other), other
    else:
        enc, dec, dec_path = (read_tensor_file(other) if other else {}), refs, path
    named = {**{"decoder." + k: v for k, v in dec.items()}, **{"encoder." + k: v for k, v in enc.items()}}
    return _taesd_source(named, os.path.basename(dec_path), dec_path, path)


def _partner(path: str, role: str) -> str | None:
    folder, stem = os.path.dirname(path), Path(path).name
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    if role not in stem:
        return None
    other = ("encoder" if role == "decoder" else "decoder").join(stem.rsplit(role, 1))
    return _first_file(Path(folder), other)


def _taesd_source(refs: dict[str, TensorRef], name: str, path: str | None, origin: str,
                  scale: float = 1.0) -> VAESource:
    try:
        cfg = convert.taesd_config_from_keys(refs, scale)
    except CheckpointError as e:
        raise CheckpointError(f"{origin}: {e}") from None
    return VAESource("taesd", cfg, refs, name, path, origin)


def _kl_file(path: str, refs: dict[str, TensorRef]) -> VAESource:
    keys = list(refs)
    if any(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in keys):
        raise CheckpointError(f"{path}: a full Stable Diffusion checkpoint, not a VAE file (use it as --model)")
    vae = {k.removeprefix("first_stage_model."): v for k, v in refs.items()}
    vae = {k: v for k, v in vae.items() if not IGNORED.match(k)}
    if any(k.startswith("decoder.up_blocks.") for k in vae):  # a diffusers AutoencoderKL weights file
        levels = convert._count(vae, r"decoder\.up_blocks\.(\d+)\.")
        vae = convert.vae_attention_as_conv(convert.rename(vae, convert.vae_rules(VAEConfig(ch_mult=(1,) * levels))))
    if "post_quant_conv.weight" not in vae or not any(k.startswith("decoder.") for k in vae):
        family = detect_family(keys)
        found = f"this is {family}" if family else f"tensors such as {_names(keys, 3)}"
        raise CheckpointError(f"{path}: not a VAE file ({found})")
    try:
        cfg = convert.vae_config_from_ldm(vae)
    except KeyError as e:
        raise CheckpointError(f"{path}: not a complete VAE (no {e.args[0]})") from None
    except CheckpointError as e:  # (a config's tensor of a wrong shape)
        raise CheckpointError(f"{path}: not a VAE of Stable Diffusion 1.x ({e})") from None
    return VAESource("kl", cfg, vae, os.path.basename(path), path, path)
