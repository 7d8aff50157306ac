"""``python -m metakernels.evaluate``: few-shot evaluation of a meta-learned LoRA init.

    python -m metakernels.evaluate --checkpoint runs/default --n-shots 0 5 10 25 50 \\
        --seeds 3 --output-dir runs/default/eval [--baseline sft=runs/multitask ...]

The frozen base and the adapter bank are rebuilt from the checkpoint's config (same model
config and seed: the same tiny random base; or ``model.path``). Contenders, each an initial
adapter theta:

    meta        the checkpoint's theta (adapting at its learned inner rates when it was trained
                with ``meta.inner_lr_mode`` other than fixed; the others adapt at inner_lr)
    lora-init   PEFT's standard LoRA init (``lora_A`` Kaiming-uniform from a fixed generator,
                ``lora_B`` = 0: at n = 0 it predicts exactly what the base does)
    NAME        every ``--baseline NAME=PATH`` (a run dir, a checkpoint or a PEFT adapter dir)
    base        the frozen base with no adapter (n = 0 only)

For every held-out task, every n and every seed, a contender starts from its theta, takes the
same inner optimizer and step budget (default: the checkpoint's ``meta.inner_lr``,
``meta.num_inner_steps``, ``meta.inner_optimizer``) on n support examples drawn with that seed,
and is measured on the task's query set (fixed per task, the same for every contender and seed):

    loss            masked token-mean next-token cross-entropy
    token_accuracy  argmax next token == label, over the same masked positions
    exact_match     greedy generation from the prompt, decoded up to the stop token, equal to
                    the decoded reference response (both stripped)

All adaptations of one contender and one n run as ONE batched inner loop over the
``tasks x seeds`` rows of the bank (``bank.resize``); the query loss/accuracy and the greedy
decoding run batched over the same rows. Outputs: a printed table, ``results.json`` and
``few_shot.png`` (n-shot curves per contender with std bands over seeds) in ``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .bank import AdapterBank
from .batch import IGNORE_INDEX, Example, PackedBatch, pack_tasks
from .checkpoint import load_checkpoint
from .cli import UserError, check_output_dir
from .config import Config, ConfigError, config_from_dict, load_config
from .layout import TaskLayout
from .lora import inject
from .meta.common import InnerConfig, hidden_states
from .meta.fomaml import inner_loop
from .meta.inner_lr import InnerRates
from .ops import segment_cross_entropy

METRICS = ("loss", "token_accuracy", "exact_match")
METRIC_LABELS = {"loss": "query loss", "token_accuracy": "token accuracy",
                 "exact_match": "exact match"}
HIGHER_IS_BETTER = {"loss": False, "token_accuracy": True, "exact_match": True}
# the model settings that define the frozen base and the adapter layout: a baseline must share
# them with the checkpoint (plus trainer.seed for a tiny random base)
BASE_KEYS = ("path", "family", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
             "intermediate_size", "dtype", "lora_rank", "lora_alpha", "target_modules")
# the settings that fix which tasks and examples a run trains on, and for how many steps
SAME_DATA_KEYS = (("data", "tasks"), ("data", "support_size"), ("data", "query_size"),
                  ("meta", "meta_batch_size"), ("trainer", "total_steps"), ("trainer", "seed"))


# ------------------------------------------------------------------------------ the contenders
@dataclass
class Contender:
    """An initial adapter: ``theta`` [P], or None for the bare base (evaluated at n = 0 only)."""

    name: str
    theta: torch.Tensor | None
    source: str
    rates: InnerRates | None = None      # learned inner rates (the meta contender's only)

    @property
    def zero_shot_only(self) -> bool:
        return self.theta is None


@dataclass
class Setup:
    """The rebuilt frozen base with its adapter bank, and what it was built from."""

    cfg: Config
    tokenizer: object
    model: torch.nn.Module
    bank: AdapterBank
    theta: torch.Tensor                  # the checkpoint's theta
    meta: dict = field(default_factory=dict)
    source: str = ""
    rates: InnerRates | None = None      # the checkpoint's learned inner rates, if any


def is_peft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _build_base(cfg: Config):
    from .train import build_model, build_tokenizer, set_kernel_choices

    set_kernel_choices(cfg)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, len(tokenizer))
    m = cfg.model
    bank = inject(model, m.target_modules if m.target_modules != ["all-linear"] else "all-linear",
                  rank=m.lora_rank, alpha=m.lora_alpha, num_tasks=1, dropout=m.lora_dropout)
    model.eval()  # deterministic adaptation and evaluation (no LoRA dropout)
    return tokenizer, model, bank


def _peft_config(path: Path) -> dict:
    acfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    if acfg.get("use_rslora") or acfg.get("use_dora"):
        raise ValueError(f"{path}: rsLoRA/DoRA adapters are not supported (the bank computes "
                         f"scale = alpha / rank on plain LoRA)")
    return acfg


def _peft_theta(path: Path, bank: AdapterBank) -> torch.Tensor:
    from .export import load_peft_adapter

    acfg = _peft_config(path)
    if int(acfg["r"]) != bank.rank or not math.isclose(float(acfg["lora_alpha"]), bank.alpha):
        raise ValueError(f"{path}: adapter has r={acfg['r']}, lora_alpha={acfg['lora_alpha']}; "
                         f"the evaluated bank has rank={bank.rank}, alpha={bank.alpha}")
    return bank.flat_from_peft(load_peft_adapter(path)).detach().clone()


def load_setup(checkpoint: str | os.PathLike, config: str | None = None,
               overrides: Sequence[str] = ()) -> Setup:
    """Rebuilds the frozen base and the bank of ``checkpoint`` (a run directory, a checkpoint
    directory or file, or a PEFT adapter directory) and reads its theta.

    A metakernels checkpoint carries its config; a PEFT directory does not, so its base comes
    from ``config`` (a YAML file; default: the default config) with the adapter's rank, alpha
    and target modules."""
    path = Path(checkpoint)
    if is_peft_dir(path):
        cfg = load_config(config, overrides)
        acfg = _peft_config(path)
        cfg.model.lora_rank = int(acfg["r"])
        cfg.model.lora_alpha = float(acfg["lora_alpha"])
        tm = acfg["target_modules"]
        cfg.model.target_modules = tm if isinstance(tm, str) else sorted(tm)
        tokenizer, model, bank = _build_base(cfg)
        theta = _peft_theta(path, bank)
        return Setup(cfg, tokenizer, model, bank, theta, {}, str(path))
    from .export import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(ckpt)
    if "config" not in meta:
        raise ValueError(f"{ckpt}: the checkpoint has no config in its metadata")
    if config is not None:
        warnings.warn("--config is ignored: the checkpoint carries its own config (use "
                      "--override key=value to change it)")
    cfg = config_from_dict(meta["config"], overrides)
    tokenizer, model, bank = _build_base(cfg)
    _check_slots(bank, meta, ckpt)
    theta = tensors["theta"].to(bank.dtype)
    if theta.shape != bank.theta.shape:
        raise ValueError(f"{ckpt}: theta has {theta.numel()} values, the rebuilt bank "
                         f"{bank.num_params}")
    return Setup(cfg, tokenizer, model, bank, theta.to(bank.device), meta, str(ckpt),
                 checkpoint_rates(tensors, meta, bank, ckpt))


def checkpoint_rates(tensors: dict, meta: dict, bank: AdapterBank, where) -> InnerRates | None:
    """The learned inner rates a checkpoint carries (``meta.inner_lr_mode`` other than fixed),
    or None."""
    mode = meta.get("inner_lr_mode", "fixed")
    if mode == "fixed":
        return None
    values = tensors.get("inner_lr")
    if values is None:
        raise ValueError(f"{where}: trained with inner_lr_mode={mode} but holds no inner_lr")
    rates = InnerRates(mode, bank, values.shape[0] if mode == "per_layer_step" else 1, 0.0)
    if values.shape != rates.values.shape:
        raise ValueError(f"{where}: inner_lr has shape {tuple(values.shape)}, the rebuilt bank "
                         f"expects {tuple(rates.values.shape)}")
    with torch.no_grad():
        rates.values.copy_(values)
    return rates


def _check_slots(bank: AdapterBank, meta: dict, where) -> None:
    if "slots" not in meta:
        return
    want = [tuple(s) for s in meta["slots"]]
    have = [(s.name, s.in_features, s.out_features) for s in bank.slots]
    if want != have or int(meta.get("rank", bank.rank)) != bank.rank:
        raise ValueError(f"{where}: the checkpoint's adapters ({len(want)} modules, rank "
                         f"{meta.get('rank')}) do not match the rebuilt bank ({len(have)} "
                         f"modules, rank {bank.rank})")


def load_baseline(name: str, path: str | os.PathLike, setup: Setup) -> Contender:
    """A ``--baseline NAME=PATH`` contender; its base and adapter layout must be the
    checkpoint's (a different base would not be a comparison of inits)."""
    path = Path(path)
    if is_peft_dir(path):
        return Contender(name, _peft_theta(path, setup.bank), str(path))
    from .export import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(ckpt)
    mine = setup.cfg.to_dict()
    theirs = meta.get("config", {})
    for key in BASE_KEYS:
        a, b = mine["model"].get(key), theirs.get("model", {}).get(key)
        if b is not None and a != b:
            raise ValueError(f"baseline {name!r} ({ckpt}): model.{key}={b!r}, the checkpoint "
                             f"has {a!r}; a baseline must share the frozen base and adapters")
    if mine["model"]["path"] is None and theirs.get("trainer", {}).get(
            "seed", mine["trainer"]["seed"]) != mine["trainer"]["seed"]:
        raise ValueError(f"baseline {name!r} ({ckpt}): trainer.seed="
                         f"{theirs['trainer']['seed']} builds another random base than the "
                         f"checkpoint's (seed {mine['trainer']['seed']})")
    _check_slots(setup.bank, meta, ckpt)
    # a trained baseline is a fair bar only if it saw the same tasks and examples for as long
    differ = [f"{sec}.{key}={theirs.get(sec, {}).get(key)!r} (the checkpoint: "
              f"{mine[sec][key]!r})" for sec, key in SAME_DATA_KEYS
              if theirs.get(sec, {}).get(key, mine[sec][key]) != mine[sec][key]]
    if differ:
        warnings.warn(f"baseline {name!r} ({ckpt}) was not trained on the same data for the "
                      f"same steps: {', '.join(differ)}")
    if "alpha" in meta and not math.isclose(float(meta["alpha"]), setup.bank.alpha):
        raise ValueError(f"baseline {name!r}: alpha={meta['alpha']}, the checkpoint's is "
                         f"{setup.bank.alpha}")
    theta = tensors["theta"].to(setup.bank.dtype)
    if theta.shape != setup.bank.theta.shape:
        raise ValueError(f"baseline {name!r} ({ckpt}): theta has {theta.numel()} values, the "
                         f"bank {setup.bank.num_params}")
    return Contender(name, theta.to(setup.bank.device), str(ckpt))


