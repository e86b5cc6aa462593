"""Triton kernels that stand in for the reference ops, one module per op (installed as `fastsd.kernels`):

- `attention.attention(q, k, v, *, scale=None)`
- `group_norm.group_norm(x, G, weight, bias, *, eps, silu)`
- `cfg_step.cfg_step(x, uncond, cond, scale, coeffs, old_denoised=None, noise=None)`

`python -m fastsd.kernels.report` compiles them ahead of time for sm_80/sm_90 at every SD1.5 shape;
`python -m fastsd.kernels.traffic` computes (does not measure) the bytes each moves vs the unfused torch ops.
Importing a kernel module imports triton; on CPU the kernels run only under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported).
"""
