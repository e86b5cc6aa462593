"""Upscaler model files (A1111's models/ESRGAN, models/RealESRGAN and models/SwinIR): ESRGAN / Real-ESRGAN RRDBNet
models (4x-UltraSharp, RealESRGAN_x4plus, ..._anime_6B, RealESRGAN_x2plus, BSRGAN), Real-ESRGAN's compact
SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3) and SwinIR (SwinIR_4x = the official SwinIR-L x4
real-world model, the classical, lightweight and real-world SR ones), found by file stem in a folder (as A1111 lists
them), read strictly, and run as A1111 does: the image in tiles of 192 px overlapping by 8 (its ESRGAN_tile and
SWIN_tile defaults; SwinIR pads each tile to its window), the model run again until the image covers the size asked
for (at most 3 times), then Lanczos to that size.

Files: `.safetensors` first, `.pth`/`.pt`/`.ckpt`/`.bin` only through torch.load(weights_only=True); Real-ESRGAN's
`{"params_ema": ...}` / `{"params": ...}` wrappers are looked into. The original ESRGAN keys (`model.N`) and the
ESRGAN repository's later ones (`RRDB_trunk`) are renamed to Real-ESRGAN's by rule (fastsd/convert.py); SwinIR
files' computed buffers (relative position index, shift mask) are left unread. Every other architecture (Swin2SR,
HAT, DAT, ...) is refused in one line naming what was found.

fastsd downloads nothing, so A1111's built-in names ("R-ESRGAN 4x+", ...) mean the file A1111 would download
for them (`A1111_FILES`), found in the folder like any other.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from fastsd.files import files_by_stem
from fastsd.hires import MODEL_EXTS as EXTS

UPSCALER_DIR_ENV = "FASTSD_UPSCALER_DIR"
TILE, OVERLAP = 192, 8  # A1111's ESRGAN_tile / ESRGAN_tile_overlap defaults (input pixels)
MAX_PASSES = 3  # A1111's Upscaler.upscale runs a model at most 3 times
# A1111's built-in Real-ESRGAN / ESRGAN / SwinIR upscaler names -> the file it downloads for each (the stem).
A1111_FILES = {"R-ESRGAN 4x+": "RealESRGAN_x4plus", "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
               "R-ESRGAN 2x+": "RealESRGAN_x2plus", "R-ESRGAN General 4xV3": "realesr-general-x4v3",
               "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3", "R-ESRGAN AnimeVideo": "realesr-animevideov3",
               "ESRGAN_4x": "ESRGAN_4x", "SwinIR 4x": "SwinIR_4x"}


def list_upscalers(folder: str | None) -> dict[str, str]:
    """{name: path} of the upscaler files in `folder` and its subfolders: each file by its stem (A1111's names for
    models/ESRGAN), and A1111's built-in name of a file A1111 downloads (`A1111_FILES`) when that file is there;
    sorted by name."""
    files = files_by_stem(folder, EXTS)
    aliases = {name: files[stem] for name, stem in A1111_FILES.items() if stem in files}
    return dict(sorted({**files, **aliases}.items()))


def upscaler_path(name: str, folder: str | None) -> str:
    """The file of upscaler `name` in `folder` (a stem, or an A1111 built-in name such as "R-ESRGAN 4x+");
    ValueError naming what the folder has."""
    from fastsd.lora import check_lora_name

    try:
        check_lora_name(name)
    except ValueError:
        raise ValueError(f"upscaler {name!r}: an upscaler is named by its file name in the upscaler folder, "
                         "without a path") from None
    if not folder:
        raise ValueError(f"upscaler {name!r} needs an upscaler folder: --upscaler-dir DIR or ${UPSCALER_DIR_ENV}")
    if not os.path.isdir(folder):
        raise ValueError(f"upscaler folder {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder"))
    have = list_upscalers(folder)
    if name in have:
        return have[name]
    want = f" (A1111 downloads {A1111_FILES[name]}.pth for it; fastsd downloads nothing)" if name in A1111_FILES else ""
    shown = ", ".join(repr(n) for n in list(have)[:12]) + (", ..." if len(have) > 12 else "")
    raise ValueError(f"upscaler {name!r}: not one of A1111's built-in upscalers, and no such model in {folder}{want} "
                     f"(it has: {shown or 'no upscaler files'})")


@dataclass(frozen=True)
class UpscalerSource:
    """An upscaler file found and checked (headers and shapes), not read yet."""

    arch: str     # "ESRGAN" (RRDBNet), "Compact" (SRVGGNetCompact) or "SwinIR"
    config: object
    refs: dict
    path: str

    @property
    def scale(self) -> int:
        return self.config.scale

    def module(self):
        import torch

        from fastsd.models.compact import SRVGGNetCompact
        from fastsd.models.esrgan import RRDBNet
        from fastsd.models.swinir import SwinIR

        with torch.device("meta"):
            return {"ESRGAN": RRDBNet, "Compact": SRVGGNetCompact, "SwinIR": SwinIR}[self.arch](self.config)


def read_upscaler(path: str) -> UpscalerSource:
    """Find the architecture and config of an upscaler file and check its keys and shapes strictly; reads the
    header (safetensors) or the pickle's tensors lazily. CheckpointError (one line) for anything else."""
    from fastsd import convert
    from fastsd.checkpoint import mismatches
    from fastsd.tensorfile import CheckpointError, read_pickle_checkpoint, read_tensor_file, shown

    # (Real-ESRGAN's .pth wrappers, then a generic one)
    refs = (read_tensor_file(path) if path.lower().endswith(".safetensors") else
            read_pickle_checkpoint(path, ("params_ema", "params", "state_dict")))
    keys = list(refs)
    try:
        if convert.SWINIR_KEY in refs:  # (before ESRGAN: SwinIR has a conv_first too)
            refs = convert.swinir_keys(refs)
            arch, cfg = "SwinIR", convert.swinir_config_from_keys(refs)
        elif any(k.startswith(("model.0.", "RRDB_trunk.")) for k in keys) or (
                any(k.startswith("conv_first.") for k in keys) and not any(k.startswith("layers.") for k in keys)):
            refs = convert.esrgan_keys(refs)
            arch, cfg = "ESRGAN", convert.esrgan_config_from_keys(refs)
        elif "body.0.weight" in refs and "body.1.weight" in refs and len(refs["body.1.weight"].shape) == 1:
            arch, cfg = "Compact", convert.compact_config_from_keys(refs)
        else:
            sample = ", ".join(shown(k) for k in keys[:4]) or "no tensors"
            raise CheckpointError(f"not an ESRGAN / Real-ESRGAN / SwinIR upscaler (keys {sample}); fastsd reads "
                                  "RRDBNet (ESRGAN, Real-ESRGAN, BSRGAN), SRVGGNetCompact (realesr-general-x4v3) "
                                  "and SwinIR models")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if cfg.in_channels != 3 or cfg.out_channels != 3:
        raise CheckpointError(f"{path}: an upscaler for {cfg.in_channels}-channel images into {cfg.out_channels}; "
                              "fastsd upscales RGB (3 -> 3)")
    src = UpscalerSource(arch, cfg, refs, path)
    problems = [p for p in mismatches(src.module(), refs) if p]
    if problems:
        raise CheckpointError(f"{path}: {arch} upscaler weights do not fit the model read from them: "
                              + "; ".join(problems))
    return src


