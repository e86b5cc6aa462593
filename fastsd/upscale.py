"""Command line: python -m fastsd.upscale IMAGE [IMAGE ...] --upscaler NAME [--scale 2 | --width W --height H]
(A1111's Extras tab: its postprocessing upscale, one upscaler).

An upscaler is A1111's `Lanczos` or `Nearest`, an upscaler model file (ESRGAN / Real-ESRGAN, fastsd/upscalers.py),
or a model's name in `--upscaler-dir` (A1111's names for the files it downloads, "R-ESRGAN 4x+", included). Writes
PNGs keeping the source's infotext ("parameters") and adding A1111's "postprocessing" text, into a folder with
A1111's numbered names (`00012-NAME.png`) or to one .png path. User mistakes end with one `error:` line and exit
status 2, checked before any model work; nothing half-written.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastsd.cli import ArgumentParser, HelpFormatter, fail, one_line_warnings, positive_int, set_threads, thread_count

BUILTIN = ("Lanczos", "Nearest")
MAX_SCALE = 8.0  # A1111's upscaling_resize slider
MAX_SIDE = 8192


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastsd.upscale", formatter_class=HelpFormatter,
                       description="Upscale image files as A1111's Extras tab does (one upscaler).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images to upscale (PNG, JPEG, WEBP, ...)")
    p.add_argument("--upscaler", required=True, help="Lanczos, Nearest, an upscaler model file (.pth / .safetensors), "
                   "or a model's name in --upscaler-dir")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR", help="upscaler models by file name (A1111's "
                   "models/ESRGAN; default $FASTSD_UPSCALER_DIR)")
    p.add_argument("--scale", type=float, default=None, help="upscale by this factor (A1111's 'Scale by'; default 2)")
    p.add_argument("--width", type=positive_int, default=None, help="upscale to cover this width (with --height: "
                   "A1111's 'Scale to')")
    p.add_argument("--height", type=positive_int, default=None, help="upscale to cover this height")
    p.add_argument("--no-crop", action="store_true", help="with --width/--height: keep the covering size instead "
                   "of centring it on a width x height canvas (A1111's 'Crop to fit' off)")
    p.add_argument("--out", default="outputs/extras-images", help="output folder (numbered names NNNNN-NAME.png), "
                   "or a .png path for a single image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out FILE.png")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="the model's dtype (default: bf16 where "
                   "this CPU computes it faster, else fp32; fp32 on CUDA)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: the physical cores)")
    return p


def upscaler_choice(args: argparse.Namespace) -> str:
    """"Lanczos" / "Nearest", or the path of the model file --upscaler names; ValueError (one line) otherwise."""
    from fastsd import hires
    from fastsd.upscalers import UPSCALER_DIR_ENV, upscaler_path

    name = args.upscaler
    known = hires.builtin_upscaler(name)
    if known in BUILTIN:
        return known
    if known is not None:
        raise ValueError(f"--upscaler {known!r}: " + ("a latent upscale mode, for the hires fix only"
                                                      if known in hires.LATENT_MODES else "nothing to upscale with")
                         + f"; give {' or '.join(BUILTIN)}, or an upscaler model")
    if name.lower().endswith(hires.MODEL_EXTS) or os.sep in name or "/" in name:
        if not os.path.isfile(name):
            raise ValueError(f"--upscaler {name}: no such file")
        return name
    return upscaler_path(name, args.upscaler_dir or os.environ.get(UPSCALER_DIR_ENV))


def check_size(args: argparse.Namespace) -> tuple[float | None, tuple[int, int] | None]:
    """(scale, resize) of --scale or --width/--height, checked."""
    if (args.width is None) != (args.height is None):
        raise ValueError("--width and --height go together (A1111's 'Scale to'); or give --scale")
    if args.width is not None:
        if args.scale is not None:
            raise ValueError("--scale or --width/--height, not both")
        if max(args.width, args.height) > MAX_SIDE:
            raise ValueError(f"--width/--height: at most {MAX_SIDE} px")
        return None, (args.width, args.height)
    if args.no_crop:
        raise ValueError("--no-crop goes with --width/--height")
    scale = 2.0 if args.scale is None else args.scale
    if not 1.0 <= scale <= MAX_SCALE:  # (a NaN fails this too)
        raise ValueError(f"--scale must be in [1, {MAX_SCALE:g}], got {args.scale}")
    return scale, None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    one_line_warnings()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written for unfinished images", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from fastsd.generate import check_out

    try:
        upscaler = upscaler_choice(args)
        scale, resize = check_size(args)
        if len(args.images) > 1 and args.out.lower().endswith(".png"):
            raise ValueError(f"--out {args.out} names one file but {len(args.images)} images are given; give a folder")
        folder, file = check_out(args.out, 1, args.overwrite)
    except ValueError as e:
        return fail(str(e))
    import torch  # (from here on)

    from fastsd.a1111 import image_infotext
    from fastsd.files import atomic_write, write_numbered
    from fastsd.hires import IMAGE_RESAMPLE, upscaler_label
    from fastsd.image import format_params, load_image, png_writer
    from fastsd.load import parse_device, parse_dtype
    from fastsd.tensorfile import CheckpointError
    from fastsd.upscalers import centred, extras_target, load_upscaler, resample_pass, upscale_by

    try:
        images = [load_image(path, "image") for path in args.images]
        made = []
        for path, im in zip(args.images, images):
            _, dest, canvas = extras_target(im.size, scale, resize, crop=not args.no_crop)
            if min(dest) < 8 or max(*dest, *(canvas or ())) > MAX_SIDE:
                raise ValueError(f"{path}: the upscale would make a {dest[0]}x{dest[1]} image from "
                                 f"{im.width}x{im.height}; fastsd makes 8 to {MAX_SIDE} px a side")
            made.append((dest, canvas))
        threads = set_threads(args.threads)
        model = None
        if upscaler not in BUILTIN:
            from fastsd import backends

            device = parse_device(args.device)
            dtype = parse_dtype(args.dtype, device) if device.type == "cpu" else torch.float32
            backend = backends.get("cpu" if device.type == "cpu" else "torch", device, dtype)
            model = load_upscaler(upscaler, dtype=dtype, device=device, backend=backend)
    except (ValueError, CheckpointError) as e:
        return fail(str(e))
    what = f"model {model.name} ({model.arch} x{model.scale}, {str(model.dtype)[6:]})" if model else upscaler
    print(f"fastsd.upscale: {len(images)} image(s), {what}, {threads} threads", file=sys.stderr)
    # the infotext's name: as typed (a built-in, a model's name), or for a file A1111's name of it (hires.upscaler_label)
    label = upscaler if model is None else args.upscaler if upscaler != args.upscaler else upscaler_label(upscaler)
    written = []
    for path, im, (dest, canvas) in zip(args.images, images, made):
        text = image_infotext(im.info, im.getexif())
        rgb = im.convert("RGB")
        s, _, _ = extras_target(rgb.size, scale, resize, crop=not args.no_crop)
        one_pass = model.run if model else resample_pass(IMAGE_RESAMPLE[upscaler], s)
        out = centred(upscale_by(rgb, s, one_pass, dest), canvas)
        info = ({"Postprocess upscale by": f"{s:g}"} if resize is None else
                {"Postprocess upscale to": f"{resize[0]}x{resize[1]}",
                 **({"Postprocess crop to": f"{resize[0]}x{resize[1]}"} if canvas else {})})
        info["Postprocess upscaler"] = label
        writer = png_writer(out, text, {"postprocessing": format_params(info)})
        stem = os.path.splitext(os.path.basename(path))[0]
        if file is None:
            os.makedirs(folder, exist_ok=True)
        written.append(atomic_write(file, writer, overwrite=args.overwrite) if file else
                       write_numbered(folder, f"{stem}.png", writer))
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
