#!/usr/bin/env bash
# The GPU checks of metakernels in one run, built to bring back numbers whatever fails: every
# benchmark variant in a process of its own, its CSV row appended as it finishes; every stage
# under `timeout`; the stages in order of what their numbers are worth, so that the budget cuts
# the least useful ones; summary.md written however the run ends.
#
#   bash bench/gpu_check.sh OUTDIR
#
# On a CUDA machine, within GPU_CHECK_BUDGET_S seconds (default 450, under 8 minutes of work: a
# GPU machine hired for a quarter of an hour also spends minutes starting and copying back):
#   install      `pip install --no-build-isolation --no-deps -e .` (--no-deps: the project pins
#                the CPU build of torch, which must not replace the CUDA torch found here; the C++
#                CPU extension is not built unless GPU_CHECK_BUILD_EXTENSION=1), then only the
#                dependencies that do not import. A failed pip step is reported, and fatal only
#                if metakernels does not import.
#   meta-step, preset gpu-fewshot, bf16: naive-peft, then metakernels-triton (the comparison
#                the check is for), one process each (bench/meta_step.py --variant V: each
#                checks its meta-gradient against naive-peft at a tiny size before it is timed)
#   nccl         with 2 GPUs or more: a 2-process torchrun FOMAML run on NCCL (2 meta-steps)
#                against the same run in one process; theta must agree (relative error < 1e-4)
#   pytest       tests/test_cuda.py on the GPU (the kernels compiled, not interpreted)
#   ops          every op at GPU shapes (bench/ops.py --device cuda)
#   meta-step, gpu-fewshot bf16: metakernels-torch, vmap; gpu-large bf16: naive-peft,
#                metakernels-triton; gpu-fewshot fp32: naive-peft, metakernels-triton
#   compile      tests/test_triton_compile.py (Triton compiles for sm_80/sm_90; needs no GPU and
#                runs in CI, so last here)
# Each stage has its own limit, a share of the budget (a hang guard), and never runs past what
# the budget leaves: a stage the budget stops, or one not started because under 20 s are left,
# is "cut", which is not a failure. Stopped by a signal (TERM, INT, HUP), the script stops the
# running stage, marks it interrupted and still writes summary.md. The "x naive-peft" column of
# summary.md divides the medians of two processes of this run; the meta-gradients of separate
# processes are not compared at the benchmark size (each variant's tiny-size check is its gate).
#
# Without a usable GPU: the compile checks alone, a line saying there is no GPU, summary.md.
#
# Exit status: 0 when every stage that ran passed (or was cut); 1 when a stage failed or ran past
# its own limit; 3 when nvidia-smi sees a GPU but torch does not (a CPU build of torch, or a
# driver mismatch), the compile checks run all the same; 2 for a wrong command line; 143 when
# stopped by a signal.
#
# Environment:
#   PYTHON                     the interpreter (default python3)
#   GPU_CHECK_BUDGET_S         seconds for the whole run (default 450)
#   GPU_CHECK_SKIP_PYTEST=1    skip the pytest stages (tests/test_bench.py runs this script
#                              without a GPU so; pytest is not run inside its own test)
#   GPU_CHECK_BUILD_EXTENSION=1  build the C++ CPU extension at install
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
case "${GPU_CHECK_BUDGET_S:-450}" in
    ''|*[!0-9]*)
        echo "error: GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S}: give a whole number of seconds" >&2
        exit 2 ;;
esac
cd "$(dirname "$0")/.."
if ! mkdir -p "$1"; then
    echo "error: OUTDIR $1 cannot be created: give a writable directory" >&2
    exit 2
fi
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
MIN_START=20          # seconds a stage needs to be worth starting
SUMMARY="$OUT/summary.md"
STAGES="$OUT/stages.tsv"
: > "$STAGES"
SECONDS=0
FAILED=0
HEADLINE="The run stopped before it could look for a GPU."
EXIT_STATUS=""        # set where the status differs from FAILED's (no GPU, torch blind to it)
STAGE=""              # the stage running, and its process (timeout's)
CHILD=""

