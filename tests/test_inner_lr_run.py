"""Learned inner rates through the commands: training (outer optimizer, metrics), checkpoints
and an exact resume, the export's side file, and the evaluator using them for the meta
contender only."""
import json

import pytest
import torch
from safetensors import safe_open

from metakernels import evaluate as ev
from metakernels import train
from metakernels.checkpoint import latest_checkpoint, load_checkpoint
from metakernels.export import export_checkpoint

from conftest import resumed_and_unbroken, train_run

SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
         "model.num_kv_heads=1", "model.intermediate_size=64", "model.lora_rank=4",
         "model.lora_alpha=8", "meta.meta_batch_size=2", "data.support_size=2",
         "data.query_size=2", "meta.num_inner_steps=2", "trainer.log_every=1",
         "trainer.progress_bar=false", "trainer.loggers=[jsonl]", "trainer.eval_every=0",
         "meta.inner_lr_mode=per_layer_step", "meta.multi_step_loss=true",
         "meta.multi_step_loss_steps=4"]


def _run(tmp_path, *overrides, name="run"):
    return train_run(tmp_path, SMALL, *overrides, name=name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("innerlr"), "trainer.total_steps=3")


def test_rates_are_trained_logged_and_checkpointed(run_dir):
    tensors, meta = load_checkpoint(latest_checkpoint(run_dir))
    rates = tensors["inner_lr"]
    assert meta["inner_lr_mode"] == "per_layer_step" and rates.shape == (2, len(meta["slots"]))
    assert not torch.allclose(rates, torch.full_like(rates, 0.1)), "the rates did not move"
    assert "outer_inner_lr/exp_avg_sq" in tensors
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "stage2/meta_loss" in r][-1]
    name = meta["slots"][0][0]
    assert last[f"inner_lr/{name}/min"] <= last[f"inner_lr/{name}/mean"] <= \
        last[f"inner_lr/{name}/max"]
    assert last["inner_lr/min"] == pytest.approx(float(rates.min()))


def test_resume_matches_an_unbroken_run(tmp_path, monkeypatch, capsys):
    common = ["trainer.total_steps=4", "trainer.save_every=2"]
    a, b, _ = resumed_and_unbroken(tmp_path, monkeypatch, SMALL + common, 2)
    for key in ("theta", "inner_lr", "outer_inner_lr/exp_avg_sq", "outer/exp_avg"):
        assert torch.equal(a[key], b[key]), key
    capsys.readouterr()
    args = SMALL + [f"trainer.output_dir={tmp_path}", "trainer.experiment_name=broken", *common,
                    "trainer.resume=true", "trainer.total_steps=5",
                    "meta.inner_lr_mode=per_parameter"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: trainer.resume=true")
    assert "meta.inner_lr_mode" in err[0] and "'per_layer_step'" in err[0]
    # changed knowingly, the rates' layout still has to match the checkpoint's
    assert train.main(args + ["trainer.resume_changes=[meta.inner_lr_mode]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta.inner_lr_mode=per_layer_step" in err[0]


def test_export_writes_the_rates_beside_the_peft_adapter(run_dir, tmp_path):
    out, ckpt, _ = export_checkpoint(run_dir, tmp_path / "adapter")
    tensors, meta = load_checkpoint(ckpt)
    with safe_open(str(out / "inner_lr.safetensors"), framework="pt") as f:
        md = f.metadata()
        assert torch.equal(f.get_tensor("inner_lr"), tensors["inner_lr"])
    assert md["inner_lr_mode"] == "per_layer_step"
    assert json.loads(md["modules"]) == [s[0] for s in meta["slots"]]
    assert (out / "adapter_model.safetensors").is_file()


def test_evaluate_adapts_the_meta_contender_only_at_its_rates(run_dir, tmp_path, monkeypatch,
                                                              capsys):
    from metakernels import few_shot

    seen = []
    real = few_shot.adapt_rows

    def spy(*args, **kw):
        rates = args[6] if len(args) > 6 else kw.get("rates")
        seen.append(None if rates is None else rates.values.detach().clone())
        return real(*args, **kw)

    monkeypatch.setattr(few_shot, "adapt_rows", spy)
    rc = ev.main(["--checkpoint", str(run_dir), "--tasks", "suffix_u", "--n-shots", "2",
                  "--seeds", "1", "--n-query", "2", "--output-dir", str(tmp_path / "eval"),
                  "--quiet"])
    assert rc == 0
    want = load_checkpoint(latest_checkpoint(run_dir))[0]["inner_lr"]
    assert len(seen) == 2  # meta, then lora-init
    assert torch.equal(seen[0], want) and seen[1] is None
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["settings"]["inner"]["meta_inner_lr_mode"] == "per_layer_step"
    capsys.readouterr()
    assert ev.main(["--checkpoint", str(run_dir), "--tasks", "suffix_u", "--n-shots", "2",
                    "--inner-steps", "3", "--output-dir", str(tmp_path / "eval3"),
                    "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --inner-steps 3: the checkpoint learned")
