"""LoRA files: read them, map their layers onto fastsd's modules, merge them into the weights; A1111's
`<lora:NAME:WEIGHT>` prompt syntax.

Formats (`.safetensors`; `.pt` / `.ckpt` only through torch.load(weights_only=True)):
- kohya / A1111: `lora_unet_<path>` / `lora_te_<path>` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`, with
  <path> a module path written with `_` for `.`, in LDM names (`input_blocks_7_1_proj_in`) or diffusers names
  (`down_blocks_1_attentions_0_proj_in`); LyCORIS LoCon on convolutions: lora_down (r, in, k, k), lora_up
  (out, r, 1, 1);
- diffusers / PEFT: `unet.<path>` / `text_encoder.<path>` + `.lora_A.weight` / `.lora_B.weight`,
  `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight`, and the first diffusers files'
  `<path>.processor.to_q_lora.down.weight`; PEFT's alphas come from the `lora_adapter_metadata` header that
  diffusers writes (without it alpha = rank);
- ComfyUI's LoraSave: `diffusion_model.<LDM path>` / `text_encoders.clip_l.transformer.<path>` + lora_up / lora_down,
  `diff_b` beside them (bias += weight * diff_b, no alpha), a norm layer's 1-d `diff` / `diff_b` (as LyCORIS 'norm');
  the text encoder's embedding tables take changes too; CLIP's text_projection (SD1 never reads it) is not read.

Names are mapped by rule: diffusers paths go through the loader's diffusers -> LDM rules (fastsd.convert), and
every path is then compared with the model's own module names, `_` standing for `.`. `lora_te1_` names SD1's text
encoder too (as A1111 and diffusers read it). A 4-channel change of an inpainting model's 9-channel first convolution
is zero-padded to its 9 input channels, as A1111 does.

- LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`) and LoKr (`lokr_w1` or `lokr_w1_a` / `_b`,
  `lokr_w2` or `lokr_w2_a` / `_b`) under the kohya names, as A1111 merges them, and the CP (Tucker) cores of
  LyCORIS' convolutions: LoCon's `lora_mid`, LoHa's `hada_t1` / `hada_t2`, LoKr's `lokr_t2`.
- LyCORIS 'full' (`diff`, and `diff_b` for the bias) as A1111's network_full: W <- W + weight * diff,
  b <- b + weight * diff_b (no alpha).
- LyCORIS 'norm' (`w_norm`, `b_norm`: what its train_norm adds for the GroupNorm / LayerNorm layers) as A1111's
  network_norm: the norm's scale and bias += weight * w_norm / b_norm (no alpha).
- DoRA: PEFT's `lora_magnitude_vector` beside lora_A / lora_B (as diffusers' load_lora_weights + fuse_lora), and
  LyCORIS' `dora_scale` beside any of its kinds' factors (as A1111); the norms run per output row or per input
  column as the magnitudes' shape says (see _dora_form and merged_weight).
- PEFT's LoRA biases (`lora_B.bias`, PEFT's lora_bias): b <- b + weight * scale * lora_B.bias.
- OFT as A1111's network_oft: kohya's (`oft_unet_<path>` + `oft_blocks`, `alpha` the constraint) and LyCORIS'
  (`oft_blocks`, optional `rescale`; the first versions' `oft_diag`) on linears and convolutions, BOFT (4-d
  `oft_blocks`) too: W <- W + weight * (W' - W), W' = W with its rows turned by orthogonal blocks (_oft_delta).
  LyCORIS IA3 (`weight`, `on_input`) as A1111's network_ia3: W <- W + weight * W * w, w per output row (per input
  column when on_input); on convolutions (w (1, C, 1, 1), which A1111's broadcast fails on) per output / input
  channel, as LyCORIS defines it. LyCORIS GLoRA in its first layout (`a1.weight` (r, in), `a2.weight` (in, r),
  `b1.weight` (r, in), `b2.weight` (out, r), `alpha`) as A1111's network_glora: W <- W + weight * (b2 b1 + W a2 a1),
  at scale 1 (A1111 reads no alpha for it); on 1x1 convolutions too (flattened, as LyCORIS; A1111 fails there);
  LyCORIS 3's layout, which A1111 can't merge, is refused. These three read the weight they change, so several
  files on one layer merge in load order, as A1111's.
- A layer's `scale` tensor (A1111's network.py) replaces its alpha / dim, for every kind but OFT (A1111 fixes OFT's
  at 1). kohya's DyLoRA files are plain LoRA files (their rows saved whole): merged at full rank, A1111's default.

Textual-inversion embeddings a file bundles (A1111's `bundle_emb.NAME.<key>`: `string_to_param.*` as kohya's and
HCP-Diffusion's bundling scripts write an A1111 .pt's, `emb_params`, or one tensor under any key such as OneTrainer's
`clip_l`) are grouped by NAME as A1111's networks.py does, each read as an embedding file of NAME would be
(fastsd.embeddings, checked against the text encoder), and usable in prompts while the LoRA is loaded. One of
another width (an SD2 one) is skipped with a warning, the rest of the file loaded, as A1111 skips it.

Merging: W <- W + weight * scale * up @ down, scale = alpha / rank (1 without alpha), in fp32 and rounded once
to the model's dtype, so generating costs nothing extra. The file is read and checked whole (every layer found,
every shape right) before a weight changes; the weights and biases a LoRA replaces are kept, so `unload` gives
back the original tensors themselves, bit for bit, without reading the checkpoint again.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from fastsd.backends.cpu_pack import dense_weight
from fastsd.convert import UNDERSCORED_UNET_BLOCKS, rename_key, unet_rules
from fastsd.embeddings import Embedding, OtherWidth, embedding_vectors, pipeline_embeddings
from fastsd.file_hashes import sha256
from fastsd.settings import check_bool, plain
from fastsd.tensorfile import CheckpointError, TensorRef, read_header, read_tensor_file, safetensors_metadata

LORA_EXTS = (".safetensors", ".pt", ".ckpt")
LORA_DIR_ENV = "FASTSD_LORA_DIR"
Weight = float | tuple[float, float]  # a LoRA's multiplier for both models, or (text encoder, UNet)
FP32_MAX = float(torch.finfo(torch.float32).max)  # a scale beyond it can't go into the fp32 merge (NaN fails too)
MERGE_BLOCK_BYTES = 1 << 20  # fp32 scratch per block of output rows while merging (about an L2 cache)
MAX_WEIGHT = 1000.0  # the largest |weight| taken: A1111 takes any number, but so far past the usual -5..5 a merge
                     # only gives noise or overflows the weights

# The key of one tensor = <layer><suffix>; the suffix tells which factor it is.
PARTS = [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
         (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
         (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
         ("_lora.down.weight", "down"), ("_lora.up.weight", "up"), (".alpha", "alpha"),
         (".lora_mid.weight", "mid"),  # LyCORIS LoCon's CP (Tucker) core
         (".lora_B.bias", "up_bias"),  # PEFT's lora_bias: the bias's change, up's bias (times weight * scale)
         (".diff", "diff"), (".diff_b", "diff_b"),  # LyCORIS 'full': the whole weight's and bias's change
         (".dora_scale", "dora_scale"), (".lora_magnitude_vector", "magnitude"),  # DoRA: LyCORIS / kohya, PEFT
         (".w_norm", "w_norm"), (".b_norm", "b_norm"),  # LyCORIS 'norm' (train_norm): a norm layer's scale, bias
         (".oft_blocks", "oft_blocks"), (".oft_diag", "oft_diag"), (".rescale", "rescale"),  # OFT / BOFT
         (".on_input", "on_input"),  # LyCORIS IA3 (with `weight`, below)
         (".scale", "scale")]  # A1111's network.py: a layer's scale, in place of alpha / dim (not for OFT)
GLORA = ("a1", "a2", "b1", "b2", "bm")  # LyCORIS GLoRA's factors (`a1.weight` ...; `bm`: LyCORIS 3's Tucker core)
HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")  # LyCORIS LoHa's factors
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")  # LyCORIS LoKr's (whole or a @ b)
CORES = ("hada_t1", "hada_t2", "lokr_t2")  # LyCORIS' CP (Tucker) cores of a convolution's factors
BIAS_CHANGES = ("up_bias", "diff_b", "b_norm")  # a bias's change (LoRA, full, norm)
EXTRAS = (*BIAS_CHANGES, "dora_scale", "magnitude")  # a bias's change, DoRA's magnitudes: beside the factors
PARTS += [(f".{k}", k) for k in HADA + LOKR + CORES] + [(f".{k}.weight", f"glora_{k}") for k in GLORA]
PARTS.append((".weight", "weight"))  # LyCORIS IA3's vector: read so only in files with IA3's `on_input` keys
# <layer> = <prefix><path>: which model, and whether the path is kohya's (underscored) or dotted.
# `lora_te1_`: SD1 files named as SDXL's first text encoder (A1111 and diffusers read them so; SDXL's have lora_te2_);
# `diffusion_model.` / `text_encoders.clip_l.transformer.`: ComfyUI's (its LoraSave: LDM and transformers paths).
PREFIXES = [("lora_unet_", "unet"), ("lora_te_", "clip"), ("lora_te1_", "clip"), ("unet.", "unet"),
            ("text_encoder.", "clip"), ("oft_unet_", "unet"),  # (kohya's OFT)
            ("diffusion_model.", "unet"), ("text_encoders.clip_l.transformer.", "clip")]
# The first diffusers LoRA files named attention processors, not layers (applied in order, each once).
OLD_DIFFUSERS = [(r"\.processor\.to_(q|k|v|out)$", r".to_\1"), (r"\.to_out$", ".to_out.0"),
                 (r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj"), (r"self_attn\.to_out\.0$", "self_attn.out_proj")]
BUNDLE = "bundle_emb."  # A1111's keys of the textual-inversion embeddings a LoRA file bundles: bundle_emb.NAME.<key>
# What some other kinds of network files hold, for the error message.
OTHER_KINDS = [(r"^lora_te2_|^text_encoder_2\.|^text_encoders\.clip_g\.|label_emb|add_embedding", "an SDXL LoRA"),
               (r"^model\.diffusion_model\.|^first_stage_model\.", "a full model checkpoint, not a LoRA")]


@dataclass(frozen=True)
class LoraLayer:
    """One layer's update, weight * scale * delta, on `module` of `model` ("unet" or "clip"). LoRA / LoCon:
    delta = up @ down; LyCORIS LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; LoKr: kron(w1, w2), each
    factor whole or as a @ b; LoCon with a CP core (`lora_mid`, kind "locon_cp"): up, mid's convolution, down;
    a LoHa product or LoKr's w2 with a core t: cp(t, a, b) (`factors`, with down and up None); LyCORIS 'full':
    delta = diff, scale 1 (A1111: no alpha); OFT / BOFT, IA3 and GLoRA: a change of the weight itself (`_oft_delta`,
    `_ia3_delta`, `_glora_delta`), scale 1. A file's `<layer>.scale` replaces any kind's scale but OFT's (A1111).

    Any kind's layer may also change the bias, bias += weight * scale * `bias` (PEFT's lora_B.bias; LyCORIS
    'full''s diff_b, scale 1), and be weight-decomposed (DoRA, `dora`: see merged_weight)."""

    model: str
    module: str          # fastsd (LDM) module name
    key: str             # the file's name for it, for messages
    down: torch.Tensor | None  # (r, in) or (r, in, kh, kw); fp32, or the file's fp16 / bf16
    up: torch.Tensor | None    # (out, r) or (out, r, 1, 1)
    scale: float
    kind: str = "lora"   # "lora", "locon_cp", "loha", "lokr", "full", "norm", "oft", "ia3" or "glora"
    factors: dict = field(default_factory=dict)  # the others' tensors by their key suffix (hada_w1_a, lokr_w1, ...)
    bias: torch.Tensor | None = None  # (out,) fp32: the bias's change
    dora: torch.Tensor | None = None  # fp32 DoRA magnitudes: (out,) per output row, or (in,) per input column
    dora_form: str = ""  # "peft" (rows, weight inside), "rows" or "columns" (A1111: weight on the change)
    bias_scale: float | None = None  # the bias change's scale where it is not `scale` (ComfyUI's diff_b: 1)
    inputs: int = 0  # the change's input channels where fewer than the layer's: zero-padded (A1111's inpainting rule)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """A LoCon-with-core / LoHa / LoKr / full / norm / OFT / IA3 update as a full fp32 tensor shaped like
        `weight`, the layer's weight as it is before this update (OFT and IA3 change it; the others only need its
        shape). With `inputs`, the change of the first `inputs` input channels, zeros for the others."""
        if self.inputs:
            change = self._delta(weight[:, :self.inputs])
            return nn.functional.pad(change, (0, 0, 0, 0, 0, weight.shape[1] - self.inputs))
        return self._delta(weight)

    def _delta(self, weight: torch.Tensor) -> torch.Tensor:
        f, shape = self.factors, tuple(weight.shape)
        if self.kind in ("oft", "ia3", "glora"):  # (changes that read the weight)
            w, f = weight.float(), {k: t.to(weight.device) for k, t in f.items()}
            return {"oft": _oft_delta, "ia3": _ia3_delta, "glora": _glora_delta}[self.kind](f, w)
        if self.kind in ("full", "norm"):
            return f["diff" if self.kind == "full" else "w_norm"].reshape(shape)
        if self.kind == "locon_cp":  # delta[o, c] = sum over n, m of up[o, n] mid[n, m] down[m, c] (per kernel tap)
            return torch.einsum("nmkl,on,mc->ockl", f["mid"], _flat(f["up"]), _flat(f["down"])).reshape(shape)
        if self.kind == "loha":
            prod = [(_cp(f[f"hada_t{i}"], f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]) if f"hada_t{i}" in f
                     else _flat(f[f"hada_w{i}_a"]) @ _flat(f[f"hada_w{i}_b"])).reshape(shape) for i in (1, 2)]
            return prod[0] * prod[1]
        w1 = f["lokr_w1"] if "lokr_w1" in f else _flat(f["lokr_w1_a"]) @ _flat(f["lokr_w1_b"])
        w2 = (f["lokr_w2"] if "lokr_w2" in f else _cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
              if "lokr_t2" in f else _flat(f["lokr_w2_a"]) @ _flat(f["lokr_w2_b"]))
        if w2.dim() == 4:  # a whole convolution factor (c, d, kh, kw): w1's entries scale its blocks
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(shape)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _oft_delta(f: dict, w: torch.Tensor) -> torch.Tensor:
    """A1111's network_oft change of weight w (fp32): the rows of w in blocks of b, each block B of them becomes
    R^T B (`oft_blocks` (n, b, b): R = (I + Q)(I - Q)^-1, Q = blocks - blocks^T scaled down to a norm of alpha * out
    when larger (alpha: the constraint, none without one); the first LyCORIS files' `oft_diag`: R itself); BOFT
    (`oft_blocks` (m, n, b, b)): m such stages, R B (not R^T) on rows permuted by stage (A1111's butterfly
    rearranges); then rows times `rescale`. Each stage's change (R - I) X is computed as such, R - I = 2Q(I - Q)^-1
    in float64, so the change keeps its precision however small it is next to w."""
    out, rows = w.shape[0], w.reshape(w.shape[0], -1)
    if "oft_diag" in f:
        blocks = f["oft_diag"]
        minus_i = blocks - torch.eye(blocks.shape[-1], device=w.device)
    else:
        q = (f["oft_blocks"] - f["oft_blocks"].transpose(-1, -2)).double()
        limit = float(f["alpha"]) * out if "alpha" in f else 0.0
        if limit != 0:
            norm = torch.linalg.vector_norm(q)
            q = q * ((norm.clamp(max=limit) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        minus_i = (2 * q @ torch.linalg.inv(eye - q)).float()
    if minus_i.dim() == 3:  # OFT: R^T per block of rows
        b = minus_i.shape[-1]
        delta = torch.einsum("knm,knx->kmx", minus_i, rows.reshape(-1, b, rows.shape[1])).reshape(rows.shape)
    else:  # BOFT: stage i pairs rows 2^i * b/2 apart ("(c g k) -> (c k g)"), R per block, pairs them back
        b, delta = minus_i.shape[-1], torch.zeros_like(rows)
        for i, stage in enumerate(minus_i):
            k = 2 ** i * (b // 2)
            x = rows.reshape(-1, 2, k, rows.shape[1]).transpose(1, 2).reshape(-1, b, rows.shape[1])
            change = torch.einsum("nij,njx->nix", stage, x).reshape(-1, k, 2, rows.shape[1]).transpose(1, 2)
            change = change.reshape(rows.shape)
            rows, delta = rows + change, delta + change
    if "rescale" in f:  # rescale * (w + delta) - w
        scale = f["rescale"].reshape(-1, 1)
        delta = delta * scale + w.reshape(out, -1) * (scale - 1)
    return delta.reshape(w.shape)


def _ia3_delta(f: dict, w: torch.Tensor) -> torch.Tensor:
    """A1111's network_ia3 change of a linear's weight w: w * v, v scaling each output row (each input column when
    `on_input`); a convolution's (v (1, C, 1, 1)) likewise per output (input) channel, as LyCORIS' IA3 defines it
    (A1111's broadcast fails there: it skips the layer)."""
    shape = [1] * w.dim()
    shape[1 if bool(f["on_input"].reshape(-1)[0]) else 0] = -1
    return w * f["weight"].reshape(shape)


def _glora_delta(f: dict, w: torch.Tensor) -> torch.Tensor:
    """A1111's network_glora change of weight w (a linear's, or a 1x1 convolution's flattened): b2 b1 + (w a2) a1."""
    a1, a2, b1, b2 = (_flat(f[f"glora_{k}"]) for k in ("a1", "a2", "b1", "b2"))
    return (b2 @ b1 + (_flat(w) @ a2) @ a1).reshape(w.shape)


def _cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP (Tucker) product: core t (r1, r2, kh, kw), a (r1, out), b (r2, in) -> (out, in, kh, kw),
    sum over i, j of a[i, o] t[i, j] b[j, c] (A1111's make_weight_cp)."""
    return torch.einsum("ijkl,io,jc->ockl", t, a, b)


@dataclass(frozen=True)
class LoraFile:
    path: str
    name: str            # the file stem: A1111's name for it in <lora:NAME:WEIGHT>
    layers: tuple[LoraLayer, ...]
    embeddings: tuple[tuple[str, torch.Tensor], ...] = ()  # the bundled embeddings: (NAME, checked vectors)


# ---- reading and mapping -------------------------------------------------------------------------------

def _split_key(key: str, ia3: bool = False) -> tuple[str, str] | None:
    """(layer, part) of a key; a bare `.weight` is a part only in a file with IA3 layers (`ia3`)."""
    for suffix, part in PARTS:
        if key.endswith(suffix) and (part != "weight" or ia3):
            return key[: -len(suffix)], part
    return None


def _target(layer: str) -> tuple[str, str] | None:
    """(model, path) of a file's layer name; None when its prefix names no SD1.x model."""
    for prefix, model in PREFIXES:
        if layer.startswith(prefix):
            return model, layer[len(prefix):]
    if re.match(r"(down_blocks|mid_block|up_blocks)\.", layer):  # diffusers' first files had no prefix
        return "unet", layer
    return None


def _module_name(model: str, path: str, rules) -> str:
    """A path in any of the formats -> fastsd's module name with `_` for `.` (what `_index` is keyed by)."""
    for pattern, repl in OLD_DIFFUSERS:
        path = re.sub(pattern, repl, path)
    if model == "clip":
        name = path.replace(".", "_")
        return name if name.startswith("text_model_") else "text_model_" + name
    dotted = path if "." in path else rename_key(path, UNDERSCORED_UNET_BLOCKS)
    return rename_key(dotted + ".", rules).rstrip(".").replace(".", "_")


NORMS = (nn.GroupNorm, nn.LayerNorm)  # the layers LyCORIS 'norm' changes (A1111's network_norm)


def _layer_kind(module: nn.Module) -> str:
    """What a layer is, for messages (a backend's subclass named by the layer it is)."""
    return next(name for cls, name in ((nn.Linear, "linear layer"), (nn.Conv2d, "convolution"),
                                       (nn.GroupNorm, "GroupNorm"), (nn.LayerNorm, "LayerNorm"),
                                       (nn.Embedding, "embedding table"), (nn.Module, "layer"))
                if isinstance(module, cls))


def _bias(module: nn.Module) -> torch.Tensor | None:
    """A layer's bias; None for one without (an embedding table has no bias attribute at all)."""
    return getattr(module, "bias", None)


def _put_bias(module: nn.Module, bias: torch.Tensor | None) -> None:
    """Give a layer back its bias (nothing to do where it has it, or has none and is given none)."""
    if bias is not _bias(module):
        module.bias = bias


def _index(model: nn.Module) -> dict[str, str]:
    """The LoRA-able layers (Linear, Conv2d; GroupNorm, LayerNorm for LyCORIS 'norm'; the text encoder's token and
    position embedding tables, which LyCORIS' and ComfyUI's extractions change) of a model: their name with `_` for
    `.` -> their name."""
    return {n.replace(".", "_"): n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, *NORMS))}


# CLIP's text projection (ComfyUI's extractions hold a change of it): SD1 reads the text encoder's hidden states and
# never this projection (fastsd's CLIP has none, nor A1111's), so a change of it changes no image: not read.
UNUSED = re.compile(r"(text_model[._])?text_projection")


def _peft_scales(path: str) -> dict[str, dict]:
    """PEFT's LoraConfig per model ("unet"/"text_encoder") from diffusers' `lora_adapter_metadata` header."""
    if not path.lower().endswith(".safetensors"):  # (A1111 compares extensions in lower case)
        return {}
    raw = safetensors_metadata(path).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its lora_adapter_metadata header is not JSON") from None
    except (ValueError, RecursionError) as e:  # (a number of over 4300 digits; arrays nested thousands deep)
        why = "nested too deep" if isinstance(e, RecursionError) else "a number too long to read"
        raise CheckpointError(f"{path}: its lora_adapter_metadata header can't be read ({why})") from None
    if not isinstance(meta, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(meta), "a number")
        raise CheckpointError(f"{path}: its lora_adapter_metadata header is {kind}, not a JSON object")
    out: dict[str, dict] = {}
    for k, v in meta.items():
        model, _, field_ = k.partition(".")
        out.setdefault(model, {})[field_] = v
    for model, cfg in out.items():
        _check_peft_config(path, model, cfg)
    return out


_PATTERN_KEY = re.compile(r"[\w.]+")  # what diffusers writes in rank_pattern / alpha_pattern: module names


def _check_peft_config(path: str, model: str, cfg: dict) -> None:
    """CheckpointError unless the fields _peft_scale reads are what PEFT writes: lora_alpha a finite number, r a
    positive one (those in alpha_pattern / rank_pattern too, keyed by module names), use_rslora true or false.
    Pattern keys are held to module names (letters, digits, '_', '.'), which is all diffusers writes there: they
    are regular expressions to PEFT, and an arbitrary one from a file could take minutes to match."""
    def number(v, what: str, positive: bool) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise CheckpointError(f"{path}: lora_adapter_metadata {model}.{what} is {json.dumps(v)[:40]}, not a "
                                  f"{'positive' if positive else 'finite'} number")

    if "lora_alpha" in cfg and "r" in cfg:
        number(cfg["lora_alpha"], "lora_alpha", False)
        number(cfg["r"], "r", True)
    for field_, positive in (("alpha_pattern", False), ("rank_pattern", True)):
        patterns = cfg.get(field_) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{path}: lora_adapter_metadata {model}.{field_} is not an object")
        for key, v in patterns.items():
            if not _PATTERN_KEY.fullmatch(key):
                raise CheckpointError(f"{path}: lora_adapter_metadata {model}.{field_} key {key[:40]!r} is not a "
                                      "module name (fastsd reads module names there, not other regular expressions)")
            number(v, f"{field_}[{key[:40]!r}]", positive)
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise CheckpointError(f"{path}: lora_adapter_metadata {model}.use_rslora is not true or false")


def _peft_scale(cfg: dict, path: str) -> float | None:
    """alpha / r of PEFT's config for the module at `path` (its alpha_pattern / rank_pattern matched as PEFT
    does: the pattern ends the name at a dot boundary); None without a config."""
    if "lora_alpha" not in cfg or "r" not in cfg:
        return None

    def pick(patterns: dict, default):
        for pattern, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        return default

    alpha, r = pick(cfg.get("alpha_pattern"), cfg["lora_alpha"]), pick(cfg.get("rank_pattern"), cfg["r"])
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def lora_layers(path: str) -> tuple[dict[str, dict[str, TensorRef]], dict[str, dict]]:
    """(its LoRA layers {layer: {part: tensor}}, the embeddings it bundles {NAME: what an embedding file would hold})
    after checking, without a model, that the file is a LoRA of a kind fastsd merges; CheckpointError (one line,
    naming what the file is) otherwise."""
    refs = read_tensor_file(path)
    groups: dict[str, dict[str, TensorRef]] = {}
    bundles: dict[str, dict] = {}
    unknown = []
    ia3 = any(key.endswith(".on_input") for key in refs)
    for key, ref in refs.items():
        if key.startswith(BUNDLE):
            _add_bundled(path, key, ref, bundles)
            continue
        split = _split_key(key, ia3)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = ref
    _check_kind(path, [k for k in refs if not k.startswith(BUNDLE)], unknown, groups, bool(bundles))
    return groups, bundles


def _add_bundled(path: str, key: str, ref: TensorRef, bundles: dict[str, dict]) -> None:
    """A bundle_emb.NAME.<key> tensor into bundles[NAME], as A1111's networks.py groups them: `string_to_param.K`
    into a string_to_param dict (an A1111 .pt's), any other <key> as it is."""
    name, _, part = key[len(BUNDLE):].partition(".")
    if not name or not part:
        raise CheckpointError(f"{path}: {key}: a bundled embedding's tensors are named bundle_emb.NAME.<key>")
    data = bundles.setdefault(name, {})
    if part.startswith("string_to_param."):
        data.setdefault("string_to_param", {})[part.partition(".")[2]] = ref
    else:
        data[part] = ref


def _bundled_vectors(path: str, name: str, data: dict, width: int) -> torch.Tensor:
    """The checked vectors of bundled embedding NAME (fastsd.embeddings' reading of an embedding file's contents)."""
    loaded = {k: ({kk: r.load() for kk, r in v.items()} if isinstance(v, dict) else v.load()) for k, v in data.items()}
    return embedding_vectors(loaded, f"{path}: bundle_emb.{name}", width)


def read_lora(path: str, models: dict[str, nn.Module]) -> LoraFile:
    """Read a LoRA file and map every layer onto `models` ({"unet": UNet, "clip": CLIPTextModel}), checking
    names and shapes; CheckpointError (one line, naming what was found) when anything does not fit."""
    groups, bundles = lora_layers(path)
    peft = _peft_scales(path)
    indexes = {m: _index(models[m]) for m in models}
    rules = unet_rules(models["unet"].cfg)
    layers, unmatched, bad, seen = [], [], [], {}
    for layer, parts in groups.items():
        target = _target(layer)
        if target and target[0] == "clip" and UNUSED.fullmatch(target[1]):
            continue
        name = indexes[target[0]].get(_module_name(*target, rules)) if target else None
        if name is None:
            unmatched.append(layer)
            continue
        kind = _kind(path, layer, parts)
        module = models[target[0]].get_submodule(name)
        if kind == "full" and isinstance(module, NORMS):  # a norm's whole change (ComfyUI's diff): as LyCORIS 'norm'
            parts, kind = {{"diff": "w_norm", "diff_b": "b_norm"}.get(k, k): v for k, v in parts.items()}, "norm"
        shapes = {k: tuple(r.shape) for k, r in parts.items()}
        inputs = 0  # the file's input channels, when its change is zero-padded to the layer's (A1111's inpainting rule)
        if (kind == "norm") != isinstance(module, NORMS):
            problem = (f"w_norm for a {_layer_kind(module)}, not a norm layer" if kind == "norm" else
                       f"{_suffix(next(iter(sorted(parts))))} for a {_layer_kind(module)} (a norm layer takes "
                       "LyCORIS' w_norm / b_norm)")
        else:
            problem = _fit_problem(module, kind, shapes, parts)
            w = tuple(module.weight.shape)
            if problem and len(w) == 4 and w[1] == 9 and not _fit_problem(module, kind, shapes, parts,
                                                                            (w[0], 4, *w[2:])):
                inputs = 4  # a 4-channel model's change of an inpainting model's first convolution: the latent channels
                problem = ("DoRA magnitudes for the first 4 of its 9 input channels" if {"dora_scale", "magnitude"} &
                           set(parts) else None)
        if problem:
            bad.append(f"{layer}: {problem}")
            continue
        if (target[0], name) in seen:
            raise CheckpointError(f"{path}: {layer} and {seen[target[0], name]} both change {target[0]} layer {name}")
        seen[target[0], name] = layer
        made = (_layer(path, target, name, layer, parts, peft) if kind == "lora" else
                _lycoris_layer(path, target, name, layer, kind, parts))
        if inputs and kind == "lora":  # down's missing input channels as zeros
            made = replace(made, down=nn.functional.pad(made.down, (0, 0, 0, 0, 0, w[1] - inputs)))
        elif inputs:
            made = replace(made, inputs=inputs)
        layers.append(_with_extras(path, made, parts, tuple(module.weight.shape)))
    if unmatched:
        raise CheckpointError(f"{path}: {len(unmatched)} LoRA layers match no layer of this SD1.x model: "
                              f"{_names(unmatched)}")
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} LoRA layers do not fit this model{_shape_hint(bad)}: "
                              f"{_names(bad, 3)}")
    width = models["clip"].cfg.hidden_size
    embeddings = []
    for name, data in bundles.items():
        try:
            embeddings.append((name, _bundled_vectors(path, name, data, width)))
        except OtherWidth as e:  # (A1111's networks.py puts it among the skipped embeddings; the LoRA loads)
            warnings.warn(f"{e}: that embedding is skipped, the rest of the LoRA is loaded (as A1111)", stacklevel=3)
    return LoraFile(path, Path(path).stem, tuple(layers), tuple(embeddings))


