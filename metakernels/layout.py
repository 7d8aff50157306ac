"""Task layouts: where each task's rows sit in a packed batch.

A meta-step packs the rows (sequences, then tokens) of all T tasks into one tensor, grouped by
task. ``TaskLayout`` records the segment boundaries once per meta-step; every op of every inner
step reads it, so the metadata the kernels need (int32 offsets on the device, the row -> task map,
whether all tasks have the same number of rows) is computed here once and cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True, eq=False)
class TaskLayout:
    """Rows ``offsets[t]:offsets[t+1]`` of a packed batch belong to task ``t``.

    Attributes:
        offsets: python ints, length T+1, non-decreasing, ``offsets[0] == 0``.
    """

    offsets: tuple[int, ...]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        offs = tuple(int(o) for o in self.offsets)
        if len(offs) < 2:
            raise ValueError(f"TaskLayout: offsets needs at least 2 entries (T >= 1), got {offs}")
        if offs[0] != 0:
            raise ValueError(f"TaskLayout: offsets[0] must be 0, got {offs[0]}")
        for t in range(len(offs) - 1):
            if offs[t + 1] < offs[t]:
                raise ValueError(
                    f"TaskLayout: offsets must be non-decreasing, offsets[{t}]={offs[t]} > "
                    f"offsets[{t + 1}]={offs[t + 1]}")
        object.__setattr__(self, "offsets", offs)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "TaskLayout":
        offs = [0]
        for i, s in enumerate(sizes):
            if int(s) < 0:
                raise ValueError(f"TaskLayout.from_sizes: sizes[{i}]={s} is negative")
            offs.append(offs[-1] + int(s))
        return cls(tuple(offs))

    @classmethod
    def uniform_layout(cls, num_tasks: int, rows_per_task: int) -> "TaskLayout":
        return cls.from_sizes([rows_per_task] * num_tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_rows(self) -> int:
        return self.offsets[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.offsets[t + 1] - self.offsets[t] for t in range(self.num_tasks))

    @property
    def uniform(self) -> int | None:
        """Rows per task when every task has the same number (> 0), else None."""
        sizes = set(self.sizes)
        if len(sizes) == 1:
            (n,) = sizes
            return n if n > 0 else None
        return None

    def segments(self):
        """Yields ``(t, start, end)`` for every task."""
        for t in range(self.num_tasks):
            yield t, self.offsets[t], self.offsets[t + 1]

    def repeat_rows(self, factor: int) -> "TaskLayout":
        """The layout of the same tasks when every row expands into ``factor`` rows
        (sequences -> tokens)."""
        key = ("repeat", factor)
        if key not in self._cache:
            self._cache[key] = TaskLayout(tuple(o * factor for o in self.offsets))
        return self._cache[key]

    def offsets_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 offsets [T+1] on ``device`` (cached)."""
        device = torch.device(device)
        key = ("offsets", str(device))
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.offsets, dtype=torch.int32, device=device)
        return self._cache[key]

    def task_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 [N]: the task of every row (cached)."""
        device = torch.device(device)
        key = ("task_ids", str(device))
        if key not in self._cache:
            sizes = torch.tensor(self.sizes, dtype=torch.int64, device=device)
            tasks = torch.arange(self.num_tasks, dtype=torch.int32, device=device)
            # output_size: no read-back of the sizes from the device
            self._cache[key] = torch.repeat_interleave(tasks, sizes, output_size=sum(self.sizes))
        return self._cache[key]

    def __repr__(self) -> str:
        return f"TaskLayout(sizes={list(self.sizes)})"
