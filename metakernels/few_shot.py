"""Few-shot evaluation of initial adapters (the library under ``metakernels.evaluate``):
the contenders (a checkpoint's theta, PEFT's init, baselines, the bare base), each adapted on
n support examples of every held-out task over several seeds, measured, summarised and drawn."""
from __future__ import annotations

import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .adapt import (EvalTask, adapt_rows, decode_response, exact_match, greedy_generate,
                    query_metrics)
from .bank import AdapterBank, check_adapter_meta
from .batch import pack_tasks
from .build import build_bank, build_model, build_tokenizer, set_kernel_choices
from .cli import check_device
from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import Config, config_from_dict, load_config
from .errors import UserError
from .meta.common import InnerConfig
from .peft_adapter import is_peft_dir, peft_theta, read_peft_config

# --eval-tasks: a split of a built-in suite (else a task directory)
EVAL_TASK_SPEC = r"builtin(?::(\w+))?-(heldout|train)"
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


def _build_base(cfg: Config):
    check_device(cfg.trainer.device, cfg.trainer.backend)
    set_kernel_choices(cfg)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, len(tokenizer))
    bank = build_bank(cfg, model, num_tasks=1)
    model.eval()  # deterministic adaptation and evaluation (no LoRA dropout)
    return tokenizer, model, bank


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
        acfg = read_peft_config(path, "--checkpoint")
        cfg.model.lora_rank = int(acfg["r"])
        cfg.model.lora_alpha = float(acfg["lora_alpha"])
        tm = acfg["target_modules"]
        cfg.model.target_modules = tm if isinstance(tm, str) else sorted(tm)
        tokenizer, model, bank = _build_base(cfg)
        theta = peft_theta(path, bank, "--checkpoint")
        return Setup(cfg, tokenizer, model, bank, theta, {}, str(path))
    ckpt = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(ckpt)
    if "config" not in meta:
        raise UserError(f"{ckpt}: the checkpoint has no config in its metadata")
    if config is not None:
        warnings.warn("--config is ignored: the checkpoint carries its own config (use "
                      "--override key=value to change it)")
    cfg = config_from_dict(meta["config"], overrides)
    tokenizer, model, bank = _build_base(cfg)
    check_adapter_meta(bank, meta, ckpt)
    theta = tensors["theta"].to(bank.dtype)
    if theta.shape != bank.theta.shape:
        raise UserError(f"{ckpt}: theta has {theta.numel()} values, the rebuilt bank "
                         f"{bank.num_params}")
    return Setup(cfg, tokenizer, model, bank, theta.to(bank.device), meta, str(ckpt))


def load_baseline(name: str, path: str | os.PathLike, setup: Setup) -> Contender:
    """A ``--baseline NAME=PATH`` contender; its base and adapter layout must be the
    checkpoint's (a different base would not be a comparison of inits)."""
    path = Path(path)
    if is_peft_dir(path):
        return Contender(name, peft_theta(path, setup.bank, f"--baseline {name}"), str(path))
    ckpt = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(ckpt)
    mine = setup.cfg.to_dict()
    theirs = meta.get("config", {})
    for key in BASE_KEYS:
        a, b = mine["model"].get(key), theirs.get("model", {}).get(key)
        if b is not None and a != b:
            raise UserError(f"baseline {name!r} ({ckpt}): model.{key}={b!r}, the checkpoint "
                             f"has {a!r}; a baseline must share the frozen base and adapters")
    if mine["model"]["path"] is None and theirs.get("trainer", {}).get(
            "seed", mine["trainer"]["seed"]) != mine["trainer"]["seed"]:
        raise UserError(f"baseline {name!r} ({ckpt}): trainer.seed="
                         f"{theirs['trainer']['seed']} builds another random base than the "
                         f"checkpoint's (seed {mine['trainer']['seed']})")
    check_adapter_meta(setup.bank, meta, ckpt)
    # a trained baseline is a fair bar only if it saw the same tasks and examples for as long
    differ = [f"{sec}.{key}={theirs.get(sec, {}).get(key)!r} (the checkpoint: "
              f"{mine[sec][key]!r})" for sec, key in SAME_DATA_KEYS
              if theirs.get(sec, {}).get(key, mine[sec][key]) != mine[sec][key]]
    if differ:
        warnings.warn(f"baseline {name!r} ({ckpt}) was not trained on the same data for the "
                      f"same steps: {', '.join(differ)}")
    theta = tensors["theta"].to(setup.bank.dtype)
    if theta.shape != setup.bank.theta.shape:
        raise UserError(f"baseline {name!r} ({ckpt}): theta has {theta.numel()} values, the "
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



def load_eval_tasks(spec: str, cfg: Config, tokenizer, names: Sequence[str] | None = None):
    """``builtin-heldout`` (or ``builtin-train``): that split of the built-in suite the
    checkpoint was trained on (``data.tasks``; the default suite for a run on files);
    ``builtin:<suite>-heldout`` (or ``-train``): that split of a named suite; or a task
    directory (``load_task_dir``)."""
    from .data.loader import load_task_dir
    from .data.tasks import DEFAULT_SUITE, builtin_tasks

    m = re.fullmatch(EVAL_TASK_SPEC, spec)
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
            raise UserError(f"--tasks: unknown {missing}; the evaluation set has "
                             f"{sorted(by_name)}")
        tasks = [by_name[n] for n in names]
    return tasks



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
                                     settings.inner, pad_id)
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


def clean_json(x):
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    return x
