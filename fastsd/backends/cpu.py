"""The cpu backend: PyTorch tuned for oneDNN, for inference on a CPU (`auto` picks it there).

- layout: channels_last activations; every frozen Conv2d / Linear packs its weight in oneDNN's blocked
  layout at its first call (cpu_pack.py); 3x3 convolutions at 16x16 and up (fp32; bf16 where oneDNN has no AMX,
  computed in fp32) may run as Winograd F(2x2, 3x3) or, from 32x32, F(4x4, 3x3) instead (cpu_winograd.py; its
  transforms native code compiled at first use, cpu_winograd_native.py, where that builds and passes its
  self-test);
- attention: bf16 where bf16 is native, and fp32 (head dims <= 160) on AVX-512: one native kernel
  (cpu_attention_native.py: C++ compiled at first use, ATen's brgemm) where it builds and passes its
  self-test; fp32 on AVX2 and AVX-512 (head dims multiples of 8 up to 160): native micro-kernels
  (cpu_attention_fp32.py), the default up to head dim 80;
  else bf16 chunked over queries in torch ops (cpu_attention.py), fp32 SDPA; bf16 without AMX may also run in
  fp32 (rounded once);
- feed-forward: in token chunks, so the 8C-wide GEGLU hidden stays in cache; h * GELU(gate) as one native pass
  (cpu_geglu.py) where it builds, else GELU(gate) * h in place;
- group_norm: GroupNorm + SiLU as one native kernel (cpu_group_norm.py) on channels-last fp32/bf16, where it
  builds; else bf16 without the reference's fp32 activation copies (PyTorch keeps the statistics in fp32).

Each piece that can lose on some CPU (packing, Winograd, native or chunked attention, native GroupNorm and GEGLU,
chunked feed-forward) is used where `cpu_tune` measured it faster on this CPU at that shape (FASTSD_CPU_TUNE=0: packing,
the native attention, GroupNorm and GEGLU where they build, chunking always: the rule measured on AVX-512 and AVX2, see
docs/cpu-path.md; Winograd never). With autograd on, the reference ops run (these write into preallocated buffers).
`unprepare` gives back the plain model, weights bit for bit.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

from fastsd import cpuinfo
from fastsd.backends import (Backend, Ops, cpu_attention_fp32, cpu_attention_native, cpu_geglu, cpu_group_norm,
                             cpu_native, cpu_winograd_bf16, cpu_winograd_native, reference)
from fastsd.backends.cpu_attention import VERSION as CHUNKED_VERSION, attention_chunked
from fastsd.backends.cpu_pack import (PACKED, drop_spares, keep_temporaries_mapped, large_blocks_in_heap,
                                     make_packable, make_plain, pack_as_last_run, release_freed_memory)
from fastsd.backends.cpu_tune import tuner

FF_CHUNK_TOKENS = 2048  # tokens per feed-forward chunk (1024 and 2048 were best of 256..2048 tried)
NATIVE_T_MIN_KEYS = 2048  # keys from which native_t is the bf16 attention default without AMX (measured at 4096)


def attention(q, k, v, *, scale=None, causal=False):
    if causal or torch.is_grad_enabled():
        return reference.attention(q, k, v, scale=scale, causal=causal)
    if q.dtype == torch.bfloat16 and cpuinfo.native_bf16():
        return _attention_bf16(q, k, v, scale)
    if q.dtype == torch.float32:
        return _attention_fp32(q, k, v, scale)
    return reference.attention(q, k, v, scale=scale)


def _fp32_kernel_names(d: int) -> list[str]:
    """The native fp32 attention kernels that run here for head dim d: the micro-kernel of the ISA in effect (named
    by it) and, on AVX-512, the brgemm kernel ("native")."""
    names = []
    if cpu_attention_fp32.covers_head_dim(d) and cpu_attention_fp32.unavailable() is None:
        names.append(cpu_attention_fp32.isa())
    if d <= cpu_attention_native.FP32_MAX_HEAD_DIM and cpu_attention_native.fp32_unavailable() is None:
        names.append("native")
    return names


def _fp32_kernels(q, k, v, scale) -> dict:
    run = {"native": cpu_attention_native.attention_native}
    return {n: functools.partial(run.get(n, cpu_attention_fp32.attention_fp32), q, k, v, scale=scale)
            for n in _fp32_kernel_names(q.shape[-1])}


def _fp32_default(kernels: dict, d: int) -> str:
    """The micro-kernel up to its default head dim, else the brgemm kernel, else SDPA (docs/cpu-path.md)."""
    micro = cpu_attention_fp32.isa()
    if micro in kernels and d <= cpu_attention_fp32.DEFAULT_MAX_HEAD_DIM:
        return micro
    return "native" if "native" in kernels else "sdpa"


def _fp32_tag(names) -> str:
    """The kernels' part of a tuner key: their names and versions."""
    versions = {"native": cpu_attention_native.VERSION}
    return " ".join(f"{n} v{versions.get(n, cpu_attention_fp32.VERSION)}" for n in sorted(names))


