"""Data layer: tokenizer, procedural tasks, task files, loss masks, truncation, sampler."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metakernels.batch import IGNORE_INDEX, pack_tasks
from metakernels.data import (DataError, TaskData, TaskSampler, build_char_tokenizer,
                              builtin_tasks, get_task, load_examples, load_task_dir,
                              load_task_file, load_tasks, load_tokenizer, make_task_data,
                              tokenize_example, write_task_file)
from metakernels.data.tasks import hidden_task, is_train_input
from metakernels.data.tokenizer import CHARS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# --- tokenizer ---------------------------------------------------------------------------------

def test_char_tokenizer_fixed_ids_and_roundtrip(tok, tmp_path):
    assert len(tok) == len(SPECIAL_TOKENS) + len(CHARS) == 100
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert ids(tok, "\n A~") == [4, 5, 5 + ord("A") - 32, 99]
    assert ids(tok, "é中") == [tok.unk_token_id] * 2
    assert tok("ab").input_ids == [tok.bos_token_id] + ids(tok, "ab")
    text = "Hello, world!\n{x: [1, 2]}"
    assert tok.decode(ids(tok, text)) == text

    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.pad_token_id == tok.pad_token_id
    assert load_tokenizer(None).get_vocab() == tok.get_vocab()


# --- procedural tasks --------------------------------------------------------------------------

@pytest.mark.parametrize("suite,sizes", [("suffix", (20, 6)), ("order_suffix", (40, 12)),
                                         ("families", (37, 11))])
def test_builtin_splits_disjoint_and_sized(suite, sizes):
    train, heldout = builtin_tasks("train", suite), builtin_tasks("heldout", suite)
    train_names = {t.name for t in train}
    heldout_names = {t.name for t in heldout}
    assert (len(train_names), len(heldout_names)) == (len(train), len(heldout)) == sizes
    assert not train_names & heldout_names
    # held-out rules are new members of families seen in training
    assert {t.family for t in heldout} <= {t.family for t in train}
    with pytest.raises(ValueError, match="split"):
        builtin_tasks("test", suite)
    with pytest.raises(ValueError, match="unknown built-in suite 'nope'"):
        builtin_tasks("train", "nope")


@pytest.mark.parametrize("suite", ["suffix", "order_suffix"])
def test_hidden_rule_suites_hide_the_rule_and_hold_out_inputs(suite):
    train, heldout = builtin_tasks("train", suite), builtin_tasks("heldout", suite)
    # the same prompt gets a different answer from every task: only examples tell them apart
    assert len({t.rule("123") for t in train}) == len(train)
    letters = lambda tasks: {t.rule("000")[-1] for t in tasks}
    assert not letters(train) & letters(heldout)  # held-out suffixes never trained on
    for tasks, train_half in ((train, True), (heldout, False)):
        for t in tasks:
            for p, r in t.sample_distinct(random.Random(1), 40):
                x = p[:-1]
                assert len(x) == 3 and x.isdigit() and is_train_input(x) == train_half
                assert r[:3] in (x, x[::-1]) and len(r) == 4 and r[3].isalpha()


def test_hidden_task_rule():
    fwd, rev = hidden_task("q"), hidden_task("q", reverse=True)
    assert (fwd.name, rev.name) == ("suffix_q", "rev_suffix_q")
    assert (fwd.rule("381"), rev.rule("381")) == ("381q", "183q")
    with pytest.raises(ValueError, match="one lowercase letter"):
        hidden_task("Q")


@pytest.mark.parametrize("task", builtin_tasks("train", "families")
                         + builtin_tasks("heldout", "families"), ids=lambda t: t.name)
def test_builtin_task_deterministic_and_fits(task, tok):
    def draw(seed):
        rng = random.Random(seed)
        return [task.sample(rng) for _ in range(200)]

    draws = draw(7)
    assert draw(7) == draws and draw(8) != draws
    assert len({p for p, _ in draws}) > 20  # inputs do vary
    for prompt, response in draws:
        assert 3 <= len(prompt) - 1 <= 8 and response
        ex = tokenize_example(tok, prompt, response, max_length=64)
        assert len(ex.input_ids) <= 32
        assert tok.unk_token_id not in ex.input_ids


def test_task_rules():
    assert get_task("caesar_3").rule("xyz") == "abc"
    assert get_task("base_10_to_7").rule("100") == "202"
    assert get_task("base_16_to_2").rule("a0f") == "101000001111"
    assert get_task("rotate_2").rule("abcde") == "cdeab"
    assert get_task("repeat_3").rule("ab") == "aaabbb"
    assert get_task("every_2").rule("abcde") == "ace"
    assert get_task("swapcase").rule("aBc") == "AbC"
    assert get_task("sort").rule("cab") == "abc"
    assert get_task("mirror").rule("ab") == "abba"
    assert get_task("subst_5").rule("abc") == get_task("subst_5").rule("abc") != "abc"
    for bad in ("caesar_0", "base_10_to_10", "rotate_99", "nope"):
        with pytest.raises(ValueError, match=bad):
            get_task(bad)


def test_sample_distinct_reports_small_input_space():
    task = get_task("base_2_to_10")  # 252 distinct inputs of 3 to 8 bits
    pairs = task.sample_distinct(random.Random(0), 100)
    assert len({p for p, _ in pairs}) == 100
    with pytest.raises(ValueError, match="base_2_to_10.*distinct inputs"):
        task.sample_distinct(random.Random(0), 300)


# --- tokenisation: loss mask and truncation ----------------------------------------------------

def test_loss_mask_response_and_eos_only(tok):
    ex = tokenize_example(tok, "ab>", "xyz", max_length=64)
    assert list(ex.input_ids) == [tok.bos_token_id] + ids(tok, "ab>xyz") + [tok.eos_token_id]
    assert list(ex.loss_mask) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ex.num_targets == 4
    batch = pack_tasks([[ex]], pad_id=tok.pad_token_id)
    targets = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert targets == ids(tok, "xyz") + [tok.eos_token_id]


def test_chat_template_mask(tok):
    ex = tokenize_example(tok, "ab", "xyz", max_length=64, apply_chat_template=True)
    assert tok.decode(ex.input_ids) == "<bos>Q:ab\nA:xyz<eos>"
    n_prompt = len(ids(tok, "<bos>Q:ab\nA:"))
    assert list(ex.loss_mask) == [0] * n_prompt + [1] * 4


def test_truncation_modes(tok):
    prompt, response = "abcdef>", "uvwxyz"  # 1 + 7 prompt tokens, 6 + 1 response tokens
    full = tokenize_example(tok, prompt, response, max_length=64)
    assert len(full.input_ids) == 15
    with pytest.raises(DataError, match="15 tokens.*max_length=10"):
        tokenize_example(tok, prompt, response, max_length=10)
    left = tokenize_example(tok, prompt, response, max_length=10, truncation="left")
    assert left.input_ids == full.input_ids[-10:] and left.loss_mask == full.loss_mask[-10:]
    right = tokenize_example(tok, prompt, response, max_length=10, truncation="right")
    assert right.input_ids == full.input_ids[:10] and right.loss_mask == full.loss_mask[:10]
    assert right.input_ids[-1] != tok.eos_token_id and sum(right.loss_mask) == 2
    with pytest.raises(ValueError, match="truncation"):
        tokenize_example(tok, prompt, response, max_length=10, truncation="middle")


def test_no_response_left_after_truncation(tok, tmp_path):
    with pytest.raises(DataError, match="no response token left"):
        tokenize_example(tok, "a" * 20, "xyz", max_length=10, truncation="right")
    # the prompt ends exactly at max_length: the first response token would be position 10
    with pytest.raises(DataError, match="no response token left"):
        tokenize_example(tok, "a" * 9, "xyz", max_length=10, truncation="right")
    # left truncation always keeps the EOS target
    assert tokenize_example(tok, "a" * 20, "xyz", max_length=2, truncation="left").num_targets == 1

    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "ab>", "response": "cd"},
        {"prompt": "a" * 20, "response": "xyz"},
        {"prompt": "ef>", "response": "gh"},
        {"prompt": "ij>", "response": ""},
    ])
    with pytest.raises(DataError, match=r"t\.jsonl row 2: no response token left"):
        load_examples(path, tok, max_length=10, truncation="right")
    examples, skipped = load_examples(path, tok, max_length=10, truncation="right",
                                      skip_bad=True)
    assert skipped == 2 and len(examples) == 2
    with pytest.raises(DataError, match="every row was skipped"):
        load_examples(path, tok, max_length=3, truncation="right", skip_bad=True)


# --- task files: errors name file, row and key -------------------------------------------------

def test_missing_key_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}] * 16
                       + [{"prompt": "p", "answer": "r"}])
    with pytest.raises(DataError) as err:
        load_task_file(path)
    assert str(err.value) == f"{path} row 17: key 'response' missing (columns: prompt, answer)"


def test_missing_key_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"question": ["q"], "response": ["r"]}), path)
    with pytest.raises(DataError, match=rf"{path}: key 'prompt' missing "
                                        r"\(columns: question, response\)"):
        load_task_file(path)
    assert load_task_file(path, prompt_key="question") == [{"question": "q", "response": "r"}]


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("e.jsonl", b"\n  \n"),
                                          ("e.parquet", None)])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                                 "response": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path}: file is empty"):
        load_task_file(path)


def test_non_utf8(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"{path} row 2: not valid UTF-8 \(byte 0xff"):
        load_task_file(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": ["p"] * 50, "response": ["r"] * 50}), path)
    path.write_bytes(path.read_bytes()[: -20])
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        load_task_file(path)


def test_other_file_errors(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        load_task_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_task_file(tmp_path / "x.csv")
    bad_json = tmp_path / "j.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad_json} row 2: invalid JSON"):
        load_task_file(bad_json)
    rows = [{"prompt": "a", "response": "b"}, {"prompt": 3, "response": "b"},
            {"prompt": "a", "response": None}, {"prompt": "a", "response": ""}]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    load_task_file(path)  # values are checked at tokenisation
    for n, message in [(2, "key 'prompt' must be a string, got int"),
                       (3, "key 'response' is null"), (4, "key 'response' is empty")]:
        bad = write_jsonl(tmp_path / f"v{n}.jsonl", [rows[0], rows[n - 1]])
        with pytest.raises(DataError) as err:
            load_examples(bad, tok, max_length=64)
        assert str(err.value) == f"{bad} row 2: {message}"


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_round_trip(tmp_path, tok, suffix):
    rows = [{"prompt": f"q{i} ünï\n", "response": f"r{i} 中文", "extra": i} for i in range(5)]
    path = tmp_path / f"task.{suffix}"
    write_task_file(path, rows)
    assert load_task_file(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    examples, skipped = load_examples(path, tok, max_length=64)
    assert skipped == 0
    assert examples == [tokenize_example(tok, r["prompt"], r["response"], 64) for r in rows]


def test_load_task_dir_and_specs(tmp_path, tok):
    for name, fmt in (("alpha", "jsonl"), ("beta", "parquet")):
        write_task_file(tmp_path / name / f"support.{fmt}",
                        [{"prompt": f"{name}{i}>", "response": "s"} for i in range(3)])
        write_task_file(tmp_path / name / f"query.{fmt}",
                        [{"prompt": f"{name}{i}>", "response": "q"} for i in range(2)])
    tasks = load_task_dir(tmp_path, tok, max_length=64)
    assert [(t.name, len(t.support), len(t.query)) for t in tasks] == [("alpha", 3, 2),
                                                                       ("beta", 3, 2)]
    spec = {"name": "both", "support_files": [str(tmp_path / "alpha/support.jsonl"),
                                              str(tmp_path / "beta/support.parquet")],
            "query_files": str(tmp_path / "beta/query.parquet")}
    (both,) = load_tasks([spec], tok, max_length=64)
    assert len(both.support) == 6 and len(both.query) == 2
    with pytest.raises(DataError, match=r"unknown keys \['support'\]"):
        load_tasks([{**spec, "support": "x"}], tok, max_length=64)
    with pytest.raises(DataError, match="duplicate task name 'both'"):
        load_tasks([spec, spec], tok, max_length=64)
    write_task_file(tmp_path / "alpha" / "query.parquet", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="expected exactly one of query.parquet, query.jsonl"):
        load_task_dir(tmp_path, tok, max_length=64)


# --- property: any file of random rows loads with the right mask, or raises DataError ----------

_rows = st.lists(st.fixed_dictionaries({"prompt": st.text(max_size=12),
                                        "response": st.text(max_size=12)}),
                 min_size=0, max_size=6)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows, suffix=st.sampled_from(["jsonl", "parquet"]),
       max_length=st.integers(2, 24), truncation=st.sampled_from(["error", "left", "right"]))
def test_random_task_files(tmp_path, tok, rows, suffix, max_length, truncation):
    path = tmp_path / f"random.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.table({"prompt": pa.array([r["prompt"] for r in rows], pa.string()),
                                 "response": pa.array([r["response"] for r in rows],
                                                      pa.string())}), path)
    else:
        write_jsonl(path, rows)
    try:
        examples, skipped = load_examples(path, tok, max_length=max_length,
                                          truncation=truncation)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert skipped == 0 and len(examples) == len(rows)
    for row, ex in zip(rows, examples):
        n_prompt = 1 + len(ids(tok, row["prompt"]))
        n_response = len(ids(tok, row["response"])) + 1
        assert len(ex.input_ids) <= max_length and ex.num_targets >= 1
        if n_prompt + n_response <= max_length:
            assert sum(ex.loss_mask) == n_response
            assert ex.loss_mask == (0,) * n_prompt + (1,) * n_response


# --- sampler -----------------------------------------------------------------------------------

def _same(a, b):
    return a.task_names == b.task_names and all(
        torch.equal(x, y) for x, y in ((a.support.input_ids, b.support.input_ids),
                                       (a.support.labels, b.support.labels),
                                       (a.query.input_ids, b.query.input_ids)))


def _file_tasks(n_tasks, n_rows, tok):
    return [TaskData(f"t{t}",
                     [tokenize_example(tok, f"{t}s{i}>", "ab" * (i % 3 + 1), 64)
                      for i in range(n_rows)],
                     [tokenize_example(tok, f"{t}q{i}>", "cd", 64) for i in range(n_rows)])
            for t in range(n_tasks)]


def test_sampler_deterministic_and_shaped(tok):
    tasks = builtin_tasks("train", "families")
    make = lambda seed: TaskSampler(tasks, meta_batch_size=4, support_size=5, query_size=3,
                                    seed=seed, tokenizer=tok)
    a, b = make(0), make(0)
    batch = a.sample(3)
    assert _same(batch, b.sample(3)) and _same(batch, a.sample(3))
    assert not _same(batch, a.sample(4)) and not _same(batch, make(1).sample(3))
    assert len(set(batch.task_names)) == 4
    assert batch.support.layout.sizes == (5,) * 4 and batch.query.layout.sizes == (3,) * 4
    for t, _, _ in batch.support.layout.segments():
        task = get_task(batch.task_names[t])
        support, query = batch.support.task(t), batch.query.task(t)
        prompts = [tok.decode(row, skip_special_tokens=True).split(">")[0]
                   for row in [*support.input_ids, *query.input_ids]]
        assert len(set(prompts)) == 8  # support and query share no prompt
        text = tok.decode(support.input_ids[0], skip_special_tokens=True)
        x, y = text.split(">")
        assert task.rule(x) == y


def test_sampler_file_tasks_without_replacement(tok):
    tasks = _file_tasks(3, 6, tok)
    sampler = TaskSampler(tasks, meta_batch_size=3, support_size=6, query_size=2, seed=0,
                          tokenizer=tok)
    batch = sampler.sample(0)
    for t, start, end in batch.support.layout.segments():
        rows = {tuple(batch.support.input_ids[i].tolist()) for i in range(start, end)}
        assert len(rows) == 6  # the whole pool, each example once
    with pytest.raises(ValueError, match="meta_batch_size=4 .* number of tasks, 3"):
        TaskSampler(tasks, meta_batch_size=4, support_size=2, query_size=2, seed=0,
                    tokenizer=tok)
    with pytest.raises(ValueError, match="task 't0' has 6 query examples, fewer than "
                                         "query_size=7"):
        TaskSampler(tasks, meta_batch_size=2, support_size=2, query_size=7, seed=0,
                    tokenizer=tok)


def test_sampler_shards_match_full_batch(tok):
    sampler = TaskSampler(builtin_tasks("train"), meta_batch_size=5, support_size=2,
                          query_size=2, seed=1, tokenizer=tok)
    full = sampler.sample(7)
    shards = [sampler.sample(7, rank=r, world_size=2) for r in range(2)]
    assert shards[0].task_names + shards[1].task_names == full.task_names
    assert [len(s.task_names) for s in shards] == [2, 3]
    for shard in shards:
        for t, name in enumerate(shard.task_names):
            ref = full.support.task(full.task_names.index(name)).input_ids
            assert torch.equal(shard.support.task(t).input_ids, ref)
    with pytest.raises(ValueError, match="world_size=6 <= meta_batch_size=5"):
        sampler.sample(0, rank=0, world_size=6)


def test_sampler_loss_weighting_and_resume(tok):
    tasks = _file_tasks(6, 4, tok)
    make = lambda: TaskSampler(tasks, meta_batch_size=2, support_size=2, query_size=2, seed=3,
                               tokenizer=tok, weighting="loss")
    probs = make().probabilities()
    assert probs == pytest.approx({f"t{i}": 1 / 6 for i in range(6)})

    def run(sampler, steps):
        out = []
        for step in steps:
            batch = sampler.sample(step)
            out.append(batch)
            losses = [float(int(n[1:]) + step % 3) for n in batch.task_names]
            sampler.update_losses(batch.task_names, losses)
        return out

    full_sampler = make()
    full = run(full_sampler, range(12))
    probs = full_sampler.probabilities()
    assert probs["t5"] > probs["t0"]  # higher loss, drawn more often
    assert sum(probs.values()) == pytest.approx(1.0)

    first = make()
    run(first, range(6))
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint survives serialisation
    resumed = make()
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(full[6:], run(resumed, range(6, 12))))

    uniform = TaskSampler(tasks, meta_batch_size=2, support_size=2, query_size=2, seed=3,
                          tokenizer=tok)
    with pytest.raises(ValueError, match="weighting='loss'"):
        uniform.load_state_dict(state)
    first.update_losses(["t0"], [float("nan")])
    assert first.loss_ema["t0"] == state["loss_ema"]["t0"]


def test_make_task_data(tok):
    task = get_task("caesar_5")
    data = make_task_data(task, 10, 20, seed=0, tokenizer=tok, max_length=64)
    again = make_task_data(task, 10, 20, seed=0, tokenizer=tok, max_length=64)
    assert data == again and (len(data.support), len(data.query)) == (10, 20)
    assert data != make_task_data(task, 10, 20, seed=1, tokenizer=tok, max_length=64)
    prompts = [tok.decode(ex.input_ids, skip_special_tokens=True).split(">")[0]
               for ex in data.support + data.query]
    assert len(set(prompts)) == 30
    with pytest.raises(DataError, match="task 'caesar_5'.*max_length=8"):
        make_task_data(task, 10, 20, seed=0, tokenizer=tok, max_length=8)
