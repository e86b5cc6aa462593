"""The openvino backend: fastsd's own UNet, VAE (encoder and decoder) and text encoder run as OpenVINO
models on the CPU (optional extra: `pip install -e ".[openvino]"`).

prepare(model) gives each of the four models (UNet, VAE, TAESD, text encoder) a forward (the VAEs:
`encode` / `decode`) that runs a compiled OpenVINO model of that module; unprepare(model) takes it away (the torch forward is back, the
weights were never touched). Anything else (another VAE class, the sampler update) stays in PyTorch with
the reference ops.

- Conversion: `openvino.convert_model` of a TorchScript trace of fastsd's module (f32 weights, the
  reference ops), once per weights; the IR keeps batch and spatial sizes dynamic. Saved with f16 weights
  for a bf16/fp16 model (exact for bf16 weights, see ir_weights), f32 for an f32 one. (Why not openvino's
  torch.compile backend: docs/openvino.md.)
- Compilation: per input shape, the IR is reshaped to that static shape and compiled for the CPU with
  INFERENCE_PRECISION_HINT bf16 when the model is bf16 and bf16 is native here (AVX512-BF16/AMX), else
  f32; INFERENCE_NUM_THREADS = torch.get_num_threads(); PERFORMANCE_HINT LATENCY. The last
  `KEEP_COMPILED` shapes of each model stay compiled (CFG batch 2B, or B at guidance <= 1; tiles).
- Disk cache: `<cache_dir>/openvino/<key>/` (cache_dir: $FASTSD_CACHE_DIR, else $XDG_CACHE_HOME/fastsd,
  else ~/.cache/fastsd), key = sha256 of the part, the weights' fingerprint, the model config and the
  fastsd / openvino / torch versions. Written to a temp folder and renamed into place; an entry whose
  record, sizes or sampled content hashes do not match, or that OpenVINO can't read, is deleted and
  converted again.
- Weights: the fingerprint hashes every tensor's name, shape, dtype and `FINGERPRINT_SAMPLES` evenly
  spaced elements (a merged LoRA changes whole weight matrices). Every call also compares each tensor's
  storage and in-place version counter with those the compiled models were built from, so weights changed
  while prepared (a LoRA merged in place) make the next call convert again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fastsd import cpuinfo
from fastsd.backends import Backend, package_import_error, reference
from fastsd.files import cache_dir

INSTALL = 'pip install -e ".[openvino]"'
KEEP_COMPILED = 2  # compiled shapes kept per model: each holds its own copy of the weights
FINGERPRINT_SAMPLES = 64  # elements hashed per tensor
BIN_SAMPLES, BIN_CHUNK = 64, 1 << 18  # cache check: 64 chunks of 256 KiB of the weights file are hashed
STALE_TEMP_S = 3600  # a temp folder of this age beside an entry is a killed conversion's
UNET_KEY = "backend unet"  # cpu_tune key prefix of the auto choice between cpu and openvino


# ------------------------------------------------------------------------------------------ the package

def import_error() -> str | None:
    """None when openvino imports, else the reason it doesn't."""
    return package_import_error("openvino")


def unavailable(device: torch.device) -> str | None:
    """Why the backend can't run on `device` (None when it can)."""
    if import_error() is not None:
        return f"the openvino package is not installed ({INSTALL})"
    if device.type != "cpu":
        return f"it runs on a CPU, not on {device.type}"
    return None


def version() -> str | None:
    if import_error() is not None:
        return None
    import openvino

    return openvino.__version__.split("-")[0]


@functools.cache
def core():
    import openvino

    return openvino.Core()


def precision(dtype: torch.dtype) -> str:
    """The INFERENCE_PRECISION_HINT for a model of `dtype`: bf16 where the model is bf16 and bf16 is native
    on this CPU, else f32 (OpenVINO's CPU plugin would otherwise pick bf16 on its own where it can)."""
    return "bf16" if dtype == torch.bfloat16 and cpuinfo.native_bf16() else "f32"


F16_MAX = 65504.0


