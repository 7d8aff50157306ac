"""What one metakernels meta-step spends its time on, on the CPU: the diagnostic modes behind the
numbers ``bench/meta_step.py`` reports. Each builds the workload of the same flags (``--preset``,
``--quick``, ``--dtype``, ``--model``, the workload overrides; ``bench/workloads.py``), checks the variant
against naive-peft, times ``--repeats`` steps of it after ``--warmup`` (the median the modes
compare with) and measures the FLOP floor as meta_step.py does, then:

    --profile     the top ops by self CPU time of one step (``torch.profiler``), and the step's
                  frozen-base oneDNN GEMMs replayed alone, back to back: what the step would
                  take if everything else cost nothing, against the floor
    --breakdown   the wall time per step inside each of the library's ops, by the names they
                  carry in the profiler (``metakernels::<op>.forward``/``.backward``: frozen
                  GEMMs, LoRA projections, attention, SwiGLU, loss, rotary, RMSNorm, the rest),
                  and the step on one thread against all of them (Amdahl's serial part)
    --ablate      the step with each non-GEMM kernel removed from the model's modules and with
                  all of them removed (wrong results: timing only), in alternating rounds
    --contention  the meta-batch's per-thread shares alone and at once, one thread each: what
                  the cores cost each other

Commands::

    python bench/diagnose.py --preset fewshot --profile   # metakernels-cpu by default
    python bench/diagnose.py --preset large --variant metakernels-cpu --variant metakernels-torch --profile
    python bench/diagnose.py --preset fewshot --breakdown
    python bench/diagnose.py --preset fewshot --ablate
    python bench/diagnose.py --preset fewshot --contention --repeats 7
    python bench/diagnose.py --preset fewshot --dtype bfloat16 --breakdown --ablate
    python bench/diagnose.py --model DIR --dtype bfloat16 --profile --breakdown

Nothing is written to the results CSV: the modes print what they find.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a script: the checkout's bench/ package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import dataclasses
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn as nn

from metakernels.gemm import frozen_linear, onednn_available, onednn_linear
from metakernels.lora import MultiLoraLinear

from bench.common import DTYPES, machine_name, quantiles, settle_run_args
from bench.measure import flop_floor, floor_rates, time_variants
from bench.variants import VARIANT_CHOICES, can_run, check_variants, make_variant, select_variants
from bench.workloads import (Workload, add_workload_args, initial_adapters, make_data,
                             model_config, resolve_workload)


def profile_step(runner, name: str, rows: int = 20) -> dict | None:
    """Prints the top ops of one step of ``runner``; returns its GEMM replay (``replay_gemms``)."""
    from torch.profiler import ProfilerActivity, profile
    runner.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        runner.step()
    print(f"\nprofile of one {name} meta-step: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return replay_gemms(runner.model, prof.events())


# The step's ops as the library names them in the profiler (``metakernels::<op>.forward`` and
# ``.backward`` inside each autograd function), with what they compute, for --breakdown
OP_LABELS = {
    "frozen_linear": "frozen-base GEMMs (frozen_linear)",
    "multi_lora_linear": "LoRA projections with their base GEMMs",
    "attention": "attention kernel",
    "swiglu": "SwiGLU",
    "segment_cross_entropy": "loss (segment_cross_entropy)",
    "rotary": "rotary",
    "rms_norm": "RMSNorm",
    "fused_update": "inner update (fused_update)",
    "meta_reduce": "meta-gradient reduction (meta_reduce)",
}
OP_PREFIX = "metakernels::"


def op_times(events) -> dict[str, list[float]]:
    """Seconds inside each library op of a profile's ``events``, by op name: [forward,
    backward], from the ``metakernels::<op>.forward|backward`` ranges (wall time of the range,
    children included); a range inside another library op's range is counted in the outer one
    only."""
    out: dict[str, list[float]] = {}
    for e in events:
        if not e.name.startswith(OP_PREFIX):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(OP_PREFIX):
            parent = parent.cpu_parent
        if parent is not None:
            continue
        op, _, phase = e.name[len(OP_PREFIX):].rpartition(".")
        if phase not in ("forward", "backward"):
            continue
        out.setdefault(op, [0.0, 0.0])[phase == "backward"] += e.cpu_time_total / 1e6
    return out


def breakdown_step(runner, name: str, repeats: int) -> None:
    """Prints the wall time per step inside each library op of ``runner``'s step (forward and
    backward, from ``repeats`` profiled steps: the profiler's own cost is in the step's time),
    and the step on one thread against the current number, alternating (``repeats`` pairs)."""
    from torch.profiler import ProfilerActivity, profile
    runner.step()
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t0)
    totals = op_times(prof.events())
    step = sum(times) / repeats
    print(f"\n{name}: wall time per step inside the library's ops (mean of {repeats} profiled "
          f"steps of {step:.3f} s; forward + backward)")
    ops = [op for op in OP_LABELS if op in totals] + sorted(set(totals) - set(OP_LABELS))
    rows = [(OP_LABELS.get(op, op), sum(totals[op]) / repeats) for op in ops]
    rows.append(("everything else", step - sum(t for _, t in rows)))
    for label, t in rows:
        print(f"  {label:<42} {1e3 * t:8.1f} ms  {100 * t / step:5.1f}%")
    n = torch.get_num_threads()
    if n > 1:
        one, many = [], []
        for i in range(repeats):
            for k in ((1, n) if i % 2 == 0 else (n, 1)):
                torch.set_num_threads(k)
                t0 = time.perf_counter()
                runner.step()
                (one if k == 1 else many).append(time.perf_counter() - t0)
        torch.set_num_threads(n)
        t1, tn = statistics.median(one), statistics.median(many)
        serial = (n * tn - t1) / (n - 1)
        print(f"  1 thread {t1:.3f} s, {n} threads {tn:.3f} s (medians of {repeats} alternating "
              f"pairs, {tn / t1:.3f}x): Amdahl's serial part at most {serial:.3f} s")


# --ablate: the step's non-GEMM kernels, each replaced on the model's own modules by what costs
# nothing (a view of an input, the incoming gradient passed on; the LoRA layers: their base GEMM
# alone). The steps' results are then wrong: timing only. Each ablation is a context manager
# over the model; one that changes nothing in the step is an error (the model no longer calls
# what it replaces).
class _PassFirst(torch.autograd.Function):
    """Returns its first input; passes the gradient to every input of the first's shape, and a
    slice of it to smaller ones (the key and value heads of grouped-query attention)."""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.shapes = [o.shape for o in others]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, d):
        return (d, *(d[tuple(slice(0, n) for n in shape)] for shape in ctx.shapes))


@contextlib.contextmanager
def _instance_forwards(modules: dict[nn.Module, Callable]):
    """Each module's ``forward`` replaced by its function inside the block."""
    saved = {m: m.__dict__.get("forward") for m in modules}
    for m, fn in modules.items():
        m.forward = fn
    try:
        yield
    finally:
        for m, fwd in saved.items():
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd


