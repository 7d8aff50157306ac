"""Time and peak memory of one FOMAML meta-step, every way of computing it, side by side.

One meta-step: T tasks, K inner SGD steps on each task's support set, then the gradient of each
task's query loss at its adapted fast weights, averaged over tasks (the meta-gradient). Every
variant starts from the same model weights, the same initial adapters (theta) and the same data:

    metakernels-<backend>  ``fomaml_step``: all tasks in one pass over the frozen base, on every
                           backend that can run here (torch always, cpu when ``metakernels._C``
                           is built); ``--task-chunk C`` runs it C tasks at a time (the
                           memory-saving mode, reported as ``metakernels-<backend>-chunkC``)
    metakernels-cpu-torchlayers  (only with ``--variant``) the fused layers in their torch forms,
                           without the C++ kernels of csrc/fused_layers.cpp and csrc/attention.cpp
    metakernels-cpu-blas   (only with ``--variant``) the cpu step with ATen's GEMMs (MKL) for the
                           frozen base instead of oneDNN's (``metakernels.gemm``)
    metakernels-<b>-plain  (only with ``--variant``) the same without the fused RMSNorm/SwiGLU/
                           rotary layers and with the loss from the materialised logits
    naive-peft             ``naive_step``: one task after another on a PEFT LoRA model (the seeds'
                           Meta-LoRA, done right)
    naive-peft-onednn      (only with ``--variant``) naive-peft with its frozen linear layers on
                           oneDNN's GEMM, as metakernels-cpu runs them (what the batching alone
                           gives)
    naive-full             full-parameter FOMAML as in the MAML-SFT seed: per task, clone every
                           weight, K SGD steps on all weights, query gradient, restore
    vmap                   ``torch.func``: ``vmap`` over tasks of (K x ``grad`` + SGD, then the
                           query ``grad``) of the PEFT model's LoRA parameters through
                           ``functional_call``, base frozen. vmap needs equal shapes, so a ragged
                           layout is padded with rows that carry no loss; SDPA has no vmap batching
                           rule, so attention runs as PyTorch's per-task fallback loop.

Before anything is timed, each variant's meta-gradient on the LoRA parameters is checked against
naive-peft at a tiny size, on a uniform and a ragged layout (naive-full trains other parameters:
it must run and give a finite loss). After timing, each variant's meta-gradient at the benchmark
size is compared with naive-peft's again and the relative error is reported.

Reported per variant: median and p20/p80 of the meta-step time (``time.perf_counter`` around the
whole step, after warm-up steps; the variants take their timed steps in turns unless
``--sequential``), real tokens/s (K x support + query tokens), the time as a
multiple of naive-peft's and of the FLOP floor (and "paired": the median over the rounds of each
round's step against the floor at the GEMM rate measured right after that round, which a machine
whose speed drifts between minutes moves less), and the peak memory: the peak RSS minus the RSS
just before the step, of a fresh process that runs that variant alone
(``python bench/meta_step.py --variant X --measure-memory ...``; on Linux the peak is ``VmHWM``,
``ru_maxrss`` without the parent's RSS that ``ru_maxrss`` inherits across ``exec``).

FLOP floor (DESIGN.md, "Performance: how to measure"), per token of every forward/backward:
2P forward + 2P input gradient of the frozen linear weights (P: every linear layer, not the
embedding), except that the output layer counts only on the tokens with a label (a token
without one has no loss: its logits are not needed) and the first layer's q, k and v have no
input gradient (they read the frozen embeddings), plus 6 r (in + out) per adapted layer (LoRA
forward, dx and dA, dB), plus causal attention 6 L^2 d_attn per sequence and layer (2 forward,
4 backward as flash-attention counts them), divided by the best fp32 GEMM rate of a square product at the
model's hidden size, measured in the same run, of the faster of the two GEMM libraries the cpu
backend can use (``torch.mm``, i.e. MKL, and oneDNN: ``metakernels.gemm``). It is the floor of
the LoRA meta-step; naive-full does more work (weight gradients), and its ratio says so.

Commands::

    python bench/meta_step.py --preset fewshot            # large | zipf | vocab32k
    python bench/meta_step.py --preset fewshot --sweep-tasks
    python bench/meta_step.py --preset fewshot --profile  # + top ops of the metakernels step
    python bench/meta_step.py --preset fewshot --variant metakernels-cpu --breakdown
    python bench/meta_step.py --preset fewshot --variant metakernels-cpu --ablate
    python bench/meta_step.py --preset fewshot --variant metakernels-cpu --contention
    python bench/meta_step.py --quick --csv /tmp/m.csv    # every variant once, tiny sizes
    python bench/meta_step.py --model-path DIR --targets all-linear

Results are appended to ``bench/results/meta_step.csv``; ``bench/plot.py`` draws them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from pathlib import Path

from common import RESULTS, append_csv, gemm_rates, print_table, quantiles, run_metadata

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metakernels import Example, PackedBatch, backend, pack_tasks  # noqa: E402
from metakernels.bank import AdapterBank  # noqa: E402
from metakernels import fused as fused_module  # noqa: E402
from metakernels.fused import apply_fused_layers  # noqa: E402
from metakernels.gemm import onednn_available, onednn_linear, use_gemm  # noqa: E402
from metakernels.batch import IGNORE_INDEX  # noqa: E402
from metakernels.lora import inject  # noqa: E402
from metakernels.meta import InnerConfig, PeftAdapterIO, causal_lm_loss  # noqa: E402
from metakernels.meta import make_peft_model, naive_step  # noqa: E402
from metakernels.meta import fomaml as fomaml_module  # noqa: E402
from metakernels.meta.chunked import chunked_step  # noqa: E402
from metakernels.meta.common import hidden_states  # noqa: E402
from metakernels.ops.segment_cross_entropy import segment_cross_entropy_ref  # noqa: E402
from metakernels.models import build_tiny_model, tiny_config  # noqa: E402

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
SWEEP_TASKS = (1, 2, 4, 8, 16, 32)
QUICK_SWEEP_TASKS = (1, 2)
CHECK_RTOL = 1e-4       # meta-gradient relative error allowed against naive-peft (fp32)
MEMORY_MARK = "MEMORY "
MEMORY_JOBS = 2         # concurrent memory processes: RSS is per process, so they do not mix

warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented "
                        "the batching rule.*")
warnings.filterwarnings("ignore", category=FutureWarning)


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    """One meta-step's shape: the model, the adapters, the tasks and the inner loop."""

    preset: str = "fewshot"
    vocab_size: int = 1024
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 0      # 0: Llama's 8/3 * hidden, rounded up to a multiple of 32
    model_path: str = ""            # a local Hugging Face checkpoint instead of the tiny Llama
    targets: str = "qkvo"           # qkvo | all-linear
    rank: int = 16
    alpha: float = 32.0
    num_tasks: int = 8
    support_rows: int = 2           # sequences per task (the largest task's, with zipf_alpha)
    query_rows: int = 2
    zipf_alpha: float = 0.0         # > 0: task t has round(support_rows / (t+1)^alpha) rows
    seq_len: int = 64
    inner_steps: int = 5
    inner_lr: float = 1e-2
    seed: int = 0
    task_chunk: int = 0             # metakernels variants: tasks per chunk (memory-saving mode)

    def intermediate(self) -> int:
        return self.intermediate_size or 32 * math.ceil(8 * self.hidden_size / 3 / 32)

    def target_modules(self):
        return QKVO if self.targets == "qkvo" else self.targets

    def support_sizes(self) -> list[int]:
        if self.zipf_alpha <= 0:
            return [self.support_rows] * self.num_tasks
        return [max(1, round(self.support_rows / (t + 1) ** self.zipf_alpha))
                for t in range(self.num_tasks)]

    def describe_sizes(self) -> str:
        sizes = self.support_sizes()
        return f"{self.num_tasks}x{sizes[0]}" if len(set(sizes)) == 1 else ",".join(map(str, sizes))

    def describe_model(self) -> str:
        if self.model_path:
            return self.model_path
        return (f"llama d{self.hidden_size} l{self.num_layers} h{self.num_heads}/"
                f"{self.num_kv_heads} ff{self.intermediate()} v{self.vocab_size}")

    def cli_args(self) -> list[str]:
        """The flags that rebuild exactly this workload in another process."""
        out = []
        for f in dataclasses.fields(self):
            out += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return out


