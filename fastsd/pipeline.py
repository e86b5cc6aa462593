"""Pipeline: the three SD1.x models and the tokenizer; txt2img, img2img and inpainting share one loop."""
from __future__ import annotations

import contextlib
import dataclasses
import random
import warnings
from dataclasses import dataclass

import torch
from PIL import Image

from fastsd import backend as _backend
from fastsd.checkpoint import Checkpoint, build_models, resolve
from fastsd.conditioning import encode_prompts
from fastsd import cpu_pack, cpuinfo
from fastsd.config import SDConfig
from fastsd.denoisers import CFGDenoiser, EpsDenoiser
from fastsd.image import check_mask, file_hash, format_infotext, mask_to_tensor, pil_to_tensor, tensor_to_pil
from fastsd.models.clip import CLIPTextModel
from fastsd.models.unet import UNet
from fastsd.models.vae import AutoencoderKL
from fastsd.samplers import A1111_NAMES, get_sampler
from fastsd.schedules import alphas_cumprod
from fastsd.tensorfile import CheckpointError
from fastsd.tiling import tiled

TILE_ABOVE = 1024  # pixels on a side above which the VAE runs tiled (automatic)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; on a CPU bf16 when it has native bf16, else fp32. On the 2-core EPYC (README
    "Performance"): SD1.5 UNet step at 64x64 latents 3.06 s in bf16 vs 4.59 s in fp32, and the bf16
    image of a seed is close to the fp32 one (PSNR from `python -m fastsd.benchmarks.quality`)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpuinfo.native_bf16() else torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
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


@dataclass
class GenerationSettings:
    """What `Pipeline.generate` takes besides images; validated before any model runs."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "euler_a"
    seed: int | None = None
    width: int | None = None  # None: the init image's size, else 512
    height: int | None = None
    num_images: int = 1
    strength: float = 0.8
    clip_skip: int = 1
    img2img: bool = False  # set by generate: adds "Denoising strength" to the infotext

    def validate(self, *, has_image: bool, has_mask: bool) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")
        if has_image and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if has_mask and not has_image:
            raise ValueError("a mask needs an init image (the image to inpaint)")
        if self.clip_skip < 1:
            raise ValueError(f"clip_skip must be at least 1, got {self.clip_skip}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        get_sampler(self.sampler)  # raises, listing the valid names

    def kwargs(self) -> dict:
        """The arguments of Pipeline.generate these settings stand for."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "img2img"}


