"""Task files (parquet or jsonl, verl-style prompt/response columns) to tokenised examples.

A task directory, as ``python -m metakernels.prepare`` writes it::

    <root>/manifest.json
    <root>/<task>/support.parquet      (or .jsonl)
    <root>/<task>/query.parquet

Each row holds at least a prompt and a response column (names configurable, default ``prompt``
and ``response``); other columns are carried along and ignored. A row becomes one ``Example``:

    plain:  [bos] + ids(prompt) + ids(response) + [eos]       (no bos if the tokenizer has none)
    chat:   ids(template(user=prompt), generation prompt) + ids(rest of template(user, assistant))

with ``loss_mask`` 1 on the response part (including the final EOS, or whatever the chat
template closes the assistant turn with) and 0 on the prompt. Every problem with the data
raises ``DataError`` naming the file, the row (1-based; for jsonl the line number) and the key.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..batch import Example
from ..errors import UserError

logger = logging.getLogger(__name__)

FORMATS = ("parquet", "jsonl")
TRUNCATION_MODES = ("error", "left", "right")
MANIFEST = "manifest.json"


class DataError(UserError, ValueError):
    """A task file or row that cannot be used; the message says where and why."""


@dataclass
class TaskData:
    """One task's tokenised support and query pools.

    ``skipped`` counts rows dropped by ``skip_bad=True`` (0 otherwise).
    """

    name: str
    support: list[Example]
    query: list[Example]
    skipped: int = 0


def file_format(path: str | os.PathLike) -> str:
    """``"parquet"`` or ``"jsonl"`` from the file name; DataError for anything else."""
    suffix = Path(path).suffix.lower()
    fmt = {".parquet": "parquet", ".jsonl": "jsonl"}.get(suffix)
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {suffix!r} (expected .parquet or .jsonl)")
    return fmt


def _columns(names: Iterable) -> str:
    return ", ".join(map(str, names)) or "none"


def _read_jsonl(path: Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} row {lineno}"
            try:
                # utf-8-sig on the first line tolerates a byte-order mark
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                                f"{e.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise DataError(f"{where}: key {key!r} missing (columns: {_columns(row)})")
            rows.append((lineno, row))
    return rows


def _read_parquet(path: Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    for key in required:
        if key not in table.column_names:
            raise DataError(f"{path}: key {key!r} missing (columns: "
                            f"{_columns(table.column_names)})")
    return list(enumerate(table.to_pylist(), start=1))


def read_rows(path: str | os.PathLike, prompt_key: str = "prompt",
              response_key: str = "response") -> list[tuple[int, dict]]:
    """``(row number, row)`` pairs of a task file, every row holding both keys.

    Raises DataError for a missing file, an unsupported suffix, unreadable parquet, bad UTF-8
    or JSON, a missing key, or a file without rows. Values are not checked here (see
    ``row_texts``).
    """
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    reader = _read_parquet if fmt == "parquet" else _read_jsonl
    rows = reader(path, (prompt_key, response_key))
    if not rows:
        raise DataError(f"{path}: file is empty (no rows)")
    return rows


def load_task_file(path: str | os.PathLike, prompt_key: str = "prompt",
                   response_key: str = "response") -> list[dict]:
    """The raw rows of a task file (all columns), checked as ``read_rows`` does."""
    return [row for _, row in read_rows(path, prompt_key, response_key)]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to; renames it over ``path`` when the
    block completes, deletes it if the block raises. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_task_file(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
    """Writes ``rows`` (all their columns) as parquet or jsonl, by suffix, atomically."""
    fmt = file_format(path)
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            try:
                table = pa.Table.from_pylist([dict(r) for r in rows])
            except (pa.ArrowException, TypeError) as e:
                raise DataError(f"{path}: rows cannot be stored as parquet ({e})") from None
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    try:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    except TypeError as e:
                        raise DataError(f"{path}: row cannot be stored as JSON ({e})") from None


def row_texts(row: Mapping, prompt_key: str = "prompt", response_key: str = "response"
              ) -> tuple[str, str]:
    """``(prompt, response)`` of a row; DataError naming the key if either is missing, not a
    string, or the response is empty."""
    texts = []
    for key in (prompt_key, response_key):
        if key not in row:
            raise DataError(f"key {key!r} missing (columns: {_columns(row)})")
        value = row[key]
        if value is None:
            raise DataError(f"key {key!r} is null")
        if not isinstance(value, str):
            raise DataError(f"key {key!r} must be a string, got {type(value).__name__}")
        texts.append(value)
    if not texts[1]:
        raise DataError(f"key {response_key!r} is empty")
    return texts[0], texts[1]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _encode_chat(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("apply_chat_template=True but the tokenizer has no chat template")
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise DataError("the chat template renders the conversation without the rendered prompt "
                        "as its prefix, so prompt and response tokens cannot be told apart")
    # encoded separately so that no token straddles the prompt/response boundary
    return _encode(tokenizer, head), _encode(tokenizer, full[len(head):])


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int,
                     truncation: str = "error", apply_chat_template: bool = False) -> Example:
    """One prompt/response pair as an ``Example`` (layout in the module docstring).

    Args:
        max_length: longest sequence kept, in tokens (>= 2).
        truncation: for a longer sequence, ``"error"`` raises DataError, ``"left"`` drops tokens
            from the start (the prompt side), ``"right"`` drops them from the end.

    Raises DataError if the response is empty or no response token is left to predict after
    truncation.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not response:
        raise DataError("empty response")
    if apply_chat_template:
        prompt_ids, response_ids = _encode_chat(tokenizer, prompt, response)
    else:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to close the response with")
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        prompt_ids = bos + _encode(tokenizer, prompt)
        response_ids = _encode(tokenizer, response) + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    if len(ids) > max_length:
        if truncation == "error":
            raise DataError(
                f"{len(ids)} tokens ({len(prompt_ids)} prompt + {len(response_ids)} response) "
                f"exceed data.max_length={max_length}; raise data.max_length or set "
                f"data.truncation to 'left' or 'right'")
        keep = slice(len(ids) - max_length, None) if truncation == "left" else slice(max_length)
        ids, mask = ids[keep], mask[keep]
    # position 0 is never a target (nothing precedes it), as in Example.num_targets
    if sum(mask[1:]) == 0:
        raise DataError(
            f"no response token left to predict after {truncation} truncation to "
            f"data.max_length={max_length} ({len(prompt_ids)} prompt + {len(response_ids)} "
            f"response tokens)")
    return Example(tuple(ids), tuple(mask))


