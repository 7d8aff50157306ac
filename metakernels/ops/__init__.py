"""The ops: each a plain-PyTorch reference, a C++ CPU kernel and (where present) a Triton kernel
behind one dispatch table (``metakernels.backend.KERNELS``).

The four LoRA ops of a meta-step, and the layer ops of a frozen Llama-family base (RMSNorm,
SwiGLU, rotary, attention), which ``metakernels.fused`` patches into Hugging Face models."""
from .attention import attention, attention_ref
from .fused_update import AdamState, fused_update, fused_update_ref
from .meta_reduce import meta_reduce, meta_reduce_ref
from .multi_lora_linear import multi_lora_linear, multi_lora_linear_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rotary import rotary, rotary_ref
from .segment_cross_entropy import segment_cross_entropy, segment_cross_entropy_ref
from .swiglu import swiglu, swiglu_ref

__all__ = ["AdamState", "attention", "attention_ref", "fused_update", "fused_update_ref",
           "meta_reduce", "meta_reduce_ref", "multi_lora_linear", "multi_lora_linear_ref",
           "rms_norm", "rms_norm_ref", "rotary", "rotary_ref", "segment_cross_entropy",
           "segment_cross_entropy_ref", "swiglu", "swiglu_ref"]
