"""Which library runs the frozen base's fp32 GEMMs under the cpu backend, and a frozen linear
layer that uses it.

``onednn``  oneDNN's fp32 matmul (``torch.ops.mkldnn._linear_pointwise``, the weight in its plain
            layout, no packed copy); the default where PyTorch is built with oneDNN.
``blas``    ATen's ``mm`` (MKL's sgemm in PyTorch's x86 builds).

Why: MKL runs its AVX2 code on AMD processors even where they have AVX-512, while oneDNN picks
its kernels by the instruction sets the CPU reports (``python3 bench/ops.py --op
multi_lora_linear`` compares the providers ``cpu`` and ``cpu-blas``; docs/performance.md has the
rates). Both compute in fp32 (no reduced-precision mode); their results differ by rounding (sums
in another order).

The choice applies to float32 CPU tensors under the cpu backend (``metakernels.backend``): the
base GEMMs of ``multi_lora_linear``, the output layer in ``segment_cross_entropy`` and the frozen
``nn.Linear`` layers that ``metakernels.fused.apply_fused_layers`` switches to ``frozen_linear``.
The torch backend (the reference) always runs ATen's GEMMs. It is the kernel choice ``gemm`` of
``metakernels.backend``: ``METAKERNELS_GEMM=onednn|blas``, ``backend.configure(gemm=...)`` or
``use_gemm`` inside a block forces one library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend

GEMMS = backend.CHOICES["gemm"][0]
ENV_VAR = backend.CHOICES["gemm"][1]


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def gemm_library() -> str:
    """The library the cpu backend's frozen fp32 GEMMs run on (see the module docstring)."""
    name = backend.choice("gemm")
    if name is None:
        return "onednn" if onednn_available() else "blas"
    if name not in GEMMS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a GEMM library; choose one of {GEMMS}")
    if name == "onednn" and not onednn_available():
        raise RuntimeError(f"{ENV_VAR}=onednn was forced, but this PyTorch build has no oneDNN "
                           f"(torch.backends.mkldnn.is_available() is False)")
    return name


def use_gemm(name: str):
    """Forces GEMM library ``name`` inside the block."""
    return backend.override_scope(backend._scoped["gemm"], name, GEMMS, "GEMM library")


def use_onednn(*tensors: torch.Tensor) -> bool:
    """Whether the frozen GEMMs of these tensors run on oneDNN: float32 CPU tensors under the cpu
    backend, with ``onednn`` the library in use."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and backend.resolve(tensors[0].device) == "cpu" and gemm_library() == "onednn")


def onednn_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b`` by oneDNN (fp32; ``W`` [out, in] of any strides, ``x`` [..., in])."""
    return torch.ops.mkldnn._linear_pointwise(x, W, b, "none", [], "")


class _FrozenLinearFn(torch.autograd.Function):
    """``x @ W.T + b`` on oneDNN with W and b frozen: keeps W (no copy of x), dx = dy @ W."""

    @staticmethod
    def forward(ctx, x, W, b):
        with torch.profiler.record_function("metakernels::frozen_linear.forward"):
            ctx.save_for_backward(W)
            return onednn_linear(x, W, b)

    @staticmethod
    def backward(ctx, dy):
        with torch.profiler.record_function("metakernels::frozen_linear.backward"):
            (W,) = ctx.saved_tensors
            if not ctx.needs_input_grad[0]:
                return None, None, None
            if torch.is_grad_enabled():   # a double backward: differentiable ops
                return dy @ W, None, None
            return onednn_linear(dy, W.t()), None, None


def frozen_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, b)``; on oneDNN where ``use_onednn`` says so and neither W nor b
    requires grad (no weight gradient is computed then)."""
    frozen = not W.requires_grad and (b is None or not b.requires_grad)
    if frozen and x.numel() > 0 and use_onednn(x, W, *(() if b is None else (b,))):
        return _FrozenLinearFn.apply(x, W, b)
    return F.linear(x, W, b)