# run_stage NAME SHARE COMMAND...: runs COMMAND under timeout, its own limit SHARE percent of
# the budget (a hang guard) or what the budget leaves, the smaller; its output in
# OUTDIR/NAME.log; records the status (ok, failed, timed out at its own limit: both failures;
# cut by the budget: not) and seconds. The stage runs in the background and the script waits
# for it, so that a signal to the script is handled at once (on_signal).
run_stage() {
    local name=$1 max=$(($2 * BUDGET / 100))
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$MIN_START" ]; then
        echo "== $name: cut, not started (${left} s left of the ${BUDGET} s budget)"
        printf '%s\tcut by the budget (not started, %s s left)\t0\n' "$name" "$left" >> "$STAGES"
        return 0
    fi
    local limit=$((max < left ? max : left))
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS status
    STAGE=$name
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    local rc=$?
    CHILD=""
    STAGE=""
    local dt=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        status=ok
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        if [ "$left" -le "$max" ]; then
            status="cut by the budget after ${dt} s"
            rc=0
        else
            status="timed out at its limit of ${limit} s"
        fi
    else
        status="failed (exit $rc)"
    fi
    [ $rc -eq 0 ] || { FAILED=1; tail -n 25 "$OUT/$name.log"; }
    echo "== $name: $status, ${dt} s"
    printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STAGES"
    return $rc
}

skip_stage() {   # skip_stage NAME WHY
    echo "== $1: skipped ($2)"
    printf '%s\tskipped (%s)\t0\n' "$1" "$2" >> "$STAGES"
}

