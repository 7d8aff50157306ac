"""Adapt an exported meta-learned adapter to a new task with plain PEFT, then answer with it.

    python3 examples/facts/adapt_with_peft.py --model ~/.cache/metakernels/smollm2 \
        --adapter adapters/facts-meta --task data/facts_raw/heldout/country_language.paren.jsonl

The adapter (``python3 -m metakernels.export``) is the meta-learned init, not a finished model:
like every contender of ``metakernels.evaluate`` it is adapted to a task on a few examples
(the first ``--shots`` rows of ``--task``) with the inner loop it was meta-trained for (by
default that of the example config: 3 SGD steps at lr 0.1, the gradient clipped to norm 5), the
examples tokenized as in training (``[bos] prompt response [eos]``, the loss on the response and
the EOS). It then answers the other rows by greedy decoding and prints each answer against the
reference and the exact-match rate. Nothing here needs metakernels beyond its tokenization:
any PEFT/transformers pipeline can take the adapter from here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model's Hugging Face directory")
    p.add_argument("--adapter", required=True, help="a PEFT adapter directory (metakernels.export)")
    p.add_argument("--task", required=True, help="a jsonl file of prompt/response rows")
    p.add_argument("--shots", type=int, default=5, help="rows to adapt on (the first ones)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=5.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, default=8, help="rows to answer after the shots")
    args = p.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metakernels.data import tokenize_example

    rows = [json.loads(line) for line in Path(args.task).read_text().splitlines() if line.strip()]
    if len(rows) <= args.shots:
        p.error(f"--task {args.task}: {len(rows)} rows, more than --shots {args.shots} needed")
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr)

    shots = [tokenize_example(tok, r["prompt"], r["response"], max_length=256)
             for r in rows[:args.shots]]
    L = max(len(ex.input_ids) for ex in shots)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([list(ex.input_ids) + [pad] * (L - len(ex.input_ids)) for ex in shots])
    attn = torch.tensor([[1] * len(ex.input_ids) + [0] * (L - len(ex.input_ids)) for ex in shots])
    labels = torch.tensor([[t if m else -100 for t, m in zip(ex.input_ids, ex.loss_mask)]
                           + [-100] * (L - len(ex.input_ids)) for ex in shots])
    model.train()
    for step in range(args.steps):            # the task's inner loop, as in meta-training
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        print(f"adapt step {step}: support loss {loss.item():.4f}")
        opt.zero_grad()
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
    model.eval()

    hits = 0
    asked = rows[args.shots:args.shots + args.limit]
    for r in asked:
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        prompt = torch.tensor([bos + tok.encode(r["prompt"], add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=pad)
        answer = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
        hit = answer.strip() == r["response"].strip()
        hits += hit
        print(f"{r['prompt']!r:28} -> {answer!r:32} {'ok' if hit else 'expected ' + repr(r['response'])}")
    print(f"exact match {hits}/{len(asked)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
