"""The triton backend on a CUDA device: every op against its reference, and the batched FOMAML and
Reptile steps against the per-task PEFT loop, in fp32 and bf16.

Skipped without a CUDA device. With one, the kernels must be compiled, not interpreted:
``conftest.py`` sets ``TRITON_INTERPRET=1`` when it is unset, so run
``TRITON_INTERPRET=0 pytest tests/test_cuda.py`` (a session that interprets fails here rather
than pass without testing the GPU code).

Tolerances follow ``conftest.assert_close_like_torch`` (flash-attention style): the kernel may err at
most twice as much as plain PyTorch at the same dtype does against a high-precision oracle,
plus an fp32 floor. For the meta-steps the "plain PyTorch at the same dtype" is the per-task
PEFT loop itself and the oracle the same loop in fp64 on the same (dtype-rounded) weights.
"""
import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot run")

from metakernels import TaskLayout, backend  # noqa: E402
from metakernels.batch import IGNORE_INDEX  # noqa: E402
from metakernels.fused import apply_fused_layers  # noqa: E402
from metakernels.lora import inject  # noqa: E402
from metakernels.meta import (InnerConfig, PeftAdapterIO, fomaml_step, make_peft_model,  # noqa: E402
                              naive_step, reptile_step)
from metakernels.models import build_tiny_model  # noqa: E402
from metakernels.ops import (AdamState, fused_update, fused_update_ref, meta_reduce,  # noqa: E402
                             meta_reduce_ref, multi_lora_linear,
                             segment_cross_entropy, segment_cross_entropy_ref)

from conftest import random_batch  # noqa: E402
from conftest import assert_close, assert_close_like_torch, mll_fp64_oracle  # noqa: E402
from test_triton_layers import check_rms_norm, check_rotary, check_swiglu  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.float32, torch.bfloat16]


def _dtype_id(dtype):
    return str(dtype).split(".")[-1]


@pytest.fixture(scope="module")
def device():
    import triton.runtime
    from metakernels.ops._triton import multi_lora_linear as tri_lora
    if not isinstance(tri_lora._sgmv_kernel, triton.runtime.JITFunction):
        pytest.fail("the Triton kernels are interpreted (TRITON_INTERPRET=1, which conftest.py "
                    "sets when it is unset): run TRITON_INTERPRET=0 pytest tests/test_cuda.py",
                    pytrace=False)
    return torch.device("cuda")


def _ragged_sizes(T, max_rows, gen):
    """Random rows per task in [1, max_rows], one task empty (an empty task must work)."""
    sizes = torch.randint(1, max_rows + 1, (T,), generator=gen).tolist()
    sizes[int(torch.randint(0, T, (1,), generator=gen))] = 0
    return sizes


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------
def check_multi_lora_linear(device, dtype, rank, sink, seed, in_f=300, out_f=172, T=5,
                            max_rows=90):
    """The public op with the triton backend forced: y, x.grad, b.grad, dA, dB (into views of a
    flat gradient buffer when ``sink``, else autograd gradients of A and B)."""
    gen = torch.Generator().manual_seed(seed)
    layout = TaskLayout.from_sizes(_ragged_sizes(T, max_rows, gen))
    N, scale = layout.num_rows, 2.0 / rank

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    x = rand(N, in_f).to(dtype)
    W = (rand(out_f, in_f) / in_f ** 0.5).to(dtype)
    b = rand(out_f).to(dtype)
    A = rand(T, in_f, rank) / in_f ** 0.5
    B = rand(T, rank, out_f) / rank ** 0.5
    dy = rand(N, out_f).to(dtype)
    nA, nB = in_f * rank, rank * out_f
    flat = rand(T, 3 + nA + nB + 5)  # the adapters' gradients sit inside a larger bank row
    before = flat.clone()

    def views(buf):
        return buf[:, 3:3 + nA].view(T, in_f, rank), buf[:, 3 + nA:3 + nA + nB].view(T, rank, out_f)

    def run(name, A, B, sink):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        As, Bs = A.clone().requires_grad_(not sink), B.clone().requires_grad_(not sink)
        gA, gB = views(flat) if sink else (None, None)
        with backend.use_backend(name):
            y = multi_lora_linear(xs, W, bs, As, Bs, layout, scale, grad_A=gA, grad_B=gB)
        y.backward(dy)
        if sink:
            dA0, dB0 = views(before)
            gA, gB = gA - dA0, gB - dB0
        else:
            gA, gB = As.grad, Bs.grad
        return {"y": y.detach(), "x.grad": xs.grad, "b.grad": bs.grad, "dA": gA, "dB": gB}

    out = run("triton", A, B, sink)
    ref = run("torch", A, B, False)
    lo = run("torch", A.to(dtype), B.to(dtype), False)  # plain PyTorch at x's dtype
    oracle = mll_fp64_oracle(x, W, b, A, B, layout, scale, dy)
    for key in out:
        assert_close_like_torch(key, out[key], lo[key], oracle[key], dtype=ref[key].dtype)
    if sink:  # nothing outside the views was written
        outside = torch.ones_like(flat, dtype=torch.bool)
        outside[:, 3:3 + nA + nB] = False
        assert torch.equal(flat[outside], before[outside])


