"""What one worker process measures: one configuration of one suite (see benchmarks/run.py).

A spec (dict) names suite, op, model, res, dtype, backend, batch, device, impls (any of "fastsd",
"diffusers", "openvino-diffusers"; several take turns), mode ("time" or "memory"), warmup, repeat, steps, threads.
`run(spec)` returns result rows without the run-wide fields (versions, command, ...), which the
worker adds.

- unet      one denoising step: batch 2*B (CFG: cond + uncond) at latents res/8, timestep 500
- pipeline  txt2img end to end (text encode, `steps` Euler steps, VAE decode, to PIL), by stages
- vae       decode (B latents) and encode (B images, the posterior mean); spec "vae": "taesd" (--vae taesd)
            times a TAESD (SD1.5's architecture) instead, against diffusers' AutoencoderTiny (vae and pipeline)
- clip      the text encoder on prompt + negative prompt (2*B x 77 tokens)
- kernels   each Triton kernel against its torch reference at the SD1.5 shapes of `res`
"""
from __future__ import annotations

from typing import Any

import torch

from . import common

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, detailed", "blurry, lowres"
OVD = "openvino-diffusers"  # plain OpenVINO models of the diffusers twins (openvino_twins.py)
IMPLS = ("fastsd", "diffusers", OVD)  # the order they take turns in
OPS = {"unet": ["step"], "pipeline": ["txt2img"], "vae": ["decode", "encode"], "clip": ["encode"], "kernels": ["all"]}


def _interp_note(spec) -> dict:
    from fastsd.backends.triton import interpreter_enabled

    return {"interpreter": spec["device"] == "cpu" and spec["backend"] in ("triton",) and interpreter_enabled()}


# ------------------------------------------------------------------------------------------ model suites

class Model:
    """The fastsd pipeline and, when asked, its diffusers twins (same weights)."""

    def __init__(self, spec):
        import fastsd

        self.spec = spec
        self.pipe = fastsd.load_pipeline(spec["model"], device=spec["device"], dtype=spec["dtype"],
                                         backend=spec["backend"], seed=spec.get("seed", 0))
        self.twin: Any = None
        if spec.get("vae") == "taesd":  # SD1.5's TAESD, random weights from the seed
            from fastsd.models.taesd import TAESD

            torch.manual_seed(spec.get("seed", 0))
            taesd = TAESD().to(device=spec["device"], dtype=self.pipe.dtype).eval().requires_grad_(False)
            self.pipe.set_vae(taesd, "taesd (random)")
        self.ov_twin: Any = None  # the plain OpenVINO models of the twins (openvino_twins.py)
        if "diffusers" in spec["impls"] or OVD in spec["impls"]:
            from fastsd import testing as twins

            tiny = twins.taesd_twin(self.pipe.vae) if spec.get("vae") == "taesd" else None  # AutoencoderTiny
            maker = {"unet": twins.unet_twin, "vae": lambda p: twins.vae_twin(p) if tiny is None else tiny,
                     "clip": twins.clip_twin,
                     "pipeline": lambda p: twins.diffusers_pipeline(p, vae=tiny, sampler=spec.get("sampler", "euler"))
                     }[spec["suite"]]
            if "diffusers" in spec["impls"]:
                self.twin = maker(self.pipe)
            if OVD in spec["impls"]:
                self.ov_twin = _ov_twin(spec, maker, self.pipe)
        # keep only what the suite runs, so the peak RSS of fastsd and of diffusers count the same models
        keep = {"unet": ("unet",), "vae": ("vae",), "clip": ("clip",)}.get(spec["suite"], ("unet", "vae", "clip"))
        for name in ("unet", "vae", "clip"):
            if name not in keep or "fastsd" not in spec["impls"]:
                setattr(self.pipe, name, None)
        import gc

        from fastsd.backends.cpu_pack import release_freed_memory

        gc.collect()
        release_freed_memory()  # what the dropped models held, back to the OS, so RSS counts live memory only