def _layer(path: str, target: tuple[str, str], name: str, layer: str, parts: dict, peft: dict) -> LoraLayer:
    down, up = _factor(parts["down"].load()), _factor(parts["up"].load())
    rank = down.shape[0]
    if rank == 0:
        raise CheckpointError(f"{path}: {layer} has rank 0 (empty factors)")
    if "scale" in parts:  # (A1111's network.py: a layer's `scale` replaces alpha / dim)
        scale = _one_number(path, layer, parts, "scale")
    elif "alpha" in parts:
        scale = _one_number(path, layer, parts, "alpha") / rank
    else:
        cfg = peft.get("unet" if target[0] == "unet" else "text_encoder", {})
        scale = None if layer.startswith("lora_") else _peft_scale(cfg, target[1])  # kohya files have no PEFT config
        scale = 1.0 if scale is None else scale
    if not (abs(scale) <= FP32_MAX and torch.isfinite(down.sum(dtype=torch.float32))
            and torch.isfinite(up.sum(dtype=torch.float32))):  # sums: fast
        raise CheckpointError(f"{path}: {layer} holds NaN, infinite or absurdly large values")
    return LoraLayer(target[0], name, layer, down, up, scale)


def _one_number(path: str, layer: str, parts: dict, part: str) -> float:
    """A layer's `alpha` or `scale` (a tensor of one number, of any shape); CheckpointError otherwise."""
    t = parts[part].load()
    if t.numel() != 1:
        raise CheckpointError(f"{path}: {layer}.{part} has shape {tuple(t.shape)}, not one number")
    return float(t)


