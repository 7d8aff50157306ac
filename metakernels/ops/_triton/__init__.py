"""Triton kernels of the ops, one module per op (``fwd``/``bwd`` or the op's own function with
exactly the contract of the op's torch backend). Imported lazily by the dispatch in
``metakernels.ops``; on a machine without a GPU they run on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before this package is imported).

Conventions shared by the kernels:
- every tensor is passed with all its strides (views of the flat bank buffers are common);
  row offsets are widened to int64 before they are multiplied by a stride;
- task segments come from ``TaskLayout.offsets_tensor`` (int32 [T+1]); a program whose task
  segment is empty returns before touching memory;
- every sum accumulates in fp32. Matrix products (``tl.dot``, in ``multi_lora_linear`` only)
  take their operands in the activations' dtype: bf16/fp16 on the tensor cores, fp32 with
  ``input_precision="ieee"`` (no TF32, so fp32 matches cuBLAS fp32); tiles are at least 16
  wide (small ranks are padded with masks);
- block sizes come from fixed per-module tables, so that ``tests/test_triton_compile.py`` can
  compile every variant a launch can ask for (``launch_configs()`` in each module);
- every host launcher is decorated with ``launcher``: triton launches on the *current* CUDA
  device, whatever device the pointers are on, so the launch runs with the tensors' device made
  current (``trainer.device=cuda:1`` in a process whose current device is 0).
"""
import contextlib
import functools
import os
from typing import NamedTuple

import torch


class LaunchConfig(NamedTuple):
    """One compiled variant a launcher can ask for: a name, the ``@triton.jit`` kernel, the
    dtypes of its pointer arguments (``"*fp32"`` unless named here), its constexprs, the
    launch's num_warps and num_stages, and ``unit``: for each kind of launch (a label), the
    integer arguments that are 1 when the tensors are contiguous. A launch specialises an
    integer argument equal to 1 into a constant and one divisible by 16 into an aligned value,
    which changes vectorisation and shared memory, so the compile test builds those variants
    too."""
    name: str
    kernel: object
    ptr_types: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    unit: dict = {}


def device_context(device: torch.device):
    """The context a launch runs in: ``device`` made the current CUDA device (the launch then
    uses that device's stream and context); nothing for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launcher(fn):
    """Runs the host launcher ``fn`` under ``device_context`` of its first tensor argument
    (looked up at call time, so that a test can watch it)."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with device_context(first.device):
            return fn(*args, **kwargs)
    guarded.device_guarded = True
    return guarded


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as _interpreter

    def _bf16_rne(x: np.ndarray) -> np.ndarray:
        """fp32 -> bf16 bits, rounded to nearest even as the GPU's ``cvt.rn.bf16.f32`` does."""
        x = np.asarray(x, dtype=np.float32)
        bits = x.view(np.uint32)
        with np.errstate(over="ignore"):  # only NaNs wrap, and they are replaced below
            out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # a quiet NaN, sign kept
        return out

    def _fix_interpreter_bf16() -> None:
        """Two places where the interpreter's bf16 is not the GPU's (triton 3.x stores bf16 as
        uint16): ``tl.dot`` multiplies the uint16 bit patterns (triton-lang/triton#11584, not
        supported upstream), and fp32 -> bf16 casts truncate where the GPU rounds to nearest
        even. The dot gets its bf16 operands as fp32 (bf16 x bf16 products are exact in fp32:
        what the tensor cores compute) and the cast rounds to nearest even, so the CPU tests see
        the GPU's numerics."""
        builder = _interpreter.InterpreterBuilder
        if getattr(builder.create_dot, "_bf16_as_fp32", False):
            return
        create_dot, cast_impl = builder.create_dot, builder.cast_impl
        handle = _interpreter.TensorHandle

        def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            def widen(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h
                data = _interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None)
                return handle(data.view(np.float32), tl.float32)
            return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

        def cast(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return handle(_bf16_rne(src.data), tl.bfloat16)
            return cast_impl(self, src, dst_type)
        dot._bf16_as_fp32 = True
        builder.create_dot, builder.cast_impl = dot, cast

    _fix_interpreter_bf16()
