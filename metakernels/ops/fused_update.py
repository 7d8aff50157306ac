"""One pass over the whole [T, P] bank: per-task clip, SGD or Adam(W) step, non-finite skip.

Semantics (PyTorch pseudo-code, for every task t; ``g = grad[t]``)::

    norm[t] = ||g||_2
    finite[t] = isfinite(norm[t])            # a NaN or Inf anywhere in g makes it False
    if not finite[t]: continue               # fast[t] and its optimizer state stay unchanged
    if max_grad_norm > 0: g = g * min(1, max_grad_norm / (norm[t] + 1e-6))
    sgd:   g = g + weight_decay * fast[t];  fast[t] -= lr[t] * g
    adam:  step[t] += 1
           fast[t] *= 1 - lr[t] * weight_decay                   # decoupled (AdamW)
           m[t] = beta1 m[t] + (1 - beta1) g;  v[t] = beta2 v[t] + (1 - beta2) g^2
           fast[t] -= lr[t] / (1 - beta1^step) * m[t] / (sqrt(v[t] / (1 - beta2^step)) + eps)

This is what ``torch.nn.utils.clip_grad_norm_`` followed by ``torch.optim.SGD`` / ``Adam(W)``
does to one task's parameters; the per-task loop over a PEFT model is tested against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backend as _backend
from ._common import check_tensor, record

_OP = "fused_update"
_EPS_CLIP = 1e-6


@dataclass
class AdamState:
    """Inner Adam state of the bank: exp_avg, exp_avg_sq [T, P]; step [T] (fp32 counts)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor

    @classmethod
    def zeros_like(cls, fast: torch.Tensor) -> "AdamState":
        return cls(torch.zeros_like(fast), torch.zeros_like(fast),
                   torch.zeros(fast.shape[0], dtype=torch.float32, device=fast.device))

    def zero_(self) -> None:
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.step.zero_()


def _clip_coef(norms, finite, max_grad_norm):
    if max_grad_norm > 0:
        coef = torch.clamp(max_grad_norm / (norms + _EPS_CLIP), max=1.0)
    else:
        coef = torch.ones_like(norms)
    return torch.where(finite, coef, torch.zeros_like(coef))


def fused_update_ref(fast, grad, lr, *, optimizer="sgd", state: AdamState | None = None,
                     max_grad_norm=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Plain-PyTorch reference, vectorised over tasks; updates ``fast`` (and state) in place."""
    norms = torch.linalg.vector_norm(grad.float(), dim=1)
    finite = torch.isfinite(norms)
    coef = _clip_coef(norms, finite, max_grad_norm)
    keep = finite[:, None]
    g = torch.where(keep, grad * coef[:, None].to(grad.dtype), torch.zeros_like(grad))
    lr_col = lr[:, None].to(fast.dtype)
    if optimizer == "sgd":
        if weight_decay:
            g = g + weight_decay * fast
        new = fast - lr_col * g
    else:
        b1, b2 = betas
        step = state.step + finite.to(state.step.dtype)
        m = torch.where(keep, state.exp_avg * b1 + (1 - b1) * g, state.exp_avg)
        v = torch.where(keep, state.exp_avg_sq * b2 + (1 - b2) * g * g, state.exp_avg_sq)
        # bias corrections in float64: 1 - 0.999**step in fp32 cancels to ~1e-4 relative error
        safe_step = torch.clamp(step, min=1.0).double()[:, None]
        step_size = (lr_col.double() / (1 - b1 ** safe_step)).to(fast.dtype)
        bc2_sqrt = (1 - b2 ** safe_step).sqrt().to(fast.dtype)
        new = fast * (1 - lr_col * weight_decay) if weight_decay else fast
        denom = (v.sqrt() / bc2_sqrt) + eps
        new = new - step_size * m / denom
        state.exp_avg.copy_(m)
        state.exp_avg_sq.copy_(v)
        state.step.copy_(step)
    fast.copy_(torch.where(keep, new, fast))
    return norms, finite


def _cpu_update(fast, grad, lr, *, optimizer, state, max_grad_norm, betas, eps, weight_decay):
    ops = torch.ops.metakernels
    if optimizer == "sgd":
        return ops.fused_sgd_(fast, grad, lr, float(max_grad_norm), float(weight_decay))
    return ops.fused_adam_(fast, grad, state.exp_avg, state.exp_avg_sq, state.step, lr,
                           float(max_grad_norm), float(betas[0]), float(betas[1]), float(eps),
                           float(weight_decay))


def fused_update(fast: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor | float, *,
                 optimizer: str = "sgd", state: AdamState | None = None,
                 max_grad_norm: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Updates every task's fast weights in one pass.

    Semantics: see the module docstring.

    Args:
        fast: [T, P] fp32, updated in place. grad: [T, P] fp32 (read only).
        lr: [T] per-task learning rates, or a float for all tasks.
        optimizer: ``"sgd"`` or ``"adam"`` (AdamW when ``weight_decay`` > 0).
        state: ``AdamState`` for ``"adam"``, updated in place.
        max_grad_norm: per-task clipping threshold; 0 disables clipping.
    Returns:
        (norms [T] fp32: each task's gradient norm before clipping,
         finite [T] bool: False where the task was skipped for a non-finite gradient).
    """
    check_tensor(_OP, "fast", fast, ndim=2, dtypes=(torch.float32,))
    T, P = fast.shape
    check_tensor(_OP, "grad", grad, dtypes=(torch.float32,), shape=(T, P), device=fast.device)
    if not isinstance(lr, torch.Tensor):
        lr = torch.full((T,), float(lr), dtype=torch.float32, device=fast.device)
    check_tensor(_OP, "lr", lr, dtypes=(torch.float32,), shape=(T,), device=fast.device)
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"{_OP}: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if optimizer == "adam":
        if state is None:
            raise ValueError(f"{_OP}: optimizer='adam' needs state=AdamState")
        check_tensor(_OP, "state.exp_avg", state.exp_avg, dtypes=(torch.float32,), shape=(T, P),
                     device=fast.device)
        check_tensor(_OP, "state.exp_avg_sq", state.exp_avg_sq, dtypes=(torch.float32,),
                     shape=(T, P), device=fast.device)
        check_tensor(_OP, "state.step", state.step, dtypes=(torch.float32,), shape=(T,),
                     device=fast.device)
    if max_grad_norm < 0:
        raise ValueError(f"{_OP}: max_grad_norm must be >= 0, got {max_grad_norm}")
    if not fast.is_contiguous() or not grad.is_contiguous():
        raise ValueError(f"{_OP}: fast and grad must be contiguous [T, P] buffers")
    with torch.no_grad(), record(_OP, "forward"):
        return _backend.kernel(_OP, _backend.resolve(fast.device))(
            fast, grad, lr, optimizer=optimizer, state=state, max_grad_norm=max_grad_norm,
            betas=betas, eps=eps, weight_decay=weight_decay)
