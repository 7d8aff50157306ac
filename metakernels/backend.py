"""Backend choice, in one place.

``torch``  plain PyTorch: the reference, differentiable twice, runs anywhere.
``cpu``    the C++ kernels of ``csrc/``, registered as ``torch.ops.metakernels.*``.
``triton`` the Triton kernels (GPU; on the CPU only under ``TRITON_INTERPRET=1``).

Automatic choice by device: ``cuda`` -> triton, ``cpu`` -> cpu; an unavailable automatic
choice falls back to ``torch`` with one warning. ``METAKERNELS_BACKEND=torch|cpu|triton``
forces a backend; a forced backend that cannot run raises.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

BACKENDS = ("torch", "cpu", "triton")
ENV_VAR = "METAKERNELS_BACKEND"

_override: list[str] = []
_warned: set[str] = set()


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


def forced() -> str | None:
    """The backend forced by ``use_backend`` or the environment, if any."""
    if _override:
        return _override[-1]
    name = os.environ.get(ENV_VAR, "").strip()
    return name or None


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
    return override_scope(_override, name, BACKENDS, "backend")
