"""Command line: python -m fastsd.batch JOBS --model M --out DIR [--batch N] [--ray [ADDRESS]] [--workers N]

Exit status: 0 when every job is done, 1 when some job failed (recorded in the manifest; --retry-failed
runs them again) or a result could not be written, 2 for a usage error (one `error:` line, nothing written), 130
when interrupted, 143 on SIGTERM (what finished is kept; the same command resumes).
"""
from __future__ import annotations

import argparse
import signal
import sys

from fastsd.cli import (MAX_THREADS, ArgumentParser, HelpFormatter, add_backend_arg, fail, one_line_warnings,
                        positive_int, thread_count)
from fastsd.batch.jobs import PNG_INFO_PROPS
from fastsd.generate import _settings_options, default_model


def _resources(positive: bool):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not (v > 0 if positive else v >= 0) or v != v or v > MAX_THREADS:
            raise argparse.ArgumentTypeError(f"expected a number {'>' if positive else '>='} 0 and <= {MAX_THREADS}, "
                                             f"got {s}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastsd.batch", formatter_class=HelpFormatter,
                       description="Many images from a job file, resumable; in this process or on a Ray "
                       "cluster. A field a job leaves out takes the option's value below.")
    p.add_argument("jobs", nargs="?", default=None, help=".jsonl (one JSON object a line), .csv (with a header), .txt "
                   "(one prompt a line), or - (standard input: JSONL or one prompt a line); or --img2img-dir")
    p.add_argument("--model", help="as python -m fastsd.generate --model; none given: $FASTSD_MODEL, else the only "
                   "SD1.x model in the local HF cache")
    p.add_argument("--out", required=True, help="output folder: ID.png per job and manifest.jsonl")
    _settings_options(p, skip=("prompt", "num_images", "seed", "width", "height", "subseed"))
    p.add_argument("--seed", type=int, default=None, help="job i (0-based, in file order) uses seed + i; none given: "
                   "each job's seed is derived from its line and content")
    p.add_argument("--subseed", type=int, default=None, help="A1111 variation seed (with --subseed-strength above 0): "
                   "job i uses subseed + i; none given: each job's is derived from its line and content")
    p.add_argument("--width", type=int, default=None, help="a multiple of 8; none given: 512")
    p.add_argument("--height", type=int, default=None, help="a multiple of 8; none given: 512")
    g = p.add_argument_group("img2img and inpainting (jobs with an init image; A1111's img2img fields, as fastsd.serve "
                             "takes them)")
    g.add_argument("--img2img-dir", default=None, metavar="IN", help="A1111's img2img batch: one job per image of IN "
                   "(natural order; id = the file's stem) instead of a job file")
    g.add_argument("--mask-dir", default=None, metavar="MASKS", help="with --img2img-dir: each image's inpainting mask, "
                   "the file of its stem in MASKS (a folder of one mask: that mask for every image, as A1111)")
    g.add_argument("--prompt", default="", help="with --img2img-dir: every job's prompt")
    g.add_argument("--use-png-info", nargs="?", const=",".join(PNG_INFO_PROPS), default=None, metavar="KEYS",
                   help="with --img2img-dir: A1111's 'PNG info' option: these keys of each input's infotext (comma-"
                   f"separated; no value: {', '.join(PNG_INFO_PROPS)}); its prompts are appended to --prompt and "
                   "--negative-prompt, the others replace the options")
    g.add_argument("--png-info-dir", default=None, metavar="DIR", help="with --use-png-info: read the infotext of the "
                   "file of the input's name in DIR instead")
    g.add_argument("--resize-mode", type=int, default=0, help="A1111's: 0 just resize, 1 crop and resize, 2 resize and "
                   "fill, 3 just resize (latent upscale)")
    g.add_argument("--mask-blur", type=int, default=None, help="A1111's mask_blur, px (none given: mask_blur_x / _y, 4)")
    g.add_argument("--inpainting-fill", type=int, default=0, help="A1111's masked content: 0 fill, 1 original, "
                   "2 latent noise, 3 latent nothing")
    g.add_argument("--inpaint-full-res", type=_flag, default=True, metavar="true|false", help="A1111's 'only masked' "
                   "(true, its API's default) or the whole picture (false, its UI's)")
    g.add_argument("--inpaint-full-res-padding", type=int, default=0, help="A1111's 'only masked padding', px")
    g.add_argument("--inpainting-mask-invert", type=int, choices=[0, 1], default=0, help="1: inpaint what is not "
                   "masked")
    p.add_argument("--styles-file", default=None, metavar="PATH", help="A1111's prompt styles (a styles.csv or a folder "
                   "of them) the jobs' styles name; none given: $FASTSD_STYLES")
    p.add_argument("--style", action="append", default=[], metavar="NAME", help="a style of --styles-file for jobs "
                   "without a 'styles' field (repeatable, applied in order)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help="LoRA for jobs without a "
                   "'loras' field (repeatable)")
    p.add_argument("--lora-dir", default=None, help="where LoRA names are looked up; none given: $FASTSD_LORA_DIR")
    p.add_argument("--vae", default=None, help="replace the model's VAE, as python -m fastsd.generate --vae (an LDM "
                   "VAE file, a diffusers VAE folder, taesd:PATH, or a file of --vae-dir by name or stem)")
    p.add_argument("--vae-dir", default=None, metavar="DIR", help="folder of VAE files (A1111's models/VAE) that --vae "
                   "names and A1111's \"Automatic\" VAE is looked for in, as python -m fastsd.generate --vae-dir; "
                   "none given: $FASTSD_VAE_DIR")
    p.add_argument("--embeddings-dir", default=None, help="textual-inversion embeddings the prompts may name by file "
                   "name, as python -m fastsd.generate; none given: $FASTSD_EMBEDDINGS_DIR")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR", help="upscaler models (ESRGAN, Real-ESRGAN, "
                   "SwinIR .pth / .safetensors; A1111's models/ESRGAN) that --hires-upscaler and the jobs' "
                   "hires_upscaler name by file name; none given: $FASTSD_UPSCALER_DIR")
    p.add_argument("--batch", type=positive_int, default=1, help="up to N compatible jobs in one UNet call, where "
                   "measured identical and faster")
    p.add_argument("--always-batch", action="store_true", help="batch wherever identical, even when not faster")
    p.add_argument("--retry-failed", action="store_true", help="run again the jobs the manifest records as failed")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: no value = start a cluster on this machine, auto = the running cluster, or "
                   "host:6379 / ray://host:10001")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="Ray actors; none given: as many as fit the cluster")
    p.add_argument("--cpus-per-worker", type=_resources(True), default=None, help="Ray CPUs per actor (its threads); "
                   "none given: 1")
    p.add_argument("--gpus-per-worker", type=_resources(False), default=None, help="Ray GPUs per actor; none given: 0")
    p.add_argument("--device", default=None, help="cpu or cuda; none given: cuda when available")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="as python -m fastsd.generate")
    add_backend_arg(p)
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads per process; none given: the "
                   "physical cores, on Ray --cpus-per-worker")
    p.add_argument("--allow-large", action="store_true", help="allow width/height above 4096")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


