"""Pipeline: the three SD1.x models, the tokenizer and the settings they run with."""
from __future__ import annotations

import torch

from fastsd import backend as _backend
from fastsd.checkpoint import Checkpoint, build_models, resolve
from fastsd.config import SDConfig
from fastsd.models.clip import CLIPTextModel
from fastsd.models.unet import UNet
from fastsd.models.vae import AutoencoderKL
from fastsd.tensorfile import CheckpointError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, fp16, bf16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but this PyTorch sees no CUDA GPU")
    return device


class Pipeline:
    def __init__(self, clip: CLIPTextModel, vae: AutoencoderKL, unet: UNet, config: SDConfig, *,
                 tokenizer=None, device: torch.device, dtype: torch.dtype, backend: str = "auto",
                 name: str = "", kind: str = "sd1", path: str | None = None):
        self.clip, self.vae, self.unet, self.config = clip, vae, unet, config
        self.device, self.dtype, self.backend = device, dtype, _backend._check(backend)
        self.name, self.kind, self.path = name, kind, path
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fastsd.tokenizer import Tokenizer

            self._tokenizer = Tokenizer()
        return self._tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> CLIP hidden states (B, 77, D) (one 77-token chunk each; truncated)."""
        ids = self.tokenizer(prompts).to(self.device)
        with _backend.use(self.backend):
            hidden, _ = self.clip(ids, clip_skip=self.config.clip_skip)
        return hidden


def load_pipeline(source: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                  backend: str = "auto", seed: int = 0) -> Pipeline:
    """Load an SD1.x model: an LDM .safetensors/.ckpt file, a diffusers folder, a repo id in the local
    Hugging Face cache, or "random:sd15" / "random:tiny" (random weights from `seed`)."""
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    if _backend._check(backend) == "triton" and (why := _backend.triton_unavailable_reason(device)):
        raise _backend.BackendError(f"backend 'triton' was requested but {why}")
    src = resolve(source)
    clip, vae, unet, cfg = build_models(src, dtype=dtype, device=device, seed=seed)
    tokenizer = None
    if isinstance(src, Checkpoint) and src.tokenizer_dir is not None:
        from fastsd.tokenizer import Tokenizer

        tokenizer = Tokenizer(src.tokenizer_dir)
    if isinstance(src, Checkpoint):
        return Pipeline(clip, vae, unet, cfg, tokenizer=tokenizer, device=device, dtype=dtype, backend=backend,
                        name=src.name, kind=src.kind, path=src.path)
    return Pipeline(clip, vae, unet, cfg, device=device, dtype=dtype, backend=backend, name=source,
                    kind="sd1-inpainting" if cfg.unet.in_channels == 9 else "sd1")


__all__ = ["Pipeline", "load_pipeline", "CheckpointError"]