def _ov_twin(spec, maker, pipe):
    from . import openvino_twins as ovt

    suite = spec["suite"]
    if suite == "pipeline":
        return ovt.pipeline(pipe, sampler=spec.get("sampler", "euler"))
    twin = maker(pipe)
    if suite == "vae":
        return {"decode": ovt.vae_decode(twin), "encode": ovt.vae_encode(twin)}
    return ovt.unet(twin) if suite == "unet" else ovt.text(twin)


def _cases(spec, m: Model) -> tuple[dict[str, Any], dict[str, Any]]:
    """(callables per impl, row info) for the unet / vae / clip / pipeline suites."""
    pipe, twin, ov, dev = m.pipe, m.twin, m.ov_twin, torch.device(spec["device"])
    dtype = pipe.dtype
    cfg = pipe.config
    B, res, suite, op = spec["batch"], spec["res"], spec["suite"], spec["op"]
    f = cfg.vae.downscale
    lat = res // f if res else None
    g = torch.Generator().manual_seed(1234)
    fns: dict[str, Any] = {}
    info: dict[str, Any] = {"latent": [lat, lat] if lat else None}

    if suite == "unet":
        n = 2 * B
        x = torch.randn(n, cfg.unet.in_channels, lat, lat, generator=g).to(dev, dtype)
        t = torch.full((n,), 500.0, device=dev)
        ctx = torch.randn(n, 77, cfg.unet.context_dim, generator=g).to(dev, dtype)
        info["shape"] = f"x {tuple(x.shape)} ctx {tuple(ctx.shape)}"
        if pipe.unet is not None:
            fns["fastsd"] = lambda: pipe.unet(x, t, ctx)
        if twin is not None:
            fns["diffusers"] = lambda: twin(x, t, encoder_hidden_states=ctx).sample
        if ov is not None:
            from .openvino_twins import unet_call

            fns[OVD] = lambda: unet_call(ov, x, t, ctx)
    elif suite == "vae" and op == "decode":
        z = torch.randn(B, cfg.unet.out_channels, lat, lat, generator=g).to(dev, dtype)
        info["shape"] = f"z {tuple(z.shape)} -> ({B}, 3, {res}, {res})"
        if pipe.vae is not None:
            fns["fastsd"] = lambda: pipe.vae.decode(z)
        if twin is not None:
            fns["diffusers"] = lambda: twin.decode(z).sample
        if ov is not None:
            fns[OVD] = lambda: ov["decode"](z.float())[0]
    elif suite == "vae" and op == "encode":
        img = (torch.rand(B, 3, res, res, generator=g) * 2 - 1).to(dev, dtype)
        info["shape"] = f"image {tuple(img.shape)} -> ({B}, 4, {lat}, {lat}) mean"
        taesd = spec.get("vae") == "taesd"  # TAESD's encode gives the latents; the KL VAE's the posterior
        if pipe.vae is not None:
            fns["fastsd"] = (lambda: pipe.vae.encode(img)) if taesd else (lambda: pipe.vae.encode(img)[0])
        if twin is not None:
            fns["diffusers"] = (lambda: twin.encode(img).latents) if taesd else (lambda: twin.encode(img).latent_dist.mean)
        if ov is not None:
            fns[OVD] = (lambda: ov["encode"](img.float())[0]) if taesd else \
                (lambda: ov["encode"](img.float())[0].chunk(2, dim=1)[0])
    elif suite == "clip":
        tok = pipe.tokenizer
        ids = torch.cat([tok.encode_weighted(p)[0] for p in [PROMPT] * B + [NEGATIVE] * B]).to(dev)
        info.update(shape=f"ids {tuple(ids.shape)}", latent=None)
        if pipe.clip is not None:
            fns["fastsd"] = lambda: pipe.clip(ids)[0]
        if twin is not None:
            fns["diffusers"] = lambda: twin(ids).last_hidden_state
        if ov is not None:
            fns[OVD] = lambda: ov(ids)[0]
    elif suite == "pipeline":
        latents = torch.randn(B, cfg.unet.out_channels, lat, lat, generator=g)
        sampler, cfg = spec.get("sampler", "euler"), spec.get("cfg", 7.5)
        info["shape"] = f"{B} x {res}x{res}, {spec['steps']} {sampler} steps, cfg {cfg}"
        if "fastsd" in spec["impls"]:
            fns["fastsd"] = _fastsd_txt2img(spec, pipe, latents)
            if twin is not None or ov is not None:  # diffusers' output is clamped to [-1, 1]; compare like with like
                fns["fastsd_compare"] = lambda img: img.clamp(-1, 1)
        for impl, sp in (("diffusers", twin), (OVD, ov)):
            if sp is not None:
                fns[impl] = _diffusers_txt2img(spec, sp, latents.clone().to(dev, dtype))
    else:
        raise ValueError(f"unknown suite/op {suite}/{op}")
    return fns, info


