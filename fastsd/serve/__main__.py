"""python -m fastsd.serve --model M [--model M2 ...] [--host 127.0.0.1] [--port 7860] [--api-auth USER:PASS]

An AUTOMATIC1111-compatible HTTP API (/sdapi/v1/...) and a web page at /, on FastAPI + uvicorn. Mistakes in
the command line end with one `error:` line and exit status 2, before anything listens.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import warnings

from fastsd.cli import (ArgumentParser, HelpFormatter, add_backend_arg, fail, one_line_warnings, positive_int,
                        run_summary, set_threads, thread_count)
from fastsd.serve.limits import Limits

TOKEN_ENV = "FASTSD_SERVE_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    d = Limits()
    p = ArgumentParser(prog="python -m fastsd.serve", formatter_class=HelpFormatter,
                       description="AUTOMATIC1111-compatible HTTP API and web page for fastsd.")
    p.add_argument("--model", action="append", default=None, help="a model to serve (repeatable; the first is the "
                   "default): what python -m fastsd.generate --model takes; default $FASTSD_MODEL")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --api-auth or "
                   "--token")
    p.add_argument("--port", type=int, default=7860, help="port (0: a free one, printed at start)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS", help="HTTP basic credentials for /sdapi (A1111's "
                   "flag; several separated by commas)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token for /sdapi (default ${TOKEN_ENV})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="jobs that may wait behind the running one; "
                   "more are answered 503 with Retry-After")
    p.add_argument("--max-size", type=positive_int, default=d.max_side,
                   help="largest width/height, pixels (above 4096, as the CLI's --allow-large)")
    p.add_argument("--max-steps", type=positive_int, default=d.max_steps, help="most sampler steps per request")
    p.add_argument("--max-batch", type=positive_int, default=d.max_images, help="most images per request "
                   "(batch_size x n_iter)")
    p.add_argument("--max-body-mb", type=positive_int, default=d.max_body >> 20, help="largest request body, MiB")
    p.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels,
                   help="largest decoded init image or mask, pixels (larger ones, bombs included, are refused)")
    p.add_argument("--lora-dir", default=os.environ.get("FASTSD_LORA_DIR"), help="folder of LoRAs that prompts may "
                   "name as <lora:NAME:WEIGHT> (default $FASTSD_LORA_DIR)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA merged for good into every --model at start (repeatable; e.g. an LCM-LoRA): no copy of "
                   "the weights is kept, prompts need no tag for it, and --lora-dir LoRAs switch on top of it")
    p.add_argument("--embeddings-dir", default=os.environ.get("FASTSD_EMBEDDINGS_DIR"), help="folder of "
                   "textual-inversion embeddings that prompts use by name (default $FASTSD_EMBEDDINGS_DIR)")
    p.add_argument("--upscaler-dir", default=os.environ.get("FASTSD_UPSCALER_DIR"), metavar="DIR",
                   help="folder of upscaler models (ESRGAN, Real-ESRGAN, SwinIR .pth / .safetensors; A1111's "
                   "models/ESRGAN) "
                   "that hr_upscaler and the Extras tab name by file name; GET /sdapi/v1/upscalers lists them "
                   "(default $FASTSD_UPSCALER_DIR)")
    p.add_argument("--vae-dir", default=os.environ.get("FASTSD_VAE_DIR"), metavar="DIR",
                   help="folder of VAE files (.safetensors / .ckpt / .pt; A1111's models/VAE) that the sd_vae option "
                   "(POST /sdapi/v1/options, override_settings) names by file name; GET /sdapi/v1/sd-vae lists them "
                   "(default $FASTSD_VAE_DIR)")
    p.add_argument("--styles-file", default=os.environ.get("FASTSD_STYLES"), metavar="PATH",
                   help="A1111's prompt styles, read at start: a styles.csv (name,prompt,negative_prompt) or a folder "
                   "of such .csv files; requests name them in `styles`, GET /sdapi/v1/prompt-styles lists them "
                   "(default $FASTSD_STYLES)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="as python -m fastsd.generate")
    add_backend_arg(p)
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: the physical cores)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="what the server logs (uvicorn's and fastsd's)")
    return p


def check_args(args: argparse.Namespace):
    """The parts of the command line that need no model, checked first: (limits, auth, models)."""
    from fastsd.serve.auth import Auth, is_loopback

    auth = Auth.parse(args.api_auth, args.token)
    if auth is None and not is_loopback(args.host):
        raise ValueError(f"--host {args.host} is not a loopback address: anyone who can reach it could use this "
                         "server; add --api-auth USER:PASS or --token TOKEN (or bind 127.0.0.1)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be at least 0, got {args.max_queue}")
    for flag, folder in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir),
                         ("--upscaler-dir", args.upscaler_dir), ("--vae-dir", args.vae_dir)):
        if folder and not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder}: not a folder")
    if args.styles_file:
        from fastsd.styles import read_styles

        args.styles, notes = read_styles(args.styles_file)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
    else:
        args.styles = {}
    limits = Limits(max_side=args.max_size, max_steps=args.max_steps, max_images=args.max_batch,
                    max_body=args.max_body_mb << 20, max_image_pixels=args.max_image_pixels, max_queue=args.max_queue)
    if args.model:
        models = args.model
    else:
        from fastsd.generate import default_model

        models = [default_model()]
    return limits, auth, models


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: can't listen there ({e.strerror})") from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    one_line_warnings()
    try:
        limits, auth, sources = check_args(args)
    except ValueError as e:
        return fail(str(e))
    from fastsd import BackendError, CheckpointError

    try:
        state = _start(args, limits, auth, sources)
        sock = bind(args.host, args.port)
    except (ValueError, TypeError, CheckpointError, BackendError) as e:
        return fail(str(e))
    state.cmd_flags = cmd_flags(args, sock.getsockname()[1], str(state.registry.current.pipe.device))
    return _serve(state, sock, args.log_level)


def cmd_flags(args, port: int, device: str) -> dict:
    """GET /sdapi/v1/cmd-flags: the command line under A1111's names where it has them; never the credentials or
    the server's paths (its folders are listed by name: /loras, /embeddings, /sd-vae, ...)."""
    return {"api": True, "nowebui": False, "listen": args.host not in ("127.0.0.1", "localhost", "::1"),
            "server_name": args.host, "port": port, "use_cpu": ["all"] if device == "cpu" else [], "api_auth": None,
            "fastsd": {"device": device, "dtype": args.dtype, "threads": args.threads, "max_queue": args.max_queue,
                       "max_size": args.max_size, "max_steps": args.max_steps, "max_batch": args.max_batch}}


