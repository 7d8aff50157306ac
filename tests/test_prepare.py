"""The prepare command: raw per-task files -> support/query sets + manifest."""
import json
import runpy
import sys

import pytest

from metakernels.data import build_char_tokenizer, load_task_dir, load_task_file, write_task_file
from metakernels.data.prepare import main, verify


def make_raw(directory, sizes, fmt="jsonl"):
    for name, n in sizes.items():
        write_task_file(directory / f"{name}.{fmt}",
                        [{"prompt": f"{name} q{i}>", "response": f"a{i}", "id": i}
                         for i in range(n)])


def pairs(path):
    return {(r["prompt"], r["response"]) for r in load_task_file(path)}


def test_input_dir_balance_verify(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_raw(raw, {"small": 12, "big": 40})
    write_task_file(raw / "mixed.parquet", [{"prompt": f"m{i}>", "response": "x"}
                                            for i in range(30)])
    rc = main(["--input-dir", str(raw), "--output-dir", str(out), "--support-size", "10",
               "--query-size", "5", "--balance", "--verify", "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "verify: ok (3 tasks" in captured.out

    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {e["name"]: (e["rows"], e["support"], e["query"]) for e in manifest["tasks"]}
    # "small" has 12 rows: 5 go to query, so at most 7 to support; balance gives all 7
    assert sizes == {"big": (40, 7, 5), "mixed": (30, 7, 5), "small": (12, 7, 5)}
    for name in sizes:
        support, query = pairs(out / name / "support.parquet"), pairs(out / name / "query.parquet")
        assert len(support) == 7 and len(query) == 5 and not support & query
    assert load_task_file(out / "big" / "support.parquet")[0].keys() == {"prompt", "response",
                                                                         "id"}
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind

    tasks = load_task_dir(out, build_char_tokenizer(), max_length=64)
    assert [(t.name, len(t.support), len(t.query)) for t in tasks] == [
        ("big", 7, 5), ("mixed", 7, 5), ("small", 7, 5)]

    # same seed, same split; another seed, another split
    main(["--input-dir", str(raw), "--output-dir", str(tmp_path / "again"), "--support-size",
          "10", "--query-size", "5", "--balance", "--seed", "3"])
    main(["--input-dir", str(raw), "--output-dir", str(tmp_path / "other"), "--support-size",
          "10", "--query-size", "5", "--balance", "--seed", "4"])
    first = pairs(out / "big" / "support.parquet")
    assert pairs(tmp_path / "again" / "big" / "support.parquet") == first
    assert pairs(tmp_path / "other" / "big" / "support.parquet") != first


def test_seed_style_config(tmp_path, capsys):
    raw = tmp_path / "raw_data"
    make_raw(raw, {"medical": 50, "legal": 30}, fmt="parquet")
    config = tmp_path / "task_config.json"
    config.write_text(json.dumps({
        "medical": {"input_file": "raw_data/medical.parquet", "support_ratio": 0.2,
                    "max_samples": 40},
        "legal": {"input_file": "raw_data/legal.parquet", "query_size": 10},
    }))
    out = tmp_path / "maml"
    rc = main(["--config", str(config), "--output-dir", str(out), "--support-size", "5",
               "--format", "jsonl", "--verify"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {e["name"]: (e["support"], e["query"]) for e in manifest["tasks"]}
    # medical: 40 of 50 rows, 20% support, the rest query; legal: CLI support, own query size
    assert sizes == {"medical": (8, 32), "legal": (5, 10)}
    assert (out / "medical" / "support.jsonl").is_file()
    assert manifest["format"] == "jsonl" and not manifest["balance"]


def test_list_config_and_errors(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw(raw, {"a": 10})
    config = tmp_path / "tasks.json"
    out = str(tmp_path / "out")

    def run(entries, *extra):
        config.write_text(json.dumps(entries))
        rc = main(["--task-config", str(config), "--output-dir", out, *extra])
        return rc, capsys.readouterr().err

    rc, err = run([{"name": "a", "file": "raw/a.jsonl"}], "--support-size", "8",
                  "--query-size", "3")
    assert rc == 2 and "task 'a': support 8 + query 3 rows exceed the 10 rows" in err
    assert err.startswith("error: ") and err.count("\n") == 1     # one line, as train's
    rc, err = run([{"name": "a", "file": "raw/a.jsonl"}])
    assert rc == 2 and "no support size" in err
    rc, err = run([{"name": "a", "file": "raw/a.jsonl", "support": 3}], "--support-size", "2")
    assert rc == 2 and "unknown keys ['support']" in err
    rc, err = run([{"name": "a", "file": "raw/a.jsonl"}, {"name": "a", "file": "raw/a.jsonl"}],
                  "--support-size", "2")
    assert rc == 2 and "duplicate task names: a" in err
    rc, err = run([{"name": "../a", "file": "raw/a.jsonl"}], "--support-size", "2")
    assert rc == 2 and "not usable as a directory name" in err
    (raw / "b.jsonl").write_text('{"prompt": "p", "answer": "r"}\n')
    rc, err = run([{"name": "b", "file": "raw/b.jsonl"}], "--support-size", "1")
    assert rc == 2 and f"{raw / 'b.jsonl'} row 1: key 'response' missing" in err
    rc, err = run([{"name": "b", "file": "raw/b.jsonl"}], "--support-size", "1",
                  "--response-key", "answer", "--query-size", "0")
    assert rc == 2 and "query_size must be a positive integer" in err
    with pytest.raises(SystemExit):  # argparse: size and ratio are exclusive
        main(["--input-dir", str(raw), "--output-dir", out, "--support-size", "2",
              "--support-ratio", "0.5"])


def test_verify_finds_problems(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_task_file(raw / "dup.jsonl", [{"prompt": "same>", "response": "r"}] * 6)
    rc = main(["--input-dir", str(raw), "--output-dir", str(out), "--support-size", "3",
               "--verify"])
    assert rc == 1
    assert "task 'dup': 1 prompt/response pairs are in both support and query" in \
        capsys.readouterr().err
    write_task_file(out / "dup" / "query.parquet", [{"prompt": "other>", "response": "r"}])
    assert verify(out) == [f"{out / 'dup' / 'query.parquet'}: 1 rows, the manifest says 3"]


def test_module_entry_point(tmp_path, monkeypatch, capsys):
    """``python -m metakernels.prepare`` (run in-process: a new interpreter costs seconds)."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_raw(raw, {"t1": 8, "t2": 9})
    monkeypatch.setattr(sys, "argv", [
        "prepare", "--input-dir", str(raw), "--output-dir", str(out), "--support-ratio", "0.25",
        "--query-ratio", "0.5", "--balance", "--verify"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("metakernels.prepare", run_name="__main__")
    assert exit_.value.code == 0
    assert "verify: ok" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    # t1: 2 support (25% of 8), t2: 2 (25% of 9 rounds to 2); query 4 and 4 (50%, rounded)
    assert [(e["support"], e["query"]) for e in manifest["tasks"]] == [(2, 4), (2, 4)]
