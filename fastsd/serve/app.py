"""The FastAPI app: A1111's /sdapi/v1 endpoints and its /internal/progress (one task's progress), the web page
at /, and the error answers (every refused request gets a 4xx whose `detail` is one line; an unexpected failure
a 500 naming only its type, with the traceback in the server's log, never in the response)."""
from __future__ import annotations

import asyncio
import logging
import os
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from fastsd.lora import lora_alias, lora_metadata
from fastsd.samplers import SIGMA_DEFAULTS
from fastsd.serve.auth import Auth
from fastsd.serve.imageformat import DEFAULT as IMAGE_DEFAULTS
from fastsd.serve.imageformat import check_format, encode_image
from fastsd.serve.generation import a1111_names, build_plan, check_sampling_options, encode_png, png_info, run_plan
from fastsd.serve.jobqueue import Cancelled, Job, JobQueue, QueueFull
from fastsd.serve.limits import BadRequest, Limits
from fastsd.serve.networks import Networks, file_names
from fastsd.serve.registry import Registry
from fastsd.serve.schemas import (ExtrasBatchImagesRequest, ExtrasSingleImageRequest, Img2ImgRequest, OptionsRequest,
                                  PNGInfoRequest, ProgressRequest, Txt2ImgRequest)
from fastsd.serve.upscalers import Upscalers, build_extras, build_extras_batch, run_extras, run_extras_batch
from fastsd.serve.vaes import Vaes

STATIC = Path(__file__).with_name("static")


class TaskRequest(BaseModel):
    """fastsd's optional body of /interrupt and /skip: the task (a request's force_task_id) to stop; none: the
    running request, whoever's (A1111's)."""

    model_config = ConfigDict(extra="ignore")

    id_task: str | None = None


TASK_CHARS = string.ascii_uppercase + string.digits  # A1111's create_task_id
log = logging.getLogger("fastsd.serve")


@dataclass
class ServerState:
    registry: Registry
    networks: Networks
    limits: Limits
    queue: JobQueue
    auth: Auth | None = None
    clip_skip: int = 1                      # A1111's CLIP_stop_at_last_layers option
    # A1111's sampling options that are GenerationSettings' fields of their names: Skip Early CFG, NGMS all steps, ENSD,
    # the img2img noise multiplier (a request's initial_noise_multiplier wins); eta_ancestral / eta_ddim, the eta
    # field's value where a request gives none (for the samplers that take one); and sigma churn / tmin / tmax / noise,
    # which win over a request's fields unless at their defaults (A1111's Sampler.initialize); the noise's source
    # (randn_source: fastsd's CPU by default, where A1111's is GPU); an inpainting model's conditioning mask strength
    # (inpainting_mask_weight); img2img's steps (img2img_fix_steps) and extra noise (img2img_extra_noise), and its
    # colour correction (img2img_color_correction)
    sampling_options: dict = field(default_factory=lambda: {"skip_early_cond": 0.0, "s_min_uncond_all": False,
                                                            "eta_noise_seed_delta": 0, "initial_noise_multiplier": 1.0,
                                                            "eta_ancestral": 1.0, "eta_ddim": 0.0, **SIGMA_DEFAULTS,
                                                            "randn_source": "CPU", "inpainting_mask_weight": 1.0,
                                                            "img2img_fix_steps": False, "img2img_extra_noise": 0.0,
                                                            "img2img_color_correction": False})
    styles: dict = field(default_factory=dict)  # {name: fastsd.styles.PromptStyle} of --styles-file, read at start
    upscalers: Upscalers = field(default_factory=lambda: Upscalers(None))  # --upscaler-dir's models
    vaes: Vaes = field(default_factory=lambda: Vaes(None))  # --vae-dir's files and the sd_vae option
    started: float = field(default_factory=time.time)
    cmd_flags: dict = field(default_factory=dict)  # GET /sdapi/v1/cmd-flags: the command line's, by A1111's names
    image_format: dict = field(default_factory=lambda: dict(IMAGE_DEFAULTS))  # samples_format, jpeg_quality


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions a job raises for what a request asked (not a server fault): answered 422."""
    from fastsd import CheckpointError

    return BadRequest, ValueError, TypeError, CheckpointError


class BodyLimit:
    """ASGI middleware: 413 for a request body above `max_body` bytes, by Content-Length or while it streams."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body above this server's limit of {self.max_body} bytes (--max-body-mb)"
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await JSONResponse({"detail": too_big}, 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, too_big)
            return message

        await self.app(scope, limited, send)


