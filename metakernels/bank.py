"""The adapter bank: every LoRA adapter of the model, for every task, in flat fp32 buffers.

    theta [P]       the meta-parameters (an ``nn.Parameter``: the outer optimizer steps it)
    fast  [T, P]    one row of fast weights per task
    grad  [T, P]    the adapter gradients of every task, written by the kernels' backward
    state           the inner optimizer's state (Adam), [T, P] each

Each adapted module owns one slice of P: ``A`` ([in, r], row-major) then ``B`` ([r, out]).
Its per-task ``A`` [T, in, r] and ``B`` [T, r, out] are views of ``fast`` and its gradients
views of ``grad``: one buffer means one kernel per update, one all-reduce per meta-step and a
checkpoint that is one tensor. Names and initialisation follow PEFT (``lora_A``
Kaiming-uniform, ``lora_B`` zero, ``scale = alpha / rank``); PEFT stores ``lora_A.weight`` as
[r, in] and ``lora_B.weight`` as [out, r], the transposes of the slices here.

This module is the one place that knows the layout: ``LoraSlot.peft_views`` gives a slot's
adapter in PEFT's form as views of a flat row, ``peft_state_dict`` / ``flat_from_peft`` convert
whole adapters, and ``adapter_meta`` / ``slots_from_meta`` / ``check_adapter_meta`` write and
read the layout a checkpoint records.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .errors import UserError
from .layout import TaskLayout
from .ops.fused_update import AdamState


@dataclass(frozen=True)
class LoraSlot:
    """Where one adapted module's adapter sits in the flat buffers."""

    name: str            # module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    rank: int
    offset: int          # start of A; B starts at offset + in_features * rank

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def a_slice(self) -> slice:
        return slice(self.offset, self.offset + self.in_features * self.rank)

    @property
    def b_slice(self) -> slice:
        a_end = self.offset + self.in_features * self.rank
        return slice(a_end, a_end + self.rank * self.out_features)

    def peft_views(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This slot's adapter in PEFT's form, as views of a flat row [P] (writes go to the
        row): ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]."""
        a = row[self.a_slice].view(self.in_features, self.rank).T
        b = row[self.b_slice].view(self.rank, self.out_features).T
        return a, b


PEFT_PREFIX = "base_model.model."


def layout_slots(specs, rank: int) -> list[LoraSlot]:
    """The slots of modules ``specs`` ((name, in_features, out_features) each, in bank order)
    at ``rank``, packed one after another from offset 0."""
    slots, offset = [], 0
    for name, fin, fout in specs:
        slots.append(LoraSlot(str(name), int(fin), int(fout), int(rank), offset))
        offset += slots[-1].numel
    return slots


def peft_state_dict(row: torch.Tensor, slots: list[LoraSlot], prefix: str = PEFT_PREFIX
                    ) -> dict[str, torch.Tensor]:
    """PEFT adapter weights (``<prefix><module>.lora_A.weight`` [r, in], ``lora_B.weight``
    [out, r]) of the flat row [P], on the CPU."""
    covered = sum(s.numel for s in slots)
    if covered != row.numel():
        raise ValueError(f"peft_state_dict: the row has {row.numel()} values, the adapter "
                         f"layout covers {covered}")
    row = row.detach()
    out = {}
    for s in slots:
        a, b = s.peft_views(row)
        out[f"{prefix}{s.name}.lora_A.weight"] = a.contiguous().cpu()
        out[f"{prefix}{s.name}.lora_B.weight"] = b.contiguous().cpu()
    return out


def flat_from_peft(state_dict: dict[str, torch.Tensor], slots: list[LoraSlot],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat row [P] (CPU) of a PEFT adapter state dict (keys with or without the
    ``base_model.model.`` prefix and the ``.default`` adapter name)."""
    norm = {}
    for k, v in state_dict.items():
        k2 = k.replace(".default.weight", ".weight")
        if k2.startswith(PEFT_PREFIX):
            k2 = k2[len(PEFT_PREFIX):]
        norm[k2] = v
    flat = torch.empty(sum(s.numel for s in slots), dtype=dtype)
    for s in slots:
        for part, view in zip(("lora_A", "lora_B"), s.peft_views(flat)):
            key = f"{s.name}.{part}.weight"
            if key not in norm:
                raise KeyError(f"PEFT adapter has no tensor {key!r} (the bank adapts "
                               f"{len(slots)} modules; first keys of the adapter: "
                               f"{sorted(norm)[:4]})")
            t = norm[key]
            if tuple(t.shape) != tuple(view.shape):
                raise ValueError(f"PEFT adapter tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"the bank expects {tuple(view.shape)} (rank {s.rank})")
            view.copy_(t.to(dtype))
    return flat


def adapter_meta(bank: "AdapterBank") -> dict:
    """The adapter layout a checkpoint records: module names and shapes, rank and alpha."""
    return {"slots": [[s.name, s.in_features, s.out_features] for s in bank.slots],
            "rank": bank.rank, "alpha": bank.alpha}


def slots_from_meta(meta: dict, where) -> tuple[list[LoraSlot], int, float]:
    """(slots, rank, alpha) recorded by ``adapter_meta`` in a checkpoint's metadata."""
    if not {"slots", "rank", "alpha"} <= meta.keys():
        raise UserError(f"{where}: not a checkpoint of python -m metakernels.train (no adapter "
                        f"layout in its metadata)")
    return layout_slots(meta["slots"], meta["rank"]), int(meta["rank"]), float(meta["alpha"])


def check_adapter_meta(bank: "AdapterBank", meta: dict, where) -> None:
    """The layout a checkpoint recorded must be ``bank``'s (same modules, shapes, rank and
    alpha): a theta only means something over the modules it was trained for."""
    slots, rank, alpha = slots_from_meta(meta, where)
    want = [(s.name, s.in_features, s.out_features) for s in slots]
    have = [(s.name, s.in_features, s.out_features) for s in bank.slots]
    if want != have or rank != bank.rank or not math.isclose(alpha, bank.alpha):
        raise UserError(f"{where}: the checkpoint's adapters ({len(want)} modules, rank {rank}, "
                        f"alpha {alpha}) do not match the rebuilt bank ({len(have)} modules, "
                        f"rank {bank.rank}, alpha {bank.alpha}); the model and LoRA settings "
                        f"must be the checkpoint's")


class AdapterBank:
    """Flat storage of the LoRA adapters of one model, for ``num_tasks`` tasks at once.

    The layers read ``self.active`` ([T', P], fast weights or theta) with ``self.layout`` (the
    token layout of the batch being run) and, when ``self.active_grad`` is set, write their
    adapter gradients straight into it (no autograd gradient for the adapters).
    """

    def __init__(self, slots: list[LoraSlot], rank: int, alpha: float, num_tasks: int,
                 device: torch.device | str = "cpu", dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        if rank < 1:
            raise ValueError(f"AdapterBank: rank must be >= 1, got {rank}")
        if num_tasks < 1:
            raise ValueError(f"AdapterBank: num_tasks must be >= 1, got {num_tasks}")
        self.slots = slots
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = float(dropout)
        self.num_params = sum(s.numel for s in slots)
        P, T = self.num_params, num_tasks
        # fp32 always for training; float64 only for the reference backend's precision checks
        self.dtype = dtype
        self.theta = torch.nn.Parameter(torch.zeros(P, dtype=dtype, device=device))
        self.fast = torch.zeros(T, P, dtype=dtype, device=device)
        self.grad = torch.zeros(T, P, dtype=dtype, device=device)
        self.state: AdamState | None = None
        self.active: torch.Tensor | None = None
        self.active_grad: torch.Tensor | None = None
        self.layout: TaskLayout | None = None

    # -- construction ---------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.fast.shape[0]

    @property
    def device(self) -> torch.device:
        return self.theta.device

    def resize(self, num_tasks: int) -> None:
        """Reallocates the per-task buffers for ``num_tasks`` tasks."""
        if num_tasks != self.num_tasks:
            P, dev = self.num_params, self.device
            self.fast = torch.zeros(num_tasks, P, dtype=self.dtype, device=dev)
            self.grad = torch.zeros(num_tasks, P, dtype=self.dtype, device=dev)
            self.state = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init: ``lora_A`` Kaiming-uniform (a = sqrt(5)) on [r, in], ``lora_B`` zero."""
        with torch.no_grad():
            for s in self.slots:
                a = torch.empty(s.rank, s.in_features, dtype=self.dtype)
                bound = 1.0 / math.sqrt(s.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                a.uniform_(-bound, bound, generator=generator)
                pa, pb = s.peft_views(self.theta)
                pa.copy_(a)
                pb.zero_()

    # -- views ----------------------------------------------------------------------------------
    def views(self, buf: torch.Tensor, slot: LoraSlot) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` [T, in, r] and ``B`` [T, r, out] views of a [T, P] buffer."""
        T = buf.shape[0]
        A = buf[:, slot.a_slice].view(T, slot.in_features, slot.rank)
        B = buf[:, slot.b_slice].view(T, slot.rank, slot.out_features)
        return A, B

    # -- modes ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self, weights: torch.Tensor | None, layout: TaskLayout | None,
                 grad: torch.Tensor | None = None):
        """Runs the model with ``weights`` ([T', P]) over the rows of ``layout``; ``grad``
        ([T', P]) receives the adapter gradients in place. ``weights=None`` runs the bare base."""
        prev = (self.active, self.layout, self.active_grad)
        if weights is not None:
            if weights.dim() != 2 or weights.shape[1] != self.num_params:
                raise ValueError(f"AdapterBank.activate: weights must be [T, {self.num_params}], "
                                 f"got {tuple(weights.shape)}")
            if layout is None or layout.num_tasks != weights.shape[0]:
                raise ValueError("AdapterBank.activate: the layout must have one task per row of "
                                 "weights")
        self.active, self.layout, self.active_grad = weights, layout, grad
        try:
            yield
        finally:
            self.active, self.layout, self.active_grad = prev

    def start_inner(self, optimizer: str, num_tasks: int | None = None) -> None:
        """Copies theta into every task's fast weights and clears the inner optimizer state."""
        self.resize(num_tasks or self.num_tasks)
        with torch.no_grad():
            self.fast.copy_(self.theta.detach().expand_as(self.fast))
        if optimizer == "adam":
            if self.state is None:
                self.state = AdamState.zeros_like(self.fast)
            else:
                self.state.zero_()
        # Layers read views of fast that must report requires_grad so that the loss gets a
        # graph; their gradients go to self.grad, never to fast.grad.
        self.fast.requires_grad_(True)

    # -- PEFT interop ---------------------------------------------------------------------------
    def peft_state_dict(self, row: torch.Tensor | None = None, prefix: str = PEFT_PREFIX
                        ) -> dict[str, torch.Tensor]:
        """PEFT adapter weights of ``row`` [P] (default theta); see ``peft_state_dict``."""
        return peft_state_dict(self.theta if row is None else row, self.slots, prefix)

    def flat_from_peft(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """The [P] flat vector (on the bank's device) of a PEFT adapter state dict."""
        return flat_from_peft(state_dict, self.slots, self.dtype).to(self.device)
