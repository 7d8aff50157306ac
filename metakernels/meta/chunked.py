"""``meta.task_chunk``: the tasks of a meta-batch in chunks, to bound activation memory.

A chunk of C tasks keeps only C tasks' activations alive at once; the meta-gradient is the same
(the per-task gradients do not interact), combined as the mean over all kept tasks.

``meta.task_chunk=auto`` picks, per meta-step, the largest C whose activations fit a stated
budget (``meta.memory_budget_mb``): ``ChunkPlanner`` measures what autograd keeps for the
backward in a forward of one and of two sequences (the tensors saved by every op, counted once
per storage, the model's parameters and the bank's buffers excluded), so the bytes of a chunk
are ``fixed + per_row * rows + C * bank_bytes_per_task`` (the fast weights, their gradient and
the inner optimizer's state are [C, P]). Activations are linear in the rows at a given
sequence length; a new sequence length is measured again.
"""
from __future__ import annotations

import torch

from ..batch import PackedBatch
from ..config import ConfigError
from ..layout import TaskLayout
from .common import LossFn, StepResult, task_losses
from .fomaml import fomaml_step, reptile_step


def chunked_step(algorithm: str, model, bank, support, query, cfg,
                 chunk: "int | ChunkPlanner", loss_fn: LossFn = task_losses,
                 **kw) -> StepResult:
    """``fomaml_step`` or ``reptile_step`` over the tasks in chunks of ``chunk``; ``chunk`` 0 or
    at least T is one pass over all tasks (the plain step); a ``ChunkPlanner`` picks the chunk
    for these batches. ``loss_fn``: the per-task losses (``fomaml.inner_loop``); ``kw`` goes to
    the step (fomaml's learned ``rates`` and ``msl``)."""
    if isinstance(chunk, ChunkPlanner):
        chunk = chunk.chunk(model, bank, support, query)
    T = support.num_tasks
    step = fomaml_step if algorithm == "fomaml" else reptile_step
    if not 0 < chunk < T:
        return step(model, bank, support, query, cfg, loss_fn=loss_fn, **kw)
    total = None
    kept = 0
    hists, qls, ws, drops = [], [], [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        r = step(model, bank, support.select(t0, t1), query.select(t0, t1), cfg, loss_fn=loss_fn,
                 **kw)
        n = int((r.task_weights > 0).sum())
        total = r.meta_grad * n if total is None else total + r.meta_grad * n
        kept += n
        hists.append(r.support_losses)
        qls.append(r.query_losses)
        ws.append((r.task_weights > 0).float())
        drops.append(r.dropped)
    w = torch.cat(ws)
    w = w / w.sum() if kept else w
    return StepResult(total / max(kept, 1), torch.cat(hists, 1), torch.cat(qls), w,
                      torch.cat(drops))


def saved_activation_bytes(model, bank, batch: PackedBatch,
                           loss_fn: LossFn = task_losses) -> int:
    """Bytes of the tensors autograd saves for the backward in one forward of ``batch``'s
    per-task losses at theta, as an inner step runs it (adapter gradients into a scratch
    buffer): every saved tensor's storage counted once, the model's parameters and buffers and
    the bank's own buffers left out (they exist whatever the chunk)."""
    T, P = batch.num_tasks, bank.num_params
    grad = torch.zeros(T, P, dtype=bank.theta.dtype, device=bank.device)
    # as the inner loop's fast weights: requiring grad, so that the layers save for a backward
    weights = bank.theta.detach().expand(T, P).requires_grad_(True)
    held = [*model.parameters(), *model.buffers(), bank.theta, bank.fast, bank.grad, grad,
            weights]
    exclude = {t.untyped_storage().data_ptr() for t in held}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with bank.activate(weights, batch.token_layout, grad):
            loss_fn(model, batch, None)
    return sum(seen.values())


def _probe(batch: PackedBatch, n: int) -> PackedBatch:
    """``n`` (1 or 2) rows of ``batch`` as one task: its shortest row, then its longest. The
    model builds a padding mask for a batch with a padded row (a cost per row that only such a
    batch pays), so a probe holds a padded row whenever the batch has one."""
    lens = batch.attention_mask.sum(1)
    idx = torch.stack([lens.argmin(), lens.argmax()])[:n]
    return PackedBatch(batch.input_ids[idx], batch.attention_mask[idx], batch.labels[idx],
                       TaskLayout((0, n)))


class ChunkPlanner:
    """The largest task chunk whose activations fit ``budget_bytes`` (``meta.task_chunk=auto``).

    ``chunk(model, bank, support, query)``: C for this meta-step's batches. The cost of a row at
    a sequence length is measured once (``saved_activation_bytes`` of one and of two rows) and
    kept: exact for chunks as padded as the probe, an overestimate (safe) for chunks without a
    padded row. Raises ``ConfigError`` (naming ``meta.memory_budget_mb``) when even one task does
    not fit."""

    def __init__(self, budget_bytes: float, optimizer: str = "sgd",
                 loss_fn: LossFn = task_losses):
        if budget_bytes <= 0:
            raise ValueError(f"ChunkPlanner: the budget must be > 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        # fast and grad [C, P], and Adam's two moments
        self.buffers_per_task = 4 if optimizer == "adam" else 2
        self.loss_fn = loss_fn
        self._cost: dict[int, tuple[float, float]] = {}

    def row_cost(self, model, bank, batch: PackedBatch) -> tuple[float, float]:
        """(fixed bytes, bytes per row) of a forward's saved activations at ``batch``'s
        sequence length."""
        L = batch.seq_len
        if L not in self._cost:
            one = saved_activation_bytes(model, bank, _probe(batch, 1), self.loss_fn)
            if batch.input_ids.shape[0] < 2:
                self._cost[L] = (0.0, float(one))
            else:
                two = saved_activation_bytes(model, bank, _probe(batch, 2), self.loss_fn)
                self._cost[L] = (max(0.0, 2.0 * one - two), float(two - one))
        return self._cost[L]

    def predicted_bytes(self, model, bank, support: PackedBatch, query: PackedBatch,
                        chunk: int) -> float:
        """Bytes a step in chunks of ``chunk`` tasks keeps at its peak, by this model: the
        larger of the support and query forward of its largest chunk, plus the chunk's
        fast-weight buffers."""
        worst = 0.0
        for batch in (support, query):
            fixed, per_row = self.row_cost(model, bank, batch)
            sizes = batch.layout.sizes
            rows = max(sum(sizes[t:t + chunk]) for t in range(0, len(sizes), chunk))
            worst = max(worst, fixed + per_row * rows)
        bank_bytes = self.buffers_per_task * bank.num_params * bank.theta.element_size()
        return worst + chunk * bank_bytes

    def chunk(self, model, bank, support: PackedBatch, query: PackedBatch) -> int:
        T = support.num_tasks
        fits = [c for c in range(1, T + 1)
                if self.predicted_bytes(model, bank, support, query, c) <= self.budget]
        if not fits:
            need = self.predicted_bytes(model, bank, support, query, 1)
            raise ConfigError(f"meta.memory_budget_mb={self.budget / 2 ** 20:.0f}: one task's "
                             f"step needs about {need / 2 ** 20:.0f} MB of activations; raise "
                             f"the budget or shorten data.max_length / the support and query "
                             f"sets")
        return max(fits)


def task_chunk_setting(meta_cfg, optimizer: str = "sgd") -> "int | ChunkPlanner":
    """What ``chunked_step`` takes for the config's ``meta.task_chunk``: the number, or for
    ``auto`` a ``ChunkPlanner`` of ``meta.memory_budget_mb``."""
    if meta_cfg.task_chunk == "auto":
        return ChunkPlanner(meta_cfg.memory_budget_mb * 2 ** 20, optimizer)
    return meta_cfg.task_chunk
