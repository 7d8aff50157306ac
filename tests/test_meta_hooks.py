"""The meta-steps' hooks: a caller's per-task loss (``loss_fn``) and ``meta.task_chunk=auto`` (the
largest task chunk whose activations fit a stated budget)."""
import pytest
import torch

from metakernels.config import ConfigError, load_config
from metakernels.lora import inject
from metakernels.meta import InnerConfig, fomaml_step, task_losses
from metakernels.meta.chunked import (ChunkPlanner, chunked_step, saved_activation_bytes,
                                      task_chunk_setting)
from metakernels.meta.common import hidden_states
from metakernels.models import build_tiny_model
from metakernels.ops.segment_cross_entropy import segment_cross_entropy_ref

from conftest import random_batch

VOCAB = 97


def setup(num_tasks=4):
    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, intermediate_size=80)
    bank = inject(model, "all-linear", rank=4, alpha=8, num_tasks=num_tasks)
    torch.manual_seed(1)
    with torch.no_grad():
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.05)
    return model, bank


def logits_losses(model, batch, chunk_size=None):
    """The per-task losses through the materialised logits (another route to the same values)."""
    h = hidden_states(model, batch)
    W = model.get_output_embeddings().weight
    return segment_cross_entropy_ref(h, W.detach(), batch.labels.reshape(-1), batch.token_layout)


def test_loss_fn_is_the_steps_loss():
    model, bank = setup()
    support = random_batch([3, 1, 2, 2], VOCAB, seed=11)
    query = random_batch([2, 2, 1, 3], VOCAB, seed=12)
    cfg = InnerConfig(lr=0.05, num_steps=2)
    calls = []

    def counted(model, batch, chunk_size=None):
        calls.append(batch.num_tasks)
        return logits_losses(model, batch, chunk_size)
    want = fomaml_step(model, bank, support, query, cfg)
    got = fomaml_step(model, bank, support, query, cfg, loss_fn=counted)
    assert calls == [4, 4, 4]                    # two inner steps and the query
    torch.testing.assert_close(got.meta_grad, want.meta_grad, rtol=1e-5, atol=1e-8)
    chunked = chunked_step("fomaml", model, bank, support, query, cfg, 3, loss_fn=counted)
    assert calls[3:] == [3, 3, 3, 1, 1, 1]
    torch.testing.assert_close(chunked.meta_grad, want.meta_grad, rtol=1e-5, atol=1e-8)
    halved = fomaml_step(model, bank, support, query, cfg,
                         loss_fn=lambda m, b, c: 0.5 * task_losses(m, b, c))
    # at theta, before any inner update, the loss is the caller's
    torch.testing.assert_close(halved.support_losses[0], 0.5 * want.support_losses[0])


def test_saved_activations_are_linear_in_the_rows():
    """The planner's model: a forward's saved bytes at one sequence length are fixed + per_row *
    rows, whatever the split into tasks (every part here has a padded row, as the probe)."""
    model, bank = setup()
    batch = random_batch([3, 1, 2, 4], VOCAB, seed=11)
    planner = ChunkPlanner(1.0)
    fixed, per_row = planner.row_cost(model, bank, batch)
    assert per_row > 0
    for t0, t1 in ((0, 1), (0, 2), (1, 3), (0, 4)):
        part = batch.select(t0, t1)
        rows = part.input_ids.shape[0]
        got = saved_activation_bytes(model, bank, part)
        assert got == pytest.approx(fixed + per_row * rows, rel=0.02), (t0, t1)


def test_auto_chunk_is_the_largest_that_fits_the_budget():
    model, bank = setup()
    support = random_batch([3, 1, 2, 4], VOCAB, seed=11)
    query = random_batch([2, 2, 1, 3], VOCAB, seed=12)
    probe = ChunkPlanner(1.0)
    need = [probe.predicted_bytes(model, bank, support, query, c) for c in range(1, 5)]
    assert need[0] < need[1] < need[3]
    for c in (1, 2, 4):
        budget = need[c - 1]
        got = ChunkPlanner(budget).chunk(model, bank, support, query)
        assert got >= c and need[got - 1] <= budget
        assert all(n > budget for n in need[got:])      # the largest chunk that fits
    with pytest.raises(ConfigError, match=r"meta.memory_budget_mb=0: one task's step needs"):
        ChunkPlanner(need[0] / 2).chunk(model, bank, support, query)
    # the step in the chunks the planner chose is the plain step
    cfg = InnerConfig(lr=0.05, num_steps=2)
    want = fomaml_step(model, bank, support, query, cfg)
    planner = ChunkPlanner(need[1])
    got = chunked_step("fomaml", model, bank, support, query, cfg, planner)
    torch.testing.assert_close(got.meta_grad, want.meta_grad, rtol=1e-5, atol=1e-8)
    # and the activations a chunk of that size really keeps are within the budget
    c = planner.chunk(model, bank, support, query)
    worst = max(saved_activation_bytes(model, bank, b.select(t, min(4, t + c)))
                for b in (support, query) for t in range(0, 4, c))
    assert worst + c * 2 * bank.num_params * 4 <= need[1] * 1.02


def test_task_chunk_config():
    assert task_chunk_setting(load_config(None, ["meta.task_chunk=3"]).meta) == 3
    cfg = load_config(None, ["meta.task_chunk=auto", "meta.memory_budget_mb=512"])
    planner = task_chunk_setting(cfg.meta, "adam")
    assert isinstance(planner, ChunkPlanner)
    assert planner.budget == 512 * 2 ** 20 and planner.buffers_per_task == 4
    with pytest.raises(ConfigError, match="meta.task_chunk=auto: give the activation memory"):
        load_config(None, ["meta.task_chunk=auto"])
    with pytest.raises(ConfigError, match="meta.memory_budget_mb is read only with"):
        load_config(None, ["meta.memory_budget_mb=100"])
    with pytest.raises(ConfigError, match="meta.task_chunk: 'some' is neither"):
        load_config(None, ["meta.task_chunk=some"])
    with pytest.raises(ConfigError, match="meta.task_chunk"):
        load_config(None, ["meta.task_chunk=-1"])
