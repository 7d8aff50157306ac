"""Nothing inside a meta-step is made on the default device: every tensor a step makes is on
the training device. On a GPU run a device-less ``torch.zeros`` lands on the CPU and the step
dies on a device mismatch (or copies to the host and back); here the default device is set to
``meta`` around a step on the CPU, so such a tensor has no values and the step fails."""
import pytest
import torch

from metakernels.config import load_config
from metakernels.meta import InnerConfig, PeftAdapterIO, make_peft_model, naive_step
from metakernels.train import Trainer

ARGS = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
        "meta.meta_batch_size=3", "data.support_size=2", "data.query_size=2",
        "meta.num_inner_steps=2", "trainer.eval_every=1", "trainer.eval_shots=2",
        "trainer.eval_seeds=1", "trainer.eval_query_size=2", "trainer.progress_bar=false",
        "trainer.loggers=[]"]


def _trainer(tmp_path, overrides):
    return Trainer(load_config(None, ARGS + [f"trainer.output_dir={tmp_path}", *overrides]))


@pytest.mark.parametrize("overrides", [
    ["meta.algorithm=fomaml"], ["meta.algorithm=reptile"], ["meta.algorithm=maml"],
    ["meta.algorithm=multitask"], ["meta.algorithm=naive_fomaml"],
    ["meta.algorithm=fomaml", "meta.num_inner_steps=0"]], ids=lambda o: "-".join(o))
def test_a_step_and_validation_make_nothing_on_the_default_device(tmp_path, overrides):
    ref, got = _trainer(tmp_path / "ref", overrides), _trainer(tmp_path / "got", overrides)
    # the sampler packs the batch on the host by design (then moved to the device): drawn outside
    batch = got.sampler.sample(0, 0, 1)
    got.sampler.sample = lambda *args: batch
    want_metrics, want_val = ref.train_step(), ref.validate()
    with torch.device("meta"):
        metrics = got.train_step()
        val = got.validate()
    assert got.bank.theta.device.type == "cpu"
    torch.testing.assert_close(got.bank.theta, ref.bank.theta, rtol=0, atol=0)
    for key in ("stage2/meta_loss", "meta_grad_norm", "stage1/loss_after"):
        assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-6, nan_ok=True)
    assert val == pytest.approx(want_val, rel=1e-6)


def test_naive_step_keeps_the_meta_gradient_on_thetas_device(tmp_path, monkeypatch):
    # the per-task loop copies nothing to the host: its result is on theta's (the model's) device
    t = _trainer(tmp_path, ["meta.algorithm=naive_fomaml"])
    batch = t.sampler.sample(0, 0, 1)
    theta = t.bank.theta.detach()
    peft = make_peft_model(t.peft_model.base_model.model, t.bank)
    cfg = InnerConfig(lr=0.1, num_steps=2)
    want = naive_step(peft, PeftAdapterIO(peft, t.bank.slots), theta, batch.support,
                      batch.query, cfg)

    def no_host_copy(self, *args, **kwargs):
        raise AssertionError("naive_step copied a tensor to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    with torch.device("meta"):
        got = naive_step(peft, PeftAdapterIO(peft, t.bank.slots), theta, batch.support,
                         batch.query, cfg)
    for name in ("meta_grad", "support_losses", "query_losses", "task_weights", "dropped"):
        assert getattr(got, name).device == theta.device, name
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)


def test_adaptation_without_inner_steps_gives_alive_on_the_host():
    # alive is host data whatever theta's device, as after an inner loop (validation combines it
    # with the host's query losses); the meta device stands in for a GPU: no step runs here
    from types import SimpleNamespace

    from metakernels.adapt import adapt_rows

    theta = torch.zeros(6, device="meta")
    bank = SimpleNamespace(theta=torch.zeros(6, device="meta"))
    fast, alive = adapt_rows(None, bank, theta, [[], []], InnerConfig(lr=0.1, num_steps=0), 0)
    assert fast.device.type == "meta" and tuple(fast.shape) == (2, 6)
    assert alive.device.type == "cpu" and alive.tolist() == [True, True]