def load_examples(path: str | os.PathLike, tokenizer, *, max_length: int,
                  truncation: str = "error", apply_chat_template: bool = False,
                  prompt_key: str = "prompt", response_key: str = "response",
                  skip_bad: bool = False) -> tuple[list[Example], int]:
    """The tokenised rows of one task file and the number of rows skipped.

    A bad row (a non-string or empty value, too long with ``truncation="error"``, no response
    left after truncation) raises DataError naming the file and row, or with ``skip_bad=True``
    is dropped, counted, and reported in one warning per file. Problems with the file itself
    (unreadable, empty, a missing column) always raise. If every row is bad, DataError.
    """
    examples: list[Example] = []
    bad: list[str] = []
    for rownum, row in read_rows(path, prompt_key, response_key):
        try:
            prompt, response = row_texts(row, prompt_key, response_key)
            examples.append(tokenize_example(tokenizer, prompt, response, max_length,
                                             truncation, apply_chat_template))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{path} row {rownum}: {e}") from None
            bad.append(f"row {rownum}: {e}")
    skipped = len(bad)
    if skipped:
        logger.warning("%s: skipped %d of %d rows as bad, the first: %s", path, skipped,
                       skipped + len(examples), bad[0])
    if not examples:
        raise DataError(f"{path}: every row was skipped as bad ({skipped} rows)")
    return examples, skipped


