"""Variants of the meta-step benchmark: each a way of computing the same FOMAML meta-step, built
from a workload (``bench.workloads``) on its device. ``step()`` runs one whole meta-step and
returns (the LoRA meta-gradient [P] in the bank's layout, or None, and the mean query loss).
Every variant is checked against naive-peft at a tiny size before it is timed
(``check_variants``).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from metakernels import PackedBatch, backend
from metakernels.batch import IGNORE_INDEX
from metakernels.fused import apply_fused_layers, switch_linears
from metakernels.gemm import use_gemm
from metakernels.lora import inject
from metakernels.meta import PeftAdapterIO, causal_lm_loss, make_peft_model, naive_step
from metakernels.meta.chunked import chunked_step
from metakernels.meta.common import hidden_states, task_losses
from metakernels.ops.segment_cross_entropy import segment_cross_entropy_ref

from bench.workloads import (Workload, build_base, check_workloads, initial_adapters,
                             inner_config, make_data, model_config)


# The meta-gradient's relative error (in norm) allowed against naive-peft at the check size.
# fp32: rounding of sums taken in another order, far below 1e-4 at these sizes.
# bf16: u = 2^-8 is bf16's unit roundoff (8 significant bits; half of
# torch.finfo(torch.bfloat16).eps = 2^-7): every bf16 activation or product result is off by at
# most u, relatively. The meta-gradient goes through a few such roundings whose errors mostly
# average out: naive-peft's own bf16 meta-gradient lands about 1.7u from its fp32 one at the
# check size. Two bf16 computations, each within 2u of the exact meta-gradient, agree within 4u.
BF16_UNIT_ROUNDOFF = 2.0 ** -8
CHECK_RTOL = {"float32": 1e-4, "bfloat16": 4 * BF16_UNIT_ROUNDOFF}

warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented "
                        "the batching rule.*")
warnings.filterwarnings("ignore", category=FutureWarning)


def plain_task_losses(model: nn.Module, batch: PackedBatch, chunk_size: int = 0) -> torch.Tensor:
    """Per-task losses through the materialised [N, V] logits and autograd (the unfused loss)."""
    h = hidden_states(model, batch)
    W = model.get_output_embeddings().weight
    return segment_cross_entropy_ref(h, W.detach(), batch.labels.reshape(-1), batch.token_layout)


class Metakernels:
    """``fomaml_step`` (through ``chunked_step``: ``w.task_chunk`` tasks at a time) under the
    backend ``backend_name``; ``plain=True``: without the fused RMSNorm/SwiGLU/rotary layers and
    with the loss computed from the materialised logits instead of ``segment_cross_entropy``;
    ``layer_kernels=False``: the fused layers in their torch forms (``backend.use("layer_kernels",
    "off")``); ``gemm``: the GEMM library of the frozen base (``metakernels.gemm.use_gemm``)."""

    def __init__(self, w, adapters, support, query, backend_name, plain=False,
                 layer_kernels=True, gemm=None):
        self.backend_name, self.gemm, self.layer_kernels = backend_name, gemm, layer_kernels
        self.loss_fn = plain_task_losses if plain else task_losses
        self.model = build_base(w)
        if not plain:
            apply_fused_layers(self.model)
        self.task_chunk = w.task_chunk
        self.bank = inject(self.model, w.target_modules(), w.rank, w.alpha, w.num_tasks,
                           init=False)
        if [s.name for s in self.bank.slots] != [s.name for s in adapters.slots]:
            raise RuntimeError("inject adapted other modules than the meta-device probe")
        with torch.no_grad():
            self.bank.theta.copy_(adapters.theta)
        self.support, self.query = support.to(w.device), query.to(w.device)
        self.cfg = inner_config(w)

    def step(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(backend.use_backend(self.backend_name))
            if self.gemm is not None:
                stack.enter_context(use_gemm(self.gemm))
            if not self.layer_kernels:
                stack.enter_context(backend.use("layer_kernels", "off"))
            r = chunked_step("fomaml", self.model, self.bank, self.support, self.query,
                             self.cfg, self.task_chunk, loss_fn=self.loss_fn)
        return r.meta_grad, r.meta_loss


class NaivePeft:
    """``naive_step`` on a PEFT LoRA model of the base (PEFT keeps its adapters fp32 on a bf16
    base). ``onednn=True``: its frozen linear layers on oneDNN's GEMM (``metakernels.gemm``),
    as the metakernels-cpu step runs them."""

    def __init__(self, w, adapters, support, query, onednn=False):
        self.peft = make_peft_model(build_base(w), adapters)
        self.onednn = onednn
        if onednn:
            switch_linears(self.peft)
        self.io = PeftAdapterIO(self.peft, adapters.slots)
        self.theta = adapters.theta.detach().clone()
        self.support, self.query = support.to(w.device), query.to(w.device)
        self.cfg = inner_config(w)

    def step(self):
        with backend.use_backend("cpu") if self.onednn else contextlib.nullcontext():
            r = naive_step(self.peft, self.io, self.theta, self.support, self.query, self.cfg)
        return r.meta_grad, r.meta_loss


class NaiveFull:
    """Full-parameter FOMAML, the MAML-SFT seed's loop: per task, clone all weights, K SGD steps
    on all of them, the query gradient of all of them, restore the clone."""

    def __init__(self, w, adapters, support, query):
        self.model = build_base(w)
        self.params = list(self.model.parameters())
        self.support, self.query = support.to(w.device), query.to(w.device)
        self.cfg = inner_config(w)

    def step(self):
        T, lr = self.support.num_tasks, self.cfg.lr
        meta_grad = [torch.zeros_like(p) for p in self.params]
        qloss = 0.0
        for t in range(T):
            saved = [p.detach().clone() for p in self.params]
            support = self.support.task(t)
            for _ in range(self.cfg.num_steps):
                grads = torch.autograd.grad(causal_lm_loss(self.model, support), self.params)
                with torch.no_grad():
                    for p, g in zip(self.params, grads):
                        p.sub_(g, alpha=lr)
            loss = causal_lm_loss(self.model, self.query.task(t))
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                for m, g, p, s in zip(meta_grad, grads, self.params, saved):
                    m.add_(g, alpha=1.0 / T)
                    p.copy_(s)
            qloss += loss.item() / T
        return None, qloss


class Vmap:
    """``torch.func``: vmap over tasks of the whole inner loop and query gradient, the LoRA
    parameters of a PEFT model passed through ``functional_call`` (theta unbatched, as in
    functorch's MAML example; the fast weights become batched after the first step)."""

    def __init__(self, w, adapters, support, query):
        from torch.func import functional_call, grad_and_value, vmap
        self._functional_call, self._grad_and_value = functional_call, grad_and_value
        self.peft = make_peft_model(build_base(w), adapters)
        io = PeftAdapterIO(self.peft, adapters.slots)
        name_of = {id(p): n for n, p in self.peft.named_parameters()}
        self.entries = [(s, name_of[id(a)], name_of[id(b)]) for s, a, b in io.params]
        self.theta = adapters.theta.detach().to(w.device, copy=True)
        self.num_params = adapters.num_params
        self.cfg = inner_config(w)
        self.sup = [t.to(w.device) for t in self._task_major(support)]
        self.qry = [t.to(w.device) for t in self._task_major(query)]
        self._run = vmap(self._task, in_dims=(None, 0, 0, 0, 0))

    @staticmethod
    def _task_major(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, n_max, L] ids and labels; a task with fewer rows gets rows without loss."""
        if not bool(batch.attention_mask.bool().all()):
            # transformers' mask code branches on the mask's values, which vmap cannot trace
            raise ValueError("vmap variant: the batch has padding; it takes full-length rows")
        T, L = batch.num_tasks, batch.seq_len
        n = max(batch.layout.sizes)
        ids = torch.ones(T, n, L, dtype=torch.long)
        labels = torch.full((T, n, L), IGNORE_INDEX, dtype=torch.long)
        for t, s, e in batch.layout.segments():
            ids[t, :e - s] = batch.input_ids[s:e]
            labels[t, :e - s] = batch.labels[s:e]
        return ids, labels

    def _loss(self, lora, ids, labels):
        """The token-mean masked next-token loss, as ``causal_lm_loss`` computes it."""
        logits = self._functional_call(self.peft, lora, (),
                                       {"input_ids": ids, "use_cache": False}).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        keep = labels != IGNORE_INDEX
        nll = -logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
        return (nll * keep).sum() / keep.sum().clamp(min=1)

    def _task(self, lora, s_ids, s_labels, q_ids, q_labels):
        step = self._grad_and_value(self._loss)
        for _ in range(self.cfg.num_steps):
            g, _ = step(lora, s_ids, s_labels)
            lora = {k: v - self.cfg.lr * g[k] for k, v in lora.items()}
        return step(lora, q_ids, q_labels)

    def step(self):
        lora = {}
        for s, na, nb in self.entries:
            lora[na], lora[nb] = s.peft_views(self.theta)
        grads, losses = self._run(lora, *self.sup, *self.qry)
        meta_grad = torch.empty(self.num_params, device=self.theta.device)
        for s, na, nb in self.entries:
            a, b = s.peft_views(meta_grad)
            a.copy_(grads[na].mean(0))
            b.copy_(grads[nb].mean(0))
        return meta_grad, float(losses.mean())


# On the CPU the triton backend is an interpreter for tests only: not something to time.
ALL_VARIANTS = ("naive-peft", "metakernels-torch", "metakernels-cpu", "naive-full", "vmap")
# On a GPU: the batched step on its kernels (triton) and in plain PyTorch, against the per-task
# PEFT loop and vmap. (naive-full, the full-parameter loop, is left out: it trains other
# parameters, and a clone of every weight per task is what nobody runs on a 1B model.)
GPU_VARIANTS = ("naive-peft", "metakernels-triton", "metakernels-torch", "vmap")
# Run only when asked for (--variant): metakernels without its fused RMSNorm/SwiGLU/rotary
# layers and with the loss from the materialised logits (what each fusion saves); the cpu step
# with ATen's GEMMs instead of oneDNN's, and naive-peft with oneDNN's (what the GEMM library
# gives, apart from the batching); the cpu step with the layers' torch forms instead of their
# kernels (what the kernels give together; ``bench/diagnose.py --ablate`` removes each alone).
EXTRA_VARIANTS = ("metakernels-torch-plain", "metakernels-cpu-plain",
                  "metakernels-cpu-torchlayers", "metakernels-cpu-blas", "naive-peft-onednn")
VARIANT_CHOICES = tuple(dict.fromkeys(ALL_VARIANTS + GPU_VARIANTS + EXTRA_VARIANTS))


def backend_of(variant: str) -> str:
    if variant == "naive-peft-onednn":
        return "cpu"
    return variant.split("-")[1] if variant.startswith("metakernels-") else "torch"


def can_run(variant: str, device: str) -> bool:
    """Whether ``variant`` is one of ``device``'s and its backend runs there."""
    if device == "cuda":
        return variant in GPU_VARIANTS and backend.available(backend_of(variant),
                                                             torch.device("cuda"))
    if variant not in ALL_VARIANTS + EXTRA_VARIANTS:
        return False
    return backend.available(backend_of(variant), torch.device("cpu"))


def select_variants(asked: list[str] | None, device: str) -> list[str]:
    """The variants asked for (default: every default variant of ``device`` that can run here),
    in a fixed order; exits if one asked for cannot run."""
    default = GPU_VARIANTS if device == "cuda" else ALL_VARIANTS
    names = [v for v in VARIANT_CHOICES if v in asked] if asked else list(default)
    for v in asked or ():
        if not can_run(v, device):
            raise SystemExit(f"variant {v} cannot run on {device} here (backend "
                             f"{backend_of(v)!r}); on {device} these can: "
                             f"{[n for n in VARIANT_CHOICES if can_run(n, device)]}")
    return [v for v in names if can_run(v, device)]


def make_variant(name: str, w: Workload, adapters, support, query):
    if name.startswith("metakernels-"):
        return Metakernels(w, adapters, support, query, backend_of(name),
                           plain=name.endswith("-plain"),
                           layer_kernels=not name.endswith("-torchlayers"),
                           gemm="blas" if name.endswith("-blas") else None)
    if name == "naive-peft-onednn":
        return NaivePeft(w, adapters, support, query, onednn=True)
    cls = {"naive-peft": NaivePeft, "naive-full": NaiveFull, "vmap": Vmap}[name]
    return cls(w, adapters, support, query)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in norm, in fp64 on the CPU (the variants leave their meta-gradients on
    different devices: naive-peft's on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_variants(w: Workload, variants: list[str]) -> None:
    """Raises SystemExit unless every variant agrees with naive-peft at a tiny size (in the
    workload's dtype and on its device; tolerance ``CHECK_RTOL`` of the dtype)."""
    rtol = CHECK_RTOL[w.dtype]
    for cw in check_workloads(w):
        adapters = initial_adapters(cw)
        support, query = make_data(cw, model_config(cw).vocab_size)
        want, _ = NaivePeft(cw, adapters, support, query).step()
        for name in variants:
            if name == "naive-peft":
                continue
            got, loss = make_variant(name, cw, adapters, support, query).step()
            if got is None:   # naive-full: another parameter set, nothing to compare
                ok, what = math.isfinite(loss), f"query loss {loss:.4g}"
            else:
                err = rel_err(got, want)
                ok, what = err < rtol, f"meta-gradient rel. error {err:.2e} (< {rtol:.1e})"
            print(f"check {cw.describe_sizes():>8}  {name:<18} {what}  {'ok' if ok else 'FAIL'}")
            if not ok:
                raise SystemExit(f"{name} disagrees with naive-peft on layout "
                                 f"{cw.describe_sizes()} ({what}); not timing a wrong variant")

