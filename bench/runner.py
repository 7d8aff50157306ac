"""What the meta-step benchmarks share (``bench/meta_step.py``, the comparison; ``bench/diagnose.py``,
the diagnostic modes): the workloads and presets, the model, adapters and data every variant
starts from, the variants themselves, the correctness check against naive-peft, the FLOP floor,
the timing of variants in turns, and the peak memory of a step.

A workload runs in ``dtype`` (``float32`` or ``bfloat16``: the base model's weights and
activations; the adapters, theta and the fast weights, stay fp32 in every variant, as PEFT keeps
its adapters fp32 on a bf16 base) on ``device`` (``cpu`` or ``cuda``).

Run as a script, it measures the memory of one variant's step in this fresh process (what
``measure_memory`` starts)::

    python bench/runner.py --variant metakernels-cpu --threads 2 --preset fewshot [workload flags]
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
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from common import DEVICES, DTYPES, gemm_rates, timer

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metakernels import Example, PackedBatch, backend, pack_tasks  # noqa: E402
from metakernels.bank import AdapterBank  # noqa: E402
from metakernels import fused as fused_module  # noqa: E402
from metakernels.fused import apply_fused_layers  # noqa: E402
from metakernels.gemm import use_gemm  # noqa: E402
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
MEMORY_MARK = "MEMORY "
MEMORY_JOBS = 2         # concurrent memory processes: RSS is per process, so they do not mix

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


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    """One meta-step's shape: the model, the adapters, the tasks and the inner loop, and the
    dtype and device it runs in."""

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
    dtype: str = "float32"          # of the base model (the adapters stay fp32)
    device: str = "cpu"

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
    # For a GPU: a 1B-class Llama (random weights, built from its config), many tasks of the
    # fewshot shape; then longer sequences in fewer tasks.
    "gpu-fewshot": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, intermediate_size=8192, num_tasks=32),
    "gpu-large": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                      num_kv_heads=8, intermediate_size=8192, num_tasks=8, seq_len=512),
}
QUICK = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             intermediate_size=0, num_tasks=3, query_rows=2, seq_len=16, inner_steps=2, rank=4,
             alpha=8.0)


def add_workload_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The workload's flags: ``--preset``, ``--quick``, ``--dtype``, ``--device`` (unless
    ``device`` is False: CPU only) and one override per field of ``Workload``."""
    p.add_argument("--preset", choices=list(PRESETS), default="fewshot")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one timed step (the CI smoke test)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="of the base model in every variant (default float32); the adapters, "
                        "theta and the fast weights stay fp32")
    if device:
        p.add_argument("--device", choices=DEVICES, default=None,
                       help="where every variant runs (default cpu)")
    g = p.add_argument_group("workload (override the preset)")
    for f in dataclasses.fields(Workload):
        if f.name not in ("preset", "dtype", "device"):
            g.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)


def resolve_workload(args) -> Workload:
    """Defaults, then the preset, then ``--quick``, then every flag given explicitly."""
    w = Workload(preset=args.preset, **PRESETS[args.preset])
    if args.quick:
        w = dataclasses.replace(w, **QUICK, support_rows=4 if w.zipf_alpha > 0 else 2)
    for f in dataclasses.fields(Workload):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "preset":
            setattr(w, f.name, v)
    if w.targets not in ("qkvo", "all-linear"):
        raise SystemExit(f"--targets must be qkvo or all-linear, got {w.targets!r}")
    if w.dtype not in DTYPES or w.device not in DEVICES:
        raise SystemExit(f"--dtype must be one of {list(DTYPES)} and --device one of "
                         f"{list(DEVICES)}, got {w.dtype!r}, {w.device!r}")
    return w


