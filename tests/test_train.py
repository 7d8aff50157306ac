"""The trainer end to end: config checks, a short default run, export to PEFT, exact resume."""
import json
import os

import pytest
import torch

from metakernels import build, train
from metakernels import trainer as trainer_module
from metakernels.checkpoint import latest_checkpoint, load_checkpoint
from metakernels.config import ConfigError, load_config
from metakernels.export import export_checkpoint

from conftest import MODEL_TOL, resumed_and_unbroken, train_run

SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
         "meta.meta_batch_size=3", "data.support_size=2", "data.query_size=2",
         "meta.num_inner_steps=2", "trainer.log_every=1", "trainer.progress_bar=false"]


def _run(tmp_path, *overrides, name="run"):
    return train_run(tmp_path, SMALL, *overrides, name=name)


@pytest.mark.parametrize("bad,match", [
    ("meta.inner_lrr=0.1", "meta.inner_lrr: unknown key"),
    ("model.lora_rank=0", "model.lora_rank: must be > 0"),
    ("meta.inner_lr=-1", "meta.inner_lr: must be > 0"),
    ("meta.inner_lr=fast", "meta.inner_lr: expected a number"),
    ("data.support_size=0", "data.support_size: must be > 0"),
    ("trainer.resume=maybe", "trainer.resume: expected true or false"),
    ("meta.algorithm=maml2", "meta.algorithm: 'maml2' is not one of"),
    ("trainer.gemm=mkl", "trainer.gemm: 'mkl' is not one of"),
    ("nosection.x=1", "unknown section"),
])
def test_bad_config_is_rejected_with_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [bad])


def test_kernel_choices_are_set_for_the_process(monkeypatch):
    from metakernels import backend, gemm
    for var in (gemm.ENV_VAR, backend.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    build.set_kernel_choices(load_config(None, ["trainer.gemm=blas", "trainer.backend=torch"]))
    assert gemm.gemm_library() == "blas" and backend.forced() == "torch"
    assert gemm.ENV_VAR not in os.environ and backend.ENV_VAR not in os.environ
    build.set_kernel_choices(load_config(None, []))   # auto: the automatic choices again
    assert backend.forced() is None and backend.choice("gemm") is None


def test_config_file_and_aliases(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("meta:\n  meta_lr: 1e-4\n  inner_lr: 0.05\nmodel:\n  target_modules: all-linear\n")
    cfg = load_config(p, ["meta.num_inner_steps=7"])
    assert cfg.meta.outer_lr == 1e-4 and cfg.meta.inner_lr == 0.05
    assert cfg.meta.num_inner_steps == 7 and cfg.model.target_modules == "all-linear"
    p.write_text("meta:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: meta.bogus: unknown key"):
        load_config(p)


def test_too_many_tasks_per_meta_batch_is_rejected_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "build_model", lambda *a: pytest.fail("model was loaded"))
    with pytest.raises(ConfigError, match="meta_batch_size=500 but only"):
        train.Trainer(load_config(None, SMALL + ["meta.meta_batch_size=500",
                                                 f"trainer.output_dir={tmp_path}"]))


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile", "maml", "multitask", "naive_fomaml"])
def test_every_algorithm_runs_and_writes_outputs(tmp_path, algorithm):
    run = _run(tmp_path, f"meta.algorithm={algorithm}", "trainer.total_steps=3",
               "trainer.save_every=2")
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    # three meta-steps, then the held-out validation of the final theta
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "val/loss" in rows[0] and "val/loss" in rows[3] and "val/loss" not in rows[1]
    val, rows = rows[3], rows[:3]
    assert set(val) == {"step", "val/loss", "val/token_accuracy", "val/loss_before",
                        "val/diverged"}
    assert val["val/loss"] == val["val/loss"] and val["val/diverged"] == 0
    for r in rows:
        for key in ("stage2/meta_loss", "adaptation_gap", "time_per_step", "tokens_per_s",
                    "peak_memory_mb"):
            assert key in r
        assert any(k.startswith("stage1/") and k.endswith("/loss") for k in r)
        assert r["stage2/meta_loss"] == r["stage2/meta_loss"]  # not NaN
    assert (run / "loss_curve.png").stat().st_size > 0
    tensors, meta = load_checkpoint(latest_checkpoint(run))
    assert meta["step"] == 3 and tensors["theta"].dtype == torch.float32


def test_export_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel

    run = _run(tmp_path, "trainer.total_steps=2", "model.target_modules=all-linear")
    out, _, _ = export_checkpoint(run, tmp_path / "adapter")
    cfg = load_config(run / "config.yaml", ["trainer.resume=true"])
    tok = build.build_tokenizer(cfg)
    peft_model = PeftModel.from_pretrained(build.build_model(cfg, len(tok)), str(out))
    t = train.Trainer(cfg)
    assert t.resume()
    ids = torch.randint(0, len(tok), (2, 9))
    from metakernels import TaskLayout
    with torch.no_grad():
        with t.bank.activate(t.bank.theta[None], TaskLayout((0, ids.numel()))):
            ours = t.model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
        bare = t.model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, **MODEL_TOL)
    assert not torch.allclose(bare, theirs, atol=1e-4)  # the adapter is really non-trivial


