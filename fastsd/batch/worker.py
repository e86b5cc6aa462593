"""One model, many jobs: the worker a local run keeps in-process and a Ray run wraps as an actor.

`BatchWorker.run(jobs)` takes jobs of one batch key (fastsd.batch.jobs.batch_key) and returns one result per
job: the PNG bytes with infotext, or a one-line error. Jobs run in one UNet call through the Pipeline's
stages when batching them is *identical and faster*, which the worker measures once per shape
(`probe`): each job alone and all together for one deterministic step, twice (the first calls at a new
shape pack weights / tune kernels), then the batch's rows must equal the lone runs bit for bit and take
less than MARGIN of their time. Anything else runs one job at a time. The VAE always decodes one image
at a time: torch's CPU convolutions sum differently at batch 1 and batch > 1, and a decode is per image
anyway. For the same reason a job's hires fix (its upscale, whose image upscalers decode and encode, and its second
pass) runs alone, after the batched first pass. So a job's PNG never depends on which jobs it was batched with.
"""
from __future__ import annotations

import dataclasses
import io
import os
import socket
import sys
import time

from fastsd.batch.jobs import Job, batch_key, prompt_chunks, text_prompts
from fastsd.samplers import prompt_steps
from fastsd.settings import GenerationSettings

MARGIN = 0.9  # a batch must take <= 0.9x the time of its jobs run one by one (as fastsd.backends.cpu_tune)


