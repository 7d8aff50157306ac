"""Rotary position embedding of q and k, keeping only cos and sin for the backward.

Semantics (PyTorch pseudo-code; q [B, H, L, D], k [B, Hkv, L, D], cos/sin broadcast to them,
``rotate_half([a, b]) = [-b, a]`` on the halves of the last axis)::

    q_out = q * cos + rotate_half(q) * sin
    k_out = k * cos + rotate_half(k) * sin

Gradients (the map is linear in q and k; ``rotate_half_t([a, b]) = [b, -a]``, its transpose)::

    dq = dq_out * cos + rotate_half_t(dq_out * sin)
    dk = dk_out * cos + rotate_half_t(dk_out * sin)

This is Hugging Face's ``apply_rotary_pos_emb``; the autograd function keeps nothing of q or k.

Backends: ``torch`` (the reference; the backward is built from differentiable ops, so second-order
MAML differentiates through it), ``cpu`` (``torch.ops.metakernels.rotary_fwd/_bwd`` of
``csrc/fused_layers.cpp``: one pass, rounding as the op-by-op form does, bitwise) and the Triton
kernels where ``metakernels.backend.KERNELS`` has them; the kernels take fp32 and bf16 4-D tensors
with a unit last stride and run a first-order backward.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ._common import FLOAT_DTYPES, check_tensor, kernel_backend, record

_OP = "rotary"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """The transpose of ``_rotate_half`` (its inverse): ``[a, b] -> [b, -a]``."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], -x[..., :h]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary map of one of q, k: ``x * cos + rotate_half(x) * sin``."""
    return x * cos + _rotate_half(x) * sin


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference (differentiable twice); cos and sin already broadcast to q, k."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def _kernel(phase: str, *xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """The backend whose rotary kernel takes these [B, H, L, D] tensors (unit last stride)."""
    if not (all(x.dim() == 4 and x.stride(-1) == 1 and x.dtype == cos.dtype for x in xs)
            and sin.dtype == cos.dtype):
        return None
    return kernel_backend(f"rotary.{phase}", *xs, cos, sin)


def _rotary_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary map's transpose (cos and sin broadcast over heads: dy has q's shape)."""
    if not torch.is_grad_enabled():
        name = _kernel("bwd", dy, cos=cos, sin=sin)
        if name is not None:
            return _backend.kernel("rotary.bwd", name)(dy, cos, sin)
    return dy * cos + _rotate_half_t(dy * sin)


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        with record(_OP, "forward"):
            ctx.save_for_backward(cos, sin)
            name = _kernel("fwd", q, k, cos=cos, sin=sin)
            if name is not None:
                return _backend.kernel("rotary.fwd", name)(q, k, cos, sin)
            return rotate(q, cos, sin), rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        with record(_OP, "backward"):
            cos, sin = ctx.saved_tensors
            return (_rotary_bwd(dq, cos, sin) if ctx.needs_input_grad[0] else None,
                    _rotary_bwd(dk, cos, sin) if ctx.needs_input_grad[1] else None, None, None)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb``, keeping only cos and sin for the backward.

    Semantics: see the module docstring.

    Args:
        q: [B, H, L, D], k: [B, Hkv, L, D] (any strides).
        cos, sin: [B or 1, L, D], unsqueezed at ``unsqueeze_dim`` to broadcast over the heads.
    Returns:
        (q_out, k_out): q's and k's shapes.
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(_OP, name, t, dtypes=FLOAT_DTYPES, device=q.device)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad:   # learned positions: plain autograd
        return rotary_ref(q, k, cos, sin)
    return _RotaryFn.apply(q, k, cos, sin)
