"""kernels.traffic: the computed bytes-moved table runs and its arithmetic holds on hand-checked cases."""
import os
import subprocess
import sys

from fastsd.kernels.traffic import all_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_traffic_numbers():
    rows = all_rows(512, "fp16")
    n = 4 * 64 * 64
    cfg = {r.case.split(":")[0] + (" fp16" if "out fp16" in r.case else " fp32"): r for r in rows["cfg_step"]}
    # euler, fp32 model output: read x, uncond, cond, write x_next, denoised (4 bytes each) vs 5 torch ops
    assert cfg["euler / dpmpp_2m 1st fp32"].kernel_bytes == 5 * 4 * n
    assert cfg["euler / dpmpp_2m 1st fp32"].torch_bytes == (3 + 2 + 3 + 2 + 3) * 4 * n
    assert cfg["euler_a / ddpm (noise) fp16"].kernel_bytes == (2 * 2 + 4 * 4) * n
    # self-attention 64x64: q, o once; K and V once per 128-row query block (4096 / 128 = 32)
    att = rows["attention"][0]
    q = 2 * 8 * 4096 * 40 * 2
    assert att.kernel_bytes == 2 * q + 2 * 32 * q
    assert att.torch_bytes == 4 * q + 4 * 2 * 8 * 4096 * 4096 * 2
    for r in rows["attention"] + rows["group_norm"] + rows["cfg_step"]:
        assert r.torch_bytes > r.kernel_bytes > 0, r


def test_traffic_cli_prints_markdown():
    p = subprocess.run([sys.executable, "-m", "fastsd.kernels.traffic"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "not measured" in p.stdout and "| cfg_step |" in p.stdout and "| group_norm+silu |" in p.stdout
    assert "| attention |" in p.stdout