def _as_list(value, what: str) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    raise DataError(f"{what} must be a path or a non-empty list of paths, got {value!r}")


TASK_SPEC_KEYS = ("name", "support_files", "query_files")


def load_tasks(specs: Iterable[Mapping], tokenizer, *, max_length: int, truncation: str = "error",
               apply_chat_template: bool = False, prompt_key: str = "prompt",
               response_key: str = "response", skip_bad: bool = False) -> list[TaskData]:
    """Tasks from specs ``{"name": ..., "support_files": [...], "query_files": [...]}`` (a
    single path is accepted for either list), the layout of the seeds' ``meta.tasks`` config.
    A task's files are concatenated in order. Unknown keys and duplicate names raise DataError.
    """
    options = dict(max_length=max_length, truncation=truncation,
                   apply_chat_template=apply_chat_template, prompt_key=prompt_key,
                   response_key=response_key, skip_bad=skip_bad)
    tasks: list[TaskData] = []
    for i, spec in enumerate(specs):
        unknown = sorted(set(spec) - set(TASK_SPEC_KEYS))
        missing = [k for k in TASK_SPEC_KEYS if k not in spec]
        if unknown or missing:
            raise DataError(f"task spec {i}: unknown keys {unknown}, missing keys {missing} "
                            f"(expected {', '.join(TASK_SPEC_KEYS)})")
        name = spec["name"]
        if any(t.name == name for t in tasks):
            raise DataError(f"task spec {i}: duplicate task name {name!r}")
        pools: dict[str, list[Example]] = {"support": [], "query": []}
        skipped = 0
        for split in pools:
            for path in _as_list(spec[f"{split}_files"], f"task {name!r} {split}_files"):
                examples, n_bad = load_examples(path, tokenizer, **options)
                pools[split].extend(examples)
                skipped += n_bad
        tasks.append(TaskData(name, pools["support"], pools["query"], skipped))
    if not tasks:
        raise DataError("no tasks given")
    return tasks


def _find_split_file(task_dir: Path, split: str) -> Path:
    found = [p for p in (task_dir / f"{split}.{fmt}" for fmt in FORMATS) if p.is_file()]
    if len(found) != 1:
        raise DataError(f"{task_dir}: expected exactly one of "
                        f"{', '.join(f'{split}.{fmt}' for fmt in FORMATS)}, found "
                        f"{len(found)}")
    return found[0]


def task_dir_specs(root: str | os.PathLike) -> list[dict]:
    """Task specs (see ``load_tasks``) of a task directory: from its ``manifest.json`` when there
    is one (tasks in manifest order), else one task per sub-directory (sorted, hidden ones
    skipped) holding ``support.{parquet,jsonl}`` and ``query.{parquet,jsonl}``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))["tasks"]
            return [{"name": e["name"], "support_files": [str(root / e["support_file"])],
                     "query_files": [str(root / e["query_file"])]} for e in entries]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{manifest}: not a manifest written by prepare "
                            f"({type(e).__name__}: {e})") from None
    task_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not task_dirs:
        raise DataError(f"{root}: no task sub-directories")
    return [{"name": d.name, "support_files": [str(_find_split_file(d, "support"))],
             "query_files": [str(_find_split_file(d, "query"))]} for d in task_dirs]


def load_task_dir(root: str | os.PathLike, tokenizer, *, max_length: int,
                  truncation: str = "error", apply_chat_template: bool = False,
                  prompt_key: str = "prompt", response_key: str = "response",
                  skip_bad: bool = False) -> list[TaskData]:
    """Every task of a directory laid out as in the module docstring (see ``task_dir_specs``)."""
    return load_tasks(task_dir_specs(root), tokenizer, max_length=max_length,
                      truncation=truncation, apply_chat_template=apply_chat_template,
                      prompt_key=prompt_key, response_key=response_key, skip_bad=skip_bad)
