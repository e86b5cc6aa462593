"""Measure whether `--backend auto` should take openvino on this CPU:

    python -m fastsd.backends.openvino_auto [--model random:sd15] [--res 512] [--dtype bf16] [--threads N]

Times one UNet step (batch 2 at res/8 latents, CFG's batch) with the cpu backend and with the openvino
backend on the same weights, and stores the faster one in the per-CPU choice cache of cpu_tune.py
(key `openvino.auto_key(dtype)`: dtype and thread count; the file is per CPU model, ISA and torch
version), measured again on every run of this command. `auto` on a CPU takes openvino only where this
measurement chose it and openvino imports; without it, the cpu backend.

Opt-in, not measured inside a load: a fair measurement needs the real model converted (minutes for SD1.5
on a first run; cached after) and a few UNet steps of each backend, far beyond the ~0.1 s budget of the
CPU path's op choices, and a load must not silently spend that.
"""
from __future__ import annotations

import os
import sys

from fastsd.cli import ArgumentParser, int_in, thread_count


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m fastsd.backends.openvino_auto",
                        description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:sd15", help="weights do not matter for speed (default random:sd15)")
    ap.add_argument("--res", type=int_in(64, 4096, multiple=8), default=512, help="image side in px (default 512)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: the CPU's default dtype")
    ap.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    import torch

    from fastsd import CheckpointError, load_pipeline
    from fastsd.backends import BackendError, cpu_tune
    from fastsd.backends.openvino import auto_key

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        pipes = {name: load_pipeline(a.model, device="cpu", dtype=a.dtype, backend=name) for name in ("cpu", "openvino")}
    except (ValueError, BackendError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, dtype = pipes["cpu"].config, pipes["cpu"].dtype
    g = torch.Generator().manual_seed(0)
    lat = a.res // cfg.vae.downscale
    x = torch.randn(2, cfg.unet.in_channels, lat, lat, generator=g).to(dtype)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(dtype)
    t = torch.full((2,), 500.0)
    key = auto_key(dtype)
    os.environ[cpu_tune.MODE_ENV] = "1"  # measure again, whatever is cached
    with torch.inference_mode():
        candidates = {name: (lambda p=p: p.unet(x, t, ctx)) for name, p in pipes.items()}
        choice = cpu_tune.tuner().choose(key, candidates, default="cpu")
    entry = cpu_tune.tuner().entries()[key]
    ms = entry["ms"]
    kept = f"cached in {cpu_tune.tuner().path}" + (
        "; other work competed for the CPUs while timing: run it again on a quiet machine" if entry.get("busy") else "")
    print(f"{key}: cpu {ms['cpu']:.0f} ms, openvino {ms['openvino']:.0f} ms per UNet step at {a.res} px -> "
          f"auto takes {choice} ({kept})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