class BatchWorker:
    def __init__(self, model: str, *, device=None, dtype=None, backend: str = "auto", threads: int | None = None,
                 lora_dir: str | None = None, upscaler_dir: str | None = None, always_batch: bool = False,
                 only_loras: tuple | None = None, vae: str | None = None, embeddings_dir: str | None = None, log=None):
        """`only_loras`: the one LoRA set every job of the run uses (the runner knows), merged for good at its
        first use: no copy of the weights it replaces is kept, since nothing switches it out. `upscaler_dir`: where
        a hires upscaler named by its model's name is found (none given: $FASTSD_UPSCALER_DIR). `vae`: as --vae;
        `embeddings_dir`: the textual inversions prompts may name (none given: $FASTSD_EMBEDDINGS_DIR), as
        python -m fastsd.generate."""
        from fastsd import load_pipeline
        from fastsd.cli import set_threads
        from fastsd.generate import EMBEDDINGS_ENV

        self.threads = set_threads(threads)
        self.pipe = load_pipeline(model, device=device, dtype=dtype, backend=backend, vae=vae)
        if embeddings_dir := embeddings_dir or os.environ.get(EMBEDDINGS_ENV):
            self.pipe.load_embeddings(embeddings_dir)
        self.lora_dir = lora_dir
        self.upscaler_dir = upscaler_dir
        self.always_batch = always_batch
        self._loras: tuple = ()
        self._only_loras = only_loras
        self._probed: dict[tuple, bool] = {}
        self._log = log or (lambda msg: print(msg, file=sys.stderr))

    def describe(self) -> dict:
        """Where and how this worker runs (the Ray pool's readiness answer)."""
        return {"node": socket.gethostname(), "pid": os.getpid(), "device": self.pipe.device.type,
                "dtype": str(self.pipe.dtype).removeprefix("torch."), "backend": self.pipe.backend.name,
                "threads": self.threads}

    # ---- jobs -> results ------------------------------------------------------------------------------

    def run(self, jobs: list[Job]) -> list[dict]:
        """One result per job, in order: {"id", "ok": True, "png": bytes, "seconds"} or {"id", "ok": False,
        "error"}. Jobs are re-grouped by this worker's own tokenizer (its chunk counts decide batching), each LoRA
        set's jobs counted with that set applied (the embeddings its files bundle are prompt words)."""
        by_loras: dict[tuple, list[Job]] = {}
        for j in jobs:
            by_loras.setdefault(j.loras, []).append(j)
        results = {}
        for loras, some in by_loras.items():
            try:
                self._use_loras(loras)
            except Exception as e:  # noqa: BLE001 - any failure becomes the jobs' recorded error, one line each
                results |= {j.id: _failed(j, e) for j in some}
                continue
            groups: dict[tuple, list[Job]] = {}
            for j in some:
                try:  # (an embedding a prompt names is read here: a bad one fails its job alone)
                    groups.setdefault(batch_key(j, self._chunks(j)), []).append(j)
                except Exception as e:  # noqa: BLE001
                    results[j.id] = _failed(j, e)
            for group in groups.values():
                for r in self._run_group(group):
                    results[r["id"]] = r
        return [results[j.id] for j in jobs]

    def _run_group(self, jobs: list[Job]) -> list[dict]:
        """One batch_key group, its LoRA set already applied (`run`)."""
        out, ready = [], []
        for j in jobs:  # each hires upscaler found and loaded before any pass: a bad one fails its jobs alone
            try:
                ready.append(dataclasses.replace(j, settings=self.job_settings(j)))
            except Exception as e:  # noqa: BLE001
                out.append(_failed(j, e))
        jobs = ready
        if len(jobs) > 1:
            try:
                if self.batching_pays(jobs):
                    return out + self._timed(jobs)
            except Exception:  # noqa: BLE001 - run them one by one below: each job gets its own error
                pass
        for j in jobs:
            try:
                out += self._timed([j])
            except Exception as e:  # noqa: BLE001
                out.append(_failed(j, e))
        return out

    def _timed(self, jobs: list[Job]) -> list[dict]:
        t0 = time.perf_counter()
        pngs = self.generate(jobs)
        per_job = (time.perf_counter() - t0) / len(jobs)
        return [{"id": j.id, "ok": True, "png": png, "seconds": round(per_job, 3)} for j, png in zip(jobs, pngs)]

    # ---- generation -----------------------------------------------------------------------------------

    def _latents(self, jobs: list[Job], steps: int | None = None, sampler: str | None = None):
        """The final latents of `jobs` (one batch key) from one batched run of the Pipeline's stages."""
        s = jobs[0].settings.replace(num_images=len(jobs))
        if steps is not None:
            s = s.replace(steps=steps, sampler=sampler)
        pipe = self.pipe
        prompts, negatives = zip(*(text_prompts(j) for j in jobs))
        cond, uncond = pipe.encode_prompt(list(prompts), list(negatives) if pipe.runs_uncond(s) else None, s.clip_skip,
                                          steps=prompt_steps(s.sampler, s.steps))
        p = pipe.prepare_latents(s, [j.settings.seed for j in jobs])
        t0 = time.perf_counter()
        x = pipe.denoise(p, cond, uncond, s, progress=False)
        return x, time.perf_counter() - t0

    def generate(self, jobs: list[Job]) -> list[bytes]:
        """PNG bytes (infotext in the 'parameters' chunk) per job (its settings as `job_settings` gives them); the
        hires fix and the decode are per image (see module doc)."""
        from fastsd.image import png_writer, tensor_to_pil

        if jobs[0].init_image is not None:  # (an img2img job is batched with none: batch_key)
            return [self._img2img(j) for j in jobs]
        x, _ = self._latents(jobs)
        out = []
        for i, s in enumerate(j.settings for j in jobs):
            latents = self._hires(s, x[i:i + 1]) if s.hires else x[i:i + 1]
            image = tensor_to_pil(self.pipe.decode(latents))[0]
            buf = io.BytesIO()
            png_writer(image, self.pipe.infotext(s))(buf)
            out.append(buf.getvalue())
        return out

    def _img2img(self, job: Job) -> bytes:
        """One img2img / inpainting job's PNG, as fastsd.serve runs A1111's img2img request: its init image and mask
        read (the driver's bytes on Ray) and brought to the model by A1111's fields (fastsd.masking.a1111_img2img,
        the server's mapping), Pipeline.generate, then the overlay laid over the result; the infotext A1111's
        img2img one (Denoising strength, Mask blur, ...)."""
        from types import SimpleNamespace

        from fastsd import masking
        from fastsd.image import png_writer

        s, f = job.settings, SimpleNamespace(**dict(job.img2img))
        image = read_source(job.init_image, "init_image")
        mask = read_source(job.mask, "mask") if job.mask is not None else None
        if mask is not None:
            masking.check_inpaint_fields(f)
        notes: list[str] = []
        got, extra, mode = masking.a1111_img2img(f, [image], mask, (s.width, s.height), notes)
        for note in notes:
            self._log(f"fastsd.batch: job {job.id}: {note}")
        im = self.pipe.generate(**s.kwargs(), image=got[0].image, mask=got[0].mask, resize_mode=mode,
                                masked_content=masking.LATENT_FILL[f.inpainting_fill] if got[0].mask else "original",
                                latent_mask="bicubic" if f.mask_round else "bicubic-soft", fill_seed=s.seed,
                                infotext_extra=extra, progress=False, allow_large=True)[0]
        if got[0].overlay is not None:
            im = masking.apply_overlay(im, got[0].overlay, got[0].paste_to)
        buf = io.BytesIO()
        png_writer(im, im.info.get("parameters"))(buf)
        return buf.getvalue()

    def job_settings(self, job: Job) -> GenerationSettings:
        """The job's settings as the pipeline runs them: its hires upscaler found as python -m fastsd.generate finds
        --hires-upscaler (find_hires_upscaler: the infotext then names a model file by its model's name, as there),
        the VAE checked to encode what an image upscaler makes, and an upscaler model loaded (the Pipeline keeps it
        for the next job). ValueError / CheckpointError, one line, for an upscaler that can't be used."""
        from fastsd.generate import find_hires_upscaler

        s = job.settings
        if self.pipe.embeddings is not None:  # every embedding the prompts name read before any pass, as generate
            self.pipe.embeddings.used([s.prompt, s.negative_prompt, *(s.hires_prompts() if s.hires else ())])
        if not s.hires:
            return s
        s = s.replace(hires_upscaler=find_hires_upscaler(s.hires_upscaler, self.upscaler_dir))
        self.pipe.check_can_encode(None, s)
        self.pipe.check_hires_upscaler(s)
        return s

    def _hires(self, s: GenerationSettings, x):
        """One job's hires fix on its first pass's latents `x` (1, C, h, w), as Pipeline.generate runs it: the second
        pass conditioned on the job's hires prompts, encoded alone (the negative only when guided; encode_prompt takes
        the LoRA tags out, as text_prompts does)."""
        prompt, negative = s.hires_prompts()
        cond, uncond = self.pipe.encode_prompt([prompt], [negative] if self.pipe.runs_uncond(s) else None, s.clip_skip,
                                               steps=prompt_steps(s.sampler, s.steps),
                                               hires_steps=s.hires_prompt_steps())
        return self.pipe.hires_pass(s, x, [s.seed], cond, uncond, progress=False)

    def _chunks(self, job: Job) -> int:
        return prompt_chunks(job, self.pipe.tokenizer, self.pipe.embeddings)

    def batching_pays(self, jobs: list[Job]) -> bool:
        """Whether `jobs` (one batch key) may share a UNet call: measured once per shape (module doc)."""
        import torch

        s = jobs[0].settings
        shape = (s.width, s.height, s.guided, self._chunks(jobs[0]), len(jobs))
        if shape not in self._probed:
            for _ in range(2):  # the second round is the one that counts
                alone = [self._latents([j], 1, "euler") for j in jobs]
                together, t_batch = self._latents(jobs, 1, "euler")
            t_alone = sum(t for _, t in alone)
            same = all(torch.equal(x[0], together[i]) for i, (x, _) in enumerate(alone))
            faster = t_batch <= MARGIN * t_alone
            self._probed[shape] = same and (faster or self.always_batch)
            verdict = "batching" if self._probed[shape] else "one at a time"
            self._log(f"fastsd.batch: {len(jobs)} jobs at {s.width}x{s.height} in one UNet call: "
                      f"{'identical' if same else 'NOT identical'} to one at a time, {t_batch / t_alone:.2f}x "
                      f"their time -> {verdict}")
        return self._probed[shape]

    # ---- LoRAs ----------------------------------------------------------------------------------------

    def _use_loras(self, loras: tuple) -> None:
        """Make `loras` the applied set: every file is found before the weights change; a failed load
        leaves none applied (never half of a set)."""
        if loras == self._loras:
            return
        paths = [(find_lora(name, self.lora_dir), w, lora_tag_name(name)) for name, w in loras]
        if not hasattr(self.pipe, "load_loras"):
            raise ValueError("LoRAs need Pipeline.load_loras, which this fastsd build does not have")
        if self._loras:
            self.pipe.unload_loras()
            self._loras = ()
        try:
            self.pipe.load_loras(paths, keep_originals=loras != self._only_loras)
        except BaseException:
            self.pipe.unload_loras()
            raise
        self._loras = loras


