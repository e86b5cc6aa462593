"""Random LoRA files for tests and benchmarks, in each format fastsd reads (never imported at run time).

Formats: "kohya_ldm" (`lora_unet_input_blocks_1_1_proj_in.lora_down.weight`, LDM paths), "kohya_diffusers"
(`lora_unet_down_blocks_0_attentions_0_proj_in...`, what kohya's sd-scripts write for SD1.x), "peft"
(`unet.<path>.lora_A.weight`, alphas in diffusers' `lora_adapter_metadata` header) and "diffusers"
(`unet.<path>.lora.down.weight`, text encoder `...lora_linear_layer.down.weight`). Convolutions get LoCon
factors: down (r, in, k, k), up (out, r, 1, 1). The diffusers paths come from diffusers' own converter
(`diffusers_names`), never from fastsd's rules, so a test of those rules has an independent reference.
DoRA magnitudes (PEFT's `lora_magnitude_vector`, kohya / LyCORIS `dora_scale`) and PEFT's `lora_B.bias` on request.
Single layers of LyCORIS' GLoRA and IA3 (`glora_factors`, `ia3_factors`) under kohya names (`kohya_key`).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from torch import nn

from fastsd.backends.cpu_pack import dense_weight

FORMATS = ("kohya_ldm", "kohya_diffusers", "peft", "diffusers")


def layers_of(model: nn.Module) -> list[str]:
    """The names of a model's LoRA-able layers (Linear, Conv2d)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def diffusers_names(pipe) -> dict[str, str]:
    """fastsd (LDM) UNet layer name -> diffusers layer name. The UNet twin (fastsd.testing.unet_twin: diffusers'
    convert_ldm_unet_checkpoint over fastsd's state dict) holds fastsd's own tensors, so each layer is matched
    by its weight's storage. Needs a pipeline whose weights the twin does not copy: backend "torch"."""
    from fastsd.testing import unet_twin

    twin = unet_twin(pipe)
    by_ptr = {twin.get_submodule(n).weight.data_ptr(): n for n in layers_of(twin)}
    out = {n: by_ptr.get(pipe.unet.get_submodule(n).weight.data_ptr()) for n in layers_of(pipe.unet)}
    missing = [n for n, d in out.items() if d is None]
    if missing:
        raise RuntimeError(f"layers the diffusers twin copied instead of sharing (backend torch needed): {missing[:3]}")
    return out


def _factors(weight: torch.Tensor, rank: int, scale: float, strength: float, g: torch.Generator):
    """Random (down, up) whose update scale * up @ down has about `strength` times the weight's spread."""
    k = tuple(weight.shape[2:])
    down = torch.randn(rank, weight.shape[1], *k, generator=g)
    std = strength * weight.float().std().item() / (scale * rank ** 0.5)
    up = torch.randn(weight.shape[0], rank, *((1, 1) if k else ()), generator=g) * std
    return down, up


def _keys(fmt: str, model: str, path: str) -> tuple[str, str, str | None]:
    """(down key, up key, alpha key or None) of one layer; `path` as the format names it."""
    if fmt.startswith("kohya"):
        base = ("lora_unet_" if model == "unet" else "lora_te_") + path.replace(".", "_")
        return base + ".lora_down.weight", base + ".lora_up.weight", base + ".alpha"
    prefix = "unet." if model == "unet" else "text_encoder."
    if fmt == "peft":
        return f"{prefix}{path}.lora_A.weight", f"{prefix}{path}.lora_B.weight", None
    mid = ".lora." if model == "unet" else ".lora_linear_layer."
    return f"{prefix}{path}{mid}down.weight", f"{prefix}{path}{mid}up.weight", None


def _dora_magnitudes(weight: torch.Tensor, update: torch.Tensor, form: str, g: torch.Generator) -> torch.Tensor:
    """DoRA magnitudes near the norms of weight + update (times 1 +- 0.1 noise), shaped as `form` writes them:
    "peft" (out,) for a linear, (1, out, 1, 1) for a convolution; kohya / LyCORIS "rows" (out, 1, ...) and
    "columns" (1, in, ...)."""
    v = weight.float() + update
    cols = form == "columns"
    norms = (v.transpose(0, 1) if cols else v).flatten(1).norm(dim=1)
    norms = norms * (1 + 0.1 * torch.randn(norms.shape, generator=g))
    ones = (1,) * (v.dim() - 2)
    if form == "peft":
        return norms.reshape(1, -1, 1, 1) if v.dim() == 4 else norms
    return norms.reshape(1, -1, *ones) if cols else norms.reshape(-1, 1, *ones)


