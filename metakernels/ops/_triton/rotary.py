"""Triton kernels of the rotary position embedding, forward (q and k) and backward.

Semantics (PyTorch pseudo-code; x one of q, k [B, H, L, D], cos/sin broadcast to it, D = 2h,
``x1, x2 = x[..., :h], x[..., h:]``)::

    forward:   out = x * cos + cat(-x2, x1) * sin          # Hugging Face's apply_rotary_pos_emb
    backward:  dx = dy * cos + cat(dy2 * sin2, -dy1 * sin1)   # its transpose, for dq and dk

The map is linear in x, so the backward keeps nothing of q or k (cos and sin only). bf16 is
read as bf16 and computed in fp32: the forward rounds each product to x's dtype before the sum,
as the library's op-by-op form does, and the backward rounds once. ``rotary_fwd`` and
``rotary_bwd`` have the signatures and semantics of ``torch.ops.metakernels.rotary_fwd``/
``rotary_bwd`` (``csrc/fused_layers.cpp``): q, k, dy 4-D with unit last stride (usually
transposed views of a projection's [B, L, H, D] output), results in the input's memory layout.

The rows (b, h, l) are walked in the input's memory order (its three row axes sorted by stride,
largest first), so that neighbouring programs read neighbouring memory; a program takes
``_BLOCK_R`` rows and the half-rows in blocks of ``_BLOCK_H``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LaunchConfig, launcher

_BLOCK_R, _BLOCK_H = 16, 64
_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n1, n2, n_rows, HALF,
                   stride_x0, stride_x1, stride_x2, stride_c0, stride_c1, stride_c2,
                   stride_s0, stride_s1, stride_s2, stride_o0, stride_o1, stride_o2,
                   BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows ``i = (i0, i1, i2)`` of the three row axes (sizes (n_rows / (n1 n2), n1, n2)), each
    row 2 HALF elements with unit stride in x, cos, sin and out:

        forward:   out1 = r(x1 c1) + r(-x2 s1),  out2 = r(x2 c2) + r(x1 s2)   r: round to x's dtype
        backward:  out1 = x1 c1 + x2 s2,         out2 = x2 c2 - x1 s1

    Grid: (cdiv(n_rows, BLOCK_R),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    i2 = rows % n2
    i1 = (rows // n2) % n1
    i0 = rows // (n2 * n1)
    x_row = (x_ptr + i0 * stride_x0 + i1 * stride_x1 + i2 * stride_x2)[:, None]
    c_row = (cos_ptr + i0 * stride_c0 + i1 * stride_c1 + i2 * stride_c2)[:, None]
    s_row = (sin_ptr + i0 * stride_s0 + i1 * stride_s1 + i2 * stride_s2)[:, None]
    o_row = (out_ptr + i0 * stride_o0 + i1 * stride_o1 + i2 * stride_o2)[:, None]
    dt = out_ptr.dtype.element_ty
    for j0 in range(0, HALF, BLOCK_H):
        j = (j0 + tl.arange(0, BLOCK_H))[None, :]
        mask = row_ok[:, None] & (j < HALF)
        x1 = tl.load(x_row + j, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + j, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(c_row + j, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(c_row + HALF + j, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_row + j, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + HALF + j, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
            o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(o_row + j, o1.to(dt), mask=mask)
        tl.store(o_row + HALF + j, o2.to(dt), mask=mask)


def launch_configs():
    """Every (kernel, pointer dtypes, constexprs) the launchers can choose: x, cos, sin, out all
    fp32 or all bf16, forward and backward (``unit["heads"]``: the usual layout, even strides
    and a head size divisible by 32, no stride 1 among the row axes)."""
    for dtype, ptr in _TYPES.items():
        tag = str(dtype).split(".")[-1]
        for bwd in (False, True):
            yield LaunchConfig(f"rotary_{'bwd' if bwd else 'fwd'}-{tag}", _rotary_kernel,
                               {k: ptr for k in ("x_ptr", "cos_ptr", "sin_ptr", "out_ptr")},
                               dict(BACKWARD=bwd, BLOCK_R=_BLOCK_R, BLOCK_H=_BLOCK_H),
                               unit={"heads": ()})


def _check(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in _TYPES or x.dim() != 4 or x.shape[-1] % 2 or (
            x.shape[-1] and x.stride(-1) != 1):
        raise ValueError(f"{op} (triton): {name} must be a float32 or bfloat16 [B, H, L, D] "
                         f"tensor with an even head size D and unit last stride, got {x.dtype} "
                         f"{tuple(x.shape)} with strides {x.stride()}")


def _table(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cos or sin (x's dtype and device, 4-D, broadcastable to x) expanded to x's shape: the
    broadcast axes get stride 0, the last stride is 1."""
    if t.dtype != x.dtype or t.device != x.device or t.dim() != 4 or any(
            a != b and a != 1 for a, b in zip(t.shape, x.shape)):
        raise ValueError(f"{op} (triton): {name} must be a 4-D {x.dtype} tensor on {x.device} "
                         f"broadcastable to {tuple(x.shape)}, got {t.dtype} {tuple(t.shape)} "
                         f"on {t.device}")
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.expand(x.shape)


def _rotary_map(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    """The rotary map of x (or its transpose) with tables expanded to x's shape, in x's memory
    layout (``empty_like``, as torch's elementwise ops)."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    axes = sorted(range(3), key=lambda a: -x.stride(a))   # stable: ties keep (b, h, l)
    n = [x.shape[a] for a in axes]

    def strides(t):
        return [t.stride(a) for a in axes]
    _rotary_kernel[(triton.cdiv(n[0] * n[1] * n[2], _BLOCK_R),)](
        x, cos, sin, out, n[1], n[2], n[0] * n[1] * n[2], x.shape[-1] // 2,
        *strides(x), *strides(cos), *strides(sin), *strides(out),
        BACKWARD=backward, BLOCK_R=_BLOCK_R, BLOCK_H=_BLOCK_H)
    return out


@launcher
def rotary_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The rotary embedding of q and k.

    Args:
        q: [B, Hq, L, D], k: [B, Hk, L, D], fp32 or bf16 (one dtype), unit last stride, D even.
        cos, sin: 4-D of q's dtype, broadcastable to q and to k (usually [B or 1, 1, L, D]).
    Returns:
        (q_out, k_out) in q's and k's memory layouts.
    """
    _check("rotary_fwd", "q", q)
    _check("rotary_fwd", "k", k)
    if k.dtype != q.dtype or k.shape[-1] != q.shape[-1] or k.device != q.device:
        raise ValueError(f"rotary_fwd (triton): k must have q's dtype, head size and device, got "
                         f"q {q.dtype} {tuple(q.shape)}, k {k.dtype} {tuple(k.shape)}")
    return (_rotary_map(q, _table("rotary_fwd", "cos", cos, q),
                        _table("rotary_fwd", "sin", sin, q), False),
            _rotary_map(k, _table("rotary_fwd", "cos", cos, k),
                        _table("rotary_fwd", "sin", sin, k), False))


@launcher
def rotary_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of the rotary map: the gradient of q (or k) from that of its output.

    Args:
        dy: [B, H, L, D] fp32 or bf16, unit last stride, D even. cos, sin: as for
            ``rotary_fwd``.
    Returns:
        dx in dy's memory layout.
    """
    _check("rotary_bwd", "dy", dy)
    return _rotary_map(dy, _table("rotary_bwd", "cos", cos, dy),
                       _table("rotary_bwd", "sin", sin, dy), True)