class JsonByDefault:
    """ASGI middleware: a POST to the API (/sdapi, /internal) that has no Content-Type header is read as JSON, as
    A1111's FastAPI 0.94 reads it (`requests.post(url, data=json.dumps(body))` sends none); FastAPI 0.12x+ refuses
    it by default (strict_content_type), so this does not depend on the FastAPI installed. Narrowly: text/plain or a
    form (what a web page may send cross-site without a preflight) stays a 422, and so does a body without a
    Content-Type that carries an Origin header (a browser's: a page's fetch of a Blob with no type sends none and no
    preflight either); the scripts and clients this is for send no Origin."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and \
                scope["path"].startswith(("/sdapi/", "/internal/")):
            names = {k.lower() for k, _ in scope["headers"]}
            if b"content-type" not in names and b"origin" not in names:
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class InternalErrors:
    """ASGI middleware: an unexpected exception becomes a JSON 500 (A1111's error body, naming only the exception's
    type), logged here once with its traceback. (Starlette's handler for Exception re-raises after answering: uvicorn
    then logs it again and closes the keep-alive connection under the client's next request.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            if started:  # part of an answer went out: nothing whole can follow; uvicorn logs it and hangs up
                raise
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            detail = f"internal error ({type(e).__name__}); the server log has the details"
            body = {"error": type(e).__name__, "detail": detail, "body": "", "errors": detail}
            await JSONResponse(body, 500)(scope, receive, send)


def _one_line(e: RequestValidationError) -> str:
    errors = e.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"invalid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{loc}: {first.get('msg')}{more}".replace("\n", " ")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse({"detail": _one_line(e)}, 422)

    @app.exception_handler(BadRequest)
    async def bad(request, e: BadRequest):
        return JSONResponse({"detail": str(e)}, e.status)

    @app.exception_handler(QueueFull)
    async def full(request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, 503, headers={"Retry-After": str(e.retry_after)})


async def _wait(state: ServerState, job: Job, request: Request):
    """The job's result; if the client goes away first, the job is cancelled (dropped if it waits, stopped at
    its next step if it runs) so the worker moves on."""
    fut = asyncio.wrap_future(job.future)
    while not fut.done():
        await asyncio.wait({fut}, timeout=0.25)
        if not fut.done() and await request.is_disconnected():
            state.queue.cancel(job)
            fut.cancel()  # unhooks the worker's outcome (a Cancelled nobody reads)
            return JSONResponse({"detail": "client disconnected"}, 499)
    if fut.cancelled():
        raise HTTPException(503, "the server is shutting down")
    try:
        return fut.result()
    except Cancelled:  # stopped by the shutdown while it ran (a gone client was answered above)
        raise HTTPException(503, "the server is shutting down") from None
    except BadRequest:
        raise
    except user_errors() as e:  # the pipeline refused what was asked (checked there, not here): still a 4xx
        log.info("job refused: %s: %s", type(e).__name__, e)
        message = file_names(str(e), state.networks.embeddings().values())  # (an embedding file by its name)
        raise BadRequest(a1111_names(message or type(e).__name__)) from None


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="fastsd", description="AUTOMATIC1111-compatible API of fastsd", docs_url=None,
                  redoc_url=None)  # Swagger/ReDoc pages load their scripts from a CDN; /openapi.json stays
    app.state.fastsd = state
    _install_error_handlers(app)
    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit, max_body=state.limits.max_body)
    app.add_middleware(InternalErrors)  # outside BodyLimit (the last added is the outermost)
    guard = [Depends(state.auth)] if state.auth else []
    api = APIRouter(prefix="/sdapi/v1", dependencies=guard)
    _generation_routes(api, state)
    _info_routes(api, state)
    app.include_router(api)
    internal = APIRouter(prefix="/internal", dependencies=guard)

    @internal.post("/progress")
    async def task_progress(req: ProgressRequest):
        return _task_progress(state, req)

    app.include_router(internal)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    return app