@pytest.mark.parametrize("sink", [False, True], ids=["autograd", "grad_buffers"])
@pytest.mark.parametrize("rank", [8, 16, 33, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_multi_lora_linear(device, dtype, rank, sink):
    for seed in range(3):  # three random ragged layouts
        check_multi_lora_linear(device, dtype, rank, sink, seed)


def test_multi_lora_linear_long_segments(device):
    """Segments of up to 4096 rows and 64 tasks: the 64-row tiles and long row loops."""
    for dtype in DTYPES:
        check_multi_lora_linear(device, dtype, 16, True, seed=7, in_f=512, out_f=384, T=64,
                                max_rows=4096)


def check_segment_cross_entropy(device, dtype, seed, V=1003, d=96, T=6, max_rows=40,
                                chunk_size=37):
    gen = torch.Generator().manual_seed(seed)
    layout = TaskLayout.from_sizes(_ragged_sizes(T, max_rows, gen))
    N = layout.num_rows
    h = torch.randn(N, d, generator=gen).to(device, dtype)
    W = (torch.randn(V, d, generator=gen) * 2 / d ** 0.5).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.3] = IGNORE_INDEX
    labels = labels.to(device)
    dloss = torch.randn(T, generator=gen).to(device)

    def run(name, h, W):
        hs = h.clone().requires_grad_()
        with backend.use_backend(name):
            loss = (segment_cross_entropy(hs, W, labels, layout, chunk_size=chunk_size)
                    if name == "triton" else segment_cross_entropy_ref(hs, W, labels, layout))
        loss.backward(dloss)
        return loss.detach(), hs.grad
    loss, dh = run("triton", h, W)
    loss_ref, dh_ref = run("torch", h, W)
    loss_or, dh_or = run("torch", h.float(), W.float())
    assert_close_like_torch("loss", loss, loss_ref, loss_or, dtype=torch.float32)
    assert_close_like_torch("h.grad", dh, dh_ref, dh_or)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_segment_cross_entropy(device, dtype):
    for seed in range(3):
        check_segment_cross_entropy(device, dtype, seed)
    check_segment_cross_entropy(device, dtype, 3, V=32000, d=128, T=3, max_rows=300,
                                chunk_size=256)  # a real vocabulary, several vocab blocks


def check_fused_update(device, optimizer, weight_decay, seed, T=6, P=70001):
    gen = torch.Generator().manual_seed(seed)
    fast = torch.randn(T, P, generator=gen).to(device)
    grad = torch.randn(T, P, generator=gen).to(device)
    grad[1, 17] = float("nan")  # skipped and reported
    grad[2] *= 1e-3             # under the clip threshold
    lr = (torch.rand(T, generator=gen) * 0.1 + 0.01).to(device)
    state = None
    if optimizer == "adam":
        state = AdamState((torch.randn(T, P, generator=gen) * 0.1).to(device),
                          (torch.rand(T, P, generator=gen) * 0.01).to(device),
                          torch.randint(0, 5, (T,), generator=gen).float().to(device))
    fast_ref = fast.clone()
    state_ref = None if state is None else AdamState(
        state.exp_avg.clone(), state.exp_avg_sq.clone(), state.step.clone())
    kw = dict(optimizer=optimizer, max_grad_norm=200.0, betas=(0.9, 0.99), eps=1e-6,
              weight_decay=weight_decay)
    with backend.use_backend("triton"):
        norms, finite = fused_update(fast, grad, lr, state=state, **kw)
    norms_ref, finite_ref = fused_update_ref(fast_ref, grad, lr, state=state_ref, **kw)
    assert torch.equal(finite, finite_ref) and not finite[1] and finite[2]
    assert_close(norms, norms_ref, reduction=P, equal_nan=True)
    assert_close(fast, fast_ref, reduction=P)
    assert torch.equal(fast[1], fast_ref[1])
    if state is not None:
        assert_close(state.exp_avg, state_ref.exp_avg, reduction=P)
        assert_close(state.exp_avg_sq, state_ref.exp_avg_sq, reduction=P)
        assert torch.equal(state.step, state_ref.step)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_update(device, optimizer, weight_decay):
    check_fused_update(device, optimizer, weight_decay, seed=0)


def test_fused_adam_bias_correction_in_fp64(device):
    """beta2 = 0.999 at the first steps (where 1 - beta2**step cancels in fp32), steps near 1
    over small weights: the kernel within the fp32 reference's own error against fp64."""
    gen = torch.Generator().manual_seed(3)
    T, P = 4, 70001
    fast = (torch.randn(T, P, generator=gen) * 1e-2).to(device)
    grad = torch.randn(T, P, generator=gen).to(device)
    lr = (torch.rand(T, generator=gen) * 0.5 + 0.5).to(device)
    state = AdamState((torch.randn(T, P, generator=gen) * 0.1).to(device),
                      (torch.rand(T, P, generator=gen) * 0.01).to(device),
                      torch.arange(T, dtype=torch.float32, device=device))
    kw = dict(optimizer="adam", max_grad_norm=0.0, betas=(0.9, 0.999), eps=1e-8)
    fast_ref = fast.clone()
    state_ref = AdamState(*(t.clone() for t in (state.exp_avg, state.exp_avg_sq, state.step)))
    fast_or = fast.double()
    state_or = AdamState(*(t.double() for t in (state.exp_avg, state.exp_avg_sq, state.step)))
    with backend.use_backend("triton"):
        fused_update(fast, grad, lr, state=state, **kw)
    fused_update_ref(fast_ref, grad, lr, state=state_ref, **kw)
    fused_update_ref(fast_or, grad.double(), lr.double(), state=state_or, **kw)
    err, ref_err = (fast.double() - fast_or).abs(), (fast_ref.double() - fast_or).abs()
    assert (err <= 2 * ref_err.max() + 2 ** -24 * fast_or.abs()).all(), (
        f"max error {err.max().item():.3g}, the fp32 reference's {ref_err.max().item():.3g}")


# ---------------------------------------------------------------------------------------------
# the frozen base's layers: the shapes of a 7B-8B model's layer (odd ones beside them)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(2, 64, 4096), (33, 5123)], ids=["llama", "odd"])
def test_rms_norm(device, dtype, shape):
    for strided in (False, True):
        check_rms_norm(shape, dtype, strided, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(128, 14336), (33, 11013)], ids=["llama", "odd"])