def _diffusers_txt2img(spec, sp, latents):
    def run():
        out = sp(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=spec["steps"],
                 guidance_scale=spec.get("cfg", 7.5), generator=torch.Generator().manual_seed(1234),
                 height=spec["res"], width=spec["res"], num_images_per_prompt=spec["batch"], latents=latents,
                 output_type="pt")
        return out.images * 2 - 1  # [0, 1] -> [-1, 1], as fastsd's decode
    return run


def _fastsd_txt2img(spec, pipe, latents):
    """txt2img through the pipeline's own stages (encode_prompt, prepare_latents + denoise, decode), timing
    each; the same computation as Pipeline.generate(prompt, negative_prompt, sampler="euler", latents=...)
    (checked after the timed calls by _check_generate)."""
    import time

    from fastsd.settings import GenerationSettings

    dev = spec["device"]
    stages: list[dict[str, float]] = []  # one entry per call
    s = GenerationSettings(PROMPT, NEGATIVE, spec["steps"], spec.get("cfg", 7.5), spec.get("sampler", "euler"), 1234,
                           spec["res"], spec["res"], spec["batch"])
    seeds = [1234 + i for i in range(spec["batch"])]

    @torch.no_grad()
    def run():
        clock = lambda: (common.sync(dev), time.perf_counter())[1]  # noqa: E731
        t0 = clock()
        cond, uncond = pipe.encode_prompt([PROMPT], [NEGATIVE] if s.guided else None)
        t1 = clock()
        p = pipe.prepare_latents(s, seeds, latents=latents)
        x = pipe.denoise(p, cond, uncond, s, progress=False)
        t2 = clock()
        img = pipe.decode(x)
        t3 = clock()
        stages.append(dict(text_encode_s=t1 - t0, denoise_loop_s=t2 - t1, vae_decode_s=t3 - t2))
        return img

    run.stages = stages  # type: ignore[attr-defined]
    return run


def _check_generate(spec, pipe, latents_img) -> dict:
    """Pipeline.generate with the same noise must give the image the piecewise run gave."""
    import numpy as np

    from fastsd.image import tensor_to_pil

    g = torch.Generator().manual_seed(1234)
    cfg = pipe.config
    lat = spec["res"] // cfg.vae.downscale
    latents = torch.randn(spec["batch"], cfg.unet.out_channels, lat, lat, generator=g)
    ims = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=spec["steps"], sampler=spec.get("sampler", "euler"),
                        guidance_scale=spec.get("cfg", 7.5), seed=1234, width=spec["res"],
                        height=spec["res"], num_images=spec["batch"], latents=latents, progress=False)
    ours = tensor_to_pil(latents_img)
    diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(ims, ours))
    return {"check_vs_generate_max_abs_u8": diff}


