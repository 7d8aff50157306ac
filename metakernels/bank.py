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
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

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

    def slot_offsets(self) -> torch.Tensor:
        """int32 [S + 1] on the bank's device: where each slot starts in P, then P. The segments
        of ``fused_update``'s per-segment rates (one rate per adapted module)."""
        starts = [s.offset for s in self.slots] + [self.num_params]
        return torch.tensor(starts, dtype=torch.int32, device=self.device)

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
                self.theta[s.a_slice] = a.T.reshape(-1).to(self.device)
                self.theta[s.b_slice] = 0.0

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
    def peft_state_dict(self, row: torch.Tensor | None = None, prefix: str = "base_model.model."
                        ) -> dict[str, torch.Tensor]:
        """PEFT adapter weights (``<prefix><module>.lora_A.weight`` [r, in], ``lora_B.weight``
        [out, r]) from ``row`` [P] (default theta)."""
        row = (self.theta if row is None else row).detach()
        out = {}
        for s in self.slots:
            a = row[s.a_slice].view(s.in_features, s.rank).T.contiguous()
            b = row[s.b_slice].view(s.rank, s.out_features).T.contiguous()
            out[f"{prefix}{s.name}.lora_A.weight"] = a.cpu()
            out[f"{prefix}{s.name}.lora_B.weight"] = b.cpu()
        return out

    def flat_from_peft(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """The [P] flat vector of a PEFT adapter state dict (keys with or without the
        ``base_model.model.`` prefix and the ``.default`` adapter name)."""
        norm = {}
        for k, v in state_dict.items():
            k2 = k.replace(".default.weight", ".weight")
            if k2.startswith("base_model.model."):
                k2 = k2[len("base_model.model."):]
            norm[k2] = v
        flat = torch.empty(self.num_params, dtype=self.dtype)
        for s in self.slots:
            for part, shape, sl in (("lora_A", (s.rank, s.in_features), s.a_slice),
                                    ("lora_B", (s.out_features, s.rank), s.b_slice)):
                key = f"{s.name}.{part}.weight"
                if key not in norm:
                    raise KeyError(f"PEFT adapter has no tensor {key!r} (the bank adapts "
                                   f"{len(self.slots)} modules; first keys of the adapter: "
                                   f"{sorted(norm)[:4]})")
                t = norm[key]
                if tuple(t.shape) != shape:
                    raise ValueError(f"PEFT adapter tensor {key!r} has shape {tuple(t.shape)}, "
                                     f"the bank expects {shape} (rank {s.rank})")
                flat[sl] = t.to(self.dtype).T.reshape(-1)
        return flat.to(self.device)
