"""Meta-batch sampling: T distinct tasks per step, support and query examples for each, packed.

Every draw is a pure function of ``(seed, step)`` and, with loss weighting, of the per-task loss
averages: the tasks of step s come from ``Random(f"{seed}:{s}")`` and the examples of task n at
step s from ``Random(f"{seed}:{s}:{n}")``. So a resumed run (same seed, the restored
``state_dict()``) draws exactly what the uninterrupted run would have, and with several
processes every rank draws the same tasks and keeps its own contiguous share, whose examples do
not depend on how the tasks are split.
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple, Sequence, Union

from ..batch import Example, PackedBatch, pack_tasks
from .loader import DataError, TaskData, tokenize_example
from .tasks import ProceduralTask

Task = Union[TaskData, ProceduralTask]
WEIGHTINGS = ("uniform", "loss")


class MetaBatch(NamedTuple):
    """One meta-step's data: ``support`` and ``query`` hold the tasks in ``task_names`` order."""

    task_names: list[str]
    support: PackedBatch
    query: PackedBatch


def _procedural_examples(task: ProceduralTask, rng: random.Random, n_support: int, n_query: int,
                         tokenizer, max_length: int, apply_chat_template: bool
                         ) -> tuple[list[Example], list[Example]]:
    """``n_support`` + ``n_query`` fresh examples of ``task``, no prompt in both sets."""
    pairs = task.sample_distinct(rng, n_support + n_query)
    try:
        examples = [tokenize_example(tokenizer, p, r, max_length, "error", apply_chat_template)
                    for p, r in pairs]
    except DataError as e:
        raise DataError(f"task {task.name!r}: {e}") from None
    return examples[:n_support], examples[n_support:]


def make_task_data(task: ProceduralTask, n_support: int, n_query: int, seed: int, tokenizer,
                   max_length: int, apply_chat_template: bool = False) -> TaskData:
    """A procedural task frozen into fixed support and query pools (for evaluation), drawn from
    ``Random(f"{seed}:{task.name}")``; support and query share no prompt."""
    support, query = _procedural_examples(task, random.Random(f"{seed}:{task.name}"), n_support,
                                          n_query, tokenizer, max_length, apply_chat_template)
    return TaskData(task.name, support, query)


