"""The benchmark harness's --quick smoke run (what CI runs): it finishes, and every JSON row has every field.

One `python -m fastsd.benchmarks run --quick` invocation (random:tiny at 64 px, one thread) covers the UNet
step with `--compare diffusers` (fastsd and its diffusers twin on the same weights, alternating, plus a
fresh memory process per implementation), the triton backend (a "needs CUDA" row on CPU) and the kernels
suite (torch references timed, triton rows marked).
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.jsonl"
    png = out.with_suffix(".png")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests/conftest.py sets it
    env["FASTSD_CPU_WINOGRAD"] = "4x4"  # a CPU-path setting: rows and the table record it
    cmd = [sys.executable, "-m", "fastsd.benchmarks", "run", "--quick", "--suite", "unet,kernels", "--compare", "diffusers",
           "--backend", "torch,triton", "--device", "cpu", "--dtype", "fp32", "--json", str(out), "--plot", str(png)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return rows, p.stdout, png


def test_rows_have_every_field(quick):
    from fastsd.benchmarks.common import ROW_FIELDS, TIME_FIELDS

    rows, _, _ = quick
    assert rows
    for r in rows:
        missing = [k for k in ROW_FIELDS if k not in r]
        assert not missing, (r.get("name"), missing)
        assert set(TIME_FIELDS) <= set(r["times"])
        assert r["command"].startswith("python -m fastsd.benchmarks run --quick")
        assert r["git_commit"] and r["torch"] and r["device_name"] and r["threads"] == 1
        assert r["status"] in ("ok", "needs CUDA", "missing"), (r["name"], r["status"], r.get("reason"))
        assert r["cpu_env"]["FASTSD_CPU_WINOGRAD"] == "4x4", r["name"]
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        t = r["times"]
        assert t["n"] == len(t["all"]) >= 1 and 0 < t["min"] <= t["median"] <= t["max"]
        assert r["time_s"] == t["median"] and r["rss_baseline_bytes"] > 0 and r["rss_peak_bytes"] > 0


def test_default_dtype_is_fastsds_default_as_the_workers_run(tmp_path, monkeypatch):
    import json

    import torch

    from fastsd import cpuinfo
    from fastsd.benchmarks.run import default_dtype
    from fastsd.load import default_dtype as fastsd_default

    monkeypatch.setenv("FASTSD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSD_CPU_TUNE", raising=False)  # measured as in a user's run (the tests turn tuning off)
    assert default_dtype("cuda", "native") == "fp16"
    assert default_dtype("cpu", "avx2") == "fp32"  # restricted to AVX2: no native bf16
    assert default_dtype("cpu", "avx512") == "fp32"  # held below AVX512-BF16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker will (measured per thread count without AMX)
    try:
        here = fastsd_default(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert default_dtype("cpu", "native", 1) == {torch.bfloat16: "bf16", torch.float32: "fp32"}[here]
    if "amx_bf16" in cpuinfo.cpu_flags() and cpuinfo.amx():  # AMX hidden: the workers' own measurement decides
        got = default_dtype("cpu", "avx512-bf16", 1)
        files = list(tmp_path.glob("cpu-tune-*.json"))
        choices = [e["choice"] for f in files for k, e in json.loads(f.read_text())["choices"].items()
                   if k.startswith("default dtype") and k.endswith(" 1 threads")]
        assert choices == [got], (files, choices)


@pytest.mark.parametrize("isa, flags, error", [
    ("avx512-bf16", {"avx2", "avx512f", "avx512_bf16"}, "this one has none"),  # no AMX to hide
    ("avx512", {"avx2", "fma"}, "this one has no AVX-512"),
    ("avx2", {"avx2", "fma"}, None)])
def test_isa_restrictions_the_cpu_cannot_take_are_one_line_errors(monkeypatch, capsys, isa, flags, error):
    """--isa avx512-bf16 needs AMX to hide, --isa avx512 AVX-512 to hold: asked elsewhere, one line and no run;
    each restriction's environment reaches the workers (ISA_ENVS)."""
    from fastsd import cpuinfo
    from fastsd.benchmarks import run

    monkeypatch.setattr(cpuinfo, "cpu_flags", lambda cpuinfo="": frozenset(flags))
    a = run.parser().parse_args(["run", "--suite", "unet", "--device", "cpu", "--isa", isa])
    if error is None:
        assert run.resolve_defaults(a).isa == isa
    else:
        with pytest.raises(SystemExit) as e:
            run.resolve_defaults(a)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("python -m fastsd.benchmarks: error: --isa ") and error in err[0], err
    assert run.ISA_ENVS[isa]["ONEDNN_MAX_CPU_ISA"] in ("AVX2", "AVX512_CORE", "AVX512_CORE_BF16")


def test_compare_diffusers_row(quick):
    rows, _, _ = quick
    step = {r["impl"]: r for r in rows if r["name"] == "unet step" and r["status"] == "ok"}
    assert set(step) == {"fastsd", "diffusers"}
    f, d = step["fastsd"], step["diffusers"]
    assert f["model"] == "random:tiny" and f["backend"] == "torch" and f["compare_impl"] == "diffusers"
    assert len(f["ratios"]) == f["times"]["n"] == 3
    assert math.isfinite(f["ratio_median"]) and f["ratio_median"] > 0
    assert f["max_rel_err"] < 1e-4  # same weights, same inputs: the same function
    assert f["it_s"] > 0 and d["it_s"] > 0
    # peak memory of each implementation comes from its own fresh process
    assert f["rss_isolated"] and d["rss_isolated"]
    assert f["rss_peak_run_bytes"] >= f["rss_baseline_bytes"] and d["rss_peak_run_bytes"] >= d["rss_baseline_bytes"]