PRESETS = {
    "fewshot": {},
    "large": dict(num_tasks=4, support_rows=4, query_rows=4, seq_len=128),
    "zipf": dict(support_rows=8, zipf_alpha=1.5),   # punica's Zipf-1.5 mix of task sizes
    "vocab32k": dict(vocab_size=32000),
}
QUICK = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=0,
             num_tasks=3, query_rows=2, seq_len=16, inner_steps=2, rank=4, alpha=8.0)


def resolve_workload(args) -> Workload:
    """Defaults, then the preset, then ``--quick``, then every flag given explicitly."""
    w = Workload(preset=args.preset, **PRESETS[args.preset])
    if args.quick:
        w = dataclasses.replace(w, **QUICK, support_rows=4 if w.zipf_alpha > 0 else 2)
    for f in dataclasses.fields(Workload):
        v = getattr(args, f.name)
        if v is not None and f.name != "preset":
            setattr(w, f.name, v)
    if w.targets not in ("qkvo", "all-linear"):
        raise SystemExit(f"--targets must be qkvo or all-linear, got {w.targets!r}")
    return w


def check_workloads(w: Workload) -> list[Workload]:
    """Tiny versions of ``w`` (same targets and model family), a uniform and a ragged layout."""
    tiny = dict(preset="check", model_path="", vocab_size=97, hidden_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, intermediate_size=80, rank=4, alpha=8.0,
                num_tasks=3, query_rows=2, seq_len=12, inner_steps=2, inner_lr=0.05)
    return [dataclasses.replace(w, **tiny, support_rows=2, zipf_alpha=0.0),
            dataclasses.replace(w, **tiny, support_rows=3, zipf_alpha=1.0)]


# ---------------------------------------------------------------------------------------------
# Model, adapters, data
# ---------------------------------------------------------------------------------------------
def model_config(w: Workload):
    if w.model_path:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(w.model_path)
    return tiny_config("llama", vocab_size=w.vocab_size, hidden_size=w.hidden_size,
                       num_layers=w.num_layers, num_heads=w.num_heads,
                       num_kv_heads=w.num_kv_heads, intermediate_size=w.intermediate(),
                       max_position_embeddings=max(256, w.seq_len))


