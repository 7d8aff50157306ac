"""The per-task loop over a PEFT LoRA model: the benchmark's comparator and the tests' oracle.

Each task alone, one after another: load theta into the PEFT adapter, take K optimizer steps
on the task's support set, take the query gradient at the adapted weights, restore theta. This
is the seeds' Meta-LoRA done correctly (their ``param.data`` swapping takes gradients at the
wrong weights; here every gradient is taken at the weights the task actually has).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn as nn

from ..bank import AdapterBank, LoraSlot
from ..batch import PackedBatch
from .common import InnerConfig, StepResult, causal_lm_loss, normalized_weights


def make_peft_model(base: nn.Module, bank: AdapterBank, target_modules="all-linear"):
    """A PEFT LoRA model over ``base`` with the bank's rank, alpha and adapted modules."""
    from peft import LoraConfig, get_peft_model

    names = [s.name for s in bank.slots]
    cfg = LoraConfig(r=bank.rank, lora_alpha=bank.alpha, lora_dropout=0.0,
                     target_modules=names, fan_in_fan_out=_has_conv1d(base, names))
    return get_peft_model(base, cfg)


def _has_conv1d(base: nn.Module, names) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return any(isinstance(base.get_submodule(n), Conv1D) for n in names)


class PeftAdapterIO:
    """Copies between the PEFT model's LoRA parameters and the bank's flat [P] layout."""

    def __init__(self, peft_model: nn.Module, slots: list[LoraSlot], adapter: str = "default"):
        self.slots = slots
        self.params: list[tuple[LoraSlot, nn.Parameter, nn.Parameter]] = []
        for s in slots:
            layer = peft_model.base_model.model.get_submodule(s.name)
            self.params.append((s, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight))

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, a, b in self.params for p in (a, b)]

    @property
    def device(self) -> torch.device:
        return self.params[0][1].device

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> None:
        for s, a, b in self.params:
            pa, pb = s.peft_views(flat)
            a.copy_(pa)
            b.copy_(pb)

    def flat_grad(self, num_params: int) -> torch.Tensor:
        out = torch.zeros(num_params, device=self.device)
        for s, a, b in self.params:
            pa, pb = s.peft_views(out)
            if a.grad is not None:
                pa.copy_(a.grad)
            if b.grad is not None:
                pb.copy_(b.grad)
        return out

    def flat(self, num_params: int) -> torch.Tensor:
        out = torch.zeros(num_params, device=self.device)
        for s, a, b in self.params:
            pa, pb = s.peft_views(out)
            pa.copy_(a.detach())
            pb.copy_(b.detach())
        return out


