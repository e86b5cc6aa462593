"""Triton kernels that stand in for the torch references in `fastsd.ops` (one module per op).

- `attention(q, k, v, *, scale=None)`            -> kernels/attention.py  (ref: fastsd.ops.attention_reference)
- `group_norm(x, G, weight, bias, *, eps, silu)` -> kernels/group_norm.py (ref: fastsd.ops.group_norm_reference)
- `cfg_step(x, uncond, cond, scale, coeffs, old_denoised=None, noise=None)`
                                                 -> kernels/cfg_step.py   (ref: fastsd.ops.cfg_step_reference)

`python -m kernels.report` compiles them for sm_80/sm_90 at every SD1.5 shape and prints registers,
spills, shared memory and tensor-core use. Importing this package imports triton; on CPU the kernels
run only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).

`python -m kernels.traffic` computes (does not measure) the bytes each kernel moves vs the unfused torch ops.

Note: the package attributes `kernels.attention` / `kernels.group_norm` / `kernels.cfg_step` are the functions (they shadow
the submodules of the same name); get a submodule with `importlib.import_module("kernels.attention")`.
"""
from kernels.attention import attention
from kernels.cfg_step import cfg_step
from kernels.group_norm import group_norm

__all__ = ["attention", "group_norm", "cfg_step"]