def ir_weights(model: nn.Module) -> str:
    """How the IR on disk stores `model`'s weights: f32 for an f32 model; f16 for a bf16 or fp16 one, which
    holds each such weight exactly (bf16's 7 mantissa bits fit in f16's 10; only weights below f16's
    normal range, |w| < 6.1e-5, lose bits) unless one is beyond f16's range: half the disk and half the
    memory mapped while compiling."""
    if _dtype(model) == torch.float32:
        return "f32"
    fits = all(bool(t.detach().abs().max() <= F16_MAX) for t in model.state_dict().values()
               if t.is_floating_point() and t.numel())
    return "f16" if fits else "f32"


def compile_config(hint: str) -> dict[str, Any]:
    return {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1}


# ------------------------------------------------------------------------------------------ weights

def fingerprint(module: nn.Module) -> str:
    """A hash of every tensor's name, shape and dtype and FINGERPRINT_SAMPLES evenly spaced elements."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        h.update(f"{name} {tuple(t.shape)} {t.dtype};".encode())
        h.update(flat[::step].contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def weights_stamp(module: nn.Module) -> tuple:
    """Storage and in-place version of every tensor: changes when a weight is replaced or modified
    (tensors made under inference_mode have no version counter: their storage alone then)."""
    out = []
    for t in (*module.parameters(), *module.buffers()):
        try:
            out.append((t.data_ptr(), t._version))
        except RuntimeError:
            out.append((t.data_ptr(), None))
    return tuple(out)


def f32_copy(model: nn.Module) -> nn.Module:
    """The same model class and config with f32 weights (the model's own tensors where they are f32
    already), without forward patches: what gets traced."""
    from fastsd.models.taesd import TAESD

    kw = {"with_encoder": model.encoder is not None} if isinstance(model, TAESD) else {}  # decoder-only TAESD
    with torch.device("meta"):
        m = type(model)(model.cfg, **kw)
    m.load_state_dict({k: v.detach().float() for k, v in model.state_dict().items()}, strict=True, assign=True)
    return m.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ graphs

class UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, context)


class GuidedUNetGraph(UNetGraph):
    """An LCM-distilled UNet's graph: its guidance w an input too."""

    def forward(self, x, t, context, guidance):
        return self.unet(x, t, context, guidance)


class VAEDecodeGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z)


class VAEEncodeGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x)  # AutoencoderKL: (mean, logvar); TAESD: the latents


class CLIPGraph(nn.Module):
    def __init__(self, clip: nn.Module, clip_skip: int):
        super().__init__()
        self.clip, self.clip_skip = clip, clip_skip

    def forward(self, ids):
        return self.clip(ids, clip_skip=self.clip_skip)  # (hidden, pooled)


# ------------------------------------------------------------------------------------------ disk cache

def cache_root() -> Path:
    return cache_dir() / "openvino"


def _file_record(path: Path) -> dict:
    """Size and a hash of the file (a .bin: of BIN_SAMPLES chunks spread over it, so checking a multi-GB
    weights file costs a few MB of reading)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix != ".bin" or size <= BIN_SAMPLES * BIN_CHUNK:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for i in range(BIN_SAMPLES):
                f.seek((size - BIN_CHUNK) * i // (BIN_SAMPLES - 1))
                h.update(f.read(BIN_CHUNK))
    return {"size": size, "sha256": h.hexdigest()}


def entry_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


def load_entry(key: str) -> str | None:
    """The IR path of the cache entry `key`, or None (missing). A corrupt or mismatched entry is removed."""
    folder = cache_root() / key
    if not folder.is_dir():
        return None
    try:
        record = json.loads((folder / "entry.json").read_text())
        if record.get("key") != key:
            raise ValueError("key mismatch")
        for name, want in record["files"].items():
            if _file_record(folder / name) != want:
                raise ValueError(f"{name} does not match its record")
        core().read_model(str(folder / "model.xml"))  # parses (the weights are mapped, not read)
        return str(folder / "model.xml")
    except Exception as e:  # unreadable, truncated, edited: never trusted, rebuilt
        warnings.warn(f"openvino cache entry {folder} is damaged ({type(e).__name__}: {e}); converting again",
                      stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def save_entry(key: str, meta: dict, model) -> bool:
    """Write the IR to a temp folder beside the entry and rename it into place; False when the cache
    folder can't be written (the model then lives in memory only)."""
    import openvino

    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{key}-*"):  # left by a conversion that was killed
            if time.time() - stale.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    except OSError:
        return False
    try:
        openvino.save_model(model, str(tmp / "model.xml"), compress_to_fp16=meta.get("ir_weights") == "f16")
        files = {name: _file_record(tmp / name) for name in ("model.xml", "model.bin")}
        (tmp / "entry.json").write_text(json.dumps({"key": key, "meta": meta, "files": files}, indent=1))
        os.rename(tmp, root / key)  # atomic; fails if another process put the entry there first
        return True
    except OSError:
        return (root / key).is_dir()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(graph: nn.Module, example: tuple[torch.Tensor, ...]):
    """openvino.convert_model of a TorchScript trace of `graph` (f32) on `example` inputs; every input
    dimension stays dynamic. The trace is not re-run to check it (a third of the conversion time): the
    backend's tests compare the compiled model with torch."""
    import openvino
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about python values that are constant here
        example = tuple(t.clone() for t in example)  # normal tensors (the caller may be in inference mode)
        decoder = TorchScriptPythonDecoder(graph.eval(), example_input=example, shared_memory=False,
                                           trace_kwargs={"check_trace": False})
        return openvino.convert_model(decoder)


