"""pytest collects the microbenchmarks `benchmarks/bench_<op>.py` (Liger-style names) when asked for them
explicitly — `pytest benchmarks/ --benchmark-only` — as if `python_files` included `bench_*.py` there.
The default `python -m pytest` run never sees them: its testpaths is tests/."""
import fnmatch

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and fnmatch.fnmatch(file_path.name, "bench_*.py"):
        if not any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
            return pytest.Module.from_parent(parent, path=file_path)
    return None
