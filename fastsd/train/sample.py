"""Sample a model trained by fastsd.train with fastsd's samplers, and write a grid PNG.

    python -m fastsd.train.sample run/ --class 7 --cfg-scale 3 --sampler ddpm --steps 50 --n 16 --out grid.png
    python -m fastsd.train.sample run/ --class all --n 10 --out grid.png      # one row of --n samples per class

The trained UNet is wrapped exactly as the SD pipeline wraps its UNet: EpsDenoiser (eps -> x0 in
k-diffusion's sigma space, on the run's noise schedule) inside CFGDenoiser, whose cond is the class
embedding and whose uncond is the null-class embedding (one batched call for both). Predicted x0 is
clipped to [-1, 1] at every step (DDPM's clip_sample; --no-clip turns it off), since the data lives there.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

from fastsd.cli import (ArgumentParser, HelpFormatter, add_run_sampling_args, float_in, int_in, parse_run_args,
                        usage_error)
from fastsd.train.trainer import (MODEL_FILE, STATE_FILE, RunConfig, build_model, load_run_config, load_tensors,
                                  load_weights)

MAX_N = 256      # samples per grid row: a picture of the run, not a dataset (fastsd.train.evaluate draws those)
MAX_SCALE = 32   # pixels per image pixel


def load_run(run_dir: str, *, ema: bool = True):
    """(model in eval mode, RunConfig) from a run folder; EMA weights unless ema=False (the raw weights)."""
    run = load_run_config(run_dir)
    model = build_model(run)
    if ema:
        path = os.path.join(run_dir, MODEL_FILE)
        if not os.path.exists(path):
            raise ValueError(f"{run_dir}: no {MODEL_FILE} (has the run saved a checkpoint yet?)")
        tensors, _ = load_tensors(path)
    else:
        path = os.path.join(run_dir, STATE_FILE)
        if not os.path.exists(path):
            raise ValueError(f"{run_dir}: no {STATE_FILE}")
        all_t, _ = load_tensors(path)
        tensors = {k[len("model."):]: v for k, v in all_t.items() if k.startswith("model.")}
    load_weights(model, tensors, path)  # ValueError (one line) for weights of another model
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ValueError(f"{path}: holds non-finite weights (a diverged run; train again with a lower --lr)")
    model.eval().requires_grad_(False)
    return model, run


class ClampDenoiser:
    def __init__(self, model):
        self.model = model

    def __call__(self, x, sigma, **extra):
        return self.model(x, sigma, **extra).clamp(-1.0, 1.0)


@torch.no_grad()
def generate(model, run: RunConfig, labels, *, cfg_scale: float = 3.0, sampler: str = "ddpm", steps: int = 50,
             seed: int = 0, clip: bool = True, batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """Samples for `labels` (sequence of class ids; None entries or run.num_classes = unconditional) ->
    (N, C, H, W) float32 in [-1, 1]. Deterministic for a given seed (and batch_size)."""
    from fastsd.denoisers import CFGDenoiser, EpsDenoiser
    from fastsd.samplers import get_sampler
    from fastsd.schedules import alphas_cumprod

    null = run.num_classes
    labels = torch.tensor([null if c is None else int(c) for c in labels], dtype=torch.long)
    spec = get_sampler(sampler)
    sched = spec.schedule(steps, run.scheduler)
    den = EpsDenoiser(lambda x_in, t, context: model.unet(x_in, t, context), alphas_cumprod(run.scheduler),
                      schedule=sched)
    gen = torch.Generator().manual_seed(seed)
    shape = (run.channels, run.image_size, run.image_size)
    out = []
    for start in range(0, len(labels), batch_size):
        lab = labels[start:start + batch_size]
        cond = model.context(lab)
        uncond = model.context(torch.full_like(lab, null))
        guided = run.num_classes > 0 and cfg_scale != 1.0 and bool((lab != null).any())
        m = CFGDenoiser(den, cond, uncond if guided else None, cfg_scale if guided else 1.0)
        if clip:
            m = ClampDenoiser(m)
        x = torch.randn((len(lab), *shape), generator=gen) * sched.init_noise_sigma
        opts = {"generator": gen} if spec.stochastic else {}
        x = spec(m, x, sched.sigmas, disable=not progress, **opts)
        out.append((x * sched.out_scale).clamp(-1, 1))
    return torch.cat(out)


def make_grid(images: torch.Tensor, ncols: int, *, pad: int = 1, scale: int = 1):
    """(N, C, H, W) in [-1, 1] -> PIL image, ncols per row, `pad` px of grey between, each image scaled by
    `scale` (nearest neighbour, so pixels stay crisp)."""
    from PIL import Image

    n, c, h, w = images.shape
    a = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    nrows = math.ceil(n / ncols)
    grid = np.full((c, pad + nrows * (h + pad), pad + ncols * (w + pad)), 128, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = a[i]
    im = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


def parse_class(value: str | None, run: RunConfig) -> list[int | None] | None:
    """--class: None (default), 'all', a class id, or a class name -> list of class ids (None = no label)."""
    if value is None:
        return None if run.num_classes else [None]
    if run.num_classes == 0:
        raise ValueError("this run is unconditional (trained without --conditional); leave out --class")
    if value == "all":
        return list(range(run.num_classes))
    if value in run.class_names:
        return [run.class_names.index(value)]
    try:
        c = int(value)
    except ValueError:
        c = -1
    if not 0 <= c < run.num_classes:
        raise ValueError(f"--class {value}: expected 'all', a class id 0..{run.num_classes - 1} or a class name "
                         f"({', '.join(run.class_names[:20])})")
    return [c]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastsd.train.sample", description="Sample a fastsd.train run into a "
                       "grid PNG.", formatter_class=HelpFormatter)
    add_run_sampling_args(p, sampler="ddpm")
    p.add_argument("--class", dest="klass", default=None, help="class id or name, or 'all' for one row per class "
                   "(default: all for a conditional run)")
    p.add_argument("--cfg-scale", type=float_in(), default=3.0, help="classifier-free guidance scale (1 = no guidance)")
    p.add_argument("--n", type=int_in(1, MAX_N), default=16, help="number of samples (per class with --class all)")
    p.add_argument("--out", default="grid.png", help="PNG path (written atomically)")
    p.add_argument("--scale", type=int_in(1, MAX_SCALE), default=None,
                   help="enlarge each pixel (default: to >= 32 px per image)")
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    return p



def output_problem(flag: str, path: str, ext: str) -> str | None:
    """A one-line reason why the output file `path` (given as `flag`) can't be written, checked before any work:
    wrong extension, a folder, or a missing parent folder. None when it may be written."""
    if not path.lower().endswith(ext):  # (ext "" takes any name)
        return f"{flag} {path}: expected a {ext} path"
    if os.path.isdir(path):
        return f"{flag} {path}: is a folder"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{flag} {path}: folder {folder} does not exist"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_run_args(parser, argv)
    why = output_problem("--out", args.out, ".png")
    if why:
        usage_error(parser, why)
    from fastsd.image import save_png
    from fastsd.samplers import get_sampler

    try:
        sampler = get_sampler(args.sampler).name
        model, run = load_run(args.run, ema=not args.raw)
        classes = parse_class(args.klass or ("all" if run.num_classes else None), run)
        per_row = classes is not None and len(classes) > 1
        labels = [c for c in classes for _ in range(args.n)] if per_row else classes * args.n
        x = generate(model, run, labels, cfg_scale=args.cfg_scale, sampler=sampler, steps=args.steps,
                     seed=args.seed, clip=not args.no_clip, progress=not args.no_progress)
    except (ValueError, RuntimeError) as e:
        lines = str(e).strip().splitlines()
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    ncols = args.n if per_row else math.ceil(math.sqrt(args.n))
    scale = args.scale or max(1, math.ceil(32 / run.image_size))
    info = (f"fastsd.sample run={os.path.abspath(args.run)} class={args.klass or ('all' if per_row else 'none')} "
            f"cfg_scale={args.cfg_scale} sampler={sampler} steps={args.steps} n={args.n} seed={args.seed}")
    save_png(make_grid(x, ncols, scale=scale), args.out, info)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
