"""Multi-task LoRA linear: one frozen base projection, one LoRA adapter per task segment.

Semantics (PyTorch pseudo-code; ``s = layout.offsets``)::

    y = x @ W.T + b                                   # W None: y = 0
    for t in range(T):
        y[s[t]:s[t+1]] += scale * (x[s[t]:s[t+1]] @ A[t]) @ B[t]

Gradients (``g_t = dy_t @ B[t].T``)::

    dx_t  = dy_t @ W + scale * g_t @ A[t].T
    dA[t] = scale * x_t.T @ g_t
    dB[t] = scale * (x_t @ A[t]).T @ dy_t
    dW    = none: the base is frozen

Backends: ``torch`` (the reference, differentiable twice when no gradient buffer is given),
``cpu`` (``torch.ops.metakernels.multi_lora_linear_fwd/_bwd`` from ``csrc/``; the fp32 base GEMMs on
the library ``metakernels.gemm`` chooses; on AVX-512 CPUs the LoRA products one task per thread at
a time, so that a task's rows stay in cache across them, unless the kernel choice
``lora_products`` of ``metakernels.backend`` is ``batched``) and ``triton``.
The LoRA terms are computed in the adapters' dtype (fp32 in the bank) whatever the dtype of x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import gemm as _gemm
from ..layout import TaskLayout
from ._common import FLOAT_DTYPES, check_layout, check_tensor, record

_OP = "multi_lora_linear"


# ---------------------------------------------------------------------------------------------
# Reference (the specification)
# ---------------------------------------------------------------------------------------------
def multi_lora_linear_ref(x, W, b, A, B, layout: TaskLayout, scale: float) -> torch.Tensor:
    """Plain-PyTorch multi-task LoRA linear, differentiable (twice) in x, A, B."""
    xf = x.to(A.dtype)
    parts = [(xf[s:e] @ A[t]) @ B[t] for t, s, e in layout.segments()]
    lora = torch.cat(parts, 0) if parts else xf.new_zeros(0, B.shape[-1])
    base = F.linear(x, W, b) if W is not None else None
    out = scale * lora
    return out.to(x.dtype) if base is None else base + out.to(base.dtype)


# ---------------------------------------------------------------------------------------------
# torch backend: explicit forward/backward with the same contract as the kernels
# ---------------------------------------------------------------------------------------------
def _torch_fwd(x, W, b, A, B, layout: TaskLayout, scale: float):
    T, in_f, r = A.shape
    out_f = B.shape[-1]
    xf = x.to(A.dtype)
    n = layout.uniform
    if n is not None:
        xa = torch.bmm(xf.view(T, n, in_f), A)
        lora = torch.bmm(xa, B).view(-1, out_f)
        xa = xa.view(-1, r)
    else:
        xa = xf.new_empty(x.shape[0], r)
        lora = xf.new_empty(x.shape[0], out_f)
        for t, s, e in layout.segments():
            torch.mm(xf[s:e], A[t], out=xa[s:e])
            torch.mm(xa[s:e], B[t], out=lora[s:e])
    if W is None:
        y = (lora * scale).to(x.dtype)
    else:
        y = F.linear(x, W, b)
        y.add_(lora.to(y.dtype), alpha=scale)
    return y, xa


def _accumulate_bmm(out, a, b, scale: float) -> None:
    """out += scale * a @ b. ``out`` is usually a view of the bank's [T, P] gradient, whose batch
    stride makes ``baddbmm_`` run one ``addmm_`` per task; one ``bmm`` then one add is faster."""
    if out.is_contiguous():
        out.baddbmm_(a, b, alpha=scale)
    else:
        out.add_(torch.bmm(a, b), alpha=scale)


def _torch_bwd(dy, x, W, A, B, xa, layout: TaskLayout, scale: float, dA, dB, need_dx: bool):
    T, in_f, r = A.shape
    out_f = B.shape[-1]
    xf = x.to(A.dtype)
    dyf = dy.to(A.dtype)
    n = layout.uniform
    if n is not None:
        dy3 = dyf.view(T, n, out_f)
        g = torch.bmm(dy3, B.transpose(1, 2))                       # [T, n, r]
        _accumulate_bmm(dA, xf.view(T, n, in_f).transpose(1, 2), g, scale)
        _accumulate_bmm(dB, xa.view(T, n, r).transpose(1, 2), dy3, scale)
        dx_lora = torch.bmm(g, A.transpose(1, 2)).view(-1, in_f) if need_dx else None
    else:
        dx_lora = xf.new_empty(x.shape[0], in_f) if need_dx else None
        for t, s, e in layout.segments():
            g = dyf[s:e] @ B[t].T
            dA[t].addmm_(xf[s:e].T, g, alpha=scale)
            dB[t].addmm_(xa[s:e].T, dyf[s:e], alpha=scale)
            if need_dx:
                torch.mm(g, A[t].T, out=dx_lora[s:e])
    if not need_dx:
        return None
    if W is None:
        return (dx_lora * scale).to(x.dtype)
    dx = dy @ W.to(dy.dtype)
    dx.add_(dx_lora.to(dx.dtype), alpha=scale)
    return dx


# ---------------------------------------------------------------------------------------------
# cpu backend: the C++ kernels
# ---------------------------------------------------------------------------------------------
def _cpu_fwd(x, W, b, A, B, layout: TaskLayout, scale: float):
    onednn = W is not None and _gemm.use_onednn(x, W)
    return torch.ops.metakernels.multi_lora_linear_fwd(
        x, W, b, A, B, layout.offsets_tensor(x.device), float(scale), onednn,
        _backend.lora_per_task())


def _cpu_bwd(dy, x, W, A, B, xa, layout: TaskLayout, scale: float, dA, dB, need_dx: bool):
    onednn = need_dx and W is not None and _gemm.use_onednn(dy, W)
    dx = torch.ops.metakernels.multi_lora_linear_bwd(
        dy, x, W, A, B, xa, layout.offsets_tensor(x.device), float(scale), dA, dB, need_dx,
        onednn, _backend.lora_per_task())
    return dx if need_dx else None


class _MultiLoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, A, B, layout, scale, grad_A, grad_B, backend_name):
        with record(_OP, "forward"):
            y, xa = _backend.kernel("multi_lora_linear.fwd", backend_name)(x, W, b, A, B, layout,
                                                                           scale)
            ctx.save_for_backward(x, W, A, B, xa)
            ctx.layout, ctx.scale = layout, scale
            ctx.bwd = _backend.kernel("multi_lora_linear.bwd", backend_name)
            ctx.grad_A, ctx.grad_B = grad_A, grad_B
            return y

    @staticmethod
    def backward(ctx, dy):
        with record(_OP, "backward"):
            x, W, A, B, xa = ctx.saved_tensors
            sink = ctx.grad_A is not None
            if sink:
                dA, dB = ctx.grad_A, ctx.grad_B
            else:
                dA, dB = torch.zeros_like(A), torch.zeros_like(B)
            need_dx = ctx.needs_input_grad[0]
            dx = ctx.bwd(dy.contiguous(), x, W, A, B, xa, ctx.layout, ctx.scale, dA, dB, need_dx)
            db = dy.sum(0) if ctx.needs_input_grad[2] else None
            if sink:
                return dx, None, db, None, None, None, None, None, None, None
            return dx, None, db, dA, dB, None, None, None, None, None


def _check(x, W, b, A, B, layout, grad_A, grad_B):
    check_tensor(_OP, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    N, in_f = x.shape
    check_tensor(_OP, "A", A, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
    T, _, r = A.shape
    check_tensor(_OP, "A", A, shape=(T, in_f, r))
    check_tensor(_OP, "B", B, ndim=3, dtypes=(A.dtype,), device=x.device)
    out_f = B.shape[-1]
    check_tensor(_OP, "B", B, shape=(T, r, out_f))
    if W is not None:
        check_tensor(_OP, "W", W, ndim=2, dtypes=FLOAT_DTYPES, shape=(out_f, in_f), device=x.device)
        if W.requires_grad:
            raise ValueError(f"{_OP}: W requires grad, but the base weight must be frozen "
                             f"(no gradient is computed for it)")
    if b is not None:
        if W is None:
            raise ValueError(f"{_OP}: b is given without W")
        check_tensor(_OP, "b", b, ndim=1, shape=(out_f,), device=x.device)
    if (grad_A is None) != (grad_B is None):
        raise ValueError(f"{_OP}: give both grad_A and grad_B, or neither")
    if grad_A is not None:
        check_tensor(_OP, "grad_A", grad_A, dtypes=(A.dtype,), shape=tuple(A.shape), device=x.device)
        check_tensor(_OP, "grad_B", grad_B, dtypes=(B.dtype,), shape=tuple(B.shape), device=x.device)
    check_layout(_OP, layout, N, T)


def multi_lora_linear(x: torch.Tensor, W: torch.Tensor | None, b: torch.Tensor | None,
                      A: torch.Tensor, B: torch.Tensor, layout: TaskLayout, scale: float,
                      grad_A: torch.Tensor | None = None, grad_B: torch.Tensor | None = None,
                      ) -> torch.Tensor:
    """Frozen linear plus one LoRA adapter per task segment of the rows.

    Semantics: see the module docstring.

    Args:
        x: [N, in], rows grouped by task as ``layout`` says (fp32, bf16 or fp16).
        W: [out, in] frozen base weight (any strides, e.g. a transposed ``Conv1D`` weight), or
            None for the LoRA term alone. b: [out] or None.
        A: [T, in, r], B: [T, r, out]: the adapters, usually views of the bank's fast weights.
        layout: ``TaskLayout`` over the N rows (ragged and empty tasks allowed).
        scale: ``alpha / rank``.
        grad_A, grad_B: optional [T, in, r] / [T, r, out] buffers (views of the bank's flat
            gradient). When given, the backward ADDS dA and dB into them in place and A, B
            receive no autograd gradient; when None, dA and dB flow through autograd.
    Returns:
        y: [N, out], dtype of x.
    """
    _check(x, W, b, A, B, layout, grad_A, grad_B)
    name = _backend.resolve(x.device)
    if name == "torch" and grad_A is None:
        with record(_OP, "forward"):
            return multi_lora_linear_ref(x, W, b, A, B, layout, scale)
    return _MultiLoraLinearFn.apply(x, W, b, A, B, layout, float(scale), grad_A, grad_B, name)
