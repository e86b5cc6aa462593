"""kernels.dispatch (what the triton backend may take) and kernels.verdicts (auto follows GPU measurements),
tested on CPU: the choice logic against a synthetic verdict file."""
import json

import pytest
import torch

from fastsd.kernels import dispatch, verdicts


def test_supports_reasons():
    q = torch.randn(1, 2, 5, 40)
    assert dispatch.supports("attention", q, q, q) is None  # CPU under the interpreter (conftest)
    assert "causal" in dispatch.supports("attention", q, q, q, causal=True)
    big = torch.randn(1, 1, 3, 512)
    assert "head dim 512" in dispatch.supports("attention", big, big, big)
    assert "dtype" in dispatch.supports("attention", q.double(), q.double(), q.double())
    assert "differ" in dispatch.supports("attention", q, q.half(), q)
    q.requires_grad_(True)  # registered ops have a backward: gradients are covered
    assert dispatch.supports("attention", q, q, q) is None
    x = torch.randn(2, 30, 4, 4)
    assert dispatch.supports("group_norm", x, None, None, num_groups=3) is None
    assert "divisible" in dispatch.supports("group_norm", x, None, None, num_groups=32)
    lat = torch.randn(1, 4, 8, 8)
    assert dispatch.supports("cfg_step", lat, lat, lat, None, None) is None
    assert "shape" in dispatch.supports("cfg_step", lat, lat[:, :2], lat, None, None)
    with pytest.raises(ValueError):
        dispatch.supports("conv", lat)


def test_supports_device_rules(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 5, 40)
    assert "CUDA" in dispatch.supports("attention", q, q, q)
    cuda = torch.device("cuda")
    for arch, ok in ((75, False), (80, True), (86, True), (89, True), (90, True), (100, False)):
        monkeypatch.setattr(dispatch, "device_arch", lambda device, a=arch: a)
        assert (dispatch._device_reason(cuda) is None) == ok, arch


def test_fp32_head_dim_rule_on_cuda_tensors(monkeypatch):
    """The rule itself, with a stand-in for a CUDA tensor's device."""
    class T:
        def __init__(self, D, dtype):
            self.shape, self.dtype, self.device = (2, 8, 64, D), dtype, torch.device("cuda")

        def dim(self):
            return 4
    why = dispatch._attention(T(160, torch.float32), T(160, torch.float32), T(160, torch.float32))
    assert why and "SDPA" in why
    assert dispatch._attention(T(80, torch.float32), T(80, torch.float32), T(80, torch.float32)) is None
    assert dispatch._attention(T(160, torch.bfloat16), T(160, torch.bfloat16), T(160, torch.bfloat16)) is None


def test_shape_keys():
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    k = torch.empty(2, 8, 77, 40, dtype=torch.float16)
    assert dispatch.shape_key("attention", q, k, k) == "fp16 B2 H8 Lq4096 Lk77 D40"
    x = torch.empty(2, 320, 64, 64, dtype=torch.bfloat16)
    assert dispatch.shape_key("group_norm", x, None, None, num_groups=32, silu=True) == "bf16 N2 C320 64x64 G32 silu"
    lat = torch.empty(1, 4, 64, 64)
    assert dispatch.shape_key("cfg_step", lat, lat, lat, None, lat) == "fp32 1x4x64x64 cfg noise"


