"""Smoke test of the benchmark scripts: in quick mode they run, exit 0 and write well-formed CSVs
that ``bench/plot.py`` draws (old rows and new); the diagnostic modes print what they measure;
the GPU paths refuse to run without a GPU, and ``bench/gpu_check.sh`` without one runs what it
can and exits 0. Timings are never asserted; the meta-gradient errors are (every variant is
checked against the per-task PEFT loop before it is timed), and so is what the FLOP floor is
made of."""
import csv
import dataclasses
import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metakernels import backend
from metakernels.gemm import gemm_library

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

META_STEP_COLUMNS = [
    "timestamp", "git_rev", "machine", "cores", "threads", "torch", "load1", "malloc", "preset",
    "variant", "backend", "model", "targets", "rank", "num_tasks", "support_sizes", "query_rows", "seq_len",
    "inner_steps", "tokens_per_step", "warmup", "repeats", "median_s", "p20_s", "p80_s",
    "tokens_per_s", "ratio_naive_peft", "floor_s", "ratio_floor", "ratio_floor_paired",
    "gemm_gflops", "peak_rss_mb", "base_rss_mb", "rss_runs", "rel_err_vs_naive_peft", "dtype",
    "device", "floor_gemm"]
META_STEP_POSITIVE = ["cores", "threads", "rank", "num_tasks", "query_rows", "seq_len",
                      "inner_steps", "tokens_per_step", "repeats", "median_s", "p20_s", "p80_s",
                      "tokens_per_s", "ratio_naive_peft", "floor_s", "ratio_floor",
                      "ratio_floor_paired", "gemm_gflops", "peak_rss_mb", "base_rss_mb", "rss_runs"]
OPS_COLUMNS = ["timestamp", "git_rev", "machine", "cores", "threads", "torch", "load1", "op",
               "config", "provider", "backend", "mode", "median_ms", "p20_ms", "p80_ms", "metric",
               "throughput", "speedup_vs_reference", "device", "dtype"]
OPS_POSITIVE = ["cores", "threads", "median_ms", "p20_ms", "p80_ms", "throughput",
                "speedup_vs_reference"]
BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])
BF16_RTOL = 4 * 2.0 ** -8   # 4u, u = bf16's unit roundoff (bench/variants.py, CHECK_RTOL)


def run_script(script, *args, timeout=900, returncode=0):
    env = dict(os.environ)
    env.pop("METAKERNELS_BACKEND", None)   # the scripts choose every backend themselves
    r = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == returncode, (
        f"{script} {' '.join(map(str, args))} exited {r.returncode}\n"
        f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}")
    return r


def bench_module(name):
    """``bench.<name>``, the package of this checkout. (``bench/ops.py`` imports its sibling
    ``common`` by the script's own directory, which is on the path while it is imported.)"""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(str(BENCH))


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def assert_positive(row, columns):
    for c in columns:
        v = float(row[c])
        assert math.isfinite(v) and v > 0, f"column {c} of {row} is {row[c]!r}"


@pytest.fixture(scope="module")
def meta_step_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "meta_step.csv"
    run_script("meta_step.py", "--quick", "--csv", path)
    return path


@pytest.fixture(scope="module")
def ops_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "ops.csv"
    run_script("ops.py", "--quick", "--csv", path)
    return path


def test_meta_step_quick_writes_one_row_per_variant(meta_step_csv):
    columns, rows = read_csv(meta_step_csv)
    assert columns == META_STEP_COLUMNS
    variants = [r["variant"] for r in rows]
    want = {"naive-peft", "naive-full", "vmap"} | {f"metakernels-{b}" for b in BACKENDS}
    assert sorted(variants) == sorted(want)
    for r in rows:
        assert_positive(r, META_STEP_POSITIVE)
        assert float(r["p20_s"]) <= float(r["median_s"]) <= float(r["p80_s"])
        assert r["backend"] == (r["variant"].split("-", 1)[1] if r["variant"].startswith(
            "metakernels-") else "torch")
        assert (r["dtype"], r["device"]) == ("float32", "cpu")
        assert r["floor_gemm"] in ("blas float32", "onednn float32")
        if r["variant"] == "naive-peft":
            assert float(r["ratio_naive_peft"]) == 1.0
        if r["variant"] == "naive-full":   # full-parameter: no LoRA meta-gradient to compare
            assert r["rel_err_vs_naive_peft"] == ""
        else:
            assert float(r["rel_err_vs_naive_peft"]) < 1e-4
    assert len({(r["timestamp"], r["git_rev"], r["model"], r["num_tasks"]) for r in rows}) == 1
    if not any(k.startswith("MALLOC_") for k in os.environ):
        assert {r["malloc"] for r in rows} == {"default"}


