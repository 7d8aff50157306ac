"""Split raw per-task files into support and query sets (``python -m metakernels.prepare``).

What the seeds' ``prepare_maml_data.py`` does::

    python -m metakernels.prepare --task-config tasks.json --output-dir data/maml \\
        --support-size 500 --query-size 1000 --balance --verify

The task config is a JSON object ``{name: {"input_file": ..., ...}}`` (the seeds' layout) or a
list ``[{"name": ..., "file": ..., ...}]``; per task it may set ``support_size`` or
``support_ratio``, ``query_size`` or ``query_ratio``, and ``max_samples``, which override the
command-line values. Relative file paths are read from the config file's directory. With
``--input-dir`` every ``*.parquet`` / ``*.jsonl`` file there is a task named after its stem.

Per task: rows are shuffled with ``Random(f"{seed}:{name}")``, cut to ``max_samples``, then the
first ``support`` rows form the support set and the next ``query`` rows the query set (all the
remaining rows when no query size or ratio is given). ``--balance`` gives every task the same
support size: the smallest one requested or possible. Output, every file written atomically::

    <output-dir>/<task>/support.<format>, <output-dir>/<task>/query.<format>
    <output-dir>/manifest.json            (what ``load_task_dir`` reads)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..cli import check_output_dir, command
from .loader import (FORMATS, MANIFEST, DataError, atomic_path, read_rows, row_texts,
                     write_task_file)

SPLIT_KEYS = ("support_size", "query_size", "support_ratio", "query_ratio", "max_samples")
TASK_KEYS = ("name", "file", "input_file") + SPLIT_KEYS


@dataclass
class TaskSource:
    """One raw task file and its split settings (None: use the command-line value)."""

    name: str
    file: Path
    support_size: int | None = None
    query_size: int | None = None
    support_ratio: float | None = None
    query_ratio: float | None = None
    max_samples: int | None = None


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or any(
            c in name for c in "/\\"):
        raise DataError(f"{where}: task name {name!r} is not usable as a directory name")
    return name


def load_task_config(path: str | Path) -> list[TaskSource]:
    """Task sources from a JSON task config (layouts in the module docstring)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the task config ({e})") from None
    if isinstance(config, dict):
        entries = [{"name": name, **(spec if isinstance(spec, dict) else {"file": spec})}
                   for name, spec in config.items()]
    elif isinstance(config, list) and all(isinstance(e, dict) for e in config):
        entries = config
    else:
        raise DataError(f"{path}: the task config must be a JSON object or a list of objects")
    sources = []
    for i, entry in enumerate(entries):
        where = f"{path} task {entry.get('name', i)!r}"
        unknown = sorted(set(entry) - set(TASK_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown keys {unknown} (allowed: {', '.join(TASK_KEYS)})")
        if ("file" in entry) == ("input_file" in entry):
            raise DataError(f"{where}: give exactly one of 'file' and 'input_file'")
        settings = {k: entry[k] for k in SPLIT_KEYS if k in entry}
        file = Path(entry.get("file", entry.get("input_file")))
        sources.append(TaskSource(_check_name(entry.get("name"), where),
                                  file if file.is_absolute() else path.parent / file,
                                  **settings))
    if not sources:
        raise DataError(f"{path}: no tasks")
    return sources


def input_dir_sources(directory: str | Path) -> list[TaskSource]:
    """One task per ``*.parquet`` / ``*.jsonl`` file of ``directory``, named after its stem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in (".parquet", ".jsonl"))
    if not files:
        raise DataError(f"{directory}: no .parquet or .jsonl files")
    return [TaskSource(_check_name(p.stem, str(p)), p) for p in files]


@dataclass
class _Plan:
    source: TaskSource
    rows: list[dict]
    total: int
    support: int
    query: int | None  # None: the rest


def _size(source: TaskSource, defaults: TaskSource, what: str, n: int) -> int | None:
    """The ``what`` ("support" or "query") size of a task of ``n`` rows: from its own size or
    ratio if it sets either, else from the command line's; None if neither sets one."""
    size, ratio = getattr(source, f"{what}_size"), getattr(source, f"{what}_ratio")
    if size is None and ratio is None:
        size, ratio = getattr(defaults, f"{what}_size"), getattr(defaults, f"{what}_ratio")
    where = f"task {source.name!r}"
    if size is not None and ratio is not None:
        raise DataError(f"{where}: give {what}_size or {what}_ratio, not both")
    if size is not None:
        if not isinstance(size, int) or size < 1:
            raise DataError(f"{where}: {what}_size must be a positive integer, got {size!r}")
        return size
    if ratio is not None:
        if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise DataError(f"{where}: {what}_ratio must be in (0, 1], got {ratio!r}")
        return max(1, round(ratio * n))
    return None


def _valid_rows(path: Path, prompt_key: str, response_key: str
                ) -> list[tuple[dict, tuple[str, str]]]:
    """``(row, (prompt, response))`` for every row of ``path``; DataError at the first bad one."""
    valid = []
    for rownum, row in read_rows(path, prompt_key, response_key):
        try:
            valid.append((row, row_texts(row, prompt_key, response_key)))
        except DataError as e:
            raise DataError(f"{path} row {rownum}: {e}") from None
    return valid


def _plan(source: TaskSource, defaults: TaskSource, seed: int, prompt_key: str,
          response_key: str) -> _Plan:
    rows = [row for row, _ in _valid_rows(source.file, prompt_key, response_key)]
    total = len(rows)
    random.Random(f"{seed}:{source.name}").shuffle(rows)
    max_samples = source.max_samples if source.max_samples is not None else defaults.max_samples
    if max_samples is not None:
        if not isinstance(max_samples, int) or max_samples < 2:
            raise DataError(f"task {source.name!r}: max_samples must be an integer >= 2, got "
                            f"{max_samples!r}")
        rows = rows[:max_samples]
    support = _size(source, defaults, "support", len(rows))
    if support is None:
        raise DataError(f"task {source.name!r}: no support size; give --support-size or "
                        f"--support-ratio (or support_size/support_ratio in the task config)")
    return _Plan(source, rows, total, support, _size(source, defaults, "query", len(rows)))


def _available_support(plan: _Plan) -> int:
    return len(plan.rows) - (plan.query if plan.query is not None else 1)


def prepare(sources: Sequence[TaskSource], output_dir: str | Path, *, defaults: TaskSource,
            seed: int = 0, balance: bool = False, fmt: str = "parquet",
            prompt_key: str = "prompt", response_key: str = "response") -> dict:
    """Splits every source and writes the output directory; returns the manifest.

    ``defaults`` holds the command-line sizes, ratios and ``max_samples`` (its name and file
    are unused). Raises DataError when a task has too few rows for its support and query sets.
    """
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {FORMATS}, got {fmt!r}")
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"duplicate task names: {', '.join(duplicates)}")
    plans = [_plan(s, defaults, seed, prompt_key, response_key) for s in sources]
    if balance:
        support = min(min(p.support, _available_support(p)) for p in plans)
        if support < 1:
            smallest = min(plans, key=_available_support)
            raise DataError(f"--balance: task {smallest.source.name!r} has {len(smallest.rows)} "
                            f"rows, no room for a support set beside its query set")
        for p in plans:
            p.support = support
    for p in plans:
        if p.support > _available_support(p):
            query = "at least 1" if p.query is None else str(p.query)
            raise DataError(f"task {p.source.name!r}: support {p.support} + query {query} rows "
                            f"exceed the {len(p.rows)} rows of {p.source.file}")
    output_dir = Path(output_dir)
    entries = []
    for p in plans:
        query = p.query if p.query is not None else len(p.rows) - p.support
        files = {split: f"{p.source.name}/{split}.{fmt}" for split in ("support", "query")}
        write_task_file(output_dir / files["support"], p.rows[:p.support])
        write_task_file(output_dir / files["query"], p.rows[p.support:p.support + query])
        entries.append({"name": p.source.name, "source": str(p.source.file), "rows": p.total,
                        "support": p.support, "query": query,
                        "support_file": files["support"], "query_file": files["query"]})
    manifest = {"format": fmt, "seed": seed, "balance": balance, "prompt_key": prompt_key,
                "response_key": response_key, "tasks": entries}
    with atomic_path(output_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    return manifest


def verify(output_dir: str | Path) -> list[str]:
    """Re-reads a prepared directory; returns the problems found (empty: all good).

    Checks every file is readable with valid rows, its row count matches the manifest, no
    (prompt, response) pair of a task is in both its support and query sets, and with
    ``balance`` that all support sets have the same size.
    """
    output_dir = Path(output_dir)
    try:
        manifest = json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{output_dir / MANIFEST}: cannot read the manifest ({e})"]
    problems = []
    for entry in manifest["tasks"]:
        pairs = {}
        for split in ("support", "query"):
            path = output_dir / entry[f"{split}_file"]
            try:
                valid = _valid_rows(path, manifest["prompt_key"], manifest["response_key"])
            except DataError as e:
                problems.append(str(e))
                continue
            if len(valid) != entry[split]:
                problems.append(f"{path}: {len(valid)} rows, the manifest says {entry[split]}")
            pairs[split] = {texts for _, texts in valid}
        shared = pairs.get("support", set()) & pairs.get("query", set())
        if shared:
            problems.append(f"task {entry['name']!r}: {len(shared)} prompt/response pairs are "
                            f"in both support and query (duplicate rows in the raw file?)")
    sizes = {e["support"] for e in manifest["tasks"]}
    if manifest["balance"] and len(sizes) > 1:
        problems.append(f"balance was asked for but the support sizes differ: {sorted(sizes)}")
    return problems


def _print_summary(manifest: dict) -> None:
    width = max(len("task"), *(len(e["name"]) for e in manifest["tasks"]))
    print(f"{'task':<{width}}  {'rows':>7}  {'support':>7}  {'query':>7}  {'unused':>7}")
    for e in manifest["tasks"]:
        unused = e["rows"] - e["support"] - e["query"]
        print(f"{e['name']:<{width}}  {e['rows']:>7}  {e['support']:>7}  {e['query']:>7}  "
              f"{unused:>7}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m metakernels.prepare",
        description="Split raw per-task prompt/response files into support and query sets.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--task-config", "--config", dest="task_config", metavar="JSON",
                     help="JSON task config: {name: {input_file, ...}} or [{name, file, ...}]")
    src.add_argument("--input-dir", help="a directory with one .parquet/.jsonl file per task")
    parser.add_argument("--output-dir", required=True)
    support = parser.add_mutually_exclusive_group()
    support.add_argument("--support-size", type=int, help="support rows per task")
    support.add_argument("--support-ratio", type=float, help="support fraction of each task")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--query-size", type=int, help="query rows per task (default: the rest)")
    query.add_argument("--query-ratio", type=float, help="query fraction of each task")
    parser.add_argument("--max-samples", type=int,
                        help="use at most this many (shuffled) rows per task")
    parser.add_argument("--balance", action="store_true",
                        help="the same support size for every task: the smallest")
    parser.add_argument("--verify", action="store_true",
                        help="re-read the outputs, check sizes and support/query disjointness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--response-key", default="response")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 2 bad input: one ``error: ...`` line
    naming the file, row or key, as the other commands report theirs; 1 a failed
    verification)."""
    args = build_parser().parse_args(argv)
    defaults = TaskSource("", Path(), args.support_size, args.query_size, args.support_ratio,
                          args.query_ratio, args.max_samples)
    check_output_dir(args.output_dir, "--output-dir")
    sources = (load_task_config(args.task_config) if args.task_config
               else input_dir_sources(args.input_dir))
    manifest = prepare(sources, args.output_dir, defaults=defaults, seed=args.seed,
                       balance=args.balance, fmt=args.format, prompt_key=args.prompt_key,
                       response_key=args.response_key)
    _print_summary(manifest)
    print(f"wrote {len(manifest['tasks'])} tasks to {args.output_dir}")
    if args.verify:
        problems = verify(args.output_dir)
        for problem in problems:
            print(f"verify: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"verify: ok ({len(manifest['tasks'])} tasks, support and query disjoint)")
    return 0
