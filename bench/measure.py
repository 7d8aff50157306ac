"""Measurement for the meta-step benchmarks: the FLOP floor of a workload and the GEMM rates it
is divided by, the timing of variants in turns, and the peak memory of one variant's step.

Run as a module, it measures the memory of one variant's step in this fresh process (what
``measure_memory`` starts)::

    python -m bench.measure --variant metakernels-cpu --threads 2 --preset fewshot [workload flags]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn as nn

from metakernels.bank import AdapterBank
from metakernels.batch import IGNORE_INDEX, PackedBatch

from bench.common import DTYPES, REPO, gemm_rates, timer
from bench.variants import VARIANT_CHOICES, make_variant
from bench.workloads import (Workload, add_workload_args, check_workloads, ghost_model,
                             initial_adapters, make_data, model_config, resolve_workload)

MEMORY_MARK = "MEMORY "
MEMORY_JOBS = 2         # concurrent memory processes: RSS is per process, so they do not mix


# ---------------------------------------------------------------------------------------------
# FLOP floor
# ---------------------------------------------------------------------------------------------
def flop_floor(w: Workload, adapters: AdapterBank, support: PackedBatch,
               query: PackedBatch) -> float:
    """FLOPs of the LoRA meta-step at best (DESIGN.md, "Performance: how to measure"), per token
    of every forward/backward: 2P forward + 2P input gradient of the frozen linear weights (P:
    every linear layer, not the embedding), except that the output layer counts only on the
    tokens with a label (a token without one has no loss: its logits are not needed) and the
    first layer's q, k and v have no input gradient (they read the frozen embeddings), plus
    6 r (in + out) per adapted layer (LoRA forward, dx and dA, dB), plus causal attention
    6 L^2 d_attn per sequence and layer (2 forward, 4 backward as flash-attention counts them).
    The same in every dtype: the floor's time is these FLOPs at the GEMM rate of the dtype
    (``floor_rates``). It is the floor of the LoRA meta-step; naive-full does more work (weight
    gradients), and its ratio says so."""
    model = ghost_model(w)
    cfg = model.config
    head = model.get_output_embeddings()
    p_body = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Linear) and m is not head)
    p_first = sum(m.weight.numel() for m in first_layer_inputs(model))
    lora = sum(6 * s.rank * (s.in_features + s.out_features) for s in adapters.slots)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    total = 0.0
    for batch, times in ((support, w.inner_steps), (query, 1)):
        lens = batch.attention_mask.sum(1).double()
        tokens = float(lens.sum())
        labelled = float((batch.labels != IGNORE_INDEX).sum())
        attn = float((lens ** 2).sum()) * 6 * d_attn * cfg.num_hidden_layers
        total += times * (tokens * (4 * p_body - 2 * p_first + lora)
                          + labelled * 4 * head.weight.numel() + attn)
    return total


def first_layer_inputs(model: nn.Module) -> list[nn.Linear]:
    """The linear layers that read the first decoder layer's normed input, the frozen
    embeddings: q, k and v of its attention (Llama-family names), which need no input gradient.
    Empty where the model has no such layer."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    return [m for name in ("q_proj", "k_proj", "v_proj")
            if isinstance(m := getattr(attn, name, None), nn.Linear)]


def floor_rates(w: Workload, min_seconds: float = 0.2) -> dict[str, float]:
    """The GEMM rates the floor takes its best from, measured now, in the workload's dtype on
    its device: square products at the model's hidden size by every GEMM library the step can
    use (``common.gemm_functions``); on a GPU also at the MLP's intermediate size (the step's
    largest products: a GPU reaches its rate only on large ones, a CPU at the hidden size
    already). Keys: the library, with the size where there are several."""
    cfg = model_config(w)
    sizes = [cfg.hidden_size]
    if w.device == "cuda":
        sizes.append(getattr(cfg, "intermediate_size", cfg.hidden_size))
    rates = {}
    for n in dict.fromkeys(sizes):
        for lib, r in gemm_rates(n, DTYPES[w.dtype], min_seconds, w.device).items():
            rates[lib if len(sizes) == 1 else f"{lib} n={n}"] = r
    return rates


