"""`run()`: jobs -> PNGs and manifest rows, in this process (default) or on a Ray cluster.

The driver reads the jobs, skips the ones the output folder's manifest has done (resume), records bad
job lines as failed, plans batches of compatible jobs, and writes every result itself (PNG, then its
fsync'd manifest line) as the executor hands it over: a `LocalExecutor` (one BatchWorker in this process) or
a `RayPool` (one BatchWorker per actor).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import replace

from fastsd.batch.jobs import (BadJob, Defaults, Img2ImgFolder, Job, JobContext, folder_records, make_jobs,
                               plan_batches, read_job_file, records_from_list)
from fastsd.batch.manifest import MANIFEST, OutputFolder, OutputWriteError


NOTES = 5  # lines of one kind about jobs before a count (Notes)


class LocalExecutor:
    def __init__(self, worker_kwargs: dict, log):
        from fastsd.batch.worker import BatchWorker

        self.worker = BatchWorker(**worker_kwargs, log=log)
        self.tokenizer = self.worker.pipe.tokenizer

    def run(self, batches):
        for batch in batches:
            yield batch, self.worker.run(batch)

    def close(self) -> None:
        pass


def load_jobs(jobs, defaults: Defaults, allow_large: bool = False, ctx: JobContext | None = None
              ) -> list[Job | BadJob]:
    """A job file path, a list of job dicts / prompt strings (their relative paths under the current folder), or an
    Img2ImgFolder (A1111's img2img batch from a folder)."""
    if isinstance(jobs, (str, os.PathLike)):
        return read_job_file(os.fspath(jobs), defaults, allow_large=allow_large, ctx=ctx)
    if isinstance(jobs, Img2ImgFolder):
        return make_jobs(folder_records(jobs, defaults), defaults, allow_large=allow_large, ctx=ctx)
    return make_jobs(records_from_list(jobs), defaults, allow_large=allow_large, ctx=ctx)


def styles_context(styles_file: str | None, defaults: Defaults) -> JobContext:
    """The styles the jobs may name: --styles-file (read now: a mistake there is a usage error), else $FASTSD_STYLES
    (read when a job names a style); --style's names (the jobs' default) checked against it."""
    from fastsd.styles import STYLES_ENV, read_styles, style_path

    path = style_path(styles_file)
    what = "--styles-file" if styles_file else f"${STYLES_ENV}"
    ctx = JobContext(styles_path=path, styles_what=what)
    if styles_file is not None or defaults.styles:
        if path is None:
            raise ValueError(f"--style {defaults.styles[0]}: no styles file; give --styles-file PATH (a styles.csv or "
                             f"a folder of them) or set ${STYLES_ENV}")
        styles, notes = read_styles(path, what)
        for note in notes:
            print(f"fastsd.batch: warning: {note}", file=sys.stderr)
        if missing := next((n for n in defaults.styles if n not in styles), None):
            have = ", ".join(repr(n) for n in list(styles)[:20]) + (", ..." if len(styles) > 20 else "")
            raise ValueError(f"--style {missing!r}: no such style in {what} {path} (it has: {have or 'none'})")
        ctx._styles["styles"] = styles
    return ctx


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path is not None and os.path.exists(path) else path


def _loras_for_workers(loras: tuple) -> tuple:
    """LoRAs named by a file path (relative to this process' folder) with the path absolute."""
    return tuple((_absolute(n) if os.sep in n or os.path.isfile(n) else n, w) for n, w in loras)


def for_workers(job: Job) -> Job:
    """The job as a Ray worker gets it: its LoRA and upscaler model files named by absolute paths (the worker's
    folder is the cluster's; the driver keeps the job as written, for its manifest), its init image and mask as
    their bytes (the worker checks their sha256: an image changed since the job was made fails it, in one line)."""
    from fastsd.hires import builtin_upscaler

    s, up = job.settings, job.settings.hires_upscaler
    if isinstance(up, str) and builtin_upscaler(up) is None and os.path.isfile(up):
        s = s.replace(hires_upscaler=os.path.abspath(up))
    sources = {}
    for name in ("init_image", "mask"):
        src = getattr(job, name)
        if src is not None:
            try:
                with open(src.path, "rb") as f:
                    sources[name] = replace(src, data=f.read())
            except OSError:  # (gone since the job was made: the worker says so, reading its path)
                pass
    return replace(job, settings=s, loras=_loras_for_workers(job.loras), **sources)


def _absolute_vae(vae: str | None) -> str | None:
    """--vae with its path absolute (taesd:PATH too), for workers whose working folder is not this one."""
    from fastsd.vae_files import TAESD_PREFIX

    if vae is not None and vae.startswith(TAESD_PREFIX):
        return TAESD_PREFIX + _absolute(vae[len(TAESD_PREFIX):])
    return _absolute(vae)


def _check_model(model: str, vae: str | None) -> str | None:
    """The model found, and the VAE found and fitting it (headers only, as load_pipeline checks them): the VAE that
    replaces the model's own in this run (`vae`, else A1111's "Automatic" file beside a checkpoint), or None."""
    from fastsd.checkpoint import Checkpoint, resolve
    from fastsd.vae_files import AUTOMATIC, automatic_vae, resolve_vae, vae_keyword

    src = resolve(model)
    cfg = src.config if isinstance(src, Checkpoint) else src
    if vae is None or vae_keyword(vae) == AUTOMATIC:
        near = automatic_vae(src.path if isinstance(src, Checkpoint) else None, cfg)
        return None if near is None else near.path
    return None if resolve_vae(vae, cfg) is None else vae


def model_label(model: str, vae: str | None = None) -> str:
    """The model as the manifest records it: an absolute path for files and folders, and the VAE replacing its own
    (--vae, or the file beside it: a folder's manifest belongs to one; images of another VAE are not this run's)."""
    label = os.path.abspath(model) if os.path.exists(model) else model
    return label if vae is None else f"{label} with VAE {_absolute_vae(vae)}"


def check_run_options(defaults: Defaults, lora_dir: str | None, *, local: bool, device=None, dtype=None,
                      backend: str = "auto", upscaler_dir: str | None = None,
                      embeddings_dir: str | None = None) -> None:
    """The options every job shares, checked before the output folder is created or a worker starts, so a mistake
    in them is a usage error (ValueError / TypeError / CheckpointError / BackendError, one line) rather than
    every job recorded as failed: the LoRA, upscaler and embeddings folders exist, the default LoRAs (--lora) are
    found there and read as LoRA files with valid weights, the default hires upscaler (--hires-upscaler) is found
    and reads as one, and, for a run in this process, the device, dtype and backend can be used here (a Ray run's
    devices are the workers')."""
    from fastsd.batch.worker import check_loras, check_upscaler
    from fastsd.generate import EMBEDDINGS_ENV
    from fastsd.lora import LORA_DIR_ENV
    from fastsd.upscalers import UPSCALER_DIR_ENV

    for flag, env, folder in (("--lora-dir", LORA_DIR_ENV, lora_dir),
                              ("--upscaler-dir", UPSCALER_DIR_ENV, upscaler_dir),
                              ("--embeddings-dir", EMBEDDINGS_ENV, embeddings_dir)):
        if folder is None and os.environ.get(env):
            flag, folder = f"${env}", os.environ[env]
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder"))
    check_loras(defaults.loras, lora_dir)
    check_upscaler(defaults.hires_upscaler, upscaler_dir)
    if local:
        from fastsd import backends
        from fastsd.load import parse_device, parse_dtype

        dev = parse_device(device)
        dt = parse_dtype(dtype, dev) if dtype is not None else None  # (none given: the worker picks, maybe measuring)
        if backend != "auto":
            backends.get(backend, dev, dt)


def run(jobs, *, model: str, out: str, ray: str | bool | None = None, batch: int = 1, workers: int | None = None,
        cpus_per_worker: float = 1, gpus_per_worker: float = 0, defaults: Defaults | None = None,
        retry_failed: bool = False, progress: bool = True, device=None, dtype=None, backend: str = "auto",
        threads: int | None = None, lora_dir: str | None = None, upscaler_dir: str | None = None,
        always_batch: bool = False, allow_large: bool = False, summary: dict | None = None, vae: str | None = None,
        embeddings_dir: str | None = None, styles_file: str | None = None, vae_dir: str | None = None) -> list[dict]:
    """Run `jobs` (a .jsonl/.csv/.txt path, or a list of job dicts / prompts) with `model` into the folder
    `out`; returns the manifest rows of these jobs (the last row per job, in job order), including jobs
    finished by earlier runs. `ray`: None = this process; "local" / True = a new Ray cluster on this
    machine; "auto" = the running cluster; or a cluster address. `batch`: up to this many compatible jobs
    per UNet call, where measured identical and faster (fastsd.batch.worker). `lora_dir` / `upscaler_dir`: where
    LoRA and upscaler model names are found (none given: $FASTSD_LORA_DIR / $FASTSD_UPSCALER_DIR). `vae`: as
    --vae, `vae_dir`: as --vae-dir (none given: $FASTSD_VAE_DIR); `embeddings_dir`: the textual inversions prompts
    may name (none given: $FASTSD_EMBEDDINGS_DIR). `summary`,
    when given, is filled with counts and timings of this run. `jobs` may be an Img2ImgFolder (A1111's img2img batch
    from a folder); `styles_file`: the styles.csv (or folder) the jobs' `styles` and defaults.styles name (none
    given: $FASTSD_STYLES)."""
    import warnings

    from fastsd.generate import EMBEDDINGS_ENV
    from fastsd.lora import LORA_DIR_ENV
    from fastsd.upscalers import UPSCALER_DIR_ENV
    from fastsd.vae_files import AutomaticVAE, cli_vae, vae_folder

    defaults = defaults or Defaults()
    defaults.validate(allow_large)
    if ray in (None, False) and workers is not None:  # (this process has one worker)
        raise ValueError("workers is for Ray workers: give ray='local' (a cluster on this machine) or an address")
    check_run_options(defaults, lora_dir, local=ray in (None, False), device=device, dtype=dtype, backend=backend,
                      upscaler_dir=upscaler_dir, embeddings_dir=embeddings_dir)
    vae, vae_note = cli_vae(vae, model, vae_folder(vae_dir))  # (a name, or Automatic's file of the VAE folder)
    on_ray = ray not in (None, False)
    if on_ray:  # the workers' working folder is not this one: the paths checked here go to them absolute
        lora_dir = lora_dir or os.environ.get(LORA_DIR_ENV)
        upscaler_dir = upscaler_dir or os.environ.get(UPSCALER_DIR_ENV)
        embeddings_dir = embeddings_dir or os.environ.get(EMBEDDINGS_ENV)
        model, lora_dir, upscaler_dir, embeddings_dir = (_absolute(p) for p in (model, lora_dir, upscaler_dir,
                                                                               embeddings_dir))
        vae = _absolute_vae(vae)
        defaults = replace(defaults, loras=_loras_for_workers(defaults.loras))
    job_list = load_jobs(jobs, defaults, allow_large, styles_context(styles_file, defaults))
    used_vae = _check_model(model, vae)  # a wrong model or VAE fails here, before the folder or a worker is made
    if vae_note is not None:  # (a file beside the model: the worker's load_pipeline says so)
        warnings.warn(AutomaticVAE(vae_note), stacklevel=2)
    worker_kwargs = dict(model=model, device=device, dtype=dtype, backend=backend, threads=threads,
                         lora_dir=lora_dir, upscaler_dir=upscaler_dir, always_batch=always_batch, vae=vae,
                         embeddings_dir=embeddings_dir)
    pool, owns_ray = None, False
    if on_ray:
        from fastsd.batch import ray_pool

        pool = dict(workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
        owns_ray = ray_pool.connect(None if ray is True else ray)  # a wrong address fails before the folder exists
        try:
            ray_pool.check_room(cpus_per_worker, gpus_per_worker)
        except ValueError:
            if owns_ray:
                ray_pool.disconnect()
            raise
    try:
        with OutputFolder(out, model_label(model, used_vae)) as folder:
            try:
                return _drive(job_list, folder, worker_kwargs, pool=pool, batch=batch, retry_failed=retry_failed,
                              progress=progress, summary=summary if summary is not None else {})
            except BaseException:
                folder.remove_if_unused()
                raise
    finally:
        if owns_ray:
            ray_pool.disconnect()


def _drive(job_list, folder: OutputFolder, worker_kwargs: dict, *, pool: dict | None, batch: int, retry_failed: bool,
           progress: bool, summary: dict) -> list[dict]:
    from fastsd.batch.progress import Progress

    def wanted(j) -> bool:  # (a failed job edited under its id is a new attempt: it runs again)
        return not folder.is_done(j.id) and (retry_failed or not folder.has_failed(j.id) or edited(j) is not None)

    def edited(j) -> str | None:
        return _changed(folder.rows[j.id], j) if isinstance(j, Job) and j.id in folder.rows else None

    todo, notes = [], Notes()
    for j in job_list:
        if not isinstance(j, Job):
            continue
        if wanted(j):
            todo.append(j)
            if folder.has_failed(j.id) and not retry_failed and (why := edited(j)):
                notes.say("failed before with other settings: they run again",
                          f"line {j.line}: job {j.id} failed before with other settings ({why}): it runs again")
        elif folder.is_done(j.id) and (why := edited(j)):
            notes.say("made before with other settings: their images are kept",
                      f"line {j.line}: job {j.id} was made before with other settings ({why}); its image is kept: "
                      "give the job another id (or use another --out) to make this one")
    sets = {j.loras for j in todo}
    if len(sets) == 1 and () not in sets:  # one LoRA set for every job: merged for good (no copy of the weights)
        worker_kwargs = {**worker_kwargs, "only_loras": sets.pop() if pool is None else _loras_for_workers(sets.pop())}
    bad = [j for j in job_list if isinstance(j, BadJob) and wanted(j)]
    for j in bad:  # recorded before the bar starts: they take no time, so they don't count in its rate
        notes.say("that can't run: the manifest has each one's reason", f"line {j.line}: {j.error}")
        folder.append({"id": j.id, "line": j.line, "status": "failed", "error": j.error})
    notes.close()
    bar = Progress(len(job_list), len(job_list) - len(todo) - len(bad), failed=len(bad), enabled=progress)
    executor = None
    t0 = time.perf_counter()
    try:
        if todo:
            if pool is None:
                executor = LocalExecutor(worker_kwargs, bar.log)
            else:
                from fastsd.batch.ray_pool import RayPool

                executor = RayPool(worker_kwargs, **pool, log=bar.log, prepare=for_workers)
            tokenizer = getattr(executor, "tokenizer", None) or _default_tokenizer()
            for jobs, results in executor.run(plan_batches(todo, batch, tokenizer)):
                for job, r in zip(jobs, results):
                    _record(folder, job, r, bar)
    finally:
        if executor is not None:
            executor.close()
        bar.close()
        summary.update(bar.counts(), seconds=time.perf_counter() - t0, left=sum(wanted(j) for j in todo))
    return [folder.rows[j.id] for j in job_list if j.id in folder.rows]


class Notes:
    """Lines about jobs on stderr, the first NOTES of a kind in full, then one count per kind (a rerun of thousands of
    edited jobs says so in a few lines, not thousands)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def say(self, kind: str, line: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= NOTES:
            print(f"fastsd.batch: {line}", file=sys.stderr)

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > NOTES:
                print(f"fastsd.batch: ... and {n - NOTES} more jobs {kind}", file=sys.stderr)


def _changed(row: dict, job: Job) -> str | None:
    """How the settings a manifest row was made with differ from `job`'s (an edited job file reusing an id): the
    first field that differs, or None."""
    before = row.get("settings")
    now = json.loads(json.dumps(job.manifest_settings(), ensure_ascii=False))
    if not isinstance(before, dict) or before == now:
        return None
    key = next(k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
    return f"{key} {before.get(key)!r} then, {now.get(key)!r} now"


def _default_tokenizer():
    from fastsd.tokenizer import Tokenizer

    return Tokenizer()


def _record(folder: OutputFolder, job: Job, r: dict, bar) -> None:
    """One result: the PNG (atomic, fsync'd), then its manifest line (fsync'd). A write that fails (the PNG's name
    taken by a folder, a full disk, a read-only manifest) stops the run with OutputFolderError: the jobs recorded
    so far are kept, and a PNG whose line could not be written is removed (the rerun makes it again)."""
    row = {"id": job.id, "line": job.line}
    written = None
    try:
        if r["ok"]:
            written = folder.write_png(job.file, r["png"])
            row.update(status="done", file=job.file, seed=job.settings.seed, seconds=r["seconds"])
        else:
            bar.log(f"fastsd.batch: job {job.id} (line {job.line}) failed: {r['error']}")
            row.update(status="failed", error=r["error"])
        folder.append({**row, **job.sources(), "settings": job.manifest_settings()})
    except OSError as e:
        if written is not None:
            with contextlib.suppress(OSError):
                os.unlink(written)
        where = os.path.join(folder.folder, MANIFEST if written else job.file)
        raise OutputWriteError(f"--out {folder.folder}: can't write {where} ({e.strerror or e}) for job {job.id}; "
                                "the jobs finished before are kept: fix that and run the same command again to "
                                "resume") from None
    bar.finished(ok=r["ok"])


def print_summary(summary: dict, folder: str, file=None) -> None:
    s, file = summary, file or sys.stderr  # sys.stderr now, not the one at import
    rate = f", {s['done'] / s['seconds'] * 60:.1f} images/min" if s["done"] and s["seconds"] else ""
    print(f"fastsd.batch: {s['done']} done, {s['failed']} failed this run ({s['before']} finished before), "
          f"{s['left']} left, {s['seconds']:.1f} s{rate}; manifest {os.path.join(folder, 'manifest.jsonl')}",
          file=file)