def test_resume_matches_an_unbroken_run(tmp_path, monkeypatch):
    common = ["trainer.total_steps=6", "trainer.save_every=3", "meta.inner_optimizer=adam",
              "model.lora_dropout=0.1", "meta.task_sampling=loss"]
    # the run interrupted after its step-3 checkpoint, then resumed
    a, b, broken = resumed_and_unbroken(tmp_path, monkeypatch, SMALL + common, 3)
    assert torch.equal(a["theta"], b["theta"])
    assert torch.equal(a["outer/exp_avg_sq"], b["outer/exp_avg_sq"])
    rows = [json.loads(ln) for ln in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "stage2/meta_loss" in r] == list(range(6))
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 6]


def test_validation_is_the_evaluators_adapted_query_loss_and_leaves_training_alone(tmp_path):
    from metakernels import adapt, few_shot as ev

    args = SMALL + [f"trainer.output_dir={tmp_path}", "trainer.total_steps=2",
                    "trainer.eval_shots=3", "trainer.eval_seeds=2", "trainer.eval_query_size=5"]
    t = train.Trainer(load_config(None, args + ["trainer.eval_every=1"]))
    t.train_step()
    theta = t.bank.theta.detach().clone()
    val = t.validate()
    assert torch.equal(t.bank.theta.detach(), theta) and t.validate() == val  # fixed draws
    # the same numbers from the evaluator: the held-out tasks, 3 shots, 2 seeds, 5 queries
    setup = ev.Setup(t.cfg, t.tokenizer, t.model, t.bank, theta)
    settings = ev.EvalSettings([3], 2, t.inner, max_new_tokens=6)
    r = ev.evaluate_contender(setup, ev.Contender("meta", theta, ""), t.val_tasks, 3, settings,
                              adapt.stop_token_ids(t.tokenizer))
    assert val["val/loss"] == pytest.approx(float(r["values"]["loss"].mean()),
                                            rel=MODEL_TOL["rtol"])
    assert val["val/token_accuracy"] == pytest.approx(
        float(r["values"]["token_accuracy"].mean()), rel=MODEL_TOL["rtol"])
    assert [x.name for x in t.val_tasks] == [x.name for x in build.build_tasks(
        t.cfg, t.tokenizer, "heldout")]
    # validating every step changes nothing in what training computes
    t.train_step()
    quiet = train.Trainer(load_config(None, args + ["trainer.eval_every=0"]))
    assert quiet.val_tasks is None
    quiet.train_step()
    quiet.train_step()
    assert torch.equal(quiet.bank.theta.detach(), t.bank.theta.detach())


def test_builtin_suite_is_chosen_by_name():
    cfg = load_config(None, ["data.tasks=builtin:order_suffix"])
    tok = build.build_tokenizer(cfg)
    assert len(build.build_tasks(cfg, tok)) == 40
    assert len(build.build_tasks(cfg, tok, "heldout")) == 12
    with pytest.raises(ConfigError, match="data.tasks: unknown built-in suite 'builtin:nope'"):
        load_config(None, ["data.tasks=builtin:nope"])


def test_validation_is_skipped_with_a_warning_when_held_out_pools_are_too_small(tmp_path):
    from metakernels.data import write_task_file

    rows = lambda n: [{"prompt": f"{i}>", "response": str(i % 7)} for i in range(n)]
    # the training tasks in tasks/, the held-out ones beside them in tasks_heldout/
    for root, n_support in (("tasks", 8), ("tasks_heldout", 2)):
        for t in range(3):
            d = tmp_path / root / f"t{t}"
            d.mkdir(parents=True)
            write_task_file(d / "support.jsonl", rows(n_support))
            write_task_file(d / "query.jsonl", rows(8))
    cfg = load_config(None, SMALL + [f"data.tasks={tmp_path / 'tasks'}",
                                     f"trainer.output_dir={tmp_path}"])
    with pytest.warns(UserWarning, match="held-out validation is off: .*2 support examples, "
                                         "fewer than the 5 shots of trainer.eval_shots"):
        t = train.Trainer(cfg)
    assert t.val_tasks is None
    # query sets smaller than trainer.eval_query_size: all are used, and the warning names it
    cfg = load_config(None, SMALL + [f"data.tasks={tmp_path / 'tasks'}", "trainer.eval_shots=2",
                                     f"trainer.output_dir={tmp_path}"])
    with pytest.warns(UserWarning, match="8 query examples, fewer than trainer.eval_query_size=16"):
        t = train.Trainer(cfg)
    assert t.val_tasks is not None


def test_a_leading_tilde_in_a_path_setting_is_the_home_directory(monkeypatch, tmp_path):
    """Shared configs (examples/facts/smollm2.yaml) name ~/.cache/...; no shell expands them."""
    from metakernels.config import PATH_KEYS, Config, setting_names

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tasks").mkdir()
    cfg = load_config(None, ["data.tasks=~/tasks", "trainer.output_dir=~/runs"])
    assert cfg.data.tasks == str(tmp_path / "tasks")
    assert cfg.trainer.output_dir == str(tmp_path / "runs")
    assert PATH_KEYS <= set(setting_names(Config()))
