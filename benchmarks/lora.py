"""LoRA load, merge, switch and unload times on a full-size model.

    python -m fastsd.benchmarks.lora                                # random:sd15, default dtype, backend auto
    python -m fastsd.benchmarks.lora --dtype fp32 --rank 32 --repeat 5 --json lora.jsonl
    python -m fastsd.benchmarks.lora --set 2                        # sets of two LoRAs (a prompt with two tags)

Two random LoRAs (two sets of `--set` LoRAs) of rank `--rank` on every UNet layer of the input, middle and
output blocks (attention, resnets with LoCon on the 3x3 convolutions, down/upsamplers) and every text encoder
linear are written as fp16 kohya .safetensors files to a temp folder (so they are in the page cache, as a LoRA
used twice is). The pipeline runs one small generation and two UNet calls at `--res` first, so the CPU path's
weights are packed (and its per-shape choices made) as in a warm process.
Timed: `load_loras` of a set (read + check + merge; the CPU path packs each merged weight as its layer last
ran), `unload_loras`, a switch (unload A + load B), the first UNet call after a switch against the next one
(the CPU path transforms the changed Winograd layers' weights at their first call, and packs weights its
layers had not run packed), and switches with a UNet call before each (as between a user's images).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from .common import check_model_and_res, git_commit, isa_fields, timestamp, versions
from fastsd.cli import ArgumentParser, positive_int


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _unet_call(pipe, res: int) -> float:
    import torch

    f = pipe.config.vae.downscale
    x = torch.randn(1, 4, res // f, res // f)
    ctx = torch.randn(1, 77, pipe.config.unet.context_dim)
    with torch.no_grad(), pipe._running(pipe.unet):
        return _timed(lambda: pipe.unet(x, torch.tensor([500.0]), ctx))


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m fastsd.benchmarks.lora", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fastsd's default")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rank", type=positive_int, default=32)
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--res", type=int, default=512, help="size of the UNet calls timed after a switch (0: none)")
    ap.add_argument("--set", type=positive_int, default=1,
                    help="LoRAs per set (A and B), loaded together with load_loras as a prompt's tags are")
    ap.add_argument("--json", help="append the result row to this JSONL file")
    args = ap.parse_args(argv)
    check_model_and_res(ap, args.model, args.res, zero_res=True)

    import torch

    import fastsd
    from fastsd.cli import set_threads
    from fastsd.testing_lora import layers_of, write_random_lora

    threads = set_threads(args.threads)
    pipe = fastsd.load_pipeline(args.model, device="cpu", dtype=args.dtype, backend=args.backend)
    pipe.generate("warm up", steps=1, width=64, height=64, guidance_scale=1, progress=False)  # packs the weights
    for _ in range(2 if args.res else 0):  # packed (and tuned) for the timed UNet calls' shapes too
        _unet_call(pipe, args.res)
    layers = [n for n in layers_of(pipe.unet) if n.startswith(("input_blocks.", "middle_block.", "output_blocks."))
              and n != "input_blocks.0.0"]
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"{i}.safetensors") for i in range(2 * args.set)]
        for seed, f in enumerate(files, 1):
            n = write_random_lora(f, pipe, fmt="kohya_ldm", rank=args.rank, alpha=args.rank / 2, layers=layers,
                                  dtype=torch.float16, seed=seed)
        file_bytes = os.path.getsize(files[0])
        a, b = [(f, 0.8) for f in files[:args.set]], [(f, 0.8) for f in files[args.set:]]  # the two sets

        def timed_switch(i: int) -> float:  # unload, then load B and A in turn
            return _timed(lambda: (pipe.unload_loras(), pipe.load_loras(b if i % 2 == 0 else a)))

        load, unload, switch = [], [], []
        for _ in range(args.repeat):
            load.append(_timed(lambda: pipe.load_loras(a)))
            unload.append(_timed(pipe.unload_loras))
        pipe.load_loras(a)
        for i in range(args.repeat):
            switch.append(timed_switch(i))
        kept = sum(p.numel() * p.element_size() for pair in pipe._loras._originals.values()  # (weight, bias)
                   for p in pair if p is not None)
        first = second = None
        switch_run = []  # as between a user's images: the merged weights were packed by a run before the switch
        if args.res:
            pipe.unload_loras()
            pipe.load_loras(a)
            first, second = _unet_call(pipe, args.res), _unet_call(pipe, args.res)
            for i in range(args.repeat):
                switch_run.append(timed_switch(i))
                _unet_call(pipe, args.res)
    row = {"suite": "lora", "model": args.model, "dtype": str(pipe.dtype).removeprefix("torch."),
           "backend": pipe.backend.name, "rank": args.rank, "set": args.set, "layers": n, "file_bytes": file_bytes,
           "load_s": load, "unload_s": unload, "switch_s": switch, "switch_after_run_s": switch_run,
           "originals_kept_bytes": kept,
           "unet_first_call_after_switch_s": first, "unet_next_call_s": second, "res": args.res,
           "threads": threads, **isa_fields(), **versions(), "git_commit": git_commit(), "timestamp": timestamp(),
           "command": " ".join(["python -m fastsd.benchmarks.lora", *sys.argv[1:]])}
    row.pop("cpu_flags", None)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"{args.model} {row['dtype']} backend {row['backend']}, {threads} threads, ISA {row['isa']}: LoRA rank "
          f"{args.rank}, {n} layers, {file_bytes / 2**20:.0f} MiB fp16 file"
          + (f" each, sets of {args.set}" if args.set > 1 else ""))
    print(f"load + merge {med(load):.2f} s (median of {len(load)}; all {', '.join(f'{t:.2f}' for t in load)}), "
          f"unload {med(unload):.2f} s, switch A->B {med(switch):.2f} s; originals kept {kept / 2**30:.2f} GiB")
    if first is not None:
        print(f"UNet call at {args.res} px after a switch {first:.2f} s, the next one {second:.2f} s "
              f"(the difference: the CPU path preparing changed weights it could not at the load); a switch after a "
              f"UNet call {med(switch_run):.2f} s (all {', '.join(f'{t:.2f}' for t in switch_run)})")


if __name__ == "__main__":
    main()
