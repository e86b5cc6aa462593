"""The fused CFG + sampler update at SD1.5 latent shapes: torch reference vs kernels/cfg_step.py (CUDA
only).

    pytest benchmarks/bench_cfg_step.py --benchmark-only
"""
import pytest

from . import kernel_cases as K
from .microbench import BACKENDS, DTYPE, RES, ids, run

SHAPES = K.cfg_step_shapes(RES, False, DTYPE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=ids(SHAPES))
def test_cfg_step(benchmark, shape, backend):
    run(benchmark, K.CASES["cfg_step"], shape, backend)
