"""Choose between equivalent implementations of one op at one shape by timing them on this CPU, once.

The CPU path's pieces (prepacked convolution/linear weights, chunked bf16 attention, the chunked
feed-forward) are faster on some CPUs and shapes and slower on others: oneDNN picks its kernels and weight
layouts per ISA and per shape. So each piece asks `choose(key, candidates, default)` at the first call
with a new key (op, dtype, shapes, threads); the candidates are timed on the real inputs and the winner
is kept in memory and in a JSON file per CPU (`cpuinfo.fingerprint()`: CPU model, ISA in effect, torch
version) and timing METHOD under `$FASTSD_CACHE_DIR`, else `$XDG_CACHE_HOME/fastsd`, else `~/.cache/fastsd`.

`FASTSD_CPU_TUNE`: unset = measure what the cache lacks; `0` = never measure, take each piece's
default (its rule, see docs/cpu-path.md); `1` = measure again and overwrite the cache.
A candidate other than the default is chosen only when it is at least `MARGIN` faster, so close calls
keep the default and a noisy timing cannot flip a choice that does not matter, and only when it still is after
the two are timed again; a candidate that loses but comes within `CLOSE` of the default is timed again with it too
(a slow stretch over its own samples can't keep it out). A choice measured while
other work competed for the CPUs (more runnable tasks than CPUs, sampled from /proc/loadavg before and
after the timing) is saved marked "busy": it is used, and the first process that finds the machine quiet
when it needs that choice measures it again, so a busy moment does not fix a slow choice for good (and a
machine that is always busy does not pay for measuring in every process).
A slow machine without run-queue load (a VM just booted ran every kernel ~1.5x slower, and not by the same factor
for each kind) is told by a reference kernel (`reference_ms`) timed when choices are measured: each entry keeps
its time, the file the best time at each thread count. A choice whose reference took more than `SLOW` times the
best is handled like a busy one: used, and measured again by the first process that needs it and finds the
machine quiet and fast (its reference within SLOW of the best). So that a cache filled while the machine was slow
is found out, each process times the reference once (per thread count) at its first cached choice that has one;
else a cached choice times nothing unless it is to be measured again.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fastsd import cpuinfo
from fastsd.files import cache_dir

MODE_ENV = "FASTSD_CPU_TUNE"
MARGIN = 0.9  # a non-default candidate must take <= 0.9x the default's time
BUDGET_S = 0.1  # after the warm-up round, timed rounds stop once the candidates have taken this long
MIN_ROUNDS, MAX_ROUNDS = 2, 3  # at least two: one slow sample (a VM's hiccup) is not taken as the op's time
# how choices are timed, part of the cache file's name: files timed another way are not reused. 2: the heap kept
# mapped (cpu_pack.keep_temporaries_mapped) and two timed rounds; under method 1 first-call page faults made
# memory-hungry candidates (Winograd) look several times slower than they run
# 3: a candidate other than the default that wins is timed again against the default before it is taken (a VM's
# slow stretch over the default's samples had kept MKL's linear where oneDNN's packed one ran 12% faster)
# 4: a candidate that loses within CLOSE of the default is timed again against it too (AVX-512 without BF16: a
# 2560->1280 F(2x2) Winograd timed at 74.7 ms against 59.3 packed, where it runs 23.7 against 63.3)
METHOD = 4
CLOSE = 1.5  # a losing candidate within this factor of the default's time is timed again against it


def mode() -> str:
    """"measure" (default), "off" (FASTSD_CPU_TUNE=0) or "force" (FASTSD_CPU_TUNE=1)."""
    v = os.environ.get(MODE_ENV, "").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    if v in ("1", "force", "on", "true", "yes"):
        return "force"
    return "measure"


BUSY_READS, BUSY_GAP = 3, 0.002  # reads of the runnable count (s apart) that must all say busy


def machine_busy() -> bool:
    """Whether more tasks are runnable right now than this process has CPUs (Linux /proc/loadavg; the count
    includes this process' own running threads), in BUSY_READS reads BUSY_GAP apart: a task runnable for an
    instant (a kernel thread, this process' own short-lived helpers) is not load, and one read right after a
    timing said busy on an idle machine ~5% of the time (busy.py in the note of 2026-12-05 g). False where it
    can't be read. A quiet first read costs no wait."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for read in range(BUSY_READS):
        if read:
            time.sleep(BUSY_GAP)
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return False
        if running <= cpus:
            return False
    return True


# The reference: an fp32 product of REF_ROWS rows per thread by a REF_K x REF_K matrix (34 MFLOP per thread, ~0.33
# ms at 2 threads on Zen 4; all three operands fit each core's L2, so it is compute-bound, as the packed GEMMs that
# most choices time, and sized per thread so that it takes about as long at any thread count), min of REF_REPS
# after one warm-up (~2 ms in all): a preempted rep does not count, a slow machine slows every rep.
REF_ROWS, REF_K, REF_REPS = 256, 256, 5
# A choice whose reference took more than SLOW x the best one is measured again (when the machine is fast): on the
# quiet Zen 4 VM the reference's min-of-5 stayed within 1.25x of its lowest in 1050 of 1050 samples (median
# 1.00-1.04x; refspread3.py in the note of 2026-12-07 s36), while just booted the packed GEMMs ran 1.5-1.6x slow.
# A reference within SLOW of the best says the machine is fast now.
SLOW = 1.3
REF_REUSE_S = 1.0  # a reference timed less than this ago is reused (hundreds of choices measured at a first image)


def reference_ms() -> float:
    """Milliseconds of the reference product at torch's thread count (min of REF_REPS, after a warm-up)."""
    a = torch.ones(REF_ROWS * torch.get_num_threads(), REF_K, dtype=torch.float32)  # values don't change its time
    b, out = torch.ones(REF_K, REF_K, dtype=torch.float32), torch.empty_like(a)
    torch.mm(a, b, out=out)
    return 1e3 * min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(REF_REPS))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Tuner:
    """Choices per key, measured once per CPU fingerprint; thread-safe."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / f"cpu-tune-{cpuinfo.fingerprint()}-m{METHOD}.json"
        self._lock = threading.Lock()
        self._choices: dict[str, dict] | None = None
        self._best: dict[str, float] = {}  # the lowest reference ms timed on a quiet machine, per thread count
        self._ref: tuple[float, float] | None = None  # (time.monotonic(), ms) of this process' last reference
        self._probed: set[int] = set()  # thread counts whose reference this process timed at a cached choice
        self._forced: set[str] = set()  # keys measured again in this process under FASTSD_CPU_TUNE=1
        self._settled: set[str] = set()  # keys this process has measured, or checked for measuring again

    def _load(self) -> tuple[dict[str, dict], dict[str, float]]:
        """The file's choices, and its best reference ms per thread count."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # missing, unreadable or corrupt: measure again
            return {}, {}
        entries, best = (data.get("choices"), data.get("ref_ms")) if isinstance(data, dict) else ({}, {})
        entries, best = (x if isinstance(x, dict) else {} for x in (entries, best))
        return ({k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("choice"), str)},
                {k: v for k, v in best.items() if isinstance(v, (int, float)) and v > 0})

    def _loaded(self) -> dict[str, dict]:
        """The choices (read from the file at first use); under self._lock."""
        if self._choices is None:
            self._choices, best = self._load()
            self._note_best(best)
        return self._choices

    def _note_best(self, best: dict[str, float]) -> None:
        for threads, ms in best.items():
            self._best[threads] = min(ms, self._best.get(threads, ms))

    def _save(self, key: str, entry: dict) -> None:
        """Merge into the file (another process may have added keys, or timed a faster reference) and replace it
        atomically."""
        merged, best = self._load()
        merged[key] = entry
        with self._lock:
            self._note_best(best)
            best = dict(self._best)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"fingerprint": cpuinfo.describe(), "ref_ms": best, "choices": merged},
                                      indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: the choice still holds for this process

    def cached(self, key: str) -> str | None:
        with self._lock:
            choices = self._loaded()
            if mode() == "force" and key not in self._forced:
                return None
            entry = choices.get(key)
            return entry["choice"] if entry else None

    def _reference(self, quiet: bool) -> float:
        """The reference's ms now (one timed less than REF_REUSE_S ago is reused), kept as the best at this thread
        count if the machine is `quiet` and it is lower."""
        now = time.monotonic()
        with self._lock:
            ref = self._ref
        if ref is None or now - ref[0] >= REF_REUSE_S:
            ref = (now, reference_ms())
        with self._lock:
            self._ref = ref
            if quiet:
                self._note_best({str(torch.get_num_threads()): ref[1]})
        return ref[1]

    def _slow(self, ms: float) -> bool:
        """Whether a reference time at this thread count is more than SLOW x the best known (none known: no)."""
        with self._lock:
            best = self._best.get(str(torch.get_num_threads()))
        return best is not None and ms > SLOW * best

    def _measure_again(self, key: str) -> bool:
        """Whether a cached choice timed on a busy or slow machine is to be measured now: once per process, at its
        first use, when the machine is quiet and fast. The first check in a process of a choice that has a reference
        time also times the reference (once per thread count), so that a cache filled on a slow machine is found
        slow when the machine has become fast."""
        with self._lock:
            entry = (self._choices or {}).get(key)
            if not entry or key in self._settled:
                return False
            self._settled.add(key)
            threads, ref = torch.get_num_threads(), entry.get("ref_ms")  # no ref_ms: an older fastsd's entry
            ref = ref if entry.get("threads") == threads and isinstance(ref, (int, float)) else None
            probe = ref is not None and threads not in self._probed
            self._probed.update([threads] if probe else [])
        if probe and not machine_busy():
            self._reference(quiet=True)
        if not entry.get("busy") and not (ref is not None and self._slow(ref)):
            return False
        return not machine_busy() and not self._slow(self._reference(quiet=True))

    def _new_candidates(self, key: str, candidates: dict) -> bool:
        """Whether `candidates` has one the cached choice was not measured against (a newer fastsd's, or one a
        setting left out then)."""
        with self._lock:
            entry = (self._choices or {}).get(key) or {}
        return not set(candidates) <= set(entry.get("ms", candidates))

    def choose(self, key: str, candidates: dict[str, Callable[[], Any]], default: str) -> str:
        """The name of the candidate to use for `key`. Each candidate is a no-argument call doing the
        op once; they are timed only when no choice is known (and tuning is not off)."""
        if default not in candidates:
            raise ValueError(f"default {default!r} is not a candidate ({', '.join(candidates)})")
        if len(candidates) == 1 or mode() == "off":
            return default
        known = self.cached(key)
        if known is not None and not self._new_candidates(key, candidates) and not self._measure_again(key):
            with self._lock:
                entry = self._choices[key]
            if known in candidates and entry.get("default", default) == default:
                return known
            ms = entry.get("ms")
            if ms:  # measured against more candidates than offered now (FASTSD_CPU_WINOGRAD=4x4 after the default),
                # or under another default (a newer fastsd's rule): picked again from its times, the entry kept as is
                return pick({k: ms[k] for k in candidates}, default)
        busy = machine_busy()
        ref = self._reference(quiet=False)  # kept as the best below if the machine stayed quiet
        times = measure(candidates)
        choice = pick(times, default)
        rival = choice if choice != default else min((n for n in times if n != default), key=times.get)
        if choice != default or times[rival] <= CLOSE * times[default]:  # the two timed again, the faster time
            again = measure({n: candidates[n] for n in (default, rival)})  # of each kept: a slow stretch over
            times = {n: min(t, again.get(n, t)) for n, t in times.items()}  # either's first samples can't decide
            choice = pick(times, default)
        busy = busy or machine_busy()
        entry = {"choice": choice, "ms": {k: round(v * 1e3, 3) for k, v in times.items()}, "default": default,
                 "ref_ms": round(ref, 4), "threads": torch.get_num_threads()}
        if busy:
            entry["busy"] = True  # kept and used, and measured again by a process that finds the machine quiet
        with self._lock:
            assert self._choices is not None
            self._choices[key] = entry
            self._settled.add(key)
            if not busy:
                self._note_best({str(entry["threads"]): ref})
            if mode() == "force":
                self._forced.add(key)
        self._save(key, entry)
        return choice

    def entries(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._loaded())


def pick(times: dict[str, float], default: str) -> str:
    """The fastest of `times`, if it beats the default by MARGIN; else the default."""
    best = min(times, key=times.get)
    return best if times[best] <= MARGIN * times[default] else default


def measure(candidates: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Min seconds per candidate: one warm-up call each (layouts, primitive caches), then rounds of one
    call each, alternating, until MAX_ROUNDS, or BUDGET_S once MIN_ROUNDS are done."""
    for fn in candidates.values():
        fn()
    best = {name: float("inf") for name in candidates}
    spent = 0.0
    for rounds in range(1, MAX_ROUNDS + 1):
        for name, fn in candidates.items():
            t = _timed(fn)
            best[name] = min(best[name], t)
            spent += t
        if rounds >= MIN_ROUNDS and spent >= BUDGET_S:
            break
    return best


_tuner: Tuner | None = None
_tuner_lock = threading.Lock()


def tuner() -> Tuner:
    """The process's tuner (its cache file follows $FASTSD_CACHE_DIR at first use)."""
    global _tuner
    with _tuner_lock:
        if _tuner is None or _tuner.path.parent != cache_dir():
            _tuner = Tuner()
        return _tuner