def _compare(rows: dict[str, dict], impls: list[str], times: list[list[float]], outs: list, fastsd_compare) -> None:
    """Per implementation: its times, and against every other one the per-round time ratios (median in
    `ratio_medians`) and the max relative error; `compare_impl` / `ratios` / `ratio_median` / `max_rel_err`
    name one of them: diffusers for the others, fastsd for diffusers."""
    outs = [fastsd_compare(o) if i == "fastsd" else o for i, o in zip(impls, outs)]
    for a, impl in enumerate(impls):
        row = rows[impl]
        row["times"] = common.summary(times[a])
        row["ratio_medians"], row["max_rel_errs"], per_round = {}, {}, {}
        for b, other in enumerate(impls):
            if b != a:
                per_round[other] = [x / y for x, y in zip(times[a], times[b])]
                row["ratio_medians"][other] = common.summary(per_round[other])["median"]
                row["max_rel_errs"][other] = common.max_rel_err(outs[a], outs[b])
        ref = "diffusers" if impl != "diffusers" and "diffusers" in impls else \
            next(i for i in impls if i != impl)
        row.update(compare_impl=ref, ratios=per_round[ref], ratio_median=row["ratio_medians"][ref],
                   max_rel_err=row["max_rel_errs"][ref])


def run_model_suite(spec) -> list[dict]:
    mem = common.Memory(spec["device"])
    m = Model(spec)
    fns, info = _cases(spec, m)
    mem.mark_loaded()
    dev, warmup, repeat = spec["device"], spec["warmup"], spec["repeat"]
    if spec["mode"] == "memory":
        warmup, repeat = max(1, min(warmup, 1)), 1
    impls = [i for i in IMPLS if i in fns and i in spec["impls"]]
    rows: dict[str, dict] = {i: {"impl": i, **info} for i in impls}
    with torch.inference_mode():
        if len(impls) > 1:
            times, outs = common.bench_alternating([fns[i] for i in impls], dev, max(warmup, 1), repeat)
            first = outs[0]
            _compare(rows, impls, times, outs, fns.get("fastsd_compare", lambda o: o))
        else:
            (impl,) = impls
            times, first = common.bench(fns[impl], dev, warmup, repeat)
            rows[impl]["times"] = common.summary(times)
        if spec["suite"] == "pipeline" and "fastsd" in fns:
            # median per stage over the timed calls (the last n)
            timed = fns["fastsd"].stages[-rows["fastsd"]["times"]["n"]:]
            rows["fastsd"]["stages_s"] = {k: common.summary([c[k] for c in timed])["median"] for k in timed[0]}
            if spec["mode"] == "time":
                with torch.no_grad():
                    rows["fastsd"].update(_check_generate(spec, m.pipe, first))
    memf = mem.fields()
    out = []
    for impl, row in rows.items():
        med = row["times"]["median"]
        steps = spec["steps"] if spec["suite"] == "pipeline" else 1
        row.update(memf, time_s=med)
        row["it_s"] = (1.0 / med if med else None)
        if spec["suite"] == "pipeline":
            row["s_per_image"] = med / spec["batch"] if med else None
            st = row.get("stages_s", {})
            row["it_s"] = steps / st["denoise_loop_s"] if st.get("denoise_loop_s") else None
        row.update(_interp_note(spec))
        if impl == OVD or impl == "fastsd" and spec["backend"] == "openvino":
            from fastsd.backends.openvino import precision

            row["ov_precision"] = precision(m.pipe.dtype)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ kernels suite

def _triton_can_run(device: str) -> str | None:
    from fastsd.backends.triton import unavailable

    return unavailable(torch.device(device))


