"""torch.compile for the fastsd models (issue #14 item 5: `--compile` / `load_pipeline(..., compile=True)`).

- CUDA: `mode="reduce-overhead"`: Inductor plus CUDA graphs, so the ~100 kernel launches of a UNet step (Triton
  kernels included: they are registered ops, `fastsd::attention` / `group_norm` / `cfg_step`, opaque nodes in the
  graph) are replayed as one graph instead of being launched from Python one by one.
- CPU: Inductor's default mode, its C++/OpenMP code generation (vectorised for the host ISA: AVX-512 here).

`compile_module` compiles a module's forward in place (`nn.Module.compile`): the module keeps its type, its
attributes and its state_dict keys (no `_orig_mod.` prefix), so checkpoint / LoRA code sees the same module.
`compile_pipeline` does the UNet and the VAE decoder of a fastsd Pipeline. The first call of each new input shape
pays the compile time (see docs/gpu-kernels.md, torch.compile: measured on CPU by
`python -m fastsd.kernels.compile --bench`).
"""
from __future__ import annotations

import sys
import time
import warnings

import torch
from torch import nn
from fastsd.cli import ArgumentParser, positive_int


def compile_options(device: torch.device | str) -> dict:
    """torch.compile keyword arguments for a module running on `device`."""
    if torch.device(device).type == "cuda":
        return dict(mode="reduce-overhead")
    return dict(backend="inductor")  # the C++ path on a CPU


def compile_module(module: nn.Module, device: torch.device | str | None = None, **overrides) -> nn.Module:
    """Compile `module`'s forward in place for its device (the device of its first parameter unless given);
    returns the module. `overrides` go to torch.compile (e.g. fullgraph=True, dynamic=False)."""
    if device is None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    module.compile(**{**compile_options(device), **overrides})
    return module


def compile_pipeline(pipe, **overrides):
    """Compile a fastsd Pipeline's UNet and VAE decoder in place (what `load_pipeline(..., compile=True)` does);
    returns the pipeline. The cpu backend's prepacked oneDNN weights are not Inductor graph inputs it can
    lower, and Inductor lays out and packs weights itself: a pipeline on the cpu backend is switched to the
    torch op table first, with a warning: on the CPUs measured, that is slower than the cpu backend uncompiled
    (`python -m fastsd.kernels.compile --bench --preset sd15 --res 512 --batch 1 --baseline cpu`)."""
    if pipe.backend.name == "openvino":
        raise ValueError("compile: backend openvino runs OpenVINO's own compiled models; torch.compile is for the "
                         "torch, cpu and triton backends")
    if pipe.backend.name == "cpu":
        warnings.warn("compile: Inductor's code replaces the cpu backend (prepacked weights, Winograd, chunked bf16 "
                      "attention), which measured faster for the SD1.5 UNet (docs/gpu-kernels.md, torch.compile)", stacklevel=2)
        pipe.backend = "torch"
    compile_module(pipe.unet, **overrides)
    if getattr(pipe, "vae", None) is not None:
        compile_module(pipe.vae.decoder, **overrides)
    return pipe


# ---------------------------------------------------------------------------------------------- CPU measurement
def bench_unet(preset: str = "tiny", res: int = 256, dtype: str = "fp32", pairs: int = 5, threads: int | None = None,
               batch: int = 2, baseline: str = "torch"):
    """Eager vs compiled UNet call on the CPU, random weights (fastsd.config preset), `batch` latents (2 = a CFG
    step, 1 = guidance <= 1): the compiled UNet runs the torch op table (what `compile_pipeline` gives), the eager
    one the `baseline` backend's (torch, or cpu: the default path on a CPU). Compile time (the first compiled
    call), then `pairs` alternating eager / compiled calls (A B A B: robust on a busy machine); median times and
    the median of the per-pair ratios, max relative difference of the outputs."""
    import copy
    import statistics

    from fastsd.backends import get
    from fastsd.config import PRESETS
    from fastsd.models.unet import UNet

    if threads:
        torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    eager = UNet(cfg.unet).to(dt).eval()  # a new UNet holds the reference op table (backend torch)
    compiled = compile_module(copy.deepcopy(eager), "cpu")
    get(baseline, "cpu", dt).prepare(eager)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.unet.in_channels, res // 8, res // 8, generator=g).to(dt)
    ctx = torch.randn(batch, 77, cfg.unet.context_dim, generator=g).to(dt)
    t = torch.full((batch,), 500.0)

    def timed(m):
        t0 = time.perf_counter()
        out = m(x, t, ctx)
        return time.perf_counter() - t0, out

    with torch.inference_mode():
        for _ in range(2):  # warm-up (the cpu backend decides and packs each layer's weight in its first calls)
            timed(eager)
        compile_s, out = timed(compiled)
        ref = eager(x, t, ctx)
        te, tc = [], []
        for _ in range(pairs):
            te.append(timed(eager)[0])
            tc.append(timed(compiled)[0])
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return dict(preset=preset, res=res, dtype=dtype, batch=batch, baseline=baseline, threads=torch.get_num_threads(),
                compile_s=compile_s, eager_s=statistics.median(te), compiled_s=statistics.median(tc),
                ratio=statistics.median([c / e for c, e in zip(tc, te)]), max_rel_diff=err)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m fastsd.kernels.compile",
                                 description="Measure torch.compile of the UNet on the CPU (eager vs compiled).")
    ap.add_argument("--bench", action="store_true", help="run the measurement")
    ap.add_argument("--preset", default="tiny", help="fastsd.config preset (tiny, sd15)")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=2, help="latents per UNet call (2: a CFG step; 1: guidance <= 1)")
    ap.add_argument("--baseline", default="torch", choices=["torch", "cpu"],
                    help="the eager side's backend: torch (what compile starts from) or cpu (the default on a CPU)")
    ap.add_argument("--pairs", type=int, default=5, help="alternating eager / compiled calls")
    ap.add_argument("--threads", type=positive_int)
    a = ap.parse_args(argv)
    if not a.bench:
        ap.print_help()
        return 0
    from fastsd.cpuinfo import cpu_model, isa_label

    r = bench_unet(a.preset, a.res, a.dtype, a.pairs, a.threads, a.batch, a.baseline)
    print(f"UNet {a.preset} call, batch {a.batch}, {a.res} px ({a.res // 8}x{a.res // 8} latents), {a.dtype}, "
          f"{r['threads']} threads, {cpu_model()} {isa_label()}, torch {torch.__version__}")
    print(f"compile (first call): {r['compile_s']:.1f} s; median of {a.pairs} alternating pairs: eager "
          f"(backend {a.baseline}) {r['eager_s'] * 1e3:.1f} ms/call, compiled {r['compiled_s'] * 1e3:.1f} ms/call, "
          f"compiled/eager {r['ratio']:.3f}; max rel diff {r['max_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
