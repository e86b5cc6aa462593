"""The job queue: one worker thread runs jobs one at a time in arrival order (FIFO); at most `max_queue`
jobs wait behind the running one, and a job beyond that is refused at once (`QueueFull`, answered 503 with
Retry-After). One generation at a time serves a small machine best: two at once would only share its cores
and double the memory.

A job stops at its next sampler step when interrupted (/sdapi/v1/interrupt) or when its client went away
(`cancel`): its `on_step` raises `fastsd.Interrupted`. A cancelled job that has not started never runs.
/sdapi/v1/skip raises it the same way, once: the job's runner leaves the current iteration and goes on.
A runner that sees its job cancelled raises `Cancelled` instead: nobody is left to read what it would return.

A job may carry its client's task id (A1111's force_task_id): `task` tells that client whether its job waits (and
behind how many), runs, or finished lately (A1111's /internal/progress).
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """A job stopped because its client went away or the server stops: it returns nothing."""


@dataclass(eq=False)
class Job:
    kind: str                                  # "txt2img" / "img2img": A1111's state "job"
    run: Callable[[Job], Any]                # called on the worker thread; its result resolves `future`
    steps: int = 0                             # sampler steps per iteration (for progress)
    iterations: int = 1
    task_id: str | None = None                 # A1111's force_task_id: the client's name for its job
    image_format: tuple[str, int] | None = None  # (samples_format, jpeg_quality) of its previews; None: the server's
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    # written by the worker thread, read by /progress
    iteration: int = 0
    step: int = 0
    preview: Image.Image | None = None
    preview_id: int = 0                        # counts the previews (A1111's id_live_preview)
    started: float | None = None
    interrupted: bool = False                  # /sdapi/v1/interrupt
    skipped: bool = False                      # /sdapi/v1/skip: the current iteration only (cleared at each)
    cancelled: bool = False                    # the client went away
    halted: bool = False                       # on_step stopped it (for either reason)

    def on_step(self, step: int, total: int, preview: Image.Image) -> None:
        """Pipeline.generate's on_step: records progress; raises to stop the job."""
        self.step, self.steps, self.preview = step, total, preview
        self.preview_id += 1
        if self.stopped or self.skipped:
            from fastsd import Interrupted

            self.halted = self.halted or self.stopped
            raise Interrupted("interrupted" if self.interrupted else "client disconnected" if self.cancelled
                              else "skipped")

    @property
    def stopped(self) -> bool:
        return self.interrupted or self.cancelled


class JobQueue:
    def __init__(self, max_queue: int, after_job: Callable[[], None] | None = None):
        self.max_queue = max_queue
        self._after_job = after_job
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._closed = False
        self._mean_seconds = 5.0               # running mean of job durations, for Retry-After
        # finished; interrupted / cancelled (stopped while running: /interrupt / client gone); dropped (client gone
        # while waiting, never ran); refused (queue full); failed (raised)
        self.counts = collections.Counter()
        self._finished: collections.deque[str] = collections.deque(maxlen=256)  # task ids of the last jobs run
        self._thread = threading.Thread(target=self._work, name="fastsd-worker", daemon=True)
        self._thread.start()

    # ---- the request side ------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise QueueFull(len(self._waiting), 5)
            if len(self._waiting) >= self.max_queue + (self._running is None):  # an idle worker takes one more
                self.counts["refused"] += 1
                raise QueueFull(len(self._waiting), self.retry_after())
            self._waiting.append(job)
            self._cond.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the running job's expected time (the mean of
        past jobs), at least 1."""
        return max(1, math.ceil(self._mean_seconds))

    def interrupt(self, task_id: str | None = None) -> bool:
        """Stop the running job at its next step (A1111's interrupt: queued jobs still run); with `task_id`, only if
        the running job is that task."""
        with self._cond:
            job = self._running
            if job is not None and task_id is not None and job.task_id != task_id:
                job = None
            if job is not None:
                job.interrupted = True
            return job is not None

    def skip(self, task_id: str | None = None) -> bool:
        """Stop the running job's current iteration at its next step; the job goes on with the next (A1111's skip);
        with `task_id`, only if the running job is that task."""
        with self._cond:
            job = self._running
            if job is not None and task_id is not None and job.task_id != task_id:
                job = None
            if job is not None:
                job.skipped = True
            return job is not None

    def cancel(self, job: Job) -> None:
        """The client of `job` went away: drop it if it waits, stop it at the next step if it runs."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()
                self.counts["dropped"] += 1

    def close(self) -> None:
        """Stop taking jobs, drop the waiting ones and stop the running one at its next step."""
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> tuple[Job | None, int]:
        """(the running job, the number of jobs waiting)."""
        with self._cond:
            return self._running, len(self._waiting)

    def task(self, task_id: str) -> tuple[Job | None, int | None, bool]:
        """The job of a task id (A1111's force_task_id): (the job if it runs now, the number of jobs ahead of it
        (the running one included) if it waits, whether it finished lately)."""
        with self._cond:
            if self._running is not None and self._running.task_id == task_id:
                return self._running, None, False
            for i, job in enumerate(self._waiting):
                if job.task_id == task_id:
                    return None, i + (self._running is not None), False
            return None, None, task_id in self._finished

    # ---- the worker ------------------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            self._running = job
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            job.started = time.monotonic()
            outcome, ran, result, error = "finished", False, None, None
            try:
                if job.future.set_running_or_notify_cancel():
                    ran, result = True, job.run(job)
            except BaseException as e:  # handed to the waiting request, which answers for it; the worker goes on
                outcome, error = "failed", e
            if job.halted:
                outcome = "cancelled" if job.cancelled else "interrupted"
            with self._cond:
                self._running = None
                self.counts[outcome] += 1
                if job.task_id is not None:
                    self._finished.append(job.task_id)
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - job.started)
            # answered once the job is off the books: a client that asks about its task on receiving the answer finds
            # it completed, not still running
            if error is not None:
                job.future.set_exception(error)
            elif ran:
                job.future.set_result(result)
            job.preview = None
            if self._after_job is not None:
                self._after_job()