def test_triton_rows_on_cpu_say_needs_cuda(quick):
    rows, _, _ = quick
    tri = [r for r in rows if r["backend"] == "triton"]
    assert tri and all(r["status"] in ("needs CUDA", "missing") for r in tri)


def test_kernels_suite_reports_throughput(quick):
    rows, _, _ = quick
    ref = [r for r in rows if r["suite"] == "kernels" and r["backend"] == "torch"]
    assert {r["op"] for r in ref} >= {"attention", "group_norm"}
    for r in ref:
        assert r["status"] == "ok" and r["tflops"] > 0 and r["gbps"] > 0


def test_markdown_table_and_plot(quick):
    _, stdout, png = quick
    assert "| unet step | random:tiny | fastsd | torch |" in stdout
    assert "FASTSD_CPU_WINOGRAD=4x4" in stdout.split("| bench |")[0]  # the setting, in the header line
    assert "| kernel | shape |" in stdout
    assert png.exists() and png.stat().st_size > 1000


def test_microbenchmarks_collected_only_when_asked():
    """bench_*.py are collected from benchmarks/ when asked (benchmarks/conftest.py), never by the default
    run (testpaths = tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    asked = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "benchmarks/bench_attention.py", "benchmarks/bench_group_norm.py"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "bench_attention.py::test_attention" in asked.stdout, asked.stdout[-2000:] + asked.stderr[-2000:]
    assert "bench_group_norm.py::test_group_norm" in asked.stdout
    # the default run: testpaths = tests, where no bench_*.py lives
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'testpaths = ["tests"]' in f.read()
    assert not [f for _, _, fs in os.walk(os.path.join(ROOT, "tests")) for f in fs if f.startswith("bench_")]


def test_roofline_counts_each_stage_and_divides_by_the_measured_gemm_rate(tmp_path):
    from fastsd.benchmarks import roofline

    out = tmp_path / "roofline.jsonl"
    for steps, cfg in ((1, 1.0), (3, 1.0), (1, 7.5)):
        roofline.main(["--model", "random:tiny", "--res", "64", "--steps", str(steps), "--cfg", str(cfg),
                       "--dtype", "fp32", "--threads", "1", "--repeat", "1", "--json", str(out)])
    one, three, cfg = [json.loads(line) for line in out.read_text().splitlines()]
    assert one["flops"]["unet"] > 0 and one["flops"]["decoder"] > 0 and one["flops"]["text encoder"] > 0
    assert three["flops"]["unet"] == 3 * one["flops"]["unet"]  # per step
    assert cfg["flops"]["unet"] == 2 * one["flops"]["unet"]  # CFG: batch 2
    assert cfg["flops"]["text encoder"] == 2 * one["flops"]["text encoder"]  # and the negative prompt
    assert one["flops_total"] == sum(one["flops"].values())
    assert math.isclose(one["floor_s"], one["flops_total"] / one["gemm_flops_per_s"], rel_tol=1e-3, abs_tol=1e-4)
    assert one["gemm_flops_per_s"] > 1e9  # a GEMM rate was measured (> 1 GFLOP/s on any CPU this runs on)
    assert one["isa"] and one["dtype"] == "float32"


def test_checkout_comes_off_sys_path(monkeypatch, tmp_path):
    """In a checkout's root, its kernels/ would shadow PyPI's `kernels` (transformers imports it): workers and tests
    take checkouts ('' when the working folder is one) off sys.path, other folders stay."""
    from fastsd.benchmarks.common import REPO, checkout_off_path

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", ["", REPO, str(tmp_path), REPO + os.sep])
    checkout_off_path()
    assert sys.path == [str(tmp_path)]


@pytest.mark.parametrize("argv, error", [
    (["--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--cfg", "nan"], "--cfg must be a finite number"),
    (["--res", "abc"], "--res abc: expected sizes in px"),
    (["--res", "60"], "--res 60: sizes must be positive multiples of 8"),
    (["--res", "64,0"], "sizes must be positive multiples of 8"),
    (["--suite", "bad"], "unknown suite 'bad'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--compare", "nope"], "unknown --compare 'nope'"),
    (["--sampler", "foo"], "unknown sampler 'foo'"),
    (["--model", "no/such.safetensors"], "no/such.safetensors: no such file or folder"),
    (["--model", "random:huge"], "unknown preset 'huge'"),
])
def test_bad_run_values_are_one_line_errors_before_any_worker(monkeypatch, capsys, argv, error):
    """Numbers out of range, an unknown sampler or a missing model: one `error:` line from resolve_defaults, exit 2
    as argparse's own errors, before a worker starts (they used to become result rows carrying a worker's
    traceback, or rows with no times for --repeat 0; then exit status 1)."""
    from fastsd.benchmarks import run

    monkeypatch.setattr(run, "execute", lambda *a, **k: pytest.fail("a worker was started"))
    a = run.parser().parse_args(["run", "--device", "cpu", "--dtype", "fp32", *argv])
    with pytest.raises(SystemExit) as e:
        run.resolve_defaults(a)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m fastsd.benchmarks: error: ") and error in err[0], err