def set_metadata(path: str, metadata: dict[str, str]) -> None:
    """Give a .safetensors LoRA file this `__metadata__` (kohya's ss_* keys: ss_output_name is A1111's alias)."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata=metadata)


def write_random_lora(path: str, pipe, *, fmt: str, rank: int = 4, alpha: float | None = None,
                      layers: list[str] | None = None, text_encoder: bool = True, names: dict[str, str] | None = None,
                      seed: int = 0, strength: float = 0.3, dtype: torch.dtype = torch.float32,
                      dora: str | None = None, bias: bool = False) -> int:
    """Write a LoRA of random factors for pipe's UNet `layers` (fastsd names; default: all) and, with
    `text_encoder`, every text encoder linear; alpha None writes no alpha (scale 1). "kohya_diffusers",
    "peft" and "diffusers" need `names` = diffusers_names(pipe). `dora`: DoRA magnitudes for every layer, "peft"
    (fmt "peft": lora_magnitude_vector) or "rows" / "columns" (kohya: dora_scale (out, 1, ...) / (1, in, ...));
    `bias` (fmt "peft"): a random lora_B.bias for every layer that has a bias. Returns the number of layers
    written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; one of {FORMATS}")
    if ((dora == "peft" or bias) and fmt != "peft") or (dora in ("rows", "columns") and not fmt.startswith("kohya")):
        raise ValueError(f"dora={dora!r}, bias={bias} do not go with format {fmt!r}")
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 if alpha is None else alpha / rank
    targets = [("unet", n) for n in (layers if layers is not None else layers_of(pipe.unet))]
    if text_encoder:
        targets += [("clip", n) for n in layers_of(pipe.clip)]
    sd, meta, paths = {}, None, {"unet": [], "clip": []}
    for model, name in targets:
        weight = dense_weight(getattr(pipe, model).get_submodule(name))  # the CPU path's may be packed
        down, up = _factors(weight, rank, scale, strength, g)
        path_ = name if model == "clip" or fmt == "kohya_ldm" else names[name]
        paths[model].append(path_.removeprefix("text_model."))  # PEFT matches name ends (transformers 5 has no text_model)
        kd, ku, ka = _keys(fmt, model, path_)
        sd[kd], sd[ku] = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        if ka is not None and alpha is not None:
            sd[ka] = torch.tensor(float(alpha), dtype=dtype)
        layer_key = kd.removesuffix(".lora_down.weight").removesuffix(".lora_A.weight")
        if dora:
            update = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
            magnitudes = _dora_magnitudes(weight, update, dora, g)
            sd[layer_key + (".lora_magnitude_vector" if dora == "peft" else ".dora_scale")] = magnitudes.to(dtype)
        if bias and getattr(pipe, model).get_submodule(name).bias is not None:
            sd[layer_key + ".lora_B.bias"] = (torch.randn(weight.shape[0], generator=g) * strength).to(dtype)
    if fmt != "kohya_ldm" and fmt != "kohya_diffusers" and alpha is not None:
        if fmt != "peft":
            raise ValueError("the diffusers (non-PEFT) format has no alphas")
        cfg = {f"{prefix}.{k}": v for model, prefix in (("unet", "unet"), ("clip", "text_encoder")) if paths[model]
               for k, v in (("r", rank), ("lora_alpha", alpha), ("target_modules", paths[model]),
                            ("use_dora", dora == "peft"), ("lora_bias", bias))}
        meta = {"lora_adapter_metadata": json.dumps(cfg)}
    save_file(sd, path, metadata=meta)
    return len(targets)


def kohya_key(model: str, name: str) -> str:
    """The kohya (LDM path) name of fastsd layer `name` of `model` ("unet" / "clip"): lora_unet_<path> / lora_te_<path>,
    to which a file appends `.lora_down.weight`, `.alpha`, ..."""
    return ("lora_unet_" if model == "unet" else "lora_te_") + name.replace(".", "_")


def glora_factors(weight: torch.Tensor, rank: int, g: torch.Generator, *, layout: str = "first",
                  alpha: float | None = None, strength: float = 0.2) -> dict[str, torch.Tensor]:
    """Random LyCORIS GLoRA tensors for a layer of `weight` (a linear's, or a 1x1 convolution's: 4-d (..., 1, 1)
    factors, as LyCORIS' Conv2d modules hold them), by their key suffix (`a1.weight`, ...; `alpha` when given).
    layout "first" (LyCORIS' first GLoRA, the one A1111's network_glora reads): a1 (r, in), a2 (in, r), b1 (r, in),
    b2 (out, r); "lycoris3" (LyCORIS 3's glora.py): a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in)."""
    out, inp = weight.shape[:2]
    shapes = ({"a1": (rank, inp), "a2": (inp, rank), "b1": (rank, inp), "b2": (out, rank)} if layout == "first" else
              {"a1": (inp, rank), "a2": (rank, inp), "b1": (out, rank), "b2": (rank, inp)})
    ones = (1, 1) if weight.dim() == 4 else ()
    sd = {f"{k}.weight": torch.randn(*shape, *ones, generator=g) * strength / shape[1] ** 0.5
          for k, shape in shapes.items()}
    if alpha is not None:
        sd["alpha"] = torch.tensor(float(alpha))
    return sd


def ia3_factors(weight: torch.Tensor, g: torch.Generator, *, on_input: bool = False,
                strength: float = 0.3) -> dict[str, torch.Tensor]:
    """Random LyCORIS IA3 tensors for a layer of `weight`: `weight` (C,) for a linear, (1, C, 1, 1) for a
    convolution (C its output channels, or input ones when on_input), `on_input` as LyCORIS writes it."""
    c = weight.shape[1 if on_input else 0]
    v = torch.randn(c, generator=g) * strength
    return {"weight": v.reshape(1, c, 1, 1) if weight.dim() == 4 else v, "on_input": torch.tensor(int(on_input))}
