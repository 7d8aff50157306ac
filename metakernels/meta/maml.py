"""Second-order MAML, batched over tasks, on the reference backend.

The fast weights stay differentiable functions of theta: each inner step takes the support
gradient with ``create_graph=True``, so the meta-gradient flows back through every inner
update (Hessian-vector products included). The kernels have no double backward, so this runs
on the ``torch`` backend, and the model's attention must have one too (eager attention, not a
fused SDPA kernel).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .. import backend as _backend
from ..bank import AdapterBank
from ..batch import PackedBatch
from .common import InnerConfig, StepResult, normalized_weights, task_losses
from .inner_lr import InnerRates

_CLIP_EPS = 1e-6


def _adapt(model, bank, theta, support: PackedBatch, cfg: InnerConfig, create_graph: bool,
           rates: InnerRates | None = None, after_step=None):
    """K differentiable SGD steps of every task from theta; returns (fast [T, P], losses [K, T]).
    ``rates``: each step's learned rates (differentiable) instead of ``cfg.lr``;
    ``after_step(k, fast)`` sees the fast weights after step k."""
    T = support.num_tasks
    fast = theta.unsqueeze(0).expand(T, -1)
    hist = []
    for k in range(cfg.num_steps):
        with bank.activate(fast, support.token_layout):
            losses = task_losses(model, support)
        (g,) = torch.autograd.grad(losses.sum(), fast, create_graph=create_graph)
        if cfg.max_grad_norm > 0:
            norms = torch.linalg.vector_norm(g, dim=1, keepdim=True)
            g = g * torch.clamp(cfg.max_grad_norm / (norms + _CLIP_EPS), max=1.0)
        if cfg.weight_decay:
            g = g + cfg.weight_decay * fast
        fast = fast - (cfg.lr if rates is None else rates.element_rates(k)) * g
        hist.append(losses.detach())
        if after_step is not None:
            after_step(k, fast)
    return fast, (torch.stack(hist) if hist else torch.zeros(0, T, device=theta.device))


def maml_step(model: nn.Module, bank: AdapterBank, support: PackedBatch, query: PackedBatch,
              cfg: InnerConfig, weights: torch.Tensor | None = None,
              first_order: bool = False, rates: InnerRates | None = None,
              msl: Sequence[float] | None = None) -> StepResult:
    """One batched second-order MAML meta-step (SGD inner loop); returns the meta-gradient.

    Semantics::

        fast[t] = theta - sum_k rate_k * dL_support[t](fast_k[t]) / dfast   (kept differentiable)
        meta_grad = d/d(theta, rates) sum_t w[t] sum_k v[k] L_query[t](fast_k[t])

    ``rate_k`` is ``cfg.lr``, or the learned ``rates`` (whose exact gradient is appended to
    theta's: [P + R]). ``v`` is the multi-step loss ``msl`` (K weights), or only the last step.
    """
    if cfg.optimizer != "sgd":
        raise ValueError("maml_step: second-order MAML differentiates through SGD inner steps")
    if first_order and (rates is not None or msl is not None):
        raise ValueError("maml_step: first_order=True takes neither learned rates nor msl (use "
                         "fomaml_step)")
    K = cfg.num_steps
    if msl is not None and (len(msl) != K or K == 0):
        raise ValueError(f"maml_step: msl has {len(msl)} weights for {K} inner steps")
    theta = bank.theta
    T = support.num_tasks
    points = []  # (weight, per-task query losses) of each query point

    def query_point(k, fast):
        if msl is not None and msl[k] != 0.0:
            with bank.activate(fast, query.token_layout):
                points.append((msl[k], task_losses(model, query)))

    with _backend.use_backend("torch"):
        fast, hist = _adapt(model, bank, theta, support, cfg, create_graph=not first_order,
                            rates=rates, after_step=query_point)
        if first_order:
            fast = fast.detach().requires_grad_()
        if msl is None:
            with bank.activate(fast, query.token_layout):
                points.append((1.0, task_losses(model, query)))
    qlosses = points[-1][1]
    keep = torch.ones(T, dtype=torch.bool, device=theta.device)
    for _, q in points:
        keep &= torch.isfinite(q.detach())
    w = normalized_weights(T, weights, keep, theta.device)
    meta_loss = sum(v * (torch.where(keep, q, torch.zeros_like(q)) * w).sum() for v, q in points)
    targets = [fast] if first_order else [theta] + ([rates.values] if rates is not None else [])
    grads = torch.autograd.grad(meta_loss, targets)
    grad = grads[0].sum(0) if first_order else torch.cat([g.reshape(-1) for g in grads])
    return StepResult(grad.detach(), hist, qlosses.detach(), w, ~keep)


def maml_step_per_task(model: nn.Module, bank: AdapterBank, support: PackedBatch,
                       query: PackedBatch, cfg: InnerConfig, rates: InnerRates | None = None,
                       msl: Sequence[float] | None = None) -> StepResult:
    """The per-task loop of ``maml_step``: each task alone, one after another (the oracle)."""
    T = support.num_tasks
    grads, hists, qls = [], [], []
    for t in range(T):
        r = maml_step(model, bank, support.task(t), query.task(t), cfg, rates=rates, msl=msl)
        grads.append(r.meta_grad)
        hists.append(r.support_losses[:, 0])
        qls.append(r.query_losses[0])
    dev = bank.theta.device
    w = torch.full((T,), 1.0 / T, dtype=torch.float32, device=dev)
    return StepResult(sum(g / T for g in grads), torch.stack(hists, 1), torch.stack(qls), w,
                      torch.zeros(T, dtype=torch.bool, device=dev))