def test_swiglu(device, dtype, shape):
    check_swiglu(shape, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", [(2, 32, 8, 128, 128, 2), (3, 5, 1, 17, 130, 1)],
                         ids=["llama_gqa", "odd"])
def test_rotary(device, dtype, case):
    check_rotary(case, dtype, device)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launchers_run_on_their_tensors_device(device):
    """Tensors on cuda:1 while cuda:0 is current: each launch runs on cuda:1 (triton launches on
    the current device), with the results of a launch on cuda:0."""
    x = torch.randn(37, 300, device="cuda:0")
    w = torch.rand(300, device="cuda:0") + 0.5
    with torch.cuda.device(0), backend.use_backend("triton"):
        from metakernels.ops._triton import rms_norm as tri_norm
        want = tri_norm.rms_norm_fwd(x, w, 1e-6)
        got = tri_norm.rms_norm_fwd(x.to("cuda:1"), w.to("cuda:1"), 1e-6)
        reduced = meta_reduce("fomaml", x.to("cuda:1"), torch.ones(37, device="cuda:1"), None)
    for g, w_ in zip(got, want):
        assert g.device == torch.device("cuda:1") and torch.equal(g.cpu(), w_.cpu())
    torch.testing.assert_close(reduced.cpu(), x.sum(0).cpu())


