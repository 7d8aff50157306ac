"""``bench/gpu_check.sh``'s control flow on the CPU: stages that fail, run long or are cut by the
budget, GPUs that torch does or does not see.

The script runs its stages through ``$PYTHON``. Here that is a stand-in interpreter: the stage
commands (pip, pytest, the benchmarks, torchrun, the training command) do what the test's plan
says (succeed, fail, hang; a benchmark variant that succeeds appends its CSV row), and every
other call (the environment report, the GPU count, the summary) runs the real interpreter, with
``torch.cuda`` reporting ``FAKE_GPUS`` GPUs when that is set.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"

SITECUSTOMIZE = """
import os
import sys
if os.environ.get("FAKE_GPUS"):   # torch.cuda patched once torch is imported, if ever
    import importlib.abc
    import importlib.machinery
    import types

    def patch(torch):
        n = int(os.environ["FAKE_GPUS"])
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: n
        torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(
            name="NVIDIA H200", total_memory=141 * 2**30, major=9, minor=0)

    class PatchTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, PatchTorch())
"""

FAKE_PYTHON = '''#!{python}
"""The stand-in interpreter (tests/test_gpu_check.py)."""
import csv, json, os, sys, time
args = sys.argv[1:]
plan = json.loads(os.environ.get("FAKE_PLAN", "{{}}"))

def opt(name):
    return args[args.index(name) + 1] if name in args else None

key = None
if args[:2] == ["-m", "pip"]:
    key = "pip"
elif args[:2] == ["-m", "pytest"]:
    key = "pytest:" + args[-1]
elif args[:2] == ["-m", "torch.distributed.run"]:
    key = "torchrun"
elif args[:2] == ["-m", "metakernels.train"]:
    key = "train"
elif args[:1] == ["-c"] and "import metakernels" in args[1]:
    key = "imports"
elif args and args[0].startswith("bench/"):
    key = args[0][len("bench/"):]
    if key == "meta_step.py":
        key = f"meta_step.py:{{opt('--preset')}}:{{opt('--dtype')}}:{{opt('--variant')}}"
if key is None:   # the real interpreter, with torch.cuda faked when FAKE_GPUS is set
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.environ["FAKE_SITE"], env.get("PYTHONPATH", "")])
    os.execve({python!r}, [{python!r}, *args], env)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(key + "\\n")
what = plan.get(key, plan.get(key.split(":")[0], "ok"))
if what == "hang":
    time.sleep(600)
if what == "fail":
    print(f"{{key}}: failed as planned", file=sys.stderr)
    sys.exit(1)
if key.startswith("meta_step.py"):
    path = opt("--csv")
    row = {{"preset": opt("--preset"), "dtype": opt("--dtype"), "model": "tiny",
           "variant": opt("--variant"), "num_tasks": 8, "support_sizes": "8x4", "seq_len": 128,
           "inner_steps": 1, "machine": "fake", "floor_s": 0.01, "floor_gemm": "torch.mm",
           "gemm_gflops": 900.0, "median_s": 0.5 if opt("--variant") == "naive-peft" else 0.1,
           "p20_s": 0.1, "p80_s": 0.1, "tokens_per_s": 1000, "ratio_floor": 10,
           "peak_rss_mb": 100, "base_rss_mb": 50}}
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
'''


def _run(tmp_path, plan=None, gpus=None, nvidia_smi=False, budget=None, extra_env=None,
         stop_at=None):
    tools = tmp_path / "tools"
    site = tmp_path / "site"
    tools.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    python = tools / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    path = [str(tools), *os.environ["PATH"].split(os.pathsep)]
    if nvidia_smi:
        smi = tools / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    else:   # no nvidia-smi of the machine's: PATH without any directory that holds one
        path = [p for p in path if not (Path(p) / "nvidia-smi").exists()]
    env = dict(os.environ, PYTHON=str(python), PATH=os.pathsep.join(path),
               PYTHONPATH=str(REPO), FAKE_SITE=str(site),
               FAKE_PLAN=json.dumps(plan or {}), FAKE_LOG=str(tmp_path / "calls.log"))
    env.pop("FAKE_GPUS", None)
    env.pop("GPU_CHECK_SKIP_PYTEST", None)
    if gpus:
        env["FAKE_GPUS"] = str(gpus)
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    env.update(extra_env or {})
    out = tmp_path / "out"
    cmd = ["bash", str(SCRIPT), str(out)]
    if stop_at is None:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    else:   # SIGTERM to the script once the stage command ``stop_at`` has started
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        log = tmp_path / "calls.log"
        deadline = time.monotonic() + 300
        while not (log.exists() and stop_at in log.read_text().splitlines()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return r, out, _stages(out)


def _stages(out):
    stages = {}
    if (out / "stages.tsv").exists():
        for line in (out / "stages.tsv").read_text().splitlines():
            name, status, _ = line.split("\t")
            stages[name] = status
    return stages


def _log(r):
    return f"exit {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"


def test_a_failing_variant_keeps_every_other_row(tmp_path):
    r, out, stages = _run(tmp_path, gpus=2, plan={
        "meta_step.py:gpu-fewshot:bfloat16:vmap": "fail", "torchrun": "fail"})
    assert r.returncode == 1, _log(r)
    assert stages["meta_gpu-fewshot_bfloat16_vmap"] == "failed (exit 1)"
    assert stages["nccl"] == "failed (exit 1)"                  # 2 GPUs: the NCCL stage ran
    assert stages["meta_gpu-fewshot_bfloat16_naive-peft"] == "ok"
    assert stages["meta_gpu-fewshot_bfloat16_metakernels-triton"] == "ok"
    assert stages["pytest"] == stages["compile_checks"] == stages["ops"] == "ok"
    rows = (out / "meta_step.csv").read_text().splitlines()[1:]
    variants = [(row.split(",")[0], row.split(",")[1], row.split(",")[3]) for row in rows]
    assert variants == [("gpu-fewshot", "bfloat16", "naive-peft"),
                        ("gpu-fewshot", "bfloat16", "metakernels-triton"),
                        ("gpu-fewshot", "bfloat16", "metakernels-torch"),
                        ("gpu-large", "bfloat16", "naive-peft"),
                        ("gpu-large", "bfloat16", "metakernels-triton"),
                        ("gpu-fewshot", "float32", "naive-peft"),
                        ("gpu-fewshot", "float32", "metakernels-triton")]
    summary = (out / "summary.md").read_text()
    assert "NVIDIA H200, 141 GiB, sm_90 (2 GPU(s)): some stages failed" in summary
    # the ratio to naive-peft from the medians of two processes' rows (0.1 s against 0.5 s)
    assert "| metakernels-triton | 0.1000 | 0.1000 | 0.1000 | 1000 | 0.200 |" in summary
    assert "| meta_gpu-fewshot_bfloat16_vmap | failed (exit 1) |" in summary
    # every variant in a process of its own
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert sum(c.startswith("meta_step.py:") for c in calls) == 8


def test_the_budget_cuts_the_last_stage_and_that_is_no_failure(tmp_path):
    # the compile checks (the last stage, its share the whole budget) hang: the budget stops
    # them, and the run exits 0 with a summary that says so
    r, out, stages = _run(tmp_path, gpus=1, budget=40,
                          plan={"pytest:tests/test_triton_compile.py": "hang"})
    assert r.returncode == 0, _log(r)
    assert stages["compile_checks"].startswith("cut by the budget after "), stages
    assert not any("failed" in v or "timed out" in v for v in stages.values()), stages
    assert "every stage that ran passed" in (out / "summary.md").read_text()


def test_stages_the_budget_leaves_no_time_for_are_cut_not_started(tmp_path):
    r, out, stages = _run(tmp_path, gpus=1, budget=5)
    assert r.returncode == 0, _log(r)
    assert stages and all(v.startswith("cut by the budget (not started") for k, v in
                          stages.items() if k != "nccl"), stages
    assert "| install | cut by the budget (not started" in (out / "summary.md").read_text()


def test_a_stage_past_its_own_limit_is_a_failure(tmp_path):
    # ops' own limit (13 % of 90 s) comes before the budget's: a hang, not a cut
    r, out, stages = _run(tmp_path, gpus=1, budget=90, plan={"ops.py": "hang"})
    assert r.returncode == 1, _log(r)
    assert stages["ops"] == "timed out at its limit of 11 s"
    assert stages["meta_gpu-fewshot_bfloat16_metakernels-torch"] == "ok"


def test_a_stopped_script_still_writes_its_summary(tmp_path):
    # stopped from outside (the device's time limit) in the middle of a stage: the stage is
    # stopped too, marked interrupted, and summary.md holds what came before
    key = "meta_step.py:gpu-fewshot:bfloat16:metakernels-triton"
    r, out, stages = _run(tmp_path, gpus=1, plan={key: "hang"}, stop_at=key)
    assert r.returncode == 143, _log(r)
    assert stages == {"install": "ok", "meta_gpu-fewshot_bfloat16_naive-peft": "ok",
                      "meta_gpu-fewshot_bfloat16_metakernels-triton":
                      "interrupted (the script was stopped)"}
    summary = (out / "summary.md").read_text()
    assert "The script was stopped from outside" in summary
    assert "| naive-peft | 0.5000 |" in summary


def test_nvidia_smi_sees_a_gpu_that_torch_does_not(tmp_path):
    r, out, stages = _run(tmp_path, nvidia_smi=True,
                          extra_env={"GPU_CHECK_SKIP_PYTEST": "1"})
    assert r.returncode == 3, _log(r)
    assert "though nvidia-smi sees a GPU" in r.stdout
    summary = (out / "summary.md").read_text()
    assert "No GPU: torch.cuda.is_available() is False, though nvidia-smi sees a GPU" in summary


def test_no_gpu_anywhere_runs_the_compile_checks_and_exits_with_their_status(tmp_path):
    r, out, stages = _run(tmp_path, plan={"pytest:tests/test_triton_compile.py": "fail"})
    assert r.returncode == 1, _log(r)
    assert stages == {"compile_checks": "failed (exit 1)"}
    assert "No GPU" in (out / "summary.md").read_text()


@pytest.mark.parametrize("budget", ["abc", "-5"])
def test_a_bad_budget_is_one_line(tmp_path, budget):
    r, out, stages = _run(tmp_path, budget=budget)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: GPU_CHECK_BUDGET_S={budget}: give a whole number of "
                                f"seconds")
