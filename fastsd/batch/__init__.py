"""Batch generation: many images from a job file, resumable, in this process or on a Ray cluster.

    python -m fastsd.batch jobs.jsonl --model M --out DIR [--batch N] [--ray [ADDRESS]] [--workers N]
    fastsd.batch.run("jobs.jsonl", model="random:tiny", out="out/")  # -> the manifest rows
    python -m fastsd.batch --img2img-dir IN [--mask-dir MASKS] --prompt P --model M --out DIR   (A1111's img2img batch)

jobs.py: job files -> jobs (defaults, stable ids and seeds, bad lines); manifest.py: the output folder
(lock, atomic PNGs, fsync'd manifest, resume); worker.py: one model, batches of compatible jobs;
runner.py: the driver; ray_pool.py: the Ray actor pool; progress.py: the bar; __main__.py: the CLI.
"""
from fastsd.batch.jobs import Defaults, Img2ImgFolder
from fastsd.batch.runner import run

__all__ = ["run", "Defaults", "Img2ImgFolder"]
