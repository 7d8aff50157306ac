"""Write the facts suite as raw task files and the task configs ``metakernels.prepare`` takes.

    python3 examples/facts/make_tasks.py --out data/facts_raw [--model DIR]

Every task is one relation of one kind of entity answered in one style
(``country_capital.answer_is``: ``"France ->"`` answered ``" The answer is Paris."``). All
relations of a kind answer the same prompts, in every style, so the prompt hides the rule and
the support examples reveal it. Each kind's entities are split once (``--seed``): the held-out
share (``--heldout-fraction``) is asked only by the held-out tasks, the rest only by the
training tasks. The training tasks are the training relations in the training styles
(``facts.STYLES``); the held-out tasks are the held-out relations (``facts.HELDOUT``, one per
kind) in the held-out styles (``facts.HELDOUT_STYLES``). They are thus new rules on inputs never
trained on, as in MetaICL.

With ``--model DIR`` (a Hugging Face directory, e.g. SmolLM2 from ``python3 -m
metakernels.models fetch smollm2 DIR``) only the facts that model already knows are kept: asked
the plain question (``facts.QUESTIONS``: "The capital of France is") after three answered
questions of the same relation about training entities, its greedy answer must be the fact,
every token of it. The suite then tests how fast a rule is picked up, not whether
the facts are known. The counts kept per task are printed and written to ``summary.json``.

Writes ``OUT/train/<task>.jsonl``, ``OUT/heldout/<task>.jsonl``, ``OUT/train_tasks.json`` and
``OUT/heldout_tasks.json`` (task configs for ``metakernels.prepare --task-config``).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import facts  # noqa: E402

PROMPT = "{x} ->"


def split_entities(seed: int, fraction: float) -> dict[str, tuple[list[str], list[str]]]:
    """kind -> (training entities, held-out entities), a fixed shuffle per kind."""
    out = {}
    for kind, table in facts.FACTS.items():
        names = sorted(table)
        random.Random(f"{seed}:{kind}").shuffle(names)
        n_held = round(fraction * len(names))
        out[kind] = (sorted(names[n_held:]), sorted(names[:n_held]))
    return out


def question(kind: str, relation: str, entity: str, demos: list[str], n_demos: int = 3) -> str:
    """The plain question for one fact, after ``n_demos`` answered questions of the same
    relation about other entities (so that the form of the answer is clear)."""
    j = facts.RELATIONS[kind].index(relation)
    ask = facts.QUESTIONS[(kind, relation)]
    shown = [d for d in demos if d != entity][:n_demos]
    lines = [f"{ask.format(x=d)} {facts.FACTS[kind][d][j]}." for d in shown]
    return " ".join(lines + [ask.format(x=entity)])


def known_facts(model_dir: str, items: list[tuple[str, str, str]], batch_size: int = 64) -> list[bool]:
    """For (kind, relation, entity, answer) items: does the model's greedy answer to the plain
    question start with the fact, token for token? One teacher-forced pass per batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = []
    for question, answer in items:
        q = tok(question).input_ids            # as the tokenizer prompts the model by default
        a = tok.encode(" " + answer, add_special_tokens=False)
        seqs.append((q, a))
    known = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            L = max(len(q) + len(a) for q, a in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, (q, a) in enumerate(chunk):
                ids[r, :len(q) + len(a)] = torch.tensor(q + a)
                mask[r, :len(q) + len(a)] = 1
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            for r, (q, a) in enumerate(chunk):
                got = pred[r, len(q) - 1:len(q) + len(a) - 1].tolist()
                known.append(got == a)
    return known


def build(out: Path, *, seed: int, heldout_fraction: float, model: str | None,
          min_examples: int) -> dict:
    split = split_entities(seed, heldout_fraction)
    facts_of = []   # (kind, relation, split, [(entity, answer)])
    for kind, relations in facts.RELATIONS.items():
        for j, rel in enumerate(relations):
            part = "heldout" if (kind, rel) in facts.HELDOUT else "train"
            entities = split[kind][1 if part == "heldout" else 0]
            facts_of.append((kind, rel, part, [(e, facts.FACTS[kind][e][j]) for e in entities]))
    if model is not None:
        items = [(question(kind, rel, e, split[kind][0]), a)
                 for kind, rel, _, rows in facts_of for e, a in rows]
        flags = iter(known_facts(model, items))
        facts_of = [(kind, rel, part, [r for r in rows if next(flags)])
                    for kind, rel, part, rows in facts_of]
    tasks = []   # (name, split, kind, [(prompt, response)])
    for kind, rel, part, rows in facts_of:
        styles = facts.HELDOUT_STYLES if part == "heldout" else facts.STYLES
        for style in styles:
            tasks.append((f"{kind}_{rel}.{style}", part, kind,
                          [(PROMPT.format(x=e), " " + facts.styled(style, a)) for e, a in rows]))
    summary = {"model": model, "seed": seed, "heldout_fraction": heldout_fraction,
               "prompt": PROMPT, "tasks": {}}
    configs = {"train": [], "heldout": []}
    for name, part, kind, rows in tasks:
        summary["tasks"][name] = {"split": part, "examples": len(rows),
                                  "of": len(split[kind][1 if part == "heldout" else 0])}
        if len(rows) < min_examples:
            summary["tasks"][name]["dropped"] = f"fewer than {min_examples} examples"
            continue
        path = out / part / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for prompt, response in rows:
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        configs[part].append({"name": name, "file": f"{part}/{name}.jsonl"})
    for part, cfg in configs.items():
        (out / f"{part}_tasks.json").write_text(json.dumps(cfg, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the raw task files and configs")
    p.add_argument("--model", default=None,
                   help="keep only the facts this Hugging Face model directory knows")
    p.add_argument("--seed", type=int, default=0, help="the entity split")
    p.add_argument("--heldout-fraction", type=float, default=0.5,
                   help="share of each kind's entities kept for the held-out tasks")
    p.add_argument("--min-examples", type=int, default=10,
                   help="a task with fewer examples is left out")
    args = p.parse_args(argv)
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there (a Hugging Face model directory)")
    summary = build(Path(args.out), seed=args.seed, heldout_fraction=args.heldout_fraction,
                    model=args.model, min_examples=args.min_examples)
    for name, s in summary["tasks"].items():
        print(f"{s['split']:8s} {name:24s} {s['examples']:3d}/{s['of']:3d}"
              f"{'  dropped: ' + s['dropped'] if 'dropped' in s else ''}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