def _factor(t: torch.Tensor) -> torch.Tensor:
    """A LoRA factor as the merge reads it: fp16 / bf16 kept so (made fp32 a layer at a time while merging, which
    is exact: a file's factors take half the memory while a load holds them all), anything else as fp32."""
    return t if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t.float()


def _kind(path: str, layer: str, parts: dict) -> str:
    """"lora", "locon_cp", "loha", "lokr", "full" or "norm" from a layer's tensors; CheckpointError naming what is
    missing or mixed. A bias's change goes with its kind's factors (lora_B.bias: LoRA; diff_b: full), LyCORIS' DoRA
    dora_scale with any kind's, PEFT's lora_magnitude_vector with lora_A / lora_B."""
    have = set(parts) - {"alpha", "scale", "dora_scale", "magnitude"}
    if "diff_b" in have and have - {"diff", "diff_b"}:  # ComfyUI's bias change beside another kind's factors
        have.discard("diff_b")
    if len(biases := sorted(set(parts) & set(BIAS_CHANGES))) > 1:
        raise CheckpointError(f"{path}: {layer} has two bias changes: {' and '.join(map(_suffix, biases))}")
    kinds = {"lora": {"down", "up", "mid", "up_bias"}, "loha": set(HADA) | {c for c in CORES if c.startswith("hada")},
             "lokr": set(LOKR) | {c for c in CORES if c.startswith("lokr")}, "full": {"diff", "diff_b"},
             "norm": {"w_norm", "b_norm"}, "oft": {"oft_blocks", "oft_diag", "rescale"}, "ia3": {"weight", "on_input"},
             "glora": {f"glora_{k}" for k in GLORA}}
    kind = next((k for k, names in kinds.items() if have and have <= names), None)
    if kind is None and have:
        raise CheckpointError(f"{path}: {layer} mixes factors of different kinds: {', '.join(sorted(have))}")
    kind = kind or "lora"
    if kind == "lokr":
        both = next((k for k in ("lokr_w1", "lokr_w2") if k in have and have & {k + "_a", k + "_b"}), None)
        if both:
            raise CheckpointError(f"{path}: {layer} has {both} both whole and as {both}_a @ {both}_b")
        if "lokr_t2" in have and "lokr_w2" in have:
            raise CheckpointError(f"{path}: {layer} has a CP core lokr_t2 for a whole lokr_w2 (it needs lokr_w2_a "
                                  "and _b)")
        complete = all(k in have or {k + "_a", k + "_b"} <= have for k in ("lokr_w1", "lokr_w2"))
        needed = "lokr_w1 or lokr_w1_a and _b, lokr_w2 or lokr_w2_a and _b"
    elif kind == "oft":
        if {"oft_blocks", "oft_diag"} <= have:
            raise CheckpointError(f"{path}: {layer} has both oft_blocks and oft_diag (one OFT layer has one)")
        complete, needed = bool(have & {"oft_blocks", "oft_diag"}), "oft_blocks or oft_diag"
    elif kind == "glora":  # (A1111's network_glora takes a layer only with its alpha, which it does not use)
        complete = {"glora_a1", "glora_a2", "glora_b1", "glora_b2"} <= have and "alpha" in parts
        needed = "a1.weight, a2.weight, b1.weight, b2.weight and alpha"
    else:
        required = {"lora": {"down", "up"}, "loha": set(HADA), "full": {"diff"}, "norm": {"w_norm"},
                    "ia3": {"weight", "on_input"}}[kind]
        complete, needed = required <= have, " and ".join(sorted(required))
    if not complete:
        name = {"lora": "LoRA", "loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "full": "LyCORIS 'full'",
                "norm": "LyCORIS 'norm'", "oft": "OFT", "ia3": "LyCORIS IA3", "glora": "LyCORIS GLoRA"}[kind]
        raise CheckpointError(f"{path}: {layer} has {' and '.join(map(_suffix, sorted(parts)))} but not every factor "
                              f"of a {name} ({needed})")
    if {"dora_scale", "magnitude"} <= set(parts):
        raise CheckpointError(f"{path}: {layer} has two DoRA magnitudes, dora_scale and lora_magnitude_vector")
    if "magnitude" in parts and (kind != "lora" or "mid" in have):
        raise CheckpointError(f"{path}: {layer} has PEFT's lora_magnitude_vector beside {' and '.join(sorted(have))} "
                              "(PEFT's DoRA goes with lora_A / lora_B)")
    return "locon_cp" if kind == "lora" and "mid" in have else kind


