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
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

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
        self._forced: set[str] = set()  # keys measured again in this process under FASTSD_CPU_TUNE=1
        self._settled: set[str] = set()  # keys whose busy-machine choice this process has checked or measured

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            entries = data.get("choices", {}) if isinstance(data, dict) else {}
            return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}
        except (OSError, ValueError):  # missing, unreadable or corrupt: measure again
            return {}

    def _save(self, key: str, entry: dict) -> None:
        """Merge into the file (another process may have added keys) and replace it atomically."""
        merged = self._load()
        merged[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"fingerprint": cpuinfo.describe(), "choices": merged}, indent=1,
                                      sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: the choice still holds for this process

    def cached(self, key: str) -> str | None:
        with self._lock:
            if self._choices is None:
                self._choices = self._load()
            if mode() == "force" and key not in self._forced:
                return None
            entry = self._choices.get(key)
            return entry["choice"] if entry else None

    def _measure_again(self, key: str) -> bool:
        """Whether a choice timed on a busy machine is to be measured now: once per process, at its first
        use, when the machine is quiet."""
        with self._lock:
            entry = (self._choices or {}).get(key)
            if not entry or not entry.get("busy") or key in self._settled:
                return False
            self._settled.add(key)
        return not machine_busy()

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
        times = measure(candidates)
        choice = pick(times, default)
        rival = choice if choice != default else min((n for n in times if n != default), key=times.get)
        if choice != default or times[rival] <= CLOSE * times[default]:  # the two timed again, the faster time
            again = measure({n: candidates[n] for n in (default, rival)})  # of each kept: a slow stretch over
            times = {n: min(t, again.get(n, t)) for n, t in times.items()}  # either's first samples can't decide
            choice = pick(times, default)
        busy = busy or machine_busy()
        entry = {"choice": choice, "ms": {k: round(v * 1e3, 3) for k, v in times.items()}, "default": default}
        if busy:
            entry["busy"] = True  # kept and used, and measured again by a process that finds the machine quiet
        with self._lock:
            assert self._choices is not None
            self._choices[key] = entry
            self._settled.add(key)
            if mode() == "force":
                self._forced.add(key)
        self._save(key, entry)
        return choice

    def entries(self) -> dict[str, dict]:
        with self._lock:
            if self._choices is None:
                self._choices = self._load()
            return dict(self._choices)


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
