"""meta_reduce on every backend present, against the fp64 reference."""
import pytest
import torch

from metakernels import backend
from metakernels.ops import meta_reduce, meta_reduce_ref

from conftest import (OP_BACKENDS, TRITON, assert_close, assert_close_like_torch, needs_cpu,
                      needs_triton, spy)

ops = torch.ops.metakernels
if TRITON:
    from metakernels.ops._triton import meta_reduce as tri_reduce


# --------------------------------------------------------------- the public op, every backend
@pytest.mark.parametrize("backend_name", OP_BACKENDS)
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


# -------------------------------------------------------------------------------- cpu kernels
@needs_cpu
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


# --------------------------------------------------------------- Triton kernels (interpreter)
@needs_triton
@pytest.mark.parametrize("entry", ["kernel", "public_op"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("kind", ["fomaml", "reptile"])
def test_meta_reduce_triton_kernel(kind, T, entry, monkeypatch):
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
        calls = spy(monkeypatch, tri_reduce, "meta_reduce")
        with backend.use_backend("triton"):
            out = meta_reduce(kind, x, weights, theta if kind == "reptile" else None)
            default_w = meta_reduce(kind, x, None, theta if kind == "reptile" else None)
        assert len(calls) == 2, "the triton backend was not used"
        assert_close_like_torch("out (weights=None)", default_w,
                                meta_reduce_ref(kind, x, torch.full((T,), 1.0 / T), theta),
                                meta_reduce_ref(kind, x.double(), torch.full((T,), 1.0 / T,
                                                dtype=torch.float64), theta.double()))
    assert_close_like_torch("out", out, ref, oracle)