def _fit_problem(module: nn.Module, kind: str, shapes: dict, parts: dict, w: tuple | None = None) -> str | None:
    """Why a layer's tensors of these shapes can't change `module` (None when they can), its weight taken to have
    shape `w` (default: its own)."""
    problem = (_shape_problem(module, shapes["down"], shapes["up"], w) if kind == "lora"
               else _delta_shape_problem(module, kind, shapes, w)) or _extra_shape_problem(module, shapes)
    if kind == "ia3" and not problem:  # which side the vector scales: on_input's value
        problem = _ia3_side_problem(module, parts)
    return problem


def _cp_shape(t: tuple, a: tuple, b: tuple) -> tuple | None:
    """The shape cp(t, a, b) makes, (out, in, kh, kw), when core t (r1, r2, kh, kw), a (r1, out), b (r2, in) fit
    one another; else None."""
    ok = len(t) == 4 and len(a) == 2 == len(b) and (a[0], b[0]) == t[:2]
    return (a[1], b[1], *t[2:]) if ok else None


def _delta_shape_problem(module: nn.Module, kind: str, shapes: dict, w: tuple | None = None) -> str | None:
    """Why LoCon-with-core / LoHa / LoKr factors of these shapes can't update `module` (None when they can), its
    weight taken to have shape `w` (default: its own)."""
    w = w or tuple(module.weight.shape)
    numel = math.prod(w)
    shown = ("factors " + ", ".join(f"{_suffix(k) if k.startswith('glora') else k} {v}"
                                    for k, v in sorted(shapes.items()) if k not in ("alpha", "scale", *EXTRAS))
             + f" vs layer {w}")
    if kind == "norm":  # w_norm: the norm's scale, (C,)
        return None if shapes["w_norm"] == w else shown
    if kind == "oft":
        return _oft_shape_problem(w, shapes, shown)
    if kind == "ia3":  # a vector over the rows or the columns (which, on_input tells: checked when it is read)
        v = shapes["weight"]
        if len(w) == 4 and (len(v) != 4 or v[0] != 1 or v[2:] != (1, 1)):
            return f"IA3 weight {v} for a convolution (LyCORIS writes a convolution's as (1, C, 1, 1))"
        ok = math.prod(shapes["on_input"]) == 1 and math.prod(shapes["weight"]) in w[:2]
        return None if ok else shown
    if kind == "glora":
        return _glora_shape_problem(w, shapes, shown)
    if kind == "full":  # diff: the weight's shape (a linear's or a 1x1 convolution's with or without a 1x1 kernel)
        diff, ones = shapes["diff"], ((), (1, 1))
        return None if diff == w or (diff[:2] == w[:2] and diff[2:] in ones and w[2:] in ones) else shown
    if kind == "locon_cp":  # down (r2, in[, 1, 1]), mid (r1, r2, kh, kw), up (out, r1[, 1, 1])
        down, up = (shapes[k][:2] if shapes[k][2:] in ((), (1, 1)) else None for k in ("down", "up"))
        ok = down is not None and up is not None and _cp_shape(shapes["mid"], up[::-1], down) == w
        return None if ok else shown
    if kind == "loha":
        ok = all(len(shapes[k]) >= 2 for k in HADA) and all(
            _cp_shape(shapes[f"hada_t{i}"], shapes[f"hada_w{i}_a"], shapes[f"hada_w{i}_b"]) == w
            if f"hada_t{i}" in shapes
            else shapes[f"hada_w{i}_a"][1] == shapes[f"hada_w{i}_b"][0] and shapes[f"hada_w{i}_a"][0] == w[0]
            and math.prod(shapes[f"hada_w{i}_b"][1:]) * w[0] == numel for i in (1, 2))
        return None if ok else shown
    dims = []
    for k in ("lokr_w1", "lokr_w2"):
        if k in shapes:
            dims.append((shapes[k][0], math.prod(shapes[k][1:])) if len(shapes[k]) >= 2 else None)
        elif k == "lokr_w2" and "lokr_t2" in shapes:  # cp(t2, a, b): (a's columns, b's columns, kh, kw)
            cp = _cp_shape(shapes["lokr_t2"], shapes["lokr_w2_a"], shapes["lokr_w2_b"])
            dims.append((cp[0], math.prod(cp[1:])) if cp is not None and cp[2:] == w[2:] else None)
        else:
            a, b = shapes[k + "_a"], shapes[k + "_b"]
            dims.append((a[0], math.prod(b[1:])) if len(a) == 2 and len(b) >= 2 and a[1] == b[0] else None)
    ok = None not in dims and dims[0][0] * dims[1][0] == w[0] and dims[0][1] * dims[1][1] * w[0] == numel
    return None if ok else shown


