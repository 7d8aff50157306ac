"""The invariant: a batched meta-step equals the per-task loop over a PEFT model."""
import copy

import pytest
import torch

from metakernels import backend
from metakernels.fused import apply_fused_layers
from metakernels.lora import inject
from metakernels.meta import InnerConfig, PeftAdapterIO, fomaml_step, make_peft_model, naive_step
from metakernels.meta import reptile_step
from metakernels.models import build_tiny_model

from conftest import MODEL_TOL, random_batch

BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _setup(family="llama", targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    base = build_tiny_model(family, vocab_size=97, hidden_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=80)
    oracle_base = copy.deepcopy(base)
    # The batched side runs with every optimisation on (fused layers, the fused loss, the
    # grouped kernels); the per-task oracle is the plain PEFT model on the library's layers.
    counts = apply_fused_layers(base)
    assert family == "gpt2" or min(counts.values()) > 0, counts
    bank = inject(base, targets, rank=4, alpha=8, num_tasks=4)
    torch.manual_seed(1)
    with torch.no_grad():  # random B too, so the first step is not a special case
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.05)
    peft_model = make_peft_model(oracle_base, bank)
    io = PeftAdapterIO(peft_model, bank.slots)
    return base, bank, peft_model, io


def _outer(theta0, grad):
    """An outer SGD step. Both paths hand their meta-gradient to the same outer-optimizer code;
    SGD keeps the comparison about the meta-gradient. (AdamW's first step is close to
    lr * sign(g), which turns the fp32 rounding of near-zero components, e.g. Reptile's
    theta - fast where a task's gradient vanished, into full-size differences.)"""
    theta = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([theta], lr=1.0)
    theta.grad = grad.clone()
    opt.step()
    return theta.detach()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_batched_step_equals_per_task_loop(backend_name, inner, algorithm):
    model, bank, peft_model, io = _setup()
    support = random_batch([3, 1, 2, 4], 97, seed=11)
    query = random_batch([2, 3, 1, 2], 97, seed=12)
    # Adam's eps is 1e-6 (inner and outer): with 1e-8 its first steps are ~lr*sign(g) on
    # components of |g| ~ 1e-8, whose sign is fp32 rounding noise in either implementation.
    cfg = InnerConfig(lr=0.05 if inner == "sgd" else 0.01, num_steps=3, optimizer=inner,
                      max_grad_norm=5.0, eps=1e-6)
    theta0 = bank.theta.detach().clone()
    with backend.use_backend(backend_name):
        step = fomaml_step if algorithm == "fomaml" else reptile_step
        got = step(model, bank, support, query, cfg)
    want = naive_step(peft_model, io, theta0, support, query, cfg, algorithm=algorithm)
    assert rel_err(got.meta_grad, want.meta_grad) < MODEL_TOL["rtol"]
    assert torch.allclose(got.support_losses, want.support_losses, **MODEL_TOL)
    assert torch.allclose(got.query_losses, want.query_losses, **MODEL_TOL)
    assert (rel_err(_outer(theta0, got.meta_grad), _outer(theta0, want.meta_grad))
            < MODEL_TOL["rtol"])
    # the inner loop moved every task, and differently
    assert not torch.allclose(bank.fast[0].detach(), bank.fast[1].detach())


# bf16 base, fp32 adapters (a bf16 checkpoint under PEFT's defaults, which keep the adapters in
# fp32). Both sides round the base's activations to bf16 (eps = 2^-8) at every layer, in
# different places: the batched side's kernels compute each layer in fp32 and round once, the
# library's bf16 ops round after each op. The meta-gradient's relative difference is then a few
# eps: allowed 8 eps (3.1%), the losses 2 eps relative. An error of the kind the fp32 test
# catches (a wrong segment, task or sign) moves them by O(1).
BF16_EPS = 2.0 ** -8


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_batched_step_equals_per_task_loop_on_a_bf16_base(backend_name, algorithm):
    base = build_tiny_model("llama", vocab_size=97, hidden_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=80).to(torch.bfloat16)
    oracle_base = copy.deepcopy(base)
    apply_fused_layers(base)
    bank = inject(base, ("q_proj", "k_proj", "v_proj", "o_proj"), rank=4, alpha=8, num_tasks=4)
    torch.manual_seed(1)
    with torch.no_grad():
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.05)
    peft_model = make_peft_model(oracle_base, bank)
    io = PeftAdapterIO(peft_model, bank.slots)
    assert all(p.dtype == torch.float32 for p in io.parameters())
    assert bank.theta.dtype == torch.float32
    support = random_batch([3, 1, 2, 4], 97, seed=11)
    query = random_batch([2, 3, 1, 2], 97, seed=12)
    cfg = InnerConfig(lr=0.05, num_steps=3, optimizer="sgd", max_grad_norm=5.0)
    theta0 = bank.theta.detach().clone()
    with backend.use_backend(backend_name):
        step = fomaml_step if algorithm == "fomaml" else reptile_step
        got = step(base, bank, support, query, cfg)
    want = naive_step(peft_model, io, theta0, support, query, cfg, algorithm=algorithm)
    assert got.meta_grad.dtype == torch.float32
    assert rel_err(got.meta_grad, want.meta_grad) < 8 * BF16_EPS
    torch.testing.assert_close(got.support_losses, want.support_losses, rtol=2 * BF16_EPS, atol=0)
    torch.testing.assert_close(got.query_losses, want.query_losses, rtol=2 * BF16_EPS, atol=0)
    assert not torch.allclose(bank.fast[0].detach(), bank.fast[1].detach())
