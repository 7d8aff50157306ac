"""Learned inner rates (per_layer_step, per_parameter) and the multi-step loss, batched over
tasks: against the per-task loop over a PEFT model, against finite differences in float64
(maml exact, fomaml against its first-order definition), and equal rates against fixed."""
import copy

import pytest
import torch

from metakernels import backend
from metakernels.fused import apply_fused_layers
from metakernels.lora import inject
from metakernels.meta import (InnerConfig, InnerRates, PeftAdapterIO, fomaml_step,
                              make_peft_model, maml_step, maml_step_per_task, msl_weights,
                              naive_step, task_losses)
from metakernels.meta.chunked import chunked_step
from metakernels.models import build_tiny_model

from conftest import random_batch

BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])
MODES = ["per_layer_step", "per_parameter"]


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _setup(dtype=torch.float32, family="llama", attn="sdpa", num_tasks=4):
    base = build_tiny_model(family, vocab_size=97, hidden_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=80, attn_implementation=attn,
                            dtype=dtype)
    oracle_base = copy.deepcopy(base)
    if family == "llama" and dtype == torch.float32:
        apply_fused_layers(base)
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_fc"]
    bank = inject(base, targets, rank=4, alpha=8, num_tasks=num_tasks, dtype=dtype)
    torch.manual_seed(1)
    with torch.no_grad():  # random B too, so the first step is not a special case
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.05)
    return base, oracle_base, bank


