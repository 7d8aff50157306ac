"""Input checks shared by the ops: every message names the argument, its shape and dtype."""
from __future__ import annotations

import torch

from .. import backend as _backend
from ..layout import TaskLayout

# float64 for precision checks on the reference backend; the kernels take fp32/bf16/fp16
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=None,
                 shape: tuple | None = None, device: torch.device | None = None) -> None:
    """Raises ValueError/TypeError naming ``op`` and ``name`` when ``t`` is not as required.
    ``shape`` entries that are None are not checked."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, "
                        f"got {describe(t)}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{op}: {name} must have shape {want}, got {describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")


def check_layout(op: str, layout, num_rows: int, num_tasks: int | None = None) -> None:
    if not isinstance(layout, TaskLayout):
        raise TypeError(f"{op}: layout must be a metakernels.TaskLayout, got {type(layout).__name__}")
    if layout.num_rows != num_rows:
        raise ValueError(f"{op}: layout covers {layout.num_rows} rows (offsets[-1]) but the input "
                         f"has {num_rows} rows")
    if num_tasks is not None and layout.num_tasks != num_tasks:
        raise ValueError(f"{op}: layout has {layout.num_tasks} tasks but the adapters have "
                         f"{num_tasks}")


# the dtypes the layer ops' kernels take (bf16 computed in fp32 and rounded once)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernel_backend(op: str, *tensors: torch.Tensor) -> str | None:
    """The backend whose kernel ``op`` (a ``backend.KERNELS`` name such as ``"rms_norm.fwd"``)
    runs these tensors: fp32 or bf16 on one device, under the backend in use there, which has
    that kernel, with the kernel choice ``layer_kernels`` on; None: the op's torch form runs."""
    device = tensors[0].device
    if not all(t.device == device and t.dtype in KERNEL_DTYPES for t in tensors):
        return None
    if _backend.choice("layer_kernels") == "off":
        return None
    name = _backend.resolve(device)
    return name if name != "torch" and _backend.has_kernel(op, name) else None


def record(op: str, phase: str):
    """A profiler label ``metakernels::<op>.<phase>`` (a no-op without an active profiler): the
    names benchmarks and profiles find each op's forward and backward by."""
    return torch.profiler.record_function(f"metakernels::{op}.{phase}")
