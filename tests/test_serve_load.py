"""The queue under load: 40 concurrent txt2img requests against --max-queue 16 (each gets its images or a
503 with Retry-After, none hangs, the server's RSS comes back, it still generates); /interrupt stops the
running job at its next step; a client that goes away mid-generation or while queued frees the worker."""
import concurrent.futures
import gc
import signal
import threading
import time

import httpx
import numpy as np
from serve_server import decode, info, main_server

STORM = {"prompt": "a lighthouse at night", "steps": 2, "cfg_scale": 1, "width": 64, "height": 64, "seed": 5}
LONG = {"prompt": "a long job", "steps": 150, "width": 256, "height": 256, "seed": 1}  # > 3 s on a fast CPU
REQUEST_TIMEOUT = 300  # s: the storm's last accepted job waits for the 16 before it


def wait_idle(client: httpx.Client, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["job_count"] == 0 and p["state"]["queued"] == 0:
            return p
        time.sleep(0.1)
    raise AssertionError(f"the server is still busy after {timeout} s: {p}")


def wait_running(client: httpx.Client, min_step: int = 1, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["job"] and p["state"]["sampling_step"] >= min_step:
            return p
        time.sleep(0.05)
    raise AssertionError(f"no job reached step {min_step} in {timeout} s")


def test_storm_of_40_requests_with_max_queue_16():
    server = main_server()
    with server.client() as c:
        for _ in range(3):  # warm-up: allocator, oneDNN primitives, PNG encoder
            assert c.post("/sdapi/v1/txt2img", json=STORM).status_code == 200
        wait_idle(c)
        rss_warm = server.rss_kib()

    def one(i: int):
        t = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT) as c:
            r = c.post("/sdapi/v1/txt2img", json={**STORM, "seed": 100 + i})
        return r, time.monotonic() - t

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    ok = [r for r, _ in results if r.status_code == 200]
    busy = [r for r, _ in results if r.status_code == 503]
    assert len(ok) + len(busy) == 40, [r.status_code for r, _ in results]
    assert len(ok) >= 17 and busy, (len(ok), len(busy))  # the running job + 16 waiting at least; the rest refused
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1 and "the queue is full" in r.json()["detail"]
    for r in ok:
        seed = info(r)["seed"]
        assert decode(r.json()["images"][0]).size == (64, 64) and 100 <= seed < 140
    print(f"storm: {len(ok)} served, {len(busy)} refused with 503; slowest answer "
          f"{max(t for _, t in results):.1f} s")

    with server.client() as c:
        wait_idle(c)
        gc.collect()
        time.sleep(0.5)
        rss_after = server.rss_kib()
        print(f"server RSS: {rss_warm / 1024:.0f} MiB after warm-up, {rss_after / 1024:.0f} MiB after the storm")
        assert rss_after <= 1.10 * rss_warm, (rss_warm, rss_after)
        r = c.post("/sdapi/v1/txt2img", json=STORM)  # still generating after the storm
        assert r.status_code == 200 and decode(r.json()["images"][0]).size == (64, 64)


def test_interrupt_stops_the_running_job_with_live_previews():
    server = main_server()
    out = {}
    with server.client() as c:
        wait_idle(c)
        def post():
            with server.client() as own:
                out["r"] = own.post("/sdapi/v1/txt2img", json=LONG)

        t = threading.Thread(target=post, daemon=True)
        t.start()
        p = wait_running(c, min_step=2)
        assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 150 and p["eta_relative"] > 0
        preview = decode(p["current_image"])  # the live preview: latents -> RGB, at latent size
        assert preview.size[0] == preview.size[1] < 64 and np.asarray(preview).std() > 0
        assert c.post("/sdapi/v1/interrupt").json() == {}
        t.join(timeout=60)
        assert not t.is_alive(), "the interrupted request did not return"
        r = out["r"]
        assert r.status_code == 200
        meta = info(r)  # as A1111: the interrupted iteration's half-denoised image comes back
        (note,) = [w for w in meta["warnings"] if w.startswith("interrupted at step")]
        assert meta["interrupted"] is True and "its 1 image(s) are that step's prediction" in note
        (half,) = r.json()["images"]
        assert decode(half).size == (LONG["width"], LONG["height"]) and len(meta["infotexts"]) == 1
        done = wait_idle(c)["state"]["fastsd"]
        assert done["interrupted"] >= 1
        assert c.post("/sdapi/v1/txt2img", json=STORM).status_code == 200  # the next job runs normally


def test_progress_state_counts_the_iterations_as_a1111():
    """A1111's progress state for a running n_iter job: job_count its iterations, job_no the running one, job "Batch
    i out of n", job_timestamp its start; fastsd's "queued" the jobs waiting behind it."""
    server = main_server()
    with server.client() as c:
        wait_idle(c)
        def post():
            with server.client() as own:
                own.post("/sdapi/v1/txt2img", json={**LONG, "n_iter": 2})

        t = threading.Thread(target=post, daemon=True)
        t.start()
        st = wait_running(c, min_step=1)["state"]
        assert (st["job_count"], st["job_no"], st["job"], st["queued"]) == (2, 0, "Batch 1 out of 2", 0), st
        assert len(st["job_timestamp"]) == 14 and st["job_timestamp"].isdigit()
        c.post("/sdapi/v1/interrupt")
        t.join(timeout=60)
        assert not t.is_alive()
        assert wait_idle(c)["state"]["job_count"] == 0


def test_client_that_disconnects_frees_the_worker():
    server = main_server()
    with server.client() as c:
        counts = wait_idle(c)["state"]["fastsd"]
        dropped, cancelled = counts.get("dropped", 0), counts.get("cancelled", 0)

        def gone(timeout: float):
            try:
                with httpx.Client(base_url=server.url, timeout=timeout) as quitter:
                    quitter.post("/sdapi/v1/txt2img", json=LONG)
            except httpx.TimeoutException:
                pass  # the client gives up and closes its connection

        running = threading.Thread(target=gone, args=(30,), daemon=True)
        running.start()
        wait_running(c, min_step=1)
        gone(1.0)  # a second client whose job is still queued behind the first when it leaves
        time.sleep(1.0)  # the server looks for gone clients every 0.25 s
        c.post("/sdapi/v1/interrupt")  # let the first job end; its own client then finds it done
        running.join(timeout=60)
        counts = wait_idle(c)["state"]["fastsd"]
        assert counts.get("dropped", 0) == dropped + 1  # the queued job was dropped, never run
        assert counts.get("cancelled", 0) == cancelled

        leaving = threading.Thread(target=gone, args=(3.0,), daemon=True)  # one that leaves mid-generation
        leaving.start()
        seen = wait_running(c, min_step=1)["state"]["sampling_step"]
        leaving.join()
        t = time.monotonic()
        counts = wait_idle(c, timeout=60)["state"]["fastsd"]
        assert counts.get("cancelled", 0) == cancelled + 1, counts  # stopped by its on_step, before step 150
        print(f"client gone (job seen at step {seen} of 150): the worker was free {time.monotonic() - t:.1f} s later")
        r = c.post("/sdapi/v1/txt2img", json=STORM)
        assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_shutdown_answers_the_running_request_503():
    """SIGTERM stops the running job at its next step: its request gets a 503 (as the waiting ones; nothing
    decoded for it, see test_serve_robust), and the server exits without a traceback."""
    from serve_server import MAIN_ARGS, Server

    server = Server(list(MAIN_ARGS))
    try:
        got = []
        with server.client() as c:
            asker = threading.Thread(target=lambda: got.append(c.post("/sdapi/v1/txt2img", json=LONG)), daemon=True)
            asker.start()
            wait_running(c, min_step=1)
            server.proc.send_signal(signal.SIGTERM)
            asker.join(timeout=60)
        (r,) = got
        assert r.status_code == 503 and r.json()["detail"] == "the server is shutting down"
        assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn ends by re-raising the signal
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()


def test_progress_has_a1111s_current_task_job_name_and_floor():
    """A1111's progressapi: progress 0.01 + the done part from the job's start (a running job never reads 0, an idle
    server's sign), state.job "scripts_txt2img" (its state.begin of the API), current_task the running task's id
    (force_task_id, else one made as A1111's create_task_id), null when idle."""
    import re

    server = main_server()
    with server.client() as c:
        assert wait_idle(c)["current_task"] is None
        for task, want in (("task(mine)", r"task\(mine\)"), (None, r"task\(txt2img-[A-Z0-9]{7}\)")):
            def post():
                with server.client() as own:
                    own.post("/sdapi/v1/txt2img", json={**LONG, "force_task_id": task})

            t = threading.Thread(target=post, daemon=True)
            t.start()
            p = wait_running(c, min_step=0)
            st = p["state"]
            assert st["job"] == "scripts_txt2img" and re.fullmatch(want, p["current_task"]), p
            assert 0.01 <= p["progress"] <= 0.01 + (st["sampling_step"] + 1) / st["sampling_steps"], p
            c.post("/sdapi/v1/interrupt")
            t.join(timeout=60)
            assert not t.is_alive()
        assert wait_idle(c)["current_task"] is None


def test_progress_current_image_is_in_the_requests_own_samples_format():
    """/progress current_image in the running request's override_settings samples_format (A1111 sets its opts for
    the request, and its progressapi encodes the preview with them), else the server's option (PNG)."""
    server = main_server()
    with server.client() as c:
        wait_idle(c)
        for over, kind in (({"samples_format": "jpg"}, "JPEG"), ({"samples_format": "webp"}, "WEBP"), ({}, "PNG")):
            def post():
                with server.client() as own:
                    own.post("/sdapi/v1/txt2img", json={**LONG, "override_settings": over})

            t = threading.Thread(target=post, daemon=True)
            t.start()
            p = wait_running(c, min_step=2)
            assert decode(p["current_image"]).format == kind, over
            c.post("/sdapi/v1/interrupt")
            t.join(timeout=60)
            assert not t.is_alive()
        wait_idle(c)
