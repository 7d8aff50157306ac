"""Triton kernels of ``multi_lora_linear``: punica-style segmented GEMMs (SGMV) for the LoRA terms.

Semantics (PyTorch pseudo-code; ``s = layout.offsets``, rows of task t are ``s[t]:s[t+1]``)::

    forward:   xa[s[t]:s[t+1]] = x[s[t]:s[t+1]] @ A[t]                         # shrink
               y = x @ W.T + b                                                  # torch GEMM
               y[s[t]:s[t+1]] += scale * xa[s[t]:s[t+1]] @ B[t]                 # expand
    backward:  g[s[t]:s[t+1]] = dy[s[t]:s[t+1]] @ B[t].T                        # shrink
               dA[t] += scale * x[s[t]:s[t+1]].T @ g[s[t]:s[t+1]]               # segment outer
               dB[t] += scale * xa[s[t]:s[t+1]].T @ dy[s[t]:s[t+1]]             # segment outer
               dx = dy @ W                                                      # torch GEMM
               dx[s[t]:s[t+1]] += scale * g[s[t]:s[t+1]] @ A[t].T               # expand

The frozen base GEMMs stay with torch (cuBLAS on a GPU); the kernels here do the per-task terms.
``fwd``/``bwd`` have exactly the contract of ``_torch_fwd``/``_torch_bwd`` in
``metakernels/ops/multi_lora_linear.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...layout import TaskLayout

_BLOCK_M = 32      # rows of a task segment per tile
_MIN_BLOCK = 16    # tl.dot needs every tile dimension >= 16: ranks 1..15 are padded with masks
_MAX_BLOCK = 64


@triton.jit
def _sgmv_kernel(inp_ptr, w_ptr, out_ptr, offsets_ptr, K, N, scale,
                 stride_im, stride_ik, stride_wt, stride_wk, stride_wn, stride_om, stride_on,
                 ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Segmented GEMM, one task per grid column ``program_id(2)``.

    Semantics::

        out[s[t]:s[t+1]] = (out[s[t]:s[t+1]] if ACCUMULATE else 0)
                           + scale * inp[s[t]:s[t+1]] @ w[t]

    inp [M, K] (any float dtype), w [T, K, N] (any strides: ``B.transpose(1, 2)`` is passed for
    ``dy @ B[t].T``), out [M, N]. Grid: (cdiv(max segment rows, BLOCK_M), cdiv(N, BLOCK_N), T).
    Gradients: none (the backward of the op is built from this kernel and the next one).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.program_id(2)
    start = tl.load(offsets_ptr + t)
    end = tl.load(offsets_ptr + t + 1)
    row0 = start + pid_m * BLOCK_M
    if row0 >= end:  # this task has fewer rows than the longest one (or none)
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rows < end
    col_ok = cols < N
    w_base = w_ptr + t.to(tl.int64) * stride_wt
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(inp_ptr + rows[:, None] * stride_im + ks[None, :] * stride_ik,
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0).to(tl.float32)
        b = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks[:, None] < K) & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision="ieee")
    acc = acc * scale
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_outer_kernel(lhs_ptr, rhs_ptr, out_ptr, offsets_ptr, I, J, scale,
                          stride_lm, stride_li, stride_rm, stride_rj,
                          stride_ot, stride_oi, stride_oj,
                          BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per-task sum of outer products over the rows of each segment, added in place.

    Semantics::

        out[t] += scale * lhs[s[t]:s[t+1]].T @ rhs[s[t]:s[t+1]]

    lhs [M, I], rhs [M, J] (any float dtypes), out [T, I, J] with any strides (a view of the
    bank's flat gradient buffer). Each program owns one (I, J) tile of one task, so the
    read-add-write needs no atomics; an empty task is not touched.
    Grid: (cdiv(I, BLOCK_I), cdiv(J, BLOCK_J), T).
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    t = tl.program_id(2)
    start = tl.load(offsets_ptr + t)
    end = tl.load(offsets_ptr + t + 1)
    if start == end:
        return
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    rm = tl.arange(0, BLOCK_M)
    i_ok = ri < I
    j_ok = rj < J
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + rm).to(tl.int64)
        row_ok = rows < end
        lhs_t = tl.load(lhs_ptr + rows[None, :] * stride_lm + ri[:, None] * stride_li,
                        mask=i_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
        rhs = tl.load(rhs_ptr + rows[:, None] * stride_rm + rj[None, :] * stride_rj,
                      mask=row_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(lhs_t, rhs, input_precision="ieee")
    out_ptrs = (out_ptr + t.to(tl.int64) * stride_ot + ri[:, None] * stride_oi
                + rj[None, :] * stride_oj)
    mask = i_ok[:, None] & j_ok[None, :]
    cur = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (cur + scale * acc).to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return min(_MAX_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(n)))


def _sgmv(inp, w, out, layout: TaskLayout, scale: float, accumulate: bool) -> None:
    """``out[s_t:e_t] (+)= scale * inp[s_t:e_t] @ w[t]`` for every task (in place in ``out``)."""
    max_rows = max(layout.sizes)
    if max_rows == 0:
        return
    T, K, N = w.shape
    BLOCK_N = _block(N)
    grid = (triton.cdiv(max_rows, _BLOCK_M), triton.cdiv(N, BLOCK_N), T)
    _sgmv_kernel[grid](
        inp, w, out, layout.offsets_tensor(inp.device), K, N, float(scale),
        inp.stride(0), inp.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, BLOCK_M=_BLOCK_M, BLOCK_K=_block(K), BLOCK_N=BLOCK_N)


def _segment_outer_(out, lhs, rhs, layout: TaskLayout, scale: float) -> None:
    """``out[t] += scale * lhs[s_t:e_t].T @ rhs[s_t:e_t]`` for every task (in place)."""
    T, I, J = out.shape
    BLOCK_I, BLOCK_J = _block(I), _block(J)
    grid = (triton.cdiv(I, BLOCK_I), triton.cdiv(J, BLOCK_J), T)
    _segment_outer_kernel[grid](
        lhs, rhs, out, layout.offsets_tensor(lhs.device), I, J, float(scale),
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=_BLOCK_M, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J)


def fwd(x, W, b, A, B, layout: TaskLayout, scale: float):
    """Forward of ``multi_lora_linear``.

    Args:
        x: [N, in] fp32/bf16/fp16, any strides. W: [out, in] or None; b: [out] or None.
        A: [T, in, r], B: [T, r, out] (any strides). layout: over the N rows. scale: alpha / rank.
    Returns:
        y: [N, out] in x's dtype; xa = x_t @ A[t] per segment, [N, r] in A's dtype (saved for
        the backward).
    """
    N = x.shape[0]
    r = A.shape[-1]
    xa = torch.empty(N, r, dtype=A.dtype, device=x.device)
    _sgmv(x, A, xa, layout, 1.0, accumulate=False)
    if W is None:
        y = torch.empty(N, B.shape[-1], dtype=x.dtype, device=x.device)
        _sgmv(xa, B, y, layout, scale, accumulate=False)
    else:
        y = F.linear(x, W, b)
        _sgmv(xa, B, y, layout, scale, accumulate=True)
    return y, xa


def bwd(dy, x, W, A, B, xa, layout: TaskLayout, scale: float, dA, dB, need_dx: bool):
    """Backward of ``multi_lora_linear``.

    Args:
        dy: [N, out] (x's dtype). x, W, A, B, xa: as in and out of ``fwd``.
        dA: [T, in, r], dB: [T, r, out] in A's dtype, any strides (views of the bank's flat
            gradient buffer): dA, dB are ADDED into them in place.
        need_dx: whether to compute dx.
    Returns:
        dx [N, in] in x's dtype, or None when ``need_dx`` is False.
    """
    g = torch.empty(x.shape[0], A.shape[-1], dtype=A.dtype, device=x.device)
    _sgmv(dy, B.transpose(1, 2), g, layout, 1.0, accumulate=False)
    _segment_outer_(dA, x, g, layout, scale)
    _segment_outer_(dB, xa, dy, layout, scale)
    if not need_dx:
        return None
    if W is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        _sgmv(g, A.transpose(1, 2), dx, layout, scale, accumulate=False)
    else:
        dx = dy @ W.to(dy.dtype)
        _sgmv(g, A.transpose(1, 2), dx, layout, scale, accumulate=True)
    return dx