def run_kernels_suite(spec) -> list[dict]:
    from . import kernel_cases as K
    from fastsd.backends.triton import interpreter_enabled

    mem = common.Memory(spec["device"])
    mem.mark_loaded()
    dev, dtype = spec["device"], {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    quick = spec.get("quick", False)
    found = K.discover()
    rows = []
    why_not = _triton_can_run(dev)
    interp = dev == "cpu" and interpreter_enabled() and why_not is None
    if dev == "cpu" and interp and not quick:
        why_not = "needs CUDA (the Triton interpreter would take hours at SD1.5 shapes; use --quick for tiny shapes)"
    elif dev == "cpu" and why_not is not None:
        why_not = "needs CUDA"
    want_triton = "triton" in spec["backends"] or "auto" in spec["backends"]
    for op, missing in found.items():
        base = {"op": op, "impl": "fastsd", "latent": [spec["res"] // 8] * 2}
        if missing:
            rows.append({**base, "backend": "triton", "status": "missing", "reason": missing, "shape": None,
                         "times": common.summary([])})
            continue
        case = K.CASES[op]
        for shp in case.shapes(spec["res"], quick, dtype):
            try:
                ref_fn, tri_fn = case.make(shp.args, dtype, dev)
            except Exception as e:  # a kernel whose API the case does not know
                rows.append({**base, "backend": "triton", "status": "error", "reason": f"{type(e).__name__}: {e}",
                             "shape": shp.label, "times": common.summary([])})
                continue
            variants = [("torch", ref_fn, None)]  # the reference, always
            if want_triton:
                variants.append(("triton", tri_fn, why_not))
            ref_out = None
            for backend, fn, skip in variants:
                row = {**base, "backend": backend, "shape": shp.label, "shape_key": shp.key, "flops": shp.flops,
                       "bytes": shp.bytes_}
                if skip:
                    rows.append({**row, "status": "needs CUDA", "reason": skip, "times": common.summary([])})
                    continue
                try:
                    with torch.inference_mode():
                        times, out = _time_kernel(fn, dev, spec, interp and backend == "triton")
                except Exception as e:
                    rows.append({**row, "status": "error", "reason": f"{type(e).__name__}: {e}"[:500],
                                 "times": common.summary([])})
                    continue
                if backend == "torch":
                    ref_out = out
                elif ref_out is not None:
                    row["max_rel_err"] = common.max_rel_err(out, ref_out)
                med = times["median"]
                row.update(times=times, time_s=med, it_s=1 / med if med else None,
                           tflops=shp.flops / med / 1e12 if med else None,
                           gbps=shp.bytes_ / med / 1e9 if med else None,
                           interpreter=interp and backend == "triton")
                rows.append(row)
    memf = mem.fields()
    for r in rows:
        r.update(memf)
        r.setdefault("status", "ok")
        r.setdefault("time_s", r["times"]["median"])
        r.setdefault("it_s", None)
    if dev.startswith("cuda") and want_triton:
        _record_verdicts(rows, dev)
    return rows


def _record_verdicts(rows, dev) -> None:
    """On a GPU: which of torch / triton was faster per op and shape, merged into the verdict file that backend
    auto follows (kernels/verdicts.py); the path goes into the rows."""
    from fastsd.kernels import dispatch, verdicts

    device = torch.device(dev)
    path = verdicts.record(verdicts.entries_from_rows(rows), arch=dispatch.device_arch(device),
                           device=torch.cuda.get_device_name(device),
                           versions={"torch": torch.__version__, "triton": _triton_version()})
    for r in rows:
        r["verdict_file"] = str(path)


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _time_kernel(fn, dev, spec, interpreted: bool):
    """do_bench on CUDA (median/min/max from its quantiles); perf_counter warm-up + repeats on CPU
    (one call under the interpreter)."""
    if dev.startswith("cuda"):
        import triton.testing

        out = fn()
        med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0, 1.0])
        return {"min": lo / 1e3, "median": med / 1e3, "max": hi / 1e3, "n": None, "all": [],
                "method": "triton.testing.do_bench"}, out
    warmup, repeat = (1, 1) if interpreted else (max(spec["warmup"], 1), spec["repeat"])
    times, out = common.bench(fn, dev, warmup, repeat)
    return {**common.summary(times), "method": "perf_counter"}, out


def run(spec) -> list[dict]:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["suite"] == "kernels":
        return run_kernels_suite(spec)
    return run_model_suite(spec)
