"""Conv2d / Linear weights prepacked in oneDNN's blocked layout, where that is measured faster on this CPU.

`F.conv2d` on a CPU reorders the weight into oneDNN's blocked layout on every call; `F.linear` runs MKL's
GEMM. A prepacked weight skips the reorder (and runs oneDNN's GEMM for linears). The blocked layout oneDNN
wants depends on the ISA *and on the input shape*: on AVX2 a 3x3 convolution at 8x8 wants 24-row weight
blocks where one at 45x45 wants 16, and a weight packed for the wrong shape is reordered again on every
call by a slow generic reorder (a UNet step 5x slower than the plain path). So convolutions are packed
for the exact input shape they are called with, lazily, and repacked when it changes (a UNet or VAE
sees one shape per layer at a given resolution); linears pack once (their layout does not depend on the
row count). Whether a layer packs at all is `cpu_tune.choose`'s measured choice per op and shape; an fp32
3x3 convolution also has Winograd (cpu_winograd.py) among its choices, and then keeps its dense weight; a 1x1
convolution may pack its weight as a linear's instead and run oneDNN's packed linear over the channels-last
pixels (the "linear" form, fp32's default).

`make_packable(model)` swaps each frozen CPU Conv2d / Linear's class in place (names and keys unchanged);
`state_dict()` always gives the plain weight. The private oneDNN ops used here are checked once
(`packing_unavailable`); where they are missing, renamed, or can't handle the dtype on this CPU (bf16
without AVX512-BF16/AVX-NE-CONVERT), layers stay plain.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastsd.backends import cpu_tune, cpu_winograd

PACK_DTYPES = (torch.float32, torch.bfloat16)
LINEAR_EXAMPLE_ROWS = 2048  # the row count linears are packed for (their blocked layout does not depend on it)
PACKED = [0]  # weights packed in this process so far: a caller that sees it grow can release_freed_memory()
TRIM_BYTES = 128 << 20  # dense weight bytes replaced by packed copies between two malloc_trims within a run
_replaced = [0]  # dense weight bytes replaced since the last trim
_PRIVATE_OPS = ("_convolution_pointwise", "_linear_pointwise", "_reorder_convolution_weight", "_reorder_linear_weight")


_NO_CPU_SUPPORT = "oneDNN has no "
FORMS = ("packed", "linear")  # choices that run a packed (mkldnn) form of the weight: _Packable._forms


def onednn_bf16_supported() -> bool:
    """torch's own check before it packs bf16 weights (it reads the CPU's flags, not ISA restrictions)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def packing_unavailable(dtype: torch.dtype) -> str | None:
    """Why weights of `dtype` can't be prepacked here (None when they can): no oneDNN, the private ops
    missing or changed in this torch, bf16 not supported by this CPU, or a trial pack that fails or
    disagrees with F.conv2d / F.linear."""
    if dtype not in PACK_DTYPES:
        return f"{dtype} weights are not prepacked"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    missing = [op for op in _PRIVATE_OPS if not hasattr(torch.ops.mkldnn, op)]
    if missing:
        return f"this torch lacks torch.ops.mkldnn.{', '.join(missing)}"
    if dtype == torch.bfloat16:
        try:
            if not onednn_bf16_supported():
                return _NO_CPU_SUPPORT + "bf16 weight packing on this CPU (it needs AVX512-BF16 or AVX-NE-CONVERT)"
        except Exception as e:  # the query itself is private
            return f"the oneDNN bf16 capability query failed ({type(e).__name__})"
    try:
        _trial(dtype)
    except Exception as e:
        return f"a trial pack failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def _trial(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False).to(dtype)
    lin = nn.Linear(8, 16).requires_grad_(False).to(dtype)
    x = torch.randn(1, 8, 5, 5, generator=g).to(dtype)
    want = (conv(x), lin(x[0, :, 0].T.contiguous()))
    with torch.no_grad():
        w = torch.ops.mkldnn._reorder_convolution_weight(conv.weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        got_c = torch.ops.mkldnn._convolution_pointwise(x, w, conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        wl = torch.ops.mkldnn._reorder_linear_weight(lin.weight, 5)
        got_l = torch.ops.mkldnn._linear_pointwise(x[0, :, 0].T.contiguous(), wl, lin.bias, "none", [], "")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, ref in ((got_c, want[0]), (got_l, want[1])):
        if got.shape != ref.shape or not torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol):
            raise RuntimeError("packed result differs from the plain op")


class _Packable:
    """Shared state of PackableConv2d / PackableLinear: `weight` is the plain Parameter or, once packed,
    a buffer holding the mkldnn tensor; `_form` is which packed form ("packed", or a 1x1 convolution's
    "linear") and `_packed_for` the input shape it was packed for."""

    _packed_for: tuple | None = None
    _form: str | None = None
    _decided: dict

    def _dense_weight(self) -> torch.Tensor:
        w = self.weight
        return w.to_dense() if w.is_mkldnn else w.detach()

    def _set_weight(self, w: torch.Tensor, packed_for: tuple | None, form: str | None = None) -> None:
        """`weight` <- w (a packed one as a buffer, a dense one as a Parameter) with what says how it is packed.
        The swap is all or nothing: any exception on the way (a Ctrl-C) leaves the old weight and its state,
        never a layer without a weight."""
        new = w if w.is_mkldnn else nn.Parameter(w, requires_grad=False)
        old = self._parameters.get("weight"), self._buffers.get("weight"), self._packed_for, self._form
        last = self.__dict__.get("_last_packed")
        try:
            if "weight" not in (self._buffers if w.is_mkldnn else self._parameters):
                del self.weight  # (a name is a parameter or a buffer, not both)
            if w.is_mkldnn:
                self.register_buffer("weight", new)
            else:
                self.register_parameter("weight", new)
            self._packed_for = packed_for
            self._form = form if w.is_mkldnn else None
            if w.is_mkldnn:  # how the layer runs (until a call runs it dense): its next weight may be packed so at once
                self._last_packed = (form, packed_for)
        except BaseException:
            # the old weight registered again before the other kind's entry goes (`weight` is never missing)
            kind, other = (self._parameters, self._buffers) if old[0] is not None else (self._buffers, self._parameters)
            kind["weight"] = old[0] if old[0] is not None else old[1]
            other.pop("weight", None)
            self._packed_for, self._form = old[2], old[3]
            if last is None:
                self.__dict__.pop("_last_packed", None)
            else:
                self._last_packed = last
            raise

    def unpack(self) -> None:
        if self.weight.is_mkldnn:
            self._set_weight(self._dense_weight(), None)

    def _forms(self, x: torch.Tensor) -> tuple[str, ...]:
        """The choices at x's shape that run a packed form of the weight (its own mkldnn tensor), the default
        first."""
        return ("packed",)

    def _make_form(self, form: str, w: torch.Tensor, shape: tuple) -> torch.Tensor:
        return self._pack(w, shape)

    def _run_form(self, form: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._run_packed(x, w)

    def _more_candidates(self, x: torch.Tensor, dense: torch.Tensor) -> dict:
        """Other ways to run this layer at x's shape, beside packed and plain (none for a linear)."""
        return {}

    def _choice(self, key: tuple, x: torch.Tensor, pack_shape: tuple) -> str:
        """How to run at this key ("plain", a packed form or a _more_candidates name): the tuner's choice
        (measured on x when unknown), cached per module so later calls at the key cost a dict lookup."""
        use = self._decided.get(key)
        if use is None:
            dense = self._dense_weight()
            forms = {f: functools.cache(functools.partial(self._make_form, f, dense, pack_shape))  # made when run
                     for f in self._forms(x)}
            candidates = {**{f: (lambda f=f: self._run_form(f, x, forms[f]())) for f in forms},
                          "plain": lambda: self._run_plain(x, dense), **self._more_candidates(x, dense)}
            use = cpu_tune.tuner().choose(self._tune_key(x), candidates, default=self._forms(x)[0])
            self._decided[key] = use
            if use in forms:
                self._set_weight(forms[use](), pack_shape, use)
            else:
                self._set_weight(dense, None)
            PACKED[0] += use in forms
            self._chosen()
            nbytes = dense.nbytes if use in forms else 0
            del forms, candidates, dense
            _replaced_dense(nbytes)
        return use

    def _chosen(self) -> None:
        """After a choice: drop what only a candidate that lost needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return self._run_plain(x, self._dense_weight())
        key, pack_shape = self._shape_key(x)
        use = self._choice(key, x, pack_shape)
        if use not in FORMS:  # (names no other candidate takes: no need to work out this layer's forms per call)
            if self.weight.is_mkldnn:  # still packed for another input shape, where packing won
                self._set_weight(self._dense_weight(), None)
            self.__dict__.pop("_last_packed", None)
            return self._run_other(use, x)
        if self._form != use or self._packed_for != pack_shape:  # another form, or packed for another input
            nbytes = 0 if self.weight.is_mkldnn else self.weight.nbytes  # shape (or a weight replaced since)
            self._set_weight(self._make_form(use, self._dense_weight(), pack_shape), pack_shape, use)
            PACKED[0] += 1
            _replaced_dense(nbytes)
        return self._run_form(use, x, self.weight)

    def _run_other(self, use: str, x: torch.Tensor) -> torch.Tensor:
        return self._run_plain(x, self.weight)


class PackableConv2d(_Packable, nn.Conv2d):
    _winograd: dict | None = None  # Winograd variant name -> the weight transformed for it, while a shape uses it

    def _pointwise(self) -> bool:
        """A 1x1 convolution (stride 1, no padding, dilation or groups): a GEMM over the pixels of channels-last
        input, which oneDNN's packed linear may run faster than its convolution (the "linear" form)."""
        return (tuple(self.kernel_size) == (1, 1) and tuple(self.stride) == (1, 1) and tuple(self.padding) == (0, 0)
                and tuple(self.dilation) == (1, 1) and self.groups == 1)

    def _forms(self, x: torch.Tensor) -> tuple[str, ...]:
        """fp32 1x1 convolutions: "linear" the default (faster at each of the UNet's 1x1 shapes on AVX2, level on
        AVX-512: docs/cpu-path.md); bf16 ones keep "packed" (AMX: the linear up to 1.6x slower)."""
        if not (self._pointwise() and x.dim() == 4):
            return ("packed",)
        return ("linear", "packed") if x.dtype == torch.float32 else ("packed", "linear")

    def _make_form(self, form: str, w: torch.Tensor, shape: tuple) -> torch.Tensor:
        if form == "linear":
            return torch.ops.mkldnn._reorder_linear_weight(w.reshape(w.shape[0], -1), LINEAR_EXAMPLE_ROWS)
        return self._pack(w, shape)

    def _run_form(self, form: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if form != "linear":
            return self._run_packed(x, w)
        n, c, h, wd = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1).reshape(-1, c), w, self.bias, "none", [], "")
        return y.view(n, h, wd, -1).permute(0, 3, 1, 2)  # channels_last

    def _dense_weight(self) -> torch.Tensor:
        w = super()._dense_weight()
        return w.view(*w.shape, 1, 1) if w.dim() == 2 else w  # the "linear" form's (K, C) -> (K, C, 1, 1)

    def _more_candidates(self, x: torch.Tensor, dense: torch.Tensor) -> dict:
        return {v.name: (lambda v=v: cpu_winograd.conv3x3(x, self._winograd_weight(v, dense), self.bias, v))
                for v in cpu_winograd.variants_for(self, x)}

    def _winograd_weight(self, v: cpu_winograd.Variant, dense: torch.Tensor | None = None) -> torch.Tensor:
        if self._winograd is None:
            self._winograd = {}
        if v.name not in self._winograd:
            w = self._dense_weight() if dense is None else dense
            spare = self.__dict__.get("_winograd_spare", {}).pop(v.name, None)  # the replaced weight's
            self._winograd[v.name] = cpu_winograd.weight_transform(w, v, out=spare)
        return self._winograd[v.name]

    def _chosen(self) -> None:
        if self._winograd:  # 1.8-4x the weight's size: kept only for a variant some shape uses
            self._winograd = {n: u for n, u in self._winograd.items() if n in self._decided.values()} or None

    def _run_other(self, use: str, x: torch.Tensor) -> torch.Tensor:
        if use in cpu_winograd.VARIANTS:
            v = cpu_winograd.VARIANTS[use]
            return cpu_winograd.conv3x3(x, self._winograd_weight(v), self.bias, v)
        return super()._run_other(use, x)

    def _shape_key(self, x: torch.Tensor) -> tuple[tuple, tuple]:
        """(decision key, shape to pack for): both the exact input shape."""
        return tuple(x.shape), tuple(x.shape)

    def _tune_key(self, x: torch.Tensor) -> str:
        """Op, shapes, threads, and for a layer with a Winograd candidate which transforms that runs (choices
        timed against the other are measured again)."""
        variants = cpu_winograd.variants_for(self, x)
        winograd = f" winograd {cpu_winograd.implementation(variants)}" if variants else ""
        linear = " linear" if "linear" in self._forms(x) else ""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)  # (the "linear" form: 2-D)
        return (f"conv2d {str(self.weight.dtype)[6:]} w{shape} s{self.stride} p{self.padding} "
                f"d{self.dilation} g{self.groups} x{tuple(x.shape)} t{torch.get_num_threads()}{winograd}{linear}")

    def _pack(self, w: torch.Tensor, shape: tuple) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_convolution_weight(
            w, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(shape))

    def _run_packed(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, w, self.bias, list(self.padding), list(self.stride),
                                                       list(self.dilation), self.groups, "none", [], "")

    def _run_plain(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackableLinear(_Packable, nn.Linear):
    def _shape_key(self, x: torch.Tensor) -> tuple[tuple, tuple]:
        """One decision per module, made at its first call (a linear sees one row count per model call;
        chunked feed-forwards vary it, and switching layouts on every call would cost a reorder each)."""
        return (), (LINEAR_EXAMPLE_ROWS,)

    def _tune_key(self, x: torch.Tensor) -> str:
        rows = x.numel() // x.shape[-1]
        bucket = 1 << max(rows - 1, 0).bit_length()  # rows rounded up to a power of two
        return f"linear {str(self.weight.dtype)[6:]} w{tuple(self.weight.shape)} rows<={bucket} t{torch.get_num_threads()}"

    def _pack(self, w: torch.Tensor, shape: tuple) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w, shape[0])

    def _run_packed(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")

    def _run_plain(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)


def _dense_state(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "weight"
    if key in state_dict and state_dict[key].is_mkldnn:
        state_dict[key] = module._dense_weight()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A Conv2d / Linear's weight as a dense tensor of its own shape, whether or not this module packed it."""
    return module._dense_weight() if isinstance(module, _Packable) else module.weight.detach()


_PACKABLE = {nn.Conv2d: PackableConv2d, nn.Linear: PackableLinear}


def _packable(m: nn.Module) -> bool:
    if type(m) not in _PACKABLE:
        return False
    if type(m) is nn.Conv2d and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        return False
    return m.weight.device.type == "cpu" and not m.weight.requires_grad


def make_packable(model: nn.Module) -> int:
    """Let every plain frozen CPU Conv2d and Linear of `model` pack its weight at its first inference call
    (where measured faster); returns how many can (0 when this torch/CPU can't pack the model's dtype).
    Warns once, naming the reason, when oneDNN packing is unavailable for a dtype it should cover."""
    n = 0
    for m in list(model.modules()):
        if not _packable(m):
            continue
        why = packing_unavailable(m.weight.dtype)
        if why is not None:
            if m.weight.dtype in PACK_DTYPES and not why.startswith(_NO_CPU_SUPPORT):
                _warn_once(why)  # e.g. a torch whose private ops changed; CPU limits are the caller's to report
            continue
        m.__class__ = _PACKABLE[type(m)]
        m._decided = m.__dict__.pop("_decided_spare", None) or {}  # (choices per input shape, kept by make_plain)
        m._packed_for = None
        m._register_state_dict_hook(_dense_state)
        n += 1
    return n


def make_plain(model: nn.Module, unpack: bool = True, spare: bool = False) -> int:
    """The inverse of make_packable: plain Conv2d / Linear with dense weights again (bit for bit). With
    unpack=False a packed weight is left as it is, for a caller that replaces it (no reorder back). With
    spare=True a layer keeps what its next weight can use (a LoRA merge's): its Winograd-transformed weights as
    `_winograd_spare`, for that weight's transforms to write over in the next run (`drop_spares` after it), its
    choices per input shape for make_packable, and `_last_packed` (pack_as_last_run)."""
    n = 0
    for m in list(model.modules()):
        if not spare:
            for attr in ("_winograd_spare", "_decided_spare", "_last_packed"):
                m.__dict__.pop(attr, None)
        if isinstance(m, _Packable):
            if spare:
                m._decided_spare = m._decided
            if unpack:
                m.unpack()
            m.__class__ = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
            if spare and m.__dict__.get("_winograd"):
                m._winograd_spare = {**m.__dict__.get("_winograd_spare", {}), **m._winograd}
            for attr in ("_decided", "_packed_for", "_form", "_winograd"):
                m.__dict__.pop(attr, None)
            for k, hook in list(m._state_dict_hooks.items()):
                if getattr(hook, "__wrapped__", hook) is _dense_state:
                    del m._state_dict_hooks[k]
            n += 1
    return n


def pack_as_last_run(module: nn.Module) -> bool:
    """Pack `module`'s weight now (True), in the form and for the input shape its previous weight ran packed in at
    its last call (`_last_packed`; none where that call ran it dense), where that weight was just replaced by one
    of the same shape (a LoRA merge), instead of at the layer's next call: each merged weight is packed while the
    memory of the weight it replaces, and of the merge before, is free to reuse, and the first call after a LoRA
    switch packs nothing. A call at another input shape packs it again, as it would have."""
    last = module.__dict__.get("_last_packed")
    if not isinstance(module, _Packable) or last is None or module.weight.is_mkldnn:
        return False
    form, shape = last
    module._set_weight(module._make_form(form, module._dense_weight(), shape), shape, form)
    PACKED[0] += 1
    return True


def drop_spares(model: nn.Module) -> None:
    """Drop the Winograd weights make_plain(spare=True) kept aside that the run since did not write over."""
    for m in model.modules():
        m.__dict__.pop("_winograd_spare", None)


@functools.cache
def _warn_once(why: str) -> None:
    warnings.warn(f"weights stay unpacked: {why}", stacklevel=3)


def _replaced_dense(nbytes: int) -> None:
    """A dense weight of `nbytes` was just replaced by its packed copy (and freed, unless something else holds it):
    every TRIM_BYTES of those, hand the freed heap memory back, so that a first call, which packs every layer,
    does not hold the dense and the packed weights at once until its end."""
    _replaced[0] += nbytes
    if _replaced[0] >= TRIM_BYTES:
        _replaced[0] = 0
        release_freed_memory()


HEAP_ENV = "FASTSD_CPU_HEAP"
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to this come from the heap, not fresh mmap'd pages
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept for the next call's temporaries
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters (malloc.h)
GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX, restored after a run
_in_heap = [0]  # runs under large_blocks_in_heap() now (nested or in other threads)


@functools.cache
def keep_temporaries_mapped() -> bool:
    """Have glibc keep a model call's large temporaries (Winograd tiles, feed-forward chunks: 20-35 MB each) in
    the heap between calls instead of unmapping them and faulting fresh zeroed pages in at the next one. glibc
    starts with a 128 KiB mmap/trim threshold and raises it only as such blocks are freed, so a layer's first
    few calls fault its temporaries in every time, and later calls many of them (docs/cpu-path.md has the
    numbers): slower calls, and a tuner that times candidates at a layer's first call and so saw memory-hungry
    ones (Winograd) much slower than they run. Once per process; not where FASTSD_CPU_HEAP=0, where GLIBC_TUNABLES
    already sets these, or without glibc. release_freed_memory still hands freed memory back when asked."""
    if os.environ.get(HEAP_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    if any(t in os.environ.get("GLIBC_TUNABLES", "") for t in ("mmap_threshold", "trim_threshold")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextlib.contextmanager
def large_blocks_in_heap():
    """While a model runs, blocks above glibc's largest mmap threshold (32 MiB: a decoder's 512x512 activations,
    67 MB and up) come from the heap too, and go back to it when freed, for the next run to reuse, instead of
    fresh mmap'd pages each time, whose page faults can cost a VM more system time than the decode's own work
    (docs/cpu-path.md). The heap keeps up to TRIM_THRESHOLD free at its top; release_freed_memory still
    hands the rest back when asked. Only where keep_temporaries_mapped() took effect."""
    if not keep_temporaries_mapped():
        yield
        return
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    with _heap_lock:
        _in_heap[0] += 1
        if _in_heap[0] == 1:
            mallopt(_M_MMAP_MAX, 0)
    try:
        yield
    finally:
        with _heap_lock:
            _in_heap[0] -= 1
            if _in_heap[0] == 0:
                mallopt(_M_MMAP_MAX, GLIBC_MMAP_MAX)


_heap_lock = threading.Lock()


def release_freed_memory() -> None:
    """Hand the heap memory of replaced dense weights back to the OS (glibc's malloc_trim; a no-op
    elsewhere): glibc keeps freed chunks below its mmap threshold in the heap."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
