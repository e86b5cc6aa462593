"""The benchmark harness (installed as fastsd.benchmarks): `python -m fastsd.benchmarks run|table`, op-level
scripts (cpu_paths, quality, load_memory) and the pytest-benchmark microbenchmarks bench_<op>.py."""
