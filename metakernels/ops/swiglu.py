"""SwiGLU of a frozen base's MLP, keeping only gate and up for the backward.

Semantics (PyTorch pseudo-code; elementwise, gate and up of one shape)::

    y = silu(gate) * up                        # silu(g) = g * sigmoid(g)

Gradients (``s = sigmoid(gate)``)::

    dgate = dy * up * s * (1 + gate * (1 - s))
    dup   = dy * silu(gate)

``F.silu(gate) * up`` keeps ``silu(gate)`` as well; the backward here recomputes it (one
[tokens, intermediate] tensor per layer less).

Backends: ``torch`` (the reference; a double backward through the differentiable formula),
``cpu`` (``torch.ops.metakernels.swiglu_fwd/_bwd`` of ``csrc/fused_layers.cpp``: one pass, within
an ulp or two of the reference, the exp taken in another way) and the Triton kernels where
``metakernels.backend.KERNELS`` has them; the kernels take fp32 and bf16 (computed in fp32) and
run a first-order backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ._common import FLOAT_DTYPES, check_tensor, kernel_backend, record

_OP = "swiglu"


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference (differentiable twice)."""
    return F.silu(gate) * up


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        with record(_OP, "forward"):
            ctx.save_for_backward(gate, up)
            name = kernel_backend("swiglu.fwd", gate, up) if gate.dtype == up.dtype else None
            if name is not None:
                return _backend.kernel("swiglu.fwd", name)(gate, up)
            return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        with record(_OP, "backward"):
            gate, up = ctx.saved_tensors
            if not torch.is_grad_enabled() and dy.dtype == gate.dtype == up.dtype:
                name = kernel_backend("swiglu.bwd", dy, gate, up)
                if name is not None:
                    dgate, dup = _backend.kernel("swiglu.bwd", name)(dy, gate, up)
                    return (dgate if ctx.needs_input_grad[0] else None,
                            dup if ctx.needs_input_grad[1] else None)
            dgate = dup = None
            if ctx.needs_input_grad[0]:
                if torch.is_grad_enabled():          # double backward: differentiable formula
                    s = torch.sigmoid(gate)
                    dgate = dy * up * s * (1 + gate * (1 - s))
                else:
                    dgate = torch.ops.aten.silu_backward(dy * up, gate)
            if ctx.needs_input_grad[1]:
                dup = dy * F.silu(gate)
            return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, saving only gate and up.

    Semantics: see the module docstring.

    Args:
        gate, up: tensors of one shape (the MLP's gate and up projections).
    Returns:
        y: their shape, the dtype of ``silu(gate) * up``.
    """
    check_tensor(_OP, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "up", up, dtypes=FLOAT_DTYPES, shape=tuple(gate.shape), device=gate.device)
    return _SwiGLUFn.apply(gate, up)