class _Anchor(torch.autograd.Function):
    """Returns its first input; the second, a scalar that requires grad, gets none: it keeps
    the graph of a step whose adapters are all removed (the input gradients still flow)."""

    @staticmethod
    def forward(ctx, y, anchor):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, d):
        return d, None


def _ablate_lora(model):
    anchor = torch.zeros((), requires_grad=True)

    def base_only(x, m):
        return _Anchor.apply(frozen_linear(x, m.weight, m.base.bias), anchor)
    return _instance_forwards({m: (lambda x, m=m: base_only(x, m)) for m in model.modules()
                               if isinstance(m, MultiLoraLinear)})


def _ablate_swiglu(model):
    def mlp(x, m):
        return m.down_proj(_PassFirst.apply(m.gate_proj(x), m.up_proj(x)))
    return _instance_forwards({m: (lambda x, m=m: mlp(x, m)) for m in model.modules()
                               if all(hasattr(m, a) for a in ("gate_proj", "up_proj",
                                                              "down_proj"))})


def _ablate_rms_norm(model):
    return _instance_forwards({m: (lambda x: _PassFirst.apply(x)) for m in model.modules()
                               if type(m).__name__.endswith("RMSNorm")})


@contextlib.contextmanager
def _ablate_attention(model):
    """The model's attention function (``transformers``' ``ALL_ATTENTION_FUNCTIONS`` entry of
    its ``_attn_implementation``) replaced by a stub that returns the queries."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def stub(module, query, key, value, attention_mask, *args, **kwargs):
        return _PassFirst.apply(query, key, value).transpose(1, 2), None
    key = model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[key] = stub
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS[key]


@contextlib.contextmanager
def _ablate_rotary(model):
    """The modeling files' ``apply_rotary_pos_emb`` replaced by q and k as they are."""
    mods = {sys.modules[type(m).__module__] for m in model.modules()
            if hasattr(sys.modules[type(m).__module__], "apply_rotary_pos_emb")}
    with contextlib.ExitStack() as stack:
        for mod in mods:
            stack.enter_context(patched(mod, "apply_rotary_pos_emb",
                                        lambda q, k, *a, **kw: (_PassFirst.apply(q),
                                                                _PassFirst.apply(k))))
        yield


