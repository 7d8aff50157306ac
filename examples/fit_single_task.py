"""Can the adapter learn one held-out task at all? A capacity probe for the few-shot evaluation.

Fits the run's LoRA (from PEFT's init, B = 0, or from the run's theta) on ONE task with plenty
of data: Adam, a fresh batch of examples every step. Then scores it as the evaluator does, on
that task's fixed query set: masked token loss, token accuracy and exact match of greedy
generations. If this reaches a high exact match while few-shot adaptation stays at zero, the
limit is the data and the adaptation budget, not the model.

    python3 examples/fit_single_task.py --run runs/default --task caesar_5 --steps 600
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from metakernels.batch import pack_tasks
from metakernels.data.sampler import make_task_data
from metakernels.data.tasks import get_task
from metakernels.adapt import (build_eval_tasks, decode_response, exact_match, greedy_generate,
                               query_metrics, stop_token_ids)
from metakernels.few_shot import load_setup, lora_init_theta
from metakernels.meta.common import task_losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a training run directory (its base and LoRA)")
    p.add_argument("--task", required=True, help="a built-in task name, e.g. caesar_5")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32, help="fresh examples per step")
    p.add_argument("--init", choices=["lora", "run"], default="lora",
                   help="start from PEFT's init (B = 0) or from the run's theta")
    p.add_argument("--n-query", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    setup = load_setup(args.run)
    model, bank, tok = setup.model, setup.bank, setup.tokenizer
    theta0 = lora_init_theta(bank, args.seed) if args.init == "lora" else setup.theta
    stop = stop_token_ids(tok, model)
    task = get_task(args.task)
    et = build_eval_tasks([task], tok, setup.cfg, n_query=args.n_query, max_shots=1, seeds=1,
                          stop_ids=stop)[0]
    bank.resize(1)
    with torch.no_grad():
        bank.theta.copy_(theta0)
    opt = torch.optim.Adam([bank.theta], lr=args.lr)
    rng = random.Random(args.seed + 123)
    t0, ema = time.time(), None
    for step in range(args.steps):
        data = make_task_data(task, args.batch, 1, rng.randrange(10 ** 9), tok,
                              setup.cfg.data.max_length)
        batch = pack_tasks([data.support], tok.pad_token_id)
        with bank.activate(bank.theta.unsqueeze(0), batch.token_layout):
            loss = task_losses(model, batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  train loss (EMA) {ema:.4f}  {time.time() - t0:.0f} s",
                  flush=True)

    w = bank.theta.detach()[None].clone()
    query = pack_tasks([et.query], tok.pad_token_id)
    loss, acc = query_metrics(model, bank, w, query)
    gens = greedy_generate(model, bank, w, et.prompts, [len(et.prompts)],
                           max(len(r) for r in et.references) + 8, stop, tok.pad_token_id)
    em = float(np.mean([exact_match(tok, g, r, stop) for g, r in zip(gens, et.references)]))
    print(f"{args.task}: {args.steps} steps x {args.batch} examples, init {args.init}: "
          f"query loss {float(loss[0]):.4f}  token accuracy {float(acc[0]):.4f}  "
          f"exact match {em:.4f}")
    for prompt, gen, ref in list(zip(et.prompts, gens, et.references))[:5]:
        print(f"  {tok.decode(prompt, skip_special_tokens=True)!r}  reference {ref!r}  "
              f"greedy {decode_response(tok, gen, stop)!r}")


if __name__ == "__main__":
    main()
