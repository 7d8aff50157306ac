"""rotary's cpu kernels against the op-by-op form (bitwise) and its transpose, in any row layout."""
import pytest
import torch

from conftest import assert_close, needs_cpu, rotary_inputs, same_bits

ops = torch.ops.metakernels


# -------------------------------------------------------------------------------- cpu kernels
@needs_cpu
@pytest.mark.parametrize("B,H,L,D,batch_tables", [(1, 1, 1, 2, False), (2, 3, 5, 6, True),
                                                  (3, 4, 7, 64, False), (1, 2, 33, 10, True)])
def test_rotary_fwd_is_bitwise_the_op_by_op_form_and_keeps_the_layout(B, H, L, D, batch_tables):
    from metakernels.ops.rotary import rotate as _rotate
    q, k, cos, sin = rotary_inputs(B, H, L, D, batch_tables)
    got_q, got_k = ops.rotary_fwd(q, k, cos, sin)
    want_q, want_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    assert same_bits(got_q, want_q) and same_bits(got_k, want_k)
    assert got_q.stride() == q.stride() and got_k.stride() == k.stride()


@needs_cpu
@pytest.mark.parametrize("B,H,L,D,batch_tables", [(1, 1, 1, 2, False), (2, 3, 5, 6, True),
                                                  (3, 4, 7, 64, False)])
def test_rotary_bwd_is_the_transpose_of_the_forward(B, H, L, D, batch_tables):
    from metakernels.ops.rotary import rotate as _rotate
    q, _, cos, sin = rotary_inputs(B, H, L, D, batch_tables)
    dy = torch.randn(q.shape)
    qr = q.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_rotate(qr, cos, sin), qr, dy)
    assert_close(ops.rotary_bwd(dy, cos, sin), want, reduction=2)
    assert_close(ops.rotary_bwd(dy.transpose(1, 2).contiguous().transpose(1, 2), cos, sin), want,
                 reduction=2)


@needs_cpu
@pytest.mark.parametrize("layout", ["l-outermost", "sliced"])
def test_rotary_walks_any_row_layout(layout):
    """The kernels walk the rows in the input's memory order: q from an [L, H, B, D] buffer (the
    row axes in another order than any projection gives), or a slice of a wider buffer (not
    dense: the output then gets its own, contiguous, strides)."""
    from metakernels.ops.rotary import rotate as _rotate
    B, H, L, D = 3, 4, 9, 8
    g = torch.Generator().manual_seed(3)
    if layout == "l-outermost":
        q = torch.randn(L, H, B, D, generator=g).permute(2, 1, 0, 3)
    else:
        q = torch.randn(B, L, H, 3 * D, generator=g)[..., D:2 * D].transpose(1, 2)
    angles = torch.rand(B, 1, L, D, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    got, _ = ops.rotary_fwd(q, q, cos, sin)
    assert same_bits(got, _rotate(q, cos, sin))
    dy = torch.randn(q.shape, generator=g)
    dy = dy.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) if layout == "sliced" else dy
    qr = q.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_rotate(qr, cos, sin), qr, dy)
    assert_close(ops.rotary_bwd(dy, cos, sin), want, reduction=2)


@needs_cpu
@pytest.mark.parametrize("B,H,L,D,batch_tables", [(1, 1, 1, 2, False), (2, 3, 5, 6, True),
                                                  (3, 4, 7, 64, False)])
def test_rotary_bf16_is_bitwise_the_op_by_op_form(B, H, L, D, batch_tables):
    from metakernels.ops.rotary import rotate as _rotate
    q, k, cos, sin = (t.bfloat16() for t in rotary_inputs(B, H, L, D, batch_tables, seed=7))
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
