"""Peak RSS while loading a full-size SD1.5 single file, against the loaded models' size.

    python -m fastsd.benchmarks.load_memory                # writes a random-weight SD1.5 fp16 file to a temp dir first
    python -m fastsd.benchmarks.load_memory --file model.safetensors --dtype fp16

Each load runs in a fresh subprocess so that peaks don't mix; RSS is read from /proc (VmHWM), the
baseline being the process after `import torch, fastsd` and before the load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from fastsd.cli import ArgumentParser, usage_error

CHILD = r"""
import json, sys, torch, fastsd
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
pipe = fastsd.load_pipeline(sys.argv[1], device="cpu", dtype=sys.argv[2])
model = sum(p.numel() * p.element_size() for m in (pipe.clip, pipe.vae, pipe.unet) for p in m.parameters())
print(json.dumps({"baseline_bytes": base, "peak_bytes": rss("VmHWM:"), "after_bytes": rss("VmRSS:"), "model_bytes": model}))
"""


def make_random_sd15_file(path: str, dtype: str) -> None:
    import safetensors.torch
    import torch

    from fastsd import load_pipeline
    from fastsd.checkpoint import ldm_state_dict

    pipe = load_pipeline("random:sd15", device="cpu", dtype=dtype, backend="torch")
    sd = ldm_state_dict(pipe)
    safetensors.torch.save_file(sd, path)
    del pipe, sd
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m fastsd.benchmarks.load_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--file", help="an SD1.x single file; default: a random-weight SD1.5 file made for the run")
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args(argv)
    if args.file and not os.path.isfile(args.file):
        usage_error(ap, f"--file {args.file}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file
        if path is None:
            path = os.path.join(tmp, "sd15-random.safetensors")
            subprocess.run([sys.executable, "-c", f"from .load_memory import make_random_sd15_file as m; "
                            f"m({path!r}, {args.dtype!r})"], check=True)
        out = subprocess.run([sys.executable, "-c", CHILD, path, args.dtype], check=True, capture_output=True,
                             text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
    r.update(file=args.file or "random SD1.5", file_bytes=os.path.getsize(path) if args.file else None, dtype=args.dtype,
             ratio=(r["peak_bytes"] - r["baseline_bytes"]) / r["model_bytes"])
    gib = 2 ** 30
    print(json.dumps(r))
    print(f"loaded {r['model_bytes'] / gib:.2f} GiB of weights ({args.dtype}); peak RSS above baseline "
          f"{(r['peak_bytes'] - r['baseline_bytes']) / gib:.2f} GiB = {r['ratio']:.2f}x the model")


if __name__ == "__main__":
    main()