class TaskSampler:
    """Draws meta-batches of ``meta_batch_size`` distinct tasks.

    For a ``TaskData`` task, ``support_size`` and ``query_size`` examples are drawn without
    replacement from its support and query pools; for a ``ProceduralTask`` they are generated
    fresh (with distinct prompts) and tokenised with ``tokenizer`` (truncation "error").

    Args:
        weighting: ``"uniform"``, or ``"loss"``: tasks are drawn with probability
            ``softmax(loss_ema / temperature)``, where ``loss_ema`` is each task's exponential
            moving average (decay ``ema_decay``) of the losses passed to ``update_losses``. A task
            with no loss yet counts as the highest average seen, so every task gets tried.
        pad_to_multiple_of: passed to ``pack_tasks``.
    """

    def __init__(self, tasks: Sequence[Task], *, meta_batch_size: int, support_size: int,
                 query_size: int, seed: int, tokenizer, max_length: int = 64,
                 apply_chat_template: bool = False, weighting: str = "uniform",
                 temperature: float = 1.0, ema_decay: float = 0.9, pad_to_multiple_of: int = 1):
        self.tasks = {t.name: t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError("TaskSampler: task names must be unique")
        if not 1 <= meta_batch_size <= len(self.tasks):
            raise ValueError(f"TaskSampler: meta_batch_size={meta_batch_size} needs between 1 and "
                             f"the number of tasks, {len(self.tasks)}")
        if support_size < 1 or query_size < 1:
            raise ValueError(f"TaskSampler: support_size={support_size} and "
                             f"query_size={query_size} must be at least 1")
        for t in tasks:
            if isinstance(t, TaskData):
                for split, size in (("support", support_size), ("query", query_size)):
                    pool = len(getattr(t, split))
                    if pool < size:
                        raise ValueError(f"TaskSampler: task {t.name!r} has {pool} {split} "
                                         f"examples, fewer than {split}_size={size}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"TaskSampler: weighting must be one of {WEIGHTINGS}, "
                             f"got {weighting!r}")
        if temperature <= 0 or not 0 <= ema_decay < 1:
            raise ValueError(f"TaskSampler: need temperature > 0 and 0 <= ema_decay < 1, got "
                             f"{temperature} and {ema_decay}")
        if tokenizer.pad_token_id is None:
            raise ValueError("TaskSampler: the tokenizer has no pad token")
        self.meta_batch_size = meta_batch_size
        self.support_size = support_size
        self.query_size = query_size
        self.seed = seed
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.apply_chat_template = apply_chat_template
        self.weighting = weighting
        self.temperature = temperature
        self.ema_decay = ema_decay
        self.pad_to_multiple_of = pad_to_multiple_of
        self.loss_ema: dict[str, float] = {}

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def probabilities(self) -> dict[str, float]:
        """The probability of each task being drawn first (later draws renormalise over the
        tasks not yet drawn)."""
        names = self.task_names
        if self.weighting == "uniform":
            return {n: 1.0 / len(names) for n in names}
        default = max(self.loss_ema.values(), default=0.0)
        logits = [self.loss_ema.get(n, default) / self.temperature for n in names]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        return {n: w / total for n, w in zip(names, weights)}

    def tasks_for_step(self, step: int) -> list[str]:
        """The ``meta_batch_size`` distinct task names of ``step``, in draw order."""
        rng = random.Random(f"{self.seed}:{step}")
        probs = self.probabilities()
        names, weights = list(probs), list(probs.values())
        chosen = []
        for _ in range(self.meta_batch_size):
            i = rng.choices(range(len(names)), weights=weights)[0]
            chosen.append(names.pop(i))
            weights.pop(i)
        return chosen

    def _draw(self, name: str, step: int) -> tuple[list[Example], list[Example]]:
        task = self.tasks[name]
        rng = random.Random(f"{self.seed}:{step}:{name}")
        if isinstance(task, ProceduralTask):
            return _procedural_examples(task, rng, self.support_size, self.query_size,
                                        self.tokenizer, self.max_length,
                                        self.apply_chat_template)
        return rng.sample(task.support, self.support_size), rng.sample(task.query, self.query_size)

    def sample(self, step: int, rank: int = 0, world_size: int = 1) -> MetaBatch:
        """The meta-batch of ``step``; with ``world_size > 1``, the contiguous share of tasks
        of process ``rank`` (tasks ``[T*rank // world_size, T*(rank+1) // world_size)``)."""
        if not 0 <= rank < world_size <= self.meta_batch_size:
            raise ValueError(f"TaskSampler.sample: need 0 <= rank={rank} < world_size="
                             f"{world_size} <= meta_batch_size={self.meta_batch_size}")
        names = self.tasks_for_step(step)
        T = len(names)
        names = names[T * rank // world_size:T * (rank + 1) // world_size]
        drawn = [self._draw(n, step) for n in names]
        support = pack_tasks([s for s, _ in drawn], self.tokenizer.pad_token_id,
                             self.pad_to_multiple_of)
        query = pack_tasks([q for _, q in drawn], self.tokenizer.pad_token_id,
                           self.pad_to_multiple_of)
        return MetaBatch(names, support, query)

    def update_losses(self, names: Sequence[str], losses: Sequence[float]) -> None:
        """Folds each task's latest loss into its moving average (non-finite losses are
        ignored). With several processes, call it on every rank with the losses of all tasks of
        the step, so that all ranks keep drawing the same tasks."""
        if len(names) != len(losses):
            raise ValueError(f"update_losses: {len(names)} names but {len(losses)} losses")
        for name, loss in zip(names, losses):
            if name not in self.tasks:
                raise KeyError(f"update_losses: unknown task {name!r}")
            loss = float(loss)
            if not math.isfinite(loss):
                continue
            old = self.loss_ema.get(name)
            self.loss_ema[name] = loss if old is None else (
                self.ema_decay * old + (1 - self.ema_decay) * loss)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "weighting": self.weighting, "loss_ema": dict(self.loss_ema)}

    def load_state_dict(self, state: dict) -> None:
        """Restores the loss averages of ``state_dict()``; the seed and weighting must match
        this sampler's (a resumed run with other settings would not continue the same stream)."""
        if state["seed"] != self.seed or state["weighting"] != self.weighting:
            raise ValueError(
                f"TaskSampler.load_state_dict: state has seed={state['seed']}, weighting="
                f"{state['weighting']!r}, this sampler seed={self.seed}, weighting="
                f"{self.weighting!r}")
        unknown = sorted(set(state["loss_ema"]) - set(self.tasks))
        if unknown:
            raise ValueError(f"TaskSampler.load_state_dict: unknown tasks {unknown}")
        self.loss_ema = {n: float(v) for n, v in state["loss_ema"].items()}
