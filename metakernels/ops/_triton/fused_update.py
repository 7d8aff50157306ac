"""Triton kernels of ``fused_update``: per-task clip + SGD/Adam(W) over the whole [T, P] bank.

Semantics (PyTorch pseudo-code, for every task t; ``g = grad[t]``)::

    norm[t] = ||g||_2;  finite[t] = isfinite(norm[t])
    if not finite[t]: continue                   # fast[t] and its Adam state are not written
    coef = min(1, max_grad_norm / (norm[t] + 1e-6)) if max_grad_norm > 0 else 1
    g = coef * g
    sgd:   g = g + weight_decay * fast[t];  fast[t] -= lr[t] * g
    adam:  step[t] += 1
           fast[t] *= 1 - lr[t] * weight_decay
           m[t] = beta1 m[t] + (1 - beta1) g;  v[t] = beta2 v[t] + (1 - beta2) g^2
           fast[t] -= lr[t] / (1 - beta1^step) * m[t] / (sqrt(v[t]) / sqrt(1 - beta2^step) + eps)
                                                  # bias corrections in fp64, then fp32

Three launches, deterministic (no atomics): per-(task, block) sums of squares, per-task norm /
finiteness / clip coefficient, then one elementwise pass that reads and writes every element
once. There are no gradients: the update runs under ``torch.no_grad``.
``fused_update`` has exactly the semantics of ``fused_update_ref`` in
``metakernels/ops/fused_update.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import LaunchConfig, launcher

_BLOCK_P = 1024
_NORM_BLOCK = 1024  # per-block partial sums reduced per task, in steps of this many
_EPS_CLIP = 1e-6


@triton.jit
def _sumsq_partial_kernel(grad_ptr, partial_ptr, P, stride_gt, stride_gp, stride_pt,
                          BLOCK: tl.constexpr):
    """``partial[t, b] = sum(grad[t, b*BLOCK:(b+1)*BLOCK] ** 2)`` in fp32.
    Grid: (cdiv(P, BLOCK), T)."""
    pid_p = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    cols = pid_p * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(grad_ptr + t * stride_gt + cols * stride_gp, mask=cols < P, other=0.0)
    g = g.to(tl.float32)
    tl.store(partial_ptr + t * stride_pt + pid_p, tl.sum(g * g, axis=0))


@triton.jit
def _task_norm_kernel(partial_ptr, norm_ptr, finite_ptr, coef_ptr, NB, stride_pt, max_norm,
                      eps_clip, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """Per task: ``norm = sqrt(sum(partial[t]))``, ``finite = isfinite(norm)``,
    ``coef = min(1, max_norm / (norm + eps_clip))`` (1 without clipping, 0 if not finite).
    Grid: (T,)."""
    t = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b0 in range(0, NB, BLOCK):
        bs = b0 + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + t.to(tl.int64) * stride_pt + bs, mask=bs < NB, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    finite = (norm == norm) & (norm < float("inf"))  # NaN != NaN; +Inf is the other case
    if CLIP:
        coef = tl.minimum(max_norm / (norm + eps_clip), 1.0)
    else:
        coef = 1.0
    tl.store(norm_ptr + t, norm)
    tl.store(finite_ptr + t, finite.to(tl.int8))
    tl.store(coef_ptr + t, tl.where(finite, coef, 0.0))


@triton.jit
def _load_task_block(fast_ptr, grad_ptr, coef_ptr, P, stride_ft, stride_fp, stride_gt, stride_gp,
                     BLOCK: tl.constexpr):
    """The block of a task's row that this program updates (grid (cdiv(P, BLOCK), T)): the task
    t, also in int64 (t * stride overflows int32 on large banks), the columns and their mask, the
    fast-weight pointers and values, and the clipped gradient."""
    t = tl.program_id(1)
    t64 = t.to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    f_ptrs = fast_ptr + t64 * stride_ft + cols * stride_fp
    w = tl.load(f_ptrs, mask=mask, other=0.0)
    g = tl.load(grad_ptr + t64 * stride_gt + cols * stride_gp, mask=mask, other=0.0)
    return t, t64, cols, mask, f_ptrs, w, g * tl.load(coef_ptr + t)


@triton.jit
def _sgd_kernel(fast_ptr, grad_ptr, lr_ptr, finite_ptr, coef_ptr, P, weight_decay,
                stride_ft, stride_fp, stride_gt, stride_gp,
                WEIGHT_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    """``fast[t] -= lr[t] * (coef[t] * grad[t] + weight_decay * fast[t])`` where finite[t].
    Grid: (cdiv(P, BLOCK), T)."""
    if tl.load(finite_ptr + tl.program_id(1)) == 0:
        return
    t, t64, cols, mask, f_ptrs, w, g = _load_task_block(
        fast_ptr, grad_ptr, coef_ptr, P, stride_ft, stride_fp, stride_gt, stride_gp, BLOCK)
    if WEIGHT_DECAY:
        g = g + weight_decay * w
    tl.store(f_ptrs, w - tl.load(lr_ptr + t) * g, mask=mask)


@triton.jit
def _adam_kernel(fast_ptr, grad_ptr, m_ptr, v_ptr, lr_ptr, step_size_ptr, sqrt_bc2_ptr, finite_ptr,
                 coef_ptr, P, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                 stride_ft, stride_fp, stride_gt, stride_gp, stride_mt, stride_mp,
                 stride_vt, stride_vp,
                 WEIGHT_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    """One Adam(W) step of task t where finite[t]; ``step_size[t] = lr[t] / (1 - beta1^step)``
    and ``sqrt_bc2[t] = sqrt(1 - beta2^step)`` at the new step (see the module docstring).
    Grid: (cdiv(P, BLOCK), T)."""
    if tl.load(finite_ptr + tl.program_id(1)) == 0:
        return
    t, t64, cols, mask, f_ptrs, w, g = _load_task_block(
        fast_ptr, grad_ptr, coef_ptr, P, stride_ft, stride_fp, stride_gt, stride_gp, BLOCK)
    m_ptrs = m_ptr + t64 * stride_mt + cols * stride_mp
    v_ptrs = v_ptr + t64 * stride_vt + cols * stride_vp
    m = tl.load(m_ptrs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * g
    v = tl.load(v_ptrs, mask=mask, other=0.0) * beta2 + one_minus_beta2 * g * g
    lr = tl.load(lr_ptr + t)
    if WEIGHT_DECAY:
        w = w * (1.0 - lr * weight_decay)
    denom = tl.sqrt_rn(v) / tl.load(sqrt_bc2_ptr + t) + eps
    w = w - tl.load(step_size_ptr + t) * m / denom
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    tl.store(f_ptrs, w, mask=mask)


def launch_configs():
    """Every (kernel, pointer dtypes, constexprs) ``fused_update`` can launch: all fp32 but the
    int8 finiteness flags; the two flags of each kernel both ways. The [T, P] buffers are
    contiguous (the op checks), so their column strides are 1."""
    flags = {"finite_ptr": "*i8"}
    bank = {"bank": ("stride_fp", "stride_gp")}
    yield LaunchConfig("sumsq_partial", _sumsq_partial_kernel, {}, dict(BLOCK=_BLOCK_P),
                       unit={"bank": ("stride_gp",)})
    for on in (False, True):
        yield LaunchConfig(f"task_norm-clip{int(on)}", _task_norm_kernel, flags,
                           dict(CLIP=on, BLOCK=_NORM_BLOCK))
        yield LaunchConfig(f"sgd-wd{int(on)}", _sgd_kernel, flags,
                           dict(WEIGHT_DECAY=on, BLOCK=_BLOCK_P), unit=bank)
        yield LaunchConfig(f"adam-wd{int(on)}", _adam_kernel, flags,
                           dict(WEIGHT_DECAY=on, BLOCK=_BLOCK_P),
                           unit={"bank": bank["bank"] + ("stride_mp", "stride_vp")})


@launcher
def fused_update(fast, grad, lr, *, optimizer, state, max_grad_norm, betas, eps, weight_decay):
    """Updates every task's fast weights (and the Adam state) in place.

    Args:
        fast: [T, P] fp32, updated in place. grad: [T, P] fp32, read only. lr: [T] fp32.
        optimizer: ``"sgd"`` or ``"adam"``; state: ``AdamState`` (exp_avg, exp_avg_sq [T, P],
            step [T]) for adam, updated in place; None for sgd.
        max_grad_norm: per-task clip threshold, 0 disables. betas, eps, weight_decay: floats.
    Returns:
        (norms [T] fp32 before clipping, finite [T] bool).
    """
    T, P = fast.shape
    dev = fast.device
    NB = max(triton.cdiv(P, _BLOCK_P), 1)  # P == 0 still gets a (zero) norm per task
    partial = torch.empty(T, NB, dtype=torch.float32, device=dev)
    norms = torch.empty(T, dtype=torch.float32, device=dev)
    finite = torch.empty(T, dtype=torch.int8, device=dev)
    coef = torch.empty(T, dtype=torch.float32, device=dev)
    lr = lr.contiguous()
    _sumsq_partial_kernel[(NB, T)](grad, partial, P, grad.stride(0), grad.stride(1),
                                   partial.stride(0), BLOCK=_BLOCK_P)
    _task_norm_kernel[(T,)](partial, norms, finite, coef, NB, partial.stride(0),
                            float(max_grad_norm), _EPS_CLIP, CLIP=max_grad_norm > 0,
                            BLOCK=_NORM_BLOCK)
    if optimizer == "sgd":
        _sgd_kernel[(NB, T)](fast, grad, lr, finite, coef, P, float(weight_decay),
                             fast.stride(0), fast.stride(1), grad.stride(0), grad.stride(1),
                             WEIGHT_DECAY=weight_decay != 0, BLOCK=_BLOCK_P)
        return norms, finite.view(torch.bool)
    b1, b2 = float(betas[0]), float(betas[1])
    # [T]-sized per-task scalars at the new step (only read for finite tasks, whose step becomes
    # step + 1), the bias corrections in fp64 as the reference and the C++ kernel take them:
    # 1 - 0.999**step in fp32 cancels to a relative error of about 1e-5.
    new_step = (state.step + 1).double()
    step_size = (lr.double() / (1 - b1 ** new_step)).float()
    sqrt_bc2 = (1 - b2 ** new_step).sqrt().float()
    m, v = state.exp_avg, state.exp_avg_sq
    _adam_kernel[(NB, T)](fast, grad, m, v, lr, step_size, sqrt_bc2, finite, coef, P, b1, b2,
                          1 - b1, 1 - b2, float(eps), float(weight_decay),
                          fast.stride(0), fast.stride(1), grad.stride(0), grad.stride(1),
                          m.stride(0), m.stride(1), v.stride(0), v.stride(1),
                          WEIGHT_DECAY=weight_decay != 0, BLOCK=_BLOCK_P)
    finite = finite.view(torch.bool)
    state.step.add_(finite.to(state.step.dtype))
    return norms, finite
