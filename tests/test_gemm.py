"""metakernels.gemm: the library choice for the frozen base's GEMMs and ``frozen_linear``."""
import copy

import pytest
import torch
import torch.nn.functional as F

from metakernels import TaskLayout, backend, gemm
from metakernels.fused import apply_fused_layers, switch_linears
from metakernels.lora import inject
from metakernels.models import build_tiny_model
from conftest import MODEL_SUMS, MODEL_TOL, assert_close

needs_onednn = pytest.mark.skipif(
    not (gemm.onednn_available() and backend.cpu_available()),
    reason="needs PyTorch's oneDNN and the C++ extension (the cpu backend)")


def _count_onednn_calls(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    return out, calls


def test_library_choice_and_errors(monkeypatch):
    monkeypatch.delenv(gemm.ENV_VAR, raising=False)
    assert gemm.gemm_library() == ("onednn" if gemm.onednn_available() else "blas")
    monkeypatch.setenv(gemm.ENV_VAR, "blas")
    assert gemm.gemm_library() == "blas"
    with gemm.use_gemm("blas"):
        assert gemm.gemm_library() == "blas"
    assert gemm.gemm_library() == "blas"
    monkeypatch.setenv(gemm.ENV_VAR, "cublas")
    with pytest.raises(ValueError, match=r"METAKERNELS_GEMM='cublas' is not a GEMM library"):
        gemm.gemm_library()
    with pytest.raises(ValueError, match="unknown GEMM library 'mkl'"):
        with gemm.use_gemm("mkl"):
            pass
    monkeypatch.setenv(gemm.ENV_VAR, "onednn")
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    with pytest.raises(RuntimeError, match="METAKERNELS_GEMM=onednn was forced, but this "
                                           "PyTorch build has no oneDNN"):
        gemm.gemm_library()


@needs_onednn
def test_use_onednn_only_for_fp32_cpu_under_the_cpu_backend():
    x = torch.randn(3, 4)
    with backend.use_backend("cpu"):
        assert gemm.use_onednn(x, x)
        assert not gemm.use_onednn(x.double(), x.double())
        assert not gemm.use_onednn(x.bfloat16(), x.bfloat16())
        with gemm.use_gemm("blas"):
            assert not gemm.use_onednn(x, x)
    with backend.use_backend("torch"):
        assert not gemm.use_onednn(x, x)


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13), (0, 13)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_layout", ["rows", "transposed"])
def test_frozen_linear_matches_linear(shape, bias, weight_layout):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(11, 13, generator=g)
    if weight_layout == "transposed":       # [out, in] with strides (1, out)
        W = W.T.contiguous().T
    b = torch.randn(11, generator=g) if bias else None
    x = torch.randn(*shape, generator=g, dtype=torch.float64).float().requires_grad_()
    dy = torch.randn(*shape[:-1], 11, generator=g)
    x64 = x.detach().double().requires_grad_()
    want = F.linear(x64, W.double(), None if b is None else b.double())
    (dx_want,) = torch.autograd.grad(want, x64, dy.double())
    with backend.use_backend("cpu"):
        y, calls = _count_onednn_calls(lambda: gemm.frozen_linear(x, W, b))
        (dx,) = torch.autograd.grad(y, x, dy)
    assert calls == (1 if x.numel() else 0)
    assert_close(y, want.detach(), reduction=13)
    assert_close(dx, dx_want, reduction=11)


@needs_onednn
def test_frozen_linear_trainable_weight_runs_linear_and_gets_its_gradient():
    W = torch.randn(5, 4, requires_grad=True)
    x = torch.randn(3, 4)
    with backend.use_backend("cpu"):
        y, calls = _count_onednn_calls(lambda: gemm.frozen_linear(x, W))
    assert calls == 0
    (dW,) = torch.autograd.grad(y.sum(), W)
    assert_close(dW, torch.ones(3, 5, dtype=torch.float64).T @ x.double(), reduction=3)


@needs_onednn
def test_frozen_linear_double_backward():
    """create_graph through the oneDNN linear: the backward is differentiable (second-order
    MAML through a frozen projection)."""
    W = torch.randn(6, 5, dtype=torch.float64).float()
    a = torch.randn(5, requires_grad=True)
    x = torch.randn(4, 5)

    def loss(lin):
        y = lin(x * a, W)
        return (y.tanh() ** 2).sum()

    def hvp(lin):
        (g,) = torch.autograd.grad(loss(lin), a, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), a)
        return g.detach(), h

    with backend.use_backend("cpu"):
        got = hvp(gemm.frozen_linear)
    want = hvp(F.linear)
    # x * a then the product over 5, tanh, its gradient over 6: twice for the second order
    assert_close(got[0], want[0], reduction=5 + 6)
    assert_close(got[1], want[1], reduction=2 * (5 + 6))


@needs_onednn
def test_switched_model_runs_onednn_and_matches_blas():
    """A Llama with every optimisation on: the fused layers and its frozen projections on
    oneDNN under the cpu backend give the logits and adapter gradients of ATen's GEMMs."""
    base = build_tiny_model("llama", vocab_size=97, hidden_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=80)
    counts = apply_fused_layers(base)
    assert counts["linear"] == 2 * 7 + 1
    bank = inject(base, ["q_proj", "v_proj"], rank=4, alpha=8, num_tasks=1)
    with torch.no_grad():
        bank.theta.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(2))
    layout = TaskLayout.from_sizes([27])

    def run(lib):
        with backend.use_backend("cpu"), gemm.use_gemm(lib), \
                bank.activate(bank.theta.unsqueeze(0), layout):
            logits = base(input_ids=ids).logits
            (g,) = torch.autograd.grad(logits.square().mean(), bank.theta)
        return logits.detach(), g

    want, gw = run("blas")
    (got, gg), calls = _count_onednn_calls(lambda: run("onednn"))
    # forward: 2 x (5 frozen nn.Linear + 2 LoRA bases) + lm_head; backward: their dx
    assert calls >= 2 * 7 + 1
    assert_close(got, want, reduction=MODEL_SUMS)
    assert_close(gg, gw, reduction=MODEL_SUMS)


def test_switch_linears_counts_and_keeps_state_dict():
    base = build_tiny_model("llama", vocab_size=31, hidden_size=16, num_layers=1, num_heads=2,
                            num_kv_heads=2, intermediate_size=24)
    keys = list(base.state_dict())
    twin = copy.deepcopy(base)
    assert switch_linears(base) == 8 and switch_linears(base) == 0
    assert list(base.state_dict()) == keys
    ids = torch.randint(0, 31, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, twin(input_ids=ids).logits,
                                   **MODEL_TOL)