def build_base(w: Workload) -> nn.Module:
    """The base model, the same weights every time (eval mode, every parameter trainable)."""
    if w.model_path:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(w.model_path, dtype=torch.float32).eval()
    else:
        model = build_tiny_model("llama", seed=w.seed, vocab_size=w.vocab_size,
                                 hidden_size=w.hidden_size, num_layers=w.num_layers,
                                 num_heads=w.num_heads, num_kv_heads=w.num_kv_heads,
                                 intermediate_size=w.intermediate(),
                                 max_position_embeddings=max(256, w.seq_len))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def ghost_model(w: Workload) -> nn.Module:
    """The model without storage (meta device): its modules and shapes, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(w))


def initial_adapters(w: Workload) -> AdapterBank:
    """A bank (one task) holding theta: PEFT's init of A and a small random B, so that the
    first inner step is not the special case B = 0. The slots come from injecting into a ghost
    of the model, so no second model is ever allocated."""
    slots = inject(ghost_model(w), w.target_modules(), w.rank, w.alpha, 1, init=False).slots
    adapters = AdapterBank(slots, w.rank, w.alpha, 1)
    g = torch.Generator().manual_seed(w.seed + 1)
    adapters.reset_parameters(generator=g)
    with torch.no_grad():
        for s in slots:
            adapters.theta[s.b_slice] = 0.02 * torch.randn(s.rank * s.out_features, generator=g)
    return adapters


def make_data(w: Workload, vocab_size: int) -> tuple[PackedBatch, PackedBatch]:
    """Support and query batches of random full-length sequences (no padding: every token is
    real work for every variant), the loss on a random-length response."""
    rng = random.Random(w.seed + 2)
    L = w.seq_len

    def task(rows):
        exs = []
        for _ in range(rows):
            ids = tuple(rng.randrange(1, vocab_size) for _ in range(L))
            p = rng.randint(max(1, L // 4), max(1, L // 2))
            exs.append(Example(ids, (0,) * p + (1,) * (L - p)))
        return exs

    support = pack_tasks([task(n) for n in w.support_sizes()], pad_id=0)
    query = pack_tasks([task(w.query_rows) for _ in range(w.num_tasks)], pad_id=0)
    return support, query


def inner_config(w: Workload) -> InnerConfig:
    return InnerConfig(lr=w.inner_lr, num_steps=w.inner_steps, optimizer="sgd")


# ---------------------------------------------------------------------------------------------
# Variants: each builds its own copy of the same model; step() runs one whole meta-step and
# returns (LoRA meta-gradient [P] in the bank's layout or None, mean query loss)
# ---------------------------------------------------------------------------------------------
def plain_task_losses(model: nn.Module, batch: PackedBatch, chunk_size: int = 0) -> torch.Tensor:
    """Per-task losses through the materialised [N, V] logits and autograd (the unfused loss)."""
    h = hidden_states(model, batch)
    W = model.get_output_embeddings().weight
    return segment_cross_entropy_ref(h, W.detach(), batch.labels.reshape(-1), batch.token_layout)


class Metakernels:
    """``fomaml_step``; ``plain=True``: without the fused RMSNorm/SwiGLU/rotary layers and with
    the loss computed from the materialised logits instead of ``segment_cross_entropy``;
    ``layer_kernels=False``: the fused layers in their torch forms (no csrc/fused_layers.cpp, no csrc/attention.cpp)."""

    def __init__(self, w, adapters, support, query, backend_name, plain=False,
                 layer_kernels=True, gemm=None):
        self.backend_name, self.plain, self.layer_kernels = backend_name, plain, layer_kernels
        self.gemm = gemm
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
        self.support, self.query, self.cfg = support, query, inner_config(w)

    def step(self):
        with backend.use_backend(self.backend_name), self._loss():
            r = chunked_step("fomaml", self.model, self.bank, self.support, self.query,
                             self.cfg, self.task_chunk)
        return r.meta_grad, r.meta_loss

    @contextlib.contextmanager
    def _loss(self):
        with contextlib.ExitStack() as stack:
            if self.plain:
                stack.enter_context(_patched(fomaml_module, "task_losses", plain_task_losses))
            if not self.layer_kernels:
                stack.enter_context(_patched(fused_module, "_cpu_kernels", lambda *t: False))
            if self.gemm is not None:
                stack.enter_context(use_gemm(self.gemm))
            yield


@contextlib.contextmanager
def _patched(obj, name: str, value):
    """``obj.name = value`` inside the block (a module's function or a class's attribute; a
    class's staticmethod is put back as it was, not as the function it gives)."""
    saved = vars(obj)[name]
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


class NaivePeft:
    """``onednn=True``: its frozen linear layers on oneDNN's GEMM (``metakernels.gemm``), as the
    metakernels-cpu step runs them."""

    def __init__(self, w, adapters, support, query, onednn=False):
        self.peft = make_peft_model(build_base(w), adapters)
        self.onednn = onednn
        if onednn:
            fused_module.switch_linears(self.peft)
        self.io = PeftAdapterIO(self.peft, adapters.slots)
        self.theta = adapters.theta.detach().clone()
        self.support, self.query, self.cfg = support, query, inner_config(w)

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
        self.support, self.query, self.cfg = support, query, inner_config(w)

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
        self.theta = adapters.theta.detach().clone()
        self.num_params = adapters.num_params
        self.cfg = inner_config(w)
        self.sup = self._task_major(support)
        self.qry = self._task_major(query)
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
            lora[na] = self.theta[s.a_slice].view(s.in_features, s.rank).T
            lora[nb] = self.theta[s.b_slice].view(s.rank, s.out_features).T
        grads, losses = self._run(lora, *self.sup, *self.qry)
        meta_grad = torch.empty(self.num_params)
        for s, na, nb in self.entries:
            meta_grad[s.a_slice] = grads[na].mean(0).T.reshape(-1)
            meta_grad[s.b_slice] = grads[nb].mean(0).T.reshape(-1)
        return meta_grad, float(losses.mean())


# The benchmark runs on the CPU: the triton backend there is an interpreter for tests only.
ALL_VARIANTS = ("naive-peft", "metakernels-torch", "metakernels-cpu", "naive-full", "vmap")
# Run only when asked for (--variant): metakernels without its fused RMSNorm/SwiGLU/rotary
# layers and with the loss from the materialised logits (what each fusion saves); the cpu step
# with ATen's GEMMs instead of oneDNN's, and naive-peft with oneDNN's (what the GEMM library
# gives, apart from the batching).
EXTRA_VARIANTS = ("metakernels-torch-plain", "metakernels-cpu-plain",
                  "metakernels-cpu-torchlayers", "metakernels-cpu-blas", "naive-peft-onednn")


def available_variants() -> list[str]:
    return [v for v in ALL_VARIANTS if backend.available(backend_of(v))]


def backend_of(variant: str) -> str:
    if variant == "naive-peft-onednn":
        return "cpu"
    return variant.split("-")[1] if variant.startswith("metakernels-") else "torch"


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
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# Correctness gate, FLOP floor, memory
# ---------------------------------------------------------------------------------------------
def check_variants(w: Workload, variants: list[str]) -> None:
    """Raises SystemExit unless every variant agrees with naive-peft at a tiny size."""
    for cw in check_workloads(w):
        adapters = initial_adapters(cw)
        support, query = make_data(cw, cw.vocab_size)
        want, _ = NaivePeft(cw, adapters, support, query).step()
        for name in variants:
            if name == "naive-peft":
                continue
            got, loss = make_variant(name, cw, adapters, support, query).step()
            if got is None:   # naive-full: another parameter set, nothing to compare
                ok, what = math.isfinite(loss), f"query loss {loss:.4g}"
            else:
                err = rel_err(got, want)
                ok, what = err < CHECK_RTOL, f"meta-gradient rel. error {err:.2e}"
            print(f"check {cw.describe_sizes():>8}  {name:<18} {what}  {'ok' if ok else 'FAIL'}")
            if not ok:
                raise SystemExit(f"{name} disagrees with naive-peft on layout "
                                 f"{cw.describe_sizes()} ({what}); not timing a wrong variant")


def flop_floor(w: Workload, adapters: AdapterBank, support: PackedBatch,
               query: PackedBatch) -> float:
    """FLOPs of the LoRA meta-step at best (see the module docstring)."""
    model = ghost_model(w)
    cfg = model.config
    head = model.get_output_embeddings()
    p_body = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Linear) and m is not head)
    p_first = sum(m.weight.numel() for m in first_layer_inputs(model))
    lora = sum(6 * s.rank * (s.in_features + s.out_features) for s in adapters.slots)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    total = 0.0
    for batch, times in ((support, w.inner_steps), (query, 1)):
        lens = batch.attention_mask.sum(1).double()
        tokens = float(lens.sum())
        labelled = float((batch.labels != IGNORE_INDEX).sum())
        attn = float((lens ** 2).sum()) * 6 * d_attn * cfg.num_hidden_layers
        total += times * (tokens * (4 * p_body - 2 * p_first + lora)
                          + labelled * 4 * head.weight.numel() + attn)
    return total


