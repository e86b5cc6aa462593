"""The server side of the page's buttons, over HTTP: /sdapi/v1/interrupt and /skip with fastsd's optional body
`{"id_task": ID}` stop only the running request of that task (the page's own job, never another client's);
without a body (or with `{}`) they stop whichever request runs, as A1111's."""
import json
import threading
import time

from serve_server import main_server

LONG = {"prompt": "a long job", "steps": 150, "width": 64, "height": 64, "seed": 1}


def start(server, body: dict) -> tuple[threading.Thread, dict]:
    """POST txt2img in a thread; returns once the job has made a step (its answer lands in out["r"])."""
    out = {}

    def post():
        with server.client() as c:
            out["r"] = c.post("/sdapi/v1/txt2img", json=body)

    t = threading.Thread(target=post, daemon=True)
    t.start()
    with server.client() as c:
        deadline = time.monotonic() + 120
        while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline and t.is_alive(), out
            time.sleep(0.05)
    return t, out


def running_task(c) -> str | None:
    return c.get("/sdapi/v1/progress").json()["current_task"]


def test_interrupt_with_a_task_id_stops_only_that_task():
    server = main_server()
    t, out = start(server, {**LONG, "force_task_id": "task(mine)"})
    with server.client() as c:
        assert c.post("/sdapi/v1/interrupt", json={"id_task": "task(someone-else)"}).status_code == 200
        assert c.post("/sdapi/v1/skip", json={"id_task": "task(someone-else)"}).status_code == 200
        time.sleep(0.5)  # several steps: still running, neither interrupted nor skipped
        p = c.get("/sdapi/v1/progress").json()
        assert p["current_task"] == "task(mine)" and not p["state"]["interrupted"] and not p["state"]["skipped"]
        assert c.post("/sdapi/v1/interrupt", json={"id_task": "task(mine)"}).json() == {}
        t.join(60)
    info = json.loads(out["r"].json()["info"])
    assert out["r"].status_code == 200 and info["interrupted"] is True


def test_skip_with_a_task_id_skips_that_tasks_iteration():
    server = main_server()
    t, out = start(server, {**LONG, "n_iter": 2, "steps": 40, "force_task_id": "task(skipper)"})
    with server.client() as c:
        assert c.post("/sdapi/v1/skip", json={"id_task": "task(skipper)"}).status_code == 200
        t.join(120)
    r = out["r"]
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and len(r.json()["images"]) == 2 and info["interrupted"] is False
    assert any("skip" in w for w in info["warnings"]), info["warnings"]


def test_interrupt_without_a_body_or_with_an_empty_one_is_a1111s_global_interrupt():
    server = main_server()
    for body in (None, {}):
        t, out = start(server, LONG)  # (a task id the server made)
        with server.client() as c:
            assert running_task(c).startswith("task(txt2img-")
            r = c.post("/sdapi/v1/interrupt") if body is None else c.post("/sdapi/v1/interrupt", json=body)
            assert r.status_code == 200 and r.json() == {}
            t.join(60)
        assert json.loads(out["r"].json()["info"])["interrupted"] is True
    with server.client() as c:  # idle: nothing to stop, still answered
        assert c.post("/sdapi/v1/interrupt", json={"id_task": "task(gone)"}).json() == {}
        assert c.post("/sdapi/v1/skip").status_code == 200
        assert c.post("/sdapi/v1/interrupt", json={"id_task": 5}).status_code == 422  # not a task id
