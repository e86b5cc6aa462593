"""The jobs spread over a pool of Ray actors, one model per actor (Ray core only: see README "Batch
generation" for why not Ray Data).

The driver keeps a queue of job batches. An actor gets work once it has answered `describe()` (its model
is loaded), then up to `IN_FLIGHT` calls at a time, so it never waits for the driver between batches and
an actor that never starts (no room in the cluster, a model it can't load) holds no jobs. Results are
collected with `ray.wait` as they finish and written by the driver itself: actors return PNG bytes and
never touch the output folder, so the output needs no shared filesystem and the manifest has one writer.
An actor that dies (its process killed, its node lost) fails its calls with `RayActorError`: its batches
go back to the front of the queue and a new actor takes its place (up to 2x --workers replacements); the
batch it was running when it died counts a death, and a batch on `MAX_DEATHS` dying actors is recorded as
failed instead of being tried forever.
"""
from __future__ import annotations

import os
import socket
from collections import deque
from dataclasses import dataclass, field

RAY_HINT = 'pip install -e ".[ray]" (or pip install ray)'
IN_FLIGHT = 2
MAX_DEATHS = 2


class WorkersLost(RuntimeError):
    """Every Ray worker died or failed to start, with jobs left."""


def ray_missing() -> str | None:
    """None when Ray imports, else the one-line reason with the install command."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return f"--ray needs Ray, which is not installed: {RAY_HINT}"
    return None


def connect(address: str | None) -> bool:
    """Join a cluster: "local"/None starts one on this machine, "auto" finds a running one, else an address
    (host:6379 or ray://host:10001). The FASTSD_* environment goes to the workers. Returns whether this
    call made the connection (and should end it); a process that already called ray.init keeps its own."""
    import ray

    if ray.is_initialized():
        return False
    _check_reachable(address)
    env = {k: v for k, v in os.environ.items() if k.startswith("FASTSD_")}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    try:
        if address in (None, "local"):
            ray.init(address="local", include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError...
        where = f"--ray {address}" if address not in (None, "local") else "--ray"
        raise ValueError(f"{where}: can't start or join the Ray cluster ({_one_line(e)})") from None
    return True


def check_room(cpus_per_worker: float, gpus_per_worker: float) -> None:
    """ValueError when the connected cluster, all of it, can't hold one worker of these resources (Ray would wait
    for them for ever)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    if cpus < cpus_per_worker or gpus < gpus_per_worker:
        raise ValueError(f"--ray: the cluster has {cpus:g} CPUs and {gpus:g} GPUs, no room for one worker of "
                         f"--cpus-per-worker {cpus_per_worker:g} and --gpus-per-worker {gpus_per_worker:g}")


def disconnect() -> None:
    import ray

    ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """A given host:port must answer within 5 s (Ray itself retries a wrong address for minutes)."""
    if address in (None, "local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")  # ([::1]:6379, an IPv6 address)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or e})") from None


@dataclass
class _Work:
    """The driver's view of the pool during one run."""

    queue: deque                                        # (batch, deaths) not yet given to an actor
    inflight: dict = field(default_factory=dict)        # ref -> (actor, batch, deaths, submission number)
    starting: dict = field(default_factory=dict)        # describe() ref -> actor not ready yet
    load: dict = field(default_factory=dict)            # ready actor -> calls in flight
    seq: int = 0