def _generation_routes(api: APIRouter, state: ServerState) -> None:
    async def generate(kind: str, req, request: Request):
        plan = await run_in_threadpool(build_plan, req, kind, state)
        task_id = req.force_task_id or f"task({kind}-{''.join(random.choices(TASK_CHARS, k=7))})"  # (A1111's)
        job = state.queue.submit(Job(kind, lambda job: run_plan(plan, job, state.networks, state.vaes),
                                     plan.settings.steps, plan.n_iter, task_id=task_id,
                                     image_format=plan.image_format))
        return await _wait(state, job, request)

    @api.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generate("txt2img", req, request)

    @api.post("/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generate("img2img", req, request)

    @api.post("/extra-single-image")
    async def extra_single_image(req: ExtrasSingleImageRequest, request: Request):
        """A1111's Extras tab: the upscale (checked here, run as a job: one at a time with the generations)."""
        plan = await run_in_threadpool(build_extras, req, state)
        return await _wait(state, state.queue.submit(Job("extras", lambda job: run_extras(plan, job))), request)

    @api.post("/extra-batch-images")
    async def extra_batch_images(req: ExtrasBatchImagesRequest, request: Request):
        """A1111's Extras tab on a list of images: each as /extra-single-image, all in one job."""
        plans = await run_in_threadpool(build_extras_batch, req, state)
        return await _wait(state, state.queue.submit(Job("extras", lambda job: run_extras_batch(plans, job))), request)

    @api.post("/interrupt")
    async def interrupt(req: TaskRequest | None = None):
        """A1111's interrupt of the running request; with fastsd's `{"id_task": ID}` only if the running request is
        that task (its force_task_id: the page stops its own job, never another client's)."""
        state.queue.interrupt(req.id_task if req else None)
        return {}

    @api.post("/skip")
    async def skip(req: TaskRequest | None = None):
        """A1111's skip (answered null, as A1111 does): the running request leaves its current iteration (its
        images) and goes on with the next; `{"id_task": ID}` as /interrupt's."""
        state.queue.skip(req.id_task if req else None)

    @api.get("/progress")
    async def progress(skip_current_image: bool = False):
        return _progress(state, skip_current_image)

    @api.post("/png-info")
    async def read_png_info(req: PNGInfoRequest):
        """A1111's: the infotext of an image (PNG text or a JPEG's/WEBP's EXIF comment), parsed."""
        return png_info(*await run_in_threadpool(state.limits.image_info, req.image, "image"))


A1111_JOBS = {"txt2img": "scripts_txt2img", "img2img": "scripts_img2img"}  # its state.begin(job=...) of the API


def _progress(state: ServerState, skip_image: bool) -> dict:
    """A1111's ProgressResponse for the running job (progress 0.01 + 0..1 over all its iterations, at most 1, as
    A1111's progressapi): its state's job_count the job's iterations (n_iter), job_no the running one's index, job
    "Batch i out of n" with more than one (else A1111's name for the job, "scripts_txt2img"), job_timestamp its
    start (%Y%m%d%H%M%S); current_task the running task's id (its force_task_id, else one made as A1111's
    "task(txt2img-XXXXXXX)"), null when idle; fastsd adds "queued", the jobs waiting behind it."""
    job, waiting = state.queue.snapshot()
    st = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
          "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
          "queued": waiting, "fastsd": dict(state.queue.counts)}
    if job is None or job.started is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": st, "current_image": None, "textinfo": None,
                "current_task": None}
    done, elapsed = _done(job)
    done = min(done + 0.01, 1.0)  # A1111's progressapi: 0.01 from the start (a running job never reads as idle)
    st.update(interrupted=job.stopped, skipped=job.skipped, job_count=job.iterations, job_no=job.iteration,
              job=f"Batch {job.iteration + 1} out of {job.iterations}" if job.iterations > 1 else
              A1111_JOBS.get(job.kind, job.kind),
              job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() - elapsed)),
              sampling_step=job.step, sampling_steps=job.steps)
    preview = job.preview  # in the job's samples_format (its override_settings', as A1111 sets its opts for it)
    fmt = job.image_format or (state.image_format["samples_format"], state.image_format["jpeg_quality"])
    return {"progress": done, "eta_relative": elapsed / done - elapsed, "state": st,
            "current_image": encode_image(preview, *fmt)
            if preview is not None and not skip_image else None,  # (A1111's encode_pil_to_base64)
            "textinfo": _textinfo(job), "current_task": job.task_id}


def _done(job: Job) -> tuple[float, float]:
    """(a started job's progress, 0..1 over all its iterations; the seconds since it started)."""
    done = (job.iteration + job.step / max(1, job.steps)) / max(1, job.iterations)
    return min(done, 1.0), time.monotonic() - job.started


