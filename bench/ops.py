"""Microbenchmarks of the ops, each against its plain-PyTorch reference, on every backend that can
run on the device (Liger-Kernel style: providers x modes, results appended to one CSV).

Providers: ``reference`` (the op's ``*_ref`` function, autograd for the gradients) and one per
available backend (the public op under ``metakernels.backend.use_backend``, called the way the
engine calls it: ``multi_lora_linear`` writes its adapter gradients into bank-style buffers);
``cpu-blas`` is the cpu backend with the frozen weights' GEMMs on ATen's ``mm`` (MKL) instead of
oneDNN's (``metakernels.gemm``), where oneDNN is the default. On a GPU (``--device cuda``) the
providers are ``reference``, ``torch`` and ``triton``, at the shapes of the ``gpu-fewshot``
meta-step preset (a 1B-class Llama: d 2048, MLP 8192, 32 heads of 64, vocabulary 32000, r 16,
32 tasks of 2 x 64 tokens), in fp32 and in bf16 (the activations and the frozen weights in
bf16, the adapter bank fp32: the bf16 LoRA products run on the tensor cores; the bank ops are
fp32 only).
``attention`` is the causal self-attention of the fused layers (``model.fused_layers``): the
reference is its math form (softmax of the masked scores, autograd), ``torch`` is what the
library runs there (PyTorch's ``scaled_dot_product_attention``, also under ``triton`` on a GPU),
``cpu`` (and ``cpu-blas``, which has no GEMM library to switch) the kernel of
``csrc/attention.cpp``, [B, H, L, D] as the model calls it.
``rms_norm``, ``swiglu`` and ``rotary`` are the fused layers' (``metakernels.fused``) as the model
calls them (a frozen norm weight): the reference is the library's op-by-op form (Hugging Face's
``LlamaRMSNorm``, ``F.silu(gate) * up``, ``apply_rotary_pos_emb``) under autograd, ``torch`` the
memory-lean autograd functions in their torch forms, ``cpu`` (and ``cpu-blas``: no GEMM) the
one-pass kernels of ``csrc/fused_layers.cpp``.
Modes: ``forward``, ``backward`` (the backward of one retained forward graph) and ``full``
(forward + backward); ``fused_update`` and ``meta_reduce`` have a forward only. Every provider is
checked against the reference (outputs and every gradient) at the benchmark shape before it is
timed. Times are ``time.perf_counter`` around one call on the CPU, CUDA events around it on a GPU
(``common.timer``), after warm-up calls; median and p20/p80.

Rates from analytic counts (N rows, T tasks, rank r, hidden d, vocabulary V, P adapter params):

    multi_lora_linear      GFLOP/s  forward 2N in out + 2N r (in + out)
                                    backward 2N in out (dx) + 4N r (in + out) (dA, dB, LoRA dx)
    segment_cross_entropy  GFLOP/s  forward 2NdV (logits), backward 2NdV (dh), as the reference
                                    (and the torch backend, which is the reference) does them.
                                    The fused kernels compute dh in the forward, never
                                    keeping the logits: cpu on the M labelled rows only (its
                                    forward counts 4MdV), triton on every row (4NdV); their
                                    backward counts N d (a row scaling).
                                    Compare providers on ``full`` (and by time).
    attention              GFLOP/s  causal, B sequences, H heads of D, length L: forward
                                    2 B H L^2 D, backward 4 B H L^2 D (as the meta-step's
                                    FLOP floor counts them)
    rms_norm               GB/s     [N, d]: forward read x, write y (8Nd bytes); backward read
                                    dy and x (or y), write dx (12Nd)
    swiglu                 GB/s     [N, I] gate and up: forward 12NI bytes; backward read dh,
                                    gate, up, write both gradients (20NI)
    rotary                 GB/s     q and k [B, H, L, D]: read both, write both, forward and
                                    backward alike (16 BHLD bytes)
                                    (the three layers' bytes in fp32; half of them in bf16)
    fused_update           GB/s     sgd: read fast, grad, write fast (12 TP bytes);
                                    adam: + read/write both moments (28 TP bytes)
    meta_reduce            GB/s     read T x P (+ theta for reptile), write P

Commands::

    python bench/ops.py                     # every op, every provider, every mode
    python bench/ops.py --op multi_lora_linear
    python bench/ops.py --op attention
    python bench/ops.py --op rms_norm --op swiglu --op rotary
    python bench/ops.py --quick --csv /tmp/ops.csv
    python bench/ops.py --device cuda       # reference, torch, triton at GPU shapes
"""
from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

