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
    assert att.min_bytes == 4 * q and att.flops == 4.0 * 2 * 8 * 4096 * 4096 * 40 and att.waste == 1.2
    for r in rows["attention"] + rows["group_norm"] + rows["cfg_step"]:
        assert r.torch_bytes >= r.min_bytes > 0 and r.kernel_bytes >= r.min_bytes, r
    # every fused op moves fewer bytes than its unfused sequence, per UNet call; the 16-row D160 blocks (grid
    # filling) re-read K/V more often than the unfused sequence moves its small score matrices (no L2 model here)
    per_call = lambda rs, f: sum(f(r) * r.per_call for r in rs if r.per_call)
    assert per_call(rows["attention"], lambda r: r.kernel_bytes) < per_call(rows["attention"], lambda r: r.torch_bytes) / 4
    gn_silu = [r for r in rows["group_norm"] if r.op == "group_norm+silu"]
    assert all(r.kernel_bytes < r.torch_bytes for r in gn_silu)


def test_projection_is_labelled_and_adds_up():
    from fastsd.kernels.traffic import format_projection, projection_rows

    rows = projection_rows("h100", 512, "fp16")
    att = [r for r in rows if r["op"] == "attention"]
    assert sum(r["per_call"] for r in att) == 32
    for r in att:  # same bytes as SDPA's best case, the padding waste on top in FLOPs: never faster than SDPA
        assert r["sdpa_s"] <= r["triton_s"] <= r["sdpa_s"] * r["waste"] + 1e-12 and r["unfused_s"] >= r["sdpa_s"]
    text = format_projection("a100")
    assert text.startswith("# PROJECTION, not a measurement") and "--device cuda" in text


def test_traffic_cli_prints_markdown():
    p = subprocess.run([sys.executable, "-m", "fastsd.kernels.traffic"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "not measured" in p.stdout and "| cfg_step |" in p.stdout and "| group_norm+silu |" in p.stdout
    assert "| attention |" in p.stdout
