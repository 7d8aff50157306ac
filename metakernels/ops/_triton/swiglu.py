"""Triton kernels of SwiGLU (``silu(gate) * up``), forward and backward, one pass each.

Semantics (PyTorch pseudo-code; gate, up, dy of one shape and dtype, elementwise)::

    forward:   s = sigmoid(gate)
               y = (gate * s).to(gate.dtype) * up                  # silu rounded as the library's
    backward:  dgate = dy * up * s * (1 + gate * (1 - s))          # d/dgate of silu(gate) * up
               dup   = dy * gate * s

The backward takes gate and up only: ``silu(gate)``, which the op-by-op form keeps as a third
[tokens, intermediate] tensor, is recomputed. bf16 is read as bf16 and computed in fp32, each
result rounded once (the forward's silu is rounded to gate's dtype first, as the library's
``F.silu(gate) * up`` rounds it). ``swiglu_fwd`` and ``swiglu_bwd`` have the signatures and
semantics of ``torch.ops.metakernels.swiglu_fwd``/``swiglu_bwd`` (``csrc/fused_layers.cpp``).

A 1-D grid over the flattened elements; offsets are int64 (tokens x intermediate passes 2^31 in
a 32-task meta-batch of an 8B model).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LaunchConfig, launcher

_BLOCK = 1024
_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """``y = (gate * sigmoid(gate)).to(y's dtype) * up`` over ``n`` elements.
    Grid: (cdiv(n, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (silu * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    """``dgate = dy * up * s * (1 + gate * (1 - s))``, ``dup = dy * gate * s``,
    ``s = sigmoid(gate)``, over ``n`` elements. Grid: (cdiv(n, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    out = dgate_ptr.dtype.element_ty
    tl.store(dgate_ptr + offs, (d * u * s * (1.0 + g * (1.0 - s))).to(out), mask=mask)
    tl.store(dup_ptr + offs, (d * (g * s)).to(out), mask=mask)


def launch_configs():
    """Every (kernel, pointer dtypes, constexprs) the launchers can choose: all tensors fp32 or
    all bf16 (``unit["flat"]``: n divisible by 16)."""
    for dtype, ptr in _TYPES.items():
        tag = str(dtype).split(".")[-1]
        yield LaunchConfig(f"swiglu_fwd-{tag}", _swiglu_fwd_kernel,
                           {"gate_ptr": ptr, "up_ptr": ptr, "y_ptr": ptr}, dict(BLOCK=_BLOCK),
                           unit={"flat": ()})
        yield LaunchConfig(f"swiglu_bwd-{tag}", _swiglu_bwd_kernel,
                           {k: ptr for k in ("dy_ptr", "gate_ptr", "up_ptr", "dgate_ptr",
                                             "dup_ptr")}, dict(BLOCK=_BLOCK), unit={"flat": ()})


def _check(op: str, gate: torch.Tensor, **others: torch.Tensor) -> None:
    if gate.dtype not in _TYPES:
        raise TypeError(f"{op} (triton): gate must be float32 or bfloat16, got {gate.dtype}")
    for name, t in others.items():
        if t.dtype != gate.dtype or t.shape != gate.shape or t.device != gate.device:
            raise ValueError(f"{op} (triton): {name} must be like gate ({gate.dtype} "
                             f"{tuple(gate.shape)} on {gate.device}), got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


@launcher
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``. gate, up: one shape, fp32 or bf16. Returns y like gate,
    contiguous."""
    _check("swiglu_fwd", gate, up=up)
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, y, n, BLOCK=_BLOCK)
    return y


@launcher
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Gradients of ``silu(gate) * up``. dy, gate, up: one shape, fp32 or bf16. Returns
    (dgate, dup) like gate, contiguous."""
    _check("swiglu_bwd", gate, dy=dy, up=up)
    d, g, u = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(g), torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](d, g, u, dgate, dup, n, BLOCK=_BLOCK)
    return dgate, dup
