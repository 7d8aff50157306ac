"""Few-shot evaluation: the CLI on a tiny trained run, batched vs per-task adaptation, greedy
generation against ``model.generate``, exact match on decoded text."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from metakernels import adapt, evaluate as ev, few_shot
from metakernels.batch import pack_tasks
from metakernels.export import export_checkpoint
from metakernels.lora import MultiLoraLinear
from metakernels.meta.common import InnerConfig

from conftest import MODEL_TOL

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=1", "model.intermediate_size=64", "model.lora_rank=4",
        "model.lora_alpha=8", "meta.meta_batch_size=2", "data.support_size=2",
        "data.query_size=2", "trainer.save_every=3", "trainer.log_every=1",
        "trainer.progress_bar=false", "trainer.loggers=[jsonl]", "data.tasks=builtin:families"]
TASKS = ["caesar_5", "base_7_to_10"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from metakernels.train import main as train_main

    out = tmp_path_factory.mktemp("evalrun")
    assert train_main(["trainer.total_steps=3", f"trainer.output_dir={out}", *TINY]) == 0
    return out / "default"


@pytest.fixture(scope="module")
def setup(run_dir):
    return few_shot.load_setup(run_dir)


@pytest.fixture(scope="module")
def eval_tasks(setup):
    raw = few_shot.load_eval_tasks("builtin-heldout", setup.cfg, setup.tokenizer, TASKS)
    return adapt.build_eval_tasks(raw, setup.tokenizer, setup.cfg, n_query=4, max_shots=3, seeds=2,
                               data_seed=0)


def test_cli_outputs_well_formed(run_dir, tmp_path):
    peft_dir, _, _ = export_checkpoint(run_dir, tmp_path / "peft")
    out = tmp_path / "eval"
    rc = ev.main(["--checkpoint", str(run_dir), "--tasks", *TASKS, "--n-shots", "0", "2",
                  "--seeds", "2", "--n-query", "4", "--output-dir", str(out),
                  "--baseline", f"exported={peft_dir}", "--quiet"])
    assert rc == 0
    assert (out / "few_shot.png").stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == TASKS
    assert set(res["contenders"]) == {"meta", "lora-init", "exported", "base"}
    assert set(res["contenders"]["base"]["n_shots"]) == {"0"}
    for name in ("meta", "lora-init", "exported"):
        assert set(res["contenders"][name]["n_shots"]) == {"0", "2"}
    for name, c in res["contenders"].items():
        for n, entry in c["n_shots"].items():
            assert entry["diverged_rows"] == 0
            for m in few_shot.METRICS:
                s = entry["summary"][m]
                for part in ("mean_over_tasks", "worst_task"):
                    assert math.isfinite(s[part]["mean"]) and math.isfinite(s[part]["std"])
                    assert len(s[part]["per_seed"]) == 2
                assert s["worst_task"]["task"] in TASKS
                vals = np.array([entry["per_task"][t][m] for t in TASKS])
                assert vals.shape == (2, 2) and np.isfinite(vals).all()
                if m != "loss":
                    assert ((vals >= 0) & (vals <= 1)).all()
            if n == "0":  # nothing depends on the seed without adaptation
                assert entry["summary"]["loss"]["mean_over_tasks"]["std"] == 0
    # lora-init has B = 0: at n = 0 it is the base model
    for m in few_shot.METRICS:
        a = res["contenders"]["lora-init"]["n_shots"]["0"]["per_task"]
        b = res["contenders"]["base"]["n_shots"]["0"]["per_task"]
        for t in TASKS:
            np.testing.assert_allclose(a[t][m], b[t][m], **MODEL_TOL)
    # the checkpoint exported to PEFT and read back is the same contender
    for n in ("0", "2"):
        for t in TASKS:
            for m in few_shot.METRICS:
                np.testing.assert_allclose(
                    res["contenders"]["exported"]["n_shots"][n]["per_task"][t][m],
                    res["contenders"]["meta"]["n_shots"][n]["per_task"][t][m], **MODEL_TOL)
    assert set(res["comparisons"]) == {"meta vs lora-init", "exported vs lora-init",
                                       "meta vs exported"}
    comp = res["comparisons"]["meta vs lora-init"]
    assert set(comp) == {"0", "2"} and set(comp["2"]) == set(few_shot.METRICS)
    # meta and exported are the same adapter: no difference, on any task
    same = res["comparisons"]["meta vs exported"]["2"]["loss"]
    assert abs(same["diff_mean"]) < 1e-5 and same["tasks_better"] == 0
    assert (out / "table.txt").read_text().count("meta") >= 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batched_adaptation_equals_per_task(setup, eval_tasks, optimizer):
    lr = setup.cfg.meta.inner_lr if optimizer == "sgd" else 1e-2
    inner = InnerConfig(lr=lr, num_steps=3, optimizer=optimizer)
    pad = setup.tokenizer.pad_token_id
    theta = setup.theta
    n = 2
    rows = [(i, s) for i in range(len(eval_tasks)) for s in range(2)]
    supports = [eval_tasks[i].support[s][:n] for i, s in rows]
    fast, alive = adapt.adapt_rows(setup.model, setup.bank, theta, supports, inner, pad)
    assert fast.shape == (len(rows), setup.bank.num_params) and alive.all()
    assert not torch.allclose(fast[0], theta)  # it did adapt
    query = pack_tasks([eval_tasks[i].query for i, _ in rows], pad)
    losses, accs = adapt.query_metrics(setup.model, setup.bank, fast, query)
    for r, (i, s) in enumerate(rows):
        one, _ = adapt.adapt_rows(setup.model, setup.bank, theta, [supports[r]], inner, pad)
        torch.testing.assert_close(fast[r:r + 1], one, **MODEL_TOL)
        l1, a1 = adapt.query_metrics(setup.model, setup.bank, one,
                                     pack_tasks([eval_tasks[i].query], pad))
        torch.testing.assert_close(losses[r:r + 1], l1, **MODEL_TOL)
        torch.testing.assert_close(accs[r:r + 1], a1)
    # the loss and accuracy against the plain logits of the model
    q0 = query.select(0, 1)
    with torch.no_grad(), setup.bank.activate(fast[:1], q0.token_layout):
        logits = setup.model(input_ids=q0.input_ids, attention_mask=q0.attention_mask).logits
    lab = q0.labels.reshape(-1)
    keep = lab != -100
    flat = logits.reshape(-1, logits.shape[-1])
    ref_loss = torch.nn.functional.cross_entropy(flat[keep], lab[keep])
    ref_acc = (flat[keep].argmax(-1) == lab[keep]).float().mean()
    torch.testing.assert_close(losses[0], ref_loss, **MODEL_TOL)
    torch.testing.assert_close(accs[0], ref_acc)


def test_exact_match_on_decoded_text(setup):
    tok = setup.tokenizer
    stop = adapt.stop_token_ids(tok, setup.model)
    eos = tok.eos_token_id

    def ids(text):
        return tok.encode(text, add_special_tokens=False)

    # different token sequences, same text up to surrounding whitespace; tokens after EOS ignored
    assert ids(" abc\n") != ids("abc")
    assert adapt.exact_match(tok, ids(" abc\n") + [eos] + ids("zz"), "abc", stop)
    assert adapt.exact_match(tok, ids("abc") + [eos], " abc ", stop)
    assert adapt.exact_match(tok, [tok.bos_token_id] + ids("abc"), "abc", stop)  # special: no text
    assert adapt.exact_match(tok, ids("abc"), "abc", stop)  # no EOS produced: all tokens count
    assert not adapt.exact_match(tok, ids("abd") + [eos], "abc", stop)
    assert not adapt.exact_match(tok, ids("ab c") + [eos], "abc", stop)  # inner whitespace counts
    assert not adapt.exact_match(tok, ids("abcd"), "abc", stop)
    assert not adapt.exact_match(tok, [eos] + ids("abc"), "abc", stop)


def test_references_are_the_responses(setup, eval_tasks):
    from metakernels.data.tasks import get_task

    for t in eval_tasks:
        task = get_task(t.name)
        for prompt_ids, ref in zip(t.prompts, t.references):
            prompt = setup.tokenizer.decode(prompt_ids, skip_special_tokens=True)
            assert ref == task.rule(prompt[:-1])  # the prompt ends with the separator


def _hf_greedy(model, prompt, max_new, tok):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_model_generate(setup, eval_tasks):
    tok, model, bank = setup.tokenizer, setup.model, setup.bank
    stop = {tok.eos_token_id}
    prompts = [p for t in eval_tasks for p in t.prompts]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    max_new = 12
    # the bare base against transformers' own greedy decoding
    ours = adapt.greedy_generate(model, bank, None, prompts, [len(prompts)], max_new, stop,
                              tok.pad_token_id)
    for p, g in zip(prompts, ours):
        assert g == _hf_greedy(model, p, max_new, tok)
    # adapter rows: each row alone gives what the batch gives, and equals model.generate on
    # a copy of the base with that row's LoRA merged into the weights
    inner = InnerConfig(lr=setup.cfg.meta.inner_lr, num_steps=3)
    fast, _ = adapt.adapt_rows(model, bank, setup.theta, [t.support[0][:3] for t in eval_tasks],
                            inner, tok.pad_token_id)
    sizes = [len(t.prompts) for t in eval_tasks]
    batched = adapt.greedy_generate(model, bank, fast, prompts, sizes, max_new, stop,
                                 tok.pad_token_id)
    k = 0
    for r, t in enumerate(eval_tasks):
        alone = adapt.greedy_generate(model, bank, fast[r:r + 1], t.prompts, [len(t.prompts)],
                                   max_new, stop, tok.pad_token_id)
        assert alone == batched[k:k + len(t.prompts)]
        merged = copy.deepcopy(model)
        with torch.no_grad():
            for mod in merged.modules():
                if isinstance(mod, MultiLoraLinear):
                    A, B = bank.views(fast[r:r + 1], mod.slot)
                    mod.base.weight += bank.scale * (A[0] @ B[0]).T
        for p, g in zip(t.prompts, alone):
            assert g == _hf_greedy(merged, p, max_new, tok)
        k += len(t.prompts)


def test_single_task_fit_probe_lowers_the_query_loss(run_dir, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fit_single_task.py"
    spec = importlib.util.spec_from_file_location("fit_single_task", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    losses = []
    for steps in (1, 40):
        probe.main(["--run", str(run_dir), "--task", TASKS[0], "--steps", str(steps),
                    "--lr", "1e-2", "--batch", "8", "--n-query", "4"])
        line = [l for l in capsys.readouterr().out.splitlines() if "query loss" in l][-1]
        losses.append(float(line.split("query loss")[1].split()[0]))
        assert "exact match" in line
    assert losses[1] < losses[0]


def test_eval_tasks_follow_the_checkpoints_suite(setup):
    names = lambda spec, cfg=setup.cfg: [t.name for t in few_shot.load_eval_tasks(
        spec, cfg, setup.tokenizer)]
    assert "caesar_5" in names("builtin-heldout")          # the run trained on builtin:families
    assert len(names("builtin-train")) == 37
    other = copy.deepcopy(setup.cfg)
    other.data.tasks = "builtin"                           # the default suite
    assert names("builtin-heldout", other) == [f"suffix_{c}" for c in "uvwxyz"]
    assert len(names("builtin:order_suffix-heldout")) == 12
    with pytest.raises(ValueError, match="unknown built-in suite 'nope'"):
        names("builtin:nope-heldout")


def test_baseline_trained_on_other_data_or_steps_is_flagged(run_dir, setup, tmp_path, recwarn):
    from metakernels.train import main as train_main

    few_shot.load_baseline("same", run_dir, setup)
    assert not [w for w in recwarn if "same data" in str(w.message)]
    assert train_main(["trainer.total_steps=2", f"trainer.output_dir={tmp_path}", *TINY]) == 0
    with pytest.warns(UserWarning, match=r"not trained on the same data for the same steps: "
                                         r"trainer.total_steps=2 \(the checkpoint: 3\)"):
        few_shot.load_baseline("short", tmp_path / "default", setup)