def _glora_shape_problem(w: tuple, shapes: dict, shown: str) -> str | None:
    """Why GLoRA factors of these shapes can't change a weight of shape w (None when they can). A1111's network_glora
    reads the first LyCORIS layout, a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r), change b2 b1 + W a2 a1, on a
    linear (fastsd: or a 1x1 convolution, its factors (..., 1, 1), as LyCORIS made them); LyCORIS 3's layout (a1 (in,
    r), a2 (r, in), b1 (out, r), b2 (r, in), change b1 b2 + W a1 a2, and its Tucker core `bm`) does not fit A1111's
    products, which fail on it (A1111 skips the layer): refused so."""
    ones = ((), (1, 1))
    if "glora_bm" in shapes:
        return "GLoRA with a Tucker core bm.weight (LyCORIS 3), which A1111 does not merge"
    flat = {k[6:]: shapes[k][:2] if len(shapes[k]) >= 2 and shapes[k][2:] in ones else None
            for k in shapes if k.startswith("glora_")}
    if w[2:] not in ones:
        return f"GLoRA on a {w[2]}x{w[3]} convolution (A1111 merges GLoRA into linear layers, LyCORIS into 1x1 ones)"
    if None in flat.values():
        return shown
    out, inp, r = w[0], w[1], flat["a1"][0]
    if (flat["a1"], flat["a2"], flat["b1"], flat["b2"]) == ((r, inp), (inp, r), (r, inp), (out, r)):
        return None
    r = flat["a1"][-1]
    if (flat["a1"], flat["a2"], flat["b1"], flat["b2"]) == ((inp, r), (r, inp), (out, r), (r, inp)):
        return ("GLoRA in LyCORIS 3's layout (a1.weight (in, r), b1.weight (out, r)), whose products A1111's "
                "network_glora can't form (it skips such layers): not merged")
    return shown


def _ia3_side_problem(module: nn.Module, parts: dict) -> str | None:
    """Why an IA3 vector can't scale the side of `module` its on_input names (None when it can)."""
    w, n = tuple(module.weight.shape), math.prod(parts["weight"].shape)
    columns = bool(parts["on_input"].load().reshape(-1)[0])
    if n == w[1 if columns else 0]:
        return None
    return f"IA3 weight {tuple(parts['weight'].shape)} for the {'input columns' if columns else 'output rows'} of " \
           f"layer {w} (on_input {int(columns)})"