class Pipeline:
    def __init__(self, clip: CLIPTextModel, vae: AutoencoderKL, unet: UNet, config: SDConfig, *,
                 tokenizer=None, device: torch.device, dtype: torch.dtype, backend: str = "auto",
                 name: str = "", kind: str = "sd1", path: str | None = None):
        self.clip, self.vae, self.unet, self.config = clip, vae, unet, config
        self.device, self.dtype, self.backend = device, dtype, _backend._check(backend)
        self.name, self.kind, self.path = name, kind, path
        if _backend.cpu_tuned(device, self.backend):
            # activations in channels_last (oneDNN's native layout); conv and linear weights packed at their
            # first call where measured faster (fastsd/cpu_pack.py)
            for model in (unet, vae, clip):
                cpu_pack.make_packable(model.to(memory_format=torch.channels_last))
        self._tokenizer = tokenizer
        self.offload = False  # keep each model on the CPU except while it runs (CUDA only)
        self._hash: str | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fastsd.tokenizer import Tokenizer

            self._tokenizer = Tokenizer()
        return self._tokenizer

    @contextlib.contextmanager
    def _running(self, model: torch.nn.Module):
        """Run a block with `model` on the device; with offload (CUDA), it goes back to the CPU afterwards."""
        if self.offload and self.device.type != "cpu":
            model.to(self.device)
            try:
                with _backend.use(self.backend):
                    yield model
            finally:
                model.to("cpu")
                torch.cuda.empty_cache()
        else:
            packed = cpu_pack.PACKED[0]
            with _backend.use(self.backend):
                yield model
            if cpu_pack.PACKED[0] != packed:
                cpu_pack.release_freed_memory()  # the dense weights that packing replaced

    def model_hash(self) -> str | None:
        """A1111's short model hash (sha256[:10] of the checkpoint file); None for folders and random weights."""
        if self._hash is None and self.path is not None:
            self._hash = file_hash(self.path)
        return self._hash

    def infotext(self, s: GenerationSettings, seed: int) -> str:
        params = {"Steps": s.steps, "Sampler": A1111_NAMES[get_sampler(s.sampler).name], "CFG scale": s.guidance_scale,
                  "Seed": seed, "Size": f"{s.width}x{s.height}", "Model hash": self.model_hash(), "Model": self.name,
                  "Denoising strength": s.strength if s.img2img else None,
                  "Clip skip": s.clip_skip if s.clip_skip != 1 else None}
        return format_infotext(s.prompt, s.negative_prompt, params)

    # ---- VAE ------------------------------------------------------------------------------------------

    def _tile(self, tiled_vae: bool | None, width: int, height: int) -> bool:
        return tiled_vae if tiled_vae is not None else max(width, height) > TILE_ABOVE

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator] | None,
                      tiled_vae: bool | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents; sampled from the posterior with each image's generator
        (as diffusers' retrieve_latents), or its mean when generators is None."""
        f = self.config.vae.downscale
        with self._running(self.vae) as vae:
            x = images.to(self.device)
            if self._tile(tiled_vae, x.shape[3], x.shape[2]):
                moments = tiled(lambda t: torch.cat(vae.encode(t), 1), x, tile=512, overlap=64, scale=1 / f)
                mean, logvar = moments.chunk(2, dim=1)
            else:
                mean, logvar = (m.float() for m in vae.encode(x))
        if generators is not None:
            noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators]).to(mean.device)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.config.vae.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, tiled_vae: bool | None = None) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in ~[-1, 1]. On fp16, a decode that yields NaN/inf is redone
        in fp32 with a warning (A1111's behaviour; SD1.x VAEs can overflow in fp16)."""
        z = latents / self.config.vae.scale_factor
        f = self.config.vae.downscale
        use_tiles = self._tile(tiled_vae, z.shape[3] * f, z.shape[2] * f)
        with self._running(self.vae) as vae:
            def run() -> torch.Tensor:
                if use_tiles:
                    return tiled(vae.decode, z, tile=64, overlap=8, scale=f)
                return vae.decode(z).float()

            out = run()
            if self.dtype == torch.float16 and not torch.isfinite(out).all():
                warnings.warn("the fp16 VAE decode produced NaN/inf; decoding again in fp32", stacklevel=2)
                vae.float()
                try:
                    out = run()
                finally:
                    vae.to(self.dtype)
        return out

    # ---- generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int = 20, guidance_scale: float = 7.5,
                 sampler: str = "euler_a", seed: int | None = None, width: int | None = None,
                 height: int | None = None, num_images: int = 1, image: Image.Image | None = None,
                 strength: float = 0.8, mask: Image.Image | None = None, latents: torch.Tensor | None = None,
                 progress: bool = True, clip_skip: int | None = None,
                 tiled_vae: bool | None = None) -> list[Image.Image]:
        """txt2img; img2img when `image` is given; inpainting when `mask` is given too (white = repaint).

        Image i of a batch uses seed + i (A1111), so any image can be made again alone. `latents` are
        unit-variance start noise (num_images, 4, H/8, W/8), scaled by the sampler's initial sigma exactly as
        diffusers does. strength follows diffusers: int(steps * strength) steps from the matching point."""
        s = GenerationSettings(prompt, negative_prompt, steps, guidance_scale, sampler,
                               random.randrange(2**32) if seed is None else seed, width, height, num_images,
                               strength, self.config.clip_skip if clip_skip is None else clip_skip)
        s.validate(has_image=image is not None, has_mask=mask is not None)
        images = self._generate(s, image, mask, latents, progress, tiled_vae)
        for i, im in enumerate(images):  # as A1111: each image carries its own infotext (seed + i)
            im.info["parameters"] = self.infotext(s, s.seed + i)
        return images

    def _generate(self, s: GenerationSettings, image, mask, latents, progress, tiled_vae) -> list[Image.Image]:
        spec = get_sampler(s.sampler)
        sched = spec.schedule(s.steps, self.config.scheduler)
        gens = [torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)]
        inpaint_model = self.config.unet.in_channels == 9

        init = mask_t = None
        if image is not None:
            check_mask(image, mask)
            s.width = s.width or image.width // 8 * 8
            s.height = s.height or image.height // 8 * 8
            size = (s.width, s.height)
            init = pil_to_tensor(image.resize(size, Image.LANCZOS) if image.size != size else image)
            if mask is not None:
                mask_t = mask_to_tensor(mask.resize(size, Image.NEAREST) if mask.size != size else mask)
        s.width, s.height = s.width or 512, s.height or 512
        s.img2img = image is not None
        f = self.config.vae.downscale
        shape = (s.num_images, self.config.unet.out_channels, s.height // f, s.width // f)

        # Text: prompt and negative prompt in one call, so both get the same number of 77-token chunks.
        with self._running(self.clip) as clip:
            ctx = encode_prompts(clip, self.tokenizer, [s.prompt, s.negative_prompt], clip_skip=s.clip_skip,
                                 device=self.device)
        cond, uncond = ctx[:1], ctx[1:]

        # Image latents (img2img / inpainting); diffusers draws the VAE posterior noise first, then the start noise.
        x0 = None
        if init is not None and not (inpaint_model and s.strength == 1.0):
            x0 = self.encode_images(init.expand(s.num_images, -1, -1, -1), gens, tiled_vae)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            noise = latents.float().to(self.device)
        else:
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(self.device)

        if x0 is None or s.strength == 1.0 and inpaint_model:
            x = noise * sched.init_noise_sigma
        else:
            start = sched.img2img_start(s.strength)
            if start >= len(sched):
                raise ValueError(f"strength {s.strength} x {s.steps} steps leaves no step to run; raise either")
            sched = sched.tail(start)
            x = x0 + noise * float(sched.sigmas[0])

        extra, mask_lat = {}, None
        if mask_t is not None:
            mask_lat = torch.nn.functional.interpolate(mask_t, size=shape[2:]).to(self.device)  # (1, 1, h, w)
        if inpaint_model:  # 9-channel UNet: [x, mask, masked-image latents]; no mask = repaint everything
            m = mask_t if mask_t is not None else torch.ones(1, 1, s.height, s.width)
            masked = (init if init is not None else torch.zeros(1, 3, s.height, s.width)) * (m < 0.5)
            masked_lat = self.encode_images(masked, None, tiled_vae)
            m_lat = mask_lat if mask_lat is not None else torch.ones(1, 1, *shape[2:], device=self.device)
            extra["c_concat"] = torch.cat([m_lat, masked_lat], 1).expand(s.num_images, -1, -1, -1)

        with self._running(self.unet) as unet:
            den = EpsDenoiser(lambda x_in, t, context: unet(x_in, t, context), alphas_cumprod(self.config.scheduler),
                              schedule=sched)
            model = CFGDenoiser(den, cond, uncond if s.guidance_scale != 1.0 else None, s.guidance_scale)
            if mask_lat is not None and not inpaint_model:
                model = KnownRegionDenoiser(model, x0, mask_lat)
            opts = {}
            if spec.stochastic:
                opts["noise_sampler"] = lambda sigma, sigma_next: torch.cat(
                    [torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(self.device)
            x = spec(model, x, sched.sigmas, extra_args=extra, disable=not progress, **opts)
        x = x * sched.out_scale
        if mask_lat is not None and not inpaint_model:
            x = x0 * (1 - mask_lat) + x * mask_lat
        return tensor_to_pil(self.decode_latents(x, tiled_vae))


class KnownRegionDenoiser:
    """4-channel-model inpainting (A1111's way): after every model call the known region's prediction is
    replaced by the image's own latents, so each step re-noises them from the sampler's current noise."""

    def __init__(self, model, x0: torch.Tensor, mask: torch.Tensor):
        self.model, self.x0, self.mask = model, x0, mask  # mask (1, 1, h, w): 1 = repaint

    def __call__(self, x: torch.Tensor, sigma, **extra) -> torch.Tensor:
        return self.x0 * (1 - self.mask) + self.model(x, sigma, **extra) * self.mask


def load_pipeline(source: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                  backend: str = "auto", seed: int = 0) -> Pipeline:
    """Load an SD1.x model: an LDM .safetensors/.ckpt file, a diffusers folder, a repo id in the local
    Hugging Face cache, or "random:sd15" / "random:tiny" (random weights from `seed`)."""
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpuinfo.native_bf16():
        warnings.warn("bf16 is emulated on this CPU (no AVX512-BF16/AMX): it runs, but fp32 is faster here "
                      "(--dtype fp32, the default on this CPU)", stacklevel=2)
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
