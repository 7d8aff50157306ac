"""Batched first-order meta-learning: FOMAML (Meta-LoRA's two stages) and Reptile.

All T tasks of a meta-batch run together: each inner step is ONE forward/backward of the packed
support batch, the layers writing every task's adapter gradient into ``bank.grad`` [T, P], then
ONE ``fused_update`` of ``bank.fast``. The loss is the sum of the per-task losses; task t's loss
depends only on ``fast[t]``, so one backward gives every task its own gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..bank import AdapterBank
from ..batch import PackedBatch
from ..ops import fused_update, meta_reduce
from .common import (InnerConfig, LossFn, StepResult, finite_rows, normalized_weights,
                     task_losses)


def inner_loop(model: nn.Module, bank: AdapterBank, support: PackedBatch, cfg: InnerConfig,
               chunk_size: int | None = None, loss_fn: LossFn = task_losses,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1: adapts ``bank.fast`` (one row per task, starting at theta) on the support sets.
    ``loss_fn(model, batch, chunk_size)`` gives the per-task losses [T] (default
    ``task_losses``: ``segment_cross_entropy`` without the logits).

    Returns (support_losses [K, T], alive [T] bool, last inner grad norms [T]).
    """
    T = support.num_tasks
    bank.start_inner(cfg.optimizer, T)
    lr = torch.full((T,), cfg.lr, dtype=torch.float32, device=bank.device)
    alive = torch.ones(T, dtype=torch.bool, device=bank.device)
    losses_hist = []
    norms = torch.zeros(T, device=bank.device)
    layout = support.token_layout
    for _ in range(cfg.num_steps):
        bank.grad.zero_()
        with bank.activate(bank.fast, layout, bank.grad):
            losses = loss_fn(model, support, chunk_size)
            losses.sum().backward()
        norms, finite = fused_update(bank.fast, bank.grad, lr, optimizer=cfg.optimizer,
                                     state=bank.state, max_grad_norm=cfg.max_grad_norm,
                                     betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        alive &= finite & torch.isfinite(losses.detach())
        losses_hist.append(losses.detach())
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
                chunk_size: int | None = None, loss_fn: LossFn = task_losses) -> StepResult:
    """One batched FOMAML / Meta-LoRA meta-step; returns the meta-gradient (not applied).
    ``loss_fn``: the per-task losses, as in ``inner_loop``.

    Semantics::

        for t: fast[t] = theta; K inner steps on support[t]; g[t] = dL_query[t]/dfast[t]
        meta_grad = sum_t w[t] g[t]        (w uniform, renormalised over the tasks kept)
    """
    if support.num_tasks != query.num_tasks:
        raise ValueError(f"fomaml_step: support has {support.num_tasks} tasks, query "
                         f"{query.num_tasks}")
    hist, alive, norms = inner_loop(model, bank, support, cfg, chunk_size, loss_fn)
    qlosses = query_gradients(model, bank, query, chunk_size, loss_fn)
    keep = alive & torch.isfinite(qlosses) & finite_rows(bank.grad)
    w = normalized_weights(support.num_tasks, weights, keep, bank.device)
    # a dropped task's row may hold NaNs, which a zero weight would still propagate
    grad = bank.grad if bool(keep.all()) else torch.where(keep[:, None], bank.grad, 0.0)
    meta_grad = meta_reduce("fomaml", grad, w)
    return StepResult(meta_grad, hist, qlosses, w, ~keep, norms)


def reptile_step(model: nn.Module, bank: AdapterBank, support: PackedBatch,
                 query: PackedBatch | None, cfg: InnerConfig,
                 weights: torch.Tensor | None = None,
                 chunk_size: int | None = None, loss_fn: LossFn = task_losses) -> StepResult:
    """One batched Reptile meta-step. The returned meta-gradient is
    ``sum_t w[t] (theta - fast[t])``, which the outer optimizer applies like a gradient
    (plain SGD with lr 1 gives ``theta <- mean_t fast[t]``). The query set only reports losses."""
    hist, alive, norms = inner_loop(model, bank, support, cfg, chunk_size, loss_fn)
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