def _attention_fp32(q, k, v, scale):
    kernels = _fp32_kernels(q, k, v, scale)
    if not kernels:
        return reference.attention(q, k, v, scale=scale)
    key = f"attention fp32 q{tuple(q.shape)} k{tuple(k.shape)} t{torch.get_num_threads()} {_fp32_tag(kernels)}"
    candidates = {**kernels, "sdpa": lambda: reference.attention(q, k, v, scale=scale)}
    return candidates[tuner().choose(key, candidates, default=_fp32_default(kernels, q.shape[-1]))]()


def _attention_bf16(q, k, v, scale):
    native = q.shape[-1] % 2 == 0 and cpu_attention_native.unavailable() is None
    amx = cpuinfo.amx()
    key = (f"attention bf16 q{tuple(q.shape)} k{tuple(k.shape)} t{torch.get_num_threads()} "
           f"chunked v{CHUNKED_VERSION}" + (f" native v{cpu_attention_native.VERSION}"
                                            f" native_t v{cpu_attention_native.VERSION_T}" if native else "")
           + ("" if amx else f" fp32 {_fp32_tag(_fp32_kernel_names(q.shape[-1]))}".rstrip()))
    candidates = {"chunked": lambda: attention_chunked(q, k, v, scale=scale),
                  "sdpa": lambda: reference.attention(q, k, v, scale=scale)}
    if native:
        candidates["native"] = lambda: cpu_attention_native.attention_native(q, k, v, scale=scale)
        candidates["native_t"] = lambda: cpu_attention_native.attention_native(q, k, v, scale=scale, keys_rows=True)
    if not amx:  # without AMX a bf16 GEMM runs at 0.65-2x fp32's (docs/cpu-path.md)
        candidates["fp32"] = lambda: _bf16_attention_in_fp32(q, k, v, scale)
    # the native kernel with AMX too, since its row strides stopped sharing cache sets; without it, with AMX SDPA
    # (its flash kernel's GEMMs run on AMX tiles; docs/cpu-path.md)
    default = _native_bf16_default(q.shape[-1], k.shape[-2], amx) if native else "sdpa" if amx else "chunked"
    return candidates[tuner().choose(key, candidates, default=default)]()


def _native_bf16_default(d: int, keys: int, amx: bool) -> str:
    """Keys along the rows (native_t) for many keys and a head dim that whole 16-float vectors don't cover (the
    64x64 self-attention: D 40, 4096 keys), measured faster there without AMX (docs/cpu-path.md); else native."""
    return "native_t" if not amx and d % 16 and keys >= NATIVE_T_MIN_KEYS else "native"


def _bf16_attention_in_fp32(q, k, v, scale):
    """bf16 attention computed in fp32 (the fp32 default: a native kernel where one is offered, else SDPA), rounded
    to bf16 once."""
    q32, k32, v32 = q.float(), k.float(), v.float()
    kernels = _fp32_kernels(q32, k32, v32, scale)
    kernels["sdpa"] = lambda: reference.attention(q32, k32, v32, scale=scale)
    return kernels[_fp32_default(kernels, q.shape[-1])]().to(q.dtype)


def group_norm(x, num_groups, weight, bias, *, eps=1e-5, silu=False):
    if torch.is_grad_enabled():
        return reference.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)
    if cpu_group_norm.covers(x, num_groups) and cpu_group_norm.unavailable() is None:
        key = (f"group_norm {str(x.dtype)[6:]} x{tuple(x.shape)} g{num_groups} silu {silu} "
               f"t{torch.get_num_threads()} native v{cpu_group_norm.VERSION}")
        candidates = {"native": lambda: cpu_group_norm.group_norm_native(x, num_groups, weight, bias, eps=eps,
                                                                          silu=silu),
                      "torch": lambda: _group_norm_torch(x, num_groups, weight, bias, eps, silu)}
        return candidates[tuner().choose(key, candidates, default="native")]()
    return _group_norm_torch(x, num_groups, weight, bias, eps, silu)


def _group_norm_torch(x, num_groups, weight, bias, eps, silu):
    if x.dtype != torch.bfloat16:
        return reference.group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)
    # PyTorch's CPU kernel keeps bf16 statistics in fp32 itself; skipping the reference's fp32 copies of the
    # activation lowers the VAE's peak memory (its 128-channel 512x512 activations)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y, inplace=True) if silu else y


def feed_forward(block, x):
    if torch.is_grad_enabled():
        return reference.feed_forward(block, x)
    if x.shape[0] * x.shape[1] <= FF_CHUNK_TOKENS:
        return _ff_in_place(block, x)
    key = f"feed-forward {str(x.dtype)[6:]} x{tuple(x.shape)} t{torch.get_num_threads()}"
    candidates = {"chunked": lambda: feed_forward_chunked(block, x), "one pass": lambda: _ff_in_place(block, x)}
    return candidates[tuner().choose(key, candidates, default="chunked")]()


def _ff_in_place(block, x, out=None):
    """x + ff(norm3(x)), the GEGLU's h * GELU(gate) in one pass (native) or GELU(gate) * h in place."""
    geglu, _, out_proj = block.ff.net
    return torch.add(x, out_proj(_geglu(geglu.proj(block.norm3(x)))), out=out)


