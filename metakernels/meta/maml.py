"""Second-order MAML, batched over tasks, on the reference backend.

The fast weights stay differentiable functions of theta: each inner step takes the support
gradient with ``create_graph=True``, so the meta-gradient flows back through every inner
update (Hessian-vector products included). The kernels have no double backward, so this runs
on the ``torch`` backend, and the model's attention must have one too (eager attention, not a
fused SDPA kernel).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import backend as _backend
from ..bank import AdapterBank
from ..batch import PackedBatch
from .common import InnerConfig, StepResult, normalized_weights, task_losses

_CLIP_EPS = 1e-6


def _adapt(model, bank, theta, support: PackedBatch, cfg: InnerConfig, create_graph: bool):
    """K differentiable SGD steps of every task from theta; returns (fast [T, P], losses [K, T])."""
    T = support.num_tasks
    fast = theta.unsqueeze(0).expand(T, -1)
    hist = []
    for _ in range(cfg.num_steps):
        with bank.activate(fast, support.token_layout):
            losses = task_losses(model, support)
        (g,) = torch.autograd.grad(losses.sum(), fast, create_graph=create_graph)
        if cfg.max_grad_norm > 0:
            norms = torch.linalg.vector_norm(g, dim=1, keepdim=True)
            g = g * torch.clamp(cfg.max_grad_norm / (norms + _CLIP_EPS), max=1.0)
        if cfg.weight_decay:
            g = g + cfg.weight_decay * fast
        fast = fast - cfg.lr * g
        hist.append(losses.detach())
    return fast, (torch.stack(hist) if hist else torch.zeros(0, T, device=theta.device))


def maml_step(model: nn.Module, bank: AdapterBank, support: PackedBatch, query: PackedBatch,
              cfg: InnerConfig, weights: torch.Tensor | None = None,
              first_order: bool = False) -> StepResult:
    """One batched second-order MAML meta-step (SGD inner loop); returns the meta-gradient.

    Semantics::

        fast[t] = theta - lr * sum_k dL_support[t](fast_k[t]) / dfast   (kept differentiable)
        meta_grad = d/dtheta sum_t w[t] L_query[t](fast[t])
    """
    if cfg.optimizer != "sgd":
        raise ValueError("maml_step: second-order MAML differentiates through SGD inner steps")
    theta = bank.theta
    T = support.num_tasks
    with _backend.use_backend("torch"):
        fast, hist = _adapt(model, bank, theta, support, cfg, create_graph=not first_order)
        if first_order:
            fast = fast.detach().requires_grad_()
        with bank.activate(fast, query.token_layout):
            qlosses = task_losses(model, query)
    keep = torch.isfinite(qlosses.detach())
    w = normalized_weights(T, weights, keep, theta.device)
    meta_loss = (torch.where(keep, qlosses, torch.zeros_like(qlosses)) * w).sum()
    target = fast if first_order else theta
    (grad,) = torch.autograd.grad(meta_loss, target)
    if first_order:
        grad = grad.sum(0)
    return StepResult(grad.detach(), hist, qlosses.detach(), w, ~keep)


def maml_step_per_task(model: nn.Module, bank: AdapterBank, support: PackedBatch,
                       query: PackedBatch, cfg: InnerConfig) -> StepResult:
    """The per-task loop of ``maml_step``: each task alone, one after another (the oracle)."""
    T = support.num_tasks
    grads, hists, qls = [], [], []
    for t in range(T):
        r = maml_step(model, bank, support.task(t), query.task(t), cfg)
        grads.append(r.meta_grad)
        hists.append(r.support_losses[:, 0])
        qls.append(r.query_losses[0])
    dev = bank.theta.device
    w = torch.full((T,), 1.0 / T, dtype=torch.float32, device=dev)
    return StepResult(sum(g / T for g in grads), torch.stack(hists, 1), torch.stack(qls), w,
                      torch.zeros(T, dtype=torch.bool, device=dev))
