"""Triton kernels of RMSNorm over a frozen weight: forward and the input gradient only.

Semantics (PyTorch pseudo-code; x [..., D], weight [D] of x's dtype, rows ``x[i]``)::

    forward:   rstd[i] = 1 / sqrt(mean(x[i].float() ** 2) + eps)          # fp32, [..., 1]
               y[i] = weight * (x[i].float() * rstd[i]).to(x.dtype)      # in fp32, rounded to x's dtype
    backward:  xhat = x[i] * rstd[i]   (x_is_output: xhat = y[i] / weight, x holding y)
               g = dy[i] * weight
               dx[i] = rstd[i] * (g - xhat * mean(g * xhat))             # in fp32, rounded once

No gradient for the weight: the base is frozen, so the backward keeps only x (or y) and rstd.
bf16 is read as bf16 and computed in fp32; ``x * rstd`` is rounded to x's dtype before the
product with the weight, as Hugging Face's ``LlamaRMSNorm`` rounds it. ``rms_norm_fwd`` and
``rms_norm_bwd`` have the signatures and semantics of ``torch.ops.metakernels.rms_norm_fwd``/
``rms_norm_bwd`` (``csrc/fused_layers.cpp``), the row sums in fp32 where the C++ kernels take
fp64 (within the tolerance of the library's fp32 mean).

One program per row (Liger-Kernel's layout), walking the row in blocks of ``_BLOCK`` columns
twice: the sum of squares, then the output (the second pass reads the row from cache). A fixed
block keeps one compiled variant per dtype for every hidden size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rms_norm import nonzero_weight
from . import LaunchConfig, launcher

_BLOCK = 2048
_NUM_WARPS = 8
_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, stride_x, stride_y, eps,
                         BLOCK: tl.constexpr):
    """Row ``program_id(0)``: ``rstd = 1 / sqrt(sum(x**2) / D + eps)``,
    ``y = w * (x * rstd).to(y's dtype)``. Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    cols0 = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, D, BLOCK):
        cols = c0 + cols0
        x = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    for c0 in range(0, D, BLOCK):
        cols = c0 + cols0
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_row + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, D, stride_dy, stride_x,
                         stride_dx, X_IS_OUTPUT: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id(0)``: ``dx = rstd * (g - xhat * mean(g * xhat))``, ``g = dy * w``;
    ``xhat = x * rstd``, or ``y / w`` when x holds the output (then ``g * xhat = dy * y``).
    Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    dy_row = dy_ptr + row * stride_dy
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    rstd = tl.load(rstd_ptr + row)
    cols0 = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, D, BLOCK):
        cols = c0 + cols0
        mask = cols < D
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if X_IS_OUTPUT:
            acc += dy * x
        else:
            acc += dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * x
    if X_IS_OUTPUT:
        m = tl.sum(acc, axis=0) / D               # mean(g * xhat)
    else:
        m = tl.sum(acc, axis=0) * rstd * rstd / D  # mean(g * xhat) / rstd, to multiply x by
    for c0 in range(0, D, BLOCK):
        cols = c0 + cols0
        mask = cols < D
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=1.0).to(tl.float32)
        if X_IS_OUTPUT:
            dx = rstd * (dy * w - (x / w) * m)
        else:
            dx = rstd * (dy * w - x * m)
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def launch_configs():
    """Every (kernel, pointer dtypes, constexprs) the launchers can choose: x, y, dy, dx and the
    weight in fp32 or bf16, rstd fp32; the backward from the input and from the output. Rows
    have unit column stride; ``unit["rows"]`` is the launch with D divisible by 16."""
    for dtype, ptr in _TYPES.items():
        tag = str(dtype).split(".")[-1]
        yield LaunchConfig(f"rms_norm_fwd-{tag}", _rms_norm_fwd_kernel,
                           {"x_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr}, dict(BLOCK=_BLOCK),
                           _NUM_WARPS, unit={"rows": ()})
        for out in (False, True):
            yield LaunchConfig(f"rms_norm_bwd-{tag}-x_is_output{int(out)}", _rms_norm_bwd_kernel,
                               {"dy_ptr": ptr, "x_ptr": ptr, "w_ptr": ptr, "dx_ptr": ptr},
                               dict(X_IS_OUTPUT=out, BLOCK=_BLOCK), _NUM_WARPS,
                               unit={"rows": ()})


def _check(op: str, x: torch.Tensor, weight: torch.Tensor) -> int:
    """x fp32/bf16 [..., D], weight [D] of x's dtype on x's device: returns D."""
    if x.dtype not in _TYPES or x.dim() < 1:
        raise TypeError(f"{op} (triton): x must be a float32 or bfloat16 [..., D] tensor, got "
                        f"{x.dtype} {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dtype != x.dtype or weight.shape != (D,) or weight.device != x.device:
        raise ValueError(f"{op} (triton): weight must be [{D}] {x.dtype} on {x.device}, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    return D


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """t as [rows, D] with unit column stride (a view where it can be)."""
    t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 else t.contiguous()


@launcher
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """RMSNorm forward.

    Args:
        x: [..., D] fp32 or bf16. weight: [D], x's dtype. eps: added to the mean square.
    Returns:
        (y [..., D] in x's dtype, contiguous; rstd [..., 1] fp32).
    """
    D = _check("rms_norm_fwd", x, weight)
    if eps < 0:
        raise ValueError(f"rms_norm_fwd (triton): eps must be >= 0, got {eps}")
    x2 = _rows(x, D)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
    if x2.shape[0] and D:
        _rms_norm_fwd_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, D, x2.stride(0),
                                             y.stride(0), float(eps), BLOCK=_BLOCK,
                                             num_warps=_NUM_WARPS)
    return y.view(x.shape), rstd


@launcher
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 x_is_output: bool = False) -> torch.Tensor:
    """RMSNorm input gradient.

    Args:
        dy: [..., D] like x. x: [..., D] fp32 or bf16: the forward's input, or its output y when
            ``x_is_output`` (then xhat = y / weight, and the weight must have no zero).
        weight: [D], x's dtype. rstd: fp32, one value per row (as ``rms_norm_fwd`` returns it).
    Returns:
        dx [..., D] in x's dtype, contiguous.
    """
    D = _check("rms_norm_bwd", x, weight)
    if dy.dtype != x.dtype or dy.shape != x.shape:
        raise ValueError(f"rms_norm_bwd (triton): dy must be like x ({x.dtype} "
                         f"{tuple(x.shape)}), got {dy.dtype} {tuple(dy.shape)}")
    N = x.numel() // max(D, 1)
    if rstd.dtype != torch.float32 or rstd.numel() != N:
        raise ValueError(f"rms_norm_bwd (triton): rstd must be fp32 with one value per row of x "
                         f"({N}), got {rstd.dtype} {tuple(rstd.shape)}")
    if x_is_output:
        if not nonzero_weight(weight):  # cached per weight version: no device sync per call
            raise ValueError("rms_norm_bwd (triton): x_is_output needs a weight without zeros "
                             "(xhat = y / weight)")
    x2, dy2 = _rows(x, D), _rows(dy, D)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if N and D:
        _rms_norm_bwd_kernel[(N,)](dy2, x2, weight.contiguous(), rstd.reshape(-1).contiguous(),
                                   dx, D, dy2.stride(0), x2.stride(0), dx.stride(0),
                                   X_IS_OUTPUT=bool(x_is_output), BLOCK=_BLOCK,
                                   num_warps=_NUM_WARPS)
    return dx.view(x.shape)