def converted(meta: dict, make_graph: Callable[[], nn.Module], example: tuple[torch.Tensor, ...]):
    """The IR for `meta` (which names the part, the weights and the versions): the path of its disk cache
    entry, converted now and saved if missing; an ov.Model in memory when the cache can't be written."""
    key = entry_key(meta)
    path = load_entry(key)
    if path is None:
        model = convert(make_graph(), example)
        if not save_entry(key, meta, model):
            return model
        path = load_entry(key)
    return path


def base_meta() -> dict:
    from importlib.metadata import PackageNotFoundError, version as pkg_version

    try:
        fastsd_version = pkg_version("fastsd")
    except PackageNotFoundError:
        fastsd_version = None
    return {"fastsd": fastsd_version, "openvino": version(), "torch": torch.__version__.split("+")[0]}


# ------------------------------------------------------------------------------------------ running

class Compiled:
    """One convertible graph: its IR (dynamic shapes; a cache path, read again for each new shape so the
    mapped weights file is not held, or an ov.Model) and the last KEEP_COMPILED static-shape compilations
    of it, each with its infer request."""

    def __init__(self, source, hint: str):
        self.source, self.hint = source, hint
        self.shapes: OrderedDict[tuple, Any] = OrderedDict()

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        arrays = [t.detach().cpu().contiguous().numpy() for t in inputs]
        shape = tuple(a.shape for a in arrays) + (torch.get_num_threads(),)
        req = self.shapes.pop(shape, None)
        if req is None:
            m = core().read_model(self.source) if isinstance(self.source, str) else self.source.clone()
            m.reshape({m.inputs[i]: list(a.shape) for i, a in enumerate(arrays)})
            req = core().compile_model(m, "CPU", compile_config(self.hint)).create_infer_request()
            while len(self.shapes) >= KEEP_COMPILED:
                self.shapes.popitem(last=False)
        self.shapes[shape] = req
        out = req.infer(arrays, share_inputs=True)  # outputs are copies (share_outputs=False)
        return [torch.from_numpy(out[i]) for i in range(len(req.model_outputs))]