def lora_init_theta(bank: AdapterBank, seed: int = 0) -> torch.Tensor:
    """PEFT's standard init (A Kaiming-uniform from ``Generator().manual_seed(seed)``, B = 0);
    leaves ``bank.theta`` as it was."""
    saved = bank.theta.detach().clone()
    bank.reset_parameters(torch.Generator().manual_seed(seed))
    theta = bank.theta.detach().clone()
    with torch.no_grad():
        bank.theta.copy_(saved)
    return theta


# ---------------------------------------------------------------------------------- the data
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


def load_eval_tasks(spec: str, cfg: Config, tokenizer, names: Sequence[str] | None = None):
    """``builtin-heldout`` (or ``builtin-train``): that split of the built-in suite the
    checkpoint was trained on (``data.tasks``; the default suite for a run on files);
    ``builtin:<suite>-heldout`` (or ``-train``): that split of a named suite; or a task
    directory (``load_task_dir``)."""
    from .data.loader import load_task_dir
    from .data.tasks import DEFAULT_SUITE, builtin_tasks

    m = re.fullmatch(r"builtin(?::(\w+))?-(heldout|train)", spec)
    if m:
        suite = m.group(1)
        if suite is None:
            trained_on = cfg.data.tasks
            suite = (trained_on.split(":", 1)[1] if trained_on.startswith("builtin:")
                     else DEFAULT_SUITE)
        tasks = builtin_tasks(m.group(2), suite)
    else:
        d = cfg.data
        tasks = load_task_dir(spec, tokenizer, max_length=d.max_length, truncation=d.truncation,
                              apply_chat_template=d.apply_chat_template,
                              prompt_key=d.prompt_key, response_key=d.response_key,
                              skip_bad=d.skip_bad_rows)
    if names:
        by_name = {t.name: t for t in tasks}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"--tasks: unknown {missing}; the evaluation set has "
                             f"{sorted(by_name)}")
        tasks = [by_name[n] for n in names]
    return tasks


