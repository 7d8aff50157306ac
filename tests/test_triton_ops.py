"""The Triton kernels against the plain-PyTorch references, under ``TRITON_INTERPRET=1``.

Every output and every gradient is compared with an oracle (fp64 where the reference allows it,
else fp32 on upcast inputs). Tolerance, flash-attention style, keyed by dtype through torch
itself: the kernel may err at most twice as much as the torch reference does at the same dtype,
plus an fp32 rounding floor (so fp32 stays tight and bf16/fp16 are judged against what bf16/fp16
torch achieves). Shapes are small and odd: the interpreter is slow.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from metakernels import TaskLayout, backend  # noqa: E402
from metakernels.batch import IGNORE_INDEX  # noqa: E402
from metakernels.ops import (AdamState, fused_update, fused_update_ref, meta_reduce,  # noqa: E402
                             meta_reduce_ref, multi_lora_linear, multi_lora_linear_ref,
                             segment_cross_entropy, segment_cross_entropy_ref)
from metakernels.ops.multi_lora_linear import _torch_bwd, _torch_fwd  # noqa: E402

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
# segments longer than one row tile (32), so the kernels' row loops take several iterations
LONG_LAYOUT = [40, 0, 35]
FLOOR_ATOL, FLOOR_RTOL = 1e-5, 1.3e-6  # torch.testing's fp32 tolerances
# The interpreter converts fp32 -> bf16 by truncation where a GPU rounds to nearest even, so a
# kernel's bf16 store may be off by one bf16 ulp more than on a GPU; fp16 casts are exact.
INTERPRETER_ULPS = {torch.bfloat16: 1.0} if backend.triton_interpreted() else {}


def assert_close_like_torch(name, out, ref, oracle):
    """``out`` (kernel) and ``ref`` (torch at the same dtype) against the high-precision
    ``oracle``: every element of out within 2 x torch's max error + the fp32 floor (+ one ulp
    of out's dtype where the interpreter truncates)."""
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype}, torch gives {ref.dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, torch gives {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    oracle = oracle.double()
    torch_err = (ref.double() - oracle).abs().max().item()
    err = (out.double() - oracle).abs()
    rtol = FLOOR_RTOL
    if out.dtype in INTERPRETER_ULPS:
        rtol += INTERPRETER_ULPS[out.dtype] * torch.finfo(out.dtype).eps
    bad = err > 2 * torch_err + FLOOR_ATOL + rtol * oracle.abs()
    assert not bad.any(), (f"{name} ({out.dtype}): max error {err.max().item():.3g} vs "
                           f"torch's {torch_err:.3g}; first bad element {bad.nonzero()[0].tolist()}")


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


_LORA_CASES = ([(sizes, rank, dtype, base) for sizes in LAYOUTS.values() for rank in (1, 3, 16)
                for dtype in DTYPES for base in (True, False)]
               + [(LONG_LAYOUT, rank, torch.float32, True) for rank in (1, 3, 16)])


def _lora_case_id(case):
    sizes, rank, dtype, base = case
    name = next((k for k, v in LAYOUTS.items() if v == sizes), "long_ragged")
    return f"{name}-r{rank}-{str(dtype).split('.')[-1]}-{'base' if base else 'lora_only'}"


@pytest.mark.parametrize("sizes,rank,dtype,with_base", _LORA_CASES,
                         ids=[_lora_case_id(c) for c in _LORA_CASES])
def test_multi_lora_linear_kernels(sizes, rank, dtype, with_base):
    layout, x, W, b, A, B = _lora_inputs(sizes, rank, dtype, with_base)
    T, scale = layout.num_tasks, 1.7
    y, xa = tri_lora.fwd(x, W, b, A, B, layout, scale)
    y_ref, xa_ref = _torch_fwd(x, W, b, A, B, layout, scale)
    y_or, xa_or = _torch_fwd(x.double(), _f64(W), _f64(b), A.double(), B.double(), layout, scale)
    assert_close_like_torch("y", y, y_ref, y_or)
    assert_close_like_torch("xa", xa, xa_ref, xa_or)

    dy = torch.randn_like(y)
    flat, outside = _flat_grad_buffer(T, rank)
    before = flat.clone()
    dA, dB = _grad_views(flat, rank)
    dA_ref, dB_ref = dA.clone(), dB.clone()
    dA_or, dB_or = dA.double(), dB.double()
    dx = tri_lora.bwd(dy, x, W, A, B, xa, layout, scale, dA, dB, True)
    dx_ref = _torch_bwd(dy, x, W, A, B, xa_ref, layout, scale, dA_ref, dB_ref, True)
    dx_or = _torch_bwd(dy.double(), x.double(), _f64(W), A.double(), B.double(), xa_or, layout,
                       scale, dA_or, dB_or, True)
    assert_close_like_torch("dx", dx, dx_ref, dx_or)
    assert_close_like_torch("dA", dA, dA_ref, dA_or)
    assert_close_like_torch("dB", dB, dB_ref, dB_or)
    assert torch.equal(flat[outside], before[outside]), "bytes outside the dA/dB views changed"
    for t, s, e in layout.segments():
        if s == e:  # an empty task's gradient rows keep their bytes exactly
            assert torch.equal(flat[t], before[t])


def test_multi_lora_linear_kernels_without_dx():
    layout, x, W, b, A, B = _lora_inputs(LAYOUTS["ragged_empty"], 3, torch.float32, True)
    y, xa = tri_lora.fwd(x, W, b, A, B, layout, 0.5)
    dy = torch.randn_like(y)
    dA, dB = _grad_views(_flat_grad_buffer(layout.num_tasks, 3)[0], 3)
    dA_ref, dB_ref = dA.clone(), dB.clone()
    assert tri_lora.bwd(dy, x, W, A, B, xa, layout, 0.5, dA, dB, False) is None
    _torch_bwd(dy, x, W, A, B, xa, layout, 0.5, dA_ref, dB_ref, False)
    torch.testing.assert_close(dA, dA_ref)
    torch.testing.assert_close(dB, dB_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
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

    def run(name, flat_buf):
        xs, bs = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        As, Bs = A.clone().requires_grad_(not sink), B.clone().requires_grad_(not sink)
        gA, gB = _grad_views(flat_buf, rank) if sink else (None, None)
        with backend.use_backend(name):
            y = multi_lora_linear(xs, W, bs, As, Bs, layout, scale, grad_A=gA, grad_B=gB)
        y.backward(dy)
        if sink:
            assert As.grad is None and Bs.grad is None
        else:
            gA, gB = As.grad, Bs.grad
        return {"y": y.detach(), "x.grad": xs.grad, "b.grad": bs.grad, "dA": gA, "dB": gB}

    fwd_calls, bwd_calls = _spy(monkeypatch, tri_lora, "fwd"), _spy(monkeypatch, tri_lora, "bwd")
    out = run("triton", flat)
    assert fwd_calls and bwd_calls, "the triton backend was not used"
    ref = run("torch", flat.clone())
    # the oracle: the differentiable reference in fp64 (the public op takes no fp64)
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    y64 = multi_lora_linear_ref(x64, W.double(), b64, A64, B64, layout, scale)
    y64.backward(dy.double())
    dA64, dB64 = A64.grad, B64.grad
    if sink:
        dA0, dB0 = _grad_views(before.double(), rank)
        dA64, dB64 = dA0 + dA64, dB0 + dB64
    oracle = {"y": y64.detach(), "x.grad": x64.grad, "b.grad": b64.grad, "dA": dA64, "dB": dB64}
    for key in out:
        assert_close_like_torch(key, out[key], ref[key], oracle[key])
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
    torch.testing.assert_close(norms, norms_ref, equal_nan=True)
    torch.testing.assert_close(fast, fast_ref)
    for t in (1, 2):  # skipped tasks: bit-identical
        assert torch.equal(fast[t], fast_ref[t])
    if state is not None:
        torch.testing.assert_close(state.exp_avg, state_ref.exp_avg)
        torch.testing.assert_close(state.exp_avg_sq, state_ref.exp_avg_sq)
        assert torch.equal(state.step, state_ref.step)
    assert torch.equal(grad.nan_to_num(), grad_before.nan_to_num()), "grad was written"
    if max_grad_norm:
        clipped = finite & (norms > max_grad_norm)
        assert 0 < int(clipped.sum()) < int(finite.sum()), "the test should clip some tasks only"


def test_fused_update_float_lr_through_public_op(monkeypatch):
    fast, grad, _ = _bank(T=3, P=37)
    fast_ref = fast.clone()
    calls = _spy(monkeypatch, tri_update, "fused_update")
    with backend.use_backend("triton"):
        norms, finite = fused_update(fast, grad, 0.05, optimizer="sgd", max_grad_norm=1.0)
    assert calls
    norms_ref, finite_ref = fused_update_ref(fast_ref, grad, torch.full((3,), 0.05),
                                             max_grad_norm=1.0)
    assert torch.equal(finite, finite_ref)
    torch.testing.assert_close(norms, norms_ref, equal_nan=True)
    torch.testing.assert_close(fast, fast_ref)


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
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(dh, dh_ref)


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


# ---------------------------------------------------------------------------------------------
# the kernels compile for a GPU (the interpreter does not type-check like the compiler does)
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent('''
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from metakernels.ops._triton import fused_update as f, meta_reduce as r
    from metakernels.ops._triton import multi_lora_linear as m, segment_cross_entropy as s

    def compile_(kernel, ptr_types, constexprs):
        """Pointers default to *fp32, scalars to i32 when named like sizes/strides, else fp32."""
        sig = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptr_types.get(name, "*fp32")
            elif name.startswith("stride") or name in ("K", "N", "I", "J", "P", "T", "V", "NB",
                                                        "ignore_index"):
                sig[name] = "i32"
            else:
                sig[name] = "fp32"
        triton.compile(ASTSource(kernel, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 80, 32))

    for acc in (True, False):
        compile_(m._sgmv_kernel, {"inp_ptr": "*bf16", "offsets_ptr": "*i32", "out_ptr": "*bf16"},
                 dict(ACCUMULATE=acc, BLOCK_M=32, BLOCK_K=64, BLOCK_N=16))
    compile_(m._segment_outer_kernel, {"lhs_ptr": "*fp16", "offsets_ptr": "*i32"},
             dict(BLOCK_M=32, BLOCK_I=64, BLOCK_J=16))
    compile_(f._sumsq_partial_kernel, {}, dict(BLOCK=1024))
    for flag in (True, False):
        compile_(f._task_norm_kernel, {"finite_ptr": "*i8"}, dict(CLIP=flag, BLOCK=64))
        compile_(f._sgd_kernel, {"finite_ptr": "*i8"}, dict(WEIGHT_DECAY=flag, BLOCK=1024))
        compile_(f._adam_kernel, {"finite_ptr": "*i8"}, dict(WEIGHT_DECAY=flag, BLOCK=1024))
        compile_(r._meta_reduce_kernel, {}, dict(REPTILE=flag, BLOCK=1024))
    compile_(s._segment_count_kernel, {"labels_ptr": "*i64", "offsets_ptr": "*i32"},
             dict(BLOCK=1024))
    compile_(s._ce_chunk_kernel, {"logits_ptr": "*bf16", "labels_ptr": "*i64",
                                  "task_ids_ptr": "*i32"}, dict(BLOCK_V=4096))
    compile_(s._segment_mean_kernel, {"offsets_ptr": "*i32"}, dict(BLOCK=1024))
    print("compiled")
''')


def test_kernels_compile_for_sm80():
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no nvidia backend to compile with")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
