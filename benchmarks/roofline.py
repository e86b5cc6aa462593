"""A compute floor for one image on this CPU: the recipe's matmul/conv FLOPs over the best GEMM rate
measured here.

    python -m fastsd.benchmarks.roofline                               # LCM recipe: 512 px, 4 steps, guidance 1, TAESD
    python -m fastsd.benchmarks.roofline --steps 20 --cfg 7.5 --vae kl --json roofline.jsonl

FLOPs: torch's FlopCounterMode over one forward of each model (random weights, the architecture is what
counts): the text encoder (one prompt, two at guidance > 1), the UNet at batch 1 (2 with CFG) times
`--steps`, the decoder (TAESD or the KL VAE). It counts matmuls, convolutions and attention (2 FLOPs per
multiply-add), none of the elementwise work, so the floor is low.
Rate: the best of `torch.mm` on square and UNet-shaped matrices in `--dtype`, which is oneDNN/MKL's GEMM
on this ISA: no UNet layer runs faster than a large dense GEMM. floor = FLOPs / rate: no backend can make
the image faster on this CPU without doing less arithmetic.
"""
from __future__ import annotations

import json
import sys
import time

from .common import check_model_and_res, git_commit, isa_fields, timestamp, versions
from fastsd.cli import ArgumentParser, positive_int, thread_count

GEMM_SHAPES = ((4096, 4096, 4096), (2048, 2048, 2048), (4096, 320, 1280), (4096, 1280, 320), (1024, 640, 2560))


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_gemm_rate(dtype, repeat: int) -> tuple[float, tuple[int, int, int]]:
    """(FLOP/s, (m, k, n)) of the fastest torch.mm among GEMM_SHAPES, best of `repeat` calls each."""
    import torch

    best = (0.0, GEMM_SHAPES[0])
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        torch.mm(a, b)
        t = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeat))
        best = max(best, (2 * m * k * n / t, (m, k, n)))
    return best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m fastsd.benchmarks.roofline", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--steps", type=positive_int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0, help="guidance scale: > 1 runs the UNet at batch 2")
    ap.add_argument("--vae", default="taesd", choices=["taesd", "kl"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fastsd's default")
    ap.add_argument("--threads", type=thread_count, default=None)
    ap.add_argument("--repeat", type=positive_int, default=5, help="timed calls per GEMM shape (the best counts)")
    ap.add_argument("--target", type=float, default=7.0, help="seconds per image to compare the floor with")
    ap.add_argument("--json", help="append the result row to this JSONL file")
    args = ap.parse_args(argv)
    check_model_and_res(ap, args.model, args.res)

    import torch

    import fastsd
    from fastsd.cli import set_threads
    from fastsd.models.taesd import TAESD

    threads = set_threads(args.threads)
    pipe = fastsd.load_pipeline(args.model, device="cpu", dtype="fp32", backend="torch")
    dtype = fastsd.load_pipeline("random:tiny", device="cpu", dtype=args.dtype).dtype  # what the user would run
    batch = 2 if args.cfg > 1 else 1
    f = pipe.config.vae.downscale
    z = torch.zeros(1, pipe.config.unet.in_channels, args.res // f, args.res // f)
    ctx = torch.zeros(batch, 77, pipe.config.unet.context_dim)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    decoder = TAESD(with_encoder=False).eval() if args.vae == "taesd" else pipe.vae
    with torch.no_grad():
        stages = {"text encoder": flops_of(lambda: pipe.clip(ids)),
                  "unet": args.steps * flops_of(lambda: pipe.unet(z.expand(batch, -1, -1, -1), torch.full((batch,), 500.0),
                                                                  ctx)),
                  "decoder": flops_of(lambda: decoder.decode(z[:, :4]))}
    rate, shape = best_gemm_rate(dtype, args.repeat)
    total = sum(stages.values())
    floor = total / rate
    row = {"suite": "roofline", "model": args.model, "res": args.res, "steps": args.steps, "cfg": args.cfg,
           "vae": args.vae, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
           "gflop": {k: round(v / 1e9, 1) for k, v in stages.items()}, "flops": stages, "gflop_total": round(total / 1e9, 1), "flops_total": total,
           "best_gemm_gflops": round(rate / 1e9, 1), "gemm_flops_per_s": rate, "best_gemm_shape": list(shape),
           "floor_s": round(floor, 4),
           "target_s": args.target, **isa_fields(), **versions(), "git_commit": git_commit(),
           "timestamp": timestamp(), "command": " ".join(["python -m fastsd.benchmarks.roofline", *sys.argv[1:]])}
    row.pop("cpu_flags", None)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    print(f"{args.model} {args.res} px, {args.steps} steps, UNet batch {batch}, {args.vae} decode, {row['dtype']}, "
          f"{threads} threads, ISA {row['isa']}")
    print("GFLOP (matmul/conv/attention): " + ", ".join(f"{k} {v:.1f}" for k, v in row["gflop"].items())
          + f"; total {total / 1e9:.1f}")
    print(f"best GEMM here: {rate / 1e9:.1f} GFLOP/s ({row['dtype']}, m,k,n = {shape})")
    print(f"compute floor: {floor:.2f} s per image ({'above' if floor > args.target else 'within'} the "
          f"{args.target:g} s target)")


if __name__ == "__main__":
    main()
