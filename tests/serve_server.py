"""A real `python -m fastsd.serve` on a free loopback port, for the serve tests (one process per set of
arguments, shared by the test modules of a session and stopped at exit)."""
from __future__ import annotations

import atexit
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from PIL import Image

STARTUP_TIMEOUT = 240  # s; loading random:tiny takes a few seconds on free cores
_running: dict[tuple[str, ...], Server] = {}


class Server:
    def __init__(self, args: list[str]):
        self.log = tempfile.NamedTemporaryFile(prefix="fastsd-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "fastsd.serve", "--port", "0", "--threads", "1", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = self._wait_listening()
        self.pid = self.proc.pid

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "listening on " in line:
                return line.split("listening on ")[1].split()[0]
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"fastsd.serve did not start; its log:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


def shared(*args: str) -> Server:
    """The running server for these arguments, started on first use."""
    if args not in _running:
        _running[args] = Server(list(args))
    server = _running[args]
    if server.proc.poll() is not None:
        raise RuntimeError(f"the fastsd.serve process died; its log:\n{server.log_text()[-3000:]}")
    return server


@atexit.register
def _stop_all() -> None:
    for server in _running.values():
        server.stop()
    for folder in (LORA_DIR, EMBEDDINGS_DIR, STYLES_DIR, VAE_DIR):
        shutil.rmtree(folder, ignore_errors=True)


LORA_DIR = tempfile.mkdtemp(prefix="fastsd-serve-loras-")
for _name in ("detail.safetensors", "style.pt"):
    open(os.path.join(LORA_DIR, _name), "wb").close()
EMBEDDINGS_DIR = tempfile.mkdtemp(prefix="fastsd-serve-embeddings-")


def _write_embedding() -> None:
    """An A1111 .safetensors embedding (`emb_params`, 2 vectors) as wide as random:tiny's text encoder."""
    import torch
    from safetensors.torch import save_file

    from fastsd.config import TINY

    gen = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, TINY.clip.hidden_size, generator=gen)},
              os.path.join(EMBEDDINGS_DIR, "shinystyle.safetensors"))


_write_embedding()
MAIN_ARGS = ("--model", "random:tiny", "--model", "random:tiny-inpainting", "--max-queue", "16",
             "--lora-dir", LORA_DIR, "--embeddings-dir", EMBEDDINGS_DIR)


def main_server() -> Server:
    """The server most serve tests share: two tiny models, --max-queue 16, a LoRA folder."""
    return shared(*MAIN_ARGS)


STYLES_DIR = tempfile.mkdtemp(prefix="fastsd-serve-styles-")
# A1111 styles.csv files (a folder of them, as A1111's styles folder): a.csv is read before b.csv, whose "dup" wins
STYLES_CSV = {
    "a.csv": 'name,prompt,negative_prompt\nframed,"a photo of {prompt}, 35mm","blurry, lowres"\n'
             'inked,"ink drawing <lora:detail:0.5>",\ndup,first,\n',
    "b.csv": "name,prompt,negative_prompt\nplain,oil painting,ugly\ndup,second,\n",
}
for _name, _text in STYLES_CSV.items():
    with open(os.path.join(STYLES_DIR, _name), "w", encoding="utf-8") as _f:
        _f.write(_text)


def styles_server() -> Server:
    """A server with --styles-file (STYLES_DIR: the styles of STYLES_CSV) and the LoRA folder."""
    return shared("--model", "random:tiny", "--lora-dir", LORA_DIR, "--styles-file", STYLES_DIR)


VAE_DIR = tempfile.mkdtemp(prefix="fastsd-serve-vaes-")


def vae_server() -> Server:
    """A server with --vae-dir (VAE_DIR: one random VAE file for random:tiny, vae-ft-mse.safetensors)."""
    path = os.path.join(VAE_DIR, "vae-ft-mse.safetensors")
    if not os.path.exists(path):
        import torch
        from safetensors.torch import save_file

        from fastsd.config import TINY
        from fastsd.models.vae import AutoencoderKL

        torch.manual_seed(21)
        save_file({k: v.contiguous() for k, v in AutoencoderKL(TINY.vae).state_dict().items()}, path)
    return shared("--model", "random:tiny", "--vae-dir", VAE_DIR)


def auth_server() -> Server:
    """A server that wants credentials: HTTP basic alice:s3cret, or the bearer token tok123."""
    return shared("--model", "random:tiny", "--api-auth", "alice:s3cret", "--token", "tok123")


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def info(response: httpx.Response) -> dict:
    return json.loads(response.json()["info"])


@contextlib.contextmanager
def started(*argv: str):
    """The server's state as `python -m fastsd.serve --model random:tiny --dtype fp32 ARGV...` makes it (its models
    loaded, its worker running), in this process; the worker stopped and the thread count put back after."""
    import torch

    from fastsd.serve.__main__ import _start, build_parser, check_args

    threads = torch.get_num_threads()
    args = build_parser().parse_args(["--model", "random:tiny", "--dtype", "fp32", "--threads", str(threads), *argv])
    st = _start(args, *check_args(args))
    try:
        yield st
    finally:
        st.queue.close()
        st.queue.join(10)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def in_process(state):
    """fastsd.serve's app for `state` (a ServerState) on a real uvicorn in this process, on a free loopback port;
    yields the port, stops the server after."""
    import uvicorn

    from fastsd.serve.__main__ import bind
    from fastsd.serve.app import build_app

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