ABLATIONS = {"LoRA products": _ablate_lora, "attention kernel": _ablate_attention,
             "SwiGLU": _ablate_swiglu, "RMSNorm": _ablate_rms_norm, "rotary": _ablate_rotary}


@contextlib.contextmanager
def patched(obj, name: str, value):
    """``obj.name = value`` inside the block."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def _ablated(model, labels):
    """Inside the block, the ABLATIONS of these labels are in place on ``model``."""
    with contextlib.ExitStack() as stack:
        for label in labels:
            stack.enter_context(ABLATIONS[label](model))
        yield


def ablate_step(runner, name: str, repeats: int, floor_s: float) -> None:
    """Prints the median step with each of the step's non-GEMM kernels removed (ABLATIONS), and
    with all of them removed, alternating over ``repeats`` rounds: what each costs in the step
    (its marginal cost, which moves cache misses onto the next op, so it can differ from its own
    time in --breakdown), and what the GEMMs, the loss and the rest of the step take alone.
    Exits if an ablation changes nothing, or if the step differs after them."""
    labels = list(ABLATIONS)
    modes = [("full step", ())] + [(f"without {lb}", (lb,)) for lb in labels] + [
        ("without all of them", tuple(labels))]
    before = runner.step()[0]
    times: dict[str, list[float]] = {m: [] for m, _ in modes}
    unchanged = []
    for m, ab in modes:                       # warm-up, and the ablated steps' results
        with _ablated(runner.model, ab):
            if ab and torch.equal(runner.step()[0], before):
                unchanged.append(m)
    if unchanged:
        raise SystemExit(f"{name}: {', '.join(unchanged)}: the meta-gradient did not change, so "
                         f"the model no longer runs what the ablation replaces; update "
                         f"bench/diagnose.py's ABLATIONS")
    for i in range(repeats):
        for m, ab in (modes if i % 2 == 0 else modes[::-1]):
            with _ablated(runner.model, ab):
                t0 = time.perf_counter()
                runner.step()
                times[m].append(time.perf_counter() - t0)
    if not torch.equal(runner.step()[0], before):
        raise SystemExit(f"{name}: the step differs after the ablations: one was not undone")
    full = statistics.median(times["full step"])
    print(f"\n{name}: the step without its non-GEMM kernels (wrong results: timing only), "
          f"medians of {repeats} alternating rounds; floor {floor_s:.3f} s")
    for m, _ in modes:
        t = statistics.median(times[m])
        print(f"  {m:<32} {t:7.3f} s  {1e3 * (t - full):+8.1f} ms  {t / floor_s:5.2f}x floor")
    print("  every ablation changed the meta-gradient; the step restored after them")


def _one_thread_each(fns: list[Callable[[], object]]) -> float:
    """Runs ``fns`` at the same time, each in a thread of its own with one intra-op thread (the
    setting is per thread); returns the wall time until the last one ends."""
    def body(fn):
        torch.set_num_threads(1)
        fn()
    with ThreadPoolExecutor(len(fns)) as pool:
        t0 = time.perf_counter()
        list(pool.map(body, fns))
        return time.perf_counter() - t0


def contention_step(w: Workload, name: str, repeats: int) -> None:
    """What the cores cost each other: the meta-batch split into n = ``torch.get_num_threads()``
    shares of T / n tasks (as n processes of torchrun split it; each share a runner with its own
    model, so that no module runs in two threads), timed in alternating rounds:

    - one share alone, on one thread (the other cores idle);
    - the n shares at once, one thread each (n Python threads; their Python code between the
      kernels takes turns on the GIL, their kernels do not);
    - the whole batch on n threads (the step as timed above).

    A share's step at once against alone is what sharing the L3 and memory bandwidth costs (with
    the GIL); the same for a square GEMM of the hidden size (the FLOP floor's rate) says what it
    costs work that stays in each core's cache."""
    n = torch.get_num_threads()
    if n < 2 or w.num_tasks % n:
        print(f"\n{name}: --contention needs 2 or more threads dividing T={w.num_tasks} "
              f"(threads: {n}); skipped")
        return
    share = dataclasses.replace(w, num_tasks=w.num_tasks // n)
    runners = []
    for i in range(n):
        sw = dataclasses.replace(share, seed=w.seed + i)
        sup, qry = make_data(sw, model_config(sw).vocab_size)
        runners.append(make_variant(name, sw, initial_adapters(sw), sup, qry))
    whole_sup, whole_qry = make_data(w, model_config(w).vocab_size)
    whole = make_variant(name, w, initial_adapters(w), whole_sup, whole_qry)
    h = model_config(w).hidden_size
    a, b = (torch.randn(h, h, dtype=DTYPES[w.dtype]) for _ in range(2))
    gemm_reps = max(1, int(2e9 / (2 * h ** 3)))   # about 2 GFLOP per thread

    gemm = onednn_linear if onednn_available() else (lambda x, y: x @ y.T)

    def gemms():
        for _ in range(gemm_reps):
            gemm(a, b)
    modes = {"alone": lambda: _one_thread_each([runners[0].step]),
             "at once": lambda: _one_thread_each([r.step for r in runners]),
             "whole": lambda: _timed(whole.step, n),
             "gemm alone": lambda: _one_thread_each([gemms]),
             "gemm at once": lambda: _one_thread_each([gemms] * n)}
    for f in modes.values():   # warm-up
        f()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(repeats):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for m in order:
            times[m].append(modes[m]())
    torch.set_num_threads(n)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"\n{name}: the meta-batch in {n} shares of {share.num_tasks} tasks, one thread each "
          f"(medians of {repeats} alternating rounds)")
    print(f"  one share alone                  {med['alone']:7.3f} s")
    print(f"  the {n} shares at once             {med['at once']:7.3f} s  "
          f"{med['at once'] / med['alone']:5.3f}x alone")
    print(f"  the whole batch on {n} threads     {med['whole']:7.3f} s  "
          f"{med['whole'] / med['alone']:5.3f}x one share alone")
    print(f"  {h}x{h} GEMMs at once against alone              "
          f"{med['gemm at once'] / med['gemm alone']:5.3f}x")


def _timed(fn: Callable[[], object], threads: int) -> float:
    torch.set_num_threads(threads)   # MKL's setting is process-wide: the shares' threads set 1
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


ONEDNN_LINEAR = "mkldnn::_linear_pointwise"
REPLAY_RING = 8     # distinct inputs per input shape: the replay reads its inputs from memory


def replay_gemms(model: nn.Module, events, repeats: int = 5) -> dict | None:
    """The frozen base's oneDNN GEMMs of a profiled step alone, in the step's order, back to
    back: what the step would take if everything but these GEMMs cost nothing (the practical
    limit of the step on this machine, against the FLOP floor's square-GEMM rate).

    Each call gets the model's weight of its shape (plain, or transposed for an input gradient),
    in turn over the layers, and one of ``REPLAY_RING`` random inputs of its shape. None when
    the step ran no oneDNN GEMM (the torch backend, ``-blas``)."""
    calls = [tuple(tuple(s) for s in e.input_shapes[:2]) for e in events
             if e.name == ONEDNN_LINEAR]
    if not calls:
        return None
    weights: dict[tuple, list[torch.Tensor]] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            W = m.weight.detach()
            weights.setdefault(tuple(W.shape), []).append(W)
            weights.setdefault(tuple(W.t().shape), []).append(W.t())
    inputs: dict[tuple, list[torch.Tensor]] = {}
    plan, used, flops = [], {}, 0
    for x_shape, w_shape in calls:
        ws = weights.get(w_shape)
        if ws is None:
            raise RuntimeError(f"a oneDNN GEMM of the step has weight shape {w_shape}, which no "
                               f"linear layer of the model has")
        ring = inputs.setdefault(x_shape, [])
        i = used.get(x_shape, 0)
        used[x_shape] = i + 1
        if len(ring) < REPLAY_RING:
            ring.append(torch.randn(x_shape, dtype=ws[0].dtype))
        plan.append((ring[i % len(ring)], ws[i % len(ws)]))
        flops += 2 * math.prod(x_shape) * w_shape[0]
    def run():
        for x, W in plan:
            onednn_linear(x, W)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"calls": len(plan), "flops": flops, "median_s": med}




# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------
def diagnose(w: Workload, name: str, args) -> None:
    """The variant's step timed (``args.repeats`` after ``args.warmup``), then each mode asked
    for, in the order of the module docstring."""
    adapters = initial_adapters(w)
    support, query = make_data(w, model_config(w).vocab_size)
    runner = make_variant(name, w, adapters, support, query)
    times = time_variants({name: runner}, args.warmup, args.repeats)[name]["times"]
    step = quantiles(times)[0]
    rates = floor_rates(w)
    floor_s = flop_floor(w, adapters, support, query) / max(rates.values())
    print(f"\n== {name}, {w.preset}: {w.describe_model()} {w.dtype}, T={w.num_tasks} support "
          f"{w.describe_sizes()}, L={w.seq_len}, K={w.inner_steps}: median step {step:.3f} s "
          f"of {args.repeats}, FLOP floor {floor_s:.3f} s ({step / floor_s:.2f}x)")
    if args.profile:
        rep = profile_step(runner, name)
        if rep is None:
            print(f"{name}: no oneDNN GEMM in the step, nothing to replay")
        else:
            print(f"{name}: its {rep['calls']} frozen-base GEMMs alone, replayed back to back "
                  f"({rep['flops'] / 1e9:.0f} GFLOP): {rep['median_s']:.3f} s, "
                  f"{rep['flops'] / rep['median_s'] / 1e9:.0f} GFLOP/s, "
                  f"{rep['median_s'] / floor_s:.2f}x the floor; the step's median {step:.3f} s "
                  f"leaves {step - rep['median_s']:.3f} s to the rest")
    if args.breakdown:
        breakdown_step(runner, name, args.repeats)
    if args.ablate:
        ablate_step(runner, name, args.repeats, floor_s)
    del runner
    if args.contention:
        contention_step(w, name, args.repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, device=False)
    p.add_argument("--variant", action="append",
                   choices=[v for v in VARIANT_CHOICES if v.startswith("metakernels-")
                            and v != "metakernels-triton"],
                   help="the metakernels variant to diagnose (repeatable; default "
                        "metakernels-cpu, or metakernels-torch without the C++ extension)")
    p.add_argument("--profile", action="store_true", help="top ops and the GEMM replay")
    p.add_argument("--breakdown", action="store_true",
                   help="time inside each of the library's ops; one thread against all")
    p.add_argument("--ablate", action="store_true",
                   help="the step without each non-GEMM kernel (timing only)")
    p.add_argument("--contention", action="store_true",
                   help="the per-thread shares of the meta-batch alone and at once")
    p.add_argument("--warmup", type=int, help="untimed steps (default 1)")
    p.add_argument("--repeats", type=int,
                   help="timed steps, and rounds of each mode (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's choice; 1 with --quick)")
    args = p.parse_args(argv)
    if not (args.profile or args.breakdown or args.ablate or args.contention):
        p.error("choose at least one of --profile, --breakdown, --ablate, --contention "
                "(bench/meta_step.py compares the variants)")
    settle_run_args(p, args, warmup=(1, 1), repeats=(5, 1))
    w = resolve_workload(args)
    asked = args.variant or ["metakernels-cpu" if can_run("metakernels-cpu", "cpu")
                             else "metakernels-torch"]
    variants = select_variants(asked, "cpu")
    print(f"{machine_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{w.dtype}; diagnosing {', '.join(variants)}")
    check_variants(w, variants)
    for name in variants:
        diagnose(w, name, args)


if __name__ == "__main__":
    main()
