"""The C++ kernels, called directly as ``torch.ops.metakernels.*``, against the references.

What the ops promise beyond tests/test_ops.py (which goes through the public functions):
the registered schemas and fake implementations (``torch.library.opcheck``), the exact
in-place contract (accumulation into strided views of a flat buffer, nothing written outside
them, nothing written for a skipped task), and the input checks of every entry point.
"""
import pytest
import torch
import torch.nn.functional as F

from metakernels import TaskLayout, backend

_REASON = backend._load_cpu_extension()
if _REASON is not None:
    pytest.skip(f"the C++ extension metakernels._C is not available: {_REASON}",
                allow_module_level=True)

import metakernels._C  # noqa: E402
from conftest import assert_close, assert_close_like_torch  # noqa: E402
from metakernels.ops import (AdamState, fused_update_ref, meta_reduce_ref,  # noqa: E402
                             multi_lora_linear_ref, segment_cross_entropy_ref)

ops = torch.ops.metakernels

LAYOUTS = {"1x7": [7], "7x1": [1] * 7, "3x3": [3, 3, 3], "ragged+empty": [4, 0, 1, 6]}
# the frozen GEMMs through ATen's mm, and through oneDNN where this PyTorch has it
ONEDNN = [False] + ([True] if torch.backends.mkldnn.is_available() else [])


def _offsets(sizes):
    return TaskLayout.from_sizes(sizes).offsets_tensor()


def _same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_built_with_openmp():
    assert metakernels._C.with_openmp