def first_layer_inputs(model: nn.Module) -> list[nn.Linear]:
    """The linear layers that read the first decoder layer's normed input, the frozen
    embeddings: q, k and v of its attention (Llama-family names), which need no input gradient.
    Empty where the model has no such layer."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    return [m for name in ("q_proj", "k_proj", "v_proj")
            if isinstance(m := getattr(attn, name, None), nn.Linear)]


def tokens_per_step(w: Workload, support: PackedBatch, query: PackedBatch) -> int:
    return w.inner_steps * support.num_tokens() + query.num_tokens()


def malloc_setting() -> str:
    """The ``malloc`` column: glibc's ``MALLOC_*`` tuning variables of this run, or "default".
    (Rows marked "retain" ran with a mallopt setting an earlier version applied: mmap threshold
    32 MiB, trim threshold 2 GiB.)"""
    env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    return " ".join(env) or "default"


def _reset_peak_rss() -> bool:
    """Resets this process's peak RSS to its current RSS (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    rss = _status_bytes("VmRSS")
    if rss is None:
        import psutil   # only off Linux
        rss = psutil.Process().memory_info().rss
    return rss


def _peak_rss() -> int:
    """Peak RSS of this process in bytes.

    On Linux, ``VmHWM``: the high-water mark of this process's own address space, which is what
    ``ru_maxrss`` reports for a process started fresh, except that ``ru_maxrss`` also keeps the
    RSS of the image that called ``exec`` (for a subprocess: the forked or vforked copy of the
    parent, the whole benchmark). Elsewhere, ``ru_maxrss`` itself."""
    peak = _status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024   # bytes on macOS, else KiB
    return peak


def measure_memory_here(w: Workload, variant: str) -> dict:
    """In a fresh process: the step's peak RSS above the RSS just before it.

    The variant first runs once at the tiny check size, so that the lazy imports and one-time
    initialisations of a first step are not counted; then the real workload is set up and the
    peak RSS is reset (where the OS allows; otherwise the tiny run's peak is below the step's)
    before the one measured step."""
    cw = check_workloads(w)[0]
    cs, cq = make_data(cw, cw.vocab_size)
    make_variant(variant, cw, initial_adapters(cw), cs, cq).step()
    adapters = initial_adapters(w)
    support, query = make_data(w, model_config(w).vocab_size)
    runner = make_variant(variant, w, adapters, support, query)
    gc.collect()
    before = _rss()
    _reset_peak_rss()
    runner.step()
    peak = _peak_rss()
    return {"variant": variant, "peak_rss_mb": (peak - before) / 2 ** 20,
            "base_rss_mb": before / 2 ** 20}


def measure_memory(w: Workload, variants: list[str], runs: int = 1) -> dict[str, dict]:
    """Runs ``--measure-memory`` in ``runs`` fresh processes per variant; the median of each
    figure (a step's peak RSS moves by some 10% between processes: where glibc's heap happens
    to lie)."""
    def one(variant):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory",
               "--variant", variant, "--threads", str(torch.get_num_threads()), *w.cli_args()]
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in r.stdout.splitlines() if l.startswith(MEMORY_MARK)]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"memory measurement of {variant} failed ({' '.join(cmd)}):\n"
                               f"{r.stderr[-3000:]}")
        return variant, json.loads(lines[-1][len(MEMORY_MARK):])
    with ThreadPoolExecutor(MEMORY_JOBS) as pool:
        got = list(pool.map(one, [v for v in variants for _ in range(runs)]))
    out = {}
    for v in variants:
        mine = [m for name, m in got if name == v]
        out[v] = {k: statistics.median(m[k] for m in mine) for k in ("peak_rss_mb", "base_rss_mb")}
        out[v]["rss_runs"] = len(mine)
    return out


