"""swiglu (with rotary, which shares its test) against Hugging Face's forms on the torch and cpu
backends, the layer ops' first and second derivatives, then the SwiGLU cpu kernels called
directly."""
import pytest
import torch
import torch.nn.functional as F

from metakernels import backend
from metakernels.ops.rms_norm import rms_norm
from metakernels.ops.rotary import rotary
from metakernels.ops.swiglu import swiglu

from conftest import (CPU_BACKENDS, assert_close, bf16_ulps, needs_cpu, rand_tensor, same_bits,
                      same_forward, spy)

ops = torch.ops.metakernels


# ------------------------------------------------------------------------------------- the op
def _hf_rotary(q, k, cos, sin):
    from transformers.models.llama import modeling_llama as m
    orig = getattr(m.apply_rotary_pos_emb, "_metakernels_original", m.apply_rotary_pos_emb)
    return orig(q, k, cos, sin)


def test_fused_functions_gradcheck_first_and_second_order():
    x = rand_tensor(3, 4, 10, dtype=torch.float64).requires_grad_()
    w = rand_tensor(10, dtype=torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    g = rand_tensor(5, 9, dtype=torch.float64, seed=2).requires_grad_()
    u = rand_tensor(5, 9, dtype=torch.float64, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(swiglu, (g, u))
    assert torch.autograd.gradgradcheck(swiglu, (g, u))
    q = rand_tensor(2, 3, 5, 8, dtype=torch.float64, seed=4).requires_grad_()
    k = rand_tensor(2, 1, 5, 8, dtype=torch.float64, seed=5).requires_grad_()
    cos, sin = rand_tensor(2, 5, 8, dtype=torch.float64, seed=6), rand_tensor(2, 5, 8, dtype=torch.float64,
                                                                  seed=7)
    assert torch.autograd.gradcheck(lambda a, b: rotary(a, b, cos, sin), (q, k))
    assert torch.autograd.gradgradcheck(lambda a, b: rotary(a, b, cos, sin), (q, k))


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_and_rotary_match_hugging_face(dtype, name):
    g = rand_tensor(6, 11, dtype=dtype).requires_grad_()
    u = rand_tensor(6, 11, dtype=dtype, seed=1).requires_grad_()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    with backend.use_backend(name):
        y = swiglu(g, u)
        out = rotary(q := rand_tensor(2, 4, 7, 6, dtype=dtype, seed=3).requires_grad_(),
                           k := rand_tensor(2, 2, 7, 6, dtype=dtype, seed=4).requires_grad_(),
                           cos := rand_tensor(2, 7, 6, dtype=dtype, seed=5),
                           sin := rand_tensor(2, 7, 6, dtype=dtype, seed=6))
    y_ref = F.silu(g2) * u2
    same_forward(y, y_ref, name)
    dy = rand_tensor(6, 11, dtype=dtype, seed=2)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(g.grad, g2.grad, dtype)
    assert_close(u.grad, u2.grad, dtype)

    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    ref = _hf_rotary(q2, k2, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))   # bitwise under both
    dq, dk = rand_tensor(*q.shape, dtype=dtype, seed=7), rand_tensor(*k.shape, dtype=dtype, seed=8)
    torch.autograd.backward(out, (dq, dk))
    torch.autograd.backward(ref, (dq, dk))
    assert_close(q.grad, q2.grad, dtype, reduction=2)
    assert_close(k.grad, k2.grad, dtype, reduction=2)


# -------------------------------------------------------------------------------- cpu kernels
@needs_cpu
@pytest.mark.parametrize("shape", [(1,), (3, 7, 5), (1024, 1376), (17, 33)])
def test_swiglu_fwd_vs_the_library(shape):
    g = torch.Generator().manual_seed(2)
    gate = torch.randn(shape, generator=g) * 6
    gate.view(-1)[:3] = torch.tensor([-200.0, 200.0, -1.2785])[: gate.numel()]  # tails, root
    up = torch.randn(shape, generator=g)
    assert_close(ops.swiglu_fwd(gate, up), F.silu(gate.double()) * up.double())
    if gate.dim() == 2:   # transposed (strided) inputs
        assert same_bits(ops.swiglu_fwd(gate.t(), up.t()),
                          ops.swiglu_fwd(gate.t().contiguous(), up.t().contiguous()))


@needs_cpu
@pytest.mark.parametrize("shape", [(1,), (3, 7, 5), (17, 33), (256, 1376)])
def test_swiglu_bf16_vs_the_library(shape):
    g = torch.Generator().manual_seed(4)
    gate = (torch.randn(shape, generator=g) * 6).bfloat16()
    up = torch.randn(shape, generator=g).bfloat16()
    y = ops.swiglu_fwd(gate, up)
    want = F.silu(gate) * up                            # the library's bf16 roundings
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.sign(), want.sign()) and bf16_ulps(y.abs(), want.abs()) <= 1
    dy = torch.randn(shape, generator=g).bfloat16()
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    want_dg, want_du = torch.autograd.grad(F.silu(gr) * ur, (gr, ur), dy.double())
    dg, du = ops.swiglu_bwd(dy, gate, up)
    assert dg.dtype == du.dtype == torch.bfloat16
    assert_close(dg, want_dg)
    assert_close(du, want_du)


@pytest.mark.skipif(not backend.triton_available(torch.device("cpu")),
                    reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
def test_layer_ops_dispatch_to_the_triton_kernels(monkeypatch):
    """Under the triton backend each layer op runs its Triton kernels (one table entry each),
    forward and first-order backward, with the torch form's values."""
    import importlib
    calls = {}
    for op in ("rms_norm", "swiglu", "rotary"):
        mod = importlib.import_module(f"metakernels.ops._triton.{op}")
        for phase in ("fwd", "bwd"):
            calls[f"{op}_{phase}"] = spy(monkeypatch, mod, f"{op}_{phase}")
    x = rand_tensor(3, 5, 8).requires_grad_()
    w = rand_tensor(8, seed=1) + 2.0
    g, u = rand_tensor(4, 9, seed=2).requires_grad_(), rand_tensor(4, 9, seed=3).requires_grad_()
    q = rand_tensor(2, 4, 5, 6, seed=4).requires_grad_()
    k = rand_tensor(2, 2, 5, 6, seed=5).requires_grad_()
    cos, sin = rand_tensor(2, 5, 6, seed=6), rand_tensor(2, 5, 6, seed=7)
    outs = {}
    for name in ("torch", "triton"):
        with backend.use_backend(name):
            y = (rms_norm(x, w, 1e-6).sum() + (swiglu(g, u) ** 2).sum()
                 + sum((t ** 2).sum() for t in rotary(q, k, cos, sin)))
            outs[name] = (y.detach(), *torch.autograd.grad(y, (x, g, u, q, k)))
    assert all(calls.values()), calls
    for a, b in zip(outs["triton"], outs["torch"]):
        assert_close(a, b, reduction=64)
