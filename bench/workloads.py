"""Workloads of the meta-step benchmarks: a meta-step's shape (``Workload``: the model, the
adapters, the tasks, the inner loop, the dtype and the device), the presets and their flags, and
what every variant starts from: the base model, the initial adapters (theta) and the data.

A workload runs in ``dtype`` (``float32`` or ``bfloat16``: the base model's weights and
activations; the adapters, theta and the fast weights, stay fp32 in every variant, as PEFT keeps
its adapters fp32 on a bf16 base) on ``device`` (``cpu`` or ``cuda``). The model is a Llama built
from its config with random weights, or, with ``--model DIR``, any local Hugging Face checkpoint
(its weights; the preset still sets the tasks' shapes).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
from pathlib import Path

import torch
import torch.nn as nn

from metakernels import Example, PackedBatch, pack_tasks
from metakernels.bank import AdapterBank
from metakernels.lora import inject
from metakernels.meta import InnerConfig
from metakernels.models import build_tiny_model, tiny_config

from bench.common import DEVICES, DTYPES, usage_error

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


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
    model: str = ""                 # a local Hugging Face checkpoint directory instead of the tiny Llama
    model_layers: int = 0           # with model: this many of its layers, random weights (0: the checkpoint)
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
        if self.model:
            return self.model + (f" ({self.model_layers} layers, random weights)"
                                 if self.model_layers else "")
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
        usage_error(f"--targets must be qkvo or all-linear, got {w.targets!r}")
    if w.dtype not in DTYPES or w.device not in DEVICES:
        usage_error(f"--dtype must be one of {list(DTYPES)} and --device one of "
                    f"{list(DEVICES)}, got {w.dtype!r}, {w.device!r}")
    if w.model and not (Path(w.model) / "config.json").is_file():
        usage_error(f"--model {w.model}: no config.json there; give a Hugging Face model "
                    f"directory (python3 -m metakernels.models fetch smollm2 DIR makes one)")
    return w


def check_workloads(w: Workload) -> list[Workload]:
    """Tiny versions of ``w`` (same targets, model family, dtype and device), a uniform and a
    ragged layout. With a checkpoint (``w.model``): its architecture (attention heads, tied
    embeddings, vocabulary) in 2 layers of random weights."""
    tiny = dict(preset="check", rank=4, alpha=8.0, num_tasks=3, query_rows=2, seq_len=12,
                inner_steps=2, inner_lr=0.05)
    if w.model:
        tiny.update(model_layers=2)
    else:
        tiny.update(vocab_size=97, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=80)
    return [dataclasses.replace(w, **tiny, support_rows=2, zipf_alpha=0.0),
            dataclasses.replace(w, **tiny, support_rows=3, zipf_alpha=1.0)]


# ---------------------------------------------------------------------------------------------
# Model, adapters, data
# ---------------------------------------------------------------------------------------------
def model_config(w: Workload):
    if w.model:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(w.model)
        if w.model_layers:
            cfg.num_hidden_layers = w.model_layers
        return cfg
    return tiny_config("llama", vocab_size=w.vocab_size, hidden_size=w.hidden_size,
                       num_layers=w.num_layers, num_heads=w.num_heads,
                       num_kv_heads=w.num_kv_heads, intermediate_size=w.intermediate(),
                       max_position_embeddings=max(256, w.seq_len))


def build_base(w: Workload) -> nn.Module:
    """The base model in ``w.dtype`` on ``w.device``, the same weights every time (eval mode,
    every parameter trainable). The tiny Llama (and ``model_layers`` of a checkpoint's
    architecture) is initialised on its device (a 1B model's
    random initialisation takes seconds on a GPU, a minute on a few CPU cores), in fp32 and then
    rounded to ``w.dtype``, so that a bf16 model is the fp32 one rounded."""
    dtype = DTYPES[w.dtype]
    if w.model and w.model_layers:
        from transformers import AutoModelForCausalLM
        torch.manual_seed(w.seed)
        with torch.device(w.device):
            model = AutoModelForCausalLM.from_config(model_config(w)).to(dtype).eval()
    elif w.model:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(w.model, dtype=dtype).eval()
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
