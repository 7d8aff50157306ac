"""Triton kernels of ``segment_cross_entropy``: chunked fused linear + cross-entropy (Liger style).

Semantics (PyTorch pseudo-code; ``s = layout.offsets``, ``task(i)`` the task of row i)::

    count[t] = (labels[s[t]:s[t+1]] != -100).sum()
    for each chunk c of chunk_size rows:                  # only [chunk_size, V] logits live
        z = h[c] @ W.T                                    # torch GEMM, in h's dtype
        lse_i = logsumexp(z_i)                            # online over V, fp32
        ce_i = lse_i - z_i[labels_i]                      # 0 where labels_i == -100
        z_i <- (softmax(z_i) - onehot(labels_i)) / max(count[task(i)], 1)   # in place; 0 if ignored
        dh[c] = z @ W                                     # torch GEMM
    loss[t] = sum(ce[s[t]:s[t+1]]) / max(count[t], 1)

Gradient: ``dh = d(sum_t loss[t]) / dh`` is produced in the same pass (the autograd Function of
the op scales each row by the upstream ``dloss[task(i)]``); W gets none. ``fwd`` has the
contract of ``_cpu_fwd`` in ``metakernels/ops/segment_cross_entropy.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...batch import IGNORE_INDEX
from ...layout import TaskLayout
from . import LaunchConfig, launcher

# One vocabulary block for every V (masked beyond V): a GPU reads a masked lane for free, and one
# value keeps the compiled variants few (tests/test_triton_compile.py compiles each).
_BLOCK_V = 4096
_LOGITS_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_BLOCK_ROWS = 1024


@triton.jit
def _segment_sum(ptr, offsets_ptr, t, ignore_index, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """Over task t's rows ``s[t]:s[t+1]``: ``sum(x[rows])`` in fp32 or, with COUNT,
    ``(x[rows] != ignore_index).sum()`` as fp32."""
    start = tl.load(offsets_ptr + t)
    end = tl.load(offsets_ptr + t + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        if COUNT:
            y = tl.load(ptr + rows, mask=rows < end, other=ignore_index)
            acc += (y != ignore_index).to(tl.float32)
        else:
            acc += tl.load(ptr + rows, mask=rows < end, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _segment_count_kernel(labels_ptr, offsets_ptr, count_ptr, ignore_index,
                          BLOCK: tl.constexpr):
    """``count[t] = (labels[s[t]:s[t+1]] != ignore_index).sum()`` as fp32. Grid: (T,)."""
    t = tl.program_id(0)
    tl.store(count_ptr + t, _segment_sum(labels_ptr, offsets_ptr, t, ignore_index, True, BLOCK))


@triton.jit
def _ce_chunk_kernel(logits_ptr, labels_ptr, task_ids_ptr, count_ptr, row_loss_ptr, V,
                     stride_lr, stride_lv, ignore_index, BLOCK_V: tl.constexpr):
    """Cross-entropy of one row of a logits chunk, and its gradient written over the logits.

    Forward:  ``ce = logsumexp(z) - z[y]`` (online max/sum over V in fp32), 0 if y is ignored.
    Gradient: ``dce/dz = softmax(z) - onehot(y)``, scaled by ``1 / max(count[task], 1)`` (the
    token mean of the row's task) and stored in place of z; 0 for an ignored row.
    Pointers are already offset to the chunk's first row. Grid: (rows in the chunk,).
    """
    row = tl.program_id(0)
    y = tl.load(labels_ptr + row)
    z_ptr = logits_ptr + row.to(tl.int64) * stride_lr
    cols0 = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            tl.store(z_ptr + cols * stride_lv, tl.zeros((BLOCK_V,), dtype=tl.float32)
                     .to(logits_ptr.dtype.element_ty), mask=cols < V)
        tl.store(row_loss_ptr + row, 0.0)
        return
    # pass 1: running max m and running sum d of exp(z - m); the target logit on the way
    # (picked by comparison, so an out-of-range label never reads out of bounds)
    m = -float("inf")
    d = 0.0
    z_y = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        z = tl.load(z_ptr + cols * stride_lv, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_y += tl.sum(tl.where(cols == y, z, 0.0), axis=0)
    lse = m + tl.log(d)
    tl.store(row_loss_ptr + row, lse - z_y)
    # pass 2: gradient in place
    inv_count = 1.0 / tl.maximum(tl.load(count_ptr + tl.load(task_ids_ptr + row)), 1.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        z = tl.load(z_ptr + cols * stride_lv, mask=cols < V, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)) * inv_count
        tl.store(z_ptr + cols * stride_lv, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _segment_mean_kernel(row_loss_ptr, offsets_ptr, count_ptr, loss_ptr, BLOCK: tl.constexpr):
    """``loss[t] = sum(row_loss[s[t]:s[t+1]]) / max(count[t], 1)``. Grid: (T,)."""
    t = tl.program_id(0)
    total = _segment_sum(row_loss_ptr, offsets_ptr, t, 0, False, BLOCK)
    tl.store(loss_ptr + t, total / tl.maximum(tl.load(count_ptr + t), 1.0))


def launch_configs():
    """Every (kernel, pointer dtypes, constexprs) ``fwd`` can launch: the logits in h's dtype
    (fp32, bf16 or fp16), int64 labels, int32 offsets and task ids, fp32 sums."""
    index = {"offsets_ptr": "*i32"}
    yield LaunchConfig("segment_count", _segment_count_kernel, dict(index, labels_ptr="*i64"),
                       dict(BLOCK=_BLOCK_ROWS))
    for dtype, ptr in _LOGITS_TYPES.items():
        yield LaunchConfig(f"ce_chunk-{str(dtype).split('.')[-1]}", _ce_chunk_kernel,
                           {"logits_ptr": ptr, "labels_ptr": "*i64", "task_ids_ptr": "*i32"},
                           dict(BLOCK_V=_BLOCK_V), unit={"chunk": ("stride_lv",)})
    yield LaunchConfig("segment_mean", _segment_mean_kernel, index, dict(BLOCK=_BLOCK_ROWS))


@launcher
def fwd(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, layout: TaskLayout,
        chunk_size: int):
    """Per-task token-mean cross-entropy and its gradient w.r.t. h, chunked over rows.

    Args:
        h: [N, d] fp32/bf16/fp16 hidden states (any strides). W: [V, d], h's dtype.
        labels: [N] int64, ``-100`` where no loss is taken. layout: over the N rows.
        chunk_size: rows per chunk; the logits buffer is [min(chunk_size, N), V] in h's dtype.
    Returns:
        (loss [T] fp32, dh [N, d] in h's dtype: the gradient of ``loss.sum()``).
    """
    if h.dtype not in _LOGITS_TYPES:
        raise TypeError(f"segment_cross_entropy (triton): h must be fp32, bf16 or fp16, got "
                        f"{h.dtype}")
    N, d = h.shape
    V = W.shape[0]
    T = layout.num_tasks
    dev = h.device
    offsets = layout.offsets_tensor(dev)
    task_ids = layout.task_ids(dev)
    labels = labels.contiguous()
    counts = torch.empty(T, dtype=torch.float32, device=dev)
    _segment_count_kernel[(T,)](labels, offsets, counts, IGNORE_INDEX, BLOCK=_BLOCK_ROWS)
    row_loss = torch.empty(N, dtype=torch.float32, device=dev)
    dh = torch.empty(N, d, dtype=h.dtype, device=dev)
    chunk = max(1, min(chunk_size, N))
    logits = torch.empty(chunk, V, dtype=h.dtype, device=dev)
    for c0 in range(0, N, chunk):
        n = min(chunk, N - c0)
        z = logits[:n]
        torch.mm(h[c0:c0 + n], W.T, out=z)
        _ce_chunk_kernel[(n,)](z, labels[c0:], task_ids[c0:], counts, row_loss[c0:], V,
                               z.stride(0), z.stride(1), IGNORE_INDEX, BLOCK_V=_BLOCK_V)
        torch.mm(z, W, out=dh[c0:c0 + n])
    loss = torch.empty(T, dtype=torch.float32, device=dev)
    _segment_mean_kernel[(T,)](row_loss, offsets, counts, loss, BLOCK=_BLOCK_ROWS)
    return loss, dh
