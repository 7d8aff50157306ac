"""Backend choice and the dispatch table, in one place.

``torch``  plain PyTorch: the reference, differentiable twice, runs anywhere.
``cpu``    the C++ kernels of ``csrc/``, registered as ``torch.ops.metakernels.*``.
``triton`` the Triton kernels (GPU; on the CPU only under ``TRITON_INTERPRET=1``).

Automatic choice by device: ``cuda`` -> triton, ``cpu`` -> cpu; an unavailable automatic
choice falls back to ``torch`` with one warning. ``METAKERNELS_BACKEND=torch|cpu|triton``,
``configure(backend=...)`` or ``use_backend`` forces a backend; a forced backend that cannot
run raises.

``KERNELS`` maps (op, backend) to the implementation every op dispatches to. Where it has no
entry for an op under the backend in use (the layer ops under ``torch``, a dtype the kernels do
not take), the op runs its torch form.

Kernel choices (``CHOICES``): besides the backend, the cpu backend's frozen fp32 GEMM library
(``gemm``: ``metakernels.gemm``) and how ``multi_lora_linear``'s cpu kernels run the LoRA
products (``lora_products``: ``per_task``, one task per thread at a time where the CPU has
AVX-512 and the tasks share the threads evenly, else batched GEMMs; ``batched``: batched GEMMs
always), and whether the layer ops (RMSNorm, SwiGLU, rotary, attention) run their kernels
(``layer_kernels``: ``on``; ``off``: their torch forms on every backend, as a benchmark's
ablation). Each is set for the process by ``configure`` and inside a block by ``use``; a scope
wins over ``configure``, which wins over the environment variable where the choice has one.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings
from typing import Callable

import torch

BACKENDS = ("torch", "cpu", "triton")
ENV_VAR = "METAKERNELS_BACKEND"

# name -> (values, environment variable or None); "auto" (None) is the automatic choice
CHOICES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "backend": (BACKENDS, ENV_VAR),
    "gemm": (("onednn", "blas"), "METAKERNELS_GEMM"),
    "lora_products": (("per_task", "batched"), None),
    "layer_kernels": (("on", "off"), None),
}

_scoped: dict[str, list[str]] = {name: [] for name in CHOICES}
_configured: dict[str, str] = {}
_warned: set[str] = set()

# (op, backend) -> "module:attribute", imported on first use (the Triton kernels import triton)
KERNELS: dict[tuple[str, str], str] = {
    ("multi_lora_linear.fwd", "torch"): "metakernels.ops.multi_lora_linear:_torch_fwd",
    ("multi_lora_linear.bwd", "torch"): "metakernels.ops.multi_lora_linear:_torch_bwd",
    ("multi_lora_linear.fwd", "cpu"): "metakernels.ops.multi_lora_linear:_cpu_fwd",
    ("multi_lora_linear.bwd", "cpu"): "metakernels.ops.multi_lora_linear:_cpu_bwd",
    ("multi_lora_linear.fwd", "triton"): "metakernels.ops._triton.multi_lora_linear:fwd",
    ("multi_lora_linear.bwd", "triton"): "metakernels.ops._triton.multi_lora_linear:bwd",
    ("segment_cross_entropy.fwd", "cpu"): "metakernels.ops.segment_cross_entropy:_cpu_fwd",
    ("segment_cross_entropy.fwd", "triton"):
        "metakernels.ops._triton.segment_cross_entropy:fwd",
    ("fused_update", "torch"): "metakernels.ops.fused_update:fused_update_ref",
    ("fused_update", "cpu"): "metakernels.ops.fused_update:_cpu_update",
    ("fused_update", "triton"): "metakernels.ops._triton.fused_update:fused_update",
    ("meta_reduce", "torch"): "metakernels.ops.meta_reduce:meta_reduce_ref",
    ("meta_reduce", "cpu"): "metakernels.ops.meta_reduce:_cpu_reduce",
    ("meta_reduce", "triton"): "metakernels.ops._triton.meta_reduce:meta_reduce",
    ("rms_norm.fwd", "cpu"): "torch.ops.metakernels:rms_norm_fwd",
    ("rms_norm.bwd", "cpu"): "torch.ops.metakernels:rms_norm_bwd",
    ("rms_norm.fwd", "triton"): "metakernels.ops._triton.rms_norm:rms_norm_fwd",
    ("rms_norm.bwd", "triton"): "metakernels.ops._triton.rms_norm:rms_norm_bwd",
    ("swiglu.fwd", "cpu"): "torch.ops.metakernels:swiglu_fwd",
    ("swiglu.bwd", "cpu"): "torch.ops.metakernels:swiglu_bwd",
    ("swiglu.fwd", "triton"): "metakernels.ops._triton.swiglu:swiglu_fwd",
    ("swiglu.bwd", "triton"): "metakernels.ops._triton.swiglu:swiglu_bwd",
    ("rotary.fwd", "cpu"): "torch.ops.metakernels:rotary_fwd",
    ("rotary.bwd", "cpu"): "torch.ops.metakernels:rotary_bwd",
    ("rotary.fwd", "triton"): "metakernels.ops._triton.rotary:rotary_fwd",
    ("rotary.bwd", "triton"): "metakernels.ops._triton.rotary:rotary_bwd",
    ("attention.fwd", "cpu"): "torch.ops.metakernels:attention_fwd",
    ("attention.bwd", "cpu"): "torch.ops.metakernels:attention_bwd",
}


def kernel(op: str, name: str) -> Callable:
    """The implementation of ``op`` under backend ``name`` (``KERNELS``), looked up at every
    call (a module attribute replaced at run time, as a benchmark's ablation does, takes
    effect)."""
    try:
        spec = KERNELS[(op, name)]
    except KeyError:
        raise KeyError(f"no {name} kernel for {op}") from None
    module, attr = spec.split(":")
    if module == "torch.ops.metakernels":
        _load_cpu_extension()
        return getattr(torch.ops.metakernels, attr)
    mod = sys.modules.get(module) or importlib.import_module(module)
    return getattr(mod, attr)


def has_kernel(op: str, name: str) -> bool:
    return (op, name) in KERNELS


@functools.lru_cache(maxsize=None)
def _load_cpu_extension() -> str | None:
    """Imports the compiled extension; returns the reason it is unavailable, or None."""
    if os.environ.get("METAKERNELS_NO_EXTENSION", "0") == "1":
        return "METAKERNELS_NO_EXTENSION=1"
    try:
        from . import _C  # noqa: F401  (registers torch.ops.metakernels.*)
    except ImportError as e:
        return f"metakernels._C could not be imported ({e})"
    from .ops import _fake  # noqa: F401  (their fake implementations, for torch.compile)
    return None


def cpu_available() -> bool:
    return _load_cpu_extension() is None


@functools.lru_cache(maxsize=None)
def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | None = None) -> bool:
    if _triton_reason() is not None:
        return False
    if device is not None and device.type == "cpu":
        return triton_interpreted()
    return torch.cuda.is_available() or triton_interpreted()


def available(name: str, device: torch.device | None = None) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return cpu_available() and (device is None or device.type == "cpu")
    if name == "triton":
        return triton_available(device)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def _why_unavailable(name: str, device: torch.device | None) -> str:
    if name == "cpu":
        reason = _load_cpu_extension()
        if reason is None and device is not None:
            reason = f"tensors are on {device}, the cpu backend takes CPU tensors"
        return reason or "unknown"
    if name == "triton":
        reason = _triton_reason()
        if reason is None:
            reason = ("no CUDA device and TRITON_INTERPRET is not 1" if device is None or
                      device.type != "cpu" else "tensors are on the CPU and TRITON_INTERPRET is not 1")
        return reason
    return "unknown"


def choice(name: str) -> str | None:
    """The value of kernel choice ``name`` in force (a scope of ``use``, then ``configure``,
    then the environment), or None for the automatic one."""
    if _scoped[name]:
        return _scoped[name][-1]
    if name in _configured:
        return _configured[name]
    env = CHOICES[name][1]
    return (os.environ.get(env, "").strip() or None) if env else None


def configure(**choices: str | None) -> None:
    """Sets kernel choices for the process, e.g. ``configure(backend="cpu", gemm="blas")``;
    ``"auto"`` returns a choice to the environment's or the automatic one, None leaves it."""
    for name, value in choices.items():
        if name not in CHOICES:
            raise ValueError(f"unknown kernel choice {name!r}; choose from {tuple(CHOICES)}")
        if value is None:
            continue
        if value == "auto":
            _configured.pop(name, None)
            continue
        values = CHOICES[name][0]
        if value not in values:
            raise ValueError(f"unknown {name} {value!r}; choose one of {('auto', *values)}")
        _configured[name] = value


