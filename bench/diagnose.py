"""What one metakernels meta-step spends its time on, on the CPU: the diagnostic modes behind the
numbers ``bench/meta_step.py`` reports. Each builds the workload of the same flags (``--preset``,
``--quick``, ``--dtype``, the workload overrides; ``bench/runner.py``), checks the variant
against naive-peft, times ``--repeats`` steps of it after ``--warmup`` (the median the modes
compare with) and measures the FLOP floor as meta_step.py does, then:

    --profile     the top ops by self CPU time of one step (``torch.profiler``), and the step's
                  frozen-base oneDNN GEMMs replayed alone, back to back: what the step would
                  take if everything else cost nothing, against the floor
    --breakdown   the wall time per step inside each kind of autograd function (frozen GEMMs,
                  LoRA projections, attention, SwiGLU, loss, rotary, RMSNorm, the rest), and
                  the step on one thread against all of them (Amdahl's serial part)
    --ablate      the step with each non-GEMM kernel removed and with all of them removed
                  (wrong results: timing only), in alternating rounds
    --contention  the meta-batch's per-thread shares alone and at once, one thread each: what
                  the cores cost each other

Commands::

    python bench/diagnose.py --preset fewshot --profile   # metakernels-cpu by default
    python bench/diagnose.py --preset large --variant metakernels-cpu --variant metakernels-torch --profile
    python bench/diagnose.py --preset fewshot --breakdown
    python bench/diagnose.py --preset fewshot --ablate
    python bench/diagnose.py --preset fewshot --contention --repeats 7
    python bench/diagnose.py --preset fewshot --dtype bfloat16 --breakdown --ablate

Nothing is written to the results CSV: the modes print what they find.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from common import DTYPES, machine_name, quantiles, settle_run_args

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from metakernels.gemm import onednn_available, onednn_linear  # noqa: E402
from runner import (VARIANT_CHOICES, Workload, add_workload_args, can_run,  # noqa: E402
                    check_variants, flop_floor, floor_rates, initial_adapters, make_data,
                    make_variant, model_config, patched, resolve_workload, select_variants,
                    time_variants)


def profile_step(runner, name: str, rows: int = 20) -> dict | None:
    """Prints the top ops of one step of ``runner``; returns its GEMM replay (``replay_gemms``)."""
    from torch.profiler import ProfilerActivity, profile
    runner.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        runner.step()
    print(f"\nprofile of one {name} meta-step: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return replay_gemms(runner.model, prof.events())


# The step's autograd functions by what they compute (module, class), for --breakdown
BREAKDOWN = [
    ("frozen-base GEMMs (frozen_linear)", "metakernels.gemm", "_FrozenLinearFn"),
    ("LoRA projections with their base GEMMs", "metakernels.ops.multi_lora_linear",
     "_MultiLoraLinearFn"),
    ("attention kernel", "metakernels.ops.attention", "_AttentionFn"),
    ("SwiGLU", "metakernels.ops.swiglu", "_SwiGLUFn"),
    ("loss (segment_cross_entropy)", "metakernels.ops.segment_cross_entropy",
     "_SegmentCrossEntropyFn"),
    ("rotary", "metakernels.ops.rotary", "_RotaryFn"),
    ("RMSNorm", "metakernels.ops.rms_norm", "_RMSNormFn"),
]


def _timed_functions(totals: dict[str, float]) -> contextlib.ExitStack:
    """Adds the wall time of every forward and backward of the BREAKDOWN functions to
    ``totals`` (by label) inside the block it returns."""
    with contextlib.ExitStack() as stack:   # undone here if a patch fails
        for label, mod, cls_name in BREAKDOWN:
            cls = getattr(sys.modules[mod], cls_name)
            for meth in ("forward", "backward"):
                f = cls.__dict__[meth]
                fn = f.__func__ if isinstance(f, staticmethod) else f

                def timed(*a, _fn=fn, _label=label):
                    t0 = time.perf_counter()
                    try:
                        return _fn(*a)
                    finally:
                        totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - t0
                stack.enter_context(patched(cls, meth, staticmethod(timed)))
        return stack.pop_all()


def breakdown_step(runner, name: str, repeats: int) -> None:
    """Prints the wall time per step inside each kind of autograd function of ``runner``'s step
    (``repeats`` steps) and the step on one thread against the current number, alternating
    (``repeats`` pairs)."""
    runner.step()
    totals: dict[str, float] = {}
    times = []
    with _timed_functions(totals):
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t0)
    step = sum(times) / repeats
    print(f"\n{name}: wall time per step inside its autograd functions (mean of {repeats} steps "
          f"of {step:.3f} s)")
    rows = [(label, totals.get(label, 0.0) / repeats) for label, _, _ in BREAKDOWN]
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


# --ablate: the step's non-GEMM kernels, each replaced by what costs nothing (a view of an input,
# the incoming gradient passed on; the LoRA layers: their base GEMMs alone). The steps' results
# are then wrong: timing only. (label, module, class, {attribute: replacement})
def _no_lora_fwd(x, W, b, A, B, layout, scale):
    return onednn_linear(x, W, b), x.new_empty(x.shape[0], A.shape[-1])


def _no_lora_bwd(dy, x, W, A, B, xa, layout, scale, dA, dB, need_dx):
    return onednn_linear(dy, W.t()) if need_dx else None


def _attention_stub_fwd(ctx, q, k, v, mask, causal, scale, name):
    ctx.kv_heads = k.shape[1]
    return q.view_as(q)


def _attention_stub_bwd(ctx, d):
    dkv = d[:, :ctx.kv_heads]          # [B, Hkv, L, D], as k and v
    return d, dkv, dkv, None, None, None, None


ABLATIONS = [
    ("LoRA products", "metakernels.ops.multi_lora_linear", None,
     {"_cpu_fwd": _no_lora_fwd, "_cpu_bwd": _no_lora_bwd}),
    ("attention kernel", "metakernels.ops.attention", "_AttentionFn",
     {"forward": staticmethod(_attention_stub_fwd), "backward": staticmethod(_attention_stub_bwd)}),
    ("SwiGLU", "metakernels.ops.swiglu", "_SwiGLUFn",
     {"forward": staticmethod(lambda ctx, gate, up: gate.view_as(gate)),
      "backward": staticmethod(lambda ctx, dy: (dy, dy))}),
    ("RMSNorm", "metakernels.ops.rms_norm", "_RMSNormFn",
     {"forward": staticmethod(lambda ctx, x, weight, eps: x.view_as(x)),
      "backward": staticmethod(lambda ctx, dy: (dy, None, None))}),
    ("rotary", "metakernels.ops.rotary", "_RotaryFn",
     {"forward": staticmethod(lambda ctx, q, k, cos, sin: (q.view_as(q), k.view_as(k))),
      "backward": staticmethod(lambda ctx, dq, dk: (dq, dk, None, None))}),
]


@contextlib.contextmanager
def _ablated(labels):
    """Inside the block, the ABLATIONS of these labels are in place."""
    with contextlib.ExitStack() as stack:
        for label, mod, cls_name, attrs in ABLATIONS:
            if label in labels:
                obj = sys.modules[mod] if cls_name is None else getattr(sys.modules[mod], cls_name)
                for attr, value in attrs.items():
                    stack.enter_context(patched(obj, attr, value))
        yield


def ablate_step(runner, name: str, repeats: int, floor_s: float) -> None:
    """Prints the median step with each of the step's non-GEMM kernels removed (ABLATIONS), and
    with all of them removed, alternating over ``repeats`` rounds: what each costs in the step
    (its marginal cost, which moves cache misses onto the next op, so it can differ from its own
    time in --breakdown), and what the GEMMs, the loss and the rest of the step take alone."""
    labels = [a[0] for a in ABLATIONS]
    modes = [("full step", ())] + [(f"without {lb}", (lb,)) for lb in labels] + [
        ("without all of them", tuple(labels))]
    before = runner.step()[0]
    times: dict[str, list[float]] = {m: [] for m, _ in modes}
    grads = {}
    for m, ab in modes:                       # warm-up, and the ablated steps' results
        with _ablated(ab):
            grads[m] = runner.step()[0]
    for i in range(repeats):
        for m, ab in (modes if i % 2 == 0 else modes[::-1]):
            with _ablated(ab):
                t0 = time.perf_counter()
                runner.step()
                times[m].append(time.perf_counter() - t0)
    after = runner.step()[0]
    full = statistics.median(times["full step"])
    print(f"\n{name}: the step without its non-GEMM kernels (wrong results: timing only), "
          f"medians of {repeats} alternating rounds; floor {floor_s:.3f} s")
    for m, _ in modes:
        t = statistics.median(times[m])
        print(f"  {m:<32} {t:7.3f} s  {1e3 * (t - full):+8.1f} ms  {t / floor_s:5.2f}x floor")
    changed = [m for m, ab in modes if ab and not torch.equal(grads[m], before)]
    print(f"  ablations took effect (meta-gradient changed): {len(changed)} of {len(modes) - 1}; "
          f"the step restored after them: {torch.equal(after, before)}")


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
                   help="time inside each kind of autograd function; one thread against all")
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
