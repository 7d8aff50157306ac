"""Second-order MAML, multitask SFT and chunked steps against their per-task / plain versions."""
import copy

import pytest
import torch

from metakernels.lora import inject
from metakernels.meta import (InnerConfig, PeftAdapterIO, causal_lm_loss, fomaml_step,
                              make_peft_model, maml_step, maml_step_per_task, mixture,
                              multitask_step, reptile_step)
from metakernels.meta.chunked import chunked_step
from metakernels.fused import apply_fused_layers
from metakernels.models import build_tiny_model

from conftest import MODEL_TOL, random_batch


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _model(dtype=torch.float32, attn="eager", num_tasks=3, family="llama", fused=False):
    base = build_tiny_model(family, vocab_size=53, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=48, attn_implementation=attn,
                            dtype=dtype)
    oracle = copy.deepcopy(base)
    if fused:
        assert min(apply_fused_layers(base).values()) > 0
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_fc"]
    bank = inject(base, targets, rank=3, alpha=6, num_tasks=num_tasks, dtype=dtype)
    with torch.no_grad():
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.1)
    return base, oracle, bank


def test_maml_batched_equals_per_task_loop():
    model, _, bank = _model()
    support, query = random_batch([2, 3, 1], 53, seed=1), random_batch([3, 1, 2], 53, seed=2)
    cfg = InnerConfig(lr=0.1, num_steps=2, optimizer="sgd", max_grad_norm=3.0)
    got = maml_step(model, bank, support, query, cfg)
    want = maml_step_per_task(model, bank, support, query, cfg)
    assert rel_err(got.meta_grad, want.meta_grad) < MODEL_TOL["rtol"]
    torch.testing.assert_close(got.query_losses, want.query_losses, **MODEL_TOL)


def test_maml_through_fused_layers_equals_maml_through_the_library_layers():
    # Second order through the fused RMSNorm, SwiGLU and rotary (their backwards differentiated
    # again) against the same step through Hugging Face's layers.
    fused, _, bank_f = _model(fused=True)
    plain, _, bank_p = _model()
    with torch.no_grad():
        bank_p.theta.copy_(bank_f.theta)
    support, query = random_batch([2, 3, 1], 53, seed=5), random_batch([3, 1, 2], 53, seed=6)
    cfg = InnerConfig(lr=0.3, num_steps=2, optimizer="sgd")
    got = maml_step(fused, bank_f, support, query, cfg)
    want = maml_step(plain, bank_p, support, query, cfg)
    assert rel_err(got.meta_grad, want.meta_grad) < MODEL_TOL["rtol"]
    fo = maml_step(fused, bank_f, support, query, cfg, first_order=True)
    assert rel_err(fo.meta_grad, want.meta_grad) > 1e-3   # second-order terms present


def test_maml_matches_finite_differences_and_differs_from_fomaml():
    # float64 GPT-2: HF Llama computes RMSNorm and the eager attention's softmax in fp32
    # whatever the model dtype, which bounds a finite-difference check at ~1e-3
    model, _, bank = _model(dtype=torch.float64, family="gpt2")
    support, query = random_batch([2, 2], 53, seed=3), random_batch([2, 2], 53, seed=4)
    cfg = InnerConfig(lr=0.5, num_steps=2, optimizer="sgd")
    got = maml_step(model, bank, support, query, cfg).meta_grad
    fo = maml_step(model, bank, support, query, cfg, first_order=True).meta_grad
    theta0 = bank.theta.detach().clone()

    def meta_loss(theta):
        with torch.no_grad():
            bank.theta.copy_(theta)
        r = maml_step(model, bank, support, query, cfg)
        return float(r.query_losses.mean())

    coords = torch.topk(got.abs(), 4).indices.tolist() + [0, 7]
    h = 1e-5
    for i in coords:
        e = torch.zeros_like(theta0)
        e[i] = h
        fd = (meta_loss(theta0 + e) - meta_loss(theta0 - e)) / (2 * h)
        assert abs(fd - float(got[i])) <= 1e-6 + 1e-4 * abs(fd), (i, fd, float(got[i]))
    with torch.no_grad():
        bank.theta.copy_(theta0)
    assert rel_err(fo, got) > 1e-3  # the second-order terms are really there


def test_first_order_maml_equals_fomaml():
    model, _, bank = _model()
    support, query = random_batch([2, 3, 1], 53, seed=5), random_batch([3, 1, 2], 53, seed=6)
    cfg = InnerConfig(lr=0.1, num_steps=2, optimizer="sgd")
    fo = maml_step(model, bank, support, query, cfg, first_order=True)
    want = fomaml_step(model, bank, support, query, cfg)
    assert rel_err(fo.meta_grad, want.meta_grad) < MODEL_TOL["rtol"]


def test_multitask_step_equals_peft_sft_on_the_mixture():
    model, oracle, bank = _model(attn="sdpa")
    support, query = random_batch([2, 3, 1], 53, seed=7), random_batch([3, 1, 2], 53, seed=8)
    got = multitask_step(model, bank, support, query)
    peft_model = make_peft_model(oracle, bank)
    io = PeftAdapterIO(peft_model, bank.slots)
    io.load(bank.theta.detach())
    causal_lm_loss(peft_model, mixture(support, query)).backward()
    assert rel_err(got.meta_grad, io.flat_grad(bank.num_params)) < MODEL_TOL["rtol"]


def test_chunked_step_equals_unchunked():
    model, _, bank = _model(attn="sdpa", num_tasks=5)
    support = random_batch([2, 3, 1, 2, 2], 53, seed=9)
    query = random_batch([3, 1, 2, 1, 2], 53, seed=10)
    cfg = InnerConfig(lr=0.1, num_steps=2, optimizer="adam", eps=1e-6)
    for algo, step in (("fomaml", fomaml_step), ("reptile", reptile_step)):
        want = step(model, bank, support, query, cfg)
        got = chunked_step(algo, model, bank, support, query, cfg, chunk=2)
        assert rel_err(got.meta_grad, want.meta_grad) < MODEL_TOL["rtol"]
        torch.testing.assert_close(got.query_losses, want.query_losses, **MODEL_TOL)
