"""Fake (meta) implementations of the ``torch.ops.metakernels.*`` CPU kernels.

They give the shapes and dtypes of the outputs without computing anything, which is what
FakeTensor tracing (``torch.compile``, ``torch.export``) and ``torch.library.opcheck`` need. The
schemas are in ``python/bindings.cpp``; ``metakernels.backend`` imports this module right after
the extension, and the extension names it (``set_python_module``) so that FakeTensor imports it
on first use otherwise. Data-dependent checks (offsets values, label ranges) are left to the
kernels.
"""
from __future__ import annotations

import torch


@torch.library.register_fake("metakernels::multi_lora_linear_fwd")
def _multi_lora_linear_fwd(x, W, b, A, B, offsets, scale, onednn=False, per_task=True):
    torch._check(x.dim() == 2 and A.dim() == 3 and B.dim() == 3,
                 lambda: "multi_lora_linear_fwd: x must be [N, in], A [T, in, r], B [T, r, out]")
    N, r, out = x.shape[0], A.shape[2], B.shape[2]
    return x.new_empty(N, out), A.new_empty(N, r)


@torch.library.register_fake("metakernels::multi_lora_linear_bwd")
def _multi_lora_linear_bwd(dy, x, W, A, B, xa, offsets, scale, dA, dB, need_dx, onednn=False,
                           per_task=True):
    if need_dx:
        return x.new_empty(x.shape)
    return x.new_empty(0)


def _task_stats(fast):
    T = fast.shape[0]
    return fast.new_empty(T, dtype=torch.float32), fast.new_empty(T, dtype=torch.bool)


@torch.library.register_fake("metakernels::fused_sgd_")
def _fused_sgd_(fast, grad, lr, max_grad_norm, weight_decay):
    return _task_stats(fast)


@torch.library.register_fake("metakernels::fused_adam_")
def _fused_adam_(fast, grad, exp_avg, exp_avg_sq, step, lr, max_grad_norm, beta1, beta2, eps,
                 weight_decay):
    return _task_stats(fast)


@torch.library.register_fake("metakernels::meta_reduce")
def _meta_reduce(x, weights, theta, kind):
    return x.new_empty(x.shape[1])


@torch.library.register_fake("metakernels::segment_cross_entropy_fwd")
def _segment_cross_entropy_fwd(h, W, labels, offsets, chunk_size, onednn=False):
    T = offsets.shape[0] - 1
    return h.new_empty(T, dtype=torch.float32), h.new_empty(h.shape)


@torch.library.register_fake("metakernels::rotary_fwd")
def _rotary_fwd(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("metakernels::rotary_bwd")
def _rotary_bwd(dy, cos, sin):
    return torch.empty_like(dy)


@torch.library.register_fake("metakernels::rms_norm_fwd")
def _rms_norm_fwd(x, weight, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


@torch.library.register_fake("metakernels::rms_norm_bwd")
def _rms_norm_bwd(dy, x, weight, rstd, x_is_output=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("metakernels::swiglu_fwd")
def _swiglu_fwd(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("metakernels::swiglu_bwd")
def _swiglu_bwd(dy, gate, up):
    like = torch.empty_like(gate, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


@torch.library.register_fake("metakernels::attention_fwd")
def _attention_fwd(q, k, v, mask, causal, scale):
    B, H, Lq, D = q.shape
    return q.new_empty(B, Lq, H, D).transpose(1, 2), q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.register_fake("metakernels::attention_bwd")
def _attention_bwd(dout, q, k, v, out, lse, mask, causal, scale):
    B, H, Lq, D = q.shape
    return q.new_empty(B, Lq, H, D).transpose(1, 2), torch.empty_like(k), torch.empty_like(v)
