"""Issue #14 item 7: the interpreter-only workarounds (UPCAST_DOT, BF16_FIX*) are keyed on the tensors' device,
never on TRITON_INTERPRET: a launch plan for device tensors other than CPU carries none of them, even with the
variable set (as here: tests/conftest.py sets it). Meta tensors stand in for CUDA ones (same plan code path:
everything but the CPU is compiled); a CPU plan carries them (interpreter)."""
import os

import torch

from fastsd.kernels import attention as A, cfg_step as CS, group_norm as GN

FLAGS = ("UPCAST_DOT", "BF16_FIX", "BF16_FIX_X", "BF16_FIX_D")


def _plans(device):
    bf = dict(dtype=torch.bfloat16, device=device)
    q = torch.empty(2, 77, 8, 40, **bf).transpose(1, 2)
    plans = [A.launch_plan(q, q, q, A.empty_output(q), arch=90 if device != "cpu" else None)]
    x = torch.empty(2, 64, 8, 8, **bf)
    w = torch.empty(64, **bf)
    for sp in (None, 16):  # fused and split paths
        launches, _ = GN.launch_plan(x, torch.empty_like(x), w, w, 32, 1e-5, True, sp_per_prog=sp)
        plans += launches
    lat = torch.empty(1, 4, 8, 8, **bf)
    plans.append(CS.launch_plan(lat, lat, lat, lat, lat, torch.empty_like(lat), torch.empty_like(lat), 7.5,
                                (0.5, 0.5, 0.1, 0.1)))
    return plans


def test_gpu_launch_plans_carry_no_interpreter_workaround():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # the variable is set, and must not leak into GPU plans
    plans = _plans("meta")
    assert len(plans) == 1 + 1 + 3 + 1
    for kernel, grid, args, constexprs, options in plans:
        present = [f for f in FLAGS if f in constexprs]
        assert present or kernel.__name__ in ("_gn_partial_stats_kernel", "_gn_finalize_kernel"), kernel.__name__
        for f in present:
            assert constexprs[f] is False, (kernel.__name__, f)


def test_cpu_launch_plans_carry_them():
    on = [any(cx.get(f) for f in FLAGS) for _, _, _, cx, _ in _plans("cpu")]
    assert on == [True, True, False, False, True, True]  # attention, fused GN, (stats, finalize), apply, cfg_step


def test_hints_need_a_host_proof():
    """ALIGNED (the tl.multiple_of hints) only when pointers and strides are proven 16-byte aligned."""
    q = torch.empty(2, 4096, 8, 40, dtype=torch.float16, device="meta").transpose(1, 2)
    assert A.launch_plan(q, q, q, A.empty_output(q), arch=90)[3]["ALIGNED"] is True
    odd = torch.empty(2, 4096, 8, 41, dtype=torch.float16, device="meta")[..., :40].transpose(1, 2)  # stride 41
    assert A.launch_plan(odd, odd, odd, A.empty_output(odd), arch=90)[3]["ALIGNED"] is False
