"""Per-task progress, the A1111 way: a request's force_task_id names its job, and POST /internal/progress answers
for that task only (waiting with the jobs ahead of it, running with its progress and live preview, or finished)."""
import base64
import io
import threading
import time

from PIL import Image
from serve_server import auth_server, info, main_server

from fastsd.serve.jobqueue import Job, JobQueue

LONG = {"prompt": "a long job", "steps": 150, "width": 256, "height": 256, "seed": 1}  # > 3 s on a fast CPU
SMALL = {"prompt": "a small job", "steps": 1, "width": 64, "height": 64, "seed": 3}
FIELDS = {"active", "queued", "completed", "progress", "eta", "live_preview", "id_live_preview", "textinfo",
          "jobs_ahead"}


def test_queue_tells_a_task_from_the_others():
    q, gate, started = JobQueue(max_queue=4), threading.Event(), threading.Event()
    running = q.submit(Job("txt2img", lambda job: (started.set(), gate.wait(10)), task_id="a"))
    assert started.wait(10)
    q.submit(Job("txt2img", lambda job: None))  # an API client's job, without a task id
    waiting = q.submit(Job("txt2img", lambda job: None, task_id="b"))
    assert q.task("a") == (running, None, False)
    assert q.task("b") == (None, 2, False)  # behind the running job and the other waiting one
    assert q.task("nobody") == (None, None, False)
    gate.set()
    waiting.future.result(timeout=10)
    assert q.task("a") == (None, None, True) and q.task("b") == (None, None, True)
    q.close()
    q.join(10)


def progress(c, task, **kw):
    r = c.post("/internal/progress", json={"id_task": task, "id_live_preview": -1, "live_preview": True, **kw})
    assert r.status_code == 200, r.text
    assert set(r.json()) == FIELDS
    return r.json()


def test_internal_progress_follows_each_task():
    server = main_server()
    out = {}

    def post(name, body):
        with server.client() as own:
            out[name] = own.post("/sdapi/v1/txt2img", json=body)

    with server.client() as c:
        unknown = progress(c, "task(nobody)")
        assert unknown == {"active": False, "queued": False, "completed": False, "progress": None, "eta": None,
                           "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting...", "jobs_ahead": None}
        a = threading.Thread(target=post, args=("a", {**LONG, "force_task_id": "task(a)"}), daemon=True)
        a.start()
        deadline = time.monotonic() + 120
        while not ((p := progress(c, "task(a)"))["active"] and p["progress"] > 0 and p["live_preview"]):
            assert time.monotonic() < deadline, p
            time.sleep(0.05)
        assert 0 < p["progress"] < 1 and p["eta"] > 0 and p["id_live_preview"] > 0 and not p["queued"]
        assert p["textinfo"].startswith("step ") and p["live_preview"].startswith("data:image/png;base64,")
        preview = Image.open(io.BytesIO(base64.b64decode(p["live_preview"].split(",", 1)[1])))
        assert preview.size[0] < 64
        assert progress(c, "task(a)", live_preview=False)["live_preview"] is None
        b = threading.Thread(target=post, args=("b", {**SMALL, "force_task_id": "task(b)"}), daemon=True)
        b.start()
        while not (q := progress(c, "task(b)"))["queued"]:
            assert time.monotonic() < deadline, q
            time.sleep(0.05)
        assert (q["active"], q["completed"], q["progress"], q["jobs_ahead"], q["textinfo"]) == (
            False, False, None, 1, "In queue: 1 job ahead")
        assert c.get("/sdapi/v1/progress").json()["state"]["queued"] == 1  # /sdapi/v1/progress: as before
        c.post("/sdapi/v1/interrupt")  # the running job: task(a)'s
        a.join(60)
        b.join(60)
        assert info(out["a"])["interrupted"] is True and info(out["b"])["interrupted"] is False
        for task in ("task(a)", "task(b)"):
            done = progress(c, task)
            assert (done["active"], done["queued"], done["completed"]) == (False, False, True)


def test_internal_progress_wants_the_api_credentials():
    with auth_server().client() as c:
        body = {"id_task": "task(x)"}
        assert c.post("/internal/progress", json=body).status_code == 401
        assert c.post("/internal/progress", json=body, auth=("alice", "s3cret")).json()["textinfo"] == "Waiting..."


def test_a_seed_above_2_53_sent_as_text_is_kept_exactly():
    """JSON numbers above 2**53 lose digits in a browser: the page sends such a seed as a string."""
    with main_server().client() as c:
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": "9007199254740993", "batch_size": 2})
        assert r.status_code == 200, r.text
        meta = info(r)
        assert meta["all_seeds"] == [9007199254740993, 9007199254740994]
        assert "Seed: 9007199254740993," in meta["infotexts"][0]