def check_workloads(w: Workload) -> list[Workload]:
    """Tiny versions of ``w`` (same targets, model family, dtype and device), a uniform and a
    ragged layout."""
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
    """The base model in ``w.dtype`` on ``w.device``, the same weights every time (eval mode,
    every parameter trainable). The tiny Llama is initialised on its device (a 1B model's
    random initialisation takes seconds on a GPU, a minute on a few CPU cores), in fp32 and then
    rounded to ``w.dtype``, so that a bf16 model is the fp32 one rounded."""
    dtype = DTYPES[w.dtype]
    if w.model_path:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(w.model_path, dtype=dtype).eval()
        model = model.to(w.device)
    else:
        with torch.device(w.device):
            model = build_tiny_model("llama", seed=w.seed, dtype=dtype,
                                     vocab_size=w.vocab_size, hidden_size=w.hidden_size,
                                     num_layers=w.num_layers, num_heads=w.num_heads,
                                     num_kv_heads=w.num_kv_heads,
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
    """A bank (one task, fp32, on the CPU) holding theta: PEFT's init of A and a small random
    B, so that the first inner step is not the special case B = 0. The slots come from
    injecting into a ghost of the model, so no second model is ever allocated."""
    slots = inject(ghost_model(w), w.target_modules(), w.rank, w.alpha, 1, init=False).slots
    adapters = AdapterBank(slots, w.rank, w.alpha, 1)
    g = torch.Generator().manual_seed(w.seed + 1)
    adapters.reset_parameters(generator=g)
    with torch.no_grad():
        for s in slots:
            adapters.theta[s.b_slice] = 0.02 * torch.randn(s.rank * s.out_features, generator=g)
    return adapters


def make_data(w: Workload, vocab_size: int) -> tuple[PackedBatch, PackedBatch]:
    """Support and query batches (on the CPU) of random full-length sequences (no padding:
    every token is real work for every variant), the loss on a random-length response."""
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
# Variants: each builds its own copy of the same model on the workload's device; step() runs
# one whole meta-step and returns (LoRA meta-gradient [P] in the bank's layout or None, mean
# query loss)
# ---------------------------------------------------------------------------------------------
def plain_task_losses(model: nn.Module, batch: PackedBatch, chunk_size: int = 0) -> torch.Tensor:
    """Per-task losses through the materialised [N, V] logits and autograd (the unfused loss)."""
    h = hidden_states(model, batch)
    W = model.get_output_embeddings().weight
    return segment_cross_entropy_ref(h, W.detach(), batch.labels.reshape(-1), batch.token_layout)


class Metakernels:
    """``fomaml_step``; ``plain=True``: without the fused RMSNorm/SwiGLU/rotary layers and with
    the loss computed from the materialised logits instead of ``segment_cross_entropy``;
    ``layer_kernels=False``: the fused layers in their torch forms (no csrc/fused_layers.cpp, no
    csrc/attention.cpp)."""

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
        self.support, self.query = support.to(w.device), query.to(w.device)
        self.cfg = inner_config(w)

    def step(self):
        with backend.use_backend(self.backend_name), self._loss():
            r = chunked_step("fomaml", self.model, self.bank, self.support, self.query,
                             self.cfg, self.task_chunk)
        return r.meta_grad, r.meta_loss

    @contextlib.contextmanager
    def _loss(self):
        with contextlib.ExitStack() as stack:
            if self.plain:
                stack.enter_context(patched(fomaml_module, "task_losses", plain_task_losses))
            if not self.layer_kernels:
                stack.enter_context(backend.use("layer_kernels", "off"))
            if self.gemm is not None:
                stack.enter_context(use_gemm(self.gemm))
            yield


@contextlib.contextmanager
def patched(obj, name: str, value):
    """``obj.name = value`` inside the block (a module's function or a class's attribute; a
    class's staticmethod is put back as it was, not as the function it gives)."""
    saved = vars(obj)[name]
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


class NaivePeft:
    """``naive_step`` on a PEFT LoRA model of the base (PEFT keeps its adapters fp32 on a bf16
    base). ``onednn=True``: its frozen linear layers on oneDNN's GEMM (``metakernels.gemm``),
    as the metakernels-cpu step runs them."""

    def __init__(self, w, adapters, support, query, onednn=False):
        self.peft = make_peft_model(build_base(w), adapters)
        self.onednn = onednn
        if onednn:
            fused_module.switch_linears(self.peft)
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
            lora[na] = self.theta[s.a_slice].view(s.in_features, s.rank).T
            lora[nb] = self.theta[s.b_slice].view(s.rank, s.out_features).T
        grads, losses = self._run(lora, *self.sup, *self.qry)
        meta_grad = torch.empty(self.num_params, device=self.theta.device)
        for s, na, nb in self.entries:
            meta_grad[s.a_slice] = grads[na].mean(0).T.reshape(-1)
            meta_grad[s.b_slice] = grads[nb].mean(0).T.reshape(-1)
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
# gives, apart from the batching).
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
                ok, what = err < rtol, f"meta-gradient rel. error {err:.2e} (< {rtol:.1e})"
            print(f"check {cw.describe_sizes():>8}  {name:<18} {what}  {'ok' if ok else 'FAIL'}")
            if not ok:
                raise SystemExit(f"{name} disagrees with naive-peft on layout "
                                 f"{cw.describe_sizes()} ({what}); not timing a wrong variant")


# ---------------------------------------------------------------------------------------------
# FLOP floor
# ---------------------------------------------------------------------------------------------
def flop_floor(w: Workload, adapters: AdapterBank, support: PackedBatch,
               query: PackedBatch) -> float:
    """FLOPs of the LoRA meta-step at best (DESIGN.md, "Performance: how to measure"), per token
    of every forward/backward: 2P forward + 2P input gradient of the frozen linear weights (P:
    every linear layer, not the embedding), except that the output layer counts only on the
    tokens with a label (a token without one has no loss: its logits are not needed) and the
    first layer's q, k and v have no input gradient (they read the frozen embeddings), plus
    6 r (in + out) per adapted layer (LoRA forward, dx and dA, dB), plus causal attention
    6 L^2 d_attn per sequence and layer (2 forward, 4 backward as flash-attention counts them).
    The same in every dtype: the floor's time is these FLOPs at the GEMM rate of the dtype
    (``floor_rates``). It is the floor of the LoRA meta-step; naive-full does more work (weight
    gradients), and its ratio says so."""
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


def floor_rates(w: Workload, min_seconds: float = 0.2) -> dict[str, float]:
    """The GEMM rates the floor takes its best from, measured now, in the workload's dtype on
    its device: square products at the model's hidden size by every GEMM library the step can
    use (``common.gemm_functions``); on a GPU also at the MLP's intermediate size (the step's
    largest products: a GPU reaches its rate only on large ones, a CPU at the hidden size
    already). Keys: the library, with the size where there are several."""
    cfg = model_config(w)
    sizes = [cfg.hidden_size]
    if w.device == "cuda":
        sizes.append(getattr(cfg, "intermediate_size", cfg.hidden_size))
    rates = {}
    for n in dict.fromkeys(sizes):
        for lib, r in gemm_rates(n, DTYPES[w.dtype], min_seconds, w.device).items():
            rates[lib if len(sizes) == 1 else f"{lib} n={n}"] = r
    return rates


def tokens_per_step(w: Workload, support: PackedBatch, query: PackedBatch) -> int:
    return w.inner_steps * support.num_tokens() + query.num_tokens()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_variants(runners: dict, warmup: int, repeats: int, device: str = "cpu",
                  probe: Callable[[], dict] | None = None) -> dict[str, dict]:
    """``warmup`` untimed steps of every runner, then ``repeats`` rounds in which every runner
    takes one timed step (``common.timer(device)`` around the whole meta-step: the host clock
    on the CPU, CUDA events on a GPU) in turn, so that a machine whose load drifts slows every
    variant alike. Returns per runner its times and the last step's meta-gradient and query
    loss. ``probe`` runs after each round (the GEMM rates measured there: the floor's rate then
    comes from the same minutes as the steps, not from a moment before them); what it returns
    is kept per runner and round (``round_rates``)."""
    clock = timer(device)
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    res = {name: {"times": [], "round_rates": []} for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            def step(runner=runner, out=res[name]):
                out["grad"], out["loss"] = runner.step()
            res[name]["times"].append(clock(step))
        if probe is not None:
            measured = probe()
            for name in runners:
                res[name]["round_rates"].append(measured)
    return res


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
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
    """CPU: runs this file as a script (``measure_memory_here``) in ``runs`` fresh processes
    per variant; the median of each figure (a step's peak RSS moves by some 10% between
    processes: where glibc's heap happens to lie)."""
    def one(variant):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant,
               "--threads", str(torch.get_num_threads()), *w.cli_args()]
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


def cuda_allocated() -> int:
    """Bytes the CUDA caching allocator has handed out now, after the queued work is done."""
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def cuda_step_memory(runner) -> float:
    """MB a GPU step allocates at its peak above what was allocated before it (the models,
    adapters and data of every variant built): ``torch.cuda.max_memory_allocated``, reset just
    before the step. The runner has taken its warm-up and timed steps, so that the compiled
    kernels and cuBLAS's workspace are not counted."""
    gc.collect()
    before = cuda_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The peak RSS of one variant's step in this fresh "
                                            "process (bench/meta_step.py starts it)")
    p.add_argument("--variant", required=True, choices=VARIANT_CHOICES)
    p.add_argument("--threads", type=int, required=True)
    add_workload_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = resolve_workload(args)
    if w.device != "cpu":
        raise SystemExit("the peak RSS is a CPU measurement; a GPU step's memory is measured "
                         "in the benchmark's own process")
    print(MEMORY_MARK + json.dumps(measure_memory_here(w, args.variant)))


if __name__ == "__main__":
    main()