def use(name: str, value: str):
    """Forces kernel choice ``name`` to ``value`` inside the block."""
    return override_scope(_scoped[name], value, CHOICES[name][0], name)


def forced() -> str | None:
    """The backend forced by ``use_backend``, ``configure`` or the environment, if any."""
    return choice("backend")


def lora_per_task() -> bool:
    """Whether ``multi_lora_linear``'s cpu kernels may run the LoRA products per task."""
    return choice("lora_products") != "batched"


def resolve(device: torch.device | str | None = None) -> str:
    """The backend the ops use for tensors on ``device``."""
    device = torch.device(device) if device is not None else None
    name = forced()
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {BACKENDS}")
        if not available(name, device):
            raise RuntimeError(f"backend {name!r} was forced but cannot run: "
                               f"{_why_unavailable(name, device)}")
        return name
    want = "triton" if device is not None and device.type == "cuda" else "cpu"
    if available(want, device):
        return want
    if want not in _warned:
        _warned.add(want)
        warnings.warn(f"metakernels: the {want} backend is unavailable "
                      f"({_why_unavailable(want, device)}); using the plain-PyTorch reference",
                      RuntimeWarning, stacklevel=3)
    return "torch"


@contextlib.contextmanager
def override_scope(stack: list[str], name: str, choices: tuple[str, ...], what: str):
    """Pushes ``name`` (one of ``choices``) onto an override ``stack`` for the block."""
    if name not in choices:
        raise ValueError(f"unknown {what} {name!r}; choose one of {choices}")
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def use_backend(name: str):
    """Forces ``name`` inside the block (raises on use if it cannot run)."""
    return use("backend", name)


def record(op: str, phase: str):
    """A profiler label ``metakernels::<op>.<phase>`` around an op's forward or backward: the
    names benchmarks and profiles find each op by. Without an active profiler, a null context
    (entering a ``record_function`` costs a dispatcher call even then)."""
    if not torch._C._autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"metakernels::{op}.{phase}")
