"""Attention of a frozen base's prefill, forward and backward in one pass over each block.

Semantics (PyTorch pseudo-code; q [B, H, L, D], k and v [B, Hkv, L, D] with H a multiple of
Hkv, query head h reading key head ``h // (H // Hkv)``)::

    s = (q @ k.T) * scale                          # [B, H, L, L]
    s = s.masked_fill(~keep, -inf)                 # keep: mask, or causal (tril), or all
    p = softmax(s, -1)                             # a row with no key kept: p = 0
    out = p @ v

Gradients (``dp = dout @ v.T``, ``ds = p * (dp - rowsum(dout * out))``)::

    dq = scale * ds @ k;  dk = scale * ds.T @ q;  dv = p.T @ dout     (summed over a group's heads)

Backends: ``torch`` (the reference, ``F.scaled_dot_product_attention`` with the key heads
repeated; differentiable twice) and ``cpu`` (``torch.ops.metakernels.attention_fwd/_bwd`` of
``csrc/attention.cpp``: blocks of 32 query rows against every key they may see, a causal block
stopping at its last row's key, with the softmax, the output and the backward's products of a
block done while its scores are in cache; grouped-query heads without repeating k and v; fp32,
and bf16 converted a head at a time and rounded once). The kernel takes prefills (as many queries
as keys) of at most ``ATTENTION_MAX_LEN`` tokens with no mask, a causal mask or a boolean mask
[B or 1, 1, L, L]; everything else runs the reference. It has no double backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ._common import FLOAT_DTYPES, check_tensor, kernel_backend, record

_OP = "attention"
ATTENTION_MAX_LEN = 256   # a head's K^T and a block's [32, L] scores stay in L2; longer: SDPA


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  causal: bool, scale: float) -> torch.Tensor:
    """Plain-PyTorch reference (the library's SDPA; a fully masked row is its business)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          is_causal=causal and mask is None, scale=scale)


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, name):
        with record(_OP, "forward"):
            out, lse = _backend.kernel("attention.fwd", name)(q, k, v, mask, causal, scale)
            ctx.save_for_backward(q, k, v, out, lse, mask)
            ctx.causal, ctx.scale, ctx.backend = causal, scale, name
            return out

    @staticmethod
    def backward(ctx, dout):
        with record(_OP, "backward"):
            if torch.is_grad_enabled():
                raise RuntimeError("attention: the attention kernel has no double backward; for "
                                   "a second-order gradient (create_graph=True) run under "
                                   "metakernels.backend.use_backend('torch')")
            q, k, v, out, lse, mask = ctx.saved_tensors
            dout = dout if dout.stride(-1) == 1 else dout.contiguous()
            dq, dk, dv = _backend.kernel("attention.bwd", ctx.backend)(
                dout, q, k, v, out, lse, mask, ctx.causal, ctx.scale)
            return dq, dk, dv, None, None, None, None


def kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> str | None:
    """The backend whose attention kernel computes these inputs (see the module docstring), or
    None."""
    L = q.shape[2]
    if not (k.shape[2] == L <= ATTENTION_MAX_LEN and v.shape[-1] == q.shape[-1]
            and q.shape[1] % k.shape[1] == 0 and all(t.stride(-1) == 1 for t in (q, k, v))):
        return None
    if mask is not None and not (mask.dtype == torch.bool and mask.dim() == 4
                                 and mask.shape[1] == 1 and mask.shape[2:] == (L, L)
                                 and mask.shape[0] in (1, q.shape[0])):
        return None
    if not q.dtype == k.dtype == v.dtype:
        return None
    return kernel_backend("attention.fwd", q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped key heads.

    Semantics: see the module docstring.

    Args:
        q: [B, H, L, D]; k, v: [B, Hkv, L', D] with H % Hkv == 0.
        mask: None or boolean [B or 1, 1, L, L'] (True: attend). causal: with no mask, each
            query sees the keys up to its own position. scale: default ``D ** -0.5``.
    Returns:
        out: [B, H, L, D], q's dtype (the kernel's is a transposed view of [B, L, H, D]).
    """
    check_tensor(_OP, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor(_OP, "v", v, ndim=4, dtypes=FLOAT_DTYPES, shape=tuple(k.shape), device=q.device)
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{_OP}: q [B, H, L, D] and k [B, Hkv, L', D] need the same B and D and "
                         f"H a multiple of Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    causal = bool(causal and mask is None and q.shape[2] > 1)
    name = kernel_applies(q, k, v, mask)
    if name is None:
        return attention_ref(q, k, v, mask, causal, scale)
    return _AttentionFn.apply(q, k, v, mask, causal, scale, name)
