"""Triton kernels of the ops, one module per op (``fwd``/``bwd`` or the op's own function with
exactly the contract of the op's torch backend). Imported lazily by the dispatch in
``metakernels.ops``; on a machine without a GPU they run on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before this package is imported).

Conventions shared by the kernels:
- every tensor is passed with all its strides (views of the flat bank buffers are common);
  row offsets are widened to int64 before they are multiplied by a stride;
- task segments come from ``TaskLayout.offsets_tensor`` (int32 [T+1]); a program whose task
  segment is empty returns before touching memory;
- loads are upcast to fp32 and every sum accumulates in fp32; ``tl.dot`` runs with
  ``input_precision="ieee"`` so fp32 products match cuBLAS fp32 (no TF32), and its tiles are at
  least 16 wide (small ranks are padded with masks).
"""
