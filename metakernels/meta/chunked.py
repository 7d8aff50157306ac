"""``meta.task_chunk``: the tasks of a meta-batch in chunks, to bound activation memory.

A chunk of C tasks keeps only C tasks' activations alive at once; the meta-gradient is the same
(the per-task gradients do not interact), combined as the mean over all kept tasks.
"""
from __future__ import annotations

import torch

from .common import LossFn, StepResult, task_losses
from .fomaml import fomaml_step, reptile_step


def chunked_step(algorithm: str, model, bank, support, query, cfg, chunk: int,
                 loss_fn: LossFn = task_losses) -> StepResult:
    """``fomaml_step`` or ``reptile_step`` over the tasks in chunks of ``chunk``; ``chunk`` 0 or
    at least T is one pass over all tasks (the plain step). ``loss_fn``: the per-task losses
    (``fomaml.inner_loop``)."""
    T = support.num_tasks
    step = fomaml_step if algorithm == "fomaml" else reptile_step
    if not 0 < chunk < T:
        return step(model, bank, support, query, cfg, loss_fn=loss_fn)
    total = torch.zeros_like(bank.theta.detach())
    kept = 0
    hists, qls, ws, drops = [], [], [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        r = step(model, bank, support.select(t0, t1), query.select(t0, t1), cfg, loss_fn=loss_fn)
        n = int((r.task_weights > 0).sum())
        total += r.meta_grad * n
        kept += n
        hists.append(r.support_losses)
        qls.append(r.query_losses)
        ws.append((r.task_weights > 0).float())
        drops.append(r.dropped)
    w = torch.cat(ws)
    w = w / w.sum() if kept else w
    return StepResult(total / max(kept, 1), torch.cat(hists, 1), torch.cat(qls), w,
                      torch.cat(drops))
