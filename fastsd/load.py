"""load_pipeline: a model source, a device, a dtype and a backend -> a ready Pipeline.

Device and dtype defaults: CUDA when available; fp16 on CUDA, on a CPU bf16 where it computes faster than
fp32 (AMX; AVX512-BF16 alone where a bf16 linear is measured faster, `bf16_measured_faster`) else fp32. bf16 asked
for on a CPU without native bf16 runs (slowly) with one warning.
"""
from __future__ import annotations

import os
import warnings

import torch

from fastsd import backends, cpuinfo
from fastsd.checkpoint import Checkpoint, build_models, resolve
from fastsd.pipeline import Pipeline
from fastsd.settings import SEED_LIMIT, check_bool, plain
from fastsd.vae_files import AUTOMATIC, AutomaticVAE, automatic_note, automatic_vae, resolve_vae, vae_keyword

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DEVICE_TYPES = ("cpu", "cuda")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; on a CPU bf16 where it computes faster than fp32, else fp32 (README "Performance")."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and bf16_faster_here() else torch.float32


def bf16_faster_here() -> bool:
    """Whether this CPU computes bf16 faster than fp32: native bf16, and AMX or a measured bf16 linear faster."""
    return cpuinfo.native_bf16() and (cpuinfo.amx() or bf16_measured_faster())


PROBE = (1024, 640, 640)  # rows, in, out features of the linear timed in both dtypes (a 32x32 UNet level's)


def bf16_measured_faster() -> bool:
    """Whether a bf16 linear runs faster than the fp32 one on this CPU, timed once per CPU fingerprint and thread
    count by the cpu backend's tuner (cached; bf16 unless fp32 takes <= its MARGIN of bf16's time;
    FASTSD_CPU_TUNE=0: bf16 unmeasured). For CPUs with AVX512-BF16 and no AMX: where the bf16 dot product
    does twice the fp32 FMA's work per cycle (AMD Zen 4/5) bf16 wins; where it does half (Intel with AMX hidden,
    as some VMs run it) fp32 does."""
    from fastsd.backends.cpu_tune import tuner

    m, k, n = PROBE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    xb, wb = x.bfloat16(), w.bfloat16()
    key = f"default dtype: linear {m}x{k}->{n} bf16 vs fp32, {torch.get_num_threads()} threads"
    choice = tuner().choose(key, {"bf16": lambda: torch.nn.functional.linear(xb, wb),
                                  "fp32": lambda: torch.nn.functional.linear(x, w)}, default="bf16")
    return choice == "bf16"


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; choose fp32, fp16 or bf16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, fp16, bf16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {device.type!r} is not supported; choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but this PyTorch sees no CUDA GPU")
    return device


def load_pipeline(source: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                  backend: str = "auto", seed: int = 0, vae: str | None = None, compile: bool = False) -> Pipeline:
    """Load an SD1.x model: an LDM .safetensors/.ckpt file, a diffusers folder, a repo id in the local
    Hugging Face cache, or "random:sd15" / "random:tiny" (random weights from `seed`).

    vae: what --vae takes (fastsd/vae_files.py): an LDM VAE file, a diffusers VAE folder, or taesd:PATH; it
    replaces the model's VAE, which is then not read at all. It is found and checked before the model loads.
    None (or "automatic"): A1111's "Automatic": a checkpoint file's VAE file beside it (NAME.vae.pt / .vae.ckpt /
    .vae.safetensors, `fastsd.vae_files.vae_near_checkpoint`) replaces its VAE the same way, said in one
    AutomaticVAE warning; "none" (A1111's "None"): the checkpoint's own VAE.
    compile: torch.compile the UNet and VAE decoder (fastsd.kernels.compile: CUDA graphs on CUDA, Inductor's C++
    path on a CPU); the first call at each new shape pays the compile time."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"source must be a string (a path, a repo id or random:<preset>), got {type(source).__name__}")
    compile, seed = check_bool(compile, "compile"), plain(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed (of the random weights) must be an integer in [0, 2**63), got {seed!r}")
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpuinfo.native_bf16():
        warnings.warn("bf16 is emulated on this CPU (no AVX512-BF16/AMX): it runs, but fp32 is faster here "
                      "(--dtype fp32, the default on this CPU)", stacklevel=2)
    elif device.type == "cpu" and dtype == torch.bfloat16 and not bf16_faster_here():
        warnings.warn("bf16 runs slower than fp32 on this CPU (AVX512-BF16 without AMX, measured): it runs, but "
                      "fp32 is faster here (--dtype fp32, the default on this CPU)", stacklevel=2)
    backends.get(backend, device, dtype)  # an unknown or unavailable backend fails before any loading
    src = resolve(source)
    cfg = src.config if isinstance(src, Checkpoint) else src
    automatic = vae is None or vae_keyword(vae) == AUTOMATIC
    if automatic:  # A1111's "Automatic": a VAE file beside the checkpoint file, checked before any weight is read
        vae_src = automatic_vae(src.path if isinstance(src, Checkpoint) else None, cfg)
    else:
        vae_src = resolve_vae(vae, cfg)  # (None for "none": the checkpoint's own)
    clip, kl, unet, cfg = build_models(src, dtype=dtype, device=device, seed=seed, with_vae=vae_src is None)
    tokenizer = None
    if isinstance(src, Checkpoint) and src.tokenizer is not None:
        tokenizer = src.tokenizer  # (loaded and checked by resolve, before any weights)
    elif isinstance(src, Checkpoint) and src.tokenizer_dir is not None:
        from fastsd.tokenizer import Tokenizer

        tokenizer = Tokenizer(src.tokenizer_dir)
    name, kind, path = ((src.name, src.kind, src.path) if isinstance(src, Checkpoint) else
                        (source, "sd1-inpainting" if cfg.unet.in_channels == 9 else "sd1", None))
    pipe = Pipeline(clip, kl, unet, cfg, tokenizer=tokenizer, device=device, dtype=dtype, backend=backend,
                    name=name, kind=kind, path=path)
    if vae_src is not None:
        pipe.set_vae(vae_src.build(dtype=dtype, device=device), vae_src.name, vae_src.path)
    if compile:
        from fastsd.kernels.compile import compile_pipeline

        compile_pipeline(pipe)
    if automatic and vae_src is not None:
        warnings.warn(AutomaticVAE(automatic_note(vae_src.name)), stacklevel=2)
    return pipe
