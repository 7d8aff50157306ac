"""RMSNorm of a frozen base, keeping only what its backward needs.

Semantics (PyTorch pseudo-code; x [..., D], rows x[i]; computed in fp32, fp64 for fp64 x)::

    r[i] = rsqrt(mean(x[i] ** 2) + eps)
    y[i] = weight * (x[i] * r[i]).to(x.dtype)

Gradients (``xhat = x * r``, ``g = dy * weight``)::

    dx[i]   = r[i] * (g[i] - xhat[i] * mean(g[i] * xhat[i]))
    dweight = sum_i dy[i] * xhat[i]

This is Hugging Face's ``LlamaRMSNorm.forward`` (but for fp64 inputs, computed in fp64). The
autograd function keeps x and r; under the kernels, with a frozen weight that has no zero, it
keeps y instead of x (``xhat = y / weight``): the next layer (the q/k/v LoRA, the loss) keeps y
anyway, so the norm then keeps nothing of its own.

Backends: ``torch`` (the reference; its backward built from differentiable ops, so that
second-order MAML differentiates through it), ``cpu`` (``torch.ops.metakernels.rms_norm_fwd/_bwd``
of ``csrc/fused_layers.cpp``: one pass over each row; within an ulp or two of the reference, the
row sum taken in another order) and the Triton kernels where ``metakernels.backend.KERNELS`` has
them; the kernels take fp32 and bf16 (computed in fp32) and run a first-order backward; a double
backward runs the torch form, and raises for a norm that kept its output.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ._common import FLOAT_DTYPES, check_tensor, kernel_backend, record

_OP = "rms_norm"


def _rsqrt_mean_square(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x in the compute dtype (fp32; fp64 for fp64 inputs) and its per-row
    ``rsqrt(mean(x**2) + eps)``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf, torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-PyTorch reference (differentiable twice)."""
    xf, r = _rsqrt_mean_square(x, eps)
    return weight * (xf * r).to(x.dtype)


def nonzero_weight(weight: torch.Tensor) -> bool:
    """Whether ``weight`` has no zero, so that a norm may keep its output instead of its input
    (``xhat = y / weight``). Cached on the tensor per version: a frozen norm weight is checked
    once, not at every call."""
    key = (weight._version, weight.data_ptr())
    cached = getattr(weight, "_metakernels_nonzero", None)
    if cached is None or cached[0] != key:
        cached = (key, bool(torch.all(weight != 0)))
        weight._metakernels_nonzero = cached
    return cached[1]


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        with record(_OP, "forward"):
            ctx.eps = eps
            ctx.x_is_output = False
            name = kernel_backend("rms_norm.fwd", x, weight) if x.dtype == weight.dtype else None
            ctx.backend = name
            if name is not None:
                y, r = _backend.kernel("rms_norm.fwd", name)(x, weight, eps)
                # Keep the output, not the input, where the weight allows xhat = y / weight (and
                # is frozen): the next layer usually keeps y anyway, and x is then freed.
                ctx.x_is_output = not ctx.needs_input_grad[1] and nonzero_weight(weight)
                ctx.save_for_backward(y if ctx.x_is_output else x, weight, r)
                return y
            xf, r = _rsqrt_mean_square(x, eps)
            ctx.save_for_backward(x, weight, r)
            return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        with record(_OP, "backward"):
            x, weight, r = ctx.saved_tensors
            if ctx.x_is_output:
                if torch.is_grad_enabled():
                    raise RuntimeError(
                        "rms_norm: this RMSNorm ran the first-order kernels, which keep its "
                        "output instead of its input; for a second-order gradient "
                        "(create_graph=True) run it under metakernels.backend.use_backend('torch')")
                return _backend.kernel("rms_norm.bwd", ctx.backend)(dy, x, weight, r, True), \
                    None, None
            if not torch.is_grad_enabled() and not ctx.needs_input_grad[1] \
                    and dy.dtype == x.dtype == weight.dtype:
                name = kernel_backend("rms_norm.bwd", dy, x, weight, r)
                if name is not None:
                    return _backend.kernel("rms_norm.bwd", name)(dy, x, weight, r), None, None
            if torch.is_grad_enabled():
                # Double backward: r was computed without a graph in the forward; recompute it
                # from x so that the second derivative sees its dependence on x.
                _, r = _rsqrt_mean_square(x, ctx.eps)
            xhat = x.to(r.dtype) * r
            dx = dw = None
            if ctx.needs_input_grad[0]:
                g = (dy * weight).to(r.dtype)
                dx = (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
            if ctx.needs_input_grad[1]:
                dw = (dy * xhat.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
            return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, saving only x (or y) and the per-row rsqrt.

    Semantics: see the module docstring.

    Args:
        x: [..., D] (fp32, bf16, fp16 or fp64). weight: [D]. eps: added to the mean square.
    Returns:
        y: x's shape and dtype.
    """
    check_tensor(_OP, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "weight", weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(x.shape[-1],),
                 device=x.device)
    return _RMSNormFn.apply(x, weight, eps)