def profile_step(runner, name: str, rows: int = 20) -> dict | None:
    """Prints the top ops of one step of ``runner``; returns its GEMM replay (``replay_gemms``)."""
    from torch.profiler import ProfilerActivity, profile
    runner.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        runner.step()
    print(f"\nprofile of one {name} meta-step: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return replay_gemms(runner.model, prof.events())


# The step's autograd functions by what they compute (module, class), for --breakdown
BREAKDOWN = [
    ("frozen-base GEMMs (frozen_linear)", "metakernels.gemm", "_FrozenLinearFn"),
    ("LoRA projections with their base GEMMs", "metakernels.ops.multi_lora_linear",
     "_MultiLoraLinearFn"),
    ("attention kernel", "metakernels.fused", "_AttentionFn"),
    ("SwiGLU", "metakernels.fused", "_SwiGLUFn"),
    ("loss (segment_cross_entropy)", "metakernels.ops.segment_cross_entropy",
     "_SegmentCrossEntropyFn"),
    ("rotary", "metakernels.fused", "_RotaryFn"),
    ("RMSNorm", "metakernels.fused", "_RMSNormFn"),
]


def _timed_functions(totals: dict[str, float]) -> contextlib.ExitStack:
    """Adds the wall time of every forward and backward of the BREAKDOWN functions to
    ``totals`` (by label) inside the block it returns."""
    with contextlib.ExitStack() as stack:   # undone here if a patch fails
        for label, mod, cls_name in BREAKDOWN:
            cls = getattr(sys.modules[mod], cls_name)
            for meth in ("forward", "backward"):
                f = cls.__dict__[meth]
                fn = f.__func__ if isinstance(f, staticmethod) else f

                def timed(*a, _fn=fn, _label=label):
                    t0 = time.perf_counter()
                    try:
                        return _fn(*a)
                    finally:
                        totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - t0
                stack.enter_context(_patched(cls, meth, staticmethod(timed)))
        return stack.pop_all()


def breakdown_step(runner, name: str, repeats: int) -> None:
    """Prints the wall time per step inside each kind of autograd function of ``runner``'s step
    (``repeats`` steps) and the step on one thread against the current number, alternating
    (``repeats`` pairs)."""
    runner.step()
    totals: dict[str, float] = {}
    times = []
    with _timed_functions(totals):
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t0)
    step = sum(times) / repeats
    print(f"\n{name}: wall time per step inside its autograd functions (mean of {repeats} steps "
          f"of {step:.3f} s)")
    rows = [(label, totals.get(label, 0.0) / repeats) for label, _, _ in BREAKDOWN]
    rows.append(("everything else", step - sum(t for _, t in rows)))
    for label, t in rows:
        print(f"  {label:<42} {1e3 * t:8.1f} ms  {100 * t / step:5.1f}%")
    n = torch.get_num_threads()
    if n > 1:
        one, many = [], []
        for i in range(repeats):
            for k in ((1, n) if i % 2 == 0 else (n, 1)):
                torch.set_num_threads(k)
                t0 = time.perf_counter()
                runner.step()
                (one if k == 1 else many).append(time.perf_counter() - t0)
        torch.set_num_threads(n)
        t1, tn = statistics.median(one), statistics.median(many)
        serial = (n * tn - t1) / (n - 1)
        print(f"  1 thread {t1:.3f} s, {n} threads {tn:.3f} s (medians of {repeats} alternating "
              f"pairs, {tn / t1:.3f}x): Amdahl's serial part at most {serial:.3f} s")


# --ablate: the step's non-GEMM kernels, each replaced by what costs nothing (a view of an input,
# the incoming gradient passed on; the LoRA layers: their base GEMMs alone). The steps' results
# are then wrong: timing only. (label, module, class, {attribute: replacement})
def _no_lora_fwd(x, W, b, A, B, layout, scale):
    return onednn_linear(x, W, b), x.new_empty(x.shape[0], A.shape[-1])


def _no_lora_bwd(dy, x, W, A, B, xa, layout, scale, dA, dB, need_dx):
    return onednn_linear(dy, W.t()) if need_dx else None


def _attention_stub_fwd(ctx, q, k, v, mask, causal, scale):
    ctx.kv_heads = k.shape[1]
    return q.view_as(q)


def _attention_stub_bwd(ctx, d):
    dkv = d[:, :ctx.kv_heads]          # [B, Hkv, L, D], as k and v
    return d, dkv, dkv, None, None, None


ABLATIONS = [
    ("LoRA products", "metakernels.ops.multi_lora_linear", None,
     {"_cpu_fwd": _no_lora_fwd, "_cpu_bwd": _no_lora_bwd}),
    ("attention kernel", "metakernels.fused", "_AttentionFn",
     {"forward": staticmethod(_attention_stub_fwd), "backward": staticmethod(_attention_stub_bwd)}),
    ("SwiGLU", "metakernels.fused", "_SwiGLUFn",
     {"forward": staticmethod(lambda ctx, gate, up: gate.view_as(gate)),
      "backward": staticmethod(lambda ctx, dy: (dy, dy))}),
    ("RMSNorm", "metakernels.fused", "_RMSNormFn",
     {"forward": staticmethod(lambda ctx, x, weight, eps: x.view_as(x)),
      "backward": staticmethod(lambda ctx, dy: (dy, None, None))}),
    ("rotary", "metakernels.fused", "_RotaryFn",
     {"forward": staticmethod(lambda ctx, q, k, cos, sin: (q.view_as(q), k.view_as(k))),
      "backward": staticmethod(lambda ctx, dq, dk: (dq, dk, None, None))}),
]


@contextlib.contextmanager
def _ablated(labels):
    """Inside the block, the ABLATIONS of these labels are in place."""
    with contextlib.ExitStack() as stack:
        for label, mod, cls_name, attrs in ABLATIONS:
            if label in labels:
                obj = sys.modules[mod] if cls_name is None else getattr(sys.modules[mod], cls_name)
                for attr, value in attrs.items():
                    stack.enter_context(_patched(obj, attr, value))
        yield


