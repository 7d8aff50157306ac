"""Every op against its plain-PyTorch reference, on every backend that can run here.

The torch backend's explicit forward/backward (the path used with a gradient buffer) and the
C++ kernels share these tests; the Triton kernels have their own file (interpreter, small)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from metakernels import TaskLayout, backend
from metakernels.ops import (AdamState, fused_update, fused_update_ref, meta_reduce,
                             meta_reduce_ref, multi_lora_linear, multi_lora_linear_ref,
                             segment_cross_entropy, segment_cross_entropy_ref)

from conftest import assert_close, assert_close_like_torch

BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])
LAYOUTS = {"1x7": [7], "7x1": [1] * 7, "3x3": [3, 3, 3], "ragged+empty": [4, 0, 1, 6]}


def _mll_inputs(sizes, in_f, out_f, r, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = TaskLayout.from_sizes(sizes)
    N, T = layout.num_rows, layout.num_tasks
    x = torch.randn(N, in_f, generator=g).to(dtype)
    W = torch.randn(out_f, in_f, generator=g).to(dtype) / in_f ** 0.5
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    A = torch.randn(T, in_f, r, generator=g) / in_f ** 0.5
    B = torch.randn(T, r, out_f, generator=g) / r ** 0.5
    dy = torch.randn(N, out_f, generator=g).to(dtype)
    return layout, x, W, b, A, B, dy


def _reference_grads(layout, x, W, b, A, B, dy, scale):
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = multi_lora_linear_ref(x64, d(W), d(b), A64, B64, layout, scale)
    y.backward(dy.double())
    return y.detach(), x64.grad, A64.grad, B64.grad


def _check_mll(backend_name, layout, x, W, b, A, B, dy, scale, sink):
    y_ref, dx_ref, dA_ref, dB_ref = _reference_grads(layout, x, W, b, A, B, dy, scale)
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
        dA, dB = gA - before[:, 2:2 + in_f * r].view_as(gA), gB - before[
            :, 2 + in_f * r:2 + in_f * r + r * out_f].view_as(gB)
        assert Ar.grad is None and Br.grad is None
        assert torch.equal(flat[:, :2], before[:, :2]) and torch.equal(flat[:, -3:], before[:, -3:])
    else:
        dA, dB = Ar.grad, Br.grad
    in_f, r, out_f, rows = A.shape[1], A.shape[2], B.shape[2], max(layout.sizes)
    # the LoRA terms in the adapters' fp32 whatever x's dtype: dA, dB at fp32 accuracy
    assert_close(dA, dA_ref, reduction=rows + out_f)
    assert_close(dB, dB_ref, reduction=rows + in_f)
    if x.dtype == torch.float32:
        assert_close(y, y_ref, reduction=in_f + r)
        assert_close(xr.grad, dx_ref, reduction=out_f + r)
    else:  # at most ~2x the error plain PyTorch makes at this dtype (flash-attention's rule)
        y_lp = multi_lora_linear_ref(x, W, b, A, B, layout, scale)
        assert_close_like_torch("y", y, y_lp, y_ref)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("r", [1, 3, 16, 64])
@pytest.mark.parametrize("sink", [False, True])
def test_multi_lora_linear_layouts_ranks(backend_name, layout_name, r, sink):
    args = _mll_inputs(LAYOUTS[layout_name], 13, 11, r, seed=r)
    _check_mll(backend_name, *args, scale=0.7, sink=sink)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_lora_linear_low_precision(backend_name, dtype):
    args = _mll_inputs([5, 0, 9], 24, 20, 8, dtype=dtype)
    _check_mll(backend_name, *args, scale=2.0, sink=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_multi_lora_linear_no_base_and_transposed_weight(backend_name):
    layout, x, W, b, A, B, dy = _mll_inputs([3, 2], 9, 6, 4)
    _check_mll(backend_name, layout, x, None, None, A, B, dy, 0.5, sink=True)
    Wt = W.T.contiguous().T  # a non-contiguous [out, in] view, as Conv1D layers give
    _check_mll(backend_name, layout, x, Wt, b, A, B, dy, 0.5, sink=False)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       in_f=st.integers(1, 33), out_f=st.integers(1, 33), r=st.integers(1, 17),
       bias=st.booleans(), sink=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_multi_lora_linear_hypothesis(sizes, in_f, out_f, r, bias, sink, seed):
    args = _mll_inputs(sizes, in_f, out_f, r, bias=bias, seed=seed)
    for name in BACKENDS:
        _check_mll(name, *args, scale=1.3, sink=sink)


def test_multi_lora_linear_reference_is_twice_differentiable():
    layout, x, W, b, A, B, dy = _mll_inputs([2, 3], 5, 4, 2)
    A = A.double().requires_grad_()
    B = B.double().requires_grad_()
    f = lambda A_, B_: (multi_lora_linear_ref(x.double(), W.double(), b.double(), A_, B_, layout,
                                              0.5) ** 2).sum()
    assert torch.autograd.gradgradcheck(f, (A, B))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_multi_lora_linear_rejects_bad_inputs(backend_name):
    layout, x, W, b, A, B, dy = _mll_inputs([3, 2], 9, 6, 4)
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


# --------------------------------------------------------------------------------- fused_update
def _optim_loop(fast0, grads, lr, optimizer, max_norm, wd, eps=1e-8):
    """torch.optim on each task alone: the semantics fused_update promises."""
    out = []
    for t in range(fast0.shape[0]):
        p = torch.nn.Parameter(fast0[t].clone())
        if optimizer == "sgd":
            opt = torch.optim.SGD([p], lr=float(lr[t]), weight_decay=wd)
        else:
            cls = torch.optim.AdamW if wd else torch.optim.Adam
            opt = cls([p], lr=float(lr[t]), weight_decay=wd, eps=eps)
        for g in grads:
            if not torch.isfinite(g[t]).all():
                continue
            p.grad = g[t].clone()
            if max_norm:
                torch.nn.utils.clip_grad_norm_([p], max_norm)
            opt.step()
        out.append(p.detach())
    return torch.stack(out)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("max_norm,wd", [(0.0, 0.0), (1.5, 0.0), (1.5, 0.1)])
def test_fused_update_matches_torch_optim(backend_name, optimizer, max_norm, wd):
    T, P = 5, 1037
    g = torch.Generator().manual_seed(3)
    fast0 = torch.randn(T, P, generator=g)
    grads = [torch.randn(T, P, generator=g) * (t + 1) for t in range(4)]
    grads[1][2, 7] = float("nan")   # task 2 skipped at step 1
    grads[2][4, 0] = float("inf")   # task 4 skipped at step 2
    lr = torch.tensor([0.1, 0.05, 0.01, 0.2, 0.03])
    fast = fast0.clone()
    state = AdamState.zeros_like(fast) if optimizer == "adam" else None
    reported = []
    with backend.use_backend(backend_name):
        for gr in grads:
            norms, finite = fused_update(fast, gr, lr, optimizer=optimizer, state=state,
                                         max_grad_norm=max_norm, weight_decay=wd)
            assert_close(norms[finite], gr.double().norm(dim=1)[finite], reduction=P)
            reported.append(finite.clone())
    assert not reported[1][2] and not reported[2][4] and int(sum(f.sum() for f in reported)) == 18
    want = _optim_loop(fast0, grads, lr, optimizer, max_norm, wd)
    # both sides in fp32: the clipping coefficient from a norm over P, then a few steps
    assert_close(fast, want, reduction=2 * P)
    if state is not None:
        assert state.step.tolist() == [4, 4, 3, 4, 3]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fused_update_rejects_bad_inputs(backend_name):
    fast, grad = torch.randn(3, 10), torch.randn(3, 10)
    with backend.use_backend(backend_name):
        with pytest.raises(ValueError, match="grad must have shape"):
            fused_update(fast, grad[:, :9], 0.1)
        with pytest.raises(ValueError, match="lr must have shape"):
            fused_update(fast, grad, torch.ones(2))
        with pytest.raises(ValueError, match="needs state"):
            fused_update(fast, grad, 0.1, optimizer="adam")


# ---------------------------------------------------------------------------------- meta_reduce
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("kind", ["fomaml", "reptile"])
def test_meta_reduce(backend_name, kind):
    T, P = 6, 777
    x, theta, w = torch.randn(T, P), torch.randn(P), torch.rand(T)
    w[3] = 0
    want = sum(w[t].double() * (x[t].double() if kind == "fomaml" else theta.double() - x[t].double())
               for t in range(T))
    with backend.use_backend(backend_name):
        got = meta_reduce(kind, x, w, theta if kind == "reptile" else None)
    assert_close(got, want, reduction=T)
    assert_close(meta_reduce_ref(kind, x, w, theta), want, reduction=T)


# ------------------------------------------------------------------------ segment_cross_entropy
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("sizes", [[7], [1] * 7, [3, 3, 3], [4, 0, 1, 6]])
@pytest.mark.parametrize("chunk", [1, 5, 4096, None])
def test_segment_cross_entropy(backend_name, sizes, chunk):
    layout = TaskLayout.from_sizes(sizes)
    N, d, V = layout.num_rows, 12, 37
    h = torch.randn(N, d, dtype=torch.float64).requires_grad_()
    W = torch.randn(V, d, dtype=torch.float64)
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100
    dl = torch.randn(layout.num_tasks, dtype=torch.float64)
    want = segment_cross_entropy_ref(h, W, labels, layout)
    (want * dl).sum().backward()
    dh_want = h.grad.clone()
    h32 = h.detach().float().requires_grad_()
    with backend.use_backend(backend_name):
        got = segment_cross_entropy(h32, W.float(), labels, layout, chunk_size=chunk)
    (got * dl.float()).sum().backward()
    # h rounded to fp32 (the oracle takes it in fp64); logits over d; logsumexp and the
    # softmax's product with W over V
    assert_close(got, want.detach(), reduction=d + V)
    assert_close(h32.grad, dh_want, reduction=d + 2 * V)
    if 0 in sizes:
        assert got[sizes.index(0)] == 0


def test_segment_cross_entropy_chunks_by_vocabulary():
    from metakernels.ops.segment_cross_entropy import CHUNK_BYTES, auto_chunk_rows
    assert auto_chunk_rows(1024) == 8192 and auto_chunk_rows(32000) == 262
    for V in (7, 1000, 32000, 152064, 10 ** 7):
        rows = auto_chunk_rows(V)
        assert rows == 16 or rows * 4 * V <= CHUNK_BYTES < (rows + 1) * 4 * V


def test_segment_cross_entropy_chunks_by_device_memory_on_cuda(monkeypatch):
    """On a GPU each chunk re-reads the output layer: an 80 GB device takes thousands of rows
    per chunk at a 128k vocabulary (a CPU cache's worth would be 65)."""
    import types
    from metakernels.ops.segment_cross_entropy import CUDA_MEMORY_FRACTION, auto_chunk_rows
    seen = []

    def properties(device):
        seen.append(torch.device(device))
        return types.SimpleNamespace(total_memory=80 * 10 ** 9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    V = 128256
    rows = auto_chunk_rows(V, torch.device("cuda", 1))
    assert seen == [torch.device("cuda", 1)]
    assert rows * 4 * V <= 80 * 10 ** 9 // CUDA_MEMORY_FRACTION < (rows + 1) * 4 * V
    assert rows >= 2048 and auto_chunk_rows(V, "cpu") == auto_chunk_rows(V) == 65
