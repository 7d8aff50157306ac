"""multi_lora_linear on every backend present: the public op against the fp64 reference (torch,
cpu, Triton under the interpreter), then each backend's kernels called directly (their in-place
contract on strided views of a flat buffer, paths, tiles)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from metakernels import TaskLayout, backend
from metakernels.ops import multi_lora_linear, multi_lora_linear_ref
from metakernels.ops.multi_lora_linear import _torch_bwd, _torch_fwd

from conftest import (CPU_BACKENDS, LAYOUTS, ONEDNN, OP_BACKENDS, TRITON, assert_close,
                      assert_close_like_torch, lora_inputs, mll_fp64_oracle, needs_cpu,
                      needs_triton, offsets, spy)

ops = torch.ops.metakernels
if TRITON:
    from metakernels.ops._triton import multi_lora_linear as tri_lora

TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# segments longer than the row tiles (16 rows of the shrink at these sizes, 32 rows per step
# of the segment-outer loop), so the kernels' row loops take several iterations
LONG_LAYOUT = [40, 0, 35]
IN_F, OUT_F = 67, 70  # > one 64-wide tile in both directions


# --------------------------------------------------------------- the public op, every backend
def _reference_grads(layout, x, W, b, A, B, dy, scale):
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = multi_lora_linear_ref(x64, d(W), d(b), A64, B64, layout, scale)
    y.backward(dy.double())
    return y.detach(), x64.grad, A64.grad, B64.grad


def _check_mll(backend_name, layout, x, W, b, A, B, dy, scale, sink):
    y_ref, dx_ref, dA_ref, dB_ref = _reference_grads(layout, x, W, b, A, B, dy, scale)
    # the sums of |terms| behind each result: random signs cancel, most in one-element sums
    absolute = lambda t: None if t is None else t.abs()  # noqa: E731
    y_mag, dx_mag, dA_mag, dB_mag = _reference_grads(
        layout, *(absolute(t) for t in (x, W, b, A, B, dy)), abs(scale))
    xr = x.detach().clone().requires_grad_()
    Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
    if sink:  # gradients into strided views of one flat buffer holding other numbers
        T, in_f, r = A.shape
        out_f = B.shape[-1]
        P = in_f * r + r * out_f + 5
        flat = torch.randn(T, P)
        before = flat.clone()
        gA = flat[:, 2:2 + in_f * r].view(T, in_f, r)
        gB = flat[:, 2 + in_f * r:2 + in_f * r + r * out_f].view(T, r, out_f)
    else:
        gA = gB = None
    with backend.use_backend(backend_name):
        y = multi_lora_linear(xr, W, b, Ar, Br, layout, scale, gA, gB)
    y.backward(dy)
    if sink:
        # the buffers hold what they held plus the gradients, rounded at their magnitude
        dA, dB = gA, gB
        dA_ref = dA_ref + before[:, 2:2 + in_f * r].view_as(gA).double()
        dB_ref = dB_ref + before[:, 2 + in_f * r:2 + in_f * r + r * out_f].view_as(gB).double()
        dA_mag = dA_mag + before[:, 2:2 + in_f * r].view_as(gA).double().abs()
        dB_mag = dB_mag + before[:, 2 + in_f * r:2 + in_f * r + r * out_f].view_as(gB).double().abs()
        assert Ar.grad is None and Br.grad is None
        assert torch.equal(flat[:, :2], before[:, :2]) and torch.equal(flat[:, -3:], before[:, -3:])
    else:
        dA, dB = Ar.grad, Br.grad
    in_f, r, out_f, rows = A.shape[1], A.shape[2], B.shape[2], max(layout.sizes)
    # the LoRA terms in the adapters' fp32 whatever x's dtype: dA, dB at fp32 accuracy
    assert_close(dA, dA_ref, reduction=rows + out_f, magnitude=dA_mag)
    assert_close(dB, dB_ref, reduction=rows + in_f, magnitude=dB_mag)
    if x.dtype == torch.float32:
        assert_close(y, y_ref, reduction=in_f + r, magnitude=y_mag)
        assert_close(xr.grad, dx_ref, reduction=out_f + r, magnitude=dx_mag)
    else:  # at most ~2x the error plain PyTorch makes at this dtype (flash-attention's rule)
        y_lp = multi_lora_linear_ref(x, W, b, A, B, layout, scale)
        assert_close_like_torch("y", y, y_lp, y_ref)


@pytest.mark.parametrize("backend_name", OP_BACKENDS)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("sink", [False, True])
def test_multi_lora_linear_layouts_ranks(backend_name, layout_name, r, sink):
    args = lora_inputs(LAYOUTS[layout_name], 13, 11, r, seed=r)
    _check_mll(backend_name, *args, scale=0.7, sink=sink)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_lora_linear_low_precision(backend_name, dtype):
    args = lora_inputs([5, 0, 9], 24, 20, 8, dtype=dtype)
    _check_mll(backend_name, *args, scale=2.0, sink=True)


@pytest.mark.parametrize("backend_name", OP_BACKENDS)
def test_multi_lora_linear_no_base_and_transposed_weight(backend_name):
    layout, x, W, b, A, B, dy = lora_inputs([3, 2], 9, 6, 4)
    _check_mll(backend_name, layout, x, None, None, A, B, dy, 0.5, sink=True)
    Wt = W.T.contiguous().T  # a non-contiguous [out, in] view, as Conv1D layers give
    _check_mll(backend_name, layout, x, Wt, b, A, B, dy, 0.5, sink=False)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       in_f=st.integers(1, 33), out_f=st.integers(1, 33), r=st.integers(1, 17),
       bias=st.booleans(), sink=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_multi_lora_linear_hypothesis(sizes, in_f, out_f, r, bias, sink, seed):
    args = lora_inputs(sizes, in_f, out_f, r, bias=bias, seed=seed)
    for name in CPU_BACKENDS:
        _check_mll(name, *args, scale=1.3, sink=sink)


def test_multi_lora_linear_reference_is_twice_differentiable():
    layout, x, W, b, A, B, dy = lora_inputs([2, 3], 5, 4, 2)
    A = A.double().requires_grad_()
    B = B.double().requires_grad_()
    f = lambda A_, B_: (multi_lora_linear_ref(x.double(), W.double(), b.double(), A_, B_, layout,
                                              0.5) ** 2).sum()
    assert torch.autograd.gradgradcheck(f, (A, B))


@pytest.mark.parametrize("backend_name", OP_BACKENDS)
def test_multi_lora_linear_rejects_bad_inputs(backend_name):
    layout, x, W, b, A, B, dy = lora_inputs([3, 2], 9, 6, 4)
    with backend.use_backend(backend_name):
        with pytest.raises(ValueError, match="layout covers 4 rows"):
            multi_lora_linear(x, W, b, A, B, TaskLayout.from_sizes([3, 1]), 1.0)
        with pytest.raises(ValueError, match="A must have shape"):
            multi_lora_linear(x, W, b, A[:, :5], B, layout, 1.0)
        with pytest.raises(ValueError, match="W must have shape"):
            multi_lora_linear(x, W[:5], b, A, B, layout, 1.0)
        with pytest.raises(TypeError, match="B must have dtype"):
            multi_lora_linear(x, W, b, A, B.double(), layout, 1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        TaskLayout((0, 3, 2, 5))
    with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
        TaskLayout((1, 3))


# -------------------------------------------------------------------------------- cpu kernels
def _mll_reference(sizes, x, W, b, A, B, dy, scale):
    """y, xa, dx, dA, dB in float64 from the plain-PyTorch reference and autograd."""
    layout = TaskLayout.from_sizes(sizes)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    W64 = None if W is None else W.double()
    b64 = None if b is None else b.double()
    y = multi_lora_linear_ref(x64, W64, b64, A64, B64, layout, scale)
    dx, dA, dB = torch.autograd.grad(y, (x64, A64, B64), dy.double())
    xa = torch.cat([x64[s:e] @ A64[t] for t, s, e in layout.segments()]).detach()
    return y.detach(), xa, dx, dA, dB


def _grad_buffers(A, B, flat, seed):
    """dA [T, in, r], dB [T, r, out] holding random numbers: fresh tensors, or strided views of
    a flat [T, P] buffer with other numbers before, between and after them."""
    T, in_f, r = A.shape
    out_f = B.shape[-1]
    g = torch.Generator().manual_seed(seed + 1)
    if not flat:
        return None, torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
    na, nb = in_f * r, r * out_f
    buf = torch.randn(T, 3 + na + 2 + nb + 4, generator=g)
    dA = buf[:, 3:3 + na].view(T, in_f, r)
    dB = buf[:, 5 + na:5 + na + nb].view(T, r, out_f)
    assert T == 1 or dA.stride()[0] == buf.shape[1] != in_f * r
    return buf, dA, dB


def _outside_views(buf, A, B):
    na, nb = A[0].numel(), B[0].numel()
    return torch.cat([buf[:, :3], buf[:, 3 + na:5 + na], buf[:, 5 + na + nb:]], 1)


def _run_mll(sizes, x, W, b, A, B, dy, scale, flat, seed=0, tol_dtype=None, onednn=False):
    tol_dtype = tol_dtype or x.dtype
    offs = offsets(sizes)
    in_f, r, out_f, rows = A.shape[1], A.shape[2], B.shape[2], max(sizes)
    y_ref, xa_ref, dx_ref, dA_ref, dB_ref = _mll_reference(sizes, x, W, b, A, B, dy, scale)

    per_task = backend.lora_per_task()
    y, xa = ops.multi_lora_linear_fwd(x, W, b, A, B, offs, scale, onednn, per_task)
    assert y.dtype == x.dtype and y.shape == y_ref.shape and xa.dtype == A.dtype
    assert_close(y, y_ref, tol_dtype, reduction=in_f + r)
    assert_close(xa, xa_ref, reduction=in_f)  # in A's dtype (fp32) from exact inputs

    buf, dA, dB = _grad_buffers(A, B, flat, seed)
    dA0, dB0 = dA.clone(), dB.clone()
    outside0 = _outside_views(buf, A, B).clone() if flat else None
    dx = ops.multi_lora_linear_bwd(dy, x, W, A, B, xa, offs, scale, dA, dB, True, onednn,
                                   per_task)
    assert dx.dtype == x.dtype
    assert_close(dx, dx_ref, tol_dtype, reduction=out_f + r)
    # the buffers hold what they held plus the gradients, rounded at their magnitude
    assert_close(dA, dA0.double() + dA_ref, reduction=rows + out_f)
    assert_close(dB, dB0.double() + dB_ref, reduction=rows + in_f)
    if flat:
        assert torch.equal(_outside_views(buf, A, B), outside0)

    # need_dx=False: the same accumulation, an empty dx
    dA1, dB1 = dA.clone(), dB.clone()
    none = ops.multi_lora_linear_bwd(dy, x, W, A, B, xa, offs, scale, dA, dB, False, onednn,
                                     per_task)
    assert none.numel() == 0
    assert_close(dA, dA1.double() + dA_ref, reduction=rows + out_f)
    assert_close(dB, dB1.double() + dB_ref, reduction=rows + in_f)


@pytest.fixture(params=["per_task", "batched"], ids=["per-task", "batched"])
def lora_path(request):
    """The LoRA products one task at a time where the kernel takes that path (AVX-512, tasks
    that share the threads evenly), or always as batched GEMMs (the kernel choice
    ``lora_products``, which ``_run_mll`` passes to the ops)."""
    with backend.use("lora_products", request.param):
        yield request.param


@needs_cpu
@pytest.mark.parametrize("layout_name", list(LAYOUTS) + ["lopsided"])
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("flat", [False, True], ids=["fresh", "flat-views"])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_fp32(layout_name, r, bias, flat, onednn, lora_path):
    # lopsided: one task has most rows, so that two threads take the batched path
    sizes = LAYOUTS.get(layout_name, [9, 1, 1])
    _, x, W, b, A, B, dy = lora_inputs(sizes, 13, 11, r, bias=bias, seed=r)
    _run_mll(sizes, x, W, b, A, B, dy, 0.7, flat, seed=r, onednn=onednn)


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_fp32_model_sized(onednn, lora_path, threads):
    """Sizes where the GEMM libraries block and vectorise (odd widths past their tiles)."""
    sizes = [37, 0, 64, 29]
    _, x, W, b, A, B, dy = lora_inputs(sizes, 203, 517, 16, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run_mll(sizes, x, W, b, A, B, dy, 2.0, flat=True, onednn=onednn)
    finally:
        torch.set_num_threads(before)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout_name", ["3x3", "ragged+empty"])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_low_precision_x(dtype, layout_name, onednn):
    """LoRA math in fp32 (xa, dA, dB at fp32 accuracy); y and dx rounded to x's dtype (ATen's
    GEMM with onednn too: oneDNN takes only fp32 there)."""
    sizes = LAYOUTS[layout_name]
    _, x, W, b, A, B, dy = lora_inputs(sizes, 24, 19, 8, dtype=dtype)
    _run_mll(sizes, x, W, b, A, B, dy, 2.0, flat=True, onednn=onednn)


@needs_cpu
@pytest.mark.parametrize("sizes", [[5, 4], [37, 0, 64, 29], [1, 1, 1, 1], [7]])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("has_base", [True, False])
def test_multi_lora_linear_bf16_over_the_fp32_bank(sizes, bias, has_base, lora_path):
    """bf16 x, dy over fp32 adapters (a bf16 checkpoint): on the per-task path each task's rows
    are converted in the thread's scratch, the LoRA products run in fp32 (xa, dA, dB at fp32
    accuracy given the bf16 inputs) and y, dx are rounded once; the batched path is the fallback."""
    _, x, W, b, A, B, dy = lora_inputs(sizes, 203, 131, 16, dtype=torch.bfloat16, bias=bias, seed=9)
    if not has_base:
        W = b = None
    _run_mll(sizes, x, W, b, A, B, dy, 2.0, flat=True)
    _run_mll(sizes, x[:, :101], None if W is None else W[:, :101], b, A[:, :101], B, dy, 0.5,
             flat=False)


@needs_cpu
@pytest.mark.parametrize("in_f,out_f", [(4096, 37), (29, 4100)])
def test_multi_lora_linear_bf16_tasks_longer_than_a_chunk(in_f, out_f, lora_path):
    """A wide layer (4096+ columns: 64-row chunks of the per-task scratch) with tasks of several
    chunks and a partial last one: dA and dB accumulate over the chunks."""
    sizes = [150, 3, 70, 64]
    _, x, W, b, A, B, dy = lora_inputs(sizes, in_f, out_f, 8, dtype=torch.bfloat16, seed=11)
    _run_mll(sizes, x, W, b, A, B, dy, 1.5, flat=True)


@needs_cpu
@pytest.mark.parametrize("layout_name", ["3x3", "ragged+empty"])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_no_base_transposed_weight_strided_x(layout_name, onednn, lora_path):
    sizes = LAYOUTS[layout_name]
    _, x, W, b, A, B, dy = lora_inputs(sizes, 10, 6, 4)
    _run_mll(sizes, x, None, None, A, B, dy, 0.5, flat=True, onednn=onednn)
    Wt = W.T.contiguous().T  # [out, in] with strides (1, out): a transformers Conv1D weight
    x_wide = torch.cat([x, torch.randn(x.shape[0], 3)], 1)
    _run_mll(sizes, x_wide[:, :10], Wt, b, A, B, dy, 0.5, flat=False, onednn=onednn)


@needs_cpu
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_all_tasks_empty(onednn):
    _, x, W, b, A, B, dy = lora_inputs([0, 0], 5, 4, 2)
    y, xa = ops.multi_lora_linear_fwd(x, W, b, A, B, offsets([0, 0]), 1.0, onednn)
    assert y.shape == (0, 4) and xa.shape == (0, 2)
    dA, dB = torch.randn(A.shape), torch.randn(B.shape)
    dA0, dB0 = dA.clone(), dB.clone()
    dx = ops.multi_lora_linear_bwd(dy, x, W, A, B, xa, offsets([0, 0]), 1.0, dA, dB, True,
                                   onednn)
    assert dx.shape == (0, 5) and torch.equal(dA, dA0) and torch.equal(dB, dB0)


# --------------------------------------------------------------- Triton kernels (interpreter)
def _lora_inputs(sizes, rank, dtype, with_base):
    layout = TaskLayout.from_sizes(sizes)
    T, N = layout.num_tasks, layout.num_rows
    x = torch.randn(N, IN_F + 3)[:, 2:IN_F + 2].to(dtype)  # a strided view, as activations can be
    W = b = None
    if with_base:
        W = (torch.randn(IN_F, OUT_F) / IN_F ** 0.5).T.to(dtype)  # transposed, like a Conv1D weight
        b = torch.randn(OUT_F).to(dtype)
    A = torch.randn(T, IN_F, rank) / IN_F ** 0.5
    B = torch.randn(T, rank, OUT_F) / rank ** 0.5
    return layout, x, W, b, A, B


def _flat_grad_buffer(T, rank):
    """A flat [T, P] buffer with random content, and the mask of the bytes outside its views."""
    nA, nB = IN_F * rank, rank * OUT_F
    flat = torch.randn(T, 5 + nA + 3 + nB + 4)
    outside = torch.ones_like(flat, dtype=torch.bool)
    outside[:, 5:5 + nA] = False
    outside[:, 8 + nA:8 + nA + nB] = False
    return flat, outside


def _grad_views(flat, rank):
    """dA [T, in, r] and dB [T, r, out] as views of the flat buffer (dA strides (P, r, 1))."""
    T, nA, nB = flat.shape[0], IN_F * rank, rank * OUT_F
    return (flat[:, 5:5 + nA].view(T, IN_F, rank),
            flat[:, 8 + nA:8 + nA + nB].view(T, rank, OUT_F))


def _f64(t):
    return None if t is None else t.double()


def _zeros_like_views(dA, dB, dtype):
    return (torch.zeros(dA.shape, dtype=dtype), torch.zeros(dB.shape, dtype=dtype))


# Ranks 1 and 3 are padded to a 16-wide tile, 16 fills it, 33 takes the 64 block, 70 two tiles
# (or two steps of the rank loop).
_LORA_CASES = ([(sizes, rank, dtype, base) for sizes in LAYOUTS.values() for rank in (1, 3, 16)
                for dtype in TRITON_DTYPES for base in (True, False)]
               + [(LAYOUTS["ragged+empty"], rank, dtype, True) for rank in (33, 70)
                  for dtype in (torch.float32, torch.bfloat16)]
               + [(LONG_LAYOUT, rank, dtype, True) for rank in (1, 3, 16)
                  for dtype in (torch.float32, torch.bfloat16)])


def _lora_case_id(case):
    sizes, rank, dtype, base = case
    name = next((k for k, v in LAYOUTS.items() if v == sizes), "long_ragged")
    return f"{name}-r{rank}-{str(dtype).split('.')[-1]}-{'base' if base else 'lora_only'}"


def _check_lora_kernels(layout, x, W, b, A, B, scale=1.7):
    """fwd and bwd of the kernels against ``_torch_fwd``/``_torch_bwd``: dtypes as the torch
    backend gives them, values within twice the error of plain PyTorch at the activations'
    dtype (the adapters rounded to it too, as the kernels' products are) against fp64."""
    T, rank, dtype = layout.num_tasks, A.shape[-1], x.dtype
    lo = dict(A=A.to(dtype), B=B.to(dtype))
    y, xa = tri_lora.fwd(x, W, b, A, B, layout, scale)
    y_ref, xa_ref = _torch_fwd(x, W, b, A, B, layout, scale)
    y_lo, xa_lo = _torch_fwd(x, W, b, lo["A"], lo["B"], layout, scale)
    y_or, xa_or = _torch_fwd(x.double(), _f64(W), _f64(b), A.double(), B.double(), layout, scale)
    assert_close_like_torch("y", y, y_lo, y_or, dtype=y_ref.dtype)
    assert_close_like_torch("xa", xa, xa_lo, xa_or, dtype=xa_ref.dtype)

    dy = torch.randn_like(y)
    flat, outside = _flat_grad_buffer(T, rank)
    before = flat.clone()
    dA, dB = _grad_views(flat, rank)
    dA_lo, dB_lo = _zeros_like_views(dA, dB, dtype)
    dA_or, dB_or = _zeros_like_views(dA, dB, torch.float64)
    dx = tri_lora.bwd(dy, x, W, A, B, xa, layout, scale, dA, dB, True)
    dx_lo = _torch_bwd(dy, x, W, lo["A"], lo["B"], xa_lo, layout, scale, dA_lo, dB_lo, True)
    dx_or = _torch_bwd(dy.double(), x.double(), _f64(W), A.double(), B.double(), xa_or, layout,
                       scale, dA_or, dB_or, True)
    assert_close_like_torch("dx", dx, dx_lo, dx_or, dtype=x.dtype)
    # dA, dB are added into the buffer: compare what was added
    dA0, dB0 = _grad_views(before.double(), rank)
    assert_close_like_torch("dA", dA.double() - dA0, dA_lo, dA_or, dtype=torch.float64)
    assert_close_like_torch("dB", dB.double() - dB0, dB_lo, dB_or, dtype=torch.float64)
    assert torch.equal(flat[outside], before[outside]), "bytes outside the dA/dB views changed"
    for t, s, e in layout.segments():
        if s == e:  # an empty task's gradient rows keep their bytes exactly
            assert torch.equal(flat[t], before[t])


@needs_triton
@pytest.mark.parametrize("sizes,rank,dtype,with_base", _LORA_CASES,
                         ids=[_lora_case_id(c) for c in _LORA_CASES])
def test_multi_lora_linear_kernels(sizes, rank, dtype, with_base):
    _check_lora_kernels(*_lora_inputs(sizes, rank, dtype, with_base))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row_block", tri_lora._ROW_BLOCKS if TRITON else ())
def test_multi_lora_linear_kernels_both_row_blocks(row_block, dtype, monkeypatch):
    """The shrink's 16- and 64-row tiles: a small test picks 16 (too few programs for 64), so
    the threshold is moved to force each, over segments longer than 64 rows."""
    monkeypatch.setattr(tri_lora, "_MIN_PROGRAMS", 0 if row_block == 64 else 1 << 30)
    assert tri_lora._shrink_blocks(70, 3, 5, dtype)["BLOCK_M"] == row_block
    _check_lora_kernels(*_lora_inputs([70, 0, 35], 5, dtype, True))


@needs_triton
def test_multi_lora_linear_block_table():
    """The launchers pick blocks from the table that ``launch_configs`` (and the compile test)
    enumerates, for ranks 1-128 and segments of 0-4096 rows."""
    listed = {(c.kernel, tuple(sorted((k, v) for k, v in c.constexprs.items() if k != "DOT_DTYPE")),
               c.constexprs["DOT_DTYPE"]) for c in tri_lora.launch_configs()}

    def key(kernel, dtype, accumulate=None, **blocks):
        consts = dict(blocks) if accumulate is None else dict(blocks, ACCUMULATE=accumulate)
        return kernel, tuple(sorted(consts.items())), tri_lora._DOT_DTYPE[dtype]
    for dtype in TRITON_DTYPES:
        for r in list(range(1, 129)):
            for rows in (0, 1, 2, 16, 17, 64, 128, 1000, 4096):
                for T in (1, 4, 32, 300):
                    assert key(tri_lora._sgmv_kernel, dtype, False,
                               **tri_lora._shrink_blocks(rows, T, r, dtype)) in listed
            assert key(tri_lora._sgmv_kernel, dtype, True,
                       **tri_lora._expand_blocks(r, dtype)) in listed
            for role in ("dA", "dB"):
                assert key(tri_lora._segment_outer_kernel, dtype,
                           **tri_lora._outer_blocks(role, r, dtype)) in listed
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        tri_lora._dot_dtype(torch.float64)


@needs_triton
def test_multi_lora_linear_kernels_without_dx():
    layout, x, W, b, A, B = _lora_inputs(LAYOUTS["ragged+empty"], 3, torch.float32, True)
    y, xa = tri_lora.fwd(x, W, b, A, B, layout, 0.5)
    dy = torch.randn_like(y)
    dA, dB = _grad_views(_flat_grad_buffer(layout.num_tasks, 3)[0], 3)
    dA_ref, dB_ref = dA.clone(), dB.clone()
    assert tri_lora.bwd(dy, x, W, A, B, xa, layout, 0.5, dA, dB, False) is None
    _torch_bwd(dy, x, W, A, B, xa, layout, 0.5, dA_ref, dB_ref, False)
    rows = max(layout.sizes)
    assert_close(dA, dA_ref, reduction=rows + OUT_F)
    assert_close(dB, dB_ref, reduction=rows + IN_F)


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("sink", [False, True], ids=["autograd", "grad_buffers"])
def test_multi_lora_linear_public_op(sink, dtype, monkeypatch):
    """Through ``multi_lora_linear`` with the triton backend forced: the autograd Function, the
    gradient sink into views of the bank's flat buffer (grad_A/grad_B given) or autograd
    gradients for A and B (not given), and db."""
    rank, scale = 3, 2.0
    layout, x, W, b, A, B = _lora_inputs(LAYOUTS["ragged+empty"], rank, dtype, True)
    dy = torch.randn(layout.num_rows, OUT_F).to(dtype)
    flat, outside = _flat_grad_buffer(layout.num_tasks, rank)
    before = flat.clone()

    def run(name, A, B, sink):
        xs, bs = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        As, Bs = A.clone().requires_grad_(not sink), B.clone().requires_grad_(not sink)
        gA, gB = _grad_views(flat, rank) if sink else (None, None)
        with backend.use_backend(name):
            y = multi_lora_linear(xs, W, bs, As, Bs, layout, scale, grad_A=gA, grad_B=gB)
        y.backward(dy)
        if sink:
            assert As.grad is None and Bs.grad is None
            dA0, dB0 = _grad_views(before, rank)
            gA, gB = gA - dA0, gB - dB0  # what the backward added (fp32, exact to an ulp)
        else:
            gA, gB = As.grad, Bs.grad
        return {"y": y.detach(), "x.grad": xs.grad, "b.grad": bs.grad, "dA": gA, "dB": gB}

    fwd_calls, bwd_calls = spy(monkeypatch, tri_lora, "fwd"), spy(monkeypatch, tri_lora, "bwd")
    out = run("triton", A, B, sink)
    assert fwd_calls and bwd_calls, "the triton backend was not used"
    ref = run("torch", A, B, False)  # the contract: dtypes
    lo = run("torch", A.to(dtype), B.to(dtype), False)  # plain PyTorch at x's dtype: the budget
    oracle = mll_fp64_oracle(x, W, b, A, B, layout, scale, dy)
    for key in out:
        assert_close_like_torch(key, out[key], lo[key], oracle[key], dtype=ref[key].dtype)
    if sink:
        assert torch.equal(flat[outside], before[outside]), "bytes outside the views changed"