def test_ops_quick_writes_every_op_provider_and_mode(ops_csv):
    columns, rows = read_csv(ops_csv)
    assert columns == OPS_COLUMNS
    keys = [(r["op"], r["config"], r["provider"], r["mode"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["op"] for r in rows} == {"multi_lora_linear", "segment_cross_entropy",
                                       "attention", "rms_norm", "swiglu", "rotary",
                                       "fused_update", "meta_reduce"}
    providers = {"reference", *BACKENDS}
    if "cpu" in BACKENDS and gemm_library() == "onednn":
        providers.add("cpu-blas")
    for op, config in {(r["op"], r["config"]) for r in rows}:
        modes = {r["mode"] for r in rows if (r["op"], r["config"]) == (op, config)}
        want_modes = {"forward"} if op in ("fused_update", "meta_reduce") else {
            "forward", "backward", "full"}
        assert modes == want_modes, (op, config)
        for mode in modes:
            got = {r["provider"] for r in rows if (r["op"], r["config"], r["mode"]) ==
                   (op, config, mode)}
            assert got == providers, (op, config, mode)
    for r in rows:
        assert_positive(r, OPS_POSITIVE)
        assert (r["device"], r["dtype"]) == ("cpu", "float32")
        assert r["metric"] in ("GFLOP/s", "GB/s")
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])


def test_ops_bf16_cases_keep_the_bank_fp32_and_pass_their_check():
    """What ``bench/ops.py --device cuda`` adds in bf16, run on the CPU with the torch backend:
    the activations and frozen weights in bf16, the adapters and losses fp32, and each provider
    within the bf16 check of the reference."""
    import torch
    ops = bench_module("ops")
    assert ops.dtypes("rms_norm", "cpu") == [torch.float32]
    assert ops.dtypes("fused_update", "cuda") == [torch.float32]
    assert ops.dtypes("multi_lora_linear", "cuda") == [torch.float32, torch.bfloat16]
    args = dataclasses.make_dataclass("Args", ["warmup", "repeats", "device"])(0, 1, "cpu")
    for op in ops.BF16_OPS:
        for case in ops.cases(op, quick=True):
            case = ops.to_device(case, "cpu", torch.bfloat16)
            for name in getattr(case, "fp32", ()):
                assert getattr(case, name).dtype == torch.float32, (op, name)
            rows = ops.bench_case(case, ["reference", "torch"], args, {})
            assert {r["dtype"] for r in rows} == {"bfloat16"}


