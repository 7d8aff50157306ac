#!/usr/bin/env bash
# The GPU checks of metakernels in one run: install, the CUDA and Triton-compile tests, the op
# microbenchmarks and the meta-step comparison on the GPU; a CSV per benchmark and summary.md
# under OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR
#
# On a CUDA machine, each stage under `timeout`, its time printed, the whole within
# GPU_CHECK_BUDGET_S seconds (default 450: under 8 minutes on one H100/H200; a stage that would
# start with less than 30 s left is skipped and marked so):
#   1. install: `pip install --no-build-isolation --no-deps -e .` (--no-deps: the project pins
#      the CPU build of torch, which must not replace the CUDA torch found here; the C++ CPU
#      extension is not built unless GPU_CHECK_BUILD_EXTENSION=1, the GPU paths do not use it),
#      then only the dependencies that do not import, by name. The machine may have no
#      internet: a failed pip step is reported, and fatal only if metakernels does not import.
#   2. pytest tests/test_cuda.py tests/test_triton_compile.py
#   3. meta-step, preset gpu-fewshot, bf16: naive-peft, metakernels-triton, metakernels-torch,
#      vmap (bench/meta_step.py --device cuda)
#   4. ops, every op at GPU shapes (bench/ops.py --device cuda)
#   5. meta-step, preset gpu-large, bf16
#   6. meta-step, preset gpu-fewshot, fp32: naive-peft and metakernels-triton
# Exit status: 0 when every stage that ran passed, 1 otherwise.
#
# Without a usable GPU (no CUDA device, or a torch without CUDA): the compile checks alone
# (pytest tests/test_triton_compile.py: Triton compiles for sm_80/sm_90 without a GPU), a line
# saying there is no GPU, summary.md, and the compile checks' exit status (0 when they pass).
#
# Environment:
#   PYTHON                     the interpreter (default python3)
#   GPU_CHECK_BUDGET_S         seconds for the whole run on a GPU (default 450)
#   GPU_CHECK_SKIP_PYTEST=1    skip the pytest stages (tests/test_bench.py runs this script
#                              without a GPU so; pytest is not run inside its own test)
#   GPU_CHECK_BUILD_EXTENSION=1  build the C++ CPU extension at install
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SUMMARY="$OUT/summary.md"
STAGES="$OUT/stages.tsv"
: > "$STAGES"
SECONDS=0
FAILED=0

# run_stage NAME MAX_SECONDS COMMAND...: runs COMMAND under timeout (at most what the budget
# leaves), its output in OUTDIR/NAME.log; records status and seconds.
run_stage() {
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    local limit=$((max < left ? max : left))
    if [ "$limit" -lt 30 ]; then
        echo "== $name: skipped, ${left} s left of the ${BUDGET} s budget"
        printf '%s\tskipped (out of time)\t0\n' "$name" >> "$STAGES"
        return 0
    fi
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        status=ok
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="timed out after ${limit} s"
    else
        status="failed (exit $rc)"
    fi
    [ $rc -eq 0 ] || { FAILED=1; tail -n 25 "$OUT/$name.log"; }
    echo "== $name: $status, ${dt} s"
    printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STAGES"
    return $rc
}

write_summary() {   # write_summary HEADLINE
    {
        echo "# metakernels GPU check"
        echo
        echo "$1"
        echo
        echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo
        echo '```'
        cat "$OUT/environment.txt" 2>/dev/null
        echo '```'
        echo
        echo "| stage | status | seconds |"
        echo "| --- | --- | --- |"
        awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$STAGES"
        echo
        if [ -s "$OUT/meta_step.csv" ]; then
            "$PY" - "$OUT/meta_step.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
def f(v, spec):
    try:
        return format(float(v), spec)
    except ValueError:
        return "-"
for key in dict.fromkeys((r["preset"], r["dtype"], r["model"]) for r in rows):
    grp = [r for r in rows if (r["preset"], r["dtype"], r["model"]) == key]
    g = grp[0]
    print(f"## meta-step {key[0]}, {key[1]}: {key[2]}, T={g['num_tasks']} x "
          f"{g['support_sizes'].split('x')[-1]} rows x {g['seq_len']} tokens, K={g['inner_steps']}"
          f" ({g['machine']}; floor {f(g['floor_s'], '.4f')} s at {g['floor_gemm']} "
          f"{f(g['gemm_gflops'], '.0f')} GFLOP/s)\n")
    print("| variant | median s | p20 | p80 | tokens/s | x naive-peft | x floor | step MB | "
          "base MB | rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in grp:
        print(f"| {r['variant']} | {f(r['median_s'], '.4f')} | {f(r['p20_s'], '.4f')} | "
              f"{f(r['p80_s'], '.4f')} | {f(r['tokens_per_s'], '.0f')} | "
              f"{f(r['ratio_naive_peft'], '.3f')} | {f(r['ratio_floor'], '.2f')} | "
              f"{f(r['peak_rss_mb'], '.0f')} | {f(r['base_rss_mb'], '.0f')} | "
              f"{f(r['rel_err_vs_naive_peft'], '.1e')} |")
    print()
EOF
        fi
        if [ -s "$OUT/ops.csv" ]; then
            echo "## ops (rates per provider; $OUT/ops.csv has the times)"
            echo
            "$PY" - "$OUT/ops.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
print("| op | config | mode | provider | median ms | rate | x faster than ref |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['op']} | {r['config']} | {r['mode']} | {r['provider']} | "
          f"{float(r['median_ms']):.3f} | {float(r['throughput']):.1f} {r['metric']} | "
          f"{float(r['speedup_vs_reference']):.2f} |")
EOF
        fi
    } > "$SUMMARY"
    echo "wrote $SUMMARY"
}

compile_checks() {   # the Triton compile tests, which need no GPU
    if [ "${GPU_CHECK_SKIP_PYTEST:-0}" = 1 ]; then
        echo "== compile checks: skipped (GPU_CHECK_SKIP_PYTEST=1)"
        printf 'compile checks\tskipped (GPU_CHECK_SKIP_PYTEST=1)\t0\n' >> "$STAGES"
        return 0
    fi
    if [ ! -f tests/test_triton_compile.py ]; then
        echo "== compile checks: tests/test_triton_compile.py not found, skipped"
        printf 'compile checks\tskipped (no tests/test_triton_compile.py)\t0\n' >> "$STAGES"
        return 0
    fi
    run_stage compile_checks "$BUDGET" "$PY" -m pytest -q tests/test_triton_compile.py
}

# ---- the environment ----------------------------------------------------------------------
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "torch is not installed for $PY: install a build of torch first (with CUDA on a GPU" \
         "machine: pip install torch), then run this again"
    exit 1
fi
"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA build: "
      f"{torch.version.cuda or 'none'})")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF
cat "$OUT/environment.txt"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    why="torch.cuda.is_available() is False"
    if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
        why="$why, though nvidia-smi sees a GPU (a CPU build of torch, or a driver mismatch)"
    fi
    echo "no GPU: $why; running the compile checks only"
    compile_checks
    rc=$?
    write_summary "No GPU: $why. The CUDA tests and the GPU benchmarks did not run; the Triton compile checks are in the table."
    echo "no GPU: the CUDA tests and the GPU benchmarks did not run"
    exit $rc
fi

# ---- 1. install ---------------------------------------------------------------------------
install() {
    local ext=1
    [ "${GPU_CHECK_BUILD_EXTENSION:-0}" = 1 ] && ext=0
    METAKERNELS_NO_EXTENSION=$ext MAX_JOBS=$(nproc) \
        "$PY" -m pip install --quiet --no-build-isolation --no-deps -e . \
        || echo "pip install -e . failed (no internet, or no setuptools here?)"
    local missing
    missing=$("$PY" - <<'EOF'
import importlib.util
need = {"transformers": "transformers", "peft": "peft", "safetensors": "safetensors",
        "pyarrow": "pyarrow", "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib",
        "numpy": "numpy", "pytest": "pytest", "hypothesis": "hypothesis", "triton": "triton",
        "psutil": "psutil"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
    if [ -n "$missing" ]; then
        echo "installing what does not import: $missing"
        # shellcheck disable=SC2086
        "$PY" -m pip install --quiet $missing || echo "pip install $missing failed"
    fi
    "$PY" -c "import metakernels, transformers, peft, triton; print('metakernels', metakernels.__version__, 'imports')"
}
export PY
export -f install
# timeout runs programs, not shell functions: the function runs in a bash of its own
run_stage install 120 bash -c install || echo "metakernels does not import with what is installed: the next stages will fail"

# ---- 2. tests -----------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_PYTEST:-0}" = 1 ]; then
    printf 'pytest\tskipped (GPU_CHECK_SKIP_PYTEST=1)\t0\n' >> "$STAGES"
else
    tests=()
    for t in tests/test_cuda.py tests/test_triton_compile.py; do
        if [ -f "$t" ]; then tests+=("$t"); else echo "$t not found: not run"; fi
    done
    # TRITON_INTERPRET=0: the kernels compiled for the GPU, not the interpreter the CPU tests use
    [ ${#tests[@]} -gt 0 ] && run_stage pytest 150 env TRITON_INTERPRET=0 "$PY" -m pytest -q "${tests[@]}"
fi

# ---- 3-6. benchmarks ----------------------------------------------------------------------
bench() {   # bench NAME MAX_SECONDS SCRIPT ARGS...
    local name=$1 max=$2 script=$3
    shift 3
    run_stage "$name" "$max" env -u TRITON_INTERPRET "$PY" "bench/$script" --device cuda "$@"
}
bench meta_gpu_fewshot_bf16 150 meta_step.py --preset gpu-fewshot --dtype bfloat16 \
    --warmup 1 --repeats 5 --csv "$OUT/meta_step.csv"
bench ops 75 ops.py --warmup 3 --repeats 10 --csv "$OUT/ops.csv"
bench meta_gpu_large_bf16 100 meta_step.py --preset gpu-large --dtype bfloat16 \
    --warmup 1 --repeats 3 --csv "$OUT/meta_step.csv"
bench meta_gpu_fewshot_fp32 100 meta_step.py --preset gpu-fewshot --dtype float32 \
    --variant naive-peft --variant metakernels-triton --warmup 1 --repeats 3 \
    --csv "$OUT/meta_step.csv"

write_summary "$(sed -n 's/^cuda:0 //p' "$OUT/environment.txt"): $( [ $FAILED = 0 ] && echo 'every stage that ran passed' || echo 'some stages failed (see their logs)'), ${SECONDS} s in all."
echo "gpu_check: ${SECONDS} s in all; logs, CSVs and summary.md in $OUT"
exit $FAILED