def _rates(mode, bank, K, lr, seed=2):
    """Learned rates spread around lr (0.5x to 1.5x), so that a mix-up of steps, modules or
    elements shows."""
    rates = InnerRates(mode, bank, K, lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rates.values.mul_(0.5 + torch.rand(rates.values.shape, generator=g).to(rates.values))
    return rates


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inner,msl", [("sgd", False), ("sgd", True), ("adam", True)])
def test_fomaml_with_learned_rates_equals_per_task_peft_loop(backend_name, mode, inner, msl):
    model, oracle_base, bank = _setup()
    peft_model = make_peft_model(oracle_base, bank)
    io = PeftAdapterIO(peft_model, bank.slots)
    support = random_batch([3, 1, 2, 4], 97, seed=11)
    query = random_batch([2, 3, 1, 2], 97, seed=12)
    K = 3
    cfg = InnerConfig(lr=0.05 if inner == "sgd" else 0.01, num_steps=K, optimizer=inner,
                      max_grad_norm=5.0, eps=1e-6)
    rates = _rates(mode, bank, K, cfg.lr)
    v = msl_weights(K, 3, 10) if msl else None
    theta0 = bank.theta.detach().clone()
    with backend.use_backend(backend_name):
        got = fomaml_step(model, bank, support, query, cfg, rates=rates, msl=v)
    want = naive_step(peft_model, io, theta0, support, query, cfg, rates=rates.values, msl=v)
    P = bank.num_params
    assert got.meta_grad.shape == (P + rates.numel,)
    assert rel_err(got.meta_grad[:P], want.meta_grad[:P]) < 1e-5
    assert rel_err(got.meta_grad[P:], want.meta_grad[P:]) < 1e-5
    assert float(want.meta_grad[P:].abs().min() if mode == "per_layer_step" else
                 want.meta_grad[P:].abs().max()) > 0, "the rates' gradient is not exercised"
    torch.testing.assert_close(got.support_losses, want.support_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.query_losses, want.query_losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("msl", [False, True])
def test_maml_with_learned_rates_equals_per_task_loop(mode, msl):
    model, _, bank = _setup(attn="eager", num_tasks=3)
    support, query = random_batch([2, 3, 1], 97, seed=1), random_batch([3, 1, 2], 97, seed=2)
    K = 2
    cfg = InnerConfig(lr=0.1, num_steps=K, optimizer="sgd", max_grad_norm=3.0)
    rates = _rates(mode, bank, K, cfg.lr)
    v = msl_weights(K, 1, 4) if msl else None
    got = maml_step(model, bank, support, query, cfg, rates=rates, msl=v)
    want = maml_step_per_task(model, bank, support, query, cfg, rates=rates, msl=v)
    assert got.meta_grad.shape == (bank.num_params + rates.numel,)
    assert rel_err(got.meta_grad, want.meta_grad) < 1e-5
    assert float(got.meta_grad[bank.num_params:].abs().max()) > 0


def _fd_check(loss_fn, values, grad, coords, h=1e-5):
    """Central differences of ``loss_fn`` in ``values`` (a float64 Parameter) at ``coords``."""
    v0 = values.detach().clone()
    flat = values.data.view(-1)
    for i in coords:
        flat.copy_(v0.view(-1))
        flat[i] += h
        up = loss_fn()
        flat[i] -= 2 * h
        down = loss_fn()
        fd = (up - down) / (2 * h)
        assert abs(fd - float(grad[i])) <= 1e-7 + 1e-5 * abs(fd), (i, fd, float(grad[i]))
    values.data.copy_(v0)


@pytest.mark.parametrize("mode,msl", [("per_layer_step", False), ("per_parameter", False),
                                      ("per_layer_step", True)])
def test_maml_rate_gradient_matches_finite_differences(mode, msl):
    # float64 GPT-2 (HF Llama keeps RMSNorm and the eager softmax in fp32 whatever the dtype)
    model, _, bank = _setup(dtype=torch.float64, family="gpt2", attn="eager", num_tasks=2)
    support, query = random_batch([2, 2], 97, seed=3), random_batch([2, 2], 97, seed=4)
    K = 2
    cfg = InnerConfig(lr=0.3, num_steps=K, optimizer="sgd")
    rates = _rates(mode, bank, K, cfg.lr)
    v = msl_weights(K, 1, 3) if msl else None
    P = bank.num_params
    grad = maml_step(model, bank, support, query, cfg, rates=rates, msl=v).meta_grad[P:]

    def meta_loss():
        r = maml_step(model, bank, support, query, cfg, rates=rates, msl=v)
        if v is None:
            return float(r.query_losses.mean())
        return _query_loss_at_each_step(model, bank, support, query, cfg, rates, v)

    coords = torch.topk(grad.abs(), 4).indices.tolist() + [0]
    _fd_check(meta_loss, rates.values, grad, coords)


def _query_loss_at_each_step(model, bank, support, query, cfg, rates, v):
    """sum_k v[k] * mean_t L_query[t](fast_k[t]), by plain SGD steps (no graph)."""
    theta = bank.theta.detach()
    T = support.num_tasks
    fast = theta.expand(T, -1).clone().requires_grad_()
    total = 0.0
    with backend.use_backend("torch"):
        for k in range(cfg.num_steps):
            with bank.activate(fast, support.token_layout):
                (g,) = torch.autograd.grad(task_losses(model, support).sum(), fast)
            with torch.no_grad():
                fast -= rates.element_rates(k).detach() * g
            with torch.no_grad(), bank.activate(fast, query.token_layout):
                total += v[k] * float(task_losses(model, query).mean())
    return total


@pytest.mark.parametrize("mode,msl", [("per_layer_step", False), ("per_parameter", False),
                                      ("per_layer_step", True), ("per_parameter", True)])
def test_fomaml_rate_gradient_is_its_first_order_definition(mode, msl):
    """F(rates) = sum_k v[k] mean_t L_query[t](theta - sum_{j<=k} rate_j * d_j[t]) with the
    inner steps' directions d_j held fixed: fomaml's rate gradient is dF/drates, in float64."""
    model, _, bank = _setup(dtype=torch.float64, family="gpt2", num_tasks=3)
    support, query = random_batch([2, 1, 3], 97, seed=5), random_batch([2, 2, 1], 97, seed=6)
    K = 3
    cfg = InnerConfig(lr=0.3, num_steps=K, optimizer="sgd", max_grad_norm=2.0,
                      weight_decay=0.1)
    rates = _rates(mode, bank, K, cfg.lr)
    v = msl_weights(K, 2, 5) if msl else [0.0] * (K - 1) + [1.0]
    P, T = bank.num_params, support.num_tasks
    with backend.use_backend("torch"):
        grad = fomaml_step(model, bank, support, query, cfg, rates=rates,
                           msl=v if msl else None).meta_grad[P:]
        # the directions, by hand: clipped support gradient plus weight decay, per task
        theta = bank.theta.detach()
        fast = theta.expand(T, -1).clone().requires_grad_()
        dirs = []
        for k in range(K):
            with bank.activate(fast, support.token_layout):
                (g,) = torch.autograd.grad(task_losses(model, support).sum(), fast)
            norms = g.norm(dim=1, keepdim=True)
            d = g * torch.clamp(2.0 / (norms + 1e-6), max=1.0) + 0.1 * fast.detach()
            dirs.append(d)
            with torch.no_grad():
                fast -= rates.element_rates(k).detach() * d

    def first_order_objective():
        total = 0.0
        with torch.no_grad(), backend.use_backend("torch"):
            f = theta.expand(T, -1).clone()
            for k in range(K):
                f = f - rates.element_rates(k) * dirs[k]
                if v[k]:
                    with bank.activate(f, query.token_layout):
                        total += v[k] * float(task_losses(model, query).mean())
        return total

    coords = torch.topk(grad.abs(), 4).indices.tolist() + [1]
    _fd_check(first_order_objective, rates.values, grad, coords)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_equal_rates_reproduce_fixed_exactly(backend_name, mode, inner):
    """Fresh learned rates (every one at inner_lr) give fixed's meta-gradient, losses and fast
    weights bit for bit; the rates' gradient is appended after it."""
    model, _, bank = _setup()
    support = random_batch([3, 1, 2, 4], 97, seed=13)
    query = random_batch([2, 3, 1, 2], 97, seed=14)
    cfg = InnerConfig(lr=0.05, num_steps=3, optimizer=inner, max_grad_norm=5.0, eps=1e-6)
    with backend.use_backend(backend_name):
        fixed = fomaml_step(model, bank, support, query, cfg)
        fast_fixed = bank.fast.detach().clone()
        learned = fomaml_step(model, bank, support, query, cfg,
                              rates=InnerRates(mode, bank, 3, cfg.lr))
    P = bank.num_params
    assert torch.equal(learned.meta_grad[:P], fixed.meta_grad)
    assert torch.equal(learned.query_losses, fixed.query_losses)
    assert torch.equal(learned.support_losses, fixed.support_losses)
    assert torch.equal(bank.fast.detach(), fast_fixed)


def test_maml_equal_rates_reproduce_fixed():
    model, _, bank = _setup(attn="eager", num_tasks=3)
    support, query = random_batch([2, 3, 1], 97, seed=1), random_batch([3, 1, 2], 97, seed=2)
    cfg = InnerConfig(lr=0.1, num_steps=2, optimizer="sgd", max_grad_norm=3.0)
    fixed = maml_step(model, bank, support, query, cfg)
    for mode in MODES:
        learned = maml_step(model, bank, support, query, cfg,
                            rates=InnerRates(mode, bank, 2, cfg.lr))
        assert torch.equal(learned.meta_grad[:bank.num_params], fixed.meta_grad)
        assert torch.equal(learned.query_losses, fixed.query_losses)


def test_msl_weights_anneal_to_the_last_step():
    assert msl_weights(4, 0, 10) == [0.25] * 4
    mid = msl_weights(4, 5, 10)
    assert abs(sum(mid) - 1) < 1e-12 and mid[0] == mid[2] < 0.25 < mid[3]
    assert msl_weights(4, 10, 10) == [0.0, 0.0, 0.0, 1.0] == msl_weights(4, 99, 10)
    assert msl_weights(1, 0, 10) == [1.0]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_msl_on_the_last_step_only_is_the_plain_step(backend_name):
    model, _, bank = _setup()
    support = random_batch([3, 1, 2, 4], 97, seed=15)
    query = random_batch([2, 3, 1, 2], 97, seed=16)
    cfg = InnerConfig(lr=0.05, num_steps=3, optimizer="sgd", max_grad_norm=5.0)
    with backend.use_backend(backend_name):
        plain = fomaml_step(model, bank, support, query, cfg)
        last = fomaml_step(model, bank, support, query, cfg, msl=msl_weights(3, 7, 7))
        early = fomaml_step(model, bank, support, query, cfg, msl=msl_weights(3, 0, 7))
    assert torch.equal(last.meta_grad, plain.meta_grad)
    assert rel_err(early.meta_grad, plain.meta_grad) > 1e-3  # the earlier points count


def test_chunked_step_with_learned_rates_equals_unchunked():
    model, _, bank = _setup(num_tasks=4)
    support = random_batch([2, 3, 1, 2], 97, seed=17)
    query = random_batch([3, 1, 2, 1], 97, seed=18)
    cfg = InnerConfig(lr=0.05, num_steps=2, optimizer="sgd")
    rates = _rates("per_layer_step", bank, 2, cfg.lr)
    kw = dict(rates=rates, msl=msl_weights(2, 1, 4))
    want = fomaml_step(model, bank, support, query, cfg, **kw)
    got = chunked_step("fomaml", model, bank, support, query, cfg, chunk=3, **kw)
    assert rel_err(got.meta_grad, want.meta_grad) < 1e-5


def test_rates_metrics_per_module():
    _, _, bank = _setup()
    rates = _rates("per_layer_step", bank, 3, 0.1)
    m = rates.metrics()
    name = bank.slots[1].name
    col = rates.values.detach()[:, 1]
    assert m[f"inner_lr/{name}/mean"] == pytest.approx(float(col.mean()))
    assert m[f"inner_lr/{name}/min"] == float(col.min()) < m[f"inner_lr/{name}/max"]
    assert m["inner_lr/min"] == float(rates.values.min())
    pp = _rates("per_parameter", bank, 3, 0.1).metrics()
    s = bank.slots[2]
    assert pp[f"inner_lr/{s.name}/max"] <= 0.15 + 1e-7 and len(pp) == 3 + 3 * len(bank.slots)


@pytest.mark.parametrize("mode", MODES)
def test_one_inner_step_first_order_rate_gradient_is_exact(mode):
    """With one inner step no later direction depends on the rate: fomaml's rate gradient is
    maml's, while theta's still lacks the second-order term."""
    model, _, bank = _setup(attn="eager", num_tasks=3)
    support, query = random_batch([2, 3, 1], 97, seed=19), random_batch([3, 1, 2], 97, seed=20)
    cfg = InnerConfig(lr=0.3, num_steps=1, optimizer="sgd", max_grad_norm=3.0)
    rates = _rates(mode, bank, 1, cfg.lr)
    P = bank.num_params
    with backend.use_backend("torch"):
        fo = fomaml_step(model, bank, support, query, cfg, rates=rates).meta_grad
    exact = maml_step(model, bank, support, query, cfg, rates=rates).meta_grad
    assert rel_err(fo[P:], exact[P:]) < 1e-5
    assert rel_err(fo[:P], exact[:P]) > 1e-3
