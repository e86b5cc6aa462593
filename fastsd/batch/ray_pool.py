"""The jobs spread over a pool of Ray actors, one model per actor (Ray core only: see README "Batch
generation" for why not Ray Data).

The driver keeps a queue of job batches and up to `IN_FLIGHT` calls per actor (so an actor never waits
for the driver between batches), collects results with `ray.wait` as they finish, and writes them itself:
actors return PNG bytes, never touch the output folder, so the output needs no shared filesystem and the
manifest has one writer. An actor that dies (its process killed, its node lost) fails its calls with
`RayActorError`: their batches go back to the front of the queue and a new actor takes its place; a batch
that has been on `MAX_DEATHS` dying actors is recorded as failed rather than tried forever.
"""
from __future__ import annotations

import os
from collections import deque

RAY_HINT = 'pip install -e ".[ray]" (or pip install ray)'
IN_FLIGHT = 2
MAX_DEATHS = 2  # a batch whose actor died this many times is recorded as failed


def ray_missing() -> str | None:
    """None when Ray imports, else the one-line reason with the install command."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return f"--ray needs Ray, which is not installed: {RAY_HINT}"
    return None


def connect(address: str | None) -> bool:
    """Join a cluster: "local" starts one on this machine, "auto" finds a running one, else an address
    (host:6379 or ray://host:10001). Returns whether this call started the connection (and should end it).
    A process that already called ray.init keeps its connection."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith("FASTSD_")}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if address in (None, "local"):
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


class RayPool:
    """`run(batches)` yields (batch, results) as batches finish anywhere in the cluster."""

    def __init__(self, worker_kwargs: dict, *, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0, log=print):
        import ray

        from fastsd.batch.worker import BatchWorker

        self._owns = connect(address)
        self.log = log
        res = ray.cluster_resources()
        if workers is None:
            fits = [res.get("CPU", 1) / cpus_per_worker] + ([res.get("GPU", 0) / gpus_per_worker] if gpus_per_worker else [])
            workers = max(1, int(min(fits)))
        threads = worker_kwargs.get("threads") or max(1, int(cpus_per_worker))
        self._actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)(BatchWorker)
        self._kwargs = {**worker_kwargs, "threads": threads}
        self.workers = workers
        self.replacements_left = 2 * workers
        self.deaths = 0
        self.actors = [self._actor.remote(**self._kwargs) for _ in range(workers)]
        self.log(f"fastsd.batch: {workers} Ray workers x {cpus_per_worker:g} CPU / {gpus_per_worker:g} GPU, "
                 f"{threads} threads each; cluster {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")

    def run(self, batches: list[list]):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        queue = deque((b, 0) for b in batches)  # (batch, how many actors died running it)
        inflight: dict = {}  # ref -> (actor, batch, deaths, submission number)
        load = {a: 0 for a in self.actors}
        seq = iter(range(1 << 62))

        def submit() -> None:
            for actor in list(load):
                while queue and load[actor] < IN_FLIGHT:
                    batch, deaths = queue.popleft()
                    inflight[actor.run.remote(batch)] = (actor, batch, deaths, next(seq))
                    load[actor] += 1

        submit()
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, batch, deaths, n = inflight.pop(ref)
            try:
                results = ray.get(ref)
            except RayActorError as e:
                for lost, why in self._died(actor, load, queue, inflight, (batch, deaths, n), e):
                    yield lost, [{"id": j.id, "ok": False, "error": why} for j in lost]
                if not load:
                    raise RuntimeError("every Ray worker died; see the messages above") from None
                submit()
                continue
            except RayTaskError as e:  # the worker raised outside a job (its own failures are results)
                results = [{"id": j.id, "ok": False, "error": _one_line(e)} for j in batch]
            load[actor] -= 1
            submit()
            yield batch, results

    def _died(self, actor, load, queue, inflight, item, error) -> list[tuple[list, str]]:
        """Requeue the batches the dead actor held (the one it was running counts a death), start a new
        actor in its place while the budget lasts; returns the batches given up on, with the reason."""
        self.deaths += 1
        held = [item] + [(b, d, n) for r, (a, b, d, n) in list(inflight.items()) if a == actor and inflight.pop(r)]
        held.sort(key=lambda h: h[2])  # an actor runs its calls in order: the first was running
        reason = _one_line(error)
        given_up = []
        for i, (batch, deaths, _) in reversed(list(enumerate(held))):
            deaths += i == 0
            if deaths >= MAX_DEATHS:
                given_up.append((batch, f"its Ray worker died {deaths} times ({reason})"))
            else:
                queue.appendleft((batch, deaths))
        load.pop(actor, None)
        self.log(f"fastsd.batch: a Ray worker died ({reason}); {sum(len(b) for b, _, _ in held)} jobs are "
                 f"{'retried' if self.replacements_left else 'left to the other workers'}")
        if self.replacements_left > 0:
            self.replacements_left -= 1
            new = self._actor.remote(**self._kwargs)
            self.actors.append(new)
            load[new] = 0
        return given_up

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        if self._owns:
            ray.shutdown()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__