# ---------------------------------------------------------------------------- multi_lora_linear
def _mll_inputs(sizes, in_f, out_f, r, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, N = len(sizes), sum(sizes)
    x = torch.randn(N, in_f, generator=g).to(dtype)
    W = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    A = torch.randn(T, in_f, r, generator=g) / in_f ** 0.5
    B = torch.randn(T, r, out_f, generator=g) / r ** 0.5
    dy = torch.randn(N, out_f, generator=g).to(dtype)
    return x, W, b, A, B, dy


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
    offsets = _offsets(sizes)
    in_f, r, out_f, rows = A.shape[1], A.shape[2], B.shape[2], max(sizes)
    y_ref, xa_ref, dx_ref, dA_ref, dB_ref = _mll_reference(sizes, x, W, b, A, B, dy, scale)

    y, xa = ops.multi_lora_linear_fwd(x, W, b, A, B, offsets, scale, onednn)
    assert y.dtype == x.dtype and y.shape == y_ref.shape and xa.dtype == A.dtype
    assert_close(y, y_ref, tol_dtype, reduction=in_f + r)
    assert_close(xa, xa_ref, reduction=in_f)  # in A's dtype (fp32) from exact inputs

    buf, dA, dB = _grad_buffers(A, B, flat, seed)
    dA0, dB0 = dA.clone(), dB.clone()
    outside0 = _outside_views(buf, A, B).clone() if flat else None
    dx = ops.multi_lora_linear_bwd(dy, x, W, A, B, xa, offsets, scale, dA, dB, True, onednn)
    assert dx.dtype == x.dtype
    assert_close(dx, dx_ref, tol_dtype, reduction=out_f + r)
    assert_close(dA - dA0, dA_ref, reduction=rows + out_f)
    assert_close(dB - dB0, dB_ref, reduction=rows + in_f)
    if flat:
        assert torch.equal(_outside_views(buf, A, B), outside0)

    # need_dx=False: the same accumulation, an empty dx
    dA1, dB1 = dA.clone(), dB.clone()
    none = ops.multi_lora_linear_bwd(dy, x, W, A, B, xa, offsets, scale, dA, dB, False, onednn)
    assert none.numel() == 0
    assert_close(dA - dA1, dA_ref, reduction=rows + out_f)
    assert_close(dB - dB1, dB_ref, reduction=rows + in_f)


@pytest.fixture(params=["per-task", "batched"])
def lora_path(request, monkeypatch):
    """The LoRA products one task at a time where the kernel takes that path (AVX-512, tasks
    that share the threads evenly), or always as batched GEMMs."""
    if request.param == "batched":
        monkeypatch.setenv("METAKERNELS_LORA_PER_TASK", "0")
    return request.param


@pytest.mark.parametrize("layout_name", list(LAYOUTS) + ["lopsided"])
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("flat", [False, True], ids=["fresh", "flat-views"])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_fp32(layout_name, r, bias, flat, onednn, lora_path):
    # lopsided: one task has most rows, so that two threads take the batched path
    sizes = LAYOUTS.get(layout_name, [9, 1, 1])
    x, W, b, A, B, dy = _mll_inputs(sizes, 13, 11, r, bias=bias, seed=r)
    _run_mll(sizes, x, W, b, A, B, dy, 0.7, flat, seed=r, onednn=onednn)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_fp32_model_sized(onednn, lora_path, threads):
    """Sizes where the GEMM libraries block and vectorise (odd widths past their tiles)."""
    sizes = [37, 0, 64, 29]
    x, W, b, A, B, dy = _mll_inputs(sizes, 203, 517, 16, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run_mll(sizes, x, W, b, A, B, dy, 2.0, flat=True, onednn=onednn)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout_name", ["3x3", "ragged+empty"])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_low_precision_x(dtype, layout_name, onednn):
    """LoRA math in fp32 (xa, dA, dB at fp32 accuracy); y and dx rounded to x's dtype (ATen's
    GEMM with onednn too: oneDNN takes only fp32 there)."""
    sizes = LAYOUTS[layout_name]
    x, W, b, A, B, dy = _mll_inputs(sizes, 24, 19, 8, dtype=dtype)
    _run_mll(sizes, x, W, b, A, B, dy, 2.0, flat=True, onednn=onednn)


@pytest.mark.parametrize("sizes", [[5, 4], [37, 0, 64, 29], [1, 1, 1, 1], [7]])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("has_base", [True, False])
def test_multi_lora_linear_bf16_over_the_fp32_bank(sizes, bias, has_base, lora_path):
    """bf16 x, dy over fp32 adapters (a bf16 checkpoint): on the per-task path each task's rows
    are converted in the thread's scratch, the LoRA products run in fp32 (xa, dA, dB at fp32
    accuracy given the bf16 inputs) and y, dx are rounded once; the batched path is the fallback."""
    x, W, b, A, B, dy = _mll_inputs(sizes, 203, 131, 16, dtype=torch.bfloat16, bias=bias, seed=9)
    if not has_base:
        W = b = None
    _run_mll(sizes, x, W, b, A, B, dy, 2.0, flat=True)
    _run_mll(sizes, x[:, :101], None if W is None else W[:, :101], b, A[:, :101], B, dy, 0.5,
             flat=False)


@pytest.mark.parametrize("in_f,out_f", [(4096, 37), (29, 4100)])
def test_multi_lora_linear_bf16_tasks_longer_than_a_chunk(in_f, out_f, lora_path):
    """A wide layer (4096+ columns: 64-row chunks of the per-task scratch) with tasks of several
    chunks and a partial last one: dA and dB accumulate over the chunks."""
    sizes = [150, 3, 70, 64]
    x, W, b, A, B, dy = _mll_inputs(sizes, in_f, out_f, 8, dtype=torch.bfloat16, seed=11)
    _run_mll(sizes, x, W, b, A, B, dy, 1.5, flat=True)


@pytest.mark.parametrize("layout_name", ["3x3", "ragged+empty"])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_no_base_transposed_weight_strided_x(layout_name, onednn, lora_path):
    sizes = LAYOUTS[layout_name]
    x, W, b, A, B, dy = _mll_inputs(sizes, 10, 6, 4)
    _run_mll(sizes, x, None, None, A, B, dy, 0.5, flat=True, onednn=onednn)
    Wt = W.T.contiguous().T  # [out, in] with strides (1, out): a transformers Conv1D weight
    x_wide = torch.cat([x, torch.randn(x.shape[0], 3)], 1)
    _run_mll(sizes, x_wide[:, :10], Wt, b, A, B, dy, 0.5, flat=False, onednn=onednn)


@pytest.mark.parametrize("onednn", ONEDNN)
def test_multi_lora_linear_all_tasks_empty(onednn):
    x, W, b, A, B, dy = _mll_inputs([0, 0], 5, 4, 2)
    y, xa = ops.multi_lora_linear_fwd(x, W, b, A, B, _offsets([0, 0]), 1.0, onednn)
    assert y.shape == (0, 4) and xa.shape == (0, 2)
    dA, dB = torch.randn(A.shape), torch.randn(B.shape)
    dA0, dB0 = dA.clone(), dB.clone()
    dx = ops.multi_lora_linear_bwd(dy, x, W, A, B, xa, _offsets([0, 0]), 1.0, dA, dB, True,
                                   onednn)
    assert dx.shape == (0, 5) and torch.equal(dA, dA0) and torch.equal(dB, dB0)


# --------------------------------------------------------------------------------- fused_update
def _update_case(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = 5
    fast0 = torch.randn(T, P, generator=g)
    scales = torch.tensor([0.5, 1.0, 3.0, 10.0, 0.1])[:, None]  # some tasks clip, some do not
    grads = [torch.randn(T, P, generator=g) * scales for _ in range(4)]
    grads[1][2, P // 2] = float("nan")  # task 2 skipped at step 1
    grads[2][4, P - 1] = float("inf")   # task 4 skipped at step 2
    grads[3][0, 0] = -float("inf")      # task 0 skipped at step 3
    lr = torch.tensor([0.1, 0.05, 0.01, 0.2, 0.03])
    return fast0, grads, lr


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("max_norm,wd,P", [(0.0, 0.0, 7), (2.0, 0.0, 7), (2.0, 0.1, 7),
                                           (0.0, 0.05, 7), (2.0, 0.1, 2 * 16384 + 5)])
def test_fused_update_vs_reference(optimizer, max_norm, wd, P):
    """Several steps; P large enough for several chunks per task and OpenMP."""
    fast0, grads, lr = _update_case(P)
    got, want = fast0.clone(), fast0.clone()
    st_got = AdamState.zeros_like(got) if optimizer == "adam" else None
    st_want = AdamState.zeros_like(want) if optimizer == "adam" else None
    betas, eps = (0.8, 0.95), 1e-6
    for step, grad in enumerate(grads):
        grad_before = grad.clone()
        before = [got.clone()] + ([st_got.exp_avg.clone(), st_got.exp_avg_sq.clone(),
                                   st_got.step.clone()] if st_got else [])
        if optimizer == "sgd":
            norms, finite = ops.fused_sgd_(got, grad, lr, max_norm, wd)
        else:
            norms, finite = ops.fused_adam_(got, grad, st_got.exp_avg, st_got.exp_avg_sq,
                                            st_got.step, lr, max_norm, betas[0], betas[1], eps, wd)
        n_ref, f_ref = fused_update_ref(want, grad, lr, optimizer=optimizer, state=st_want,
                                        max_grad_norm=max_norm, betas=betas, eps=eps,
                                        weight_decay=wd)
        assert _same_bits(grad, grad_before)
        assert norms.dtype == torch.float32 and finite.dtype == torch.bool
        assert torch.equal(finite, f_ref) and int((~finite).sum()) == (step > 0)
        torch.testing.assert_close(norms, n_ref, rtol=1e-6, atol=0, equal_nan=True)
        for t in torch.nonzero(~finite).flatten().tolist():  # skipped: nothing written
            after = [got] + ([st_got.exp_avg, st_got.exp_avg_sq, st_got.step] if st_got else [])
            for a, b in zip(after, before):
                assert _same_bits(a[t], b[t])
        # the clipping coefficient comes from a norm over P: a sum of P terms
        assert_close(got, want, reduction=P)
        if st_got:
            assert_close(st_got.exp_avg, st_want.exp_avg, reduction=P)
            assert_close(st_got.exp_avg_sq, st_want.exp_avg_sq, reduction=P)
            assert torch.equal(st_got.step, st_want.step)
    assert torch.isfinite(got).all()
    if st_got:
        assert st_got.step.tolist() == [3, 4, 3, 4, 3]


# ---------------------------------------------------------------------------------- meta_reduce
@pytest.mark.parametrize("kind", [0, 1], ids=["fomaml", "reptile"])
@pytest.mark.parametrize("T,P", [(1, 1), (5, 7), (6, 3 * 4096 + 3), (3, 100_003)])
def test_meta_reduce_vs_reference(kind, T, P):
    g = torch.Generator().manual_seed(P)
    theta = torch.randn(P, generator=g)
    # reptile: fast weights close to theta, where cancellation would show
    x = theta + 1e-3 * torch.randn(T, P, generator=g) if kind else torch.randn(T, P, generator=g)
    w = torch.rand(T, generator=g) + 0.1
    if T > 1:
        w[1] = 0.0
    name = ("fomaml", "reptile")[kind]
    got = ops.meta_reduce(x, w, theta if kind else x.new_empty(0), kind)
    want = meta_reduce_ref(name, x.double(), w.double(), theta.double())
    assert_close(got, want, reduction=T)


# ------------------------------------------------------------------------ segment_cross_entropy
def _ce_inputs(sizes, d, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    h = torch.randn(N, d, generator=g).to(dtype)
    W = torch.randn(V, d, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    if len(sizes) > 1 and sizes[-1] > 0:  # a task with rows but no targets
        labels[N - sizes[-1]:] = -100
    return h, W, labels


def _ce_against_fp64(h, W, labels, layout, chunk, onednn):
    """The fp32 kernel's loss and dh, checked against the fp64 reference and its gradient."""
    h64 = h.double().requires_grad_()
    want = segment_cross_entropy_ref(h64, W.double(), labels, layout)
    (dh_want,) = torch.autograd.grad(want.sum(), h64)
    loss, dh = ops.segment_cross_entropy_fwd(h, W, labels, layout.offsets_tensor(), chunk,
                                             onednn)
    assert loss.dtype == torch.float32 and dh.dtype == h.dtype and dh.shape == h.shape
    d, V = W.shape[1], W.shape[0]   # logits: sums over d; logsumexp, then softmax @ W: over V
    assert_close(loss, want.detach(), reduction=d + V)
    assert_close(dh, dh_want, reduction=d + 2 * V)
    return loss, dh


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_segment_cross_entropy_fp32(layout_name, chunk, onednn):
    sizes = LAYOUTS[layout_name]
    h, W, labels = _ce_inputs(sizes, 19, 37, torch.float32)
    layout = TaskLayout.from_sizes(sizes)
    loss, dh = _ce_against_fp64(h, W, labels, layout, chunk, onednn)
    for t, s, e in layout.segments():
        if (labels[s:e] == -100).all():
            assert loss[t] == 0 and not dh[s:e].any()


@pytest.mark.parametrize("labelled", ["every row", "no row"])
@pytest.mark.parametrize("chunk", [5, 1000])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_segment_cross_entropy_every_or_no_row_labelled(labelled, chunk, onednn):
    """The kernel gathers the labelled rows where some are ignored: with none ignored it runs on
    h itself, and with all ignored it has no row to run (zero losses, zero gradient)."""
    sizes = [7, 0, 12, 4]
    h, W, _ = _ce_inputs(sizes, 19, 37, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    labels = (torch.randint(0, 37, (sum(sizes),), generator=g) if labelled == "every row"
              else torch.full((sum(sizes),), -100))
    loss, dh = _ce_against_fp64(h, W, labels, TaskLayout.from_sizes(sizes), chunk, onednn)
    if labelled == "no row":
        assert not loss.any() and not dh.any()
    else:
        assert (loss[[0, 2, 3]] > 0).all() and dh.abs().sum(1).gt(0).all()


@pytest.mark.parametrize("chunk", [50, 1000])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_segment_cross_entropy_fp32_model_sized(chunk, onednn):
    """A model's widths (sums of hundreds of terms): errors as the fp32 reference's."""
    sizes = [37, 0, 64, 29]
    h, W, labels = _ce_inputs(sizes, 203, 1031, torch.float32, seed=4)
    layout = TaskLayout.from_sizes(sizes)
    h64, h32 = h.double().requires_grad_(), h.clone().requires_grad_()
    want = segment_cross_entropy_ref(h64, W.double(), labels, layout)
    (dh_want,) = torch.autograd.grad(want.sum(), h64)
    ref = segment_cross_entropy_ref(h32, W, labels, layout)
    (dh_ref,) = torch.autograd.grad(ref.sum(), h32)
    loss, dh = ops.segment_cross_entropy_fwd(h, W, labels, layout.offsets_tensor(), chunk,
                                             onednn)
    assert_close_like_torch("loss", loss, ref.detach(), want.detach())
    assert_close_like_torch("dh", dh, dh_ref, dh_want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segment_cross_entropy_low_precision(dtype):
    sizes = [4, 0, 9, 5]
    h, W, labels = _ce_inputs(sizes, 24, 41, dtype)
    layout = TaskLayout.from_sizes(sizes)
    h64 = h.double().requires_grad_()
    want = segment_cross_entropy_ref(h64, W.double(), labels, layout)
    (dh_want,) = torch.autograd.grad(want.sum(), h64)
    loss, dh = ops.segment_cross_entropy_fwd(h, W, labels, layout.offsets_tensor(), 4)
    assert dh.dtype == dtype
    assert_close(loss, want.detach(), dtype, reduction=24 + 41)
    assert_close(dh, dh_want, dtype, reduction=24 + 2 * 41)


# ------------------------------------------------------------------- the fused layers' kernels
def _rotary_inputs(B, H, L, D, batch_tables=False, seed=0):
    """q, k as transposed views of a [B, L, H, D] projection output (as Llama makes them), and
    cos/sin [B or 1, 1, L, D] (the second half of the table differs from the first, so that a
    kernel mixing up the halves fails)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, L, max(1, H - 1), D, generator=g).transpose(1, 2)
    angles = torch.rand(B if batch_tables else 1, 1, L, D, generator=g) * 6
    return q, k, angles.cos(), angles.sin()


@pytest.mark.parametrize("B,H,L,D,batch_tables", [(1, 1, 1, 2, False), (2, 3, 5, 6, True),
                                                  (3, 4, 7, 64, False), (1, 2, 33, 10, True)])
def test_rotary_fwd_is_bitwise_the_op_by_op_form_and_keeps_the_layout(B, H, L, D, batch_tables):
    from metakernels.fused import _rotate
    q, k, cos, sin = _rotary_inputs(B, H, L, D, batch_tables)
    got_q, got_k = ops.rotary_fwd(q, k, cos, sin)
    want_q, want_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    assert _same_bits(got_q, want_q) and _same_bits(got_k, want_k)
    assert got_q.stride() == q.stride() and got_k.stride() == k.stride()


@pytest.mark.parametrize("B,H,L,D,batch_tables", [(1, 1, 1, 2, False), (2, 3, 5, 6, True),
                                                  (3, 4, 7, 64, False)])
def test_rotary_bwd_is_the_transpose_of_the_forward(B, H, L, D, batch_tables):
    from metakernels.fused import _rotate
    q, _, cos, sin = _rotary_inputs(B, H, L, D, batch_tables)
    dy = torch.randn(q.shape)
    qr = q.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_rotate(qr, cos, sin), qr, dy)
    assert_close(ops.rotary_bwd(dy, cos, sin), want, reduction=2)
    assert_close(ops.rotary_bwd(dy.transpose(1, 2).contiguous().transpose(1, 2), cos, sin), want,
                 reduction=2)


@pytest.mark.parametrize("layout", ["l-outermost", "sliced"])
def test_rotary_walks_any_row_layout(layout):
    """The kernels walk the rows in the input's memory order: q from an [L, H, B, D] buffer (the
    row axes in another order than any projection gives), or a slice of a wider buffer (not
    dense: the output then gets its own, contiguous, strides)."""
    from metakernels.fused import _rotate
    B, H, L, D = 3, 4, 9, 8
    g = torch.Generator().manual_seed(3)
    if layout == "l-outermost":
        q = torch.randn(L, H, B, D, generator=g).permute(2, 1, 0, 3)
    else:
        q = torch.randn(B, L, H, 3 * D, generator=g)[..., D:2 * D].transpose(1, 2)
    angles = torch.rand(B, 1, L, D, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    got, _ = ops.rotary_fwd(q, q, cos, sin)
    assert _same_bits(got, _rotate(q, cos, sin))
    dy = torch.randn(q.shape, generator=g)
    dy = dy.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) if layout == "sliced" else dy
    qr = q.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_rotate(qr, cos, sin), qr, dy)
    assert_close(ops.rotary_bwd(dy, cos, sin), want, reduction=2)


def _rms_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    weight = torch.rand(shape[-1], generator=g) + 0.5
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x, weight, rstd


def _ulps(got, want):
    """Largest distance in units in the last place (fp32) between two same-signed tensors."""
    a, b = got.view(torch.int32).long(), want.view(torch.int32).long()
    return int((a - b).abs().max()) if got.numel() else 0


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 5, 7), (64, 512), (2, 9, 130)])
def test_rms_norm_fwd_vs_the_library(shape):
    from metakernels.fused import _rms_norm_ref
    x, weight, rstd_want = _rms_inputs(shape)
    x[0, ..., 0] = 1e4                                 # one row dominated by a single element
    rstd_want = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    y, rstd = ops.rms_norm_fwd(x, weight, 1e-6)
    assert rstd.shape == (*shape[:-1], 1) and y.shape == shape
    # the same roundings but the order of the row sum: a few ulps
    assert _ulps(rstd, rstd_want) <= 2
    want = _rms_norm_ref(x, weight, 1e-6)
    assert torch.equal(y.sign(), want.sign()) and _ulps(y.abs(), want.abs()) <= 4
    # with the library's rstd the products round exactly as the library's
    same_r = weight * (x * rstd)
    assert _same_bits(y, same_r)
    # strided input
    xt = x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 1 else x
    assert _same_bits(ops.rms_norm_fwd(xt, weight, 1e-6)[0], y)


def _rms_want(x, weight, dy):
    xr = x.double().requires_grad_()    # the reference in fp64
    y = weight.double() * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6))
    return torch.autograd.grad(y, xr, dy.double())[0]


@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 7), (64, 512), (2, 9, 130)])
def test_rms_norm_bwd_vs_autograd(shape):
    x, weight, rstd = _rms_inputs(shape)
    dy = torch.randn(shape)
    want = _rms_want(x, weight, dy)
    D = shape[-1]   # mean(x^2) and mean(g * xhat): two sums over the row
    assert_close(ops.rms_norm_bwd(dy, x, weight, rstd), want, reduction=2 * D)
    # from the forward's output instead of its input (signed weights)
    weight = weight * torch.where(torch.rand(shape[-1]) < 0.5, -1.0, 1.0)
    want = _rms_want(x, weight, dy)
    y, rstd = ops.rms_norm_fwd(x, weight, 1e-6)
    assert_close(ops.rms_norm_bwd(dy, y, weight, rstd, True), want, reduction=2 * D)


@pytest.mark.parametrize("shape", [(1,), (3, 7, 5), (1024, 1376), (17, 33)])
def test_swiglu_fwd_vs_the_library(shape):
    g = torch.Generator().manual_seed(2)
    gate = torch.randn(shape, generator=g) * 6
    gate.view(-1)[:3] = torch.tensor([-200.0, 200.0, -1.2785])[: gate.numel()]  # tails, root
    up = torch.randn(shape, generator=g)
    assert_close(ops.swiglu_fwd(gate, up), F.silu(gate.double()) * up.double())
    if gate.dim() == 2:   # transposed (strided) inputs
        assert _same_bits(ops.swiglu_fwd(gate.t(), up.t()),
                          ops.swiglu_fwd(gate.t().contiguous(), up.t().contiguous()))


# bf16: the kernels load bf16, compute in fp32 and round where the library's bf16 ops round
# (rotary: each product and the sum; RMSNorm: x * r, then the weight's product; SwiGLU: silu,
# then the product), so that their forwards are the library's bf16 forms to the last bit but for
# the row sum's order and the exp (at most 1 bf16 ulp); their backwards round once, from fp32.
def _bf16_ulps(got, want):
    """Largest distance in bf16 units in the last place between two same-signed tensors."""
    a, b = got.view(torch.int16).long(), want.view(torch.int16).long()
    return int((a - b).abs().max()) if got.numel() else 0


@pytest.mark.parametrize("B,H,L,D,batch_tables", [(1, 1, 1, 2, False), (2, 3, 5, 6, True),
                                                  (3, 4, 7, 64, False)])
def test_rotary_bf16_is_bitwise_the_op_by_op_form(B, H, L, D, batch_tables):
    from metakernels.fused import _rotate
    q, k, cos, sin = (t.bfloat16() for t in _rotary_inputs(B, H, L, D, batch_tables, seed=7))
    got_q, got_k = ops.rotary_fwd(q, k, cos, sin)
    assert got_q.dtype == torch.bfloat16 and got_q.stride() == q.stride()
    assert torch.equal(got_q.view(torch.int16), _rotate(q, cos, sin).view(torch.int16))
    assert torch.equal(got_k.view(torch.int16), _rotate(k, cos, sin).view(torch.int16))
    dy = torch.randn(q.shape).bfloat16()
    qr = q.double().requires_grad_()
    (want,) = torch.autograd.grad(_rotate(qr, cos.double(), sin.double()), qr, dy.double())
    got = ops.rotary_bwd(dy, cos, sin)
    assert got.dtype == torch.bfloat16
    assert_close(got, want, reduction=2)


@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 7), (64, 512), (2, 9, 130)])
def test_rms_norm_bf16_vs_the_library(shape):
    from metakernels.fused import _rms_norm_ref
    x, weight, _ = _rms_inputs(shape, seed=3)
    x, weight = x.bfloat16(), weight.bfloat16()
    y, rstd = ops.rms_norm_fwd(x, weight, 1e-6)
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32
    want = _rms_norm_ref(x, weight, 1e-6)              # the library's bf16 roundings
    assert torch.equal(y.sign(), want.sign()) and _bf16_ulps(y.abs(), want.abs()) <= 1
    dy = torch.randn(shape).bfloat16()
    want_dx = _rms_want(x.float(), weight.float(), dy.float())
    dx = ops.rms_norm_bwd(dy, x, weight, rstd)
    assert dx.dtype == torch.bfloat16
    assert_close(dx, want_dx, reduction=2 * shape[-1])
    # from the output (xhat = y / w, y rounded to bf16: one more bf16 rounding of xhat)
    assert_close(ops.rms_norm_bwd(dy, y, weight, rstd, True), want_dx, torch.bfloat16,
                 reduction=2 * shape[-1])


@pytest.mark.parametrize("shape", [(1,), (3, 7, 5), (17, 33), (256, 1376)])
def test_swiglu_bf16_vs_the_library(shape):
    g = torch.Generator().manual_seed(4)
    gate = (torch.randn(shape, generator=g) * 6).bfloat16()
    up = torch.randn(shape, generator=g).bfloat16()
    y = ops.swiglu_fwd(gate, up)
    want = F.silu(gate) * up                            # the library's bf16 roundings
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.sign(), want.sign()) and _bf16_ulps(y.abs(), want.abs()) <= 1
    dy = torch.randn(shape, generator=g).bfloat16()
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    want_dg, want_du = torch.autograd.grad(F.silu(gr) * ur, (gr, ur), dy.double())
    dg, du = ops.swiglu_bwd(dy, gate, up)
    assert dg.dtype == du.dtype == torch.bfloat16
    assert_close(dg, want_dg)
    assert_close(du, want_du)


def test_fused_layer_kernels_reject_mixed_dtypes():
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match=r"weight must have dtype torch.bfloat16"):
        ops.rms_norm_fwd(x, torch.rand(8) + 0.5, 1e-6)
    with pytest.raises(RuntimeError, match=r"up must have dtype torch.bfloat16"):
        ops.swiglu_fwd(x, x.float())
    q, k, cos, sin = _rotary_inputs(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match=r"cos must have dtype torch.bfloat16"):
        ops.rotary_fwd(q.bfloat16(), k.bfloat16(), cos, sin.bfloat16())
    with pytest.raises(RuntimeError, match=r"x must have dtype torch.float32 or torch.bfloat16"):
        ops.rms_norm_fwd(x.half(), torch.rand(8).half(), 1e-6)


def _attention_inputs(B, H, Hkv, L, D, seed=0, contiguous=False):
    """q, k, v as transposed views of [B, L, heads, D] projection outputs (or contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, h, D, generator=g).transpose(1, 2) for h in (H, Hkv, Hkv))
    if contiguous:
        q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v


def _attention_want(q, k, v, mask, causal, scale, dout):
    """fp64 reference (the math form, keys repeated for grouped heads) and its gradients."""
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kk, vv = kr.repeat_interleave(rep, 1), vr.repeat_interleave(rep, 1)
    s = (qr @ kk.transpose(-1, -2)) * scale
    L = q.shape[2]
    keep = torch.ones(L, L, dtype=torch.bool).tril() if causal else torch.ones(L, L, dtype=torch.bool)
    keep = keep if mask is None else mask
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)        # a fully masked row: zeros
    out = p @ vv
    return out, torch.autograd.grad(out, (qr, kr, vr), dout.double())


@pytest.mark.parametrize("B,H,Hkv,L,D,causal,contiguous", [
    (1, 1, 1, 2, 2, True, False), (2, 4, 2, 7, 6, True, False), (3, 8, 8, 64, 64, True, True),
    (2, 6, 3, 37, 16, False, False), (1, 2, 1, 130, 8, True, False),
    # block products with column tails past one and two 16-wide vectors, row tails of 1-3
    (2, 3, 1, 33, 80, True, False), (1, 2, 2, 51, 40, False, True), (1, 2, 1, 128, 128, True, False)])
def test_attention_vs_the_math_form(B, H, Hkv, L, D, causal, contiguous):
    q, k, v = _attention_inputs(B, H, Hkv, L, D, contiguous=contiguous)
    scale = 0.7 / D ** 0.5
    dout = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(9))
    out, lse = ops.attention_fwd(q, k, v, None, causal, scale)
    want, grads = _attention_want(q, k, v, None, causal, scale, dout)
    assert_close(out, want, reduction=D + 2 * L)   # scores over D; softmax and P @ v over L
    assert out.transpose(1, 2).is_contiguous()       # [B, L, H, D] underneath
    got = ops.attention_bwd(dout, q, k, v, out, lse, None, causal, scale)
    for a, b, t in zip(got, grads, (q, k, v)):
        # dO . v over D, then sums over the keys and (dk, dv) the query rows of each group
        assert_close(a, b, reduction=2 * D + 3 * L * H // Hkv)
        assert a.shape == t.shape


@pytest.mark.parametrize("L", [9, 70])     # one block of query rows; three, the last of 6 rows
def test_attention_with_a_padding_mask_and_fully_masked_rows(L):
    B, H, Hkv, D = 3, 4, 2, 8
    q, k, v = _attention_inputs(B, H, Hkv, L, D, seed=1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[0, 6:] = False             # right padding
    pad[1, :3] = False             # left padding: query rows 0-2 attend to nothing
    mask = (causal & pad[:, None, None, :])
    dout = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(3))
    out, lse = ops.attention_fwd(q, k, v, mask, True, 0.3)
    want, grads = _attention_want(q, k, v, mask, True, 0.3, dout)
    assert_close(out, want, reduction=D + 2 * L)
    assert torch.all(out[1, :, :3] == 0) and torch.isinf(lse[1, :, :3]).all()
    got = ops.attention_bwd(dout, q, k, v, out, lse, mask, True, 0.3)
    for a, b in zip(got, grads):
        assert torch.isfinite(a).all()
        assert_close(a, b, reduction=2 * D + 3 * L * H // Hkv)
    # one key: the output is v
    assert torch.equal(ops.attention_fwd(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, True, 0.3)[0],
                       v[:, :, :1].repeat_interleave(2, 1))
    # a mask for the whole batch ([1, 1, L, L]) broadcasts
    out1, _ = ops.attention_fwd(q, k, v, causal[None, None], False, 0.3)
    assert_close(out1, ops.attention_fwd(q, k, v, None, True, 0.3)[0], reduction=D + 2 * L)


@pytest.mark.parametrize("B,H,Hkv,L,D,masked", [(2, 4, 2, 7, 6, False), (3, 8, 8, 64, 64, False),
                                                (1, 2, 1, 130, 8, False), (3, 4, 2, 70, 8, True)])
def test_attention_bf16_is_the_fp32_kernel_rounded_once(B, H, Hkv, L, D, masked):
    """bf16 q, k, v: each head converted to fp32 inside the kernel (exactly), the fp32 kernel's
    products in the same order, the results rounded to bf16 once: bitwise the fp32 kernel on the
    same values, rounded; and within bf16's rounding of the fp64 math form."""
    q, k, v = (t.bfloat16() for t in _attention_inputs(B, H, Hkv, L, D, seed=5))
    mask = None
    if masked:
        pad = torch.ones(B, L, dtype=torch.bool)
        pad[1, :3] = False
        mask = torch.ones(L, L, dtype=torch.bool).tril() & pad[:, None, None, :]
    dout = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(6)).bfloat16()
    out, lse = ops.attention_fwd(q, k, v, mask, True, 0.3)
    out32, lse32 = ops.attention_fwd(q.float(), k.float(), v.float(), mask, True, 0.3)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous()
    assert torch.equal(out, out32.bfloat16()) and torch.equal(lse, lse32)
    got = ops.attention_bwd(dout, q, k, v, out, lse, mask, True, 0.3)
    got32 = ops.attention_bwd(dout.float(), q.float(), k.float(), v.float(), out.float(), lse,
                              mask, True, 0.3)
    want, grads = _attention_want(q, k, v, mask, True, 0.3, dout)
    assert_close(out, want, reduction=D + 2 * L)
    for a, a32, t in zip(got, got32, (q, k, v)):
        assert a.dtype == torch.bfloat16 and a.shape == t.shape
        assert torch.equal(a, a32.bfloat16())
    # against fp64 with the forward's output rounded to bf16 as the backward reads it
    for a, b in zip(got, grads):
        assert_close(a, b, reduction=2 * D + 3 * L * H // Hkv)


def test_attention_without_queries_passes_zero_key_gradients():
    q, k, v = _attention_inputs(2, 4, 2, 5, 6)
    q0 = q[:, :, :0]
    out, lse = ops.attention_fwd(q0, k, v, None, False, 0.3)
    assert out.shape == (2, 4, 0, 6) and lse.shape == (2, 4, 0)
    dq, dk, dv = ops.attention_bwd(out, q0, k, v, out, lse, None, False, 0.3)
    assert dq.shape == q0.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_fused_layer_kernels_reject_bad_input():
    q, k, cos, sin = _rotary_inputs(2, 3, 5, 6)
    with pytest.raises(RuntimeError, match="rotary_fwd: q must have dtype torch.float32"):
        ops.rotary_fwd(q.double(), k, cos, sin)
    with pytest.raises(RuntimeError, match="rotary_fwd: q must have an even head size"):
        ops.rotary_fwd(q[..., :5], k[..., :5], cos[..., :5], sin[..., :5])
    with pytest.raises(RuntimeError, match="rotary_bwd: cos must be broadcastable"):
        ops.rotary_bwd(q, cos[:, :, :4], sin)
    x, w, r = _rms_inputs((4, 6))
    with pytest.raises(RuntimeError,
                       match=r"rms_norm_bwd: weight must be \[D\] with D == x.size\(-1\), i.e. \[6\]"):
        ops.rms_norm_bwd(torch.randn(4, 6), x, w[:5], r)
    with pytest.raises(RuntimeError, match="swiglu_bwd: up must be gate's shape"):
        ops.swiglu_bwd(torch.randn(4, 6), x, x[:3])
    with pytest.raises(RuntimeError, match="swiglu_fwd: up must be gate's shape"):
        ops.swiglu_fwd(x, x[:3])
    q, k, v = _attention_inputs(2, 4, 2, 5, 6)
    with pytest.raises(RuntimeError, match=r"attention_fwd: q's heads \(4\) must be a multiple "
                                           r"of k's \(3\)"):
        ops.attention_fwd(q, *_attention_inputs(2, 3, 3, 5, 6)[1:], None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"attention_fwd: mask must be \[B or 1, 1, Lq, Lk\]"):
        ops.attention_fwd(q, k, v, torch.ones(2, 1, 5, 4, dtype=torch.bool), True, 1.0)
    with pytest.raises(RuntimeError, match="attention_fwd: mask must have dtype torch.bool"):
        ops.attention_fwd(q, k, v, torch.ones(2, 1, 5, 5), True, 1.0)
    with pytest.raises(RuntimeError, match="attention_bwd: q must have a unit last stride"):
        ops.attention_bwd(q, q.transpose(2, 3), k, v, q, torch.zeros(2, 4, 5), None, True, 1.0)
    with pytest.raises(RuntimeError, match="rms_norm_fwd: x must have dtype torch.float32"):
        ops.rms_norm_fwd(x.double(), w, 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm_fwd: weight must be \[D\]"):
        ops.rms_norm_fwd(x, w[:5], 1e-6)
    w0 = w.clone()
    w0[2] = 0
    with pytest.raises(RuntimeError, match=r"rms_norm_bwd: x_is_output needs a weight without "
                                           r"zeros .* weight\[2\] is 0"):
        ops.rms_norm_bwd(torch.randn(4, 6), x, w0, r, True)


# ------------------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    sizes = [3, 0, 2, 4]
    off = _offsets(sizes)
    x, W, b, A, B, dy = _mll_inputs(sizes, 6, 5, 3)
    xa = ops.multi_lora_linear_fwd(x, W, b, A, B, off, 0.5)[1]
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    T, P = 4, 33
    fast, grad, lr = torch.randn(T, P), torch.randn(T, P), torch.rand(T)
    st = AdamState(torch.randn(T, P), torch.rand(T, P), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    h, Wv, labels = _ce_inputs(sizes, 6, 11, torch.float32)
    return {
        "mll_fwd": (ops.multi_lora_linear_fwd, (rg(x), W, b, rg(A), rg(B), off, 0.5)),
        "mll_fwd_no_base": (ops.multi_lora_linear_fwd, (rg(x), None, None, rg(A), B, off, 0.5)),
        "mll_bwd": (ops.multi_lora_linear_bwd,
                    (rg(dy), x, W, A, B, xa, off, 0.5, torch.randn(A.shape), torch.randn(B.shape),
                     True)),
        "mll_bwd_no_dx": (ops.multi_lora_linear_bwd,
                          (rg(dy), x, None, A, B, xa, off, 0.5, torch.randn(A.shape),
                           torch.randn(B.shape), False)),
        "sgd": (ops.fused_sgd_, (fast.clone(), rg(grad), lr, 1.0, 0.1)),
        "adam": (ops.fused_adam_, (fast.clone(), rg(grad), st.exp_avg, st.exp_avg_sq, st.step, lr,
                                   1.0, 0.9, 0.999, 1e-8, 0.1)),
        "fomaml": (ops.meta_reduce, (rg(fast), lr, fast.new_empty(0), 0)),
        "reptile": (ops.meta_reduce, (rg(fast), lr, torch.randn(P), 1)),
        "xent": (ops.segment_cross_entropy_fwd, (rg(h), Wv, labels, off, 2)),
        "xent_onednn": (ops.segment_cross_entropy_fwd, (rg(h), Wv, labels, off, 3, True)),
        "mll_fwd_onednn": (ops.multi_lora_linear_fwd, (rg(x), W, b, rg(A), rg(B), off, 0.5, True)),
        "mll_bwd_onednn": (ops.multi_lora_linear_bwd,
                           (rg(dy), x, W, A, B, xa, off, 0.5, torch.randn(A.shape),
                            torch.randn(B.shape), True, True)),
        "rotary_fwd": (ops.rotary_fwd, (rg(_rotary_inputs(2, 3, 5, 6)[0]),
                                        *_rotary_inputs(2, 3, 5, 6)[1:])),
        "rotary_bwd": (ops.rotary_bwd, (rg(_rotary_inputs(2, 3, 5, 6)[0]),
                                        *_rotary_inputs(2, 3, 5, 6)[2:])),
        "rms_norm_fwd": (ops.rms_norm_fwd, (rg(_rms_inputs((3, 5, 7))[0]),
                                            _rms_inputs((3, 5, 7))[1], 1e-6)),
        "rms_norm_bwd": (ops.rms_norm_bwd, (rg(torch.randn(3, 5, 7)), *_rms_inputs((3, 5, 7)))),
        "rms_norm_bwd_y": (ops.rms_norm_bwd, (rg(torch.randn(3, 5, 7)), *_rms_inputs((3, 5, 7)),
                                              True)),
        "swiglu_fwd": (ops.swiglu_fwd, (rg(torch.randn(4, 9)), torch.randn(4, 9))),
        "attention_fwd": (ops.attention_fwd, (rg(_attention_inputs(2, 4, 2, 5, 6)[0]),
                                              *_attention_inputs(2, 4, 2, 5, 6)[1:],
                                              torch.ones(2, 1, 5, 5, dtype=torch.bool).tril(),
                                              False, 0.5)),
        "attention_bwd": (ops.attention_bwd, (rg(torch.randn(2, 4, 5, 6)),
                                              *_attention_inputs(2, 4, 2, 5, 6),
                                              torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5), None,
                                              True, 0.5)),
        "swiglu_bwd": (ops.swiglu_bwd, (rg(torch.randn(4, 9)), torch.randn(4, 9),
                                        torch.randn(4, 9))),
        # bf16: the statistics (rstd, lse) stay fp32, which the fake kernels must say too
        "rms_norm_fwd_bf16": (ops.rms_norm_fwd, (rg(_rms_inputs((3, 5, 7))[0].bfloat16()),
                                                 _rms_inputs((3, 5, 7))[1].bfloat16(), 1e-6)),
        "attention_fwd_bf16": (ops.attention_fwd,
                               (rg(_attention_inputs(2, 4, 2, 5, 6)[0].bfloat16()),
                                *(t.bfloat16() for t in _attention_inputs(2, 4, 2, 5, 6)[1:]),
                                None, True, 0.5)),
    }


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("case", list(_OPCHECK))
def test_opcheck(case):
    op, args = _OPCHECK[case]
    # Inputs that require grad: the op has an Autograd kernel (python/bindings.cpp)...
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
    # ...whose outputs refuse a backward pass, so the tracing tests take plain inputs.
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, plain, test_utils=("test_schema", "test_faketensor",
                                                 "test_aot_dispatch_dynamic"))


def test_no_derivative_and_version_bump():
    """Called directly on inputs that require grad, the ops give outputs whose backward raises
    (never outputs silently cut from the graph); the tensors they write get a new version."""
    op, args = _OPCHECK["mll_fwd"]
    y, xa = op(*args)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="derivative for metakernels::multi_lora_linear_fwd is "
                                           "not implemented"):
        y.sum().backward()
    with torch.no_grad():
        y, _ = op(*args)
    assert not y.requires_grad
    op, args = _OPCHECK["mll_bwd"]
    dA, dB = args[8], args[9]
    versions = dA._version, dB._version
    op(*args)
    assert dA._version > versions[0] and dB._version > versions[1]
    fast, grad, lr = torch.randn(2, 5), torch.randn(2, 5), torch.rand(2)
    v = fast._version
    ops.fused_sgd_(fast, grad, lr, 0.0, 0.0)
    assert fast._version > v
    with pytest.raises(RuntimeError, match="fused_sgd_: fast is written in place but requires grad"):
        ops.fused_sgd_(fast.requires_grad_(), grad, lr, 0.0, 0.0)


# --------------------------------------------------------------------------------- input checks
def _bad_input_cases():
    sizes = [3, 0, 2]
    off = _offsets(sizes)
    x, W, b, A, B, dy = _mll_inputs(sizes, 7, 5, 2)
    xa = ops.multi_lora_linear_fwd(x, W, b, A, B, off, 1.0)[1]
    dA, dB = torch.randn(A.shape), torch.randn(B.shape)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    fwd = lambda **kw: ops.multi_lora_linear_fwd(  # noqa: E731
        *[kw.get(k, v) for k, v in dict(x=x, W=W, b=b, A=A, B=B, offsets=off).items()], 1.0)
    bwd = lambda **kw: ops.multi_lora_linear_bwd(  # noqa: E731
        *[kw.get(k, v) for k, v in dict(dy=dy, x=x, W=W, A=A, B=B, xa=xa, offsets=off).items()],
        1.0, kw.get("dA", dA), kw.get("dB", dB), True)
    T, P = 3, 10
    fast, grad, lr = torch.randn(T, P), torch.randn(T, P), torch.rand(T)
    m, v, step = torch.zeros(T, P), torch.zeros(T, P), torch.zeros(T)
    sgd = lambda **kw: ops.fused_sgd_(  # noqa: E731
        kw.get("fast", fast), kw.get("grad", grad), kw.get("lr", lr), kw.get("max_norm", 1.0), 0.0)
    adam = lambda **kw: ops.fused_adam_(  # noqa: E731
        fast, grad, kw.get("exp_avg", m), kw.get("exp_avg_sq", v), kw.get("step", step), lr, 1.0,
        kw.get("beta1", 0.9), 0.999, kw.get("eps", 1e-8), 0.0)
    theta = torch.randn(P)
    red = lambda **kw: ops.meta_reduce(  # noqa: E731
        kw.get("x", fast), kw.get("weights", lr), kw.get("theta", theta), kw.get("kind", 1))
    h, Wv, labels = _ce_inputs(sizes, 4, 9, torch.float32)
    ce = lambda **kw: ops.segment_cross_entropy_fwd(  # noqa: E731
        kw.get("h", h), kw.get("W", Wv), kw.get("labels", labels), kw.get("offsets", off),
        kw.get("chunk", 2))
    bad_labels = labels.clone()
    bad_labels[1] = 9
    return {
        # offsets, through each op that takes them
        "offsets non-monotone": (lambda: fwd(offsets=i32([0, 3, 2, 5])),
                                 r"multi_lora_linear_fwd: offsets must be non-decreasing, got "
                                 r"offsets\[1\]=3 > offsets\[2\]=2"),
        "offsets wrong length": (lambda: bwd(offsets=i32([0, 3, 5])),
                                 r"multi_lora_linear_bwd: offsets must have length T \+ 1 = 4"),
        "offsets[-1] != N": (lambda: fwd(offsets=i32([0, 3, 3, 4])),
                             r"offsets\[T\] must equal the number of rows N = 5, got offsets\[3\]=4"),
        "offsets[0] != 0": (lambda: ce(offsets=i32([1, 3, 3, 5])), r"offsets\[0\] must be 0"),
        "offsets dtype": (lambda: fwd(offsets=off.long()),
                          r"offsets must have dtype torch.int32, got shape \[4\], dtype torch.int64"),
        "offsets 2-D": (lambda: ce(offsets=off[None]), r"offsets must be 1-D"),
        # multi_lora_linear shapes and dtypes
        "A in": (lambda: fwd(A=A[:, :6]),
                 r"multi_lora_linear_fwd: A must be \[T, in, r\] with in == x.size\(1\), i.e. "
                 r"\[3, 7, 2\], got shape \[3, 6, 2\], dtype torch.float32"),
        "A dim": (lambda: fwd(A=A[0]), r"A must be 3-D \[T, in, r\], got shape \[7, 2\]"),
        "B r": (lambda: fwd(B=B[:, :1]), r"B must be \[T, r, out\]"),
        "B dtype": (lambda: fwd(B=B.double()), r"B must have dtype torch.float32, got .*float64"),
        "W shape": (lambda: fwd(W=W[:4]), r"W must be \[out, in\].*got shape \[4, 7\]"),
        "W dtype": (lambda: fwd(W=W.bfloat16()), r"W must have dtype torch.float32"),
        "b shape": (lambda: fwd(b=b[:3]), r"b must be \[out\]"),
        "b without W": (lambda: fwd(W=None), r"b is given without W"),
        "x dtype": (lambda: fwd(x=x.long()), r"x must have dtype torch.float32, torch.bfloat16 or"),
        "x dim": (lambda: fwd(x=x[None]), r"x must be 2-D \[N, in\]"),
        "dy shape": (lambda: bwd(dy=dy[:, :4]), r"multi_lora_linear_bwd: dy must be \[N, out\]"),
        "dy dtype": (lambda: bwd(dy=dy.double()), r"dy must have dtype torch.float32"),
        "xa shape": (lambda: bwd(xa=xa[:4]), r"xa must be \[N, r\]"),
        "dA shape": (lambda: bwd(dA=dA[:2]), r"dA must be \[T, in, r\]"),
        "dB dtype": (lambda: bwd(dB=dB.double()), r"dB must have dtype torch.float32"),
        # fused updates
        "sgd grad shape": (lambda: sgd(grad=grad[:, :9]),
                           r"fused_sgd_: grad must be \[T, P\] like fast, i.e. \[3, 10\], got "
                           r"shape \[3, 9\]"),
        "sgd fast contiguous": (lambda: sgd(fast=torch.randn(P, T).T),
                                r"fused_sgd_: fast must be contiguous"),
        "sgd fast dtype": (lambda: sgd(fast=fast.double()), r"fast must have dtype torch.float32"),
        "sgd lr shape": (lambda: sgd(lr=lr[:2]), r"lr must be \[T\]"),
        "sgd max norm": (lambda: sgd(max_norm=-1.0), r"max_grad_norm must be >= 0"),
        "adam exp_avg": (lambda: adam(exp_avg=m[:2]), r"fused_adam_: exp_avg must be \[T, P\]"),
        "adam exp_avg_sq": (lambda: adam(exp_avg_sq=v.half()), r"exp_avg_sq must have dtype"),
        "adam step": (lambda: adam(step=step[:1]), r"step must be \[T\]"),
        "adam beta1": (lambda: adam(beta1=1.0), r"beta1 must be in \[0, 1\)"),
        "adam eps": (lambda: adam(eps=0.0), r"eps must be > 0"),
        # meta_reduce
        "reduce kind": (lambda: red(kind=2), r"meta_reduce: kind must be 0 \(fomaml\) or 1"),
        "reduce weights": (lambda: red(weights=lr[:2]), r"weights must be \[T\]"),
        "reduce theta": (lambda: red(theta=theta[:9]), r"theta must be \[P\]"),
        "reduce theta fomaml": (lambda: red(kind=0), r"theta must be empty for kind 0"),
        "reduce x dtype": (lambda: red(x=fast.double()), r"x must have dtype torch.float32"),
        # segment_cross_entropy
        "ce W d": (lambda: ce(W=Wv[:, :3]), r"segment_cross_entropy_fwd: W must be \[V, d\]"),
        "ce W dtype": (lambda: ce(W=Wv.double()), r"W must have dtype torch.float32"),
        "ce labels dtype": (lambda: ce(labels=labels.int()), r"labels must have dtype torch.int64"),
        "ce labels shape": (lambda: ce(labels=labels[:4]), r"labels must be \[N\]"),
        "ce labels range": (lambda: ce(labels=bad_labels),
                            r"labels\[1\]=9 is neither -100 nor a class in \[0, V = 9\)"),
        "ce chunk": (lambda: ce(chunk=0), r"chunk_size must be >= 1"),
        "ce offsets length": (lambda: ce(offsets=i32([0])), r"offsets must have length T \+ 1 >= 2"),
    }


_BAD = _bad_input_cases()


@pytest.mark.parametrize("case", list(_BAD))
def test_rejects_bad_input(case):
    fn, message = _BAD[case]
    with pytest.raises(RuntimeError, match=message):
        fn()
