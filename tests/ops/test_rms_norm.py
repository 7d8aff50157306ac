"""rms_norm: the op against Hugging Face's RMSNorm (values, first- and second-order gradients, what
it keeps for the backward) on the torch and cpu backends, then the cpu kernels called directly."""
import pytest
import torch

from metakernels import backend
from metakernels.ops.rms_norm import nonzero_weight, rms_norm, rms_norm_ref

from conftest import (CPU_BACKENDS, assert_close, bf16_ulps, needs_cpu, rand_tensor, rms_inputs,
                      same_bits, same_forward, ulps)

ops = torch.ops.metakernels


# ------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 48)])
def test_rms_norm_matches_reference(dtype, shape, frozen, name):
    x = rand_tensor(*shape, dtype=dtype).requires_grad_()
    w = rand_tensor(shape[-1], dtype=dtype, seed=1).requires_grad_(not frozen)
    dy = rand_tensor(*shape, dtype=dtype, seed=2)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(not frozen)
    with backend.use_backend(name):
        y = rms_norm(x, w, 1e-6)
    y_ref = rms_norm_ref(x2, w2, 1e-6)
    same_forward(y, y_ref, name, reduction=shape[-1])
    y.backward(dy)
    y_ref.backward(dy)
    rows = x.numel() // shape[-1]
    assert_close(x.grad, x2.grad, dtype, reduction=2 * shape[-1])   # two sums over a row
    if not frozen:
        assert_close(w.grad, w2.grad, dtype, reduction=shape[-1] + rows)


def test_nonzero_weight_check_follows_in_place_edits():
    """The cached check of a norm weight is redone when the weight changes in place (a zero
    written into it, or loaded over it), so a norm never keeps its output for a weight with a
    zero."""
    w = rand_tensor(24, seed=1)
    assert nonzero_weight(w)
    w[3] = 0.0
    assert not nonzero_weight(w)
    with torch.no_grad():
        w.copy_(rand_tensor(24, seed=3))
    assert nonzero_weight(w)
    assert not nonzero_weight(torch.zeros(5))


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_rms_norm_keeps_its_output_under_the_cpu_kernels():
    """A frozen weight without zeros: the norm keeps y (and rstd), not x; a zero in the weight or
    a trainable weight: x. Either way the gradient is right, and a second-order gradient through
    a norm that kept y says what to do."""
    x = rand_tensor(4, 5, 24).requires_grad_()
    dy = rand_tensor(4, 5, 24, seed=2)
    for w, keeps_y in [(rand_tensor(24, seed=1), True), (rand_tensor(24, seed=1).index_fill(0, torch.tensor([3]), 0.0), False),
                       (rand_tensor(24, seed=1).requires_grad_(), False)]:
        kept = []
        with backend.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
                lambda t: kept.append(t) or t, lambda t: t):
            y = rms_norm(x, w, 1e-6)
        assert any(t is y or t.data_ptr() == y.data_ptr() for t in kept) == keeps_y
        assert any(t.data_ptr() == x.data_ptr() for t in kept) != keeps_y
        x2 = x.detach().clone().requires_grad_()
        torch.autograd.backward(rms_norm_ref(x2, w.detach(), 1e-6), dy)
        (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        assert_close(dx, x2.grad, torch.float32, reduction=2 * x.shape[-1])
        if keeps_y:
            with pytest.raises(RuntimeError, match="second-order gradient .*use_backend"):
                torch.autograd.grad(y, x, dy, create_graph=True)


# -------------------------------------------------------------------------------- cpu kernels
@needs_cpu
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 5, 7), (64, 512), (2, 9, 130)])
def test_rms_norm_fwd_vs_the_library(shape):
    from metakernels.ops.rms_norm import rms_norm_ref as _rms_norm_ref
    x, weight, rstd_want = rms_inputs(shape)
    x[0, ..., 0] = 1e4                                 # one row dominated by a single element
    rstd_want = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    y, rstd = ops.rms_norm_fwd(x, weight, 1e-6)
    assert rstd.shape == (*shape[:-1], 1) and y.shape == shape
    # the same roundings but the order of the row sum: a few ulps
    assert ulps(rstd, rstd_want) <= 2
    want = _rms_norm_ref(x, weight, 1e-6)
    assert torch.equal(y.sign(), want.sign()) and ulps(y.abs(), want.abs()) <= 4
    # with the library's rstd the products round exactly as the library's
    same_r = weight * (x * rstd)
    assert same_bits(y, same_r)
    # strided input
    xt = x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 1 else x
    assert same_bits(ops.rms_norm_fwd(xt, weight, 1e-6)[0], y)


def _rms_want(x, weight, dy):
    xr = x.double().requires_grad_()    # the reference in fp64
    y = weight.double() * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6))
    return torch.autograd.grad(y, xr, dy.double())[0]


@needs_cpu
@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 7), (64, 512), (2, 9, 130)])
def test_rms_norm_bwd_vs_autograd(shape):
    x, weight, rstd = rms_inputs(shape)
    dy = torch.randn(shape)
    want = _rms_want(x, weight, dy)
    D = shape[-1]   # mean(x^2) and mean(g * xhat): two sums over the row
    assert_close(ops.rms_norm_bwd(dy, x, weight, rstd), want, reduction=2 * D)
    # from the forward's output instead of its input (signed weights)
    weight = weight * torch.where(torch.rand(shape[-1]) < 0.5, -1.0, 1.0)
    want = _rms_want(x, weight, dy)
    y, rstd = ops.rms_norm_fwd(x, weight, 1e-6)
    assert_close(ops.rms_norm_bwd(dy, y, weight, rstd, True), want, reduction=2 * D)


@needs_cpu
@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 7), (64, 512), (2, 9, 130)])
def test_rms_norm_bf16_vs_the_library(shape):
    from metakernels.ops.rms_norm import rms_norm_ref as _rms_norm_ref
    x, weight, _ = rms_inputs(shape, seed=3)
    x, weight = x.bfloat16(), weight.bfloat16()
    y, rstd = ops.rms_norm_fwd(x, weight, 1e-6)
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32
    want = _rms_norm_ref(x, weight, 1e-6)              # the library's bf16 roundings
    assert torch.equal(y.sign(), want.sign()) and bf16_ulps(y.abs(), want.abs()) <= 1
    dy = torch.randn(shape).bfloat16()
    want_dx = _rms_want(x.float(), weight.float(), dy.float())
    dx = ops.rms_norm_bwd(dy, x, weight, rstd)
    assert dx.dtype == torch.bfloat16
    assert_close(dx, want_dx, reduction=2 * shape[-1])
    # from the output (xhat = y / w, y rounded to bf16: one more bf16 rounding of xhat)
    assert_close(ops.rms_norm_bwd(dy, y, weight, rstd, True), want_dx, torch.bfloat16,
                 reduction=2 * shape[-1])
