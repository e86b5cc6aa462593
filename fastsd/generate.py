"""Command line: python -m fastsd.generate "a photo of a cat" --model PATH [options]

Writes PNGs whose "parameters" text chunk is A1111's infotext, so A1111's "PNG Info" reads them back.
User mistakes end with one line on stderr and exit status 2; no half-written file is left behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

MODEL_ENV = "FASTSD_MODEL"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastsd.generate", description="Stable Diffusion 1.x text-to-image, "
                                "image-to-image and inpainting.")
    p.add_argument("prompt", help="the prompt; A1111 emphasis (word:1.2), (word), [word] and BREAK work")
    p.add_argument("--model", help=f"LDM .safetensors/.ckpt, diffusers folder, repo id in the local HF cache, or "
                   f"random:sd15 / random:tiny (random weights). Default: ${MODEL_ENV}, else the only SD1.x model "
                   "in the local HF cache")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--sampler", default="euler_a", help="euler_a, euler, ddim, ddpm, dpmpp_2m, dpmpp_2m_karras or an "
                   "A1111 name such as 'DPM++ 2M Karras'")
    p.add_argument("--seed", type=int, default=None, help="default: random; image i of a batch uses seed + i")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--init-image", help="image-to-image / inpainting source image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image, in (0, 1]")
    p.add_argument("--mask", help="inpainting mask, same size as the init image; white = repaint")
    p.add_argument("--clip-skip", type=int, default=1, help="A1111 clip skip: 1 = last CLIP layer, 2 = penultimate")
    p.add_argument("--out", default="outputs", help="output folder, or a .png path for a single image")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda; bf16 on a cpu with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--offload", action="store_true", help="keep only the running model on the GPU")
    p.add_argument("--tiled-vae", action="store_true", help="always decode/encode the VAE in tiles "
                   "(automatic above 1024 px a side)")
    p.add_argument("--no-progress", action="store_true")
    return p


def default_model() -> str:
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    from fastsd.checkpoint import sd1_models_in_hf_cache

    found = sd1_models_in_hf_cache()
    if len(found) == 1:
        return found[0]
    hint = (f"found {len(found)} in the local Hugging Face cache ({', '.join(found)}): pick one with --model"
            if found else "none found in the local Hugging Face cache")
    raise ValueError(f"no model given: pass --model PATH (an SD1.x .safetensors/.ckpt or diffusers folder), set "
                     f"{MODEL_ENV}, or use --model random:sd15 for random weights; {hint}")


def output_paths(out: str, n: int, seed: int) -> list[str]:
    """Check the destination before any work: a folder (created if missing) or one .png path."""
    if out.lower().endswith(".png"):
        if n != 1:
            raise ValueError(f"--out {out} names one file but --num-images is {n}; give a folder instead")
        folder, paths = os.path.dirname(os.path.abspath(out)), [out]
    else:
        folder = out
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out}: can't create the folder ({e.strerror})") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = [os.path.join(folder, f"{stamp}-{seed + i}.png") for i in range(n)]
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: folder {folder} is not writable")
    return paths


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning  # a user sees "warning: ...", not a source location
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written for unfinished images", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    import random

    from fastsd.backend import BackendError
    from fastsd.image import check_mask, load_image, save_png
    from fastsd.pipeline import GenerationSettings, load_pipeline
    from fastsd.tensorfile import CheckpointError

    try:
        seed = args.seed if args.seed is not None else random.randrange(2**32)
        settings = GenerationSettings(
            prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
            guidance_scale=args.cfg_scale, sampler=args.sampler, seed=seed, width=args.width, height=args.height,
            num_images=args.num_images, strength=args.strength, clip_skip=args.clip_skip)
        settings.validate(has_image=args.init_image is not None, has_mask=args.mask is not None)
        paths = output_paths(args.out, args.num_images, seed)
        image = load_image(args.init_image, "--init-image") if args.init_image else None
        mask = load_image(args.mask, "--mask") if args.mask else None
        check_mask(image, mask)
        pipe = load_pipeline(args.model or default_model(), device=args.device, dtype=args.dtype,
                             backend=args.backend)
        pipe.offload = args.offload
        images = pipe.generate(**settings.kwargs(), image=image, mask=mask, progress=not args.no_progress,
                               tiled_vae=True if args.tiled_vae else None)
        for i, (img, path) in enumerate(zip(images, paths)):
            save_png(img, path, img.info["parameters"])
            print(path)
    except (ValueError, CheckpointError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
