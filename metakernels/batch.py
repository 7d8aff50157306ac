"""Tokenised examples and the packed multi-task batch every meta-step runs on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layout import TaskLayout

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenised sequence. ``loss_mask[i]`` is 1 where token ``input_ids[i]`` is a target
    (a response token or the closing EOS), 0 on the prompt."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"Example: input_ids has {len(self.input_ids)} tokens but loss_mask "
                             f"has {len(self.loss_mask)}")
        if len(self.input_ids) < 2:
            raise ValueError("Example: a sequence needs at least 2 tokens")

    @property
    def num_targets(self) -> int:
        # token 0 is never a target: nothing precedes it
        return sum(self.loss_mask[1:])


@dataclass
class PackedBatch:
    """Sequences of T tasks in one right-padded batch, rows grouped by task.

    input_ids, attention_mask: [N, L]; labels: [N, L], ``labels[n, i]`` is the token that
    position ``i`` must predict (``input_ids[n, i+1]``) or ``IGNORE_INDEX``.
    layout: rows (sequences) per task; ``token_layout`` is the same over the N*L flat tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    layout: TaskLayout

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def token_layout(self) -> TaskLayout:
        return self.layout.repeat_rows(self.seq_len)

    @property
    def num_tasks(self) -> int:
        return self.layout.num_tasks

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.labels.to(device), self.layout)

    def select(self, t0: int, t1: int) -> "PackedBatch":
        """Tasks ``t0:t1`` (a view of their rows, same padded length)."""
        s, e = self.layout.offsets[t0], self.layout.offsets[t1]
        return PackedBatch(self.input_ids[s:e], self.attention_mask[s:e], self.labels[s:e],
                           TaskLayout.from_sizes(self.layout.sizes[t0:t1]))

    def task(self, t: int) -> "PackedBatch":
        """Task ``t`` alone, cropped to its own longest sequence (what a per-task loop sees)."""
        s, e = self.layout.offsets[t], self.layout.offsets[t + 1]
        am = self.attention_mask[s:e]
        L = int(am.sum(1).max()) if e > s else 1
        return PackedBatch(self.input_ids[s:e, :L], am[:, :L], self.labels[s:e, :L],
                           TaskLayout((0, e - s)))


def pack_tasks(tasks: Sequence[Sequence[Example]], pad_id: int, pad_to_multiple_of: int = 1
               ) -> PackedBatch:
    """Packs ``tasks[t]`` (a list of examples per task) into one right-padded batch."""
    if not tasks:
        raise ValueError("pack_tasks: no tasks given")
    seqs = [ex for task in tasks for ex in task]
    if not seqs:
        raise ValueError("pack_tasks: every task is empty")
    L = max(len(ex.input_ids) for ex in seqs)
    L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    N = len(seqs)
    # packed on the host whatever the default device (element by element writes), moved to
    # the training device once with PackedBatch.to
    ids = torch.full((N, L), pad_id, dtype=torch.long, device="cpu")
    am = torch.zeros((N, L), dtype=torch.long, device="cpu")
    labels = torch.full((N, L), IGNORE_INDEX, dtype=torch.long, device="cpu")
    for n, ex in enumerate(seqs):
        k = len(ex.input_ids)
        row = torch.tensor(ex.input_ids, dtype=torch.long, device="cpu")
        mask = torch.tensor(ex.loss_mask, dtype=torch.bool, device="cpu")
        ids[n, :k] = row
        am[n, :k] = 1
        lab = torch.where(mask[1:], row[1:], torch.full_like(row[1:], IGNORE_INDEX))
        labels[n, :k - 1] = lab
    return PackedBatch(ids, am, labels, TaskLayout.from_sizes([len(t) for t in tasks]))
