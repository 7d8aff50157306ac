"""``python -m metakernels.evaluate``: few-shot evaluation of a meta-learned LoRA init.

    python -m metakernels.evaluate --checkpoint runs/default --n-shots 0 5 10 25 50 \\
        --seeds 3 --output-dir runs/default/eval [--baseline sft=runs/multitask ...]

The frozen base and the adapter bank are rebuilt from the checkpoint's config (same model
config and seed: the same tiny random base; or ``model.path``). Contenders, each an initial
adapter theta:

    meta        the checkpoint's theta
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
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .adapt import build_eval_tasks, split_example, stop_token_ids
from .cli import UserError, check_output_dir, command
from .few_shot import (EVAL_TASK_SPEC, METRICS, Contender, EvalSettings, clean_json, compare,
                       evaluate_contender, format_table, load_baseline, load_eval_tasks,
                       load_setup, lora_init_theta, plot_results, summarize)
from .meta.common import InnerConfig


def check_args(args) -> list[tuple[str, str]]:
    """The command line's mistakes that need no model: bad numbers, malformed or clashing
    ``--baseline`` entries, an output directory that cannot be created. Returns the baselines
    as (name, path)."""
    check_output_dir(args.output_dir, "--output-dir")
    if not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {args.checkpoint}: no such run directory, checkpoint or "
                        f"PEFT adapter directory")
    if not re.fullmatch(EVAL_TASK_SPEC, args.eval_tasks) and not Path(args.eval_tasks).is_dir():
        raise UserError(f"--eval-tasks {args.eval_tasks}: no such task directory; give "
                        f"builtin-heldout, builtin-train, builtin:<suite>-heldout or a "
                        f"directory written by python -m metakernels.prepare")
    if any(n < 0 for n in args.n_shots):
        raise UserError(f"--n-shots must be >= 0, got {sorted(set(args.n_shots))}")
    for flag, value in (("--seeds", args.seeds), ("--n-query", args.n_query)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.row_chunk < 0:
        raise UserError(f"--row-chunk must be >= 0 (0: all rows at once), got {args.row_chunk}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.inner_steps is not None and args.inner_steps < 0:
        raise UserError(f"--inner-steps must be >= 0, got {args.inner_steps}")
    for flag, value in (("--inner-lr", args.inner_lr),
                        ("--inner-max-grad-norm", args.inner_max_grad_norm)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} must be a finite number >= 0, got {value}")
    baselines, taken = [], {"meta", "lora-init", "base"}
    for item in args.baseline:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--baseline {item!r}: expected NAME=PATH")
        if name in taken:
            raise UserError(f"--baseline: the name {name!r} is taken")
        if not Path(path).exists():
            raise UserError(f"--baseline {item}: no such run directory, checkpoint or PEFT "
                            f"adapter directory")
        taken.add(name)
        baselines.append((name, path))
    return baselines


def run(args) -> dict:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    baselines = check_args(args)
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
    contenders = [Contender("meta", setup.theta, setup.source),
                  Contender("lora-init", lora_init_theta(bank, args.init_seed).to(bank.device),
                            f"PEFT init, generator seed {args.init_seed}")]
    for name, path in baselines:
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
            f"lr {inner.lr}")
    names = [t.name for t in tasks]
    results = {
        "checkpoint": setup.source,
        "tasks": names,
        "settings": {"eval_tasks": args.eval_tasks, "n_shots": n_shots, "seeds": args.seeds,
                     "n_query": args.n_query, "data_seed": args.data_seed,
                     "init_seed": args.init_seed, "max_new_tokens": max_new,
                     "inner": {"lr": inner.lr, "num_steps": inner.num_steps,
                               "optimizer": inner.optimizer,
                               "max_grad_norm": inner.max_grad_norm},
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
    results = clean_json(results)
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


@command
def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