RAY_OPTIONS = ("workers", "cpus_per_worker", "gpus_per_worker")
FOLDER_OPTIONS = ("mask_dir", "use_png_info", "png_info_dir")  # (and --prompt: with --img2img-dir only)


def _flag(s: str) -> bool:
    if s.strip().lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.strip().lower() in ("true", "1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    one_line_warnings()
    ray_only = [f"--{n.replace('_', '-')}" for n in RAY_OPTIONS if getattr(args, n) is not None]
    if args.ray is None and ray_only:  # (a run in this process has one worker: these would do nothing)
        return fail(f"{ray_only[0]} is for Ray workers: add --ray (a cluster on this machine) or --ray ADDRESS")
    if (args.jobs is None) == (args.img2img_dir is None):
        return fail("give a job file or --img2img-dir IN (one job per image of IN), not both" if args.jobs else
                    "give a job file (.jsonl, .csv, .txt, or - for standard input) or --img2img-dir IN")
    folder_only = [f"--{n.replace('_', '-')}" for n in FOLDER_OPTIONS if getattr(args, n) is not None]
    folder_only += ["--prompt"] if args.prompt else []
    if args.img2img_dir is None and folder_only:
        return fail(f"{folder_only[0]} is for --img2img-dir (a job file's jobs have their own fields)")
    if args.png_info_dir is not None and args.use_png_info is None:
        return fail("--png-info-dir is for --use-png-info")
    if args.ray is not None:
        from fastsd.batch.ray_pool import ray_missing

        if (why := ray_missing()) is not None:
            return fail(why)
    previous = signal.signal(signal.SIGTERM, _terminated)  # (a scheduler's stop: said as Ctrl-C is)
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        how, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"{how}; finished jobs are kept: run the same command again to resume", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it stops as at Ctrl-C (the finished jobs are kept)."""


def _terminated(signum, frame):
    raise Terminated


def _run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from fastsd.batch.jobs import Defaults, Img2ImgFolder, parse_loras
    from fastsd.batch.manifest import OutputFolderError, OutputWriteError
    from fastsd.batch.ray_pool import WorkersLost
    from fastsd.batch.runner import print_summary, run

    try:
        defaults = Defaults(**{f.name: getattr(args, f.name) for f in fields(Defaults) if hasattr(args, f.name)
                               and f.name not in ("loras", "styles")}, loras=parse_loras(args.lora),
                            styles=tuple(args.style))
        jobs = args.jobs
        if args.img2img_dir is not None:
            props = () if args.use_png_info is None else tuple(k.strip() for k in args.use_png_info.split(",")
                                                               if k.strip())
            jobs = Img2ImgFolder(args.img2img_dir, args.mask_dir, args.prompt, props, args.png_info_dir)
            jobs.check()
        model = args.model or default_model()
    except (ValueError, TypeError) as e:
        return fail(str(e))
    from fastsd import BackendError, CheckpointError

    summary: dict = {}
    try:
        rows = run(jobs, model=model, out=args.out, ray=args.ray, batch=args.batch, workers=args.workers,
                   cpus_per_worker=args.cpus_per_worker or 1, gpus_per_worker=args.gpus_per_worker or 0,
                   defaults=defaults,
                   retry_failed=args.retry_failed, progress=not args.no_progress, device=args.device,
                   dtype=args.dtype, backend=args.backend, threads=args.threads, lora_dir=args.lora_dir,
                   upscaler_dir=args.upscaler_dir, always_batch=args.always_batch, allow_large=args.allow_large,
                   summary=summary, vae=args.vae, vae_dir=args.vae_dir,
                   embeddings_dir=args.embeddings_dir, styles_file=args.styles_file)
    except OutputWriteError as e:  # mid-run: what was recorded before stays
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, CheckpointError, BackendError, OutputFolderError, WorkersLost) as e:
        return fail(str(e).splitlines()[0])
    print_summary(summary, args.out)
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        print(f"fastsd.batch: {failed} jobs are recorded as failed (--retry-failed runs them again)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
