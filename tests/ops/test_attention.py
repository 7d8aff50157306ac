"""attention's cpu kernels against the fp64 math form (causal, masks, grouped heads, bf16)."""
import pytest
import torch

from conftest import assert_close, attention_inputs, needs_cpu

ops = torch.ops.metakernels


# -------------------------------------------------------------------------------- cpu kernels
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


@needs_cpu
@pytest.mark.parametrize("B,H,Hkv,L,D,causal,contiguous", [
    (1, 1, 1, 2, 2, True, False), (2, 4, 2, 7, 6, True, False), (3, 8, 8, 64, 64, True, True),
    (2, 6, 3, 37, 16, False, False), (1, 2, 1, 130, 8, True, False),
    # block products with column tails past one and two 16-wide vectors, row tails of 1-3
    (2, 3, 1, 33, 80, True, False), (1, 2, 2, 51, 40, False, True), (1, 2, 1, 128, 128, True, False)])
def test_attention_vs_the_math_form(B, H, Hkv, L, D, causal, contiguous):
    q, k, v = attention_inputs(B, H, Hkv, L, D, contiguous=contiguous)
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


@needs_cpu
@pytest.mark.parametrize("L", [9, 70])     # one block of query rows; three, the last of 6 rows
def test_attention_with_a_padding_mask_and_fully_masked_rows(L):
    B, H, Hkv, D = 3, 4, 2, 8
    q, k, v = attention_inputs(B, H, Hkv, L, D, seed=1)
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


@needs_cpu
@pytest.mark.parametrize("B,H,Hkv,L,D,masked", [(2, 4, 2, 7, 6, False), (3, 8, 8, 64, 64, False),
                                                (1, 2, 1, 130, 8, False), (3, 4, 2, 70, 8, True)])
def test_attention_bf16_is_the_fp32_kernel_rounded_once(B, H, Hkv, L, D, masked):
    """bf16 q, k, v: each head converted to fp32 inside the kernel (exactly), the fp32 kernel's
    products in the same order, the results rounded to bf16 once: bitwise the fp32 kernel on the
    same values, rounded; and within bf16's rounding of the fp64 math form."""
    q, k, v = (t.bfloat16() for t in attention_inputs(B, H, Hkv, L, D, seed=5))
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


@needs_cpu
def test_attention_without_queries_passes_zero_key_gradients():
    q, k, v = attention_inputs(2, 4, 2, 5, 6)
    q0 = q[:, :, :0]
    out, lse = ops.attention_fwd(q0, k, v, None, False, 0.3)
    assert out.shape == (2, 4, 0, 6) and lse.shape == (2, 4, 0)
    dq, dk, dv = ops.attention_bwd(out, q0, k, v, out, lse, None, False, 0.3)
    assert dq.shape == q0.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))
