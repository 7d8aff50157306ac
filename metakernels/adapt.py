"""The few-shot adaptation engine shared by validation during training and
``metakernels.evaluate``: held-out tasks frozen into fixed query sets and nested per-seed support
draws, one batched inner loop that adapts a bank row per (task, seed), and the per-row query
loss, token accuracy and greedy generations at those rows."""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .bank import AdapterBank
from .batch import IGNORE_INDEX, Example, PackedBatch, pack_tasks
from .config import Config
from .errors import UserError
from .layout import TaskLayout
from .meta.common import InnerConfig, hidden_states
from .meta.fomaml import inner_loop
from .meta.inner_lr import InnerRates
from .ops import segment_cross_entropy


@dataclass
class EvalTask:
    """A held-out task frozen for evaluation: a fixed query set and, per seed, ``max_shots``
    support examples (the n-shot support set of that seed is the first n)."""

    name: str
    query: list[Example]
    support: list[list[Example]]
    prompts: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


def split_example(ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of an example: the response starts at the first target."""
    k = next((i for i in range(1, len(ex.loss_mask)) if ex.loss_mask[i]), len(ex.loss_mask))
    return list(ex.input_ids[:k]), list(ex.input_ids[k:])


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids


def cut_at_stop(ids: Sequence[int], stop_ids) -> list[int]:
    out = []
    for t in ids:
        if int(t) in stop_ids:
            break
        out.append(int(t))
    return out


def decode_response(tokenizer, ids: Sequence[int], stop_ids) -> str:
    """The text of generated (or reference) response tokens up to the first stop token."""
    return tokenizer.decode(cut_at_stop(ids, stop_ids), skip_special_tokens=True)


def exact_match(tokenizer, generated: Sequence[int], reference: str, stop_ids) -> bool:
    """Decoded generation (up to the stop token) == reference text, both stripped: token
    sequences that decode to the same text count as a match."""
    return decode_response(tokenizer, generated, stop_ids).strip() == reference.strip()



def build_eval_tasks(tasks, tokenizer, cfg: Config, *, n_query: int, max_shots: int,
                     seeds: int, data_seed: int = 0, stop_ids=None,
                     settings: tuple[str, str] = ("--n-query", "--n-shots")) -> list[EvalTask]:
    """Freezes every task: its query set (``n_query`` examples, fixed) and per-seed support
    draws. A procedural task gets a support pool of ``seeds * max_shots`` fresh examples (no
    prompt shared with the query set); a task from files uses its support pool. Seed s draws
    ``max_shots`` of the pool with ``Random(f"{data_seed}:{task}:shots:{s}")``, so the n-shot
    sets of one seed are nested. ``settings`` names the caller's settings for ``n_query`` and
    ``max_shots`` in messages (the trainer's are ``trainer.eval_query_size``/``eval_shots``)."""
    from .data.loader import TaskData
    from .data.sampler import make_task_data

    stop_ids = stop_token_ids(tokenizer) if stop_ids is None else stop_ids
    out = []
    for task in tasks:
        if isinstance(task, TaskData):
            pool, query = list(task.support), list(task.query)
            if len(query) > n_query:
                keep = sorted(random.Random(f"{data_seed}:{task.name}:query").sample(
                    range(len(query)), n_query))
                query = [query[i] for i in keep]
            elif len(query) < n_query:
                warnings.warn(f"task {task.name!r}: {len(query)} query examples, fewer than "
                              f"{settings[0]}={n_query}; all are used")
            if len(pool) < max_shots:
                raise UserError(f"task {task.name!r}: {len(pool)} support examples, fewer than "
                                 f"the {max_shots} shots of {settings[1]}")
        else:
            td = make_task_data(task, seeds * max_shots, n_query, data_seed, tokenizer,
                                cfg.data.max_length, cfg.data.apply_chat_template)
            pool, query = td.support, td.query
        support = [random.Random(f"{data_seed}:{task.name}:shots:{s}").sample(pool, max_shots)
                   for s in range(seeds)]
        et = EvalTask(task.name, query, support)
        for ex in query:
            prompt, response = split_example(ex)
            et.prompts.append(prompt)
            et.references.append(decode_response(tokenizer, response, stop_ids).strip())
        out.append(et)
    return out


# ----------------------------------------------------------------------------- the engine
def adapt_rows(model, bank: AdapterBank, theta: torch.Tensor, supports: Sequence[Sequence[Example]],
               inner: InnerConfig, pad_id: int, rates: InnerRates | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapts one bank row per support set, all rows starting at ``theta``, in ONE batched
    inner loop (at the learned ``rates`` when given, else at ``inner.lr``). Returns (fast
    weights [R, P] on theta's device, alive [R] bool on the host)."""
    R = len(supports)
    with torch.no_grad():
        bank.theta.copy_(theta)
    if inner.num_steps == 0 or all(len(s) == 0 for s in supports):
        return (theta.detach()[None].expand(R, -1).clone(),
                torch.ones(R, dtype=torch.bool, device="cpu"))
    bank.resize(R)
    batch = pack_tasks(supports, pad_id).to(bank.device)
    _, alive, _ = inner_loop(model, bank, batch, inner, rates=rates)
    fast = bank.fast.detach().clone()
    bank.fast.requires_grad_(False)
    return fast, alive.cpu()


def _activate(bank: AdapterBank, weights: torch.Tensor | None, layout: TaskLayout):
    return bank.activate(weights, layout if weights is not None else None)


@torch.no_grad()
def query_metrics(model, bank: AdapterBank, weights: torch.Tensor | None, batch: PackedBatch,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ([T]) masked token-mean loss and token accuracy of ``batch`` with ``weights``
    ([T, P], one row per task of ``batch``; None: the bare base), in one forward."""
    layout = batch.token_layout
    with _activate(bank, weights, layout):
        h = hidden_states(model, batch)
    W = model.get_output_embeddings().weight
    labels = batch.labels.reshape(-1)
    losses = segment_cross_entropy(h, W, labels, layout, chunk_size)
    T = layout.num_tasks
    idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    task_ids = layout.task_ids(h.device).long()
    correct = torch.zeros(T, dtype=torch.float64, device=h.device)
    counts = torch.zeros(T, dtype=torch.float64, device=h.device)
    for i in range(0, idx.numel(), chunk_size):
        sel = idx[i:i + chunk_size]
        pred = (h[sel] @ W.T).float().argmax(-1)
        correct.index_add_(0, task_ids[sel], (pred == labels[sel]).double())
        counts.index_add_(0, task_ids[sel], torch.ones_like(sel, dtype=torch.float64))
    return losses.float().cpu(), (correct / counts.clamp(min=1)).float().cpu()


@torch.no_grad()
def greedy_generate(model, bank: AdapterBank, weights: torch.Tensor | None,
                    prompts: Sequence[Sequence[int]], rows_per_task: Sequence[int],
                    max_new_tokens: int, stop_ids, pad_id: int) -> list[list[int]]:
    """Greedy decoding of every prompt, the prompts of task t (``rows_per_task[t]`` of them,
    in order) with adapter row ``weights[t]`` (None: the bare base).

    No KV cache: each step runs the unfinished sequences, right-padded (positions 0.. as in
    training; padding after a row's last token cannot reach it under the causal mask), and
    appends each row's argmax after its last real token. Finished rows (a stop token) and
    tasks with no unfinished row are dropped from later steps. Returns the generated ids per
    prompt, the stop token included when one was produced."""
    if sum(rows_per_task) != len(prompts):
        raise ValueError(f"greedy_generate: rows_per_task sums to {sum(rows_per_task)}, "
                         f"{len(prompts)} prompts given")
    if weights is not None and weights.shape[0] != len(rows_per_task):
        raise ValueError("greedy_generate: one weights row per task is needed")
    device = next(model.parameters()).device
    task_of = [t for t, k in enumerate(rows_per_task) for _ in range(k)]
    seqs = [list(map(int, p)) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    head = model.get_output_embeddings()
    for _ in range(max_new_tokens):
        if not live:
            break
        L = max(len(seqs[n]) for n in live)
        ids = torch.full((len(live), L), pad_id, dtype=torch.long)
        am = torch.zeros((len(live), L), dtype=torch.long)
        for j, n in enumerate(live):
            ids[j, :len(seqs[n])] = torch.tensor(seqs[n])
            am[j, :len(seqs[n])] = 1
        tasks = sorted({task_of[n] for n in live})
        sizes = [sum(1 for n in live if task_of[n] == t) for t in tasks]
        batch = PackedBatch(ids.to(device), am.to(device), torch.full_like(ids, IGNORE_INDEX),
                            TaskLayout.from_sizes(sizes))
        w = None if weights is None else weights[tasks]
        with _activate(bank, w, batch.token_layout):
            h = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 use_cache=False)[0]
        last = am.sum(1).to(device) - 1
        nxt = head(h[torch.arange(len(live), device=device), last]).float().argmax(-1).tolist()
        still = []
        for n, tok in zip(live, nxt):
            out[n].append(tok)
            seqs[n].append(tok)
            if tok not in stop_ids:
                still.append(n)
        live = still
    return out