def _oft_shape_problem(w: tuple, shapes: dict, shown: str) -> str | None:
    """Why OFT blocks of these shapes can't turn a weight of shape w (None when they can): (n, b, b) blocks with
    n * b rows; BOFT's (m, n, b, b) also with its rows' count a multiple of 2^m * (b // 2) (the stages' pairing)."""
    t = shapes.get("oft_blocks", shapes.get("oft_diag"))
    ok = len(t) in (3, 4) and t[-1] == t[-2] and t[-3] * t[-1] == w[0] and (len(t) == 3 or (
        "oft_blocks" in shapes and t[-1] >= 2 and w[0] % (2 ** t[0] * (t[-1] // 2)) == 0))
    if "rescale" in shapes and math.prod(shapes["rescale"]) != w[0]:
        ok = False
    return None if ok else shown


def _extra_shape_problem(module: nn.Module, shapes: dict) -> str | None:
    """Why a layer's bias change or DoRA magnitudes of these shapes can't go with `module` (None when they can)."""
    w = tuple(module.weight.shape)
    for k in BIAS_CHANGES:
        if k in shapes and _bias(module) is None:
            return f"a bias change {_suffix(k)} {shapes[k]} for a layer without a bias"
        if k in shapes and shapes[k] != w[:1]:
            return f"bias change {_suffix(k)} {shapes[k]} vs layer bias {tuple(module.bias.shape)}"
    for k in ("dora_scale", "magnitude"):
        if k in shapes and _dora_form(k, shapes[k], w) is None:
            return f"DoRA {_suffix(k)} {shapes[k]} vs layer {w} (DoRA magnitudes are (out, 1, ...) or (1, in, ...))"
    return None


def _suffix(part: str) -> str:
    """A part's key suffix as a file writes it (the first, for parts with several), for messages."""
    return next(s for s, p in PARTS if p == part).lstrip(".")


def _dora_form(part: str, shape: tuple, w: tuple) -> str | None:
    """Which norms DoRA's magnitudes of `shape` stand for on a layer of weight shape `w` (None: no form fits).
    PEFT's (`magnitude`) are one per output row, shaped (out,) for a linear and (1, out, 1, 1) for a convolution:
    "peft". LyCORIS' (`dora_scale`) have the weight's dims (a linear's or 1x1 convolution's with or without a 1x1),
    of size 1 where the norm runs: (1, in, ...) one per input column, "columns" (LyCORIS' wd_on_out=False, its
    default, the one A1111 reads); (out, 1, ...) one per output row, "rows" (wd_on_out=True)."""
    if part == "magnitude":
        return "peft" if math.prod(shape) == w[0] and [d for d in shape if d != 1] in ([w[0]], []) else None
    ones = ((), (1, 1))
    if shape[2:] in ones and w[2:] in ones:
        shape, w = shape[:2], w[:2]
    rest = (1,) * (len(w) - 2)
    return "rows" if shape == (w[0], 1, *rest) else "columns" if shape == (1, w[1], *rest) else None


def _with_extras(path: str, made: LoraLayer, parts: dict, w: tuple) -> LoraLayer:
    """`made` with the bias change and DoRA magnitudes among its layer's tensors (fp32; their shapes checked)."""
    extra = {k: parts[k].load().float() for k in EXTRAS if k in parts}
    if not extra:
        return made
    if not all(torch.isfinite(t.sum()) for t in extra.values()):
        raise CheckpointError(f"{path}: {made.key} holds NaN, infinite or absurdly large values")
    dora = next((k for k in ("dora_scale", "magnitude") if k in extra), None)
    return replace(made, bias=next((extra[k] for k in BIAS_CHANGES if k in extra), None),
                   bias_scale=1.0 if {"diff_b", "b_norm"} & set(extra) else None,  # (A1111's ex_bias: no scale)
                   dora=extra[dora].reshape(-1) if dora else None,
                   dora_form=_dora_form(dora, tuple(parts[dora].shape), w) if dora else "")


def _lycoris_layer(path: str, target: tuple[str, str], name: str, layer: str, kind: str, parts: dict) -> LoraLayer:
    """A LoCon-with-core / LoHa / LoKr / full / norm / OFT / IA3 / GLoRA layer; scale = alpha / dim
    as A1111 (dim: down's rows; hada_w1_b's; LoKr: lokr_w2_b's, else lokr_w1_b's), 1 without an alpha or a dim
    (full, norm, OFT, IA3, GLoRA have none: A1111 merges GLoRA at 1 whatever its alpha), the file's `scale` where
    it has one (but for OFT, as A1111)."""
    factors = {k: ref.load().float() for k, ref in parts.items()
               if (k != "alpha" or kind == "oft") and k != "scale" and k not in EXTRAS}  # (OFT's alpha: its constraint)
    empty = next((k for k, t in factors.items() if t.numel() == 0), None)
    if empty is not None:
        raise CheckpointError(f"{path}: {layer}.{empty} is empty, shape {tuple(factors[empty].shape)}")
    dim = (factors["down"].shape[0] if kind == "locon_cp" else factors["hada_w1_b"].shape[0] if kind == "loha" else
           factors["lokr_w2_b"].shape[0] if "lokr_w2_b" in factors else
           factors["lokr_w1_b"].shape[0] if "lokr_w1_b" in factors else None)
    scale = 1.0
    if "scale" in parts and kind != "oft":  # (A1111's NetworkModuleOFT sets its scale to 1 whatever the file says)
        scale = _one_number(path, layer, parts, "scale")
    elif "alpha" in parts and dim:
        scale = _one_number(path, layer, parts, "alpha") / dim
    if not (abs(scale) <= FP32_MAX and all(torch.isfinite(t.sum()) for t in factors.values())):
        raise CheckpointError(f"{path}: {layer} holds NaN, infinite or absurdly large values")
    return LoraLayer(target[0], name, layer, None, None, scale, kind, factors)


def _shape_problem(module: nn.Module, down: tuple, up: tuple, w: tuple | None = None) -> str | None:
    """Why factors of these shapes can't update `module` (None when they can): down (r, in[, kh, kw]),
    up (out, r[, 1, 1]); 1x1 convolutions and linears take either form. `w`: the weight's shape (default: its own)."""
    w = w or tuple(module.weight.shape)
    k = w[2:]
    ones = ((), (1, 1))
    ok = (len(down) >= 2 and len(up) >= 2 and down[1] == w[1] and up[0] == w[0] and up[1] == down[0]
          and (down[2:] == k or (down[2:] in ones and k in ones)) and up[2:] in ones)
    return None if ok else f"down {down}, up {up} vs layer {w}"


def _shape_hint(bad: list[str]) -> str:
    """What the wrong shapes say about the file's model family."""
    text = "\n".join(bad)
    if re.search(r"(attn2[._]to_[kv]|^lora_te_|^text_encoder\.)\S*: down \(\d+, 1024\)", text, re.M):
        return " (1024-wide text features: a Stable Diffusion 2.x LoRA)"
    if re.search(r"attn2[._]to_[kv]\S*: down \(\d+, 2048\)", text):
        return " (its cross-attention takes 2048-wide text features: an SDXL LoRA)"
    m = re.search(r"(input_blocks_0_0|conv_in)\S*: down \(\d+, (\d+)", text)
    if m:
        return f" (its first convolution takes {m[2]} input channels: a LoRA for a {m[2]}-channel model)"
    return ""


def _check_kind(path: str, keys: list[str], unknown: list[str], groups: dict, bundles: bool) -> None:
    """CheckpointError for files that are no LoRA of a kind fastsd merges, naming what they are (`keys`: but the
    bundled embeddings'; a file of those alone is taken, as A1111 takes it)."""
    for pattern, kind in OTHER_KINDS:
        rx = re.compile(pattern)
        found = next((k for k in keys if rx.search(k)), None)
        if found is not None:
            raise CheckpointError(f"{path}: this is {kind} (keys such as {found}); fastsd merges Stable Diffusion 1.x "
                                  "LoRAs (lora_down/lora_up, LoCon, lora_A/lora_B, DoRA, LyCORIS LoHa, LoKr, full, "
                                  "norm, IA3, GLoRA, OFT and BOFT)")
    if not bundles and not any(set(g) - {"alpha", "scale"} for g in groups.values()):
        raise CheckpointError(f"{path}: not a LoRA (no lora_down/lora_up or lora_A/lora_B tensors; {len(keys)} "
                              f"tensors such as {_names(keys, 3)})")
    if unknown:
        raise CheckpointError(f"{path}: tensors of no LoRA layer: {_names(unknown)}")


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


# ---- merging -------------------------------------------------------------------------------------------

@torch.no_grad()
def merged_weight(weight: torch.Tensor, layer: LoraLayer, multiplier: float,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """weight + multiplier * scale * up @ down in fp32, rounded once to weight's dtype, laid out in
    `memory_format` (4-d weights). A block of output rows at a time, in an fp32 scratch that stays in
    cache, so a bf16 weight is read once and written once instead of going through full fp32 copies.
    A convolution's rows are always computed in channels_last order, (kh, kw, C), down's columns permuted to
    match, whatever the weight's layout and `memory_format`: a GEMM's rounding of an element can depend on
    where it sits in a row (seen with MKL restricted to AVX2: conv_in's 36-wide rows), and one order gives
    the same bits for the same LoRA on the same weights however they are laid out (dense from a packed
    layer, channels_last after an unload, contiguous in the torch backend). It is the CPU path's own layout,
    so there the rows are read and written without a transposition (a packed layer's dense weight, which
    comes contiguous, is transposed a block at a time, in cache).

    DoRA (`layer.dora`, magnitudes m): V = weight + s * delta is scaled to the magnitudes, m / ||V|| with the
    norm over each output row (PEFT; LyCORIS' wd_on_out) or each input column (LyCORIS' default; a first pass
    over the blocks sums the columns' squares). The weight w: PEFT and diffusers' fuse_lora take it inside,
    s = w * scale, and merge m / ||V|| * V; A1111 decomposes at s = scale and weighs the change,
    weight + w * (m / ||V|| * V - weight) (LyCORIS' own runtime, (1 + w * (m / ||V|| - 1)) * V, differs by
    (1 - w) * scale * delta away from w = 1): PEFT's files ("peft") get PEFT's, LyCORIS' A1111's."""
    conv = weight.dim() == 4
    rows_of = (lambda t: t.permute(0, 2, 3, 1)) if conv else (lambda t: t)  # noqa: E731 - (out, kh, kw, C) views
    a1111_dora = layer.dora is not None and layer.dora_form != "peft"
    alpha = layer.scale if a1111_dora else multiplier * layer.scale
    if layer.kind == "lora":
        up = layer.up.reshape(layer.up.shape[0], -1).to(weight.device, torch.float32)
        down = layer.down.reshape(layer.down.shape[0], *weight.shape[1:]) if conv else layer.down
        down = rows_of(down).reshape(down.shape[0], -1).to(weight.device, torch.float32)
        update = lambda block, i: block.addmm_(up[i:i + len(block)], down, alpha=alpha)  # noqa: E731
    else:  # LoHa / LoKr / full / norm / OFT / IA3: the whole delta first (fp32, one layer), its rows in the same order
        delta = rows_of(layer.delta(weight).to(weight.device)).reshape(weight.shape[0], -1)
        update = lambda block, i: block.add_(delta[i:i + len(block)], alpha=alpha)  # noqa: E731
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device, memory_format=memory_format)
    src, dst = rows_of(weight), rows_of(out)
    top = torch.finfo(weight.dtype).max  # (beyond it the rounding to weight's dtype would give inf)
    check = may_leave_range(layer, multiplier, weight.dtype)
    width = math.prod(weight.shape[1:])
    rows = max(1, MERGE_BLOCK_BYTES // (4 * width))
    scratch = torch.empty(min(rows, weight.shape[0]), width, device=weight.device)
    blocks = range(0, weight.shape[0], rows)

    def updated(i: int) -> torch.Tensor:  # weight + alpha * delta, rows i.. of it
        block = scratch[: min(rows, weight.shape[0] - i)]
        block.view(-1, *src.shape[1:]).copy_(src[i:i + rows])
        update(block, i)
        return block

    dora = None if layer.dora is None else layer.dora.to(weight.device)
    if layer.dora_form == "columns":  # m / ||column||, per input channel (the last of a row's (kh, kw, C))
        squares = sum(updated(i).view(-1, src.shape[-1]).square().sum(0) for i in blocks)
        if not squares.all():
            raise ZeroNorm(f"{layer.key}: DoRA: the changed weight has an all-zero input column (norm 0), which no "
                           "magnitude can scale; the file's change cancels the layer's weight")
        dora = dora / squares.sqrt()
    for i in blocks:
        block = updated(i)
        shaped = block.view(-1, *src.shape[1:])
        if layer.dora_form == "columns":
            block.view(len(block), -1, src.shape[-1]).mul_(dora)
        elif dora is not None:
            norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
            if not norms.all():
                raise ZeroNorm(f"{layer.key}: DoRA: the changed weight has an all-zero output row (norm 0), which no "
                               "magnitude can scale; the file's change cancels the layer's weight")
            block.mul_(dora[i:i + len(block), None] / norms)
        if a1111_dora:
            shaped.sub_(src[i:i + rows]).mul_(multiplier).add_(src[i:i + rows])
        if check:
            lo, hi = torch.aminmax(block)
            if not (-top <= lo.item() and hi.item() <= top):  # (NaN fails both)
                raise ValueError(f"{layer.key} at weight {multiplier:g} takes the layer's weights out of "
                                 f"{str(weight.dtype)[6:]}'s range (NaN or infinite)")
        dst[i:i + rows].copy_(shaped)
    return out


def may_leave_range(layer: LoraLayer, multiplier: float, dtype: torch.dtype) -> bool:
    """Whether merging `layer` at `multiplier` into a weight of `dtype` may take it out of dtype's range (or fail
    otherwise on the file's values: DoRA's zero norms), so merged_weight checks each block's range: wherever a bound
    on the update can't rule it out (|up @ down| <= rank * max|up| * max|down|, `_delta_bound` for LyCORIS' kinds;
    the weights themselves taken to be far inside the range); always for OFT, IA3 (a change proportional to the
    weight: no bound from the file alone) and DoRA."""
    if layer.dora is not None:
        return True
    if layer.kind == "lora":
        bound = layer.down.shape[0] * float(layer.up.abs().amax()) * float(layer.down.abs().amax())
    elif (bound := _delta_bound(layer)) is None or not bound < FP32_MAX / 4:  # (fp32 products too)
        return True
    return not abs(multiplier * layer.scale) * bound < torch.finfo(dtype).max / 4


def _delta_bound(layer: LoraLayer) -> float | None:
    """A bound on |delta| of a LoCon-with-core / LoHa / LoKr / full / norm layer from its factors, and on every
    partial product of computing it (each factor's max|.| taken as at least 1): a product's inner size times its
    factors' maxima. None for OFT and IA3, whose change is a multiple of the layer's weight."""
    f = layer.factors
    top = lambda *keys: math.prod(max(1.0, float(f[k].abs().amax())) for k in keys)  # noqa: E731

    def product(i: str, w: str) -> float:  # a LoHa / LoKr factor: whole, a @ b, or cp(t, a, b)
        if f"{w}_a" not in f:
            return top(w)
        if i in f:
            return math.prod(f[i].shape[:2]) * top(i, f"{w}_a", f"{w}_b")
        return _flat(f[f"{w}_a"]).shape[1] * top(f"{w}_a", f"{w}_b")

    if layer.kind in ("full", "norm"):
        return top("diff" if layer.kind == "full" else "w_norm")
    if layer.kind == "locon_cp":
        return math.prod(f["mid"].shape[:2]) * top("mid", "up", "down")
    if layer.kind == "loha":
        return product("hada_t1", "hada_w1") * product("hada_t2", "hada_w2")
    if layer.kind == "lokr":
        return product("", "lokr_w1") * product("lokr_t2", "lokr_w2")
    return None


def _merged_layer(weight: torch.Tensor | None, bias: torch.Tensor | None, merges: list,
                  form: torch.memory_format = torch.contiguous_format) -> tuple:
    """(weight, bias) of one layer after each of its merges [(LoraLayer, multiplier, LoRA name)] in turn, weight in
    `form` (None: the bias only); ValueError naming the LoRA when a merge fails on its values (out of range)."""
    for layer, multiplier, name in merges:
        try:
            if weight is not None:
                weight = merged_weight(weight, layer, multiplier, form)
            if layer.bias is not None:
                bias = merged_bias(bias, layer, multiplier)
        except ZeroNorm as e:  # (no weight helps)
            raise ValueError(f"LoRA {name}: {e}") from None
        except ValueError as e:
            raise ValueError(f"LoRA {name}: {e}: try a lower weight") from None
    return weight, bias


def _check_merges(models: dict[str, nn.Module], by_layer: dict) -> None:
    """Run, changing no weight, each merge of `by_layer` that may fail on the file's values (may_leave_range: the
    merge checks its result's range; every bias change), a layer at a time and the result dropped, so that a load
    that keeps no originals fails before any weight changes. A file of sane LoRA factors costs nothing here: its
    merges' bounds rule out leaving the range (the kinds without a bound, and DoRA, are merged twice)."""
    for (model, name), merges in by_layer.items():
        module = models[model].get_submodule(name)
        check = any(may_leave_range(layer, multiplier, module.weight.dtype) for layer, multiplier, _ in merges)
        if check or any(layer.bias is not None for layer, _, _ in merges):  # (a packed layer: read as a dense copy)
            _merged_layer(dense_weight(module) if check else None, _bias(module), merges)


class ZeroNorm(ValueError):
    """A DoRA merge whose changed weight has a row / column of norm 0 (at any LoRA weight)."""


@torch.no_grad()
def merged_bias(bias: torch.Tensor, layer: LoraLayer, multiplier: float) -> torch.Tensor:
    """bias + multiplier * scale * layer.bias in fp32, rounded once to bias's dtype (as merged_weight)."""
    scale = layer.scale if layer.bias_scale is None else layer.bias_scale
    out = bias.float().add(layer.bias.to(bias.device), alpha=multiplier * scale).to(bias.dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"{layer.key} at weight {multiplier:g} takes the layer's bias out of "
                         f"{str(bias.dtype)[6:]}'s range (NaN or infinite)")
    return out


@dataclass
class LoadedLora:
    name: str
    path: str
    weight: Weight
    layers: int
    embeddings: tuple[Embedding, ...] = ()  # those it bundles (their "TI hashes" entry: this LoRA's name, as A1111)
    _hash: str | None = field(default=None, repr=False)

    def short_hash(self) -> str:
        """A1111's LoRA hash (its infotext's "Lora hashes"): the first 12 hex digits of the sha256 of a
        .safetensors file's tensor data (after the header: the "addnet" hash) or of a whole .pt/.ckpt."""
        if self._hash is None:
            start = read_header(self.path)[1] if self.path.lower().endswith(".safetensors") else 0
            self._hash = sha256(self.path, start)[:12]
        return self._hash


class LoraSet:
    """The LoRAs merged into a pipeline's weights, and the weight each layer they changed had before them (LoRAs
    merged for good, `keep_originals=False`, are the model's own weights from then on: `base`)."""

    def __init__(self):
        self.loaded: list[LoadedLora] = []  # every LoRA merged, in load order (`base` first)
        self.base: list[LoadedLora] = []  # those merged for good: unload() leaves them
        self._originals: dict[tuple[str, str], tuple[nn.Parameter, nn.Parameter | None]] = {}  # (weight, bias)
        self._broken: str | None = None  # why the weights are neither the model's nor a whole merge
        self._unload_stopped: str | None = None  # an unload that could not put every weight back: call it again

    def load(self, pipe, path: str, weight: Weight = 1.0, *, keep_originals: bool = True) -> LoadedLora:
        """Read, check, then merge `path` into pipe's UNet and text encoder (`weight`: one number for both, or
        (text encoder, UNet) as A1111's <lora:NAME:TE:UNET>). Everything is checked before a weight changes;
        an interruption while merging puts back the weights as they were (keep_originals=False: see load_many)."""
        return self.load_many(pipe, [(path, weight)], keep_originals=keep_originals)[0]

    def load_many(self, pipe, items, *, keep_originals: bool = True) -> list[LoadedLora]:
        """load() of each (path, weight) or (path, weight, name) of `items` (name: what <lora:NAME> tags call it, an
        A1111 alias; default the file stem), in one pass over the layers: all files are read and checked
        first, then each layer is merged with every LoRA that changes it, in their order (the same bits as
        loading them one after another) and prepared once; a failure puts back every weight as it was.

        keep_originals=False merges for good: the weights after this load become the model's own. Each replaced
        weight is freed as its layer is merged (no copy is kept, as diffusers' fuse_lora keeps none), and unload()
        afterwards takes out only LoRAs loaded later with keep_originals=True (those loaded before are merged for
        good with this one). A failure while merging (an interrupt, no memory) then leaves a partly merged model,
        which refuses to generate (check_usable) until it is loaded again; a bad file, or one whose merge leaves the
        weights' range (checked first: _check_merges), still fails before any weight changes."""
        self.check_usable()
        check_bool(keep_originals, "keep_originals")
        items = _lora_items(items)
        names = [item[2] if len(item) > 2 else None for item in items]  # (path, weight[, name])
        items = [(item[0], normalize_weight(item[1])) for item in items]
        for (path, _), name in zip(items, names):
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"LoRA path must be a string, got {type(path).__name__}")
            if name is not None and not isinstance(name, str):
                raise TypeError(f"LoRA name must be a string, got {type(name).__name__}")
        items = [(os.fspath(p), w) for p, w in items]
        models = {"unet": pipe.unet, "clip": pipe.clip}
        loras = [read_lora(path, models) for path, _ in items]
        by_layer: dict[tuple[str, str], list[tuple[LoraLayer, float, str]]] = {}  # each layer's merges, in order
        for lora, (_, weight) in zip(loras, items):
            te_weight, unet_weight = weight if isinstance(weight, tuple) else (weight, weight)
            for layer in lora.layers:
                multiplier = unet_weight if layer.model == "unet" else te_weight
                by_layer.setdefault((layer.model, layer.module), []).append((layer, multiplier, lora.name))
        if not keep_originals:  # (no original kept to put back: a merge that can fail on the file's values runs first)
            _check_merges(models, by_layer)
        layout = _conv_layout(pipe.backend)
        done = []  # (module, key, previous (weight, bias) Parameters, first change of this layer)
        changed = 0
        with pipe.backend.replacing_weights():
            try:
                for key, merges in by_layer.items():
                    module = models[key[0]].get_submodule(key[1])
                    pipe.backend.plain_weights(module)
                    prev = module.weight, _bias(module)
                    first = key not in self._originals
                    if keep_originals:
                        done.append((module, key, prev, first))
                        if first:
                            self._originals[key] = prev
                    (merged, bias), form = prev, layout if prev[0].dim() == 4 else torch.contiguous_format
                    del prev  # (merged for good: the replaced weight goes with the layer's first merge)
                    merged, bias = _merged_layer(merged, bias, merges, form)
                    if bias is not _bias(module):  # (biases are plain tensors in every backend's layers)
                        module.bias = nn.Parameter(bias, requires_grad=False)
                    module.weight = nn.Parameter(merged, requires_grad=False)
                    changed += 1
                    del merged  # (a backend that lays the weight out anew frees it now, for the next layer's merge)
                    pipe.backend.prepare_replaced(module)
            except BaseException as e:
                for module, key, prev, first in reversed(done):
                    _put_bias(module, prev[1])
                    pipe.backend.replace_weight(module, prev[0])
                    if first:
                        del self._originals[key]
                if not keep_originals and changed:
                    self._broken = (f"a LoRA load with keep_originals=False stopped ({type(e).__name__}) after "
                                    f"merging {changed} of {len(by_layer)} layers: load the model again")
                raise
        entries = []
        for lora, (path, weight), name in zip(loras, items, names):
            name = name or lora.name
            bundled = tuple(Embedding(n, vectors, path, name) for n, vectors in lora.embeddings)
            entries.append(LoadedLora(name, path, weight, len(lora.layers), bundled))
        self.loaded.extend(entries)
        self._publish_embeddings(pipe)
        if not keep_originals:  # the weights now are the model's own, with every LoRA merged so far
            self._originals.clear()
            self.base = list(self.loaded)
        return entries

    def check_usable(self, unloading: bool = False) -> None:
        """ValueError when a load merging for good stopped halfway (the weights are neither the model's nor a
        whole merge), or (but for `unloading`) an unload could not put every weight back."""
        if self._broken is not None:
            raise ValueError(self._broken)
        if self._unload_stopped is not None and not unloading:
            raise ValueError(self._unload_stopped)

    def unload(self, pipe) -> None:
        """Every changed layer gets back the weight and bias tensors it had before the LoRAs (bit for bit: the same
        tensors), or, after a load with keep_originals=False, those it had after the last such load (`base` stays).
        An exception on the way (a Ctrl-C) does not stop it halfway: the rest are put back before it goes on. Should
        that fail too, the model refuses to generate or load (check_usable) until unload runs again, which puts
        back the layers left (each original is dropped from `_originals` as it is put back)."""
        self.check_usable(unloading=True)
        models = {"unet": pipe.unet, "clip": pipe.clip}

        def put_back() -> None:
            while self._originals:
                key, (weight, bias) = next(iter(self._originals.items()))
                module = models[key[0]].get_submodule(key[1])
                _put_bias(module, bias)
                pipe.backend.replace_weight(module, weight)
                del self._originals[key]

        try:
            put_back()
        except BaseException as e:
            self._unload_stopped = (f"unload_loras stopped ({type(e).__name__}) before every weight was put back: "
                                    "call unload_loras again")
            put_back()
            raise
        finally:
            if not self._originals:  # (the weights are the model's again: pipe.loras says so)
                self._unload_stopped = None
                self.loaded = list(self.base)
                self._publish_embeddings(pipe)

    def _publish_embeddings(self, pipe) -> None:
        """Make the embeddings the loaded LoRAs bundle the ones pipe's prompts may name besides its files."""
        bundled = [e for x in self.loaded for e in x.embeddings]
        if bundled or pipe.embeddings is not None:
            pipeline_embeddings(pipe).set_bundled(bundled)

    def check_prompt(self, prompt: str) -> None:
        """ValueError when the prompt's <lora:NAME:WEIGHT> tags ask for a LoRA that is not loaded so (or
        check_usable fails)."""
        self.check_usable()
        for name, weight in parse_prompt(prompt)[1]:
            if not any(x.name == name and x.weight == weight for x in self.loaded):
                have = ", ".join(f"{x.name}:{weight_text(x.weight)}" for x in self.loaded) or "none"
                raise ValueError(f"the prompt asks for <lora:{name}:{weight_text(weight)}>, which is not loaded "
                                 f"(loaded: {have}); "
                                 "load it with pipe.load_lora, or give the CLI --lora-dir / $" + LORA_DIR_ENV)

    def infotext(self, prompt: str) -> tuple[str, str | None]:
        """(the prompt as the infotext records it, the "Lora hashes" value or None), as A1111 writes them: the
        tags stay in the prompt (a LoRA loaded without a tag gets one appended, so the infotext reproduces
        the image), and every LoRA's name (without ':' and ',') with its short hash."""
        asked = parse_prompt(prompt)[1]
        for x in self.loaded:
            if (x.name, x.weight) in asked:
                asked.remove((x.name, x.weight))
            else:
                prompt += f" <lora:{x.name}:{weight_text(x.weight)}>"
        hashes = {x.name.translate(str.maketrans("", "", ":,")): x.short_hash() for x in self.loaded}
        return prompt, ", ".join(f"{k}: {v}" for k, v in hashes.items()) or None


def _lora_items(items) -> list:
    """load_loras' `items` as a list (an iterator read once), each checked to be a (path, weight) or (path, weight,
    name) tuple or list; TypeError, one line naming load_loras and the first item that is not."""
    what = ("a string" if isinstance(items, (str, bytes, os.PathLike)) else "a dict" if isinstance(items, dict)
            else None if hasattr(items, "__iter__") else type(items).__name__)
    if what is not None:
        raise TypeError(f"load_loras takes a list of (path, weight) or (path, weight, name) items, got {what}: "
                        f"{_shown(items)}")
    items = list(items)
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            what = f"{len(item)} items" if isinstance(item, (tuple, list)) else type(item).__name__
            raise TypeError(f"load_loras: each item is a (path, weight) or (path, weight, name) tuple, got {what}: "
                            f"{_shown(item)}")
    return items


def _shown(x, limit: int = 80) -> str:
    """repr(x), cut to `limit` characters, on one line."""
    text = repr(x).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _conv_layout(backend) -> torch.memory_format:
    """The memory format `backend.prepare` gives convolution weights, so merged weights are written in it
    directly (not converted afterwards): asked of a small probe convolution."""
    probe = backend.prepare(nn.Conv2d(2, 2, 2).requires_grad_(False))
    nhwc = probe.weight.is_contiguous(memory_format=torch.channels_last) and not probe.weight.is_contiguous()
    backend.unprepare(probe)
    return torch.channels_last if nhwc else torch.contiguous_format


# ---- the A1111 prompt syntax and the LoRA folder -------------------------------------------------------

_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network syntax <kind:args>


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, Weight]]]:
    """(the prompt without its <lora:...> tags, [(NAME, WEIGHT), ...]) with A1111's tag grammar:
    <lora:NAME>, <lora:NAME:W>, <lora:NAME:TE:UNET>, and the named forms te=W / unet=W (<lora:NAME:unet=0.5>);
    the UNet's weight defaults to the text encoder's, both to 1. WEIGHT is a number, or (TE, UNET) when they
    differ. <lyco:...> is read as <lora:...> (as A1111). ValueError for a malformed tag, DyLoRA's dyn= (not
    supported), or another kind of network."""
    found = []

    def take(m: re.Match) -> str:
        kind, args = m[1], m[2].split(":")
        if kind not in ("lora", "lyco"):
            raise ValueError(f"prompt: {m[0]}: fastsd reads <lora:NAME:WEIGHT> tags, not <{kind}:...>")
        if "<" in m[2]:  # (<lora:a:<lora:b:1>>: a tag left open before another)
            raise ValueError(f"prompt: {m[0]}: a '<' inside a <lora:...> tag (one left unclosed?)")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        named = {k.strip(): v for k, v in named.items()}
        if "dyn" in named or len(positional) > 3:
            raise ValueError(f"prompt: {m[0]}: DyLoRA's dyn dimension is not supported")
        if not positional or not positional[0].strip() or set(named) - {"te", "unet"}:
            raise ValueError(f"prompt: {m[0]}: expected <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET> "
                             "(or te=W, unet=W)")

        def number(text: str) -> float:
            try:
                w = float(text)
            except ValueError:
                raise ValueError(f"prompt: {m[0]}: the weight {text!r} is not a number") from None
            if problem := _weight_problem(w):
                raise ValueError(f"prompt: {m[0]}: the weight {problem}")
            return w

        te = number(named.get("te", positional[1] if len(positional) > 1 else "1"))
        unet = number(named["unet"]) if "unet" in named else number(positional[2]) if len(positional) > 2 else te
        found.append((positional[0].strip(), normalize_weight((te, unet))))
        return ""

    return _TAG.sub(take, prompt), found


def normalize_weight(weight) -> Weight:
    """A float, or a (text encoder, UNet) pair of floats when they differ; ValueError for anything else."""
    pair = [plain(w) for w in (weight if isinstance(weight, (tuple, list)) and len(weight) == 2 else (weight,))]
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in pair):
        raise ValueError(f"LoRA weight must be a finite number or a (text encoder, UNet) pair, got {weight!r}")
    for w in pair:
        if problem := _weight_problem(w):
            raise ValueError(f"LoRA weight {str(w)[:24]}: it {problem}")
    te, unet = float(pair[0]), float(pair[-1])
    return te if te == unet else (te, unet)