def tokens_per_step(w: Workload, support: PackedBatch, query: PackedBatch) -> int:
    return w.inner_steps * support.num_tokens() + query.num_tokens()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_variants(runners: dict, warmup: int, repeats: int, device: str = "cpu",
                  probe: Callable[[], dict] | None = None) -> dict[str, dict]:
    """``warmup`` untimed steps of every runner, then ``repeats`` rounds in which every runner
    takes one timed step (``common.timer(device)`` around the whole meta-step: the host clock
    on the CPU, CUDA events on a GPU) in turn, so that a machine whose load drifts slows every
    variant alike. Returns per runner its times and the last step's meta-gradient and query
    loss. ``probe`` runs after each round (the GEMM rates measured there: the floor's rate then
    comes from the same minutes as the steps, not from a moment before them); what it returns
    is kept per runner and round (``round_rates``)."""
    clock = timer(device)
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    res = {name: {"times": [], "round_rates": []} for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            def step(runner=runner, out=res[name]):
                out["grad"], out["loss"] = runner.step()
            res[name]["times"].append(clock(step))
        if probe is not None:
            measured = probe()
            for name in runners:
                res[name]["round_rates"].append(measured)
    return res


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def malloc_setting() -> str:
    """The ``malloc`` column: glibc's ``MALLOC_*`` tuning variables of this run, or "default".
    (Rows marked "retain" ran with a mallopt setting an earlier version applied: mmap threshold
    32 MiB, trim threshold 2 GiB.)"""
    env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    return " ".join(env) or "default"


def _reset_peak_rss() -> bool:
    """Resets this process's peak RSS to its current RSS (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    rss = _status_bytes("VmRSS")
    if rss is None:
        import psutil   # only off Linux
        rss = psutil.Process().memory_info().rss
    return rss


def _peak_rss() -> int:
    """Peak RSS of this process in bytes.

    On Linux, ``VmHWM``: the high-water mark of this process's own address space, which is what
    ``ru_maxrss`` reports for a process started fresh, except that ``ru_maxrss`` also keeps the
    RSS of the image that called ``exec`` (for a subprocess: the forked or vforked copy of the
    parent, the whole benchmark). Elsewhere, ``ru_maxrss`` itself."""
    peak = _status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024   # bytes on macOS, else KiB
    return peak


def measure_memory_here(w: Workload, variant: str) -> dict:
    """In a fresh process: the step's peak RSS above the RSS just before it.

    The variant first runs once at the tiny check size, so that the lazy imports and one-time
    initialisations of a first step are not counted; then the real workload is set up and the
    peak RSS is reset (where the OS allows; otherwise the tiny run's peak is below the step's)
    before the one measured step."""
    cw = check_workloads(w)[0]
    cs, cq = make_data(cw, model_config(cw).vocab_size)
    make_variant(variant, cw, initial_adapters(cw), cs, cq).step()
    adapters = initial_adapters(w)
    support, query = make_data(w, model_config(w).vocab_size)
    runner = make_variant(variant, w, adapters, support, query)
    gc.collect()
    before = _rss()
    _reset_peak_rss()
    runner.step()
    peak = _peak_rss()
    return {"variant": variant, "peak_rss_mb": (peak - before) / 2 ** 20,
            "base_rss_mb": before / 2 ** 20}


def measure_memory(w: Workload, variants: list[str], runs: int = 1) -> dict[str, dict]:
    """CPU: runs this module (``measure_memory_here``) in ``runs`` fresh processes per variant; the median of each figure (a step's peak RSS moves by some 10% between
    processes: where glibc's heap happens to lie)."""
    def one(variant):
        cmd = [sys.executable, "-m", "bench.measure", "--variant", variant,
               "--threads", str(torch.get_num_threads()), *w.cli_args()]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        lines = [l for l in r.stdout.splitlines() if l.startswith(MEMORY_MARK)]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"memory measurement of {variant} failed ({' '.join(cmd)}):\n"
                               f"{r.stderr[-3000:]}")
        return variant, json.loads(lines[-1][len(MEMORY_MARK):])
    with ThreadPoolExecutor(MEMORY_JOBS) as pool:
        got = list(pool.map(one, [v for v in variants for _ in range(runs)]))
    out = {}
    for v in variants:
        mine = [m for name, m in got if name == v]
        out[v] = {k: statistics.median(m[k] for m in mine) for k in ("peak_rss_mb", "base_rss_mb")}
        out[v]["rss_runs"] = len(mine)
    return out


def cuda_allocated() -> int:
    """Bytes the CUDA caching allocator has handed out now, after the queued work is done."""
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def cuda_step_memory(runner) -> float:
    """MB a GPU step allocates at its peak above what was allocated before it (the models,
    adapters and data of every variant built): ``torch.cuda.max_memory_allocated``, reset just
    before the step. The runner has taken its warm-up and timed steps, so that the compiled
    kernels and cuBLAS's workspace are not counted."""
    gc.collect()
    before = cuda_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The peak RSS of one variant's step in this fresh "
                                            "process (bench/meta_step.py starts it)")
    p.add_argument("--variant", required=True, choices=VARIANT_CHOICES)
    p.add_argument("--threads", type=int, required=True)
    add_workload_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = resolve_workload(args)
    if w.device != "cpu":
        raise SystemExit("the peak RSS is a CPU measurement; a GPU step's memory is measured "
                         "in the benchmark's own process")
    print(MEMORY_MARK + json.dumps(measure_memory_here(w, args.variant)))


if __name__ == "__main__":
    main()
