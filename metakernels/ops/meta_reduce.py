"""Meta-gradient reductions over the task axis of the bank.

Semantics (PyTorch pseudo-code; ``w`` [T] task weights)::

    fomaml:  out = sum_t w[t] * x[t]               # x = query gradients at the fast weights
    reptile: out = sum_t w[t] * (theta - x[t])     # x = adapted fast weights

FOMAML (and Meta-LoRA) takes the weighted query gradients; Reptile's update direction is the
weighted mean of ``theta - fast[t]`` and is used as a gradient by the outer optimizer.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ._common import check_tensor, record

_OP = "meta_reduce"
KINDS = ("fomaml", "reptile")


def meta_reduce_ref(kind: str, x: torch.Tensor, weights: torch.Tensor,
                    theta: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch reference (differentiable)."""
    if kind == "fomaml":
        return weights.to(x.dtype) @ x
    return weights.sum().to(x.dtype) * theta - weights.to(x.dtype) @ x


def _cpu_reduce(kind, x, weights, theta):
    t = theta if theta is not None else x.new_empty(0)
    return torch.ops.metakernels.meta_reduce(x, weights, t, KINDS.index(kind))


def meta_reduce(kind: str, x: torch.Tensor, weights: torch.Tensor | None = None,
                theta: torch.Tensor | None = None) -> torch.Tensor:
    """Reduces [T, P] per-task vectors to the [P] meta-gradient.

    Args:
        kind: ``"fomaml"`` or ``"reptile"``.
        x: [T, P] fp32: query gradients (fomaml) or fast weights (reptile).
        weights: [T] fp32 task weights; None means ``1/T`` each. A weight of 0 drops a task.
        theta: [P] fp32 meta-parameters, required for reptile.
    Returns:
        [P] fp32.
    """
    if kind not in KINDS:
        raise ValueError(f"{_OP}: kind must be one of {KINDS}, got {kind!r}")
    check_tensor(_OP, "x", x, ndim=2, dtypes=(torch.float32,))
    T, P = x.shape
    if weights is None:
        weights = torch.full((T,), 1.0 / T, dtype=torch.float32, device=x.device)
    check_tensor(_OP, "weights", weights, dtypes=(torch.float32,), shape=(T,), device=x.device)
    if kind == "reptile":
        if theta is None:
            raise ValueError(f"{_OP}: kind='reptile' needs theta [P]")
        check_tensor(_OP, "theta", theta, dtypes=(torch.float32,), shape=(P,), device=x.device)
    name = _backend.resolve(x.device)
    with record(_OP, "forward"):
        if name == "torch" or torch.is_grad_enabled() and (x.requires_grad or (
                theta is not None and theta.requires_grad)):
            return meta_reduce_ref(kind, x, weights, theta)
        return _backend.kernel(_OP, name)(kind, x.contiguous(), weights, theta)
