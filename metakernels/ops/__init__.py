"""The ops: each a plain-PyTorch reference, a C++ CPU kernel and a Triton kernel behind one
dispatch (``metakernels.backend``)."""
from .fused_update import AdamState, fused_update, fused_update_ref
from .meta_reduce import meta_reduce, meta_reduce_ref
from .multi_lora_linear import multi_lora_linear, multi_lora_linear_ref
from .segment_cross_entropy import segment_cross_entropy, segment_cross_entropy_ref

__all__ = ["AdamState", "fused_update", "fused_update_ref", "meta_reduce", "meta_reduce_ref",
           "multi_lora_linear", "multi_lora_linear_ref", "segment_cross_entropy",
           "segment_cross_entropy_ref"]
