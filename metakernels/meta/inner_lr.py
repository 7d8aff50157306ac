"""Learned inner learning rates (``meta.inner_lr_mode``) and the multi-step loss
(``meta.multi_step_loss``): meta-parameters and weights beside theta.

Modes:
    fixed           one rate, ``meta.inner_lr``, for every element, task and step (no module)
    per_layer_step  ``values`` [K, S]: one rate per inner step k and adapted module s (the bank's
                    slot s, its A and B together): MAML++'s per-layer per-step rates (LSLR)
    per_parameter   ``values`` [P]: one rate per element of theta, shared by the steps (Meta-SGD)

Every rate starts at ``meta.inner_lr``, so a fresh module reproduces ``fixed``. The fused update
takes them as ``lr[t] = 1`` times ``rates`` (a segment per slot, or one per element): no [T, P]
rate tensor exists.

Their meta-gradient, with ``fast_K = theta - sum_k rate_k * d_k`` (``d_k`` the inner step's
update direction, per task):
    maml    exact, autograd through the inner loop (``maml_step``);
    fomaml  first order: the directions ``d_k`` held constant, so
            ``dL/drate_k = -g_q * d_k`` (g_q: the query gradient at fast_K), summed over each
            rate's elements and over the tasks with the task weights.
"""
from __future__ import annotations

import torch

from ..ops.fused_update import element_rates

INNER_LR_MODES = ("fixed", "per_layer_step", "per_parameter")


class InnerRates:
    """The learned inner rates of one bank: ``values`` (an ``nn.Parameter``) and how the fused
    update and the first-order meta-gradient read them."""

    def __init__(self, mode: str, bank, num_steps: int, init: float):
        if mode not in INNER_LR_MODES[1:]:
            raise ValueError(f"InnerRates: mode must be one of {INNER_LR_MODES[1:]}, got {mode!r}")
        if num_steps < 1:
            raise ValueError("InnerRates: learned rates need at least one inner step")
        self.mode = mode
        self.num_steps = num_steps
        self.slots = bank.slots
        self.num_params = bank.num_params
        self.offsets = bank.slot_offsets()
        shape = (num_steps, len(bank.slots)) if mode == "per_layer_step" else (bank.num_params,)
        self.values = torch.nn.Parameter(
            torch.full(shape, float(init), dtype=bank.dtype, device=bank.device))

    @property
    def numel(self) -> int:
        return self.values.numel()

    # -- the inner loop ---------------------------------------------------------------------
    def kernel_rates(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rates, rate_offsets) of inner step ``step`` for ``fused_update`` (no graph)."""
        v = self.values.detach()
        if self.mode == "per_layer_step":
            return v[step].contiguous(), self.offsets
        return v, None

    def element_rates(self, step: int) -> torch.Tensor:
        """[P] the rate of every element at inner step ``step``, differentiable (maml)."""
        if self.mode == "per_layer_step":
            return element_rates(self.values[step], self.offsets, self.num_params)
        return self.values

    def new_directions(self, num_tasks: int) -> torch.Tensor:
        """Zeroed buffers the fused update adds the inner steps' directions to: [K, T, P] (each
        step's own, per_layer_step) or [1, T, P] (their sum, per_parameter)."""
        n = self.num_steps if self.mode == "per_layer_step" else 1
        return torch.zeros(n, num_tasks, self.num_params, dtype=self.values.dtype,
                           device=self.values.device)

    def direction_slot(self, directions: torch.Tensor, step: int) -> torch.Tensor:
        return directions[step if self.mode == "per_layer_step" else 0]

    def first_order_grad(self, query_grad: torch.Tensor, directions: torch.Tensor,
                         upto: int) -> torch.Tensor:
        """[T, *values.shape] per task: ``-sum_{j in rate} query_grad * d_k`` for the steps
        k < ``upto`` (the steps the query point at fast_upto depends on)."""
        T = query_grad.shape[0]
        if self.mode == "per_parameter":
            return -(query_grad * directions[0])
        out = torch.zeros(T, *self.values.shape, dtype=query_grad.dtype,
                          device=query_grad.device)
        seg = self._segment_ids()
        for k in range(upto):
            prod = query_grad * directions[k]
            out[:, k].index_add_(1, seg, prod, alpha=-1.0)
        return out

    def _segment_ids(self) -> torch.Tensor:
        sizes = (self.offsets[1:] - self.offsets[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(self.slots), device=sizes.device), sizes,
                                       output_size=self.num_params)

    # -- reporting --------------------------------------------------------------------------
    def per_slot(self) -> list[tuple[str, torch.Tensor]]:
        """(module name, that module's rates: its K steps, or its A and B elements)."""
        v = self.values.detach()
        if self.mode == "per_layer_step":
            return [(s.name, v[:, i]) for i, s in enumerate(self.slots)]
        return [(s.name, v[s.offset:s.offset + s.numel]) for s in self.slots]

    def metrics(self) -> dict[str, float]:
        """The rates' mean, min and max over everything, and per adapted module."""
        v = self.values.detach()
        out = {"inner_lr/mean": float(v.mean()), "inner_lr/min": float(v.min()),
               "inner_lr/max": float(v.max())}
        for name, r in self.per_slot():
            out[f"inner_lr/{name}/mean"] = float(r.mean())
            out[f"inner_lr/{name}/min"] = float(r.min())
            out[f"inner_lr/{name}/max"] = float(r.max())
        return out


def msl_weights(num_steps: int, outer_step: int, anneal_steps: int) -> list[float]:
    """MAML++'s multi-step loss weights of the query losses after inner steps 1..K: uniform
    (1/K each) at outer step 0, moved linearly onto the last step over ``anneal_steps`` outer
    steps, all on the last step from then on (the plain meta-loss). They sum to 1."""
    K = num_steps
    a = 1.0 if anneal_steps <= 0 else min(1.0, outer_step / anneal_steps)
    w = [(1.0 - a) / K] * K
    w[-1] += a
    return w