def check_meta_reduce(device, kind, seed, T=7, P=70001):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, P, generator=gen).to(device)
    w = (torch.rand(T, generator=gen) + 0.1).to(device)
    theta = torch.randn(P, generator=gen).to(device)
    with backend.use_backend("triton"):
        out = meta_reduce(kind, x, w, theta if kind == "reptile" else None)
    ref = meta_reduce_ref(kind, x, w, theta)
    oracle = meta_reduce_ref(kind, x.double(), w.double(), theta.double())
    assert_close_like_torch("out", out, ref, oracle)


@pytest.mark.parametrize("kind", ["fomaml", "reptile"])
def test_meta_reduce(device, kind):
    check_meta_reduce(device, kind, seed=0)


# ---------------------------------------------------------------------------------------------
# the meta-steps: batched (triton) against the per-task PEFT loop
# ---------------------------------------------------------------------------------------------
def _tiny_llama(dtype, device):
    """A tiny Llama in ``dtype`` (weights rounded to it) and its fp64 copy (same values)."""
    base = build_tiny_model("llama", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=96).to(device, dtype)
    return base, copy.deepcopy(base).double()


def _naive(base, bank, theta0, support, query, cfg, algorithm):
    peft_model = make_peft_model(base, bank)
    io = PeftAdapterIO(peft_model, bank.slots)
    return naive_step(peft_model, io, theta0, support, query, cfg, algorithm=algorithm)


def check_meta_step(device, dtype, algorithm, inner):
    model, oracle_base = _tiny_llama(dtype, device)
    naive_base = copy.deepcopy(model)
    assert min(apply_fused_layers(model).values()) > 0
    bank = inject(model, ("q_proj", "k_proj", "v_proj", "o_proj"), rank=8, alpha=16,
                  num_tasks=5)
    torch.manual_seed(1)
    with torch.no_grad():  # random B too, so the first step is not a special case
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.05)
    theta0 = bank.theta.detach().clone()
    support = random_batch([3, 1, 2, 4, 2], 97, seed=11).to(device)
    query = random_batch([2, 3, 1, 2, 3], 97, seed=12).to(device)
    cfg = InnerConfig(lr=0.05 if inner == "sgd" else 0.01, num_steps=3, optimizer=inner,
                      max_grad_norm=5.0, eps=1e-6)
    with backend.use_backend("triton"):
        step = fomaml_step if algorithm == "fomaml" else reptile_step
        got = step(model, bank, support, query, cfg)
    # the per-task loop at the same dtype (the error budget) and in fp64 (the oracle); each
    # on its own PEFT copy, since inject froze and rewired the batched model
    want = _naive(naive_base, bank, theta0, support, query, cfg, algorithm)
    oracle = _naive(oracle_base, bank, theta0, support, query, cfg, algorithm)
    floor = 1e-5  # the CPU invariant's fp32 bound (tests/test_invariant.py)
    err, budget = _rel_err(got.meta_grad, oracle.meta_grad), _rel_err(want.meta_grad,
                                                                   oracle.meta_grad)
    assert err <= 2 * budget + floor, f"meta-gradient: rel. error {err:.3g}, PEFT's {budget:.3g}"
    for name in ("support_losses", "query_losses"):
        g, w, o = (getattr(r, name).cpu().double() for r in (got, want, oracle))
        loss_err, loss_budget = (g - o).abs().max().item(), (w - o).abs().max().item()
        assert loss_err <= 2 * loss_budget + floor * o.abs().max().item(), (
            f"{name}: max error {loss_err:.3g}, PEFT's {loss_budget:.3g}")
    assert not torch.allclose(bank.fast[0], bank.fast[1])  # the inner loop moved every task


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_batched_step_equals_per_task_loop(device, dtype, algorithm, inner):
    check_meta_step(device, dtype, algorithm, inner)
