"""GroupNorm(+SiLU) at SD1.5 512 px shapes (UNet resblock, transformer, VAE decoder): torch reference vs
the Triton kernel (CUDA only).

    pytest benchmarks/bench_group_norm.py --benchmark-only
"""
import pytest

from . import kernel_cases as K
from .microbench import BACKENDS, DTYPE, RES, ids, run

SHAPES = K.group_norm_shapes(RES, True, DTYPE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=ids(SHAPES))
def test_group_norm(benchmark, shape, backend):
    run(benchmark, K.CASES["group_norm"], shape, backend)