class Part:
    """One prepared model's OpenVINO side: compiled graphs per variant (CLIP: per clip_skip), rebuilt when
    the weights change."""

    def __init__(self, model: nn.Module, kind: str):
        self.model, self.kind = model, kind
        self.lock = threading.Lock()
        self.stamp: tuple | None = None
        self.graphs: dict[Any, Compiled] = {}

    def run(self, variant: Any, make_graph: Callable[[nn.Module], nn.Module], *inputs: torch.Tensor):
        with self.lock:
            stamp = weights_stamp(self.model)
            if stamp != self.stamp:
                self.graphs.clear()
                self.stamp, self.fp = stamp, fingerprint(self.model)
            g = self.graphs.get(variant)
            if g is None:
                meta = {**base_meta(), "part": f"{self.kind} {variant}", "weights": self.fp,
                        "config": repr(self.model.cfg), "ir_weights": ir_weights(self.model)}
                g = self.graphs[variant] = Compiled(
                    converted(meta, lambda: make_graph(f32_copy(self.model)), inputs), precision(_dtype(self.model)))
            return g(*inputs)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _install(model: nn.Module) -> None:
    from fastsd.models.clip import CLIPTextModel
    from fastsd.models.taesd import TAESD
    from fastsd.models.unet import UNet
    from fastsd.models.vae import AutoencoderKL

    if isinstance(model, UNet):
        part = Part(model, "unet")

        def unet_forward(x, t, context, guidance=None):
            dt = _dtype(model)
            t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            if guidance is not None and model.cfg.time_cond_proj_dim:
                w = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(x.shape[0])
                (eps,) = part.run("guided", GuidedUNetGraph, x.float(), t, context.float(), w)
            else:
                (eps,) = part.run("", UNetGraph, x.float(), t, context.float())
            return eps.to(device=x.device, dtype=dt)

        model.forward = unet_forward
    elif isinstance(model, AutoencoderKL):
        part = Part(model, "vae")

        def decode(z):
            (img,) = part.run("decode", VAEDecodeGraph, z.float())
            return img.to(device=z.device, dtype=_dtype(model))

        def encode(x):
            mean, logvar = part.run("encode", VAEEncodeGraph, x.float())
            return mean.to(device=x.device, dtype=_dtype(model)), logvar.to(device=x.device, dtype=_dtype(model))

        model.decode, model.encode = decode, encode
    elif isinstance(model, TAESD):
        part = Part(model, "taesd")

        def taesd_decode(z):
            (img,) = part.run("decode", VAEDecodeGraph, z.float())
            return img.to(device=z.device, dtype=_dtype(model))

        def taesd_encode(x):
            if model.encoder is None:  # the model's own one-line error
                return type(model).encode(model, x)
            (z,) = part.run("encode", VAEEncodeGraph, x.float())
            return z.to(device=x.device, dtype=_dtype(model))

        model.decode, model.encode = taesd_decode, taesd_encode
    elif isinstance(model, CLIPTextModel):
        part = Part(model, "clip")

        def clip_forward(ids, clip_skip=1, token_embeds=None):
            if token_embeds is not None or not (isinstance(clip_skip, int) and 1 <= clip_skip <= model.cfg.num_layers):
                # textual-inversion vectors (the IR takes ids), or the model's own error: the torch forward
                return type(model).forward(model, ids, clip_skip, token_embeds)
            hidden, pooled = part.run(clip_skip, lambda m: CLIPGraph(m, clip_skip), ids.long())
            return hidden.to(device=ids.device, dtype=_dtype(model)), pooled.to(device=ids.device, dtype=_dtype(model))

        model.forward = clip_forward


PATCHED = ("forward", "encode", "decode")


def _uninstall(model: nn.Module) -> None:
    for name in PATCHED:
        model.__dict__.pop(name, None)


def is_prepared(model: nn.Module) -> bool:
    return any(name in model.__dict__ for name in PATCHED)


class OpenVINOBackend(Backend):
    name = "openvino"

    def prepare(self, model):
        super().prepare(model)  # the reference ops: what the traced graph computes
        _uninstall(model)
        _install(model)
        return model

    def unprepare(self, model):
        _uninstall(model)
        return super().unprepare(model)

    def prepare_standalone(self, model):
        """A model OpenVINO has no graph for here (an upscaler model) runs on the cpu backend's packed weights and
        Winograd convolutions, as the cpu backend's pipelines run it."""
        from fastsd.backends.cpu import BACKEND as CPU

        return CPU.prepare(model)


BACKEND = OpenVINOBackend(reference.OPS)


def auto_key(dtype: torch.dtype | None) -> str:
    """The cpu_tune key of auto's choice between the cpu and openvino backends (per CPU fingerprint)."""
    dt = str(dtype).removeprefix("torch.") if dtype is not None else "default"
    return f"{UNET_KEY} {dt} t{torch.get_num_threads()}"


def auto_picks_openvino(dtype: torch.dtype | None) -> bool:
    """Whether `auto` on a CPU takes openvino: only where `python -m fastsd.backends.openvino_auto` measured
    it faster than the cpu backend on this CPU (its choice is cached) and openvino imports; never under
    FASTSD_CPU_TUNE=0 (the defaults: the cpu backend)."""
    from fastsd.backends.cpu_tune import mode, tuner

    if mode() == "off":
        return False
    return tuner().cached(auto_key(dtype)) == "openvino" and import_error() is None
