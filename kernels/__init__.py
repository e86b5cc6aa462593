"""Triton kernels that stand in for the reference ops, one module per op (installed as `fastsd.kernels`), each with
its kernel, launcher and registered torch op (`fastsd::attention`, `fastsd::group_norm`, `fastsd::cfg_step`: fake
implementations and a backward, so autograd and torch.compile(fullgraph=True) work through them):

- `attention.attention(q, k, v, *, scale=None)`
- `group_norm.group_norm(x, G, weight, bias, *, eps, silu)`
- `cfg_step.cfg_step(x, uncond, cond, scale, coeffs, old_denoised=None, noise=None)`

Around them: `shapes` (SD1.5 launch shapes), `dispatch` (whether a kernel covers a call), `verdicts` (GPU
measurements backend auto follows), `compile` (torch.compile of the models). `python -m fastsd.kernels.report`
compiles every launch ahead of time for sm_80/86/89/90 and checks the binaries (`--project h100`: roofline
projection); `python -m fastsd.kernels.traffic` computes (does not measure) the bytes each moves. Importing a kernel
module imports triton; CPU tensors run under the Triton interpreter only (TRITON_INTERPRET=1 set before triton is
imported).
"""