from common import (DEVICES, RESULTS, append_csv, print_table, quantiles, require_device,
                    run_metadata, settle_run_args, time_calls)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metakernels import TaskLayout, backend  # noqa: E402
from metakernels import fused  # noqa: E402
from metakernels.ops import rms_norm_ref, rotary_ref  # noqa: E402
from metakernels.ops.attention import _AttentionFn  # noqa: E402
from metakernels.gemm import gemm_library, use_gemm  # noqa: E402
from metakernels.ops import AdamState, fused_update, fused_update_ref, meta_reduce  # noqa: E402
from metakernels.ops import meta_reduce_ref, multi_lora_linear, multi_lora_linear_ref  # noqa: E402
from metakernels.ops import segment_cross_entropy, segment_cross_entropy_ref  # noqa: E402

# Relative (norm) error allowed against the reference at the same dtype: fp32; bf16, whose
# unit roundoff is 2^-8, over a handful of roundings on either side.
CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 8 * 2 ** -8}
# The ops timed in bf16 on a GPU as well: those over activations (the bank ops are fp32).
BF16_OPS = ("multi_lora_linear", "segment_cross_entropy", "attention", "rms_norm", "swiglu",
            "rotary")
OPS = ("multi_lora_linear", "segment_cross_entropy", "attention", "rms_norm", "swiglu", "rotary",
       "fused_update", "meta_reduce")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def zipf_sizes(T: int, largest: int, alpha: float = 1.5) -> list[int]:
    return [max(1, round(largest / (t + 1) ** alpha)) for t in range(T)]


def layout_name(sizes) -> str:
    return f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else "ragged " + ",".join(
        map(str, sizes))


class Runner:
    """One provider on one case: ``forward()`` builds an output, ``backward()`` runs the
    backward of the last forward's graph, ``outputs()`` lists what the check compares."""

    def __init__(self, forward, backward=None, outputs=None):
        self._forward, self._backward, self._outputs = forward, backward, outputs
        self.out = None

    def forward(self):
        self.out = self._forward()

    def backward(self):
        self._backward(self.out)

    def full(self):
        self.forward()
        self.backward()

    def outputs(self) -> list[torch.Tensor]:
        return self._outputs(self.out)


def _dispatch(provider: str, fn):
    """``fn`` run under the provider's backend (the reference needs no dispatch); ``cpu-blas``
    is the cpu backend with ATen's GEMMs for the frozen weights instead of oneDNN's."""
    if provider == "reference":
        return fn

    def run(*a, **k):
        with backend.use_backend(provider_backend(provider)), \
                use_gemm("blas") if provider == "cpu-blas" else contextlib.nullcontext():
            return fn(*a, **k)
    return run


def provider_backend(provider: str) -> str:
    return "torch" if provider == "reference" else provider.split("-")[0]


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def _packed_batch(tokens_per_task, d_in, d_out, g):
    """The layout of a packed batch of task rows, its [N, d_in] input and a [d_out, d_in] weight
    (scaled by 1 / sqrt(d_in) so that the outputs stay O(1))."""
    layout = TaskLayout.from_sizes(tokens_per_task)
    x = torch.randn(layout.num_rows, d_in, generator=g)
    return layout, x, torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)