def _inner_optimizer(params, cfg: InnerConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.weight_decay else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def slot_rates(values: torch.Tensor, slots: list[LoraSlot], num_params: int,
               step: int) -> torch.Tensor:
    """[P] learned rates of inner step ``step`` in the flat layout: ``values`` [K, S] (one per
    step and module: the module's A and B elements get it) or [P] (one per element)."""
    v = values.detach()
    if v.dim() == 1:
        return v
    out = torch.empty(num_params, dtype=v.dtype, device=v.device)
    for i, s in enumerate(slots):
        out[s.a_slice] = v[step, i]
        out[s.b_slice] = v[step, i]
    return out


def naive_inner(peft_model: nn.Module, io: PeftAdapterIO, theta: torch.Tensor,
                support: PackedBatch, cfg: InnerConfig, rates: torch.Tensor | None = None,
                after_step=None) -> list[float]:
    """Adapts the PEFT adapter (starting at theta) on one task's support batch, in place.

    With learned ``rates`` (``InnerRates.values``) each step is torch.optim's step at lr 1,
    whose change is the update direction ``-d``, scaled per element by the step's rates;
    ``after_step(k, d)`` then sees the flat direction [P] of step k."""
    params = io.parameters()
    io.load(theta)
    opt = _inner_optimizer(params, cfg if rates is None else replace(cfg, lr=1.0))
    P = theta.numel()
    losses = []
    for k in range(cfg.num_steps):
        opt.zero_grad(set_to_none=True)
        loss = causal_lm_loss(peft_model, support)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        before = io.flat(P) if rates is not None else None
        opt.step()
        if rates is not None:
            d = before - io.flat(P)
            io.load(before - slot_rates(rates, io.slots, P, k) * d)
        if after_step is not None:
            after_step(k, d if rates is not None else None)
        losses.append(float(loss.detach()))
    return losses


def naive_step(peft_model: nn.Module, io: PeftAdapterIO, theta: torch.Tensor,
               support: PackedBatch, query: PackedBatch, cfg: InnerConfig,
               algorithm: str = "fomaml", weights: torch.Tensor | None = None,
               rates: torch.Tensor | None = None,
               msl: Sequence[float] | None = None) -> StepResult:
    """One meta-step, one task at a time. ``algorithm`` is ``"fomaml"`` or ``"reptile"``.
    Every tensor of the result is on theta's device (that of the PEFT model).

    fomaml with learned ``rates`` ([K, S] or [P]) and/or the multi-step loss ``msl``: the
    query gradient after every inner step with a nonzero weight, and the rates' first-order
    gradient ``-g_q * d_j`` for the steps j before that point, summed per rate: the result is
    [P + R], as ``fomaml_step``'s."""
    theta = theta.detach()
    dev = theta.device
    T, P = support.num_tasks, theta.numel()
    R = 0 if rates is None else rates.numel()
    acc = torch.zeros(T, P + R, device=dev)
    hist = torch.zeros(cfg.num_steps, T, device=dev)
    qlosses = torch.zeros(T, device=dev)
    params = io.parameters()
    vs = list(msl) if msl is not None else None
    for t in range(T):
        dirs: list[torch.Tensor] = []

        def query_point(k, d):
            if d is not None:
                dirs.append(d)
            if vs is None or vs[k] == 0.0:
                return
            qlosses[t] = _query_grad_into(peft_model, io, query.task(t), acc[t], vs[k], rates,
                                          dirs, P)

        hist[:, t] = torch.tensor(naive_inner(peft_model, io, theta, support.task(t), cfg,
                                              rates, query_point), device=dev)
        if vs is not None:
            continue
        for p in params:
            p.grad = None
        q = query.task(t)
        if algorithm == "fomaml":
            qlosses[t] = _query_grad_into(peft_model, io, q, acc[t], 1.0, rates, dirs, P)
        else:
            with torch.no_grad():
                loss = causal_lm_loss(peft_model, q)
            acc[t, :P] = theta - io.flat(P)
            qlosses[t] = loss.detach()
    io.load(theta)
    for p in params:
        p.grad = None
    w = normalized_weights(T, weights, torch.ones(T, dtype=torch.bool, device=dev), dev)
    return StepResult(w @ acc, hist, qlosses, w, torch.zeros(T, dtype=torch.bool, device=dev))


def _query_grad_into(peft_model, io: PeftAdapterIO, q: PackedBatch, out: torch.Tensor,
                     weight: float, rates, dirs: list[torch.Tensor], P: int) -> float:
    """Adds ``weight`` times the query gradient at the current adapter to ``out[:P]`` and, with
    learned rates, ``weight`` times their first-order gradient to ``out[P:]``; returns the query
    loss."""
    for p in io.parameters():
        p.grad = None
    loss = causal_lm_loss(peft_model, q)
    loss.backward()
    g = io.flat_grad(P)
    out[:P] += weight * g
    if rates is not None:
        if rates.dim() == 1:
            out[P:] -= weight * g * sum(dirs)
        else:
            rg = torch.zeros(rates.shape, device=g.device)
            for j, d in enumerate(dirs):
                for i, s in enumerate(io.slots):
                    rg[j, i] = (g[s.a_slice] * d[s.a_slice]).sum() + (
                        g[s.b_slice] * d[s.b_slice]).sum()
            out[P:] -= weight * rg.reshape(-1)
    for p in io.parameters():
        p.grad = None
    return float(loss.detach())