def _textinfo(job: Job) -> str:
    return f"step {job.step} of {job.steps}, image batch {job.iteration + 1} of {job.iterations}"


def _task_progress(state: ServerState, req: ProgressRequest) -> dict:
    """A1111's POST /internal/progress: the progress of one task, the job whose request had that force_task_id.
    Waiting or unknown: textinfo "In queue: ..." / "Waiting..." (fastsd adds jobs_ahead, the jobs before it,
    the running one included); running: progress, eta (seconds) and the live preview as a data: URL unless the
    client already has it (id_live_preview)."""
    job, ahead, completed = state.queue.task(req.id_task) if req.id_task else (None, None, False)
    answer = {"active": job is not None, "queued": ahead is not None, "completed": completed, "progress": None,
              "eta": None, "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting...", "jobs_ahead": ahead}
    if ahead is not None:
        answer["textinfo"] = f"In queue: {ahead} job{'s' * (ahead != 1)} ahead"
    if job is None:
        return answer
    answer.update(progress=0.0, id_live_preview=req.id_live_preview, textinfo=_textinfo(job))
    if job.started is not None:
        done, elapsed = _done(job)
        answer.update(progress=done, eta=elapsed / done - elapsed if done > 0 else None)
    preview_id, preview = job.preview_id, job.preview
    if req.live_preview and preview is not None and preview_id != req.id_live_preview:
        answer.update(live_preview="data:image/png;base64," + encode_png(preview), id_live_preview=preview_id)
    return answer


