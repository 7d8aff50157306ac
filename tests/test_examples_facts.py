"""examples/facts: the natural-language suite's construction (what make_tasks.py promises) and
its knowledge filter, on a tiny random model saved as a Hugging Face directory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "facts"))
import facts  # noqa: E402
import make_tasks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts")
    make_tasks.build(out, seed=0, heldout_fraction=0.5, model=None, min_examples=1)
    return out


def test_every_row_of_the_tables_has_one_value_per_relation():
    for kind, table in facts.FACTS.items():
        assert len(table) >= 19, kind
        for entity, values in table.items():
            assert len(values) == len(facts.RELATIONS[kind]), (kind, entity)
            assert all(isinstance(v, str) and v for v in values), (kind, entity)
    assert set(facts.QUESTIONS) == {(k, r) for k, rels in facts.RELATIONS.items() for r in rels}
    assert {k for k, _ in facts.HELDOUT} == set(facts.RELATIONS)   # one per kind


def test_held_out_tasks_are_new_rules_on_inputs_no_training_task_shows(suite):
    train = {c["name"]: read_rows(suite / c["file"])
             for c in json.loads((suite / "train_tasks.json").read_text())}
    held = {c["name"]: read_rows(suite / c["file"])
            for c in json.loads((suite / "heldout_tasks.json").read_text())}
    assert set(held) == {f"{k}_{r}.{s}" for k, r in facts.HELDOUT for s in facts.HELDOUT_STYLES}
    assert set(train) == {f"{k}_{r}.{s}" for k, rels in facts.RELATIONS.items() for r in rels
                          if (k, r) not in facts.HELDOUT for s in facts.STYLES}
    train_rules = {n.split(".")[0] for n in train} | {n.split(".")[1] for n in train}
    held_rules = {n.split(".")[0] for n in held} | {n.split(".")[1] for n in held}
    assert not train_rules & held_rules       # neither a relation nor a style is shared
    train_prompts = {row["prompt"] for rows in train.values() for row in rows}
    for name, rows in held.items():
        assert rows, name
        assert not {row["prompt"] for row in rows} & train_prompts, name


def test_the_prompt_hides_the_rule(suite):
    """Within a kind, every training task asks the same prompts; the relations mostly answer
    them differently (a regular verb's past and participle coincide), and the styles always."""
    by_kind = {}
    for c in json.loads((suite / "train_tasks.json").read_text()):
        relation, style = c["name"].split(".")
        by_kind.setdefault(relation.split("_")[0], {})[(relation, style)] = {
            r["prompt"]: r["response"] for r in read_rows(suite / c["file"])}
    for kind, tasks in by_kind.items():
        prompts = next(iter(tasks.values())).keys()
        assert all(t.keys() == prompts for t in tasks.values()), kind
        plain = {rel: t for (rel, style), t in tasks.items() if style == "plain"}
        assert len(plain) >= 2, kind
        differ = sum(len({t[p] for t in plain.values()}) > 1 for p in prompts)
        assert differ >= 0.6 * len(prompts), kind
        for (rel, style), t in tasks.items():
            assert all(" " + facts.styled(style, plain[rel][p][1:]) == t[p] for p in prompts)
            if style != "plain":
                assert all(t[p] != plain[rel][p] for p in prompts), (rel, style)
    row = read_rows(suite / "train" / "country_capital.answer_is.jsonl")[0]
    assert row["prompt"].endswith(" ->") and row["response"].startswith(" The answer is ")


def test_styles_are_disjoint_and_keep_the_fact():
    assert not set(facts.STYLES) & set(facts.HELDOUT_STYLES)
    templates = list(facts.STYLES.values()) + list(facts.HELDOUT_STYLES.values())
    assert len(set(templates)) == len(templates)
    for style in list(facts.STYLES) + list(facts.HELDOUT_STYLES):
        out = facts.styled(style, "Paris")
        assert "Paris" in out or "PARIS" in out, style


def test_the_split_is_fixed_by_the_seed():
    assert make_tasks.split_entities(0, 0.5) == make_tasks.split_entities(0, 0.5)
    assert make_tasks.split_entities(0, 0.5) != make_tasks.split_entities(1, 0.5)


def test_the_filter_keeps_exactly_the_facts_the_model_answers_greedily(tmp_path):
    """known_facts (one teacher-forced pass) against the model's own greedy generations."""
    from transformers import AutoModelForCausalLM

    from metakernels.data import build_char_tokenizer
    from metakernels.models import build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    questions = ["The capital of France is", "hot ->", "The number seven", "ab"]
    items = []
    for q in questions:
        ids = tok(q, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        greedy = tok.decode(out[0, ids.shape[1]:])
        if greedy.startswith(" "):        # the filter asks for " " + answer
            items.append((q, greedy[1:], True))
        wrong = "~" if greedy[1:2] != "~" else "}"
        items.append((q, wrong + "x", False))
    flags = make_tasks.known_facts(str(tmp_path), [(q, a) for q, a, _ in items], batch_size=3)
    assert flags == [k for _, _, k in items]


def test_the_command_writes_configs_that_prepare_reads(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "facts" / "make_tasks.py"),
                        "--out", str(tmp_path / "raw")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "metakernels.prepare", "--task-config",
                        str(tmp_path / "raw" / "heldout_tasks.json"), "--output-dir",
                        str(tmp_path / "facts" / "heldout"), "--support-size", "8", "--verify"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "facts" / "heldout" / "manifest.json").read_text())
    assert len(manifest["tasks"]) == len(facts.HELDOUT) * len(facts.HELDOUT_STYLES)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "facts" / "make_tasks.py"),
                        "--out", str(tmp_path / "x"), "--model", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--model" in r.stderr and "config.json" in r.stderr


