"""The per-task loop over a PEFT LoRA model: the benchmark's comparator and the tests' oracle.

Each task alone, one after another: load theta into the PEFT adapter, take K optimizer steps
on the task's support set, take the query gradient at the adapted weights, restore theta. This
is the seeds' Meta-LoRA done correctly (their ``param.data`` swapping takes gradients at the
wrong weights; here every gradient is taken at the weights the task actually has).
"""
from __future__ import annotations

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


def naive_inner(peft_model: nn.Module, io: PeftAdapterIO, theta: torch.Tensor,
                support: PackedBatch, cfg: InnerConfig) -> list[float]:
    """Adapts the PEFT adapter (starting at theta) on one task's support batch, in place."""
    params = io.parameters()
    io.load(theta)
    opt = _inner_optimizer(params, cfg)
    losses = []
    for _ in range(cfg.num_steps):
        opt.zero_grad(set_to_none=True)
        loss = causal_lm_loss(peft_model, support)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def naive_step(peft_model: nn.Module, io: PeftAdapterIO, theta: torch.Tensor,
               support: PackedBatch, query: PackedBatch, cfg: InnerConfig,
               algorithm: str = "fomaml", weights: torch.Tensor | None = None) -> StepResult:
    """One meta-step, one task at a time. ``algorithm`` is ``"fomaml"`` or ``"reptile"``.
    Every tensor of the result is on theta's device (that of the PEFT model)."""
    theta = theta.detach()
    dev = theta.device
    T, P = support.num_tasks, theta.numel()
    acc = torch.zeros(T, P, device=dev)
    hist = torch.zeros(cfg.num_steps, T, device=dev)
    qlosses = torch.zeros(T, device=dev)
    params = io.parameters()
    for t in range(T):
        hist[:, t] = torch.tensor(naive_inner(peft_model, io, theta, support.task(t), cfg),
                                  device=dev)
        for p in params:
            p.grad = None
        q = query.task(t)
        if algorithm == "fomaml":
            loss = causal_lm_loss(peft_model, q)
            loss.backward()
            acc[t] = io.flat_grad(P)
        else:
            with torch.no_grad():
                loss = causal_lm_loss(peft_model, q)
            acc[t] = theta - io.flat(P)
        qlosses[t] = loss.detach()
    io.load(theta)
    for p in params:
        p.grad = None
    w = normalized_weights(T, weights, torch.ones(T, dtype=torch.bool, device=dev), dev)
    return StepResult(w @ acc, hist, qlosses, w, torch.zeros(T, dtype=torch.bool, device=dev))
