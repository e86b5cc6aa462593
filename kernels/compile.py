"""torch.compile for the fastsd models (issue #14 item 5: `--compile` / `load_pipeline(..., compile=True)`).

- CUDA: `mode="reduce-overhead"`: Inductor plus CUDA graphs, so the ~100 kernel launches of a UNet step (Triton
  kernels included: they are registered ops, `fastsd::attention` / `group_norm` / `cfg_step`, opaque nodes in the
  graph) are replayed as one graph instead of being launched from Python one by one.
- CPU: Inductor's default mode, its C++/OpenMP code generation (vectorised for the host ISA: AVX-512 here).

`compile_module` compiles a module's forward in place (`nn.Module.compile`): the module keeps its type, its
attributes and its state_dict keys (no `_orig_mod.` prefix), so checkpoint / LoRA code sees the same module.
`compile_pipeline` does the UNet and the VAE decoder of a fastsd Pipeline. The first call of each new input shape
pays the compile time (see README, "GPU kernels" / torch.compile: measured on CPU by
`python -m fastsd.kernels.compile --bench`).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn


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
    torch op table first."""
    if pipe.backend.name == "openvino":
        raise ValueError("compile: backend openvino runs OpenVINO's own compiled models; torch.compile is for the "
                         "torch, cpu and triton backends")
    if pipe.backend.name == "cpu":
        pipe.backend = "torch"
    compile_module(pipe.unet, **overrides)
    if getattr(pipe, "vae", None) is not None:
        compile_module(pipe.vae.decoder, **overrides)
    return pipe


# ---------------------------------------------------------------------------------------------- CPU measurement
def bench_unet(preset: str = "tiny", res: int = 256, dtype: str = "fp32", pairs: int = 5, threads: int | None = None):
    """Eager vs compiled UNet step (batch 2 = CFG) on the CPU, backend torch, random weights (fastsd.config preset):
    compile time (the first compiled call), then `pairs` alternating eager / compiled calls (A B A B: robust on a
    busy machine); median times and the median of the per-pair ratios, max relative difference of the outputs."""
    import copy
    import statistics

    from fastsd.config import PRESETS
    from fastsd.models.unet import UNet

    if threads:
        torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    eager = UNet(cfg.unet).to(dt).eval()  # a new UNet holds the reference op table (backend torch)
    compiled = compile_module(copy.deepcopy(eager), "cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.unet.in_channels, res // 8, res // 8, generator=g).to(dt)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(dt)
    t = torch.tensor([500.0, 500.0])

    def timed(m):
        t0 = time.perf_counter()
        out = m(x, t, ctx)
        return time.perf_counter() - t0, out

    with torch.inference_mode():
        timed(eager)  # warm-up
        compile_s, out = timed(compiled)
        ref = eager(x, t, ctx)
        te, tc = [], []
        for _ in range(pairs):
            te.append(timed(eager)[0])
            tc.append(timed(compiled)[0])
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return dict(preset=preset, res=res, dtype=dtype, threads=torch.get_num_threads(), compile_s=compile_s,
                eager_s=statistics.median(te), compiled_s=statistics.median(tc),
                ratio=statistics.median([c / e for c, e in zip(tc, te)]), max_rel_diff=err)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsd.kernels.compile",
                                 description="Measure torch.compile of the UNet on the CPU (eager vs compiled).")
    ap.add_argument("--bench", action="store_true", help="run the measurement")
    ap.add_argument("--preset", default="tiny", help="fastsd.config preset (tiny, sd15)")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--pairs", type=int, default=5, help="alternating eager / compiled calls")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    if not a.bench:
        ap.print_help()
        return 0
    from fastsd.cpuinfo import native_bf16

    r = bench_unet(a.preset, a.res, a.dtype, a.pairs, a.threads)
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    isa = "AVX-512" + (" with AVX512-BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags else (
        "AVX2" if "avx2" in flags else "unknown ISA")
    print(f"UNet {a.preset} step, batch 2, {a.res} px ({a.res // 8}x{a.res // 8} latents), {a.dtype}, "
          f"{r['threads']} threads, CPU {isa} (native bf16: {native_bf16()}), torch {torch.__version__}")
    print(f"compile (first call): {r['compile_s']:.1f} s; median of {a.pairs} alternating pairs: eager "
          f"{r['eager_s'] * 1e3:.1f} ms/step, compiled {r['compiled_s'] * 1e3:.1f} ms/step, compiled/eager "
          f"{r['ratio']:.3f}; max rel diff {r['max_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
