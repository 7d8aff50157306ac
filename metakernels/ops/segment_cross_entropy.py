"""Per-task masked token-mean cross-entropy from hidden states, without the [N, V] logits.

Semantics (PyTorch pseudo-code; ``s = layout.offsets``)::

    logits = h @ W.T                                          # [N, V], never materialised
    ce = cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    for t in range(T):
        keep = labels[s[t]:s[t+1]] != -100
        loss[t] = ce[s[t]:s[t+1]][keep].sum() / max(keep.sum(), 1)

Gradient: ``dh_i = (softmax(logits_i) - onehot(labels_i)) @ W * dloss[t(i)] / count[t(i)]`` for
kept rows, 0 elsewhere; W (the frozen output layer) gets none. The kernels go over the rows in
chunks of ``chunk_size``, computing each chunk's logits, its loss and its gradient in the same
pass, so the logits never take more than ``chunk_size * V`` floats.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import gemm as _gemm
from ..batch import IGNORE_INDEX
from ..layout import TaskLayout
from ._common import FLOAT_DTYPES, check_layout, check_tensor, record

_OP = "segment_cross_entropy"
# Without an explicit chunk_size, a chunk's fp32 logits take at most this many bytes on the CPU,
# where they stay in the last-level cache: 8192 rows at a 1k vocabulary, 262 rows at 32k
# (Liger-Kernel's fused linear cross-entropy also sizes its chunks by the vocabulary).
CHUNK_BYTES = 32 * 2 ** 20
# On a GPU every chunk re-reads the whole output layer (1 GB at a 128k vocabulary in bf16), so
# chunks are as large as memory allows: a 64th of the device's memory.
CUDA_MEMORY_FRACTION = 64


def auto_chunk_rows(vocab_size: int, device: torch.device | str | None = None) -> int:
    """Rows per chunk so that a chunk's fp32 logits stay within ``CHUNK_BYTES`` (on a CUDA
    ``device``: within 1/``CUDA_MEMORY_FRACTION`` of its memory)."""
    budget = CHUNK_BYTES
    if device is not None and torch.device(device).type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory // CUDA_MEMORY_FRACTION
    return max(16, budget // (4 * max(1, vocab_size)))


def segment_cross_entropy_ref(h, W, labels, layout: TaskLayout) -> torch.Tensor:
    """Plain-PyTorch reference (materialises the logits; differentiable twice)."""
    logits = h @ W.T
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    keep = (labels != IGNORE_INDEX).to(ce.dtype)
    ids = layout.task_ids(h.device).long()
    T = layout.num_tasks
    sums = torch.zeros(T, dtype=ce.dtype, device=h.device).index_add(0, ids, ce * keep)
    counts = torch.zeros(T, dtype=ce.dtype, device=h.device).index_add(0, ids, keep)
    return sums / counts.clamp(min=1)


def _cpu_fwd(h, W, labels, layout, chunk_size):
    return torch.ops.metakernels.segment_cross_entropy_fwd(
        h, W, labels, layout.offsets_tensor(h.device), int(chunk_size), _gemm.use_onednn(h, W))


class _SegmentCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, labels, layout, chunk_size, backend_name):
        with record(_OP, "forward"):
            loss, dh = _backend.kernel("segment_cross_entropy.fwd", backend_name)(
                h, W, labels, layout, chunk_size)
            ctx.save_for_backward(dh)
            ctx.layout = layout
            return loss

    @staticmethod
    def backward(ctx, dloss):
        with record(_OP, "backward"):
            (dh,) = ctx.saved_tensors
            ids = ctx.layout.task_ids(dh.device).long()
            row_scale = dloss.to(dh.dtype)[ids][:, None]
            return dh * row_scale, None, None, None, None, None


def segment_cross_entropy(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                          layout: TaskLayout, chunk_size: int | None = None) -> torch.Tensor:
    """Per-task token-mean cross-entropy of the next-token targets.

    Args:
        h: [N, d] final hidden states (N = all tokens of all tasks, grouped by task).
        W: [V, d] frozen output projection (``model.get_output_embeddings().weight``).
        labels: [N] int64 target ids, ``-100`` where no loss is taken.
        layout: ``TaskLayout`` over the N rows.
        chunk_size: rows per chunk in the kernels (the logits memory is chunk_size * V);
            None: ``auto_chunk_rows(V, h.device)``, chunks of at most ``CHUNK_BYTES`` of
            logits (a share of the device's memory on a GPU).
    Returns:
        [T] fp32 losses; a task with no target tokens has loss 0.
    """
    check_tensor(_OP, "h", h, ndim=2, dtypes=FLOAT_DTYPES)
    N, d = h.shape
    check_tensor(_OP, "W", W, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, d), device=h.device)
    check_tensor(_OP, "labels", labels, dtypes=(torch.int64,), shape=(N,), device=h.device)
    check_layout(_OP, layout, N)
    if chunk_size is None:
        chunk_size = auto_chunk_rows(W.shape[0], h.device)
    if chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be >= 1, got {chunk_size}")
    if W.requires_grad:
        raise ValueError(f"{_OP}: W requires grad, but the output layer must be frozen")
    name = _backend.resolve(h.device)
    if name == "torch":
        with record(_OP, "forward"):
            return segment_cross_entropy_ref(h, W, labels, layout)
    return _SegmentCrossEntropyFn.apply(h, W, labels, layout, int(chunk_size), name)
