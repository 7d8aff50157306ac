"""Memory-lean forms of a frozen Llama-family base's non-GEMM layers: RMSNorm, SwiGLU, rotary.

Every task of a meta-batch runs through the base at once, so the activations autograd keeps for
the backward grow with T. The autograd functions here compute the forward as Hugging Face's
modules do and keep only what their backward needs:

- ``rms_norm``: the input and the per-row ``rsqrt`` (``dx = r * (g - xhat * mean(g * xhat))``,
  ``g = dy * w``); under the cpu kernels, the output instead of the input when the weight is
  frozen and has no zero (``xhat = y / w``): the next layer (the q/k/v LoRA, the loss) keeps the
  output anyway, so the norm then keeps nothing of its own;
- ``swiglu``: gate and up; ``silu(gate)``, which ``F.silu(gate) * up`` keeps as well, is
  recomputed in the backward (one [tokens, intermediate] tensor per layer less);
- ``rotary``: nothing of q or k, the map being linear (``cos`` and ``sin`` only).

(Autograd already skips saving the operand of a product whose other factor is frozen, so the
library's RMSNorm and rotary keep about as little; SwiGLU is where memory is saved.) Their torch
forms run the library's operations (bitwise the library's forward) and their backwards are built
from differentiable ops, so second-order MAML (``create_graph=True``) differentiates through
them; fp64 inputs of ``rms_norm`` are computed in fp64 (the library computes in fp32 whatever
the dtype).

Under the cpu backend, float32 tensors take the one-pass C++ kernels of
``csrc/fused_layers.cpp`` (``torch.ops.metakernels.rotary_fwd``/``rotary_bwd``/
``rms_norm_fwd``/``rms_norm_bwd``/``swiglu_fwd``/``swiglu_bwd``), which read their inputs once
instead of once per op. The rotary forward rounds as the op-by-op form does (bitwise); the
RMSNorm and SwiGLU forwards are within an ulp or two of the library's (a row sum and an exp
taken in another order). The backwards of a first-order step (no ``create_graph``) run the
kernels; a double backward runs the torch forms, and raises for a norm that kept its output
(second-order MAML runs the torch backend). Under the triton backend (CUDA tensors; CPU ones
under ``TRITON_INTERPRET=1``) the Triton kernels of ``metakernels/ops/_triton`` (``rms_norm``,
``swiglu``, ``rotary``) take the same place, with the same contract, for float32 and bfloat16.
Everywhere else the torch forms run.

Under the cpu backend a switched attention also routes the library's ``"sdpa"`` attention
function to ``csrc/attention.cpp`` (``torch.ops.metakernels.attention_fwd``/``_bwd``) for fp32
prefills of at most ``ATTENTION_MAX_LEN`` tokens with a causal or boolean mask: blocks of 32
query rows against every key they may see (a causal block stops at its last row's key), with
the softmax, the output and the backward's products of a block done while its scores are in
cache, grouped-query heads without repeating k and v. Everything else (float masks, dropout in
training, longer sequences, other backends) runs the library's SDPA.

``apply_fused_layers(model)`` switches a model's modules to them (Llama, Mistral, Qwen2 and the
like: modules named ``*RMSNorm`` with ``variance_epsilon``, MLPs with ``gate_proj``/``up_proj``/
``down_proj`` and a SiLU, attentions calling their modeling file's ``apply_rotary_pos_emb``);
other models are left as they are, but for their ``nn.Linear`` layers: every model's are
switched to ``metakernels.gemm.frozen_linear``, which under the cpu backend runs a frozen fp32
weight on oneDNN's GEMM (and keeps only the weight for the backward) and is ``F.linear``
otherwise. The switch is per model instance: other models in the process
keep the library's code.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend
from .gemm import frozen_linear


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _cpu_kernels(*tensors: torch.Tensor) -> bool:
    """Whether the C++ kernels of csrc/fused_layers.cpp and csrc/attention.cpp run these
    tensors: float32 or bfloat16 on the CPU (bf16 computed in fp32 and rounded once), with the
    cpu backend in use (built, and not overridden by ``use_backend``/the environment)."""
    return (all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)
            and backend.resolve(tensors[0].device) == "cpu")


def _triton_layer_kernels() -> types.SimpleNamespace:
    """The Triton kernels with the contract of ``torch.ops.metakernels``' layer ops (looked up
    at each call, so that a test can watch them)."""
    from .ops._triton import rms_norm, rotary, swiglu
    return types.SimpleNamespace(
        rms_norm_fwd=rms_norm.rms_norm_fwd, rms_norm_bwd=rms_norm.rms_norm_bwd,
        swiglu_fwd=swiglu.swiglu_fwd, swiglu_bwd=swiglu.swiglu_bwd,
        rotary_fwd=rotary.rotary_fwd, rotary_bwd=rotary.rotary_bwd)


def _triton_kernels(*tensors: torch.Tensor) -> bool:
    """Whether the Triton layer kernels run these tensors: float32 or bfloat16 on one device,
    with the triton backend in use (CUDA tensors; CPU ones under ``TRITON_INTERPRET=1``)."""
    return (all(t.dtype in KERNEL_DTYPES and t.device == tensors[0].device for t in tensors)
            and backend.resolve(tensors[0].device) == "triton")


def _layer_kernels(*tensors: torch.Tensor):
    """The one-pass layer kernels that run these tensors, or None: the C++ ones
    (``torch.ops.metakernels``) under the cpu backend, the Triton ones under the triton
    backend."""
    if _cpu_kernels(*tensors):
        return torch.ops.metakernels
    if _triton_kernels(*tensors):
        return _triton_layer_kernels()
    return None


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------
def _rsqrt_mean_square(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x in the compute dtype (fp32; fp64 for fp64 inputs) and its per-row
    ``rsqrt(mean(x**2) + eps)``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf, torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def nonzero_weight(weight: torch.Tensor) -> bool:
    """Whether ``weight`` has no zero, so that a norm may keep its output instead of its input
    (``xhat = y / weight``). Cached on the tensor per version: a frozen norm weight is checked
    once, not at every call."""
    key = (weight._version, weight.data_ptr())
    cached = getattr(weight, "_metakernels_nonzero", None)
    if cached is None or cached[0] != key:
        cached = (key, bool(torch.all(weight != 0)))
        weight._metakernels_nonzero = cached
    return cached[1]


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's ``LlamaRMSNorm.forward``, except that fp64 inputs are computed in fp64."""
    xf, r = _rsqrt_mean_square(x, eps)
    return weight * (xf * r).to(x.dtype)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.eps = eps
        ctx.x_is_output = False
        kernels = _layer_kernels(x, weight) if x.dtype == weight.dtype else None
        if kernels is not None:
            y, r = kernels.rms_norm_fwd(x, weight, eps)
            # Keep the output, not the input, where the weight allows xhat = y / weight (and is
            # frozen): the next layer (the q/k/v LoRA, the loss) usually keeps y anyway, and x is
            # then freed.
            ctx.x_is_output = not ctx.needs_input_grad[1] and nonzero_weight(weight)
            ctx.kernels = kernels   # the backward from y must run the kernels' own formula
            ctx.save_for_backward(y if ctx.x_is_output else x, weight, r)
            return y
        xf, r = _rsqrt_mean_square(x, eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        if ctx.x_is_output:
            # The kernels' first-order path (second-order MAML runs the torch backend).
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "rms_norm: this RMSNorm ran the first-order kernels, which keep its output "
                    "instead of its input; for a second-order gradient (create_graph=True) run "
                    "it under metakernels.backend.use_backend('torch')")
            return ctx.kernels.rms_norm_bwd(dy, x, weight, r, True), None, None
        kernels = (_layer_kernels(dy, x, weight, r) if dy.dtype == x.dtype == weight.dtype
                   else None)
        if not torch.is_grad_enabled() and not ctx.needs_input_grad[1] and kernels is not None:
            return kernels.rms_norm_bwd(dy, x, weight, r), None, None
        if torch.is_grad_enabled():
            # Double backward: r was computed without a graph in the forward; recompute it from
            # x so that the second derivative sees its dependence on x.
            _, r = _rsqrt_mean_square(x, ctx.eps)
        xhat = x.to(r.dtype) * r
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = (dy * weight).to(r.dtype)
            dx = (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x**2) + eps)`` (in fp32, fp64 for fp64 inputs, cast back),
    saving only x and rsqrt."""
    return _RMSNormFn.apply(x, weight, eps)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------
class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        kernels = _layer_kernels(gate, up) if gate.dtype == up.dtype else None
        if kernels is not None:
            return kernels.swiglu_fwd(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        kernels = (_layer_kernels(dy, gate, up) if dy.dtype == gate.dtype == up.dtype
                   and not torch.is_grad_enabled() else None)
        if kernels is not None:
            dgate, dup = kernels.swiglu_bwd(dy, gate, up)
            return (dgate if ctx.needs_input_grad[0] else None,
                    dup if ctx.needs_input_grad[1] else None)
        dgate = dup = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():          # double backward: differentiable formula
                s = torch.sigmoid(gate)
                dgate = dy * up * s * (1 + gate * (1 - s))
            else:
                dgate = torch.ops.aten.silu_backward(dy * up, gate)
        if ctx.needs_input_grad[1]:
            dup = dy * F.silu(gate)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, saving only gate and up."""
    return _SwiGLUFn.apply(gate, up)


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary map of one of q, k: ``x * cos + rotate_half(x) * sin``."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """The transpose of ``_rotate_half`` (its inverse): ``[a, b] -> [b, -a]``."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], -x[..., :h]), dim=-1)


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        kernels = _rotary_kernels(q, k, cos=cos, sin=sin)
        if kernels is not None:
            return kernels.rotary_fwd(q, k, cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return (_rotary_bwd(dq, cos, sin) if ctx.needs_input_grad[0] else None,
                _rotary_bwd(dk, cos, sin) if ctx.needs_input_grad[1] else None, None, None)


def _rotary_kernels(*xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The rotary kernels that take these [B, H, L, D] tensors (unit last stride), or None."""
    if not (all(x.dim() == 4 and x.stride(-1) == 1 and x.dtype == cos.dtype for x in xs)
            and sin.dtype == cos.dtype):
        return None
    return _layer_kernels(*xs, cos, sin)


def _rotary_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary map's transpose (cos and sin broadcast over heads: dy has q's shape)."""
    kernels = None if torch.is_grad_enabled() else _rotary_kernels(dy, cos=cos, sin=sin)
    if kernels is not None:
        return kernels.rotary_bwd(dy, cos, sin)
    return dy * cos + _rotate_half_t(dy * sin)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb``, keeping only cos and sin for the backward."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad:   # learned positions: plain autograd
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    return _RotaryFn.apply(q, k, cos, sin)


# ---------------------------------------------------------------------------------------------
# Attention (cpu backend, short sequences)
# ---------------------------------------------------------------------------------------------
ATTENTION_MAX_LEN = 256   # a head's K^T and a block's [32, L] scores stay in L2; longer: SDPA


class _AttentionFn(torch.autograd.Function):
    """The kernel computes in fp32; bf16 q, k, v are converted a head at a time inside it and its
    results rounded once (the library's bf16 SDPA on the CPU takes several times as long)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out, lse = torch.ops.metakernels.attention_fwd(q, k, v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():
            raise RuntimeError("attention: the cpu backend's attention kernel has no double "
                               "backward; for a second-order gradient (create_graph=True) run "
                               "under metakernels.backend.use_backend('torch')")
        q, k, v, out, lse, mask = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq, dk, dv = torch.ops.metakernels.attention_bwd(dout, q, k, v, out, lse, mask,
                                                         ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def _attention_kernel_applies(module, q, k, v, mask, dropout, kwargs) -> bool:
    """Whether ``csrc/attention.cpp`` computes what the library's SDPA path would: float32 CPU
    tensors under the cpu backend, a prefill (as many queries as keys) of at most
    ``ATTENTION_MAX_LEN``, no dropout, softcap or position bias, and a mask that is none or
    boolean [B or 1, 1, L, L]. (A sliding window is in the mask, as for SDPA, which ignores the
    ``sliding_window`` argument.)"""
    L = q.shape[2]
    if (dropout and module.training) or any(kwargs.get(a) is not None for a in (
            "softcap", "position_bias")) or kwargs.get("output_attentions"):
        return False
    if not (k.shape[2] == L <= ATTENTION_MAX_LEN and v.shape[-1] == q.shape[-1]
            and q.shape[1] % k.shape[1] == 0 and all(t.stride(-1) == 1 for t in (q, k, v))):
        return False
    if mask is not None and not (mask.dtype == torch.bool and mask.dim() == 4
                                 and mask.shape[1] == 1 and mask.shape[2:] == (L, L)
                                 and mask.shape[0] in (1, q.shape[0])):
        return False
    return _cpu_kernels(q, k, v) and q.dtype == k.dtype == v.dtype


def _patch_sdpa_global() -> bool:
    """Makes the library's "sdpa" attention function use ``csrc/attention.cpp`` inside patched
    attentions where it applies (a dispatcher: everywhere else the library's function runs)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError:
        return False
    original = ALL_ATTENTION_FUNCTIONS.get("sdpa")
    if original is None:
        return False
    if getattr(original, "_metakernels_original", None) is not None:
        return True

    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                               scaling=None, is_causal=None, **kwargs):
        if _fused_active() and _attention_kernel_applies(module, query, key, value,
                                                         attention_mask, dropout, kwargs):
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = _AttentionFn.apply(query, key, value, attention_mask, causal, float(scale))
            return out.transpose(1, 2), None          # [B, L, H, D], contiguous
        return original(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)

    sdpa_attention_forward._metakernels_original = original
    AttentionInterface.register("sdpa", sdpa_attention_forward)
    return True


# ---------------------------------------------------------------------------------------------
# Switching a model's modules
# ---------------------------------------------------------------------------------------------
_ACTIVE = threading.local()


def _fused_active() -> bool:
    return getattr(_ACTIVE, "depth", 0) > 0


@contextlib.contextmanager
def _fused_scope():
    _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
    try:
        yield
    finally:
        _ACTIVE.depth -= 1


def _patch_rotary_global(module_name: str) -> bool:
    """Makes ``module_name.apply_rotary_pos_emb`` use ``rotary`` inside patched attentions (a
    dispatcher: attentions of unpatched models keep the library's function)."""
    mod = sys.modules.get(module_name)
    original = getattr(mod, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if getattr(original, "_metakernels_original", None) is not None:
        return True

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _fused_active():
            return rotary(q, k, cos, sin, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._metakernels_original = original
    mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def _scoped_attention_forward(self, *args, **kwargs):
    # A method bound to the instance (not a closure over it), so that copy.deepcopy of the
    # model binds the copy's forward to the copy.
    with _fused_scope():
        return type(self).forward(self, *args, **kwargs)


def _frozen_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    return frozen_linear(x, self.weight, self.bias)


def _switch_linear(m: nn.Linear) -> None:
    m.forward = types.MethodType(_frozen_linear_forward, m)


def switch_linears(model: nn.Module) -> int:
    """Switches only ``model``'s ``nn.Linear`` layers to ``frozen_linear`` (as
    ``apply_fused_layers`` does among the rest); returns how many. Idempotent."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and not getattr(m, "_metakernels_fused", False):
            _switch_linear(m)
            m._metakernels_fused = True
            n += 1
    return n


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def apply_fused_layers(model: nn.Module) -> dict[str, int]:
    """Switches ``model``'s RMSNorms, SwiGLU MLPs and rotary embeddings (and, through the
    attentions, SDPA) to the functions above, and its ``nn.Linear`` layers to
    ``metakernels.gemm.frozen_linear`` (oneDNN's GEMM under the cpu backend while the weight is
    frozen; ``F.linear`` otherwise); returns how many modules of each kind were switched.
    Idempotent."""
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0, "linear": 0}
    for m in model.modules():
        if getattr(m, "_metakernels_fused", False):
            continue
        name = type(m).__name__
        if (name.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
                and isinstance(getattr(m, "weight", None), torch.Tensor)):
            m.forward = types.MethodType(_rms_norm_forward, m)
            counts["rms_norm"] += 1
        elif (all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
              and _is_silu(getattr(m, "act_fn", None))):
            m.forward = types.MethodType(_swiglu_mlp_forward, m)
            counts["swiglu"] += 1
        elif (name.endswith("Attention") and hasattr(m, "q_proj")
              and _patch_rotary_global(type(m).__module__)):
            _patch_sdpa_global()
            m.forward = types.MethodType(_scoped_attention_forward, m)
            counts["rotary"] += 1
        elif type(m) is nn.Linear:
            _switch_linear(m)
            counts["linear"] += 1
        else:
            continue
        m._metakernels_fused = True
    return counts
