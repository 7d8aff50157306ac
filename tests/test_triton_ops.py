"""The Triton kernels against the plain-PyTorch references, under ``TRITON_INTERPRET=1``.

Every output and every gradient is compared with an oracle (fp64 where the reference allows it,
else fp32 on upcast inputs). Tolerance, flash-attention style, keyed by dtype through torch
itself: the kernel may err at most twice as much as the torch reference does at the same dtype,
plus an fp32 rounding floor (so fp32 stays tight and bf16/fp16 are judged against what bf16/fp16
torch achieves). Shapes are small and odd: the interpreter is slow. That the kernels compile
for sm_80/sm_90, and use the tensor cores there, is ``tests/test_triton_compile.py``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from metakernels import TaskLayout, backend  # noqa: E402
from metakernels.batch import IGNORE_INDEX  # noqa: E402
from metakernels.ops import (AdamState, fused_update, fused_update_ref, meta_reduce,  # noqa: E402
                             meta_reduce_ref, multi_lora_linear, multi_lora_linear_ref,
                             segment_cross_entropy, segment_cross_entropy_ref)
from metakernels.ops.multi_lora_linear import _torch_bwd, _torch_fwd  # noqa: E402

from conftest import assert_close, assert_close_like_torch  # noqa: E402

pytestmark = pytest.mark.skipif(
    not backend.triton_available(torch.device("cpu")),
    reason="TRITON_INTERPRET is not 1: the Triton kernels cannot run on CPU tensors")

from metakernels.ops._triton import fused_update as tri_update  # noqa: E402
from metakernels.ops._triton import meta_reduce as tri_reduce  # noqa: E402
from metakernels.ops._triton import multi_lora_linear as tri_lora  # noqa: E402
from metakernels.ops._triton import segment_cross_entropy as tri_ce  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# tasks x rows, as in punica's tests; then ragged with an empty task
LAYOUTS = {"1x7": [7], "7x1": [1] * 7, "3x3": [3, 3, 3], "ragged_empty": [4, 0, 5, 2]}
# segments longer than the row tiles (16 rows of the shrink at these sizes, 32 rows per step
# of the segment-outer loop), so the kernels' row loops take several iterations
LONG_LAYOUT = [40, 0, 35]


def mll_fp64_oracle(x, W, b, A, B, layout, scale, dy) -> dict:
    """multi_lora_linear's oracle: the differentiable reference in fp64 (the public op takes no
    fp64), its output and every gradient under the upstream gradient dy."""
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    y64 = multi_lora_linear_ref(x64, W.double(), b64, A64, B64, layout, scale)
    y64.backward(dy.double())
    return {"y": y64.detach(), "x.grad": x64.grad, "b.grad": b64.grad, "dA": A64.grad,
            "dB": B64.grad}


# ---------------------------------------------------------------------------------------------
# multi_lora_linear
# ---------------------------------------------------------------------------------------------
IN_F, OUT_F = 67, 70  # > one 64-wide tile in both directions


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


def _spy(monkeypatch, module, name):
    """Records the calls of ``module.name`` (proves the public op dispatched to the kernel)."""
    calls, fn = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def _f64(t):
    return None if t is None else t.double()


def _zeros_like_views(dA, dB, dtype):
    return (torch.zeros(dA.shape, dtype=dtype), torch.zeros(dB.shape, dtype=dtype))


# Ranks 1 and 3 are padded to a 16-wide tile, 16 fills it, 33 takes the 64 block, 70 two tiles
# (or two steps of the rank loop).
_LORA_CASES = ([(sizes, rank, dtype, base) for sizes in LAYOUTS.values() for rank in (1, 3, 16)
                for dtype in DTYPES for base in (True, False)]
               + [(LAYOUTS["ragged_empty"], rank, dtype, True) for rank in (33, 70)
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


@pytest.mark.parametrize("sizes,rank,dtype,with_base", _LORA_CASES,
                         ids=[_lora_case_id(c) for c in _LORA_CASES])
def test_multi_lora_linear_kernels(sizes, rank, dtype, with_base):
    _check_lora_kernels(*_lora_inputs(sizes, rank, dtype, with_base))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row_block", tri_lora._ROW_BLOCKS)
def test_multi_lora_linear_kernels_both_row_blocks(row_block, dtype, monkeypatch):
    """The shrink's 16- and 64-row tiles: a small test picks 16 (too few programs for 64), so
    the threshold is moved to force each, over segments longer than 64 rows."""
    monkeypatch.setattr(tri_lora, "_MIN_PROGRAMS", 0 if row_block == 64 else 1 << 30)
    assert tri_lora._shrink_blocks(70, 3, 5, dtype)["BLOCK_M"] == row_block
    _check_lora_kernels(*_lora_inputs([70, 0, 35], 5, dtype, True))


def test_multi_lora_linear_block_table():
    """The launchers pick blocks from the table that ``launch_configs`` (and the compile test)
    enumerates, for ranks 1-128 and segments of 0-4096 rows."""
    listed = {(c.kernel, tuple(sorted((k, v) for k, v in c.constexprs.items() if k != "DOT_DTYPE")),
               c.constexprs["DOT_DTYPE"]) for c in tri_lora.launch_configs()}

    def key(kernel, dtype, accumulate=None, **blocks):
        consts = dict(blocks) if accumulate is None else dict(blocks, ACCUMULATE=accumulate)
        return kernel, tuple(sorted(consts.items())), tri_lora._DOT_DTYPE[dtype]
    for dtype in DTYPES:
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


def test_multi_lora_linear_kernels_without_dx():
    layout, x, W, b, A, B = _lora_inputs(LAYOUTS["ragged_empty"], 3, torch.float32, True)
    y, xa = tri_lora.fwd(x, W, b, A, B, layout, 0.5)
    dy = torch.randn_like(y)
    dA, dB = _grad_views(_flat_grad_buffer(layout.num_tasks, 3)[0], 3)
    dA_ref, dB_ref = dA.clone(), dB.clone()
    assert tri_lora.bwd(dy, x, W, A, B, xa, layout, 0.5, dA, dB, False) is None
    _torch_bwd(dy, x, W, A, B, xa, layout, 0.5, dA_ref, dB_ref, False)
    rows = max(layout.sizes)
    assert_close(dA, dA_ref, reduction=rows + OUT_F)
    assert_close(dB, dB_ref, reduction=rows + IN_F)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sink", [False, True], ids=["autograd", "grad_buffers"])
def test_multi_lora_linear_public_op(sink, dtype, monkeypatch):
    """Through ``multi_lora_linear`` with the triton backend forced: the autograd Function, the
    gradient sink into views of the bank's flat buffer (grad_A/grad_B given) or autograd
    gradients for A and B (not given), and db."""
    rank, scale = 3, 2.0
    layout, x, W, b, A, B = _lora_inputs(LAYOUTS["ragged_empty"], rank, dtype, True)
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

    fwd_calls, bwd_calls = _spy(monkeypatch, tri_lora, "fwd"), _spy(monkeypatch, tri_lora, "bwd")
    out = run("triton", A, B, sink)
    assert fwd_calls and bwd_calls, "the triton backend was not used"
    ref = run("torch", A, B, False)  # the contract: dtypes
    lo = run("torch", A.to(dtype), B.to(dtype), False)  # plain PyTorch at x's dtype: the budget
    oracle = mll_fp64_oracle(x, W, b, A, B, layout, scale, dy)
    for key in out:
        assert_close_like_torch(key, out[key], lo[key], oracle[key], dtype=ref[key].dtype)
    if sink:
        assert torch.equal(flat[outside], before[outside]), "bytes outside the views changed"


# ---------------------------------------------------------------------------------------------
# fused_update
# ---------------------------------------------------------------------------------------------
def _bank(T=4, P=2500):
    """fast, grad [T, P] (P > 2 blocks of 1024, odd), per-task lr; task 1 has a NaN gradient,
    task 2 an Inf: both must be skipped and reported."""
    fast, grad = torch.randn(T, P), torch.randn(T, P)
    grad[1, 17] = float("nan")
    grad[2, P // 2 + 1] = float("inf")
    lr = torch.rand(T) * 0.1 + 0.01
    return fast, grad, lr


def _adam_state(T, P):
    return AdamState(torch.randn(T, P) * 0.1, torch.rand(T, P) * 0.01,
                     torch.randint(0, 5, (T,)).float())


def _clone_state(st):
    return None if st is None else AdamState(st.exp_avg.clone(), st.exp_avg_sq.clone(),
                                             st.step.clone())


@pytest.mark.parametrize("entry", ["kernel", "public_op"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("max_grad_norm", [0.0, 30.0])  # 30: clips some tasks, not all
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_update(optimizer, max_grad_norm, weight_decay, entry, monkeypatch):
    fast, grad, lr = _bank()
    grad[3] *= 0.3  # a task under the clip threshold
    T, P = fast.shape
    state = _adam_state(T, P) if optimizer == "adam" else None
    fast_ref, state_ref, grad_before = fast.clone(), _clone_state(state), grad.clone()
    kw = dict(optimizer=optimizer, max_grad_norm=max_grad_norm, betas=(0.9, 0.99), eps=1e-6,
              weight_decay=weight_decay)
    if entry == "kernel":
        norms, finite = tri_update.fused_update(fast, grad, lr, state=state, **kw)
    else:
        calls = _spy(monkeypatch, tri_update, "fused_update")
        with backend.use_backend("triton"):
            norms, finite = fused_update(fast, grad, lr, state=state, **kw)
        assert calls, "the triton backend was not used"
    norms_ref, finite_ref = fused_update_ref(fast_ref, grad, lr, state=state_ref, **kw)
    assert finite.dtype == torch.bool and finite.tolist() == [True, False, False, True]
    assert torch.equal(finite, finite_ref)
    assert_close(norms, norms_ref, reduction=P, equal_nan=True)
    assert_close(fast, fast_ref, reduction=P)   # the clipping coefficient: a norm over P
    for t in (1, 2):  # skipped tasks: bit-identical
        assert torch.equal(fast[t], fast_ref[t])
    if state is not None:
        assert_close(state.exp_avg, state_ref.exp_avg, reduction=P)
        assert_close(state.exp_avg_sq, state_ref.exp_avg_sq, reduction=P)
        assert torch.equal(state.step, state_ref.step)
    assert torch.equal(grad.nan_to_num(), grad_before.nan_to_num()), "grad was written"
    if max_grad_norm:
        clipped = finite & (norms > max_grad_norm)
        assert 0 < int(clipped.sum()) < int(finite.sum()), "the test should clip some tasks only"


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_adam_bias_correction_in_fp64(weight_decay):
    """beta2 = 0.999 at the first steps, where 1 - beta2**step cancels: the kernel's step must
    be within the fp32 reference's own error against the fp64 oracle (the bias corrections
    taken in fp32 put it about 1e-5 relative off). Steps near 1 in size (lr ~ 1) over small
    weights, so that the error of the step is not hidden under the rounding of the weights."""
    T, P = 4, 1500
    fast, grad = torch.randn(T, P) * 1e-2, torch.randn(T, P)
    lr = torch.rand(T) * 0.5 + 0.5
    state = AdamState(torch.randn(T, P) * 0.1, torch.rand(T, P) * 0.01,
                      torch.arange(T, dtype=torch.float32))
    kw = dict(optimizer="adam", max_grad_norm=0.0, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=weight_decay)
    fast_ref, state_ref = fast.clone(), _clone_state(state)
    fast_or = fast.double()
    state_or = AdamState(*(t.double() for t in (state.exp_avg, state.exp_avg_sq, state.step)))
    tri_update.fused_update(fast, grad, lr, state=state, **kw)
    fused_update_ref(fast_ref, grad, lr, state=state_ref, **kw)
    fused_update_ref(fast_or, grad.double(), lr.double(), state=state_or, **kw)
    err, ref_err = (fast.double() - fast_or).abs(), (fast_ref.double() - fast_or).abs()
    floor = 2 ** -24 * fast_or.abs()  # half an ulp of the fp32 result
    assert (err <= 2 * ref_err.max() + floor).all(), (
        f"max error {err.max().item():.3g}, the fp32 reference's {ref_err.max().item():.3g}")


def test_fused_update_float_lr_through_public_op(monkeypatch):
    fast, grad, _ = _bank(T=3, P=37)
    P = 37
    fast_ref = fast.clone()
    calls = _spy(monkeypatch, tri_update, "fused_update")
    with backend.use_backend("triton"):
        norms, finite = fused_update(fast, grad, 0.05, optimizer="sgd", max_grad_norm=1.0)
    assert calls
    norms_ref, finite_ref = fused_update_ref(fast_ref, grad, torch.full((3,), 0.05),
                                             max_grad_norm=1.0)
    assert torch.equal(finite, finite_ref)
    assert_close(norms, norms_ref, reduction=P, equal_nan=True)
    assert_close(fast, fast_ref, reduction=P)   # the clipping coefficient: a norm over P


# ---------------------------------------------------------------------------------------------
# meta_reduce
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["kernel", "public_op"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("kind", ["fomaml", "reptile"])
def test_meta_reduce(kind, T, entry, monkeypatch):
    P = 2500
    x = torch.randn(T, P)
    weights = torch.rand(T) + 0.1
    weights[-1] = 0.0 if T > 1 else weights[-1]  # a dropped task
    theta = torch.randn(P)
    ref = meta_reduce_ref(kind, x, weights, theta)
    oracle = meta_reduce_ref(kind, x.double(), weights.double(), theta.double())
    if entry == "kernel":
        out = tri_reduce.meta_reduce(kind, x, weights, theta if kind == "reptile" else None)
    else:
        calls = _spy(monkeypatch, tri_reduce, "meta_reduce")
        with backend.use_backend("triton"):
            out = meta_reduce(kind, x, weights, theta if kind == "reptile" else None)
            default_w = meta_reduce(kind, x, None, theta if kind == "reptile" else None)
        assert len(calls) == 2, "the triton backend was not used"
        assert_close_like_torch("out (weights=None)", default_w,
                                meta_reduce_ref(kind, x, torch.full((T,), 1.0 / T), theta),
                                meta_reduce_ref(kind, x.double(), torch.full((T,), 1.0 / T,
                                                dtype=torch.float64), theta.double()))
    assert_close_like_torch("out", out, ref, oracle)


# ---------------------------------------------------------------------------------------------
# segment_cross_entropy
# ---------------------------------------------------------------------------------------------
CE_LAYOUTS = {"1x7": [7], "7x1": [1] * 7, "3x3": [3, 3, 3], "ragged_empty": [5, 0, 6, 3]}
D_MODEL = 23


def _ce_inputs(sizes, V, dtype):
    layout = TaskLayout.from_sizes(sizes)
    N = layout.num_rows
    h = torch.randn(N, D_MODEL + 1)[:, :D_MODEL].to(dtype)  # strided rows
    W = (torch.randn(V, D_MODEL) * 2 / D_MODEL ** 0.5).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < 0.3] = IGNORE_INDEX
    if layout.num_tasks > 1:  # a task with no target token at all: loss 0, gradient 0
        t = layout.num_tasks - 1
        labels[layout.offsets[t]:layout.offsets[t + 1]] = IGNORE_INDEX
    return layout, h, W, labels


def _ce_ref(h, W, labels, layout, dloss=None):
    """(loss, dh) of the reference by autograd; dh of ``(loss * dloss).sum()``."""
    h = h.detach().clone().requires_grad_()
    loss = segment_cross_entropy_ref(h, W, labels, layout)
    loss.backward(torch.ones_like(loss) if dloss is None else dloss)
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk_size", [4, 1024], ids=["chunked", "one_chunk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", list(CE_LAYOUTS))
def test_segment_cross_entropy_kernel(layout_name, dtype, chunk_size):
    layout, h, W, labels = _ce_inputs(CE_LAYOUTS[layout_name], 67, dtype)
    loss, dh = tri_ce.fwd(h, W, labels, layout, chunk_size)
    loss_ref, dh_ref = _ce_ref(h, W, labels, layout)
    loss_or, dh_or = _ce_ref(h.float(), W.float(), labels, layout)
    assert loss.dtype == torch.float32
    assert_close_like_torch("loss", loss, loss_ref, loss_or)
    assert_close_like_torch("dh", dh, dh_ref, dh_or)


def test_segment_cross_entropy_kernel_large_vocab():
    """V larger than one vocabulary block (4096): the online logsumexp spans several blocks."""
    layout, h, W, labels = _ce_inputs([4, 3], 5003, torch.float32)
    labels[0] = 5002  # the target in the last, partial block
    loss, dh = tri_ce.fwd(h, W, labels, layout, 3)
    loss_ref, dh_ref = _ce_ref(h, W, labels, layout)
    d, V = W.shape[1], W.shape[0]
    assert_close(loss, loss_ref, reduction=d + V)
    assert_close(dh, dh_ref, reduction=d + 2 * V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_cross_entropy_public_op(dtype, monkeypatch):
    """Through ``segment_cross_entropy`` with the triton backend forced, random upstream
    gradient per task."""
    layout, h, W, labels = _ce_inputs(CE_LAYOUTS["ragged_empty"], 67, dtype)
    dloss = torch.randn(layout.num_tasks)
    calls = _spy(monkeypatch, tri_ce, "fwd")
    hs = h.detach().clone().requires_grad_()
    with backend.use_backend("triton"):
        loss = segment_cross_entropy(hs, W, labels, layout, chunk_size=5)
    assert calls, "the triton backend was not used"
    loss.backward(dloss)
    loss_ref, dh_ref = _ce_ref(h, W, labels, layout, dloss)
    loss_or, dh_or = _ce_ref(h.float(), W.float(), labels, layout, dloss)
    assert_close_like_torch("loss", loss.detach(), loss_ref, loss_or)
    assert_close_like_torch("h.grad", hs.grad, dh_ref, dh_or)
    assert loss[1] == 0 and loss[3] == 0  # the empty task and the task without targets
