"""The tuner's slow-machine check (fastsd/backends/cpu_tune.py): a choice measured while a reference kernel ran more
than SLOW x its best time is measured again by a later process that finds the machine fast. The reference timing,
the machine's load and the candidates' times are made up here: nothing is timed but by the last test, which runs
the real reference once."""
import json

import pytest
import torch

from fastsd.backends import cpu_tune

NOP = {"a": lambda: None, "b": lambda: None}


@pytest.fixture
def machine(monkeypatch):
    """A machine whose reference time (`ref`), load (`busy`) and candidate times (`times`) the test sets; `refs` and
    `measured` count the reference timings and the measurements."""
    m = type("Machine", (), {})()
    m.ref, m.busy, m.times, m.refs, m.measured = 1.0, False, {"a": 1.0, "b": 0.5}, [], []
    monkeypatch.delenv(cpu_tune.MODE_ENV, raising=False)
    monkeypatch.setattr(cpu_tune, "REF_REUSE_S", 0.0)  # each reference asked for is timed (reuse: its own test)
    monkeypatch.setattr(cpu_tune, "reference_ms", lambda: m.refs.append(m.ref) or m.ref)
    monkeypatch.setattr(cpu_tune, "machine_busy", lambda: m.busy)
    monkeypatch.setattr(cpu_tune, "measure", lambda c: m.measured.append(set(c)) or {k: m.times[k] for k in c})
    return m


def test_a_choice_measured_slow_is_measured_again_once_the_machine_is_fast(tmp_path, machine):
    path = tmp_path / "tune.json"
    t = cpu_tune.Tuner(path)
    assert t.choose("fast", NOP, default="a") == "b" and len(machine.measured) == 2  # (b's win confirmed)
    machine.ref = 1.5  # the machine turns 1.5x slow: the next choice is measured slow
    assert t.choose("slow", NOP, default="a") == "b" and len(machine.measured) == 4
    assert t.entries()["slow"]["ref_ms"] == 1.5 and json.loads(path.read_text())["ref_ms"] == {
        str(torch.get_num_threads()): 1.0}
    machine.times["b"] = 2.0  # b only won because the machine was slow
    still = cpu_tune.Tuner(path)  # a later process on the machine still slow: kept, not measured
    assert still.choose("slow", NOP, default="a") == "b" and still.choose("fast", NOP, default="a") == "b"
    refs = len(machine.refs)
    assert still.choose("slow", NOP, default="a") == "b" and len(machine.refs) == refs  # checked once per process
    assert len(machine.measured) == 4
    machine.ref = 1.1  # fast again (within SLOW of the best)
    fast = cpu_tune.Tuner(path)
    assert fast.choose("fast", NOP, default="a") == "b" and len(machine.measured) == 4  # timed fast: kept
    assert fast.choose("slow", NOP, default="a") == "a" and len(machine.measured) == 5  # measured again
    assert fast.choose("slow", NOP, default="a") == "a" and len(machine.measured) == 5  # once per process
    refs = len(machine.refs)
    later = cpu_tune.Tuner(path)
    assert later.choose("slow", NOP, default="a") == "a" and later.choose("fast", NOP, default="a") == "b"
    assert len(machine.measured) == 5 and len(machine.refs) == refs + 1  # one reference per process, nothing measured
    for _ in range(3):
        assert later.choose("slow", NOP, default="a") == "a" and len(machine.refs) == refs + 1  # cached: nothing timed


def test_a_cache_filled_on_a_slow_machine_is_measured_again_when_fast(tmp_path, machine):
    """A fresh cache filled while the machine ran slow (its best reference time slow too, as on the VM just booted):
    the first process that times the reference fast finds every choice slow and measures it again when used."""
    path = tmp_path / "tune.json"
    machine.ref = 1.5
    slow = cpu_tune.Tuner(path)
    assert slow.choose("k1", NOP, default="a") == "b" and slow.choose("k2", NOP, default="a") == "b"
    assert len(machine.measured) == 4
    machine.ref, machine.times["b"] = 1.0, 2.0
    fast = cpu_tune.Tuner(path)
    assert fast.choose("k1", NOP, default="a") == "a" and fast.choose("k2", NOP, default="a") == "a"
    assert len(machine.measured) == 6
    assert json.loads(path.read_text())["ref_ms"] == {str(torch.get_num_threads()): 1.0}