def _weight_problem(w: float) -> str | None:
    """Why a LoRA weight can't be taken (not finite, or beyond MAX_WEIGHT), or None."""
    try:
        ok = math.isfinite(w)
    except OverflowError:  # an int too large for a float
        ok, w = True, math.inf
    if not ok:
        return "must be finite"
    return None if abs(w) <= MAX_WEIGHT else f"must be within -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}"


def weight_text(weight: Weight) -> str:
    """A weight as a tag writes it: "0.8", or "1:0.5" for (text encoder 1, UNet 0.5)."""
    return f"{weight[0]:g}:{weight[1]:g}" if isinstance(weight, tuple) else f"{weight:g}"


def strip_tags(prompt: str) -> str:
    """The prompt without its <lora:...> tags (what the text encoder sees)."""
    return parse_prompt(prompt)[0]


def drop_tags(prompt: str) -> str:
    """The prompt without any extra-network tag <kind:...> (A1111's disable_extra_networks)."""
    return _TAG.sub("", prompt)


def list_loras(folder: str) -> dict[str, str]:
    """{name: path} of the LoRA files in `folder` and its subfolders (as A1111 searches them), name = file
    stem, sorted by name; of two files with one stem the first in sorted path order wins."""
    from fastsd.files import files_by_stem

    return files_by_stem(folder, LORA_EXTS)


