"""fastsd.serve's job queue on its own (no model): FIFO order, the bound, a failing job, a job whose client
left while it waited, and on_step stopping a running job."""
import threading
import time

import pytest

from fastsd import Interrupted
from fastsd.serve.jobqueue import Job, JobQueue, QueueFull


def blocked_job(order: list, name: str, gate: threading.Event, started: threading.Event | None = None) -> Job:
    return Job("txt2img", lambda job: (started and started.set(), gate.wait(10), order.append(name), name)[3])


def test_fifo_bound_and_failures():
    q, gate, order, started = JobQueue(max_queue=2), threading.Event(), [], threading.Event()
    jobs = [q.submit(blocked_job(order, "a", gate, started))]
    assert started.wait(10)  # "a" runs; two may wait behind it
    jobs += [q.submit(blocked_job(order, n, gate)) for n in "bc"]
    with pytest.raises(QueueFull) as e:
        q.submit(blocked_job(order, "d", gate))
    assert e.value.retry_after >= 1 and "the queue is full (2 jobs waiting)" in str(e.value)
    gate.set()
    assert [j.future.result(timeout=10) for j in jobs] == ["a", "b", "c"] and order == ["a", "b", "c"]
    failing = q.submit(Job("txt2img", lambda job: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        failing.future.result(timeout=10)
    assert q.submit(Job("txt2img", lambda job: "after")).future.result(timeout=10) == "after"  # the worker goes on
    assert dict(q.counts) == {"finished": 4, "failed": 1, "refused": 1}
    q.close()
    q.join(10)


def test_max_queue_zero_still_runs_one_job():
    q = JobQueue(max_queue=0)
    assert q.submit(Job("txt2img", lambda job: 7)).future.result(timeout=10) == 7
    q.close()


def test_cancel_drops_a_waiting_job_and_stops_a_running_one():
    q, started = JobQueue(max_queue=4), threading.Event()

    def steps(job: Job):
        started.set()
        for i in range(1, 1000):
            try:
                job.on_step(i, 999, None)
            except Interrupted:
                return f"stopped at {i}"
            time.sleep(0.01)
        return "ran to the end"

    running = q.submit(Job("txt2img", steps, steps=999))
    started.wait(10)
    waiting = q.submit(Job("txt2img", lambda job: "ran"))
    q.cancel(waiting)
    assert waiting.future.cancelled()
    current, queued = q.snapshot()
    assert current is running and queued == 0 and 0 <= current.step < 999
    q.cancel(running)
    assert running.future.result(timeout=10).startswith("stopped at")
    q.submit(Job("txt2img", lambda job: None)).future.result(timeout=10)
    assert q.counts["dropped"] == 1 and q.counts["cancelled"] == 1
    q.close()
