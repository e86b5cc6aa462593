"""Upscaler model times: the hires fix's upscale of one image (A1111's rule: the model once, then Lanczos) with
random weights of the real models' sizes.

    python -m fastsd.benchmarks.upscaler                        # 512 -> 1024 px, every model, fp32 and bf16
    python -m fastsd.benchmarks.upscaler --model compact --dtype bf16 --repeat 3 --json upscaler.jsonl

Models: `rrdb` (RealESRGAN_x4plus / 4x-UltraSharp: RRDBNet, 23 blocks, 64 features), `anime6b`
(RealESRGAN_x4plus_anime_6B: 6 blocks), `compact` (realesr-general-x4v3: SRVGGNetCompact, 32 convs of 64
features), `swinir` (A1111's "SwinIR 4x", SwinIR_4x.pth: SwinIR-L, 9 groups of 6 blocks, 240 features,
window 8, nearest+conv x4; not in the default set: minutes per 512 px image). Each is timed as a pipeline runs it (prepared by `--backend`'s backend, default cpu: packed weights,
Winograd in fp32) and as `load_upscaler` gives it (plain torch, channels-last), alternating, after one warm-up
run each; tiles of 192 px as A1111's defaults (`--tile 0`: the whole image).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from .common import git_commit, isa_fields, timestamp, versions
from fastsd.cli import ArgumentParser, positive_int, thread_count

MODELS = {"rrdb": ("ESRGAN", dict(blocks=23)), "anime6b": ("ESRGAN", dict(blocks=6)),
          "compact": ("Compact", dict(convs=32)), "swinir": ("SwinIR", {})}


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m fastsd.benchmarks.upscaler", description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=list(MODELS), help="repeatable (default: all)")
    ap.add_argument("--dtype", action="append", choices=["fp32", "bf16"], help="repeatable (default: both)")
    ap.add_argument("--res", type=positive_int, default=512, help="the image's side before the upscale")
    ap.add_argument("--tile", type=int, default=192)
    ap.add_argument("--backend", default="cpu", help="the backend that prepares the model as a pipeline's would")
    ap.add_argument("--repeat", type=positive_int, default=1)
    ap.add_argument("--threads", type=thread_count, default=None)
    ap.add_argument("--json", help="append the result rows to this JSONL file")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from fastsd import backends
    from fastsd.cli import set_threads
    from fastsd.config import CompactConfig, ESRGANConfig, SwinIRConfig
    from fastsd.models.compact import SRVGGNetCompact
    from fastsd.models.esrgan import RRDBNet
    from fastsd.models.swinir import SwinIR
    from fastsd.upscalers import load_upscaler

    threads = set_threads(args.threads)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.res, args.res, 3), dtype=np.uint8))
    for name in args.model or [m for m in MODELS if m != "swinir"]:
        arch, kw = MODELS[name]
        torch.manual_seed(0)
        model = {"ESRGAN": lambda: RRDBNet(ESRGANConfig(**kw)), "Compact": lambda: SRVGGNetCompact(CompactConfig(**kw)),
                 "SwinIR": lambda: SwinIR(SwinIRConfig(**kw))}[arch]()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
            for dtype in args.dtype or ["fp32", "bf16"]:
                dt = torch.float32 if dtype == "fp32" else torch.bfloat16
                backend = backends.get(args.backend, torch.device("cpu"), dt)  # (as Pipeline.upscaler prepares it)
                ups = {"backend": load_upscaler(path, dtype=dt, backend=backend), "plain": load_upscaler(path, dtype=dt)}
                times: dict[str, list[float]] = {v: [] for v in ups}
                for i in range(args.repeat + 1):  # the first round warms up
                    for variant, up in ups.items():
                        t = time.perf_counter()
                        out = up.upscale(image, 2 * args.res, 2 * args.res, tile=args.tile)
                        if i:
                            times[variant].append(time.perf_counter() - t)
                row = {"suite": "upscaler", "model": name, "arch": arch, "dtype": dtype, "res": args.res,
                       "backend": backend.name,
                       "out": list(out.size), "tile": args.tile, "seconds": times, "threads": threads, **isa_fields(),
                       **versions(), "git_commit": git_commit(), "timestamp": timestamp(),
                       "command": " ".join(["python -m fastsd.benchmarks.upscaler", *sys.argv[1:]])}
                row.pop("cpu_flags", None)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
                med = {f: sorted(ts)[len(ts) // 2] for f, ts in times.items()}
                print(f"{name} ({arch}) {dtype}, ISA {row['isa']}, {threads} threads: {args.res} -> {out.size[0]} px "
                      f"{med['backend']:.2f} s prepared by backend {backend.name}, {med['plain']:.2f} s plain "
                      f"(median of {args.repeat})", flush=True)


if __name__ == "__main__":
    main()
