"""kernels.report: every kernel compiles ahead of time for sm_80 and sm_90 at every SD1.5 shape (fp16,
bf16; cfg_step: fp32 latents with an fp16/bf16/fp32 model output) with zero spills and tensor-core attention; plus backend errors without the interpreter.
Compilation runs in a subprocess without TRITON_INTERPRET (run_report does that under pytest)."""
import os
import subprocess
import sys

import pytest

from fastsd.kernels.report import CFG_BATCHES, CFG_MODEL_DTYPES, attention_shapes, cfg_step_patterns, group_norm_shapes, run_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = {"attention", "gn_partial_stats", "gn_finalize", "gn_apply", "cfg_step"}


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def rows():
    return run_report(archs=(80, 90), dtypes=("fp16", "bf16"), resolutions=(512, 768), timeout=600)


def test_report_covers_every_kernel_dtype_arch(rows):
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    archs = ("sm_80", "sm_90")
    assert seen == ({(k, d, a) for k in KERNELS for d in ("fp16", "bf16") for a in archs}
                    | {("cfg_step", d, a) for d in CFG_MODEL_DTYPES for a in archs})
    n_att = sum(len(attention_shapes(res)) for res in (512, 768))
    n_gn = sum(len(group_norm_shapes(res)) for res in (512, 768))
    n_cfg = 2 * len(CFG_BATCHES) * len(CFG_MODEL_DTYPES) * len(cfg_step_patterns())  # 2 resolutions
    assert len(rows) == 4 * (n_att + 3 * n_gn) + 2 * n_cfg


def test_report_cfg_step_every_sampler_pattern(rows):
    """The fused CFG + sampler update at SD1.5 latents (1 and 2 images, 64x64 and 96x96), fp32 latents with an
    fp16/bf16/fp32 model output, each flag combination; compiled (spills checked below) for both archs."""
    cfg = [r for r in rows if r["kernel"] == "cfg_step"]
    shapes = {r["shape"] for r in cfg}
    for res, lat in ((512, 64), (768, 96)):
        for B in CFG_BATCHES:
            for label, *_ in cfg_step_patterns():
                assert f"{res}px B{B} x fp32 {B}x4x{lat}x{lat}, model out {2 * B}x4x{lat}x{lat} ({label})" in shapes


def test_report_every_launch_compiles_without_spills(rows):
    errors = [(r["kernel"], r["shape"], r["dtype"], r["arch"], r["error"]) for r in rows if "error" in r]
    assert not errors, errors[:3]
    spills = [(r["kernel"], r["shape"], r["dtype"], r["arch"], r["local"], r["stack"]) for r in rows if r["spills"]]
    assert not spills, spills[:5]
    assert all(0 < r["regs"] <= 255 for r in rows)
    smem_limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    assert all(r["shared"] <= smem_limit[r["arch"]] for r in rows)


def test_report_attention_uses_tensor_cores(rows):
    att = [r for r in rows if r["kernel"] == "attention"]
    assert att and all(r["tensor_cores_required"] for r in att)
    for r in att:
        if r["arch"] == "sm_80":
            assert "mma" in r["ptx_tc"] and "HMMA" in r["sass_tc"], r
        else:
            assert ("wgmma" in r["ptx_tc"] or "mma" in r["ptx_tc"]) and r["sass_tc"] != "-", r


def test_report_cli_under_interpreter_reexecs():
    """`python -m fastsd.kernels.report` started with TRITON_INTERPRET=1 compiles in a clean subprocess."""
    env = dict(_clean_env(), TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "fastsd.kernels.report", "--quick", "--arch", "90", "--dtype", "fp16",
                        "--res", "512"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "attention" in p.stdout and "gn_apply" in p.stdout and "cfg_step" in p.stdout and "0 with spills" in p.stdout


BACKEND_SNIPPET = r"""
import fastsd
from fastsd import backends
for call in (lambda: backends.get("triton", "cpu"), lambda: fastsd.load_pipeline("random:tiny", backend="triton")):
    try:
        call()
    except backends.BackendError as e:
        print("BackendError:", e)
    else:
        print("no error")
assert backends.get("auto", "cpu").name == "cpu"  # auto quietly takes the CPU path on a CPU
print("auto ok")
"""


def test_triton_backend_without_interpreter_raises_clear_error():
    p = subprocess.run([sys.executable, "-c", BACKEND_SNIPPET], env=_clean_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[2] == "auto ok", p.stdout
    for line in lines[:2]:
        assert line.startswith("BackendError:") and "TRITON_INTERPRET=1" in line and "CUDA" in line, line