def ablate_step(runner, name: str, repeats: int, floor_s: float) -> None:
    """Prints the median step with each of the step's non-GEMM kernels removed (ABLATIONS), and
    with all of them removed, alternating over ``repeats`` rounds: what each costs in the step
    (its marginal cost, which moves cache misses onto the next op, so it can differ from its own
    time in --breakdown), and what the GEMMs, the loss and the rest of the step take alone."""
    labels = [a[0] for a in ABLATIONS]
    modes = [("full step", ())] + [(f"without {lb}", (lb,)) for lb in labels] + [
        ("without all of them", tuple(labels))]
    before = runner.step()[0]
    times: dict[str, list[float]] = {m: [] for m, _ in modes}
    grads = {}
    for m, ab in modes:                       # warm-up, and the ablated steps' results
        with _ablated(ab):
            grads[m] = runner.step()[0]
    for i in range(repeats):
        for m, ab in (modes if i % 2 == 0 else modes[::-1]):
            with _ablated(ab):
                t0 = time.perf_counter()
                runner.step()
                times[m].append(time.perf_counter() - t0)
    after = runner.step()[0]
    full = statistics.median(times["full step"])
    print(f"\n{name}: the step without its non-GEMM kernels (wrong results: timing only), "
          f"medians of {repeats} alternating rounds; floor {floor_s:.3f} s")
    for m, _ in modes:
        t = statistics.median(times[m])
        print(f"  {m:<32} {t:7.3f} s  {1e3 * (t - full):+8.1f} ms  {t / floor_s:5.2f}x floor")
    changed = [m for m, ab in modes if ab and not torch.equal(grads[m], before)]
    print(f"  ablations took effect (meta-gradient changed): {len(changed)} of {len(modes) - 1}; "
          f"the step restored after them: {torch.equal(after, before)}")


def _one_thread_each(fns: list[Callable[[], object]]) -> float:
    """Runs ``fns`` at the same time, each in a thread of its own with one intra-op thread (the
    setting is per thread); returns the wall time until the last one ends."""
    def body(fn):
        torch.set_num_threads(1)
        fn()
    with ThreadPoolExecutor(len(fns)) as pool:
        t0 = time.perf_counter()
        list(pool.map(body, fns))
        return time.perf_counter() - t0


def contention_step(w: Workload, name: str, repeats: int) -> None:
    """What the cores cost each other: the meta-batch split into n = ``torch.get_num_threads()``
    shares of T / n tasks (as n processes of torchrun split it; each share a runner with its own
    model, so that no module runs in two threads), timed in alternating rounds:

    - one share alone, on one thread (the other cores idle);
    - the n shares at once, one thread each (n Python threads; their Python code between the
      kernels takes turns on the GIL, their kernels do not);
    - the whole batch on n threads (the step as timed above).

    A share's step at once against alone is what sharing the L3 and memory bandwidth costs (with
    the GIL); the same for a square GEMM of the hidden size (the FLOP floor's rate) says what it
    costs work that stays in each core's cache."""
    n = torch.get_num_threads()
    if n < 2 or w.num_tasks % n:
        print(f"\n{name}: --contention needs 2 or more threads dividing T={w.num_tasks} "
              f"(threads: {n}); skipped")
        return
    share = dataclasses.replace(w, num_tasks=w.num_tasks // n)
    runners = []
    for i in range(n):
        sw = dataclasses.replace(share, seed=w.seed + i)
        sup, qry = make_data(sw, model_config(sw).vocab_size)
        runners.append(make_variant(name, sw, initial_adapters(sw), sup, qry))
    whole_sup, whole_qry = make_data(w, model_config(w).vocab_size)
    whole = make_variant(name, w, initial_adapters(w), whole_sup, whole_qry)
    h = model_config(w).hidden_size
    a, b = torch.randn(h, h), torch.randn(h, h)
    gemm_reps = max(1, int(2e9 / (2 * h ** 3)))   # about 2 GFLOP per thread

    gemm = onednn_linear if onednn_available() else (lambda x, y: x @ y.T)

    def gemms():
        for _ in range(gemm_reps):
            gemm(a, b)
    modes = {"alone": lambda: _one_thread_each([runners[0].step]),
             "at once": lambda: _one_thread_each([r.step for r in runners]),
             "whole": lambda: _timed(whole.step, n),
             "gemm alone": lambda: _one_thread_each([gemms]),
             "gemm at once": lambda: _one_thread_each([gemms] * n)}
    for f in modes.values():   # warm-up
        f()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(repeats):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for m in order:
            times[m].append(modes[m]())
    torch.set_num_threads(n)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"\n{name}: the meta-batch in {n} shares of {share.num_tasks} tasks, one thread each "
          f"(medians of {repeats} alternating rounds)")
    print(f"  one share alone                  {med['alone']:7.3f} s")
    print(f"  the {n} shares at once             {med['at once']:7.3f} s  "
          f"{med['at once'] / med['alone']:5.3f}x alone")
    print(f"  the whole batch on {n} threads     {med['whole']:7.3f} s  "
          f"{med['whole'] / med['alone']:5.3f}x one share alone")
    print(f"  {h}x{h} GEMMs at once against alone              "
          f"{med['gemm at once'] / med['gemm alone']:5.3f}x")


def _timed(fn: Callable[[], object], threads: int) -> float:
    torch.set_num_threads(threads)   # MKL's setting is process-wide: the shares' threads set 1
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


ONEDNN_LINEAR = "mkldnn::_linear_pointwise"
REPLAY_RING = 8     # distinct inputs per input shape: the replay reads its inputs from memory


