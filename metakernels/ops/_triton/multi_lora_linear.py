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
``fwd``/``bwd`` have the contract of ``_torch_fwd``/``_torch_bwd`` in
``metakernels/ops/multi_lora_linear.py``.

Numerics. Every product runs in the dtype of the activations (x in the forward, dy in the
backward) with an fp32 accumulator, as punica's and vLLM's LoRA kernels do, so that a bf16/fp16
model runs its LoRA products on tensor cores:
- fp32 activations: fp32 operands, ``input_precision="ieee"`` (no TF32; matches cuBLAS fp32).
- bf16/fp16 activations: the fp32 tiles (the bank's A and B, the fp32 intermediates xa and g)
  are rounded to the activations' dtype in registers just before ``tl.dot``; accumulation,
  ``scale`` and the fp32 outputs (xa, g, dA, dB) stay fp32. The rounding of an operand to bf16
  costs a relative 2^-9 per product (the same as running the LoRA layer in bf16 in PyTorch),
  not an fp32 result; fp16 keeps 2^-12 but, like any fp16 training, can underflow gradients
  below 6e-5 (use bf16 or loss scaling).
The reference (``_torch_fwd``) computes the LoRA terms in fp32 whatever x's dtype; the tests
hold the kernels to the error of plain PyTorch running the layer at the activations' dtype.

Block sizes come from one small table (``_ROW_BLOCKS``, ``_RANK_BLOCKS``, ``_WIDE_BLOCK``) by
shape: the rank side of a tile is the rank rounded up to 16, 32 or 64 (``tl.dot`` needs >= 16;
ranks above 64 tile or loop), the in/out side is 64 (fp32) or 128 (bf16/fp16) wide, and the
shrink uses 16-row tiles when 64-row tiles would leave the GPU with too few programs (short
segments, few tasks). The software-pipelining stages follow from the tiles (``_stages``): one
where the tile loop has a single step (the expand up to rank 64), else as many as keep two
blocks on an SM. ``launch_configs()`` lists every configuration the launchers can choose (for
the compile test).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...layout import TaskLayout
from . import LaunchConfig, launcher

_ROW_BLOCKS = (16, 64)        # rows of a segment per tile: short segments | the rest
_RANK_BLOCKS = (16, 32, 64)   # the rank side of a tile (tl.dot needs every dimension >= 16)
_WIDE_BLOCK = {torch.float32: 64, torch.bfloat16: 128, torch.float16: 128}  # the in/out side
_OUTER_ROWS = 32              # rows per step of the segment-outer reduction
# 64-row shrink tiles unless that leaves fewer programs than this (two per SM of an H100/H200,
# 132 SMs): a few-shot step (32 tasks x 128 rows, rank 16) would otherwise fill half the GPU.
_MIN_PROGRAMS = 264
_NUM_WARPS, _MAX_STAGES = 4, 3
# Shared memory of a block's pipelined tiles at most: two blocks per SM on an H100/H200 (228 KiB
# per SM, 1 KiB of it reserved per block), with room for what the compiler adds (the epilogue).
_STAGE_BYTES = 100 * 1024
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_DOT_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """``acc + a @ b`` with acc fp32: bf16/fp16 operands on the tensor cores, fp32 as IEEE fp32."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _sgmv_kernel(inp_ptr, w_ptr, out_ptr, offsets_ptr, K, N, scale,
                 stride_im, stride_ik, stride_wt, stride_wk, stride_wn, stride_om, stride_on,
                 ACCUMULATE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Segmented GEMM, one task per grid column ``program_id(2)``.

    Semantics::

        out[s[t]:s[t+1]] = (out[s[t]:s[t+1]] if ACCUMULATE else 0)
                           + scale * inp[s[t]:s[t+1]] @ w[t]

    inp [M, K], w [T, K, N] (any strides: ``B.transpose(1, 2)`` is passed for ``dy @ B[t].T``),
    out [M, N]; products in DOT_DTYPE, accumulated in fp32. Shrink (K = in/out, N = rank) and
    expand (K = rank, N = in/out) are this kernel with different blocks.
    Grid: (cdiv(max segment rows, BLOCK_M), cdiv(N, BLOCK_N), T).
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
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
        b = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks[:, None] < K) & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_DTYPE)
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
                          DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
                          BLOCK_J: tl.constexpr):
    """Per-task sum of outer products over the rows of each segment, added in place.

    Semantics::

        out[t] += scale * lhs[s[t]:s[t+1]].T @ rhs[s[t]:s[t+1]]

    lhs [M, I], rhs [M, J], out [T, I, J] fp32 with any strides (a view of the bank's flat
    gradient buffer); products in DOT_DTYPE, accumulated in fp32 over the segment's rows. Each
    program owns one (I, J) tile of one task, so the read-add-write needs no atomics; an empty
    task is not touched. Grid: (cdiv(I, BLOCK_I), cdiv(J, BLOCK_J), T).
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
                        mask=i_ok[:, None] & row_ok[None, :], other=0.0)
        rhs = tl.load(rhs_ptr + rows[:, None] * stride_rm + rj[None, :] * stride_rj,
                      mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        acc = _dot(lhs_t, rhs, acc, DOT_DTYPE)
    out_ptrs = (out_ptr + t.to(tl.int64) * stride_ot + ri[:, None] * stride_oi
                + rj[None, :] * stride_oj)
    mask = i_ok[:, None] & j_ok[None, :]
    cur = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (cur + scale * acc).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# the config table and the launchers
# ---------------------------------------------------------------------------------------------
def _rank_block(r: int) -> int:
    return next((b for b in _RANK_BLOCKS if r <= b), _RANK_BLOCKS[-1])


def _dot_dtype(dtype: torch.dtype):
    if dtype not in _DOT_DTYPE:
        raise TypeError(f"multi_lora_linear (triton): activations must be fp32, bf16 or fp16, "
                        f"got {dtype}")
    return _DOT_DTYPE[dtype]


def _shrink_blocks(max_rows: int, T: int, r: int, dtype: torch.dtype) -> dict:
    """``[rows, K = in/out] @ [K, N = r]``: the rank is the tile's N, the wide side its K loop."""
    block_n = _rank_block(r)
    n_tiles = triton.cdiv(r, block_n)
    big, small = _ROW_BLOCKS[-1], _ROW_BLOCKS[0]
    block_m = big if triton.cdiv(max_rows, big) * n_tiles * T >= _MIN_PROGRAMS else small
    return dict(BLOCK_M=block_m, BLOCK_K=_WIDE_BLOCK[dtype], BLOCK_N=block_n)


def _stages(blocks: dict, a_bytes: int, b_bytes: int, one_step: bool = False) -> int:
    """Pipelining stages of a tile loop over ``[BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]`` steps
    whose operands have ``a_bytes``/``b_bytes`` per element (the segment-outer loop's tiles
    are ``[BLOCK_I, BLOCK_M] @ [BLOCK_M, BLOCK_J]``). A loop of a single step has nothing to
    overlap: its stages would only take shared memory (one block per SM at rank 64). Otherwise
    as many stages, up to three, as fit ``_STAGE_BYTES``."""
    if one_step:
        return 1
    if "BLOCK_K" in blocks:
        per_stage = blocks["BLOCK_K"] * (blocks["BLOCK_M"] * a_bytes + blocks["BLOCK_N"] * b_bytes)
    else:
        per_stage = blocks["BLOCK_M"] * (blocks["BLOCK_I"] * a_bytes + blocks["BLOCK_J"] * b_bytes)
    return max(1, min(_MAX_STAGES, _STAGE_BYTES // per_stage))


def _expand_blocks(r: int, dtype: torch.dtype) -> dict:
    """``[rows, K = r] @ [K, N = in/out]``: the rank is the K loop (one step up to 64), the wide
    side is tiled over the grid, which gives the parallelism."""
    return dict(BLOCK_M=_ROW_BLOCKS[-1], BLOCK_K=_rank_block(r), BLOCK_N=_WIDE_BLOCK[dtype])


def _outer_blocks(role: str, r: int, dtype: torch.dtype) -> dict:
    """dA [in, r] (role ``"dA"``) or dB [r, out] (``"dB"``) of one task."""
    wide, rank = _WIDE_BLOCK[dtype], _rank_block(r)
    bi, bj = (wide, rank) if role == "dA" else (rank, wide)
    return dict(BLOCK_M=_OUTER_ROWS, BLOCK_I=bi, BLOCK_J=bj)


def _shrink_stages(blocks: dict, dtype: torch.dtype) -> int:
    """The shrink reads the activations (``dtype``) against an fp32 adapter."""
    return _stages(blocks, _BYTES[dtype], 4)


def _expand_stages(r: int, dtype: torch.dtype) -> int:
    """The expand reads fp32 xa or g against an fp32 adapter; its loop runs over the rank, in
    one step up to the largest rank block."""
    blocks = _expand_blocks(r, dtype)
    return _stages(blocks, 4, 4, one_step=r <= blocks["BLOCK_K"])


def _outer_stages(role: str, blocks: dict, dtype: torch.dtype) -> int:
    """dA = x^T g (x in ``dtype``, g fp32), dB = xa^T dy (xa fp32, dy in ``dtype``)."""
    act = _BYTES[dtype]
    return _stages(blocks, act, 4) if role == "dA" else _stages(blocks, 4, act)


def _ptr_name(dtype: torch.dtype) -> str:
    return {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]


def launch_configs():
    """Every (kernel, pointer dtypes, constexprs, stages) the launchers below can choose: the
    bank (A, B, xa, g, dA, dB) is fp32, the activations (x, y, dy, dx) are fp32, bf16 or fp16.
    The expand at the largest rank block comes twice: one step (rank up to 64) and a rank loop
    (above). ``unit``: the strides that are 1 in each kind of launch (A and B are views of a
    contiguous [T, P] bank row; the backward passes them transposed)."""
    for dtype in _DOT_DTYPE:
        act, dot = _ptr_name(dtype), _DOT_DTYPE[dtype]
        tag = str(dtype).split(".")[-1]
        for rb in _RANK_BLOCKS:
            for rows in _ROW_BLOCKS:
                blocks = dict(_shrink_blocks(1, 1, rb, dtype), BLOCK_M=rows)
                yield LaunchConfig(f"sgmv_shrink-{tag}-m{rows}-r{rb}", _sgmv_kernel,
                                   {"inp_ptr": act, "offsets_ptr": "*i32"},
                                   dict(ACCUMULATE=False, DOT_DTYPE=dot, **blocks),
                                   _NUM_WARPS, _shrink_stages(blocks, dtype),
                                   unit={"fwd": ("stride_ik", "stride_wn", "stride_on"),
                                         "bwd": ("stride_ik", "stride_wk", "stride_on")})
            ranks = (rb, rb + 1) if rb == _RANK_BLOCKS[-1] else (rb,)
            for r in ranks:
                loop = "-loop" if r > rb else ""
                yield LaunchConfig(f"sgmv_expand-{tag}-r{rb}{loop}", _sgmv_kernel,
                                   {"out_ptr": act, "offsets_ptr": "*i32"},
                                   dict(ACCUMULATE=True, DOT_DTYPE=dot, **_expand_blocks(r, dtype)),
                                   _NUM_WARPS, _expand_stages(r, dtype),
                                   unit={"fwd": ("stride_ik", "stride_wn", "stride_on"),
                                         "bwd": ("stride_ik", "stride_wk", "stride_on")})
            for role, ptrs in (("dA", {"lhs_ptr": act}), ("dB", {"rhs_ptr": act})):
                blocks = _outer_blocks(role, rb, dtype)
                yield LaunchConfig(f"segment_outer_{role}-{tag}-r{rb}", _segment_outer_kernel,
                                   dict(ptrs, offsets_ptr="*i32"), dict(DOT_DTYPE=dot, **blocks),
                                   _NUM_WARPS, _outer_stages(role, blocks, dtype),
                                   unit={"bwd": ("stride_li", "stride_rj", "stride_oj")})


def _sgmv(inp, w, out, layout: TaskLayout, scale: float, accumulate: bool, blocks: dict,
          stages: int, dtype: torch.dtype) -> None:
    """``out[s_t:e_t] (+)= scale * inp[s_t:e_t] @ w[t]`` for every task (in place in ``out``)."""
    max_rows = max(layout.sizes)
    if max_rows == 0:
        return
    T, K, N = w.shape
    grid = (triton.cdiv(max_rows, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]), T)
    _sgmv_kernel[grid](
        inp, w, out, layout.offsets_tensor(inp.device), K, N, float(scale),
        inp.stride(0), inp.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1), ACCUMULATE=accumulate, DOT_DTYPE=_dot_dtype(dtype),
        num_warps=_NUM_WARPS, num_stages=stages, **blocks)


def _shrink(inp, w, out, layout: TaskLayout) -> None:
    """``out[s_t:e_t] = inp[s_t:e_t] @ w[t]``, w [T, in/out, r]; products in inp's dtype."""
    blocks = _shrink_blocks(max(layout.sizes), layout.num_tasks, w.shape[-1], inp.dtype)
    _sgmv(inp, w, out, layout, 1.0, False, blocks, _shrink_stages(blocks, inp.dtype), inp.dtype)


def _expand_(inp, w, out, layout: TaskLayout, scale: float) -> None:
    """``out[s_t:e_t] += scale * inp[s_t:e_t] @ w[t]``, w [T, r, in/out]; products in out's
    dtype (the activations')."""
    r = w.shape[1]
    _sgmv(inp, w, out, layout, scale, True, _expand_blocks(r, out.dtype),
          _expand_stages(r, out.dtype), out.dtype)


def _segment_outer_(out, lhs, rhs, layout: TaskLayout, scale: float, role: str,
                    dtype: torch.dtype) -> None:
    """``out[t] += scale * lhs[s_t:e_t].T @ rhs[s_t:e_t]`` for every task (in place); products
    in ``dtype`` (the activations')."""
    T, I, J = out.shape
    blocks = _outer_blocks(role, J if role == "dA" else I, dtype)
    stages = _outer_stages(role, blocks, dtype)
    grid = (triton.cdiv(I, blocks["BLOCK_I"]), triton.cdiv(J, blocks["BLOCK_J"]), T)
    _segment_outer_kernel[grid](
        lhs, rhs, out, layout.offsets_tensor(lhs.device), I, J, float(scale),
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
        out.stride(0), out.stride(1), out.stride(2), DOT_DTYPE=_dot_dtype(dtype),
        num_warps=_NUM_WARPS, num_stages=stages, **blocks)


@launcher
def fwd(x, W, b, A, B, layout: TaskLayout, scale: float):
    """Forward of ``multi_lora_linear``.

    Args:
        x: [N, in] fp32/bf16/fp16, any strides. W: [out, in] or None; b: [out] or None.
        A: [T, in, r], B: [T, r, out] fp32 (any strides). layout: over the N rows.
        scale: alpha / rank.
    Returns:
        y: [N, out] in x's dtype; xa = x_t @ A[t] per segment, [N, r] in A's dtype (saved for
        the backward).
    """
    N = x.shape[0]
    r = A.shape[-1]
    xa = torch.empty(N, r, dtype=A.dtype, device=x.device)
    _shrink(x, A, xa, layout)
    if W is None:
        y = torch.zeros(N, B.shape[-1], dtype=x.dtype, device=x.device)
    else:
        y = F.linear(x, W, b)
    _expand_(xa, B, y, layout, scale)
    return y, xa


@launcher
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
    _shrink(dy, B.transpose(1, 2), g, layout)
    _segment_outer_(dA, x, g, layout, scale, "dA", dy.dtype)
    _segment_outer_(dB, xa, dy, layout, scale, "dB", dy.dtype)
    if not need_dx:
        return None
    if W is None:
        dx = torch.zeros(x.shape, dtype=dy.dtype, device=x.device)
    else:
        dx = dy @ W.to(dy.dtype)
    _expand_(g, A.transpose(1, 2), dx, layout, scale)
    return dx