def test_plot_draws_both_csvs(meta_step_csv, ops_csv, tmp_path):
    run_script("plot.py", "--meta-step-csv", meta_step_csv, "--ops-csv", ops_csv,
               "--out-dir", tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert sum(n.startswith("meta_step_") for n in pngs) == 1
    assert {f"ops_{op}.png" for op in ("multi_lora_linear", "segment_cross_entropy", "rms_norm",
                                       "swiglu", "rotary", "fused_update",
                                       "meta_reduce")} <= set(pngs)
    for n in pngs:
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ extension")
def test_meta_step_extra_variants_match_naive_peft(tmp_path):
    """The variants that switch an optimisation off (the layers' kernels; the fused layers and
    loss, through the step's ``loss_fn``; oneDNN's GEMMs) or on (naive-peft on oneDNN's GEMMs)
    compute the same meta-gradient as naive-peft. (Their memory is the median of two fresh
    processes each.)"""
    path = tmp_path / "extra.csv"
    extra = ["metakernels-cpu-blas", "metakernels-cpu-plain", "metakernels-cpu-torchlayers",
             "naive-peft-onednn"]
    run_script("meta_step.py", "--quick", "--csv", path, "--variant", "naive-peft",
               *[a for v in extra for a in ("--variant", v)], "--memory-runs", "2")
    columns, rows = read_csv(path)
    assert columns == META_STEP_COLUMNS
    assert sorted(r["variant"] for r in rows) == extra[:3] + ["naive-peft"] + extra[3:]
    for r in rows:
        assert_positive(r, META_STEP_POSITIVE)
        assert float(r["rel_err_vs_naive_peft"]) < 1e-4
        assert r["rss_runs"] == "2"


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_diagnose_ablate_removes_each_kernel_and_restores_the_step():
    """--ablate times the step with each non-GEMM kernel removed from the model's modules and
    with all removed: every ablation must change the meta-gradient (else it removed nothing, and
    the script exits), and the step must give its own meta-gradient again afterwards (the
    modules put back)."""
    r = run_script("diagnose.py", "--quick", "--variant", "metakernels-cpu", "--ablate",
                   "--threads", "1", "--repeats", "1")
    out = r.stdout
    modes = {}
    for line in out.splitlines():
        m = re.match(r"\s+(full step|without .+?)\s+([\d.]+) s\s+([-+][\d.]+) ms\s+([\d.]+)x floor$",
                     line)
        if m:
            modes[m.group(1)] = float(m.group(2))
    assert set(modes) == {"full step", "without LoRA products", "without attention kernel",
                          "without SwiGLU", "without RMSNorm", "without rotary",
                          "without all of them"}, out
    assert all(t > 0 for t in modes.values())
    assert "every ablation changed the meta-gradient; the step restored after them" in out


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_diagnose_breakdown_accounts_for_the_step():
    """--breakdown prints one line per library op the profiler saw in the step (by its
    ``metakernels::<op>`` name), each with a time that is not negative, "everything else"
    included (the ops' times do not add up to more than the step), and the one-thread against
    two-thread comparison."""
    diagnose = bench_module("diagnose")
    r = run_script("diagnose.py", "--quick", "--variant", "metakernels-cpu", "--breakdown",
                   "--threads", "2", "--repeats", "2")
    out = r.stdout
    assert "wall time per step inside the library's ops" in out
    lines = {}
    for line in out.splitlines():
        m = re.match(r"\s+(.+?)\s+(-?[\d.]+) ms\s+(-?[\d.]+)%$", line)
        if m:
            lines[m.group(1)] = float(m.group(2))
    # every op of a cpu step on the fused layers, and nothing the breakdown cannot name
    assert set(lines) == set(diagnose.OP_LABELS.values()) | {"everything else"}, lines
    assert all(v >= 0 for v in lines.values()), lines
    assert lines["LoRA projections with their base GEMMs"] > 0 and lines["attention kernel"] > 0
    assert re.search(r"1 thread [\d.]+ s, 2 threads [\d.]+ s .*serial part at most", out)


def test_op_times_sums_each_ops_outermost_ranges():
    """The breakdown's grouping of profiler ranges: forward and backward apart, by op name, a
    range nested in another library op's range counted once (in the outer op), other ranges
    ignored."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    diagnose = bench_module("diagnose")
    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("metakernels::rms_norm.forward"):
            x @ x
            with record_function("metakernels::swiglu.backward"):
                x @ x
        with record_function("metakernels::swiglu.backward"):
            x @ x
        with record_function("other::rotary.forward"):
            x @ x
    events = prof.events()
    got = diagnose.op_times(events)
    assert set(got) == {"rms_norm", "swiglu"}
    assert got["rms_norm"][1] == 0 and got["swiglu"][0] == 0
    outer = [e for e in events if e.name == "metakernels::rms_norm.forward"]
    swiglu = [e for e in events if e.name == "metakernels::swiglu.backward"]
    assert len(outer) == 1 and len(swiglu) == 2
    assert got["rms_norm"][0] == pytest.approx(outer[0].cpu_time_total / 1e6)
    top = [e for e in swiglu if e.cpu_parent is None or e.cpu_parent.name != outer[0].name]
    assert got["swiglu"][1] == pytest.approx(top[0].cpu_time_total / 1e6)


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_diagnose_contention_times_the_shares_alone_and_at_once():
    """--contention splits T=4 tasks into one share per thread (2 of 2 tasks) and prints each
    timing with a positive time and ratio; with T not a multiple of the threads it says why it
    does nothing instead."""
    r = run_script("diagnose.py", "--quick", "--variant", "metakernels-cpu", "--contention",
                   "--threads", "2", "--repeats", "1", "--num-tasks", "4")
    out = r.stdout
    assert "the meta-batch in 2 shares of 2 tasks, one thread each" in out
    alone = re.search(r"one share alone\s+([\d.]+) s", out)
    at_once = re.search(r"the 2 shares at once\s+([\d.]+) s\s+([\d.]+)x alone", out)
    whole = re.search(r"the whole batch on 2 threads\s+([\d.]+) s\s+([\d.]+)x", out)
    gemm = re.search(r"GEMMs at once against alone\s+([\d.]+)x", out)
    assert alone and at_once and whole and gemm, out
    values = [float(m.group(i)) for m in (alone, at_once, whole, gemm)
              for i in range(1, m.re.groups + 1)]
    assert all(v > 0 for v in values), out
    r = run_script("diagnose.py", "--quick", "--variant", "metakernels-cpu", "--contention",
                   "--threads", "2", "--repeats", "1")
    assert "--contention needs 2 or more threads dividing T=3" in r.stdout


def test_flop_floor_counts_what_the_step_needs():
    """The floor's FLOPs, by hand for a tiny Llama: every linear's forward and input gradient
    per token, but the output layer only on the labelled tokens and no input gradient for the
    first layer's q, k and v (they read the frozen embeddings); the LoRA and attention terms."""
    ws, ms = bench_module("workloads"), bench_module("measure")
    w = dataclasses.replace(ws.check_workloads(ws.Workload())[1], inner_steps=3)
    adapters = ws.initial_adapters(w)
    support, query = ws.make_data(w, w.vocab_size)
    d, inter, V, n_layers = w.hidden_size, w.intermediate_size, w.vocab_size, w.num_layers
    kv = d // w.num_heads * w.num_kv_heads
    layer = d * d + 2 * kv * d + d * d + 3 * d * inter        # q, k, v, o, gate, up, down
    first_qkv = d * d + 2 * kv * d
    lora = 6 * w.rank * ((d + d) + (d + kv) + (d + kv) + (d + d)) * n_layers
    want = 0.0
    for batch, times in ((support, w.inner_steps), (query, 1)):
        lens = batch.attention_mask.sum(1).double()
        tokens = float(lens.sum())
        labelled = float((batch.labels != ms.IGNORE_INDEX).sum())
        assert 0 < labelled < tokens
        attn = float((lens ** 2).sum()) * 6 * d * n_layers
        want += times * (tokens * (4 * n_layers * layer - 2 * first_qkv + lora)
                         + labelled * 4 * V * d + attn)
    assert ms.flop_floor(w, adapters, support, query) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# bf16, the CSV's new columns, the GPU paths without a GPU
# ---------------------------------------------------------------------------------------------
BF16_VARIANTS = ["naive-peft", "metakernels-torch"] + (
    ["metakernels-cpu"] if "cpu" in BACKENDS else [])


@pytest.fixture(scope="module")
def meta_step_bf16_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "meta_step_bf16.csv"
    run_script("meta_step.py", "--quick", "--dtype", "bfloat16", "--csv", path,
               *[a for v in BF16_VARIANTS for a in ("--variant", v)])
    return path


def quick_workload(*flags):
    workloads = bench_module("workloads")
    import argparse
    p = argparse.ArgumentParser()
    workloads.add_workload_args(p)
    return workloads.resolve_workload(p.parse_args(["--quick", *flags]))


def test_meta_step_bf16_quick_agrees_with_naive_peft_to_bf16_rounding(meta_step_bf16_csv):
    """Every variant on a bf16 base: one row each, in bf16 (the meta-gradients differ from
    naive-peft's by bf16 rounding, far more than fp32's ~1e-7, and less than the 4u the check
    allows), the floor from a bf16 GEMM."""
    columns, rows = read_csv(meta_step_bf16_csv)
    assert columns == META_STEP_COLUMNS
    assert sorted(r["variant"] for r in rows) == sorted(BF16_VARIANTS)
    for r in rows:
        assert_positive(r, META_STEP_POSITIVE)
        assert (r["dtype"], r["device"]) == ("bfloat16", "cpu")
        assert r["floor_gemm"].endswith(" bfloat16")
        if r["variant"] != "naive-peft":
            assert 1e-5 < float(r["rel_err_vs_naive_peft"]) < BF16_RTOL


def test_bf16_floor_is_the_steps_flops_at_the_best_bf16_gemm_rate(meta_step_bf16_csv,
                                                                  meta_step_csv):
    """The bf16 floor: the same FLOPs as fp32's (the work does not depend on the dtype), over
    the rate of a GEMM library that multiplies in bf16; every library timed computes the bf16
    product (so the rate is a bf16 GEMM's), oneDNN's among them where this CPU has bf16 support."""
    import torch
    workloads, common = bench_module("workloads"), bench_module("common")
    w = quick_workload("--dtype", "bfloat16")
    adapters = workloads.initial_adapters(w)
    support, query = workloads.make_data(w, w.vocab_size)
    flops = bench_module("measure").flop_floor(w, adapters, support, query)
    fns = common.gemm_functions(96, torch.bfloat16)
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert set(fns) == {"blas", "onednn"}
    for lib, f in fns.items():
        got = f()
        want = f.a.float() @ f.b.float().T
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, lib
        assert float((got.float() - want).norm() / want.norm()) < 2 * 2.0 ** -8, lib
    for path, dtype in ((meta_step_bf16_csv, "bfloat16"), (meta_step_csv, "float32")):
        _, rows = read_csv(path)
        for r in rows:
            assert r["dtype"] == dtype
            assert float(r["floor_s"]) * float(r["gemm_gflops"]) * 1e9 == pytest.approx(
                flops, rel=2e-5)
            lib, floor_dtype = r["floor_gemm"].split()
            assert floor_dtype == dtype and lib in fns
            assert float(r["ratio_floor"]) == pytest.approx(
                float(r["median_s"]) / float(r["floor_s"]), rel=2e-5)


def test_csv_of_the_earlier_columns_is_extended_and_plotted(meta_step_csv, meta_step_bf16_csv,
                                                            tmp_path):
    """A results file written before the dtype/device columns: appending new rows rewrites it
    with the new columns (empty in its old rows, every old value kept), and plot.py draws old
    and new rows (bf16 in a plot of its own); a file of other columns is refused."""
    common = bench_module("common")
    _, fp32_rows = read_csv(meta_step_csv)
    _, bf16_rows = read_csv(meta_step_bf16_csv)
    old_columns = META_STEP_COLUMNS[:META_STEP_COLUMNS.index("dtype")]
    path = tmp_path / "meta_step.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(fp32_rows)
    common.append_csv(path, META_STEP_COLUMNS, bf16_rows)
    columns, rows = read_csv(path)
    assert columns == META_STEP_COLUMNS
    assert len(rows) == len(fp32_rows) + len(bf16_rows)
    for got, want in zip(rows, fp32_rows):
        assert all(got[c] == want[c] for c in old_columns)
        assert (got["dtype"], got["device"], got["floor_gemm"]) == ("", "", "")
    assert rows[len(fp32_rows):] == bf16_rows
    run_script("plot.py", "--meta-step-csv", path, "--ops-csv", tmp_path / "none.csv",
               "--out-dir", tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("meta_step_*.png"))
    assert len(pngs) == 2 and sum(n.endswith("_bfloat16.png") for n in pngs) == 1, pngs
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="has columns"):
        common.append_csv(other, META_STEP_COLUMNS, bf16_rows)