def _start(args, limits: Limits, auth, sources: list[str]):
    """Load the models, read the folders, start the worker: the server's state."""
    from fastsd.backends.cpu_pack import release_freed_memory
    from fastsd.serve.app import ServerState
    from fastsd.serve.jobqueue import JobQueue
    from fastsd.serve.networks import Networks
    from fastsd.serve.registry import Registry, load_entries
    from fastsd.serve.upscalers import Upscalers
    from fastsd.serve.vaes import Vaes

    threads = set_threads(args.threads)
    from PIL import Image

    # request images are checked against --max-image-pixels before decoding; PIL's own warning adds nothing
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    from fastsd.generate import lora_files

    base = lora_files(args, "")  # --lora FILE[:WEIGHT]: the files are there before a model loads
    registry = Registry(load_entries(sources, device=args.device, dtype=args.dtype, backend=args.backend))
    for e in registry.entries:
        e.pipe.load_loras(base, keep_originals=False)
        loras = f", LoRA {', '.join(f'{x.name}:{x.weight}' for x in e.pipe.loras)} merged for good" if base else ""
        print(run_summary(e.pipe, threads, loras), file=sys.stderr)
    networks = Networks(args.lora_dir, args.embeddings_dir,
                        base=[(x.name, x.weight) for x in registry.entries[0].pipe.loras])
    for name, why in networks.load_embeddings([e.pipe for e in registry.entries]).items():
        print(f"warning: embedding {name} skipped: {why}", file=sys.stderr)
    vaes = Vaes(args.vae_dir, [e.pipe.path for e in registry.entries if e.pipe.path and os.path.isfile(e.pipe.path)])
    vaes.start(registry.entries)  # (A1111's "Automatic" VAE beside a model: checked and built now)
    return ServerState(registry, networks, limits, JobQueue(limits.max_queue, after_job=release_freed_memory), auth,
                       styles=args.styles, upscalers=Upscalers(args.upscaler_dir), vaes=vaes)


def _serve(state, sock: socket.socket, log_level: str) -> int:
    import uvicorn

    from fastsd.serve.app import build_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(build_app(state), log_level=log_level, timeout_graceful_shutdown=5,
                            limit_concurrency=4 * state.limits.max_queue + 64)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.queue.close()  # stop the running job first: a request waiting for it would hold the shutdown
            super().handle_exit(sig, frame)

    server = Server(config)
    print(f"fastsd.serve: listening on http://{shown}:{port} (models: "
          f"{', '.join(e.title for e in state.registry.entries)})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        state.queue.close()
        state.queue.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