def test_no_entity_belongs_to_two_kinds():
    """Else one prompt could be a training input of one kind and a held-out input of another."""
    seen = {}
    for kind, table in facts.FACTS.items():
        for entity in table:
            assert entity not in seen, f"{entity!r} is a {seen[entity]} and a {kind}"
            seen[entity] = kind


def test_adapt_with_peft_fits_the_shots_and_answers_the_rest(tmp_path):
    """The walkthrough's last step: an adapter directory, adapted on 5 rows with plain PEFT."""
    import re

    from peft import LoraConfig, get_peft_model

    from metakernels.data import build_char_tokenizer
    from metakernels.models import build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    rows = [{"prompt": f"{w} ->", "response": f" ({w.upper()})"}
            for w in ("cat", "dog", "owl", "cow", "pig", "elk", "yak")]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "facts" / "adapt_with_peft.py"),
                        "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                        "--task", str(tmp_path / "task.jsonl"), "--steps", "4",
                        "--max-new-tokens", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    losses = [float(x) for x in re.findall(r"support loss ([0-9.]+)", r.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], r.stdout
    assert re.search(r"^exact match [0-2]/2$", r.stdout, flags=re.M), r.stdout
    answered = [line for line in r.stdout.splitlines() if line.startswith("'")]
    assert len(answered) == 2 and all(" ok" in a or "expected" in a for a in answered), r.stdout


def test_the_example_config_trains_on_the_prepared_suite(tmp_path):
    """examples/facts/smollm2.yaml stays a valid config over the suite as docs/usage.md prepares
    it (the tiny model standing in for SmolLM2: CI has no weights)."""
    make_tasks.build(tmp_path / "raw", seed=0, heldout_fraction=0.5, model=None, min_examples=10)
    for part, split in (("train", ["--support-ratio", "0.5"]), ("heldout", ["--support-size", "8"])):
        out = tmp_path / "facts" / ("heldout" if part == "heldout" else "")
        r = subprocess.run([sys.executable, "-m", "metakernels.prepare", "--task-config",
                            str(tmp_path / "raw" / f"{part}_tasks.json"), "--output-dir",
                            str(out), *split], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "metakernels.train", "--config",
                        str(ROOT / "examples" / "facts" / "smollm2.yaml"), "model.path=null",
                        "model.dtype=float32", "model.hidden_size=32", "model.num_layers=1",
                        "model.intermediate_size=64", "data.max_length=64",  # characters
                        f"data.tasks={tmp_path / 'facts'}",
                        f"trainer.output_dir={tmp_path / 'runs'}", "trainer.total_steps=2",
                        "trainer.progress_bar=false"],
                       capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = [json.loads(line) for line in
               (tmp_path / "runs" / "facts-meta" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in m for m in metrics)   # the held-out tasks were found and run
    assert sum("stage2/meta_loss" in m for m in metrics) == 2
