"""Triton kernel of ``meta_reduce``: the weighted reduction of the [T, P] bank over tasks.

Semantics (PyTorch pseudo-code; ``w`` [T] task weights)::

    fomaml:  out = sum_t w[t] * x[t]                     # x = query gradients
    reptile: out = (sum_t w[t]) * theta - sum_t w[t] * x[t]   # x = adapted fast weights

Gradients: none here (the op falls back to the differentiable reference when one is needed).
``meta_reduce`` has exactly the semantics of ``meta_reduce_ref`` in
``metakernels/ops/meta_reduce.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LaunchConfig, launcher

_BLOCK_P = 1024


@triton.jit
def _meta_reduce_kernel(x_ptr, w_ptr, theta_ptr, out_ptr, T, P,
                        stride_xt, stride_xp, stride_w, stride_theta,
                        REPTILE: tl.constexpr, BLOCK: tl.constexpr):
    """``out[p] = sum_t w[t] x[t, p]`` (fomaml) or ``sum_t w[t] * theta[p] - sum_t w[t] x[t, p]``
    (reptile), accumulated in fp32 over t in order. Grid: (cdiv(P, BLOCK),)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    w_sum = 0.0
    x_ptrs = x_ptr + cols * stride_xp
    for t in range(0, T):
        w = tl.load(w_ptr + t * stride_w)
        acc += w * tl.load(x_ptrs, mask=mask, other=0.0)
        w_sum += w
        x_ptrs += stride_xt  # stepping the pointer keeps t * stride_xt out of int32
    if REPTILE:
        theta = tl.load(theta_ptr + cols * stride_theta, mask=mask, other=0.0)
        acc = w_sum * theta - acc
    tl.store(out_ptr + cols, acc, mask=mask)


def launch_configs():
    """Every (kernel, pointer dtypes, constexprs) ``meta_reduce`` can launch (all fp32)."""
    for reptile in (False, True):
        yield LaunchConfig(f"meta_reduce-reptile{int(reptile)}", _meta_reduce_kernel, {},
                           dict(REPTILE=reptile, BLOCK=_BLOCK_P),
                           unit={"bank": ("stride_xp", "stride_w", "stride_theta")})


@launcher
def meta_reduce(kind: str, x: torch.Tensor, weights: torch.Tensor,
                theta: torch.Tensor | None) -> torch.Tensor:
    """Reduces x [T, P] fp32 with weights [T] fp32 to [P] fp32 (``theta`` [P] for reptile)."""
    T, P = x.shape
    out = torch.empty(P, dtype=torch.float32, device=x.device)
    reptile = kind == "reptile"
    th = theta if reptile else out  # not read by fomaml
    grid = (triton.cdiv(P, _BLOCK_P),)
    _meta_reduce_kernel[grid](x, weights, th, out, T, P, x.stride(0), x.stride(1),
                              weights.stride(0), th.stride(0), REPTILE=reptile, BLOCK=_BLOCK_P)
    return out
