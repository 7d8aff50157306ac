"""Patching Hugging Face models to run the layer ops of ``metakernels.ops`` (RMSNorm, SwiGLU,
rotary, attention) and ``metakernels.gemm.frozen_linear``, one switch per kind of layer, as
Liger-Kernel's ``apply_liger_kernel_to_llama(rope=, swiglu=, rms_norm=)``.

Every task of a meta-batch runs through the base at once, so the activations autograd keeps for
the backward grow with T; the layer ops compute the forward as Hugging Face's modules do and keep
only what their backward needs (see each op's docstring). ``apply_fused_layers(model)`` switches
a model's modules (Llama, Mistral, Qwen2 and the like: modules named ``*RMSNorm`` with
``variance_epsilon``, MLPs with ``gate_proj``/``up_proj``/``down_proj`` and a SiLU, attentions
calling their modeling file's ``apply_rotary_pos_emb``); other models are left as they are, but
for their ``nn.Linear`` layers, switched to ``frozen_linear`` (oneDNN's GEMM for a frozen fp32
weight under the cpu backend, ``F.linear`` otherwise). A switched attention also routes the
library's ``"sdpa"`` attention function to ``metakernels.ops.attention`` where its kernel
computes what SDPA would (no dropout in training, softcap or position bias; the op's own
conditions on the inputs); everywhere else the library's SDPA runs. The switch is per model
instance: other models in the process keep the library's code.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import types

import torch
import torch.nn as nn

from .gemm import frozen_linear
from .ops.attention import ATTENTION_MAX_LEN, attention, kernel_applies
from .ops.rms_norm import nonzero_weight, rms_norm
from .ops.rotary import rotary
from .ops.swiglu import swiglu

__all__ = ["ATTENTION_MAX_LEN", "apply_fused_layers", "nonzero_weight", "rms_norm", "rotary",
           "swiglu", "switch_linears"]


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# ---------------------------------------------------------------------------------------------
# Attention: the library's "sdpa" function, inside switched attentions
# ---------------------------------------------------------------------------------------------
def _attention_kernel_applies(module, q, k, v, mask, dropout, kwargs) -> bool:
    """Whether the attention op's kernel computes what the library's SDPA path would: no dropout
    in training, no softcap or position bias, and the op's conditions on q, k, v and the mask
    (a sliding window is in the mask, as for SDPA, which ignores ``sliding_window``)."""
    if (dropout and module.training) or any(kwargs.get(a) is not None for a in (
            "softcap", "position_bias")) or kwargs.get("output_attentions"):
        return False
    return kernel_applies(q, k, v, mask) is not None


def _patch_sdpa_global() -> bool:
    """Makes the library's "sdpa" attention function use the attention op inside patched
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
        if _fused_active("attention") and _attention_kernel_applies(
                module, query, key, value, attention_mask, dropout, kwargs):
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            out = attention(query, key, value, attention_mask, causal, scaling)
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


ATTENTION_SWITCHES = ("rope", "attention")


def _fused_active(switch: str | None = None) -> bool:
    """Whether a switched attention is running (with ``switch`` on, if given)."""
    stack = getattr(_ACTIVE, "stack", None)
    return bool(stack) and (switch is None or switch in stack[-1])


@contextlib.contextmanager
def _fused_scope(switches=ATTENTION_SWITCHES):
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    _ACTIVE.stack.append(frozenset(switches))
    try:
        yield
    finally:
        _ACTIVE.stack.pop()


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
        if _fused_active("rope"):
            return rotary(q, k, cos, sin, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._metakernels_original = original
    mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def _scoped_attention_forward(self, *args, **kwargs):
    # A method bound to the instance (not a closure over it), so that copy.deepcopy of the
    # model binds the copy's forward to the copy.
    with _fused_scope(self._metakernels_switches):
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


def apply_fused_layers(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True,
                       rope: bool = True, attention: bool = True,
                       linear: bool = True) -> dict[str, int]:
    """Switches ``model``'s layers to the layer ops, one switch per kind: RMSNorms (``rms_norm``),
    SwiGLU MLPs (``swiglu``), the attentions' rotary embedding (``rope``) and SDPA
    (``attention``), and its ``nn.Linear`` layers (``linear``) to
    ``metakernels.gemm.frozen_linear``; returns how many modules of each kind were switched
    (``"rotary"``: the attentions, for rope or attention). Idempotent: a module switched once is
    left as it is."""
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0, "linear": 0}
    switches = tuple(s for s, on in zip(ATTENTION_SWITCHES, (rope, attention)) if on)
    for m in model.modules():
        if getattr(m, "_metakernels_fused", False):
            continue
        name = type(m).__name__
        if (name.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
                and isinstance(getattr(m, "weight", None), torch.Tensor)):
            if not rms_norm:
                continue
            m.forward = types.MethodType(_rms_norm_forward, m)
            counts["rms_norm"] += 1
        elif (all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
              and _is_silu(getattr(m, "act_fn", None))):
            if not swiglu:
                continue
            m.forward = types.MethodType(_swiglu_mlp_forward, m)
            counts["swiglu"] += 1
        elif (name.endswith("Attention") and hasattr(m, "q_proj")
              and _patch_rotary_global(type(m).__module__)):
            if not switches:
                continue
            if attention:
                _patch_sdpa_global()
            m._metakernels_switches = frozenset(switches)
            m.forward = types.MethodType(_scoped_attention_forward, m)
            counts["rotary"] += 1
        elif type(m) is nn.Linear:
            if not linear:
                continue
            _switch_linear(m)
            counts["linear"] += 1
        else:
            continue
        m._metakernels_fused = True
    return counts