def test_gpu_presets_and_variants():
    """The GPU presets are the 1B-class Llama they are documented as; on the CPU the GPU-only
    variant (triton) is never chosen, on a GPU the CPU-only ones are not."""
    workloads, variants = bench_module("workloads"), bench_module("variants")
    import argparse
    p = argparse.ArgumentParser()
    workloads.add_workload_args(p)
    w = workloads.resolve_workload(p.parse_args(["--preset", "gpu-fewshot"]))
    assert w.describe_model() == "llama d2048 l16 h32/8 ff8192 v32000"
    assert (w.num_tasks, w.support_sizes(), w.query_rows, w.seq_len, w.inner_steps, w.rank,
            w.targets) == (32, [2] * 32, 2, 64, 5, 16, "qkvo")
    large = workloads.resolve_workload(p.parse_args(["--preset", "gpu-large"]))
    assert large.describe_model() == w.describe_model()
    assert large.seq_len > w.seq_len and large.num_tasks < w.num_tasks
    assert "metakernels-triton" not in variants.select_variants(None, "cpu")
    assert not variants.can_run("metakernels-cpu", "cuda")
    assert not variants.can_run("naive-full", "cuda")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="tests the GPU's absence")
@pytest.mark.parametrize("script", ["meta_step.py", "ops.py"])
def test_device_cuda_without_a_gpu_exits_with_one_line(script):
    r = run_script(script, "--device", "cuda", "--quick", returncode=1)
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "--device cuda: no CUDA device here" in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="tests the GPU's absence")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    """bench/gpu_check.sh on a machine without a GPU: it says so, writes summary.md and exits
    0. The compile checks' pytest stage is skipped here (GPU_CHECK_SKIP_PYTEST=1: no pytest
    inside pytest), which the summary's table records."""
    env = dict(os.environ, GPU_CHECK_SKIP_PYTEST="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path / "out")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no GPU: torch.cuda.is_available() is False" in r.stdout
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "No GPU" in summary
    assert "| compile checks | skipped (GPU_CHECK_SKIP_PYTEST=1) | 0 |" in summary
    assert not (tmp_path / "out" / "meta_step.csv").exists()


@pytest.mark.parametrize("script,mode", [("meta_step.py", ()), ("diagnose.py", ("--profile",))])
def test_model_flag_without_a_checkpoint_exits_2_with_one_line(script, mode, tmp_path):
    r = run_script(script, "--quick", "--model", tmp_path, *mode, returncode=2)
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"error: --model {tmp_path}: no config.json there")