class RayPool:
    """`run(batches)` yields (batch, results) as batches finish anywhere in the cluster."""

    def __init__(self, worker_kwargs: dict, *, workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, log=print, prepare=None):
        """On the cluster this process is connected to (`connect`). `prepare(job)`: the job as an actor gets it (the
        batches yielded are the driver's own)."""
        import ray

        from fastsd.batch.worker import BatchWorker

        self.log, self.prepare = log, prepare or (lambda job: job)
        res = ray.cluster_resources()
        fits = [res.get("CPU", 0) / cpus_per_worker]
        if gpus_per_worker:
            fits.append(res.get("GPU", 0) / gpus_per_worker)
        if workers is None:
            workers = max(1, int(min(fits)))
        elif workers > int(min(fits)):
            log(f"fastsd.batch: warning: the cluster has room for {int(min(fits))} workers of {cpus_per_worker:g} "
                f"CPU / {gpus_per_worker:g} GPU now; the others start when resources appear")
        threads = worker_kwargs.get("threads") or max(1, int(cpus_per_worker))
        self._actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)(BatchWorker)
        self._kwargs = {**worker_kwargs, "threads": threads}
        self.replacements_left = 2 * workers
        self.deaths = 0
        self.actors = [self._actor.remote(**self._kwargs) for _ in range(workers)]
        self.log(f"fastsd.batch: {workers} Ray workers x {cpus_per_worker:g} CPU / {gpus_per_worker:g} GPU, "
                 f"{threads} threads each; cluster {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")

    def run(self, batches: list[list]):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        w = _Work(deque((b, 0) for b in batches), starting={a.describe.remote(): a for a in self.actors})
        last_death = ""
        while w.inflight or (w.queue and (w.starting or w.load)):
            (ref,), _ = ray.wait(list(w.inflight) + list(w.starting), num_returns=1)
            if ref in w.starting:
                actor = w.starting.pop(ref)
                try:
                    info = ray.get(ref)
                except RayActorError as e:
                    last_death = _one_line(e)
                    self._died(w, actor, None, "failed to start", e)
                    continue
                self.log(f"fastsd.batch: Ray worker ready on {info['node']} pid {info['pid']}: {info['device']} "
                         f"{info['dtype']}, backend {info['backend']}, {info['threads']} threads")
                w.load[actor] = 0
                self._submit(w)
                continue
            actor, batch, deaths, n = w.inflight.pop(ref)
            try:
                results = ray.get(ref)
            except RayActorError as e:
                last_death = _one_line(e)
                for lost, why in self._died(w, actor, (batch, deaths, n), "died", e):
                    yield lost, [{"id": j.id, "ok": False, "error": why} for j in lost]
                continue
            except RayTaskError as e:  # the worker raised outside a job (its own failures are results)
                results = [{"id": j.id, "ok": False, "error": _one_line(e)} for j in batch]
            w.load[actor] -= 1
            self._submit(w)
            yield batch, results
        if w.queue:
            raise WorkersLost(f"every Ray worker died or failed to start; {sum(len(b) for b, _ in w.queue)} jobs "
                              f"left (last: {last_death})")

    def _submit(self, w: _Work) -> None:
        for actor in list(w.load):
            while w.queue and w.load[actor] < IN_FLIGHT:
                batch, deaths = w.queue.popleft()
                w.inflight[actor.run.remote([self.prepare(j) for j in batch])] = (actor, batch, deaths, w.seq)
                w.seq += 1
                w.load[actor] += 1

    def _died(self, w: _Work, actor, item, what: str, error) -> list[tuple[list, str]]:
        """Requeue the batches the dead actor held, start a new actor in its place while the budget lasts;
        returns the batches given up on (MAX_DEATHS), with the reason."""
        self.deaths += 1
        held = [item] if item else []
        held += [(b, d, n) for r, (a, b, d, n) in list(w.inflight.items()) if a == actor and w.inflight.pop(r)]
        held.sort(key=lambda h: h[2])  # an actor runs its calls in order: the first one was running
        reason = _one_line(error)
        given_up = []
        for i, (batch, deaths, _) in reversed(list(enumerate(held))):
            deaths += 1 if i == 0 else 0
            if deaths >= MAX_DEATHS:
                given_up.append((batch, f"its Ray worker died {deaths} times ({reason})"))
            else:
                w.queue.appendleft((batch, deaths))
        w.load.pop(actor, None)
        jobs = sum(len(b) for b, _, _ in held)
        self.log(f"fastsd.batch: a Ray worker {what} ({reason})" + (f"; its {jobs} jobs go to another worker" if jobs
                                                                   else ""))
        if self.replacements_left > 0:
            self.replacements_left -= 1
            new = self._actor.remote(**self._kwargs)
            self.actors.append(new)
            w.starting[new.describe.remote()] = new
        return given_up

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _one_line(e: BaseException) -> str:
    """The most telling line of a Ray error (its last non-empty line), cut at 300 characters."""
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return text[-1].strip()[:300] if text else type(e).__name__