def test_a_busy_machine_or_a_slow_one_does_not_measure_again(tmp_path, machine, monkeypatch):
    """A choice measured busy or slow is measured again only on a machine both quiet and fast: on one busy (nothing
    timed then) or slow (its reference timed once) it is kept, and the next process checks again."""
    monkeypatch.setattr(cpu_tune, "REF_REUSE_S", float("inf"))  # a tuner per process here: one reference each
    path = tmp_path / "tune.json"
    cpu_tune.Tuner(path).choose("fast", NOP, default="a")
    machine.busy = True
    cpu_tune.Tuner(path).choose("busy", NOP, default="a")
    machine.busy, machine.ref = False, 1.5
    cpu_tune.Tuner(path).choose("slow", NOP, default="a")
    assert len(machine.measured) == 6
    entries = cpu_tune.Tuner(path).entries()
    assert entries["busy"]["busy"] and "busy" not in entries["slow"] and entries["slow"]["ref_ms"] == 1.5
    for busy, ref in ((True, 1.0), (False, 1.5)):
        machine.busy, machine.ref, refs = busy, ref, len(machine.refs)
        t = cpu_tune.Tuner(path)
        assert t.choose("busy", NOP, default="a") == t.choose("slow", NOP, default="a") == "b"
        assert len(machine.measured) == 6 and len(machine.refs) == refs + (not busy)
    machine.busy, machine.ref = False, 1.0
    t = cpu_tune.Tuner(path)
    assert t.choose("busy", NOP, default="a") == t.choose("slow", NOP, default="a") == "b"
    assert len(machine.measured) == 10  # both measured again (b's win confirmed each time)
    assert t.choose("fast", NOP, default="a") == "b" and len(machine.measured) == 10


def test_the_best_reference_merges_across_processes(tmp_path, machine):
    """Two tuners writing one file keep each other's choices and the lowest reference time either timed on a quiet
    machine (one timed busy does not count)."""
    path = tmp_path / "tune.json"
    threads = str(torch.get_num_threads())
    one, two = cpu_tune.Tuner(path), cpu_tune.Tuner(path)
    assert one.entries() == two.entries() == {}  # both read the file before either wrote
    one.choose("k1", NOP, default="a")
    machine.ref = 1.2
    two.choose("k2", NOP, default="a")
    saved = json.loads(path.read_text())
    assert set(saved["choices"]) == {"k1", "k2"} and saved["ref_ms"] == {threads: 1.0}
    machine.ref = 0.9
    one.choose("k3", NOP, default="a")
    machine.ref, machine.busy = 0.5, True
    two.choose("k4", NOP, default="a")
    saved = json.loads(path.read_text())
    assert set(saved["choices"]) == {"k1", "k2", "k3", "k4"} and saved["ref_ms"] == {threads: 0.9}
    assert saved["choices"]["k2"]["ref_ms"] == 1.2 and saved["choices"]["k2"]["threads"] == int(threads)


def test_entries_without_a_reference_time_are_kept(tmp_path, machine):
    """Choices saved by an older fastsd (no reference time) or at another thread count are used as they are, whatever
    the reference does now; one saved slow beside them is measured again."""
    path = tmp_path / "tune.json"
    threads = torch.get_num_threads()
    old = {"choice": "b", "ms": {"a": 1000.0, "b": 500.0}, "default": "a"}
    choices = {"old": old, "t+1": dict(old, ref_ms=9.0, threads=threads + 1),
               "slow": dict(old, ref_ms=9.0, threads=threads)}
    path.write_text(json.dumps({"ref_ms": {str(threads): 1.0}, "choices": choices}))
    machine.ref, machine.times["b"] = 0.5, 2.0
    t = cpu_tune.Tuner(path)
    assert t.choose("old", NOP, default="a") == t.choose("t+1", NOP, default="a") == "b"
    assert machine.measured == machine.refs == []  # nothing timed for them
    assert t.choose("slow", NOP, default="a") == "a" and machine.measured == [{"a", "b"}]


def test_tuning_off_times_nothing(tmp_path, machine, monkeypatch):
    """FASTSD_CPU_TUNE=0: the defaults, nothing timed, not even for a choice measured slow, which measuring (tuning
    back on) then measures again."""
    path = tmp_path / "tune.json"
    cpu_tune.Tuner(path).choose("fast", NOP, default="a")
    machine.ref = 1.5
    cpu_tune.Tuner(path).choose("slow", NOP, default="a")
    machine.ref, measured, refs = 1.0, len(machine.measured), len(machine.refs)
    monkeypatch.setenv(cpu_tune.MODE_ENV, "0")
    t = cpu_tune.Tuner(path)
    assert t.choose("slow", NOP, default="a") == t.choose("fast", NOP, default="a") == t.choose("new", NOP, "a") == "a"
    assert len(t.entries()) == 2 and (len(machine.measured), len(machine.refs)) == (measured, refs)
    monkeypatch.delenv(cpu_tune.MODE_ENV)
    assert t.choose("slow", NOP, default="a") == "b" and len(machine.measured) == measured + 2


def test_a_reference_is_reused_for_a_second(tmp_path, machine, monkeypatch):
    """Choices measured one after another (a first image: hundreds) share a reference timed less than REF_REUSE_S
    ago."""
    monkeypatch.setattr(cpu_tune, "REF_REUSE_S", 1.0)
    clock = [100.0]
    monkeypatch.setattr(cpu_tune.time, "monotonic", lambda: clock[0])
    t = cpu_tune.Tuner(tmp_path / "tune.json")
    t.choose("k1", NOP, default="a")
    clock[0] += 0.5
    t.choose("k2", NOP, default="a")
    assert len(machine.refs) == 1
    clock[0] += 0.5
    t.choose("k3", NOP, default="a")
    assert len(machine.refs) == 2


def test_reference_ms_times_a_product():
    ms = cpu_tune.reference_ms()
    assert 0 < ms < 1e3
