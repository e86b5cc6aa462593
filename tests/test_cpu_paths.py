"""The CPU-tuned paths of backend auto (fastsd/cpu_attention.py, fastsd/cpu_pack.py, the chunked
feed-forward) against the plain-torch reference that --backend torch runs."""
import numpy as np
import pytest
import torch

from fastsd import backend, load_pipeline, ops
from fastsd.cpu_attention import attention_chunked, rowmax_bf16
from fastsd.cpu_pack import PackedConv2d, PackedLinear, pack_weights
from fastsd.models import layers


def _qkv(B, H, Lq, Lk, D, sharpness=2.0, seed=0):
    """(B, L, H, D)-transposed views, as CrossAttention makes them; logits with std ~ sharpness."""
    g = torch.Generator().manual_seed(seed)
    s = sharpness ** 0.5
    q = (torch.randn(B, Lq, H, D, generator=g) * s).transpose(1, 2)
    k = (torch.randn(B, Lk, H, D, generator=g) * s).transpose(1, 2)
    v = torch.randn(B, Lk, H, D, generator=g).transpose(1, 2)
    return q, k, v


# head dims 40/80/160 (SD1.5), 77 keys, query counts that don't divide the chunk, one 512-wide head (VAE)
SHAPES = [(2, 8, 300, 300, 40), (2, 8, 300, 77, 40), (1, 4, 129, 129, 80), (2, 2, 65, 77, 160), (1, 1, 200, 200, 512)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block", [1 << 12, 1 << 21], ids=["small-chunks", "default-chunks"])
def test_chunked_bf16_attention_is_as_accurate_as_torch(shape, block):
    B, H, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Lq, Lk, D)
    ref = ops.attention_reference(q, k, v)  # fp32
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out = attention_chunked(qb, kb, vb, block_elements=block)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    torch_err = rel(ops.attention_reference(qb, kb, vb))
    assert rel(out) <= 2 * torch_err, (rel(out), torch_err)


def test_chunked_attention_keeps_sharp_logits_accurate():
    """Logits of size ~30: rounding q k^T to bf16 before the softmax would lose ~0.1 per logit; the
    shift by the row max keeps the error near torch's."""
    q, k, v = _qkv(1, 2, 256, 256, 40, sharpness=60.0, seed=3)
    ref = ops.attention_reference(q, k, v)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    naive = torch.softmax((qb @ kb.transpose(-1, -2)) * 40 ** -0.5, -1) @ vb  # unshifted bf16 logits
    ours, torch_err = rel(attention_chunked(qb, kb, vb)), rel(ops.attention_reference(qb, kb, vb))
    assert ours <= 1.5 * torch_err < rel(naive), (ours, torch_err, rel(naive))


def test_attention_dispatch_on_cpu():
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 64, 77, 40))
    ref = ops.attention_reference(q, k, v)
    chunked = attention_chunked(q, k, v)
    assert not torch.equal(ref, chunked)  # the two paths are distinguishable
    with torch.no_grad():
        with backend.use("torch"):
            assert torch.equal(ops.attention(q, k, v), ref)  # the plain reference
        with backend.use("auto"):
            assert torch.equal(ops.attention(q, k, v), chunked)
            assert torch.equal(ops.attention(q.float(), k.float(), v.float()),
                               ops.attention_reference(q.float(), k.float(), v.float()))  # fp32 keeps SDPA
    with backend.use("auto"):  # autograd on: reference ops (the chunked path writes into out= buffers)
        qg = q.clone().requires_grad_()
        assert torch.equal(ops.attention(qg, k, v), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_weights_give_the_same_outputs_and_state_dict(dtype):
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    models = {"unet": pipe.unet, "vae": pipe.vae, "clip": pipe.clip}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 128, generator=g)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    t = torch.tensor([10.0, 500.0])

    def run():
        return (pipe.unet(x.to(dtype), t, ctx.to(dtype)), pipe.vae.decode(x.to(dtype)), pipe.clip(ids)[0])

    with torch.no_grad(), backend.use("torch"):
        exact = run()  # fp32
        for m in models.values():
            m.to(dtype)
        before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
        ref = run()
        counts = [pack_weights(m) for m in models.values()]
        out = run()
    assert all(c > 0 for c in counts)
    plain = [m for m in pipe.unet.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert plain and all(m.kernel_size == (1, 1) for m in plain)  # only 1x1 convolutions stay unpacked
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    for o, r, e in zip(out, ref, exact):
        if dtype == torch.float32:  # oneDNN's fp32 GEMM instead of MKL's: rounding-level differences
            assert rel(o, r) < 1e-5
        else:  # bf16: as close to the fp32 result as the unpacked model is
            assert rel(o, e) <= 1.5 * rel(r, e), (rel(o, e), rel(r, e))
    for name, m in models.items():
        after = m.state_dict()
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after), name


def test_feed_forward_chunks_match_one_pass(monkeypatch):
    torch.manual_seed(0)
    block = layers.BasicTransformerBlock(64, 2, 32).eval()
    x, ctx = torch.randn(2, 50, 64), torch.randn(2, 7, 32)
    with torch.no_grad():
        with backend.use("torch"):
            ref = block(x, ctx)
        monkeypatch.setattr(layers, "FF_CHUNK_TOKENS", 16)  # 100 tokens: 7 chunks, the last one short
        with backend.use("auto"):
            out = block(x, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_pipeline_lays_out_models_per_backend():
    auto = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="auto")
    plain = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    assert any(isinstance(m, PackedConv2d) for m in auto.unet.modules())
    assert any(isinstance(m, PackedLinear) for m in auto.clip.modules())
    assert not any(isinstance(m, (PackedConv2d, PackedLinear)) for m in plain.unet.modules())
    kw = dict(seed=7, steps=4, width=64, height=64, sampler="euler", progress=False)
    a = np.asarray(auto.generate("a red cube", **kw)[0], dtype=np.float32)
    b = np.asarray(plain.generate("a red cube", **kw)[0], dtype=np.float32)
    assert a.std() > 5 and np.abs(a - b).max() <= 2  # fp32: the same image up to 8-bit rounding


def test_default_dtype_follows_the_cpu(tmp_path, monkeypatch):
    from fastsd import pipeline

    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert pipeline.cpu_native_bf16(str(with_bf16)) and not pipeline.cpu_native_bf16(str(without))
    assert not pipeline.cpu_native_bf16(str(tmp_path / "missing"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(pipeline, "cpu_native_bf16", lambda: True)
    assert pipeline.parse_dtype(None, cpu) == torch.bfloat16 and pipeline.parse_dtype(None, cuda) == torch.float16
    assert pipeline.parse_dtype("fp32", cpu) == torch.float32
    monkeypatch.setattr(pipeline, "cpu_native_bf16", lambda: False)
    assert pipeline.parse_dtype(None, cpu) == torch.float32


def test_rowmax_bf16_is_amax():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 70, 333, generator=g) * 5).bfloat16()
    s[0] -= 100  # rows with no non-negative entry
    s[1, :10] = 0.0
    s[1, 10:20] = -0.0
    s[2, :5] += 1000
    assert torch.equal(rowmax_bf16(s), s.amax(-1, keepdim=True))
