"""fused_update on every backend present: against torch.optim per task (the semantics), then each
backend's kernels called directly (nothing written for a skipped task, the Adam state)."""
import pytest
import torch

from metakernels import backend
from metakernels.ops import AdamState, fused_update, fused_update_ref

from conftest import OP_BACKENDS, TRITON, assert_close, needs_cpu, needs_triton, same_bits, spy

ops = torch.ops.metakernels
if TRITON:
    from metakernels.ops._triton import fused_update as tri_update


# --------------------------------------------------------------- the public op, every backend
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


@pytest.mark.parametrize("backend_name", OP_BACKENDS)
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


@pytest.mark.parametrize("backend_name", [b for b in OP_BACKENDS if b != "torch"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_adam_within_the_fp32_references_error(backend_name, weight_decay):
    """beta2 = 0.999 at the first steps, where 1 - beta2**step cancels: each backend's step
    within the fp32 reference's own error against the fp64 reference (bias corrections taken in
    fp32 put it about 1e-5 relative off; the reference and the kernels take them in fp64). Steps
    near 1 in size (lr ~ 1) over small weights, so that the step's error is not hidden under the
    rounding of the weights."""
    g = torch.Generator().manual_seed(5)
    T, P = 4, 1500
    fast, grad = torch.randn(T, P, generator=g) * 1e-2, torch.randn(T, P, generator=g)
    lr = torch.rand(T, generator=g) * 0.5 + 0.5
    state = AdamState(torch.randn(T, P, generator=g) * 0.1, torch.rand(T, P, generator=g) * 0.01,
                      torch.arange(T, dtype=torch.float32))
    kw = dict(optimizer="adam", max_grad_norm=0.0, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=weight_decay)
    fast_ref, fast_or = fast.clone(), fast.double()
    state_ref = AdamState(*(t.clone() for t in (state.exp_avg, state.exp_avg_sq, state.step)))
    state_or = AdamState(*(t.double() for t in (state.exp_avg, state.exp_avg_sq, state.step)))
    with backend.use_backend(backend_name):
        fused_update(fast, grad, lr, state=state, **kw)
    fused_update_ref(fast_ref, grad, lr, state=state_ref, **kw)
    fused_update_ref(fast_or, grad.double(), lr.double(), state=state_or, **kw)
    err, ref_err = (fast.double() - fast_or).abs(), (fast_ref.double() - fast_or).abs()
    floor = 2 ** -24 * fast_or.abs()  # half an ulp of the fp32 result
    assert (err <= 2 * ref_err.max() + floor).all(), (
        f"max error {err.max().item():.3g}, the fp32 reference's {ref_err.max().item():.3g}")


@pytest.mark.parametrize("backend_name", OP_BACKENDS)
def test_fused_update_rejects_bad_inputs(backend_name):
    fast, grad = torch.randn(3, 10), torch.randn(3, 10)
    with backend.use_backend(backend_name):
        with pytest.raises(ValueError, match="grad must have shape"):
            fused_update(fast, grad[:, :9], 0.1)
        with pytest.raises(ValueError, match="lr must have shape"):
            fused_update(fast, grad, torch.ones(2))
        with pytest.raises(ValueError, match="needs state"):
            fused_update(fast, grad, 0.1, optimizer="adam")


# -------------------------------------------------------------------------------- cpu kernels
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


@needs_cpu
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
        assert same_bits(grad, grad_before)
        assert norms.dtype == torch.float32 and finite.dtype == torch.bool
        assert torch.equal(finite, f_ref) and int((~finite).sum()) == (step > 0)
        torch.testing.assert_close(norms, n_ref, rtol=1e-6, atol=0, equal_nan=True)
        for t in torch.nonzero(~finite).flatten().tolist():  # skipped: nothing written
            after = [got] + ([st_got.exp_avg, st_got.exp_avg_sq, st_got.step] if st_got else [])
            for a, b in zip(after, before):
                assert same_bits(a[t], b[t])
        # the clipping coefficient comes from a norm over P: a sum of P terms
        assert_close(got, want, reduction=P)
        if st_got:
            assert_close(st_got.exp_avg, st_want.exp_avg, reduction=P)
            assert_close(st_got.exp_avg_sq, st_want.exp_avg_sq, reduction=P)
            assert torch.equal(st_got.step, st_want.step)
    assert torch.isfinite(got).all()
    if st_got:
        assert st_got.step.tolist() == [3, 4, 3, 4, 3]


# --------------------------------------------------------------- Triton kernels (interpreter)
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


@needs_triton
@pytest.mark.parametrize("entry", ["kernel", "public_op"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("max_grad_norm", [0.0, 30.0])  # 30: clips some tasks, not all
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_update_triton_kernel(optimizer, max_grad_norm, weight_decay, entry, monkeypatch):
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
        calls = spy(monkeypatch, tri_update, "fused_update")
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


@needs_triton
def test_fused_update_float_lr_through_public_op(monkeypatch):
    fast, grad, _ = _bank(T=3, P=37)
    P = 37
    fast_ref = fast.clone()
    calls = spy(monkeypatch, tri_update, "fused_update")
    with backend.use_backend("triton"):
        norms, finite = fused_update(fast, grad, 0.05, optimizer="sgd", max_grad_norm=1.0)
    assert calls
    norms_ref, finite_ref = fused_update_ref(fast_ref, grad, torch.full((3,), 0.05),
                                             max_grad_norm=1.0)
    assert torch.equal(finite, finite_ref)
    assert_close(norms, norms_ref, reduction=P, equal_nan=True)
    assert_close(fast, fast_ref, reduction=P)   # the clipping coefficient: a norm over P