def read_source(src, what: str):
    """A job's init image or mask (jobs.Source) as load_image reads a file (EXIF-turned, 8 bits): from the bytes the
    driver sent (a Ray worker), else from its file; ValueError (one line) for one that can't be read or that changed
    since the job was made (its sha256 is the job's settings: the manifest would name another image)."""
    import hashlib
    import warnings

    from PIL import Image

    from fastsd.image import INPUT_FORMATS, MAX_INPUT_PIXELS, checked_8bit, upright

    data = src.data
    if data is None:
        try:
            with open(src.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"{what} {src.path}: can't read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != src.sha256:
        raise ValueError(f"{what} {src.path}: changed since the run started (run the same command again: the job "
                         "is made with the new image)")
    try:
        with warnings.catch_warnings():  # (the size is checked here, as load_image does)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as im:
                if im.width * im.height > MAX_INPUT_PIXELS:
                    raise ValueError(f"{what} {src.path}: {im.width}x{im.height} pixels is above the limit of "
                                     f"{MAX_INPUT_PIXELS} pixels")
                im.load()
                out = im.copy()
    except ValueError as e:
        if str(e).startswith(what):
            raise
        raise ValueError(f"{what} {src.path}: not a readable image ({str(e).splitlines()[0] or 'ValueError'})") from None
    except Exception as e:  # noqa: BLE001 - PIL's many ways to fail on a damaged file
        raise ValueError(f"{what} {src.path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return checked_8bit(upright(out), f"{what} {src.path}")


def _lora_stem(name: str) -> str:
    """A job's LoRA name without its file extension (.safetensors, .pt, .ckpt), as <lora:NAME> tags write it."""
    from fastsd.lora import LORA_EXTS

    return next((name[: -len(ext)] for ext in LORA_EXTS if name.endswith(ext)), name)


def find_lora(name: str, lora_dir: str | None) -> str:
    """A LoRA file: `name` as a path, else NAME (with or without its extension) in `lora_dir` or
    $FASTSD_LORA_DIR, found as the CLI and the server find it (fastsd.lora.lora_path)."""
    from fastsd.lora import LORA_DIR_ENV, lora_path

    if os.path.isfile(name):
        return name
    return lora_path(_lora_stem(name), lora_dir or os.environ.get(LORA_DIR_ENV))


def lora_tag_name(name: str) -> str | None:
    """The name <lora:NAME> tags and the infotext use for the LoRA a job names `name`: NAME without its extension
    (it may be an A1111 alias, fastsd.lora.lora_by_name), None for a path (then the file stem)."""
    if os.path.isfile(name) or os.sep in name or bool(os.altsep and os.altsep in name):
        return None
    return _lora_stem(name)


def check_upscaler(name: str, upscaler_dir: str | None, flag: str = "--hires-upscaler") -> None:
    """The run-wide hires upscaler (the command line's --hires-upscaler), checked before a run writes anything or
    starts a worker, so a mistake there is a usage error and not every hires job's failure: found as the worker
    will find it (fastsd.generate.find_hires_upscaler), and a model file read as an upscaler (its header and shapes;
    ValueError / CheckpointError, one line)."""
    from fastsd import hires
    from fastsd.generate import find_hires_upscaler
    from fastsd.upscalers import read_upscaler

    path = find_hires_upscaler(name, upscaler_dir)  # (its messages name the upscaler)
    if path not in hires.UPSCALERS:
        _read_for_option(read_upscaler, path, f"{flag} {name}")


def _read_for_option(read, path: str, option: str) -> None:
    """read(path), its CheckpointError / OSError as one line naming the command-line option it came from."""
    from fastsd.tensorfile import CheckpointError

    try:
        read(path)
    except CheckpointError as e:
        raise CheckpointError(f"{option}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ValueError(f"{option}: can't read {path} ({e.strerror or e})") from None


def check_loras(loras, lora_dir: str | None, flag: str = "--lora") -> list[str]:
    """The files of the run-wide LoRAs (the command line's --lora), checked before a run writes anything or
    starts a worker, so a mistake there is a usage error and not every job's failure: each weight is one
    normalize_weight takes, each name is found as the worker will find it (find_lora), and each file reads as a
    LoRA file (its tensors' names; their shapes are checked against the model when the worker merges it).
    ValueError / CheckpointError, one line naming the option."""
    from fastsd.lora import lora_layers, normalize_weight

    paths = []
    for name, weight in loras:
        try:
            normalize_weight(weight)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{flag} {name}: {str(e).splitlines()[0]}") from None
        is_path = os.sep in name or bool(os.altsep and os.altsep in name)  # not a name in the LoRA folder
        if is_path and not os.path.isfile(name):
            raise ValueError(f"{flag} {name}: " + ("a folder, not a LoRA file (a folder of LoRAs is --lora-dir)"
                                                  if os.path.isdir(name) else "no such file"))
        try:
            path = find_lora(name, lora_dir)
        except ValueError as e:
            msg = str(e).splitlines()[0]
            stem = _lora_stem(name)
            if msg.startswith(f"<lora:{stem}>"):  # lora_path's messages name the prompt tag; this is an option
                msg = msg[len(f"<lora:{stem}>"):].lstrip(": ")
            raise ValueError(f"{flag} {name}: {msg}") from None
        _read_for_option(lora_layers, path, f"{flag} {name}")
        paths.append(path)
    return paths


def _failed(job: Job, e: BaseException) -> dict:
    from fastsd.tensorfile import CheckpointError

    msg = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, OSError) and e.filename is not None:  # (a file a job names that can't be read)
        return {"id": job.id, "ok": False, "error": f"{e.filename}: can't read ({e.strerror or e})"}
    if not isinstance(e, (ValueError, TypeError, CheckpointError)):
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return {"id": job.id, "ok": False, "error": msg}