def replay_gemms(model: nn.Module, events, repeats: int = 5) -> dict | None:
    """The frozen base's oneDNN GEMMs of a profiled step alone, in the step's order, back to
    back: what the step would take if everything but these GEMMs cost nothing (the practical
    limit of the step on this machine, against the FLOP floor's square-GEMM rate).

    Each call gets the model's weight of its shape (plain, or transposed for an input gradient),
    in turn over the layers, and one of ``REPLAY_RING`` random inputs of its shape. None when
    the step ran no oneDNN GEMM (the torch backend, ``-blas``)."""
    calls = [tuple(tuple(s) for s in e.input_shapes[:2]) for e in events
             if e.name == ONEDNN_LINEAR]
    if not calls:
        return None
    weights: dict[tuple, list[torch.Tensor]] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            W = m.weight.detach()
            weights.setdefault(tuple(W.shape), []).append(W)
            weights.setdefault(tuple(W.t().shape), []).append(W.t())
    inputs: dict[tuple, list[torch.Tensor]] = {}
    plan, used, flops = [], {}, 0
    for x_shape, w_shape in calls:
        ws = weights.get(w_shape)
        if ws is None:
            raise RuntimeError(f"a oneDNN GEMM of the step has weight shape {w_shape}, which no "
                               f"linear layer of the model has")
        ring = inputs.setdefault(x_shape, [])
        i = used.get(x_shape, 0)
        used[x_shape] = i + 1
        if len(ring) < REPLAY_RING:
            ring.append(torch.randn(x_shape))
        plan.append((ring[i % len(ring)], ws[i % len(ws)]))
        flops += 2 * math.prod(x_shape) * w_shape[0]
    def run():
        for x, W in plan:
            onednn_linear(x, W)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"calls": len(plan), "flops": flops, "median_s": med}


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------
COLUMNS = ["timestamp", "git_rev", "machine", "cores", "threads", "torch", "load1", "malloc",
           "preset", "variant",
           "backend", "model", "targets", "rank", "num_tasks", "support_sizes", "query_rows",
           "seq_len", "inner_steps", "tokens_per_step", "warmup", "repeats", "median_s",
           "p20_s", "p80_s", "tokens_per_s", "ratio_naive_peft", "floor_s", "ratio_floor",
           "ratio_floor_paired", "gemm_gflops", "peak_rss_mb", "base_rss_mb", "rss_runs",
           "rel_err_vs_naive_peft"]

TABLE = [("variant", "variant", ""), ("num_tasks", "T", "d"), ("median_s", "median s", ".3f"),
         ("p20_s", "p20", ".3f"), ("p80_s", "p80", ".3f"), ("tokens_per_s", "tok/s", ".0f"),
         ("ratio_naive_peft", "x naive-peft", ".3f"), ("ratio_floor", "x floor", ".2f"),
         ("ratio_floor_paired", "x floor paired", ".2f"),
         ("peak_rss_mb", "step MB", ".1f"), ("base_rss_mb", "base MB", ".1f"),
         ("rel_err_vs_naive_peft", "rel err", ".1e")]


