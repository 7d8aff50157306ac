"""Time and peak memory of one FOMAML meta-step, every way of computing it, side by side.

One meta-step: T tasks, K inner SGD steps on each task's support set, then the gradient of each
task's query loss at its adapted fast weights, averaged over tasks (the meta-gradient). Every
variant starts from the same model weights, the same initial adapters (theta) and the same data
(``bench/workloads.py`` builds them), with the base model in ``--dtype`` (float32 or bfloat16; the
adapters, theta and the fast weights stay fp32 in every variant) on ``--device`` (cpu or cuda):

    metakernels-<backend>  ``fomaml_step``: all tasks in one pass over the frozen base, on every
                           backend that can run on the device (torch always; cpu when
                           ``metakernels._C`` is built, on the CPU; triton on a GPU);
                           ``--task-chunk C`` runs it C tasks at a time (the memory-saving mode,
                           reported as ``metakernels-<backend>-chunkC``)
    metakernels-cpu-torchlayers  (only with ``--variant``) the fused layers in their torch forms
                           (``backend.use("layer_kernels", "off")``), without their C++ kernels
    metakernels-cpu-blas   (only with ``--variant``) the cpu step with ATen's GEMMs (MKL) for the
                           frozen base instead of oneDNN's (``metakernels.gemm``)
    metakernels-<b>-plain  (only with ``--variant``) the same without the fused RMSNorm/SwiGLU/
                           rotary layers and with the loss from the materialised logits
    naive-peft             ``naive_step``: one task after another on a PEFT LoRA model (the seeds'
                           Meta-LoRA, done right; PEFT keeps its adapters fp32 on a bf16 base)
    naive-peft-onednn      (only with ``--variant``) naive-peft with its frozen linear layers on
                           oneDNN's GEMM, as metakernels-cpu runs them (what the batching alone
                           gives)
    naive-full             (CPU) full-parameter FOMAML as in the MAML-SFT seed: per task, clone
                           every weight, K SGD steps on all weights, query gradient, restore
    vmap                   ``torch.func``: ``vmap`` over tasks of (K x ``grad`` + SGD, then the
                           query ``grad``) of the PEFT model's LoRA parameters through
                           ``functional_call``, base frozen. vmap needs equal shapes, so a ragged
                           layout is padded with rows that carry no loss; SDPA has no vmap batching
                           rule, so attention runs as PyTorch's per-task fallback loop.

On the CPU the default variants are naive-peft, metakernels-torch, metakernels-cpu, naive-full
and vmap; on a GPU (``--device cuda``) naive-peft, metakernels-triton, metakernels-torch and vmap.

Before anything is timed, each variant's meta-gradient on the LoRA parameters is checked against
naive-peft at a tiny size, in the run's dtype and on its device, on a uniform and a ragged layout
(relative error below 1e-4 in fp32, below 4u = 2^-6 in bf16, u = 2^-8 bf16's unit roundoff:
``variants.CHECK_RTOL``; naive-full trains other parameters: it must run and give a finite loss).
After timing, each variant's meta-gradient at the benchmark size is compared with naive-peft's
again and the relative error is reported.

Reported per variant: median and p20/p80 of the meta-step time (around the whole step, after
warm-up steps: ``time.perf_counter`` on the CPU, CUDA events on a GPU; the variants take their
timed steps in turns unless ``--sequential``), real tokens/s (K x support + query tokens), the
time as a multiple of naive-peft's and of the FLOP floor (and "paired": the median over the
rounds of each round's step against the floor at the GEMM rate measured right after that round,
which a machine whose speed drifts between minutes moves less), and the peak memory:

- CPU: the peak RSS minus the RSS just before the step, of a fresh process that runs that
  variant alone (``python -m bench.measure --variant X ...``; on Linux the peak is ``VmHWM``,
  ``ru_maxrss`` without the parent's RSS that ``ru_maxrss`` inherits across ``exec``);
- GPU: ``torch.cuda.max_memory_allocated`` over one more step, reset before it, minus what was
  allocated before it; the ``base`` column is what the variant's model, adapters and data hold.

FLOP floor: the step's FLOPs (``measure.flop_floor``: 2P forward + 2P input gradient of the
frozen base per token, the output layer on the labelled tokens only, LoRA and causal attention
terms) divided by the best GEMM rate in the run's dtype measured on the same machine in the same
run (before, between the rounds and after them): square products at the model's hidden size
(on a GPU also at its MLP size), by each library the step can use (``common.gemm_functions``:
on the CPU ``torch.mm`` and oneDNN's linear, in bf16 too, where AVX512-BF16/AMX make it several
times faster than fp32; on a GPU ``torch.mm``, cuBLAS). The ``floor_gemm`` column names the
library, dtype (and size) that set it.

Commands::

    python bench/meta_step.py --preset fewshot            # large | zipf | vocab32k
    python bench/meta_step.py --preset fewshot --dtype bfloat16
    python bench/meta_step.py --preset fewshot --sweep-tasks
    python bench/meta_step.py --preset gpu-fewshot --device cuda --dtype bfloat16  # gpu-large
    python bench/meta_step.py --quick --csv /tmp/m.csv    # every variant once, tiny sizes
    python bench/meta_step.py --model DIR --dtype bfloat16   # any Hugging Face checkpoint

What the step spends its time on (a profile and its GEMMs replayed, the time per kind of kernel,
the step without each kernel, the cores' contention): ``bench/diagnose.py``.
Results are appended to ``bench/results/meta_step.csv``; ``bench/plot.py`` draws them.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a script: the checkout's bench/ package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import gc
import math
import os
import statistics

import torch

from bench.common import (RESULTS, append_csv, print_table, quantiles, require_device,
                          run_metadata, settle_run_args)
from bench.measure import (cuda_allocated, cuda_step_memory, flop_floor, floor_rates,
                           malloc_setting, measure_memory, time_variants, tokens_per_step)
from bench.variants import (VARIANT_CHOICES, backend_of, check_variants, make_variant, rel_err,
                            select_variants)
from bench.workloads import (Workload, add_workload_args, initial_adapters, make_data,
                             model_config, resolve_workload)

SWEEP_TASKS = (1, 2, 4, 8, 16, 32)
QUICK_SWEEP_TASKS = (1, 2)

# New columns go at the end: common.append_csv then extends a file of the earlier columns.
COLUMNS = ["timestamp", "git_rev", "machine", "cores", "threads", "torch", "load1", "malloc",
           "preset", "variant",
           "backend", "model", "targets", "rank", "num_tasks", "support_sizes", "query_rows",
           "seq_len", "inner_steps", "tokens_per_step", "warmup", "repeats", "median_s",
           "p20_s", "p80_s", "tokens_per_s", "ratio_naive_peft", "floor_s", "ratio_floor",
           "ratio_floor_paired", "gemm_gflops", "peak_rss_mb", "base_rss_mb", "rss_runs",
           "rel_err_vs_naive_peft", "dtype", "device", "floor_gemm"]

TABLE = [("variant", "variant", ""), ("num_tasks", "T", "d"), ("median_s", "median s", ".3f"),
         ("p20_s", "p20", ".3f"), ("p80_s", "p80", ".3f"), ("tokens_per_s", "tok/s", ".0f"),
         ("ratio_naive_peft", "x naive-peft", ".3f"), ("ratio_floor", "x floor", ".2f"),
         ("ratio_floor_paired", "x floor paired", ".2f"),
         ("peak_rss_mb", "step MB", ".1f"), ("base_rss_mb", "base MB", ".1f"),
         ("rel_err_vs_naive_peft", "rel err", ".1e")]


def run_workload(w: Workload, variants: list[str], args, meta: dict) -> list[dict]:
    adapters = initial_adapters(w)
    support, query = make_data(w, model_config(w).vocab_size)
    cuda = w.device == "cuda"
    rates = [floor_rates(w)]

    def probe():
        rates.append(floor_rates(w))
        return rates[-1]
    tokens = tokens_per_step(w, support, query)
    print(f"\n== {w.preset}: {w.describe_model()} {w.dtype} on {w.device}, targets {w.targets} "
          f"r{w.rank}, T={w.num_tasks} support {w.describe_sizes()} query {w.query_rows}/task, "
          f"L={w.seq_len}, K={w.inner_steps}; {tokens} tokens/step")
    # On a GPU the memory is measured here, in this process: what each variant holds, and its
    # step's peak above what every variant holds.
    base_mb: dict[str, float] = {}
    step_mb: dict[str, float] = {}

    def build(name):
        before = cuda_allocated() if cuda else 0
        runner = make_variant(name, w, adapters, support, query)
        if cuda:
            base_mb[name] = (cuda_allocated() - before) / 2 ** 20
        return runner
    if args.sequential:
        results = {}
        for name in variants:
            runner = build(name)
            results.update(time_variants({name: runner}, args.warmup, args.repeats, w.device,
                                         probe))
            if cuda:
                step_mb[name] = cuda_step_memory(runner)
            del runner
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    else:
        runners = {name: build(name) for name in variants}
        results = time_variants(runners, args.warmup, args.repeats, w.device, probe)
        if cuda:
            step_mb.update({name: cuda_step_memory(r) for name, r in runners.items()})
        del runners
        gc.collect()
    # the best of before, every round and after: the floor is a best case
    rates.append(floor_rates(w))
    best = {lib: max(r[lib] for r in rates) for lib in rates[0]}
    floor_gemm = max(best, key=best.get)
    rate = best[floor_gemm]
    flops = flop_floor(w, adapters, support, query)
    floor_s = flops / rate
    print(f"{w.dtype} GEMM on {w.device}, best rate: "
          + ", ".join(f"{lib} {r / 1e9:.1f}" for lib, r in best.items())
          + f" GFLOP/s; FLOP floor {floor_s:.4f} s ({flops / 1e9:.1f} GFLOP at {floor_gemm})")
    want = results["naive-peft"]["grad"] if "naive-peft" in results else None
    base = quantiles(results["naive-peft"]["times"])[0] if "naive-peft" in results else None
    rows = []
    for name in variants:
        res = results[name]
        med, p20, p80 = quantiles(res["times"])
        grad = res["grad"]
        err = rel_err(grad, want) if grad is not None and want is not None else None
        if not math.isfinite(res["loss"]):
            raise SystemExit(f"{name}: the query loss is {res['loss']} at the benchmark size")
        label = name
        if name.startswith("metakernels-") and 0 < w.task_chunk < w.num_tasks:
            label = f"{name}-chunk{w.task_chunk}"
        rows.append({**meta, "preset": w.preset, "variant": label, "backend": backend_of(name),
                     "model": w.describe_model(), "targets": w.targets, "rank": w.rank,
                     "num_tasks": w.num_tasks, "support_sizes": w.describe_sizes(),
                     "query_rows": w.query_rows, "seq_len": w.seq_len,
                     "inner_steps": w.inner_steps, "tokens_per_step": tokens,
                     "warmup": args.warmup, "repeats": args.repeats, "median_s": med,
                     "p20_s": p20, "p80_s": p80, "tokens_per_s": tokens / med,
                     "ratio_naive_peft": med / base if base else None,
                     "floor_s": floor_s, "ratio_floor": med / floor_s,
                     "ratio_floor_paired": statistics.median(
                         t * max(r.values()) / flops
                         for t, r in zip(res["times"], res["round_rates"])),
                     "gemm_gflops": rate / 1e9, "rel_err_vs_naive_peft": err,
                     "dtype": w.dtype, "device": w.device,
                     "floor_gemm": f"{floor_gemm} {w.dtype}"})
        print(f"  {name:<18} median {med:.3f} s  (p20 {p20:.3f}, p80 {p80:.3f})"
              + (f"  rel err {err:.1e}" if err is not None and name != "naive-peft" else ""))
    if cuda:
        mem = {v: {"peak_rss_mb": step_mb[v], "base_rss_mb": base_mb[v], "rss_runs": 1}
               for v in variants}
    else:
        mem = measure_memory(w, variants, args.memory_runs)
    for name, r in zip(variants, rows):
        r.update(mem[name])
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--sweep-tasks", action="store_true",
                   help=f"run the preset at T = {', '.join(map(str, SWEEP_TASKS))}")
    p.add_argument("--variant", action="append", choices=VARIANT_CHOICES,
                   help="run only this variant (repeatable); default: every available one")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default 1)")
    p.add_argument("--repeats", type=int, help="timed steps per variant (default 5)")
    p.add_argument("--sequential", action="store_true",
                   help="time one variant after another, each torn down before the next is "
                        "built (default: every variant set up at once and timed in turns, "
                        "fairer on a machine whose load drifts; needs one model copy per "
                        "variant in memory)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's choice; 1 with --quick, whose tiny ops "
                        "only pay for thread synchronisation, worst on a busy machine)")
    p.add_argument("--csv", type=Path, default=RESULTS / "meta_step.csv")
    p.add_argument("--memory-runs", type=int,
                   help="(CPU) fresh processes per variant whose median peak RSS is reported "
                        "(default 3; 1 with --quick)")
    args = p.parse_args(argv)
    args.memory_runs = args.memory_runs or (1 if args.quick else 3)
    if args.memory_runs < 1:
        p.error("--memory-runs must be >= 1")
    settle_run_args(p, args, warmup=(1, 0), repeats=(5, 1))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    w = resolve_workload(args)
    require_device(w.device)
    if w.device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("TRITON_INTERPRET=1 runs the triton kernels in the CPU interpreter: "
                         "unset it to time them on the GPU")
    variants = select_variants(args.variant, w.device)
    meta = {**run_metadata(w.device), "malloc": malloc_setting()}
    print(f"{meta['machine']}, {meta['cores']} cores, {meta['threads']} threads, torch "
          f"{meta['torch']}, git {meta['git_rev']}; {w.dtype} on {w.device}; variants: "
          f"{', '.join(variants)}")
    check_variants(w, variants)
    sweep = (QUICK_SWEEP_TASKS if args.quick else SWEEP_TASKS) if args.sweep_tasks else (None,)
    rows = []
    for T in sweep:
        wt = w if T is None else dataclasses.replace(w, num_tasks=T)
        new = run_workload(wt, variants, args, meta)
        append_csv(args.csv, COLUMNS, new)
        rows += new
    memory = ("step MB: torch.cuda.max_memory_allocated over a step above the allocated before "
              "it; base MB: the variant's model, adapters and data" if w.device == "cuda" else
              f"step MB: peak RSS of a fresh process above its RSS before the step, median of "
              f"{args.memory_runs}")
    print(f"\nFOMAML meta-step, preset {w.preset}, {w.dtype} on {w.device} ({args.warmup} "
          f"warm-up + {args.repeats} timed steps; 'x' columns are time ratios, lower is better; "
          f"{memory})")
    print_table(rows, TABLE)
    print(f"\nappended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
