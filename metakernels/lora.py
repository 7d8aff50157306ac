"""Model integration: multi-task LoRA layers injected into a Hugging Face causal LM."""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bank import AdapterBank, LoraSlot
from .ops import multi_lora_linear

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the bare layers
    Conv1D = ()


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or ``transformers`` ``Conv1D``) plus one LoRA adapter per task.

    Semantics: ``y = base(x) + scale * (dropout(x) @ A[t]) @ B[t]`` for the rows of task ``t``,
    where ``A``/``B`` are views of ``bank.active`` and the rows are split by ``bank.layout``.
    With no active weights in the bank it is the bare base layer.
    """

    def __init__(self, base: nn.Module, bank: AdapterBank, slot: LoraSlot):
        super().__init__()
        self.base = base
        self.slot = slot
        object.__setattr__(self, "bank", bank)  # not a submodule: the bank is shared
        self.is_conv1d = bool(Conv1D) and isinstance(base, Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as [out, in] (a transposed view for ``Conv1D``)."""
        return self.base.weight.T if self.is_conv1d else self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        if bank.active is None:
            return self.base(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.slot.in_features)
        A, B = bank.views(bank.active, self.slot)
        gA = gB = None
        if bank.active_grad is not None:
            gA, gB = bank.views(bank.active_grad, self.slot)
        W, b = self.weight, self.base.bias
        if bank.dropout > 0 and self.training:
            # PEFT applies dropout to the LoRA input only
            y = F.linear(x2, W, b) + multi_lora_linear(
                F.dropout(x2, bank.dropout, True), None, None, A, B, bank.layout, bank.scale,
                gA, gB)
        else:
            y = multi_lora_linear(x2, W, b, A, B, bank.layout, bank.scale, gA, gB)
        return y.view(*lead, self.slot.out_features)

    def extra_repr(self) -> str:
        s = self.slot
        return f"in={s.in_features}, out={s.out_features}, rank={s.rank}"


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D: [in, out]
    return w.shape[0], w.shape[1]


def _matches(name: str, targets, output_name: str | None) -> bool:
    if targets == "all-linear":
        return name != output_name
    if isinstance(targets, str):  # a regex, as PEFT takes it: full match of the module name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def unmatched_targets(model: nn.Module, target_modules) -> list[str]:
    """The entries of ``target_modules`` (names, or one regex) that match no linear module of
    ``model``; ``"all-linear"`` matches by definition."""
    if target_modules == "all-linear":
        return []
    linear = [n for n, m in model.named_modules() if _is_adaptable(m)]
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [t for t in targets
            if not any(_matches(n, t if isinstance(target_modules, str) else [t], None)
                       for n in linear)]


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the linear modules of ``model`` (what target_modules takes)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_adaptable(m)})


def inject(model: nn.Module, target_modules: str | Iterable[str] = ("q_proj", "k_proj",
           "v_proj", "o_proj"), rank: int = 8, alpha: float = 16.0, num_tasks: int = 1,
           dropout: float = 0.0, init: bool = True, dtype: torch.dtype = torch.float32
           ) -> AdapterBank:
    """Replaces the matching linear layers of ``model`` with ``MultiLoraLinear`` layers in place,
    freezes every parameter of ``model`` and returns the ``AdapterBank`` holding the adapters.

    Args:
        target_modules: module-name suffixes (``["q_proj", "v_proj"]``), a regex matched against
            the full module name, or ``"all-linear"`` (every linear layer but the output layer),
            as PEFT takes them.
        rank, alpha: LoRA rank and alpha; ``scale = alpha / rank``.
        num_tasks: rows of the bank's fast-weight buffers (changeable later with ``resize``).
        dropout: LoRA dropout on the adapter input, as PEFT applies it (training mode only).
        init: PEFT's initialisation of theta (else zeros).
        dtype: of the bank's buffers; fp32 (float64 only for precision checks on the reference
            backend).
    """
    if rank < 1:
        raise ValueError(f"inject: rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"inject: dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, (list, tuple)) and not target_modules:
        raise ValueError("inject: target_modules is empty")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = None
    for name, mod in model.named_modules():
        if mod is out_emb:
            output_name = name
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules()
             if _is_adaptable(m) and _matches(n, target_modules, output_name)]
    if not found:
        raise ValueError(f"inject: no linear module matches target_modules={target_modules!r}; "
                         f"linear module names in this model: {linear_module_names(model)}")
    slots, offset = [], 0
    for name, mod in found:
        fin, fout = _features(mod)
        slots.append(LoraSlot(name, fin, fout, rank, offset))
        offset += slots[-1].numel
    device = next(model.parameters()).device
    bank = AdapterBank(slots, rank, alpha, num_tasks, device=device, dropout=dropout, dtype=dtype)
    if init:
        bank.reset_parameters()
    for slot, (name, mod) in zip(slots, found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiLoraLinear(mod, bank, slot))
    model._metakernels_bank = bank
    return bank


def get_bank(model: nn.Module) -> AdapterBank:
    bank = getattr(model, "_metakernels_bank", None)
    if bank is None:
        raise ValueError("model has no metakernels adapters: call metakernels.inject(model, ...)")
    return bank