class MultiLoraLinearCase:
    op, metric, modes = "multi_lora_linear", "GFLOP/s", ("forward", "backward", "full")
    fp32 = ("A", "B")   # the adapters are views of the fp32 bank whatever the activations' dtype

    def __init__(self, tokens_per_task, in_f, out_f, rank, seed=0):
        g = torch.Generator().manual_seed(seed)
        T = len(tokens_per_task)
        self.layout, self.x, self.W = _packed_batch(tokens_per_task, in_f, out_f, g)
        N = self.layout.num_rows
        self.b = torch.randn(out_f, generator=g)
        self.A = torch.randn(T, in_f, rank, generator=g) / math.sqrt(in_f)
        self.B = torch.randn(T, rank, out_f, generator=g) / math.sqrt(rank)
        self.dy = torch.randn(N, out_f, generator=g)
        self.scale = 2.0
        self.config = f"N={N} {in_f}->{out_f} r={rank} T={T} {layout_name(tokens_per_task)}"
        lora = N * rank * (in_f + out_f)
        self._work = {"forward": 2 * N * in_f * out_f + 2 * lora,
                      "backward": 2 * N * in_f * out_f + 4 * lora}
        self._work["full"] = self._work["forward"] + self._work["backward"]

    def work(self, mode, provider):
        return self._work[mode]

    def runner(self, provider):
        x = self.x.clone().requires_grad_(True)
        A = self.A.clone().requires_grad_(True)
        B = self.B.clone().requires_grad_(True)
        if provider == "reference":
            fwd = lambda: multi_lora_linear_ref(x, self.W, self.b, A, B, self.layout, self.scale)
            grads = lambda: [x.grad, A.grad, B.grad]
        else:   # as the bank runs it: adapter gradients land in flat buffers
            gA, gB = torch.zeros_like(A), torch.zeros_like(B)
            fwd = _dispatch(provider, lambda: multi_lora_linear(
                x, self.W, self.b, A, B, self.layout, self.scale, gA, gB))
            grads = lambda: [x.grad, gA, gB]
        return Runner(fwd, lambda y: y.backward(self.dy, retain_graph=True),
                      lambda y: [y.detach(), *grads()])


class SegmentCrossEntropyCase:
    op, metric, modes = "segment_cross_entropy", "GFLOP/s", ("forward", "backward", "full")
    fp32 = ("dloss",)   # the losses are fp32

    def __init__(self, tokens_per_task, hidden, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        T = len(tokens_per_task)
        self.layout, self.h, self.W = _packed_batch(tokens_per_task, hidden, vocab, g)
        N = self.layout.num_rows
        labels = torch.randint(0, vocab, (N,), generator=g)
        ignore = torch.rand(N, generator=g) < 0.3          # the prompt tokens
        self.labels = torch.where(ignore, torch.full_like(labels, -100), labels)
        self.dloss = torch.rand(T, generator=g) + 0.5
        self.config = f"N={N} d={hidden} V={vocab} T={T}"
        self.sizes = (N, hidden, vocab)
        self.labelled = int((self.labels != -100).sum())

    def work(self, mode, provider):
        N, d, V = self.sizes
        if provider_backend(provider) in ("cpu", "triton"):   # fused: dh in the forward
            M = self.labelled if provider_backend(provider) == "cpu" else N
            return {"forward": 4 * M * d * V, "backward": N * d,
                    "full": 4 * M * d * V + N * d}[mode]
        return {"forward": 2 * N * d * V, "backward": 2 * N * d * V, "full": 4 * N * d * V}[mode]

    def runner(self, provider):
        h = self.h.clone().requires_grad_(True)
        fn = segment_cross_entropy_ref if provider == "reference" else _dispatch(
            provider, segment_cross_entropy)
        return Runner(lambda: fn(h, self.W, self.labels, self.layout),
                      lambda loss: loss.backward(self.dloss, retain_graph=True),
                      lambda loss: [loss.detach(), h.grad])


def attention_math(q, k, v, scale: float) -> torch.Tensor:
    """Causal attention in its math form: softmax(q k^T scale, keys after the query masked) v."""
    L = q.shape[-2]
    keep = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


class AttentionCase:
    op, metric, modes = "attention", "GFLOP/s", ("forward", "backward", "full")

    def __init__(self, batch, heads, length, head_dim, seed=0):
        g = torch.Generator().manual_seed(seed)
        shape = (batch, heads, length, head_dim)
        self.q, self.k, self.v, self.dout = (torch.randn(shape, generator=g) for _ in range(4))
        self.scale = head_dim ** -0.5
        self.config = f"B={batch} H={heads} L={length} D={head_dim} causal"
        flops = 2 * batch * heads * length ** 2 * head_dim
        self._work = {"forward": flops, "backward": 2 * flops, "full": 3 * flops}

    def work(self, mode, provider):
        return self._work[mode]

    def runner(self, provider):
        q, k, v = (t.clone().requires_grad_(True) for t in (self.q, self.k, self.v))
        if provider == "reference":
            fwd = lambda: attention_math(q, k, v, self.scale)
        elif provider_backend(provider) == "cpu":
            fwd = lambda: _AttentionFn.apply(q, k, v, None, True, self.scale, "cpu")
        else:
            fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         scale=self.scale)
        return Runner(fwd, lambda out: out.backward(self.dout, retain_graph=True),
                      lambda out: [out.detach(), q.grad, k.grad, v.grad])


