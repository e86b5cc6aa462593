"""Attention at SD1.5 512 px UNet shapes: torch reference (SDPA) vs the Triton kernel (CUDA only).

    pytest benchmarks/bench_attention.py --benchmark-only
"""
import pytest

from . import kernel_cases as K
from .microbench import BACKENDS, DTYPE, RES, ids, run

SHAPES = K.attention_shapes(RES, True, DTYPE)  # self + cross at 64x64 latents, the middle block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=ids(SHAPES))
def test_attention(benchmark, shape, backend):
    run(benchmark, K.CASES["attention"], shape, backend)