def check_lora_name(name: str) -> None:
    """ValueError unless `name` is a bare file stem: no separators, no '..', nothing absolute or hidden, so a
    prompt (or an HTTP request) can't name files outside the LoRA folder."""
    if (not name or name.startswith(".") or ".." in name or any(c in name for c in "/\\\0")
            or os.path.isabs(name)):
        raise ValueError(f"<lora:{name}>: a LoRA name is a file name in the LoRA folder, without a path")


def lora_path(name: str, folder: str | None) -> str:
    """The file of <lora:NAME> in `folder` (subfolders searched, as A1111): a file stem, else a file's A1111 alias
    (`lora_by_name`). ValueError naming the problem."""
    if not folder:
        raise ValueError(f"<lora:{name}> needs a LoRA folder: --lora-dir DIR or ${LORA_DIR_ENV}")
    if not os.path.isdir(folder):
        raise ValueError(f"LoRA folder {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder"))
    check_lora_name(name)
    have = list_loras(folder)
    found = lora_by_name(name, have)
    if found is not None:
        return found
    raise ValueError(f"<lora:{name}>: no {name}.safetensors, .pt or .ckpt in {folder}, nor a LoRA of that alias "
                     f"(it has: {_names(sorted(have)) if have else 'no LoRA files'})")


def lora_by_name(name: str, have: dict[str, str]) -> str | None:
    """The path of <lora:NAME> among `have` ({stem: path}, list_loras) as A1111 finds it: the file of that stem,
    else the one file whose alias (`lora_alias`: kohya's ss_output_name) it is; None when there is neither.
    ValueError when several files have that alias (A1111 then takes file stems only)."""
    if name in have:
        return have[name]
    by_alias = [stem for stem, path in have.items() if lora_alias(path) == name]
    if len(by_alias) > 1:
        raise ValueError(f"<lora:{name}>: the alias (ss_output_name) of {len(by_alias)} LoRA files "
                         f"({_names(by_alias)}); name one by its file name")
    return have[by_alias[0]] if by_alias else None


_METADATA: dict[str, tuple[tuple[int, int], dict]] = {}  # path -> ((mtime_ns, size), lora_metadata's answer)


def lora_metadata(path: str) -> dict:
    """A LoRA file's safetensors metadata as A1111 reads it (its GET /sdapi/v1/loras "metadata": the string values,
    those holding a JSON object parsed); {} for a .pt/.ckpt or a header that can't be read. Cached per file
    version (path, modification time, size): a folder is listed often."""
    if not path.lower().endswith(".safetensors"):
        return {}
    try:
        st = os.stat(path)
        version = (st.st_mtime_ns, st.st_size)
        if _METADATA.get(path, (None,))[0] != version:
            meta = {}
            for k, v in safetensors_metadata(path).items():
                meta[k] = v
                if isinstance(v, str) and v.startswith("{"):
                    try:
                        meta[k] = json.loads(v)
                    except (ValueError, RecursionError):
                        pass
            _METADATA[path] = (version, meta)
        return _METADATA[path][1]
    except (CheckpointError, OSError):
        return {}


def lora_alias(path: str) -> str:
    """A1111's alias of a LoRA file, a second name for <lora:NAME>: kohya's ss_output_name from its metadata (the
    name it was trained under), else its file stem."""
    alias = lora_metadata(path).get("ss_output_name")
    return alias if isinstance(alias, str) and alias else Path(path).stem


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """The CLI's FILE[:WEIGHT] -> (FILE, WEIGHT); a FILE whose name holds ':' needs the weight given."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            if os.path.isfile(head) and not os.path.exists(arg):
                raise ValueError(f"--lora {arg}: the weight {tail!r} is not a number") from None
            return arg, 1.0
        if problem := _weight_problem(weight):
            raise ValueError(f"--lora {arg}: the weight {problem}")
        first = head.rpartition(":")[0]
        if first and not os.path.exists(head) and os.path.isfile(first):
            raise ValueError(f"--lora {arg}: one weight after the file (FILE:WEIGHT); separate text encoder and "
                             "UNet weights go in a prompt tag, <lora:NAME:TE:UNET>")
        return head, weight
    return arg, 1.0
