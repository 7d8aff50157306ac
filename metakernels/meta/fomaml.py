"""Batched first-order meta-learning: FOMAML (Meta-LoRA's two stages) and Reptile.

All T tasks of a meta-batch run together: each inner step is ONE forward/backward of the packed
support batch, the layers writing every task's adapter gradient into ``bank.grad`` [T, P], then
ONE ``fused_update`` of ``bank.fast``. The loss is the sum of the per-task losses; task t's loss
depends only on ``fast[t]``, so one backward gives every task its own gradient.

With learned inner rates (``InnerRates``) the fused update reads them through the bank's slot
offsets and adds each step's update direction to a buffer; the rates' first-order gradient is
then the query gradient times minus those directions, per task, reduced over tasks like the
meta-gradient and appended to it (one flat [P + R] vector, one all-reduce).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..bank import AdapterBank
from ..batch import PackedBatch
from ..ops import fused_update, meta_reduce
from .common import (InnerConfig, LossFn, StepResult, finite_rows, normalized_weights,
                     task_losses)
from .inner_lr import InnerRates


def inner_loop(model: nn.Module, bank: AdapterBank, support: PackedBatch, cfg: InnerConfig,
               chunk_size: int | None = None, rates: InnerRates | None = None,
               directions: torch.Tensor | None = None,
               after_step: Callable[[int], None] | None = None, loss_fn: LossFn = task_losses
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1: adapts ``bank.fast`` (one row per task, starting at theta) on the support sets.
    ``loss_fn(model, batch, chunk_size)`` gives the per-task losses [T] (default
    ``task_losses``: ``segment_cross_entropy`` without the logits).

    ``rates``: learned rates (``lr[t] = 1`` times them) instead of ``cfg.lr``; ``directions``
    (``rates.new_directions``) then receives the steps' update directions. ``after_step(k)``
    runs after inner step k's update (the multi-step loss's query points).
    Returns (support_losses [K, T], alive [T] bool, last inner grad norms [T]).
    """
    T = support.num_tasks
    bank.start_inner(cfg.optimizer, T)
    lr = torch.full((T,), 1.0 if rates is not None else cfg.lr, dtype=torch.float32,
                    device=bank.device)
    alive = torch.ones(T, dtype=torch.bool, device=bank.device)
    losses_hist = []
    norms = torch.zeros(T, device=bank.device)
    layout = support.token_layout
    for k in range(cfg.num_steps):
        bank.grad.zero_()
        with bank.activate(bank.fast, layout, bank.grad):
            losses = loss_fn(model, support, chunk_size)
            losses.sum().backward()
        kw = {}
        if rates is not None:
            kw["rates"], kw["rate_offsets"] = rates.kernel_rates(k)
            if directions is not None:
                kw["direction"] = rates.direction_slot(directions, k)
        norms, finite = fused_update(bank.fast, bank.grad, lr, optimizer=cfg.optimizer,
                                     state=bank.state, max_grad_norm=cfg.max_grad_norm,
                                     betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                     **kw)
        alive &= finite & torch.isfinite(losses.detach())
        losses_hist.append(losses.detach())
        if after_step is not None:
            after_step(k)
    hist = torch.stack(losses_hist) if losses_hist else torch.zeros(0, T, device=bank.device)
    return hist, alive, norms


def query_gradients(model: nn.Module, bank: AdapterBank, query: PackedBatch,
                    chunk_size: int | None = None, loss_fn: LossFn = task_losses) -> torch.Tensor:
    """Stage 2: per-task query losses [T] at the fast weights; their gradients land in
    ``bank.grad``."""
    bank.grad.zero_()
    with bank.activate(bank.fast, query.token_layout, bank.grad):
        losses = loss_fn(model, query, chunk_size)
        losses.sum().backward()
    return losses.detach()


def fomaml_step(model: nn.Module, bank: AdapterBank, support: PackedBatch, query: PackedBatch,
                cfg: InnerConfig, weights: torch.Tensor | None = None,
                chunk_size: int | None = None, rates: InnerRates | None = None,
                msl: Sequence[float] | None = None, loss_fn: LossFn = task_losses) -> StepResult:
    """One batched FOMAML / Meta-LoRA meta-step; returns the meta-gradient (not applied).
    ``loss_fn``: the per-task losses, as in ``inner_loop``.

    Semantics::

        for t: fast[t] = theta; K inner steps on support[t]; g[t] = dL_query[t]/dfast[t]
        meta_grad = sum_t w[t] g[t]        (w uniform, renormalised over the tasks kept)

    With ``rates`` (learned inner rates, R values) the meta-gradient is [P + R]: theta's, then
    the rates' first-order gradient ``sum_t w[t] (-g[t] * d_k[t])`` summed over each rate's
    elements (``d_k``: inner step k's update direction). With ``msl`` (K weights, the
    multi-step loss) the query gradient is taken after every inner step k with a nonzero
    weight, and ``g`` above is their weighted sum (each against the steps before it).
    """
    if support.num_tasks != query.num_tasks:
        raise ValueError(f"fomaml_step: support has {support.num_tasks} tasks, query "
                         f"{query.num_tasks}")
    if rates is not None or msl is not None:
        return _fomaml_learned(model, bank, support, query, cfg, weights, chunk_size, rates, msl,
                               loss_fn)
    hist, alive, norms = inner_loop(model, bank, support, cfg, chunk_size, loss_fn=loss_fn)
    qlosses = query_gradients(model, bank, query, chunk_size, loss_fn)
    keep = alive & torch.isfinite(qlosses) & finite_rows(bank.grad)
    w = normalized_weights(support.num_tasks, weights, keep, bank.device)
    # a dropped task's row may hold NaNs, which a zero weight would still propagate
    grad = bank.grad if bool(keep.all()) else torch.where(keep[:, None], bank.grad, 0.0)
    meta_grad = meta_reduce("fomaml", grad, w)
    return StepResult(meta_grad, hist, qlosses, w, ~keep, norms)