def test_meta_step_on_a_checkpoint_directory(tmp_path):
    """--model DIR: any Hugging Face directory (here a tiny Llama with grouped-query attention
    and tied embeddings, saved), the preset's task shapes over its weights, checked first on its
    architecture in 2 layers of random weights."""
    import torch
    from metakernels.models import tiny_config
    from transformers import AutoModelForCausalLM
    cfg = tiny_config("llama", vocab_size=211, hidden_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=2, intermediate_size=96)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    path = tmp_path / "m.csv"
    variants = ["naive-peft"] + [f"metakernels-{b}" for b in BACKENDS]
    r = run_script("meta_step.py", "--quick", "--model", tmp_path / "model", "--csv", path,
                   *[a for v in variants for a in ("--variant", v)])
    checks = re.findall(r"check .*? (\S+)\s+meta-gradient rel. error \S+ .*? ok", r.stdout)
    assert sorted(checks) == sorted(variants[1:] * 2), r.stdout
    _, rows = read_csv(path)
    assert sorted(r["variant"] for r in rows) == sorted(variants)
    for row in rows:
        assert row["model"] == str(tmp_path / "model")
        assert_positive(row, META_STEP_POSITIVE)
        if row["variant"] != "naive-peft":
            assert float(row["rel_err_vs_naive_peft"]) < 1e-4
    w = bench_module("workloads").check_workloads(
        bench_module("workloads").Workload(model=str(tmp_path / "model")))[0]
    model = bench_module("workloads").build_base(w)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 211
    assert model.lm_head.weight is model.model.embed_tokens.weight