class _LayerCase:
    """A fused layer (``metakernels.fused``): bound by memory, rated by the bytes an ideal kernel
    moves (``nbytes``, forward and backward), the same for every provider. ``inputs`` are
    cloned into leaves that require a gradient; ``apply`` (the reference) and ``apply_fused``
    give the output (a tensor or a tuple) and ``grads`` are the gradients the backward gets.
    Each backward stores the inputs' gradients instead of adding them to the last ones (their
    ``.grad`` is cleared first), as the model's backward hands them on."""
    metric, modes = "GB/s", ("forward", "backward", "full")

    def __init__(self, config, inputs, grads, nbytes):
        self.config, self.inputs, self.grads = config, inputs, grads
        self._bytes = {"forward": nbytes[0], "backward": nbytes[1], "full": sum(nbytes)}

    def work(self, mode, provider):
        return self._bytes[mode] * self.inputs[0].element_size() // 4

    def runner(self, provider):
        leaves = [t.clone().requires_grad_(True) for t in self.inputs]
        fn = self.apply if provider == "reference" else _dispatch(provider, self.apply_fused)

        def as_tuple(out):
            return out if isinstance(out, tuple) else (out,)

        def backward(out):
            for t in leaves:   # stored, not added: in the model these inputs are not leaves
                t.grad = None
            torch.autograd.backward(as_tuple(out), self.grads, retain_graph=True)
        return Runner(lambda: fn(*leaves), backward,
                      lambda out: [o.detach() for o in as_tuple(out)] + [t.grad for t in leaves])