def build_eval_tasks(tasks, tokenizer, cfg: Config, *, n_query: int, max_shots: int,
                     seeds: int, data_seed: int = 0, stop_ids=None) -> list[EvalTask]:
    """Freezes every task: its query set (``n_query`` examples, fixed) and per-seed support
    draws. A procedural task gets a support pool of ``seeds * max_shots`` fresh examples (no
    prompt shared with the query set); a task from files uses its support pool. Seed s draws
    ``max_shots`` of the pool with ``Random(f"{data_seed}:{task}:shots:{s}")``, so the n-shot
    sets of one seed are nested."""
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
                              f"--n-query {n_query}; all are used")
            if len(pool) < max_shots:
                raise ValueError(f"task {task.name!r}: {len(pool)} support examples, fewer than "
                                 f"the largest n-shot {max_shots}")
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
    weights [R, P], alive [R] bool)."""
    R = len(supports)
    with torch.no_grad():
        bank.theta.copy_(theta)
    if inner.num_steps == 0 or all(len(s) == 0 for s in supports):
        return theta.detach()[None].expand(R, -1).clone(), torch.ones(R, dtype=torch.bool)
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


# ------------------------------------------------------------------------------ evaluation
@dataclass
class EvalSettings:
    n_shots: list[int]
    seeds: int
    inner: InnerConfig
    max_new_tokens: int
    row_chunk: int = 0          # rows (task x seed) per batched pass; 0: all at once


def evaluate_contender(setup: Setup, contender: Contender, tasks: list[EvalTask], n: int,
                       settings: EvalSettings, stop_ids, log=None) -> dict:
    """Metrics [tasks, seeds] of one contender at n shots (one batched pass over the rows)."""
    model, bank, tok = setup.model, setup.bank, setup.tokenizer
    pad_id = tok.pad_token_id
    S = settings.seeds
    S_eff = 1 if n == 0 else S  # nothing depends on the seed without adaptation
    rows = [(i, s) for i in range(len(tasks)) for s in range(S_eff)]
    chunk = settings.row_chunk or len(rows)
    res = {m: np.full((len(tasks), S_eff), np.nan) for m in METRICS}
    alive = np.ones((len(tasks), S_eff), dtype=bool)
    generations: dict[tuple[int, int], list[list[int]]] = {}
    t0 = time.perf_counter()
    for c0 in range(0, len(rows), chunk):
        part = rows[c0:c0 + chunk]
        if contender.theta is None:
            weights = None
        elif n == 0:
            weights = contender.theta.detach()[None].expand(len(part), -1).contiguous()
        else:
            weights, ok = adapt_rows(model, bank, contender.theta,
                                     [tasks[i].support[s][:n] for i, s in part],
                                     settings.inner, pad_id, contender.rates)
            for (i, s), a in zip(part, ok.tolist()):
                alive[i, s] = a
        query = pack_tasks([tasks[i].query for i, _ in part], pad_id).to(bank.device)
        losses, accs = query_metrics(model, bank, weights, query)
        prompts = [p for i, _ in part for p in tasks[i].prompts]
        gens = greedy_generate(model, bank, weights, prompts, [len(tasks[i].prompts)
                               for i, _ in part], settings.max_new_tokens, stop_ids, pad_id)
        k = 0
        for r, (i, s) in enumerate(part):
            q = len(tasks[i].prompts)
            g = gens[k:k + q]
            k += q
            generations[(i, s)] = g
            res["loss"][i, s] = float(losses[r])
            res["token_accuracy"][i, s] = float(accs[r])
            res["exact_match"][i, s] = float(np.mean([
                exact_match(tok, gi, ref, stop_ids) for gi, ref in zip(g, tasks[i].references)]))
    if S_eff != S:
        res = {m: np.repeat(v, S, axis=1) for m, v in res.items()}
        alive = np.repeat(alive, S, axis=1)
    samples = {}
    for i, t in enumerate(tasks):  # a few generations of seed 0, for inspection
        samples[t.name] = [{"prompt": tok.decode(t.prompts[j], skip_special_tokens=True),
                            "reference": t.references[j],
                            "generated": decode_response(tok, generations[(i, 0)][j], stop_ids)}
                           for j in range(min(3, len(t.prompts)))]
    if log:
        log(f"[{contender.name}] n={n}: {len(rows)} rows in {time.perf_counter() - t0:.1f} s, "
            f"loss {np.nanmean(res['loss']):.4f}, token acc "
            f"{np.nanmean(res['token_accuracy']):.4f}, exact match "
            f"{np.nanmean(res['exact_match']):.4f}")
    return {"values": res, "alive": alive, "samples": samples}


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def summarize(values: np.ndarray, task_names: Sequence[str], metric: str) -> dict:
    """From [tasks, seeds]: the mean over tasks and the worst task (by its seed-mean), each as
    mean ± std (sample std) over seeds."""
    per_seed = values.mean(axis=0)
    task_mean = values.mean(axis=1)
    if np.all(np.isnan(task_mean)):
        w = 0
    else:
        w = int(np.nanargmin(task_mean) if HIGHER_IS_BETTER[metric] else np.nanargmax(task_mean))
    return {"mean_over_tasks": {"mean": float(per_seed.mean()), "std": _std(per_seed),
                                "per_seed": per_seed.tolist()},
            "worst_task": {"task": task_names[w], "mean": float(values[w].mean()),
                           "std": _std(values[w]), "per_seed": values[w].tolist()}}


def compare(a: np.ndarray, b: np.ndarray, metric: str) -> dict:
    """``a`` against ``b`` ([tasks, seeds] each): the seed-paired difference of the means over
    tasks (a - b, mean ± std over seeds) and on how many tasks ``a`` is better."""
    d = a.mean(axis=0) - b.mean(axis=0)
    ta, tb = a.mean(axis=1), b.mean(axis=1)
    better = (ta > tb) if HIGHER_IS_BETTER[metric] else (ta < tb)
    return {"diff_mean": float(d.mean()), "diff_std": _std(d), "per_seed": d.tolist(),
            "tasks_better": int(better.sum()), "num_tasks": int(len(ta))}


# -------------------------------------------------------------------------------- reporting
def _fmt(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def format_table(results: dict) -> str:
    lines = []
    seeds = results["settings"]["seeds"]
    ntask = len(results["tasks"])
    for metric in METRICS:
        arrow = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
        lines.append(f"{METRIC_LABELS[metric]} ({arrow}; mean ± std over {seeds} seeds)")
        lines.append(f"  {'contender':<14}{'n':>4}  {f'mean over {ntask} tasks':<22}"
                     f"worst task")
        for name, c in results["contenders"].items():
            for n, entry in c["n_shots"].items():
                s = entry["summary"][metric]
                lines.append(f"  {name:<14}{n:>4}  {_fmt(s['mean_over_tasks']):<22}"
                             f"{_fmt(s['worst_task'])} ({s['worst_task']['task']})")
        lines.append("")
    for key, comp in results.get("comparisons", {}).items():
        lines.append(f"{key}: difference of the mean over tasks, paired by seed "
                     f"(mean ± std); tasks where the first is better")
        lines.append(f"  {'n':>4}  " + "".join(f"{METRIC_LABELS[m]:<34}" for m in METRICS))
        for n, by_metric in comp.items():
            cells = []
            for m in METRICS:
                c = by_metric[m]
                cells.append(f"{c['diff_mean']:+.4f} ± {c['diff_std']:.4f} "
                             f"({c['tasks_better']}/{c['num_tasks']})")
            lines.append(f"  {n:>4}  " + "".join(f"{x:<34}" for x in cells))
        lines.append("")
    return "\n".join(lines)


def plot_results(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, METRICS):
        for k, (name, c) in enumerate(results["contenders"].items()):
            color = colors[k % len(colors)]
            ns = [int(n) for n in c["n_shots"]]
            mean = np.array([c["n_shots"][str(n)]["summary"][metric]["mean_over_tasks"]["mean"]
                             for n in ns])
            std = np.array([c["n_shots"][str(n)]["summary"][metric]["mean_over_tasks"]["std"]
                            for n in ns])
            worst = np.array([c["n_shots"][str(n)]["summary"][metric]["worst_task"]["mean"]
                              for n in ns])
            if len(ns) == 1:
                ax.errorbar(ns, mean, yerr=std, fmt="o", color=color, capsize=3, label=name)
                ax.plot(ns, worst, "x", color=color)
                continue
            ax.plot(ns, mean, "o-", color=color, label=name)
            ax.fill_between(ns, mean - std, mean + std, color=color, alpha=0.2)
            ax.plot(ns, worst, "--", color=color, lw=0.8, alpha=0.8)
        ax.set_xlabel("n shots (support examples)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(f"{METRIC_LABELS[metric]}: mean over tasks ± std over seeds\n"
                     f"(dashed / x: worst task)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _clean(x):
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ------------------------------------------------------------------------------------- main
def run(args) -> dict:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    setup = load_setup(args.checkpoint, args.config, args.override)
    cfg, bank = setup.cfg, setup.bank
    torch.manual_seed(cfg.trainer.seed)
    me = cfg.meta
    inner = InnerConfig(
        lr=args.inner_lr if args.inner_lr is not None else me.inner_lr,
        num_steps=args.inner_steps if args.inner_steps is not None else me.num_inner_steps,
        optimizer=args.inner_optimizer or me.inner_optimizer,
        max_grad_norm=(args.inner_max_grad_norm if args.inner_max_grad_norm is not None
                       else me.inner_max_grad_norm))
    n_shots = sorted(set(args.n_shots))
    if any(n < 0 for n in n_shots):
        raise ValueError(f"--n-shots must be >= 0, got {n_shots}")
    if args.seeds < 1 or args.n_query < 1:
        raise ValueError("--seeds and --n-query must be >= 1")
    if (setup.rates is not None and setup.rates.mode == "per_layer_step"
            and setup.rates.num_steps != inner.num_steps):
        raise ValueError(f"--inner-steps {inner.num_steps}: the checkpoint learned one rate per "
                         f"module for each of {setup.rates.num_steps} inner steps")
    contenders = [Contender("meta", setup.theta, setup.source, setup.rates),
                  Contender("lora-init", lora_init_theta(bank, args.init_seed).to(bank.device),
                            f"PEFT init, generator seed {args.init_seed}")]
    for item in args.baseline:
        if "=" not in item:
            raise ValueError(f"--baseline {item!r}: expected NAME=PATH")
        name, path = item.split("=", 1)
        if name in {c.name for c in contenders} | {"base"}:
            raise ValueError(f"--baseline: the name {name!r} is taken")
        contenders.append(load_baseline(name, path, setup))
    if 0 in n_shots:
        contenders.append(Contender("base", None, "the frozen base, no adapter"))
    stop_ids = stop_token_ids(setup.tokenizer, setup.model)
    raw_tasks = load_eval_tasks(args.eval_tasks, cfg, setup.tokenizer, args.tasks)
    tasks = build_eval_tasks(raw_tasks, setup.tokenizer, cfg, n_query=args.n_query,
                             max_shots=max(n_shots), seeds=args.seeds,
                             data_seed=args.data_seed, stop_ids=stop_ids)
    max_new = args.max_new_tokens
    if max_new is None:  # longest reference response (with its stop token) + slack
        max_new = max(len(split_example(ex)[1]) for t in tasks for ex in t.query) + 8
    settings = EvalSettings(n_shots, args.seeds, inner, max_new, args.row_chunk)
    if log:
        log(f"evaluating {[c.name for c in contenders]} on {len(tasks)} tasks "
            f"({args.eval_tasks}), n-shots {n_shots}, {args.seeds} seeds, {args.n_query} "
            f"query examples per task; inner loop: {inner.num_steps} x {inner.optimizer} "
            f"lr {inner.lr}" + (f" (meta: its learned {setup.rates.mode} rates)"
                                if setup.rates is not None else ""))
    names = [t.name for t in tasks]
    results = {
        "checkpoint": setup.source,
        "tasks": names,
        "settings": {"eval_tasks": args.eval_tasks, "n_shots": n_shots, "seeds": args.seeds,
                     "n_query": args.n_query, "data_seed": args.data_seed,
                     "init_seed": args.init_seed, "max_new_tokens": max_new,
                     "inner": {"lr": inner.lr, "num_steps": inner.num_steps,
                               "optimizer": inner.optimizer,
                               "max_grad_norm": inner.max_grad_norm,
                               "meta_inner_lr_mode": (setup.rates.mode if setup.rates
                                                      is not None else "fixed")},
                     "std": "sample std (ddof=1) over seeds",
                     "model": cfg.to_dict()["model"], "trainer_seed": cfg.trainer.seed},
        "contenders": {},
    }
    raw: dict[str, dict[int, np.ndarray]] = {}
    for c in contenders:
        entry = {"source": c.source, "n_shots": {}}
        raw[c.name] = {}
        for n in n_shots:
            if c.zero_shot_only and n > 0:
                continue
            r = evaluate_contender(setup, c, tasks, n, settings, stop_ids, log)
            raw[c.name][n] = r["values"]
            entry["n_shots"][str(n)] = {
                "summary": {m: summarize(r["values"][m], names, m) for m in METRICS},
                "per_task": {t: {m: r["values"][m][i].tolist() for m in METRICS}
                             for i, t in enumerate(names)},
                "diverged_rows": int((~r["alive"]).sum()),
                "samples": r["samples"]}
        results["contenders"][c.name] = entry
    comps = {}
    trained = [c.name for c in contenders if c.name not in ("lora-init", "base")]
    # Every trained init against PEFT's init, and the meta-learned one against each baseline
    # (a multitask SFT checkpoint is the bar meta-learning has to clear, not only B = 0).
    pairs = [(a, "lora-init") for a in trained] + [(trained[0], b) for b in trained[1:]]
    for a, b in pairs:
        comps[f"{a} vs {b}"] = {
            str(n): {m: compare(raw[a][n][m], raw[b][n][m], m) for m in METRICS}
            for n in n_shots}
    results["comparisons"] = comps
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = _clean(results)
    table = format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "table.txt").write_text(table + "\n", encoding="utf-8")
    plot_results(results, out / "few_shot.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'few_shot.png'} and {out / 'table.txt'}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metakernels.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run directory (its newest checkpoint), checkpoint, or PEFT adapter dir")
    p.add_argument("--baseline", action="extend", nargs="+", default=[], metavar="NAME=PATH",
                   help="more contenders: run dirs, checkpoints or PEFT adapter dirs")
    p.add_argument("--eval-tasks", default="builtin-heldout",
                   help="builtin-heldout (default: the held-out tasks of the checkpoint's "
                        "built-in suite), builtin-train, builtin:<suite>-heldout or a task "
                        "directory")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the set")
    p.add_argument("--n-shots", type=int, nargs="+", default=[0, 5, 10, 25, 50])
    p.add_argument("--seeds", type=int, default=3, help="support draws per task and n")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--inner-steps", type=int, default=None,
                   help="default: the checkpoint's meta.num_inner_steps")
    p.add_argument("--inner-lr", type=float, default=None,
                   help="default: the checkpoint's meta.inner_lr")
    p.add_argument("--inner-optimizer", choices=("sgd", "adam"), default=None,
                   help="default: the checkpoint's meta.inner_optimizer")
    p.add_argument("--inner-max-grad-norm", type=float, default=None,
                   help="default: the checkpoint's meta.inner_max_grad_norm")
    p.add_argument("--n-query", type=int, default=16, help="query examples per task")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the longest reference response + 8")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the query sets and support pools")
    p.add_argument("--init-seed", type=int, default=0, help="generator seed of lora-init")
    p.add_argument("--row-chunk", type=int, default=0,
                   help="task x seed rows per batched pass (0: all at once)")
    p.add_argument("--config", default=None,
                   help="YAML config of the base for a PEFT adapter dir (a run carries its own)")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. trainer.device=cpu trainer.backend=torch")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output_dir(args.output_dir, "--output-dir")
        run(args)
    except (UserError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
