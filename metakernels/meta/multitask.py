"""The multi-task LoRA SFT baseline: one shared adapter trained on the mixture of tasks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bank import AdapterBank
from ..batch import IGNORE_INDEX, PackedBatch
from ..layout import TaskLayout
from .common import StepResult, task_losses


def mixture(*batches: PackedBatch) -> PackedBatch:
    """All rows of ``batches`` as one task (right-padded to the longest)."""
    L = max(b.seq_len for b in batches)

    def pad(t, value):
        return F.pad(t, (0, L - t.shape[1]), value=value)

    ids = torch.cat([pad(b.input_ids, 0) for b in batches])
    am = torch.cat([pad(b.attention_mask, 0) for b in batches])
    labels = torch.cat([pad(b.labels, IGNORE_INDEX) for b in batches])
    return PackedBatch(ids, am, labels, TaskLayout((0, ids.shape[0])))


def multitask_step(model: nn.Module, bank: AdapterBank, support: PackedBatch,
                   query: PackedBatch) -> StepResult:
    """Gradient, at theta, of the token-mean loss over every support and query example of the
    sampled tasks (plain LoRA SFT on the mixture; no inner loop)."""
    T = support.num_tasks
    batch = mixture(support, query)
    with bank.activate(bank.theta.unsqueeze(0), batch.token_layout):
        loss = task_losses(model, batch)[0]
    (grad,) = torch.autograd.grad(loss, bank.theta)
    loss = loss.detach()
    w = torch.full((T,), 1.0 / T, device=grad.device)
    return StepResult(grad, loss.reshape(1, 1).expand(1, T), loss.expand(T), w,
                      torch.zeros(T, dtype=torch.bool, device=grad.device))