write_summary() {
    {
        echo "# metakernels GPU check"
        echo
        echo "$HEADLINE"
        echo
        echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS} s of a ${BUDGET} s budget"
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
    except (TypeError, ValueError):
        return "-"
for key in dict.fromkeys((r["preset"], r["dtype"], r["model"]) for r in rows):
    grp = [r for r in rows if (r["preset"], r["dtype"], r["model"]) == key]
    g = grp[0]
    naive = [r for r in grp if r["variant"] == "naive-peft"]
    print(f"## meta-step {key[0]}, {key[1]}: {key[2]}, T={g['num_tasks']} x "
          f"{g['support_sizes'].split('x')[-1]} rows x {g['seq_len']} tokens, K={g['inner_steps']}"
          f" ({g['machine']}; floor {f(g['floor_s'], '.4f')} s at {g['floor_gemm']} "
          f"{f(g['gemm_gflops'], '.0f')} GFLOP/s)\n")
    print("| variant | median s | p20 | p80 | tokens/s | x naive-peft | x floor | step MB | "
          "base MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in grp:
        ratio = (float(r["median_s"]) / float(naive[-1]["median_s"])) if naive else None
        print(f"| {r['variant']} | {f(r['median_s'], '.4f')} | {f(r['p20_s'], '.4f')} | "
              f"{f(r['p80_s'], '.4f')} | {f(r['tokens_per_s'], '.0f')} | "
              f"{f(ratio, '.3f')} | {f(r['ratio_floor'], '.2f')} | "
              f"{f(r['peak_rss_mb'], '.0f')} | {f(r['base_rss_mb'], '.0f')} |")
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

finish() {   # on every exit: the summary, then the exit status
    local rc=$?
    write_summary
    if [ -n "$EXIT_STATUS" ]; then
        exit "$EXIT_STATUS"
    fi
    [ "$rc" -ne 0 ] && exit "$rc"
    exit "$FAILED"
}

on_signal() {   # stopped from outside (the device's own time limit): stop the stage, summarise
    trap - TERM INT HUP
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2> /dev/null   # timeout passes it on to the stage
    if [ -n "$STAGE" ]; then
        printf '%s\tinterrupted (the script was stopped)\t-\n' "$STAGE" >> "$STAGES"
    fi
    HEADLINE="The script was stopped from outside after ${SECONDS} s; the table says where."
    EXIT_STATUS=143
    exit 143
}
trap finish EXIT
trap on_signal TERM INT HUP

compile_checks() {   # the Triton compile tests, which need no GPU
    if [ "${GPU_CHECK_SKIP_PYTEST:-0}" = 1 ]; then
        echo "== compile checks: skipped (GPU_CHECK_SKIP_PYTEST=1)"
        printf 'compile checks\tskipped (GPU_CHECK_SKIP_PYTEST=1)\t0\n' >> "$STAGES"
        return 0
    fi
    if [ ! -f tests/test_triton_compile.py ]; then
        skip_stage compile_checks "no tests/test_triton_compile.py"
        return 0
    fi
    run_stage compile_checks 100 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_triton_compile.py
}

# ---- the environment ----------------------------------------------------------------------
if ! "$PY" -c "import torch" 2>/dev/null; then
    HEADLINE="torch does not import for $PY: nothing ran."
    echo "torch is not installed for $PY: install a build of torch first (with CUDA on a GPU" \
         "machine: pip install torch), then run this again"
    EXIT_STATUS=1
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
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available()
                                     else 0)" 2>/dev/null)
GPUS=${GPUS:-0}
if [ "$GPUS" -eq 0 ]; then
    why="torch.cuda.is_available() is False"
    if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
        why="$why, though nvidia-smi sees a GPU (a CPU build of torch, or a driver mismatch)"
        EXIT_STATUS=3
    fi
    echo "no GPU: $why; running the compile checks only"
    HEADLINE="No GPU: $why. The CUDA tests and the GPU benchmarks did not run; the Triton compile checks are in the table."
    compile_checks
    rc=$?
    [ -z "$EXIT_STATUS" ] && EXIT_STATUS=$rc
    echo "no GPU: the CUDA tests and the GPU benchmarks did not run"
    exit "$EXIT_STATUS"
fi
GPU_NAME="$(sed -n 's/^cuda:0 //p' "$OUT/environment.txt") ($GPUS GPU(s))"
HEADLINE="$GPU_NAME: the run stopped early; the table says where."

# ---- install ------------------------------------------------------------------------------
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

# ---- 2 processes on NCCL against 1 --------------------------------------------------------
nccl_step() {
    local run=(model.hidden_size=64 model.num_layers=2 model.intermediate_size=128
               meta.meta_batch_size=5 data.support_size=2 data.query_size=3
               meta.num_inner_steps=2 trainer.total_steps=2 trainer.save_every=2
               trainer.eval_every=0 trainer.progress_bar=false "trainer.loggers=[jsonl]"
               trainer.device=cuda trainer.backend=triton trainer.collective_timeout_s=60
               "trainer.output_dir=$OUT/nccl")
    env -u TRITON_INTERPRET "$PY" -m torch.distributed.run --nproc_per_node=2 \
        --master_addr=127.0.0.1 --master_port=$((20000 + RANDOM % 20000)) \
        -m metakernels.train "${run[@]}" trainer.experiment_name=two || return 1
    env -u TRITON_INTERPRET "$PY" -m metakernels.train "${run[@]}" trainer.experiment_name=one \
        || return 1
    "$PY" - "$OUT/nccl" <<'EOF'
import sys
from pathlib import Path
from metakernels.checkpoint import latest_checkpoint, load_checkpoint
runs = Path(sys.argv[1])
one, two = (load_checkpoint(latest_checkpoint(runs / n))[0]["theta"] for n in ("one", "two"))
err = float((two - one).norm() / one.norm())
print(f"theta, 2 processes on NCCL against 1 process: relative difference {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
EOF
}
export PY OUT
export -f install nccl_step
# timeout runs programs, not shell functions: a function runs in a bash of its own

bench() {   # bench NAME SHARE SCRIPT ARGS...
    local name=$1 max=$2 script=$3
    shift 3
    run_stage "$name" "$max" env -u TRITON_INTERPRET "$PY" "bench/$script" --device cuda "$@"
}
meta() {    # meta PRESET DTYPE VARIANT SHARE REPEATS: one variant, one process, one row
    bench "meta_$1_$2_$3" "$4" meta_step.py --preset "$1" --dtype "$2" --variant "$3" \
        --warmup 1 --repeats "$5" --csv "$OUT/meta_step.csv"
}

# The shares (percent of the budget) sum to more than 100: a stage that ends early leaves its
# time to the next ones, and the last ones are cut first.
run_stage install 20 bash -c install \
    || echo "metakernels does not import with what is installed: the next stages will fail"
meta gpu-fewshot bfloat16 naive-peft 17 5
meta gpu-fewshot bfloat16 metakernels-triton 17 5
if [ "$GPUS" -ge 2 ]; then
    run_stage nccl 20 bash -c nccl_step
else
    skip_stage nccl "one GPU: the 2-process NCCL step needs two"
fi
if [ "${GPU_CHECK_SKIP_PYTEST:-0}" = 1 ]; then
    skip_stage pytest "GPU_CHECK_SKIP_PYTEST=1"
elif [ -f tests/test_cuda.py ]; then
    # TRITON_INTERPRET=0: the kernels compiled for the GPU, not the interpreter the CPU tests use
    run_stage pytest 33 env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_cuda.py
else
    skip_stage pytest "no tests/test_cuda.py"
fi
bench ops 13 ops.py --warmup 3 --repeats 10 --csv "$OUT/ops.csv"
meta gpu-fewshot bfloat16 metakernels-torch 10 5
meta gpu-fewshot bfloat16 vmap 10 3
meta gpu-large bfloat16 naive-peft 13 3
meta gpu-large bfloat16 metakernels-triton 13 3
meta gpu-fewshot float32 naive-peft 10 3
meta gpu-fewshot float32 metakernels-triton 10 3
compile_checks

if [ "$FAILED" = 0 ]; then
    HEADLINE="$GPU_NAME: every stage that ran passed, ${SECONDS} s in all."
else
    HEADLINE="$GPU_NAME: some stages failed (see their logs), ${SECONDS} s in all."
fi
echo "gpu_check: ${SECONDS} s in all; logs, CSVs and summary.md in $OUT"