class RMSNormCase(_LayerCase):
    op = "rms_norm"

    def __init__(self, rows, dim, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.rand(dim, generator=g) + 0.5   # frozen, no zero: as the model's
        self.eps = 1e-6
        super().__init__(f"N={rows} d={dim}", [torch.randn(rows, dim, generator=g)],
                         [torch.randn(rows, dim, generator=g)],
                         (8 * rows * dim, 12 * rows * dim))

    def apply(self, x):
        return rms_norm_ref(x, self.weight, self.eps)

    def apply_fused(self, x):
        return fused.rms_norm(x, self.weight, self.eps)


class SwiGLUCase(_LayerCase):
    op = "swiglu"

    def __init__(self, rows, inter, seed=0):
        g = torch.Generator().manual_seed(seed)
        super().__init__(f"N={rows} I={inter}",
                         [torch.randn(rows, inter, generator=g) for _ in range(2)],
                         [torch.randn(rows, inter, generator=g)],
                         (12 * rows * inter, 20 * rows * inter))

    def apply(self, gate, up):
        return F.silu(gate) * up

    def apply_fused(self, gate, up):
        return fused.swiglu(gate, up)


class RotaryCase(_LayerCase):
    op = "rotary"

    def __init__(self, batch, heads, length, head_dim, seed=0):
        g = torch.Generator().manual_seed(seed)
        # q and k as the projections give them: [B, L, H, D] transposed to [B, H, L, D]
        qk = [torch.randn(batch, length, heads, head_dim, generator=g).transpose(1, 2)
              for _ in range(2)]
        angle = torch.rand(batch, length, head_dim // 2, generator=g) * 6.3
        angle = torch.cat([angle, angle], -1)
        self.cos, self.sin = angle.cos(), angle.sin()
        n = batch * heads * length * head_dim
        super().__init__(f"B={batch} H={heads} L={length} D={head_dim}", qk,
                         [torch.randn(batch, heads, length, head_dim, generator=g)
                          for _ in range(2)], (16 * n, 16 * n))

    def apply(self, q, k):
        cos, sin = self.cos.unsqueeze(1), self.sin.unsqueeze(1)
        return rotary_ref(q, k, cos, sin)

    def apply_fused(self, q, k):
        return fused.rotary(q, k, self.cos, self.sin)


class _BankCase:
    """A forward-only op over a [T, P] fp32 bank, one row per task. It is bound by memory, so it
    is rated by the ``nbytes`` it must move, the same for every provider; ``variant`` (the
    optimizer or the reduction) goes into the config."""
    metric, modes = "GB/s", ("forward",)

    def __init__(self, num_tasks, num_params, variant, nbytes, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(num_tasks, num_params, generator=self.g)
        self.config = f"T={num_tasks} P={num_params} {variant}"
        self._bytes = nbytes

    def work(self, mode, provider):
        return self._bytes


class FusedUpdateCase(_BankCase):
    op = "fused_update"

    def __init__(self, num_tasks, num_params, optimizer, seed=0):
        T, P = num_tasks, num_params
        super().__init__(T, P, optimizer, 4 * T * P * (3 if optimizer == "sgd" else 7), seed)
        self.grad = torch.randn(T, P, generator=self.g) * 1e-2
        self.lr = torch.rand(T, generator=self.g) * 1e-3 + 1e-4
        self.optimizer = optimizer
        self.kw = dict(optimizer=optimizer, max_grad_norm=1.0, weight_decay=0.01)

    def runner(self, provider):
        fast = self.bank.clone()
        state = AdamState.zeros_like(fast) if self.optimizer == "adam" else None
        fn = fused_update_ref if provider == "reference" else _dispatch(provider, fused_update)

        def outputs(res):
            norms, finite = res
            extra = [state.exp_avg, state.exp_avg_sq, state.step] if state is not None else []
            return [fast, norms, finite.float(), *extra]
        return Runner(lambda: fn(fast, self.grad, self.lr, state=state, **self.kw),
                      outputs=outputs)


class MetaReduceCase(_BankCase):
    op = "meta_reduce"

    def __init__(self, num_tasks, num_params, kind, seed=0):
        T, P = num_tasks, num_params
        super().__init__(T, P, kind, 4 * (T * P + P * (2 if kind == "reptile" else 1)), seed)
        self.w = torch.softmax(torch.randn(T, generator=self.g), 0)
        self.theta = torch.randn(P, generator=self.g) if kind == "reptile" else None
        self.kind = kind

    def runner(self, provider):
        fn = meta_reduce_ref if provider == "reference" else _dispatch(provider, meta_reduce)
        return Runner(lambda: fn(self.kind, self.bank, self.w, self.theta), outputs=lambda y: [y])


def cases(op: str, quick: bool) -> list:
    """Realistic shapes: the fewshot preset's layers (d 512, r 16, 8 tasks of 2 x 64 tokens),
    a Zipf-1.5 mix of task sizes (punica's), an MLP projection, 32 tasks, a 32k vocabulary, the
    attention of the fewshot and large presets."""
    P_FEWSHOT = 6 * 4 * 16 * (512 + 512)   # q/k/v/o adapters of the fewshot model, rank 16
    if op == "multi_lora_linear":
        if quick:
            return [MultiLoraLinearCase([8, 8, 8], 32, 40, 4),
                    MultiLoraLinearCase([10, 0, 6], 32, 40, 4)]
        return [MultiLoraLinearCase([128] * 8, 512, 512, 16),
                MultiLoraLinearCase([64 * n for n in zipf_sizes(8, 8)], 512, 512, 16),
                MultiLoraLinearCase([128] * 8, 512, 1376, 16),
                MultiLoraLinearCase([128] * 32, 512, 512, 16)]
    if op == "segment_cross_entropy":
        if quick:
            return [SegmentCrossEntropyCase([16, 8, 24], 32, 100)]
        return [SegmentCrossEntropyCase([128] * 8, 512, 1024),
                SegmentCrossEntropyCase([128] * 8, 512, 32000)]
    if op == "attention":   # the fewshot and large presets' layers: 16 sequences of 64, 128
        if quick:
            return [AttentionCase(2, 3, 17, 8)]
        return [AttentionCase(16, 8, 64, 64), AttentionCase(16, 8, 128, 64)]
    if op == "rms_norm":   # the fewshot and large presets' hidden states
        return [RMSNormCase(9, 48)] if quick else [RMSNormCase(1024, 512), RMSNormCase(2048, 512)]
    if op == "swiglu":
        return [SwiGLUCase(9, 80)] if quick else [SwiGLUCase(1024, 1376), SwiGLUCase(2048, 1376)]
    if op == "rotary":
        if quick:
            return [RotaryCase(2, 3, 7, 8)]
        return [RotaryCase(16, 8, 64, 64), RotaryCase(16, 8, 128, 64)]
    if op == "fused_update":
        shapes = [(3, 1000)] if quick else [(8, P_FEWSHOT), (32, P_FEWSHOT)]
        return [FusedUpdateCase(T, P, o) for T, P in shapes for o in ("sgd", "adam")]
    shapes = [(3, 1000)] if quick else [(8, P_FEWSHOT), (32, P_FEWSHOT)]
    return [MetaReduceCase(T, P, k) for T, P in shapes for k in ("fomaml", "reptile")]


def gpu_cases(op: str, quick: bool) -> list:
    """The ``gpu-fewshot`` preset's shapes (``--quick``: the CPU's quick shapes): its layers (d
    2048, r 16, 32 tasks of 2 x 64 tokens; the MLP's up projection 2048 -> 8192), a Zipf-1.5 mix
    of task sizes, its 32k vocabulary, attention of 32 heads of 64 at L 64 and 512 (the
    ``gpu-large`` preset), its adapters' P for the bank ops."""
    if quick:
        return cases(op, True)
    # 16 layers x rank 16 x (q, o: 2048 -> 2048; k, v: 2048 -> 512, 8 kv heads of 64)
    P_GPU = 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512))
    if op == "multi_lora_linear":
        return [MultiLoraLinearCase([128] * 32, 2048, 2048, 16),
                MultiLoraLinearCase([64 * n for n in zipf_sizes(32, 8)], 2048, 2048, 16),
                MultiLoraLinearCase([128] * 32, 2048, 8192, 16)]
    if op == "segment_cross_entropy":
        return [SegmentCrossEntropyCase([128] * 32, 2048, 32000)]
    if op == "attention":
        return [AttentionCase(64, 32, 64, 64), AttentionCase(16, 32, 512, 64)]
    if op == "rms_norm":
        return [RMSNormCase(4096, 2048)]
    if op == "swiglu":
        return [SwiGLUCase(4096, 8192)]
    if op == "rotary":
        return [RotaryCase(64, 32, 64, 64)]
    if op == "fused_update":
        return [FusedUpdateCase(32, P_GPU, o) for o in ("sgd", "adam")]
    return [MetaReduceCase(32, P_GPU, k) for k in ("fomaml", "reptile")]


def to_device(case, device: str, dtype: torch.dtype = torch.float32):
    """``case`` with its tensors on ``device`` and its floating tensors in ``dtype``, but for
    those the case keeps in fp32 (its ``fp32`` names): the cases draw their inputs on the CPU
    in fp32 (one generator, the same numbers everywhere) and are moved before their runners
    are built."""
    keep = getattr(case, "fp32", ())

    def move(name, t):
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() and name not in keep else t
    for name, v in vars(case).items():
        if isinstance(v, torch.Tensor):
            setattr(case, name, move(name, v))
        elif isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            setattr(case, name, [move(name, t) for t in v])
    case.dtype = dtype
    if dtype != torch.float32:   # a config names one row per (provider, mode) in the CSV
        case.config += f" {str(dtype).split('.')[-1]}"
    return case


def dtypes(op: str, device: str) -> list[torch.dtype]:
    """fp32 everywhere; on a GPU also bf16 for the ops over activations."""
    cuda = torch.device(device).type == "cuda"
    return [torch.float32] + ([torch.bfloat16] if cuda and op in BF16_OPS else [])


def providers(device: str = "cpu") -> list[str]:
    """The reference and every backend that runs on ``device``: on the CPU torch and cpu (the
    triton backend there is an interpreter for tests, not something to time), and the cpu
    backend with ATen's GEMMs where its default is oneDNN's; on a GPU torch and triton."""
    dev = torch.device(device)
    names = ("torch", "triton") if dev.type == "cuda" else ("torch", "cpu")
    provs = ["reference"] + [b for b in names if backend.available(b, dev)]
    if "cpu" in provs and gemm_library() == "onednn":
        provs.append("cpu-blas")
    return provs


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------
def check(case, provider: str, want: list[torch.Tensor]) -> None:
    r = case.runner(provider)
    r.forward() if case.modes == ("forward",) else r.full()
    got = r.outputs()
    for i, (a, b) in enumerate(zip(got, want)):
        err = rel_err(a, b)
        if not err < CHECK_RTOL[case.dtype]:
            raise SystemExit(f"{case.op} [{case.config}]: provider {provider} output {i} "
                             f"(shape {tuple(b.shape)}) differs from the reference, relative "
                             f"error {err:.2e}; not timing a wrong op")


def bench_case(case, provs, args, meta) -> list[dict]:
    ref = case.runner("reference")
    ref.forward() if case.modes == ("forward",) else ref.full()
    want = [t.clone() for t in ref.outputs()]
    for p in provs:
        if p != "reference":
            check(case, p, want)
    rows = []
    for mode in case.modes:
        for p in provs:
            r = case.runner(p)
            if mode == "backward":
                r.forward()
                times = time_calls(r.backward, args.warmup, args.repeats, device=args.device)
            else:
                times = time_calls(getattr(r, mode), args.warmup, args.repeats,
                                   device=args.device)
            med, p20, p80 = quantiles(times)
            rows.append({**meta, "op": case.op, "config": case.config, "provider": p,
                         "backend": provider_backend(p), "mode": mode,
                         "median_ms": med * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
                         "metric": case.metric, "throughput": case.work(mode, p) / med / 1e9,
                         "device": args.device, "dtype": str(case.dtype).split(".")[-1]})
        ref_med = next(r["median_ms"] for r in rows
                       if r["mode"] == mode and r["provider"] == "reference")
        for r in rows:
            if r["mode"] == mode:
                r["speedup_vs_reference"] = ref_med / r["median_ms"]
    return rows


# New columns go at the end: common.append_csv then extends a file of the earlier columns.
COLUMNS = ["timestamp", "git_rev", "machine", "cores", "threads", "torch", "load1", "op",
           "config", "provider", "backend", "mode", "median_ms", "p20_ms", "p80_ms", "metric",
           "throughput", "speedup_vs_reference", "device", "dtype"]
TABLE = [("config", "config", ""), ("dtype", "dtype", ""), ("mode", "mode", ""),
         ("provider", "provider", ""),
         ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"),
         ("throughput", "rate", ".2f"), ("metric", "unit", ""),
         ("speedup_vs_reference", "x faster than ref", ".2f")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", choices=OPS, help="run only this op (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 2 timed calls")
    p.add_argument("--warmup", type=int, help="untimed calls (default 3)")
    p.add_argument("--repeats", type=int, help="timed calls (default 20)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 with --quick)")
    p.add_argument("--csv", type=Path, default=RESULTS / "ops.csv")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the ops run (default cpu); cuda: GPU shapes, CUDA events")
    args = p.parse_args(argv)
    require_device(args.device)
    settle_run_args(p, args, warmup=(3, 1), repeats=(20, 2))
    meta = run_metadata(args.device)
    provs = providers(args.device)
    print(f"{meta['machine']}, {meta['cores']} cores, {meta['threads']} threads, torch "
          f"{meta['torch']}, git {meta['git_rev']}; providers: {', '.join(provs)}")
    total = 0
    for op in args.op or OPS:
        rows = []
        shapes = gpu_cases if args.device == "cuda" else cases
        for dtype in dtypes(op, args.device):
            for case in shapes(op, args.quick):
                rows += bench_case(to_device(case, args.device, dtype), provs, args, meta)
        append_csv(args.csv, COLUMNS, rows)
        total += len(rows)
        print(f"\n{op} ({args.warmup} warm-up + {args.repeats} timed calls)")
        print_table(rows, TABLE)
    print(f"\nappended {total} rows to {args.csv}")


if __name__ == "__main__":
    main()
