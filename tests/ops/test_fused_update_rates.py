"""``fused_update`` with a rate per element (learned inner learning rates) and the direction
output, on every backend, against the reference; the reference against ``torch.optim`` with one
parameter group per segment.

Tolerance: ``conftest.assert_close`` with the task's norm (a sum over P, through the clip
coefficient) as the reduction; each step adds a few elementwise roundings. The equal-rates and
unit-segment cases must agree to the bit: they compute the same products in the same order.
"""
import pytest
import torch

from metakernels import backend
from metakernels.ops import AdamState, fused_update

from conftest import OP_BACKENDS, assert_close

BACKENDS = OP_BACKENDS
KERNELS = [b for b in BACKENDS if b != "torch"]


def _segments(P, gen):
    """Ragged segments of [0, P) with an empty one and a long one: int32 [S + 1]."""
    cuts = sorted(torch.randint(1, P, (5,), generator=gen).tolist())
    bounds = [0, cuts[0], cuts[0]] + cuts[1:] + [P]  # the repeated cut: an empty segment
    return torch.tensor(bounds, dtype=torch.int32)


def _case(P, kind, seed=0, T=4, steps=4):
    """fast [T, P], per-step grads (task 1 non-finite at step 1, task 3 at step 2), per-task lr,
    rates and offsets of the given kind ("segment" or "element")."""
    g = torch.Generator().manual_seed(seed)
    fast = torch.randn(T, P, generator=g)
    scales = torch.tensor([0.5, 4.0, 1.0, 20.0])[:T, None]
    grads = [torch.randn(T, P, generator=g) * scales for _ in range(steps)]
    grads[1][1, P // 3] = float("nan")
    grads[2][3, P - 1] = float("inf")
    lr = torch.rand(T, generator=g) * 0.5 + 0.5
    if kind == "segment":
        offsets = _segments(P, g)
        rates = torch.rand(offsets.numel() - 1, generator=g) * 0.1 + 0.01
    else:
        offsets, rates = None, torch.rand(P, generator=g) * 0.1 + 0.01
    return fast, grads, lr, rates, offsets


def _run(name, fast, grads, lr, optimizer, *, with_direction=True, **kw):
    fast = fast.clone()
    T, P = fast.shape
    state = AdamState.zeros_like(fast) if optimizer == "adam" else None
    gen = torch.Generator().manual_seed(5)  # the same starting direction for every backend
    direction = torch.randn(T, P, generator=gen) if with_direction else None  # added to
    d0 = None if direction is None else direction.clone()
    finites = []
    with backend.use_backend(name):
        for grad in grads:
            _, finite = fused_update(fast, grad, lr, optimizer=optimizer, state=state,
                                     direction=direction, **kw)
            finites.append(finite.clone())
    return fast, state, direction, d0, finites


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("kind", ["segment", "element"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("max_norm,wd", [(0.0, 0.0), (3.0, 0.05)])
def test_rates_and_direction_match_reference(name, kind, optimizer, max_norm, wd):
    P = 2 * 16384 + 5 if name == "cpu" else 2500  # several C++ chunks / Triton blocks per task
    fast0, grads, lr, rates, offsets = _case(P, kind)
    kw = dict(max_grad_norm=max_norm, weight_decay=wd, betas=(0.8, 0.95), eps=1e-6,
              rates=rates, rate_offsets=offsets)
    got, st, d_got, d0, finites = _run(name, fast0, grads, lr, optimizer, **kw)
    want, st_want, d_want, _, finites_want = _run("torch", fast0, grads, lr, optimizer, **kw)
    assert [f.tolist() for f in finites] == [f.tolist() for f in finites_want]
    assert [f.tolist() for f in finites][1:3] == [[True, False, True, True],
                                                  [True, True, True, False]]
    assert_close(got, want, reduction=P)
    assert_close(d_got, d_want, reduction=P)
    assert not torch.allclose(d_got, d0), "the direction was not written"
    if st is not None:
        assert_close(st.exp_avg, st_want.exp_avg, reduction=P)
        assert torch.equal(st.step, st_want.step)


def _torch_optim_segments(fast0, grads, lr, rates, offsets, optimizer, max_norm, wd):
    """Each task alone: torch.optim with one parameter group per segment (lr[t] * rates[s]),
    clip_grad_norm_ over the whole task, a non-finite step skipped."""
    out = fast0.clone()
    bounds = offsets.tolist()
    for t in range(fast0.shape[0]):
        params = [torch.nn.Parameter(fast0[t, a:b].clone()) for a, b in zip(bounds, bounds[1:])]
        groups = [{"params": [p], "lr": float(lr[t] * rates[s])} for s, p in enumerate(params)]
        if optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=1.0, weight_decay=wd)
        else:
            opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
        for grad in grads:
            if not torch.isfinite(grad[t]).all():
                continue
            for p, (a, b) in zip(params, zip(bounds, bounds[1:])):
                p.grad = grad[t, a:b].clone()
            if max_norm:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
        out[t] = torch.cat([p.detach() for p in params])
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reference_segments_are_torch_optim_param_groups(optimizer):
    fast0, grads, lr, rates, offsets = _case(301, "segment", seed=3)
    kw = dict(max_grad_norm=3.0, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6)
    got, *_ = _run("torch", fast0, grads, lr, optimizer, rates=rates, rate_offsets=offsets, **kw)
    want = _torch_optim_segments(fast0, grads, lr, rates, offsets, optimizer, 3.0, 0.05)
    assert_close(got, want, reduction=fast0.shape[1])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_equal_rates_reproduce_fixed_bitwise(name, optimizer):
    """per_layer_step with every rate equal to the fixed rate: lr[t] = 1, rates[s] = r is the
    fixed update at lr = r, bit for bit (and so is a per-element rate)."""
    fast0, grads, _, _, offsets = _case(2500, "segment", seed=1)
    T, P = fast0.shape
    r = 0.0371
    kw = dict(max_grad_norm=3.0, weight_decay=0.05, with_direction=False)
    fixed, st_fixed, *_ = _run(name, fast0, grads, torch.full((T,), r), optimizer, **kw)
    ones = torch.ones(T)
    seg, st_seg, *_ = _run(name, fast0, grads, ones, optimizer,
                           rates=torch.full((offsets.numel() - 1,), r), rate_offsets=offsets, **kw)
    elem, *_ = _run(name, fast0, grads, ones, optimizer, rates=torch.full((P,), r), **kw)
    assert torch.equal(seg, fixed) and torch.equal(elem, fixed)
    assert not torch.equal(fixed, fast0)
    if st_fixed is not None:
        assert torch.equal(st_seg.exp_avg_sq, st_fixed.exp_avg_sq)


@pytest.mark.parametrize("name", BACKENDS)
def test_element_rates_are_unit_segments_bitwise(name):
    fast0, grads, lr, rates, _ = _case(1500, "element", seed=2)
    P = fast0.shape[1]
    unit = torch.arange(P + 1, dtype=torch.int32)
    kw = dict(max_grad_norm=3.0, weight_decay=0.0)
    a, _, da, *_ = _run(name, fast0, grads, lr, "adam", rates=rates, **kw)
    b, _, db, *_ = _run(name, fast0, grads, lr, "adam", rates=rates, rate_offsets=unit, **kw)
    assert torch.equal(a, b) and torch.equal(da, db)


@pytest.mark.parametrize("name", BACKENDS)
def test_sgd_direction_is_the_step_over_the_rate(name):
    """Without rates the direction is the update divided by the task's rate: d = (old - new) /
    lr[t], the clipped gradient plus weight decay."""
    g = torch.Generator().manual_seed(4)
    T, P = 3, 1100
    fast, grad = torch.randn(T, P, generator=g), torch.randn(T, P, generator=g) * 3
    grad[1] *= 0.2  # norm about 20: under the threshold of 40, the other two over it
    lr = torch.tensor([0.5, 0.25, 1.0])
    new, direction = fast.clone(), torch.zeros(T, P)
    with backend.use_backend(name):
        norms, _ = fused_update(new, grad, lr, max_grad_norm=40.0, weight_decay=0.1,
                                direction=direction)
    coef = torch.clamp(40.0 / (norms + 1e-6), max=1.0)[:, None]
    assert_close(direction, grad * coef + 0.1 * fast, reduction=P)
    # (old - new) / lr cancels: fast's rounding (2^-24 of |fast|) over the step's size
    torch.testing.assert_close(direction, (fast - new) / lr[:, None], rtol=1e-4, atol=1e-5)
    assert 0 < int((coef < 1).sum()) < T  # some tasks clipped, some not


@pytest.mark.parametrize("name", BACKENDS)
def test_rates_rejected(name):
    fast, grad, lr = torch.randn(2, 10), torch.randn(2, 10), torch.rand(2)
    bad = {
        "rate_offsets given without rates": dict(rate_offsets=torch.tensor([0, 10],
                                                                           dtype=torch.int32)),
        "rates": dict(rates=torch.rand(9)),  # per element, but P is 10
        "rate_offsets": dict(rates=torch.rand(2), rate_offsets=torch.tensor([0, 4, 9],
                                                                            dtype=torch.int32)),
        "direction": dict(direction=torch.zeros(2, 9)),
    }
    with backend.use_backend(name):
        for what, kw in bad.items():
            with pytest.raises((ValueError, TypeError), match=what):
                fused_update(fast, grad, lr, **kw)


@pytest.mark.skipif("cpu" not in KERNELS, reason="the C++ extension is not built")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cpu_ops_schema_and_checks(optimizer):
    """The registered schemas with the new optional arguments pass opcheck; the C++ checks
    name the argument (called directly, past the Python checks)."""
    import metakernels._C  # noqa: F401

    ops = torch.ops.metakernels
    T, P = 3, 40
    fast, grad, lr = torch.randn(T, P), torch.randn(T, P), torch.rand(T)
    off = torch.tensor([0, 7, 7, 40], dtype=torch.int32)
    rates, direction = torch.rand(3), torch.zeros(T, P)
    st = AdamState(torch.randn(T, P), torch.rand(T, P), torch.tensor([0.0, 1.0, 2.0]))
    if optimizer == "sgd":
        op, head = ops.fused_sgd_, (fast, grad, lr, 1.0, 0.1)
    else:
        op, head = ops.fused_adam_, (fast, grad, st.exp_avg, st.exp_avg_sq, st.step, lr, 1.0,
                                     0.9, 0.999, 1e-8, 0.1)
    torch.library.opcheck(op, head + (rates, off, direction),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="rate_offsets"):
        op(*head, rates, torch.tensor([0, 7, 39], dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="rates"):
        op(*head, torch.rand(P - 1), None, None)
    with pytest.raises(RuntimeError, match="direction"):
        op(*head, None, None, torch.zeros(T, P + 1))