def test_auto_follows_a_synthetic_verdict_file(tmp_path):
    rows = [  # what the kernels suite measures on a GPU: torch and triton rows per shape
        {"op": "attention", "backend": "torch", "shape_key": "fp16 B2 H8 Lq4096 Lk4096 D40", "time_s": 2.0e-4},
        {"op": "attention", "backend": "triton", "shape_key": "fp16 B2 H8 Lq4096 Lk4096 D40", "time_s": 1.5e-4},
        {"op": "attention", "backend": "torch", "shape_key": "fp16 B2 H8 Lq64 Lk77 D160", "time_s": 1.0e-5},
        {"op": "attention", "backend": "triton", "shape_key": "fp16 B2 H8 Lq64 Lk77 D160", "time_s": 1.4e-5},
        {"op": "group_norm", "backend": "torch", "shape_key": "fp16 N2 C320 64x64 G32 silu", "time_s": 3e-5},
        {"op": "group_norm", "backend": "triton", "shape_key": "fp16 N2 C320 64x64 G32 silu", "status": "error",
         "time_s": None},
    ]
    path = tmp_path / "v.json"
    verdicts.record(verdicts.entries_from_rows(rows), arch=90, device="test", path=path)
    data = json.loads(path.read_text())
    assert data["format"] == verdicts.FORMAT and data["arch"] == 90
    assert set(data["verdicts"]["attention"]) == {"fp16 B2 H8 Lq4096 Lk4096 D40", "fp16 B2 H8 Lq64 Lk77 D160"}
    assert "group_norm" not in data["verdicts"]  # no triton time: no verdict
    assert verdicts.prefer_triton("attention", "fp16 B2 H8 Lq4096 Lk4096 D40", path, arch=90) is True
    assert verdicts.prefer_triton("attention", "fp16 B2 H8 Lq64 Lk77 D160", path, arch=90) is False
    assert verdicts.prefer_triton("attention", "fp16 B1 H8 Lq64 Lk77 D160", path, arch=90) is None
    assert verdicts.prefer_triton("attention", "fp16 B2 H8 Lq4096 Lk4096 D40", path, arch=80) is None  # other GPU
    assert verdicts.prefer_triton("attention", "x", tmp_path / "missing.json") is None
    choice = lambda key, reason=None, gpu=True: dispatch.auto_choice(reason, gpu, "attention", key, path, 90)
    assert choice("fp16 B2 H8 Lq4096 Lk4096 D40") is True      # triton measured faster
    assert choice("fp16 B2 H8 Lq64 Lk77 D160") is False        # torch measured faster
    assert choice("fp16 B1 H8 Lq64 Lk77 D160") is True         # no verdict: triton
    assert choice("fp16 B2 H8 Lq4096 Lk4096 D40", reason="causal") is False
    assert choice("fp16 B2 H8 Lq4096 Lk4096 D40", gpu=False) is False
    # a second run merges (a later measurement replaces the verdict of its shape only)
    verdicts.record([{"op": "attention", "shape_key": "fp16 B2 H8 Lq64 Lk77 D160", "torch_s": 2e-5,
                      "triton_s": 1e-5}], arch=90, path=path)
    assert choice("fp16 B2 H8 Lq64 Lk77 D160") is True and choice("fp16 B2 H8 Lq4096 Lk4096 D40") is True
    path.write_text("not json")
    assert verdicts.prefer_triton("attention", "fp16 B2 H8 Lq4096 Lk4096 D40", path) is None


def test_auto_never_on_cpu():
    q = torch.randn(1, 2, 5, 40)
    assert dispatch.auto_prefers_triton("attention", q, q, q) is False


def test_backend_triton_op_tables_route_through_dispatch(monkeypatch):
    """Backend triton takes the registered kernel op wherever `supports` covers the call, gradients included; the
    table backend auto uses on CUDA also asks the verdicts (never the kernel on a CPU); unsupported calls take
    the reference."""
    from fastsd.backends import reference
    from fastsd.backends.triton import AUTO_BACKEND, BACKEND

    q = torch.randn(1, 2, 5, 40, requires_grad=True)
    out = BACKEND.ops.attention(q, q, q)
    assert "fastsd_attention" in out.grad_fn.name()  # the registered op's backward, not SDPA's
    out.sum().backward()
    ref_q = q.detach().clone().requires_grad_(True)
    reference.attention(ref_q, ref_q, ref_q).sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad, rtol=1e-4, atol=1e-5)

    calls = []
    monkeypatch.setattr(reference, "attention", lambda *a, **k: calls.append("reference") or a[0])
    BACKEND.ops.attention(q.detach(), q.detach(), q.detach(), causal=True)  # outside the kernel's contract
    AUTO_BACKEND.ops.attention(q.detach(), q.detach(), q.detach())  # auto never takes the interpreter
    assert calls == ["reference", "reference"]
