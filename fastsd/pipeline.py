"""Pipeline: the three SD1.x models, the tokenizer and one backend, and generation in stages:
`encode_prompt` -> `prepare_latents` -> `denoise` -> `decode`; `generate` composes them for txt2img,
img2img and inpainting (callers such as the benchmark suite or a batch runner can call the stages).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections import Counter
import random
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from fastsd import backends, color_correction, hires
from fastsd.a1111 import sampler_fields, twins_as_a1111
from fastsd.conditioning import encode_prompts
from fastsd.config import SDConfig
from fastsd.denoisers import CFGDenoiser, EpsDenoiser, KnownRegionDenoiser, ScheduledContext
from fastsd.file_hashes import file_hash
from fastsd.image import (check_mask, checked_8bit, format_infotext, latents_preview, mask_to_tensor, pil_to_tensor,
                          tensor_to_pil)
from fastsd.lora import LoraSet, parse_prompt, strip_tags
from fastsd.masking import RESIZE_MODES, binary_mask, resize_image
from fastsd.models.clip import CLIPTextModel
from fastsd.models.taesd import NO_ENCODER, TAESD
from fastsd.models.unet import UNet
from fastsd.models.vae import AutoencoderKL
from fastsd.philox import PhiloxGenerator
from fastsd.prompt_schedule import may_have_schedule, prompt_schedule, split_and
from fastsd.samplers import (CHURN_SAMPLERS, ETA_SAMPLERS, S_NOISE_SAMPLERS, SAMPLERS, SIGMA_KEYS,
                             brownian_noise_sampler, get_sampler, prompt_steps, sigma_params)
from fastsd.schedule_types import AUTOMATIC, DISCARD_PENULTIMATE, resolve_schedule_type, typed_schedule
from fastsd.schedules import Schedule, alphas_cumprod
from fastsd.settings import GenerationSettings, check_bool, plain
from fastsd.tiling import tiled

TILE_ABOVE = 1024  # pixels on a side above which the VAE runs tiled (automatic)
MASKED_CONTENT = ("original", "latent noise", "latent nothing")  # prepare_latents' masked_content
LATENT_RESIZE_MASK = ("resize_mode 3 (latent upscale) takes no mask unless the init image has the output size (A1111 "
                      "fails on it: its fill and overlay are at the image's size, the mask at the output's)")
# prepare_latents' latent_mask: how the mask comes to latent size. "nearest": the thresholded mask sampled
# (diffusers' interpolate); "bicubic": the mask (as given: blurred, grey levels) shrunk by PIL's bicubic then
# rounded (A1111's latmask with mask_round); "bicubic-soft": not rounded (A1111 with mask_round off).
LATENT_MASKS = ("nearest", "bicubic", "bicubic-soft")
OnStep = Callable[[int, int, Image.Image], None]


class Interrupted(Exception):
    """Raised by an `on_step` callback to stop a generation. `generate` lets it through, or, with
    `on_interrupt="decode"`, returns the images of the prediction at the step it stopped after (A1111's interrupt
    and skip). On its way out of `denoise` it carries that prediction, `latents` (scaled latents as `denoise`
    returns them), and `step`, the steps done."""

    latents: torch.Tensor | None = None
    step: int = 0


Generator = Union[torch.Generator, PhiloxGenerator]  # an image's noise stream: torch's CPU one, or CUDA's numbers


def seeded_noise(generators: list[Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal noise, one (1, *shape) draw per generator (image i's stream), concatenated: the
    start noise, the VAE posterior noise and the samplers' step noise all come from here."""
    return torch.cat([g.randn((1, *shape)) if isinstance(g, PhiloxGenerator) else
                      torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def eta_infotext(s: GenerationSettings) -> dict:
    """A1111's "Eta" / "Eta DDIM" key of settings whose sampler runs with an eta other than its default."""
    default, key = ETA_SAMPLERS.get(get_sampler(s.sampler).name, (None, None))
    return {key: s.eta} if key is not None and s.eta is not None and s.eta != default else {}


def draws_noise(s: GenerationSettings) -> bool:
    """Whether the first pass of `s` draws sampler noise from the images' generators (what ENSD changes): a stochastic
    sampler not on A1111's Brownian noise, or a churning one. (A1111 writes "ENSD" by its first pass's sampler only,
    though ENSD reseeds its hires pass's noise too.)"""
    spec = get_sampler(s.sampler)
    return (spec.stochastic and not spec.brownian) or _churns(s, spec.name)


def _churns(s: GenerationSettings, sampler: str) -> bool:
    return s.s_churn > 0 and sampler in CHURN_SAMPLERS


def _scaled(noise_sampler, scale: float):
    """A noise sampler's draws times `scale` (A1111's s_noise, which k-diffusion's samplers multiply their noise by)."""
    return lambda sigma, sigma_next: noise_sampler(sigma, sigma_next) * scale


def seeded_generators(seeds: list[int], offset: int = 0, source: str = "CPU") -> list[Generator]:
    """A fresh generator per image, seeded with its seed (+ offset): A1111's randn_source `source`, "CPU" torch's
    CPU generator, "GPU" and "NV" CUDA's numbers (fastsd.philox)."""
    if source == "CPU":
        return [torch.Generator().manual_seed(seed + offset) for seed in seeds]
    return [PhiloxGenerator(seed + offset) for seed in seeds]


def sampler_generators(s: GenerationSettings, seeds: list[int], gens: list[Generator]) -> list[Generator]:
    """The generators a sampler's noise comes from after the start noise was drawn from `gens`: the same ones, going
    on (A1111's ImageRNG.next), or with A1111's eta_noise_seed_delta (ENSD) fresh ones of seed + ENSD, as its
    ImageRNG.first replaces them."""
    return seeded_generators(seeds, s.eta_noise_seed_delta, s.randn_source) if s.eta_noise_seed_delta else gens


def first_draws(seeds: list[int], shape: tuple[int, ...], device: torch.device, source: str = "CPU") -> torch.Tensor:
    """Each seed's first standard normal draw of `shape` from a fresh generator (A1111's randn(seed, shape))."""
    return seeded_noise(seeded_generators(seeds, source=source), shape, device)


def variation_noise(noise: torch.Tensor, subnoise: torch.Tensor, strength: float) -> torch.Tensor:
    """A1111's variation seed: each image's start noise (B, C, H, W) moved toward its variation noise by spherical
    interpolation, per (channel, column) as A1111's slerp does it on one image's (C, H, W); where the two are
    almost parallel, its linear fallback (as written there: noise * strength + subnoise * (1 - strength))."""
    dot = (noise / noise.norm(dim=2, keepdim=True) * (subnoise / subnoise.norm(dim=2, keepdim=True))).sum(2)
    out = []
    for lo, hi, d in zip(noise, subnoise, dot):  # A1111 decides the fallback per image
        if d.mean() > 0.9995:
            out.append(lo * strength + hi * (1 - strength))
            continue
        omega = torch.acos(d)
        so = torch.sin(omega)
        out.append((torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * lo
                   + (torch.sin(strength * omega) / so).unsqueeze(1) * hi)
    return torch.stack(out)


def paste_centred(noise: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """A1111's seed resize: `small` (B, C, h, w) laid centred over `noise` (B, C, H, W) (a copy), cropped centred
    where it is larger; the offsets are A1111's floor halves ((H - h) // 2, so an odd surplus crops one more row at
    the start, and an odd shortfall, as there, leaves the last row/column of `noise`)."""
    out = noise.clone()
    (h, w), (H, W) = small.shape[2:], noise.shape[2:]
    dy, dx = (H - h) // 2, (W - w) // 2
    ph, pw = h + 2 * min(dy, 0), w + 2 * min(dx, 0)  # the part that is pasted
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, :, ty:ty + ph, tx:tx + pw] = small[:, :, sy:sy + ph, sx:sx + pw]
    return out


@dataclass
class Prepared:
    """What the denoising loop starts from (prepare_latents' result)."""

    x: torch.Tensor                     # start sample in k-space at schedule.sigmas[0]
    schedule: Schedule
    generators: list[Generator]   # one per image: seed + i
    x0: torch.Tensor | None = None      # image latents (img2img / inpainting)
    mask: torch.Tensor | None = None    # (1, 1, h, w) latent mask, 1 = repaint (4-channel inpainting)
    extra: dict = field(default_factory=dict)  # c_concat for 9-channel inpainting models
    full_sigmas: torch.Tensor | None = None  # the whole schedule when `schedule` is its tail (img2img, hires fix):
    # what A1111's Brownian noise spans (None: schedule.sigmas)
    seeds: list[int] | None = None  # the images' seeds (A1111's Brownian noise is seeded by them; None: the
    # generators' seeds)


def _holding(what: str):
    """A Pipeline method that holds the pipeline while it runs (Pipeline._exclusive)."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with self._exclusive(what):
                return method(self, *args, **kwargs)
        return run
    return wrap


class Pipeline:
    def __init__(self, clip: CLIPTextModel, vae: AutoencoderKL | TAESD, unet: UNet, config: SDConfig, *,
                 tokenizer=None, device: torch.device, dtype: torch.dtype, backend: str = "auto",
                 name: str = "", kind: str = "sd1", path: str | None = None):
        self.clip, self.vae, self.unet, self.config = clip, vae, unet, config
        self.device, self.dtype = device, dtype
        self.name, self.kind, self.path = name, kind, path
        self._backend = backends.get(backend, device, dtype)
        for model in self.models():
            self._backend.prepare(model)
        self._tokenizer = tokenizer
        self.offload = False  # keep each model on the CPU except while it runs (CUDA only)
        self._hash: str | None = None
        self._loras = LoraSet()
        self.vae_name: str | None = None  # a VAE that replaced the model's (set_vae): infotext "VAE"
        self._vae_file: str | None = None
        self._vae_hash: str | None = None
        self.embeddings = None  # fastsd.embeddings.Embeddings: textual inversions named in prompts (load_embeddings)
        self._upscaler = None  # (path, mtime, fastsd.upscalers.Upscaler): the hires fix's last upscaler model
        self._lock = threading.Lock()  # generate and what changes the models run one at a time (`_exclusive`)
        self._owner: int | None = None  # the thread holding it

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        """Hold the pipeline for `what` (a generation, or a change of its LoRAs, VAE, embeddings or backend):
        another thread's call waits for it; a call from inside it (an on_step callback) is a ValueError, as it
        would change the models under the running generation or wait for ever."""
        if self._owner == threading.get_ident():
            raise ValueError(f"{what}: called from inside a generation of this pipeline (an on_step callback); "
                             "call it before or after generate")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    # ---- the VAE and the embeddings -----------------------------------------------------------------------

    @_holding("set_vae")
    def set_vae(self, vae: AutoencoderKL | TAESD, name: str | None = None, path: str | None = None, *,
                prepared: bool = False) -> None:
        """Replace the VAE by a built one, named in the infotext by `name` ("VAE") and the hash of the file
        `path` ("VAE hash"). A TAESD takes the place of the KL VAE (decode, encode, previews). `prepared`: `vae`
        was this pipeline's VAE before, under its current backend (prepared then): it is not prepared again."""
        if not isinstance(vae, (AutoencoderKL, TAESD)):
            raise TypeError(f"set_vae takes a built VAE (load_vae takes a path), got {type(vae).__name__}")
        if not prepared:
            self._backend.prepare(vae)
        self.vae = vae
        self.config = dataclasses.replace(self.config, vae=vae.cfg)  # config.vae: the VAE that runs
        self.vae_name, self._vae_file, self._vae_hash = name, path, None

    def load_vae(self, spec: str) -> None:
        """What load_pipeline's vae= takes (an LDM VAE file, a diffusers VAE folder, taesd:PATH), checked, then
        swapped in; on any error the current VAE stays."""
        from fastsd.vae_files import resolve_vae

        src = resolve_vae(spec, self.config)
        if src is None:  # ("none": the checkpoint's own VAE, which a pipeline given another VAE never read)
            raise ValueError("load_vae('none'): load the model again with vae='none' for the checkpoint's own VAE")
        self.set_vae(src.build(dtype=self.dtype, device=self.device), src.name, src.path)

    def check_can_encode(self, image: Image.Image | None, settings: GenerationSettings | None = None) -> None:
        """ValueError when this run must encode (an init image, a 9-channel model, the hires fix's image
        upscalers and upscaler models) but the VAE has no encoder (a decoder-only TAESD), so it fails before any work."""
        if getattr(self.vae, "encoder", 0) is not None:
            return
        if image is not None or self.config.unet.in_channels == 9:
            raise ValueError(NO_ENCODER)
        s = settings
        if s is not None and s.hires and hires.resolve_upscaler(s.hires_upscaler) not in hires.LATENT_MODES:
            raise ValueError(f"{NO_ENCODER} (the hires fix's {s.hires_upscaler!r} upscaler encodes its image; the "
                             "Latent ones don't)")

    def check_hires_upscaler(self, s: GenerationSettings) -> None:
        """Load the hires fix's upscaler model (kept for the run), so a bad file fails before any work."""
        if s.hires and (path := hires.resolve_upscaler(s.hires_upscaler)) not in hires.UPSCALERS:
            self.upscaler(path)

    @_holding("load_embeddings")
    def load_embeddings(self, path: str) -> list[str]:
        """Make the textual-inversion embeddings of a folder (searched recursively, as A1111) or of one file
        usable in prompts by their file names (A1111's rule). Returns the names added."""
        from fastsd.embeddings import pipeline_embeddings

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"load_embeddings takes a file or folder path, got {type(path).__name__}")
        return pipeline_embeddings(self).add(path)

    # ---- backend ----------------------------------------------------------------------------------------

    def models(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.clip) if m is not None]

    @property
    def backend(self) -> backends.Backend:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        """Switch backend on a live pipeline: the models are unprepared for the old one, prepared for the new."""
        new = backends.get(name, self.device, self.dtype)
        if new is self._backend:
            return
        with self._exclusive("backend"):
            for model in self.models():
                self._backend.unprepare(model)
                new.prepare(model)
            self._backend = new

    @contextlib.contextmanager
    def _running(self, model: torch.nn.Module):
        """Run a block with `model` on the device; with offload (CUDA), it goes back to the CPU afterwards."""
        if self.offload and self.device.type != "cpu":
            model.to(self.device)
            try:
                yield model
            finally:
                model.to("cpu")
                torch.cuda.empty_cache()
        else:
            with self._backend.running(model):
                yield model

    # ---- LoRA (fastsd/lora.py) --------------------------------------------------------------------------

    @_holding("load_lora")
    def load_lora(self, path: str, weight: float | tuple[float, float] = 1.0, *, keep_originals: bool = True
                  ) -> None:
        """Merge a LoRA file (kohya/A1111, LoCon, diffusers/PEFT) into the UNet and text encoder weights;
        `weight` is one multiplier for both or (text encoder, UNet), as A1111's <lora:NAME:TE:UNET>. The
        file is checked whole first: a bad one raises CheckpointError and leaves the model unchanged.
        keep_originals=False merges for good: the weights become the model's own (no copy of the replaced
        ones is kept; unload_loras leaves them), for a process that never unloads them (the CLI, serve --lora)."""
        self._loras.load(self, path, weight, keep_originals=keep_originals)

    @_holding("load_loras")
    def load_loras(self, items, *, keep_originals: bool = True) -> None:
        """load_lora of each (path, weight) in `items` (or (path, weight, name): the name prompt tags and the infotext
        use for it, e.g. the A1111 alias a <lora:NAME> tag found it by; default the file stem), merged in one pass: a
        layer several of them change is merged with each in turn (the bits of loading them one by one) and prepared
        once. All files are checked first;
        any failure leaves the model as it was (keep_originals=False: a failure while merging leaves a model that
        refuses to generate until loaded again; see LoraSet.load_many)."""
        self._loras.load_many(self, items, keep_originals=keep_originals)

    @_holding("unload_loras")
    def unload_loras(self) -> None:
        """Give back the weights as they were before any LoRA, bit for bit (before those loaded after the last
        load with keep_originals=False, which stay)."""
        self._loras.unload(self)

    @property
    def loras(self) -> list:
        """The merged LoRAs (name, path, weight), in load order."""
        return list(self._loras.loaded)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fastsd.tokenizer import Tokenizer

            self._tokenizer = Tokenizer()
        return self._tokenizer

    def model_hash(self) -> str | None:
        """A1111's short model hash (sha256[:10] of the checkpoint file); None for folders and random weights."""
        if self._hash is None and self.path is not None:
            self._hash = file_hash(self.path)
        return self._hash

    @property
    def vae_path(self) -> str | None:
        """The file of a VAE that replaced the model's (set_vae's `path`); None otherwise."""
        return self._vae_file

    @property
    def embeds_guidance(self) -> bool:
        """An LCM-distilled UNet (LCM_Dreamshaper_v7's kind): the guidance scale goes in as its embedding of
        w = scale - 1 (diffusers' LatentConsistencyModelPipeline), with no unconditional batch and no negative
        prompt."""
        return bool(self.config.unet.time_cond_proj_dim)

    def runs_uncond(self, s: GenerationSettings) -> bool:
        """Whether a run of `s` has an unconditional batch (the negative prompt encoded, CFG and its A1111 options in
        effect): guided (scale > 1) and not an LCM-distilled UNet, which takes the scale as an embedding."""
        return s.guided and not self.embeds_guidance

    def vae_hash(self) -> str | None:
        """A1111's "VAE hash" (sha256[:10] of the VAE file) of a VAE that replaced the model's; None otherwise."""
        if self._vae_hash is None and self._vae_file is not None:
            self._vae_hash = file_hash(self._vae_file)
        return self._vae_hash

    def infotext(self, s: GenerationSettings, index: int = 0, img2img: bool = False, extra: dict | None = None) -> str:
        """A1111's infotext of image `index` of a run of `s` (its seed `s.image_seed(index)`); `extra` (A1111's
        extra_generation_params, e.g. its inpainting keys) after the settings' keys, before the LoRA and embedding
        hashes (None values left out)."""
        cfg = self.runs_uncond(s)  # (the options of the unconditional batch apply)
        second = get_sampler(s.hires_sampler or s.sampler).name if s.hires else None
        names = sampler_fields(get_sampler(s.sampler).name, s.schedule_type, second, s.hires_schedule_type)  # (1.9+'s)
        params = {"Steps": s.steps, "Sampler": names["Sampler"],
                  "Schedule type": names["Schedule type"], "CFG scale": s.guidance_scale,
                  "Seed": s.image_seed(index), "Size": f"{s.width}x{s.height}", "Model hash": self.model_hash(),
                  "Model": self.name,
                  "VAE hash": self.vae_hash(), "VAE": self.vae_name,
                  "Variation seed": s.subseed + index if s.subseed_strength else None,
                  "Variation seed strength": s.subseed_strength or None,
                  "Seed resize from": f"{s.seed_resize_from_w}x{s.seed_resize_from_h}" if s.seed_resize else None,
                  "Denoising strength": s.strength if img2img else None,
                  # A1111 writes its inpainting_mask_weight option for every image of a 9-channel model (its
                  # is_using_inpainting_conditioning: txt2img and img2img alike), 1.0 too
                  "Conditional mask weight": s.inpainting_mask_weight if self.config.unet.in_channels == 9 else None,
                  "Noise multiplier": (s.initial_noise_multiplier if img2img and s.initial_noise_multiplier != 1
                                       else None),
                  # (A1111 writes it where a sample_img2img ran: img2img, or the hires fix's second pass)
                  "Extra noise": (s.img2img_extra_noise if s.img2img_extra_noise > 0
                                  and (img2img or (s.hires and s.hires_strength > 0)) else None),
                  "Clip skip": s.clip_skip if s.clip_skip != 1 else None,
                  "Skip Early CFG": s.skip_early_cond if s.skip_early_cond and cfg else None,
                  "ENSD": s.eta_noise_seed_delta if s.eta_noise_seed_delta and draws_noise(s) else None,
                  "RNG": None if s.randn_source == "GPU" else s.randn_source,  # (A1111 writes none for its default)
                  **eta_infotext(s), **{SIGMA_KEYS[k]: v for k, v in sigma_params(s, s.sampler).items()},
                  "NGMS": s.s_min_uncond if s.s_min_uncond and cfg else None,
                  "NGMS all steps": True if s.s_min_uncond and s.s_min_uncond_all and cfg else None}
        if s.hires:  # A1111's keys (its "Denoising strength" is the second pass's)
            resize = s.hires_width or s.hires_height
            hp, hn = s.hires_prompts()
            params.update({"Denoising strength": s.hires_strength,
                           "Hires sampler": names["Hires sampler"], "Hires schedule type": names["Hires schedule type"],
                           "Hires prompt": hp if hp != s.prompt else None,
                           "Hires negative prompt": hn if hn != s.negative_prompt else None,
                           "Hires upscale": None if resize else s.hires_scale,  # (as given: A1111's API's 2.0)
                           "Hires resize": f"{s.hires_width}x{s.hires_height}" if resize else None,
                           "Hires steps": s.hires_steps or None,  # (no "Hires upscaler" when unset, as A1111's API)
                           "Hires upscaler": s.hires_upscaler and hires.upscaler_label(s.hires_upscaler)})
        params.update(extra or {})
        prompt, params["Lora hashes"] = self._loras.infotext(s.prompt)
        if self.embeddings is not None:  # A1111's "TI hashes": name: sha256[:12] of each embedding the prompts use
            params["TI hashes"] = self.embeddings.infotext([strip_tags(s.prompt), s.negative_prompt])
        return format_infotext(prompt, s.negative_prompt, params)

    # ---- stage 1: text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None, clip_skip: int = 1, *,
                      steps: int | None = None, hires_steps: int | None = None
                      ) -> tuple[torch.Tensor | ScheduledContext, torch.Tensor | ScheduledContext | None]:
        """(cond, uncond), each (B, 77 * chunks, D); prompts and negatives padded to the same chunk count.
        negative_prompts None (unguided: guidance scale <= 1): (cond, None), the negatives not encoded.
        <lora:...> tags are taken out of the prompts (the LoRAs themselves are merged by load_lora). With `steps`
        (A1111's count, `samplers.prompt_steps`; `hires_steps` too for the hires fix's second pass) A1111's prompt
        editing and alternating words are read (fastsd.prompt_schedule): a branch whose texts change over the steps is
        a ScheduledContext of all its texts' encodings."""
        negatives = [] if negative_prompts is None else list(negative_prompts)
        if negative_prompts is not None and len(prompts) != len(negatives):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        texts = [strip_tags(p) for p in prompts] + negatives
        parts = None  # per prompt, then per negative: [(weight, [(last step, text), ...]), ...]
        if steps is not None:
            split = [split_and(t) for t in texts[:len(prompts)]] + [[(t, 1.0)] for t in negatives]
            if any(len(p) > 1 or p[0] != (t, 1.0) or may_have_schedule(t) for p, t in zip(split, texts)):
                parts = [[(w, prompt_schedule(t, steps, hires_steps)) for t, w in p] for p in split]
                texts = list(dict.fromkeys(t for p in parts for _, sched in p for _, t in sched))  # each text once
        with self._running(self.clip) as clip:
            ctx = encode_prompts(clip, self.tokenizer, texts, clip_skip=clip_skip, device=self.device,
                                 embeddings=self.embeddings)
        if parts is not None:
            row = {t: i for i, t in enumerate(texts)}
            rows = [[(w, [(end, row[t]) for end, t in sched]) for w, sched in p] for p in parts]
            branches = [ScheduledContext(ctx, r) for r in (rows[:len(prompts)], rows[len(prompts):])]
            cond, uncond = (b if b.composed or any(len(p[0][1]) > 1 for p in b.parts) else b.at(0) for b in branches)
            return cond, (uncond if negative_prompts is not None else None)
        return ctx[:len(prompts)], (ctx[len(prompts):] if negative_prompts is not None else None)

    # ---- stage 2: latents -------------------------------------------------------------------------------

    def schedule(self, sampler: str, steps: int, schedule_type: str = "automatic") -> Schedule:
        """The noise levels `sampler` walks in `steps` steps: its own (its diffusers twin's) for "automatic", else
        A1111's schedule type (`fastsd.schedule_types`); "karras" for a sampler with a `_karras` twin is the twin's
        schedule (as the server and --infotext read "DPM++ 2M" + "Karras": one image for one infotext); DPM2, DPM2 a
        and DPM++ 3M SDE drop the next-to-last level of a type's steps + 1, as A1111, Karras too (`dpm2` + "karras"
        is A1111's DPM2; the `dpm2_karras` twin, asked for by name, keeps diffusers' schedule)."""
        kind, name = resolve_schedule_type(schedule_type), get_sampler(sampler).name
        twin = name.removesuffix("_karras") + "_karras"
        if kind == AUTOMATIC or (kind == "karras" and twin in SAMPLERS
                                 and (name == twin or name not in DISCARD_PENULTIMATE)):
            return SAMPLERS[twin if kind == "karras" else name].schedule(steps, self.config.scheduler)
        return typed_schedule(kind, steps, self.config.scheduler, discard_penultimate=name in DISCARD_PENULTIMATE)

    def latent_shape(self, s: GenerationSettings) -> tuple[int, int, int, int]:
        f = self.config.vae.downscale
        return (s.num_images, self.config.unet.out_channels, s.height // f, s.width // f)

    @torch.no_grad()
    def prepare_latents(self, s: GenerationSettings, seeds: list[int], *,
                        image: Image.Image | list[Image.Image] | None = None,
                        mask: Image.Image | None = None, latents: torch.Tensor | None = None,
                        tiled_vae: bool | None = None, masked_content: str = "original",
                        latent_mask: str = "nearest", fill_seeds: list[int] | None = None,
                        resize_mode: int = 0) -> Prepared:
        """The start of the loop for settings `s` (width/height resolved): the schedule, each image's seeded
        generator, the start noise (or `latents`), and for img2img/inpainting the image latents and mask (`image`:
        one for every image, or a list of one per image, A1111's init_images; brought to the size by A1111's
        `resize_mode`: 0 just resize, 1 crop and resize, 2 resize and fill, 3 encoded at its own size and its latents
        resized, bilinear: A1111's "just resize (latent upscale)", which takes no mask).
        diffusers' draw order: the VAE posterior noise first, then the start noise. `masked_content` (A1111's
        "Masked content" in latent space): "latent noise" puts each seed's first normal draw (A1111's
        create_random_tensors; of `fill_seeds`, default `seeds`) in the image latents under the mask, "latent
        nothing" zeros; "original" keeps them. `latent_mask`: one of LATENT_MASKS (diffusers' "nearest" or A1111's
        "bicubic")."""
        _check_masked_content(masked_content, latent_mask)
        shape = self.latent_shape(s)
        gens = seeded_generators(seeds, source=s.randn_source)
        init, mask_t = self._image_tensors(s, image, mask, resize_mode)
        fixed = init is not None and s.img2img_fix_steps  # (A1111's setup_img2img_steps: all the steps, at the end
        n, run = hires.second_pass_steps(s.steps, s.strength) if fixed else (s.steps, None)  # of a longer schedule)
        sched = self.schedule(s.sampler, n, s.schedule_type)
        inpaint_model = self.config.unet.in_channels == 9
        x0 = None  # the image latents: the posterior's mean, drawing nothing (A1111's sample draws from torch's global
        if init is not None:  # RNG, which no seed fixes), so the start noise is each seed's first draw, as txt2img's
            x0 = self._init_latents(s, init, tiled_vae)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            noise = latents.float().to(self.device)
        else:
            noise = self._start_noise(s, seeds, gens, shape)
        gens = sampler_generators(s, seeds, gens)
        if init is not None and s.initial_noise_multiplier != 1.0:  # (A1111: img2img's start noise only)
            noise = noise * s.initial_noise_multiplier
        lat_mask = None if mask_t is None else self._latent_mask(mask, mask_t, shape[2:], latent_mask, resize_mode)
        if x0 is not None and lat_mask is not None and masked_content != "original":
            fill = first_draws(fill_seeds or seeds, shape[1:], self.device, s.randn_source) \
                if masked_content == "latent noise" else torch.zeros_like(x0)
            x0 = x0 * (1 - lat_mask) + fill * lat_mask
        full = None
        if x0 is None:
            x = noise * sched.init_noise_sigma
        else:
            full, sched = sched.sigmas, sched.tail(len(sched) - run * sched.order if fixed
                                                   else sched.img2img_start(s.strength))
            x = _extra_noise(x0 + noise * float(sched.sigmas[0]), noise, s)
        p = Prepared(x, sched, gens, x0=x0, full_sigmas=full, seeds=list(seeds))
        p.mask = lat_mask  # (1, 1, h, w) or None
        if inpaint_model:  # (A1111 without mask_round: its conditioning mask keeps the grey levels too)
            cond_mask = mask_t if latent_mask != "bicubic-soft" or mask is None else \
                _grey_tensor(_at_size(mask.convert("L"), (s.width, s.height), resize_mode))
            p.extra["c_concat"] = self._inpaint_concat(s, init if isinstance(init, torch.Tensor) else None, cond_mask,
                                                       tiled_vae)  # (3: no mask, so the masked image is all zeros)
        return p

    def _start_noise(self, s: GenerationSettings, seeds: list[int], gens: list[Generator], shape
                     ) -> torch.Tensor:
        """Each image's first draw from its generator, moved toward its variation seed's (A1111's ImageRNG.first).
        With seed resize (A1111's), image i's noise is drawn at the latent size of seed_resize_from_w x _h from a
        fresh generator of seeds[i] (A1111's randn(seed, shape) with its RNG on "CPU": torch.manual_seed then
        torch.randn; the variation seed's noise too, at that size, before the slerp), then pasted centred
        (`paste_centred`) into the generator's draw at the real size, which the generator makes as without it."""
        noise = seeded_noise(gens, shape[1:], self.device)
        f = self.config.vae.downscale
        size = (shape[1], s.seed_resize_from_h // f, s.seed_resize_from_w // f) if s.seed_resize else tuple(shape[1:])
        resized = size != tuple(shape[1:])  # (A1111: a resize to the real size is no resize)

        small = first_draws(seeds, size, self.device, s.randn_source) if resized else noise
        if s.subseed_strength > 0:
            subseeds = [s.subseed + i for i in range(len(seeds))]
            small = variation_noise(small, first_draws(subseeds, size, self.device, s.randn_source), s.subseed_strength)
        return paste_centred(noise, small) if resized else small

    def _image_tensors(self, s: GenerationSettings, image, mask, resize_mode: int = 0):
        """(init images (B or 1, 3, H, W), mask (1, 1, H, W) or None) at the generation size; resize_mode 3: a list of
        each init image at its own size (`_init_latents` resizes its latents)."""
        if image is None:
            return None, None
        size = (s.width, s.height)
        images = image if isinstance(image, (list, tuple)) else [image]
        check_mask(images[0], mask)
        if len(images) not in (1, s.num_images):
            raise ValueError(f"image: {len(images)} images for {s.num_images}: give one, or one per image")
        if resize_mode == 3:
            if mask is not None:
                raise ValueError(LATENT_RESIZE_MASK)
            return [pil_to_tensor(im) for im in images], None
        init = torch.cat([pil_to_tensor(_at_size(im, size, resize_mode)) for im in images])
        return init, None if mask is None else mask_to_tensor(_at_size(mask, size, resize_mode))

    def _init_latents(self, s: GenerationSettings, init, tiled_vae) -> torch.Tensor:
        """The image latents of every image (the posterior's mean): `init` encoded, or each of a list (resize_mode 3)
        encoded at its own size and its latents resized to the generation's, bilinear (A1111's latent upscale)."""
        if isinstance(init, torch.Tensor):
            return self.encode_images(init.expand(s.num_images, -1, -1, -1), None, tiled_vae)
        f = self.config.vae.downscale
        x0 = torch.cat([torch.nn.functional.interpolate(self.encode_images(t, None, tiled_vae),
                                                        size=(s.height // f, s.width // f), mode="bilinear")
                        for t in init])
        return x0.expand(s.num_images, -1, -1, -1)

    def _latent_mask(self, mask: Image.Image, mask_t: torch.Tensor, size: tuple[int, int], how: str,
                     resize_mode: int = 0) -> torch.Tensor:
        """(1, 1, h, w) mask at latent size (see LATENT_MASKS)."""
        if how == "nearest":
            return torch.nn.functional.interpolate(mask_t, size=size).to(self.device)
        grey = _at_size(mask.convert("L"), mask_t.shape[:1:-1], resize_mode)  # (as _image_tensors: that size first)
        a = np.asarray(grey.resize(size[::-1], Image.BICUBIC), dtype=np.float32) / 255.0
        return torch.from_numpy(np.around(a) if how == "bicubic" else a)[None, None].to(self.device)

    def _inpaint_concat(self, s, init, mask_t, tiled_vae) -> torch.Tensor:
        """9-channel UNet: [mask, masked-image latents] beside x; no mask = repaint everything. The mask channel is
        `mask_t` (the thresholded mask, diffusers' and A1111's; A1111's grey one without mask_round) sampled to latent
        size, the masked image A1111's torch.lerp(image, image * (1 - mask), s.inpainting_mask_weight) (its
        inpainting_image_conditioning; at weight 1 the image times 1 - mask)."""
        m = mask_t if mask_t is not None else torch.ones(1, 1, s.height, s.width)
        image = init if init is not None else torch.zeros(1, 3, s.height, s.width)
        masked = torch.lerp(image, image * (1 - m), s.inpainting_mask_weight)
        masked_lat = self.encode_images(masked, None, tiled_vae)
        shape = self.latent_shape(s)
        m_lat = torch.ones(1, 1, *shape[2:]) if mask_t is None else torch.nn.functional.interpolate(mask_t, shape[2:])
        m_lat = m_lat.to(self.device).expand(len(masked_lat), -1, -1, -1)  # (one mask for each image's latents)
        return torch.cat([m_lat, masked_lat], 1).expand(s.num_images, -1, -1, -1)

    # ---- stage 3: the sampling loop ---------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, p: Prepared, cond: torch.Tensor, uncond: torch.Tensor | None, s: GenerationSettings, *,
                on_step: OnStep | None = None, progress: bool = True, preview_every: int = 1) -> torch.Tensor:
        """Run the sampler from p.x to the final latents (diffusers' scale). guidance_scale <= 1 runs no
        unconditional batch (as diffusers and A1111). `on_step(step, total, preview)` after each step, with
        a preview image of the first image's current prediction (`preview`) every `preview_every` steps and
        at the last, None at the others; an exception it raises (e.g. `Interrupted`) stops the loop."""
        spec = get_sampler(s.sampler)
        sched = p.schedule
        guided = self.runs_uncond(s) and uncond is not None
        w = s.guidance_scale - 1 if self.embeds_guidance else None  # (diffusers' LatentConsistencyModelPipeline)
        with self._running(self.unet) as unet:
            call = (lambda x_in, t, context: unet(x_in, t, context)) if w is None else \
                (lambda x_in, t, context: unet(x_in, t, context, w))
            den = EpsDenoiser(call, alphas_cumprod(self.config.scheduler), schedule=sched)
            model = CFGDenoiser(den, cond, uncond if guided else None, s.guidance_scale if guided else 1.0,
                                cfg_step=self._backend.ops.cfg_step, s_min_uncond=s.s_min_uncond,
                                s_min_uncond_all=s.s_min_uncond_all, skip_early=s.skip_early_cond,
                                total_calls=prompt_steps(s.sampler, len(sched)))
            if p.mask is not None:  # (A1111's blend, for inpainting models too)
                model = KnownRegionDenoiser(model, p.x0, p.mask)
            opts = {}
            if spec.brownian:  # A1111's: a Brownian tree per image seeded by its seed, over the whole schedule
                opts["noise_sampler"] = brownian_noise_sampler(
                    p.x, sched.sigmas if p.full_sigmas is None else p.full_sigmas,
                    p.seeds if p.seeds is not None else [g.initial_seed() for g in p.generators])
            elif spec.stochastic or _churns(s, spec.name):
                opts["noise_sampler"] = lambda sigma, sigma_next: seeded_noise(p.generators, p.x.shape[1:], self.device)
            if s.eta is not None and spec.name in ETA_SAMPLERS:  # (a hires sampler without one runs its own)
                opts["eta"] = s.eta
            if _churns(s, spec.name):
                opts.update(s_churn=s.s_churn, s_tmin=s.s_tmin, s_tmax=s.s_tmax or math.inf)
            if s.s_noise != 1 and spec.name in S_NOISE_SAMPLERS and "noise_sampler" in opts:
                opts["noise_sampler"] = _scaled(opts["noise_sampler"], s.s_noise)
            x = spec(model, p.x, sched.sigmas, extra_args=p.extra, disable=not progress,
                     callback=self._step_callback(on_step, len(sched), preview_every), **opts)
        x = x * sched.out_scale
        if p.mask is not None:
            x = p.x0 * (1 - p.mask) + x * p.mask
        if not torch.isfinite(x).all():
            self._not_finite(x.dtype, len(sched))
        return x

    def _step_callback(self, on_step: OnStep | None, total: int, every: int):
        def callback(info) -> None:
            step, denoised = info["i"] + 1, info["denoised"]
            if "progress" in info:  # dpm_fast / dpm_adaptive: their steps are not the schedule's
                step = max(1, min(total, round(info["progress"] * total)))
            if not torch.isfinite(denoised).all():  # A1111's NaN check, at the step it happens: no black image
                self._not_finite(denoised.dtype, step)
            if on_step is None:
                return
            show = step % every == 0 or step == total
            try:
                on_step(step, total, self.preview(denoised[:1]) if show else None)
            except Interrupted as stop:  # the step's prediction (a 4-channel inpainting's known region put back)
                stop.latents, stop.step = denoised, step
                raise

        return callback

    def _not_finite(self, dtype: torch.dtype, step: int):
        """Raise the ValueError for a prediction of NaN/inf at `step`: damaged weights named if any hold NaN/inf
        (LoRAs and embeddings with such values are refused when they load), else the usual causes."""
        from fastsd.checkpoint import damaged_weights

        why = damaged_weights(unet=self.unet, clip=self.clip, vae=self.vae) or (
            "a LoRA, an embedding or a guidance scale far out of range (or a model that overflows this dtype)")
        raise ValueError(f"the sampling gave NaN or infinite values at step {step} in {str(dtype)[6:]}: {why}")

    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> Image.Image:
        """A cheap image of scaled latents (1, 4, h, w): decoded by TAESD when it is the VAE (full size), else
        the linear latent-to-RGB approximation (latent size)."""
        if isinstance(self.vae, TAESD):
            with self._running(self.vae) as vae:
                return tensor_to_pil(vae.decode(latents.to(self.device) / self.config.vae.scale_factor).float())[0]
        return latents_preview(latents / self.config.vae.scale_factor)

    @torch.no_grad()
    def hires_pass(self, s: GenerationSettings, x: torch.Tensor, seeds: list[int], cond: torch.Tensor,
                   uncond: torch.Tensor | None, *, tiled_vae: bool | None = None, on_step: OnStep | None = None,
                   progress: bool = True, preview_every: int = 1, first: "Pipeline | None" = None) -> torch.Tensor:
        """A1111's hires fix after the first pass's final latents `x`: upscaled (the latents, or the images decoded
        by `first`'s VAE (the first pass's pipeline, default this one: A1111 decodes before loading a hires
        checkpoint), resized (`hires.resize_image`, or an upscaler model) and encoded again by this one's (the
        posterior's mean)), cropped to the target, then refined by an img2img pass of
        hires_steps (or steps) steps at the end of a schedule of int(steps / hires_strength) (A1111's rule), from
        fresh start noise of each image's seed at the new size. hires_strength 0: upscaled only."""
        t = s.hires_target()
        upscaler = hires.resolve_upscaler(s.hires_upscaler)
        # an inpainting model below inpainting_mask_weight 1: conditioned on the upscaled picture (A1111's
        # sample_hr_pass: the decoded latents, or the upscaled images as it hands them over, in [0, 1] where its
        # encoder takes [-1, 1]), lerped toward blank as a mask of ones; else on txt2img's blank image
        lerp = self.config.unet.in_channels == 9 and s.inpainting_mask_weight < 1 and s.hires_strength > 0
        source = None
        if upscaler in hires.LATENT_MODES:
            mode, antialias = hires.LATENT_MODES[upscaler]
            x = torch.nn.functional.interpolate(x.float(), size=t.latent_size, mode=mode, antialias=antialias)
            source = self.decode(x, tiled_vae) if lerp else None
        else:
            images = tensor_to_pil((first or self).decode(x, tiled_vae))
            if upscaler in hires.IMAGE_RESAMPLE:
                images = [hires.resize_image(im, t.up_w, t.up_h, upscaler) for im in images]
            else:  # an upscaler model file (A1111's images.resize_image with it)
                model = self.upscaler(upscaler)
                images = [model.upscale(im, t.up_w, t.up_h) for im in images]
            up = torch.cat([pil_to_tensor(im) for im in images])
            x = self.encode_images(up, None, tiled_vae)
            source = (up + 1) / 2 if lerp else None
        c_concat = None if source is None else hires.crop(self._inpaint_concat(  # (cropped with the latents)
            s.replace(width=source.shape[3], height=source.shape[2]), source, None, tiled_vae), t)
        x = hires.crop(x, t)
        if s.hires_strength == 0:
            return x
        n, run = hires.second_pass_steps(s.hires_steps or s.steps, s.hires_strength)
        s2 = s.replace(width=x.shape[3] * self.config.vae.downscale, height=x.shape[2] * self.config.vae.downscale,
                       steps=n, sampler=s.hires_sampler or s.sampler)
        sched = self.schedule(s2.sampler, n, s.hires_schedule())
        full, sched = sched.sigmas, sched.tail(len(sched) - run * sched.order)
        gens = seeded_generators(seeds, source=s2.randn_source)
        noise = self._start_noise(s2, seeds, gens, tuple(x.shape))
        p = Prepared(_extra_noise(x + noise * float(sched.sigmas[0]), noise, s), sched,
                     sampler_generators(s2, seeds, gens), x0=x, full_sigmas=full, seeds=list(seeds))
        if self.config.unet.in_channels == 9:  # an inpainting model repaints everything
            p.extra["c_concat"] = self._inpaint_concat(s2, None, None, tiled_vae) if c_concat is None else c_concat
        return self.denoise(p, cond, uncond, s2, on_step=on_step, progress=progress, preview_every=preview_every)

    def upscaler(self, path: str):
        """The upscaler model of file `path` (fastsd/upscalers.py), loaded once and kept until another file (or
        this one changed) is asked for; run in the pipeline's dtype (fp32 for fp16 on the CPU), prepared by its
        backend (the cpu backend's packed weights and Winograd convolutions: faster in fp32, README)."""
        import os

        from fastsd.upscalers import load_upscaler

        mtime = os.stat(path).st_mtime_ns
        if self._upscaler is None or self._upscaler[:2] != (path, mtime):
            self._upscaler = None  # (the old one's memory goes first)
            cpu_half = self.device.type == "cpu" and self.dtype == torch.float16
            up = load_upscaler(path, dtype=torch.float32 if cpu_half else self.dtype, device=self.device,
                               backend=self._backend)
            up.running = self._running  # (the backend's, with offload's moves)
            self._upscaler = (path, mtime, up)
        return self._upscaler[2]

    # ---- stage 4: images --------------------------------------------------------------------------------

    def _tile(self, tiled_vae: bool | None, width: int, height: int) -> bool:
        return tiled_vae if tiled_vae is not None else max(width, height) > TILE_ABOVE

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generators: list[Generator] | None,
                      tiled_vae: bool | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents; sampled from the posterior with each image's generator
        (as diffusers' retrieve_latents), or its mean when generators is None. TAESD has no posterior: its
        latents, which draw nothing from the generators (as diffusers' AutoencoderTiny)."""
        f = self.config.vae.downscale
        with self._running(self.vae) as vae:
            x = images.to(self.device)
            if isinstance(vae, TAESD):
                tile = self._tile(tiled_vae, x.shape[3], x.shape[2])
                z = tiled(vae.encode, x, tile=512, overlap=64, scale=1 / f) if tile else vae.encode(x).float()
                return z * self.config.vae.scale_factor
            if self._tile(tiled_vae, x.shape[3], x.shape[2]):
                moments = tiled(lambda t: torch.cat(vae.encode(t), 1), x, tile=512, overlap=64, scale=1 / f)
                mean, logvar = moments.chunk(2, dim=1)
            else:
                mean, logvar = (m.float() for m in vae.encode(x))
        if generators is not None:
            mean = mean + torch.exp(0.5 * logvar) * seeded_noise(generators, mean.shape[1:], mean.device)
        return mean * self.config.vae.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled_vae: bool | None = None) -> torch.Tensor:
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
            finite = bool(torch.isfinite(out).all())  # (one pass over the images, one device sync)
            if self.dtype == torch.float16 and not finite:
                warnings.warn("the fp16 VAE decode produced NaN/inf; decoding again in fp32", stacklevel=2)
                vae.float()
                try:
                    out = run()
                finally:
                    vae.to(self.dtype)
                finite = bool(torch.isfinite(out).all())
        if not finite:  # (no black image: a damaged VAE file is named)
            from fastsd.checkpoint import damaged_weights

            why = damaged_weights(vae=self.vae) or "latents far out of range"
            why = why.replace("the model file", "the VAE file") if self._vae_file is not None else why
            raise ValueError(f"the VAE decode gave NaN or infinite values in {str(out.dtype)[6:]}: {why}")
        return out


    # ---- all stages ---------------------------------------------------------------------------------------

    def resolve(self, s: GenerationSettings, image: Image.Image | None) -> GenerationSettings:
        """Settings with the seed and size filled in (a copy): a random seed (and variation seed, when its strength
        is > 0) when none is given; the init
        image's size (rounded down to a multiple of 8) when width/height are not given, else 512."""
        if image is not None and (0 in image.size or (s.width is None and image.width < 8)
                                  or (s.height is None and image.height < 8)):
            raise ValueError(f"image is {image.width}x{image.height} pixels: below 8 on a side, give width and height")
        w = s.width or (image.width // 8 * 8 if image is not None else 512)
        h = s.height or (image.height // 8 * 8 if image is not None else 512)
        seed = s.seed if s.seed is not None else random.randrange(2**32)
        subseed = s.subseed if s.subseed is not None or s.subseed_strength == 0 else random.randrange(2**32)
        return s.replace(width=w, height=h, seed=seed, subseed=subseed)

    @torch.no_grad()
    @_holding("generate")
    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int = 20, guidance_scale: float = 7.5,
                 sampler: str = "euler_a", seed: int | None = None, width: int | None = None,
                 height: int | None = None, num_images: int = 1, strength: float = 0.8, clip_skip: int = 1,
                 subseed: int | None = None, subseed_strength: float = 0.0, hires_scale: float = 1.0,
                 hires_width: int = 0, hires_height: int = 0, hires_steps: int = 0, hires_strength: float = 0.7,
                 hires_upscaler: str | None = "Latent", seed_resize_from_w: int = 0, seed_resize_from_h: int = 0,
                 hires_sampler: str | None = None, schedule_type: str = "automatic", hires_prompt: str = "",
                 hires_negative_prompt: str = "", hires_schedule_type: str | None = None, s_min_uncond: float = 0.0,
                 s_min_uncond_all: bool = False, skip_early_cond: float = 0.0, eta_noise_seed_delta: int = 0,
                 eta: float | None = None, initial_noise_multiplier: float = 1.0, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = 0.0, s_noise: float = 1.0, randn_source: str = "CPU",
                 enable_hires: bool = False, inpainting_mask_weight: float = 1.0, img2img_fix_steps: bool = False,
                 img2img_extra_noise: float = 0.0, img2img_color_correction: bool = False,
                 image: Image.Image | None = None, mask: Image.Image | None = None,
                 latents: torch.Tensor | None = None, masked_content: str = "original",
                 latent_mask: str = "nearest", fill_seed: int | None = None, resize_mode: int = 0,
                 infotext_extra: dict | None = None, progress: bool = True,
                 tiled_vae: bool | None = None,
                 on_step: OnStep | None = None, preview_every: int = 1, on_interrupt: str = "raise",
                 allow_large: bool = False, hires_pipe: "Pipeline | None" = None) -> list[Image.Image]:
        """txt2img; img2img when `image` is given; inpainting when `mask` is given too (white = repaint; of any
        size, resized to width x height as the image is, A1111's "just resize").

        The settings keywords are `GenerationSettings`' fields. Image i of a batch uses seed + i (A1111), so
        any image can be made again alone; the hires_* keywords (and enable_hires) run A1111's hires fix
        (`hires_pass`) after txt2img, the infotext keeping the first pass's size as A1111's; `masked_content` and
        `latent_mask` (inpainting) as `prepare_latents`' ("latent noise" from the seeds of a run of seed `fill_seed`
        when given: A1111's server fills every n_iter iteration with its first one's); `resize_mode` (A1111's, 0-3)
        how `image` (a list: one per image, A1111's init_images) and `mask` come to width x height; `infotext_extra`
        goes into each image's infotext (`infotext`); with `subseed_strength` > 0 its start noise is moved toward the
        noise of `subseed` + i (A1111's variation seed); `seed_resize_from_w` and `_h` (both > 0) draw it as at that
        size, centred in the real size's (A1111's seed resize, `_start_noise`); `schedule_type` other than "automatic"
        walks A1111's noise levels of that name (`schedule`), in both hires passes unless `hires_schedule_type` names the
        second's (A1111's "Hires schedule type"); `hires_prompt` /
        `hires_negative_prompt` (A1111's hr_prompt, hr_negative_prompt) condition the hires pass where not empty. `latents` are unit-variance start noise
        (num_images, 4, H/8, W/8), scaled by the sampler's initial sigma exactly as diffusers does. strength is A1111's:
        int(min(strength, 0.999) * steps) + 1 steps, to the end (schedules.img2img_start_index), from the image's
        posterior mean plus each seed's first draw (diffusers' img2img differs in both); `img2img_fix_steps` runs all
        `steps` at the end of a schedule of int(steps / min(strength, 0.999)) (A1111's option), `img2img_extra_noise`
        adds that draw times it once more (img2img and the hires pass, `_extra_noise`); `img2img_color_correction`
        gives each img2img result its init image's colours (`_color_corrected`).
        `on_step(step, total, preview)` is called after each step; `preview` is an image every `preview_every` steps
        and at the last, else None. An `Interrupted` it raises stops the generation and comes through, or with
        `on_interrupt="decode"` the images of the prediction at that step are returned (A1111's interrupt and skip).
        `allow_large` lifts the 4096 px limit on a side (the CLI's --allow-large). `hires_pipe` (A1111's "Hires checkpoint"): another pipeline runs the
        hires fix's second pass, as A1111 after loading that checkpoint: its text encoder for the hires prompts, its
        VAE and UNet after the upscale (an image upscaler's input is decoded by this pipeline's VAE, as A1111 decodes
        before the switch), its VAE for the final decode (its LoRAs and embeddings its own)."""
        s = GenerationSettings(prompt, negative_prompt, steps, guidance_scale, sampler, seed, width, height,
                               num_images, strength, clip_skip, subseed, subseed_strength, hires_scale, hires_width,
                               hires_height, hires_steps, hires_strength, hires_upscaler, seed_resize_from_w,
                               seed_resize_from_h, hires_sampler, schedule_type, hires_prompt, hires_negative_prompt,
                               hires_schedule_type, s_min_uncond, s_min_uncond_all, skip_early_cond,
                               eta_noise_seed_delta, eta, initial_noise_multiplier, s_churn, s_tmin, s_tmax, s_noise,
                               randn_source, enable_hires, inpainting_mask_weight, img2img_fix_steps,
                               img2img_extra_noise, img2img_color_correction)
        s = twins_as_a1111(s)  # ("DPM2 Karras": A1111's, as the server and --infotext read it)
        batch = _init_images(image, num_images)  # (A1111's init_images: one, or one per image of the batch)
        image = batch[0] if batch else None
        _check_inputs(image, mask, latents, on_step, preview_every, infotext_extra)
        progress, allow_large = check_bool(progress, "progress"), check_bool(allow_large, "allow_large")
        tiled_vae, preview_every = check_bool(tiled_vae, "tiled_vae", none=True), plain(preview_every)
        batch = [checked_8bit(im, f"image[{i}]" if len(batch) > 1 else "image") for i, im in enumerate(batch)]
        image = batch[0] if batch else None  # (16-bit / float: scaled, not clipped)
        mask = None if mask is None else binary_mask(checked_8bit(mask, "mask"), round_alpha=False)  # (an RGBA
        # mask with transparency is its alpha, as A1111's)
        check_mask(image, mask)
        if latents is not None and subseed_strength:
            raise ValueError("subseed_strength varies the seeded start noise; it can't vary given latents")
        if latents is not None and (seed_resize_from_w or seed_resize_from_h):
            raise ValueError("seed_resize_from_w/h resize the seeded start noise; they can't resize given latents")
        if on_interrupt not in ("raise", "decode"):
            raise ValueError(f'on_interrupt must be "raise" or "decode", not {on_interrupt!r}')
        _check_masked_content(masked_content, latent_mask)
        if fill_seed is not None and (isinstance(fill_seed, bool) or not isinstance(fill_seed, int) or fill_seed < 0):
            raise ValueError(f"fill_seed must be a seed (an integer >= 0), got {fill_seed!r}")
        if isinstance(resize_mode, bool) or resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of 0 (just resize), 1 (crop and resize), 2 (resize and fill), "
                             f"3 (latent upscale), got {resize_mode!r}")
        s.validate(has_image=image is not None, has_mask=mask is not None, allow_large=allow_large)
        self._loras.check_prompt(s.prompt)
        if s.hires and Counter(parse_prompt(s.hires_prompts()[0])[1]) != Counter(parse_prompt(s.prompt)[1]):
            raise ValueError("hires_prompt: its <lora:...> tags must be the prompt's (fastsd merges a run's LoRAs "
                             "once, for both passes)")
        self.check_can_encode(image, s)
        hp = self.check_hires_pipe(hires_pipe, s)
        if hp is not self:
            hp._loras.check_prompt(s.hires_prompts()[0])
        hp.check_hires_upscaler(s)
        if mask is not None and mask.convert("L").point(lambda v: 255 if v >= 128 else 0).getbbox() is None:
            warnings.warn("the mask has no white pixel (>= 50%): nothing is repainted; white marks what to repaint",
                          stacklevel=2)
        s = self.resolve(s, image)
        s.validate(has_image=image is not None, has_mask=mask is not None, allow_large=allow_large)  # (the size)
        if resize_mode == 3 and all(im.size == (s.width, s.height) for im in batch):
            resize_mode = 0  # (nothing to resize: A1111's latent upscale is the identity then)
        if resize_mode == 3 and mask is not None:
            raise ValueError(LATENT_RESIZE_MASK)
        seeds = [s.image_seed(i) for i in range(s.num_images)]
        first_steps = prompt_steps(s.sampler, s.steps)  # (A1111's prompt editing counts these)
        negative = [s.negative_prompt] if self.runs_uncond(s) else None
        cond, uncond = self.encode_prompt([s.prompt], negative, s.clip_skip, steps=first_steps)
        hires_conds = (cond, uncond)  # (A1111's hr_prompt / hr_negative_prompt: encoded before any sampling)
        h_prompt, h_negative = s.hires_prompts()
        if s.hires and ((h_prompt, h_negative) != (s.prompt, s.negative_prompt) or hp is not self
                        or may_have_schedule(h_prompt) or may_have_schedule(h_negative)):
            hires_conds = hp.encode_prompt([h_prompt], [h_negative] if hp.runs_uncond(s) else None,
                                           s.clip_skip, steps=first_steps, hires_steps=s.hires_prompt_steps())
        fill_seeds = None if fill_seed is None else [s.replace(seed=fill_seed).image_seed(i) for i in range(len(seeds))]
        p = self.prepare_latents(s, seeds, image=batch if len(batch) > 1 else image, mask=mask, latents=latents,
                                 tiled_vae=tiled_vae,
                                 masked_content=masked_content, latent_mask=latent_mask, fill_seeds=fill_seeds,
                                 resize_mode=resize_mode)
        first = len(p.schedule)
        second = hires.second_pass_steps(s.hires_steps or s.steps, s.hires_strength)[1] \
            if s.hires and s.hires_strength > 0 else 0

        def steps_of(offset: int) -> OnStep | None:  # both passes' steps counted as one run (A1111's progress)
            return None if on_step is None else lambda i, _, preview: on_step(offset + i, first + second, preview)

        done = 0  # steps of the passes before the running one (Interrupted.step counts as on_step does)
        last = self  # the pipeline whose VAE decodes the result: the hires pass's once it runs
        try:
            x = self.denoise(p, cond, uncond, s, on_step=steps_of(0), progress=progress, preview_every=preview_every)
            if s.hires:
                done, last = first, hp
                x = hp.hires_pass(s, x, seeds, *hires_conds, tiled_vae=tiled_vae, on_step=steps_of(first),
                                  progress=progress, preview_every=preview_every, first=self)
        except Interrupted as stop:
            if stop.latents is not None:
                stop.step += done
            if on_interrupt == "raise" or stop.latents is None:  # (None: not raised by on_step, no prediction)
                raise
            x = stop.latents
        images = tensor_to_pil(last.decode(x, tiled_vae))
        if s.img2img_color_correction and batch:
            images = _color_corrected(images, batch, (s.width, s.height), resize_mode)
        if hp is not self:  # A1111's short title of the hires checkpoint: "name [hash]"
            hash_ = hp.model_hash()
            title = f"{hp.name} [{hash_}]" if hash_ else hp.name
            infotext_extra = {**(infotext_extra or {}), "Hires checkpoint": title}
        for i, im in enumerate(images):  # as A1111: each image carries its own infotext (its seed)
            im.info["parameters"] = self.infotext(s, i, img2img=image is not None, extra=infotext_extra)
        return images

    def check_hires_pipe(self, other: "Pipeline | None", s: GenerationSettings) -> "Pipeline":
        """The pipeline of the hires pass (self when `other` is None or self); ValueError when it can't take this
        one's latents (device, dtype, latent channels or size), its VAE can't encode what an image upscaler makes, or
        the run has no hires fix."""
        if other is None or other is self:
            return self
        if not isinstance(other, Pipeline):
            raise TypeError(f"hires_pipe must be a Pipeline, got {type(other).__name__}")
        if not s.hires:
            raise ValueError("hires_pipe: the run has no hires fix (hires_scale, hires_width, hires_height or "
                             "enable_hires)")
        mine, theirs = (self.device, self.dtype, self.config.unet.out_channels, self.config.vae.downscale), \
            (other.device, other.dtype, other.config.unet.out_channels, other.config.vae.downscale)
        if mine != theirs:
            raise ValueError(f"hires_pipe: its model ({other.name}: {theirs[0]}, {theirs[1]}, {theirs[2]} latent "
                             f"channels, 1/{theirs[3]} size) can't continue this one's ({self.name}: {mine[0]}, "
                             f"{mine[1]}, {mine[2]}, 1/{mine[3]})")
        other.check_can_encode(None, s)
        return other


def _extra_noise(x: torch.Tensor, noise: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    """A1111's img2img_extra_noise (its sample_img2img, after the start noise: `xi += noise * img2img_extra_noise`,
    the same noise, times initial_noise_multiplier in img2img; its timestep samplers' `* sqrt_alpha_cumprod` is the
    same in k-space): the start latents `x` of img2img or a hires pass with `noise` added once more, times it."""
    return x + noise * s.img2img_extra_noise if s.img2img_extra_noise > 0 else x


def _color_corrected(images: list[Image.Image], inits: list[Image.Image], size: tuple[int, int],
                     resize_mode: int) -> list[Image.Image]:
    """A1111's img2img_color_correction: result i corrected toward init image i (the only one for all, when one)
    as the VAE encodes it (at the generation size by `resize_mode`; mode 3 at its own size, as A1111 keeps it), before
    any inpainting overlay (the caller's, as A1111's apply_overlay comes after)."""
    targets = [color_correction.correction_target(im if resize_mode == 3 else _at_size(im, size, resize_mode))
               for im in inits]
    return [color_correction.apply_correction(targets[min(i, len(targets) - 1)], im) for i, im in enumerate(images)]


def _at_size(image: Image.Image, size: tuple[int, int], resize_mode: int = 0) -> Image.Image:
    """An init image or mask at the generation size (width, height): A1111's resize_image (its resize_mode, default 0
    "just resize", LANCZOS), which A1111 gives the image and its mask alike, whatever the mask's size (diffusers'
    processors too)."""
    return image if image.size == tuple(size) else resize_image(resize_mode, image, *size)


def _init_images(image, num_images) -> list:
    """generate's `image` as a list (empty for None): a PIL image, or a list / tuple of one per image of the batch
    (A1111's init_images; image i is image i's init image); TypeError / ValueError (one line) otherwise."""
    if not isinstance(image, (list, tuple)):
        return [] if image is None else [image]
    if not image or any(not isinstance(im, Image.Image) for im in image):
        raise TypeError("image must be a PIL image or a list of one per image of the batch, got "
                        f"{[type(im).__name__ for im in image] if image else 'an empty list'}")
    if len(image) != plain(num_images) and len(image) != 1:
        raise ValueError(f"image: {len(image)} images for num_images {num_images}: give one, or one per image")
    return list(image)


def _grey_tensor(mask: Image.Image) -> torch.Tensor:
    """An "L" mask -> (1, 1, H, W) float32 in [0, 1], its grey levels kept."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def _check_masked_content(masked_content: str, latent_mask: str = "nearest") -> None:
    if latent_mask not in LATENT_MASKS:
        raise ValueError(f"latent_mask must be one of {', '.join(map(repr, LATENT_MASKS))}, got {latent_mask!r}")
    if masked_content not in MASKED_CONTENT:
        raise ValueError(f"masked_content must be one of {', '.join(map(repr, MASKED_CONTENT))}, got "
                         f"{masked_content!r}")


def _check_inputs(image, mask, latents, on_step, preview_every, infotext_extra=None) -> None:
    for name, v in (("image", image), ("mask", mask)):
        if v is not None and not isinstance(v, Image.Image):
            raise TypeError(f"{name} must be a PIL image (fastsd.image.load_image reads a file), got {type(v).__name__}")
    if latents is not None and (not isinstance(latents, torch.Tensor) or latents.layout != torch.strided
                                or latents.is_meta or not latents.is_floating_point()):
        what = type(latents).__name__ if not isinstance(latents, torch.Tensor) else \
            f"a {latents.dtype} {latents.layout} tensor{' on meta' if latents.is_meta else ''}"
        raise TypeError(f"latents must be a dense floating-point tensor, got {what}")
    if latents is not None and not torch.isfinite(latents).all():
        raise ValueError("latents has NaN or infinite values")
    if infotext_extra is not None and (not isinstance(infotext_extra, dict) or any(
            not isinstance(k, str) or not k.strip() or any(c in k for c in ",:\n") or "\n" in str(v)
            for k, v in infotext_extra.items())):
        raise TypeError("infotext_extra must be a dict of infotext keys (text without ',', ':' or line breaks) to "
                        f"one-line values, got {infotext_extra!r:.80}")
    if on_step is not None and not callable(on_step):
        raise TypeError("on_step must be callable: on_step(step, total, preview)")
    preview_every = plain(preview_every)
    if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 1:
        raise ValueError(f"preview_every must be a positive integer, got {preview_every!r}")


__all__ = ["Pipeline", "Prepared", "Interrupted", "seeded_noise", "variation_noise", "paste_centred"]