def _fomaml_learned(model, bank, support, query, cfg, weights, chunk_size, rates, msl,
                    loss_fn):
    """``fomaml_step`` with learned rates and/or the multi-step loss."""
    T, K = support.num_tasks, cfg.num_steps
    if msl is not None and len(msl) != K:
        raise ValueError(f"fomaml_step: msl has {len(msl)} weights for {K} inner steps")
    if K == 0:
        raise ValueError("fomaml_step: learned rates and the multi-step loss need inner steps")
    vs = list(msl) if msl is not None else [0.0] * (K - 1) + [1.0]
    directions = rates.new_directions(T) if rates is not None else None
    # the weighted query gradients (allocated once the inner loop has sized the bank); the plain
    # loss (only the last point) reads bank.grad itself
    acc = None
    rate_acc = None
    ok = torch.ones(T, dtype=torch.bool, device=bank.device)
    qlosses = torch.full((T,), float("nan"), device=bank.device)

    def query_point(k: int) -> None:
        nonlocal acc, rate_acc, qlosses
        if vs[k] == 0.0:
            return
        qlosses = query_gradients(model, bank, query, chunk_size, loss_fn)
        good = torch.isfinite(qlosses) & finite_rows(bank.grad)
        ok.logical_and_(good)
        g = bank.grad if bool(good.all()) else torch.where(good[:, None], bank.grad, 0.0)
        if msl is not None:
            acc = g * vs[k] if acc is None else acc.add_(g, alpha=vs[k])
        if rates is not None:
            r = rates.first_order_grad(g, directions, k + 1)
            rate_acc = r.mul_(vs[k]) if rate_acc is None else rate_acc.add_(r, alpha=vs[k])

    hist, alive, norms = inner_loop(model, bank, support, cfg, chunk_size, rates, directions,
                                    query_point, loss_fn)
    keep = alive & ok
    w = normalized_weights(T, weights, keep, bank.device)
    grad = acc if acc is not None else bank.grad
    if not bool(keep.all()):
        grad = torch.where(keep[:, None], grad, 0.0)
    meta_grad = meta_reduce("fomaml", grad, w)
    if rates is not None:
        r = rate_acc.reshape(T, -1)
        r = r if bool(keep.all()) else torch.where(keep[:, None], r, 0.0)
        meta_grad = torch.cat([meta_grad, meta_reduce("fomaml", r.contiguous(), w)])
    return StepResult(meta_grad, hist, qlosses, w, ~keep, norms)


def reptile_step(model: nn.Module, bank: AdapterBank, support: PackedBatch,
                 query: PackedBatch | None, cfg: InnerConfig,
                 weights: torch.Tensor | None = None,
                 chunk_size: int | None = None, loss_fn: LossFn = task_losses) -> StepResult:
    """One batched Reptile meta-step. The returned meta-gradient is
    ``sum_t w[t] (theta - fast[t])``, which the outer optimizer applies like a gradient
    (plain SGD with lr 1 gives ``theta <- mean_t fast[t]``). The query set only reports losses."""
    hist, alive, norms = inner_loop(model, bank, support, cfg, chunk_size, loss_fn=loss_fn)
    T = support.num_tasks
    if query is not None:
        with torch.no_grad(), bank.activate(bank.fast.detach(), query.token_layout):
            qlosses = loss_fn(model, query, chunk_size)
    else:
        qlosses = torch.full((T,), float("nan"), device=bank.device)
    keep = alive & finite_rows(bank.fast.detach())
    w = normalized_weights(T, weights, keep, bank.device)
    fast = torch.where(keep[:, None], bank.fast.detach(), bank.theta.detach()[None])
    meta_grad = meta_reduce("reptile", fast, w, bank.theta.detach())
    return StepResult(meta_grad, hist, qlosses, w, ~keep, norms)