def _info_routes(api: APIRouter, state: ServerState) -> None:
    from fastsd.samplers import A1111_NAMES, SAMPLERS

    @api.get("/samplers")
    async def samplers():
        return [{"name": A1111_NAMES.get(k, k), "aliases": [k, f"k_{k}"], "options": {}} for k in SAMPLERS]

    @api.get("/schedulers")
    async def schedulers():
        from fastsd.schedule_types import SCHEDULE_TYPES

        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False}] + [
                {"name": t.name, "label": t.label, "aliases": list(t.aliases) or None, "default_rho": t.rho,
                 "need_inner_model": t.whole_table} for t in SCHEDULE_TYPES.values()]

    @api.get("/sd-models")
    async def sd_models():
        return [e.a1111() for e in state.registry.entries]

    @api.get("/loras")
    async def loras():
        return [{"name": n, "alias": lora_alias(p), "path": Path(p).name, "metadata": lora_metadata(p)}
                for n, p in state.networks.loras().items()]

    @api.post("/refresh-loras")
    async def refresh_loras():
        return None  # the folder is read on every request

    @api.post("/refresh-checkpoints")
    async def refresh_checkpoints():
        return None  # the models are the --model files given at start: nothing to rescan

    @api.post("/refresh-vae")
    async def refresh_vae():
        return None  # the folder is read on every request

    @api.get("/sd-vae")
    async def sd_vae():
        """A1111's list of its models/VAE files (here --vae-dir's): model_name, filename (inside the folder)."""
        return state.vaes.a1111()

    @api.get("/embeddings")
    async def embeddings():
        """A1111's shape: "loaded" those the current model can use, "skipped" those read but of another width (an
        SD2 embedding), each as A1111's convert_embedding (shape: the width; vectors: their count); a file that
        can't be read or used otherwise is not listed, as A1111 (the server's log names it at start and refresh).
        "loaded" has the bundled embeddings of the LoRAs merged (the last request's), as A1111 registers them."""
        pipe = state.registry.current.pipe
        usable, wide = state.networks.embedding_list(pipe)
        if pipe.embeddings is not None:
            usable = {**{n: e for n, e in pipe.embeddings.bundled.items() if n not in usable}, **usable}

        def item(vectors, shape):
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape,
                    "vectors": vectors}

        return {"loaded": {n: item(*e.vectors.shape) for n, e in usable.items()},
                "skipped": {n: item(*shape) for n, shape in wide.items()}}

    @api.get("/prompt-styles")
    async def prompt_styles():
        """A1111's list of its styles.csv (here --styles-file's), in the file's order."""
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in state.styles.values()]

    @api.get("/upscalers")
    def upscalers():
        """A1111's list: None, Lanczos, Nearest, then --upscaler-dir's models (each file read once, off the loop)."""
        return state.upscalers.a1111()

    @api.get("/latent-upscale-modes")
    async def latent_upscale_modes():
        from fastsd.hires import LATENT_MODES

        return [{"name": n} for n in LATENT_MODES]

    for empty in ("/hypernetworks", "/face-restorers", "/realesrgan-models", "/script-info", "/extensions"):
        api.add_api_route(empty, _empty_list, methods=["GET"])

    @api.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}  # (A1111's shape; fastsd runs no scripts)

    @api.get("/cmd-flags")
    async def cmd_flags():
        return state.cmd_flags

    @api.get("/memory")
    async def memory():
        """A1111's shape: this process' RAM (bytes) against the machine's; no CUDA here."""
        return {"ram": _ram(), "cuda": {"error": "unavailable"}}

    @api.post("/refresh-embeddings")
    async def refresh_embeddings(request: Request):
        """--embeddings-dir read again (files added, changed or removed), between generations (a queue job)."""
        pipes = [e.pipe for e in state.registry.entries]

        def reload(job) -> None:
            for pipe in pipes:
                if pipe.embeddings is not None:
                    pipe.embeddings.forget_files()  # (the loaded LoRAs' bundled embeddings stay)
            for name, why in state.networks.load_embeddings(pipes).items():
                log.warning("embedding %s skipped: %s", name, why)

        return await _wait(state, state.queue.submit(Job("refresh-embeddings", reload)), request)

    for path, why in (("/unload-checkpoint", "the server keeps its --model models loaded"),
                      ("/reload-checkpoint", "the server keeps its --model models loaded"),
                      ("/interrogate", "fastsd has no interrogator (CLIP / BLIP / DeepBooru captioning)")):
        api.add_api_route(path, _not_here(path, why), methods=["POST"])

    @api.get("/options")
    async def get_options():
        cur = state.registry.current
        return {"sd_model_checkpoint": cur.title, "sd_checkpoint_hash": cur.sha256, "sd_vae": state.vaes.option,
                "CLIP_stop_at_last_layers": state.clip_skip, **state.image_format, **state.sampling_options}

    @api.post("/options")
    async def set_options(req: OptionsRequest):
        """A1111 answers null; fastsd says what it applied and what it ignored (and `warnings`). As A1111's set_config,
        an unknown sd_model_checkpoint is refused; "" (and null) keeps the current one; an sd_vae name the server
        lacks is set as A1111 sets it (jobs then run the model's own VAE, warned), "" keeps the current option;
        CLIP_stop_at_last_layers is checked against the text encoder of the model it would run with."""
        from fastsd.serve.generation import clip_skip_for

        sampling = {k: getattr(req, k) for k in state.sampling_options if getattr(req, k) is not None}
        check_sampling_options(sampling)
        image_format = check_format({"samples_format": req.samples_format, "jpeg_quality": req.jpeg_quality})
        # every value checked before any is applied: a model, the VAE file and clip skip it would run with (as a
        # request's override_settings are)
        name, vae = req.sd_model_checkpoint or None, req.sd_vae or None
        model = state.registry.current if name is None else state.registry.find(name)
        clip_skip = None if req.CLIP_stop_at_last_layers is None else clip_skip_for(req.CLIP_stop_at_last_layers, model,
                                                                                     "CLIP_stop_at_last_layers")
        warnings: list[str] = []
        state.vaes.checked_path(state.vaes.option if vae is None else vae, model, "sd_vae", warnings)
        applied = {}
        if name is not None:
            applied["sd_model_checkpoint"] = state.registry.switch(name).title
        if vae is not None:
            state.vaes.option = applied["sd_vae"] = vae
        if clip_skip is not None:
            state.clip_skip = applied["CLIP_stop_at_last_layers"] = clip_skip
        state.sampling_options.update(sampling)
        state.image_format.update(image_format)
        applied.update(sampling | image_format)
        return {"applied": applied, "ignored": sorted(req.model_extra or {}), "warnings": warnings}


def _ram() -> dict:
    """This process' resident memory and the machine's, from /proc (A1111's keys: free, used, total)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"free": info["MemAvailable"], "used": used, "total": info["MemTotal"]}
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"error": str(e) or type(e).__name__}


def _not_here(path: str, why: str):
    async def refuse():
        raise HTTPException(501, f"{path}: not supported; {why}")
    return refuse


async def _empty_list():
    """Endpoints of A1111 features fastsd does not have (VAE lists, face restorers, ...): empty lists, for clients that
    list them at start."""
    return []