def time_variants(runners: dict, warmup: int, repeats: int,
                  probe: Callable[[], dict] | None = None) -> dict[str, dict]:
    """``warmup`` untimed steps of every runner, then ``repeats`` rounds in which every runner
    takes one timed step (``time.perf_counter`` around the whole meta-step) in turn, so that a
    machine whose load drifts slows every variant alike. Returns per runner its times and the
    last step's meta-gradient and query loss. ``probe`` runs after each round (the GEMM rates
    measured there: the floor's rate then comes from the same minutes as the steps, not from a
    moment before them); what it returns is kept per runner and round (``round_rates``)."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    res = {name: {"times": [], "round_rates": []} for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            grad, loss = runner.step()
            res[name]["times"].append(time.perf_counter() - t0)
            res[name]["grad"], res[name]["loss"] = grad, loss
        if probe is not None:
            measured = probe()
            for name in runners:
                res[name]["round_rates"].append(measured)
    return res


def run_workload(w: Workload, variants: list[str], args, meta: dict) -> list[dict]:
    adapters = initial_adapters(w)
    support, query = make_data(w, model_config(w).vocab_size)
    n = model_config(w).hidden_size
    rates = [gemm_rates(n)]

    def probe():
        rates.append(gemm_rates(n))
        return rates[-1]
    tokens = tokens_per_step(w, support, query)
    print(f"\n== {w.preset}: {w.describe_model()}, targets {w.targets} r{w.rank}, "
          f"T={w.num_tasks} support {w.describe_sizes()} query {w.query_rows}/task, "
          f"L={w.seq_len}, K={w.inner_steps}; {tokens} tokens/step")
    replays: dict[str, dict | None] = {}

    def after_timing(name, runner):   # --profile, --breakdown, --ablate, --contention
        if not name.startswith("metakernels-"):
            return
        if args.profile:
            replays[name] = profile_step(runner, name)
        if args.breakdown:
            breakdown_step(runner, name, args.repeats)
        if args.ablate:
            rate = max(max(r.values()) for r in rates)
            ablate_step(runner, name, args.repeats,
                        flop_floor(w, adapters, support, query) / rate)
        if args.contention:
            contention_step(w, name, args.repeats)
    if args.sequential:
        results = {}
        for name in variants:
            runner = make_variant(name, w, adapters, support, query)
            results.update(time_variants({name: runner}, args.warmup, args.repeats, probe))
            after_timing(name, runner)
            del runner
            gc.collect()
    else:
        runners = {name: make_variant(name, w, adapters, support, query) for name in variants}
        results = time_variants(runners, args.warmup, args.repeats, probe)
        for name, runner in runners.items():
            after_timing(name, runner)
        del runners
        gc.collect()
    # the best of before, every round and after: the floor is a best case
    rates.append(gemm_rates(n))
    best = {lib: max(r[lib] for r in rates) for lib in rates[0]}
    rate = max(best.values())
    flops = flop_floor(w, adapters, support, query)
    floor_s = flops / rate

    print(f"fp32 GEMM {n}x{n}, best rate: "
          + ", ".join(f"{lib} {r / 1e9:.1f}" for lib, r in best.items())
          + f" GFLOP/s; FLOP floor {floor_s:.3f} s")
    for name, rep in replays.items():
        if rep is None:
            print(f"{name}: no oneDNN GEMM in the step, nothing to replay")
            continue
        step = quantiles(results[name]["times"])[0]
        print(f"{name}: its {rep['calls']} frozen-base GEMMs alone, replayed back to back "
              f"({rep['flops'] / 1e9:.0f} GFLOP): {rep['median_s']:.3f} s, "
              f"{rep['flops'] / rep['median_s'] / 1e9:.0f} GFLOP/s, "
              f"{rep['median_s'] / floor_s:.2f}x the floor; the step's median {step:.3f} s "
              f"leaves {step - rep['median_s']:.3f} s to the rest")
    want = results["naive-peft"]["grad"] if "naive-peft" in results else None
    base = quantiles(results["naive-peft"]["times"])[0] if "naive-peft" in results else None
    rows = []
    for name in variants:
        res = results[name]
        med, p20, p80 = quantiles(res["times"])
        grad = res["grad"]
        err = rel_err(grad, want) if grad is not None and want is not None else None
        if not math.isfinite(res["loss"]):
            raise SystemExit(f"{name}: the query loss is {res['loss']} at the benchmark size")
        label = name
        if name.startswith("metakernels-") and 0 < w.task_chunk < w.num_tasks:
            label = f"{name}-chunk{w.task_chunk}"
        rows.append({**meta, "preset": w.preset, "variant": label, "backend": backend_of(name),
                     "model": w.describe_model(), "targets": w.targets, "rank": w.rank,
                     "num_tasks": w.num_tasks, "support_sizes": w.describe_sizes(),
                     "query_rows": w.query_rows, "seq_len": w.seq_len,
                     "inner_steps": w.inner_steps, "tokens_per_step": tokens,
                     "warmup": args.warmup, "repeats": args.repeats, "median_s": med,
                     "p20_s": p20, "p80_s": p80, "tokens_per_s": tokens / med,
                     "ratio_naive_peft": med / base if base else None,
                     "floor_s": floor_s, "ratio_floor": med / floor_s,
                     "ratio_floor_paired": statistics.median(
                         t * max(r.values()) / flops
                         for t, r in zip(res["times"], res["round_rates"])),
                     "gemm_gflops": rate / 1e9, "rel_err_vs_naive_peft": err})
        print(f"  {name:<18} median {med:.3f} s  (p20 {p20:.3f}, p80 {p80:.3f})"
              + (f"  rel err {err:.1e}" if err is not None and name != "naive-peft" else ""))
    mem = measure_memory(w, variants, args.memory_runs)
    for name, r in zip(variants, rows):
        r.update(mem[name])
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="fewshot")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, every variant once, no warm-up (the CI smoke test)")
    p.add_argument("--sweep-tasks", action="store_true",
                   help=f"run the preset at T = {', '.join(map(str, SWEEP_TASKS))}")
    p.add_argument("--variant", action="append", choices=ALL_VARIANTS + EXTRA_VARIANTS,
                   help="run only this variant (repeatable); default: every available one")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default 1)")
    p.add_argument("--repeats", type=int, help="timed steps per variant (default 5)")
    p.add_argument("--sequential", action="store_true",
                   help="time one variant after another, each torn down before the next is "
                        "built (default: every variant set up at once and timed in turns, "
                        "fairer on a machine whose load drifts; needs one model copy per "
                        "variant in memory)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's choice; 1 with --quick, whose tiny ops "
                        "only pay for thread synchronisation, worst on a busy machine)")
    p.add_argument("--csv", type=Path, default=RESULTS / "meta_step.csv")
    p.add_argument("--profile", action="store_true",
                   help="print the top ops by self CPU time of one metakernels step")
    p.add_argument("--breakdown", action="store_true",
                   help="print the wall time per step inside each kind of autograd function of "
                        "the metakernels steps, and their time on one thread against all")
    p.add_argument("--ablate", action="store_true",
                   help="print the metakernels steps' time with each non-GEMM kernel removed "
                        "and with all of them removed (wrong results, timing only), alternating")
    p.add_argument("--contention", action="store_true",
                   help="(metakernels variants) time the meta-batch's per-thread shares alone "
                        "and at once, one thread each: what the cores cost each other")
    p.add_argument("--memory-runs", type=int,
                   help="fresh processes per variant whose median peak RSS is reported "
                        "(default 3; 1 with --quick)")
    p.add_argument("--measure-memory", action="store_true",
                   help="(one variant) run one step in this process and print its peak RSS")
    g = p.add_argument_group("workload (override the preset)")
    for f in dataclasses.fields(Workload):
        if f.name != "preset":
            g.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    args.memory_runs = args.memory_runs or (1 if args.quick else 3)
    if args.repeats < 1 or args.warmup < 0 or args.memory_runs < 1:
        p.error("--repeats and --memory-runs must be >= 1 and --warmup >= 0")
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    w = resolve_workload(args)
    if args.measure_memory:
        if not args.variant or len(args.variant) != 1:
            raise SystemExit("--measure-memory takes exactly one --variant")
        print(MEMORY_MARK + json.dumps(measure_memory_here(w, args.variant[0])))
        return
    avail = available_variants()
    avail += [v for v in EXTRA_VARIANTS if args.variant and v in args.variant
              and backend.available(backend_of(v))]
    variants = [v for v in avail if not args.variant or v in args.variant]
    for v in args.variant or ():
        if v not in avail:
            raise SystemExit(f"variant {v} cannot run here (backend {backend_of(v)!r} is "
                             f"unavailable); available: {avail}")
    meta = {**run_metadata(), "malloc": malloc_setting()}
    print(f"{meta['machine']}, {meta['cores']} cores, {meta['threads']} threads, torch "
          f"{meta['torch']}, git {meta['git_rev']}; variants: {', '.join(variants)}")
    check_variants(w, variants)
    sweep = (QUICK_SWEEP_TASKS if args.quick else SWEEP_TASKS) if args.sweep_tasks else (None,)
    rows = []
    for T in sweep:
        wt = w if T is None else dataclasses.replace(w, num_tasks=T)
        new = run_workload(wt, variants, args, meta)
        append_csv(args.csv, COLUMNS, new)
        rows += new
    print(f"\nFOMAML meta-step, preset {w.preset} ({args.warmup} warm-up + {args.repeats} timed "
          f"steps; 'x' columns are time ratios, lower is better; step MB: peak RSS of a fresh "
          f"process above its RSS before the step, median of {args.memory_runs})")
    print_table(rows, TABLE)
    print(f"\nappended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
