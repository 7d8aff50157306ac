"""What a run directory holds and when a run refuses it; theta never saved non-finite; a resume
keeps the checkpoint's settings; a collapsed run does not report success."""
import json
import math

import pytest
import torch

from metakernels import export, train
from metakernels.checkpoint import latest_checkpoint, load_checkpoint
from metakernels.config import ConfigError, load_config

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=1", "model.intermediate_size=64", "model.lora_rank=2",
        "meta.meta_batch_size=2", "data.support_size=2", "data.query_size=2",
        "meta.num_inner_steps=1", "trainer.progress_bar=false", "trainer.loggers=[jsonl]",
        "trainer.eval_every=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp_path, *args):
    return train.main([*TINY, f"trainer.output_dir={tmp_path}", *args])


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_a_new_run_refuses_a_directory_that_holds_another_run(tmp_path, capsys):
    run = tmp_path / "default"
    assert _train(tmp_path, "trainer.total_steps=4", "trainer.save_every=2") == 0
    old_id = load_checkpoint(latest_checkpoint(run))[1]["run_id"]
    capsys.readouterr()
    assert _train(tmp_path, "trainer.total_steps=2", "trainer.save_every=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trainer.experiment_name=default") and "\n" not in err
    for name in ("holds another run", "trainer.resume=true", "trainer.overwrite=true"):
        assert name in err
    assert _steps(run) == ["step_00000002", "step_00000004"]  # the old run is untouched

    assert _train(tmp_path, "trainer.total_steps=2", "trainer.save_every=1",
                  "trainer.overwrite=true") == 0
    assert _steps(run) == ["step_00000001", "step_00000002"]
    _, meta = load_checkpoint(latest_checkpoint(run))
    assert meta["run_id"] != old_id and meta["config"]["trainer"]["total_steps"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]

    capsys.readouterr()
    assert export.main(["--checkpoint", str(run), "--output", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert f"step 2, run {meta['run_id']}" in out and "step_00000002" in out


def test_a_trainer_built_in_code_keeps_the_same_policy(tmp_path):
    """The policy lives in Trainer, not only in the command: a script that builds
    Trainer(cfg) itself cannot start over another run or resume it with another config."""
    from metakernels.errors import UserError

    run = tmp_path / "default"
    assert _train(tmp_path, "trainer.total_steps=2", "trainer.save_every=1") == 0
    args = [*TINY, f"trainer.output_dir={tmp_path}", "trainer.total_steps=2"]
    with pytest.raises(UserError, match="holds another run"):
        train.Trainer(load_config(None, args))
    with pytest.raises(UserError, match="meta.outer_lr"):
        train.Trainer(load_config(None, args + ["trainer.resume=true", "meta.outer_lr=1e-3"]))
    assert _steps(run) == ["step_00000001", "step_00000002"]      # nothing touched
    t = train.Trainer(load_config(None, args + ["trainer.resume=true"]))
    assert t.resume()


@pytest.mark.parametrize("key", ["meta.outer_lr", "meta.inner_lr", "model.lora_alpha",
                                 "meta.max_grad_norm", "meta.weight_decay",
                                 "model.initializer_range", "meta.inner_max_grad_norm"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"{key}: must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_a_non_finite_theta_is_never_saved_and_stops_the_run(tmp_path, monkeypatch, capsys):
    class Poisoned(torch.optim.AdamW):
        """An outer step that turns theta non-finite at its third call."""
        calls = 0

        def step(self, closure=None):
            out = super().step(closure)
            Poisoned.calls += 1
            if Poisoned.calls == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("inf"))
            return out

    monkeypatch.setattr(torch.optim, "AdamW", Poisoned)
    assert _train(tmp_path, "trainer.total_steps=6", "trainer.save_every=1") == 1
    err = capsys.readouterr().err
    assert "theta became non-finite" in err and "step_00000002" in err
    run = tmp_path / "default"
    assert _steps(run) == ["step_00000001", "step_00000002"]
    for step in _steps(run):
        tensors, _ = load_checkpoint(run / "checkpoints" / step)
        assert torch.isfinite(tensors["theta"]).all()


def test_export_refuses_a_non_finite_theta(tmp_path, capsys):
    from metakernels.checkpoint import save_checkpoint

    meta = {"config": {"model": {"path": None, "family": "llama"}},
            "slots": [["model.layers.0.self_attn.q_proj", 4, 3]], "rank": 2, "alpha": 4.0}
    theta = torch.randn(14)
    theta[3] = float("nan")
    save_checkpoint(tmp_path / "run", 1, {"theta": theta}, meta)
    assert export.main(["--checkpoint", str(tmp_path / "run"),
                        "--output", str(tmp_path / "peft")]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path, capsys):
    run = tmp_path / "default"
    assert _train(tmp_path, "trainer.total_steps=2", "trainer.save_every=1") == 0
    saved_config = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert _train(tmp_path, "trainer.total_steps=4", "trainer.resume=true",
                  "meta.meta_batch_size=1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trainer.resume=true") and "meta.meta_batch_size=1" in err
    assert _train(tmp_path, "trainer.total_steps=4", "trainer.resume=true",
                  "meta.inner_lr=0.05") == 2
    err = capsys.readouterr().err
    assert "meta.inner_lr=0.05" in err and "trainer.resume_changes=[meta.inner_lr]" in err
    assert (run / "config.yaml").read_text() == saved_config
    assert _steps(run) == ["step_00000001", "step_00000002"]
    # a longer run and a listed change are accepted
    assert _train(tmp_path, "trainer.total_steps=3", "trainer.resume=true",
                  "meta.inner_lr=0.05", "trainer.resume_changes=[meta.inner_lr]") == 0
    _, meta = load_checkpoint(latest_checkpoint(run))
    assert meta["step"] == 3 and meta["config"]["meta"]["inner_lr"] == 0.05


def test_resume_without_a_checkpoint_says_it_starts_from_step_0(tmp_path, capsys):
    assert _train(tmp_path, "trainer.total_steps=1", "trainer.resume=true") == 0
    err = capsys.readouterr().err
    assert f"trainer.resume=true: no checkpoint in {tmp_path / 'default'}; starting from " \
           f"step 0" in err


def test_a_collapsed_inner_loop_stops_the_run(tmp_path, capsys):
    with pytest.warns(UserWarning, match="the meta-gradient is exactly 0"):
        rc = _train(tmp_path, "meta.inner_lr=1e6", "trainer.total_steps=10",
                    "trainer.max_nonfinite_steps=1")
    assert rc == 1
    err = capsys.readouterr().err
    assert "the inner loop has collapsed" in err and "meta.inner_lr=1000000.0" in err
    rows = [json.loads(x) for x in (tmp_path / "default" / "metrics.jsonl").read_text()
            .splitlines()]
    assert len(rows) < 10 and rows[-1]["meta_grad_norm"] == 0.0
    assert math.isclose(rows[-1]["stage2/meta_loss"], math.log(100), rel_tol=1e-3)