def _geglu(p):
    if cpu_geglu.covers(p) and cpu_geglu.unavailable() is None:
        key = (f"geglu {str(p.dtype)[6:]} x{tuple(p.shape)} t{torch.get_num_threads()} native v{cpu_geglu.VERSION}")
        candidates = {"native": lambda: cpu_geglu.geglu_native(p), "torch": lambda: cpu_geglu.geglu_torch(p)}
        return candidates[tuner().choose(key, candidates, default="native")]()
    return cpu_geglu.geglu_torch(p)


def feed_forward_chunked(block, x, chunk: int | None = None):
    """x + ff(norm3(x)) over chunks of `chunk` (default FF_CHUNK_TOKENS) tokens (row-wise, so the same result
    up to the GEMM's rounding, which may differ with the row count)."""
    chunk = chunk or FF_CHUNK_TOKENS
    flat = x.reshape(-1, x.shape[-1])  # (B*L, C)
    out = torch.empty_like(flat)
    for i in range(0, flat.shape[0], chunk):
        _ff_in_place(block, flat[i:i + chunk], out=out[i:i + chunk])
    return out.view(x.shape)


@functools.cache
def _warn_native(why: str | None, what: str = "attention kernel", instead: str = "attention") -> None:
    if why is None:  # it runs
        return
    warnings.warn(f"the native {what} can't run here ({why}); using torch ops for {instead} "
                  f"(set {cpu_native.ENV}=0 to skip it)", stacklevel=3)


class CPUBackend(Backend):
    name = "cpu"

    def prepare(self, model):
        dtypes = {p.dtype for p in model.parameters()}
        if not cpu_native.disabled():  # each native piece built (or found built) now, not in the first run's timings
            if ((torch.bfloat16 in dtypes and cpuinfo.native_bf16())
                    or (torch.float32 in dtypes and cpu_attention_native.avx512())):
                _warn_native(cpu_attention_native.unavailable())
            if dtypes & {torch.float32, torch.bfloat16}:
                _warn_native(cpu_group_norm.unavailable(), "GroupNorm kernel", "GroupNorm")
                _warn_native(cpu_geglu.unavailable(), "GEGLU kernel", "GEGLU")
            bf16_winograd = torch.bfloat16 in dtypes and not cpuinfo.amx()  # offered to bf16 layers without AMX
            if torch.float32 in dtypes or bf16_winograd:
                _warn_native(cpu_winograd_native.unavailable(), "Winograd transforms", "Winograd convolutions")
            if bf16_winograd and cpuinfo.native_bf16():
                _warn_native(cpu_winograd_bf16.unavailable(), "bf16 Winograd convolution", "bf16 3x3 convolutions")
            # fp32 attention: fp32 models, and bf16 ones without AMX (their attention may run in fp32)
            fp32_attention = torch.float32 in dtypes or (torch.bfloat16 in dtypes and cpuinfo.native_bf16()
                                                         and not cpuinfo.amx())
            if fp32_attention and cpu_attention_fp32.offered_here() is None:
                _warn_native(cpu_attention_fp32.unavailable(), "fp32 attention kernel", "attention")
        keep_temporaries_mapped()
        model.to(memory_format=torch.channels_last)
        make_packable(model)
        return super().prepare(model)

    def unprepare(self, model):
        make_plain(model)
        model.to(memory_format=torch.contiguous_format)
        return super().unprepare(model)

    def plain_weights(self, model):
        """Dense weights (packed ones unpacked) in their channels_last layout: no layout copy for a LoRA merge;
        Winograd-transformed weights kept aside for the merged weights' transforms to write over."""
        make_plain(model, spare=True)
        return model

    def prepare_replaced(self, module):
        """Packed now where its previous weight ran packed (cpu_pack.pack_as_last_run), not at the next call."""
        self.prepare(module)
        pack_as_last_run(module)

    @contextlib.contextmanager
    def replacing_weights(self):
        """Afterwards the memory of the weights replaced goes back to the OS (the run that would have packed the
        merged weights, and trimmed then, packs nothing)."""
        try:
            yield
        finally:
            release_freed_memory()

    def replace_weight(self, module, weight):
        make_plain(module, unpack=False, spare=True)  # its packed weight is dropped, not reordered back first
        super().replace_weight(module, weight)

    @contextlib.contextmanager
    def running(self, model):
        """During a run large blocks come from the heap (cpu_pack.large_blocks_in_heap); after it, Winograd
        weights kept aside by a weight replacement and not reused are dropped, and after a run that packed
        weights, the memory of the dense weights they replaced goes back to the OS."""
        before = PACKED[0]
        with large_blocks_in_heap():
            yield
        drop_spares(model)
        if PACKED[0] != before:
            release_freed_memory()


OPS = Ops(attention=attention, group_norm=group_norm, feed_forward=feed_forward, cfg_step=reference.cfg_step)
BACKEND = CPUBackend(OPS)
