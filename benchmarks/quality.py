"""Quality guard for the fast dtypes: the image of one seed in a low precision against the fp32 image.

    python -m fastsd.benchmarks.quality --model random:sd15 --res 512 --steps 20 [--dtype bf16] [--compare diffusers]

txt2img (Euler, CFG 7.5, the harness' prompt) from the same start noise in fp32 and in --dtype, with
fastsd's default backend (auto); prints the PSNR of the low-precision image against the fp32 one, and,
with --compare diffusers, the same for diffusers on the same weights (its PSNR is the bar: fastsd's
low-precision path should be no further from fp32 than diffusers' is) plus fastsd-vs-diffusers in fp32.
Random weights make noise-like images, where differences grow more than with a trained model; the
numbers are a comparison between implementations, not a statement about trained checkpoints.
"""
from __future__ import annotations

import json
import time

import torch

from .common import check_model_and_res
from .suites import NEGATIVE, PROMPT
from fastsd.cli import ArgumentParser, positive_int


def _fastsd(model: str, dtype: str, args) -> tuple:
    import fastsd

    pipe = fastsd.load_pipeline(model, dtype=dtype, backend=args.backend, device="cpu")
    g = torch.Generator().manual_seed(args.seed)
    lat = args.res // pipe.config.vae.downscale
    latents = torch.randn(1, pipe.config.unet.out_channels, lat, lat, generator=g)
    t0 = time.perf_counter()
    img = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=args.steps, sampler="euler", width=args.res,
                        height=args.res, latents=latents, progress=False)[0]
    return pipe, latents, img, time.perf_counter() - t0


def _diffusers(pipe, args, latents) -> tuple:
    from fastsd.testing import diffusers_pipeline

    sp = diffusers_pipeline(pipe)
    t0 = time.perf_counter()
    img = sp(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5, height=args.res,
             width=args.res, latents=latents.clone().to(pipe.dtype), output_type="pil").images[0]
    return img, time.perf_counter() - t0


def main(argv=None) -> None:
    from fastsd.image import psnr

    ap = ArgumentParser(prog="python -m fastsd.benchmarks.quality", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--steps", type=positive_int, default=20)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--backend", default="auto", choices=["auto", "torch"])
    ap.add_argument("--compare", choices=["diffusers"], default=None)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    check_model_and_res(ap, args.model, args.res)
    row: dict = {"model": args.model, "res": args.res, "steps": args.steps, "dtype": args.dtype,
                 "backend": args.backend}
    images = {}
    for dt in ("fp32", args.dtype):
        pipe, latents, images[("fastsd", dt)], row[f"fastsd_{dt}_s"] = _fastsd(args.model, dt, args)
        if args.compare:
            images[("diffusers", dt)], row[f"diffusers_{dt}_s"] = _diffusers(pipe, args, latents)
        del pipe
    row[f"psnr_fastsd_{args.dtype}_vs_fp32"] = psnr(images[("fastsd", args.dtype)], images[("fastsd", "fp32")])
    if args.compare:
        row[f"psnr_diffusers_{args.dtype}_vs_fp32"] = psnr(images[("diffusers", args.dtype)],
                                                           images[("diffusers", "fp32")])
        row["psnr_fastsd_vs_diffusers_fp32"] = psnr(images[("fastsd", "fp32")], images[("diffusers", "fp32")])
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