class Upscaler:
    """A loaded upscaler model: `run` is one pass (scale x), `upscale` A1111's rule to a size."""

    def __init__(self, src: UpscalerSource, *, dtype=None, device="cpu"):
        import torch

        from fastsd.checkpoint import fill

        self.name = os.path.splitext(os.path.basename(src.path))[0]
        self.path, self.arch, self.config = src.path, src.arch, src.config
        self.scale, self.device = src.scale, torch.device(device)
        self.unshuffle = getattr(src.config, "unshuffle", 1)
        self.model = fill(src.module(), src.refs, dtype=dtype or torch.float32, device=torch.device(device))
        self.memory_format = torch.channels_last  # (measured faster on the CPU than contiguous)
        self.model.requires_grad_(False).to(memory_format=self.memory_format)
        self.running = lambda model: contextlib.nullcontext()  # wraps each run (a pipeline's backend sets it)

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def run(self, image, *, tile: int = TILE, overlap: int = OVERLAP, on_tile=None):
        """One pass of the model over a PIL image (RGB): scale x its size, in tiles of `tile` input pixels
        (0: the whole image at once) blended over `overlap` pixels (fastsd.tiling's linear ramps). `on_tile(i, n)`
        before tile i of n (0-based): progress, and an exception it raises stops the pass (a server's /interrupt)."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image

        from fastsd.tiling import tile_count, tiled

        rgb = np.asarray(image.convert("RGB"))
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().div_(255)
        h, w = x.shape[2:]
        limit = getattr(self.config, "max_input", None)  # (a SwinIR with an absolute position embedding)
        if limit:
            tile = min(tile or limit, limit)
        u = self.unshuffle  # the x2 / x1 models fold u x u pixel blocks: sizes padded to a multiple of u
        pad_h, pad_w = -h % u, -w % u
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

        tiles = tile and max(x.shape[2:]) > tile
        total = tile_count(*x.shape[2:], tile=tile - tile % u, overlap=overlap) if tiles else 1
        done = 0

        def fn(part: torch.Tensor) -> torch.Tensor:
            nonlocal done
            if on_tile is not None:
                on_tile(done, total)
            done += 1
            part = part.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
            return self.model(part).float()

        with torch.inference_mode(), self.running(self.model):
            if tiles:
                y = tiled(fn, x, tile=tile - tile % u, overlap=overlap, scale=self.scale)
            else:
                y = fn(x)
            y = y[0, :, :h * self.scale, :w * self.scale].clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        out = y.permute(1, 2, 0).contiguous().numpy()
        return Image.fromarray(out, "RGB")

    def upscale(self, image, width: int, height: int, *, tile: int = TILE, overlap: int = OVERLAP):
        """A1111's images.resize_image (resize mode 0) with this upscaler: when (width, height) is larger than the
        image, `upscale_by` with the model (passes until it covers the scaled size rounded down to 8 px, then
        Lanczos to that size); then Lanczos to width x height."""
        return resize_with(image, width, height, lambda im: self.run(im, tile=tile, overlap=overlap))


def resize_with(image, width: int, height: int, one_pass=None):
    """A1111's images.resize_image (resize mode 0) with an upscaler: when (width, height) is larger than the image,
    `upscale_by` with `one_pass` (its do_upscale; None: A1111's "None", no upscale); then Lanczos to width x
    height."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    if one_pass is not None and scale > 1.0:
        image = upscale_by(image, scale, one_pass)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return image


def upscale_by(image, scale: float, one_pass, dest: tuple[int, int] | None = None):
    """A1111's Upscaler.upscale: `one_pass` (an upscaler's do_upscale: a model's run, or `resample_pass`) again while
    the image does not cover `dest` (default: the size times `scale`, rounded down to 8 px) -- at most 3 times, once
    at scale 1 (1x models), and a pass that changes nothing ends it -- then Lanczos to `dest`."""
    from PIL import Image

    dest = dest or (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    for i in range(MAX_PASSES):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        before = image.size
        image = one_pass(image)
        if image.size == before:
            break
    if image.size != dest:
        image = image.resize(dest, resample=Image.LANCZOS)
    return image


def resample_pass(resample, scale: float):
    """A1111's UpscalerLanczos / UpscalerNearest do_upscale: one PIL resize by `scale`."""
    return lambda im: im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)


def load_upscaler(path: str, *, dtype=None, device="cpu", backend=None) -> Upscaler:
    """An upscaler file, checked and loaded (fp32 unless `dtype`); prepared by `backend` (a fastsd.backends
    Backend: the cpu backend's packed weights and Winograd convolutions run it 1.2-1.8x faster in fp32, README
    "Upscaler models") when one is given, as a pipeline's is. SwinIR runs fp16 in fp32 (its attention logits and
    LayerNorms overflow fp16; spandrel marks it fp32/bf16 only)."""
    import torch

    src = read_upscaler(path)
    if src.arch == "SwinIR" and dtype == torch.float16:
        dtype = torch.float32
    up = Upscaler(src, dtype=dtype, device=device)
    if backend is not None:
        backend.prepare_standalone(up.model)
        up.running = backend.running
    return up


def extras_target(size: tuple[int, int], scale: float | None = None, resize: tuple[int, int] | None = None,
                  crop: bool = True) -> tuple[float, tuple[int, int], tuple[int, int] | None]:
    """A1111's postprocessing upscale sizes for an image of `size`: (scale, the size made (A1111's Upscaler.upscale
    rounds it down to 8 px), the canvas of a crop or None). By `scale`, or to `resize` (w, h): scaled to cover it,
    then centred on a canvas of that size when `crop` (A1111's upscaling_crop)."""
    if resize is not None:
        scale = max(resize[0] / size[0], resize[1] / size[1])
    dest = (int(size[0] * scale // 8 * 8), int(size[1] * scale // 8 * 8))
    return scale, dest, (resize if resize is not None and crop else None)


def centred(image, canvas: tuple[int, int] | None):
    """A1111's crop of a postprocessing upscale: `image` pasted centred on a black canvas (None: as it is)."""
    if canvas is None:
        return image
    from PIL import Image

    out = Image.new("RGB", canvas)
    out.paste(image, box=(canvas[0] // 2 - image.width // 2, canvas[1] // 2 - image.height // 2))
    return out
